//! Refusing a TCP connection: the segment is turned into the reset the client expects
//! (RFC 9293 §3.10.7.1) and sent back out of the interface it came in on.

use aya_ebpf::programs::XdpContext;
use balancer_common::{
    proto::{tcp_flag, TCP_HEADER_LEN},
    Reason,
};
use network_types::{eth::EthHdr, tcp::TcpHdr};

use crate::{
    packet::{ptr_at, Packet},
    reply,
    stats::Verdict,
};

/// Answers a TCP segment with a reset (XDP_TX), counted under `sent`. A segment that is itself
/// a reset (or too short to answer) is dropped, counted under `dropped`.
#[inline(always)]
pub fn refuse(ctx: &XdpContext, packet: &Packet, sent: Reason, dropped: Reason) -> Verdict {
    match build(ctx, packet, sent, dropped) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[inline(always)]
fn build(
    ctx: &XdpContext,
    packet: &Packet,
    sent: Reason,
    dropped: Reason,
) -> Result<Verdict, Verdict> {
    let dropped = Verdict::drop(dropped);
    if packet.tcp_flags & tcp_flag::RST != 0 {
        return Err(dropped);
    }
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(dropped)?;
    let tcp: *const TcpHdr = ptr_at(ctx, packet.l4_offset).ok_or(dropped)?;
    // SAFETY: `ptr_at` checked that both headers lie inside the frame.
    let (macs, seq, ack) = unsafe {
        (
            ((*eth).dst_addr, (*eth).src_addr),
            u32::from_be_bytes((*tcp).seq),
            u32::from_be_bytes((*tcp).ack_seq),
        )
    };
    // The segment's length in sequence space: its payload, plus one each for SYN and FIN.
    let flags = packet.tcp_flags;
    let seq_len = packet.payload_len as u32
        + u32::from(flags & tcp_flag::SYN != 0)
        + u32::from(flags & tcp_flag::FIN != 0);
    let (seq, ack, flags) = if flags & tcp_flag::ACK != 0 {
        (ack, 0, tcp_flag::RST)
    } else {
        (0, seq.wrapping_add(seq_len), tcp_flag::RST | tcp_flag::ACK)
    };

    let key = &packet.key;
    let v6 = packet.v6;
    let l4 = reply::l4_offset(v6);
    reply::resize(ctx, l4 + TCP_HEADER_LEN).ok_or(dropped)?;
    reply::write_headers(ctx, macs, &key.dst, &key.src, TCP_HEADER_LEN).ok_or(dropped)?;
    let tcp: *mut [u8; TCP_HEADER_LEN] = ptr_at(ctx, l4).ok_or(dropped)?;
    // SAFETY: `ptr_at` checked that the header lies inside the resized frame.
    let tcp = unsafe { &mut *tcp };
    tcp[0..2].copy_from_slice(&key.dport.to_ne_bytes());
    tcp[2..4].copy_from_slice(&key.sport.to_ne_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    // Data offset 5 words; no window, checksum or urgent pointer.
    tcp[12] = 0x50;
    tcp[13] = flags;
    tcp[14..20].copy_from_slice(&[0; 6]);
    reply::write_checksums::<{ TCP_HEADER_LEN / 2 }>(ctx, v6, (0, 0)).ok_or(dropped)?;
    Ok(Verdict {
        action: reply::send_back(ctx),
        reason: sent,
    })
}
