//! Finding or installing what the build and the lab need.
//!
//! The eBPF program needs a Rust compiler with `core` for bpfel-unknown-none and a matching
//! `bpf-linker`. Two ways are known to work: Debian's packaged Rust with its prebuilt BPF
//! `core` plus `bpf-linker` built against LLVM 22 (installed here when missing, as root on
//! Debian/Ubuntu), or a rustup nightly with `rust-src` (the usual aya recipe).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";
/// The bpf-linker release built and tried with Debian's LLVM 22 (see shared/TOOLCHAIN.md);
/// pinned, with its own lock file, so a newer release or dependency cannot raise the Rust
/// version it needs.
const BPF_LINKER_VERSION: &str = "0.13.0";
const DEBIAN_PACKAGES: [&str; 6] = [
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];

/// How the eBPF crate gets compiled.
#[derive(Clone, Copy, Debug)]
pub enum EbpfToolchain {
    /// Debian's rustc with its prebuilt BPF `core`.
    Debian,
    /// A rustup nightly with `rust-src`, building `core` itself.
    RustupNightly,
}

/// A usable eBPF toolchain and where its linker is (put on PATH for the build, since
/// `~/.cargo/bin` need not be on it).
pub struct Ebpf {
    pub toolchain: EbpfToolchain,
    pub linker: PathBuf,
}

/// Returns a working eBPF toolchain, installing the Debian one if nothing usable is there.
/// Fast when everything is present: a few file checks and, at most, one `rustup` query.
pub fn ensure_ebpf() -> Result<Ebpf> {
    if let Some(found) = find_ebpf() {
        return Ok(found);
    }
    if !can_install() {
        bail!("{}", missing_toolchain_help());
    }
    if !debian_ready() {
        println!(
            "==> installing Debian's Rust with the BPF core library and LLVM 22 (apt-get, a few minutes)"
        );
        apt_install(&DEBIAN_PACKAGES)?;
    }
    if bpf_linker().is_none() {
        println!(
            "==> installing bpf-linker {BPF_LINKER_VERSION} built against LLVM 22 (1-2 minutes)"
        );
        let status = Command::new(cargo())
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .status()
            .context("running cargo install bpf-linker")?;
        if !status.success() {
            bail!("cargo install bpf-linker failed ({status})");
        }
    }
    match (debian_ready(), bpf_linker()) {
        (true, Some(linker)) => Ok(Ebpf {
            toolchain: EbpfToolchain::Debian,
            linker,
        }),
        _ => bail!(
            "the eBPF toolchain is still incomplete after installing it: see the output above"
        ),
    }
}

/// The Debian toolchain when present, else a rustup nightly with `rust-src`.
fn find_ebpf() -> Option<Ebpf> {
    let linker = bpf_linker()?;
    if debian_ready() {
        return Some(Ebpf {
            toolchain: EbpfToolchain::Debian,
            linker,
        });
    }
    nightly_with_rust_src().then_some(Ebpf {
        toolchain: EbpfToolchain::RustupNightly,
        linker,
    })
}

/// What to install, in plain words, when neither toolchain is there and we cannot install.
fn missing_toolchain_help() -> String {
    let why = if !is_root() {
        "not running as root"
    } else {
        "no apt-get here"
    };
    let mut found = Vec::new();
    if debian_ready() {
        found.push("Debian's rustc with the BPF core library".to_owned());
    }
    if nightly_installed() && !nightly_with_rust_src() {
        found.push("a rustup nightly, but without the rust-src component".to_owned());
    }
    match bpf_linker() {
        Some(linker) => found.push(format!("bpf-linker at {}", linker.display())),
        None => found.push("no bpf-linker".to_owned()),
    }
    let found = found.join("; ");
    format!(
        "no eBPF toolchain found ({found}), and I cannot install one ({why}).\n\
         Building the XDP program needs a Rust compiler with `core` for bpfel-unknown-none and bpf-linker. Install either:\n\
         \x20 - on Debian 12 / Ubuntu, as root:\n\
         \x20     apt-get install {}\n\
         \x20     LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version {BPF_LINKER_VERSION} --locked --no-default-features --features llvm-22\n\
         \x20   (or just run `cargo xtask build` as root, which does this)\n\
         \x20 - anywhere with internet access (the usual aya recipe):\n\
         \x20     rustup toolchain install nightly --component rust-src\n\
         \x20     cargo install bpf-linker",
        DEBIAN_PACKAGES.join(" ")
    )
}

/// The programs the lab, the tests and the benchmark run, by the Debian package that has them.
const LAB_TOOLS: [(&str, &str); 16] = [
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("ethtool", "ethtool"),
    ("curl", "curl"),
    ("ping", "iputils-ping"),
    ("sysctl", "procps"),
    ("wrk", "wrk"),
    ("nft", "nftables"),
    ("sha256sum", "coreutils"),
    ("iperf3", "iperf3"),
    ("python3", "python3"),
    ("hping3", "hping3"),
    ("nc", "netcat-openbsd"),
    // A real backend that reads the PROXY protocol the balancer writes in full NAT.
    ("nginx", "nginx"),
    // A real Prometheus that scrapes the agent's metrics endpoint.
    ("prometheus", "prometheus"),
    // Checks the systemd unit (the machines' PID 1 is no systemd to start it with).
    ("systemd-analyze", "systemd"),
];

/// Installs what the lab needs (tools above, Debian's python3 with scapy) and mounts bpffs.
pub fn ensure_lab() -> Result<()> {
    let mut missing: Vec<&str> = LAB_TOOLS
        .iter()
        .filter(|(tool, _)| which(tool).is_none())
        .map(|(_, package)| *package)
        .collect();
    let scapy = Command::new("/usr/bin/python3")
        .args(["-c", "import scapy"])
        .output();
    if !scapy.is_ok_and(|o| o.status.success()) {
        missing.push("python3-scapy");
    }
    if !missing.is_empty() {
        if !can_install() {
            bail!("the lab needs these packages: {}", missing.join(" "));
        }
        println!("==> installing the lab's tools: {}", missing.join(" "));
        apt_install(&missing)?;
    }
    ensure_python_modules()?;
    mount_bpffs()
}

/// Python modules of the lab's clients, for the `python3` on PATH: `requests` drives the
/// cookie tests' sessions, `pyte` (a terminal emulator) reads what `balancer top` draws.
const PYTHON_MODULES: [&str; 2] = ["requests", "pyte"];

fn ensure_python_modules() -> Result<()> {
    let missing: Vec<&str> = PYTHON_MODULES
        .iter()
        .copied()
        .filter(|module| {
            !Command::new("python3")
                .args(["-c", &format!("import {module}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!(
        "==> installing Python modules for the lab's clients (pip): {}",
        missing.join(" ")
    );
    let status = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet"])
        .args(&missing)
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!(
            "pip install {} failed ({status}); install them for python3",
            missing.join(" ")
        );
    }
    Ok(())
}

fn debian_ready() -> bool {
    Path::new(DEBIAN_RUSTC).exists()
        && std::fs::read_dir(DEBIAN_BPF_CORE)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
            })
            .unwrap_or(false)
}

fn nightly_installed() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn nightly_with_rust_src() -> bool {
    Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src")
        })
}

fn bpf_linker() -> Option<PathBuf> {
    which("bpf-linker").or_else(|| {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
        Some(home.join("bin/bpf-linker")).filter(|p| p.exists())
    })
}

pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

/// The cargo that runs us (so a rustup toolchain choice carries over), else the one on PATH.
pub fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn can_install() -> bool {
    is_root() && which("apt-get").is_some()
}

pub fn apt_install(packages: &[&str]) -> Result<()> {
    static UPDATED: std::sync::Once = std::sync::Once::new();
    let mut update = Ok(());
    UPDATED.call_once(|| {
        update = Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get update")
            .and_then(|s| {
                if s.success() {
                    Ok(())
                } else {
                    bail!("apt-get update failed ({s})")
                }
            });
    });
    update?;
    // Servers installed for the lab (nginx) are started by the tests, in their namespaces:
    // a policy-rc.d that refuses keeps their packages from starting them on the host.
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists()
        && std::fs::write(
            policy,
            "#!/bin/sh\n# cargo xtask: no services started by apt\nexit 101\n",
        )
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))
        })
        .is_ok();
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get install");
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    let status = status?;
    if !status.success() {
        bail!("apt-get install {} failed ({status})", packages.join(" "));
    }
    Ok(())
}

fn mount_bpffs() -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
                && l.split_whitespace().nth(2) == Some("bpf")
        });
    if mounted || !is_root() {
        return Ok(());
    }
    let status = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()?;
    if !status.success() {
        bail!("mounting bpffs on /sys/fs/bpf failed ({status})");
    }
    Ok(())
}
