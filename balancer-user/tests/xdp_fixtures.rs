//! Packet fixtures run through the XDP program with BPF_PROG_TEST_RUN: each gives an input
//! frame, the action and counter it must produce and, where the frame is rewritten, the exact
//! output bytes (built from scratch with full checksums, so the program's incremental updates
//! are checked against an independent computation). Needs root.
//!
//! The FIB lookup runs in a private network namespace with veth interfaces, static neighbours
//! and fixed MAC addresses, so the results do not depend on the host.

use std::{
    net::{IpAddr, Ipv4Addr},
    process::Command,
};

use aya::{
    maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{ProgramFd, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use balancer_common::{
    affinity, backend_state, binding_state, csum, flow_flags, flow_state, map_name, nat_mode,
    punt_kind, reverse_flags, syncookie, without_agent, worker_of, Addr, Affinity, AffinityKey,
    AgentState, Backend, Binding, Counter, Flow, FlowKey, Group, HeadInsert, KnownSession,
    KnownSessionKey, Punt, Reason, Replay, ReverseNat, Service, ServiceKey, SessionStart,
    SynOptions, DEFAULT_AGENT_TIMEOUT_S, LAYOUT_VERSION, MAX_AGENT_WORKERS, MAX_GROUPS,
    MAX_SERVICES, PROTO_TCP, PROTO_UDP, TABLES_PER_SERVICE, XDP_PROGRAM,
};
use bytemuck::Zeroable;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
/// A backend address the FIB has no route to.
const UNROUTED_BACKEND: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const BALANCER_CLIENT_SIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xb0, 0x01];
const BALANCER_BACKEND_SIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xb0, 0x02];

const WEB_PORT: u16 = 80;
const WEB_BACKEND_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7;
const EMPTY_PORT: u16 = 81;
const UNROUTED_PORT: u16 = 82;
const STICKY_PORT: u16 = 83;
const COOKIE_PORT: u16 = 84;
const CLIENT_PORT: u16 = 40000;

/// Backends by id: (address, port).
const BACKEND_ADDRESSES: [(Ipv4Addr, u16); 5] = [
    (BACKEND, WEB_BACKEND_PORT),
    (BACKEND, ECHO_PORT),
    (UNROUTED_BACKEND, 80),
    (BACKEND_2, 80),
    (BACKEND_3, 80),
];
/// The backends of the `source-ip` service.
const STICKY_BACKENDS: [u32; 2] = [3, 4];
const BACKEND_2: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 12);
const BACKEND_3: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 13);
/// A small prime keeps writing the tables quick.
const FIXTURE_TABLE_SIZE: u32 = 1021;
/// The generation every fixture service is written in.
const FIXTURE_GENERATION: u32 = 7;
/// The one group table the fixtures write, at the start of `GROUP_TABLE`.
const FIXTURE_GROUP_TABLE_SIZE: u32 = 31;

const XDP_TX: u32 = 3;
const TCP_RST: u8 = 0x04;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

// ---- Frame builders (full checksums, computed independently of the program) ----

/// An address as the maps hold it.
fn addr(ip: impl Into<IpAddr>) -> Addr {
    Addr::from(ip.into())
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for chunk in chunks {
        for word in chunk.chunks(2) {
            sum += u32::from(u16::from_be_bytes([word[0], *word.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[derive(Clone)]
struct Ip {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    proto: u8,
    id: u16,
}

fn ipv4_header(ip: &Ip, payload_len: usize) -> Vec<u8> {
    let total = (20 + payload_len) as u16;
    let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, ip.ttl, ip.proto, 0, 0];
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[4..6].copy_from_slice(&ip.id.to_be_bytes());
    h.extend_from_slice(&ip.src.octets());
    h.extend_from_slice(&ip.dst.octets());
    let c = checksum(&[&h]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

fn l4_checksum(ip: &Ip, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip.src.octets());
    pseudo.extend_from_slice(&ip.dst.octets());
    pseudo.extend_from_slice(&[0, ip.proto]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    checksum(&[&pseudo, segment])
}

/// Sequence number of every client segment the fixtures build.
const CLIENT_SEQ: u32 = 0x1000_0000;
/// Payload of the fixtures' TCP segments.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\n\r\n";

fn tcp(ip: &Ip, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    tcp_segment(ip, (sport, dport), (CLIENT_SEQ, 0), flags, 0xffff, payload)
}

fn tcp_segment(
    ip: &Ip,
    (sport, dport): (u16, u16),
    (seq, ack): (u32, u32),
    flags: u8,
    window: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&seq.to_be_bytes());
    s.extend_from_slice(&ack.to_be_bytes());
    s.extend_from_slice(&[0x50, flags]);
    s.extend_from_slice(&window.to_be_bytes());
    s.extend_from_slice(&[0, 0, 0, 0]);
    s.extend_from_slice(payload);
    let c = l4_checksum(ip, &s);
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

fn udp(ip: &Ip, sport: u16, dport: u16, payload: &[u8], with_checksum: bool) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(payload);
    if with_checksum {
        let c = l4_checksum(ip, &s);
        s[6..8].copy_from_slice(&c.to_be_bytes());
    }
    s
}

fn frame(dst_mac: [u8; 6], src_mac: [u8; 6], ether_type: u16, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn ipv4_frame(dst_mac: [u8; 6], src_mac: [u8; 6], ip: &Ip, segment: &[u8]) -> Vec<u8> {
    let mut body = ipv4_header(ip, segment.len());
    body.extend_from_slice(segment);
    frame(dst_mac, src_mac, 0x0800, &body)
}

fn tcp_frame(ip: &Ip, macs: ([u8; 6], [u8; 6]), sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    ipv4_frame(macs.0, macs.1, ip, &tcp(ip, sport, dport, flags, REQUEST))
}

fn ip(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Ip {
    Ip {
        src,
        dst,
        ttl: 64,
        proto,
        id: 0x1234,
    }
}

/// Client-side frames as they reach the balancer.
const FROM_CLIENT: ([u8; 6], [u8; 6]) = (BALANCER_CLIENT_SIDE_MAC, CLIENT_MAC);
/// Frames the balancer sends to a backend.
const TO_BACKEND: ([u8; 6], [u8; 6]) = (BACKEND_MAC, BALANCER_BACKEND_SIDE_MAC);
/// Backend replies as they reach the balancer.
const FROM_BACKEND: ([u8; 6], [u8; 6]) = (BALANCER_BACKEND_SIDE_MAC, BACKEND_MAC);
/// Frames the balancer sends to a client.
const TO_CLIENT: ([u8; 6], [u8; 6]) = (CLIENT_MAC, BALANCER_CLIENT_SIDE_MAC);

// ---- The environment: a private network namespace, the program and its maps ----

fn sh(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("running a setup command");
    assert!(status.success(), "setup command failed: {args:?}");
}

/// Moves this thread into a new network namespace with the balancer's two sides as veth
/// interfaces, static neighbours for the client and the backend, and forwarding on.
fn enter_private_network() {
    // SAFETY: unshare only changes this thread's namespaces; the test owns the thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc, 0,
        "unshare(CLONE_NEWNET) failed: the fixtures need root"
    );
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    for (dev, own_mac, addr, peer, peer_mac) in [
        (
            "fx-client",
            BALANCER_CLIENT_SIDE_MAC,
            "198.18.0.1/16",
            CLIENT,
            CLIENT_MAC,
        ),
        (
            "fx-backend",
            BALANCER_BACKEND_SIDE_MAC,
            "198.19.0.1/24",
            BACKEND,
            BACKEND_MAC,
        ),
    ] {
        let peer_dev = format!("{dev}-peer");
        sh(&[
            "ip",
            "link",
            "add",
            dev,
            "address",
            &mac(own_mac),
            "type",
            "veth",
            "peer",
            "name",
            &peer_dev,
        ]);
        sh(&["ip", "link", "set", dev, "up"]);
        sh(&["ip", "link", "set", &peer_dev, "up"]);
        sh(&["ip", "addr", "add", addr, "dev", dev]);
        sh(&[
            "ip",
            "neigh",
            "add",
            &peer.to_string(),
            "lladdr",
            &mac(peer_mac),
            "dev",
            dev,
        ]);
    }
    for other in [BACKEND_2, BACKEND_3] {
        sh(&[
            "ip",
            "neigh",
            "add",
            &other.to_string(),
            "lladdr",
            &mac(BACKEND_MAC),
            "dev",
            "fx-backend",
        ]);
    }
    sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
}

struct Program {
    ebpf: Ebpf,
    pin_dir: std::path::PathBuf,
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// Loads program `name` of the object; returns its fd.
fn load_xdp(ebpf: &mut Ebpf, name: &str) -> ProgramFd {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .expect("program")
        .try_into()
        .expect("an XDP program");
    // The kernel answers EAGAIN when loads meet (the fixtures run in parallel).
    let loaded = (0..5).find_map(|_| match program.load() {
        Err(aya::programs::ProgramError::LoadError { io_error, .. })
            if io_error.kind() == std::io::ErrorKind::WouldBlock =>
        {
            None
        }
        result => Some(result),
    });
    loaded
        .expect("the kernel kept answering EAGAIN")
        .expect("the verifier accepts the program");
    program.fd().unwrap().try_clone().unwrap()
}

impl Program {
    /// Loads the program (see [`Program::load`]) in the fixtures' private network, which
    /// needs root.
    fn in_private_network(name: &str) -> Self {
        // SAFETY: geteuid has no preconditions.
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the XDP fixtures need root (run them through `cargo xtask test`)"
        );
        enter_private_network();
        Program::load(name)
    }

    /// Loads the program with its maps pinned in a directory of its own (`name` tells the
    /// tests running in parallel apart) and the fixtures' services programmed.
    fn load(name: &str) -> Self {
        let pin_dir = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/fixtures-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&pin_dir);
        std::fs::create_dir_all(&pin_dir).expect("creating a pin directory (is bpffs mounted?)");
        let object = aya::include_bytes_aligned!(env!("BALANCER_EBPF_OBJECT"));
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .map_max_entries(map_name::FLOWS, 1024)
            .map_max_entries(map_name::REVERSE, 1024)
            .map_max_entries(map_name::AFFINITY, 1024)
            .map_max_entries(
                map_name::BACKEND_TABLE,
                MAX_SERVICES * TABLES_PER_SERVICE * FIXTURE_TABLE_SIZE,
            )
            .map_max_entries(map_name::GROUP_TABLE, FIXTURE_GROUP_TABLE_SIZE)
            .load(object)
            .expect("loading the XDP object");
        load_xdp(&mut ebpf, XDP_PROGRAM);
        // The cookie connections' programs, which the main one reaches by tail calls.
        for (name, array) in [
            ("balancer_response_head", "HEAD_PROGRAM"),
            ("balancer_replay", "REPLAY_PROGRAM"),
            ("balancer_bind", "BIND_PROGRAM"),
        ] {
            let fd = load_xdp(&mut ebpf, name);
            let mut tail_calls = ProgramArray::try_from(ebpf.map_mut(array).unwrap()).unwrap();
            tail_calls.set(0, &fd, 0).unwrap();
        }
        let mut this = Self { ebpf, pin_dir };
        this.program_services();
        this.agent_alive_seconds_ago(0);
        this
    }

    fn map(&mut self, name: &str) -> &mut aya::maps::Map {
        self.ebpf.map_mut(name).expect(name)
    }

    /// web tcp/80 → BACKEND:8080, echo udp/7 → BACKEND:7, tcp/81 and udp/81 with no
    /// backend, tcp/82 → a backend without a route, tcp/83 `source-ip` /24 over two backends.
    fn program_services(&mut self) {
        for (id, (addr, port)) in BACKEND_ADDRESSES.iter().enumerate() {
            self.set_backend(id as u32, *addr, *port, backend_state::UP);
        }
        let services: [(u16, u8, u32, &[u32]); 7] = [
            (WEB_PORT, PROTO_TCP, affinity::FLOW, &[0]),
            (ECHO_PORT, PROTO_UDP, affinity::FLOW, &[1]),
            (EMPTY_PORT, PROTO_TCP, affinity::FLOW, &[]),
            (EMPTY_PORT, PROTO_UDP, affinity::FLOW, &[]),
            (UNROUTED_PORT, PROTO_TCP, affinity::FLOW, &[2]),
            (
                STICKY_PORT,
                PROTO_TCP,
                affinity::SOURCE_IP,
                &STICKY_BACKENDS,
            ),
            (COOKIE_PORT, PROTO_TCP, affinity::COOKIE, &[0]),
        ];
        for (id, (port, proto, mode, backends)) in services.into_iter().enumerate() {
            self.set_service(id as u32, port, proto, mode, backends);
        }
        let mut ports: DevMapHash<&mut MapData> =
            DevMapHash::try_from(self.map(map_name::TX_PORTS)).unwrap();
        for dev in ["fx-client", "fx-backend"] {
            let name = std::ffi::CString::new(dev).unwrap();
            // SAFETY: a valid NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(index, 0, "{dev} exists");
            ports.insert(index, index, None, 0).unwrap();
        }
    }

    /// Writes the agent's heartbeat as it was `age` seconds ago.
    fn agent_alive_seconds_ago(&mut self, age: u32) {
        self.agent_alive_with_workers(age, 1);
    }

    fn agent_alive_with_workers(&mut self, age: u32, workers: u32) {
        let mut map: Array<&mut MapData, AgentState> =
            Array::try_from(self.map(map_name::AGENT)).unwrap();
        let state = AgentState {
            heartbeat_s: coarse_seconds() - age,
            layout_version: LAYOUT_VERSION,
            request_timeout_s: 10,
            workers,
            ..AgentState::default()
        };
        map.set(0, state, 0).unwrap();
    }

    fn set_backend(&mut self, id: u32, address: Ipv4Addr, port: u16, state: u8) {
        let mut map: Array<&mut MapData, Backend> =
            Array::try_from(self.map(map_name::BACKENDS)).unwrap();
        let value = Backend {
            addr: addr(address),
            port: port.to_be(),
            state,
            ..Backend::default()
        };
        map.set(id, value, 0).unwrap();
    }

    /// The tcp service on `port` of the VIP, as its map holds it now.
    fn service(&mut self, port: u16) -> Service {
        let services: HashMap<&mut MapData, ServiceKey, Service> =
            HashMap::try_from(self.map(map_name::SERVICES)).unwrap();
        services.get(&tcp_service_key(port), 0).unwrap()
    }

    /// Changes the tcp service on `port` as `change` says, the rest as it is.
    fn change_service(&mut self, port: u16, change: impl FnOnce(Service) -> Service) {
        let value = change(self.service(port));
        let mut services: HashMap<&mut MapData, ServiceKey, Service> =
            HashMap::try_from(self.map(map_name::SERVICES)).unwrap();
        services.insert(tcp_service_key(port), value, 0).unwrap();
    }

    /// Writes a service whose lookup table cycles through `backends`, as the agent does after
    /// a backend changes state.
    fn set_service(&mut self, id: u32, port: u16, proto: u8, mode: u32, backends: &[u32]) {
        let table_base = id * TABLES_PER_SERVICE * FIXTURE_TABLE_SIZE;
        if !backends.is_empty() {
            let mut table: Array<&mut MapData, u32> =
                Array::try_from(self.map(map_name::BACKEND_TABLE)).unwrap();
            for slot in 0..FIXTURE_TABLE_SIZE {
                table
                    .set(
                        table_base + slot,
                        backends[slot as usize % backends.len()],
                        0,
                    )
                    .unwrap();
            }
        }
        let mut map: HashMap<&mut MapData, ServiceKey, Service> =
            HashMap::try_from(self.map(map_name::SERVICES)).unwrap();
        let key = ServiceKey {
            vip: addr(VIP),
            port: port.to_be(),
            proto,
            _pad: 0,
        };
        let value = Service {
            id,
            affinity: mode,
            table_base,
            table_size: FIXTURE_TABLE_SIZE,
            backend_count: backends.len() as u32,
            affinity_timeout: 300,
            source_mask: Addr::prefix_mask(true, 24),
            without_agent: without_agent::PLACE_BY_FLOW,
            nat: nat_mode::GATEWAY,
            proxy_protocol: 0,
            return_home: 0,
            balance_factor: 0,
            load_total: 0,
            group_stickiness: 0,
            generation: FIXTURE_GENERATION,
            cookie_fallback: without_agent::PLACE_BY_FLOW,
        };
        map.insert(key, value, 0).unwrap();
    }

    fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        let program: &Xdp = self
            .ebpf
            .program(XDP_PROGRAM)
            .expect("program")
            .try_into()
            .expect("XDP");
        let mut output = vec![0u8; input.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut output),
            ..Default::default()
        };
        let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
        output.truncate(result.data_size_out as usize);
        (result.return_value, output)
    }

    fn counters(&self) -> Vec<u64> {
        let stats: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(self.ebpf.map(map_name::STATS).expect("STATS")).unwrap();
        Reason::ALL
            .iter()
            .map(|r| {
                stats
                    .get(&(*r as u32), 0)
                    .unwrap()
                    .iter()
                    .map(|c| c.packets)
                    .sum()
            })
            .collect()
    }

    fn flow(&self, key: &FlowKey) -> Option<Flow> {
        let flows: HashMap<&MapData, FlowKey, Flow> =
            HashMap::try_from(self.ebpf.map(map_name::FLOWS).expect("FLOWS")).unwrap();
        flows.get(key, 0).ok()
    }

    fn reverse(&self, reply_key: &FlowKey) -> Option<ReverseNat> {
        let reverse: HashMap<&MapData, FlowKey, ReverseNat> =
            HashMap::try_from(self.ebpf.map(map_name::REVERSE).expect("REVERSE")).unwrap();
        reverse.get(reply_key, 0).ok()
    }

    fn head_insert(&self, key: &FlowKey) -> Option<HeadInsert> {
        let lines: HashMap<&MapData, FlowKey, HeadInsert> =
            HashMap::try_from(self.ebpf.map(map_name::HEAD_INSERTS).expect("HEAD_INSERTS"))
                .unwrap();
        lines.get(key, 0).ok()
    }

    fn replay(&self, key: &FlowKey) -> Option<Replay> {
        let replays: HashMap<&MapData, FlowKey, Replay> =
            HashMap::try_from(self.ebpf.map(map_name::REPLAYS).expect("REPLAYS")).unwrap();
        replays.get(key, 0).ok()
    }

    /// Leaves `replay` for XDP to send when the backend's SYN-ACK of `key` comes, as the
    /// agent does with the SYN.
    fn leave_replay(&mut self, key: FlowKey, replay: Replay) {
        let mut replays: HashMap<&mut MapData, FlowKey, Replay> =
            HashMap::try_from(self.map(map_name::REPLAYS)).unwrap();
        replays.insert(key, replay, 0).unwrap();
    }

    /// Leaves XDP the session it binds the client's connections to the cookie service by,
    /// as the agent does once it bound one.
    fn know_session(&mut self, session: KnownSession) {
        let client = KnownSessionKey::new(addr(CLIENT), addr(VIP), COOKIE_PORT.to_be());
        let mut sessions: HashMap<&mut MapData, KnownSessionKey, KnownSession> =
            HashMap::try_from(self.map(map_name::KNOWN_SESSIONS)).unwrap();
        sessions.insert(client, session, 0).unwrap();
    }

    /// The session XDP binds the client's connections to the cookie service by, if any.
    fn known_session(&mut self) -> Option<KnownSession> {
        let client = KnownSessionKey::new(addr(CLIENT), addr(VIP), COOKIE_PORT.to_be());
        let sessions: HashMap<&mut MapData, KnownSessionKey, KnownSession> =
            HashMap::try_from(self.map(map_name::KNOWN_SESSIONS)).unwrap();
        sessions.get(&client, 0).ok()
    }

    /// The records the program put in the punt rings since the last call, oldest first in
    /// each ring, with the worker whose ring each was in.
    fn punts_by_worker(&mut self) -> Vec<(usize, Punt)> {
        let mut punts = Vec::new();
        for (worker, name) in map_name::PUNT_RINGS.iter().enumerate() {
            let mut ring = RingBuf::try_from(self.map(name)).unwrap();
            while let Some(record) = ring.next() {
                let punt = bytemuck::pod_read_unaligned(&record[..std::mem::size_of::<Punt>()]);
                punts.push((worker, punt));
            }
        }
        punts
    }

    /// The records the program put in the punt rings since the last call, which must all
    /// be in the ring of `worker`.
    fn punts_of_worker(&mut self, worker: usize) -> Vec<Punt> {
        let (punts, workers): (Vec<Punt>, Vec<usize>) = self
            .punts_by_worker()
            .into_iter()
            .map(|(worker, punt)| (punt, worker))
            .unzip();
        assert!(
            workers.iter().all(|&w| w == worker),
            "rings {workers:?}, not {worker}"
        );
        punts
    }

    /// The records the program put in the punt rings since the last call.
    fn punts(&mut self) -> Vec<Punt> {
        self.punts_by_worker()
            .into_iter()
            .map(|(_, punt)| punt)
            .collect()
    }
}

// ---- The fixtures ----

struct Fixture {
    name: &'static str,
    input: Vec<u8>,
    action: u32,
    reason: Reason,
    /// The exact frame the program must produce; `None` means the input unchanged.
    output: Option<Vec<u8>>,
}

fn fixtures() -> Vec<Fixture> {
    let syn = ip(CLIENT, VIP, PROTO_TCP);
    let syn_at_backend = ip(CLIENT, BACKEND, PROTO_TCP);
    let reply = ip(BACKEND, CLIENT, PROTO_TCP);
    let reply_at_client = ip(VIP, CLIENT, PROTO_TCP);
    let forwarded = |i: &Ip| Ip {
        ttl: i.ttl - 1,
        ..i.clone()
    };
    let udp_in = ip(CLIENT, VIP, PROTO_UDP);
    let udp_out = forwarded(&ip(CLIENT, BACKEND, PROTO_UDP));
    let unchanged = |name, input: Vec<u8>, action, reason| Fixture {
        name,
        input,
        action,
        reason,
        output: None,
    };

    let mut with_options = tcp_frame(&syn, FROM_CLIENT, CLIENT_PORT, WEB_PORT, TCP_SYN);
    with_options[14] = 0x46;
    let mut bad_ihl = tcp_frame(&syn, FROM_CLIENT, CLIENT_PORT, WEB_PORT, TCP_SYN);
    bad_ihl[14] = 0x44;
    let mut fragment = tcp_frame(&syn, FROM_CLIENT, CLIENT_PORT, WEB_PORT, TCP_SYN);
    fragment[20] = 0x20; // more fragments
    let mut long_total = tcp_frame(&syn, FROM_CLIENT, CLIENT_PORT, WEB_PORT, TCP_SYN);
    long_total[16..18].copy_from_slice(&1400u16.to_be_bytes());
    let mut vlan = tcp_frame(&syn, FROM_CLIENT, CLIENT_PORT, WEB_PORT, TCP_SYN);
    vlan.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    let truncated_ip = frame(
        FROM_CLIENT.0,
        FROM_CLIENT.1,
        0x0800,
        &ipv4_header(&syn, 0)[..12],
    );
    let truncated_tcp = {
        let segment = &tcp(&syn, CLIENT_PORT, WEB_PORT, TCP_SYN, b"")[..10];
        ipv4_frame(FROM_CLIENT.0, FROM_CLIENT.1, &syn, segment)
    };
    let arp = frame([0xff; 6], CLIENT_MAC, 0x0806, &[0u8; 28]);
    let icmp = ipv4_frame(
        FROM_CLIENT.0,
        FROM_CLIENT.1,
        &ip(CLIENT, VIP, 1),
        &[8, 0, 0xf7, 0xff, 0, 0, 0, 0],
    );
    let expiring = Ip {
        ttl: 1,
        ..syn.clone()
    };

    vec![
        Fixture {
            name: "SYN to a VIP is rewritten to its backend and redirected",
            input: tcp_frame(&syn, FROM_CLIENT, CLIENT_PORT, WEB_PORT, TCP_SYN),
            action: XDP_REDIRECT,
            reason: Reason::Forwarded,
            output: Some(tcp_frame(
                &forwarded(&syn_at_backend),
                TO_BACKEND,
                CLIENT_PORT,
                WEB_BACKEND_PORT,
                TCP_SYN,
            )),
        },
        Fixture {
            name: "later packet of the flow follows it",
            input: tcp_frame(&syn, FROM_CLIENT, CLIENT_PORT, WEB_PORT, TCP_ACK),
            action: XDP_REDIRECT,
            reason: Reason::Forwarded,
            output: Some(tcp_frame(
                &forwarded(&syn_at_backend),
                TO_BACKEND,
                CLIENT_PORT,
                WEB_BACKEND_PORT,
                TCP_ACK,
            )),
        },
        Fixture {
            name: "backend reply is rewritten back to the VIP",
            input: tcp_frame(
                &reply,
                FROM_BACKEND,
                WEB_BACKEND_PORT,
                CLIENT_PORT,
                TCP_SYN | TCP_ACK,
            ),
            action: XDP_REDIRECT,
            reason: Reason::Replied,
            output: Some(tcp_frame(
                &forwarded(&reply_at_client),
                TO_CLIENT,
                WEB_PORT,
                CLIENT_PORT,
                TCP_SYN | TCP_ACK,
            )),
        },
        Fixture {
            name: "UDP to a VIP is rewritten with its checksum",
            input: ipv4_frame(
                FROM_CLIENT.0,
                FROM_CLIENT.1,
                &udp_in,
                &udp(&udp_in, CLIENT_PORT, ECHO_PORT, b"ping", true),
            ),
            action: XDP_REDIRECT,
            reason: Reason::Forwarded,
            output: Some(ipv4_frame(
                TO_BACKEND.0,
                TO_BACKEND.1,
                &udp_out,
                &udp(&udp_out, CLIENT_PORT, ECHO_PORT, b"ping", true),
            )),
        },
        Fixture {
            name: "UDP without checksum keeps none",
            input: ipv4_frame(
                FROM_CLIENT.0,
                FROM_CLIENT.1,
                &udp_in,
                &udp(&udp_in, CLIENT_PORT + 1, ECHO_PORT, b"ping", false),
            ),
            action: XDP_REDIRECT,
            reason: Reason::Forwarded,
            output: Some(ipv4_frame(
                TO_BACKEND.0,
                TO_BACKEND.1,
                &udp_out,
                &udp(&udp_out, CLIENT_PORT + 1, ECHO_PORT, b"ping", false),
            )),
        },
        Fixture {
            name: "backend without a route goes up the stack already rewritten",
            input: tcp_frame(&syn, FROM_CLIENT, CLIENT_PORT, UNROUTED_PORT, TCP_SYN),
            action: XDP_PASS,
            reason: Reason::PassNoRoute,
            output: Some(tcp_frame(
                &ip(CLIENT, UNROUTED_BACKEND, PROTO_TCP),
                FROM_CLIENT,
                CLIENT_PORT,
                80,
                TCP_SYN,
            )),
        },
        Fixture {
            name: "expiring packet goes up the stack for ICMP time exceeded",
            input: tcp_frame(&expiring, FROM_CLIENT, CLIENT_PORT + 2, WEB_PORT, TCP_SYN),
            action: XDP_PASS,
            reason: Reason::PassTtlExpired,
            output: Some(tcp_frame(
                &Ip {
                    ttl: 1,
                    ..syn_at_backend.clone()
                },
                FROM_CLIENT,
                CLIENT_PORT + 2,
                WEB_BACKEND_PORT,
                TCP_SYN,
            )),
        },
        Fixture {
            name: "SYN to a service without backends is answered with a reset",
            input: tcp_frame(&syn, FROM_CLIENT, CLIENT_PORT, EMPTY_PORT, TCP_SYN),
            action: XDP_TX,
            reason: Reason::RefusedNoBackend,
            output: Some({
                let reset = Ip {
                    id: 0,
                    ..ip(VIP, CLIENT, PROTO_TCP)
                };
                let ack = CLIENT_SEQ + REQUEST.len() as u32 + 1;
                let segment = tcp_segment(
                    &reset,
                    (EMPTY_PORT, CLIENT_PORT),
                    (0, ack),
                    TCP_RST | TCP_ACK,
                    0,
                    b"",
                );
                ipv4_frame(TO_CLIENT.0, TO_CLIENT.1, &reset, &segment)
            }),
        },
        Fixture {
            name: "ACK to a service without backends is answered with a reset at its ack number",
            input: ipv4_frame(
                FROM_CLIENT.0,
                FROM_CLIENT.1,
                &syn,
                &tcp_segment(
                    &syn,
                    (CLIENT_PORT, EMPTY_PORT),
                    (CLIENT_SEQ, 777),
                    TCP_ACK,
                    512,
                    b"",
                ),
            ),
            action: XDP_TX,
            reason: Reason::RefusedNoBackend,
            output: Some({
                let reset = Ip {
                    id: 0,
                    ..ip(VIP, CLIENT, PROTO_TCP)
                };
                let segment =
                    tcp_segment(&reset, (EMPTY_PORT, CLIENT_PORT), (777, 0), TCP_RST, 0, b"");
                ipv4_frame(TO_CLIENT.0, TO_CLIENT.1, &reset, &segment)
            }),
        },
        unchanged(
            "reset to a service without backends is dropped",
            tcp_frame(&syn, FROM_CLIENT, CLIENT_PORT, EMPTY_PORT, TCP_RST),
            XDP_DROP,
            Reason::DropNoBackend,
        ),
        unchanged(
            "UDP to a service without backends is dropped",
            ipv4_frame(
                FROM_CLIENT.0,
                FROM_CLIENT.1,
                &udp_in,
                &udp(&udp_in, CLIENT_PORT, EMPTY_PORT, b"ping", true),
            ),
            XDP_DROP,
            Reason::DropNoBackend,
        ),
        unchanged(
            "port without a service is the host's",
            tcp_frame(&syn, FROM_CLIENT, CLIENT_PORT, 443, TCP_SYN),
            XDP_PASS,
            Reason::PassNotService,
        ),
        unchanged(
            "unknown reply is the host's",
            tcp_frame(
                &reply,
                FROM_BACKEND,
                WEB_BACKEND_PORT,
                CLIENT_PORT + 9,
                TCP_ACK,
            ),
            XDP_PASS,
            Reason::PassNotService,
        ),
        unchanged("ARP is the host's", arp, XDP_PASS, Reason::PassNotIp),
        unchanged("ICMP is the host's", icmp, XDP_PASS, Reason::PassNotTcpUdp),
        unchanged(
            "VLAN-tagged frame is the host's",
            vlan,
            XDP_PASS,
            Reason::PassVlan,
        ),
        unchanged(
            "IP options are the host's",
            with_options,
            XDP_PASS,
            Reason::PassIpOptions,
        ),
        unchanged(
            "fragment is the host's",
            fragment,
            XDP_PASS,
            Reason::PassFragment,
        ),
        unchanged(
            "header length below 20 is dropped",
            bad_ihl,
            XDP_DROP,
            Reason::DropBadIpHeader,
        ),
        unchanged(
            "total length beyond the frame is dropped",
            long_total,
            XDP_DROP,
            Reason::DropBadIpHeader,
        ),
        unchanged(
            "truncated IPv4 header is dropped",
            truncated_ip,
            XDP_DROP,
            Reason::DropTruncated,
        ),
        unchanged(
            "truncated TCP header is dropped",
            truncated_tcp,
            XDP_DROP,
            Reason::DropTruncated,
        ),
    ]
}

#[test]
fn xdp_program_handles_every_fixture_as_specified() {
    let program = Program::in_private_network("table");

    let fixtures = fixtures();
    let mut expected = vec![0u64; Reason::COUNT as usize];
    for fixture in &fixtures {
        let (action, output) = program.run(&fixture.input);
        assert_eq!(action, fixture.action, "{}: action", fixture.name);
        let want = fixture.output.as_ref().unwrap_or(&fixture.input);
        assert_eq!(&output, want, "{}: output frame", fixture.name);
        expected[fixture.reason as usize] += 1;
    }
    // New flows: tcp/80, two UDP flows, the unrouted one and the expiring one.
    expected[Reason::NewFlow as usize] = 5;
    let counters = program.counters();
    for reason in Reason::ALL {
        assert_eq!(
            counters[reason as usize],
            expected[reason as usize],
            "counter {}",
            reason.name()
        );
    }

    let key = client_flow(WEB_PORT);
    let flow = program.flow(&key).expect("the SYN recorded its flow");
    assert_eq!(flow.backend_addr, addr(BACKEND));
    assert_eq!(u16::from_be(flow.backend_port), WEB_BACKEND_PORT);
}

/// The backend a new TCP flow from `client:port` to the `source-ip` service is sent to.
fn sticky_backend(program: &Program, client: Ipv4Addr, port: u16) -> Ipv4Addr {
    let syn = ip(client, VIP, PROTO_TCP);
    let (action, output) = program.run(&tcp_frame(&syn, FROM_CLIENT, port, STICKY_PORT, TCP_SYN));
    assert_eq!(action, XDP_REDIRECT, "flow from {client}:{port}");
    let dst: [u8; 4] = output[30..34].try_into().expect("an IPv4 destination");
    Ipv4Addr::from(dst)
}

#[test]
fn source_ip_sessions_stick_move_off_down_backends_and_stay_moved() {
    let mut program = Program::in_private_network("affinity");
    let neighbour = Ipv4Addr::new(198, 18, 0, 77);
    let sticky_service_id = 5;

    let first = sticky_backend(&program, CLIENT, 50000);
    assert_eq!(
        sticky_backend(&program, CLIENT, 50001),
        first,
        "second flow of the client"
    );
    assert_eq!(
        sticky_backend(&program, neighbour, 50002),
        first,
        "same /24 shares the backend"
    );
    let counters = program.counters();
    assert_eq!(counters[Reason::NewSession as usize], 1);
    assert_eq!(counters[Reason::NewFlow as usize], 3);

    // The session's backend goes down: the agent marks it and rebuilds the table without it.
    let (down_id, other_id) = if BACKEND_ADDRESSES[3].0 == first {
        (3, 4)
    } else {
        (4, 3)
    };
    let (down_addr, port) = BACKEND_ADDRESSES[down_id as usize];
    program.set_backend(down_id, down_addr, port, backend_state::DOWN);
    program.set_service(
        sticky_service_id,
        STICKY_PORT,
        PROTO_TCP,
        affinity::SOURCE_IP,
        &[other_id],
    );
    let moved = sticky_backend(&program, CLIENT, 50003);
    assert_eq!(
        moved, BACKEND_ADDRESSES[other_id as usize].0,
        "the session moved to the healthy backend"
    );
    assert_eq!(program.counters()[Reason::SessionMoved as usize], 1);

    // It comes back: moved sessions stay where they are.
    program.set_backend(down_id, down_addr, port, backend_state::UP);
    program.set_service(
        sticky_service_id,
        STICKY_PORT,
        PROTO_TCP,
        affinity::SOURCE_IP,
        &STICKY_BACKENDS,
    );
    assert_eq!(
        sticky_backend(&program, CLIENT, 50004),
        moved,
        "no bounce-back"
    );
    assert_eq!(
        sticky_backend(&program, neighbour, 50005),
        moved,
        "the whole /24 moved"
    );

    // A draining backend keeps its sessions.
    let (moved_addr, moved_port) = BACKEND_ADDRESSES[other_id as usize];
    program.set_backend(other_id, moved_addr, moved_port, backend_state::DRAINING);
    program.set_service(
        sticky_service_id,
        STICKY_PORT,
        PROTO_TCP,
        affinity::SOURCE_IP,
        &[down_id],
    );
    assert_eq!(
        sticky_backend(&program, CLIENT, 50006),
        moved,
        "draining keeps the session"
    );
}

#[test]
fn a_source_ip_session_held_for_its_backend_is_reset_then_served_elsewhere_and_goes_home() {
    let mut program = Program::in_private_network("held");
    let sticky_service_id = 5;
    let home = sticky_backend(&program, CLIENT, 51000);
    let (down_id, other_id) = if BACKEND_ADDRESSES[3].0 == home {
        (3, 4)
    } else {
        (4, 3)
    };
    let (down_addr, port) = BACKEND_ADDRESSES[down_id as usize];
    let set_held = |program: &mut Program, state: u8, hold_until_s: u32| {
        let mut map: Array<&mut MapData, Backend> =
            Array::try_from(program.map(map_name::BACKENDS)).unwrap();
        let value = Backend {
            addr: addr(down_addr),
            port: port.to_be(),
            state,
            hold_until_s,
            ..Backend::default()
        };
        map.set(down_id, value, 0).unwrap();
    };

    // Down and held (on_backend_down = "keep" or "reject"): the session's SYN is reset.
    set_held(&mut program, backend_state::DOWN, coarse_seconds() + 100);
    program.set_service(
        sticky_service_id,
        STICKY_PORT,
        PROTO_TCP,
        affinity::SOURCE_IP,
        &[other_id],
    );
    let syn = ip(CLIENT, VIP, PROTO_TCP);
    let (action, reset) = program.run(&tcp_frame(&syn, FROM_CLIENT, 51001, STICKY_PORT, TCP_SYN));
    assert_eq!(
        (action, reset[47] & TCP_RST),
        (XDP_TX, TCP_RST),
        "a held session's SYN"
    );
    assert_eq!(program.counters()[Reason::RefusedBackendHeld as usize], 1);

    // The hold over, with return_home: served by the other backend, the session unmoved.
    set_held(&mut program, backend_state::DOWN, 0);
    program.change_service(STICKY_PORT, |service| Service {
        return_home: 1,
        ..service
    });
    assert_eq!(
        sticky_backend(&program, CLIENT, 51002),
        BACKEND_ADDRESSES[other_id as usize].0,
        "served elsewhere meanwhile"
    );
    assert_eq!(
        program.counters()[Reason::SessionMoved as usize],
        0,
        "not moved"
    );

    // Its backend returns: the session is home again.
    set_held(&mut program, backend_state::UP, 0);
    assert_eq!(sticky_backend(&program, CLIENT, 51003), home, "back home");
}

/// The `source-ip` service's session of `client`.
fn session_of(program: &mut Program, client: Ipv4Addr) -> Affinity {
    let sessions: HashMap<&mut MapData, AffinityKey, Affinity> =
        HashMap::try_from(program.map(map_name::AFFINITY)).unwrap();
    let key = AffinityKey {
        service_id: 5,
        client: addr(client).masked(&Addr::prefix_mask(true, 24)),
    };
    sessions.get(&key, 0).expect("a session")
}

#[test]
fn a_source_ip_session_stays_in_its_group_moves_within_it_and_regroups_after_its_time() {
    let mut program = Program::in_private_network("groups");
    let sticky_service_id = 5;
    // blue: backends 3 and 0; green: backend 4. The service's table, by the groups'
    // weights, holds 3 and 4.
    for (id, group) in [(3u32, 1u32), (0, 1), (4, 2)] {
        let (address, port) = BACKEND_ADDRESSES[id as usize];
        program.set_backend(id, address, port, backend_state::UP);
        let mut backends: Array<&mut MapData, Backend> =
            Array::try_from(program.map(map_name::BACKENDS)).unwrap();
        let backend = backends.get(&id, 0).unwrap();
        backends.set(id, Backend { group, ..backend }, 0).unwrap();
    }
    program.change_service(STICKY_PORT, |service| Service {
        group_stickiness: 100,
        ..service
    });
    let client = (1..=254)
        .map(|n| Ipv4Addr::new(198, 18, n, 2))
        .find(|&c| sticky_backend(&program, c, 53000) == BACKEND_2)
        .expect("a client /24 on backend 3");
    let session = session_of(&mut program, client);
    assert_eq!(
        (session.backend_id, session.group),
        (3, 1),
        "placed in blue"
    );
    let until = session.group_until_s;
    assert!(until >= coarse_seconds() + 99, "in blue for 100 s: {until}");

    // Blue at weight 0: the service's table holds green alone; the session stays, even idle
    // past its affinity timeout, while it is in its group.
    program.set_service(
        sticky_service_id,
        STICKY_PORT,
        PROTO_TCP,
        affinity::SOURCE_IP,
        &[4],
    );
    program.change_service(STICKY_PORT, |service| Service {
        group_stickiness: 100,
        ..service
    });
    let write_session = |program: &mut Program, session: Affinity| {
        let mut sessions: HashMap<&mut MapData, AffinityKey, Affinity> =
            HashMap::try_from(program.map(map_name::AFFINITY)).unwrap();
        let key = AffinityKey {
            service_id: sticky_service_id,
            client: addr(client).masked(&Addr::prefix_mask(true, 24)),
        };
        sessions.insert(key, session, 0).unwrap();
    };
    write_session(
        &mut program,
        Affinity {
            last_seen_ns: 1,
            ..session
        },
    );
    assert_eq!(sticky_backend(&program, client, 53001), BACKEND_2, "kept");

    // Backend 3 fails: blue's table holds backend 0, where the session moves, not to green.
    let (address, port) = BACKEND_ADDRESSES[3];
    program.set_backend(3, address, port, backend_state::DOWN);
    {
        let mut table: Array<&mut MapData, u32> =
            Array::try_from(program.map(map_name::GROUP_TABLE)).unwrap();
        for slot in 0..FIXTURE_GROUP_TABLE_SIZE {
            table.set(slot, 0, 0).unwrap();
        }
        let mut groups: Array<&mut MapData, Group> =
            Array::try_from(program.map(map_name::GROUPS)).unwrap();
        let blue = Group {
            table_base: 0,
            table_size: FIXTURE_GROUP_TABLE_SIZE,
        };
        groups.set(sticky_service_id * MAX_GROUPS, blue, 0).unwrap();
    }
    assert_eq!(
        sticky_backend(&program, client, 53002),
        BACKEND,
        "moved within blue"
    );
    let moved = session_of(&mut program, client);
    assert_eq!((moved.backend_id, moved.group), (0, 1));
    assert_eq!(moved.group_until_s, until, "its time in blue goes on");
    assert_eq!(program.counters()[Reason::SessionMoved as usize], 1);

    // Its time in blue over: by the weights of now it goes to green, for 100 s more.
    write_session(
        &mut program,
        Affinity {
            group_until_s: coarse_seconds() - 1,
            ..moved
        },
    );
    assert_eq!(
        sticky_backend(&program, client, 53003),
        BACKEND_3,
        "regrouped"
    );
    let regrouped = session_of(&mut program, client);
    assert_eq!((regrouped.backend_id, regrouped.group), (4, 2));
    assert!(regrouped.group_until_s >= coarse_seconds() + 99);
    assert_eq!(program.counters()[Reason::SessionMoved as usize], 2);

    // In green for good now, and kept there on the next flow.
    assert_eq!(sticky_backend(&program, client, 53004), BACKEND_3);
    assert_eq!(program.counters()[Reason::SessionMoved as usize], 2);
}

#[test]
fn bounded_load_places_new_sessions_under_the_bound_and_counts_them_and_sessions_stay() {
    let mut program = Program::in_private_network("bounded");
    let existing = sticky_backend(&program, CLIENT, 52000);
    // Backend 3 holds 10 flows, backend 4 none: the bound is ⌈1.25 × 11 / 2⌉ = 7.
    let loads = [(3u32, 10u32), (4, 0)];
    {
        let mut backends: Array<&mut MapData, Backend> =
            Array::try_from(program.map(map_name::BACKENDS)).unwrap();
        for (id, load) in loads {
            let backend = backends.get(&id, 0).unwrap();
            backends.set(id, Backend { load, ..backend }, 0).unwrap();
        }
    }
    program.change_service(STICKY_PORT, |service| Service {
        balance_factor: 125,
        load_total: 10,
        ..service
    });
    // New sessions from three /24s: each under the bound, on backend 4 whatever the table says.
    for third in 1..=3 {
        let client = Ipv4Addr::new(198, 18, third, 2);
        assert_eq!(
            sticky_backend(&program, client, 52000 + u16::from(third)),
            BACKEND_3
        );
    }
    let backend_4: Array<&mut MapData, Backend> =
        Array::try_from(program.map(map_name::BACKENDS)).unwrap();
    assert_eq!(
        backend_4.get(&4, 0).unwrap().load,
        3,
        "XDP counts what it placed"
    );
    assert_eq!(program.service(STICKY_PORT).load_total, 13);
    // The session placed before keeps its backend, loaded or not.
    assert_eq!(sticky_backend(&program, CLIENT, 52010), existing);
}

/// The key of the VIP's tcp service on `port`.
fn tcp_service_key(port: u16) -> ServiceKey {
    ServiceKey {
        vip: addr(VIP),
        port: port.to_be(),
        proto: PROTO_TCP,
        _pad: 0,
    }
}

/// A TCP segment with options (padded to whole words), for SYNs.
fn tcp_with_options(
    ip: &Ip,
    ports: (u16, u16),
    seq_ack: (u32, u32),
    flags: u8,
    window: u16,
    options: &[u8],
) -> Vec<u8> {
    tcp_with_options_and_data(ip, ports, seq_ack, (flags, window), options, b"")
}

/// A TCP segment with options (padded to whole words) and a payload.
fn tcp_with_options_and_data(
    ip: &Ip,
    ports: (u16, u16),
    seq_ack: (u32, u32),
    (flags, window): (u8, u16),
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut padded = options.to_vec();
    while !padded.len().is_multiple_of(4) {
        padded.push(1);
    }
    let options_len = padded.len();
    padded.extend_from_slice(payload);
    let mut s = tcp_segment(ip, ports, seq_ack, flags, window, &padded);
    s[12] = (((20 + options_len) / 4) as u8) << 4;
    s[16..18].copy_from_slice(&[0, 0]);
    let c = l4_checksum(ip, &s);
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

/// Seconds of the clock the program reads (`bpf_ktime_get_coarse_ns`).
fn coarse_seconds() -> u32 {
    // SAFETY: `timespec` is plain data filled in by the kernel.
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is writable.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut t) };
    t.tv_sec as u32
}

/// The SYN cookie periods now and a moment later, as the program computes them.
fn cookie_periods() -> [u32; 2] {
    let now = || coarse_seconds() / balancer_common::COOKIE_PERIOD_S;
    [now(), now() + 1]
}

#[test]
fn cookie_service_answers_syns_with_a_cookie_and_binds_on_the_matching_ack() {
    let mut program = Program::in_private_network("cookie");
    let syn_ip = ip(CLIENT, VIP, PROTO_TCP);
    let ports = (CLIENT_PORT, COOKIE_PORT);
    // Linux's SYN options: MSS 1460, SACK permitted, timestamps, NOP, window scale 10.
    let options = [
        2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 10,
    ];
    let syn = ipv4_frame(
        FROM_CLIENT.0,
        FROM_CLIENT.1,
        &syn_ip,
        &tcp_with_options(&syn_ip, ports, (CLIENT_SEQ, 0), TCP_SYN, 64240, &options),
    );
    let before_ms = milliseconds();
    let (action, output) = program.run(&syn);
    let after_ms = milliseconds();
    // The test run's ingress (loopback) is no TX port: the reply falls back to XDP_TX.
    assert_eq!(action, XDP_TX, "the SYN is answered on the spot");

    let key = client_flow(COOKIE_PORT);
    let secret = balancer_common::CookieSecret::default();
    let synack_ip = Ip {
        id: 0,
        ..ip(VIP, CLIENT, PROTO_TCP)
    };
    // The balancer's TSval: its millisecond clock, the low 5 bits replaced by the client's
    // window scale (10) and SACK permission (16), never ahead of the clock.
    let tsval = u32::from_be_bytes(output[SYNACK_TSVAL..SYNACK_TSVAL + 4].try_into().unwrap());
    assert_eq!(tsval & 0x1f, 10 | 16);
    assert!(
        after_ms.wrapping_sub(tsval) < 32 + after_ms.wrapping_sub(before_ms),
        "TSval {tsval} against the clock's {before_ms}..{after_ms}"
    );
    let synack_for = |cookie: u32| {
        // MSS clamped to what the balancer offers (1400), SACK permitted and timestamps as
        // the client offered them (echoing its TSval, 1), its own window scale (7), laid out
        // as Linux lays them out.
        let t = tsval.to_be_bytes();
        let segment = tcp_with_options(
            &synack_ip,
            (COOKIE_PORT, CLIENT_PORT),
            (cookie, CLIENT_SEQ + 1),
            TCP_SYN | TCP_ACK,
            u16::MAX,
            &[
                2, 4, 0x05, 0x78, 4, 2, 8, 10, t[0], t[1], t[2], t[3], 0, 0, 0, 1, 1, 3, 3, 7,
            ],
        );
        ipv4_frame(TO_CLIENT.0, TO_CLIENT.1, &synack_ip, &segment)
    };
    let cookie = cookie_periods()
        .into_iter()
        // The client's MSS, 1460, is the table's last entry.
        .map(|period| syncookie::syn_cookie(&secret, &key, CLIENT_SEQ, period, 3))
        .find(|cookie| output == synack_for(*cookie))
        .expect("the SYN-ACK, byte for byte, with the cookie of this period");

    let ack_ip = ip(CLIENT, VIP, PROTO_TCP);
    let ack = |ack_number: u32, payload: &[u8]| {
        ipv4_frame(
            FROM_CLIENT.0,
            FROM_CLIENT.1,
            &ack_ip,
            &tcp_segment(
                &ack_ip,
                ports,
                (CLIENT_SEQ + 1, ack_number),
                TCP_ACK,
                502,
                payload,
            ),
        )
    };
    assert_eq!(
        program.run(&ack(cookie ^ 0x5a5a, b"")).0,
        XDP_DROP,
        "a forged cookie"
    );
    assert_eq!(
        program.run(&ack(cookie + 1, b"")).0,
        XDP_DROP,
        "the handshake's ACK carries nothing to forward"
    );
    assert_eq!(
        program.run(&ack(cookie + 1, REQUEST)).0,
        XDP_DROP,
        "the request goes to the agent"
    );
    let counters = program.counters();
    for (reason, expected) in [
        (Reason::SynCookieSent, 1),
        (Reason::DropBadCookie, 1),
        (Reason::HandshakeDone, 1),
        (Reason::DropWhileBinding, 1),
        (Reason::Punted, 1),
    ] {
        assert_eq!(counters[reason as usize], expected, "{}", reason.name());
    }
    let bindings: HashMap<&MapData, FlowKey, balancer_common::Binding> =
        HashMap::try_from(program.ebpf.map(map_name::BINDINGS).expect("BINDINGS")).unwrap();
    let binding = bindings.get(&key, 0).expect("the binding was recorded");
    assert_eq!(
        (binding.client_isn, binding.cookie_isn),
        (CLIENT_SEQ, cookie)
    );
    assert_eq!(
        (
            binding.options.mss,
            binding.options.window_shift,
            binding.options.sack_permitted,
            binding.options.timestamps
        ),
        (1460, 10, 1, 1)
    );

    // Without timestamps the SYN-ACK keeps its 12 bytes of options.
    let other_port = CLIENT_PORT + 1;
    let plain_syn = tcp_with_options(
        &syn_ip,
        (other_port, COOKIE_PORT),
        (CLIENT_SEQ, 0),
        TCP_SYN,
        64240,
        &options[..6],
    );
    let (action, output) = program.run(&ipv4_frame(
        FROM_CLIENT.0,
        FROM_CLIENT.1,
        &syn_ip,
        &plain_syn,
    ));
    assert_eq!(action, XDP_TX);
    let cookie = u32::from_be_bytes(output[SYNACK_SEQ..SYNACK_SEQ + 4].try_into().unwrap());
    let segment = tcp_with_options(
        &synack_ip,
        (COOKIE_PORT, other_port),
        (cookie, CLIENT_SEQ + 1),
        TCP_SYN | TCP_ACK,
        u16::MAX,
        &[2, 4, 0x05, 0x78, 1, 1, 1, 1, 1, 1, 4, 2],
    );
    assert_eq!(
        output,
        ipv4_frame(TO_CLIENT.0, TO_CLIENT.1, &synack_ip, &segment)
    );

    // A SYN whose options a flood evicted from SYN_OPTIONS: the ACK's TSecr still carries
    // its window scale and SACK permission, its cookie the MSS.
    let forgotten_port = CLIENT_PORT + 2;
    let forgotten_key = FlowKey {
        sport: forgotten_port.to_be(),
        ..key
    };
    let syn = tcp_with_options(
        &syn_ip,
        (forgotten_port, COOKIE_PORT),
        (CLIENT_SEQ, 0),
        TCP_SYN,
        64240,
        &options,
    );
    let (_, output) = program.run(&ipv4_frame(FROM_CLIENT.0, FROM_CLIENT.1, &syn_ip, &syn));
    let cookie = u32::from_be_bytes(output[SYNACK_SEQ..SYNACK_SEQ + 4].try_into().unwrap());
    let echoed = &output[SYNACK_TSVAL..SYNACK_TSVAL + 4];
    let mut syn_options: HashMap<&mut MapData, FlowKey, SynOptions> =
        HashMap::try_from(program.map(map_name::SYN_OPTIONS)).unwrap();
    syn_options.remove(&forgotten_key).unwrap();
    let timestamps = [&[1, 1, 8, 10, 0, 0, 0, 2][..], echoed].concat();
    let ack = tcp_with_options(
        &ack_ip,
        (forgotten_port, COOKIE_PORT),
        (CLIENT_SEQ + 1, cookie + 1),
        TCP_ACK,
        502,
        &timestamps,
    );
    assert_eq!(
        program
            .run(&ipv4_frame(FROM_CLIENT.0, FROM_CLIENT.1, &ack_ip, &ack))
            .0,
        XDP_DROP
    );
    let bindings: HashMap<&MapData, FlowKey, Binding> =
        HashMap::try_from(program.ebpf.map(map_name::BINDINGS).expect("BINDINGS")).unwrap();
    let binding = bindings
        .get(&forgotten_key, 0)
        .expect("bound from the cookie");
    assert_eq!(
        binding.options,
        SynOptions {
            mss: 1460,
            window_shift: 10,
            sack_permitted: 1,
            timestamps: 1,
            _pad: [0; 3],
        }
    );

    // The client reuses its TIME_WAIT socket on the port: its ISN starts 64 KB past the old
    // connection's, and the new cookie moves with it, yet the new handshake is bound anew.
    let reused_seq = CLIENT_SEQ + 65_600;
    let syn = tcp_with_options(
        &syn_ip,
        (forgotten_port, COOKIE_PORT),
        (reused_seq, 0),
        TCP_SYN,
        64240,
        &options,
    );
    let (_, output) = program.run(&ipv4_frame(FROM_CLIENT.0, FROM_CLIENT.1, &syn_ip, &syn));
    let reused_cookie = u32::from_be_bytes(output[SYNACK_SEQ..SYNACK_SEQ + 4].try_into().unwrap());
    assert!(
        reused_cookie.wrapping_sub(cookie) < 1 << 17,
        "the cookie moved with the ISN"
    );
    let ack = tcp_segment(
        &ack_ip,
        (forgotten_port, COOKIE_PORT),
        (reused_seq + 1, reused_cookie + 1),
        TCP_ACK,
        502,
        b"",
    );
    let (action, _) = program.run(&ipv4_frame(FROM_CLIENT.0, FROM_CLIENT.1, &ack_ip, &ack));
    assert_eq!(action, XDP_DROP);
    let bindings: HashMap<&MapData, FlowKey, Binding> =
        HashMap::try_from(program.ebpf.map(map_name::BINDINGS).expect("BINDINGS")).unwrap();
    let binding = bindings.get(&forgotten_key, 0).expect("bound anew");
    assert_eq!(
        (binding.client_isn, binding.cookie_isn),
        (reused_seq, reused_cookie)
    );
}

/// Where a SYN-ACK's sequence number and the TSval of its options lie in its frame.
const SYNACK_SEQ: usize = 14 + 20 + 4;
const SYNACK_TSVAL: usize = 14 + 20 + 20 + 8;

/// Milliseconds of the clock the program's TSvals count (`bpf_ktime_get_ns`).
fn milliseconds() -> u32 {
    // SAFETY: `timespec` is plain data filled in by the kernel.
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is writable.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64 * 1000 + t.tv_nsec as u64 / 1_000_000) as u32
}

#[test]
fn without_an_agent_a_cookie_service_places_syns_by_its_fallback_and_resets_unbound_connections() {
    let mut program = Program::in_private_network("agentless");
    let syn_ip = ip(CLIENT, VIP, PROTO_TCP);
    // Linux's SYN options: MSS 1460, SACK permitted, timestamps, NOP, window scale 10.
    let options = [
        2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 10,
    ];
    let syn_from = |port: u16| {
        let segment = tcp_with_options(
            &syn_ip,
            (port, COOKIE_PORT),
            (CLIENT_SEQ, 0),
            TCP_SYN,
            64240,
            &options,
        );
        ipv4_frame(FROM_CLIENT.0, FROM_CLIENT.1, &syn_ip, &segment)
    };
    let request_from = |port: u16, cookie: u32| {
        let segment = tcp_segment(
            &syn_ip,
            (port, COOKIE_PORT),
            (CLIENT_SEQ + 1, cookie + 1),
            TCP_ACK,
            502,
            REQUEST,
        );
        ipv4_frame(FROM_CLIENT.0, FROM_CLIENT.1, &syn_ip, &segment)
    };
    // With the agent alive: a connection being bound, its request punted.
    let (action, synack) = program.run(&syn_from(CLIENT_PORT));
    assert_eq!(action, XDP_TX, "the SYN is answered with a cookie");
    let cookie = u32::from_be_bytes(synack[38..42].try_into().unwrap());
    assert_eq!(
        program.run(&request_from(CLIENT_PORT, cookie)).0,
        XDP_DROP,
        "the request goes to the agent"
    );

    // The agent's heartbeat stops.
    program.agent_alive_seconds_ago(DEFAULT_AGENT_TIMEOUT_S + 1);
    let (action, reset) = program.run(&request_from(CLIENT_PORT, cookie));
    assert_eq!(action, XDP_TX, "the request sent again is answered");
    assert_eq!(reset[47] & TCP_RST, TCP_RST, "with a reset");
    assert_eq!(
        u32::from_be_bytes(reset[38..42].try_into().unwrap()),
        cookie + 1,
        "at the sequence number the client expects"
    );
    assert!(
        program.flow(&client_flow(COOKIE_PORT)).is_none(),
        "the connection is forgotten"
    );

    // A new connection is placed by XDP as a plain flow, on the cookie fallback's backend.
    let (action, forwarded) = program.run(&syn_from(CLIENT_PORT + 1));
    assert_eq!(action, XDP_REDIRECT, "a new SYN is forwarded");
    assert_eq!(
        forwarded[30..34],
        BACKEND.octets(),
        "to the service's backend"
    );
    let flow = program
        .flow(&FlowKey {
            sport: (CLIENT_PORT + 1).to_be(),
            ..client_flow(COOKIE_PORT)
        })
        .expect("its flow is recorded");
    assert_eq!(flow.state, flow_state::NAT, "as a plain NAT flow");

    // A service that says so refuses new connections instead.
    program.change_service(COOKIE_PORT, |service| Service {
        without_agent: without_agent::RESET,
        ..service
    });
    let (action, reset) = program.run(&syn_from(CLIENT_PORT + 2));
    assert_eq!(
        (action, reset[47] & TCP_RST),
        (XDP_TX, TCP_RST),
        "a SYN is reset"
    );

    // The agent is back: SYNs get cookies again.
    program.agent_alive_seconds_ago(0);
    let (action, synack) = program.run(&syn_from(CLIENT_PORT + 3));
    assert_eq!(
        (action, synack[47]),
        (XDP_TX, TCP_SYN | TCP_ACK),
        "a SYN-ACK with a cookie"
    );

    let counters = program.counters();
    for (reason, expected) in [
        (Reason::SynCookieSent, 2),
        (Reason::HandshakeDone, 1),
        (Reason::Punted, 1),
        (Reason::ResetWithoutAgent, 2),
        (Reason::PlacedWithoutAgent, 1),
        (Reason::NewFlow, 1),
        (Reason::Forwarded, 1),
    ] {
        assert_eq!(counters[reason as usize], expected, "{}", reason.name());
    }
}

#[test]
fn syn_cookies_are_accepted_for_two_periods_and_one_rotation_of_the_secret() {
    let mut program = Program::in_private_network("rotation");
    let key = client_flow(COOKIE_PORT);
    let syn_ip = ip(CLIENT, VIP, PROTO_TCP);
    let first_segment = |cookie: u32| {
        let segment = tcp_segment(
            &syn_ip,
            (CLIENT_PORT, COOKIE_PORT),
            (CLIENT_SEQ + 1, cookie.wrapping_add(1)),
            TCP_ACK,
            502,
            b"",
        );
        ipv4_frame(FROM_CLIENT.0, FROM_CLIENT.1, &syn_ip, &segment)
    };
    let set_secrets = |program: &mut Program, secrets: [syncookie::CookieSecret; 2]| {
        let mut map: Array<&mut MapData, syncookie::CookieSecret> =
            Array::try_from(program.map(map_name::COOKIE_SECRET)).unwrap();
        for (index, secret) in secrets.into_iter().enumerate() {
            map.set(index as u32, secret, 0).unwrap();
        }
    };
    let secret = |seed: u64| syncookie::CookieSecret {
        keys: [[seed, !seed], [seed << 1, seed ^ 9]],
    };
    let handshakes = |program: &Program| program.counters()[Reason::HandshakeDone as usize];
    let [period, _] = cookie_periods();
    // A cookie made two periods ago is refused.
    set_secrets(&mut program, [secret(1), secret(0)]);
    let stale = syncookie::syn_cookie(&secret(1), &key, CLIENT_SEQ, period.wrapping_sub(2), 3);
    assert_eq!(program.run(&first_segment(stale)).0, XDP_DROP);
    assert_eq!(handshakes(&program), 0, "a cookie two periods old");
    // After one rotation a cookie of the previous secret still completes its handshake.
    let cookie = syncookie::syn_cookie(&secret(1), &key, CLIENT_SEQ, period, 3);
    set_secrets(&mut program, [secret(2), secret(1)]);
    program.run(&first_segment(cookie));
    assert_eq!(handshakes(&program), 1, "a cookie of the previous secret");
    // After two it does not.
    let other = FlowKey {
        sport: (CLIENT_PORT + 1).to_be(),
        ..key
    };
    let cookie = syncookie::syn_cookie(&secret(1), &other, CLIENT_SEQ, period, 3);
    set_secrets(&mut program, [secret(3), secret(2)]);
    let segment = tcp_segment(
        &syn_ip,
        (CLIENT_PORT + 1, COOKIE_PORT),
        (CLIENT_SEQ + 1, cookie.wrapping_add(1)),
        TCP_ACK,
        502,
        b"",
    );
    program.run(&ipv4_frame(FROM_CLIENT.0, FROM_CLIENT.1, &syn_ip, &segment));
    assert_eq!(
        handshakes(&program),
        1,
        "a cookie of a secret two rotations old"
    );
    assert_eq!(program.counters()[Reason::DropBadCookie as usize], 2);
}

/// The key of the client's TCP flow from [`CLIENT_PORT`] to the VIP's `port`.
fn client_flow(port: u16) -> FlowKey {
    FlowKey {
        src: addr(CLIENT),
        dst: addr(VIP),
        sport: CLIENT_PORT.to_be(),
        dport: port.to_be(),
        proto: PROTO_TCP,
        _pad: [0; 3],
    }
}

/// The backend side's key of a cookie connection from the client's port to backend 0.
fn reply_flow(client_key: &FlowKey) -> FlowKey {
    FlowKey {
        src: addr(BACKEND),
        dst: client_key.src,
        sport: WEB_BACKEND_PORT.to_be(),
        dport: client_key.sport,
        proto: PROTO_TCP,
        _pad: [0; 3],
    }
}

/// A cookie connection's flow entry to backend 0 in `state`.
fn flow_to_backend(state: u16) -> Flow {
    Flow {
        backend_id: 0,
        backend_addr: addr(BACKEND),
        backend_port: WEB_BACKEND_PORT.to_be(),
        state,
        ..Flow::default()
    }
}

/// Writes both entries of a spliced cookie connection from the client's port to backend 0.
fn splice(program: &mut Program, client_key: &FlowKey, flow: Flow, nat: ReverseNat) {
    let reply_key = reply_flow(client_key);
    let mut flows: HashMap<&mut MapData, FlowKey, Flow> =
        HashMap::try_from(program.map(map_name::FLOWS)).unwrap();
    flows.insert(client_key, flow, 0).unwrap();
    let mut reverse: HashMap<&mut MapData, FlowKey, ReverseNat> =
        HashMap::try_from(program.map(map_name::REVERSE)).unwrap();
    reverse.insert(reply_key, nat, 0).unwrap();
}

#[test]
fn a_splice_moves_sequence_numbers_past_an_edited_head_and_a_shortened_request() {
    let mut program = Program::in_private_network("splice");
    // The client knows the balancer's ISN; the backend's is DELTA further. The agent added
    // INSERTED bytes to the response head, which ends at HEAD_END in the client's space, and
    // took REMOVED bytes out of the request.
    const DELTA: u32 = 1_000_000;
    const INSERTED: u32 = 70;
    const REMOVED: u32 = 9;
    const COOKIE_ISN: u32 = 5_000;
    const HEAD_END: u32 = COOKIE_ISN + 1 + 400;
    let backend_head_end = HEAD_END.wrapping_add(DELTA) - INSERTED;
    let key = client_flow(COOKIE_PORT);
    splice(
        &mut program,
        &key,
        Flow {
            seq_delta: DELTA,
            inserted: INSERTED,
            head_end: HEAD_END,
            removed: REMOVED,
            ..flow_to_backend(flow_state::SPLICED)
        },
        ReverseNat {
            vip: addr(VIP),
            port: COOKIE_PORT.to_be(),
            state: flow_state::SPLICED,
            seq_delta: DELTA - INSERTED,
            inserted: INSERTED,
            head_end: backend_head_end,
            removed: REMOVED,
            ..ReverseNat::default()
        },
    );
    let from_client = ip(CLIENT, VIP, PROTO_TCP);
    let at_backend = Ip {
        ttl: from_client.ttl - 1,
        ..ip(CLIENT, BACKEND, PROTO_TCP)
    };
    let from_backend = ip(BACKEND, CLIENT, PROTO_TCP);
    let at_client = Ip {
        ttl: from_backend.ttl - 1,
        ..ip(VIP, CLIENT, PROTO_TCP)
    };
    // Every segment of the connection: an ACK with a window of 500, perhaps with data.
    let frame = |ip: &Ip, macs: ([u8; 6], [u8; 6]), ports, seq_ack, payload: &[u8]| {
        let segment = tcp_segment(ip, ports, seq_ack, TCP_ACK, 500, payload);
        ipv4_frame(macs.0, macs.1, ip, &segment)
    };
    let client_seq = CLIENT_SEQ + 600;
    let client_ack = |ack| {
        frame(
            &from_client,
            FROM_CLIENT,
            (CLIENT_PORT, COOKIE_PORT),
            (client_seq, ack),
            b"",
        )
    };
    let at_backend_ack = |ack| {
        frame(
            &at_backend,
            TO_BACKEND,
            (CLIENT_PORT, WEB_BACKEND_PORT),
            (client_seq - REMOVED, ack),
            b"",
        )
    };
    let backend_data = |seq| {
        frame(
            &from_backend,
            FROM_BACKEND,
            (WEB_BACKEND_PORT, CLIENT_PORT),
            (seq, client_seq - REMOVED),
            b"body",
        )
    };
    let at_client_data = |seq| {
        frame(
            &at_client,
            TO_CLIENT,
            (COOKIE_PORT, CLIENT_PORT),
            (seq, client_seq),
            b"body",
        )
    };

    // Inside the edited head: acknowledged at most up to the original head's last byte.
    let (action, output) = program.run(&client_ack(HEAD_END - 10));
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(
        output,
        at_backend_ack(backend_head_end - 1),
        "clamped below the head's end"
    );
    // Head bytes the backend sends again go to the agent while the client lacks the head.
    let (action, _) = program.run(&backend_data(backend_head_end - 100));
    assert_eq!(action, XDP_DROP, "punted");
    assert_eq!(program.counters()[Reason::Punted as usize], 1);
    assert_eq!(
        program.flow(&key).unwrap().flags & flow_flags::HEAD_ACKED,
        0
    );

    // The whole head acknowledged: past it, exact, and the flow remembers.
    let (action, output) = program.run(&client_ack(HEAD_END + 50));
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(output, at_backend_ack(HEAD_END + 50 + DELTA - INSERTED));
    assert_ne!(
        program.flow(&key).unwrap().flags & flow_flags::HEAD_ACKED,
        0
    );

    // Backend data past the head: moved by the insertion; its ack by the removed bytes.
    let (action, output) = program.run(&backend_data(backend_head_end + 1_000));
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(output, at_client_data(HEAD_END + 1_000));
    // Before the head end again (2 GB later, say): the client has the head, so forwarded.
    let (action, _) = program.run(&backend_data(backend_head_end - 100));
    assert_eq!(
        action, XDP_REDIRECT,
        "not punted once the head is acknowledged"
    );
}

#[test]
fn xdp_puts_the_cookie_lines_behind_the_first_status_line_and_again_when_the_backend_resends_it() {
    let mut program = Program::in_private_network("head");
    // The client knows the balancer's ISN; the backend's is DELTA further. The response
    // starts at the backend's RESPONSE_START; the status line is 17 bytes, odd, so the
    // lines' words land byte-swapped in the checksum.
    const DELTA: u32 = 1_000_000;
    const RESPONSE_START: u32 = 5_001 + DELTA;
    const LINES: &[u8] = b"Set-Cookie: LB=abc; Path=/\r\n";
    const STATUS: &[u8] = b"HTTP/1.1 200 OK\r\n";
    const REST: &[u8] = b"Content-Length: 4\r\n\r\nbody";
    let inserted = LINES.len() as u32;
    let key = client_flow(COOKIE_PORT);
    let head_nat = ReverseNat {
        vip: addr(VIP),
        port: COOKIE_PORT.to_be(),
        state: flow_state::RESPONSE_HEAD,
        seq_delta: DELTA,
        head_end: RESPONSE_START,
        flags: reverse_flags::HEAD_TO_AGENT | reverse_flags::COOKIE_BY_XDP,
        ..ReverseNat::default()
    };
    splice(
        &mut program,
        &key,
        Flow {
            seq_delta: DELTA,
            ..flow_to_backend(flow_state::SPLICED)
        },
        head_nat,
    );
    let mut lines = HeadInsert::zeroed();
    lines.lines[..LINES.len()].copy_from_slice(LINES);
    lines.len = LINES.len() as u16;
    lines.sum = csum::sum_words(LINES);
    lines.max_payload = 1400;
    let mut head_inserts: HashMap<&mut MapData, FlowKey, HeadInsert> =
        HashMap::try_from(program.map(map_name::HEAD_INSERTS)).unwrap();
    head_inserts.insert(key, lines, 0).unwrap();

    let from_backend = ip(BACKEND, CLIENT, PROTO_TCP);
    let at_client = Ip {
        ttl: from_backend.ttl - 1,
        ..ip(VIP, CLIENT, PROTO_TCP)
    };
    let client_seq = CLIENT_SEQ + 100;
    let backend = |seq, payload: &[u8]| {
        let segment = tcp_segment(
            &from_backend,
            (WEB_BACKEND_PORT, CLIENT_PORT),
            (seq, client_seq),
            TCP_ACK,
            500,
            payload,
        );
        ipv4_frame(FROM_BACKEND.0, FROM_BACKEND.1, &from_backend, &segment)
    };
    let to_client = |seq, payload: &[u8]| {
        let segment = tcp_segment(
            &at_client,
            (COOKIE_PORT, CLIENT_PORT),
            (seq, client_seq),
            TCP_ACK,
            500,
            payload,
        );
        ipv4_frame(TO_CLIENT.0, TO_CLIENT.1, &at_client, &segment)
    };
    let first = [STATUS, REST].concat();
    let edited = [STATUS, LINES, REST].concat();
    let client_start = RESPONSE_START - DELTA;

    // The first segment gets the lines, byte for byte with full checksums.
    let (action, output) = program.run(&backend(RESPONSE_START, &first));
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(output, to_client(client_start, &edited));
    assert_eq!(program.counters()[Reason::CookieInserted as usize], 1);
    let flow = program.flow(&key).unwrap();
    assert_eq!(
        (
            flow.inserted,
            flow.head_end,
            flow.flags & flow_flags::HEAD_BY_XDP
        ),
        (
            inserted,
            client_start + (STATUS.len() as u32) + inserted,
            flow_flags::HEAD_BY_XDP
        )
    );
    let nat = program.reverse(&reply_flow(&key)).unwrap();
    assert_eq!(
        (nat.state, nat.seq_delta, nat.inserted, nat.head_end),
        (
            flow_state::SPLICED,
            DELTA - inserted,
            inserted,
            RESPONSE_START
        )
    );
    assert_ne!(nat.flags & reverse_flags::HEAD_BY_XDP, 0);

    // Sent again: the same edited segment; the next one moved past the lines.
    let (action, output) = program.run(&backend(RESPONSE_START, &first));
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(output, to_client(client_start, &edited), "inserted again");
    assert_eq!(program.counters()[Reason::CookieInserted as usize], 2);
    let next = RESPONSE_START + first.len() as u32;
    let (action, output) = program.run(&backend(next, b"more"));
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(output, to_client(next - DELTA + inserted, b"more"));
    // From inside the status line: nothing the client can have asked for.
    let (action, _) = program.run(&backend(RESPONSE_START + 5, &first[5..]));
    assert_eq!(action, XDP_DROP);
    assert_eq!(program.counters()[Reason::DropInsideStatusLine as usize], 1);

    // The client acknowledges the edited segment: exact in the backend's space, and the
    // lines are gone.
    let from_client = ip(CLIENT, VIP, PROTO_TCP);
    let at_backend = Ip {
        ttl: from_client.ttl - 1,
        ..ip(CLIENT, BACKEND, PROTO_TCP)
    };
    let ack = client_start + edited.len() as u32;
    let segment = tcp_segment(
        &from_client,
        (CLIENT_PORT, COOKIE_PORT),
        (client_seq, ack),
        TCP_ACK,
        500,
        b"",
    );
    let client_ack = ipv4_frame(FROM_CLIENT.0, FROM_CLIENT.1, &from_client, &segment);
    let _ = program.punts();
    let (action, output) = program.run(&client_ack);
    assert_eq!(action, XDP_REDIRECT);
    let expected = tcp_segment(
        &at_backend,
        (CLIENT_PORT, WEB_BACKEND_PORT),
        (client_seq, RESPONSE_START + first.len() as u32),
        TCP_ACK,
        500,
        b"",
    );
    assert_eq!(
        output,
        ipv4_frame(TO_BACKEND.0, TO_BACKEND.1, &at_backend, &expected)
    );
    assert_ne!(
        program.flow(&key).unwrap().flags & flow_flags::HEAD_ACKED,
        0
    );
    let head_inserts: HashMap<&mut MapData, FlowKey, HeadInsert> =
        HashMap::try_from(program.map(map_name::HEAD_INSERTS)).unwrap();
    assert!(head_inserts.get(&key, 0).is_err(), "the lines are dropped");
    // The agent is told, with the client's frame as it came, once.
    let punts = program.punts();
    assert_eq!(punts.len(), 1);
    assert_eq!(punts[0].kind, punt_kind::HEAD_DELIVERED);
    assert_eq!(&punts[0].frame[..punts[0].len as usize], &client_ack[..]);
    assert_eq!(program.counters()[Reason::HeadDelivered as usize], 1);
    let (action, _) = program.run(&client_ack);
    assert_eq!(action, XDP_REDIRECT);
    assert!(
        program.punts().is_empty(),
        "an acknowledgement again is not told"
    );
    assert_eq!(program.counters()[Reason::HeadDelivered as usize], 1);

    // Heads XDP leaves to the agent: an interim one, and one that would outgrow the MSS.
    let punted = program.counters()[Reason::Punted as usize];
    for payload in [
        b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(),
        [STATUS, &[b'x'; 1390]].concat(),
    ] {
        splice(
            &mut program,
            &key,
            Flow {
                seq_delta: DELTA,
                ..flow_to_backend(flow_state::SPLICED)
            },
            head_nat,
        );
        let mut head_inserts: HashMap<&mut MapData, FlowKey, HeadInsert> =
            HashMap::try_from(program.map(map_name::HEAD_INSERTS)).unwrap();
        head_inserts.insert(key, lines, 0).unwrap();
        let (action, _) = program.run(&backend(RESPONSE_START, &payload));
        assert_eq!(action, XDP_DROP, "punted");
        let nat = program.reverse(&reply_flow(&key)).unwrap();
        assert_eq!(nat.state, flow_state::RESPONSE_HEAD);
    }
    assert_eq!(program.counters()[Reason::Punted as usize], punted + 2);
    assert_eq!(program.counters()[Reason::CookieInserted as usize], 2);
}

/// Writes the binding of a handshake the client completed on its port with the cookie
/// `cookie_isn`, its SYN having offered an MSS of 1460, window scale 7, SACK and, when
/// `timestamps` is 1, timestamps; one of its segments already handed to the agent.
fn accepted_binding(
    program: &mut Program,
    key: &FlowKey,
    cookie_isn: u32,
    timestamps: u8,
) -> Binding {
    let binding = Binding {
        client_isn: CLIENT_SEQ,
        cookie_isn,
        options: SynOptions {
            mss: 1460,
            window_shift: 7,
            sack_permitted: 1,
            timestamps,
            _pad: [0; 3],
        },
        state: binding_state::ACCEPTED,
        punts: 1,
        accepted_s: coarse_seconds(),
    };
    let mut bindings: HashMap<&mut MapData, FlowKey, Binding> =
        HashMap::try_from(program.map(map_name::BINDINGS)).unwrap();
    bindings.insert(key, binding, 0).unwrap();
    binding
}

#[test]
fn the_backends_syn_ack_is_recorded_as_the_splice_by_xdp_and_punts_carry_the_binding() {
    let mut program = Program::in_private_network("synack");
    program.agent_alive_with_workers(0, MAX_AGENT_WORKERS as u32);
    // The agent sent the backend the client's SYN and wrote what the splice needs but the
    // backend's ISN: the end of the replay, the window scales, that the head comes to it.
    const COOKIE_ISN: u32 = 5_000;
    const BACKEND_ISN: u32 = 0xfff0_0000;
    const REPLAY_END: u32 = CLIENT_SEQ + 1 + 300;
    let key = client_flow(COOKIE_PORT);
    let reply_key = reply_flow(&key);
    let binding = accepted_binding(&mut program, &key, COOKIE_ISN, 0);
    let connecting = ReverseNat {
        vip: addr(VIP),
        port: COOKIE_PORT.to_be(),
        state: flow_state::CONNECTING,
        backend_window_shift: 9,
        client_window_shift: 7,
        replay_end: REPLAY_END,
        flags: reverse_flags::HEAD_TO_AGENT,
        ..ReverseNat::default()
    };
    splice(
        &mut program,
        &key,
        flow_to_backend(flow_state::CONNECTING),
        connecting,
    );
    let syn_ack = |ack| {
        let from_backend = ip(BACKEND, CLIENT, PROTO_TCP);
        let ports = (WEB_BACKEND_PORT, CLIENT_PORT);
        let segment = tcp_segment(
            &from_backend,
            ports,
            (BACKEND_ISN, ack),
            TCP_SYN | TCP_ACK,
            500,
            b"",
        );
        ipv4_frame(FROM_BACKEND.0, FROM_BACKEND.1, &from_backend, &segment)
    };

    // More of the client's request while the backend side opens: to the agent, with the
    // binding as it stands (this segment counted against its budget).
    let from_client = ip(CLIENT, VIP, PROTO_TCP);
    let more = tcp_segment(
        &from_client,
        (CLIENT_PORT, COOKIE_PORT),
        (CLIENT_SEQ + 301, COOKIE_ISN + 1),
        TCP_ACK,
        500,
        b"more",
    );
    let more = ipv4_frame(FROM_CLIENT.0, FROM_CLIENT.1, &from_client, &more);
    assert_eq!(program.run(&more).0, XDP_DROP);
    // Both legs' frames go to the worker that owns the client's prefix (not the first one,
    // where frames would go without steering).
    let owner = worker_of(&addr(CLIENT), MAX_AGENT_WORKERS as u32) as usize;
    assert_ne!(owner, 0);
    let punts = program.punts_of_worker(owner);
    assert_eq!(punts.len(), 1);
    assert_eq!(punts[0].kind, punt_kind::CLIENT);
    assert_eq!(
        punts[0].binding,
        Binding {
            punts: 2,
            ..binding
        }
    );
    assert_eq!(&punts[0].frame[..punts[0].len as usize], &more[..]);

    // A SYN-ACK that acknowledges no SYN of ours: to the agent, nothing recorded.
    let stale = syn_ack(CLIENT_SEQ + 2);
    assert_eq!(program.run(&stale).0, XDP_DROP);
    assert_eq!(program.flow(&key).unwrap().state, flow_state::CONNECTING);
    assert_eq!(program.reverse(&reply_key), Some(connecting));
    let punts = program.punts_of_worker(owner);
    assert_eq!((punts.len(), punts[0].kind), (1, punt_kind::BACKEND));
    assert_eq!(punts[0].binding.state, binding_state::NONE);

    // The backend's answer: both entries spliced by the offset from the cookie to its ISN,
    // the reverse one reading the head first; the agent gets the SYN-ACK and the binding.
    let answer = syn_ack(CLIENT_SEQ + 1);
    assert_eq!(program.run(&answer).0, XDP_DROP);
    let delta = BACKEND_ISN.wrapping_sub(COOKIE_ISN);
    let flow = program.flow(&key).unwrap();
    assert_eq!((flow.state, flow.seq_delta), (flow_state::SPLICED, delta));
    assert_eq!(
        program.reverse(&reply_key),
        Some(ReverseNat {
            state: flow_state::RESPONSE_HEAD,
            seq_delta: delta,
            ..connecting
        }),
        "the replay's end and the window scales stay as the agent wrote them"
    );
    let punts = program.punts_of_worker(owner);
    assert_eq!(punts.len(), 1);
    assert_eq!(
        punts[0].binding,
        Binding {
            punts: 2,
            ..binding
        }
    );
    assert_eq!(&punts[0].frame[..punts[0].len as usize], &answer[..]);

    // The same SYN-ACK again (the agent's ACK was lost): to the agent, which answers it.
    assert_eq!(program.run(&answer).0, XDP_DROP);
    assert_eq!(program.punts()[0].binding.state, binding_state::NONE);
    assert_eq!(program.counters()[Reason::Punted as usize], 4);
}

/// Backend 0's SYN-ACK of ISN `backend_isn` to the client's port, its options laid out as
/// Linux lays them out: MSS 1460, SACK-permitted, timestamps (`tsval`, `tsecr`), window scale
/// `window_shift`.
fn timestamped_syn_ack(backend_isn: u32, (tsval, tsecr): (u32, u32), window_shift: u8) -> Vec<u8> {
    let from_backend = ip(BACKEND, CLIENT, PROTO_TCP);
    let mut options = vec![2, 4, 0x05, 0xb4, 4, 2, 8, 10];
    options.extend_from_slice(&tsval.to_be_bytes());
    options.extend_from_slice(&tsecr.to_be_bytes());
    options.extend_from_slice(&[1, 3, 3, window_shift]);
    let syn_ack = tcp_with_options(
        &from_backend,
        (WEB_BACKEND_PORT, CLIENT_PORT),
        (backend_isn, CLIENT_SEQ + 1),
        TCP_SYN | TCP_ACK,
        500,
        &options,
    );
    ipv4_frame(FROM_BACKEND.0, FROM_BACKEND.1, &from_backend, &syn_ack)
}

/// The replay XDP sends back to backend 0 for its SYN-ACK of ISN `backend_isn`: `request`
/// with the client's window of 1234 and timestamps (`tsval`, the SYN-ACK's `echo`), in a frame
/// written whole.
fn timestamped_replay(backend_isn: u32, (tsval, echo): (u32, u32), request: &[u8]) -> Vec<u8> {
    let to_backend = Ip {
        id: 0,
        ..ip(CLIENT, BACKEND, PROTO_TCP)
    };
    let mut timestamps = vec![1, 1, 8, 10];
    timestamps.extend_from_slice(&tsval.to_be_bytes());
    timestamps.extend_from_slice(&echo.to_be_bytes());
    let segment = tcp_with_options_and_data(
        &to_backend,
        (CLIENT_PORT, WEB_BACKEND_PORT),
        (CLIENT_SEQ + 1, backend_isn + 1),
        (TCP_ACK | TCP_PSH, 1234),
        &timestamps,
        request,
    );
    ipv4_frame(FROM_BACKEND.1, FROM_BACKEND.0, &to_backend, &segment)
}

#[test]
fn the_backends_syn_ack_is_answered_with_the_agents_replay_by_xdp_byte_for_byte() {
    let mut program = Program::in_private_network("replay");
    const COOKIE_ISN: u32 = 5_000;
    const BACKEND_ISN: u32 = 0xfff0_0000;
    // Of odd length, as requests often are: the last byte's word is padded.
    const REQUEST: &[u8] = b"GET /odd HTTP/1.1\r\nHost: x\r\n\r\n";
    let key = client_flow(COOKIE_PORT);
    let reply_key = reply_flow(&key);
    let binding = accepted_binding(&mut program, &key, COOKIE_ISN, 0);
    let connecting = ReverseNat {
        vip: addr(VIP),
        port: COOKIE_PORT.to_be(),
        state: flow_state::CONNECTING,
        replay_end: CLIENT_SEQ + 1 + REQUEST.len() as u32,
        flags: reverse_flags::REPLAY_BY_XDP,
        ..ReverseNat::default()
    };
    splice(
        &mut program,
        &key,
        flow_to_backend(flow_state::CONNECTING),
        connecting,
    );
    let mut replay = Replay::zeroed();
    replay.bytes[..REQUEST.len()].copy_from_slice(REQUEST);
    replay.len = REQUEST.len() as u16;
    replay.sum = csum::sum_words(REQUEST);
    replay.window = 1234;
    program.leave_replay(key, replay);

    let from_backend = ip(BACKEND, CLIENT, PROTO_TCP);
    let syn_ack = tcp_segment(
        &from_backend,
        (WEB_BACKEND_PORT, CLIENT_PORT),
        (BACKEND_ISN, CLIENT_SEQ + 1),
        TCP_SYN | TCP_ACK,
        500,
        b"",
    );
    let syn_ack = ipv4_frame(FROM_BACKEND.0, FROM_BACKEND.1, &from_backend, &syn_ack);
    let (action, output) = program.run(&syn_ack);
    assert_eq!(action, XDP_TX);
    // Back to the backend from the client, as the agent's raw socket would send it, in a
    // frame written whole.
    let to_backend = Ip {
        id: 0,
        ..ip(CLIENT, BACKEND, PROTO_TCP)
    };
    let expected = tcp_segment(
        &to_backend,
        (CLIENT_PORT, WEB_BACKEND_PORT),
        (CLIENT_SEQ + 1, BACKEND_ISN + 1),
        TCP_ACK | TCP_PSH,
        1234,
        REQUEST,
    );
    assert_eq!(
        output,
        ipv4_frame(FROM_BACKEND.1, FROM_BACKEND.0, &to_backend, &expected)
    );
    assert_eq!(program.counters()[Reason::ReplayedByXdp as usize], 1);
    assert_eq!(program.counters()[Reason::Punted as usize], 0);
    // The agent gets the SYN-ACK as it came, for its books.
    let punts = program.punts();
    assert_eq!(punts.len(), 1);
    assert_eq!(punts[0].kind, punt_kind::REPLAYED);
    assert_eq!(punts[0].binding, binding);
    assert_eq!(&punts[0].frame[..punts[0].len as usize], &syn_ack[..]);
    let delta = BACKEND_ISN.wrapping_sub(COOKIE_ISN);
    assert_eq!(program.reverse(&reply_key).unwrap().seq_delta, delta);

    // The replay is sent once: the same SYN-ACK again (the replay was lost) goes to the
    // agent, which answers it from its own copy of the request.
    assert!(program.replay(&key).is_none());
    assert_eq!(program.run(&syn_ack).0, XDP_DROP);
    let punts = program.punts();
    assert_eq!(punts.len(), 1);
    assert_eq!(punts[0].kind, punt_kind::BACKEND);
    assert_eq!(&punts[0].frame[..punts[0].len as usize], &syn_ack[..]);
    assert_eq!(program.counters()[Reason::ReplayedByXdp as usize], 1);
    assert_eq!(program.counters()[Reason::Punted as usize], 1);

    // With timestamps: the replay carries the client's clock as the agent moved it and
    // echoes the TSval of a SYN-ACK laid out as Linux lays it out.
    const TSVAL: u32 = 0x0102_0304;
    const BACKEND_TSVAL: u32 = 0x0a0b_0c0d;
    splice(
        &mut program,
        &key,
        flow_to_backend(flow_state::CONNECTING),
        ReverseNat {
            flags: reverse_flags::REPLAY_BY_XDP | reverse_flags::TIMESTAMPS,
            ts_delta: 77,
            ..connecting
        },
    );
    let timestamped = Replay {
        timestamps: 1,
        tsval: TSVAL,
        ..replay
    };
    program.leave_replay(key, timestamped);
    let syn_ack = timestamped_syn_ack(BACKEND_ISN, (BACKEND_TSVAL, 0), 7);
    let (action, output) = program.run(&syn_ack);
    assert_eq!(action, XDP_TX);
    assert_eq!(
        output,
        timestamped_replay(BACKEND_ISN, (TSVAL, BACKEND_TSVAL), REQUEST)
    );
    assert_eq!(program.counters()[Reason::ReplayedByXdp as usize], 2);

    // A SYN-ACK announcing another window scale than the splice was written with (7, not
    // 9): to the agent, which corrects the entries before it replays; the replay stays.
    program.leave_replay(key, timestamped);
    let scaled = ReverseNat {
        flags: reverse_flags::REPLAY_BY_XDP | reverse_flags::TIMESTAMPS,
        ts_delta: 77,
        client_window_shift: 7,
        backend_window_shift: 9,
        ..connecting
    };
    splice(
        &mut program,
        &key,
        flow_to_backend(flow_state::CONNECTING),
        scaled,
    );
    let _ = program.punts();
    assert_eq!(program.run(&syn_ack).0, XDP_DROP);
    assert_eq!(program.punts()[0].kind, punt_kind::BACKEND);
    assert_eq!(program.counters()[Reason::ReplayedByXdp as usize], 2);
    assert!(program.replay(&key).is_some());
    // The one it was written with: replayed.
    splice(
        &mut program,
        &key,
        flow_to_backend(flow_state::CONNECTING),
        ReverseNat {
            backend_window_shift: 7,
            ..scaled
        },
    );
    assert_eq!(program.run(&syn_ack).0, XDP_TX);
    assert_eq!(program.punts()[0].kind, punt_kind::REPLAYED);
}

#[test]
fn a_returning_sessions_request_is_bound_by_xdp_from_its_known_session_byte_for_byte() {
    let mut program = Program::in_private_network("bind");
    program.agent_alive_seconds_ago(0);
    const COOKIE_ISN: u32 = 5_000;
    const BACKEND_ISN: u32 = 0xfff0_0000;
    const CLIENT_TSVAL: u32 = 0x0102_0304;
    const ECHOED_TSVAL: u32 = 0x0a0b_0c0d;
    const BACKEND_TSVAL: u32 = 0x0500_0000;
    const COOKIE: &[u8] = b"SID=returning-session";
    // The cookie's first four bytes appear first inside it; of odd length.
    let request = |cookie: &[u8]| {
        [
            b"GET /a?x=SID HTTP/1.1\r\nHost: x\r\nCookie: a=1; ".as_slice(),
            cookie,
            b"; b=2\r\n\r\n",
        ]
        .concat()
    };
    let key = client_flow(COOKIE_PORT);
    let reply_key = reply_flow(&key);
    let binding = Binding {
        punts: 0,
        ..accepted_binding(&mut program, &key, COOKIE_ISN, 1)
    };
    let known = |cookie: &[u8]| {
        let mut session = KnownSession::zeroed();
        session.cookie[..cookie.len()].copy_from_slice(cookie);
        session.len = cookie.len() as u16;
        session.backend_id = 0;
        session.until_s = coarse_seconds() + 30;
        session.generation = FIXTURE_GENERATION;
        session
    };
    let from_client = ip(CLIENT, VIP, PROTO_TCP);
    let mut client_timestamps = vec![1, 1, 8, 10];
    client_timestamps.extend_from_slice(&CLIENT_TSVAL.to_be_bytes());
    client_timestamps.extend_from_slice(&ECHOED_TSVAL.to_be_bytes());
    let segment_at = |port: u16, offset: u32, request: &[u8]| {
        let segment = tcp_with_options_and_data(
            &from_client,
            (port, COOKIE_PORT),
            (CLIENT_SEQ + 1 + offset, COOKIE_ISN + 1),
            (TCP_ACK | TCP_PSH, 1234),
            &client_timestamps,
            request,
        );
        ipv4_frame(FROM_CLIENT.0, FROM_CLIENT.1, &from_client, &segment)
    };
    let segment = |request: &[u8]| segment_at(CLIENT_PORT, 0, request);
    let reset_binding = |program: &mut Program| {
        let mut bindings: HashMap<&mut MapData, FlowKey, Binding> =
            HashMap::try_from(program.map(map_name::BINDINGS)).unwrap();
        bindings.insert(key, binding, 0).unwrap();
    };

    // Another cookie of the name, or a service changed since the agent decided, or a
    // segment that does not start the request (its first one lost): the agent's.
    program.know_session(known(COOKIE));
    let (action, _) = program.run(&segment_at(CLIENT_PORT, 10, &request(COOKIE)));
    assert_eq!(action, XDP_DROP);
    assert_eq!(program.punts().len(), 1);
    reset_binding(&mut program);
    program.know_session(known(b"SID=returning-sessioN"));
    let (action, _) = program.run(&segment(&request(COOKIE)));
    assert_eq!(action, XDP_DROP);
    let punts = program.punts();
    assert_eq!((punts.len(), punts[0].kind), (1, punt_kind::CLIENT));
    program.know_session(known(COOKIE));
    program.change_service(COOKIE_PORT, |s| Service {
        generation: FIXTURE_GENERATION + 1,
        ..s
    });
    reset_binding(&mut program);
    assert_eq!(program.run(&segment(&request(COOKIE))).0, XDP_DROP);
    assert_eq!(program.punts().len(), 1);
    assert_eq!(program.counters()[Reason::Punted as usize], 3);
    assert_eq!(program.counters()[Reason::BoundByXdp as usize], 0);
    assert!(program.flow(&key).is_none());

    // The same cookie in the service as the agent saw it: the segment becomes the SYN to
    // the session's backend, with the client's address, port, ISN and options, and the
    // balancer's clock for its TSval.
    program.change_service(COOKIE_PORT, |s| Service {
        generation: FIXTURE_GENERATION,
        ..s
    });
    reset_binding(&mut program);
    let request = request(COOKIE);
    let before_ms = milliseconds();
    let (action, output) = program.run(&segment(&request));
    let after_ms = milliseconds();
    assert_eq!(action, XDP_REDIRECT);
    const SYN_TSVAL: usize = 14 + 20 + 20 + 8;
    let tsval_of =
        |syn: &[u8]| u32::from_be_bytes(syn[SYN_TSVAL..SYN_TSVAL + 4].try_into().unwrap());
    let tsval = tsval_of(&output);
    assert!(
        (before_ms..=after_ms).contains(&tsval),
        "the SYN's TSval {tsval} is the balancer's clock ({before_ms}..={after_ms})"
    );
    let syn = |tsval: u32| {
        let to_backend = Ip {
            id: 0,
            ttl: 63,
            ..ip(CLIENT, BACKEND, PROTO_TCP)
        };
        let mut options = vec![2, 4, 0x05, 0xb4, 4, 2, 8, 10];
        options.extend_from_slice(&tsval.to_be_bytes());
        options.extend_from_slice(&[0, 0, 0, 0, 1, 3, 3, 7]);
        let syn = tcp_with_options(
            &to_backend,
            (CLIENT_PORT, WEB_BACKEND_PORT),
            (CLIENT_SEQ, 0),
            TCP_SYN,
            u16::MAX,
            &options,
        );
        ipv4_frame(TO_BACKEND.0, TO_BACKEND.1, &to_backend, &syn)
    };
    assert_eq!(output, syn(tsval));
    assert_eq!(program.counters()[Reason::BoundByXdp as usize], 1);
    assert_eq!(program.counters()[Reason::Punted as usize], 3);
    assert!(program.punts().is_empty(), "the agent hears nothing of it");

    // Until the splice the client's segments are XDP's: a segment behind the request waits
    // for the client to send it again. The request sent again (XDP's SYN or the backend's
    // answer was lost, or the backend does not answer) goes to the agent, which times its
    // SYNs, and XDP binds by the session no more.
    let behind = segment_at(CLIENT_PORT, request.len() as u32, b"more");
    assert_eq!(program.run(&behind).0, XDP_DROP);
    assert_eq!(program.counters()[Reason::DropWhileBinding as usize], 1);
    assert_eq!(program.run(&segment(&request)).0, XDP_DROP);
    let punts = program.punts();
    assert_eq!((punts.len(), punts[0].kind), (1, punt_kind::CLIENT));
    assert_eq!(program.counters()[Reason::BoundByXdp as usize], 1);
    assert!(program.known_session().is_none());
    program.know_session(known(COOKIE));

    // The entries the agent writes with its SYN, marked as XDP's; the request as the replay.
    let to_backend_ts = tsval.wrapping_sub(CLIENT_TSVAL);
    let flow = program.flow(&key).unwrap();
    assert_eq!(
        flow,
        Flow {
            flags: flow_flags::BOUND_BY_XDP | flow_flags::TIMESTAMPS,
            last_seen_s: flow.last_seen_s,
            ts_delta: ECHOED_TSVAL,
            client_ts_delta: to_backend_ts,
            ..flow_to_backend(flow_state::CONNECTING)
        }
    );
    let connecting = ReverseNat {
        vip: addr(VIP),
        port: COOKIE_PORT.to_be(),
        state: flow_state::CONNECTING,
        client_window_shift: 7,
        replay_end: CLIENT_SEQ + 1 + request.len() as u32,
        flags: reverse_flags::REPLAY_BY_XDP
            | reverse_flags::BOUND_BY_XDP
            | reverse_flags::TIMESTAMPS,
        ts_delta: ECHOED_TSVAL,
        client_ts_delta: to_backend_ts,
        ..ReverseNat::default()
    };
    assert_eq!(program.reverse(&reply_key).unwrap(), connecting);
    let mut replay = Replay::zeroed();
    replay.bytes[..request.len()].copy_from_slice(&request);
    replay.len = request.len() as u16;
    replay.sum = csum::sum_words(&request);
    replay.window = 1234;
    replay.timestamps = 1;
    replay.tsval = tsval;
    assert_eq!(program.replay(&key).unwrap(), replay);

    // The backend's SYN-ACK, announcing a window scale of 9: recorded, answered with the
    // replay, the scale taken from it, and no copy for the agent.
    let syn_ack = timestamped_syn_ack(BACKEND_ISN, (BACKEND_TSVAL, tsval), 9);
    let (action, output) = program.run(&syn_ack);
    assert_eq!(action, XDP_TX);
    assert_eq!(
        output,
        timestamped_replay(BACKEND_ISN, (tsval, BACKEND_TSVAL), &request)
    );
    assert!(program.punts().is_empty(), "no copy of the SYN-ACK");
    assert_eq!(program.counters()[Reason::ReplayedByXdp as usize], 1);
    let spliced = program.reverse(&reply_key).unwrap();
    assert_eq!(
        (
            spliced.state,
            spliced.backend_window_shift,
            spliced.seq_delta
        ),
        (flow_state::SPLICED, 9, BACKEND_ISN.wrapping_sub(COOKIE_ISN))
    );

    // The backend refuses XDP's SYN for another connection of the client: XDP forgets the
    // session, and the client's request sent again goes to the agent, which tries elsewhere.
    let other = FlowKey {
        sport: (CLIENT_PORT + 1).to_be(),
        ..key
    };
    let mut bindings: HashMap<&mut MapData, FlowKey, Binding> =
        HashMap::try_from(program.map(map_name::BINDINGS)).unwrap();
    bindings.insert(other, binding, 0).unwrap();
    let opening = segment_at(CLIENT_PORT + 1, 0, &request);
    assert_eq!(program.run(&opening).0, XDP_REDIRECT);
    let from_backend = ip(BACKEND, CLIENT, PROTO_TCP);
    let refusal = tcp_segment(
        &from_backend,
        (WEB_BACKEND_PORT, CLIENT_PORT + 1),
        (0, CLIENT_SEQ + 1),
        TCP_RST | TCP_ACK,
        0,
        b"",
    );
    let refusal = ipv4_frame(FROM_BACKEND.0, FROM_BACKEND.1, &from_backend, &refusal);
    assert_eq!(program.run(&refusal).0, XDP_DROP);
    assert!(program.punts().is_empty());
    assert_eq!(program.run(&opening).0, XDP_DROP);
    let punts = program.punts();
    assert_eq!((punts.len(), punts[0].kind), (1, punt_kind::CLIENT));
    assert_eq!(program.counters()[Reason::BoundByXdp as usize], 2);
    assert_eq!(program.counters()[Reason::DropWhileBinding as usize], 2);
}

/// A request without a cookie of the service's name is bound by XDP to the backend the
/// cookie fallback names, with the cookie lines the agent left for that backend: the SYN, the
/// entries (the first response head for XDP to edit) and the lines with the client's MSS. A
/// request naming the cookie anywhere, lines of another service generation or past their
/// time, and a copy of the lines torn by the agent's rewrite go to the agent.
#[test]
fn a_request_without_a_cookie_starts_a_session_in_xdp_with_its_backends_cookie_lines() {
    let mut program = Program::in_private_network("start");
    program.agent_alive_seconds_ago(0);
    const COOKIE_ISN: u32 = 7_000;
    // Even, as the agent pads them.
    const LINES: &[u8] = b"Set-Cookie: LBSESSION=abc; Max-Age=60; Path=/; HttpOnly \r\n";
    const _: () = assert!(LINES.len().is_multiple_of(2));
    let key = client_flow(COOKIE_PORT);
    let reply_key = reply_flow(&key);
    let binding = Binding {
        punts: 0,
        ..accepted_binding(&mut program, &key, COOKIE_ISN, 0)
    };
    let start = |generation: u32, until_s: u32| {
        let mut start = SessionStart::zeroed();
        start.lines.lines[..LINES.len()].copy_from_slice(LINES);
        start.lines.len = LINES.len() as u16;
        start.lines.sum = csum::sum_words(LINES);
        start.name_prefix = *b"LBSE";
        start.generation = generation;
        start.until_s = until_s;
        start
    };
    let leave_start = |program: &mut Program, start: SessionStart| {
        let mut starts: Array<&mut MapData, SessionStart> =
            Array::try_from(program.map(map_name::SESSION_STARTS)).unwrap();
        starts.set(0, start, 0).unwrap();
    };
    let reset_binding = |program: &mut Program| {
        let mut bindings: HashMap<&mut MapData, FlowKey, Binding> =
            HashMap::try_from(program.map(map_name::BINDINGS)).unwrap();
        bindings.insert(key, binding, 0).unwrap();
    };
    let from_client = ip(CLIENT, VIP, PROTO_TCP);
    let segment = |request: &[u8]| {
        let segment = tcp_segment(
            &from_client,
            (CLIENT_PORT, COOKIE_PORT),
            (CLIENT_SEQ + 1, COOKIE_ISN + 1),
            TCP_ACK | TCP_PSH,
            1234,
            request,
        );
        ipv4_frame(FROM_CLIENT.0, FROM_CLIENT.1, &from_client, &segment)
    };
    const PLAIN: &[u8] = b"GET /page HTTP/1.1\r\nHost: x\r\nCookie: other=1\r\n\r\n";
    let now = coarse_seconds();

    // The cookie's name in the head (here in the URL), lines of an older generation, lines
    // past their time, a torn copy: the agent's.
    leave_start(&mut program, start(FIXTURE_GENERATION, now + 10));
    reset_binding(&mut program);
    let named = b"GET /?LBSESSION=x HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(program.run(&segment(named)).0, XDP_DROP);
    for stale in [
        start(FIXTURE_GENERATION - 1, now + 10),
        start(FIXTURE_GENERATION, now - 1),
        SessionStart {
            lines: HeadInsert {
                sum: csum::sum_words(LINES) ^ 1,
                ..start(0, 0).lines
            },
            ..start(FIXTURE_GENERATION, now + 10)
        },
    ] {
        leave_start(&mut program, stale);
        reset_binding(&mut program);
        assert_eq!(program.run(&segment(PLAIN)).0, XDP_DROP);
    }
    let punts = program.punts();
    assert_eq!(punts.len(), 4);
    assert!(punts.iter().all(|p| p.kind == punt_kind::CLIENT));
    assert_eq!(program.counters()[Reason::BoundByXdp as usize], 0);
    assert!(program.head_insert(&key).is_none(), "the torn copy is gone");

    // The lines as the agent left them: the SYN to the service's one backend, the entries
    // with the head for XDP to edit, the lines with the client's MSS.
    leave_start(&mut program, start(FIXTURE_GENERATION, now + 10));
    reset_binding(&mut program);
    let (action, output) = program.run(&segment(PLAIN));
    assert_eq!(action, XDP_REDIRECT);
    let to_backend = Ip {
        id: 0,
        ttl: 63,
        ..ip(CLIENT, BACKEND, PROTO_TCP)
    };
    let syn = tcp_with_options(
        &to_backend,
        (CLIENT_PORT, WEB_BACKEND_PORT),
        (CLIENT_SEQ, 0),
        TCP_SYN,
        u16::MAX,
        &[2, 4, 0x05, 0xb4, 1, 3, 3, 7, 1, 1, 4, 2],
    );
    assert_eq!(
        output,
        ipv4_frame(TO_BACKEND.0, TO_BACKEND.1, &to_backend, &syn)
    );
    assert_eq!(program.counters()[Reason::BoundByXdp as usize], 1);
    assert!(program.punts().is_empty(), "the agent hears nothing of it");
    let flow = program.flow(&key).unwrap();
    assert_eq!(
        flow,
        Flow {
            flags: flow_flags::BOUND_BY_XDP,
            last_seen_s: flow.last_seen_s,
            ..flow_to_backend(flow_state::CONNECTING)
        }
    );
    assert_eq!(
        program.reverse(&reply_key).unwrap(),
        ReverseNat {
            vip: addr(VIP),
            port: COOKIE_PORT.to_be(),
            state: flow_state::CONNECTING,
            client_window_shift: 7,
            replay_end: CLIENT_SEQ + 1 + PLAIN.len() as u32,
            flags: reverse_flags::REPLAY_BY_XDP
                | reverse_flags::BOUND_BY_XDP
                | reverse_flags::HEAD_TO_AGENT
                | reverse_flags::COOKIE_BY_XDP,
            ..ReverseNat::default()
        }
    );
    assert_eq!(
        program.head_insert(&key).unwrap(),
        HeadInsert {
            max_payload: 1400,
            ..start(0, 0).lines
        }
    );
    assert_eq!(
        &program.replay(&key).unwrap().bytes[..PLAIN.len()],
        PLAIN,
        "the request, for the replay"
    );
}

#[test]
fn a_spliced_connection_with_timestamps_moves_the_backends_tsvals_onto_the_balancers_clock() {
    let mut program = Program::in_private_network("timestamps");
    program.agent_alive_seconds_ago(0);
    // The client had TSval BALANCER_TS from the balancer (its SYN-ACK, the agent's ACKs);
    // the backend's clock reads BACKEND_TS at its SYN-ACK; the client's, CLIENT_TS, reaches
    // the backend moved onto the balancer's clock by CLIENT_CLOCK_TO_BACKEND.
    const COOKIE_ISN: u32 = 5_000;
    const BACKEND_ISN: u32 = 0x7000_0000;
    const BALANCER_TS: u32 = 0x8000_0010;
    const BACKEND_TS: u32 = 0x0000_1000;
    const CLIENT_TS: u32 = 0x0bad_cafe;
    const CLIENT_CLOCK_TO_BACKEND: u32 = 0xf000_0001;
    let key = client_flow(COOKIE_PORT);
    let reply_key = reply_flow(&key);
    accepted_binding(&mut program, &key, COOKIE_ISN, 1);
    let connecting = ReverseNat {
        vip: addr(VIP),
        port: COOKIE_PORT.to_be(),
        state: flow_state::CONNECTING,
        backend_window_shift: 7,
        client_window_shift: 7,
        flags: reverse_flags::TIMESTAMPS,
        ts_delta: BALANCER_TS,
        client_ts_delta: CLIENT_CLOCK_TO_BACKEND,
        ..ReverseNat::default()
    };
    splice(
        &mut program,
        &key,
        Flow {
            flags: flow_flags::TIMESTAMPS,
            ts_delta: BALANCER_TS,
            client_ts_delta: CLIENT_CLOCK_TO_BACKEND,
            ..flow_to_backend(flow_state::CONNECTING)
        },
        connecting,
    );
    let from_backend = ip(BACKEND, CLIENT, PROTO_TCP);
    let backend_ports = (WEB_BACKEND_PORT, CLIENT_PORT);
    let syn_ack = |options: &[u8]| {
        let segment = tcp_with_options(
            &from_backend,
            backend_ports,
            (BACKEND_ISN, CLIENT_SEQ + 1),
            TCP_SYN | TCP_ACK,
            500,
            options,
        );
        ipv4_frame(FROM_BACKEND.0, FROM_BACKEND.1, &from_backend, &segment)
    };
    let timestamps = |value: u32, echo: u32| [value.to_be_bytes(), echo.to_be_bytes()].concat();
    let (b, c) = (BACKEND_TS.to_be_bytes(), CLIENT_TS.to_be_bytes());

    // Timestamps where XDP does not look for them: the agent records the splice.
    let unusual = [
        &[8, 10][..],
        &timestamps(BACKEND_TS, CLIENT_TS),
        &[2, 4, 5, 0xb4, 1, 3, 3, 7],
    ]
    .concat();
    assert_eq!(program.run(&syn_ack(&unusual)).0, XDP_DROP);
    assert_eq!(program.flow(&key).unwrap().state, flow_state::CONNECTING);
    assert_eq!(program.punts()[0].binding.state, binding_state::NONE);

    // Linux's layout (MSS, SACK-permitted, timestamps, NOP, window scale): recorded, the
    // backend's first TSval to become the balancer's last.
    let linux = [
        2, 4, 5, 0xb4, 4, 2, 8, 10, b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], 1, 3, 3, 7,
    ];
    assert_eq!(program.run(&syn_ack(&linux)).0, XDP_DROP);
    assert_eq!(program.punts()[0].binding.state, binding_state::ACCEPTED);
    let ts_delta = BALANCER_TS.wrapping_sub(BACKEND_TS);
    let flow = program.flow(&key).unwrap();
    assert_eq!((flow.state, flow.ts_delta), (flow_state::SPLICED, ts_delta));
    let nat = program.reverse(&reply_key).unwrap();
    assert_eq!((nat.state, nat.ts_delta), (flow_state::SPLICED, ts_delta));

    let delta = BACKEND_ISN.wrapping_sub(COOKIE_ISN);
    let at_client = Ip {
        ttl: from_backend.ttl - 1,
        ..ip(VIP, CLIENT, PROTO_TCP)
    };
    let from_client = ip(CLIENT, VIP, PROTO_TCP);
    let at_backend = Ip {
        ttl: from_client.ttl - 1,
        ..ip(CLIENT, BACKEND, PROTO_TCP)
    };
    let segment = |ip: &Ip, ports, seq_ack, options: &[u8], payload: &[u8]| {
        tcp_with_options_and_data(ip, ports, seq_ack, (TCP_ACK, 500), options, payload)
    };
    let nops_then = |option: &[u8]| [&[1, 1][..], option].concat();
    let timestamp_option =
        |value, echo| nops_then(&[&[8, 10][..], &timestamps(value, echo)].concat());

    // The backend's data: its TSval moved onto the balancer's clock, its echo of the
    // client's back onto the client's.
    let backend_seq = BACKEND_ISN + 1;
    let client_seq = CLIENT_SEQ + 1 + 300;
    let data = segment(
        &from_backend,
        backend_ports,
        (backend_seq, client_seq),
        &timestamp_option(
            BACKEND_TS + 7,
            CLIENT_TS.wrapping_add(CLIENT_CLOCK_TO_BACKEND) + 3,
        ),
        b"body",
    );
    let (action, output) = program.run(&ipv4_frame(
        FROM_BACKEND.0,
        FROM_BACKEND.1,
        &from_backend,
        &data,
    ));
    assert_eq!(action, XDP_REDIRECT);
    let expected = segment(
        &at_client,
        (COOKIE_PORT, CLIENT_PORT),
        (backend_seq.wrapping_sub(delta), client_seq),
        &timestamp_option(BALANCER_TS + 7, CLIENT_TS + 3),
        b"body",
    );
    assert_eq!(
        output,
        ipv4_frame(TO_CLIENT.0, TO_CLIENT.1, &at_client, &expected),
        "TSval and TSecr moved, byte for byte"
    );

    // The client's ACK with a SACK block behind its timestamps: its TSval onto the
    // balancer's clock, its echo back to the backend's, the block into the backend's
    // sequence space.
    let (left, right) = (COOKIE_ISN + 2_001, COOKIE_ISN + 3_001);
    let sack = |left: u32, right: u32| {
        nops_then(&[&[5, 10][..], &left.to_be_bytes(), &right.to_be_bytes()].concat())
    };
    let client_options = [
        timestamp_option(CLIENT_TS + 5, BALANCER_TS + 7),
        sack(left, right),
    ]
    .concat();
    let ack = segment(
        &from_client,
        (CLIENT_PORT, COOKIE_PORT),
        (client_seq, COOKIE_ISN + 1_001),
        &client_options,
        b"",
    );
    let (action, output) = program.run(&ipv4_frame(
        FROM_CLIENT.0,
        FROM_CLIENT.1,
        &from_client,
        &ack,
    ));
    assert_eq!(action, XDP_REDIRECT);
    let backend_options = [
        timestamp_option(
            CLIENT_TS.wrapping_add(CLIENT_CLOCK_TO_BACKEND) + 5,
            BACKEND_TS + 7,
        ),
        sack(left.wrapping_add(delta), right.wrapping_add(delta)),
    ]
    .concat();
    let expected = segment(
        &at_backend,
        (CLIENT_PORT, WEB_BACKEND_PORT),
        (client_seq, (COOKIE_ISN + 1_001).wrapping_add(delta)),
        &backend_options,
        b"",
    );
    assert_eq!(
        output,
        ipv4_frame(TO_BACKEND.0, TO_BACKEND.1, &at_backend, &expected),
        "TSval, TSecr and the SACK block moved, byte for byte"
    );
}

/// Reasons that count events in addition to a packet's exit, not exits of their own.
const EVENTS: [Reason; 7] = [
    Reason::NewFlow,
    Reason::NewSession,
    Reason::SessionMoved,
    Reason::PlacedWithoutAgent,
    Reason::ProxyHeaderInserted,
    Reason::NewFlowSourceLost,
    Reason::CookieInserted,
];

#[test]
#[ignore = "run by cargo xtask fuzz"]
fn fuzz_random_and_mutated_frames_each_leave_under_exactly_one_reason() {
    use rand::{rngs::SmallRng, Rng, SeedableRng};

    let program = Program::in_private_network("fuzz");
    let cases: u64 = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let seeds: Vec<Vec<u8>> = fixtures().into_iter().map(|f| f.input).collect();
    let mut rng = SmallRng::seed_from_u64(0x5eed_0005);
    let exits = |program: &Program| -> u64 {
        let counters = program.counters();
        Reason::ALL
            .iter()
            .filter(|reason| !EVENTS.contains(reason))
            .map(|reason| counters[*reason as usize])
            .sum()
    };
    let before = exits(&program);
    for _ in 0..cases {
        let mut frame = if rng.gen_range(0..8) == 0 {
            let len = rng.gen_range(0..200);
            (0..len).map(|_| rng.gen()).collect()
        } else {
            seeds[rng.gen_range(0..seeds.len())].clone()
        };
        for _ in 0..rng.gen_range(1..4) {
            let at = rng.gen_range(0..=frame.len());
            match rng.gen_range(0..4) {
                0 if at < frame.len() => frame[at] = rng.gen(),
                1 => frame.truncate(at),
                2 => frame.insert(at, rng.gen()),
                _ => frame.extend((0..rng.gen_range(0..64)).map(|_| rng.gen::<u8>())),
            }
        }
        // The kernel refuses test frames shorter than an Ethernet header.
        frame.resize(frame.len().max(14), 0);
        program.run(&frame);
    }
    assert_eq!(
        exits(&program) - before,
        cases,
        "every frame left under one reason"
    );
}

#[test]
fn a_full_nat_flows_client_packets_keep_its_source_held() {
    let mut program = Program::in_private_network("fullnat-alive");
    // A UDP flow whose backend has said nothing for a while: only the client sends.
    let long_ago = coarse_seconds() - 100;
    let source = (Ipv4Addr::new(198, 19, 0, 1), 20000u16);
    let key = FlowKey {
        proto: PROTO_UDP,
        ..client_flow(ECHO_PORT)
    };
    let reply_key = FlowKey {
        src: addr(BACKEND),
        dst: addr(source.0),
        sport: ECHO_PORT.to_be(),
        dport: source.1.to_be(),
        proto: PROTO_UDP,
        _pad: [0; 3],
    };
    let mut flows: HashMap<&mut MapData, FlowKey, Flow> =
        HashMap::try_from(program.map(map_name::FLOWS)).unwrap();
    let flow = Flow {
        backend_id: 1,
        backend_addr: addr(BACKEND),
        backend_port: ECHO_PORT.to_be(),
        state: flow_state::NAT,
        last_seen_s: long_ago,
        source: addr(source.0),
        source_port: source.1.to_be(),
        ..Flow::default()
    };
    flows.insert(key, flow, 0).unwrap();
    let mut reverse: HashMap<&mut MapData, FlowKey, ReverseNat> =
        HashMap::try_from(program.map(map_name::REVERSE)).unwrap();
    let held = ReverseNat {
        vip: addr(VIP),
        port: ECHO_PORT.to_be(),
        client: addr(CLIENT),
        client_port: CLIENT_PORT.to_be(),
        last_seen_s: long_ago,
        ..ReverseNat::default()
    };
    reverse.insert(reply_key, held, 0).unwrap();

    let udp_in = ip(CLIENT, VIP, PROTO_UDP);
    let frame = ipv4_frame(
        FROM_CLIENT.0,
        FROM_CLIENT.1,
        &udp_in,
        &udp(&udp_in, CLIENT_PORT, ECHO_PORT, b"ping", true),
    );
    let before = coarse_seconds();
    let (action, _) = program.run(&frame);
    assert_eq!(action, XDP_REDIRECT);
    let reverse: HashMap<&MapData, FlowKey, ReverseNat> =
        HashMap::try_from(program.ebpf.map(map_name::REVERSE).expect("REVERSE")).unwrap();
    let seen = reverse
        .get(&reply_key, 0)
        .expect("the reverse entry")
        .last_seen_s;
    assert!(
        seen >= before,
        "the client's packet renewed the source's claim: {seen} < {before}"
    );
}
