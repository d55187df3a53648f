//! Per-CPU counters: every packet leaves the program under exactly one reason.

use aya_ebpf::bindings::xdp_action;
use balancer_common::Reason;

use crate::maps::STATS;

/// The action returned to the kernel and the reason it is counted under.
#[derive(Clone, Copy)]
pub struct Verdict {
    pub action: u32,
    pub reason: Reason,
}

impl Verdict {
    #[inline(always)]
    pub const fn pass(reason: Reason) -> Self {
        Self {
            action: xdp_action::XDP_PASS,
            reason,
        }
    }

    #[inline(always)]
    pub const fn drop(reason: Reason) -> Self {
        Self {
            action: xdp_action::XDP_DROP,
            reason,
        }
    }
}

#[inline(always)]
pub fn count(reason: Reason, bytes: usize) {
    if let Some(counter) = STATS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot is only touched by this CPU while the program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
    }
}
