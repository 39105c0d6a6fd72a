//! TLS to backends: the backend certificate must carry `server_cert_domain_san`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use portcullis::echo;

use crate::support::bounded;
use crate::support::client::{get, streaming, Conn};
use crate::support::gateway::{LogLine, TestGateway};
use crate::support::pki::TestPki;

#[tokio::test]
async fn tls_backend_with_san_check() {
    let pki = TestPki::new();
    let leaf = pki.backend_ca.server(&["backend.internal"]).unwrap();
    let cfg = crate::support::pki::server_config(&leaf);
    let tls_backend = echo::start_with(
        "tls-backend",
        ([127, 0, 0, 1], 0).into(),
        Some(Arc::new(cfg)),
    )
    .await
    .unwrap();
    let port = tls_backend.addr.port();
    let y = format!(
        "routes:\n\
         \x20 - {{uris: [good.apps.plain], host: 127.0.0.1, tls_port: {port}, server_cert_domain_san: backend.internal}}\n\
         \x20 - {{uris: [bad.apps.plain], host: 127.0.0.1, tls_port: {port}, server_cert_domain_san: other.internal}}\n"
    );
    let gw = TestGateway::start(&pki, &y).await;
    for _ in 0..3 {
        let r = get(
            gw.https(),
            &pki.server_ca,
            None,
            "good.apps.plain",
            "/",
            false,
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.echo().backend, "tls-backend");
    }
    let r = get(
        gw.https(),
        &pki.server_ca,
        None,
        "bad.apps.plain",
        "/",
        true,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-cf-routererror"), Some("endpoint_failure"));
    assert_eq!(tls_backend.requests(), 3);
}

/// Backend connections go back to the pool once a response is fully sent, including responses
/// with a known length (which hyper finishes without polling the body to its end): 30 requests
/// (h1 and h2 clients, small and 256 KiB bodies, one at a time), then POSTs with a body of each
/// shape ([`posts_one_at_a_time`]) and a last GET, need one backend connection per worker thread (each worker
/// has its own pool): one with `workers: 1`, at most two with two. A request body counts as all
/// sent however its end is known, so none of them is taken for an answer that came early.
#[tokio::test]
async fn backend_connections_are_reused() {
    let pki = TestPki::new();
    let (backend, accepted) = counting_backend().await;
    for (workers, most) in [(1, 1), (2, 2)] {
        accepted.store(0, Ordering::Relaxed);
        let y = format!(
            "limits: {{workers: {workers}}}\n\
             routes:\n  - {{uris: [reuse.apps.plain], host: 127.0.0.1, port: {}}}\n",
            backend.port()
        );
        let gw = TestGateway::start(&pki, &y).await;
        requests_one_at_a_time(&gw, &pki, 30).await;
        posts_one_at_a_time(&gw, &pki).await;
        // One more, which finds the connection the last POST left, if it was left.
        requests_one_at_a_time(&gw, &pki, 1).await;
        let n = accepted.load(Ordering::Relaxed);
        assert!(
            (1..=most).contains(&n),
            "{workers} worker(s): {n} backend connections for 37 requests one at a time"
        );
        // Every body reached the app whole, however it came: no answer counts as early.
        for protocol in ["http1", "http2"] {
            let early =
                format!("portcullis_backend_early_answers_total{{protocol=\"{protocol}\"}}");
            assert_eq!(gw.metric(&early), 0.0, "{early}");
        }
    }
}

/// A pooled backend connection idle for longer than `backends.idle_timeout` is not used again:
/// the next request opens a new one, which is then reused.
#[tokio::test]
async fn idle_backend_connections_expire() {
    let pki = TestPki::new();
    let (backend, accepted) = counting_backend().await;
    let y = format!(
        "limits: {{workers: 1}}\n\
         backends: {{ca_certs: backend-ca.pem, idle_timeout: 300ms}}\n\
         routes:\n  - {{uris: [reuse.apps.plain], host: 127.0.0.1, port: {}}}\n",
        backend.port()
    );
    let gw = TestGateway::start(&pki, &y).await;
    requests_one_at_a_time(&gw, &pki, 3).await;
    assert_eq!(accepted.load(Ordering::Relaxed), 1);
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    requests_one_at_a_time(&gw, &pki, 3).await;
    assert_eq!(
        accepted.load(Ordering::Relaxed),
        2,
        "the expired connection is replaced once"
    );
}

/// A plain HTTP/1.1 backend answering `/big` with 256 KiB and anything else with 10 bytes,
/// counting the connections it accepts.
async fn counting_backend() -> (std::net::SocketAddr, Arc<AtomicU64>) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let n = match req.uri().path() {
                            "/big" => 256 * 1024,
                            _ => 10,
                        };
                        // Read whole before the answer, as an app that takes uploads does: the
                        // answer says how much came.
                        let body = req.into_body().collect().await?.to_bytes();
                        let mut resp = http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(vec![b'x'; n]),
                        ));
                        resp.headers_mut()
                            .insert("x-body-length", body.len().into());
                        Ok::<_, hyper::Error>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (backend, accepted)
}

/// POSTs for `reuse.apps.plain`, one at a time, each on a new client connection, with a body of
/// every shape: whole with its length (HTTP/1.1 and h2, where the end of stream comes with the
/// data); in pieces with a `Content-Length`, the h2 end of stream in a frame of its own after the
/// last data; in pieces without a length (HTTP/1.1 chunked, h2); and an h2 one declared empty
/// whose end of stream follows its head in a frame of its own. Each is answered 200 by an app
/// that read all of it.
async fn posts_one_at_a_time(gw: &TestGateway, pki: &TestPki) {
    use http_body_util::BodyExt;
    let piece = bytes::Bytes::from(vec![b'p'; 16 * 1024]);
    let len = 5 * piece.len();
    for h2 in [false, true] {
        let mut c = Conn::tls(
            gw.https(),
            &pki.server_ca,
            Some("reuse.apps.plain"),
            None,
            h2,
        )
        .await
        .unwrap();
        let mut req = c.build("reuse.apps.plain", "/post", &[]);
        *req.method_mut() = http::Method::POST;
        *req.body_mut() = http_body_util::Full::new(bytes::Bytes::from(vec![b'w'; len]));
        let resp = c.send(req).await.unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("x-body-length"), Some(len.to_string().as_str()));
    }
    // (h2, with a Content-Length, pieces)
    for (h2, length, pieces) in [
        (true, true, 5),
        (true, true, 0),
        (false, false, 5),
        (true, false, 5),
    ] {
        let len = pieces * piece.len();
        let mut req = match h2 {
            false => http::Request::post("/post").header("host", "reuse.apps.plain"),
            true => http::Request::post("https://reuse.apps.plain/post"),
        };
        if length {
            req = req.header("content-length", len);
        }
        let (mut tx, answer) =
            streaming(gw.https(), &pki.server_ca, "reuse.apps.plain", req, h2).await;
        for _ in 0..pieces {
            tx.send_data(piece.clone()).await.unwrap();
        }
        let resp = if pieces == 0 {
            // Declared empty, it is whole with its head: answered before its end of stream.
            let resp = answer.await.unwrap().unwrap();
            drop(tx);
            resp
        } else {
            drop(tx);
            answer.await.unwrap().unwrap()
        };
        assert_eq!(resp.status(), 200, "h2 {h2}, length {length}");
        let seen = resp.headers()["x-body-length"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(seen, len.to_string(), "h2 {h2}, length {length}");
        resp.into_body().collect().await.unwrap();
    }
}

async fn requests_one_at_a_time(gw: &TestGateway, pki: &TestPki, n: usize) {
    for i in 0..n {
        let path = if i % 3 == 0 { "/big" } else { "/" };
        let resp = get(
            gw.https(),
            &pki.server_ca,
            None,
            "reuse.apps.plain",
            path,
            i % 2 == 0,
        )
        .await
        .unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.body.len(),
            if path == "/big" { 256 * 1024 } else { 10 }
        );
    }
}

/// Many streams of one h2 connection whose answers (10 B to 256 KiB) become ready together: each
/// arrives whole and byte for byte, although the gateway sends what is ready in one write and
/// holds back when the client's window is full. Over an HTTP/1.1 backend and over an h2 one
/// (`protocol: http2`), where the streams share one backend connection.
#[tokio::test]
async fn concurrent_h2_answers_arrive_whole() {
    for backend_h2 in [false, true] {
        let (backend, seen) = sized_backend(backend_h2).await;
        let pki = TestPki::new();
        let protocol = if backend_h2 { "http2" } else { "http1" };
        let y = format!(
            "limits: {{workers: 1}}\n\
             routes:\n  - {{uris: [many.apps.plain], host: 127.0.0.1, port: {}, \
             protocol: {protocol}}}\n",
            backend.port()
        );
        let gw = TestGateway::start(&pki, &y).await;
        concurrent_streams(&gw, &pki).await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.requests, 60, "{protocol}");
        // The authority arrives once: as `:authority` over h2, as Host over HTTP/1.1.
        assert_eq!(
            seen.authorities,
            vec!["many.apps.plain".to_string()],
            "{protocol}"
        );
        if backend_h2 {
            assert_eq!(seen.host_headers, 0, "a Host header besides :authority");
            assert_eq!(seen.versions, vec![http::Version::HTTP_2]);
            assert_eq!(
                seen.connections, 1,
                "the streams share one backend connection"
            );
        } else {
            assert_eq!(seen.versions, vec![http::Version::HTTP_11]);
        }
    }
}

#[derive(Clone, Default)]
struct Seen {
    requests: usize,
    host_headers: usize,
    authorities: Vec<String>,
    connections: usize,
    versions: Vec<http::Version>,
}

/// A plain backend (HTTP/1.1, or h2 with prior knowledge) answering `/<len>/<seed>` with `len`
/// bytes of a pattern that differs per seed, recording what it saw.
async fn sized_backend(h2: bool) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Seen>>) {
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            record.lock().unwrap().connections += 1;
            let record = record.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let record = record.clone();
                    async move {
                        {
                            let mut r = record.lock().unwrap();
                            r.requests += 1;
                            let host = req.headers().get(http::header::HOST);
                            r.host_headers += usize::from(host.is_some());
                            let authority = match req.uri().authority() {
                                Some(a) => a.to_string(),
                                None => host
                                    .and_then(|h| h.to_str().ok())
                                    .unwrap_or_default()
                                    .to_string(),
                            };
                            if !r.authorities.contains(&authority) {
                                r.authorities.push(authority);
                            }
                            if !r.versions.contains(&req.version()) {
                                r.versions.push(req.version());
                            }
                        }
                        let (len, seed) = parse_sized(req.uri().path());
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(bytes::Bytes::from(
                            pattern(len, seed),
                        ))))
                    }
                });
            tokio::spawn(async move {
                let io = TokioIo::new(tcp);
                let _ = if h2 {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await
                };
            });
        }
    });
    (addr, seen)
}

/// 60 concurrent streams of 10 B to 256 KiB on one h2 client connection, checked byte for byte.
async fn concurrent_streams(gw: &TestGateway, pki: &TestPki) {
    use http_body_util::{BodyExt, Full};

    let send = h2_client(gw, pki, "many.apps.plain").await;
    const SIZES: [usize; 6] = [10, 300, 1024, 5000, 70_000, 256 * 1024];
    let mut calls = Vec::new();
    for seed in 0..60usize {
        let mut send = send.clone();
        let len = SIZES[seed % SIZES.len()];
        calls.push(tokio::spawn(async move {
            let req = http::Request::get(format!("https://many.apps.plain/{len}/{seed}"))
                .body(Full::default())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), len, "stream {seed}");
            assert!(
                body[..] == pattern(len, seed)[..],
                "stream {seed}: body differs"
            );
        }));
    }
    crate::support::bounded("60 h2 streams", async {
        for c in calls {
            c.await.unwrap();
        }
    })
    .await;
}

/// An h2 client connection to `sni`, with a small window so that the gateway must wait for the
/// client while answers are ready.
async fn h2_client(
    gw: &TestGateway,
    pki: &TestPki,
    sni: &str,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>> {
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let tls =
        crate::support::client::tls_connect(gw.https(), &pki.server_ca, Some(sni), None, &[b"h2"])
            .await
            .unwrap();
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(16 * 1024)
        .initial_connection_window_size(64 * 1024)
        .handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// Requests waiting for the h2 backend connection another request is opening share its failure
/// too. The backend accepts TCP but never answers TLS, so a connect takes the whole connect
/// timeout: 20 concurrent requests cost one connect (0.3 s), not 20 made one after another (6 s).
#[tokio::test]
async fn a_failing_h2_backend_connect_is_shared_by_the_requests_waiting_for_it() {
    let pki = TestPki::new();
    let (port, accepted) = silent_listener().await;
    let y = format!(
        "limits: {{workers: 1}}\n\
         backends: {{ca_certs: backend-ca.pem, connect_timeout: 300ms}}\n\
         routes:\n  - {{uris: [silent.apps.plain], host: 127.0.0.1, tls_port: {port}, \
         server_cert_domain_san: backend.internal, protocol: http2}}\n"
    );
    let gw = TestGateway::start(&pki, &y).await;
    let send = h2_client(&gw, &pki, "silent.apps.plain").await;
    let started = std::time::Instant::now();
    let calls = concurrent_gets(&send, "silent.apps.plain", 20);
    crate::support::bounded("20 requests to a silent h2 backend", async {
        for c in calls {
            assert_eq!(c.await.unwrap(), 502);
        }
    })
    .await;
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(
        accepted.load(Ordering::Relaxed),
        1,
        "connects for 20 requests"
    );
    // Each request counts the failure it shared, as what it was.
    gw.wait_metric(
        "portcullis_backend_errors_total{kind=\"connect_timeout\"}",
        20.0,
    )
    .await;
}

/// `backends.h2_streams_per_connection` caps the requests one h2 backend connection carries:
/// 12 requests held open together at a limit of 4 open three connections, each carrying 4. When
/// they have been answered, their places are free again: the next 12 use the same three.
#[tokio::test]
async fn h2_backend_connections_carry_at_most_the_configured_streams() {
    const HELD: usize = 12;
    let (backend, connections, widest) = holding_h2_backend(HELD).await;
    let pki = TestPki::new();
    let y = format!(
        "limits: {{workers: 1}}\n\
         backends: {{h2_streams_per_connection: 4}}\n\
         routes:\n  - {{uris: [held.apps.plain], host: 127.0.0.1, port: {}, protocol: http2}}\n",
        backend.port()
    );
    let gw = TestGateway::start(&pki, &y).await;
    let send = h2_client(&gw, &pki, "held.apps.plain").await;
    for round in 0..2 {
        let calls = concurrent_gets(&send, "held.apps.plain", HELD);
        crate::support::bounded("12 requests held by an h2 backend", async {
            for c in calls {
                assert_eq!(c.await.unwrap(), 200, "round {round}");
            }
        })
        .await;
        assert_eq!(connections.load(Ordering::Relaxed), 3, "round {round}");
        assert_eq!(widest.load(Ordering::Relaxed), 4, "round {round}");
    }
}

/// `n` concurrent GETs of `https://<host>/<i>` on the h2 connection `send`; each task yields the
/// status.
fn concurrent_gets(
    send: &hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    host: &str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<http::StatusCode>> {
    (0..n)
        .map(|i| {
            let mut send = send.clone();
            let req = http::Request::get(format!("https://{host}/{i}"))
                .body(http_body_util::Full::default())
                .unwrap();
            tokio::spawn(async move { send.send_request(req).await.unwrap().status() })
        })
        .collect()
}

/// An h2 backend (prior knowledge) that holds each request until `held` requests are waiting,
/// then answers them all. Counts its connections, and the most requests one of them carried at
/// once.
async fn holding_h2_backend(held: usize) -> (std::net::SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let widest = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(held));
    let (count, most) = (connections.clone(), widest.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            let open = Arc::new(AtomicU64::new(0));
            let (most, barrier) = (most.clone(), barrier.clone());
            let svc =
                hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    let (open, most, barrier) = (open.clone(), most.clone(), barrier.clone());
                    async move {
                        let now = open.fetch_add(1, Ordering::Relaxed) + 1;
                        most.fetch_max(now, Ordering::Relaxed);
                        barrier.wait().await;
                        open.fetch_sub(1, Ordering::Relaxed);
                        Ok::<_, hyper::Error>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"ok"),
                        )))
                    }
                });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    (addr, connections, widest)
}

fn parse_sized(path: &str) -> (usize, usize) {
    let mut parts = path.trim_start_matches('/').split('/');
    let len = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let seed = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (len, seed)
}

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 7 + seed) % 251) as u8).collect()
}

/// A TCP listener that accepts and never answers (a TLS handshake with it takes the whole
/// connect timeout); returns its port and how many connections it accepted.
async fn silent_listener() -> (u16, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut silent = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            silent.push(tcp);
        }
    });
    (port, accepted)
}

/// An endpoint that failed a connection comes after the route's other endpoints for
/// `backends.failure_cooldown`, so a dead instance costs one failed connect per cooldown
/// instead of one every other request; after the cooldown it is tried again, and a route whose
/// endpoints have all failed still tries them. With the cooldown at `0s` every other request
/// pays the connect timeout, as before.
#[tokio::test]
async fn a_failed_endpoint_comes_last_for_the_failure_cooldown() {
    let pki = TestPki::new();
    let alive = echo::start("alive", ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let (silent, accepted) = silent_listener().await;
    for (cooldown, first_eight) in [("1s", 1), ("0s", 4)] {
        let y = format!(
            "limits: {{workers: 1}}\n\
             backends: {{ca_certs: backend-ca.pem, connect_timeout: 300ms, \
             failure_cooldown: {cooldown}}}\n\
             routes:\n\
             \x20 - {{uris: [pair.apps.plain], host: 127.0.0.1, tls_port: {silent}, \
             server_cert_domain_san: backend.internal}}\n\
             \x20 - {{uris: [pair.apps.plain, alive.apps.plain], host: 127.0.0.1, port: {}}}\n\
             \x20 - {{uris: [lone.apps.plain], host: 127.0.0.1, tls_port: {silent}, \
             server_cert_domain_san: backend.internal}}\n",
            alive.addr.port()
        );
        let gw = TestGateway::start(&pki, &y).await;
        accepted.store(0, Ordering::Relaxed);
        let mut c = Conn::plain(gw.http()).await.unwrap();
        let started = std::time::Instant::now();
        for i in 0..8 {
            let r = bounded("a request", c.get("pair.apps.plain", "/")).await;
            assert_eq!(r.unwrap().status, 200, "{cooldown}: request {i}");
        }
        let took = started.elapsed();
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            first_eight,
            "{cooldown}: connects to the silent endpoint for 8 requests"
        );
        if cooldown == "0s" {
            assert!(took >= std::time::Duration::from_millis(1_200), "{took:?}");
            continue;
        }
        assert!(took < std::time::Duration::from_millis(900), "{took:?}");
        // /routes says how long it still comes last; the other endpoint has no such field.
        let routes = gw.admin_json("/routes").await;
        let pair: Vec<&serde_json::Value> = routes
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["route"] == "pair.apps.plain")
            .flat_map(|r| r["endpoints"].as_array().unwrap())
            .collect();
        let left: Vec<Option<u64>> = pair
            .iter()
            .map(|e| e["failure_cooldown_ms"].as_u64())
            .collect();
        assert_eq!(left.len(), 2);
        assert!(
            left.iter()
                .filter(|l| l.is_some_and(|ms| ms <= 1_000))
                .count()
                == 1
                && left.iter().filter(|l| l.is_none()).count() == 1,
            "{pair:#?}"
        );
        // A route with only the failed endpoint still tries it: two requests, two connects.
        let before = accepted.load(Ordering::Relaxed);
        for _ in 0..2 {
            let r = bounded("a request", c.get("lone.apps.plain", "/")).await;
            assert_eq!(r.unwrap().status, 502);
        }
        assert_eq!(accepted.load(Ordering::Relaxed), before + 2);
        // After the cooldown the silent endpoint takes its turn again on the pair route.
        tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
        let before = accepted.load(Ordering::Relaxed);
        for _ in 0..2 {
            let r = bounded("a request", c.get("pair.apps.plain", "/")).await;
            assert_eq!(r.unwrap().status, 200);
        }
        assert_eq!(accepted.load(Ordering::Relaxed), before + 1);
    }
}

/// GoRouter's `backends.max_conns`: an endpoint with that many requests in flight is passed
/// over, and a request whose endpoints are all that busy gets 503 `Connection Limit Reached`
/// without reaching a backend; once a request ends, its endpoint takes the next one.
#[tokio::test]
async fn max_conns_passes_busy_endpoints_over_and_answers_503_when_all_are() {
    let pki = TestPki::new();
    let e1 = echo::start("b1", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let e2 = echo::start("b2", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let host = "limit.apps.plain";
    let mut y = String::from(
        "backends: {ca_certs: backend-ca.pem, connect_timeout: 1s, max_conns: 1}\nroutes:\n",
    );
    y += &crate::route(host, e1.addr, "app_id: x", "");
    y += &crate::route(host, e2.addr, "app_id: x", "");
    let gw = TestGateway::start(&pki, &y).await;
    let connect = || Conn::tls(gw.https(), &pki.server_ca, Some(host), None, false);
    let slow = |mut c: Conn| {
        tokio::spawn(async move {
            let r = c.get(host, "/slow?ms=1500").await.unwrap();
            (r.status, r.echo().backend)
        })
    };

    // One endpoint busy: every request goes to the other, not every other one.
    let first = slow(connect().await.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let routes = gw.admin_json("/routes").await;
    let endpoints = routes[0]["endpoints"].as_array().unwrap();
    let busy: Vec<u64> = endpoints
        .iter()
        .map(|e| e["in_flight"].as_u64().unwrap())
        .collect();
    assert_eq!(busy.iter().sum::<u64>(), 1, "{busy:?}");
    let mut c = connect().await.unwrap();
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let r = c.get(host, "/").await.unwrap();
        assert_eq!(r.status, 200);
        answered.insert(r.echo().backend);
    }
    assert_eq!(answered.len(), 1, "{answered:?}");

    // Both busy: 503, and no backend sees the request.
    let second = slow(connect().await.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let seen = e1.requests() + e2.requests();
    let r = c.get(host, "/").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(
        r.body,
        "Requested route ('limit.apps.plain') has reached the connection limit."
    );
    assert_eq!(
        r.header("x-cf-routererror"),
        Some("Connection Limit Reached")
    );
    assert_eq!(e1.requests() + e2.requests(), seen);
    assert_eq!(gw.metric("portcullis_backend_exhausted_conns_total"), 1.0);

    // The slow ones finish on different endpoints; then requests are served again.
    let (a, b) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!((a.0, b.0), (200, 200));
    assert_ne!(a.1, b.1);
    assert_eq!(c.get(host, "/").await.unwrap().status, 200);
    let routes = gw.admin_json("/routes").await;
    for e in routes[0]["endpoints"].as_array().unwrap() {
        assert_eq!(e["in_flight"], 0);
    }
}

/// With `strict` selection the full endpoint is not selected (and then refused as 403): the
/// request gets the same 503 as with `filter`, after its policy allowed it.
#[tokio::test]
async fn max_conns_under_strict_selection_is_503_not_403() {
    let pki = TestPki::new();
    let e = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let host = "limit.apps.identity";
    let mut y = String::from(
        "backends: {ca_certs: backend-ca.pem, connect_timeout: 1s, max_conns: 1}\n\
         authorization: {endpoint_selection: strict}\n\
         domains: [{name: \"*.apps.identity\", ca_certs: identity-ca.pem}]\nroutes:\n",
    );
    y += &crate::route(
        host,
        e.addr,
        "app_id: x, space_id: space-1, organization_id: org-1",
        "route_policy_scope: any, route_policy_sources: \"cf:app:app-a\"",
    );
    let gw = TestGateway::start(&pki, &y).await;
    let connect = |leaf| Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(leaf), false);
    let mut busy = connect(&pki.a).await.unwrap();
    let slow = tokio::spawn(async move { busy.get(host, "/slow?ms=1000").await.unwrap().status });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut a = connect(&pki.a).await.unwrap();
    let r = a.get(host, "/").await.unwrap();
    assert_eq!(
        (r.status, r.header("x-cf-routererror")),
        (503, Some("Connection Limit Reached"))
    );
    // A caller the policy refuses still gets 403.
    let mut b = connect(&pki.b).await.unwrap();
    assert_eq!(b.get(host, "/").await.unwrap().status, 403);
    assert_eq!(slow.await.unwrap(), 200);
    assert_eq!(a.get(host, "/").await.unwrap().status, 200);
}

/// A backend that answers every request on a connection with a head and 10 of the 100 bytes it
/// announces, then (`/stall`) sends nothing more, holding the connection open, or (`/drip`)
/// sends the other 90 in 9 pieces 300 ms apart.
async fn stalling_backend() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let drip = head.starts_with(b"GET /drip ");
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                    .await;
                if drip {
                    for _ in 0..9 {
                        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                        let _ = s.write_all(b"abcdefghij").await;
                    }
                }
                // Held until the gateway closes it (bounded, so the task ends by itself).
                let _ = tokio::time::timeout(std::time::Duration::from_secs(20), s.read(&mut buf))
                    .await;
            });
        }
    });
    addr
}

/// `backends.response_body_timeout`: an endpoint that sends its response's head and then
/// nothing is cut after the limit, over HTTP/1.1 and h2 (the client sees the body end in an
/// error; the access log has the status sent, the bytes that got through and `endpoint_timeout`;
/// the backend connection is closed, not pooled). It limits silence, not length: a slow body
/// that keeps sending outlasts it.
#[tokio::test]
async fn a_response_body_that_stops_is_cut_after_response_body_timeout() {
    let pki = TestPki::new();
    let backend = stalling_backend().await;
    let y = format!(
        "backends: {{ca_certs: backend-ca.pem, connect_timeout: 1s, response_body_timeout: 1s}}\n\
         routes:\n  - {{uris: [stall.apps.plain], host: 127.0.0.1, port: {}}}\n",
        backend.port()
    );
    let gw = TestGateway::start(&pki, &y).await;
    for h2 in [false, true] {
        let started = std::time::Instant::now();
        let mut c = Conn::tls(
            gw.https(),
            &pki.server_ca,
            Some("stall.apps.plain"),
            None,
            h2,
        )
        .await
        .unwrap();
        let r = bounded("stalled body", c.get("stall.apps.plain", "/stall")).await;
        let took = started.elapsed();
        assert!(r.is_err(), "h2 {h2}: a cut body must not look whole");
        assert!(
            took >= std::time::Duration::from_millis(900)
                && took < std::time::Duration::from_secs(5),
            "h2 {h2}: cut after {took:?}"
        );
    }
    let lines = gw.log_lines(2).await;
    for line in &lines {
        let l = crate::support::gateway::LogLine::parse(line);
        assert_eq!((l.status, l.resp_bytes), (200, 10), "{line}");
        assert_eq!(l.field("x_cf_routererror"), "endpoint_timeout", "{line}");
    }
    assert_eq!(
        gw.metric("portcullis_backend_errors_total{kind=\"body_timeout\"}"),
        2.0
    );

    // 2.7 s of body in pieces 300 ms apart: never 1 s of silence.
    let r = get(
        gw.https(),
        &pki.server_ca,
        None,
        "stall.apps.plain",
        "/drip",
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 100);
    assert!(r.body.ends_with("abcdefghij"));
    let lines = gw.log_lines(3).await;
    let l = crate::support::gateway::LogLine::parse(&lines[2]);
    assert_eq!((l.resp_bytes, l.field("x_cf_routererror")), (100, "-"));
}

/// A plain backend that answers each request with the address it came from.
async fn peer_backend() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = l.accept().await {
            let svc = hyper::service::service_fn(
                move |_req: http::Request<hyper::body::Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(peer.to_string())),
                    ))
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc),
            );
        }
    });
    addr
}

/// GoRouter's backend-connection fields in the access log: `local_address` is the gateway's end
/// of the connection the app saw the request on (the same again when the next request reuses
/// it); `dial_time`, `dns_time` and `tls_time` are timed for the request that opened the
/// connection (a lookup only for an endpoint registered by name, a handshake only for a TLS
/// one), `"-"` for a pooled one; `failed_attempts_time` only when attempts failed.
#[tokio::test]
async fn the_access_log_says_how_the_backend_connection_was_made() {
    let pki = TestPki::new();
    let peer = peer_backend().await;
    let leaf = pki.backend_ca.server(&["backend.internal"]).unwrap();
    let cfg = crate::support::pki::server_config(&leaf);
    let tls_backend = echo::start_with("tls", ([127, 0, 0, 1], 0).into(), Some(Arc::new(cfg)))
        .await
        .unwrap();
    let y = format!(
        "backends: {{ca_certs: backend-ca.pem, connect_timeout: 1s}}\n\
         access_log: {{path: access.log, extra_fields: [local_address, failed_attempts_time, dns_time, dial_time, tls_time]}}\n\
         routes:\n\
         \x20 - {{uris: [peer.apps.plain], host: 127.0.0.1, port: {}}}\n\
         \x20 - {{uris: [tls.apps.plain], host: localhost, tls_port: {}, server_cert_domain_san: backend.internal}}\n\
         \x20 - {{uris: [dead.apps.plain], host: 127.0.0.1, port: {}}}\n",
        peer.port(),
        tls_backend.addr.port(),
        crate::dead_port(),
    );
    let gw = TestGateway::start(&pki, &y).await;
    let seconds = |l: &crate::support::gateway::LogLine, f: &str| {
        let v = l.field(f);
        let s: f64 = v
            .parse()
            .unwrap_or_else(|_| panic!("{f}:{v} is not seconds"));
        assert!((0.0..5.0).contains(&s), "{f}:{v}");
    };
    // Two requests on one client connection: one worker, so one backend pool.
    let mut c = Conn::tls(
        gw.https(),
        &pki.server_ca,
        Some("peer.apps.plain"),
        None,
        false,
    )
    .await
    .unwrap();
    let first = c.get("peer.apps.plain", "/").await.unwrap();
    let second = c.get("peer.apps.plain", "/").await.unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.body, second.body, "the pooled connection is reused");
    let lines = gw.log_lines(2).await;
    let (opened, pooled) = (LogLine::parse(&lines[0]), LogLine::parse(&lines[1]));
    assert_eq!(opened.field("local_address"), first.body);
    seconds(&opened, "dial_time");
    for (f, v) in [
        ("dns_time", "-"),
        ("tls_time", "-"),
        ("failed_attempts_time", "-"),
    ] {
        assert_eq!(
            opened.field(f),
            v,
            "{f} for an address and a plain endpoint"
        );
    }
    assert_eq!(pooled.field("local_address"), first.body);
    for f in ["dial_time", "dns_time", "tls_time", "failed_attempts_time"] {
        assert_eq!(pooled.field(f), "-", "{f} for a pooled connection");
    }

    let r = get(
        gw.https(),
        &pki.server_ca,
        None,
        "tls.apps.plain",
        "/",
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let r = get(
        gw.https(),
        &pki.server_ca,
        None,
        "dead.apps.plain",
        "/",
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 502);
    let lines = gw.log_lines(4).await;
    let tls = LogLine::parse(&lines[2]);
    for f in ["dns_time", "dial_time", "tls_time"] {
        seconds(&tls, f);
    }
    assert!(
        tls.field("local_address").starts_with("127.0.0.1:")
            || tls.field("local_address").starts_with("[::1]:"),
        "{}",
        lines[2]
    );
    assert_eq!(tls.field("failed_attempts_time"), "-");
    let dead = LogLine::parse(&lines[3]);
    seconds(&dead, "failed_attempts_time");
    for f in ["local_address", "dial_time", "dns_time", "tls_time"] {
        assert_eq!(dead.field(f), "-", "{f} when no connection was made");
    }
}

/// A backend whose keep-alive timer fires as the gateway's next request arrives: on each
/// connection it answers the first request, then reads the next request and closes the
/// connection without a word. Returns its address and the request lines it read, each followed
/// by the request's body if it had one, by connection.
async fn forgetful_backend() -> (
    std::net::SocketAddr,
    Arc<std::sync::Mutex<Vec<Vec<String>>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Arc<std::sync::Mutex<Vec<Vec<String>>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let log = log.clone();
            let conn = {
                let mut all = log.lock().unwrap();
                all.push(Vec::new());
                all.len() - 1
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for answered in [true, false] {
                    let mut chunk = [0u8; 4096];
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk))
                            .await
                        {
                            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let mut line = head.lines().next().unwrap_or_default().to_string();
                    let reset = line.contains("/rst");
                    let length: usize = head
                        .lines()
                        .filter_map(|l| l.split_once(':'))
                        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                        .map_or(0, |(_, v)| v.trim().parse().unwrap());
                    while buf.len() < end + length {
                        match tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk))
                            .await
                        {
                            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                    if length > 0 {
                        line += &format!(" {}", String::from_utf8_lossy(&buf[end..end + length]));
                    }
                    log.lock().unwrap()[conn].push(line);
                    buf.clear();
                    if answered {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    } else if reset {
                        // Reset rather than closed.
                        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                    }
                }
                // Dropped: closed without answering the second request.
            });
        }
    });
    (addr, seen)
}

/// `portcullis_backend_resends_total` by reason, the reasons counted so far.
fn resends(gw: &TestGateway) -> Vec<(String, f64)> {
    gw.metrics()
        .lines()
        .filter_map(|l| l.strip_prefix("portcullis_backend_resends_total{reason=\""))
        .filter_map(|l| l.split_once("\"} "))
        .map(|(reason, n)| (reason.to_string(), n.trim().parse().unwrap()))
        .collect()
}

/// A backend closes a keep-alive connection once it has sat idle for the backend's own timeout
/// (gunicorn 2 s, Node.js 5 s), and a request the gateway sends on it at that moment is lost
/// with it. A replayable request (GET, HEAD, OPTIONS, TRACE, or an `Idempotency-Key`) on a
/// connection that had been idle is sent again on a new connection, as Go's transport (so
/// GoRouter) does, with its body too (Go's only without one); anything else gets the 502 it got
/// before, and is never sent twice.
#[tokio::test]
async fn a_request_lost_with_an_idle_backend_connection_is_sent_again_if_replayable() {
    let pki = TestPki::new();
    let (backend, seen) = forgetful_backend().await;
    let host = "forgetful.apps.plain";
    let y = format!(
        "backends: {{ca_certs: backend-ca.pem, connect_timeout: 1s}}\n\
         access_log: {{path: access.log, extra_fields: [resent]}}\n\
         routes:\n  - {{uris: [{host}], host: 127.0.0.1, port: {}}}\n",
        backend.port()
    );
    let gw = TestGateway::start(&pki, &y).await;
    let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), None, false)
        .await
        .unwrap();
    let post = |path: &str, body: &'static str, key: Option<&str>| {
        let mut b = http::Request::post(path).header("host", host);
        if let Some(k) = key {
            b = b.header("idempotency-key", k);
        }
        b.body(http_body_util::Full::new(bytes::Bytes::from_static(
            body.as_bytes(),
        )))
        .unwrap()
    };
    // Each request after the first finds the connection the one before it left idle.
    let idle = || tokio::time::sleep(Duration::from_millis(300));
    assert_eq!(c.get(host, "/one").await.unwrap().status, 200);
    idle().await;
    let r = c.get(host, "/two").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "ok"), "GET sent again");
    idle().await;
    let r = c.send(post("/three", "x", None)).await.unwrap();
    assert_eq!(r.status, 502, "a POST is not sent twice");
    assert_eq!(c.get(host, "/four").await.unwrap().status, 200);
    idle().await;
    let r = c.send(post("/five", "", Some("k-5"))).await.unwrap();
    assert_eq!(
        r.status, 200,
        "an empty POST with an Idempotency-Key is sent again"
    );
    idle().await;
    let r = c.send(post("/six", "x", Some("k-6"))).await.unwrap();
    assert_eq!(
        r.status, 200,
        "a POST with an Idempotency-Key and a body is sent again"
    );
    idle().await;
    let r = c.get(host, "/rst").await.unwrap();
    assert_eq!(r.status, 200, "sent again after a reset too");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            vec!["GET /one HTTP/1.1", "GET /two HTTP/1.1"],
            vec!["GET /two HTTP/1.1", "POST /three HTTP/1.1 x"],
            vec!["GET /four HTTP/1.1", "POST /five HTTP/1.1"],
            vec!["POST /five HTTP/1.1", "POST /six HTTP/1.1 x"],
            vec!["POST /six HTTP/1.1 x", "GET /rst HTTP/1.1"],
            vec!["GET /rst HTTP/1.1"],
        ],
        "requests (and bodies) by backend connection"
    );
    assert_eq!(resends(&gw), [("idle_connection_closed".into(), 4.0)]);
    let lines = gw.log_lines(7).await;
    let logged: Vec<(u16, String, String)> = lines
        .iter()
        .map(|l| {
            let l = LogLine::parse(l);
            let f = |n| l.field(n).to_string();
            (l.status, f("x_cf_routererror"), f("resent"))
        })
        .collect();
    let line = |status, error: &str, resent: &str| (status, error.into(), resent.into());
    let again = "idle_connection_closed";
    assert_eq!(
        logged,
        [
            line(200, "-", "-"),
            line(200, "-", again),
            line(502, "endpoint_failure", "-"),
            line(200, "-", "-"),
            line(200, "-", again),
            line(200, "-", again),
            line(200, "-", again),
        ],
        "status, x_cf_routererror and resent by request: {lines:#?}"
    );
    // The endpoint did not fail: it is not put behind others.
    let view = gw.route_view(host).await;
    assert!(
        view["endpoints"][0].get("failure_cooldown_ms").is_none(),
        "{view}"
    );
}

/// What a gRPC-shaped backend saw: each request's `te` header and its trailers.
#[derive(Default, Debug)]
struct GrpcSeen {
    te: Vec<Option<String>>,
    request_trailers: Vec<Option<String>>,
}

/// An h2c backend (`protocol: http2`, as Cloud Foundry routes gRPC apps) that answers as a gRPC
/// server does: a 200 head, a message, then the status in trailers (`grpc-status`,
/// `grpc-message`).
async fn grpc_backend() -> (std::net::SocketAddr, Arc<std::sync::Mutex<GrpcSeen>>) {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<std::sync::Mutex<GrpcSeen>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let record = record.clone();
            let svc = hyper::service::service_fn(
                move |req: http::Request<hyper::body::Incoming>| {
                    let record = record.clone();
                    async move {
                        let te = req
                            .headers()
                            .get("te")
                            .map(|v| v.to_str().unwrap().to_string());
                        let body = req.into_body().collect().await?;
                        let trailer = body
                            .trailers()
                            .and_then(|t| t.get("x-checksum"))
                            .map(|v| v.to_str().unwrap().to_string());
                        {
                            let mut r = record.lock().unwrap();
                            r.te.push(te);
                            r.request_trailers.push(trailer);
                        }
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("7"));
                        trailers.insert(
                            "grpc-message",
                            http::HeaderValue::from_static("caller%20not%20allowed"),
                        );
                        let frames: Vec<Result<Frame<bytes::Bytes>, std::convert::Infallible>> = vec![
                            Ok(Frame::data(bytes::Bytes::from_static(b"\0\0\0\0\x02hi"))),
                            Ok(Frame::trailers(trailers)),
                        ];
                        let body = StreamBody::new(futures_util::stream::iter(frames));
                        Ok::<_, hyper::Error>(
                            http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                                .unwrap(),
                        )
                    }
                },
            );
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// gRPC through the gateway: its status travels in the response's trailers, which must reach
/// the caller, and its clients send `te: trailers`, which gRPC servers look for to know that
/// no proxy on the way drops trailers (grpc-java warns without it): `te` is hop-by-hop, but
/// `te: trailers` is passed on, as Go's reverse proxy (so GoRouter) and Envoy pass it. Request
/// trailers reach the backend too.
#[tokio::test]
async fn grpc_status_in_trailers_and_te_trailers_pass_through() {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let pki = TestPki::new();
    let (backend, seen) = grpc_backend().await;
    let host = "grpc.apps.plain";
    let gw = h2_backend_gateway(&pki, host, backend).await;
    let tls =
        crate::support::client::tls_connect(gw.https(), &pki.server_ca, Some(host), None, &[b"h2"])
            .await
            .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    for te in [Some("trailers"), None] {
        let mut request_trailers = http::HeaderMap::new();
        request_trailers.insert("x-checksum", http::HeaderValue::from_static("abc"));
        let frames: Vec<Result<Frame<bytes::Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(bytes::Bytes::from_static(b"\0\0\0\0\x01x"))),
            Ok(Frame::trailers(request_trailers)),
        ];
        let mut req = http::Request::post(format!("https://{host}/echo.Echo/Say"))
            .header("content-type", "application/grpc");
        if let Some(te) = te {
            req = req.header("te", te);
        }
        let req = req
            .body(StreamBody::new(futures_util::stream::iter(frames)))
            .unwrap();
        let resp = bounded("grpc call", send.send_request(req)).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = bounded("grpc body", resp.into_body().collect())
            .await
            .unwrap();
        let trailers = body.trailers().cloned().expect("the response's trailers");
        assert_eq!(trailers["grpc-status"], "7");
        assert_eq!(trailers["grpc-message"], "caller%20not%20allowed");
        assert_eq!(&body.to_bytes()[..], b"\0\0\0\0\x02hi");
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.te, [Some("trailers".to_string()), None], "te as sent");
    assert_eq!(
        seen.request_trailers,
        [Some("abc".to_string()), Some("abc".to_string())]
    );
}

/// A backend's response head may be as large over h2 as over HTTP/1.1: an app's large cookies
/// or policy headers (here 24 KiB, above hyper's 16 KiB default for h2) must not turn into a
/// 502 because the app speaks h2. More than 100 header fields in an HTTP/1.1 response is a
/// 502, as HAProxy (101) and Envoy (100) refuse them.
#[tokio::test]
async fn large_response_heads_pass_from_h1_and_h2_backends() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    // An HTTP/1.1 backend: `/wide` answers with 120 header fields, anything else with 24 KiB
    // of them in 24.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h1 = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                // One request head per read: the gateway sends one at a time.
                let mut buf = vec![0u8; 65536];
                loop {
                    let read = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf));
                    let n = match read.await {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => return,
                    };
                    let wide = buf[..n].starts_with(b"GET /wide ");
                    let mut resp = String::from("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n");
                    let (fields, len) = if wide { (120, 1) } else { (24, 1000) };
                    for i in 0..fields {
                        resp += &format!("x-big-{i}: {}\r\n", "v".repeat(len));
                    }
                    resp += "\r\nok";
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    // An h2c backend answering with the same 24 KiB.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h2 = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let svc =
                hyper::service::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
                    let mut r = http::Response::builder();
                    for i in 0..24 {
                        r = r.header(format!("x-big-{i}"), "v".repeat(1000));
                    }
                    Ok::<_, hyper::Error>(
                        r.body(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
                            .unwrap(),
                    )
                });
            tokio::spawn(async move {
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
    let y = format!(
        "backends: {{ca_certs: backend-ca.pem}}\n\
         routes:\n  - {{uris: [big1.apps.plain], host: 127.0.0.1, port: {}}}\n\
         \x20 - {{uris: [big2.apps.plain], host: 127.0.0.1, port: {}, protocol: http2}}\n",
        h1.port(),
        h2.port()
    );
    let gw = TestGateway::start(&pki, &y).await;
    for host in ["big1.apps.plain", "big2.apps.plain"] {
        let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), None, false)
            .await
            .unwrap();
        let r = c.get(host, "/").await.unwrap();
        assert_eq!(r.status, 200, "{host}, h1 client");
        assert_eq!(r.header("x-big-23").map(str::len), Some(1000), "{host}");
        // An h2 client that takes heads this large (hyper's client too refuses more than
        // 16 KiB by default; browsers take 256 KiB).
        let tls = crate::support::client::tls_connect(
            gw.https(),
            &pki.server_ca,
            Some(host),
            None,
            &[b"h2"],
        )
        .await
        .unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .max_header_list_size(256 * 1024)
                .handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get(format!("https://{host}/"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let r = bounded("h2 client", send.send_request(req)).await.unwrap();
        assert_eq!(r.status(), 200, "{host}, h2 client");
        assert_eq!(r.headers()["x-big-23"].len(), 1000, "{host}");
    }
    let mut c = Conn::tls(
        gw.https(),
        &pki.server_ca,
        Some("big1.apps.plain"),
        None,
        false,
    )
    .await
    .unwrap();
    let r = c.get("big1.apps.plain", "/wide").await.unwrap();
    assert_eq!(r.status, 502);
}

/// Trailers reach an HTTP/1.1 client that asks for them (`TE: trailers`), from an HTTP/1.1
/// backend's chunked response as from an h2 one: `Trailer`, the header announcing them, is not
/// hop-by-hop (RFC 9110 §6.6.2), and hyper sends an HTTP/1.1 peer only the trailer fields it
/// announces. An h2 client gets them too.
#[tokio::test]
async fn announced_trailers_reach_http1_and_h2_clients() {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let read = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf));
                    match read.await {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => return,
                    }
                    let resp = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\
                                trailer: x-checksum\r\n\r\n2\r\nok\r\n0\r\nx-checksum: 42\r\n\r\n";
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let host = "trailers.apps.plain";
    let y = format!(
        "backends: {{ca_certs: backend-ca.pem}}\n\
         routes:\n  - {{uris: [{host}], host: 127.0.0.1, port: {}}}\n",
        backend.port()
    );
    let gw = TestGateway::start(&pki, &y).await;
    for h2 in [false, true] {
        let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        let tls = crate::support::client::tls_connect(
            gw.https(),
            &pki.server_ca,
            Some(host),
            None,
            &[alpn],
        )
        .await
        .unwrap();
        let io = TokioIo::new(tls);
        let req = |uri: String| {
            http::Request::get(uri)
                .header("host", host)
                .header("te", "trailers")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap()
        };
        let resp = if h2 {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            send.send_request(req(format!("https://{host}/"))).await
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            send.send_request(req("/".into())).await
        }
        .unwrap();
        assert_eq!(resp.status(), 200);
        let body = bounded("body", resp.into_body().collect()).await.unwrap();
        let trailers = body.trailers().cloned().unwrap_or_default();
        assert_eq!(
            trailers.get("x-checksum").map(|v| v.to_str().unwrap()),
            Some("42"),
            "h2 client {h2}"
        );
        assert_eq!(&body.to_bytes()[..], b"ok");
    }
}

/// A gateway whose one route, `host`, goes to the h2c backend at `backend` (`protocol: http2`).
async fn h2_backend_gateway(
    pki: &TestPki,
    host: &str,
    backend: std::net::SocketAddr,
) -> TestGateway {
    let y = format!(
        "backends: {{ca_certs: backend-ca.pem}}\n\
         access_log: {{path: access.log, extra_fields: [resent]}}\n\
         routes:\n  - {{uris: [{host}], host: 127.0.0.1, port: {}, protocol: http2}}\n",
        backend.port()
    );
    TestGateway::start(pki, &y).await
}

/// An HTTP/1.1 POST of `body` to `host`.
fn post(
    host: &str,
    path: &str,
    body: &'static str,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::post(path)
        .header("host", host)
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            body.as_bytes(),
        )))
        .unwrap()
}

/// An h2 backend (the `h2` crate's server, so each stream's answer is chosen) that answers the
/// first stream on each connection and refuses the next with `REFUSED_STREAM`, as an app at its
/// stream limit or shutting down does. It reads a request's whole body first (a stream whose
/// path starts `/partial`, when refused: only its first DATA frame) and answers with the body it
/// read, or `ok` for none. Returns its address and the streams it saw, by connection, as
/// `METHOD path`.
async fn refusing_h2_backend() -> (
    std::net::SocketAddr,
    Arc<std::sync::Mutex<Vec<Vec<String>>>>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Arc<std::sync::Mutex<Vec<Vec<String>>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let log = log.clone();
            let conn = {
                let mut all = log.lock().unwrap();
                all.push(Vec::new());
                all.len() - 1
            };
            tokio::spawn(async move {
                let Ok(mut h2) = h2::server::handshake(tcp).await else {
                    return;
                };
                let mut answered = false;
                while let Some(Ok((req, mut respond))) = h2.accept().await {
                    let path = req.uri().path().to_string();
                    log.lock().unwrap()[conn].push(format!("{} {path}", req.method()));
                    let refuse = std::mem::replace(&mut answered, true);
                    // Read in a task of its own: the connection moves only while `accept` runs.
                    tokio::spawn(async move {
                        let partial = refuse && path.starts_with("/partial");
                        let mut body = req.into_body();
                        let mut read = Vec::new();
                        while let Some(Ok(d)) = body.data().await {
                            let _ = body.flow_control().release_capacity(d.len());
                            read.extend_from_slice(&d);
                            if partial {
                                break;
                            }
                        }
                        if refuse {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            return;
                        }
                        if read.is_empty() {
                            read.extend_from_slice(b"ok");
                        }
                        let resp = http::Response::new(());
                        if let Ok(mut body) = respond.send_response(resp, false) {
                            let _ = body.send_data(read.into(), true);
                        }
                    });
                }
            });
        }
    });
    (addr, seen)
}

/// A request an h2 backend refused (`REFUSED_STREAM`: not processed) is sent again on a new
/// connection to it, whatever its method, with its body as it was sent (kept up to 64 KiB
/// until the answer); a larger body is not kept, and that request gets 502.
#[tokio::test]
async fn a_request_an_h2_backend_refused_is_sent_again_with_its_body() {
    let pki = TestPki::new();
    let (backend, seen) = refusing_h2_backend().await;
    let host = "refusing.apps.plain";
    let gw = h2_backend_gateway(&pki, host, backend).await;
    let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), None, false)
        .await
        .unwrap();
    let post = |path: &str, body: &'static str| post(host, path, body);
    assert_eq!(c.get(host, "/one").await.unwrap().status, 200);
    let r = c.get(host, "/two").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "ok"), "GET sent again");
    let r = c.send(post("/three", "")).await.unwrap();
    assert_eq!(r.status, 200, "a refused POST without a body is sent again");
    let r = c.send(post("/four", "the body")).await.unwrap();
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "the body"),
        "a refused POST is sent again with its body"
    );
    static BIG: [u8; 100 * 1024] = [b'x'; 100 * 1024];
    let big = http::Request::post("/big")
        .header("host", host)
        .body(http_body_util::Full::new(bytes::Bytes::from_static(&BIG)))
        .unwrap();
    let r = c.send(big).await.unwrap();
    assert_eq!(
        r.status, 502,
        "a body past 64 KiB is not kept to be sent again"
    );
    let seen = seen.lock().unwrap().clone();
    // The shared connection carries every request; each one it refused went once more, on a
    // connection of its own (whose first stream is answered), but for the large body.
    assert_eq!(
        seen,
        [
            vec![
                "GET /one",
                "GET /two",
                "POST /three",
                "POST /four",
                "POST /big"
            ],
            vec!["GET /two"],
            vec!["POST /three"],
            vec!["POST /four"],
        ],
        "streams by backend connection"
    );
    assert_eq!(resends(&gw), [("refused_stream".into(), 3.0)]);
    let lines = gw.log_lines(5).await;
    let logged: Vec<(u16, String)> = lines
        .iter()
        .map(|l| {
            let l = LogLine::parse(l);
            (l.status, l.field("resent").to_string())
        })
        .collect();
    let refused = "refused_stream".to_string();
    assert_eq!(
        logged,
        [
            (200, "-".into()),
            (200, refused.clone()),
            (200, refused.clone()),
            (200, refused),
            (502, "-".into()),
        ],
        "status and resent by request: {lines:#?}"
    );
}

/// A request whose body is still coming when an h2 backend refuses it goes again with what was
/// sent so far, then on with the rest as the client sends it.
#[tokio::test]
async fn a_refused_request_whose_body_is_still_coming_is_sent_again_whole() {
    use http_body_util::BodyExt;
    use hyper::client::conn::http1;
    use hyper_util::rt::TokioIo;
    let pki = TestPki::new();
    let (backend, seen) = refusing_h2_backend().await;
    let host = "refusing.apps.plain";
    let gw = h2_backend_gateway(&pki, host, backend).await;
    // One connection to the gateway (so one worker, and one backend pool).
    let tls = crate::support::client::tls_connect(
        gw.https(),
        &pki.server_ca,
        Some(host),
        None,
        &[b"http/1.1"],
    )
    .await
    .unwrap();
    let (mut s, conn) = http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    // One answered stream first, so that the next is refused.
    let get = http::Request::get("/one")
        .header("host", host)
        .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
        .unwrap();
    let r = bounded("the GET", s.send_request(get)).await.unwrap();
    assert_eq!(r.status(), 200);
    r.into_body().collect().await.unwrap();
    let (mut tx, body) = http_body_util::channel::Channel::<bytes::Bytes, hyper::Error>::new(1);
    let (first, second) = ("sent before the refusal, ", "and after it");
    let req = http::Request::post("/partial")
        .header("host", host)
        .header("content-length", first.len() + second.len())
        .body(body.boxed())
        .unwrap();
    bounded("the connection ready", s.ready()).await.unwrap();
    let answer = tokio::spawn(async move { s.send_request(req).await });
    tx.send_data(first.into()).await.unwrap();
    // The backend reads that much, refuses the stream, and the request arrives again on a new
    // connection; only then does the rest of the body come.
    bounded("the request sent again", async {
        while seen.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    tx.send_data(second.into()).await.unwrap();
    drop(tx);
    let resp = bounded("the answer", answer).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let echoed = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        echoed,
        format!("{first}{second}"),
        "the body the backend read"
    );
    assert_eq!(
        seen.lock().unwrap().clone(),
        [vec!["GET /one", "POST /partial"], vec!["POST /partial"]]
    );
    assert_eq!(resends(&gw), [("refused_stream".into(), 1.0)]);
}

/// HTTP/2 frames by hand, for backends that do what the `h2` crate's server will not.
mod raw_h2 {
    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const SETTINGS: u8 = 4;
    pub const PING: u8 = 6;
    pub const GOAWAY: u8 = 7;
    /// HEADERS' and DATA's flags.
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    /// HPACK: a literal field without indexing, new name, no Huffman coding (RFC 7541 §6.2.2).
    pub fn literal(block: &mut Vec<u8>, name: &str, value: &str) {
        block.push(0);
        block.push(name.len() as u8);
        block.extend(name.as_bytes());
        block.push(value.len() as u8);
        block.extend(value.as_bytes());
    }

    /// A response head: `:status: 200` (static table entry 8) and `x-conn` and `x-stream`
    /// naming the connection and the stream.
    pub fn answer(conn: usize, stream: u32) -> Vec<u8> {
        let mut block = vec![0x88];
        literal(&mut block, "x-conn", &conn.to_string());
        literal(&mut block, "x-stream", &stream.to_string());
        frame(HEADERS, END_HEADERS, stream, &block)
    }

    /// `GOAWAY` with `last` as the last stream processed, `NO_ERROR`.
    pub fn go_away(last: u32) -> Vec<u8> {
        let mut payload = last.to_be_bytes().to_vec();
        payload.extend(0u32.to_be_bytes());
        frame(GOAWAY, 0, 0, &payload)
    }

    /// Reads the client preface and sends the server's SETTINGS, with
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` when `max_streams` is given.
    pub async fn accept<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        io: &mut S,
        max_streams: Option<u32>,
    ) -> std::io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut preface = [0u8; 24];
        io.read_exact(&mut preface).await?;
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let mut settings = Vec::new();
        if let Some(max) = max_streams {
            settings.extend(3u16.to_be_bytes());
            settings.extend(max.to_be_bytes());
        }
        io.write_all(&frame(SETTINGS, 0, 0, &settings)).await
    }

    /// The next frame: its type, flags, stream and payload.
    pub async fn read<S: tokio::io::AsyncRead + Unpin>(
        io: &mut S,
    ) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; 9];
        io.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        io.read_exact(&mut payload).await?;
        Ok((head[3], head[4], stream, payload))
    }

    /// What a connection must answer, whatever the backend does with requests: SETTINGS and
    /// PING are acknowledged. `None` for a frame that needs no answer.
    pub fn ack(kind: u8, flags: u8, payload: &[u8]) -> Option<Vec<u8>> {
        match kind {
            SETTINGS if flags & 1 == 0 => Some(frame(SETTINGS, 1, 0, &[])),
            PING if flags & 1 == 0 => Some(frame(PING, 1, 0, payload)),
            _ => None,
        }
    }
}

/// An h2 backend written frame by frame, so that its `GOAWAY` can leave out a stream it has
/// received (the `h2` crate's server counts every stream it has read as processed): on each
/// connection it answers stream 1 (`200`, `x-conn` and `x-stream` naming the connection, from
/// 0, and the stream) and meets any later stream with `GOAWAY` (last stream 1, `NO_ERROR`), as a
/// server shutting down, or one that ends its connections after so many requests, does. Returns
/// its address and the stream ids it received, by connection.
async fn going_away_h2_backend() -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<Vec<u32>>>>) {
    use raw_h2::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Arc<std::sync::Mutex<Vec<Vec<u32>>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            let log = log.clone();
            let conn = {
                let mut all = log.lock().unwrap();
                all.push(Vec::new());
                all.len() - 1
            };
            tokio::spawn(tokio::time::timeout(Duration::from_secs(10), async move {
                accept(&mut tcp, None).await?;
                loop {
                    let (kind, flags, stream, payload) = read(&mut tcp).await?;
                    if let Some(ack) = ack(kind, flags, &payload) {
                        tcp.write_all(&ack).await?;
                    }
                    if kind != HEADERS {
                        continue;
                    }
                    log.lock().unwrap()[conn].push(stream);
                    if stream != 1 {
                        tcp.write_all(&go_away(1)).await?;
                        // Nothing more is read: the gateway ends the connection.
                        tcp.shutdown().await?;
                        tcp.read_to_end(&mut Vec::new()).await?;
                        return Ok::<_, std::io::Error>(());
                    }
                    tcp.write_all(&answer(conn, stream)).await?;
                    tcp.write_all(&frame(DATA, END_STREAM, stream, b"ok"))
                        .await?;
                }
            }));
        }
    });
    (addr, seen)
}

/// A request whose stream an h2 backend's `GOAWAY` left out (not processed) is sent again on a
/// new connection to it, whatever its method, with its body.
#[tokio::test]
async fn a_request_an_h2_backend_went_away_without_is_sent_again() {
    let pki = TestPki::new();
    let (backend, seen) = going_away_h2_backend().await;
    let host = "going-away.apps.plain";
    let gw = h2_backend_gateway(&pki, host, backend).await;
    let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), None, false)
        .await
        .unwrap();
    let post = |path: &str, body: &'static str| post(host, path, body);
    let answered_by = |r: &crate::support::client::Resp| {
        let h = |n: &str| r.headers.get(n).map(|v| v.to_str().unwrap().to_string());
        (r.status, h("x-conn"), h("x-stream"))
    };
    let s = |v: &str| Some(v.to_string());
    let r = c.get(host, "/one").await.unwrap();
    assert_eq!(answered_by(&r), (200, s("0"), s("1")));
    let r = c.get(host, "/two").await.unwrap();
    assert_eq!(
        answered_by(&r),
        (200, s("1"), s("1")),
        "a GET the GOAWAY left out, sent again on a new connection"
    );
    assert_eq!(r.body, "ok");
    // The connection it was sent again on is the shared one now, so the next request goes on
    // it and is left out in turn.
    let r = c.get(host, "/three").await.unwrap();
    assert_eq!(answered_by(&r), (200, s("2"), s("1")));
    let r = c.send(post("/four", "x")).await.unwrap();
    assert_eq!(
        answered_by(&r),
        (200, s("3"), s("1")),
        "a POST with a body the GOAWAY left out is sent again"
    );
    let r = c.get(host, "/five").await.unwrap();
    assert_eq!(answered_by(&r), (200, s("4"), s("1")));
    let r = c.send(post("/six", "")).await.unwrap();
    assert_eq!(
        answered_by(&r),
        (200, s("5"), s("1")),
        "a POST without a body the GOAWAY left out is sent again"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            vec![1, 3],
            vec![1, 3],
            vec![1, 3],
            vec![1, 3],
            vec![1, 3],
            vec![1]
        ],
        "streams by backend connection: each second stream was left out, and sent again on the \
         next connection"
    );
    assert_eq!(resends(&gw), [("go_away".into(), 5.0)]);
}

/// A request a backend received: its connection, stream and method.
type Received = (usize, u32, &'static str);

/// An h2 backend whose GETs are long-running (a gRPC or event stream): a GET's answer has a body
/// (`a`, then `b`) that ends only once a POST has been answered on some connection, or after
/// 5 s; a POST is answered at once (`ok`). Answers carry `x-conn` and `x-stream`. With
/// `drain`, a GET is met with `GOAWAY` (last stream: the GET's) before its answer, as a server
/// shutting down gracefully, or a gRPC server at its `MaxConnectionAge`, drains its connections.
/// With `max_streams`, its SETTINGS announce that stream limit. Returns its address and the
/// `(connection, stream, method)` of every request it received.
async fn long_running_h2_backend(
    drain: bool,
    max_streams: Option<u32>,
) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<Received>>>) {
    use raw_h2::*;
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Arc<std::sync::Mutex<Vec<Received>>> = Arc::default();
    let log = seen.clone();
    let posted = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(async move {
        let mut conns = 0;
        while let Ok((tcp, _)) = l.accept().await {
            let (log, posted, conn) = (log.clone(), posted.clone(), conns);
            conns += 1;
            tokio::spawn(tokio::time::timeout(Duration::from_secs(10), async move {
                let (mut rd, mut wr) = tcp.into_split();
                accept(&mut tokio::io::join(&mut rd, &mut wr), max_streams).await?;
                let wr = Arc::new(tokio::sync::Mutex::new(wr));
                loop {
                    let (kind, flags, stream, payload) = read(&mut rd).await?;
                    if let Some(ack) = ack(kind, flags, &payload) {
                        wr.lock().await.write_all(&ack).await?;
                    }
                    if kind != HEADERS {
                        continue;
                    }
                    // `:method` comes first, from HPACK's static table: 2 is GET, 3 is POST.
                    let method = match payload.first() {
                        Some(0x82) => "GET",
                        Some(0x83) => "POST",
                        other => panic!("a request head starting {other:?}"),
                    };
                    log.lock().unwrap().push((conn, stream, method));
                    let mut w = wr.lock().await;
                    if method == "POST" {
                        w.write_all(&answer(conn, stream)).await?;
                        w.write_all(&frame(DATA, END_STREAM, stream, b"ok")).await?;
                        posted.notify_one();
                        continue;
                    }
                    if drain {
                        w.write_all(&go_away(stream)).await?;
                    }
                    w.write_all(&answer(conn, stream)).await?;
                    w.write_all(&frame(DATA, 0, stream, b"a")).await?;
                    let (wr, posted) = (wr.clone(), posted.clone());
                    tokio::spawn(async move {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(5), posted.notified()).await;
                        let end = frame(DATA, END_STREAM, stream, b"b");
                        let _ = wr.lock().await.write_all(&end).await;
                    });
                }
                #[allow(unreachable_code)]
                Ok::<_, std::io::Error>(())
            }));
        }
    });
    (addr, seen)
}

/// On one h2 connection to the gateway (so one worker, and one backend pool): a GET whose
/// long-running answer has begun (its first byte read), then a POST while it runs. Returns the
/// backend connection that answered the GET, the POST's answer and the rest of the GET's body.
async fn post_while_a_get_runs(
    gw: &TestGateway,
    pki: &TestPki,
    host: &str,
) -> (String, crate::support::client::Resp, bytes::Bytes) {
    use http_body_util::{BodyExt, Full};
    let c = Conn::tls(gw.https(), &pki.server_ca, Some(host), None, true)
        .await
        .unwrap();
    let Conn::H2(mut sender) = c else {
        unreachable!()
    };
    let req = http::Request::get(format!("https://{host}/stream"))
        .body(Full::default())
        .unwrap();
    let resp = bounded("the GET", sender.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let get_conn = resp.headers()["x-conn"].to_str().unwrap().to_string();
    let mut body = resp.into_body();
    let first = bounded("the GET's first byte", body.frame())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "a");
    let post = http::Request::post(format!("https://{host}/call"))
        .body(Full::new(bytes::Bytes::from_static(b"the request's body")))
        .unwrap();
    let r = Conn::H2(sender.clone()).send(post).await.unwrap();
    let rest = bounded("the GET's end", body.collect())
        .await
        .unwrap()
        .to_bytes();
    (get_conn, r, rest)
}

/// The backend connection a response names (`x-conn`).
fn answered_on(r: &crate::support::client::Resp) -> Option<&str> {
    r.headers.get("x-conn").map(|v| v.to_str().unwrap())
}

/// A request that arrives while the backend's shared h2 connection is going away (`GOAWAY`
/// received, a response still running on it) is sent on a new connection, body and all, and the
/// running response ends as the backend sends it.
#[tokio::test]
async fn a_request_arriving_while_an_h2_backend_goes_away_takes_a_new_connection() {
    let pki = TestPki::new();
    let (backend, seen) = long_running_h2_backend(true, None).await;
    let host = "draining.apps.plain";
    let gw = h2_backend_gateway(&pki, host, backend).await;
    // The GET's answer comes after the GOAWAY, on the same connection: once it has begun, the
    // gateway has read the GOAWAY too.
    let (get_conn, post, rest) = post_while_a_get_runs(&gw, &pki, host).await;
    assert_eq!(get_conn, "0");
    assert_eq!(
        (post.status, answered_on(&post), post.body.as_str()),
        (200, Some("1"), "ok"),
        "the POST went on a new connection"
    );
    assert_eq!(
        rest, "b",
        "the response running on the connection going away ended"
    );
    assert_eq!(
        seen.lock().unwrap().clone(),
        [(0, 1, "GET"), (1, 1, "POST")],
        "no request was sent on the connection after its GOAWAY"
    );
    // The pool offered the connection going away, and hyper handed the request back unsent.
    assert_eq!(resends(&gw), [("stale_connection".into(), 1.0)]);
}

/// An h2 backend that takes one stream at a time (`SETTINGS_MAX_CONCURRENT_STREAMS` 1, as a gRPC
/// server started with a low `MaxConcurrentStreams`): a request that arrives while a
/// long-running one holds that stream goes on another connection, where it would otherwise
/// wait on the first behind the running one.
#[tokio::test]
async fn an_h2_backends_stream_limit_opens_another_connection() {
    let pki = TestPki::new();
    let (backend, seen) = long_running_h2_backend(false, Some(1)).await;
    let host = "one-stream.apps.plain";
    let gw = h2_backend_gateway(&pki, host, backend).await;
    // The backend's SETTINGS come before the GET's first byte, on the same connection.
    let (get_conn, post, rest) = post_while_a_get_runs(&gw, &pki, host).await;
    assert_eq!(get_conn, "0");
    // Queued on the first connection, the POST would have waited there until the GET's answer
    // gave up on it (5 s), and gone out as stream 3 of connection 0.
    assert_eq!(
        (post.status, answered_on(&post), post.body.as_str()),
        (200, Some("1"), "ok"),
        "the POST went on a second connection"
    );
    assert_eq!(rest, "b");
    assert_eq!(
        seen.lock().unwrap().clone(),
        [(0, 1, "GET"), (1, 1, "POST")]
    );
    assert_eq!(resends(&gw), [], "nothing was sent twice");
}
