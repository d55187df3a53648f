//! Building the XDP object (with the eBPF toolchain) and then the binaries that embed it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::toolchain::{self, Ebpf, EbpfToolchain};

/// What a build produced.
pub struct Artifacts {
    pub ebpf_object: PathBuf,
    pub balancer: PathBuf,
    pub lab_backend: PathBuf,
    pub lab_impair: PathBuf,
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Toolchain, XDP object, then the release binaries.
pub fn all() -> Result<Artifacts> {
    let toolchain = toolchain::ensure_ebpf()?;
    let ebpf_object = ebpf(&toolchain, "target/ebpf", None)?;
    println!("==> building the agent and the lab (release)");
    cargo(&["build", "--release"], &ebpf_object)?;
    let bin = workspace_root().join("target/release");
    Ok(Artifacts {
        ebpf_object,
        balancer: bin.join("balancer"),
        lab_backend: bin.join("lab-backend"),
        lab_impair: bin.join("lab-impair"),
    })
}

/// The agent timeout of the upgrade tests' program (the agent's own has the default).
const UPGRADE_AGENT_TIMEOUT_S: &str = "3";

/// The program built with another agent timeout: an XDP object that differs from the one
/// built into the agent, for the tests of an upgrade (`balancer run --program`).
pub fn upgrade_object() -> Result<PathBuf> {
    let toolchain = toolchain::ensure_ebpf()?;
    ebpf(
        &toolchain,
        "target/ebpf-upgrade",
        Some(("BALANCER_AGENT_TIMEOUT_S", UPGRADE_AGENT_TIMEOUT_S)),
    )
}

/// Compiles the eBPF crate into `target_dir` (under the workspace), with `setting`, a
/// build-time constant, in its environment. A target directory of its own keeps the two
/// compilers' artifacts, and the two settings', apart.
fn ebpf(toolchain: &Ebpf, target_dir: &str, setting: Option<(&str, &str)>) -> Result<PathBuf> {
    let root = workspace_root();
    let target_dir = root.join(target_dir);
    println!(
        "==> building the XDP program ({:?} toolchain, {}{})",
        toolchain.toolchain,
        toolchain.linker.display(),
        setting.map_or_else(String::new, |(name, value)| format!(", {name}={value}"))
    );
    let mut command = match toolchain.toolchain {
        EbpfToolchain::Debian => {
            let mut c = Command::new(toolchain::cargo());
            // Debian's compiler ships a prebuilt `core`; aya-ebpf needs unstable features.
            c.env("RUSTC", "/usr/bin/rustc").env("RUSTC_BOOTSTRAP", "1");
            c.args(["build"]);
            c
        }
        EbpfToolchain::RustupNightly => {
            let mut c = Command::new("rustup");
            c.args(["run", "nightly", "cargo", "build", "-Z", "build-std=core"]);
            c
        }
    };
    // rustc finds the linker on PATH; `cargo install` may have put it where PATH does not look.
    if let Some(dir) = toolchain.linker.parent() {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let paths = std::iter::once(dir.to_path_buf()).chain(std::env::split_paths(&path));
        command.env(
            "PATH",
            std::env::join_paths(paths).context("joining PATH with bpf-linker's directory")?,
        );
    }
    if let Some((name, value)) = setting {
        command.env(name, value);
    }
    command
        .current_dir(&root)
        .args([
            "--package",
            "balancer-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "--target-dir",
        ])
        .arg(&target_dir);
    let status = command
        .status()
        .context("running cargo for the eBPF crate")?;
    if !status.success() {
        bail!("building the XDP program failed ({status})");
    }
    let object = target_dir.join("bpfel-unknown-none/release/balancer-ebpf");
    if !object.exists() {
        bail!("the build did not produce {}", object.display());
    }
    Ok(object)
}

/// Runs cargo in the workspace with the XDP object to embed.
pub fn cargo(args: &[&str], ebpf_object: &Path) -> Result<()> {
    let status = Command::new(toolchain::cargo())
        .current_dir(workspace_root())
        .args(args)
        .env("BALANCER_EBPF_OBJECT", ebpf_object)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
