//! SPEC §12: the admin API.

use portcullis::echo;

use crate::pipeline_yaml;
use crate::support::client::Conn;
use crate::support::gateway::TestGateway;
use crate::support::pki::TestPki;

#[tokio::test]
async fn health_metrics_routes_and_policy() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let admin = gw.gw.admin_addr().unwrap();
    let mut c = Conn::plain(admin).await.unwrap();
    let r = c.get("admin", "/health").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));

    let r = c.get("admin", "/routes").await.unwrap();
    assert_eq!(r.status, 200);
    let routes: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let any_a = routes
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "any-a.apps.identity")
        .expect("route listed");
    assert_eq!(any_a["options"]["route_policy_sources"], "cf:app:app-a");
    assert_eq!(any_a["endpoints"][0]["tags"]["space_id"], "space-1");
    assert_eq!(any_a["endpoints"][0]["address"], backend.addr.to_string());

    let r = c
        .get("admin", "/routes/ANY-A.apps.identity/policy")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let p: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(p["domain"], "*.apps.identity");
    assert_eq!(p["scope"], "any");
    assert_eq!(p["sources"][0], "cf:app:app-a");
    assert_eq!(
        c.get("admin", "/routes/nope.apps.identity/policy")
            .await
            .unwrap()
            .status,
        404
    );

    let _ = crate::support::client::get(
        gw.https(),
        &pki.server_ca,
        Some(&pki.a),
        "any-a.apps.identity",
        "/",
        false,
    )
    .await;
    gw.log_lines(1).await;
    let m = c.get("admin", "/metrics").await.unwrap().body;
    for name in [
        "portcullis_requests_total{code=\"200\"} 1",
        "portcullis_tls_handshakes_total{domain=\"*.apps.identity\",result=\"ok\"} 1",
        "portcullis_authz_decisions_total{decision=\"allow\",rule=\"route:cf:app:app-a\"} 1",
        "portcullis_ktls_connections_total{mode=\"userspace\"} 1",
        "portcullis_registry_endpoints ",
    ] {
        assert!(m.contains(name), "missing {name} in\n{m}");
    }
}
