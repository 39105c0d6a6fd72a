//! Deny learning (SPEC §11): a source that fails the handshake or is denied (403) on a domain
//! `threshold` times within `window` is denied for `ttl`, doubling on each repeat up to
//! `max_ttl`; `exempt` CIDRs never are. Pure bookkeeping: the caller writes the DENY map.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::config::DenyLearning;

#[derive(Debug)]
struct Strikes {
    window_start: Instant,
    failures: u32,
    /// Denials so far (each doubles the next ttl).
    denials: u32,
    denied_until: Option<Instant>,
}

impl Strikes {
    fn new(now: Instant) -> Strikes {
        Strikes {
            window_start: now,
            failures: 0,
            denials: 0,
            denied_until: None,
        }
    }
}

/// Per (domain id, source) failure counts.
#[derive(Debug)]
pub struct Learner {
    settings: DenyLearning,
    sources: HashMap<(u32, IpAddr), Strikes>,
}

impl Learner {
    pub fn new(settings: DenyLearning) -> Self {
        Learner {
            settings,
            sources: HashMap::new(),
        }
    }

    /// Whether `source` is in an `exempt` CIDR (never denied, learned or shared).
    pub fn is_exempt(&self, source: IpAddr) -> bool {
        self.settings.exempt.iter().any(|n| n.contains(&source))
    }

    /// New settings from a reloaded config; what was counted so far is kept.
    pub fn set_settings(&mut self, settings: DenyLearning) {
        self.settings = settings;
    }

    /// Records one failure; returns the ttl to deny for when this one crosses the threshold.
    pub fn failure(&mut self, domain: u32, source: IpAddr, now: Instant) -> Option<Duration> {
        let s = &self.settings;
        if !s.enabled || s.exempt.iter().any(|n| n.contains(&source)) {
            return None;
        }
        let e = self
            .sources
            .entry((domain, source))
            .or_insert_with(|| Strikes::new(now));
        if e.denied_until.is_some_and(|until| until > now) {
            // Already denied (a request that was in flight, or XDP not in front): no new strike.
            return None;
        }
        if now.duration_since(e.window_start) > s.window {
            e.window_start = now;
            e.failures = 0;
        }
        e.failures += 1;
        if e.failures < s.threshold {
            return None;
        }
        let factor = 1u32.checked_shl(e.denials).unwrap_or(u32::MAX);
        let ttl = s.ttl.saturating_mul(factor).min(s.max_ttl);
        e.denials += 1;
        e.failures = 0;
        e.window_start = now;
        e.denied_until = Some(now + ttl);
        Some(ttl)
    }

    /// Whether a learned denial of `source` on `domain` is in force at `now`.
    pub fn denied(&self, domain: u32, source: IpAddr, now: Instant) -> bool {
        self.sources
            .get(&(domain, source))
            .and_then(|e| e.denied_until)
            .is_some_and(|until| until > now)
    }

    /// The denials in force at `now`: domain id, source and what is left of each.
    pub fn denials(&self, now: Instant) -> Vec<(u32, IpAddr, Duration)> {
        self.sources
            .iter()
            .filter_map(|(&(domain, source), e)| {
                let until = e.denied_until.filter(|u| *u > now)?;
                Some((domain, source, until - now))
            })
            .collect()
    }

    /// Records a denial of `source` on `domain` that another gateway learned (fleet sharing),
    /// in force for `ttl` from `now`, so [`Learner::denied`] knows of it: the source's kept-alive
    /// connections then end on their next refusal, as for a denial learned here. It does not
    /// count towards this gateway's own doubling, and an exempt source is never recorded.
    pub fn denied_elsewhere(&mut self, domain: u32, source: IpAddr, ttl: Duration, now: Instant) {
        if self.is_exempt(source) {
            return;
        }
        // A ttl too large for the clock (a message's u64 milliseconds) is as good as forever;
        // the longest this gateway would deny for stands in.
        let until = now.checked_add(ttl).unwrap_or(now + self.settings.max_ttl);
        let e = self
            .sources
            .entry((domain, source))
            .or_insert_with(|| Strikes::new(now));
        if e.denied_until.is_none_or(|u| u < until) {
            e.denied_until = Some(until);
        }
    }

    /// Takes up a denial found in force in the pinned DENY map at start (a previous daemon's),
    /// with `left` to run: the source is known as denied until then, and its next denial doubles
    /// on from the ttl that one must have had. The map keeps only expiries, so that is inferred:
    /// the shortest of this gateway's ttls (`ttl`·2ⁿ, capped at `max_ttl`) not shorter than
    /// `left`. A denial the fleet shared is taken up the same way (the map does not tell them
    /// apart). An exempt source is never recorded.
    pub fn restore(&mut self, domain: u32, source: IpAddr, left: Duration, now: Instant) {
        let s = &self.settings;
        if !s.enabled || self.is_exempt(source) {
            return;
        }
        // The n-th denial lasts ttl·2ⁿ⁻¹ (see `failure`).
        let mut denials = 1u32;
        let mut ttl = s.ttl.min(s.max_ttl);
        while ttl < left && ttl < s.max_ttl && denials < 32 {
            ttl = s.ttl.saturating_mul(1u32 << denials).min(s.max_ttl);
            denials += 1;
        }
        let until = now.checked_add(left).unwrap_or(now + s.max_ttl);
        self.sources.insert(
            (domain, source),
            Strikes {
                denials,
                denied_until: Some(until),
                ..Strikes::new(now)
            },
        );
    }

    /// Takes back the denial just learned for `source` on `domain`, when the gate could not be
    /// told (its DENY map full): the source is not stopped, so it is not treated as denied, and
    /// its next `threshold` failures try again.
    pub fn unlearn(&mut self, domain: u32, source: IpAddr) {
        if let Some(e) = self.sources.get_mut(&(domain, source)) {
            e.denied_until = None;
        }
    }

    /// Forgets `source` on `domain` altogether (an operator lifted its denial): its next
    /// denial, if it earns one, starts again at `ttl`.
    pub fn forget(&mut self, domain: u32, source: IpAddr) {
        self.sources.remove(&(domain, source));
    }

    /// Forgets everything counted on domain ids for which `keep` is false (domains removed from
    /// the config, or ids now given to another domain).
    pub fn retain_domains(&mut self, keep: impl Fn(u32) -> bool) {
        self.sources.retain(|(domain, _), _| keep(*domain));
    }

    /// Forgets sources with no recent failure and no denial in force or to remember (a source
    /// quiet for `max_ttl` after its last denial starts over at `ttl`).
    pub fn sweep(&mut self, now: Instant) {
        let s = &self.settings;
        self.sources.retain(|_, e| {
            let recent = now.duration_since(e.window_start) <= s.window;
            let remembered = e.denied_until.is_some_and(|u| now < u + s.max_ttl);
            recent || remembered
        });
    }
}

/// Nanoseconds on the monotonic clock, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into `ts` only.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> DenyLearning {
        DenyLearning {
            enabled: true,
            threshold: 3,
            window: Duration::from_secs(10),
            ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(200),
            exempt: vec!["10.0.0.0/8".parse().unwrap()],
        }
    }

    #[test]
    fn a_denial_restored_at_start_doubles_on() {
        let mut l = Learner::new(settings());
        let (ip, other): (IpAddr, IpAddr) =
            ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let t = Instant::now();
        // 90 s left: it was at least the second denial (120 s), so the next is the third (cap).
        l.restore(1, ip, Duration::from_secs(90), t);
        // 30 s left: it may have been the first (60 s), so the next is the second (120 s).
        l.restore(1, other, Duration::from_secs(30), t);
        assert!(l.denied(1, ip, t + Duration::from_secs(89)));
        assert!(!l.denied(1, ip, t + Duration::from_secs(91)));
        // In force: no strikes counted.
        assert_eq!(l.failure(1, ip, t), None);
        let t = t + Duration::from_secs(91);
        for (source, ttl) in [(ip, 200), (other, 120)] {
            assert_eq!(l.failure(1, source, t), None);
            assert_eq!(l.failure(1, source, t), None);
            assert_eq!(l.failure(1, source, t), Some(Duration::from_secs(ttl)));
        }
        // Exempt sources are not taken up; a restore beyond the cap stays at the cap.
        let exempt: IpAddr = "10.1.2.3".parse().unwrap();
        l.restore(1, exempt, Duration::from_secs(30), t);
        assert!(!l.denied(1, exempt, t));
        l.restore(2, ip, Duration::from_secs(10_000), t);
        assert!(l.denied(2, ip, t + Duration::from_secs(9_999)));
    }

    #[test]
    fn a_denial_the_gate_was_not_told_of_is_taken_back() {
        let mut l = Learner::new(settings());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t = Instant::now();
        for _ in 0..2 {
            l.failure(1, ip, t);
        }
        assert_eq!(l.failure(1, ip, t), Some(Duration::from_secs(60)));
        l.unlearn(1, ip);
        assert!(!l.denied(1, ip, t));
        // Counting starts over; the next denial is the second (doubled).
        assert_eq!(l.failure(1, ip, t), None);
        assert_eq!(l.failure(1, ip, t), None);
        assert_eq!(l.failure(1, ip, t), Some(Duration::from_secs(120)));
        assert!(l.denied(1, ip, t));
    }

    #[test]
    fn threshold_window_doubling_and_cap() {
        let mut l = Learner::new(settings());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t = Instant::now();
        assert_eq!(l.failure(1, ip, t), None);
        assert_eq!(l.failure(1, ip, t), None);
        // Outside the window the count starts over.
        let t = t + Duration::from_secs(11);
        assert_eq!(l.failure(1, ip, t), None);
        assert_eq!(l.failure(1, ip, t), None);
        assert!(!l.denied(1, ip, t));
        assert_eq!(l.failure(1, ip, t), Some(Duration::from_secs(60)));
        assert!(l.denied(1, ip, t));
        // While denied, nothing counts.
        assert_eq!(l.failure(1, ip, t + Duration::from_secs(1)), None);
        assert!(l.denied(1, ip, t + Duration::from_secs(59)));
        assert!(!l.denied(1, ip, t + Duration::from_secs(60)));
        assert!(!l.denied(2, ip, t));
        // Other domains are separate.
        assert_eq!(l.failure(2, ip, t), None);
        let mut t = t + Duration::from_secs(61);
        for expected in [120, 200, 200] {
            assert_eq!(l.failure(1, ip, t), None);
            assert_eq!(l.failure(1, ip, t), None);
            assert_eq!(l.failure(1, ip, t), Some(Duration::from_secs(expected)));
            t += Duration::from_secs(expected + 1);
        }
    }

    #[test]
    fn a_denial_learned_elsewhere_is_known_without_counting_here() {
        let mut l = Learner::new(settings());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t = Instant::now();
        assert_eq!(l.failure(1, ip, t), None);
        l.denied_elsewhere(1, ip, Duration::from_secs(30), t);
        assert!(l.denied(1, ip, t + Duration::from_secs(29)));
        assert!(!l.denied(1, ip, t + Duration::from_secs(30)));
        assert!(!l.denied(2, ip, t));
        // While it is in force, refusals here do not count; a shorter one does not shorten it.
        assert_eq!(l.failure(1, ip, t), None);
        l.denied_elsewhere(1, ip, Duration::from_secs(1), t);
        assert!(l.denied(1, ip, t + Duration::from_secs(29)));
        // Afterwards this gateway's own first denial is the base ttl, not doubled.
        let t = t + Duration::from_secs(31);
        assert_eq!(l.failure(1, ip, t), None);
        assert_eq!(l.failure(1, ip, t), None);
        assert_eq!(l.failure(1, ip, t), Some(Duration::from_secs(60)));
        // Exempt sources are never recorded; a ttl past the clock's range does not panic.
        l.denied_elsewhere(1, "10.1.2.3".parse().unwrap(), Duration::from_secs(30), t);
        assert!(!l.denied(1, "10.1.2.3".parse().unwrap(), t));
        l.denied_elsewhere(3, ip, Duration::from_millis(u64::MAX), t);
        assert!(l.denied(3, ip, t + Duration::from_secs(199)));
    }

    #[test]
    fn exempt_and_disabled_never_learn() {
        let mut l = Learner::new(settings());
        let t = Instant::now();
        for _ in 0..10 {
            assert_eq!(l.failure(1, "10.1.2.3".parse().unwrap(), t), None);
        }
        let mut off = settings();
        off.enabled = false;
        let mut l = Learner::new(off);
        for _ in 0..10 {
            assert_eq!(l.failure(1, "192.0.2.1".parse().unwrap(), t), None);
        }
    }

    #[test]
    fn sweep_forgets_quiet_sources() {
        let mut l = Learner::new(settings());
        let t = Instant::now();
        l.failure(1, "192.0.2.1".parse().unwrap(), t);
        l.sweep(t + Duration::from_secs(5));
        assert_eq!(l.sources.len(), 1);
        l.sweep(t + Duration::from_secs(11));
        assert!(l.sources.is_empty());
    }
}
