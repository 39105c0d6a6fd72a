//! Sticky sessions, kept as GoRouter keeps them, so apps that hold session state in one instance
//! work behind portcullis as they do behind the reference router: a response that sets a session
//! cookie (`backends.sticky_session_cookies`, default `JSESSIONID`) also gets
//! `__VCAP_ID__=<private_instance_id>`, and a request that carries both cookies goes back to that
//! instance while it is registered. Authorization is unchanged: with `filter` selection the
//! instance is taken only when the caller may reach it; with `strict` it is the selected endpoint
//! and is checked like any other.

use cookie::Cookie;
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderValue};

/// The cookie naming the instance a session stays with.
pub const VCAP_ID: &str = "__VCAP_ID__";

/// The instance a request asks to stay with: its `__VCAP_ID__` cookie's value, when it also
/// carries one of the session cookies (both are needed, as in GoRouter).
pub fn requested(headers: &HeaderMap, session_cookies: &[String]) -> Option<String> {
    if session_cookies.is_empty() {
        return None;
    }
    let (mut session, mut instance) = (false, None);
    // h2 clients may send each cookie in a header of its own.
    for value in headers.get_all(COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for c in Cookie::split_parse(text).flatten() {
            if c.name() == VCAP_ID {
                instance.get_or_insert_with(|| c.value().to_string());
            } else if session_cookies.iter().any(|n| n == c.name()) {
                session = true;
            }
        }
    }
    instance.filter(|i| session && !i.is_empty())
}

/// Adds `__VCAP_ID__=<instance>` to a response that sets one of the session cookies, or that
/// `instance` answered although the request asked for another one (which has gone or failed),
/// so the client's next requests come back here. It takes the session cookie's `Secure`,
/// `SameSite`, `Partitioned`, `Max-Age` and `Expires` (a session cookie being deleted deletes it
/// too), is `HttpOnly`, and is scoped to the route's path; `always_secure` (GoRouter's
/// `secure_cookies`) makes it `Secure` whatever the session cookie says. A response that sets
/// `__VCAP_ID__` itself is left alone, and so is an instance id that cannot be a cookie value.
pub fn respond(
    headers: &mut HeaderMap,
    asked: Option<&str>,
    instance: &str,
    route_path: &str,
    session_cookies: &[String],
    always_secure: bool,
) {
    if session_cookies.is_empty() || instance.is_empty() {
        return;
    }
    let mut set = asked.is_some_and(|a| a != instance);
    let mut session: Option<Cookie<'static>> = None;
    for value in headers.get_all(SET_COOKIE) {
        let Ok(Ok(c)) = value.to_str().map(Cookie::parse) else {
            continue;
        };
        if c.name() == VCAP_ID {
            return;
        }
        if session.is_none() && session_cookies.iter().any(|n| n == c.name()) {
            session = Some(c.into_owned());
            set = true;
        }
    }
    if !set || !cookie_value_ok(instance) {
        return;
    }
    let path = if route_path.is_empty() {
        "/"
    } else {
        route_path
    };
    let mut vcap = Cookie::build((VCAP_ID, instance))
        .path(path)
        .http_only(true);
    if let Some(c) = session {
        if let Some(secure) = c.secure() {
            vcap = vcap.secure(secure);
        }
        if let Some(same_site) = c.same_site() {
            vcap = vcap.same_site(same_site);
        }
        if let Some(partitioned) = c.partitioned() {
            vcap = vcap.partitioned(partitioned);
        }
        if let Some(max_age) = c.max_age() {
            vcap = vcap.max_age(max_age);
        }
        if let Some(expires) = c.expires() {
            vcap = vcap.expires(expires);
        }
    }
    if always_secure {
        vcap = vcap.secure(true);
    }
    if let Ok(v) = HeaderValue::from_str(&vcap.build().to_string()) {
        headers.append(SET_COOKIE, v);
    }
}

/// RFC 6265 `cookie-octet`s only: an id from a registration cannot add attributes or cookies.
fn cookie_value_ok(v: &str) -> bool {
    !v.is_empty()
        && v.bytes()
            .all(|b| matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E))
}

/// Whether `name` can be a cookie's name (an RFC 9110 token).
pub fn cookie_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["JSESSIONID".to_string()]
    }

    fn request(cookies: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for c in cookies {
            h.append(COOKIE, HeaderValue::from_str(c).unwrap());
        }
        h
    }

    fn set_cookies(h: &HeaderMap) -> Vec<&str> {
        h.get_all(SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn a_request_asks_for_an_instance_only_with_a_session_cookie() {
        let n = names();
        let asked = |c: &[&str]| requested(&request(c), &n);
        assert_eq!(
            asked(&["JSESSIONID=abc; __VCAP_ID__=inst-2"]).as_deref(),
            Some("inst-2")
        );
        // h2 splits cookies into headers of their own.
        assert_eq!(
            asked(&["__VCAP_ID__=inst-2", "other=1", "JSESSIONID=abc"]).as_deref(),
            Some("inst-2")
        );
        assert_eq!(asked(&["__VCAP_ID__=inst-2"]), None, "no session cookie");
        assert_eq!(asked(&["JSESSIONID=abc"]), None, "no instance");
        assert_eq!(
            asked(&["JSESSIONID=abc; __VCAP_ID__="]),
            None,
            "empty instance"
        );
        assert_eq!(
            asked(&["jsessionid=abc; __VCAP_ID__=i"]),
            None,
            "names are exact"
        );
        assert_eq!(asked(&[]), None);
        assert_eq!(
            requested(&request(&["JSESSIONID=abc; __VCAP_ID__=inst-2"]), &[]),
            None,
            "sticky sessions off"
        );
    }

    #[test]
    fn a_session_cookie_in_the_response_gets_the_instance_cookie_with_its_attributes() {
        let n = names();
        let mut h = HeaderMap::new();
        h.append(SET_COOKIE, HeaderValue::from_static("theme=dark"));
        h.append(
            SET_COOKIE,
            HeaderValue::from_static(
                "JSESSIONID=abc; Path=/x; Secure; SameSite=None; Max-Age=3600; Partitioned",
            ),
        );
        respond(&mut h, None, "inst-1", "/api", &n, false);
        let got = set_cookies(&h);
        assert_eq!(got.len(), 3);
        let vcap = Cookie::parse(got[2]).unwrap();
        assert_eq!((vcap.name(), vcap.value()), (VCAP_ID, "inst-1"));
        assert_eq!(vcap.path(), Some("/api"));
        assert_eq!(vcap.http_only(), Some(true));
        assert_eq!(vcap.secure(), Some(true));
        assert_eq!(vcap.same_site(), Some(cookie::SameSite::None));
        assert_eq!(vcap.partitioned(), Some(true));
        assert_eq!(vcap.max_age(), Some(cookie::time::Duration::hours(1)));

        // A session ended ends the instance cookie too; the root route scopes it to "/".
        let mut h = HeaderMap::new();
        h.append(
            SET_COOKIE,
            HeaderValue::from_static("JSESSIONID=; Max-Age=0"),
        );
        respond(&mut h, Some("inst-1"), "inst-1", "", &n, false);
        let vcap = Cookie::parse(set_cookies(&h)[1]).unwrap();
        assert_eq!(vcap.max_age(), Some(cookie::time::Duration::ZERO));
        assert_eq!(vcap.path(), Some("/"));
        assert_eq!(vcap.secure(), None);
        // `secure_cookies` overrides a session cookie that is not Secure, and keeps the rest.
        let mut h = HeaderMap::new();
        h.append(
            SET_COOKIE,
            HeaderValue::from_static("JSESSIONID=abc; SameSite=Strict"),
        );
        respond(&mut h, None, "inst-1", "", &n, true);
        let vcap = Cookie::parse(set_cookies(&h)[1]).unwrap();
        assert_eq!(vcap.secure(), Some(true));
        assert_eq!(vcap.same_site(), Some(cookie::SameSite::Strict));
    }

    #[test]
    fn the_instance_cookie_is_set_only_when_needed_and_never_unsafe() {
        let n = names();
        let session = || {
            let mut h = HeaderMap::new();
            h.append(SET_COOKIE, HeaderValue::from_static("JSESSIONID=abc"));
            h
        };
        // The asked-for instance answered, and no new session: nothing to add.
        let mut h = HeaderMap::new();
        respond(&mut h, Some("inst-1"), "inst-1", "", &n, false);
        assert!(set_cookies(&h).is_empty());
        // Another instance answered: the client is moved to it.
        respond(&mut h, Some("gone"), "inst-1", "", &n, false);
        assert_eq!(set_cookies(&h), ["__VCAP_ID__=inst-1; HttpOnly; Path=/"]);
        // `secure_cookies`: Secure though the request asked for no session attributes.
        let mut h = HeaderMap::new();
        respond(&mut h, Some("gone"), "inst-1", "", &n, true);
        assert_eq!(
            set_cookies(&h),
            ["__VCAP_ID__=inst-1; HttpOnly; Secure; Path=/"]
        );
        // The app sets __VCAP_ID__ itself: left alone.
        let mut h = session();
        h.append(SET_COOKIE, HeaderValue::from_static("__VCAP_ID__=mine"));
        respond(&mut h, None, "inst-1", "", &n, false);
        assert_eq!(set_cookies(&h).len(), 2);
        // Endpoints without an instance id, ids that could inject attributes, and sticky
        // sessions turned off add nothing.
        for (instance, names) in [
            ("", n.clone()),
            ("inst; Domain=evil.example", n.clone()),
            ("inst,2", n.clone()),
            ("inst-1", vec![]),
        ] {
            let mut h = session();
            respond(&mut h, None, instance, "", &names, false);
            assert_eq!(set_cookies(&h).len(), 1, "{instance:?} {names:?}");
        }
    }

    #[test]
    fn cookie_names_are_tokens() {
        for ok in ["JSESSIONID", "PHPSESSID", "connect.sid", "a_b-c"] {
            assert!(cookie_name_ok(ok), "{ok}");
        }
        for bad in ["", "a b", "a=b", "a;b", "sé"] {
            assert!(!cookie_name_ok(bad), "{bad}");
        }
    }
}
