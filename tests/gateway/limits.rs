//! Limits a production gateway needs: header size, handshake deadline, idle connections.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis::echo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::route;
use crate::support::client::{streaming, Answer, BodySender, Conn};
use crate::support::gateway::{LogLine, TestGateway};
use crate::support::pki::TestPki;

async fn gateway(pki: &TestPki) -> TestGateway {
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let mut y = String::from(
        "tls:\n  certificates: [{cert_chain: server.pem, private_key: server.key}]\n  handshake_timeout: 1s\n\
         limits: {max_header_bytes: 8192, idle_timeout: 1s}\naccess_log: {path: access.log}\nroutes:\n",
    );
    y += &route("open.apps.plain", backend.addr, "app_id: x", "");
    TestGateway::start(pki, &y).await
}

/// A request head over `limits.max_header_bytes` gets 431 over HTTP/1.1 (hyper's answer) and
/// HTTP/2. An h2 header list up to twice the limit gets the gateway's own 431, logged, on a
/// stream of a connection that goes on serving; a larger one is the `h2` crate's stream reset,
/// which leaves the connection serving too.
#[tokio::test]
async fn oversized_headers_get_431() {
    let pki = TestPki::new();
    let gw = gateway(&pki).await;
    let conn = |h2| {
        Conn::tls(
            gw.https(),
            &pki.server_ca,
            Some("open.apps.plain"),
            None,
            h2,
        )
    };
    let mut c = conn(false).await.unwrap();
    let big = "x".repeat(20_000);
    let req = c.build("open.apps.plain", "/", &[("x-big", &big)]);
    assert_eq!(c.send(req).await.unwrap().status, 431);
    gw.wait_metric(
        "portcullis_client_connection_errors_total{kind=\"unparsed_head\"}",
        1.0,
    )
    .await;
    let lines = gw.log_lines(1).await;
    let l = LogLine::parse(&lines[0]);
    assert_eq!((l.request.as_str(), l.status), ("- - HTTP/1.1", 431));
    assert_eq!(l.field("x_cf_routererror"), "headers_too_large");

    let mut c = conn(true).await.unwrap();
    // 8,192 bytes of header list (RFC 9113 §6.5.2: name, value and 32 per field, the four
    // pseudo-header fields included) is the most that is taken.
    let pseudo = [
        ":method".len() + "GET".len(),
        ":scheme".len() + "https".len(),
        ":authority".len() + "open.apps.plain".len(),
        ":path".len() + "/fits".len(),
    ];
    let fill = 8192 - pseudo.iter().map(|n| n + 32).sum::<usize>() - ("x-big".len() + 32);
    let fits = "f".repeat(fill);
    let req = c.build("open.apps.plain", "/fits", &[("x-big", &fits)]);
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().headers["x-big"].len(), fill);
    let over = "o".repeat(fill + 1);
    let req = c.build("open.apps.plain", "/over", &[("x-big", &over)]);
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 431);
    assert_eq!(r.header("x-cf-routererror"), Some("headers_too_large"));
    // Past twice the limit, the h2 crate answers 431 and resets the stream before the gateway
    // sees it (not logged).
    let req = c.build("open.apps.plain", "/far-over", &[("x-big", &big)]);
    assert_eq!(c.send(req).await.unwrap().status, 431);
    // The connection serves on.
    assert_eq!(
        c.get("open.apps.plain", "/after").await.unwrap().status,
        200
    );
    let lines = gw.log_lines(4).await;
    let got: Vec<_> = lines[1..]
        .iter()
        .map(|l| {
            let l = LogLine::parse(l);
            let why = l.field("x_cf_routererror").to_string();
            (l.request, l.status, why)
        })
        .collect();
    let want = |r: &str, s, w: &str| (r.to_string(), s, w.to_string());
    assert_eq!(
        got,
        [
            want("GET /fits HTTP/2.0", 200, "-"),
            want("GET /over HTTP/2.0", 431, "headers_too_large"),
            want("GET /after HTTP/2.0", 200, "-"),
        ]
    );
    assert_eq!(gw.metric("portcullis_requests_total{code=\"431\"}"), 2.0);
}

/// A client that never finishes its request head (slowloris) is cut at
/// `limits.header_read_timeout`, however it keeps its connection busy, and counted; one that
/// gives up half way is counted apart.
#[tokio::test]
async fn a_request_head_that_never_ends_is_cut_at_the_header_read_timeout() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let mut y = String::from(
        "tls:\n  certificates: [{cert_chain: server.pem, private_key: server.key}]\n\
         limits: {header_read_timeout: 1s}\nroutes:\n",
    );
    y += &route("open.apps.plain", backend.addr, "app_id: x", "");
    let gw = TestGateway::start(&pki, &y).await;
    // A TLS connection that has sent the first lines of a request head.
    let half_a_head = || async {
        let mut tls = h1_tls(&gw, &pki).await.unwrap();
        tls.write_all(b"GET / HTTP/1.1\r\nHost: open.apps.plain\r\n")
            .await
            .unwrap();
        tls
    };
    let started = Instant::now();
    let mut tls = half_a_head().await;
    // A header line every 300 ms, never the blank line that ends the head.
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            tokio::select! {
                read = tls.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                _ = tokio::time::sleep(Duration::from_millis(300)) => {
                    if tls.write_all(b"X-Slow: 1\r\n").await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await;
    let took = started.elapsed();
    assert!(closed.is_ok(), "still open after {took:?}");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    gw.wait_metric(
        "portcullis_client_connection_errors_total{kind=\"header_timeout\"}",
        1.0,
    )
    .await;
    // One that ends its connection (close_notify) in the middle of a head is counted apart.
    half_a_head().await.shutdown().await.unwrap();
    gw.wait_metric(
        "portcullis_client_connection_errors_total{kind=\"incomplete_request\"}",
        1.0,
    )
    .await;
    assert_eq!(backend.requests(), 0);
}

/// A new HTTP/1.1 TLS connection to the gateway, for `open.apps.plain`.
async fn h1_tls(
    gw: &TestGateway,
    pki: &TestPki,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let (sni, alpn): (_, &[&[u8]]) = (Some("open.apps.plain"), &[b"http/1.1"]);
    crate::support::client::tls_connect(gw.https(), &pki.server_ca, sni, None, alpn).await
}

/// Sends a POST for `host` with a body of `len` bytes on a new TLS connection, all of it, then
/// reads the answer to the end of the stream. Fails if a write fails: the gateway reset the
/// connection while the body was still coming.
async fn post_then_read(
    gw: &TestGateway,
    pki: &TestPki,
    host: &str,
    path: &str,
    len: usize,
) -> std::io::Result<String> {
    let mut tls = h1_tls(gw, pki).await?;
    let head = format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len}\r\n\r\n");
    tls.write_all(head.as_bytes()).await?;
    let chunk = vec![b'x'; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        tls.write_all(&chunk[..n]).await?;
        left -= n;
    }
    tls.flush().await?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// An answer given before the request body was read reaches a client that writes its whole body
/// before it reads (curl, most simple clients), over HTTP/1.1: the gateway's own (a 404) and an
/// app's (the echo backend answers at once and closes its connection with the body unread,
/// which resets it); the app's over h2 too. The gateway reads and discards the rest of the body before it closes
/// (`limits.linger_timeout`) rather than resetting the connection under its answer, and takes
/// the app's answer from a connection the app reset while the body was being written rather
/// than answering 502. The discarding is bounded: a client that goes on sending after the
/// answer is cut at `linger_timeout`.
#[tokio::test]
async fn an_answer_given_before_the_body_was_read_reaches_the_client() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let mut y = String::from(
        "tls:\n  certificates: [{cert_chain: server.pem, private_key: server.key}]\n\
         access_log: {path: access.log}\nroutes:\n",
    );
    y += &route("open.apps.plain", backend.addr, "app_id: x", "");
    let gw = TestGateway::start(&pki, &y).await;
    // A connection closed with nothing left to discard is not a lingering close.
    {
        let mut tls = h1_tls(&gw, &pki).await.unwrap();
        let head = "GET / HTTP/1.1\r\nHost: open.apps.plain\r\nConnection: close\r\n\r\n";
        tls.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer).await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200 "));
    }
    // 32 MiB: more than loopback's socket buffers take in flight.
    let big = 32 << 20;
    let answer = post_then_read(&gw, &pki, "nowhere.apps.plain", "/", big)
        .await
        .expect("the body is taken to its end");
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");
    for _ in 0..5 {
        let answer = post_then_read(&gw, &pki, "open.apps.plain", "/early", big)
            .await
            .expect("the body is taken to its end");
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(answer.contains(r#""path": "/early""#), "{answer}");
    }
    // Over h2 the stream ends after the answer (RST_STREAM NO_ERROR); the app's answer still
    // has to come from the connection it reset.
    for _ in 0..5 {
        let (mut tx, answer) =
            streaming_post(&gw, &pki, "open.apps.plain", "/early", big, true).await;
        tokio::spawn(async move {
            let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
            for _ in 0..big / chunk.len() {
                if tx.send_data(chunk.clone()).await.is_err() {
                    return;
                }
            }
        });
        assert_eq!(answer.await.unwrap().unwrap().status(), 200);
    }
    let lines = gw.log_lines(12).await;
    let statuses: Vec<u16> = lines.iter().map(|l| LogLine::parse(l).status).collect();
    assert_eq!(
        statuses,
        [200, 404, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200]
    );
    assert_eq!(backend.requests(), 11);
    assert_eq!(
        gw.metric("portcullis_backend_errors_total{kind=\"send\"}"),
        0.0
    );
    // Each HTTP/1.1 answer was followed by a lingering close that the client ended.
    let lingered = "portcullis_client_lingering_closes_total{outcome=\"client_closed\"}";
    gw.wait_metric(lingered, 6.0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gw.metric(lingered), 6.0);
    drop(gw);

    // Bounded: one that declares 1 TiB and goes on sending after its answer is cut after
    // `linger_timeout`.
    let mut y = String::from(
        "tls:\n  certificates: [{cert_chain: server.pem, private_key: server.key}]\n\
         limits: {linger_timeout: 1s}\naccess_log: {path: access.log}\nroutes:\n",
    );
    y += &route("open.apps.plain", backend.addr, "app_id: x", "");
    let gw = TestGateway::start(&pki, &y).await;
    let started = Instant::now();
    let tib = 1 << 40;
    let sent = tokio::time::timeout(
        Duration::from_secs(10),
        post_then_read(&gw, &pki, "nowhere.apps.plain", "/", tib),
    )
    .await
    .expect("cut before 10 s");
    let took = started.elapsed();
    assert!(sent.is_err(), "{took:?} {sent:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert_eq!(LogLine::parse(&gw.log_lines(1).await[0]).status, 404);
    gw.wait_metric(
        "portcullis_client_lingering_closes_total{outcome=\"timeout\"}",
        1.0,
    )
    .await;
    assert_eq!(
        gw.metric("portcullis_client_lingering_closes_total{outcome=\"client_closed\"}"),
        0.0
    );
}

/// An app that answers before it has the whole body and then neither reads the rest nor closes
/// its connection. Once its answer has ended with the body not all sent, the gateway closes the
/// backend connection (as Go's transport, so GoRouter, does) and drops the rest of the body:
/// the answer reaches a client that writes its whole body before it reads (over HTTP/1.1, after
/// the gateway read and discarded the rest), and an h2 client's stream ends. Without that the
/// write to the app waits on it for ever, and the client's upload with it.
#[tokio::test]
async fn an_app_that_answers_early_and_stops_reading_does_not_hold_the_request() {
    let pki = TestPki::new();
    let (app, mut conns) = stuck_app().await;
    let mut y = String::from(
        "tls:\n  certificates: [{cert_chain: server.pem, private_key: server.key}]\n\
         access_log: {path: access.log}\nroutes:\n",
    );
    y += &route("stuck.apps.plain", app, "app_id: x", "");
    let gw = TestGateway::start(&pki, &y).await;
    let big = 32 << 20;
    uploads_answered_early(&gw, &pki, big, "http1").await;
    // Each request had a connection of its own (none went back to the pool), and the gateway
    // closed both: the app, reading at last, finds the end of each well short of the body.
    for _ in 0..2 {
        let (conn, release) = conns.recv().await.unwrap();
        release.send(()).unwrap();
        let read = tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the gateway closed the app's connection")
            .unwrap();
        assert!(read < big, "{read}");
    }
    assert!(conns.try_recv().is_err(), "a third connection");
    let lines = gw.log_lines(2).await;
    let statuses: Vec<u16> = lines.iter().map(|l| LogLine::parse(l).status).collect();
    assert_eq!(statuses, [413, 413]);
}

/// Two uploads of `big` bytes to `stuck.apps.plain`, whose app answers 413 at once and then
/// holds the request: an HTTP/1.1 client that writes its whole body before it reads gets the
/// answer within 10 s, and so does an h2 client, whose body sender is then ended.
async fn uploads_answered_early(gw: &TestGateway, pki: &TestPki, big: usize, protocol: &str) {
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        post_then_read(gw, pki, "stuck.apps.plain", "/up", big),
    )
    .await
    .expect("answered while the app still holds the request")
    .expect("the body is taken to its end");
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.ends_with("large"), "{answer}");
    let (mut tx, answer) = streaming_post(gw, pki, "stuck.apps.plain", "/up", big, true).await;
    let sender = tokio::spawn(async move {
        let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
        for _ in 0..big / chunk.len() {
            if tx.send_data(chunk.clone()).await.is_err() {
                return;
            }
        }
    });
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("answered")
        .unwrap()
        .unwrap();
    assert_eq!(answer.status(), 413);
    tokio::time::timeout(Duration::from_secs(10), sender)
        .await
        .expect("the h2 stream's body is ended, not left waiting")
        .unwrap();
    // Both counted, under the backend connection's protocol, so an operator can tell an app
    // that answers before it reads.
    let early = |p: &str| format!("portcullis_backend_early_answers_total{{protocol=\"{p}\"}}");
    gw.wait_metric(&early(protocol), 2.0).await;
    let other = if protocol == "http1" {
        "http2"
    } else {
        "http1"
    };
    assert_eq!(gw.metric(&early(other)), 0.0);
}

/// The same app over h2 (`protocol: http2`, as gRPC apps are routed): it answers each stream
/// with a 413 at once and then neither reads the rest of the request, nor gives it flow-control
/// window, nor resets the stream, as RFC 9113 §8.1 asks. The backend connection is shared, so it
/// stays open; the client's upload is let go all the same, and the gateway resets the stream
/// (`CANCEL`, as Go's transport does) once the app takes anything more of it. Nothing past the
/// answer reaches the app as the body's end. Until then the stream still counts against the
/// app's `SETTINGS_MAX_CONCURRENT_STREAMS` (1 here), so the next request goes on a new
/// connection rather than waiting behind it, and once both are reset a later request finds room
/// on one of the two. Whether a stream stays open at all depends on a race (was the gateway
/// waiting on the client or on the app when the answer ended?), so
/// `pool::tests::an_h2_stream_left_with_its_body_unsent_keeps_its_place` shows that part alone.
/// One worker: each has a pool of its own, so with two a request that lands on the other opens
/// a connection of its own (a third here, about one run in thirty).
#[tokio::test]
async fn an_h2_app_that_answers_early_and_stops_reading_does_not_hold_the_request() {
    let pki = TestPki::new();
    let (app, mut streams, accepted) = stuck_h2_app().await;
    let mut y = String::from(
        "tls:\n  certificates: [{cert_chain: server.pem, private_key: server.key}]\n\
         limits: {workers: 1}\naccess_log: {path: access.log}\nroutes:\n",
    );
    y += &format!(
        "  - {{uris: [stuck.apps.plain], host: 127.0.0.1, port: {}, protocol: http2}}\n",
        app.port()
    );
    let gw = TestGateway::start(&pki, &y).await;
    let big = 32 << 20;
    uploads_answered_early(&gw, &pki, big, "http2").await;
    // The app, reading at last, finds each stream reset by the gateway well short of the body.
    for _ in 0..2 {
        let mut body = tokio::time::timeout(Duration::from_secs(10), streams.recv())
            .await
            .expect("a stream")
            .unwrap();
        let mut read = 0;
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match body.data().await {
                    Some(Ok(d)) => {
                        read += d.len();
                        let _ = body.flow_control().release_capacity(d.len());
                    }
                    Some(Err(e)) => return Some(e),
                    None => return None,
                }
            }
        })
        .await
        .expect("the stream ends once the app reads");
        let reason = end.and_then(|e| e.reason());
        assert_eq!(reason, Some(h2::Reason::CANCEL), "after {read} bytes");
        assert!(read < big, "{read}");
    }
    // The route goes on serving.
    let mut c = h1_tls(&gw, &pki).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: stuck.apps.plain\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 413 "));
    // A stream's place is given back once it is reset: the GET needed no third connection.
    let n = accepted.load(Ordering::Relaxed);
    assert!((1..=2).contains(&n), "{n} backend connections");
    let lines = gw.log_lines(3).await;
    let statuses: Vec<u16> = lines.iter().map(|l| LogLine::parse(l).status).collect();
    assert_eq!(statuses, [413, 413, 413]);
    // The GET's answer came with all of its (empty) body sent: not an early answer.
    assert_eq!(
        gw.metric("portcullis_backend_early_answers_total{protocol=\"http2\"}"),
        2.0
    );
}

/// An h2c app that answers every stream at once with a 413 and keeps the request body unread,
/// one stream at a time on a connection (`SETTINGS_MAX_CONCURRENT_STREAMS` 1): each stream's body
/// is handed to the test as the stream comes. The count is of the connections it accepted.
async fn stuck_h2_app() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<h2::RecvStream>,
    Arc<AtomicUsize>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = h2::server::Builder::new()
                    .max_concurrent_streams(1)
                    .handshake(s);
                let Ok(mut conn) = handshake.await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let answer = http::Response::builder()
                        .status(413)
                        .header("content-length", "5")
                        .body(())
                        .unwrap();
                    if let Ok(mut out) = respond.send_response(answer, false) {
                        let _ = out.send_data(bytes::Bytes::from_static(b"large"), true);
                    }
                    let _ = tx.send(req.into_body());
                }
            });
        }
    });
    (addr, rx, accepted)
}

/// An app's connection held by [`stuck_app`]: the task that, once released, reads to the end of
/// the stream and returns how many bytes of body it found, and its release.
type HeldConn = (
    tokio::task::JoinHandle<usize>,
    tokio::sync::oneshot::Sender<()>,
);

/// An app that answers every request at once with a 413 and then neither reads the rest of the
/// request nor closes its connection until the test releases it. Each connection it accepts is
/// reported as it comes.
async fn stuck_app() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<HeldConn>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (release, released) = tokio::sync::oneshot::channel::<()>();
            let conn = tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return 0,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 5\r\n\r\nlarge";
                s.write_all(answer).await.unwrap();
                let _ = released.await;
                let body_start = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                let mut read = head.len() - body_start;
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    read += n;
                }
                read
            });
            if tx.send((conn, release)).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn silent_clients_are_dropped_at_the_handshake_deadline() {
    let pki = TestPki::new();
    let gw = gateway(&pki).await;
    let started = Instant::now();
    let mut tcp = TcpStream::connect(gw.https()).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("closed by the gateway");
    assert!(matches!(n, Ok(0) | Err(_)));
    assert!(started.elapsed() >= Duration::from_millis(900));
    gw.wait_metric(
        "portcullis_tls_handshakes_total{domain=\"-\",result=\"timeout\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let pki = TestPki::new();
    let gw = gateway(&pki).await;
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
        assert_eq!(c.get("open.apps.plain", "/").await.unwrap().status, 200);
        // Activity keeps it open…
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(c.get("open.apps.plain", "/").await.unwrap().status, 200);
        }
        // …silence past idle_timeout closes it.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(c.get("open.apps.plain", "/").await.is_err(), "h2={h2}");
    }
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_slot() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let mut y = String::from("limits: {max_connections: 1}\nroutes:\n");
    y += &route("open.apps.plain", backend.addr, "app_id: x", "");
    let gw = TestGateway::start(&pki, &y).await;
    let ca = &pki.server_ca;
    let mut first = Conn::tls(gw.https(), ca, Some("open.apps.plain"), None, false)
        .await
        .unwrap();
    assert_eq!(first.get("open.apps.plain", "/").await.unwrap().status, 200);
    // The only slot is taken: a second handshake does not even start.
    let waiting = tokio::time::timeout(
        Duration::from_millis(800),
        Conn::tls(gw.https(), ca, Some("open.apps.plain"), None, false),
    )
    .await;
    assert!(
        waiting.is_err(),
        "second connection was served beyond the limit"
    );
    drop(first);
    let mut second = crate::support::bounded(
        "slot freed",
        Conn::tls(gw.https(), ca, Some("open.apps.plain"), None, false),
    )
    .await
    .unwrap();
    assert_eq!(
        second.get("open.apps.plain", "/").await.unwrap().status,
        200
    );
}

/// Every worker accepts from the same listening sockets and whichever wakes first takes the
/// connection, so connections could pile up on one worker (a load generator's 64 did: one
/// worker served nearly three times the other's, its core full while the other idled). A
/// worker that accepts while another serves fewer hands the connection over: opened one after
/// another, connections alternate, and after some close, new ones go to the worker that lost
/// them, over either listener. Each is served where it was counted, and the counts
/// (`portcullis_worker_connections`) return to zero as connections close.
#[tokio::test]
async fn new_connections_go_to_the_worker_serving_fewest() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let mut y = String::from("limits: {workers: 2}\nroutes:\n");
    y += &route("open.apps.plain", backend.addr, "app_id: x", "");
    let gw = TestGateway::start(&pki, &y).await;
    let ca = &pki.server_ca;
    let load = |w: usize| gw.metric(&format!("portcullis_worker_connections{{worker=\"{w}\"}}"));
    let loads = || (load(0), load(1));
    assert_eq!(loads(), (0.0, 0.0));

    // Six connections one after another, HTTP/1.1 and h2 in turn: each lands on the worker
    // serving fewer, so the counts never differ by more than one.
    let mut on = [Vec::new(), Vec::new()];
    for i in 0..6 {
        let before = loads();
        let mut c = Conn::tls(gw.https(), ca, Some("open.apps.plain"), None, i % 2 == 1)
            .await
            .unwrap();
        assert_eq!(c.get("open.apps.plain", "/").await.unwrap().status, 200);
        let after = loads();
        let worker = match (after.0 - before.0, after.1 - before.1) {
            (1.0, 0.0) => 0,
            (0.0, 1.0) => 1,
            d => panic!("connection {i} changed the counts by {d:?}: {before:?} → {after:?}"),
        };
        assert!(
            (after.0 - after.1).abs() <= 1.0,
            "connection {i} went to worker {worker}: {after:?}"
        );
        on[worker].push(c);
    }
    assert_eq!(loads(), (3.0, 3.0));

    // Worker 0's three close: the next three go to it, whichever worker accepts them, the last
    // over the plain listener.
    on[0].clear();
    gw.wait_metric("portcullis_worker_connections{worker=\"0\"}", 0.0)
        .await;
    for i in 0..3 {
        let mut c = if i < 2 {
            Conn::tls(gw.https(), ca, Some("open.apps.plain"), None, i == 1)
                .await
                .unwrap()
        } else {
            Conn::plain(gw.http()).await.unwrap()
        };
        assert_eq!(c.get("open.apps.plain", "/").await.unwrap().status, 200);
        assert_eq!(loads(), (f64::from(i + 1), 3.0), "new connection {i}");
        on[0].push(c);
    }
    // Every connection still serves, on both workers.
    for c in on.iter_mut().flatten() {
        assert_eq!(c.get("open.apps.plain", "/").await.unwrap().status, 200);
    }
    drop(on);
    gw.wait_metric("portcullis_worker_connections{worker=\"0\"}", 0.0)
        .await;
    gw.wait_metric("portcullis_worker_connections{worker=\"1\"}", 0.0)
        .await;
    gw.wait_metric("portcullis_connections_active", 0.0).await;
}

/// The backlog `ss` shows for the listener on `addr` (Send-Q of a LISTEN socket).
fn listen_backlog(addr: std::net::SocketAddr) -> u32 {
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", addr.port())])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(&addr.to_string()))
        .unwrap_or_else(|| panic!("no listener on {addr} in: {text}"));
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// Listeners queue `limits.listen_backlog` connections (4096 unless set; capped by the kernel's
/// `net.core.somaxconn`), not the 128 of Rust's and tokio's listeners: a burst larger than the
/// SYN queue turns the kernel to SYN cookies, and one larger than the accept queue is dropped.
/// The backlog cannot change on reload.
#[tokio::test]
async fn listeners_use_the_configured_backlog() {
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pki = TestPki::new();
    let gw = TestGateway::start(&pki, "").await;
    assert_eq!(listen_backlog(gw.https()), 4096.min(somaxconn));
    assert_eq!(listen_backlog(gw.http()), 4096.min(somaxconn));

    let gw = TestGateway::start(&pki, "limits: {listen_backlog: 300}\n").await;
    assert_eq!(listen_backlog(gw.https()), 300);
    assert_eq!(listen_backlog(gw.http()), 300);
    std::fs::write(
        gw.config_path(),
        std::fs::read_to_string(gw.config_path())
            .unwrap()
            .replace("listen_backlog: 300", "listen_backlog: 600"),
    )
    .unwrap();
    let config = portcullis::config::Config::load(&gw.config_path()).unwrap();
    let err = gw.gw.reload(config).unwrap_err();
    assert_eq!(
        err.to_string(),
        "limits.listen_backlog cannot change on reload; restart to apply it"
    );
    assert_eq!(listen_backlog(gw.https()), 300);
}

/// Reads until the peer closes the connection (EOF or reset), at most `limit`; how long it took.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let read_all = async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read_all)
        .await
        .ok()
        .map(|()| started.elapsed())
}

/// The admin API keeps its own bound (`admin.max_connections`, reloaded with the config) and the
/// data plane's header read and idle timeouts, so stuck or hostile clients cannot hold its
/// connections or the gateway's file descriptors.
#[tokio::test]
async fn the_admin_api_bounds_its_connections() {
    let pki = TestPki::new();
    let sections = |max: usize| {
        format!(
            "admin: {{listen: \"127.0.0.1:0\", max_connections: {max}}}\n\
             limits: {{header_read_timeout: 1s, idle_timeout: 1s}}\n"
        )
    };
    let gw = TestGateway::start(&pki, &sections(2)).await;
    let admin = gw.gw.admin_addr().unwrap();
    let refused = "portcullis_admin_connections_refused_total";

    // A scraper keeping its connection alive, and a client sending its headers a byte at a time.
    let mut scraper = Conn::plain(admin).await.unwrap();
    assert_eq!(scraper.get("admin", "/health").await.unwrap().status, 200);
    let mut slow = TcpStream::connect(admin).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
    let slow_started = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Both slots are taken: a third connection is closed at once, and counted.
    let mut third = TcpStream::connect(admin).await.unwrap();
    let took = closed_within(&mut third, Duration::from_secs(2)).await;
    assert!(
        took.is_some_and(|t| t < Duration::from_millis(500)),
        "the third connection was closed at once: {took:?}"
    );
    assert_eq!(gw.metric(refused), 1.0);

    // The byte-at-a-time client is cut at the header read timeout, while the scraper, which
    // asks every 300 ms, outlives the idle timeout.
    let (trickle, rd) = {
        let (mut rd, mut wr) = slow.into_split();
        let trickle = tokio::spawn(async move {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                if wr.write_all(b"x").await.is_err() {
                    return;
                }
            }
        });
        let rd = tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return slow_started.elapsed(),
                    Ok(_) => {}
                }
            }
        });
        (trickle, rd)
    };
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(scraper.get("admin", "/health").await.unwrap().status, 200);
    }
    let cut = crate::support::bounded("the slow client is cut", rd)
        .await
        .unwrap();
    assert!(
        cut >= Duration::from_millis(900) && cut < Duration::from_millis(2000),
        "cut after {cut:?}"
    );
    trickle.abort();

    // Silent past the idle timeout, the scraper's connection is closed too; a new one is served.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert!(scraper.get("admin", "/health").await.is_err());
    let mut again = Conn::plain(admin).await.unwrap();
    let m = again.get("admin", "/metrics").await.unwrap().body;
    assert!(m.contains(&format!("{refused} 1\n")), "{m}");

    // A reload lowers the bound for the next connection.
    gw.reload(&sections(1));
    let mut next = TcpStream::connect(admin).await.unwrap();
    assert!(
        closed_within(&mut next, Duration::from_millis(500))
            .await
            .is_some(),
        "one connection (the scraper's) is open: the next is closed"
    );
    assert_eq!(gw.metric(refused), 2.0);
    assert_eq!(again.get("admin", "/health").await.unwrap().status, 200);
}

/// A backend for request bodies: `/upload` reads the whole body, then answers how many bytes it
/// got; `/early` answers at once, before reading anything, and ends its body with that count.
/// What became of each request's body ("N bytes", or "cut after N bytes") is sent on the
/// returned channel. Serves HTTPS with `tls` (as a route service), else plain HTTP.
async fn upload_backend(
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;

    async fn read_all(mut body: Incoming) -> String {
        let mut n = 0;
        loop {
            match body.frame().await {
                Some(Ok(f)) => n += f.data_ref().map_or(0, |d| d.len()),
                Some(Err(_)) => return format!("cut after {n} bytes"),
                None => return format!("{n} bytes"),
            }
        }
    }

    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let seen_tx = seen_tx.clone();
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let seen_tx = seen_tx.clone();
                async move {
                    let early = req.uri().path() == "/early";
                    let body = req.into_body();
                    let resp = if early {
                        let (mut tx, rbody) = http_body_util::channel::Channel::<
                            Bytes,
                            std::convert::Infallible,
                        >::new(1);
                        tokio::spawn(async move {
                            let got = read_all(body).await;
                            let _ = tx.send_data(Bytes::from(got.clone())).await;
                            let _ = seen_tx.send(got);
                        });
                        rbody.boxed_unsync()
                    } else {
                        let got = read_all(body).await;
                        let _ = seen_tx.send(got.clone());
                        Full::new(Bytes::from(got))
                            .map_err(|never| match never {})
                            .boxed_unsync()
                    };
                    Ok::<_, std::convert::Infallible>(http::Response::new(resp))
                }
            });
            let tls = tls.clone();
            tokio::spawn(async move {
                let http = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                match tls {
                    None => {
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                            .await;
                    }
                    Some(cfg) => {
                        if let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                                .await;
                        }
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// A POST of `len` bytes (h1: with that `content-length`) for `host` on a new TLS connection
/// whose body the caller sends piece by piece through the returned sender; the response comes
/// on the returned task.
async fn streaming_post(
    gw: &TestGateway,
    pki: &TestPki,
    host: &str,
    path: &str,
    len: usize,
    h2: bool,
) -> (BodySender, tokio::task::JoinHandle<Answer>) {
    let req = match h2 {
        false => http::Request::post(path)
            .header("host", host)
            .header("content-length", len),
        true => http::Request::post(format!("https://{host}{path}")),
    };
    streaming(gw.https(), &pki.server_ca, host, req, h2).await
}

/// `limits.request_body_timeout`: a client that sends part of its request body and then nothing
/// is answered 408 `request_body_timeout` after the limit, over HTTP/1.1 (which then closes)
/// and h2; the endpoint sees its request end unfinished and is not blamed (no backend error, no
/// 504 after `response_header_timeout`). It limits silence, not length, and only until the
/// endpoint answers: a slow upload that keeps sending completes, and a client silent on an
/// exchange the endpoint has already answered (a stream) is left alone. A route service is held
/// to it as an endpoint is.
#[tokio::test]
async fn a_request_body_that_stops_is_answered_408_after_request_body_timeout() {
    use bytes::Bytes;
    use http_body_util::BodyExt;

    let pki = TestPki::new();
    let (backend, mut seen) = upload_backend(None).await;
    let leaf = pki.backend_ca.server(&["localhost"]).unwrap();
    let mut cfg = crate::support::pki::server_config(&leaf);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let (service, mut service_seen) = upload_backend(Some(std::sync::Arc::new(cfg))).await;
    let y = format!(
        "limits: {{request_body_timeout: 1s}}\n\
         backends: {{response_header_timeout: 3s}}\n\
         route_services: {{secret: s, ca_certs: backend-ca.pem}}\n\
         routes:\n  - {{uris: [upload.apps.plain], host: 127.0.0.1, port: {}}}\n\
         \x20 - {{uris: [rs.apps.plain], host: 127.0.0.1, port: {}, route_service_url: \"https://localhost:{}/upload\"}}\n",
        backend.port(),
        backend.port(),
        service.port()
    );
    let gw = TestGateway::start(&pki, &y).await;
    for (host, h2) in [
        ("upload.apps.plain", false),
        ("upload.apps.plain", true),
        ("rs.apps.plain", false),
    ] {
        let (mut tx, answer) = streaming_post(&gw, &pki, host, "/upload", 20, h2).await;
        tx.send_data(Bytes::from_static(b"01234")).await.unwrap();
        let started = Instant::now();
        let resp = crate::support::bounded("408", answer)
            .await
            .unwrap()
            .unwrap();
        let took = started.elapsed();
        assert_eq!(resp.status(), 408, "h2 {h2}");
        assert_eq!(
            resp.headers()["x-cf-routererror"],
            "request_body_timeout",
            "h2 {h2}"
        );
        if !h2 {
            assert_eq!(resp.headers()["connection"], "close");
        }
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(2900),
            "h2 {h2}: answered after {took:?}"
        );
        let seen = match host {
            "rs.apps.plain" => &mut service_seen,
            _ => &mut seen,
        };
        let got = crate::support::bounded("the endpoint's end", seen.recv()).await;
        assert_eq!(got.as_deref(), Some("cut after 5 bytes"), "{host} h2 {h2}");
        drop(tx);
    }
    for line in gw.log_lines(3).await {
        let l = crate::support::gateway::LogLine::parse(&line);
        assert_eq!((l.status, l.req_bytes), (408, 5), "{line}");
        assert_eq!(
            l.field("x_cf_routererror"),
            "request_body_timeout",
            "{line}"
        );
    }
    assert_eq!(gw.metric("portcullis_requests_total{code=\"408\"}"), 3.0);
    assert_eq!(
        gw.metric("portcullis_backend_errors_total{kind=\"send\"}"),
        0.0
    );
    // The route service was sent the request, and did not fail: its client stopped.
    assert_eq!(
        gw.metric("portcullis_route_service_requests_total{outcome=\"sent\"}"),
        1.0
    );
    assert_eq!(
        gw.metric("portcullis_route_service_requests_total{outcome=\"failed\"}"),
        0.0
    );

    for h2 in [false, true] {
        // 30 bytes in pieces 300 ms apart, 1.8 s in all: never 1 s of silence.
        let (mut tx, answer) =
            streaming_post(&gw, &pki, "upload.apps.plain", "/upload", 30, h2).await;
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tx.send_data(Bytes::from_static(b"abcde")).await.unwrap();
        }
        drop(tx);
        let resp = crate::support::bounded("drip", answer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200, "h2 {h2}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "30 bytes", "h2 {h2}");
        assert_eq!(seen.recv().await.as_deref(), Some("30 bytes"));

        // Answered first: 2 s of silence after the response head does not cut the body.
        let (mut tx, answer) =
            streaming_post(&gw, &pki, "upload.apps.plain", "/early", 10, h2).await;
        let resp = crate::support::bounded("early", answer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200, "h2 {h2}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        tx.send_data(Bytes::from_static(b"01234")).await.unwrap();
        tx.send_data(Bytes::from_static(b"56789")).await.unwrap();
        drop(tx);
        let body = crate::support::bounded("early body", resp.into_body().collect())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(body, "10 bytes", "h2 {h2}");
        assert_eq!(seen.recv().await.as_deref(), Some("10 bytes"));
    }
    let lines = gw.log_lines(7).await;
    for line in &lines[3..] {
        let l = crate::support::gateway::LogLine::parse(line);
        assert_eq!(l.status, 200, "{line}");
        assert_eq!(l.field("x_cf_routererror"), "-", "{line}");
    }
}
