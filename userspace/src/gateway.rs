//! Wiring: listeners, per-connection limits and timeouts, reload and shutdown.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::accesslog::{AccessLogError, AccessLogger, Destination};
use crate::config::{Config, Limits};
use crate::cork::{Cork, Corked};
use crate::metrics::{KindLabels, KtlsLabels, Metrics, OutcomeLabels, ProxyHeaderLabels};
use crate::names::DomainPattern;
use crate::park::{ParkIo, Parking};
use crate::proxy::{self, BackendPool, ConnCtx};
use crate::proxy_protocol;
use crate::registry::Registry;
use crate::state::{Runtime, State};
use crate::tls::{self, Alpn, TlsBuildError};

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
    /// Listening sockets still open (each accept loop holds one), so that shutting down returns
    /// only once the ports are free for another gateway.
    listening: Arc<AtomicUsize>,
}

/// One listening socket counted as open: dropped once the task owning the socket has ended.
struct Listening(Arc<AtomicUsize>);

impl Listening {
    fn new(count: &Arc<AtomicUsize>) -> Listening {
        count.fetch_add(1, Ordering::Relaxed);
        Listening(count.clone())
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
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

/// A listener with `SO_REUSEADDR` (as tokio's own) and the configured backlog.
fn bind(key: &'static str, addr: SocketAddr, backlog: u32) -> Result<TcpListener, StartError> {
    let listen = || {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(backlog)
    };
    listen().map_err(|source| StartError::Bind { key, addr, source })
}

/// Says once at start when `net.core.somaxconn` cuts the configured backlog short.
fn check_somaxconn(backlog: u32) {
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    if let Some(cap) = somaxconn.filter(|cap| *cap < backlog) {
        tracing::warn!(
            limits.listen_backlog = backlog,
            net.core.somaxconn = cap,
            "the kernel caps the listen backlog at net.core.somaxconn; raise it (sysctl) to queue \
             more connection bursts"
        );
    }
}

/// File descriptors a gateway with `max_connections` and `admin_connections` may need: a client
/// connection and a backend connection for each of the first, one for each admin connection, and
/// some to spare (listeners, event loops, NATS, logs, maps).
fn files_needed(max_connections: usize, admin_connections: usize) -> u64 {
    2 * max_connections as u64 + admin_connections as u64 + 64
}

/// Raises the open-files limit to what the hard limit allows (as Go's runtime and nginx's
/// `worker_rlimit_nofile` do): the soft limit most services start with (1,024 under systemd)
/// would end accepting at a few hundred connections. Says at start when even the hard limit is
/// short of what `limits.max_connections` and `admin.max_connections` need.
fn raise_open_files(max_connections: usize, admin_connections: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let was = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above; raising the soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            lim.rlim_cur = was;
        }
    }
    let needed = files_needed(max_connections, admin_connections);
    if lim.rlim_cur < needed {
        tracing::warn!(
            limits.max_connections = max_connections,
            admin.max_connections = admin_connections,
            open_files = lim.rlim_cur,
            needed,
            "the open-files limit (RLIMIT_NOFILE) is short of what limits.max_connections needs \
             (a client and a backend connection each): raise it (systemd: LimitNOFILE=) or lower \
             limits.max_connections; past it, connections wait unaccepted"
        );
    } else if lim.rlim_cur != was {
        tracing::debug!(from = was, to = lim.rlim_cur, "open-files limit raised");
    }
}

impl Gateway {
    /// Binds every listener and starts serving. Returns once all listeners accept connections.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        let metrics = Arc::new(Metrics::new());
        let log = AccessLogger::start(config.access_log.path.clone(), metrics.clone())?;
        let registry = Registry::new(metrics.clone());
        registry.replace_static(&config.routes, config.registry.droplet_stale_threshold);
        count_malformed(&metrics, &config);
        let backlog = config.limits.listen_backlog;
        check_somaxconn(backlog);
        raise_open_files(
            config.limits.max_connections,
            config.admin.as_ref().map_or(0, |a| a.max_connections),
        );
        let https_l = bind("listen.https", config.listen.https, backlog)?;
        defer_accept(&https_l);
        let http_l = match config.listen.http {
            Some(a) => Some(bind("listen.http", a, backlog)?),
            None => None,
        };
        let admin_l = match &config.admin {
            Some(a) => Some(bind("admin.listen", a.listen, backlog)?),
            None => None,
        };
        warn_admin(&config);
        check_certificates(&metrics, &config);
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
                match crate::xdp::XdpRuntime::without_gate(&config) {
                    Ok(x) => {
                        tracing::warn!(
                            error = %e,
                            "XDP gate unavailable; the daemon still checks every connection, and \
                             refuses sources deny learning denied once it has their ClientHello"
                        );
                        Some(x)
                    }
                    Err(e2) => {
                        tracing::warn!(error = %e, "XDP gate unavailable; the daemon still checks every connection (deny learning off: {e2})");
                        None
                    }
                }
            }
        };
        let limits = config.limits.clone();
        let workers = limits.worker_threads();
        let has_nats = config.nats.is_some();
        metrics.registry_connected.set(i64::from(!has_nats));
        let nats_tls = match config.nats.as_ref().and_then(|n| n.tls.as_ref()) {
            None => None,
            Some(t) => Some(
                crate::tls::nats::LiveNatsTls::new(t)
                    .map_err(|e| StartError::Nats(crate::registry::nats::NatsError::Tls(e)))?,
            ),
        };
        let state = Arc::new(State {
            runtime: ArcSwap::from_pointee(Runtime::build(config)?),
            registry,
            metrics,
            log,
            backends: (0..workers).map(|_| BackendPool::default()).collect(),
            registry_connected: AtomicBool::new(!has_nats),
            registry_loaded: match has_nats {
                true => std::sync::OnceLock::new(),
                false => std::sync::OnceLock::from(Instant::now()),
            },
            xdp,
            ktls,
            draining: Default::default(),
            liveness: crate::liveness::Liveness::new(workers),
            nats_tls,
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
            listening: Arc::new(AtomicUsize::new(0)),
        };
        tokio::spawn(xdp_upkeep(gw.state.clone(), gw.shutdown.subscribe()));
        tokio::spawn(certificate_upkeep(
            gw.state.clone(),
            gw.shutdown.subscribe(),
        ));
        tokio::spawn(liveness_upkeep(gw.state.clone(), gw.shutdown.subscribe()));
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let failures = Arc::new(AcceptFailures::default());
        let listeners = [Some((https_l, true)), http_l.map(|l| (l, false))];
        let listeners: Vec<(std::net::TcpListener, bool)> = listeners
            .into_iter()
            .flatten()
            .map(|(l, tls)| Ok((l.into_std()?, tls)))
            .collect::<std::io::Result<_>>()
            .map_err(StartError::Workers)?;
        let (spread, inboxes) = Spread::new(&state.metrics, workers);
        for (index, inbox) in inboxes.into_iter().enumerate() {
            gw.spawn_worker(index, &listeners, &slots, &failures, &spread, inbox)?;
        }
        if let Some(l) = admin_l {
            let open = Listening::new(&gw.listening);
            let served = crate::admin::serve(state.clone(), l, gw.shutdown.subscribe());
            tokio::spawn(async move {
                served.await;
                drop(open);
            });
        }
        tracing::info!(https = %gw.https, http = ?gw.http, admin = ?gw.admin, "portcullis is serving");
        Ok(gw)
    }

    /// Starts worker thread `index`: a single-threaded event loop that accepts from every listener
    /// (the same sockets in each worker: an idle worker wakes first and takes the connection),
    /// serves what it accepted unless another worker serves fewer connections (then it hands the
    /// connection over, see [`Spread`]), and serves what other workers hand it through `inbox`.
    /// A connection, its tasks and its backend connections stay on one thread, so a request costs
    /// no cross-thread wake-ups.
    fn spawn_worker(
        &self,
        index: usize,
        listeners: &[(std::net::TcpListener, bool)],
        slots: &Arc<Semaphore>,
        failures: &Arc<AcceptFailures>,
        spread: &Arc<Spread>,
        inbox: mpsc::UnboundedReceiver<Handed>,
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
                Listening::new(&self.listening),
            ));
        }
        let (slots, failures, spread) = (slots.clone(), failures.clone(), spread.clone());
        let state = self.state.clone();
        let handed = self.clone_parts();
        let mut stop = self.stop_workers.subscribe();
        std::thread::Builder::new()
            .name(format!("portcullis-w{index}"))
            .spawn(move || {
                crate::state::set_worker(index);
                rt.block_on(async move {
                    tokio::spawn(
                        async move { crate::liveness::beat(&state.liveness, index).await },
                    );
                    tokio::spawn(serve_handed(handed, inbox, index));
                    for (l, tls, parts, open) in mine {
                        match TcpListener::from_std(l) {
                            Ok(l) => {
                                let accepting = accept_loop(
                                    parts,
                                    l,
                                    Accepting {
                                        worker: index,
                                        slots: slots.clone(),
                                        failures: failures.clone(),
                                        spread: spread.clone(),
                                        tls,
                                    },
                                );
                                tokio::spawn(async move {
                                    accepting.await;
                                    drop(open);
                                });
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
        if old.admin.as_ref().map(|a| a.listen) != config.admin.as_ref().map(|a| a.listen) {
            return Err(StartError::NeedsRestart("admin.listen"));
        }
        // TLS to NATS can take new files (they are used from the next reconnection), not be
        // switched on or off.
        let nats = |c: &Config| {
            c.nats
                .as_ref()
                .map(|n| (n.servers.clone(), n.auth.clone(), n.tls.is_some()))
        };
        if nats(old) != nats(&config) {
            return Err(StartError::NeedsRestart("nats"));
        }
        if old.registry.sharding != config.registry.sharding {
            return Err(StartError::NeedsRestart(
                "registry.routing_table_sharding_mode and registry.isolation_segments",
            ));
        }
        if old.limits.workers != config.limits.workers {
            return Err(StartError::NeedsRestart("limits.workers"));
        }
        if old.limits.listen_backlog != config.limits.listen_backlog {
            return Err(StartError::NeedsRestart("limits.listen_backlog"));
        }
        let runtime = Runtime::build(config)?;
        let cfg = &runtime.config;
        // Reopened at every reload (a log rotation's SIGHUP), at the path the new config names;
        // a path that cannot be opened fails the reload before anything is applied.
        let access_log = Destination::open(&cfg.access_log.path)?;
        if let (Some(live), Some(tls)) = (
            &self.state.nats_tls,
            cfg.nats.as_ref().and_then(|n| n.tls.as_ref()),
        ) {
            live.update(tls)
                .map_err(|e| StartError::Nats(crate::registry::nats::NatsError::Tls(e)))?;
        }
        warn_admin(cfg);
        check_certificates(&self.state.metrics, cfg);
        if let Some(x) = &self.state.xdp {
            if let Err(e) = x.sync(cfg) {
                tracing::error!(error = %e, "XDP maps not updated");
            }
        }
        self.state
            .registry
            .replace_static(&cfg.routes, cfg.registry.droplet_stale_threshold);
        count_malformed(&self.state.metrics, cfg);
        self.state.log.switch(access_log);
        self.state.runtime.store(Arc::new(runtime));
        tracing::info!("configuration reloaded");
        Ok(())
    }

    /// Reopens the access log at the path the running configuration names (`SIGUSR1`, for log
    /// rotation), without reading the config file: a rotation must not depend on the file on
    /// disk being valid, as a reload does. On failure the log goes on to the file already open.
    pub fn reopen_access_log(&self) -> Result<(), AccessLogError> {
        let runtime = self.state.runtime.load();
        let access_log = Destination::open(&runtime.config.access_log.path)?;
        self.state.log.switch(access_log);
        Ok(())
    }

    /// Stops accepting, lets open connections finish their requests for up to `drain`.
    pub async fn shutdown(self, drain: Duration) {
        self.shutdown_unless(drain, std::future::pending()).await;
    }

    /// [`Gateway::shutdown`], cut short when `hurry` resolves: connections still open then are
    /// cut at once.
    async fn shutdown_unless(self, drain: Duration, hurry: impl Future<Output = ()>) {
        let _ = self.shutdown.send(true);
        // The accept loops close their sockets on their own threads: wait for it (bounded, in
        // case a worker is stuck), so that the ports are free when this returns.
        let closed = async {
            while self.listening.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), closed).await;
        if let Some(x) = &self.state.xdp {
            if self.state.runtime.load().config.xdp.detach_on_exit {
                x.detach();
            }
        }
        let deadline = Instant::now() + drain;
        let settled = async {
            while self.connections.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let hurried = tokio::select! {
            _ = settled => false,
            _ = hurry => true,
        };
        let open = self.connections.load(Ordering::Relaxed);
        if hurried && open > 0 {
            tracing::warn!(
                connections = open,
                "asked again to stop: connections still open are cut now"
            );
        } else if open > 0 {
            tracing::warn!(
                connections = open,
                timeout = ?drain,
                "connections still open when the drain timeout ran out; they are cut"
            );
        }
        self.state.log.flush(Duration::from_secs(2)).await;
    }

    /// Stops the gateway as a load balancer in front of it needs (`drain` in the config). For
    /// `drain.wait` it goes on serving, new connections included, while `/health` answers 503,
    /// HTTP/1.1 responses close their connection and h2 connections are sent GOAWAY, so clients
    /// and the load balancer move elsewhere. Then [`Gateway::shutdown`] with `drain.timeout`.
    ///
    /// Each message on `hurry` (the operator asking again) cuts the current step short: the
    /// first one the wait, the next one the requests still in flight. A closed `hurry` is never
    /// a request.
    pub async fn drain(self, mut hurry: mpsc::UnboundedReceiver<()>) {
        async fn asked(hurry: &mut mpsc::UnboundedReceiver<()>) {
            if hurry.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        let drain = self.state.runtime.load().config.drain;
        if !drain.wait.is_zero() {
            self.state.draining.start();
            tracing::info!(
                wait = ?drain.wait,
                timeout = ?drain.timeout,
                "draining: /health answers 503 and connections close after their requests; \
                 new connections are still served until the wait is over"
            );
            tokio::select! {
                _ = tokio::time::sleep(drain.wait) => {}
                _ = asked(&mut hurry) => tracing::info!(
                    "asked again to stop: the drain wait is cut short; asking once more cuts \
                     the requests in flight"
                ),
            }
        }
        tracing::info!(
            connections = self.connections.load(Ordering::Relaxed),
            timeout = ?drain.timeout,
            "closing the listeners; waiting for requests in flight (asking again cuts them)"
        );
        self.shutdown_unless(drain.timeout, asked(&mut hurry)).await;
    }
}

/// With the gate (or deny learning without it), once a second until shutdown: expires learned
/// denials and brings the gate's allow-lists up to date with the registry. A sync that keeps
/// failing is retried every second, said at once and then once a minute.
async fn xdp_upkeep(s: Arc<State>, mut stop: watch::Receiver<bool>) {
    let Some(x) = &s.xdp else { return };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut failing = Repeats::new(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        x.sweep(&s.metrics);
        let config = &s.runtime.load().config;
        match x.follow_registry(&s.registry.table(), config) {
            Ok(()) if failing.clear() => {
                tracing::info!("XDP allow-lists follow the registry again");
            }
            Ok(()) => {}
            Err(e) => {
                if let Some(failures) = failing.note(Instant::now()) {
                    tracing::error!(
                        error = %e,
                        failures,
                        "XDP allow-lists not updated from the registry; retried every second"
                    );
                }
            }
        }
    }
}

/// What an operator should know about how the admin API is protected.
/// Exports every loaded certificate's expiry and says those expired, not valid yet or
/// expiring soon (see [`tls::expiry`]).
fn check_certificates(metrics: &Metrics, config: &Config) {
    tls::expiry::publish(metrics, &config.certificate_validity);
    tls::expiry::log(&config.certificate_validity, tls::expiry::unix_now());
}

/// Says again, once a day, what [`check_certificates`] said at start or the last reload: a
/// gateway that runs for months walks into its certificates' expiry without a reload.
async fn certificate_upkeep(s: Arc<State>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval_at(
        tokio::time::Instant::now() + tls::expiry::EVERY,
        tls::expiry::EVERY,
    );
    loop {
        tokio::select! {
            _ = every.tick() => {
                let runtime = s.runtime.load();
                tls::expiry::log(&runtime.config.certificate_validity, tls::expiry::unix_now());
            }
            _ = stop.changed() => return,
        }
    }
}

/// The main runtime's beat, and the log line and gauge for event loops that stall (see
/// [`crate::liveness`]).
async fn liveness_upkeep(s: Arc<State>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(crate::liveness::BEAT);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = Vec::new();
    loop {
        tokio::select! {
            _ = every.tick() => {
                s.liveness.beat(s.liveness.main_slot());
                let stalled = crate::liveness::log_changes(&s.liveness, &mut seen);
                s.metrics.event_loops_stalled.set(stalled as i64);
            }
            _ = stop.changed() => return,
        }
    }
}

fn warn_admin(config: &Config) {
    let Some(admin) = &config.admin else { return };
    match &admin.token {
        None if !admin.listen.ip().is_loopback() => tracing::warn!(
            listen = %admin.listen,
            "the admin API is reachable beyond this host without a token (admin.token_file): \
             anyone who reaches it can read the routes and lift XDP denials"
        ),
        Some(_) if admin.token_world_readable => tracing::warn!(
            "admin.token_file can be read by every user on this host; make it readable by the \
             gateway's user only (chmod 600)"
        ),
        _ => {}
    }
    if admin.token.is_some() && admin.tls.is_none() && !admin.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %admin.listen,
            "the admin token travels in clear to an address beyond this host; serve the admin \
             API over TLS (admin.tls)"
        );
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

/// A failure that can repeat many times a second, said once per `every` while it lasts, with
/// how many there were since it was last said: the log keeps the news without the flood.
pub(crate) struct Repeats {
    every: Duration,
    failed: u64,
    said: Option<Instant>,
}

impl Repeats {
    pub(crate) const fn new(every: Duration) -> Repeats {
        Repeats {
            every,
            failed: 0,
            said: None,
        }
    }

    /// Counts one failure at `now`; when it is time to say so, how many to report.
    pub(crate) fn note(&mut self, now: Instant) -> Option<u64> {
        self.failed += 1;
        if self
            .said
            .is_some_and(|at| now.duration_since(at) < self.every)
        {
            return None;
        }
        self.said = Some(now);
        Some(std::mem::take(&mut self.failed))
    }

    /// A success: whether failures had been noted since the last one. The next failure is said
    /// at once.
    fn clear(&mut self) -> bool {
        let had = self.said.is_some();
        *self = Repeats::new(self.every);
        had
    }
}

/// Accept failures, shared by every worker's accept loops so that they are said once every
/// 10 s, not once per worker and retry.
struct AcceptFailures(Mutex<Repeats>);

impl Default for AcceptFailures {
    fn default() -> Self {
        AcceptFailures(Mutex::new(Repeats::new(Duration::from_secs(10))))
    }
}

impl AcceptFailures {
    fn note(&self, metrics: &crate::metrics::Metrics, e: &std::io::Error) {
        metrics.accept_errors.inc();
        let mut repeats = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(failures) = repeats.note(Instant::now()) {
            tracing::warn!(
                error = %e,
                failures,
                "accept failed; retrying every 50 ms (counted in portcullis_accept_errors_total)"
            );
        }
    }
}

/// Where accepted connections are served. Every worker accepts from the same listening sockets
/// and whichever wakes first takes the connection, so a burst of connections (a load balancer's
/// pool opening, a load generator's 64) can land mostly on one worker. That one then runs out of
/// its core while another idles, for as long as the connections last. So a worker that accepts a
/// connection while another serves fewer hands it over, as HAProxy's threads do: the counts stay
/// within one of each other as connections open. (Connections that close unevenly are not moved.)
/// A worker whose event loop has missed its beats is not handed any: stuck, it would hold them
/// unserved, while the worker that accepted them can serve them.
struct Spread {
    /// Connections each worker serves, or has been handed and will serve
    /// (`portcullis_worker_connections`).
    loads: Box<[prometheus_client::metrics::gauge::Gauge]>,
    inboxes: Box<[mpsc::UnboundedSender<Handed>]>,
}

impl Spread {
    fn new(
        metrics: &Metrics,
        workers: usize,
    ) -> (Arc<Spread>, Vec<mpsc::UnboundedReceiver<Handed>>) {
        let (inboxes, receivers) = (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        let loads = (0..workers)
            .map(|worker| {
                let labels = crate::metrics::WorkerLabels { worker };
                metrics.worker_connections.get_or_create(&labels).clone()
            })
            .collect();
        let spread = Spread {
            loads,
            inboxes: Vec::into_boxed_slice(inboxes),
        };
        (Arc::new(spread), receivers)
    }

    /// The worker to serve a connection worker `me` accepted, counted as serving it from now on.
    fn take(&self, me: usize, liveness: &crate::liveness::Liveness) -> usize {
        let loads = self.loads.iter().enumerate().map(|(worker, load)| {
            let running = worker == me || liveness.silent(worker) <= HAND_OVER_SILENCE;
            running.then(|| load.get())
        });
        let to = least_loaded(me, loads);
        self.loads[to].inc();
        to
    }
}

/// How long a worker's event loop may go without its beat (every second) and still be handed
/// connections. A loop busy with ready work still beats; one that is not is either stuck or
/// about to be, and a connection it is not handed stays with the worker that accepted it.
const HAND_OVER_SILENCE: Duration = Duration::from_secs(2);

/// Which of the workers with these loads (`None`: not to be handed connections) should serve a
/// connection that worker `me` accepted: `me`, unless another serves fewer (then the first of
/// those that serve fewest).
fn least_loaded(me: usize, loads: impl IntoIterator<Item = Option<i64>>) -> usize {
    let (mut least, mut mine) = (None, None);
    for (i, load) in loads.into_iter().enumerate() {
        let Some(load) = load else { continue };
        if i == me {
            mine = Some(load);
        }
        if least.is_none_or(|(_, l)| load < l) {
            least = Some((i, load));
        }
    }
    match (least, mine) {
        (Some((i, l)), Some(m)) if l < m => i,
        _ => me,
    }
}

/// A connection one worker accepted for another to serve.
struct Handed {
    /// Deregistered from the accepting worker's event loop, registered again by the serving one.
    tcp: std::net::TcpStream,
    client: SocketAddr,
    tls: bool,
    held: Held,
}

/// What an accepted connection holds until it ends, wherever it is served and however it ends
/// (even dropped in a hand-over at shutdown): its slot under `limits.max_connections` and its
/// place in the counts of open connections.
struct Held {
    _permit: tokio::sync::OwnedSemaphorePermit,
    connections: Arc<AtomicUsize>,
    active: prometheus_client::metrics::gauge::Gauge,
    /// The serving worker's count (`Spread::loads`).
    load: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.active.dec();
        self.load.dec();
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How one worker's accept loop for one listener is set up.
struct Accepting {
    worker: usize,
    slots: Arc<Semaphore>,
    failures: Arc<AcceptFailures>,
    spread: Arc<Spread>,
    /// Whether the listener is the TLS one (`listen.https`).
    tls: bool,
}

async fn accept_loop(mut p: Parts, listener: TcpListener, a: Accepting) {
    let Accepting {
        worker,
        slots,
        failures,
        spread,
        tls,
    } = a;
    loop {
        let (tcp, client) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning; the
                    // connection waits in the backlog.
                    failures.note(&p.state.metrics, &e);
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
        // An IPv4 caller on a dual-stack listener (`[::]`) arrives as `::ffff:a.b.c.d`: it is
        // that IPv4 address for the access log, X-Forwarded-For, deny learning and its exempt
        // CIDRs, as it is for the XDP gate.
        let client = SocketAddr::new(client.ip().to_canonical(), client.port());
        let to = spread.take(worker, &p.state.liveness);
        p.connections.fetch_add(1, Ordering::Relaxed);
        p.state.metrics.connections_active.inc();
        let held = Held {
            _permit: permit,
            connections: p.connections.clone(),
            active: p.state.metrics.connections_active.clone(),
            load: spread.loads[to].clone(),
        };
        if to == worker {
            let (state, shutdown) = (p.state.clone(), p.shutdown.clone());
            tokio::spawn(serve_accepted(state, tcp, client, tls, shutdown, held));
            continue;
        }
        // Fails only when the other worker has ended (shutdown) or the socket cannot leave this
        // event loop; either way the connection closes, as one left in the backlog would.
        match tcp.into_std() {
            Ok(tcp) => {
                let handed = Handed {
                    tcp,
                    client,
                    tls,
                    held,
                };
                if spread.inboxes[to].send(handed).is_err() {
                    tracing::debug!(worker = to, %client, "closed a connection handed to a worker that has ended");
                }
            }
            Err(e) => {
                tracing::warn!(%client, error = %e, "cannot hand a connection to another worker; closed it")
            }
        }
    }
}

/// Serves, on worker `worker`, the connections other workers hand it.
async fn serve_handed(p: Parts, mut inbox: mpsc::UnboundedReceiver<Handed>, worker: usize) {
    while let Some(h) = inbox.recv().await {
        match TcpStream::from_std(h.tcp) {
            Ok(tcp) => {
                let (state, shutdown) = (p.state.clone(), p.shutdown.clone());
                tokio::spawn(serve_accepted(
                    state, tcp, h.client, h.tls, shutdown, h.held,
                ));
            }
            // Registering with this worker's epoll failed (out of memory): the connection
            // closes, as an accept failure's would.
            Err(e) => tracing::warn!(
                worker,
                error = %e,
                "cannot serve a connection another worker handed over; closed it"
            ),
        }
    }
}

/// Serves a connection to its end on the worker this runs on.
async fn serve_accepted(
    state: Arc<State>,
    mut tcp: TcpStream,
    client: SocketAddr,
    tls: bool,
    shutdown: watch::Receiver<bool>,
    held: Held,
) {
    match client_of(&state, &mut tcp, client).await {
        Some(client) if tls => serve_tls(state.clone(), tcp, client, shutdown).await,
        Some(client) => {
            let mut conn = ConnCtx::new(client, None);
            conn.local = local_ip(&tcp);
            serve_http(state.clone(), Box::new(tcp), conn, shutdown).await;
        }
        None => {}
    }
    drop(held);
}

/// The gateway's address a connection came to, as the client sees it (`X-Vcap-Router`): one
/// `getsockname` per connection, since a listener on `0.0.0.0` or `[::]` serves several.
fn local_ip(tcp: &TcpStream) -> Option<IpAddr> {
    tcp.local_addr().ok().map(|a| a.ip().to_canonical())
}

/// PROXY protocol failures, said once every 10 s with how many there were.
static PROXY_HEADER_FAILURES: Mutex<Repeats> = Mutex::new(Repeats::new(Duration::from_secs(10)));

/// The client a connection serves: its peer, or, from a `listen.proxy_protocol.from` peer, the
/// client its PROXY protocol header names (`None`: the header failed and the connection ends).
async fn client_of(state: &State, tcp: &mut TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
    let timeout = {
        let rt = state.runtime.load();
        if !rt.config.listen.expects_proxy_header(peer.ip()) {
            return Some(peer);
        }
        rt.config.tls.handshake_timeout
    };
    let header = proxy_protocol::read(tcp, timeout).await;
    let result = match &header {
        Ok(h) => h.label(),
        Err(e) => e.label(),
    };
    state
        .metrics
        .proxy_protocol_headers
        .get_or_create(&ProxyHeaderLabels { result })
        .inc();
    match header {
        Ok(proxy_protocol::Header::Proxied(client)) => Some(client),
        Ok(proxy_protocol::Header::Local) => Some(peer),
        Err(e) => {
            let mut repeats = PROXY_HEADER_FAILURES
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(failures) = repeats.note(Instant::now()) {
                tracing::warn!(
                    %peer,
                    error = %e,
                    failures,
                    "closed a connection from a listen.proxy_protocol.from peer without a valid \
                     PROXY protocol header (counted in portcullis_proxy_protocol_headers_total)"
                );
            }
            None
        }
    }
}

/// A client connection's stream once TLS is settled: rustls in userspace, or the kernel's.
trait ClientIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ClientIo for T {}

async fn serve_tls(
    state: Arc<State>,
    tcp: TcpStream,
    client: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    // Boxed: the handshake's state is large and over once the connection is served.
    if let Some((stream, conn)) = Box::pin(handshake(&state, tcp, client)).await {
        serve_http(state, stream, conn, shutdown).await;
    }
}

/// The TLS handshake, and the move into kernel TLS where the kernel has it.
async fn handshake(
    state: &State,
    tcp: TcpStream,
    client: SocketAddr,
) -> Option<(Box<dyn ClientIo>, ConnCtx)> {
    let rt = state.runtime.load_full();
    let deadline = rt.config.tls.handshake_timeout;
    // The gate's decision on the ClientHello's domain, taken again (see `XdpRuntime::refuses`).
    let config = &rt.config;
    let refuse = |p: &DomainPattern| state.xdp.as_ref()?.refuses(config, p, client.ip());
    let local = local_ip(&tcp);
    let Some(ktls) = state.ktls.as_deref() else {
        let accepted = tls::accept(tcp, &rt.tls, deadline, refuse).await;
        let (stream, conn) = handshake_done(state, accepted, client, local, "userspace")?;
        return Some((Box::new(stream), conn));
    };
    // The probe found every cipher suite the gateway offers supported by the kernel.
    let accepted = tls::accept_kernel(tcp, &rt.tls, deadline, refuse).await;
    drop(rt);
    let (pending, mut conn) = handshake_done(state, accepted, client, local, "kernel")?;
    match pending.into_kernel(ktls) {
        Ok(stream) => {
            conn.ktls = true;
            Some((Box::new(stream), conn))
        }
        // Rare (a socket error mid-switch); the rustls state is consumed by then, so the
        // connection ends.
        Err(e) => {
            tracing::warn!(%client, error = %e, "cannot move the connection into kernel TLS");
            None
        }
    }
}

/// Counts a finished handshake (feeding deny learning on certificate failures); on success,
/// returns the stream and the connection's context.
fn handshake_done<S>(
    state: &State,
    accepted: Result<tls::Accepted<S>, (Option<DomainPattern>, tls::HandshakeFailure)>,
    client: SocketAddr,
    local: Option<IpAddr>,
    mode: &'static str,
) -> Option<(S, ConnCtx)> {
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
            let mut conn = ConnCtx::new(client, Some(accepted.info));
            conn.local = local;
            Some((accepted.stream, conn))
        }
    }
}

fn http1_builder(limits: &Limits) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    b
}

pub(crate) fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        // Twice the limit: a header list between the two reaches the gateway, which answers
        // 431 itself (`proxy::handle`), logged, and the connection goes on. Beyond it the `h2`
        // crate answers 431 and resets the stream, unlogged; beyond 4 times that (8 times the
        // limit) it ends the connection, as a client sending such lists is abusive.
        .max_header_list_size(h2_header_list_limit(limits.max_header_bytes))
        // HTTP/2 Rapid Reset (CVE-2023-44487) and its variants: a client whose streams are reset
        // (by itself before they were taken up, or by the gateway because it opened more than
        // `max_concurrent_streams`) faster than they can be served gets GOAWAY
        // ENHANCE_YOUR_CALM. The `h2` crate's own defaults, set here so that a dependency update
        // cannot loosen them unnoticed.
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// The `SETTINGS_MAX_HEADER_LIST_SIZE` an h2 client connection has: twice
/// `limits.max_header_bytes` (see `builder`).
fn h2_header_list_limit(max_header_bytes: usize) -> u32 {
    u32::try_from(max_header_bytes.saturating_mul(2)).unwrap_or(u32::MAX)
}

/// Streams a client may reset before the gateway took them up, at one time (see `builder`).
const H2_MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams the gateway may reset on one connection (refused beyond `max_concurrent_streams`,
/// malformed) before it sends GOAWAY.
const H2_MAX_LOCAL_RESETS: usize = 1024;

/// How often a serving connection checks for idleness. An HTTP/1.1 connection that saw no request
/// during a whole tick parks (see [`crate::park`]), so idle ones release their HTTP buffers after
/// 0.25–0.5 s.
const TICK: Duration = Duration::from_millis(250);

/// How often a connection that does not park checks for idleness.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// The client connection preface of HTTP/2 with prior knowledge (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

async fn serve_http(
    state: Arc<State>,
    io: Box<dyn ClientIo>,
    conn: ConnCtx,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = state.runtime.load().config.limits.clone();
    let conn = Arc::new(conn);
    let (svc_state, svc_conn) = (state.clone(), conn.clone());
    // Boxed for h2: the request future is large (5.9 KB), and hyper moves it into every stream
    // task it spawns. The box is allocated first and the future written into it, so that it is
    // made in place: `Box::pin(handle(..))` made it on the stack and copied all of it.
    let service = service_fn(move |req| {
        let slot = Box::new_uninit();
        Box::into_pin(Box::write(
            slot,
            proxy::handle(svc_state.clone(), svc_conn.clone(), req),
        ))
    });
    // Not boxed for HTTP/1.1: hyper keeps one box per connection for the request in flight and
    // reuses it, where a box per request would be a 5.9 KB allocation each time (larger than
    // glibc's per-thread cache takes, so it merges free chunks on every request).
    let (h1_state, h1_conn) = (state.clone(), conn.clone());
    let h1_service = service_fn(move |req| proxy::handle(h1_state.clone(), h1_conn.clone(), req));
    let alpn = conn.tls.as_ref().map_or(Alpn::None, |t| t.alpn);
    let mut io = io;
    // Without ALPN, the first bytes may still be the h2 preface.
    let mut first = Vec::new();
    if alpn != Alpn::H2 {
        let deadline = Instant::now() + limits.idle_timeout;
        let sniff = alpn == Alpn::None;
        match next_request(&state, &mut io, sniff, deadline, &mut shutdown).await {
            Some(bytes) => first = bytes,
            None => return,
        }
    }
    if alpn == Alpn::H2 || first[..] == H2_PREFACE[..] {
        // h2 is not parked; what sniffing read is served first.
        if !first.is_empty() {
            io = Box::new(ParkIo::new(io, first, Parking::new(), conn.clone()));
        }
        // Responses that become ready together leave together (see `crate::cork`).
        let b = builder(&limits);
        let serving = Cork::serve(io, |io| {
            b.serve_connection_with_upgrades(TokioIo::new(io), service)
        });
        let graceful = |s: Pin<&mut Corked<auto::UpgradeableConnection<_, _, _>, _>>| {
            s.inner().graceful_shutdown()
        };
        let mut draining = state.draining.subscribe();
        let (_, failed) = Box::pin(drive(
            serving,
            graceful,
            &conn,
            &limits,
            &mut shutdown,
            Ends::H2 {
                draining: &mut draining,
            },
        ))
        .await;
        if let Some(e) = failed {
            count_connection_error(&state, &*e);
        }
        return;
    }
    // HTTP/1.1 in cycles, parked between them.
    let parking = Parking::new();
    loop {
        let serving = http1_builder(&limits)
            .serve_connection(
                TokioIo::new(ParkIo::new(io, first, parking.clone(), conn.clone())),
                h1_service.clone(),
            )
            .with_upgrades();
        let graceful = |s: Pin<&mut http1::UpgradeableConnection<_, _>>| s.graceful_shutdown();
        let park = || parking.request();
        // Boxed so that a parked connection does not keep the room hyper's connection took.
        let (idle_since, failed) = Box::pin(drive(
            serving,
            graceful,
            &conn,
            &limits,
            &mut shutdown,
            Ends::Http1 { park: &park },
        ))
        .await;
        // A request head hyper could not parse, answered by hyper itself: logged and counted
        // as every other answer is (SPEC §9).
        if let Some((status, why)) = failed.as_ref().and_then(proxy::unparsed_head) {
            proxy::log_unparsed_head(&state, &conn, status, why);
        }
        if let Some(e) = &failed {
            count_connection_error(&state, e);
        }
        io = match parking.take() {
            Some(parked) => parked,
            None => {
                // Closed by hyper (either side ended it): the client may still be sending.
                if let Some(closed) = parking.take_closed() {
                    let lingered = linger(closed, limits.linger_timeout, &mut shutdown);
                    if let Some(outcome) = Box::pin(lingered).await {
                        state
                            .metrics
                            .client_lingering_closes
                            .get_or_create(&OutcomeLabels { outcome })
                            .inc();
                    }
                }
                // Else failed, or upgraded (the tunnel owns the stream now).
                return;
            }
        };
        let deadline = idle_since + limits.idle_timeout;
        match next_request(&state, &mut io, false, deadline, &mut shutdown).await {
            Some(bytes) => first = bytes,
            None => return,
        }
    }
}

/// Reads and discards what a client still sends on an HTTP/1.1 connection the gateway has shut
/// for writing, until the client ends its side, `limit` passes or the gateway shuts down, and
/// then closes it (`limits.linger_timeout`). Closing a socket with bytes unread sends a reset, and
/// a client still sending a request body that was answered before it was read (the gateway's
/// 403 or 404, an app's early 413) would lose the answer to it: curl says "Send failure: Broken
/// pipe". nginx's lingering close; Go's server waits 0.5 s after its FIN.
///
/// Returns how it ended (`portcullis_client_lingering_closes_total{outcome}`), or `None` when
/// there was nothing to wait for: a client that closed without sending more, as most do.
async fn linger(
    mut io: Box<dyn ClientIo>,
    limit: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<&'static str> {
    if limit.is_zero() || *shutdown.borrow() {
        return None;
    }
    let mut buf = vec![0; LINGER_READ];
    let discard = async {
        let mut discarded = 0;
        while let Ok(n @ 1..) = io.read(&mut buf).await {
            discarded += n;
        }
        discarded
    };
    tokio::select! {
        discarded = discard => (discarded > 0).then_some("client_closed"),
        _ = tokio::time::sleep(limit) => Some("timeout"),
        _ = shutdown.changed() => Some("shutdown"),
    }
}

/// The buffer a lingering connection's discarded bytes are read into.
const LINGER_READ: usize = 16 * 1024;

/// Counts a client connection that ended in an error in
/// `portcullis_client_connection_errors_total`, by the first cause in `e`'s chain that says why.
fn count_connection_error(state: &State, e: &(dyn std::error::Error + 'static)) {
    let kind = connection_error_kind(e);
    state
        .metrics
        .client_connection_errors
        .get_or_create(&KindLabels { kind })
        .inc();
}

fn connection_error_kind(e: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(e) = e.downcast_ref::<hyper::Error>() {
            if e.is_timeout() {
                return "header_timeout";
            }
            if e.is_parse() {
                return "unparsed_head";
            }
            if e.is_incomplete_message() {
                return "incomplete_request";
            }
        } else if let Some(e) = e.downcast_ref::<h2::Error>() {
            if e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) && e.is_library() {
                return "h2_abuse";
            }
            if e.is_go_away() {
                return "h2_protocol";
            }
        } else if let Some(e) = e.downcast_ref::<std::io::Error>() {
            // A TLS peer gone without close_notify, in the middle of a request.
            return match e.kind() {
                std::io::ErrorKind::UnexpectedEof => "incomplete_request",
                _ => "io",
            };
        }
        cause = e.source();
    }
    "other"
}

/// Waits, counted as idle, for the first bytes of the next request; closes the connection when
/// it idles past `deadline` or the gateway shuts down.
async fn next_request(
    state: &State,
    io: &mut Box<dyn ClientIo>,
    sniff: bool,
    deadline: Instant,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Vec<u8>> {
    let waited = {
        let _idle = IdleGuard::new(&state.metrics);
        wait_for_request(io, sniff, deadline, shutdown).await
    };
    match waited {
        Waited::Bytes(b) => Some(b),
        Waited::Ended => None,
        Waited::Close => {
            // close_notify and FIN, as hyper does when it closes an idle connection.
            let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
            None
        }
    }
}

/// Counts a connection in `portcullis_connections_idle` while it waits without HTTP buffers.
struct IdleGuard<'a>(&'a Metrics);

impl<'a> IdleGuard<'a> {
    fn new(m: &'a Metrics) -> Self {
        m.connections_idle.inc();
        IdleGuard(m)
    }
}

impl Drop for IdleGuard<'_> {
    fn drop(&mut self) {
        self.0.connections_idle.dec();
    }
}

enum Waited {
    /// The first bytes of the next request.
    Bytes(Vec<u8>),
    /// The client closed the connection, or it failed.
    Ended,
    /// Idle past the timeout, or the gateway is shutting down: close it.
    Close,
}

/// Waits on a bare stream for the first bytes of the next request: one read, or when `sniff`,
/// reads until the bytes are known to be or not to be the h2 preface.
async fn wait_for_request<S: AsyncRead + Unpin>(
    io: &mut S,
    sniff: bool,
    deadline: Instant,
    shutdown: &mut watch::Receiver<bool>,
) -> Waited {
    if *shutdown.borrow() {
        return Waited::Close;
    }
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    loop {
        let read = tokio::select! {
            r = io.read(&mut buf[n..]) => r,
            _ = tokio::time::sleep_until(deadline.into()) => return Waited::Close,
            _ = shutdown.changed() => return Waited::Close,
        };
        match read {
            Ok(0) | Err(_) if n == 0 => return Waited::Ended,
            // The client ended mid-preface: hyper answers what it sent.
            Ok(0) | Err(_) => return Waited::Bytes(buf[..n].to_vec()),
            Ok(k) => n += k,
        }
        if !sniff || n == buf.len() || buf[..n] != H2_PREFACE[..n] {
            return Waited::Bytes(buf[..n].to_vec());
        }
    }
}

/// How a served connection ends besides idling out or the gateway stopping.
pub(crate) enum Ends<'a> {
    /// HTTP/1.1 asked to park once no request moved for a whole tick. While the gateway drains
    /// its responses say `connection: close` (`proxy::handle`), so nothing more is needed here.
    Http1 { park: &'a (dyn Fn() + Sync) },
    /// h2 is sent GOAWAY when the gateway starts draining, or once its first request has
    /// started if it came later.
    H2 {
        draining: &'a mut watch::Receiver<bool>,
    },
    /// Neither parked nor drained (the admin API, which answers `/health` while draining).
    Neither,
}

/// Resolves once the gateway drains, for an h2 connection; never for HTTP/1.1.
async fn drain_started(ends: &mut Ends<'_>) {
    if let Ends::H2 { draining } = ends {
        if draining.wait_for(|on| *on).await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// Serves a connection until it ends. Past `limits.idle_timeout` without a request, at
/// shutdown, when its caller is denied (`conn.end`) or, for h2, when the gateway drains, it is
/// closed gracefully; HTTP/1.1 is asked to park once no request moved for a whole tick. Returns
/// when the connection was last active.
pub(crate) async fn drive<F, E>(
    serving: F,
    graceful: impl Fn(Pin<&mut F>),
    conn: &ConnCtx,
    limits: &Limits,
    shutdown: &mut watch::Receiver<bool>,
    mut ends: Ends<'_>,
) -> (Instant, Option<E>)
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(serving);
    let mut idle_since = Instant::now();
    let idle = limits.idle_timeout;
    let park = match ends {
        Ends::Http1 { park } => Some(park),
        Ends::H2 { .. } | Ends::Neither => None,
    };
    // Parking needs a short tick; otherwise the tick only serves the idle timeout.
    let tick = if park.is_some() { TICK } else { IDLE_TICK };
    let tick = idle.min(tick).max(Duration::from_millis(50));
    let mut seen = conn.requests.load(Ordering::Relaxed);
    let mut closing = *shutdown.borrow();
    if closing {
        graceful(serving.as_mut());
    }
    // The gateway drains (h2 only). A connection that has not started a request yet is served
    // first: closing it before then would end it unanswered (hyper drops a connection still
    // reading its preface), so the tick sends its GOAWAY once one has started.
    let mut draining = false;
    loop {
        tokio::select! {
            res = serving.as_mut() => {
                if let Err(e) = &res {
                    tracing::debug!(client = %conn.client, error = %e, "connection ended with error");
                }
                return (idle_since, res.err());
            }
            _ = tokio::time::sleep(tick) => {
                let started = conn.requests.load(Ordering::Relaxed);
                if draining && !closing && started > 0 {
                    closing = true;
                    graceful(serving.as_mut());
                } else if conn.inflight.load(Ordering::Relaxed) > 0 || started != seen {
                    seen = started;
                    idle_since = Instant::now();
                } else if !closing && idle_since.elapsed() >= idle {
                    closing = true;
                    graceful(serving.as_mut());
                } else if let (false, Some(park)) = (closing, park) {
                    park();
                }
            }
            _ = shutdown.changed(), if !closing => {
                closing = true;
                graceful(serving.as_mut());
            }
            _ = conn.end.notified(), if !closing => {
                closing = true;
                graceful(serving.as_mut());
            }
            _ = drain_started(&mut ends), if !closing && !draining => {
                draining = true;
                if conn.requests.load(Ordering::Relaxed) > 0 {
                    closing = true;
                    graceful(serving.as_mut());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_goes_to_the_worker_serving_fewest_and_stays_on_a_tie() {
        let all = |loads: &[i64]| loads.iter().map(|&l| Some(l)).collect::<Vec<_>>();
        assert_eq!(least_loaded(0, all(&[0])), 0, "one worker");
        assert_eq!(least_loaded(0, all(&[3, 3])), 0, "a tie stays");
        assert_eq!(least_loaded(1, all(&[3, 3])), 1, "a tie stays");
        assert_eq!(least_loaded(0, all(&[4, 3])), 1);
        assert_eq!(
            least_loaded(1, all(&[2, 3, 2])),
            0,
            "the first of the fewest"
        );
        assert_eq!(least_loaded(2, all(&[5, 1, 1, 0])), 3);
        assert_eq!(
            least_loaded(1, all(&[5, 1, 1, 2])),
            1,
            "already among the fewest"
        );
        // A worker whose loop missed its beats is passed over, however few it serves.
        assert_eq!(least_loaded(0, [Some(4), None]), 0);
        assert_eq!(least_loaded(0, [Some(4), None, Some(3)]), 2);
    }

    #[test]
    fn repeated_failures_are_said_once_per_period_with_their_count() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut r = Repeats::new(Duration::from_secs(10));
        assert!(!r.clear(), "nothing failed yet");
        assert_eq!(r.note(at(0)), Some(1), "the first is said at once");
        assert_eq!(r.note(at(1)), None);
        assert_eq!(r.note(at(9)), None);
        assert_eq!(
            r.note(at(10)),
            Some(3),
            "then once a period, with the count"
        );
        assert_eq!(r.note(at(11)), None);
        assert!(r.clear(), "a success after failures");
        assert!(!r.clear());
        assert_eq!(r.note(at(12)), Some(1), "a new failure is said at once");
    }
}
