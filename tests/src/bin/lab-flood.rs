//! The lab's packet generator (the kernel here has no pktgen): small UDP datagrams to one
//! address, IPv4 or IPv6, as fast as its threads can send them in `sendmmsg` batches, for a
//! bounded time and count. Each thread sends from a socket of its own, so each is one flow.
//! Prints how many datagrams the kernel took.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Parser;

/// Datagrams handed to the kernel per system call.
const BATCH: usize = 64;

#[derive(Parser)]
#[command(about = "Sends small UDP datagrams as fast as it can, for the benchmark's packet rate")]
struct Args {
    /// Where to send (`address:port`, `[address]:port` for IPv6).
    #[arg(long)]
    to: SocketAddr,
    /// Sending threads, each one flow.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// UDP payload bytes; 18 make 64-byte Ethernet frames (with the frame check sequence)
    /// over IPv4, 84-byte ones over IPv6.
    #[arg(long, default_value_t = 18)]
    payload: usize,
    /// How long to send.
    #[arg(long)]
    seconds: f64,
    /// Stop after this many datagrams in all, whatever the time.
    #[arg(long, default_value_t = 200_000_000)]
    max_packets: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds.clamp(0.1, 600.0));
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..args.threads.clamp(1, 16))
        .map(|_| {
            let sent = sent.clone();
            let (to, payload, max) = (args.to, args.payload.min(1472), args.max_packets);
            std::thread::spawn(move || flood(to, payload, deadline, max, &sent))
        })
        .collect();
    for thread in threads {
        thread.join().expect("a sender thread panicked")?;
    }
    let total = sent.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    println!("sent {total} datagrams in {elapsed:.3} s");
    Ok(())
}

fn flood(
    to: SocketAddr,
    payload: usize,
    deadline: Instant,
    max: u64,
    sent: &AtomicU64,
) -> Result<()> {
    let any = match to {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(any).context("binding a UDP socket")?;
    socket
        .connect(to)
        .with_context(|| format!("connecting to {to}"))?;
    let mut data = vec![0x5au8; payload.max(1)];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: payload,
    };
    // SAFETY: `mmsghdr` is plain data; zero is a valid start before the fields are set.
    let mut messages: Vec<libc::mmsghdr> =
        (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for message in &mut messages {
        message.msg_hdr.msg_iov = &mut iov;
        message.msg_hdr.msg_iovlen = 1;
    }
    while Instant::now() < deadline && sent.load(Ordering::Relaxed) < max {
        // SAFETY: every header points at `iov`, which points at `data`; both outlive the call.
        let n =
            unsafe { libc::sendmmsg(socket.as_raw_fd(), messages.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        // A full queue (ENOBUFS) or an ICMP error from an earlier datagram (ECONNREFUSED)
        // only means: send again.
    }
    Ok(())
}
