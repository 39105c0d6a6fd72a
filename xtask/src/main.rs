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
    /// Criterion micro-benchmarks of the hot pure functions.
    Bench,
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
            run(cargo().args(["test", "--workspace"]))
        }
        Task::Bench => run(cargo().args(["bench", "-p", "portcullis", "--bench", "micro"])),
    }
}
