//! Route services (GoRouter's `route_service_url`): a request goes to the route service first,
//! signed; the service sends it back, and the gateway takes it to the app only with a signature
//! it made for that route within `route_services.timeout`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portcullis::echo;
use portcullis::pki::Ca;
use tokio::net::TcpListener;

use crate::dead_port;
use crate::support::client::{get, Conn, Resp};
use crate::support::gateway::{LogLine, TestGateway};
use crate::support::pki::TestPki;

const SIGNATURE: &str = "x-cf-proxy-signature";
const METADATA: &str = "x-cf-proxy-metadata";
const FORWARDED: &str = "x-cf-forwarded-url";

/// What the route service saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    headers: HeaderMap,
}

/// A route service: records each request, then sends it back to the gateway at `gateway`
/// (to the forwarded URL's host and path, with the signature headers), adding
/// `x-from-route-service`, and answers with the gateway's response plus `x-route-service:
/// seen`. A request with `x-deny: 1` it answers 401 itself, as an authenticating service does.
struct RouteService {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl RouteService {
    /// Serves HTTPS (a `localhost` certificate from the backend CA) when `tls`, else plain
    /// HTTP, as an app on the platform does behind the gateway.
    async fn start(
        pki: Arc<TestPki>,
        listener: TcpListener,
        gateway: SocketAddr,
        tls: bool,
    ) -> RouteService {
        let leaf = pki.backend_ca.server(&["localhost"]).unwrap();
        let mut cfg = crate::support::pki::server_config(&leaf);
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tls.then(|| tokio_rustls::TlsAcceptor::from(Arc::new(cfg)));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (record, ca) = (seen.clone(), pki);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, record, ca) = (acceptor.clone(), record.clone(), ca.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (record, ca) = (record.clone(), ca.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                Self::serve(req, gateway, &ca.server_ca, &record).await,
                            )
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(tcp).await {
                                let _ = http.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
        });
        RouteService { seen }
    }

    async fn serve(
        req: Request<Incoming>,
        gateway: SocketAddr,
        ca: &Ca,
        record: &Mutex<Vec<Seen>>,
    ) -> Response<Full<Bytes>> {
        let seen = Seen {
            path: req.uri().path_and_query().unwrap().to_string(),
            headers: req.headers().clone(),
        };
        record.lock().unwrap().push(seen.clone());
        if req.headers().contains_key("x-deny") {
            let mut r = Response::new(Full::new(Bytes::from_static(b"who are you?")));
            *r.status_mut() = http::StatusCode::UNAUTHORIZED;
            return r;
        }
        let forwarded = seen.headers[FORWARDED].to_str().unwrap();
        let url = url::Url::parse(forwarded).unwrap();
        let host = url.host_str().unwrap().to_string();
        let path = &forwarded[forwarded.find(url.path()).unwrap()..];
        let mut back = Conn::tls(gateway, ca, Some(&host), None, false)
            .await
            .unwrap();
        let headers: Vec<(&str, &str)> = [SIGNATURE, METADATA, FORWARDED]
            .iter()
            .map(|h| (*h, seen.headers[*h].to_str().unwrap()))
            .chain([("x-from-route-service", "yes")])
            .collect();
        let req = back.build(&host, path, &headers);
        let resp = back.send(req).await.unwrap();
        let mut r = Response::new(Full::new(Bytes::from(resp.body)));
        *r.status_mut() = http::StatusCode::from_u16(resp.status).unwrap();
        *r.headers_mut() = resp.headers;
        r.headers_mut()
            .insert("x-route-service", http::HeaderValue::from_static("seen"));
        r
    }

    fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request")
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

fn config(rs_port: u16, backend: SocketAddr, secrets: &str) -> String {
    let dead = dead_port();
    let (h, p) = (backend.ip(), backend.port());
    let bound = |uri: &str, port: u16| {
        format!(
            "  - {{uris: [\"{uri}\"], host: \"{h}\", port: {p}, route_service_url: \"https://localhost:{port}/rs?svc=1\"}}\n"
        )
    };
    format!(
        "domains:\n  - {{name: \"*.apps.identity\", ca_certs: identity-ca.pem}}\n\
         route_services: {{{secrets}, timeout: 3s, ca_certs: backend-ca.pem}}\n\
         access_log: {{path: access.log, extra_fields: [route_service]}}\n\
         routes:\n{}{}{}{}\
         \x20 - {{uris: [\"other.apps.plain\"], host: \"{h}\", port: {p}}}\n",
        bound("rs.apps.plain", rs_port),
        bound("rs2.apps.plain", rs_port),
        bound("down.apps.plain", dead),
        bound("rs.apps.identity", rs_port),
    )
}

/// Sends a GET for `host` and `path` straight to the gateway with `headers`.
async fn direct(
    gw: &TestGateway,
    pki: &TestPki,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Resp {
    let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), None, false)
        .await
        .unwrap();
    let req = c.build(host, path, headers);
    c.send(req).await.unwrap()
}

fn signature_of(seen: &Seen) -> [(String, String); 2] {
    [SIGNATURE, METADATA].map(|h| (h.to_string(), seen.headers[h].to_str().unwrap().to_string()))
}

fn as_pairs(s: &[(String, String)]) -> Vec<(&str, &str)> {
    s.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Through the route service and back, over HTTP/1.1 and h2; forged, replayed-elsewhere and
/// expired signatures refused; the service's own answer passed on; a rotation with
/// `secret_decrypt_only`; WebSockets, mTLS domains and an unreachable service answered as
/// GoRouter answers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_through_the_route_service_and_come_back_signed() {
    let pki = Arc::new(TestPki::new());
    let backend = echo::start("app", ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rs_port = listener.local_addr().unwrap().port();
    let gw = TestGateway::start(&pki, &config(rs_port, backend.addr, "secret: first")).await;
    let rs = RouteService::start(pki.clone(), listener, gw.https(), true).await;

    for h2 in [false, true] {
        let r = get(
            gw.https(),
            &pki.server_ca,
            None,
            "rs.apps.plain",
            "/a/b?c=1",
            h2,
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "h2 {h2}: {}", r.body);
        assert_eq!(r.header("x-route-service"), Some("seen"));
        // The app got the request the route service sent back, without the signature.
        let e = r.echo();
        assert_eq!(e.path, "/a/b?c=1");
        assert_eq!(e.headers["x-from-route-service"], "yes");
        for h in [SIGNATURE, METADATA, FORWARDED] {
            assert!(!e.headers.contains_key(h), "{h} reached the app");
        }
        // The route service got it at its own URL, with where it was going.
        let seen = rs.last();
        assert_eq!(seen.path, "/rs?svc=1");
        assert_eq!(
            seen.headers["host"],
            format!("localhost:{rs_port}").as_str()
        );
        assert_eq!(seen.headers[FORWARDED], "https://rs.apps.plain/a/b?c=1");
        assert_eq!(seen.headers["x-forwarded-proto"], "https");
        assert!(seen.headers.contains_key("x-vcap-request-id"));
        assert!(!seen.headers.contains_key("x-cf-applicationid"));
    }
    assert_eq!(backend.requests(), 2);
    // Each pass is one access-log line: the caller's (sent to the service, no app endpoint) and
    // the service's (returned, to the app).
    let lines = gw.log_lines(4).await;
    let passes: Vec<(String, String, String)> = lines
        .iter()
        .map(|l| {
            let l = LogLine::parse(l);
            let pass = l.field("route_service").to_string();
            (l.host.clone(), pass, l.backend.clone())
        })
        .collect();
    let sent = (
        "rs.apps.plain".to_string(),
        "sent".to_string(),
        "-".to_string(),
    );
    let returned = (
        "rs.apps.plain".to_string(),
        "returned".to_string(),
        backend.addr.to_string(),
    );
    // The service's line is written first: its response ends before the caller's does.
    assert_eq!(passes, [returned.clone(), sent.clone(), returned, sent]);
    gw.wait_metric(
        "portcullis_route_service_requests_total{outcome=\"sent\"}",
        2.0,
    )
    .await;
    gw.wait_metric(
        "portcullis_route_service_requests_total{outcome=\"returned\"}",
        2.0,
    )
    .await;

    // A signature is good for its own route only, and nothing without one of this gateway's.
    let sig = signature_of(&rs.last());
    let r = direct(&gw, &pki, "rs2.apps.plain", "/a/b?c=1", &as_pairs(&sig)).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (400, "Failed to validate Route Service Signature")
    );
    let forged = [(SIGNATURE, "AAAA"), (METADATA, "e30=")];
    let r = direct(&gw, &pki, "rs.apps.plain", "/", &forged).await;
    assert_eq!(r.status, 400);
    assert_eq!(backend.requests(), 2, "nothing refused reached the app");
    gw.wait_metric(
        "portcullis_route_service_requests_total{outcome=\"other_route\"}",
        1.0,
    )
    .await;
    gw.wait_metric(
        "portcullis_route_service_requests_total{outcome=\"invalid_signature\"}",
        1.0,
    )
    .await;

    // The service's own refusal is the caller's answer; the app never sees the request.
    let r = direct(&gw, &pki, "rs.apps.plain", "/", &[("x-deny", "1")]).await;
    assert_eq!((r.status, r.body.as_str()), (401, "who are you?"));
    assert_eq!(backend.requests(), 2);

    // Rotation: the previous secret still opens what it signed, until it is dropped.
    let before = signature_of(&rs.last());
    let sent = rs.count();
    gw.reload(&config(
        rs_port,
        backend.addr,
        "secret: second, secret_decrypt_only: first",
    ));
    let r = direct(&gw, &pki, "rs.apps.plain", "/", &as_pairs(&before)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        rs.count(),
        sent,
        "a signed request goes straight to the app"
    );
    gw.reload(&config(rs_port, backend.addr, "secret: second"));
    let r = direct(&gw, &pki, "rs.apps.plain", "/", &as_pairs(&before)).await;
    assert_eq!(r.status, 400);

    // A signature older than route_services.timeout (3 s) is refused.
    let r = get(
        gw.https(),
        &pki.server_ca,
        None,
        "rs.apps.plain",
        "/",
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let fresh = signature_of(&rs.last());
    let r = direct(&gw, &pki, "rs.apps.plain", "/", &as_pairs(&fresh)).await;
    assert_eq!(r.status, 200, "good within the timeout");
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let r = direct(&gw, &pki, "rs.apps.plain", "/", &as_pairs(&fresh)).await;
    assert_eq!(r.status, 400);
    gw.wait_metric(
        "portcullis_route_service_requests_total{outcome=\"expired\"}",
        1.0,
    )
    .await;

    // As GoRouter: no WebSockets through a route service; an unreachable one is a 502.
    let r = direct(
        &gw,
        &pki,
        "rs.apps.plain",
        "/",
        &[("connection", "upgrade"), ("upgrade", "websocket")],
    )
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.header("x-cf-routererror"),
        Some("route_service_unsupported")
    );
    let r = direct(&gw, &pki, "down.apps.plain", "/", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-cf-routererror"), Some("endpoint_failure"));

    // In an mTLS domain the service's call back would carry its own certificate, not the
    // caller's: still refused.
    let r = get(
        gw.https(),
        &pki.server_ca,
        Some(&pki.a),
        "rs.apps.identity",
        "/",
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(
        r.header("x-cf-routererror"),
        Some("route_service_unsupported")
    );

    // `explain` (here through the admin API) says which routes go through their service.
    for (host, called) in [("rs.apps.plain", true), ("rs.apps.identity", false)] {
        let e = gw.admin_json(&format!("/routes/{host}/policy")).await;
        assert_eq!(e["route_service_called"], called, "{e:#}");
        assert_eq!(
            e["route_service_url"],
            format!("https://localhost:{rs_port}/rs?svc=1")
        );
    }

    // A route without a route service ignores the headers (here an expired signature) ...
    let r = direct(&gw, &pki, "other.apps.plain", "/", &as_pairs(&fresh)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().headers[SIGNATURE], fresh[0].1);

    // ... unless `strict_signature_validation` (GoRouter's): then a signature must be valid
    // there too, whatever URL it names, so that a route service's own route called directly
    // with forged headers does not reach the service. Requests without one are untouched.
    gw.reload(&config(
        rs_port,
        backend.addr,
        "secret: second, strict_signature_validation: true",
    ));
    let forged = [
        (SIGNATURE.to_string(), "bm90IGEgc2lnbmF0dXJl".to_string()),
        fresh[1].clone(),
    ];
    let invalid_before =
        gw.metric("portcullis_route_service_requests_total{outcome=\"invalid_signature\"}");
    for (what, headers, status) in [
        ("expired", as_pairs(&fresh), 400),
        ("forged", as_pairs(&forged), 400),
        ("none", vec![], 200),
        ("metadata alone", as_pairs(&fresh[1..]), 200),
    ] {
        let r = direct(&gw, &pki, "other.apps.plain", "/", &headers).await;
        assert_eq!(r.status, status, "{what}: {}", r.body);
    }
    gw.wait_metric(
        "portcullis_route_service_requests_total{outcome=\"expired\"}",
        2.0,
    )
    .await;
    assert_eq!(
        gw.metric("portcullis_route_service_requests_total{outcome=\"invalid_signature\"}"),
        invalid_before + 1.0
    );
    // A signature the gateway made a moment ago (for another route) passes, headers and all.
    let sent = rs.count();
    let r = get(
        gw.https(),
        &pki.server_ca,
        None,
        "rs.apps.plain",
        "/",
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(rs.count(), sent + 1);
    let now = signature_of(&rs.last());
    let r = direct(&gw, &pki, "other.apps.plain", "/", &as_pairs(&now)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.echo().headers[SIGNATURE], now[0].1);
}

/// GoRouter's hairpinning: a route service that is a route of the gateway (here
/// `auth.apps.plain`, a name no DNS server knows) is reached through that route's endpoints;
/// with `hairpinning: false`, or a `hairpinning_allowlist` the name is not on, the gateway looks
/// the name up, fails, and answers 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_service_on_the_platform_is_reached_inside_the_gateway() {
    let pki = Arc::new(TestPki::new());
    let backend = echo::start("app", ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let auth = listener.local_addr().unwrap();
    let (h, p) = (backend.addr.ip(), backend.addr.port());
    let config = |hairpinning: &str| {
        format!(
            "route_services: {{secret: s, {hairpinning}}}\n\
             access_log: {{path: access.log, extra_fields: [route_service]}}\n\
             routes:\n\
             \x20 - {{uris: [hp.apps.plain], host: \"{h}\", port: {p}, route_service_url: \"https://auth.apps.plain/check?x=1\"}}\n\
             \x20 - {{uris: [auth.apps.plain], host: \"{}\", port: {}}}\n",
            auth.ip(),
            auth.port()
        )
    };
    let gw = TestGateway::start(&pki, &config("hairpinning: true")).await;
    let rs = RouteService::start(pki.clone(), listener, gw.https(), false).await;
    let r = get(
        gw.https(),
        &pki.server_ca,
        None,
        "hp.apps.plain",
        "/in?y=2",
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-route-service"), Some("seen"));
    assert_eq!(r.echo().path, "/in?y=2");
    let seen = rs.last();
    assert_eq!(seen.path, "/check?x=1");
    assert_eq!(seen.headers["host"], "auth.apps.plain");
    assert_eq!(seen.headers[FORWARDED], "https://hp.apps.plain/in?y=2");
    // The sent pass names the route service's endpoint.
    let lines = gw.log_lines(2).await;
    let sent = LogLine::parse(&lines[1]);
    assert_eq!(sent.field("route_service"), "sent");
    assert_eq!(sent.backend, auth.to_string());

    // On the allowlist, as a one-label wildcard or by name (case aside): still hairpinned.
    let mut seen = 1;
    for (section, hairpinned) in [
        ("hairpinning_allowlist: [\"*.apps.plain\"]", true),
        (
            "hairpinning_allowlist: [other.example.com, AUTH.apps.plain]",
            true,
        ),
        (
            "hairpinning_allowlist: [\"*.example.com\", \"*.auth.apps.plain\"]",
            false,
        ),
        ("hairpinning: false", false),
    ] {
        gw.reload(&config(section));
        let r = get(
            gw.https(),
            &pki.server_ca,
            None,
            "hp.apps.plain",
            "/",
            false,
        )
        .await
        .unwrap();
        if hairpinned {
            seen += 1;
            assert_eq!(r.status, 200, "{section}: {}", r.body);
        } else {
            assert_eq!(r.status, 502, "{section}");
        }
        assert_eq!(rs.count(), seen, "{section}");
    }
}
