//! The gate as the daemon runs it: attached to the configured interfaces, maps following every
//! config change, counters exported at each scrape.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::Mutex;

use aya::programs::xdp::XdpMode as AyaMode;
use portcullis_common::Counter;

use super::{Gate, MapPlan, XdpError};
use crate::config::{Config, XdpMode};
use crate::metrics::{KindLabels, Metrics, XdpAttachLabels, XdpVerdictLabels};

/// The XDP object built by `cargo xtask build-ebpf`, embedded at compile time (empty if absent).
pub static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/portcullis-ebpf.o"));

/// A running gate.
pub struct XdpRuntime {
    gate: Mutex<Gate>,
    /// Domain pattern per id, for metric labels (index 0 = no domain).
    names: Mutex<Vec<String>>,
    /// Counter values already exported.
    seen: Mutex<HashMap<(u32, Counter), u64>>,
}

fn names(config: &Config) -> Vec<String> {
    std::iter::once("-".to_string())
        .chain(config.domains.iter().map(|d| d.pattern.to_string()))
        .collect()
}

impl XdpRuntime {
    /// Loads, syncs and attaches per `config.xdp`. `Ok(None)` when no interface is configured.
    /// Every failure is returned; the caller logs it once and runs without XDP.
    pub fn start(config: &Config, metrics: &Metrics) -> Result<Option<XdpRuntime>, XdpError> {
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
        gate.sync(&MapPlan::from_config(config)?)?;
        for iface in &xdp.interfaces {
            let mode = gate.attach(iface, xdp.mode)?;
            metrics
                .xdp_attached
                .get_or_create(&XdpAttachLabels {
                    interface: iface.clone(),
                    mode,
                })
                .set(1);
            tracing::info!(interface = %iface, mode, "XDP gate attached");
        }
        Ok(Some(XdpRuntime {
            gate: Mutex::new(gate),
            names: Mutex::new(names(config)),
            seen: Mutex::default(),
        }))
    }

    /// Brings the maps in line with a new config.
    pub fn sync(&self, config: &Config) -> Result<(), XdpError> {
        let plan = MapPlan::from_config(config)?;
        if let Ok(mut g) = self.gate.lock() {
            g.sync(&plan)?;
        }
        if let Ok(mut n) = self.names.lock() {
            *n = names(config);
        }
        Ok(())
    }

    /// Adds what the kernel counted since the last call to the Prometheus counters.
    pub fn export(&self, metrics: &Metrics) {
        let Ok(gate) = self.gate.lock() else { return };
        let counts = match gate.counters() {
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

fn unparsed_kind(c: Counter) -> &'static str {
    match c {
        Counter::PassUnknownDomain => "unknown_domain",
        Counter::PassNoSni => "no_sni",
        Counter::PassSplit => "split",
        Counter::PassNotClientHello => "not_client_hello",
        Counter::PassUnparsed => "unparsed",
        Counter::PassIpUnparsed => "ip_unparsed",
        Counter::PassSniTooLong => "sni_too_long",
        _ => "other",
    }
}

impl Gate {
    /// Attaches to `iface`; `auto` tries native first, then generic. Returns the mode used.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<&'static str, XdpError> {
        let name = CString::new(iface).map_err(|_| XdpError::Interface(iface.to_string()))?;
        let prog: &mut aya::programs::Xdp = self
            .ebpf
            .program_mut(super::PROGRAM)
            .ok_or(XdpError::Missing(super::PROGRAM))?
            .try_into()?;
        let attempts: &[(AyaMode, &'static str)] = match mode {
            XdpMode::Native => &[(AyaMode::Driver, "native")],
            XdpMode::Skb => &[(AyaMode::Skb, "skb")],
            XdpMode::Auto => &[(AyaMode::Driver, "native"), (AyaMode::Skb, "skb")],
        };
        let mut last = None;
        for (m, label) in attempts {
            match prog.attach(name.as_c_str(), *m) {
                Ok(_) => return Ok(label),
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or(XdpError::Interface(iface.to_string()), XdpError::Program))
    }
}
