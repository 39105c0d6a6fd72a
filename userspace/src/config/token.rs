//! Secrets requests present: the admin API's bearer token (`admin.token_file`) and the trace key
//! (`tracing.trace_key`). Read and checked once when the config is loaded (and on every reload),
//! kept only as their SHA-256 digests, and compared in constant time.

use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The shortest token accepted: 16 random characters are far beyond guessing over HTTP.
pub const MIN_TOKEN_LEN: usize = 16;
/// The longest token accepted (it travels in one request header).
pub const MAX_TOKEN_LEN: usize = 1024;

/// Reads a token file. Whitespace around the token (a trailing newline) is not part of it; the
/// token itself must pass [`check_secret`].
pub fn read_token(path: &Path) -> Result<String, String> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read '{shown}': {e}"))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| format!("'{shown}' is not text"))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("'{shown}' holds no token"));
    }
    check_secret(token).map_err(|e| format!("the token in '{shown}' {e}"))?;
    Ok(token.to_string())
}

/// A secret a request presents in a header (the admin token, `tracing.trace_key`): visible
/// ASCII without spaces, as an HTTP bearer token is, and [`MIN_TOKEN_LEN`] to
/// [`MAX_TOKEN_LEN`] characters. The error completes a sentence naming the secret.
pub fn check_secret(secret: &str) -> Result<(), String> {
    if let Some(c) = secret.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "holds {c:?}; a token is visible ASCII without spaces"
        ));
    }
    if secret.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "has {} characters; at least {MIN_TOKEN_LEN} are required (e.g. `openssl rand -hex 32`)",
            secret.len()
        ));
    }
    if secret.len() > MAX_TOKEN_LEN {
        return Err(format!(
            "has {} characters; at most {MAX_TOKEN_LEN} are accepted",
            secret.len()
        ));
    }
    Ok(())
}

/// What a request's `Authorization` header amounts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Granted,
    /// No `Authorization: Bearer …` at all.
    Missing,
    /// A bearer token that is not this one.
    Wrong,
}

/// A secret (the admin token, the trace key), as its digest: the secret itself is not kept, so
/// neither a `Debug` print of the config nor a memory dump shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    digest: [u8; 32],
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Secret {
    pub fn new(secret: &str) -> Self {
        Secret {
            digest: Sha256::digest(secret.as_bytes()).into(),
        }
    }

    /// Whether `presented` is this secret. The comparison takes the same time wherever the
    /// presented value differs, and for any length, since digests are compared.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        bool::from(digest.ct_eq(&self.digest))
    }
}

/// What an `Authorization` header value amounts to for the admin API's `token`: `Bearer
/// <token>`, the scheme in any case (RFC 9110 §11.1), the token compared as [`Secret::matches`]
/// does. (A free function, not a method of [`Secret`], which the trace key shares: that one is
/// presented in its own header, never as a bearer token.)
pub fn bearer_access(token: &Secret, authorization: Option<&[u8]>) -> Access {
    let Some(value) = authorization else {
        return Access::Missing;
    };
    let Some((scheme, rest)) = value.split_first_chunk::<7>() else {
        return Access::Missing;
    };
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return Access::Missing;
    }
    if token.matches(rest.trim_ascii()) {
        Access::Granted
    } else {
        Access::Wrong
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123";

    #[test]
    fn only_the_bearer_token_itself_is_admitted() {
        let t = Secret::new(TOKEN);
        let bearer = |s: &str| bearer_access(&t, Some(s.as_bytes()));
        assert_eq!(bearer(&format!("Bearer {TOKEN}")), Access::Granted);
        assert_eq!(bearer(&format!("bearer  {TOKEN} ")), Access::Granted);
        assert_eq!(bearer(&format!("BEARER {TOKEN}")), Access::Granted);
        assert_eq!(bearer(&format!("Bearer {TOKEN}x")), Access::Wrong);
        assert_eq!(bearer(&format!("Bearer {}", &TOKEN[1..])), Access::Wrong);
        assert_eq!(bearer("Bearer "), Access::Wrong);
        assert_eq!(bearer(&format!("Basic {TOKEN}")), Access::Missing);
        assert_eq!(bearer(&format!("Bearer{TOKEN}")), Access::Missing);
        assert_eq!(bearer("Bear"), Access::Missing);
        assert_eq!(bearer_access(&t, None), Access::Missing);
    }

    #[test]
    fn the_token_is_not_in_debug_output() {
        let shown = format!("{:?}", Secret::new(TOKEN));
        assert!(!shown.contains(TOKEN) && !shown.contains("0123"), "{shown}");
    }

    #[test]
    fn token_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, body: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            p
        };
        let ok = file("ok", format!("  {TOKEN}\r\n").as_bytes());
        assert_eq!(read_token(&ok).unwrap(), TOKEN);
        let err = |p: &Path| read_token(p).unwrap_err();
        assert!(err(&file("empty", b"\n\n")).contains("holds no token"));
        assert!(err(&file("short", b"abc\n")).contains("has 3 characters; at least 16"));
        assert!(err(&file("space", b"0123456789 abcdef\n")).contains("holds ' '"));
        assert!(err(&file("binary", b"\xff\xfe0123456789abcdef")).contains("is not text"));
        assert!(err(&file("long", &[b'a'; 2000])).contains("at most 1024"));
        assert!(err(&dir.path().join("missing")).contains("cannot read"));
    }
}
