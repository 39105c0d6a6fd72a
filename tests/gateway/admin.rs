//! SPEC §12: the admin API.

use portcullis::echo;

use crate::pipeline_yaml;
use crate::support::client::Conn;
use crate::support::gateway::TestGateway;
use crate::support::pki::TestPki;

#[tokio::test]
async fn health_metrics_routes_and_policy() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let admin = gw.gw.admin_addr().unwrap();
    let mut c = Conn::plain(admin).await.unwrap();
    let r = c.get("admin", "/health").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));

    let r = c.get("admin", "/routes").await.unwrap();
    assert_eq!(r.status, 200);
    let routes: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let any_a = routes
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "any-a.apps.identity")
        .expect("route listed");
    assert_eq!(any_a["options"]["route_policy_sources"], "cf:app:app-a");
    assert_eq!(any_a["endpoints"][0]["tags"]["space_id"], "space-1");
    assert_eq!(any_a["endpoints"][0]["address"], backend.addr.to_string());

    let r = c
        .get("admin", "/routes/ANY-A.apps.identity/policy")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let p: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(p["domain"], "*.apps.identity");
    assert_eq!(p["scope"], "any");
    assert_eq!(p["sources"][0], "cf:app:app-a");
    assert_eq!(
        c.get("admin", "/routes/nope.apps.identity/policy")
            .await
            .unwrap()
            .status,
        404
    );

    let _ = crate::support::client::get(
        gw.https(),
        &pki.server_ca,
        Some(&pki.a),
        "any-a.apps.identity",
        "/",
        false,
    )
    .await;
    gw.log_lines(1).await;
    let m = c.get("admin", "/metrics").await.unwrap().body;
    for name in [
        "portcullis_requests_total{code=\"200\"} 1",
        "portcullis_tls_handshakes_total{domain=\"*.apps.identity\",result=\"ok\"} 1",
        "portcullis_authz_decisions_total{decision=\"allow\",rule=\"route:cf:app:app-a\"} 1",
        "portcullis_ktls_connections_total{mode=\"userspace\"} 1",
        "portcullis_registry_endpoints ",
        // No NATS: the static routes are the whole registry.
        "portcullis_registry_connected 1",
        "portcullis_event_loops_stalled 0",
    ] {
        assert!(m.contains(name), "missing {name} in\n{m}");
    }
}

/// `admin.token_file`: every admin request but `GET /health` needs the bearer token, refusals
/// are counted, a reload rotates the token, and `explain --admin` sends it.
#[tokio::test]
async fn the_admin_token_guards_everything_but_health() {
    use std::os::unix::fs::PermissionsExt;
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("admin-token");
    let (one, two) = (
        "first-token-0123456789abcdef",
        "second-token-0123456789abcdef",
    );
    std::fs::write(&token_file, format!("{one}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let sections = format!(
        "admin: {{listen: \"127.0.0.1:0\", token_file: \"{}\"}}\n{}",
        token_file.display(),
        pipeline_yaml(backend.addr, "")
    );
    let gw = TestGateway::start(&pki, &sections).await;
    let admin = gw.gw.admin_addr().unwrap();
    let mut c = Conn::plain(admin).await.unwrap();
    let call = |c: &Conn, method: &str, path: &str, token: Option<&str>| {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        let mut req = c.build("admin", path, &headers);
        *req.method_mut() = method.parse().unwrap();
        req
    };

    let r = c.send(call(&c, "GET", "/health", None)).await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    // Without the token: 401 with a bearer challenge, before any routing (the DELETE would
    // otherwise be 404, no gate here; the POST 400, no certificate in its body).
    for (method, path) in [
        ("GET", "/metrics"),
        ("GET", "/routes"),
        ("GET", "/routes/any-a.apps.identity/policy"),
        ("POST", "/routes/any-a.apps.identity/policy"),
        ("DELETE", "/xdp/denials?source=10.0.0.1"),
    ] {
        let r = c.send(call(&c, method, path, None)).await.unwrap();
        assert_eq!(r.status, 401, "{method} {path}: {}", r.body);
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"portcullis admin\""),
            "{method} {path}"
        );
    }
    let r = c.send(call(&c, "GET", "/routes", Some(two))).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(
        r.header("www-authenticate")
            .is_some_and(|h| h.contains("error=\"invalid_token\"")),
        "{:?}",
        r.header("www-authenticate")
    );
    let r = c.send(call(&c, "GET", "/routes", Some(one))).await.unwrap();
    assert!(
        r.status == 200 && r.body.contains("any-a.apps.identity"),
        "{}",
        r.body
    );
    let r = c
        .send(call(
            &c,
            "DELETE",
            "/xdp/denials?source=10.0.0.1",
            Some(one),
        ))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.body.trim()),
        (404, "the XDP gate is not running")
    );
    let m = c
        .send(call(&c, "GET", "/metrics", Some(one)))
        .await
        .unwrap()
        .body;
    assert!(
        m.contains("portcullis_admin_requests_refused_total 6"),
        "{m}"
    );

    // `explain --admin` sends the token from a file, and says what is wrong without it.
    let explain = |token: Option<&std::path::Path>| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
        cmd.args(["explain", "--admin", &format!("http://{admin}")])
            .args(["--host", "any-a.apps.identity"]);
        if let Some(t) = token {
            cmd.arg("--admin-token-file").arg(t);
        }
        cmd.output()
    };
    let out = explain(Some(&token_file)).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("cf:app:app-a"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = explain(None).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("pass its token with --admin-token-file"),
        "{err}"
    );

    // A reload reads the file again: the new token works, the old one no longer does.
    std::fs::write(&token_file, format!("{two}\n")).unwrap();
    gw.reload(&sections);
    let r = c.send(call(&c, "GET", "/routes", Some(one))).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    let r = c.send(call(&c, "GET", "/routes", Some(two))).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let out = explain(Some(&token_file)).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `portcullis_request_duration_seconds{class}` times every request by status class, and
/// `portcullis_backend_response_seconds` the backend's part of the proxied ones: a 300 ms
/// backend lands between the 0.25 s and 0.5 s buckets, a gateway's own 403 has no backend part.
#[tokio::test]
async fn latency_histograms_time_requests_by_class_and_the_backend_part() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let gw = TestGateway::start(&pki, &pipeline_yaml(backend.addr, "")).await;
    let host = "any-a.apps.identity";
    let mut a = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.a), false)
        .await
        .unwrap();
    for path in ["/", "/", "/", "/slow?ms=300"] {
        assert_eq!(a.get(host, path).await.unwrap().status, 200);
    }
    let mut b = Conn::tls(gw.https(), &pki.server_ca, Some(host), Some(&pki.b), false)
        .await
        .unwrap();
    assert_eq!(b.get(host, "/").await.unwrap().status, 403);
    gw.log_lines(5).await;

    let m = gw.metrics();
    for (sample, want) in [
        (
            "portcullis_request_duration_seconds_count{class=\"2xx\"}",
            4.0,
        ),
        (
            "portcullis_request_duration_seconds_count{class=\"4xx\"}",
            1.0,
        ),
        (
            "portcullis_request_duration_seconds_count{class=\"5xx\"}",
            0.0,
        ),
        (
            "portcullis_request_duration_seconds_bucket{le=\"0.25\",class=\"2xx\"}",
            3.0,
        ),
        (
            "portcullis_request_duration_seconds_bucket{le=\"0.5\",class=\"2xx\"}",
            4.0,
        ),
        ("portcullis_backend_response_seconds_count", 4.0),
        (
            "portcullis_backend_response_seconds_bucket{le=\"0.25\"}",
            3.0,
        ),
        (
            "portcullis_backend_response_seconds_bucket{le=\"0.5\"}",
            4.0,
        ),
        (
            "portcullis_backend_response_seconds_bucket{le=\"+Inf\"}",
            4.0,
        ),
    ] {
        assert_eq!(gw.metric(sample), want, "{sample} in\n{m}");
    }
    // Every class has its series from the start, so a dashboard's rate() has no gaps.
    for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
        let series = format!("portcullis_request_duration_seconds_count{{class=\"{class}\"}} ");
        assert!(m.contains(&series), "{series} in\n{m}");
    }
    let sum = gw.metric("portcullis_backend_response_seconds_sum");
    assert!((0.3..1.0).contains(&sum), "{sum}");
}

/// `admin.tls`: the admin API is served over TLS only, with the token on top; with
/// `admin.tls.client_ca` (set by a reload here) a client must also present a certificate from
/// that CA. `explain --admin https://…` reaches it with `--admin-ca`, `--admin-cert` and
/// `--admin-key`, and says what is missing.
#[tokio::test]
async fn the_admin_api_over_tls_and_with_client_certificates() {
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let files = tempfile::tempdir().unwrap();
    let token_file = files.path().join("admin-token");
    let token = "admin-token-0123456789abcdef";
    std::fs::write(&token_file, token).unwrap();
    for (name, text) in [
        ("a.pem", &pki.a.chain_pem),
        ("a.key", &pki.a.key_pem),
        ("server-ca.pem", &pki.server_ca.cert_pem),
    ] {
        std::fs::write(files.path().join(name), text).unwrap();
    }
    let sections = |client_ca: &str| {
        format!(
            "admin: {{listen: \"127.0.0.1:0\", token_file: \"{}\", \
             tls: {{cert_chain: server.pem, private_key: server.key{client_ca}}}}}\n{}",
            token_file.display(),
            pipeline_yaml(backend.addr, "")
        )
    };
    let gw = TestGateway::start(&pki, &sections("")).await;
    let admin = gw.gw.admin_addr().unwrap();
    let auth = format!("Bearer {token}");
    async fn authed(
        c: &mut Conn,
        path: &str,
        auth: &str,
    ) -> Result<crate::support::client::Resp, crate::support::client::CallError> {
        let req = c.build("localhost", path, &[("authorization", auth)]);
        c.send(req).await
    }

    // Over TLS: served, the token still checked.
    let mut c = Conn::tls(admin, &pki.server_ca, Some("localhost"), None, false)
        .await
        .expect("TLS to the admin API");
    let r = authed(&mut c, "/metrics", &auth).await.unwrap();
    assert!(
        r.status == 200 && r.body.contains("portcullis_request_duration_seconds_count"),
        "{}",
        r.body
    );
    assert_eq!(c.get("localhost", "/routes").await.unwrap().status, 401);
    assert_eq!(c.get("localhost", "/health").await.unwrap().status, 200);
    // Not in clear, and not with a certificate from another CA.
    let mut plain = Conn::plain(admin).await.unwrap();
    assert!(plain.get("localhost", "/health").await.is_err());
    assert!(
        Conn::tls(admin, &pki.backend_ca, Some("localhost"), None, false)
            .await
            .is_err()
    );

    let explain = |extra: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
        cmd.current_dir(files.path())
            .args([
                "explain",
                "--admin",
                &format!("https://localhost:{}", admin.port()),
            ])
            .args([
                "--host",
                "any-a.apps.identity",
                "--admin-token-file",
                "admin-token",
            ])
            .args(extra);
        cmd.output()
    };
    let out = explain(&["--admin-ca", "server-ca.pem"]).await.unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("cf:app:app-a"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = explain(&[]).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("needs --admin-ca"), "{err}");

    // A reload requires client certificates from the identity CA for the next connections.
    gw.reload(&sections(", client_ca: identity-ca.pem"));
    let mut anonymous = Conn::tls(admin, &pki.server_ca, Some("localhost"), None, false).await;
    let refused = match &mut anonymous {
        Err(_) => true,
        Ok(c) => authed(c, "/metrics", &auth).await.is_err(),
    };
    assert!(refused, "a client without a certificate is refused");
    let mut with_cert = Conn::tls(
        admin,
        &pki.server_ca,
        Some("localhost"),
        Some(&pki.a),
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        authed(&mut with_cert, "/metrics", &auth)
            .await
            .unwrap()
            .status,
        200
    );
    let out = explain(&["--admin-ca", "server-ca.pem"]).await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "no client certificate: a TLS failure"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("requires a client certificate: --admin-cert and --admin-key"),
        "{err}"
    );
    let out = explain(&[
        "--admin-ca",
        "server-ca.pem",
        "--admin-cert",
        "a.pem",
        "--admin-key",
        "a.key",
    ])
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The one log writer of this test binary (installed by the test below): it discards every line
/// except those containing `marker`, whose writing thread it holds until released (at most
/// 20 s), as a wedged journal or log pipe holds a thread writing to it.
struct Wedge {
    marker: String,
    released: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

struct WedgeWriter(std::sync::Arc<Wedge>);

impl std::io::Write for WedgeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if String::from_utf8_lossy(buf).contains(&self.0.marker) {
            let released = self.0.released.lock().unwrap();
            let _ = self
                .0
                .cv
                .wait_timeout_while(released, std::time::Duration::from_secs(20), |r| !*r)
                .unwrap();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Releases the wedged thread however the test ends.
struct Release(std::sync::Arc<Wedge>);

impl Drop for Release {
    fn drop(&mut self) {
        *self.0.released.lock().unwrap() = true;
        self.0.cv.notify_all();
    }
}

/// A worker whose thread is held by a blocking call (here: writing a log line) holds every
/// connection it accepted: `/health` then answers 503 naming that event loop, so a load
/// balancer takes the gateway out, and `portcullis_event_loops_stalled` counts it, while the
/// other worker serves new connections. Once the call returns, health is 200 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_fails_while_a_worker_is_stalled() {
    use std::time::Duration;
    let pki = TestPki::new();
    let backend = echo::start("b", ([127, 0, 0, 1], 0).into()).await.unwrap();
    let caller = tokio::net::TcpSocket::new_v4().unwrap();
    caller.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let port = caller.local_addr().unwrap().port();
    let wedge = std::sync::Arc::new(Wedge {
        marker: format!("client=127.0.0.1:{port} "),
        released: Default::default(),
        cv: Default::default(),
    });
    let _release = Release(wedge.clone());
    let w = wedge.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("portcullis::gateway=debug")
        .with_ansi(false)
        .with_writer(move || WedgeWriter(w.clone()))
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    let gw = TestGateway::start(
        &pki,
        &format!(
            "limits: {{workers: 2}}\n{}",
            pipeline_yaml(backend.addr, "")
        ),
    )
    .await;
    let admin = gw.gw.admin_addr().unwrap();
    let health = || async move {
        let mut c = Conn::plain(admin).await.unwrap();
        let r = c.get("admin", "/health").await.unwrap();
        (r.status, r.body)
    };
    assert_eq!(health().await, (200, "ok\n".to_string()));

    // Not TLS: the handshake fails, and the worker that took the connection logs it at debug,
    // with the caller's address, which the writer holds.
    let mut s = caller.connect(gw.https()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Polls `/health` (every 0.2 s, at most 10 s) until it answers `status`.
    let health_becomes = |status: u16| async move {
        let mut said = health().await;
        for _ in 0..50 {
            if said.0 == status {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            said = health().await;
        }
        said
    };
    let (status, body) = health_becomes(503).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("stalled: event loop w") && body.matches("event loop").count() == 1,
        "{body:?}"
    );
    gw.wait_metric("portcullis_event_loops_stalled", 1.0).await;
    // The other worker serves, and keeps every new connection even once it serves more than the
    // stalled one: a stalled worker is not handed connections, which it would hold unserved.
    // (Within 3 s each: the wedge lets go by itself after 20 s.)
    let mut open = Vec::new();
    for i in 0..3 {
        let served = tokio::time::timeout(Duration::from_secs(3), async {
            let mut c = Conn::tls(
                gw.https(),
                &pki.server_ca,
                Some("any-a.apps.identity"),
                Some(&pki.a),
                i == 1,
            )
            .await
            .unwrap();
            let r = c.get("any-a.apps.identity", "/").await.unwrap();
            (c, r.status)
        })
        .await;
        let (c, status) = served.unwrap_or_else(|_| panic!("connection {i} not served within 3 s"));
        assert_eq!(status, 200, "connection {i}");
        open.push(c);
    }

    drop(_release);
    assert_eq!(health_becomes(200).await, (200, "ok\n".to_string()));
    gw.wait_metric("portcullis_event_loops_stalled", 0.0).await;
}
