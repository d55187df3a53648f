//! The lab itself, without a balancer: the balancer host routes like any router, the backends
//! serve, and labs are removed after use, also when their owner was killed. Needs root.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use balancer_lab::{netns, test_data_sha256, Lab, BACKEND_COUNT, ECHO_PORT};

const BACKEND_BIN: &str = env!("CARGO_BIN_EXE_lab-backend");

/// Set in the environment of the helper process that holds a lab until it is killed.
const HOLD_ENV: &str = "BALANCER_LAB_HOLD";

fn require_root() {
    assert!(
        balancer_lab::is_root(),
        "integration tests need root (run them as root, e.g. through `cargo xtask test`)"
    );
}

fn namespaces_of(name: &str) -> Vec<String> {
    netns::list(&format!("{name}-"))
}

#[test]
fn balancer_host_routes_client_to_each_backend() {
    require_root();
    let mut lab = Lab::new().expect("building the lab");
    let name = lab.name().to_owned();
    assert_eq!(namespaces_of(&name).len(), 3 + BACKEND_COUNT);
    lab.start_backends(Path::new(BACKEND_BIN))
        .expect("starting the backends");
    let client = lab.client_ns().to_owned();

    for index in 0..BACKEND_COUNT {
        let url = format!("http://{}/", Lab::backend_addr(index));
        let answer = lab
            .curl(&client, &["-f", "-i", &url])
            .expect("asking a backend directly");
        let backend = Lab::backend_name(index);
        assert!(
            answer.ends_with(&format!("\r\n\r\n{backend}\n")),
            "{url} answered:\n{answer}"
        );
        assert!(
            answer
                .to_ascii_lowercase()
                .contains(&format!("x-backend: {backend}\r\n")),
            "{url} answered without X-Backend: {backend}:\n{answer}"
        );
    }

    // Two requests, one connection: keep-alive works.
    let url = format!("http://{}/", Lab::backend_addr(1));
    let connects = lab
        .curl(
            &client,
            &[
                "-f",
                "-o",
                "/dev/null",
                "-o",
                "/dev/null",
                "-w",
                "%{num_connects} ",
                &url,
                &url,
            ],
        )
        .expect("two requests on one connection");
    assert_eq!(connects.trim(), "1 0", "new connections per request");

    // 10 MB streamed through the router, checked against the generator and the CLI.
    let size: u64 = 10 * 1024 * 1024;
    let download = lab.dir().join("download");
    let url = format!("http://{}/bytes/{size}", Lab::backend_addr(2));
    lab.curl(&client, &["-f", "-o", download.to_str().unwrap(), &url])
        .expect("downloading 10 MB");
    let expected = test_data_sha256(size);
    assert_eq!(sha256sum(&download), expected, "sha256 of {url}");
    let generated = Command::new("sh")
        .args([
            "-c",
            &format!("{BACKEND_BIN} --generate {size} | sha256sum"),
        ])
        .output()
        .expect("running lab-backend --generate");
    assert!(
        String::from_utf8_lossy(&generated.stdout).starts_with(&expected),
        "lab-backend --generate {size} differs from the generator"
    );

    // The same bytes back up: the backend hashes the streamed body.
    let url = format!("http://{}/upload", Lab::backend_addr(0));
    let upload = format!("@{}", download.display());
    let answer = lab
        .curl(&client, &["-f", "--data-binary", &upload, &url])
        .expect("uploading 10 MB");
    assert_eq!(answer, format!("{expected} {size}\n"));

    // TCP and UDP echo.
    let script = format!(
        r#"
import socket
addr = ("{addr}", {ECHO_PORT})
t = socket.create_connection(addr, timeout=5)
t.sendall(b"tcp echo")
t.shutdown(socket.SHUT_WR)
got = b""
while True:
    chunk = t.recv(100)
    if not chunk:
        break
    got += chunk
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(b"udp echo", addr)
print(got.decode(), u.recv(100).decode(), sep="|")
"#,
        addr = Lab::backend_addr(2)
    );
    let echoed = lab
        .exec_checked(&client, &["python3", "-c", &script])
        .expect("echo over TCP and UDP");
    assert_eq!(echoed.trim(), "tcp echo|udp echo");

    let dir = lab.dir().to_owned();
    drop(lab);
    assert_eq!(
        namespaces_of(&name),
        Vec::<String>::new(),
        "namespaces left"
    );
    assert!(!dir.exists(), "{} left", dir.display());
}

#[test]
fn lab_of_a_killed_owner_is_removed_by_the_next_lab() {
    require_root();
    let mut holder = Holder::start();
    let (name, pids) = holder.wait_for_lab();
    assert_eq!(namespaces_of(&name).len(), 3 + BACKEND_COUNT);
    holder.kill();
    assert!(
        pids.iter().all(|&pid| balancer_lab::process::running(pid)),
        "the backends outlive their killed owner until reaped"
    );

    let lab = Lab::new().expect("building a lab after the owner died");
    assert_eq!(
        namespaces_of(&name),
        Vec::<String>::new(),
        "the dead owner's namespaces"
    );
    let left: Vec<u32> = pids
        .into_iter()
        .filter(|&pid| balancer_lab::process::running(pid))
        .collect();
    assert!(
        left.is_empty(),
        "the dead owner's processes {left:?} still run"
    );
    assert!(!std::env::temp_dir().join(&name).exists());
    assert_eq!(namespaces_of(lab.name()).len(), 3 + BACKEND_COUNT);
}

/// Not a test: the process that [`lab_of_a_killed_owner_is_removed_by_the_next_lab`] starts
/// and kills. It builds a lab, prints its name and PIDs, and waits (bounded) to be killed.
#[test]
#[ignore = "helper process, started by lab_of_a_killed_owner_is_removed_by_the_next_lab"]
fn hold_a_lab_until_killed() {
    if std::env::var_os(HOLD_ENV).is_none() {
        return;
    }
    let mut lab = Lab::new().expect("building the lab");
    lab.start_backends(Path::new(BACKEND_BIN))
        .expect("starting the backends");
    let pids: Vec<String> = lab.pids().iter().map(u32::to_string).collect();
    println!("holding {} {}", lab.name(), pids.join(","));
    thread::sleep(Duration::from_secs(60));
}

/// The helper process; killed on drop if the test fails first, and its lab then reaped.
struct Holder {
    child: Option<Child>,
}

impl Holder {
    fn start() -> Holder {
        let child = Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                "hold_a_lab_until_killed",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env(HOLD_ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the helper process");
        Holder { child: Some(child) }
    }

    /// The lab's name and its processes' PIDs, once the helper has built it.
    fn wait_for_lab(&mut self) -> (String, Vec<u32>) {
        let stdout = self
            .child
            .as_mut()
            .and_then(|c| c.stdout.take())
            .expect("the helper's stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("holding ") {
                    let _ = tx.send(rest.to_owned());
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the helper did not build its lab within 60 s");
        let (name, pids) = line.split_once(' ').expect("name and PIDs");
        let pids = pids.split(',').map(|p| p.parse().expect("a PID")).collect();
        (name.to_owned(), pids)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.kill();
            balancer_lab::reap_stale_labs();
        }
    }
}

fn sha256sum(path: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("running sha256sum");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}
