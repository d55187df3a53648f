//! A returning session's connection bound by XDP alone. When the agent binds a connection
//! by a genuine balancer cookie that needs no new one (or an application cookie's hashed
//! value), it leaves a `KnownSession` for the client: the cookie's bytes and the backend. A
//! later connection of that client whose first segment starts its request and holds the whole
//! head, with the same cookie bytes where their first four first appear, goes to the same
//! backend without the agent, while the service is as the agent saw it (its generation): XDP
//! keeps the request in `REPLAYS`, writes the connection's entries as the agent would and
//! turns the segment into the SYN that opens the backend side; the backend's SYN-ACK is then
//! answered by `replay` as for the agent's connections. Until then the connection's segments
//! are XDP's (see `while_opening`, `unanswered`). Anything else (another cookie, a backend no
//! longer up, a service changed, a decision past its time, a head in several segments) goes
//! to the agent.
//!
//! It is a program of its own, `balancer_bind`, reached by a tail call with the parsed
//! packet in `COOKIE_HANDOFF`: the main program's stack is spent.

use aya_ebpf::{helpers::bpf_xdp_load_bytes, programs::XdpContext};
use balancer_common::{
    backend_state, binding_state, flow_flags, flow_state,
    proto::{
        tcp_field,
        tcp_flag::{FIN, RST, SYN},
    },
    punt_kind, reverse_flags, Addr, Backend, Binding, Flow, FlowKey, KnownSession, KnownSessionKey,
    Reason, Replay, ReverseNat, Service, ServiceKey, SessionStart, COOKIE_MSS, COOKIE_WINDOW_SHIFT,
    MAX_KNOWN_COOKIE, MAX_REPLAY, NO_WINDOW_SCALE, PROTO_TCP,
};
use network_types::eth::EthHdr;

use crate::{
    choose, forward,
    maps::{
        BACKENDS, BINDINGS, BIND_PROGRAM, FLOWS, HEAD_INSERTS, KNOWN_SESSIONS, REPLAYS,
        REPLAY_SCRATCH, REVERSE, SERVICES, SESSION_STARTS,
    },
    nat::seconds_now,
    packet::{self, ptr_at, Packet},
    punt, reply, splice,
    stats::{self, Verdict},
    synack::{self, Handshake, SYN_TCP_LEN, SYN_TCP_LEN_TIMESTAMPS},
    tcp_options,
};

/// The end of a request head.
const HEAD_END: [u8; 4] = *b"\r\n\r\n";
/// The bytes of a known session's cookie (`name=value`) searched for in a request, of its
/// name; the rest is compared where they are.
const COOKIE_PREFIX: usize = 4;

/// Passes a client's data segment of a connection being bound on to `balancer_bind`
/// (the first one, or any while XDP opens the backend side); returns only if that program is
/// missing, and the segment then goes where it would without it.
#[inline(always)]
pub fn hand_off(ctx: &XdpContext, packet: &Packet) {
    if packet.payload_len > 0 && packet.tcp_flags & (SYN | FIN | RST) == 0 {
        splice::hand_off(ctx, packet, &BIND_PROGRAM);
    }
}

/// `balancer_bind`: the segment bound by XDP, or handed to the agent.
#[inline(always)]
pub fn connect(ctx: &XdpContext) -> Verdict {
    let Some(packet) = splice::handed_off() else {
        return Verdict::drop(Reason::DropTruncated);
    };
    // SAFETY: map values stay valid for the duration of the program; the copy is taken at
    // once.
    let binding = unsafe { BINDINGS.get(&packet.key) }.map_or(Binding::NONE, |b| *b);
    let first = splice::read_u32(ctx, packet.tcp_field(tcp_field::SEQ))
        .is_ok_and(|seq| seq == binding.client_isn.wrapping_add(1));
    match opening(&packet.key) {
        // The request sent again: XDP's SYN, the backend's SYN-ACK or the replay was lost, or
        // the backend does not answer. The agent, which times its SYNs and tries the next
        // backend, opens the backend side anew over the entries.
        Some(backend_id) if first => {
            let key = &packet.key;
            let started = HEAD_INSERTS.get_ptr(key).is_some();
            stop_binding_by(key.src, key.dst, key.dport, backend_id, started);
        }
        Some(_) => return Verdict::drop(Reason::DropWhileBinding),
        None if binding.state == binding_state::ACCEPTED && first => {
            if let Some(verdict) = bind(ctx, &packet, &binding) {
                return verdict;
            }
        }
        None => {}
    }
    punt::punt(ctx, punt_kind::CLIENT, &packet.key.src, &binding)
}

/// A client segment of a connection XDP is opening the backend side of: its request sent
/// again goes to the agent (see `connect`); anything else is dropped, for the client to send
/// again once the legs are spliced. The agent holds nothing of the connection to add it to.
#[inline(always)]
pub fn while_opening(ctx: &XdpContext, packet: &Packet) -> Verdict {
    hand_off(ctx, packet);
    Verdict::drop(Reason::DropWhileBinding)
}

/// A backend's answer to XDP's SYN that XDP cannot record as the splice (a reset, an
/// acknowledgement from TIME_WAIT, a SYN-ACK without its timestamps where XDP reads them):
/// XDP forgets the session it bound by, or stops starting sessions on that backend, so the
/// client's next try, its request sent again, goes to the agent, which handles such answers.
#[inline(always)]
pub fn unanswered(packet: &Packet, nat: &ReverseNat) -> Verdict {
    let started = nat.flags & reverse_flags::COOKIE_BY_XDP != 0;
    let client = *splice::client_of(packet, nat);
    stop_binding_by(client, nat.vip, nat.port, nat.backend_id, started);
    Verdict::drop(Reason::DropWhileBinding)
}

/// Stops XDP binding by what it bound a connection of `client` to the service at `vip` and
/// `port` by: the client's known session, or the session start on `backend_id` when the
/// connection `started` a session.
#[inline(always)]
fn stop_binding_by(client: Addr, vip: Addr, port: u16, backend_id: u32, started: bool) {
    if started {
        if let Some(start) = SESSION_STARTS.get_ptr_mut(backend_id) {
            // SAFETY: map values stay valid for the duration of the program.
            unsafe { (*start).until_s = 0 };
        }
    } else {
        let _ = KNOWN_SESSIONS.remove(&KnownSessionKey::new(client, vip, port));
    }
}

/// The backend XDP is opening the backend side of the connection to, if it is (see
/// `while_opening`).
#[inline(always)]
fn opening(key: &FlowKey) -> Option<u32> {
    let flow = FLOWS.get_ptr(key)?;
    // SAFETY: map values stay valid for the duration of the program.
    let (flags, state, backend_id) = unsafe { ((*flow).flags, (*flow).state, (*flow).backend_id) };
    (flags & flow_flags::BOUND_BY_XDP != 0 && state == flow_state::CONNECTING).then_some(backend_id)
}

/// Binds the connection from its client's known session, or starts a session on the backend
/// its cookie fallback names when the request carries no cookie of the service's name, if
/// the segment allows: the verdict of its SYN to the backend, `None` (the frame untouched) to
/// leave it to the agent.
#[inline(always)]
fn bind(ctx: &XdpContext, packet: &Packet, binding: &Binding) -> Option<Verdict> {
    let key = &packet.key;
    // (The keys in blocks of their own: the stack is short.)
    let service = {
        let service = ServiceKey {
            vip: key.dst,
            port: key.dport,
            proto: key.proto,
            _pad: 0,
        };
        // SAFETY: map values stay valid for the duration of the program.
        unsafe { SERVICES.get(&service)? }
    };
    let now_s = seconds_now();
    let known = known_session(key, service.generation, now_s);
    // A returning session's connection needs no session start: looked up only without one.
    let start = match known {
        Some(_) => None,
        None => session_start(service, key, now_s),
    };
    let prefix = match (known, start) {
        // SAFETY: map values stay valid for the duration of the program.
        (Some((session, _)), _) => unsafe { cookie_prefix(&(*session).cookie) },
        (None, Some((_, start))) => unsafe { (*start).name_prefix },
        (None, None) => return None,
    };
    let request = REPLAY_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the entry is this CPU's, and only this program run touches it.
    let request = unsafe { &mut *request };
    let mss = binding.options.mss.clamp(536, COOKIE_MSS);
    read_request(ctx, packet, usize::from(mss).min(MAX_REPLAY), request)?;
    let at = find(request, prefix);
    // SAFETY: as above.
    let carried = known.filter(|(session, _)| carries(request, unsafe { &**session }, at));
    let (backend_id, lines) = match carried {
        Some((_, backend_id)) => (backend_id, None),
        None => {
            // Another client behind the known session's address, without the cookie.
            let (backend_id, start) = match start {
                Some(start) => start,
                None => session_start(service, key, now_s)?,
            };
            // SAFETY: as above.
            if at.is_some() || unsafe { (*start).name_prefix } != prefix {
                return None;
            }
            (backend_id, Some(start))
        }
    };
    let backend = BACKENDS.get(backend_id)?;
    if backend.state != backend_state::UP {
        return None;
    }
    let window: *const [u8; 2] = ptr_at(ctx, packet.tcp_field(tcp_field::WINDOW))?;
    // SAFETY: `ptr_at` checked that the field lies inside the frame.
    request.window = u16::from_be_bytes(unsafe { *window });
    let timestamps = if binding.options.timestamps != 0 {
        let tsval_at = tcp_options::timestamps_at(ctx, packet)?;
        let read = |at| splice::read_u32(ctx, at).ok();
        Some((read(tsval_at)?, read(tsval_at + 4)?))
    } else {
        None
    };
    let opened = Opened {
        key,
        binding,
        backend,
        backend_id,
        now_ms: synack::milliseconds(),
        timestamps,
        starts_session: lines.is_some(),
    };
    if let Some(start) = lines {
        opened.leave_lines(start, mss)?;
    }
    opened.leave_replay(request)?;
    opened.write_entries(now_s, request.len)?;
    Some(opened.send_syn(ctx, packet))
}

/// The client's known session on the service, while it holds for the service's `generation`
/// at `now_s`, and its backend (read at once: an entry the agent replaces meanwhile may be
/// reused for another).
#[inline(always)]
fn known_session(key: &FlowKey, generation: u32, now_s: u32) -> Option<(*const KnownSession, u32)> {
    let client = KnownSessionKey::new(key.src, key.dst, key.dport);
    let session = KNOWN_SESSIONS.get_ptr(&client)?;
    // SAFETY: map values stay valid for the duration of the program.
    let (backend_id, until_s, known_generation) = unsafe {
        (
            (*session).backend_id,
            (*session).until_s,
            (*session).generation,
        )
    };
    let holds = until_s.wrapping_sub(now_s) as i32 > 0 && known_generation == generation;
    holds.then_some((session, backend_id))
}

/// The backend the service's cookie fallback places the connection on, and the lines that
/// start a session there, while the agent's issue of them holds for the service's
/// generation at `now_s`.
#[inline(always)]
fn session_start(service: &Service, key: &FlowKey, now_s: u32) -> Option<(u32, *mut SessionStart)> {
    let backend_id = choose::fallback_backend(service, key).ok()?;
    let start = SESSION_STARTS.get_ptr_mut(backend_id)?;
    // SAFETY: map values stay valid for the duration of the program.
    let (until_s, generation, len) =
        unsafe { ((*start).until_s, (*start).generation, (*start).lines.len) };
    let holds =
        until_s.wrapping_sub(now_s) as i32 > 0 && generation == service.generation && len != 0;
    holds.then_some((backend_id, start))
}

/// The first [`COOKIE_PREFIX`] bytes of a known session's cookie.
#[inline(always)]
fn cookie_prefix(cookie: &[u8; MAX_KNOWN_COOKIE]) -> [u8; COOKIE_PREFIX] {
    [cookie[0], cookie[1], cookie[2], cookie[3]]
}

/// Copies the segment's payload into `request` when it is one whole request head of at most
/// `max_len` bytes, with the sum of its words.
#[inline(always)]
fn read_request(
    ctx: &XdpContext,
    packet: &Packet,
    max_len: usize,
    request: &mut Replay,
) -> Option<()> {
    let len = packet.payload_len;
    if len < HEAD_END.len() || len > max_len {
        return None;
    }
    let len = len.clamp(HEAD_END.len(), MAX_REPLAY);
    let payload_at = packet.l4_offset + packet.tcp_header_len;
    // SAFETY: `request.bytes` holds `MAX_REPLAY` bytes, `len` is at most that.
    let read = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            payload_at as u32,
            request.bytes.as_mut_ptr().cast(),
            len as u32,
        )
    };
    if read != 0 {
        return None;
    }
    let last = len - HEAD_END.len();
    if (0..HEAD_END.len()).any(|i| request.bytes[(last + i) & (MAX_REPLAY - 1)] != HEAD_END[i]) {
        return None;
    }
    request.len = len as u16;
    request.sum = sum_words(&request.bytes, &request.len);
    Some(())
}

/// Whether the request carries the session's cookie bytes whole where their first four bytes
/// first appear (`at`): behind the start of a cookie or URL parameter, and followed by its
/// end.
#[inline(always)]
fn carries(request: &Replay, session: &KnownSession, at: Option<usize>) -> bool {
    let len = usize::from(session.len);
    if !(COOKIE_PREFIX..=MAX_KNOWN_COOKIE).contains(&len) {
        return false;
    }
    let Some(at) = at else {
        return false;
    };
    if at == 0 || at + len >= usize::from(request.len) {
        return false;
    }
    let byte = |at: usize| request.bytes[at & (MAX_REPLAY - 1)];
    for i in COOKIE_PREFIX..MAX_KNOWN_COOKIE {
        if i == fresh(&session.len) {
            break;
        }
        if byte(at + i) != session.cookie[i] {
            return false;
        }
    }
    let end = at + fresh(&session.len);
    matches!(byte(at - 1), b' ' | b';' | b'?' | b'&')
        && matches!(byte(end), b';' | b'\r' | b' ' | b'&')
}

/// Where `prefix` first appears in the request.
#[inline(always)]
fn find(request: &Replay, prefix: [u8; COOKIE_PREFIX]) -> Option<usize> {
    let mut found = None;
    for at in 0..MAX_REPLAY - COOKIE_PREFIX {
        if at + COOKIE_PREFIX > fresh(&request.len) {
            break;
        }
        let bytes = &request.bytes;
        if [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]] == prefix {
            found = Some(at);
            break;
        }
    }
    // Each place the search can stop at would otherwise be verified on its own from here.
    packet::opaque(found?, MAX_REPLAY)
}

/// The one's-complement sum of the 16-bit words of the first `len` of `bytes` as they lie in
/// memory (an odd last byte padded with zero), folded to 16 bits.
#[inline(always)]
fn sum_words<const N: usize>(bytes: &[u8; N], len: &u16) -> u16 {
    let mut sum = 0u32;
    for word in 0..N / 2 {
        let at = word * 2;
        if at >= fresh(len) {
            break;
        }
        let second = if at + 1 < fresh(len) {
            bytes[at + 1]
        } else {
            0
        };
        sum += u32::from(u16::from_ne_bytes([bytes[at], second]));
    }
    balancer_common::csum::fold(sum)
}

/// A length read anew from its map value: compared inside a loop, a length held in a
/// register would carry what each iteration learnt of it out of the loop, and the verifier
/// would follow every exit on its own.
#[inline(always)]
fn fresh(len: &u16) -> usize {
    // SAFETY: `len` is a reference, so valid to read.
    usize::from(unsafe { core::ptr::read_volatile(len) })
}

/// A connection XDP opens the backend side of.
struct Opened<'a> {
    key: &'a FlowKey,
    binding: &'a Binding,
    backend: &'a Backend,
    backend_id: u32,
    now_ms: u32,
    /// The client's TSval and TSecr, when the connection uses timestamps.
    timestamps: Option<(u32, u32)>,
    /// The connection starts a session: its first response head gets the cookie lines.
    starts_session: bool,
}

impl Opened<'_> {
    /// The TSval the backend sees from the client: the balancer's clock now.
    #[inline(always)]
    fn tsval(&self) -> u32 {
        self.now_ms
    }

    /// Leaves the request for `replay` to send with the ACK of the backend's SYN-ACK.
    #[inline(always)]
    fn leave_replay(&self, request: &mut Replay) -> Option<()> {
        request.timestamps = u16::from(self.timestamps.is_some());
        request.tsval = self.tsval();
        REPLAYS.insert(self.key, request, 0).ok()
    }

    /// Leaves the session's cookie lines for `head` to put into the first response head, as
    /// the agent leaves them, for a client that takes segments of up to `mss` bytes.
    #[inline(always)]
    fn leave_lines(&self, start: *mut SessionStart, mss: u16) -> Option<()> {
        // SAFETY: map values stay valid for the duration of the program.
        HEAD_INSERTS
            .insert(self.key, unsafe { &(*start).lines }, 0)
            .ok()?;
        let lines = HEAD_INSERTS.get_ptr_mut(self.key)?;
        // SAFETY: as above; the copy is this connection's alone.
        let lines = unsafe { &mut *lines };
        // The agent rewrites the entry in place: a copy taken meanwhile may mix two issues.
        if sum_words(&lines.lines, &lines.len) != lines.sum {
            let _ = HEAD_INSERTS.remove(self.key);
            return None;
        }
        lines.max_payload = mss;
        lines.status_len = 0;
        Some(())
    }

    /// The connection's entries as the agent writes them with its SYN (see
    /// `connection_entries` in the agent), marked as XDP's own.
    #[inline(always)]
    fn write_entries(&self, now_s: u32, request_len: u16) -> Option<()> {
        let (ts_flow, ts_reverse, balancer_tsval, to_backend) = match self.timestamps {
            // The backend's first TSval becomes the last the client had from the balancer
            // (its TSecr); the client's TSvals move onto the balancer's clock of now.
            Some((tsval, tsecr)) => (
                flow_flags::TIMESTAMPS,
                reverse_flags::TIMESTAMPS,
                tsecr,
                self.tsval().wrapping_sub(tsval),
            ),
            None => (0, 0, 0, 0),
        };
        // As for a new session the agent opens: its head goes to `head`, or to the agent.
        let head = if self.starts_session {
            reverse_flags::HEAD_TO_AGENT | reverse_flags::COOKIE_BY_XDP
        } else {
            0
        };
        let client_window_shift = if self.binding.options.window_shift == NO_WINDOW_SCALE {
            0
        } else {
            COOKIE_WINDOW_SHIFT
        };
        let reply_key = FlowKey {
            src: self.backend.addr,
            dst: self.key.src,
            sport: self.backend.port,
            dport: self.key.sport,
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let reverse = ReverseNat {
            vip: self.key.dst,
            port: self.key.dport,
            state: flow_state::CONNECTING,
            backend_id: self.backend_id,
            client_window_shift,
            replay_end: self
                .binding
                .client_isn
                .wrapping_add(1)
                .wrapping_add(u32::from(request_len)),
            flags: reverse_flags::REPLAY_BY_XDP | reverse_flags::BOUND_BY_XDP | ts_reverse | head,
            ts_delta: balancer_tsval,
            client_ts_delta: to_backend,
            ..ReverseNat::default()
        };
        REVERSE.insert(&reply_key, &reverse, 0).ok()?;
        let flow = Flow {
            backend_addr: self.backend.addr,
            backend_id: self.backend_id,
            backend_port: self.backend.port,
            state: flow_state::CONNECTING,
            flags: flow_flags::BOUND_BY_XDP | ts_flow,
            last_seen_s: now_s,
            ts_delta: balancer_tsval,
            client_ts_delta: to_backend,
            ..Flow::default()
        };
        FLOWS.insert(self.key, &flow, 0).ok()
    }

    /// Turns the frame into the SYN to the backend, with the client's address, port, ISN
    /// and options, and sends it there.
    #[inline(always)]
    fn send_syn(&self, ctx: &XdpContext, packet: &Packet) -> Verdict {
        let sent = if self.timestamps.is_some() {
            self.write_syn::<SYN_TCP_LEN_TIMESTAMPS, { SYN_TCP_LEN_TIMESTAMPS / 2 }>(ctx, packet)
        } else {
            self.write_syn::<SYN_TCP_LEN, { SYN_TCP_LEN / 2 }>(ctx, packet)
        };
        // The entries are written: the client's next try reaches the agent, which opens the
        // backend side anew over them.
        if sent.is_none() {
            return Verdict::drop(Reason::DropNoRoomForReply);
        }
        stats::count_bound(self.backend_id);
        stats::count_new_flow(self.backend_id, self.key.src);
        match forward::redirect(ctx, packet, Reason::BoundByXdp) {
            Ok(verdict) | Err(verdict) => verdict,
        }
    }

    #[inline(always)]
    fn write_syn<const LEN: usize, const WORDS: usize>(
        &self,
        ctx: &XdpContext,
        packet: &Packet,
    ) -> Option<()> {
        const { assert!(WORDS * 2 == LEN) };
        let eth: *const EthHdr = ptr_at(ctx, 0)?;
        // SAFETY: `ptr_at` checked that the header lies inside the frame; the forward
        // writes the addresses of the next hop over these.
        let macs = unsafe { ((*eth).src_addr, (*eth).dst_addr) };
        let l4 = reply::l4_offset(packet.v6);
        reply::resize(ctx, l4 + LEN)?;
        reply::write_headers(ctx, macs, &self.key.src, &self.backend.addr, LEN)?;
        let tcp: *mut [u8; LEN] = ptr_at(ctx, l4)?;
        let options = self.binding.options;
        // SAFETY: `ptr_at` checked that the segment lies inside the resized frame.
        synack::write_handshake(
            unsafe { &mut *tcp },
            &Handshake {
                ports: (self.key.sport, self.backend.port),
                seq: self.binding.client_isn,
                ack: 0,
                flags: SYN,
                mss: options.mss,
                window_shift: options.window_shift,
                sack_permitted: options.sack_permitted != 0,
                timestamps: (self.tsval(), 0),
            },
        );
        reply::write_checksums::<WORDS>(ctx, packet.v6, (0, 0))
    }
}
