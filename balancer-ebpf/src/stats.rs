//! Per-CPU counters: every packet leaves the program under exactly one reason.

use aya_ebpf::bindings::{xdp_action, BPF_RB_NO_WAKEUP};
use balancer_common::{Addr, NewFlowSource, Reason};

use crate::maps::{BACKEND_STATS, NEW_FLOW_SOURCES, STATS};

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

/// Counts a cookie XDP put into a first response head from backend `backend_id`.
#[inline(always)]
pub fn count_cookie_issued(backend_id: u32) {
    if let Some(counters) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as in `count_backend`.
        unsafe { (*counters).cookies_issued += 1 };
    }
}

/// Counts a cookie connection XDP bound to backend `backend_id` without the agent.
#[inline(always)]
pub fn count_bound(backend_id: u32) {
    if let Some(counters) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as in `count_backend`.
        unsafe { (*counters).bound += 1 };
    }
}

/// Counts a new flow of `client` placed on backend `backend_id`, and hands its client to the
/// agent's tally of top sources.
#[inline(always)]
pub fn count_new_flow(backend_id: u32, client: Addr) {
    count(Reason::NewFlow, 0);
    if let Some(counters) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        unsafe { (*counters).new_flows += 1 };
    }
    // Reserved in the ring itself: the main program's stack has no room for a copy.
    let Some(mut entry) = NEW_FLOW_SOURCES.reserve::<NewFlowSource>(0) else {
        count(Reason::NewFlowSourceLost, 0);
        return;
    };
    entry.write(NewFlowSource { client, backend_id });
    // The agent drains the ring on a timer, so a record needs no wakeup.
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
}
