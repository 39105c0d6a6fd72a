//! State shared by every connection: the config-derived runtime (swapped on reload), the route
//! registry, metrics, the access log and backend connections.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ClientConfig;
use tokio::sync::watch;

use crate::accesslog::AccessLogger;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::BackendPool;
use crate::registry::Registry;
use crate::tls::{admin_server_config, backend_client_config, TlsBuildError, TlsServer};

/// Everything derived from one config, built off the request path and swapped whole.
pub struct Runtime {
    pub config: Config,
    pub tls: TlsServer,
    pub backend_tls: Option<Arc<ClientConfig>>,
    /// The admin API's TLS settings (`admin.tls`), when it is served over TLS.
    pub admin_tls: Option<Arc<rustls::ServerConfig>>,
    /// `route_services`: the signing keys and the client that calls the route services.
    pub route_services: Option<crate::proxy::route_service::RouteServiceRuntime>,
}

impl Runtime {
    pub fn build(config: Config) -> Result<Self, TlsBuildError> {
        let tls = TlsServer::build(&config)?;
        let backend_tls = backend_client_config(&config.backends)?;
        let admin_tls = match config.admin.as_ref().and_then(|a| a.tls.as_ref()) {
            Some(a) => Some(admin_server_config(a, &config.tls)?),
            None => None,
        };
        let route_services = match &config.route_services {
            Some(rs) => Some(
                crate::proxy::route_service::RouteServiceRuntime::build(rs, &config.backends)
                    .map_err(TlsBuildError::RouteServices)?,
            ),
            None => None,
        };
        Ok(Runtime {
            config,
            tls,
            backend_tls,
            admin_tls,
            route_services,
        })
    }
}

pub struct State {
    pub runtime: ArcSwap<Runtime>,
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    pub log: AccessLogger,
    /// One backend pool per worker thread, so a request and the backend connection it uses
    /// share one event loop.
    pub backends: Box<[BackendPool]>,
    /// Whether the dynamic registry is connected (always true without NATS).
    pub registry_connected: AtomicBool,
    /// From when the registry holds the routes (`registry.start_delay` after the first
    /// connection to NATS; the start without NATS); unset before.
    pub registry_loaded: std::sync::OnceLock<std::time::Instant>,
    /// The XDP gate, when configured and available.
    pub xdp: Option<crate::xdp::XdpRuntime>,
    /// Kernel TLS, when the start-up probe found it (and `tls.ktls` is not `off`).
    pub ktls: Option<Arc<crate::tls::KernelTls>>,
    /// Whether the gateway is draining before it stops (see [`crate::gateway::Gateway::drain`]).
    pub draining: Draining,
    /// Whether each event loop (every worker's and the main runtime's) still runs.
    pub liveness: crate::liveness::Liveness,
    /// `nats.tls`, as the NATS client's next handshake uses it (reloads update it).
    pub nats_tls: Option<Arc<crate::tls::nats::LiveNatsTls>>,
}

/// Set once, when the gateway starts draining: `/health` answers 503, HTTP/1.1 responses close
/// their connection and h2 connections are sent GOAWAY.
pub struct Draining {
    /// For the request path: one relaxed load per response.
    on: AtomicBool,
    /// For the h2 connections, which wait for it.
    tx: watch::Sender<bool>,
}

impl Default for Draining {
    fn default() -> Self {
        Draining {
            on: AtomicBool::new(false),
            tx: watch::channel(false).0,
        }
    }
}

impl Draining {
    pub fn start(&self) {
        self.on.store(true, Ordering::Relaxed);
        self.tx.send_replace(true);
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

thread_local! {
    /// The worker thread this is (0 outside the workers).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as worker `index`.
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

impl State {
    /// The backend pool of the worker thread this runs on.
    pub fn backends(&self) -> &BackendPool {
        &self.backends[WORKER.with(|w| w.get()) % self.backends.len()]
    }
}
