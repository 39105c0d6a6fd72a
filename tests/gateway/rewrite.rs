//! `http_rewrite.responses` (GoRouter's): headers removed from and added to every response.

use portcullis::echo;

use crate::pipeline_yaml;
use crate::support::client::get;
use crate::support::gateway::TestGateway;
use crate::support::pki::TestPki;

const REWRITE: &str = "http_rewrite:\n  responses:\n\
    \x20   add_headers_if_not_present:\n\
    \x20     - {name: Strict-Transport-Security, value: \"max-age=31536000\"}\n\
    \x20     - {name: Set-Cookie, value: \"default=1\"}\n\
    \x20   remove_headers: [{name: content-type}]\n";

/// The backend's responses and the gateway's own (a 404, a 403), over HTTP/1.1 and h2, lose
/// the removed header and gain the added ones, unless the response has its own (a backend's
/// `Set-Cookie` stays as it sent it). A reload without the section stops the rewriting.
#[tokio::test]
async fn responses_lose_and_gain_the_configured_headers() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let with = format!("{}{REWRITE}", pipeline_yaml(backend.addr, ""));
    let gw = TestGateway::start(&pki, &with).await;
    let call = |host: &'static str, path: &'static str, h2: bool| {
        let (addr, pki) = (gw.https(), &pki);
        async move {
            get(addr, &pki.server_ca, Some(&pki.a), host, path, h2)
                .await
                .unwrap()
        }
    };
    for h2 in [false, true] {
        let r = call("any-a.apps.identity", "/", h2).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["strict-transport-security"], "max-age=31536000");
        assert_eq!(r.headers["set-cookie"], "default=1");
        assert!(r.headers.get("content-type").is_none(), "{:?}", r.headers);
        // The backend's own Set-Cookie is kept, and no second one is added.
        let r = call("any-a.apps.identity", "/?set-cookie=mine%3D2", h2).await;
        let cookies: Vec<_> = r.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["mine=2"], "h2 {h2}");
        // The gateway's own answers: an unknown route, a denied caller.
        for (host, status) in [("nope.apps.identity", 404), ("space.apps.identity", 403)] {
            let r = get(gw.https(), &pki.server_ca, Some(&pki.b), host, "/", h2)
                .await
                .unwrap();
            assert_eq!(r.status, status, "{host}");
            assert_eq!(
                r.headers["strict-transport-security"], "max-age=31536000",
                "{host}"
            );
            assert!(r.headers.get("content-type").is_none(), "{host}");
        }
    }
    gw.reload(&pipeline_yaml(backend.addr, ""));
    let r = call("any-a.apps.identity", "/", false).await;
    assert!(r.headers.get("strict-transport-security").is_none());
    assert_eq!(r.headers["content-type"], "application/json");
}
