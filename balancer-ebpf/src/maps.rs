//! Every map of the program; names, sizes and types come from `balancer_common`.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use balancer_common::{
    Affinity, AffinityKey, Backend, Counter, Flow, FlowKey, Reason, ReverseNat, Service,
    ServiceKey, DEFAULT_AFFINITY_CAPACITY, DEFAULT_FLOW_CAPACITY, DEFAULT_TABLE_SIZE, MAX_BACKENDS,
    MAX_SERVICES, MAX_TX_PORTS, TABLES_PER_SERVICE,
};

/// Virtual services: (VIP, port, protocol) → affinity mode, lookup table and backend count.
#[map]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::pinned(MAX_SERVICES, 0);

/// Backends by id: address, port and state.
#[map]
pub static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

/// Maglev lookup tables of backend ids, two per service (active and next); a new flow or
/// session takes the slot its hash names. Sized by the agent for its table size.
#[map]
pub static BACKEND_TABLE: Array<u32> =
    Array::pinned(MAX_SERVICES * TABLES_PER_SERVICE * DEFAULT_TABLE_SIZE, 0);

/// `source-ip` affinity: (service, masked client address) → backend and last new flow.
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, Affinity> =
    LruHashMap::pinned(DEFAULT_AFFINITY_CAPACITY, 0);

/// Client-side 5-tuple → the backend that flow is bound to.
#[map]
pub static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(DEFAULT_FLOW_CAPACITY, 0);

/// Backend-side 5-tuple → the VIP and port its replies are rewritten to.
#[map]
pub static REVERSE: LruHashMap<FlowKey, ReverseNat> = LruHashMap::pinned(DEFAULT_FLOW_CAPACITY, 0);

/// Packet and byte counters per exit reason.
#[map]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::pinned(Reason::COUNT, 0);

/// Interfaces the program may redirect to, keyed by ifindex.
#[map]
pub static TX_PORTS: DevMapHash = DevMapHash::pinned(MAX_TX_PORTS, 0);
