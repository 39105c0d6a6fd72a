//! TLS client settings for backends registered with `tls_port`.

use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};

use crate::config::Backends;

/// The client config used for every TLS backend, or `None` when `backends.ca_certs` is unset (TLS
/// endpoints then fail with 502 rather than being reached unverified).
pub fn backend_client_config(b: &Backends) -> Result<Option<Arc<ClientConfig>>, rustls::Error> {
    let Some(cas) = &b.ca_certs else {
        return Ok(None);
    };
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(cas.iter().cloned());
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
    let mut cfg = match &b.client_cert {
        Some(ck) => builder
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck.clone()))),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Kernel TLS needs the traffic secrets after the handshake.
    cfg.enable_secret_extraction = true;
    Ok(Some(Arc::new(cfg)))
}
