//! Endpoint selection: round-robin or least-connection, never offering an endpoint twice.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Endpoint, Pool};
use crate::registry::LoadBalancing;

/// Offers a pool's endpoints one at a time in load-balancing order (for retries).
pub struct Selector<'a> {
    pool: &'a Pool,
    start: usize,
    tried: Vec<usize>,
}

impl<'a> Selector<'a> {
    pub(super) fn new(pool: &'a Pool, start: usize) -> Self {
        Selector {
            pool,
            start,
            tried: Vec::new(),
        }
    }

    /// The next untried endpoint for which `eligible` holds, or `None` when none is left.
    pub fn next(&mut self, eligible: impl Fn(&Endpoint) -> bool) -> Option<Arc<Endpoint>> {
        let eps = &self.pool.endpoints;
        let n = eps.len();
        let order = (0..n).map(|i| (self.start + i) % n);
        let candidates = order.filter(|i| !self.tried.contains(i) && eligible(&eps[*i]));
        let chosen = match self.pool.load_balancing {
            LoadBalancing::RoundRobin => candidates.into_iter().next(),
            LoadBalancing::LeastConnection => {
                candidates.min_by_key(|i| eps[*i].active.load(Ordering::Relaxed))
            }
        }?;
        self.tried.push(chosen);
        Some(eps[chosen].clone())
    }

    /// How many endpoints were offered so far.
    pub fn attempts(&self) -> usize {
        self.tried.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::registry::{Registration, ValidRegistration};
    use crate::routing::RegistryState;

    fn table(lb: &str, ports: &[u16]) -> RegistryState {
        let mut s = RegistryState::default();
        for p in ports {
            let r = ValidRegistration::try_from(Registration {
                uris: vec!["a.x".into()],
                host: Some("127.0.0.1".into()),
                port: Some(*p),
                options: [("loadbalancing".to_string(), lb.to_string())].into(),
                ..Default::default()
            })
            .unwrap();
            s.register(&r, false, Duration::from_secs(9), Instant::now());
        }
        s
    }

    #[test]
    fn round_robin_rotates_and_retries_skip_tried() {
        let t = table("round-robin", &[1, 2, 3]).snapshot();
        let pool = t.lookup("a.x", "/").unwrap();
        let firsts: Vec<u16> = (0..3)
            .map(|_| pool.selector().next(|_| true).unwrap().port)
            .collect();
        let mut sorted = firsts.clone();
        sorted.sort();
        assert_eq!(sorted, vec![1, 2, 3]);
        let mut sel = pool.selector();
        let seen: Vec<u16> = std::iter::from_fn(|| sel.next(|_| true))
            .map(|e| e.port)
            .collect();
        assert_eq!(seen.len(), 3);
        assert_eq!(sel.attempts(), 3);
        assert!(pool.selector().next(|e| e.port == 9).is_none());
    }

    #[test]
    fn least_connection_prefers_idle() {
        let t = table("least-connection", &[1, 2]).snapshot();
        let pool = t.lookup("a.x", "").unwrap();
        pool.endpoints[0]
            .active
            .store(5, std::sync::atomic::Ordering::Relaxed);
        for _ in 0..4 {
            assert_eq!(pool.selector().next(|_| true).unwrap().port, 2);
        }
    }
}
