//! Reload swaps certificates, domains and routes for new connections and requests; established
//! connections keep running.

use portcullis::echo;

use crate::route;
use crate::support::client::Conn;
use crate::support::gateway::TestGateway;
use crate::support::pki::TestPki;

fn sections(backend: std::net::SocketAddr, sources: &str) -> String {
    let mut y = String::from(
        "domains: [{name: \"*.apps.identity\", ca_certs: identity-ca.pem}]\nroutes:\n",
    );
    y += &route(
        "r.apps.identity",
        backend,
        "app_id: x",
        &format!("route_policy_scope: any, route_policy_sources: \"{sources}\""),
    );
    y
}

#[tokio::test]
async fn reload_rotates_certificates_and_policy() {
    let old = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&old, &sections(backend.addr, "cf:app:app-a")).await;
    let mut established = Conn::tls(
        gw.https(),
        &old.server_ca,
        Some("r.apps.identity"),
        Some(&old.a),
        true,
    )
    .await
    .unwrap();
    assert_eq!(
        established
            .get("r.apps.identity", "/")
            .await
            .unwrap()
            .status,
        200
    );

    // New server and identity CAs, and a policy that now admits app B.
    let new = TestPki::new();
    new.write(gw.dir.path());
    gw.reload(&sections(backend.addr, "cf:app:app-a, cf:app:app-b"));

    // New connections get the new server certificate and are verified against the new CA.
    assert!(Conn::tls(
        gw.https(),
        &old.server_ca,
        Some("r.apps.identity"),
        Some(&old.a),
        false
    )
    .await
    .is_err());
    let mut fresh = Conn::tls(
        gw.https(),
        &new.server_ca,
        Some("r.apps.identity"),
        Some(&new.b),
        false,
    )
    .await
    .unwrap();
    assert_eq!(fresh.get("r.apps.identity", "/").await.unwrap().status, 200);
    let old_identity = async {
        let mut c = Conn::tls(
            gw.https(),
            &new.server_ca,
            Some("r.apps.identity"),
            Some(&old.a),
            false,
        )
        .await?;
        c.get("r.apps.identity", "/").await
    };
    assert!(
        old_identity.await.is_err(),
        "a certificate from the replaced identity CA must fail the handshake"
    );
    // The established connection keeps working under the new policy.
    assert_eq!(
        established
            .get("r.apps.identity", "/")
            .await
            .unwrap()
            .status,
        200
    );
}
