//! Route policy options, converted from registration strings into closed types.

use std::fmt;

use super::Rule;

/// `route_policy_scope`: which endpoints a caller may reach at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Any,
    Org,
    Space,
    /// A value portcullis does not know: every request is denied (never silently allowed).
    Unknown(String),
}

impl Scope {
    fn parse(raw: &str) -> Self {
        match raw {
            "any" => Scope::Any,
            "org" => Scope::Org,
            "space" => Scope::Space,
            other => Scope::Unknown(other.to_string()),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Any => f.write_str("any"),
            Scope::Org => f.write_str("org"),
            Scope::Space => f.write_str("space"),
            Scope::Unknown(v) => f.write_str(v),
        }
    }
}

/// One entry of `route_policy_sources`; compared exactly and case-sensitively.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    Any,
    App(String),
    Space(String),
    Org(String),
}

impl Source {
    /// Parses `cf:any`, `cf:app:<guid>`, `cf:space:<guid>` or `cf:org:<guid>`.
    pub fn parse(raw: &str) -> Option<Self> {
        let rest = raw.strip_prefix("cf:")?;
        if rest == "any" {
            return Some(Source::Any);
        }
        let (kind, guid) = rest.split_once(':')?;
        if guid.is_empty() || guid.contains(':') || guid.chars().any(char::is_whitespace) {
            return None;
        }
        let guid = guid.to_string();
        match kind {
            "app" => Some(Source::App(guid)),
            "space" => Some(Source::Space(guid)),
            "org" => Some(Source::Org(guid)),
            _ => None,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Any => f.write_str("cf:any"),
            Source::App(g) => write!(f, "cf:app:{g}"),
            Source::Space(g) => write!(f, "cf:space:{g}"),
            Source::Org(g) => write!(f, "cf:org:{g}"),
        }
    }
}

/// A pool's policy. A route is enforcing when its scope option is non-empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutePolicy {
    /// `None` when the route is not enforcing.
    pub scope: Option<Scope>,
    /// Well-formed sources in registration order, each with the rule of a decision it allows
    /// (`route:<source>`), made once here rather than formatted for every request.
    sources: Vec<(Source, Rule)>,
    /// Malformed source entries that were skipped (counted once per registration).
    pub malformed: Vec<String>,
}

impl RoutePolicy {
    /// Builds a policy from the raw `route_policy_scope` and `route_policy_sources` options.
    pub fn from_options(scope: Option<&str>, sources: Option<&str>) -> Self {
        let scope = scope
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Scope::parse);
        let mut parsed = Vec::new();
        let mut malformed = Vec::new();
        for entry in sources.unwrap_or("").split(',').map(str::trim) {
            if entry.is_empty() {
                continue;
            }
            match Source::parse(entry) {
                Some(s) => parsed.push(s),
                None => malformed.push(entry.to_string()),
            }
        }
        let sources = parsed
            .into_iter()
            .map(|s| {
                let rule = Rule::Allowed(format!("route:{s}").into());
                (s, rule)
            })
            .collect();
        RoutePolicy {
            scope,
            sources,
            malformed,
        }
    }

    /// The well-formed sources, in registration order.
    pub fn sources(&self) -> impl Iterator<Item = &Source> {
        self.sources.iter().map(|(s, _)| s)
    }

    /// The rule of the first source that `allows` accepts.
    pub(super) fn first_allowing(&self, allows: impl Fn(&Source) -> bool) -> Option<&Rule> {
        self.sources.iter().find(|(s, _)| allows(s)).map(|(_, r)| r)
    }

    /// Whether requests to this route are authorized at all.
    pub fn is_enforcing(&self) -> bool {
        self.scope.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources_and_skips_malformed() {
        let p = RoutePolicy::from_options(
            Some("space"),
            Some(" cf:app:A , cf:space:S1,cf:any,bogus,cf:app:,cf:APP:x,cf:org:O1,"),
        );
        assert_eq!(p.scope, Some(Scope::Space));
        assert_eq!(
            p.sources().cloned().collect::<Vec<_>>(),
            vec![
                Source::App("A".into()),
                Source::Space("S1".into()),
                Source::Any,
                Source::Org("O1".into())
            ]
        );
        assert_eq!(p.malformed, vec!["bogus", "cf:app:", "cf:APP:x"]);
    }

    #[test]
    fn empty_scope_is_not_enforcing() {
        assert!(!RoutePolicy::from_options(Some(""), Some("cf:any")).is_enforcing());
        assert!(!RoutePolicy::from_options(None, None).is_enforcing());
        assert_eq!(
            RoutePolicy::from_options(Some("weird"), None).scope,
            Some(Scope::Unknown("weird".into()))
        );
    }
}
