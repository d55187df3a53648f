//! `cargo xtask fuzz`: the fuzzing targets, a million cases each by default: the agent's
//! parsers (request cookies, the response head editor, the rewrite strip, the cookie codec,
//! the configuration) and random and mutated frames through the XDP program with
//! BPF_PROG_TEST_RUN. Not part of `cargo xtask test`: a full run takes minutes.

use anyhow::{bail, Result};

use crate::{build, toolchain};

pub fn run(cases: u64) -> Result<()> {
    if !toolchain::is_root() {
        bail!("the XDP frames go through BPF_PROG_TEST_RUN: run the fuzzing as root");
    }
    let artifacts = build::all()?;
    toolchain::ensure_lab()?;
    std::env::set_var("FUZZ_CASES", cases.to_string());
    println!("==> fuzzing the agent's parsers, {cases} cases each");
    build::cargo(
        &[
            "test",
            "--release",
            "-p",
            "balancer-user",
            "--bins",
            "--",
            "--ignored",
            "fuzz",
        ],
        &artifacts.ebpf_object,
    )?;
    println!("==> fuzzing the XDP program with {cases} frames");
    build::cargo(
        &[
            "test",
            "--release",
            "-p",
            "balancer-user",
            "--test",
            "xdp_fixtures",
            "--",
            "--ignored",
            "fuzz",
        ],
        &artifacts.ebpf_object,
    )?;
    println!("==> fuzzing passed: no panic, every bound held, every frame counted once");
    Ok(())
}
