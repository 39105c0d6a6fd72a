//! The daemon's side of the XDP SNI gate (SPEC §11): loading the program, deriving its maps from
//! the config, reading its counters.
//!
//! The maps are pinned (by name) under a directory in bpffs, so a restarted daemon finds the
//! program's state, including learned denials, where it left it.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use portcullis_common::{
    maps, name_hash, v4_mapped, Addr, AllowKey, Counter, DenyKey, DomainEntry, COUNTERS_PER_DOMAIN,
    DOMAIN_HAS_ALLOWLIST, MAX_DOMAINS, REJECT_DROP, REJECT_RESET,
};

use crate::config::{Config, XdpReject};
use crate::names::DomainPattern;

mod learn;
mod runtime;
pub mod twin;
pub use learn::{monotonic_ns, Learner};
pub use runtime::{
    interface_driver, load_pinned, unload_pinned, Denial, SharedDenial, XdpRuntime, OBJECT,
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

/// Everything the maps should hold for one config (and, later, one registry snapshot).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MapPlan {
    pub domains: Vec<(u64, DomainEntry)>,
    /// `(prefix_len, key)` for the `ALLOW` trie.
    pub allow: Vec<(u32, AllowKey)>,
    pub ports: Vec<u16>,
    pub reject: u32,
}

impl MapPlan {
    /// Domain ids are positions in `config.domains`, from 1. `registry_hosts` are the registry's
    /// endpoint addresses, allowed on domains whose allow-list says `registry_hosts: true`.
    pub fn from_config(
        config: &Config,
        registry_hosts: &BTreeSet<IpAddr>,
    ) -> Result<MapPlan, XdpError> {
        if config.domains.len() > MAX_DOMAINS as usize {
            return Err(XdpError::TooManyDomains);
        }
        let mut entries: std::collections::BTreeMap<u64, DomainEntry> = Default::default();
        let mut allow = Vec::new();
        for (i, d) in config.domains.iter().enumerate() {
            let id = i as u32 + 1;
            let flags = if d.allowed_sources.is_some() {
                DOMAIN_HAS_ALLOWLIST
            } else {
                0
            };
            match &d.pattern {
                DomainPattern::Exact(name) => {
                    let e = entries.entry(name_hash(name.as_bytes())).or_default();
                    e.exact_id = id;
                    e.exact_flags = flags;
                }
                DomainPattern::Wildcard(suffix) => {
                    let e = entries.entry(name_hash(suffix.as_bytes())).or_default();
                    e.wildcard_id = id;
                    e.wildcard_flags = flags;
                }
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
        Ok(MapPlan {
            domains: entries.into_iter().collect(),
            allow,
            ports: config.xdp.ports.clone(),
            reject: match config.xdp.reject {
                XdpReject::Reset => REJECT_RESET,
                XdpReject::Drop => REJECT_DROP,
            },
        })
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

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, XdpError> {
        self.ebpf.map_mut(name).ok_or(XdpError::Missing(name))
    }

    /// Makes `DOMAINS`, `ALLOW`, `PORTS` and `SETTINGS` hold exactly what `plan` says; with
    /// `prune_allow` false, `ALLOW` entries not in the plan are kept (only added to).
    pub fn sync(&mut self, plan: &MapPlan, prune_allow: bool) -> Result<(), XdpError> {
        {
            let mut domains: HashMap<&mut MapData, u64, DomainEntry> =
                HashMap::try_from(self.map_mut(maps::DOMAINS)?).map_err(map_err(maps::DOMAINS))?;
            let stale: Vec<u64> = domains
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !plan.domains.iter().any(|(h, _)| h == k))
                .collect();
            for k in stale {
                domains.remove(&k).map_err(map_err(maps::DOMAINS))?;
            }
            for (h, e) in &plan.domains {
                domains.insert(h, e, 0).map_err(map_err(maps::DOMAINS))?;
            }
        }
        {
            let mut allow: LpmTrie<&mut MapData, AllowKey, u8> =
                LpmTrie::try_from(self.map_mut(maps::ALLOW)?).map_err(map_err(maps::ALLOW))?;
            let wanted: Vec<Key<AllowKey>> = plan
                .allow
                .iter()
                .map(|(len, k)| Key::new(*len, *k))
                .collect();
            let stale: Vec<Key<AllowKey>> = allow
                .keys()
                .filter_map(Result::ok)
                .filter(|k| {
                    prune_allow
                        && !wanted
                            .iter()
                            .any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data())
                })
                .collect();
            for k in stale {
                allow.remove(&k).map_err(map_err(maps::ALLOW))?;
            }
            for k in &wanted {
                allow.insert(k, &1, 0).map_err(map_err(maps::ALLOW))?;
            }
        }
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

    /// Empties `FLOWS` (tests and fuzzing classify every frame from scratch).
    pub fn forget_flows(&mut self) -> Result<(), XdpError> {
        let mut flows: aya::maps::HashMap<&mut MapData, portcullis_common::FlowKey, u32> =
            aya::maps::HashMap::try_from(self.map_mut(maps::FLOWS)?)
                .map_err(map_err(maps::FLOWS))?;
        let keys: Vec<portcullis_common::FlowKey> = flows.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = flows.remove(&k);
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
