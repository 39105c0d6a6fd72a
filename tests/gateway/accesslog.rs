//! SPEC §9: one line per request, asserted field by field for a 200, a 403, a 404 and a 421.

use std::time::{SystemTime, UNIX_EPOCH};

use portcullis::echo;

use crate::pipeline_yaml;
use crate::support::client::Conn;
use crate::support::gateway::{LogLine, TestGateway};
use crate::support::pki::TestPki;

#[tokio::test]
async fn lines_for_200_403_404_421() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let extra = "access_log:\n  path: access.log\n  extra_fields: [caller_cf_org, route_policy, tls_sni, caller_cf_space, caller_cf_app]\n";
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, extra)).await;
    let ca = &pki.server_ca;

    let mut a = Conn::tls(
        gw.https(),
        ca,
        Some("any-a.apps.identity"),
        Some(&pki.a),
        false,
    )
    .await
    .unwrap();
    let req = a.build(
        "any-a.apps.identity",
        "/ok?x=1",
        &[
            ("user-agent", "test-agent"),
            ("referer", "http://ref/"),
            ("x-forwarded-for", "10.1.1.1"),
            // A caller's own is replaced.
            ("x-request-start", "1"),
        ],
    );
    let ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let before = ms(SystemTime::now());
    let ok = a.send(req).await.unwrap();
    let after = ms(SystemTime::now());
    assert_eq!(ok.status, 200);
    let vcap = ok.echo().headers["x-vcap-request-id"].clone();
    // SPEC §6: when the request arrived, in ms since the epoch.
    let request_start: u64 = ok.echo().headers["x-request-start"].parse().unwrap();
    assert!(
        (before..=after).contains(&request_start),
        "{before} <= {request_start} <= {after}"
    );
    let mut b = Conn::tls(
        gw.https(),
        ca,
        Some("any-a.apps.identity"),
        Some(&pki.b),
        true,
    )
    .await
    .unwrap();
    assert_eq!(
        b.get("any-a.apps.identity", "/denied")
            .await
            .unwrap()
            .status,
        403
    );
    assert_eq!(
        a.get("missing.apps.identity", "/nope")
            .await
            .unwrap()
            .status,
        404
    );
    let mut plain = Conn::tls(gw.https(), ca, Some("open.apps.plain"), None, false)
        .await
        .unwrap();
    assert_eq!(
        plain
            .get("any-a.apps.identity", "/wrong-conn")
            .await
            .unwrap()
            .status,
        421
    );

    let lines = gw.log_lines(4).await;
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let keys = |l: &LogLine| l.fields.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    let expected_keys = [
        "x_forwarded_for",
        "x_forwarded_proto",
        "vcap_request_id",
        "response_time",
        "gorouter_time",
        "app_id",
        "app_index",
        "instance_id",
        "caller_cf_org",
        "route_policy",
        "tls_sni",
        "caller_cf_space",
        "caller_cf_app",
        "x_cf_routererror",
    ];
    let backend_addr = backend.addr.to_string();

    let l = LogLine::parse(&lines[0]);
    assert_eq!(keys(&l), expected_keys);
    // The app and the log agree on when the request arrived.
    let logged = humantime::parse_rfc3339(&l.time).unwrap();
    assert_eq!(ms(logged), request_start, "{}", l.time);
    assert_eq!(
        (l.host.as_str(), l.request.as_str(), l.status),
        ("any-a.apps.identity", "GET /ok?x=1 HTTP/1.1", 200)
    );
    assert_eq!(l.req_bytes, 0);
    assert_eq!(l.resp_bytes, ok.body.len() as u64);
    assert_eq!(
        (l.referer.as_str(), l.user_agent.as_str()),
        ("http://ref/", "test-agent")
    );
    assert!(l.client.starts_with("127.0.0.1:"));
    assert_eq!(l.backend, backend_addr);
    assert_eq!(l.field("x_forwarded_for"), "10.1.1.1, 127.0.0.1");
    assert_eq!(l.field("x_forwarded_proto"), "https");
    assert_eq!(l.field("vcap_request_id"), vcap);
    assert!(
        l.field("response_time").parse::<f64>().unwrap()
            >= l.field("gorouter_time").parse::<f64>().unwrap()
    );
    assert_eq!(l.field("app_id"), "backend");
    assert_eq!((l.field("app_index"), l.field("instance_id")), ("-", "-"));
    assert_eq!(l.field("caller_cf_org"), "org-1");
    assert_eq!(l.field("route_policy"), "route:cf:app:app-a");
    assert_eq!(l.field("tls_sni"), "any-a.apps.identity");
    assert_eq!(l.field("caller_cf_space"), "space-1");
    assert_eq!(l.field("caller_cf_app"), "app-a");
    assert_eq!(l.field("x_cf_routererror"), "-");

    let l = LogLine::parse(&lines[1]);
    assert_eq!(keys(&l), expected_keys);
    assert_eq!(
        (l.request.as_str(), l.status, l.resp_bytes),
        ("GET /denied HTTP/2.0", 403, 9)
    );
    assert_eq!(
        (
            l.backend.as_str(),
            l.referer.as_str(),
            l.user_agent.as_str()
        ),
        ("-", "-", "-")
    );
    assert_eq!(l.field("app_id"), "-");
    assert_eq!(l.field("caller_cf_app"), "app-b");
    assert_eq!(l.field("caller_cf_org"), "org-2");
    assert_eq!(l.field("route_policy"), "route:route_policies");
    assert_eq!(l.field("x_cf_routererror"), "-");
    assert!(uuid::Uuid::try_parse(l.field("vcap_request_id")).is_ok());

    let l = LogLine::parse(&lines[2]);
    assert_eq!(keys(&l), expected_keys);
    assert_eq!((l.host.as_str(), l.status), ("missing.apps.identity", 404));
    assert_eq!(
        l.resp_bytes,
        "Requested route ('missing.apps.identity') does not exist.".len() as u64
    );
    assert_eq!(l.field("route_policy"), "-");
    assert_eq!(l.field("tls_sni"), "any-a.apps.identity");
    assert_eq!(l.field("caller_cf_app"), "app-a");
    assert_eq!(l.field("x_cf_routererror"), "unknown_route");

    let l = LogLine::parse(&lines[3]);
    assert_eq!(keys(&l), expected_keys);
    assert_eq!(
        (l.host.as_str(), l.status, l.resp_bytes),
        ("any-a.apps.identity", 421, 0)
    );
    assert_eq!(l.field("tls_sni"), "open.apps.plain");
    for f in [
        "caller_cf_app",
        "caller_cf_space",
        "caller_cf_org",
        "route_policy",
        "x_cf_routererror",
        "app_id",
    ] {
        assert_eq!(l.field(f), "-", "{f}");
    }
}

/// On a dual-stack listener (`[::]`), an IPv4 caller's address arrives as `::ffff:a.b.c.d`. It is
/// the IPv4 address wherever the gateway uses it (shown here: the access log and
/// `X-Forwarded-For` to the backend; deny learning and its IPv4 `exempt` CIDRs take the same
/// address).
#[tokio::test]
async fn ipv4_callers_on_a_dual_stack_listener_are_ipv4() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let extra = "listen: {https: \"[::]:0\"}\n";
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, extra)).await;
    let v6only = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").unwrap_or_default();
    if v6only.trim() != "0" {
        eprintln!("skipped: net.ipv6.bindv6only is not 0, [::] does not take IPv4");
        return;
    }
    let target: std::net::SocketAddr = ([127, 0, 0, 1], gw.https().port()).into();
    let mut a = Conn::tls(
        target,
        &pki.server_ca,
        Some("any-a.apps.identity"),
        Some(&pki.a),
        false,
    )
    .await
    .unwrap();
    let ok = a.get("any-a.apps.identity", "/").await.unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(ok.echo().headers["x-forwarded-for"], "127.0.0.1");
    let l = LogLine::parse(&gw.log_lines(1).await[0]);
    assert!(l.client.starts_with("127.0.0.1:"), "{}", l.client);
    assert_eq!(l.field("x_forwarded_for"), "127.0.0.1");
}

/// The `in_flight` count `/routes` shows for the endpoint at `addr`.
async fn in_flight(gw: &TestGateway, addr: std::net::SocketAddr) -> u64 {
    let route = gw.route_view("any-a.apps.identity").await;
    let ep = route["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == addr.to_string())
        .unwrap();
    ep["in_flight"].as_u64().unwrap()
}

/// A client that gives up on a request (an h2 stream reset, an HTTP/1.1 connection closed)
/// while the backend still works on it: the request is logged with 499 at once, as nginx and
/// GoRouter log it, and its endpoint's in-flight count (least-connection's) is released.
#[tokio::test]
async fn a_request_the_client_gives_up_on_is_logged_499_and_released() {
    use tokio::io::AsyncWriteExt;
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let host = "any-a.apps.identity";
    let path = "/slow?ms=4000";
    let started = std::time::Instant::now();

    // h2: the stream is reset when the client drops its request.
    let mut h2 = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.a), true)
        .await
        .unwrap();
    let req = h2.build(host, path, &[]);
    let pending = tokio::spawn(async move { h2.send(req).await.map(|r| r.status) });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(in_flight(&gw, backend.addr).await, 1);
    pending.abort();

    // HTTP/1.1: the client closes its connection.
    let mut h1 = crate::raw_tls(&gw, &pki, &pki.a, host, b"http/1.1").await;
    h1.write_all(format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(h1);

    let lines = gw.log_lines(2).await;
    assert!(
        started.elapsed() < std::time::Duration::from_millis(3000),
        "logged before the backend answered"
    );
    let mut protos = Vec::new();
    for l in &lines {
        let l = LogLine::parse(l);
        assert_eq!(l.status, 499, "{l:?}");
        assert_eq!(l.backend, backend.addr.to_string());
        assert!(
            l.request.starts_with(&format!("GET {path} ")),
            "{}",
            l.request
        );
        protos.push(l.request.rsplit(' ').next().unwrap().to_string());
    }
    protos.sort();
    assert_eq!(protos, ["HTTP/1.1", "HTTP/2.0"]);
    assert_eq!(in_flight(&gw, backend.addr).await, 0);
    assert_eq!(gw.metric("portcullis_requests_total{code=\"499\"}"), 2.0);
}

/// GoRouter's `extra_headers_to_log`, `redact_query_parameters`, `disable_log_source_ip` and
/// `disable_log_forwarded_for` (`access_log.headers` and `redact_*`): what reaches the app is
/// unchanged, the log keeps no query, client address or forwarded chain; and a reload applies a
/// new format and path from the next request (a path that cannot be opened fails the reload).
#[tokio::test]
async fn logged_headers_redaction_and_their_reload() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let private = "access_log:\n  path: access.log\n  extra_fields: [tls_sni]\n  \
        headers: [X-Tenant-Id, X-B3-TraceId, X-Missing]\n  redact_query_parameters: hash\n  \
        redact_source_ip: true\n  redact_forwarded_for: true\n";
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, private)).await;
    let host = "any-a.apps.identity";
    let mut a = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.a), false)
        .await
        .unwrap();
    let tenant = |t| [("x-tenant-id", t), ("x-forwarded-for", "10.1.1.1")];
    let ok = a
        .send(a.build(host, "/ok?name=peter", &tenant("acme")))
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    let seen = ok.echo();
    // The app gets what it always got.
    assert_eq!(seen.path, "/ok?name=peter");
    assert_eq!(seen.headers["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
    let trace = seen.headers["x-b3-traceid"].clone();
    let mut b = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.b), true)
        .await
        .unwrap();
    let mut denied = b.build(host, "/denied?token=secret", &tenant("globex"));
    *denied.method_mut() = http::Method::POST;
    assert_eq!(b.send(denied).await.unwrap().status, 403);

    let lines = gw.log_lines(2).await;
    let text = lines.join("\n");
    for secret in ["peter", "secret", "10.1.1.1"] {
        assert!(!text.contains(secret), "{secret} logged: {text}");
    }
    let keys = |l: &LogLine| l.fields.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    let l = LogLine::parse(&lines[0]);
    assert_eq!(
        l.request,
        // sha1("name=peter"), GoRouter's example.
        "GET /ok?hash=a6909eece4005d85fb1894cc4efa38564b9c30c3 HTTP/1.1"
    );
    assert_eq!((l.client.as_str(), l.field("x_forwarded_for")), ("-", "-"));
    assert_eq!(
        keys(&l)[8..],
        [
            "tls_sni",
            "x_tenant_id",
            "x_b3_traceid",
            "x_missing",
            "x_cf_routererror"
        ]
    );
    assert_eq!(l.field("x_tenant_id"), "acme");
    // As the app received it: the trace id the gateway made.
    assert_eq!(l.field("x_b3_traceid"), trace);
    assert_eq!(l.field("x_missing"), "-");
    let l = LogLine::parse(&lines[1]);
    assert_eq!(
        (l.request.as_str(), l.status),
        // sha1("token=secret"): every method's query, not only GET's as in GoRouter.
        (
            "POST /denied?hash=bf9670ef7201756440d624c3e0776b08ea7a5d1f HTTP/2.0",
            403
        )
    );
    assert_eq!(l.field("x_tenant_id"), "globex");
    // Refused before it was built for an app: the caller sent none.
    assert_eq!(l.field("x_b3_traceid"), "-");

    // A reload to a path that cannot be opened fails and changes nothing.
    std::fs::write(
        gw.config_path(),
        crate::support::gateway::base(&pipeline_yaml(
            backend.addr,
            "access_log: {path: no-such-dir/access.log}\n",
        )),
    )
    .unwrap();
    let config = portcullis::config::Config::load(&gw.config_path()).unwrap();
    let err = gw.gw.reload(config).unwrap_err().to_string();
    assert!(
        err.starts_with("access_log.path: cannot open '") && err.contains("no-such-dir/access.log"),
        "{err}"
    );
    let still = a.send(a.build(host, "/still?q=1", &tenant("acme"))).await;
    assert_eq!(still.unwrap().status, 200);
    let lines = gw.log_lines(3).await;
    assert!(lines[2].contains("/still?hash="), "{}", lines[2]);

    // The new format and path apply from the next request.
    gw.reload(&pipeline_yaml(
        backend.addr,
        "access_log: {path: access-2.log, extra_fields: [route_policy]}\n",
    ));
    let after = a
        .send(a.build(host, "/after?name=peter", &tenant("acme")))
        .await;
    assert_eq!(after.unwrap().status, 200);
    let moved = gw.dir.path().join("access-2.log");
    let mut line = String::new();
    for _ in 0..100 {
        line = std::fs::read_to_string(&moved).unwrap_or_default();
        if !line.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let l = LogLine::parse(line.lines().next().expect("a line in access-2.log"));
    assert_eq!(l.request, "GET /after?name=peter HTTP/1.1");
    assert!(l.client.starts_with("127.0.0.1:"), "{}", l.client);
    assert_eq!(l.field("x_forwarded_for"), "10.1.1.1, 127.0.0.1");
    assert_eq!(keys(&l)[8..], ["route_policy", "x_cf_routererror"]);
    assert_eq!(gw.log_lines(3).await.len(), 3, "nothing more in access.log");
}

/// SPEC §9 logs every answer, including those hyper gives itself to a request head it cannot
/// parse (before any of the gateway's code sees a request): a malformed header (400), a head
/// over `limits.max_header_bytes` (431) and a URI over hyper's 64 KiB (414). Each is one line
/// with the request line unknown, the connection's fields and the reason as router error, and
/// is counted in `portcullis_requests_total`.
#[tokio::test]
async fn request_heads_hyper_refuses_are_logged_and_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let extra =
        "access_log:\n  path: access.log\n  extra_fields: [tls_sni, caller_cf_app, route_policy]\n\
                 limits: {max_header_bytes: 131072}\n";
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, extra)).await;
    let host = "any-a.apps.identity";
    let long_uri = format!("/{}", "u".repeat(70_000));
    let long_header = "v".repeat(140_000);
    let heads = [
        (
            format!("GET /ok HTTP/1.1\r\nHost: {host}\r\nBad Name: x\r\n\r\n"),
            400,
            "malformed_request",
        ),
        (
            format!("GET /ok HTTP/1.1\r\nHost: {host}\r\nX-Big: {long_header}\r\n\r\n"),
            431,
            "headers_too_large",
        ),
        (
            format!("GET {long_uri} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            414,
            "uri_too_long",
        ),
    ];
    for (i, (head, status, why)) in heads.iter().enumerate() {
        let mut tls = crate::raw_tls(&gw, &pki, &pki.a, host, b"http/1.1").await;
        // The gateway may stop reading a head that is too large before it has all of it, and
        // then the client's write or read can end in a reset; the log line is the point.
        let _ = tls.write_all(head.as_bytes()).await;
        let mut out = Vec::new();
        if tls.read_to_end(&mut out).await.is_ok() && out.len() > 12 {
            let text = String::from_utf8_lossy(&out);
            assert!(text.starts_with(&format!("HTTP/1.1 {status}")), "{text}");
        }
        let lines = gw.log_lines(i + 1).await;
        let l = LogLine::parse(&lines[i]);
        assert_eq!(
            (l.host.as_str(), l.request.as_str(), l.status),
            ("-", "- - HTTP/1.1", *status),
            "{}",
            lines[i]
        );
        assert!(l.client.starts_with("127.0.0.1:"), "{}", lines[i]);
        assert_eq!(l.backend, "-");
        assert_eq!(l.field("x_cf_routererror"), *why);
        assert_eq!(l.field("tls_sni"), host);
        assert_eq!(l.field("caller_cf_app"), "app-a");
        assert_eq!(l.field("route_policy"), "-");
        assert_eq!(
            gw.metric(&format!("portcullis_requests_total{{code=\"{status}\"}}")),
            1.0
        );
    }
    assert_eq!(backend.requests(), 0);
    // A well-formed request on a new connection is served and logged as before.
    let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.a), false)
        .await
        .unwrap();
    assert_eq!(c.get(host, "/ok").await.unwrap().status, 200);
    let lines = gw.log_lines(4).await;
    assert_eq!(LogLine::parse(&lines[3]).request, "GET /ok HTTP/1.1");
}
