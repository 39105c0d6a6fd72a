//! SPEC §5: failed mTLS handshakes end with an alert, no HTTP, no access-log line, a counter.

use std::time::Duration;

use portcullis::echo;

use crate::pipeline_yaml;
use crate::support::client::{get, CallError};
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
