//! `cargo xtask vm-test`: runs tests inside Debian kernels under QEMU software emulation.
//!
//! The machines this project is built on run a newer kernel without kernel TLS; gateway VMs often
//! run Debian's stable kernel. The VMs check what only a different kernel can show: that the XDP
//! program passes the 6.1 verifier and classifies the packet table the same way, that kTLS
//! really moves record encryption into the kernel (`/proc/net/tls_stat`), and, on the newest
//! Debian kernel (backports, Linux ≥ 6.14), that kernel TLS connections follow TLS 1.3 KeyUpdates;
//! without the CPU's AES module, that `tls.ktls: auto` leaves the kernel's slow AES-GCM alone.
//! And, since systemd is not PID 1 on these machines, that `dist/portcullis.service` works as
//! systemd runs it.
//!
//! Recipe (../shared/TOOLCHAIN.md): the kernel packages are downloaded from the Debian archive and
//! unpacked; the initramfs holds busybox, the crypto and TLS modules, the XDP object and the test
//! binaries built statically; `/init` runs each test and prints a result marker the host checks.
//! For systemd, `/init` instead mounts this machine's root (QEMU's 9p, read-only) under an overlay
//! kept in memory and hands over to its systemd, which runs the test as a unit.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{apt_install, cargo, have, run, EBPF_OBJECT};

/// One test run in the VM: the binary of `cargo test --test <target>` with `args`, reported
/// under `name`.
struct VmTest {
    name: &'static str,
    target: &'static str,
    args: &'static [&'static str],
}

/// The packet tables on Debian 6.1's verifier (printing how many instructions it processed).
const XDP_TABLE: VmTest = VmTest {
    name: "xdp",
    target: "xdp",
    args: &[
        "--exact",
        "packet_table",
        "balancers_clients_are_judged_by_the_client_their_header_names",
        "--test-threads=1",
        "--nocapture",
    ],
};
const KTLS: VmTest = VmTest {
    name: "ktls",
    target: "ktls",
    args: &["--test-threads=1", "--nocapture"],
};
/// `tls.ktls: auto` on a kernel whose AES-GCM is not the CPU's (booted without `aesni_intel`).
const KTLS_SLOW_AES: VmTest = VmTest {
    name: "ktls-slow-aes",
    target: "ktls",
    args: &[
        "--exact",
        "auto_keeps_userspace_tls_where_the_kernels_aes_is_slow",
        "--nocapture",
    ],
};
/// dist/portcullis.service started, reloaded, restarted and stopped by systemd itself.
const SYSTEMD_UNIT: VmTest = VmTest {
    name: "systemd",
    target: "xdp",
    args: &[
        "--exact",
        "the_systemd_unit_runs_the_gateway",
        "--test-threads=1",
        "--nocapture",
    ],
};

/// `benches/ktls_cost.rs`: the gateway's instructions per request and per MiB with kernel TLS
/// and with userspace TLS (run by `cargo xtask vm-bench` under an instruction-counting clock), in
/// full or with `--quick`.
const fn ktls_cost(quick: bool) -> VmTest {
    VmTest {
        name: "ktls_cost",
        target: "ktls_cost",
        args: if quick { &["--quick"] } else { &[] },
    }
}

impl VmTest {
    /// The shell lines that run `exe` (this test's binary) and report its result on the console.
    fn script_lines(&self, exe: &str) -> String {
        format!(
            "echo \"VMTEST-START {name}\"\n{exe} {args}\necho \"VMTEST-RESULT {name} rc=$?\"\n",
            name = self.name,
            args = self.args.join(" "),
        )
    }
}

/// What the VM runs as PID 1.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Init {
    /// busybox from the initramfs, which runs the tests itself.
    Busybox,
    /// systemd from a copy-on-write view of this machine's root (9p, read-only, under an
    /// overlay kept in memory), which runs the tests as a unit: the machine's own userland, so
    /// the binaries need not be static and systemd is Debian's.
    Systemd,
}

/// The VM's clock.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Clock {
    /// Two vCPUs on QEMU's own clock: the tests.
    Real,
    /// One vCPU whose clock advances by one nanosecond per instruction executed (`-icount
    /// shift=0,sleep=off`), so the CPU time the guest kernel accounts is an instruction count:
    /// the benchmarks. Idle time is skipped, not counted.
    Instructions,
}

/// A kernel to boot and the tests to run on it.
struct VmKernel {
    /// `None`: the `linux-image-amd64` of this machine's Debian release (through apt); else the
    /// Debian suite whose `linux-image-amd64` to fetch from the archive.
    suite: Option<&'static str>,
    /// The oldest kernel that shows what this VM is for.
    min_version: (u32, u32),
    init: Init,
    /// Whether /init loads the CPU's AES module (`aesni_intel`), as udev does on a gateway whose
    /// CPU has AES-NI; without it the kernel's AES-GCM is its slow C code.
    cpu_aes: bool,
    tests: &'static [VmTest],
}

const KERNELS: &[VmKernel] = &[
    // Debian 12's 6.1: the verifier gateway VMs run, and kTLS without KeyUpdate support.
    VmKernel {
        suite: None,
        min_version: (6, 1),
        init: Init::Busybox,
        cpu_aes: true,
        tests: &[XDP_TABLE, KTLS],
    },
    // The same kernel booting systemd, which runs the gateway from its unit file.
    VmKernel {
        suite: None,
        min_version: (6, 1),
        init: Init::Systemd,
        cpu_aes: true,
        tests: &[SYSTEMD_UNIT],
    },
    // Debian 13 backports: a kernel that replaces kTLS keys (KeyUpdate, Linux ≥ 6.14).
    VmKernel {
        suite: Some("trixie-backports"),
        min_version: (6, 14),
        init: Init::Busybox,
        cpu_aes: true,
        tests: &[KTLS],
    },
    // 6.1 without `aesni_intel`: `tls.ktls: auto` stays in userspace.
    VmKernel {
        suite: None,
        min_version: (6, 1),
        init: Init::Busybox,
        cpu_aes: false,
        tests: &[KTLS_SLOW_AES],
    },
];

/// Where kernels outside this machine's apt sources come from.
const ARCHIVE: &str = "http://deb.debian.org/debian";

/// Kernel module directories and files the VM needs: `tls` and the AEAD code it loads on demand
/// (`gcm`, `ccm`, `chacha20poly1305` and their helpers; `tls.ko` alone fails with ENOENT at key
/// setup); for systemd's root, virtio, 9p and overlayfs (which /init loads) and `veth` for the
/// systemd test's network namespaces (copied into that root, where the kernel loads it and the
/// TLS modules on demand with the machine's own `modprobe`). Paths a kernel does not have are
/// skipped.
const MODULE_DIRS: &[&str] = &[
    "crypto",
    "arch/x86/crypto",
    "lib",
    "net/tls",
    "drivers/virtio",
    "net/9p",
    "fs/9p",
    "fs/netfs",
    "fs/fscache",
    "fs/overlayfs",
    "drivers/net/veth.ko",
];

/// The whole VM run may take this long (boot under TCG is ~5 s; the tests a few minutes at most).
const VM_TIMEOUT: Duration = Duration::from_secs(900);

/// What every boot needs on this machine: QEMU, busybox for the initramfs, and the tools that
/// fetch and unpack kernels.
fn vm_tools() -> Result<()> {
    for (cmd, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("cpio", "cpio"),
        ("xz", "xz-utils"),
        ("curl", "curl"),
    ] {
        if !have(cmd) {
            apt_install(&[pkg])?;
        }
    }
    Ok(())
}

pub fn vm_test() -> Result<()> {
    let work = PathBuf::from("target/vm");
    std::fs::create_dir_all(&work)?;
    vm_tools()?;
    // The systemd VM's userland is this machine's: its systemd, and the modprobe the kernel
    // loads modules with.
    if KERNELS.iter().any(|k| k.init == Init::Systemd) {
        if !Path::new("/lib/systemd/systemd").exists() {
            apt_install(&["systemd"])?;
        }
        if !have("modprobe") {
            apt_install(&["kmod"])?;
        }
        // The unit's test rotates the access log with dist/portcullis.logrotate.
        if !have("logrotate") {
            apt_install(&["logrotate"])?;
        }
    }
    let binaries = build_for_vm(&work, "test", &["xdp", "ktls"], Link::Static)?;
    // PORTCULLIS_VM_ONLY=<test name>: only the boots that run that test (for development).
    let only = std::env::var("PORTCULLIS_VM_ONLY").ok();
    for k in KERNELS {
        if only
            .as_deref()
            .is_some_and(|o| !k.tests.iter().any(|t| t.name == o))
        {
            continue;
        }
        let (kernel, modules, version) = match k.suite {
            None => stable_kernel(&work)?,
            Some(suite) => archive_kernel(&work, suite)?,
        };
        eprintln!("VM: Linux {version}");
        // The kTLS test adapts to the kernel it finds; an older kernel here would pass without
        // showing what this VM is for.
        if kernel_version(&version).is_none_or(|v| v < k.min_version) {
            bail!(
                "Linux {version} from {} is older than {}.{}",
                k.suite.unwrap_or("apt"),
                k.min_version.0,
                k.min_version.1
            );
        }
        let tests: Vec<_> = k
            .tests
            .iter()
            .map(|t| {
                let exe = binaries.iter().find(|(target, _)| *target == t.target);
                (t, exe.expect("every VM test's target is built").1.as_path())
            })
            .collect();
        let initramfs = initramfs(&work, &modules, &version, &tests, k.init, k.cpu_aes)?;
        boot(&kernel, &initramfs, &tests, k.init, Clock::Real)
            .with_context(|| format!("on Linux {version} ({:?} as PID 1)", k.init))?;
    }
    Ok(())
}

/// `cargo xtask vm-bench`: `benches/ktls_cost.rs` (the release build) in Debian's 6.1 and
/// (unless `quick`) in the newest backports kernel, each booted with an instruction-counting
/// clock ([`Clock::Instructions`]); its tables are printed with the console.
pub fn vm_bench(quick: bool) -> Result<()> {
    let work = PathBuf::from("target/vm");
    std::fs::create_dir_all(&work)?;
    vm_tools()?;
    let binaries = build_for_vm(&work, "bench", &["ktls_cost"], Link::Dynamic)?;
    let bench = ktls_cost(quick);
    let tests = [(&bench, binaries[0].1.as_path())];
    // `--quick` boots Debian's stable kernel only (each boot under software emulation is about
    // 10 s before the bench starts).
    let suites: &[Option<&str>] = if quick {
        &[None]
    } else {
        &[None, Some("trixie-backports")]
    };
    for &suite in suites {
        let (kernel, modules, version) = match suite {
            None => stable_kernel(&work)?,
            Some(suite) => archive_kernel(&work, suite)?,
        };
        eprintln!("VM: Linux {version}, one vCPU, one nanosecond per instruction");
        let initramfs = initramfs(&work, &modules, &version, &tests, Init::Busybox, true)?;
        boot(
            &kernel,
            &initramfs,
            &tests,
            Init::Busybox,
            Clock::Instructions,
        )
        .with_context(|| format!("ktls_cost on Linux {version}"))?;
    }
    Ok(())
}

/// Downloads and unpacks the kernel `linux-image-amd64` points at; returns the vmlinuz, the
/// module tree and the version string.
fn stable_kernel(work: &Path) -> Result<(PathBuf, PathBuf, String)> {
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
    if find_kernel(&unpacked, &version).is_err() {
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
    let (vmlinuz, modules) = find_kernel(&unpacked, &version)?;
    Ok((vmlinuz, modules, version))
}

/// Downloads and unpacks the kernel `linux-image-amd64` points at in `suite` of the Debian
/// archive, reading the suite's package index directly (it need not be in apt's sources).
fn archive_kernel(work: &Path, suite: &str) -> Result<(PathBuf, PathBuf, String)> {
    let dir = work.join(suite);
    std::fs::create_dir_all(&dir)?;
    let index = dir.join("Packages");
    let url = format!("{ARCHIVE}/dists/{suite}/main/binary-amd64/Packages.xz");
    run(Command::new("sh").args([
        "-c",
        "curl -fsS --retry 3 -m 300 \"$0\" | xz -d > \"$1\"",
        &url,
        &index.to_string_lossy(),
    ]))
    .with_context(|| format!("fetching {url}"))?;
    let packages = Packages(std::fs::read_to_string(&index)?);
    let image = packages
        .depends("linux-image-amd64")
        .into_iter()
        .find(|d| d.starts_with("linux-image-"))
        .with_context(|| format!("{suite}: linux-image-amd64 depends on no kernel image"))?;
    let version = image["linux-image-".len()..].to_string();
    let unpacked = dir.join(&image);
    if find_kernel(&unpacked, &version).is_err() {
        // Newer kernels split the image into `linux-binary-*` and `linux-modules-*`.
        let mut wanted = vec![image.clone()];
        wanted.extend(
            packages
                .depends(&image)
                .into_iter()
                .filter(|d| d.ends_with(&version) && !d.starts_with("linux-base")),
        );
        for package in &wanted {
            let file = packages
                .field(package, "Filename")
                .with_context(|| format!("{suite}: no Filename for {package}"))?;
            let deb = dir.join(format!("{package}.deb"));
            run(Command::new("curl")
                .args(["-fsS", "--retry", "3", "-m", "600", "-o"])
                .arg(&deb)
                .arg(format!("{ARCHIVE}/{file}")))?;
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
            std::fs::remove_file(&deb)?;
        }
    }
    let (vmlinuz, modules) = find_kernel(&unpacked, &version)?;
    Ok((vmlinuz, modules, version))
}

/// (major, minor) of a Debian kernel version such as `6.1.0-56-amd64` or `7.3.4+deb13-amd64`.
fn kernel_version(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// A Debian `Packages` index.
struct Packages(String);

impl Packages {
    fn field(&self, package: &str, field: &str) -> Option<String> {
        let stanza = self
            .0
            .split("\n\n")
            .find(|s| s.lines().next() == Some(&format!("Package: {package}")))?;
        stanza.lines().find_map(|l| {
            l.strip_prefix(field)
                .and_then(|r| r.strip_prefix(": "))
                .map(str::to_string)
        })
    }

    /// The package names in `Depends` (alternatives and version constraints dropped).
    fn depends(&self, package: &str) -> Vec<String> {
        self.field(package, "Depends")
            .unwrap_or_default()
            .split(',')
            .filter_map(|d| d.split('|').next()?.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }
}

/// The vmlinuz and module tree of an unpacked kernel: `boot/` and `lib/modules/` in older
/// packages, both under `usr/lib/modules/<version>/` in newer ones.
fn find_kernel(unpacked: &Path, version: &str) -> Result<(PathBuf, PathBuf)> {
    for (vmlinuz, modules) in [
        (
            format!("boot/vmlinuz-{version}"),
            format!("lib/modules/{version}"),
        ),
        (
            format!("usr/lib/modules/{version}/vmlinuz"),
            format!("usr/lib/modules/{version}"),
        ),
    ] {
        let (vmlinuz, modules) = (unpacked.join(vmlinuz), unpacked.join(modules));
        if vmlinuz.exists() && modules.join("kernel").exists() {
            return Ok((vmlinuz, modules));
        }
    }
    bail!(
        "no vmlinuz and modules for {version} in {}",
        unpacked.display()
    )
}

fn parse_kernel_package(apt_cache: &str) -> Option<String> {
    apt_cache.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends: ")?;
        dep.starts_with("linux-image-").then(|| dep.to_string())
    })
}

/// Builds the VM's test binaries statically (glibc, `+crt-static`) in their own target dir, so
/// the host build's artefacts are not rebuilt with other flags.
/// How a binary for the VM is linked.
#[derive(Clone, Copy, PartialEq)]
enum Link {
    /// Static, in a target directory of its own (the tests: debug builds, quick to make).
    Static,
    /// As `cargo bench` builds it in the usual target directory, so `cargo xtask bench` pays
    /// no second release build; the initramfs gets the shared libraries it needs.
    Dynamic,
}

/// Builds `targets` of `kind` (`test` or `bench`, in its profile) for the VM; returns each
/// target's executable.
fn build_for_vm(
    work: &Path,
    kind: &str,
    targets: &[&'static str],
    link: Link,
) -> Result<Vec<(&'static str, PathBuf)>> {
    let mut cmd = cargo();
    cmd.args([
        kind,
        "-p",
        "portcullis",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    if link == Link::Static {
        let target_dir = std::env::current_dir()?.join(work).join("build");
        cmd.env("CARGO_TARGET_DIR", &target_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env("CARGO_PROFILE_DEV_DEBUG", "0")
            .args(["--target", "x86_64-unknown-linux-gnu"]);
    }
    for t in targets {
        cmd.args([format!("--{kind}").as_str(), t]);
    }
    eprintln!("+ {cmd:?}");
    let out = cmd.stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("building the VM's {kind} binaries failed");
    }
    let json = String::from_utf8_lossy(&out.stdout);
    targets
        .iter()
        .map(|&t| {
            let exe = json
                .lines()
                .filter(|l| {
                    l.contains("\"reason\":\"compiler-artifact\"")
                        && l.contains(&format!("\"name\":\"{t}\""))
                        && l.contains(&format!("\"kind\":[\"{kind}\"]"))
                })
                .find_map(|l| {
                    let rest = &l[l.find("\"executable\":\"")? + 14..];
                    Some(PathBuf::from(&rest[..rest.find('"')?]))
                })
                .with_context(|| format!("no executable for {kind} target {t}"))?;
            Ok((t, exe))
        })
        .collect()
}

fn initramfs(
    work: &Path,
    modules: &Path,
    version: &str,
    tests: &[(&VmTest, &Path)],
    init: Init,
    cpu_aes: bool,
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
        let from = modules.join("kernel").join(dir);
        if !from.exists() {
            continue;
        }
        let to = kmod.join("kernel").join(dir);
        std::fs::create_dir_all(to.parent().unwrap())?;
        run(Command::new("cp").arg("-a").arg(from).arg(&to))?;
    }
    for f in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        let _ = std::fs::copy(modules.join(f), kmod.join(f));
    }
    // Newer Debian kernels ship xz-compressed modules, which busybox' modprobe cannot load.
    run(Command::new("find")
        .arg(&kmod)
        .args(["-name", "*.ko.xz", "-exec", "xz", "-d", "{}", "+"]))?;
    run(Command::new("busybox")
        .args(["depmod", "-b"])
        .arg(&root)
        .arg(version))?;
    std::fs::copy(EBPF_OBJECT, root.join("portcullis-ebpf.o"))
        .context("the XDP object (cargo xtask build-ebpf)")?;
    let script = match init {
        Init::Busybox => {
            let mut script = String::from(INIT_HEAD);
            script.push_str(if cpu_aes {
                CPU_AES
            } else {
                "export PORTCULLIS_EXPECT_SLOW_AES=1\n"
            });
            for (t, exe) in tests {
                std::fs::copy(exe, root.join("tests").join(t.name))?;
                copy_libraries(exe, &root)?;
                script.push_str(&t.script_lines(&format!("/tests/{}", t.name)));
            }
            script.push_str("poweroff -f\n");
            script
        }
        Init::Systemd => systemd_init(tests, cpu_aes)?,
    };
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

/// Copies the shared libraries `exe` loads (as `ldd` lists them, the loader included) into
/// `root` at the same paths; nothing for a static executable.
fn copy_libraries(exe: &Path, root: &Path) -> Result<()> {
    let out = Command::new("ldd").arg(exe).output().context("ldd")?;
    for lib in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let to = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap())?;
        std::fs::copy(lib, &to).with_context(|| format!("copy {lib}"))?;
    }
    Ok(())
}

/// What udev loads on a gateway whose CPU has AES-NI: without it the kernel's gcm(aes) is its C
/// code, several times the instructions per byte (docs/benchmarks.md).
const CPU_AES: &str =
    "modprobe aesni_intel 2>/dev/null; modprobe ghash_clmulni_intel 2>/dev/null\n";

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

/// The /init that mounts this machine's root (shared by QEMU over 9p, read-only) under an
/// overlay kept in memory, installs a unit that runs `tests` and powers the VM off, and hands
/// over to systemd. Paths are this machine's, so the tests run from where cargo built them.
fn systemd_init(tests: &[(&VmTest, &Path)], cpu_aes: bool) -> Result<String> {
    let mut script = String::new();
    for (t, exe) in tests {
        script.push_str(&t.script_lines(&std::fs::canonicalize(exe)?.to_string_lossy()));
    }
    let checkout = std::env::current_dir()?;
    Ok(SYSTEMD_INIT
        .replace("@RUN@", &script)
        // This systemd runs only the test's target, so udev has not loaded the CPU's modules.
        .replace("@CPU_AES@", if cpu_aes { CPU_AES } else { "" })
        .replace("@CHECKOUT@", &checkout.to_string_lossy()))
}

const SYSTEMD_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "VMTEST-KERNEL $(uname -r)"
for m in virtio_pci 9pnet_virtio 9p overlay; do
    modprobe $m || echo "VMTEST-NOTE modprobe $m failed"
done
mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /lower
mount -t tmpfs -o size=2G,mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot
# Not a container (systemd would take its settings from argv instead of the kernel command
# line), and temporary folders of its own rather than this machine's.
rm -f /newroot/.dockerenv /newroot/run/.containerenv
mount -t tmpfs -o mode=1777 tmp /newroot/tmp
mount -t tmpfs -o mode=1777 vartmp /newroot/var/tmp
# The checkout, wherever it is (a CI clone may live under /tmp), for the tests and what they use.
mkdir -p "/newroot@CHECKOUT@"
mount --bind "/lower@CHECKOUT@" "/newroot@CHECKOUT@"
mkdir -p /newroot/etc/systemd/system /newroot/usr/local/sbin /newroot/lib/modules
# The kernel loads the rest on demand (veth, tls and its ciphers) with the machine's own kmod.
cp -a /lib/modules/$(uname -r) /newroot/lib/modules/
cat > /newroot/usr/local/sbin/portcullis-vmtest <<'VMTEST'
#!/bin/sh
export PORTCULLIS_REQUIRE_SYSTEMD=1 RUST_BACKTRACE=1 TMPDIR=/tmp
depmod -a
@CPU_AES@
@RUN@
systemctl poweroff --force --force
VMTEST
chmod 755 /newroot/usr/local/sbin/portcullis-vmtest
cat > /newroot/etc/systemd/system/portcullis-vmtest.service <<'UNIT'
[Unit]
Description=portcullis VM test
[Service]
Type=oneshot
TimeoutStartSec=infinity
ExecStart=/usr/local/sbin/portcullis-vmtest
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
UNIT
cat > /newroot/etc/systemd/system/portcullis-vmtest.target <<'UNIT'
[Unit]
Description=portcullis VM test
Requires=portcullis-vmtest.service
After=portcullis-vmtest.service
AllowIsolate=yes
UNIT
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /lib/systemd/systemd
echo "VMTEST-NOTE switch_root failed"
poweroff -f
"#;

/// Boots the VM, echoes its console, and checks that every test reported rc=0.
fn boot(
    kernel: &Path,
    initramfs: &Path,
    tests: &[(&VmTest, &Path)],
    init: Init,
    clock: Clock,
) -> Result<()> {
    // Under software emulation a kernel can die while it boots (seen once with 7.3: an int3 oops
    // in early text patching, before /init ran). Such a boot ran no test; it is retried, at most
    // twice. A test that ran and failed is never retried.
    let mut console = boot_once(kernel, initramfs, init, clock)?;
    for _ in 0..2 {
        if console.iter().any(|l| l.contains("VMTEST-KERNEL")) {
            break;
        }
        eprintln!("the VM kernel died before /init ran; booting it again");
        console = boot_once(kernel, initramfs, init, clock)?;
    }
    let mut failed = Vec::new();
    for (t, _) in tests {
        let marker = format!("VMTEST-RESULT {} rc=", t.name);
        match console.iter().find_map(|l| l.split_once(&marker)) {
            Some((_, "0")) => eprintln!("VM test {}: passed", t.name),
            Some((_, rc)) => failed.push(format!("{} (rc={rc})", t.name)),
            None => failed.push(format!("{} (no result)", t.name)),
        }
    }
    if !failed.is_empty() {
        bail!("VM tests failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Boots the VM once and returns its console.
fn boot_once(kernel: &Path, initramfs: &Path, init: Init, clock: Clock) -> Result<Vec<String>> {
    let mut cmd = Command::new("qemu-system-x86_64");
    // /dev/kvm may exist and still not work (nested virtualisation): always emulate.
    cmd.args(["-machine", "q35,accel=tcg", "-cpu", "max", "-m", "1536"]);
    match clock {
        Clock::Real => cmd.args(["-smp", "2"]),
        Clock::Instructions => cmd.args(["-smp", "1", "-icount", "shift=0,sleep=off"]),
    };
    cmd.args(["-nographic", "-no-reboot", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs);
    match init {
        Init::Busybox => cmd.args(["-append", "console=ttyS0 quiet panic=-1"]),
        Init::Systemd => cmd.args([
            "-nic",
            "none",
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap",
            "-append",
            "console=ttyS0 quiet panic=-1 systemd.unit=portcullis-vmtest.target \
             systemd.show_status=false",
        ]),
    }
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
    reader.join().map_err(|_| anyhow::anyhow!("console reader"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.1.0-56-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("7.3.4+deb13-amd64"), Some((7, 3)));
        assert_eq!(kernel_version("6.14-amd64"), Some((6, 14)));
        assert!(kernel_version("6.14-amd64").unwrap() >= (6, 14));
        assert!(kernel_version("6.12.95+deb12-amd64").unwrap() < (6, 14));
        assert_eq!(kernel_version("amd64"), None);
    }

    #[test]
    fn package_index() {
        let index = Packages(
            "Package: linux-image-amd64\nVersion: 7.3.4-1\nDepends: linux-base-amd64 (= 7.3.4-1), \
             linux-image-7.3.4+deb13-amd64 (= 7.3.4-1)\n\n\
             Package: linux-image-7.3.4+deb13-amd64\nDepends: dracut | initramfs-tools (>= 0.120), \
             linux-binary-7.3.4+deb13-amd64 (= 7.3.4-1)\nFilename: pool/main/l/x.deb\n"
                .into(),
        );
        assert_eq!(
            index.depends("linux-image-amd64"),
            ["linux-base-amd64", "linux-image-7.3.4+deb13-amd64"]
        );
        assert_eq!(
            index.depends("linux-image-7.3.4+deb13-amd64"),
            ["dracut", "linux-binary-7.3.4+deb13-amd64"]
        );
        assert_eq!(
            index
                .field("linux-image-7.3.4+deb13-amd64", "Filename")
                .as_deref(),
            Some("pool/main/l/x.deb")
        );
        assert_eq!(index.field("linux-image", "Filename"), None);
    }
}
