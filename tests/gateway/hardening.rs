//! SPEC §13: where portcullis is safer than the reference.

use base64::Engine as _;
use portcullis::echo;

use crate::pipeline_yaml;
use crate::support::client::Conn;
use crate::support::gateway::TestGateway;
use crate::support::pki::TestPki;

#[tokio::test]
async fn identity_comes_from_the_certificate_never_from_xfcc() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    // *.apps.identity forwards XFCC untouched, so a header claiming app A reaches the backend…
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let forged = base64::engine::general_purpose::STANDARD.encode(&pki.a.der);
    for h2 in [false, true] {
        let mut c = Conn::tls(
            gw.https(),
            &pki.server_ca,
            Some("any-a.apps.identity"),
            Some(&pki.b),
            h2,
        )
        .await
        .unwrap();
        let req = c.build(
            "any-a.apps.identity",
            "/",
            &[("x-forwarded-client-cert", &forged)],
        );
        // …but the decision is B's: denied.
        assert_eq!(c.send(req).await.unwrap().status, 403);
        let req = c.build(
            "open.apps.identity",
            "/",
            &[("x-forwarded-client-cert", &forged)],
        );
        let echo = c.send(req).await.unwrap().echo();
        assert_eq!(echo.headers.get("x-forwarded-client-cert"), Some(&forged));
    }
    assert_eq!(backend.requests(), 2);
}

#[tokio::test]
async fn host_names_are_normalised_before_every_decision() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let port = gw.https().port().to_string();
    for h2 in [false, true] {
        let mut c = Conn::tls(
            gw.https(),
            &pki.server_ca,
            Some("Any-A.APPS.identity"),
            Some(&pki.a),
            h2,
        )
        .await
        .unwrap();
        for host in [
            "ANY-A.apps.Identity.",
            &format!("any-a.apps.identity:{port}"),
            &format!("Any-A.Apps.Identity.:{port}"),
        ] {
            let r = c.get(host, "/").await.unwrap();
            assert_eq!(r.status, 200, "host {host}");
        }
        // The binding check sees the same normalised name: still 421 across domains.
        let mut c = Conn::tls(
            gw.https(),
            &pki.server_ca,
            Some("OPEN.apps.plain."),
            None,
            h2,
        )
        .await
        .unwrap();
        assert_eq!(
            c.get(&format!("ANY-A.apps.identity.:{port}"), "/")
                .await
                .unwrap()
                .status,
            421
        );
    }
}

#[tokio::test]
async fn no_per_request_denial_logging_only_counters() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    for _ in 0..3 {
        let r = crate::support::client::get(
            gw.https(),
            &pki.server_ca,
            Some(&pki.b),
            "any-a.apps.identity",
            "/",
            false,
        )
        .await
        .unwrap();
        assert_eq!(r.status, 403);
    }
    // Exactly one access-log line per request and the denial is counted.
    assert_eq!(gw.log_lines(3).await.len(), 3);
    assert_eq!(gw.metric("portcullis_requests_total{code=\"403\"}"), 3.0);
}
