//! [`Lab`]: builds the namespaces and links, runs processes inside them, and removes it all on
//! drop.

use std::{
    collections::HashMap,
    fs,
    io::Read,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    impair::{self, Impairment},
    netns::{self, ip, BPF_FS, CONTROL_DIR, INSTANCE_PREFIX, PREFIX},
    process::{self, log_tail, own_group, Process, STOP_GRACE},
    BACKEND_COUNT, BALANCER_BACKEND_ADDR, BALANCER_BACKEND_ADDR6, BALANCER_CLIENT_ADDR,
    BALANCER_CLIENT_ADDR6, CLIENT_ADDR, CLIENT_ADDR6,
};

/// How long [`Lab::exec`] lets a command run before killing it.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(300);
/// How long [`Lab::start_backends`] waits for each backend to answer.
const BACKEND_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long [`Lab::start_balancer`] waits for the agent's `ready` line.
const BALANCER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Lab::start_impairment`] waits for the relay's first counters.
const IMPAIRMENT_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent gets to detach and exit after SIGTERM.
const BALANCER_STOP_GRACE: Duration = Duration::from_secs(10);

/// The relay namespace's port towards the client, and towards the balancer host.
const WIRE_CLIENT_PORT: &str = "to-client";
const WIRE_BALANCER_PORT: &str = "to-lb";

/// Labs made by this process so far: the `<n>` in `blab-<pid>-<n>`.
static LABS: AtomicU32 = AtomicU32::new(0);

/// How the agent is started in the balancer namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// `nsenter --net=/run/netns/<ns>`: the host's mounts, and so its bpffs.
    Nsenter,
    /// `ip netns exec <ns>`: a private mount namespace with a fresh /sys.
    IpNetnsExec,
}

/// A client, a balancer host, a switch and three backends, each in its own network namespace.
/// Dropping it (also during a panic) stops every process it started and removes its
/// namespaces, directory, pinned maps and control socket.
pub struct Lab {
    /// `blab-<pid>-<n>`, the prefix of its namespaces and the name of its directory.
    name: String,
    /// `lab-<pid>-<n>`, the balancer instance.
    instance: String,
    client: String,
    balancer: String,
    switch: String,
    /// The relay namespace on the client link, in a lab with an impaired client link.
    wire: Option<String>,
    backends: Vec<String>,
    dir: PathBuf,
    /// Processes started with [`Lab::spawn`] and the backends.
    processes: Vec<Process>,
    agent: Option<Process>,
}

impl Lab {
    /// Removes labs of dead owners, then builds a new one; on failure removes what it built.
    pub fn new() -> Result<Lab> {
        Lab::create(false)
    }

    /// A lab whose client link runs through a relay namespace, `<name>-wire`, that forwards
    /// nothing until [`Lab::start_impairment`] starts its relay.
    pub fn with_impaired_client_link() -> Result<Lab> {
        Lab::create(true)
    }

    fn create(impaired: bool) -> Result<Lab> {
        ensure!(
            crate::is_root(),
            "integration tests need root: the lab creates network namespaces"
        );
        netns::reap_stale_labs();
        let id = format!(
            "{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::SeqCst)
        );
        let name = format!("{PREFIX}-{id}");
        let dir = std::env::temp_dir().join(&name);
        let lab = Lab {
            instance: format!("{INSTANCE_PREFIX}-{id}"),
            client: format!("{name}-client"),
            balancer: format!("{name}-lb"),
            switch: format!("{name}-sw"),
            wire: impaired.then(|| format!("{name}-wire")),
            backends: (1..=BACKEND_COUNT)
                .map(|i| format!("{name}-b{i}"))
                .collect(),
            dir,
            processes: Vec::new(),
            agent: None,
            name,
        };
        // From here on, dropping `lab` removes whatever part of it exists.
        fs::create_dir_all(&lab.dir).with_context(|| format!("creating {}", lab.dir.display()))?;
        lab.build()
            .with_context(|| format!("building the namespace lab {}", lab.name))?;
        Ok(lab)
    }

    /// `blab-<pid>-<n>`: every namespace of the lab starts with it.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn client_ns(&self) -> &str {
        &self.client
    }

    pub fn balancer_ns(&self) -> &str {
        &self.balancer
    }

    /// The namespace of the bridge joining the balancer host and the backends.
    pub fn switch_ns(&self) -> &str {
        &self.switch
    }

    /// The namespace of backend `index` (0..[`BACKEND_COUNT`]).
    pub fn backend_ns(&self, index: usize) -> &str {
        &self.backends[index]
    }

    pub fn backend_addr(index: usize) -> Ipv4Addr {
        assert!(index < BACKEND_COUNT, "backend index {index} out of range");
        Ipv4Addr::new(198, 19, 0, 11 + index as u8)
    }

    pub fn backend_addr6(index: usize) -> Ipv6Addr {
        assert!(index < BACKEND_COUNT, "backend index {index} out of range");
        Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 0x11 + index as u16)
    }

    pub fn backend_name(index: usize) -> String {
        format!("backend-{}", index + 1)
    }

    /// The balancer instance of this lab: its maps are pinned in `/sys/fs/bpf/<instance>`.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// A directory for configs, logs and data, removed with the lab.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All namespaces of the lab.
    pub fn namespaces(&self) -> Vec<&str> {
        let mut all = vec![self.client_ns(), self.balancer_ns(), self.switch_ns()];
        all.extend(self.wire.as_deref());
        all.extend(self.backends.iter().map(String::as_str));
        all
    }

    fn build(&self) -> Result<()> {
        for ns in self.namespaces() {
            netns::run(&["ip", "netns", "add", ns])?;
            ip(ns, &["link", "set", "lo", "up"])?;
        }
        let (client, lb, sw) = (self.client_ns(), self.balancer_ns(), self.switch_ns());

        match &self.wire {
            None => self.veth(client, "eth0", lb, "lb-client")?,
            Some(wire) => {
                self.veth(client, "eth0", wire, WIRE_CLIENT_PORT)?;
                self.veth(wire, WIRE_BALANCER_PORT, lb, "lb-client")?;
                // The relay impairs frames as they cross a wire: nothing may merge them on the
                // way in (GRO) or hand them over unsegmented (GSO from the client's stack or
                // from the balancer host's routing).
                for port in [WIRE_CLIENT_PORT, WIRE_BALANCER_PORT] {
                    self.exec_checked(wire, &["ethtool", "-K", port, "gro", "off"])?;
                }
                for (ns, dev) in [(client, "eth0"), (lb, "lb-client")] {
                    self.exec_checked(ns, &["ethtool", "-K", dev, "gso", "off", "tso", "off"])?;
                }
                self.exec_checked(wire, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
            }
        }
        ip(
            client,
            &["addr", "add", &format!("{CLIENT_ADDR}/16"), "dev", "eth0"],
        )?;
        ip(
            client,
            &[
                "route",
                "add",
                "default",
                "via",
                &BALANCER_CLIENT_ADDR.to_string(),
            ],
        )?;

        ip6_addr(client, &format!("{CLIENT_ADDR6}/48"), "eth0")?;
        ip(
            client,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &BALANCER_CLIENT_ADDR6.to_string(),
            ],
        )?;

        self.veth(lb, "lb-backend", sw, "sw-lb")?;
        ip6_addr(lb, &format!("{BALANCER_CLIENT_ADDR6}/48"), "lb-client")?;
        ip6_addr(lb, &format!("{BALANCER_BACKEND_ADDR6}/64"), "lb-backend")?;
        ip(
            lb,
            &[
                "addr",
                "add",
                &format!("{BALANCER_CLIENT_ADDR}/16"),
                "dev",
                "lb-client",
            ],
        )?;
        ip(
            lb,
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
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.lb-client.rp_filter=0",
            "net.ipv4.conf.lb-backend.rp_filter=0",
        ] {
            self.exec_checked(lb, &["sysctl", "-qw", setting])?;
        }

        ip(sw, &["link", "add", "br0", "type", "bridge"])?;
        ip(sw, &["link", "set", "br0", "up"])?;
        ip(sw, &["link", "set", "sw-lb", "master", "br0"])?;
        for index in 0..BACKEND_COUNT {
            let (backend, port) = (self.backend_ns(index), format!("sw-b{}", index + 1));
            self.veth(backend, "eth0", sw, &port)?;
            ip(sw, &["link", "set", &port, "master", "br0"])?;
            let addr = format!("{}/24", Lab::backend_addr(index));
            ip(backend, &["addr", "add", &addr, "dev", "eth0"])?;
            ip6_addr(
                backend,
                &format!("{}/64", Lab::backend_addr6(index)),
                "eth0",
            )?;
            ip(
                backend,
                &[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &BALANCER_BACKEND_ADDR6.to_string(),
                ],
            )?;
            ip(
                backend,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &BALANCER_BACKEND_ADDR.to_string(),
                ],
            )?;
        }

        // Many short connections from one client: reuse TIME_WAIT ports, use a wide range.
        self.exec_checked(client, &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
        self.exec_checked(
            client,
            &["sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000"],
        )?;
        Ok(())
    }

    /// A veth pair made inside the namespaces (names never meet in the root namespace), two
    /// queues per side (both CPUs can work), transmit checksum offload off (the stack would
    /// leave checksums for the NIC to finish, and XDP forwards them unfinished) and GRO on (a
    /// veth receiving XDP_REDIRECT or XDP_TX frames drops them without GRO or an XDP program).
    fn veth(&self, ns_a: &str, dev_a: &str, ns_b: &str, dev_b: &str) -> Result<()> {
        let queues = ["numrxqueues", "2", "numtxqueues", "2"];
        let mut args = vec!["link", "add", dev_a];
        args.extend(queues);
        args.extend(["type", "veth", "peer", "name", dev_b, "netns", ns_b]);
        args.extend(queues);
        ip(ns_a, &args)?;
        for (ns, dev) in [(ns_a, dev_a), (ns_b, dev_b)] {
            ip(ns, &["link", "set", dev, "up"])?;
            self.exec_checked(ns, &["ethtool", "-K", dev, "tx", "off", "gro", "on"])?;
        }
        Ok(())
    }

    /// Runs `args` in a namespace (`ip netns exec`) and returns its output, whatever its exit;
    /// fails only if it cannot start or runs longer than [`EXEC_TIMEOUT`].
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<Output> {
        self.exec_timeout(ns, args, EXEC_TIMEOUT)
    }

    /// [`Lab::exec`] with its own time limit; the command's process group is killed when it
    /// runs out.
    pub fn exec_timeout(&self, ns: &str, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = own_group(&mut command)
            .spawn()
            .with_context(|| format!("running {args:?} in {ns}"))?;
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let mut process = Process {
            child,
            ns: ns.to_owned(),
        };
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        let mut timed_out = false;
        while !process.exited() {
            if Instant::now() > deadline {
                process.signal_group(libc::SIGKILL);
                timed_out = true;
                break;
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        let status = process.child.wait().context("waiting for a command")?;
        let output = Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        };
        if timed_out {
            bail!(
                "{args:?} in {ns} did not finish within {timeout:?}; killed. stderr: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(output)
    }

    /// Runs a command in a namespace and fails, with its stderr, unless it succeeds; returns
    /// its stdout.
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

    /// `curl -sS --max-time 60 <args>` in a namespace; fails unless curl succeeds (add `-f`
    /// to fail on HTTP errors too). Returns what curl printed.
    pub fn curl(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["curl", "-sS", "--max-time", "60"];
        full.extend_from_slice(args);
        self.exec_checked(ns, &full)
    }

    /// Starts a process in a namespace, in a process group of its own, with its output
    /// appended to `spawned.log` in [`Lab::dir`]. It is stopped when the lab is dropped.
    pub fn spawn(&mut self, ns: &str, args: &[&str]) -> Result<u32> {
        let log = self.dir.join("spawned.log");
        self.spawn_logged(ns, args, &log)
    }

    /// [`Lab::spawn`] with stdout and stderr appended to `log`.
    pub fn spawn_logged(&mut self, ns: &str, args: &[&str], log: &Path) -> Result<u32> {
        let (out, err) = append_twice(log)?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = own_group(&mut command)
            .spawn()
            .with_context(|| format!("starting {args:?} in {ns}"))?;
        let pid = child.id();
        self.processes.push(Process {
            child,
            ns: ns.to_owned(),
        });
        Ok(pid)
    }

    /// PIDs of the processes started with [`Lab::spawn`] (and the backends) still tracked.
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(Process::pid).collect()
    }

    /// Stops one process the lab started (SIGTERM to its group, SIGKILL after a grace period).
    pub fn stop(&mut self, pid: u32) -> Result<()> {
        let Some(at) = self.processes.iter().position(|p| p.pid() == pid) else {
            bail!("process {pid} was not started by this lab");
        };
        let mut process = self.processes.swap_remove(at);
        process::stop_all(
            std::slice::from_mut(&mut process),
            libc::SIGTERM,
            true,
            STOP_GRACE,
        );
        Ok(())
    }

    /// Extra source addresses for the client (each must lie within 198.18.0.0/16).
    pub fn add_client_addresses(&self, addrs: &[Ipv4Addr]) -> Result<()> {
        for addr in addrs {
            ensure!(
                addr.octets()[..2] == [198, 18],
                "{addr} is outside 198.18.0.0/16"
            );
            ip(
                self.client_ns(),
                &["addr", "add", &format!("{addr}/16"), "dev", "eth0"],
            )?;
        }
        Ok(())
    }

    /// Takes the backends' default routes away, both families: they reach their own network
    /// alone, as backends in a network whose gateway is not the balancer (full NAT's case).
    pub fn route_backends_away(&self) -> Result<()> {
        for index in 0..BACKEND_COUNT {
            let ns = self.backend_ns(index);
            ip(ns, &["route", "del", "default"])?;
            ip(ns, &["-6", "route", "del", "default"])?;
        }
        Ok(())
    }

    /// Extra IPv6 source addresses for the client (each must lie within 2001:db8:c::/48).
    pub fn add_client_addresses6(&self, addrs: &[Ipv6Addr]) -> Result<()> {
        for addr in addrs {
            ensure!(
                addr.segments()[..3] == [0x2001, 0xdb8, 0xc],
                "{addr} is outside 2001:db8:c::/48"
            );
            ip6_addr(self.client_ns(), &format!("{addr}/48"), "eth0")?;
        }
        Ok(())
    }

    /// Starts `lab-backend` in every backend namespace and returns once each answers HTTP.
    pub fn start_backends(&mut self, backend_bin: &Path) -> Result<()> {
        let mut pids = Vec::new();
        for index in 0..BACKEND_COUNT {
            pids.push(self.spawn_backend(backend_bin, index)?);
        }
        for (index, pid) in pids.into_iter().enumerate() {
            self.wait_for_backend(index, pid)?;
        }
        Ok(())
    }

    /// Starts the server of one backend (again, after [`Lab::stop_backend`]); returns its PID
    /// once it answers HTTP.
    pub fn start_backend(&mut self, backend_bin: &Path, index: usize) -> Result<u32> {
        let pid = self.spawn_backend(backend_bin, index)?;
        self.wait_for_backend(index, pid)?;
        Ok(pid)
    }

    /// Stops every process in one backend namespace: its server goes away, its address stays.
    pub fn stop_backend(&mut self, index: usize) -> Result<()> {
        let ns = self.backend_ns(index).to_owned();
        let (mut stopping, keep) = std::mem::take(&mut self.processes)
            .into_iter()
            .partition::<Vec<_>, _>(|p| p.ns == ns);
        self.processes = keep;
        process::stop_all(&mut stopping, libc::SIGTERM, true, STOP_GRACE);
        process::stop_foreign(&netns::pids(&ns), STOP_GRACE);
        Ok(())
    }

    /// Where the output of backend `index` goes.
    pub fn backend_log(&self, index: usize) -> PathBuf {
        self.dir.join(format!("{}.log", Lab::backend_name(index)))
    }

    fn spawn_backend(&mut self, backend_bin: &Path, index: usize) -> Result<u32> {
        let bin = backend_bin
            .to_str()
            .context("the backend binary's path is not UTF-8")?
            .to_owned();
        ensure!(
            backend_bin.exists(),
            "no backend binary at {bin} (build it with `cargo build -p balancer-lab`)"
        );
        let ns = self.backend_ns(index).to_owned();
        let log = self.backend_log(index);
        self.spawn_logged(&ns, &[&bin, "--name", &Lab::backend_name(index)], &log)
    }

    /// Waits until backend `index` answers `GET /` with its name, asked from the balancer
    /// host; fails early if its process exits.
    fn wait_for_backend(&self, index: usize, pid: u32) -> Result<()> {
        let name = Lab::backend_name(index);
        let url = format!("http://{}/", Lab::backend_addr(index));
        let deadline = Instant::now() + BACKEND_READY_TIMEOUT;
        loop {
            let output = self.exec_timeout(
                self.balancer_ns(),
                &["curl", "-s", "--max-time", "1", &url],
                Duration::from_secs(5),
            )?;
            if output.status.success() && output.stdout == format!("{name}\n").as_bytes() {
                return Ok(());
            }
            let exited = self.exited(pid);
            if exited || Instant::now() > deadline {
                bail!(
                    "{name} at {url} did not answer within {BACKEND_READY_TIMEOUT:?}{}; its log:\n{}",
                    if exited { " (its process exited)" } else { "" },
                    log_tail(&self.backend_log(index), 20)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Makes every backend drop `percent` of the frames it receives (`lab-drop` on its
    /// interface): a lossy link between the balancer host and the backends.
    pub fn drop_at_backends(&mut self, drop_bin: &Path, percent: f64) -> Result<()> {
        let bin = drop_bin.to_string_lossy().into_owned();
        let percent = percent.to_string();
        for index in 0..BACKEND_COUNT {
            let ns = self.backend_ns(index).to_owned();
            self.spawn(&ns, &[&bin, "--interface", "eth0", "--percent", &percent])?;
        }
        // The programs are attached within milliseconds of the start.
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }

    /// Starts the relay of the impaired client link (see [`Lab::with_impaired_client_link`])
    /// and waits for its first counters; from then on the client reaches the balancer through
    /// it.
    pub fn start_impairment(&mut self, relay_bin: &Path, impairment: &Impairment) -> Result<()> {
        impairment.validate()?;
        let Some(wire) = self.wire.clone() else {
            bail!(
                "this lab's client link has no relay: build it with Lab::with_impaired_client_link"
            );
        };
        ensure!(
            relay_bin.exists(),
            "no relay binary at {}",
            relay_bin.display()
        );
        let counters = self.impairment_counters_path();
        let bin = relay_bin.to_string_lossy().into_owned();
        let mut args = vec![
            bin,
            "--client-port".into(),
            WIRE_CLIENT_PORT.into(),
            "--balancer-port".into(),
            WIRE_BALANCER_PORT.into(),
            "--counters".into(),
            counters.to_string_lossy().into_owned(),
        ];
        args.extend(impairment.args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.dir.join("impairment.log");
        let pid = self.spawn_logged(&wire, &args, &log)?;
        let deadline = Instant::now() + IMPAIRMENT_READY_TIMEOUT;
        while !counters.exists() {
            let exited = self.exited(pid);
            if exited || Instant::now() > deadline {
                bail!(
                    "the impairment relay did not start; its log:
{}",
                    log_tail(&log, 20)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn impairment_counters_path(&self) -> PathBuf {
        self.dir.join("impairment.counters")
    }

    /// What the relay has done so far: `<direction>_<counter>` → frames (see
    /// [`crate::impair::COUNTERS`]).
    pub fn impairment_counters(&self) -> Result<HashMap<String, u64>> {
        impair::read_counters(&self.impairment_counters_path())
    }

    /// Whether a process this lab started has exited (or is no longer tracked).
    fn exited(&self, pid: u32) -> bool {
        self.processes
            .iter()
            .find(|p| p.pid() == pid)
            .is_none_or(Process::exited)
    }

    pub fn balancer_log(&self) -> PathBuf {
        self.dir.join("balancer.log")
    }

    /// Starts the agent in the balancer namespace (keeping the host's mount namespace, so that
    /// its maps are pinned in the host's bpffs) and waits until it logs a line starting with
    /// `ready`.
    pub fn start_balancer(&mut self, balancer_bin: &Path, config: &Path) -> Result<String> {
        let config = config.to_string_lossy();
        self.start_balancer_with(balancer_bin, &["run", "--config", &config], Launch::Nsenter)
    }

    /// Starts `balancer <args>` in the balancer namespace as `launch` says and waits for its
    /// `ready` line, which it returns.
    pub fn start_balancer_with(
        &mut self,
        balancer_bin: &Path,
        args: &[&str],
        launch: Launch,
    ) -> Result<String> {
        ensure!(self.agent.is_none(), "the balancer is already running");
        ensure!(
            balancer_bin.exists(),
            "no balancer binary at {}",
            balancer_bin.display()
        );
        let log_path = self.balancer_log();
        // Only what this run writes counts: the log may hold an earlier run.
        let start = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0) as usize;
        let (out, err) = append_twice(&log_path)?;
        let mut command = match launch {
            Launch::Nsenter => {
                let mut command = Command::new("nsenter");
                command.arg(format!("--net=/run/netns/{}", self.balancer_ns()));
                command
            }
            Launch::IpNetnsExec => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", self.balancer_ns()]);
                command
            }
        };
        command
            .arg(balancer_bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = own_group(&mut command)
            .spawn()
            .context("starting the balancer")?;
        let agent = self.agent.insert(Process {
            child,
            ns: self.balancer.clone(),
        });
        let deadline = Instant::now() + BALANCER_READY_TIMEOUT;
        loop {
            let log = fs::read(&log_path).unwrap_or_default();
            let text = String::from_utf8_lossy(log.get(start..).unwrap_or_default());
            if let Some(ready) = text.lines().find(|line| line.starts_with("ready")) {
                return Ok(ready.to_owned());
            }
            if agent.exited() {
                let status = agent.child.wait().context("waiting for the balancer")?;
                self.agent = None;
                bail!(
                    "the balancer exited ({status}) before it was ready; its log:\n{}",
                    process::tail(&text, 30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the balancer was not ready within {BALANCER_READY_TIMEOUT:?}; its log:\n{}",
                    process::tail(&text, 30)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the agent with `balancer stop --detach`: its program leaves the interfaces and its
    /// maps are removed, so what runs next on the balancer host runs without it.
    pub fn detach_balancer(&mut self, balancer_bin: &Path) -> Result<()> {
        let Some(mut agent) = self.agent.take() else {
            return Ok(());
        };
        let output = Command::new(balancer_bin)
            .args(["stop", "--detach", "--instance", &self.instance])
            .output()
            .context("running balancer stop --detach")?;
        ensure!(
            output.status.success(),
            "balancer stop --detach: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let deadline = Instant::now() + BALANCER_STOP_GRACE;
        while !agent.exited() {
            ensure!(
                Instant::now() < deadline,
                "the balancer did not exit within {BALANCER_STOP_GRACE:?} of stop --detach"
            );
            thread::sleep(Duration::from_millis(50));
        }
        agent.reap();
        Ok(())
    }

    /// Kills the agent with SIGKILL, as a crash would end it, and reaps it.
    pub fn kill_balancer(&mut self) -> Result<()> {
        let mut agent = self.agent.take().context("the balancer is not running")?;
        agent.signal_group(libc::SIGKILL);
        agent.reap();
        Ok(())
    }

    /// Waits up to `limit` for a process started with [`Lab::spawn`] to exit, and reaps it.
    pub fn wait_for(&mut self, pid: u32, limit: Duration) -> Result<std::process::ExitStatus> {
        let at = self
            .processes
            .iter()
            .position(|p| p.pid() == pid)
            .with_context(|| format!("process {pid} was not started by this lab"))?;
        let deadline = Instant::now() + limit;
        while !self.processes[at].exited() {
            ensure!(
                Instant::now() < deadline,
                "process {pid} still runs after {limit:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        let mut process = self.processes.swap_remove(at);
        process.child.wait().context("reaping a process")
    }

    /// Stops the agent: SIGTERM to its PID, then SIGKILL if it has not exited within 10 s (an
    /// error, with its log tail). Nothing to do if it is not running.
    pub fn stop_balancer(&mut self) -> Result<()> {
        let Some(mut agent) = self.agent.take() else {
            return Ok(());
        };
        let exited = process::stop_all(
            std::slice::from_mut(&mut agent),
            libc::SIGTERM,
            false,
            BALANCER_STOP_GRACE,
        );
        ensure!(
            exited,
            "the balancer did not exit within {BALANCER_STOP_GRACE:?} of SIGTERM and was killed; its log:\n{}",
            log_tail(&self.balancer_log(), 30)
        );
        Ok(())
    }

    /// The PID of the running agent, to send it signals.
    pub fn balancer_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Process::pid)
    }

    fn teardown(&mut self) {
        let _ = self.stop_balancer();
        process::stop_all(&mut self.processes, libc::SIGTERM, true, STOP_GRACE);
        self.processes.clear();
        for ns in self.namespaces() {
            if netns::exists(ns) {
                netns::remove(ns);
            }
        }
        let _ = fs::remove_dir_all(Path::new(BPF_FS).join(&self.instance));
        let _ = fs::remove_file(Path::new(CONTROL_DIR).join(format!("{}.sock", self.instance)));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Two append handles on one log file, for a child's stdout and stderr.
/// An IPv6 address usable at once: without duplicate address detection it would stay
/// tentative (unusable) for a second or two after the link comes up.
fn ip6_addr(ns: &str, addr: &str, dev: &str) -> Result<()> {
    ip(ns, &["-6", "addr", "add", addr, "dev", dev, "nodad"])
}

fn append_twice(path: &Path) -> Result<(fs::File, fs::File)> {
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok((file.try_clone()?, file))
}

/// Reads a child's pipe to the end on a thread of its own.
fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}
