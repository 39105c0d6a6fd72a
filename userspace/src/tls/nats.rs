//! TLS to the NATS servers (`nats.tls`) that follows reloads.
//!
//! The NATS client keeps the one `ClientConfig` it was given for every reconnection. So that a
//! rotated client certificate or CA bundle (rewritten files, then `SIGHUP`) takes effect without
//! a restart, that config asks this object at each handshake which certificate to present and
//! which anchors the server's chain must reach; a reload swaps both at once. The connection
//! already open keeps its session; the next one (a reconnection) uses the new files.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::NatsTls;

struct Current {
    verifier: Arc<WebPkiServerVerifier>,
    client: Option<Arc<CertifiedKey>>,
}

/// The trust anchors and client certificate the next NATS handshake uses.
pub struct LiveNatsTls {
    current: ArcSwap<Current>,
}

impl std::fmt::Debug for LiveNatsTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveNatsTls")
            .field("client_cert", &self.current.load().client.is_some())
            .finish()
    }
}

fn current(tls: &NatsTls) -> Result<Current, String> {
    let roots = super::server::trust_anchors(&tls.ca_certs)
        .map_err(|e| format!("nats.tls.ca_certs: {e}"))?;
    let verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), super::server::provider())
            .build()
            .map_err(|e| format!("nats.tls.ca_certs: {e}"))?;
    Ok(Current {
        verifier,
        client: tls.client_cert.clone(),
    })
}

impl LiveNatsTls {
    pub fn new(tls: &NatsTls) -> Result<Arc<LiveNatsTls>, String> {
        Ok(Arc::new(LiveNatsTls {
            current: ArcSwap::from_pointee(current(tls)?),
        }))
    }

    /// Takes the reloaded files for the next handshake.
    pub fn update(&self, tls: &NatsTls) -> Result<(), String> {
        self.current.store(Arc::new(current(tls)?));
        Ok(())
    }

    /// The client config to hand the NATS client once: every handshake it makes asks `self`.
    pub fn client_config(self: &Arc<Self>) -> Result<rustls::ClientConfig, rustls::Error> {
        Ok(
            rustls::ClientConfig::builder_with_provider(super::server::provider())
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(self.clone())
                .with_client_cert_resolver(self.clone()),
        )
    }
}

impl ResolvesClientCert for LiveNatsTls {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let client = self.current.load().client.clone()?;
        client
            .key
            .choose_scheme(sigschemes)
            .is_some()
            .then_some(client)
    }

    fn has_certs(&self) -> bool {
        self.current.load().client.is_some()
    }
}

/// Webpki's verification against the current anchors, as `with_root_certificates` would do.
impl ServerCertVerifier for LiveNatsTls {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.current.load().verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current.load().verifier.supported_verify_schemes()
    }
}
