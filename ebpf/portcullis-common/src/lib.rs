//! Types, names and limits shared by the XDP program and the daemon.
//!
//! Everything here crosses the kernel boundary or must agree on both sides, so it is `no_std`,
//! `#[repr(C)]` and free of allocation. With the `user` feature the map types implement
//! `aya::Pod` for the daemon.
#![no_std]

/// Longest SNI the XDP program copies (RFC 6066 allows more; DNS names stop at 253). Longer names
/// are passed unparsed.
pub const MAX_SNI_LEN: usize = 255;
/// Stack buffer for the SNI: a power of two so `len & (SNI_BUF - 1)` bounds every index.
pub const SNI_BUF: usize = 256;
/// TLS extensions walked before giving up (and passing).
pub const MAX_EXTENSIONS: usize = 32;
/// VLAN tags skipped (802.1Q / 802.1ad).
pub const MAX_VLAN_TAGS: usize = 2;

/// All maps, each with one line on what it holds. Names are the ELF map names, also the pin
/// names under the pin folder.
pub mod maps {
    /// `HashMap<u64 (SNI hash), DomainEntry>`: identity-aware domains by normalised name; a
    /// wildcard `*.suffix` is stored under the hash of `suffix`.
    pub const DOMAINS: &str = "DOMAINS";
    /// `LpmTrie<AllowKey, u8>`: per-domain source prefixes allowed to reach the domain.
    pub const ALLOW: &str = "ALLOW";
    /// `HashMap<DenyKey, u64>`: learned denials, value = expiry on the monotonic clock (ns).
    pub const DENY: &str = "DENY";
    /// `LruHashMap<FlowKey, u32>`: rejected flows, value = reject reason.
    pub const FLOWS: &str = "FLOWS";
    /// `HashMap<u16 (host order), u8>`: TCP destination ports the gate inspects.
    pub const PORTS: &str = "PORTS";
    /// `Array<u32>` of one: the reject action (`REJECT_RESET` or `REJECT_DROP`).
    pub const SETTINGS: &str = "SETTINGS";
    /// `PerCpuArray<u64>`: counters, `domain_id * COUNTERS_PER_DOMAIN + Counter`.
    pub const COUNTERS: &str = "COUNTERS";
    /// `PerCpuArray<[u8; SNI_BUF]>` of one: the program's SNI copy (not pinned, not synced).
    pub const SCRATCH: &str = "SCRATCH";
    /// `LpmTrie<Addr, u8>`: the load balancers whose connections start with a PROXY protocol
    /// header (`listen.proxy_protocol.from`); their ClientHellos are judged by the client the
    /// header names.
    pub const BALANCERS: &str = "BALANCERS";
    /// `LruHashMap<FlowKey, Proxied>`: a balancer's flows whose PROXY header came in a segment of
    /// its own, with the client it named, until the segment after it (written by the program).
    pub const PROXIED: &str = "PROXIED";
    /// `PerCpuArray` of one: the program's working copy of the packet's flow and judged source
    /// (not pinned, not synced).
    pub const PACKET: &str = "PACKET";
}

/// Domains the gate distinguishes (ids 1..=MAX_DOMAINS; 0 means "no domain").
pub const MAX_DOMAINS: u32 = 1023;
pub const ALLOW_ENTRIES: u32 = 65_536;
pub const DENY_ENTRIES: u32 = 262_144;
pub const FLOW_ENTRIES: u32 = 65_536;
pub const PORT_ENTRIES: u32 = 16;
pub const BALANCER_ENTRIES: u32 = 1024;

/// The PROXY protocol, as the gate reads it: v2's signature (its first 12 bytes) and fixed part,
/// v1's start, and v1's longest header (CRLF included).
pub const PROXY_V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
pub const PROXY_V2_FIXED: u32 = 16;
pub const PROXY_V1_PREFIX: [u8; 6] = *b"PROXY ";
pub const PROXY_V1_MAX: u32 = 107;

/// `SETTINGS[0]` values.
pub const REJECT_RESET: u32 = 0;
pub const REJECT_DROP: u32 = 1;

/// Counter slots per domain id; domain 0 holds what matched no domain.
pub const COUNTERS_PER_DOMAIN: u32 = 16;
pub const COUNTER_ENTRIES: u32 = (MAX_DOMAINS + 1) * COUNTERS_PER_DOMAIN;

/// What the gate counts. Per domain: `Pass`, `RejectAllowlist`, `RejectDeny`, `RejectFlow`;
/// the rest under domain 0.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Counter {
    /// ClientHello for a known domain, allowed through.
    Pass = 0,
    /// Rejected: source outside the domain's allow-list.
    RejectAllowlist = 1,
    /// Rejected: source learned as denied for the domain.
    RejectDeny = 2,
    /// A later packet of a flow already rejected.
    RejectFlow = 3,
    /// ClientHello whose SNI is in no domain.
    PassUnknownDomain = 4,
    /// ClientHello without SNI.
    PassNoSni = 5,
    /// TLS record longer than the segment: a ClientHello split across segments.
    PassSplit = 6,
    /// First bytes are not a TLS handshake record holding a ClientHello.
    PassNotClientHello = 7,
    /// Something in the ClientHello did not parse (lengths out of range, too many extensions).
    PassUnparsed = 8,
    /// An IP fragment, or IPv6 with extension headers.
    PassIpUnparsed = 9,
    /// SNI longer than `MAX_SNI_LEN`.
    PassSniTooLong = 10,
    /// From a load balancer: a ClientHello the gate cannot tie to a client, because the PROXY
    /// header before it kept the balancer's address (v2 `LOCAL`, v1 `UNKNOWN`, not TCP over IP),
    /// could not be read (malformed, not whole in its segment, v1 with an IPv6 address in a form
    /// the gate does not parse), or was not seen.
    PassProxyHeader = 11,
}

impl Counter {
    pub const ALL: [Counter; 12] = [
        Counter::Pass,
        Counter::RejectAllowlist,
        Counter::RejectDeny,
        Counter::RejectFlow,
        Counter::PassUnknownDomain,
        Counter::PassNoSni,
        Counter::PassSplit,
        Counter::PassNotClientHello,
        Counter::PassUnparsed,
        Counter::PassIpUnparsed,
        Counter::PassSniTooLong,
        Counter::PassProxyHeader,
    ];

    /// Index into `COUNTERS` for a domain id.
    pub const fn index(self, domain: u32) -> u32 {
        domain * COUNTERS_PER_DOMAIN + self as u32
    }
}

/// `DOMAINS` value. One name can be both an exact domain and the suffix of a wildcard one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainEntry {
    /// Id of the exact domain with this name, 0 if none.
    pub exact_id: u32,
    /// Flags of the exact domain.
    pub exact_flags: u32,
    /// Id of the `*.` domain with this suffix, 0 if none.
    pub wildcard_id: u32,
    pub wildcard_flags: u32,
}

/// `DomainEntry` flag: the domain has an allow-list (sources outside `ALLOW` are rejected).
pub const DOMAIN_HAS_ALLOWLIST: u32 = 1;

/// A source address as 16 bytes: IPv6 as is, IPv4 as `::ffff:a.b.c.d`.
pub type Addr = [u8; 16];

/// Maps IPv4 into the IPv6 space the maps use.
pub const fn v4_mapped(octets: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// `ALLOW` trie data: matched most-significant bit first, so the domain id is big-endian and
/// comes first; `prefix_len = 32 + address prefix` (IPv4 prefixes add 96).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowKey {
    pub domain_be: [u8; 4],
    pub addr: Addr,
}

/// `DENY` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DenyKey {
    pub domain_id: u32,
    pub addr: Addr,
}

/// `FLOWS` key: a TCP flow as the gate sees it (ports in network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
}

/// `PROXIED` value: the client a balancer's PROXY header named, and the sequence number its
/// next segment (the ClientHello) must start at.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Proxied {
    pub client: Addr,
    pub next_seq: u32,
}

/// FNV-1a, 64 bit: the `DOMAINS` key. Both sides hash the normalised name with this function.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Normalises one byte as the gate does: ASCII lowercase.
pub const fn lower(b: u8) -> u8 {
    if b.is_ascii_uppercase() {
        b + 32
    } else {
        b
    }
}

/// The hashes the gate looks up for a raw SNI: the whole normalised name and, when there is a
/// dot, the name after its first label (for wildcard domains). A trailing dot is ignored.
/// Returns `(exact, Some(parent))`.
pub fn sni_hashes(sni: &[u8]) -> (u64, Option<u64>) {
    let len = match sni.last() {
        Some(b'.') => sni.len() - 1,
        _ => sni.len(),
    };
    let mut full = FNV_OFFSET;
    let mut parent = FNV_OFFSET;
    let mut seen_dot = false;
    let mut i = 0;
    while i < len {
        let b = lower(sni[i]);
        full = (full ^ b as u64).wrapping_mul(FNV_PRIME);
        if seen_dot {
            parent = (parent ^ b as u64).wrapping_mul(FNV_PRIME);
        } else if b == b'.' {
            seen_dot = true;
        }
        i += 1;
    }
    // `.x.y` has an empty first label: no wildcard matches it.
    let parent = if seen_dot && sni.first() != Some(&b'.') {
        Some(parent)
    } else {
        None
    };
    (full, parent)
}

/// The `DOMAINS` key of an already normalised name (a domain pattern's name or suffix).
pub fn name_hash(name: &[u8]) -> u64 {
    sni_hashes(name).0
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data #[repr(C)] structs of integers and byte arrays, no padding bytes
    // with meaning, valid for every bit pattern.
    unsafe impl aya::Pod for super::DomainEntry {}
    unsafe impl aya::Pod for super::AllowKey {}
    unsafe impl aya::Pod for super::DenyKey {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Proxied {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_normalise_case_and_trailing_dot() {
        assert_eq!(
            sni_hashes(b"A.Apps.Identity."),
            sni_hashes(b"a.apps.identity")
        );
        let (full, parent) = sni_hashes(b"a.apps.identity");
        assert_eq!(full, name_hash(b"a.apps.identity"));
        assert_eq!(parent, Some(name_hash(b"apps.identity")));
        assert_eq!(sni_hashes(b"localhost").1, None);
        assert_eq!(sni_hashes(b".apps.identity").1, None);
        assert_ne!(name_hash(b"apps.identity"), name_hash(b"apps.identitx"));
    }

    #[test]
    fn counter_slots_do_not_overlap() {
        assert!(Counter::ALL.len() as u32 <= COUNTERS_PER_DOMAIN);
        assert_eq!(Counter::RejectDeny.index(2), 2 * COUNTERS_PER_DOMAIN + 2);
    }
}
