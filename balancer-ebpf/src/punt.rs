//! Frames the agent must see, handed over through the punt ring of the worker that owns the
//! connection.

use aya_ebpf::{
    helpers::bpf_xdp_load_bytes,
    maps::{ring_buf::RingBufEntry, RingBuf},
    programs::XdpContext,
};
use balancer_common::{
    proto::TCP_HEADER_LEN, worker_of, Addr, Binding, Punt, Reason, PUNT_FRAME_SIZE,
};

use crate::{
    maps::{AGENT, PUNTS_0, PUNTS_1, PUNTS_2, PUNTS_3, PUNTS_4, PUNTS_5, PUNTS_6, PUNTS_7},
    packet::L4_OFFSET_V4,
    stats::{self, Verdict},
};

/// Hands the frame of a connection of `client` to the agent, with the connection's
/// `binding`, and drops it here.
#[inline(always)]
pub fn punt(ctx: &XdpContext, kind: u32, client: &Addr, binding: &Binding) -> Verdict {
    match record(ctx, kind, client, binding) {
        Ok(entry) => {
            entry.submit(0);
            Verdict::drop(Reason::Punted)
        }
        Err(verdict) => verdict,
    }
}

/// Tells the worker that owns connections of `client` what XDP saw on one of them, with a
/// copy of the frame; the frame itself goes on. The record spares the worker a look at the
/// maps; a lost one leaves that look to the worker's timer. It wakes the worker like a
/// punt: a record submitted without a wakeup would also keep the next punt from waking it,
/// since the ring wakes its reader only for records it submits once the reader caught up.
#[inline(always)]
pub fn tell(ctx: &XdpContext, kind: u32, reason: Reason, client: &Addr) {
    if let Ok(entry) = record(ctx, kind, client, &Binding::NONE) {
        entry.submit(0);
        stats::count(reason, 0);
    }
}

/// A record of the frame as it is now for the worker that owns connections of `client`,
/// reserved in its ring and not yet submitted: the verdict to give the frame instead when
/// the ring is full or the copy failed.
#[inline(always)]
pub fn record(
    ctx: &XdpContext,
    kind: u32,
    client: &Addr,
    binding: &Binding,
) -> Result<RingBufEntry<Punt>, Verdict> {
    let workers = AGENT.get(0).map_or(1, |agent| agent.workers);
    let ring: &RingBuf = match worker_of(client, workers) {
        0 => &PUNTS_0,
        1 => &PUNTS_1,
        2 => &PUNTS_2,
        3 => &PUNTS_3,
        4 => &PUNTS_4,
        5 => &PUNTS_5,
        6 => &PUNTS_6,
        _ => &PUNTS_7,
    };
    let Some(mut entry) = ring.reserve::<Punt>(0) else {
        return Err(Verdict::drop(Reason::DropPuntRingFull));
    };
    // Punted frames were parsed as TCP, so they hold at least the headers; the lower bound
    // also tells the verifier the copy is not empty.
    let len = (ctx.data_end() - ctx.data()).clamp(L4_OFFSET_V4 + TCP_HEADER_LEN, PUNT_FRAME_SIZE);
    let record = entry.as_mut_ptr();
    // SAFETY: `record` points at a reserved `Punt`; `len` is at most its frame's size.
    let copied = unsafe {
        (*record).kind = kind;
        (*record).len = len as u32;
        (*record).binding = *binding;
        bpf_xdp_load_bytes(ctx.ctx, 0, (*record).frame.as_mut_ptr().cast(), len as u32) == 0
    };
    if !copied {
        entry.discard(0);
        return Err(Verdict::drop(Reason::DropTruncated));
    }
    Ok(entry)
}
