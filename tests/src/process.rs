//! Processes the lab starts: each leads its own process group, so that stopping it also stops
//! whatever it started. Everything is signalled by PID, never by name.

use std::{
    fs,
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

/// How long a process gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

const POLL: Duration = Duration::from_millis(20);

/// A process the lab started, leader of its own process group.
pub struct Process {
    pub child: Child,
    /// The namespace it runs in.
    pub ns: String,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited; does not reap it, so its PID (and its process group
    /// id) stay reserved until [`Process::reap`].
    pub fn exited(&self) -> bool {
        // SAFETY: waitid with WNOWAIT only reads the child's state into `info`.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let rc = libc::waitid(
                libc::P_PID,
                self.pid(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            // ECHILD: already reaped.
            rc != 0 || info.si_pid() != 0
        }
    }

    /// Signals the whole process group (the leader is not reaped yet, so the id is ours).
    pub fn signal_group(&self, signal: i32) {
        signal_pid(-(self.pid() as i32), signal);
    }

    pub fn reap(&mut self) {
        let _ = self.child.wait();
    }
}

/// Puts the command's process in a new process group of its own.
pub fn own_group(command: &mut Command) -> &mut Command {
    command.process_group(0)
}

/// Sends `first` to each process (only the leader, or its whole group), SIGKILLs the groups
/// of those still running after `grace`, and reaps them all. Returns whether every leader
/// exited within `grace`.
pub fn stop_all(processes: &mut [Process], first: i32, whole_group: bool, grace: Duration) -> bool {
    for process in processes.iter() {
        if whole_group {
            process.signal_group(first);
        } else {
            signal_pid(process.pid() as i32, first);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && !processes.iter().all(Process::exited) {
        thread::sleep(POLL);
    }
    let in_time = processes.iter().all(Process::exited);
    for process in processes.iter_mut() {
        // Stragglers of the group (and a leader that ignored `first`).
        process.signal_group(libc::SIGKILL);
        process.reap();
    }
    in_time
}

/// Stops a process the lab did not start itself (found in one of its namespaces).
pub fn stop_foreign(pids: &[u32], grace: Duration) {
    for &pid in pids {
        signal_pid(pid as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && pids.iter().any(|&pid| running(pid)) {
        thread::sleep(POLL);
    }
    for &pid in pids {
        if running(pid) {
            signal_pid(pid as i32, libc::SIGKILL);
        }
    }
}

/// Whether `pid` is a live process (not gone, not a zombie waiting for a parent).
pub fn running(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat_fields(&stat).first(), Some(&"Z") | Some(&"X")),
        Err(_) => false,
    }
}

/// When `pid` started, in seconds since the epoch (within a second: the boot time is whole
/// seconds); `None` if it is not running.
pub fn start_time(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 of /proc/<pid>/stat; the slice starts at field 3.
    let ticks: f64 = stat_fields(&stat).get(19)?.parse().ok()?;
    let boot: f64 = fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| boot + ticks / hz as f64)
}

/// The fields after the command name, which may itself contain spaces and parentheses.
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

fn signal_pid(pid: i32, signal: i32) {
    // Never 0 or -1: those would signal our own group or every process.
    if pid == 0 || pid == -1 {
        return;
    }
    // SAFETY: kill has no memory effects; the PIDs are processes the lab owns.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// The last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    tail(&text, lines)
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
