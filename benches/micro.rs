//! Micro-benchmarks of the pure functions on every request's path. Macro benchmarks against the
//! rivals (BENCH.md) belong next to these once `cargo xtask bench` drives them.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use portcullis::accesslog::AccessRecord;
use portcullis::authz::{check_scope, decide_sources, RoutePolicy, Rule, Scope};
use portcullis::config::AccessLog;
use portcullis::identity::PeerCert;
use portcullis::pki::{Attr, Ca, Validity};
use portcullis::proxy::ConnCtx;
use portcullis::registry::{Registration, ValidRegistration};
use portcullis::routing::{Endpoint, Maglev, RegistryState};
use portcullis::tls::{Alpn, ConnTls};

fn table(n: usize) -> portcullis::routing::RouteTable {
    let mut s = RegistryState::default();
    let now = Instant::now();
    for i in 0..n {
        let r = ValidRegistration::try_from(Registration {
            uris: vec![format!("app-{i}.apps.identity")],
            host: Some(format!(
                "10.{}.{}.{}",
                (i >> 16) & 255,
                (i >> 8) & 255,
                i & 255
            )),
            port: Some(8080),
            tags: [("space_id".to_string(), "s".to_string())].into(),
            options: [("route_policy_scope".to_string(), "any".to_string())].into(),
            ..Default::default()
        })
        .expect("valid");
        s.register(&r, false, Duration::from_secs(120), now);
    }
    s.snapshot()
}

fn routing(c: &mut Criterion) {
    for n in [10, 100_000] {
        let t = table(n);
        let host = format!("app-{}.apps.identity", n / 2);
        c.bench_function(&format!("route lookup, {n} routes"), |b| {
            b.iter(|| black_box(t.lookup(black_box(&host), "/v1/things")).is_some())
        });
    }
}

/// Choosing one of a route's 30 instances: round-robin, and by a header's hash (GoRouter's
/// `loadbalancing: hash`, with `hash_balance` so the average load is read too); building the
/// hash table, which happens when the route's instances change.
fn selection(c: &mut Criterion) {
    let pool_of = |options: &[(&str, &str)]| {
        let mut s = RegistryState::default();
        for i in 0..30u16 {
            let r = ValidRegistration::try_from(Registration {
                uris: vec!["app.apps.identity".into()],
                host: Some("10.0.0.1".into()),
                port: Some(8000 + i),
                private_instance_id: Some(format!("a1b2c3d4-0000-4000-8000-{i:012}")),
                options: options
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            })
            .expect("valid");
            s.register(&r, false, Duration::from_secs(120), Instant::now());
        }
        s.snapshot()
    };
    let rr = pool_of(&[]);
    let hashed = pool_of(&[
        ("loadbalancing", "hash"),
        ("hash_header", "tenant-id"),
        ("hash_balance", "1.25"),
    ]);
    let mut headers = http::HeaderMap::new();
    headers.insert("tenant-id", http::HeaderValue::from_static("tenant-4711"));
    let pool = rr.lookup("app.apps.identity", "/").expect("route");
    c.bench_function("endpoint selection, round-robin, 30 instances", |b| {
        b.iter(|| black_box(pool.selector().hashing(&headers).next(|_| true)).is_some())
    });
    let pool = hashed.lookup("app.apps.identity", "/").expect("route");
    c.bench_function("endpoint selection, hash, 30 instances", |b| {
        b.iter(|| black_box(pool.selector().hashing(&headers).next(|_| true)).is_some())
    });
    let names: Vec<String> = pool
        .endpoints
        .iter()
        .map(|e| e.private_instance_id.clone())
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    c.bench_function("hash table build, 30 instances", |b| {
        b.iter(|| black_box(Maglev::new(black_box(&names))).is_some())
    });
}

/// The DER of a Diego-shaped instance-identity leaf for app `a` in space `s`, org `o`.
fn caller_leaf() -> Vec<u8> {
    let ca = Ca::root("bench").expect("ca");
    ca.client(
        &[
            &[Attr::Cn("i")],
            &[
                Attr::Ou("organization:o"),
                Attr::Ou("space:s"),
                Attr::Ou("app:a"),
            ],
        ],
        Validity::Current,
    )
    .expect("leaf")
    .der
    .to_vec()
}

fn identity_and_authz(c: &mut Criterion) {
    let der = caller_leaf();
    c.bench_function("identity extraction", |b| {
        b.iter(|| PeerCert::from_der(black_box(&der)))
    });
    let peer = PeerCert::from_der(&der);
    let id = peer.identity.clone().expect("identity");
    let policy = RoutePolicy::from_options(Some("space"), Some("cf:app:x,cf:app:y,cf:space:s"));
    let t = table(1);
    let ep = t
        .lookup("app-0.apps.identity", "/")
        .expect("route")
        .endpoints[0]
        .clone();
    c.bench_function("authorization decision", |b| {
        b.iter(|| {
            check_scope(&Scope::Space, black_box(&id), ep.as_ref()).is_ok()
                && decide_sources(black_box(&policy), &id).is_ok()
        })
    });
    c.bench_function("xfcc envoy encoding", |b| {
        b.iter(|| {
            portcullis::proxy::xfcc_value(black_box(&peer), portcullis::config::XfccFormat::Envoy)
        })
    });
}

fn access_log(c: &mut Criterion) {
    let r = AccessRecord {
        host: "app.apps.identity".into(),
        start: SystemTime::now(),
        method: http::Method::GET,
        uri: "/v1/things?x=1".into(),
        proto: "HTTP/1.1",
        status: 200,
        request_bytes: 0,
        response_bytes: 1024,
        referer: String::new(),
        user_agent: "oha/1.0".into(),
        endpoint: Some(Arc::new(Endpoint {
            app: "backend".into(),
            private_instance_index: "0".into(),
            private_instance_id: "inst".into(),
            ..Endpoint::plain("10.0.1.2", 8080)
        })),
        x_forwarded_for: "10.0.0.1".into(),
        x_forwarded_proto: "https",
        vcap_request_id: "6ba7b810-9dad-11d1-80b4-00c04fd430c8".into(),
        response_time: Duration::from_micros(900),
        backend_time: Some(Duration::from_micros(700)),
        conn: Arc::new(ConnCtx::new(
            SocketAddr::from(([10, 0, 0, 1], 50000)),
            Some(ConnTls {
                sni: Some("app.apps.identity".into()),
                mtls: None,
                peer: Some(Arc::new(PeerCert::from_der(&caller_leaf()))),
                alpn: Alpn::Http1,
            }),
        )),
        route_policy: Some(Rule::Allowed("route:cf:app:a".into())),
        failed_attempts: 0,
        attempts: Default::default(),
        route_service: "",
        resent: "",
        router_error: "",
        headers: Vec::new(),
    };
    // SPEC §9's default extra fields.
    let format = AccessLog::default();
    c.bench_function("access-log rendering", |b| {
        b.iter(|| black_box(&r).render(&format))
    });
    // With GoRouter's privacy settings and two logged request headers.
    let private = AccessLog {
        headers: ["X-Tenant-Id", "X-B3-TraceId"]
            .map(|n| portcullis::config::LoggedHeader {
                name: http::HeaderName::from_static(n.to_ascii_lowercase().leak()),
                field: n.to_ascii_lowercase().replace('-', "_"),
            })
            .to_vec(),
        redact_query: portcullis::config::QueryRedaction::Hash,
        redact_source_ip: true,
        redact_forwarded_for: true,
        ..AccessLog::default()
    };
    let mut h = http::HeaderMap::new();
    h.insert("x-tenant-id", http::HeaderValue::from_static("acme"));
    h.insert(
        "x-b3-traceid",
        http::HeaderValue::from_static("463ac35c9f6413ad48485a3953bb6124"),
    );
    let mut with_headers = r.clone();
    with_headers.take_headers(&private, &h);
    c.bench_function(
        "access-log rendering, query hashed, addresses redacted, two headers",
        |b| b.iter(|| black_box(&with_headers).render(&private)),
    );
}

criterion_group!(benches, routing, selection, identity_and_authz, access_log);
criterion_main!(benches);
