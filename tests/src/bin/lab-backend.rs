//! The lab's backend server: HTTP/1.1 with keep-alive (hyper), a TCP echo and a UDP echo, each
//! answer naming the backend so tests can tell where a request landed.
//!
//! HTTP: `GET /` → `<name>\n`; `GET /cookies` → the request's `Cookie` headers;
//! `GET /peer` → the address and port the connection came from (`<ip> <port>\n`);
//! `GET /peers` → `<distinct> <connections>\n`: how many distinct (address, port) sources
//! the HTTP connections so far came from, and how many connections there were; then a line
//! `<source> <ms> <ms>...` for each source that came more than once, with the times (since
//! the backend started) its connections were accepted;
//! `GET /bytes/<n>` → n bytes of the lab's test data, streamed;
//! `POST /upload` → `<sha256 hex> <byte count>\n` of the body, read as it streams; `?pad=<n>`
//! adds an `X-Padding` header of n bytes to any answer, `?delay=<ms>` holds it back. Every
//! response carries `X-Backend: <name>`, and a response to a request without the application's
//! session cookie sets one (`Set-Cookie: SID=<name>-<n>`, with `Max-Age=<n>` for
//! `?max_age=<n>`), as a web application would; `/logout` deletes it (`SID=; Max-Age=0`).
//! `GET /ws` with `Upgrade: websocket` opens a WebSocket that echoes each message.
//! The same HTTP on `--proxy-port` (8091) takes connections that start with a PROXY protocol
//! v2 header (and closes those that do not): there the client is the header's, and `/peer`
//! answers `<client ip> <client port> via <ip> <port>`, the last two the connection's own.
//! `lab-backend --generate <n>` prints the bytes that `/bytes/<n>` serves.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context as TaskContext, Poll},
};

use anyhow::{Context, Result};
use balancer_lab::data::{self, Chunks};
use clap::Parser;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{
    body::{Body, Bytes, Frame, Incoming, SizeHint},
    header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};

#[derive(Parser)]
#[command(about = "HTTP, TCP echo and UDP echo server for the balancer's namespace lab")]
struct Args {
    /// The name every answer carries.
    #[arg(long, required_unless_present = "generate")]
    name: Option<String>,
    #[arg(long, default_value_t = 80)]
    http_port: u16,
    #[arg(long, default_value_t = 7)]
    echo_port: u16,
    /// HTTP behind a PROXY protocol v2 header.
    #[arg(long, default_value_t = 8091)]
    proxy_port: u16,
    /// Print the first N bytes of the test data to stdout and exit.
    #[arg(long, value_name = "N")]
    generate: Option<u64>,
}

type ResponseBody = BoxBody<Bytes, Infallible>;

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(size) = args.generate {
        let stdout = std::io::stdout();
        return data::copy_test_data(&mut stdout.lock(), size).context("writing the test data");
    }
    let name: Arc<str> = args.name.context("--name is required")?.into();
    std::sync::LazyLock::force(&STARTED);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(serve(name, args.http_port, args.echo_port, args.proxy_port))
}

async fn serve(name: Arc<str>, http_port: u16, echo_port: u16, proxy_port: u16) -> Result<()> {
    // `[::]` takes IPv4 as well (as mapped addresses): one socket per port serves both.
    let any = |port| SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    let http =
        listen(any(http_port)).with_context(|| format!("binding the HTTP port {http_port}"))?;
    let echo = TcpListener::bind(any(echo_port))
        .await
        .with_context(|| format!("binding the TCP echo port {echo_port}"))?;
    let udp = UdpSocket::bind(any(echo_port))
        .await
        .with_context(|| format!("binding the UDP echo port {echo_port}"))?;
    let proxied =
        listen(any(proxy_port)).with_context(|| format!("binding the PROXY port {proxy_port}"))?;
    eprintln!(
        "{name}: serving HTTP on {http_port} (behind a PROXY header on {proxy_port}), TCP and UDP echo on {echo_port}"
    );

    tokio::spawn(udp_echo(udp));
    tokio::spawn(tcp_echo(echo));
    let proxied_name = name.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = proxied.accept().await {
            tokio::spawn(serve_proxied(stream, proxied_name.clone()));
        }
    });
    loop {
        let (stream, _) = http.accept().await.context("accepting HTTP connections")?;
        let peer = stream.peer_addr().ok();
        tokio::spawn(serve_http(
            stream,
            name.clone(),
            Peer {
                client: peer,
                wire: None,
            },
        ));
    }
}

/// Who a connection is from: its client, and for a connection behind a PROXY header, the
/// address it came from on the wire.
#[derive(Clone, Copy)]
struct Peer {
    client: Option<SocketAddr>,
    wire: Option<SocketAddr>,
}

/// Reads a connection's PROXY v2 header, then serves it as HTTP from the client it names.
async fn serve_proxied(mut stream: TcpStream, name: Arc<str>) {
    let wire = stream.peer_addr().ok();
    if let Ok(client) = read_proxy_header(&mut stream).await {
        serve_http(
            stream,
            name,
            Peer {
                client: Some(client),
                wire,
            },
        )
        .await;
    }
}

/// The client address of a PROXY protocol v2 header (TCP over IPv4 or IPv6).
async fn read_proxy_header(stream: &mut TcpStream) -> Result<SocketAddr> {
    let mut fixed = [0u8; 16];
    stream.read_exact(&mut fixed).await?;
    anyhow::ensure!(
        &fixed[..12] == b"\r\n\r\n\0\r\nQUIT\n" && fixed[12] == 0x21,
        "not a PROXY v2 header"
    );
    let mut addresses = vec![0u8; usize::from(u16::from_be_bytes([fixed[14], fixed[15]]))];
    stream.read_exact(&mut addresses).await?;
    let port = |at: usize| u16::from_be_bytes([addresses[at], addresses[at + 1]]);
    match (fixed[13], addresses.len()) {
        (0x11, 12) => {
            let ip: [u8; 4] = addresses[..4].try_into()?;
            Ok(SocketAddr::from((ip, port(8))))
        }
        (0x21, 36) => {
            let ip: [u8; 16] = addresses[..16].try_into()?;
            Ok(SocketAddr::from((ip, port(32))))
        }
        (family, len) => anyhow::bail!("family {family:#x} with {len} address bytes"),
    }
}

/// A listener with the accept queue the kernel allows (`somaxconn`, 4096 here) rather than
/// tokio's 1024, as a production server would have: bursts of new connections through the
/// balancer must not overflow it.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v6()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

const LISTEN_BACKLOG: u32 = 4096;

/// Replies each datagram to its sender.
async fn udp_echo(udp: UdpSocket) {
    let mut buf = vec![0u8; 65536];
    while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
        let _ = udp.send_to(&buf[..n], peer).await;
    }
}

/// Echoes every connection's bytes back until the client closes its side.
async fn tcp_echo(listener: TcpListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut read, mut write) = stream.split();
            if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                let _ = write.shutdown().await;
            }
        });
    }
}

/// Serves HTTP/1.1 requests on one connection, keep-alive included.
async fn serve_http(stream: TcpStream, name: Arc<str>, peer: Peer) {
    let _ = stream.set_nodelay(true);
    if let Some(peer) = peer.wire.or(peer.client) {
        let mut peers = PEERS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        peers
            .0
            .entry(peer)
            .or_default()
            .push(STARTED.elapsed().as_millis());
        peers.1 += 1;
    }
    let service = service_fn(move |request| handle(request, name.clone(), peer));
    let _ = http1::Builder::new()
        .keep_alive(true)
        // A client may shut its sending side once its request is out (`nc -N`, HTTP/1.0
        // tools) and still wait for the answer, as nginx and most servers allow.
        .half_close(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
}

async fn handle(
    request: Request<Incoming>,
    name: Arc<str>,
    peer: Peer,
) -> Result<Response<ResponseBody>, hyper::Error> {
    let path = request.uri().path().to_owned();
    if path == "/ws" {
        return Ok(with_backend(websocket(request), &name));
    }
    let request_query = request.uri().query().map(str::to_owned);
    let cookies: Vec<String> = request
        .headers()
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    let has_session = request
        .headers()
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .any(|pair| pair.trim().starts_with(&format!("{SESSION_COOKIE}=")));
    if let Some(delay) = query_number(request_query.as_deref(), "delay") {
        tokio::time::sleep(std::time::Duration::from_millis(delay.min(30_000) as u64)).await;
    }
    let response = match (request.method(), path.as_str()) {
        (&Method::GET, "/" | "/logout") => text(StatusCode::OK, format!("{name}\n")),
        (&Method::GET, "/cookies") => text(StatusCode::OK, format!("{}\n", cookies.join("; "))),
        (&Method::GET, "/peers") => {
            let peers = PEERS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut answer = format!("{} {}\n", peers.0.len(), peers.1);
            for (peer, times) in peers.0.iter().filter(|(_, times)| times.len() > 1) {
                let times: Vec<String> = times.iter().map(u128::to_string).collect();
                answer.push_str(&format!("{peer} {}\n", times.join(" ")));
            }
            text(StatusCode::OK, answer)
        }
        (&Method::GET, "/peer") => {
            // The listener takes IPv4 as mapped addresses: shown as the client sent them.
            let show = |a: SocketAddr| format!("{} {}", a.ip().to_canonical(), a.port());
            match (peer.client, peer.wire) {
                (Some(client), None) => text(StatusCode::OK, format!("{}\n", show(client))),
                (Some(client), Some(wire)) => text(
                    StatusCode::OK,
                    format!("{} via {}\n", show(client), show(wire)),
                ),
                _ => text(StatusCode::INTERNAL_SERVER_ERROR, "no peer\n".to_owned()),
            }
        }
        (&Method::GET, path) if path.starts_with("/bytes/") => {
            match path["/bytes/".len()..].parse::<u64>() {
                Ok(size) => bytes(size),
                Err(_) => text(StatusCode::BAD_REQUEST, "bad size\n".to_owned()),
            }
        }
        (&Method::POST, "/upload") => {
            let (digest, count) = digest_body(request.into_body()).await?;
            text(StatusCode::OK, format!("{digest} {count}\n"))
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut response = with_backend(response, &name);
    if let Some(padding) = query_number(request_query.as_deref(), "pad").and_then(padding) {
        response.headers_mut().insert("x-padding", padding);
    }
    // `/logout` deletes the session cookie; `?max_age=N` gives a new one that lifetime.
    let session_cookie = if path == "/logout" {
        Some(format!("{SESSION_COOKIE}=; Max-Age=0; Path=/"))
    } else if !has_session {
        let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
        let lifetime = query_number(request_query.as_deref(), "max_age")
            .map(|seconds| format!("; Max-Age={seconds}"))
            .unwrap_or_default();
        Some(format!("{SESSION_COOKIE}={name}-{n}{lifetime}; Path=/"))
    } else {
        None
    };
    if let Some(value) = session_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response
            .headers_mut()
            .insert(hyper::header::SET_COOKIE, value);
    }
    Ok(response)
}

/// RFC 6455's key suffix for `Sec-WebSocket-Accept`.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Accepts a WebSocket handshake (101) and echoes the connection's messages once upgraded.
fn websocket(mut request: Request<Incoming>) -> Response<ResponseBody> {
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return text(
            StatusCode::BAD_REQUEST,
            "not a WebSocket handshake\n".to_owned(),
        );
    };
    let mut sha1 = sha1::Sha1::new();
    sha1::Digest::update(&mut sha1, key.as_bytes());
    sha1::Digest::update(&mut sha1, WEBSOCKET_GUID.as_bytes());
    let accept = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        sha1::Digest::finalize(sha1),
    );
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let _ = echo_messages(TokioIo::new(upgraded)).await;
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()).boxed());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::UPGRADE,
        HeaderValue::from_static("websocket"),
    );
    headers.insert(
        hyper::header::CONNECTION,
        HeaderValue::from_static("Upgrade"),
    );
    if let Ok(value) = HeaderValue::from_str(&accept) {
        headers.insert("sec-websocket-accept", value);
    }
    response
}

/// Echoes WebSocket frames (client frames are masked, the server's are not) until a close
/// frame, which is echoed too.
async fn echo_messages(
    mut io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
) -> std::io::Result<()> {
    loop {
        let mut head = [0u8; 2];
        io.read_exact(&mut head).await?;
        let opcode = head[0] & 0x0f;
        let len = match head[1] & 0x7f {
            126 => {
                let mut ext = [0u8; 2];
                io.read_exact(&mut ext).await?;
                usize::from(u16::from_be_bytes(ext))
            }
            127 => return Ok(()),
            n => usize::from(n),
        };
        let mut mask = [0u8; 4];
        if head[1] & 0x80 != 0 {
            io.read_exact(&mut mask).await?;
        }
        let mut payload = vec![0u8; len];
        io.read_exact(&mut payload).await?;
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[i % 4];
        }
        let mut frame = vec![head[0]];
        if len < 126 {
            frame.push(len as u8);
        } else {
            frame.push(126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        frame.extend_from_slice(&payload);
        io.write_all(&frame).await?;
        if opcode == 8 {
            return io.shutdown().await;
        }
    }
}

/// The number `<name>=<n>` in a query.
fn query_number(query: Option<&str>, name: &str) -> Option<usize> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))?
        .parse()
        .ok()
}

/// An `X-Padding` value of `n` bytes (at most 64 KB), so that tests get response heads over
/// several segments.
fn padding(n: usize) -> Option<HeaderValue> {
    let pattern = b"0123456789abcdef";
    let value: Vec<u8> = pattern.iter().cycle().take(n.min(65536)).copied().collect();
    HeaderValue::from_bytes(&value).ok()
}

/// The application's session cookie.
const SESSION_COOKIE: &str = "SID";
/// Sessions this backend has started.
static SESSIONS: AtomicU64 = AtomicU64::new(0);

/// The sources HTTP connections came from with the times each was accepted, and how many
/// connections there were.
type Peers = (std::collections::HashMap<SocketAddr, Vec<u128>>, u64);
static PEERS: std::sync::LazyLock<std::sync::Mutex<Peers>> =
    std::sync::LazyLock::new(Default::default);
/// When the backend started: the origin of the times `/peers` shows.
static STARTED: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

fn with_backend(mut response: Response<ResponseBody>, name: &str) -> Response<ResponseBody> {
    if let Ok(value) = HeaderValue::from_str(name) {
        response.headers_mut().insert("x-backend", value);
    }
    response
}

fn text(status: StatusCode, body: String) -> Response<ResponseBody> {
    let length = body.len();
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    response
}

/// `size` bytes of test data, generated chunk by chunk as the connection drains.
fn bytes(size: u64) -> Response<ResponseBody> {
    let mut response = Response::new(
        TestDataBody {
            chunks: Chunks::new(size),
        }
        .boxed(),
    );
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(CONTENT_LENGTH, HeaderValue::from(size));
    response
}

/// sha256 and length of a request body, read frame by frame.
async fn digest_body(mut body: Incoming) -> Result<(String, u64), hyper::Error> {
    let mut hasher = Sha256::new();
    let mut count = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(chunk) = frame?.into_data() {
            hasher.update(&chunk);
            count += chunk.len() as u64;
        }
    }
    Ok((data::hex(&hasher.finalize()), count))
}

/// A response body that generates the test data as hyper asks for it, so that large
/// downloads are never held in memory.
struct TestDataBody {
    chunks: Chunks,
}

impl Body for TestDataBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(
            self.chunks
                .next()
                .map(|chunk| Ok(Frame::data(Bytes::from(chunk)))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.remaining() == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.chunks.remaining())
    }
}
