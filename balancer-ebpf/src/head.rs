//! The balancer's cookie put into a connection's first response head by XDP: the agent
//! leaves the `Set-Cookie` lines in `HEAD_INSERTS` when it opens the backend side, and the
//! backend's first segment gets them behind its status line, so a new session's response
//! passes the agent by. The bytes behind the status line move forward by the lines' length
//! in the client's sequence space, as after an edit by the agent (`inserted`), and a segment
//! the backend sends again from the status line on gets the lines again until the client
//! has acknowledged them. A head XDP cannot edit so (an interim or unknown status line, a
//! segment that would outgrow the client's MSS, lines that are gone) goes to the agent,
//! which edits it.
//!
//! It is a program of its own, `balancer_response_head`, reached by a tail call with the
//! parsed packet in `COOKIE_HANDOFF`: the main program's stack is spent.

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use balancer_common::{
    flow_flags, flow_state,
    proto::{tcp_field, tcp_flag::SYN},
    punt_kind, reverse_flags, Binding, HeadInsert, Reason, ReverseNat, MAX_HEAD_INSERT,
    MAX_STATUS_LINE,
};

use crate::{
    forward,
    maps::{FLOWS, HEAD_INSERTS, HEAD_PROGRAM, HEAD_SCRATCH, REVERSE},
    nat::rewrite_reply,
    packet::{self, Packet},
    proxy::MAX_HEADERS,
    punt, splice,
    stats::{self, Direction, Verdict},
};

/// What an insertion copies to the frame's new start: the segment's headers and the status
/// line (a power of two: offsets into it are masked).
pub const SCRATCH: usize = MAX_HEADERS + MAX_STATUS_LINE;

/// Whether a backend segment goes to `balancer_response_head`: data of a connection whose
/// first head XDP is to edit, or has edited and may edit again.
#[inline(always)]
pub fn wanted(ctx: &XdpContext, packet: &Packet, nat: &ReverseNat) -> bool {
    if packet.payload_len == 0 || packet.tcp_flags & SYN != 0 {
        return false;
    }
    match nat.state {
        flow_state::RESPONSE_HEAD => nat.flags & reverse_flags::COOKIE_BY_XDP != 0,
        flow_state::SPLICED if nat.flags & reverse_flags::HEAD_BY_XDP != 0 => {
            splice::read_u32(ctx, packet.tcp_field(tcp_field::SEQ))
                .is_ok_and(|seq| (seq.wrapping_sub(nat.head_end) as usize) < MAX_STATUS_LINE)
        }
        _ => false,
    }
}

/// Passes the segment on to `balancer_response_head`; returns only if that program is
/// missing, and the segment then goes where it would without it.
#[inline(always)]
pub fn hand_off(ctx: &XdpContext, packet: &Packet) {
    splice::hand_off(ctx, packet, &HEAD_PROGRAM);
}

/// `balancer_response_head`: puts the cookie lines in (the first time, or again), records
/// the insertion, and forwards the segment to the client.
#[inline(always)]
pub fn edit(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let truncated = Verdict::drop(Reason::DropTruncated);
    let packet = splice::handed_off().ok_or(truncated)?;
    let entry = REVERSE.get_ptr_mut(&packet.key).ok_or(truncated)?;
    // SAFETY: map values stay valid for the duration of the program.
    let nat = unsafe { *entry };
    let client_key = splice::client_key(&packet, &nat);
    let seq = splice::read_u32(ctx, packet.tcp_field(tcp_field::SEQ))?;
    let at_start = seq == nat.head_end;
    let lines = HEAD_INSERTS.get_ptr_mut(&client_key);
    let flow = FLOWS.get_ptr_mut(&client_key);
    if nat.state == flow_state::RESPONSE_HEAD {
        let status_len = match (lines, flow) {
            (Some(lines), Some(_)) if at_start => insert(ctx, &packet, lines),
            _ => None,
        };
        let (Some(status_len), Some(lines), Some(flow)) = (status_len, lines, flow) else {
            let client = splice::client_of(&packet, &nat);
            return Err(punt::punt(ctx, punt_kind::BACKEND, client, &Binding::NONE));
        };
        // SAFETY: map values stay valid for the duration of the program. The flow first, as
        // the agent writes an edit: the client acknowledges the lines only once it has them.
        unsafe {
            let inserted = u32::from((*lines).len);
            let client_seq = seq.wrapping_sub(nat.seq_delta);
            (*flow).inserted = inserted;
            (*flow).head_end = client_seq
                .wrapping_add(status_len as u32)
                .wrapping_add(inserted);
            (*flow).flags |= flow_flags::HEAD_BY_XDP;
            (*entry).inserted = inserted;
            (*entry).seq_delta = nat.seq_delta.wrapping_sub(inserted);
            (*entry).replay_end = 0;
            (*entry).flags |= reverse_flags::HEAD_BY_XDP;
            (*entry).state = flow_state::SPLICED;
        }
        stats::count_cookie_issued(nat.backend_id);
        return to_client(ctx, &packet, &nat);
    }
    // Sent again: the client has not acknowledged the lines yet, or this is new data
    // 4 GB further on.
    // SAFETY: as above.
    let acknowledged =
        flow.is_none_or(|flow| unsafe { (*flow).flags } & flow_flags::HEAD_ACKED != 0);
    if acknowledged {
        return to_client(ctx, &packet, &nat);
    }
    let Some(lines) = lines else {
        // Gone (evicted) before the client had them: sent on without them, the first
        // segment would put the backend's bytes where the client expects the lines.
        if at_start {
            return Err(Verdict::drop(Reason::DropInsideStatusLine));
        }
        return to_client(ctx, &packet, &nat);
    };
    if at_start {
        insert(ctx, &packet, lines).ok_or(truncated)?;
        let before = ReverseNat {
            seq_delta: nat.seq_delta.wrapping_add(nat.inserted),
            ..nat
        };
        return to_client(ctx, &packet, &before);
    }
    // SAFETY: as above.
    let status_len = unsafe { (*lines).status_len };
    if seq.wrapping_sub(nat.head_end) < u32::from(status_len) {
        return Err(Verdict::drop(Reason::DropInsideStatusLine));
    }
    to_client(ctx, &packet, &nat)
}

/// A backend segment of a spliced connection, translated with `nat` and forwarded.
#[inline(always)]
fn to_client(ctx: &XdpContext, packet: &Packet, nat: &ReverseNat) -> Result<Verdict, Verdict> {
    splice::backend_to_client(ctx, packet, nat)?;
    rewrite_reply(ctx, packet, nat)?;
    stats::count_backend(
        nat.backend_id,
        Direction::ToClient,
        ctx.data_end() - ctx.data(),
    );
    forward::redirect(ctx, packet, Reason::SplicedToClient)
}

/// Puts the lines behind the status line of the segment's data, if it starts with a final
/// HTTP/1 status line and still fits the client's MSS with them; returns the status line's
/// length. The segment's headers and status line move forward into the headroom.
#[inline(always)]
fn insert(ctx: &XdpContext, packet: &Packet, lines: *mut HeadInsert) -> Option<usize> {
    let headers = packet.l4_offset + packet.tcp_header_len;
    // SAFETY: map values stay valid for the duration of the program.
    let lines = unsafe { &mut *lines };
    let len = usize::from(lines.len);
    if headers > MAX_HEADERS
        || len == 0
        || len > MAX_HEAD_INSERT
        || len % 2 != 0
        || packet.payload_len + len > usize::from(lines.max_payload)
    {
        return None;
    }
    let scratch = HEAD_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the entry is this CPU's, and only this program run touches it meanwhile.
    let scratch = unsafe { &mut *scratch };
    let looked = packet.payload_len.min(MAX_STATUS_LINE);
    // SAFETY: the headers and `looked` bytes of data lie inside the frame (parsing saw
    // them), 1..=SCRATCH bytes.
    let loaded = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            0,
            scratch.as_mut_ptr().cast(),
            (headers + looked).clamp(1, SCRATCH) as u32,
        )
    };
    if loaded != 0 {
        return None;
    }
    let byte = |at: usize| scratch[(headers + at) & (SCRATCH - 1)];
    let status_len = status_line_len(byte, looked)?;
    let moved = headers + status_len;
    // SAFETY: XDP keeps headroom in front of every frame.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(len as i32)) } != 0 {
        return None;
    }
    // SAFETY: the frame grew by `len` at its head, so both copies lie inside it.
    let stored = unsafe {
        packet::store_bytes(
            ctx.ctx,
            0,
            scratch.as_mut_ptr().cast(),
            moved.clamp(1, SCRATCH) as u64,
        ) | packet::store_bytes(
            ctx.ctx,
            moved as u32,
            lines.lines.as_mut_ptr().cast(),
            len.clamp(1, MAX_HEAD_INSERT) as u64,
        )
    };
    if stored != 0 {
        return None;
    }
    // The TCP header is whole words long: the lines start on an odd offset of the segment
    // when the status line is of odd length, and their words are then read byte-swapped.
    let sum = if status_len % 2 == 0 {
        lines.sum
    } else {
        lines.sum.swap_bytes()
    };
    packet::lengthen(ctx, packet, len as u16, sum)?;
    lines.status_len = status_len as u16;
    stats::count(Reason::CookieInserted, 0);
    Some(status_len)
}

/// The length of the final (not interim) HTTP/1 status line the data starts with, CRLF
/// included, from its first `looked` bytes read through `byte`.
#[inline(always)]
fn status_line_len(byte: impl Fn(usize) -> u8, looked: usize) -> Option<usize> {
    const VERSION: &[u8; 7] = b"HTTP/1.";
    // "HTTP/1.1 200 OK\r\n" and shorter ones down to "HTTP/1.1 200\r\n".
    if looked < 14 {
        return None;
    }
    for (at, &expected) in VERSION.iter().enumerate() {
        if byte(at) != expected {
            return None;
        }
    }
    if byte(8) != b' ' || !(b'2'..=b'5').contains(&byte(9)) {
        return None;
    }
    for at in 12..MAX_STATUS_LINE {
        if at >= looked {
            return None;
        }
        if byte(at) == b'\n' {
            return Some(at + 1);
        }
    }
    None
}
