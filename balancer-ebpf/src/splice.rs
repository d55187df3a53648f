//! Spliced cookie connections in XDP: once both legs are up every packet is forwarded with
//! its sequence numbers shifted between the two legs' ISNs (and past what the agent added to
//! the response head or removed from the request), its SACK blocks with them, each end's
//! TSvals moved onto the balancer's clock (and the other end's echoes of them back), and the
//! backend's windows rescaled. The handshake before it is in `handshake`.

use aya_ebpf::{maps::ProgramArray, programs::XdpContext};
use balancer_common::{
    binding_state, csum, flow_flags, flow_state,
    proto::{
        tcp_field,
        tcp_flag::{ACK, FIN, RST, SYN},
        tcp_option, TCP_HEADER_LEN,
    },
    punt_kind, reverse_flags, Addr, Binding, Flow, FlowKey, Reason, ReverseNat, PROTO_TCP,
};

use crate::{
    maps::{BINDINGS, COOKIE_HANDOFF, FLOWS, HEAD_INSERTS},
    packet::{ptr_at, Packet, L4_OFFSET_LIMIT},
    punt,
    stats::Verdict,
    tcp_options::{self, Options, ALIGNED_TIMESTAMPS_LEN},
};

/// Block edges a SACK option holds at most: 4 blocks of two (2 + 32 of the 40 option bytes).
const MAX_SACK_EDGES: usize = 8;
/// A client segment of a spliced connection: acknowledgement numbers move into the backend's
/// sequence space. (The address rewrite is the caller's.)
#[inline(always)]
pub fn client_to_backend(ctx: &XdpContext, packet: &Packet, flow: &Flow) -> Result<(), Verdict> {
    if flow.flags & flow_flags::TIMESTAMPS != 0 {
        shift_timestamps(
            ctx,
            packet,
            (flow.client_ts_delta, flow.ts_delta.wrapping_neg()),
        )?;
    }
    if flow.removed != 0 {
        // Bytes the client sends again from before the shortened request's end land, moved
        // back, on bytes the backend already has from the agent, which it ignores.
        shift(
            ctx,
            packet,
            packet.tcp_field(tcp_field::SEQ),
            flow.removed.wrapping_neg(),
        )?;
    }
    if packet.tcp_flags & ACK == 0 {
        return Ok(());
    }
    if flow.inserted == 0 {
        shift(
            ctx,
            packet,
            packet.tcp_field(tcp_field::ACK),
            flow.seq_delta,
        )?;
        return shift_sack_blocks(ctx, packet, flow.seq_delta);
    }
    let past_head = flow.seq_delta.wrapping_sub(flow.inserted);
    if flow.flags & flow_flags::HEAD_ACKED == 0 {
        // Part of the edited head: its bytes do not map one to one onto the backend's, so
        // acknowledge at most up to the head's last byte. The backend sends from there
        // again, and the agent answers with the whole edited head.
        let ack = read_u32(ctx, packet.tcp_field(tcp_field::ACK))?;
        let last_head_byte = flow.head_end.wrapping_add(past_head).wrapping_sub(1);
        let shifted = ack.wrapping_add(flow.seq_delta);
        let delta = if (shifted.wrapping_sub(last_head_byte) as i32) > 0 {
            last_head_byte.wrapping_sub(ack)
        } else {
            flow.seq_delta
        };
        shift(ctx, packet, packet.tcp_field(tcp_field::ACK), delta)?;
    } else {
        shift(ctx, packet, packet.tcp_field(tcp_field::ACK), past_head)?;
    }
    // Blocks inside the edited head come out approximate: the backend learns at most that
    // some head bytes arrived, and any head bytes it sends again reach the agent.
    shift_sack_blocks(ctx, packet, past_head)
}

/// Marks the flow once the client acknowledged its whole edited response head; the cookie
/// lines XDP put in are no longer needed then, nor is the agent, which is told so.
#[inline(always)]
pub fn note_head_acked(ctx: &XdpContext, packet: &Packet, flow: &mut Flow) {
    if flow.flags & flow_flags::HEAD_ACKED != 0 || packet.tcp_flags & ACK == 0 {
        return;
    }
    if let Ok(ack) = read_u32(ctx, packet.tcp_field(tcp_field::ACK)) {
        if ack.wrapping_sub(flow.head_end) as i32 >= 0 {
            flow.flags |= flow_flags::HEAD_ACKED;
            if flow.flags & flow_flags::HEAD_BY_XDP != 0 {
                let _ = HEAD_INSERTS.remove(&packet.key);
            }
            // A connection XDP bound itself, the agent has none of.
            if flow.flags & (flow_flags::HEAD_BY_XDP | flow_flags::BOUND_BY_XDP)
                == flow_flags::HEAD_BY_XDP
            {
                punt::tell(
                    ctx,
                    punt_kind::HEAD_DELIVERED,
                    Reason::HeadDelivered,
                    &packet.key.src,
                );
            }
        }
    }
}

/// The backend's SYN-ACK answering the agent's SYN for a cookie connection: XDP records the
/// splice in both entries itself (the offsets from the SYN cookie to the backend's ISN and,
/// with timestamps, from the balancer's TSval to the backend's), so the agent only replays
/// the request; everything else the splice needs the agent wrote
/// with the SYN, the backend's window scale as that backend last announced it (the agent
/// corrects it before it replays the request, should the backend announce another).
/// Returns the connection's binding when it did (the agent then writes nothing), `None` for
/// a segment that answers no SYN of ours. `nat` is the caller's copy of `entry`.
#[inline(always)]
pub fn record_at_synack(
    ctx: &XdpContext,
    packet: &Packet,
    (nat, entry): (&ReverseNat, *mut ReverseNat),
) -> Option<Binding> {
    if packet.tcp_flags & (SYN | ACK | RST) != SYN | ACK {
        return None;
    }
    let client_key = client_key(packet, nat);
    // SAFETY: map values stay valid for the duration of the program; the copy is taken at
    // once.
    let binding = unsafe { *BINDINGS.get(&client_key)? };
    let ack = read_u32(ctx, packet.tcp_field(tcp_field::ACK)).ok()?;
    if binding.state != binding_state::ACCEPTED || ack != binding.client_isn.wrapping_add(1) {
        return None;
    }
    let flow = FLOWS.get_ptr_mut(&client_key)?;
    // SAFETY: as above.
    let connecting =
        unsafe { (*flow).state == flow_state::CONNECTING && (*flow).backend_id == nat.backend_id };
    if !connecting {
        return None;
    }
    let backend_isn = read_u32(ctx, packet.tcp_field(tcp_field::SEQ)).ok()?;
    let delta = backend_isn.wrapping_sub(binding.cookie_isn);
    // The backend's first TSval becomes the last the client had from the balancer, which
    // the agent left in `ts_delta`.
    let ts_delta = if nat.flags & reverse_flags::TIMESTAMPS != 0 {
        nat.ts_delta
            .wrapping_sub(tcp_options::synack_tsval(ctx, packet)?)
    } else {
        0
    };
    let state = if nat.flags & reverse_flags::HEAD_TO_AGENT != 0 {
        flow_state::RESPONSE_HEAD
    } else {
        flow_state::SPLICED
    };
    // SAFETY: as above. The reverse entry first, as the agent writes them: once the flow is
    // spliced, replies may come.
    unsafe {
        (*entry).seq_delta = delta;
        (*entry).ts_delta = ts_delta;
        if nat.flags & reverse_flags::COOKIE_BY_XDP != 0 {
            (*entry).head_end = backend_isn.wrapping_add(1);
        }
        (*entry).state = state;
        (*flow).seq_delta = delta;
        (*flow).ts_delta = ts_delta;
        (*flow).state = flow_state::SPLICED;
    }
    Some(binding)
}

/// The client side's key of a backend segment's connection: full NAT names the client in
/// the reverse entry; gateway NAT's backend answers the client directly.
#[inline(always)]
pub fn client_key(packet: &Packet, nat: &ReverseNat) -> FlowKey {
    let (client, client_port) = if nat.client_port != 0 {
        (nat.client, nat.client_port)
    } else {
        (packet.key.dst, packet.key.dport)
    };
    FlowKey {
        src: client,
        dst: nat.vip,
        sport: client_port,
        dport: nat.port,
        proto: PROTO_TCP,
        _pad: [0; 3],
    }
}

/// The client of a backend's segment: in full NAT the reverse entry's, else the segment's
/// destination.
#[inline(always)]
pub fn client_of<'a>(packet: &'a Packet, nat: &'a ReverseNat) -> &'a Addr {
    if nat.client_port != 0 {
        &nat.client
    } else {
        &packet.key.dst
    }
}

/// Clears the reverse entry's `replay_end` once the backend acknowledges all of the request
/// the agent replayed to it.
#[inline(always)]
pub fn note_replay_acked(ctx: &XdpContext, packet: &Packet, entry: *mut ReverseNat) {
    if packet.tcp_flags & ACK == 0 {
        return;
    }
    if let Ok(ack) = read_u32(ctx, packet.tcp_field(tcp_field::ACK)) {
        // SAFETY: map values stay valid for the duration of the program; a racing writer
        // only delays the agent's check.
        unsafe {
            if ack.wrapping_sub((*entry).replay_end) as i32 >= 0 {
                (*entry).replay_end = 0;
            }
        }
    }
}

/// Whether a backend segment of a spliced connection goes to the agent: data or FIN while
/// it reads the response head, and data sent again from before the end of a head it edited
/// (until the client acknowledged that head; later the same sequence numbers, 2 GB further
/// on, are new data).
#[inline(always)]
pub fn for_agent(ctx: &XdpContext, packet: &Packet, nat: &ReverseNat) -> bool {
    let carries_data = packet.payload_len > 0 || packet.tcp_flags & FIN != 0;
    if !carries_data {
        return false;
    }
    if nat.state == flow_state::RESPONSE_HEAD {
        return true;
    }
    if nat.inserted == 0 {
        return false;
    }
    let Ok(seq) = read_u32(ctx, packet.tcp_field(tcp_field::SEQ)) else {
        return false;
    };
    if seq.wrapping_sub(nat.head_end) as i32 >= 0 {
        return false;
    }
    let client_key = client_key(packet, nat);
    // SAFETY: map values stay valid for the duration of the program.
    FLOWS
        .get_ptr(&client_key)
        .is_some_and(|flow| unsafe { (*flow).flags } & flow_flags::HEAD_ACKED == 0)
}

#[inline(always)]
pub fn read_u32(ctx: &XdpContext, offset: usize) -> Result<u32, Verdict> {
    let field: *const [u8; 4] = ptr_at(ctx, offset).ok_or(Verdict::drop(Reason::DropTruncated))?;
    // SAFETY: `ptr_at` checked that the field lies inside the frame.
    Ok(u32::from_be_bytes(unsafe { *field }))
}

/// Moves the edges of a segment's SACK blocks by `delta`, as its acknowledgement number: they
/// name the other side's bytes in the sequence space that side knows.
#[inline(always)]
pub fn shift_sack_blocks(ctx: &XdpContext, packet: &Packet, delta: u32) -> Result<(), Verdict> {
    if packet.tcp_header_len <= TCP_HEADER_LEN {
        return Ok(());
    }
    // Most segments with options carry only the timestamps: no copy of them is needed.
    if packet.tcp_header_len == TCP_HEADER_LEN + ALIGNED_TIMESTAMPS_LEN
        && tcp_options::timestamps_at(ctx, packet).is_some()
    {
        return Ok(());
    }
    let truncated = Verdict::drop(Reason::DropTruncated);
    let mut options = Options::load(ctx, packet).ok_or(truncated)?;
    // Stacks align the SACK option on a word: first, behind two NOPs, or behind two NOPs
    // and a timestamp and two NOPs again. A block left untranslated elsewhere costs speed,
    // never data: the sender retransmits what is not acknowledged in the end. Not walking the options
    // keeps this per-packet path cheap for the verifier.
    let nops =
        |at: usize| options.byte(at) == tcp_option::NOP && options.byte(at + 1) == tcp_option::NOP;
    let at = if options.byte(0) == tcp_option::SACK {
        0
    } else if nops(0) && options.byte(2) == tcp_option::SACK {
        2
    } else if nops(0)
        && options.byte(2) == tcp_option::TIMESTAMP
        && nops(12)
        && options.byte(14) == tcp_option::SACK
    {
        14
    } else {
        return Ok(());
    };
    let len = usize::from(options.byte(at + 1));
    let check: *mut [u8; 2] = ptr_at(ctx, packet.l4_check_offset).ok_or(truncated)?;
    // SAFETY: `ptr_at` checked that the field lies inside the frame.
    let mut sum = u16::from_ne_bytes(unsafe { *check });
    for edge in 0..MAX_SACK_EDGES {
        let field = at + 2 + 4 * edge;
        if field + 4 > at + len {
            break;
        }
        let old = options.word(field);
        let new = u32::from_be_bytes(old).wrapping_add(delta).to_be_bytes();
        options.set_word(field, new);
        sum = csum::replace32(sum, u32::from_ne_bytes(old), u32::from_ne_bytes(new));
    }
    options.store(ctx).ok_or(truncated)?;
    let check: *mut [u8; 2] = ptr_at(ctx, packet.l4_check_offset).ok_or(truncated)?;
    // SAFETY: `ptr_at` checked that the field lies inside the frame.
    unsafe { *check = sum.to_ne_bytes() };
    Ok(())
}

/// A backend segment of a spliced connection: sequence numbers move into the space the client
/// knows, and the window is rescaled to the shift the client was promised.
#[inline(always)]
pub fn backend_to_client(
    ctx: &XdpContext,
    packet: &Packet,
    nat: &ReverseNat,
) -> Result<(), Verdict> {
    shift(
        ctx,
        packet,
        packet.tcp_field(tcp_field::SEQ),
        nat.seq_delta.wrapping_neg(),
    )?;
    if nat.flags & reverse_flags::TIMESTAMPS != 0 {
        shift_timestamps(
            ctx,
            packet,
            (nat.ts_delta, nat.client_ts_delta.wrapping_neg()),
        )?;
    }
    if nat.removed != 0 && packet.tcp_flags & ACK != 0 {
        shift(ctx, packet, packet.tcp_field(tcp_field::ACK), nat.removed)?;
        shift_sack_blocks(ctx, packet, nat.removed)?;
    }
    if nat.backend_window_shift != nat.client_window_shift {
        rescale_window(
            ctx,
            packet,
            nat.backend_window_shift,
            nat.client_window_shift,
        )?;
    }
    Ok(())
}

/// Adds `delta` to the 32-bit sequence field at `offset`, fixing the TCP checksum.
#[inline(always)]
pub fn shift(ctx: &XdpContext, packet: &Packet, offset: usize, delta: u32) -> Result<(), Verdict> {
    let truncated = Verdict::drop(Reason::DropTruncated);
    let field: *mut [u8; 4] = ptr_at(ctx, offset).ok_or(truncated)?;
    let check: *mut [u8; 2] = ptr_at(ctx, packet.l4_check_offset).ok_or(truncated)?;
    // SAFETY: `ptr_at` checked that both fields lie inside the frame.
    unsafe {
        let old = *field;
        let new = u32::from_be_bytes(old).wrapping_add(delta).to_be_bytes();
        *field = new;
        let sum = csum::replace32(
            u16::from_ne_bytes(*check),
            u32::from_ne_bytes(old),
            u32::from_ne_bytes(new),
        );
        *check = sum.to_ne_bytes();
    }
    Ok(())
}

/// Adds `deltas` to the segment's TSval and TSecr, if it carries them where
/// `tcp_options::timestamps_at` looks, fixing the TCP checksum.
#[inline(always)]
fn shift_timestamps(
    ctx: &XdpContext,
    packet: &Packet,
    (value_delta, echo_delta): (u32, u32),
) -> Result<(), Verdict> {
    let Some(tsval_at) = tcp_options::timestamps_at(ctx, packet) else {
        return Ok(());
    };
    let truncated = Verdict::drop(Reason::DropTruncated);
    let fields: *mut [[u8; 4]; 2] = ptr_at(ctx, tsval_at).ok_or(truncated)?;
    let check: *mut [u8; 2] = ptr_at(ctx, packet.l4_check_offset).ok_or(truncated)?;
    // SAFETY: `ptr_at` checked that the fields lie inside the frame.
    unsafe {
        let [old_value, old_echo] = *fields;
        let value = u32::from_be_bytes(old_value)
            .wrapping_add(value_delta)
            .to_be_bytes();
        let echo = u32::from_be_bytes(old_echo)
            .wrapping_add(echo_delta)
            .to_be_bytes();
        *fields = [value, echo];
        let sum = csum::replace32(
            u16::from_ne_bytes(*check),
            u32::from_ne_bytes(old_value),
            u32::from_ne_bytes(value),
        );
        let sum = csum::replace32(sum, u32::from_ne_bytes(old_echo), u32::from_ne_bytes(echo));
        *check = sum.to_ne_bytes();
    }
    Ok(())
}

#[inline(always)]
fn rescale_window(ctx: &XdpContext, packet: &Packet, from: u8, to: u8) -> Result<(), Verdict> {
    let truncated = Verdict::drop(Reason::DropTruncated);
    let field: *mut [u8; 2] = ptr_at(ctx, packet.tcp_field(tcp_field::WINDOW)).ok_or(truncated)?;
    let check: *mut [u8; 2] = ptr_at(ctx, packet.l4_check_offset).ok_or(truncated)?;
    // SAFETY: `ptr_at` checked that both fields lie inside the frame.
    unsafe {
        let old = *field;
        let bytes = u64::from(u16::from_be_bytes(old)) << (from & 15) >> (to & 15);
        let new = (bytes.min(u64::from(u16::MAX)) as u16).to_be_bytes();
        *field = new;
        let sum = csum::replace16(
            u16::from_ne_bytes(*check),
            u16::from_ne_bytes(old),
            u16::from_ne_bytes(new),
        );
        *check = sum.to_ne_bytes();
    }
    Ok(())
}

/// Passes a backend segment of a cookie connection on to the program in entry 0 of
/// `program` (`head`, `replay`), with the parsed packet in `COOKIE_HANDOFF`; returns only if
/// that program is missing, and the segment then goes where it would without it.
#[inline(always)]
pub fn hand_off(ctx: &XdpContext, packet: &Packet, program: &ProgramArray) {
    if let Some(handoff) = COOKIE_HANDOFF.get_ptr_mut(0) {
        // SAFETY: the entry is this CPU's, and only this program run touches it; the tail
        // call runs on this CPU in the same run.
        unsafe {
            *handoff = *packet;
            let _ = program.tail_call(ctx, 0);
        }
    }
}

/// In the program `hand_off` called: the segment it passed.
#[inline(always)]
pub fn handed_off() -> Option<Packet> {
    let handoff = COOKIE_HANDOFF.get_ptr(0)?;
    // SAFETY: as in `hand_off`.
    let mut packet = unsafe { *handoff };
    // Read from a map, the offsets are unknown to the verifier: bound them as parsing did.
    packet.l4_offset &= L4_OFFSET_LIMIT - 1;
    packet.l4_check_offset &= L4_OFFSET_LIMIT - 1;
    Some(packet)
}
