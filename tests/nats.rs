//! GoRouter's registration protocol over a real nats-server (SPEC §10).

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use portcullis::echo;
use portcullis::pki::Leaf;
use portcullis::registry::nats::StartMessage;
use serde_json::json;
use support::client::{get, Conn};
use support::gateway::TestGateway;
use support::nats::{NatsServer, Relay};
use support::pki::TestPki;

/// The gateway's config with NATS at `nats_url` and these `registry` settings; healthy as soon as
/// it is connected (`start_delay: 0s`) unless they say otherwise.
fn config(nats_url: &str, registry: &str) -> String {
    let registry = match registry {
        r if r.contains("start_delay") => r.to_string(),
        "" => "start_delay: 0s".to_string(),
        r => format!("start_delay: 0s, {r}"),
    };
    format!(
        "nats: {{servers: [\"{nats_url}\"]}}\nregistry: {{{registry}}}\n\
         domains: [{{name: \"*.apps.identity\", ca_certs: identity-ca.pem}}]\n"
    )
}

async fn nats_client(url: &str) -> async_nats::Client {
    support::bounded("nats connect", async_nats::connect(url))
        .await
        .unwrap()
}

fn registration(uri: &str, backend: std::net::SocketAddr, extra: serde_json::Value) -> Vec<u8> {
    let mut msg = json!({
        "uris": [uri],
        "host": backend.ip().to_string(),
        "port": backend.port(),
        "private_instance_id": "inst",
        "tags": {"app_id": "backend", "space_id": "space-1", "organization_id": "org-1"},
    });
    if let (Some(m), Some(e)) = (msg.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            m.insert(k.clone(), v.clone());
        }
    }
    serde_json::to_vec(&msg).unwrap()
}

/// Polls until `host` answers `want` (bounded), returns the last status.
async fn wait_status(
    gw: &TestGateway,
    pki: &TestPki,
    cert: Option<&Leaf>,
    host: &str,
    want: u16,
) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = get(gw.https(), &pki.server_ca, cert, host, "/", false)
            .await
            .map(|r| r.status)
            .unwrap_or(0);
        if status == want || Instant::now() > deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a gateway on `nats_url` and returns once it has announced itself with `router.start`,
/// which it publishes after subscribing: registrations sent from then on are not lost.
async fn start_subscribed(pki: &TestPki, observer_url: &str, yaml: &str) -> TestGateway {
    let observer = nats_client(observer_url).await;
    let mut starts = observer.subscribe("router.start").await.unwrap();
    observer.flush().await.unwrap();
    let gw = TestGateway::start(pki, yaml).await;
    next_start(&mut starts).await;
    gw
}

async fn next_start(sub: &mut async_nats::Subscriber) -> StartMessage {
    let msg = support::bounded("router.start", sub.next())
        .await
        .expect("subscription open");
    serde_json::from_slice(&msg.payload).expect("start message JSON")
}

#[tokio::test]
async fn register_unregister_greet_and_start() {
    let nats = NatsServer::start();
    let observer = nats_client(&nats.url()).await;
    let mut starts = observer.subscribe("router.start").await.unwrap();
    observer.flush().await.unwrap();
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &config(&nats.url(), "droplet_stale_threshold: 90s")).await;

    let start = next_start(&mut starts).await;
    let (index, id) = start.id.split_once('-').unwrap();
    assert_eq!(index, "0");
    assert!(uuid::Uuid::try_parse(id).is_ok(), "{}", start.id);
    assert_eq!(start.hosts, vec!["127.0.0.1".to_string()]);
    assert_eq!(start.minimum_register_interval_in_seconds, 5);
    assert_eq!(start.prune_threshold_in_seconds, 90);
    let raw: serde_json::Value =
        serde_json::from_slice(&serde_json::to_vec(&start).unwrap()).unwrap();
    let mut keys: Vec<&String> = raw.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "hosts",
            "id",
            "minimumRegisterIntervalInSeconds",
            "pruneThresholdInSeconds"
        ]
    );

    let reply = support::bounded("greet", observer.request("router.greet", "".into()))
        .await
        .unwrap();
    let greeted: StartMessage = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(greeted, start);

    // One registration, several URIs; each answers.
    let msg = registration(
        "n1.apps.plain",
        backend.addr,
        json!({"uris": ["n1.apps.plain", "N2.Apps.Plain./x/"]}),
    );
    observer
        .publish("router.register", msg.clone().into())
        .await
        .unwrap();
    assert_eq!(
        wait_status(&gw, &pki, None, "n1.apps.plain", 200).await,
        200
    );
    let r = get(
        gw.https(),
        &pki.server_ca,
        None,
        "n2.apps.plain",
        "/x/y",
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        get(
            gw.https(),
            &pki.server_ca,
            None,
            "n2.apps.plain",
            "/",
            false
        )
        .await
        .unwrap()
        .status,
        404
    );
    observer
        .publish("router.unregister", msg.into())
        .await
        .unwrap();
    assert_eq!(
        wait_status(&gw, &pki, None, "n1.apps.plain", 404).await,
        404
    );
    assert_eq!(
        gw.metric("portcullis_registry_messages_total{subject=\"router.register\",result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        gw.metric(
            "portcullis_registry_messages_total{subject=\"router.unregister\",result=\"ok\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn policy_changes_and_pool_level_last_writer_wins() {
    let nats = NatsServer::start();
    let nc = nats_client(&nats.url()).await;
    let pki = TestPki::new();
    let e1 = echo::start("e1", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let e2 = echo::start("e2", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = start_subscribed(&pki, &nats.url(), &config(&nats.url(), "")).await;
    let policy = |sources: &str| json!({"options": {"route_policy_scope": "any", "route_policy_sources": sources}});

    nc.publish(
        "router.register",
        registration("p.apps.identity", e1.addr, policy("cf:app:app-b")).into(),
    )
    .await
    .unwrap();
    assert_eq!(
        wait_status(&gw, &pki, Some(&pki.b), "p.apps.identity", 200).await,
        200
    );
    let mut a = Conn::tls(
        gw.https(),
        &pki.server_ca,
        Some("p.apps.identity"),
        Some(&pki.a),
        true,
    )
    .await
    .unwrap();
    assert_eq!(a.get("p.apps.identity", "/").await.unwrap().status, 403);

    // A re-registration with new options flips the decision for the next request.
    nc.publish(
        "router.register",
        registration("p.apps.identity", e1.addr, policy("cf:app:app-a")).into(),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.get("p.apps.identity", "/").await.unwrap().status != 200 {
        assert!(Instant::now() < deadline, "policy change never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Another endpoint registering different options: the newest differing registration wins
    // for the whole pool.
    nc.publish(
        "router.register",
        registration("p.apps.identity", e2.addr, policy("cf:app:app-b")).into(),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.get("p.apps.identity", "/").await.unwrap().status != 403 {
        assert!(
            Instant::now() < deadline,
            "pool options never followed the newest registration"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..4 {
        assert_eq!(
            a.get("p.apps.identity", "/").await.unwrap().status,
            403,
            "both endpoints share the pool policy"
        );
    }
    // Refreshing e1 with the options the pool already has changes nothing.
    nc.publish(
        "router.register",
        registration("p.apps.identity", e1.addr, policy("cf:app:app-b")).into(),
    )
    .await
    .unwrap();
    nc.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.get("p.apps.identity", "/").await.unwrap().status, 403);
}

#[tokio::test]
async fn bad_messages_are_dropped_counted_and_harmless() {
    let nats = NatsServer::start();
    let nc = nats_client(&nats.url()).await;
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = start_subscribed(&pki, &nats.url(), &config(&nats.url(), "")).await;
    nc.publish(
        "router.register",
        registration("good.apps.plain", backend.addr, json!({})).into(),
    )
    .await
    .unwrap();
    assert_eq!(
        wait_status(&gw, &pki, None, "good.apps.plain", 200).await,
        200
    );

    let bad: [(&str, Vec<u8>); 7] = [
        ("invalid_json", b"{not json".to_vec()),
        ("invalid_json", vec![0xff, 0xfe, 0x00]),
        (
            "missing_host",
            br#"{"uris":["good.apps.plain"],"port":1}"#.to_vec(),
        ),
        (
            "missing_port",
            br#"{"uris":["good.apps.plain"],"host":"127.0.0.1"}"#.to_vec(),
        ),
        ("missing_uris", br#"{"host":"127.0.0.1","port":1}"#.to_vec()),
        (
            "route_service_not_https",
            registration(
                "good.apps.plain",
                backend.addr,
                json!({"route_service_url": "http://rs"}),
            ),
        ),
        (
            "invalid_json",
            br#"{"uris":"good.apps.plain","host":"127.0.0.1","port":1}"#.to_vec(),
        ),
    ];
    for (_, payload) in &bad {
        nc.publish("router.register", payload.clone().into())
            .await
            .unwrap();
        nc.publish("router.unregister", payload.clone().into())
            .await
            .unwrap();
    }
    // The subscriber is still alive and the good route untouched.
    nc.publish(
        "router.register",
        registration("after.apps.plain", backend.addr, json!({})).into(),
    )
    .await
    .unwrap();
    assert_eq!(
        wait_status(&gw, &pki, None, "after.apps.plain", 200).await,
        200
    );
    assert_eq!(
        get(
            gw.https(),
            &pki.server_ca,
            None,
            "good.apps.plain",
            "/",
            false
        )
        .await
        .unwrap()
        .status,
        200
    );
    for (label, n) in [
        ("invalid_json", 3.0),
        ("missing_host", 1.0),
        ("missing_port", 1.0),
        ("missing_uris", 1.0),
        ("route_service_not_https", 1.0),
    ] {
        for subject in ["router.register", "router.unregister"] {
            let sample = format!(
                "portcullis_registry_messages_total{{subject=\"{subject}\",result=\"{label}\"}}"
            );
            assert_eq!(gw.metric(&sample), n, "{sample}");
        }
    }
}

/// Hash-based routing as Cloud Controller registers it (`hash_balance` a string: GoRouter once
/// dropped such registrations, routing-release#585), or as a number; options the gateway cannot
/// use keep the route, balanced round-robin, and are counted.
#[tokio::test]
async fn hash_based_routes_register_whatever_their_options() {
    let nats = NatsServer::start();
    let nc = nats_client(&nats.url()).await;
    let pki = TestPki::new();
    let gw = start_subscribed(&pki, &nats.url(), &config(&nats.url(), "")).await;
    let mut backends = Vec::new();
    for (i, balance) in [json!("1.2"), json!(1.2), json!("1.2")]
        .into_iter()
        .enumerate()
    {
        let name = format!("instance-{i}");
        let b = echo::start(&name, ([127, 0, 0, 1], 0).into())
            .await
            .unwrap();
        let options =
            json!({"loadbalancing": "hash", "hash_header": "tenant-id", "hash_balance": balance});
        let msg = registration(
            "hb.apps.plain",
            b.addr,
            json!({"private_instance_id": name, "options": options}),
        );
        nc.publish("router.register", msg.into()).await.unwrap();
        backends.push(b);
    }
    let odd = [
        ("lb.apps.plain", json!({"loadbalancing": "weighted"})),
        (
            "nohdr.apps.plain",
            json!({"loadbalancing": "hash", "hash_balance": 2}),
        ),
        (
            "bal.apps.plain",
            json!({"loadbalancing": "hash", "hash_header": "t", "hash_balance": "lots"}),
        ),
    ];
    for (uri, options) in &odd {
        let msg = registration(uri, backends[0].addr, json!({"options": options}));
        nc.publish("router.register", msg.into()).await.unwrap();
    }
    for uri in [
        "hb.apps.plain",
        "lb.apps.plain",
        "nohdr.apps.plain",
        "bal.apps.plain",
    ] {
        assert_eq!(wait_status(&gw, &pki, None, uri, 200).await, 200, "{uri}");
    }
    // All three instances registered (the pool is complete before the tenants are spread).
    support::bounded("three instances", async {
        while gw.route_view("hb.apps.plain").await["endpoints"]
            .as_array()
            .map_or(0, Vec::len)
            < 3
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut c = Conn::tls(
        gw.https(),
        &pki.server_ca,
        Some("hb.apps.plain"),
        None,
        false,
    )
    .await
    .unwrap();
    let mut owners = std::collections::BTreeMap::new();
    for t in 0..24 {
        let tenant = format!("tenant-{t}");
        for _ in 0..3 {
            let req = c.build("hb.apps.plain", "/", &[("tenant-id", &tenant)]);
            let r = c.send(req).await.unwrap();
            let prev = owners.insert(tenant.clone(), r.echo().backend);
            assert!(prev.is_none_or(|p| p == owners[&tenant]), "{tenant} moved");
        }
    }
    let distinct: std::collections::BTreeSet<&String> = owners.values().collect();
    assert_eq!(
        distinct.len(),
        3,
        "24 tenants spread over the three: {owners:?}"
    );
    for (option, n) in [
        ("loadbalancing", 1.0),
        ("hash_header", 1.0),
        ("hash_balance", 1.0),
    ] {
        let sample = format!("portcullis_registry_option_problems_total{{option=\"{option}\"}}");
        assert_eq!(gw.metric(&sample), n, "{sample}");
    }
    let ok = "portcullis_registry_messages_total{subject=\"router.register\",result=\"ok\"}";
    assert_eq!(gw.metric(ok), 6.0);
    // What the gateway made of each: `/routes` says.
    for (uri, lb) in [
        ("hb.apps.plain", "hash"),
        ("lb.apps.plain", "round-robin"),
        ("nohdr.apps.plain", "round-robin"),
        ("bal.apps.plain", "hash"),
    ] {
        let view = gw.route_view(uri).await;
        assert_eq!(view["load_balancing"], lb, "{view}");
    }
    assert_eq!(gw.route_view("bal.apps.plain").await["hash_balance"], 0.0);
    assert_eq!(gw.route_view("hb.apps.plain").await["hash_balance"], 1.2);
}

/// GoRouter's `start_response_delay_interval` (`registry.start_delay`): a gateway that has just
/// connected serves what it has, but `/health` (what a load balancer asks) says it can serve
/// only once route emitters had the delay to answer `router.start` with their routes; the delay
/// is paid once, not again when NATS comes back.
#[tokio::test]
async fn health_waits_start_delay_after_the_first_connection_only() {
    let mut nats = NatsServer::start();
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let emitter = nats_client(&nats.url()).await;
    let mut starts = emitter.subscribe("router.start").await.unwrap();
    emitter.flush().await.unwrap();
    let gw = TestGateway::start(&pki, &config(&nats.url(), "start_delay: 2s")).await;
    let (status, body) = health(&gw).await;
    assert_eq!(
        (status, body.as_str()),
        (503, "registry: not connected to NATS yet\n")
    );
    next_start(&mut starts).await;
    let connected = Instant::now();
    // As route emitters do: every route at once, in answer to router.start.
    emitter
        .publish(
            "router.register",
            registration("early.apps.plain", backend.addr, json!({})).into(),
        )
        .await
        .unwrap();
    assert_eq!(
        wait_status(&gw, &pki, None, "early.apps.plain", 200).await,
        200
    );
    let (status, body) = health(&gw).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("registry: loading routes (registry.start_delay), ")
            && body.ends_with(" s to go\n"),
        "{body}"
    );
    let healthy = loop {
        if health(&gw).await.0 == 200 {
            break connected.elapsed();
        }
        assert!(
            connected.elapsed() < Duration::from_secs(6),
            "never healthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        healthy >= Duration::from_millis(1900),
        "healthy after {healthy:?}"
    );

    nats.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = health(&gw).await;
        if status == 503 {
            assert_eq!(body, "registry: disconnected from NATS\n");
            break;
        }
        assert!(Instant::now() < deadline, "still healthy without NATS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The routes are kept (pruning waits for NATS) and served.
    assert_eq!(
        wait_status(&gw, &pki, None, "early.apps.plain", 200).await,
        200
    );
    nats.restart();
    // Reconnected (read off the gauge the same event sets: the gateway may publish router.start
    // before a new subscriber could see it), healthy at once, where a delay paid again would
    // answer 503 "loading routes" for 2 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw.metric("portcullis_registry_connected") != 1.0 {
        assert!(Instant::now() < deadline, "gateway never reconnected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(health(&gw).await, (200, "ok\n".to_string()));
}

/// `registry.healthy_while_disconnected`: with it, a gateway cut off from NATS stays in its
/// balancer (`/health` 200) and keeps serving its table, so a NATS outage across the fleet does
/// not take every gateway out at once; a reload without it brings the 503 back. Before the first
/// connection the table is empty, and `/health` says so either way.
#[tokio::test]
async fn health_can_stay_up_while_nats_is_down() {
    let mut nats = NatsServer::start();
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let emitter = nats_client(&nats.url()).await;
    let with = config(&nats.url(), "healthy_while_disconnected: true");
    let gw = TestGateway::start(&pki, &with).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metric("portcullis_registry_connected") != 1.0 {
        assert_eq!(
            health(&gw).await.0,
            503,
            "healthy before the first connection"
        );
        assert!(Instant::now() < deadline, "gateway never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    emitter
        .publish(
            "router.register",
            registration("kept.apps.plain", backend.addr, json!({})).into(),
        )
        .await
        .unwrap();
    assert_eq!(
        wait_status(&gw, &pki, None, "kept.apps.plain", 200).await,
        200
    );
    nats.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metric("portcullis_registry_connected") != 0.0 {
        assert!(Instant::now() < deadline, "never saw NATS go");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(health(&gw).await, (200, "ok\n".to_string()));
    assert_eq!(
        wait_status(&gw, &pki, None, "kept.apps.plain", 200).await,
        200
    );
    gw.reload(&config(&nats.url(), ""));
    assert_eq!(
        health(&gw).await,
        (503, "registry: disconnected from NATS\n".to_string())
    );
}

#[tokio::test]
async fn pruning_is_suspended_while_nats_is_down() {
    let mut nats = NatsServer::start();
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let mut y = config(&nats.url(), "prune_interval: 200ms");
    y += &format!(
        "routes: [{{uris: [static.apps.plain], host: \"{}\", port: {}}}]\n",
        backend.addr.ip(),
        backend.addr.port()
    );
    let gw = start_subscribed(&pki, &nats.url(), &y).await;
    assert_eq!(gw.metric("portcullis_registry_connected"), 1.0);
    let nc = nats_client(&nats.url()).await;
    let stale_soon = json!({"stale_threshold_in_seconds": 1});
    nc.publish(
        "router.register",
        registration("fresh.apps.plain", backend.addr, stale_soon.clone()).into(),
    )
    .await
    .unwrap();
    nc.publish(
        "router.register",
        registration("stale.apps.plain", backend.addr, stale_soon).into(),
    )
    .await
    .unwrap();
    assert_eq!(
        wait_status(&gw, &pki, None, "stale.apps.plain", 200).await,
        200
    );
    // Unrefreshed for longer than its threshold: pruned.
    assert_eq!(
        wait_status(&gw, &pki, None, "stale.apps.plain", 404).await,
        404
    );

    nc.publish(
        "router.register",
        registration(
            "stale.apps.plain",
            backend.addr,
            json!({"stale_threshold_in_seconds": 1}),
        )
        .into(),
    )
    .await
    .unwrap();
    assert_eq!(
        wait_status(&gw, &pki, None, "stale.apps.plain", 200).await,
        200
    );
    nats.stop();
    drop(nc);
    // Well past the threshold while NATS is down: nothing is pruned.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        get(
            gw.https(),
            &pki.server_ca,
            None,
            "stale.apps.plain",
            "/",
            false
        )
        .await
        .unwrap()
        .status,
        200
    );
    let admin = gw.gw.admin_addr().unwrap();
    let mut c = Conn::plain(admin).await.unwrap();
    assert_eq!(c.get("admin", "/health").await.unwrap().status, 503);
    assert_eq!(gw.metric("portcullis_registry_connected"), 0.0);

    nats.restart();
    let nc = nats_client(&nats.url()).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Conn::plain(admin)
        .await
        .unwrap()
        .get("admin", "/health")
        .await
        .unwrap()
        .status
        != 200
    {
        assert!(Instant::now() < deadline, "gateway never reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(gw.metric("portcullis_registry_connected"), 1.0);
    // Connected again and still unrefreshed: pruned now. A refreshed one stays (re-sent until
    // the restored subscription sees it, as route emitters do); static routes stay.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let refresh = registration(
            "fresh.apps.plain",
            backend.addr,
            json!({"stale_threshold_in_seconds": 30}),
        );
        nc.publish("router.register", refresh.into()).await.unwrap();
        if get(
            gw.https(),
            &pki.server_ca,
            None,
            "fresh.apps.plain",
            "/",
            false,
        )
        .await
        .unwrap()
        .status
            == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "refresh never applied after reconnect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        wait_status(&gw, &pki, None, "stale.apps.plain", 404).await,
        404
    );
    assert_eq!(
        get(
            gw.https(),
            &pki.server_ca,
            None,
            "static.apps.plain",
            "/",
            false
        )
        .await
        .unwrap()
        .status,
        200
    );
}

#[tokio::test]
async fn reconnect_republishes_router_start() {
    let nats = NatsServer::start();
    let relay = Relay::start(nats.port).await;
    let observer = nats_client(&nats.url()).await;
    let mut starts = observer.subscribe("router.start").await.unwrap();
    observer.flush().await.unwrap();
    let pki = TestPki::new();
    let gw = TestGateway::start(&pki, &config(&relay.url(), "")).await;
    let first = next_start(&mut starts).await;
    // The gateway loses its NATS connection (the observer does not) and gets it back.
    relay.cut();
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.restore();
    let again = next_start(&mut starts).await;
    assert_eq!(again, first, "same router id and settings after reconnect");
    drop(gw);
}

/// SPEC §10 churn: 1,000 registrations and 1,000 unregistrations per second on other routes for 30 s
/// cause zero failed requests on stable routes under steady load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_on_other_routes_never_fails_stable_ones() {
    let nats = NatsServer::start();
    let nc = nats_client(&nats.url()).await;
    let pki = Arc::new(TestPki::new());
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = Arc::new(start_subscribed(&pki, &nats.url(), &config(&nats.url(), "")).await);
    for i in 0..4 {
        let msg = registration(
            &format!("stable-{i}.apps.identity"),
            backend.addr,
            json!({"options": {"route_policy_scope": "any", "route_policy_sources": "cf:app:app-a"}}),
        );
        nc.publish("router.register", msg.into()).await.unwrap();
    }
    for i in 0..4 {
        assert_eq!(
            wait_status(
                &gw,
                &pki,
                Some(&pki.a),
                &format!("stable-{i}.apps.identity"),
                200
            )
            .await,
            200
        );
    }
    let run_for = Duration::from_secs(30);
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for i in 0..4 {
        let (gw, pki, ok, failed) = (gw.clone(), pki.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let host = format!("stable-{i}.apps.identity");
            let mut conn = Conn::tls(
                gw.https(),
                &pki.server_ca,
                Some(&host),
                Some(&pki.a),
                i % 2 == 1,
            )
            .await
            .unwrap();
            let end = Instant::now() + run_for;
            while Instant::now() < end {
                match conn.get(&host, "/").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let churn_backend = backend.addr;
    let churn = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let end = Instant::now() + run_for;
        let mut n = 0u64;
        while Instant::now() < end {
            tick.tick().await;
            for _ in 0..10 {
                let uri = format!("churn-{}.apps.identity", n % 1000);
                let msg = registration(
                    &uri,
                    churn_backend,
                    json!({"options": {"route_policy_scope": "any", "route_policy_sources": "cf:any"}}),
                );
                nc.publish("router.register", msg.clone().into())
                    .await
                    .unwrap();
                let old = format!("churn-{}.apps.identity", (n + 500) % 1000);
                nc.publish(
                    "router.unregister",
                    registration(&old, churn_backend, json!({})).into(),
                )
                .await
                .unwrap();
                n += 1;
            }
        }
        nc.flush().await.unwrap();
        n
    });
    for l in load {
        l.await.unwrap();
    }
    let published = churn.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("churn: {published} register+unregister pairs in {run_for:?}; stable requests ok={ok} failed={failed}");
    assert_eq!(failed, 0);
    assert!(ok > 1000, "steady load too small to mean anything: {ok}");
    assert!(
        published as f64 >= 0.8 * 1000.0 * run_for.as_secs_f64(),
        "churn rate too low: {published}"
    );
    // The last messages may still be on their way from nats-server after the flush: every one
    // must be applied, within a bounded wait.
    let applied_now = || {
        gw.metric("portcullis_registry_messages_total{subject=\"router.register\",result=\"ok\"}")
    };
    let mut applied = applied_now();
    for _ in 0..50 {
        if applied >= published as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        applied = applied_now();
    }
    assert!(
        applied >= published as f64,
        "registrations applied: {applied} of {published}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_against_a_running_gateway_sees_nats_routes() {
    let nats = NatsServer::start();
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = start_subscribed(&pki, &nats.url(), &config(&nats.url(), "")).await;
    let nc = nats_client(&nats.url()).await;
    let opts =
        json!({"options": {"route_policy_scope": "space", "route_policy_sources": "cf:app:app-a"}});
    nc.publish(
        "router.register",
        registration("dyn.apps.identity", backend.addr, opts).into(),
    )
    .await
    .unwrap();
    assert_eq!(
        wait_status(&gw, &pki, Some(&pki.a), "dyn.apps.identity", 200).await,
        200
    );

    let admin = format!("http://{}", gw.gw.admin_addr().unwrap());
    let caller = gw.dir.path().join("caller-b.pem");
    std::fs::write(&caller, &pki.b.chain_pem).unwrap();
    let bin = env!("CARGO_BIN_EXE_portcullis");
    let out = tokio::process::Command::new(bin)
        .args(["explain", "--admin", &admin, "--host", "DYN.apps.identity"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("route:     dyn.apps.identity"), "{text}");
    assert!(text.contains("policy:    scope=space"), "{text}");
    assert!(text.contains("sources:   cf:app:app-a"), "{text}");
    assert!(
        text.contains(&format!(
            "{} app=backend space=space-1 org=org-1",
            backend.addr
        )),
        "{text}"
    );

    let out = tokio::process::Command::new(bin)
        .args([
            "explain",
            "--admin",
            &admin,
            "--host",
            "dyn.apps.identity",
            "--caller-cert",
        ])
        .arg(&caller)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("caller:    app=app-b space=space-2 org=org-2"),
        "{text}"
    );
    assert!(
        text.contains("decision:  deny (domain:scope=space:post-selection)"),
        "{text}"
    );

    let out = tokio::process::Command::new(bin)
        .args(["explain", "--admin", &admin, "--host", "nope.apps.identity"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no route for host 'nope.apps.identity'"));
}

/// A route bound to a route service (GoRouter's `route_service_url`) is never sent to its app
/// past that service: portcullis does not call route services, so such a route answers 502
/// `route_service_unsupported` as GoRouter does with them disabled, after its policy (a caller
/// it refuses still gets 403), and says so on `/routes` and in `explain`. A registration
/// without the URL unbinds the route, as in GoRouter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_bound_to_a_route_service_is_refused_never_sent_past_it() {
    let nats = NatsServer::start();
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = start_subscribed(&pki, &nats.url(), &config(&nats.url(), "")).await;
    let nc = nats_client(&nats.url()).await;
    let url = "https://auth-proxy.apps.example.com/check";
    let policy = json!({"route_policy_scope": "any", "route_policy_sources": "cf:app:app-a"});
    nc.publish(
        "router.register",
        registration(
            "rs.apps.identity",
            backend.addr,
            json!({"route_service_url": url, "options": policy}),
        )
        .into(),
    )
    .await
    .unwrap();
    nc.publish(
        "router.register",
        registration(
            "rs.apps.plain",
            backend.addr,
            json!({"route_service_url": url}),
        )
        .into(),
    )
    .await
    .unwrap();
    assert_eq!(
        wait_status(&gw, &pki, Some(&pki.a), "rs.apps.identity", 502).await,
        502
    );
    assert_eq!(
        wait_status(&gw, &pki, None, "rs.apps.plain", 502).await,
        502
    );

    for h2 in [false, true] {
        for (host, cert) in [("rs.apps.identity", Some(&pki.a)), ("rs.apps.plain", None)] {
            let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), cert, h2)
                .await
                .unwrap();
            for _ in 0..2 {
                let r = c.get(host, "/").await.unwrap();
                assert_eq!(r.status, 502, "{host} h2={h2}");
                assert_eq!(r.body, "Support for route services is disabled.");
                assert_eq!(
                    r.header("x-cf-routererror"),
                    Some("route_service_unsupported")
                );
            }
        }
        // The policy decides first: a caller it refuses learns nothing of the route service.
        let mut b = Conn::tls(
            gw.https(),
            &pki.server_ca,
            Some("rs.apps.identity"),
            Some(&pki.b),
            h2,
        )
        .await
        .unwrap();
        let r = b.get("rs.apps.identity", "/").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (403, "Forbidden"));
        assert_eq!(r.header("x-cf-routererror"), None);
    }
    assert_eq!(backend.requests(), 0, "nothing reached the app");

    // Each refusal is one access-log line naming the policy's rule and no backend. The lines
    // are written in order, so once both 403s (the last requests) are there, all are.
    let forbidden = |lines: &[String]| lines.iter().filter(|l| l.contains("\" 403 ")).count();
    let lines = gw
        .log_lines_until("both 403 lines", |lines| forbidden(lines) >= 2)
        .await;
    let refused: Vec<_> = lines
        .iter()
        .map(|l| support::gateway::LogLine::parse(l))
        .filter(|l| l.status == 502)
        .collect();
    assert!(refused.len() >= 10, "{lines:#?}");
    for l in &refused {
        assert_eq!(l.field("x_cf_routererror"), "route_service_unsupported");
        assert_eq!(l.backend, "-");
        let rule = if l.host == "rs.apps.identity" {
            "route:cf:app:app-a"
        } else {
            "-"
        };
        assert_eq!(l.field("route_policy"), rule, "{l:?}");
    }

    // `/routes` and `explain` say why.
    let admin = gw.gw.admin_addr().unwrap();
    let bound = gw.route_view("rs.apps.identity").await;
    assert_eq!(bound["route_service_url"], url, "{bound:#}");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["explain", "--admin", &format!("http://{admin}")])
        .args(["--host", "rs.apps.identity"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "route service: {url}: not supported in an mTLS domain, so every request the policy allows is answered 502 (route_service_unsupported)"
        )),
        "{text}"
    );

    // The newest registration without the URL unbinds the route; the other stays bound.
    nc.publish(
        "router.register",
        registration("rs.apps.identity", backend.addr, json!({"options": policy})).into(),
    )
    .await
    .unwrap();
    assert_eq!(
        wait_status(&gw, &pki, Some(&pki.a), "rs.apps.identity", 200).await,
        200
    );
    assert_eq!(
        get(gw.https(), &pki.server_ca, None, "rs.apps.plain", "/", true)
            .await
            .unwrap()
            .status,
        502
    );
    let unbound = gw.route_view("rs.apps.identity").await;
    assert!(unbound.is_object(), "{unbound:#}");
    assert!(unbound.get("route_service_url").is_none(), "{unbound:#}");
}

/// GoRouter's routing-table sharding: a gateway serving isolation segment `seg-a` (and, with
/// `shared-and-segments`, the shared segment) never takes another segment's registrations into
/// its table, so it cannot route to those apps; they are counted as `not_in_shard`. A change
/// of the shard on reload is refused (restart to apply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_serves_only_its_isolation_segments() {
    let nats = NatsServer::start();
    let nc = nats_client(&nats.url()).await;
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let shard = |mode: &str| {
        config(
            &nats.url(),
            &format!("routing_table_sharding_mode: {mode}, isolation_segments: [seg-a]"),
        )
    };
    let shared_too = start_subscribed(&pki, &nats.url(), &shard("shared-and-segments")).await;
    let only = start_subscribed(&pki, &nats.url(), &shard("segments")).await;
    let segment = |s: &str| json!({"isolation_segment": s});
    // Another segment's registration first: once the later ones answer, it was seen too.
    for (host, seg) in [
        ("b.apps.plain", segment("seg-b")),
        ("a.apps.plain", segment("seg-a")),
        ("shared.apps.plain", json!({})),
        ("empty.apps.plain", segment("")),
    ] {
        nc.publish(
            "router.register",
            registration(host, backend.addr, seg).into(),
        )
        .await
        .unwrap();
    }
    let not_in_shard =
        "portcullis_registry_messages_total{subject=\"router.register\",result=\"not_in_shard\"}";
    assert_eq!(
        wait_status(&shared_too, &pki, None, "empty.apps.plain", 200).await,
        200
    );
    assert_eq!(
        wait_status(&only, &pki, None, "a.apps.plain", 200).await,
        200
    );
    only.wait_metric(not_in_shard, 3.0).await;
    let status = async |gw: &TestGateway, host: &str| {
        get(gw.https(), &pki.server_ca, None, host, "/", false)
            .await
            .unwrap()
            .status
    };
    for (host, want_shared_too, want_only) in [
        ("a.apps.plain", 200, 200),
        ("shared.apps.plain", 200, 404),
        ("empty.apps.plain", 200, 404),
        ("b.apps.plain", 404, 404),
    ] {
        assert_eq!(status(&shared_too, host).await, want_shared_too, "{host}");
        assert_eq!(status(&only, host).await, want_only, "{host}");
    }
    shared_too.wait_metric(not_in_shard, 1.0).await;

    // Unregistrations are sharded the same way.
    nc.publish(
        "router.unregister",
        registration("a.apps.plain", backend.addr, segment("seg-a")).into(),
    )
    .await
    .unwrap();
    assert_eq!(
        wait_status(&only, &pki, None, "a.apps.plain", 404).await,
        404
    );

    // The shard is fixed until a restart.
    let path = shared_too.config_path();
    std::fs::write(&path, support::gateway::base(&shard("segments"))).unwrap();
    let e = portcullis::config::Config::load(&path)
        .map(|c| shared_too.gw.reload(c))
        .expect("valid config");
    assert!(
        e.as_ref().is_err_and(|e| e.to_string().contains(
            "registry.routing_table_sharding_mode and registry.isolation_segments cannot change on reload"
        )),
        "{:?}",
        e.err()
    );
}

/// The files of a NATS deployment with TLS, as Cloud Foundry's `nats-tls` has it: the servers'
/// CA and certificate, the CA client certificates must chain to, a client certificate from it
/// for the gateway (`gw.pem`) and one for the route emitter (`emitter.pem`), and one from
/// another CA (`stranger.pem`).
struct NatsPki {
    dir: tempfile::TempDir,
}

impl NatsPki {
    fn new() -> NatsPki {
        use portcullis::pki::{Attr, Ca, Validity};
        let dir = tempfile::tempdir().unwrap();
        let server_ca = Ca::root("nats server CA").unwrap();
        let client_ca = Ca::root("nats client CA").unwrap();
        let stranger_ca = Ca::root("another CA").unwrap();
        let server = server_ca.server(&["127.0.0.1", "localhost"]).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("server-ca.pem", &server_ca.cert_pem);
        write("client-ca.pem", &client_ca.cert_pem);
        write("server.pem", &server.chain_pem);
        write("server.key", &server.key_pem);
        for (name, ca) in [
            ("gw", &client_ca),
            ("emitter", &client_ca),
            ("stranger", &stranger_ca),
        ] {
            let leaf = ca.client(&[&[Attr::Cn(name)]], Validity::Current).unwrap();
            write(&format!("{name}.pem"), &leaf.chain_pem);
            write(&format!("{name}.key"), &leaf.key_pem);
        }
        NatsPki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    fn server(&self) -> NatsServer {
        NatsServer::start_tls(
            self.dir.path().join("server.pem").as_path(),
            self.dir.path().join("server.key").as_path(),
            self.dir.path().join("client-ca.pem").as_path(),
        )
    }

    /// The route emitter's connection.
    async fn emitter(&self, url: &str) -> async_nats::Client {
        support::bounded(
            "nats connect over TLS",
            async_nats::ConnectOptions::new()
                .require_tls(true)
                .add_root_certificates(self.path("server-ca.pem").into())
                .add_client_certificate(
                    self.path("emitter.pem").into(),
                    self.path("emitter.key").into(),
                )
                .connect(url),
        )
        .await
        .unwrap()
    }

    /// The gateway's `nats` section: TLS with client certificate `client` (`None`: without).
    fn yaml(&self, url: &str, client: Option<&str>) -> String {
        let cert = client.map_or(String::new(), |c| {
            format!(
                ", cert_chain: \"{}\", private_key: \"{}\"",
                self.path(&format!("{c}.pem")),
                self.path(&format!("{c}.key"))
            )
        });
        format!(
            "nats: {{servers: [\"{url}\"], tls: {{ca_certs: \"{}\"{cert}}}}}\n\
             registry: {{start_delay: 0s}}\n\
             domains: [{{name: \"*.apps.identity\", ca_certs: identity-ca.pem}}]\n",
            self.path("server-ca.pem")
        )
    }
}

/// What this test binary's gateways log at warn and above from the registry, as text.
fn registry_warnings() -> String {
    static LOG: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    struct Into(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Into {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let log = LOG.get_or_init(|| {
        let log: Arc<std::sync::Mutex<Vec<u8>>> = Arc::default();
        let to = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("portcullis::registry=warn")
            .with_ansi(false)
            .with_writer(move || Into(to.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        log
    });
    String::from_utf8_lossy(&log.lock().unwrap()).into_owned()
}

/// Registers `uri` on a fresh backend through `emitter`; the gateway must route it (200).
async fn routes_through(emitter: &async_nats::Client, gw: &TestGateway, pki: &TestPki, uri: &str) {
    let backend = echo::start(uri, ([127, 0, 0, 1], 0).into()).await.unwrap();
    emitter
        .publish(
            "router.register",
            registration(uri, backend.addr, json!({})).into(),
        )
        .await
        .unwrap();
    assert_eq!(wait_status(gw, pki, Some(&pki.a), uri, 200).await, 200);
}

async fn health(gw: &TestGateway) -> (u16, String) {
    let mut c = Conn::plain(gw.gw.admin_addr().unwrap()).await.unwrap();
    let r = c.get("admin", "/health").await.unwrap();
    (r.status, r.body)
}

/// `nats.tls`: a NATS that requires TLS and a client certificate (Cloud Foundry's `nats-tls`) is
/// reached with the configured CA and client certificate, from a plain `nats://` URL as GoRouter
/// writes them; the registry then works as over plain NATS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_arrive_over_nats_with_tls_and_a_client_certificate() {
    let pki = TestPki::new();
    let npki = NatsPki::new();
    let nats = npki.server();
    let url = nats.url();
    let emitter = npki.emitter(&url).await;
    let mut starts = emitter.subscribe("router.start").await.unwrap();
    emitter.flush().await.unwrap();
    let gw = TestGateway::start(&pki, &npki.yaml(&url, Some("gw"))).await;
    next_start(&mut starts).await;
    assert_eq!(health(&gw).await, (200, "ok\n".to_string()));
    routes_through(&emitter, &gw, &pki, "n.apps.identity").await;
}

/// Without a client certificate the server refuses the gateway, which stays unhealthy (503) and
/// routes nothing; a reload that adds the certificate (the files an operator rotates) is used
/// from the next reconnection, without a restart, and the routes arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_client_certificate_added_on_reload_is_used_from_the_next_connection() {
    let pki = TestPki::new();
    let npki = NatsPki::new();
    let nats = npki.server();
    let url = nats.url();
    registry_warnings();
    let gw = TestGateway::start(&pki, &npki.yaml(&url, None)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, body) = health(&gw).await;
    assert_eq!(
        (status, body.as_str()),
        (503, "registry: not connected to NATS yet\n")
    );
    // And says why, naming the server.
    let said = registry_warnings();
    let ours = said
        .lines()
        .find(|l| l.contains("cannot connect to NATS") && l.contains(&url))
        .unwrap_or_else(|| panic!("no warning naming {url} in:\n{said}"));
    assert!(ours.contains("alert"), "not the TLS failure: {ours}");
    // A certificate from a CA the server does not trust is refused too.
    gw.reload(&npki.yaml(&url, Some("stranger")));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(health(&gw).await.0, 503);

    let emitter = npki.emitter(&url).await;
    let mut starts = emitter.subscribe("router.start").await.unwrap();
    emitter.flush().await.unwrap();
    gw.reload(&npki.yaml(&url, Some("gw")));
    next_start(&mut starts).await;
    assert_eq!(health(&gw).await, (200, "ok\n".to_string()));
    routes_through(&emitter, &gw, &pki, "n.apps.identity").await;
}

/// Cloud Foundry's NATS takes a user and password (GoRouter's `nats.user`, `nats.pass`); they
/// are written into the server URLs (`nats://user:password@host:port`, percent-encoded) and the
/// gateway logs in with them. With a wrong password it stays unhealthy and says the server
/// refused it, without writing the password into the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_and_password_in_the_server_url_log_in() {
    let pki = TestPki::new();
    let nats = NatsServer::start_with(&["--user", "router", "--pass", "s3cr%t"]);
    let url = |pass: &str| format!("nats://router:{pass}@127.0.0.1:{}", nats.port);
    // async-nats itself does not read credentials from a URL.
    let emitter = support::bounded(
        "nats connect",
        async_nats::ConnectOptions::with_user_and_password("router".into(), "s3cr%t".into())
            .connect(nats.url()),
    )
    .await
    .unwrap();
    let mut starts = emitter.subscribe("router.start").await.unwrap();
    emitter.flush().await.unwrap();
    registry_warnings();
    let gw = TestGateway::start(&pki, &config(&url("s3cr%25t"), "")).await;
    next_start(&mut starts).await;
    assert_eq!(health(&gw).await, (200, "ok\n".to_string()));
    routes_through(&emitter, &gw, &pki, "u.apps.identity").await;

    let wrong = TestGateway::start(&pki, &config(&url("nope"), "")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(health(&wrong).await.0, 503);
    let said = registry_warnings();
    let port = format!("127.0.0.1:{}", nats.port);
    assert!(
        said.lines().any(|l| l.contains("cannot connect to NATS")
            && l.contains(&port)
            && !l.contains("nope")),
        "no warning naming {port} (without the password) in:\n{said}"
    );
}
