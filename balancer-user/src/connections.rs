//! The entries of the cookie connections the agent binds: each connection's flow (client
//! side), reverse entry (backend side), binding, the request XDP replays to its backend and
//! the cookie lines XDP puts into its first response head. Every agent worker opens its own
//! handles on the pinned maps, so the workers write them without sharing anything in user
//! space.
//!
//! The entries of the connections a worker opens while it reads a batch of punts are held
//! and written with one `bpf()` call a map (`write_held`) before their SYNs leave: one call
//! a connection and map was most of the agent's system calls. Any other use of a held key
//! writes what is held first, so the maps are as if each entry had been written at once.

use std::{cell::RefCell, os::fd::AsFd, os::fd::OwnedFd, path::Path};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, Map, MapData};
use balancer_common::{
    binding_state, map_name, source_is_free, Binding, Flow, FlowKey, HeadInsert, KnownSession,
    KnownSessionKey, Replay, ReverseNat, SessionStart,
};
use bytemuck::{Pod, Zeroable};

use crate::{
    bpf,
    dataplane::{monotonic_seconds, pin_dir},
    throttle::throttled,
};

pub struct ConnectionMaps {
    flows: HashMap<MapData, FlowKey, Flow>,
    reverse: HashMap<MapData, FlowKey, ReverseNat>,
    bindings: HashMap<MapData, FlowKey, Binding>,
    head_inserts: HashMap<MapData, FlowKey, HeadInsert>,
    replays: HashMap<MapData, FlowKey, Replay>,
    known_sessions: HashMap<MapData, KnownSessionKey, KnownSession>,
    session_starts: Array<MapData, SessionStart>,
    held: RefCell<Held>,
}

/// The entries of the connections being opened, until [`ConnectionMaps::write_held`].
struct Held {
    /// `reverse` and `flows` hold the entries of `connections`, in its order.
    connections: Vec<FlowKey>,
    reverse: HeldWrites<ReverseNat>,
    flows: HeldWrites<Flow>,
    head_inserts: HeldWrites<HeadInsert>,
    replays: HeldWrites<Replay>,
    /// Client connections whose flow or reverse entry the kernel refused.
    refused: Vec<FlowKey>,
}

/// One map's held entries.
struct HeldWrites<V> {
    map: OwnedFd,
    keys: Vec<FlowKey>,
    values: Vec<V>,
}

impl<V: Pod> HeldWrites<V> {
    fn open(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(name);
        let map = bpf::open_pin(&path)
            .with_context(|| format!("opening the map pinned at {}", path.display()))?;
        Ok(Self {
            map,
            keys: Vec::new(),
            values: Vec::new(),
        })
    }

    fn hold(&mut self, key: FlowKey, value: V) {
        self.keys.push(key);
        self.values.push(value);
    }

    /// Writes the held entries, in one call unless the kernel refuses one: that one is
    /// skipped and the rest written. Returns the indices of the refused.
    fn write(&mut self, what: &str) -> Vec<usize> {
        let mut refused = Vec::new();
        let mut start = 0;
        while start < self.keys.len() {
            let keys = bytemuck::cast_slice(&self.keys[start..]);
            let values = bytemuck::cast_slice(&self.values[start..]);
            let count = (self.keys.len() - start) as u32;
            match bpf::update_batch(self.map.as_fd(), keys, values, count) {
                Ok(()) => break,
                Err((written, error)) => {
                    throttled!(warn, "writing {what}: {error}");
                    let index = start + written as usize;
                    refused.push(index);
                    start = index + 1;
                }
            }
        }
        self.keys.clear();
        self.values.clear();
        refused
    }
}

impl ConnectionMaps {
    /// Opens the maps an instance pinned.
    pub fn open(instance: &str) -> Result<Self> {
        let dir = pin_dir(instance);
        let open = |name: &str| -> Result<Map> {
            let path = dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening the map pinned at {}", path.display()))?;
            Ok(Map::from_map_data(data)?)
        };
        let held = Held {
            reverse: HeldWrites::open(&dir, map_name::REVERSE)?,
            flows: HeldWrites::open(&dir, map_name::FLOWS)?,
            connections: Vec::new(),
            head_inserts: HeldWrites::open(&dir, map_name::HEAD_INSERTS)?,
            replays: HeldWrites::open(&dir, map_name::REPLAYS)?,
            refused: Vec::new(),
        };
        Ok(Self {
            flows: HashMap::try_from(open(map_name::FLOWS)?)?,
            reverse: HashMap::try_from(open(map_name::REVERSE)?)?,
            bindings: HashMap::try_from(open(map_name::BINDINGS)?)?,
            head_inserts: HashMap::try_from(open(map_name::HEAD_INSERTS)?)?,
            replays: HashMap::try_from(open(map_name::REPLAYS)?)?,
            known_sessions: HashMap::try_from(open(map_name::KNOWN_SESSIONS)?)?,
            session_starts: Array::try_from(open(map_name::SESSION_STARTS)?)?,
            held: RefCell::new(held),
        })
    }

    /// Holds both directions of a client connection being opened, its flow entry
    /// (client-side key) and its reverse entry (backend-side key), for
    /// [`ConnectionMaps::write_held`]. Should the kernel refuse them then,
    /// [`ConnectionMaps::take_refused`] names the connection.
    pub fn hold_connection(&self, key: &FlowKey, flow: Flow, reply_key: &FlowKey, nat: ReverseNat) {
        let mut held = self.held.borrow_mut();
        held.reverse.hold(*reply_key, nat);
        held.connections.push(*key);
        held.flows.hold(*key, flow);
    }

    /// Holds the cookie lines of a client connection's first response head for XDP. Lines
    /// the kernel refuses are as if evicted: XDP passes the head to the agent.
    pub fn hold_head_insert(&self, key: &FlowKey, lines: &HeadInsert) {
        self.held.borrow_mut().head_inserts.hold(*key, *lines);
    }

    /// Holds the request a client connection's backend is to get for XDP, which sends it
    /// when the backend's SYN-ACK comes. A replay the kernel refuses is as if evicted: the
    /// SYN-ACK goes to the agent, which replays.
    pub fn hold_replay(&self, key: &FlowKey, replay: &Replay) {
        self.held.borrow_mut().replays.hold(*key, *replay);
    }

    /// Leaves XDP the session by which it binds the next connections of a client itself. One
    /// the kernel refuses only leaves those connections to the agent.
    pub fn remember_session(&mut self, client: &KnownSessionKey, session: &KnownSession) {
        if let Err(error) = self.known_sessions.insert(client, session, 0) {
            throttled!(warn, "leaving XDP a known session: {error}");
        }
    }

    /// Removes the session XDP binds a client's connections by.
    pub fn forget_session(&mut self, client: &KnownSessionKey) {
        let _ = self.known_sessions.remove(client);
    }

    /// Leaves XDP the cookie lines by which it starts sessions on backend `backend` itself.
    /// Lines the kernel refuses only leave those sessions to the agent.
    pub fn start_sessions(&mut self, backend: u32, start: &SessionStart) {
        if let Err(error) = self.session_starts.set(backend, start, 0) {
            throttled!(warn, "leaving XDP a backend's session start: {error}");
        }
    }

    /// Stops XDP starting sessions on backend `backend`.
    pub fn stop_sessions(&mut self, backend: u32) {
        let _ = self.session_starts.set(backend, SessionStart::zeroed(), 0);
    }

    /// Writes the held entries, one call a map. The reverse entries first: once a flow
    /// says where packets go, replies may come.
    fn write_held(&self) {
        let mut held = self.held.borrow_mut();
        let Held {
            reverse,
            flows,
            connections,
            head_inserts,
            replays,
            refused,
        } = &mut *held;
        if flows.keys.is_empty() && head_inserts.keys.is_empty() && replays.keys.is_empty() {
            return;
        }
        let mut failed = reverse.write("reverse entries");
        failed.extend(flows.write("flows"));
        failed.sort_unstable();
        failed.dedup();
        refused.extend(failed.into_iter().map(|index| connections[index]));
        connections.clear();
        head_inserts.write("cookie lines for XDP");
        replays.write("replays for XDP");
    }

    /// Writes the held entries if `key` (client or backend side) is among them.
    fn settle(&self, key: &FlowKey) {
        let held = self.held.borrow();
        let holds = held.connections.contains(key)
            || held.reverse.keys.contains(key)
            || held.head_inserts.keys.contains(key)
            || held.replays.keys.contains(key);
        drop(held);
        if holds {
            self.write_held();
        }
    }

    /// Writes the held entries and names the connections whose flow or reverse entry the
    /// kernel refused: they are to be reset.
    pub fn take_refused(&self) -> Vec<FlowKey> {
        self.write_held();
        std::mem::take(&mut self.held.borrow_mut().refused)
    }

    /// Writes both directions of a client connection: its flow entry (client-side key) and
    /// its reverse entry (backend-side key).
    pub fn set_connection(
        &mut self,
        key: &FlowKey,
        flow: Flow,
        reply_key: &FlowKey,
        nat: ReverseNat,
    ) -> Result<()> {
        // The reverse entry first: once the flow says where packets go, replies may come.
        self.write_reverse(reply_key, nat)?;
        self.flows.insert(key, flow, 0).context("writing a flow")
    }

    /// Removes the replay of a connection whose SYN-ACK the agent is to answer.
    pub fn remove_replay(&mut self, key: &FlowKey) {
        self.settle(key);
        let _ = self.replays.remove(key);
    }

    /// Removes the cookie lines of a connection whose head XDP will not edit.
    pub fn remove_head_insert(&mut self, key: &FlowKey) {
        self.settle(key);
        let _ = self.head_inserts.remove(key);
    }

    /// A client connection's flow entry.
    pub fn flow(&self, key: &FlowKey) -> Option<Flow> {
        self.settle(key);
        self.flows.get(key, 0).ok()
    }

    /// A client connection's binding.
    pub fn binding(&self, key: &FlowKey) -> Option<Binding> {
        self.bindings.get(key, 0).ok()
    }

    /// The cookie lines left for XDP to put into a client connection's first response head.
    pub fn head_insert(&self, key: &FlowKey) -> Option<HeadInsert> {
        self.settle(key);
        self.head_inserts.get(key, 0).ok()
    }

    /// A backend connection's reverse entry.
    pub fn reverse(&self, reply_key: &FlowKey) -> Option<ReverseNat> {
        self.settle(reply_key);
        self.reverse.get(reply_key, 0).ok()
    }

    /// Rewrites both entries of a spliced connection, the flow first: `change` gets the flow
    /// as the data plane has it now (it updates flags there) and the reverse entry as the
    /// agent last wrote it (the data plane changes only its `replay_end` there). Returns the
    /// reverse entry written.
    pub fn update_connection(
        &mut self,
        key: &FlowKey,
        reply_key: &FlowKey,
        mut nat: ReverseNat,
        change: impl FnOnce(&mut Flow, &mut ReverseNat),
    ) -> Result<ReverseNat> {
        let mut flow = self.flow(key).context("reading a flow")?;
        change(&mut flow, &mut nat);
        self.flows.insert(key, flow, 0).context("writing a flow")?;
        self.write_reverse(reply_key, nat)?;
        Ok(nat)
    }

    /// Full NAT: takes the source in `reply_key` for a connection whose reverse entry is
    /// `nat`, if no flow holds it (or the one that did has let it go); false if one does.
    pub fn claim_reverse(&mut self, reply_key: &FlowKey, mut nat: ReverseNat) -> Result<bool> {
        const NO_EXIST: u64 = 1;
        self.settle(reply_key);
        let now_s = monotonic_seconds();
        nat.last_seen_s = now_s;
        if let Ok(held) = self.reverse.get(reply_key, 0) {
            if !source_is_free(&held, reply_key.proto, now_s) {
                return Ok(false);
            }
            let _ = self.reverse.remove(reply_key);
        }
        // The data plane may claim it between the look and the insert: only one succeeds.
        Ok(self.reverse.insert(reply_key, nat, NO_EXIST).is_ok())
    }

    /// Removes a reverse entry.
    pub fn remove_reverse(&mut self, reply_key: &FlowKey) {
        self.settle(reply_key);
        let _ = self.reverse.remove(reply_key);
    }

    /// Writes a reverse entry.
    pub fn write_reverse(&mut self, reply_key: &FlowKey, nat: ReverseNat) -> Result<()> {
        self.settle(reply_key);
        self.reverse
            .insert(reply_key, nat, 0)
            .context("writing a reverse entry")
    }

    /// Forgets a client connection the balancer reset: its flow and (if any) its reverse
    /// entry go, and its binding stays as refused, so segments the client sends again are
    /// reset by XDP rather than starting a new binding from their still valid SYN cookie.
    pub fn refuse_connection(
        &mut self,
        key: &FlowKey,
        reply_key: Option<&FlowKey>,
        binding: Binding,
    ) {
        self.settle(key);
        self.remove_flow(key, reply_key);
        let refused = Binding {
            state: binding_state::REFUSED,
            ..binding
        };
        let _ = self.bindings.insert(key, refused, 0);
    }

    /// Forgets a client connection: its flow, its binding and (if any) its reverse entry.
    pub fn remove_connection(&mut self, key: &FlowKey, reply_key: Option<&FlowKey>) {
        self.settle(key);
        self.remove_flow(key, reply_key);
        let _ = self.bindings.remove(key);
    }

    /// Removes a client connection's flow and (if any) its reverse entry.
    fn remove_flow(&mut self, key: &FlowKey, reply_key: Option<&FlowKey>) {
        let _ = self.flows.remove(key);
        if let Some(reply_key) = reply_key {
            self.remove_reverse(reply_key);
        }
    }
}
