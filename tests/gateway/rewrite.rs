//! `http_rewrite.responses` (GoRouter's): headers removed from and added to every response;
//! `html_error_template_file`: the gateway's own answers as the operator's HTML page; and
//! `tracing.trace_key`: the trace headers GoRouter answers `X-Vcap-Trace` with.

use portcullis::echo;

use crate::pipeline_yaml;
use crate::support::client::{get, Conn};
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

/// `html_error_template_file` (GoRouter's): a caller whose `Accept` names `text/html` gets the
/// gateway's own answers (404, 502 …) as the operator's page, with the status, the plain
/// answer's text (escaped) and its `X-Cf-Routererror`; an API caller, and every answer from an
/// app, are left as they were. A template that cannot be rendered is refused by the config
/// (the running page stays); a reload brings a new one.
#[tokio::test]
async fn the_gateways_own_answers_use_the_html_error_template_for_browsers() {
    use crate::support::client::Conn;
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let pages = tempfile::tempdir().unwrap();
    let page = pages.path().join("error.html");
    std::fs::write(
        &page,
        "<h1>{{.Status}} {{.StatusText}}</h1>\n<p>{{.Message}}</p>\
         <!-- {{.Header.Get \"X-Cf-Routererror\"}} -->\n",
    )
    .unwrap();
    let dead = format!("127.0.0.1:{}", crate::dead_port()).parse().unwrap();
    let sections = |page: &std::path::Path| {
        format!(
            "html_error_template_file: {}\nroutes:\n{}{}",
            page.display(),
            crate::route("app.apps.plain", backend.addr, "", ""),
            crate::route("dead.apps.plain", dead, "", ""),
        )
    };
    let gw = TestGateway::start(&pki, &sections(&page)).await;
    const BROWSER: &str = "text/html,application/xhtml+xml,*/*;q=0.8";
    let call = |host: &'static str, accept: Option<&'static str>, h2: bool| {
        let (addr, pki) = (gw.https(), &pki);
        async move {
            let mut c = Conn::tls(addr, &pki.server_ca, Some(host), None, h2)
                .await
                .unwrap();
            let headers: Vec<(&str, &str)> = accept.iter().map(|a| ("accept", *a)).collect();
            let req = c.build(host, "/", &headers);
            c.send(req).await.unwrap()
        }
    };
    for h2 in [false, true] {
        let r = call("nope.apps.plain", Some(BROWSER), h2).await;
        assert_eq!(r.status, 404);
        assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(r.header("x-cf-routererror"), Some("unknown_route"));
        assert_eq!(
            r.body,
            "<h1>404 Not Found</h1>\n<p>Requested route (&#39;nope.apps.plain&#39;) does not \
             exist.</p><!-- unknown_route -->\n"
        );
        let r = call("dead.apps.plain", Some(BROWSER), h2).await;
        assert_eq!(r.status, 502);
        assert_eq!(
            r.body,
            "<h1>502 Bad Gateway</h1>\n<p></p><!-- endpoint_failure -->\n"
        );
        // An API caller, or one that asks for anything (`*/*`), keeps SPEC's answer.
        for accept in [None, Some("*/*"), Some("application/json")] {
            let r = call("nope.apps.plain", accept, h2).await;
            assert_eq!(r.status, 404);
            assert_eq!(
                r.body,
                "Requested route ('nope.apps.plain') does not exist."
            );
            assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
        }
        // An app's answer is the app's.
        let r = call("app.apps.plain", Some(BROWSER), h2).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.echo().path, "/");
    }

    // A template this gateway would render differently is refused, by line.
    let broken = pages.path().join("broken.html");
    std::fs::write(&broken, "<p>\n{{if .Message}}{{.Message}}{{end}}</p>").unwrap();
    std::fs::write(
        gw.config_path(),
        crate::support::gateway::base(&sections(&broken)),
    )
    .unwrap();
    let e = portcullis::config::Config::load(&gw.config_path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("html_error_template_file: ")
            && e.contains("broken.html' line 2: '{{if .Message}}' is not supported"),
        "{e}"
    );
    let r = call("nope.apps.plain", Some(BROWSER), false).await;
    assert!(r.body.starts_with("<h1>404 Not Found</h1>"), "{}", r.body);

    let plainer = pages.path().join("plainer.html");
    std::fs::write(&plainer, "<b>{{.Status}}</b>").unwrap();
    gw.reload(&sections(&plainer));
    let r = call("nope.apps.plain", Some(BROWSER), false).await;
    assert_eq!(r.body, "<b>404</b>");
}

/// `tracing.trace_key` (GoRouter's `trace_key`): a request whose `X-Vcap-Trace` is the key is
/// answered with `X-Vcap-Router` (the gateway's address the client connected to),
/// `X-Vcap-Backend` and `X-Cf-RouteEndpoint` (the endpoint it went to, the last one tried when
/// none answered), and the key reaches neither the app nor the access log. Another value is an
/// ordinary header; without a key configured nothing is added.
#[tokio::test]
async fn a_trace_request_with_the_key_is_told_the_router_and_the_endpoint() {
    const KEY: &str = "4f1c0a9e7d2b63a8e5f0";
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let sections = |tracing: &str| {
        format!(
            "{tracing}access_log: {{path: access.log, headers: [X-Vcap-Trace]}}\n{}",
            pipeline_yaml(backend.addr, "")
        )
    };
    let gw = TestGateway::start(&pki, &sections(&format!("tracing: {{trace_key: {KEY}}}\n"))).await;
    let traced = ["x-vcap-router", "x-vcap-backend", "x-cf-routeendpoint"];
    let backend_addr = backend.addr.to_string();
    for h2 in [false, true] {
        let mut c = Conn::tls(
            gw.https(),
            &pki.server_ca,
            Some("open.apps.identity"),
            Some(&pki.a),
            h2,
        )
        .await
        .unwrap();
        let mut call = async |host: &str, trace: Option<&str>| {
            let headers: Vec<(&str, &str)> =
                trace.map(|t| ("x-vcap-trace", t)).into_iter().collect();
            let req = c.build(host, "/", &headers);
            c.send(req).await.unwrap()
        };
        let r = call("open.apps.identity", Some(KEY)).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-vcap-router"), Some("127.0.0.1"), "h2={h2}");
        assert_eq!(r.header("x-vcap-backend"), Some(backend_addr.as_str()));
        assert_eq!(r.header("x-cf-routeendpoint"), Some(backend_addr.as_str()));
        assert!(
            !r.echo().headers.contains_key("x-vcap-trace"),
            "the key reached the app"
        );

        // A wrong key, and none: nothing added; a wrong value is the app's header.
        let r = call("open.apps.identity", Some("not-the-key")).await;
        assert_eq!(r.status, 200);
        for h in traced {
            assert_eq!(r.header(h), None, "{h}");
        }
        assert_eq!(r.echo().headers["x-vcap-trace"], "not-the-key");
        let r = call("open.apps.identity", None).await;
        assert_eq!(r.header("x-vcap-backend"), None);

        // No endpoint answered: the last one tried is named with the 502.
        let r = call("dead.apps.identity", Some(KEY)).await;
        assert_eq!(r.status, 502);
        let tried = r
            .header("x-vcap-backend")
            .expect("a dead endpoint is named");
        assert!(
            tried.starts_with("127.0.0.1:") && tried != backend_addr,
            "{tried}"
        );
        assert_eq!(r.header("x-vcap-router"), Some("127.0.0.1"));
        // No route, no endpoint: nothing to name.
        let r = call("nope.apps.identity", Some(KEY)).await;
        assert_eq!(r.status, 404);
        assert_eq!(r.header("x-vcap-backend"), None);
    }
    let lines = gw.log_lines(10).await;
    let logged: Vec<String> = lines
        .iter()
        .map(|l| {
            crate::support::gateway::LogLine::parse(l)
                .field("x_vcap_trace")
                .to_string()
        })
        .collect();
    assert!(
        lines.iter().all(|l| !l.contains(KEY)),
        "the key was logged: {lines:?}"
    );
    assert_eq!(
        logged.iter().filter(|v| *v == "not-the-key").count(),
        2,
        "{logged:?}"
    );

    // Without a key nothing is a trace request, and the header is passed on.
    gw.reload(&sections(""));
    let mut c = Conn::tls(
        gw.https(),
        &pki.server_ca,
        Some("open.apps.identity"),
        Some(&pki.a),
        false,
    )
    .await
    .unwrap();
    let req = c.build("open.apps.identity", "/", &[("x-vcap-trace", KEY)]);
    let r = c.send(req).await.unwrap();
    assert_eq!(r.header("x-vcap-backend"), None);
    assert_eq!(r.echo().headers["x-vcap-trace"], KEY);
}
