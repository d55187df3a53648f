//! Cookie services in XDP: the client's handshake is completed with a SYN cookie, its data
//! goes to the agent (which reads the request's cookie and opens the backend side), and once
//! both legs are up every packet is forwarded with its sequence numbers shifted between the
//! two legs' ISNs and the backend's windows rescaled.

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use balancer_common::{
    binding_state, csum, flow_flags, flow_state,
    proto::{
        tcp_field,
        tcp_flag::{ACK, FIN, RST, SYN},
        tcp_option, TCP_HEADER_LEN,
    },
    punt_kind,
    syncookie::{check_syn_cookie, MSS_TABLE},
    Binding, CookieSecret, Flow, FlowKey, Punt, Reason, ReverseNat, SynOptions, COOKIE_PERIOD_S,
    MAX_PUNTS_PER_BINDING, NO_WINDOW_SCALE, PROTO_TCP, PUNT_FRAME_SIZE,
};
use network_types::tcp::TcpHdr;

use crate::{
    agent,
    maps::{BINDINGS, COOKIE_SECRET, FLOWS, PUNTS, SYN_OPTIONS},
    packet::{ptr_at, Packet, L4_OFFSET_V4},
    reset,
    stats::{self, Verdict},
    synack,
    tcp_options::Options,
};

/// Block edges a SACK option holds at most: 4 blocks of two (2 + 32 of the 40 option bytes).
const MAX_SACK_EDGES: usize = 8;
/// Sequence numbers past a binding's first byte that still count as its own segments: twice
/// the 64 KB window the agent offers while it reads the head.
const OWN_SEGMENT_SPAN: u32 = 1 << 17;
/// Options a client is assumed to have when its SYN's were evicted from `SYN_OPTIONS`.
const DEFAULT_OPTIONS: SynOptions = SynOptions {
    mss: 536,
    window_shift: NO_WINDOW_SCALE,
    sack_permitted: 0,
};

/// The current SYN cookie secret (0) or the previous one (1).
pub fn cookie_secret(index: u32) -> CookieSecret {
    COOKIE_SECRET.get(index).copied().unwrap_or_default()
}

pub fn cookie_period() -> u32 {
    // SAFETY: a helper without arguments.
    let now_s = unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000;
    (now_s / u64::from(COOKIE_PERIOD_S)) as u32
}

/// A client segment of a cookie service that belongs to no flow: a SYN is answered with a SYN
/// cookie; the first segment after it, carrying a valid cookie, starts the binding, which
/// lives in `BINDINGS` alone until the agent opens the backend side, so that handshakes that
/// never send a request cannot push established flows out of `FLOWS`.
#[inline(always)]
pub fn accept(ctx: &XdpContext, packet: &Packet, now_s: u32) -> Verdict {
    let flags = packet.tcp_flags;
    if flags & SYN != 0 && flags & (ACK | RST) == 0 {
        return synack::answer(ctx, packet);
    }
    let bad_cookie = Verdict::drop(Reason::DropBadCookie);
    let Some(tcp) = ptr_at::<TcpHdr>(ctx, packet.l4_offset) else {
        return bad_cookie;
    };
    // SAFETY: `ptr_at` checked that the header lies inside the frame.
    let (seq, ack) = unsafe {
        (
            u32::from_be_bytes((*tcp).seq),
            u32::from_be_bytes((*tcp).ack_seq),
        )
    };
    let key = &packet.key;
    let cookie_isn = ack.wrapping_sub(1);
    let client_isn = seq.wrapping_sub(1);
    if let Some(binding) = BINDINGS.get_ptr_mut(key) {
        // SAFETY: map values stay valid for the duration of the program.
        let binding = unsafe { &mut *binding };
        // A segment of this connection lies within reach of its first byte; a new handshake
        // on the port starts from a fresh ISN, almost surely elsewhere. Only that one pays
        // for checking a cookie.
        if seq.wrapping_sub(binding.client_isn.wrapping_add(1)) < OWN_SEGMENT_SPAN {
            return while_bound(ctx, packet, binding, now_s);
        }
    }
    if flags & ACK == 0 || flags & (SYN | RST) != 0 {
        return bad_cookie;
    }
    let Some(carried_mss) = check_cookie(key, client_isn, cookie_isn) else {
        return bad_cookie;
    };
    // Under a flood the SYN's options may be gone: its MSS still travels in the cookie.
    let forgotten = SynOptions {
        mss: MSS_TABLE[carried_mss as usize & 3],
        ..DEFAULT_OPTIONS
    };
    let options = SYN_OPTIONS.get_ptr(key).map_or(forgotten, |o| {
        // SAFETY: map values stay valid for the duration of the program.
        unsafe { *o }
    });
    let _ = SYN_OPTIONS.remove(key);
    let binding = Binding {
        client_isn,
        cookie_isn,
        options,
        state: binding_state::ACCEPTED,
        punts: 0,
        accepted_s: now_s,
    };
    if BINDINGS.insert(key, &binding, 0).is_err() {
        return Verdict::drop(Reason::DropWhileBinding);
    }
    stats::count(Reason::HandshakeDone, 0);
    while_binding(ctx, packet)
}

/// The MSS index `cookie_isn` carries if it is the SYN cookie of the client's connection,
/// made in this period or the one before, under the current secret or the previous one.
#[inline(always)]
fn check_cookie(key: &FlowKey, client_isn: u32, cookie_isn: u32) -> Option<u32> {
    let period = cookie_period();
    check_syn_cookie(&cookie_secret(0), key, client_isn, cookie_isn, period)
        .or_else(|| check_syn_cookie(&cookie_secret(1), key, client_isn, cookie_isn, period))
}

/// A segment of a connection whose handshake the balancer completed: refused ones are reset
/// again, one whose client sent no request within the agent's request timeout is refused,
/// the rest go on to the agent.
#[inline(always)]
fn while_bound(ctx: &XdpContext, packet: &Packet, binding: &mut Binding, now_s: u32) -> Verdict {
    let reason = if binding.state == binding_state::REFUSED {
        Reason::ResetRefused
    } else if binding.punts == 0
        && now_s.wrapping_sub(binding.accepted_s) > agent::request_timeout_s()
    {
        binding.state = binding_state::REFUSED;
        Reason::ResetNoRequest
    } else {
        return while_binding(ctx, packet);
    };
    reset::refuse(ctx, packet, reason, Reason::DropWhileBinding)
}

/// A client segment while its connection is being bound: data, FIN and RST go to the agent,
/// pure ACKs are not needed.
#[inline(always)]
pub fn while_binding(ctx: &XdpContext, packet: &Packet) -> Verdict {
    if packet.payload_len == 0 && packet.tcp_flags & (FIN | RST) == 0 {
        return Verdict::drop(Reason::DropWhileBinding);
    }
    if !within_punt_budget(&packet.key) {
        return Verdict::drop(Reason::DropPuntBudget);
    }
    punt(ctx, punt_kind::CLIENT)
}

/// Counts a punt against the connection's budget; false once it is spent.
#[inline(always)]
fn within_punt_budget(key: &FlowKey) -> bool {
    let Some(binding) = BINDINGS.get_ptr_mut(key) else {
        return true;
    };
    // SAFETY: map values stay valid for the duration of the program; concurrent segments of
    // one connection only race on the count, which then errs by a segment.
    let binding = unsafe { &mut *binding };
    if binding.punts >= MAX_PUNTS_PER_BINDING {
        return false;
    }
    binding.punts += 1;
    true
}

/// Hands the frame to the agent through the `PUNTS` ring and drops it here.
#[inline(always)]
pub fn punt(ctx: &XdpContext, kind: u32) -> Verdict {
    let Some(mut entry) = PUNTS.reserve::<Punt>(0) else {
        return Verdict::drop(Reason::DropPuntRingFull);
    };
    // Punted frames were parsed as TCP, so they hold at least the headers; the lower bound
    // also tells the verifier the copy is not empty.
    let len = (ctx.data_end() - ctx.data()).clamp(L4_OFFSET_V4 + TCP_HEADER_LEN, PUNT_FRAME_SIZE);
    let record = entry.as_mut_ptr();
    // SAFETY: `record` points at a reserved `Punt`; `len` is at most its frame's size.
    let copied = unsafe {
        (*record).kind = kind;
        (*record).len = len as u32;
        bpf_xdp_load_bytes(ctx.ctx, 0, (*record).frame.as_mut_ptr().cast(), len as u32) == 0
    };
    if !copied {
        entry.discard(0);
        return Verdict::drop(Reason::DropTruncated);
    }
    entry.submit(0);
    Verdict::drop(Reason::Punted)
}

/// A client segment of a spliced connection: acknowledgement numbers move into the backend's
/// sequence space. (The address rewrite is the caller's.)
#[inline(always)]
pub fn client_to_backend(ctx: &XdpContext, packet: &Packet, flow: &Flow) -> Result<(), Verdict> {
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

/// Marks the flow once the client acknowledged its whole edited response head.
#[inline(always)]
pub fn note_head_acked(ctx: &XdpContext, packet: &Packet, flow: &mut Flow) {
    if flow.flags & flow_flags::HEAD_ACKED != 0 || packet.tcp_flags & ACK == 0 {
        return;
    }
    if let Ok(ack) = read_u32(ctx, packet.tcp_field(tcp_field::ACK)) {
        if ack.wrapping_sub(flow.head_end) as i32 >= 0 {
            flow.flags |= flow_flags::HEAD_ACKED;
        }
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
    let (client, client_port) = if nat.client_port != 0 {
        (nat.client, nat.client_port)
    } else {
        (packet.key.dst, packet.key.dport)
    };
    let client_key = FlowKey {
        src: client,
        dst: nat.vip,
        sport: client_port,
        dport: nat.port,
        proto: PROTO_TCP,
        _pad: [0; 3],
    };
    // SAFETY: map values stay valid for the duration of the program.
    FLOWS
        .get_ptr(&client_key)
        .is_some_and(|flow| unsafe { (*flow).flags } & flow_flags::HEAD_ACKED == 0)
}

#[inline(always)]
fn read_u32(ctx: &XdpContext, offset: usize) -> Result<u32, Verdict> {
    let field: *const [u8; 4] = ptr_at(ctx, offset).ok_or(Verdict::drop(Reason::DropTruncated))?;
    // SAFETY: `ptr_at` checked that the field lies inside the frame.
    Ok(u32::from_be_bytes(unsafe { *field }))
}

/// Moves the edges of a segment's SACK blocks by `delta`, as its acknowledgement number: they
/// name the other side's bytes in the sequence space that side knows.
#[inline(always)]
fn shift_sack_blocks(ctx: &XdpContext, packet: &Packet, delta: u32) -> Result<(), Verdict> {
    if packet.tcp_header_len <= TCP_HEADER_LEN {
        return Ok(());
    }
    let truncated = Verdict::drop(Reason::DropTruncated);
    let mut options = Options::load(ctx, packet).ok_or(truncated)?;
    // Stacks align the SACK option on a word: first, or behind two NOPs (timestamps are off
    // on these connections). A block left untranslated elsewhere lies outside the receiver's
    // window and is ignored by it: it costs speed, never data. Not walking the options keeps
    // this per-packet path cheap for the verifier.
    let at = if options.byte(0) == tcp_option::SACK {
        0
    } else if options.byte(0) == tcp_option::NOP
        && options.byte(1) == tcp_option::NOP
        && options.byte(2) == tcp_option::SACK
    {
        2
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
fn shift(ctx: &XdpContext, packet: &Packet, offset: usize, delta: u32) -> Result<(), Verdict> {
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
