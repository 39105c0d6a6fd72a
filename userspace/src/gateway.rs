//! Wiring: listeners, per-connection limits and timeouts, reload and shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::accesslog::{AccessLogError, AccessLogger};
use crate::config::{Config, Limits};
use crate::metrics::{KtlsLabels, Metrics};
use crate::names::DomainPattern;
use crate::proxy::{self, BackendPool, ConnCtx};
use crate::registry::Registry;
use crate::state::{Runtime, State};
use crate::tls::{self, TlsBuildError};

/// Why the gateway could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsBuildError),
    #[error(transparent)]
    AccessLog(#[from] AccessLogError),
    #[error(transparent)]
    Nats(#[from] crate::registry::nats::NatsError),
    #[error("{0} cannot change on reload; restart to apply it")]
    NeedsRestart(&'static str),
    #[error("{0}")]
    KernelTls(String),
    #[error("cannot start worker threads: {0}")]
    Workers(std::io::Error),
}

/// A running gateway.
pub struct Gateway {
    state: Arc<State>,
    https: SocketAddr,
    http: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    connections: Arc<AtomicUsize>,
    /// Dropped (with the gateway) to end the worker threads' event loops.
    stop_workers: watch::Sender<()>,
}

/// TCP_DEFER_ACCEPT on the TLS listener: a connection reaches `accept` only once its first data
/// (the ClientHello) has arrived. A caller the XDP gate rejects at the ClientHello is then torn
/// down inside the kernel and never costs the daemon an accept, a task or a wakeup. A client that
/// stays silent is still handed over after about a second and meets the handshake deadline.
fn defer_accept(listener: &TcpListener) {
    use std::os::fd::AsRawFd;
    let seconds: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a valid c_int buffer and its length.
    let r = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&seconds as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot set TCP_DEFER_ACCEPT");
    }
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { key, addr, source })
}

impl Gateway {
    /// Binds every listener and starts serving. Returns once all listeners accept connections.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        let metrics = Arc::new(Metrics::new());
        let log = AccessLogger::start(
            config.access_log.path.clone(),
            config.access_log.extra_fields.clone(),
            metrics.clone(),
        )?;
        let registry = Registry::new(metrics.clone());
        registry.replace_static(&config.routes, config.registry.droplet_stale_threshold);
        count_malformed(&metrics, &config);
        let https_l = bind("listen.https", config.listen.https).await?;
        defer_accept(&https_l);
        let http_l = match config.listen.http {
            Some(a) => Some(bind("listen.http", a).await?),
            None => None,
        };
        let admin_l = match config.admin {
            Some(a) => Some(bind("admin.listen", a).await?),
            None => None,
        };
        let ktls = tls::probe_kernel_tls(config.tls.ktls)
            .await
            .map_err(StartError::KernelTls)?;
        let xdp = match crate::xdp::XdpRuntime::start(&config, &registry.table(), &metrics) {
            Ok(x) => x,
            Err(e) => {
                for iface in &config.xdp.interfaces {
                    metrics
                        .xdp_attached
                        .get_or_create(&crate::metrics::XdpAttachLabels {
                            interface: iface.clone(),
                            mode: "none",
                        })
                        .set(0);
                }
                tracing::warn!(error = %e, "XDP gate unavailable; the daemon still checks every connection");
                None
            }
        };
        let limits = config.limits.clone();
        let workers = limits.worker_threads();
        let has_nats = config.nats.is_some();
        let state = Arc::new(State {
            runtime: ArcSwap::from_pointee(Runtime::build(config)?),
            registry,
            metrics,
            log,
            backends: (0..workers).map(|_| BackendPool::default()).collect(),
            registry_connected: AtomicBool::new(!has_nats),
            xdp,
            ktls,
        });

        if let Err(e) = crate::registry::nats::start(state.clone()).await {
            return Err(StartError::Nats(e));
        }
        let (shutdown, _) = watch::channel(false);
        let (stop_workers, _) = watch::channel(());
        let connections = Arc::new(AtomicUsize::new(0));
        let gw = Gateway {
            https: https_l.local_addr().map_err(|source| StartError::Bind {
                key: "listen.https",
                addr: state.runtime.load().config.listen.https,
                source,
            })?,
            http: http_l.as_ref().and_then(|l| l.local_addr().ok()),
            admin: admin_l.as_ref().and_then(|l| l.local_addr().ok()),
            state: state.clone(),
            shutdown,
            connections,
            stop_workers,
        };
        if gw.state.xdp.is_some() {
            let s = gw.state.clone();
            let mut stop = gw.shutdown.subscribe();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            if let Some(x) = &s.xdp {
                                x.sweep(&s.metrics);
                                let config = &s.runtime.load().config;
                                if let Err(e) = x.follow_registry(&s.registry.table(), config) {
                                    tracing::error!(error = %e, "XDP allow-lists not updated from the registry");
                                }
                            }
                        }
                        _ = stop.changed() => return,
                    }
                }
            });
        }
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let listeners = [Some((https_l, true)), http_l.map(|l| (l, false))];
        let listeners: Vec<(std::net::TcpListener, bool)> = listeners
            .into_iter()
            .flatten()
            .map(|(l, tls)| Ok((l.into_std()?, tls)))
            .collect::<std::io::Result<_>>()
            .map_err(StartError::Workers)?;
        for index in 0..workers {
            gw.spawn_worker(index, &listeners, &slots)?;
        }
        if let Some(l) = admin_l {
            tokio::spawn(crate::admin::serve(
                state.clone(),
                l,
                gw.shutdown.subscribe(),
            ));
        }
        tracing::info!(https = %gw.https, http = ?gw.http, admin = ?gw.admin, "portcullis is serving");
        Ok(gw)
    }

    /// Starts worker thread `index`: a single-threaded event loop that accepts from every listener
    /// (the same sockets in each worker: an idle worker wakes first and takes the connection) and
    /// serves what it accepted to the end. A connection, its tasks and its backend connections
    /// stay on one thread, so a request costs no cross-thread wake-ups.
    fn spawn_worker(
        &self,
        index: usize,
        listeners: &[(std::net::TcpListener, bool)],
        slots: &Arc<Semaphore>,
    ) -> Result<(), StartError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StartError::Workers)?;
        let mut mine = Vec::with_capacity(listeners.len());
        for (l, tls) in listeners {
            mine.push((
                l.try_clone().map_err(StartError::Workers)?,
                *tls,
                self.clone_parts(),
            ));
        }
        let slots = slots.clone();
        let mut stop = self.stop_workers.subscribe();
        std::thread::Builder::new()
            .name(format!("portcullis-w{index}"))
            .spawn(move || {
                crate::state::set_worker(index);
                rt.block_on(async move {
                    for (l, tls, parts) in mine {
                        match TcpListener::from_std(l) {
                            Ok(l) => {
                                tokio::spawn(accept_loop(parts, l, slots.clone(), tls));
                            }
                            Err(e) => {
                                tracing::error!(worker = index, error = %e, "worker cannot accept")
                            }
                        }
                    }
                    // Until the gateway is shut down (after draining) or dropped.
                    let _ = stop.changed().await;
                });
            })
            .map_err(StartError::Workers)?;
        Ok(())
    }

    fn clone_parts(&self) -> Parts {
        Parts {
            state: self.state.clone(),
            shutdown: self.shutdown.subscribe(),
            connections: self.connections.clone(),
        }
    }

    pub fn https_addr(&self) -> SocketAddr {
        self.https
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Applies a new config: certificates, domains, policies and static routes change for the
    /// next connection or request; established connections keep running. Listener addresses and
    /// limits need a restart.
    pub fn reload(&self, config: Config) -> Result<(), StartError> {
        let current = self.state.runtime.load();
        let old = &current.config;
        if old.listen.https != config.listen.https || old.listen.http != config.listen.http {
            return Err(StartError::NeedsRestart("listen"));
        }
        if old.admin != config.admin {
            return Err(StartError::NeedsRestart("admin.listen"));
        }
        if old.nats.as_ref().map(|n| &n.servers) != config.nats.as_ref().map(|n| &n.servers) {
            return Err(StartError::NeedsRestart("nats"));
        }
        if old.limits.workers != config.limits.workers {
            return Err(StartError::NeedsRestart("limits.workers"));
        }
        let runtime = Runtime::build(config)?;
        let cfg = &runtime.config;
        if let Some(x) = &self.state.xdp {
            if let Err(e) = x.sync(cfg) {
                tracing::error!(error = %e, "XDP maps not updated");
            }
        }
        self.state
            .registry
            .replace_static(&cfg.routes, cfg.registry.droplet_stale_threshold);
        count_malformed(&self.state.metrics, cfg);
        self.state.runtime.store(Arc::new(runtime));
        self.state.log.reopen();
        tracing::info!("configuration reloaded");
        Ok(())
    }

    /// Stops accepting, lets open connections finish their requests for up to `drain`.
    pub async fn shutdown(self, drain: Duration) {
        let _ = self.shutdown.send(true);
        if let Some(x) = &self.state.xdp {
            if self.state.runtime.load().config.xdp.detach_on_exit {
                x.detach();
            }
        }
        let deadline = Instant::now() + drain;
        while self.connections.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.state.log.flush(Duration::from_secs(2)).await;
    }
}

fn count_malformed(metrics: &Metrics, config: &Config) {
    let n: usize = config.routes.iter().map(|r| r.policy.malformed.len()).sum();
    metrics.route_policy_malformed_sources.inc_by(n as u64);
}

struct Parts {
    state: Arc<State>,
    shutdown: watch::Receiver<bool>,
    connections: Arc<AtomicUsize>,
}

async fn accept_loop(mut p: Parts, listener: TcpListener, slots: Arc<Semaphore>, tls: bool) {
    loop {
        let (tcp, client) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = p.shutdown.changed() => return,
        };
        // At the limit, this listener stops accepting until a slot frees up; a permit is only
        // ever held for a real connection (listeners share the slots).
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = p.shutdown.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let state = p.state.clone();
        let shutdown = p.shutdown.clone();
        let connections = p.connections.clone();
        connections.fetch_add(1, Ordering::Relaxed);
        state.metrics.connections_active.inc();
        tokio::spawn(async move {
            if tls {
                serve_tls(state.clone(), tcp, client, shutdown).await;
            } else {
                let conn = ConnCtx {
                    client,
                    tls: None,
                    ktls: false,
                    inflight: Arc::default(),
                    requests: Default::default(),
                };
                serve_http(state.clone(), tcp, conn, shutdown).await;
            }
            state.metrics.connections_active.dec();
            connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

async fn serve_tls(
    state: Arc<State>,
    tcp: TcpStream,
    client: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let rt = state.runtime.load_full();
    let deadline = rt.config.tls.handshake_timeout;
    let Some(kernel) = state.ktls.clone() else {
        let accepted = tls::accept(tcp, &rt.tls, deadline).await;
        drop(rt);
        if let Some((stream, conn)) = handshake_done(&state, accepted, client, "userspace") {
            serve_http(state, stream, conn, shutdown).await;
        }
        return;
    };
    // Accepted on a CorkStream so rustls stops reading at a record boundary, where the kernel
    // takes over.
    let accepted = tls::accept(ktls::CorkStream::new(tcp), &rt.tls, deadline).await;
    drop(rt);
    let suite = accepted
        .as_ref()
        .ok()
        .and_then(|a| a.stream.get_ref().1.negotiated_cipher_suite());
    if !kernel.supports(suite) {
        if let Some((stream, conn)) = handshake_done(&state, accepted, client, "userspace") {
            serve_http(state, stream, conn, shutdown).await;
        }
        return;
    }
    let Some((stream, mut conn)) = handshake_done(&state, accepted, client, "kernel") else {
        return;
    };
    match tls::kstream::handoff(stream).await {
        Ok(stream) => {
            conn.ktls = true;
            serve_http(state, stream, conn, shutdown).await;
        }
        // The probe found the suite supported, so this is rare (a socket error mid-switch); the
        // rustls state is consumed by then, so the connection ends.
        Err(e) => tracing::warn!(%client, error = %e, "cannot move the connection into kernel TLS"),
    }
}

/// Counts a finished handshake (feeding deny learning on certificate failures); on success,
/// returns the stream and the connection's context.
fn handshake_done<IO>(
    state: &State,
    accepted: Result<tls::Accepted<IO>, (Option<DomainPattern>, tls::HandshakeFailure)>,
    client: SocketAddr,
    mode: &'static str,
) -> Option<(tokio_rustls::server::TlsStream<IO>, ConnCtx)> {
    match accepted {
        Err((pattern, failure)) => {
            state
                .metrics
                .count_handshake(pattern.as_ref(), failure.label());
            // Certificate failures on an mTLS domain feed deny learning.
            if let (true, Some(p), Some(x)) =
                (failure.is_certificate_failure(), &pattern, &state.xdp)
            {
                x.failure(p, client.ip(), &state.metrics);
            }
            tracing::debug!(%client, domain = ?pattern.map(|p| p.to_string()), error = %failure, "handshake failed");
            None
        }
        Ok(accepted) => {
            state
                .metrics
                .count_handshake(accepted.info.mtls.as_ref(), "ok");
            state
                .metrics
                .ktls_connections
                .get_or_create(&KtlsLabels { mode })
                .inc();
            let conn = ConnCtx {
                client,
                tls: Some(accepted.info),
                ktls: false,
                inflight: Arc::default(),
                requests: Default::default(),
            };
            Some((accepted.stream, conn))
        }
    }
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

async fn serve_http<S>(state: Arc<State>, io: S, conn: ConnCtx, mut shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let limits = state.runtime.load().config.limits.clone();
    let conn = Arc::new(conn);
    let inflight = conn.inflight.clone();
    let svc_state = state.clone();
    let svc_conn = conn.clone();
    // Boxed: the request future is large, and hyper moves it into every h2 stream task it spawns.
    let service =
        service_fn(move |req| Box::pin(proxy::handle(svc_state.clone(), svc_conn.clone(), req)));
    let builder = builder(&limits);
    let serving = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(serving);
    let idle = limits.idle_timeout;
    let mut idle_since = Instant::now();
    let mut seen = 0;
    let mut closing = false;
    loop {
        let tick = idle
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(100));
        tokio::select! {
            res = serving.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(client = %conn.client, error = %e, "connection ended with error");
                }
                return;
            }
            _ = tokio::time::sleep(tick) => {
                let started = conn.requests.load(Ordering::Relaxed);
                if inflight.load(Ordering::Relaxed) > 0 || started != seen {
                    seen = started;
                    idle_since = Instant::now();
                } else if !closing && idle_since.elapsed() >= idle {
                    closing = true;
                    serving.as_mut().graceful_shutdown();
                }
            }
            _ = shutdown.changed(), if !closing => {
                closing = true;
                serving.as_mut().graceful_shutdown();
            }
        }
    }
}
