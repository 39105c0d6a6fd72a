//! A gateway started in-process from YAML, with its PKI and access log in a temporary folder.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use portcullis::config::Config;
use portcullis::gateway::Gateway;

use super::pki::TestPki;

pub struct TestGateway {
    pub gw: Gateway,
    pub dir: tempfile::TempDir,
}

/// The sections every test config shares; a test's own sections replace any of them by key.
pub fn base(sections: &str) -> String {
    let has = |key: &str| sections.lines().any(|l| l.starts_with(key));
    let mut out = String::new();
    if !has("listen:") {
        out.push_str("listen: {https: \"127.0.0.1:0\", http: \"127.0.0.1:0\"}\n");
    }
    if !has("admin:") {
        out.push_str("admin: {listen: \"127.0.0.1:0\"}\n");
    }
    if !has("tls:") {
        out.push_str("tls:\n  certificates: [{cert_chain: server.pem, private_key: server.key}]\n  handshake_timeout: 2s\n");
    }
    if !has("access_log:") {
        out.push_str("access_log: {path: access.log}\n");
    }
    if !has("backends:") {
        out.push_str("backends: {ca_certs: backend-ca.pem, connect_timeout: 1s}\n");
    }
    out.push_str(sections);
    out
}

impl TestGateway {
    /// Writes the PKI and the config, starts the gateway.
    pub async fn start(pki: &TestPki, sections: &str) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        pki.write(dir.path());
        let path = dir.path().join("portcullis.yaml");
        std::fs::write(&path, base(sections)).unwrap();
        let config = Config::load(&path).unwrap_or_else(|e| panic!("test config invalid: {e}"));
        let gw = Gateway::start(config).await.expect("gateway starts");
        TestGateway { gw, dir }
    }

    pub fn https(&self) -> SocketAddr {
        self.gw.https_addr()
    }

    pub fn http(&self) -> SocketAddr {
        self.gw.http_addr().expect("http listener")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("portcullis.yaml")
    }

    /// Rewrites the config with new sections and reloads it.
    pub fn reload(&self, sections: &str) {
        std::fs::write(self.config_path(), base(sections)).unwrap();
        let config = Config::load(&self.config_path()).unwrap();
        self.gw.reload(config).unwrap();
    }

    /// Waits until the access log has at least `n` lines, returns them all.
    pub async fn log_lines(&self, n: usize) -> Vec<String> {
        self.log_lines_until(&format!("at least {n} lines"), |lines| lines.len() >= n)
            .await
    }

    /// Waits (up to 5 s) until the access log's lines satisfy `done` (`what` says how, for the
    /// failure), returns them all. The log is written in batches, so a test that counts lines
    /// of several requests must wait for the last one it made.
    pub async fn log_lines_until(
        &self,
        what: &str,
        done: impl Fn(&[String]) -> bool,
    ) -> Vec<String> {
        let path = self.dir.path().join("access.log");
        for _ in 0..100 {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            if done(&lines) {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "access log never had {what}:\n{}",
            std::fs::read_to_string(&path).unwrap_or_default()
        );
    }

    /// A JSON document the admin API serves over plain HTTP (`/routes`, …); it must answer 200.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let admin = self.gw.admin_addr().expect("admin listener");
        let mut c = super::client::Conn::plain(admin).await.unwrap();
        let r = c.get("admin", path).await.unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        serde_json::from_str(&r.body).unwrap()
    }

    /// The view `/routes` gives of `route` (`Null` when it is not there).
    pub async fn route_view(&self, route: &str) -> serde_json::Value {
        let routes = self.admin_json("/routes").await;
        routes
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["route"] == route)
            .cloned()
            .unwrap_or_default()
    }

    /// The Prometheus exposition.
    pub fn metrics(&self) -> String {
        let state = self.gw.state();
        if let Some(x) = &state.xdp {
            x.export(&state.metrics);
        }
        state.metrics.encode()
    }

    /// The value of one metric sample line, e.g. `portcullis_requests_total{code="200"}`; 0 if absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix(sample)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// Waits (up to 5 s) for a metric sample to reach `value`, then asserts it. Counters that
    /// the gateway bumps after the client already saw the outcome (a handshake failure is
    /// counted after the alert is sent) must be read through this, not `metric`.
    pub async fn wait_metric(&self, sample: &str, value: f64) {
        for _ in 0..100 {
            if self.metric(sample) == value {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(self.metric(sample), value, "{sample}");
    }
}

/// One access-log line, split into its fields.
#[derive(Debug)]
pub struct LogLine {
    pub host: String,
    /// When the request arrived: the bracketed RFC 3339 time.
    pub time: String,
    pub request: String,
    pub status: u16,
    pub req_bytes: u64,
    pub resp_bytes: u64,
    pub referer: String,
    pub user_agent: String,
    pub client: String,
    pub backend: String,
    /// `key:value` fields in order, quotes removed.
    pub fields: Vec<(String, String)>,
}

impl LogLine {
    pub fn parse(line: &str) -> LogLine {
        let (host, rest) = line.split_once(" - [").expect("host");
        let (time, rest) = rest.split_once("] ").expect("time");
        let mut quoted = Vec::new();
        let mut rest = rest;
        // "request" status req resp "referer" "ua" "client" "backend"
        let take = |r: &mut &str| -> String {
            let s = r.trim_start();
            assert!(s.starts_with('"'), "expected a quoted value at: {s}");
            let end = s[1..].find('"').expect("closing quote") + 1;
            let v = s[1..end].to_string();
            *r = &s[end + 1..];
            v
        };
        let request = take(&mut rest);
        let mut nums = rest.trim_start().splitn(4, ' ');
        let status = nums.next().unwrap().parse().unwrap();
        let req_bytes = nums.next().unwrap().parse().unwrap();
        let resp_bytes = nums.next().unwrap().parse().unwrap();
        rest = nums.next().unwrap();
        for _ in 0..4 {
            quoted.push(take(&mut rest));
        }
        let mut fields = Vec::new();
        let mut r = rest.trim_start();
        while !r.is_empty() {
            let (key, after) = r.split_once(':').expect("key:value");
            let (value, next) = if let Some(stripped) = after.strip_prefix('"') {
                let end = stripped.find('"').expect("closing quote");
                (stripped[..end].to_string(), &stripped[end + 1..])
            } else {
                let end = after.find(' ').unwrap_or(after.len());
                (after[..end].to_string(), &after[end..])
            };
            fields.push((key.to_string(), value));
            r = next.trim_start();
        }
        LogLine {
            host: host.to_string(),
            time: time.to_string(),
            request,
            status,
            req_bytes,
            resp_bytes,
            referer: quoted[0].clone(),
            user_agent: quoted[1].clone(),
            client: quoted[2].clone(),
            backend: quoted[3].clone(),
            fields,
        }
    }

    pub fn field(&self, key: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no field {key} in {:?}", self.fields))
    }
}
