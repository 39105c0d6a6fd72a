//! The gate as the daemon runs it: attached to the configured interfaces, maps following every
//! config change, counters exported at each scrape.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::{XdpLink, XdpMode as AyaMode};
use portcullis_common::Counter;

use super::learn::{monotonic_ns, Learner};
use super::{addr_bytes, DomainIds, Gate, MapPlan, XdpError};
use crate::config::{Config, XdpMode, XdpReject};
use crate::metrics::{KindLabels, Metrics, XdpAttachLabels, XdpVerdictLabels};
use crate::names::DomainPattern;
use crate::routing::RouteTable;

/// The XDP object built by `cargo xtask build-ebpf`, embedded at compile time (empty if absent).
pub static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/portcullis-ebpf.o"));

/// A running gate, or (when the gate cannot be attached) its decisions taken by the daemon
/// alone: sources outside a domain's allow-list or denied on it are then refused after their
/// ClientHello instead of by the program before it (see [`XdpRuntime::refuses`]).
pub struct XdpRuntime {
    /// `None`: XDP was configured but is unavailable here.
    gate: Mutex<Option<Gate>>,
    /// Domain pattern per id, for metric labels (index 0 = no domain).
    names: Mutex<Vec<String>>,
    /// Domain id per pattern, kept by the next config ([`DomainIds`]).
    ids: Mutex<BTreeMap<String, u32>>,
    /// Counter values already exported.
    seen: Mutex<HashMap<(u32, Counter), u64>>,
    learner: Mutex<Learner>,
    /// Links pinned in bpffs: they keep the program attached across daemon restarts.
    links: Mutex<Vec<(String, PinnedLink)>>,
    /// Where learned denials go to be shared with the fleet (set when NATS sharing is on).
    share: Mutex<Option<tokio::sync::mpsc::UnboundedSender<SharedDenial>>>,
    /// What `registry_hosts` allow-lists were last written from.
    hosts: Mutex<HostsSeen>,
    /// Domains whose allow-list the gate does not check now (see [`XdpRuntime::note_ungated`]).
    ungated: Mutex<Vec<String>>,
    started: Instant,
}

/// The registry snapshot the `ALLOW` map last followed, and the addresses taken from it.
struct HostsSeen {
    table: Weak<RouteTable>,
    addresses: BTreeSet<IpAddr>,
    /// Whether stale entries have been removed since start (see [`XdpRuntime::follow_registry`]).
    pruned: bool,
}

fn uses_registry_hosts(config: &Config) -> bool {
    config
        .domains
        .iter()
        .any(|d| d.allowed_sources.as_ref().is_some_and(|a| a.registry_hosts))
}

/// A denial as shared over NATS: by domain pattern, since domain ids differ between gateways.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedDenial {
    pub domain: String,
    pub source: IpAddr,
    pub ttl_ms: u64,
}

/// Why [`XdpRuntime::refuses`] refuses a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Outside the domain's `allowed_sources`.
    NotAllowed,
    /// Denied on the domain by deny learning or the fleet.
    Denied,
}

/// A live denial, for `/xdp/denials`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Denial {
    pub domain: String,
    pub source: IpAddr,
    pub expires_in_ms: u64,
}

fn addr_ip(a: &portcullis_common::Addr) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Loads the gate from `object`, writes its maps from `config` (static routes standing in for the
/// registry) and attaches it to every configured interface with pinned links, so it stays in
/// force with no daemon running (`cargo xtask load`). A daemon started later takes over the same
/// pinned program, maps and links. Returns `(interface, mode)` per attachment.
pub fn load_pinned(
    config: &Config,
    object: &[u8],
) -> Result<Vec<(String, &'static str)>, XdpError> {
    let xdp = &config.xdp;
    if xdp.interfaces.is_empty() {
        return Err(XdpError::Interface(
            "(none configured in xdp.interfaces)".into(),
        ));
    }
    std::fs::create_dir_all(&xdp.pin_path).map_err(|source| XdpError::PinPath {
        path: xdp.pin_path.clone(),
        source,
    })?;
    let mut gate = Gate::load(object, &xdp.pin_path)?;
    let hosts: BTreeSet<IpAddr> = config
        .routes
        .iter()
        .filter_map(|r| r.host.parse().ok())
        .collect();
    let ids = DomainIds::assign(config, &gate.pinned_ids(config)?)?;
    let plan = MapPlan::with_ids(config, &ids, &hosts)?;
    gate.sync(&plan, true)?;
    if !plan.ungated.is_empty() {
        let domains = ungated_patterns(&plan, &ids.names());
        tracing::warn!(
            ?domains,
            "these domains' allow-lists do not fit in the XDP gate's ALLOW map: it passes their \
             ClientHellos"
        );
    }
    let mut attached = Vec::new();
    for iface in &xdp.interfaces {
        let (mode, pinned) = gate.attach(iface, xdp.mode, &xdp.pin_path)?;
        if pinned.is_none() {
            return Err(XdpError::Link(format!(
                "{iface}: the kernel attached the program without a bpf_link, which cannot be pinned; \
                 it would be detached when this process exits"
            )));
        }
        attached.push((iface.clone(), mode));
    }
    Ok(attached)
}

/// Detaches the gate from every configured interface and removes its pinned maps (learned
/// denials included) under `xdp.pin_path` (`cargo xtask unload`). Returns the interfaces it was
/// detached from.
pub fn unload_pinned(config: &Config) -> Result<Vec<String>, XdpError> {
    let xdp = &config.xdp;
    let mut detached = Vec::new();
    for iface in &xdp.interfaces {
        let pin = xdp.pin_path.join(format!("link-{iface}"));
        if let Ok(link) = PinnedLink::from_pin(&pin) {
            link.unpin()
                .map_err(|e| XdpError::Link(format!("{iface}: {e}")))?;
            detached.push(iface.clone());
        }
    }
    match std::fs::remove_dir_all(&xdp.pin_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(XdpError::PinPath {
                path: xdp.pin_path.clone(),
                source,
            })
        }
    }
    Ok(detached)
}

impl XdpRuntime {
    /// Loads, syncs and attaches per `config.xdp`. `Ok(None)` when no interface is configured.
    /// Every failure is returned; the caller logs it once and runs without XDP.
    ///
    /// `table` is the registry as it stands at start (static routes). With `registry_hosts`
    /// allow-lists, entries a previous daemon left in the pinned `ALLOW` map are kept until the
    /// registry has had `droplet_stale_threshold` to be re-announced, so a restart never turns
    /// away a caller that is still registered.
    pub fn start(
        config: &Config,
        table: &Arc<RouteTable>,
        metrics: &Metrics,
    ) -> Result<Option<XdpRuntime>, XdpError> {
        let xdp = &config.xdp;
        if xdp.interfaces.is_empty() {
            return Ok(None);
        }
        if OBJECT.is_empty() {
            return Err(XdpError::NotBuilt);
        }
        std::fs::create_dir_all(&xdp.pin_path).map_err(|source| XdpError::PinPath {
            path: xdp.pin_path.clone(),
            source,
        })?;
        let mut gate = Gate::load(OBJECT, &xdp.pin_path)?;
        let addresses = table.endpoint_addresses();
        let prune = !uses_registry_hosts(config);
        // Each domain keeps the id an earlier daemon gave it, with its denials.
        let ids = DomainIds::assign(config, &gate.pinned_ids(config)?)?;
        let plan = MapPlan::with_ids(config, &ids, &addresses)?;
        gate.sync(&plan, prune)?;
        // Denials an earlier daemon left in force are known to deny learning too, so the next
        // denial of such a source doubles on rather than starting again at `ttl`.
        let mut learner = Learner::new(xdp.deny_learning.clone());
        let (now_ns, now) = (monotonic_ns(), Instant::now());
        let pinned = gate.denials(now_ns).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the pinned denials; they are enforced by the gate only");
            Vec::new()
        });
        for (id, addr, expiry) in pinned {
            let left = std::time::Duration::from_nanos(expiry - now_ns);
            learner.restore(id, addr_ip(&addr), left, now);
        }
        let mut links = Vec::new();
        for iface in &xdp.interfaces {
            let (mode, pinned) = gate.attach(iface, xdp.mode, &xdp.pin_path)?;
            if let Some(p) = pinned {
                links.push((iface.clone(), p));
            }
            metrics
                .xdp_attached
                .get_or_create(&XdpAttachLabels {
                    interface: iface.clone(),
                    mode,
                })
                .set(1);
            tracing::info!(interface = %iface, mode, "XDP gate attached");
            if mode == "native"
                && xdp.reject == XdpReject::Reset
                && interface_driver(iface).as_deref() == Some("veth")
            {
                tracing::warn!(
                    interface = %iface,
                    "native XDP on a veth: the RSTs the gate sends back for rejected flows \
                     (XDP_TX) reach the other end only if it runs an XDP program too, and are \
                     dropped otherwise (those clients then wait for their own timeout); \
                     xdp.mode: skb sends them on a veth"
                );
            }
        }
        let runtime = XdpRuntime {
            gate: Mutex::new(Some(gate)),
            names: Mutex::new(ids.names()),
            ids: Mutex::new(ids.by_pattern()),
            seen: Mutex::default(),
            learner: Mutex::new(learner),
            links: Mutex::new(links),
            share: Mutex::new(None),
            hosts: Mutex::new(HostsSeen {
                table: Arc::downgrade(table),
                addresses,
                pruned: prune,
            }),
            ungated: Mutex::default(),
            started: Instant::now(),
        };
        runtime.note_ungated(&plan, &ids.names(), false, config);
        Ok(Some(runtime))
    }

    /// Deny learning without the gate, for a host where XDP is configured but cannot run (no
    /// privileges, no XDP object, no such interface): denials are learned, shared, listed and
    /// lifted as with the gate, and enforced by the daemon once it has read a ClientHello (see
    /// [`XdpRuntime::refuses`]); a denied source's kept-alive connections end as with the gate.
    pub fn without_gate(config: &Config) -> Result<XdpRuntime, XdpError> {
        let ids = DomainIds::assign(config, &BTreeMap::new())?;
        Ok(XdpRuntime {
            gate: Mutex::new(None),
            names: Mutex::new(ids.names()),
            ids: Mutex::new(ids.by_pattern()),
            seen: Mutex::default(),
            learner: Mutex::new(Learner::new(config.xdp.deny_learning.clone())),
            links: Mutex::default(),
            share: Mutex::new(None),
            hosts: Mutex::new(HostsSeen {
                table: Weak::new(),
                addresses: BTreeSet::new(),
                pruned: false,
            }),
            ungated: Mutex::default(),
            started: Instant::now(),
        })
    }

    /// Whether the XDP program is attached (rather than deny learning running on its own).
    pub fn attached(&self) -> bool {
        self.gate.lock().is_ok_and(|g| g.is_some())
    }

    /// A handshake failure or a 403 from `source` on `domain`; may learn a denial. Returns
    /// whether the source is denied on the domain now, by this failure or an earlier one: the
    /// gate stops its new connections, so a connection it still holds open (keep-alive) should
    /// end after this response rather than carry on being answered 403.
    pub fn failure(&self, domain: &DomainPattern, source: IpAddr, metrics: &Metrics) -> bool {
        let Some(id) = self.id_of(domain) else {
            return false;
        };
        let (ttl, denied) = match self.learner.lock() {
            Ok(mut l) => {
                let now = Instant::now();
                let ttl = l.failure(id, source, now);
                (ttl, l.denied(id, source, now))
            }
            Err(_) => return false,
        };
        let Some(ttl) = ttl else { return denied };
        let expiry = monotonic_ns().saturating_add(ttl.as_nanos() as u64);
        let written = self.gate.lock().map(|mut g| match g.as_mut() {
            Some(g) => g.deny(id, addr_bytes(source), expiry),
            None => Ok(()),
        });
        match written {
            Ok(Ok(())) => {
                tracing::info!(%source, domain = %domain, ttl = ?ttl, "learned denial");
                metrics.xdp_deny_learned.inc();
                if let Ok(Some(tx)) = self.share.lock().as_deref() {
                    let _ = tx.send(SharedDenial {
                        domain: domain.to_string(),
                        source,
                        ttl_ms: ttl.as_millis() as u64,
                    });
                }
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "learned denial not written");
                if let Ok(mut l) = self.learner.lock() {
                    l.unlearn(id, source);
                }
                false
            }
            Err(_) => false,
        }
    }

    /// The gate's decision, taken again by the daemon once it has read a ClientHello (which the
    /// program passes unread when it is split across segments, and never sees without the
    /// gate): whether `source` is outside `domain`'s `allowed_sources` or denied on it now
    /// (learned here, taken up from the pinned map at start, or shared by the fleet).
    pub fn refuses(
        &self,
        config: &Config,
        domain: &DomainPattern,
        source: IpAddr,
    ) -> Option<Refusal> {
        let allowed = config
            .domains
            .iter()
            .find(|d| d.pattern == *domain)
            .and_then(|d| d.allowed_sources.as_ref());
        if let Some(a) = allowed {
            let listed = a.cidrs.iter().any(|n| n.contains(&source));
            // Until the registry has settled after start (`droplet_stale_threshold`), every
            // source passes the hosts part, as the gate keeps its earlier hosts until then.
            let host = a.registry_hosts
                && self
                    .hosts
                    .lock()
                    .is_ok_and(|h| !h.pruned || h.addresses.contains(&source));
            if !listed && !host {
                return Some(Refusal::NotAllowed);
            }
        }
        let id = self.id_of(domain)?;
        self.learner
            .lock()
            .is_ok_and(|l| l.denied(id, source, Instant::now()))
            .then_some(Refusal::Denied)
    }

    /// The id of a configured domain (`None` for an unknown one).
    fn id_of(&self, domain: &DomainPattern) -> Option<u32> {
        self.id_named(&domain.to_string())
    }

    /// The id of the configured domain written `pattern` in the config.
    fn id_named(&self, pattern: &str) -> Option<u32> {
        let names = self.names.lock().ok()?;
        match names.iter().position(|n| n == pattern) {
            Some(i) if i > 0 => Some(i as u32),
            _ => None,
        }
    }

    /// Sends every denial learned from now on to `tx` (the NATS publisher).
    pub fn share_to(&self, tx: tokio::sync::mpsc::UnboundedSender<SharedDenial>) {
        if let Ok(mut s) = self.share.lock() {
            *s = Some(tx);
        }
    }

    /// Applies a denial another gateway learned, under this gateway's own domains and exempt
    /// rules: the gate stops the source's new connections, and the learner knows of it, so a
    /// connection the source already holds here ends on its next refusal. A `ttl_ms` of 0 is
    /// an operator's lift on another gateway: the denial is lifted here too. Returns whether it
    /// was applied.
    pub fn apply_shared(&self, d: &SharedDenial, metrics: &Metrics) -> bool {
        let Some(id) = self.id_named(&d.domain) else {
            return false;
        };
        // The learner keys sources as the listener reports them (IPv4, not `::ffff:a.b.c.d`).
        let source = d.source.to_canonical();
        if d.ttl_ms == 0 {
            return match self.lift_here(source, Some(&d.domain), "fleet", metrics) {
                Ok(lifted) => {
                    if !lifted.is_empty() {
                        let domain = &d.domain;
                        tracing::info!(%source, %domain, "denial lifted by the fleet");
                    }
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, "shared lift not applied");
                    false
                }
            };
        }
        if self
            .learner
            .lock()
            .map(|l| l.is_exempt(source))
            .unwrap_or(true)
        {
            return false;
        }
        let ttl_ns = d.ttl_ms.saturating_mul(1_000_000);
        let expiry = monotonic_ns().saturating_add(ttl_ns);
        let written = self.gate.lock().map(|mut g| match g.as_mut() {
            Some(g) => g.deny(id, addr_bytes(source), expiry),
            None => Ok(()),
        });
        match written {
            Ok(Ok(())) => {
                if let Ok(mut l) = self.learner.lock() {
                    let ttl = std::time::Duration::from_millis(d.ttl_ms);
                    l.denied_elsewhere(id, source, ttl, Instant::now());
                }
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "shared denial not written");
                false
            }
            Err(_) => false,
        }
    }

    /// Runs the loaded program on one frame through `BPF_PROG_TEST_RUN` (no traffic involved):
    /// the XDP action and the frame as the program left it. For diagnostics and tests.
    pub fn test_run(&self, frame: &[u8]) -> Result<(u32, Vec<u8>), XdpError> {
        match self.gate.lock().as_deref() {
            Ok(Some(g)) => g.test_run(frame),
            Ok(None) => Err(XdpError::NotAttached),
            Err(_) => Err(XdpError::Poisoned),
        }
    }

    /// The denials in force, by domain pattern.
    pub fn denials(&self) -> Vec<Denial> {
        self.denials_by_id().into_iter().map(|(_, d)| d).collect()
    }

    fn denials_by_id(&self) -> Vec<(u32, Denial)> {
        let now = monotonic_ns();
        let live = match self.gate.lock().as_deref_mut() {
            Ok(Some(g)) => g.denials(now).unwrap_or_default(),
            // Without the gate, deny learning's own record is the list.
            Ok(None) => match self.learner.lock() {
                Ok(l) => l
                    .denials(Instant::now())
                    .into_iter()
                    .map(|(id, source, left)| {
                        let expiry = now.saturating_add(left.as_nanos() as u64);
                        (id, addr_bytes(source), expiry)
                    })
                    .collect(),
                Err(_) => return Vec::new(),
            },
            Err(_) => return Vec::new(),
        };
        let names = self.names.lock().map(|n| n.clone()).unwrap_or_default();
        live.into_iter()
            .map(|(id, addr, expiry)| {
                let denial = Denial {
                    domain: names
                        .get(id as usize)
                        .cloned()
                        .unwrap_or_else(|| id.to_string()),
                    source: addr_ip(&addr),
                    expires_in_ms: (expiry - now) / 1_000_000,
                };
                (id, denial)
            })
            .collect()
    }

    /// Lifts the denials of `source` in force (on the domain with pattern `domain`, or on every
    /// domain): removes them from the gate and from deny learning, which counts that source
    /// afresh. For an operator undoing a denial. With fleet sharing on, the lift is shared too
    /// (a `portcullis.deny` message with `ttl_ms` 0 per domain), so the gateways that applied
    /// the denial lift it as well. Returns what was lifted here.
    pub fn lift(
        &self,
        source: IpAddr,
        domain: Option<&str>,
        metrics: &Metrics,
    ) -> Result<Vec<Denial>, XdpError> {
        let source = source.to_canonical();
        let lifted = self.lift_here(source, domain, "admin", metrics)?;
        if let Ok(Some(tx)) = self.share.lock().as_deref() {
            let names = self.names.lock().map(|n| n.clone()).unwrap_or_default();
            for name in names.into_iter().skip(1).filter(|n| n != "-") {
                if domain.is_none_or(|p| p == name) {
                    let _ = tx.send(SharedDenial {
                        domain: name,
                        source,
                        ttl_ms: 0,
                    });
                }
            }
        }
        Ok(lifted)
    }

    /// Whether `pattern` is a configured domain (as written in the config).
    pub fn has_domain(&self, pattern: &str) -> bool {
        // "-" (no domain, and ids no domain holds) is first, which `id_named` does not answer.
        self.id_named(pattern).is_some()
    }

    /// Lifts here; `by` (`admin` or `fleet`) labels the count of lifted denials.
    fn lift_here(
        &self,
        source: IpAddr,
        domain: Option<&str>,
        by: &'static str,
        metrics: &Metrics,
    ) -> Result<Vec<Denial>, XdpError> {
        let lifting = self
            .denials_by_id()
            .into_iter()
            .filter(|(_, d)| d.source == source && domain.is_none_or(|p| d.domain == p));
        let mut lifted = Vec::new();
        for (id, d) in lifting {
            // Without the gate the list came from the learner, which forgets it below.
            let removed = match self.gate.lock().map_err(|_| XdpError::Poisoned)?.as_mut() {
                Some(g) => g.undeny(id, addr_bytes(source))?,
                None => true,
            };
            if let Ok(mut l) = self.learner.lock() {
                l.forget(id, source);
            }
            if removed {
                tracing::info!(%source, domain = %d.domain, "denial lifted");
                metrics
                    .xdp_deny_lifted
                    .get_or_create(&KindLabels { kind: by })
                    .inc();
                lifted.push(d);
            }
        }
        Ok(lifted)
    }

    /// Removes expired denials from the map and forgets quiet sources; updates the gauge.
    pub fn sweep(&self, metrics: &Metrics) {
        let now = Instant::now();
        if let Ok(mut l) = self.learner.lock() {
            l.sweep(now);
        }
        match self.gate.lock().as_deref_mut() {
            Ok(Some(g)) => match g.sweep_denials(monotonic_ns()) {
                Ok(live) => {
                    metrics.xdp_deny_entries.set(live as i64);
                }
                Err(e) => tracing::warn!(error = %e, "cannot sweep the DENY map"),
            },
            // Without the gate, deny learning's own record is what is enforced.
            Ok(None) => {
                if let Ok(l) = self.learner.lock() {
                    metrics.xdp_deny_entries.set(l.denials(now).len() as i64);
                }
            }
            Err(_) => {}
        }
    }

    /// Detaches from every interface (unpins the links). Only on an operator's request: the
    /// default is to stay attached so a restart keeps protection.
    pub fn detach(&self) {
        let Ok(mut links) = self.links.lock() else {
            return;
        };
        for (iface, link) in links.drain(..) {
            match link.unpin() {
                Ok(fd) => {
                    drop(fd);
                    tracing::info!(interface = %iface, "XDP gate detached");
                }
                Err(e) => tracing::warn!(interface = %iface, error = %e, "cannot unpin XDP link"),
            }
        }
    }

    /// Brings the maps (and deny-learning settings) in line with a new config. Domains keep
    /// their ids, denials and counts; those of removed domains are forgotten.
    pub fn sync(&self, config: &Config) -> Result<(), XdpError> {
        let ids = {
            let previous = self.ids.lock().map_err(|_| XdpError::Poisoned)?;
            DomainIds::assign(config, &previous)?
        };
        let (plan, prune) = {
            let hosts = self.hosts.lock().map_err(|_| XdpError::Poisoned)?;
            let prune = hosts.pruned || !uses_registry_hosts(config);
            (MapPlan::with_ids(config, &ids, &hosts.addresses)?, prune)
        };
        if let Ok(mut l) = self.learner.lock() {
            l.set_settings(config.xdp.deny_learning.clone());
            l.retain_domains(|id| ids.kept(id));
        }
        let written = {
            let mut gate = self.gate.lock().map_err(|_| XdpError::Poisoned)?;
            let written = match gate.as_mut() {
                Some(gate) => gate.sync(&plan, prune),
                None => Ok(()),
            };
            // Under the gate's lock, as `export` reads: a fresh id's zeroed counters count anew.
            if let Ok(mut seen) = self.seen.lock() {
                seen.retain(|(id, _), _| !plan.fresh.contains(id));
            }
            written
        };
        // The gateway runs the new config whether or not the maps took it, and a failed sync
        // has written the new domains (without their allow-list flags) where it could: learned
        // denials go under the new ids from now on.
        let names = ids.names();
        self.note_written(&plan, &names, &written, config);
        if let Ok(mut n) = self.names.lock() {
            *n = names;
        }
        if let Ok(mut i) = self.ids.lock() {
            *i = ids.by_pattern();
        }
        written
    }

    /// After a [`Gate::sync`]: what the gate now checks, unless the sync was refused before
    /// writing anything (the maps are as they were).
    fn note_written(
        &self,
        plan: &MapPlan,
        names: &[String],
        written: &Result<(), XdpError>,
        config: &Config,
    ) {
        match written {
            Err(XdpError::TooManyPorts(_) | XdpError::AllowOverflow(_)) => {}
            other => self.note_ungated(plan, names, other.is_err(), config),
        }
    }

    /// Keeps the list of domains whose allow-list the gate does not check (the `ALLOW` map
    /// cannot hold it, or a sync failed and left every flag off), for the
    /// `portcullis_xdp_ungated_domains` gauge, and says so when it changes.
    fn note_ungated(&self, plan: &MapPlan, names: &[String], failed: bool, config: &Config) {
        if !self.attached() {
            return;
        }
        let now: Vec<String> = if failed {
            config
                .domains
                .iter()
                .filter(|d| d.allowed_sources.is_some())
                .map(|d| d.pattern.to_string())
                .collect()
        } else {
            ungated_patterns(plan, names)
        };
        let Ok(mut ungated) = self.ungated.lock() else {
            return;
        };
        if *ungated == now {
            return;
        }
        if now.is_empty() {
            tracing::info!("the XDP gate checks every allow-list again");
        } else if failed {
            tracing::error!(
                domains = ?now,
                "the XDP maps were not fully written: the gate checks no allow-list until the \
                 next successful sync; the daemon refuses callers from outside them after their \
                 ClientHello"
            );
        } else {
            tracing::warn!(
                domains = ?now,
                capacity = portcullis_common::ALLOW_ENTRIES,
                "these domains' allow-lists (with their registry hosts) do not fit in the XDP \
                 gate's ALLOW map: the gate passes their ClientHellos and the daemon refuses \
                 callers from outside the lists after reading them"
            );
        }
        *ungated = now;
    }

    /// Follows the registry for `registry_hosts` allow-lists: when the snapshot changed and its
    /// endpoint addresses differ from what the map holds, the map is rewritten. Called every
    /// second; costs a pointer comparison while the registry is quiet.
    pub fn follow_registry(
        &self,
        table: &Arc<RouteTable>,
        config: &Config,
    ) -> Result<(), XdpError> {
        if !uses_registry_hosts(config) {
            return Ok(());
        }
        let mut seen = self.hosts.lock().map_err(|_| XdpError::Poisoned)?;
        let grace_over = self.started.elapsed() >= config.registry.droplet_stale_threshold;
        let prune_now = grace_over && !seen.pruned;
        // A weak reference keeps the old snapshot's allocation, so its address cannot be reused
        // by a newer snapshot while we compare.
        if seen.table.as_ptr() == Arc::as_ptr(table) && !prune_now {
            return Ok(());
        }
        seen.table = Arc::downgrade(table);
        let addresses = table.endpoint_addresses();
        if addresses == seen.addresses && !prune_now {
            return Ok(());
        }
        // Without the gate only the addresses are followed (for `refuses`).
        if self.attached() {
            let ids = {
                let current = self.ids.lock().map_err(|_| XdpError::Poisoned)?;
                // Settled: only a config's own sync clears what fresh ids held.
                DomainIds::assign(config, &current)?.settled()
            };
            let plan = MapPlan::with_ids(config, &ids, &addresses)?;
            let written = match self.gate.lock().map_err(|_| XdpError::Poisoned)?.as_mut() {
                Some(g) => g.sync(&plan, grace_over),
                None => Ok(()),
            };
            let names = ids.names();
            self.note_written(&plan, &names, &written, config);
            written?;
        }
        tracing::debug!(
            addresses = addresses.len(),
            pruned = grace_over,
            "XDP allow-lists follow the registry"
        );
        seen.addresses = addresses;
        seen.pruned = grace_over;
        Ok(())
    }

    /// Adds what the kernel counted since the last call to the Prometheus counters.
    pub fn export(&self, metrics: &Metrics) {
        if let Ok(u) = self.ungated.lock() {
            metrics.xdp_ungated_domains.set(u.len() as i64);
        }
        let gate = self.gate.lock();
        let Ok(Some(gate)) = gate.as_deref() else {
            return;
        };
        let configured = self.names.lock().map(|n| n.len() as u32).unwrap_or(1);
        let counts = match gate.counters_up_to(configured.saturating_sub(1)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read XDP counters");
                return;
            }
        };
        let (Ok(names), Ok(mut seen)) = (self.names.lock(), self.seen.lock()) else {
            return;
        };
        for (domain, counter, value) in counts {
            let previous = seen.insert((domain, counter), value).unwrap_or(0);
            let delta = value.saturating_sub(previous);
            if delta == 0 {
                continue;
            }
            let domain_name = names
                .get(domain as usize)
                .cloned()
                .unwrap_or_else(|| "-".into());
            let (verdict, reason) = match counter {
                Counter::Pass => ("pass", "-"),
                Counter::RejectAllowlist => ("reject", "allowlist"),
                Counter::RejectDeny => ("reject", "deny"),
                Counter::RejectFlow => ("reject", "-"),
                other => {
                    metrics
                        .xdp_unparsed
                        .get_or_create(&KindLabels {
                            kind: unparsed_kind(other),
                        })
                        .inc_by(delta);
                    continue;
                }
            };
            metrics
                .xdp_verdicts
                .get_or_create(&XdpVerdictLabels {
                    domain: domain_name,
                    verdict,
                    reason,
                })
                .inc_by(delta);
        }
    }
}

/// The patterns of the domains `plan` leaves ungated, by `names` (pattern per id).
fn ungated_patterns(plan: &MapPlan, names: &[String]) -> Vec<String> {
    plan.ungated
        .iter()
        .filter_map(|id| names.get(*id as usize).cloned())
        .collect()
}

fn unparsed_kind(c: Counter) -> &'static str {
    match c {
        Counter::PassUnknownDomain => "unknown_domain",
        Counter::PassNoSni => "no_sni",
        Counter::PassSplit => "split",
        Counter::PassNotClientHello => "not_client_hello",
        Counter::PassUnparsed => "unparsed",
        Counter::PassIpUnparsed => "ip_unparsed",
        Counter::PassSniTooLong => "sni_too_long",
        Counter::PassProxyHeader => "proxy_header",
        _ => "other",
    }
}

impl Gate {
    /// Attaches to `iface`; `auto` tries native first, then generic. When a link pinned by an
    /// earlier run exists, the new program replaces the old one in it atomically (no moment
    /// without the gate). Returns the mode and the pinned link.
    pub fn attach(
        &mut self,
        iface: &str,
        mode: XdpMode,
        pin_dir: &Path,
    ) -> Result<(&'static str, Option<PinnedLink>), XdpError> {
        let name = CString::new(iface).map_err(|_| XdpError::Interface(iface.to_string()))?;
        let pin = pin_dir.join(format!("link-{iface}"));
        let prog: &mut aya::programs::Xdp = self
            .ebpf
            .program_mut(super::PROGRAM)
            .ok_or(XdpError::Missing(super::PROGRAM))?
            .try_into()?;
        if let Ok(existing) = PinnedLink::from_pin(&pin) {
            let fd = FdLink::from(existing);
            let link = XdpLink::try_from(fd).map_err(|e| XdpError::Link(e.to_string()))?;
            prog.attach_to_link(link)?;
            let again = PinnedLink::from_pin(&pin).map_err(|e| XdpError::Link(e.to_string()))?;
            return Ok(("pinned", Some(again)));
        }
        let attempts: &[(AyaMode, &'static str)] = match mode {
            XdpMode::Native => &[(AyaMode::Driver, "native")],
            XdpMode::Skb => &[(AyaMode::Skb, "skb")],
            XdpMode::Auto => &[(AyaMode::Driver, "native"), (AyaMode::Skb, "skb")],
        };
        let mut last = None;
        for (m, label) in attempts {
            match prog.attach(name.as_c_str(), *m) {
                Ok(id) => {
                    let link = prog.take_link(id)?;
                    // A bpf_link can be pinned; a legacy netlink attachment cannot, and is then
                    // detached when the daemon exits.
                    let pinned = match FdLink::try_from(link) {
                        Ok(fd) => Some(fd.pin(&pin).map_err(|e| XdpError::Link(e.to_string()))?),
                        Err(e) => {
                            tracing::warn!(interface = %iface, error = %e, "XDP link cannot be pinned; it ends with the daemon");
                            None
                        }
                    };
                    return Ok((label, pinned));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or(XdpError::Interface(iface.to_string()), XdpError::Program))
    }
}

/// The driver behind a network interface (`ethtool -i`), through the SIOCETHTOOL ioctl; `None`
/// when there is no such interface (in this network namespace) or it does not say.
pub fn interface_driver(iface: &str) -> Option<String> {
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut u8,
        _rest: [u8; 16],
    }
    // struct ethtool_drvinfo: cmd, then the driver name in 32 bytes, and more we do not read.
    let mut info = [0u8; 196];
    info[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: info.as_mut_ptr(),
        _rest: [0; 16],
    };
    let name = iface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    req.name[..name.len()].copy_from_slice(name);
    // SAFETY: a datagram socket only for the ioctl, closed below; `req` points at `info`, which
    // is as large as the kernel's struct ethtool_drvinfo, and both outlive the call.
    let ok = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let r = libc::ioctl(fd, SIOCETHTOOL, &mut req);
        libc::close(fd);
        r == 0
    };
    let driver = &info[4..36];
    let end = driver.iter().position(|b| *b == 0).unwrap_or(driver.len());
    ok.then(|| String::from_utf8_lossy(&driver[..end]).into_owned())
}

#[cfg(test)]
mod driver_tests {
    #[test]
    fn no_driver_for_an_interface_that_does_not_exist() {
        assert_eq!(super::interface_driver("no-such-if0"), None);
        assert_eq!(super::interface_driver("a-name-longer-than-ifnamsiz"), None);
    }
}
