//! The XDP program and its maps: loading, pinning, attaching, and programming services.

use std::{
    borrow::Cow,
    fmt::Write as _,
    fs,
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, DevMapHash, HashMap, MapData, MapInfo, PerCpuArray, RingBuf},
    programs::Xdp,
    Ebpf, EbpfLoader,
};
use balancer_common::{
    flow_flags, flow_state, map_name, Addr, Affinity, AffinityKey, AgentState, Backend,
    BackendCounters, Binding, CookieSecret, Counter, Flow, FlowKey, Group, HeadInsert,
    KnownSession, KnownSessionKey, Reason, Replay, ReverseNat, Service, ServiceKey, SessionStart,
    SynOptions, BINDING_CAPACITY, COOKIE_SECRETS, GROUP_TABLE_SIZE, KNOWN_SESSION_CAPACITY,
    LAYOUT_VERSION, MAX_BACKENDS, MAX_GROUPS, MAX_NAT_SOURCES, MAX_SERVICES, MAX_TX_PORTS,
    REPLAY_CAPACITY, TABLES_PER_SERVICE, XDP_PROGRAM,
};
use tracing::{debug, info, warn};

use crate::{
    bpf,
    config::{Config, XdpModeSetting},
};

/// The compiled XDP program, embedded at build time.
static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("BALANCER_EBPF_OBJECT"));

/// `struct bpf_devmap_val`: the target ifindex and an optional program.
const DEVMAP_VALUE_SIZE: usize = 8;
const BPF_FS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Pins of the XDP links are named after their interface: `link_<interface>`.
const LINK_PIN_PREFIX: &str = "link_";
/// Entries counted at most when telling what a cold start would lose.
const COUNT_LIMIT: u64 = 10_000_000;

/// The directory an instance pins its maps and links in.
pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new(BPF_FS).join(instance)
}

fn link_pin(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("{LINK_PIN_PREFIX}{interface}"))
}

/// How `balancer run` starts the data plane.
#[derive(Debug, Default)]
pub struct StartOptions {
    /// Replace the pinned maps with empty ones, even when they fit.
    pub cold: bool,
    /// An XDP object to load instead of the one built in.
    pub program: Option<PathBuf>,
}

/// The loaded program with its maps. It stays attached through links pinned beside the maps
/// when the agent exits, for whatever reason: only [`remove_instance`] detaches it.
pub struct Dataplane {
    ebpf: Ebpf,
    /// Interfaces, each with how the program came to run there, for the operator.
    pub attachments: Vec<(String, String)>,
    /// Slots of each lookup table, fixed when the maps were created.
    pub table_size: u32,
    pub verified_instructions: Option<u32>,
    /// The kernel's id of the program this agent loaded.
    pub program_id: u32,
    /// The client and backend interfaces, as the data plane is told with each heartbeat.
    ifindexes: (u32, u32),
    /// The config's `request_timeout`, told with each heartbeat.
    request_timeout_s: u32,
    /// The config's `nat_ports` (first, count), told with each heartbeat.
    nat_ports: (u16, u16),
    /// The agent's workers, each reading its own punt ring, told with each heartbeat.
    pub workers: u32,
}

impl Dataplane {
    /// Loads the program with its maps pinned under `/sys/fs/bpf/<instance>/`, adopting the
    /// maps a previous run left there when their layout fits, and makes it the program on each
    /// interface: the links a previous run pinned are switched to it in one step (so no packet
    /// goes unhandled across a restart or an upgrade), other interfaces get new pinned links.
    pub fn start(config: &Config, options: &StartOptions) -> Result<Self> {
        mount_bpf_fs()?;
        let dir = pin_dir(&config.instance);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        check_pinned_maps(&dir, config, options.cold)?;
        let workers = config.workers();
        replace_resized_rings(&dir, config, workers)?;

        let object: Cow<[u8]> = match &options.program {
            Some(path) => Cow::Owned(
                fs::read(path)
                    .with_context(|| format!("reading the XDP object {}", path.display()))?,
            ),
            None => Cow::Borrowed(XDP_OBJECT),
        };
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(&dir)
            .map_max_entries(map_name::FLOWS, config.flow_capacity)
            .map_max_entries(map_name::REVERSE, config.flow_capacity)
            .map_max_entries(map_name::AFFINITY, config.affinity_capacity)
            .map_max_entries(map_name::BACKEND_TABLE, table_capacity(config));
        for (worker, ring) in map_name::PUNT_RINGS.iter().enumerate() {
            loader.map_max_entries(ring, ring_size(config, workers, worker));
        }
        let mut ebpf = loader
            .load(&object)
            .with_context(|| {
                format!(
                    "loading the XDP object on the maps pinned in {} (a program whose maps differ from them needs --cold)",
                    dir.display()
                )
            })?;

        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .context("the XDP object has no balancer program")?
            .try_into()?;
        load_retrying(program)?;
        let info = program
            .info()
            .context("reading the loaded program's info")?;
        let verified_instructions = info.verified_instruction_count();
        let program_id = info.id();
        for (program, array) in TAIL_CALLED {
            load_tail_called(&mut ebpf, program, array)?;
        }

        let mut interfaces = vec![config.client_interface.clone()];
        if config.backend_interface() != config.client_interface {
            interfaces.push(config.backend_interface().to_owned());
        }
        let mut dataplane = Self {
            ebpf,
            attachments: Vec::new(),
            table_size: config.table_size,
            verified_instructions,
            program_id,
            ifindexes: (
                ifindex(&config.client_interface)?,
                ifindex(config.backend_interface())?,
            ),
            request_timeout_s: config.request_timeout,
            nat_ports: config.nat_port_range().unwrap_or_default(),
            workers,
        };
        // Before the program runs: an adopted connection being bound must not look orphaned.
        dataplane.heartbeat()?;
        dataplane.set_tx_ports(&interfaces)?;
        let program: &Xdp = dataplane
            .ebpf
            .program(XDP_PROGRAM)
            .context("the XDP object has no balancer program")?
            .try_into()?;
        for interface in &interfaces {
            let how = attach_pinned(program, &dir, interface, config.xdp_mode)?;
            dataplane.attachments.push((interface.clone(), how));
        }
        detach_unconfigured(&dir, &interfaces)?;
        Ok(dataplane)
    }

    pub fn set_request_timeout(&mut self, seconds: u32) {
        self.request_timeout_s = seconds;
    }

    /// Writes full NAT's source addresses (every network's in turn) and port range.
    pub fn set_nat_sources(&mut self, config: &Config) -> Result<()> {
        let mut map: Array<&mut MapData, Addr> = Array::try_from(self.map(map_name::NAT_SOURCES)?)?;
        let addresses = config
            .source_networks
            .iter()
            .flat_map(|n| n.addresses.iter().map(|&a| Addr::from(a)));
        for (index, addr) in addresses.enumerate() {
            map.set(index as u32, addr, 0)?;
        }
        self.nat_ports = config.nat_port_range().unwrap_or_default();
        self.heartbeat()
    }

    /// Tells the data plane the agent is alive; without it for the program's agent timeout,
    /// cookie services stop handing connections to the agent.
    pub fn heartbeat(&mut self) -> Result<()> {
        let state = AgentState {
            heartbeat_s: monotonic_seconds(),
            layout_version: LAYOUT_VERSION,
            client_ifindex: self.ifindexes.0,
            backend_ifindex: self.ifindexes.1,
            request_timeout_s: self.request_timeout_s,
            nat_port_first: self.nat_ports.0,
            nat_port_count: self.nat_ports.1,
            workers: self.workers,
        };
        let mut map: Array<&mut MapData, AgentState> = Array::try_from(self.map(map_name::AGENT)?)?;
        map.set(0, state, 0)
            .context("writing the agent's heartbeat")
    }

    fn set_tx_ports(&mut self, interfaces: &[String]) -> Result<()> {
        let mut ports: DevMapHash<&mut MapData> =
            DevMapHash::try_from(self.map(map_name::TX_PORTS)?)?;
        for interface in interfaces {
            let ifindex = ifindex(interface)?;
            ports
                .insert(ifindex, ifindex, None, 0)
                .with_context(|| format!("adding {interface} to {}", map_name::TX_PORTS))?;
        }
        Ok(())
    }

    fn services(&mut self) -> Result<HashMap<&mut MapData, ServiceKey, Service>> {
        Ok(HashMap::try_from(self.map(map_name::SERVICES)?)?)
    }

    /// The services the maps hold, including those a previous run left behind.
    pub fn service_keys(&mut self) -> Result<Vec<ServiceKey>> {
        Ok(self.services()?.keys().filter_map(Result::ok).collect())
    }

    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        let removed = self.services()?.get(key, 0).ok();
        self.services()?.remove(key).context("removing a service")?;
        if let Some(service) = removed {
            for group in 0..MAX_GROUPS {
                self.publish_group(service.id, group, &[])?;
            }
        }
        Ok(())
    }

    /// Makes `lookup` the table of group `group` of service `service_id` (empty: the group
    /// has no serving backend), switched in like a service's table.
    pub fn publish_group(&mut self, service_id: u32, group: u32, lookup: &[u32]) -> Result<()> {
        let index = service_id * MAX_GROUPS + group;
        let area = |half: u32| (index * TABLES_PER_SERVICE + half) * GROUP_TABLE_SIZE;
        let groups: Array<&mut MapData, Group> = Array::try_from(self.map(map_name::GROUPS)?)?;
        let active = groups.get(&index, 0).context("reading a group")?;
        if lookup.is_empty() && active.table_size == 0 {
            return Ok(());
        }
        let base = if active.table_base == area(0) && active.table_size != 0 {
            area(1)
        } else {
            area(0)
        };
        let mut table: Array<&mut MapData, u32> =
            Array::try_from(self.map(map_name::GROUP_TABLE)?)?;
        for (slot, backend_id) in (base..).zip(lookup) {
            table
                .set(slot, backend_id, 0)
                .context("writing a group's lookup table")?;
        }
        let value = Group {
            table_base: base,
            table_size: lookup.len() as u32,
        };
        let mut groups: Array<&mut MapData, Group> = Array::try_from(self.map(map_name::GROUPS)?)?;
        groups.set(index, value, 0).context("writing a group")?;
        Ok(())
    }

    /// A backend as the maps hold it (maybe from a previous run).
    pub fn backend(&self, id: u32) -> Option<Backend> {
        let map = self.map_ref(map_name::BACKENDS).ok()?;
        let backends: Array<&MapData, Backend> = Array::try_from(map).ok()?;
        backends.get(&id, 0).ok()
    }

    pub fn write_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        let mut backends: Array<&mut MapData, Backend> =
            Array::try_from(self.map(map_name::BACKENDS)?)?;
        backends
            .set(id, backend, 0)
            .with_context(|| format!("writing backend {id}"))?;
        Ok(())
    }

    /// Bounded-load placement in XDP: each backend's load as the agent counted it (XDP adds
    /// the flows it places until the next count), and their sum in the service.
    pub fn set_loads(
        &mut self,
        key: &ServiceKey,
        loads: &std::collections::HashMap<u32, u64>,
    ) -> Result<()> {
        let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        for (&id, &load) in loads {
            if let Some(backend) = self.backend(id) {
                self.write_backend(
                    id,
                    Backend {
                        load: clamp(load),
                        ..backend
                    },
                )?;
            }
        }
        let mut services = self.services()?;
        if let Ok(service) = services.get(key, 0) {
            let load_total = clamp(loads.values().sum());
            services.insert(
                key,
                Service {
                    load_total,
                    ..service
                },
                0,
            )?;
        }
        Ok(())
    }

    /// Makes `service` live with `lookup`, its table of backend ids (empty: no backend takes
    /// new connections). The table is written into whichever of the service's two table areas
    /// the data plane is not using, then `Service::table_base` switches to it in one map
    /// update, so no packet ever sees a half-built table.
    pub fn publish_service(
        &mut self,
        key: &ServiceKey,
        mut service: Service,
        lookup: &[u32],
    ) -> Result<()> {
        let table_size = self.table_size;
        let area = |index: u32| (service.id * TABLES_PER_SERVICE + index) * table_size;
        let current = self.services()?.get(key, 0).ok();
        let active = current.map(|s| s.table_base);
        service.load_total = current.map_or(0, |s| s.load_total);
        let base = if active == Some(area(0)) {
            area(1)
        } else {
            area(0)
        };
        let mut table: Array<&mut MapData, u32> =
            Array::try_from(self.map(map_name::BACKEND_TABLE)?)?;
        for (slot, backend_id) in (base..).zip(lookup) {
            table
                .set(slot, backend_id, 0)
                .context("writing a lookup table")?;
        }
        service.table_base = base;
        service.table_size = table_size;
        if lookup.is_empty() {
            service.backend_count = 0;
        }
        self.services()?
            .insert(key, service, 0)
            .context("writing a service")?;
        Ok(())
    }

    /// Sets the SYN cookies' secrets unless the maps have them: handshakes answered before a
    /// restart must still complete after it.
    pub fn ensure_cookie_secret(
        &mut self,
        fresh: impl FnOnce() -> Result<CookieSecret>,
    ) -> Result<()> {
        let map: Array<&mut MapData, CookieSecret> =
            Array::try_from(self.map(map_name::COOKIE_SECRET)?)?;
        if map
            .get(&0, 0)
            .is_ok_and(|secret| secret != CookieSecret::default())
        {
            return Ok(());
        }
        self.rotate_cookie_secret(fresh()?)
    }

    /// Makes `fresh` the SYN cookies' secret; the current one becomes the previous one, still
    /// accepted, and the one before it is forgotten.
    pub fn rotate_cookie_secret(&mut self, fresh: CookieSecret) -> Result<()> {
        let mut map: Array<&mut MapData, CookieSecret> =
            Array::try_from(self.map(map_name::COOKIE_SECRET)?)?;
        let current = map.get(&0, 0).unwrap_or_default();
        map.set(1, current, 0)
            .context("keeping the previous SYN cookie secret")?;
        map.set(0, fresh, 0)
            .context("writing the SYN cookie secret")?;
        Ok(())
    }

    /// Takes the ring buffer of the frames punted to `worker`, to be read by it.
    pub fn take_punts(&mut self, worker: usize) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(map_name::PUNT_RINGS[worker])
            .with_context(|| format!("the XDP object has no punt ring for worker {worker}"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Takes the ring buffer of new flows' clients, to be drained by the agent.
    pub fn take_new_flow_sources(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(map_name::NEW_FLOW_SOURCES)
            .context("the XDP object has no ring of new flows' clients")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Clients with a `source-ip` session, per backend id. Walks the whole map.
    /// XDP's counters of each backend (by id) among `ids`, summed over the CPUs.
    pub fn backend_counters(
        &self,
        ids: &[u32],
    ) -> Result<std::collections::HashMap<u32, BackendCounters>> {
        let stats: PerCpuArray<&MapData, BackendCounters> = PerCpuArray::try_from(
            self.ebpf
                .map(map_name::BACKEND_STATS)
                .context("BACKEND_STATS")?,
        )?;
        let mut totals = std::collections::HashMap::new();
        for &id in ids {
            let mut total = BackendCounters::default();
            for cpu in stats.get(&id, 0)?.iter() {
                total.to_backend.packets += cpu.to_backend.packets;
                total.to_backend.bytes += cpu.to_backend.bytes;
                total.to_client.packets += cpu.to_client.packets;
                total.to_client.bytes += cpu.to_client.bytes;
                total.new_flows += cpu.new_flows;
                total.cookies_issued += cpu.cookies_issued;
                total.bound += cpu.bound;
            }
            totals.insert(id, total);
        }
        Ok(totals)
    }

    /// The affinity table's entries, and per backend id the `source-ip` sessions that still
    /// hold it (see [`session_holds`]; an unknown service's entries hold nothing). Walks the
    /// whole map.
    pub fn sessions_by_backend(
        &self,
        timeout_of: impl Fn(u32) -> Option<u32>,
    ) -> Result<TableCount> {
        let map = self.map_ref(map_name::AFFINITY)?;
        let sessions: HashMap<&MapData, AffinityKey, Affinity> = HashMap::try_from(map)?;
        let now = SessionClock::now();
        let mut count = TableCount::default();
        for (key, session) in sessions.iter().filter_map(Result::ok) {
            count.entries += 1;
            if timeout_of(key.service_id).is_some_and(|t| now.holds(&session, t)) {
                *count.by_backend.entry(session.backend_id).or_default() += 1;
            }
        }
        Ok(count)
    }

    /// `source-ip` sessions of backend `backend_id` that still hold it (see
    /// [`SessionClock::holds`]). Walks the whole map.
    pub fn live_sessions_of(&self, backend_id: u32, timeout_s: u32) -> Result<u64> {
        let sessions = self.live_sessions(timeout_s, |_, s| s.backend_id == backend_id)?;
        Ok(sessions.len() as u64)
    }

    /// The `source-ip` sessions that `wanted` picks among those that still hold their backend
    /// (see [`SessionClock::holds`]), each with its seconds since its client's last new flow.
    /// Walks the whole map.
    pub fn live_sessions(
        &self,
        timeout_s: u32,
        wanted: impl Fn(&AffinityKey, &Affinity) -> bool,
    ) -> Result<Vec<(AffinityKey, Affinity, u64)>> {
        let map = self.map_ref(map_name::AFFINITY)?;
        let sessions: HashMap<&MapData, AffinityKey, Affinity> = HashMap::try_from(map)?;
        let now = SessionClock::now();
        Ok(sessions
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, session)| now.holds(session, timeout_s) && wanted(key, session))
            .map(|(key, session)| {
                let idle_s = now.ns.saturating_sub(session.last_seen_ns) / 1_000_000_000;
                (key, session, idle_s)
            })
            .collect())
    }

    /// Spliced cookie connections per backend id that are not closing. Walks the whole map.
    pub fn spliced_by_backend(&self) -> Result<std::collections::HashMap<u32, u64>> {
        let map = self.map_ref(map_name::FLOWS)?;
        let flows: HashMap<&MapData, FlowKey, Flow> = HashMap::try_from(map)?;
        let mut counts = std::collections::HashMap::new();
        for (_, flow) in flows.iter().filter_map(Result::ok) {
            if flow.state == flow_state::SPLICED && flow.flags & flow_flags::CLOSING == 0 {
                *counts.entry(flow.backend_id).or_default() += 1;
            }
        }
        Ok(counts)
    }

    /// The flow table's entries, and per backend id the flows that are not closing and saw a
    /// client packet in the last `window_s` seconds. Walks the whole map.
    pub fn active_flows_by_backend(&self, window_s: u32) -> Result<TableCount> {
        let map = self.map_ref(map_name::FLOWS)?;
        let flows: HashMap<&MapData, FlowKey, Flow> = HashMap::try_from(map)?;
        let now_s = monotonic_seconds();
        let mut count = TableCount::default();
        for (_, flow) in flows.iter().filter_map(Result::ok) {
            count.entries += 1;
            let idle = now_s.saturating_sub(flow.last_seen_s);
            if flow.flags & flow_flags::CLOSING == 0 && idle <= window_s {
                *count.by_backend.entry(flow.backend_id).or_default() += 1;
            }
        }
        Ok(count)
    }

    /// Lets responses whose head a previous run of the agent was reading pass unedited: their
    /// data would otherwise go to an agent that knows nothing of them. Returns how many.
    pub fn pass_response_heads(&mut self) -> Result<usize> {
        let mut reverse: HashMap<&mut MapData, FlowKey, ReverseNat> =
            HashMap::try_from(self.map(map_name::REVERSE)?)?;
        let waiting: Vec<(FlowKey, ReverseNat)> = reverse
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, nat)| nat.state == flow_state::RESPONSE_HEAD)
            .collect();
        for (key, nat) in &waiting {
            let passing = ReverseNat {
                state: flow_state::SPLICED,
                ..*nat
            };
            reverse
                .insert(key, passing, 0)
                .context("writing a reverse entry")?;
        }
        Ok(waiting.len())
    }

    fn map_ref(&self, name: &str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .with_context(|| format!("the XDP object has no map {name}"))
    }

    fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("the XDP object has no map {name}"))
    }
}

/// Makes `program` the one on `interface`: the link a previous run pinned there is switched to
/// it (the previous program keeps handling packets until that instant); without one, a new
/// link is created and pinned. Returns how, for the operator.
fn attach_pinned(
    program: &Xdp,
    dir: &Path,
    interface: &str,
    setting: XdpModeSetting,
) -> Result<String> {
    let ifindex = ifindex(interface)?;
    let program_fd = program.fd().context("the XDP program is not loaded")?;
    let pin = link_pin(dir, interface);
    if let Ok(link) = bpf::open_pin(&pin) {
        let info = bpf::link_info(link.as_fd())
            .with_context(|| format!("reading the link pinned at {}", pin.display()))?;
        if info.ifindex == ifindex {
            bpf::update_link(link.as_fd(), program_fd.as_fd()).with_context(|| {
                format!(
                    "replacing the program attached to {interface} (link {})",
                    info.id
                )
            })?;
            return Ok(format!("took over from program {}", info.program_id));
        }
        // The interface it was made for is gone (a link does not follow a new device of
        // the same name).
        info!(%interface, link = info.id, "the pinned link belongs to an interface that is gone: replacing it");
        fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
    }
    let (link, mode) = create_link(program_fd.as_fd(), interface, ifindex, setting)?;
    bpf::pin(link.as_fd(), &pin)?;
    Ok(mode.to_owned())
}

fn create_link(
    program: std::os::fd::BorrowedFd<'_>,
    interface: &str,
    ifindex: u32,
    setting: XdpModeSetting,
) -> Result<(std::os::fd::OwnedFd, &'static str)> {
    let attach = |flags: u32, mode: &str| {
        bpf::create_xdp_link(program, ifindex, flags).map_err(|error| {
            let hint = if error.raw_os_error() == Some(libc::EBUSY) {
                format!(
                    "; another XDP program is attached (`ip link show {interface}` shows it, `ip link set {interface} xdp off` removes it)"
                )
            } else {
                String::new()
            };
            anyhow::anyhow!("attaching in {mode} mode to {interface}: {error}{hint}")
        })
    };
    match setting {
        XdpModeSetting::Native => attach(bpf::XDP_NATIVE, "native")
            .map(|link| (link, "native"))
            .context("try xdp_mode = \"generic\""),
        XdpModeSetting::Generic => {
            attach(bpf::XDP_GENERIC, "generic").map(|link| (link, "generic"))
        }
        XdpModeSetting::Auto => match attach(bpf::XDP_NATIVE, "native") {
            Ok(link) => Ok((link, "native")),
            Err(error) => {
                warn!(%interface, "{error:#}: falling back to generic mode (slower)");
                attach(bpf::XDP_GENERIC, "generic").map(|link| (link, "generic"))
            }
        },
    }
}

/// Detaches the program from interfaces a previous run attached to and the config no longer
/// names.
fn detach_unconfigured(dir: &Path, interfaces: &[String]) -> Result<()> {
    for (interface, pin) in pinned_links(dir) {
        if !interfaces.contains(&interface) {
            fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            info!(%interface, "detached: the configuration no longer names this interface");
        }
    }
    Ok(())
}

/// The links pinned in an instance's directory, by interface.
fn pinned_links(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut links: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let interface = name.strip_prefix(LINK_PIN_PREFIX)?.to_owned();
            Some((interface, entry.path()))
        })
        .collect();
    links.sort();
    links
}

/// A walk of a table: its entries, and those of them that count per backend id.
#[derive(Default)]
pub struct TableCount {
    pub entries: u64,
    pub by_backend: std::collections::HashMap<u32, u64>,
}

/// Detaches an instance's program from every interface and removes its maps: the explicit end
/// of its data plane (`balancer stop --detach`). Returns the interfaces it was attached to.
pub fn remove_instance(instance: &str) -> Result<Vec<String>> {
    let dir = pin_dir(instance);
    if !dir.exists() {
        bail!(
            "instance {instance} has nothing pinned in {}",
            dir.display()
        );
    }
    let mut detached = Vec::new();
    for (interface, pin) in pinned_links(&dir) {
        fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        detached.push(interface);
    }
    fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(detached)
}

/// What is pinned for an instance whose agent does not answer: where its program runs and
/// when the agent was last alive. `None` when nothing is pinned.
pub fn describe_pinned(instance: &str) -> Option<String> {
    let dir = pin_dir(instance);
    if !dir.exists() {
        return None;
    }
    let mut text = String::new();
    let links = pinned_links(&dir);
    let attached: Vec<String> = links
        .iter()
        .filter_map(|(interface, pin)| {
            let info = bpf::open_pin(pin)
                .and_then(|fd| bpf::link_info(fd.as_fd()))
                .ok()?;
            Some(if info.ifindex == 0 {
                format!(
                    "{interface} (link {}, defunct: the interface is gone)",
                    info.id
                )
            } else {
                format!(
                    "{interface} (link {}, program {})",
                    info.id, info.program_id
                )
            })
        })
        .collect();
    if attached.is_empty() {
        let _ = writeln!(
            text,
            "instance {instance}: no agent running and no program attached; maps pinned in {}",
            dir.display()
        );
    } else {
        let _ = writeln!(
            text,
            "instance {instance}: no agent running; the data plane is attached to {}",
            attached.join(", ")
        );
        let _ = writeln!(text, "  L4 VIPs and spliced connections keep flowing in XDP; new connections to cookie VIPs get what their service's without_agent says");
    }
    match pinned_agent_state(&dir) {
        Some(state) => {
            let _ = writeln!(
                text,
                "  last agent heartbeat {} s ago; maps of layout version {}",
                monotonic_seconds().saturating_sub(state.heartbeat_s),
                state.layout_version
            );
        }
        None => {
            let _ = writeln!(text, "  the maps carry no layout version");
        }
    }
    let _ = writeln!(
        text,
        "  `balancer run` adopts it; `balancer stop --detach --instance {instance}` removes it"
    );
    Some(text)
}

fn pinned_agent_state(dir: &Path) -> Option<AgentState> {
    let map = MapData::from_pin(dir.join(map_name::AGENT)).ok()?;
    let array: Array<MapData, AgentState> = Array::try_from(aya::maps::Map::Array(map)).ok()?;
    array.get(&0, 0).ok()
}

/// Maps pinned by a previous run are adopted, so flows survive; maps of another layout (an
/// agent of another version) or shape (another capacity in the config) would be misread, so
/// the agent refuses them, saying what replacing them would lose, unless it starts cold.
fn check_pinned_maps(dir: &Path, config: &Config, cold: bool) -> Result<()> {
    let pinned: Vec<_> = expected_maps(config)
        .into_iter()
        .filter(|(name, ..)| dir.join(name).exists())
        .collect();
    if pinned.is_empty() {
        return Ok(());
    }
    let mut misfits = Vec::new();
    match pinned_agent_state(dir) {
        Some(state) if state.layout_version == LAYOUT_VERSION => {}
        Some(state) => misfits.push(format!(
            "their layout is version {}, this program's is {LAYOUT_VERSION}",
            state.layout_version
        )),
        None => misfits.push(
            "they carry no layout version (an agent from before versions made them)".to_owned(),
        ),
    }
    for (name, key_size, value_size, capacity) in &pinned {
        let Ok(info) = MapInfo::from_pin(dir.join(name)) else {
            continue;
        };
        let found = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if found != (*key_size, *value_size, *capacity) {
            misfits.push(format!(
                "{name} has key, value and capacity {found:?} where this configuration and program want {:?}",
                (key_size, value_size, capacity)
            ));
        }
    }
    if misfits.is_empty() && !cold {
        return Ok(());
    }
    let lost = what_replacing_loses(dir);
    if !cold {
        bail!(
            "the maps pinned in {} do not fit this program: {}. Adopting them would misread them; \
             replacing them loses {lost}. The attached program keeps running on them meanwhile. \
             Start with --cold to replace them (or undo the change).",
            dir.display(),
            misfits.join("; ")
        );
    }
    warn!("starting cold: replacing the pinned maps loses {lost}");
    let rings = map_name::PUNT_RINGS
        .iter()
        .filter(|ring| dir.join(ring).exists());
    for name in pinned.iter().map(|(name, ..)| name).chain(rings) {
        let path = dir.join(name);
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// What replacing an instance's pinned maps loses, counted in the maps.
fn what_replacing_loses(dir: &Path) -> String {
    let count = |name: &str| -> String {
        let path = dir.join(name);
        let counted = MapInfo::from_pin(&path).ok().and_then(|info| {
            let fd = bpf::open_pin(&path).ok()?;
            bpf::count_entries(fd.as_fd(), info.key_size() as usize, COUNT_LIMIT).ok()
        });
        counted.map_or_else(|| "?".to_owned(), |n| n.to_string())
    };
    format!(
        "{} flows (spliced cookie connections among them break; L4 flows are placed again), {} source-ip sessions and {} connections being bound",
        count(map_name::FLOWS),
        count(map_name::AFFINITY),
        count(map_name::BINDINGS)
    )
}

fn ifindex(interface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(interface).context("interface name contains a NUL byte")?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("interface {interface} does not exist in this network namespace");
    }
    Ok(index)
}

/// The shape every map must have: (name, key size, value size, capacity).
fn expected_maps(config: &Config) -> [(&'static str, usize, usize, u32); 20] {
    use std::mem::size_of;
    [
        (
            map_name::SERVICES,
            size_of::<ServiceKey>(),
            size_of::<Service>(),
            MAX_SERVICES,
        ),
        (
            map_name::BACKENDS,
            size_of::<u32>(),
            size_of::<Backend>(),
            MAX_BACKENDS,
        ),
        (
            map_name::BACKEND_TABLE,
            size_of::<u32>(),
            size_of::<u32>(),
            table_capacity(config),
        ),
        (
            map_name::SYN_OPTIONS,
            size_of::<FlowKey>(),
            size_of::<SynOptions>(),
            BINDING_CAPACITY,
        ),
        (
            map_name::BINDINGS,
            size_of::<FlowKey>(),
            size_of::<Binding>(),
            BINDING_CAPACITY,
        ),
        (
            map_name::HEAD_INSERTS,
            size_of::<FlowKey>(),
            size_of::<HeadInsert>(),
            BINDING_CAPACITY,
        ),
        (
            map_name::REPLAYS,
            size_of::<FlowKey>(),
            size_of::<Replay>(),
            REPLAY_CAPACITY,
        ),
        (
            map_name::KNOWN_SESSIONS,
            size_of::<KnownSessionKey>(),
            size_of::<KnownSession>(),
            KNOWN_SESSION_CAPACITY,
        ),
        (
            map_name::SESSION_STARTS,
            size_of::<u32>(),
            size_of::<SessionStart>(),
            MAX_BACKENDS,
        ),
        (
            map_name::COOKIE_SECRET,
            size_of::<u32>(),
            size_of::<CookieSecret>(),
            COOKIE_SECRETS,
        ),
        (
            map_name::AFFINITY,
            size_of::<AffinityKey>(),
            size_of::<Affinity>(),
            config.affinity_capacity,
        ),
        (
            map_name::FLOWS,
            size_of::<FlowKey>(),
            size_of::<Flow>(),
            config.flow_capacity,
        ),
        (
            map_name::REVERSE,
            size_of::<FlowKey>(),
            size_of::<ReverseNat>(),
            config.flow_capacity,
        ),
        (
            map_name::STATS,
            size_of::<u32>(),
            size_of::<Counter>(),
            Reason::COUNT,
        ),
        (
            map_name::BACKEND_STATS,
            size_of::<u32>(),
            size_of::<BackendCounters>(),
            MAX_BACKENDS,
        ),
        (
            map_name::TX_PORTS,
            size_of::<u32>(),
            DEVMAP_VALUE_SIZE,
            MAX_TX_PORTS,
        ),
        (
            map_name::AGENT,
            size_of::<u32>(),
            size_of::<AgentState>(),
            1,
        ),
        (
            map_name::NAT_SOURCES,
            size_of::<u32>(),
            size_of::<Addr>(),
            MAX_NAT_SOURCES,
        ),
        (
            map_name::GROUPS,
            size_of::<u32>(),
            size_of::<Group>(),
            MAX_SERVICES * MAX_GROUPS,
        ),
        (
            map_name::GROUP_TABLE,
            size_of::<u32>(),
            size_of::<u32>(),
            MAX_SERVICES * MAX_GROUPS * TABLES_PER_SERVICE * GROUP_TABLE_SIZE,
        ),
    ]
}

/// Bytes of the punt ring of `worker`: the config's size for the workers the agent runs, one
/// page for the others (the program has a ring for each worker there may be).
fn ring_size(config: &Config, workers: u32, worker: usize) -> u32 {
    if worker < workers as usize {
        config.punt_ring_size
    } else {
        page_size()
    }
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

/// Removes the pinned punt rings whose size no longer fits (another `punt_ring_size` or
/// number of workers), so the program gets new ones: they only carry frames in flight, which
/// their senders send again; the program running now keeps its rings until it is replaced.
/// Another number of workers replaces them all: the frames in a ring were for the worker
/// that owned their prefix, which may now be another one.
fn replace_resized_rings(dir: &Path, config: &Config, workers: u32) -> Result<()> {
    let regrouped = pinned_agent_state(dir).is_some_and(|state| state.workers != workers);
    for (worker, ring) in map_name::PUNT_RINGS.iter().enumerate() {
        let path = dir.join(ring);
        let Ok(info) = MapInfo::from_pin(&path) else {
            continue;
        };
        let size = ring_size(config, workers, worker);
        if regrouped || info.max_entries() != size {
            let why = if regrouped {
                "the workers changed"
            } else {
                "its size changed"
            };
            info!(
                ring,
                from = info.max_entries(),
                to = size,
                "replacing a punt ring: {why}"
            );
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Loads a program the main program reaches by a tail call and puts it where that call
/// finds it (entry 0 of `array`).
fn load_tail_called(ebpf: &mut Ebpf, name: &str, array: &str) -> Result<()> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("the XDP object has no program {name}"))?
        .try_into()?;
    load_retrying(program).with_context(|| format!("loading {name}"))?;
    if let Some(instructions) = program
        .info()
        .ok()
        .and_then(|info| info.verified_instruction_count())
    {
        debug!(program = name, instructions, "tail-called program verified");
    }
    let fd = program.fd()?.try_clone()?;
    let map = ebpf
        .map_mut(array)
        .with_context(|| format!("the XDP object has no program array {array}"))?;
    let mut programs = aya::maps::ProgramArray::try_from(map)?;
    programs
        .set(0, &fd, 0)
        .with_context(|| format!("installing {name}"))
}

/// The programs in the object that the main program calls by a tail call, each with the
/// array it calls it from: full NAT's placement of a new flow, the cookie lines put into a
/// first response head, the backend's SYN-ACK answered with the replay, and a returning
/// session's connection bound without the agent.
const TAIL_CALLED: [(&str, &str); 4] = [
    ("balancer_full_nat", "FULL_NAT_PROGRAM"),
    ("balancer_response_head", "HEAD_PROGRAM"),
    ("balancer_replay", "REPLAY_PROGRAM"),
    ("balancer_bind", "BIND_PROGRAM"),
];

/// Loads a program, trying again when the kernel answers EAGAIN, as libbpf does: the kernel
/// gives that answer, before verifying anything, when a load meets a concurrent one (seen
/// with several balancers or test fixtures loading at once).
pub fn load_retrying(program: &mut Xdp) -> Result<()> {
    const ATTEMPTS: usize = 5;
    let mut attempt = 1;
    loop {
        match program.load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.kind() == std::io::ErrorKind::WouldBlock && attempt < ATTEMPTS =>
            {
                attempt += 1;
            }
            result => return result.context("the kernel verifier rejected the XDP program"),
        }
    }
}

/// Full NAT: reserves the configured ports from the host's own sockets (see
/// [`reserve_ports`]).
pub fn reserve_nat_ports(config: &Config) -> Result<()> {
    if config.source_networks.is_empty() {
        return Ok(());
    }
    reserve_ports(&config.nat_ports)?;
    for (index, network) in config.source_networks.iter().enumerate() {
        for (slot, &address) in network.addresses.iter().enumerate() {
            // Binding succeeds only to an address of this host (port 0 takes none).
            if std::net::UdpSocket::bind((address, 0)).is_err() {
                warn!(
                    %address,
                    field = format!("source_network[{index}].addresses[{slot}]"),
                    "full NAT source address not assigned to an interface here (or still \
                     tentative): backends' replies to it will not arrive until it is"
                );
            }
        }
    }
    let held = host_sockets_on_sources(config);
    if held > 0 {
        warn!(
            sockets = held,
            "host sockets already use full NAT sources (an address of a source_network with a \
             port of nat_ports): a connection claimed on one of them collides with it until it \
             closes; give full NAT addresses of its own rather than the one the host's own \
             connections leave from"
        );
    }
    Ok(())
}

/// How many of the namespace's TCP sockets (any state) are bound to a full NAT source: they
/// were opened before the ports were reserved, or chose their port themselves.
fn host_sockets_on_sources(config: &Config) -> usize {
    let Some((first, count)) = config.nat_port_range() else {
        return 0;
    };
    let ports = u32::from(first)..u32::from(first) + u32::from(count);
    let sources: Vec<Addr> = config
        .source_networks
        .iter()
        .flat_map(|network| network.addresses.iter().map(|&a| Addr::from(a)))
        .collect();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| fs::read_to_string(table).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| line.split_whitespace().nth(1).and_then(proc_net_local))
                .collect::<Vec<_>>()
        })
        .filter(|(addr, port)| ports.contains(&u32::from(*port)) && sources.contains(addr))
        .count()
}

/// A `/proc/net/tcp{,6}` local address, `ADDR:PORT` in hex, the address as the kernel's
/// 32-bit words in host order.
fn proc_net_local(field: &str) -> Option<(Addr, u16)> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| {
        addr.get(i * 8..i * 8 + 8)
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .map(|w| w.to_ne_bytes())
    };
    let addr = match addr.len() {
        8 => Addr::from(IpAddr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Addr::from(IpAddr::from(octets))
        }
        _ => return None,
    };
    Some((addr, port))
}

/// The sysctl that keeps ports out of the host's automatic choice, for IPv4 and IPv6 alike.
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Adds `range` ("first-last") to the namespace's reserved ports, keeping what is there.
fn reserve_ports(range: &str) -> Result<()> {
    let current =
        fs::read_to_string(RESERVED_PORTS).with_context(|| format!("reading {RESERVED_PORTS}"))?;
    let current = current.trim();
    if current.split(',').any(|r| r.trim() == range) {
        return Ok(());
    }
    let wanted = if current.is_empty() {
        range.to_owned()
    } else {
        format!("{current},{range}")
    };
    fs::write(RESERVED_PORTS, &wanted)
        .with_context(|| format!("reserving the full NAT ports {range} in {RESERVED_PORTS}"))?;
    info!(
        ports = range,
        "reserved for full NAT: the host's own connections will not take them"
    );
    Ok(())
}

/// The two clocks a `source-ip` session is judged by, read once for a walk of the table.
#[derive(Clone, Copy)]
pub struct SessionClock {
    /// Of `bpf_ktime_get_ns`, which stamps the client's new flows.
    pub ns: u64,
    /// Of `bpf_ktime_get_coarse_ns`, which a session's time in its group is kept in.
    pub s: u32,
}

impl SessionClock {
    pub fn now() -> SessionClock {
        SessionClock {
            ns: monotonic_ns(),
            s: monotonic_seconds(),
        }
    }

    /// Whether a session still holds its backend, as XDP decides: its client opened a flow
    /// within the service's `timeout_s`, or it is still in its group.
    pub fn holds(&self, session: &Affinity, timeout_s: u32) -> bool {
        let idle_ns = self.ns.saturating_sub(session.last_seen_ns);
        idle_ns < u64::from(timeout_s) * 1_000_000_000
            || (session.group != 0 && self.s < session.group_until_s)
    }
}

/// Slots of `BACKEND_TABLE`: two tables of `table_size` for every possible service.
fn table_capacity(config: &Config) -> u32 {
    MAX_SERVICES * TABLES_PER_SERVICE * config.table_size
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    // SAFETY: `timespec` is plain data filled in by the kernel.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `now` is writable.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Milliseconds of `bpf_ktime_get_ns`'s clock, as XDP counts the balancer's TCP timestamps.
pub fn monotonic_milliseconds() -> u32 {
    (monotonic_ns() / 1_000_000) as u32
}

/// Seconds of the clock the data plane stamps flows with (`bpf_ktime_get_coarse_ns`).
pub fn monotonic_seconds() -> u32 {
    // SAFETY: `timespec` is plain data filled in by the kernel.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `now` is writable.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    now.tv_sec as u32
}

/// Whether the BPF filesystem is mounted at `/sys/fs/bpf`.
pub fn bpf_fs_mounted() -> bool {
    let Ok(path) = std::ffi::CString::new(BPF_FS) else {
        return false;
    };
    // SAFETY: `statfs` is plain data filled in by the kernel.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` is writable.
    unsafe { libc::statfs(path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == BPF_FS_MAGIC }
}

/// Mounts the BPF filesystem at `/sys/fs/bpf` unless it is there already.
fn mount_bpf_fs() -> Result<()> {
    if bpf_fs_mounted() {
        return Ok(());
    }
    let path = std::ffi::CString::new(BPF_FS).context("bpffs path")?;
    fs::create_dir_all(BPF_FS).with_context(|| format!("creating {BPF_FS}"))?;
    let fstype = std::ffi::CString::new("bpf").context("fstype")?;
    // SAFETY: all pointers are valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting the BPF filesystem at {BPF_FS}: {}",
            std::io::Error::last_os_error()
        );
    }
    info!("mounted the BPF filesystem at {BPF_FS}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_local_addresses_read_in_host_order() {
        let v4 = proc_net_local("0100007F:1F90").expect("an IPv4 address");
        assert_eq!(
            v4,
            (Addr::from("127.0.0.1".parse::<IpAddr>().unwrap()), 8080)
        );
        let v6 = proc_net_local("B80D0120000000000000000001000000:0050").expect("an IPv6 address");
        assert_eq!(
            v6,
            (Addr::from("2001:db8::1".parse::<IpAddr>().unwrap()), 80)
        );
        assert_eq!(proc_net_local("0100007F"), None);
        assert_eq!(proc_net_local("01007F:0050"), None);
    }
}
