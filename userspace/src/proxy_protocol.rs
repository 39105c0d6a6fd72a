//! The PROXY protocol (HAProxy's, v1 text and v2 binary): the header a load balancer in front of
//! the gateway sends before anything else, naming the client it accepted.
//!
//! Only peers in `listen.proxy_protocol.from` are read this way, and each of them must send a
//! header: a connection from one of them that does not is closed. Everyone else is served as a
//! direct client, so a caller cannot name itself someone else. The client named by the header is
//! the connection's client from then on: the access log, `X-Forwarded-For`, deny learning and the
//! gate's source checks all see it instead of the load balancer.
//!
//! The header is taken off the socket exactly (peeked, then read to its last byte), so the TLS
//! handshake that follows reads the socket itself and kernel TLS is unaffected. Parsing is
//! `ppp`'s; this module only frames the header.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::{v1, v2};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// v2's signature (its first 12 bytes) and fixed part (signature, version and command, family
/// and protocol, payload length); v1's start, and its longest header (CRLF included). The XDP
/// gate frames headers with the same constants.
const V2_SIGNATURE: &[u8; 12] = &portcullis_common::PROXY_V2_SIGNATURE;
const V2_FIXED: usize = portcullis_common::PROXY_V2_FIXED as usize;
const V1_PREFIX: &[u8; 6] = &portcullis_common::PROXY_V1_PREFIX;
const V1_MAX: usize = portcullis_common::PROXY_V1_MAX as usize;
/// How long to wait before looking again at a header that has not arrived whole.
const RETRY: Duration = Duration::from_millis(5);

/// What a header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A client's connection, relayed: its address.
    Proxied(SocketAddr),
    /// The balancer's own connection (v2 `LOCAL`, v1 `UNKNOWN`, or an address family other than
    /// IP): the peer's address stands.
    Local,
}

impl Header {
    /// The label of `portcullis_proxy_protocol_headers_total` for this header.
    pub fn label(&self) -> &'static str {
        match self {
            Header::Proxied(_) => "proxied",
            Header::Local => "local",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("no complete PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed before its PROXY protocol header was complete")]
    Closed,
    #[error("not a PROXY protocol header: {0}")]
    Invalid(String),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

impl HeaderError {
    /// The label of `portcullis_proxy_protocol_headers_total` for this failure.
    pub fn label(&self) -> &'static str {
        match self {
            HeaderError::Timeout(_) => "timeout",
            HeaderError::Closed | HeaderError::Io(_) => "closed",
            HeaderError::Invalid(_) => "invalid",
        }
    }
}

/// Reads the header at the start of `tcp`, taking exactly its bytes, within `timeout`.
pub async fn read(tcp: &mut TcpStream, timeout: Duration) -> Result<Header, HeaderError> {
    tokio::time::timeout(timeout, read_header(tcp))
        .await
        .unwrap_or(Err(HeaderError::Timeout(timeout)))
}

async fn read_header(tcp: &mut TcpStream) -> Result<Header, HeaderError> {
    let len = header_len(tcp).await?;
    let mut bytes = vec![0; len];
    tcp.read_exact(&mut bytes).await?;
    parse(&bytes)
}

/// The header at the start of `bytes` and its length; `None` while it is incomplete.
pub fn decode(bytes: &[u8]) -> Result<Option<(Header, usize)>, HeaderError> {
    match framed_len(bytes)? {
        Some(len) if len <= bytes.len() => Ok(Some((parse(&bytes[..len])?, len))),
        _ => Ok(None),
    }
}

/// Peeks until the header's length is known: v2 says it in its fixed part, v1 ends at CRLF.
async fn header_len(tcp: &TcpStream) -> Result<usize, HeaderError> {
    let mut buf = [0u8; V1_MAX];
    let mut seen = 0;
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        if let Some(len) = framed_len(&buf[..n])? {
            return Ok(len);
        }
        // Incomplete: the rest is still on its way. peek returns at once while any byte is
        // waiting, so look again shortly (bounded by the caller's deadline).
        if n == seen {
            tokio::time::sleep(RETRY).await;
        }
        seen = n;
    }
}

/// The length of the header starting `bytes`, `None` while that cannot be told yet.
fn framed_len(bytes: &[u8]) -> Result<Option<usize>, HeaderError> {
    let starts = |prefix: &[u8]| {
        bytes[..bytes.len().min(prefix.len())] == prefix[..bytes.len().min(prefix.len())]
    };
    if starts(V2_SIGNATURE) {
        if bytes.len() < V2_FIXED {
            return Ok(None);
        }
        let payload = u16::from_be_bytes([bytes[14], bytes[15]]);
        return Ok(Some(V2_FIXED + usize::from(payload)));
    }
    if starts(V1_PREFIX) {
        if let Some(lf) = bytes.iter().position(|&b| b == b'\n') {
            return Ok(Some(lf + 1));
        }
        if bytes.len() >= V1_MAX {
            return Err(HeaderError::Invalid(format!(
                "a v1 header has no line end within {V1_MAX} bytes"
            )));
        }
        return Ok(None);
    }
    Err(HeaderError::Invalid(format!(
        "starts with {:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(8)])
    )))
}

/// Parses one whole header (`ppp`).
fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
    let invalid = |e: &dyn std::fmt::Display| HeaderError::Invalid(e.to_string());
    if bytes.starts_with(V2_SIGNATURE) {
        let h = v2::Header::try_from(bytes).map_err(|e| invalid(&e))?;
        let source = match (h.command, h.addresses) {
            (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                SocketAddr::from((a.source_address, a.source_port))
            }
            (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                SocketAddr::from((a.source_address, a.source_port))
            }
            // LOCAL, or a family without an IP address (the spec: use the real one).
            _ => return Ok(Header::Local),
        };
        return Ok(proxied(source));
    }
    // v1 is ASCII; `ppp` 2.3 also slices the line at byte offsets that other text would split
    // inside a character (a panic, found by the fuzz target).
    if !bytes.is_ascii() {
        return Err(HeaderError::Invalid(
            "a v1 header holds a byte that is not ASCII".into(),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| invalid(&e))?;
    let h = v1::Header::try_from(text).map_err(|e| invalid(&e))?;
    Ok(match h.addresses {
        v1::Addresses::Tcp4(a) => proxied(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => proxied(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => Header::Local,
    })
}

/// An IPv4 client relayed as `::ffff:a.b.c.d` is that IPv4 address, as for direct clients.
fn proxied(source: SocketAddr) -> Header {
    Header::Proxied(SocketAddr::new(source.ip().to_canonical(), source.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        let len = (addresses.len() + tlvs.len()) as u16;
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(addresses);
        h.extend_from_slice(tlvs);
        h
    }

    /// Decodes a header followed by TLS's first bytes, which are left alone.
    fn whole(bytes: &[u8]) -> Result<Header, HeaderError> {
        let mut input = bytes.to_vec();
        input.extend_from_slice(b"\x16\x03\x01");
        let (header, len) = decode(&input)?.expect("complete");
        assert_eq!(len, bytes.len(), "the frame is the whole header");
        Ok(header)
    }

    #[test]
    fn v1_names_the_client() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 443\r\n";
        assert_eq!(
            whole(h).unwrap(),
            Header::Proxied("203.0.113.7:40000".parse().unwrap())
        );
        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n";
        assert_eq!(
            whole(h).unwrap(),
            Header::Proxied("[2001:db8::7]:40000".parse().unwrap())
        );
        assert_eq!(whole(b"PROXY UNKNOWN\r\n").unwrap(), Header::Local);
    }

    #[test]
    fn v2_names_the_client_or_keeps_the_peer() {
        let mut a = vec![198, 51, 100, 9, 10, 0, 0, 1];
        a.extend_from_slice(&40001u16.to_be_bytes());
        a.extend_from_slice(&443u16.to_be_bytes());
        // A TLV (AWS's VPC endpoint id, type 0xEA) is skipped.
        let tlv = [0xEA, 0x00, 0x04, 1, 2, 3, 4];
        assert_eq!(
            whole(&v2(1, 0x11, &a, &tlv)).unwrap(),
            Header::Proxied("198.51.100.9:40001".parse().unwrap())
        );
        let mut a6 = Vec::new();
        a6.extend_from_slice(
            &"2001:db8::9"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        a6.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        a6.extend_from_slice(&40002u16.to_be_bytes());
        a6.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(
            whole(&v2(1, 0x21, &a6, &[])).unwrap(),
            Header::Proxied("[2001:db8::9]:40002".parse().unwrap())
        );
        // An IPv4 client mapped into IPv6 is that IPv4 address.
        let mut mapped = Vec::new();
        mapped.extend_from_slice(
            &"::ffff:192.0.2.5"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        mapped.extend_from_slice(&[0; 16]);
        mapped.extend_from_slice(&[0, 80, 1, 187]);
        assert_eq!(
            whole(&v2(1, 0x21, &mapped, &[])).unwrap(),
            Header::Proxied("192.0.2.5:80".parse().unwrap())
        );
        // LOCAL (a balancer's health check) and UNSPEC keep the peer's address.
        assert_eq!(whole(&v2(0, 0x00, &[], &[])).unwrap(), Header::Local);
        assert_eq!(whole(&v2(1, 0x00, &[], &[])).unwrap(), Header::Local);
    }

    #[test]
    fn incomplete_headers_wait_and_others_are_refused_at_once() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 443\r\n";
        for cut in [1, 5, 6, 20, h.len() - 1] {
            assert!(matches!(framed_len(&h[..cut]), Ok(None)), "cut at {cut}");
        }
        let h2 = v2(1, 0x11, &[0; 12], &[]);
        for cut in [1, 12, 15] {
            assert!(
                matches!(framed_len(&h2[..cut]), Ok(None)),
                "v2 cut at {cut}"
            );
        }
        // A TLS ClientHello (a client that skipped the header), HTTP, or a v1 line too long.
        for bad in [
            &b"\x16\x03\x01\x02\x00\x01"[..],
            b"GET / HTTP/1.1\r\n",
            b"PROXX TCP4",
            &b"PROXY ".repeat(20)[..],
        ] {
            let e = framed_len(bad).unwrap_err();
            assert_eq!(e.label(), "invalid", "{bad:?}: {e}");
        }
        // Framed but wrong inside: the parser says so.
        for bad in [
            &b"PROXY TCP4 203.0.113.7 10.0.0.1 40000\r\n"[..],
            b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n",
            b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            let len = framed_len(bad).unwrap().unwrap();
            let e = parse(&bad[..len]).unwrap_err();
            assert!(matches!(e, HeaderError::Invalid(_)), "{bad:?}: {e}");
        }
        // Not ASCII, with a character straddling where the line's end is looked for (which
        // made `ppp` panic).
        let bad = "PROXY TCP6 8::7 2001:db8:8::7 20PROXY T1 443\r\u{5f0}2\n".as_bytes();
        let e = decode(bad).unwrap_err();
        assert!(e.to_string().contains("not ASCII"), "{e}");
        // v2 claiming an IPv4 address in fewer bytes than one takes.
        let e = parse(&v2(1, 0x11, &[1, 2, 3], &[])).unwrap_err();
        assert!(matches!(e, HeaderError::Invalid(_)), "{e}");
        // An unknown v2 version.
        let mut bad = v2(1, 0x11, &[0; 12], &[]);
        bad[12] = 0x31;
        assert!(matches!(parse(&bad), Err(HeaderError::Invalid(_))));
    }
}
