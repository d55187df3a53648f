//! The lab's backend server: HTTP/1.1 with keep-alive, a TCP echo and a UDP echo, each
//! answer naming the backend so tests can tell where a request landed.
//!
//! HTTP: `GET /` → `<name>\n`; `GET /bytes/<n>` → n bytes of the lab's test data, streamed;
//! `POST /upload` → `<sha256 hex> <byte count>\n` of the body. Every response carries
//! `X-Backend: <name>`.

use std::{net::SocketAddr, sync::Arc};

use anyhow::{Context, Result};
use balancer_lab::data::TestData;
use clap::Parser;
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream, UdpSocket},
};

#[derive(Parser)]
#[command(about = "HTTP, TCP echo and UDP echo server for the balancer's namespace lab")]
struct Args {
    /// The name every answer carries.
    #[arg(long)]
    name: String,
    #[arg(long, default_value_t = 80)]
    http_port: u16,
    #[arg(long, default_value_t = 7)]
    echo_port: u16,
}

const MAX_HEAD: usize = 64 * 1024;
const CHUNK: usize = 64 * 1024;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let name: Arc<str> = args.name.into();
    let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
    let http = TcpListener::bind(any(args.http_port))
        .await
        .context("binding the HTTP port")?;
    let echo = TcpListener::bind(any(args.echo_port))
        .await
        .context("binding the TCP echo port")?;
    let udp = UdpSocket::bind(any(args.echo_port))
        .await
        .context("binding the UDP echo port")?;

    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&buf[..n], peer).await;
        }
    });
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    loop {
        let (stream, _) = http.accept().await.context("accepting HTTP connections")?;
        let name = name.clone();
        tokio::spawn(async move {
            let _ = serve_http(stream, &name).await;
        });
    }
}

/// Serves requests on one connection until the client closes it or asks to.
async fn serve_http(stream: TcpStream, name: &str) -> Result<()> {
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::with_capacity(CHUNK, read);
    let mut pending = Vec::new();
    loop {
        let Some((head_len, request)) = read_head(&mut reader, &mut pending).await? else {
            return Ok(());
        };
        pending.drain(..head_len);
        let close = request.close;
        match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/") => {
                let body = format!("{name}\n");
                respond(&mut write, 200, name, body.len() as u64, close).await?;
                write.write_all(body.as_bytes()).await?;
            }
            ("GET", path) if path.starts_with("/bytes/") => {
                let Ok(size) = path["/bytes/".len()..].parse::<u64>() else {
                    respond_text(&mut write, 400, name, "bad size\n", close).await?;
                    continue;
                };
                respond(&mut write, 200, name, size, close).await?;
                let mut data = TestData::default();
                let mut buf = vec![0u8; CHUNK];
                let mut left = size;
                while left > 0 {
                    data.fill(&mut buf);
                    let n = left.min(CHUNK as u64) as usize;
                    write.write_all(&buf[..n]).await?;
                    left -= n as u64;
                }
            }
            ("POST", "/upload") => {
                let mut hasher = Sha256::new();
                let mut left = request.content_length;
                let from_pending = pending.len().min(left as usize);
                hasher.update(&pending[..from_pending]);
                pending.drain(..from_pending);
                left -= from_pending as u64;
                let mut buf = vec![0u8; CHUNK];
                while left > 0 {
                    let want = left.min(CHUNK as u64) as usize;
                    let n = reader.read(&mut buf[..want]).await?;
                    anyhow::ensure!(n > 0, "client closed during the body");
                    hasher.update(&buf[..n]);
                    left -= n as u64;
                }
                let digest: String = hasher
                    .finalize()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let body = format!("{digest} {}\n", request.content_length);
                respond_text(&mut write, 200, name, &body, close).await?;
            }
            _ => respond_text(&mut write, 404, name, "not found\n", close).await?,
        }
        write.flush().await?;
        if close {
            return Ok(());
        }
    }
}

struct Request {
    method: String,
    path: String,
    content_length: u64,
    close: bool,
}

/// Reads until a complete request head is in `pending`; `None` when the client closed first.
async fn read_head(
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    pending: &mut Vec<u8>,
) -> Result<Option<(usize, Request)>> {
    let mut buf = [0u8; 8192];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(len) = parsed.parse(pending)? {
            let header = |wanted: &str| {
                parsed
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(wanted))
                    .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
            };
            let content_length = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let close = header("connection").is_some_and(|v| v == "close")
                || parsed.version == Some(0)
                    && header("connection").is_none_or(|v| v != "keep-alive");
            let request = Request {
                method: parsed.method.unwrap_or("").to_owned(),
                path: parsed.path.unwrap_or("").to_owned(),
                content_length,
                close,
            };
            return Ok(Some((len, request)));
        }
        anyhow::ensure!(
            pending.len() < MAX_HEAD,
            "request head larger than {MAX_HEAD} bytes"
        );
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

async fn respond(
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    status: u16,
    name: &str,
    length: u64,
    close: bool,
) -> Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Not Found",
    };
    let connection = if close { "close" } else { "keep-alive" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nX-Backend: {name}\r\nContent-Length: {length}\r\nContent-Type: application/octet-stream\r\nConnection: {connection}\r\n\r\n"
    );
    write.write_all(head.as_bytes()).await?;
    Ok(())
}

async fn respond_text(
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    status: u16,
    name: &str,
    body: &str,
    close: bool,
) -> Result<()> {
    respond(write, status, name, body.len() as u64, close).await?;
    write.write_all(body.as_bytes()).await?;
    Ok(())
}
