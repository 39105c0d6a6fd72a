//! The route registry: registrations in, immutable [`RouteTable`] snapshots out (SPEC §10).

mod message;
pub mod nats;

pub use message::{
    endpoint_addr, HashOptions, LoadBalancing, OptionProblem, Protocol, Registration,
    RegistrationError, RouteKey, ValidRegistration,
};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::metrics::Metrics;
use crate::routing::{RegistryState, RouteTable};

/// Owns the registry state and publishes a new [`RouteTable`] after every change.
pub struct Registry {
    state: Mutex<RegistryState>,
    table: ArcSwap<RouteTable>,
    metrics: Arc<Metrics>,
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Registry {
            state: Mutex::default(),
            table: ArcSwap::from_pointee(RouteTable::default()),
            metrics,
        }
    }

    /// The current snapshot; a request holds it for its whole life.
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Replaces every static (config) route with `routes`, leaving dynamic ones alone.
    pub fn replace_static(&self, routes: &[ValidRegistration], default_stale: Duration) {
        self.update(|state| {
            state.clear_permanent();
            let now = Instant::now();
            for r in routes {
                state.register(r, true, default_stale, now);
            }
        });
    }

    /// Applies a change to the working state and publishes the result as one snapshot.
    pub fn update<R>(&self, change: impl FnOnce(&mut RegistryState) -> R) -> R {
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let result = change(&mut state);
        let table = state.snapshot();
        self.metrics
            .registry_endpoints
            .set(table.endpoint_count() as i64);
        self.table.store(Arc::new(table));
        result
    }
}
