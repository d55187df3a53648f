//! The data plane outlives the agent: a crash (SIGKILL), a restart (SIGTERM and a new
//! `balancer run`) and an upgrade (a new run loading a different program) lose no connection
//! of real clients, and the instance is found and controlled from other shells however the
//! agent was started.

mod common;

use std::{path::PathBuf, time::Duration};

use balancer_lab::{Lab, Launch, ServiceOptions, COOKIE_PORT, LB_COOKIE_PORT, VIP};
use common::*;

/// How long each wrk run lasts: long enough for a kill, a restart and an upgrade in turn.
const WRK_RUN: &str = "30s";
/// Packets the data plane must forward between two events of a test, so each happens with
/// traffic in flight.
const TRAFFIC_BETWEEN_EVENTS: u64 = 20_000;

/// `web` (L4, source-ip), `web-cookie` (app-cookie) and `web-lb-cookie` (lb-cookie).
fn three_kinds() -> ServiceOptions {
    ServiceOptions {
        web_settings: "affinity = \"source-ip\"".into(),
        cookie_service: true,
        lb_cookie_backend: Some(2),
        ..ServiceOptions::default()
    }
}

fn upgrade_object() -> PathBuf {
    std::env::var_os("BALANCER_UPGRADE_OBJECT")
        .map(PathBuf::from)
        .expect("BALANCER_UPGRADE_OBJECT names the second build of the program (cargo xtask test sets it)")
}

/// Packets the data plane forwarded either way, plain and spliced.
fn forwarded(lab: &Lab) -> u64 {
    let c = counters(lab);
    [
        "forwarded",
        "replied",
        "spliced_to_backend",
        "spliced_to_client",
    ]
    .iter()
    .map(|name| c.get(*name).copied().unwrap_or(0))
    .sum()
}

/// Waits until the data plane has forwarded [`TRAFFIC_BETWEEN_EVENTS`] more packets.
fn wait_for_traffic(lab: &Lab, what: &str) {
    let from = forwarded(lab);
    wait_until(Duration::from_secs(20), what, || {
        forwarded(lab) >= from + TRAFFIC_BETWEEN_EVENTS
    });
}

/// `curl -si` of `/` on a VIP port, on a new connection: the response head and body.
fn fetch(lab: &Lab, port: u16) -> Option<String> {
    lab.curl(
        lab.client_ns(),
        &["-i", "--max-time", "2", &format!("http://{VIP}:{port}/")],
    )
    .ok()
}

/// Whether a new connection to the lb-cookie VIP was bound by the agent: its first response
/// carries the balancer's cookie.
fn bound_by_the_agent(lab: &Lab) -> bool {
    fetch(lab, LB_COOKIE_PORT)
        .is_some_and(|r| r.to_ascii_lowercase().contains("set-cookie: lbsession="))
}

/// The number after `program ` in a `ready` line: the id of the program the agent loaded.
fn program_id(ready: &str) -> u32 {
    ready
        .split("; ")
        .find_map(|part| part.strip_prefix("program "))
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no program id in {ready:?}"))
}

/// What wrk reported: requests done, and its error lines (socket errors, non-2xx answers).
fn wrk_result(log: &std::path::Path) -> (u64, Vec<String>) {
    let text = std::fs::read_to_string(log).expect("reading wrk's output");
    let requests = text
        .lines()
        .find_map(|line| line.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{text}"));
    let errors = text
        .lines()
        .filter(|line| line.contains("Socket errors") || line.contains("Non-2xx"))
        .map(str::to_owned)
        .collect();
    (requests, errors)
}

#[test]
fn a_crash_a_restart_and_an_upgrade_of_the_agent_lose_no_connection_of_wrk_runs() {
    let mut lab = lab_with(&three_kinds());
    let first = lab.balancer_log();
    let config = config_path(&lab);
    let config = config.to_str().unwrap();
    let ready = std::fs::read_to_string(&first).expect("the agent's log");
    let mut program = program_id(ready.lines().find(|l| l.starts_with("ready")).unwrap());

    let runs: Vec<(u16, PathBuf)> = [80, COOKIE_PORT, LB_COOKIE_PORT]
        .into_iter()
        .map(|port| (port, lab.dir().join(format!("wrk-{port}.log"))))
        .collect();
    let mut pids = Vec::new();
    for (port, log) in &runs {
        let url = format!("http://{VIP}:{port}/");
        let client = lab.client_ns().to_owned();
        let pid = lab
            .spawn_logged(&client, &["wrk", "-t1", "-c16", "-d", WRK_RUN, &url], log)
            .expect("starting wrk");
        pids.push(pid);
    }
    wait_for_traffic(&lab, "wrk's requests flow");

    // A crash: the program stays attached and forwards on its own.
    lab.kill_balancer().expect("killing the agent");
    wait_for_traffic(&lab, "traffic flows with no agent");
    let status = balancer(&lab, &["status"]);
    assert!(
        status.contains("no agent running; the data plane is attached to")
            && status.contains("lb-client (link")
            && status.contains("lb-backend (link"),
        "status without an agent:\n{status}"
    );
    // Once the agent's heartbeat is old, new cookie connections are placed by XDP alone.
    wait_until(
        Duration::from_secs(10),
        "a new lb-cookie connection is served by the fallback",
        || {
            fetch(&lab, LB_COOKIE_PORT).is_some()
                && counters(&lab)
                    .get("placed_without_agent")
                    .copied()
                    .unwrap_or(0)
                    > 0
        },
    );
    let starting = std::time::Instant::now();
    let ready = lab
        .start_balancer(&balancer_bin(), &config_path(&lab))
        .expect("starting a new agent");
    eprintln!(
        "the new agent was ready {:?} after it started",
        starting.elapsed()
    );
    assert!(
        ready.contains("took over from program"),
        "the new agent adopts the attached program: {ready}"
    );
    let rebound = wait_until(
        Duration::from_secs(2),
        "new cookie connections are bound by the new agent",
        || bound_by_the_agent(&lab),
    );
    eprintln!("new cookie connections were bound again {rebound:?} after the new agent's ready");
    let next = program_id(&ready);
    assert_ne!(
        next, program,
        "the new agent's program replaced the old one"
    );
    program = next;
    wait_for_traffic(&lab, "traffic flows after the crash");

    // A restart.
    lab.stop_balancer().expect("stopping the agent");
    let ready = lab
        .start_balancer(&balancer_bin(), &config_path(&lab))
        .expect("restarting the agent");
    assert!(
        ready.contains(&format!("took over from program {program}")),
        "{ready}"
    );
    program = program_id(&ready);
    wait_for_traffic(&lab, "traffic flows after the restart");

    // An upgrade: a program built with another constant, loaded by a new run.
    lab.stop_balancer().expect("stopping the agent");
    let upgrade = upgrade_object();
    let ready = lab
        .start_balancer_with(
            &balancer_bin(),
            &[
                "run",
                "--config",
                config,
                "--program",
                upgrade.to_str().unwrap(),
            ],
            Launch::Nsenter,
        )
        .expect("starting the upgraded agent");
    assert!(
        ready.contains(&format!("took over from program {program}")),
        "{ready}"
    );
    wait_for_traffic(&lab, "traffic flows after the upgrade");
    assert!(
        bound_by_the_agent(&lab),
        "the upgraded agent binds cookie connections"
    );
    for pid in &pids {
        assert!(
            balancer_lab::process::running(*pid),
            "wrk was still running through the upgrade"
        );
    }

    for ((port, log), pid) in runs.iter().zip(pids) {
        lab.wait_for(pid, Duration::from_secs(60))
            .expect("wrk finishes");
        let (requests, errors) = wrk_result(log);
        assert!(
            requests > 1000,
            "wrk on port {port} made {requests} requests"
        );
        assert!(errors.is_empty(), "wrk on port {port}: {errors:?}");
        eprintln!("wrk on port {port}: {requests} requests, no socket error, no failed answer");
    }
}

#[test]
fn downloads_of_100_mb_arrive_intact_while_the_agent_is_killed_twice() {
    let mut lab = lab_with(&three_kinds());
    let size = 100_000_000u64;
    let expected = lab.dir().join("expected.bin");
    balancer_lab::write_test_data(&expected, size).expect("generating the expected bytes");
    // Rate-limited so the downloads last long enough for two crashes.
    let downloads: Vec<(u16, PathBuf)> = [80, LB_COOKIE_PORT]
        .into_iter()
        .map(|port| (port, lab.dir().join(format!("download-{port}.bin"))))
        .collect();
    let mut pids = Vec::new();
    for (port, file) in &downloads {
        let url = format!("http://{VIP}:{port}/bytes/{size}");
        let client = lab.client_ns().to_owned();
        let pid = lab
            .spawn(
                &client,
                &[
                    "curl",
                    "-sS",
                    "--fail",
                    "--max-time",
                    "120",
                    "--limit-rate",
                    "12M",
                    "-o",
                    file.to_str().unwrap(),
                    &url,
                ],
            )
            .expect("starting curl");
        pids.push(pid);
    }
    let received = |file: &PathBuf| std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    for share in [3, 6] {
        wait_until(Duration::from_secs(60), "the downloads progress", || {
            downloads
                .iter()
                .all(|(_, file)| received(file) >= size * share / 10)
        });
        lab.kill_balancer().expect("killing the agent");
        wait_until(
            Duration::from_secs(60),
            "the downloads progress with no agent",
            || {
                downloads
                    .iter()
                    .all(|(_, file)| received(file) >= size * (share + 1) / 10)
            },
        );
        lab.start_balancer(&balancer_bin(), &config_path(&lab))
            .expect("starting a new agent");
    }
    for ((port, file), pid) in downloads.iter().zip(pids) {
        let status = lab
            .wait_for(pid, Duration::from_secs(120))
            .expect("curl finishes");
        assert!(status.success(), "curl of port {port}: {status}");
        assert_eq!(received(file), size, "bytes downloaded through port {port}");
        assert_eq!(
            sha256_of_file(file),
            sha256_of_file(&expected),
            "bytes through port {port}"
        );
    }
}

#[test]
fn an_agent_started_by_ip_netns_exec_is_found_from_other_shells_and_stop_detach_removes_it() {
    let mut lab = Lab::new().expect("building the lab");
    lab.start_backends(backend_bin())
        .expect("starting the backends");
    let config = config_path(&lab);
    std::fs::write(&config, lab.balancer_config()).expect("writing the config");
    let ready = lab
        .start_balancer_with(
            &balancer_bin(),
            &["run", "--config", config.to_str().unwrap()],
            Launch::IpNetnsExec,
        )
        .expect("starting the agent with ip netns exec");
    assert!(
        ready.contains(&format!("/sys/fs/bpf/{}", lab.instance())),
        "{ready}"
    );
    let log = std::fs::read_to_string(lab.balancer_log()).unwrap();
    assert!(
        log.contains("joined the mount namespace"),
        "the agent says where it pins:\n{log}"
    );

    get(&lab, &[], "/");
    // From another shell, itself in a private mount namespace.
    let instance = lab.instance().to_owned();
    let balancer_ns = lab.balancer_ns().to_owned();
    let bin = balancer_bin();
    let bin = bin.to_str().unwrap();
    let stats = run(&lab, &balancer_ns, &[bin, "stats", "--instance", &instance]);
    let forwarded: u64 = stats
        .lines()
        .find_map(|line| line.strip_prefix("forwarded "))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no forwarded counter in:\n{stats}"));
    assert!(forwarded > 0, "{stats}");
    let status = run(
        &lab,
        &balancer_ns,
        &[bin, "status", "--instance", &instance],
    );
    assert!(status.contains("service web "), "{status}");

    // An explicit stop with --detach removes the data plane.
    let answer = run(
        &lab,
        &balancer_ns,
        &[bin, "stop", "--detach", "--instance", &instance],
    );
    assert!(answer.contains("detaching"), "{answer}");
    let pid = lab.balancer_pid().expect("the agent's pid");
    wait_until(Duration::from_secs(10), "the agent exits", || {
        !balancer_lab::process::running(pid)
    });
    wait_until(Duration::from_secs(5), "the pins are removed", || {
        !std::path::Path::new("/sys/fs/bpf").join(&instance).exists()
    });
    let attached = run(&lab, &balancer_ns, &["ip", "link", "show", "lb-client"]);
    assert!(
        !attached.contains("xdp"),
        "no program on lb-client:\n{attached}"
    );
    assert!(
        lab.curl(lab.client_ns(), &["--max-time", "2", &vip_url("/")])
            .is_err(),
        "the VIP is no longer served"
    );
}

#[test]
fn maps_of_another_shape_are_refused_naming_the_loss_and_the_running_program_keeps_forwarding() {
    let mut lab = lab_with_balancer();
    get(&lab, &[], "/");
    lab.stop_balancer().expect("stopping the agent");
    let config = config_path(&lab);
    let changed = format!("flow_capacity = 4096\n{}", lab.balancer_config());
    std::fs::write(&config, changed).expect("writing the changed config");
    let refused = lab
        .start_balancer(&balancer_bin(), &config)
        .expect_err("the agent refuses maps of another capacity");
    let refusal = format!("{refused:#}");
    assert!(
        refusal.contains("FLOWS has key, value and capacity")
            && refusal.contains("--cold")
            && refusal.contains("flows"),
        "the refusal says what does not fit, what would be lost and how to go on:\n{refusal}"
    );
    get(&lab, &[], "/");
    let ready = lab
        .start_balancer_with(
            &balancer_bin(),
            &["run", "--cold", "--config", config.to_str().unwrap()],
            Launch::Nsenter,
        )
        .expect("starting cold");
    assert!(ready.contains("took over from program"), "{ready}");
    get(&lab, &[], "/");
}

#[test]
fn an_agent_restarted_with_other_workers_or_ring_sizes_takes_over_without_a_cold_start() {
    let mut lab = lab_with(&three_kinds());
    assert!(bound_by_the_agent(&lab));
    let config = config_path(&lab);
    let config = config.to_str().unwrap();
    // The rings each restart must replace: all eight when the workers change (a prefix's
    // frames may belong to another worker now), else those whose size changed.
    let mut running = agent_workers(&lab);
    let mut replaced = 0usize;
    for (workers, ring) in [("1", None), ("3", Some(1 << 20)), ("3", Some(1 << 19))] {
        lab.stop_balancer().expect("stopping the agent");
        if let Some(size) = ring {
            let changed = format!(
                "punt_ring_size = {size}\n{}",
                lab.balancer_config_with(&three_kinds())
            );
            std::fs::write(config, changed).expect("writing the changed config");
        }
        let ready = lab
            .start_balancer_with(
                &balancer_bin(),
                &["run", "--config", config, "--agent-workers", workers],
                Launch::Nsenter,
            )
            .expect("the rings are replaced, the other maps adopted");
        assert!(ready.contains("took over from program"), "{ready}");
        assert!(
            ready.contains(&format!("{workers} binding workers")),
            "{ready}"
        );
        wait_until(
            Duration::from_secs(5),
            "new cookie connections are bound by the restarted agent",
            || bound_by_the_agent(&lab),
        );
        assert_eq!(agent_workers(&lab).to_string(), workers);
        let now: u32 = workers.parse().unwrap();
        replaced += match (now == running, ring) {
            (false, _) => 8,
            (true, Some(_)) => now as usize,
            (true, None) => 0,
        };
        running = now;
    }
    let log = std::fs::read_to_string(lab.balancer_log()).expect("reading the agent's log");
    let rings = log
        .lines()
        .filter(|l| l.contains("replacing a punt ring"))
        .count();
    assert_eq!(rings, replaced, "{log}");
}

#[test]
fn the_systemd_unit_verifies_and_the_agent_tells_systemd_it_is_ready_alive_and_stopping() {
    let mut lab = lab_with_balancer();
    let bin = balancer_bin();
    let config = config_path(&lab);
    // The unit as installed, pointing at this build and this lab's configuration.
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/balancer@.service"
    ))
    .expect("reading systemd/balancer@.service")
    .replace("/usr/local/bin/balancer", bin.to_str().unwrap())
    .replace("/etc/balancer/%i.toml", config.to_str().unwrap());
    let installed = lab.dir().join("balancer@lab.service");
    std::fs::write(&installed, unit).unwrap();
    let verify = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&installed)
        .output()
        .expect("running systemd-analyze (package systemd)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );

    // What systemd would hear under Type=notify, on a socket of ours, from an agent that
    // takes over from the lab's.
    lab.stop_balancer().expect("stopping the lab's agent");
    let socket_path = lab.dir().join("notify.sock");
    let socket =
        std::os::unix::net::UnixDatagram::bind(&socket_path).expect("binding a notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let agent = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.balancer_ns()))
        .arg(&bin)
        .args(["run", "--config", config.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting the agent");
    let mut agent = KilledOnDrop(agent);
    let mut heard = Vec::new();
    let mut listen_for = |state: &str| {
        let mut buf = [0u8; 512];
        while !heard.iter().any(|m: &String| m.lines().any(|l| l == state)) {
            let n = socket.recv(&mut buf).unwrap_or_else(|error| {
                panic!("no {state} from the agent ({error}); heard {heard:?}")
            });
            heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    listen_for("READY=1");
    listen_for("WATCHDOG=1");
    // SAFETY: kill has no memory effects; the agent is our child, not yet reaped.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    listen_for("STOPPING=1");
    let status = agent.0.wait().expect("waiting for the agent");
    assert!(
        status.success(),
        "the agent exits cleanly on SIGTERM: {status}"
    );
}

/// A child process killed if the test fails before it ends.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn a_restarted_agent_keeps_a_failed_backend_down_and_a_drain_going() {
    let mut lab = lab_with(&ServiceOptions {
        web_settings: "[service.health_check]\nkind = \"http\"\ninterval = 0.5\ntimeout = 0.5\nfall = 2\nrise = 2\n"
            .to_owned(),
        ..ServiceOptions::default()
    });
    let (failed, drained) = (Lab::backend_name(2), Lab::backend_name(1));
    lab.stop_backend(2).expect("stopping backend-3's server");
    wait_until(Duration::from_secs(5), "backend-3 marked down", || {
        status_of(&lab, &failed).contains("state=down")
    });
    balancer(&lab, &["backend", "drain", "web", &drained]);
    lab.stop_balancer().expect("stopping the agent");
    lab.start_balancer(&balancer_bin(), &config_path(&lab))
        .expect("restarting the agent");
    // At once, before any health check of the new run has answered.
    assert!(
        status_of(&lab, &failed).contains("state=down"),
        "{}",
        status_of(&lab, &failed)
    );
    assert!(
        status_of(&lab, &drained).contains("state=draining"),
        "{}",
        status_of(&lab, &drained)
    );
    for _ in 0..30 {
        assert_eq!(
            get(&lab, &[], "/"),
            Lab::backend_name(0),
            "new flows avoid both"
        );
    }
}
