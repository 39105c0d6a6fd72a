//! SPEC §13: where portcullis is safer than the reference.

use base64::Engine as _;
use portcullis::echo;

use crate::pipeline_yaml;
use crate::support::client::Conn;
use crate::support::gateway::TestGateway;
use crate::support::pki::TestPki;

#[tokio::test]
async fn identity_comes_from_the_certificate_never_from_xfcc() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    // *.apps.identity forwards XFCC untouched, so a header claiming app A reaches the backend…
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let forged = base64::engine::general_purpose::STANDARD.encode(&pki.a.der);
    for h2 in [false, true] {
        let mut c = Conn::tls(
            gw.https(),
            &pki.server_ca,
            Some("any-a.apps.identity"),
            Some(&pki.b),
            h2,
        )
        .await
        .unwrap();
        let req = c.build(
            "any-a.apps.identity",
            "/",
            &[("x-forwarded-client-cert", &forged)],
        );
        // …but the decision is B's: denied.
        assert_eq!(c.send(req).await.unwrap().status, 403);
        let req = c.build(
            "open.apps.identity",
            "/",
            &[("x-forwarded-client-cert", &forged)],
        );
        let echo = c.send(req).await.unwrap().echo();
        assert_eq!(echo.headers.get("x-forwarded-client-cert"), Some(&forged));
    }
    assert_eq!(backend.requests(), 2);
}

#[tokio::test]
async fn host_names_are_normalised_before_every_decision() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let port = gw.https().port().to_string();
    for h2 in [false, true] {
        let mut c = Conn::tls(
            gw.https(),
            &pki.server_ca,
            Some("Any-A.APPS.identity"),
            Some(&pki.a),
            h2,
        )
        .await
        .unwrap();
        for host in [
            "ANY-A.apps.Identity.",
            &format!("any-a.apps.identity:{port}"),
            &format!("Any-A.Apps.Identity.:{port}"),
        ] {
            let r = c.get(host, "/").await.unwrap();
            assert_eq!(r.status, 200, "host {host}");
        }
        // The binding check sees the same normalised name: still 421 across domains.
        let mut c = Conn::tls(
            gw.https(),
            &pki.server_ca,
            Some("OPEN.apps.plain."),
            None,
            h2,
        )
        .await
        .unwrap();
        assert_eq!(
            c.get(&format!("ANY-A.apps.identity.:{port}"), "/")
                .await
                .unwrap()
                .status,
            421
        );
    }
}

#[tokio::test]
async fn no_per_request_denial_logging_only_counters() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    for _ in 0..3 {
        let r = crate::support::client::get(
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
    // Exactly one access-log line per request and the denial is counted.
    assert_eq!(gw.log_lines(3).await.len(), 3);
    assert_eq!(gw.metric("portcullis_requests_total{code=\"403\"}"), 3.0);
}

/// A TLS connection for `open.apps.identity` as caller A, offering `alpn`, to speak by hand.
async fn raw_tls(
    gw: &TestGateway,
    pki: &TestPki,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    crate::raw_tls(gw, pki, &pki.a, "open.apps.identity", alpn).await
}

/// After an abusive client, another one is served (over h2).
async fn serves_another_client(gw: &TestGateway, pki: &TestPki) {
    let host = "open.apps.identity";
    let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.a), true)
        .await
        .unwrap();
    assert_eq!(c.get(host, "/").await.unwrap().status, 200);
}

/// HTTP/2 Rapid Reset (CVE-2023-44487): a client that opens streams and resets them at once, as
/// fast as it can, on one connection. The gateway takes up at most `h2_max_concurrent_streams`
/// of them (each logged as the 499 it is; how many depends on timing), refuses the rest and
/// ends the connection with GOAWAY ENHANCE_YOUR_CALM, well before the 20,000 the client queued;
/// another client is served.
#[tokio::test]
async fn an_h2_rapid_reset_flood_ends_its_connection() {
    use std::time::Duration;
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(
        &pki,
        &pipeline_yaml(backend.addr, "limits: {h2_max_concurrent_streams: 100}\n"),
    )
    .await;
    let tls = raw_tls(&gw, &pki, b"h2").await;
    let (mut client, conn) = h2::client::handshake(tls).await.unwrap();
    let driver = tokio::spawn(conn);
    for _ in 0..20_000 {
        let Ok(ready) = client.ready().await else {
            break;
        };
        client = ready;
        let req = http::Request::get("https://open.apps.identity/")
            .body(())
            .unwrap();
        let Ok((_, mut stream)) = client.send_request(req, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), driver)
        .await
        .expect("the gateway ends the connection")
        .unwrap();
    assert!(ended.is_err(), "{ended:?}");
    gw.wait_metric(
        "portcullis_client_connection_errors_total{kind=\"h2_abuse\"}",
        1.0,
    )
    .await;

    serves_another_client(&gw, &pki).await;
    // The streams taken up were logged; then the one real request.
    let served = gw
        .log_lines_until("the 200", |ls| ls.iter().any(|l| l.contains(" 200 ")))
        .await;
    let taken = served.iter().filter(|l| l.contains(" 499 ")).count();
    assert!(taken <= 100, "{taken} streams taken up: {served:#?}");
    assert!(backend.requests() <= 101, "{}", backend.requests());
}

/// HTTP/2 CONTINUATION flood (CVE-2024-27316 and its kin): a client that sends a request's
/// HEADERS and then CONTINUATION frames without end. The gateway keeps at most twice
/// `max_header_bytes` of the header block and ends the connection with GOAWAY, long before the
/// 64 MiB this client would send; it does not buffer or decode without bound.
#[tokio::test]
async fn an_h2_continuation_flood_ends_its_connection() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let tls = raw_tls(&gw, &pki, b"h2").await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    // What the gateway sends back: the frame types seen, until it closes.
    let closed = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn({
        let closed = closed.clone();
        async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            closed.store(true, Ordering::Relaxed);
            let mut types = Vec::new();
            let mut at = 0;
            while at + 9 <= got.len() {
                let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
                types.push(got[at + 3]);
                at += 9 + len;
            }
            types
        }
    });
    wr.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    wr.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
    // GET https://open.apps.identity/, END_STREAM but not END_HEADERS.
    let mut block = vec![0x82, 0x87, 0x84, 0x41, 18];
    block.extend_from_slice(b"open.apps.identity");
    wr.write_all(&frame(0x1, 0x1, 1, &block)).await.unwrap();
    // CONTINUATION frames of 150 literal fields `x-a: <100 bytes>` each, about 16 KB.
    let mut field = vec![0x00, 3];
    field.extend_from_slice(b"x-a");
    field.push(100);
    field.extend_from_slice(&[b'v'; 100]);
    let continuation = frame(0x9, 0, 1, &field.repeat(150));
    let mut sent = 0usize;
    while sent < 64 << 20 && !closed.load(Ordering::Relaxed) {
        if wr.write_all(&continuation).await.is_err() {
            break;
        }
        sent += continuation.len();
    }
    let types = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
        .await
        .expect("the gateway closes the connection")
        .unwrap();
    // What was written includes what the loopback's socket buffers hold (several MB).
    assert!(sent < 16 << 20, "{sent} bytes of CONTINUATION taken");
    assert!(types.contains(&0x7), "no GOAWAY among the frames {types:?}");
    gw.wait_metric(
        "portcullis_client_connection_errors_total{kind=\"h2_abuse\"}",
        1.0,
    )
    .await;
    assert_eq!(backend.requests(), 0);
    serves_another_client(&gw, &pki).await;
}

/// Request smuggling through HTTP/1.1 framing: each request the gateway reads is one request to
/// the app, framed anew, and a request whose framing is ambiguous is refused before any app
/// sees it. `Content-Length` beside `Transfer-Encoding: chunked` is read as chunked (the length
/// dropped) and the connection closed after it, so what follows is never taken as a request;
/// two lengths are 400; a transfer coding besides `chunked`, 501 (GoRouter's answer), with the
/// connection closed; `chunked` not last, 400.
#[tokio::test]
async fn ambiguous_http1_framing_never_smuggles_a_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: open.apps.identity\r\n\r\n";
    let head =
        |te_cl: &str| format!("POST /in HTTP/1.1\r\nHost: open.apps.identity\r\n{te_cl}\r\n");
    for (what, raw, status, reaches_app) in [
        (
            "CL and TE",
            head("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n") + "0\r\n\r\n" + smuggled,
            200,
            true,
        ),
        (
            "two lengths",
            head("Content-Length: 5\r\nContent-Length: 6\r\n") + "hello!" + smuggled,
            400,
            false,
        ),
        (
            "gzip, chunked",
            head("Transfer-Encoding: gzip, chunked\r\n") + "5\r\nhello\r\n0\r\n\r\n" + smuggled,
            501,
            false,
        ),
        (
            "gzip, then chunked on its own line",
            head("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n")
                + "0\r\n\r\n"
                + smuggled,
            501,
            false,
        ),
        (
            "chunked, gzip",
            head("Transfer-Encoding: chunked, gzip\r\n") + "hello" + smuggled,
            400,
            false,
        ),
    ] {
        let before = backend.requests();
        let mut tls = raw_tls(&gw, &pki, b"http/1.1").await;
        tls.write_all(raw.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), tls.read_to_end(&mut out))
            .await
            .unwrap_or_else(|_| panic!("{what}: the connection stays open"))
            .ok();
        let text = String::from_utf8_lossy(&out);
        let statuses: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("HTTP/1.1 "))
            .collect();
        assert_eq!(statuses.len(), 1, "{what}: one answer: {text}");
        assert!(
            statuses[0].starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {text}"
        );
        assert!(!text.contains("/smuggled"), "{what}: {text}");
        let reached = backend.requests() - before;
        assert_eq!(reached, u64::from(reaches_app), "{what}");
        if status == 501 {
            assert!(text.contains("Unsupported transfer encoding"), "{text}");
        }
    }
}

/// The app sees the host the gateway routed and authorized the request by. Here caller B, whom
/// `any-a.apps.identity` refuses, asks `open.apps.identity` (the same app, no policy) while
/// naming `any-a` in a Host header: through an absolute-form HTTP/1.1 target and through h2's
/// `:authority`, the app gets `Host: open.apps.identity`; two Host headers are 400 before any
/// app sees the request, and the connection is closed.
#[tokio::test]
async fn the_app_sees_the_host_the_request_was_authorized_for() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let as_b = |alpn: &'static [u8]| {
        let (gw, pki) = (&gw, &pki);
        async move { crate::raw_tls(gw, pki, &pki.b, "open.apps.identity", alpn).await }
    };
    // The echo's JSON, for the host it was sent.
    let echoed_host = |body: &[u8]| -> String {
        let v: serde_json::Value = serde_json::from_slice(body).expect("the echo's JSON");
        v["headers"]["host"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };

    let mut tls = as_b(b"http/1.1").await;
    tls.write_all(
        b"GET https://open.apps.identity/abs HTTP/1.1\r\nHost: any-a.apps.identity\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    let body = &out[text.find("\r\n\r\n").unwrap() + 4..];
    assert_eq!(echoed_host(body), "open.apps.identity");

    let tls = as_b(b"h2").await;
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get("https://open.apps.identity/h2")
        .header("host", "any-a.apps.identity")
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut all = Vec::new();
    while let Some(chunk) = body.data().await {
        all.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(echoed_host(&all), "open.apps.identity");

    let before = backend.requests();
    let mut tls = as_b(b"http/1.1").await;
    tls.write_all(
        b"GET /two HTTP/1.1\r\nHost: open.apps.identity\r\nHost: any-a.apps.identity\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(text.ends_with("too many Host headers"), "{text}");
    assert_eq!(backend.requests(), before);
}

/// A route's policy cannot be sidestepped by spelling another route's path differently. Here
/// `paths.apps.identity` is open at its root and `/admin` admits app A only, both on one app.
/// Caller B's spellings of `/admin` that the app would read as `/admin` (escaped letters,
/// escaped slashes) meet `/admin`'s policy; dot segments, raw or escaped, are 400 before any app
/// sees them. The app gets the path as it was sent.
#[tokio::test]
async fn a_path_spelled_differently_meets_the_policy_of_the_path_it_means() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let t1 = "app_id: backend, space_id: space-1, organization_id: org-1";
    let y = format!(
        "domains:\n  - name: \"*.apps.identity\"\n    ca_certs: identity-ca.pem\nroutes:\n{}{}",
        crate::route("paths.apps.identity", backend.addr, t1, ""),
        crate::route(
            "paths.apps.identity/admin",
            backend.addr,
            t1,
            "route_policy_scope: any, route_policy_sources: \"cf:app:app-a\""
        ),
    );
    let gw = TestGateway::start(&pki, &y).await;
    // One request by hand (so that the path goes out exactly as written), as `caller`.
    let send = |path: &'static str, caller: &'static str| {
        let (gw, pki) = (&gw, &pki);
        async move {
            let leaf = if caller == "a" { &pki.a } else { &pki.b };
            let mut tls = crate::raw_tls(gw, pki, leaf, "paths.apps.identity", b"http/1.1").await;
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: paths.apps.identity\r\nConnection: close\r\n\r\n"
            );
            tls.write_all(req.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            tls.read_to_end(&mut out).await.unwrap();
            let text = String::from_utf8_lossy(&out).to_string();
            let status: u16 = text[9..12].parse().unwrap();
            (status, text)
        }
    };
    assert_eq!(send("/admin", "a").await.0, 200);
    let (status, text) = send("/x/%61dmin", "b").await;
    assert_eq!(status, 200, "under the root: {text}");
    assert!(
        text.contains("\"path\": \"/x/%61dmin\""),
        "sent as is: {text}"
    );
    // Routes match in any case, as GoRouter's do: an app that reads `/ADMIN` as `/admin` (IIS,
    // ASP.NET, Spring with case-insensitive matching) must not get it under the root's policy.
    for path in [
        "/admin",
        "/%61dmin",
        "/admin%2Fsecrets",
        "/admin%5Csecrets",
        "/ADMIN",
        "/Admin/secrets",
        "/%41dmin",
    ] {
        let (status, text) = send(path, "b").await;
        assert_eq!(status, 403, "{path}: {text}");
    }
    let (status, text) = send("/ADMIN", "a").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"path\": \"/ADMIN\""), "sent as is: {text}");
    let before = backend.requests();
    for path in [
        "/x/../admin",
        "/x/%2e%2e/admin",
        "/x/..%2Fadmin",
        "/x%2F..%2Fadmin",
        "/x/%2E/admin",
    ] {
        let (status, text) = send(path, "b").await;
        assert_eq!(status, 400, "{path}: {text}");
        assert!(
            text.contains("the path has a '.' or '..' segment"),
            "{text}"
        );
    }
    assert_eq!(backend.requests(), before, "no app saw a dot segment");
}

/// h2c smuggling: a caller asks to upgrade its HTTP/1.1 connection to cleartext HTTP/2 on an
/// allowed route. Were an app to take it, the caller would speak HTTP/2 to the app through the
/// tunnel, and every later request on it (`/admin` here) would bypass the gateway's routing and
/// policies. The gateway takes `h2c` out of `Upgrade`: this backend, which would switch (101)
/// for any `Upgrade: h2c` it sees, gets an ordinary request and answers it. WebSocket upgrades
/// are untouched (`tests/gateway/websocket.rs`).
#[tokio::test]
async fn an_h2c_upgrade_never_reaches_the_app() {
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::<String>::new()));
    tokio::spawn({
        let heads = heads.clone();
        async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let heads = heads.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).await.unwrap_or(0) == 1
                    {
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let answer: &[u8] = if head.contains("upgrade: h2c") {
                        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nplain"
                    };
                    heads.lock().unwrap().push(head);
                    let _ = s.write_all(answer).await;
                });
            }
        }
    });
    let t1 = "app_id: backend, space_id: space-1, organization_id: org-1";
    let y = format!(
        "domains:\n  - name: \"*.apps.identity\"\n    ca_certs: identity-ca.pem\nroutes:\n{}",
        crate::route("h2c.apps.identity", backend, t1, ""),
    );
    let gw = TestGateway::start(&pki, &y).await;
    for upgrade in ["h2c", "H2C, foo"] {
        let mut tls = crate::raw_tls(&gw, &pki, &pki.b, "h2c.apps.identity", b"http/1.1").await;
        let req = format!(
            "GET / HTTP/1.1\r\nHost: h2c.apps.identity\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             Upgrade: {upgrade}\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
        );
        tls.write_all(req.as_bytes()).await.unwrap();
        let mut out = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), tls.read(&mut out))
            .await
            .expect("an answer")
            .unwrap();
        let text = String::from_utf8_lossy(&out[..n]);
        assert!(text.starts_with("HTTP/1.1 200 "), "{upgrade}: {text}");
        let seen = heads
            .lock()
            .unwrap()
            .pop()
            .expect("the app got the request");
        assert!(
            !seen.contains("upgrade: h2c") && !seen.contains("http2-settings"),
            "{seen}"
        );
    }
}

/// `CONNECT` is answered 405 before any app sees it: the gateway is not a forward proxy, and a
/// tunnel to an app would carry requests past its routing and policies.
#[tokio::test]
async fn connect_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let mut tls = raw_tls(&gw, &pki, b"http/1.1").await;
    tls.write_all(
        b"CONNECT open.apps.identity:443 HTTP/1.1\r\nHost: open.apps.identity:443\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = vec![0u8; 4096];
    let n = tls.read(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out[..n]);
    assert!(text.starts_with("HTTP/1.1 405 "), "{text}");
    assert!(text.ends_with("CONNECT is not supported"), "{text}");
    assert_eq!(backend.requests(), 0);
}

/// CGI and WSGI servers (gunicorn before 22, PHP's CGI) read `X_Forwarded_Client_Cert` and
/// `X-Forwarded-Client-Cert` as the same header. The gateway drops request headers whose names,
/// `_` read as `-`, are headers it sets or vouches for, so a caller cannot hand such an app a
/// forged certificate or instance; other names with `_` pass.
#[tokio::test]
async fn underscore_lookalikes_of_the_gateways_headers_never_reach_the_app() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    for h2 in [false, true] {
        let host = "open.apps.identity";
        let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.b), h2)
            .await
            .unwrap();
        let req = c.build(
            host,
            "/",
            &[
                ("x_forwarded_client_cert", "Hash=forged"),
                ("x_cf_instanceid", "forged"),
                ("x-forwarded_proto", "http"),
                ("x_tenant_id", "t-1"),
            ],
        );
        let r = c.send(req).await.unwrap();
        assert_eq!(r.status, 200);
        let seen = r.echo().headers;
        for forged in [
            "x_forwarded_client_cert",
            "x_cf_instanceid",
            "x-forwarded_proto",
        ] {
            assert!(
                !seen.contains_key(forged),
                "h2 {h2}: {forged} reached the app"
            );
        }
        assert_eq!(seen["x_tenant_id"], "t-1");
        assert_eq!(seen["x-forwarded-proto"], "https", "the gateway's own");
    }
}

/// RFC 9110 has a proxy remove the headers a `Connection` header names. A caller naming the
/// headers the gateway sets or vouches for would take away what a balancer in front passed on
/// (`X-Forwarded-Client-Cert` in `forward` mode, its `X-Forwarded-For`, the trace it started)
/// and the request id the access log shows; such names are not honoured, as GoRouter's
/// `hop_by_hop_headers_to_filter` does not honour them. Other names still go.
#[tokio::test]
async fn connection_cannot_name_away_the_headers_the_gateway_vouches_for() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let host = "open.apps.identity";
    let id = "9f0c6a46-3c9e-4f43-8d2a-5b8e1f7d2c10";
    let trace = "463ac35c9f6413ad48485a3953bb6124";
    let mut c = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.a), false)
        .await
        .unwrap();
    let req = c.build(
        host,
        "/",
        &[
            (
                "connection",
                "keep-alive, X-Forwarded-Client-Cert, X-Forwarded-For, X-Vcap-Request-Id, \
                 X-B3-TraceId, X-B3-SpanId, x-private",
            ),
            ("x-forwarded-client-cert", "Hash=from-the-balancer"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-vcap-request-id", id),
            ("x-b3-traceid", trace),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-private", "1"),
        ],
    );
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = r.echo().headers;
    assert_eq!(seen["x-forwarded-client-cert"], "Hash=from-the-balancer");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["x-vcap-request-id"], id);
    assert_eq!(seen["x-b3-traceid"], trace, "the caller's trace goes on");
    assert_eq!(seen["x-b3-parentspanid"], "a2fb4a1d1a96d312");
    assert!(!seen.contains_key("x-private"), "other named headers go");
    assert!(!seen.contains_key("connection"));
    // The access log shows the request id the app got.
    let lines = gw.log_lines(1).await;
    let l = crate::support::gateway::LogLine::parse(&lines[0]);
    assert_eq!(l.field("vcap_request_id"), id);
}
