//! The cookie handshake in XDP: a client's SYN to a cookie service is answered with a SYN
//! cookie, the segment that carries it back starts the binding, and the client's data goes
//! to the agent, which reads the request's cookie and opens the backend side.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use balancer_common::{
    binding_state,
    proto::tcp_flag::{ACK, FIN, RST, SYN},
    punt_kind,
    syncookie::{check_syn_cookie, options_from_tsecr, MSS_TABLE},
    Binding, CookieSecret, FlowKey, Reason, SynOptions, COOKIE_PERIOD_S, MAX_PUNTS_PER_BINDING,
    NO_WINDOW_SCALE,
};
use network_types::tcp::TcpHdr;

use crate::{
    agent, bind,
    maps::{BINDINGS, COOKIE_SECRET, SYN_OPTIONS},
    packet::{ptr_at, Packet},
    punt::punt,
    reset, splice,
    stats::{self, Verdict},
    synack, tcp_options,
};

/// Sequence numbers past a binding's first byte that still count as its own segments: twice
/// the 64 KB window the agent offers while it reads the head.
const OWN_SEGMENT_SPAN: u32 = 1 << 17;
/// Acknowledgement numbers past a binding's cookie that still count as its own segments:
/// room for the agent's own short answers (404, 503), far below the 64 KB by which a reused
/// TIME_WAIT socket's ISN, and so its cookie, moves on.
const OWN_ANSWER_SPAN: u32 = 1 << 12;
/// Options a client is assumed to have when its SYN's were evicted from `SYN_OPTIONS`.
const DEFAULT_OPTIONS: SynOptions = SynOptions {
    mss: 536,
    window_shift: NO_WINDOW_SCALE,
    sack_permitted: 0,
    timestamps: 0,
    _pad: [0; 3],
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
        // A segment of this connection lies within reach of its first byte and, if it
        // acknowledges at all, acknowledges its SYN cookie (or the little the agent answers
        // itself). A new handshake on the port starts from a fresh ISN, almost surely
        // elsewhere, but a client that reuses its TIME_WAIT socket starts 64 KB past the old
        // connection's end, and its cookie moves with its ISN. Only a new handshake pays for
        // checking a cookie.
        let own_seq = seq.wrapping_sub(binding.client_isn.wrapping_add(1)) < OWN_SEGMENT_SPAN;
        // (A reset without an acknowledgement is judged by its sequence number alone.)
        let own_ack = flags & ACK == 0
            || ack.wrapping_sub(binding.cookie_isn.wrapping_add(1)) < OWN_ANSWER_SPAN;
        if own_seq && own_ack {
            return while_bound(ctx, packet, binding, now_s);
        }
    }
    if flags & ACK == 0 || flags & (SYN | RST) != 0 {
        return bad_cookie;
    }
    let Some(carried_mss) = check_cookie(key, client_isn, cookie_isn) else {
        return bad_cookie;
    };
    let options = match SYN_OPTIONS.get_ptr(key) {
        // SAFETY: map values stay valid for the duration of the program.
        Some(options) => unsafe { *options },
        None => forgotten_options(ctx, packet, MSS_TABLE[carried_mss as usize & 3]),
    };
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

/// Under a flood the SYN's options may be gone: its MSS still travels in the cookie, and its
/// window scale and SACK permission in the TSval the client echoes, if it uses timestamps.
#[inline(always)]
fn forgotten_options(ctx: &XdpContext, packet: &Packet, mss: u16) -> SynOptions {
    let tsecr = tcp_options::timestamps_at(ctx, packet)
        .and_then(|tsval_at| splice::read_u32(ctx, tsval_at + 4).ok());
    match tsecr {
        Some(tsecr) => options_from_tsecr(tsecr, mss),
        None => SynOptions {
            mss,
            ..DEFAULT_OPTIONS
        },
    }
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

/// A client segment while its connection is being bound: data, FIN and RST go to the agent
/// with the connection's binding, within the connection's punt budget, except a first data
/// segment that `bind` binds from the client's known session; pure ACKs are not needed.
#[inline(always)]
pub fn while_binding(ctx: &XdpContext, packet: &Packet) -> Verdict {
    if packet.payload_len == 0 && packet.tcp_flags & (FIN | RST) == 0 {
        return Verdict::drop(Reason::DropWhileBinding);
    }
    let binding = match BINDINGS.get_ptr_mut(&packet.key) {
        Some(binding) => {
            // SAFETY: map values stay valid for the duration of the program; concurrent
            // segments of one connection only race on the count, which then errs by one.
            let binding = unsafe { &mut *binding };
            if binding.punts >= MAX_PUNTS_PER_BINDING {
                return Verdict::drop(Reason::DropPuntBudget);
            }
            binding.punts += 1;
            if binding.punts == 1 {
                bind::hand_off(ctx, packet);
            }
            *binding
        }
        None => Binding::NONE,
    };
    punt(ctx, punt_kind::CLIENT, &packet.key.src, &binding)
}
