//! `ip netns exec NS balancer ...` starts the agent in a private mount namespace with a fresh
//! /sys: maps and links pinned there would vanish with the process, unseen by `balancer stats`
//! from another shell and by the next agent. The agent joins the mount namespace of the
//! process that started it instead (its network namespace stays), or refuses to run.

use std::{fs, io, os::fd::AsRawFd, path::PathBuf};

use anyhow::{bail, Context, Result};

/// Where the process started, when it had to move to its parent's mount namespace.
pub struct Joined {
    pub parent: u32,
}

/// Joins the parent's mount namespace when this process has a private one without the BPF
/// filesystem; `None` when it needs not. Must run before any thread starts (setns refuses
/// multi-threaded callers for mount namespaces).
pub fn join_parent_mounts() -> Result<Option<Joined>> {
    if crate::dataplane::bpf_fs_mounted() {
        return Ok(None);
    }
    let own = fs::read_link("/proc/self/ns/mnt").context("reading /proc/self/ns/mnt")?;
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() } as u32;
    let parent_ns = format!("/proc/{parent}/ns/mnt");
    match fs::read_link(&parent_ns) {
        Ok(theirs) if theirs == own => return Ok(None),
        Ok(_) => {}
        // A parent we cannot see (gone, or in another user namespace): nothing to compare.
        Err(_) => return Ok(None),
    }
    let cwd: PathBuf = std::env::current_dir().context("reading the working directory")?;
    let enter = || -> io::Result<()> {
        let namespace = fs::File::open(&parent_ns)?;
        // SAFETY: a valid descriptor of a mount namespace; the process is single-threaded.
        if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // setns moved the working directory to the namespace's root.
        std::env::set_current_dir(&cwd)
    };
    if let Err(error) = enter() {
        bail!(
            "this process runs in a private mount namespace (as `ip netns exec` makes), where \
             the maps it pins would vanish with it, and it could not join its parent's ({error}). \
             Start it with `nsenter --net=/run/netns/<namespace> balancer ...` instead, which \
             keeps the host's mounts"
        );
    }
    Ok(Some(Joined { parent }))
}
