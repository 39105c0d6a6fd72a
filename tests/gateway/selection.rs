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
    let e1 = crate::echo_on_loopback("space-1-instance").await;
    let e2 = crate::echo_on_loopback("space-2-instance").await;
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

/// A route `sticky.apps.identity` scoped to space-1 with instances `inst-1` and `inst-2` there,
/// `inst-3` in space-2 and `inst-dead` (in space-1, refusing connections).
fn sticky_yaml(sections: &str, backends: [&echo::EchoServer; 3]) -> String {
    let opts = "{route_policy_scope: space, route_policy_sources: \"cf:any\"}";
    let mut y = format!(
        "{sections}domains: [{{name: \"*.apps.identity\", ca_certs: identity-ca.pem}}]\nroutes:\n"
    );
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", crate::dead_port()).parse().unwrap();
    let endpoints = [
        ("inst-1", backends[0].addr, "space-1", "org-1"),
        ("inst-2", backends[1].addr, "space-1", "org-1"),
        ("inst-3", backends[2].addr, "space-2", "org-2"),
        ("inst-dead", dead, "space-1", "org-1"),
    ];
    for (id, addr, space, org) in endpoints {
        let tags = format!("{{app_id: s, space_id: {space}, organization_id: {org}}}");
        y += &crate::instance_route(
            "sticky.apps.identity",
            addr,
            id,
            &[("tags", &tags), ("options", opts)],
        );
    }
    y
}

/// A GET with an optional Cookie header.
async fn send(
    c: &mut Conn,
    host: &str,
    path: &str,
    cookie: Option<String>,
) -> Result<crate::support::client::Resp, crate::support::client::CallError> {
    let cookie = cookie.unwrap_or_default();
    let headers: &[(&str, &str)] = if cookie.is_empty() {
        &[]
    } else {
        &[("cookie", &cookie)]
    };
    let req = c.build(host, path, headers);
    c.send(req).await
}

/// The `__VCAP_ID__` cookies a response sets.
fn vcap_cookies(r: &crate::support::client::Resp) -> Vec<String> {
    r.headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|v| v.starts_with("__VCAP_ID__="))
        .map(str::to_string)
        .collect()
}

/// GoRouter's sticky sessions: a response setting `JSESSIONID` gets `__VCAP_ID__` naming the
/// instance that answered, and requests carrying both go back to it; a session whose instance
/// is gone, refuses connections or may not be reached by the caller moves to an instance the
/// caller may reach. Over HTTP/1.1 and h2; `strict` selection checks the session's instance like
/// any selected endpoint; `sticky_session_cookies: []` turns it off.
#[tokio::test]
async fn sticky_sessions_stay_with_their_instance_and_move_when_they_must() {
    let pki = TestPki::new();
    let mut backends = Vec::new();
    for name in ["inst-1", "inst-2", "inst-3"] {
        backends.push(crate::echo_on_loopback(name).await);
    }
    let three = [&backends[0], &backends[1], &backends[2]];
    let gw = TestGateway::start(&pki, &sticky_yaml("", three)).await;
    let host = "sticky.apps.identity";
    let start = "/?set-cookie=JSESSIONID%3Dabc%3B%20Path%3D%2F%3B%20Secure%3B%20SameSite%3DLax";
    for h2 in [false, true] {
        let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.a), h2)
            .await
            .unwrap();

        // The session starts: the answering instance is named, with the session's attributes.
        let r = send(&mut c, host, start, None).await.unwrap();
        assert_eq!(r.status, 200);
        let instance = r.echo().backend;
        assert!(instance == "inst-1" || instance == "inst-2", "{instance}");
        assert_eq!(
            vcap_cookies(&r),
            [format!(
                "__VCAP_ID__={instance}; HttpOnly; SameSite=Lax; Secure; Path=/"
            )],
            "h2={h2}"
        );

        // With both cookies every request goes back to it, and nothing more is set.
        let session = format!("JSESSIONID=abc; __VCAP_ID__={instance}");
        for _ in 0..6 {
            let r = send(&mut c, host, "/", Some(session.clone()))
                .await
                .unwrap();
            assert_eq!((r.status, r.echo().backend), (200, instance.clone()));
            assert!(vcap_cookies(&r).is_empty());
        }
        // Without the session cookie, __VCAP_ID__ alone does not pin: the rotation goes on.
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..6 {
            let r = send(&mut c, host, "/", Some(format!("__VCAP_ID__={instance}")))
                .await
                .unwrap();
            seen.insert(r.echo().backend);
        }
        assert_eq!(seen.len(), 2, "h2={h2}: {seen:?}");

        // Instances the session cannot stay with: out of the caller's reach (space-2), not
        // registered, refusing connections. Another instance answers and the session moves.
        for gone in ["inst-3", "inst-9", "inst-dead"] {
            let r = send(
                &mut c,
                host,
                "/",
                Some(format!("JSESSIONID=abc; __VCAP_ID__={gone}")),
            )
            .await
            .unwrap();
            assert_eq!(r.status, 200, "{gone}");
            let now = r.echo().backend;
            assert!(now == "inst-1" || now == "inst-2", "{gone}: {now}");
            assert_eq!(
                vcap_cookies(&r),
                [format!("__VCAP_ID__={now}; HttpOnly; Path=/")],
                "h2={h2}, {gone}"
            );
        }
    }
    assert_eq!(backends[2].requests(), 0, "caller A never reached space-2");

    // strict: the session's instance is the selected endpoint, checked like any other.
    gw.reload(&sticky_yaml(
        "authorization: {endpoint_selection: strict}\n",
        three,
    ));
    let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.a), false)
        .await
        .unwrap();
    for (instance, status) in [("inst-2", 200), ("inst-3", 403)] {
        let cookie = format!("JSESSIONID=abc; __VCAP_ID__={instance}");
        let req = c.build(host, "/", &[("cookie", &cookie)]);
        let r = c.send(req).await.unwrap();
        assert_eq!(r.status, status, "{instance}");
        if status == 200 {
            assert_eq!(r.echo().backend, instance);
        }
    }
    assert_eq!(backends[2].requests(), 0);

    // `secure_cookies` (GoRouter's): the instance cookie is Secure although the app's session
    // cookie is not.
    gw.reload(&sticky_yaml(
        "backends: {ca_certs: backend-ca.pem, connect_timeout: 1s, secure_cookies: true}\n",
        three,
    ));
    let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.a), true)
        .await
        .unwrap();
    let r = c
        .get(host, "/?set-cookie=JSESSIONID%3Dabc%3B%20Path%3D%2F")
        .await
        .unwrap();
    let instance = r.echo().backend;
    assert_eq!(
        vcap_cookies(&r),
        [format!("__VCAP_ID__={instance}; HttpOnly; Secure; Path=/")]
    );

    // Turned off: no instance cookie, and sessions are not pinned.
    gw.reload(&sticky_yaml(
        "backends: {ca_certs: backend-ca.pem, connect_timeout: 1s, sticky_session_cookies: []}\n",
        three,
    ));
    let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.a), false)
        .await
        .unwrap();
    let r = c.get(host, start).await.unwrap();
    assert!(vcap_cookies(&r).is_empty());
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let req = c.build(
            host,
            "/",
            &[("cookie", "JSESSIONID=abc; __VCAP_ID__=inst-1")],
        );
        seen.insert(c.send(req).await.unwrap().echo().backend);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

/// Routes match paths in any case, as GoRouter's do; the instance cookie is scoped to the
/// route's path as the client spelled it, since browsers compare a cookie's `Path` exactly.
#[tokio::test]
async fn the_instance_cookie_is_scoped_to_the_route_path_as_the_client_spells_it() {
    let pki = TestPki::new();
    let backend = crate::echo_on_loopback("inst-1").await;
    let opts = "{route_policy_scope: any, route_policy_sources: \"cf:any\"}";
    let y = format!(
        "domains: [{{name: \"*.apps.identity\", ca_certs: identity-ca.pem}}]\nroutes:\n{}",
        crate::instance_route(
            "shop.apps.identity/Cart",
            backend.addr,
            "inst-1",
            &[("options", opts)],
        )
    );
    let gw = TestGateway::start(&pki, &y).await;
    let host = "shop.apps.identity";
    let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.a), false)
        .await
        .unwrap();
    for (spelled, path) in [
        ("/Cart", "/Cart"),
        ("/cart/items", "/cart"),
        ("/CART/x", "/CART"),
    ] {
        let target = format!("{spelled}?set-cookie=JSESSIONID%3Dabc");
        let r = send(&mut c, host, &target, None).await.unwrap();
        assert_eq!(r.status, 200, "{spelled}");
        assert_eq!(r.echo().path, target, "the app gets the path as sent");
        assert_eq!(
            vcap_cookies(&r),
            [format!("__VCAP_ID__=inst-1; HttpOnly; Path={path}")],
            "{spelled}"
        );
    }
    assert_eq!(
        send(&mut c, host, "/carts", None).await.unwrap().status,
        404
    );
}

/// GoRouter's instance routing: `X-CF-App-Instance: <app guid>:<index>` sends the request to that
/// instance of the route's app, still under the route's policy; a malformed header or an
/// instance the route does not have gets 400 before any backend sees the request.
#[tokio::test]
async fn x_cf_app_instance_asks_for_one_instance_under_the_same_policy() {
    let pki = TestPki::new();
    let guid = "6e8e2c2e-6c55-4c1c-9a5e-4b5b1c3d2e1f";
    let mut backends = Vec::new();
    let opts = "{route_policy_scope: space, route_policy_sources: \"cf:any\"}";
    let mut y = String::from(
        "domains: [{name: \"*.apps.identity\", ca_certs: identity-ca.pem}]\nroutes:\n",
    );
    for (index, space) in [(0, "space-1"), (1, "space-1"), (2, "space-2")] {
        let e = crate::echo_on_loopback(&format!("index-{index}")).await;
        let tags = format!("{{app_id: {guid}, space_id: {space}, organization_id: org-1}}");
        y += &crate::instance_route(
            "inst.apps.identity",
            e.addr,
            &format!("id-{index}"),
            &[
                ("app", guid),
                ("private_instance_index", &format!("\"{index}\"")),
                ("tags", &tags),
                ("options", opts),
            ],
        );
        backends.push(e);
    }
    let gw = TestGateway::start(&pki, &y).await;
    let host = "inst.apps.identity";
    for h2 in [false, true] {
        let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.a), h2)
            .await
            .unwrap();
        let mut ask = async |value: &str| {
            let req = c.build(host, "/", &[("x-cf-app-instance", value)]);
            c.send(req).await.unwrap()
        };
        for _ in 0..4 {
            let r = ask(&format!("{guid}:1")).await;
            assert_eq!((r.status, r.echo().backend.as_str()), (200, "index-1"));
        }
        // The instance is out of caller A's reach (space-2): the policy still decides.
        let r = ask(&format!("{guid}:2")).await;
        assert_eq!((r.status, r.body.as_str()), (403, "Forbidden"));
        // Instances the route does not have.
        let other = "00000000-0000-0000-0000-000000000000";
        for (app, index) in [(guid, "7"), (other, "0")] {
            let r = ask(&format!("{app}:{index}")).await;
            assert_eq!(r.status, 400);
            assert_eq!(
                r.body,
                format!(
                    "Requested instance ('{index}') with guid ('{app}') does not exist for route \
                     ('inst.apps.identity')"
                )
            );
            assert_eq!(r.header("x-cf-routererror"), Some("unknown_route"));
        }
        // Malformed.
        for bad in [
            "nope".to_string(),
            guid.to_string(),
            format!("{guid}:"),
            format!("{guid}:x"),
            format!("{}:1", guid.to_uppercase()),
            format!("{guid}x:1"),
        ] {
            let r = ask(&bad).await;
            assert_eq!(
                (r.status, r.body.as_str()),
                (400, "Invalid X-CF-App-Instance Header"),
                "{bad}"
            );
            assert_eq!(
                r.header("x-cf-routererror"),
                Some("invalid_cf_app_instance_header")
            );
        }
    }
    assert_eq!(backends[0].requests(), 0);
    assert_eq!(backends[1].requests(), 8);
    assert_eq!(backends[2].requests(), 0);
    // Without the header the route balances over the instances caller A may reach.
    let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.a), false)
        .await
        .unwrap();
    for _ in 0..4 {
        assert_eq!(c.get(host, "/").await.unwrap().status, 200);
    }
    assert!(backends[0].requests() >= 1 && backends[1].requests() > 8);
    assert_eq!(backends[0].requests() + backends[1].requests(), 12);
    assert_eq!(backends[2].requests(), 0);
}

/// GoRouter's `X-CF-Process-Instance: <process guid>[:<index>]` (how a canary deployment's new
/// process is tried before it takes traffic): the request goes to an instance of that process
/// (the endpoints' `process_id` tag), or to that one instance; `X-CF-App-Instance` comes first.
#[tokio::test]
async fn x_cf_process_instance_asks_for_one_process_or_one_of_its_instances() {
    let pki = TestPki::new();
    let app = "6e8e2c2e-6c55-4c1c-9a5e-4b5b1c3d2e1f";
    let (old, canary) = (
        "0d3f6a2b-1111-4c1c-9a5e-000000000001",
        "0d3f6a2b-2222-4c1c-9a5e-000000000002",
    );
    let mut backends = Vec::new();
    let mut y = String::from(
        "domains: [{name: \"*.apps.identity\", ca_certs: identity-ca.pem}]\nroutes:\n",
    );
    for (process, name) in [(old, "old"), (canary, "canary")] {
        for index in 0..2 {
            let e = crate::echo_on_loopback(&format!("{name}-{index}")).await;
            let tags = format!("{{app_id: {app}, process_id: {process}, space_id: space-1}}");
            y += &crate::instance_route(
                "canary.apps.identity",
                e.addr,
                &format!("{name}-{index}"),
                &[
                    ("app", app),
                    ("private_instance_index", &format!("\"{index}\"")),
                    ("tags", &tags),
                    (
                        "options",
                        "{route_policy_scope: any, route_policy_sources: \"cf:any\"}",
                    ),
                ],
            );
            backends.push(e);
        }
    }
    let gw = TestGateway::start(&pki, &y).await;
    let host = "canary.apps.identity";
    for h2 in [false, true] {
        let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.a), h2)
            .await
            .unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..8 {
            let r = call(&mut c, host, &[("x-cf-process-instance", canary)]).await;
            assert_eq!(r.status, 200);
            seen.insert(r.echo().backend);
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            ["canary-0", "canary-1"]
        );
        for _ in 0..3 {
            let r = call(
                &mut c,
                host,
                &[("x-cf-process-instance", &format!("{canary}:1"))],
            )
            .await;
            assert_eq!(r.echo().backend, "canary-1");
        }
        // X-CF-App-Instance wins over it.
        let headers = [
            ("x-cf-app-instance", format!("{app}:0")),
            ("x-cf-process-instance", format!("{canary}:1")),
        ];
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = call(&mut c, host, &h).await;
        assert!(r.echo().backend.ends_with("-0"), "{}", r.echo().backend);
        // A process or an index the route does not have.
        let other = "00000000-0000-0000-0000-000000000000";
        for (value, body) in [
            (
                other.to_string(),
                format!("Requested instance with process guid ('{other}') does not exist for route ('{host}')"),
            ),
            (
                format!("{canary}:7"),
                format!("Requested instance ('7') with process guid ('{canary}') does not exist for route ('{host}')"),
            ),
        ] {
            let r = call(&mut c, host, &[("x-cf-process-instance", &value)]).await;
            assert_eq!((r.status, r.body.as_str()), (400, body.as_str()));
            assert_eq!(r.header("x-cf-routererror"), Some("unknown_route"));
        }
        for bad in [
            "nope".to_string(),
            format!("{canary}:"),
            format!("{canary}:x"),
            canary.to_uppercase(),
            format!("{canary}:1:2"),
        ] {
            let r = call(&mut c, host, &[("x-cf-process-instance", &bad)]).await;
            assert_eq!(
                (r.status, r.body.as_str()),
                (400, "Invalid X-CF-Process-Instance Header"),
                "{bad}"
            );
            assert_eq!(
                r.header("x-cf-routererror"),
                Some("invalid_cf_process_instance_header")
            );
        }
    }
    // The old process saw at most the X-CF-App-Instance requests (index 0 of the app is old-0
    // and canary-0 alike, as in GoRouter).
    assert!(backends[0].requests() <= 2);
    assert_eq!(backends[1].requests(), 0);
}

/// GoRouter tells an app which of its instances a request went to: `X-CF-ApplicationID` (the
/// registration's `app`), `X-CF-InstanceIndex` and `X-CF-InstanceID` (`private_instance_id`, or
/// the endpoint's address without one). They are set for the endpoint that answers, over
/// HTTP/1.1 and h2, and whatever the caller sent under those names never reaches the app.
#[tokio::test]
async fn the_app_is_told_which_instance_it_is_and_the_caller_cannot_say() {
    let pki = TestPki::new();
    let guid = "6e8e2c2e-6c55-4c1c-9a5e-4b5b1c3d2e1f";
    let named = crate::echo_on_loopback("named").await;
    let bare = crate::echo_on_loopback("bare").await;
    let host = "who.apps.plain";
    let y = format!(
        "routes:\n\
         \x20 - {{uris: [{host}], host: \"{}\", port: {}, app: {guid}, private_instance_index: \"3\", private_instance_id: inst-3}}\n\
         \x20 - {{uris: [{host}], host: \"{}\", port: {}}}\n",
        named.addr.ip(),
        named.addr.port(),
        bare.addr.ip(),
        bare.addr.port(),
    );
    let gw = TestGateway::start(&pki, &y).await;
    let spoof = [
        ("x-cf-applicationid", "someone-else"),
        ("X-CF-InstanceIndex", "99"),
        ("x-cf-instanceid", "forged"),
    ];
    for h2 in [false, true] {
        let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), None, h2)
            .await
            .unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..6 {
            let headers: &[(&str, &str)] = if i % 2 == 0 { &spoof } else { &[] };
            let req = c.build(host, "/", headers);
            let r = c.send(req).await.unwrap();
            assert_eq!(r.status, 200);
            let echo = r.echo();
            let got = |name: &str| echo.headers.get(name).cloned();
            let want = match echo.backend.as_str() {
                "named" => [guid.to_string(), "3".into(), "inst-3".into()],
                _ => [String::new(), String::new(), bare.addr.to_string()],
            };
            assert_eq!(
                [
                    got("x-cf-applicationid"),
                    got("x-cf-instanceindex"),
                    got("x-cf-instanceid")
                ],
                want.map(Some),
                "h2={h2} {}",
                echo.backend
            );
            seen.insert(echo.backend);
        }
        assert_eq!(seen.len(), 2, "both instances answered (h2={h2})");
    }
}

/// GoRouter's `locally-optimistic` AZ preference: with `backends.availability_zone: z1`, every
/// request goes to the route's endpoint in z1 while it answers, over HTTP/1.1 and h2; when it
/// cannot be reached, the request is retried in z2 and answered there.
#[tokio::test]
async fn locally_optimistic_keeps_requests_in_the_gateways_zone_while_it_can() {
    let pki = TestPki::new();
    let near = crate::echo_on_loopback("near").await;
    let far = crate::echo_on_loopback("far").await;
    let dead = crate::dead_port();
    let entry = |host: &str, port: u16, zone: &str| {
        format!(
            "  - {{uris: [{host}], host: 127.0.0.1, port: {port}, availability_zone: {zone}}}\n"
        )
    };
    let mut y = String::from(
        "backends: {ca_certs: backend-ca.pem, connect_timeout: 1s, availability_zone: z1, \
         az_preference: locally-optimistic}\nroutes:\n",
    );
    y += &entry("az.apps.plain", near.addr.port(), "z1");
    y += &entry("az.apps.plain", far.addr.port(), "z2");
    y += &entry("down.apps.plain", dead, "z1");
    y += &entry("down.apps.plain", far.addr.port(), "z2");
    let gw = TestGateway::start(&pki, &y).await;
    for h2 in [false, true] {
        for (host, want) in [("az.apps.plain", "near"), ("down.apps.plain", "far")] {
            let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), None, h2)
                .await
                .unwrap();
            for _ in 0..6 {
                let r = c.get(host, "/").await.unwrap();
                assert_eq!((r.status, r.echo().backend.as_str()), (200, want), "{host}");
            }
        }
    }
    assert_eq!(near.requests(), 12);
    assert_eq!(
        far.requests(),
        12,
        "only the requests the dead z1 endpoint could not take"
    );
    // `/routes` shows each endpoint's zone.
    let route = gw.route_view("az.apps.plain").await;
    let mut zones: Vec<(String, String)> = route["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_string(),
                e["availability_zone"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    zones.sort();
    let mut want = vec![
        (near.addr.to_string(), "z1".to_string()),
        (far.addr.to_string(), "z2".to_string()),
    ];
    want.sort();
    assert_eq!(zones, want);
}

/// GoRouter's hash-based routing (`loadbalancing: hash`, RFC 0042) on route `hash.apps.identity`
/// over `instance-a`..`-c`, and on `hash-down.apps.identity`, the same instances with
/// `instance-b` refusing connections. The tenants' owners are those of GoRouter's own table (the
/// vector in `routing/maglev.rs`): tenant-1 → b, then c, then a; tenant-3 → a; acme → c.
#[tokio::test]
async fn hash_based_routing_keeps_each_tenant_on_its_instance() {
    let pki = TestPki::new();
    let mut echoes = Vec::new();
    for name in ["instance-a", "instance-b", "instance-c"] {
        echoes.push(crate::echo_on_loopback(name).await);
    }
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", crate::dead_port()).parse().unwrap();
    // hash_balance as YAML's number, as a static route may give it.
    let options = "{loadbalancing: hash, hash_header: Tenant-ID, hash_balance: 1.5}";
    let mut y = "access_log: {path: access.log, extra_fields: [failed_attempts]}\n\
                 domains: [{name: \"*.apps.identity\", ca_certs: identity-ca.pem}]\nroutes:\n"
        .to_string();
    for (host, b) in [("hash", echoes[1].addr), ("hash-down", dead)] {
        for (id, addr) in [
            ("instance-a", echoes[0].addr),
            ("instance-b", b),
            ("instance-c", echoes[2].addr),
        ] {
            y += &crate::instance_route(
                &format!("{host}.apps.identity"),
                addr,
                id,
                &[("options", options)],
            );
        }
    }
    let gw = TestGateway::start(&pki, &y).await;
    let expected = [
        ("tenant-1", "instance-b"),
        ("tenant-2", "instance-b"),
        ("tenant-3", "instance-a"),
        ("tenant-4", "instance-c"),
        ("tenant-5", "instance-a"),
        ("tenant-6", "instance-b"),
        ("acme", "instance-c"),
        ("globex", "instance-c"),
    ];
    for h2 in [false, true] {
        let mut c = Conn::tls(
            gw.https(),
            &pki.server_ca,
            Some("hash.apps.identity"),
            Some(&pki.a),
            h2,
        )
        .await
        .unwrap();
        for (tenant, owner) in expected {
            for _ in 0..3 {
                let r = call(&mut c, "hash.apps.identity", &[("tenant-id", tenant)]).await;
                assert_eq!(
                    (r.status, r.echo().backend.as_str()),
                    (200, owner),
                    "{tenant}, h2 {h2}"
                );
            }
        }
        // Without the header (or with it empty): every instance in turn.
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..6 {
            let headers: &[(&str, &str)] = if i % 2 == 0 {
                &[]
            } else {
                &[("tenant-id", "")]
            };
            let r = call(&mut c, "hash.apps.identity", headers).await;
            seen.insert(r.echo().backend);
        }
        assert_eq!(seen.len(), 3, "h2 {h2}: {seen:?}");
        // A sticky session comes first (GoRouter: the cookie has precedence over the hash).
        let cookie = "JSESSIONID=s1; __VCAP_ID__=instance-a";
        let r = call(
            &mut c,
            "hash.apps.identity",
            &[("tenant-id", "tenant-1"), ("cookie", cookie)],
        )
        .await;
        assert_eq!(r.echo().backend, "instance-a");
    }

    // hash_balance 1.5: one slow request of tenant-1 on instance-b (1 of 1 in flight: 3× the
    // average of the three) sends its next request to instance-c, the next in the table; once
    // it is done, tenant-1 is back on instance-b.
    let (b, c_) = (&echoes[1], &echoes[2]);
    let before = b.requests();
    let mut c = Conn::tls(
        gw.https(),
        &pki.server_ca,
        Some("hash.apps.identity"),
        Some(&pki.a),
        false,
    )
    .await
    .unwrap();
    let slow = tokio::spawn(async move {
        let req = c.build(
            "hash.apps.identity",
            "/slow?ms=2000",
            &[("tenant-id", "tenant-1")],
        );
        c.send(req).await.unwrap().echo().backend
    });
    crate::support::bounded("the slow request reaches instance-b", async {
        while b.requests() < before + 1 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut c = Conn::tls(
        gw.https(),
        &pki.server_ca,
        Some("hash.apps.identity"),
        Some(&pki.a),
        false,
    )
    .await
    .unwrap();
    let c_before = c_.requests();
    let r = call(&mut c, "hash.apps.identity", &[("tenant-id", "tenant-1")]).await;
    assert_eq!(
        r.echo().backend,
        "instance-c",
        "instance-b is over the balance"
    );
    assert_eq!(c_.requests(), c_before + 1);
    // Another tenant's owner is not affected.
    let r = call(&mut c, "hash.apps.identity", &[("tenant-id", "tenant-3")]).await;
    assert_eq!(r.echo().backend, "instance-a");
    assert_eq!(slow.await.unwrap(), "instance-b");
    let r = call(&mut c, "hash.apps.identity", &[("tenant-id", "tenant-1")]).await;
    assert_eq!(r.echo().backend, "instance-b", "back once the load is gone");

    // instance-b down: tenant-1 is retried on instance-c (the table's next), then goes there
    // directly while instance-b cools down; tenant-3 stays on instance-a.
    let mut c = Conn::tls(
        gw.https(),
        &pki.server_ca,
        Some("hash-down.apps.identity"),
        Some(&pki.a),
        false,
    )
    .await
    .unwrap();
    for _ in 0..3 {
        let r = call(
            &mut c,
            "hash-down.apps.identity",
            &[("tenant-id", "tenant-1")],
        )
        .await;
        assert_eq!((r.status, r.echo().backend.as_str()), (200, "instance-c"));
        let r = call(
            &mut c,
            "hash-down.apps.identity",
            &[("tenant-id", "tenant-3")],
        )
        .await;
        assert_eq!(r.echo().backend, "instance-a");
    }
    let down = |ls: &[String]| -> Vec<String> {
        ls.iter()
            .filter(|l| l.starts_with("hash-down.apps.identity "))
            .map(|l| LogLine::parse(l).field("failed_attempts").to_string())
            .collect()
    };
    let lines = gw
        .log_lines_until("six hash-down lines", |ls| down(ls).len() >= 6)
        .await;
    let mut failed = down(&lines);
    failed.sort();
    assert_eq!(
        failed,
        ["0", "0", "0", "0", "0", "1"],
        "one failed connection in all"
    );

    // The route's options are shown as registered.
    let view = gw.route_view("hash.apps.identity").await;
    assert_eq!(view["options"]["loadbalancing"], "hash", "{view}");
    assert_eq!(view["options"]["hash_balance"], "1.5", "{view}");
    assert_eq!(
        (
            &view["load_balancing"],
            &view["hash_header"],
            &view["hash_balance"]
        ),
        (
            &serde_json::json!("hash"),
            &serde_json::json!("tenant-id"),
            &serde_json::json!(1.5)
        ),
        "{view}"
    );
}

/// GoRouter's `balancing_algorithm` as `backends.balancing_algorithm`: routes that name no
/// `loadbalancing`, and a hash route's requests without its header, are balanced by it; a
/// route's own option wins; a reload changes it for the next request.
#[tokio::test]
async fn the_default_balancing_algorithm_applies_where_a_route_names_none() {
    let pki = TestPki::new();
    let one = crate::echo_on_loopback("one").await;
    let two = crate::echo_on_loopback("two").await;
    let sections = |algorithm: &str| {
        let mut y = format!(
            "backends: {{ca_certs: backend-ca.pem, connect_timeout: 1s, balancing_algorithm: {algorithm}}}\n\
             domains: [{{name: \"*.apps.identity\", ca_certs: identity-ca.pem}}]\nroutes:\n"
        );
        for (host, options) in [
            ("plain", ""),
            ("rr", "loadbalancing: round-robin"),
            ("hashed", "loadbalancing: hash, hash_header: tenant-id"),
        ] {
            for (id, b) in [("one", &one), ("two", &two)] {
                y += &crate::instance_route(
                    &format!("{host}.apps.identity"),
                    b.addr,
                    id,
                    &[("options", &format!("{{{options}}}"))],
                );
            }
        }
        y
    };
    let gw = TestGateway::start(&pki, &sections("least-connection")).await;
    // least-connection by default: every request goes to the idle instance, on a route without
    // options and on a hash route's requests without the header.
    for host in ["plain.apps.identity", "hashed.apps.identity"] {
        let (busy, answered) = while_one_is_busy(&gw, &pki, [&one, &two], host).await;
        assert!(
            answered.iter().all(|b| *b != busy),
            "{host}: {busy} busy, {answered:?}"
        );
    }
    // A route's own round-robin wins: both take turns.
    let (_, answered) = while_one_is_busy(&gw, &pki, [&one, &two], "rr.apps.identity").await;
    assert_eq!(
        answered.iter().filter(|b| *b == "one").count(),
        2,
        "{answered:?}"
    );
    assert_eq!(
        gw.route_view("plain.apps.identity").await["load_balancing"],
        "least-connection"
    );
    assert_eq!(
        gw.route_view("rr.apps.identity").await["load_balancing"],
        "round-robin"
    );
    assert_eq!(
        gw.route_view("hashed.apps.identity").await["load_balancing"],
        "hash"
    );

    // Reloaded to round-robin: the route without options takes turns too.
    gw.reload(&sections("round-robin"));
    let (_, answered) = while_one_is_busy(&gw, &pki, [&one, &two], "plain.apps.identity").await;
    assert_eq!(
        answered.iter().filter(|b| *b == "one").count(),
        2,
        "{answered:?}"
    );
    assert_eq!(
        gw.route_view("plain.apps.identity").await["load_balancing"],
        "round-robin"
    );
}

/// GoRouter's wildcard routes: `*.wild.apps.plain` serves every name below `wild.apps.plain`
/// that no nearer route serves, at any depth, and is served by its own routes' policies; an
/// exact route wins.
#[tokio::test]
async fn wildcard_routes_serve_the_names_below_them() {
    let pki = TestPki::new();
    let wild = crate::echo_on_loopback("wild").await;
    let exact = crate::echo_on_loopback("exact").await;
    let scoped = crate::echo_on_loopback("scoped").await;
    let mut y =
        "domains: [{name: \"*.apps.identity\", ca_certs: identity-ca.pem}]\nroutes:\n".to_string();
    y += &route("*.wild.apps.plain", wild.addr, "", "");
    y += &route("exact.wild.apps.plain", exact.addr, "", "");
    // In an mTLS domain: a catch-all for its names, under its policy.
    y += &route(
        "*.apps.identity",
        scoped.addr,
        "app_id: s, space_id: space-1, organization_id: org-1",
        "route_policy_scope: any, route_policy_sources: \"cf:app:app-a\"",
    );
    let gw = TestGateway::start(&pki, &y).await;
    let mut c = Conn::plain(gw.http()).await.unwrap();
    for (host, status, backend) in [
        ("tenant-1.wild.apps.plain", 200, "wild"),
        ("a.b.wild.apps.plain", 200, "wild"),
        ("Tenant-2.Wild.Apps.Plain.", 200, "wild"),
        ("exact.wild.apps.plain", 200, "exact"),
        ("wild.apps.plain", 404, ""),
        ("tenant-1.other.apps.plain", 404, ""),
    ] {
        let r = call(&mut c, host, &[]).await;
        assert_eq!(r.status, status, "{host}");
        if status == 200 {
            assert_eq!(r.echo().backend, backend, "{host}");
        }
    }
    for (caller, status) in [(&pki.a, 200), (&pki.b, 403)] {
        let mut c = Conn::tls(
            gw.https(),
            &pki.server_ca,
            Some("any.apps.identity"),
            Some(caller),
            true,
        )
        .await
        .unwrap();
        let r = call(&mut c, "any.apps.identity", &[]).await;
        assert_eq!(r.status, status);
    }
    assert_eq!(scoped.requests(), 1);
}

/// With one slow request in flight on an instance of `host`, four more requests: the instance
/// the slow one went to, and those that answered the four.
async fn while_one_is_busy(
    gw: &TestGateway,
    pki: &TestPki,
    backends: [&echo::EchoServer; 2],
    host: &'static str,
) -> (String, Vec<String>) {
    let arrived = || backends.iter().map(|b| b.requests()).sum::<u64>();
    let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.a), false)
        .await
        .unwrap();
    let before = arrived();
    let slow = tokio::spawn(async move {
        let req = c.build(host, "/slow?ms=1500", &[]);
        c.send(req).await.unwrap().echo().backend
    });
    crate::support::bounded("the slow request arrives", async {
        while arrived() == before {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.a), false)
        .await
        .unwrap();
    let mut answered = Vec::new();
    for _ in 0..4 {
        answered.push(call(&mut c, host, &[]).await.echo().backend);
    }
    (slow.await.unwrap(), answered)
}

async fn call(c: &mut Conn, host: &str, headers: &[(&str, &str)]) -> crate::support::client::Resp {
    let req = c.build(host, "/", headers);
    c.send(req).await.unwrap()
}
