//! The request pipeline (SPEC §6): host → lookup → binding → identity → authorization with
//! endpoint selection → proxy → exactly one access-log record.

pub mod body;
mod early;
mod error_page;
/// Public for the `h2_frames` fuzz target.
pub mod h2_settings;
mod headers;
mod pool;
pub mod route_service;
pub mod sticky;

/// The path a request is routed by (public for the `request_path` fuzz target).
pub use headers::routing_path;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::header::{HeaderValue, CONTENT_TYPE, HOST, REFERER, USER_AGENT};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::accesslog::AccessRecord;
use crate::authz::{check_scope, decide_sources, Denial, Rule};
use crate::config::{Config, EndpointSelection, ForwardedProto, XfccFormat};
use crate::identity::Identity;
use crate::names::{normalize_authority, DomainPattern};
use crate::registry::Protocol;
use crate::routing::Endpoint;
use crate::state::State;
use crate::tls::ConnTls;
use body::{
    empty, full, BoxError, Counted, End, Finish, Keeper, Kept, ProxyBody, RequestStall,
    RequestWatch, Stall, Taken,
};
pub use error_page::ErrorTemplate;
pub use headers::{is_upgrade, xfcc_value, XFCC, X_CF_ROUTERERROR};
pub use pool::{BackendPool, Setup};
use pool::{ConnectSettings, Lease, SendFailure};

/// What the proxy knows about a client connection.
#[derive(Debug)]
pub struct ConnCtx {
    pub client: SocketAddr,
    /// TLS facts; `None` on the plain HTTP listener.
    pub tls: Option<ConnTls>,
    /// Whether the kernel does this connection's TLS records.
    pub ktls: bool,
    /// The gateway's address this connection came to (`X-Vcap-Router`); `None` where unknown.
    pub local: Option<IpAddr>,
    /// Requests in flight (the idle timer only runs when this is zero).
    pub inflight: Arc<AtomicUsize>,
    /// Requests started on this connection (the idle timer restarts when it moves).
    pub requests: AtomicU64,
    /// Notified when the connection should end after the responses in flight (see
    /// [`ConnCtx::end`]).
    pub end: tokio::sync::Notify,
    ending: AtomicBool,
}

impl ConnCtx {
    pub fn new(client: SocketAddr, tls: Option<ConnTls>) -> ConnCtx {
        ConnCtx {
            client,
            tls,
            ktls: false,
            local: None,
            inflight: Arc::default(),
            requests: AtomicU64::new(0),
            end: tokio::sync::Notify::new(),
            ending: AtomicBool::new(false),
        }
    }

    /// Ends the connection after the responses in flight: its caller was learned as denied
    /// (SPEC §11), so the gate refuses its new connections from now on, and keeping this one
    /// open would let it go on costing a 403 per request. HTTP/1.1 responses from now on say
    /// `connection: close`; an h2 connection is sent GOAWAY. Returns whether this call is the
    /// one that ended it.
    pub fn end(&self) -> bool {
        let first = !self.ending.swap(true, Ordering::Relaxed);
        self.end.notify_one();
        first
    }

    pub fn is_ending(&self) -> bool {
        self.ending.load(Ordering::Relaxed)
    }

    /// The caller's identity from a verified instance-identity certificate.
    pub fn identity(&self) -> Option<&Identity> {
        self.tls.as_ref()?.peer.as_ref()?.identity.as_ref().ok()
    }

    fn mtls(&self) -> Option<&DomainPattern> {
        self.tls.as_ref()?.mtls.as_ref()
    }
}

/// Every answer the gateway gives itself instead of the backend's.
#[derive(Debug)]
enum Reject {
    EmptyHost,
    UnknownRoute(String),
    Misdirected,
    /// Identity or policy denial: always final, never retried.
    Forbidden(Rule),
    EndpointFailure,
    EndpointTimeout,
    /// The client sent nothing of its request body for `limits.request_body_timeout` while the
    /// endpoint waited for it.
    RequestBodyTimeout,
    /// `X-CF-App-Instance` is not `<app guid>:<index>`, or `X-CF-Process-Instance` is not
    /// `<process guid>[:<index>]`.
    InvalidInstanceHeader(InstanceHeader),
    /// Every endpoint the request could go to has `backends.max_conns` requests in flight.
    ConnectionLimit(String),
    /// The route is bound to a route service, and `route_services` is not configured (or the
    /// route is in an mTLS domain).
    RouteServiceUnsupported,
    /// A WebSocket upgrade for a route bound to a route service.
    RouteServiceWebSocket,
    /// A request that came back from a route service with a signature the gateway does not
    /// take back.
    RouteServiceSignature,
    /// The route has no endpoint for the instance `X-CF-App-Instance` or
    /// `X-CF-Process-Instance` names.
    UnknownInstance {
        host: String,
        wanted: Wanted,
    },
    /// `CONNECT`: the gateway is not a forward proxy, and a tunnel to an app would carry
    /// requests past its routing and policies.
    Connect,
    /// A path with a `.` or `..` segment, raw or escaped (see [`headers::routing_path`]).
    DotSegment,
    /// More than one Host header: which one the app would read is anyone's guess (RFC 9112
    /// §3.2; Go's server answers the same 400).
    TooManyHosts,
    /// An HTTP/2 request whose header list is larger than `limits.max_header_bytes` (HTTP/1.1's
    /// larger heads are hyper's own 431).
    HeadersTooLarge,
    /// An HTTP/1.1 request whose `Transfer-Encoding` is not `chunked` alone (`gzip, chunked`):
    /// the gateway would pass the body on still coded and unsaid (RFC 9112 §6.1; Go's server,
    /// so GoRouter, answers the same 501).
    UnsupportedTransferCoding,
}

/// GoRouter's two headers that ask for particular instances.
#[derive(Clone, Copy, Debug)]
enum InstanceHeader {
    App,
    Process,
}

/// The instances a request asks for, as GoRouter reads its headers (`X-CF-App-Instance` first).
#[derive(Debug)]
enum Wanted {
    /// `X-CF-App-Instance: <app guid>:<index>`: one instance of the route's app.
    App { app: String, index: String },
    /// `X-CF-Process-Instance: <process guid>[:<index>]`: the instances of one process (a
    /// canary deployment's, say), or one of them.
    Process {
        process: String,
        index: Option<String>,
    },
}

impl Wanted {
    fn admits(&self, e: &Endpoint) -> bool {
        match self {
            Wanted::App { app, index } => e.app == *app && e.private_instance_index == *index,
            Wanted::Process { process, index } => {
                e.process_id() == process
                    && index
                        .as_ref()
                        .is_none_or(|i| e.private_instance_index == *i)
            }
        }
    }
}

impl Reject {
    /// The one place a rejection becomes a status, a body and an `X-Cf-Routererror`; with `page`,
    /// the body is the operator's HTML page (`html_error_template_file`) around that body.
    fn response(&self, page: Option<&ErrorTemplate>) -> Response<ProxyBody> {
        let (status, body) = match self {
            Reject::EmptyHost => (StatusCode::BAD_REQUEST, String::new()),
            Reject::UnknownRoute(host) => (
                StatusCode::NOT_FOUND,
                format!("Requested route ('{host}') does not exist."),
            ),
            Reject::Misdirected => (StatusCode::MISDIRECTED_REQUEST, String::new()),
            Reject::Forbidden(Rule::IdentityExtraction) => (StatusCode::FORBIDDEN, String::new()),
            Reject::Forbidden(_) => (StatusCode::FORBIDDEN, "Forbidden".into()),
            Reject::EndpointFailure => (StatusCode::BAD_GATEWAY, String::new()),
            Reject::EndpointTimeout => (StatusCode::GATEWAY_TIMEOUT, String::new()),
            Reject::RequestBodyTimeout => (StatusCode::REQUEST_TIMEOUT, String::new()),
            Reject::TooManyHosts => (StatusCode::BAD_REQUEST, "too many Host headers".into()),
            Reject::HeadersTooLarge => (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, String::new()),
            Reject::Connect => (
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported".into(),
            ),
            Reject::DotSegment => (
                StatusCode::BAD_REQUEST,
                "the path has a '.' or '..' segment".into(),
            ),
            Reject::UnsupportedTransferCoding => (
                StatusCode::NOT_IMPLEMENTED,
                "Unsupported transfer encoding".into(),
            ),
            Reject::ConnectionLimit(host) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("Requested route ('{host}') has reached the connection limit."),
            ),
            Reject::RouteServiceUnsupported => (
                StatusCode::BAD_GATEWAY,
                "Support for route services is disabled.".into(),
            ),
            Reject::RouteServiceWebSocket => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Websocket requests are not supported for routes bound to Route Services.".into(),
            ),
            Reject::RouteServiceSignature => (
                StatusCode::BAD_REQUEST,
                "Failed to validate Route Service Signature".into(),
            ),
            Reject::InvalidInstanceHeader(InstanceHeader::App) => (
                StatusCode::BAD_REQUEST,
                "Invalid X-CF-App-Instance Header".into(),
            ),
            Reject::InvalidInstanceHeader(InstanceHeader::Process) => (
                StatusCode::BAD_REQUEST,
                "Invalid X-CF-Process-Instance Header".into(),
            ),
            Reject::UnknownInstance { host, wanted } => (
                StatusCode::BAD_REQUEST,
                match wanted {
                    Wanted::App { app, index } => format!(
                        "Requested instance ('{index}') with guid ('{app}') does not exist for route ('{host}')"
                    ),
                    Wanted::Process { process, index: Some(index) } => format!(
                        "Requested instance ('{index}') with process guid ('{process}') does not exist for route ('{host}')"
                    ),
                    Wanted::Process { process, index: None } => format!(
                        "Requested instance with process guid ('{process}') does not exist for route ('{host}')"
                    ),
                },
            ),
        };
        let mut resp = Response::new(empty());
        *resp.status_mut() = status;
        let router_error = self.router_error();
        if !router_error.is_empty() {
            resp.headers_mut()
                .insert(X_CF_ROUTERERROR, HeaderValue::from_static(router_error));
        }
        let (body, content_type) = match page {
            Some(page) => {
                let html = page.render(status, &body, resp.headers());
                resp.headers_mut().insert(
                    http::header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                );
                (html, "text/html; charset=utf-8")
            }
            None => (body, "text/plain; charset=utf-8"),
        };
        if !body.is_empty() {
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            *resp.body_mut() = full(body);
        }
        resp
    }

    /// The `X-Cf-Routererror` value (empty: no header), also logged as `x_cf_routererror`.
    fn router_error(&self) -> &'static str {
        match self {
            Reject::EmptyHost => "empty_host",
            Reject::UnknownRoute(_) | Reject::UnknownInstance { .. } => "unknown_route",
            Reject::InvalidInstanceHeader(InstanceHeader::App) => "invalid_cf_app_instance_header",
            Reject::InvalidInstanceHeader(InstanceHeader::Process) => {
                "invalid_cf_process_instance_header"
            }
            Reject::ConnectionLimit(_) => "Connection Limit Reached",
            Reject::RouteServiceUnsupported | Reject::RouteServiceWebSocket => {
                "route_service_unsupported"
            }
            Reject::EndpointFailure => "endpoint_failure",
            Reject::EndpointTimeout => "endpoint_timeout",
            Reject::RequestBodyTimeout => "request_body_timeout",
            Reject::HeadersTooLarge => "headers_too_large",
            // GoRouter sends none with it; the log line says why (debug) and the metric counts it.
            Reject::RouteServiceSignature => "",
            Reject::Misdirected
            | Reject::Forbidden(_)
            | Reject::UnsupportedTransferCoding
            | Reject::TooManyHosts
            | Reject::Connect
            | Reject::DotSegment => "",
        }
    }
}

/// Whether a connection may carry a request for `host` (SPEC §6 binding rows). A host inside an
/// mTLS domain needs a connection that required a client certificate for that same domain.
pub fn binding_ok(cfg: &Config, conn_mtls: Option<&DomainPattern>, host: &str) -> bool {
    let governing = cfg.domain_for(host).map(|d| &d.pattern);
    match conn_mtls {
        Some(p) => p.matches(host) && governing == Some(p),
        None => governing.is_none(),
    }
}

/// The status logged for a request its client gave up on (stream reset or connection closed)
/// before the response began, as nginx and GoRouter log it.
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// Work that runs once a response is finished: log, count, release counters. Dropped unfinished
/// (the client gave up before the response began, and hyper dropped the request), it finishes
/// as a 499, so the request is logged and its endpoint's in-flight count released.
struct Completion {
    state: Arc<State>,
    /// The config the request started under, whose `access_log` renders its line.
    rt: Arc<crate::state::Runtime>,
    record: AccessRecord,
    started: Instant,
    /// How much of the request's body went on to the endpoint, and the rest of it.
    request_body: Arc<Taken<Incoming>>,
    inflight: Arc<AtomicUsize>,
    endpoint_active: Option<Arc<AtomicUsize>>,
    lease: Option<(Lease, usize)>,
    /// Set when the request's body is timed (`limits.request_body_timeout`).
    request_watch: Option<Arc<RequestWatch>>,
    finished: bool,
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.finished {
            if self.record.status == 0 {
                self.record.status = CLIENT_CLOSED_REQUEST;
            }
            self.finish(0, End::Cut);
        }
    }
}

impl Completion {
    fn finish(&mut self, response_bytes: u64, end: End) {
        self.finished = true;
        let clean = end == End::Clean;
        if end == End::Stalled {
            self.record.router_error = "endpoint_timeout";
            count_backend_error(&self.state, "body_timeout");
        }
        self.record.response_bytes = response_bytes;
        self.record.request_bytes = self.request_body.bytes();
        self.record.response_time = self.started.elapsed();
        self.state.metrics.count_request(self.record.status);
        self.state.metrics.time_request(
            self.record.status,
            self.record.response_time,
            self.record.backend_time,
        );
        self.state.log.log(&self.record, &self.rt.config.access_log);
        if let Some(a) = self.endpoint_active.take() {
            a.fetch_sub(1, Ordering::Relaxed);
        }
        if !self.request_body.all() {
            // The answer ended before the app had the whole body (an app that answers early,
            // a 413 say): the rest is not sent on. An app that reads no more would otherwise
            // hold the client's upload for as long as it kept the exchange open; one that reads
            // on has said all it will. Go's transport (so GoRouter) does the same. Counted when
            // an app's answer ended whole: one cut short, or the gateway's own, is another story.
            if let (true, Some((lease, _))) = (clean, &self.lease) {
                let protocol = if lease.is_h2() { "http2" } else { "http1" };
                self.state
                    .metrics
                    .backend_early_answers
                    .get_or_create(&crate::metrics::ProtocolLabels { protocol })
                    .inc();
            }
            tracing::debug!(
                endpoint = self
                    .record
                    .endpoint
                    .as_ref()
                    .map_or("-", |e| e.addr.as_str()),
                "the answer ended before the request body was all sent; the rest is not sent on"
            );
            self.request_body.stop();
        }
        if let Some((lease, max_idle)) = self.lease.take() {
            self.state
                .backends()
                .give_back(lease, max_idle, clean, &self.request_body);
        }
        self.inflight.fetch_sub(1, Ordering::Relaxed);
    }

    fn wrap(self, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        let (parts, body) = resp.into_parts();
        let mut done = self;
        let body = Finish::new(body, Box::new(move |n, end| done.finish(n, end)));
        Response::from_parts(parts, BodyExt::boxed_unsync(body))
    }
}

fn header_str(req: &Request<Incoming>, name: http::header::HeaderName) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn scheme_of(conn: &ConnCtx) -> &'static str {
    if conn.tls.is_some() {
        "https"
    } else {
        "http"
    }
}

/// The `X-Forwarded-Proto` the backend gets (and the access log shows), per `x_forwarded_proto`.
fn forwarded_proto(mode: ForwardedProto, conn: &ConnCtx, h: &http::HeaderMap) -> &'static str {
    match mode {
        ForwardedProto::Connection => scheme_of(conn),
        ForwardedProto::Https => "https",
        ForwardedProto::Client => match h.get(headers::X_FORWARDED_PROTO).map(|v| v.as_bytes()) {
            Some(v) if v.eq_ignore_ascii_case(b"https") => "https",
            Some(v) if v.eq_ignore_ascii_case(b"http") => "http",
            _ => scheme_of(conn),
        },
    }
}

fn proto_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// The answer hyper's HTTP/1.1 server gave on its own to a request head it could not parse,
/// before the connection ended: the status, and the access log's router error for it. `None`
/// for the errors hyper answers nothing to. (hyper 1's `Server::on_error`: a bad method, URI,
/// version or header is 400; a head over `limits.max_header_bytes` is 431; a URI of 64 KiB or
/// more is 414, which only its message tells from 431.)
pub fn unparsed_head(e: &hyper::Error) -> Option<(u16, &'static str)> {
    if !e.is_parse() || e.is_parse_version_h2() || e.is_parse_status() {
        return None;
    }
    let text = e.to_string();
    if e.is_parse_too_large() {
        return Some(match text.starts_with("URI too long") {
            true => (414, "uri_too_long"),
            false => (431, "headers_too_large"),
        });
    }
    // Parse::Internal ("internal error inside Hyper …") is not answered.
    (!text.starts_with("internal error")).then_some((400, "malformed_request"))
}

/// Logs and counts an answer hyper gave to a request head it could not parse (see
/// [`unparsed_head`]): the request line is unknown (`"- - HTTP/1.1"`), the connection's fields
/// (client, SNI, caller) are there.
pub fn log_unparsed_head(state: &State, conn: &Arc<ConnCtx>, status: u16, why: &'static str) {
    let rt = state.runtime.load();
    let record = AccessRecord {
        status,
        x_forwarded_proto: scheme_of(conn),
        router_error: why,
        headers: vec![None; rt.config.access_log.headers.len()],
        ..AccessRecord::new(
            conn.clone(),
            SystemTime::now(),
            http::Method::from_bytes(b"-").expect("'-' is a method token"),
            "-".into(),
            "HTTP/1.1",
        )
    };
    state.metrics.count_request(status);
    state.log.log(&record, &rt.config.access_log);
}

/// Serves one request. Never fails: every error becomes a response.
pub async fn handle(
    state: Arc<State>,
    conn: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    let started = Instant::now();
    conn.inflight.fetch_add(1, Ordering::Relaxed);
    conn.requests.fetch_add(1, Ordering::Relaxed);
    let raw_host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let host = normalize_authority(&raw_host);
    // One snapshot of the running config for the whole request.
    let rt = state.runtime.load_full();
    // An HTTP/2 header list over the limit, measured as the client sent it. hyper takes up to
    // twice the limit (see `gateway::builder`), so that such a request gets the gateway's own
    // answer, logged, on a stream of a connection that goes on serving.
    let oversize = req.version() == Version::HTTP_2
        && headers::h2_header_list_size(&req) > rt.config.limits.max_header_bytes;
    let record = AccessRecord {
        host: host.clone(),
        referer: header_str(&req, REFERER),
        user_agent: header_str(&req, USER_AGENT),
        x_forwarded_proto: forwarded_proto(rt.config.x_forwarded_proto, &conn, req.headers()),
        ..AccessRecord::new(
            conn.clone(),
            SystemTime::now(),
            req.method().clone(),
            req.uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
            proto_name(req.version()),
        )
    };
    let mut done = Completion {
        state: state.clone(),
        rt: rt.clone(),
        record,
        started,
        request_body: Arc::default(),
        inflight: conn.inflight.clone(),
        endpoint_active: None,
        lease: None,
        request_watch: None,
        finished: false,
    };
    // Logged for every request, including the gateway's own rejections.
    let mut req = req;
    let trace = rt
        .config
        .trace_key
        .as_ref()
        .is_some_and(|key| headers::trace_requested(req.headers_mut(), key));
    done.record.vcap_request_id = headers::request_id(req.headers_mut());
    done.record.x_forwarded_for = headers::forwarded_for(req.headers_mut(), conn.client.ip());
    done.record
        .take_headers(&rt.config.access_log, req.headers());
    let h1 = req.version() < Version::HTTP_2;
    let page = rt
        .config
        .error_template
        .as_deref()
        .filter(|_| error_page::accepts_html(req.headers()));
    let mut close = false;
    let routed = match oversize {
        true => Err(Reject::HeadersTooLarge),
        false => route(&state, &rt, &conn, req, &host, &raw_host, &mut done).await,
    };
    let mut resp = match routed {
        Ok(resp) => {
            if let Some(watch) = &done.request_watch {
                watch.answered();
            }
            resp
        }
        Err(reject) => {
            // However the endpoint's connection ended, it was the client that stopped.
            let reject = match &done.request_watch {
                Some(watch) if watch.stalled() => Reject::RequestBodyTimeout,
                _ => reject,
            };
            done.record.router_error = reject.router_error();
            // A request framed or addressed ambiguously: the client's next one cannot be
            // trusted either (where its body ends, which host it means).
            close = matches!(
                reject,
                Reject::UnsupportedTransferCoding | Reject::TooManyHosts
            );
            reject.response(page)
        }
    };
    // A connection that should end (its caller was denied, or the gateway is draining) ends
    // after this response; an upgrade's 101 keeps its `connection: upgrade`. (One whose request
    // body was left unread half way, after a 408, hyper closes itself.)
    if h1
        && resp.status() != StatusCode::SWITCHING_PROTOCOLS
        && (close || conn.is_ending() || state.draining.is_on())
    {
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let (true, Some(ep)) = (trace, &done.record.endpoint) {
        headers::add_trace(resp.headers_mut(), conn.local, &ep.addr);
    }
    let rewrite = &rt.config.response_rewrite;
    if !rewrite.is_empty() {
        rewrite.apply(resp.headers_mut());
    }
    done.record.status = resp.status().as_u16();
    Ok(done.wrap(resp))
}

async fn route(
    state: &Arc<State>,
    rt: &crate::state::Runtime,
    conn: &ConnCtx,
    mut req: Request<Incoming>,
    host: &str,
    raw_host: &str,
    done: &mut Completion,
) -> Result<Response<ProxyBody>, Reject> {
    if req.version() < Version::HTTP_2 && !headers::transfer_coding_ok(req.headers()) {
        return Err(Reject::UnsupportedTransferCoding);
    }
    if req.headers().get_all(HOST).iter().nth(1).is_some() {
        return Err(Reject::TooManyHosts);
    }
    if req.method() == http::Method::CONNECT {
        return Err(Reject::Connect);
    }
    headers::refuse_h2c(req.headers_mut());
    if host.is_empty() {
        return Err(Reject::EmptyHost);
    }
    // `OPTIONS *` asks about the server, not about a resource (RFC 9110 §9.3.7): the gateway
    // answers it, as Go's server does for GoRouter, and no app is asked.
    if req.method() == http::Method::OPTIONS && req.uri().path() == "*" {
        return Ok(Response::new(empty()));
    }
    let path = headers::routing_path(req.uri().path()).ok_or(Reject::DotSegment)?;
    let table = state.registry.table();
    let pool = table
        .lookup(host, &path)
        .ok_or_else(|| Reject::UnknownRoute(host.to_string()))?;
    // The route's path as this client spells it (routes match in any case), for the sticky
    // session cookie's `Path`, which browsers compare case-sensitively.
    let route_path = match path.get(..pool.key.path.len()) {
        Some(spelled) if spelled != pool.key.path => std::borrow::Cow::Owned(spelled.to_string()),
        _ => std::borrow::Cow::Borrowed(pool.key.path.as_str()),
    };
    if !binding_ok(&rt.config, conn.mtls(), host) {
        return Err(Reject::Misdirected);
    }
    // GoRouter's `X-CF-App-Instance: <app guid>:<index>` asks for one instance of the route's
    // app, `X-CF-Process-Instance` for the instances of one process; every other endpoint is
    // out of the selection.
    let instance = match requested_instance(req.headers())? {
        Some(wanted) if !pool.endpoints.iter().any(|e| wanted.admits(e)) => {
            return Err(Reject::UnknownInstance {
                host: host.to_string(),
                wanted,
            });
        }
        wanted => wanted,
    };
    let in_instance = |e: &Endpoint| instance.as_ref().is_none_or(|w| w.admits(e));

    // Authorization with endpoint selection; a sticky session asks for its instance first.
    let sessions = &rt.config.backends.sticky_session_cookies;
    let asked = sticky::requested(req.headers(), sessions);
    let mut selector = pool
        .selector()
        .local_first(rt.config.backends.local_zone.as_deref())
        .balancing(rt.config.backends.balancing)
        .hashing(req.headers());
    let mut first: Option<Arc<Endpoint>> = None;
    // `backends.max_conns`: endpoints with that many requests in flight are passed over, and a
    // request with none left is answered 503 (after its authorization).
    let max_conns = rt.config.backends.max_conns;
    let mut full = false;
    let identity = conn.identity();
    let scope = pool.policy.scope.as_ref();
    if let Some(scope) = scope {
        let decision = (|| {
            let id = identity.ok_or(Denial(Rule::IdentityExtraction))?;
            match rt.config.endpoint_selection {
                EndpointSelection::Filter => {
                    let mut last = None;
                    for e in pool.endpoints.iter().filter(|e| in_instance(e)) {
                        match check_scope(scope, id, e.as_ref()) {
                            Ok(()) => {
                                last = None;
                                break;
                            }
                            Err(d) => last = Some(d),
                        }
                    }
                    if let Some(d) = last {
                        return Err(d);
                    }
                }
                EndpointSelection::Strict => {
                    let open = |e: &Endpoint| in_instance(e) && e.has_room(max_conns);
                    let chosen = asked
                        .as_deref()
                        .and_then(|id| selector.prefer(id, open))
                        .or_else(|| selector.next(open));
                    // All full: the caller is still checked against the endpoint it would
                    // have had, so it learns of the limit only if it may use the route.
                    full = chosen.is_none();
                    let ep = match chosen {
                        Some(ep) => ep,
                        None => selector
                            .next(in_instance)
                            .ok_or(Denial(Rule::RoutePolicies))?,
                    };
                    check_scope(scope, id, ep.as_ref())?;
                    first = (!full).then_some(ep);
                }
            }
            decide_sources(&pool.policy, id)
        })();
        match decision {
            Ok(rule) => {
                state.metrics.count_decision(true, &rule);
                done.record.route_policy = Some(rule);
            }
            Err(Denial(rule)) => {
                state.metrics.count_decision(false, &rule);
                done.record.route_policy = Some(rule.clone());
                if let (Some(x), Some(p)) = (&state.xdp, conn.mtls()) {
                    if x.failure(p, conn.client.ip(), &state.metrics) && conn.end() {
                        tracing::debug!(client = %conn.client, "caller denied by the gate: ending its connection");
                        state.metrics.xdp_deny_connections_ended.inc();
                    }
                }
                return Err(Reject::Forbidden(rule));
            }
        }
    }
    // A route bound to a route service (GoRouter's `route_service_url`) reaches its app only
    // through that service, which may be what authenticates or limits its callers: the request
    // goes to the service, unless it comes back from it signed. After the policy, so a caller
    // the route refuses learns nothing more than 403.
    let mut to_route_service = None;
    if let Some(url) = &pool.route_service {
        let services = match (&rt.route_services, conn.mtls()) {
            (Some(s), None) => s,
            // Without `route_services`, or in an mTLS domain (the service's call back would
            // carry its own certificate, not the caller's): as GoRouter with route services off.
            _ => return Err(Reject::RouteServiceUnsupported),
        };
        if is_upgrade(req.headers()) {
            return Err(Reject::RouteServiceWebSocket);
        }
        let outcome = |o| route_service::count(state, o);
        if req
            .headers()
            .contains_key(route_service::X_CF_PROXY_SIGNATURE)
        {
            if let Err(e) = route_service::came_back(services, &table, &pool.key, req.headers()) {
                tracing::debug!(client = %conn.client, %host, error = %e, "route service request not taken back");
                outcome(e.outcome());
                return Err(Reject::RouteServiceSignature);
            }
            outcome("returned");
            done.record.route_service = "returned";
            let h = req.headers_mut();
            h.remove(route_service::X_CF_PROXY_SIGNATURE);
            h.remove(route_service::X_CF_PROXY_METADATA);
            h.remove(route_service::X_CF_FORWARDED_URL);
        } else {
            outcome("sent");
            done.record.route_service = "sent";
            to_route_service = Some((services, url.clone()));
        }
    } else if let Some(services) = &rt.route_services {
        if let Err(e) = route_service::signed_anyway(services, req.headers()) {
            tracing::debug!(client = %conn.client, %host, error = %e, "forged route service headers for a route without a route service");
            route_service::count(state, e.outcome());
            return Err(Reject::RouteServiceSignature);
        }
    }
    if full && to_route_service.is_none() {
        return Err(connection_limit(state, host));
    }

    // Build the backend request.
    let upgrade = req.version() == Version::HTTP_11 && is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let h = &mut parts.headers;
    // Room for the headers added from here on (forwarding, B3, XFCC, the instance's), so the
    // map grows at most once; a request refused above never pays for it.
    h.reserve(10);
    headers::strip_request_hop_by_hop(h, upgrade);
    headers::drop_underscore_lookalikes(h);
    if parts.version == Version::HTTP_2 {
        headers::join_cookies(h);
    }
    h.insert(
        headers::X_FORWARDED_PROTO,
        HeaderValue::from_static(done.record.x_forwarded_proto),
    );
    // `X-Forwarded-For` was set by `handle`, and no `Connection` token takes it away.
    // When the request arrived (as GoRouter stamps it): the access line's start, in ms.
    let start_ms = done
        .record
        .start
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    h.insert(headers::X_REQUEST_START, HeaderValue::from(start_ms as u64));
    headers::trace(h, rt.config.w3c_tracestate_key.as_deref());
    let (mode, format) = match rt.config.domain_for(host) {
        Some(d) => (d.forwarded_client_cert, d.xfcc_format),
        None => (rt.config.forwarded_client_cert, XfccFormat::Raw),
    };
    let peer = conn.tls.as_ref().and_then(|t| t.peer.as_deref());
    headers::apply_xfcc(h, mode, format, peer);
    // The app sees the host the request was routed and authorized by. The request target's
    // authority (h2's `:authority`, an absolute-form URI) wins over a Host header that names
    // another (RFC 9112 §3.2.2; Go's server, so GoRouter, does the same): else a caller allowed
    // on one route of an app could ask that app, by Host, for another of its routes.
    if parts.uri.authority().is_some() || !h.contains_key(HOST) {
        if let Ok(v) = HeaderValue::from_str(raw_host) {
            h.insert(HOST, v);
        }
    }
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    // Logged as the app receives them (with the gateway's trace headers, say).
    done.record
        .take_headers(&rt.config.access_log, &parts.headers);
    let body = Counted::new(body, done.request_body.clone());
    let limit = rt.config.limits.request_body_timeout;
    // A request whose body came with its head (a GET) has nothing to time.
    let body = match limit.is_zero() || body.is_end_stream() {
        true => BodyExt::boxed_unsync(body),
        false => {
            let watch = Arc::new(RequestWatch::default());
            done.request_watch = Some(watch.clone());
            BodyExt::boxed_unsync(RequestStall::new(body, limit, watch))
        }
    };
    let out = Request::from_parts(parts, body);

    // Proxy, retrying connection failures on other endpoints.
    let settings = ConnectSettings {
        tls: rt.backend_tls.as_ref(),
        ktls: state.ktls.as_deref(),
        connect_timeout: rt.config.backends.connect_timeout,
        keep_alive: rt.config.backends.keep_alive_probe_interval,
        idle_timeout: rt.config.backends.idle_timeout,
        max_idle: rt.config.backends.max_idle_per_endpoint,
        h2_streams: rt.config.backends.h2_streams_per_connection,
    };
    if let Some((services, url)) = to_route_service {
        // Boxed: its future (3.9 KB) would otherwise make every request's future that much
        // larger, route service or not, and hyper moves that future into place per request.
        return Box::pin(route_service::send(
            state, rt, &table, services, &url, host, &pq, out, &settings, done,
        ))
        .await;
    }
    let eligible = |e: &Endpoint| {
        in_instance(e)
            && match (scope, identity) {
                (Some(s), Some(id)) => check_scope(s, id, e).is_ok(),
                _ => true,
            }
    };
    let open = |e: &Endpoint| eligible(e) && e.has_room(max_conns);
    if let (None, Some(id)) = (&first, asked.as_deref()) {
        first = selector.prefer(id, open);
    }
    let sent = send_to_endpoints(
        state,
        rt,
        &pool.key,
        (&mut selector, first, open),
        out,
        (raw_host, &pq),
        upgrade,
        &settings,
        done,
        &mut full,
    )
    .await;
    match sent {
        Ok((mut resp, ep, lease)) => {
            let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            if let (true, Some(client_upgrade)) = (switching, client_upgrade) {
                let backend_upgrade = hyper::upgrade::on(&mut resp);
                tokio::spawn(bridge(client_upgrade, backend_upgrade));
                let (mut rparts, _) = resp.into_parts();
                headers::strip_hop_by_hop(&mut rparts.headers, true);
                return Ok(Response::from_parts(rparts, empty()));
            }
            let (mut rparts, rbody) = resp.into_parts();
            headers::strip_hop_by_hop(&mut rparts.headers, false);
            let instance = &ep.private_instance_id;
            sticky::respond(
                &mut rparts.headers,
                asked.as_deref(),
                instance,
                &route_path,
                sessions,
                rt.config.backends.secure_cookies,
            );
            if !upgrade {
                done.lease = Some((lease, settings.max_idle));
            }
            return Ok(Response::from_parts(
                rparts,
                stalling(rbody, rt.config.backends.response_body_timeout),
            ));
        }
        Err(Some(reject)) => return Err(reject),
        Err(None) => {}
    }
    let failed = done.record.failed_attempts;
    if failed == 0
        && max_conns > 0
        && (full
            || pool
                .endpoints
                .iter()
                .any(|e| eligible(e) && !e.has_room(max_conns)))
    {
        return Err(connection_limit(state, host));
    }
    Err(Reject::EndpointFailure)
}

/// A response from an endpoint, the endpoint, and the connection it came on.
type Sent = (Response<Incoming>, Arc<Endpoint>, Lease);

/// Sends `out` to an endpoint of the route `key`: `first` when given, then those `selector`
/// offers that `open` admits, retrying connection failures (nothing sent) on the next, at most
/// `backends.max_attempts` failures in all. `target` is the authority and path the endpoint is asked
/// for. Fails with `None` when no endpoint took the request (`full` says whether one was passed
/// over for `backends.max_conns`; the failures are in the access record), else with the answer.
#[allow(clippy::too_many_arguments)]
async fn send_to_endpoints(
    state: &State,
    rt: &crate::state::Runtime,
    key: &crate::registry::RouteKey,
    (selector, mut first, open): (
        &mut crate::routing::Selector<'_>,
        Option<Arc<Endpoint>>,
        impl Fn(&Endpoint) -> bool,
    ),
    out: Request<ProxyBody>,
    (authority, pq): (&str, &PathAndQuery),
    upgrade: bool,
    settings: &ConnectSettings<'_>,
    done: &mut Completion,
    full: &mut bool,
) -> Result<Sent, Option<Reject>> {
    let max_conns = rt.config.backends.max_conns;
    let cooldown = rt.config.backends.failure_cooldown;
    let mut pending = Some(out);
    let mut failed = 0;
    while failed < rt.config.backends.max_attempts {
        let Some(ep) = first.take().or_else(|| selector.next(&open)) else {
            break;
        };
        // Counted in flight from here (least-connection and max_conns see requests still
        // connecting); one that filled up since it was chosen is passed over.
        if !ep.reserve(max_conns) {
            *full = true;
            continue;
        }
        done.endpoint_active = Some(ep.active.clone());
        done.record.endpoint = Some(ep.clone());
        let leased = if upgrade {
            state.backends().connect_fresh(&ep, settings, true).await
        } else {
            state.backends().checkout(&ep, settings).await
        };
        let mut lease = match leased {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(endpoint = %ep.addr, error = %e, "backend connect failed");
                ep.release();
                done.endpoint_active = None;
                endpoint_failed(&ep, key, &e, cooldown);
                count_backend_error(state, e.kind());
                failed += 1;
                done.record.failed_attempts = failed;
                done.record.attempts.failed_time = Some(done.started.elapsed());
                continue;
            }
        };
        let Some(mut out) = pending.take() else { break };
        // As GoRouter: the app learns which of its instances it is, and a caller cannot say.
        let instance = ep.instance_headers();
        let h = out.headers_mut();
        h.insert(headers::X_CF_APPLICATION_ID, instance.app_id.clone());
        h.insert(headers::X_CF_INSTANCE_INDEX, instance.index.clone());
        h.insert(headers::X_CF_INSTANCE_ID, instance.instance_id.clone());
        let target = if ep.protocol == Protocol::Http2 {
            *out.version_mut() = Version::HTTP_2;
            // The authority travels as `:authority` (from the URI below). A Host header besides
            // it is allowed but redundant, and some servers (nginx 1.22) refuse the request as
            // carrying two hosts.
            out.headers_mut().remove(HOST);
            let scheme = if ep.tls_san.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{authority}{pq}").parse::<Uri>().ok()
        } else {
            *out.version_mut() = Version::HTTP_11;
            // Origin form, whatever form the client used.
            Some(Uri::from(pq.clone()))
        };
        if let Some(u) = target {
            *out.uri_mut() = u;
        }
        // One clock read for the backend time's start and the response-header deadline.
        let sent_at = tokio::time::Instant::now();
        let timeout = rt.config.backends.response_header_timeout;
        let send = send_retrying_stale(
            state,
            &ep,
            settings,
            &mut lease,
            out,
            &mut done.record.resent,
        );
        let send = match sent_at.checked_add(timeout) {
            Some(deadline) => tokio::time::timeout_at(deadline, send),
            None => tokio::time::timeout(timeout, send),
        };
        let result = match send.await {
            Ok(r) => r,
            Err(_) => {
                count_backend_error(state, "timeout");
                return Err(Some(Reject::EndpointTimeout));
            }
        };
        match result {
            Ok(resp) => {
                ep.mark_answered();
                done.record.backend_time = Some(sent_at.elapsed());
                done.record.attempts.local_address = lease.local_addr();
                done.record.attempts.setup = lease.setup.take();
                return Ok((resp, ep, lease));
            }
            Err(failure) => {
                let SendFailure { error: e, request } = *failure;
                ep.release();
                done.endpoint_active = None;
                if done.request_watch.as_ref().is_some_and(|w| w.stalled()) {
                    tracing::debug!(endpoint = %ep.addr, error = %e, "client request body stalled");
                    return Err(Some(Reject::RequestBodyTimeout));
                }
                count_backend_error(state, "send");
                tracing::debug!(endpoint = %ep.addr, error = %e, "backend request failed");
                match request {
                    // Nothing was sent: safe to try another endpoint.
                    Some(r) => {
                        endpoint_failed(&ep, key, &e, cooldown);
                        pending = Some(r);
                        failed += 1;
                        done.record.failed_attempts = failed;
                        done.record.attempts.failed_time = Some(done.started.elapsed());
                    }
                    None => return Err(Some(Reject::EndpointFailure)),
                }
            }
        }
    }
    Err(None)
}

/// An endpoint's response body for the client, cut once it sends nothing for `limit` (zero: no
/// limit).
pub(crate) fn stalling(body: Incoming, limit: Duration) -> ProxyBody {
    let body = body.map_err(BoxError::from);
    match limit.is_zero() {
        true => BodyExt::boxed_unsync(body),
        false => BodyExt::boxed_unsync(Stall::new(body, limit)),
    }
}

/// Counts a failure to get an answer from an endpoint in `portcullis_backend_errors_total`.
fn count_backend_error(state: &State, kind: &'static str) {
    state
        .metrics
        .backend_errors
        .get_or_create(&crate::metrics::ErrorLabels { kind })
        .inc();
}

/// A request none of whose endpoints may take another (`backends.max_conns`), counted (the
/// access log has it with its router error).
fn connection_limit(state: &State, host: &str) -> Reject {
    state.metrics.backend_exhausted_conns.inc();
    Reject::ConnectionLimit(host.to_string())
}

/// The instances a request asks for, as GoRouter reads its headers: `X-CF-App-Instance:
/// <app guid>:<index>` or, without it, `X-CF-Process-Instance: <process guid>[:<index>]`, each
/// guid in lowercase hex; a header of another shape is refused.
fn requested_instance(headers: &http::HeaderMap) -> Result<Option<Wanted>, Reject> {
    fn guid(s: &str) -> bool {
        let groups: Vec<&str> = s.split('-').collect();
        groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
            && groups
                .iter()
                .all(|g| g.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    }
    fn index(s: &str) -> bool {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
    }
    if let Some(value) = headers.get(headers::X_CF_APP_INSTANCE) {
        let parsed = value.to_str().ok().and_then(|v| {
            let (app, i) = v.split_once(':')?;
            (guid(app) && index(i)).then(|| Wanted::App {
                app: app.to_string(),
                index: i.to_string(),
            })
        });
        return parsed
            .map(Some)
            .ok_or(Reject::InvalidInstanceHeader(InstanceHeader::App));
    }
    let Some(value) = headers.get(headers::X_CF_PROCESS_INSTANCE) else {
        return Ok(None);
    };
    let parsed = value.to_str().ok().and_then(|v| {
        let (process, i) = match v.split_once(':') {
            Some((p, i)) => (p, Some(i)),
            None => (v, None),
        };
        (guid(process) && i.is_none_or(index)).then(|| Wanted::Process {
            process: process.to_string(),
            index: i.map(str::to_string),
        })
    });
    parsed
        .map(Some)
        .ok_or(Reject::InvalidInstanceHeader(InstanceHeader::Process))
}

/// Puts an endpoint whose connection failed behind the others for `cooldown`, saying so when it
/// starts (at most once per cooldown and endpoint).
fn endpoint_failed(
    ep: &Endpoint,
    route: &crate::registry::RouteKey,
    error: &dyn std::fmt::Display,
    cooldown: Duration,
) {
    if ep.mark_failed(cooldown) {
        tracing::warn!(
            endpoint = %ep.addr,
            %route,
            %error,
            ?cooldown,
            "backend endpoint failed; it comes after the route's other endpoints until the \
             cooldown ends (backends.failure_cooldown)"
        );
    }
}

/// How long a pooled HTTP/1.1 connection must have been idle before a replayable request sent
/// on it is kept, to be sent again should the backend close the connection without answering.
/// A backend closes a keep-alive connection once it has been idle for its own timeout
/// (gunicorn 2 s, Node.js and uvicorn 5 s, nginx 75 s), and a request sent as it does so is
/// lost with the connection; a connection reused sooner than this is not one a backend's idle
/// timer closes, and a busy gateway's requests pay nothing for the copy.
const REPLAY_AFTER_IDLE: Duration = Duration::from_millis(100);

/// Whether `req` may be sent twice: an idempotent method (GET, HEAD, OPTIONS, TRACE) or an
/// `Idempotency-Key`, as Go's transport (so GoRouter) replays a request a reused connection lost.
fn idempotent(req: &Request<ProxyBody>) -> bool {
    use http::Method;
    const IDEMPOTENCY_KEYS: [&str; 2] = ["idempotency-key", "x-idempotency-key"];
    matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    ) || IDEMPOTENCY_KEYS
        .iter()
        .any(|k| req.headers().contains_key(*k))
}

/// What it takes to send a request again: its head, and its body kept as it is sent.
struct Again {
    method: http::Method,
    uri: Uri,
    version: Version,
    headers: http::HeaderMap,
    /// `None`: the request has no body.
    body: Option<Keeper>,
}

impl Again {
    /// Keeps what it takes to send `req` again; `req`'s body, if it has one, is then a [`Kept`].
    fn keep(req: &mut Request<ProxyBody>) -> Again {
        let body = match req.body().is_end_stream() {
            true => None,
            false => {
                let (kept, keeper) = Kept::new(std::mem::replace(req.body_mut(), empty()));
                *req.body_mut() = kept.boxed_unsync();
                Some(keeper)
            }
        };
        Again {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            body,
        }
    }

    /// The request once more, if all of its body that was sent was kept.
    fn request(&self) -> Option<Request<ProxyBody>> {
        let body = match &self.body {
            None => empty(),
            Some(keeper) => keeper.again()?.boxed_unsync(),
        };
        let mut copy = Request::new(body);
        *copy.method_mut() = self.method.clone();
        *copy.uri_mut() = self.uri.clone();
        *copy.version_mut() = self.version;
        *copy.headers_mut() = self.headers.clone();
        Some(copy)
    }

    /// The request was answered: its body need not be kept any longer.
    fn release(&self) {
        if let Some(keeper) = &self.body {
            keeper.release();
        }
    }
}

/// Whether a send failed because the connection ended (closed or reset) before an answer came.
fn connection_ended(e: &hyper::Error) -> bool {
    e.is_incomplete_message()
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| {
                early::closed_by_peer(io) || io.kind() == std::io::ErrorKind::UnexpectedEof
            })
}

/// Why an h2 backend did not process the request's stream, if it said so, so that it may be
/// sent again whatever its method (RFC 9113 §8.7), as a metric's label: `refused_stream`
/// (`RST_STREAM` with `REFUSED_STREAM`), or `go_away` (its `GOAWAY` named a last stream below
/// this one: a server shutting down, or one that ends its connections after so many requests;
/// or it had sent one before the stream was opened). The `h2` crate gives a `GOAWAY`'s error
/// only to those streams; the ones it leaves to finish and that the closing connection then
/// cuts get an I/O error. Go's transport (so GoRouter) sends a request again in the same cases.
fn not_processed(e: &hyper::Error) -> Option<&'static str> {
    let h = std::error::Error::source(e)?.downcast_ref::<h2::Error>()?;
    match h.is_remote() {
        true if h.is_go_away() => Some("go_away"),
        true if h.reason() == Some(h2::Reason::REFUSED_STREAM) => Some("refused_stream"),
        _ => None,
    }
}

/// Sends on `lease`, and once more on a new connection to the same endpoint (a stale pool entry
/// or a backend's refusal is not a failed endpoint) when:
/// - a pooled connection turned out closed before anything was sent;
/// - a pooled HTTP/1.1 connection idle for [`REPLAY_AFTER_IDLE`] ended without answering an
///   [`idempotent`] request: the backend's keep-alive timer closed it as the request went out;
/// - an h2 backend did not process the request's stream ([`not_processed`]: an app at its
///   stream limit, or shutting down).
///
/// A body goes again as it was sent, from a copy kept until the answer comes (up to
/// [`KEPT_BODY_LIMIT`](body::KEPT_BODY_LIMIT) bytes; a larger one is not sent again), and on
/// from where the client is. Each resend is counted in `portcullis_backend_resends_total{reason}`
/// and its reason put in `resent` (the access log's field). Should that connect fail, the
/// request is handed back to be tried elsewhere.
async fn send_retrying_stale(
    state: &State,
    ep: &Arc<Endpoint>,
    settings: &ConnectSettings<'_>,
    lease: &mut Lease,
    mut req: Request<ProxyBody>,
    resent: &mut &'static str,
) -> Result<Response<Incoming>, Box<SendFailure>> {
    let h2 = lease.is_h2();
    let again = match lease.idle {
        _ if h2 => Some(Again::keep(&mut req)),
        Some(idle) if idle >= REPLAY_AFTER_IDLE && idempotent(&req) => Some(Again::keep(&mut req)),
        _ => None,
    };
    let result = match lease.send(req).await {
        Err(mut f) => {
            let pooled = lease.idle.is_some();
            let reason = match (&f.request, h2) {
                (Some(_), _) if pooled => Some("stale_connection"),
                (None, true) => not_processed(&f.error),
                (None, false) if pooled && connection_ended(&f.error) => {
                    Some("idle_connection_closed")
                }
                _ => None,
            };
            let req = match reason {
                Some("stale_connection") => f.request.take(),
                Some(_) => again.as_ref().and_then(Again::request),
                None => None,
            };
            let (Some(req), Some(reason)) = (req, reason) else {
                return Err(f);
            };
            tracing::debug!(endpoint = %ep.addr, error = %f.error, reason, "sending a request again on a new connection to its endpoint");
            *resent = reason;
            state
                .metrics
                .backend_resends
                .get_or_create(&crate::metrics::ReasonLabels { reason })
                .inc();
            match state.backends().connect_fresh(ep, settings, false).await {
                Ok(mut fresh) => {
                    let r = fresh.send(req).await;
                    *lease = fresh;
                    r
                }
                Err(_) => {
                    f.request = Some(req);
                    Err(f)
                }
            }
        }
        answered => answered,
    };
    if let (Ok(_), Some(again)) = (&result, &again) {
        again.release();
    }
    result
}

async fn bridge(client: hyper::upgrade::OnUpgrade, backend: hyper::upgrade::OnUpgrade) {
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut backend = hyper_util::rt::TokioIo::new(backend);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
}
