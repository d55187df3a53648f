//! What each packet of a service's flow goes through, by the flow's state: a new flow is
//! placed (by XDP, by full NAT's program, or through the cookie handshake), a NAT flow
//! rewritten (with its PROXY header's shift), a spliced connection translated, a connection
//! being bound left to the agent. `nat` keeps the flow tables' bookkeeping and the rewrites.

use aya_ebpf::programs::XdpContext;
use balancer_common::{
    affinity, flow_flags, flow_state, nat_mode,
    proto::tcp_flag::{ACK, SYN},
    punt_kind, reverse_flags, without_agent, Binding, Flow, Reason, Service, ServiceKey, PROTO_TCP,
};

use crate::{
    agent, bind, choose, full_nat, handshake, head,
    maps::{BINDINGS, FLOWS, REVERSE, SERVICES},
    nat::{forget, new_flow, note_source_in_use, rewrite, rewrite_reply, seconds_now, touch, End},
    packet::Packet,
    proxy, punt, replay, reset, splice,
    stats::{self, Verdict},
};

/// Rewrites a client → VIP packet to its backend and says what forwarding it counts as, and
/// which backend's. `None` when it is not addressed to a service.
#[inline(always)]
pub fn to_backend(ctx: &XdpContext, packet: &Packet) -> Result<Option<(Reason, u32)>, Verdict> {
    let key = &packet.key;
    let service_key = ServiceKey {
        vip: key.dst,
        port: key.dport,
        proto: key.proto,
        _pad: 0,
    };
    let Some(service) = SERVICES.get_ptr_mut(&service_key) else {
        return Ok(None);
    };
    let now_s = seconds_now();
    let flow = match FLOWS.get_ptr_mut(key) {
        Some(flow) => {
            // SAFETY: map values stay valid for the duration of the program; concurrent
            // writers only race on bookkeeping that any of them may win.
            let flow = unsafe { &mut *flow };
            // SAFETY: as above.
            let service = unsafe { &*service };
            // A spliced connection's backend leg cannot be reused: its sequence offset
            // belongs to the old connection. (A NAT flow simply carries the new one.)
            if service.affinity == affinity::COOKIE && reopens(packet, flow) {
                forget(key, flow);
                return Err(handshake::accept(ctx, packet, now_s));
            }
            // Nor can a full-NAT flow's source: the backend may hold it in TIME_WAIT.
            if flow.source_port != 0 && reopens(packet, flow) {
                let backend_id = flow.backend_id;
                let proxy = flow.flags & flow_flags::PROXY_HEADER != 0;
                forget(key, flow);
                return Err(full_nat::hand_off(ctx, packet, backend_id, proxy));
            }
            touch(key, flow, now_s, packet.closing);
            if flow.inserted != 0 {
                splice::note_head_acked(ctx, packet, flow);
            }
            *flow
        }
        None => {
            let service_ptr = service;
            // SAFETY: as above.
            let service = unsafe { &*service_ptr };
            if service.backend_count == 0 {
                return Err(refuse(
                    ctx,
                    packet,
                    Reason::RefusedNoBackend,
                    Reason::DropNoBackend,
                ));
            }
            if service.affinity == affinity::COOKIE && key.proto == PROTO_TCP {
                if agent::present(now_s) {
                    return Err(handshake::accept(ctx, packet, now_s));
                }
                place_without_agent(ctx, packet, service, now_s)?
            } else {
                let backend_id = match choose::backend(service_ptr, key, now_s) {
                    Ok(backend_id) => backend_id,
                    Err(Some(verdict)) => return Err(verdict),
                    Err(None) => {
                        return Err(refuse(
                            ctx,
                            packet,
                            Reason::RefusedBackendHeld,
                            Reason::DropBackendHeld,
                        ));
                    }
                };
                if service.nat == nat_mode::FULL {
                    let proxy = service.proxy_protocol != 0 && key.proto == PROTO_TCP;
                    return Err(full_nat::hand_off(ctx, packet, backend_id, proxy));
                }
                new_flow(backend_id, key, now_s, packet.closing)?
            }
        }
    };
    let reason = match flow.state {
        flow_state::NAT => {
            if flow.flags & flow_flags::PROXY_HEADER != 0 {
                proxy::client_to_backend(ctx, packet, &flow)?;
            }
            Reason::Forwarded
        }
        flow_state::SPLICED => {
            splice::client_to_backend(ctx, packet, &flow)?;
            Reason::SplicedToBackend
        }
        // Being bound by an agent that has gone: nobody will finish it.
        _ if !agent::present(now_s) => {
            forget(key, &flow);
            let _ = BINDINGS.remove(key);
            return Err(reset_without_agent(ctx, packet));
        }
        _ if flow.flags & flow_flags::BOUND_BY_XDP != 0 => {
            return Err(bind::while_opening(ctx, packet));
        }
        _ => return Err(handshake::while_binding(ctx, packet)),
    };
    rewrite(
        ctx,
        packet,
        End::Destination,
        flow.backend_addr,
        flow.backend_port,
    )?;
    if flow.source_port != 0 {
        rewrite(ctx, packet, End::Source, flow.source, flow.source_port)?;
    }
    Ok(Some((reason, flow.backend_id)))
}

/// Rewrites a backend's reply to come from the VIP, saying what it counts as and which
/// backend it came from. `None` when it belongs to no known flow.
#[inline(always)]
pub fn to_client(ctx: &XdpContext, packet: &Packet) -> Result<Option<(Reason, u32)>, Verdict> {
    let Some(entry) = REVERSE.get_ptr_mut(&packet.key) else {
        return Ok(None);
    };
    if agent::from_client_side(ctx) {
        return Err(Verdict::drop(Reason::DropReplyFromClientSide));
    }
    // SAFETY: map values stay valid for the duration of the program.
    let nat = unsafe { *entry };
    // Written with the SYN, the replay's end counts once the request is replayed.
    if nat.replay_end != 0 && nat.state != flow_state::CONNECTING {
        splice::note_replay_acked(ctx, packet, entry);
    }
    if nat.client_port != 0 {
        // SAFETY: as above; racing writers only race on bookkeeping.
        note_source_in_use(unsafe { &mut *entry }, seconds_now(), packet.closing);
    }
    if head::wanted(ctx, packet, &nat) {
        head::hand_off(ctx, packet);
    }
    let reason = match nat.state {
        flow_state::NAT => {
            if nat.flags & reverse_flags::PROXY_HEADER != 0 {
                proxy::backend_to_client(ctx, packet, &nat)?;
            }
            Reason::Replied
        }
        // A SYN-ACK (first or repeated) answers the agent's SYN: the agent acknowledges it.
        // Response head bytes the agent edits (or edited, when sent again) go to it too.
        flow_state::SPLICED | flow_state::RESPONSE_HEAD
            if packet.tcp_flags & SYN == 0 && !splice::for_agent(ctx, packet, &nat) =>
        {
            splice::backend_to_client(ctx, packet, &nat)?;
            Reason::SplicedToClient
        }
        flow_state::CONNECTING => {
            let recorded = splice::record_at_synack(ctx, packet, (&nat, entry));
            if recorded.is_some() && nat.flags & reverse_flags::REPLAY_BY_XDP != 0 {
                replay::hand_off(ctx, packet);
            }
            if recorded.is_none() && nat.flags & reverse_flags::BOUND_BY_XDP != 0 {
                return Err(bind::unanswered(packet, &nat));
            }
            let recorded = recorded.unwrap_or(Binding::NONE);
            return Err(punt::punt(
                ctx,
                punt_kind::BACKEND,
                splice::client_of(packet, &nat),
                &recorded,
            ));
        }
        _ => {
            let client = splice::client_of(packet, &nat);
            return Err(punt::punt(ctx, punt_kind::BACKEND, client, &Binding::NONE));
        }
    };
    rewrite_reply(ctx, packet, &nat)?;
    Ok(Some((reason, nat.backend_id)))
}

/// A client SYN on a flow that the client closed: it reused its port for a new connection (it
/// does so at once when the server closed first), so the old flow is over.
#[inline(always)]
fn reopens(packet: &Packet, flow: &Flow) -> bool {
    packet.key.proto == PROTO_TCP
        && packet.tcp_flags & (SYN | ACK) == SYN
        && flow.flags & flow_flags::CLOSING != 0
}

/// A new flow no backend is to take: TCP is refused with a reset (counted as `sent`, so the
/// client fails fast), the rest dropped (as `dropped`). For a service without backends and
/// for a session held for its failed backend.
#[inline(always)]
fn refuse(ctx: &XdpContext, packet: &Packet, sent: Reason, dropped: Reason) -> Verdict {
    if packet.key.proto != PROTO_TCP {
        return Verdict::drop(dropped);
    }
    reset::refuse(ctx, packet, sent, dropped)
}

#[inline(always)]
fn reset_without_agent(ctx: &XdpContext, packet: &Packet) -> Verdict {
    reset::refuse(
        ctx,
        packet,
        Reason::ResetWithoutAgent,
        Reason::DropWhileBinding,
    )
}

/// A cookie service's new connection while no agent runs: a SYN becomes a plain L4 flow to
/// the cookie fallback's backend (or is refused, as the service says); any other segment
/// belongs to a handshake the balancer answered for an agent that has gone, and is reset so
/// the client opens a new connection.
#[inline(always)]
fn place_without_agent(
    ctx: &XdpContext,
    packet: &Packet,
    service: &Service,
    now_s: u32,
) -> Result<Flow, Verdict> {
    let syn = packet.tcp_flags & (SYN | ACK) == SYN;
    if !syn || service.without_agent == without_agent::RESET {
        return Err(reset_without_agent(ctx, packet));
    }
    let backend_id = choose::fallback_backend(service, &packet.key)?;
    let flow = new_flow(backend_id, &packet.key, now_s, packet.closing)?;
    stats::count(Reason::PlacedWithoutAgent, 0);
    Ok(flow)
}
