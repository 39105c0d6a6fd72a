//! GoRouter's registration protocol over NATS (SPEC §10).
//!
//! Subscribes `router.register` and `router.unregister`, answers `router.greet`, publishes
//! `router.start` on every (re)connection. Messages are applied in batches: each batch becomes one
//! new snapshot. Pruning of stale endpoints runs only while the connection is up.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use async_nats::{ConnectOptions, Event};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{Registration, RegistrationError, ValidRegistration};
use crate::config::{Config, NatsAuth};
use crate::metrics::RegistryLabels;
use crate::state::State;
use crate::xdp::SharedDenial;

/// Most messages applied as one snapshot.
const MAX_BATCH: usize = 4096;
/// Messages buffered per subscription.
const SUBSCRIPTION_CAPACITY: usize = 1 << 20;
/// The minimum register interval announced to route emitters.
const MINIMUM_REGISTER_INTERVAL_SECS: u64 = crate::config::DEFAULT_START_DELAY.as_secs();

/// The `router.start` / `router.greet` reply body.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StartMessage {
    pub id: String,
    pub hosts: Vec<String>,
    #[serde(rename = "minimumRegisterIntervalInSeconds")]
    pub minimum_register_interval_in_seconds: u64,
    #[serde(rename = "pruneThresholdInSeconds")]
    pub prune_threshold_in_seconds: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("nats.servers: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error("nats: cannot subscribe: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("{0}")]
    Tls(String),
}

enum Change {
    Register(ValidRegistration),
    Unregister(ValidRegistration),
}

/// Decodes a message body into a registration, or the `result` label of why it was refused.
/// Never panics, whatever the bytes (a fuzz target holds it to that).
pub fn decode_message(payload: &[u8]) -> Result<ValidRegistration, &'static str> {
    let raw: Registration = serde_json::from_slice(payload).map_err(|_| "invalid_json")?;
    ValidRegistration::try_from(raw).map_err(|e: RegistrationError| e.label())
}

/// The address other components reach this gateway on: the source address the kernel picks
/// toward the first NATS server, else the HTTPS listen address.
fn host_ip(config: &Config) -> IpAddr {
    let listen = config.listen.https.ip();
    let probe = config
        .nats
        .as_ref()
        .and_then(|n| n.servers.first())
        .and_then(|url| {
            let hostport = url.split("://").nth(1)?.split('/').next()?;
            let hostport = hostport.rsplit('@').next()?;
            let addr: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(hostport)
                .ok()?
                .next()?;
            let sock = UdpSocket::bind(if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            })
            .ok()?;
            sock.connect(addr).ok()?;
            sock.local_addr().ok().map(|a| a.ip())
        });
    probe.unwrap_or(listen)
}

/// Connects (retrying in the background when NATS is down) and runs the subscriber until the
/// process ends.
pub async fn start(state: Arc<State>) -> Result<(), NatsError> {
    let rt = state.runtime.load_full();
    let Some(nats) = rt.config.nats.clone() else {
        return Ok(());
    };
    let start_msg = StartMessage {
        id: format!("0-{}", uuid::Uuid::new_v4()),
        hosts: vec![host_ip(&rt.config).to_string()],
        minimum_register_interval_in_seconds: MINIMUM_REGISTER_INTERVAL_SECS,
        prune_threshold_in_seconds: rt.config.registry.droplet_stale_threshold.as_secs(),
    };
    let (events_tx, events) = mpsc::unbounded_channel();
    let options = ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .name("portcullis")
        // Room for a full re-registration burst from a large foundation before the server
        // would have to drop messages to a slow consumer.
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .event_callback(move |event| {
            let tx = events_tx.clone();
            async move {
                let _ = tx.send(event);
            }
        });
    // async-nats keeps why each server refused (a TLS failure, a refused connection) to itself
    // and logs it at debug; it hands the servers to this callback before each attempt.
    let said = Arc::new(std::sync::Mutex::new(Unreachable::default()));
    let options = options.reconnect_to_server_callback(move |servers, _| {
        let errors: Vec<String> = servers
            .iter()
            .filter_map(|s| Some(format!("{s}: {}", s.last_error.as_deref()?)))
            .collect();
        if let Ok(mut said) = said.lock() {
            said.report(errors);
        }
        std::future::ready(None)
    });
    let options = match nats.auth.clone() {
        None => options,
        Some(NatsAuth::UserPassword { user, password }) => {
            options.user_and_password(user, password)
        }
        Some(NatsAuth::Token(token)) => options.token(token),
    };
    let options = match &state.nats_tls {
        None => options,
        Some(live) => {
            let config = live
                .client_config()
                .map_err(|e| NatsError::Tls(format!("nats.tls: {e}")))?;
            options.require_tls(true).tls_client_config(config)
        }
    };
    let client = options.connect(nats.servers.clone()).await?;
    let register = client.subscribe("router.register").await?;
    let unregister = client.subscribe("router.unregister").await?;
    let greet = client.subscribe("router.greet").await?;
    let fleet = match (&state.xdp, nats.share_denials) {
        (Some(xdp), true) => {
            let sub = client.subscribe(DENY_SUBJECT).await?;
            let (tx, rx) = mpsc::unbounded_channel();
            xdp.share_to(tx);
            Some(Fleet { sub, learned: rx })
        }
        _ => None,
    };
    tracing::info!(servers = ?nats.servers, id = %start_msg.id, "registry subscribed to NATS");
    let subs = Subscriptions {
        register,
        unregister,
        greet,
        fleet,
    };
    tokio::spawn(run(state, client, subs, events, start_msg));
    Ok(())
}

/// Why the NATS servers could not be reached, said at warn when it changes and at most once a
/// minute while it lasts.
#[derive(Default)]
struct Unreachable {
    last: Vec<String>,
    at: Option<Instant>,
}

impl Unreachable {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(60);

    fn report(&mut self, errors: Vec<String>) {
        if errors.is_empty() {
            self.last.clear();
            return;
        }
        let due = self.at.is_none_or(|t| t.elapsed() >= Self::EVERY);
        if errors != self.last || due {
            tracing::warn!(
                errors = %errors.join("; "),
                "cannot connect to NATS; retrying (routes from NATS wait, and /health answers 503 while no server is connected)"
            );
            self.at = Some(Instant::now());
            self.last = errors;
        }
    }
}

/// The subject learned denials are shared on.
pub const DENY_SUBJECT: &str = "portcullis.deny";

/// A `portcullis.deny` message: a learned denial and the gateway that learned it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DenyMessage {
    pub origin: String,
    #[serde(flatten)]
    pub denial: SharedDenial,
}

/// Everything the registry task listens to.
struct Subscriptions {
    register: async_nats::Subscriber,
    unregister: async_nats::Subscriber,
    greet: async_nats::Subscriber,
    fleet: Option<Fleet>,
}

/// Fleet deny sharing: denials from other gateways in, this gateway's learned ones out.
struct Fleet {
    sub: async_nats::Subscriber,
    learned: mpsc::UnboundedReceiver<SharedDenial>,
}

async fn next_shared(sub: &mut Option<async_nats::Subscriber>) -> Option<Bytes> {
    match sub {
        Some(s) => s.next().await.map(|m| m.payload),
        None => std::future::pending().await,
    }
}

async fn next_learned(
    learned: &mut Option<mpsc::UnboundedReceiver<SharedDenial>>,
) -> Option<SharedDenial> {
    match learned {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn count_shared(state: &State, kind: &'static str) {
    state
        .metrics
        .xdp_deny_shared
        .get_or_create(&crate::metrics::KindLabels { kind })
        .inc();
}

async fn run(
    state: Arc<State>,
    client: async_nats::Client,
    subs: Subscriptions,
    mut events: mpsc::UnboundedReceiver<Event>,
    start_msg: StartMessage,
) {
    let Subscriptions {
        register,
        unregister,
        mut greet,
        fleet,
    } = subs;
    let (mut shared_in, mut learned_out) = match fleet {
        Some(f) => (Some(f.sub), Some(f.learned)),
        None => (None, None),
    };
    let start_body = Bytes::from(serde_json::to_vec(&start_msg).unwrap_or_default());
    let mut changes = futures_util::stream::select(
        register.map(|m| (true, m.payload)),
        unregister.map(|m| (false, m.payload)),
    );
    let prune_every = state.runtime.load().config.registry.prune_interval;
    let mut prune = tokio::time::interval(prune_every);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            Some((is_register, payload)) = changes.next() => {
                let mut batch = Vec::with_capacity(64);
                push(&state, &mut batch, is_register, &payload);
                // Everything already queued joins this batch: one snapshot per burst.
                while batch.len() < MAX_BATCH {
                    match futures_util::FutureExt::now_or_never(changes.next()) {
                        Some(Some((r, p))) => push(&state, &mut batch, r, &p),
                        _ => break,
                    }
                }
                apply(&state, batch);
            }
            Some(msg) = greet.next() => {
                if let Some(reply) = msg.reply {
                    if let Err(e) = client.publish(reply, start_body.clone()).await {
                        tracing::warn!(error = %e, "router.greet reply failed");
                    }
                }
            }
            Some(event) = events.recv() => match event {
                Event::Connected => {
                    // Route emitters answer router.start with every route they have: the
                    // first connection's routes are all in once they had `start_delay`.
                    let delay = state.runtime.load().config.registry.start_delay;
                    state.registry_loaded.get_or_init(|| Instant::now() + delay);
                    state.registry_connected.store(true, Ordering::Relaxed);
                    state.metrics.registry_connected.set(1);
                    if let Err(e) = client.publish("router.start", start_body.clone()).await {
                        tracing::warn!(error = %e, "router.start publish failed");
                    }
                    tracing::info!("NATS connected; router.start published");
                }
                Event::Disconnected => {
                    state.registry_connected.store(false, Ordering::Relaxed);
                    state.metrics.registry_connected.set(0);
                    tracing::warn!("NATS disconnected; pruning suspended");
                }
                Event::SlowConsumer(sid) => {
                    state.metrics.registry_messages.get_or_create(&RegistryLabels {
                        subject: format!("subscription {sid}"),
                        result: "slow_consumer",
                    }).inc();
                    tracing::warn!(sid, "NATS dropped messages: the registry is a slow consumer");
                }
                other => tracing::debug!(event = %other, "NATS event"),
            },
            _ = prune.tick() => {
                let connected = client.connection_state() == async_nats::connection::State::Connected;
                if connected {
                    let removed = state.registry.update(|s| s.prune(Instant::now()));
                    if removed > 0 {
                        tracing::info!(removed, "pruned stale endpoints");
                    }
                }
            }
            Some(payload) = next_shared(&mut shared_in) => {
                match serde_json::from_slice::<DenyMessage>(&payload) {
                    Ok(m) if m.origin == start_msg.id => {}
                    Ok(m) => {
                        let applied = state.xdp.as_ref().is_some_and(|x| x.apply_shared(&m.denial, &state.metrics));
                        count_shared(&state, if applied { "applied" } else { "ignored" });
                    }
                    Err(_) => count_shared(&state, "invalid"),
                }
            }
            Some(denial) = next_learned(&mut learned_out) => {
                let msg = DenyMessage { origin: start_msg.id.clone(), denial };
                match serde_json::to_vec(&msg) {
                    Ok(body) => {
                        if client.publish(DENY_SUBJECT, body.into()).await.is_ok() {
                            count_shared(&state, "sent");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "denial not shared"),
                }
            }
            else => return,
        }
    }
}

fn push(state: &State, batch: &mut Vec<Change>, is_register: bool, payload: &[u8]) {
    let subject = if is_register {
        "router.register"
    } else {
        "router.unregister"
    };
    let result = match decode_message(payload) {
        // Another isolation segment's route: never in this gateway's table (GoRouter's sharding).
        Ok(reg)
            if !state
                .runtime
                .load()
                .config
                .registry
                .sharding
                .serves(reg.raw.isolation_segment.as_deref()) =>
        {
            "not_in_shard"
        }
        Ok(reg) => {
            if is_register && !reg.policy.malformed.is_empty() {
                state
                    .metrics
                    .route_policy_malformed_sources
                    .inc_by(reg.policy.malformed.len() as u64);
            }
            if is_register {
                for problem in &reg.option_problems {
                    state
                        .metrics
                        .registry_option_problems
                        .get_or_create(&crate::metrics::OptionLabels {
                            option: problem.option(),
                        })
                        .inc();
                }
            }
            batch.push(if is_register {
                Change::Register(reg)
            } else {
                Change::Unregister(reg)
            });
            "ok"
        }
        Err(label) => label,
    };
    state
        .metrics
        .registry_messages
        .get_or_create(&RegistryLabels {
            subject: subject.to_string(),
            result,
        })
        .inc();
}

fn apply(state: &State, batch: Vec<Change>) {
    if batch.is_empty() {
        return;
    }
    let stale = state.runtime.load().config.registry.droplet_stale_threshold;
    let now = Instant::now();
    state.registry.update(|s| {
        for change in &batch {
            match change {
                Change::Register(r) => s.register(r, false, stale, now),
                Change::Unregister(r) => {
                    s.unregister(r);
                }
            }
        }
    });
}
