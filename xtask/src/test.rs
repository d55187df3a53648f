//! `cargo xtask test`: unit tests, then the tests that need root (XDP fixtures through
//! BPF_PROG_TEST_RUN and the namespace integration tests).

use anyhow::{bail, Result};
use balancer_lab::config::AGENT_WORKERS_VARIABLE;

use crate::{build, toolchain};

/// The suites that run a second time, on one binding worker.
const ONE_WORKER_SUITES: [&str; 2] = ["cookie", "hostile"];

/// `extra` goes to the integration test binaries (a name filter, `--nocapture`, ...).
pub fn run(extra: &[String]) -> Result<()> {
    if !toolchain::is_root() {
        bail!("the tests load XDP programs and build network namespaces: run them as root");
    }
    let artifacts = build::all()?;
    let upgrade_object = build::upgrade_object()?;
    toolchain::ensure_lab()?;

    println!("==> unit tests");
    build::cargo(
        &[
            "test",
            "--release",
            "--workspace",
            "--exclude",
            "balancer-ebpf",
            "--lib",
            "--bins",
        ],
        &artifacts.ebpf_object,
    )?;

    println!("==> XDP fixtures and namespace integration tests");
    let balancer = artifacts.balancer.to_string_lossy().into_owned();
    std::env::set_var("BALANCER_BIN", &balancer);
    std::env::set_var("BALANCER_UPGRADE_OBJECT", &upgrade_object);
    let mut args = vec![
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "balancer-ebpf",
        "--test",
        "*",
        "--",
    ];
    // Several binding workers, whatever the CPUs; the cookie suites run on one below.
    std::env::set_var(AGENT_WORKERS_VARIABLE, "2");
    // Each namespace test builds its own lab; two at a time keep both CPUs busy.
    if !extra.iter().any(|a| a.starts_with("--test-threads")) {
        args.push("--test-threads=2");
    }
    args.extend(extra.iter().map(String::as_str));
    build::cargo(&args, &artifacts.ebpf_object)?;

    // The cookie suites again, on one binding worker.
    println!("==> cookie suites on one binding worker");
    std::env::set_var(AGENT_WORKERS_VARIABLE, "1");
    let mut one_worker = vec!["test", "--release", "-p", "balancer-lab"];
    for suite in ONE_WORKER_SUITES {
        one_worker.extend(["--test", suite]);
    }
    one_worker.extend(args[args.iter().position(|a| *a == "--").unwrap_or(args.len())..].iter());
    build::cargo(&one_worker, &artifacts.ebpf_object)?;
    std::env::remove_var(AGENT_WORKERS_VARIABLE);
    println!("==> all tests passed");
    Ok(())
}
