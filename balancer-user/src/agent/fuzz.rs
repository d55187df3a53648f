//! Fuzzing of everything the agent parses from the network or the operator: random inputs
//! and mutations of valid ones, from a fixed seed so a failure repeats. `cargo xtask fuzz`
//! runs them with a million cases each (they are ignored in the ordinary test run); a case
//! passes when it does not panic and the agent's state stays within its bounds.

use rand::{rngs::SmallRng, Rng as _, SeedableRng};

use super::{
    placement::cookie_value,
    response::{Issue, Response, MAX_RESPONSE_HEAD},
};
use crate::{
    config::Config,
    cookie::{CookieKey, CookieKeys},
    rewrite,
};

/// Cases per target: `FUZZ_CASES`, else a number small enough for a quick run.
fn cases() -> u64 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000)
}

/// A seeded, repeatable source of random inputs.
struct Rng(SmallRng);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(SmallRng::seed_from_u64(seed))
    }

    fn next(&mut self) -> u64 {
        self.0.gen()
    }

    fn below(&mut self, n: usize) -> usize {
        self.0.gen_range(0..n.max(1))
    }

    /// Bytes drawn mostly from what HTTP heads are made of, so mutations reach deep paths.
    fn byte(&mut self) -> u8 {
        const ALPHABET: &[u8] = b"\r\n:;= ,~-_/.0123456789abcdefABCDEF\tHTTP";
        if self.below(4) == 0 {
            self.next() as u8
        } else {
            ALPHABET[self.below(ALPHABET.len())]
        }
    }

    /// `seed` with a few random edits: bytes flipped, inserted, deleted, or a run repeated.
    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut bytes = seed.to_vec();
        for _ in 0..=self.below(4) {
            let at = self.below(bytes.len() + 1);
            match self.below(5) {
                0 if at < bytes.len() => bytes[at] = self.byte(),
                1 => bytes.insert(at, self.byte()),
                2 if at < bytes.len() => {
                    bytes.remove(at);
                }
                3 => {
                    let end = (at + self.below(16)).min(bytes.len());
                    let run = bytes[at..end].to_vec();
                    bytes.splice(at..at, run);
                }
                _ => {
                    let len = self.below(64);
                    let random: Vec<u8> = (0..len).map(|_| self.byte()).collect();
                    bytes.splice(at..at, random);
                }
            }
        }
        bytes
    }

    /// A random input, or a mutation of one of `seeds`.
    fn input(&mut self, seeds: &[&[u8]]) -> Vec<u8> {
        if self.below(8) == 0 {
            let len = self.below(512);
            (0..len).map(|_| self.byte()).collect()
        } else {
            let seed = seeds[self.below(seeds.len())];
            self.mutate(seed)
        }
    }
}

const REQUESTS: &[&[u8]] = &[
    b"GET / HTTP/1.1\r\nHost: vip\r\nCookie: a=1; SID=abc; LBSESSION=x.y.z\r\n\r\n",
    b"POST /upload HTTP/1.1\r\nCookie: SID=0a1b2c3d~value\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.0\nCookie: SID=\n\n",
];

const RESPONSES: &[&[u8]] = &[
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nSet-Cookie: SID=v; Path=/\r\n\r\nhello",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.0 302 Found\nLocation: /\nSet-Cookie: LB=1\n\n",
];

#[test]
#[ignore = "run by cargo xtask fuzz"]
fn fuzz_the_request_cookie_reader_and_the_rewrite_strip() {
    let mut rng = Rng::new(0x5eed_0001);
    for _ in 0..cases() {
        let request = rng.input(REQUESTS);
        for name in ["SID", "LBSESSION", "a"] {
            if let Some(value) = cookie_value(&request, name) {
                assert!(value.len() <= request.len());
            }
            let (stripped, removed) = rewrite::strip(&request, name);
            assert_eq!(
                stripped.len() + removed,
                request.len(),
                "the strip only removes"
            );
        }
    }
}

#[test]
#[ignore = "run by cargo xtask fuzz"]
fn fuzz_the_response_head_editor_segment_by_segment() {
    let mut rng = Rng::new(0x5eed_0002);
    let issues = [
        Issue {
            lines: "Set-Cookie: LB=v; Path=/\r\n".to_owned(),
            own: "LB".to_owned(),
            ..Issue::default()
        },
        Issue {
            close: true,
            prefix: Some(("SID".to_owned(), "0a1b2c3d~".to_owned())),
            own: "SID".to_owned(),
            ..Issue::default()
        },
    ];
    for _ in 0..cases() {
        let wire = rng.input(RESPONSES);
        let mut response = Response::new(issues[rng.below(2)].clone());
        let mut offset = 0;
        while offset < wire.len() {
            let len = 1 + rng.below(64);
            let end = (offset + len).min(wire.len());
            // Now and then a segment comes again, or from further back.
            let from = if rng.below(6) == 0 {
                rng.below(offset + 1)
            } else {
                offset
            };
            let fin = end == wire.len() && rng.below(2) == 0;
            let (edit, outs) = response.on_segment(from, &wire[from..end], fin);
            if let Some(edit) = edit {
                assert!(
                    edit.edited.len() >= edit.head_end,
                    "an edit only adds bytes"
                );
                assert!(edit.head_end <= wire.len());
            }
            for out in outs {
                assert!(out.bytes.len() <= wire.len() + 4 * MAX_RESPONSE_HEAD);
            }
            offset = offset.max(end);
        }
    }
}

#[test]
#[ignore = "run by cargo xtask fuzz"]
fn fuzz_the_cookie_codec() {
    let mut rng = Rng::new(0x5eed_0003);
    let keys = CookieKeys(vec![CookieKey {
        id: 1,
        secret: b"a fuzzing key of at least sixteen bytes".to_vec(),
    }]);
    let genuine = keys
        .seal("web", 0xdead_beef, 2_000_000_000, None)
        .expect("a key");
    let seeds: [&[u8]; 2] = [genuine.as_bytes(), b"AQAAAAA.bad"];
    for _ in 0..cases() {
        let value = rng.input(&seeds);
        let Ok(text) = std::str::from_utf8(&value) else {
            continue;
        };
        if let Ok(session) = keys.open("web", text, 1_000_000_000) {
            // A value opens only with the genuine signature, so it names the genuine backend.
            assert_eq!(
                (session.token, session.expires),
                (0xdead_beef, 2_000_000_000)
            );
        }
    }
}

#[test]
#[ignore = "run by cargo xtask fuzz"]
fn fuzz_the_config_parser() {
    let mut rng = Rng::new(0x5eed_0004);
    let valid = br#"instance = "lab"
client_interface = "lb-client"
cookie_keys = [{ id = 1, secret = "a key of at least sixteen bytes" }]
[[service]]
name = "web"
vip = "203.0.113.10"
port = 80
protocol = "tcp"
affinity = "lb-cookie"
  [[service.backend]]
  name = "b1"
  address = "198.19.0.11"
"#;
    for _ in 0..cases() {
        let text = rng.input(&[valid]);
        if let Ok(text) = std::str::from_utf8(&text) {
            // Accepted or rejected with a reason; never a panic.
            let _ = Config::parse(text);
        }
    }
}
