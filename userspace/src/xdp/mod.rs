//! The daemon's side of the XDP SNI gate (SPEC §11): loading the program, deriving its maps from
//! the config, reading its counters.
//!
//! The maps are pinned (by name) under a directory in bpffs, so a restarted daemon finds the
//! program's state, including learned denials, where it left it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use portcullis_common::{
    maps, name_hash, v4_mapped, Addr, AllowKey, Counter, DenyKey, DomainEntry, ALLOW_ENTRIES,
    BALANCER_ENTRIES, COUNTERS_PER_DOMAIN, DOMAIN_HAS_ALLOWLIST, MAX_DOMAINS, PORT_ENTRIES,
    REJECT_DROP, REJECT_RESET,
};

use crate::config::{Config, XdpReject};
use crate::names::DomainPattern;

mod learn;
mod runtime;
pub mod twin;
pub use learn::{monotonic_ns, Learner};
pub use runtime::{
    interface_driver, load_pinned, unload_pinned, Denial, Refusal, SharedDenial, XdpRuntime, OBJECT,
};

/// The program's name in the object.
pub const PROGRAM: &str = "sni_gate";

/// Why the gate could not be loaded or updated.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("cannot load the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    #[error("XDP map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("the XDP object has no map or program named {0}")]
    Missing(&'static str),
    #[error("more than {MAX_DOMAINS} domains")]
    TooManyDomains,
    #[error("{0} ports to inspect; the gate's PORTS map holds {PORT_ENTRIES}")]
    TooManyPorts(usize),
    #[error(
        "{0} load balancers in listen.proxy_protocol.from; the gate's BALANCERS map holds \
         {BALANCER_ENTRIES}"
    )]
    TooManyBalancers(usize),
    #[error("{0} allow-list entries; the gate's ALLOW map holds {ALLOW_ENTRIES}")]
    AllowOverflow(usize),
    #[error("this binary was built without the XDP object (run `cargo xtask build`)")]
    NotBuilt,
    #[error("xdp.pin_path: cannot create '{}': {source}", path.display())]
    PinPath {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("xdp.interfaces: '{0}' is not a valid interface")]
    Interface(String),
    #[error("XDP link: {0}")]
    Link(String),
    #[error("XDP state lock poisoned by an earlier panic")]
    Poisoned,
    #[error("the XDP gate is not attached")]
    NotAttached,
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> XdpError {
    move |source| XdpError::Map { map, source }
}

/// A source address in the maps' 16-byte form.
pub fn addr_bytes(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The domain ids the maps key on (`DOMAINS` values, `ALLOW`, `DENY`, the counters), one per
/// configured domain.
///
/// A domain keeps its id for as long as it is configured, across reloads and across restarts
/// (the id is read back from the pinned `DOMAINS` map), so a learned denial, a kept allow-list
/// entry or a counter stays with the domain it belongs to when a config inserts, removes or
/// reorders domains. A new domain takes the lowest free id; whatever the maps still hold under
/// that id belonged to a domain that is gone, and the next sync removes it (`fresh`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DomainIds {
    /// Pattern and id per `config.domains` index.
    domains: Vec<(String, u32)>,
    /// Ids given to a domain that did not hold them before.
    fresh: Vec<u32>,
}

impl DomainIds {
    /// Ids by position in `config.domains`, from 1, for maps that hold nothing yet.
    pub fn positional(config: &Config) -> Result<DomainIds, XdpError> {
        Ok(DomainIds::assign(config, &BTreeMap::new())?.settled())
    }

    /// Ids for `config`, keeping each domain's id in `previous` (by pattern, as written in the
    /// config).
    pub fn assign(
        config: &Config,
        previous: &BTreeMap<String, u32>,
    ) -> Result<DomainIds, XdpError> {
        if config.domains.len() > MAX_DOMAINS as usize {
            return Err(XdpError::TooManyDomains);
        }
        Ok(DomainIds::assign_patterns(
            config.domains.iter().map(|d| d.pattern.to_string()),
            previous,
        ))
    }

    fn assign_patterns(
        patterns: impl Iterator<Item = String>,
        previous: &BTreeMap<String, u32>,
    ) -> DomainIds {
        let mut taken = BTreeSet::new();
        let mut domains: Vec<(String, u32)> = patterns
            .map(|p| match previous.get(&p) {
                Some(&id) if (1..=MAX_DOMAINS).contains(&id) && taken.insert(id) => (p, id),
                _ => (p, 0),
            })
            .collect();
        let mut fresh = Vec::new();
        let mut next = 1;
        for (_, id) in domains.iter_mut().filter(|(_, id)| *id == 0) {
            while taken.contains(&next) {
                next += 1;
            }
            *id = next;
            taken.insert(next);
            fresh.push(next);
        }
        DomainIds { domains, fresh }
    }

    /// The same ids with nothing left to clear (once a sync has cleared it).
    pub fn settled(self) -> DomainIds {
        DomainIds {
            fresh: Vec::new(),
            ..self
        }
    }

    /// Whether `id` belongs to a configured domain that held it before this assignment.
    pub fn kept(&self, id: u32) -> bool {
        self.domains.iter().any(|(_, i)| *i == id) && !self.fresh.contains(&id)
    }

    /// Pattern → id, the `previous` of the next assignment.
    pub fn by_pattern(&self) -> BTreeMap<String, u32> {
        self.domains.iter().cloned().collect()
    }

    /// Domain pattern per id (index 0 and unused ids: "-"), for metric labels and lookups.
    pub fn names(&self) -> Vec<String> {
        let top = self.domains.iter().map(|(_, id)| *id).max().unwrap_or(0) as usize;
        let mut names = vec!["-".to_string(); top + 1];
        for (pattern, id) in &self.domains {
            names[*id as usize] = pattern.clone();
        }
        names
    }
}

/// Everything the maps should hold for one config (and, later, one registry snapshot).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MapPlan {
    pub domains: Vec<(u64, DomainEntry)>,
    /// `(prefix_len, key)` for the `ALLOW` trie.
    pub allow: Vec<(u32, AllowKey)>,
    pub ports: Vec<u16>,
    pub reject: u32,
    /// Domain ids whose `DENY` and kept `ALLOW` entries belong to a domain that is gone
    /// ([`DomainIds`]); ids no domain has are cleared as well.
    pub fresh: Vec<u32>,
    /// Domains with an allow-list the `ALLOW` map cannot hold (registry hosts beyond its
    /// capacity; see [`MapPlan::fit_allow`]): the gate passes their ClientHellos and the daemon
    /// applies the allow-list after reading them.
    pub ungated: Vec<u32>,
    /// `(prefix_len, address)` for the `BALANCERS` trie: `listen.proxy_protocol.from`.
    pub balancers: Vec<(u32, Addr)>,
}

impl MapPlan {
    /// Domain ids are positions in `config.domains`, from 1 (maps with no history; see
    /// [`MapPlan::with_ids`]). `registry_hosts` are the registry's endpoint addresses, allowed on
    /// domains whose allow-list says `registry_hosts: true`.
    pub fn from_config(
        config: &Config,
        registry_hosts: &BTreeSet<IpAddr>,
    ) -> Result<MapPlan, XdpError> {
        MapPlan::with_ids(config, &DomainIds::positional(config)?, registry_hosts)
    }

    /// The plan for `config` with its domains under `ids`.
    pub fn with_ids(
        config: &Config,
        ids: &DomainIds,
        registry_hosts: &BTreeSet<IpAddr>,
    ) -> Result<MapPlan, XdpError> {
        // `ids` came from `DomainIds::assign` on this config, which bounds their number.
        debug_assert_eq!(ids.domains.len(), config.domains.len());
        let mut entries: std::collections::BTreeMap<u64, DomainEntry> = Default::default();
        let mut allow = Vec::new();
        for (d, &(_, id)) in config.domains.iter().zip(&ids.domains) {
            let flags = if d.allowed_sources.is_some() {
                DOMAIN_HAS_ALLOWLIST
            } else {
                0
            };
            let (key, exact) = domain_key(&d.pattern);
            let e = entries.entry(key).or_default();
            if exact {
                (e.exact_id, e.exact_flags) = (id, flags);
            } else {
                (e.wildcard_id, e.wildcard_flags) = (id, flags);
            }
            let Some(sources) = &d.allowed_sources else {
                continue;
            };
            for net in &sources.cidrs {
                allow.push(allow_entry(id, net));
            }
            if sources.registry_hosts {
                for ip in registry_hosts {
                    allow.push(allow_entry(id, &IpNet::from(*ip)));
                }
            }
        }
        let mut plan = MapPlan {
            domains: entries.into_iter().collect(),
            allow,
            ports: config.xdp.ports.clone(),
            reject: match config.xdp.reject {
                XdpReject::Reset => REJECT_RESET,
                XdpReject::Drop => REJECT_DROP,
            },
            fresh: ids.fresh.clone(),
            ungated: Vec::new(),
            // A set: the same network named twice is one entry.
            balancers: config
                .listen
                .proxy_protocol_from
                .iter()
                .map(balancer_entry)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        };
        plan.fit_allow(ALLOW_ENTRIES as usize);
        Ok(plan)
    }

    /// Makes `allow` hold each entry once and at most `capacity` entries. When the allow-lists
    /// hold more (config validation bounds the CIDRs, so only registry hosts can get there),
    /// whole domains are left out, in config order from the first that does not fit, and lose
    /// their allow-list flag: half an allow-list would make the gate turn away callers it
    /// allows. Those domains are listed in `ungated`; the daemon still refuses their callers
    /// from outside the list once it has read the ClientHello ([`XdpRuntime::refuses`]).
    pub fn fit_allow(&mut self, capacity: usize) {
        let mut seen = BTreeSet::new();
        self.allow
            .retain(|(len, k)| seen.insert((k.domain_be, *len, k.addr)));
        if self.allow.len() <= capacity {
            return;
        }
        // Entries per domain, in the order the domains come in the config (`with_ids` pushes
        // them domain by domain).
        let mut per_domain: Vec<(u32, usize)> = Vec::new();
        for (_, k) in &self.allow {
            let id = u32::from_be_bytes(k.domain_be);
            match per_domain.last_mut() {
                Some((last, n)) if *last == id => *n += 1,
                _ => per_domain.push((id, 1)),
            }
        }
        let mut room = capacity;
        for (id, n) in per_domain {
            if n <= room {
                room -= n;
            } else {
                self.ungated.push(id);
            }
        }
        let ungated = &self.ungated;
        self.allow
            .retain(|(_, k)| !ungated.contains(&u32::from_be_bytes(k.domain_be)));
        for (_, e) in &mut self.domains {
            if ungated.contains(&e.exact_id) {
                e.exact_flags &= !DOMAIN_HAS_ALLOWLIST;
            }
            if ungated.contains(&e.wildcard_id) {
                e.wildcard_flags &= !DOMAIN_HAS_ALLOWLIST;
            }
        }
    }
}

/// A domain's `DOMAINS` key (the hash of its exact name, or of a wildcard's suffix) and whether
/// it is the entry's exact half.
fn domain_key(pattern: &DomainPattern) -> (u64, bool) {
    match pattern {
        DomainPattern::Exact(name) => (name_hash(name.as_bytes()), true),
        DomainPattern::Wildcard(suffix) => (name_hash(suffix.as_bytes()), false),
    }
}

/// A `DOMAINS` entry as the first pass of [`Gate::sync`] writes it: each half keeps its
/// allow-list flag only where `current` (the map's entry under the same key) has the same id
/// with the flag set already, so the gate never checks an allow-list whose entries may not all
/// be in `ALLOW` yet.
fn loosened(planned: &DomainEntry, current: Option<&DomainEntry>, fresh: &[u32]) -> DomainEntry {
    let current = current.copied().unwrap_or_default();
    let keep = |id: u32, flags: u32, was_id: u32, was_flags: u32| {
        let enforced = id != 0
            && id == was_id
            && was_flags & DOMAIN_HAS_ALLOWLIST != 0
            && !fresh.contains(&id);
        if enforced {
            flags
        } else {
            flags & !DOMAIN_HAS_ALLOWLIST
        }
    };
    DomainEntry {
        exact_flags: keep(
            planned.exact_id,
            planned.exact_flags,
            current.exact_id,
            current.exact_flags,
        ),
        wildcard_flags: keep(
            planned.wildcard_id,
            planned.wildcard_flags,
            current.wildcard_id,
            current.wildcard_flags,
        ),
        ..*planned
    }
}

/// The `ALLOW` trie entry for a domain and a CIDR: `prefix_len = 32 + address bits` (IPv4 bits
/// count from the `::ffff:0:0/96` mapping).
pub fn allow_entry(domain: u32, net: &IpNet) -> (u32, AllowKey) {
    let (addr, bits) = match net {
        IpNet::V4(n) => (v4_mapped(n.network().octets()), 96 + n.prefix_len() as u32),
        IpNet::V6(n) => (n.network().octets(), n.prefix_len() as u32),
    };
    (
        32 + bits,
        AllowKey {
            domain_be: domain.to_be_bytes(),
            addr,
        },
    )
}

/// The `BALANCERS` trie entry for a CIDR (IPv4 bits count from the `::ffff:0:0/96` mapping).
pub fn balancer_entry(net: &IpNet) -> (u32, Addr) {
    match net {
        IpNet::V4(n) => (96 + n.prefix_len() as u32, v4_mapped(n.network().octets())),
        IpNet::V6(n) => (n.prefix_len() as u32, n.network().octets()),
    }
}

/// The loaded program and its maps.
pub struct Gate {
    ebpf: Ebpf,
}

impl Gate {
    /// Loads (not attaches) the program from an object, with its maps pinned in `pin_dir`
    /// (reused when already there).
    pub fn load(object: &[u8], pin_dir: &Path) -> Result<Gate, XdpError> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(object)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or(XdpError::Missing(PROGRAM))?
            .try_into()?;
        prog.load()?;
        Ok(Gate { ebpf })
    }

    fn program(&self) -> Result<&Xdp, XdpError> {
        Ok(self
            .ebpf
            .program(PROGRAM)
            .ok_or(XdpError::Missing(PROGRAM))?
            .try_into()?)
    }

    /// How many instructions the kernel's verifier processed to load the program (its budget is
    /// 1,000,000); `None` where the kernel does not say (before 5.16).
    pub fn verified_instructions(&self) -> Result<Option<u32>, XdpError> {
        Ok(self.program()?.info()?.verified_instruction_count())
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, XdpError> {
        self.ebpf.map_mut(name).ok_or(XdpError::Missing(name))
    }

    /// The ids the pinned `DOMAINS` map gives `config`'s domains (written by an earlier daemon or
    /// `cargo xtask load`), by pattern; domains it does not hold are absent.
    pub fn pinned_ids(&mut self, config: &Config) -> Result<BTreeMap<String, u32>, XdpError> {
        let domains: HashMap<&mut MapData, u64, DomainEntry> =
            HashMap::try_from(self.map_mut(maps::DOMAINS)?).map_err(map_err(maps::DOMAINS))?;
        let mut out = BTreeMap::new();
        for d in &config.domains {
            let (key, exact) = domain_key(&d.pattern);
            let Ok(e) = domains.get(&key, 0) else {
                continue;
            };
            let id = if exact { e.exact_id } else { e.wildcard_id };
            if id != 0 {
                out.insert(d.pattern.to_string(), id);
            }
        }
        Ok(out)
    }

    /// Makes `DOMAINS`, `ALLOW`, `PORTS` and `SETTINGS` hold exactly what `plan` says; with
    /// `prune_allow` false, `ALLOW` entries not in the plan are kept (only added to) unless
    /// their domain id is gone or fresh, or keeping them would overfill the map. `DENY` entries
    /// under an id that is gone (its domain was in `DOMAINS` and is not in the plan) or fresh
    /// are removed: they were learned for another domain; a fresh id's counters are zeroed.
    ///
    /// The gate runs on while the maps change, so they change in an order that never turns
    /// away a caller both the old and the new state allow: a domain's allow-list flag is set
    /// only once its `ALLOW` entries are in. If a write fails halfway, every planned domain is
    /// written without its flag (the daemon applies the allow-lists itself meanwhile; see
    /// [`XdpRuntime::refuses`]) and the error is returned. A plan beyond the maps' sizes (which
    /// config validation and [`MapPlan::fit_allow`] rule out) is refused before any write.
    pub fn sync(&mut self, plan: &MapPlan, prune_allow: bool) -> Result<(), XdpError> {
        let distinct_ports: BTreeSet<u16> = plan.ports.iter().copied().collect();
        if distinct_ports.len() > PORT_ENTRIES as usize {
            return Err(XdpError::TooManyPorts(distinct_ports.len()));
        }
        if plan.balancers.len() > BALANCER_ENTRIES as usize {
            return Err(XdpError::TooManyBalancers(plan.balancers.len()));
        }
        if plan.allow.len() > ALLOW_ENTRIES as usize {
            return Err(XdpError::AllowOverflow(plan.allow.len()));
        }
        let result = self.write_plan(plan, prune_allow);
        if result.is_err() {
            let open = plan.domains.iter().map(|(h, e)| {
                let mut e = *e;
                e.exact_flags &= !DOMAIN_HAS_ALLOWLIST;
                e.wildcard_flags &= !DOMAIN_HAS_ALLOWLIST;
                (*h, e)
            });
            if let Err(e) = self.write_domains(open) {
                tracing::error!(error = %e, "XDP DOMAINS map: cannot clear the allow-list flags after a failed sync");
            }
        }
        result
    }

    fn write_domains(
        &mut self,
        entries: impl Iterator<Item = (u64, DomainEntry)>,
    ) -> Result<(), XdpError> {
        let mut domains: HashMap<&mut MapData, u64, DomainEntry> =
            HashMap::try_from(self.map_mut(maps::DOMAINS)?).map_err(map_err(maps::DOMAINS))?;
        for (h, e) in entries {
            domains.insert(&h, &e, 0).map_err(map_err(maps::DOMAINS))?;
        }
        Ok(())
    }

    fn write_plan(&mut self, plan: &MapPlan, prune_allow: bool) -> Result<(), XdpError> {
        {
            // First: until a new balancer is in, the gate judges its clients' ClientHellos as
            // the balancer's own.
            let mut balancers: LpmTrie<&mut MapData, Addr, u8> =
                LpmTrie::try_from(self.map_mut(maps::BALANCERS)?)
                    .map_err(map_err(maps::BALANCERS))?;
            let stale: Vec<Key<Addr>> = balancers
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !plan.balancers.contains(&(k.prefix_len(), k.data())))
                .collect();
            for k in stale {
                balancers.remove(&k).map_err(map_err(maps::BALANCERS))?;
            }
            for (len, addr) in &plan.balancers {
                balancers
                    .insert(&Key::new(*len, *addr), &1, 0)
                    .map_err(map_err(maps::BALANCERS))?;
            }
        }
        let live: BTreeSet<u32> = plan
            .domains
            .iter()
            .flat_map(|(_, e)| [e.exact_id, e.wildcard_id])
            .collect();
        // Ids whose entries belong to no configured domain: fresh ones, and those `DOMAINS`
        // held for domains the plan no longer has. Empty for a sync with the same domains (the
        // registry following), which then leaves `DENY` alone.
        let mut foreign: BTreeSet<u32> = plan.fresh.iter().copied().collect();
        // What each planned key holds now, for the first (loosening) pass below.
        let mut current: BTreeMap<u64, DomainEntry> = BTreeMap::new();
        {
            let mut domains: HashMap<&mut MapData, u64, DomainEntry> =
                HashMap::try_from(self.map_mut(maps::DOMAINS)?).map_err(map_err(maps::DOMAINS))?;
            let mut stale = Vec::new();
            for (k, e) in domains.iter().filter_map(Result::ok) {
                foreign.extend(
                    [e.exact_id, e.wildcard_id]
                        .into_iter()
                        .filter(|id| *id != 0 && !live.contains(id)),
                );
                if plan.domains.iter().any(|(h, _)| *h == k) {
                    current.insert(k, e);
                } else {
                    stale.push(k);
                }
            }
            for k in stale {
                domains.remove(&k).map_err(map_err(maps::DOMAINS))?;
            }
        }
        if !foreign.is_empty() {
            // Before the domains that take fresh ids are written, so the gate never applies
            // another domain's denials to them.
            let mut deny: HashMap<&mut MapData, DenyKey, u64> =
                HashMap::try_from(self.map_mut(maps::DENY)?).map_err(map_err(maps::DENY))?;
            let stale: Vec<DenyKey> = deny
                .keys()
                .filter_map(Result::ok)
                .filter(|k| foreign.contains(&k.domain_id))
                .collect();
            for k in stale {
                deny.remove(&k).map_err(map_err(maps::DENY))?;
            }
        }
        if !plan.fresh.is_empty() {
            // A fresh id's counters start from zero, not from the removed domain's counts (they
            // survive restarts in the pinned map, and are exported again by a new daemon).
            let mut counters: PerCpuArray<&mut MapData, u64> =
                PerCpuArray::try_from(self.map_mut(maps::COUNTERS)?)
                    .map_err(map_err(maps::COUNTERS))?;
            let cpus = aya::util::nr_cpus().map_or(1, |n| n.get() as usize);
            for &id in plan.fresh.iter().filter(|&&id| id <= MAX_DOMAINS) {
                for c in Counter::ALL {
                    let zeros = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])
                        .map_err(|e| map_err(maps::COUNTERS)(aya::maps::MapError::from(e)))?;
                    counters
                        .set(id * COUNTERS_PER_DOMAIN + c as u32, zeros, 0)
                        .map_err(map_err(maps::COUNTERS))?;
                }
            }
        }
        // First pass: every planned domain with its new id, its allow-list flag kept only where
        // the map already enforced one for the same id; new and changed allow-lists are
        // checked by the daemon until the second pass, after `ALLOW` has their entries.
        let loose = plan
            .domains
            .iter()
            .map(|(h, e)| (*h, loosened(e, current.get(h), &plan.fresh)));
        self.write_domains(loose)?;
        {
            let mut allow: LpmTrie<&mut MapData, AllowKey, u8> =
                LpmTrie::try_from(self.map_mut(maps::ALLOW)?).map_err(map_err(maps::ALLOW))?;
            let wanted: Vec<Key<AllowKey>> = plan
                .allow
                .iter()
                .map(|(len, k)| Key::new(*len, *k))
                .collect();
            // A set: registry hosts make tens of thousands of entries on either side.
            let wanted_set: BTreeSet<(u32, [u8; 4], Addr)> = plan
                .allow
                .iter()
                .map(|(len, k)| (*len, k.domain_be, k.addr))
                .collect();
            let (mut stale, kept): (Vec<Key<AllowKey>>, Vec<Key<AllowKey>>) = allow
                .keys()
                .filter_map(Result::ok)
                .filter(|k| {
                    let d = k.data();
                    !wanted_set.contains(&(k.prefix_len(), d.domain_be, d.addr))
                })
                .partition(|k| {
                    prune_allow || foreign.contains(&u32::from_be_bytes(k.data().domain_be))
                });
            // Entries kept from before (a restart's grace for registry hosts) give way when
            // they and the plan do not fit together.
            if wanted.len() + kept.len() > ALLOW_ENTRIES as usize {
                stale.extend(kept);
            }
            for k in stale {
                allow.remove(&k).map_err(map_err(maps::ALLOW))?;
            }
            for k in &wanted {
                allow.insert(k, &1, 0).map_err(map_err(maps::ALLOW))?;
            }
        }
        self.write_domains(plan.domains.iter().copied())?;
        {
            let mut ports: HashMap<&mut MapData, u16, u8> =
                HashMap::try_from(self.map_mut(maps::PORTS)?).map_err(map_err(maps::PORTS))?;
            let stale: Vec<u16> = ports
                .keys()
                .filter_map(Result::ok)
                .filter(|p| !plan.ports.contains(p))
                .collect();
            for p in stale {
                ports.remove(&p).map_err(map_err(maps::PORTS))?;
            }
            for p in &plan.ports {
                ports.insert(p, &1, 0).map_err(map_err(maps::PORTS))?;
            }
        }
        let mut settings: Array<&mut MapData, u32> =
            Array::try_from(self.map_mut(maps::SETTINGS)?).map_err(map_err(maps::SETTINGS))?;
        settings
            .set(0, &plan.reject, 0)
            .map_err(map_err(maps::SETTINGS))?;
        Ok(())
    }

    /// Denies `addr` on `domain` until `expiry_ns` on the monotonic clock.
    pub fn deny(&mut self, domain: u32, addr: Addr, expiry_ns: u64) -> Result<(), XdpError> {
        let mut deny: HashMap<&mut MapData, DenyKey, u64> =
            HashMap::try_from(self.map_mut(maps::DENY)?).map_err(map_err(maps::DENY))?;
        deny.insert(
            &DenyKey {
                domain_id: domain,
                addr,
            },
            &expiry_ns,
            0,
        )
        .map_err(map_err(maps::DENY))
    }

    /// Removes the denial of `addr` on `domain`; whether there was one.
    pub fn undeny(&mut self, domain: u32, addr: Addr) -> Result<bool, XdpError> {
        let mut deny: HashMap<&mut MapData, DenyKey, u64> =
            HashMap::try_from(self.map_mut(maps::DENY)?).map_err(map_err(maps::DENY))?;
        match deny.remove(&DenyKey {
            domain_id: domain,
            addr,
        }) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(map_err(maps::DENY)(e)),
        }
    }

    /// Live denials: `(domain id, source, expiry ns)` with expiry after `now_ns`.
    pub fn denials(&mut self, now_ns: u64) -> Result<Vec<(u32, Addr, u64)>, XdpError> {
        let deny: HashMap<&mut MapData, DenyKey, u64> =
            HashMap::try_from(self.map_mut(maps::DENY)?).map_err(map_err(maps::DENY))?;
        Ok(deny
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, e)| *e > now_ns)
            .map(|(k, e)| (k.domain_id, k.addr, e))
            .collect())
    }

    /// Removes denials that expired before `now_ns`; returns how many are left.
    pub fn sweep_denials(&mut self, now_ns: u64) -> Result<usize, XdpError> {
        let mut deny: HashMap<&mut MapData, DenyKey, u64> =
            HashMap::try_from(self.map_mut(maps::DENY)?).map_err(map_err(maps::DENY))?;
        let entries: Vec<(DenyKey, u64)> = deny.iter().filter_map(Result::ok).collect();
        let mut live = 0;
        for (k, expiry) in entries {
            if expiry <= now_ns {
                deny.remove(&k).map_err(map_err(maps::DENY))?;
            } else {
                live += 1;
            }
        }
        Ok(live)
    }

    /// Empties `FLOWS` and `PROXIED` (tests and fuzzing classify every frame from scratch).
    pub fn forget_flows(&mut self) -> Result<(), XdpError> {
        let mut flows: aya::maps::HashMap<&mut MapData, portcullis_common::FlowKey, u32> =
            aya::maps::HashMap::try_from(self.map_mut(maps::FLOWS)?)
                .map_err(map_err(maps::FLOWS))?;
        let keys: Vec<portcullis_common::FlowKey> = flows.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = flows.remove(&k);
        }
        let mut proxied: aya::maps::HashMap<
            &mut MapData,
            portcullis_common::FlowKey,
            portcullis_common::Proxied,
        > = aya::maps::HashMap::try_from(self.map_mut(maps::PROXIED)?)
            .map_err(map_err(maps::PROXIED))?;
        let keys: Vec<portcullis_common::FlowKey> = proxied.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = proxied.remove(&k);
        }
        Ok(())
    }

    /// Every counter, summed over CPUs, as `(domain id, counter, value)` for non-zero values.
    pub fn counters(&self) -> Result<Vec<(u32, Counter, u64)>, XdpError> {
        self.counters_up_to(MAX_DOMAINS)
    }

    /// Like [`Gate::counters`] for domain ids `0..=max_domain` only (one syscall per slot).
    pub fn counters_up_to(&self, max_domain: u32) -> Result<Vec<(u32, Counter, u64)>, XdpError> {
        let map = self
            .ebpf
            .map(maps::COUNTERS)
            .ok_or(XdpError::Missing(maps::COUNTERS))?;
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(map_err(maps::COUNTERS))?;
        let mut out = Vec::new();
        for domain in 0..=max_domain.min(MAX_DOMAINS) {
            for c in Counter::ALL {
                let idx = domain * COUNTERS_PER_DOMAIN + c as u32;
                let sum: u64 = counters
                    .get(&idx, 0)
                    .map_err(map_err(maps::COUNTERS))?
                    .iter()
                    .sum();
                if sum != 0 {
                    out.push((domain, c, sum));
                }
            }
        }
        Ok(out)
    }

    /// Runs the program once on `frame` through `BPF_PROG_TEST_RUN`; returns the XDP action and
    /// the frame as the program left it.
    pub fn test_run(&self, frame: &[u8]) -> Result<(u32, Vec<u8>), XdpError> {
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        let res = self.program()?.test_run(opts)?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    /// Mean nanoseconds per run over `repeat` runs of `frame` (the kernel's own timing).
    pub fn time_run(&self, frame: &[u8], repeat: u32) -> Result<f64, XdpError> {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        let res = self.program()?.test_run(opts)?;
        // The kernel reports the mean duration of one run.
        Ok(res.duration.as_nanos() as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assign(patterns: &[&str], previous: &BTreeMap<String, u32>) -> DomainIds {
        DomainIds::assign_patterns(patterns.iter().map(|p| p.to_string()), previous)
    }

    fn ids(d: &DomainIds) -> Vec<u32> {
        d.domains.iter().map(|(_, id)| *id).collect()
    }

    #[test]
    fn domains_keep_their_ids_and_new_ones_take_the_lowest_free() {
        let first = assign(&["*.a", "*.b", "c.d"], &BTreeMap::new());
        assert_eq!(ids(&first), [1, 2, 3]);
        assert_eq!(first.fresh, [1, 2, 3]);
        // Inserted at the top, reordered: every kept domain keeps its id.
        let second = assign(&["*.new", "c.d", "*.b", "*.a"], &first.by_pattern());
        assert_eq!(ids(&second), [4, 3, 2, 1]);
        assert_eq!(second.fresh, [4]);
        assert!(second.kept(1) && second.kept(3) && !second.kept(4) && !second.kept(5));
        assert_eq!(second.names(), ["-", "*.a", "*.b", "c.d", "*.new"]);
        // "*.b" removed: its id is free, and the next new domain takes it as fresh.
        let third = assign(&["*.new", "c.d", "*.a"], &second.by_pattern());
        assert_eq!(ids(&third), [4, 3, 1]);
        assert!(third.fresh.is_empty() && !third.kept(2));
        assert_eq!(third.names(), ["-", "*.a", "-", "c.d", "*.new"]);
        let fourth = assign(&["*.new", "c.d", "*.a", "*.other"], &third.by_pattern());
        assert_eq!(ids(&fourth), [4, 3, 1, 2]);
        assert_eq!(fourth.fresh, [2]);
        assert!(!fourth.kept(2));
        assert!(fourth.clone().settled().kept(2));
    }

    #[test]
    fn ids_out_of_range_or_taken_twice_are_given_again() {
        let previous: BTreeMap<String, u32> = [
            ("*.a".to_string(), MAX_DOMAINS + 1),
            ("*.b".to_string(), 0),
            ("*.c".to_string(), 2),
            ("*.d".to_string(), 2),
        ]
        .into();
        let d = assign(&["*.a", "*.b", "*.c", "*.d"], &previous);
        assert_eq!(ids(&d), [1, 3, 2, 4]);
        assert_eq!(d.fresh, [1, 3, 4]);
    }

    fn plan_of(domains: &[(u32, &[&str])]) -> MapPlan {
        MapPlan {
            domains: domains
                .iter()
                .map(|(id, _)| {
                    let e = DomainEntry {
                        wildcard_id: *id,
                        wildcard_flags: DOMAIN_HAS_ALLOWLIST,
                        ..Default::default()
                    };
                    (u64::from(*id), e)
                })
                .collect(),
            allow: domains
                .iter()
                .flat_map(|(id, nets)| {
                    nets.iter()
                        .map(move |n| allow_entry(*id, &n.parse::<IpNet>().unwrap()))
                })
                .collect(),
            ports: vec![443],
            reject: REJECT_RESET,
            fresh: Vec::new(),
            ungated: Vec::new(),
            balancers: Vec::new(),
        }
    }

    fn flagged(plan: &MapPlan) -> Vec<u32> {
        plan.domains
            .iter()
            .filter(|(_, e)| e.wildcard_flags & DOMAIN_HAS_ALLOWLIST != 0)
            .map(|(_, e)| e.wildcard_id)
            .collect()
    }

    /// Over capacity, whole domains give up their allow-list in the gate (never half of one),
    /// the first in config order that do not fit; a later smaller one still fits.
    #[test]
    fn allow_lists_over_capacity_leave_whole_domains_to_the_daemon() {
        let a: &[&str] = &["10.0.0.0/8", "10.0.0.0/8", "192.0.2.0/24"];
        let b: &[&str] = &["10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16"];
        let c: &[&str] = &["2001:db8::/32"];
        let mut plan = plan_of(&[(1, a), (2, b), (3, c)]);
        plan.fit_allow(6);
        assert_eq!(plan.allow.len(), 6, "a duplicate counts once");
        assert!(plan.ungated.is_empty());
        assert_eq!(flagged(&plan), [1, 2, 3]);

        let mut plan = plan_of(&[(1, a), (2, b), (3, c)]);
        plan.fit_allow(3);
        assert_eq!(plan.ungated, [2]);
        assert_eq!(flagged(&plan), [1, 3]);
        let ids: BTreeSet<u32> = plan
            .allow
            .iter()
            .map(|(_, k)| u32::from_be_bytes(k.domain_be))
            .collect();
        assert_eq!(ids, [1, 3].into());
        assert_eq!(plan.allow.len(), 3);

        // Fitting a fitted plan again changes nothing.
        let mut plan = plan_of(&[(1, a), (2, b), (3, c)]);
        plan.fit_allow(2);
        assert_eq!(plan.ungated, [2, 3]);
        let fitted = (plan.allow.clone(), plan.domains.clone());
        plan.fit_allow(2);
        assert_eq!(plan.ungated, [2, 3]);
        assert_eq!((plan.allow.clone(), plan.domains.clone()), fitted);
    }

    /// The first pass of a sync keeps an allow-list flag only where the map enforced one for the
    /// same id already.
    #[test]
    fn the_first_pass_never_enforces_an_allow_list_that_is_not_in_the_map_yet() {
        let planned = DomainEntry {
            exact_id: 4,
            exact_flags: DOMAIN_HAS_ALLOWLIST,
            wildcard_id: 5,
            wildcard_flags: DOMAIN_HAS_ALLOWLIST,
        };
        let flags = |e: DomainEntry| (e.exact_flags, e.wildcard_flags);
        let on = DOMAIN_HAS_ALLOWLIST;
        // A new key: nothing enforced before.
        assert_eq!(flags(loosened(&planned, None, &[])), (0, 0));
        // Same ids, both enforced before: kept.
        assert_eq!(flags(loosened(&planned, Some(&planned), &[])), (on, on));
        // Before: the exact domain had no allow-list, the wildcard had another id.
        let before = DomainEntry {
            exact_id: 4,
            exact_flags: 0,
            wildcard_id: 2,
            wildcard_flags: on,
        };
        assert_eq!(flags(loosened(&planned, Some(&before), &[])), (0, 0));
        // A fresh id is another domain's, whatever the entry says.
        assert_eq!(flags(loosened(&planned, Some(&planned), &[5])), (on, 0));
        // A flag the plan drops is dropped at once.
        let open = DomainEntry {
            exact_flags: 0,
            ..planned
        };
        assert_eq!(flags(loosened(&open, Some(&planned), &[])), (0, on));
    }
}
