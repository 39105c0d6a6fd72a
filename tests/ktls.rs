//! Kernel TLS (SPEC §5), on whatever kernel runs the test.
//!
//! Where the kernel has kTLS (Debian's 6.1 and the newest backports kernel in the VMs of
//! `cargo xtask vm-test`, which set `PORTCULLIS_REQUIRE_KTLS`): h1 and h2 connections, mTLS and
//! plain, resumed ones included, are moved into the kernel, `/proc/net/tls_stat` shows the kernel
//! doing the record crypto, and every response is byte-identical to the same request through a
//! gateway with `tls.ktls: off`. KeyUpdates from clients and from TLS backends are followed where
//! the kernel can rekey (≥ 6.14) and end the connection in order where it cannot; the gateway
//! sends its own when a connection's send keys reach their record limit (where it cannot, that
//! connection ends in order too); hostile post-handshake records end connections without harm.
//! Where it has not (the build machines): the gateway falls back to rustls, `on` refuses to start
//! with the reason, and the binary says so once.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use support::gateway::TestGateway;
use support::kernel_tls::{gcm_aes_driver, stat_delta, tls_stat};
use support::pki::TestPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// TLS record content type of application data.
const APPLICATION_DATA: u8 = 23;

fn kernel_has_ktls() -> bool {
    let required = std::env::var_os("PORTCULLIS_REQUIRE_KTLS").is_some();
    let present = std::path::Path::new("/proc/net/tls_stat").exists();
    assert!(
        present || !required,
        "PORTCULLIS_REQUIRE_KTLS is set but /proc/net/tls_stat is missing (no tls module)"
    );
    present
}

/// A deterministic backend: `GET /bytes/N` answers N pattern bytes, `POST` echoes the body. With
/// `tls`, it speaks TLS (userspace rustls), counts the connections it accepted and those that
/// resumed a session, and updates its keys before answering a request under `/rekey/`.
async fn backend(tls: Option<Arc<rustls::ServerConfig>>) -> (SocketAddr, Arc<Counts>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let count = counts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let tls = tls.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let body = if req.method() == http::Method::POST {
                        req.into_body().collect().await?.to_bytes()
                    } else {
                        let n: usize = req
                            .uri()
                            .path()
                            .trim_start_matches("/rekey")
                            .strip_prefix("/bytes/")
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0);
                        Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
                    };
                    let resp = http::Response::builder()
                        .header("content-type", "application/octet-stream")
                        .body(Full::new(body))
                        .unwrap();
                    Ok::<_, hyper::Error>(resp)
                });
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    None => {
                        let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
                    }
                    Some(cfg) => {
                        let Ok(tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await else {
                            return;
                        };
                        count.accepted.fetch_add(1, Ordering::Relaxed);
                        if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
                        {
                            count.resumed.fetch_add(1, Ordering::Relaxed);
                        }
                        let io = Rekeying {
                            tls,
                            due: false,
                            counts: count,
                        };
                        let _ = http.serve_connection(TokioIo::new(io), svc).await;
                    }
                }
            });
        }
    });
    (addr, counts)
}

/// What a TLS backend saw.
#[derive(Default)]
struct Counts {
    accepted: AtomicU64,
    resumed: AtomicU64,
    key_updates: AtomicU64,
}

/// The TLS backend's stream: after reading a request for `/rekey/…` it updates its send keys
/// before the response (rustls sends a KeyUpdate that asks the peer to update its own too).
struct Rekeying {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    due: bool,
    counts: Arc<Counts>,
}

impl tokio::io::AsyncRead for Rekeying {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.tls).poll_read(cx, buf);
        if buf.filled()[before..].windows(7).any(|w| w == b" /rekey") {
            self.due = true;
        }
        r
    }
}

impl tokio::io::AsyncWrite for Rekeying {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if std::mem::take(&mut self.due) {
            self.tls.get_mut().1.refresh_traffic_keys().unwrap();
            self.counts.key_updates.fetch_add(1, Ordering::Relaxed);
        }
        std::pin::Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// The TLS backend's server config: a `backend.internal` certificate from the backend CA.
fn backend_tls(pki: &TestPki) -> Arc<rustls::ServerConfig> {
    let leaf = pki.backend_ca.server(&["backend.internal"]).unwrap();
    Arc::new(support::pki::server_config(&leaf))
}

/// `a.apps.identity` (mTLS) and `a.apps.plain` go to the plain backend, `tls.apps.plain` to the
/// TLS one.
fn sections(ktls: &str, backend: SocketAddr, tls_backend: SocketAddr) -> String {
    format!(
        "tls:\n  certificates: [{{cert_chain: server.pem, private_key: server.key}}]\n  handshake_timeout: 5s\n  ktls: {ktls}\n\
         access_log: {{path: access.log, extra_fields: [ktls]}}\n\
         domains:\n  - name: \"*.apps.identity\"\n    ca_certs: identity-ca.pem\n\
         routes:\n  - {{uris: [a.apps.identity], host: \"127.0.0.1\", port: {port}, options: {{route_policy_scope: any, route_policy_sources: \"cf:app:app-a\"}}}}\n  - {{uris: [a.apps.plain], host: \"127.0.0.1\", port: {port}}}\n  - {{uris: [tls.apps.plain], host: \"127.0.0.1\", tls_port: {tls_port}, server_cert_domain_san: backend.internal}}\n",
        port = backend.port(),
        tls_port = tls_backend.port()
    )
}

fn client_config(pki: &TestPki, mtls: bool, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    support::client::tls_config(&pki.server_ca, mtls.then_some(&pki.a), &[alpn])
}

/// One HTTP/1.1 exchange written and read as raw bytes (`Connection: close`), so the comparison
/// sees exactly what came off the wire after TLS. The `date` header is blanked.
async fn h1_raw(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    host: &str,
    request: Vec<u8>,
) -> (Vec<u8>, bool) {
    let (out, resumed, end) = h1_exchange(addr, cfg, host, request).await;
    // The gateway may close without close_notify once it has answered `Connection: close`.
    if let Err(e) = end {
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    }
    (blank_date(out), resumed)
}

/// Writes `request` on a new TLS connection and reads until the connection ends (within 60 s):
/// the bytes read, whether the session resumed, and how the stream ended (`Ok` after a
/// close_notify).
async fn h1_exchange(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    host: &str,
    request: Vec<u8>,
) -> (Vec<u8>, bool, std::io::Result<usize>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(host.to_string()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .expect("handshake");
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    tls.write_all(&request).await.unwrap();
    let mut out = Vec::new();
    let end = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tls.read_to_end(&mut out),
    )
    .await
    .expect("the connection ends within 60 s");
    (out, resumed, end)
}

fn blank_date(mut raw: Vec<u8>) -> Vec<u8> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a whole response head");
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let blanked: Vec<String> = head
        .split("\r\n")
        .map(|l| {
            if l.to_ascii_lowercase().starts_with("date:") {
                "date: -".to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    let mut out = blanked.join("\r\n").into_bytes();
    out.extend_from_slice(&raw.split_off(head_end));
    out
}

fn get(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").into_bytes()
}

fn post(host: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST /echo HTTP/1.1\r\nhost: {host}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Several requests on one h2 connection; returns each response's status, headers (no date) and
/// body.
async fn h2_exchange(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    host: &str,
    upload: &[u8],
) -> Vec<(u16, Vec<(String, String)>, Bytes)> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(host.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut out = Vec::new();
    let requests = [
        http::Request::get(format!("https://{host}/bytes/100"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
        http::Request::get(format!("https://{host}/bytes/1048576"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
        http::Request::post(format!("https://{host}/echo"))
            .body(Full::new(Bytes::copy_from_slice(upload)))
            .unwrap(),
    ];
    for req in requests {
        let resp = send.send_request(req).await.expect("h2 response");
        let (parts, body) = resp.into_parts();
        let mut headers: Vec<(String, String)> = parts
            .headers
            .iter()
            .filter(|(k, _)| k.as_str() != "date")
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
            .collect();
        headers.sort();
        out.push((
            parts.status.as_u16(),
            headers,
            body.collect().await.unwrap().to_bytes(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_tls_matches_userspace_or_falls_back() {
    let kernel = kernel_has_ktls();
    let pki = TestPki::new();
    let (backend, _) = backend(None).await;
    // One TLS backend per gateway, so the kTLS gateway's backend connections can be counted.
    let (tls_off, _) = self::backend(Some(backend_tls(&pki))).await;
    let (tls_on, tls_on_counts) = self::backend(Some(backend_tls(&pki))).await;
    let off = TestGateway::start(&pki, &sections("off", backend, tls_off)).await;
    if !kernel {
        fallback(&pki, backend, tls_off).await;
        return;
    }
    let on = TestGateway::start(&pki, &sections("on", backend, tls_on)).await;
    let upload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let before = tls_stat();

    // HTTP/1.1: mTLS and plain, to a plain and to a TLS backend; small, 1 MiB down, 300 KB up;
    // then a resumed connection.
    let mut h1_cases = 0;
    for (host, mtls) in [
        ("a.apps.identity", true),
        ("a.apps.plain", false),
        ("tls.apps.plain", false),
    ] {
        for request in [
            get(host, "/bytes/100"),
            get(host, "/bytes/1048576"),
            post(host, &upload),
        ] {
            let cfg = client_config(&pki, mtls, b"http/1.1");
            let (want, _) = h1_raw(off.https(), cfg.clone(), host, request.clone()).await;
            let (got, _) = h1_raw(on.https(), cfg, host, request).await;
            assert!(
                want.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&want[..want.len().min(200)])
            );
            assert!(got == want, "kTLS h1 response differs for {host}");
            h1_cases += 1;
        }
    }
    // Session tickets: the first connection receives them, the second resumes with one and is
    // still moved into the kernel.
    let cfg = client_config(&pki, true, b"http/1.1");
    let host = "a.apps.identity";
    let (first, _) = h1_raw(on.https(), cfg.clone(), host, get(host, "/bytes/5000")).await;
    let (second, resumed) = h1_raw(on.https(), cfg, host, get(host, "/bytes/5000")).await;
    assert!(
        resumed,
        "the second connection resumed with a session ticket"
    );
    assert!(first == second && first.starts_with(b"HTTP/1.1 200"));
    h1_cases += 2;

    // h2: three streams on one connection, mTLS and plain.
    for (host, mtls) in [
        ("a.apps.identity", true),
        ("a.apps.plain", false),
        ("tls.apps.plain", false),
    ] {
        let cfg = client_config(&pki, mtls, b"h2");
        let want = h2_exchange(off.https(), cfg.clone(), host, &upload).await;
        let got = h2_exchange(on.https(), cfg, host, &upload).await;
        assert_eq!(want.len(), 3);
        assert!(want.iter().all(|(s, _, _)| *s == 200));
        assert_eq!(want[1].2.len(), 1 << 20);
        assert_eq!(want[2].2.as_ref(), upload.as_slice());
        assert!(got == want, "kTLS h2 responses differ for {host}");
    }
    let connections = h1_cases + 3;
    // The kTLS gateway's connections to the TLS backend went into the kernel too.
    let backend_connections = tls_on_counts.accepted.load(Ordering::Relaxed);
    assert!(backend_connections >= 1);

    let after = tls_stat();
    let delta = |k: &str| stat_delta(&before, &after, k);
    eprintln!(
        "tls_stat delta: TlsTxSw {} TlsRxSw {}",
        delta("TlsTxSw"),
        delta("TlsRxSw")
    );
    // Every kTLS connection, client side and backend side, put both directions into the kernel's
    // software crypto; the `off` gateway none.
    assert_eq!(
        delta("TlsTxSw"),
        connections + backend_connections,
        "{after:?}"
    );
    assert_eq!(
        delta("TlsRxSw"),
        connections + backend_connections,
        "{after:?}"
    );
    assert_eq!(delta("TlsDecryptError"), 0);
    assert_eq!(
        on.metric("portcullis_ktls_connections_total{mode=\"kernel\"}"),
        connections as f64
    );
    // The resumption pair went to the kTLS gateway only.
    let off_connections = connections - 2;
    assert_eq!(
        off.metric("portcullis_ktls_connections_total{mode=\"userspace\"}"),
        off_connections as f64
    );
    let lines = on.log_lines(connections as usize).await;
    assert!(lines.iter().all(|l| l.contains(" ktls:true ")), "{lines:?}");
    let lines = off.log_lines(off_connections as usize).await;
    assert!(lines.iter().all(|l| l.contains(" ktls:false ")));

    // `auto` takes the kernel too, its AES-GCM being the CPU's (the VMs load aesni_intel); a
    // kernel whose gcm(aes) is not would leave it in userspace (unit-tested in tls::kernel).
    auto_serves_in(&pki, backend, "kernel").await;

    key_update(&on, &pki).await;
    backend_key_update(&on, &pki, &tls_on_counts).await;
    hostile_records(&on, &pki).await;
    padded_records(&on, &pki).await;
    record_limit(&off, &pki, backend, &upload).await;
}

/// On a kernel whose AES-GCM is not the CPU's accelerated code (the VM boot of `cargo xtask
/// vm-test` that leaves `aesni_intel` unloaded sets `PORTCULLIS_EXPECT_SLOW_AES`), `tls.ktls:
/// auto` keeps connections in userspace rustls, which uses the CPU's AES instructions, and `on`
/// still moves them into the kernel. Elsewhere there is nothing to show: the main test covers
/// `auto` with the CPU's AES.
#[tokio::test]
async fn auto_keeps_userspace_tls_where_the_kernels_aes_is_slow() {
    if std::env::var_os("PORTCULLIS_EXPECT_SLOW_AES").is_none() || !kernel_has_ktls() {
        return;
    }
    let pki = TestPki::new();
    let (backend, _) = backend(None).await;
    let on = TestGateway::start(&pki, &sections("on", backend, backend)).await;
    assert_served(&on, &pki, "with tls.ktls: on").await;
    assert_eq!(
        on.metric("portcullis_ktls_connections_total{mode=\"kernel\"}"),
        1.0
    );
    auto_serves_in(&pki, backend, "userspace").await;
}

/// A gateway with `tls.ktls: auto` serves one request on a connection kept in `mode` (`kernel`
/// or `userspace`), and none in the other.
async fn auto_serves_in(pki: &TestPki, backend: SocketAddr, mode: &str) {
    let driver = gcm_aes_driver();
    eprintln!("the kernel's gcm(aes): {driver:?}");
    let auto = TestGateway::start(pki, &sections("auto", backend, backend)).await;
    assert_served(&auto, pki, "with tls.ktls: auto").await;
    let other = if mode == "kernel" {
        "userspace"
    } else {
        "kernel"
    };
    for (m, n) in [(mode, 1.0), (other, 0.0)] {
        let sample = format!("portcullis_ktls_connections_total{{mode=\"{m}\"}}");
        assert_eq!(auto.metric(&sample), n, "{sample}, auto with {driver:?}");
    }
}

/// Whether this kernel can replace the keys of a live kTLS socket (Linux 6.14 added TLS 1.3
/// KeyUpdate support, and the `TlsRxRekeyOk` counter with it).
fn kernel_rekeys() -> bool {
    tls_stat().contains_key("TlsRxRekeyOk")
}

/// A client's TLS 1.3 KeyUpdate on a kernel-TLS connection. rustls asks the peer to update too,
/// so the gateway must replace its receive keys, send its own KeyUpdate and replace its send
/// keys. Where the kernel can do that, the connection goes on serving under the new keys (each
/// side decrypts the other, and `tls_stat` counts the kernel's rekeys); where it cannot, the
/// connection ends in order (close_notify, no hang, no reset). Either way the gateway serves on.
async fn key_update(gw: &TestGateway, pki: &TestPki) {
    let rekeys = kernel_rekeys();
    // The start-up probe found the same as the kernel's own counters say.
    let probed = gw.gw.state().ktls.as_ref().map(|k| k.follows_key_updates());
    assert_eq!(probed, Some(rekeys), "start-up probe");
    let before = tls_stat();
    let host = "a.apps.identity";
    let tcp = TcpStream::connect(gw.https()).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client_config(pki, true, b"http/1.1"))
        .connect(ServerName::try_from(host).unwrap(), tcp)
        .await
        .unwrap();
    let request = format!("GET /bytes/100 HTTP/1.1\r\nhost: {host}\r\n\r\n");
    let exchange = async |tls: &mut tokio_rustls::client::TlsStream<TcpStream>| {
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            tls.write_all(request.as_bytes()).await?;
            let mut out = Vec::new();
            let mut buf = vec![0u8; 4096];
            loop {
                let n = tls.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<_, std::io::Error>(out);
                }
                out.extend_from_slice(&buf[..n]);
                let head = out.windows(4).position(|w| w == b"\r\n\r\n");
                if head.is_some_and(|h| out.len() >= h + 4 + 100) {
                    return Ok(out);
                }
            }
        })
        .await
        .expect("the connection answers or ends within 10 s")
    };
    let first = exchange(&mut tls).await.unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"));
    for round in 0..3 {
        tls.get_mut().1.refresh_traffic_keys().unwrap();
        let after_update = exchange(&mut tls).await;
        eprintln!(
            "request after client KeyUpdate {round} on kTLS: {}",
            match &after_update {
                Ok(out) if out.starts_with(b"HTTP/1.1 200") => "answered".to_string(),
                Ok(out) => format!("connection ended ({} bytes)", out.len()),
                Err(e) => format!("connection ended: {e}"),
            }
        );
        if rekeys {
            let out = after_update.unwrap();
            assert!(out.starts_with(b"HTTP/1.1 200"), "round {round}");
            assert!(out.ends_with(&first[first.len() - 100..]), "round {round}");
        } else {
            // The gateway sends close_notify before it closes, so the client sees an orderly
            // end rather than a reset.
            let out = after_update.unwrap();
            assert!(!out.starts_with(b"HTTP/1.1 200"), "{out:?}");
            break;
        }
    }
    if rekeys {
        let after = tls_stat();
        let delta = |k: &str| stat_delta(&before, &after, k);
        assert_eq!(delta("TlsRxRekeyOk"), 3, "{after:?}");
        assert_eq!(delta("TlsTxRekeyOk"), 3, "{after:?}");
        assert_eq!(delta("TlsRxRekeyError") + delta("TlsTxRekeyError"), 0);
    }
    assert_served(gw, pki, "after the KeyUpdate").await;
}

/// A TLS backend that updates its keys before each response, behind the kernel-TLS gateway.
/// Where the kernel can rekey, every answer arrives. Where it cannot, each backend connection
/// that sees a KeyUpdate ends (502), and the new connections that replace them resume with the
/// session tickets the kernel connections stored.
async fn backend_key_update(gw: &TestGateway, pki: &TestPki, counts: &Counts) {
    let rekeys = kernel_rekeys();
    let before = tls_stat();
    let accepted = counts.accepted.load(Ordering::Relaxed);
    let resumed = counts.resumed.load(Ordering::Relaxed);
    let host = "tls.apps.plain";
    let mut statuses = Vec::new();
    // Pooled connections from earlier answer first; bounded, until two new ones were made.
    for _ in 0..10 {
        let (resp, _) = h1_raw(
            gw.https(),
            client_config(pki, false, b"http/1.1"),
            host,
            get(host, "/rekey/bytes/100"),
        )
        .await;
        let status = String::from_utf8_lossy(&resp[..12]).to_string();
        if rekeys {
            let pattern: Vec<u8> = (0..100u8).map(|i| i % 251).collect();
            assert!(resp.ends_with(&pattern), "{status}");
        }
        statuses.push(status);
        if counts.accepted.load(Ordering::Relaxed) - accepted >= 2 {
            break;
        }
    }
    let new_connections = counts.accepted.load(Ordering::Relaxed) - accepted;
    let resumed = counts.resumed.load(Ordering::Relaxed) - resumed;
    eprintln!(
        "rekeying backend: {statuses:?}, {new_connections} new backend connections, {resumed} resumed, {} key updates",
        counts.key_updates.load(Ordering::Relaxed)
    );
    if rekeys {
        assert!(statuses.iter().all(|s| s == "HTTP/1.1 200"), "{statuses:?}");
        let after = tls_stat();
        let delta = |k: &str| stat_delta(&before, &after, k);
        assert!(delta("TlsRxRekeyOk") >= 2, "{after:?}");
    } else {
        assert!(statuses.iter().all(|s| s == "HTTP/1.1 502"), "{statuses:?}");
        assert_eq!(new_connections, 2);
        assert_eq!(resumed, 2, "new backend connections resume");
    }
}

/// The gateway's own KeyUpdates. rustls leaves it to the user of a kernel connection to keep the
/// records sent under one key below the cipher suite's confidentiality limit (2^24 for
/// AES-128-GCM). With the limit capped at 16 records, a 1 MiB download, 30 small responses on
/// one connection, h2 streams and a 300 KB upload to a TLS backend each cross it, several times.
/// Where the kernel can rekey, every byte arrives as through the userspace gateway and `tls_stat`
/// counts the gateway's send-side rekeys and no receive-side one (no peer asked for them). Where
/// it cannot (TLS 1.2 on any kernel, TLS 1.3 before 6.14), the connection ends at the limit with
/// a close_notify (the client reads a clean end, not a reset or a hang) and the gateway serves
/// on.
async fn record_limit(off: &TestGateway, pki: &TestPki, backend: SocketAddr, upload: &[u8]) {
    let rekeys = kernel_rekeys();
    let (tls_backend, _) = self::backend(Some(backend_tls(pki))).await;
    let capped = TestGateway::start(pki, &sections("on", backend, tls_backend)).await;
    let ktls = capped.gw.state().ktls.as_ref().expect("kernel TLS");
    ktls.cap_records_per_key(16);
    let before = tls_stat();
    let host = "a.apps.identity";
    let mtls = client_config(pki, true, b"http/1.1");

    // 1 MiB in one response: at least 64 records.
    let request = get(host, "/bytes/1048576");
    let (want, _) = h1_raw(off.https(), mtls.clone(), host, request.clone()).await;
    let (got, _, end) = h1_exchange(capped.https(), mtls.clone(), host, request).await;
    // TLS 1.2 has no KeyUpdate: at the limit its connection ends in order on any kernel, as
    // rustls ends a TLS 1.2 connection.
    let tls12 = {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.server_ca.der.clone()).unwrap();
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
    };
    let plain = "a.apps.plain";
    let (got12, _, end12) = h1_exchange(
        capped.https(),
        Arc::new(tls12),
        plain,
        get(plain, "/bytes/1048576"),
    )
    .await;
    eprintln!(
        "record limit 16, TLS 1.2: the 1 MiB download ended after {} bytes with {end12:?}",
        got12.len()
    );
    assert!(end12.is_ok(), "a clean end of stream: {end12:?}");
    assert!(got12.starts_with(b"HTTP/1.1 200") && got12.len() < want.len());
    if !rekeys {
        eprintln!(
            "record limit 16, no rekeying: the 1 MiB download ended after {} bytes with {end:?}",
            got.len()
        );
        // The connection ended at the limit, in order: close_notify, then the end of the stream.
        assert!(end.is_ok(), "a clean end of stream: {end:?}");
        assert!(
            got.len() < want.len() && got.len() > 16 * 1024,
            "{} of {} bytes",
            got.len(),
            want.len()
        );
        assert_served(&capped, pki, "after a connection reached its record limit").await;
        return;
    }
    end.expect("the download is read whole");
    assert!(blank_date(got) == want, "1 MiB over rekeyed kTLS differs");

    // 30 small responses on one keep-alive connection: one record each at least.
    let tcp = TcpStream::connect(capped.https()).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(mtls)
        .connect(ServerName::try_from(host).unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let pattern: Vec<u8> = (0..100u8).map(|i| i % 251).collect();
    for i in 0..30 {
        let req = http::Request::get(format!("https://{host}/bytes/100"))
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        // The previous exchange may still be finishing in the connection task.
        send.ready().await.expect("the connection stays open");
        let resp = send.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200, "request {i}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.as_ref(), pattern.as_slice(), "request {i}");
    }

    // h2 streams, and a 300 KB upload the gateway sends on to a TLS backend.
    for (host, mtls) in [("a.apps.identity", true), ("tls.apps.plain", false)] {
        let cfg = client_config(pki, mtls, b"h2");
        let want = h2_exchange(off.https(), cfg.clone(), host, upload).await;
        let got = h2_exchange(capped.https(), cfg, host, upload).await;
        assert!(got == want, "h2 over rekeyed kTLS differs for {host}");
    }
    let host = "tls.apps.plain";
    let cfg = client_config(pki, false, b"http/1.1");
    let (want, _) = h1_raw(off.https(), cfg.clone(), host, post(host, upload)).await;
    let (got, _) = h1_raw(capped.https(), cfg, host, post(host, upload)).await;
    assert!(want.starts_with(b"HTTP/1.1 200"));
    assert!(
        got == want,
        "upload to a TLS backend over rekeyed kTLS differs"
    );

    let after = tls_stat();
    let delta = |k: &str| stat_delta(&before, &after, k);
    eprintln!(
        "record limit 16: TlsTxRekeyOk {} TlsRxRekeyOk {}",
        delta("TlsTxRekeyOk"),
        delta("TlsRxRekeyOk")
    );
    // Records of at most 16 KiB in keys of at most 15 data records, per connection: the h1
    // download (1 MiB, 64 records) 4 rekeys, the 30 small responses 2, each h2 connection (1 MiB
    // and 300 KB, 83 records) 5, the h1 upload's answer (300 KB, 19 records) 1, the uploads to
    // the TLS backend (300 KB twice) at least 2: 19 at the least.
    assert!(delta("TlsTxRekeyOk") >= 19, "{after:?}");
    assert_eq!(delta("TlsRxRekeyOk"), 0, "{after:?}");
    assert_eq!(delta("TlsTxRekeyError") + delta("TlsDecryptError"), 0);
}

/// A fresh mTLS connection gets `200` for `GET /bytes/100` on `a.apps.identity`.
async fn assert_served(gw: &TestGateway, pki: &TestPki, when: &str) {
    let host = "a.apps.identity";
    let (resp, _) = h1_raw(
        gw.https(),
        client_config(pki, true, b"http/1.1"),
        host,
        get(host, "/bytes/100"),
    )
    .await;
    assert!(resp.starts_with(b"HTTP/1.1 200"), "served {when}");
}

/// TLS 1.3 lets a peer pad its records; the gateway tells the kernel to expect none
/// (`TLS_RX_EXPECT_NO_PAD`, so records are decrypted straight into the reader's buffer). A padded
/// request must still be read exactly: the kernel counts the surprise (`TlsRxNoPadViolation`,
/// which also shows the option is set) and decrypts the record again. rustls never pads, so the
/// client here writes and reads its records itself with the keys its handshake produced.
async fn padded_records(gw: &TestGateway, pki: &TestPki) {
    use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
    use rustls::ConnectionTrafficSecrets as Secrets;

    let host = "a.apps.identity";
    let mut cfg = (*client_config(pki, true, b"http/1.1")).clone();
    cfg.enable_secret_extraction = true;
    let tcp = TcpStream::connect(gw.https()).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(host).unwrap(), tcp)
        .await
        .expect("handshake");
    // One exchange through rustls first: the session tickets that follow the handshake are read
    // and the gateway's connection is in the kernel.
    let request = format!("GET /bytes/100 HTTP/1.1\r\nhost: {host}\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let complete = |r: &[u8]| {
        r.windows(4)
            .position(|w| w == b"\r\n\r\n")
            .is_some_and(|end| r.len() >= end + 4 + 100)
    };
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while !complete(&response) {
        let n = tls.read(&mut buf).await.unwrap();
        assert!(n > 0, "the connection ended before the first response");
        response.extend_from_slice(&buf[..n]);
    }
    let (mut tcp, conn) = tls.into_inner();
    let secrets = conn.dangerous_extract_secrets().expect("secrets");
    let key = |s: Secrets| -> (LessSafeKey, [u8; 12]) {
        let (alg, key, iv) = match s {
            Secrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            Secrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            Secrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv),
            _ => panic!("not a TLS 1.3 AEAD suite"),
        };
        let key = LessSafeKey::new(UnboundKey::new(alg, key.as_ref()).unwrap());
        (key, iv.as_ref().try_into().unwrap())
    };
    let nonce = |iv: &[u8; 12], seq: u64| {
        let mut n = *iv;
        for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
            *b ^= s;
        }
        Nonce::assume_unique_for_key(n)
    };
    let (mut tx_seq, tx) = secrets.tx;
    let (mut rx_seq, rx) = secrets.rx;
    let (tx_key, tx_iv) = key(tx);
    let (rx_key, rx_iv) = key(rx);

    let before = tls_stat();
    for padding in [64usize, 0] {
        // TLSInnerPlaintext: the request, its content type, then `padding` zeros.
        let mut record = request.clone().into_bytes();
        record.push(APPLICATION_DATA);
        record.resize(record.len() + padding, 0);
        let len = (record.len() + tx_key.algorithm().tag_len()) as u16;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        tx_key
            .seal_in_place_append_tag(nonce(&tx_iv, tx_seq), Aad::from(header), &mut record)
            .unwrap();
        tx_seq += 1;
        tcp.write_all(&header).await.unwrap();
        tcp.write_all(&record).await.unwrap();
        // Records back until the whole response, skipping any that are not application data.
        let mut response = Vec::new();
        while !complete(&response) {
            let mut header = [0u8; 5];
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                tcp.read_exact(&mut header),
            )
            .await
            .unwrap_or_else(|_| panic!("padding {padding}: no answer within 10 s"))
            .unwrap_or_else(|e| panic!("padding {padding}: the connection ended: {e}"));
            let mut body = vec![0u8; u16::from_be_bytes([header[3], header[4]]) as usize];
            tcp.read_exact(&mut body).await.unwrap();
            let plain = rx_key
                .open_in_place(nonce(&rx_iv, rx_seq), Aad::from(header), &mut body)
                .expect("a record the gateway's kernel encrypted");
            rx_seq += 1;
            let end = plain.iter().rposition(|&b| b != 0).expect("a content type");
            if plain[end] == APPLICATION_DATA {
                response.extend_from_slice(&plain[..end]);
            }
        }
        assert!(
            response.starts_with(b"HTTP/1.1 200"),
            "padding {padding}: {}",
            String::from_utf8_lossy(&response)
        );
        assert!(
            response.ends_with(&(0..100).map(|i| (i % 251) as u8).collect::<Vec<u8>>()),
            "padding {padding}: the body"
        );
    }
    let after = tls_stat();
    eprintln!(
        "padded record: TlsRxNoPadViolation +{}, TlsDecryptRetry +{}",
        stat_delta(&before, &after, "TlsRxNoPadViolation"),
        stat_delta(&before, &after, "TlsDecryptRetry")
    );
    assert_eq!(
        stat_delta(&before, &after, "TlsRxNoPadViolation"),
        1,
        "the kernel expected no padding and met it once: {after:?}"
    );
    assert_eq!(stat_delta(&before, &after, "TlsDecryptError"), 0);
}

/// Records a TLS peer may send after the handshake that the gateway's kernel connection must
/// refuse without panicking: each connection ends within 5 s and the gateway keeps serving. The
/// client is itself a kernel TLS connection, so it can send records of any type.
async fn hostile_records(gw: &TestGateway, pki: &TestPki) {
    static PANICS: AtomicU64 = AtomicU64::new(0);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    let host = "a.apps.identity";
    let cases: [(&str, u8, &[u8]); 8] = [
        ("change_cipher_spec", 20, &[1]),
        ("unknown record type", 42, &[0]),
        ("malformed alert", 21, &[2, 40, 0]),
        ("unknown handshake message", 22, &[99, 0, 0, 0]),
        ("NewSessionTicket from a client", 22, &[4, 0, 0, 0]),
        ("malformed KeyUpdate", 22, &[24, 0, 0, 1, 2]),
        (
            "KeyUpdate not ending its record",
            22,
            &[24, 0, 0, 1, 0, 99, 0, 0, 0],
        ),
        ("oversized handshake message", 22, &[1, 0x7f, 0xff, 0xff]),
    ];
    for (what, record, payload) in cases {
        let mut cfg = (*client_config(pki, true, b"http/1.1")).clone();
        cfg.enable_secret_extraction = true;
        let tcp = TcpStream::connect(gw.https()).await.unwrap();
        let mut conn = portcullis::tls::connect_kernel(
            tcp,
            Arc::new(cfg),
            ServerName::try_from(host).unwrap(),
            gw.gw.state().ktls.as_deref().expect("kernel TLS"),
        )
        .await
        .unwrap();
        // One exchange first, so the gateway's connection is in the kernel.
        let request = format!("GET /bytes/100 HTTP/1.1\r\nhost: {host}\r\n\r\n");
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        let mut buf = [0u8; 4096];
        let complete = |r: &[u8]| {
            r.windows(4)
                .position(|w| w == b"\r\n\r\n")
                .is_some_and(|end| r.len() >= end + 4 + 100)
        };
        while !complete(&response) {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "{what}: connection ended before the response");
            response.extend_from_slice(&buf[..n]);
        }
        assert!(response.starts_with(b"HTTP/1.1 200"), "{what}");
        conn.send_record(record, payload).unwrap();
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what}: the gateway neither answered nor closed"));
        eprintln!("{what}: connection ended with {end:?}");
        assert!(matches!(end, Ok(0) | Err(_)), "{what}: {end:?}");
    }
    assert_served(gw, pki, "after hostile records").await;
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "a peer's record made the gateway panic"
    );
}

/// No kTLS in this kernel: `auto` serves from rustls, `on` refuses to start and says why, and the
/// real binary reports the fallback exactly once.
async fn fallback(pki: &TestPki, backend: SocketAddr, tls_backend: SocketAddr) {
    let auto = TestGateway::start(pki, &sections("auto", backend, tls_backend)).await;
    assert_served(&auto, pki, "in userspace").await;
    assert_eq!(
        auto.metric("portcullis_ktls_connections_total{mode=\"userspace\"}"),
        1.0
    );
    assert_eq!(
        auto.metric("portcullis_ktls_connections_total{mode=\"kernel\"}"),
        0.0
    );
    assert!(auto.log_lines(1).await[0].contains(" ktls:false "));

    // `on` is a promise the kernel cannot keep here: no gateway, and the reason.
    let dir = tempfile::tempdir().unwrap();
    pki.write(dir.path());
    let path = dir.path().join("portcullis.yaml");
    let yaml = format!(
        "listen: {{https: \"127.0.0.1:0\"}}\n{}",
        sections("on", backend, tls_backend)
    );
    std::fs::write(&path, &yaml).unwrap();
    let config = portcullis::config::Config::load(&path).unwrap();
    let err = match portcullis::gateway::Gateway::start(config).await {
        Ok(_) => panic!("tls.ktls: on started without kernel TLS"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("tls.ktls is on") && err.contains("TCP_ULP"),
        "{err}"
    );

    // The binary with `auto` says once, at start, that it stays in userspace.
    std::fs::write(
        &path,
        format!(
            "listen: {{https: \"127.0.0.1:0\"}}\n{}",
            sections("auto", backend, tls_backend)
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["run", "--config"])
        .arg(&path)
        .current_dir(dir.path())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut log = String::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        use tokio::io::AsyncBufReadExt;
        let (mut a, mut b) = (String::new(), String::new());
        loop {
            tokio::select! {
                n = stderr.read_line(&mut a) => if n.unwrap_or(0) == 0 { break },
                n = stdout.read_line(&mut b) => if n.unwrap_or(0) == 0 { break },
            }
            log.push_str(&a);
            log.push_str(&b);
            a.clear();
            b.clear();
            if log.contains("portcullis is serving") {
                break;
            }
        }
    })
    .await;
    let _ = child.kill().await;
    assert!(log.contains("portcullis is serving"), "{log}");
    assert_eq!(
        log.matches("kernel TLS unavailable").count(),
        1,
        "said once: {log}"
    );
}

/// The unbuffered handshake kernel connections use, on any kernel (it runs entirely in
/// userspace up to the hand-over): SNI, ALPN and the verified client certificate come out as in
/// userspace TLS; a certificate from another CA is refused with an alert the client reads and
/// the failure is classified for the metric; bytes that are not TLS are a protocol failure.
#[tokio::test]
async fn unbuffered_handshake_on_any_kernel() {
    use portcullis::tls::{accept_kernel, Alpn};
    let pki = TestPki::new();
    let (backend, _) = backend(None).await;
    let gw = TestGateway::start(&pki, &sections("off", backend, backend)).await;
    let runtime = gw.gw.state().runtime.load_full();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let deadline = std::time::Duration::from_secs(5);
    let host = "a.apps.identity";

    let client = tokio::spawn({
        let cfg = support::client::tls_config(&pki.server_ca, Some(&pki.a), &[b"h2"]);
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(ServerName::try_from(host).unwrap(), tcp)
                .await
                .unwrap();
            tls.write_all(b"after the handshake").await.unwrap();
            tls
        }
    });
    let (tcp, _) = listener.accept().await.unwrap();
    let accepted = accept_kernel(tcp, &runtime.tls, deadline, |_| None)
        .await
        .unwrap_or_else(|(_, e)| panic!("handshake: {e}"));
    let _client = client.await.unwrap();
    assert_eq!(accepted.info.sni.as_deref(), Some(host));
    assert_eq!(accepted.info.alpn, Alpn::H2);
    assert_eq!(
        accepted
            .info
            .mtls
            .as_ref()
            .map(|p| p.to_string())
            .as_deref(),
        Some("*.apps.identity")
    );
    let peer = accepted
        .info
        .peer
        .as_ref()
        .expect("the verified client certificate");
    assert!(format!("{peer:?}").contains("app-a"), "{peer:?}");

    // A certificate from another CA: refused, classified, and the client reads the alert.
    let client = tokio::spawn({
        let cfg = support::client::tls_config(&pki.server_ca, Some(&pki.wrong_ca), &[b"h2"]);
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(ServerName::try_from(host).unwrap(), tcp)
                .await?;
            let mut buf = [0u8; 16];
            tls.read(&mut buf).await
        }
    });
    let (tcp, _) = listener.accept().await.unwrap();
    let refused = accept_kernel(tcp, &runtime.tls, deadline, |_| None).await;
    let Err((pattern, failure)) = refused else {
        panic!("a certificate from another CA was accepted");
    };
    assert_eq!(failure.label(), "unknown_ca", "{failure}");
    assert_eq!(
        pattern.map(|p| p.to_string()).as_deref(),
        Some("*.apps.identity")
    );
    let read = client.await.unwrap();
    assert!(
        format!("{read:?}").contains("UnknownCA"),
        "the client reads the alert: {read:?}"
    );

    // Not TLS at all.
    let client = tokio::spawn(async move {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        tcp
    });
    let (tcp, _) = listener.accept().await.unwrap();
    let Err((_, failure)) = accept_kernel(tcp, &runtime.tls, deadline, |_| None).await else {
        panic!("plain HTTP passed as a TLS handshake");
    };
    assert_eq!(failure.label(), "protocol", "{failure}");
    drop(client);
}
