//! What a cookie session gets when its backend fails its health checks, by the service's
//! `on_backend_down`: `failover` moves it (and with `return_home` it goes back once the
//! backend recovers), `keep` and `reject` answer its requests 503 with `Retry-After` while
//! the backend is down and let it return to it. Python sessions on an lb-cookie service with
//! HTTP checks; backend-1 is stopped and started again. Needs root.

mod common;

use std::time::Duration;

use balancer_lab::{Lab, ServiceOptions, VIP};
use common::*;

const CHECKS: &str =
    "[service.health_check]\nkind = \"http\"\ninterval = 0.5\ntimeout = 0.5\nfall = 2\nrise = 2\n";

fn lab_with_policy(policy: &str) -> Lab {
    lab_with(&ServiceOptions {
        web_settings: format!("affinity = \"lb-cookie\"\n{policy}\n{CHECKS}"),
        ..ServiceOptions::default()
    })
}

/// `new N` opens N sessions; `replay COOKIE...` sends each cookie once more. One line an
/// answer: `status backend-or-dash cookie-or-dash retry-after-or-dash`, the cookie being the
/// one the answer set, if any.
const SESSIONS: &str = r#"
import http.client, sys
vip, mode = sys.argv[1], sys.argv[2]
def get(cookie):
    c = http.client.HTTPConnection(vip, 80, timeout=10)
    headers = {"Connection": "close"}
    if cookie:
        headers["Cookie"] = "LBSESSION=" + cookie
    c.request("GET", "/", headers=headers)
    r = c.getresponse()
    r.read()
    ours = [v for n, v in r.getheaders() if n.lower() == "set-cookie" and v.startswith("LBSESSION=")]
    fresh = ours[0].split(";")[0].split("=", 1)[1] if ours else "-"
    print(r.status, r.getheader("x-backend") or "-", fresh, r.getheader("Retry-After") or "-")
    c.close()
if mode == "new":
    for _ in range(int(sys.argv[3])):
        get(None)
else:
    for cookie in sys.argv[3:]:
        get(cookie)
"#;

/// One answer of [`SESSIONS`].
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    backend: String,
    set_cookie: Option<String>,
    retry_after: Option<u32>,
}

fn answers(lab: &Lab, args: &[&str]) -> Vec<Answer> {
    let vip = VIP.to_string();
    let mut argv = vec!["python3", "-c", SESSIONS, &vip];
    argv.extend_from_slice(args);
    let dash = |s: &str| (s != "-").then(|| s.to_owned());
    run(lab, lab.client_ns(), &argv)
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            Answer {
                status: f[0].parse().expect("a status"),
                backend: f[1].to_owned(),
                set_cookie: dash(f[2]),
                retry_after: dash(f[3]).map(|s| s.parse().expect("seconds")),
            }
        })
        .collect()
}

/// 30 new sessions; the cookies of those on backend-1.
fn sessions_on_backend_1(lab: &Lab) -> Vec<String> {
    let new = answers(lab, &["new", "30"]);
    assert!(
        new.iter()
            .all(|a| a.status == 200 && a.set_cookie.is_some()),
        "{new:?}"
    );
    let on_first: Vec<String> = new
        .iter()
        .filter(|a| a.backend == Lab::backend_name(0))
        .filter_map(|a| a.set_cookie.clone())
        .collect();
    assert!(
        !on_first.is_empty(),
        "no session on backend-1 of 30: {new:?}"
    );
    on_first
}

fn replay(lab: &Lab, cookies: &[String]) -> Vec<Answer> {
    let mut args = vec!["replay"];
    args.extend(cookies.iter().map(String::as_str));
    let replayed = answers(lab, &args);
    assert_eq!(replayed.len(), cookies.len());
    replayed
}

fn backend_1_down(lab: &mut Lab) {
    lab.stop_backend(0).expect("stopping backend-1");
    wait_until(
        Duration::from_secs(10),
        "backend-1 failing its checks",
        || service_status_of(lab, "web", "backend-1").contains("health=failing"),
    );
}

fn backend_1_back(lab: &mut Lab) {
    lab.start_backend(backend_bin(), 0)
        .expect("starting backend-1 again");
    wait_until(
        Duration::from_secs(10),
        "backend-1 passing its checks",
        || service_status_of(lab, "web", "backend-1").contains("health=ok"),
    );
}

/// While backend-1 is down, its sessions' requests are answered 503 with `Retry-After` (the
/// checks' interval times rise: 1 s) and new sessions go elsewhere; once it is back, the
/// same cookies reach it again.
fn sessions_are_held_for_backend_1(lab: &mut Lab) {
    let cookies = sessions_on_backend_1(lab);
    backend_1_down(lab);
    for answer in replay(lab, &cookies) {
        assert_eq!(
            (answer.status, answer.retry_after),
            (503, Some(1)),
            "{answer:?}"
        );
        assert!(answer.set_cookie.is_none(), "{answer:?}");
    }
    let new = answers(lab, &["new", "20"]);
    assert!(
        new.iter()
            .all(|a| a.status == 200 && a.backend != Lab::backend_name(0)),
        "new sessions avoid the failed backend: {new:?}"
    );
    backend_1_back(lab);
    for answer in replay(lab, &cookies) {
        assert_eq!(
            (answer.status, answer.backend.as_str()),
            (200, "backend-1"),
            "{answer:?}"
        );
    }
    assert_eq!(counters(lab)["backend_down"] as usize, cookies.len());
}

#[test]
fn keep_holds_a_session_for_its_failed_backend_and_it_returns_there() {
    let mut lab = lab_with_policy("on_backend_down = \"keep\"\nkeep_timeout = 120");
    let status = balancer(&lab, &["status"]);
    assert!(
        status.contains("on_backend_down=keep keep_timeout=120s"),
        "{status}"
    );
    sessions_are_held_for_backend_1(&mut lab);
}

#[test]
fn reject_answers_503_with_retry_after_until_the_backend_returns() {
    let mut lab = lab_with_policy("on_backend_down = \"reject\"");
    sessions_are_held_for_backend_1(&mut lab);
}

#[test]
fn keep_moves_a_session_once_its_keep_timeout_passes() {
    let mut lab = lab_with_policy("on_backend_down = \"keep\"\nkeep_timeout = 3");
    let cookies = sessions_on_backend_1(&lab);
    backend_1_down(&mut lab);
    assert_eq!(replay(&lab, &cookies[..1])[0].status, 503);
    let mut moved = None;
    wait_until(
        Duration::from_secs(15),
        "the session moved after keep_timeout",
        || {
            let answer = replay(&lab, &cookies[..1]).remove(0);
            let done = answer.status == 200;
            moved = Some(answer);
            done
        },
    );
    let moved = moved.expect("an answer");
    assert_ne!(moved.backend, Lab::backend_name(0));
    assert!(
        moved.set_cookie.is_some(),
        "a new cookie for the new backend: {moved:?}"
    );
}

/// Failover: while backend-1 is down its sessions are served elsewhere; once it is back,
/// `return_home` sends them home (their cookie never changed), and without it they stay
/// where their new cookie says.
fn failover_and_recovery(lab: &mut Lab, return_home: bool) {
    let cookies = sessions_on_backend_1(lab);
    backend_1_down(lab);
    let away = replay(lab, &cookies);
    // The cookies a browser holds now: the new ones where the answers set one.
    let latest: Vec<String> = cookies
        .iter()
        .zip(&away)
        .map(|(cookie, answer)| answer.set_cookie.clone().unwrap_or_else(|| cookie.clone()))
        .collect();
    let again = replay(lab, &latest);
    for (first, second) in away.iter().zip(&again) {
        assert_eq!(first.status, 200, "{first:?}");
        assert_ne!(first.backend, Lab::backend_name(0), "{first:?}");
        assert_eq!(
            first.backend, second.backend,
            "served by one backend meanwhile"
        );
        assert_eq!(
            first.set_cookie.is_none(),
            return_home,
            "a new cookie only without return_home: {first:?}"
        );
    }
    backend_1_back(lab);
    for (answer, before) in replay(lab, &latest).iter().zip(&away) {
        let expected = if return_home {
            Lab::backend_name(0)
        } else {
            before.backend.clone()
        };
        assert_eq!(
            (answer.status, &answer.backend),
            (200, &expected),
            "{answer:?}"
        );
    }
}

#[test]
fn with_return_home_failed_over_sessions_go_back_when_their_backend_recovers() {
    let mut lab = lab_with_policy("return_home = true");
    failover_and_recovery(&mut lab, true);
}

#[test]
fn without_return_home_failed_over_sessions_stay_where_they_moved() {
    let mut lab = lab_with_policy("");
    failover_and_recovery(&mut lab, false);
}

/// The lab's `web` as a `source-ip` service with `policy`; the index of the backend the
/// client's session is on.
fn source_ip_lab(policy: &str) -> (Lab, usize) {
    let lab = lab_with(&ServiceOptions {
        web_settings: format!("affinity = \"source-ip\"\n{policy}\n{CHECKS}"),
        ..ServiceOptions::default()
    });
    let home = get(&lab, &[], "/");
    let index = (0..balancer_lab::BACKEND_COUNT)
        .find(|&i| Lab::backend_name(i) == home)
        .expect("a lab backend answered");
    (lab, index)
}

fn backend_down(lab: &mut Lab, index: usize) {
    lab.stop_backend(index).expect("stopping the backend");
    wait_until(
        Duration::from_secs(10),
        "the backend failing its checks",
        || service_status_of(lab, "web", &Lab::backend_name(index)).contains("health=failing"),
    );
}

fn backend_back(lab: &mut Lab, index: usize) {
    lab.start_backend(backend_bin(), index)
        .expect("starting the backend again");
    wait_until(
        Duration::from_secs(10),
        "the backend passing its checks",
        || service_status_of(lab, "web", &Lab::backend_name(index)).contains("health=ok"),
    );
}

/// A new connection from the client: the backend that answered, or None when it was refused.
fn try_get(lab: &Lab) -> Option<String> {
    let output = lab
        .exec(
            lab.client_ns(),
            &["curl", "-sS", "--max-time", "5", &vip_url("/")],
        )
        .expect("running curl");
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        return Some(String::from_utf8_lossy(&output.stdout).trim().to_owned());
    }
    // curl's 7: the connection was refused (the SYN answered with a reset), not timed out.
    assert_eq!(
        output.status.code(),
        Some(7),
        "refused with a reset, not {stderr}"
    );
    None
}

fn counter(lab: &Lab, name: &str) -> u64 {
    counters(lab).get(name).copied().unwrap_or(0)
}

#[test]
fn a_source_ip_session_held_by_reject_is_refused_by_xdp_until_its_backend_returns() {
    let (mut lab, home) = source_ip_lab("on_backend_down = \"reject\"");
    backend_down(&mut lab, home);
    let before = counter(&lab, "refused_backend_held");
    for _ in 0..3 {
        assert_eq!(try_get(&lab), None, "a held session's connection");
    }
    assert_eq!(counter(&lab, "refused_backend_held") - before, 3);
    backend_back(&mut lab, home);
    assert_eq!(try_get(&lab), Some(Lab::backend_name(home)));
}

#[test]
fn a_source_ip_session_kept_for_keep_timeout_then_moves() {
    let (mut lab, home) = source_ip_lab("on_backend_down = \"keep\"\nkeep_timeout = 3");
    backend_down(&mut lab, home);
    assert_eq!(try_get(&lab), None, "held while keep_timeout runs");
    let mut moved = None;
    wait_until(
        Duration::from_secs(15),
        "the session moved after keep_timeout",
        || {
            moved = try_get(&lab);
            moved.is_some()
        },
    );
    let moved = moved.expect("answered");
    assert_ne!(moved, Lab::backend_name(home));
    // It moved for good: back or not, its backend is the new one.
    backend_back(&mut lab, home);
    assert_eq!(try_get(&lab), Some(moved));
}

#[test]
fn a_source_ip_session_with_return_home_is_served_elsewhere_and_goes_back() {
    let (mut lab, home) = source_ip_lab("return_home = true");
    backend_down(&mut lab, home);
    let away: Vec<Option<String>> = (0..5).map(|_| try_get(&lab)).collect();
    assert!(
        away.iter().all(|b| b.is_some() && *b == away[0]),
        "one backend meanwhile: {away:?}"
    );
    assert_ne!(away[0], Some(Lab::backend_name(home)));
    backend_back(&mut lab, home);
    assert_eq!(try_get(&lab), Some(Lab::backend_name(home)), "back home");
}
