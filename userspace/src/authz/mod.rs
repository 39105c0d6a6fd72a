//! Route policies and the authorization decision (SPEC §6, §7).

mod decide;
mod policy;

pub use decide::{check_scope, decide_sources, Denial, Rule, ScopeTags};
pub use policy::{RoutePolicy, Scope, Source};
