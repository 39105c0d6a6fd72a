//! SPEC §7: `filter` vs `strict` endpoint selection on a route shared by two spaces.

use portcullis::echo;

use crate::route;
use crate::support::client::Conn;
use crate::support::gateway::{LogLine, TestGateway};
use crate::support::pki::TestPki;

async fn shared_route(
    pki: &TestPki,
    mode: &str,
) -> (TestGateway, echo::EchoServer, echo::EchoServer) {
    let e1 = echo::start("space-1-instance", ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let e2 = echo::start("space-2-instance", ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let opts = "route_policy_scope: space, route_policy_sources: \"cf:any\"";
    let mut y = format!(
        "authorization: {{endpoint_selection: {mode}}}\n\
         domains: [{{name: \"*.apps.identity\", ca_certs: identity-ca.pem}}]\nroutes:\n"
    );
    y += &route(
        "shared.apps.identity",
        e1.addr,
        "app_id: s, space_id: space-1, organization_id: org-1",
        opts,
    );
    y += &route(
        "shared.apps.identity",
        e2.addr,
        "app_id: s, space_id: space-2, organization_id: org-2",
        opts,
    );
    (TestGateway::start(pki, &y).await, e1, e2)
}

#[tokio::test]
async fn filter_answers_the_same_way_every_time() {
    let pki = TestPki::new();
    let (gw, _e1, _e2) = shared_route(&pki, "filter").await;
    for (caller, instance) in [(&pki.a, "space-1-instance"), (&pki.b, "space-2-instance")] {
        let mut c = Conn::tls(
            gw.https(),
            &pki.server_ca,
            Some("shared.apps.identity"),
            Some(caller),
            true,
        )
        .await
        .unwrap();
        for _ in 0..8 {
            let r = c.get("shared.apps.identity", "/").await.unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.echo().backend, instance);
        }
    }
}

#[tokio::test]
async fn strict_selects_first_then_checks() {
    let pki = TestPki::new();
    let (gw, e1, e2) = shared_route(&pki, "strict").await;
    let mut c = Conn::tls(
        gw.https(),
        &pki.server_ca,
        Some("shared.apps.identity"),
        Some(&pki.a),
        false,
    )
    .await
    .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(c.get("shared.apps.identity", "/").await.unwrap().status);
    }
    // Round-robin alternates between the two spaces: half the answers are 403.
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 403).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!((e1.requests(), e2.requests()), (4, 0));
    let lines = gw.log_lines(8).await;
    let denied = lines
        .iter()
        .map(|l| LogLine::parse(l))
        .find(|l| l.status == 403)
        .unwrap();
    assert_eq!(
        denied.field("route_policy"),
        "domain:scope=space:post-selection"
    );
}
