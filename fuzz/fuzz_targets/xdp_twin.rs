//! The XDP program and its pure-Rust twin on the same frames: any disagreement on the action,
//! the counter or the output frame is a crash. Runs as root with the object embedded (`cargo
//! xtask fuzz` builds it). The first input byte picks the frame shape and source; the rest is the
//! TCP payload, so the fuzzer works on the ClientHello parser, and, from the load balancer, on the
//! PROXY header parser, with the payload in one segment or split in two at the point the second
//! input byte names (a header alone in its segment is remembered for the next).
#![no_main]

#[path = "../../tests/support/packets.rs"]
#[allow(dead_code)]
mod packets;

use std::collections::BTreeMap;
use std::sync::Mutex;

use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use packets::Segment;
use portcullis::xdp::twin::{classify, Action, TwinMaps};
use portcullis::xdp::{
    addr_bytes, allow_entry, balancer_entry, monotonic_ns, Gate, MapPlan, OBJECT,
};
use portcullis_common::{name_hash, DenyKey, DomainEntry, DOMAIN_HAS_ALLOWLIST};

struct Both {
    gate: Gate,
    twin: TwinMaps,
}

static BOTH: Mutex<Option<Both>> = Mutex::new(None);

fn setup() -> Both {
    assert!(
        !OBJECT.is_empty(),
        "build the XDP object first (cargo xtask build-ebpf)"
    );
    let pin = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/portcullis-fuzz-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&pin).expect("root and bpffs");
    let mut gate = Gate::load(OBJECT, &pin).expect("load");
    let net: IpNet = "10.1.0.0/16".parse().unwrap();
    let plan = MapPlan {
        domains: vec![
            (
                name_hash(b"apps.identity"),
                DomainEntry {
                    wildcard_id: 1,
                    wildcard_flags: DOMAIN_HAS_ALLOWLIST,
                    ..Default::default()
                },
            ),
            (
                name_hash(b"exact.mtls.domain"),
                DomainEntry {
                    exact_id: 2,
                    ..Default::default()
                },
            ),
        ],
        allow: vec![allow_entry(1, &net)],
        ports: vec![443],
        reject: 0,
        fresh: Vec::new(),
        ungated: Vec::new(),
        balancers: vec![balancer_entry(&"192.0.2.200/32".parse().unwrap())],
    };
    gate.sync(&plan, true).unwrap();
    let mut twin = TwinMaps::from_plan(&plan);
    let denied = addr_bytes("192.0.2.66".parse().unwrap());
    gate.deny(2, denied, u64::MAX / 2).unwrap();
    twin.deny.insert(
        DenyKey {
            domain_id: 2,
            addr: denied,
        },
        u64::MAX / 2,
    );
    Both { gate, twin }
}

fn counters(gate: &Gate) -> BTreeMap<(u32, u32), u64> {
    gate.counters_up_to(2)
        .unwrap()
        .into_iter()
        .map(|(d, c, v)| ((d, c as u32), v))
        .collect()
}

/// Runs one frame through both, twice: a frame the first run rejects is a later segment of a
/// rejected flow the second time.
fn both_agree(both: &mut Both, frame: &[u8]) {
    for _ in 0..2 {
        let before = counters(&both.gate);
        let (action, out) = both.gate.test_run(frame).unwrap();
        let v = classify(frame, &mut both.twin, monotonic_ns());
        let after = counters(&both.gate);
        let moved: Vec<(u32, u32)> = after
            .iter()
            .filter(|(k, n)| before.get(k) != Some(n))
            .map(|(k, _)| *k)
            .collect();
        let twin_moved: Vec<(u32, u32)> =
            v.counter.map(|(d, c)| (d, c as u32)).into_iter().collect();
        assert_eq!(moved, twin_moved, "counters differ");
        let twin_action = match v.action {
            Action::Drop => 1,
            Action::Pass => 2,
            Action::Tx => 3,
        };
        assert_eq!(action, twin_action, "actions differ");
        if action != 1 {
            assert_eq!(out, v.frame, "frames differ");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&shape, payload)) = data.split_first() else {
        return;
    };
    let mut guard = BOTH.lock().unwrap();
    let both = guard.get_or_insert_with(setup);
    let src = if shape & 0x10 != 0 {
        "192.0.2.200"
    } else {
        ["10.1.2.3", "192.0.2.1", "192.0.2.66", "2001:db8::1"][(shape & 3) as usize]
    };
    let dst = if src.contains(':') {
        "2001:db8::2"
    } else {
        "10.0.0.1"
    };
    // Split: the second byte says where (it is part of the payload too).
    let split = match payload.first() {
        Some(&at) if shape & 0x20 != 0 && (at as usize) < payload.len() => at as usize,
        _ => payload.len(),
    };
    let mut seg = Segment::new(src, dst, payload[..split].to_vec());
    if shape & 4 != 0 {
        seg.vlans = vec![7];
    }
    if shape & 8 != 0 {
        seg.tcp_options = vec![1, 1, 1, 1];
    }
    both.gate.forget_flows().unwrap();
    both.twin.flows.clear();
    both.twin.proxied.clear();
    both_agree(both, &seg.frame());
    if split < payload.len() {
        seg.payload = payload[split..].to_vec();
        seg.seq = seg.seq.wrapping_add(split as u32);
        both_agree(both, &seg.frame());
    }
});
