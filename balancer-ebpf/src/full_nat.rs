//! Full NAT for XDP's own flows: a new flow's source becomes one of the balancer's addresses
//! and a port it claims (`source`), so the backend replies to the balancer whatever its
//! routing. Placing such a flow is a program of its own, `balancer_full_nat`, reached by a
//! tail call with the parsed packet in `FULL_NAT_HANDOFF`: the claim's work verified inside
//! the main program took the verifier past its limit, and its stack past 512 bytes.

use aya_ebpf::programs::XdpContext;
use balancer_common::{
    flow_flags, flow_state, proto::tcp_field, proxy_v2, reverse_flags, Flow, Reason, ReverseNat,
    PROTO_TCP,
};

use crate::{
    forward,
    maps::{BACKENDS, FLOWS, FULL_NAT_HANDOFF, FULL_NAT_PROGRAM},
    nat::{self, End},
    packet::{Packet, L4_OFFSET_LIMIT},
    reset, source, splice,
    stats::{self, Direction, Verdict},
};

/// What the main program hands over: the parsed packet, the backend chosen for it, and
/// whether its service sends the PROXY header.
pub struct Handoff {
    pub packet: Packet,
    pub backend_id: u32,
    pub proxy: bool,
}

/// Passes a new full-NAT flow's packet on to `balancer_full_nat`; a verdict only if that
/// program is missing (the tail call returned).
#[inline(always)]
pub fn hand_off(ctx: &XdpContext, packet: &Packet, backend_id: u32, proxy: bool) -> Verdict {
    let Some(handoff) = FULL_NAT_HANDOFF.get_ptr_mut(0) else {
        return Verdict::drop(Reason::DropNoNatPort);
    };
    // SAFETY: the entry is this CPU's, and only this program run touches it; the tail call
    // runs on this CPU in the same run.
    unsafe {
        (*handoff).packet = *packet;
        (*handoff).backend_id = backend_id;
        (*handoff).proxy = proxy;
        FULL_NAT_PROGRAM.tail_call(ctx, 0);
    }
    Verdict::drop(Reason::DropNoNatPort)
}

/// `balancer_full_nat`: claims the new flow's source, records it, rewrites both ends and
/// forwards the packet.
#[inline(always)]
pub fn place(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let no_port = Verdict::drop(Reason::DropNoNatPort);
    let handoff = FULL_NAT_HANDOFF.get_ptr(0).ok_or(no_port)?;
    // SAFETY: as in `hand_off`.
    let (mut packet, backend_id, proxy) =
        unsafe { ((*handoff).packet, (*handoff).backend_id, (*handoff).proxy) };
    // Read from a map, the offsets are unknown to the verifier: bound them as parsing did.
    packet.l4_offset &= L4_OFFSET_LIMIT - 1;
    packet.l4_check_offset &= L4_OFFSET_LIMIT - 1;
    let key = &packet.key;
    let backend = BACKENDS
        .get(backend_id)
        .ok_or(Verdict::drop(Reason::DropNoBackend))?;
    let now_s = nat::seconds_now();
    let mut reverse = ReverseNat {
        vip: key.dst,
        port: key.dport,
        client: key.src,
        client_port: key.sport,
        last_seen_s: now_s,
        backend_id,
        ..ReverseNat::default()
    };
    let mut flags = if packet.closing {
        flow_flags::CLOSING
    } else {
        0
    };
    let mut proxy_seq = 0;
    if proxy {
        flags |= flow_flags::PROXY_HEADER;
        proxy_seq = splice::read_u32(ctx, packet.tcp_field(tcp_field::SEQ))?.wrapping_add(1);
        reverse.flags = reverse_flags::PROXY_HEADER;
        reverse.removed = (proxy_v2::len(packet.v6) as u32).wrapping_neg();
    }
    let Some(claimed) = source::claim(backend, key.proto, &reverse, now_s) else {
        return Err(if key.proto == PROTO_TCP {
            reset::refuse(
                ctx,
                &packet,
                Reason::RefusedNoNatPort,
                Reason::DropNoNatPort,
            )
        } else {
            no_port
        });
    };
    let flow = Flow {
        backend_id,
        backend_addr: backend.addr,
        backend_port: backend.port,
        flags,
        last_seen_s: now_s,
        state: flow_state::NAT,
        source: claimed.dst,
        source_port: claimed.dport,
        proxy_seq,
        ..Flow::default()
    };
    let _ = FLOWS.insert(key, &flow, 0);
    stats::count_new_flow(backend_id, key.src);
    stats::count_backend(
        backend_id,
        Direction::ToBackend,
        ctx.data_end() - ctx.data(),
    );
    nat::rewrite(ctx, &packet, End::Destination, backend.addr, backend.port)?;
    nat::rewrite(ctx, &packet, End::Source, claimed.dst, claimed.dport)?;
    forward::redirect(ctx, &packet, Reason::Forwarded)
}
