//! Answering a client's SYN to a cookie service with a SYN cookie (XDP_TX): the balancer
//! completes the handshake itself so the request, and its cookie, can be read before a
//! backend is chosen. The SYN's options are kept in `SYN_OPTIONS` for the backend leg.

use aya_ebpf::programs::XdpContext;
use balancer_common::{
    proto::{tcp_flag, tcp_option, TCP_HEADER_LEN},
    syncookie::{mss_index, syn_cookie},
    Reason, SynOptions, COOKIE_MSS, COOKIE_WINDOW_SHIFT, NO_WINDOW_SCALE,
};
use network_types::{eth::EthHdr, tcp::TcpHdr};

use crate::{
    handshake::{cookie_period, cookie_secret},
    maps::SYN_OPTIONS,
    packet::{ptr_at, Packet},
    reply,
    stats::Verdict,
    tcp_options::Options,
};

/// TCP header of the SYN-ACK: 20 bytes and 12 of options (MSS; window scale or padding;
/// SACK-permitted or padding).
const SYNACK_TCP_LEN: usize = 32;
/// MSS a client that sends none is assumed to accept (RFC 9293).
const DEFAULT_MSS: u16 = 536;
const MAX_WINDOW_SHIFT: u8 = 14;

/// Sends the SYN-ACK for `packet`, a SYN to a cookie service.
#[inline(always)]
pub fn answer(ctx: &XdpContext, packet: &Packet) -> Verdict {
    let dropped = Verdict::drop(Reason::DropTruncated);
    let no_room = Verdict::drop(Reason::DropNoRoomForReply);
    let options = syn_options(ctx, packet);
    // A failed insert only costs the client its options on the backend leg.
    let _ = SYN_OPTIONS.insert(&packet.key, &options, 0);

    let (Some(eth), Some(tcp)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<TcpHdr>(ctx, packet.l4_offset),
    ) else {
        return dropped;
    };
    // SAFETY: `ptr_at` checked that both headers lie inside the frame.
    let (macs, client_seq) = unsafe {
        (
            ((*eth).dst_addr, (*eth).src_addr),
            u32::from_be_bytes((*tcp).seq),
        )
    };
    let key = &packet.key;
    let cookie = syn_cookie(
        &cookie_secret(0),
        key,
        client_seq,
        cookie_period(),
        mss_index(options.mss),
    );
    let l4 = reply::l4_offset(packet.v6);
    if reply::resize(ctx, l4 + SYNACK_TCP_LEN).is_none() {
        return no_room;
    }
    if reply::write_headers(ctx, macs, &key.dst, &key.src, SYNACK_TCP_LEN).is_none() {
        return dropped;
    }
    let Some(tcp) = ptr_at::<[u8; SYNACK_TCP_LEN]>(ctx, l4) else {
        return dropped;
    };
    let mss = options.mss.min(COOKIE_MSS).to_be_bytes();
    let nop = tcp_option::NOP;
    let scale = if options.window_shift == NO_WINDOW_SCALE {
        [nop; 4]
    } else {
        [nop, tcp_option::WINDOW_SCALE, 3, COOKIE_WINDOW_SHIFT]
    };
    // Selective acknowledgements keep a lossy path fast; the backend is offered them in
    // turn and the splice moves the blocks between the two legs' sequence spaces.
    let sack = if options.sack_permitted != 0 {
        [nop, nop, tcp_option::SACK_PERMITTED, 2]
    } else {
        [nop; 4]
    };
    // SAFETY: `ptr_at` checked that the segment lies inside the resized frame.
    let tcp = unsafe { &mut *tcp };
    tcp[0..2].copy_from_slice(&key.dport.to_ne_bytes());
    tcp[2..4].copy_from_slice(&key.sport.to_ne_bytes());
    tcp[4..8].copy_from_slice(&cookie.to_be_bytes());
    tcp[8..12].copy_from_slice(&client_seq.wrapping_add(1).to_be_bytes());
    tcp[12] = ((SYNACK_TCP_LEN / 4) as u8) << 4;
    tcp[13] = tcp_flag::SYN | tcp_flag::ACK;
    tcp[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    tcp[16..20].copy_from_slice(&[0; 4]); // checksum, urgent pointer
    tcp[TCP_HEADER_LEN..].copy_from_slice(&[
        tcp_option::MSS,
        4,
        mss[0],
        mss[1],
        scale[0],
        scale[1],
        scale[2],
        scale[3],
        sack[0],
        sack[1],
        sack[2],
        sack[3],
    ]);
    if reply::write_checksums::<{ SYNACK_TCP_LEN / 2 }>(ctx, packet.v6).is_none() {
        return dropped;
    }
    Verdict {
        action: reply::send_back(ctx),
        reason: Reason::SynCookieSent,
    }
}

/// The MSS, window scale and SACK permission a SYN offers (defaults where it offers none).
#[inline(always)]
fn syn_options(ctx: &XdpContext, packet: &Packet) -> SynOptions {
    let mut options = SynOptions {
        mss: DEFAULT_MSS,
        window_shift: NO_WINDOW_SCALE,
        sack_permitted: 0,
    };
    let Some(offered) = Options::load(ctx, packet) else {
        return options;
    };
    offered.each(|kind, at, len| {
        if kind == tcp_option::MSS && len == 4 {
            options.mss = u16::from_be_bytes([offered.byte(at + 2), offered.byte(at + 3)]);
        } else if kind == tcp_option::WINDOW_SCALE && len == 3 {
            options.window_shift = offered.byte(at + 2).min(MAX_WINDOW_SHIFT);
        } else if kind == tcp_option::SACK_PERMITTED && len == 2 {
            options.sack_permitted = 1;
        }
        true
    });
    options
}
