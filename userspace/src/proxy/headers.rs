//! Request and response header handling: hop-by-hop removal, forwarding headers, B3 and W3C
//! Trace Context, XFCC.

use std::net::IpAddr;

use base64::Engine as _;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, COOKIE, TE, TRANSFER_ENCODING, UPGRADE,
};

use crate::config::{Secret, XfccFormat, XfccMode};
use crate::identity::PeerCert;

// Names as `HeaderName`s, not strings: a `&str` name is parsed again on every map operation.
pub const X_CF_ROUTERERROR: HeaderName = HeaderName::from_static("x-cf-routererror");
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
pub const X_VCAP_REQUEST_ID: HeaderName = HeaderName::from_static("x-vcap-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_REQUEST_START: HeaderName = HeaderName::from_static("x-request-start");
/// GoRouter's instance routing: `<app guid>:<index>`.
pub const X_CF_APP_INSTANCE: HeaderName = HeaderName::from_static("x-cf-app-instance");
pub const X_CF_PROCESS_INSTANCE: HeaderName = HeaderName::from_static("x-cf-process-instance");
/// GoRouter's headers naming the instance a request was sent to (set, never passed through).
pub const X_CF_APPLICATION_ID: HeaderName = HeaderName::from_static("x-cf-applicationid");
pub const X_CF_INSTANCE_INDEX: HeaderName = HeaderName::from_static("x-cf-instanceindex");
pub const X_CF_INSTANCE_ID: HeaderName = HeaderName::from_static("x-cf-instanceid");
/// GoRouter's trace request (`tracing.trace_key`) and the headers that answer it.
const X_VCAP_TRACE: HeaderName = HeaderName::from_static("x-vcap-trace");
const X_VCAP_ROUTER: HeaderName = HeaderName::from_static("x-vcap-router");
const X_VCAP_BACKEND: HeaderName = HeaderName::from_static("x-vcap-backend");
const X_CF_ROUTE_ENDPOINT: HeaderName = HeaderName::from_static("x-cf-routeendpoint");
const B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// W3C Trace Context: the list members a `tracestate` may hold, and the length it is kept to.
const TRACESTATE_MEMBERS: usize = 32;
const TRACESTATE_LEN: usize = 512;

/// As strings: the one-pass check below compares each present name with these, and a `const`
/// array of `HeaderName`s would be built and dropped at every use. Not `Trailer`: it announces
/// the trailer fields to every recipient (RFC 9110 §6.6.2; RFC 2616's hop-by-hop "Trailers" was
/// `TE`'s token), and hyper sends an HTTP/1.1 peer only the trailer fields it announces.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
];

/// Whether a comma-separated header `name` lists `token`, in any case.
fn lists(h: &HeaderMap, name: HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// Whether a request asks for a protocol upgrade (WebSocket and others, HTTP/1.1 only).
pub fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(UPGRADE) && lists(h, CONNECTION, "upgrade")
}

/// Whether a header name (in any case) is one the gateway sets or vouches for: the forwarding
/// headers, GoRouter's `X-CF-*` and `X-Vcap-*`, `X-Request-Start` and the trace context.
fn vouched(name: &str) -> bool {
    const PREFIXES: [&str; 5] = [
        "x-forwarded-",
        "x-cf-",
        "x-vcap-",
        "x-b3-",
        "x-request-start",
    ];
    const NAMES: [&str; 3] = ["b3", "traceparent", "tracestate"];
    let starts = |p: &str| {
        name.get(..p.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(p))
    };
    PREFIXES.into_iter().any(starts) || NAMES.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// Removes request headers whose names, with `_` read as `-`, are ones the gateway sets or
/// vouches for (`X_Forwarded_Client_Cert`, `X_CF_InstanceID`, `X_B3_TraceId` …). CGI and WSGI
/// servers (gunicorn before 22, PHP's CGI) give `X-Forwarded-Client-Cert` and
/// `X_Forwarded_Client_Cert` the same name, so a caller could otherwise hand such an app a
/// forged certificate, or overrule any header the gateway sets. Other names with `_` pass.
pub fn drop_underscore_lookalikes(h: &mut HeaderMap) {
    let mut lookalikes = Vec::new();
    for k in h.keys() {
        let name = k.as_str();
        if !name.contains('_') {
            continue;
        }
        if vouched(&name.replace('_', "-")) {
            lookalikes.push(k.clone());
        }
    }
    for k in lookalikes {
        h.remove(k);
    }
}

const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Takes `h2c` out of a request's `Upgrade` (and drops `HTTP2-Settings`), so that the request
/// goes on as an ordinary one. An app that took the upgrade would speak HTTP/2 with the caller
/// through a tunnel, and every later request on it would reach the app past the gateway's
/// routing and policies ("h2c smuggling"); Envoy refuses it the same way.
pub fn refuse_h2c(h: &mut HeaderMap) {
    if !lists(h, UPGRADE, "h2c") {
        return;
    }
    let others: Vec<String> = h
        .get_all(UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("h2c"))
        .map(str::to_string)
        .collect();
    h.remove(UPGRADE);
    h.remove(HTTP2_SETTINGS);
    if let Ok(v) = HeaderValue::from_str(&others.join(", ")) {
        if !others.is_empty() {
            h.insert(UPGRADE, v);
        }
    }
}

/// Removes hop-by-hop headers and those named in `Connection`, except the headers the gateway
/// sets or vouches for ([`vouched`]): `Connection: X-Forwarded-Client-Cert` would otherwise take
/// away what a balancer in front passed on in `forward` mode, `Connection: X-Vcap-Request-Id` the
/// request id the access log shows, and so on (GoRouter's `hop_by_hop_headers_to_filter`
/// protects the same). With `keep_upgrade`, `Upgrade` and `Connection: upgrade` survive so an
/// authorized upgrade can be forwarded.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names present finds which hop-by-hop ones are there: usually none in a
    // request, and only `Connection: keep-alive` in a backend's response. They are kept as the
    // map's own keys: removing by `&str` would parse the name again.
    let mut present: [Option<HeaderName>; HOP_BY_HOP.len()] = Default::default();
    let mut upgrade = false;
    for k in h.keys() {
        if *k == UPGRADE {
            upgrade = true;
        } else if let Some(i) = HOP_BY_HOP.iter().position(|n| *n == k.as_str()) {
            present[i] = Some(k.clone());
        }
    }
    if upgrade || present.iter().any(Option::is_some) {
        // What `Connection` names besides the hop-by-hop headers removed below anyway and
        // `close`, which names no header.
        let mut named: Vec<HeaderName> = Vec::new();
        let tokens = h
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim);
        for t in tokens {
            let removed_anyway = ["close", UPGRADE.as_str()]
                .into_iter()
                .chain(HOP_BY_HOP)
                .any(|n| t.eq_ignore_ascii_case(n));
            if t.is_empty() || removed_anyway || vouched(t) {
                continue;
            }
            if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
                named.push(n);
            }
        }
        for n in named {
            h.remove(n);
        }
        for n in present.into_iter().flatten() {
            h.remove(n);
        }
        if upgrade && !keep_upgrade {
            h.remove(UPGRADE);
        }
    }
    if keep_upgrade {
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// [`strip_hop_by_hop`] for a request on its way to a backend, except that `TE: trailers` goes on
/// (as `te: trailers` alone): gRPC clients send it and gRPC servers look for it, to know that no
/// proxy on the way drops the trailers their status travels in. Go's reverse proxy (so
/// GoRouter) and Envoy pass it on the same way.
pub fn strip_request_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let te_trailers = lists(h, TE, "trailers");
    strip_hop_by_hop(h, keep_upgrade);
    if te_trailers {
        h.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// Joins an h2 request's `Cookie` fields into one, separated by `; `. An h2 client may send each
/// cookie as a field of its own (RFC 9113 §8.2.3; browsers do, for HPACK), and an HTTP/1.1 app
/// that reads one `Cookie` header (as RFC 6265 lets it) would see only some of its cookies. Go's
/// h2 server, so GoRouter, joins them the same way.
pub fn join_cookies(h: &mut HeaderMap) {
    let mut values = h.get_all(COOKIE).iter().map(HeaderValue::as_bytes);
    let (Some(first), Some(second)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = first.to_vec();
    for v in std::iter::once(second).chain(values) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v);
    }
    // Each part was a valid value, and `; ` is too.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(COOKIE, v);
    }
}

/// Keeps a valid UUID request id, else sets a new one; returns the value used.
pub fn request_id(h: &mut HeaderMap) -> String {
    if let Some(v) = h.get(X_VCAP_REQUEST_ID).and_then(|v| v.to_str().ok()) {
        if uuid::Uuid::try_parse(v).is_ok() {
            return v.to_string();
        }
    }
    // Encoded on the stack: `to_string` would go through the formatter.
    let mut buf = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert(X_VCAP_REQUEST_ID, v);
    }
    id.to_string()
}

fn is_hex(s: &str, lens: &[usize]) -> bool {
    lens.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `v` as `N` lowercase hex digits (zero-padded), as a header value.
fn hex<const N: usize>(v: u128) -> HeaderValue {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = DIGITS[((v >> (4 * (N - 1 - i))) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&out).expect("hex digits are a valid header value")
}

/// Continues an incoming B3 trace (new span, parent = incoming span) or starts one; with
/// `w3c_key` (`tracing.w3c`), does the same for W3C Trace Context under the same span id.
///
/// A valid incoming `traceparent` keeps its trace id and flags, gets the gateway's span as its
/// parent id, and its `tracestate` gets `<key>=<span>` in front (an older entry of the key
/// dropped, at most 32 members and 512 bytes kept). Without one (absent, repeated or malformed),
/// the trace is B3's, sampled, and `tracestate` is the gateway's entry alone. A B3 trace that
/// does not come in is the `traceparent`'s when there is one, so both name one trace.
pub fn trace(h: &mut HeaderMap, w3c_key: Option<&str>) {
    let span = rand::random::<u64>().max(1);
    let w3c_in = w3c_key.and_then(|_| traceparent(h));
    let b3_in = h
        .get(B3_TRACE)
        .and_then(|v| v.to_str().ok())
        .filter(|t| is_hex(t, &[16, 32]))
        .and_then(|t| u128::from_str_radix(t, 16).ok());
    let trace = match b3_in {
        Some(trace) => {
            let parent = h
                .get(B3_SPAN)
                .filter(|v| v.to_str().is_ok_and(|s| is_hex(s, &[16])))
                .cloned();
            match parent {
                Some(p) => h.insert(B3_PARENT, p),
                None => h.remove(B3_PARENT),
            };
            trace
        }
        None => {
            let trace = w3c_in.map_or_else(rand::random::<u128>, |(t, _)| t);
            h.insert(B3_TRACE, hex::<32>(trace));
            h.remove(B3_PARENT);
            trace
        }
    };
    h.insert(B3_SPAN, hex::<16>(u128::from(span)));
    let Some(key) = w3c_key else {
        return;
    };
    let own = format!("{key}={span:016x}");
    let (trace, flags, state) = match w3c_in {
        Some((trace, flags)) => (trace, flags, continued_state(h, key, own)),
        // An all-zero trace id is invalid in W3C (B3 lets it through).
        None => (
            if trace == 0 {
                rand::random::<u128>().max(1)
            } else {
                trace
            },
            0x01,
            own,
        ),
    };
    let parent = format!("00-{trace:032x}-{span:016x}-{flags:02x}");
    h.insert(
        TRACEPARENT,
        HeaderValue::try_from(parent).expect("hex digits and dashes are a valid header value"),
    );
    // The members kept came from header values, and the key was checked by the config.
    match HeaderValue::try_from(state) {
        Ok(s) => h.insert(TRACESTATE, s),
        Err(_) => h.remove(TRACESTATE),
    };
}

/// A valid incoming `traceparent`'s trace id and flags (W3C Trace Context §3.2); `None` when it
/// is absent, sent more than once or malformed. A later version is read as version 00 and keeps
/// only the sampled flag.
fn traceparent(h: &HeaderMap) -> Option<(u128, u8)> {
    let mut values = h.get_all(TRACEPARENT).iter();
    let v = values.next()?.as_bytes();
    if values.next().is_some() {
        return None;
    }
    let lower_hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let version = v.get(..2)?;
    let future = version != b"00";
    let shaped = v.len() == 55 || (future && v.len() > 55 && v[55] == b'-');
    if !shaped || version == b"ff" || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let (t, p, f) = (&v[3..35], &v[36..52], &v[53..55]);
    if !(lower_hex(version) && lower_hex(t) && lower_hex(p) && lower_hex(f)) {
        return None;
    }
    let num = |s: &[u8]| {
        std::str::from_utf8(s)
            .ok()
            .and_then(|s| u128::from_str_radix(s, 16).ok())
    };
    let (trace, parent, flags) = (num(t)?, num(p)?, num(f)? as u8);
    let flags = if future { flags & 0x01 } else { flags };
    (trace != 0 && parent != 0).then_some((trace, flags))
}

/// `own` in front of the incoming `tracestate`'s members, without an older one of `key`.
fn continued_state(h: &HeaderMap, key: &str, own: String) -> String {
    let mut out = own;
    let mut members = 1;
    let incoming = h.get_all(TRACESTATE).iter().filter_map(|v| v.to_str().ok());
    for member in incoming.flat_map(|v| v.split(',')).map(str::trim) {
        let Some((k, _)) = member.split_once('=') else {
            continue;
        };
        if k == key {
            continue;
        }
        if members == TRACESTATE_MEMBERS || out.len() + 1 + member.len() > TRACESTATE_LEN {
            break;
        }
        out.push(',');
        out.push_str(member);
        members += 1;
    }
    out
}

/// The path a request is routed by: its path as the app will read it, so that a route's policy
/// cannot be sidestepped by spelling another route's path differently. Percent-encoded
/// unreserved characters are decoded (`/%61dmin` is `/admin`), and encoded slashes and
/// backslashes (`%2F`, `%5C`, `\`) are taken as the `/` many apps decode them to
/// (`/admin%2Fx` is under `/admin`); other escapes stay as they are. `None` when a segment is
/// then `.` or `..` (`/api/../admin`, `/api/%2e%2e/admin`): where it leads depends on the app,
/// and clients resolve such segments before they send (RFC 3986 §5.2.4), so the request is
/// refused. The app still gets the path as sent.
pub fn routing_path(path: &str) -> Option<std::borrow::Cow<'_, str>> {
    use std::borrow::Cow;
    let b = path.as_bytes();
    if !b.iter().any(|&c| c == b'%' || c == b'\\') {
        // The common case: nothing to decode, and a dot segment would show as `/.` (or, in a
        // path without its leading `/`, which no request has, at the start).
        return match (path.starts_with('.') || path.contains("/.")) && has_dot_segment(path) {
            true => None,
            false => Some(Cow::Borrowed(path)),
        };
    }
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let escaped = match (
            c,
            b.get(i + 1).and_then(|&h| hex(h)),
            b.get(i + 2).and_then(|&l| hex(l)),
        ) {
            (b'%', Some(h), Some(l)) => Some(h << 4 | l),
            _ => None,
        };
        match escaped {
            Some(d) if d.is_ascii_alphanumeric() || matches!(d, b'-' | b'.' | b'_' | b'~') => {
                out.push(d as char);
                i += 3;
            }
            Some(b'/' | b'\\') => {
                out.push('/');
                i += 3;
            }
            Some(_) => {
                out.push_str(&path[i..i + 3]);
                i += 3;
            }
            None if c == b'\\' => {
                out.push('/');
                i += 1;
            }
            None => {
                // Copy the run up to the next byte that needs a look (keeps UTF-8 whole).
                let end = b[i + 1..]
                    .iter()
                    .position(|&c| c == b'%' || c == b'\\')
                    .map_or(b.len(), |p| i + 1 + p);
                out.push_str(&path[i..end]);
                i = end;
            }
        }
    }
    (!has_dot_segment(&out)).then_some(Cow::Owned(out))
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|s| s == "." || s == "..")
}

/// Whether an HTTP/1.1 request's `Transfer-Encoding` (if any) is `chunked` alone, the one
/// transfer coding the gateway (through hyper) takes off; anything else would reach the backend
/// still coded, as Go's server refuses it too. (`chunked` not last is hyper's 400 already.)
pub fn transfer_coding_ok(h: &HeaderMap) -> bool {
    let mut codings = h
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    match codings.next() {
        None => true,
        Some(first) => first.eq_ignore_ascii_case(b"chunked") && codings.next().is_none(),
    }
}

/// The size of an HTTP/2 request's header list as RFC 9113 §6.5.2 counts it (and the `h2` crate
/// against `SETTINGS_MAX_HEADER_LIST_SIZE`): each field line's name and value in octets plus 32,
/// pseudo-header fields included.
pub fn h2_header_list_size<B>(req: &http::Request<B>) -> usize {
    const FIELD: usize = 32;
    let uri = req.uri();
    let pseudo = [
        Some((":method", req.method().as_str())),
        uri.scheme_str().map(|s| (":scheme", s)),
        uri.authority().map(|a| (":authority", a.as_str())),
        uri.path_and_query().map(|p| (":path", p.as_str())),
    ];
    let pseudo: usize = pseudo
        .iter()
        .flatten()
        .map(|(name, value)| name.len() + value.len() + FIELD)
        .sum();
    let fields: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + FIELD)
        .sum();
    pseudo + fields
}

/// Whether the request asks for the trace headers with the operator's key (`X-Vcap-Trace`). A
/// header carrying the key is removed, so that the key never reaches an app or the access log;
/// one that does not is passed on as any other header.
pub fn trace_requested(h: &mut HeaderMap, key: &Secret) -> bool {
    let asked = h
        .get(X_VCAP_TRACE)
        .is_some_and(|v| key.matches(v.as_bytes()));
    if asked {
        h.remove(X_VCAP_TRACE);
    }
    asked
}

/// GoRouter's answer to a trace request: `X-Vcap-Router`, the gateway's address the client
/// connected to, and `X-Vcap-Backend` and `X-Cf-RouteEndpoint`, the endpoint the request went to
/// (`host:port`).
pub fn add_trace(h: &mut HeaderMap, router: Option<IpAddr>, endpoint: &str) {
    if let Some(ip) = router {
        if let Ok(v) = HeaderValue::from_str(&ip.to_string()) {
            h.insert(X_VCAP_ROUTER, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(endpoint) {
        h.insert(X_VCAP_BACKEND, v.clone());
        h.insert(X_CF_ROUTE_ENDPOINT, v);
    }
}

/// Appends the client address to `X-Forwarded-For`; returns the new value.
pub fn forwarded_for(h: &mut HeaderMap, client_ip: IpAddr) -> String {
    let mut value = String::with_capacity(24);
    // What earlier proxies appended, in order; empty and non-text values are left out.
    let earlier = h
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok());
    for v in earlier.filter(|v| !v.trim().is_empty()) {
        value.push_str(v);
        value.push_str(", ");
    }
    crate::accesslog::push_ip(&mut value, client_ip);
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(X_FORWARDED_FOR, v);
    }
    value
}

/// The XFCC value for a leaf certificate in the given format.
pub fn xfcc_value(peer: &PeerCert, format: XfccFormat) -> String {
    match format {
        XfccFormat::Raw => base64::engine::general_purpose::STANDARD.encode(&peer.der),
        XfccFormat::Envoy => format!(
            "Hash={};Subject=\"{}\"",
            peer.sha256_hex(),
            peer.envoy_subject.replace('"', "\\\"")
        ),
    }
}

/// The XFCC header for a leaf certificate, made once per connection and format.
fn xfcc_header(peer: &PeerCert, format: XfccFormat) -> Option<HeaderValue> {
    let slot = match format {
        XfccFormat::Raw => &peer.xfcc[0],
        XfccFormat::Envoy => &peer.xfcc[1],
    };
    slot.get_or_init(|| HeaderValue::from_str(&xfcc_value(peer, format)).ok())
        .clone()
}

/// Applies an XFCC mode (SPEC §8).
pub fn apply_xfcc(h: &mut HeaderMap, mode: XfccMode, format: XfccFormat, peer: Option<&PeerCert>) {
    match mode {
        XfccMode::AlwaysForward => {}
        XfccMode::Forward => {
            if peer.is_none() {
                h.remove(XFCC);
            }
        }
        XfccMode::SanitizeSet => {
            h.remove(XFCC);
            if let Some(v) = peer.and_then(|p| xfcc_header(p, format)) {
                h.insert(XFCC, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed_by_the_path_the_app_will_read() {
        let routed = |p: &str| routing_path(p).map(|c| c.into_owned());
        for (sent, path) in [
            ("/admin", "/admin"),
            ("/", "/"),
            ("/a/.well-known/x/.../y", "/a/.well-known/x/.../y"),
            ("/%61dmin", "/admin"),
            ("/%7Euser/%2d", "/~user/-"),
            ("/admin%2Fx", "/admin/x"),
            ("/admin%2fx%5Cy", "/admin/x/y"),
            ("/admin\\x", "/admin/x"),
            ("/files/a%20b%3F%", "/files/a%20b%3F%"),
            ("/caf%C3%A9/é%zz", "/caf%C3%A9/é%zz"),
        ] {
            assert_eq!(routed(sent).as_deref(), Some(path), "{sent}");
        }
        for sent in [
            "/api/../admin",
            "/api/./admin",
            "/api/..",
            "/..",
            "/api/%2e%2e/admin",
            "/api/%2E./admin",
            "/api/..%2Fadmin",
            "/api%2F..%2Fadmin",
            "/api\\..\\admin",
            "/api%5C..%5Cadmin",
            // No request's path lacks its leading `/`, but the rule holds without it too.
            "../admin",
            "./x",
        ] {
            assert_eq!(routed(sent), None, "{sent}");
        }
        assert!(matches!(
            routing_path("/plain/path"),
            Some(std::borrow::Cow::Borrowed(_))
        ));
    }

    #[test]
    fn underscore_lookalikes_of_vouched_headers_are_dropped() {
        let mut h = HeaderMap::new();
        for name in [
            "x_forwarded_client_cert",
            "X_CF_InstanceID",
            "x-forwarded_for",
            "x_b3_traceid",
            "trace_state",
            "x_custom_header",
            "x-forwarded-client-cert",
            "x_tenant",
        ] {
            h.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        drop_underscore_lookalikes(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        left.sort();
        assert_eq!(
            left,
            [
                "trace_state",
                "x-forwarded-client-cert",
                "x_custom_header",
                "x_tenant"
            ]
        );
    }

    #[test]
    fn h2c_is_taken_out_of_upgrade() {
        let after = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(UPGRADE, HeaderValue::from_str(v).unwrap());
            }
            h.insert(
                HTTP2_SETTINGS,
                HeaderValue::from_static("AAMAAABkAAQAoAAAAAIAAAAA"),
            );
            refuse_h2c(&mut h);
            let left: Vec<_> = h
                .get_all(UPGRADE)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect();
            (left, h.contains_key(HTTP2_SETTINGS))
        };
        assert_eq!(after(&["h2c"]), (vec![], false));
        assert_eq!(after(&["H2C"]), (vec![], false));
        assert_eq!(after(&["websocket"]), (vec!["websocket".to_string()], true));
        assert_eq!(
            after(&["h2c, websocket"]),
            (vec!["websocket".to_string()], false)
        );
        assert_eq!(
            after(&["websocket", "h2c"]),
            (vec!["websocket".to_string()], false)
        );
        assert_eq!(after(&["h2"]), (vec!["h2".to_string()], true));
    }

    #[test]
    fn only_chunked_alone_is_a_transfer_coding_the_gateway_takes() {
        let ok = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(TRANSFER_ENCODING, HeaderValue::from_str(v).unwrap());
            }
            transfer_coding_ok(&h)
        };
        assert!(ok(&[]));
        assert!(ok(&["chunked"]));
        assert!(ok(&[" Chunked "]));
        assert!(ok(&["chunked,"]));
        assert!(!ok(&["gzip, chunked"]));
        assert!(!ok(&["gzip", "chunked"]));
        assert!(!ok(&["chunked", "chunked"]));
        assert!(!ok(&["identity"]));
        assert!(!ok(&["chunked;q=1"]));
    }

    #[test]
    fn forwarded_for_appends_the_client_to_what_earlier_proxies_sent() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let after = |sent: &[&str]| {
            let mut h = HeaderMap::new();
            for v in sent {
                h.append(X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
            }
            let value = forwarded_for(&mut h, ip);
            let all: Vec<_> = h.get_all(X_FORWARDED_FOR).iter().collect();
            assert_eq!(all, [value.as_str()], "one header, equal to what is logged");
            value
        };
        assert_eq!(after(&[]), "10.0.0.7");
        assert_eq!(after(&["1.2.3.4"]), "1.2.3.4, 10.0.0.7");
        assert_eq!(
            after(&["1.2.3.4, 5.6.7.8", "9.9.9.9"]),
            "1.2.3.4, 5.6.7.8, 9.9.9.9, 10.0.0.7"
        );
        assert_eq!(after(&["", " ", "1.2.3.4"]), "1.2.3.4, 10.0.0.7");
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(forwarded_for(&mut h, v6), "2001:db8::1");
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));

        // Tokens in any case; `close` and the hop-by-hop names need no lookup of their own.
        let mut h = HeaderMap::new();
        h.append(CONNECTION, HeaderValue::from_static("Close, X-Secret"));
        h.append(
            CONNECTION,
            HeaderValue::from_static(" Keep-Alive ,TE,, x-other"),
        );
        for n in ["x-secret", "x-other", "keep-alive", "x-keep"] {
            h.insert(n, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-keep"]);
    }

    #[test]
    fn connection_never_names_away_the_headers_the_gateway_vouches_for() {
        let vouched_names = [
            "x-forwarded-client-cert",
            "x-forwarded-for",
            "x-vcap-request-id",
            "x-request-start",
            "x-cf-instanceid",
            "x-b3-traceid",
            "b3",
            "traceparent",
            "tracestate",
        ];
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_static(
                "keep-alive, X-Forwarded-Client-Cert, x-forwarded-for, X-VCAP-Request-Id, \
                 X-Request-Start, X-CF-InstanceID, X-B3-TraceId, B3, Traceparent, tracestate, \
                 x-private, x-cf, x-b3",
            ),
        );
        for n in vouched_names
            .into_iter()
            .chain(["x-private", "x-cf", "x-b3"])
        {
            h.insert(HeaderName::from_static(n), HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h, false);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        let mut expect = vouched_names.to_vec();
        expect.sort_unstable();
        assert_eq!(left, expect, "only the names outside the vouched ones go");
    }

    #[test]
    fn an_h2_requests_cookie_fields_are_joined() {
        let mut h = HeaderMap::new();
        for c in ["a=1", "b=2", "__VCAP_ID__=x"] {
            h.append(COOKIE, HeaderValue::from_static(c));
        }
        h.insert("x-keep", HeaderValue::from_static("1"));
        join_cookies(&mut h);
        assert_eq!(
            h.get_all(COOKIE).iter().collect::<Vec<_>>(),
            ["a=1; b=2; __VCAP_ID__=x"]
        );
        assert_eq!(h.len(), 2);
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut h);
        assert_eq!(h[COOKIE], "a=1");
    }

    #[test]
    fn a_request_keeps_te_trailers_alone() {
        let mut h = HeaderMap::new();
        h.append(TE, HeaderValue::from_static("gzip;q=0.5"));
        h.append(TE, HeaderValue::from_static(" Trailers , deflate"));
        h.insert(CONNECTION, HeaderValue::from_static("TE"));
        strip_request_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h[TE], "trailers");
        // Without the token, TE goes as any hop-by-hop header; a response never keeps it.
        for request in [true, false] {
            let mut h = HeaderMap::new();
            h.insert(
                TE,
                HeaderValue::from_static(if request { "gzip" } else { "trailers" }),
            );
            match request {
                true => strip_request_hop_by_hop(&mut h, false),
                false => strip_hop_by_hop(&mut h, false),
            }
            assert!(h.is_empty(), "{h:?}");
        }
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_loses_the_rest() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h[UPGRADE], "websocket");
        assert_eq!(h[CONNECTION], "upgrade");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_stripped() {
        for name in HOP_BY_HOP.into_iter().chain([UPGRADE.as_str()]) {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("x"));
            h.insert("x-keep", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h.len(), 1, "{name}");
        }
        // Nothing hop-by-hop, upgrade kept: only `Connection: upgrade` is added.
        let mut h = HeaderMap::new();
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 2);
        assert_eq!(h[CONNECTION], "upgrade");
    }

    #[test]
    fn b3_starts_a_trace_in_lowercase_hex() {
        let mut h = HeaderMap::new();
        h.insert(B3_PARENT, HeaderValue::from_static("0123456789abcdef"));
        trace(&mut h, None);
        let ok = |v: &HeaderValue, n: usize| {
            v.len() == n && v.as_bytes().iter().all(|b| b"0123456789abcdef".contains(b))
        };
        assert!(ok(&h[B3_TRACE], 32), "{:?}", h[B3_TRACE]);
        assert!(ok(&h[B3_SPAN], 16), "{:?}", h[B3_SPAN]);
        assert!(!h.contains_key(B3_PARENT));
        assert_eq!(hex::<16>(0xab), "00000000000000ab");
        assert_eq!(hex::<32>(u128::MAX), "ffffffffffffffffffffffffffffffff");
    }

    #[test]
    fn request_id_kept_only_when_uuid() {
        let mut h = HeaderMap::new();
        h.insert(X_VCAP_REQUEST_ID, HeaderValue::from_static("not-a-uuid"));
        let id = request_id(&mut h);
        assert!(uuid::Uuid::try_parse(&id).is_ok());
        // Hyphenated lower case, as GoRouter sends it, and the header is what is logged.
        assert_eq!((id.len(), id.to_lowercase()), (36, id.clone()));
        assert_eq!(h[X_VCAP_REQUEST_ID], id.as_str());
        assert_eq!(request_id(&mut h), id);
    }

    #[test]
    fn b3_continues_a_trace() {
        let mut h = HeaderMap::new();
        h.insert(
            B3_TRACE,
            HeaderValue::from_static("0123456789abcdef0123456789abcdef"),
        );
        h.insert(B3_SPAN, HeaderValue::from_static("0123456789abcdef"));
        h.insert(TRACEPARENT, HeaderValue::from_static("caller's own"));
        trace(&mut h, None);
        assert_eq!(h[B3_TRACE], "0123456789abcdef0123456789abcdef");
        assert_eq!(h[B3_PARENT], "0123456789abcdef");
        assert_ne!(h[B3_SPAN], "0123456789abcdef");
        // W3C off: its headers are the caller's business.
        assert_eq!(h[TRACEPARENT], "caller's own");
        assert!(!h.contains_key(TRACESTATE));
    }

    /// The ids of a `traceparent` the gateway wrote: (trace, parent, flags).
    fn w3c_ids(h: &HeaderMap) -> (String, String, String) {
        let v = h[TRACEPARENT].to_str().unwrap();
        let parts: Vec<&str> = v.split('-').collect();
        assert_eq!((parts.len(), parts[0]), (4, "00"), "{v}");
        (parts[1].into(), parts[2].into(), parts[3].into())
    }

    #[test]
    fn w3c_starts_a_trace_with_the_b3_ids() {
        let mut h = HeaderMap::new();
        trace(&mut h, Some("portcullis"));
        let (t, p, f) = w3c_ids(&h);
        assert_eq!(
            (t.as_str(), p.as_str(), f.as_str()),
            (
                h[B3_TRACE].to_str().unwrap(),
                h[B3_SPAN].to_str().unwrap(),
                "01"
            )
        );
        assert_eq!(h[TRACESTATE], format!("portcullis={p}").as_str());
        // A caller's 64-bit B3 trace is the W3C trace, zero-padded.
        let mut h = HeaderMap::new();
        h.insert(B3_TRACE, HeaderValue::from_static("00000000000000ab"));
        trace(&mut h, Some("portcullis"));
        assert_eq!(w3c_ids(&h).0, "000000000000000000000000000000ab");
    }

    #[test]
    fn w3c_continues_a_valid_traceparent_and_its_tracestate() {
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        );
        h.append(
            TRACESTATE,
            HeaderValue::from_static("acme@portcullis=1111111111111111, congo=t61rcWkgMzE"),
        );
        h.append(
            TRACESTATE,
            HeaderValue::from_static("rojo=00f067aa0ba902b7,junk"),
        );
        trace(&mut h, Some("acme@portcullis"));
        let (t, p, f) = w3c_ids(&h);
        assert_eq!(
            (t.as_str(), f.as_str()),
            ("4bf92f3577b34da6a3ce929d0e0e4736", "00")
        );
        assert_eq!(p, h[B3_SPAN].to_str().unwrap());
        assert_ne!(p, "00f067aa0ba902b7");
        // No B3 came in: B3 joins the W3C trace.
        assert_eq!(h[B3_TRACE], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            h[TRACESTATE],
            format!("acme@portcullis={p},congo=t61rcWkgMzE,rojo=00f067aa0ba902b7").as_str()
        );
        assert_eq!(h.get_all(TRACESTATE).iter().count(), 1);
        // A later version is read as 00 and keeps only the sampled flag.
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_static(
                "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff-what-comes-later",
            ),
        );
        trace(&mut h, Some("portcullis"));
        assert_eq!(w3c_ids(&h).2, "01");
        // At most 32 members are passed on.
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let many: Vec<String> = (0..40).map(|i| format!("v{i}=x")).collect();
        h.insert(TRACESTATE, HeaderValue::from_str(&many.join(",")).unwrap());
        trace(&mut h, Some("portcullis"));
        let state = h[TRACESTATE].to_str().unwrap();
        assert_eq!(state.split(',').count(), 32, "{state}");
        assert!(state.ends_with(",v30=x"), "{state}");
    }

    #[test]
    fn w3c_replaces_a_malformed_or_repeated_traceparent() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "",
        ] {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, HeaderValue::from_static(bad));
            h.insert(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
            trace(&mut h, Some("portcullis"));
            let (t, p, f) = w3c_ids(&h);
            assert_ne!(t, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert_eq!(
                (t.as_str(), f.as_str()),
                (h[B3_TRACE].to_str().unwrap(), "01"),
                "{bad}"
            );
            assert_eq!(h[TRACESTATE], format!("portcullis={p}").as_str(), "{bad}");
        }
        let mut h = HeaderMap::new();
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.append(TRACEPARENT, HeaderValue::from_static(valid));
        h.append(TRACEPARENT, HeaderValue::from_static(valid));
        trace(&mut h, Some("portcullis"));
        assert_ne!(w3c_ids(&h).0, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(h.get_all(TRACEPARENT).iter().count(), 1);
    }
}
