//! Nanoseconds per packet in the XDP gate, timed by the kernel over `BPF_PROG_TEST_RUN` repeats.
//! Needs root and the object from `cargo xtask build-ebpf`.
//!
//! `cargo bench -p portcullis --bench xdp`

#[path = "../tests/support/packets.rs"]
#[allow(dead_code)]
mod packets;

use ipnet::IpNet;
use packets::{client_hello, Segment, SniAt};
use portcullis::xdp::{addr_bytes, allow_entry, balancer_entry, Gate, MapPlan, OBJECT};
use portcullis_common::{name_hash, DomainEntry, DOMAIN_HAS_ALLOWLIST, REJECT_DROP};

fn main() {
    if OBJECT.is_empty() {
        eprintln!("no XDP object embedded: run `cargo xtask build-ebpf` first");
        std::process::exit(1);
    }
    // `--quick`: fewer, shorter samples for use during development.
    let quick = std::env::args().any(|a| a == "--quick");
    let (samples_n, repeat) = if quick { (3, 200_000) } else { (7, 1_000_000) };
    let pin = PinDir::new();
    let mut gate = Gate::load(OBJECT, &pin.0).expect("load");
    let net: IpNet = "10.1.0.0/16".parse().unwrap();
    let plan = MapPlan {
        domains: vec![(
            name_hash(b"apps.identity"),
            DomainEntry {
                wildcard_id: 1,
                wildcard_flags: DOMAIN_HAS_ALLOWLIST,
                ..Default::default()
            },
        )],
        allow: vec![allow_entry(1, &net)],
        ports: vec![443],
        reject: REJECT_DROP,
        fresh: Vec::new(),
        ungated: Vec::new(),
        balancers: vec![balancer_entry(&"192.0.2.200/32".parse().unwrap())],
    };
    gate.sync(&plan, true).unwrap();
    gate.deny(1, addr_bytes("192.0.2.99".parse().unwrap()), u64::MAX / 2)
        .unwrap();
    let hello = client_hello("some-app.apps.identity", SniAt::Last, 32, 6);
    let mut rows = Vec::new();
    let mut bench = |name: &str, seg: &Segment| {
        let frame = seg.frame();
        // The first run may record a flow; time fresh flows by varying the source port.
        let mut samples: Vec<f64> = (0..samples_n)
            .map(|i| {
                let mut s = seg.clone();
                s.sport = 10_000 + i;
                gate.time_run(&s.frame(), repeat)
                    .unwrap_or_else(|e| panic!("{name}: test run: {e}"))
            })
            .collect();
        samples.sort_by(f64::total_cmp);
        rows.push((
            name.to_string(),
            frame.len(),
            samples[samples.len() / 2],
            samples[0],
            samples[samples.len() - 1],
        ));
    };
    bench(
        "pass: ClientHello, allowed source",
        &Segment::new("10.1.2.3", "10.0.0.1", hello.clone()),
    );
    bench(
        "reject: rejected flow again (FLOWS hit)",
        &Segment::new("192.0.2.1", "10.0.0.1", hello.clone()),
    );
    bench(
        "reject: denied source, flow again",
        &Segment::new("192.0.2.99", "10.0.0.1", hello.clone()),
    );
    bench(
        "pass: TLS application data",
        &Segment::new(
            "192.0.2.1",
            "10.0.0.1",
            vec![0x17, 3, 3, 0, 64]
                .into_iter()
                .chain([0u8; 64])
                .collect(),
        ),
    );
    // Behind a load balancer: the PROXY header read, the ClientHello judged as the named client's.
    let mut v1 = b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 443\r\n".to_vec();
    v1.extend(&hello);
    bench(
        "pass: balancer, v1 header + ClientHello",
        &Segment::new("192.0.2.200", "10.0.0.1", v1),
    );
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend([10, 1, 2, 3, 10, 0, 0, 1, 0x9c, 0x40, 0x01, 0xbb]);
    bench(
        "pass: balancer, v2 header alone",
        &Segment::new("192.0.2.200", "10.0.0.1", v2),
    );
    let mut other = Segment::new("192.0.2.1", "10.0.0.1", hello.clone());
    other.dport = 80;
    bench("pass: port not gated", &other);
    drop(gate);
    drop(pin);
    println!(
        "XDP gate, BPF_PROG_TEST_RUN, median of {samples_n} × {repeat} runs (test-run overhead included)"
    );
    println!("A rejected flow is parsed once (about the cost of the first row), then answered from FLOWS.");
    println!(
        "{:<40} {:>6} {:>10} {:>18}",
        "frame", "bytes", "ns/packet", "min–max"
    );
    for (name, len, med, min, max) in rows {
        println!("{name:<40} {len:>6} {med:>10.1} {min:>8.1}–{max:.1}");
    }
}

/// The bench's own bpffs pin directory, removed when the bench ends or panics.
struct PinDir(std::path::PathBuf);

impl PinDir {
    fn new() -> Self {
        let path = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/portcullis-bench-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).expect("bpffs (root, mounted)");
        PinDir(path)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
