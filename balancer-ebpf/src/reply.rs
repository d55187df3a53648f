//! Frames the program builds in place of the one it received and sends back with XDP_TX: a
//! reset, a SYN-ACK. Both end with the frame resized and its checksums computed in full.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use balancer_common::{csum, PROTO_TCP};

use crate::{
    maps::TX_PORTS,
    packet::{ptr_at, IP_OFFSET, L4_OFFSET},
};

/// The action that sends the rebuilt frame back out of the interface it came in on.
///
/// A redirect to the ingress interface rather than XDP_TX: on veth, XDP_TX frames of an
/// skb-fed receive path wait in the peer's queue until something else wakes it (seen here as
/// SYN-ACKs arriving seconds late), while redirected frames are flushed at the end of the
/// poll. XDP_TX remains the fallback when the interface is not in `TX_PORTS`.
#[inline(always)]
pub fn send_back(ctx: &XdpContext) -> u32 {
    // SAFETY: reading the context's ingress interface index.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    match TX_PORTS.redirect(ifindex, u64::from(xdp_action::XDP_TX)) {
        Ok(action) | Err(action) => action,
    }
}

/// Grows or shrinks the frame to `len` bytes; pointers into it must be fetched again after.
/// A frame whose tail cannot grow (a driver may leave a small frame no tailroom) grows at its
/// head instead, into the headroom XDP always has: it then starts earlier, so the caller
/// writes every byte of every header, the Ethernet type included.
#[inline(always)]
pub fn resize(ctx: &XdpContext, len: usize) -> Option<()> {
    let delta = len as i32 - (ctx.data_end() - ctx.data()) as i32;
    if delta == 0 {
        return Some(());
    }
    // SAFETY: the kernel checks the new length against the frame's buffer.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } == 0 {
        return Some(());
    }
    // SAFETY: as above, against the headroom.
    (delta > 0 && unsafe { bpf_xdp_adjust_head(ctx.ctx, -delta) } == 0).then_some(())
}

/// Computes the IPv4 header checksum and the checksum of a TCP segment of `TCP_WORDS` 16-bit
/// words (header and options, no payload), both fields zero beforehand.
#[inline(always)]
pub fn write_checksums<const TCP_WORDS: usize>(ctx: &XdpContext) -> Option<()> {
    let ip: *mut [u16; 10] = ptr_at(ctx, IP_OFFSET)?;
    let tcp: *mut [u16; TCP_WORDS] = ptr_at(ctx, L4_OFFSET)?;
    // SAFETY: `ptr_at` checked that both lie inside the frame.
    let (ip, tcp) = unsafe { (&mut *ip, &mut *tcp) };
    let ip_sum: u32 = ip.iter().map(|w| u32::from(*w)).sum();
    ip[5] = !csum::fold(ip_sum);
    // Pseudo header: addresses, protocol and TCP length, all as they lie in memory.
    let pseudo = u32::from(ip[6])
        + u32::from(ip[7])
        + u32::from(ip[8])
        + u32::from(ip[9])
        + u32::from(u16::from_ne_bytes([0, PROTO_TCP]))
        + u32::from(((TCP_WORDS * 2) as u16).to_be());
    let tcp_sum: u32 = tcp.iter().map(|w| u32::from(*w)).sum();
    tcp[8] = !csum::fold(pseudo + tcp_sum);
    Some(())
}
