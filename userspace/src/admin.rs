//! The admin API (SPEC §12): `/health`, `/metrics`, `/routes`, `/routes/{host}/policy`, and
//! `/xdp/denials` (`GET` lists the gate's denials, `DELETE` lifts a source's). With
//! `admin.token_file`, every request but `GET /health` must carry the token.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{bearer_access, Access};
use crate::gateway::Repeats;
use crate::proxy::body::{full, ProxyBody};
use crate::proxy::ConnCtx;
use crate::state::State;

#[derive(Serialize)]
struct RouteView<'a> {
    route: String,
    options: &'a BTreeMap<String, String>,
    /// How the gateway balances the route, as it reads the options (an option it could not use
    /// is left out) and `backends.balancing_algorithm`: `round-robin`, `least-connection` or
    /// `hash`.
    load_balancing: &'static str,
    /// Under `hash`: the header that keys it and the balance limit (0: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    hash_header: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hash_balance: Option<f64>,
    /// The route service the route is bound to: its requests go through it (with
    /// `route_services` configured; otherwise they are answered 502).
    #[serde(skip_serializing_if = "Option::is_none")]
    route_service_url: Option<&'a str>,
    endpoints: Vec<EndpointView<'a>>,
}

#[derive(Serialize)]
struct EndpointView<'a> {
    address: &'a str,
    tls_san: Option<&'a str>,
    protocol: &'static str,
    tags: &'a BTreeMap<String, String>,
    private_instance_id: &'a str,
    private_instance_index: &'a str,
    /// The registration's zone (`backends.az_preference` prefers the gateway's own).
    #[serde(skip_serializing_if = "str::is_empty")]
    availability_zone: &'a str,
    static_route: bool,
    /// Requests being sent to or answered by this endpoint now (least-connection's count).
    in_flight: usize,
    /// Milliseconds this endpoint still comes after the others, after a failed connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_cooldown_ms: Option<u64>,
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json<T: Serialize>(v: &T) -> Response<ProxyBody> {
    match serde_json::to_string_pretty(v) {
        Ok(s) => respond(StatusCode::OK, "application/json", s),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

fn routes(state: &State) -> Response<ProxyBody> {
    let table = state.registry.table();
    let default = state.runtime.load().config.backends.balancing;
    let views: Vec<RouteView<'_>> = table
        .pools()
        .into_iter()
        .map(|p| RouteView {
            route: p.key.to_string(),
            options: &p.options,
            load_balancing: match &p.hash {
                Some(_) => "hash",
                None => p.load_balancing.unwrap_or(default).name(),
            },
            hash_header: p.hash.as_ref().map(|h| h.header.as_str()),
            hash_balance: p.hash.as_ref().map(|h| h.balance),
            route_service_url: p.route_service.as_deref(),
            endpoints: p
                .endpoints
                .iter()
                .map(|e| EndpointView {
                    address: &e.addr,
                    tls_san: e.tls_san.as_deref(),
                    protocol: match e.protocol {
                        crate::registry::Protocol::Http1 => "http1",
                        crate::registry::Protocol::Http2 => "http2",
                    },
                    tags: &e.tags,
                    private_instance_id: &e.private_instance_id,
                    private_instance_index: &e.private_instance_index,
                    availability_zone: &e.availability_zone,
                    static_route: e.permanent,
                    in_flight: e.active.load(Ordering::Relaxed),
                    failure_cooldown_ms: e.cooldown_left().map(|d| d.as_millis() as u64),
                })
                .collect(),
        })
        .collect();
    json(&views)
}

/// Why the route registry cannot serve yet (or any more), for `/health`.
fn registry_unready(state: &State) -> Option<String> {
    let Some(&loaded) = state.registry_loaded.get() else {
        return Some("registry: not connected to NATS yet\n".into());
    };
    if !state
        .registry_connected
        .load(std::sync::atomic::Ordering::Relaxed)
        && !state
            .runtime
            .load()
            .config
            .registry
            .healthy_while_disconnected
    {
        return Some("registry: disconnected from NATS\n".into());
    }
    let left = loaded.saturating_duration_since(std::time::Instant::now());
    (!left.is_zero()).then(|| {
        format!(
            "registry: loading routes (registry.start_delay), {:.1} s to go\n",
            left.as_secs_f64()
        )
    })
}

/// Largest caller-certificate PEM accepted by `POST /routes/{host}/policy`.
const MAX_CALLER_PEM: usize = 64 * 1024;

fn route<B>(state: &State, req: &Request<B>, caller_pem: Option<&[u8]>) -> Response<ProxyBody> {
    let path = req.uri().path();
    match path {
        "/health" => {
            if state.draining.is_on() {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "draining: stopping soon\n".into(),
                )
            } else if let Some(stalled) = state.liveness.health() {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", stalled)
            } else if let Some(why) = registry_unready(state) {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why)
            } else {
                respond(StatusCode::OK, "text/plain", "ok\n".into())
            }
        }
        "/metrics" => {
            if let Some(x) = &state.xdp {
                x.export(&state.metrics);
            }
            respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                state.metrics.encode(),
            )
        }
        "/routes" => routes(state),
        "/log-level" => match crate::logfilter::control() {
            Some(c) => respond(StatusCode::OK, "text/plain", format!("{}\n", c.current())),
            None => no_log_control(),
        },
        "/xdp/denials" => json(&state.xdp.as_ref().map(|x| x.denials()).unwrap_or_default()),
        _ => {
            let Some(host) = path
                .strip_prefix("/routes/")
                .and_then(|rest| rest.strip_suffix("/policy"))
            else {
                return respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
            };
            let rt = state.runtime.load();
            let table = state.registry.table();
            let route_path = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("path=")))
                .unwrap_or("");
            let chain = match caller_pem.map(crate::config::parse_certs) {
                None => None,
                Some(Ok(c)) => Some(c),
                Some(Err(e)) => {
                    return respond(
                        StatusCode::BAD_REQUEST,
                        "text/plain",
                        format!("caller certificate: {e}\n"),
                    )
                }
            };
            match crate::explain::explain(&rt.config, &table, host, route_path, chain.as_deref()) {
                Ok(e) => json(&e),
                Err(e) => respond(StatusCode::NOT_FOUND, "text/plain", format!("{e}\n")),
            }
        }
    }
}

/// `DELETE /xdp/denials?source=<address>[&domain=<pattern>]`: lifts that source's denials (on
/// one domain, or on all), answering with those lifted.
fn lift(state: &State, query: &str) -> Response<ProxyBody> {
    let Some(xdp) = &state.xdp else {
        return respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "the XDP gate is not running\n".into(),
        );
    };
    let (mut source, mut domain) = (None, None);
    // Percent-decoded: `*` in a pattern may arrive as `%2A`, `:` in an IPv6 address as `%3A`.
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "source" => source = Some(v.into_owned()),
            "domain" => domain = Some(v.into_owned()),
            _ => {
                return respond(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    format!("unknown parameter '{k}' (source, domain)\n"),
                )
            }
        }
    }
    let source = match source.as_deref().map(str::parse::<std::net::IpAddr>) {
        Some(Ok(ip)) => ip,
        Some(Err(_)) | None => {
            return respond(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "source=<IPv4 or IPv6 address> is required\n".into(),
            )
        }
    };
    if let Some(d) = domain.as_deref().filter(|d| !xdp.has_domain(d)) {
        return respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no configured domain '{d}'\n"),
        );
    }
    match xdp.lift(source, domain.as_deref(), &state.metrics) {
        Ok(lifted) => json(&lifted),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    }
}

fn no_log_control() -> Response<ProxyBody> {
    respond(
        StatusCode::NOT_IMPLEMENTED,
        "text/plain",
        "this process's log filter cannot be changed\n".into(),
    )
}

/// `PUT /log-level`: the body (`debug`, `info,portcullis::proxy=debug`, PORTCULLIS_LOG's syntax)
/// becomes the operational log's filter at once, until the next change or a restart.
async fn set_log_filter(body: Incoming, peer: std::net::SocketAddr) -> Response<ProxyBody> {
    let Some(control) = crate::logfilter::control() else {
        return no_log_control();
    };
    let limited = http_body_util::Limited::new(body, crate::logfilter::MAX_SPEC);
    let spec = match http_body_util::BodyExt::collect(limited).await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return respond(
                StatusCode::PAYLOAD_TOO_LARGE,
                "text/plain",
                format!("{e}\n"),
            )
        }
    };
    let Some(spec) = std::str::from_utf8(&spec)
        .ok()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    else {
        return respond(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "send a log filter as the body, e.g. `debug` or `info,portcullis::proxy=debug`\n"
                .into(),
        );
    };
    let before = control.current();
    let refused = |e: String| {
        respond(
            StatusCode::BAD_REQUEST,
            "text/plain",
            format!("{spec:?} is not a log filter ({e}); still {before}\n"),
        )
    };
    let to = match control.check(spec) {
        Ok(to) => to,
        Err(e) => return refused(e),
    };
    // The change is said once, under whichever filter lets it through: the old one when it
    // does (so that a filter that silences warnings is itself on record), else the new one.
    let said = |to: &str| tracing::warn!(client = %peer, from = %before, to = %to, "log filter changed through the admin API");
    let said_before = tracing::enabled!(tracing::Level::WARN);
    if said_before {
        said(&to);
    }
    match control.set(spec) {
        Ok(()) => {
            let now = control.current();
            if !said_before {
                said(&now);
            }
            respond(StatusCode::OK, "text/plain", format!("{now}\n"))
        }
        Err(e) => refused(e),
    }
}

/// With `admin.token_file`, the answer to a request without the token (`None`: let it through).
/// `GET /health` is always let through, for load balancers' health checks.
fn refuse<B>(
    state: &State,
    req: &Request<B>,
    peer: std::net::SocketAddr,
) -> Option<Response<ProxyBody>> {
    if req.method() == Method::GET && req.uri().path() == "/health" {
        return None;
    }
    let rt = state.runtime.load();
    let token = rt.config.admin.as_ref()?.token.as_ref()?;
    let (challenge, why) = match bearer_access(
        token,
        req.headers().get(AUTHORIZATION).map(|v| v.as_bytes()),
    ) {
        Access::Granted => return None,
        Access::Missing => ("Bearer realm=\"portcullis admin\"", "no bearer token"),
        Access::Wrong => (
            "Bearer realm=\"portcullis admin\", error=\"invalid_token\"",
            "wrong bearer token",
        ),
    };
    state.metrics.admin_refused.inc();
    tracing::warn!(client = %peer, method = %req.method(), path = req.uri().path(), "admin request refused: {why}");
    let mut r = respond(
        StatusCode::UNAUTHORIZED,
        "text/plain",
        format!("{why}: send Authorization: Bearer <the token in admin.token_file>\n"),
    );
    r.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    Some(r)
}

/// Serves the admin API until shutdown. At most `admin.max_connections` connections are open at
/// once: one more is closed as soon as it is accepted, and said (once every 10 s while it lasts),
/// so a stuck or hostile client cannot take the file descriptors the data plane counts on.
pub async fn serve(state: Arc<State>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut over = Repeats::new(Duration::from_secs(10));
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let peer = std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port());
        // The settings of the config in force when the connection arrives (a reload changes the
        // certificate and the limit for the next one; one that drops the admin section keeps
        // the listener, which needs a restart, with the default limit).
        let runtime = state.runtime.load_full();
        let limit = runtime
            .config
            .admin
            .as_ref()
            .map_or(crate::config::DEFAULT_ADMIN_MAX_CONNECTIONS, |a| {
                a.max_connections
            });
        if open.load(Ordering::Relaxed) >= limit {
            state.metrics.admin_connections_refused.inc();
            if let Some(refused) = over.note(Instant::now()) {
                tracing::warn!(
                    client = %peer,
                    admin.max_connections = limit,
                    refused,
                    "admin connection closed: admin.max_connections are open \
                     (counted in portcullis_admin_connections_refused_total)"
                );
            }
            drop(tcp);
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let (state, open, shutdown) = (state.clone(), open.clone(), shutdown.clone());
        tokio::spawn(async move {
            match &runtime.admin_tls {
                None => serve_connection(state, tcp, peer, shutdown).await,
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                    let limit = runtime.config.tls.handshake_timeout;
                    match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_connection(state, stream, peer, shutdown).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "admin TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "admin TLS handshake timed out"),
                    }
                }
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Counts an admin request as in flight on its connection until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn begin(conn: &ConnCtx) -> InFlight {
        conn.requests.fetch_add(1, Ordering::Relaxed);
        conn.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(conn.inflight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves admin requests (HTTP/1.1 or h2) on one connection, over TCP or TLS, with the data
/// plane's `limits`: header size and read timeout, h2 streams, and `limits.idle_timeout`, past
/// which a connection without a request is closed. At shutdown it is closed once its request is
/// answered.
async fn serve_connection<I>(
    state: Arc<State>,
    io: I,
    peer: std::net::SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = state.runtime.load().config.limits.clone();
    let conn = Arc::new(ConnCtx::new(peer, None));
    let svc = service_fn({
        let (state, conn) = (state.clone(), conn.clone());
        move |req: Request<Incoming>| {
            let state = state.clone();
            let in_flight = InFlight::begin(&conn);
            async move {
                let _in_flight = in_flight;
                let resp = if let Some(refused) = refuse(&state, &req, peer) {
                    refused
                } else if req.method() == Method::GET {
                    route(&state, &req, None)
                } else if req.method() == Method::POST && req.uri().path().ends_with("/policy") {
                    let (parts, body) = req.into_parts();
                    let limited = http_body_util::Limited::new(body, MAX_CALLER_PEM);
                    match http_body_util::BodyExt::collect(limited).await {
                        Ok(b) => {
                            route(&state, &Request::from_parts(parts, ()), Some(&b.to_bytes()))
                        }
                        Err(e) => respond(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "text/plain",
                            format!("{e}\n"),
                        ),
                    }
                } else if req.method() == Method::DELETE && req.uri().path() == "/xdp/denials" {
                    lift(&state, req.uri().query().unwrap_or(""))
                } else if req.method() == Method::PUT && req.uri().path() == "/log-level" {
                    set_log_filter(req.into_body(), peer).await
                } else {
                    let allowed = "GET, POST a caller certificate to /routes/{host}/policy, \
                               DELETE /xdp/denials?source=<address>, or PUT a filter to /log-level\n";
                    respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", allowed.into())
                };
                Ok::<_, std::convert::Infallible>(resp)
            }
        }
    });
    let builder = crate::gateway::builder(&limits);
    let serving = builder.serve_connection(TokioIo::new(io), svc);
    let graceful = |s: Pin<&mut auto::Connection<_, _, _>>| s.graceful_shutdown();
    let ends = crate::gateway::Ends::Neither;
    crate::gateway::drive(serving, graceful, &conn, &limits, &mut shutdown, ends).await;
}
