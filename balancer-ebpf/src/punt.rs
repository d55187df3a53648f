//! Frames the agent must see, handed over through the `PUNTS` ring buffer.

use aya_ebpf::{helpers::bpf_xdp_load_bytes, programs::XdpContext};
use balancer_common::{proto::TCP_HEADER_LEN, Binding, Punt, Reason, PUNT_FRAME_SIZE};

use crate::{maps::PUNTS, packet::L4_OFFSET_V4, stats::Verdict};

/// Hands the frame to the agent through the `PUNTS` ring, with the connection's `binding`,
/// and drops it here.
#[inline(always)]
pub fn punt(ctx: &XdpContext, kind: u32, binding: &Binding) -> Verdict {
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
        (*record).binding = *binding;
        bpf_xdp_load_bytes(ctx.ctx, 0, (*record).frame.as_mut_ptr().cast(), len as u32) == 0
    };
    if !copied {
        entry.discard(0);
        return Verdict::drop(Reason::DropTruncated);
    }
    entry.submit(0);
    Verdict::drop(Reason::Punted)
}
