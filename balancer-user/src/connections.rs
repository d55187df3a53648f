//! The entries of the cookie connections the agent binds: each connection's flow (client
//! side), reverse entry (backend side), binding and the cookie lines XDP puts into its first
//! response head. Every agent worker opens its own handles
//! on the pinned maps, so the workers write them without sharing anything in user space.

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use balancer_common::{
    binding_state, map_name, source_is_free, Binding, Flow, FlowKey, HeadInsert, Replay, ReverseNat,
};

use crate::dataplane::{monotonic_seconds, pin_dir};

pub struct ConnectionMaps {
    flows: HashMap<MapData, FlowKey, Flow>,
    reverse: HashMap<MapData, FlowKey, ReverseNat>,
    bindings: HashMap<MapData, FlowKey, Binding>,
    head_inserts: HashMap<MapData, FlowKey, HeadInsert>,
    replays: HashMap<MapData, FlowKey, Replay>,
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
        Ok(Self {
            flows: HashMap::try_from(open(map_name::FLOWS)?)?,
            reverse: HashMap::try_from(open(map_name::REVERSE)?)?,
            bindings: HashMap::try_from(open(map_name::BINDINGS)?)?,
            head_inserts: HashMap::try_from(open(map_name::HEAD_INSERTS)?)?,
            replays: HashMap::try_from(open(map_name::REPLAYS)?)?,
        })
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

    /// Leaves the cookie lines of a client connection's first response head for XDP.
    pub fn set_head_insert(&mut self, key: &FlowKey, lines: &HeadInsert) -> Result<()> {
        self.head_inserts
            .insert(key, lines, 0)
            .context("writing a response head's cookie lines")
    }

    /// Leaves the request a client connection's backend is to get for XDP, which sends it
    /// when the backend's SYN-ACK comes.
    pub fn set_replay(&mut self, key: &FlowKey, replay: &Replay) -> Result<()> {
        self.replays
            .insert(key, replay, 0)
            .context("writing a replay")
    }

    /// Removes the replay of a connection whose SYN-ACK the agent is to answer.
    pub fn remove_replay(&mut self, key: &FlowKey) {
        let _ = self.replays.remove(key);
    }

    /// Removes the cookie lines of a connection whose head XDP will not edit.
    pub fn remove_head_insert(&mut self, key: &FlowKey) {
        let _ = self.head_inserts.remove(key);
    }

    /// A client connection's flow entry.
    pub fn flow(&self, key: &FlowKey) -> Option<Flow> {
        self.flows.get(key, 0).ok()
    }

    /// A backend connection's reverse entry.
    pub fn reverse(&self, reply_key: &FlowKey) -> Option<ReverseNat> {
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
        let _ = self.reverse.remove(reply_key);
    }

    /// Writes a reverse entry.
    pub fn write_reverse(&mut self, reply_key: &FlowKey, nat: ReverseNat) -> Result<()> {
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
        self.remove_flow(key, reply_key);
        let refused = Binding {
            state: binding_state::REFUSED,
            ..binding
        };
        let _ = self.bindings.insert(key, refused, 0);
    }

    /// Forgets a client connection: its flow, its binding and (if any) its reverse entry.
    pub fn remove_connection(&mut self, key: &FlowKey, reply_key: Option<&FlowKey>) {
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
