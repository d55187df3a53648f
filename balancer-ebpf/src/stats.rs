//! Per-CPU counters: every packet leaves the program under exactly one reason.

use aya_ebpf::bindings::xdp_action;
use balancer_common::Reason;

use crate::maps::{BACKEND_STATS, STATS};

/// Which way a packet of a backend's flow went.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToBackend,
    ToClient,
}

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

/// Counts a packet of `bytes` forwarded to or from backend `backend_id`.
#[inline(always)]
pub fn count_backend(backend_id: u32, direction: Direction, bytes: usize) {
    if let Some(counters) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: a per-CPU slot is only touched by this CPU while the program runs.
        unsafe {
            let counter = if direction == Direction::ToBackend {
                &mut (*counters).to_backend
            } else {
                &mut (*counters).to_client
            };
            counter.packets += 1;
            counter.bytes += bytes as u64;
        }
    }
}

/// Counts a new flow placed on backend `backend_id`.
#[inline(always)]
pub fn count_new_flow(backend_id: u32) {
    count(Reason::NewFlow, 0);
    if let Some(counters) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        unsafe { (*counters).new_flows += 1 };
    }
}
