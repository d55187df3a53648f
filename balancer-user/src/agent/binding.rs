//! Delayed binding for cookie services, the agent's half.
//!
//! XDP completed the client's handshake with a SYN cookie and hands over the client's data.
//! Once the request head is complete, [`placement`](super::placement) picks the backend from
//! its cookie.
//! The agent then opens the backend side with the client's own address, port, ISN and
//! options through a raw socket, XDP hands over the backend's SYN-ACK, and the agent records
//! the sequence offset, acknowledges the SYN-ACK with the buffered request bytes and leaves
//! the connection to XDP. This file is the state machine of those connections; the packets
//! go out through [`raw_socket`](super::raw_socket).

use std::{
    borrow::Cow,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::Result;
use balancer_common::{
    binding_state, csum, flow_flags, flow_state, proxy_v2, punt_kind, reverse_flags, Addr, Binding,
    Flow, FlowKey, HeadInsert, KnownSessionKey, Punt, Replay, ReverseNat, COOKIE_MSS,
    COOKIE_WINDOW_SHIFT, MAX_REPLAY, NO_WINDOW_SCALE,
};
use bytemuck::Zeroable;
use prometheus_client::metrics::histogram::Histogram;
use tracing::debug;

use super::{
    budget::{Budgets, Shed},
    counters::{Outcome, Tallies},
    known,
    placement::{choose, issue, unix_now, Asking, Cookie, Target, Unplaced},
    raw_socket::RawSockets,
    response::{Edit, Issue, Out, Response},
    worker::Worker,
};
use crate::{
    config::{Config, NatMode},
    connections::ConnectionMaps,
    http, rewrite,
    segment::{Segment, Timestamps, ACK, FIN, PSH, RST, SYN},
    throttle::throttled,
};

/// Request heads are collected up to this size; a larger head is placed by the fallback.
const MAX_HEAD: usize = 16 * 1024;
/// Full NAT: sources the agent tries for one connection before it gives up on it.
const SOURCE_CLAIM_TRIES: u32 = 64;
/// The backend's SYN-ACK is awaited this long before the SYN is sent again.
const SYN_RETRY: Duration = Duration::from_millis(500);
/// SYNs sent to one backend before the next one is tried.
const SYNS_PER_BACKEND: u32 = 3;
/// Backends tried for one connection before the client is reset.
const MAX_BACKENDS_TRIED: usize = 3;
/// A spliced connection is remembered this long, to answer a repeated SYN-ACK.
const SPLICED_MEMORY: Duration = Duration::from_secs(5);
/// The request replayed to the backend is checked for its acknowledgement this long after
/// it was sent, and sent again if it is missing, the wait doubling up to [`MAX_REPLAY_WAIT`].
const REPLAY_WAIT: Duration = Duration::from_millis(200);
const MAX_REPLAY_WAIT: Duration = Duration::from_secs(3);
/// A response head the agent edits is held at most this long: for the backend to answer
/// (a long poll), and for the client to acknowledge the edited head.
const RESPONSE_MEMORY: Duration = Duration::from_secs(300);

pub struct Binder {
    sockets: RawSockets,
    pending: foldhash::HashMap<FlowKey, Pending>,
    /// Each client's and prefix's share of `pending`.
    budgets: Budgets,
    limits: BindingLimits,
    /// Backend-side key of each connection being opened → its client-side key.
    by_backend: foldhash::HashMap<FlowKey, FlowKey>,
    /// The window scale each backend (by id) announced in its latest SYN-ACK: XDP splices
    /// with it, and most backends announce the same one every time.
    window_shift_of: foldhash::HashMap<u32, u8>,
    /// The backends (by id) whose latest SYN-ACK XDP recorded as the splice: only to those
    /// does XDP bind connections itself. A backend whose SYN-ACKs XDP cannot read (without
    /// timestamps where it looks for them) leaves those to the agent.
    recorded_by_xdp: foldhash::HashSet<u32>,
    /// The backends this worker left XDP cookie lines to start sessions with.
    session_starts: known::SessionStarts,
    /// Full NAT: sources handed out so far, which picks the next one to try.
    source_cursor: u32,
    /// Full NAT: where in the sources this worker starts, as (its index, the workers).
    source_share: (u32, u32),
    /// What it counted (`held` aside, which is `pending`'s size).
    tallies: Tallies,
    /// From a connection's first segment seen to its splice, for the metrics: one histogram
    /// all workers observe into.
    binding_latency: Histogram,
}

struct Pending {
    client: IpAddr,
    client_port: u16,
    vip: IpAddr,
    vip_port: u16,
    /// The id of the service its VIP and port had when it came.
    service: Option<u32>,
    binding: Binding,
    /// The client's bytes from its first sequence number on, without gaps.
    request: Vec<u8>,
    /// The client's latest window field (scaled as the backend will read it).
    window: u16,
    created: Instant,
    stage: Stage,
    tried: Vec<u32>,
    /// What the chosen backend's first response head gets, if anything.
    issue: Option<Issue>,
    /// The first response, while its head is read and until the client has the edited head.
    response: Option<Response>,
    /// Spliced: the reverse entry as the agent wrote it (the data plane only clears its
    /// `replay_end`, which the agent then clears here too).
    reverse: ReverseNat,
    /// When to check next that the backend acknowledged the replayed request, and how long
    /// to wait after that.
    replay_check: (Instant, Duration),
    /// Rewrite mode: the application's cookie whose prefix comes off the request before the
    /// backend gets it, and the bytes that removes.
    strip: Option<(String, u32)>,
    /// Full NAT: the balancer's address and port the backend sees the connection come from
    /// (gateway NAT: none, it sees the client's).
    source: Option<(IpAddr, u16)>,
    /// The PROXY protocol header sent to the backend before the request (empty: none).
    proxy_header: Vec<u8>,
    /// When the edited response head was first sent to the client.
    head_sent: Option<Instant>,
    /// The connection's timestamps, when its client uses them.
    clocks: Option<Clocks>,
    /// The cookie lines are in `HEAD_INSERTS`: XDP puts them into the first response head
    /// unless it passes that head to the agent.
    head_by_xdp: bool,
    /// The replay is in `REPLAYS`: XDP sends it when the backend's SYN-ACK comes, unless it
    /// passes that SYN-ACK to the agent.
    replay_by_xdp: bool,
    /// The agent acknowledged some of the request to the client, which then no longer sends
    /// all of it again.
    acknowledged: bool,
}

/// TCP timestamps of a cookie connection. The client sees the balancer's clock stand at the
/// TSval of its SYN-ACK until the splice, and go on from there with the backend's (XDP adds
/// `ReverseNat::ts_delta`); the backend sees the client's clock moved onto the balancer's as
/// it stood when the connection came (`to_backend`, XDP's `client_ts_delta`).
#[derive(Debug, Clone, Copy)]
struct Clocks {
    /// The client's latest TSval.
    client: u32,
    /// Added to the client's TSvals on the backend leg.
    to_backend: u32,
    /// The latest TSval the client had from the balancer, which it echoes.
    balancer: u32,
    /// The backend's latest TSval, once it answered with timestamps.
    backend: Option<u32>,
}

impl Clocks {
    /// Keeps the newer values of a client segment's timestamps.
    fn note_client(&mut self, timestamps: Timestamps) {
        if newer(timestamps.value, self.client) {
            self.client = timestamps.value;
        }
        if newer(timestamps.echo, self.balancer) {
            self.balancer = timestamps.echo;
        }
    }
}

/// Whether timestamp `a` is later than `b` (RFC 7323's modular comparison).
fn newer(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl Pending {
    /// The address and port the backend sees the connection come from.
    fn backend_side(&self) -> (IpAddr, u16) {
        self.source.unwrap_or((self.client, self.client_port))
    }

    /// The key of the session XDP may bind the client's next connections to this service by.
    fn known_session_key(&self) -> KnownSessionKey {
        KnownSessionKey::new(
            Addr::from(self.client),
            Addr::from(self.vip),
            self.vip_port.to_be(),
        )
    }

    /// Bytes by which the backend's stream of the client's data is shorter than the client's:
    /// what rewrite mode strips from the request, less the PROXY header put before it (so
    /// the backend's stream may be longer, and this wraps below zero).
    fn shortened(&self) -> u32 {
        let stripped = self.strip.as_ref().map_or(0, |(_, removed)| *removed);
        stripped.wrapping_sub(self.proxy_header.len() as u32)
    }

    /// The client's sequence number just past the bytes the agent has.
    fn next_client_seq(&self) -> u32 {
        self.binding
            .client_isn
            .wrapping_add(1)
            .wrapping_add(self.request.len() as u32)
    }

    /// The bytes the backend gets from the client's: the PROXY header before them, in
    /// rewrite mode the prefix stripped from the application's cookie.
    fn replayed(&self) -> Cow<'_, [u8]> {
        let request = match &self.strip {
            Some((name, _)) => Cow::Owned(rewrite::strip(&self.request, name).0),
            None => Cow::Borrowed(self.request.as_slice()),
        };
        if self.proxy_header.is_empty() {
            request
        } else {
            Cow::Owned([self.proxy_header.as_slice(), &request].concat())
        }
    }

    /// What XDP needs to send the replay in one segment in the agent's place, if it fits
    /// in one.
    fn replay_for_xdp(&self) -> Option<Replay> {
        let request = self.replayed();
        let mss = usize::from(self.binding.options.mss.clamp(536, COOKIE_MSS));
        if request.is_empty() || request.len() > mss.min(MAX_REPLAY) {
            return None;
        }
        let mut replay = Replay::zeroed();
        replay.bytes[..request.len()].copy_from_slice(&request);
        replay.len = request.len() as u16;
        replay.sum = csum::sum_words(&request);
        replay.window = self.window;
        if let Some(clocks) = self.clocks {
            replay.timestamps = 1;
            replay.tsval = clocks.client.wrapping_add(clocks.to_backend);
        }
        Some(replay)
    }

    /// Whether XDP is to edit the first response head, or has (the agent has no edit of it).
    fn head_in_xdp(&self) -> bool {
        self.head_by_xdp
            && self
                .response
                .as_ref()
                .is_some_and(|response| response.edit().is_none())
    }

    /// The backend and its ISN, once both legs are spliced.
    fn spliced(&self) -> Option<(Target, u32)> {
        match self.stage {
            Stage::Spliced {
                target,
                backend_isn,
                ..
            } => Some((target, backend_isn)),
            _ => None,
        }
    }

    /// A segment from the VIP to the client that acknowledges every byte read so far.
    fn to_client(&self, flags: u8, window: u16) -> Segment {
        Segment {
            src: self.vip,
            dst: self.client,
            sport: self.vip_port,
            dport: self.client_port,
            seq: self.binding.cookie_isn.wrapping_add(1),
            ack: self
                .binding
                .client_isn
                .wrapping_add(1)
                .wrapping_add(self.request.len() as u32),
            flags,
            window,
            timestamps: self.clocks.map(|clocks| Timestamps {
                value: clocks.balancer,
                echo: clocks.client,
            }),
            ..Segment::empty()
        }
    }
}

enum Stage {
    Reading,
    Connecting {
        target: Target,
        syn_sent: Instant,
        syns: u32,
    },
    Spliced {
        target: Target,
        backend_isn: u32,
        at: Instant,
    },
}

/// How much of the binding table connections may hold, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingLimits {
    pub capacity: usize,
    pub per_client: usize,
    pub per_prefix: usize,
    /// How long a client may take to acknowledge an edited response head.
    pub head_ack_timeout: Duration,
    /// How long a client may take to complete its request head.
    pub request_timeout: Duration,
}

impl Binder {
    /// Connections held now.
    pub fn held(&self) -> usize {
        self.pending.len()
    }

    pub fn set_limits(&mut self, limits: BindingLimits) {
        self.budgets
            .set_limits(limits.per_client, limits.per_prefix);
        self.limits = limits;
    }

    /// What it counted so far.
    pub fn tallies(&self) -> Tallies {
        Tallies {
            held: self.held(),
            ..self.tallies.clone()
        }
    }

    pub fn new(
        limits: BindingLimits,
        binding_latency: Histogram,
        source_share: (u32, u32),
    ) -> Result<Self> {
        Ok(Self {
            sockets: RawSockets::new()?,
            pending: foldhash::HashMap::default(),
            budgets: Budgets::new(limits.per_client, limits.per_prefix),
            limits,
            by_backend: foldhash::HashMap::default(),
            window_shift_of: foldhash::HashMap::default(),
            recorded_by_xdp: foldhash::HashSet::default(),
            session_starts: known::SessionStarts::default(),
            // Anywhere in the range: the data plane's CPUs start at its beginning.
            source_cursor: std::process::id().wrapping_mul(0x9e37_79b9),
            source_share,
            tallies: Tallies::default(),
            binding_latency,
        })
    }
}

impl Worker {
    /// Sends the packets the worker queued since the last call (after each batch of punts,
    /// tick or message).
    /// Writes the entries of the connections opened since the last call, then sends their
    /// SYNs and whatever else is queued. A connection whose entries the kernel refused is
    /// reset on both sides (the backend's reset follows its SYN).
    pub(super) fn flush_sends(&mut self) {
        for key in self.maps.take_refused() {
            self.abort(&key, false);
        }
        self.binder.sockets.flush();
    }

    /// Drops the spliced connections remembered for repeated SYN-ACKs, to make room for
    /// connections still being bound: at a few thousand new connections a second those
    /// memories alone fill the table, and new connections were refused. Response heads the
    /// agent still reads, or whose edit the client has not acknowledged, are kept.
    fn forget_spliced(&mut self) {
        let maps = &self.maps;
        let finished: Vec<FlowKey> = self
            .binder
            .pending
            .iter()
            .filter(|(key, pending)| left_to_xdp(maps, key, pending))
            .map(|(key, _)| *key)
            .collect();
        for key in finished {
            self.forget(&key);
        }
    }

    /// Makes room for a new connection of `client`: a source (address or /24) at its budget
    /// gives up its own oldest connection; a full table, the oldest of the prefix holding the
    /// most. Room is always made, so a new client of a quiet source is never refused.
    fn make_room(&mut self, client: IpAddr) {
        if let Some((oldest, why)) = self.binder.budgets.over_budget(&Addr::from(client)) {
            // The oldest is most often spliced and done with: forgetting it costs nothing,
            // resetting it could cut a response still on its way.
            let done = self
                .binder
                .pending
                .get(&oldest)
                .is_some_and(|pending| left_to_xdp(&self.maps, &oldest, pending));
            if done {
                self.forget(&oldest);
            } else {
                self.shed(&oldest, why);
            }
        }
        if self.binder.pending.len() >= self.binder.limits.capacity {
            self.forget_spliced();
        }
        while self.binder.pending.len() >= self.binder.limits.capacity {
            let Some(oldest) = self.binder.budgets.greediest_oldest() else {
                break;
            };
            self.shed(&oldest, Shed::TableFull);
        }
    }

    /// Resets a connection to make room for another.
    fn shed(&mut self, key: &FlowKey, why: Shed) {
        let counters = &mut self.binder.tallies.counters;
        match why {
            Shed::ClientBudget => counters.shed_client_budget += 1,
            Shed::PrefixBudget => counters.shed_prefix_budget += 1,
            Shed::TableFull => counters.shed_table_full += 1,
        }
        throttled!(warn, client = %key.src, port = u16::from_be(key.sport), ?why, "resetting a connection to make room");
        self.abort(key, false);
    }

    /// Handles one record of the punt ring.
    pub fn on_punt(&mut self, record: &[u8]) {
        self.binder.tallies.counters.punts_read += 1;
        let Some((kind, binding, frame)) = Punt::parse(record) else {
            return;
        };
        let Some(segment) = Segment::from_frame(frame) else {
            return;
        };
        match kind {
            punt_kind::CLIENT => self.on_client_segment(segment, binding),
            punt_kind::BACKEND => {
                let recorded = binding.state == binding_state::ACCEPTED;
                self.on_backend_segment(segment, recorded, false)
            }
            punt_kind::REPLAYED => self.on_backend_segment(segment, true, true),
            punt_kind::HEAD_DELIVERED => self.on_head_delivered(&segment.key()),
            _ => {}
        }
    }

    /// XDP's word that the client acknowledged the cookie lines XDP put in: the connection
    /// needs the agent no more, which would otherwise have looked at its flow to know.
    fn on_head_delivered(&mut self, key: &FlowKey) {
        let done = self
            .binder
            .pending
            .get(key)
            .is_some_and(|pending| pending.head_in_xdp() && pending.spliced().is_some());
        if done {
            self.forget(key);
        }
    }

    /// A client segment, with its connection's binding as XDP had it when it punted it.
    fn on_client_segment(&mut self, segment: Segment, binding: Binding) {
        let key = segment.key();
        // A refused connection's segment punted before XDP knew it was refused.
        let binding = Some(binding).filter(|b| b.state == binding_state::ACCEPTED);
        let reused = self.binder.pending.get(&key).is_some_and(|pending| {
            binding.is_some_and(|b| b.client_isn != pending.binding.client_isn)
        });
        if reused {
            // The client reused its port for a new connection while the old one was still
            // remembered: the old one is over.
            self.forget(&key);
        }
        if !self.binder.pending.contains_key(&key) {
            let Some(binding) = binding else {
                return;
            };
            self.make_room(segment.src);
            self.binder.budgets.add(key);
            let service = self
                .services
                .iter()
                .find(|s| s.config.vip == segment.dst && s.config.port == segment.dport)
                .map(|s| s.id);
            if let Some(service) = service {
                self.note_new_source(segment.src, service);
            }
            self.binder.pending.insert(
                key,
                Pending {
                    client: segment.src,
                    client_port: segment.sport,
                    vip: segment.dst,
                    vip_port: segment.dport,
                    service,
                    binding,
                    request: Vec::new(),
                    window: segment.window,
                    created: Instant::now(),
                    stage: Stage::Reading,
                    tried: Vec::new(),
                    issue: None,
                    response: None,
                    reverse: ReverseNat::default(),
                    replay_check: (Instant::now(), REPLAY_WAIT),
                    strip: None,
                    source: None,
                    proxy_header: Vec::new(),
                    head_sent: None,
                    clocks: None,
                    head_by_xdp: false,
                    replay_by_xdp: false,
                    acknowledged: false,
                },
            );
        }
        if segment.flags & RST != 0 {
            self.on_client_reset(&key, &segment);
            return;
        }
        let Some(pending) = self.binder.pending.get_mut(&key) else {
            return;
        };
        pending.window = segment.window;
        if let Some(timestamps) = segment.timestamps {
            match pending.clocks.as_mut() {
                Some(clocks) => clocks.note_client(timestamps),
                None if pending.binding.options.timestamps != 0 => {
                    let now = crate::dataplane::monotonic_milliseconds();
                    pending.clocks = Some(Clocks {
                        client: timestamps.value,
                        to_backend: now.wrapping_sub(timestamps.value),
                        balancer: timestamps.echo,
                        backend: None,
                    })
                }
                None => {}
            }
        }
        let offset = segment
            .seq
            .wrapping_sub(pending.binding.client_isn.wrapping_add(1)) as usize;
        // In order (or overlapping what we have): keep the new bytes. After a gap: the client
        // sends them again.
        let mut grew = false;
        if offset <= pending.request.len() && offset < MAX_HEAD * 4 {
            let new_from = pending.request.len() - offset;
            if new_from < segment.payload.len() {
                pending
                    .request
                    .extend_from_slice(&segment.payload[new_from..]);
                grew = true;
            }
        }
        match pending.stage {
            Stage::Reading => {
                self.try_bind(&key);
                // A complete head needs no acknowledgement of its own: the backend's reply
                // carries one. A partial head does, or the client stops at its window.
                if matches!(
                    self.binder.pending.get(&key).map(|p| &p.stage),
                    Some(Stage::Reading)
                ) {
                    self.acknowledge(&key);
                }
            }
            Stage::Spliced {
                target,
                backend_isn,
                ..
            } => {
                // Data that raced the splice: the backend may not have it yet.
                let pending = &self.binder.pending[&key];
                self.replay(pending, target, backend_isn);
            }
            // More than XDP would replay: the SYN-ACK comes to the agent, which replays it all.
            Stage::Connecting { .. } if grew && pending.replay_by_xdp => {
                pending.replay_by_xdp = false;
                self.maps.remove_replay(&key);
            }
            Stage::Connecting { .. } => {}
        }
        if segment.flags & FIN != 0 {
            self.on_client_fin(&key, &segment);
        }
    }

    /// RFC 5961 §3.2: a client reset acts only at exactly the next sequence number the
    /// balancer expects; one elsewhere in the window is answered with a challenge ACK (a
    /// genuine client then resets at the right number), one outside it is ignored. A blind
    /// attacker cannot end other clients' connections.
    fn on_client_reset(&mut self, key: &FlowKey, segment: &Segment) {
        let Some(next) = self.binder.pending.get(key).map(Pending::next_client_seq) else {
            return;
        };
        if segment.seq == next {
            debug!(client = %segment.src, port = segment.sport, "client reset during binding");
            self.abort(key, true);
        } else if in_window(segment.seq, next) {
            self.binder.tallies.counters.challenge_acks += 1;
            self.acknowledge(key);
        } else {
            self.binder.tallies.counters.out_of_window += 1;
        }
    }

    /// A FIN after the client's bytes (RFC 5961 §5: in order, or it is ignored). After a
    /// complete head it only ends the client's sending: the connection is bound, the FIN left
    /// unacknowledged, and the client's retransmission of it reaches the backend through the
    /// splice. Before the head is complete the request can never be read: the client is reset.
    fn on_client_fin(&mut self, key: &FlowKey, segment: &Segment) {
        let Some(pending) = self.binder.pending.get(key) else {
            return;
        };
        let fin_seq = segment.seq.wrapping_add(segment.payload.len() as u32);
        if fin_seq != pending.next_client_seq() {
            self.binder.tallies.counters.out_of_window += 1;
            return;
        }
        if matches!(pending.stage, Stage::Reading) {
            debug!(client = %segment.src, port = segment.sport, "client closed before its request head was complete");
            self.abort(key, false);
        }
    }

    /// Acknowledges the client's bytes while its head is read: a head longer than the client's
    /// initial congestion window (about 10 segments) would otherwise stall.
    fn acknowledge(&mut self, key: &FlowKey) {
        let Some(pending) = self.binder.pending.get_mut(key) else {
            return;
        };
        pending.acknowledged = true;
        let scaled = pending.binding.options.window_shift != NO_WINDOW_SCALE;
        let window = if scaled {
            u16::MAX >> COOKIE_WINDOW_SHIFT
        } else {
            u16::MAX
        };
        self.binder.sockets.send(&pending.to_client(ACK, window));
    }

    /// Chooses the backend once the request head is complete (or too large to wait for).
    fn try_bind(&mut self, key: &FlowKey) {
        let Some(pending) = self.binder.pending.get(key) else {
            return;
        };
        let head_complete = http::head_end(&pending.request).is_some();
        let too_large = pending.request.len() >= MAX_HEAD;
        if !head_complete && !too_large {
            return;
        }
        if too_large && !head_complete {
            let service = pending.service;
            self.binder.tallies.counters.count(
                Outcome::HeadTooLarge,
                service,
                &mut self.binder.tallies.outcomes_by_service,
            );
        }
        self.connect_next(key);
    }

    /// Sends a SYN to the next backend for a connection, or resets the client when there is
    /// none left to try.
    fn connect_next(&mut self, key: &FlowKey) {
        let Some(pending) = self.binder.pending.get(key) else {
            return;
        };
        let Some(service) = self.services.iter().find(|s| {
            s.config.vip == pending.vip
                && s.config.port == pending.vip_port
                && s.config.reads_requests()
        }) else {
            self.abort_quietly(key);
            return;
        };
        let choice = if pending.tried.len() >= MAX_BACKENDS_TRIED {
            Err(Unplaced::NoBackend)
        } else {
            let asking = Asking {
                key,
                client: pending.client,
                request: &pending.request,
                tried: &pending.tried,
            };
            choose(service, asking, &self.config.signing_keys, unix_now())
        };
        // Answered by the agent itself: no backend is to have the request.
        let answered = match choice {
            Err(Unplaced::Held { retry_after }) => {
                throttled!(info, client = %pending.client, service = %service.config.name, "the session's backend is down and the service holds its sessions: answered 503");
                let retry = format!("Retry-After: {retry_after}\r\n");
                Some((Outcome::BackendDown, "503 Service Unavailable", retry))
            }
            Err(Unplaced::NoRoute) => {
                throttled!(info, client = %pending.client, service = %service.config.name, "no route for the request: answered 404");
                Some((Outcome::NoRoute, "404 Not Found", String::new()))
            }
            _ => None,
        };
        if let Some((outcome, status, headers)) = answered {
            let service = service.id;
            self.binder.tallies.counters.count(
                outcome,
                Some(service),
                &mut self.binder.tallies.outcomes_by_service,
            );
            self.answer(key, status, &headers);
            return;
        }
        let service_id = service.id;
        let Ok(choice) = choice else {
            throttled!(warn, client = %pending.client, port = pending.client_port, tried = pending.tried.len(), "no backend took the connection: resetting the client");
            self.binder.tallies.counters.count(
                Outcome::Failed,
                Some(service.id),
                &mut self.binder.tallies.outcomes_by_service,
            );
            self.abort(key, false);
            return;
        };
        let (target, cookie) = (choice.target, &choice.cookie);
        if pending.tried.is_empty() {
            let outcome = match cookie {
                Cookie::Hashed(_) | Cookie::Session { .. } | Cookie::Away { .. } => {
                    Outcome::WithCookie
                }
                Cookie::Absent | Cookie::Rejected(_) => Outcome::ByFallback,
            };
            self.binder.tallies.counters.count(
                outcome,
                Some(service.id),
                &mut self.binder.tallies.outcomes_by_service,
            );
            if let &Cookie::Rejected(reason) = cookie {
                self.binder.tallies.counters.cookies_rejected[reason] += 1;
                *self
                    .binder
                    .tallies
                    .rejected_by_service
                    .entry((service.id, reason))
                    .or_default() += 1;
                throttled!(info, client = %pending.client, service = %service.config.name, %cookie, "balancer cookie refused: the request is placed as a new session");
            }
            if matches!(cookie, Cookie::Hashed(_) | Cookie::Session { .. }) {
                self.binder
                    .tallies
                    .last_cookie_choice
                    .insert(target.id, Instant::now());
                self.binder
                    .tallies
                    .recent_cookie_choices
                    .entry(target.id)
                    .or_default()
                    .add(u64::from(crate::dataplane::monotonic_seconds()));
            }
        } else {
            self.binder.tallies.counters.count(
                Outcome::Retried,
                Some(service.id),
                &mut self.binder.tallies.outcomes_by_service,
            );
        }
        debug!(
            client = %pending.client, port = pending.client_port, service = %service.config.name,
            cookie = %cookie, backend = %target.addr, attempt = pending.tried.len() + 1,
            "binding decision"
        );
        let full_nat = service.config.nat == NatMode::Full;
        let proxy_header = if service.config.proxy_protocol {
            let mut header = [0u8; proxy_v2::IPV6_LEN];
            let len = proxy_v2::write(
                &mut header,
                (Addr::from(pending.client), pending.client_port.to_be()),
                (Addr::from(pending.vip), pending.vip_port.to_be()),
            );
            header[..len].to_vec()
        } else {
            Vec::new()
        };
        // A source claimed for an earlier attempt goes back: the next one may be elsewhere.
        if let (
            Some(_),
            Stage::Connecting {
                target: earlier, ..
            },
        ) = (pending.source, &pending.stage)
        {
            self.maps.remove_reverse(&backend_key(pending, *earlier));
        }
        let client = (pending.client, pending.client_port);
        let source = if full_nat {
            let claimed = claim_source(
                &self.config,
                (&mut self.binder.source_cursor, self.binder.source_share),
                &mut self.maps,
                (target, key, client),
            );
            let Some(source) = claimed else {
                throttled!(warn, client = %client.0, backend = %target.addr, "every full NAT source port to the backend is taken: resetting the client");
                self.binder.tallies.counters.count(
                    Outcome::Failed,
                    Some(service.id),
                    &mut self.binder.tallies.outcomes_by_service,
                );
                self.abort(key, false);
                return;
            };
            Some(source)
        } else {
            None
        };
        let Some(pending) = self.binder.pending.get_mut(key) else {
            return;
        };
        pending.source = source;
        pending.proxy_header = proxy_header;
        pending.issue = issue(&choice, &self.config.signing_keys, &pending.request);
        pending.strip = choice.sessions.rewritten_cookie().and_then(|name| {
            let (_, removed) = rewrite::strip(&pending.request, name);
            (removed > 0).then(|| (name.to_owned(), removed as u32))
        });
        let lines = pending
            .issue
            .as_ref()
            .and_then(Issue::lines_for_xdp)
            .map(|lines| head_insert(&lines, pending.binding.options.mss));
        if let Some(lines) = &lines {
            self.maps.hold_head_insert(key, lines);
        }
        pending.head_by_xdp = lines.is_some();
        let replay = pending.replay_for_xdp();
        if let Some(replay) = &replay {
            self.maps.hold_replay(key, replay);
        }
        pending.replay_by_xdp = replay.is_some();
        // XDP binds by a known session, or starts one, only where the backend gets the
        // request as the client sent it, in one replay, and answers as XDP can record.
        let unchanged = pending.replay_by_xdp
            && self.binder.recorded_by_xdp.contains(&target.id)
            && pending.strip.is_none()
            && pending.proxy_header.is_empty()
            && pending.source.is_none()
            && pending.tried.is_empty();
        let known = (unchanged && pending.issue.is_none())
            .then(|| known::session(&choice, &pending.request, service.generation))
            .flatten();
        let start = lines
            .as_ref()
            .filter(|_| unchanged)
            .and_then(|lines| known::session_start(&choice, lines, service.generation));
        // Before the SYN leaves: the client's next connection may come as soon as this one's
        // answer.
        if let Some(session) = known {
            self.maps
                .remember_session(&pending.known_session_key(), &session);
        }
        if let Some(start) = start {
            self.binder
                .session_starts
                .start(&mut self.maps, target.id, &start);
        }
        let reply_key = backend_key(pending, target);
        let (flow, mut nat) = connection_entries(pending, target, flow_state::CONNECTING);
        if nat.client_window_shift != 0 {
            nat.backend_window_shift = self
                .binder
                .window_shift_of
                .get(&target.id)
                .copied()
                .unwrap_or(0);
        }
        pending.reverse = nat;
        self.maps.hold_connection(key, flow, &reply_key, nat);
        self.binder.by_backend.insert(reply_key, *key);
        let Some(pending) = self.binder.pending.get_mut(key) else {
            return;
        };
        pending.tried.push(target.id);
        pending.stage = Stage::Connecting {
            target,
            syn_sent: Instant::now(),
            syns: 1,
        };
        let syn = backend_syn(pending, target);
        self.binder.sockets.send(&syn);
        // Counted until the next walk of the flow table sees the connection.
        let placed = self.services.iter_mut().find(|s| s.id == service_id);
        if let Some(service) = placed.filter(|s| s.config.balance_factor.is_some()) {
            *service.loads.entry(target.id).or_default() += 1;
        }
    }

    /// A backend segment; `recorded` when it is the SYN-ACK whose splice XDP recorded, and
    /// `replayed` when XDP also answered it with the replay.
    fn on_backend_segment(&mut self, segment: Segment, recorded: bool, replayed: bool) {
        let known = self
            .binder
            .by_backend
            .get(&segment.key())
            .copied()
            .filter(|key| !self.superseded(key, &segment));
        let Some(key) = known.or_else(|| self.adopt(&segment)) else {
            return;
        };
        let Some(pending) = self.binder.pending.get(&key) else {
            return;
        };
        let (target, already) = match pending.stage {
            Stage::Connecting { target, .. } => (target, None),
            Stage::Spliced {
                target,
                backend_isn,
                ..
            } => (target, Some(backend_isn)),
            Stage::Reading => return,
        };
        if segment.flags & RST != 0 {
            // RFC 9293 §3.10.7.3: a reset answering our SYN acknowledges it; any other is
            // not the backend's (RFC 5961).
            let answers_syn = segment.flags & ACK != 0
                && segment.ack == pending.binding.client_isn.wrapping_add(1);
            if already.is_none() && !answers_syn {
                self.binder.tallies.counters.out_of_window += 1;
                return;
            }
            if already.is_none() {
                debug!(backend = %target.addr, "backend refused the connection: trying the next one");
                let client = pending.known_session_key();
                self.leave_backend_to_agent(&client, target.id);
                self.binder.by_backend.remove(&segment.key());
                self.connect_next(&key);
            }
            return;
        }
        if already.is_none() && segment.flags & (SYN | ACK) == ACK {
            // The backend still holds this tuple in TIME_WAIT (the client reused its port)
            // and neither our ISN nor our TSval is above the old connection's: it answers
            // with a bare ACK. The client's own stack would reset that and try again, and
            // so does the agent.
            self.binder.tallies.counters.time_wait_resets += 1;
            debug!(backend = %target.addr, client = %pending.client, port = pending.client_port, "backend answered the SYN from TIME_WAIT: resetting it and sending the SYN again");
            self.binder.sockets.send(&Segment {
                flags: RST,
                seq: segment.ack,
                window: 0,
                mss: None,
                window_shift: None,
                sack_permitted: false,
                timestamps: None,
                ..backend_syn(pending, target)
            });
            self.binder.sockets.send(&backend_syn(pending, target));
            return;
        }
        if already.is_some() && segment.flags & SYN == 0 {
            self.on_response_data(&key, &segment);
            return;
        }
        // A connection taken up from XDP, which sent its SYN and its request.
        if pending.request.is_empty() {
            return;
        }
        if segment.flags & (SYN | ACK) != SYN | ACK
            || segment.ack != pending.binding.client_isn.wrapping_add(1)
        {
            return;
        }
        if recorded {
            self.binder.recorded_by_xdp.insert(target.id);
        } else if self.binder.recorded_by_xdp.remove(&target.id) {
            self.binder.session_starts.stop(&mut self.maps, target.id);
        }
        let backend_isn = segment.seq;
        if already.is_none() {
            let delta = backend_isn.wrapping_sub(pending.binding.cookie_isn);
            let (mut flow, mut nat) = connection_entries(pending, target, flow_state::SPLICED);
            // The backend's first TSval becomes the last the client had from the balancer.
            match (pending.clocks, segment.timestamps) {
                (Some(clocks), Some(backend)) => {
                    flow.ts_delta = clocks.balancer.wrapping_sub(backend.value);
                    nat.ts_delta = flow.ts_delta;
                }
                _ => {
                    flow.flags &= !flow_flags::TIMESTAMPS;
                    nat.flags &= !reverse_flags::TIMESTAMPS;
                }
            }
            let flow = Flow {
                seq_delta: delta,
                ..flow
            };
            let backend_window_shift = if nat.client_window_shift != 0 {
                let shift = segment.window_shift.unwrap_or(0);
                self.binder.window_shift_of.insert(target.id, shift);
                shift
            } else {
                0
            };
            let nat = ReverseNat {
                backend_window_shift,
                // The first response head comes to the agent when it gets the cookie.
                state: if nat.flags & reverse_flags::HEAD_TO_AGENT != 0 {
                    flow_state::RESPONSE_HEAD
                } else {
                    flow_state::SPLICED
                },
                seq_delta: delta,
                // Where the head XDP edits starts.
                head_end: if nat.flags & reverse_flags::COOKIE_BY_XDP != 0 {
                    backend_isn.wrapping_add(1)
                } else {
                    0
                },
                ..nat
            };
            // XDP recorded the splice from what the agent wrote with the SYN; the agent
            // writes it only where XDP could not (the binding was gone, or the backend's
            // TSval was not where XDP looks), the request grew since (the replay ends
            // later), the backend announced another window scale or the client echoed a
            // later TSval of the balancer's.
            let written = pending.reverse;
            let current = recorded
                && written.replay_end == nat.replay_end
                && written.backend_window_shift == nat.backend_window_shift
                && written.ts_delta == pending.clocks.map_or(0, |clocks| clocks.balancer);
            // Having replayed, XDP checked the window scale; the backend may be answering
            // already, and a write now would undo what XDP records of its response.
            if !current && !replayed {
                if let Err(error) = self.maps.set_connection(&key, flow, &segment.key(), nat) {
                    throttled!(warn, "recording a spliced connection: {error:#}");
                    return;
                }
            }
            self.binder.tallies.counters.bound += 1;
            self.binder
                .binding_latency
                .observe(pending.created.elapsed().as_secs_f64());
            *self
                .binder
                .tallies
                .bound_by_backend
                .entry(target.id)
                .or_default() += 1;
            let pending = self.binder.pending.get_mut(&key).expect("looked up above");
            pending.reverse = nat;
            if replayed && !pending.acknowledged && pending.shortened() == 0 {
                // Lost, XDP's replay would not be lost for good: the client, its request not
                // acknowledged, sends it all again, and the backend its SYN-ACK. (Not so
                // with a PROXY header or a stripped cookie: the client's bytes are not the
                // backend's.)
                pending.reverse.replay_end = 0;
            }
            pending.replay_check = (Instant::now() + REPLAY_WAIT, REPLAY_WAIT);
            pending.response = pending.issue.take().map(Response::new);
        }
        let pending = self.binder.pending.get_mut(&key).expect("looked up above");
        pending.stage = Stage::Spliced {
            target,
            backend_isn,
            at: Instant::now(),
        };
        if let Some(mss) = segment.mss {
            pending.binding.options.mss = pending.binding.options.mss.min(mss);
        }
        if let (Some(clocks), Some(backend)) = (pending.clocks.as_mut(), segment.timestamps) {
            clocks.backend = Some(backend.value);
        }
        if !replayed {
            let pending = &self.binder.pending[&key];
            self.replay(pending, target, backend_isn);
        }
    }

    /// After `backend` refused or did not answer a SYN: XDP is to send neither `client`'s
    /// next connections there nor new sessions, until the agent sees XDP record one of its
    /// SYN-ACKs again.
    fn leave_backend_to_agent(&mut self, client: &KnownSessionKey, backend: u32) {
        self.maps.forget_session(client);
        self.binder.recorded_by_xdp.remove(&backend);
        self.binder.session_starts.stop(&mut self.maps, backend);
    }

    /// Whether the spliced connection the agent holds under `key` is over, a session XDP
    /// started on the same ports (the client reused its port) having taken its place: the
    /// backend's entry then holds another connection's offsets. The agent's connection is
    /// forgotten.
    fn superseded(&mut self, key: &FlowKey, segment: &Segment) -> bool {
        let Some((_, backend_isn)) = self.binder.pending.get(key).and_then(Pending::spliced) else {
            return false;
        };
        if segment.flags & SYN != 0 {
            return false;
        }
        let cookie_isn = self.binder.pending[key].binding.cookie_isn;
        let over = self.maps.reverse(&segment.key()).is_some_and(|nat| {
            nat.flags & reverse_flags::BOUND_BY_XDP != 0
                && nat.seq_delta.wrapping_add(nat.inserted) != backend_isn.wrapping_sub(cookie_isn)
        });
        if over {
            self.forget(key);
        }
        over
    }

    /// The connection of a session XDP started whose first response head XDP passed on, as
    /// it cannot put the lines into it (an interim or unknown status line, a segment the
    /// lines would make too long for the client): taken up from the maps, for the agent to
    /// edit the head as for the sessions it starts itself. Without the lines (evicted) or the
    /// backend (removed since), the head passes unedited: the client's next request starts
    /// its session.
    fn adopt(&mut self, segment: &Segment) -> Option<FlowKey> {
        let reply_key = segment.key();
        let nat = self.maps.reverse(&reply_key)?;
        let started = reverse_flags::BOUND_BY_XDP | reverse_flags::COOKIE_BY_XDP;
        let head_pending = nat.flags & started == started
            && nat.state == flow_state::RESPONSE_HEAD
            && nat.client_port == 0
            && segment.flags & SYN == 0;
        if !head_pending {
            return None;
        }
        let (vip, vip_port) = (IpAddr::from(nat.vip), u16::from_be(nat.port));
        let key = Segment {
            src: segment.dst,
            dst: vip,
            sport: segment.dport,
            dport: vip_port,
            ..Segment::empty()
        }
        .key();
        let Some((target, issue, mss, service)) =
            self.head_of_started(&key, (vip, vip_port), nat.backend_id)
        else {
            debug!(client = %segment.dst, port = segment.dport, "a session XDP started lost its cookie lines or backend: its response head passes unedited");
            let spliced = ReverseNat {
                state: flow_state::SPLICED,
                replay_end: 0,
                ..nat
            };
            if let Err(error) = self.maps.write_reverse(&reply_key, spliced) {
                throttled!(warn, "passing a response head on unedited: {error:#}");
            }
            return None;
        };
        let backend_isn = nat.head_end.wrapping_sub(1);
        // The binding as XDP accepted the handshake; the offset XDP recorded gives the SYN
        // cookie should the binding be gone.
        let cookie_isn = backend_isn.wrapping_sub(nat.seq_delta);
        let binding = self
            .maps
            .binding(&key)
            .filter(|b| b.cookie_isn == cookie_isn)
            .unwrap_or_else(|| {
                let mut binding = Binding::NONE;
                binding.cookie_isn = cookie_isn;
                binding.client_isn = segment.ack.wrapping_sub(1);
                binding.options.mss = mss;
                binding
            });
        // XDP moves the backend's timestamps by the entry's offsets; the agent's segments
        // to the client take them from the backend's as well.
        let clocks = (nat.flags & reverse_flags::TIMESTAMPS != 0).then(|| Clocks {
            client: 0,
            to_backend: nat.client_ts_delta,
            balancer: 0,
            backend: segment.timestamps.map(|t| t.value),
        });
        let now = Instant::now();
        debug!(client = %segment.dst, port = segment.dport, backend = %target.addr, "taking up a session XDP started, for its response head");
        self.make_room(segment.dst);
        self.binder.budgets.add(key);
        self.binder.pending.insert(
            key,
            Pending {
                client: segment.dst,
                client_port: segment.dport,
                vip,
                vip_port,
                service: Some(service),
                binding,
                request: Vec::new(),
                window: 0,
                created: now,
                stage: Stage::Spliced {
                    target,
                    backend_isn,
                    at: now,
                },
                tried: vec![target.id],
                issue: None,
                response: Some(Response::new(issue)),
                // The backend answered: it has the request.
                reverse: ReverseNat {
                    replay_end: 0,
                    ..nat
                },
                replay_check: (now + REPLAY_WAIT, REPLAY_WAIT),
                strip: None,
                source: None,
                proxy_header: Vec::new(),
                head_sent: None,
                clocks,
                head_by_xdp: true,
                replay_by_xdp: true,
                acknowledged: true,
            },
        );
        self.binder.by_backend.insert(reply_key, key);
        Some(key)
    }

    /// What the agent edits the first response head of a session XDP started with: its
    /// backend, the cookie lines XDP has for it, the client's MSS and the service's id.
    fn head_of_started(
        &self,
        key: &FlowKey,
        (vip, vip_port): (IpAddr, u16),
        backend_id: u32,
    ) -> Option<(Target, Issue, u16, u32)> {
        let lines = self.maps.head_insert(key)?;
        let service = self
            .services
            .iter()
            .find(|s| s.config.vip == vip && s.config.port == vip_port)?;
        let backend = service.backends.iter().find(|b| b.id == backend_id)?;
        let issue = Issue {
            lines: String::from_utf8(lines.lines.get(..usize::from(lines.len))?.to_vec()).ok()?,
            own: service.config.balancer_cookie()?.to_owned(),
            ..Issue::default()
        };
        Some((
            service.target(backend),
            issue,
            lines.max_payload,
            service.id,
        ))
    }

    /// Acknowledges the backend's SYN-ACK with the client's buffered bytes.
    fn replay(&self, pending: &Pending, target: Target, backend_isn: u32) {
        let mss = usize::from(pending.binding.options.mss.clamp(536, COOKIE_MSS));
        let first_seq = pending.binding.client_isn.wrapping_add(1);
        let (src, sport) = pending.backend_side();
        let template = Segment {
            src,
            dst: target.addr,
            sport,
            dport: target.port,
            seq: first_seq,
            ack: backend_isn.wrapping_add(1),
            flags: ACK,
            window: pending.window,
            timestamps: pending.clocks.and_then(|clocks| {
                Some(Timestamps {
                    value: clocks.client.wrapping_add(clocks.to_backend),
                    echo: clocks.backend?,
                })
            }),
            ..Segment::empty()
        };
        let request = pending.replayed();
        if request.is_empty() {
            self.binder.sockets.send(&template);
        }
        let chunks = request.chunks(mss).count();
        for (index, chunk) in request.chunks(mss).enumerate() {
            let segment = Segment {
                seq: first_seq.wrapping_add((index * mss) as u32),
                flags: if index + 1 == chunks { ACK | PSH } else { ACK },
                payload: chunk.to_vec(),
                ..template.clone()
            };
            self.binder.sockets.send(&segment);
        }
    }

    /// Backend data of a spliced connection whose first response head the agent edits (or
    /// edited, when it comes again).
    fn on_response_data(&mut self, key: &FlowKey, segment: &Segment) {
        let Some(pending) = self.binder.pending.get_mut(key) else {
            return;
        };
        let Some((target, backend_isn)) = pending.spliced() else {
            return;
        };
        let Some(response) = pending.response.as_mut() else {
            return;
        };
        let offset = segment.seq.wrapping_sub(backend_isn.wrapping_add(1)) as usize;
        if response.edit().is_some_and(|edit| offset < edit.head_end) {
            self.binder.tallies.counters.heads_resent += 1;
        }
        let (edit, outs) = response.on_segment(offset, &segment.payload, segment.flags & FIN != 0);
        let pending = &self.binder.pending[key];
        if let Some(edit) = edit {
            let inserted = edit.inserted() as u32;
            let response_start = pending.binding.cookie_isn.wrapping_add(1);
            let client_head_end = response_start.wrapping_add(edit.edited.len() as u32);
            let backend_head_end = backend_isn
                .wrapping_add(1)
                .wrapping_add(edit.head_end as u32);
            let reply_key = backend_key(pending, target);
            // The flow first: the client acknowledges the edited head only once it has it,
            // and the agent sends it after both entries know the edit.
            let recorded =
                self.maps
                    .update_connection(key, &reply_key, pending.reverse, |flow, nat| {
                        flow.inserted = inserted;
                        flow.head_end = client_head_end;
                        nat.state = flow_state::SPLICED;
                        // The backend answered: it has the request.
                        nat.replay_end = 0;
                        nat.seq_delta = nat.seq_delta.wrapping_sub(inserted);
                        nat.inserted = inserted;
                        nat.head_end = backend_head_end;
                    });
            let written = match recorded {
                Ok(written) => written,
                Err(error) => {
                    throttled!(warn, "recording an edited response head: {error:#}");
                    self.abort(key, false);
                    return;
                }
            };
            debug!(client = %pending.client, port = pending.client_port, inserted, "response head edited");
            if pending.head_by_xdp {
                // XDP passed the head on: its lines are not needed.
                self.maps.remove_head_insert(key);
            }
            if inserted > 0 {
                self.binder.tallies.counters.cookies_issued += 1;
                *self
                    .binder
                    .tallies
                    .issued_by_backend
                    .entry(target.id)
                    .or_default() += 1;
            }
            if let Some(pending) = self.binder.pending.get_mut(key) {
                pending.reverse = written;
                pending.head_by_xdp = false;
            }
        }
        let Some(pending) = self.binder.pending.get_mut(key) else {
            return;
        };
        if !outs.is_empty() && pending.head_sent.is_none() {
            pending.head_sent = Some(Instant::now());
        }
        let pending = &self.binder.pending[key];
        for out in outs {
            self.send_to_client(pending, segment, out);
        }
    }

    /// Sends bytes of the client's stream as the backend's segment `from` would reach it.
    fn send_to_client(&self, pending: &Pending, from: &Segment, out: Out) {
        let mss = usize::from(pending.binding.options.mss.clamp(536, COOKIE_MSS));
        let (backend_shift, client_shift) = (
            pending.reverse.backend_window_shift,
            pending.reverse.client_window_shift,
        );
        let bytes = u64::from(from.window) << (backend_shift & 15) >> (client_shift & 15);
        let first_seq = pending.binding.cookie_isn.wrapping_add(1);
        let to_client = pending.to_client(ACK, 0);
        let template = Segment {
            ack: from.ack.wrapping_add(pending.shortened()),
            window: bytes.min(u64::from(u16::MAX)) as u16,
            // As XDP moves the backend's timestamps.
            timestamps: to_client
                .timestamps
                .and(from.timestamps)
                .map(|backend| Timestamps {
                    value: backend.value.wrapping_add(pending.reverse.ts_delta),
                    echo: backend.echo.wrapping_sub(pending.reverse.client_ts_delta),
                }),
            ..to_client
        };
        let chunks = out.bytes.chunks(mss).count().max(1);
        for index in 0..chunks {
            let start = (index * mss).min(out.bytes.len());
            let end = (start + mss).min(out.bytes.len());
            let last = index + 1 == chunks;
            let mut flags = ACK;
            if last && end > start {
                flags |= PSH;
            }
            if last && out.fin {
                flags |= FIN;
            }
            if start == end && flags & FIN == 0 {
                continue;
            }
            self.binder.sockets.send(&Segment {
                seq: first_seq.wrapping_add((out.offset + start) as u32),
                flags,
                payload: out.bytes[start..end].to_vec(),
                ..template.clone()
            });
        }
    }

    /// Resends SYNs that got no answer, moves to the next backend, forgets finished and
    /// abandoned connections.
    pub fn binding_tick(&mut self) {
        let now = Instant::now();
        let mut retry = Vec::new();
        let mut next = Vec::new();
        let mut unacknowledged = Vec::new();
        let mut forget = Vec::new();
        let mut expire = Vec::new();
        let mut give_up = Vec::new();
        let mut recheck = Vec::new();
        for (key, pending) in &self.binder.pending {
            match pending.stage {
                Stage::Reading
                    if now.duration_since(pending.created) > self.binder.limits.request_timeout =>
                {
                    expire.push(*key)
                }
                Stage::Connecting { syn_sent, syns, .. }
                    if now.duration_since(syn_sent) > SYN_RETRY =>
                {
                    if syns < SYNS_PER_BACKEND {
                        retry.push(*key)
                    } else {
                        next.push(*key)
                    }
                }
                Stage::Spliced { at, .. } => {
                    let age = now.duration_since(at);
                    let replay_unconfirmed = pending.reverse.replay_end != 0;
                    if (replay_unconfirmed || pending.head_in_xdp())
                        && now >= pending.replay_check.0
                    {
                        recheck.push(*key);
                    }
                    match pending.response.as_ref().map(Response::edit) {
                        None if age > SPLICED_MEMORY
                            && (!replay_unconfirmed || age > RESPONSE_MEMORY) =>
                        {
                            forget.push(*key)
                        }
                        // Once the client has the edited head, none of it comes again (and
                        // the backend, sending data, had the handshake's last ACK).
                        Some(Some(edit)) if head_delivered(&self.maps, key, edit) => {
                            forget.push(*key)
                        }
                        Some(Some(_)) if age > RESPONSE_MEMORY => forget.push(*key),
                        // A client that does not take the head holds its place for nothing.
                        Some(Some(_))
                            if pending.head_sent.is_some_and(|sent| {
                                now.duration_since(sent) > self.binder.limits.head_ack_timeout
                            }) =>
                        {
                            unacknowledged.push(*key)
                        }
                        Some(None) if age > RESPONSE_MEMORY => give_up.push(*key),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        for key in retry {
            if let Some(pending) = self.binder.pending.get_mut(&key) {
                if let Stage::Connecting { target, syns, .. } = pending.stage {
                    pending.stage = Stage::Connecting {
                        target,
                        syn_sent: now,
                        syns: syns + 1,
                    };
                    let syn = backend_syn(pending, target);
                    self.binder.sockets.send(&syn);
                }
            }
        }
        for key in next {
            if let Some(pending) = self.binder.pending.get(&key) {
                if let Stage::Connecting { target, .. } = pending.stage {
                    debug!(backend = %target.addr, "backend did not answer: trying the next one");
                    let (reply_key, client) =
                        (backend_key(pending, target), pending.known_session_key());
                    self.binder.by_backend.remove(&reply_key);
                    self.leave_backend_to_agent(&client, target.id);
                }
            }
            self.connect_next(&key);
        }
        for key in recheck {
            self.check_spliced(&key, now);
        }
        for key in forget {
            self.forget(&key);
        }
        for key in give_up {
            // No response head in all that time (a long poll): the backend's data passes
            // unedited from now on; what it sent meanwhile it sends again, unacknowledged.
            let Some((reverse, head_by_xdp)) = self
                .binder
                .pending
                .get(&key)
                .map(|p| (p.reverse, p.head_by_xdp))
            else {
                continue;
            };
            if head_by_xdp {
                let inserted = self
                    .maps
                    .flow(&key)
                    .is_some_and(|flow| flow.flags & flow_flags::HEAD_BY_XDP != 0);
                if inserted {
                    // XDP put the lines in since the last look: the entries are its now.
                    self.forget(&key);
                    continue;
                }
                self.maps.remove_head_insert(&key);
            }
            if let Some(reply_key) = self.forget(&key) {
                let passing = ReverseNat {
                    state: flow_state::SPLICED,
                    ..reverse
                };
                if let Err(error) = self.maps.write_reverse(&reply_key, passing) {
                    throttled!(warn, "letting a response pass unedited: {error:#}");
                }
            }
        }
        for key in unacknowledged {
            self.binder.tallies.counters.head_unacknowledged += 1;
            debug!(client = %key.src, "the client did not acknowledge the edited response head in time: resetting the connection");
            self.abort(&key, false);
        }
        for key in expire {
            if let Some(pending) = self.binder.pending.get(&key) {
                throttled!(warn, client = %pending.client, port = pending.client_port, "request head not complete in time: resetting the client");
                let service = pending.service;
                self.binder.tallies.counters.count(
                    Outcome::Failed,
                    service,
                    &mut self.binder.tallies.outcomes_by_service,
                );
                self.abort(&key, false);
            }
        }
    }

    /// Looks again at a spliced connection the agent still waits on: forgets it once XDP
    /// put the cookie lines into its head and the client acknowledged them (resets it if
    /// the client takes too long), and sends the request to the backend again if it has not
    /// acknowledged it yet (a replay segment was lost on the way: the client, its bytes
    /// acknowledged by the agent, will not send them again).
    fn check_spliced(&mut self, key: &FlowKey, now: Instant) {
        let Some(pending) = self.binder.pending.get(key) else {
            return;
        };
        let Some((target, backend_isn)) = pending.spliced() else {
            return;
        };
        if pending.head_in_xdp() {
            let flags = self.maps.flow(key).map(|flow| flow.flags);
            let Some(flags) = flags else {
                // XDP forgot the connection: it ended.
                self.maps.remove_head_insert(key);
                self.forget(key);
                return;
            };
            if flags & flow_flags::HEAD_BY_XDP != 0 {
                if flags & flow_flags::HEAD_ACKED != 0 {
                    self.forget(key);
                    return;
                }
                let timeout = self.binder.limits.head_ack_timeout;
                let Some(pending) = self.binder.pending.get_mut(key) else {
                    return;
                };
                // The backend answered: it has the request.
                pending.reverse.replay_end = 0;
                let sent = *pending.head_sent.get_or_insert(now);
                if now.duration_since(sent) > timeout {
                    self.binder.tallies.counters.head_unacknowledged += 1;
                    debug!(client = %key.src, "the client did not acknowledge the response head in time: resetting the connection");
                    self.abort(key, false);
                    return;
                }
                pending.replay_check = (now + REPLAY_WAIT, REPLAY_WAIT);
                return;
            }
            if pending.reverse.replay_end == 0 {
                let Some(pending) = self.binder.pending.get_mut(key) else {
                    return;
                };
                let wait = pending.replay_check.1;
                pending.replay_check = (now + wait, (wait * 2).min(MAX_REPLAY_WAIT));
                return;
            }
        }
        let reply_key = backend_key(pending, target);
        let acknowledged = self
            .maps
            .reverse(&reply_key)
            .is_none_or(|nat| nat.replay_end == 0);
        if !acknowledged {
            debug!(client = %pending.client, port = pending.client_port, backend = %target.addr, "the backend has not acknowledged the request: sending it again");
            self.binder.tallies.counters.replays_resent += 1;
            self.replay(pending, target, backend_isn);
        }
        let Some(pending) = self.binder.pending.get_mut(key) else {
            return;
        };
        if acknowledged {
            pending.reverse.replay_end = 0;
        }
        if !acknowledged || pending.head_in_xdp() {
            let wait = pending.replay_check.1;
            pending.replay_check = (now + wait, (wait * 2).min(MAX_REPLAY_WAIT));
        }
    }

    /// Forgets a connection and resets the backend, if one was contacted, and the client,
    /// unless `client_reset` says the client reset it already.
    fn abort(&mut self, key: &FlowKey, client_reset: bool) {
        if let Some(pending) = self.binder.pending.get(key) {
            if !client_reset {
                self.binder.sockets.send(&pending.to_client(RST | ACK, 0));
            }
            if let Stage::Connecting { target, .. } | Stage::Spliced { target, .. } = pending.stage
            {
                let (src, sport) = pending.backend_side();
                self.binder.sockets.send(&Segment {
                    src,
                    dst: target.addr,
                    sport,
                    dport: target.port,
                    seq: pending.binding.client_isn.wrapping_add(1),
                    flags: RST,
                    ..Segment::empty()
                });
            }
        }
        self.abort_quietly(key);
    }

    /// Answers the client with a short HTTP response of the agent's own (`status` such as
    /// "404 Not Found", then `headers`, each line ending in CRLF) and its FIN; XDP resets
    /// whatever the client sends after it.
    fn answer(&mut self, key: &FlowKey, status: &str, headers: &str) {
        if let Some(pending) = self.binder.pending.get(key) {
            let body = format!("{status}\n");
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
                body.len()
            );
            let mut segment = pending.to_client(PSH | ACK | FIN, pending.window);
            segment.payload = response.into_bytes();
            self.binder.sockets.send(&segment);
        }
        self.abort_quietly(key);
    }

    fn abort_quietly(&mut self, key: &FlowKey) {
        let binding = self.binder.pending.get(key).map(|p| p.binding);
        if self.binder.pending.get(key).is_some_and(|p| p.head_by_xdp) {
            self.maps.remove_head_insert(key);
        }
        let reply_key = self.forget(key);
        match binding {
            Some(binding) => self
                .maps
                .refuse_connection(key, reply_key.as_ref(), binding),
            None => self.maps.remove_connection(key, reply_key.as_ref()),
        }
    }

    /// Drops what the agent holds of a connection (not its map entries); returns its
    /// backend-side key, if it had one.
    fn forget(&mut self, key: &FlowKey) -> Option<FlowKey> {
        self.binder.budgets.remove(key);
        let reply_key = self
            .binder
            .pending
            .remove(key)
            .and_then(|pending| match pending.stage {
                Stage::Connecting { target, .. } | Stage::Spliced { target, .. } => {
                    Some(backend_key(&pending, target))
                }
                Stage::Reading => None,
            });
        if let Some(reply_key) = &reply_key {
            self.binder.by_backend.remove(reply_key);
        }
        reply_key
    }
}

/// Whether `seq` lies in the receive window the agent advertises from `next` on (a window of
/// 65,535 bytes: the largest field, scaled or not).
fn in_window(seq: u32, next: u32) -> bool {
    seq.wrapping_sub(next) < u32::from(u16::MAX)
}

/// Whether a connection is spliced and needs the agent no more: the backend acknowledged the
/// replayed request, and there is no response head to edit or the client has the edited one.
/// Only memories for repeated SYN-ACKs remain of it.
fn left_to_xdp(maps: &ConnectionMaps, key: &FlowKey, pending: &Pending) -> bool {
    let Some((target, _)) = pending.spliced() else {
        return false;
    };
    if pending.head_in_xdp() {
        // Lines in the head mean the backend answered, so it has the request; once the
        // client acknowledged them XDP dropped them.
        let both = flow_flags::HEAD_BY_XDP | flow_flags::HEAD_ACKED;
        return maps.flow(key).is_some_and(|flow| flow.flags & both == both);
    }
    // Until the backend acknowledged the replayed request, only the agent would send it
    // again (XDP clears the replay's end in the reverse entry when it passes that ACK).
    let replayed = pending.reverse.replay_end == 0
        || maps
            .reverse(&backend_key(pending, target))
            .is_none_or(|nat| nat.replay_end == 0);
    replayed
        && pending.response.as_ref().is_none_or(|response| {
            response
                .edit()
                .is_some_and(|edit| head_delivered(maps, key, edit))
        })
}

/// Whether nothing of an edited response head can come back to the agent: the client has
/// acknowledged it, or the edit added nothing (XDP then passes the backend's bytes as they
/// are, sent again or not).
fn head_delivered(maps: &ConnectionMaps, key: &FlowKey, edit: &Edit) -> bool {
    edit.inserted() == 0 || !head_unacknowledged(maps, key)
}

/// Whether the client has yet to acknowledge all of a response head the agent edited.
fn head_unacknowledged(maps: &ConnectionMaps, key: &FlowKey) -> bool {
    maps.flow(key)
        .is_some_and(|flow| flow.flags & flow_flags::HEAD_ACKED == 0)
}

/// Full NAT: claims the balancer's address and port a connection to `target` comes from:
/// the next of its network's addresses and `nat_ports` in turn that no connection holds (a
/// `REVERSE` entry inserted only where none is settles it). Taking them in turn puts as
/// much time as the range allows between two uses of one source, which the backend may
/// still remember in TIME_WAIT.
/// The index in the space of the source a worker tries on its `turn`: every worker walks the
/// whole space (one client prefix, on one worker, may need all of it), each from its own
/// part of it, so two workers try the same source only when one has gone a whole part
/// ahead.
fn source_index(turn: u32, space: u32, (worker, workers): (u32, u32)) -> u32 {
    let start = u64::from(worker) * u64::from(space) / u64::from(workers.max(1));
    ((u64::from(turn % space) + start) % u64::from(space)) as u32
}

fn claim_source(
    config: &Config,
    (cursor, (worker, workers)): (&mut u32, (u32, u32)),
    maps: &mut ConnectionMaps,
    (target, key, (client, client_port)): (Target, &FlowKey, (IpAddr, u16)),
) -> Option<(IpAddr, u16)> {
    let (_, network) = config.source_network_of(target.addr)?;
    let addresses = &network.addresses;
    let count = addresses.len() as u32;
    let (port_first, ports) = config.nat_port_range()?;
    let space = count * u32::from(ports);
    if space == 0 {
        return None;
    }
    let reverse = ReverseNat {
        vip: key.dst,
        port: key.dport,
        state: flow_state::CONNECTING,
        client: Addr::from(client),
        client_port: client_port.to_be(),
        backend_id: target.id,
        ..ReverseNat::default()
    };
    for _ in 0..SOURCE_CLAIM_TRIES {
        let turn = *cursor;
        *cursor = turn.wrapping_add(1);
        let index = source_index(turn, space, (worker, workers));
        let source = addresses[(index % count) as usize];
        let port = port_first + (index / count) as u16;
        let reply_key = Segment {
            src: target.addr,
            dst: source,
            sport: target.port,
            dport: port,
            ..Segment::empty()
        }
        .key();
        match maps.claim_reverse(&reply_key, reverse) {
            Ok(true) => return Some((source, port)),
            Ok(false) => {}
            Err(error) => {
                throttled!(warn, "claiming a full NAT source: {error:#}");
                return None;
            }
        }
    }
    None
}

/// A connection's flow and reverse entries in `state`, with its addresses (the backend, and
/// in full NAT the source the backend sees and the client the replies go back to) and what
/// the splice needs that the agent knows when it sends the SYN: the bytes by which the
/// request is shortened, where the replay ends, the window scale the client was promised and
/// whether the first response head comes to the agent, and with timestamps the last TSval
/// the client had from the balancer. The backend's SYN-ACK adds its ISN, window scale and
/// TSval.
fn connection_entries(pending: &Pending, target: Target, state: u16) -> (Flow, ReverseNat) {
    let removed = pending.shortened();
    let replayed = (pending.request.len() as u32).wrapping_sub(removed);
    let replay_end = if replayed > 0 {
        pending
            .binding
            .client_isn
            .wrapping_add(1)
            .wrapping_add(replayed)
    } else {
        0
    };
    let client_scales = pending.binding.options.window_shift != NO_WINDOW_SCALE;
    let mut flow = Flow {
        backend_id: target.id,
        backend_addr: Addr::from(target.addr),
        backend_port: target.port.to_be(),
        state,
        removed,
        ..Flow::default()
    };
    let mut nat = ReverseNat {
        vip: Addr::from(pending.vip),
        port: pending.vip_port.to_be(),
        state,
        backend_id: target.id,
        client_window_shift: if client_scales {
            COOKIE_WINDOW_SHIFT
        } else {
            0
        },
        removed,
        replay_end,
        flags: match (&pending.issue, pending.head_by_xdp) {
            (Some(_), true) => reverse_flags::HEAD_TO_AGENT | reverse_flags::COOKIE_BY_XDP,
            (Some(_), false) => reverse_flags::HEAD_TO_AGENT,
            (None, _) => 0,
        } | if pending.replay_by_xdp {
            reverse_flags::REPLAY_BY_XDP
        } else {
            0
        },
        ..ReverseNat::default()
    };
    if let Some(clocks) = pending.clocks {
        // XDP makes the offset from this when it records the backend's SYN-ACK.
        flow.flags |= flow_flags::TIMESTAMPS;
        flow.ts_delta = clocks.balancer;
        nat.flags |= reverse_flags::TIMESTAMPS;
        nat.ts_delta = clocks.balancer;
        flow.client_ts_delta = clocks.to_backend;
        nat.client_ts_delta = clocks.to_backend;
    }
    if let Some((source, port)) = pending.source {
        flow.source = Addr::from(source);
        flow.source_port = port.to_be();
        nat.client = Addr::from(pending.client);
        nat.client_port = pending.client_port.to_be();
    }
    (flow, nat)
}

fn backend_key(pending: &Pending, target: Target) -> FlowKey {
    let (dst, dport) = pending.backend_side();
    Segment {
        src: target.addr,
        dst,
        sport: target.port,
        dport,
        ..Segment::empty()
    }
    .key()
}

/// What XDP needs to put `lines` into the head of a connection whose client takes segments
/// of up to `mss` bytes.
fn head_insert(lines: &[u8], mss: u16) -> HeadInsert {
    let mut insert = HeadInsert::zeroed();
    insert.lines[..lines.len()].copy_from_slice(lines);
    insert.len = lines.len() as u16;
    insert.sum = csum::sum_words(lines);
    insert.max_payload = mss.clamp(536, COOKIE_MSS);
    insert
}

/// The SYN that opens the backend side with the client's address, port, ISN, options and
/// clock.
fn backend_syn(pending: &Pending, target: Target) -> Segment {
    let options = pending.binding.options;
    let (src, sport) = pending.backend_side();
    Segment {
        src,
        dst: target.addr,
        sport,
        dport: target.port,
        seq: pending.binding.client_isn,
        ack: 0,
        flags: SYN,
        window: u16::MAX,
        mss: Some(options.mss),
        window_shift: (options.window_shift != NO_WINDOW_SCALE).then_some(options.window_shift),
        sack_permitted: options.sack_permitted != 0,
        timestamps: pending.clocks.map(|clocks| Timestamps {
            value: clocks.client.wrapping_add(clocks.to_backend),
            echo: 0,
        }),
        ..Segment::empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn each_worker_walks_all_full_nat_sources_from_a_part_of_its_own() {
        for (space, workers) in [(100_000, 2), (31_744, 3), (7, 8), (1, 1)] {
            let mut starts = HashSet::new();
            for worker in 0..workers {
                let walked: HashSet<u32> = (0..space)
                    .map(|turn| source_index(turn, space, (worker, workers)))
                    .collect();
                assert_eq!(walked.len() as u32, space, "worker {worker} of {workers}");
                assert!(walked.iter().all(|&index| index < space));
                starts.insert(source_index(0, space, (worker, workers)));
            }
            let parts = workers.min(space) as usize;
            assert_eq!(starts.len(), parts, "{workers} workers over {space}");
        }
    }
}
