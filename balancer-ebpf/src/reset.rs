//! Refusing a TCP connection: the segment is turned into the reset the client expects
//! (RFC 9293 §3.10.7.1) and sent back out of the interface it came in on.

use aya_ebpf::programs::XdpContext;
use balancer_common::Reason;

use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr};

use crate::{
    packet::{ptr_at, IP_OFFSET, L4_OFFSET},
    reply,
    stats::Verdict,
};

const RESET_LEN: usize = L4_OFFSET + TcpHdr::LEN;
const TTL: u8 = 64;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Answers a TCP segment with a reset (XDP_TX), counted under `sent`. A segment that is itself
/// a reset (or too short to answer) is dropped, counted under `dropped`.
#[inline(always)]
pub fn refuse(ctx: &XdpContext, sent: Reason, dropped: Reason) -> Verdict {
    match build(ctx, sent, dropped) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[inline(always)]
fn build(ctx: &XdpContext, sent: Reason, dropped: Reason) -> Result<Verdict, Verdict> {
    let dropped = Verdict::drop(dropped);
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(dropped)?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, IP_OFFSET).ok_or(dropped)?;
    let tcp: *mut TcpHdr = ptr_at(ctx, L4_OFFSET).ok_or(dropped)?;
    // SAFETY: `ptr_at` checked that the three headers lie inside the frame.
    let (eth, ip, tcp) = unsafe { (&mut *eth, &mut *ip, &mut *tcp) };
    if tcp.rst() != 0 {
        return Err(dropped);
    }

    // The segment's length in sequence space: its payload, plus one each for SYN and FIN.
    let header_len = u32::from(tcp.doff()) * 4 + Ipv4Hdr::LEN as u32;
    let payload = u32::from(ip.tot_len()).saturating_sub(header_len);
    let seq_len = payload + u32::from(tcp.syn()) + u32::from(tcp.fin());
    let (seq, ack, ack_flag) = if tcp.ack() != 0 {
        (u32::from_be_bytes(tcp.ack_seq), 0, 0)
    } else {
        (
            0,
            u32::from_be_bytes(tcp.seq).wrapping_add(seq_len),
            TCP_ACK,
        )
    };

    core::mem::swap(&mut eth.src_addr, &mut eth.dst_addr);
    core::mem::swap(&mut ip.src_addr, &mut ip.dst_addr);
    core::mem::swap(&mut tcp.source, &mut tcp.dest);
    ip.vihl = 0x45;
    ip.tos = 0;
    ip.set_tot_len((Ipv4Hdr::LEN + TcpHdr::LEN) as u16);
    ip.id = [0; 2];
    ip.frags = [0x40, 0]; // don't fragment
    ip.ttl = TTL;
    ip.check = [0; 2];
    tcp.seq = seq.to_be_bytes();
    tcp.ack_seq = ack.to_be_bytes();
    // SAFETY: bytes 12 and 13 of the TCP header, inside the checked header.
    let offset_and_flags = unsafe { &mut *core::ptr::from_mut(tcp).cast::<[u8; 2]>().add(6) };
    // Data offset 5 words; flags RST, plus ACK when the segment carried none.
    *offset_and_flags = [0x50, TCP_RST | ack_flag];
    tcp.window = [0; 2];
    tcp.check = [0; 2];
    tcp.urg_ptr = [0; 2];

    reply::resize(ctx, RESET_LEN).ok_or(dropped)?;
    reply::write_checksums::<{ TcpHdr::LEN / 2 }>(ctx).ok_or(dropped)?;
    Ok(Verdict {
        action: reply::send_back(ctx),
        reason: sent,
    })
}
