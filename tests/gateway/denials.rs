//! Where the XDP gate is configured but cannot run (here: an interface that does not exist), the
//! daemon takes the gate's decisions itself once it has read a ClientHello: sources outside a
//! domain's `allowed_sources`, and sources deny learning denied, go no further.

use portcullis::echo;

use crate::support::client::{tls_connect, Conn};
use crate::support::gateway::TestGateway;
use crate::support::pki::TestPki;

#[tokio::test]
async fn without_the_gate_the_daemon_takes_its_decisions() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let pins = tempfile::tempdir().unwrap();
    let yaml = format!(
        "domains: [{{name: \"*.apps.identity\", ca_certs: identity-ca.pem}}, \
                   {{name: \"*.other.identity\", ca_certs: identity-ca.pem}}, \
                   {{name: \"*.fenced.identity\", ca_certs: identity-ca.pem, \
                     allowed_sources: {{cidrs: [192.0.2.0/24]}}}}]\n\
         xdp:\n  interfaces: [pc-absent0]\n  pin_path: \"{pins}\"\n\
         \x20 deny_learning: {{threshold: 3, window: 10s, ttl: 60s}}\n\
         routes:\n\
         \x20 - {{uris: [a.apps.identity], host: \"127.0.0.1\", port: {port}, options: {{route_policy_scope: any, route_policy_sources: \"cf:app:app-a\"}}}}\n\
         \x20 - {{uris: [a.other.identity], host: \"127.0.0.1\", port: {port}}}\n\
         \x20 - {{uris: [a.fenced.identity], host: \"127.0.0.1\", port: {port}}}\n",
        pins = pins.path().display(),
        port = backend.addr.port(),
    );
    let gw = TestGateway::start(&pki, &yaml).await;
    let xdp = gw.gw.state().xdp.as_ref().expect("deny learning runs");
    assert!(
        !xdp.attached(),
        "no gate on an interface that does not exist"
    );
    assert!(gw
        .metrics()
        .contains("portcullis_xdp_attached{interface=\"pc-absent0\",mode=\"none\"} 0"));

    // A connection to `host` as `leaf` ends after the ClientHello, with no TLS session, and
    // is counted as a handshake with `result` on `domain`.
    let refused = |host: &'static str, leaf, domain: &'static str, result: &'static str| {
        let (gw, pki) = (&gw, &pki);
        async move {
            let tls = tls_connect(
                gw.https(),
                &pki.server_ca,
                Some(host),
                Some(leaf),
                &[b"http/1.1"],
            )
            .await;
            assert!(tls.is_err(), "a TLS session for {host}");
            let sample = format!(
                "portcullis_tls_handshakes_total{{domain=\"{domain}\",result=\"{result}\"}}"
            );
            gw.wait_metric(&sample, 1.0).await;
        }
    };

    // A domain's `allowed_sources` holds too: 127.0.0.1 is outside the fenced one's.
    refused(
        "a.fenced.identity",
        &pki.a,
        "*.fenced.identity",
        "not_allowed",
    )
    .await;

    // Caller B is refused by the route's policy: the third 403 crosses the threshold, and it
    // ends the connection.
    let connect =
        |host: &'static str| Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.b), false);
    let mut c = connect("a.apps.identity").await.unwrap();
    for i in 1..=3 {
        let r = c.get("a.apps.identity", "/").await.unwrap();
        let close = r.header("connection") == Some("close");
        assert_eq!((r.status, close), (403, i == 3), "request {i}");
    }
    assert_eq!(gw.metric("portcullis_xdp_deny_learned_total"), 1.0);

    // Its next connection on that domain ends after the ClientHello, with no TLS session.
    refused("a.apps.identity", &pki.b, "*.apps.identity", "denied").await;
    // The denial is per domain: the same source still reaches the other one.
    let mut other = connect("a.other.identity").await.unwrap();
    assert_eq!(
        other.get("a.other.identity", "/").await.unwrap().status,
        200
    );

    // The admin API lists it, the gauge counts it, and lifting it lets the source in again.
    let admin = gw.gw.admin_addr().unwrap();
    let mut a = Conn::plain(admin).await.unwrap();
    let listed = a.get("admin", "/xdp/denials").await.unwrap().body;
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[0]["domain"], "*.apps.identity", "{listed}");
    assert_eq!(listed[0]["source"], "127.0.0.1", "{listed}");
    gw.wait_metric("portcullis_xdp_deny_entries", 1.0).await;
    let mut req = a.build("admin", "/xdp/denials?source=127.0.0.1", &[]);
    *req.method_mut() = http::Method::DELETE;
    let lifted = a.send(req).await.unwrap();
    assert!(
        lifted.status == 200 && lifted.body.contains("*.apps.identity"),
        "{}",
        lifted.body
    );
    let mut c = connect("a.apps.identity").await.unwrap();
    assert_eq!(c.get("a.apps.identity", "/").await.unwrap().status, 403);
    assert_eq!(
        gw.metric("portcullis_xdp_deny_lifted_total{kind=\"admin\"}"),
        1.0
    );
}
