//! SPEC §5: failed mTLS handshakes end with an alert, no HTTP, no access-log line, a counter.

use std::time::Duration;

use portcullis::echo;

use crate::pipeline_yaml;
use crate::support::client::{get, tls_config_offering, CallError};
use crate::support::gateway::TestGateway;
use crate::support::pki::TestPki;

fn alert(e: &CallError) -> String {
    format!("{e:?}")
}

#[tokio::test]
async fn bad_client_certificates_fail_the_handshake_and_are_counted() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let ca = &pki.server_ca;
    for h2 in [false, true] {
        let e = get(gw.https(), ca, None, "any-a.apps.identity", "/", h2)
            .await
            .unwrap_err();
        assert!(
            alert(&e).contains("CertificateRequired") || alert(&e).contains("HandshakeFailure"),
            "{e:?}"
        );
        let e = get(
            gw.https(),
            ca,
            Some(&pki.wrong_ca),
            "any-a.apps.identity",
            "/",
            h2,
        )
        .await
        .unwrap_err();
        assert!(alert(&e).contains("UnknownCA"), "{e:?}");
        let e = get(
            gw.https(),
            ca,
            Some(&pki.expired),
            "any-a.apps.identity",
            "/",
            h2,
        )
        .await
        .unwrap_err();
        assert!(alert(&e).contains("CertificateExpired"), "{e:?}");
    }
    // A valid certificate on the same SNI works; so does a plain SNI without one.
    assert_eq!(
        get(
            gw.https(),
            ca,
            Some(&pki.a),
            "any-a.apps.identity",
            "/",
            false
        )
        .await
        .unwrap()
        .status,
        200
    );
    assert_eq!(
        get(gw.https(), ca, None, "open.apps.plain", "/", false)
            .await
            .unwrap()
            .status,
        200
    );
    let d = "domain=\"*.apps.identity\"";
    gw.wait_metric(
        &format!("portcullis_tls_handshakes_total{{{d},result=\"no_certificate\"}}"),
        2.0,
    )
    .await;
    gw.wait_metric(
        &format!("portcullis_tls_handshakes_total{{{d},result=\"unknown_ca\"}}"),
        2.0,
    )
    .await;
    gw.wait_metric(
        &format!("portcullis_tls_handshakes_total{{{d},result=\"expired\"}}"),
        2.0,
    )
    .await;
    assert_eq!(
        gw.metric(&format!(
            "portcullis_tls_handshakes_total{{{d},result=\"ok\"}}"
        )),
        1.0
    );
    assert_eq!(
        gw.metric("portcullis_tls_handshakes_total{domain=\"-\",result=\"ok\"}"),
        1.0
    );
    // Only the two successful requests were logged.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gw.log_lines(2).await.len(), 2);
    assert_eq!(backend.requests(), 2);
}

/// Connects with a client offering only `versions` and `suites` (rustls's names), and sends one
/// GET over HTTP/1.1. Returns the negotiated suite and the status, or the handshake's error.
async fn get_offering(
    to: std::net::SocketAddr,
    pki: &TestPki,
    cert: Option<&portcullis::pki::Leaf>,
    host: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
    suites: &[&str],
) -> Result<(String, u16), std::io::Error> {
    use rustls::crypto::ring;
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: ring::ALL_CIPHER_SUITES
            .iter()
            .filter(|s| suites.is_empty() || suites.contains(&s.suite().as_str().unwrap()))
            .copied()
            .collect(),
        ..ring::default_provider()
    };
    let cfg = tls_config_offering(&pki.server_ca, cert, &[b"http/1.1"], versions, provider);
    let tcp = tokio::net::TcpStream::connect(to).await?;
    let name = rustls_pki_types::ServerName::try_from(host.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?;
    let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap();
    let suite = suite.suite().as_str().unwrap().to_string();
    let mut c = crate::support::client::Conn::over(tls, false)
        .await
        .unwrap();
    let status = c.get(host, "/health").await.unwrap().status;
    Ok((suite, status))
}

/// `tls.min_version` and `tls.cipher_suites` decide what clients may negotiate, on every
/// listener config (plain and mTLS domains) and on the admin API's (`admin.tls`); a client
/// offering nothing they allow fails the handshake, counted as `incompatible`; a reload changes
/// both for the next connection.
#[tokio::test]
async fn min_version_and_cipher_suites_bound_what_clients_negotiate() {
    use rustls::version::{TLS12, TLS13};
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    // The admin API over TLS too, which takes the same bounds.
    let tls = |extra: &str| {
        format!(
            "tls:\n  certificates: [{{cert_chain: server.pem, private_key: server.key}}]\n  \
             handshake_timeout: 2s\n{extra}\
             admin: {{listen: \"127.0.0.1:0\", tls: {{cert_chain: server.pem, private_key: server.key}}}}\n"
        )
    };
    let strict = tls("  min_version: 1.3\n  cipher_suites: [TLS13_AES_256_GCM_SHA384]\n");
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, &strict)).await;
    let incompatible = |domain: &str| {
        format!("portcullis_tls_handshakes_total{{domain=\"{domain}\",result=\"incompatible\"}}")
    };

    // TLS 1.2 alone, every suite: refused, on the plain config and on an mTLS domain's.
    for (host, cert) in [
        ("open.apps.plain", None),
        ("any-a.apps.identity", Some(&pki.a)),
    ] {
        let e = get_offering(gw.https(), &pki, cert, host, &[&TLS12], &[])
            .await
            .unwrap_err();
        assert!(format!("{e:?}").contains("ProtocolVersion"), "{e:?}");
    }
    gw.wait_metric(&incompatible("-"), 1.0).await;
    gw.wait_metric(&incompatible("*.apps.identity"), 1.0).await;
    // TLS 1.3 without the one suite allowed: refused.
    let e = get_offering(
        gw.https(),
        &pki,
        None,
        "open.apps.plain",
        &[&TLS13],
        &["TLS13_AES_128_GCM_SHA256", "TLS13_CHACHA20_POLY1305_SHA256"],
    )
    .await
    .unwrap_err();
    assert!(format!("{e:?}").contains("HandshakeFailure"), "{e:?}");
    gw.wait_metric(&incompatible("-"), 2.0).await;
    // A client offering everything gets the allowed suite, in either config.
    for (host, cert) in [
        ("open.apps.plain", None),
        ("any-a.apps.identity", Some(&pki.a)),
    ] {
        let ok = get_offering(gw.https(), &pki, cert, host, &[&TLS13, &TLS12], &[])
            .await
            .unwrap();
        assert_eq!(ok, ("TLS13_AES_256_GCM_SHA384".to_string(), 200), "{host}");
    }
    // The admin API's TLS takes the same bounds.
    let admin = gw.gw.admin_addr().unwrap();
    let e = get_offering(admin, &pki, None, "localhost", &[&TLS12], &[])
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("ProtocolVersion"), "admin: {e:?}");
    let e = get_offering(
        admin,
        &pki,
        None,
        "localhost",
        &[&TLS13],
        &["TLS13_AES_128_GCM_SHA256", "TLS13_CHACHA20_POLY1305_SHA256"],
    )
    .await
    .unwrap_err();
    assert!(
        format!("{e:?}").contains("HandshakeFailure"),
        "admin: {e:?}"
    );
    let ok = get_offering(admin, &pki, None, "localhost", &[&TLS13, &TLS12], &[])
        .await
        .unwrap();
    assert_eq!(ok, ("TLS13_AES_256_GCM_SHA384".to_string(), 200), "admin");

    // Reloaded without them: TLS 1.2 and every suite again.
    gw.reload(&pipeline_yaml(backend.addr, &tls("")));
    let ok = get_offering(
        gw.https(),
        &pki,
        Some(&pki.a),
        "any-a.apps.identity",
        &[&TLS12],
        &[],
    )
    .await
    .unwrap();
    assert!(ok.0.starts_with("TLS_ECDHE_"), "{ok:?}");
    assert_eq!(ok.1, 200);
    let ok = get_offering(
        gw.https(),
        &pki,
        None,
        "open.apps.plain",
        &[&TLS13],
        &["TLS13_CHACHA20_POLY1305_SHA256"],
    )
    .await
    .unwrap();
    assert_eq!(ok, ("TLS13_CHACHA20_POLY1305_SHA256".to_string(), 200));
    let ok = get_offering(admin, &pki, None, "localhost", &[&TLS12], &[])
        .await
        .unwrap();
    assert!(ok.0.starts_with("TLS_ECDHE_"), "admin after reload: {ok:?}");
}
