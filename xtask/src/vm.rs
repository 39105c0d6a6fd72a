//! `cargo xtask vm-test`: runs tests inside Debian's 6.1 kernel under QEMU software emulation.
//!
//! The machines this project is built on run a newer kernel without kernel TLS; gateway VMs often
//! run Debian's stable kernel. The VM checks what only a different kernel can show: that the XDP
//! program passes the 6.1 verifier and classifies the packet table the same way, and that kTLS
//! really moves record encryption into the kernel (`/proc/net/tls_stat`).
//!
//! Recipe (../shared/TOOLCHAIN.md): the kernel package is downloaded with `apt-get download` and
//! unpacked; the initramfs holds busybox, the crypto and TLS modules, the XDP object and the test
//! binaries built statically; `/init` runs each test and prints a result marker the host checks.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{apt_install, cargo, have, run, EBPF_OBJECT};

/// One test binary run in the VM: `cargo test --test <target>` and the arguments for it.
struct VmTest {
    target: &'static str,
    args: &'static [&'static str],
}

const TESTS: &[VmTest] = &[
    VmTest {
        target: "xdp",
        args: &["--exact", "packet_table", "--test-threads=1"],
    },
    VmTest {
        target: "ktls",
        args: &["--test-threads=1", "--nocapture"],
    },
];

/// Kernel module directories the VM needs: `tls` and the AEAD code it loads on demand (`gcm`,
/// `ccm`, `chacha20poly1305` and their helpers). `tls.ko` alone fails with ENOENT at key setup.
const MODULE_DIRS: &[&str] = &["crypto", "arch/x86/crypto", "lib", "net/tls"];

/// The whole VM run may take this long (boot under TCG is ~5 s; the tests a few minutes at most).
const VM_TIMEOUT: Duration = Duration::from_secs(900);

pub fn vm_test() -> Result<()> {
    let work = PathBuf::from("target/vm");
    std::fs::create_dir_all(&work)?;
    for (cmd, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("cpio", "cpio"),
    ] {
        if !have(cmd) {
            apt_install(&[pkg])?;
        }
    }
    let (kernel, modules, version) = kernel(&work)?;
    let binaries = static_tests(&work)?;
    let initramfs = initramfs(&work, &modules, &version, &binaries)?;
    boot(&kernel, &initramfs)
}

/// Downloads and unpacks the kernel `linux-image-amd64` points at; returns the vmlinuz, the
/// module tree and the version string.
fn kernel(work: &Path) -> Result<(PathBuf, PathBuf, String)> {
    let depends = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()
        .context("apt-cache")?;
    let mut package = parse_kernel_package(&String::from_utf8_lossy(&depends.stdout));
    if package.is_none() {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        let depends = Command::new("apt-cache")
            .args(["depends", "linux-image-amd64"])
            .output()?;
        package = parse_kernel_package(&String::from_utf8_lossy(&depends.stdout));
    }
    let package = package.context("apt-cache: linux-image-amd64 depends on no kernel image")?;
    let version = package
        .strip_prefix("linux-image-")
        .context("kernel package name")?
        .to_string();
    let unpacked = work.join(&package);
    let vmlinuz = unpacked.join(format!("boot/vmlinuz-{version}"));
    if !vmlinuz.exists() {
        let debs = work.join("debs");
        std::fs::create_dir_all(&debs)?;
        run(Command::new("apt-get")
            .current_dir(&debs)
            .args(["download", &package]))?;
        let deb = std::fs::read_dir(&debs)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
            .context("downloaded kernel package not found")?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    }
    let modules = unpacked.join(format!("lib/modules/{version}"));
    Ok((vmlinuz, modules, version))
}

fn parse_kernel_package(apt_cache: &str) -> Option<String> {
    apt_cache.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends: ")?;
        dep.starts_with("linux-image-").then(|| dep.to_string())
    })
}

/// Builds the VM's test binaries statically (glibc, `+crt-static`) in their own target dir, so
/// the host build's artefacts are not rebuilt with other flags.
fn static_tests(work: &Path) -> Result<Vec<(&'static VmTest, PathBuf)>> {
    let target_dir = std::env::current_dir()?.join(work).join("build");
    let mut cmd = cargo();
    cmd.env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .args([
            "test",
            "-p",
            "portcullis",
            "--no-run",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--message-format=json-render-diagnostics",
        ]);
    for t in TESTS {
        cmd.args(["--test", t.target]);
    }
    eprintln!("+ {cmd:?}");
    let out = cmd.stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("building the VM test binaries failed");
    }
    let json = String::from_utf8_lossy(&out.stdout);
    TESTS
        .iter()
        .map(|t| {
            let exe = json
                .lines()
                .filter(|l| {
                    l.contains("\"reason\":\"compiler-artifact\"")
                        && l.contains(&format!("\"name\":\"{}\"", t.target))
                        && l.contains("\"kind\":[\"test\"]")
                })
                .find_map(|l| {
                    let rest = &l[l.find("\"executable\":\"")? + 14..];
                    Some(PathBuf::from(&rest[..rest.find('"')?]))
                })
                .with_context(|| format!("no executable for test target {}", t.target))?;
            Ok((t, exe))
        })
        .collect()
}

fn initramfs(
    work: &Path,
    modules: &Path,
    version: &str,
    binaries: &[(&'static VmTest, PathBuf)],
) -> Result<PathBuf> {
    let root = work.join("root");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "proc", "sys", "dev", "tmp", "tests"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let busybox = Command::new("sh")
        .args(["-c", "command -v busybox"])
        .output()?;
    let busybox = String::from_utf8_lossy(&busybox.stdout).trim().to_string();
    std::fs::copy(&busybox, root.join("bin/busybox")).context("copy busybox")?;
    let kmod = root.join(format!("lib/modules/{version}"));
    for dir in MODULE_DIRS {
        let to = kmod.join("kernel").join(dir);
        std::fs::create_dir_all(to.parent().unwrap())?;
        run(Command::new("cp")
            .arg("-a")
            .arg(modules.join("kernel").join(dir))
            .arg(&to))?;
    }
    for f in ["modules.order", "modules.builtin"] {
        let _ = std::fs::copy(modules.join(f), kmod.join(f));
    }
    run(Command::new("busybox")
        .args(["depmod", "-b"])
        .arg(&root)
        .arg(version))?;
    std::fs::copy(EBPF_OBJECT, root.join("portcullis-ebpf.o"))
        .context("the XDP object (cargo xtask build-ebpf)")?;
    let mut script = String::from(INIT_HEAD);
    for (t, exe) in binaries {
        std::fs::copy(exe, root.join("tests").join(t.target))?;
        script.push_str(&format!(
            "echo \"VMTEST-START {name}\"\n/tests/{name} {args}\necho \"VMTEST-RESULT {name} rc=$?\"\n",
            name = t.target,
            args = t.args.join(" "),
        ));
    }
    script.push_str("poweroff -f\n");
    let init = root.join("init");
    std::fs::write(&init, script)?;
    run(Command::new("chmod").arg("755").arg(&init))?;
    let out = std::env::current_dir()?
        .join(work)
        .join("initramfs.cpio.gz");
    run(Command::new("sh")
        .current_dir(&root)
        .args(["-c", "find . | cpio -o -H newc --quiet | gzip -1 > \"$0\""])
        .arg(&out))?;
    Ok(out)
}

const INIT_HEAD: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t bpf bpf /sys/fs/bpf
echo /bin/modprobe > /proc/sys/kernel/modprobe
modprobe tls || echo "VMTEST-NOTE modprobe tls failed"
ip link set lo up
export PORTCULLIS_REQUIRE_XDP=1 PORTCULLIS_REQUIRE_KTLS=1 PORTCULLIS_XDP_OBJECT=/portcullis-ebpf.o
export TMPDIR=/tmp RUST_BACKTRACE=1
echo "VMTEST-KERNEL $(uname -r)"
"#;

/// Boots the VM, echoes its console, and checks that every test reported rc=0.
fn boot(kernel: &Path, initramfs: &Path) -> Result<()> {
    let mut cmd = Command::new("qemu-system-x86_64");
    // /dev/kvm may exist and still not work (nested virtualisation): always emulate.
    cmd.args([
        "-machine",
        "q35,accel=tcg",
        "-cpu",
        "max",
        "-m",
        "1536",
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
        "-kernel",
    ])
    .arg(kernel)
    .arg("-initrd")
    .arg(initramfs)
    .args(["-append", "console=ttyS0 quiet panic=-1"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    eprintln!("+ {cmd:?}");
    let started = Instant::now();
    let mut child = cmd.spawn().context("qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut console = Vec::new();
        for line in std::io::BufReader::new(stdout)
            .split(b'\n')
            .map_while(Result::ok)
        {
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            println!("vm| {line}");
            console.push(line);
        }
        console
    });
    loop {
        if let Some(status) = child.try_wait()? {
            eprintln!("qemu exited with {status} after {:?}", started.elapsed());
            break;
        }
        if started.elapsed() > VM_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the VM did not finish within {VM_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let console = reader
        .join()
        .map_err(|_| anyhow::anyhow!("console reader"))?;
    let mut failed = Vec::new();
    for t in TESTS {
        let marker = format!("VMTEST-RESULT {} rc=", t.target);
        match console.iter().find_map(|l| l.split_once(&marker)) {
            Some((_, "0")) => eprintln!("VM test {}: passed", t.target),
            Some((_, rc)) => failed.push(format!("{} (rc={rc})", t.target)),
            None => failed.push(format!("{} (no result)", t.target)),
        }
    }
    if !failed.is_empty() {
        bail!("VM tests failed: {}", failed.join(", "));
    }
    Ok(())
}
