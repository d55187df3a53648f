//! Cookies the balancer issues: `Set-Cookie` added to the first response head of a
//! connection whose session is new or moved (by XDP behind the status line when it can, by
//! the agent otherwise), and XDP splices the rest with the added bytes as a second sequence
//! offset. Real clients (curl cookie jars, python `requests`) through
//! the namespace lab. Needs root.

mod common;

use std::collections::{HashMap, HashSet};

use balancer_lab::{Lab, ServiceOptions, BACKEND_COUNT};
use common::*;

const HEALTH_CHECK: &str =
    "[service.health_check]\nkind = \"http\"\ninterval = 0.5\ntimeout = 0.5\nfall = 2\nrise = 2\n";

const COMPANION: &str =
    "affinity = \"app-cookie\"\ncookie = \"SID\"\napp_cookie = \"companion\"\ncookie_fallback = \"flow\"\n";

fn lb_cookie(extra: &str) -> ServiceOptions {
    ServiceOptions {
        web_settings: format!(
            "affinity = \"lb-cookie\"\ncookie_fallback = \"flow\"\ncookie_duration = 3600\n{extra}"
        ),
        ..ServiceOptions::default()
    }
}

/// `curl -i`-style head and body of `GET <path>` on a new connection.
fn get_with_head(lab: &Lab, args: &[&str], path: &str) -> (String, String) {
    let mut full = vec!["-D", "-"];
    full.extend_from_slice(args);
    let answer = get(lab, &full, path);
    // With `-o`, the head alone (its blank line trimmed away).
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (head.to_owned(), body.trim().to_owned())
}

/// The `Set-Cookie` lines of a response head (any case), as `name → value and attributes`.
fn set_cookies(head: &str) -> HashMap<String, String> {
    head.lines()
        .filter_map(|line| line.split_once(": "))
        .filter(|(name, _)| name.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, line)| line)
        .filter_map(|line| Some((line.split_once('=')?.0.to_owned(), line.to_owned())))
        .collect()
}

/// `name=value` of a `Set-Cookie` line.
fn pair(line: &str) -> &str {
    line.split(';').next().unwrap_or_default()
}

#[test]
fn the_first_response_carries_the_cookie_and_its_cors_variant_and_sessions_stick() {
    let lab = lab_with(&lb_cookie("cors = true\n"));
    let (head, backend) = get_with_head(&lab, &[], "/");
    let cookies = set_cookies(&head);
    let own = &cookies["LBSESSION"];
    assert!(
        own.ends_with("; Max-Age=3600; Path=/; HttpOnly"),
        "attributes of {own:?}"
    );
    let cors = &cookies["LBSESSIONCORS"];
    assert!(
        cors.ends_with("; Max-Age=3600; Path=/; HttpOnly; SameSite=None; Secure"),
        "attributes of {cors:?}"
    );
    assert_eq!(
        pair(own).split_once('=').unwrap().1,
        pair(cors).split_once('=').unwrap().1,
        "both cookies name the same session"
    );
    assert!(
        cookies.contains_key("SID"),
        "the application's own cookie is kept: {head}"
    );
    for cookie in [pair(own), pair(cors)] {
        for _ in 0..5 {
            let (head, again) = get_with_head(&lab, &["-H", &format!("Cookie: {cookie}")], "/");
            assert_eq!(
                again, backend,
                "{cookie} must keep the session on {backend}"
            );
            assert!(
                !set_cookies(&head).contains_key("LBSESSION"),
                "a valid cookie is not issued again: {head}"
            );
        }
    }

    // curl cookie jars: every request of a jar, the first included, on one backend.
    let mut jar_backends = HashSet::new();
    for session in 0..10 {
        let answers = jar_answers(&lab, session, 6);
        assert!(
            answers.iter().all(|b| *b == answers[0]),
            "jar {session} moved: {answers:?}"
        );
        jar_backends.insert(answers[0].clone());
    }
    assert!(jar_backends.len() > 1, "10 jars on one backend");

    sessions_stick_and_spread(&lab, "LBSESSION");
    let issued = binding_count(&lab, "issued");
    assert!(issued >= 111, "status counts the issued cookies: {issued}");
}

/// New sessions pass the agent by once it has started one on their backend: XDP binds a
/// request without the cookie to the backend the cookie fallback names and puts the lines the
/// agent last issued there behind the status line of the backend's first segment. Of 50 new
/// sessions' first connections and 50 returning ones, the agent reads the new sessions it
/// starts itself (until XDP has lines for their backend, and again when those are due) and
/// the returning connections whose cookie is not the one it last bound the client by (a
/// cookie names its backend and expiry second alone); XDP binds the rest, and answers every
/// SYN-ACK but a backend's first with the replay. A first segment with no room for the lines
/// goes to the agent, which takes the connection XDP started up from the maps and puts them
/// in.
#[test]
fn new_sessions_are_started_by_xdp_and_their_responses_pass_the_agent_by() {
    let lab = lab_with(&lb_cookie(""));
    let (before, issued_before) = (counters(&lab), binding_count(&lab, "issued"));
    let began = std::time::Instant::now();
    let mut backends = HashSet::new();
    let (mut last_bound, mut returning_by_xdp) = (None, 0);
    for _ in 0..50 {
        let (head, backend) = get_with_head(&lab, &[], "/");
        let own = &set_cookies(&head)["LBSESSION"];
        assert!(
            own.ends_with("; Max-Age=3600; Path=/; HttpOnly"),
            "attributes of {own:?}"
        );
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        let (_, again) = get_with_head(&lab, &["-H", &format!("Cookie: {}", pair(own))], "/");
        assert_eq!(again, backend, "{own} must keep the session on {backend}");
        if last_bound.as_deref() == Some(pair(own)) {
            returning_by_xdp += 1;
        } else {
            last_bound = Some(pair(own).to_owned());
        }
        backends.insert(backend);
    }
    let elapsed_s = began.elapsed().as_secs();
    let after = counters(&lab);
    let delta = |name: &str| after[name] - before[name];
    assert_eq!(
        delta("cookie_inserted"),
        50,
        "XDP put each new session's cookie in"
    );
    // XDP tells the agent that the client has the lines only of the sessions it started.
    let started_by_agent = delta("head_delivered");
    let started_by_xdp = 50 - started_by_agent;
    // The first SYN-ACK from each backend goes to the agent, which learns the backend's
    // window scale from it (the splice needs it before XDP may replay).
    let first_contacts = backends.len() as u64;
    assert_eq!(
        (
            delta("punted"),
            delta("bound_by_xdp"),
            delta("replayed_by_xdp")
        ),
        (
            100 - returning_by_xdp - started_by_xdp + first_contacts,
            returning_by_xdp + started_by_xdp,
            100 - first_contacts
        ),
        "the agent got the requests XDP did not bind, XDP answered the SYN-ACKs with the replay, and no response went to the agent"
    );
    // Per backend and worker: the session whose SYN-ACK shows XDP can record the backend's,
    // the one that leaves XDP the lines, one each time those are due (10 s).
    let most_by_agent = first_contacts * u64::from(agent_workers(&lab)) * (2 + elapsed_s / 10 + 1);
    assert!(
        started_by_agent <= most_by_agent,
        "the agent started {started_by_agent} of 50 sessions on {first_contacts} backends in {elapsed_s} s"
    );
    assert_eq!(
        binding_count(&lab, "issued") - issued_before,
        50,
        "status counts the cookies XDP issued"
    );
    assert!(backends.len() > 1, "50 sessions on one backend");

    // 100 KB bodies: the first segment is full, and the agent puts the lines in.
    let mut taken_up = 0;
    for _ in 0..10 {
        let before = counters(&lab);
        let out = lab.dir().join("body");
        let out = out.to_str().expect("utf-8 path");
        let (head, _) = get_with_head(&lab, &["-o", out], "/bytes/100000");
        let after = counters(&lab);
        assert_eq!(
            sha256_of_file(std::path::Path::new(out)),
            balancer_lab::test_data_sha256(100_000),
            "the body after the edited head"
        );
        let own = &set_cookies(&head)["LBSESSION"];
        assert_eq!(
            after["cookie_inserted"] - before["cookie_inserted"],
            0,
            "no room for the lines in XDP"
        );
        if after["bound_by_xdp"] - before["bound_by_xdp"] == 1 {
            taken_up += 1;
            let backend = head
                .lines()
                .find_map(|l| l.strip_prefix("x-backend: "))
                .unwrap_or_else(|| panic!("no backend named in {head}"));
            let (_, again) = get_with_head(&lab, &["-H", &format!("Cookie: {}", pair(own))], "/");
            assert_eq!(again, backend, "{own} must keep the session on {backend}");
        }
    }
    assert!(
        taken_up > 0,
        "XDP started none of 10 sessions with 100 KB bodies"
    );
}

/// 100 python `requests` sessions of 20 requests, each on a new connection: every session's
/// requests reach one backend, its first response alone sets the balancer's cookie `name`,
/// and the sessions spread over the backends.
fn sessions_stick_and_spread(lab: &Lab, name: &str) {
    let script = format!(
        r#"
import requests
for i in range(100):
    s = requests.Session()
    seen, issued = [], 0
    for _ in range(20):
        r = s.get("{url}", headers={{"Connection": "close"}}, timeout=10)
        seen.append(r.text.strip())
        issued += "{name}=" in r.headers.get("Set-Cookie", "")
    print(i, issued, " ".join(sorted(set(seen))))
"#,
        url = vip_url("/")
    );
    let output = python(lab, lab.client_ns(), &script);
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    for line in output.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            words.len(),
            3,
            "session {} saw several backends: {line}",
            words[0]
        );
        assert_eq!(
            words[1], "1",
            "session {}: {name} is issued once: {line}",
            words[0]
        );
        *per_backend.entry(words[2].to_owned()).or_default() += 1;
    }
    assert_eq!(per_backend.values().sum::<usize>(), 100, "{output}");
    assert_eq!(per_backend.len(), BACKEND_COUNT, "{per_backend:?}");
    assert!(
        per_backend.values().all(|&n| n >= 15),
        "sessions spread over the backends: {per_backend:?}"
    );
}

#[test]
fn a_failed_backends_sessions_get_a_new_cookie_and_stay_when_it_returns() {
    failover_reissues(&lb_cookie(HEALTH_CHECK), "LBSESSION");
}

/// Sessions on a backend that fails are moved and given a new cookie `name` naming their
/// new backend; when the old one returns, no session goes back. Each session sends every
/// cookie its responses set, as a browser would.
fn failover_reissues(options: &ServiceOptions, name: &str) {
    let mut lab = lab_with(options);
    let header = |jar: &HashMap<String, String>| {
        let pairs: Vec<&str> = jar.values().map(|line| pair(line)).collect();
        format!("Cookie: {}", pairs.join("; "))
    };
    let mut sessions: Vec<(HashMap<String, String>, String)> = Vec::new();
    while sessions.len() < 30 {
        let (head, backend) = get_with_head(&lab, &[], "/");
        let jar = set_cookies(&head);
        assert!(jar.contains_key(name), "no {name} in {head}");
        sessions.push((jar, backend));
    }
    let victim = Lab::backend_name(2);
    assert!(
        sessions.iter().any(|(_, b)| *b == victim),
        "some of 30 sessions use {victim}"
    );
    lab.stop_backend(2).expect("stopping backend-3's server");
    wait_until(
        std::time::Duration::from_secs(5),
        "backend-3 marked down",
        || status_of(&lab, &victim).contains("state=down"),
    );
    for (jar, backend) in sessions.iter_mut().filter(|(_, b)| *b == victim) {
        let (head, now) = get_with_head(&lab, &["-H", &header(jar)], "/");
        assert_ne!(now, victim, "{jar:?} still goes to the dead backend");
        let reissued = set_cookies(&head)
            .remove(name)
            .unwrap_or_else(|| panic!("no new {name} for a moved session: {head}"));
        assert_ne!(pair(&reissued), pair(&jar[name]));
        jar.insert(name.to_owned(), reissued);
        *backend = now;
    }
    lab.start_backend(backend_bin(), 2)
        .expect("restarting backend-3's server");
    wait_until(
        std::time::Duration::from_secs(5),
        "backend-3 up again",
        || status_of(&lab, &victim).contains("state=up"),
    );
    for (jar, backend) in &sessions {
        for _ in 0..3 {
            let (head, now) = get_with_head(&lab, &["-H", &header(jar)], "/");
            assert_eq!(
                &now, backend,
                "{jar:?} moved after the old backend returned"
            );
            assert!(set_cookies(&head).is_empty(), "nothing set again: {head}");
        }
    }
}

#[test]
fn a_tampered_cookie_is_answered_with_a_fresh_one() {
    let lab = lab_with(&lb_cookie(""));
    let (head, _) = get_with_head(&lab, &[], "/");
    let cookie = pair(&set_cookies(&head)["LBSESSION"]).to_owned();
    let mut tampered: Vec<char> = cookie.chars().collect();
    let at = tampered.len() - 2;
    tampered[at] = if tampered[at] == 'A' { 'B' } else { 'A' };
    let tampered: String = tampered.into_iter().collect();
    let (head, backend) = get_with_head(&lab, &["-H", &format!("Cookie: {tampered}")], "/");
    let fresh = pair(&set_cookies(&head)["LBSESSION"]).to_owned();
    assert_ne!(fresh, tampered);
    for _ in 0..5 {
        assert_eq!(
            get(&lab, &["-H", &format!("Cookie: {fresh}")], "/"),
            backend
        );
    }
}

#[test]
fn a_companion_cookie_follows_the_applications_cookie() {
    let options = ServiceOptions {
        web_settings: COMPANION.to_owned(),
        ..ServiceOptions::default()
    };
    let lab = lab_with(&options);
    // The backend sets SID on a request without it: the balancer adds LBAPP beside it.
    let (head, backend) = get_with_head(&lab, &[], "/");
    let cookies = set_cookies(&head);
    assert!(cookies.contains_key("SID"), "{head}");
    // The application's is a session cookie (no Max-Age): so is the companion.
    assert!(
        !cookies["LBAPP"].contains("Max-Age") && cookies["LBAPP"].ends_with("; Path=/; HttpOnly"),
        "attributes of {:?}",
        cookies["LBAPP"]
    );
    let companion = pair(&cookies["LBAPP"]).to_owned();
    let app = pair(&cookies["SID"]).to_owned();
    for _ in 0..10 {
        let (head, now) = get_with_head(&lab, &["-H", &format!("Cookie: {app}; {companion}")], "/");
        assert_eq!(now, backend, "{companion} names {backend}");
        assert!(set_cookies(&head).is_empty(), "nothing set again: {head}");
    }
    sessions_stick_and_spread(&lab, "LBAPP");
    // A response that sets no application cookie gets no companion either.
    let (head, _) = get_with_head(&lab, &["-H", "Cookie: SID=mine"], "/");
    assert!(!set_cookies(&head).contains_key("LBAPP"), "{head}");
}

#[test]
fn a_companion_cookie_lives_as_long_as_the_applications_and_is_deleted_with_it() {
    let options = ServiceOptions {
        web_settings: COMPANION.to_owned(),
        ..ServiceOptions::default()
    };
    let lab = lab_with(&options);
    // The application's cookie lives 5 s: the companion's too.
    let (head, _) = get_with_head(&lab, &[], "/?max_age=5");
    let cookies = set_cookies(&head);
    assert!(cookies["SID"].contains("; Max-Age=5"), "{head}");
    assert!(
        cookies["LBAPP"].ends_with("; Max-Age=5; Path=/; HttpOnly"),
        "attributes of {:?}",
        cookies["LBAPP"]
    );
    // A curl jar holds both, expiring together, and sticks to the backend.
    let jar = lab.dir().join("companion-jar");
    let jar = jar.to_str().expect("utf-8 path");
    let (head, first) = get_with_head(&lab, &["-c", jar], "/?max_age=5");
    assert!(set_cookies(&head).contains_key("LBAPP"), "{head}");
    let expiries = || -> HashMap<String, u64> {
        std::fs::read_to_string(jar)
            .expect("reading the jar")
            .lines()
            .filter(|l| !l.starts_with('#') || l.starts_with("#HttpOnly_"))
            .filter_map(|l| {
                let fields: Vec<&str> = l.split('\t').collect();
                Some((fields.get(5)?.to_string(), fields.get(4)?.parse().ok()?))
            })
            .collect()
    };
    let held = expiries();
    assert_eq!(held.len(), 2, "SID and LBAPP in the jar: {held:?}");
    assert_eq!(held["SID"], held["LBAPP"], "one lifetime: {held:?}");
    for _ in 0..5 {
        assert_eq!(get(&lab, &["-b", jar, "-c", jar], "/"), first);
    }
    // The application deletes its cookie: the same response deletes the companion, and the
    // jar lets it go (curl 7.88 keeps the application's SID all the same).
    let (head, _) = get_with_head(&lab, &["-b", jar, "-c", jar], "/logout");
    let cookies = set_cookies(&head);
    assert_eq!(pair(&cookies["SID"]), "SID=", "{head}");
    assert!(
        cookies["LBAPP"].starts_with("LBAPP=; Max-Age=0;"),
        "the companion deleted: {head}"
    );
    assert!(
        !expiries().contains_key("LBAPP"),
        "the jar after the logout: {:?}",
        expiries()
    );
    // No longer sticky: without the companion, each new connection is placed afresh by its
    // flow, until the application issues a new cookie (then the companion comes with it).
    let answers: HashSet<String> = (0..12).map(|_| get(&lab, &["-b", jar], "/")).collect();
    assert!(
        answers.len() > 1,
        "still stuck to {answers:?} after the logout"
    );
    let (head, placed) = get_with_head(&lab, &[], "/");
    let cookies = set_cookies(&head);
    assert!(
        cookies.contains_key("SID") && cookies.contains_key("LBAPP"),
        "{head}"
    );
    let companion = pair(&cookies["LBAPP"]).to_owned();
    assert_eq!(
        get(&lab, &["-H", &format!("Cookie: {companion}")], "/"),
        placed
    );
}

fn rewrite_options(extra: &str) -> ServiceOptions {
    ServiceOptions {
        web_settings: format!(
            "affinity = \"app-cookie\"\ncookie = \"SID\"\napp_cookie = \"rewrite\"\ncookie_fallback = \"flow\"\n{extra}"
        ),
        ..ServiceOptions::default()
    }
}

#[test]
fn rewrite_mode_prefixes_the_applications_cookie_and_the_application_sees_its_own_value() {
    let lab = lab_with(&rewrite_options(""));
    let (head, backend) = get_with_head(&lab, &[], "/");
    let sid = pair(&set_cookies(&head)["SID"]).to_owned();
    let (prefix, own) = sid["SID=".len()..]
        .split_once('~')
        .unwrap_or_else(|| panic!("no prefix in {sid}"));
    assert_eq!(prefix.len(), 8, "{sid}");
    assert!(
        own.starts_with(&format!("{backend}-")),
        "the application's value follows the prefix: {sid}"
    );
    assert!(
        head.to_ascii_lowercase().contains("\r\nconnection: close"),
        "each response closes its connection, so the next request is read again: {head}"
    );
    for _ in 0..5 {
        let seen = get(
            &lab,
            &["-H", &format!("Cookie: a=1; {sid}; b=2")],
            "/cookies",
        );
        assert_eq!(
            seen,
            format!("a=1; SID={own}; b=2"),
            "the application sees its own value"
        );
        assert_eq!(get(&lab, &["-H", &format!("Cookie: {sid}")], "/"), backend);
    }
    // A POST body after the shortened head arrives whole, and the response's
    // acknowledgements reach the client moved back by the removed bytes.
    let file = lab.dir().join("upload");
    let size = 2_000_000u64;
    balancer_lab::write_test_data(&file, size).expect("writing the upload");
    let answer = get(
        &lab,
        &[
            "-H",
            &format!("Cookie: {sid}"),
            "--data-binary",
            &format!("@{}", file.display()),
        ],
        "/upload",
    );
    assert_eq!(
        answer,
        format!("{} {size}", balancer_lab::test_data_sha256(size))
    );
    sessions_stick_and_spread(&lab, "SID");
}

#[test]
fn companion_mode_reissues_its_cookie_when_the_backend_fails() {
    failover_reissues(
        &ServiceOptions {
            web_settings: format!("{COMPANION}{HEALTH_CHECK}"),
            ..ServiceOptions::default()
        },
        "LBAPP",
    );
}

#[test]
fn rewrite_mode_reissues_the_prefix_when_the_backend_fails() {
    failover_reissues(&rewrite_options(HEALTH_CHECK), "SID");
}

#[test]
fn response_heads_over_several_segments_get_the_cookie_and_bodies_stay_intact() {
    let lab = lab_with(&lb_cookie(""));
    for (pad, size) in [(3_000, 1_000), (7_000, 300_000), (20_000, 2_000)] {
        let out = lab.dir().join("body");
        let out = out.to_str().expect("utf-8 path");
        let (head, _) = get_with_head(&lab, &["-o", out], &format!("/bytes/{size}?pad={pad}"));
        let padding = head
            .lines()
            .find_map(|l| l.strip_prefix("x-padding: "))
            .unwrap_or_else(|| panic!("no padding in the head"));
        assert_eq!(padding.len(), pad, "the padded header arrived whole");
        // Heads past 8 KB pass unedited (the agent does not wait for the whole head).
        assert_eq!(
            head.contains("LBSESSION="),
            pad < 8_000,
            "pad {pad}: {head:.200}"
        );
        assert_eq!(
            sha256_of_file(std::path::Path::new(out)),
            balancer_lab::test_data_sha256(size),
            "the body after a {pad}-byte head"
        );
    }
}

#[test]
fn an_upload_that_waits_for_100_continue_gets_it_at_once_and_the_final_head_the_cookie() {
    let lab = lab_with(&lb_cookie(""));
    let file = lab.dir().join("upload");
    let size = 3_000_000u64;
    balancer_lab::write_test_data(&file, size).expect("writing the upload");
    let file_arg = format!("@{}", file.display());
    let answer = get(
        &lab,
        &[
            "-D",
            "-",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            &file_arg,
        ],
        "/upload",
    );
    let interim = answer
        .find("HTTP/1.1 100 Continue")
        .expect("the interim head reached curl");
    let last = answer.rfind("HTTP/1.1 200").expect("a final head");
    assert!(interim < last, "{answer:.300}");
    let (head, body) = answer[last..].split_once("\r\n\r\n").expect("a head");
    assert!(set_cookies(head).contains_key("LBSESSION"), "{head}");
    assert_eq!(
        body.trim(),
        format!("{} {size}", balancer_lab::test_data_sha256(size)),
        "the upload arrived whole"
    );
}

#[test]
fn a_thousand_responses_with_an_inserted_cookie_arrive_intact() {
    let lab = lab_with(&lb_cookie(""));
    let issued = integrity_run(&lab, &SIZES, 1000, false, "other=1");
    assert_eq!(
        issued, 1000,
        "each new connection without a cookie gets one"
    );
    // On one keep-alive connection the first response's cookie shifts every later byte.
    let issued = integrity_run(&lab, &SIZES, 300, true, "other=1");
    assert!(issued >= 1, "the keep-alive connection got its cookie");
}

#[test]
fn responses_with_an_inserted_cookie_arrive_intact_through_loss_and_reordering() {
    let lab = lab_with_impairment(&lb_cookie(""), &lossy());
    let issued = integrity_run(&lab, &SIZES, 1000, false, "other=1");
    assert_eq!(
        issued, 1000,
        "each new connection without a cookie gets one"
    );
    let issued = integrity_run(&lab, &SIZES, 200, true, "other=1");
    assert!(issued >= 1, "the keep-alive connection got its cookie");
    assert_relay_was_lossy(&lab);
    // Edited heads lost on the way to the client came back from the backend and were
    // answered by the agent (about one connection in twenty).
    assert!(
        binding_count(&lab, "heads_resent") > 0,
        "no edited head was sent again: the loss never hit one"
    );
}

#[test]
fn rewritten_requests_and_uploads_arrive_intact_through_loss_and_reordering() {
    let lab = lab_with_impairment(&rewrite_options(""), &lossy());
    let (head, _) = get_with_head(&lab, &[], "/");
    let sid = pair(&set_cookies(&head)["SID"]).to_owned();
    // Every request's head loses the prefix on its way to the backend; the uploads' bodies
    // and all acknowledgements move by as much.
    integrity_run(&lab, &SIZES, 300, false, &sid);
}

#[test]
fn a_cookie_past_half_its_life_is_renewed_for_the_same_backend() {
    let lab = lab_with(&ServiceOptions {
        web_settings: "affinity = \"lb-cookie\"\ncookie_fallback = \"flow\"\ncookie_duration = 6\n"
            .to_owned(),
        ..ServiceOptions::default()
    });
    let (head, backend) = get_with_head(&lab, &[], "/");
    let cookie = pair(&set_cookies(&head)["LBSESSION"]).to_owned();
    let (head, again) = get_with_head(&lab, &["-H", &format!("Cookie: {cookie}")], "/");
    assert_eq!(again, backend);
    assert!(
        !set_cookies(&head).contains_key("LBSESSION"),
        "a fresh cookie is not renewed: {head}"
    );
    // Cookie times are whole seconds: 4.2 s on, at most 2 of its 6 are left.
    std::thread::sleep(std::time::Duration::from_millis(4200));
    let (head, again) = get_with_head(&lab, &["-H", &format!("Cookie: {cookie}")], "/");
    assert_eq!(again, backend, "the session stays where it is");
    let renewed = pair(&set_cookies(&head)["LBSESSION"]).to_owned();
    assert_ne!(renewed, cookie, "a new expiry, so a new value");
    std::thread::sleep(std::time::Duration::from_millis(2500));
    // The first cookie has expired by now; the renewed one still routes.
    assert_eq!(
        get(&lab, &["-H", &format!("Cookie: {renewed}")], "/"),
        backend
    );
}

#[test]
fn a_response_whose_head_the_agent_was_reading_when_it_restarted_passes_unedited() {
    let mut lab = lab_with(&lb_cookie(""));
    let size = 300_000u64;
    let body = lab.dir().join("slow-body");
    let (ns, url, out) = (
        lab.client_ns().to_owned(),
        vip_url(&format!("/bytes/{size}?delay=4000")),
        body.to_string_lossy().into_owned(),
    );
    let client = std::thread::spawn(move || {
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                "20",
            ])
            .args(["-o", &out, &url])
            .output()
            .expect("running curl")
    });
    // The backend holds the response back while the agent restarts: the connection is
    // spliced and its reverse entry waits for the head, in the maps the next run reuses.
    std::thread::sleep(std::time::Duration::from_millis(1000));
    lab.stop_balancer().expect("stopping the agent");
    lab.start_balancer(&balancer_bin(), &config_path(&lab))
        .expect("starting the agent again");
    let output = client.join().expect("the client thread");
    assert!(
        output.status.success(),
        "the response never arrived: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        sha256_of_file(&body),
        balancer_lab::test_data_sha256(size),
        "the response arrived whole"
    );
}

/// A session's cookies as a browser would send them, then a WebSocket opened with them: the
/// 101 must pass unedited, the socket must echo, and it must reach the session's backend.
const WEBSOCKET_CLIENT: &str = r#"
import base64, os, socket, sys
import requests
url_host, port = sys.argv[1], int(sys.argv[2])
session = requests.Session()
first = session.get(f"http://{url_host}:{port}/", timeout=10)
backend = first.text.strip()
cookie = "; ".join(f"{k}={v}" for k, v in session.cookies.items())
s = socket.create_connection((url_host, port), timeout=10)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f"GET /ws HTTP/1.1\r\nHost: vip\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nCookie: {cookie}\r\n\r\n").encode())
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1)
head = head.decode()
status = head.split("\r\n")[0]
upgraded_on = [l.split(":", 1)[1].strip() for l in head.split("\r\n") if l.lower().startswith("x-backend:")]
echoed = []
for n in range(10):
    message = f"message {n}".encode()
    mask = os.urandom(4)
    s.sendall(bytes([0x81, 0x80 | len(message)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(message)))
    frame = b""
    while len(frame) < 2 + len(message):
        frame += s.recv(2 + len(message) - len(frame))
    echoed.append(frame[2:].decode())
print(status)
print("set-cookie" in head.lower(), "connection: close" in head.lower())
print(backend, upgraded_on[0] if upgraded_on else "-")
print(echoed == [f"message {n}" for n in range(10)])
"#;

#[test]
fn a_websocket_works_through_every_cookie_mode_and_reaches_the_sessions_backend() {
    for (mode, options) in [
        ("lb-cookie", lb_cookie("")),
        (
            "companion",
            ServiceOptions {
                web_settings: COMPANION.to_owned(),
                ..ServiceOptions::default()
            },
        ),
        ("rewrite", rewrite_options("")),
    ] {
        let lab = lab_with(&options);
        let said = run(
            &lab,
            lab.client_ns(),
            &[
                "python3",
                "-c",
                WEBSOCKET_CLIENT,
                &balancer_lab::VIP.to_string(),
                "80",
            ],
        );
        let lines: Vec<&str> = said.lines().collect();
        assert_eq!(lines.len(), 4, "{mode}: {said}");
        assert_eq!(lines[0], "HTTP/1.1 101 Switching Protocols", "{mode}");
        assert_eq!(lines[1], "False False", "{mode}: the 101 passes unedited");
        let (session, upgraded) = lines[2].split_once(' ').unwrap();
        assert_eq!(
            session, upgraded,
            "{mode}: the WebSocket reaches the session's backend"
        );
        assert_eq!(lines[3], "True", "{mode}: every message echoed");
    }
}

/// `count` python `requests` GETs of `url`, each on a new connection with `cookie`: the
/// backend, the body's sha256 and whether the response set the balancer's cookie, a line
/// each.
fn requests_with_cookie(lab: &Lab, url: &str, cookie: &str, count: usize) -> Vec<String> {
    let script = format!(
        r#"
import hashlib, requests
for _ in range({count}):
    r = requests.get("{url}", headers={{"Cookie": "{cookie}", "Connection": "close"}}, timeout=10)
    print(r.headers["X-Backend"], hashlib.sha256(r.content).hexdigest(), "LBSESSION=" in r.headers.get("Set-Cookie", ""))
"#
    );
    let output = python(lab, lab.client_ns(), &script);
    let lines: Vec<String> = output.lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), count, "every request answered:\n{output}");
    lines
}

/// Once the agent bound a returning session's connection, XDP binds the client's next ones
/// itself (the same cookie at the same place of a one-segment request head): each reaches the
/// session's backend with its bytes intact and no new cookie, and the agent reads none of
/// them. A tampered cookie at that place, or a backend that no longer takes new sessions,
/// goes to the agent again.
#[test]
fn a_returning_sessions_next_connections_are_bound_by_xdp_on_its_backend() {
    const SIZE: u64 = 100_000;
    const REQUESTS: usize = 21;
    let lab = lab_with(&lb_cookie(""));
    let (head, backend) = get_with_head(&lab, &[], "/");
    let cookie = pair(&set_cookies(&head)["LBSESSION"]).to_owned();
    let url = vip_url(&format!("/bytes/{SIZE}"));
    let intact = format!("{backend} {} False", balancer_lab::test_data_sha256(SIZE));

    let before = counters(&lab);
    let answers = requests_with_cookie(&lab, &url, &cookie, REQUESTS);
    let after = counters(&lab);
    let delta = |name: &str| after[name] - before[name];
    assert!(answers.iter().all(|a| *a == intact), "{answers:?}");
    assert_eq!(
        (
            delta("punted"),
            delta("bound_by_xdp"),
            delta("replayed_by_xdp")
        ),
        (1, REQUESTS as u64 - 1, REQUESTS as u64),
        "the agent read the first request alone, XDP bound the rest and replayed every one"
    );

    let (name, value) = cookie.split_once('=').unwrap();
    let last = value.chars().last().unwrap();
    let tampered = format!(
        "{name}={}{}",
        &value[..value.len() - 1],
        if last == 'A' { 'B' } else { 'A' }
    );
    // Its response is larger than the client's MSS with the new cookie lines in: the agent
    // edits its head, and reads the segments of it the backend sends.
    let before = counters(&lab);
    let answers = requests_with_cookie(&lab, &url, &tampered, 1);
    let after = counters(&lab);
    assert!(
        answers[0].ends_with(" True"),
        "a tampered cookie starts a new session: {answers:?}"
    );
    assert_eq!(
        after["bound_by_xdp"] - before["bound_by_xdp"],
        0,
        "the agent read the tampered cookie's request"
    );

    balancer(&lab, &["backend", "drain", "web", &backend]);
    let before = counters(&lab);
    let answers = requests_with_cookie(&lab, &url, &cookie, 1);
    let after = counters(&lab);
    assert_eq!(answers[0], intact, "a draining backend keeps its session");
    assert_eq!(
        (
            after["punted"] - before["punted"],
            after["bound_by_xdp"] - before["bound_by_xdp"]
        ),
        (1, 0),
        "the agent placed the session of a draining backend"
    );
}
