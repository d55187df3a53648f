//! The raw sockets through which the agent sends the packets it writes whole: the SYN and
//! the replayed request to backends, acknowledgements, edited heads and resets to clients.

use std::{
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{bail, Result};

use crate::{segment::Segment, throttle::throttled};

pub struct RawSockets {
    v4: OwnedFd,
    v6: OwnedFd,
}

impl RawSockets {
    pub fn new() -> Result<Self> {
        Ok(Self {
            v4: raw_socket(libc::AF_INET)?,
            v6: raw_socket(libc::AF_INET6)?,
        })
    }

    /// Sends an IP packet (headers included) through the raw socket of its family.
    pub fn send(&self, segment: &Segment) {
        let packet = segment.to_packet();
        // The kernel takes the destination from the header; the address only picks the route.
        // SAFETY: both socket addresses are plain data.
        let (mut v4, mut v6): (libc::sockaddr_in, libc::sockaddr_in6) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        let (fd, to, to_len) = match segment.dst {
            IpAddr::V4(dst) => {
                v4.sin_family = libc::AF_INET as libc::sa_family_t;
                v4.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
                (
                    &self.v4,
                    std::ptr::from_ref(&v4).cast::<libc::sockaddr>(),
                    std::mem::size_of::<libc::sockaddr_in>(),
                )
            }
            IpAddr::V6(dst) => {
                v6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                v6.sin6_addr.s6_addr = dst.octets();
                (
                    &self.v6,
                    std::ptr::from_ref(&v6).cast::<libc::sockaddr>(),
                    std::mem::size_of::<libc::sockaddr_in6>(),
                )
            }
        };
        // SAFETY: `packet` and `to` are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                to,
                to_len as libc::socklen_t,
            )
        };
        if sent < 0 {
            throttled!(warn, dst = %segment.dst, "sending through the raw socket: {}", std::io::Error::last_os_error());
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
