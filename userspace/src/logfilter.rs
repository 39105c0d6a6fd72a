//! The operational log's filter, changed while the gateway runs through the admin API
//! (`GET`/`PUT /log-level`), so that an operator can turn on debug logging on a gateway that
//! misbehaves without restarting it, which would lose the state being looked at.
//!
//! The binary installs the control once it has set up its subscriber; a process that did not
//! (a library user, the in-process tests) has none, and the admin API says so.

use std::sync::OnceLock;

/// Reads and replaces the filter of the process's subscriber.
pub trait LogFilter: Send + Sync {
    /// The filter now in force, in `PORTCULLIS_LOG`'s syntax.
    fn current(&self) -> String;
    /// `spec` as it would be in force (`PORTCULLIS_LOG`'s syntax, directives in order), or why
    /// it is not a filter.
    fn check(&self, spec: &str) -> Result<String, String>;
    /// Replaces the filter with `spec`, or says why `spec` is not a filter (and keeps the old).
    fn set(&self, spec: &str) -> Result<(), String>;
}

static CONTROL: OnceLock<Box<dyn LogFilter>> = OnceLock::new();

/// Makes `control` the one the admin API uses; only the first call counts.
pub fn install(control: Box<dyn LogFilter>) {
    let _ = CONTROL.set(control);
}

pub fn control() -> Option<&'static dyn LogFilter> {
    CONTROL.get().map(|c| c.as_ref())
}

/// The longest filter `PUT /log-level` takes.
pub const MAX_SPEC: usize = 4096;
