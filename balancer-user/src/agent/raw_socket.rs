//! The raw sockets through which the agent sends the packets it writes whole: the SYN and
//! the replayed request to backends, acknowledgements, edited heads and resets to clients.
//!
//! Packets are queued while the agent handles a batch of punts (or a tick) and go out
//! together, one `sendmmsg` per address family: under load one system call carries the
//! packets of many connections. The map entries a packet relies on are written before it
//! is queued, so they are in place when it leaves.

use std::{
    cell::RefCell,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{bail, Result};

use crate::{segment::Segment, throttle::throttled};

/// Packets a single `sendmmsg` takes at most (the kernel's `UIO_MAXIOV`).
const MAX_BATCH: usize = 1024;

pub struct RawSockets {
    v4: OwnedFd,
    v6: OwnedFd,
    /// Packets waiting for [`RawSockets::flush`], with their destination, in order.
    queued: RefCell<Vec<(IpAddr, Vec<u8>)>>,
}

/// A destination as the socket calls take it.
union SocketAddress {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

impl RawSockets {
    pub fn new() -> Result<Self> {
        Ok(Self {
            v4: raw_socket(libc::AF_INET)?,
            v6: raw_socket(libc::AF_INET6)?,
            queued: RefCell::new(Vec::new()),
        })
    }

    /// Queues an IP packet (headers included) for the raw socket of its family.
    pub fn send(&self, segment: &Segment) {
        self.queued
            .borrow_mut()
            .push((segment.dst, segment.to_packet()));
    }

    /// Sends the queued packets, in the order they were queued within each family.
    pub fn flush(&self) {
        let queued = std::mem::take(&mut *self.queued.borrow_mut());
        if queued.is_empty() {
            return;
        }
        let (v4, v6): (Vec<_>, Vec<_>) = queued.into_iter().partition(|(to, _)| to.is_ipv4());
        for (fd, packets) in [(&self.v4, v4), (&self.v6, v6)] {
            for batch in packets.chunks(MAX_BATCH) {
                send_batch(fd, batch);
            }
        }
    }
}

/// Sends `packets` through `fd` with as few `sendmmsg` calls as the kernel takes them in; a
/// packet the kernel refuses is logged and skipped.
fn send_batch(fd: &OwnedFd, packets: &[(IpAddr, Vec<u8>)]) {
    // The kernel takes the destination from the header; the address only picks the route.
    let mut addresses: Vec<SocketAddress> = packets.iter().map(|(to, _)| address(*to)).collect();
    let mut iovecs: Vec<libc::iovec> = packets
        .iter()
        .map(|(_, packet)| libc::iovec {
            iov_base: packet.as_ptr().cast_mut().cast(),
            iov_len: packet.len(),
        })
        .collect();
    // SAFETY: an all-zero mmsghdr is a valid empty one.
    let mut messages: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; packets.len()];
    for (index, message) in messages.iter_mut().enumerate() {
        let header = &mut message.msg_hdr;
        header.msg_name = std::ptr::from_mut(&mut addresses[index]).cast();
        header.msg_namelen = match packets[index].0 {
            IpAddr::V4(_) => std::mem::size_of::<libc::sockaddr_in>(),
            IpAddr::V6(_) => std::mem::size_of::<libc::sockaddr_in6>(),
        } as libc::socklen_t;
        header.msg_iov = std::ptr::from_mut(&mut iovecs[index]);
        header.msg_iovlen = 1;
    }
    let mut next = 0;
    while next < messages.len() {
        let rest = &mut messages[next..];
        // SAFETY: every message points at an address, an iovec and a packet that outlive
        // the call, with the lengths given.
        let sent = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                rest.as_mut_ptr(),
                rest.len() as libc::c_uint,
                0,
            )
        };
        if sent > 0 {
            next += sent as usize;
            continue;
        }
        let error = std::io::Error::last_os_error();
        if error.kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        throttled!(warn, dst = %packets[next].0, "sending through the raw socket: {error}");
        next += 1;
    }
}

fn address(to: IpAddr) -> SocketAddress {
    match to {
        IpAddr::V4(dst) => {
            // SAFETY: an all-zero sockaddr_in is valid.
            let mut v4: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            v4.sin_family = libc::AF_INET as libc::sa_family_t;
            v4.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
            SocketAddress { v4 }
        }
        IpAddr::V6(dst) => {
            // SAFETY: an all-zero sockaddr_in6 is valid.
            let mut v6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            v6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            v6.sin6_addr.s6_addr = dst.octets();
            SocketAddress { v6 }
        }
    }
}

/// A raw socket of `family` for packets the agent writes whole, headers included (for IPv6,
/// `IPPROTO_RAW` implies `IPV6_HDRINCL`).
fn raw_socket(family: libc::c_int) -> Result<OwnedFd> {
    // SAFETY: plain socket creation; the descriptor is owned right after.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        bail!(
            "opening a raw socket for backend connections: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
