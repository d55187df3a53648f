//! Choosing a backend for a new flow: by the flow's own hash (`flow`), or by the client's
//! session (`source-ip`), which lasts while the client keeps opening flows.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::Array};
use balancer_common::{
    affinity, backend_state, client_hash, flow_hash, without_agent, Addr, Affinity, AffinityKey,
    FlowKey, Reason, Service, MAX_GROUPS,
};

use crate::{
    maps::{AFFINITY, BACKENDS, BACKEND_TABLE, GROUPS, GROUP_TABLE},
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
        placed(service, service_table(view), flow_hash(key)).map_err(Some)
    }
}

/// The backend the agent gives a cookie service's request without a cookie (its cookie
/// fallback): where XDP starts a new session, and every new connection while no agent runs.
/// No session is recorded.
#[inline(always)]
pub fn fallback_backend(service: &Service, key: &FlowKey) -> Result<u32, Verdict> {
    let hash = if service.cookie_fallback == without_agent::PLACE_BY_SOURCE {
        client_hash(&key.src.masked(&service.source_mask))
    } else {
        flow_hash(key)
    };
    table_lookup(service_table(service), hash)
}

/// Slots after a new placement's own that bounded-load placement looks at for a backend under
/// the bound, before it takes the table's choice anyway.
const BOUNDED_SLOTS: u32 = 8;

/// A Maglev lookup table of backend ids: a service's own, or one of its groups'.
#[derive(Clone, Copy)]
struct Table {
    slots: &'static Array<u32>,
    base: u32,
    size: u32,
}

#[inline(always)]
fn service_table(service: &Service) -> Table {
    Table {
        slots: &BACKEND_TABLE,
        base: service.table_base,
        size: service.table_size,
    }
}

/// The table of the session's group `group` (1 + its index), unless it has no serving
/// backend.
#[inline(always)]
fn group_table(service: &Service, group: u32) -> Option<Table> {
    let index = service
        .id
        .wrapping_mul(MAX_GROUPS)
        .wrapping_add(group.wrapping_sub(1));
    let table = GROUPS.get(index)?;
    (table.table_size != 0).then_some(Table {
        slots: &GROUP_TABLE,
        base: table.table_base,
        size: table.table_size,
    })
}

/// A new flow's or session's backend: the table's choice for `hash`, or with a
/// `balance_factor` the first backend from that slot on whose load is under the factor of the
/// service's average (with this one counted), whose load and the service's total then count
/// it.
#[inline(always)]
fn placed(service: *mut Service, table: Table, hash: u32) -> Result<u32, Verdict> {
    // SAFETY: a live map value; racing CPUs only race on the load counters.
    let view = unsafe { &*service };
    let choice = table_lookup(table, hash)?;
    if view.balance_factor == 0 || view.backend_count == 0 {
        return Ok(choice);
    }
    let total = u64::from(view.load_total) + 1;
    let share = 100 * u64::from(view.backend_count);
    let limit = (u64::from(view.balance_factor) * total).div_ceil(share);
    let mut chosen = choice;
    for step in 0..BOUNDED_SLOTS {
        let id = table_lookup(table, hash.wrapping_add(step))?;
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

/// The backend in the slot of `table` that `hash` names.
#[inline(always)]
fn table_lookup(table: Table, hash: u32) -> Result<u32, Verdict> {
    let no_backend = Verdict::drop(Reason::DropNoBackend);
    if table.size == 0 {
        return Err(no_backend);
    }
    table
        .slots
        .get(table.base + hash % table.size)
        .copied()
        .ok_or(no_backend)
}

/// The group (as [`Backend::group`]) of backend `id`.
#[inline(always)]
fn group_of(id: u32) -> u32 {
    BACKENDS.get(id).map_or(0, |b| b.group)
}

/// The client's session backend: kept while the client's last new flow is more recent than
/// the timeout, or while it stays in its group, and its backend still honours sessions;
/// otherwise chosen by the Maglev table from the client address alone, so every balancer
/// host makes the same choice.
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
    let hash = client_hash(&client);
    if let Some(session) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: map values stay valid for the duration of the program; concurrent writers
        // only race on the session's fields, which any of them may win.
        let session = unsafe { &mut *session };
        let grouped = service.group_stickiness != 0 && session.group != 0;
        let in_group = grouped && now_s < session.group_until_s;
        if in_group || now.wrapping_sub(session.last_seen_ns) < timeout {
            session.last_seen_ns = now;
            return kept_session(service_ptr, session, hash, now_s, grouped && !in_group);
        }
    }
    let backend_id = placed(service_ptr, service_table(service), hash).map_err(Some)?;
    let mut session = Affinity {
        backend_id,
        last_seen_ns: now,
        ..Affinity::default()
    };
    join_group(&mut session, service, now_s);
    // A failed insert only means the client's next flow chooses again, the same way.
    let _ = AFFINITY.insert(&key, &session, 0);
    stats::count(Reason::NewSession, 0);
    Ok(backend_id)
}

/// Puts `session` in its backend's group for the service's `group_stickiness`.
#[inline(always)]
fn join_group(session: &mut Affinity, service: &Service, now_s: u32) {
    if service.group_stickiness != 0 {
        session.group = group_of(session.backend_id);
        session.group_until_s = now_s.saturating_add(service.group_stickiness);
    }
}

/// The backend of a session that is still held. Once its time in its group is over
/// (`regroup`) it takes a group by the weights of now, keeping its backend if the group is
/// the same. A session whose backend is down is held (refused) while the backend says so;
/// otherwise it moves (within its group while it stays in one), or with `return_home` is
/// served elsewhere without moving.
#[inline(always)]
fn kept_session(
    service_ptr: *mut Service,
    session: &mut Affinity,
    hash: u32,
    now_s: u32,
    regroup: bool,
) -> Result<u32, Option<Verdict>> {
    // SAFETY: as in `backend`.
    let service = unsafe { &*service_ptr };
    let mut moving = false;
    if regroup {
        let choice = table_lookup(service_table(service), hash).map_err(Some)?;
        moving = group_of(choice) != session.group;
        if !moving {
            session.group_until_s = now_s.saturating_add(service.group_stickiness);
        }
    }
    let table = if moving {
        service_table(service)
    } else {
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
        let grouped = service.group_stickiness != 0 && session.group != 0;
        let own_group = grouped
            .then(|| group_table(service, session.group))
            .flatten();
        // A group without a serving backend left: the session takes another group.
        moving = grouped && own_group.is_none();
        own_group.unwrap_or(service_table(service))
    };
    let backend_id = placed(service_ptr, table, hash).map_err(Some)?;
    if moving || service.return_home == 0 {
        session.backend_id = backend_id;
        if moving {
            join_group(session, service, now_s);
        }
        stats::count(Reason::SessionMoved, 0);
    }
    Ok(backend_id)
}
