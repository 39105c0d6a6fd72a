//! The `portcullis` binary: the demo, `check`, `explain`, and SIGHUP reload.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use portcullis::echo;
use support::client::Conn;
use support::pki::TestPki;
use support::process::{Running, BIN};

#[test]
fn demo_prints_curl_commands_that_give_200_and_403() {
    let mut demo = Running::start(&[
        "run",
        "--demo-listen",
        "127.0.0.1:0",
        "--demo-admin",
        "127.0.0.1:0",
    ]);
    demo.wait_for("/metrics");
    let commands: Vec<String> = demo
        .seen
        .iter()
        .filter(|l| l.trim_start().starts_with("curl -sS -i"))
        .map(|l| l.trim().to_string())
        .collect();
    assert_eq!(commands.len(), 3, "{:#?}", demo.seen);
    let status = |cmd: &str| {
        let out = Command::new("sh")
            .args(["-c", &format!("timeout 20 {cmd}")])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let first = text.lines().next().unwrap_or_default().to_string();
        assert!(
            first.starts_with("HTTP/"),
            "{cmd}\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        first
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u16>()
            .unwrap()
    };
    assert_eq!(status(&commands[0]), 200, "allowed caller");
    assert_eq!(status(&commands[1]), 403, "denied caller");
    assert_eq!(status(&commands[2]), 200, "same-space caller");
    // The printed explain command works too and names the deciding rule.
    let explain = demo
        .seen
        .iter()
        .find(|l| l.trim_start().starts_with("portcullis explain"))
        .unwrap()
        .trim()
        .to_string();
    let args: Vec<&str> = explain.split_whitespace().skip(1).collect();
    let out = Command::new(BIN).args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("decision:  deny (route:route_policies)"),
        "{text}"
    );
    // Denials are not logged per request on stderr (SPEC §13): only start-up lines are there.
    std::thread::sleep(Duration::from_millis(200));
    while let Ok(l) = demo.lines.try_recv() {
        assert!(
            !l.contains("403") && !l.to_lowercase().contains("denied"),
            "per-request log line: {l}"
        );
    }
    // SIGTERM ends the demo cleanly, and it removes its throwaway PKI and config.
    let dir = demo
        .seen
        .iter()
        .find_map(|l| {
            let rest = l.split("throwaway PKI in ").nth(1)?;
            Some(rest.split(')').next()?.to_string())
        })
        .expect("the demo names its folder");
    assert!(std::path::Path::new(&dir).is_dir(), "{dir}");
    let status = demo.terminate().expect("the demo exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
}

/// Sends three ClientHellos whose SNI is an IP address (which RFC 6066 forbids and some clients
/// send anyway) to the demo started with `log` as `PORTCULLIS_LOG`, and returns every stderr line
/// the process wrote until it exited.
fn stderr_after_ip_sni_hellos(log: Option<&str>) -> Vec<String> {
    use std::io::{Read, Write};
    use support::packets::{client_hello, SniAt};
    let mut demo = Running::start_logging(
        &[
            "run",
            "--demo-listen",
            "127.0.0.1:0",
            "--demo-admin",
            "127.0.0.1:0",
        ],
        log,
    );
    let serving = demo.wait_for("portcullis is serving");
    let https = serving
        .split("https=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the serving line names the https address")
        .to_string();
    demo.wait_for("/metrics");
    for _ in 0..3 {
        let mut s = std::net::TcpStream::connect(&https).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&client_hello("127.0.0.1", SniAt::First, 32, 0))
            .unwrap();
        // The gateway has parsed the hello once it answers (an alert or a ServerHello) or closes.
        let mut buf = [0u8; 512];
        let _ = s.read(&mut buf);
    }
    assert!(demo.terminate().is_some(), "the demo exits on SIGTERM");
    // The reader thread ends at the pipe's end of file, so this sees every line written.
    let mut lines = std::mem::take(&mut demo.seen);
    lines.extend(demo.lines.iter());
    lines
}

#[test]
fn peers_cannot_write_rustls_warnings_to_the_log_by_default() {
    let default = stderr_after_ip_sni_hellos(None);
    assert!(
        default.iter().all(|l| !l.contains("Illegal SNI")),
        "{default:#?}"
    );
    // The operator can still ask for them, which also shows the hellos reached rustls.
    let asked = stderr_after_ip_sni_hellos(Some("info"));
    let warned = asked.iter().filter(|l| l.contains("Illegal SNI")).count();
    assert_eq!(warned, 3, "{asked:#?}");
    // A filter that does not parse is reported, and the default applies.
    let bad = stderr_after_ip_sni_hellos(Some("rustls=loud"));
    assert!(
        bad.iter()
            .any(|l| l.contains("PORTCULLIS_LOG=\"rustls=loud\" is not a log filter")),
        "{bad:#?}"
    );
    assert!(bad.iter().all(|l| !l.contains("Illegal SNI")), "{bad:#?}");
    assert!(bad.iter().any(|l| l.contains("portcullis is serving")));
}

fn write_config(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_lists_every_problem_with_key_paths() {
    let dir = tempfile::tempdir().unwrap();
    TestPki::new().write(dir.path());
    let bad = write_config(
        dir.path(),
        "bad.yaml",
        r#"
listen: {https: "not-an-address"}
tls:
  certificates: [{cert_chain: missing.pem, private_key: server.key}]
  handshake_timeout: soon
  colour: blue
forwarded_client_cert: foo
domains:
  - {name: "a.*.identity", ca_certs: identity-ca.pem, forwarded_client_cert: bar}
  - {name: "*.ok.identity", ca_certs: nowhere.pem, xfcc_format: xml}
authorization: {endpoint_selection: maybe}
routes:
  - {uris: [x.ok.identity], port: 80}
  - {uris: [y.ok.identity], host: 10.0.0.1, port: 80, options: {route_policy_sources: "cf:app:A, bogus"}}
xdp: {reject: explode, deny_learning: {exempt: ["10.0.0.0/33"]}}
"#,
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "listen.https: invalid address 'not-an-address'",
        "tls.certificates[0].cert_chain: cannot read",
        "tls.handshake_timeout: invalid duration 'soon'",
        "tls.colour: unknown key",
        "forwarded_client_cert: invalid mode 'foo', must be one of always_forward, forward, sanitize_set",
        "domains[0].name: 'a.*.identity'",
        "domains[0].forwarded_client_cert: invalid mode 'bar'",
        "domains[1].ca_certs: cannot read",
        "domains[1].xfcc_format: invalid format 'xml', must be one of raw, envoy",
        "authorization.endpoint_selection: invalid mode 'maybe', must be one of filter, strict",
        "routes[0]: missing host",
        "routes[1].options.route_policy_sources: malformed source 'bogus'",
        "xdp.reject: invalid action 'explode', must be one of reset, drop",
        "xdp.deny_learning.exempt[0]: invalid CIDR '10.0.0.0/33'",
    ] {
        assert!(err.contains(expected), "missing '{expected}' in:\n{err}");
    }
    assert!(err.contains(&bad.display().to_string()), "names the file");

    // One clear line each, never a panic.
    let cases = [
        ("yaml.yaml", "listen: {https: \"a\"\ndomains: : :\n", "invalid YAML: did not find expected ',' or '}' at line 2 column 1"),
        ("type.yaml", "listen: {https: \"127.0.0.1:1\"}\ndomains: 7\n", "domains: invalid type"),
        ("pem.yaml", "listen: {https: \"127.0.0.1:1\"}\ntls: {certificates: [{cert_chain: junk.pem, private_key: server.key}]}\n", "no CERTIFICATE block"),
        ("key.yaml", "listen: {https: \"127.0.0.1:1\"}\ntls: {certificates: [{cert_chain: server.pem, private_key: identity-ca.pem}]}\n", "private_key"),
    ];
    std::fs::write(dir.path().join("junk.pem"), "this is not PEM\n").unwrap();
    for (name, text, expected) in cases {
        let p = write_config(dir.path(), name, text);
        let out = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(expected), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/portcullis.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
}

fn reload_config(https_port: u16, sources: &str, backend: std::net::SocketAddr) -> String {
    format!(
        r#"listen: {{https: "127.0.0.1:{https_port}"}}
tls: {{certificates: [{{cert_chain: server.pem, private_key: server.key}}]}}
domains: [{{name: "*.apps.identity", ca_certs: identity-ca.pem}}]
access_log: {{path: access.log}}
routes:
  - uris: [r.apps.identity, slow.apps.identity]
    host: "{ip}"
    port: {port}
    tags: {{app_id: backend}}
    options: {{route_policy_scope: any, route_policy_sources: "{sources}"}}
"#,
        ip = backend.ip(),
        port = backend.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_flips_policy_without_dropping_connections() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.write(dir.path());
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    // Port 0, the same in every version of the config (a listener cannot change on reload);
    // the gateway logs the address it bound.
    let port = 0;
    let cfg = write_config(
        dir.path(),
        "portcullis.yaml",
        &reload_config(port, "cf:app:app-b", backend.addr),
    );
    let mut gw = Running::start(&["run", "--config", cfg.to_str().unwrap()]);
    let serving = gw.wait_for("portcullis is serving");
    let addr = Running::served_addr(&serving, "https=");

    let mut a = caller(addr, &pki, false).await;
    assert_eq!(a.get("r.apps.identity", "/").await.unwrap().status, 403);

    // A long request, allowed for B, on another connection.
    let mut long = Conn::tls(
        addr,
        &pki.server_ca,
        Some("slow.apps.identity"),
        Some(&pki.b),
        true,
    )
    .await
    .unwrap();
    let slow = tokio::spawn(async move {
        long.get("slow.apps.identity", "/slow?ms=2500")
            .await
            .map(|r| r.status)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    write_config(
        dir.path(),
        "portcullis.yaml",
        &reload_config(port, "cf:app:app-a, cf:app:app-b", backend.addr),
    );
    assert!(gw.signal(libc::SIGHUP));
    gw.wait_for("configuration reloaded");
    // The next request on the same, already established connection is allowed.
    assert_eq!(a.get("r.apps.identity", "/").await.unwrap().status, 200);
    assert_eq!(
        slow.await.unwrap().unwrap(),
        200,
        "the long request survived the reload"
    );

    // A broken config on SIGHUP keeps the running one.
    write_config(dir.path(), "portcullis.yaml", "listen: [broken\n");
    assert!(gw.signal(libc::SIGHUP));
    gw.wait_for("reload failed; keeping the running configuration");
    assert_eq!(a.get("r.apps.identity", "/").await.unwrap().status, 200);
}

/// `SIGUSR1` reopens the access log at the running config's path, for log rotation
/// (`dist/portcullis.logrotate`): lines go to the new file from then on. It does not read the
/// config file, so a rotation works while the file on disk is mid-edit or broken. A SIGHUP
/// whose reload fails on such a file reopens the log at the running config's path too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_access_log_whatever_the_config_file_holds() {
    let pki = TestPki::new();
    let (dir, _backend, cfg) = started_config(&pki).await;
    let mut gw = Running::start(&["run", "--config", cfg.to_str().unwrap()]);
    let serving = gw.wait_for("portcullis is serving");
    let addr = Running::served_addr(&serving, "https=");
    let mut a = caller(addr, &pki, false).await;
    let log = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let holds = |path: &std::path::Path, what: &str| {
        std::fs::read_to_string(path).is_ok_and(|t| t.contains(what))
    };
    let wait_for_line = |path: std::path::PathBuf, what: &'static str| async move {
        for _ in 0..100 {
            if std::fs::read_to_string(&path).is_ok_and(|t| t.contains(what)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} never held {what}", path.display());
    };

    assert_eq!(
        a.get("r.apps.identity", "/before").await.unwrap().status,
        200
    );
    wait_for_line(log.clone(), "/before").await;
    std::fs::rename(&log, &rotated).unwrap();
    write_config(dir.path(), "portcullis.yaml", "listen: [broken\n");
    assert!(gw.signal(libc::SIGUSR1));
    gw.wait_for("SIGUSR1: access log reopened");
    assert_eq!(
        a.get("r.apps.identity", "/after").await.unwrap().status,
        200
    );
    wait_for_line(log.clone(), "/after").await;
    assert!(!holds(&log, "/before"), "the new file starts empty");
    assert!(holds(&rotated, "/before") && !holds(&rotated, "/after"));

    // A rotation whose SIGHUP meets the broken file: the reload fails, the log is reopened all
    // the same (a reload that takes reopens it at the new config's path).
    let rotated = dir.path().join("access.log.hup");
    std::fs::rename(&log, &rotated).unwrap();
    assert!(gw.signal(libc::SIGHUP));
    gw.wait_for("SIGHUP: access log reopened at the running configuration's path");
    assert_eq!(a.get("r.apps.identity", "/hup").await.unwrap().status, 200);
    wait_for_line(log.clone(), "/hup").await;
    assert!(holds(&rotated, "/after") && !holds(&rotated, "/hup"));

    // A path that cannot be opened keeps the file already open.
    let open = dir.path().join("access.log.2");
    std::fs::rename(&log, &open).unwrap();
    std::fs::create_dir(&log).unwrap();
    assert!(gw.signal(libc::SIGUSR1));
    gw.wait_for("SIGUSR1: access log not reopened");
    assert_eq!(a.get("r.apps.identity", "/kept").await.unwrap().status, 200);
    wait_for_line(open, "/kept").await;
}

/// A gateway with `drain` set, its route allowing caller A.
struct Draining {
    gw: Running,
    https: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    _backend: echo::EchoServer,
}

async fn draining_gateway(pki: &TestPki, dir: &std::path::Path, drain: &str) -> Draining {
    pki.write(dir);
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let yaml = format!(
        "{}admin: {{listen: \"127.0.0.1:0\"}}\ndrain: {drain}\n",
        reload_config(0, "cf:app:app-a", backend.addr)
    );
    let cfg = write_config(dir, "portcullis.yaml", &yaml);
    let mut gw = Running::start(&["run", "--config", cfg.to_str().unwrap()]);
    let serving = gw.wait_for("portcullis is serving");
    Draining {
        https: Running::served_addr(&serving, "https="),
        admin: Running::served_addr(&serving, "admin="),
        gw,
        _backend: backend,
    }
}

async fn health(admin: std::net::SocketAddr) -> (u16, String) {
    let mut c = Conn::plain(admin).await.expect("admin reachable");
    let r = c.get("localhost", "/health").await.expect("health answers");
    (r.status, r.body)
}

/// A connection for r.apps.identity as caller A.
async fn caller(addr: std::net::SocketAddr, pki: &TestPki, h2: bool) -> Conn {
    Conn::tls(
        addr,
        &pki.server_ca,
        Some("r.apps.identity"),
        Some(&pki.a),
        h2,
    )
    .await
    .expect("connects")
}

/// SIGTERM with `drain.wait`: the gateway goes on serving (new connections too) while /health
/// says 503 and its connections are closed after their requests, so a load balancer and the
/// clients move away; then the listeners close, the request in flight finishes and it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_behind_a_failing_health_check_then_stops() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let d = draining_gateway(&pki, dir.path(), "{wait: 4s, timeout: 8s}").await;
    let (mut gw, addr, admin) = (d.gw, d.https, d.admin);
    assert_eq!(health(admin).await, (200, "ok\n".to_string()));
    let mut h1 = caller(addr, &pki, false).await;
    let mut h2 = caller(addr, &pki, true).await;
    for c in [&mut h1, &mut h2] {
        let r = c.get("r.apps.identity", "/").await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), None);
    }
    // A request that is still in flight when the listeners close.
    let mut long = caller(addr, &pki, false).await;
    let slow = tokio::spawn(async move {
        long.get("r.apps.identity", "/slow?ms=5500")
            .await
            .map(|r| (r.status, Instant::now()))
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let signalled = Instant::now();
    assert!(gw.signal(libc::SIGTERM));
    gw.wait_for("draining: /health answers 503");
    assert_eq!(
        health(admin).await,
        (503, "draining: stopping soon\n".to_string())
    );
    // HTTP/1.1: served, and told to close.
    let r = h1.get("r.apps.identity", "/").await.unwrap();
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(
        h1.get("r.apps.identity", "/").await.is_err(),
        "the HTTP/1.1 connection is closed after that response"
    );
    // h2: sent GOAWAY, so the connection ends without a request to carry the news.
    let ended = async {
        loop {
            if h2.get("r.apps.identity", "/").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    support::bounded("the h2 connection ends", ended).await;
    assert!(
        signalled.elapsed() < Duration::from_secs(4),
        "the h2 connection ended during the wait, not when the listeners closed"
    );
    // New connections are still served during the wait, and closed after their response.
    let mut late = caller(addr, &pki, false).await;
    let r = late.get("r.apps.identity", "/").await.unwrap();
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    let mut late_h2 = caller(addr, &pki, true).await;
    assert_eq!(
        late_h2.get("r.apps.identity", "/").await.unwrap().status,
        200
    );
    let ended = async {
        while late_h2.get("r.apps.identity", "/").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    support::bounded("the new h2 connection ends", ended).await;
    assert!(
        signalled.elapsed() < Duration::from_secs(4),
        "the new h2 connection ended during the wait, after its first request"
    );

    // After the wait the listeners close…
    let refused = async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        signalled.elapsed()
    };
    let after = support::bounded("the listener closes", refused).await;
    assert!(after >= Duration::from_secs(4), "refused after {after:?}");
    gw.wait_for("closing the listeners; waiting for requests in flight");
    // …the request in flight still gets its answer, and then the process exits cleanly.
    let (status, answered) = slow.await.unwrap().expect("the slow request is answered");
    assert_eq!(status, 200);
    let status = gw
        .exited_within(Duration::from_secs(8))
        .expect("exits once the last request is answered");
    assert!(status.success(), "{status:?}");
    assert!(
        answered.elapsed() < Duration::from_secs(3),
        "exited about when the last request was answered"
    );
    assert!(
        !gw.seen.iter().any(|l| l.contains("drain timeout ran out")),
        "{:?}",
        gw.seen
    );
}

/// A second SIGTERM cuts the drain wait short, and requests still in flight after
/// `drain.timeout` are cut, with a warning saying how many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_wait_and_the_timeout_bounds_the_rest() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let d = draining_gateway(&pki, dir.path(), "{wait: 60s, timeout: 1s}").await;
    let (mut gw, addr) = (d.gw, d.https);
    let mut long = caller(addr, &pki, false).await;
    let slow = tokio::spawn(async move { long.get("r.apps.identity", "/slow?ms=30000").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(gw.signal(libc::SIGTERM));
    gw.wait_for("draining: /health answers 503");
    let again = Instant::now();
    assert!(gw.signal(libc::SIGTERM));
    gw.wait_for("asked again to stop: the drain wait is cut short");
    gw.wait_for("connections still open when the drain timeout ran out");
    let status = gw
        .exited_within(Duration::from_secs(5))
        .expect("exits after the drain timeout");
    assert!(status.success(), "{status:?}");
    let took = again.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(
        support::bounded("the cut request", slow)
            .await
            .unwrap()
            .is_err(),
        "the request still in flight is cut"
    );
}

/// Asking again once the listeners are closed cuts the requests still in flight at once,
/// without waiting out `drain.timeout`: the third signal with a drain wait, the second without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asking_again_after_the_wait_cuts_the_requests_in_flight() {
    for (drain, signals) in [("{wait: 60s, timeout: 60s}", 3), ("{timeout: 60s}", 2)] {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().unwrap();
        let d = draining_gateway(&pki, dir.path(), drain).await;
        let (mut gw, addr) = (d.gw, d.https);
        let mut long = caller(addr, &pki, false).await;
        let slow = tokio::spawn(async move { long.get("r.apps.identity", "/slow?ms=50000").await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(gw.signal(libc::SIGTERM));
        if signals == 3 {
            gw.wait_for("draining: /health answers 503");
            assert!(gw.signal(libc::SIGTERM));
            gw.wait_for("asked again to stop: the drain wait is cut short");
        }
        gw.wait_for("closing the listeners; waiting for requests in flight");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            gw.exited_within(Duration::from_millis(10)).is_none(),
            "{drain}: still waiting for the request in flight"
        );
        let last = Instant::now();
        assert!(gw.signal(libc::SIGTERM));
        let cut = gw.wait_for("asked again to stop: connections still open are cut now");
        assert!(cut.contains("connections=1"), "{drain}: {cut}");
        let status = gw
            .exited_within(Duration::from_secs(5))
            .expect("exits when asked again");
        assert!(status.success(), "{drain}: {status:?}");
        assert!(last.elapsed() < Duration::from_secs(3), "{drain}");
        assert!(
            support::bounded("the cut request", slow)
                .await
                .unwrap()
                .is_err(),
            "{drain}: the request in flight is cut"
        );
        assert!(
            !gw.seen.iter().any(|l| l.contains("drain timeout ran out")),
            "{drain}: {:?}",
            gw.seen
        );
    }
}

/// The config of the open-files tests: a plain HTTP listener with one route, and
/// `limits.max_connections` 1000 (about 2,064 files needed).
async fn files_config(
    pki: &TestPki,
    dir: &std::path::Path,
) -> (std::path::PathBuf, echo::EchoServer) {
    pki.write(dir);
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let yaml = format!(
        r#"listen: {{https: "127.0.0.1:0", http: "127.0.0.1:0"}}
admin: {{listen: "127.0.0.1:0"}}
tls: {{certificates: [{{cert_chain: server.pem, private_key: server.key}}]}}
access_log: {{path: access.log}}
limits: {{max_connections: 1000}}
routes:
  - uris: [open.apps.plain]
    host: "{ip}"
    port: {port}
"#,
        ip = backend.addr.ip(),
        port = backend.addr.port()
    );
    (write_config(dir, "portcullis.yaml", &yaml), backend)
}

/// The soft and hard open-files limits of a running process.
fn open_files_of(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut n = line["Max open files".len()..]
        .split_whitespace()
        .map(|v| v.parse().unwrap());
    (n.next().unwrap(), n.next().unwrap())
}

/// Services start with a soft open-files limit of 1,024 (systemd's default), which would stop
/// accepting at a few hundred connections: the gateway raises it to the hard limit, and says at
/// start when even that is short of `limits.max_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_files_limit_is_raised_and_checked_against_max_connections() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _backend) = files_config(&pki, dir.path()).await;
    let args = ["run", "--config", cfg.to_str().unwrap()];

    let mut roomy = Running::start_with_open_files(&args, 64, 4096);
    roomy.wait_for("portcullis is serving");
    assert_eq!(open_files_of(roomy.child.id()), (4096, 4096));
    assert!(
        !roomy.seen.iter().any(|l| l.contains("open-files limit")),
        "{:?}",
        roomy.seen
    );
    drop(roomy);

    let mut short = Running::start_with_open_files(&args, 64, 1024);
    let warning = short.wait_for("open-files limit (RLIMIT_NOFILE) is short");
    for field in [
        "limits.max_connections=1000",
        "open_files=1024",
        "admin.max_connections=64",
        "needed=2128",
    ] {
        assert!(warning.contains(field), "{field} in {warning}");
    }
    short.wait_for("portcullis is serving");
    assert_eq!(open_files_of(short.child.id()), (1024, 1024));
}

/// Out of file descriptors, a listener neither spins nor fills the log: connections wait in the
/// backlog, the failures are counted and said once, and it accepts again once files free up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_files_a_listener_waits_quietly_and_recovers() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _backend) = files_config(&pki, dir.path()).await;
    let mut gw =
        Running::start_with_open_files(&["run", "--config", cfg.to_str().unwrap()], 128, 128);
    let serving = gw.wait_for("portcullis is serving");
    let http = Running::served_addr(&serving, "http=");
    let admin = Running::served_addr(&serving, "admin=");
    let mut c = Conn::plain(http).await.unwrap();
    assert_eq!(c.get("open.apps.plain", "/").await.unwrap().status, 200);
    drop(c);

    // More connections than the gateway has files for; each waits for its first request.
    let mut held = Vec::new();
    for _ in 0..160 {
        held.push(tokio::net::TcpStream::connect(http).await.unwrap());
    }
    gw.wait_for("accept failed");
    // The listener retries every 50 ms; in 1.5 s it says so once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    while let Ok(l) = gw.lines.try_recv() {
        gw.seen.push(l);
    }
    let said = gw
        .seen
        .iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert_eq!(said, 1, "{:?}", gw.seen);
    assert!(gw.child.try_wait().unwrap().is_none(), "still running");

    // The held connections go; the backlog drains and new requests are served again.
    drop(held);
    let served = async {
        loop {
            if let Ok(mut c) = Conn::plain(http).await {
                if let Ok(r) = c.get("open.apps.plain", "/").await {
                    return r.status;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(support::bounded("served again", served).await, 200);
    let mut m = Conn::plain(admin).await.unwrap();
    let metrics = m.get("localhost", "/metrics").await.unwrap().body;
    let errors: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_accept_errors_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no accept_errors in {metrics}"));
    assert!(errors > 10.0, "{errors} accept failures counted");
}

/// The gauge line of one certificate in a `/metrics` text, if present.
fn expiry_sample<'a>(metrics: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("portcullis_certificate_expiry_timestamp_seconds{{key=\"{key}\",");
    metrics.lines().find(|l| l.starts_with(&prefix))
}

async fn metrics_text(admin: std::net::SocketAddr) -> String {
    let mut c = Conn::plain(admin).await.expect("admin reachable");
    let r = c
        .get("localhost", "/metrics")
        .await
        .expect("metrics answer");
    assert_eq!(r.status, 200);
    r.body
}

/// Every loaded certificate's notAfter is a gauge; one about to expire, expired or not valid yet
/// is said by `check` (exit 0: the config is valid) and in the log at start, and a reload with
/// renewed files replaces the series and says nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_expiry_is_exported_and_said_by_check_start_and_reload() {
    use portcullis::pki::{Ca, Validity};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let day = 86_400;
    // The server certificate ends in 10 days and an hour; the identity bundle is mid-rotation:
    // an old root that has expired, then the current one.
    let ends = now + 10 * day + 3_600;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.write(dir.path());
    let names = ["localhost", "*.apps.identity"];
    let soon = pki
        .server_ca
        .server_valid(&names, Validity::Unix(now - day, ends))
        .unwrap();
    std::fs::write(dir.path().join("server.pem"), &soon.chain_pem).unwrap();
    std::fs::write(dir.path().join("server.key"), &soon.key_pem).unwrap();
    let old_root = Ca::root_valid("old identity root", Validity::Expired).unwrap();
    std::fs::write(
        dir.path().join("identity-ca.pem"),
        format!("{}{}", old_root.cert_pem, pki.identity_root.cert_pem),
    )
    .unwrap();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let yaml = format!(
        "{}admin: {{listen: \"127.0.0.1:0\"}}\nbackends: {{ca_certs: backend-ca.pem}}\n",
        reload_config(0, "cf:app:app-a", backend.addr)
    );
    let cfg = write_config(dir.path(), "portcullis.yaml", &yaml);
    let ends_at =
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(ends))
            .to_string();

    // check: valid, with one warning per certificate that needs attention, and no other.
    let out = Command::new(BIN)
        .args(["check", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": valid\n"));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            format!(
                "warning: tls.certificates[0].cert_chain[0] ('server.pem', CN=localhost): \
                 expires on {ends_at} (10 days left)"
            ),
            "warning: domains[0].ca_certs[0] ('identity-ca.pem', CN=old identity root): \
             expired on 2021-01-01T00:00:00Z"
                .to_string(),
        ]
    );

    // check --strict: the same two refuse the config.
    let out = Command::new(BIN)
        .args(["check", "--strict", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            format!(
                "{}: 2 problem(s) (--strict: certificate dates):",
                cfg.display()
            ),
            format!(
                "  tls.certificates[0].cert_chain[0] ('server.pem', CN=localhost): \
                 expires on {ends_at} (10 days left)"
            ),
            "  domains[0].ca_certs[0] ('identity-ca.pem', CN=old identity root): \
             expired on 2021-01-01T00:00:00Z"
                .to_string(),
        ]
    );

    // run: the same two said at start, and every certificate exported.
    let mut gw = Running::start(&["run", "--config", cfg.to_str().unwrap()]);
    let serving = gw.wait_for("portcullis is serving");
    let said: Vec<&String> = gw
        .seen
        .iter()
        .filter(|l| l.contains("certificate"))
        .collect();
    assert_eq!(said.len(), 2, "{said:#?}");
    assert!(
        said[0].contains("WARN")
            && said[0].contains("certificate expires soon")
            && said[0].contains("tls.certificates[0].cert_chain[0]")
            && said[0].contains("days_left=10"),
        "{}",
        said[0]
    );
    assert!(
        said[1].contains("ERROR")
            && said[1].contains("certificate has expired")
            && said[1].contains("domains[0].ca_certs[0]")
            && said[1].contains("2021-01-01T00:00:00Z"),
        "{}",
        said[1]
    );
    let admin = Running::served_addr(&serving, "admin=");
    let https = Running::served_addr(&serving, "https=");
    let m = metrics_text(admin).await;
    assert_eq!(
        expiry_sample(&m, "tls.certificates[0].cert_chain[0]"),
        Some(
            format!(
                "portcullis_certificate_expiry_timestamp_seconds{{key=\"tls.certificates[0].\
                 cert_chain[0]\",file=\"server.pem\",subject=\"CN=localhost\"}} {ends}"
            )
            .as_str()
        )
    );
    // 2021-01-01 and 2060-01-01: the old root and the current one, each its own series.
    assert!(expiry_sample(&m, "domains[0].ca_certs[0]")
        .is_some_and(|l| l.ends_with("subject=\"CN=old identity root\"} 1609459200")));
    assert!(expiry_sample(&m, "domains[0].ca_certs[1]")
        .is_some_and(|l| l.ends_with("subject=\"CN=test identity root\"} 2840140800")));
    assert!(expiry_sample(&m, "backends.ca_certs[0]")
        .is_some_and(|l| l.ends_with("subject=\"CN=test backend CA\"} 2840140800")));
    // The gateway serves with them (the current root verifies caller A).
    assert_eq!(
        caller(https, &pki, false)
            .await
            .get("r.apps.identity", "/")
            .await
            .unwrap()
            .status,
        200
    );

    // Renewed files and SIGHUP: the series follow, the old root's is gone, nothing is said.
    pki.write(dir.path());
    assert!(gw.signal(libc::SIGHUP));
    gw.wait_for("configuration reloaded");
    let m = metrics_text(admin).await;
    assert!(expiry_sample(&m, "tls.certificates[0].cert_chain[0]")
        .is_some_and(|l| l.ends_with(" 2840140800")));
    assert!(expiry_sample(&m, "domains[0].ca_certs[0]")
        .is_some_and(|l| l.contains("CN=test identity root")));
    assert_eq!(expiry_sample(&m, "domains[0].ca_certs[1]"), None);
    let at_reload = gw
        .seen
        .iter()
        .rev()
        .take_while(|l| !l.contains("portcullis is serving"));
    assert_eq!(
        at_reload.filter(|l| l.contains("certificate")).count(),
        0,
        "{:#?}",
        gw.seen
    );
    // And the renewed config passes check --strict.
    let out = Command::new(BIN)
        .args(["check", "--strict", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
}

/// `PORTCULLIS_LOG_FORMAT=json`: every operational log line is one JSON object with the event's
/// fields beside timestamp, level, target and message; another value is said and text written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.write(dir.path());
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let yaml = format!(
        "{}admin: {{listen: \"127.0.0.1:0\"}}\n",
        reload_config(0, "cf:app:app-a", backend.addr)
    );
    let cfg = write_config(dir.path(), "portcullis.yaml", &yaml);
    let run = |format: &str| {
        let mut cmd = Command::new(BIN);
        cmd.env("PORTCULLIS_LOG", "info")
            .env("PORTCULLIS_LOG_FORMAT", format)
            .args(["run", "--config", cfg.to_str().unwrap()]);
        Running::spawn(&mut cmd)
    };

    let mut gw = run("json");
    gw.wait_for("portcullis is serving");
    assert!(gw.signal(libc::SIGHUP));
    gw.wait_for("configuration reloaded");
    assert!(gw.terminate().is_some_and(|s| s.success()));
    while let Ok(l) = gw.lines.try_recv() {
        gw.seen.push(l);
    }
    let events: Vec<serde_json::Value> = gw
        .seen
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for e in &events {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(e[key].is_string(), "{key} in {e}");
        }
    }
    let serving = events
        .iter()
        .find(|e| e["message"] == "portcullis is serving")
        .expect("serving event");
    assert_eq!(serving["level"], "INFO");
    // The event's own fields are top-level keys.
    let https: std::net::SocketAddr = serving["https"].as_str().unwrap().parse().unwrap();
    assert_ne!(https.port(), 0);
    assert!(events
        .iter()
        .any(|e| e["message"] == "configuration reloaded"));

    let mut gw = run("yaml");
    let said = gw.wait_for("PORTCULLIS_LOG_FORMAT");
    assert!(
        said.contains("WARN") && said.contains("neither text nor json"),
        "{said}"
    );
    gw.wait_for("portcullis is serving");
}

/// A `systemctl reload` or stop can come while the gateway is still starting: a SIGHUP that
/// arrives once the process has said anything is acted on (a reload once it serves), never the
/// signal's default action, which would end the process uncleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_during_start_up_reloads_once_serving_instead_of_killing() {
    let (_dir, _backend, cfg) = started_config(&TestPki::new()).await;
    let mut gw = Running::spawn(Command::new(BIN).env("PORTCULLIS_LOG", "debug").args([
        "run",
        "--config",
        cfg.to_str().unwrap(),
    ]));
    // Its first line: start-up is under way (loading, probing the kernel, binding).
    let first = gw
        .lines
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the gateway says something as it starts");
    gw.seen.push(first);
    assert!(gw.signal(libc::SIGHUP), "the process is gone");
    gw.wait_for("portcullis is serving");
    gw.wait_for("configuration reloaded");
    assert!(gw.terminate().is_some_and(|s| s.success()), "{:?}", gw.seen);
}

/// Under `Type=notify` (dist/portcullis.service), systemd learns from `NOTIFY_SOCKET` when the
/// gateway serves (so `systemctl start` returns then, not at exec), when it reloads and how that
/// went (`systemctl status` shows it), and when it drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_manager_is_told_ready_reloading_and_stopping() {
    let (dir, _backend, cfg) = started_config(&TestPki::new()).await;
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let next = || {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a notification within 20 s");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    };
    let mut gw = Running::spawn(Command::new(BIN).env("NOTIFY_SOCKET", &socket_path).args([
        "run",
        "--config",
        cfg.to_str().unwrap(),
    ]));
    assert_eq!(next(), "READY=1\nSTATUS=serving\n");
    // Ready only once it serves.
    let serving = gw.wait_for("portcullis is serving");
    let addr = Running::served_addr(&serving, "https=");
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());

    assert!(gw.signal(libc::SIGHUP));
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    assert_eq!(next(), "READY=1\nSTATUS=serving; configuration reloaded\n");

    // A failed reload keeps serving and says why, on one line.
    std::fs::write(&cfg, "listen: {https: 127.0.0.1:0}\nroutes: [{uris: []}]\n").unwrap();
    assert!(gw.signal(libc::SIGHUP));
    assert!(next().starts_with("RELOADING=1\n"));
    let failed = next();
    let status = failed
        .strip_prefix(
            "READY=1\nSTATUS=serving; the last reload failed, the running configuration kept: ",
        )
        .unwrap_or_else(|| panic!("{failed:?}"));
    assert_eq!(status.matches('\n').count(), 1, "{failed:?}");
    assert!(status.len() > 2, "{failed:?}");

    assert!(gw.signal(libc::SIGTERM));
    assert_eq!(next(), "STOPPING=1\nSTATUS=draining\n");
    assert!(gw.terminate().is_some_and(|s| s.success()));
}

/// A gateway's files in a fresh folder (`pki` and `reload_config` allowing app A, on an
/// ephemeral port) and the backend it routes to, running.
async fn started_config(
    pki: &TestPki,
) -> (tempfile::TempDir, echo::EchoServer, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    pki.write(dir.path());
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let cfg = write_config(
        dir.path(),
        "portcullis.yaml",
        &reload_config(0, "cf:app:app-a", backend.addr),
    );
    (dir, backend, cfg)
}

/// `WatchdogSec=` in the unit: systemd passes `WATCHDOG_USEC`, and the gateway feeds the watchdog
/// (`WATCHDOG=1`, every half period) only while every event loop runs. Here the loops are
/// stalled the way a wedged journal stalls them: stderr is a pipe nobody reads, and failed
/// handshakes logged at debug fill it until the workers block writing to it. The feeding stops,
/// which is what makes systemd restart a gateway whose workers hold connections they no longer
/// serve; once the pipe is read again the loops run, say they stalled, and the feeding resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_is_fed_only_while_every_event_loop_runs() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let (dir, backend, _) = started_config(&TestPki::new()).await;
    let mut yaml = reload_config(0, "cf:app:app-a", backend.addr);
    yaml.push_str("admin: {listen: \"127.0.0.1:0\"}\n");
    let cfg = write_config(dir.path(), "watchdog.yaml", &yaml);
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // Notifications as they come: (when, text); None after `limit` without one.
    let next = |limit: Duration| {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                return Some(String::from_utf8(buf[..n].to_vec()).unwrap());
            }
        }
        None
    };
    /// Killed and reaped however the test ends.
    struct Reaped(std::process::Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Reaped(
        Command::new(BIN)
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "400000")
            .env("PORTCULLIS_LOG", "info,portcullis=debug")
            .args(["run", "--config", cfg.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // stderr, read only while `reading` is set; its lines go to `lines`.
    let reading = Arc::new(AtomicBool::new(true));
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let mut stderr = BufReader::new(child.0.stderr.take().unwrap());
    let r = reading.clone();
    std::thread::spawn(move || loop {
        while !r.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut line = String::new();
        match stderr.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if tx.send(line).is_err() {
                    return;
                }
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_line = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(l) => seen.push(l),
                Err(_) => break,
            }
        }
        panic!("no line with '{needle}' in:\n{}", seen.join(""));
    };
    assert_eq!(
        next(Duration::from_secs(20)).as_deref(),
        Some("READY=1\nSTATUS=serving\n")
    );
    let serving = wait_line("portcullis is serving");
    let https = Running::served_addr(&serving, "https=");
    let admin = Running::served_addr(&serving, "admin=");
    wait_line("feeding the systemd watchdog");
    // Fed every 0.2 s while the loops run.
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(
            next(Duration::from_secs(2)).as_deref(),
            Some("WATCHDOG=1\n")
        );
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(health(admin).await, (200, "ok\n".to_string()));

    // Nobody reads stderr any more; each refused handshake (plain text on the TLS port) writes
    // a debug line, until the pipe is full and the workers block on it.
    reading.store(false, Ordering::Relaxed);
    let stalled = tokio::task::spawn_blocking(move || {
        let mut unanswered = 0;
        for attempt in 0..20_000 {
            let Ok(mut s) = std::net::TcpStream::connect_timeout(&https, Duration::from_secs(1))
            else {
                unanswered += 1;
                continue;
            };
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut rest = Vec::new();
            match s.read_to_end(&mut rest) {
                Ok(_) => unanswered = 0,
                Err(_) => unanswered += 1,
            }
            if unanswered >= 3 {
                return Some(attempt);
            }
        }
        None
    })
    .await
    .unwrap();
    assert!(
        stalled.is_some(),
        "20,000 refused handshakes never stalled a worker"
    );
    // The feeding stops once the stall is older than liveness::STALL (5 s): a silence of 2 s
    // (ten periods) within 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut silent = false;
    while Instant::now() < deadline {
        match next(Duration::from_secs(2)) {
            None => {
                silent = true;
                break;
            }
            Some(n) => assert_eq!(n, "WATCHDOG=1\n"),
        }
    }
    assert!(
        silent,
        "the watchdog was still fed 10 s after the workers stalled"
    );

    // The pipe drains; the loops run again and the feeding resumes.
    reading.store(true, Ordering::Relaxed);
    assert_eq!(
        next(Duration::from_secs(5)).as_deref(),
        Some("WATCHDOG=1\n"),
        "not fed again after the loops ran"
    );
    let said = wait_line("an event loop has stopped running");
    assert!(said.contains("event_loop="), "{said}");
    wait_line("a stalled event loop runs again");
    assert_eq!(health(admin).await, (200, "ok\n".to_string()));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = None;
    while status.is_none() && Instant::now() < deadline {
        // The drain writes to stderr too.
        while lines.try_recv().is_ok() {}
        status = child.0.try_wait().unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// `GET`/`PUT /log-level` on the admin API: the operational log's filter changes while the
/// gateway runs (here debug lines for `portcullis` on, then off again), a filter that does not
/// parse is refused with the reason and the old one kept, and each change is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_filter_changes_through_the_admin_api() {
    use bytes::Bytes;
    use http_body_util::Full;
    use std::io::{Read, Write};
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let d = draining_gateway(&pki, dir.path(), "{}").await;
    let (mut gw, https, admin) = (d.gw, d.https, d.admin);
    let log_level = |method: &'static str, body: &'static str| async move {
        let mut c = Conn::plain(admin).await.expect("admin reachable");
        let req = http::Request::builder()
            .method(method)
            .uri("/log-level")
            .header("host", "localhost")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let r = c.send(req).await.expect("the admin API answers");
        (r.status, r.body)
    };
    // A TLS handshake that fails: logged at debug, once the gateway has closed the connection.
    let failed_handshake = || {
        let mut s = std::net::TcpStream::connect(https).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"this is not TLS\r\n\r\n").unwrap();
        let mut buf = [0u8; 256];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    };
    let debug_lines = |gw: &Running| {
        gw.seen
            .iter()
            .filter(|l| l.contains("handshake failed"))
            .count()
    };

    assert_eq!(log_level("GET", "").await, (200, "info\n".to_string()));
    failed_handshake();
    let (status, body) = log_level("PUT", "info,portcullis=debug\n").await;
    // The filter as in force, its directives in tracing's order.
    assert_eq!((status, body.as_str()), (200, "portcullis=debug,info\n"));
    let said = gw.wait_for("log filter changed through the admin API");
    assert!(
        said.contains("WARN") && said.contains("from=info"),
        "{said}"
    );
    assert_eq!(debug_lines(&gw), 0, "a debug line before the change");
    failed_handshake();
    gw.wait_for("handshake failed");

    // Not a filter: refused, and the filter stays.
    let (status, body) = log_level("PUT", "portcullis=loud").await;
    assert_eq!(status, 400);
    assert!(
        body.contains("\"portcullis=loud\" is not a log filter")
            && body.ends_with("still portcullis=debug,info\n"),
        "{body}"
    );
    assert_eq!(log_level("PUT", "  ").await.0, 400);
    assert_eq!(
        log_level("GET", "").await.1,
        "portcullis=debug,info\n".to_string()
    );

    // Back to info: the next failed handshake is not logged.
    assert_eq!(log_level("PUT", "info").await.0, 200);
    gw.wait_for("to=info");
    let before = debug_lines(&gw);
    failed_handshake();
    assert_eq!(log_level("PUT", "info").await.0, 200);
    gw.wait_for("to=info");
    assert_eq!(debug_lines(&gw), before, "{:#?}", gw.seen);

    // A filter that silences warnings is itself on record (said under the old filter), and so
    // is the change back (said under the new one).
    assert_eq!(log_level("PUT", "error").await.0, 200);
    let said = gw.wait_for("log filter changed through the admin API");
    assert!(said.contains("from=info to=error"), "{said}");
    assert_eq!(log_level("PUT", "info").await.0, 200);
    let said = gw.wait_for("log filter changed through the admin API");
    assert!(said.contains("from=error to=info"), "{said}");
    assert!(gw.terminate().is_some());
}
