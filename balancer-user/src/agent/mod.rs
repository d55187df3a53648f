//! The agent's model of services and backends, and the one place that turns it into map
//! contents: configuration, health reports and operator commands all change the model, and
//! every change republishes the affected service.

use std::{
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use balancer_common::{
    backend_state, Addr, Backend, CookieSecret, NewFlowSource, Service, ServiceKey,
    GROUP_TABLE_SIZE, MAX_BACKENDS,
};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{error, info, warn};

use crate::{
    config::{
        AdminState, AffinityMode, BackendConfig, Config, CookieFallback, OnBackendDown,
        RouteConfig, ServiceConfig,
    },
    dataplane::{Dataplane, TableCount},
    health, maglev,
};

/// Sources by new flows that `balancer top` and `balancer status --json` show.
const TOP_SOURCES: usize = 10;

/// A flow counts as active while its client sent a packet this recently and did not close it.
const ACTIVE_FLOW_WINDOW_S: u32 = 60;

mod binding;
mod budget;
mod counters;
#[cfg(test)]
mod fuzz;
mod known;
mod placement;
mod raw_socket;
mod response;
mod sources;
mod worker;

use binding::BindingLimits;
pub use counters::BindingCounters;
use counters::Outcome;
use placement::GroupRuntime;
use worker::{View, Workers};

pub struct Agent {
    config: Config,
    dataplane: Dataplane,
    /// The threads that bind cookie connections, each with its share of them.
    workers: Workers,
    /// From a connection's first segment seen to its splice: the workers observe into it.
    binding_latency: prometheus_client::metrics::histogram::Histogram,
    services: Vec<ServiceRuntime>,
    checks: Vec<JoinHandle<()>>,
    reports: mpsc::Sender<health::Report>,
    /// SYN cookie secrets this run has rotated in.
    cookie_rotations: u64,
    /// The health checkers' latencies, for the metrics.
    check_latency: crate::metrics::CheckLatencies,
    /// The clients that opened the most new flows (XDP's and cookie connections).
    sources: sources::SourceTally,
    /// The last [`Service::generation`] written. Seeded from the clock, so that a restarted
    /// agent does not meet the known sessions a previous run left with its generations.
    generation: u32,
    /// The cookie connections XDP bound without the workers.
    xdp_bindings: counters::XdpBindings,
}

#[derive(Clone)]
struct ServiceRuntime {
    id: u32,
    key: ServiceKey,
    config: ServiceConfig,
    backends: Vec<BackendRuntime>,
    /// The published lookup table: backend ids by slot.
    lookup: Vec<u32>,
    /// The backends of `lookup`, once each.
    members: Vec<u32>,
    /// The groups of [`ServiceConfig::groups`], in order (none without groups).
    groups: Vec<GroupRuntime>,
    /// With `balance_factor`: active connections per backend id, as the latest walk of the
    /// flow table counted them plus those placed since.
    loads: HashMap<u32, u64>,
    /// The [`Service::generation`] last written.
    generation: u32,
}

#[derive(Clone)]
struct BackendRuntime {
    id: u32,
    config: BackendConfig,
    /// The health checks' verdict; always true without checks.
    healthy: bool,
    /// Since when the checks have failed it.
    down_since: Option<Instant>,
    /// When the backend started draining.
    draining_since: Option<Instant>,
    /// The state last written to the data plane.
    published_state: u8,
}

impl BackendRuntime {
    /// The state the data plane sees.
    fn state(&self, drain_timeout: Duration) -> u8 {
        match self.draining_since {
            _ if !self.healthy => backend_state::DOWN,
            None => backend_state::UP,
            Some(since) if since.elapsed() < drain_timeout => backend_state::DRAINING,
            Some(_) => backend_state::DOWN,
        }
    }
}

/// What a service's `status` line says of its placement beyond its affinity, each as
/// ` name=value`: the settings that differ from the defaults.
fn placement_settings(c: &ServiceConfig) -> String {
    let mut text = String::new();
    if let Some(param) = c.url_param() {
        let _ = write!(text, " param={param}");
    }
    if let Some(factor) = c.balance_factor {
        let _ = write!(text, " balance_factor={factor}");
    }
    match c.on_backend_down {
        OnBackendDown::Failover => {}
        OnBackendDown::Keep => {
            let _ = write!(
                text,
                " on_backend_down=keep keep_timeout={}s",
                c.keep_timeout
            );
        }
        OnBackendDown::Reject => text += " on_backend_down=reject",
    }
    if c.return_home {
        text += " return_home=true";
    }
    text
}

/// The session settings a route sets of its own, as `status` shows them.
fn route_settings(route: &RouteConfig) -> String {
    let mut text = String::new();
    if let Some(affinity) = route.affinity {
        let _ = write!(text, " affinity={affinity}");
    }
    let named = [
        ("cookie", &route.cookie),
        ("param", &route.param),
        ("companion_cookie", &route.companion_cookie),
    ];
    for (name, value) in named {
        if let Some(value) = value {
            let _ = write!(text, " {name}={value}");
        }
    }
    if let Some(mode) = route.app_cookie {
        let _ = write!(text, " app_cookie={}", format!("{mode:?}").to_lowercase());
    }
    if let Some(seconds) = route.cookie_duration {
        let _ = write!(text, " cookie_duration={seconds}s");
    }
    if let Some(fallback) = route.cookie_fallback {
        let fallback = match fallback {
            CookieFallback::Flow => "flow",
            CookieFallback::SourceIp => "source-ip",
        };
        let _ = write!(text, " cookie_fallback={fallback}");
    }
    text
}

fn state_name(state: u8) -> &'static str {
    match state {
        backend_state::UP => "up",
        backend_state::DRAINING => "draining",
        _ => "down",
    }
}

impl ServiceRuntime {
    fn drain_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.config.drain_timeout))
    }

    /// Until when (a second of the coarse monotonic clock) XDP refuses the new flows of a
    /// failed backend's `source-ip` sessions instead of moving them, as `on_backend_down`
    /// says: 0 for none (and for the other services, whose sessions the agent holds).
    fn hold_until(&self, backend: &BackendRuntime) -> u32 {
        if self.config.affinity != AffinityMode::SourceIp || backend.healthy {
            return 0;
        }
        match self.config.on_backend_down {
            OnBackendDown::Failover => 0,
            OnBackendDown::Reject => u32::MAX,
            OnBackendDown::Keep => {
                let down = backend
                    .down_since
                    .map_or(0, |since| since.elapsed().as_secs());
                let left = u64::from(self.config.keep_timeout).saturating_sub(down);
                crate::dataplane::monotonic_seconds().saturating_add(left as u32)
            }
        }
    }

    /// Each backend's weight in the service's whole table: its own without groups.
    fn weights_in_service(&self) -> Vec<u32> {
        let groups_weight: u32 = self.groups.iter().map(|g| g.weight).sum();
        self.backends
            .iter()
            .map(|backend| match backend.config.group {
                None => backend.config.weight,
                Some(g) => {
                    let group_backends_weight = self
                        .backends
                        .iter()
                        .filter(|b| b.config.group == Some(g))
                        .map(|b| b.config.weight)
                        .sum();
                    placement::weight_in_service(
                        backend.config.weight,
                        group_backends_weight,
                        self.groups[g].weight,
                        groups_weight,
                    )
                }
            })
            .collect()
    }
}

impl Agent {
    /// Programs `config` into the data plane (removing services a previous run left there)
    /// and starts the health checks.
    pub fn new(
        config: Config,
        mut dataplane: Dataplane,
        reports: mpsc::Sender<health::Report>,
    ) -> Result<Self> {
        let configured: Vec<ServiceKey> = config.services.iter().map(|s| s.key()).collect();
        for key in dataplane.service_keys()? {
            if !configured.contains(&key) {
                dataplane.remove_service(&key)?;
            }
        }
        dataplane.ensure_cookie_secret(random_secret)?;
        let passed = dataplane.pass_response_heads()?;
        if passed > 0 {
            info!("{passed} response(s) whose head the previous run was reading pass unedited");
        }
        let rings = (0..dataplane.workers as usize)
            .map(|worker| dataplane.take_punts(worker))
            .collect::<Result<Vec<_>>>()?;
        let binding_latency = crate::metrics::binding_latency_histogram();
        let mut agent = Self {
            config: config.clone(),
            dataplane,
            workers: Workers::start(rings, &config, &binding_latency)?,
            binding_latency,
            services: Vec::new(),
            checks: Vec::new(),
            reports,
            cookie_rotations: 0,
            check_latency: crate::metrics::check_latencies(),
            sources: sources::SourceTally::default(),
            generation: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u32),
            xdp_bindings: counters::XdpBindings::default(),
        };
        agent.apply(config)?;
        agent.note_xdp_bindings()?;
        Ok(agent)
    }

    /// Reads the configuration file again and applies it; a file that cannot be used leaves
    /// the running configuration in force.
    pub fn reload(&mut self, path: &Path) -> Result<String> {
        let mut config = Config::load(path)?;
        if config.workers() != self.dataplane.workers {
            warn!(
                running = self.dataplane.workers,
                configured = config.workers(),
                "agent_workers takes effect at the next start"
            );
        }
        config.agent_workers = self.config.agent_workers;
        for (field, old, new) in [
            (
                "instance",
                self.config.instance.clone(),
                config.instance.clone(),
            ),
            (
                "client_interface",
                self.config.client_interface.clone(),
                config.client_interface.clone(),
            ),
            (
                "backend_interface",
                self.config.backend_interface().to_owned(),
                config.backend_interface().to_owned(),
            ),
            (
                "flow_capacity",
                self.config.flow_capacity.to_string(),
                config.flow_capacity.to_string(),
            ),
            (
                "affinity_capacity",
                self.config.affinity_capacity.to_string(),
                config.affinity_capacity.to_string(),
            ),
            (
                "table_size",
                self.config.table_size.to_string(),
                config.table_size.to_string(),
            ),
            (
                "punt_ring_size",
                self.config.punt_ring_size.to_string(),
                config.punt_ring_size.to_string(),
            ),
        ] {
            if old != new {
                bail!("{field}: a reload cannot change it ({old} → {new}); restart the agent");
            }
        }
        self.apply(config)?;
        let summary = format!(
            "configuration reloaded: {} services, {} backends",
            self.services.len(),
            self.services
                .iter()
                .map(|s| s.backends.len())
                .sum::<usize>()
        );
        info!("{summary}");
        Ok(summary)
    }

    /// Makes the model match `config`, keeping the ids, health and drain state of services and
    /// backends that remain, then republishes everything and restarts the health checks.
    fn apply(&mut self, config: Config) -> Result<()> {
        // The first configuration of a run meets the state a previous run left in the maps.
        let adopting = self.services.is_empty();
        let mut old: HashMap<String, ServiceRuntime> = self
            .services
            .drain(..)
            .map(|s| (s.config.name.clone(), s))
            .collect();
        let mut service_ids: BTreeSet<u32> = old.values().map(|s| s.id).collect();
        let mut backend_ids: BTreeSet<u32> = old
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect();

        let mut services = Vec::new();
        for service in &config.services {
            let previous = old.remove(&service.name);
            let id = match &previous {
                Some(p) => p.id,
                None => take_free_id(&mut service_ids, balancer_common::MAX_SERVICES)?,
            };
            let mut old_backends: HashMap<String, BackendRuntime> = previous
                .map(|p| {
                    p.backends
                        .into_iter()
                        .map(|b| (b.config.name.clone(), b))
                        .collect()
                })
                .unwrap_or_default();
            let mut backends = Vec::new();
            for backend in &service.backends {
                let runtime = match old_backends.remove(&backend.name) {
                    Some(mut runtime) => {
                        if runtime.config.state != backend.state {
                            runtime.draining_since = match backend.state {
                                AdminState::Draining => Some(Instant::now()),
                                AdminState::Active => None,
                            };
                        }
                        runtime.config = backend.clone();
                        if service.health_check.is_none() {
                            runtime.healthy = true;
                            runtime.down_since = None;
                        }
                        runtime
                    }
                    None => {
                        let id = take_free_id(&mut backend_ids, MAX_BACKENDS)?;
                        let mut runtime = BackendRuntime {
                            id,
                            config: backend.clone(),
                            healthy: true,
                            down_since: None,
                            draining_since: (backend.state == AdminState::Draining)
                                .then(Instant::now),
                            published_state: backend_state::DOWN,
                        };
                        if adopting {
                            self.adopt_backend_state(&mut runtime, service);
                        }
                        runtime
                    }
                };
                backends.push(runtime);
            }
            for removed in old_backends.into_values() {
                self.retire_backend(&service.name, &removed);
                backend_ids.remove(&removed.id);
            }
            services.push(ServiceRuntime {
                id,
                key: service.key(),
                config: service.clone(),
                backends,
                lookup: Vec::new(),
                members: Vec::new(),
                groups: service
                    .groups
                    .iter()
                    .map(|g| GroupRuntime::new(&g.name, g.weight))
                    .collect(),
                loads: HashMap::new(),
                generation: 0,
            });
        }
        for removed in old.into_values() {
            for backend in &removed.backends {
                self.retire_backend(&removed.config.name, backend);
            }
            if !services.iter().any(|s| s.key == removed.key) {
                self.dataplane.remove_service(&removed.key)?;
            }
            info!(service = %removed.config.name, "service removed");
        }

        self.services = services;
        self.dataplane.set_request_timeout(config.request_timeout);
        crate::dataplane::reserve_nat_ports(&config)?;
        self.dataplane
            .set_nat_sources(&config)
            .context("writing full NAT's source addresses")?;
        self.config = config;
        // The workers see the services once all are written: in between, those not yet
        // written have no lookup table, and their connections would find no backend.
        for index in 0..self.services.len() {
            self.write_service(index)?;
        }
        self.share_view();
        self.restart_health_checks();
        Ok(())
    }

    /// Takes over what a previous run decided for a backend it left in the maps at the same id
    /// and address: failing its checks (it stays down until they pass again, instead of
    /// taking new sessions for one check interval) or draining (the drain restarts now).
    fn adopt_backend_state(&self, runtime: &mut BackendRuntime, service: &ServiceConfig) {
        let Some(pinned) = self.dataplane.backend(runtime.id) else {
            return;
        };
        let value = backend_value(&self.config, &runtime.config, service.port, pinned.state);
        if (pinned.addr, pinned.port) != (value.addr, value.port) {
            return;
        }
        match pinned.state {
            backend_state::DOWN if service.health_check.is_some() => {
                runtime.healthy = false;
                runtime.down_since = Some(Instant::now());
            }
            backend_state::DRAINING => runtime.draining_since = Some(Instant::now()),
            _ => {}
        }
    }

    /// A backend that left the configuration: its sessions move, its flows continue.
    fn retire_backend(&mut self, service: &str, backend: &BackendRuntime) {
        let value = backend_value(&self.config, &backend.config, 0, backend_state::DOWN);
        if let Err(error) = self.dataplane.write_backend(backend.id, value) {
            warn!(%service, backend = %backend.config.name, "retiring a backend: {error:#}");
        }
        info!(%service, backend = %backend.config.name, "backend removed from the configuration");
    }

    /// Writes a service's backends and a fresh lookup table over the ones that take new
    /// sessions, and hands the workers the changed model.
    fn publish(&mut self, index: usize) -> Result<()> {
        self.write_service(index)?;
        self.share_view();
        Ok(())
    }

    /// [`Agent::publish`] without telling the workers.
    fn write_service(&mut self, index: usize) -> Result<()> {
        self.generation = self.generation.wrapping_add(1);
        self.services[index].generation = self.generation;
        let service = &self.services[index];
        let members = write_backends(&mut self.dataplane, &self.config, service)?;
        let ids: Vec<u32> = service.backends.iter().map(|b| b.id).collect();
        let lookup = lookup_table(&members, &ids, self.config.table_size);
        // XDP moves a source-ip session within its group by the group's table; the agent
        // places an HTTP service's sessions by its own.
        let source_ip = service.config.affinity == AffinityMode::SourceIp;
        let group_size = if source_ip {
            GROUP_TABLE_SIZE
        } else {
            self.config.table_size
        };
        let group_lookups = group_tables(service, &members, group_size);
        let backend_count = if lookup.is_empty() {
            0
        } else {
            members.iter().filter(|m| m.serving && m.weight > 0).count() as u32
        };
        let value = Service {
            backend_count,
            ..service_value(service)
        };
        let (key, id, name) = (service.key, service.id, service.config.name.clone());
        for (group, lookup) in group_lookups.iter().enumerate() {
            let lookup = if source_ip { &lookup[..] } else { &[] };
            self.dataplane
                .publish_group(id, group as u32, lookup)
                .with_context(|| format!("publishing a group of service {name}"))?;
        }
        self.dataplane
            .publish_service(&key, value, &lookup)
            .with_context(|| format!("publishing service {name}"))?;
        let service = &mut self.services[index];
        service.members = placement::members(&lookup);
        service.lookup = lookup;
        for (group, lookup) in service.groups.iter_mut().zip(group_lookups) {
            group.members = placement::members(&lookup);
            group.lookup = lookup;
        }
        let drain_timeout = service.drain_timeout();
        for backend in &mut service.backends {
            backend.published_state = backend.state(drain_timeout);
        }
        if backend_count == 0 {
            error!(service = %name, "no backend can take new connections: TCP is refused with a reset, UDP dropped");
        } else {
            info!(service = %name, backends = backend_count, "service published");
        }
        Ok(())
    }

    /// Hands the workers the services as the model has them now.
    fn share_view(&self) {
        self.workers.share(View {
            services: self.services.clone(),
            config: std::sync::Arc::new(self.config.clone()),
            limits: binding_limits(&self.config, self.dataplane.workers),
        });
    }

    fn restart_health_checks(&mut self) {
        for check in self.checks.drain(..) {
            check.abort();
        }
        for service in &self.services {
            let Some(check) = &service.config.health_check else {
                continue;
            };
            for backend in &service.backends {
                let port = check
                    .port
                    .unwrap_or_else(|| backend.config.port_for(&service.config));
                let target = health::Target {
                    service: service.config.name.clone(),
                    backend: backend.config.name.clone(),
                    addr: SocketAddr::from((backend.config.address, port)),
                    check: check.clone(),
                    latency: self
                        .check_latency
                        .get_or_create(&crate::metrics::backend_labels(
                            &service.config.name,
                            &backend.config.name,
                        ))
                        .clone(),
                };
                self.checks
                    .push(health::spawn(target, backend.healthy, self.reports.clone()));
            }
        }
    }

    /// A health checker saw a backend change state.
    pub fn health_changed(&mut self, report: health::Report) -> Result<()> {
        let Some((index, backend)) = self.find(&report.service, &report.backend) else {
            return Ok(());
        };
        let runtime = &mut self.services[index].backends[backend];
        if runtime.healthy == report.healthy {
            return Ok(());
        }
        runtime.healthy = report.healthy;
        runtime.down_since = (!report.healthy).then(Instant::now);
        if report.healthy {
            info!(service = %report.service, backend = %report.backend, reason = %report.reason, "backend is up");
        } else {
            let sessions = match self.services[index].config.on_backend_down {
                OnBackendDown::Failover => "its sessions move to healthy backends",
                OnBackendDown::Keep => {
                    "its sessions wait for it up to keep_timeout, refused meanwhile"
                }
                OnBackendDown::Reject => "its sessions are refused until it returns",
            };
            warn!(service = %report.service, backend = %report.backend, reason = %report.reason, "backend is down: {sessions}");
        }
        self.publish(index)
    }

    /// Starts (`true`) or ends draining a backend.
    pub fn set_draining(&mut self, service: &str, backend: &str, draining: bool) -> Result<String> {
        let (index, position) = self
            .find(service, backend)
            .with_context(|| format!("no backend {backend} in service {service}"))?;
        let timeout = self.services[index].config.drain_timeout;
        let runtime = &mut self.services[index].backends[position];
        let message = match (draining, runtime.draining_since) {
            (true, Some(_)) => format!("{service}/{backend} is already draining"),
            (false, None) => format!("{service}/{backend} is not draining"),
            (true, None) => {
                runtime.draining_since = Some(Instant::now());
                format!("{service}/{backend} is draining: no new sessions, existing ones stay for {timeout} s")
            }
            (false, Some(_)) => {
                runtime.draining_since = None;
                format!("{service}/{backend} takes new sessions again")
            }
        };
        info!("{message}");
        self.publish(index)?;
        Ok(message)
    }

    /// Sets the share of new sessions a group of a service takes (0: none, the group drains);
    /// existing sessions stay in their groups for the service's `group_stickiness`. Lasts
    /// until the next reload, which applies the configuration's weights.
    pub fn set_group_weight(&mut self, service: &str, group: &str, weight: u32) -> Result<String> {
        let index = self
            .services
            .iter()
            .position(|s| s.config.name == service)
            .with_context(|| format!("no service {service}"))?;
        let runtime = &mut self.services[index];
        let position = runtime
            .groups
            .iter()
            .position(|g| g.name == group)
            .with_context(|| format!("no group {group} in service {service}"))?;
        if weight > crate::config::MAX_WEIGHT {
            bail!(
                "weight {weight} is above the maximum {}",
                crate::config::MAX_WEIGHT
            );
        }
        let previous = std::mem::replace(&mut runtime.groups[position].weight, weight);
        let stickiness = runtime.config.group_stickiness();
        let message = format!(
            "{service}/{group} weight {previous} -> {weight}: new sessions follow it, existing ones stay in their groups for {stickiness} s"
        );
        info!("{message}");
        self.publish(index)?;
        Ok(message)
    }

    /// What still holds a backend, for `balancer backend drain --wait`: its state, its flows
    /// that are not closing and saw a packet in the last minute, its live `source-ip`
    /// sessions, and the seconds since a connection last came to it by its cookie.
    pub fn pinned(&mut self, service: &str, backend: &str) -> Result<String> {
        let tallies = self.cookie_tallies()?;
        let (index, position) = self
            .find(service, backend)
            .with_context(|| format!("no backend {backend} in service {service}"))?;
        let service = &self.services[index];
        let runtime = &service.backends[position];
        let flows = self
            .dataplane
            .active_flows_by_backend(ACTIVE_FLOW_WINDOW_S)?
            .by_backend
            .get(&runtime.id)
            .copied()
            .unwrap_or(0);
        let sessions = self
            .dataplane
            .live_sessions_of(runtime.id, service.config.affinity_timeout)?;
        let cookie_quiet = tallies
            .last_cookie_choice
            .get(&runtime.id)
            .map_or_else(|| "never".to_owned(), |t| t.elapsed().as_secs().to_string());
        Ok(format!(
            "state={} flows={flows} sessions={sessions} cookie_quiet_s={cookie_quiet}",
            state_name(runtime.state(service.drain_timeout()))
        ))
    }

    /// A service's sessions as JSON, for `balancer sessions`: per backend its live
    /// `source-ip` sessions, spliced cookie connections and connections that came by its
    /// cookie in the last minute; then up to `limit` live `source-ip` sessions (of `backend`
    /// only, if given) with their client, backend and idle seconds.
    pub fn sessions(
        &mut self,
        service: &str,
        backend: Option<&str>,
        limit: usize,
    ) -> Result<String> {
        let tallies = self.cookie_tallies()?;
        let service = self
            .services
            .iter()
            .find(|s| s.config.name == service)
            .with_context(|| format!("no service {service}"))?;
        let picked: Vec<&BackendRuntime> = service
            .backends
            .iter()
            .filter(|b| backend.is_none_or(|name| b.config.name == name))
            .collect();
        if let (Some(name), true) = (backend, picked.is_empty()) {
            anyhow::bail!("no backend {name} in service {}", service.config.name);
        }
        let name_of = |id: u32| {
            service
                .backends
                .iter()
                .find(|b| b.id == id)
                .map_or_else(|| format!("#{id}"), |b| b.config.name.clone())
        };
        let ids: Vec<u32> = picked.iter().map(|b| b.id).collect();
        let live = self
            .dataplane
            .live_sessions(service.config.affinity_timeout, |key, session| {
                key.service_id == service.id && ids.contains(&session.backend_id)
            })?;
        let spliced = self.dataplane.spliced_by_backend()?;
        let now = u64::from(crate::dataplane::monotonic_seconds());
        let drain_timeout = service.drain_timeout();
        let backends: Vec<serde_json::Value> = picked
            .iter()
            .map(|b| {
                serde_json::json!({
                    "backend": b.config.name,
                    "state": state_name(b.state(drain_timeout)),
                    "source_ip_sessions": live.iter().filter(|(_, s, _)| s.backend_id == b.id).count(),
                    "spliced_connections": spliced.get(&b.id).copied().unwrap_or(0),
                    "cookie_connections_last_minute": tallies
                        .recent_cookie_choices
                        .get(&b.id)
                        .map_or(0, |recent| recent.total(now)),
                })
            })
            .collect();
        let sessions: Vec<serde_json::Value> = live
            .iter()
            .take(limit)
            .map(|(key, session, idle_s)| {
                let group = (session.group as usize)
                    .checked_sub(1)
                    .and_then(|g| service.groups.get(g));
                serde_json::json!({
                    "client": std::net::IpAddr::from(key.client).to_string(),
                    "backend": name_of(session.backend_id),
                    "idle_s": idle_s,
                    "group": group.map(|g| g.name.as_str()),
                    "group_s": group.map(|_| session.group_until_s.saturating_sub(now as u32)),
                })
            })
            .collect();
        let answer = serde_json::json!({
            "service": service.config.name,
            "affinity": service.config.affinity.to_string(),
            "backends": backends,
            "source_ip_sessions": sessions,
            "source_ip_sessions_not_listed": live.len().saturating_sub(limit),
        });
        Ok(answer.to_string())
    }

    /// Moves the sessions of backends whose drain timeout has passed.
    pub fn expire_drains(&mut self) -> Result<()> {
        for index in 0..self.services.len() {
            let service = &self.services[index];
            let timeout = service.drain_timeout();
            let mut expired = false;
            for backend in &service.backends {
                if backend.state(timeout) != backend.published_state {
                    info!(service = %service.config.name, backend = %backend.config.name, "drain timeout passed: remaining sessions move to other backends");
                    expired = true;
                }
            }
            if expired {
                self.publish(index)?;
            }
        }
        Ok(())
    }

    /// The affinity table, counting per backend the `source-ip` sessions that still hold it
    /// under their service's `affinity_timeout`.
    fn session_table(&self) -> Result<TableCount> {
        self.dataplane.sessions_by_backend(|id| {
            self.services
                .iter()
                .find(|s| s.id == id)
                .map(|s| s.config.affinity_timeout)
        })
    }

    /// One line per backend: state, health, clients with a live session and active flows.
    pub fn status(&self) -> Result<String> {
        let sessions = self.session_table()?.by_backend;
        let flows = self
            .dataplane
            .active_flows_by_backend(ACTIVE_FLOW_WINDOW_S)?
            .by_backend;
        let mut text = String::new();
        let attached: Vec<String> = self
            .dataplane
            .attachments
            .iter()
            .map(|(interface, how)| format!("{interface} ({how})"))
            .collect();
        let _ = writeln!(
            text,
            "data plane: program {} attached to {}; it stays attached when the agent exits",
            self.dataplane.program_id,
            attached.join(", ")
        );
        for service in &self.services {
            let c = &service.config;
            let _ = writeln!(
                text,
                "service {} {}:{}/{} affinity={}{}",
                c.name,
                c.vip,
                c.port,
                c.protocol,
                c.affinity,
                placement_settings(c)
            );
            for route in &c.routes {
                let _ = writeln!(
                    text,
                    "  route host={} path={} group={}{}",
                    route.host.as_deref().unwrap_or("*"),
                    route.path,
                    route.group,
                    route_settings(route)
                );
            }
            if let Some(default) = &c.default_group {
                let _ = writeln!(text, "  route default group={default}");
            }
            for group in &service.groups {
                let _ = writeln!(
                    text,
                    "  group {} weight={} stickiness={}s",
                    group.name,
                    group.weight,
                    c.group_stickiness()
                );
            }
            for backend in &service.backends {
                let state = backend.state(service.drain_timeout());
                let flows = flows.get(&backend.id).copied().unwrap_or(0);
                let drained = backend.draining_since.is_some()
                    && state == backend_state::DOWN
                    && backend.healthy;
                let drained = match (drained, flows) {
                    (false, _) => "",
                    (true, 0) => " (drained, no flows left)",
                    (true, _) => " (drained, flows continue)",
                };
                let group = match backend.config.group {
                    Some(g) => format!(" group={}", service.groups[g].name),
                    None => String::new(),
                };
                let _ = writeln!(
                    text,
                    "  backend {} {}:{} state={}{} health={} weight={} sessions={} flows={}{group}",
                    backend.config.name,
                    backend.config.address,
                    backend.config.port_for(c),
                    state_name(state),
                    drained,
                    if backend.healthy { "ok" } else { "failing" },
                    backend.config.weight,
                    sessions.get(&backend.id).copied().unwrap_or(0),
                    flows,
                );
            }
        }
        let each = self.workers.tallies_each();
        let list = |count: &dyn Fn(&counters::Tallies) -> u64| {
            each.iter()
                .map(|t| count(t).to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let _ = writeln!(
            text,
            "workers count={} bound_each={} held_each={}",
            each.len(),
            list(&|t| t.counters.bound),
            list(&|t| t.held as u64),
        );
        let tallies = counters::Tallies::sum(each);
        let b = &tallies.counters;
        let (issued_by_xdp, bound_by_xdp) = self.xdp_cookie_totals()?;
        let _ = writeln!(
            text,
            "bindings bound={} by_xdp={} cookie={} fallback={} issued={} heads_resent={} replays_resent={} retried={} failed={} head_too_large={} held={}",
            b.bound + bound_by_xdp,
            bound_by_xdp,
            b.with_cookie,
            b.without_cookie,
            b.cookies_issued + issued_by_xdp,
            b.heads_resent,
            b.replays_resent,
            b.retried,
            b.failed,
            b.head_too_large,
            tallies.held
        );
        let _ = writeln!(
            text,
            "bindings_reset shed_client_budget={} shed_prefix_budget={} shed_table_full={} head_unacknowledged={} challenge_acks={} out_of_window={} time_wait={}",
            b.shed_client_budget,
            b.shed_prefix_budget,
            b.shed_table_full,
            b.head_unacknowledged,
            b.challenge_acks,
            b.out_of_window,
            b.time_wait_resets
        );
        let _ = writeln!(
            text,
            "syn_cookies rotations={} every={}s",
            self.cookie_rotations, self.config.syn_cookie_rotation
        );
        let _ = write!(text, "cookies_rejected");
        for (reason, count) in counters::REJECTION_REASONS.iter().zip(b.cookies_rejected) {
            let _ = write!(text, " {reason}={count}");
        }
        text.push('\n');
        Ok(text)
    }

    /// What the Prometheus endpoint shows.
    pub fn metrics(&self) -> Result<crate::metrics::Snapshot> {
        let session_table = self.session_table()?;
        let flow_table = self
            .dataplane
            .active_flows_by_backend(ACTIVE_FLOW_WINDOW_S)?;
        let (sessions, flows) = (&session_table.by_backend, &flow_table.by_backend);
        let tallies = self.workers.tallies();
        let b = &tallies.counters;
        let counters = self.dataplane.backend_counters(&self.backend_ids())?;
        let mut backends = Vec::new();
        for service in &self.services {
            for backend in &service.backends {
                backends.push(crate::metrics::BackendSnapshot {
                    service: service.config.name.clone(),
                    backend: backend.config.name.clone(),
                    healthy: backend.healthy,
                    state: state_name(backend.state(service.drain_timeout())),
                    weight: backend.config.weight,
                    group: backend.config.group.map(|g| service.groups[g].name.clone()),
                    sessions: sessions.get(&backend.id).copied().unwrap_or(0),
                    active_flows: flows.get(&backend.id).copied().unwrap_or(0),
                    bound: tallies
                        .bound_by_backend
                        .get(&backend.id)
                        .copied()
                        .unwrap_or(0)
                        + counters.get(&backend.id).map_or(0, |c| c.bound),
                    xdp: counters.get(&backend.id).copied().unwrap_or_default(),
                    cookies_issued: tallies
                        .issued_by_backend
                        .get(&backend.id)
                        .copied()
                        .unwrap_or(0)
                        + counters.get(&backend.id).map_or(0, |c| c.cookies_issued),
                });
            }
        }
        Ok(crate::metrics::Snapshot {
            xdp: crate::stats::Snapshot::read(&self.config.instance)?,
            bindings: self
                .services
                .iter()
                .filter(|s| s.config.reads_requests())
                .flat_map(|s| {
                    Outcome::ALL.map(|outcome| {
                        let count = tallies.outcomes_by_service.get(&(s.id, outcome));
                        (
                            s.config.name.clone(),
                            outcome.name(),
                            count.copied().unwrap_or(0),
                        )
                    })
                })
                .collect(),
            resets: vec![
                ("client_budget", b.shed_client_budget),
                ("prefix_budget", b.shed_prefix_budget),
                ("table_full", b.shed_table_full),
                ("head_unacknowledged", b.head_unacknowledged),
            ],
            cookies_issued: b.cookies_issued
                + counters.values().map(|c| c.cookies_issued).sum::<u64>(),
            cookies_rejected: self
                .services
                .iter()
                .filter(|s| s.config.cookie_name().is_some())
                .flat_map(|s| {
                    counters::REJECTION_REASONS
                        .iter()
                        .enumerate()
                        .map(|(index, reason)| {
                            let count = tallies.rejected_by_service.get(&(s.id, index));
                            (s.config.name.clone(), *reason, count.copied().unwrap_or(0))
                        })
                        .collect::<Vec<_>>()
                })
                .collect(),
            resent: vec![
                ("response_head", b.heads_resent),
                ("request", b.replays_resent),
            ],
            syn_cookie_rotations: self.cookie_rotations,
            groups: self
                .services
                .iter()
                .flat_map(|s| {
                    s.groups
                        .iter()
                        .map(|g| (s.config.name.clone(), g.name.clone(), g.weight))
                })
                .collect(),
            tables: vec![
                crate::metrics::Table {
                    name: "flows",
                    entries: flow_table.entries,
                    capacity: u64::from(self.config.flow_capacity),
                },
                crate::metrics::Table {
                    name: "affinity",
                    entries: session_table.entries,
                    capacity: u64::from(self.config.affinity_capacity),
                },
                crate::metrics::Table {
                    name: "bindings",
                    entries: tallies.held as u64,
                    capacity: u64::from(self.config.binding_capacity),
                },
            ],
            punts_read: b.punts_read,
            backends,
            binding_latency: Some(self.binding_latency.clone()),
            check_latency: Some(self.check_latency.clone()),
            top_sources: self.top_sources(TOP_SOURCES),
        })
    }

    fn find(&self, service: &str, backend: &str) -> Option<(usize, usize)> {
        let index = self
            .services
            .iter()
            .position(|s| s.config.name == service)?;
        let position = self.services[index]
            .backends
            .iter()
            .position(|b| b.config.name == backend)?;
        Some((index, position))
    }

    /// Stops the health checks; the data plane stays as it is.
    pub fn shutdown(self) {
        self.workers.stop();
        for check in self.checks {
            check.abort();
        }
    }

    /// The binding stage's counters, one `name count` a line.
    pub fn counters(&self) -> String {
        let b = &self.workers.tallies().counters;
        let mut text = String::new();
        for (name, count) in [
            ("bound", b.bound),
            ("bound_with_cookie", b.with_cookie),
            ("bound_by_fallback", b.without_cookie),
            ("cookies_issued", b.cookies_issued),
            ("heads_resent", b.heads_resent),
            ("replays_resent", b.replays_resent),
            ("binding_retried", b.retried),
            ("binding_failed", b.failed),
            ("head_too_large", b.head_too_large),
            ("no_route", b.no_route),
            ("backend_down", b.backend_down),
            ("shed_client_budget", b.shed_client_budget),
            ("shed_prefix_budget", b.shed_prefix_budget),
            ("shed_table_full", b.shed_table_full),
            ("head_unacknowledged", b.head_unacknowledged),
            ("challenge_acks", b.challenge_acks),
            ("out_of_window", b.out_of_window),
            ("time_wait_resets", b.time_wait_resets),
            ("syn_cookie_rotations", self.cookie_rotations),
        ] {
            let _ = writeln!(text, "{name} {count}");
        }
        for (reason, count) in counters::REJECTION_REASONS.iter().zip(b.cookies_rejected) {
            let _ = writeln!(text, "cookie_rejected_{reason} {count}");
        }
        text
    }

    /// Tells the data plane the agent is alive, and tallies the connections XDP bound.
    pub fn heartbeat(&mut self) -> Result<()> {
        self.dataplane.heartbeat()?;
        self.note_xdp_bindings()?;
        self.refresh_loads()
    }

    /// Tallies the cookie connections XDP bound since the last look (the first learns what
    /// the maps hold from before).
    fn note_xdp_bindings(&mut self) -> Result<()> {
        let bound = self.dataplane.backend_counters(&self.backend_ids())?;
        let now = u64::from(crate::dataplane::monotonic_seconds());
        self.xdp_bindings
            .note(bound.iter().map(|(&id, c)| (id, c.bound)), now);
        Ok(())
    }

    /// The workers' tallies with the cookie connections XDP bound up to now.
    fn cookie_tallies(&mut self) -> Result<counters::Tallies> {
        self.note_xdp_bindings()?;
        Ok(self.xdp_bindings.with(self.workers.tallies()))
    }

    /// Counts the active connections of each backend of the services with bounded-load
    /// placement, from a walk of the flow table (only when one has it: the walk costs two
    /// system calls an entry).
    fn refresh_loads(&mut self) -> Result<()> {
        if !self
            .services
            .iter()
            .any(|s| s.config.balance_factor.is_some())
        {
            return Ok(());
        }
        let active = self
            .dataplane
            .active_flows_by_backend(ACTIVE_FLOW_WINDOW_S)?
            .by_backend;
        for service in self
            .services
            .iter_mut()
            .filter(|s| s.config.balance_factor.is_some())
        {
            service.loads = service
                .backends
                .iter()
                .map(|b| (b.id, active.get(&b.id).copied().unwrap_or(0)))
                .collect();
            // XDP places L4 flows and sessions itself, from the loads in its maps.
            if !service.config.reads_requests() {
                self.dataplane.set_loads(&service.key, &service.loads)?;
            }
        }
        self.share_view();
        Ok(())
    }

    /// Gives the SYN cookies a new secret (the last one stays valid for a period more), so a
    /// key guessed from the cookies it made is soon worth nothing.
    pub fn rotate_cookie_secret(&mut self) -> Result<()> {
        self.dataplane.rotate_cookie_secret(random_secret()?)?;
        self.cookie_rotations += 1;
        Ok(())
    }

    /// Seconds between two SYN cookie secrets.
    pub fn cookie_rotation(&self) -> Duration {
        Duration::from_secs(u64::from(self.config.syn_cookie_rotation))
    }
}

/// A fresh secret for the SYN cookies.
fn random_secret() -> Result<CookieSecret> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("reading /dev/urandom for the SYN cookie key")?;
    Ok(bytemuck::cast(bytes))
}

impl Agent {
    /// Counters of the cookie services' binding stage, with the cookies XDP issued and the
    /// connections it bound.
    pub fn binding_counters(&self) -> BindingCounters {
        let mut counters = self.workers.tallies().counters;
        if let Ok((issued, bound)) = self.xdp_cookie_totals() {
            counters.cookies_issued += issued;
            counters.bound += bound;
        }
        counters
    }

    /// The cookies XDP put into response heads and the connections it bound, over every
    /// backend (the workers count their own).
    fn xdp_cookie_totals(&self) -> Result<(u64, u64)> {
        let counters = self.dataplane.backend_counters(&self.backend_ids())?;
        Ok(counters.values().fold((0, 0), |(issued, bound), c| {
            (issued + c.cookies_issued, bound + c.bound)
        }))
    }

    /// The ids of every service's backends.
    fn backend_ids(&self) -> Vec<u32> {
        self.services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect()
    }

    /// The first binding worker that stopped, if one did.
    pub fn stopped_worker(&self) -> Option<usize> {
        self.workers.stopped()
    }

    /// Takes the ring of the clients of XDP's new flows, for [`Agent::tally_new_flow`].
    pub fn take_new_flow_sources(&mut self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        self.dataplane.take_new_flow_sources()
    }

    /// Counts the new cookie connections the workers told of in the tally of top sources,
    /// and ages it to now.
    pub fn refresh_top_sources(&mut self) {
        while let Ok((client, service, second)) = self.workers.new_sources.try_recv() {
            self.sources.add(client, service, second);
        }
        self.sources
            .refresh(u64::from(crate::dataplane::monotonic_seconds()));
    }

    /// Counts a `NEW_FLOW_SOURCES` record in the tally of top sources.
    pub fn tally_new_flow(&mut self, record: &[u8]) {
        let Some(record) = record.get(..size_of::<NewFlowSource>()) else {
            return;
        };
        let record: NewFlowSource = bytemuck::pod_read_unaligned(record);
        let Some(service) = self
            .services
            .iter()
            .find(|s| s.backends.iter().any(|b| b.id == record.backend_id))
        else {
            return;
        };
        let now = u64::from(crate::dataplane::monotonic_seconds());
        self.sources.add(record.client.into(), service.id, now);
    }

    /// The sources that opened the most new flows over the last minute, most first, with
    /// the service of each one's latest.
    pub fn top_sources(&self, limit: usize) -> Vec<crate::metrics::SourceSnapshot> {
        let now = u64::from(crate::dataplane::monotonic_seconds());
        self.sources
            .top(limit, now)
            .into_iter()
            .map(|top| crate::metrics::SourceSnapshot {
                source: top.source,
                service: self
                    .services
                    .iter()
                    .find(|s| s.id == top.service)
                    .map_or_else(String::new, |s| s.config.name.clone()),
                new_flows: top.new_flows,
                overcount: top.overcount,
                rate: top.recent_flows as f64 / sources::SourceTally::RECENT_SECONDS as f64,
            })
            .collect()
    }
}

/// What each of `workers` binding workers may hold: `binding_capacity` is shared evenly,
/// each client's and prefix's budget is its worker's alone (a prefix has one worker).
pub(super) fn binding_limits(config: &Config, workers: u32) -> BindingLimits {
    BindingLimits {
        capacity: (config.binding_capacity / workers.max(1)).max(1) as usize,
        per_client: config.bindings_per_client as usize,
        per_prefix: config.bindings_per_prefix as usize,
        head_ack_timeout: Duration::from_secs(u64::from(config.head_ack_timeout)),
        request_timeout: Duration::from_secs(u64::from(config.request_timeout)),
    }
}

fn backend_value(nat: &Config, config: &BackendConfig, service_port: u16, state: u8) -> Backend {
    let (first_source, source_count) = nat.nat_sources_of(config.address);
    Backend {
        addr: Addr::from(config.address),
        port: config.port.unwrap_or(service_port).to_be(),
        state,
        source_count,
        first_source,
        hold_until_s: 0,
        load: 0,
        group: config.group.map_or(0, |g| g as u32 + 1),
    }
}

/// Writes each backend of `service` for XDP; returns them as Maglev members, with their
/// weights in the service and whether they take new sessions.
fn write_backends<'a>(
    dataplane: &mut Dataplane,
    config: &Config,
    service: &'a ServiceRuntime,
) -> Result<Vec<maglev::Member<'a>>> {
    let drain_timeout = service.drain_timeout();
    let weights = service.weights_in_service();
    let mut members = Vec::new();
    for (backend, weight) in service.backends.iter().zip(weights) {
        let state = backend.state(drain_timeout);
        let mut value = backend_value(config, &backend.config, service.config.port, state);
        value.hold_until_s = service.hold_until(backend);
        // XDP's count of its flows goes on until the next walk of the flow table.
        value.load = dataplane.backend(backend.id).map_or(0, |b| b.load);
        dataplane
            .write_backend(backend.id, value)
            .with_context(|| {
                format!(
                    "writing backend {} of service {}",
                    backend.config.name, service.config.name
                )
            })?;
        members.push(maglev::Member {
            name: &backend.config.name,
            weight,
            serving: state == backend_state::UP,
        });
    }
    Ok(members)
}

/// A Maglev table of `size` slots over `members`, as backend `ids`.
fn lookup_table(members: &[maglev::Member<'_>], ids: &[u32], size: u32) -> Vec<u32> {
    maglev::build(members, size)
        .into_iter()
        .map(|member| ids[member as usize])
        .collect()
}

/// The table of each group of `service`, over its backends at their own weights.
fn group_tables(
    service: &ServiceRuntime,
    members: &[maglev::Member<'_>],
    size: u32,
) -> Vec<Vec<u32>> {
    (0..service.groups.len())
        .map(|g| {
            let (members, ids): (Vec<_>, Vec<_>) = service
                .backends
                .iter()
                .zip(members)
                .filter(|(b, _)| b.config.group == Some(g))
                .map(|(b, m)| {
                    let member = maglev::Member {
                        weight: b.config.weight,
                        ..m.clone()
                    };
                    (member, b.id)
                })
                .unzip();
            lookup_table(&members, &ids, size)
        })
        .collect()
}

/// The settings of `service` XDP reads, before its table and backends are counted.
fn service_value(service: &ServiceRuntime) -> Service {
    let config = &service.config;
    let source_ip = config.affinity == AffinityMode::SourceIp;
    Service {
        id: service.id,
        affinity: config.affinity.code(),
        affinity_timeout: config.affinity_timeout,
        source_mask: config.source_mask(),
        without_agent: config.without_agent_code(),
        nat: config.nat_code(),
        proxy_protocol: u32::from(config.proxy_protocol),
        return_home: u32::from(config.return_home && source_ip),
        balance_factor: config.balance_factor.unwrap_or(0),
        group_stickiness: if source_ip && !config.groups.is_empty() {
            config.group_stickiness()
        } else {
            0
        },
        generation: service.generation,
        cookie_fallback: config.cookie_fallback_code(),
        ..Service::default()
    }
}

/// The lowest id below `limit` that is not in `used`, which then holds it.
fn take_free_id(used: &mut BTreeSet<u32>, limit: u32) -> Result<u32> {
    let id = (0..limit)
        .find(|id| !used.contains(id))
        .context("no free id left")?;
    used.insert(id);
    Ok(id)
}
