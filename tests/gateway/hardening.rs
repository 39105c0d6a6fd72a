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

/// HTTP/2 Rapid Reset (CVE-2023-44487): a client that opens streams and resets them at once, as
/// fast as it can, on one connection. The gateway takes up at most `h2_max_concurrent_streams`
/// of them (each logged as the 499 it is; how many depends on timing), refuses the rest and
/// ends the connection with GOAWAY ENHANCE_YOUR_CALM, well before the 20,000 the client queued;
/// another client is served.
#[tokio::test]
async fn an_h2_rapid_reset_flood_ends_its_connection() {
    use std::time::Duration;
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(
        &pki,
        &pipeline_yaml(backend.addr, "limits: {h2_max_concurrent_streams: 100}\n"),
    )
    .await;
    let tls = crate::support::client::tls_connect(
        gw.https(),
        &pki.server_ca,
        Some("open.apps.identity"),
        Some(&pki.a),
        &[b"h2"],
    )
    .await
    .unwrap();
    let (mut client, conn) = h2::client::handshake(tls).await.unwrap();
    let driver = tokio::spawn(conn);
    for _ in 0..20_000 {
        let Ok(ready) = client.ready().await else {
            break;
        };
        client = ready;
        let req = http::Request::get("https://open.apps.identity/")
            .body(())
            .unwrap();
        let Ok((_, mut stream)) = client.send_request(req, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), driver)
        .await
        .expect("the gateway ends the connection")
        .unwrap();
    assert!(ended.is_err(), "{ended:?}");

    let mut other = Conn::tls(
        gw.https(),
        &pki.server_ca,
        Some("open.apps.identity"),
        Some(&pki.a),
        true,
    )
    .await
    .unwrap();
    let r = other.get("open.apps.identity", "/").await.unwrap();
    assert_eq!(r.status, 200);
    // The streams taken up were logged; then the one real request.
    let served = gw
        .log_lines_until("the 200", |ls| ls.iter().any(|l| l.contains(" 200 ")))
        .await;
    let taken = served.iter().filter(|l| l.contains(" 499 ")).count();
    assert!(taken <= 100, "{taken} streams taken up: {served:#?}");
    assert!(backend.requests() <= 101, "{}", backend.requests());
}
