//! `cargo xtask`: the project's build, test and setup tasks, so a fresh machine needs nothing but
//! cargo and this repository.

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

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
    /// Build the release binary.
    Build,
    /// Everything CI checks: prerequisites, `cargo fmt --check`, clippy -D warnings, all tests.
    Test,
    /// Benchmarks: criterion micro-benchmarks and the registry at 100,000 routes.
    Bench,
    /// Run every fuzz target for a while (cargo-fuzz on the nightly toolchain).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

/// Fuzz targets under `fuzz/`, each with a seed corpus in `fuzz/corpus/<name>`.
const FUZZ_TARGETS: &[&str] = &["registration"];
/// The nightly toolchain cargo-fuzz builds with.
const NIGHTLY: &str = "nightly";

fn fuzz(seconds: u64) -> Result<()> {
    if !cargo()
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    for target in FUZZ_TARGETS {
        // New inputs go to a scratch corpus; the seeds in the repo stay as they are.
        let scratch = std::env::temp_dir().join(format!("portcullis-fuzz-{target}"));
        std::fs::create_dir_all(&scratch)?;
        run(Command::new("cargo")
            .arg(format!("+{NIGHTLY}"))
            .args(["fuzz", "run", target])
            .arg(&scratch)
            .arg(format!("fuzz/corpus/{target}"))
            .args(["--", &format!("-max_total_time={seconds}")]))?;
    }
    Ok(())
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
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
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
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))?;
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
        Task::Build => run(cargo().args(["build", "--release", "-p", "portcullis"])),
        Task::Test => {
            deps()?;
            run(cargo().args(["fmt", "--all", "--check"]))?;
            run(cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            run(cargo().args(["test", "--workspace"]))?;
            // A short fuzzing pass on every target: CI shows the decoders do not panic.
            fuzz(30)
        }
        Task::Bench => {
            deps()?;
            run(cargo().args(["bench", "-p", "portcullis", "--bench", "micro"]))?;
            run(cargo().args(["bench", "-p", "portcullis", "--bench", "registry_scale"]))
        }
        Task::Fuzz { seconds } => fuzz(seconds),
    }
}
