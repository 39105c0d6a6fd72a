//! `listen.proxy_protocol`: behind a load balancer, the client its PROXY protocol header names is
//! the caller everywhere (X-Forwarded-For, the access log, the daemon's allow-list and denial
//! checks); peers outside `from` cannot name one.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use portcullis::echo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::pipeline_yaml;
use crate::support::client::Conn;
use crate::support::gateway::{LogLine, TestGateway};
use crate::support::pki::TestPki;

const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A v2 header: PROXY (or LOCAL) over TCP from `source` to 10.0.0.1:443.
fn v2(source: Option<SocketAddr>) -> Vec<u8> {
    let mut h = SIGNATURE.to_vec();
    let mut body = Vec::new();
    match source {
        None => h.extend_from_slice(&[0x20, 0x00]),
        Some(SocketAddr::V4(s)) => {
            h.extend_from_slice(&[0x21, 0x11]);
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&[10, 0, 0, 1]);
            body.extend_from_slice(&s.port().to_be_bytes());
            body.extend_from_slice(&443u16.to_be_bytes());
        }
        Some(SocketAddr::V6(s)) => {
            h.extend_from_slice(&[0x21, 0x21]);
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&[0; 16]);
            body.extend_from_slice(&s.port().to_be_bytes());
            body.extend_from_slice(&443u16.to_be_bytes());
        }
    }
    // A TLV as AWS's balancers add (type 0xEA), which is skipped.
    body.extend_from_slice(&[0xEA, 0x00, 0x03, b'v', b'p', b'c']);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(&body);
    h
}

/// Connects to `to` from the local address `from` (any of 127.0.0.0/8 is this host).
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// Writes `header` (in two parts with a pause between, when `split`).
async fn send_header(tcp: &mut TcpStream, header: &[u8], split: bool) {
    if split {
        let (a, b) = header.split_at(header.len() / 2);
        tcp.write_all(a).await.unwrap();
        tcp.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        tcp.write_all(b).await.unwrap();
    } else {
        tcp.write_all(header).await.unwrap();
    }
}

/// Whether the gateway closes `tcp` (EOF or reset) within 5 s.
async fn closed_by_gateway(mut tcp: TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn a_balancers_proxy_header_names_the_client_and_no_one_else_can() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    // 127.0.0.1 is the balancer; 127.0.0.2 is a caller reaching the gateway directly.
    let extra = "listen: {https: \"127.0.0.1:0\", http: \"127.0.0.1:0\", proxy_protocol: {from: [127.0.0.1/32]}}\n";
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, extra)).await;
    let lb: IpAddr = [127, 0, 0, 1].into();
    let direct: IpAddr = [127, 0, 0, 2].into();
    let metric = |result: &str| {
        gw.metric(&format!(
            "portcullis_proxy_protocol_headers_total{{result=\"{result}\"}}"
        ))
    };
    let mtls = |tcp, h2| {
        Conn::tls_on(
            tcp,
            &pki.server_ca,
            Some("any-a.apps.identity"),
            Some(&pki.a),
            h2,
        )
    };

    // (header, split, h2, the client the gateway must see)
    let cases: [(Vec<u8>, bool, bool, &str); 4] = [
        (
            b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 443\r\n".to_vec(),
            false,
            false,
            "203.0.113.7:40000",
        ),
        (
            b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 443\r\n".to_vec(),
            true,
            true,
            "[2001:db8::7]:40001",
        ),
        (
            v2(Some("198.51.100.9:40002".parse().unwrap())),
            true,
            false,
            "198.51.100.9:40002",
        ),
        (
            v2(Some("[2001:db8::9]:40003".parse().unwrap())),
            false,
            true,
            "[2001:db8::9]:40003",
        ),
    ];
    let mut logged = 0;
    for (header, split, h2, client) in &cases {
        let mut tcp = connect_from(lb, gw.https()).await;
        send_header(&mut tcp, header, *split).await;
        let mut conn = mtls(tcp, *h2).await.unwrap();
        // Two requests: the client holds for the whole connection.
        for _ in 0..2 {
            let r = conn.get("any-a.apps.identity", "/pp").await.unwrap();
            assert_eq!(r.status, 200, "{client}");
            let ip = client.rsplit_once(':').unwrap().0.trim_matches(['[', ']']);
            assert_eq!(r.echo().headers["x-forwarded-for"], ip, "{client}");
        }
        logged += 2;
        let lines = gw.log_lines(logged).await;
        let l = LogLine::parse(&lines[logged - 1]);
        assert_eq!(l.client, *client);
        assert_eq!(
            l.field("x_forwarded_for"),
            client.rsplit_once(':').unwrap().0.trim_matches(['[', ']'])
        );
    }
    assert_eq!(metric("proxied"), 4.0);

    // A balancer's own connection (v2 LOCAL, v1 UNKNOWN) is the balancer's.
    for header in [v2(None), b"PROXY UNKNOWN\r\n".to_vec()] {
        let mut tcp = connect_from(lb, gw.https()).await;
        send_header(&mut tcp, &header, false).await;
        let r = mtls(tcp, false)
            .await
            .unwrap()
            .get("any-a.apps.identity", "/local")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.echo().headers["x-forwarded-for"], "127.0.0.1");
    }
    assert_eq!(metric("local"), 2.0);

    // The plain HTTP listener reads it too.
    let mut tcp = connect_from(lb, gw.http()).await;
    send_header(
        &mut tcp,
        b"PROXY TCP4 192.0.2.44 10.0.0.1 5000 80\r\n",
        false,
    )
    .await;
    let r = Conn::over(tcp, false)
        .await
        .unwrap()
        .get("open.apps.plain", "/plain")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().headers["x-forwarded-for"], "192.0.2.44");
    assert_eq!(metric("proxied"), 5.0);

    // From the balancer's address a header is required: TLS straight away, a malformed header
    // or a line that never ends is closed, never served as the balancer.
    let tcp = connect_from(lb, gw.https()).await;
    assert!(
        mtls(tcp, false).await.is_err(),
        "TLS without a header was served"
    );
    gw.wait_metric(
        "portcullis_proxy_protocol_headers_total{result=\"invalid\"}",
        1.0,
    )
    .await;
    for bad in [
        &b"PROXY TCP4 203.0.113.7 10.0.0.1 40000\r\n"[..],
        b"PROXY TCP4 not-an-ip 10.0.0.1 1 443\r\n",
        b"GET / HTTP/1.1\r\nHost: open.apps.plain\r\n\r\n",
    ] {
        let mut tcp = connect_from(lb, gw.https()).await;
        tcp.write_all(bad).await.unwrap();
        assert!(
            closed_by_gateway(tcp).await,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    gw.wait_metric(
        "portcullis_proxy_protocol_headers_total{result=\"invalid\"}",
        4.0,
    )
    .await;
    // tls.handshake_timeout (2 s in these tests) bounds the wait for the rest of a header.
    let mut tcp = connect_from(lb, gw.https()).await;
    tcp.write_all(b"PROXY TCP4 203.0.113.7").await.unwrap();
    let started = std::time::Instant::now();
    assert!(
        closed_by_gateway(tcp).await,
        "an unfinished header was waited on forever"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    gw.wait_metric(
        "portcullis_proxy_protocol_headers_total{result=\"timeout\"}",
        1.0,
    )
    .await;

    // A caller outside `from` is itself, and cannot name anyone else.
    let tcp = connect_from(direct, gw.https()).await;
    let r = mtls(tcp, false)
        .await
        .unwrap()
        .get("any-a.apps.identity", "/direct")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().headers["x-forwarded-for"], "127.0.0.2");
    let mut tcp = connect_from(direct, gw.https()).await;
    send_header(
        &mut tcp,
        b"PROXY TCP4 203.0.113.99 10.0.0.1 1 443\r\n",
        false,
    )
    .await;
    assert!(
        mtls(tcp, false).await.is_err(),
        "a direct caller's header was believed"
    );
    assert_eq!(
        metric("proxied"),
        5.0,
        "the direct caller's header was counted"
    );
    let lines = gw.log_lines(logged + 4).await;
    assert!(
        !lines.iter().any(|l| l.contains("203.0.113.99")),
        "the direct caller's claimed address was logged"
    );

    // A reload takes the balancer out of `from`: its connections are then its own.
    gw.reload(&pipeline_yaml(
        backend.addr,
        "listen: {https: \"127.0.0.1:0\", http: \"127.0.0.1:0\"}\n",
    ));
    let tcp = connect_from(lb, gw.https()).await;
    let r = mtls(tcp, true)
        .await
        .unwrap()
        .get("any-a.apps.identity", "/after-reload")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().headers["x-forwarded-for"], "127.0.0.1");
}

/// Behind a balancer, the decisions the XDP gate would take on a ClientHello (a domain's
/// `allowed_sources`, sources deny learning denied) fall to the daemon, and key on the client
/// the header names, never on the balancer: one denied caller must not lock out everyone
/// behind the same balancer.
#[tokio::test]
async fn behind_a_balancer_the_daemons_gate_decisions_key_on_the_named_client() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let pins = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listen: {{https: \"127.0.0.1:0\", http: \"127.0.0.1:0\", proxy_protocol: {{from: [127.0.0.1/32]}}}}\n\
         domains: [{{name: \"*.apps.identity\", ca_certs: identity-ca.pem}}, \
                   {{name: \"*.other.identity\", ca_certs: identity-ca.pem, \
                     allowed_sources: {{cidrs: [192.0.2.0/24]}}}}]\n\
         xdp:\n  interfaces: [pc-absent0]\n  pin_path: \"{pins}\"\n\
         \x20 deny_learning: {{threshold: 3, window: 10s, ttl: 60s}}\n\
         routes:\n\
         \x20 - {{uris: [a.apps.identity], host: \"127.0.0.1\", port: {port}, options: {{route_policy_scope: any, route_policy_sources: \"cf:app:app-a\"}}}}\n\
         \x20 - {{uris: [a.other.identity], host: \"127.0.0.1\", port: {port}}}\n",
        pins = pins.path().display(),
        port = backend.addr.port(),
    );
    let gw = TestGateway::start(&pki, &yaml).await;
    let lb: IpAddr = [127, 0, 0, 1].into();
    // A TLS connection through the balancer on behalf of `client`.
    let via_lb = |client: &'static str, host: &'static str, leaf| {
        let (gw, pki) = (&gw, &pki);
        async move {
            let mut tcp = connect_from(lb, gw.https()).await;
            let header = format!("PROXY TCP4 {client} 10.0.0.1 40000 443\r\n");
            send_header(&mut tcp, header.as_bytes(), false).await;
            Conn::tls_on(tcp, &pki.server_ca, Some(host), Some(leaf), false).await
        }
    };
    let handshakes = |domain: &str, result: &str| {
        format!("portcullis_tls_handshakes_total{{domain=\"{domain}\",result=\"{result}\"}}")
    };
    // `client`'s connection through the balancer ends after its ClientHello, counted as a
    // handshake with `result` on `domain`.
    let refused = |client, host, leaf, domain: &'static str, result: &'static str| {
        let (gw, via_lb) = (&gw, &via_lb);
        async move {
            assert!(
                via_lb(client, host, leaf).await.is_err(),
                "{client} was served on {host}"
            );
            gw.wait_metric(&handshakes(domain, result), 1.0).await;
        }
    };

    // `allowed_sources`: the named client is inside or outside it, the balancer never is.
    let mut inside = via_lb("192.0.2.7", "a.other.identity", &pki.a)
        .await
        .expect("a client inside allowed_sources, named by the balancer, is served");
    let r = inside.get("a.other.identity", "/").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().headers["x-forwarded-for"], "192.0.2.7");
    refused(
        "198.51.100.9",
        "a.other.identity",
        &pki.a,
        "*.other.identity",
        "not_allowed",
    )
    .await;

    // Deny learning: caller B, named 198.51.100.20, is refused by the route's policy until the
    // threshold ends its connection and denies that client, not the balancer.
    let mut b = via_lb("198.51.100.20", "a.apps.identity", &pki.b)
        .await
        .unwrap();
    for i in 1..=3 {
        let r = b.get("a.apps.identity", "/").await.unwrap();
        assert_eq!(r.status, 403, "request {i}");
    }
    assert_eq!(gw.metric("portcullis_xdp_deny_learned_total"), 1.0);
    let admin = gw.gw.admin_addr().unwrap();
    let listed = Conn::plain(admin)
        .await
        .unwrap()
        .get("admin", "/xdp/denials")
        .await
        .unwrap()
        .body;
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["source"], "198.51.100.20", "{listed}");

    // That client's next connection ends after its ClientHello ...
    refused(
        "198.51.100.20",
        "a.apps.identity",
        &pki.b,
        "*.apps.identity",
        "denied",
    )
    .await;
    // ... while another client behind the same balancer, and the balancer's own health
    // check, are still served.
    let mut other = via_lb("198.51.100.21", "a.apps.identity", &pki.a)
        .await
        .expect("a client behind the same balancer was locked out");
    assert_eq!(other.get("a.apps.identity", "/").await.unwrap().status, 200);
    let mut tcp = connect_from(lb, gw.https()).await;
    send_header(&mut tcp, &v2(None), false).await;
    let mut health = Conn::tls_on(
        tcp,
        &pki.server_ca,
        Some("a.apps.identity"),
        Some(&pki.a),
        false,
    )
    .await
    .expect("the balancer's own connection was refused");
    assert_eq!(
        health.get("a.apps.identity", "/").await.unwrap().status,
        200
    );
    assert_eq!(gw.metric(&handshakes("*.apps.identity", "denied")), 1.0);
}
