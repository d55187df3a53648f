//! The backend's SYN-ACK of a cookie connection answered by XDP: the agent leaves the request
//! it replays to the backend in `REPLAYS` when it sends the SYN, and once XDP has recorded
//! the splice from the SYN-ACK it turns that SYN-ACK into the acknowledgement carrying the
//! request and sends it back (see `reply::send_back`), as the agent would have. The agent still gets a copy
//! of the SYN-ACK for its books (`punt_kind::REPLAYED`); a SYN-ACK without a replay (evicted,
//! too long, a frame that cannot grow) goes to the agent as before, which
//! replays it. A replay lost on the way brings the SYN-ACK again, which the agent answers.
//!
//! It is a program of its own, `balancer_replay`, reached by a tail call with the parsed
//! packet in `COOKIE_HANDOFF`: the main program's stack is spent.

use aya_ebpf::programs::XdpContext;
use balancer_common::{
    proto::{
        tcp_field,
        tcp_flag::{ACK, PSH},
        tcp_option, TCP_HEADER_LEN,
    },
    punt_kind, reverse_flags, Binding, Reason, Replay, MAX_REPLAY,
};
use network_types::eth::EthHdr;

use crate::{
    maps::{BINDINGS, REPLAYS, REPLAY_PROGRAM, REVERSE},
    packet::{self, ptr_at, Packet},
    punt, reply, splice,
    stats::Verdict,
    tcp_options::{self, Options, ALIGNED_TIMESTAMPS_LEN},
};

/// Passes a SYN-ACK that XDP recorded as the splice on to `balancer_replay`; returns only if
/// that program is missing, and the SYN-ACK then goes to the agent as without it.
#[inline(always)]
pub fn hand_off(ctx: &XdpContext, packet: &Packet) {
    splice::hand_off(ctx, packet, &REPLAY_PROGRAM);
}

/// `balancer_replay`: copies the SYN-ACK for the agent, then sends the replay in its place.
/// A connection XDP bound itself gets no copy: the agent has none of it.
#[inline(always)]
pub fn answer(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let truncated = Verdict::drop(Reason::DropTruncated);
    let packet = splice::handed_off().ok_or(truncated)?;
    let entry = REVERSE.get_ptr_mut(&packet.key).ok_or(truncated)?;
    // SAFETY: map values stay valid for the duration of the program; copies are taken.
    let nat = unsafe { *entry };
    let client_key = splice::client_key(&packet, &nat);
    let bound_by_xdp = nat.flags & reverse_flags::BOUND_BY_XDP != 0;
    let record = if bound_by_xdp {
        None
    } else {
        let client = *splice::client_of(&packet, &nat);
        // SAFETY: as above.
        let binding = unsafe { BINDINGS.get(&client_key) }.map_or(Binding::NONE, |b| *b);
        Some(punt::record(ctx, punt_kind::BACKEND, &client, &binding)?)
    };
    // The splice scales the backend's windows by the shift written with the SYN: the agent
    // corrects it before it replays should this SYN-ACK announce another; XDP, having
    // written it without knowing, takes the SYN-ACK's.
    if nat.client_window_shift != 0 && bound_by_xdp {
        // SAFETY: as above; nothing else writes the entry before the replay.
        unsafe { (*entry).backend_window_shift = window_shift(ctx, &packet) };
    }
    let scale_known = nat.client_window_shift == 0
        || bound_by_xdp
        || window_shift(ctx, &packet) == nat.backend_window_shift;
    let built = scale_known
        && REPLAYS
            .get_ptr(&client_key)
            .and_then(|replay| build(ctx, &packet, replay))
            .is_some();
    if built {
        // Sent once: a SYN-ACK again means the replay was lost, and the agent answers that
        // from its own copy (a connection XDP bound has the client's resend, its request
        // unacknowledged). Not keeping it also keeps the LRU from evicting on every insert.
        let _ = REPLAYS.remove(&client_key);
    }
    let punted = record.is_some();
    if let Some(mut record) = record {
        if built {
            // SAFETY: `record` is a reserved `Punt`, filled by `punt::record`.
            unsafe { (*record.as_mut_ptr()).kind = punt_kind::REPLAYED };
        }
        record.submit(0);
    }
    if !built {
        let reason = if punted {
            Reason::Punted
        } else {
            Reason::DropWhileBinding
        };
        return Err(Verdict::drop(reason));
    }
    Ok(Verdict {
        action: reply::send_back(ctx),
        reason: Reason::ReplayedByXdp,
    })
}

/// Rewrites the SYN-ACK into the ACK that carries `replay`, back to the backend from the
/// address and port it answered: the sequence numbers the handshake leaves, timestamps when
/// the replay has them (the SYN-ACK's TSval echoed), full checksums.
#[inline(always)]
fn build(ctx: &XdpContext, packet: &Packet, replay: *const Replay) -> Option<()> {
    // SAFETY: map values stay valid for the duration of the program.
    let replay = unsafe { &*replay };
    let len = usize::from(replay.len);
    if len == 0 || len > MAX_REPLAY {
        return None;
    }
    let seq = splice::read_u32(ctx, packet.tcp_field(tcp_field::ACK)).ok()?;
    let ack = splice::read_u32(ctx, packet.tcp_field(tcp_field::SEQ))
        .ok()?
        .wrapping_add(1);
    let echo = if replay.timestamps != 0 {
        Some(tcp_options::synack_tsval(ctx, packet)?)
    } else {
        None
    };
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked that the header lies inside the frame.
    let macs = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    let tcp_len = if echo.is_some() {
        TCP_HEADER_LEN + ALIGNED_TIMESTAMPS_LEN
    } else {
        TCP_HEADER_LEN
    };
    let key = &packet.key;
    let l4_offset = reply::l4_offset(packet.v6);
    reply::resize(ctx, l4_offset + tcp_len + len)?;
    reply::write_headers(ctx, macs, &key.dst, &key.src, tcp_len + len)?;
    let tcp: *mut [u8; TCP_HEADER_LEN] = ptr_at(ctx, l4_offset)?;
    // SAFETY: `ptr_at` checked that the header lies inside the frame.
    let tcp = unsafe { &mut *tcp };
    [tcp[0], tcp[1]] = key.dport.to_ne_bytes();
    [tcp[2], tcp[3]] = key.sport.to_ne_bytes();
    [tcp[4], tcp[5], tcp[6], tcp[7]] = seq.to_be_bytes();
    [tcp[8], tcp[9], tcp[10], tcp[11]] = ack.to_be_bytes();
    tcp[12] = ((tcp_len / 4) as u8) << 4;
    tcp[13] = ACK | PSH;
    [tcp[14], tcp[15]] = replay.window.to_be_bytes();
    [tcp[16], tcp[17], tcp[18], tcp[19]] = [0; 4];
    if let Some(echo) = echo {
        let options: *mut [[u8; 4]; 3] = ptr_at(ctx, l4_offset + TCP_HEADER_LEN)?;
        // SAFETY: `ptr_at` checked that the options lie inside the frame.
        unsafe {
            *options = [
                [tcp_option::NOP, tcp_option::NOP, tcp_option::TIMESTAMP, 10],
                replay.tsval.to_be_bytes(),
                echo.to_be_bytes(),
            ]
        };
    }
    // SAFETY: the frame ends just past the replay's `len` bytes, 1..=MAX_REPLAY.
    let stored = unsafe {
        packet::store_bytes(
            ctx.ctx,
            (l4_offset + tcp_len) as u32,
            replay.bytes.as_ptr().cast_mut().cast(),
            len.clamp(1, MAX_REPLAY) as u64,
        )
    };
    if stored != 0 {
        return None;
    }
    let data = (len, replay.sum);
    if echo.is_some() {
        reply::write_checksums::<{ (TCP_HEADER_LEN + ALIGNED_TIMESTAMPS_LEN) / 2 }>(
            ctx, packet.v6, data,
        )
    } else {
        reply::write_checksums::<{ TCP_HEADER_LEN / 2 }>(ctx, packet.v6, data)
    }
}

/// The window scale a SYN-ACK announces, 0 without the option.
#[inline(always)]
fn window_shift(ctx: &XdpContext, packet: &Packet) -> u8 {
    let Some(options) = Options::load(ctx, packet) else {
        return 0;
    };
    let mut shift = 0;
    options.each(|kind, at, len| {
        if kind == tcp_option::WINDOW_SCALE && len == 3 {
            shift = options.byte(at + 2);
            return false;
        }
        true
    });
    shift
}
