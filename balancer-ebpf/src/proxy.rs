//! PROXY protocol v2 for L4 TCP flows of full-NAT services: the header goes in front of the
//! client's first data byte, inside the segment that carries it (again each time the client
//! sends that segment again). The client's later bytes then lie the header's length further on
//! in the backend's sequence space, and the backend's acknowledgements and SACK blocks come
//! back by as much: the shift spliced cookie connections use for a shortened request, negated
//! (`removed`). The backend's SYN-ACK offers an MSS smaller by the header, so the segment the
//! header goes into still fits the path.

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    programs::XdpContext,
};
use balancer_common::{
    csum,
    proto::{
        tcp_field,
        tcp_flag::{ACK, RST, SYN},
        tcp_option, TCP_HEADER_LEN,
    },
    proxy_v2, Flow, Reason, ReverseNat,
};

use crate::{
    maps::PROXY_SCRATCH,
    packet::{self, ptr_at, Packet},
    splice, stats,
    stats::Verdict,
};

/// Bytes of headers (Ethernet, IP, TCP with options) a segment may have for the header to go
/// in behind them: an IPv6 segment with extension headers beyond that is dropped.
pub const MAX_HEADERS: usize = 128;

/// What the header's insertion copies: the segment's headers, then the PROXY header.
pub struct Scratch {
    headers: [u8; MAX_HEADERS],
    proxy: [u8; proxy_v2::IPV6_LEN],
}

/// A client segment of a `proxy_protocol` flow, before its addresses are rewritten: the
/// segment with the first data byte gets the header, later ones move past it.
#[inline(always)]
pub fn client_to_backend(ctx: &XdpContext, packet: &Packet, flow: &Flow) -> Result<(), Verdict> {
    if packet.tcp_flags & SYN != 0 {
        return Ok(());
    }
    let seq = splice::read_u32(ctx, packet.tcp_field(tcp_field::SEQ))?;
    if seq != flow.proxy_seq {
        let len = proxy_v2::len(packet.v6) as u32;
        return splice::shift(ctx, packet, packet.tcp_field(tcp_field::SEQ), len);
    }
    // At the first byte: without data (the handshake's ACK, a FIN or reset of a client that
    // sent nothing) the backend expects that byte still.
    if packet.payload_len == 0 || packet.tcp_flags & RST != 0 {
        return Ok(());
    }
    insert(ctx, packet).ok_or(Verdict::drop(Reason::DropProxyHeader))?;
    stats::count(Reason::ProxyHeaderInserted, 0);
    Ok(())
}

/// A backend segment of a `proxy_protocol` flow: its acknowledgements come back past the
/// header, and its SYN-ACK offers a smaller MSS.
#[inline(always)]
pub fn backend_to_client(
    ctx: &XdpContext,
    packet: &Packet,
    nat: &ReverseNat,
) -> Result<(), Verdict> {
    if packet.tcp_flags & SYN != 0 {
        return lower_mss(ctx, packet);
    }
    if packet.tcp_flags & ACK == 0 {
        return Ok(());
    }
    // An acknowledgement of only part of the header comes out below what the client sent
    // first: an old acknowledgement to it, which it ignores.
    splice::shift(ctx, packet, packet.tcp_field(tcp_field::ACK), nat.removed)?;
    splice::shift_sack_blocks(ctx, packet, nat.removed)
}

/// Moves the segment's headers forward by the PROXY header's length and writes the header
/// between them and the data, fixing the IP length and the checksums.
#[inline(always)]
fn insert(ctx: &XdpContext, packet: &Packet) -> Option<()> {
    let headers = packet.l4_offset + packet.tcp_header_len;
    if headers > MAX_HEADERS {
        return None;
    }
    let scratch = PROXY_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the entry is this CPU's, and only this program run touches it meanwhile.
    let scratch = unsafe { &mut *scratch };
    let key = &packet.key;
    let len = proxy_v2::write(
        &mut scratch.proxy,
        (key.src, key.sport),
        (key.dst, key.dport),
    );
    // SAFETY: `headers` holds 1..=MAX_HEADERS bytes, within the frame (parsing saw them).
    let loaded = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            0,
            scratch.headers.as_mut_ptr().cast(),
            headers.clamp(1, MAX_HEADERS) as u32,
        )
    };
    // SAFETY: XDP keeps headroom in front of every frame.
    if loaded != 0 || unsafe { bpf_xdp_adjust_head(ctx.ctx, -(len as i32)) } != 0 {
        return None;
    }
    // SAFETY: the frame grew by `len` at its head, so both copies lie inside it.
    let stored = unsafe {
        bpf_xdp_store_bytes(
            ctx.ctx,
            0,
            scratch.headers.as_mut_ptr().cast(),
            headers.clamp(1, MAX_HEADERS) as u32,
        ) | bpf_xdp_store_bytes(
            ctx.ctx,
            headers as u32,
            scratch.proxy.as_mut_ptr().cast(),
            len as u32,
        )
    };
    if stored != 0 {
        return None;
    }
    // The header is of even length and starts on an even offset: its words join the sum as
    // they are, and the data's words stay as they were.
    let mut sum = 0u32;
    for word in 0..proxy_v2::IPV6_LEN / 2 {
        if word * 2 >= len {
            break;
        }
        sum += u32::from(u16::from_ne_bytes([
            scratch.proxy[word * 2],
            scratch.proxy[word * 2 + 1],
        ]));
    }
    packet::lengthen(ctx, packet, len as u16, csum::fold(sum))
}

/// Lowers the MSS a backend's SYN-ACK offers by the PROXY header's length. Stacks put the
/// MSS option first in a SYN-ACK; one elsewhere is left as it is.
#[inline(always)]
fn lower_mss(ctx: &XdpContext, packet: &Packet) -> Result<(), Verdict> {
    if packet.tcp_header_len < TCP_HEADER_LEN + 4 {
        return Ok(());
    }
    let truncated = Verdict::drop(Reason::DropTruncated);
    let option: *mut [u8; 4] = ptr_at(ctx, packet.l4_offset + TCP_HEADER_LEN).ok_or(truncated)?;
    let check: *mut [u8; 2] = ptr_at(ctx, packet.l4_check_offset).ok_or(truncated)?;
    // SAFETY: `ptr_at` checked that both lie inside the frame.
    unsafe {
        let old = *option;
        if old[0] != tcp_option::MSS || old[1] != 4 {
            return Ok(());
        }
        let mss = u16::from_be_bytes([old[2], old[3]]);
        let lowered = mss
            .saturating_sub(proxy_v2::len(packet.v6) as u16)
            .to_be_bytes();
        let new = [old[0], old[1], lowered[0], lowered[1]];
        *option = new;
        *check = csum::replace32(
            u16::from_ne_bytes(*check),
            u32::from_ne_bytes(old),
            u32::from_ne_bytes(new),
        )
        .to_ne_bytes();
    }
    Ok(())
}
