//! Idle HTTP/1.1 connections park: hyper's connection (and its buffers) ends between requests
//! and the gateway waits on the bare stream. What clients see must not change.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use portcullis::echo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::route;
use crate::support::bounded;
use crate::support::client::{tls_connect, Conn};
use crate::support::gateway::TestGateway;
use crate::support::pki::TestPki;

/// Longer than two idle ticks (0.25 s each): an idle HTTP/1.1 connection has parked by then.
const PARKED: Duration = Duration::from_millis(800);

const HOST: &str = "open.apps.plain";

async fn gateway(pki: &TestPki) -> TestGateway {
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let mut y = String::from("routes:\n");
    y += &route(HOST, backend.addr, "app_id: x", "");
    TestGateway::start(pki, &y).await
}

fn idle(gw: &TestGateway) -> f64 {
    gw.metric("portcullis_connections_idle")
}

/// Waits (at most 5 s) until `n` connections are parked.
async fn parked(gw: &TestGateway, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while idle(gw) != n {
        assert!(
            Instant::now() < deadline,
            "{} parked, expected {n}",
            idle(gw)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn idle_http1_connections_park_and_resume() {
    let pki = TestPki::new();
    let gw = gateway(&pki).await;
    let mut h1 = Conn::tls(gw.https(), &pki.server_ca, Some(HOST), None, false)
        .await
        .unwrap();
    let mut h2 = Conn::tls(gw.https(), &pki.server_ca, Some(HOST), None, true)
        .await
        .unwrap();
    let mut plain = Conn::plain(gw.http()).await.unwrap();
    for round in 0..3 {
        for c in [&mut h1, &mut h2, &mut plain] {
            let r = bounded("request", c.get(HOST, &format!("/r{round}"))).await;
            let r = r.unwrap();
            assert_eq!(r.status, 200);
            assert!(
                r.body.contains(&format!("\"path\": \"/r{round}\"")),
                "{}",
                r.body
            );
        }
        // Busy connections do not park…
        assert_eq!(idle(&gw), 0.0, "round {round}");
        // …idle HTTP/1.1 ones do, over TLS and plain; h2 connections are not parked.
        parked(&gw, 2.0).await;
    }
    assert_eq!(gw.metric("portcullis_requests_total{code=\"200\"}"), 9.0);
    let lines = gw.log_lines(9).await;
    assert_eq!(lines.len(), 9);
}

#[tokio::test]
async fn many_parked_connections_resume_together() {
    let pki = TestPki::new();
    let gw = gateway(&pki).await;
    let mut conns = Vec::new();
    for _ in 0..64 {
        let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(HOST), None, false)
            .await
            .unwrap();
        assert_eq!(
            bounded("first", c.get(HOST, "/")).await.unwrap().status,
            200
        );
        conns.push(c);
    }
    parked(&gw, 64.0).await;
    // All at once, each with its own path: every answer belongs to its own request.
    let answers =
        futures_util::future::join_all(conns.iter_mut().enumerate().map(|(i, c)| async move {
            let r = c.get(HOST, &format!("/c{i}")).await.unwrap();
            (i, r)
        }));
    for (i, r) in bounded("resume", answers).await {
        assert_eq!(r.status, 200);
        assert!(
            r.body.contains(&format!("\"path\": \"/c{i}\"")),
            "{i}: {}",
            r.body
        );
    }
    assert_eq!(gw.metric("portcullis_connections_active"), 64.0);
}

/// Reads from `io` until `done` holds for what was read.
async fn read_until(io: &mut (impl AsyncRead + Unpin), done: impl Fn(&str) -> bool) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    bounded("answer", async {
        loop {
            let n = io.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed early; read: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
            if done(&String::from_utf8_lossy(&got)) {
                return String::from_utf8_lossy(&got).into_owned();
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_pipelined_request_cut_short_by_a_pause_is_still_answered() {
    let pki = TestPki::new();
    let gw = gateway(&pki).await;
    let mut tls = tls_connect(gw.https(), &pki.server_ca, Some(HOST), None, &[b"http/1.1"])
        .await
        .unwrap();
    // One request and the start of the next in one write, the rest after a pause.
    let head = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: {HOST}\r\n\r\n");
    let second = head("/b");
    let (part, rest) = second.split_at(20);
    tls.write_all(format!("{}{part}", head("/a")).as_bytes())
        .await
        .unwrap();
    let first = read_until(&mut tls, |s| s.contains("\"path\": \"/a\"")).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    tokio::time::sleep(PARKED).await;
    // Half a request inside hyper: not idle, so not parked.
    assert_eq!(idle(&gw), 0.0);
    tls.write_all(rest.as_bytes()).await.unwrap();
    let answer = read_until(&mut tls, |s| s.contains("\"path\": \"/b\"")).await;
    assert!(answer.contains("HTTP/1.1 200"), "{answer}");
    parked(&gw, 1.0).await;
    // Two requests in one write after parking: both answered, in order.
    tls.write_all(format!("{}{}", head("/c"), head("/d")).as_bytes())
        .await
        .unwrap();
    let answer = read_until(&mut tls, |s| s.contains("\"path\": \"/d\"")).await;
    let (c, d) = (
        answer.find("\"/c\"").unwrap(),
        answer.find("\"/d\"").unwrap(),
    );
    assert!(c < d, "{answer}");
}

#[tokio::test]
async fn a_request_with_a_body_is_followed_by_more_requests() {
    let pki = TestPki::new();
    let gw = gateway(&pki).await;
    let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(HOST), None, false)
        .await
        .unwrap();
    let post = hyper::Request::post("/upload")
        .header("host", HOST)
        .body(Full::new(Bytes::from_static(
            b"a body that does not end a head",
        )))
        .unwrap();
    assert_eq!(bounded("post", c.send(post)).await.unwrap().status, 200);
    tokio::time::sleep(PARKED).await;
    // A Content-Length body can end anywhere, so the gateway cannot tell whether hyper holds
    // unread bytes: the connection stays unparked until a request without a body.
    assert_eq!(idle(&gw), 0.0);
    assert_eq!(
        bounded("get", c.get(HOST, "/next")).await.unwrap().status,
        200
    );
    parked(&gw, 1.0).await;
    assert_eq!(
        bounded("get", c.get(HOST, "/last")).await.unwrap().status,
        200
    );
}

#[tokio::test]
async fn without_alpn_the_first_bytes_choose_the_protocol() {
    let pki = TestPki::new();
    let gw = gateway(&pki).await;
    // TLS without ALPN: HTTP/1.1, and h2 with prior knowledge.
    for h2 in [false, true] {
        let tls = tls_connect(gw.https(), &pki.server_ca, Some(HOST), None, &[])
            .await
            .unwrap();
        let mut c = Conn::over(tls, h2).await.unwrap();
        let r = bounded("request", c.get(HOST, "/tls")).await.unwrap();
        assert_eq!(r.status, 200, "h2={h2}");
        tokio::time::sleep(PARKED).await;
        assert_eq!(
            bounded("again", c.get(HOST, "/tls")).await.unwrap().status,
            200
        );
    }
    // Plain HTTP: h2 with prior knowledge (h2c).
    let tcp = TcpStream::connect(gw.http()).await.unwrap();
    let mut c = Conn::over(tcp, true).await.unwrap();
    let r = bounded("h2c", c.get(HOST, "/h2c")).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.contains("\"path\": \"/h2c\""), "{}", r.body);
    // A client that sends part of the preface and stops is answered by hyper as HTTP/1.1.
    let mut tcp = TcpStream::connect(gw.http()).await.unwrap();
    tcp.write_all(b"PRI * HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until(&mut tcp, |s| s.contains("\r\n\r\n")).await;
    assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
}

#[tokio::test]
async fn shutdown_closes_parked_connections_at_once() {
    let pki = TestPki::new();
    let gw = gateway(&pki).await;
    let mut tls = tls_connect(gw.https(), &pki.server_ca, Some(HOST), None, &[b"http/1.1"])
        .await
        .unwrap();
    tls.write_all(format!("GET / HTTP/1.1\r\nhost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_until(&mut tls, |s| s.contains("\"path\": \"/\"")).await;
    parked(&gw, 1.0).await;
    let started = Instant::now();
    gw.gw.shutdown(Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The client reads the end: close_notify, then end of stream.
    let mut rest = Vec::new();
    let end = bounded("end", tls.read_to_end(&mut rest)).await;
    assert!(end.is_ok(), "{end:?}");
    assert!(rest.is_empty());
}

/// Once `shutdown` returns, the gateway's listeners are closed: another gateway (a restart in
/// the same process, as the XDP tests do) can bind the same ports at once. Each accept loop
/// closes its socket on its own worker thread, so this is raced several times.
#[tokio::test]
async fn shutdown_returns_with_the_ports_free() {
    let pki = TestPki::new();
    for _ in 0..10 {
        let gw = gateway(&pki).await;
        let ports = [gw.https(), gw.http()];
        gw.gw.shutdown(Duration::from_secs(1)).await;
        for addr in ports {
            let again = std::net::TcpListener::bind(addr);
            assert!(again.is_ok(), "{addr}: {again:?}");
        }
    }
}
