//! Namespaces and links through iproute2, and the removal of labs whose owner died.
//!
//! A lab's namespaces are `blab-<pid>-<n>-<role>`, its directory `<tmp>/blab-<pid>-<n>`, its
//! balancer instance (bpffs pin directory, control socket) `lab-<pid>-<n>`: the owner's PID in
//! every name is what lets a later lab tell that the owner is gone.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::UNIX_EPOCH,
};

use anyhow::{bail, Context, Result};

use crate::process::{self, STOP_GRACE};

/// Prefix of every namespace and directory a lab creates.
pub const PREFIX: &str = "blab";
/// Prefix of balancer instance names.
pub const INSTANCE_PREFIX: &str = "lab";
pub const BPF_FS: &str = "/sys/fs/bpf";
pub const CONTROL_DIR: &str = "/run/balancer";
const NETNS_DIR: &str = "/run/netns";

/// Slack when comparing an owner's start time with a file's time (the boot time that start
/// times derive from is whole seconds).
const CLOCK_SLACK: f64 = 2.0;

/// Runs a command to completion and fails, with its stderr, unless it succeeds.
pub fn run(args: &[&str]) -> Result<()> {
    let output = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?} (is {} installed?)", args[0]))?;
    if !output.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// `ip -n <ns> <args>`.
pub fn ip(ns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["ip", "-n", ns];
    full.extend_from_slice(args);
    run(&full)
}

/// The processes inside a namespace.
pub fn pids(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

pub fn exists(ns: &str) -> bool {
    Path::new(NETNS_DIR).join(ns).exists()
}

/// Every namespace whose name starts with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    fs::read_dir(NETNS_DIR)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Stops every process left in a namespace, then deletes it.
pub fn remove(ns: &str) {
    process::stop_foreign(&pids(ns), STOP_GRACE);
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

/// Removes the namespaces (stopping their processes), directories, pinned maps and control
/// sockets of labs whose owning process is gone. Labs of live processes are left alone.
pub fn reap_stale_labs() {
    let ns_prefix = format!("{PREFIX}-");
    for ns in list(&ns_prefix) {
        if owner_gone(&ns, &ns_prefix, &Path::new(NETNS_DIR).join(&ns)) {
            remove(&ns);
        }
    }
    let instance_prefix = format!("{INSTANCE_PREFIX}-");
    let dirs = [
        (std::env::temp_dir(), ns_prefix.as_str()),
        (BPF_FS.into(), instance_prefix.as_str()),
        (CONTROL_DIR.into(), instance_prefix.as_str()),
    ];
    for (dir, prefix) in dirs {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if owner_gone(&name, prefix, &path) {
                let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
            }
        }
    }
}

/// Whether `name` is `<prefix><pid>-<n>...` of a lab whose owner no longer runs: the PID is
/// dead, or belongs to a process that started after `path` was made (the PID was reused).
fn owner_gone(name: &str, prefix: &str, path: &Path) -> bool {
    let Some(pid) = name
        .strip_prefix(prefix)
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
    else {
        return false;
    };
    if !process::running(pid) {
        return true;
    }
    let made = fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64());
    match (process::start_time(pid), made) {
        (Some(started), Some(made)) => started > made + CLOCK_SLACK,
        _ => false,
    }
}
