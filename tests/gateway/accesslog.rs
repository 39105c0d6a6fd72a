//! SPEC §9: one line per request, asserted field by field for a 200, a 403, a 404 and a 421.

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
        ],
    );
    let ok = a.send(req).await.unwrap();
    assert_eq!(ok.status, 200);
    let vcap = ok.echo().headers["x-vcap-request-id"].clone();
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
