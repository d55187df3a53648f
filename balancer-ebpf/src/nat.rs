//! Gateway NAT: the destination of client → VIP packets becomes a backend, and the source of
//! the backend's replies becomes the VIP again. Checksums are updated incrementally.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use balancer_common::{
    affinity, csum, flow_flags, flow_state, nat_mode,
    proto::tcp_flag::{ACK, SYN},
    punt_kind, reverse_flags, without_agent, Addr, Flow, FlowKey, Reason, ReverseNat, Service,
    ServiceKey, PROTO_TCP, PROTO_UDP,
};
use network_types::ip::Ipv4Hdr;

use crate::{
    agent, choose, full_nat, handshake,
    maps::{BACKENDS, BINDINGS, FLOWS, REVERSE, SERVICES},
    packet::{ptr_at, Packet, IP_OFFSET},
    proxy, punt, reset, splice,
    stats::{self, Verdict},
};

/// Offsets of the addresses in the IPv4 and the IPv6 header.
const V4_SRC: usize = IP_OFFSET + 12;
const V4_DST: usize = IP_OFFSET + 16;
const V6_SRC: usize = IP_OFFSET + 8;
const V6_DST: usize = IP_OFFSET + 24;

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

/// Rewrites a client → VIP packet to its backend and says what forwarding it counts as.
/// `None` when it is not addressed to a service.
#[inline(always)]
pub fn to_backend(ctx: &XdpContext, packet: &Packet) -> Result<Option<Reason>, Verdict> {
    let key = &packet.key;
    let service_key = ServiceKey {
        vip: key.dst,
        port: key.dport,
        proto: key.proto,
        _pad: 0,
    };
    let Some(service) = SERVICES.get_ptr(&service_key) else {
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
            touch(flow, now_s, packet.closing);
            if flow.inserted != 0 {
                splice::note_head_acked(ctx, packet, flow);
            }
            *flow
        }
        None => {
            // SAFETY: as above.
            let service = unsafe { &*service };
            if service.backend_count == 0 {
                return Err(refuse(ctx, packet));
            }
            if service.affinity == affinity::COOKIE && key.proto == PROTO_TCP {
                if agent::present(now_s) {
                    return Err(handshake::accept(ctx, packet, now_s));
                }
                place_without_agent(ctx, packet, service, now_s)?
            } else {
                let backend_id = choose::backend(service, key)?;
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
    Ok(Some(reason))
}

/// Rewrites a backend's reply to come from the VIP. `None` when it belongs to no known flow.
#[inline(always)]
pub fn to_client(ctx: &XdpContext, packet: &Packet) -> Result<Option<Reason>, Verdict> {
    let Some(entry) = REVERSE.get_ptr_mut(&packet.key) else {
        return Ok(None);
    };
    if agent::from_client_side(ctx) {
        return Err(Verdict::drop(Reason::DropReplyFromClientSide));
    }
    // SAFETY: map values stay valid for the duration of the program.
    let nat = unsafe { *entry };
    if nat.replay_end != 0 {
        splice::note_replay_acked(ctx, packet, entry);
    }
    if nat.client_port != 0 {
        // SAFETY: as above; racing writers only race on bookkeeping.
        note_source_in_use(unsafe { &mut *entry }, seconds_now(), packet.closing);
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
        _ => return Err(punt::punt(ctx, punt_kind::BACKEND)),
    };
    rewrite(ctx, packet, End::Source, nat.vip, nat.port)?;
    if nat.client_port != 0 {
        rewrite(ctx, packet, End::Destination, nat.client, nat.client_port)?;
    }
    Ok(Some(reason))
}

/// Full NAT: a flow's reverse entry, which holds its source, records that the flow is alive
/// (at most once a second) and when it starts to close, so the source is not given to
/// another flow while this one lives.
#[inline(always)]
fn note_source_in_use(entry: &mut ReverseNat, now_s: u32, closing: bool) {
    if entry.last_seen_s != now_s {
        entry.last_seen_s = now_s;
    }
    if closing && entry.flags & reverse_flags::CLOSING == 0 {
        entry.flags |= reverse_flags::CLOSING;
    }
}

/// A client opening a connection straight to an address that an old VIP flow was NAT-ed to,
/// from the same port, reuses that flow's backend-side 5-tuple: the backend cannot tell the
/// two apart, so the old flow is over, and its reverse entry must not rewrite the new
/// connection's replies to come from the VIP.
#[inline(always)]
pub fn forget_reused_tuple(packet: &Packet) {
    if packet.key.proto != PROTO_TCP || packet.tcp_flags & (SYN | ACK) != SYN {
        return;
    }
    let key = &packet.key;
    let _ = REVERSE.remove(&reply_key(key, key.dst, key.dport));
}

/// A client SYN on a flow that the client closed: it reused its port for a new connection (it
/// does so at once when the server closed first), so the old flow is over.
#[inline(always)]
fn reopens(packet: &Packet, flow: &Flow) -> bool {
    packet.key.proto == PROTO_TCP
        && packet.tcp_flags & (SYN | ACK) == SYN
        && flow.flags & flow_flags::CLOSING != 0
}

/// Removes a flow and its reverse entry.
#[inline(always)]
fn forget(key: &FlowKey, flow: &Flow) {
    let _ = REVERSE.remove(&reverse_key(key, flow));
    let _ = FLOWS.remove(key);
}

/// The key of a flow's `REVERSE` entry: the 5-tuple of the backend's replies, to the
/// client's address, or in full NAT to the balancer's source.
#[inline(always)]
fn reverse_key(key: &FlowKey, flow: &Flow) -> FlowKey {
    let mut reply = reply_key(key, flow.backend_addr, flow.backend_port);
    if flow.source_port != 0 {
        reply.dst = flow.source;
        reply.dport = flow.source_port;
    }
    reply
}

/// The 5-tuple of the replies to a client flow sent on to `addr:port` (network byte order):
/// the key of its `REVERSE` entry.
#[inline(always)]
fn reply_key(key: &FlowKey, addr: Addr, port: u16) -> FlowKey {
    FlowKey {
        src: addr,
        dst: key.src,
        sport: port,
        dport: key.sport,
        proto: key.proto,
        _pad: [0; 3],
    }
}

/// Records that the client's flow is alive, writing only what changed.
#[inline(always)]
fn touch(flow: &mut Flow, now_s: u32, closing: bool) {
    if flow.last_seen_s != now_s {
        flow.last_seen_s = now_s;
    }
    if closing && flow.flags & flow_flags::CLOSING == 0 {
        flow.flags |= flow_flags::CLOSING;
    }
}

#[inline(always)]
pub fn seconds_now() -> u32 {
    // SAFETY: a helper without arguments.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// A service without backends refuses TCP connections with a reset and drops the rest.
#[inline(always)]
fn refuse(ctx: &XdpContext, packet: &Packet) -> Verdict {
    if packet.key.proto != PROTO_TCP {
        return Verdict::drop(Reason::DropNoBackend);
    }
    reset::refuse(ctx, packet, Reason::RefusedNoBackend, Reason::DropNoBackend)
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

/// Binds a new flow to `backend_id` and records both directions.
#[inline(always)]
fn new_flow(backend_id: u32, key: &FlowKey, now_s: u32, closing: bool) -> Result<Flow, Verdict> {
    let backend = *BACKENDS
        .get(backend_id)
        .ok_or(Verdict::drop(Reason::DropNoBackend))?;
    let flow = Flow {
        backend_id,
        backend_addr: backend.addr,
        backend_port: backend.port,
        flags: if closing { flow_flags::CLOSING } else { 0 },
        last_seen_s: now_s,
        state: flow_state::NAT,
        ..Flow::default()
    };
    let reply_key = reply_key(key, backend.addr, backend.port);
    let reverse = ReverseNat {
        vip: key.dst,
        port: key.dport,
        ..ReverseNat::default()
    };
    // A failed insert only means the next packet takes this path again.
    let _ = FLOWS.insert(key, &flow, 0);
    let _ = REVERSE.insert(&reply_key, &reverse, 0);
    stats::count(Reason::NewFlow, 0);
    Ok(flow)
}

/// Replaces the address and port of one end, fixing the L4 checksum (whose pseudo header
/// holds the addresses) and, for IPv4, the header checksum.
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    packet: &Packet,
    end: End,
    addr: Addr,
    port: u16,
) -> Result<(), Verdict> {
    let truncated = Verdict::drop(Reason::DropTruncated);
    let port_offset = if end == End::Source {
        packet.l4_offset
    } else {
        packet.l4_offset + 2
    };
    let port_field: *mut [u8; 2] = ptr_at(ctx, port_offset).ok_or(truncated)?;
    let check_field: *mut [u8; 2] = ptr_at(ctx, packet.l4_check_offset).ok_or(truncated)?;
    // SAFETY: `ptr_at` checked that each field lies inside the frame.
    let (port_field, check_field) = unsafe { (&mut *port_field, &mut *check_field) };
    let old_port = u16::from_ne_bytes(*port_field);
    *port_field = port.to_ne_bytes();
    let l4_check = u16::from_ne_bytes(*check_field);
    let mut check = csum::replace16(l4_check, old_port, port);
    if packet.v6 {
        let offset = if end == End::Source { V6_SRC } else { V6_DST };
        let field: *mut [u8; 16] = ptr_at(ctx, offset).ok_or(truncated)?;
        // SAFETY: `ptr_at` checked that the address lies inside the frame.
        let field = unsafe { &mut *field };
        let old = Addr::v6(*field);
        *field = addr.octets();
        for word in 0..4 {
            check = csum::replace32(check, old.words[word], addr.words[word]);
        }
    } else {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, IP_OFFSET).ok_or(truncated)?;
        let offset = if end == End::Source { V4_SRC } else { V4_DST };
        let field: *mut [u8; 4] = ptr_at(ctx, offset).ok_or(truncated)?;
        // SAFETY: `ptr_at` checked that the header and the address lie inside the frame.
        let (ip, field) = unsafe { (&mut *ip, &mut *field) };
        let old = u32::from_ne_bytes(*field);
        let new = addr.v4_word();
        *field = new.to_ne_bytes();
        ip.check = csum::replace32(u16::from_ne_bytes(ip.check), old, new).to_ne_bytes();
        check = csum::replace32(check, old, new);
    }
    // UDP over IPv4 may go without a checksum (0), and then stays without; a computed 0
    // is sent as its complement, which IPv6 requires of every UDP checksum.
    if packet.key.proto == PROTO_UDP {
        if l4_check == 0 && !packet.v6 {
            return Ok(());
        }
        if check == 0 {
            check = 0xffff;
        }
    }
    *check_field = check.to_ne_bytes();
    Ok(())
}
