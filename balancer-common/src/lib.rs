//! Map keys, values, names and capacities shared by the XDP program and the agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding and a compile-time size check, so the
//! kernel and user sides always agree on the layout. Addresses and ports are kept in network
//! byte order, exactly as they appear in packets, so the hot path never swaps bytes.
#![no_std]

pub mod addr;
pub mod csum;
pub mod proto;
pub mod proxy_v2;
pub mod syncookie;

pub use addr::Addr;
pub use proto::{PROTO_TCP, PROTO_UDP};

pub use syncookie::{CookieSecret, COOKIE_SECRETS};

use core::mem::size_of;

use bytemuck::{Pod, Zeroable};

/// Names of the maps, as declared by the XDP program and pinned under `/sys/fs/bpf/<instance>/`.
pub mod map_name {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const BACKEND_TABLE: &str = "BACKEND_TABLE";
    pub const FLOWS: &str = "FLOWS";
    pub const SYN_OPTIONS: &str = "SYN_OPTIONS";
    pub const BINDINGS: &str = "BINDINGS";
    /// The punt rings, one per agent worker, by worker.
    pub const PUNT_RINGS: [&str; super::MAX_AGENT_WORKERS] = [
        "PUNTS_0", "PUNTS_1", "PUNTS_2", "PUNTS_3", "PUNTS_4", "PUNTS_5", "PUNTS_6", "PUNTS_7",
    ];
    pub const COOKIE_SECRET: &str = "COOKIE_SECRET";
    pub const REVERSE: &str = "REVERSE";
    pub const AFFINITY: &str = "AFFINITY";
    pub const STATS: &str = "STATS";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const AGENT: &str = "AGENT";
    pub const NAT_SOURCES: &str = "NAT_SOURCES";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const NEW_FLOW_SOURCES: &str = "NEW_FLOW_SOURCES";
    pub const GROUPS: &str = "GROUPS";
    pub const GROUP_TABLE: &str = "GROUP_TABLE";
    pub const HEAD_INSERTS: &str = "HEAD_INSERTS";
    pub const REPLAYS: &str = "REPLAYS";
    pub const KNOWN_SESSIONS: &str = "KNOWN_SESSIONS";
    pub const SESSION_STARTS: &str = "SESSION_STARTS";
}

/// Version of the maps' layout (their key and value types and the meaning of their fields).
/// Pinned maps outlive the agent and its program; a program of another layout version must
/// not adopt them. Bump it with every change to a type or map below.
pub const LAYOUT_VERSION: u32 = 17;

/// Seconds after the agent's last heartbeat that the data plane takes it for gone: cookie
/// services then stop handing connections to it (see [`without_agent`]). Compiled into the
/// program; `BALANCER_AGENT_TIMEOUT_S` at build time sets another value.
pub const DEFAULT_AGENT_TIMEOUT_S: u32 = 2;

/// Name of the XDP entry point in the object file.
pub const XDP_PROGRAM: &str = "balancer";

/// Capacities of the fixed-size maps.
pub const MAX_SERVICES: u32 = 64;
pub const MAX_BACKENDS: u32 = 4096;
/// Default slots in each service's lookup table; configurable, always prime (Maglev).
pub const DEFAULT_TABLE_SIZE: u32 = 65537;
/// Lookup tables per service in `BACKEND_TABLE`: the active one and the one being rebuilt.
pub const TABLES_PER_SERVICE: u32 = 2;
/// Groups of backends a service may have (blue/green, canary).
pub const MAX_GROUPS: u32 = 8;
/// Slots in each group's lookup table in `GROUP_TABLE` (a prime; `source-ip` services with
/// groups): a session whose backend fails moves within its group by it.
pub const GROUP_TABLE_SIZE: u32 = 4099;
pub const MAX_TX_PORTS: u32 = 64;
/// Full NAT: the balancer's own addresses that backends see XDP's flows come from.
pub const MAX_NAT_SOURCES: u32 = 256;
/// Default capacity of the flow tables (`FLOWS` and `REVERSE`); configurable at load time.
pub const DEFAULT_FLOW_CAPACITY: u32 = 1 << 20;
/// Cookie services: client connections between their SYN and the agent's binding.
pub const BINDING_CAPACITY: u32 = 1 << 16;
/// Default capacity of the client affinity table (`AFFINITY`); configurable at load time.
pub const DEFAULT_AFFINITY_CAPACITY: u32 = 1 << 20;

/// `SERVICES` key: a virtual IP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceKey {
    pub vip: Addr,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 20);

/// `SERVICES` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Service {
    /// Identifies the service in `AFFINITY` keys.
    pub id: u32,
    /// One of [`affinity`].
    pub affinity: u32,
    /// First slot of the service's active lookup table in `BACKEND_TABLE`. The agent builds a
    /// new table beside the active one and then switches this field, so no packet ever sees a
    /// half-built table.
    pub table_base: u32,
    /// Slots in the lookup table (a prime).
    pub table_size: u32,
    /// Backends in the lookup table; 0 means new connections are refused and counted.
    pub backend_count: u32,
    /// `source-ip` affinity: seconds an idle client keeps its backend.
    pub affinity_timeout: u32,
    /// Cookie services: what a new connection gets while no agent runs, one of
    /// [`without_agent`].
    pub without_agent: u32,
    /// `source-ip` affinity, and the cookie fallback by source: mask applied to the client
    /// address (an IPv4 service's has its first 96 bits set, as its addresses are mapped).
    pub source_mask: Addr,
    /// One of [`nat_mode`].
    pub nat: u32,
    /// 1: XDP puts a PROXY protocol v2 header in front of each L4 TCP flow's first data
    /// (full NAT only).
    pub proxy_protocol: u32,
    /// `source-ip`, 1: a session whose backend is down is served elsewhere without moving,
    /// and is back on its backend once it returns (`return_home`).
    pub return_home: u32,
    /// Bounded-load placement of new flows (`flow`) and sessions (`source-ip`), in percent of
    /// the average load; 0 places by the table alone.
    pub balance_factor: u32,
    /// With `balance_factor`: the service's backends' loads summed, kept as [`Backend::load`].
    pub load_total: u32,
    /// `source-ip` with groups: seconds a session stays in the group of its first backend,
    /// whatever the weights do, moving within it (by its table in `GROUPS`) when its backend
    /// fails; 0 keeps no group.
    pub group_stickiness: u32,
    /// Changes with every change the agent publishes of the service: what XDP binds by
    /// without the agent ([`KnownSession`], [`SessionStart`]) holds for this generation
    /// alone.
    pub generation: u32,
    /// Cookie services: what places a request without a usable cookie
    /// (`cookie_fallback`), [`without_agent::PLACE_BY_SOURCE`] or
    /// [`without_agent::PLACE_BY_FLOW`]; XDP starts sessions on that backend itself
    /// ([`SessionStart`]).
    pub cookie_fallback: u32,
}
const _: () = assert!(size_of::<Service>() == 76);

/// `GROUPS` value, at `service id × MAX_GROUPS + group index`: a group's lookup table in
/// `GROUP_TABLE`, switched like the service's own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Group {
    pub table_base: u32,
    /// Slots in the table; 0: the group has no serving backend.
    pub table_size: u32,
}
const _: () = assert!(size_of::<Group>() == 8);

/// How a service's connections reach their backends, in [`Service::nat`].
pub mod nat_mode {
    /// Only the destination is rewritten: backends see the client's address and route their
    /// replies through the balancer.
    pub const GATEWAY: u32 = 0;
    /// The source is rewritten too, to one of the balancer's addresses and a port it
    /// allocates: backends reply to the balancer whatever their routing.
    pub const FULL: u32 = 1;
}

/// Affinity modes in [`Service::affinity`].
pub mod affinity {
    /// Each flow is placed on its own, by a hash of its 5-tuple.
    pub const FLOW: u32 = 0;
    /// All flows of a (masked) client address go to one backend while the client is active.
    pub const SOURCE_IP: u32 = 1;
    /// HTTP: the agent chooses the backend from the request's cookie (delayed binding: XDP
    /// completes the client's handshake with a SYN cookie, the agent opens the backend side,
    /// then XDP splices the two).
    pub const COOKIE: u32 = 2;
}

/// What a cookie service does with a new connection while no agent runs (its heartbeat in
/// `AGENT` is older than the program's agent timeout): the request cannot be read, so either
/// XDP places the connection as a plain L4 flow by the service's cookie fallback, the same
/// backend the agent would give a request without a cookie, or it refuses it with a reset.
pub mod without_agent {
    /// Placed by a hash of the 5-tuple (`cookie_fallback = "flow"`).
    pub const PLACE_BY_FLOW: u32 = 0;
    /// Placed by a hash of the masked client address (`cookie_fallback = "source-ip"`).
    pub const PLACE_BY_SOURCE: u32 = 1;
    /// Refused with a reset.
    pub const RESET: u32 = 2;
}

/// `AGENT` value (one entry): the agent's heartbeat and the layout of the pinned maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AgentState {
    /// Second (of `bpf_ktime_get_coarse_ns`, `CLOCK_MONOTONIC_COARSE`) the agent last wrote.
    pub heartbeat_s: u32,
    /// [`LAYOUT_VERSION`] of the agent that created the maps.
    pub layout_version: u32,
    /// The interfaces facing the clients and the backends: when they differ, a backend's
    /// reply arriving from the client side is forged.
    pub client_ifindex: u32,
    pub backend_ifindex: u32,
    /// Seconds a client of a cookie service may take between its handshake and its request
    /// (the config's `request_timeout`); a connection that sent nothing by then is reset.
    pub request_timeout_s: u32,
    /// Full NAT: the ports XDP gives its flows (host order), `nat_port_count` of them from
    /// `nat_port_first`; the agent reserves them from the host's own sockets.
    pub nat_port_first: u16,
    pub nat_port_count: u16,
    /// The agent's workers, 1 to [`MAX_AGENT_WORKERS`]: a cookie connection's frames go to
    /// the ring of worker [`worker_of`] its client.
    pub workers: u32,
}
const _: () = assert!(size_of::<AgentState>() == 28);

/// The most worker threads the agent binds cookie connections on, each reading its own punt
/// ring.
pub const MAX_AGENT_WORKERS: usize = 8;

/// Prefix lengths (IPv4, IPv6) of the client prefix whose connections share a budget in the
/// agent (a NAT pool, a hosting subnet, a site): each prefix's connections go to one worker.
pub const CLIENT_PREFIX_BITS: (u32, u32) = (24, 48);

/// The worker, of `workers`, that owns the connections of `client`: a hash of its prefix, so
/// each worker holds every connection a budget counts and one busy prefix keeps only its own
/// worker busy.
#[inline(always)]
pub fn worker_of(client: &Addr, workers: u32) -> u32 {
    const V4: Addr = Addr::prefix_mask(true, CLIENT_PREFIX_BITS.0);
    const V6: Addr = Addr::prefix_mask(false, CLIENT_PREFIX_BITS.1);
    let prefix = client.masked(if client.is_v4() { &V4 } else { &V6 });
    let mut hash: u32 = 0x9e37_79b9;
    let mut i = 0;
    while i < 4 {
        hash = (hash ^ prefix.words[i])
            .wrapping_mul(0x0100_0193)
            .rotate_left(13);
        i += 1;
    }
    hash = (hash ^ (hash >> 16)).wrapping_mul(0x85eb_ca6b);
    hash ^= hash >> 13;
    let workers = workers.clamp(1, MAX_AGENT_WORKERS as u32);
    ((u64::from(hash) * u64::from(workers)) >> 32) as u32
}

/// States of a client flow in [`Flow::state`] and of its reverse entry in
/// [`ReverseNat::state`].
pub mod flow_state {
    /// Plain NAT: every packet is rewritten and forwarded.
    pub const NAT: u16 = 0;
    /// The agent sent the backend a SYN; the backend's answer goes to the agent.
    pub const CONNECTING: u16 = 2;
    /// Both legs are up: packets are rewritten with the sequence offset and forwarded.
    pub const SPLICED: u16 = 3;
    /// Reverse entries only: spliced, but the backend's data and FIN go to the agent, which
    /// reads its first response head to add the balancer's cookie to it.
    pub const RESPONSE_HEAD: u16 = 4;
}

/// `AFFINITY` key: a service and a masked client address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey {
    pub service_id: u32,
    pub client: Addr,
}
const _: () = assert!(size_of::<AffinityKey>() == 20);

/// `AFFINITY` value: the backend of a client, when it last opened a flow and, on a service
/// with groups, the group it stays in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Affinity {
    pub backend_id: u32,
    /// As [`Backend::group`]: the session's group, 0 for none.
    pub group: u32,
    /// `bpf_ktime_get_ns` of the client's latest new flow.
    pub last_seen_ns: u64,
    /// With `group`: the second of the coarse monotonic clock until which the session stays
    /// in it; then it takes a group by the weights again (keeping its backend if the group
    /// is the same).
    pub group_until_s: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Affinity>() == 24);

/// Backend states in [`Backend::state`]. Established flows continue in every state; the
/// state decides whether a client's affinity to the backend is still honoured.
pub mod backend_state {
    pub const UP: u8 = 0;
    /// Failed its health checks, or drained past its timeout: sessions move elsewhere.
    pub const DOWN: u8 = 1;
    /// Takes no new sessions but keeps the ones it has.
    pub const DRAINING: u8 = 2;
}

/// `BACKENDS` value, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend {
    pub addr: Addr,
    pub port: u16,
    pub state: u8,
    /// Full NAT: how many of the balancer's addresses in `NAT_SOURCES`, from `first_source`
    /// on, XDP's flows to this backend may come from (those of its network).
    pub source_count: u8,
    pub first_source: u32,
    /// `source-ip` services that hold sessions for a failed backend (`on_backend_down`
    /// `keep` or `reject`): until this second of the coarse monotonic clock a new flow of
    /// one of its sessions is refused (TCP reset, else dropped) instead of moved; 0 holds
    /// nothing, `u32::MAX` holds until the backend returns.
    pub hold_until_s: u32,
    /// Services with `balance_factor`: the backend's active flows, as the agent last counted
    /// them, plus those XDP placed on it since.
    pub load: u32,
    /// Services with groups: 1 + the index of the backend's group; 0 for none.
    pub group: u32,
}
const _: () = assert!(size_of::<Backend>() == 36);

/// A TCP/UDP 5-tuple as seen on the wire: `FLOWS` key (client side) and `REVERSE` key (backend side).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// `FLOWS` value: where a client flow to a VIP goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Flow {
    pub backend_addr: Addr,
    pub backend_id: u32,
    pub backend_port: u16,
    /// [`flow_flags`] seen on the flow.
    pub flags: u16,
    /// Second (of `bpf_ktime_get_coarse_ns`) of the client's latest packet; written at most
    /// once a second so the hot path rarely dirties the entry.
    pub last_seen_s: u32,
    /// Spliced TCP: added to the client's acknowledgement numbers (backend ISN minus the
    /// ISN the balancer gave the client).
    pub seq_delta: u32,
    /// Spliced TCP whose first response head the agent edited: bytes it added to the head.
    /// Acknowledgements of what follows the head move back by as much.
    pub inserted: u32,
    /// With `inserted`: the client's sequence number just past the edited head.
    pub head_end: u32,
    /// Spliced TCP whose first request the agent shortened (`app-cookie` rewrite mode strips
    /// its prefix from the application's cookie): subtracted from the client's sequence
    /// numbers.
    pub removed: u32,
    /// Full NAT: the balancer's address and port the backend sees the flow come from
    /// (`source_port` 0: gateway NAT, the client's own).
    pub source: Addr,
    pub source_port: u16,
    /// One of [`flow_state`].
    pub state: u16,
    /// With [`flow_flags::PROXY_HEADER`]: the client's sequence number of its first data
    /// byte, where the header goes; the client's later bytes move past it.
    pub proxy_seq: u32,
    /// Spliced TCP with [`flow_flags::TIMESTAMPS`]: as [`ReverseNat::ts_delta`], subtracted
    /// from the client's TSecr, which echoes the backend's TSval as XDP moved it.
    pub ts_delta: u32,
    /// As [`ReverseNat::client_ts_delta`], added to the client's TSval.
    pub client_ts_delta: u32,
}
const _: () = assert!(size_of::<Flow>() == 76);

/// Bits of [`Flow::flags`].
pub mod flow_flags {
    /// The client sent a FIN or a reset: the flow is ending.
    pub const CLOSING: u16 = 1;
    /// The client acknowledged all of an edited response head: the backend will not send
    /// any of it again.
    pub const HEAD_ACKED: u16 = 2;
    /// L4 TCP with `proxy_protocol`: XDP puts the PROXY header in front of the client's
    /// first data (see [`Flow::proxy_seq`]).
    pub const PROXY_HEADER: u16 = 4;
    /// Spliced TCP where both legs use timestamps: the client's TSecr is translated.
    pub const TIMESTAMPS: u16 = 8;
    /// XDP put the balancer's cookie lines into the first response head behind its status
    /// line ([`HeadInsert`]); it drops them once the client acknowledged the head.
    pub const HEAD_BY_XDP: u16 = 16;
    /// XDP opened the backend side itself from a [`KnownSession`]: until the splice, the
    /// client's segments are XDP's alone (its request sent again opens the backend side
    /// again; the rest waits for the client to send it again).
    pub const BOUND_BY_XDP: u16 = 32;
}

/// `REVERSE` value: the VIP and port a backend's reply must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ReverseNat {
    pub vip: Addr,
    pub port: u16,
    /// Spliced TCP: the window scale the backend announced, and the one the client was
    /// promised; windows are rescaled from the first to the second.
    pub backend_window_shift: u8,
    pub client_window_shift: u8,
    /// One of [`flow_state`].
    pub state: u16,
    pub _pad: u16,
    /// Spliced TCP: subtracted from the backend's sequence numbers (after an edited response
    /// head, less the bytes the edit added).
    pub seq_delta: u32,
    /// Spliced TCP whose first response head the agent edited: bytes it added (0: none).
    pub inserted: u32,
    /// With `inserted`: the backend's sequence number just past its original head. Data
    /// sent again from before it goes to the agent, which holds the edited head.
    pub head_end: u32,
    /// Spliced TCP whose first request the agent shortened by this many bytes: added to the
    /// backend's acknowledgement numbers and SACK blocks. An L4 flow whose client bytes XDP
    /// put a PROXY header in front of holds the header's length negated.
    pub removed: u32,
    /// Spliced TCP: the backend's sequence number just past the request bytes the agent
    /// replayed to it, until the backend acknowledges them (then 0): only the agent can send
    /// them again, the client had them acknowledged by the agent.
    pub replay_end: u32,
    /// Full NAT: the client the replies go back to (`client_port` 0: gateway NAT, where the
    /// reply is already addressed to it).
    pub client: Addr,
    pub client_port: u16,
    /// [`reverse_flags`] seen on the flow.
    pub flags: u16,
    /// Full NAT: second (of `bpf_ktime_get_coarse_ns`) of either end's latest packet, or of
    /// the source's claim; tells when XDP or the agent may give the source to another flow.
    pub last_seen_s: u32,
    /// The backend the replies come from, whose counters they go to.
    pub backend_id: u32,
    /// Spliced TCP with [`reverse_flags::TIMESTAMPS`]: added to the backend's TSval, so the
    /// client sees the balancer's clock go on from the last TSval it had from the balancer
    /// (which the backend's first TSval becomes). Until XDP records the backend's SYN-ACK it
    /// holds that last TSval, from which XDP makes the offset.
    pub ts_delta: u32,
    /// Spliced TCP with timestamps: added to the client's TSval on the way to the backend
    /// (and subtracted from the backend's TSecr), so the backend sees the balancer's clock as
    /// it stood when the agent opened its side. Whichever client port or VIP port a
    /// connection came from, and in full NAT whichever client, a backend's TIME_WAIT then
    /// finds each new connection's timestamps later than the last one's (PAWS, RFC 7323).
    pub client_ts_delta: u32,
}
const _: () = assert!(size_of::<ReverseNat>() == 80);

/// Bits of [`ReverseNat::flags`].
pub mod reverse_flags {
    /// A FIN or a reset went either way: the flow is ending, and a full-NAT source port it
    /// holds is free again once the flow has been quiet for a moment.
    pub const CLOSING: u16 = 1;
    /// L4 TCP with `proxy_protocol`: the backend's SYN-ACK offers a smaller MSS by the PROXY
    /// header's length, so the client's first segment still fits once the header is in it.
    pub const PROXY_HEADER: u16 = 2;
    /// A cookie connection whose first response head goes to the agent: XDP turns the
    /// entry to `RESPONSE_HEAD` (not `SPLICED`) when it records the backend's SYN-ACK.
    pub const HEAD_TO_AGENT: u16 = 4;
    /// A cookie connection whose client uses timestamps: XDP records the backend's SYN-ACK
    /// only if it finds the SYN-ACK's TSval, and moves the backend's TSval by `ts_delta`
    /// (the agent clears the flag when the backend does not use them).
    pub const TIMESTAMPS: u16 = 8;
    /// With `HEAD_TO_AGENT`: the agent left the connection's cookie lines in `HEAD_INSERTS`,
    /// and XDP puts them into the first response head itself when it can (see
    /// [`HeadInsert`]); `head_end` holds the backend's first response byte from the
    /// SYN-ACK on.
    pub const COOKIE_BY_XDP: u16 = 16;
    /// XDP put the cookie lines in (`inserted` bytes behind the status line of the segment
    /// starting at `head_end`): a segment the backend sends again from there gets them
    /// again, until the client acknowledged the head.
    pub const HEAD_BY_XDP: u16 = 32;
    /// The agent left the request it replays to the backend in `REPLAYS`: XDP turns the
    /// backend's SYN-ACK into that replay itself (see [`Replay`]).
    pub const REPLAY_BY_XDP: u16 = 64;
    /// XDP opened the backend side itself from a [`KnownSession`]: the agent holds nothing
    /// of the connection, so the backend's SYN-ACK is not copied to it, and XDP takes the
    /// backend's window scale from that SYN-ACK.
    pub const BOUND_BY_XDP: u16 = 128;
}

/// Cookie lines the first response head of a connection gets from XDP: at most this many
/// bytes (of even length, so the bytes behind them keep their checksum words), which the
/// headroom in front of an XDP frame leaves room for.
pub const MAX_HEAD_INSERT: usize = 192;
/// XDP looks this far into the backend's first segment for the end of its status line.
pub const MAX_STATUS_LINE: usize = 128;

/// Request bytes a replay XDP builds from the backend's SYN-ACK holds at most; a longer one
/// the agent sends.
pub const MAX_REPLAY: usize = 1024;
/// Capacity of `REPLAYS`: replays wait there only from the agent's SYN to the backend's
/// SYN-ACK, and one evicted first is sent by the agent.
pub const REPLAY_CAPACITY: u32 = 8192;

/// `REPLAYS` value, by the connection's client-side key: what the agent would send the
/// backend when its SYN-ACK comes (the client's request, as the backend is to have it, in
/// one segment), for XDP to send in its place.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Replay {
    pub bytes: [u8; MAX_REPLAY],
    /// Bytes of `bytes` used, at least one.
    pub len: u16,
    /// One's-complement sum of the bytes' 16-bit words as they lie in memory.
    pub sum: u16,
    /// The client's window field, as the backend reads it.
    pub window: u16,
    /// Non-zero: the replay carries timestamps, `tsval` and the SYN-ACK's TSval echoed.
    pub timestamps: u16,
    /// The client's latest TSval moved onto the balancer's clock.
    pub tsval: u32,
}
const _: () = assert!(size_of::<Replay>() == MAX_REPLAY + 12);

/// Bytes of a request's cookie (`name=value`) a [`KnownSession`] holds at most.
pub const MAX_KNOWN_COOKIE: usize = 96;
/// Capacity of `KNOWN_SESSIONS`: one entry per client address and cookie service.
pub const KNOWN_SESSION_CAPACITY: u32 = 1 << 16;

/// `KNOWN_SESSIONS` key: a client address and the cookie service it connects to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct KnownSessionKey {
    pub client: Addr,
    pub vip: Addr,
    pub port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<KnownSessionKey>() == 36);

impl KnownSessionKey {
    /// The key of `client`'s known session on the service at `vip` and `port` (network byte
    /// order).
    #[inline(always)]
    pub const fn new(client: Addr, vip: Addr, port: u16) -> Self {
        KnownSessionKey {
            client,
            vip,
            port,
            _pad: [0; 2],
        }
    }
}

/// `KNOWN_SESSIONS` value: the session the agent last bound a connection of this client to,
/// by a genuine balancer cookie that needed no new one or by an application cookie's hashed
/// value. XDP binds the client's next connections to the same backend itself, without the
/// agent, when their first segment holds the whole request head with these cookie bytes
/// where their first four first appear, while the service is as the agent saw it, that
/// backend is up and until `until_s` (when the cookie is due for renewal, or sooner).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct KnownSession {
    /// The request's `name=value` of the cookie, `len` bytes of it used.
    pub cookie: [u8; MAX_KNOWN_COOKIE],
    pub len: u16,
    pub _pad: u16,
    pub backend_id: u32,
    /// Second (of `bpf_ktime_get_coarse_ns`) from which the agent decides again.
    pub until_s: u32,
    /// The [`Service::generation`] the agent decided in.
    pub generation: u32,
}
const _: () = assert!(size_of::<KnownSession>() == MAX_KNOWN_COOKIE + 16);

/// `SESSION_STARTS` value, by backend id: the `Set-Cookie` lines that start a session on the
/// backend, as the agent last issued them to a request without a cookie. XDP binds a
/// connection whose request carries no cookie of the service's name (`name_prefix` appears
/// nowhere in its head) to the backend its cookie fallback places it on, and puts these
/// lines into its first response head, while the service is as the agent saw it and until
/// `until_s`. The cookie's value names the backend and its expiry alone, so every new
/// session there gets the same one until then.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SessionStart {
    /// The lines, with `max_payload` left for XDP to set per connection.
    pub lines: HeadInsert,
    /// The first bytes of the cookie's `name=` (names under three bytes are left to the
    /// agent).
    pub name_prefix: [u8; 4],
    /// The [`Service::generation`] the agent issued them in.
    pub generation: u32,
    /// Second (of `bpf_ktime_get_coarse_ns`) from which the agent issues them again.
    pub until_s: u32,
}
const _: () = assert!(size_of::<SessionStart>() == size_of::<HeadInsert>() + 12);

/// `HEAD_INSERTS` value, by the connection's client-side key: the `Set-Cookie` lines the
/// agent decided on when it opened the backend side, for XDP to put behind the status line
/// of the first response head. A head XDP cannot edit so (an interim or unknown status
/// line, a segment that would outgrow the client's MSS) goes to the agent, which edits it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct HeadInsert {
    pub lines: [u8; MAX_HEAD_INSERT],
    /// Bytes of `lines` used.
    pub len: u16,
    /// One's-complement sum of the lines' 16-bit words as they lie in memory.
    pub sum: u16,
    /// The largest segment payload the client takes (its MSS).
    pub max_payload: u16,
    /// Written by XDP when it inserts: the status line's length, inside which a segment the
    /// backend sends again cannot start.
    pub status_len: u16,
}
const _: () = assert!(size_of::<HeadInsert>() == MAX_HEAD_INSERT + 8);

/// Full NAT: seconds a closed flow keeps its source, for the last segments of its close.
pub const SOURCE_QUIET_AFTER_CLOSE_S: u32 = 2;
/// Full NAT: seconds without a packet after which a flow's source is free: a TCP flow that
/// never closed (its ends went away), a UDP flow (which never closes).
pub const SOURCE_IDLE_TCP_S: u32 = 3600;
pub const SOURCE_IDLE_UDP_S: u32 = 120;

/// Full NAT: whether the flow whose reverse entry is `held` has let its source go, at second
/// `now_s`. XDP and the agent claim sources by the same rule.
#[inline(always)]
pub fn source_is_free(held: &ReverseNat, proto: u8, now_s: u32) -> bool {
    let quiet = now_s.wrapping_sub(held.last_seen_s);
    if proto == PROTO_TCP {
        (held.flags & reverse_flags::CLOSING != 0 && quiet > SOURCE_QUIET_AFTER_CLOSE_S)
            || quiet > SOURCE_IDLE_TCP_S
    } else {
        quiet > SOURCE_IDLE_UDP_S
    }
}

/// `SYN_OPTIONS` value: what a client's SYN offered, kept until its handshake completes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SynOptions {
    pub mss: u16,
    /// The client's window scale, or [`NO_WINDOW_SCALE`].
    pub window_shift: u8,
    /// 1 when the client offered selective acknowledgements (SACK-permitted), else 0.
    pub sack_permitted: u8,
    /// 1 when the client offered timestamps (and the balancer answered with its own), else 0.
    pub timestamps: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<SynOptions>() == 8);

/// [`SynOptions::window_shift`] of a client that offered no window scaling.
pub const NO_WINDOW_SCALE: u8 = 0xff;

/// `BINDINGS` value: a client connection whose handshake the balancer completed, waiting for
/// the agent to open the backend side with the client's own sequence numbers and options.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Binding {
    /// The client's initial sequence number.
    pub client_isn: u32,
    /// The initial sequence number the balancer answered with (its SYN cookie).
    pub cookie_isn: u32,
    pub options: SynOptions,
    /// One of [`binding_state`].
    pub state: u32,
    /// Client segments handed to the agent so far, at most [`MAX_PUNTS_PER_BINDING`].
    pub punts: u32,
    /// Second (of `bpf_ktime_get_coarse_ns`) the handshake completed.
    pub accepted_s: u32,
}
const _: () = assert!(size_of::<Binding>() == 28);

impl Binding {
    /// No binding: what a punt record carries for a backend segment, or for a client segment
    /// whose binding XDP did not find.
    pub const NONE: Binding = Binding {
        client_isn: 0,
        cookie_isn: 0,
        options: SynOptions {
            mss: 0,
            window_shift: 0,
            sack_permitted: 0,
            timestamps: 0,
            _pad: [0; 3],
        },
        state: binding_state::NONE,
        punts: 0,
        accepted_s: 0,
    };
}

/// Client segments XDP hands the agent per connection being bound; later ones are dropped.
/// A request head of 16 KB (the most the agent reads) takes 12 full segments; the rest is
/// room for retransmissions and small segments, not for a trickle of single bytes.
pub const MAX_PUNTS_PER_BINDING: u32 = 64;

/// States of a [`Binding`].
pub mod binding_state {
    /// The handshake is done; the agent binds the connection.
    pub const ACCEPTED: u32 = 0;
    /// The balancer reset the connection (to make room, or for a client that did not take
    /// its answer): segments the client sends again are reset too, instead of completing
    /// the handshake anew from its still valid SYN cookie.
    pub const REFUSED: u32 = 1;
    /// In a punt record: XDP held no binding for the connection.
    pub const NONE: u32 = 2;
}

/// The MSS the balancer offers clients of cookie services; conservative, so segments fit any
/// backend path.
pub const COOKIE_MSS: u16 = 1400;
/// The window scale the balancer offers clients of cookie services (Linux's usual); backend
/// windows are rescaled to it when a backend announces another.
pub const COOKIE_WINDOW_SHIFT: u8 = 7;

/// `PUNTS` record: a frame the agent must see.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct Punt {
    /// One of [`punt_kind`].
    pub kind: u32,
    /// Bytes of `frame` that hold the frame (it is cut at [`PUNT_FRAME_SIZE`]).
    pub len: u32,
    /// A client segment's binding as XDP had it when it punted the segment (so the agent
    /// need not look it up); for a backend's SYN-ACK that XDP recorded as the splice, the
    /// binding it spliced with; else [`Binding::NONE`].
    pub binding: Binding,
    pub frame: [u8; PUNT_FRAME_SIZE],
}
const _: () = assert!(size_of::<Punt>() == 8 + size_of::<Binding>() + PUNT_FRAME_SIZE);

impl Punt {
    const FRAME_OFFSET: usize = core::mem::offset_of!(Punt, frame);
    const BINDING_OFFSET: usize = core::mem::offset_of!(Punt, binding);

    /// Bytes of a record that matter, from its start to its frame's end: the rest of a
    /// record's fixed size is not worth copying.
    pub fn used_len(record: &[u8]) -> usize {
        let len = record
            .get(4..8)
            .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize);
        (Self::FRAME_OFFSET + len.min(PUNT_FRAME_SIZE)).min(record.len())
    }

    /// A record's kind, binding and frame, read in place (`None` when it is cut short).
    pub fn parse(record: &[u8]) -> Option<(u32, Binding, &[u8])> {
        let kind = u32::from_ne_bytes(record.get(..4)?.try_into().ok()?);
        let binding = record.get(Self::BINDING_OFFSET..Self::FRAME_OFFSET)?;
        let frame = record.get(Self::FRAME_OFFSET..Self::used_len(record))?;
        Some((kind, bytemuck::pod_read_unaligned(binding), frame))
    }
}

/// Bytes of a punted frame kept: a full 1500-byte MTU frame with its Ethernet header.
pub const PUNT_FRAME_SIZE: usize = 1520;
/// Size of the `PUNTS` ring buffer.
pub const PUNT_RING_SIZE: u32 = 4 << 20;

/// `NEW_FLOW_SOURCES` record: the client of a new flow XDP placed, for the agent's tally of
/// the sources that open the most flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct NewFlowSource {
    pub client: Addr,
    pub backend_id: u32,
}
const _: () = assert!(size_of::<NewFlowSource>() == 20);

/// Size of the `NEW_FLOW_SOURCES` ring buffer: some 8,000 records, drained by the agent ten
/// times a second.
pub const NEW_FLOW_SOURCE_RING_SIZE: u32 = 256 << 10;

/// What a [`Punt`] carries.
pub mod punt_kind {
    /// A client segment of a connection that is not spliced yet.
    pub const CLIENT: u32 = 1;
    /// A backend segment of a connection the agent is opening (its SYN-ACK, or a reset), or
    /// data of a response head the agent edits.
    pub const BACKEND: u32 = 2;
    /// The backend's SYN-ACK that XDP recorded and answered with the replay itself: for
    /// the agent's books only.
    pub const REPLAYED: u32 = 3;
    /// The client's acknowledgement of the cookie lines XDP put into the first response
    /// head: XDP needs the agent no more for this connection. The frame itself went on.
    pub const HEAD_DELIVERED: u32 = 4;
}

/// Seconds a SYN cookie is issued for; an ACK is accepted for the current period and the one
/// before, so a cookie lives 64 to 128 seconds.
pub const COOKIE_PERIOD_S: u32 = 64;

/// `STATS` value (per CPU), indexed by [`Reason`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counter>() == 16);

/// `BACKEND_STATS` value (per CPU), indexed by backend id: what XDP forwarded to the backend
/// and back from it, the new flows it placed there, the cookies XDP issued for it and the
/// cookie connections XDP bound to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendCounters {
    pub to_backend: Counter,
    pub to_client: Counter,
    pub new_flows: u64,
    /// Cookie services: first response heads XDP put the balancer's cookie into (the agent
    /// counts those it edits).
    pub cookies_issued: u64,
    /// Cookie services: connections XDP bound to the backend without the agent (see
    /// [`KnownSession`]; the agent counts those it binds).
    pub bound: u64,
}
const _: () = assert!(size_of::<BackendCounters>() == 56);

/// Why a packet left the program the way it did: every exit counts under exactly one reason.
/// `NewFlow`, `NewSession`, `SessionMoved`, `PlacedWithoutAgent`, `ProxyHeaderInserted`,
/// `NewFlowSourceLost`, `CookieInserted` and `HeadDelivered` are events, counted in addition.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Client → VIP packet rewritten to its backend and redirected.
    Forwarded = 0,
    /// Backend → client reply rewritten back to the VIP and redirected.
    Replied,
    /// A client flow seen for the first time (also counted as `Forwarded` or `PassNoRoute`).
    NewFlow,
    /// `source-ip`: a client with no live affinity got a backend (an event, like `NewFlow`).
    NewSession,
    /// `source-ip`: a client's backend was down, so its affinity moved (an event).
    SessionMoved,
    /// TCP to a service with no usable backend, answered with a reset (XDP_TX).
    RefusedNoBackend,
    /// NAT-ed packet handed to the kernel stack because the FIB had no neighbour for it yet.
    PassNoRoute,
    /// NAT-ed packet whose TTL ran out, handed to the kernel stack to answer with ICMP.
    PassTtlExpired,
    /// Neither IPv4 nor IPv6 (ARP, LLDP, ...): the host's business.
    PassNotIp,
    /// 802.1Q/802.1ad tagged frame: not handled here, left to the host.
    PassVlan,
    /// IPv4 header with options: left to the host.
    PassIpOptions,
    /// IPv4 fragment, or IPv6 packet with a fragment header: left to the host.
    PassFragment,
    /// Neither TCP nor UDP.
    PassNotTcpUdp,
    /// TCP/UDP that is neither addressed to a VIP nor a reply of a known flow.
    PassNotService,
    /// Frame too short for the headers it claims.
    DropTruncated,
    /// IPv4 header with a bad version, header length or total length; IPv6 header with a
    /// bad version or a payload length beyond the frame.
    DropBadIpHeader,
    /// Non-TCP packet (or a TCP reset) for a service with no usable backend.
    DropNoBackend,
    /// Cookie service: a client SYN answered with a SYN cookie (XDP_TX).
    SynCookieSent,
    /// Cookie service: a client ACK that matches its SYN cookie; binding starts.
    HandshakeDone,
    /// Cookie service: an ACK of no connection whose cookie does not match, dropped.
    DropBadCookie,
    /// Cookie service: a segment handed to the agent (client data while binding, or the
    /// backend's answer to the agent's SYN).
    Punted,
    /// Cookie service: a segment the agent will not need (a pure ACK while binding, the
    /// backend's SYN-ACK of a connection XDP bound whose replay it could not send: the
    /// client sends its request again), dropped.
    DropWhileBinding,
    /// A segment that should have gone to the agent, dropped because the ring was full.
    DropPuntRingFull,
    /// Cookie service: a client segment forwarded on a spliced connection.
    SplicedToBackend,
    /// Cookie service: a backend segment forwarded on a spliced connection.
    SplicedToClient,
    /// Cookie service, no agent running: a new connection placed by XDP as a plain L4 flow
    /// by the cookie fallback (an event, like `NewFlow`).
    PlacedWithoutAgent,
    /// Cookie service, no agent running: a new connection, or one the agent was binding when
    /// it went, refused with a reset (XDP_TX).
    ResetWithoutAgent,
    /// A SYN-ACK or reset that could not be built: the frame could grow neither at its tail
    /// nor at its head.
    DropNoRoomForReply,
    /// Cookie service: a segment of a connection the balancer had reset, reset again.
    ResetRefused,
    /// Cookie service: a client segment of a connection being bound past its
    /// [`MAX_PUNTS_PER_BINDING`], dropped.
    DropPuntBudget,
    /// A packet matching a reply's 5-tuple that arrived on the client interface: forged.
    DropReplyFromClientSide,
    /// Cookie service: a connection that sent no request within the request timeout after
    /// its handshake, reset at its next segment.
    ResetNoRequest,
    /// IPv6 extension header other than hop-by-hop, routing and destination options (which
    /// are skipped), or more of those than the program walks: left to the host.
    PassIpv6Extension,
    /// Full NAT: a new TCP flow refused with a reset, every source port of its backend's
    /// network being taken.
    RefusedNoNatPort,
    /// Full NAT: a new non-TCP flow dropped, every source port being taken.
    DropNoNatPort,
    /// `proxy_protocol` L4 flow: a PROXY header put in front of the client's first data
    /// (an event, like `NewFlow`; again for each time the client sends that segment again).
    ProxyHeaderInserted,
    /// `proxy_protocol` L4 flow: a first data segment whose headers are too long to move
    /// (IPv6 extension headers) or whose frame could not grow, dropped.
    DropProxyHeader,
    /// A new flow the agent's tally of top sources misses: its ring was full, or no agent
    /// drains it (an event, like `NewFlow`).
    NewFlowSourceLost,
    /// `source-ip`: a new TCP flow of a session whose backend is down and held for
    /// (`on_backend_down` `keep` or `reject`), refused with a reset.
    RefusedBackendHeld,
    /// The same for a non-TCP flow, dropped.
    DropBackendHeld,
    /// Cookie service: XDP put the balancer's cookie lines into a first response head (an
    /// event, like `NewFlow`; again for each time the backend sends that segment again).
    CookieInserted,
    /// Cookie service: a backend segment sent again from inside the status line XDP put the
    /// cookie lines behind (which the client cannot have asked for), or from its start once
    /// the lines were evicted, dropped.
    DropInsideStatusLine,
    /// Cookie service: the backend's SYN-ACK turned into the acknowledgement that carries
    /// the client's request (XDP_TX).
    ReplayedByXdp,
    /// Cookie service: the client acknowledged the cookie lines XDP put in, and the agent
    /// was told so through its punt ring (an event, like `NewFlow`).
    HeadDelivered,
    /// Cookie service: a returning session's connection XDP bound itself from the agent's
    /// [`KnownSession`] of its client: the request went into `REPLAYS` and the segment,
    /// turned into the SYN, to the backend.
    BoundByXdp,
}

impl Reason {
    pub const COUNT: u32 = 45;
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::Forwarded,
        Reason::Replied,
        Reason::NewFlow,
        Reason::NewSession,
        Reason::SessionMoved,
        Reason::RefusedNoBackend,
        Reason::PassNoRoute,
        Reason::PassTtlExpired,
        Reason::PassNotIp,
        Reason::PassVlan,
        Reason::PassIpOptions,
        Reason::PassFragment,
        Reason::PassNotTcpUdp,
        Reason::PassNotService,
        Reason::DropTruncated,
        Reason::DropBadIpHeader,
        Reason::DropNoBackend,
        Reason::SynCookieSent,
        Reason::HandshakeDone,
        Reason::DropBadCookie,
        Reason::Punted,
        Reason::DropWhileBinding,
        Reason::DropPuntRingFull,
        Reason::SplicedToBackend,
        Reason::SplicedToClient,
        Reason::PlacedWithoutAgent,
        Reason::ResetWithoutAgent,
        Reason::DropNoRoomForReply,
        Reason::ResetRefused,
        Reason::DropPuntBudget,
        Reason::DropReplyFromClientSide,
        Reason::ResetNoRequest,
        Reason::PassIpv6Extension,
        Reason::RefusedNoNatPort,
        Reason::DropNoNatPort,
        Reason::ProxyHeaderInserted,
        Reason::DropProxyHeader,
        Reason::NewFlowSourceLost,
        Reason::RefusedBackendHeld,
        Reason::DropBackendHeld,
        Reason::CookieInserted,
        Reason::DropInsideStatusLine,
        Reason::ReplayedByXdp,
        Reason::HeadDelivered,
        Reason::BoundByXdp,
    ];

    /// Stable name used in logs, the stats line and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Forwarded => "forwarded",
            Reason::Replied => "replied",
            Reason::NewFlow => "new_flow",
            Reason::NewSession => "new_session",
            Reason::SessionMoved => "session_moved",
            Reason::RefusedNoBackend => "refused_no_backend",
            Reason::PassNoRoute => "pass_no_route",
            Reason::PassTtlExpired => "pass_ttl_expired",
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassVlan => "pass_vlan",
            Reason::PassIpOptions => "pass_ip_options",
            Reason::PassFragment => "pass_fragment",
            Reason::PassNotTcpUdp => "pass_not_tcp_udp",
            Reason::PassNotService => "pass_not_service",
            Reason::DropTruncated => "drop_truncated",
            Reason::DropBadIpHeader => "drop_bad_ip_header",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::SynCookieSent => "syn_cookie_sent",
            Reason::HandshakeDone => "handshake_done",
            Reason::DropBadCookie => "drop_bad_cookie",
            Reason::Punted => "punted",
            Reason::DropWhileBinding => "drop_while_binding",
            Reason::DropPuntRingFull => "drop_punt_ring_full",
            Reason::SplicedToBackend => "spliced_to_backend",
            Reason::SplicedToClient => "spliced_to_client",
            Reason::PlacedWithoutAgent => "placed_without_agent",
            Reason::ResetWithoutAgent => "reset_without_agent",
            Reason::DropNoRoomForReply => "drop_no_room_for_reply",
            Reason::ResetRefused => "reset_refused",
            Reason::DropPuntBudget => "drop_punt_budget",
            Reason::DropReplyFromClientSide => "drop_reply_from_client_side",
            Reason::ResetNoRequest => "reset_no_request",
            Reason::PassIpv6Extension => "pass_ipv6_extension",
            Reason::RefusedNoNatPort => "refused_no_nat_port",
            Reason::DropNoNatPort => "drop_no_nat_port",
            Reason::ProxyHeaderInserted => "proxy_header_inserted",
            Reason::DropProxyHeader => "drop_proxy_header",
            Reason::NewFlowSourceLost => "new_flow_source_lost",
            Reason::RefusedBackendHeld => "refused_backend_held",
            Reason::DropBackendHeld => "drop_backend_held",
            Reason::CookieInserted => "cookie_inserted",
            Reason::DropInsideStatusLine => "drop_inside_status_line",
            Reason::ReplayedByXdp => "replayed_by_xdp",
            Reason::HeadDelivered => "head_delivered",
            Reason::BoundByXdp => "bound_by_xdp",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Group {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for ReverseNat {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for BackendCounters {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for Affinity {}
    unsafe impl aya::Pod for SynOptions {}
    unsafe impl aya::Pod for Binding {}
    unsafe impl aya::Pod for CookieSecret {}
    unsafe impl aya::Pod for AgentState {}
    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for HeadInsert {}
    unsafe impl aya::Pod for Replay {}
    unsafe impl aya::Pod for KnownSessionKey {}
    unsafe impl aya::Pod for KnownSession {}
    unsafe impl aya::Pod for SessionStart {}
}

/// Hash of a 5-tuple that picks a new flow's slot in its service's backend table.
/// Shared so that the agent and tests can predict where a flow lands.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let ports = (u32::from(key.sport) << 16) | u32::from(key.dport);
    mix(addr_hash(&key.src) ^ mix(addr_hash(&key.dst) ^ mix(ports ^ u32::from(key.proto))))
}

/// Hash of a masked client address that picks a `source-ip` session's slot; hosts that share
/// a backend list agree on it without sharing state.
#[inline(always)]
pub fn client_hash(client: &Addr) -> u32 {
    mix(addr_hash(client) ^ 0x5bd1_e995)
}

/// Every bit of an address, folded into 32: the words of an IPv4-mapped address but the last
/// are constant, so an IPv4 address is hashed much as its word alone.
#[inline(always)]
fn addr_hash(addr: &Addr) -> u32 {
    let [a, b, c, d] = addr.words;
    d ^ mix(c ^ mix(b ^ mix(a)))
}

/// The murmur3 finaliser: every input bit affects every output bit.
#[inline(always)]
pub const fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(text: &str) -> Addr {
        Addr::from(text.parse::<core::net::IpAddr>().unwrap())
    }

    #[test]
    fn a_prefix_belongs_to_one_worker_and_prefixes_spread_over_all() {
        for workers in 1..=MAX_AGENT_WORKERS as u32 {
            let owner = worker_of(&client("198.18.7.1"), workers);
            assert!(owner < workers);
            assert_eq!(
                worker_of(&client("198.18.7.254"), workers),
                owner,
                "same /24"
            );
            let v6 = worker_of(&client("2001:db8:7::1"), workers);
            assert_eq!(
                worker_of(&client("2001:db8:7:ffff::2"), workers),
                v6,
                "same /48"
            );
            let mut per_worker = [0u32; MAX_AGENT_WORKERS];
            for third in 0..=255u32 {
                for second in 18..=19u32 {
                    let prefix = Addr::v4(u32::from_ne_bytes([198, second as u8, third as u8, 1]));
                    per_worker[worker_of(&prefix, workers) as usize] += 1;
                }
            }
            let per_worker = &per_worker[..workers as usize];
            // 512 prefixes: each worker within a third of its even share.
            let even = 512 / workers;
            assert!(
                per_worker.iter().all(|&n| n.abs_diff(even) <= even / 3),
                "{workers} workers: {per_worker:?}"
            );
        }
        assert_eq!(
            worker_of(&client("198.18.7.1"), 0),
            0,
            "no workers counts as one"
        );
    }

    #[test]
    fn reasons_are_indexed_by_their_value() {
        for (index, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index, "{}", reason.name());
        }
    }

    #[test]
    fn a_punt_record_is_read_in_place_up_to_its_frames_end() {
        let mut punt = Punt::zeroed();
        punt.kind = punt_kind::BACKEND;
        punt.len = 60;
        punt.binding = Binding::NONE;
        punt.frame[59] = 0xaa;
        let record = bytemuck::bytes_of(&punt);
        let used = Punt::used_len(record);
        assert_eq!(used, size_of::<Punt>() - PUNT_FRAME_SIZE + 60);
        let (kind, binding, frame) = Punt::parse(&record[..used]).unwrap();
        assert_eq!(
            (kind, binding.state, frame.len(), frame[59]),
            (punt_kind::BACKEND, binding_state::NONE, 60, 0xaa)
        );
        assert!(Punt::parse(&record[..3]).is_none(), "cut short");
        let (_, _, frame) = Punt::parse(&record[..used - 10]).unwrap();
        assert_eq!(
            frame.len(),
            50,
            "a frame cut short is what the record holds"
        );
    }
}
