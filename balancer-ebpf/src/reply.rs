//! Frames the program builds in place of the one it received and sends back with XDP_TX: a
//! reset, a SYN-ACK. Each is written whole (Ethernet, a bare IP header of the packet's
//! family, TCP), so the extension headers or options of what came in are left behind, and
//! ends with the frame resized and its checksums computed in full.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use balancer_common::{
    csum,
    proto::{tcp_field, ETH_P_IPV4, ETH_P_IPV6, IPV4_HEADER_LEN, IPV6_HEADER_LEN},
    Addr, PROTO_TCP,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    maps::TX_PORTS,
    packet::{ptr_at, IP_OFFSET, L4_OFFSET_V4, L4_OFFSET_V6},
};

const TTL: u8 = 64;

/// Offset of the TCP header of a frame the program builds.
#[inline(always)]
pub const fn l4_offset(v6: bool) -> usize {
    if v6 {
        L4_OFFSET_V6
    } else {
        L4_OFFSET_V4
    }
}

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
/// head instead, into the headroom XDP always has: it then starts earlier, which is why the
/// whole frame is written after.
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

/// Writes the Ethernet header and a bare IP header of the family of `src` and `dst` for a TCP
/// segment of `tcp_len` bytes (checksum left for [`write_checksums`]).
#[inline(always)]
pub fn write_headers(
    ctx: &XdpContext,
    macs: ([u8; 6], [u8; 6]),
    src: &Addr,
    dst: &Addr,
    tcp_len: usize,
) -> Option<()> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let v6 = !src.is_v4();
    // SAFETY: `ptr_at` checked that each header lies inside the frame.
    unsafe {
        (*eth).src_addr = macs.0;
        (*eth).dst_addr = macs.1;
        if v6 {
            (*eth).ether_type = ETH_P_IPV6;
            let ip = &mut *ptr_at::<Ipv6Hdr>(ctx, IP_OFFSET)?;
            ip.vcf = [0x60, 0, 0, 0];
            ip.payload_len = (tcp_len as u16).to_be_bytes();
            ip.next_hdr = PROTO_TCP;
            ip.hop_limit = TTL;
            ip.src_addr = src.octets();
            ip.dst_addr = dst.octets();
        } else {
            (*eth).ether_type = ETH_P_IPV4;
            let ip = &mut *ptr_at::<Ipv4Hdr>(ctx, IP_OFFSET)?;
            ip.vihl = 0x45;
            ip.tos = 0;
            ip.tot_len = ((IPV4_HEADER_LEN + tcp_len) as u16).to_be_bytes();
            ip.id = [0; 2];
            ip.frags = [0x40, 0]; // don't fragment
            ip.ttl = TTL;
            ip.proto = PROTO_TCP;
            ip.check = [0; 2];
            ip.src_addr = src.v4_word().to_ne_bytes();
            ip.dst_addr = dst.v4_word().to_ne_bytes();
        }
    }
    Some(())
}

/// Computes the IPv4 header checksum (IPv6 has none) and the checksum of a TCP segment of
/// `TCP_WORDS` 16-bit words of header and options, whose field is zero beforehand, and
/// `payload` bytes of data whose words sum to `payload_sum` (see `csum`).
#[inline(always)]
pub fn write_checksums<const TCP_WORDS: usize>(
    ctx: &XdpContext,
    v6: bool,
    (payload, payload_sum): (usize, u16),
) -> Option<()> {
    // Pseudo header: addresses, protocol and TCP length, all as they lie in memory.
    let tcp_len = (TCP_WORDS * 2 + payload) as u16;
    let mut pseudo = u32::from(u16::from_ne_bytes([0, PROTO_TCP]))
        + u32::from(tcp_len.to_be())
        + u32::from(payload_sum);
    if v6 {
        let addresses: *const [u16; 16] = ptr_at(ctx, IP_OFFSET + 8)?;
        // SAFETY: `ptr_at` checked that the addresses lie inside the frame.
        pseudo += unsafe { &*addresses }
            .iter()
            .map(|w| u32::from(*w))
            .sum::<u32>();
    } else {
        let ip: *mut [u16; IPV4_HEADER_LEN / 2] = ptr_at(ctx, IP_OFFSET)?;
        // SAFETY: `ptr_at` checked that the header lies inside the frame.
        let ip = unsafe { &mut *ip };
        let ip_sum: u32 = ip.iter().map(|w| u32::from(*w)).sum();
        ip[5] = !csum::fold(ip_sum);
        pseudo += u32::from(ip[6]) + u32::from(ip[7]) + u32::from(ip[8]) + u32::from(ip[9]);
    }
    let tcp: *mut [u16; TCP_WORDS] = ptr_at(ctx, l4_offset(v6))?;
    // SAFETY: `ptr_at` checked that the segment lies inside the frame.
    let tcp = unsafe { &mut *tcp };
    let tcp_sum: u32 = tcp.iter().map(|w| u32::from(*w)).sum();
    tcp[tcp_field::CHECK / 2] = !csum::fold(pseudo + tcp_sum);
    Some(())
}

const _: () = assert!(IPV6_HEADER_LEN == Ipv6Hdr::LEN && IPV4_HEADER_LEN == Ipv4Hdr::LEN);
