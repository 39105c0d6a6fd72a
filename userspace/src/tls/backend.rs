//! TLS client settings for backends registered with `tls_port`.

use std::sync::Arc;

use rustls::ClientConfig;

use crate::config::Backends;

/// The client config used for every TLS backend, or `None` when `backends.ca_certs` is unset (TLS
/// endpoints then fail with 502 rather than being reached unverified).
pub fn backend_client_config(b: &Backends) -> Result<Option<Arc<ClientConfig>>, rustls::Error> {
    let Some(cas) = &b.ca_certs else {
        return Ok(None);
    };
    let mut cfg = super::client_config(cas, b.client_cert.as_ref())?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Kernel TLS needs the traffic secrets after the handshake.
    cfg.enable_secret_extraction = true;
    Ok(Some(Arc::new(cfg)))
}
