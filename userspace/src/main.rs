//! The `portcullis` command line (SPEC §2). Exit codes: 0 success, 2 invalid input, 1 runtime
//! failure.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portcullis::config::{load_certs, Config};
use portcullis::gateway::Gateway;
use portcullis::registry::Registry;
use portcullis::tls::expiry;
use sd_notify::NotifyState;
use tracing_subscriber::EnvFilter;

/// jemalloc rather than glibc's malloc. A proxied request makes about 40 allocations, several
/// larger than glibc's per-thread cache takes (1,032 bytes, 7 per size), which then go through
/// its locked bins; jemalloc's thread caches take them all. Counted with callgrind it is 7–11%
/// fewer instructions per request (W1, W3).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (`_RJEM_MALLOC_CONF` in the environment overrides
/// them). A background thread returns pages left unused for a second to the kernel, whether or
/// not the gateway is busy (without it, jemalloc purges only from inside allocation calls, so an
/// idle gateway kept what a burst had freed). Measured with M (9,000 idle connections, then all
/// closed): 13.8–13.9 KiB per connection while open and 1.0 KiB still resident 5 s after they
/// closed; without the thread 15.0–15.5 and 9.1–10.1; jemalloc's defaults 15.6–16.3 while open;
/// glibc 14.5–15.2 and all of it kept. Instructions per request did not move.
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: MallocConf =
    MallocConf(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A C string jemalloc reads as its `malloc_conf` (a `const char *`).
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: it points to a constant, never written.
unsafe impl Sync for MallocConf {}

#[derive(Parser)]
#[command(name = "portcullis", version, about = "Identity-aware mTLS gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway. Without --config, run the self-contained demo on loopback.
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Demo only: HTTPS listen address.
        #[arg(long, default_value = "127.0.0.1:8443", conflicts_with = "config")]
        demo_listen: SocketAddr,
        /// Demo only: admin listen address.
        #[arg(long, default_value = "127.0.0.1:8082", conflicts_with = "config")]
        demo_admin: SocketAddr,
    },
    /// Validate a config file; exit 2 listing every problem.
    Check {
        #[arg(long)]
        config: PathBuf,
        /// Also refuse the config (exit 2) when a certificate has expired, is not valid yet or
        /// expires within 30 days, for pipelines that must not ship such files.
        #[arg(long)]
        strict: bool,
    },
    /// Show who may reach a route and, with a caller certificate, the decision.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["config", "admin"])))]
    Explain {
        /// Explain from a config file (static routes only).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Ask a running gateway's admin API instead (includes routes learned from NATS).
        #[arg(long, value_name = "URL")]
        admin: Option<String>,
        /// With --admin: the file holding the admin API's token (the gateway's admin.token_file).
        #[arg(long, value_name = "FILE", requires = "admin")]
        admin_token_file: Option<PathBuf>,
        /// With an https:// --admin: PEM file with the CA(s) of the admin API's certificate.
        #[arg(long, value_name = "FILE", requires = "admin")]
        admin_ca: Option<PathBuf>,
        /// With an https:// --admin that requires a client certificate: its PEM chain...
        #[arg(long, value_name = "FILE", requires_all = ["admin", "admin_key"])]
        admin_cert: Option<PathBuf>,
        /// ...and its private key.
        #[arg(long, value_name = "FILE", requires = "admin_cert")]
        admin_key: Option<PathBuf>,
        #[arg(long)]
        host: String,
        /// Request path, for routes registered with a path.
        #[arg(long, default_value = "/")]
        path: String,
        /// PEM file with the caller's certificate (leaf first, then intermediates).
        #[arg(long)]
        caller_cert: Option<PathBuf>,
    },
}

/// The log filter when `PORTCULLIS_LOG` is unset: the gateway's events from info up, rustls' only
/// at error. rustls warns about what a peer sent (an IP address as SNI, a warning alert, a message
/// out of order) once per connection, so at info any client could write to the operator's log at
/// the rate it connects; the handshake outcomes are counted in `portcullis_tls_handshakes_total`.
const DEFAULT_LOG: &str = "info,rustls=error";

/// The filter of the subscriber `init_tracing` installs, replaceable through the admin API.
struct Reloadable(tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>);

impl portcullis::logfilter::LogFilter for Reloadable {
    fn current(&self) -> String {
        self.0.with_current(|f| f.to_string()).unwrap_or_default()
    }

    fn check(&self, spec: &str) -> Result<String, String> {
        EnvFilter::try_new(spec)
            .map(|f| f.to_string())
            .map_err(|e| e.to_string())
    }

    fn set(&self, spec: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(spec).map_err(|e| e.to_string())?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }
}

fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{fmt, reload, Layer};
    let filter = match std::env::var("PORTCULLIS_LOG") {
        Ok(spec) => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            eprintln!("PORTCULLIS_LOG={spec:?} is not a log filter ({e}); using {DEFAULT_LOG:?}");
            EnvFilter::new(DEFAULT_LOG)
        }),
        Err(_) => EnvFilter::new(DEFAULT_LOG),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let format = std::env::var("PORTCULLIS_LOG_FORMAT");
    let lines = match format.as_deref() {
        // One JSON object per line, the event's fields beside `timestamp`, `level`, `target` and
        // `message`, for log pipelines.
        Ok("json") => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
        _ => fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .init();
    portcullis::logfilter::install(Box::new(Reloadable(handle)));
    if let Ok(other) = format.as_deref() {
        if other != "text" && other != "json" {
            tracing::warn!(
                "PORTCULLIS_LOG_FORMAT={other:?} is neither text nor json; writing text"
            );
        }
    }
}

fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("cannot start the runtime: {e}");
        ExitCode::from(1)
    })
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, strict } => match load(&config) {
            Ok(cfg) => {
                // Certificate dates do not make a config invalid (the gateway starts with them);
                // they are said so the operator replaces the files in time, and refused with
                // --strict.
                let now = expiry::unix_now();
                let findings = expiry::review(&cfg.certificate_validity, now);
                if strict && !findings.is_empty() {
                    eprintln!(
                        "{}: {} problem(s) (--strict: certificate dates):",
                        config.display(),
                        findings.len()
                    );
                    for (c, f) in findings {
                        eprintln!("  {}", expiry::describe(c, f));
                    }
                    return ExitCode::from(2);
                }
                for (c, f) in findings {
                    eprintln!("warning: {}", expiry::describe(c, f));
                }
                println!("{}: valid", config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Explain {
            config,
            admin,
            admin_token_file,
            admin_ca,
            admin_cert,
            admin_key,
            host,
            path,
            caller_cert,
        } => match (config, admin) {
            (Some(config), _) => explain(&config, &host, &path, caller_cert.as_deref()),
            (None, Some(admin)) => explain_remote(
                &admin,
                &AdminFiles {
                    token: admin_token_file.as_deref(),
                    ca: admin_ca.as_deref(),
                    cert: admin_cert.as_deref().zip(admin_key.as_deref()),
                },
                &host,
                &path,
                caller_cert.as_deref(),
            ),
            (None, None) => ExitCode::from(2),
        },
        Command::Run {
            config,
            demo_listen,
            demo_admin,
        } => {
            init_tracing();
            let rt = match runtime(tokio::runtime::Builder::new_multi_thread()) {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            rt.block_on(run(config, demo_listen, demo_admin))
        }
    }
}

fn explain(config: &Path, host: &str, path: &str, caller: Option<&Path>) -> ExitCode {
    let cfg = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let chain = match caller {
        None => None,
        Some(p) => match load_certs(Path::new("."), &p.to_string_lossy()) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("--caller-cert: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let registry = Registry::new(Default::default());
    registry.replace_static(&cfg.routes, cfg.registry.droplet_stale_threshold);
    match portcullis::explain::explain(&cfg, &registry.table(), host, path, chain.as_deref()) {
        Ok(e) => {
            print!("{e}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", config.display());
            ExitCode::from(2)
        }
    }
}

/// The files `explain --admin` reads to reach the admin API.
struct AdminFiles<'a> {
    token: Option<&'a Path>,
    ca: Option<&'a Path>,
    /// Client certificate chain and key.
    cert: Option<(&'a Path, &'a Path)>,
}

fn explain_remote(
    admin: &str,
    files: &AdminFiles<'_>,
    host: &str,
    path: &str,
    caller: Option<&Path>,
) -> ExitCode {
    let token = match files.token.map(portcullis::config::read_token) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            eprintln!("--admin-token-file: {e}");
            return ExitCode::from(2);
        }
    };
    let ca = match files.ca {
        None => None,
        Some(p) => match load_certs(Path::new("."), &p.to_string_lossy()) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("--admin-ca: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let client = match files.cert {
        None => None,
        Some((chain, key)) => match portcullis::config::load_certified_key(
            Path::new("."),
            &chain.to_string_lossy(),
            &key.to_string_lossy(),
        ) {
            Ok(c) => Some(c.key),
            Err((field, e)) => {
                let flag = if field == "cert_chain" {
                    "--admin-cert"
                } else {
                    "--admin-key"
                };
                eprintln!("{flag}: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let access = portcullis::explain::AdminAccess {
        url: admin,
        token: token.as_deref(),
        ca,
        client,
    };
    let pem = match caller.map(std::fs::read) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => {
            eprintln!(
                "--caller-cert: cannot read '{}': {e}",
                caller
                    .map(Path::display)
                    .map(|d| d.to_string())
                    .unwrap_or_default()
            );
            return ExitCode::from(2);
        }
    };
    let rt = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(portcullis::explain::fetch(&access, host, path, pem)) {
        Ok(e) => {
            print!("{e}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(if e.is_input_error() { 2 } else { 1 })
        }
    }
}

async fn run(config: Option<PathBuf>, demo_listen: SocketAddr, demo_admin: SocketAddr) -> ExitCode {
    // Before anything else: until a handler is installed, SIGHUP and SIGTERM kill the process
    // (their default action), so a `systemctl reload` or stop that arrives while the gateway
    // starts would end it uncleanly. Installed here, a signal received during start-up is acted
    // on once the gateway serves.
    use tokio::signal::unix::{signal, SignalKind};
    let signals = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined1()),
    );
    let (Ok(mut hup), Ok(mut term), Ok(mut int), Ok(mut usr1)) = signals else {
        eprintln!("cannot install signal handlers");
        return ExitCode::from(1);
    };
    let (cfg, demo) = match &config {
        Some(path) => match load(path) {
            Ok(c) => (c, None),
            Err(code) => return code,
        },
        None => match portcullis::demo::prepare(demo_listen, demo_admin).await {
            Ok(d) => (d.config.clone(), Some(d)),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        },
    };
    let gateway = match Gateway::start(cfg).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{e}");
            if demo.is_some() {
                eprintln!("hint: choose free ports with --demo-listen 127.0.0.1:0 --demo-admin 127.0.0.1:0");
            }
            return ExitCode::from(1);
        }
    };
    if let Some(d) = &demo {
        eprintln!(
            "{}",
            portcullis::demo::instructions(&d.dir, gateway.https_addr(), gateway.admin_addr())
        );
    }
    tell_service_manager(&[NotifyState::Ready, NotifyState::Status("serving")]);
    // `WatchdogSec=` in the unit: fed from a thread of its own while every event loop runs.
    // It feeds through the drain too, and ends with the process.
    if let Some(period) = sd_notify::watchdog_enabled() {
        let state = gateway.state().clone();
        match portcullis::liveness::feed_watchdog(period, move || {
            state
                .liveness
                .stalled(portcullis::liveness::STALL)
                .is_empty()
        }) {
            Ok(_) => tracing::info!(
                period_s = period.as_secs_f64(),
                "feeding the systemd watchdog while every event loop runs"
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the watchdog thread; systemd will end the gateway after WatchdogSec")
            }
        }
    }
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let Some(path) = &config else {
                    tracing::info!("SIGHUP: the demo has no config file to reload");
                    continue;
                };
                let mut reloading = vec![NotifyState::Reloading];
                reloading.extend(NotifyState::monotonic_usec_now());
                tell_service_manager(&reloading);
                let failed = match Config::load(path) {
                    Ok(c) => gateway.reload(c).err().map(|e| e.to_string()),
                    Err(e) => Some(e.to_string()),
                };
                let status = match failed {
                    None => "serving; configuration reloaded".to_string(),
                    Some(e) => {
                        tracing::error!(error = %e, "reload failed; keeping the running configuration");
                        // A SIGHUP may be a log rotation's (SPEC: the access log is reopened on
                        // SIGHUP): the log moves on to a new file even when the config file on
                        // disk is broken, at the running configuration's path.
                        reopen_access_log(&gateway, "SIGHUP");
                        // One line: the notification protocol separates its fields by newlines.
                        let e = e.split_whitespace().collect::<Vec<_>>().join(" ");
                        format!("serving; the last reload failed, the running configuration kept: {e}")
                    }
                };
                tell_service_manager(&[NotifyState::Ready, NotifyState::Status(&status)]);
            }
            _ = usr1.recv() => reopen_access_log(&gateway, "SIGUSR1"),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("shutting down");
    tell_service_manager(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    // Each further SIGTERM or Ctrl-C cuts the current drain step short.
    let (hurry, asked) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = term.recv() => {}
                Some(()) = int.recv() => {}
            }
            if hurry.send(()).is_err() {
                return;
            }
        }
    });
    gateway.drain(asked).await;
    if let Some(d) = demo {
        let _ = std::fs::remove_dir_all(&d.dir);
    }
    ExitCode::SUCCESS
}

/// Reopens the access log at the running configuration's path (a rotation's SIGUSR1, or a SIGHUP
/// whose reload failed) and says so, naming the signal.
fn reopen_access_log(gateway: &Gateway, signal: &str) {
    match gateway.reopen_access_log() {
        Ok(()) => {
            tracing::info!("{signal}: access log reopened at the running configuration's path")
        }
        Err(e) => tracing::error!(
            error = %e,
            "{signal}: access log not reopened; writing on to the file already open"
        ),
    }
}

/// Tells systemd (`Type=notify`) where the gateway is: ready once it serves, reloading while it
/// rereads its config, stopping while it drains. Nothing without `NOTIFY_SOCKET`.
fn tell_service_manager(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}
