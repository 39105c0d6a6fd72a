//! TLS to backends: the backend certificate must carry `server_cert_domain_san`.

use std::sync::Arc;

use portcullis::echo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::support::client::get;
use crate::support::gateway::TestGateway;
use crate::support::pki::TestPki;

#[tokio::test]
async fn tls_backend_with_san_check() {
    let pki = TestPki::new();
    let leaf = pki.backend_ca.server(&["backend.internal"]).unwrap();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let tls_backend = echo::start_with(
        "tls-backend",
        ([127, 0, 0, 1], 0).into(),
        Some(Arc::new(cfg)),
    )
    .await
    .unwrap();
    let port = tls_backend.addr.port();
    let y = format!(
        "routes:\n\
         \x20 - {{uris: [good.apps.plain], host: 127.0.0.1, tls_port: {port}, server_cert_domain_san: backend.internal}}\n\
         \x20 - {{uris: [bad.apps.plain], host: 127.0.0.1, tls_port: {port}, server_cert_domain_san: other.internal}}\n"
    );
    let gw = TestGateway::start(&pki, &y).await;
    for _ in 0..3 {
        let r = get(
            gw.https(),
            &pki.server_ca,
            None,
            "good.apps.plain",
            "/",
            false,
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.echo().backend, "tls-backend");
    }
    let r = get(
        gw.https(),
        &pki.server_ca,
        None,
        "bad.apps.plain",
        "/",
        true,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-cf-routererror"), Some("endpoint_failure"));
    assert_eq!(tls_backend.requests(), 3);
}
