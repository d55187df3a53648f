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

/// Returns a working eBPF toolchain, installing the Debian one if nothing usable is there.
pub fn ensure_ebpf() -> Result<EbpfToolchain> {
    if debian_ready() && bpf_linker().is_some() {
        return Ok(EbpfToolchain::Debian);
    }
    if nightly_with_rust_src() && bpf_linker().is_some() {
        return Ok(EbpfToolchain::RustupNightly);
    }
    if !can_install() {
        bail!(
            "no eBPF toolchain found, and this is not a Debian/Ubuntu machine where I can install one as root.\n\
             Install either:\n\
             - Debian/Ubuntu (as root): apt-get install {} && \\\n  \
               LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --no-default-features --features llvm-22\n\
             - or anywhere with internet: rustup toolchain install nightly --component rust-src && cargo install bpf-linker",
            DEBIAN_PACKAGES.join(" ")
        );
    }
    if !debian_ready() {
        println!("==> installing Debian's Rust with the BPF core library and LLVM 22");
        apt_install(&DEBIAN_PACKAGES)?;
    }
    if bpf_linker().is_none() {
        println!("==> building bpf-linker against LLVM 22 (takes 1-2 minutes)");
        let status = Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
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
    if debian_ready() && bpf_linker().is_some() {
        Ok(EbpfToolchain::Debian)
    } else {
        bail!("the eBPF toolchain is still incomplete after installing it: see the output above")
    }
}

/// The programs the lab, the tests and the benchmark run, by the Debian package that has them.
const LAB_TOOLS: [(&str, &str); 9] = [
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("ethtool", "ethtool"),
    ("curl", "curl"),
    ("ping", "iputils-ping"),
    ("sysctl", "procps"),
    ("wrk", "wrk"),
    ("nft", "nftables"),
    ("sha256sum", "coreutils"),
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
    mount_bpffs()
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

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn can_install() -> bool {
    is_root() && which("apt-get").is_some()
}

fn apt_install(packages: &[&str]) -> Result<()> {
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
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get install")?;
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
