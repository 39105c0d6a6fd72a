//! BENCH.md's workloads, portcullis side by side with nginx and HAProxy doing the same job, on
//! this machine, in the same run, driven by the same load generator. In each round the three
//! proxies run side by side and every workload goes to each of them in turn (the order rotating),
//! so the figures a ratio compares are taken within a minute of each other; medians of the rounds
//! are reported with min–max, ratios to the best rival, and the proxy's CPU per unit of work
//! (from `/proc/<pid>/stat`, all its processes).
//!
//! The full run also measures a floor beside them (`rivals/floor.rs`): the least proxy
//! portcullis' crates make (rustls, hyper, hyper-util's pooled client) with none of the gateway's
//! work. portcullis' distance above it is the cost of its own code; the floor's distance from
//! the rivals is the crates'.
//!
//! After the timed rounds each proxy runs once more under callgrind, which counts the userspace
//! instructions one request costs (see `rivals/instructions.rs`): a figure this VM's drift does
//! not move.
//!
//! Run through `cargo xtask bench [--quick]`, which installs nginx-light, haproxy, wrk, h2load,
//! valgrind (Debian) and oha (crates.io) first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use portcullis::pki::{Attr, Ca, Validity};

#[path = "rivals/conf.rs"]
mod conf;
#[path = "rivals/instructions.rs"]
mod instructions;

use conf::{nginx, raise_fd_limit, which};

const BACKEND: u16 = 18080;
/// Every proxy a row can be printed for, in the tables' order: portcullis, its rivals, then the
/// floor.
const ALL: &[(&str, u16)] = &[
    ("portcullis", 19443),
    ("nginx", 19444),
    ("haproxy", 19445),
    ("floor", 19446),
];
/// portcullis and its rivals.
const PROXIES: &[(&str, u16)] = ALL.split_at(3).0;
/// The floor (`rivals/floor.rs`): the least proxy portcullis' crates make, doing none of the
/// gateway's work. Not a rival: no ratio is taken against it, and it does not run W5b (it
/// refuses nobody). It runs in the full bench, and in `--quick` when `RIVALS_PROXIES` names it.
const FLOOR: (&str, u16) = ALL[3];

struct Workload {
    id: &'static str,
    what: &'static str,
    /// The unit of work CPU is reported per (requests, handshakes, MB).
    unit: &'static str,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        id: "W1",
        what: "keep-alive mTLS 1 KiB, oha -c 64",
        unit: "request",
    },
    Workload {
        id: "W2",
        what: "new mTLS connection per request, oha --disable-keepalive -c 32",
        unit: "handshake",
    },
    Workload {
        id: "W3h1",
        what: "plain TLS keep-alive h1, wrk -t2 -c64",
        unit: "request",
    },
    Workload {
        id: "W3h2",
        what: "plain TLS h2, h2load -t2 -c64 -m10",
        unit: "request",
    },
    Workload {
        id: "W4",
        what: "1 MiB bodies, keep-alive mTLS, oha -c 16",
        unit: "MB",
    },
    Workload {
        id: "W5b",
        what: "denied caller keep-alive (403 each), oha -c 64",
        unit: "rejection",
    },
];

/// One measurement: units done per second, p99 where the tool reports it, proxy CPU seconds.
#[derive(Clone, Copy, Default)]
struct Sample {
    rate: f64,
    p99_ms: Option<f64>,
    cpu_per_unit_us: f64,
    /// The part of `cpu_per_unit_us` spent in the kernel (system time).
    sys_per_unit_us: f64,
    /// The backend nginx's CPU per unit of work: a proxy that sends it more, or in smaller
    /// pieces, costs it more, and on this shared box that is time the proxy and the load
    /// generator do not get.
    backend_per_unit_us: f64,
    /// The share of the machine's CPU time left idle during the measurement (0–1, `/proc/stat`):
    /// a closed-loop load generator whose rate falls while CPU is idle is waiting on latency, not
    /// on work.
    idle: f64,
    /// W5b: the allowed caller's p99 (ms) at [`ALLOWED_RATE`] alone, and during the flood.
    allowed_p99_ms: Option<(f64, f64)>,
}

/// W5b's allowed caller: requests per second on one keep-alive mTLS connection (BENCH.md).
const ALLOWED_RATE: u32 = 500;

/// Idle connections M opens, in quick mode too: with fewer, each proxy's fixed memory (worker
/// buffers, allocator arenas) is spread over too few connections to compare (1,000 read
/// portcullis at 0.98× the best rival, 9,000 at 0.58×).
const IDLE_CONNECTIONS: usize = 9_000;

/// `values` in ascending order, for medians and ranges.
fn sorted(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, secs) = if quick { (1, 3) } else { (5, 10) };
    raise_fd_limit();
    for tool in [
        "oha",
        "wrk",
        "h2load",
        "nginx",
        "haproxy",
        "valgrind",
        "callgrind_control",
    ] {
        if which(tool).is_none() {
            eprintln!("{tool} missing: run `cargo xtask bench`, which installs it");
            std::process::exit(1);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d);
    std::fs::write(d.join("1k"), vec![b'x'; 1024]).unwrap();
    std::fs::write(d.join("1m"), vec![b'y'; 1 << 20]).unwrap();
    let backend = Proc::start(nginx("backend", d, &backend_conf(d)), &[BACKEND]);
    // Optional filters for a focused run: RIVALS_PROXIES=portcullis,nginx RIVALS_WORKLOADS=W1,M
    let only = |var: &str, name: &str| {
        std::env::var(var).map_or(true, |v| v.split(',').any(|x| x == name))
    };
    let mut results: BTreeMap<(&str, &str), Vec<Sample>> = BTreeMap::new();
    let mut proxies: Vec<(&str, u16)> = PROXIES
        .iter()
        .copied()
        .filter(|(proxy, _)| only("RIVALS_PROXIES", proxy))
        .collect();
    let floor = with_floor(quick);
    if floor {
        proxies.push(FLOOR);
    }
    for round in 0..rounds {
        // Every proxy runs, fresh, for the whole round, and each workload visits them one after
        // another: the three figures a ratio compares are taken within a minute of each other.
        // (Proxy by proxy, a workload's figures were minutes apart, and this VM's speed moves
        // ±30% from one minute to the next.) The order turns with the round and the workload, so
        // no proxy always goes first.
        let running: Vec<Proc> = proxies
            .iter()
            .map(|&(proxy, port)| start_proxy(proxy, port, d))
            .collect();
        let n = proxies.len();
        let turn = |k: usize| (0..n).map(move |i| (i + k) % n);
        if only("RIVALS_WORKLOADS", "M") {
            for i in turn(round) {
                let (proxy, port) = proxies[i];
                let (kib, kept) =
                    idle_memory(port, d, IDLE_CONNECTIONS, &running[i], after_close(quick));
                eprintln!(
                    "round {} {proxy:>10}     M: {kib:.1} KiB per idle mTLS connection, \
                     {kept:.1} still resident {}s after they closed",
                    round + 1,
                    after_close(quick).as_secs()
                );
                for (key, v) in [("M", kib), ("M-closed", kept)] {
                    results.entry((key, proxy)).or_default().push(Sample {
                        cpu_per_unit_us: v,
                        ..Sample::default()
                    });
                }
            }
        }
        // RIVALS_HOLD=<seconds>: time to attach a profiler before the workloads start.
        if let Some(hold) = std::env::var("RIVALS_HOLD")
            .ok()
            .and_then(|h| h.parse().ok())
        {
            for (&(proxy, port), p) in proxies.iter().zip(&running) {
                eprintln!("{proxy} runs as pid {} on port {port}", p.child.id());
            }
            eprintln!("RIVALS_HOLD: waiting {hold} s");
            std::thread::sleep(Duration::from_secs(hold));
        }
        let workloads = WORKLOADS.iter().filter(|w| only("RIVALS_WORKLOADS", w.id));
        for (k, w) in workloads.enumerate() {
            for i in turn(round + k) {
                let (proxy, port) = proxies[i];
                if proxy == FLOOR.0 && w.id == "W5b" {
                    continue;
                }
                let s = measure(w, port, d, secs, &running[i], &backend);
                eprintln!(
                    "round {} {proxy:>10} {:>5}: {:>10.0}/s p99 {:>7} cpu {:>8.1} µs/{} \
                     (kernel {:.1}) backend {:.1} idle {:.0}%",
                    round + 1,
                    w.id,
                    s.rate,
                    s.p99_ms.map_or("-".into(), |p| format!("{p:.2}ms")),
                    s.cpu_per_unit_us,
                    w.unit,
                    s.sys_per_unit_us,
                    s.backend_per_unit_us,
                    s.idle * 100.0
                );
                results.entry((w.id, proxy)).or_default().push(s);
            }
        }
    }
    let meds = all_medians(&results);
    report(&meds, rounds, secs);
    if only("RIVALS_WORKLOADS", "M") {
        report_memory(&results, IDLE_CONNECTIONS, after_close(quick));
    }
    report_targets(&meds, &results);
    report_floor(&meds);
    // Table I adds about 45 s; `--quick` (kept under 3 minutes in all) counts only when asked.
    let named = std::env::var_os("RIVALS_WORKLOADS").is_some();
    if only("RIVALS_WORKLOADS", "I") && (named || !quick) {
        let counts = instructions::count(d, quick, |proxy| {
            if proxy == FLOOR.0 {
                floor
            } else {
                only("RIVALS_PROXIES", proxy)
            }
        });
        instructions::report(&counts, quick);
    }
}

fn report_memory(results: &BTreeMap<(&str, &str), Vec<Sample>>, n: usize, wait: Duration) {
    println!("\nM: {n} idle keep-alive mTLS connections (one request each), resident memory of the proxy's processes\n");
    println!(
        "| proxy | KiB per connection (median, min–max) | vs best rival | \
         KiB per connection still resident {} s after all closed |",
        wait.as_secs()
    );
    println!("|---|---|---|---|");
    let med = |key: &str, proxy: &str| -> Option<(f64, f64, f64)> {
        let v = sorted(
            results
                .get(&(key, proxy))?
                .iter()
                .map(|s| s.cpu_per_unit_us),
        );
        Some((v[v.len() / 2], v[0], v[v.len() - 1]))
    };
    let best = RIVALS
        .iter()
        .filter_map(|p| med("M", p).map(|m| m.0))
        .fold(f64::INFINITY, f64::min);
    for &(proxy, _) in ALL {
        if let Some((m, lo, hi)) = med("M", proxy) {
            let kept = med("M-closed", proxy).map_or("-".into(), |(k, lo, hi)| {
                format!("{k:.1} ({lo:.1}–{hi:.1})")
            });
            println!(
                "| {proxy} | {m:.1} ({lo:.1}–{hi:.1}) | {} | {kept} |",
                ratio(m, best)
            );
        }
    }
}

/// Resident memory of a process and its descendants, KiB.
fn rss_kib(p: &Proc) -> f64 {
    p.pids()
        .iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .sum()
}

/// How long after M's connections close their memory is looked at again: what a proxy keeps
/// after a burst of connections has gone. `--quick`: 2 s, twice the gateway's jemalloc decay
/// time (`dirty_decay_ms:1000`); it read the same 0.9 KiB per connection there as after 5 s.
const fn after_close(quick: bool) -> Duration {
    Duration::from_secs(if quick { 2 } else { 5 })
}

/// M: opens `n` mTLS connections with one keep-alive request each, holds them idle, and returns
/// the proxy's resident memory growth per connection, then (all closed, `wait` later) what of
/// that growth is still resident, per connection opened.
fn idle_memory(port: u16, d: &Path, n: usize, p: &Proc, wait: Duration) -> (f64, f64) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(d.join("a.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(d.join("a.key")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(d.join("server-ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    let cfg = std::sync::Arc::new(cfg);
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kib(p);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let held = rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (cfg, sem) = (cfg.clone(), sem.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire().await.ok()?;
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()?;
                let name = rustls::pki_types::ServerName::try_from("a.apps.identity").unwrap();
                let exchange = async {
                    let mut tls = tokio_rustls::TlsConnector::from(cfg)
                        .connect(name, tcp)
                        .await
                        .ok()?;
                    tls.write_all(b"GET / HTTP/1.1\r\nhost: a.apps.identity\r\n\r\n")
                        .await
                        .ok()?;
                    // Read the whole answer (a 1 KiB body) so the connection is idle after.
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    loop {
                        let k = tls.read(&mut buf).await.ok()?;
                        if k == 0 {
                            return None;
                        }
                        got.extend_from_slice(&buf[..k]);
                        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            if got.len() >= end + 4 + 1024 {
                                return Some(tls);
                            }
                        }
                    }
                };
                tokio::time::timeout(Duration::from_secs(10), exchange)
                    .await
                    .ok()
                    .flatten()
            }));
        }
        let mut held = Vec::new();
        for t in tasks {
            if let Ok(Some(c)) = t.await {
                held.push(c);
            }
        }
        held
    });
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_kib(p);
    let opened = held.len();
    drop(held);
    drop(rt);
    if opened < n * 9 / 10 {
        eprintln!("M: only {opened} of {n} connections opened");
    }
    std::thread::sleep(wait);
    let kept = rss_kib(p);
    let per = |kib: f64| (kib - before) / opened.max(1) as f64;
    (per(after), per(kept))
}

/// A proxy's medians over the rounds of one workload, with the range of its rate.
struct Medians {
    m: Sample,
    rate_lo: f64,
    rate_hi: f64,
    /// W5b: the allowed caller's p99 during the flood over its p99 alone, median of the rounds'
    /// ratios, with their range.
    allowed_ratio: Option<(f64, f64, f64)>,
}

fn medians(v: &[Sample]) -> Medians {
    let mid = |x: Vec<f64>| x.get(x.len() / 2).copied();
    let rates = sorted(v.iter().map(|s| s.rate));
    let allowed: Vec<(f64, f64)> = v.iter().filter_map(|s| s.allowed_p99_ms).collect();
    let ratios = sorted(allowed.iter().map(|(a, d)| d / a.max(1e-9)));
    Medians {
        m: Sample {
            rate: rates[rates.len() / 2],
            p99_ms: mid(sorted(v.iter().filter_map(|s| s.p99_ms))),
            cpu_per_unit_us: mid(sorted(v.iter().map(|s| s.cpu_per_unit_us))).unwrap_or(0.0),
            sys_per_unit_us: mid(sorted(v.iter().map(|s| s.sys_per_unit_us))).unwrap_or(0.0),
            backend_per_unit_us: mid(sorted(v.iter().map(|s| s.backend_per_unit_us)))
                .unwrap_or(0.0),
            idle: mid(sorted(v.iter().map(|s| s.idle))).unwrap_or(0.0),
            allowed_p99_ms: mid(sorted(allowed.iter().map(|a| a.0)))
                .zip(mid(sorted(allowed.iter().map(|a| a.1)))),
        },
        rate_lo: rates[0],
        rate_hi: rates[rates.len() - 1],
        allowed_ratio: mid(ratios.clone()).map(|r| (r, ratios[0], ratios[ratios.len() - 1])),
    }
}

type Medianed<'a> = BTreeMap<(&'a str, &'a str), Medians>;

fn all_medians<'a>(results: &BTreeMap<(&'a str, &'a str), Vec<Sample>>) -> Medianed<'a> {
    results
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (*k, medians(v)))
        .collect()
}

const RIVALS: [&str; 2] = ["nginx", "haproxy"];

fn report(meds: &Medianed, rounds: usize, secs: u64) {
    println!(
        "\nportcullis binary: {}",
        Path::new(&portcullis_bin()).display()
    );
    println!(
        "\n{} round(s) of {secs} s per workload and proxy, the proxies taking turns within each \
         workload; medians (min–max).\n",
        rounds
    );
    println!("| workload | proxy | rate /s | p99 ms | proxy CPU µs per unit | of which kernel | rate vs best rival | CPU vs best rival | backend CPU µs per unit | machine idle |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for w in WORKLOADS {
        let best = |f: fn(&Sample) -> Option<f64>, higher: bool| {
            best_of(
                RIVALS
                    .iter()
                    .filter_map(|p| meds.get(&(w.id, *p)))
                    .filter_map(|m| f(&m.m)),
                higher,
            )
        };
        let best_rate = best(|s| Some(s.rate), true);
        let best_cpu = best(|s| Some(s.cpu_per_unit_us), false);
        for &(proxy, _) in ALL {
            let Some(Medians {
                m,
                rate_lo,
                rate_hi,
                ..
            }) = meds.get(&(w.id, proxy))
            else {
                continue;
            };
            println!(
                "| {} {} | {proxy} | {:.0} ({:.0}–{:.0}) | {} | {:.1} per {} | {:.1} | {} | {} | {:.1} | {:.0}% |",
                w.id,
                w.what,
                m.rate,
                rate_lo,
                rate_hi,
                m.p99_ms.map_or("-".into(), |p| format!("{p:.2}")),
                m.cpu_per_unit_us,
                w.unit,
                m.sys_per_unit_us,
                ratio(m.rate, best_rate),
                ratio(m.cpu_per_unit_us, best_cpu),
                m.backend_per_unit_us,
                m.idle * 100.0,
            );
        }
    }
    report_allowed(meds);
}

/// W5b's second half: the allowed caller's p99 at 500 req/s alone and beside the denied caller's
/// flood, per proxy.
fn report_allowed(meds: &Medianed) {
    let rows: Vec<_> = PROXIES
        .iter()
        .filter_map(|&(proxy, _)| {
            let m = meds.get(&("W5b", proxy))?;
            Some((proxy, m.m.allowed_p99_ms?, m.allowed_ratio?))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    println!(
        "\nW5b: the allowed caller at {ALLOWED_RATE} req/s on one keep-alive mTLS connection, alone and \
         during the denied caller's flood (oha -c 64); medians, the ratio's range over the rounds\n"
    );
    println!(
        "| proxy | allowed p99 alone ms | during the flood ms | during / alone | target ≤ 2× |"
    );
    println!("|---|---|---|---|---|");
    for (proxy, (alone, during), (r, lo, hi)) in rows {
        println!(
            "| {proxy} | {alone:.2} | {during:.2} | {r:.2}× ({lo:.2}–{hi:.2}) | {} |",
            if r <= 2.0 { "met" } else { "missed" }
        );
    }
}

/// One of BENCH.md's targets: a figure of one workload, portcullis' median against the rivals'.
struct Target {
    workload: &'static str,
    figure: &'static str,
    value: fn(&Medians) -> Option<f64>,
    /// Whether more is better (rates) or less (CPU, latency, memory).
    higher: bool,
    /// The ratio to the best rival it must reach: at least it when `higher`, else at most.
    bound: f64,
}

const fn target(
    workload: &'static str,
    figure: &'static str,
    value: fn(&Medians) -> Option<f64>,
    higher: bool,
    bound: f64,
) -> Target {
    Target {
        workload,
        figure,
        value,
        higher,
        bound,
    }
}

fn rate(m: &Medians) -> Option<f64> {
    Some(m.m.rate)
}

/// CPU per unit; for M, KiB per idle connection (kept in the same field).
fn cpu(m: &Medians) -> Option<f64> {
    Some(m.m.cpu_per_unit_us)
}

fn p99(m: &Medians) -> Option<f64> {
    m.m.p99_ms
}

/// BENCH.md's targets table.
const TARGETS: &[Target] = &[
    target("W1", "req/s", rate, true, 1.1),
    target("W1", "CPU per request", cpu, false, 0.7),
    target("W1", "p99", p99, false, 1.0),
    target("W2", "conn/s", rate, true, 1.2),
    target("W2", "CPU per handshake", cpu, false, 0.5),
    target("W3h1", "req/s", rate, true, 1.1),
    target("W3h1", "CPU per request", cpu, false, 0.8),
    target("W3h2", "req/s", rate, true, 1.1),
    target("W3h2", "CPU per request", cpu, false, 0.8),
    target("W4", "MB/s", rate, true, 1.0),
    target("W4", "CPU per MB", cpu, false, 0.8),
    target("W5b", "CPU per rejection", cpu, false, 0.8),
    target("M", "KiB per idle connection", cpu, false, 0.8),
];

/// BENCH.md's targets table: portcullis against each rival and the best of them, and whether
/// the target is met in this run.
fn report_targets(meds: &Medianed, results: &BTreeMap<(&str, &str), Vec<Sample>>) {
    let figure = |t: &Target, proxy: &str| {
        meds.get(&(t.workload, proxy))
            .and_then(t.value)
            .filter(|v| *v > 0.0)
    };
    let rows: Vec<_> = TARGETS
        .iter()
        .filter_map(|t| Some((t, figure(t, "portcullis")?)))
        .filter(|(t, _)| RIVALS.iter().any(|r| figure(t, r).is_some()))
        .collect();
    if rows.is_empty() {
        return;
    }
    // The same ratio round by round: each round's figures were taken minutes apart at most, so
    // its ratio is the least moved by the machine's drift.
    let in_round = |t: &Target, proxy: &str, round: usize| {
        let s = *results.get(&(t.workload, proxy))?.get(round)?;
        (t.value)(&medians(&[s])).filter(|v| *v > 0.0)
    };
    let per_round = |t: &Target| {
        let rounds = results.get(&(t.workload, "portcullis")).map_or(0, Vec::len);
        let ratios: Vec<String> = (0..rounds)
            .filter_map(|k| {
                let ours = in_round(t, "portcullis", k)?;
                let best = best_of(RIVALS.iter().filter_map(|r| in_round(t, r, k)), t.higher);
                best.is_finite().then(|| format!("{:.2}", ours / best))
            })
            .collect();
        ratios.join(" / ")
    };
    println!("\nportcullis against each rival, and BENCH.md's targets (ratios of medians)\n");
    println!(
        "| workload | figure | vs nginx | vs haproxy | vs best rival | round by round | target | this run |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (t, ours) in rows {
        let best = best_of(RIVALS.iter().filter_map(|r| figure(t, r)), t.higher);
        let r = ours / best;
        let met = if t.higher { r >= t.bound } else { r <= t.bound };
        let vs = |rival| figure(t, rival).map_or("-".into(), |v| format!("{:.2}×", ours / v));
        println!(
            "| {} | {} | {} | {} | {r:.2}× | {} | {} {:.1}× | {} |",
            t.workload,
            t.figure,
            vs("nginx"),
            vs("haproxy"),
            per_round(t),
            if t.higher { "≥" } else { "≤" },
            t.bound,
            if met { "met" } else { "missed" }
        );
    }
}

/// The best of the rivals' figures: the highest when more is better, else the lowest; NaN when
/// there is none.
fn best_of(v: impl Iterator<Item = f64>, higher: bool) -> f64 {
    v.filter(|x| *x > 0.0)
        .reduce(|a, b| if higher { a.max(b) } else { a.min(b) })
        .unwrap_or(f64::NAN)
}

/// `x` as a multiple of the best rival's figure, or "-" when no rival ran (a focused run with
/// `RIVALS_PROXIES`) or none measured anything.
fn ratio(x: f64, best: f64) -> String {
    if best.is_finite() && best > 0.0 {
        format!("{:.2}×", x / best)
    } else {
        "-".into()
    }
}

fn measure(w: &Workload, port: u16, d: &Path, secs: u64, p: &Proc, backend: &Proc) -> Sample {
    let url = |host: &str, path: &str| format!("https://{host}:{port}{path}");
    let a_cert = d.join("a.pem");
    let a_key = d.join("a.key");
    let oha = |extra: &[&str], target: String, cert: &str| -> Command {
        let mut c = Command::new("oha");
        c.args([
            "--no-tui",
            "--output-format",
            "json",
            "--insecure",
            "--ipv4",
            "-z",
        ])
        .arg(format!("{secs}s"))
        .arg("--cert")
        .arg(d.join(format!("{cert}.pem")))
        .arg("--key")
        .arg(d.join(format!("{cert}.key")))
        .args(extra)
        .arg("--connect-to")
        .arg(format!("a.apps.identity:{port}:127.0.0.1:{port}"))
        .arg(target);
        c
    };
    let _ = (&a_cert, &a_key);
    // W5b's allowed caller, at 500 req/s on one connection: alone first (outside the measured
    // CPU), then beside the flood. Its CPU share in the proxy during the flood (500 requests a
    // second against tens of thousands of rejections) is counted with the rejections'.
    let allowed = || {
        oha(
            &["-c", "1", "-q", &ALLOWED_RATE.to_string()],
            url("a.apps.identity", "/"),
            "a",
        )
    };
    let alone = (w.id == "W5b").then(|| oha_run(&mut allowed(), 1.0, 200).1);
    let beside = alone.map(|_| {
        let mut cmd = allowed();
        std::thread::spawn(move || oha_run(&mut cmd, 1.0, 200).1)
    });
    let cpu0 = p.cpu();
    let backend0 = backend.cpu();
    let machine0 = machine_cpu();
    let t0 = Instant::now();
    let (units, p99) = match w.id {
        "W1" => oha_run(
            &mut oha(&["-c", "64"], url("a.apps.identity", "/"), "a"),
            1.0,
            200,
        ),
        "W2" => oha_run(
            &mut oha(
                &["-c", "32", "--disable-keepalive"],
                url("a.apps.identity", "/"),
                "a",
            ),
            1.0,
            200,
        ),
        "W4" => oha_run(
            &mut oha(&["-c", "16"], url("a.apps.identity", "/1m"), "a"),
            1.048576,
            200,
        ),
        "W5b" => oha_run(
            &mut oha(&["-c", "64"], url("a.apps.identity", "/"), "b"),
            1.0,
            403,
        ),
        "W3h1" => {
            let out = output(
                Command::new("wrk")
                    .args(["-t2", "-c64", "-d"])
                    .arg(format!("{secs}s"))
                    .args(["-H", "Host: a.apps.plain"])
                    .arg(format!("https://127.0.0.1:{port}/")),
            );
            (parse_wrk(&out), None)
        }
        _ => {
            let out = output(
                Command::new("h2load")
                    .args(["-t2", "-c64", "-m10", "-D"])
                    .arg(secs.to_string())
                    .args(["--header", ":authority: a.apps.plain"])
                    .arg(format!("https://127.0.0.1:{port}/")),
            );
            (parse_h2load(&out), None)
        }
    };
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = p.cpu() - cpu0;
    let backend_cpu = backend.cpu() - backend0;
    let (busy, idle) = machine_cpu();
    let (busy, idle) = (busy - machine0.0, idle - machine0.1);
    let during = beside.map(|t| t.join().expect("the allowed caller's oha"));
    let allowed_p99_ms = match (alone.flatten(), during.flatten()) {
        (Some(a), Some(d)) => Some((a, d)),
        _ => None,
    };
    let per_unit = |seconds: f64| {
        if units > 0.0 {
            seconds * 1e6 / units
        } else {
            0.0
        }
    };
    Sample {
        rate: units / elapsed.min(secs as f64 + 1.0),
        p99_ms: p99,
        cpu_per_unit_us: per_unit(cpu.user + cpu.sys),
        sys_per_unit_us: per_unit(cpu.sys),
        backend_per_unit_us: per_unit(backend_cpu.user + backend_cpu.sys),
        idle: idle / (busy + idle).max(1.0),
        allowed_p99_ms,
    }
}

/// The machine's CPU time so far in clock ticks, (busy, idle), from `/proc/stat`'s `cpu` line;
/// idle counts iowait too.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let idle = f.get(3).unwrap_or(&0.0) + f.get(4).unwrap_or(&0.0);
    (f.iter().sum::<f64>() - idle, idle)
}

/// Runs oha; returns (units done, p99 ms). `unit_mb` scales responses to MB for W4. Every
/// response must have status `expect`: a proxy answering something else is not doing the job
/// being measured, and its figures would be compared as if it were.
fn oha_run(cmd: &mut Command, unit_mb: f64, expect: u16) -> (f64, Option<f64>) {
    let out = output(cmd);
    let v: serde_json::Value = match serde_json::from_str(&out) {
        Ok(v) => v,
        Err(e) => panic!("oha output is not JSON ({e}): {out}"),
    };
    let codes = v["statusCodeDistribution"].as_object();
    let wrong: Vec<String> = codes
        .into_iter()
        .flatten()
        .filter(|(code, _)| **code != expect.to_string())
        .map(|(code, n)| format!("{n} × {code}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "expected only {expect} responses, also got {}",
        wrong.join(", ")
    );
    let responses: f64 = codes
        .map(|m| m.values().filter_map(|c| c.as_f64()).sum())
        .unwrap_or(0.0);
    let p99 = v["latencyPercentiles"]["p99"].as_f64().map(|s| s * 1000.0);
    (responses * unit_mb, p99)
}

/// Requests done by wrk; every response must be 2xx or 3xx.
fn parse_wrk(out: &str) -> f64 {
    if let Some(l) = out.lines().find(|l| l.contains("Non-2xx or 3xx responses")) {
        panic!("wrk got error responses ({}): {out}", l.trim());
    }
    // "  123456 requests in 10.00s, ..."
    out.lines()
        .find_map(|l| {
            let l = l.trim();
            let (n, rest) = l.split_once(' ')?;
            rest.starts_with("requests in").then(|| n.parse().ok())?
        })
        .unwrap_or_else(|| panic!("wrk output: {out}"))
}

/// Requests h2load completed; every response must be 2xx.
fn parse_h2load(out: &str) -> f64 {
    // "status codes: 100 2xx, 0 3xx, 0 4xx, 0 5xx"
    let codes = out
        .lines()
        .find_map(|l| l.strip_prefix("status codes: "))
        .unwrap_or_else(|| panic!("h2load output has no status codes: {out}"));
    let non_2xx: u64 = codes
        .split(", ")
        .filter(|c| !c.ends_with(" 2xx"))
        .filter_map(|c| c.split(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        non_2xx == 0,
        "h2load got non-2xx responses ({codes}): {out}"
    );
    // "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, ..."
    out.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("requests: ")?;
            let part = rest.split(", ").find(|p| p.ends_with(" succeeded"))?;
            part.trim_end_matches(" succeeded").parse().ok()
        })
        .unwrap_or_else(|| panic!("h2load output: {out}"))
}

fn output(cmd: &mut Command) -> String {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .expect("load generator");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A proxy (or the backend) under test, with every process it forks counted for CPU.
struct Proc {
    child: Child,
}

impl Proc {
    fn start(cmd: Command, ports: &[u16]) -> Proc {
        Proc::start_within(cmd, ports, Duration::from_secs(10))
    }

    /// Starts `cmd` and waits up to `wait` until it listens on every one of `ports`.
    fn start_within(mut cmd: Command, ports: &[u16], wait: Duration) -> Proc {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let deadline = Instant::now() + wait;
        for &port in ports {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "{cmd:?} did not listen on {port}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Proc { child }
    }

    /// CPU seconds of the process and its descendants that are alive now.
    fn cpu(&self) -> Cpu {
        self.pids()
            .iter()
            .map(|p| cpu_seconds(*p))
            .fold(Cpu::default(), |a, b| a + b)
    }

    /// The process and its descendants.
    fn pids(&self) -> Vec<u32> {
        conf::process_tree(self.child.id())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..100 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds in user space and in the kernel.
#[derive(Clone, Copy, Default)]
struct Cpu {
    user: f64,
    sys: f64,
}

impl std::ops::Add for Cpu {
    type Output = Cpu;
    fn add(self, o: Cpu) -> Cpu {
        Cpu {
            user: self.user + o.user,
            sys: self.sys + o.sys,
        }
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, o: Cpu) -> Cpu {
        Cpu {
            user: self.user - o.user,
            sys: self.sys - o.sys,
        }
    }
}

fn cpu_seconds(pid: u32) -> Cpu {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Cpu::default();
    };
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let secs = |i: usize| f[i].parse::<u64>().unwrap_or(0) as f64 / tck;
    Cpu {
        user: secs(11),
        sys: secs(12),
    }
}

/// The BENCH.md PKI: server certificate, instance-identity root → intermediate, Diego-shaped
/// P-256 callers `a` (allowed) and `b` (not).
fn pki(d: &Path) {
    let server_ca = Ca::root("bench server CA").unwrap();
    let server = server_ca
        .server(&["*.apps.identity", "*.apps.plain", "localhost", "127.0.0.1"])
        .unwrap();
    std::fs::write(d.join("server.pem"), &server.chain_pem).unwrap();
    std::fs::write(d.join("server-ca.pem"), &server_ca.cert_pem).unwrap();
    std::fs::write(d.join("server.key"), &server.key_pem).unwrap();
    let root = Ca::root("instance identity root").unwrap();
    let inter = root.intermediate("instanceIdentityCA").unwrap();
    std::fs::write(
        d.join("identity-ca.pem"),
        format!("{}{}", inter.cert_pem, root.cert_pem),
    )
    .unwrap();
    for (name, app) in [("a", "app-a"), ("b", "app-b")] {
        let (o, s, a) = (
            "organization:org-1".to_string(),
            "space:space-1".to_string(),
            format!("app:{app}"),
        );
        let leaf = inter
            .client(
                &[
                    &[Attr::Cn("instance")],
                    &[Attr::Ou(&o), Attr::Ou(&s), Attr::Ou(&a)],
                ],
                Validity::Current,
            )
            .unwrap();
        std::fs::write(d.join(format!("{name}.pem")), &leaf.chain_pem).unwrap();
        std::fs::write(d.join(format!("{name}.key")), &leaf.key_pem).unwrap();
    }
}

fn backend_conf(d: &Path) -> String {
    format!(
        "worker_processes 1;\nerror_log stderr error;\npid backend.pid;\nevents {{ worker_connections 4096; }}\n\
         http {{ access_log off; keepalive_requests 1000000;\n  server {{ listen 127.0.0.1:{BACKEND};\n    \
         root {dir}; default_type application/octet-stream;\n    \
         location = / {{ try_files /1k =404; }}\n    location = /1m {{ }} }} }}\n",
        dir = d.display()
    )
}

/// The portcullis binary measured: `RIVALS_PORTCULLIS_BIN` (`cargo xtask bench` passes the
/// profile-guided build; another build for an A/B comparison), else this package's release build.
fn portcullis_bin() -> std::ffi::OsString {
    std::env::var_os("RIVALS_PORTCULLIS_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_portcullis").into())
}

fn start_proxy(proxy: &str, port: u16, d: &Path) -> Proc {
    Proc::start(proxy_command(proxy, port, d, false), &[port])
}

/// The command that runs `proxy` on `port` with this run's configuration. `counted`: it will run
/// under callgrind, whose control pipe an nginx worker can only open if it keeps root's identity.
fn proxy_command(proxy: &str, port: u16, d: &Path, counted: bool) -> Command {
    let dd = d.display();
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let backend = SocketAddr::from(([127, 0, 0, 1], BACKEND));
    match proxy {
        "portcullis" => {
            let conf = format!(
                "listen: {{https: \"127.0.0.1:{port}\"}}\n\
                 tls: {{certificates: [{{cert_chain: {dd}/server.pem, private_key: {dd}/server.key}}]}}\n\
                 access_log: {{path: {dd}/portcullis-access.log}}\n\
                 backends: {{max_idle_per_endpoint: 1000}}\n\
                 domains:\n  - name: \"*.apps.identity\"\n    ca_certs: {dd}/identity-ca.pem\n\
                 routes:\n  - {{uris: [a.apps.identity], host: \"127.0.0.1\", port: {BACKEND}, options: {{route_policy_scope: any, route_policy_sources: \"cf:app:app-a\"}}}}\n  \
                 - {{uris: [a.apps.plain], host: \"127.0.0.1\", port: {BACKEND}}}\n"
            );
            let path = d.join("portcullis.yaml");
            std::fs::write(&path, conf).unwrap();
            let mut c = Command::new(portcullis_bin());
            c.args(["run", "--config"])
                .arg(path)
                .env("PORTCULLIS_LOG", "warn,rustls=error");
            c
        }
        "nginx" => conf::nginx_front(listen, backend, d, counted),
        "floor" => {
            let mut c = Command::new(floor_bin());
            c.arg(listen.to_string())
                .args(["server.pem", "server.key", "identity-ca.pem"].map(|f| d.join(f)))
                .arg(backend.to_string());
            c
        }
        _ => conf::haproxy(listen, backend, d),
    }
}

/// The floor's binary: `RIVALS_FLOOR_BIN`, else the `floor` example beside this bench's build
/// (`cargo xtask bench` builds it; `cargo build --release -p portcullis --example floor`).
fn floor_bin() -> std::path::PathBuf {
    if let Some(bin) = std::env::var_os("RIVALS_FLOOR_BIN") {
        return bin.into();
    }
    // This bench runs as target/release/deps/rivals-<hash>.
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    dir.join("examples").join("floor")
}

/// Whether the floor runs: in the full bench unless `RIVALS_PROXIES` leaves it out, in
/// `--quick` only when it names it. A floor that was not built is said and skipped.
fn with_floor(quick: bool) -> bool {
    let named = std::env::var("RIVALS_PROXIES").ok();
    let wanted = match &named {
        Some(v) => v.split(',').any(|x| x == FLOOR.0),
        None => !quick,
    };
    if wanted && !floor_bin().is_file() {
        eprintln!(
            "the floor ({}) is not built: `cargo build --release -p portcullis --example floor`; \
             measuring without it",
            floor_bin().display()
        );
        return false;
    }
    wanted
}

/// portcullis against the floor of the same rounds: what the gateway's own work costs over the
/// crates it is made of, per unit of work.
fn report_floor(meds: &Medianed) {
    let rows: Vec<_> = WORKLOADS
        .iter()
        .filter_map(|w| {
            let ours = &meds.get(&(w.id, "portcullis"))?.m;
            let floor = &meds.get(&(w.id, FLOOR.0))?.m;
            Some((w, ours, floor))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    println!(
        "\nportcullis against the floor (rustls, hyper and hyper-util's pooled client, nothing \
         else; medians)\n"
    );
    println!(
        "| workload | rate vs floor | CPU vs floor | CPU above the floor µs per unit (kernel) |"
    );
    println!("|---|---|---|---|");
    for (w, ours, floor) in rows {
        println!(
            "| {} | {} | {} | {:.1} per {} ({:.1}) |",
            w.id,
            ratio(ours.rate, floor.rate),
            ratio(ours.cpu_per_unit_us, floor.cpu_per_unit_us),
            ours.cpu_per_unit_us - floor.cpu_per_unit_us,
            w.unit,
            ours.sys_per_unit_us - floor.sys_per_unit_us,
        );
    }
}
