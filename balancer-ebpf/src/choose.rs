//! Choosing a backend for a new flow: by the flow's own hash (`flow`), or by the client's
//! session (`source-ip`), which lasts while the client keeps opening flows.

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
pub fn backend(service: &Service, key: &FlowKey, now_s: u32) -> Result<u32, Option<Verdict>> {
    if service.affinity == affinity::SOURCE_IP {
        session_backend(service, key.src.masked(&service.source_mask), now_s)
    } else {
        table_lookup(service, flow_hash(key)).map_err(Some)
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
fn session_backend(service: &Service, client: Addr, now_s: u32) -> Result<u32, Option<Verdict>> {
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
            let backend_id = table_lookup(service, client_hash(&client)).map_err(Some)?;
            if service.return_home == 0 {
                session.backend_id = backend_id;
                stats::count(Reason::SessionMoved, 0);
            }
            return Ok(backend_id);
        }
    }
    let backend_id = table_lookup(service, client_hash(&client)).map_err(Some)?;
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
