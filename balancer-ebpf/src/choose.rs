//! Choosing a backend for a new flow: by the flow's own hash (`flow`), or by the client's
//! session (`source-ip`), which lasts while the client keeps opening flows.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::helpers::bpf_ktime_get_ns;
use balancer_common::{
    affinity, backend_state, client_hash, flow_hash, without_agent, Addr, Affinity, AffinityKey,
    FlowKey, Reason, Service,
};

use crate::{
    maps::{AFFINITY, BACKENDS, BACKEND_TABLE},
    stats::{self, Verdict},
};

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// The backend id a new flow of `service` goes to: `Err(None)` when its session is held
/// for its failed backend (the caller refuses the flow), `Err(Some(verdict))` when there is
/// none.
#[inline(always)]
pub fn backend(service: *mut Service, key: &FlowKey, now_s: u32) -> Result<u32, Option<Verdict>> {
    // SAFETY: a live map value, read here; only its load counter is written, atomically.
    let view = unsafe { &*service };
    if view.affinity == affinity::SOURCE_IP {
        session_backend(service, key.src.masked(&view.source_mask), now_s)
    } else {
        placed(service, flow_hash(key)).map_err(Some)
    }
}

/// The backend a cookie service's new connection goes to while no agent runs: the one the
/// agent gives a request without a cookie (its cookie fallback). No session is recorded.
#[inline(always)]
pub fn fallback_backend(service: &Service, key: &FlowKey) -> Result<u32, Verdict> {
    let hash = if service.without_agent == without_agent::PLACE_BY_SOURCE {
        client_hash(&key.src.masked(&service.source_mask))
    } else {
        flow_hash(key)
    };
    table_lookup(service, hash)
}

/// Slots after a new placement's own that bounded-load placement looks at for a backend under
/// the bound, before it takes the table's choice anyway.
const BOUNDED_SLOTS: u32 = 8;

/// A new flow's or session's backend: the table's choice for `hash`, or with a
/// `balance_factor` the first backend from that slot on whose load is under the factor of the
/// average (with this one counted), whose load and the service's total then count it.
#[inline(always)]
fn placed(service: *mut Service, hash: u32) -> Result<u32, Verdict> {
    // SAFETY: a live map value; racing CPUs only race on the load counters.
    let view = unsafe { &*service };
    let choice = table_lookup(view, hash)?;
    if view.balance_factor == 0 || view.backend_count == 0 {
        return Ok(choice);
    }
    let total = u64::from(view.load_total) + 1;
    let share = 100 * u64::from(view.backend_count);
    let limit = (u64::from(view.balance_factor) * total).div_ceil(share);
    let mut chosen = choice;
    for step in 0..BOUNDED_SLOTS {
        let id = table_lookup(view, hash.wrapping_add(step))?;
        if BACKENDS.get(id).is_some_and(|b| u64::from(b.load) < limit) {
            chosen = id;
            break;
        }
    }
    if let Some(backend) = BACKENDS.get_ptr_mut(chosen) {
        // SAFETY: fields of live map values; the adds are atomic.
        unsafe {
            atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(&raw mut (*backend).load, 1);
            atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(&raw mut (*service).load_total, 1);
        }
    }
    Ok(chosen)
}

/// The backend in the slot of the service's Maglev table that `hash` names.
#[inline(always)]
fn table_lookup(service: &Service, hash: u32) -> Result<u32, Verdict> {
    let no_backend = Verdict::drop(Reason::DropNoBackend);
    if service.table_size == 0 {
        return Err(no_backend);
    }
    let slot = service.table_base + hash % service.table_size;
    BACKEND_TABLE.get(slot).copied().ok_or(no_backend)
}

/// The client's session backend: kept while the client's last new flow is more recent than
/// the timeout and its backend still honours sessions; otherwise chosen by the Maglev table
/// from the client address alone, so every balancer host makes the same choice. A session
/// whose backend is down is held (refused) while the backend says so, and with
/// `return_home` served elsewhere without moving.
#[inline(always)]
fn session_backend(
    service: *mut Service,
    client: Addr,
    now_s: u32,
) -> Result<u32, Option<Verdict>> {
    // SAFETY: as in `backend`.
    let service_ptr = service;
    let service = unsafe { &*service_ptr };
    let key = AffinityKey {
        service_id: service.id,
        client,
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout = u64::from(service.affinity_timeout) * NANOS_PER_SECOND;
    if let Some(session) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: map values stay valid for the duration of the program; concurrent writers
        // only race on the timestamp, which any of them may win.
        let session = unsafe { &mut *session };
        if now.wrapping_sub(session.last_seen_ns) < timeout {
            session.last_seen_ns = now;
            let backend = BACKENDS.get(session.backend_id);
            // Up, or draining within its drain timeout: it keeps the sessions it has.
            if backend
                .is_some_and(|b| b.state == backend_state::UP || b.state == backend_state::DRAINING)
            {
                return Ok(session.backend_id);
            }
            if backend.is_some_and(|b| now_s < b.hold_until_s) {
                return Err(None);
            }
            let backend_id = placed(service_ptr, client_hash(&client)).map_err(Some)?;
            if service.return_home == 0 {
                session.backend_id = backend_id;
                stats::count(Reason::SessionMoved, 0);
            }
            return Ok(backend_id);
        }
    }
    let backend_id = placed(service_ptr, client_hash(&client)).map_err(Some)?;
    let session = Affinity {
        backend_id,
        _pad: 0,
        last_seen_ns: now,
    };
    // A failed insert only means the client's next flow chooses again, the same way.
    let _ = AFFINITY.insert(&key, &session, 0);
    stats::count(Reason::NewSession, 0);
    Ok(backend_id)
}
