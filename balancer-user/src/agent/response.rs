//! The first response head of a cookie connection, when the balancer adds its cookie to it.
//!
//! XDP hands the backend's data to the agent until the head is complete. The agent adds its
//! `Set-Cookie` lines before the head's blank line, sends the edited head and whatever
//! followed it to the client, and tells XDP how many bytes it added: from then on the
//! backend's sequence numbers past the head move forward by as much and the client's
//! acknowledgements back. Head bytes the backend sends again (the client lost them) come back
//! to the agent, which answers with the edited head.

use balancer_common::MAX_HEAD_INSERT;

use crate::http;

/// Response bytes read while looking for the head's end; a longer head passes unedited. It
/// stays below a backend's initial congestion window (10 segments), so the whole head
/// arrives without the agent acknowledging any of it.
pub const MAX_RESPONSE_HEAD: usize = 8 * 1024;
/// Interim (1xx) heads passed on before the final one; a backend sending more gets the rest of
/// its response passed unedited, so endless interim heads cannot grow the agent's buffer.
pub const MAX_INTERIM_HEADS: usize = 4;

/// What the balancer changes in a connection's first response head.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Issue {
    /// `Set-Cookie` lines to add, each ending in CRLF.
    pub lines: String,
    /// The lines are not added to a response that sets this cookie itself (the balancer's
    /// own; in rewrite mode the application's, which then gets the prefix instead).
    pub own: String,
    /// Companion mode: the lines are added only to a response that sets this (the
    /// application's) cookie, with its lifetime (`Max-Age`, `Expires`, or none for a session
    /// cookie); a response deleting it deletes the balancer's too.
    pub when_set: Option<String>,
    /// Rewrite mode: the application's cookie, and the prefix its value gets wherever the
    /// response sets it.
    pub prefix: Option<(String, String)>,
    /// The response closes the connection (`Connection: close`): the client's next request
    /// comes on a new connection, which the agent reads.
    pub close: bool,
}

impl Issue {
    /// The lines as XDP puts them into the head itself, behind its status line, when
    /// nothing else in the head decides them (no companion or rewrite mode, no
    /// `Connection: close`): padded to even length with a space before the last CRLF (a
    /// field value may end in white space), if they are short enough.
    pub fn lines_for_xdp(&self) -> Option<Vec<u8>> {
        let plain = self.when_set.is_none() && self.prefix.is_none() && !self.close;
        if !plain || self.lines.is_empty() || !self.lines.ends_with("\r\n") {
            return None;
        }
        let mut lines = self.lines.clone().into_bytes();
        if !lines.len().is_multiple_of(2) {
            lines.insert(lines.len() - 2, b' ');
        }
        (lines.len() <= MAX_HEAD_INSERT).then_some(lines)
    }
}

/// What the agent knows of a connection's response while it reads or has edited its head.
pub struct Response {
    issue: Issue,
    /// The backend's bytes from its first sequence number on, without gaps.
    bytes: Vec<u8>,
    /// Stream offset of the backend's FIN, once seen.
    fin: Option<usize>,
    /// Bytes from the start passed to the client unedited: interim (1xx) heads, which the
    /// client may be waiting for (`Expect: 100-continue`).
    passed: usize,
    /// Interim heads among them.
    interims: usize,
    edit: Option<Edit>,
}

/// The decision on a response head: the bytes that replace the backend's first `head_end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub head_end: usize,
    pub edited: Vec<u8>,
}

impl Edit {
    /// Bytes the edit added.
    pub fn inserted(&self) -> usize {
        self.edited.len() - self.head_end
    }
}

/// Bytes of the client's stream to send: from `offset` (counted from the response's first
/// byte), followed by a FIN when `fin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    pub offset: usize,
    pub bytes: Vec<u8>,
    pub fin: bool,
}

impl Response {
    pub fn new(issue: Issue) -> Self {
        Self {
            issue,
            bytes: Vec::new(),
            fin: None,
            passed: 0,
            interims: 0,
            edit: None,
        }
    }

    /// Whether the head is edited: the data plane then knows how many bytes were added.
    pub fn edit(&self) -> Option<&Edit> {
        self.edit.as_ref()
    }

    /// Takes in a backend segment at stream `offset`, and says what the client gets: the
    /// newly decided edit (for the data plane), and the bytes to send.
    pub fn on_segment(
        &mut self,
        offset: usize,
        payload: &[u8],
        fin: bool,
    ) -> (Option<Edit>, Vec<Out>) {
        self.receive(offset, payload, fin);
        if let Some(edit) = &self.edit {
            // Sent again: from inside the head, the whole edited head; past it, the bytes
            // moved by what the edit added.
            let out = if offset < edit.head_end {
                self.edited_from(0)
            } else {
                Out {
                    offset: offset + edit.inserted(),
                    bytes: payload.to_vec(),
                    fin,
                }
            };
            return (None, vec![out]);
        }
        match self.find_final_head() {
            Head::Final(start, end) => {
                let edit = edit_head(&self.bytes, start, end, &self.issue);
                self.decided(edit)
            }
            Head::Pending {
                interim_end,
                interims,
            } => {
                let at_end = self.fin == Some(self.bytes.len());
                if at_end
                    || self.bytes.len() - self.passed >= MAX_RESPONSE_HEAD
                    || self.interims + interims > MAX_INTERIM_HEADS
                {
                    // No head to edit: the backend closed, or it is not HTTP as we know it.
                    let edit = Edit {
                        head_end: self.bytes.len(),
                        edited: self.bytes.clone(),
                    };
                    return self.decided(edit);
                }
                if interim_end > self.passed {
                    let out = Out {
                        offset: self.passed,
                        bytes: self.bytes[self.passed..interim_end].to_vec(),
                        fin: false,
                    };
                    self.passed = interim_end;
                    self.interims += interims;
                    return (None, vec![out]);
                }
                (None, Vec::new())
            }
        }
    }

    fn decided(&mut self, edit: Edit) -> (Option<Edit>, Vec<Out>) {
        self.edit = Some(edit.clone());
        let out = self.edited_from(self.passed);
        (Some(edit), vec![out])
    }

    /// The client's stream from `offset` to the end of what the agent holds.
    fn edited_from(&self, offset: usize) -> Out {
        let edit = self.edit.as_ref().expect("called once edited");
        let mut bytes = edit.edited[offset.min(edit.edited.len())..].to_vec();
        bytes.extend_from_slice(&self.bytes[edit.head_end..]);
        Out {
            offset,
            bytes,
            fin: self.fin == Some(self.bytes.len()),
        }
    }

    /// Keeps the bytes that extend the gapless stream; a segment after a gap is sent again by
    /// the backend.
    fn receive(&mut self, offset: usize, payload: &[u8], fin: bool) {
        if offset <= self.bytes.len() {
            let new_from = self.bytes.len() - offset;
            if new_from < payload.len() {
                self.bytes.extend_from_slice(&payload[new_from..]);
            }
            if fin && offset + payload.len() == self.bytes.len() {
                self.fin = Some(self.bytes.len());
            }
        }
    }

    /// The final (not 1xx) head, or how far the interim heads before it go.
    fn find_final_head(&self) -> Head {
        let mut start = self.passed;
        let mut interims = 0;
        loop {
            let Some(end) = http::head_end(&self.bytes[start..]).map(|at| start + at) else {
                return Head::Pending {
                    interim_end: start,
                    interims,
                };
            };
            let mut headers = [httparse::EMPTY_HEADER; 0];
            let mut response = httparse::Response::new(&mut headers);
            // Only the status line matters here; too many headers is not an error for it.
            let _ = response.parse(&self.bytes[start..end]);
            match response.code {
                Some(code) if (100..200).contains(&code) && code != 101 => {
                    start = end;
                    interims += 1;
                }
                _ => return Head::Final(start, end),
            }
        }
    }
}

/// What the backend's bytes so far hold.
enum Head {
    /// The final head, from `.0` to `.1`.
    Final(usize, usize),
    /// No final head yet; complete interim heads, this many, end at `interim_end`.
    Pending { interim_end: usize, interims: usize },
}

/// The response head `bytes[start..end]` as the issue wants it, the bytes before it
/// unchanged. Edits only ever add bytes.
fn edit_head(bytes: &[u8], start: usize, end: usize, issue: &Issue) -> Edit {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut response = httparse::Response::new(&mut headers);
    if !matches!(
        response.parse(&bytes[start..end]),
        Ok(httparse::Status::Complete(_))
    ) {
        return Edit {
            head_end: end,
            edited: bytes[..end].to_vec(),
        };
    }
    // A protocol switch (a WebSocket, HTTP/2 over cleartext) passes as it is: after its head
    // the connection no longer carries HTTP, and a `Connection: close` would undo the switch.
    let upgrades = response.code == Some(101)
        || response.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("connection")
                && h.value
                    .split(|&b| b == b',')
                    .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
        });
    if upgrades {
        return Edit {
            head_end: end,
            edited: bytes[..end].to_vec(),
        };
    }
    let set_cookie = |name: &str| {
        response
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("set-cookie"))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .find(|value| {
                value
                    .split_once('=')
                    .is_some_and(|(cookie, _)| cookie.trim() == name)
            })
    };
    let sets = |name: &str| set_cookie(name).is_some();
    let add_lines =
        !issue.lines.is_empty() && issue.when_set.as_deref().is_none_or(sets) && !sets(&issue.own);
    let lines = match issue.when_set.as_deref().and_then(set_cookie) {
        Some(app) if add_lines => {
            let lifetime = Lifetime::of(app);
            issue
                .lines
                .split_inclusive('\n')
                .map(|line| lifetime.apply(line))
                .collect()
        }
        _ => issue.lines.clone(),
    };
    let blank_line = if bytes[..end].ends_with(b"\r\n") {
        end - 2
    } else {
        end - 1
    };
    let mut edited = Vec::with_capacity(end + issue.lines.len() + 64);
    edited.extend_from_slice(&bytes[..start]);
    let mut closes = false;
    for (index, line) in bytes[start..blank_line]
        .split_inclusive(|&b| b == b'\n')
        .enumerate()
    {
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) if index > 0 => (&line[..colon], &line[colon + 1..]),
            _ => (&line[..0], line),
        };
        if issue.close && name.eq_ignore_ascii_case(b"connection") {
            // Padded to the old line's length: an edit must not shorten the head.
            let close = b"Connection: close";
            edited.extend_from_slice(close);
            let pad = line.len().saturating_sub(close.len() + 2);
            edited.extend(std::iter::repeat_n(b' ', pad));
            edited.extend_from_slice(b"\r\n");
            closes = true;
            continue;
        }
        if let Some((app, prefix)) = &issue.prefix {
            let value_at = line.len() - value.trim_ascii_start().len();
            let pair = format!("{app}=");
            if name.eq_ignore_ascii_case(b"set-cookie")
                && line[value_at..].starts_with(pair.as_bytes())
            {
                let at = value_at + pair.len();
                edited.extend_from_slice(&line[..at]);
                edited.extend_from_slice(prefix.as_bytes());
                edited.extend_from_slice(&line[at..]);
                continue;
            }
        }
        edited.extend_from_slice(line);
    }
    if issue.close && !closes {
        edited.extend_from_slice(b"Connection: close\r\n");
    }
    if add_lines {
        edited.extend_from_slice(lines.as_bytes());
    }
    edited.extend_from_slice(&bytes[blank_line..end]);
    Edit {
        head_end: end,
        edited,
    }
}

/// How long a cookie a response sets lives, by its attributes (`Max-Age` before `Expires`, as
/// RFC 6265 §5.3 says).
#[derive(Debug, PartialEq, Eq)]
enum Lifetime {
    /// No `Max-Age` or `Expires`: until the browser closes.
    Session,
    MaxAge(u64),
    Expires(String),
    /// `Max-Age` of 0 or less, or an `Expires` in the past: the cookie is deleted.
    Deleted,
}

impl Lifetime {
    fn of(set_cookie: &str) -> Lifetime {
        let attributes = || {
            set_cookie
                .split(';')
                .skip(1)
                .filter_map(|attribute| attribute.split_once('='))
                .map(|(name, value)| (name.trim(), value.trim()))
        };
        if let Some((_, max_age)) = attributes().find(|(n, _)| n.eq_ignore_ascii_case("max-age")) {
            return match max_age.parse::<i64>() {
                Ok(seconds) if seconds <= 0 => Lifetime::Deleted,
                Ok(seconds) => Lifetime::MaxAge(seconds as u64),
                // An unreadable Max-Age is ignored (RFC 6265 §5.2.2): as if absent.
                Err(_) => Lifetime::Session,
            };
        }
        match attributes().find(|(n, _)| n.eq_ignore_ascii_case("expires")) {
            Some((_, date)) => match httpdate::parse_http_date(date) {
                Ok(at) if at <= std::time::SystemTime::now() => Lifetime::Deleted,
                _ => Lifetime::Expires(date.to_owned()),
            },
            None => Lifetime::Session,
        }
    }

    /// One of the balancer's `Set-Cookie` lines (`Set-Cookie: NAME=VALUE; Max-Age=N; ...`)
    /// with this lifetime instead of its own.
    fn apply(&self, line: &str) -> String {
        let body = line.trim_end_matches(['\r', '\n']);
        let mut parts: Vec<String> = body.split("; ").map(str::to_owned).collect();
        parts.retain(|part| !part.starts_with("Max-Age="));
        match self {
            Lifetime::Session => {}
            Lifetime::MaxAge(seconds) => parts.insert(1, format!("Max-Age={seconds}")),
            Lifetime::Expires(date) => parts.insert(1, format!("Expires={date}")),
            Lifetime::Deleted => {
                if let Some((name, _)) = parts[0].split_once('=') {
                    parts[0] = format!("{name}=");
                }
                parts.insert(1, "Max-Age=0".to_owned());
            }
        }
        format!("{}\r\n", parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "Set-Cookie: LB=v; Path=/\r\n";

    fn issue() -> Issue {
        Issue {
            lines: LINE.to_owned(),
            own: "LB".to_owned(),
            ..Issue::default()
        }
    }

    /// The client's stream as the outputs build it, one byte slot per offset.
    fn apply(stream: &mut Vec<u8>, outs: &[Out]) {
        for out in outs {
            if stream.len() < out.offset + out.bytes.len() {
                stream.resize(out.offset + out.bytes.len(), 0);
            }
            stream[out.offset..out.offset + out.bytes.len()].copy_from_slice(&out.bytes);
        }
    }

    #[test]
    fn a_head_split_over_segments_gets_the_lines_before_its_blank_line() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        let mut response = Response::new(issue());
        let mut client = Vec::new();
        let mut decided = None;
        for (index, chunk) in wire.chunks(7).enumerate() {
            let (edit, outs) = response.on_segment(index * 7, chunk, false);
            decided = decided.or(edit);
            apply(&mut client, &outs);
        }
        let expected = format!("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n{LINE}\r\nhello");
        assert_eq!(String::from_utf8(client).unwrap(), expected);
        let edit = decided.expect("the head was decided");
        assert_eq!(edit.inserted(), LINE.len());
        assert_eq!(edit.head_end, wire.len() - 5);
    }

    #[test]
    fn a_head_with_bare_line_feeds_gets_the_lines_before_its_empty_line() {
        let wire = b"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi";
        let mut response = Response::new(issue());
        let (edit, outs) = response.on_segment(0, wire, false);
        let mut client = Vec::new();
        apply(&mut client, &outs);
        assert_eq!(
            String::from_utf8(client).unwrap(),
            format!("HTTP/1.1 200 OK\nContent-Length: 2\n{LINE}\nhi")
        );
        assert_eq!(edit.unwrap().inserted(), LINE.len());
    }

    #[test]
    fn a_protocol_switch_passes_unedited_even_where_connections_are_closed() {
        let closing = Issue {
            close: true,
            ..issue()
        };
        for wire in [
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi"[..],
            &b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Upgrade\r\nUpgrade: h2c\r\n\r\n"[..],
        ] {
            let mut response = Response::new(closing.clone());
            let (edit, outs) = response.on_segment(0, wire, false);
            assert_eq!(edit.unwrap().inserted(), 0);
            assert_eq!(outs[0].bytes, wire);
        }
    }

    #[test]
    fn endless_interim_heads_make_the_rest_of_the_response_pass_unedited() {
        let mut response = Response::new(issue());
        let interim = b"HTTP/1.1 102 Processing\r\n\r\n";
        let mut client = Vec::new();
        let mut decided = None;
        for n in 0..MAX_INTERIM_HEADS + 2 {
            let (edit, outs) = response.on_segment(n * interim.len(), interim, false);
            decided = decided.or(edit);
            apply(&mut client, &outs);
        }
        let edit = decided.expect("decided once the interim heads ran past the bound");
        assert_eq!(edit.inserted(), 0);
        assert_eq!(client, interim.repeat(MAX_INTERIM_HEADS + 2));
        // Later bytes pass as they come, held nowhere.
        let (_, outs) = response.on_segment(client.len(), b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!(outs[0].offset, client.len());
    }

    #[test]
    fn head_bytes_sent_again_are_answered_with_the_edited_head() {
        let wire = b"HTTP/1.1 200 OK\r\n\r\nbody";
        let mut response = Response::new(issue());
        let (edit, _) = response.on_segment(0, wire, false);
        let edit = edit.unwrap();
        let (again, outs) = response.on_segment(0, &wire[..10], false);
        assert!(again.is_none());
        assert_eq!(outs[0].offset, 0);
        assert!(outs[0].bytes.starts_with(&edit.edited));
        let (_, outs) = response.on_segment(wire.len(), b"more", true);
        assert_eq!(outs[0].offset, wire.len() + edit.inserted());
        assert!(outs[0].fin);
    }

    #[test]
    fn interim_heads_pass_at_once_and_the_final_head_is_edited() {
        let mut response = Response::new(issue());
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
        let (edit, outs) = response.on_segment(0, interim, false);
        assert!(edit.is_none());
        assert_eq!(
            outs,
            vec![Out {
                offset: 0,
                bytes: interim.to_vec(),
                fin: false
            }]
        );
        let last = b"HTTP/1.1 200 OK\r\n\r\n";
        let (edit, outs) = response.on_segment(interim.len(), last, false);
        assert_eq!(edit.unwrap().head_end, interim.len() + last.len());
        assert_eq!(outs[0].offset, interim.len());
        assert_eq!(
            outs[0].bytes,
            format!("HTTP/1.1 200 OK\r\n{LINE}\r\n").into_bytes()
        );
    }

    #[test]
    fn responses_that_set_the_cookie_themselves_or_are_not_http_pass_unedited() {
        let own = b"HTTP/1.1 200 OK\r\nSet-Cookie: LB=mine\r\n\r\n";
        let (edit, _) = Response::new(issue()).on_segment(0, own, false);
        assert_eq!(edit.unwrap().inserted(), 0);

        let closed = b"not http";
        let (edit, outs) = Response::new(issue()).on_segment(0, closed, true);
        assert_eq!(edit.unwrap().inserted(), 0);
        assert!(outs[0].fin);

        let endless = vec![b'x'; MAX_RESPONSE_HEAD];
        let (edit, outs) = Response::new(issue()).on_segment(0, &endless, false);
        assert_eq!(edit.unwrap().inserted(), 0);
        assert_eq!(outs[0].bytes, endless);
    }

    #[test]
    fn a_companion_cookie_follows_only_the_applications_own() {
        let companion = Issue {
            when_set: Some("SID".to_owned()),
            ..issue()
        };
        let plain = b"HTTP/1.1 200 OK\r\nSet-Cookie: other=1\r\n\r\n";
        let (edit, _) = Response::new(companion.clone()).on_segment(0, plain, false);
        assert_eq!(edit.unwrap().inserted(), 0);
        let sets = b"HTTP/1.1 200 OK\r\nset-cookie: SID=abc; Path=/\r\n\r\n";
        let (edit, _) = Response::new(companion).on_segment(0, sets, false);
        assert_eq!(edit.unwrap().inserted(), LINE.len());
    }

    #[test]
    fn a_companion_cookie_lives_as_long_as_the_applications_and_goes_with_it() {
        let companion = Issue {
            lines: "Set-Cookie: LB=v; Max-Age=3600; Path=/; HttpOnly\r\n".to_owned(),
            when_set: Some("SID".to_owned()),
            ..issue()
        };
        let added = |set_cookie: &str| {
            let head = format!("HTTP/1.1 200 OK\r\nSet-Cookie: {set_cookie}\r\n\r\n");
            let (edit, _) = Response::new(companion.clone()).on_segment(0, head.as_bytes(), false);
            let edited = String::from_utf8(edit.expect("decided").edited).expect("text");
            edited
                .lines()
                .find(|l| l.starts_with("Set-Cookie: LB="))
                .map(str::to_owned)
        };
        let line = |s: &str| Some(s.to_owned());
        assert_eq!(
            added("SID=a; Max-Age=5"),
            line("Set-Cookie: LB=v; Max-Age=5; Path=/; HttpOnly")
        );
        assert_eq!(
            added("SID=a; expires=Wed, 01 Jan 2099 00:00:00 GMT; Max-Age=7"),
            line("Set-Cookie: LB=v; Max-Age=7; Path=/; HttpOnly"),
            "Max-Age before Expires"
        );
        assert_eq!(
            added("SID=a; Expires=Wed, 01 Jan 2099 00:00:00 GMT"),
            line("Set-Cookie: LB=v; Expires=Wed, 01 Jan 2099 00:00:00 GMT; Path=/; HttpOnly")
        );
        assert_eq!(
            added("SID=a; Path=/"),
            line("Set-Cookie: LB=v; Path=/; HttpOnly")
        );
        for deleted in [
            "SID=; Max-Age=0",
            "SID=x; Max-Age=-1",
            "SID=; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
        ] {
            assert_eq!(
                added(deleted),
                line("Set-Cookie: LB=; Max-Age=0; Path=/; HttpOnly"),
                "{deleted}"
            );
        }
    }

    #[test]
    fn segments_after_a_gap_wait_for_the_bytes_before_them() {
        let mut response = Response::new(issue());
        let (edit, outs) = response.on_segment(5, b"/1.1 200 OK\r\n\r\n", false);
        assert!(edit.is_none() && outs.is_empty());
        let (edit, _) = response.on_segment(0, b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert!(edit.is_some());
    }

    #[test]
    fn rewrite_mode_prefixes_the_applications_cookie_and_closes_the_connection() {
        let rewrite = Issue {
            lines: "Set-Cookie: SID=p~old; Path=/\r\n".to_owned(),
            own: "SID".to_owned(),
            prefix: Some(("SID".to_owned(), "p~".to_owned())),
            close: true,
            ..Issue::default()
        };
        let head = b"HTTP/1.1 200 OK\r\nSet-Cookie: SID=abc; Path=/\r\nSet-Cookie: other=1\r\nConnection: keep-alive\r\n\r\n";
        let (edit, _) = Response::new(rewrite.clone()).on_segment(0, head, false);
        let edited = String::from_utf8(edit.unwrap().edited).unwrap();
        assert_eq!(
            edited,
            "HTTP/1.1 200 OK\r\nSet-Cookie: SID=p~abc; Path=/\r\nSet-Cookie: other=1\r\nConnection: close     \r\n\r\n"
        );
        // A response that does not set the cookie re-issues it for the session's backend.
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let (edit, _) = Response::new(rewrite).on_segment(0, plain, false);
        assert_eq!(
            String::from_utf8(edit.unwrap().edited).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\nSet-Cookie: SID=p~old; Path=/\r\n\r\n"
        );
    }
}
