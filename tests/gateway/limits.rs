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
    use tokio::io::AsyncWriteExt;
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
