//! Answering a client's SYN to a cookie service with a SYN cookie (XDP_TX): the balancer
//! completes the handshake itself so the request, and its cookie, can be read before a
//! backend is chosen. The SYN's options are kept in `SYN_OPTIONS` for the backend leg.

use aya_ebpf::programs::XdpContext;
use balancer_common::{
    syncookie::{mss_index, syn_cookie},
    Reason, SynOptions, COOKIE_MSS, COOKIE_WINDOW_SHIFT, NO_WINDOW_SCALE, PROTO_TCP,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
};

use crate::{
    maps::SYN_OPTIONS,
    packet::{ptr_at, Packet, IP_OFFSET, L4_OFFSET, TCP_ACK, TCP_SYN},
    reply,
    splice::{cookie_period, cookie_secret},
    stats::Verdict,
    tcp_options::{Options, OPTION_MSS, OPTION_NOP, OPTION_SACK_PERMITTED, OPTION_WINDOW_SCALE},
};

/// TCP header of the SYN-ACK: 20 bytes and 12 of options (MSS; window scale or padding;
/// SACK-permitted or padding).
const SYNACK_TCP_LEN: usize = 32;
const SYNACK_OPTION_LEN: usize = SYNACK_TCP_LEN - TcpHdr::LEN;
const SYNACK_LEN: usize = L4_OFFSET + SYNACK_TCP_LEN;
/// MSS a client that sends none is assumed to accept (RFC 9293).
const DEFAULT_MSS: u16 = 536;
const TTL: u8 = 64;
const MAX_WINDOW_SHIFT: u8 = 14;

/// Sends the SYN-ACK for `packet`, a SYN to a cookie service.
#[inline(always)]
pub fn answer(ctx: &XdpContext, packet: &Packet) -> Verdict {
    let dropped = Verdict::drop(Reason::DropTruncated);
    let no_room = Verdict::drop(Reason::DropNoRoomForReply);
    let options = syn_options(ctx, packet.tcp_header_len);
    // A failed insert only costs the client its options on the backend leg.
    let _ = SYN_OPTIONS.insert(&packet.key, &options, 0);

    let (Some(eth), Some(tcp)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<TcpHdr>(ctx, L4_OFFSET))
    else {
        return dropped;
    };
    // SAFETY: `ptr_at` checked that both headers lie inside the frame.
    let (client_mac, balancer_mac, client_seq) = unsafe {
        (
            (*eth).src_addr,
            (*eth).dst_addr,
            u32::from_be_bytes((*tcp).seq),
        )
    };
    let cookie = syn_cookie(
        &cookie_secret(0),
        &packet.key,
        client_seq,
        cookie_period(),
        mss_index(options.mss),
    );
    if reply::resize(ctx, SYNACK_LEN).is_none() {
        return no_room;
    }
    let (Some(eth), Some(ip), Some(tcp), Some(tcp_options)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv4Hdr>(ctx, IP_OFFSET),
        ptr_at::<[u8; SYNACK_TCP_LEN]>(ctx, L4_OFFSET),
        ptr_at::<[u8; SYNACK_OPTION_LEN]>(ctx, L4_OFFSET + TcpHdr::LEN),
    ) else {
        return dropped;
    };
    let key = &packet.key;
    let mss = options.mss.min(COOKIE_MSS).to_be_bytes();
    let scale = if options.window_shift == NO_WINDOW_SCALE {
        [OPTION_NOP; 4]
    } else {
        [OPTION_NOP, OPTION_WINDOW_SCALE, 3, COOKIE_WINDOW_SHIFT]
    };
    // Selective acknowledgements keep a lossy path fast; the backend is offered them in
    // turn and the splice moves the blocks between the two legs' sequence spaces.
    let sack = if options.sack_permitted != 0 {
        [OPTION_NOP, OPTION_NOP, OPTION_SACK_PERMITTED, 2]
    } else {
        [OPTION_NOP; 4]
    };
    // SAFETY: `ptr_at` checked that every header lies inside the resized frame.
    unsafe {
        (*eth).dst_addr = client_mac;
        (*eth).src_addr = balancer_mac;
        (*eth).ether_type = EtherType::Ipv4 as u16;
        let ip = &mut *ip;
        ip.vihl = 0x45;
        ip.tos = 0;
        ip.set_tot_len((Ipv4Hdr::LEN + SYNACK_TCP_LEN) as u16);
        ip.id = [0; 2];
        ip.frags = [0x40, 0]; // don't fragment
        ip.ttl = TTL;
        ip.proto = PROTO_TCP;
        ip.check = [0; 2];
        ip.src_addr = key.dst.to_ne_bytes();
        ip.dst_addr = key.src.to_ne_bytes();
        let tcp = &mut *tcp;
        tcp[0..2].copy_from_slice(&key.dport.to_ne_bytes());
        tcp[2..4].copy_from_slice(&key.sport.to_ne_bytes());
        tcp[4..8].copy_from_slice(&cookie.to_be_bytes());
        tcp[8..12].copy_from_slice(&client_seq.wrapping_add(1).to_be_bytes());
        tcp[12] = ((SYNACK_TCP_LEN / 4) as u8) << 4;
        tcp[13] = TCP_SYN | TCP_ACK;
        tcp[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        tcp[16..20].copy_from_slice(&[0; 4]); // checksum, urgent pointer
        *tcp_options = [
            OPTION_MSS, 4, mss[0], mss[1], scale[0], scale[1], scale[2], scale[3], sack[0],
            sack[1], sack[2], sack[3],
        ];
    }
    if reply::write_checksums::<{ SYNACK_TCP_LEN / 2 }>(ctx).is_none() {
        return dropped;
    }
    Verdict {
        action: reply::send_back(ctx),
        reason: Reason::SynCookieSent,
    }
}

/// The MSS, window scale and SACK permission a SYN offers (defaults where it offers none).
#[inline(always)]
fn syn_options(ctx: &XdpContext, header_len: usize) -> SynOptions {
    let mut options = SynOptions {
        mss: DEFAULT_MSS,
        window_shift: NO_WINDOW_SCALE,
        sack_permitted: 0,
    };
    let Some(offered) = Options::load(ctx, header_len) else {
        return options;
    };
    offered.each(|kind, at, len| {
        if kind == OPTION_MSS && len == 4 {
            options.mss = u16::from_be_bytes([offered.byte(at + 2), offered.byte(at + 3)]);
        } else if kind == OPTION_WINDOW_SCALE && len == 3 {
            options.window_shift = offered.byte(at + 2).min(MAX_WINDOW_SHIFT);
        } else if kind == OPTION_SACK_PERMITTED && len == 2 {
            options.sack_permitted = 1;
        }
        true
    });
    options
}
