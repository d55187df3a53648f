//! `cargo xtask run`: the demo lab, or the agent on real interfaces.

use std::{
    io::{BufRead, BufReader, Seek, SeekFrom},
    os::unix::process::CommandExt,
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, AtomicI32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use balancer_lab::{
    impair::DIRECTIONS, Impairment, Lab, ServiceOptions, ECHO_PORT, HTTP_PORT, VIP, VIP6,
};

use crate::{build, toolchain};

/// How often the demo prints what the impairment relay did.
const IMPAIRMENT_REPORT_PERIOD: Duration = Duration::from_secs(5);

/// Set by SIGINT or SIGTERM: the demo stops and removes its lab.
static STOP: AtomicBool = AtomicBool::new(false);
/// The last stop signal received and not yet forwarded to the agent (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn request_stop(signal: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
    RECEIVED.store(signal, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM end the wait instead of the process, so the lab is torn down.
pub fn catch_stop_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(signal, request_stop as *const () as libc::sighandler_t);
        }
    }
}

/// Whether SIGINT or SIGTERM arrived since [`catch_stop_signals`].
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

pub fn run(args: &[String], impairment: &Impairment) -> Result<()> {
    if !toolchain::is_root() {
        bail!("the balancer attaches XDP programs: run this as root");
    }
    if !args.is_empty() && !impairment.is_none() {
        bail!("--loss, --reorder, --duplicate and --delay impair the demo lab's client link; they do not apply to the agent on real interfaces");
    }
    impairment.validate()?;
    let artifacts = build::all()?;
    if !args.is_empty() {
        return run_agent(&artifacts.balancer, args);
    }
    toolchain::ensure_lab()?;
    catch_stop_signals();
    println!("==> building the namespace lab");
    let mut lab = if impairment.is_none() {
        Lab::new()?
    } else {
        let mut lab = Lab::with_impaired_client_link()?;
        println!("==> impairing the client link: {}", describe(impairment));
        lab.start_impairment(&artifacts.lab_impair, impairment)?;
        lab
    };
    lab.start_backends(&artifacts.lab_backend)?;
    let config = lab.dir().join("balancer.toml");
    std::fs::write(&config, lab.balancer_config_with(&demo_services()))
        .context("writing the demo config")?;
    println!("==> starting the balancer (config: {})", config.display());
    lab.start_balancer(&artifacts.balancer, &config)?;

    let client = lab.client_ns();
    let instance = lab.instance();
    let balancer = artifacts.balancer.display();
    let jar = lab.dir().join("cookies.txt");
    let jar = jar.display();
    println!(
        "\nThe balancer is running: {VIP} port {HTTP_PORT} (web, lb-cookie affinity: the first \
         response of a new session carries the balancer's signed LBSESSION cookie) and port \
         {ECHO_PORT} (echo, TCP and UDP), over three backends; the same on {VIP6} over their \
         IPv6 addresses.\n\
         In another terminal, as root, try:\n\n\
         \x20 ip netns exec {client} curl -i http://{VIP}/\n\
         \x20 # new visitors spread over the backends:\n\
         \x20 for i in $(seq 12); do ip netns exec {client} curl -s http://{VIP}/; done | sort | uniq -c\n\
         \x20 # a visitor with a cookie jar stays on one backend:\n\
         \x20 for i in $(seq 12); do ip netns exec {client} curl -s -b {jar} -c {jar} http://{VIP}/; done | sort | uniq -c\n\
         \x20 ip netns exec {client} python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); s.sendto(b'hello', ('{VIP}', {ECHO_PORT})); print(s.recv(100))\"\n\
         \x20 # the same over IPv6:\n\
         \x20 ip netns exec {client} curl -i http://[{VIP6}]/\n\
         \x20 for i in $(seq 12); do ip netns exec {client} curl -s -b {jar}6 -c {jar}6 http://[{VIP6}]/; done | sort | uniq -c\n\
         \x20 {balancer} status --instance {instance}\n\
         \x20 {balancer} backend drain web backend-1 --instance {instance}\n\n\
         Live stats follow (Ctrl-C stops the demo and removes the lab):\n"
    );
    let followed = follow(&lab, !impairment.is_none());
    println!("\n==> stopping the balancer and removing the lab");
    drop(lab);
    followed
}

/// The lab's services, with the web service on lb-cookie affinity (and its cross-origin
/// variant); requests without a cookie are placed per connection.
fn demo_services() -> ServiceOptions {
    ServiceOptions {
        web_settings: "affinity = \"lb-cookie\"\ncors = true\ncookie_fallback = \"flow\"\n"
            .to_owned(),
        web6_settings: "affinity = \"lb-cookie\"\ncookie_fallback = \"flow\"\n".to_owned(),
        ..ServiceOptions::default()
    }
}

fn describe(impairment: &Impairment) -> String {
    format!(
        "{}% loss, {}% reordered, {}% duplicated, {} ms delay, each way",
        impairment.loss,
        impairment.reorder,
        impairment.duplicate,
        impairment.delay.as_millis()
    )
}

/// One line of what the impairment relay did, per direction.
fn impairment_line(lab: &Lab) -> String {
    let Ok(counters) = lab.impairment_counters() else {
        return "impairment: no counters yet".to_owned();
    };
    let mut line = String::from("impairment:");
    for direction in DIRECTIONS {
        let value = |name: &str| {
            counters
                .get(&format!("{direction}_{name}"))
                .copied()
                .unwrap_or(0)
        };
        line.push_str(&format!(
            " {direction} {} frames, {} dropped, {} reordered, {} duplicated;",
            value("frames"),
            value("dropped"),
            value("reordered"),
            value("duplicated")
        ));
    }
    line
}

/// Prints the agent's log as it grows until Ctrl-C or SIGTERM, and what the impairment
/// relay did every few seconds when there is one; fails if the agent exits.
fn follow(lab: &Lab, impaired: bool) -> Result<()> {
    let mut last_impairment_line = Instant::now();
    let mut log = std::fs::File::open(lab.balancer_log()).context("opening the balancer log")?;
    log.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::new(log);
    let mut line = String::new();
    while !STOP.load(Ordering::SeqCst) {
        if impaired && last_impairment_line.elapsed() >= IMPAIRMENT_REPORT_PERIOD {
            println!("{}", impairment_line(lab));
            last_impairment_line = Instant::now();
        }
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            let running = lab
                .balancer_pid()
                .is_some_and(balancer_lab::process::running);
            if !running {
                bail!("the balancer exited; its log is above");
            }
            thread::sleep(Duration::from_millis(200));
            continue;
        }
        print!("{line}");
    }
    Ok(())
}

/// `balancer run <args>` in the foreground. The agent leads its own process group and this
/// process forwards SIGINT and SIGTERM to it, so Ctrl-C and a `kill` of `cargo xtask run`
/// both reach it exactly once and it detaches its programs before exiting.
fn run_agent(balancer: &Path, args: &[String]) -> Result<()> {
    let mut child = Command::new(balancer)
        .arg("run")
        .args(args)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", balancer.display()))?;
    catch_stop_signals();
    let pid = libc::pid_t::try_from(child.id()).context("the agent's PID does not fit pid_t")?;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the agent")? {
            break status;
        }
        let signal = RECEIVED.swap(0, Ordering::SeqCst);
        if signal != 0 {
            // SAFETY: kill has no memory effects; `pid` is our child, not yet reaped.
            unsafe {
                libc::kill(pid, signal);
            }
        }
        thread::sleep(Duration::from_millis(50));
    };
    if !status.success() {
        bail!("the balancer exited with {status}");
    }
    Ok(())
}
