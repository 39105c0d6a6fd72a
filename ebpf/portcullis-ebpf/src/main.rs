//! The XDP SNI gate (SPEC §11).
//!
//! Per packet: Ethernet (up to two VLAN tags), IPv4 or IPv6, TCP to a configured port. When the
//! segment starts a TLS handshake record holding a whole ClientHello, the SNI is extracted,
//! normalised and classified; a source that is denied for the domain, or outside its allow-list,
//! is rejected. Everything uncertain passes, with a counter: the daemon repeats every check.
//!
//! From a load balancer in `BALANCERS` the source is the client its PROXY protocol header (v1 or
//! v2) names: the ClientHello after the header, in the same segment or the next one (the client
//! is remembered in `PROXIED` until then), is judged as that client's. A ClientHello from a
//! balancer that the gate cannot tie to a client passes, counted: never judged as the balancer's.
//!
//! Verifier notes: only the fixed 14-byte Ethernet window is read in place; every field at a
//! packet-derived offset is copied to the stack with `bpf_xdp_load_bytes`, and every loop is
//! bounded by a constant.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::helpers::{
    bpf_ktime_get_ns, bpf_xdp_adjust_tail, bpf_xdp_load_bytes, bpf_xdp_store_bytes,
};
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray};
use aya_ebpf::programs::XdpContext;
use portcullis_common::{
    lower, Addr, AllowKey, Counter, DenyKey, DomainEntry, FlowKey, Proxied, ALLOW_ENTRIES,
    BALANCER_ENTRIES, COUNTER_ENTRIES, DENY_ENTRIES, DOMAIN_HAS_ALLOWLIST, FLOW_ENTRIES,
    FNV_OFFSET, FNV_PRIME, MAX_DOMAINS, MAX_EXTENSIONS, MAX_SNI_LEN, MAX_VLAN_TAGS, PORT_ENTRIES,
    PROXY_V1_MAX, PROXY_V1_PREFIX, PROXY_V2_FIXED, PROXY_V2_SIGNATURE, REJECT_DROP, SNI_BUF,
};

#[map(name = "DOMAINS")]
static DOMAINS: HashMap<u64, DomainEntry> = HashMap::pinned(2 * MAX_DOMAINS + 2, 0);
#[map(name = "ALLOW")]
static ALLOW: LpmTrie<AllowKey, u8> = LpmTrie::pinned(ALLOW_ENTRIES, 0);
#[map(name = "DENY")]
static DENY: HashMap<DenyKey, u64> = HashMap::pinned(DENY_ENTRIES, 0);
#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, u32> = LruHashMap::pinned(FLOW_ENTRIES, 0);
#[map(name = "PORTS")]
static PORTS: HashMap<u16, u8> = HashMap::pinned(PORT_ENTRIES, 0);
#[map(name = "SETTINGS")]
static SETTINGS: Array<u32> = Array::pinned(1, 0);
/// The SNI copy: 256 bytes do not fit next to the headers on the 512-byte BPF stack.
#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<[u8; SNI_BUF]> = PerCpuArray::with_max_entries(1, 0);
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_ENTRIES, 0);
/// What one run of the program works on, kept in a map rather than on the stack: built up there
/// from scalars, the addresses were spilled a byte per 8-byte stack slot, past the 512 bytes
/// Debian's 6.1 verifier allows.
#[repr(C)]
struct Packet {
    /// The segment's flow.
    key: FlowKey,
    /// `client` is the source the ClientHello is judged by (the peer, or the client a
    /// balancer's header names); the whole is also what `PROXIED` keeps for a header alone.
    proxied: Proxied,
    /// The length of the PROXY header before the ClientHello.
    header: u32,
}
#[map(name = "PACKET")]
static PACKET: PerCpuArray<Packet> = PerCpuArray::with_max_entries(1, 0);
#[map(name = "BALANCERS")]
static BALANCERS: LpmTrie<Addr, u8> = LpmTrie::pinned(BALANCER_ENTRIES, 0);
#[map(name = "PROXIED")]
static PROXIED: LruHashMap<FlowKey, Proxied> = LruHashMap::pinned(FLOW_ENTRIES, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const TLS_HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0;

/// Why parsing stopped: each maps to a PASS counter (or to no counter for ordinary traffic).
#[derive(Clone, Copy)]
enum Stop {
    /// Not for the gate (not TCP, not a configured port, no payload, ordinary TLS records).
    Ignore,
    Count(Counter),
}

#[xdp]
pub fn sni_gate(ctx: XdpContext) -> u32 {
    match gate(&ctx) {
        Ok(action) => action,
        Err(Stop::Ignore) => xdp_action::XDP_PASS,
        Err(Stop::Count(c)) => {
            count(c, 0);
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
fn count(c: Counter, domain: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(c.index(domain)) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn load<const N: usize>(ctx: &XdpContext, offset: u32, stop: Stop) -> Result<[u8; N], Stop> {
    // Not zeroed first: that was a call to a byte-by-byte `memset`, run and verified at every
    // load.
    let mut buf = core::mem::MaybeUninit::<[u8; N]>::uninit();
    // SAFETY: the helper bounds-checks against the packet and, when it succeeds, writes all N
    // bytes to `buf` (on failure it zeroes them).
    let r =
        unsafe { bpf_xdp_load_bytes(ctx.ctx, offset, buf.as_mut_ptr() as *mut c_void, N as u32) };
    if r < 0 {
        return Err(stop);
    }
    // SAFETY: written by the helper above.
    Ok(unsafe { buf.assume_init() })
}

/// Copies N bytes at `offset` to `out` (in a map value).
#[inline(always)]
fn load_into<const N: usize>(ctx: &XdpContext, offset: u32, out: &mut [u8; N]) -> Result<(), Stop> {
    // SAFETY: the helper bounds-checks against the packet and writes N bytes to `out`.
    let r =
        unsafe { bpf_xdp_load_bytes(ctx.ctx, offset, out.as_mut_ptr() as *mut c_void, N as u32) };
    if r < 0 {
        return Err(Stop::Ignore);
    }
    Ok(())
}

#[inline(always)]
fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

struct Flow<'a> {
    key: &'a FlowKey,
    /// Where the IP header starts, and whether it is IPv6.
    l3: u32,
    v6: bool,
    l4: u32,
    payload: u32,
    payload_len: u32,
    flags: u8,
    /// The segment's sequence number (host order).
    seq: u32,
}

fn gate(ctx: &XdpContext) -> Result<u32, Stop> {
    let (flow, proxied, header_slot) = parse_l2_l4(ctx)?;
    if flow.flags & TCP_SYN != 0 {
        // A new connection on this 4-tuple: forget an old rejection.
        let _ = FLOWS.remove(flow.key);
        return Err(Stop::Ignore);
    }
    // SAFETY: the value is copied out at once.
    if let Some(reason) = unsafe { FLOWS.get(flow.key) } {
        count(Counter::RejectFlow, *reason & 0xffff);
        if reject_mode() == REJECT_DROP {
            return Ok(xdp_action::XDP_DROP);
        }
        // The local socket is already gone, and this segment (usually the client's retransmitted
        // ClientHello) must not reach the stack: a listener answering with SYN cookies would
        // take its ACK for a valid cookie and hand the connection to the daemon. The client
        // learns from a RST sent from here instead.
        return Ok(reply_rst(ctx, &flow).unwrap_or(xdp_action::XDP_DROP));
    }
    if flow.payload_len == 0 {
        return Err(Stop::Ignore);
    }
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(Stop::Ignore)?;
    // SAFETY: this CPU's slot, used only within this run of the program.
    let buf = unsafe { &mut *scratch };
    let first: [u8; 1] = load(ctx, flow.payload, Stop::Ignore)?;
    // Only a handshake record or a PROXY header (v1 starts with 'P', v2 with CR) can need the
    // balancer check; the rest of a balancer's traffic costs no lookup.
    let header = match first[0] {
        TLS_HANDSHAKE | b'P' | b'\r' if is_balancer(&flow.key.src) => {
            from_balancer(ctx, &flow, first[0], buf, proxied)?
        }
        _ => {
            proxied.client = flow.key.src;
            0
        }
    };
    // Every way here leaves the same state for the verifier: the header length goes through the
    // map, so what follows is verified once, not once per way (on 6.1 the copies exceed its
    // budget).
    // SAFETY: a field of this CPU's slot.
    let header = unsafe {
        core::ptr::write_volatile(header_slot, header);
        core::ptr::read_volatile(header_slot)
    };
    let (at, len) = (flow.payload + header, flow.payload_len - header);
    let sni_len = client_hello_sni(ctx, at, len, buf)?;
    let (full, parent) = hash_sni(buf, sni_len);
    let (domain, flags) = classify(full, parent).ok_or(Stop::Count(Counter::PassUnknownDomain))?;

    let now = unsafe { bpf_ktime_get_ns() };
    let src = proxied.client;
    let deny = DenyKey {
        domain_id: domain,
        addr: src,
    };
    // SAFETY: the value is copied out at once.
    if let Some(expiry) = unsafe { DENY.get(&deny) } {
        if *expiry > now {
            return reject(ctx, &flow, domain, Counter::RejectDeny);
        }
    }
    if flags & DOMAIN_HAS_ALLOWLIST != 0 {
        let key = Key::new(
            32 + 128,
            AllowKey {
                domain_be: domain.to_be_bytes(),
                addr: src,
            },
        );
        if ALLOW.get(&key).is_none() {
            return reject(ctx, &flow, domain, Counter::RejectAllowlist);
        }
    }
    count(Counter::Pass, domain);
    Ok(xdp_action::XDP_PASS)
}

/// Parses the headers of a TCP segment to a gated port. Its flow is written to this CPU's
/// `PACKET` slot (touched only for gated ports), whose other fields are returned with it.
type Parsed = (Flow<'static>, &'static mut Proxied, &'static mut u32);

fn parse_l2_l4(ctx: &XdpContext) -> Result<Parsed, Stop> {
    let start = ctx.data();
    if start + 14 > ctx.data_end() {
        return Err(Stop::Ignore);
    }
    // SAFETY: bounds checked just above.
    let eth = unsafe { *(start as *const [u8; 14]) };
    let mut proto = be16(&eth, 12);
    let mut off: u32 = 14;
    for _ in 0..MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let tag: [u8; 4] = load(ctx, off, Stop::Ignore)?;
        proto = be16(&tag, 2);
        off += 4;
    }
    let l3 = off;
    // IPv4's addresses are kept as two words (in registers) until the key is written.
    let (l4, ip_end, v4_src, v4_dst) = match proto {
        ETH_P_IP => {
            let ip: [u8; 20] = load(ctx, off, Stop::Ignore)?;
            if ip[9] != IPPROTO_TCP {
                return Err(Stop::Ignore);
            }
            if ip[0] >> 4 != 4 || (ip[0] & 0x0f) < 5 {
                return Err(Stop::Count(Counter::PassIpUnparsed));
            }
            if be16(&ip, 6) & 0x3fff != 0 {
                // More fragments, or not the first one: the TCP payload is not whole here.
                return Err(Stop::Count(Counter::PassIpUnparsed));
            }
            let ihl = ((ip[0] & 0x0f) as u32) * 4;
            let total = be16(&ip, 2) as u32;
            let word = |i: usize| u32::from_ne_bytes([ip[i], ip[i + 1], ip[i + 2], ip[i + 3]]);
            (off + ihl, off + total, word(12), word(16))
        }
        ETH_P_IPV6 => {
            // The fixed part; the addresses are copied to `PACKET` below.
            let ip: [u8; 8] = load(ctx, off, Stop::Ignore)?;
            let next = ip[6];
            if next != IPPROTO_TCP {
                return match next {
                    // Hop-by-hop, routing, fragment, destination options, AH, ESP, mobility.
                    0 | 43 | 44 | 60 | 51 | 50 | 135 => Err(Stop::Count(Counter::PassIpUnparsed)),
                    _ => Err(Stop::Ignore),
                };
            }
            (off + 40, off + 40 + be16(&ip, 4) as u32, 0, 0)
        }
        _ => return Err(Stop::Ignore),
    };
    let tcp: [u8; 20] = load(ctx, l4, Stop::Ignore)?;
    let dport = be16(&tcp, 2);
    // SAFETY: existence check only.
    if unsafe { PORTS.get(&dport) }.is_none() {
        return Err(Stop::Ignore);
    }
    let payload = l4 + ((tcp[12] >> 4) as u32) * 4;
    if payload > ip_end || (tcp[12] >> 4) < 5 {
        return Err(Stop::Count(Counter::PassIpUnparsed));
    }
    let v6 = proto == ETH_P_IPV6;
    let packet = PACKET.get_ptr_mut(0).ok_or(Stop::Ignore)?;
    // SAFETY: this CPU's slot, used only within this run of the program.
    let Packet {
        key,
        proxied,
        header,
    } = unsafe { &mut *packet };
    if v6 {
        load_into(ctx, l3 + 8, &mut key.src)?;
        load_into(ctx, l3 + 24, &mut key.dst)?;
    } else {
        set_v4(&mut key.src, v4_src.to_ne_bytes());
        set_v4(&mut key.dst, v4_dst.to_ne_bytes());
    }
    key.sport = u16::from_ne_bytes([tcp[0], tcp[1]]);
    key.dport = u16::from_ne_bytes([tcp[2], tcp[3]]);
    let key: &'static FlowKey = key;
    let flow = Flow {
        l3,
        v6,
        key,
        l4,
        payload,
        payload_len: ip_end - payload,
        flags: tcp[13],
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
    };
    Ok((flow, proxied, header))
}

#[inline(always)]
fn is_balancer(addr: &Addr) -> bool {
    BALANCERS.get(&Key::new(128, *addr)).is_some()
}

/// A balancer's segment that starts with `first`: the length of the PROXY header before its
/// ClientHello, with the client it is judged as written to `proxied`. A header alone in its
/// segment is remembered for the next one (`Err(Ignore)`); a ClientHello the gate cannot tie to a
/// client passes, counted.
fn from_balancer(
    ctx: &XdpContext,
    flow: &Flow,
    first: u8,
    buf: &mut [u8; SNI_BUF],
    proxied: &mut Proxied,
) -> Result<u32, Stop> {
    let unattributed = Stop::Count(Counter::PassProxyHeader);
    if first == TLS_HANDSHAKE {
        // SAFETY: the value is copied out at once.
        if let Some(p) = unsafe { PROXIED.get(flow.key) } {
            if p.next_seq == flow.seq {
                proxied.client = p.client;
                let _ = PROXIED.remove(flow.key);
                return Ok(0);
            }
        }
        // Other handshake records (TLS 1.2's later ones) are ordinary traffic.
        let head: [u8; 6] = load(ctx, flow.payload, Stop::Ignore)?;
        return Err(if head[5] == CLIENT_HELLO {
            unattributed
        } else {
            Stop::Ignore
        });
    }
    let client = &mut proxied.client;
    let (named, header) = proxy_header(ctx, flow.payload, flow.payload_len, buf, client)?;
    if header == flow.payload_len {
        if named {
            proxied.next_seq = flow.seq.wrapping_add(header);
            let _ = PROXIED.insert(flow.key, proxied, 0);
        }
        return Err(Stop::Ignore);
    }
    if named {
        Ok(header)
    } else {
        Err(unattributed)
    }
}

/// Writes `::ffff:a.b.c.d` to `out`.
#[inline(always)]
fn set_v4(out: &mut Addr, octets: [u8; 4]) {
    v4_prefix(out);
    let p = out.as_mut_ptr() as *mut u32;
    // SAFETY: the last 4 of the 16 bytes, written unaligned.
    unsafe { p.add(3).write_unaligned(u32::from_ne_bytes(octets)) };
}

/// Writes the IPv4-mapped prefix (`::ffff:`) to the first 12 bytes of `out`, in word stores: an
/// array assigned whole became a call to a byte-by-byte `memset` for its zeros.
#[inline(always)]
fn v4_prefix(out: &mut Addr) {
    let p = out.as_mut_ptr() as *mut u32;
    // SAFETY: the first 12 of the 16 bytes, written unaligned.
    unsafe {
        p.write_unaligned(0);
        p.add(1).write_unaligned(0);
        p.add(2)
            .write_unaligned(u32::from_ne_bytes([0, 0, 0xff, 0xff]));
    }
}

/// Reads the PROXY header at `base` (`len` bytes left in the segment): whether it names a client
/// (written to `client`; not for the balancer's own connections) and its length. What does not parse, or is not
/// whole here, passes, counted.
fn proxy_header(
    ctx: &XdpContext,
    base: u32,
    len: u32,
    buf: &mut [u8; SNI_BUF],
    client: &mut Addr,
) -> Result<(bool, u32), Stop> {
    let bad = Stop::Count(Counter::PassProxyHeader);
    let n = len.min(PROXY_V1_MAX);
    // As for the SNI copy: a length the verifier can bound on every kernel, in 1..=128 (it is
    // n itself, which is in 1..=107).
    // SAFETY: reading a local.
    let v = unsafe { core::ptr::read_volatile(&n) };
    let n = (v.wrapping_sub(1) & 127) + 1;
    // SAFETY: n is in 1..=128 and `buf` holds SNI_BUF (256) bytes.
    let r = unsafe { bpf_xdp_load_bytes(ctx.ctx, base, buf.as_mut_ptr() as *mut c_void, n) };
    if r < 0 {
        return Err(bad);
    }
    if n >= PROXY_V2_FIXED && differs(buf, 0, &PROXY_V2_SIGNATURE) == 0 {
        let (ver_cmd, family) = (buf[12], buf[13]);
        let total = PROXY_V2_FIXED + be16(&buf[..], 14) as u32;
        if ver_cmd >> 4 != 2 || ver_cmd & 0x0f > 1 || total > len {
            return Err(bad);
        }
        if ver_cmd & 0x0f == 0 {
            return Ok((false, total));
        }
        return match family >> 4 {
            1 if total >= PROXY_V2_FIXED + 12 => {
                set_v4(client, [buf[16], buf[17], buf[18], buf[19]]);
                Ok((true, total))
            }
            2 if total >= PROXY_V2_FIXED + 36 => {
                client.copy_from_slice(&buf[16..32]);
                Ok((true, total))
            }
            1 | 2 => Err(bad),
            _ => Ok((false, total)),
        };
    }
    if n < 15 || differs(buf, 0, &PROXY_V1_PREFIX) != 0 {
        return Err(bad);
    }
    // The line ends at the first LF, which must follow a CR.
    let mut end = 0u32;
    for i in 1..PROXY_V1_MAX {
        if i >= n {
            break;
        }
        if buf[i as usize] == b'\n' {
            if buf[(i - 1) as usize] != b'\r' {
                return Err(bad);
            }
            end = i + 1;
            break;
        }
    }
    if end == 0 {
        return Err(bad);
    }
    // One state for every line length, not one per length.
    let end = opaque(buf, 4, end as usize) as u32;
    if differs(buf, 6, b"UNKNOWN") == 0 {
        return Ok((false, end));
    }
    if differs(buf, 6, b"TCP4 ") == 0 {
        let a = v1_ipv4(buf).ok_or(bad)?;
        set_v4(client, a.to_be_bytes());
    } else if differs(buf, 6, b"TCP6 ") == 0 && v1_ipv6(buf) {
        client.copy_from_slice(&buf[V1_ADDR..V1_ADDR + 16]);
    } else {
        return Err(bad);
    }
    Ok((true, end))
}

/// Non-zero when `buf[at..]` does not start with `want` (an OR of XORs, not a call to `bcmp`).
#[inline(always)]
fn differs<const N: usize>(buf: &[u8; SNI_BUF], at: usize, want: &[u8; N]) -> u8 {
    let mut d = 0;
    for i in 0..N {
        d |= buf[(at + i) & (SNI_BUF - 1)] ^ want[i];
    }
    d
}

/// Where a v1 header's source address starts: after `PROXY TCP4 ` or `PROXY TCP6 `.
const V1_SOURCE: usize = 11;
/// Scratch space in the header buffer, past the 107 bytes a header is copied to: the parser's
/// groups, then the address it builds. (Variable indices into a stack array can be compiled to
/// an OR on the frame pointer, which the verifier refuses; into the map value they cannot.)
const V1_GROUPS: usize = 128;
const V1_ADDR: usize = 144;
const V1_STATE: usize = 160;

/// `v` as the verifier sees a byte read from a map: any value in 0..=255. A parser's counters
/// pass through this each character, so the paths through one character merge instead of every
/// combination of counts being verified on its own (which exceeds the verifier's budget).
#[inline(always)]
fn opaque(buf: &mut [u8; SNI_BUF], slot: usize, v: usize) -> usize {
    let p = &mut buf[(V1_STATE + slot) & (SNI_BUF - 1)];
    // SAFETY: a byte of this CPU's map value.
    unsafe {
        core::ptr::write_volatile(p, v as u8);
        core::ptr::read_volatile(p) as usize
    }
}

/// `opaque` for a u32, in four bytes from `slot` on.
#[inline(always)]
fn opaque32(buf: &mut [u8; SNI_BUF], slot: usize, v: u32) -> u32 {
    let mut out = 0u32;
    for (i, b) in v.to_be_bytes().iter().enumerate() {
        out = (out << 8) | opaque(buf, slot + i, *b as usize) as u32;
    }
    out
}

/// The dotted-quad source address of a v1 `TCP4` line, ended by a space: four decimal numbers up
/// to 255 without leading zeros.
fn v1_ipv4(buf: &mut [u8; SNI_BUF]) -> Option<u32> {
    let (mut addr, mut octets, mut value, mut digits) = (0u32, 0u32, 0u32, 0u32);
    for i in 0..16 {
        octets = opaque(buf, 0, octets as usize) as u32;
        digits = opaque(buf, 1, digits as usize) as u32;
        value = opaque(buf, 2, value as usize) as u32;
        addr = opaque32(buf, 8, addr);
        let c = buf[(V1_SOURCE + i) & (SNI_BUF - 1)];
        match c {
            b'0'..=b'9' => {
                if digits == 3 || (digits == 1 && value == 0) {
                    return None;
                }
                value = value * 10 + (c - b'0') as u32;
                digits += 1;
                if value > 255 {
                    return None;
                }
            }
            b'.' | b' ' => {
                if digits == 0 || (c == b'.') == (octets == 3) {
                    return None;
                }
                addr = (addr << 8) | value;
                if c == b' ' {
                    return Some(addr);
                }
                (octets, value, digits) = (octets + 1, 0, 0);
            }
            _ => return None,
        }
    }
    None
}

/// The source address of a v1 `TCP6` line, ended by a space: up to eight groups of one to four
/// hex digits with at most one `::`, written to `buf[V1_ADDR..]`. The form with a dotted IPv4
/// tail is not read (it passes).
fn v1_ipv6(buf: &mut [u8; SNI_BUF]) -> bool {
    const NONE: usize = 8;
    let (mut count, mut gap) = (0usize, NONE);
    let (mut value, mut digits, mut colons) = (0u32, 0u32, 0u32);
    // 39 characters at most, and the space.
    for i in 0..40 {
        count = opaque(buf, 0, count);
        gap = opaque(buf, 1, gap);
        colons = opaque(buf, 2, colons as usize) as u32;
        digits = opaque(buf, 3, digits as usize) as u32;
        value = opaque32(buf, 8, value);
        let c = buf[(V1_SOURCE + i) & (SNI_BUF - 1)];
        let hex = match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        if let Some(h) = hex {
            // A single colon at the start is not an address.
            if digits == 4 || (i == 1 && colons == 1) {
                return false;
            }
            value = (value << 4) | h as u32;
            digits += 1;
            colons = 0;
            continue;
        }
        if digits > 0 {
            if count == 8 {
                return false;
            }
            let at = V1_GROUPS + 2 * (count & 7);
            buf[at] = (value >> 8) as u8;
            buf[at + 1] = value as u8;
            count += 1;
            (value, digits) = (0, 0);
        }
        match c {
            b':' => {
                colons += 1;
                if colons == 2 {
                    if gap != NONE {
                        return false;
                    }
                    gap = count;
                } else if colons > 2 {
                    return false;
                }
            }
            b' ' => {
                // Ends after a group, or right after `::`.
                if colons == 1 || (gap == NONE && count != 8) || (gap != NONE && count > 7) {
                    return false;
                }
                let zeros = 8 - count;
                for j in 0..8 {
                    let from = if gap == NONE || j < gap {
                        Some(j)
                    } else if j < gap + zeros {
                        None
                    } else {
                        Some(j - zeros)
                    };
                    let (hi, lo) = match from {
                        Some(g) => {
                            let at = V1_GROUPS + 2 * (g & 7);
                            (buf[at], buf[at + 1])
                        }
                        None => (0, 0),
                    };
                    buf[V1_ADDR + 2 * j] = hi;
                    buf[V1_ADDR + 2 * j + 1] = lo;
                }
                return true;
            }
            _ => return false,
        }
    }
    false
}

/// Finds the SNI of a ClientHello that starts at `base` and is whole in this segment; copies it
/// to `out` and returns its length.
fn client_hello_sni(
    ctx: &XdpContext,
    base: u32,
    len: u32,
    out: &mut [u8; SNI_BUF],
) -> Result<u32, Stop> {
    let unparsed = Stop::Count(Counter::PassUnparsed);
    let first: [u8; 1] = load(ctx, base, Stop::Ignore)?;
    if first[0] != TLS_HANDSHAKE {
        // Application data, alerts and change-cipher-spec are ordinary traffic; anything that is
        // not a TLS record at all is counted.
        return Err(match first[0] {
            0x14..=0x17 => Stop::Ignore,
            _ => Stop::Count(Counter::PassNotClientHello),
        });
    }
    if len < 9 {
        return Err(Stop::Count(Counter::PassSplit));
    }
    let head: [u8; 9] = load(ctx, base, unparsed)?;
    if head[1] != 3 || head[5] != CLIENT_HELLO {
        return Err(Stop::Count(Counter::PassNotClientHello));
    }
    let record_end = 5 + be16(&head, 3) as u32;
    if record_end > len {
        return Err(Stop::Count(Counter::PassSplit));
    }
    // handshake header (4) + legacy_version (2) + random (32)
    let mut p: u32 = 5 + 4 + 2 + 32;
    let sid: [u8; 1] = load(ctx, base + p, unparsed)?;
    p += 1 + sid[0] as u32;
    let suites: [u8; 2] = load(ctx, base + p, unparsed)?;
    p += 2 + be16(&suites, 0) as u32;
    if p >= record_end {
        return Err(unparsed);
    }
    let comp: [u8; 1] = load(ctx, base + p, unparsed)?;
    p += 1 + comp[0] as u32;
    if p + 2 > record_end {
        // A ClientHello without extensions has no SNI.
        return Err(Stop::Count(Counter::PassNoSni));
    }
    let ext_len: [u8; 2] = load(ctx, base + p, unparsed)?;
    let ext_end = p + 2 + be16(&ext_len, 0) as u32;
    p += 2;
    if ext_end > record_end {
        return Err(unparsed);
    }
    for _ in 0..MAX_EXTENSIONS {
        if p == ext_end {
            return Err(Stop::Count(Counter::PassNoSni));
        }
        if p + 4 > ext_end {
            return Err(unparsed);
        }
        let ext: [u8; 4] = load(ctx, base + p, unparsed)?;
        let body = be16(&ext, 2) as u32;
        if p + 4 + body > ext_end {
            return Err(unparsed);
        }
        if be16(&ext, 0) == EXT_SERVER_NAME {
            let sn: [u8; 5] = load(ctx, base + p + 4, unparsed)?;
            let name_len = be16(&sn, 3) as u32;
            if sn[2] != 0 || 5 + name_len > body || name_len == 0 {
                return Err(unparsed);
            }
            if name_len > MAX_SNI_LEN as u32 {
                return Err(Stop::Count(Counter::PassSniTooLong));
            }
            // The helper's length must be provably in 1..=256 on the register passed to it.
            // Branch refinement does not get there: LLVM tests `name_len == 0` before the byte
            // swap, and verifiers before 6.8 (Debian's 6.1) do not learn `n != 0` from a failed
            // `n == 0` test. Arithmetic on an opaque (volatile) copy does, on every verifier:
            // `((v - 1) & 0xff) + 1` is in 1..=256 and equals `name_len`, checked to be in 1..=255.
            // SAFETY: reading a local.
            let v = unsafe { core::ptr::read_volatile(&name_len) };
            let n = (v.wrapping_sub(1) & (SNI_BUF as u32 - 1)) + 1;
            // SAFETY: n is in 1..=256 and `out` holds SNI_BUF (256) bytes.
            let r = unsafe {
                bpf_xdp_load_bytes(ctx.ctx, base + p + 9, out.as_mut_ptr() as *mut c_void, n)
            };
            if r < 0 {
                return Err(unparsed);
            }
            return Ok(n);
        }
        p += 4 + body;
    }
    Err(unparsed)
}

/// The same hashes as `portcullis_common::sni_hashes`, over the stack copy.
#[inline(always)]
fn hash_sni(sni: &[u8; SNI_BUF], len: u32) -> (u64, u64) {
    let last = sni[((len - 1) as usize) & (SNI_BUF - 1)];
    let len = if last == b'.' { len - 1 } else { len };
    let mut full = FNV_OFFSET;
    let mut parent = FNV_OFFSET;
    let mut seen_dot = false;
    for (i, raw) in sni.iter().enumerate() {
        if i as u32 >= len {
            break;
        }
        let b = lower(*raw);
        full = (full ^ b as u64).wrapping_mul(FNV_PRIME);
        if seen_dot {
            parent = (parent ^ b as u64).wrapping_mul(FNV_PRIME);
        } else if b == b'.' {
            seen_dot = true;
        }
    }
    // No dot, or an empty first label: no wildcard can match (0 is never looked up).
    let parent = if seen_dot && sni[0] != b'.' {
        parent
    } else {
        0
    };
    (full, parent)
}

/// Exact beats wildcard.
#[inline(always)]
fn classify(full: u64, parent: u64) -> Option<(u32, u32)> {
    // SAFETY: values are copied out at once.
    if let Some(e) = unsafe { DOMAINS.get(&full) } {
        if e.exact_id != 0 && e.exact_id <= MAX_DOMAINS {
            return Some((e.exact_id, e.exact_flags));
        }
    }
    if parent != 0 {
        if let Some(e) = unsafe { DOMAINS.get(&parent) } {
            if e.wildcard_id != 0 && e.wildcard_id <= MAX_DOMAINS {
                return Some((e.wildcard_id, e.wildcard_flags));
            }
        }
    }
    None
}

#[inline(always)]
fn reject_mode() -> u32 {
    SETTINGS.get(0).copied().unwrap_or(0)
}

fn reject(ctx: &XdpContext, flow: &Flow, domain: u32, why: Counter) -> Result<u32, Stop> {
    let _ = FLOWS.insert(flow.key, &(domain | ((why as u32) << 16)), 0);
    count(why, domain);
    if reject_mode() == REJECT_DROP {
        return Ok(xdp_action::XDP_DROP);
    }
    // Turn the segment into RST|ACK for the local stack: it tears the socket down at once (the
    // ClientHello's sequence number is exactly the next one expected). Only the flags byte
    // changes, so the checksum is updated incrementally (RFC 1624).
    let words: [u8; 6] = load(ctx, flow.l4 + 12, Stop::Ignore)?;
    let old = be16(&words, 0);
    let new = (old & 0xff00) | (TCP_RST | TCP_ACK) as u16;
    let csum = fold((!be16(&words, 4) as u32) + (!old as u32) + new as u32);
    store(ctx, flow.l4 + 13, &mut [(new & 0xff) as u8])?;
    store(ctx, flow.l4 + 16, &mut csum.to_be_bytes())?;
    Ok(xdp_action::XDP_PASS)
}

/// Turns the segment into a RST to its sender and sends it back out of the interface
/// (`XDP_TX`): Ethernet addresses swapped (VLAN tags kept), a fresh IP header with the addresses
/// swapped, and a bare TCP header with the ports swapped and, as RFC 9293 asks of a RST answering
/// a segment that carries an ACK, the sequence number taken from that acknowledgment. The frame
/// is cut after that header. A RST is never answered, and a segment without ACK, or an IPv4
/// header with options, is dropped instead (`Err` too: the caller drops).
fn reply_rst(ctx: &XdpContext, flow: &Flow) -> Result<u32, Stop> {
    let ip_len = if flow.v6 { 40 } else { 20 };
    if flow.flags & TCP_RST != 0 || flow.flags & TCP_ACK == 0 || flow.l3 + ip_len != flow.l4 {
        return Err(Stop::Ignore);
    }
    let tcp: [u8; 12] = load(ctx, flow.l4, Stop::Ignore)?;
    let mut th = [0u8; 20];
    th[0] = tcp[2];
    th[1] = tcp[3];
    th[2] = tcp[0];
    th[3] = tcp[1];
    th[4] = tcp[8];
    th[5] = tcp[9];
    th[6] = tcp[10];
    th[7] = tcp[11];
    th[12] = 5 << 4;
    th[13] = TCP_RST;
    // The pseudo-header: both addresses (swapped order does not change the sum), the protocol
    // and the TCP length (20).
    let (src, dst) = (&flow.key.src, &flow.key.dst);
    let from = if flow.v6 { 0 } else { 12 };
    let sum = IPPROTO_TCP as u32 + 20 + words(src, from) + words(dst, from) + words(&th, 0);
    let csum = fold(sum).to_be_bytes();
    th[16] = csum[0];
    th[17] = csum[1];

    if flow.v6 {
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[5] = 20;
        ip[6] = IPPROTO_TCP;
        ip[7] = 64;
        ip[8..24].copy_from_slice(dst);
        ip[24..40].copy_from_slice(src);
        store(ctx, flow.l3, &mut ip)?;
    } else {
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[3] = 40;
        ip[6] = 0x40; // don't fragment
        ip[8] = 64;
        ip[9] = IPPROTO_TCP;
        ip[12..16].copy_from_slice(&dst[12..16]);
        ip[16..20].copy_from_slice(&src[12..16]);
        let csum = fold(words(&ip, 0)).to_be_bytes();
        ip[10] = csum[0];
        ip[11] = csum[1];
        store(ctx, flow.l3, &mut ip)?;
    }
    store(ctx, flow.l4, &mut th)?;
    let eth: [u8; 12] = load(ctx, 0, Stop::Ignore)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&eth[6..]);
    swapped[6..].copy_from_slice(&eth[..6]);
    store(ctx, 0, &mut swapped)?;
    let len = (ctx.data_end() - ctx.data()) as i32;
    let cut = (flow.l4 + 20) as i32 - len;
    // SAFETY: shrinks the frame to the headers just written (cut <= 0).
    if cut < 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, cut) } != 0 {
        return Err(Stop::Ignore);
    }
    Ok(xdp_action::XDP_TX)
}

/// The sum of the big-endian 16-bit words of `b` from `from` on (N and `from` even).
#[inline(always)]
fn words<const N: usize>(b: &[u8; N], from: usize) -> u32 {
    let mut sum = 0;
    let mut i = from;
    while i + 1 < N {
        sum += be16(b, i) as u32;
        i += 2;
    }
    sum
}

/// The one's complement of a 16-bit one's complement sum.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn store<const N: usize>(ctx: &XdpContext, offset: u32, buf: &mut [u8; N]) -> Result<(), Stop> {
    // SAFETY: the helper bounds-checks against the packet and reads N bytes from `buf`.
    let r =
        unsafe { bpf_xdp_store_bytes(ctx.ctx, offset, buf.as_mut_ptr() as *mut c_void, N as u32) };
    if r < 0 {
        return Err(Stop::Ignore);
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
