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
    let ebpf_object = ebpf(toolchain)?;
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

/// Compiles the eBPF crate; its own target directory keeps the two compilers' artifacts apart.
fn ebpf(toolchain: Ebpf) -> Result<PathBuf> {
    let root = workspace_root();
    let target_dir = root.join("target/ebpf");
    println!(
        "==> building the XDP program ({:?} toolchain, {})",
        toolchain.toolchain,
        toolchain.linker.display()
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
