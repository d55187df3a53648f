//! Forwarding: the kernel FIB names the egress interface and next hop, the frame leaves through
//! `TX_PORTS`. Anything the FIB cannot resolve yet goes up the host stack, already rewritten,
//! which forwards it and resolves the neighbour for the packets that follow.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use balancer_common::Reason;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    fib::{self, Hop},
    maps::TX_PORTS,
    packet::{ptr_at, Packet, IP_OFFSET},
    stats::Verdict,
};

/// Sends a rewritten packet towards its new destination; `reason` is what success counts as.
#[inline(always)]
pub fn redirect(ctx: &XdpContext, packet: &Packet, reason: Reason) -> Result<Verdict, Verdict> {
    let truncated = Verdict::drop(Reason::DropTruncated);
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(truncated)?;
    // SAFETY: `ptr_at` checked that each header lies inside the frame.
    let hop = unsafe {
        if packet.v6 {
            let ip: *mut Ipv6Hdr = ptr_at(ctx, IP_OFFSET).ok_or(truncated)?;
            fib::next_hop_v6(ctx, &mut *eth, &mut *ip)
        } else {
            let ip: *mut Ipv4Hdr = ptr_at(ctx, IP_OFFSET).ok_or(truncated)?;
            fib::next_hop_v4(ctx, &mut *eth, &mut *ip)
        }
    };
    let ifindex = match hop {
        Hop::Via(ifindex) => ifindex,
        Hop::Expired => return Ok(Verdict::pass(Reason::PassTtlExpired)),
        Hop::Unknown => return Ok(Verdict::pass(Reason::PassNoRoute)),
    };
    match TX_PORTS.redirect(ifindex, u64::from(xdp_action::XDP_PASS)) {
        Ok(action) => Ok(Verdict { action, reason }),
        Err(_) => Ok(Verdict::pass(Reason::PassNoRoute)),
    }
}
