//! Hand-built frames and ClientHellos for the XDP packet table.

use std::net::IpAddr;

/// A TCP segment in an Ethernet frame.
#[derive(Clone, Debug)]
pub struct Segment {
    pub vlans: Vec<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    /// The sequence number (1000 unless set).
    pub seq: u32,
    pub tcp_options: Vec<u8>,
    pub payload: Vec<u8>,
    /// IPv4 fragment: (more fragments, offset in 8-byte units).
    pub fragment: Option<(bool, u16)>,
    /// IPv6: put a hop-by-hop options header before TCP.
    pub v6_hop_by_hop: bool,
    /// IP protocol (6 = TCP); anything else builds that protocol with the TCP bytes as payload.
    pub protocol: u8,
}

pub const PSH_ACK: u8 = 0x18;
pub const SYN: u8 = 0x02;

impl Segment {
    pub fn new(src: &str, dst: &str, payload: Vec<u8>) -> Segment {
        Segment {
            vlans: Vec::new(),
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport: 40_000,
            dport: 443,
            flags: PSH_ACK,
            seq: 1000,
            tcp_options: Vec::new(),
            payload,
            fragment: None,
            v6_hop_by_hop: false,
            protocol: 6,
        }
    }

    pub fn tcp_header_len(&self) -> usize {
        20 + self.tcp_options.len()
    }

    fn tcp(&self) -> Vec<u8> {
        assert_eq!(self.tcp_options.len() % 4, 0);
        let mut t = Vec::new();
        t.extend(self.sport.to_be_bytes());
        t.extend(self.dport.to_be_bytes());
        t.extend(self.seq.to_be_bytes());
        t.extend(2000u32.to_be_bytes());
        t.push(((self.tcp_header_len() / 4) as u8) << 4);
        t.push(self.flags);
        t.extend(64_000u16.to_be_bytes());
        t.extend([0, 0, 0, 0]);
        t.extend(&self.tcp_options);
        t.extend(&self.payload);
        let sum = tcp_checksum(self.src, self.dst, &t);
        t[16..18].copy_from_slice(&sum.to_be_bytes());
        t
    }

    pub fn frame(&self) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        for (i, vid) in self.vlans.iter().enumerate() {
            f.extend(
                if i == 0 && self.vlans.len() == 2 {
                    0x88a8u16
                } else {
                    0x8100u16
                }
                .to_be_bytes(),
            );
            f.extend(vid.to_be_bytes());
        }
        let l4 = self.tcp();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend(0x0800u16.to_be_bytes());
                let mut ip = vec![0x45, 0];
                ip.extend(((20 + l4.len()) as u16).to_be_bytes());
                ip.extend([0, 1]);
                let frag = self
                    .fragment
                    .map_or(0x4000, |(more, off)| (u16::from(more) << 13) | off);
                ip.extend(frag.to_be_bytes());
                ip.extend([64, self.protocol, 0, 0]);
                ip.extend(s.octets());
                ip.extend(d.octets());
                let sum = checksum(&ip, 0);
                ip[10..12].copy_from_slice(&sum.to_be_bytes());
                f.extend(ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend(0x86ddu16.to_be_bytes());
                let ext = if self.v6_hop_by_hop { 8 } else { 0 };
                let mut ip = vec![0x60, 0, 0, 0];
                ip.extend(((ext + l4.len()) as u16).to_be_bytes());
                ip.push(if self.v6_hop_by_hop { 0 } else { self.protocol });
                ip.push(64);
                ip.extend(s.octets());
                ip.extend(d.octets());
                if self.v6_hop_by_hop {
                    ip.extend([self.protocol, 0, 1, 4, 0, 0, 0, 0]);
                }
                f.extend(ip);
            }
            _ => panic!("mixed address families"),
        }
        f.extend(l4);
        f
    }
}

fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from(chunk[0]) << 8
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo(src: IpAddr, dst: IpAddr, len: usize) -> u32 {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend(s.octets());
            p.extend(d.octets());
            p.extend([0, 6]);
            p.extend((len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend(s.octets());
            p.extend(d.octets());
            p.extend((len as u32).to_be_bytes());
            p.extend([0, 0, 0, 6]);
        }
        _ => unreachable!(),
    }
    p.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum()
}

fn tcp_checksum(src: IpAddr, dst: IpAddr, segment: &[u8]) -> u16 {
    checksum(segment, pseudo(src, dst, segment.len()))
}

/// Whether the TCP checksum of `segment` (header with its checksum, and payload) verifies.
pub fn tcp_checksum_ok(src: IpAddr, dst: IpAddr, segment: &[u8]) -> bool {
    checksum(segment, pseudo(src, dst, segment.len())) == 0
}

/// Whether an IPv4 header's checksum verifies.
pub fn ipv4_checksum_ok(header: &[u8]) -> bool {
    checksum(header, 0) == 0
}

/// Where the server_name extension goes among the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SniAt {
    First,
    Last,
    Absent,
}

/// A whole TLS record holding a ClientHello. `key_share` sets the key share's size (1,216 bytes of
/// ML-KEM plus 32 of X25519 make a post-quantum ClientHello that spans two segments).
pub fn client_hello(sni: &str, at: SniAt, key_share: usize, extra_extensions: usize) -> Vec<u8> {
    let ext = |ty: u16, body: &[u8]| {
        let mut e = ty.to_be_bytes().to_vec();
        e.extend((body.len() as u16).to_be_bytes());
        e.extend(body);
        e
    };
    let mut sni_body = Vec::new();
    sni_body.extend(((sni.len() + 3) as u16).to_be_bytes());
    sni_body.push(0);
    sni_body.extend((sni.len() as u16).to_be_bytes());
    sni_body.extend(sni.as_bytes());
    let mut others = Vec::new();
    others.extend(ext(43, &[2, 3, 4]));
    others.extend(ext(10, &[0, 4, 0x11, 0xec, 0, 0x1d]));
    others.extend(ext(13, &[0, 4, 4, 3, 8, 4]));
    for i in 0..extra_extensions {
        others.extend(ext(0xff00 + i as u16, &[]));
    }
    let mut ks = vec![0u8; 2 + 4 + key_share];
    ks[0..2].copy_from_slice(&((4 + key_share) as u16).to_be_bytes());
    ks[2..4].copy_from_slice(&0x11ecu16.to_be_bytes());
    ks[4..6].copy_from_slice(&(key_share as u16).to_be_bytes());
    others.extend(ext(51, &ks));
    let mut exts = Vec::new();
    match at {
        SniAt::First => {
            exts.extend(ext(0, &sni_body));
            exts.extend(others);
        }
        SniAt::Last => {
            exts.extend(others);
            exts.extend(ext(0, &sni_body));
        }
        SniAt::Absent => exts.extend(others),
    }
    let mut body = vec![3, 3];
    body.extend([7u8; 32]);
    body.push(32);
    body.extend([9u8; 32]);
    body.extend([0, 6, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03]);
    body.extend([1, 0]);
    body.extend((exts.len() as u16).to_be_bytes());
    body.extend(exts);
    let mut hs = vec![1];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend((hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

/// A ClientHello exactly as rustls sends it for `sni`.
pub fn rustls_client_hello(sni: &str) -> Vec<u8> {
    use std::sync::Arc;
    let mut roots = rustls::RootCertStore::empty();
    let ca = portcullis::pki::Ca::root("x").unwrap();
    roots.add(ca.der.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}
