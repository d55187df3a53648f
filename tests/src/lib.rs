//! The namespace lab: a client, a balancer host, a switch and three backends, each in its own
//! network namespace, joined by veth pairs. Used by the integration tests, `cargo xtask run`
//! and `cargo xtask bench`. Only the benchmarking ranges are used: clients in 198.18.0.0/16,
//! backends in 198.19.0.0/24, the VIP in 203.0.113.0/24.
//!
//! ```text
//!  client ns            balancer ns                 switch ns              backend ns
//!  eth0 198.18.0.2 ── lb-client 198.18.0.1
//!                       lb-backend 198.19.0.1 ── sw-lb ┐
//!                                                      br0 ─ sw-b1 ── eth0 198.19.0.11
//!                                                          ─ sw-b2 ── eth0 198.19.0.12
//!                                                          ─ sw-b3 ── eth0 198.19.0.13
//! ```
//!
//! Everything is removed when the [`Lab`] is dropped, also on a panic; a lab whose process was
//! killed is removed by the next [`Lab::new`].

pub mod data;

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub use crate::data::write_test_data;

pub const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const BACKEND_COUNT: usize = 3;
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const BALANCER_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const BALANCER_BACKEND_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const HTTP_PORT: u16 = 80;
pub const ECHO_PORT: u16 = 7;

const PREFIX: &str = "blab";
const BPF_FS: &str = "/sys/fs/bpf";
const CONTROL_DIR: &str = "/run/balancer";

static LABS: AtomicU32 = AtomicU32::new(0);

pub struct Lab {
    /// `blab-<pid>-<n>`: namespaces are `<name>-client`, `-lb`, `-sw`, `-b1`..`-b3`.
    name: String,
    dir: PathBuf,
    /// Processes started in the lab, stopped by PID on drop.
    children: Vec<Child>,
    balancer: Option<Child>,
}

impl Lab {
    /// Builds the topology; on failure removes what it built.
    pub fn new() -> Result<Lab> {
        reap_stale_labs();
        let name = format!(
            "{PREFIX}-{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let lab = Lab {
            name,
            dir,
            children: Vec::new(),
            balancer: None,
        };
        lab.build()
            .with_context(|| format!("building the namespace lab {}", lab.name))?;
        Ok(lab)
    }

    pub fn client_ns(&self) -> String {
        format!("{}-client", self.name)
    }

    pub fn balancer_ns(&self) -> String {
        format!("{}-lb", self.name)
    }

    fn switch_ns(&self) -> String {
        format!("{}-sw", self.name)
    }

    pub fn backend_ns(&self, index: usize) -> String {
        format!("{}-b{}", self.name, index + 1)
    }

    pub fn backend_addr(index: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, 0, 11 + index as u8)
    }

    pub fn backend_name(index: usize) -> String {
        format!("backend-{}", index + 1)
    }

    /// The balancer instance of this lab: its maps live in `/sys/fs/bpf/<instance>`.
    pub fn instance(&self) -> String {
        self.name.replacen(PREFIX, "lab", 1)
    }

    /// A directory for configs, logs and data, removed with the lab.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn namespaces(&self) -> Vec<String> {
        let mut all = vec![self.client_ns(), self.balancer_ns(), self.switch_ns()];
        all.extend((0..BACKEND_COUNT).map(|i| self.backend_ns(i)));
        all
    }

    fn build(&self) -> Result<()> {
        for ns in self.namespaces() {
            run(&["ip", "netns", "add", &ns])?;
            self.ip(&ns, &["link", "set", "lo", "up"])?;
        }
        let (client, lb, sw) = (self.client_ns(), self.balancer_ns(), self.switch_ns());
        self.veth(&client, "eth0", &lb, "lb-client")?;
        self.veth(&lb, "lb-backend", &sw, "sw-lb")?;
        self.ip(&sw, &["link", "add", "br0", "type", "bridge"])?;
        self.ip(&sw, &["link", "set", "br0", "up"])?;
        self.ip(&sw, &["link", "set", "sw-lb", "master", "br0"])?;
        for index in 0..BACKEND_COUNT {
            let (backend, port) = (self.backend_ns(index), format!("sw-b{}", index + 1));
            self.veth(&backend, "eth0", &sw, &port)?;
            self.ip(&sw, &["link", "set", &port, "master", "br0"])?;
            let addr = format!("{}/24", Lab::backend_addr(index));
            self.ip(&backend, &["addr", "add", &addr, "dev", "eth0"])?;
            self.ip(
                &backend,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &BALANCER_BACKEND_ADDR.to_string(),
                ],
            )?;
        }
        self.ip(
            &client,
            &["addr", "add", &format!("{CLIENT_ADDR}/16"), "dev", "eth0"],
        )?;
        self.ip(
            &client,
            &[
                "route",
                "add",
                "default",
                "via",
                &BALANCER_CLIENT_ADDR.to_string(),
            ],
        )?;
        self.ip(
            &lb,
            &[
                "addr",
                "add",
                &format!("{BALANCER_CLIENT_ADDR}/16"),
                "dev",
                "lb-client",
            ],
        )?;
        self.ip(
            &lb,
            &[
                "addr",
                "add",
                &format!("{BALANCER_BACKEND_ADDR}/24"),
                "dev",
                "lb-backend",
            ],
        )?;
        for setting in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.lb-client.rp_filter=0",
            "net.ipv4.conf.lb-backend.rp_filter=0",
        ] {
            self.exec_checked(&lb, &["sysctl", "-qw", setting])?;
        }
        // Many short connections from one client: reuse TIME_WAIT ports, use a wide range.
        self.exec_checked(&client, &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
        self.exec_checked(
            &client,
            &["sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000"],
        )?;
        Ok(())
    }

    /// A veth pair with two queues per side (both CPUs can work), transmit checksum offload off
    /// (XDP-forwarded TCP would otherwise arrive with bad checksums) and GRO on (a veth
    /// receiving XDP_REDIRECT or XDP_TX frames drops them without GRO or an XDP program).
    fn veth(&self, ns_a: &str, dev_a: &str, ns_b: &str, dev_b: &str) -> Result<()> {
        self.ip(
            ns_a,
            &[
                "link",
                "add",
                dev_a,
                "numrxqueues",
                "2",
                "numtxqueues",
                "2",
                "type",
                "veth",
                "peer",
                "name",
                dev_b,
                "netns",
                ns_b,
                "numrxqueues",
                "2",
                "numtxqueues",
                "2",
            ],
        )?;
        for (ns, dev) in [(ns_a, dev_a), (ns_b, dev_b)] {
            self.ip(ns, &["link", "set", dev, "up"])?;
            self.exec_checked(ns, &["ethtool", "-K", dev, "tx", "off", "gro", "on"])?;
        }
        Ok(())
    }

    fn ip(&self, ns: &str, args: &[&str]) -> Result<()> {
        let mut full = vec!["ip", "-n", ns];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Runs a command inside a namespace of the lab and returns its output, whatever its exit.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {args:?} in {ns}"))
    }

    /// Runs a command inside a namespace and fails, with its stderr, unless it succeeds.
    pub fn exec_checked(&self, ns: &str, args: &[&str]) -> Result<String> {
        let output = self.exec(ns, args)?;
        if !output.status.success() {
            bail!(
                "{args:?} in {ns} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts a process in a namespace; it is stopped when the lab is dropped.
    pub fn spawn(&mut self, ns: &str, args: &[&str]) -> Result<u32> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {args:?} in {ns}"))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Extra client addresses (within 198.18.0.0/16) to open connections from.
    pub fn add_client_addresses(&self, addrs: &[Ipv4Addr]) -> Result<()> {
        let client = self.client_ns();
        for addr in addrs {
            anyhow::ensure!(
                addr.octets()[..2] == [198, 18],
                "{addr} is outside 198.18.0.0/16"
            );
            self.ip(
                &client,
                &["addr", "add", &format!("{addr}/16"), "dev", "eth0"],
            )?;
        }
        Ok(())
    }

    /// Starts the lab's backend server in every backend namespace and waits until each
    /// answers over HTTP from the balancer host.
    pub fn start_backends(&mut self, backend_bin: &Path) -> Result<()> {
        let bin = backend_bin
            .to_str()
            .context("backend binary path is not UTF-8")?
            .to_owned();
        for index in 0..BACKEND_COUNT {
            let ns = self.backend_ns(index);
            self.spawn(&ns, &[&bin, "--name", &Lab::backend_name(index)])?;
        }
        for index in 0..BACKEND_COUNT {
            self.wait_for_backend(index)?;
        }
        Ok(())
    }

    /// Starts the server of one backend again (after a test stopped it).
    pub fn start_backend(&mut self, backend_bin: &Path, index: usize) -> Result<u32> {
        let bin = backend_bin
            .to_str()
            .context("backend binary path is not UTF-8")?
            .to_owned();
        let ns = self.backend_ns(index);
        let pid = self.spawn(&ns, &[&bin, "--name", &Lab::backend_name(index)])?;
        self.wait_for_backend(index)?;
        Ok(pid)
    }

    /// Stops every process of one backend namespace (its server goes away, its address stays).
    pub fn stop_backend(&mut self, index: usize) -> Result<()> {
        let ns = self.backend_ns(index);
        for pid in namespace_pids(&ns) {
            stop_pid(pid);
        }
        let pids = namespace_pids(&ns);
        self.children.retain(|c| !pids.contains(&c.id()));
        Ok(())
    }

    fn wait_for_backend(&self, index: usize) -> Result<()> {
        let url = format!("http://{}/", Lab::backend_addr(index));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let output = self.exec(
                &self.balancer_ns(),
                &["curl", "-s", "--max-time", "1", &url],
            )?;
            if output.status.success() && output.stdout.starts_with(b"backend-") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} at {url} did not answer within 15 s",
                    Lab::backend_name(index)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// A balancer configuration for the lab: `web` (HTTP, tcp/80), `echo-tcp` and `echo-udp`
    /// (port 7), each over the three backends.
    pub fn balancer_config(&self) -> String {
        self.balancer_config_with(&ServiceOptions::default())
    }

    /// The lab's configuration with extra settings for the `web` service.
    pub fn balancer_config_with(&self, options: &ServiceOptions) -> String {
        let backends = |port: u16, count: usize| {
            (0..count)
                .map(|i| {
                    format!(
                        "  [[service.backend]]\n  name = \"{}\"\n  address = \"{}\"\n  port = {port}\n",
                        Lab::backend_name(i),
                        Lab::backend_addr(i)
                    )
                })
                .collect::<String>()
        };
        format!(
            "instance = \"{instance}\"\nclient_interface = \"lb-client\"\nbackend_interface = \"lb-backend\"\nxdp_mode = \"native\"\nstats_interval = 1\n\n\
             [[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = {HTTP_PORT}\nprotocol = \"tcp\"\n{web}\n{web_backends}\n\
             [[service]]\nname = \"echo-tcp\"\nvip = \"{VIP}\"\nport = {ECHO_PORT}\nprotocol = \"tcp\"\n{echo}\n\
             [[service]]\nname = \"echo-udp\"\nvip = \"{VIP}\"\nport = {ECHO_PORT}\nprotocol = \"udp\"\n{echo}",
            instance = self.instance(),
            web = options.web_settings,
            web_backends = backends(HTTP_PORT, options.web_backend_count.unwrap_or(BACKEND_COUNT)),
            echo = backends(ECHO_PORT, BACKEND_COUNT),
        )
    }

    pub fn balancer_log(&self) -> PathBuf {
        self.dir.join("balancer.log")
    }

    /// Starts the agent in the balancer namespace (keeping the host's mount namespace, so its
    /// maps are pinned in the host's bpffs) and waits until it says it is ready.
    pub fn start_balancer(&mut self, balancer_bin: &Path, config: &Path) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.balancer_log())
            .context("opening the balancer log")?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.balancer_ns()))
            .arg(balancer_bin)
            .args(["run", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the balancer")?;
        self.balancer = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = fs::read_to_string(self.balancer_log()).unwrap_or_default();
            if text.lines().any(|l| l.starts_with("ready")) {
                return Ok(());
            }
            if let Some(status) = self
                .balancer
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.balancer = None;
                bail!(
                    "the balancer exited ({status}) before it was ready:\n{}",
                    tail(&text, 20)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the balancer was not ready within 30 s:\n{}",
                    tail(&text, 20)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the agent with SIGTERM (SIGKILL after 10 s) and waits for it.
    pub fn stop_balancer(&mut self) -> Result<()> {
        if let Some(mut child) = self.balancer.take() {
            stop_child(&mut child);
        }
        Ok(())
    }

    /// The PID of the running agent, to send it signals.
    pub fn balancer_pid(&self) -> Option<u32> {
        self.balancer.as_ref().map(Child::id)
    }

    fn teardown(&mut self) {
        let _ = self.stop_balancer();
        for child in &mut self.children {
            stop_child(child);
        }
        self.children.clear();
        for ns in self.namespaces() {
            remove_namespace(&ns);
        }
        let _ = fs::remove_dir_all(Path::new(BPF_FS).join(self.instance()));
        let _ = fs::remove_file(Path::new(CONTROL_DIR).join(format!("{}.sock", self.instance())));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Variations of the lab's `web` service.
#[derive(Default)]
pub struct ServiceOptions {
    /// Extra TOML lines for the service.
    pub web_settings: String,
    /// Only the first backends (all three when `None`).
    pub web_backend_count: Option<usize>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn run(args: &[&str]) -> Result<()> {
    let output = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?} (is iproute2 installed?)"))?;
    if !output.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn namespace_pids(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGTERM, then SIGKILL if the process is still there after 10 s.
fn stop_child(child: &mut Child) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Stops a process that is not our child (found in one of our namespaces).
fn stop_pid(pid: u32) {
    signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && Path::new(&format!("/proc/{pid}")).exists() {
        thread::sleep(Duration::from_millis(20));
    }
    signal(pid, libc::SIGKILL);
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: sending a signal to a process this lab started has no memory effects.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

fn remove_namespace(ns: &str) {
    for pid in namespace_pids(ns) {
        stop_pid(pid);
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
}

/// Removes the namespaces, pinned maps and sockets of labs whose process no longer runs.
fn reap_stale_labs() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let alive = |pid: &str| Path::new(&format!("/proc/{pid}")).exists();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let ns = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = ns.strip_prefix(&format!("{PREFIX}-")) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !alive(pid) {
            remove_namespace(ns);
        }
    }
    for dir in [BPF_FS, CONTROL_DIR] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("lab-") else {
                continue;
            };
            let pid = rest.split('-').next().unwrap_or("");
            if !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) && !alive(pid) {
                let path = entry.path();
                let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
            }
        }
    }
}
