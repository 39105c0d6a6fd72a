//! Limits a production gateway needs: header size, handshake deadline, idle connections.

use std::time::{Duration, Instant};

use portcullis::echo;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::route;
use crate::support::client::Conn;
use crate::support::gateway::TestGateway;
use crate::support::pki::TestPki;

async fn gateway(pki: &TestPki) -> TestGateway {
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let mut y = String::from(
        "tls:\n  certificates: [{cert_chain: server.pem, private_key: server.key}]\n  handshake_timeout: 1s\n\
         limits: {max_header_bytes: 8192, idle_timeout: 1s}\nroutes:\n",
    );
    y += &route("open.apps.plain", backend.addr, "app_id: x", "");
    TestGateway::start(pki, &y).await
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let pki = TestPki::new();
    let gw = gateway(&pki).await;
    let mut c = Conn::tls(
        gw.https(),
        &pki.server_ca,
        Some("open.apps.plain"),
        None,
        false,
    )
    .await
    .unwrap();
    let big = "x".repeat(20_000);
    let req = c.build("open.apps.plain", "/", &[("x-big", &big)]);
    assert_eq!(c.send(req).await.unwrap().status, 431);
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
