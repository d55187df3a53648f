//! Answering a client's SYN to a cookie service with a SYN cookie (XDP_TX): the balancer
//! completes the handshake itself so the request, and its cookie, can be read before a
//! backend is chosen. The SYN's options are kept in `SYN_OPTIONS` for the backend leg.

use aya_ebpf::{helpers::bpf_xdp_load_bytes, programs::XdpContext};
use balancer_common::{
    syn_cookie, Reason, SynOptions, COOKIE_MSS, COOKIE_WINDOW_SHIFT, NO_WINDOW_SCALE, PROTO_TCP,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr};

use crate::{
    maps::SYN_OPTIONS,
    packet::{ptr_at, Packet, IP_OFFSET, L4_OFFSET, TCP_ACK, TCP_SYN},
    reply,
    splice::{cookie_period, cookie_secret},
    stats::Verdict,
};

/// TCP header of the SYN-ACK: 20 bytes and 8 of options (MSS; window scale or padding).
const SYNACK_TCP_LEN: usize = 28;
const SYNACK_LEN: usize = L4_OFFSET + SYNACK_TCP_LEN;
/// MSS a client that sends none is assumed to accept (RFC 9293).
const DEFAULT_MSS: u16 = 536;
const TTL: u8 = 64;
const OPTION_END: u8 = 0;
const OPTION_NOP: u8 = 1;
const OPTION_MSS: u8 = 2;
const OPTION_WINDOW_SCALE: u8 = 3;
/// TCP options occupy at most 40 bytes.
const MAX_OPTION_BYTES: usize = 40;
/// Options read from a SYN. Real stacks send at most 8 (macOS: MSS, NOP, WS, NOP, NOP, TS,
/// SACK-permitted, EOL); every further iteration multiplies the verifier's work, and a SYN
/// that pads beyond this only loses its options (defaults apply).
const MAX_OPTIONS_READ: usize = 12;
/// A power of two above 40 + 3, so masked indexes stay inside it.
const OPTION_BUFFER: usize = 64;
const MAX_WINDOW_SHIFT: u8 = 14;

/// Sends the SYN-ACK for `packet`, a SYN to a cookie service.
#[inline(always)]
pub fn answer(ctx: &XdpContext, packet: &Packet) -> Verdict {
    let dropped = Verdict::drop(Reason::DropTruncated);
    let options = syn_options(ctx, packet.tcp_header_len);
    // A failed insert only costs the client its options on the backend leg.
    let _ = SYN_OPTIONS.insert(&packet.key, &options, 0);
    let cookie = syn_cookie(&cookie_secret(), &packet.key, cookie_period());

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
    if reply::resize(ctx, SYNACK_LEN).is_none() {
        return dropped;
    }
    let (Some(eth), Some(ip), Some(tcp), Some(tcp_options)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv4Hdr>(ctx, IP_OFFSET),
        ptr_at::<[u8; SYNACK_TCP_LEN]>(ctx, L4_OFFSET),
        ptr_at::<[u8; 8]>(ctx, L4_OFFSET + TcpHdr::LEN),
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
    // SAFETY: `ptr_at` checked that every header lies inside the resized frame.
    unsafe {
        (*eth).dst_addr = client_mac;
        (*eth).src_addr = balancer_mac;
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
            OPTION_MSS, 4, mss[0], mss[1], scale[0], scale[1], scale[2], scale[3],
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

/// The MSS and window scale a SYN offers (defaults where it offers none). The options are
/// copied out of the frame first: parsing them in place needs bounds checks at variable
/// offsets, which the compiler reshapes beyond what the verifier can follow.
#[inline(always)]
fn syn_options(ctx: &XdpContext, header_len: usize) -> SynOptions {
    let mut options = SynOptions {
        mss: DEFAULT_MSS,
        window_shift: NO_WINDOW_SCALE,
        _pad: 0,
    };
    let present = header_len.saturating_sub(TcpHdr::LEN).min(MAX_OPTION_BYTES);
    if present == 0 {
        return options;
    }
    // Indexes are masked into the buffer so that every read is in bounds for the verifier
    // whatever the compiler does with the loop's checks.
    let mut bytes = [0u8; OPTION_BUFFER];
    let byte = |bytes: &[u8; OPTION_BUFFER], at: usize| bytes[at & (OPTION_BUFFER - 1)];
    let len = present.clamp(1, MAX_OPTION_BYTES) as u32;
    // SAFETY: `bytes` has room for `len` bytes.
    let copied = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            (L4_OFFSET + TcpHdr::LEN) as u32,
            bytes.as_mut_ptr().cast(),
            len,
        )
    };
    if copied != 0 {
        return options;
    }
    let mut at = 0;
    for _ in 0..MAX_OPTIONS_READ {
        if at >= present {
            break;
        }
        let kind = byte(&bytes, at);
        if kind == OPTION_END {
            break;
        }
        if kind == OPTION_NOP {
            at += 1;
            continue;
        }
        let len = usize::from(byte(&bytes, at + 1));
        if len < 2 {
            break;
        }
        if kind == OPTION_MSS && len == 4 {
            options.mss = u16::from_be_bytes([byte(&bytes, at + 2), byte(&bytes, at + 3)]);
        } else if kind == OPTION_WINDOW_SCALE && len == 3 {
            options.window_shift = byte(&bytes, at + 2).min(MAX_WINDOW_SHIFT);
        }
        at += len;
    }
    options
}
