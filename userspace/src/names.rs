//! Host-name normalisation and domain patterns (SPEC §4).
//!
//! Every decision that compares host names (SNI, Host header, domain pattern, route URI) goes
//! through [`normalize_host`] first, so no comparison is ever byte-exact on raw input.

use std::fmt;

/// Lowercases ASCII and removes one trailing dot.
pub fn normalize_host(name: &str) -> String {
    let name = name.strip_suffix('.').unwrap_or(name);
    name.to_ascii_lowercase()
}

/// Normalises a Host header value: removes the port (including `[v6]:port`), then
/// [`normalize_host`]. An IPv6 literal keeps its brackets off: `[::1]:443` becomes `::1`.
pub fn normalize_authority(host: &str) -> String {
    let host = host.trim();
    let without_port = if let Some(rest) = host.strip_prefix('[') {
        match rest.find(']') {
            Some(end) => &rest[..end],
            None => rest,
        }
    } else {
        match host.rsplit_once(':') {
            // A single colon separates the port; several colons mean a bare IPv6 literal.
            Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    normalize_host(without_port)
}

/// An identity-aware domain name: an exact host, or `*.` plus a suffix that matches exactly one
/// more label.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DomainPattern {
    /// Matches this normalised host only.
    Exact(String),
    /// Matches `<one label>.<suffix>`; the suffix is normalised and has no leading dot.
    Wildcard(String),
}

/// Why a domain pattern was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("empty domain name")]
    Empty,
    #[error("'{0}': a wildcard is only allowed as the whole first label ('*.' + suffix)")]
    MisplacedWildcard(String),
    #[error("'{0}': empty label")]
    EmptyLabel(String),
}

impl DomainPattern {
    /// Parses and normalises a pattern such as `*.apps.identity` or `exact.mtls.domain`.
    pub fn parse(raw: &str) -> Result<Self, PatternError> {
        let name = normalize_host(raw.trim());
        if name.is_empty() {
            return Err(PatternError::Empty);
        }
        let (wild, rest) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, name.as_str()),
        };
        if rest.contains('*') {
            return Err(PatternError::MisplacedWildcard(raw.to_string()));
        }
        if rest.is_empty() || rest.split('.').any(str::is_empty) {
            return Err(PatternError::EmptyLabel(raw.to_string()));
        }
        Ok(if wild {
            DomainPattern::Wildcard(rest.to_string())
        } else {
            DomainPattern::Exact(rest.to_string())
        })
    }

    /// Whether an already normalised host matches this pattern.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            DomainPattern::Exact(name) => host == name,
            DomainPattern::Wildcard(suffix) => match host.split_once('.') {
                Some((first, parent)) => !first.is_empty() && parent == suffix,
                None => false,
            },
        }
    }

    /// Whether this is an exact (non-wildcard) pattern; exact patterns win over wildcards.
    pub fn is_exact(&self) -> bool {
        matches!(self, DomainPattern::Exact(_))
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainPattern::Exact(name) => f.write_str(name),
            DomainPattern::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// Picks the pattern that governs `host` from a list: exact beats wildcard. Returns its index.
pub fn best_match<'a, I>(patterns: I, host: &str) -> Option<usize>
where
    I: IntoIterator<Item = &'a DomainPattern>,
{
    let mut wildcard = None;
    for (i, p) in patterns.into_iter().enumerate() {
        if p.matches(host) {
            if p.is_exact() {
                return Some(i);
            }
            wildcard.get_or_insert(i);
        }
    }
    wildcard
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_dot_and_port() {
        assert_eq!(normalize_host("A.Apps.Identity."), "a.apps.identity");
        assert_eq!(
            normalize_authority("A.apps.identity:8443"),
            "a.apps.identity"
        );
        assert_eq!(
            normalize_authority("a.apps.identity.:443"),
            "a.apps.identity"
        );
        assert_eq!(normalize_authority("[::1]:443"), "::1");
        assert_eq!(normalize_authority("[::1]"), "::1");
        assert_eq!(normalize_authority("::1"), "::1");
        assert_eq!(normalize_authority("127.0.0.1:80"), "127.0.0.1");
    }

    #[test]
    fn wildcard_matches_exactly_one_label() {
        let p = DomainPattern::parse("*.Apps.Identity.").unwrap();
        assert_eq!(p.to_string(), "*.apps.identity");
        assert!(p.matches("a.apps.identity"));
        assert!(!p.matches("a.b.apps.identity"));
        assert!(!p.matches("apps.identity"));
        assert!(!p.matches(".apps.identity"));
        assert!(!p.matches("xapps.identity"));
    }

    #[test]
    fn exact_beats_wildcard() {
        let ps = [
            DomainPattern::parse("*.mtls.domain").unwrap(),
            DomainPattern::parse("exact.mtls.domain").unwrap(),
        ];
        assert_eq!(best_match(&ps, "exact.mtls.domain"), Some(1));
        assert_eq!(best_match(&ps, "other.mtls.domain"), Some(0));
        assert_eq!(best_match(&ps, "mtls.domain"), None);
    }

    #[test]
    fn rejects_bad_patterns() {
        assert_eq!(DomainPattern::parse(""), Err(PatternError::Empty));
        assert!(DomainPattern::parse("a.*.b").is_err());
        assert!(DomainPattern::parse("*.").is_err());
        assert!(DomainPattern::parse("a..b").is_err());
    }
}
