//! I: userspace instructions per request, counted by valgrind's callgrind.
//!
//! CPU time per request on these shared 2-core VMs moves 10–20% between runs of the same binary,
//! more than most changes are worth. Instructions do not: each proxy runs under
//! `valgrind --tool=callgrind` with the same configuration as in the timed rounds, and for each
//! workload the load generator sends `n1` and then `n2` requests over 4 connections; the counters
//! are zeroed before the first batch and dumped after each, so (count₂ − count₁) / (n2 − n1) is the
//! work of one request with start-up and the handshakes cancelled. It counts instructions, not
//! time: the kernel's share (loopback TCP, about half of a proxy's CPU here) and the cost of cache
//! misses are not in it, and a `rep movsb` counts once per byte it moves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{output, parse_h2load, proxy_command, Proc, ALL, FLOOR, RIVALS};

/// The workloads counted: the keep-alive ones whose per-request cost is the question.
pub const COUNTED: &[(&str, &str)] = &[
    ("W1", "keep-alive mTLS 1 KiB (oha -c 4)"),
    ("W3h1", "plain TLS keep-alive h1 (h2load --h1 -c 4)"),
    ("W3h2", "plain TLS h2 (h2load -c 4 -m 10)"),
    ("W5b", "denied caller keep-alive, 403 each (oha -c 4)"),
];

/// The two batch sizes, in requests, whose difference is counted.
fn batches(quick: bool) -> (usize, usize) {
    if quick {
        (200, 1_200)
    } else {
        (1_000, 6_000)
    }
}

/// Instructions per request by (workload, proxy); a proxy whose count failed is left out.
pub type Counts = BTreeMap<(&'static str, &'static str), f64>;

/// Counts every workload of [`COUNTED`] for each proxy `wanted` accepts.
pub fn count(d: &Path, quick: bool, wanted: impl Fn(&str) -> bool) -> Counts {
    let (n1, n2) = batches(quick);
    let mut counts = Counts::new();
    for &(proxy, port) in ALL {
        if !wanted(proxy) {
            continue;
        }
        let p = start_counted(proxy, port, d);
        let Some(pids) = serving_pids(proxy, &p) else {
            eprintln!("I {proxy:>10}: its workers did not start");
            continue;
        };
        for &(w, _) in COUNTED {
            // The floor refuses nobody.
            if proxy == FLOOR.0 && w == "W5b" {
                continue;
            }
            match count_one(w, proxy, port, d, &pids, n1, n2) {
                Ok(per_request) => {
                    eprintln!("I {proxy:>10} {w:>5}: {per_request:>9.0} instructions per request");
                    counts.insert((w, proxy), per_request);
                }
                Err(e) => eprintln!("I {proxy:>10} {w:>5}: not counted: {e}"),
            }
        }
    }
    counts
}

/// Prints the table of [`count`]'s figures with portcullis' ratio to the best rival, and, when
/// the floor was counted, the instructions portcullis' own work adds to it.
pub fn report(counts: &Counts, quick: bool) {
    let (n1, n2) = batches(quick);
    println!(
        "\nI: userspace instructions per request (callgrind; the proxy's processes, ({n2} − {n1} requests) / {}, same configuration as above)\n",
        n2 - n1
    );
    let floor = counts.keys().any(|(_, p)| *p == FLOOR.0);
    let (floor_head, floor_rule) = if floor {
        (" floor | portcullis above the floor |", "---|---|")
    } else {
        ("", "")
    };
    println!("| workload | portcullis | nginx | haproxy | portcullis vs best rival |{floor_head}");
    println!("|---|---|---|---|---|{floor_rule}");
    for &(w, what) in COUNTED {
        let cell = |proxy: &'static str| {
            counts
                .get(&(w, proxy))
                .map_or("-".to_string(), |c| format!("{:.1}k", c / 1000.0))
        };
        let best = RIVALS
            .iter()
            .filter_map(|p| counts.get(&(w, *p)))
            .fold(f64::INFINITY, |a, b| a.min(*b));
        let ratio = counts
            .get(&(w, "portcullis"))
            .filter(|_| best.is_finite())
            .map_or("-".to_string(), |c| format!("{:.2}×", c / best));
        let above = match (counts.get(&(w, "portcullis")), counts.get(&(w, FLOOR.0))) {
            (Some(ours), Some(bare)) => format!("{:+.1}k", (ours - bare) / 1000.0),
            _ => "-".to_string(),
        };
        let floor_cells = if floor {
            format!(" {} | {above} |", cell(FLOOR.0))
        } else {
            String::new()
        };
        println!(
            "| {w} {what} | {} | {} | {} | {ratio} |{floor_cells}",
            cell("portcullis"),
            cell("nginx"),
            cell("haproxy")
        );
    }
}

/// The processes that serve requests. An nginx master forks its workers after it listens, and
/// sleeps in sigsuspend, where it would never read a callgrind command: its workers only.
fn serving_pids(proxy: &str, p: &Proc) -> Option<Vec<u32>> {
    if proxy != "nginx" {
        return Some(vec![p.child.id()]);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let workers: Vec<u32> = p.pids().into_iter().skip(1).collect();
        if workers.len() >= 2 {
            return Some(workers);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Starts `proxy` under callgrind, its dumps named `callgrind.<proxy>.<pid>.<n>` in `d`.
fn start_counted(proxy: &str, port: u16, d: &Path) -> Proc {
    let inner = proxy_command(proxy, port, d, true);
    let mut c = Command::new("valgrind");
    // Forked workers (nginx's) answer callgrind_control only with this on.
    c.arg("--tool=callgrind")
        .arg("--trace-children=yes")
        .arg(format!(
            "--callgrind-out-file={}/callgrind.{proxy}.%p",
            d.display()
        ))
        .arg(format!(
            "--log-file={}/valgrind.{proxy}.%p.log",
            d.display()
        ));
    if std::env::var_os("RIVALS_CALLGRIND_KEEP").is_some() {
        // A later dump names a function by the number an earlier one gave it, which
        // callgrind_annotate cannot follow in a kept dump on its own: write the names out.
        c.args(["--compress-strings=no", "--compress-pos=no"]);
    }
    c.arg(inner.get_program()).args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    // Under valgrind a proxy starts 20–50 times slower.
    Proc::start_within(c, &[port], Duration::from_secs(120))
}

fn count_one(
    w: &str,
    proxy: &str,
    port: u16,
    d: &Path,
    pids: &[u32],
    n1: usize,
    n2: usize,
) -> Result<f64, String> {
    control_all(pids, "-z", port)?;
    load(w, port, d, n1)?;
    control_all(pids, "-d", port)?;
    let first = totals(d, proxy, pids)?;
    load(w, port, d, n2)?;
    control_all(pids, "-d", port)?;
    let second = totals(d, proxy, pids)?;
    keep_dumps(d, proxy, w, pids)?;
    Ok((second as f64 - first as f64) / (n2 - n1) as f64)
}

/// Sends a callgrind_control command (`-z` zero, `-d` dump and zero) to each process. A process
/// reads it only when it runs, so while the command waits the proxy is woken by bare TCP
/// connections closed at once; the same few land in every batch and cancel.
fn control_all(pids: &[u32], cmd: &str, port: u16) -> Result<(), String> {
    for &pid in pids {
        let mut ctl = Command::new("callgrind_control")
            .args([cmd, &pid.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("callgrind_control: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match ctl.try_wait() {
                // It exits 0 also when it found no such process; "OK." is the answer.
                Ok(Some(_)) => {
                    let out = ctl.wait_with_output().map_err(|e| e.to_string())?;
                    let said = String::from_utf8_lossy(&out.stdout).into_owned()
                        + &String::from_utf8_lossy(&out.stderr);
                    if !said.contains("OK.") {
                        return Err(format!("callgrind_control {cmd} {pid}: {}", said.trim()));
                    }
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    let _ = std::net::TcpStream::connect(("127.0.0.1", port));
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    let _ = ctl.kill();
                    let _ = ctl.wait();
                    return Err(format!("callgrind_control {cmd} {pid}: no answer in 30 s"));
                }
            }
        }
    }
    Ok(())
}

/// The newest dump of `pid` in `d`.
fn newest_dump(d: &Path, proxy: &str, pid: u32) -> Result<PathBuf, String> {
    let prefix = format!("callgrind.{proxy}.{pid}.");
    let newest: Option<(u32, PathBuf)> = std::fs::read_dir(d)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let part = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((part, e.path()))
        })
        .max();
    newest.map(|(_, path)| path).ok_or_else(|| {
        let present: Vec<String> = std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("callgrind."))
            .collect();
        format!("no callgrind dump of {proxy} pid {pid} (dumps: {present:?})")
    })
}

/// The sum over `pids` of the instruction totals in each one's newest dump.
fn totals(d: &Path, proxy: &str, pids: &[u32]) -> Result<u64, String> {
    let mut sum = 0;
    for &pid in pids {
        let path = newest_dump(d, proxy, pid)?;
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path:?}: {e}"))?;
        sum += text
            .lines()
            .find_map(|l| l.strip_prefix("totals: "))
            .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
            .ok_or(format!("{path:?}: no totals line"))?;
    }
    Ok(sum)
}

/// RIVALS_CALLGRIND_KEEP=<dir>: keeps each process's dump of the second batch there, as
/// `callgrind.<proxy>.<workload>.<pid>`, for `callgrind_annotate` (the bench's own directory is
/// removed when it ends). Every function's count in it is over `n2` requests.
fn keep_dumps(d: &Path, proxy: &str, w: &str, pids: &[u32]) -> Result<(), String> {
    let Some(keep) = std::env::var_os("RIVALS_CALLGRIND_KEEP") else {
        return Ok(());
    };
    let keep = PathBuf::from(keep);
    std::fs::create_dir_all(&keep).map_err(|e| format!("{keep:?}: {e}"))?;
    for &pid in pids {
        let from = newest_dump(d, proxy, pid)?;
        let to = keep.join(format!("callgrind.{proxy}.{w}.{pid}"));
        std::fs::copy(&from, &to).map_err(|e| format!("{to:?}: {e}"))?;
    }
    Ok(())
}

/// Sends `n` requests of workload `w` over 4 connections and checks every answer.
fn load(w: &str, port: u16, d: &Path, n: usize) -> Result<(), String> {
    let n_arg = n.to_string();
    let (answered, expected_status) = match w {
        "W1" | "W5b" => {
            let caller = if w == "W1" { "a" } else { "b" };
            let out = output(
                Command::new("oha")
                    .args([
                        "--no-tui",
                        "--output-format",
                        "json",
                        "--insecure",
                        "--ipv4",
                    ])
                    .args(["-n", &n_arg, "-c", "4"])
                    .arg("--cert")
                    .arg(d.join(format!("{caller}.pem")))
                    .arg("--key")
                    .arg(d.join(format!("{caller}.key")))
                    .arg("--connect-to")
                    .arg(format!("a.apps.identity:{port}:127.0.0.1:{port}"))
                    .arg(format!("https://a.apps.identity:{port}/")),
            );
            let v: serde_json::Value =
                serde_json::from_str(&out).map_err(|e| format!("oha output ({e}): {out}"))?;
            let status = if w == "W1" { "200" } else { "403" };
            (
                v["statusCodeDistribution"][status].as_u64().unwrap_or(0) as usize,
                status,
            )
        }
        _ => {
            let mut c = Command::new("h2load");
            if w == "W3h1" {
                c.arg("--h1");
            }
            c.args(["-c", "4", "-n", &n_arg])
                .args(if w == "W3h2" { &["-m", "10"][..] } else { &[] })
                .args(["--header", ":authority: a.apps.plain"])
                .arg(format!("https://127.0.0.1:{port}/"));
            let out = output(&mut c);
            // h2load counts 2xx and 3xx as succeeded; the backend answers 200.
            (parse_h2load(&out) as usize, "2xx")
        }
    };
    if answered != n {
        return Err(format!(
            "{answered} of {n} requests answered {expected_status}"
        ));
    }
    Ok(())
}
