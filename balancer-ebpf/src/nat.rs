//! The flow tables' bookkeeping and the rewrites: gateway NAT turns the destination of
//! client → VIP packets into a backend and the source of the backend's replies into the VIP
//! again; full NAT rewrites the other end too. Checksums are updated incrementally. Which
//! packet gets what is `dispatch`'s.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use balancer_common::{
    csum, flow_flags, flow_state,
    proto::tcp_flag::{ACK, SYN},
    reverse_flags, Addr, Flow, FlowKey, Reason, ReverseNat, PROTO_TCP, PROTO_UDP,
};
use network_types::ip::Ipv4Hdr;

use crate::{
    maps::{BACKENDS, FLOWS, REVERSE},
    packet::{ptr_at, Packet, IP_OFFSET},
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

/// Full NAT: a flow's reverse entry, which holds its source, records that the flow is alive
/// (at most once a second) and when it starts to close, so the source is not given to
/// another flow while this one lives.
#[inline(always)]
pub fn note_source_in_use(entry: &mut ReverseNat, now_s: u32, closing: bool) {
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

/// Removes a flow and its reverse entry.
#[inline(always)]
pub fn forget(key: &FlowKey, flow: &Flow) {
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

/// Records that the client's flow `key` is alive, writing only what changed. A full-NAT
/// flow's reverse entry hears of it too (once a second): its source stays held while either
/// end sends, as a UDP flow's backend may never answer.
#[inline(always)]
pub fn touch(key: &FlowKey, flow: &mut Flow, now_s: u32, closing: bool) {
    if flow.last_seen_s != now_s {
        flow.last_seen_s = now_s;
        if flow.source_port != 0 {
            if let Some(entry) = REVERSE.get_ptr_mut(&reverse_key(key, flow)) {
                // SAFETY: map values stay valid for the duration of the program; racing
                // writers only race on bookkeeping.
                unsafe { (*entry).last_seen_s = now_s };
            }
        }
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

/// Binds a new flow to `backend_id` and records both directions.
#[inline(always)]
pub fn new_flow(
    backend_id: u32,
    key: &FlowKey,
    now_s: u32,
    closing: bool,
) -> Result<Flow, Verdict> {
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
        backend_id,
        ..ReverseNat::default()
    };
    // A failed insert only means the next packet takes this path again.
    let _ = FLOWS.insert(key, &flow, 0);
    let _ = REVERSE.insert(&reply_key, &reverse, 0);
    stats::count_new_flow(backend_id, key.src);
    Ok(flow)
}

/// Rewrites a backend's reply of the flow whose reverse entry is `nat` to come from the VIP
/// and, in full NAT, to go to the client.
#[inline(always)]
pub fn rewrite_reply(ctx: &XdpContext, packet: &Packet, nat: &ReverseNat) -> Result<(), Verdict> {
    rewrite(ctx, packet, End::Source, nat.vip, nat.port)?;
    if nat.client_port != 0 {
        rewrite(ctx, packet, End::Destination, nat.client, nat.client_port)?;
    }
    Ok(())
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
