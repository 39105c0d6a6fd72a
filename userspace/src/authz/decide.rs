//! The decision: scope against the selected endpoint, then sources (first match wins).

use std::fmt;
use std::sync::Arc;

use super::{RoutePolicy, Scope, Source};
use crate::identity::Identity;

/// The `route_policy` value of a decision, as logged and counted. Each is made without
/// formatting or allocating: a decision is taken for every request to an enforcing route.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// Enforcing route, caller without identity: `identity_extraction`.
    IdentityExtraction,
    /// Scope failed for the selected (or every) endpoint: holds the whole value,
    /// `domain:scope=<scope>:post-selection`, scope `org`, `space` or `unknown`.
    Scope(&'static str),
    /// Enforcing route without sources: `route:no_route_policies`.
    NoRoutePolicies,
    /// Sources present, none matched: `route:route_policies`.
    RoutePolicies,
    /// Allowed by a source: `route:<source>`, made once per source when the policy is built
    /// ([`RoutePolicy::from_options`]).
    Allowed(Arc<str>),
}

const SCOPE_ORG: &str = "domain:scope=org:post-selection";
const SCOPE_SPACE: &str = "domain:scope=space:post-selection";
const SCOPE_UNKNOWN: &str = "domain:scope=unknown:post-selection";

impl Rule {
    pub fn as_str(&self) -> &str {
        match self {
            Rule::IdentityExtraction => "identity_extraction",
            Rule::Scope(s) => s,
            Rule::NoRoutePolicies => "route:no_route_policies",
            Rule::RoutePolicies => "route:route_policies",
            Rule::Allowed(label) => label,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A denial: the rule that decided it. Every denial is a final 403.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial(pub Rule);

/// The endpoint tags a scope is checked against.
pub trait ScopeTags {
    fn space_id(&self) -> &str;
    fn organization_id(&self) -> &str;
}

/// Whether `caller` passes `scope` for an endpoint with these tags. Empty never matches.
pub fn check_scope(scope: &Scope, caller: &Identity, tags: &impl ScopeTags) -> Result<(), Denial> {
    let (mine, theirs, name) = match scope {
        Scope::Any => return Ok(()),
        Scope::Org => (caller.org.as_deref(), tags.organization_id(), SCOPE_ORG),
        Scope::Space => (caller.space.as_deref(), tags.space_id(), SCOPE_SPACE),
        Scope::Unknown(_) => return Err(Denial(Rule::Scope(SCOPE_UNKNOWN))),
    };
    match mine {
        Some(m) if !m.is_empty() && !theirs.is_empty() && m == theirs => Ok(()),
        _ => Err(Denial(Rule::Scope(name))),
    }
}

/// Checks the sources of an enforcing route; the first source that matches wins.
pub fn decide_sources(policy: &RoutePolicy, caller: &Identity) -> Result<Rule, Denial> {
    if policy.sources().next().is_none() {
        return Err(Denial(Rule::NoRoutePolicies));
    }
    let eq = |want: &String, have: &Option<String>| have.as_deref() == Some(want.as_str());
    policy
        .first_allowing(|s| match s {
            Source::Any => true,
            Source::App(g) => *g == caller.app,
            Source::Space(g) => eq(g, &caller.space),
            Source::Org(g) => eq(g, &caller.org),
        })
        .cloned()
        .ok_or(Denial(Rule::RoutePolicies))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tags(&'static str, &'static str);
    impl ScopeTags for Tags {
        fn space_id(&self) -> &str {
            self.0
        }
        fn organization_id(&self) -> &str {
            self.1
        }
    }

    fn caller(space: Option<&str>, org: Option<&str>) -> Identity {
        Identity {
            app: "A".into(),
            space: space.map(Into::into),
            org: org.map(Into::into),
        }
    }

    #[test]
    fn scope_checks_and_empty_never_matches() {
        let c = caller(Some("S1"), Some("O1"));
        assert!(check_scope(&Scope::Space, &c, &Tags("S1", "O1")).is_ok());
        assert!(check_scope(&Scope::Space, &c, &Tags("S2", "O1")).is_err());
        assert!(check_scope(&Scope::Org, &c, &Tags("S2", "O1")).is_ok());
        let orgless = caller(Some("S1"), None);
        assert_eq!(
            check_scope(&Scope::Org, &orgless, &Tags("S1", "")),
            Err(Denial(Rule::Scope(SCOPE_ORG)))
        );
        assert_eq!(
            check_scope(&Scope::Unknown("x".into()), &c, &Tags("S1", "O1")),
            Err(Denial(Rule::Scope(SCOPE_UNKNOWN)))
        );
    }

    #[test]
    fn sources_first_match_wins() {
        let p = RoutePolicy::from_options(Some("any"), Some("cf:org:O1,cf:app:A"));
        let c = caller(Some("S1"), Some("O1"));
        assert_eq!(
            decide_sources(&p, &c).unwrap().to_string(),
            "route:cf:org:O1"
        );
        let none = RoutePolicy::from_options(Some("any"), None);
        assert_eq!(
            decide_sources(&none, &c).unwrap_err().0.to_string(),
            "route:no_route_policies"
        );
        let other = RoutePolicy::from_options(Some("any"), Some("cf:app:B,cf:space:S9"));
        assert_eq!(
            decide_sources(&other, &c).unwrap_err().0.to_string(),
            "route:route_policies"
        );
    }
}
