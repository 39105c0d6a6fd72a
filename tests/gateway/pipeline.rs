//! Every row of SPEC §6, over HTTP/1.1 and h2.

use portcullis::echo;

use crate::pipeline_yaml;
use crate::support::bounded;
use crate::support::client::{get, Conn};
use crate::support::gateway::{LogLine, TestGateway};
use crate::support::pki::TestPki;

#[tokio::test]
async fn policy_rows_answer_and_log_the_deciding_rule() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let ca = &pki.server_ca;
    // (caller, host, status, body, route_policy)
    let cases = [
        (
            &pki.a,
            "any-a.apps.identity",
            200,
            None,
            "route:cf:app:app-a",
        ),
        (
            &pki.b,
            "any-a.apps.identity",
            403,
            Some("Forbidden"),
            "route:route_policies",
        ),
        (
            &pki.no_ou,
            "any-a.apps.identity",
            403,
            Some(""),
            "identity_extraction",
        ),
        (
            &pki.conflicting,
            "any-a.apps.identity",
            403,
            Some(""),
            "identity_extraction",
        ),
        (&pki.no_ou, "open.apps.identity", 200, None, "-"),
        (&pki.a, "space.apps.identity", 200, None, "route:cf:any"),
        (
            &pki.b,
            "space.apps.identity",
            403,
            Some("Forbidden"),
            "domain:scope=space:post-selection",
        ),
        (&pki.c, "org.apps.identity", 200, None, "route:cf:any"),
        (
            &pki.b,
            "org.apps.identity",
            403,
            Some("Forbidden"),
            "domain:scope=org:post-selection",
        ),
        (
            &pki.a,
            "orgless.apps.identity",
            403,
            Some("Forbidden"),
            "domain:scope=org:post-selection",
        ),
        (
            &pki.a_orgless,
            "orgless.apps.identity",
            403,
            Some("Forbidden"),
            "domain:scope=org:post-selection",
        ),
        (
            &pki.a,
            "weird.apps.identity",
            403,
            Some("Forbidden"),
            "domain:scope=unknown:post-selection",
        ),
        (
            &pki.a,
            "nosrc.apps.identity",
            403,
            Some("Forbidden"),
            "route:no_route_policies",
        ),
        (
            &pki.c,
            "srcspace.apps.identity",
            200,
            None,
            "route:cf:space:space-1",
        ),
        (
            &pki.b,
            "srcspace.apps.identity",
            403,
            Some("Forbidden"),
            "route:route_policies",
        ),
        (
            &pki.c,
            "srcorg.apps.identity",
            200,
            None,
            "route:cf:org:org-1",
        ),
    ];
    let mut expected_lines = Vec::new();
    for h2 in [false, true] {
        for (caller, host, status, body, rule) in &cases {
            let resp = bounded(
                "request",
                get(gw.https(), ca, Some(caller), host, "/p?q=1", h2),
            )
            .await
            .unwrap_or_else(|e| panic!("{host}: {e:?}"));
            assert_eq!(resp.status, *status, "{host} h2={h2}: {}", resp.body);
            match body {
                Some(b) => assert_eq!(resp.body, *b, "{host}"),
                None => assert_eq!(resp.echo().path, "/p?q=1"),
            }
            assert!(resp.header("x-cf-routererror").is_none());
            expected_lines.push((host.to_string(), *status, rule.to_string(), h2));
        }
    }
    let lines = gw.log_lines(expected_lines.len()).await;
    for (line, (host, status, rule, h2)) in lines.iter().zip(&expected_lines) {
        let l = LogLine::parse(line);
        assert_eq!(l.host, *host);
        assert_eq!(l.status, *status);
        assert_eq!(l.field("route_policy"), rule, "{line}");
        let proto = if *h2 { "HTTP/2.0" } else { "HTTP/1.1" };
        assert!(l.request.ends_with(proto), "{line}");
    }
    assert_eq!(
        gw.metric(
            "portcullis_authz_decisions_total{decision=\"deny\",rule=\"route:route_policies\"}"
        ),
        4.0
    );
    assert_eq!(
        gw.metric(
            "portcullis_authz_decisions_total{decision=\"allow\",rule=\"route:cf:app:app-a\"}"
        ),
        2.0
    );
}

#[tokio::test]
async fn a_403_is_final_and_never_reaches_the_backend() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    for _ in 0..5 {
        let r = get(
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
    assert_eq!(backend.requests(), 0);
    let r = get(
        gw.https(),
        &pki.server_ca,
        Some(&pki.a),
        "any-a.apps.identity",
        "/",
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(backend.requests(), 1);
}

#[tokio::test]
async fn host_rows_empty_and_unknown() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let mut c = Conn::tls(
        gw.https(),
        &pki.server_ca,
        Some("open.apps.plain"),
        None,
        false,
    )
    .await
    .unwrap();
    let r = c.get("", "/").await.unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.header("x-cf-routererror"), Some("empty_host"));
    for h2 in [false, true] {
        let mut c = Conn::tls(
            gw.https(),
            &pki.server_ca,
            Some("open.apps.plain"),
            None,
            h2,
        )
        .await
        .unwrap();
        let r = c.get("missing.apps.plain", "/x").await.unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(
            r.body,
            "Requested route ('missing.apps.plain') does not exist."
        );
        assert_eq!(r.header("x-cf-routererror"), Some("unknown_route"));
        // Lookup comes before the binding check: an unknown mTLS host is a 404, not a 421.
        let r = c.get("missing.apps.identity", "/").await.unwrap();
        assert_eq!(r.status, 404);
    }
}

/// `OPTIONS *` (RFC 9110 §9.3.7) asks about the server: the gateway answers it, as Go's server
/// does for GoRouter, and no app is asked. `OPTIONS /` is the route's as any request.
#[tokio::test]
async fn options_star_is_the_gateways_to_answer() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let extra = "access_log:\n  path: access.log\n  extra_fields: [route_policy]\n";
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, extra)).await;
    let host = "open.apps.plain";
    for (i, h2) in [false, true].into_iter().enumerate() {
        let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), None, h2)
            .await
            .unwrap();
        let star = match h2 {
            // `:path *` beside the `:authority`.
            true => {
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(http::uri::Scheme::HTTPS);
                parts.authority = Some(host.parse().unwrap());
                parts.path_and_query = Some(http::uri::PathAndQuery::from_static("*"));
                hyper::Request::options(http::Uri::from_parts(parts).unwrap())
            }
            false => hyper::Request::options("*").header("host", host),
        };
        let star = star.body(Default::default()).unwrap();
        let r = c.send(star).await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, ""), "h2: {h2}");
        assert_eq!(backend.requests(), i as u64, "h2: {h2}");
        let mut root = c.build(host, "/", &[]);
        *root.method_mut() = http::Method::OPTIONS;
        let r = c.send(root).await.unwrap();
        assert_eq!(r.echo().method, "OPTIONS");
        assert_eq!(backend.requests(), i as u64 + 1, "h2: {h2}");
    }
    let lines = gw.log_lines(4).await;
    let got: Vec<_> = lines
        .iter()
        .map(|l| {
            let l = LogLine::parse(l);
            (l.request.clone(), l.status, l.backend.clone() == "-")
        })
        .collect();
    let want = |r: &str, no_backend| (r.to_string(), 200, no_backend);
    assert_eq!(
        got,
        [
            want("OPTIONS * HTTP/1.1", true),
            want("OPTIONS / HTTP/1.1", false),
            want("OPTIONS * HTTP/2.0", true),
            want("OPTIONS / HTTP/2.0", false),
        ]
    );
}

#[tokio::test]
async fn binding_rows_421_and_coalescing() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let ca = &pki.server_ca;
    for h2 in [false, true] {
        // Non-mTLS SNI, mTLS host.
        let mut c = Conn::tls(gw.https(), ca, Some("open.apps.plain"), None, h2)
            .await
            .unwrap();
        let r = c.get("any-a.apps.identity", "/").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (421, ""));
        assert!(r.header("x-cf-routererror").is_none());
        // Same connection, non-mTLS host: fine.
        assert_eq!(c.get("open.apps.plain", "/").await.unwrap().status, 200);
        // No SNI at all.
        let mut c = Conn::tls(gw.https(), ca, None, None, h2).await.unwrap();
        assert_eq!(c.get("open.apps.identity", "/").await.unwrap().status, 421);
        // Another mTLS domain's connection.
        let mut c = Conn::tls(gw.https(), ca, Some("x.other.identity"), Some(&pki.a), h2)
            .await
            .unwrap();
        assert_eq!(c.get("any-a.apps.identity", "/").await.unwrap().status, 421);
        assert_eq!(c.get("x.other.identity", "/").await.unwrap().status, 200);
        // mTLS connection for *.apps.identity, host outside it.
        let mut c = Conn::tls(gw.https(), ca, Some("open.apps.identity"), Some(&pki.a), h2)
            .await
            .unwrap();
        assert_eq!(c.get("open.apps.plain", "/").await.unwrap().status, 421);
        // Coalescing under one pattern is allowed.
        assert_eq!(c.get("any-a.apps.identity", "/").await.unwrap().status, 200);
    }
    // The plain HTTP listener never carries mTLS hosts.
    let mut c = Conn::plain(gw.http()).await.unwrap();
    assert_eq!(c.get("any-a.apps.identity", "/").await.unwrap().status, 421);
    assert_eq!(c.get("open.apps.plain", "/").await.unwrap().status, 200);
}

#[tokio::test]
async fn identity_row_for_enforcing_route_outside_mtls() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let r = get(
        gw.https(),
        &pki.server_ca,
        None,
        "enforced.apps.plain",
        "/",
        false,
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.body.as_str()), (403, ""));
    let line = gw.log_lines(1).await;
    assert_eq!(
        LogLine::parse(&line[0]).field("route_policy"),
        "identity_extraction"
    );
}

#[tokio::test]
async fn connection_failures_are_retried_then_502() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let extra =
        "access_log:\n  path: access.log\n  extra_fields: [route_policy, failed_attempts]\n";
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, extra)).await;
    for _ in 0..6 {
        let r = get(
            gw.https(),
            &pki.server_ca,
            Some(&pki.a),
            "half.apps.identity",
            "/",
            false,
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
    }
    let r = get(
        gw.https(),
        &pki.server_ca,
        Some(&pki.a),
        "dead.apps.identity",
        "/",
        true,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-cf-routererror"), Some("endpoint_failure"));
    let lines = gw.log_lines(7).await;
    let attempts: Vec<String> = lines[..6]
        .iter()
        .map(|l| LogLine::parse(l).field("failed_attempts").to_string())
        .collect();
    assert!(
        attempts.contains(&"1".to_string()) && attempts.contains(&"0".to_string()),
        "{attempts:?}"
    );
    let dead = LogLine::parse(&lines[6]);
    assert_eq!(dead.field("failed_attempts"), "3");
    assert_eq!(dead.field("x_cf_routererror"), "endpoint_failure");
}

/// `backends.max_attempts` (GoRouter's): how many endpoints a request may fail to reach before
/// its 502; 3 unless set, changed by a reload.
#[tokio::test]
async fn max_attempts_bounds_the_endpoints_a_request_tries() {
    let pki = TestPki::new();
    let sections = |attempts: &str| {
        let mut y = format!(
            "backends: {{ca_certs: backend-ca.pem, connect_timeout: 1s{attempts}}}\n\
             access_log: {{path: access.log, extra_fields: [failed_attempts]}}\nroutes:\n"
        );
        for _ in 0..6 {
            let d: std::net::SocketAddr =
                format!("127.0.0.1:{}", crate::dead_port()).parse().unwrap();
            y += &crate::route("six-dead.apps.plain", d, "", "");
        }
        y
    };
    let gw = TestGateway::start(&pki, &sections("")).await;
    let mut logged = 0;
    for (attempts, failed) in [
        ("", "3"),
        (", max_attempts: 5", "5"),
        (", max_attempts: 1", "1"),
        (", max_attempts: 9", "6"),
    ] {
        gw.reload(&sections(attempts));
        let r = get(
            gw.https(),
            &pki.server_ca,
            None,
            "six-dead.apps.plain",
            "/",
            false,
        )
        .await
        .unwrap();
        assert_eq!(
            (r.status, r.header("x-cf-routererror")),
            (502, Some("endpoint_failure"))
        );
        logged += 1;
        let lines = gw.log_lines(logged).await;
        let line = LogLine::parse(&lines[logged - 1]);
        assert_eq!(
            line.field("failed_attempts"),
            failed,
            "{attempts}: all six tried at most"
        );
    }
}

/// `tracing.w3c`: each proxied request carries a W3C `traceparent` whose parent id is the
/// gateway's span (the B3 span id), continuing a valid one, starting one from the B3 trace
/// otherwise; off (the default and after a reload), the caller's headers pass untouched.
#[tokio::test]
async fn w3c_trace_context_continues_the_callers_trace_under_the_gateways_span() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let on = "tracing: {w3c: true, w3c_tenant_id: acme}\n";
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, on)).await;
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let connect = |h2| {
        Conn::tls(
            gw.https(),
            &pki.server_ca,
            Some("any-a.apps.identity"),
            Some(&pki.a),
            h2,
        )
    };
    for h2 in [false, true] {
        let mut c = connect(h2).await.unwrap();
        // Started: the B3 ids are the W3C ones, sampled.
        let r = c.get("any-a.apps.identity", "/start").await.unwrap();
        assert_eq!(r.status, 200);
        let seen = &r.echo().headers;
        let (trace, span) = (&seen["x-b3-traceid"], &seen["x-b3-spanid"]);
        assert_eq!(
            seen["traceparent"],
            format!("00-{trace}-{span}-01"),
            "h2 {h2}"
        );
        assert_eq!(seen["tracestate"], format!("acme@portcullis={span}"));
        // Continued: the caller's trace and flags, the gateway's span as parent, its entry
        // first in tracestate in place of an older one.
        let req = c.build(
            "any-a.apps.identity",
            "/continue",
            &[
                ("traceparent", incoming),
                (
                    "tracestate",
                    "acme@portcullis=1111111111111111,congo=t61rcWkgMzE",
                ),
            ],
        );
        let r = c.send(req).await.unwrap();
        let seen = &r.echo().headers;
        let span = &seen["x-b3-spanid"];
        assert_eq!(
            seen["traceparent"],
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span}-00")
        );
        assert_eq!(seen["x-b3-traceid"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            seen["tracestate"],
            format!("acme@portcullis={span},congo=t61rcWkgMzE")
        );
    }
    gw.reload(&pipeline_yaml(backend.addr, ""));
    let mut c = connect(false).await.unwrap();
    let r = c.get("any-a.apps.identity", "/off").await.unwrap();
    assert!(!r.echo().headers.contains_key("traceparent"));
    let req = c.build(
        "any-a.apps.identity",
        "/off",
        &[
            ("traceparent", incoming),
            ("tracestate", "congo=t61rcWkgMzE"),
        ],
    );
    let r = c.send(req).await.unwrap();
    assert_eq!(r.echo().headers["traceparent"], incoming);
    assert_eq!(r.echo().headers["tracestate"], "congo=t61rcWkgMzE");
}

/// `x_forwarded_proto`: by default the connection's scheme, whatever the caller says; `https`
/// always; `client` keeps a caller's `http`/`https` (anything else is replaced). The access log
/// shows what the backend got. A reload switches the mode.
#[tokio::test]
async fn x_forwarded_proto_follows_its_mode() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let with = |mode: &str| format!("{}{mode}", pipeline_yaml(backend.addr, ""));
    let gw = TestGateway::start(&pki, &with("")).await;
    // (mode, caller's header, over TLS, over plain HTTP)
    let rows: [(&str, Option<&str>, &str, &str); 6] = [
        ("", Some("http"), "https", "http"),
        ("", Some("https"), "https", "http"),
        ("x_forwarded_proto: https\n", None, "https", "https"),
        (
            "x_forwarded_proto: client\n",
            Some("HTTPS"),
            "https",
            "https",
        ),
        ("x_forwarded_proto: client\n", Some("http"), "http", "http"),
        (
            "x_forwarded_proto: client\n",
            Some("gopher"),
            "https",
            "http",
        ),
    ];
    let mut requests = 0;
    for (mode, sent, tls_want, plain_want) in rows {
        gw.reload(&with(mode));
        let headers: Vec<(&str, &str)> =
            sent.map(|v| ("x-forwarded-proto", v)).into_iter().collect();
        let mut tls = Conn::tls(
            gw.https(),
            &pki.server_ca,
            Some("open.apps.plain"),
            None,
            false,
        )
        .await
        .unwrap();
        let req = tls.build("open.apps.plain", "/", &headers);
        let got = tls.send(req).await.unwrap().echo();
        assert_eq!(
            got.headers["x-forwarded-proto"], tls_want,
            "{mode} {sent:?} tls"
        );
        let mut plain = Conn::plain(gw.http()).await.unwrap();
        let req = plain.build("open.apps.plain", "/", &headers);
        let got = plain.send(req).await.unwrap().echo();
        assert_eq!(
            got.headers["x-forwarded-proto"], plain_want,
            "{mode} {sent:?} plain"
        );
        requests += 2;
        let lines = gw.log_lines(requests).await;
        let logged: Vec<_> = lines[requests - 2..]
            .iter()
            .map(|l| LogLine::parse(l).field("x_forwarded_proto").to_string())
            .collect();
        assert_eq!(logged, [tls_want, plain_want], "{mode} {sent:?} logged");
    }
}

/// An h2 client may send each cookie as a `cookie` field of its own (browsers do); the app, over
/// HTTP/1.1, gets them as one `Cookie` header (`; `-separated), as Go's h2 server (so GoRouter)
/// hands them over, since an app may read only one `Cookie` header.
#[tokio::test]
async fn an_h2_callers_cookies_reach_the_app_as_one_header() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let host = "open.apps.plain";
    let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), None, true)
        .await
        .unwrap();
    let req = c.build(host, "/", &[("cookie", "a=1"), ("cookie", "b=2; c=3")]);
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().headers["cookie"], "a=1; b=2; c=3");
}
