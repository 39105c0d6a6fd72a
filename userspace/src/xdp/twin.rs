//! A pure-Rust twin of the XDP classifier: the same decisions and counters from the same maps,
//! written independently over a byte slice. Tests and the fuzz target hold the kernel program
//! to it frame by frame.

use std::collections::{HashMap, HashSet};

use std::net::{Ipv4Addr, Ipv6Addr};

use portcullis_common::{
    sni_hashes, v4_mapped, Addr, AllowKey, Counter, DenyKey, DomainEntry, FlowKey, Proxied,
    DOMAIN_HAS_ALLOWLIST, MAX_DOMAINS, MAX_EXTENSIONS, MAX_SNI_LEN, MAX_VLAN_TAGS, PROXY_V1_MAX,
    PROXY_V2_FIXED, PROXY_V2_SIGNATURE, REJECT_DROP,
};

use super::MapPlan;

/// What the program does with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pass,
    Drop,
    /// Sent back out of the interface it came in on (`XDP_TX`).
    Tx,
}

/// The twin's copy of the maps (FLOWS and PROXIED change as frames are classified).
#[derive(Clone, Debug, Default)]
pub struct TwinMaps {
    pub domains: HashMap<u64, DomainEntry>,
    pub allow: Vec<(u32, AllowKey)>,
    pub deny: HashMap<DenyKey, u64>,
    pub flows: HashMap<FlowKey, u32>,
    pub ports: HashSet<u16>,
    pub reject: u32,
    pub balancers: Vec<(u32, Addr)>,
    pub proxied: HashMap<FlowKey, Proxied>,
}

impl TwinMaps {
    pub fn from_plan(plan: &MapPlan) -> Self {
        TwinMaps {
            domains: plan.domains.iter().copied().collect(),
            allow: plan.allow.clone(),
            ports: plan.ports.iter().copied().collect(),
            reject: plan.reject,
            balancers: plan.balancers.clone(),
            ..Default::default()
        }
    }

    fn is_balancer(&self, src: &Addr) -> bool {
        self.balancers
            .iter()
            .any(|(bits, net)| prefix_matches(src, net, *bits as usize))
    }

    fn allowed(&self, domain: u32, src: &[u8; 16]) -> bool {
        let key: Vec<u8> = domain
            .to_be_bytes()
            .iter()
            .chain(src.iter())
            .copied()
            .collect();
        self.allow.iter().any(|(bits, k)| {
            let stored: Vec<u8> = k.domain_be.iter().chain(k.addr.iter()).copied().collect();
            prefix_matches(&key, &stored, *bits as usize)
        })
    }
}

/// Whether the first `bits` bits of `a` and `b` are equal.
fn prefix_matches(a: &[u8], b: &[u8], bits: usize) -> bool {
    (0..bits).all(|i| {
        let (byte, bit) = (i / 8, 7 - (i % 8));
        (a[byte] >> bit) & 1 == (b[byte] >> bit) & 1
    })
}

/// The outcome for one frame: the action, the counter that moved (domain, counter), and the
/// frame as the program leaves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub action: Action,
    pub counter: Option<(u32, Counter)>,
    pub frame: Vec<u8>,
}

fn get<const N: usize>(f: &[u8], at: usize) -> Option<[u8; N]> {
    f.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

/// `Err(None)`: passes with no counter; `Err(Some(c))`: passes and counts `c` under domain 0.
type Step<T> = Result<T, Option<Counter>>;

struct Parsed {
    key: FlowKey,
    l3: usize,
    v6: bool,
    l4: usize,
    payload: usize,
    payload_len: usize,
    flags: u8,
    seq: u32,
}

fn l2_l4(f: &[u8], maps: &TwinMaps) -> Step<Parsed> {
    let eth: [u8; 14] = get(f, 0).ok_or(None)?;
    let mut proto = be16(&eth, 12);
    let mut off = 14;
    for _ in 0..MAX_VLAN_TAGS {
        if proto != 0x8100 && proto != 0x88a8 {
            break;
        }
        let tag: [u8; 4] = get(f, off).ok_or(None)?;
        proto = be16(&tag, 2);
        off += 4;
    }
    let l3 = off;
    let (src, dst, l4, ip_end) = match proto {
        0x0800 => {
            let ip: [u8; 20] = get(f, off).ok_or(None)?;
            if ip[9] != 6 {
                return Err(None);
            }
            if ip[0] >> 4 != 4 || ip[0] & 0xf < 5 || be16(&ip, 6) & 0x3fff != 0 {
                return Err(Some(Counter::PassIpUnparsed));
            }
            let v4 = |a: &[u8]| portcullis_common::v4_mapped([a[0], a[1], a[2], a[3]]);
            (
                v4(&ip[12..16]),
                v4(&ip[16..20]),
                off + (ip[0] & 0xf) as usize * 4,
                off + be16(&ip, 2) as usize,
            )
        }
        0x86dd => {
            let ip: [u8; 40] = get(f, off).ok_or(None)?;
            if ip[6] != 6 {
                return Err(matches!(ip[6], 0 | 43 | 44 | 60 | 51 | 50 | 135)
                    .then_some(Counter::PassIpUnparsed));
            }
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&ip[8..24]);
            dst.copy_from_slice(&ip[24..40]);
            (src, dst, off + 40, off + 40 + be16(&ip, 4) as usize)
        }
        _ => return Err(None),
    };
    let tcp: [u8; 20] = get(f, l4).ok_or(None)?;
    if !maps.ports.contains(&be16(&tcp, 2)) {
        return Err(None);
    }
    let doff = (tcp[12] >> 4) as usize;
    let payload = l4 + doff * 4;
    if payload > ip_end || doff < 5 {
        return Err(Some(Counter::PassIpUnparsed));
    }
    Ok(Parsed {
        key: FlowKey {
            src,
            dst,
            sport: u16::from_ne_bytes([tcp[0], tcp[1]]),
            dport: u16::from_ne_bytes([tcp[2], tcp[3]]),
        },
        l3,
        v6: proto == 0x86dd,
        l4,
        payload,
        payload_len: ip_end - payload,
        flags: tcp[13],
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
    })
}

/// What a PROXY header at the start of `b` says: `Ok(Some((client, len)))` for a client's
/// connection, `Ok(None)` with its length for the balancer's own; `Err` when the gate does not
/// read it.
fn proxy_header(b: &[u8]) -> Result<(Option<Addr>, usize), ()> {
    let fixed = PROXY_V2_FIXED as usize;
    if b.starts_with(&PROXY_V2_SIGNATURE) && b.len() >= fixed {
        let len = fixed + be16(b, 14) as usize;
        if b[12] >> 4 != 2 || b[12] & 0xf > 1 || len > b.len() {
            return Err(());
        }
        if b[12] & 0xf == 0 {
            return Ok((None, len));
        }
        let client = match b[13] >> 4 {
            1 if len >= 28 => v4_mapped(b[16..20].try_into().unwrap()),
            2 if len >= 52 => b[16..32].try_into().unwrap(),
            1 | 2 => return Err(()),
            _ => return Ok((None, len)),
        };
        return Ok((Some(client), len));
    }
    // v1: one line of at most 107 bytes, CRLF-terminated.
    let line = &b[..b.len().min(PROXY_V1_MAX as usize)];
    let end = line.iter().position(|&c| c == b'\n').ok_or(())?;
    if end == 0 || line[end - 1] != b'\r' || end + 1 < 15 {
        return Err(());
    }
    let rest = line[..end - 1].strip_prefix(b"PROXY ").ok_or(())?;
    if rest.starts_with(b"UNKNOWN") {
        return Ok((None, end + 1));
    }
    let (family, rest) = rest.split_at_checked(5).ok_or(())?;
    let space = rest.iter().position(|&c| c == b' ').ok_or(())?;
    // std's parsers, held to the forms the program reads: digits and dots; hex and colons.
    let source = std::str::from_utf8(&rest[..space]).map_err(|_| ())?;
    let client = match family {
        b"TCP4 " if source.bytes().all(|c| c.is_ascii_digit() || c == b'.') => {
            v4_mapped(source.parse::<Ipv4Addr>().map_err(|_| ())?.octets())
        }
        b"TCP6 " if source.bytes().all(|c| c.is_ascii_hexdigit() || c == b':') => {
            source.parse::<Ipv6Addr>().map_err(|_| ())?.octets()
        }
        _ => return Err(()),
    };
    Ok((Some(client), end + 1))
}

/// A balancer's segment: `Ok((client, header length))` when its ClientHello is to be judged
/// as `client`'s, `Err` for the step the program stops at (`maps.proxied` updated as it does).
fn from_balancer(f: &[u8], flow: &Parsed, maps: &mut TwinMaps) -> Step<(Addr, usize)> {
    let payload = &f[flow.payload..flow.payload + flow.payload_len];
    if payload[0] == 0x16 {
        if let Some(p) = maps.proxied.get(&flow.key) {
            if p.next_seq == flow.seq {
                let client = p.client;
                maps.proxied.remove(&flow.key);
                return Ok((client, 0));
            }
        }
        return match payload.get(5) {
            Some(1) => Err(Some(Counter::PassProxyHeader)),
            _ => Err(None),
        };
    }
    let (client, len) = proxy_header(payload).map_err(|_| Some(Counter::PassProxyHeader))?;
    if len == payload.len() {
        if let Some(client) = client {
            let next_seq = flow.seq.wrapping_add(len as u32);
            maps.proxied.insert(flow.key, Proxied { client, next_seq });
        }
        return Err(None);
    }
    client
        .map(|c| (c, len))
        .ok_or(Some(Counter::PassProxyHeader))
}

fn sni(f: &[u8], base: usize, len: usize) -> Step<Vec<u8>> {
    let unparsed = Some(Counter::PassUnparsed);
    let first: [u8; 1] = get(f, base).ok_or(None)?;
    if first[0] != 0x16 {
        return Err((!(0x14..=0x17).contains(&first[0])).then_some(Counter::PassNotClientHello));
    }
    if len < 9 {
        return Err(Some(Counter::PassSplit));
    }
    let head: [u8; 9] = get(f, base).ok_or(unparsed)?;
    if head[1] != 3 || head[5] != 1 {
        return Err(Some(Counter::PassNotClientHello));
    }
    let record_end = 5 + be16(&head, 3) as usize;
    if record_end > len {
        return Err(Some(Counter::PassSplit));
    }
    let mut p = 43;
    p += 1 + get::<1>(f, base + p).ok_or(unparsed)?[0] as usize;
    p += 2 + be16(&get::<2>(f, base + p).ok_or(unparsed)?, 0) as usize;
    if p >= record_end {
        return Err(unparsed);
    }
    p += 1 + get::<1>(f, base + p).ok_or(unparsed)?[0] as usize;
    if p + 2 > record_end {
        return Err(Some(Counter::PassNoSni));
    }
    let ext_end = p + 2 + be16(&get::<2>(f, base + p).ok_or(unparsed)?, 0) as usize;
    p += 2;
    if ext_end > record_end {
        return Err(unparsed);
    }
    for _ in 0..MAX_EXTENSIONS {
        if p == ext_end {
            return Err(Some(Counter::PassNoSni));
        }
        if p + 4 > ext_end {
            return Err(unparsed);
        }
        let ext: [u8; 4] = get(f, base + p).ok_or(unparsed)?;
        let body = be16(&ext, 2) as usize;
        if p + 4 + body > ext_end {
            return Err(unparsed);
        }
        if be16(&ext, 0) == 0 {
            let sn: [u8; 5] = get(f, base + p + 4).ok_or(unparsed)?;
            let n = be16(&sn, 3) as usize;
            if sn[2] != 0 || 5 + n > body || n == 0 {
                return Err(unparsed);
            }
            if n > MAX_SNI_LEN {
                return Err(Some(Counter::PassSniTooLong));
            }
            return f
                .get(base + p + 9..base + p + 9 + n)
                .map(<[u8]>::to_vec)
                .ok_or(unparsed);
        }
        p += 4 + body;
    }
    Err(unparsed)
}

/// Classifies one frame as the XDP program does, updating `maps.flows` the same way.
pub fn classify(frame: &[u8], maps: &mut TwinMaps, now_ns: u64) -> Verdict {
    let pass = |counter| Verdict {
        action: Action::Pass,
        counter,
        frame: frame.to_vec(),
    };
    let flow = match l2_l4(frame, maps) {
        Ok(f) => f,
        Err(c) => return pass(c.map(|c| (0, c))),
    };
    if flow.flags & 0x02 != 0 {
        maps.flows.remove(&flow.key);
        return pass(None);
    }
    if let Some(reason) = maps.flows.get(&flow.key) {
        let counter = Some((reason & 0xffff, Counter::RejectFlow));
        let reply = (maps.reject != REJECT_DROP)
            .then(|| rst_reply(frame, &flow))
            .flatten();
        return match reply {
            Some(out) => Verdict {
                action: Action::Tx,
                counter,
                frame: out,
            },
            None => Verdict {
                action: Action::Drop,
                counter,
                frame: frame.to_vec(),
            },
        };
    }
    if flow.payload_len == 0 {
        return pass(None);
    }
    let first = frame[flow.payload];
    let (src, at, len) = if matches!(first, 0x16 | b'P' | b'\r') && maps.is_balancer(&flow.key.src)
    {
        match from_balancer(frame, &flow, maps) {
            Ok((client, header)) => (client, flow.payload + header, flow.payload_len - header),
            Err(c) => return pass(c.map(|c| (0, c))),
        }
    } else {
        (flow.key.src, flow.payload, flow.payload_len)
    };
    let name = match sni(frame, at, len) {
        Ok(n) => n,
        Err(c) => return pass(c.map(|c| (0, c))),
    };
    let (full, parent) = sni_hashes(&name);
    let exact = maps
        .domains
        .get(&full)
        .filter(|e| e.exact_id != 0 && e.exact_id <= MAX_DOMAINS)
        .map(|e| (e.exact_id, e.exact_flags));
    let wildcard = || {
        parent
            .and_then(|p| maps.domains.get(&p))
            .filter(|e| e.wildcard_id != 0 && e.wildcard_id <= MAX_DOMAINS)
            .map(|e| (e.wildcard_id, e.wildcard_flags))
    };
    let Some((domain, flags)) = exact.or_else(wildcard) else {
        return pass(Some((0, Counter::PassUnknownDomain)));
    };
    let denied = maps
        .deny
        .get(&DenyKey {
            domain_id: domain,
            addr: src,
        })
        .is_some_and(|expiry| *expiry > now_ns);
    let why = if denied {
        Counter::RejectDeny
    } else if flags & DOMAIN_HAS_ALLOWLIST != 0 && !maps.allowed(domain, &src) {
        Counter::RejectAllowlist
    } else {
        return pass(Some((domain, Counter::Pass)));
    };
    maps.flows.insert(flow.key, domain | ((why as u32) << 16));
    let counter = Some((domain, why));
    if maps.reject == REJECT_DROP {
        return Verdict {
            action: Action::Drop,
            counter,
            frame: frame.to_vec(),
        };
    }
    // RST|ACK in place of the flags, checksum adjusted (RFC 1624).
    let mut out = frame.to_vec();
    let at = flow.l4 + 12;
    let old = be16(&out, at);
    let new = (old & 0xff00) | 0x14;
    let csum = be16(&out, flow.l4 + 16);
    let mut sum = (!csum as u32) + (!old as u32) + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    out[flow.l4 + 13] = 0x14;
    out[flow.l4 + 16..flow.l4 + 18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    Verdict {
        action: Action::Pass,
        counter,
        frame: out,
    }
}

/// The RST the program sends back for a later segment of a rejected flow in reset mode: the
/// link header with its addresses swapped (tags kept), a new IP header from the receiver to the
/// sender, and a 20-byte TCP header with only RST set, whose sequence number is the segment's
/// acknowledgment number. `None` (dropped) for a RST, a segment without ACK, or IPv4 options.
fn rst_reply(frame: &[u8], flow: &Parsed) -> Option<Vec<u8>> {
    let tcp = &frame[flow.l4..flow.l4 + 20];
    let (rst, ack) = (tcp[13] & 0x04 != 0, tcp[13] & 0x10 != 0);
    let header = if flow.v6 { 40 } else { 20 };
    if rst || !ack || flow.l3 + header != flow.l4 {
        return None;
    }
    let (me, them) = (flow.key.dst, flow.key.src);
    let mut out = Vec::with_capacity(flow.l4 + 20);
    out.extend_from_slice(&frame[6..12]);
    out.extend_from_slice(&frame[0..6]);
    out.extend_from_slice(&frame[12..flow.l3]);
    let mut pseudo = Vec::new();
    if flow.v6 {
        out.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
        out.extend_from_slice(&me);
        out.extend_from_slice(&them);
        pseudo.extend_from_slice(&me);
        pseudo.extend_from_slice(&them);
    } else {
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&me[12..]);
        ip.extend_from_slice(&them[12..]);
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        out.extend_from_slice(&ip);
        pseudo.extend_from_slice(&me[12..]);
        pseudo.extend_from_slice(&them[12..]);
    }
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let mut th = Vec::with_capacity(20);
    th.extend_from_slice(&tcp[2..4]);
    th.extend_from_slice(&tcp[0..2]);
    th.extend_from_slice(&tcp[8..12]);
    th.extend_from_slice(&[0, 0, 0, 0, 0x50, 0x04, 0, 0, 0, 0, 0, 0]);
    pseudo.extend_from_slice(&th);
    let sum = checksum(&pseudo);
    th[16..18].copy_from_slice(&sum.to_be_bytes());
    out.extend_from_slice(&th);
    Some(out)
}

/// The Internet checksum (RFC 1071) of an even-length buffer.
fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
