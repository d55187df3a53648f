//! HTTP/1 framing the agent needs on both sides of a connection.

/// The end of the head that starts `bytes` (just past its empty line), if it is complete. A
/// line may end in CRLF or in a bare LF, as httparse (and every lenient server) accepts.
pub fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .find_map(|(at, _)| match bytes.get(at + 1..) {
            Some([b'\n', ..]) => Some(at + 2),
            Some([b'\r', b'\n', ..]) => Some(at + 3),
            _ => None,
        })
}

/// The value of URL parameter `name` in the request line of `request`: in the query string
/// (`?name=value&...`) or as a path parameter (`/app;name=value`), the first found; none when
/// empty. The request line is read up to its first space-delimited target alone, so a head
/// still arriving does not need to be complete.
pub fn url_param(request: &[u8], name: &str) -> Option<String> {
    let line_end = request
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(request.len());
    let line = std::str::from_utf8(&request[..line_end]).ok()?;
    let target = line.split(' ').nth(1)?;
    let target = target.split('#').next().unwrap_or(target);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let from_path = path
        .split('/')
        .flat_map(|segment| segment.split(';').skip(1));
    from_path
        .chain(query.split('&'))
        .filter_map(|pair| pair.split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value.to_owned())
        .filter(|value| !value.is_empty())
}

/// The request's `Host` (lowercase, its port aside) and its target's path (the query
/// aside), for routes; the head may be a partial one.
pub fn host_and_path(request: &[u8]) -> (Option<String>, String) {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    // A partial head (too large) still has its complete header lines parsed.
    let _ = parsed.parse(request);
    let target = parsed.path.unwrap_or("/");
    // An absolute-form target (`http://host/path`, to proxies) carries its path after the
    // authority.
    let target = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |at| &rest[at..]),
        None => target,
    };
    let path = target.split(['?', '#']).next().unwrap_or("/").to_owned();
    let host = parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(|value| {
            let value = value.trim();
            // An IPv6 literal keeps its brackets; a port follows the last colon after them.
            let end = match value.rfind(':') {
                Some(at) if !value[at..].contains(']') => at,
                _ => value.len(),
            };
            value[..end].to_ascii_lowercase()
        });
    (host, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_read_the_host_without_its_port_and_the_path_without_its_query() {
        let of = |head: &str| host_and_path(head.as_bytes());
        assert_eq!(
            of("GET /shop/cart?x=1 HTTP/1.1\r\nHost: Shop.Example:8080\r\n\r\n"),
            (Some("shop.example".into()), "/shop/cart".into())
        );
        assert_eq!(
            of("GET http://a.example/blog HTTP/1.1\r\nHost: a.example\r\n\r\n"),
            (Some("a.example".into()), "/blog".into())
        );
        assert_eq!(
            of("GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n").0,
            Some("[2001:db8::1]".into())
        );
        assert_eq!(of("GET / HTTP/1.0\r\n\r\n"), (None, "/".into()));
    }

    #[test]
    fn url_parameters_are_read_from_the_query_and_from_path_parameters() {
        let value = |line: &str| url_param(line.as_bytes(), "sessionID");
        assert_eq!(
            value("GET /?sessionID=abc HTTP/1.1\r\n"),
            Some("abc".into())
        );
        assert_eq!(
            value("GET /cart?x=1&sessionID=a%2Fb&y=2 HTTP/1.1\r\n"),
            Some("a%2Fb".into())
        );
        assert_eq!(
            value("GET /shop;sessionID=42/item?x=1 HTTP/1.1\r\n"),
            Some("42".into())
        );
        assert_eq!(
            value("GET /a;v=1;sessionID=7 HTTP/1.1\r\n"),
            Some("7".into())
        );
        assert_eq!(
            value("GET /?sessionID=z#frag HTTP/1.1\r\n"),
            Some("z".into())
        );
        assert_eq!(value("GET /?sessionIDX=1&xsessionID=2 HTTP/1.1\r\n"), None);
        assert_eq!(value("GET /?sessionID= HTTP/1.1\r\n"), None);
        assert_eq!(
            value("GET /sessionID=1 HTTP/1.1\r\n"),
            None,
            "not a parameter"
        );
        assert_eq!(
            value("GET /\r\nReferer: /?sessionID=9\r\n"),
            None,
            "the request line only"
        );
        assert_eq!(value("\u{ff}garbage"), None);
        assert_eq!(value(""), None);
    }

    #[test]
    fn a_head_ends_at_its_empty_line_whatever_its_line_endings() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\nbody"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\r\n\nbody"), Some(25));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b""), None);
    }
}
