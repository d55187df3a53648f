//! The XDP program and its maps: loading, pinning, attaching, and programming services.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, DevMapHash, HashMap, MapData, MapInfo, RingBuf},
    programs::{xdp::XdpLinkId, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use balancer_common::{
    flow_flags, flow_state, map_name, Affinity, AffinityKey, Backend, Binding, CookieSecret,
    Counter, Flow, FlowKey, Reason, ReverseNat, Service, ServiceKey, SynOptions, BINDING_CAPACITY,
    MAX_BACKENDS, MAX_SERVICES, MAX_TX_PORTS, TABLES_PER_SERVICE, XDP_PROGRAM,
};
use tracing::{info, warn};

use crate::config::{Config, XdpModeSetting};

/// The compiled XDP program, embedded at build time.
static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("BALANCER_EBPF_OBJECT"));

/// `struct bpf_devmap_val`: the target ifindex and an optional program.
const DEVMAP_VALUE_SIZE: usize = 8;
const BPF_FS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The directory an instance pins its maps in.
pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new(BPF_FS).join(instance)
}

/// A loaded program attached to its interfaces; dropping it detaches the program.
pub struct Dataplane {
    ebpf: Ebpf,
    links: Vec<(String, XdpLinkId)>,
    /// Interfaces with the mode the program runs in, for the operator.
    pub attachments: Vec<(String, &'static str)>,
    /// Slots of each lookup table, fixed when the maps were created.
    pub table_size: u32,
    pub verified_instructions: Option<u32>,
}

impl Dataplane {
    /// Loads the program with its maps pinned under `/sys/fs/bpf/<instance>/` (reusing maps a
    /// previous run left there, so flows survive a restart) and attaches it.
    pub fn start(config: &Config) -> Result<Self> {
        mount_bpf_fs()?;
        let dir = pin_dir(&config.instance);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        remove_incompatible_pins(&dir, config)?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .map_max_entries(map_name::FLOWS, config.flow_capacity)
            .map_max_entries(map_name::REVERSE, config.flow_capacity)
            .map_max_entries(map_name::AFFINITY, config.affinity_capacity)
            .map_max_entries(map_name::BACKEND_TABLE, table_capacity(config))
            .load(XDP_OBJECT)
            .context("loading the XDP object")?;

        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .context("the XDP object has no balancer program")?
            .try_into()?;
        program
            .load()
            .context("the kernel verifier rejected the XDP program")?;
        let verified_instructions = program
            .info()
            .ok()
            .and_then(|i| i.verified_instruction_count());

        let mut interfaces = vec![config.client_interface.clone()];
        if config.backend_interface() != config.client_interface {
            interfaces.push(config.backend_interface().to_owned());
        }
        let mut links = Vec::new();
        let mut attachments = Vec::new();
        for interface in &interfaces {
            let (link, mode) = attach(program, interface, config.xdp_mode)?;
            links.push((interface.clone(), link));
            attachments.push((interface.clone(), mode));
        }

        let mut dataplane = Self {
            ebpf,
            links,
            attachments,
            table_size: config.table_size,
            verified_instructions,
        };
        dataplane.set_tx_ports(&interfaces)?;
        Ok(dataplane)
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
        self.services()?.remove(key).context("removing a service")?;
        Ok(())
    }

    pub fn write_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        let mut backends: Array<&mut MapData, Backend> =
            Array::try_from(self.map(map_name::BACKENDS)?)?;
        backends
            .set(id, backend, 0)
            .with_context(|| format!("writing backend {id}"))?;
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
        let active = self.services()?.get(key, 0).ok().map(|s| s.table_base);
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

    /// Sets the key of the SYN cookies.
    pub fn set_cookie_secret(&mut self, secret: CookieSecret) -> Result<()> {
        let mut map: Array<&mut MapData, CookieSecret> =
            Array::try_from(self.map(map_name::COOKIE_SECRET)?)?;
        map.set(0, secret, 0)
            .context("writing the SYN cookie secret")?;
        Ok(())
    }

    /// Takes the ring buffer of punted frames, to be read by the agent.
    pub fn take_punts(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(map_name::PUNTS)
            .context("the XDP object has no punt ring")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// The handshake the data plane completed for a client connection.
    pub fn binding(&self, key: &FlowKey) -> Option<Binding> {
        let map = self.map_ref(map_name::BINDINGS).ok()?;
        let bindings: HashMap<&MapData, FlowKey, Binding> = HashMap::try_from(map).ok()?;
        bindings.get(key, 0).ok()
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
        let mut reverse: HashMap<&mut MapData, FlowKey, ReverseNat> =
            HashMap::try_from(self.map(map_name::REVERSE)?)?;
        reverse
            .insert(reply_key, nat, 0)
            .context("writing a reverse entry")?;
        let mut flows: HashMap<&mut MapData, FlowKey, Flow> =
            HashMap::try_from(self.map(map_name::FLOWS)?)?;
        flows.insert(key, flow, 0).context("writing a flow")?;
        Ok(())
    }

    /// A client connection's flow entry.
    pub fn flow(&self, key: &FlowKey) -> Option<Flow> {
        let map = self.map_ref(map_name::FLOWS).ok()?;
        let flows: HashMap<&MapData, FlowKey, Flow> = HashMap::try_from(map).ok()?;
        flows.get(key, 0).ok()
    }

    /// A backend connection's reverse entry.
    pub fn reverse(&self, reply_key: &FlowKey) -> Option<ReverseNat> {
        let map = self.map_ref(map_name::REVERSE).ok()?;
        let reverse: HashMap<&MapData, FlowKey, ReverseNat> = HashMap::try_from(map).ok()?;
        reverse.get(reply_key, 0).ok()
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
        let mut flows: HashMap<&mut MapData, FlowKey, Flow> =
            HashMap::try_from(self.map(map_name::FLOWS)?)?;
        flows.insert(key, flow, 0).context("writing a flow")?;
        self.write_reverse(reply_key, nat)?;
        Ok(nat)
    }

    /// Writes a reverse entry.
    pub fn write_reverse(&mut self, reply_key: &FlowKey, nat: ReverseNat) -> Result<()> {
        let mut reverse: HashMap<&mut MapData, FlowKey, ReverseNat> =
            HashMap::try_from(self.map(map_name::REVERSE)?)?;
        reverse
            .insert(reply_key, nat, 0)
            .context("writing a reverse entry")
    }

    /// Forgets a client connection: its flow, its binding and (if any) its reverse entry.
    pub fn remove_connection(&mut self, key: &FlowKey, reply_key: Option<&FlowKey>) {
        if let Ok(map) = self.map(map_name::FLOWS) {
            if let Ok(mut flows) = HashMap::<&mut MapData, FlowKey, Flow>::try_from(map) {
                let _ = flows.remove(key);
            }
        }
        if let Ok(map) = self.map(map_name::BINDINGS) {
            if let Ok(mut bindings) = HashMap::<&mut MapData, FlowKey, Binding>::try_from(map) {
                let _ = bindings.remove(key);
            }
        }
        if let (Some(reply_key), Ok(map)) = (reply_key, self.map(map_name::REVERSE)) {
            if let Ok(mut reverse) = HashMap::<&mut MapData, FlowKey, ReverseNat>::try_from(map) {
                let _ = reverse.remove(reply_key);
            }
        }
    }

    /// Clients with a `source-ip` session, per backend id. Walks the whole map.
    pub fn sessions_by_backend(&self) -> Result<std::collections::HashMap<u32, u64>> {
        let map = self.map_ref(map_name::AFFINITY)?;
        let sessions: HashMap<&MapData, AffinityKey, Affinity> = HashMap::try_from(map)?;
        let mut counts = std::collections::HashMap::new();
        for (_, session) in sessions.iter().filter_map(Result::ok) {
            *counts.entry(session.backend_id).or_default() += 1;
        }
        Ok(counts)
    }

    /// Flows per backend id that are not closing and saw a client packet in the last
    /// `window_s` seconds. Walks the whole map.
    pub fn active_flows_by_backend(
        &self,
        window_s: u32,
    ) -> Result<std::collections::HashMap<u32, u64>> {
        let map = self.map_ref(map_name::FLOWS)?;
        let flows: HashMap<&MapData, FlowKey, Flow> = HashMap::try_from(map)?;
        let now_s = monotonic_seconds();
        let mut counts = std::collections::HashMap::new();
        for (_, flow) in flows.iter().filter_map(Result::ok) {
            let idle = now_s.saturating_sub(flow.last_seen_s);
            if flow.flags & flow_flags::CLOSING == 0 && idle <= window_s {
                *counts.entry(flow.backend_id).or_default() += 1;
            }
        }
        Ok(counts)
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

    pub fn detach(mut self) -> Result<()> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .context("the XDP object has no balancer program")?
            .try_into()?;
        for (interface, link) in self.links.drain(..) {
            program
                .detach(link)
                .with_context(|| format!("detaching from {interface}"))?;
            info!(%interface, "detached");
        }
        Ok(())
    }
}

fn attach(
    program: &mut Xdp,
    interface: &str,
    setting: XdpModeSetting,
) -> Result<(XdpLinkId, &'static str)> {
    ifindex(interface)?;
    match setting {
        XdpModeSetting::Native => program
            .attach(interface, XdpMode::Driver)
            .map(|link| (link, "native"))
            .with_context(|| {
                format!("attaching in native mode to {interface} (try xdp_mode = \"generic\")")
            }),
        XdpModeSetting::Generic => program
            .attach(interface, XdpMode::Skb)
            .map(|link| (link, "generic"))
            .with_context(|| format!("attaching in generic mode to {interface}")),
        XdpModeSetting::Auto => match program.attach(interface, XdpMode::Driver) {
            Ok(link) => Ok((link, "native")),
            Err(error) => {
                warn!(%interface, %error, "native XDP is not available, falling back to generic mode (slower)");
                program
                    .attach(interface, XdpMode::Skb)
                    .map(|link| (link, "generic"))
                    .with_context(|| format!("attaching in generic mode to {interface}"))
            }
        },
    }
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
fn expected_maps(config: &Config) -> [(&'static str, usize, usize, u32); 11] {
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
            map_name::COOKIE_SECRET,
            size_of::<u32>(),
            size_of::<CookieSecret>(),
            1,
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
            map_name::TX_PORTS,
            size_of::<u32>(),
            DEVMAP_VALUE_SIZE,
            MAX_TX_PORTS,
        ),
    ]
}

/// Slots of `BACKEND_TABLE`: two tables of `table_size` for every possible service.
fn table_capacity(config: &Config) -> u32 {
    MAX_SERVICES * TABLES_PER_SERVICE * config.table_size
}

/// Pinned maps are reused across restarts so that flows survive; a pin left by a different
/// version or a different `flow_capacity` would be reused with the wrong shape, so it goes.
fn remove_incompatible_pins(dir: &Path, config: &Config) -> Result<()> {
    for (name, key_size, value_size, capacity) in expected_maps(config) {
        let path = dir.join(name);
        let Ok(info) = MapInfo::from_pin(&path) else {
            continue;
        };
        let found = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if found != (key_size, value_size, capacity) {
            warn!(
                map = name,
                ?found,
                wanted = ?(key_size, value_size, capacity),
                "pinned map has another shape (key size, value size, capacity): replacing it, its entries are lost"
            );
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Seconds of the clock the data plane stamps flows with (`bpf_ktime_get_coarse_ns`).
fn monotonic_seconds() -> u32 {
    // SAFETY: `timespec` is plain data filled in by the kernel.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `now` is writable.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    now.tv_sec as u32
}

/// Mounts the BPF filesystem at `/sys/fs/bpf` unless it is there already.
fn mount_bpf_fs() -> Result<()> {
    let path = std::ffi::CString::new(BPF_FS).context("bpffs path")?;
    // SAFETY: `statfs` is plain data filled in by the kernel.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` is writable.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } == 0 && stat.f_type as i64 == BPF_FS_MAGIC
    {
        return Ok(());
    }
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
