//! `cargo xtask`: the project's build, test and setup tasks, so a fresh machine needs nothing but
//! cargo and this repository.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod pgo;
mod vm;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the tests need (Debian packages, rustup components).
    Deps,
    /// Build the eBPF object and the release binary.
    Build,
    /// Build the XDP program (installs rust-src, LLVM 22 and bpf-linker when missing).
    BuildEbpf,
    /// Build the release binary with profile-guided optimisation: an instrumented build serves
    /// a training mix of traffic, then the final build uses its profile
    /// (`target/pgo/<host>/release/portcullis`; installs rustup's llvm-tools).
    BuildPgo,
    /// Everything CI checks: prerequisites, `cargo fmt --check`, clippy -D warnings, all tests.
    Test,
    /// Benchmarks: micro-benchmarks, the registry at 100,000 routes, and (as root) the XDP
    /// per-packet costs, the W5 flood in namespaces, kernel TLS against userspace TLS in VMs
    /// (`vm-bench`) and BENCH.md's workloads against nginx and HAProxy (installed from Debian,
    /// with wrk, h2load and oha), portcullis built by `build-pgo` in the full run.
    Bench {
        /// A short pass for use during development, under 3 minutes once built: one round of
        /// 3 s per workload, 2 s per flood mode, one VM kernel, the rivals against the plain
        /// release build (unless `--pgo`).
        #[arg(long)]
        quick: bool,
        /// With `--quick`: the rivals face the profile-guided build (`build-pgo`, made here), as
        /// in the full run. CI uses it.
        #[arg(long)]
        pgo: bool,
    },
    /// Attach the XDP gate to the interfaces of a config, with its maps written from that config,
    /// pinned under `xdp.pin_path` so it stays in force without a daemon (root). A daemon started
    /// later takes over the same program, maps and links.
    Load {
        #[arg(long)]
        config: std::path::PathBuf,
    },
    /// Detach the gate from a config's interfaces and remove its pinned maps (root).
    Unload {
        #[arg(long)]
        config: std::path::PathBuf,
    },
    /// Run the kernel-specific tests (XDP verifier and packet table, kTLS) in Debian's 6.1
    /// kernel under QEMU software emulation.
    VmTest,
    /// Kernel TLS against userspace TLS: `benches/ktls_cost.rs` in Debian's 6.1 and newest
    /// backports kernels under QEMU with an instruction-counting clock (this machine's kernel
    /// has no kernel TLS).
    VmBench {
        /// One round of fewer requests, in Debian's 6.1 kernel only.
        #[arg(long)]
        quick: bool,
    },
    /// Run every fuzz target for a while (cargo-fuzz on the nightly toolchain).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

/// Fuzz targets under `fuzz/`, each with a seed corpus in `fuzz/corpus/<name>`.
const FUZZ_TARGETS: &[&str] = &[
    "registration",
    "config",
    "certificate",
    "proxy_header",
    "route_service_signature",
    "error_template",
    "request_path",
    "h2_frames",
];
/// Fuzz targets that load the XDP program: root, bpffs and the built object needed.
const PRIVILEGED_FUZZ_TARGETS: &[&str] = &["xdp_twin"];
/// The nightly toolchain for the eBPF target and cargo-fuzz: LLVM 22, to match bpf-linker built
/// against Debian's LLVM 22 (a nightly on LLVM 23 fails with `Invalid record`), and Rust >= 1.98
/// for aya 0.16.
const NIGHTLY: &str = "nightly-2026-06-15";
/// Where the XDP object lands.
pub const EBPF_OBJECT: &str =
    "ebpf/portcullis-ebpf/target/bpfel-unknown-none/release/portcullis-ebpf";

fn nightly() -> Result<()> {
    let listed = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()?;
    if !String::from_utf8_lossy(&listed.stdout).contains(NIGHTLY) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }
    run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "rustfmt",
        "clippy",
        "--toolchain",
        NIGHTLY,
    ]))
}

fn ebpf_deps() -> Result<()> {
    nightly()?;
    if !have("bpf-linker") {
        if !std::path::Path::new("/usr/lib/llvm-22/bin/llvm-config").exists() {
            run(Command::new("apt-get").args(["update", "-q"]))?;
            run(Command::new("apt-get").args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "llvm-22-dev",
            ]))?;
        }
        run(cargo().env("LLVM_PREFIX", "/usr/lib/llvm-22").args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]))?;
    }
    Ok(())
}

/// `cargo +NIGHTLY <verb> …` for the eBPF crate, for the BPF target, with BTF.
fn ebpf_cargo(verb: &str) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir("ebpf/portcullis-ebpf")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .arg(format!("+{NIGHTLY}"))
        .args([
            verb,
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
        ]);
    c
}

fn build_ebpf() -> Result<()> {
    ebpf_deps()?;
    run(&mut ebpf_cargo("build"))
}

/// Privileged tests need bpffs at /sys/fs/bpf.
fn mount_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn fuzz(seconds: u64) -> Result<()> {
    if !cargo()
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let privileged = if is_root() {
        build_ebpf()?;
        mount_bpffs()?;
        PRIVILEGED_FUZZ_TARGETS
    } else {
        eprintln!("not root: skipping {PRIVILEGED_FUZZ_TARGETS:?}");
        &[]
    };
    for target in FUZZ_TARGETS.iter().chain(privileged) {
        // New inputs go to a scratch corpus; the seeds in the repo stay as they are.
        let scratch = std::env::temp_dir().join(format!("portcullis-fuzz-{target}"));
        std::fs::create_dir_all(&scratch)?;
        nightly()?;
        run(Command::new("cargo")
            .env_remove("RUSTUP_TOOLCHAIN")
            .arg(format!("+{NIGHTLY}"))
            .args(["fuzz", "run", target])
            .arg(&scratch)
            .arg(format!("fuzz/corpus/{target}"))
            .args(["--", &format!("-max_total_time={seconds}")]))?;
    }
    remove_fuzz_pins();
    Ok(())
}

/// libFuzzer ends the process without unwinding, so the XDP fuzz target cannot remove the maps
/// it pinned; remove them here so repeated runs do not pile up kernel memory.
fn remove_fuzz_pins() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with("portcullis-fuzz-")
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // `cargo run` gave xtask its own package's variables. Build scripts such as ring's rerun when
    // they differ (`rerun-if-env-changed=CARGO_PKG_NAME`), so builds from here would otherwise
    // redo what a plain `cargo build` did, and the other way round.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || matches!(
                &*key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            c.env_remove(&*key);
        }
    }
    c
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Debian packages the tests use, by the command each provides.
const PACKAGES: &[(&str, &str)] = &[("curl", "curl"), ("nats-server", "nats-server")];

fn deps() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    for component in ["rustfmt", "clippy"] {
        let present = cargo()
            .args([component_cmd(component), "--version"])
            .output()
            .map(|o| o.status.success());
        if !present.unwrap_or(false) {
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    Ok(())
}

/// A config given on the command line, relative to where `cargo xtask` was started.
fn load_config(path: &std::path::Path) -> Result<portcullis::config::Config> {
    let path = match std::env::var_os("PWD") {
        Some(cwd) if path.is_relative() => std::path::PathBuf::from(cwd).join(path),
        _ => path.to_path_buf(),
    };
    portcullis::config::Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))
}

fn bench(quick: bool, profile_guided: bool) -> Result<()> {
    deps()?;
    let tools = [
        ("nginx", "nginx-light"),
        ("haproxy", "haproxy"),
        ("wrk", "wrk"),
        ("h2load", "nghttp2-client"),
        ("valgrind", "valgrind"),
    ];
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    if !have("oha") {
        run(cargo().args(["install", "oha", "--locked"]))?;
    }
    let bench_cmd = |name: &str, args: &[&str]| {
        let mut c = cargo();
        c.args(["bench", "-p", "portcullis", "--bench", name, "--"]);
        c.args(args);
        c
    };
    // The XDP object first: every build below embeds it (the gateway's build script reads it),
    // and one that appeared later would rebuild them inside the timed XDP bench. Building it
    // needs no root; only the benches that attach it do.
    build_ebpf()?;
    if is_root() {
        mount_bpffs()?;
    }
    // Build every bench binary in one cargo run (in parallel) before timing any of them.
    run(cargo().args(["bench", "-p", "portcullis", "--no-run"]))?;
    // The rivals bench's floor (the least proxy the gateway's crates make): in the full run, and
    // in `--quick` when RIVALS_PROXIES names it.
    let floor =
        std::env::var("RIVALS_PROXIES").map_or(!quick, |v| v.split(',').any(|p| p == "floor"));
    if floor {
        run(cargo().args([
            "build",
            "--release",
            "-p",
            "portcullis",
            "--example",
            "floor",
        ]))?;
    }
    // The gateway the rivals face: the full run (and `--quick --pgo`) measures the build an
    // operator should run, the profile-guided one (`build-pgo`, two more release builds);
    // `--quick` alone, for use during development, the release build the line above made.
    // RIVALS_PORTCULLIS_BIN names another.
    let gateway = match std::env::var_os("RIVALS_PORTCULLIS_BIN") {
        Some(bin) => Some(PathBuf::from(bin)),
        None if quick && !profile_guided => None,
        None => Some(std::env::current_dir()?.join(pgo::build()?)),
    };
    // From here on everything is built: what follows is the time the benchmarks themselves take.
    let mut took: Vec<(&str, Duration)> = Vec::new();
    let mut timed = |name: &'static str, f: &mut dyn FnMut() -> Result<()>| {
        let t0 = Instant::now();
        let r = f();
        took.push((name, t0.elapsed()));
        r
    };
    let quick_arg: &[&str] = if quick { &["--quick"] } else { &[] };
    timed("micro", &mut || {
        if quick {
            run(&mut bench_cmd(
                "micro",
                &["--warm-up-time", "0.1", "--measurement-time", "0.3"],
            ))
        } else {
            run(&mut bench_cmd("micro", &[]))?;
            run(&mut bench_cmd("registry_scale", &[]))
        }
    })?;
    if is_root() {
        timed("xdp", &mut || run(&mut bench_cmd("xdp", quick_arg)))?;
        timed("flood", &mut || run(&mut bench_cmd("flood", quick_arg)))?;
        // Kernel TLS against userspace TLS, in VMs whose kernels have it (this one has not).
        timed("vm", &mut || vm::vm_bench(quick))?;
    } else {
        eprintln!("not root: skipping the XDP, flood and kernel-TLS benchmarks");
    }
    timed("rivals", &mut || {
        let mut rivals = bench_cmd("rivals", quick_arg);
        if let Some(bin) = &gateway {
            rivals.env("RIVALS_PORTCULLIS_BIN", bin);
        }
        run(&mut rivals)
    })?;
    let total: Duration = took.iter().map(|(_, d)| *d).sum();
    let parts: Vec<String> = took
        .iter()
        .map(|(name, d)| format!("{name} {:.0} s", d.as_secs_f64()))
        .collect();
    eprintln!(
        "bench{}: the benchmarks took {:.0} s once built ({})",
        if quick { " --quick" } else { "" },
        total.as_secs_f64(),
        parts.join(", ")
    );
    Ok(())
}

/// `apt-get install` (after an index update) of Debian packages.
fn apt_install(packages: &[&str]) -> Result<()> {
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages))
}

fn component_cmd(component: &str) -> &'static str {
    match component {
        "rustfmt" => "fmt",
        _ => "clippy",
    }
}

fn main() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::set_current_dir(&root)?;
    match Cli::parse().task {
        Task::Deps => deps(),
        Task::Build => {
            build_ebpf()?;
            run(cargo().args(["build", "--release", "-p", "portcullis"]))
        }
        Task::BuildEbpf => build_ebpf(),
        Task::BuildPgo => pgo::build().map(|_| ()),
        Task::Test => {
            deps()?;
            build_ebpf()?;
            run(cargo().args(["fmt", "--all", "--check"]))?;
            run(Command::new("cargo")
                .current_dir("ebpf/portcullis-ebpf")
                .env_remove("RUSTUP_TOOLCHAIN")
                .args([&format!("+{NIGHTLY}"), "fmt", "--check"]))?;
            run(cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            run(ebpf_cargo("clippy").args(["--", "-D", "warnings"]))?;
            let mut test = cargo();
            test.args(["test", "--workspace"]);
            if is_root() {
                // The XDP packet table must run, not skip, wherever it can.
                mount_bpffs()?;
                test.env("PORTCULLIS_REQUIRE_XDP", "1");
            }
            run(&mut test)?;
            if is_root() {
                // The XDP program on Debian's 6.1 verifier, and kTLS, which this kernel lacks.
                vm::vm_test()?;
            }
            // A short fuzzing pass on every target: CI shows the decoders do not panic.
            fuzz(30)
        }
        Task::Bench { quick, pgo } => bench(quick, pgo),
        Task::Fuzz { seconds } => fuzz(seconds),
        Task::Load { config } => {
            let config = load_config(&config)?;
            build_ebpf()?;
            mount_bpffs()?;
            let object = std::fs::read(EBPF_OBJECT).context("the XDP object")?;
            for (iface, mode) in portcullis::xdp::load_pinned(&config, &object)? {
                println!(
                    "XDP gate attached to {iface} ({mode}), pinned under {}",
                    config.xdp.pin_path.display()
                );
            }
            Ok(())
        }
        Task::Unload { config } => {
            let config = load_config(&config)?;
            for iface in portcullis::xdp::unload_pinned(&config)? {
                println!("XDP gate detached from {iface}");
            }
            println!(
                "pinned maps under {} removed",
                config.xdp.pin_path.display()
            );
            Ok(())
        }
        Task::VmTest => {
            build_ebpf()?;
            vm::vm_test()
        }
        Task::VmBench { quick } => {
            build_ebpf()?;
            vm::vm_bench(quick)
        }
    }
}
