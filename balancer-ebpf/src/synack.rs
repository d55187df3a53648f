//! Answering a client's SYN to a cookie service with a SYN cookie (XDP_TX): the balancer
//! completes the handshake itself so the request, and its cookie, can be read before a
//! backend is chosen. The SYN's options are kept in `SYN_OPTIONS` for the backend leg.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::XdpContext};
use balancer_common::{
    proto::{tcp_flag, tcp_option, TCP_HEADER_LEN},
    syncookie::{cookie_tsval, mss_index, syn_cookie},
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

/// TCP header of the SYN-ACK, and of the SYN that `bind` opens a backend side with: 20
/// bytes and 12 of options, or 20 of them with timestamps (see [`write_handshake`]).
pub const SYN_TCP_LEN: usize = 32;
pub const SYN_TCP_LEN_TIMESTAMPS: usize = 40;
/// MSS a client that sends none is assumed to accept (RFC 9293).
const DEFAULT_MSS: u16 = 536;
const MAX_WINDOW_SHIFT: u8 = 14;

/// Sends the SYN-ACK for `packet`, a SYN to a cookie service.
#[inline(always)]
pub fn answer(ctx: &XdpContext, packet: &Packet) -> Verdict {
    let (options, client_tsval) = syn_options(ctx, packet);
    // A failed insert only costs the client its options on the backend leg.
    let _ = SYN_OPTIONS.insert(&packet.key, &options, 0);
    if options.timestamps == 0 {
        send::<SYN_TCP_LEN, { SYN_TCP_LEN / 2 }>(ctx, packet, &options, 0)
    } else {
        send::<SYN_TCP_LEN_TIMESTAMPS, { SYN_TCP_LEN_TIMESTAMPS / 2 }>(
            ctx,
            packet,
            &options,
            client_tsval,
        )
    }
}

/// The balancer's clock for its TSvals: milliseconds of `bpf_ktime_get_ns`, as Linux
/// counts its own (without the per-peer offset of `tcp_timestamps=1`).
#[inline(always)]
pub fn milliseconds() -> u32 {
    // SAFETY: a helper without arguments.
    (unsafe { bpf_ktime_get_ns() } / 1_000_000) as u32
}

/// Turns `packet` into the SYN-ACK with the SYN cookie, a TCP header of `LEN` bytes
/// (`WORDS` 16-bit words) with the options `offered` asks for, and sends it back.
#[inline(always)]
fn send<const LEN: usize, const WORDS: usize>(
    ctx: &XdpContext,
    packet: &Packet,
    offered: &SynOptions,
    client_tsval: u32,
) -> Verdict {
    const { assert!(WORDS * 2 == LEN) };
    let dropped = Verdict::drop(Reason::DropTruncated);
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
        mss_index(offered.mss),
    );
    let l4 = reply::l4_offset(packet.v6);
    if reply::resize(ctx, l4 + LEN).is_none() {
        return Verdict::drop(Reason::DropNoRoomForReply);
    }
    if reply::write_headers(ctx, macs, &key.dst, &key.src, LEN).is_none() {
        return dropped;
    }
    let Some(tcp) = ptr_at::<[u8; LEN]>(ctx, l4) else {
        return dropped;
    };
    // SAFETY: `ptr_at` checked that the segment lies inside the resized frame.
    let tcp = unsafe { &mut *tcp };
    let window_shift = if offered.window_shift == NO_WINDOW_SCALE {
        NO_WINDOW_SCALE
    } else {
        COOKIE_WINDOW_SHIFT
    };
    // Timestamps let the backends' TIME_WAIT tell a reused client port from an old segment
    // (PAWS); the splice moves the backend's TSvals onto the balancer's clock.
    let tsval = cookie_tsval(milliseconds(), offered);
    write_handshake(
        tcp,
        &Handshake {
            ports: (key.dport, key.sport),
            seq: cookie,
            ack: client_seq.wrapping_add(1),
            flags: tcp_flag::SYN | tcp_flag::ACK,
            mss: offered.mss.min(COOKIE_MSS),
            window_shift,
            sack_permitted: offered.sack_permitted != 0,
            timestamps: (tsval, client_tsval),
        },
    );
    if reply::write_checksums::<WORDS>(ctx, packet.v6, (0, 0)).is_none() {
        return dropped;
    }
    Verdict {
        action: reply::send_back(ctx),
        reason: Reason::SynCookieSent,
    }
}

/// A SYN or SYN-ACK the program writes.
pub struct Handshake {
    /// Source and destination port, as on the wire.
    pub ports: (u16, u16),
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub mss: u16,
    /// The window scale announced, or `NO_WINDOW_SCALE` for none.
    pub window_shift: u8,
    pub sack_permitted: bool,
    /// TSval and TSecr, written in a header of [`SYN_TCP_LEN_TIMESTAMPS`] bytes.
    pub timestamps: (u32, u32),
}

/// Writes `handshake` as the TCP header `tcp` of [`SYN_TCP_LEN`] bytes (options: MSS;
/// window scale or padding; SACK-permitted or padding) or of [`SYN_TCP_LEN_TIMESTAMPS`]
/// (MSS; SACK-permitted or padding; timestamps; window scale or padding), laid out as
/// Linux lays them out, with the checksum zero.
#[inline(always)]
pub fn write_handshake<const LEN: usize>(tcp: &mut [u8; LEN], handshake: &Handshake) {
    tcp[0..2].copy_from_slice(&handshake.ports.0.to_ne_bytes());
    tcp[2..4].copy_from_slice(&handshake.ports.1.to_ne_bytes());
    tcp[4..8].copy_from_slice(&handshake.seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&handshake.ack.to_be_bytes());
    tcp[12] = ((LEN / 4) as u8) << 4;
    tcp[13] = handshake.flags;
    tcp[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    tcp[16..20].copy_from_slice(&[0; 4]); // checksum, urgent pointer
    let options = &mut tcp[TCP_HEADER_LEN..];
    let mss = handshake.mss.to_be_bytes();
    options[0..4].copy_from_slice(&[tcp_option::MSS, 4, mss[0], mss[1]]);
    let nop = tcp_option::NOP;
    let scale = if handshake.window_shift == NO_WINDOW_SCALE {
        [nop; 4]
    } else {
        [nop, tcp_option::WINDOW_SCALE, 3, handshake.window_shift]
    };
    // Selective acknowledgements keep a lossy path fast; the backend is offered them in
    // turn and the splice moves the blocks between the two legs' sequence spaces.
    if LEN == SYN_TCP_LEN {
        options[4..8].copy_from_slice(&scale);
        let sack = if handshake.sack_permitted {
            [nop, nop, tcp_option::SACK_PERMITTED, 2]
        } else {
            [nop; 4]
        };
        options[8..12].copy_from_slice(&sack);
    } else {
        let sack = if handshake.sack_permitted {
            [tcp_option::SACK_PERMITTED, 2]
        } else {
            [nop, nop]
        };
        options[4..6].copy_from_slice(&sack);
        options[6..8].copy_from_slice(&[tcp_option::TIMESTAMP, 10]);
        options[8..12].copy_from_slice(&handshake.timestamps.0.to_be_bytes());
        options[12..16].copy_from_slice(&handshake.timestamps.1.to_be_bytes());
        options[16..20].copy_from_slice(&scale);
    }
}

/// The MSS, window scale, SACK permission and timestamps a SYN offers (defaults where it
/// offers none), and its TSval.
#[inline(always)]
fn syn_options(ctx: &XdpContext, packet: &Packet) -> (SynOptions, u32) {
    let mut options = SynOptions {
        mss: DEFAULT_MSS,
        window_shift: NO_WINDOW_SCALE,
        sack_permitted: 0,
        timestamps: 0,
        _pad: [0; 3],
    };
    let mut tsval = 0;
    let Some(offered) = Options::load(ctx, packet) else {
        return (options, tsval);
    };
    offered.each(|kind, at, len| {
        if kind == tcp_option::MSS && len == 4 {
            options.mss = u16::from_be_bytes([offered.byte(at + 2), offered.byte(at + 3)]);
        } else if kind == tcp_option::WINDOW_SCALE && len == 3 {
            options.window_shift = offered.byte(at + 2).min(MAX_WINDOW_SHIFT);
        } else if kind == tcp_option::SACK_PERMITTED && len == 2 {
            options.sack_permitted = 1;
        } else if kind == tcp_option::TIMESTAMP && len == 10 {
            options.timestamps = 1;
            tsval = u32::from_be_bytes(offered.word(at + 2));
        }
        true
    });
    (options, tsval)
}
