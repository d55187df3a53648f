//! Full NAT's source addresses and ports: a new flow to a backend leaves from one of the
//! balancer's addresses in the backend's network, with a port of the configured range. The
//! claim is the flow's `REVERSE` entry, inserted only where none exists, so no two flows
//! share a source whichever CPU (or the agent) claimed it. A claim whose flow has closed and
//! gone quiet, or has been idle very long, is free again.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use balancer_common::{source_is_free, Backend, FlowKey, ReverseNat};

use crate::maps::{AGENT, NAT_CURSOR, NAT_SOURCES, REVERSE};

/// Sources tried for one new flow before it is refused.
const CLAIM_TRIES: u32 = 8;
/// `BPF_NOEXIST`: insert only where no entry is.
const NO_EXIST: u64 = 1;

/// Claims a source for a flow of protocol `proto` to `backend`, recording `reverse` as its
/// `REVERSE` entry; the key of that entry (the backend's replies' 5-tuple), or `None` when
/// every source tried is taken.
#[inline(always)]
pub fn claim(backend: &Backend, proto: u8, reverse: &ReverseNat, now_s: u32) -> Option<FlowKey> {
    let agent = AGENT.get(0)?;
    let ports = u32::from(agent.nat_port_count);
    let sources = u32::from(backend.source_count);
    if ports == 0 || sources == 0 {
        return None;
    }
    let space = ports * sources;
    let cursor = NAT_CURSOR.get_ptr_mut(0)?;
    for _ in 0..CLAIM_TRIES {
        // One cursor for all CPUs, so each source is tried once per round of the whole space
        // however the flows fall on the CPUs. The read and the add are apart (this target
        // has no fetching add): two CPUs reading one value try one source, and the insert
        // below settles it.
        // SAFETY: the entry is a u64 in the map's memory, which outlives the program run.
        let turn = unsafe {
            let turn = core::ptr::read_volatile(cursor);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(cursor, 1);
            turn
        };
        let index = (turn % u64::from(space)) as u32;
        let Some(source) = NAT_SOURCES.get(backend.first_source + index % sources) else {
            return None;
        };
        let port = (u32::from(agent.nat_port_first) + index / sources) as u16;
        let key = FlowKey {
            src: backend.addr,
            dst: *source,
            sport: backend.port,
            dport: port.to_be(),
            proto,
            _pad: [0; 3],
        };
        if let Some(held) = REVERSE.get_ptr(&key) {
            // SAFETY: map values stay valid for the duration of the program.
            if !source_is_free(unsafe { &*held }, proto, now_s) {
                continue;
            }
            let _ = REVERSE.remove(&key);
        }
        // Another CPU may claim the same source between the look and the insert: only one
        // insert succeeds.
        if REVERSE.insert(&key, reverse, NO_EXIST).is_ok() {
            return Some(key);
        }
    }
    None
}
