//! `app-cookie` rewrite mode: the application's cookie value travels to the browser with the
//! backend's token in front (`<8 hex digits>~<value>`, as HAProxy's `cookie prefix` does), and
//! the token is taken off again before a request reaches the application.

/// Hex digits of the token, then the separator.
pub const PREFIX_LEN: usize = 9;
const SEPARATOR: u8 = b'~';

/// The prefix that names the backend of token `token` (`cookie::backend_token`).
pub fn prefix(token: u32) -> String {
    format!("{token:08x}~")
}

/// The backend token at the front of a rewritten value, and the application's own value.
pub fn split(value: &str) -> Option<(u32, &str)> {
    if !is_prefix(value.as_bytes()) {
        return None;
    }
    let token = u32::from_str_radix(&value[..PREFIX_LEN - 1], 16).ok()?;
    Some((token, &value[PREFIX_LEN..]))
}

fn is_prefix(bytes: &[u8]) -> bool {
    bytes.len() >= PREFIX_LEN
        && bytes[..PREFIX_LEN - 1].iter().all(u8::is_ascii_hexdigit)
        && bytes[PREFIX_LEN - 1] == SEPARATOR
}

/// The request with the prefix taken off every value of cookie `name` in its head's `Cookie`
/// headers, and the bytes removed. A request whose head is not complete stays as it is.
pub fn strip(request: &[u8], name: &str) -> (Vec<u8>, usize) {
    let Some(head_end) = crate::http::head_end(request) else {
        return (request.to_vec(), 0);
    };
    let pair = format!("{name}=");
    let mut out = Vec::with_capacity(request.len());
    let mut removed = 0;
    for line in request[..head_end].split_inclusive(|&b| b == b'\n') {
        let is_cookie = line.len() > 7 && line[..7].eq_ignore_ascii_case(b"cookie:");
        if !is_cookie {
            out.extend_from_slice(line);
            continue;
        }
        let mut at = 0;
        while at < line.len() {
            let pair_start = at >= 7 && matches!(line[at - 1], b' ' | b'\t' | b';' | b':');
            if pair_start && line[at..].starts_with(pair.as_bytes()) {
                let value_at = at + pair.len();
                if is_prefix(&line[value_at..]) {
                    out.extend_from_slice(&line[at..value_at]);
                    at = value_at + PREFIX_LEN;
                    removed += PREFIX_LEN;
                    continue;
                }
            }
            out.push(line[at]);
            at += 1;
        }
    }
    out.extend_from_slice(&request[head_end..]);
    (out, removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cookie::backend_token;

    #[test]
    fn a_prefix_names_its_backend_and_comes_off_again() {
        let value = format!("{}abc-1", prefix(backend_token("backend-2")));
        let (token, own) = split(&value).expect("a prefixed value");
        assert_eq!(token, backend_token("backend-2"));
        assert_eq!(own, "abc-1");
        assert_eq!(split("abc-1"), None);
        assert_eq!(split("0123456z~abc"), None);
        assert_eq!(split("01234567-abc"), None);
    }

    #[test]
    fn only_the_named_cookies_prefix_is_stripped_from_the_head() {
        let p = prefix(backend_token("backend-1"));
        let request = format!(
            "POST / HTTP/1.1\r\nX-SID: SID={p}keep\r\ncookie: a=1; SID={p}v1;xSID={p}no\r\nCookie: SID={p}v2\r\n\r\nSID={p}body"
        );
        let (stripped, removed) = strip(request.as_bytes(), "SID");
        assert_eq!(removed, 2 * PREFIX_LEN);
        assert_eq!(
            String::from_utf8(stripped).unwrap(),
            format!("POST / HTTP/1.1\r\nX-SID: SID={p}keep\r\ncookie: a=1; SID=v1;xSID={p}no\r\nCookie: SID=v2\r\n\r\nSID={p}body")
        );
        let partial = format!("GET / HTTP/1.1\r\nCookie: SID={p}v");
        assert_eq!(strip(partial.as_bytes(), "SID").1, 0);
    }
}
