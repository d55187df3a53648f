//! Every map of the program; names, sizes and types come from `balancer_common`.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use balancer_common::{
    Addr, Affinity, AffinityKey, AgentState, Backend, BackendCounters, Binding, CookieSecret,
    Counter, Flow, FlowKey, Group, HeadInsert, KnownSession, KnownSessionKey, Reason, Replay,
    ReverseNat, Service, ServiceKey, SessionStart, SynOptions, BINDING_CAPACITY, COOKIE_SECRETS,
    DEFAULT_AFFINITY_CAPACITY, DEFAULT_FLOW_CAPACITY, DEFAULT_TABLE_SIZE, GROUP_TABLE_SIZE,
    KNOWN_SESSION_CAPACITY, MAX_BACKENDS, MAX_GROUPS, MAX_NAT_SOURCES, MAX_SERVICES, MAX_TX_PORTS,
    NEW_FLOW_SOURCE_RING_SIZE, PUNT_RING_SIZE, REPLAY_CAPACITY, TABLES_PER_SERVICE,
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

/// Groups of each service (`service id × MAX_GROUPS + group index`): where their lookup
/// tables are in `GROUP_TABLE`.
#[map]
pub static GROUPS: Array<Group> = Array::pinned(MAX_SERVICES * MAX_GROUPS, 0);

/// Maglev lookup tables of the groups of `source-ip` services, two per group as in
/// `BACKEND_TABLE`: a session whose backend fails moves within its group by them.
#[map]
pub static GROUP_TABLE: Array<u32> = Array::pinned(
    MAX_SERVICES * MAX_GROUPS * TABLES_PER_SERVICE * GROUP_TABLE_SIZE,
    0,
);

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

/// Per backend (by id): packets and bytes each way, and new flows.
#[map]
pub static BACKEND_STATS: PerCpuArray<BackendCounters> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// Interfaces the program may redirect to, keyed by ifindex.
#[map]
pub static TX_PORTS: DevMapHash = DevMapHash::pinned(MAX_TX_PORTS, 0);

/// Cookie services: what each client SYN offered, until its handshake completes. Under a SYN
/// flood entries are evicted and those clients get default options.
#[map]
pub static SYN_OPTIONS: LruHashMap<FlowKey, SynOptions> = LruHashMap::pinned(BINDING_CAPACITY, 0);

/// Cookie services: client connections the balancer accepted, until the agent binds them.
#[map]
pub static BINDINGS: LruHashMap<FlowKey, Binding> = LruHashMap::pinned(BINDING_CAPACITY, 0);

/// Frames for the agent: client data while a connection is being bound, backend answers; a
/// ring for each agent worker (`map_name::PUNT_RINGS`), sized by the agent when it loads the
/// program (the rings of workers it does not run, one page).
#[map]
pub static PUNTS_0: RingBuf = RingBuf::pinned(PUNT_RING_SIZE, 0);
#[map]
pub static PUNTS_1: RingBuf = RingBuf::pinned(PUNT_RING_SIZE, 0);
#[map]
pub static PUNTS_2: RingBuf = RingBuf::pinned(PUNT_RING_SIZE, 0);
#[map]
pub static PUNTS_3: RingBuf = RingBuf::pinned(PUNT_RING_SIZE, 0);
#[map]
pub static PUNTS_4: RingBuf = RingBuf::pinned(PUNT_RING_SIZE, 0);
#[map]
pub static PUNTS_5: RingBuf = RingBuf::pinned(PUNT_RING_SIZE, 0);
#[map]
pub static PUNTS_6: RingBuf = RingBuf::pinned(PUNT_RING_SIZE, 0);
#[map]
pub static PUNTS_7: RingBuf = RingBuf::pinned(PUNT_RING_SIZE, 0);
const _: () = assert!(balancer_common::MAX_AGENT_WORKERS == 8);

/// The clients of new flows, for the agent's tally of the sources that open the most. Not
/// pinned: it holds nothing the next agent needs; without an agent it fills and new flows
/// count as `NewFlowSourceLost`.
#[map]
pub static NEW_FLOW_SOURCES: RingBuf = RingBuf::with_byte_size(NEW_FLOW_SOURCE_RING_SIZE, 0);

/// The SYN cookies' secrets: the current one, then the previous one (still accepted), rotated
/// by the agent.
#[map]
pub static COOKIE_SECRET: Array<CookieSecret> = Array::pinned(COOKIE_SECRETS, 0);

/// Full NAT: the balancer's source addresses, grouped by backend network; a backend names
/// its group's first entry and size.
#[map]
pub static NAT_SOURCES: Array<Addr> = Array::pinned(MAX_NAT_SOURCES, 0);

/// Full NAT: how many sources all CPUs have tried, which picks the next one; moved by
/// atomic adds. Not pinned: a new program may start anywhere, claims are settled in
/// `REVERSE`.
#[map]
pub static NAT_CURSOR: Array<u64> = Array::with_max_entries(1, 0);

/// Full NAT: a new flow's packet and backend, handed from the main program to
/// `balancer_full_nat` (see `full_nat`).
#[map]
pub static FULL_NAT_HANDOFF: PerCpuArray<crate::full_nat::Handoff> =
    PerCpuArray::with_max_entries(1, 0);

/// Full NAT: the program a new flow's packet is passed to (entry 0), filled by the agent.
/// Not pinned: every load of the program fills its own.
#[map]
pub static FULL_NAT_PROGRAM: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Cookie services: the cookie lines a connection's first response head gets from XDP (see
/// `head`), by its client-side key, from the agent's SYN to the backend until the client
/// acknowledged the head. Entries evicted (or missing) send that head to the agent.
#[map]
pub static HEAD_INSERTS: LruHashMap<FlowKey, HeadInsert> = LruHashMap::pinned(BINDING_CAPACITY, 0);

/// A backend segment handed from the main program to `balancer_response_head` or
/// `balancer_replay` (see `head`, `replay`).
#[map]
pub static COOKIE_HANDOFF: PerCpuArray<crate::packet::Packet> = PerCpuArray::with_max_entries(1, 0);

/// Cookie services: the request the agent replays to a connection's backend (see `replay`),
/// by its client-side key, from the agent's SYN until the backend's SYN-ACK.
#[map]
pub static REPLAYS: LruHashMap<FlowKey, Replay> = LruHashMap::pinned(REPLAY_CAPACITY, 0);

/// The program a backend's SYN-ACK is passed to (entry 0), filled by the agent. Not pinned,
/// as `FULL_NAT_PROGRAM`.
#[map]
pub static REPLAY_PROGRAM: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Cookie services: per client address and service, the session the agent last bound one
/// of its connections to, for XDP to bind the client's next ones itself (see `bind`).
#[map]
pub static KNOWN_SESSIONS: LruHashMap<KnownSessionKey, KnownSession> =
    LruHashMap::pinned(KNOWN_SESSION_CAPACITY, 0);

/// Cookie services: per backend, the cookie lines that start a session there, for XDP to
/// bind requests without a cookie itself (see `bind`).
#[map]
pub static SESSION_STARTS: Array<SessionStart> = Array::pinned(MAX_BACKENDS, 0);

/// The program a client's first data segment is passed to (entry 0), filled by the agent.
/// Not pinned, as `FULL_NAT_PROGRAM`.
#[map]
pub static BIND_PROGRAM: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Per CPU, the request `bind` reads and leaves in `REPLAYS`. Not pinned: it holds nothing
/// between packets.
#[map]
pub static REPLAY_SCRATCH: PerCpuArray<Replay> = PerCpuArray::with_max_entries(1, 0);

/// The program a response head is passed to (entry 0), filled by the agent. Not pinned, as
/// `FULL_NAT_PROGRAM`.
#[map]
pub static HEAD_PROGRAM: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Per CPU, the headers and status line of a segment the cookie lines go into, while they
/// are put in. Not pinned: it holds nothing between packets.
#[map]
pub static HEAD_SCRATCH: PerCpuArray<[u8; crate::head::SCRATCH]> =
    PerCpuArray::with_max_entries(1, 0);

/// `proxy_protocol`: per CPU, the headers of a segment a PROXY header goes into, and that
/// header, while it is put in (see `proxy`). Not pinned: it holds nothing between packets.
#[map]
pub static PROXY_SCRATCH: PerCpuArray<crate::proxy::Scratch> = PerCpuArray::with_max_entries(1, 0);

/// One word per CPU that [`crate::packet::parse`] passes the transport header's offset
/// through: the verifier cannot follow a value through a map, so every packet's offset looks
/// alike to it from there on, and it verifies the paths after parsing once instead of once
/// per family and header layout. Not pinned: it holds nothing between packets.
#[map]
pub static OFFSET_SCRATCH: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The agent's heartbeat and the maps' layout version (one entry), written by the agent.
#[map]
pub static AGENT: Array<AgentState> = Array::pinned(1, 0);

/// The TCP options `tcp_options::Options` works on: a copy in a map, not on the stack, which
/// the per-packet paths fill to the verifier's 512 bytes.
#[map]
pub static OPTION_BYTES: PerCpuArray<[u8; crate::tcp_options::BUFFER]> =
    PerCpuArray::with_max_entries(1, 0);
