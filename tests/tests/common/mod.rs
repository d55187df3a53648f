//! What the namespace tests share: a lab with the balancer running, commands that must
//! succeed, the balancer's counters and status, and which backend answers a client.

#![allow(
    dead_code,
    reason = "each test binary uses its own part of the harness"
)]

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use balancer_lab::{Impairment, Lab, ServiceOptions, VIP, VIP6};

pub fn balancer_bin() -> PathBuf {
    std::env::var_os("BALANCER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/balancer"))
}

pub fn backend_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lab-backend"))
}

/// A lab with its backends serving and the balancer attached.
pub fn lab_with_balancer() -> Lab {
    lab_with(&ServiceOptions::default())
}

pub fn drop_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lab-drop"))
}

pub fn relay_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lab-impair"))
}

/// A lab whose `web` service has extra settings.
pub fn lab_with(options: &ServiceOptions) -> Lab {
    require_root();
    serving(Lab::new().expect("building the lab"), "", options)
}

/// [`lab_with`], the client link impaired by the lab's relay.
pub fn lab_with_impairment(options: &ServiceOptions, impairment: &Impairment) -> Lab {
    impaired_lab_with_settings("", options, impairment)
}

/// [`lab_with_impairment`], with `settings` (top-level TOML lines) before the lab's
/// configuration.
pub fn impaired_lab_with_settings(
    settings: &str,
    options: &ServiceOptions,
    impairment: &Impairment,
) -> Lab {
    require_root();
    let mut lab = Lab::with_impaired_client_link().expect("building the lab");
    lab.start_impairment(relay_bin(), impairment)
        .expect("starting the impairment relay");
    serving(lab, settings, options)
}

pub fn require_root() {
    assert!(
        balancer_lab::is_root(),
        "integration tests need root (run `cargo xtask test`)"
    );
}

/// [`lab_with`], with `settings` (top-level TOML lines) before the lab's configuration.
pub fn lab_with_settings(settings: &str, options: &ServiceOptions) -> Lab {
    require_root();
    serving(Lab::new().expect("building the lab"), settings, options)
}

/// Starts the backends and the balancer with `settings` (top-level TOML lines) and `options`
/// for the `web` service.
fn serving(mut lab: Lab, settings: &str, options: &ServiceOptions) -> Lab {
    lab.start_backends(backend_bin())
        .expect("starting the backends");
    let config = config_path(&lab);
    let text = format!("{settings}\n{}", lab.balancer_config_with(options));
    std::fs::write(&config, text).expect("writing the balancer config");
    lab.start_balancer(&balancer_bin(), &config)
        .expect("starting the balancer");
    lab
}

pub fn config_path(lab: &Lab) -> PathBuf {
    lab.dir().join("balancer.toml")
}

/// Runs a command in a namespace of the lab and returns its output; panics unless it succeeds.
pub fn run(lab: &Lab, ns: &str, args: &[&str]) -> String {
    lab.exec_checked(ns, args)
        .unwrap_or_else(|error| panic!("{error:#}"))
}

pub fn python(lab: &Lab, ns: &str, script: &str) -> String {
    run(lab, ns, &["python3", "-c", script])
}

/// `balancer <args> --instance <lab's>`; panics unless it succeeds.
pub fn balancer(lab: &Lab, args: &[&str]) -> String {
    let output = std::process::Command::new(balancer_bin())
        .args(args)
        .args(["--instance", lab.instance()])
        .output()
        .expect("running balancer");
    assert!(
        output.status.success(),
        "balancer {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The balancer's counters as `reason → packets`.
pub fn counters(lab: &Lab) -> HashMap<String, u64> {
    balancer(lab, &["stats"])
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((fields.next()?.to_owned(), fields.next()?.parse().ok()?))
        })
        .collect()
}

/// A count of the `bindings` line of `balancer status`.
pub fn binding_count(lab: &Lab, name: &str) -> u64 {
    let status = balancer(lab, &["status"]);
    status
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {status}"))
}

/// A field of the `workers` line of `balancer status` (`bound_each`, `held_each`): one count
/// per binding worker, in order.
pub fn per_worker(lab: &Lab, field: &str) -> Vec<u64> {
    let status = balancer(lab, &["status"]);
    status
        .lines()
        .find(|l| l.starts_with("workers "))
        .and_then(|line| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(field)?.strip_prefix('='))
        })
        .map(|counts| counts.split(',').map(|n| n.parse().unwrap()).collect())
        .unwrap_or_else(|| panic!("no workers line with {field} in {status}"))
}

/// The agent's binding workers.
pub fn agent_workers(lab: &Lab) -> u32 {
    per_worker(lab, "held_each").len() as u32
}

/// The `balancer status` line of a backend of the `web` service.
pub fn status_of(lab: &Lab, backend: &str) -> String {
    service_status_of(lab, "web", backend)
}

/// The `balancer status` line of `backend` in `service`.
pub fn service_status_of(lab: &Lab, service: &str, backend: &str) -> String {
    let status = balancer(lab, &["status"]);
    let mut in_web = false;
    for line in status.lines() {
        if line.starts_with("service ") {
            in_web = line.starts_with(&format!("service {service} "));
        } else if in_web
            && line
                .trim_start()
                .starts_with(&format!("backend {backend} "))
        {
            return line.trim().to_owned();
        }
    }
    panic!("no status line for {service}/{backend} in:\n{status}");
}

/// Polls until `condition` holds, for at most `limit`; returns how long it took.
pub fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

pub fn sha256_of_file(path: &Path) -> String {
    let output = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

pub fn vip_url(path: &str) -> String {
    format!("http://{VIP}{path}")
}

/// `path` on the IPv6 VIP.
pub fn vip6_url(path: &str) -> String {
    format!("http://[{VIP6}]{path}")
}

/// The body of `GET <path>` through the VIP from the client, on a new connection, with curl's
/// extra `args` (headers, a cookie jar); panics unless the request succeeds.
pub fn get(lab: &Lab, args: &[&str], path: &str) -> String {
    get_at(lab, &vip_url(path), args)
}

/// [`get`] of a whole URL.
pub fn get_at(lab: &Lab, url: &str, args: &[&str]) -> String {
    let mut full = vec!["curl", "-sS", "--fail", "--max-time", "10"];
    full.extend_from_slice(args);
    full.push(url);
    run(lab, lab.client_ns(), &full).trim().to_owned()
}

/// The backends that answered `requests` GETs of `/`, each on a new connection, by curl with
/// cookie jar number `jar` (its cookies kept between the requests, as a browser keeps them).
pub fn jar_answers(lab: &Lab, jar: usize, requests: usize) -> Vec<String> {
    let jar = lab.dir().join(format!("jar-{jar}"));
    let jar = jar.to_str().expect("utf-8 path");
    (0..requests)
        .map(|_| get(lab, &["-c", jar, "-b", jar], "/"))
        .collect()
}

/// The lab's lossy client link: 5% of frames dropped and 5% reordered, each way.
pub fn lossy() -> Impairment {
    Impairment {
        loss: 5.0,
        reorder: 5.0,
        ..Impairment::default()
    }
}

/// Client addresses `198.18.<third>.<1..=count>`, added to the client namespace.
pub fn add_clients(lab: &Lab, third: u8, count: u8) -> Vec<Ipv4Addr> {
    let addrs: Vec<Ipv4Addr> = (1..=count)
        .map(|i| Ipv4Addr::new(198, 18, third, i))
        .collect();
    lab.add_client_addresses(&addrs)
        .expect("adding client addresses");
    addrs
}

/// For each client address, the backends that answered `requests` new connections from it,
/// in order.
pub fn backends_seen(
    lab: &Lab,
    clients: &[Ipv4Addr],
    requests: usize,
) -> HashMap<Ipv4Addr, Vec<String>> {
    let clients: Vec<IpAddr> = clients.iter().map(|&a| a.into()).collect();
    backends_seen_via(lab, IpAddr::from(VIP), &clients, requests)
        .into_iter()
        .filter_map(|(addr, seen)| match addr {
            IpAddr::V4(v4) => Some((v4, seen)),
            IpAddr::V6(_) => None,
        })
        .collect()
}

/// [`backends_seen`] for clients of either family, through `vip` (of their family).
pub fn backends_seen_via(
    lab: &Lab,
    vip: IpAddr,
    clients: &[IpAddr],
    requests: usize,
) -> HashMap<IpAddr, Vec<String>> {
    let list: Vec<String> = clients.iter().map(|a| format!("\"{a}\"")).collect();
    let script = format!(
        r#"
import http.client
for addr in [{list}]:
    seen = []
    for _ in range({requests}):
        c = http.client.HTTPConnection("{vip}", 80, timeout=10, source_address=(addr, 0))
        c.request("GET", "/", headers={{"Connection": "close"}})
        seen.append(c.getresponse().read().decode().strip())
        c.close()
    print(addr, " ".join(seen))
"#,
        list = list.join(", ")
    );
    python(lab, lab.client_ns(), &script)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let addr = words.next()?.parse().ok()?;
            Some((addr, words.map(str::to_owned).collect()))
        })
        .collect()
}

/// The one backend a client was always sent to; panics if it was sent to several.
pub fn sticky_backend(seen: &[String], client: impl std::fmt::Display) -> String {
    let first = seen
        .first()
        .unwrap_or_else(|| panic!("{client} got no answer"));
    assert!(
        seen.iter().all(|b| b == first),
        "{client} was not sticky: {seen:?}"
    );
    first.clone()
}

/// sha256 of each test-data size the integrity runs download.
pub fn expected_digests(sizes: &[u64]) -> HashMap<u64, String> {
    sizes
        .iter()
        .map(|&s| (s, balancer_lab::test_data_sha256(s)))
        .collect()
}

/// Runs `requests` GETs of `/bytes/<size>` and POSTs to `/upload` through the VIP, `count` in
/// all, cycling through `sizes`, on one keep-alive session or a new connection each, every
/// request with `Cookie: <cookie>`; checks every body's sha256. Returns how many responses
/// set the balancer's `LBSESSION` cookie.
pub fn integrity_run(
    lab: &Lab,
    sizes: &[u64],
    count: usize,
    keep_alive: bool,
    cookie: &str,
) -> usize {
    integrity_run_at(lab, &vip_url(""), sizes, count, keep_alive, cookie)
}

/// [`integrity_run`] against the service at `base` (`http://<vip>`).
pub fn integrity_run_at(
    lab: &Lab,
    base: &str,
    sizes: &[u64],
    count: usize,
    keep_alive: bool,
    cookie: &str,
) -> usize {
    let digests = expected_digests(sizes);
    let sizes_list: Vec<String> = sizes.iter().map(u64::to_string).collect();
    let script = format!(
        r#"
import hashlib, os, requests
sizes = [{sizes}]
session = requests.Session()
def issued(r):
    return int("LBSESSION=" in r.headers.get("Set-Cookie", ""))
headers = {{"Cookie": "{cookie}"}} if {keep} else {{"Cookie": "{cookie}", "Connection": "close"}}
for i in range({count}):
    size = sizes[i % len(sizes)]
    if i % 2 == 0:
        r = session.get("{base}/bytes/%d" % size, headers=headers, timeout=60)
        print("get", size, issued(r), hashlib.sha256(r.content).hexdigest(), len(r.content))
    else:
        body = os.urandom(size)
        r = session.post("{base}/upload", data=body, headers=headers, timeout=60)
        print("post", size, issued(r), hashlib.sha256(body).hexdigest(), r.text.strip())
"#,
        sizes = sizes_list.join(", "),
        keep = if keep_alive { "True" } else { "False" },
    );
    let output = python(lab, lab.client_ns(), &script);
    let mut checked = 0;
    let mut issued = 0;
    for line in output.lines() {
        let mut words: Vec<&str> = line.split_whitespace().collect();
        let size: u64 = words[1].parse().expect("a size");
        issued += usize::from(words.remove(2) == "1");
        match words[0] {
            "get" => {
                assert_eq!(
                    words[3],
                    size.to_string(),
                    "download of {size} bytes was cut"
                );
                assert_eq!(
                    words[2], digests[&size],
                    "download of {size} bytes was corrupted"
                );
            }
            _ => assert_eq!(
                &words[3..],
                [words[2], &size.to_string()],
                "upload of {size} bytes arrived different"
            ),
        }
        checked += 1;
    }
    assert_eq!(checked, count, "every request answered:\n{output}");
    issued
}

/// Sizes from 1 KB to 10 MB, spread log-uniformly.
pub const SIZES: [u64; 12] = [
    1_000, 3_000, 9_000, 27_000, 81_000, 243_000, 729_000, 1_500_000, 2_187_000, 4_000_000,
    6_561_000, 10_000_000,
];

/// 30 python `requests` sessions through `url` (an `lb-cookie` service with health checks,
/// named `service`) each stay on one backend; once backend-3 is stopped and marked down, its
/// sessions move with a new cookie and the others keep their backend and cookie.
pub fn sessions_stick_and_move_with_a_new_cookie(lab: &mut Lab, url: &str, service: &str) {
    let script = format!(
        r#"
import requests, sys
sessions = [requests.Session() for _ in range(30)]
for i, s in enumerate(sessions):
    seen = {{s.get("{url}", timeout=10).text.strip() for _ in range(5)}}
    print(i, s.cookies.get("LBSESSION"), " ".join(sorted(seen)))
sys.stdout.write("placed\n"); sys.stdout.flush()
sys.stdin.readline()
for i, s in enumerate(sessions):
    before = s.cookies.get("LBSESSION")
    seen = {{s.get("{url}", timeout=10).text.strip() for _ in range(5)}}
    print(i, int(s.cookies.get("LBSESSION") != before), " ".join(sorted(seen)))
"#,
        url = url
    );
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", lab.client_ns(), "python3", "-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting the python sessions");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut placed = Vec::new();
    loop {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).expect("reading the sessions");
        if line.trim() == "placed" || line.is_empty() {
            break;
        }
        let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        assert_eq!(words.len(), 3, "a session saw several backends: {line}");
        placed.push(words[2].clone());
    }
    assert_eq!(placed.len(), 30, "sessions placed: {placed:?}");
    let victim = Lab::backend_name(2);
    assert!(
        placed.contains(&victim),
        "some of 30 sessions use {victim}: {placed:?}"
    );
    lab.stop_backend(2).expect("stopping backend-3's server");
    wait_until(
        std::time::Duration::from_secs(5),
        "backend-3 marked down",
        || service_status_of(lab, service, &victim).contains("state=down"),
    );
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), b"go\n").expect("writing");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).expect("reading");
    assert!(
        child.wait().expect("waiting").success(),
        "the sessions failed: {rest}"
    );
    let after: Vec<Vec<&str>> = rest
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(after.len(), 30, "{rest}");
    for (session, words) in after.iter().enumerate() {
        assert_eq!(
            words.len(),
            3,
            "session {session} saw several backends after the failure: {words:?}"
        );
        if placed[session] == victim {
            assert_ne!(
                words[2], victim,
                "session {session} still reaches the dead backend"
            );
            assert_eq!(
                words[1], "1",
                "session {session} moved without a new cookie"
            );
        } else {
            assert_eq!(
                words[2], placed[session],
                "session {session} on a healthy backend moved"
            );
            assert_eq!(
                words[1], "0",
                "session {session} got a new cookie without moving"
            );
        }
    }
}

/// `jars` curl cookie jars each GET `url` six times on new connections: the first answer sets
/// the balancer's cookie and every later request follows it (asserted). Returns the backends
/// the jars stuck to.
pub fn lb_cookie_jars_stick(
    lab: &Lab,
    url: &str,
    jars: usize,
) -> std::collections::HashSet<String> {
    let mut backends = std::collections::HashSet::new();
    for jar in 0..jars {
        let path = lab.dir().join(format!("lb-jar-{jar}"));
        let path = path.to_str().expect("utf-8 path");
        let answers: Vec<String> = (0..6)
            .map(|_| get_at(lab, url, &["-c", path, "-b", path]))
            .collect();
        assert!(
            answers.iter().all(|a| *a == answers[0]),
            "jar {jar} moved: {answers:?}"
        );
        backends.insert(answers[0].clone());
    }
    backends
}

/// 900 new connections from the client to `vip` port 80 (either family): every one answered,
/// every backend with at least a fifth of them.
pub fn new_connections_spread(lab: &Lab, vip: IpAddr) {
    let script = format!(
        r#"
import http.client, collections
seen = collections.Counter()
for _ in range(900):
    c = http.client.HTTPConnection("{vip}", 80, timeout=10)
    c.request("GET", "/", headers={{"Connection": "close"}})
    seen[c.getresponse().read().decode().strip()] += 1
    c.close()
for name, n in sorted(seen.items()):
    print(name, n)
"#
    );
    let output = python(lab, lab.client_ns(), &script);
    let counts: HashMap<&str, u32> = output
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(n, c)| (n, c.parse().unwrap_or(0))))
        .collect();
    assert_eq!(counts.values().sum::<u32>(), 900, "answers: {output}");
    for index in 0..balancer_lab::BACKEND_COUNT {
        let name = Lab::backend_name(index);
        let share = counts.get(name.as_str()).copied().unwrap_or(0);
        assert!(
            share >= 180,
            "{name} got {share} of 900 connections (< 20%): {output}"
        );
    }
}

/// 100 MB down from `base` (`http://<vip>`) with curl, sha256-identical to what the backend
/// serves.
pub fn download_of_100_mb_is_intact(lab: &Lab, base: &str) {
    let size = 100_000_000u64;
    let local = lab.dir().join("expected.bin");
    let remote = lab.dir().join("downloaded.bin");
    balancer_lab::write_test_data(&local, size).expect("generating the expected bytes");
    let url = format!("{base}/bytes/{size}");
    let output = remote.to_str().expect("utf-8 path");
    let args = [
        "curl",
        "-sS",
        "--fail",
        "--max-time",
        "120",
        "-o",
        output,
        &url,
    ];
    run(lab, lab.client_ns(), &args);
    assert_eq!(
        std::fs::metadata(&remote).map(|m| m.len()).unwrap_or(0),
        size
    );
    assert_eq!(
        sha256_of_file(&remote),
        sha256_of_file(&local),
        "downloaded bytes differ"
    );
}

/// 100 MB up to `base` with curl: the backend reports the sha256 of what it received.
pub fn upload_of_100_mb_is_intact(lab: &Lab, base: &str) {
    let size = 100_000_000u64;
    let local = lab.dir().join("upload.bin");
    balancer_lab::write_test_data(&local, size).expect("generating the upload");
    let (body, url) = (format!("@{}", local.display()), format!("{base}/upload"));
    let args = [
        "curl",
        "-sS",
        "--fail",
        "--max-time",
        "120",
        "-H",
        "Expect:",
        "--data-binary",
        &body,
        &url,
    ];
    let answer = run(lab, lab.client_ns(), &args);
    let expected = format!("{} {size}", sha256_of_file(&local));
    assert_eq!(
        answer.trim(),
        expected,
        "the backend received different bytes"
    );
}

/// 20 datagrams to `vip` port 7 (either family), each echoed intact from the VIP.
pub fn udp_echo_through(lab: &Lab, vip: IpAddr) {
    udp_echo_through_port(lab, vip, 7);
}

/// [`udp_echo_through`] on another port of the VIP.
pub fn udp_echo_through_port(lab: &Lab, vip: IpAddr, port: u16) {
    let family = if vip.is_ipv4() { "AF_INET" } else { "AF_INET6" };
    let script = format!(
        r#"
import socket
s = socket.socket(socket.{family}, socket.SOCK_DGRAM)
s.settimeout(2)
ok = 0
for i in range(20):
    msg = ("datagram %d " % i).encode() * 40
    s.sendto(msg, ("{vip}", {port}))
    try:
        data, peer = s.recvfrom(4096)
    except socket.timeout:
        continue
    assert peer[:2] == ("{vip}", {port}), peer
    assert data == msg, data
    ok += 1
print(ok)
"#
    );
    let answered: u32 = python(lab, lab.client_ns(), &script)
        .trim()
        .parse()
        .unwrap_or(0);
    assert_eq!(answered, 20, "datagrams echoed through {vip}");
}

/// The lab's relay impaired the client link as [`lossy`] says, each way, over enough frames
/// to judge: about 5% dropped, more than 3% reordered, nothing it did not plan.
pub fn assert_relay_was_lossy(lab: &Lab) {
    let relay = lab
        .impairment_counters()
        .expect("reading the relay's counters");
    for direction in balancer_lab::impair::DIRECTIONS {
        let frames = relay[&format!("{direction}_frames")] as f64;
        let dropped = relay[&format!("{direction}_dropped")] as f64;
        assert!(
            frames > 10_000.0,
            "{direction}: too few frames to judge: {relay:?}"
        );
        assert!(
            (0.04..0.06).contains(&(dropped / frames)),
            "{direction}: not about 5% dropped: {relay:?}"
        );
        assert!(
            relay[&format!("{direction}_reordered")] as f64 > 0.03 * frames,
            "{direction}: too few frames reordered: {relay:?}"
        );
        for unplanned in ["oversized", "send_errors"] {
            assert_eq!(relay[&format!("{direction}_{unplanned}")], 0, "{relay:?}");
        }
    }
}
