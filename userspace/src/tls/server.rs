//! Server-side TLS configuration, built once per config (never per connection).

use std::sync::Arc;

use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::CertificateDer;

use crate::config::{AdminTls, Config, ServerCert, Tls};
use crate::names::{best_match, normalize_host, DomainPattern};

/// Every `ServerConfig` the listener may pick from, chosen by the ClientHello's SNI.
#[derive(Debug)]
pub struct TlsServer {
    /// For SNIs outside every mTLS domain (and no SNI): server authentication only.
    plain: Arc<ServerConfig>,
    /// One per mTLS domain, in config order: client certificate required, verified against the
    /// domain's CA bundle.
    domains: Vec<(DomainPattern, Arc<ServerConfig>)>,
}

/// Why TLS settings could not be built from an otherwise valid config.
#[derive(Debug, thiserror::Error)]
pub enum TlsBuildError {
    #[error("domains[{index}].ca_certs: {reason}")]
    ClientCa { index: usize, reason: String },
    #[error("admin.tls.client_ca: {0}")]
    AdminClientCa(String),
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0}")]
    RouteServices(String),
}

#[derive(Debug)]
struct CertResolver {
    certs: Vec<ServerCert>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello.server_name().and_then(|sni| {
            let sni = normalize_host(sni);
            self.certs
                .iter()
                .find_map(|c| best_match(&c.dns_names, &sni).map(|_| c))
        });
        chosen.or(self.certs.first()).map(|c| c.key.clone())
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A verifier requiring a client certificate that chains to one of `cas`; the error says why
/// none of them can be a trust anchor.
pub fn client_verifier(
    cas: &[CertificateDer<'static>],
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(trust_anchors(cas)?), provider())
        .build()
        .map_err(|e| e.to_string())
}

/// The trust anchors in `cas`; the error says why none of them can be one.
pub(super) fn trust_anchors(cas: &[CertificateDer<'static>]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(cas.iter().cloned());
    if added == 0 {
        return Err(format!(
            "none of the {ignored} certificate(s) is a usable trust anchor"
        ));
    }
    Ok(roots)
}

/// A client config trusting `cas`, presenting `client` when given: for TLS backends and for
/// `explain --admin https://…`.
pub fn client_config(
    cas: &[CertificateDer<'static>],
    client: Option<&Arc<CertifiedKey>>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(cas.iter().cloned());
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match client {
        Some(ck) => builder
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck.clone()))),
        None => builder.with_no_client_auth(),
    })
}

/// A server config builder offering what `tls.min_version` and `tls.cipher_suites` allow.
fn server_builder(
    tls: &Tls,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, rustls::Error> {
    let provider = if tls.cipher_suites.is_empty() {
        provider()
    } else {
        Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: tls.cipher_suites.clone(),
            ..rustls::crypto::ring::default_provider()
        })
    };
    ServerConfig::builder_with_provider(provider).with_protocol_versions(tls.versions)
}

fn base(
    tls: &Tls,
    resolver: Arc<CertResolver>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<ServerConfig, rustls::Error> {
    let builder = server_builder(tls)?;
    let mut cfg = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    }
    .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ignore_client_order = true;
    // Kernel TLS needs the traffic secrets after the handshake; rustls keeps them only when
    // asked to. (Harmless when the connection stays in userspace.)
    cfg.enable_secret_extraction = true;
    Ok(cfg)
}

impl TlsServer {
    /// Builds the plain config and one client-verifying config per mTLS domain.
    pub fn build(config: &Config) -> Result<Self, TlsBuildError> {
        let resolver = Arc::new(CertResolver {
            certs: config.tls.certificates.clone(),
        });
        let plain = Arc::new(base(&config.tls, resolver.clone(), None)?);
        let mut domains = Vec::new();
        for (index, d) in config.domains.iter().enumerate() {
            let verifier = client_verifier(&d.ca_certs)
                .map_err(|reason| TlsBuildError::ClientCa { index, reason })?;
            domains.push((
                d.pattern.clone(),
                Arc::new(base(&config.tls, resolver.clone(), Some(verifier))?),
            ));
        }
        Ok(TlsServer { plain, domains })
    }

    /// The config for a ClientHello's SNI, and the mTLS pattern it requires a client cert for.
    pub fn select(&self, sni: Option<&str>) -> (Arc<ServerConfig>, Option<DomainPattern>) {
        let found = sni.and_then(|s| best_match(self.domains.iter().map(|(p, _)| p), s));
        match found {
            Some(i) => (self.domains[i].1.clone(), Some(self.domains[i].0.clone())),
            None => (self.plain.clone(), None),
        }
    }
}

/// The admin API's TLS settings: its own certificate, and a client certificate required from
/// `client_ca` when set; versions and cipher suites as the data plane's (`tls`).
pub fn admin_server_config(a: &AdminTls, tls: &Tls) -> Result<Arc<ServerConfig>, TlsBuildError> {
    let builder = server_builder(tls)?;
    let builder = match &a.client_ca {
        None => builder.with_no_client_auth(),
        Some(cas) => builder
            .with_client_cert_verifier(client_verifier(cas).map_err(TlsBuildError::AdminClientCa)?),
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
        a.key.clone(),
    )));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
