//! The access log (SPEC §9): exactly one line per request, rendered from typed context.
//!
//! Lines are handed to a writer thread over a bounded channel so a slow disk never stalls a request;
//! when the channel is full the record is dropped and counted. The writer gathers lines for a few
//! milliseconds and writes them in one call, so a busy gateway pays one wake-up per batch.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use std::io::Write;
use std::sync::mpsc;

use crate::authz::Rule;
use crate::config::{AccessLog, ExtraField, QueryRedaction};
use crate::metrics::Metrics;
use crate::proxy::{ConnCtx, Setup};
use crate::routing::Endpoint;

/// Everything one access-log line says about a request.
#[derive(Clone, Debug)]
pub struct AccessRecord {
    pub host: String,
    pub start: SystemTime,
    pub method: http::Method,
    pub uri: String,
    pub proto: &'static str,
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub referer: String,
    pub user_agent: String,
    /// The endpoint of the last attempt (backend address, app id, instance index and id).
    pub endpoint: Option<Arc<Endpoint>>,
    pub x_forwarded_for: String,
    pub x_forwarded_proto: &'static str,
    pub vcap_request_id: String,
    pub response_time: Duration,
    pub backend_time: Option<Duration>,
    /// The client connection: its address, SNI, caller identity and kTLS state.
    pub conn: Arc<ConnCtx>,
    /// The authorization decision's rule; `None` on a route that does not enforce a policy.
    pub route_policy: Option<Rule>,
    pub failed_attempts: usize,
    /// The backend connection, and what getting one took.
    pub attempts: Attempts,
    /// For a route bound to a route service: `sent` (the request went to the service) or
    /// `returned` (it came back signed and went to the app); empty otherwise.
    pub route_service: &'static str,
    /// Why the request was sent once more to its endpoint, on a new connection (a reason of
    /// `portcullis_backend_resends_total`); empty when it was not.
    pub resent: &'static str,
    pub router_error: &'static str,
    /// The values of `access_log.headers`, in its order (empty when it names none).
    pub headers: Vec<Option<http::HeaderValue>>,
}

/// How a request's backend connection came to be: GoRouter's `local_address`,
/// `failed_attempts_time`, `dns_time`, `dial_time` and `tls_time` access-log fields.
#[derive(Clone, Debug, Default)]
pub struct Attempts {
    /// From the request's arrival to the end of the last attempt that failed to reach its
    /// endpoint (GoRouter counts from the first attempt: the gateway's routing in between is
    /// microseconds, and this way a request pays no clock read for it).
    pub failed_time: Option<Duration>,
    /// The gateway's end of the connection the response came on.
    pub local_address: Option<SocketAddr>,
    /// How that connection was opened, when it was opened for this request.
    pub setup: Option<Box<Setup>>,
}

/// Appends `"value"` with `"-"` for empty, escaping quotes, backslashes and control characters so
/// a hostile header cannot forge a field or a line.
fn quoted(out: &mut String, v: &str) {
    out.push('"');
    if v.is_empty() {
        out.push('-');
    }
    escaped(out, v);
    out.push('"');
}

/// Whether `v` is printable ASCII without `"` or `\`, which the log copies whole.
fn plain(v: &str) -> bool {
    // Eight bytes at a time (each test sets a byte's high bit when the byte matches; exact for
    // whether any byte does): below 0x20, 0x80 and above, 0x7f, `"`, `\`.
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let (words, rest) = v.as_bytes().as_chunks::<8>();
    for w in words {
        let x = u64::from_ne_bytes(*w);
        let found = (x.wrapping_sub(ONES * 0x20) & !x & HIGH)
            | (x & HIGH)
            | zero_byte(x ^ (ONES * 0x7f))
            | zero_byte(x ^ (ONES * u64::from(b'"')))
            | zero_byte(x ^ (ONES * u64::from(b'\\')));
        if found != 0 {
            return false;
        }
    }
    rest.iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// Appends `v` with `"` and `\` escaped and control characters written as `\xNN`.
fn escaped(out: &mut String, v: &str) {
    // Most values are printable ASCII with nothing to escape: copied whole.
    if plain(v) {
        out.push_str(v);
        return;
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
}

/// Appends the request target `uri` (escaped) with its query as `redact` says. A target
/// without a query, or with an empty one (`/p?`), is logged as it came.
fn redacted_uri(out: &mut String, uri: &str, redact: QueryRedaction) {
    let (path, query) = match uri.split_once('?') {
        Some((path, query)) if !query.is_empty() && redact != QueryRedaction::None => (path, query),
        _ => return escaped(out, uri),
    };
    escaped(out, path);
    if redact == QueryRedaction::Hash {
        let digest =
            ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, query.as_bytes());
        out.push_str("?hash=");
        out.push_str(&hex::encode(digest.as_ref()));
    }
}

/// `t` as humantime's `format_rfc3339_nanos` writes it (`2026-11-30T06:43:54.123456789Z`). The
/// date and time of day change once a second, so each thread formats them once a second and
/// reuses them; only the nanoseconds are written per line (humantime's formatter was about 700
/// instructions of every line).
fn push_rfc3339_nanos(out: &mut String, t: SystemTime) {
    thread_local! {
        /// The second last formatted, and its `YYYY-MM-DDTHH:MM:SS`.
        static SECOND: std::cell::RefCell<(u64, String)> =
            const { std::cell::RefCell::new((0, String::new())) };
    }
    // A clock set before 1970 (which humantime would panic on) is written as the epoch.
    let since_epoch = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    SECOND.with_borrow_mut(|(second, prefix)| {
        if *second != secs || prefix.is_empty() {
            let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            prefix.clear();
            let _ = write!(prefix, "{}", humantime::format_rfc3339_seconds(whole));
            prefix.pop(); // its `Z`
            *second = secs;
        }
        out.push_str(prefix);
    });
    out.push('.');
    let mut n = itoa::Buffer::new();
    let nanos = n.format(since_epoch.subsec_nanos());
    out.push_str(&"000000000"[nanos.len()..]);
    out.push_str(nanos);
    out.push('Z');
}

/// Seconds with six decimals.
fn seconds(out: &mut String, d: Duration) {
    let mut n = itoa::Buffer::new();
    out.push_str(n.format(d.as_secs()));
    out.push('.');
    let micros = n.format(d.subsec_micros());
    out.push_str(&"000000"[micros.len()..]);
    out.push_str(micros);
}

/// ` name:seconds`, or ` name:"-"` for a time not taken, as GoRouter logs its timings.
fn time(out: &mut String, name: &str, d: Option<Duration>) {
    out.push(' ');
    out.push_str(name);
    match d {
        Some(d) => {
            out.push(':');
            seconds(out, d);
        }
        None => out.push_str(":\"-\""),
    }
}

fn number(out: &mut String, v: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(v));
}

/// Appends `ip` as its `Display` form does. IPv4, the common case, is written octet by octet:
/// `Display` goes through the formatter's padding support and costs about ten times as much,
/// which the access log and `X-Forwarded-For` paid on every request.
pub fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut n = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(n.format(octet));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// Appends `addr` as its `Display` form does (see [`push_ip`]).
pub fn push_socket_addr(out: &mut String, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            push_ip(out, IpAddr::V4(*v4.ip()));
            out.push(':');
            number(out, v4.port());
        }
        SocketAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

impl AccessRecord {
    /// The record of a request on `conn` that started at `start`: its request line, and every
    /// other field empty until the request is served.
    pub fn new(
        conn: Arc<ConnCtx>,
        start: SystemTime,
        method: http::Method,
        uri: String,
        proto: &'static str,
    ) -> Self {
        AccessRecord {
            host: String::new(),
            start,
            method,
            uri,
            proto,
            status: 0,
            request_bytes: 0,
            response_bytes: 0,
            referer: String::new(),
            user_agent: String::new(),
            endpoint: None,
            x_forwarded_for: String::new(),
            x_forwarded_proto: "",
            vcap_request_id: String::new(),
            response_time: Duration::ZERO,
            backend_time: None,
            conn,
            route_policy: None,
            failed_attempts: 0,
            attempts: Default::default(),
            route_service: "",
            resent: "",
            router_error: "",
            headers: Vec::new(),
        }
    }

    /// Takes the values of the headers `format` logs from `h`: the request as the gateway
    /// received it, then (once it is built) as the app receives it.
    pub fn take_headers(&mut self, format: &AccessLog, h: &http::HeaderMap) {
        if format.headers.is_empty() {
            return;
        }
        self.headers.clear();
        self.headers
            .extend(format.headers.iter().map(|l| h.get(&l.name).cloned()));
    }

    /// Renders the line (with a trailing newline) as `format` says.
    pub fn render(&self, format: &AccessLog) -> String {
        let mut o = String::with_capacity(512);
        o.push_str(if self.host.is_empty() {
            "-"
        } else {
            &self.host
        });
        o.push_str(" - [");
        push_rfc3339_nanos(&mut o, self.start);
        o.push_str("] \"");
        // The request line, quoted as one value.
        escaped(&mut o, self.method.as_str());
        o.push(' ');
        redacted_uri(&mut o, &self.uri, format.redact_query);
        o.push(' ');
        escaped(&mut o, self.proto);
        o.push_str("\" ");
        number(&mut o, self.status);
        o.push(' ');
        number(&mut o, self.request_bytes);
        o.push(' ');
        number(&mut o, self.response_bytes);
        o.push(' ');
        quoted(&mut o, &self.referer);
        o.push(' ');
        quoted(&mut o, &self.user_agent);
        o.push(' ');
        // An address has nothing to escape.
        if format.redact_source_ip {
            o.push_str("\"-\" ");
        } else {
            o.push('"');
            push_socket_addr(&mut o, self.conn.client);
            o.push_str("\" ");
        }
        let ep = self.endpoint.as_deref();
        quoted(&mut o, ep.map_or("", |e| &e.addr));
        let field = |o: &mut String, name: &str, v: &str| {
            o.push(' ');
            o.push_str(name);
            o.push(':');
            quoted(o, v);
        };
        let forwarded_for = match format.redact_forwarded_for {
            true => "",
            false => &self.x_forwarded_for,
        };
        field(&mut o, "x_forwarded_for", forwarded_for);
        field(&mut o, "x_forwarded_proto", self.x_forwarded_proto);
        field(&mut o, "vcap_request_id", &self.vcap_request_id);
        let gorouter = self
            .response_time
            .saturating_sub(self.backend_time.unwrap_or_default());
        o.push_str(" response_time:");
        seconds(&mut o, self.response_time);
        o.push_str(" gorouter_time:");
        seconds(&mut o, gorouter);
        field(&mut o, "app_id", ep.map_or("", Endpoint::app_id));
        field(
            &mut o,
            "app_index",
            ep.map_or("", |e| &e.private_instance_index),
        );
        field(
            &mut o,
            "instance_id",
            ep.map_or("", |e| &e.private_instance_id),
        );
        let sni = self.conn.tls.as_ref().and_then(|t| t.sni.as_deref());
        let caller = self.conn.identity();
        for f in &format.extra_fields {
            match f {
                ExtraField::TlsSni => field(&mut o, "tls_sni", sni.unwrap_or("")),
                ExtraField::CallerCfApp => {
                    field(&mut o, "caller_cf_app", caller.map_or("", |i| &i.app))
                }
                ExtraField::CallerCfSpace => field(
                    &mut o,
                    "caller_cf_space",
                    caller.and_then(|i| i.space.as_deref()).unwrap_or(""),
                ),
                ExtraField::CallerCfOrg => field(
                    &mut o,
                    "caller_cf_org",
                    caller.and_then(|i| i.org.as_deref()).unwrap_or(""),
                ),
                ExtraField::RoutePolicy => {
                    let rule = self.route_policy.as_ref().map_or("", Rule::as_str);
                    field(&mut o, "route_policy", rule)
                }
                ExtraField::FailedAttempts => {
                    o.push_str(" failed_attempts:");
                    number(&mut o, self.failed_attempts);
                }
                ExtraField::BackendTime => time(&mut o, "backend_time", self.backend_time),
                ExtraField::Ktls => {
                    let _ = write!(o, " ktls:{}", self.conn.ktls);
                }
                ExtraField::RouteService => field(&mut o, "route_service", self.route_service),
                ExtraField::LocalAddress => match self.attempts.local_address {
                    Some(a) => {
                        o.push_str(" local_address:\"");
                        push_socket_addr(&mut o, a);
                        o.push('"');
                    }
                    None => o.push_str(" local_address:\"-\""),
                },
                ExtraField::FailedAttemptsTime => {
                    time(&mut o, "failed_attempts_time", self.attempts.failed_time)
                }
                ExtraField::DnsTime => {
                    let dns = self.attempts.setup.as_ref().and_then(|s| s.dns);
                    time(&mut o, "dns_time", dns)
                }
                ExtraField::DialTime => {
                    let dial = self.attempts.setup.as_ref().map(|s| s.dial);
                    time(&mut o, "dial_time", dial)
                }
                ExtraField::TlsTime => {
                    let tls = self.attempts.setup.as_ref().and_then(|s| s.tls);
                    time(&mut o, "tls_time", tls)
                }
                ExtraField::Resent => field(&mut o, "resent", self.resent),
            }
        }
        for (h, v) in format.headers.iter().zip(&self.headers) {
            let v = v.as_ref().map(|v| String::from_utf8_lossy(v.as_bytes()));
            field(&mut o, &h.field, v.as_deref().unwrap_or(""));
        }
        field(&mut o, "x_cf_routererror", self.router_error);
        o.push('\n');
        o
    }
}

enum Msg {
    Line(String),
    Reopen,
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// How long the writer lets lines gather after the first one of a batch. Requests never wait on
/// it; it turns one wake-up and one `write` per request into one per batch.
const GATHER: Duration = Duration::from_millis(5);
/// A batch is written once it holds this many bytes, whatever the time.
const BATCH_BYTES: usize = 64 * 1024;

/// A handle to the writer thread. Cloning is cheap.
#[derive(Clone)]
pub struct AccessLogger {
    tx: mpsc::SyncSender<Msg>,
    /// A destination handed over by [`AccessLogger::switch`], for the writer to take.
    next: Arc<Mutex<Option<Sink>>>,
    metrics: Arc<Metrics>,
}

/// Why the access log could not start (or be reopened).
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("access_log.path: cannot open '{}': {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the access-log writer thread: {0}")]
    Thread(std::io::Error),
}

type Sink = Box<dyn Write + Send>;

/// An access-log destination, opened (for [`AccessLogger::switch`]) but not yet written to.
pub struct Destination(Sink);

impl Destination {
    /// Opens `path` for appending (`None` = stdout), creating the file if needed.
    pub fn open(path: &Option<PathBuf>) -> Result<Destination, AccessLogError> {
        open(path).map(Destination)
    }
}

fn open(path: &Option<PathBuf>) -> Result<Sink, AccessLogError> {
    match path {
        None => Ok(Box::new(std::io::stdout())),
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map(|f| Box::new(f) as Sink)
            .map_err(|source| AccessLogError::Open {
                path: p.clone(),
                source,
            }),
    }
}

/// Owns the destination; runs on its own thread so file writes never touch the async workers.
struct Writer {
    sink: Sink,
    next: Arc<Mutex<Option<Sink>>>,
    buf: Vec<u8>,
}

impl Writer {
    fn write_out(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if let Err(e) = self
            .sink
            .write_all(&self.buf)
            .and_then(|_| self.sink.flush())
        {
            tracing::error!(error = %e, "access log write failed");
        }
        self.buf.clear();
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Line(l) => self.buf.extend_from_slice(l.as_bytes()),
            Msg::Reopen => {
                self.write_out();
                self.take_next();
            }
            Msg::Flush(done) => {
                self.write_out();
                let _ = done.send(());
            }
        }
    }

    /// Moves on to a destination [`AccessLogger::switch`] handed over, if there is one.
    fn take_next(&mut self) {
        let next = self.next.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(sink) = next {
            self.sink = sink;
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        while let Ok(first) = rx.recv() {
            let gather = matches!(first, Msg::Line(_));
            self.handle(first);
            if gather {
                std::thread::sleep(GATHER);
            }
            while self.buf.len() < BATCH_BYTES {
                match rx.try_recv() {
                    Ok(msg) => self.handle(msg),
                    Err(_) => break,
                }
            }
            self.write_out();
            // In case the wake-up of a reopen found the queue full.
            self.take_next();
        }
        // Every handle is gone: write what is left.
        self.write_out();
    }
}

impl AccessLogger {
    /// Opens the destination (`None` = stdout) and starts the writer thread.
    pub fn start(path: Option<PathBuf>, metrics: Arc<Metrics>) -> Result<Self, AccessLogError> {
        let sink = open(&path)?;
        let (tx, rx) = mpsc::sync_channel::<Msg>(16 * 1024);
        let next = Arc::default();
        let writer = Writer {
            sink,
            next: Arc::clone(&next),
            buf: Vec::with_capacity(BATCH_BYTES + 4096),
        };
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run(rx))
            .map_err(AccessLogError::Thread)?;
        Ok(AccessLogger { tx, next, metrics })
    }

    /// Queues one record, rendered as `format` says; never waits.
    pub fn log(&self, record: &AccessRecord, format: &AccessLog) {
        let line = record.render(format);
        if self.tx.try_send(Msg::Line(line)).is_err() {
            self.metrics.access_log_dropped.inc();
        }
    }

    /// Has the writer go on at `to`: the same file again after a log rotation, or another one
    /// named by a reload. Lines queued before are written to the old destination.
    pub fn switch(&self, to: Destination) {
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = Some(to.0);
        // A full queue means the writer is busy: it looks for the new destination after
        // every batch anyway.
        let _ = self.tx.try_send(Msg::Reopen);
    }

    /// Writes out every line queued so far (at shutdown), waiting at most `limit`.
    pub async fn flush(&self, limit: Duration) {
        let (done, wait) = tokio::sync::oneshot::channel();
        let tx = self.tx.clone();
        // The channel may be full; queueing the request must not block a worker.
        let queued = tokio::task::spawn_blocking(move || tx.send(Msg::Flush(done)).is_ok());
        if let Ok(Ok(true)) = tokio::time::timeout(limit, queued).await {
            let _ = tokio::time::timeout(limit, wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_written_as_humantime_writes_them() {
        let mut cases = vec![SystemTime::UNIX_EPOCH, SystemTime::now()];
        // Every nanosecond width, second boundaries (the cached prefix must move on), and
        // dates across leap years and centuries, in and out of order.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let secs = x % 8_000_000_000;
            let nanos = match x % 4 {
                0 => 0,
                1 => 999_999_999,
                2 => (x >> 20) as u32 % 1000,
                _ => (x >> 32) as u32 % 1_000_000_000,
            };
            let t = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
            cases.push(t);
            cases.push(t + Duration::from_nanos(1));
        }
        for t in cases {
            let mut out = String::new();
            push_rfc3339_nanos(&mut out, t);
            assert_eq!(out, humantime::format_rfc3339_nanos(t).to_string(), "{t:?}");
        }
        let mut out = String::new();
        push_rfc3339_nanos(&mut out, SystemTime::UNIX_EPOCH - Duration::from_secs(1));
        assert_eq!(out, "1970-01-01T00:00:00.000000000Z", "a clock before 1970");
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        let mut ips: Vec<IpAddr> = ["0.0.0.0", "255.255.255.255", "10.1.22.133", "127.0.0.1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        // Every octet value in every position.
        ips.extend((0..=255u8).map(|o| IpAddr::from([o, 255 - o, o / 3, o.wrapping_mul(7)])));
        for ip in [
            "::",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.0.0.1",
            "fe80::1",
        ] {
            ips.push(ip.parse().unwrap());
        }
        for ip in ips {
            let mut o = String::from("x");
            push_ip(&mut o, ip);
            assert_eq!(o, format!("x{ip}"));
            for port in [0, 1, 80, 65535] {
                let addr = SocketAddr::new(ip, port);
                let mut o = String::new();
                push_socket_addr(&mut o, addr);
                assert_eq!(o, addr.to_string());
            }
        }
        let scoped: SocketAddr = "[fe80::1%7]:443".parse().unwrap();
        let mut o = String::new();
        push_socket_addr(&mut o, scoped);
        assert_eq!(o, "[fe80::1%7]:443");
    }

    /// The log format with these extra fields and nothing else changed.
    fn fields(extra: &[ExtraField]) -> AccessLog {
        AccessLog {
            extra_fields: extra.to_vec(),
            ..AccessLog::default()
        }
    }

    fn record(uri: &str) -> AccessRecord {
        let mut r = sample();
        r.uri = uri.into();
        r
    }

    #[tokio::test]
    async fn writes_batches_flushes_and_reopens_after_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let metrics = Arc::new(Metrics::new());
        let log = AccessLogger::start(Some(path.clone()), metrics.clone()).unwrap();
        let format = fields(&[]);
        for i in 0..1000 {
            log.log(&record(&format!("/r{i}")), &format);
        }
        log.flush(Duration::from_secs(5)).await;
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1000, "every queued line is written by flush");
        // In the order they were logged.
        assert!(lines[0].contains("\"GET /r0 HTTP/1.1\""), "{}", lines[0]);
        assert!(
            lines[999].contains("\"GET /r999 HTTP/1.1\""),
            "{}",
            lines[999]
        );

        // Rotation: the file is moved away, SIGHUP reopens the path.
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.switch(Destination::open(&Some(path.clone())).unwrap());
        log.log(&record("/after"), &format);
        log.flush(Duration::from_secs(5)).await;
        assert_eq!(
            std::fs::read_to_string(&rotated).unwrap().lines().count(),
            1000
        );
        let fresh = std::fs::read_to_string(&path).unwrap();
        assert_eq!(fresh.lines().count(), 1, "{fresh}");
        assert!(fresh.contains("/after"));
        assert_eq!(metrics.access_log_dropped.get(), 0);
    }

    #[test]
    fn an_unwritable_path_is_a_specific_start_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir/access.log");
        let err = AccessLogger::start(Some(path), Arc::new(Metrics::new()))
            .err()
            .expect("must not start");
        let msg = err.to_string();
        assert!(msg.starts_with("access_log.path: cannot open '"), "{msg}");
        assert!(msg.contains("missing-dir/access.log"), "{msg}");
    }

    /// A client connection from `client`, over TLS with `sni` when that is given.
    fn conn(client: &str, sni: Option<&str>) -> Arc<ConnCtx> {
        let tls = sni.map(|n| crate::tls::ConnTls {
            sni: Some(n.into()),
            mtls: None,
            peer: None,
            alpn: crate::tls::Alpn::Http1,
        });
        Arc::new(ConnCtx::new(client.parse().unwrap(), tls))
    }

    fn sample() -> AccessRecord {
        AccessRecord {
            host: "a.apps.identity".into(),
            status: 403,
            response_bytes: 9,
            user_agent: "ua \"quoted\"".into(),
            x_forwarded_for: "127.0.0.1".into(),
            x_forwarded_proto: "https",
            vcap_request_id: "id".into(),
            response_time: Duration::from_micros(1_500),
            route_policy: Some(Rule::RoutePolicies),
            ..AccessRecord::new(
                conn("127.0.0.1:5555", Some("a.apps.identity")),
                SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
                http::Method::GET,
                "/x?y=1".into(),
                "HTTP/1.1",
            )
        }
    }

    #[test]
    fn the_plain_test_agrees_with_the_byte_rule_for_every_byte_in_every_position() {
        let rule = |v: &[u8]| {
            v.iter()
                .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        };
        for len in [1, 7, 8, 9, 16, 17, 24] {
            for pos in 0..len {
                for b in 0u8..=0x7f {
                    let mut v = vec![b'a'; len];
                    v[pos] = b;
                    let s = std::str::from_utf8(&v).unwrap();
                    assert_eq!(plain(s), rule(&v), "byte {b:#x} at {pos} of {len}");
                }
                // Non-ASCII (two-byte UTF-8) at this position.
                let mut s = "a".repeat(len);
                s.replace_range(pos..pos + 1, "\u{e9}");
                assert!(!plain(&s), "é at {pos} of {len}");
            }
        }
        assert!(plain(""));
        assert!(plain("GET /v1/things?x=1&y=~ HTTP/1.1"));
    }

    #[test]
    fn escapes_quotes_backslashes_and_control_characters_only() {
        // The rule, one character at a time; the fast path for plain values must agree.
        fn reference(v: &str) -> String {
            let mut o = String::from("\"");
            if v.is_empty() {
                o.push('-');
            }
            for c in v.chars() {
                match c {
                    '"' => o.push_str("\\\""),
                    '\\' => o.push_str("\\\\"),
                    c if c.is_control() => o.push_str(&format!("\\x{:02x}", c as u32)),
                    c => o.push(c),
                }
            }
            o.push('"');
            o
        }
        for v in [
            "",
            "plain /path?q=1&r=~",
            "say \"hi\"",
            "back\\slash",
            "tab\there",
            "nl\n\r",
            "del\u{7f}",
            "c1\u{85}\u{9f}",
            "caf\u{e9} \u{1f600}",
            "\u{0}",
        ] {
            let mut o = String::new();
            quoted(&mut o, v);
            assert_eq!(o, reference(v), "{v:?}");
        }
        let mut o = String::new();
        quoted(&mut o, "a\"b\u{1}");
        assert_eq!(o, "\"a\\\"b\\x01\"");
    }

    /// GoRouter's backend-connection fields: seconds or an address when known, `"-"` when not
    /// (a pooled connection, a plain endpoint, an address that needed no lookup, no failure).
    #[test]
    fn renders_the_backend_connection_fields() {
        let all = fields(&[
            ExtraField::LocalAddress,
            ExtraField::FailedAttemptsTime,
            ExtraField::DnsTime,
            ExtraField::DialTime,
            ExtraField::TlsTime,
        ]);
        let mut r = sample();
        assert!(
            r.render(&all).contains(
                " local_address:\"-\" failed_attempts_time:\"-\" dns_time:\"-\" \
                 dial_time:\"-\" tls_time:\"-\" x_cf_routererror:\"-\"\n"
            ),
            "{}",
            r.render(&all)
        );
        r.attempts = Attempts {
            failed_time: Some(Duration::from_micros(2_000_001)),
            local_address: Some("[fd00::1]:40001".parse().unwrap()),
            setup: Some(Box::new(Setup {
                dns: Some(Duration::from_micros(250)),
                dial: Duration::from_micros(1_500),
                tls: Some(Duration::from_millis(3)),
            })),
        };
        let line = r.render(&all);
        assert!(
            line.contains(
                " local_address:\"[fd00::1]:40001\" failed_attempts_time:2.000001 \
                 dns_time:0.000250 dial_time:0.001500 tls_time:0.003000 x_cf_routererror"
            ),
            "{line}"
        );
        r.attempts.setup = Some(Box::new(Setup {
            dns: None,
            dial: Duration::from_micros(9),
            tls: None,
        }));
        let line = r.render(&all);
        assert!(
            line.contains(" dns_time:\"-\" dial_time:0.000009 tls_time:\"-\" "),
            "{line}"
        );
    }

    #[test]
    fn renders_times_with_six_decimals_and_numbers() {
        let mut r = sample();
        r.response_time = Duration::new(12, 345_678_999);
        r.backend_time = Some(Duration::from_micros(7));
        r.failed_attempts = 2;
        r.status = 502;
        r.request_bytes = 1_048_576;
        r.conn = conn("[::1]:443", None);
        let line = r.render(&fields(&[
            ExtraField::FailedAttempts,
            ExtraField::BackendTime,
        ]));
        assert!(line.contains("\" 502 1048576 9 \"-\" "), "{line}");
        assert!(line.contains(" \"[::1]:443\" \"-\" "), "{line}");
        assert!(
            line.contains(" response_time:12.345678 gorouter_time:12.345671 "),
            "{line}"
        );
        assert!(
            line.ends_with(" failed_attempts:2 backend_time:0.000007 x_cf_routererror:\"-\"\n"),
            "{line}"
        );
    }

    #[test]
    fn renders_every_field_in_order_with_dashes() {
        let mut r = sample();
        r.endpoint = Some(Arc::new(Endpoint {
            app: "B".into(),
            ..Endpoint::plain("10.0.1.2", 8080)
        }));
        let line = r.render(&fields(&[
            ExtraField::RoutePolicy,
            ExtraField::TlsSni,
            ExtraField::CallerCfOrg,
        ]));
        assert_eq!(
            line,
            "a.apps.identity - [2023-11-14T22:13:20.123456789Z] \"GET /x?y=1 HTTP/1.1\" 403 0 9 \"-\" \
             \"ua \\\"quoted\\\"\" \"127.0.0.1:5555\" \"10.0.1.2:8080\" x_forwarded_for:\"127.0.0.1\" \
             x_forwarded_proto:\"https\" vcap_request_id:\"id\" response_time:0.001500 \
             gorouter_time:0.001500 app_id:\"B\" app_index:\"-\" instance_id:\"-\" \
             route_policy:\"route:route_policies\" tls_sni:\"a.apps.identity\" caller_cf_org:\"-\" \
             x_cf_routererror:\"-\"\n"
        );
    }

    #[test]
    fn redacts_the_query_the_source_ip_and_x_forwarded_for_as_configured() {
        let render = |uri: &str, method: http::Method, format: &AccessLog| {
            let mut r = record(uri);
            r.method = method;
            r.render(format)
        };
        let with = |redact_query| AccessLog {
            redact_query,
            ..fields(&[])
        };
        let get = http::Method::GET;
        // GoRouter's own example: `name=peter` is logged as its SHA-1.
        assert!(render(
            "/users?name=peter",
            get.clone(),
            &with(QueryRedaction::Hash)
        )
        .contains("\"GET /users?hash=a6909eece4005d85fb1894cc4efa38564b9c30c3 HTTP/1.1\""));
        assert!(
            render("/users?name=peter", get.clone(), &with(QueryRedaction::All))
                .contains("\"GET /users HTTP/1.1\"")
        );
        assert!(render(
            "/users?name=peter",
            get.clone(),
            &with(QueryRedaction::None)
        )
        .contains("\"GET /users?name=peter HTTP/1.1\""));
        // Every method, not only GET as in GoRouter: a POST's query is as personal.
        assert!(render(
            "/users?name=peter",
            http::Method::POST,
            &with(QueryRedaction::All)
        )
        .contains("\"POST /users HTTP/1.1\""));
        // Nothing to redact: no query, or an empty one.
        for uri in ["/users", "/users?", "/"] {
            for q in [QueryRedaction::All, QueryRedaction::Hash] {
                let line = render(uri, get.clone(), &with(q));
                assert!(line.contains(&format!("\"GET {uri} HTTP/1.1\"")), "{line}");
            }
        }
        // The path is escaped as before; only the first `?` starts the query.
        let line = render("/a\"b?x=1?y", get.clone(), &with(QueryRedaction::Hash));
        let sha = "6af621f17269191e3d139500b14d1a83911b3829";
        assert!(
            line.contains(&format!("\"GET /a\\\"b?hash={sha} HTTP/1.1\"")),
            "{line}"
        );

        let plain = record("/x").render(&fields(&[]));
        assert!(
            plain.contains(" \"127.0.0.1:5555\" \"-\" x_forwarded_for:\"127.0.0.1\" "),
            "{plain}"
        );
        let hidden = record("/x").render(&AccessLog {
            redact_source_ip: true,
            redact_forwarded_for: true,
            ..fields(&[])
        });
        assert!(
            hidden.contains(" \"-\" \"-\" x_forwarded_for:\"-\" "),
            "{hidden}"
        );
        assert!(!hidden.contains("127.0.0.1"), "{hidden}");
    }

    #[test]
    fn ends_with_the_logged_headers_in_their_order() {
        let header = |n: &str| crate::config::LoggedHeader {
            name: http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            field: n.to_ascii_lowercase().replace('-', "_"),
        };
        let format = AccessLog {
            headers: vec![
                header("X-Tenant-Id"),
                header("Traceparent"),
                header("X-Odd"),
            ],
            ..fields(&[ExtraField::TlsSni])
        };
        let mut h = http::HeaderMap::new();
        h.insert(
            "x-odd",
            http::HeaderValue::from_bytes(b"a\"b\t\xe9").unwrap(),
        );
        h.append("x-tenant-id", http::HeaderValue::from_static("acme"));
        h.append("x-tenant-id", http::HeaderValue::from_static("second"));
        let mut r = sample();
        r.take_headers(&format, &h);
        let line = r.render(&format);
        assert!(
            line.ends_with(
                " tls_sni:\"a.apps.identity\" x_tenant_id:\"acme\" traceparent:\"-\" \
                 x_odd:\"a\\\"b\\x09\u{fffd}\" x_cf_routererror:\"-\"\n"
            ),
            "{line}"
        );
        // Taken again (the request as the app gets it): the later values win.
        h.insert("traceparent", http::HeaderValue::from_static("00-ab-cd-01"));
        r.take_headers(&format, &h);
        assert!(r.render(&format).contains(" traceparent:\"00-ab-cd-01\" "));
        // None configured: nothing taken, nothing added.
        let mut r = sample();
        r.take_headers(&fields(&[]), &h);
        assert!(r.headers.is_empty());
    }
}
