//! The access log (SPEC §9): exactly one line per request, rendered from typed context.
//!
//! Lines are handed to a writer task over a bounded channel so a slow disk never stalls a request;
//! when the channel is full the record is dropped and counted.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::config::ExtraField;
use crate::metrics::Metrics;

/// Everything one access-log line says about a request.
#[derive(Clone, Debug)]
pub struct AccessRecord {
    pub host: String,
    pub start: SystemTime,
    pub method: String,
    pub uri: String,
    pub proto: &'static str,
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub referer: String,
    pub user_agent: String,
    pub client: SocketAddr,
    pub backend: String,
    pub x_forwarded_for: String,
    pub x_forwarded_proto: String,
    pub vcap_request_id: String,
    pub response_time: Duration,
    pub backend_time: Option<Duration>,
    pub app_id: String,
    pub app_index: String,
    pub instance_id: String,
    pub tls_sni: String,
    pub caller_app: String,
    pub caller_space: String,
    pub caller_org: String,
    pub route_policy: String,
    pub failed_attempts: usize,
    pub ktls: bool,
    pub router_error: String,
}

/// Appends `"value"` with `"-"` for empty, escaping quotes, backslashes and control characters so
/// a hostile header cannot forge a field or a line.
fn quoted(out: &mut String, v: &str) {
    out.push('"');
    if v.is_empty() {
        out.push('-');
    }
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn seconds(d: Duration) -> String {
    format!("{}.{:06}", d.as_secs(), d.subsec_micros())
}

impl AccessRecord {
    /// Renders the line (with a trailing newline).
    pub fn render(&self, extra: &[ExtraField]) -> String {
        let mut o = String::with_capacity(512);
        o.push_str(if self.host.is_empty() {
            "-"
        } else {
            &self.host
        });
        let _ = write!(o, " - [{}] ", humantime::format_rfc3339_nanos(self.start));
        let request_line = format!("{} {} {}", self.method, self.uri, self.proto);
        quoted(&mut o, &request_line);
        let _ = write!(
            o,
            " {} {} {} ",
            self.status, self.request_bytes, self.response_bytes
        );
        quoted(&mut o, &self.referer);
        o.push(' ');
        quoted(&mut o, &self.user_agent);
        o.push(' ');
        quoted(&mut o, &self.client.to_string());
        o.push(' ');
        quoted(&mut o, &self.backend);
        let field = |o: &mut String, name: &str, v: &str| {
            let _ = write!(o, " {name}:");
            quoted(o, v);
        };
        field(&mut o, "x_forwarded_for", &self.x_forwarded_for);
        field(&mut o, "x_forwarded_proto", &self.x_forwarded_proto);
        field(&mut o, "vcap_request_id", &self.vcap_request_id);
        let gorouter = self
            .response_time
            .saturating_sub(self.backend_time.unwrap_or_default());
        let _ = write!(
            o,
            " response_time:{} gorouter_time:{}",
            seconds(self.response_time),
            seconds(gorouter)
        );
        field(&mut o, "app_id", &self.app_id);
        field(&mut o, "app_index", &self.app_index);
        field(&mut o, "instance_id", &self.instance_id);
        for f in extra {
            match f {
                ExtraField::TlsSni => field(&mut o, "tls_sni", &self.tls_sni),
                ExtraField::CallerCfApp => field(&mut o, "caller_cf_app", &self.caller_app),
                ExtraField::CallerCfSpace => field(&mut o, "caller_cf_space", &self.caller_space),
                ExtraField::CallerCfOrg => field(&mut o, "caller_cf_org", &self.caller_org),
                ExtraField::RoutePolicy => field(&mut o, "route_policy", &self.route_policy),
                ExtraField::FailedAttempts => {
                    let _ = write!(o, " failed_attempts:{}", self.failed_attempts);
                }
                ExtraField::BackendTime => match self.backend_time {
                    Some(t) => {
                        let _ = write!(o, " backend_time:{}", seconds(t));
                    }
                    None => o.push_str(" backend_time:\"-\""),
                },
                ExtraField::Ktls => {
                    let _ = write!(o, " ktls:{}", self.ktls);
                }
            }
        }
        field(&mut o, "x_cf_routererror", &self.router_error);
        o.push('\n');
        o
    }
}

enum Msg {
    Line(String),
    Reopen,
}

/// A handle to the writer task. Cloning is cheap.
#[derive(Clone)]
pub struct AccessLogger {
    tx: mpsc::Sender<Msg>,
    extra: Arc<[ExtraField]>,
    metrics: Arc<Metrics>,
}

/// The access log's destination could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("access_log.path: cannot open '{}': {source}", path.display())]
pub struct OpenError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

type Sink = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

async fn open(path: &Option<PathBuf>) -> Result<Sink, OpenError> {
    match path {
        None => Ok(Box::new(tokio::io::stdout())),
        Some(p) => tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .await
            .map(|f| Box::new(f) as Sink)
            .map_err(|source| OpenError {
                path: p.clone(),
                source,
            }),
    }
}

impl AccessLogger {
    /// Opens the destination (`None` = stdout) and starts the writer task.
    pub async fn start(
        path: Option<PathBuf>,
        extra: Vec<ExtraField>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, OpenError> {
        let mut sink = open(&path).await?;
        let (tx, mut rx) = mpsc::channel::<Msg>(16 * 1024);
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(64 * 1024);
            while let Some(first) = rx.recv().await {
                let mut next = Some(first);
                // Batch whatever is queued into one write.
                while let Some(msg) = next.take().or_else(|| rx.try_recv().ok()) {
                    match msg {
                        Msg::Line(l) => buf.extend_from_slice(l.as_bytes()),
                        Msg::Reopen => {
                            let _ = sink.write_all(&buf).await;
                            buf.clear();
                            let _ = sink.flush().await;
                            match open(&path).await {
                                Ok(s) => sink = s,
                                Err(e) => tracing::error!(error = %e, "access log not reopened"),
                            }
                        }
                    }
                    if buf.len() > 60 * 1024 {
                        break;
                    }
                }
                if let Err(e) = sink.write_all(&buf).await {
                    tracing::error!(error = %e, "access log write failed");
                }
                let _ = sink.flush().await;
                buf.clear();
            }
        });
        Ok(AccessLogger {
            tx,
            extra: extra.into(),
            metrics,
        })
    }

    /// Queues one record; never waits.
    pub fn log(&self, record: &AccessRecord) {
        let line = record.render(&self.extra);
        if self.tx.try_send(Msg::Line(line)).is_err() {
            self.metrics.access_log_dropped.inc();
        }
    }

    /// Reopens the file (after log rotation, on SIGHUP).
    pub fn reopen(&self) {
        let _ = self.tx.try_send(Msg::Reopen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_field_in_order_with_dashes() {
        let r = AccessRecord {
            host: "a.apps.identity".into(),
            start: SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            method: "GET".into(),
            uri: "/x?y=1".into(),
            proto: "HTTP/1.1",
            status: 403,
            request_bytes: 0,
            response_bytes: 9,
            referer: String::new(),
            user_agent: "ua \"quoted\"".into(),
            client: "127.0.0.1:5555".parse().unwrap(),
            backend: String::new(),
            x_forwarded_for: "127.0.0.1".into(),
            x_forwarded_proto: "https".into(),
            vcap_request_id: "id".into(),
            response_time: Duration::from_micros(1_500),
            backend_time: None,
            app_id: "B".into(),
            app_index: String::new(),
            instance_id: String::new(),
            tls_sni: "a.apps.identity".into(),
            caller_app: "A".into(),
            caller_space: String::new(),
            caller_org: String::new(),
            route_policy: "route:route_policies".into(),
            failed_attempts: 0,
            ktls: false,
            router_error: String::new(),
        };
        let line = r.render(&[
            ExtraField::RoutePolicy,
            ExtraField::TlsSni,
            ExtraField::CallerCfOrg,
        ]);
        assert_eq!(
            line,
            "a.apps.identity - [2023-11-14T22:13:20.123456789Z] \"GET /x?y=1 HTTP/1.1\" 403 0 9 \"-\" \
             \"ua \\\"quoted\\\"\" \"127.0.0.1:5555\" \"-\" x_forwarded_for:\"127.0.0.1\" \
             x_forwarded_proto:\"https\" vcap_request_id:\"id\" response_time:0.001500 \
             gorouter_time:0.001500 app_id:\"B\" app_index:\"-\" instance_id:\"-\" \
             route_policy:\"route:route_policies\" tls_sni:\"a.apps.identity\" caller_cf_org:\"-\" \
             x_cf_routererror:\"-\"\n"
        );
    }
}
