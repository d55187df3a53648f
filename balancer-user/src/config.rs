//! The agent's configuration file (TOML): what is parsed, its defaults and its validation.
//!
//! Every error names the field it is about, so an operator can fix the file without guessing.

use std::{
    collections::HashSet,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use balancer_common::{
    affinity, nat_mode, without_agent, Addr, ServiceKey, MAX_AGENT_WORKERS, MAX_BACKENDS,
    MAX_GROUPS, MAX_NAT_SOURCES, MAX_SERVICES, PROTO_TCP, PROTO_UDP,
};
use serde::Deserialize;

use crate::cookie::{backend_token, CookieKey, CookieKeys};

pub const DEFAULT_INSTANCE: &str = "balancer";
const MIN_FLOW_CAPACITY: u32 = 1024;
const MAX_FLOW_CAPACITY: u32 = 1 << 26;
pub const MAX_WEIGHT: u32 = 10_000;
const MIN_TABLE_SIZE: u32 = 1021;
const MAX_TABLE_SIZE: u32 = 262_139;
const MAX_AFFINITY_TIMEOUT: u32 = 7 * 24 * 3600;
/// Longest life of a balancer cookie, as the cloud balancers allow.
const MAX_COOKIE_DURATION: u32 = 7 * 24 * 3600;
/// An hour, as a release's canary phase might last.
const DEFAULT_GROUP_STICKINESS: u32 = 3600;
const DEFAULT_LB_COOKIE: &str = "LBSESSION";
const DEFAULT_COMPANION_COOKIE: &str = "LBAPP";
/// Appended to the balancer cookie's name to name its cross-origin variant.
const CORS_SUFFIX: &str = "CORS";
/// Shortest cookie signing secret: 128 bits.
const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_instance")]
    pub instance: String,
    pub client_interface: String,
    /// The interface facing the backends; the client interface when absent.
    pub backend_interface: Option<String>,
    #[serde(default)]
    pub xdp_mode: XdpModeSetting,
    #[serde(default = "default_flow_capacity")]
    pub flow_capacity: u32,
    /// Capacity of the `source-ip` affinity table (clients remembered across services).
    #[serde(default = "default_affinity_capacity")]
    pub affinity_capacity: u32,
    /// Slots in each service's Maglev lookup table: a prime, much larger than the number of
    /// backends (disruption on backend changes shrinks as it grows).
    #[serde(default = "default_table_size")]
    pub table_size: u32,
    /// Seconds between stats lines; 0 turns them off.
    #[serde(default = "default_stats_interval")]
    pub stats_interval: u64,
    /// Where Prometheus scrapes `/metrics` (e.g. "127.0.0.1:9469"); off when absent. Read at
    /// start: a reload keeps the address the agent started with.
    pub metrics: Option<std::net::SocketAddr>,
    /// Cookie services: connections the agent holds at once (heads being read, backends
    /// being opened, edited response heads the client has yet to acknowledge), shared evenly
    /// by its workers.
    #[serde(default = "default_binding_capacity")]
    pub binding_capacity: u32,
    /// Of those, at most this many per client address: a client past it gives up its own
    /// oldest connection for a new one.
    #[serde(default = "default_bindings_per_client")]
    pub bindings_per_client: u32,
    /// And at most this many per /24 of client addresses.
    #[serde(default = "default_bindings_per_prefix")]
    pub bindings_per_prefix: u32,
    /// Seconds a client may take to acknowledge a response head the balancer edited before
    /// its connection is reset and its place freed.
    #[serde(default = "default_head_ack_timeout")]
    pub head_ack_timeout: u32,
    /// Cookie services: seconds a client may take from its handshake to a complete request
    /// head; a connection that sent nothing by then is reset by XDP, one whose head is still
    /// incomplete by the agent.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: u32,
    /// Cookie services: threads the agent binds connections on, 1 to 8; each owns the
    /// connections of the client prefixes (/24, IPv6 /48) XDP hashes to it, with their
    /// budgets and an even share of `binding_capacity`. Absent: one per CPU the agent may
    /// use. Read at start: a reload keeps the workers the agent started with.
    pub agent_workers: Option<u32>,
    /// Cookie services: bytes of the ring XDP hands segments to each agent worker through (a
    /// power of two, 64 KiB to 256 MiB; each segment takes about 1.5 KB).
    #[serde(default = "default_punt_ring_size")]
    pub punt_ring_size: u32,
    /// Seconds between two secrets of the SYN cookies cookie services answer with (the
    /// previous secret stays valid one period more).
    #[serde(default = "default_syn_cookie_rotation")]
    pub syn_cookie_rotation: u32,
    /// Keys that sign and verify `lb-cookie` cookies: the first signs, all verify.
    #[serde(default)]
    pub cookie_keys: Vec<CookieKeyConfig>,
    /// A file of more keys, one `<id> <secret>` a line, read after `cookie_keys`.
    pub cookie_key_file: Option<PathBuf>,
    /// Full NAT: the ports the balancer gives connections from its own addresses,
    /// `"first-last"`; the agent reserves them from the host's own sockets
    /// (`net.ipv4.ip_local_reserved_ports`, which IPv6 shares).
    #[serde(default = "default_nat_ports")]
    pub nat_ports: String,
    /// Full NAT: the balancer's own addresses that backends see connections come from, for
    /// each network of backends.
    #[serde(default, rename = "source_network")]
    pub source_networks: Vec<SourceNetworkConfig>,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// `cookie_keys` and the key file's keys, once loaded and checked.
    #[serde(skip)]
    pub signing_keys: CookieKeys,
}

/// Full NAT: where connections to a network's backends come from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceNetworkConfig {
    /// The backends' network, as `address/prefix` (`198.19.0.0/24`, `2001:db8:b::/64`).
    pub network: String,
    /// The balancer's addresses there (assigned to its backend interface): each gives
    /// `nat_ports` connections to each backend port at once.
    pub addresses: Vec<IpAddr>,
}

impl SourceNetworkConfig {
    /// The network as address and prefix length, if it parses.
    pub fn prefix(&self) -> Option<(IpAddr, u8)> {
        let (addr, bits) = self.network.split_once('/')?;
        let addr: IpAddr = addr.parse().ok()?;
        let bits: u8 = bits.parse().ok()?;
        let longest = if addr.is_ipv4() { 32 } else { 128 };
        (bits <= longest).then_some((addr, bits))
    }

    /// Whether `ip` lies in the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let Some((net, bits)) = self.prefix() else {
            return false;
        };
        if net.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        let mask = Addr::prefix_mask(net.is_ipv4(), u32::from(bits));
        Addr::from(net).masked(&mask) == Addr::from(ip).masked(&mask)
    }
}

/// Full NAT's most source addresses per network.
pub const MAX_SOURCES_PER_NETWORK: usize = 255;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CookieKeyConfig {
    /// 0-255; travels in the cookie so the right key verifies it.
    pub id: u8,
    /// At least 16 bytes; every balancer host that serves the VIP needs the same.
    pub secret: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Native (driver) mode, falling back to generic mode with a warning.
    #[default]
    Auto,
    Native,
    Generic,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    /// IPv4 or IPv6; the backends are of the same family.
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// What keeps a client on its backend.
    #[serde(default)]
    pub affinity: AffinityMode,
    /// `source-ip`: seconds without a new flow after which a client may move.
    #[serde(default = "default_affinity_timeout")]
    pub affinity_timeout: u32,
    /// `source-ip`: prefix length of client addresses that share a backend (IPv4: 32, the
    /// default, is one address, 24 a whole NAT pool in a /24; IPv6: 64, the default, is one
    /// host's addresses, as privacy extensions change the rest).
    pub source_prefix: Option<u8>,
    /// Seconds a draining backend keeps its existing sessions before they move.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: u32,
    /// Checks run from the balancer to each backend; without them backends count as healthy.
    pub health_check: Option<HealthCheckConfig>,
    /// `app-cookie`: the name of the application's cookie whose value picks the backend;
    /// `lb-cookie`: the name of the balancer's cookie (default `LBSESSION`).
    pub cookie: Option<String>,
    /// `url-param`: the URL parameter that carries the session id (e.g. `sessionID`, or
    /// `jsessionid` for `/app;jsessionid=...`).
    pub param: Option<String>,
    /// `app-cookie`, `lb-cookie`, `url-param`: how requests without a usable cookie or
    /// session id are placed.
    #[serde(default)]
    pub cookie_fallback: CookieFallback,
    /// `app-cookie`, `lb-cookie`: what XDP does with new connections while no agent runs
    /// (crashed, stopped or restarting): `fallback` places them as plain L4 flows by
    /// `cookie_fallback` (served, but no cookie is read or issued), `reset` refuses them.
    pub without_agent: Option<WithoutAgent>,
    /// `lb-cookie`, companion `app-cookie`: seconds the balancer's cookie lives, 1 to 604800
    /// (7 days).
    #[serde(default = "default_cookie_duration")]
    pub cookie_duration: u32,
    /// `app-cookie`: how the application's cookie keeps a session on its backend.
    #[serde(default)]
    pub app_cookie: AppCookieMode,
    /// `app-cookie` in `companion` mode: the name of the balancer's companion cookie (default
    /// `LBAPP`).
    pub companion_cookie: Option<String>,
    /// Also issue a cross-origin variant of the balancer's cookie (`SameSite=None; Secure`),
    /// for pages that call the service from another site.
    #[serde(default)]
    pub cors: bool,
    /// With `cors`: the variant's name (default: the balancer cookie's name + `CORS`).
    pub cors_cookie: Option<String>,
    /// How connections reach the backends: `gateway` (the backends see the client's address
    /// and route their replies through the balancer) or `full` (they see one of the
    /// balancer's `source_network` addresses, and need no route back through it).
    #[serde(default)]
    pub nat: NatMode,
    /// Send the backend the client's address and port in a PROXY protocol v2 header before
    /// the connection's first bytes (for full NAT, where the backend sees the balancer's):
    /// the agent writes it before a cookie service's request, XDP puts it into an L4 TCP
    /// flow's first data segment (L4 services need `nat = "full"`).
    #[serde(default)]
    pub proxy_protocol: bool,
    /// The service's backends; with `[[service.group]]`s, theirs, each marked with its
    /// group's index (the configuration lists them in their groups).
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// Weighted groups of backends (blue/green, canary), instead of `[[service.backend]]`s:
    /// a new session picks a group by weight, then a backend in it.
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupConfig>,
    /// `lb-cookie` and `source-ip` with groups: seconds a session stays in its group, even
    /// when the weights change or its backend fails (it then moves within the group), 1 to
    /// 604800 (7 days). A source-ip session's group lives in its affinity entry, which lasts
    /// for this long even when the client is idle past `affinity_timeout`.
    pub group_stickiness: Option<u32>,
    /// HTTP services with groups: several applications on one VIP and port, by the request's
    /// `Host` and path; the first route that matches names the group.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// With routes: the group of requests no route matches; without it they are answered
    /// 404 by the agent.
    pub default_group: Option<String>,
    /// Services with sessions: what a session whose backend fails its health checks gets:
    /// `failover` (moved to a healthy backend), `keep` (its requests are answered 503 with
    /// `Retry-After`, or a `source-ip` session's new TCP flows reset by XDP, for up to
    /// `keep_timeout` while it waits for its backend, then moved) or `reject` (the same until
    /// its backend returns).
    #[serde(default)]
    pub on_backend_down: OnBackendDown,
    /// `keep`: seconds a session waits for its failed backend.
    #[serde(default = "default_keep_timeout")]
    pub keep_timeout: u32,
    /// Bounded-load placement, in percent of the average (e.g. 125): a new session (a new
    /// flow of a `flow` service) whose backend has more active connections than that share
    /// of the average over the backends it could go to takes the next backend of the lookup
    /// table that has fewer; sessions already placed stay. The agent applies it to HTTP
    /// services, XDP to L4 ones. Off when absent.
    pub balance_factor: Option<u32>,
    /// `source-ip` and cookie services, `failover`: whether a session moved off its failed
    /// backend goes back when that backend recovers (its session or cookie keeps naming it,
    /// and while it is down it is served by the one backend its client address or cookie
    /// value hashes to), or stays where it moved (the default).
    #[serde(default)]
    pub return_home: bool,
}

/// [`ServiceConfig::on_backend_down`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBackendDown {
    #[default]
    Failover,
    Keep,
    Reject,
}

fn default_keep_timeout() -> u32 {
    60
}

/// No route of a service matches a request, and it has no default group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRoute;

/// Whether `path` is under `prefix`: equal, or continuing past it at a `/` (so `/shop` holds
/// `/shop/cart` but not `/shopping`).
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// A route of a service: [`ServiceConfig::routes`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The request's `Host` (its port aside, any case); any host when absent.
    pub host: Option<String>,
    /// A prefix of the request's path, e.g. `/shop`; every path when absent. The balancer's
    /// cookie for the route's sessions is issued with it as its `Path`.
    #[serde(default = "default_route_path")]
    pub path: String,
    /// The group whose backends serve the route.
    pub group: String,
    /// The route's own session settings, each in place of the service's, as for a service.
    /// Setting `affinity` (`lb-cookie`, `app-cookie` or `url-param`) starts the route from
    /// that mode's defaults instead of the service's cookie and parameter settings.
    pub affinity: Option<AffinityMode>,
    pub cookie: Option<String>,
    pub param: Option<String>,
    pub app_cookie: Option<AppCookieMode>,
    pub companion_cookie: Option<String>,
    pub cookie_duration: Option<u32>,
    pub cookie_fallback: Option<CookieFallback>,
    /// The service's settings with the route's own in place, when it has any; made once
    /// read.
    #[serde(skip)]
    sessions: Option<Box<ServiceConfig>>,
}

impl RouteConfig {
    /// Whether the route sets session settings of its own.
    pub fn has_own_sessions(&self) -> bool {
        self.affinity.is_some()
            || self.cookie.is_some()
            || self.param.is_some()
            || self.app_cookie.is_some()
            || self.companion_cookie.is_some()
            || self.cookie_duration.is_some()
            || self.cookie_fallback.is_some()
    }

    /// `service`'s settings with this route's own in place.
    fn sessions_within(&self, service: &ServiceConfig) -> ServiceConfig {
        let mut own = ServiceConfig {
            routes: Vec::new(),
            ..service.clone()
        };
        if let Some(affinity) = self.affinity {
            own.affinity = affinity;
            own.cookie = None;
            own.param = None;
            own.app_cookie = AppCookieMode::default();
            own.companion_cookie = None;
            own.cors = false;
            own.cors_cookie = None;
        }
        own.cookie = self.cookie.clone().or(own.cookie);
        own.param = self.param.clone().or(own.param);
        own.app_cookie = self.app_cookie.unwrap_or(own.app_cookie);
        own.companion_cookie = self.companion_cookie.clone().or(own.companion_cookie);
        own.cookie_duration = self.cookie_duration.unwrap_or(own.cookie_duration);
        own.cookie_fallback = self.cookie_fallback.unwrap_or(own.cookie_fallback);
        own
    }
}

/// The route a request takes: its index in [`ServiceConfig::routes`] (none for the
/// default group), the group that serves it and its path prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a> {
    pub index: Option<usize>,
    pub group: usize,
    pub path: &'a str,
}

fn default_route_path() -> String {
    "/".to_owned()
}

/// A group of a service's backends: [`ServiceConfig::groups`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    /// Share of new sessions relative to the other groups; 0 takes none (the group drains).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Moved into [`ServiceConfig::backends`] once read.
    #[serde(default, rename = "backend")]
    backends: Vec<BackendConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatMode {
    #[default]
    Gateway,
    Full,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(default)]
    pub kind: CheckKind,
    /// Seconds between two checks of a backend.
    #[serde(default = "default_check_interval")]
    pub interval: f64,
    /// Seconds a check may take before it counts as failed.
    #[serde(default = "default_check_timeout")]
    pub timeout: f64,
    /// Consecutive successes that bring a down backend up.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// `http`: the path requested.
    #[serde(default = "default_check_path")]
    pub path: String,
    /// `http`: the Host header; the backend's address when absent.
    pub host: Option<String>,
    /// `http`: the statuses that count as healthy, e.g. "200-399" or "200".
    #[serde(default = "default_expected_status")]
    pub expected_status: String,
    /// The port checked; the backend's port when absent.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connection is accepted.
    #[default]
    Tcp,
    /// An HTTP GET answers with an expected status.
    Http,
}

impl HealthCheckConfig {
    /// The inclusive range of healthy HTTP statuses.
    pub fn status_range(&self) -> Option<(u16, u16)> {
        let parse = |s: &str| {
            s.trim()
                .parse::<u16>()
                .ok()
                .filter(|c| (100..=599).contains(c))
        };
        match self.expected_status.split_once('-') {
            Some((low, high)) => Some((parse(low)?, parse(high)?)).filter(|(l, h)| l <= h),
            None => parse(&self.expected_status).map(|c| (c, c)),
        }
    }
}

/// Whether an operator wants a backend to take new sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    #[default]
    Active,
    /// No new sessions; existing ones stay until the service's drain timeout.
    Draining,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AffinityMode {
    /// Each flow is placed on its own (Maglev on the 5-tuple).
    #[default]
    Flow,
    /// All flows of a client address (masked by `source_prefix`) go to one backend.
    SourceIp,
    /// HTTP: requests carrying the application's cookie (`cookie`) go to the backend its value
    /// hashes to; the connection is then spliced in XDP.
    AppCookie,
    /// HTTP: requests carrying the balancer's signed cookie go to the backend it names; the
    /// connection is then spliced in XDP.
    LbCookie,
    /// HTTP: requests carrying a session id in their URL (`param`, in the query string or a
    /// path parameter) go to the backend its value hashes to, as `app-cookie` hashes; the
    /// connection is then spliced in XDP.
    UrlParam,
}

/// How `app-cookie` follows the application's cookie.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AppCookieMode {
    /// The cookie's value is hashed into the lookup table (as Envoy does): every balancer
    /// host agrees, and a backend failure moves only its own sessions.
    #[default]
    Hash,
    /// When a response sets the application's cookie, the balancer adds its own signed
    /// cookie naming the backend (as AWS application-based stickiness does); requests
    /// carrying it go to that backend.
    Companion,
    /// The balancer prefixes the application cookie's value with the backend's token when a
    /// response sets it, and strips the prefix from requests, so the application sees its
    /// own value (as Alibaba's rewrite cookie and HAProxy's `cookie prefix` do). XDP cannot
    /// strip later requests of a connection, so each response closes its connection: every
    /// request is read by the agent.
    Rewrite,
}

/// How a cookie service places a request that carries no cookie.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CookieFallback {
    /// By the client address (masked by `source_prefix`), as `source-ip` does: every new
    /// session behind one NAT address lands on one backend.
    SourceIp,
    /// By the connection's 5-tuple, as `flow` does: new sessions spread, and the cookie
    /// keeps each on its backend from then on.
    #[default]
    Flow,
}

/// What a cookie service does with new connections while no agent runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WithoutAgent {
    /// Placed by XDP as plain L4 flows, by the service's `cookie_fallback`.
    #[default]
    Fallback,
    /// Refused with a reset; clients retry once an agent runs.
    Reset,
}

impl AffinityMode {
    pub fn code(self) -> u32 {
        match self {
            AffinityMode::Flow => affinity::FLOW,
            AffinityMode::SourceIp => affinity::SOURCE_IP,
            AffinityMode::AppCookie | AffinityMode::LbCookie | AffinityMode::UrlParam => {
                affinity::COOKIE
            }
        }
    }
}

impl fmt::Display for AffinityMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AffinityMode::Flow => "flow",
            AffinityMode::SourceIp => "source-ip",
            AffinityMode::AppCookie => "app-cookie",
            AffinityMode::LbCookie => "lb-cookie",
            AffinityMode::UrlParam => "url-param",
        })
    }
}

impl ServiceConfig {
    /// The service's key in the `SERVICES` map.
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            vip: Addr::from(self.vip),
            port: self.port.to_be(),
            proto: self.protocol.number(),
            _pad: 0,
        }
    }

    /// Where backend `b` of [`ServiceConfig::backends`] is in the configuration: in its
    /// group when it has one.
    pub fn backend_field(&self, field: &str, b: usize) -> String {
        match self.backends[b].group {
            None => format!("{field}.backend[{b}]"),
            Some(g) => {
                let first = self.backends.iter().position(|x| x.group == Some(g));
                format!("{field}.group[{g}].backend[{}]", b - first.unwrap_or(b))
            }
        }
    }

    /// Whether the agent reads each connection's request to place it (delayed binding).
    pub fn reads_requests(&self) -> bool {
        self.affinity.code() == affinity::COOKIE
    }

    /// `url-param`: the URL parameter holding the session id.
    pub fn url_param(&self) -> Option<&str> {
        match self.affinity {
            AffinityMode::UrlParam => self.param.as_deref(),
            _ => None,
        }
    }

    /// The route that a request for `host` (lowercase, without its port) and `path` takes:
    /// the first that matches, else the default group; `Err` when the service routes and
    /// none does. `Ok(None)` without routes.
    pub fn route(&self, host: Option<&str>, path: &str) -> Result<Option<Route<'_>>, NoRoute> {
        if self.routes.is_empty() {
            return Ok(None);
        }
        let group = |name: &str| self.groups.iter().position(|g| g.name == name);
        let matched = self.routes.iter().position(|route| {
            route
                .host
                .as_deref()
                .is_none_or(|h| host.is_some_and(|host| h.eq_ignore_ascii_case(host)))
                && path_has_prefix(path, &route.path)
        });
        match matched {
            Some(index) => {
                let route = &self.routes[index];
                Ok(group(&route.group).map(|group| Route {
                    index: Some(index),
                    group,
                    path: &route.path,
                }))
            }
            None => match self.default_group.as_deref().and_then(group) {
                Some(group) => Ok(Some(Route {
                    index: None,
                    group,
                    path: "/",
                })),
                None => Err(NoRoute),
            },
        }
    }

    /// The session settings (affinity, cookies, fallback) that apply on `route`: its own,
    /// or the service's.
    pub fn sessions(&self, route: Option<Route<'_>>) -> &ServiceConfig {
        route
            .and_then(|r| r.index)
            .and_then(|index| self.routes[index].sessions.as_deref())
            .unwrap_or(self)
    }

    /// Seconds a session stays in its group.
    pub fn group_stickiness(&self) -> u32 {
        self.group_stickiness.unwrap_or(DEFAULT_GROUP_STICKINESS)
    }

    /// The cookie whose value places a connection, for the cookie modes: the balancer's
    /// signed cookie when it issues one, else the application's.
    pub fn cookie_name(&self) -> Option<&str> {
        match self.affinity {
            AffinityMode::AppCookie => self.balancer_cookie().or(self.cookie.as_deref()),
            AffinityMode::LbCookie => self.balancer_cookie(),
            AffinityMode::Flow | AffinityMode::SourceIp | AffinityMode::UrlParam => None,
        }
    }

    /// The name of the signed cookie the balancer issues, if it issues one.
    pub fn balancer_cookie(&self) -> Option<&str> {
        match (self.affinity, self.app_cookie) {
            (AffinityMode::LbCookie, _) => {
                Some(self.cookie.as_deref().unwrap_or(DEFAULT_LB_COOKIE))
            }
            (AffinityMode::AppCookie, AppCookieMode::Companion) => Some(
                self.companion_cookie
                    .as_deref()
                    .unwrap_or(DEFAULT_COMPANION_COOKIE),
            ),
            _ => None,
        }
    }

    /// The name of the balancer cookie's cross-origin variant, when it issues one.
    pub fn cors_cookie_name(&self) -> Option<String> {
        let own = self.balancer_cookie().filter(|_| self.cors)?;
        Some(
            self.cors_cookie
                .clone()
                .unwrap_or_else(|| format!("{own}{CORS_SUFFIX}")),
        )
    }

    /// The application's cookie in rewrite mode, whose value carries the backend's token.
    pub fn rewritten_cookie(&self) -> Option<&str> {
        match (self.affinity, self.app_cookie) {
            (AffinityMode::AppCookie, AppCookieMode::Rewrite) => self.cookie.as_deref(),
            _ => None,
        }
    }

    /// The application's cookie in companion mode, whose setting makes the balancer issue
    /// its own.
    pub fn companion_of(&self) -> Option<&str> {
        match (self.affinity, self.app_cookie) {
            (AffinityMode::AppCookie, AppCookieMode::Companion) => self.cookie.as_deref(),
            _ => None,
        }
    }

    /// What places a request without a usable cookie, as a [`without_agent`] placement code.
    pub fn cookie_fallback_code(&self) -> u32 {
        match self.cookie_fallback {
            CookieFallback::SourceIp => without_agent::PLACE_BY_SOURCE,
            CookieFallback::Flow => without_agent::PLACE_BY_FLOW,
        }
    }

    /// What XDP does with this service's new connections while no agent runs, as a
    /// [`without_agent`] code.
    pub fn without_agent_code(&self) -> u32 {
        match self.without_agent.unwrap_or_default() {
            WithoutAgent::Reset => without_agent::RESET,
            WithoutAgent::Fallback => self.cookie_fallback_code(),
        }
    }

    /// How the data plane reaches the backends, as a [`nat_mode`] code.
    pub fn nat_code(&self) -> u32 {
        match self.nat {
            NatMode::Gateway => nat_mode::GATEWAY,
            NatMode::Full => nat_mode::FULL,
        }
    }

    /// The prefix length of client addresses that share a `source-ip` session.
    pub fn source_prefix(&self) -> u8 {
        self.source_prefix.unwrap_or(if self.vip.is_ipv4() {
            DEFAULT_SOURCE_PREFIX_V4
        } else {
            DEFAULT_SOURCE_PREFIX_V6
        })
    }

    /// The mask applied to client addresses for `source-ip` affinity.
    pub fn source_mask(&self) -> Addr {
        Addr::prefix_mask(self.vip.is_ipv4(), u32::from(self.source_prefix()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub name: String,
    /// Of the service's family.
    pub address: IpAddr,
    /// The service's port when absent.
    pub port: Option<u16>,
    /// Share of new flows relative to the other backends; 0 takes no new flows.
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub state: AdminState,
    /// The index of its group in [`ServiceConfig::groups`], if the service has groups.
    #[serde(skip)]
    pub group: Option<usize>,
}

/// A name of an instance, service, group or backend: 1-64 letters, digits, '-' or '_'.
fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn default_weight() -> u32 {
    1
}

fn default_instance() -> String {
    DEFAULT_INSTANCE.to_owned()
}

fn default_flow_capacity() -> u32 {
    balancer_common::DEFAULT_FLOW_CAPACITY
}

fn default_binding_capacity() -> u32 {
    10_000
}

fn default_bindings_per_client() -> u32 {
    256
}

fn default_bindings_per_prefix() -> u32 {
    2_048
}

fn default_head_ack_timeout() -> u32 {
    5
}

fn default_request_timeout() -> u32 {
    10
}

fn default_punt_ring_size() -> u32 {
    balancer_common::PUNT_RING_SIZE
}

fn default_syn_cookie_rotation() -> u32 {
    60
}

/// Below Linux's ephemeral range (32768-60999), so reserving it takes nothing from the host.
fn default_nat_ports() -> String {
    "1024-32767".to_owned()
}

fn default_stats_interval() -> u64 {
    1
}

fn default_affinity_capacity() -> u32 {
    balancer_common::DEFAULT_AFFINITY_CAPACITY
}

fn default_table_size() -> u32 {
    balancer_common::DEFAULT_TABLE_SIZE
}

fn default_affinity_timeout() -> u32 {
    300
}

fn default_cookie_duration() -> u32 {
    24 * 3600
}

const DEFAULT_SOURCE_PREFIX_V4: u8 = 32;
const DEFAULT_SOURCE_PREFIX_V6: u8 = 64;

fn default_drain_timeout() -> u32 {
    300
}

fn default_check_interval() -> f64 {
    2.0
}

fn default_check_timeout() -> f64 {
    1.0
}

fn default_rise() -> u32 {
    2
}

fn default_fall() -> u32 {
    3
}

fn default_check_path() -> String {
    "/".to_owned()
}

fn default_expected_status() -> String {
    "200-399".to_owned()
}

/// The settings of the cookies the balancer issues: a signing key, a duration in range, names
/// that are cookie names and differ; none of them on services that issue no cookie.
/// A service's session settings (or a route's, with its own in place): its affinity, cookies
/// and URL parameter fit together.
fn validate_sessions(
    service: &ServiceConfig,
    field: &str,
    has_keys: bool,
) -> Result<(), ConfigError> {
    check_issued_cookies(service, field, has_keys)?;
    match (service.affinity, &service.cookie) {
        (AffinityMode::AppCookie, None) => {
            return Err(invalid(
                format!("{field}.cookie"),
                "affinity \"app-cookie\" needs the name of the application's cookie",
            ));
        }
        (AffinityMode::AppCookie | AffinityMode::LbCookie, Some(name)) if !is_cookie_name(name) => {
            return Err(invalid(
                format!("{field}.cookie"),
                format!("{name:?} is not a cookie name (RFC 6265 token)"),
            ));
        }
        (AffinityMode::AppCookie | AffinityMode::LbCookie | AffinityMode::UrlParam, _)
            if service.protocol != Protocol::Tcp =>
        {
            return Err(invalid(
                format!("{field}.protocol"),
                "cookie and URL affinity are for HTTP over TCP",
            ));
        }
        (AffinityMode::UrlParam, Some(_)) => {
            return Err(invalid(
                format!("{field}.cookie"),
                "is not used with affinity \"url-param\", which reads `param` from the URL",
            ));
        }
        (mode @ (AffinityMode::Flow | AffinityMode::SourceIp), _)
            if service.without_agent.is_some() =>
        {
            return Err(invalid(
                    format!("{field}.without_agent"),
                    format!(
                        "only cookie services depend on the agent; \"{mode}\" is forwarded by XDP alone"
                    ),
                ));
        }
        (mode @ (AffinityMode::Flow | AffinityMode::SourceIp), Some(_)) => {
            return Err(invalid(
                format!("{field}.cookie"),
                format!(
                    "is only used with affinity \"app-cookie\" or \"lb-cookie\", not \"{mode}\""
                ),
            ));
        }
        _ => {}
    }
    match (&service.param, service.affinity) {
        (None, AffinityMode::UrlParam) => {
            return Err(invalid(
                format!("{field}.param"),
                "affinity \"url-param\" needs the name of the URL parameter holding the session id",
            ));
        }
        (Some(param), AffinityMode::UrlParam)
            if param.is_empty()
                || !param
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
        {
            return Err(invalid(
                format!("{field}.param"),
                format!("{param:?} must be letters, digits, '-', '_' or '.'"),
            ));
        }
        (Some(_), mode) if mode != AffinityMode::UrlParam => {
            return Err(invalid(
                format!("{field}.param"),
                format!("is only used with affinity \"url-param\", not \"{mode}\""),
            ));
        }
        _ => {}
    }
    Ok(())
}

fn check_issued_cookies(
    service: &ServiceConfig,
    field: &str,
    has_keys: bool,
) -> Result<(), ConfigError> {
    let companion = service.app_cookie == AppCookieMode::Companion;
    if service.app_cookie != AppCookieMode::Hash && service.affinity != AffinityMode::AppCookie {
        return Err(invalid(
            format!("{field}.app_cookie"),
            format!(
                "is only used with affinity \"app-cookie\", not \"{}\"",
                service.affinity
            ),
        ));
    }
    let Some(own) = service.balancer_cookie() else {
        let unused = [
            ("companion_cookie", service.companion_cookie.is_some()),
            ("cors", service.cors),
            ("cors_cookie", service.cors_cookie.is_some()),
        ];
        if let Some((name, _)) = unused.iter().find(|(_, set)| *set) {
            return Err(invalid(
                format!("{field}.{name}"),
                "is only used where the balancer issues a cookie: affinity \"lb-cookie\", or \"app-cookie\" with app_cookie = \"companion\"",
            ));
        }
        return Ok(());
    };
    if !has_keys {
        return Err(invalid(
            "cookie_keys",
            format!(
                "service {} issues signed cookies ({own}), which need a signing key (cookie_keys or cookie_key_file)",
                service.name
            ),
        ));
    }
    if !(1..=MAX_COOKIE_DURATION).contains(&service.cookie_duration) {
        return Err(invalid(
            format!("{field}.cookie_duration"),
            format!(
                "{} seconds is outside 1..={MAX_COOKIE_DURATION} (7 days)",
                service.cookie_duration
            ),
        ));
    }
    if service.cors_cookie.is_some() && !service.cors {
        return Err(invalid(
            format!("{field}.cors_cookie"),
            "names the cross-origin cookie, which is only issued with cors = true",
        ));
    }
    let names = [
        ("companion_cookie", service.companion_cookie.clone()),
        ("cors_cookie", service.cors_cookie.clone()),
    ];
    for (name, value) in names {
        if let Some(value) = value.filter(|v| !is_cookie_name(v)) {
            return Err(invalid(
                format!("{field}.{name}"),
                format!("{value:?} is not a cookie name (RFC 6265 token)"),
            ));
        }
    }
    let cors = service.cors_cookie_name();
    let app = service.companion_of();
    if cors.as_deref() == Some(own)
        || (app.is_some() && (app == Some(own) || app == cors.as_deref()))
    {
        return Err(invalid(
            format!(
                "{field}.{}",
                if companion {
                    "companion_cookie"
                } else {
                    "cors_cookie"
                }
            ),
            "the balancer's cookies need names of their own, apart from the application's",
        ));
    }
    Ok(())
}

/// An RFC 6265 cookie name: a token of visible ASCII without separators.
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d: &u32| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// A configuration that cannot be used, with the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    /// The TOML error text names the line, the key and what was expected.
    #[error("{path}: {error}")]
    Parse {
        path: String,
        error: Box<toml::de::Error>,
    },
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
}

/// Whether an address can be a virtual IP or a backend: one host's, not a group's.
fn unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

impl Config {
    /// The agent's workers: `agent_workers`, or one per CPU the agent may run on (at most
    /// [`MAX_AGENT_WORKERS`]).
    pub fn workers(&self) -> u32 {
        self.agent_workers.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            cpus.min(MAX_AGENT_WORKERS) as u32
        })
    }

    /// `nat_ports` as its first port and how many, if it parses.
    pub fn nat_port_range(&self) -> Option<(u16, u16)> {
        let (first, last) = self.nat_ports.split_once('-')?;
        let (first, last): (u16, u16) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
        (first >= 1 && first <= last).then(|| {
            (
                first,
                (u32::from(last - first) + 1).min(u32::from(u16::MAX)) as u16,
            )
        })
    }

    /// The source network that holds `backend` (the most specific, if several do), with its
    /// index.
    pub fn source_network_of(&self, backend: IpAddr) -> Option<(usize, &SourceNetworkConfig)> {
        self.source_networks
            .iter()
            .enumerate()
            .filter(|(_, n)| n.contains(backend))
            .max_by_key(|(_, n)| n.prefix().map_or(0, |(_, bits)| bits))
    }

    /// Where in `NAT_SOURCES` (every network's addresses in turn) the addresses XDP's flows
    /// to `backend` come from start, and how many there are (none outside every network).
    pub fn nat_sources_of(&self, backend: IpAddr) -> (u32, u8) {
        let Some((index, network)) = self.source_network_of(backend) else {
            return (0, 0);
        };
        let first: usize = self.source_networks[..index]
            .iter()
            .map(|n| n.addresses.len())
            .sum();
        (first as u32, network.addresses.len() as u8)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        // A relative key file is found beside the configuration.
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse_in(&text, base).map_err(|error| match error {
            ConfigError::Parse { error, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                error,
            },
            other => other,
        })
    }

    #[cfg(test)]
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Self::parse_in(text, Path::new("."))
    }

    /// Parses `text`, reading a relative `cookie_key_file` from `base`.
    fn parse_in(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: String::new(),
            error: Box::new(error),
        })?;
        config.signing_keys = config.load_keys(base)?;
        config.gather_groups()?;
        config.give_routes_their_sessions();
        config.validate()?;
        Ok(config)
    }

    /// Moves each group's backends into its service's list, marked with the group.
    fn gather_groups(&mut self) -> Result<(), ConfigError> {
        for (index, service) in self.services.iter_mut().enumerate() {
            if service.groups.is_empty() {
                continue;
            }
            if !service.backends.is_empty() {
                return Err(invalid(
                    format!("service[{index}] ({}).backend", service.name),
                    "cannot stand beside [[service.group]]: list each backend in its group",
                ));
            }
            for (g, group) in service.groups.iter_mut().enumerate() {
                for mut backend in group.backends.drain(..) {
                    backend.group = Some(g);
                    service.backends.push(backend);
                }
            }
        }
        Ok(())
    }

    /// Makes the session settings of each route that sets its own.
    fn give_routes_their_sessions(&mut self) {
        for service in &mut self.services {
            let sessions: Vec<Option<Box<ServiceConfig>>> = service
                .routes
                .iter()
                .map(|r| {
                    r.has_own_sessions()
                        .then(|| Box::new(r.sessions_within(service)))
                })
                .collect();
            for (route, own) in service.routes.iter_mut().zip(sessions) {
                route.sessions = own;
            }
        }
    }

    /// `cookie_keys`, then the key file's keys; every id once, every secret long enough.
    fn load_keys(&self, base: &Path) -> Result<CookieKeys, ConfigError> {
        let mut keys: Vec<(String, CookieKey)> = self
            .cookie_keys
            .iter()
            .enumerate()
            .map(|(index, key)| {
                (
                    format!("cookie_keys[{index}]"),
                    CookieKey {
                        id: key.id,
                        secret: key.secret.as_bytes().to_vec(),
                    },
                )
            })
            .collect();
        if let Some(file) = &self.cookie_key_file {
            let path = base.join(file);
            let text = std::fs::read_to_string(&path).map_err(|error| {
                invalid(
                    "cookie_key_file",
                    format!("cannot read {}: {error}", path.display()),
                )
            })?;
            for (number, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let field = format!("cookie_key_file ({} line {})", path.display(), number + 1);
                let parsed = line
                    .split_once(char::is_whitespace)
                    .and_then(|(id, secret)| Some((id.parse::<u8>().ok()?, secret.trim())));
                let Some((id, secret)) = parsed else {
                    return Err(invalid(field, "expected `<id 0-255> <secret>`"));
                };
                keys.push((
                    field,
                    CookieKey {
                        id,
                        secret: secret.as_bytes().to_vec(),
                    },
                ));
            }
        }
        let mut ids = HashSet::new();
        for (field, key) in &keys {
            if key.secret.len() < MIN_SECRET_LEN {
                return Err(invalid(
                    field.clone(),
                    format!("the secret must be at least {MIN_SECRET_LEN} bytes"),
                ));
            }
            if !ids.insert(key.id) {
                return Err(invalid(
                    field.clone(),
                    format!("key id {} is used twice", key.id),
                ));
            }
        }
        Ok(CookieKeys(keys.into_iter().map(|(_, key)| key).collect()))
    }

    pub fn backend_interface(&self) -> &str {
        self.backend_interface
            .as_deref()
            .unwrap_or(&self.client_interface)
    }

    fn validate_binding_limits(&self) -> Result<(), ConfigError> {
        let capacity = self.binding_capacity;
        if !(100..=1_000_000).contains(&capacity) {
            return Err(invalid(
                "binding_capacity",
                format!("{capacity} is outside 100..=1000000"),
            ));
        }
        if !(1..=capacity).contains(&self.bindings_per_client) {
            return Err(invalid(
                "bindings_per_client",
                format!(
                    "{} is outside 1..={capacity} (binding_capacity)",
                    self.bindings_per_client
                ),
            ));
        }
        if !(self.bindings_per_client..=capacity).contains(&self.bindings_per_prefix) {
            return Err(invalid(
                "bindings_per_prefix",
                format!(
                    "{} is outside {}..={capacity} (bindings_per_client to binding_capacity)",
                    self.bindings_per_prefix, self.bindings_per_client
                ),
            ));
        }
        if let Some(workers) = self.agent_workers {
            if !(1..=MAX_AGENT_WORKERS as u32).contains(&workers) {
                return Err(invalid(
                    "agent_workers",
                    format!("{workers} is outside 1..={MAX_AGENT_WORKERS}"),
                ));
            }
        }
        let ring = self.punt_ring_size;
        if !ring.is_power_of_two() || !(1 << 16..=1 << 28).contains(&ring) {
            return Err(invalid(
                "punt_ring_size",
                format!("{ring} bytes is not a power of two from 65536 to 268435456"),
            ));
        }
        if !(10..=3600).contains(&self.syn_cookie_rotation) {
            return Err(invalid(
                "syn_cookie_rotation",
                format!("{} seconds is outside 10..=3600", self.syn_cookie_rotation),
            ));
        }
        if !(1..=300).contains(&self.request_timeout) {
            return Err(invalid(
                "request_timeout",
                format!("{} seconds is outside 1..=300", self.request_timeout),
            ));
        }
        if !(1..=300).contains(&self.head_ack_timeout) {
            return Err(invalid(
                "head_ack_timeout",
                format!("{} seconds is outside 1..=300", self.head_ack_timeout),
            ));
        }
        Ok(())
    }

    /// A service's groups, routes, failover and stickiness settings.
    fn validate_placement(&self, service: &ServiceConfig, field: &str) -> Result<(), ConfigError> {
        validate_groups(service, field)?;
        self.validate_routes(service, field)?;
        validate_failover(service, field)?;
        validate_stickiness(service, field)
    }

    fn validate_routes(&self, service: &ServiceConfig, field: &str) -> Result<(), ConfigError> {
        let group_named = |name: &str| service.groups.iter().any(|g| g.name == name);
        for (r, route) in service.routes.iter().enumerate() {
            let field = format!("{field}.route[{r}]");
            if service.groups.is_empty() || !service.reads_requests() {
                return Err(invalid(
                    field,
                    "routes are for HTTP services (cookie or url-param affinity) with [[service.group]]s to route to",
                ));
            }
            if !group_named(&route.group) {
                return Err(invalid(
                    format!("{field}.group"),
                    format!("{:?} is not a group of this service", route.group),
                ));
            }
            if !route.path.starts_with('/')
                || route
                    .path
                    .bytes()
                    .any(|b| b <= b' ' || b == b';' || b == b'?')
            {
                return Err(invalid(
                    format!("{field}.path"),
                    format!("{:?} is not a path prefix like \"/shop\"", route.path),
                ));
            }
            if let Some(host) = &route.host {
                let hostname = |label: &str| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                };
                if host.len() > 253 || !host.split('.').all(hostname) {
                    return Err(invalid(
                        format!("{field}.host"),
                        format!("{host:?} is not a host name like \"shop.example.com\""),
                    ));
                }
            }
            if let Some(mode) = route.affinity.filter(|m| m.code() != affinity::COOKIE) {
                return Err(invalid(
                    format!("{field}.affinity"),
                    format!("\"{mode}\" is not for a route: a route's sessions are read from its requests (lb-cookie, app-cookie or url-param)"),
                ));
            }
            if let Some(own) = &route.sessions {
                validate_sessions(own, &field, !self.signing_keys.is_empty())?;
            }
        }
        Ok(())
    }

    fn validate_source_networks(&self) -> Result<(), ConfigError> {
        if self.nat_port_range().is_none() {
            return Err(invalid(
                "nat_ports",
                format!(
                    "{:?} is not a port range like \"1024-32767\"",
                    self.nat_ports
                ),
            ));
        }
        for (index, network) in self.source_networks.iter().enumerate() {
            let field = format!("source_network[{index}]");
            let Some((net, _)) = network.prefix() else {
                return Err(invalid(
                    format!("{field}.network"),
                    format!(
                        "{:?} is not a network like \"198.19.0.0/24\"",
                        network.network
                    ),
                ));
            };
            if network.addresses.is_empty() || network.addresses.len() > MAX_SOURCES_PER_NETWORK {
                return Err(invalid(
                    format!("{field}.addresses"),
                    format!("needs 1 to {MAX_SOURCES_PER_NETWORK} addresses"),
                ));
            }
            for (a, addr) in network.addresses.iter().enumerate() {
                if !unicast(*addr) || addr.is_ipv4() != net.is_ipv4() {
                    return Err(invalid(
                        format!("{field}.addresses[{a}]"),
                        format!("{addr} is not a unicast address of the network's family"),
                    ));
                }
            }
        }
        let total: usize = self.source_networks.iter().map(|n| n.addresses.len()).sum();
        if total > MAX_NAT_SOURCES as usize {
            return Err(invalid(
                "source_network",
                format!("{total} addresses in all, at most {MAX_NAT_SOURCES} are supported"),
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !name_ok(&self.instance) {
            return Err(invalid(
                "instance",
                format!(
                    "{:?} must be 1-64 letters, digits, '-' or '_'",
                    self.instance
                ),
            ));
        }
        for (field, name) in [
            ("client_interface", self.client_interface.as_str()),
            ("backend_interface", self.backend_interface()),
        ] {
            if name.is_empty() || name.len() > 15 || name.contains('/') || name.contains(' ') {
                return Err(invalid(field, format!("{name:?} is not an interface name")));
            }
        }
        if !(MIN_FLOW_CAPACITY..=MAX_FLOW_CAPACITY).contains(&self.flow_capacity) {
            return Err(invalid(
                "flow_capacity",
                format!(
                    "{} is outside {MIN_FLOW_CAPACITY}..={MAX_FLOW_CAPACITY}",
                    self.flow_capacity
                ),
            ));
        }
        if !(MIN_FLOW_CAPACITY..=MAX_FLOW_CAPACITY).contains(&self.affinity_capacity) {
            return Err(invalid(
                "affinity_capacity",
                format!(
                    "{} is outside {MIN_FLOW_CAPACITY}..={MAX_FLOW_CAPACITY}",
                    self.affinity_capacity
                ),
            ));
        }
        if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&self.table_size)
            || !is_prime(self.table_size)
        {
            return Err(invalid(
                "table_size",
                format!(
                    "{} must be a prime in {MIN_TABLE_SIZE}..={MAX_TABLE_SIZE} (e.g. 65537)",
                    self.table_size
                ),
            ));
        }
        self.validate_binding_limits()?;
        self.validate_source_networks()?;
        if self.services.len() > MAX_SERVICES as usize {
            return Err(invalid(
                "service",
                format!(
                    "{} services, at most {MAX_SERVICES} are supported",
                    self.services.len()
                ),
            ));
        }
        let backends: usize = self.services.iter().map(|s| s.backends.len()).sum();
        if backends > MAX_BACKENDS as usize {
            return Err(invalid(
                "service.backend",
                format!("{backends} backends in all, at most {MAX_BACKENDS} are supported"),
            ));
        }

        let mut names = HashSet::new();
        let mut endpoints = HashSet::new();
        for (index, service) in self.services.iter().enumerate() {
            let field = format!("service[{index}]");
            if !name_ok(&service.name) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!(
                        "{:?} must be 1-64 letters, digits, '-' or '_'",
                        service.name
                    ),
                ));
            }
            let field = format!("service[{index}] ({})", service.name);
            if !names.insert(service.name.as_str()) {
                return Err(invalid(
                    format!("{field}.name"),
                    "is used by another service",
                ));
            }
            if service.port == 0 {
                return Err(invalid(format!("{field}.port"), "must be 1-65535"));
            }
            let (family, longest) = if service.vip.is_ipv4() {
                ("IPv4", 32)
            } else {
                ("IPv6", 128)
            };
            if service.source_prefix() > longest {
                return Err(invalid(
                    format!("{field}.source_prefix"),
                    format!(
                        "{} is not an {family} prefix length (0-{longest})",
                        service.source_prefix()
                    ),
                ));
            }
            if service.drain_timeout > MAX_AFFINITY_TIMEOUT {
                return Err(invalid(
                    format!("{field}.drain_timeout"),
                    format!(
                        "{} seconds is above {MAX_AFFINITY_TIMEOUT} (7 days)",
                        service.drain_timeout
                    ),
                ));
            }
            if let Some(check) = &service.health_check {
                check.validate(&format!("{field}.health_check"))?;
            }
            validate_sessions(service, &field, !self.signing_keys.is_empty())?;
            if !(1..=MAX_AFFINITY_TIMEOUT).contains(&service.affinity_timeout) {
                return Err(invalid(
                    format!("{field}.affinity_timeout"),
                    format!(
                        "{} seconds is outside 1..={MAX_AFFINITY_TIMEOUT} (7 days)",
                        service.affinity_timeout
                    ),
                ));
            }

            if !unicast(service.vip) {
                return Err(invalid(
                    format!("{field}.vip"),
                    format!("{} cannot be a virtual IP", service.vip),
                ));
            }
            if !endpoints.insert((service.vip, service.port, service.protocol)) {
                return Err(invalid(
                    format!("{field}.vip"),
                    format!(
                        "{}:{}/{} is already used by another service",
                        service.vip, service.port, service.protocol
                    ),
                ));
            }
            let l4 = service.affinity.code() != affinity::COOKIE;
            if service.proxy_protocol && l4 && service.protocol == Protocol::Udp {
                return Err(invalid(
                    format!("{field}.proxy_protocol"),
                    "is for TCP services: the balancer does not put the header in UDP datagrams",
                ));
            }
            if service.proxy_protocol && l4 && service.nat != NatMode::Full {
                return Err(invalid(
                    format!("{field}.proxy_protocol"),
                    "on an L4 service needs nat = \"full\" (in gateway NAT the backend sees the client's address itself)",
                ));
            }
            if service.nat == NatMode::Full {
                if let Some((b, backend)) = service
                    .backends
                    .iter()
                    .enumerate()
                    .find(|(_, b)| self.source_network_of(b.address).is_none())
                {
                    return Err(invalid(
                        format!("{}.address", service.backend_field(&field, b)),
                        format!(
                            "no [[source_network]] holds {}: full NAT sends from the balancer's own address in the backend's network",
                            backend.address
                        ),
                    ));
                }
            }
            let mut backend_names = HashSet::new();
            let mut cookie_tokens = HashSet::new();
            self.validate_placement(service, &field)?;
            for (b, backend) in service.backends.iter().enumerate() {
                let field = service.backend_field(&field, b);
                if !name_ok(&backend.name) {
                    return Err(invalid(
                        format!("{field}.name"),
                        format!(
                            "{:?} must be 1-64 letters, digits, '-' or '_'",
                            backend.name
                        ),
                    ));
                }
                if !backend_names.insert(backend.name.as_str()) {
                    return Err(invalid(
                        format!("{field}.name"),
                        "is used by another backend of this service",
                    ));
                }
                if service.affinity == AffinityMode::LbCookie
                    && !cookie_tokens.insert(backend_token(&backend.name))
                {
                    return Err(invalid(
                        format!("{field}.name"),
                        "names the same cookie token as another backend of this service; rename one",
                    ));
                }
                if backend.weight > MAX_WEIGHT {
                    return Err(invalid(
                        format!("{field}.weight"),
                        format!("{} is above the maximum {MAX_WEIGHT}", backend.weight),
                    ));
                }
                if backend.port == Some(0) {
                    return Err(invalid(format!("{field}.port"), "must be 1-65535"));
                }
                if !unicast(backend.address) {
                    return Err(invalid(
                        format!("{field}.address"),
                        format!("{} cannot be a backend address", backend.address),
                    ));
                }
                // The balancer rewrites addresses, not headers: a backend of the other family
                // would need the packet rebuilt (NAT64), which no path of it does.
                if backend.address.is_ipv4() != service.vip.is_ipv4() {
                    return Err(invalid(
                        format!("{field}.address"),
                        format!(
                            "{} is not of the virtual IP's family ({family}); a service's backends share its family",
                            backend.address
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl HealthCheckConfig {
    fn validate(&self, field: &str) -> Result<(), ConfigError> {
        for (name, seconds) in [("interval", self.interval), ("timeout", self.timeout)] {
            if !(0.05..=3600.0).contains(&seconds) {
                return Err(invalid(
                    format!("{field}.{name}"),
                    format!("{seconds} seconds is outside 0.05..=3600"),
                ));
            }
        }
        for (name, count) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=100).contains(&count) {
                return Err(invalid(
                    format!("{field}.{name}"),
                    format!("{count} is outside 1..=100"),
                ));
            }
        }
        if self.port == Some(0) {
            return Err(invalid(format!("{field}.port"), "must be 1-65535"));
        }
        if self.kind == CheckKind::Http {
            if !self.path.starts_with('/') || self.path.chars().any(|c| c.is_ascii_whitespace()) {
                return Err(invalid(
                    format!("{field}.path"),
                    format!("{:?} must start with '/' and contain no spaces", self.path),
                ));
            }
            if self.status_range().is_none() {
                return Err(invalid(
                    format!("{field}.expected_status"),
                    format!(
                        "{:?} is not a status or a range like \"200-399\"",
                        self.expected_status
                    ),
                ));
            }
            if let Some(host) = &self.host {
                if host.is_empty()
                    || host
                        .chars()
                        .any(|c| c.is_ascii_whitespace() || c.is_control())
                {
                    return Err(invalid(
                        format!("{field}.host"),
                        format!("{host:?} is not a host name"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A service's groups: named once each, weighted within bounds, each with a backend.
fn validate_groups(service: &ServiceConfig, field: &str) -> Result<(), ConfigError> {
    if service.groups.len() > MAX_GROUPS as usize {
        return Err(invalid(
            format!("{field}.group"),
            format!(
                "{} groups are more than the {MAX_GROUPS} a service may have",
                service.groups.len()
            ),
        ));
    }
    let mut names = HashSet::new();
    for (g, group) in service.groups.iter().enumerate() {
        let field = format!("{field}.group[{g}]");
        if !name_ok(&group.name) {
            return Err(invalid(
                format!("{field}.name"),
                format!("{:?} must be 1-64 letters, digits, '-' or '_'", group.name),
            ));
        }
        if !names.insert(group.name.as_str()) {
            return Err(invalid(
                format!("{field}.name"),
                "is used by another group of this service",
            ));
        }
        if group.weight > MAX_WEIGHT {
            return Err(invalid(
                format!("{field}.weight"),
                format!("{} is above the maximum {MAX_WEIGHT}", group.weight),
            ));
        }
        if !service.backends.iter().any(|b| b.group == Some(g)) {
            return Err(invalid(
                format!("{field}.backend"),
                "a group needs at least one backend",
            ));
        }
    }
    Ok(())
}

/// `on_backend_down`, `return_home`, `balance_factor` and `keep_timeout`.
fn validate_failover(service: &ServiceConfig, field: &str) -> Result<(), ConfigError> {
    let source_ip = service.affinity == AffinityMode::SourceIp;
    if service.on_backend_down != OnBackendDown::Failover && !service.reads_requests() && !source_ip
    {
        return Err(invalid(
                format!("{field}.on_backend_down"),
                "is for services with sessions (source-ip, cookie or url-param affinity): a flow service's flows end with their backend",
            ));
    }
    if service.return_home && service.cookie_name().is_none() && !source_ip {
        return Err(invalid(
                format!("{field}.return_home"),
                "is for source-ip and cookie services: their session or cookie remembers the backend to return to",
            ));
    }
    if service.return_home && service.on_backend_down != OnBackendDown::Failover {
        return Err(invalid(
            format!("{field}.return_home"),
            "is for on_backend_down = \"failover\": the other modes never move a session",
        ));
    }
    if let Some(factor) = service.balance_factor {
        let field = format!("{field}.balance_factor");
        if !(101..=1000).contains(&factor) {
            return Err(invalid(
                field,
                format!("{factor} is outside 101..=1000 (percent of the average load, e.g. 125)"),
            ));
        }
    }
    if !(1..=MAX_AFFINITY_TIMEOUT).contains(&service.keep_timeout) {
        return Err(invalid(
            format!("{field}.keep_timeout"),
            format!(
                "{} seconds is outside 1..={MAX_AFFINITY_TIMEOUT}",
                service.keep_timeout
            ),
        ));
    }
    Ok(())
}

/// `default_group` and `group_stickiness`.
fn validate_stickiness(service: &ServiceConfig, field: &str) -> Result<(), ConfigError> {
    let group_named = |name: &str| service.groups.iter().any(|g| g.name == name);
    if let Some(default) = &service.default_group {
        let field = format!("{field}.default_group");
        if service.routes.is_empty() {
            return Err(invalid(field, "is only used with [[service.route]]s"));
        }
        if !group_named(default) {
            return Err(invalid(
                field,
                format!("{default:?} is not a group of this service"),
            ));
        }
    }
    if let Some(stickiness) = service.group_stickiness {
        let field = format!("{field}.group_stickiness");
        if service.groups.is_empty() {
            return Err(invalid(
                field,
                "needs [[service.group]]s to keep sessions in",
            ));
        }
        if service.affinity != AffinityMode::LbCookie && service.affinity != AffinityMode::SourceIp
        {
            return Err(invalid(
                    field,
                    "is for lb-cookie and source-ip services, whose cookie or session carries the group (other services place each request in a group by weight)",
                ));
        }
        if !(1..=MAX_COOKIE_DURATION).contains(&stickiness) {
            return Err(invalid(
                field,
                format!("{stickiness} is outside 1..={MAX_COOKIE_DURATION} seconds (7 days)"),
            ));
        }
    }
    Ok(())
}

impl BackendConfig {
    pub fn port_for(&self, service: &ServiceConfig) -> u16 {
        self.port.unwrap_or(service.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
        instance = "lab"
        client_interface = "lb-client"
        backend_interface = "lb-backend"

        [[service]]
        name = "web"
        vip = "203.0.113.10"
        port = 80
        protocol = "tcp"
          [[service.backend]]
          name = "b1"
          address = "198.19.0.11"
          [[service.backend]]
          name = "b2"
          address = "198.19.0.12"
          port = 8080
    "#;

    fn error_of(text: &str) -> String {
        Config::parse(text)
            .expect_err("config must be rejected")
            .to_string()
    }

    #[test]
    fn valid_config_gets_defaults() {
        let config = Config::parse(VALID).expect("valid config");
        assert_eq!(config.xdp_mode, XdpModeSetting::Auto);
        assert_eq!(config.flow_capacity, balancer_common::DEFAULT_FLOW_CAPACITY);
        assert_eq!(config.stats_interval, 1);
        let service = &config.services[0];
        assert_eq!(service.backends[0].port_for(service), 80);
        assert_eq!(service.backends[1].port_for(service), 8080);
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../balancer.example.toml");
        Config::load(&path).expect("balancer.example.toml must be valid");
    }

    /// [`VALID`] with its service on `lb-cookie` and keys before the service.
    fn lb_cookie(keys: &str, settings: &str) -> String {
        VALID
            .replace("[[service]]", &format!("{keys}\n[[service]]"))
            .replace(
                "protocol = \"tcp\"",
                &format!("protocol = \"tcp\"\naffinity = \"lb-cookie\"\n{settings}"),
            )
    }

    const TWO_KEYS: &str = r#"cookie_keys = [{ id = 2, secret = "the newer secret, 32 bytes long" }, { id = 1, secret = "the older secret of the two keys" }]"#;

    #[test]
    fn lb_cookie_services_get_a_default_name_and_duration_and_all_keys() {
        let config = Config::parse(&lb_cookie(TWO_KEYS, "")).expect("valid config");
        let service = &config.services[0];
        assert_eq!(service.cookie_name(), Some("LBSESSION"));
        assert_eq!(service.cookie_duration, 86_400);
        let ids: Vec<u8> = config.signing_keys.0.iter().map(|k| k.id).collect();
        assert_eq!(ids, [2, 1], "the first key signs");
    }

    #[test]
    fn cookie_keys_are_read_from_a_key_file_beside_the_config() {
        let dir = std::env::temp_dir().join(format!("balancer-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory");
        std::fs::write(
            dir.join("keys"),
            "# rotated monthly\n7 a secret from the key file\n",
        )
        .expect("writing keys");
        let config = lb_cookie("cookie_key_file = \"keys\"", "cookie = \"STICKY\"");
        std::fs::write(dir.join("balancer.toml"), &config).expect("writing the config");
        let loaded = Config::load(&dir.join("balancer.toml"));
        std::fs::write(dir.join("keys"), "7\n").expect("writing keys");
        let broken = Config::load(&dir.join("balancer.toml"));
        let _ = std::fs::remove_dir_all(&dir);
        let loaded = loaded.expect("valid config");
        assert_eq!(loaded.signing_keys.0[0].id, 7);
        assert_eq!(
            loaded.signing_keys.0[0].secret,
            b"a secret from the key file"
        );
        assert_eq!(loaded.services[0].cookie_name(), Some("STICKY"));
        let broken = broken.expect_err("a key line without a secret").to_string();
        assert!(broken.starts_with("cookie_key_file ("), "{broken}");
        assert!(broken.contains("line 1"), "{broken}");
    }

    #[test]
    fn ipv6_services_take_a_64_and_refuse_backends_of_the_other_family() {
        let v6 = VALID
            .replace("203.0.113.10", "2001:db8:f::10")
            .replace("198.19.0.11", "2001:db8:b::11")
            .replace("198.19.0.12", "2001:db8:b::12");
        let config = Config::parse(&v6).expect("an IPv6 service");
        let service = &config.services[0];
        assert_eq!(service.source_prefix(), 64);
        assert_eq!(
            service.source_mask(),
            Addr::prefix_mask(false, 64),
            "IPv6 sessions default to a /64"
        );
        let mixed = v6.replace("2001:db8:b::12", "198.19.0.12");
        assert!(error_of(&mixed).contains("service[0] (web).backend[1].address"));
        let too_long = v6.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nsource_prefix = 129",
        );
        assert!(error_of(&too_long).contains("service[0] (web).source_prefix"));
    }

    #[test]
    fn full_nat_errors_name_the_field() {
        let cookie_full = VALID.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\naffinity = \"lb-cookie\"\nnat = \"full\"\nproxy_protocol = true",
        );
        let sources =
            "\n[[source_network]]\nnetwork = \"198.19.0.0/24\"\naddresses = [\"198.19.0.1\"]\n";
        let keyed = cookie_full.replace(
            "instance = \"lab\"",
            "instance = \"lab\"\ncookie_keys = [{ id = 1, secret = \"a long enough secret\" }]",
        );
        let valid = format!("{keyed}{sources}");
        Config::parse(&valid).expect("a full NAT cookie service with its source network");
        let l4 = valid.replace("affinity = \"lb-cookie\"\n", "");
        Config::parse(&l4).expect("a full NAT L4 service with the PROXY header");
        assert!(error_of(&keyed).contains("service[0] (web).backend[0].address"));
        let cases = [
            (
                valid.replace(
                    "instance = \"lab\"",
                    "instance = \"lab\"\nnat_ports = \"9-1\"",
                ),
                "nat_ports",
            ),
            (
                valid.replace("198.19.0.0/24", "198.19.0.0/40"),
                "source_network[0].network",
            ),
            (
                valid.replace("[\"198.19.0.1\"]", "[\"2001:db8::1\"]"),
                "source_network[0].addresses[0]",
            ),
            (
                valid.replace("affinity = \"lb-cookie\"\nnat = \"full\"\n", ""),
                "service[0] (web).proxy_protocol",
            ),
            (
                l4.replace("protocol = \"tcp\"", "protocol = \"udp\""),
                "service[0] (web).proxy_protocol",
            ),
        ];
        for (text, field) in cases {
            let error = error_of(&text);
            assert!(error.starts_with(field), "{field}: {error}");
        }
    }

    #[test]
    fn lb_cookie_errors_name_the_field() {
        let cases = [
            (lb_cookie("", ""), "cookie_keys"),
            (
                lb_cookie(TWO_KEYS, "cookie_duration = 0"),
                "service[0] (web).cookie_duration",
            ),
            (
                lb_cookie(TWO_KEYS, "cookie_duration = 604801"),
                "service[0] (web).cookie_duration",
            ),
            (
                lb_cookie(r#"cookie_keys = [{ id = 1, secret = "short" }]"#, ""),
                "cookie_keys[0]",
            ),
            (
                lb_cookie(&TWO_KEYS.replace("id = 2", "id = 1"), ""),
                "cookie_keys[1]",
            ),
            (
                lb_cookie(TWO_KEYS, "cookie = \"A B\""),
                "service[0] (web).cookie",
            ),
            (
                lb_cookie("cookie_key_file = \"/nonexistent/keys\"", ""),
                "cookie_key_file",
            ),
            (
                lb_cookie(TWO_KEYS, "cors_cookie = \"X\""),
                "service[0] (web).cors_cookie",
            ),
            (
                lb_cookie(TWO_KEYS, "cors = true\ncors_cookie = \"LBSESSION\""),
                "service[0] (web).cors_cookie",
            ),
            (
                lb_cookie(TWO_KEYS, "cors = true\ncors_cookie = \"a;b\""),
                "service[0] (web).cors_cookie",
            ),
            (
                lb_cookie(TWO_KEYS, "app_cookie = \"companion\""),
                "service[0] (web).app_cookie",
            ),
            (
                VALID.replace("protocol = \"tcp\"", "protocol = \"tcp\"\ncors = true"),
                "service[0] (web).cors",
            ),
            (
                VALID.replace(
                    "protocol = \"tcp\"",
                    "protocol = \"tcp\"\naffinity = \"app-cookie\"\ncookie = \"SID\"\napp_cookie = \"companion\"",
                ),
                "cookie_keys",
            ),
            (
                lb_cookie(TWO_KEYS, "").replace(
                    "affinity = \"lb-cookie\"",
                    "affinity = \"app-cookie\"\ncookie = \"SID\"\napp_cookie = \"companion\"\ncompanion_cookie = \"SID\"",
                ),
                "service[0] (web).companion_cookie",
            ),
            (
                VALID.replace(
                    "protocol = \"tcp\"",
                    "protocol = \"tcp\"\naffinity = \"app-cookie\"\ncookie = \"SID\"\napp_cookie = \"rewrite\"\ncompanion_cookie = \"X\"",
                ),
                "service[0] (web).companion_cookie",
            ),
        ];
        for (text, field) in cases {
            let error = error_of(&text);
            assert!(
                error.starts_with(&format!("{field}:")),
                "expected an error about {field}, got: {error}"
            );
        }
    }

    const GROUPED: &str = r#"
        instance = "lab"
        client_interface = "lb-client"
        backend_interface = "lb-backend"
        cookie_keys = [{ id = 1, secret = "a key of at least sixteen bytes" }]

        [[service]]
        name = "shop"
        vip = "203.0.113.10"
        port = 80
        protocol = "tcp"
        affinity = "lb-cookie"
        group_stickiness = 60
          [[service.group]]
          name = "blue"
          weight = 90
            [[service.group.backend]]
            name = "b1"
            address = "198.19.0.11"
            [[service.group.backend]]
            name = "b2"
            address = "198.19.0.12"
          [[service.group]]
          name = "green"
          weight = 10
            [[service.group.backend]]
            name = "g1"
            address = "198.19.0.13"
            port = 8080
    "#;

    #[test]
    fn a_groups_backends_join_the_service_marked_with_their_group() {
        let config = Config::parse(GROUPED).expect("valid");
        let service = &config.services[0];
        let groups: Vec<(&str, Option<usize>)> = service
            .backends
            .iter()
            .map(|b| (b.name.as_str(), b.group))
            .collect();
        assert_eq!(groups, [("b1", Some(0)), ("b2", Some(0)), ("g1", Some(1))]);
        assert_eq!(service.group_stickiness(), 60);
        assert_eq!(
            service.backend_field("service[0]", 2),
            "service[0].group[1].backend[0]"
        );
    }

    #[test]
    fn requests_take_the_first_route_that_matches_their_host_and_path() {
        let routed = format!(
            "{GROUPED}\n[[service.route]]\nhost = \"a.example\"\npath = \"/green\"\ngroup = \"green\"\n\
             [[service.route]]\nhost = \"a.example\"\ngroup = \"blue\"\n"
        );
        let config = Config::parse(&routed).expect("valid");
        let service = &config.services[0];
        let route = |host: Option<&str>, path: &str| {
            service
                .route(host, path)
                .map(|r| r.map(|r| (r.index, r.group, r.path)))
        };
        assert_eq!(
            route(Some("a.example"), "/green/x"),
            Ok(Some((Some(0), 1, "/green")))
        );
        assert_eq!(
            route(Some("A.Example"), "/green"),
            Ok(Some((Some(0), 1, "/green")))
        );
        assert_eq!(
            route(Some("a.example"), "/greenhouse"),
            Ok(Some((Some(1), 0, "/")))
        );
        assert_eq!(route(Some("b.example"), "/"), Err(NoRoute));
        assert_eq!(route(None, "/"), Err(NoRoute));
        let defaulted = routed.replace(
            "group_stickiness = 60",
            "group_stickiness = 60\ndefault_group = \"green\"",
        );
        let config = Config::parse(&defaulted).expect("valid");
        assert_eq!(
            config.services[0].route(Some("b.example"), "/"),
            Ok(Some(Route {
                index: None,
                group: 1,
                path: "/"
            }))
        );
    }

    /// [`GROUPED`] with a route to green carrying `settings` and one to blue without any.
    fn with_route_settings(settings: &str) -> String {
        format!(
            "{GROUPED}\n[[service.route]]\nhost = \"a.example\"\ngroup = \"green\"\n{settings}\n\
             [[service.route]]\nhost = \"b.example\"\ngroup = \"blue\"\n"
        )
    }

    #[test]
    fn a_route_reads_its_sessions_by_its_own_settings() {
        let config = Config::parse(&with_route_settings(
            "affinity = \"url-param\"\nparam = \"sessionID\"",
        ))
        .expect("valid");
        let service = &config.services[0];
        let own = service.sessions(service.route(Some("a.example"), "/").unwrap());
        assert_eq!(own.url_param(), Some("sessionID"));
        assert_eq!(
            own.cookie_name(),
            None,
            "the service's cookie is not read there"
        );
        let other = service.sessions(service.route(Some("b.example"), "/").unwrap());
        assert_eq!(other.cookie_name(), Some("LBSESSION"));
        assert_eq!(other.url_param(), None);

        let config = Config::parse(&with_route_settings(
            "cookie = \"OWN\"\ncookie_duration = 60",
        ))
        .expect("valid");
        let service = &config.services[0];
        let own = service.sessions(service.route(Some("a.example"), "/").unwrap());
        assert_eq!(
            (own.balancer_cookie(), own.cookie_duration),
            (Some("OWN"), 60)
        );
    }

    #[test]
    fn route_setting_errors_name_the_route() {
        let cases = [
            ("affinity = \"source-ip\"", "route[0].affinity"),
            ("affinity = \"url-param\"", "route[0].param"),
            ("cookie = \"not a name\"", "route[0].cookie"),
            ("cookie_duration = 0", "route[0].cookie_duration"),
            ("param = \"sessionID\"", "route[0].param"),
        ];
        for (settings, field) in cases {
            let error = error_of(&with_route_settings(settings));
            assert!(
                error.starts_with(&format!("service[0] (shop).{field}:")),
                "expected an error about {field}, got: {error}"
            );
        }
    }

    #[test]
    fn group_errors_name_the_field() {
        let cases = [
            (
                GROUPED.replace("port = 8080", "port = 0"),
                "service[0] (shop).group[1].backend[0].port",
            ),
            (
                GROUPED.replace("weight = 10\n", "weight = 10001\n"),
                "service[0] (shop).group[1].weight",
            ),
            (
                GROUPED.replace("name = \"green\"", "name = \"blue\""),
                "service[0] (shop).group[1].name",
            ),
            (
                GROUPED.replace("name = \"g1\"", "name = \"b1\""),
                "service[0] (shop).group[1].backend[0].name",
            ),
            (
                format!("{GROUPED}\n[[service.route]]\nhost = \"a.example\"\ngroup = \"red\"\n"),
                "service[0] (shop).route[0].group",
            ),
            (
                format!("{GROUPED}\n[[service.route]]\npath = \"shop\"\ngroup = \"blue\"\n"),
                "service[0] (shop).route[0].path",
            ),
            (
                format!("{GROUPED}\n[[service.route]]\nhost = \"a b\"\ngroup = \"blue\"\n"),
                "service[0] (shop).route[0].host",
            ),
            (
                GROUPED.replace("group_stickiness = 60", "default_group = \"blue\""),
                "service[0] (shop).default_group",
            ),
            (
                format!("{VALID}\n[[service.route]]\ngroup = \"blue\"\n"),
                "service[0] (web).route[0]",
            ),
            (
                VALID.replace(
                    "protocol = \"tcp\"",
                    "protocol = \"tcp\"\non_backend_down = \"keep\"",
                ),
                "service[0] (web).on_backend_down",
            ),
            (
                GROUPED.replace(
                    "group_stickiness = 60",
                    "return_home = true\non_backend_down = \"reject\"",
                ),
                "service[0] (shop).return_home",
            ),
            (
                GROUPED.replace("group_stickiness = 60", "balance_factor = 100"),
                "service[0] (shop).balance_factor",
            ),
            (
                VALID.replace(
                    "protocol = \"tcp\"",
                    "protocol = \"tcp\"\nbalance_factor = 1001",
                ),
                "service[0] (web).balance_factor",
            ),
            (
                GROUPED.replace("group_stickiness = 60", "keep_timeout = 0"),
                "service[0] (shop).keep_timeout",
            ),
            (
                VALID.replace(
                    "protocol = \"tcp\"",
                    "protocol = \"tcp\"\nreturn_home = true",
                ),
                "service[0] (web).return_home",
            ),
            (
                GROUPED.replace("group_stickiness = 60", "group_stickiness = 604801"),
                "service[0] (shop).group_stickiness",
            ),
            (
                GROUPED.replace("affinity = \"lb-cookie\"", "affinity = \"flow\""),
                "service[0] (shop).group_stickiness",
            ),
            (
                GROUPED.to_owned()
                    + &(0..7)
                        .map(|g| {
                            format!(
                                "[[service.group]]\nname = \"g{g}\"\n\
                                 [[service.group.backend]]\nname = \"x{g}\"\naddress = \"198.19.1.{g}\"\n"
                            )
                        })
                        .collect::<String>(),
                "service[0] (shop).group",
            ),
            (
                GROUPED.replace(
                    "group_stickiness = 60",
                    "[[service.backend]]\nname = \"x\"\naddress = \"198.19.0.14\"",
                ),
                "service[0] (shop).backend",
            ),
            (
                VALID.replace(
                    "protocol = \"tcp\"",
                    "protocol = \"tcp\"\ngroup_stickiness = 5",
                ),
                "service[0] (web).group_stickiness",
            ),
            (
                VALID.replace(
                    "protocol = \"tcp\"",
                    "protocol = \"tcp\"\naffinity = \"url-param\"",
                ),
                "service[0] (web).param",
            ),
            (
                VALID.replace(
                    "protocol = \"tcp\"",
                    "protocol = \"tcp\"\naffinity = \"url-param\"\nparam = \"a&b\"",
                ),
                "service[0] (web).param",
            ),
            (
                VALID.replace(
                    "protocol = \"tcp\"",
                    "protocol = \"tcp\"\nparam = \"sessionID\"",
                ),
                "service[0] (web).param",
            ),
            (
                VALID.replace(
                    "protocol = \"tcp\"",
                    "protocol = \"udp\"\naffinity = \"url-param\"\nparam = \"sessionID\"",
                ),
                "service[0] (web).protocol",
            ),
        ];
        for (text, field) in cases {
            let error = error_of(&text);
            assert!(
                error.starts_with(&format!("{field}:")),
                "expected an error about {field}, got: {error}"
            );
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (VALID.replace("203.0.113.10", "203.0.113.300"), "vip"),
            (
                VALID.replace("port = 8080", "port = 0"),
                "service[0] (web).backend[1].port",
            ),
            (
                VALID.replace("port = 8080", "weight = 20000"),
                "service[0] (web).backend[1].weight",
            ),
            (
                VALID.replace("port = 80\n", "port = 0\n"),
                "service[0] (web).port",
            ),
            (VALID.replace("\"tcp\"", "\"sctp\""), "protocol"),
            (
                VALID.replace("name = \"b2\"", "name = \"b1\""),
                "service[0] (web).backend[1].name",
            ),
            (
                VALID.replace("instance = \"lab\"", "instance = \"a/b\""),
                "instance",
            ),
            (
                VALID.replace("instance = \"lab\"", "flow_capacity = 3"),
                "flow_capacity",
            ),
            (
                VALID.replace("instance = \"lab\"", "colour = \"blue\""),
                "colour",
            ),
            (
                VALID.replace("client_interface = \"lb-client\"", ""),
                "client_interface",
            ),
            (
                VALID.replace(
                    "protocol = \"tcp\"",
                    "protocol = \"tcp\"\naffinity = \"app-cookie\"",
                ),
                "service[0] (web).cookie",
            ),
            (
                VALID.replace(
                    "protocol = \"tcp\"",
                    "protocol = \"tcp\"\naffinity = \"app-cookie\"\ncookie = \"a;b\"",
                ),
                "service[0] (web).cookie",
            ),
            (
                VALID.replace("protocol = \"tcp\"", "protocol = \"tcp\"\ncookie = \"SID\""),
                "service[0] (web).cookie",
            ),
            (
                VALID.replace("instance = \"lab\"", "xdp_mode = \"turbo\""),
                "xdp_mode",
            ),
            (
                VALID.replace("instance = \"lab\"", "binding_capacity = 10"),
                "binding_capacity",
            ),
            (
                VALID.replace("instance = \"lab\"", "bindings_per_client = 20000"),
                "bindings_per_client",
            ),
            (
                VALID.replace("instance = \"lab\"", "bindings_per_prefix = 100"),
                "bindings_per_prefix",
            ),
            (
                VALID.replace("instance = \"lab\"", "head_ack_timeout = 0"),
                "head_ack_timeout",
            ),
            (
                VALID.replace("instance = \"lab\"", "request_timeout = 301"),
                "request_timeout",
            ),
            (
                VALID.replace("instance = \"lab\"", "syn_cookie_rotation = 1"),
                "syn_cookie_rotation",
            ),
            (
                VALID.replace("instance = \"lab\"", "punt_ring_size = 100000"),
                "punt_ring_size",
            ),
            (
                VALID.replace("instance = \"lab\"", "agent_workers = 9"),
                "agent_workers",
            ),
            (
                VALID.replace(
                    "protocol = \"tcp\"",
                    "protocol = \"tcp\"\nwithout_agent = \"reset\"",
                ),
                "service[0] (web).without_agent",
            ),
            (
                VALID.replace(
                    "protocol = \"tcp\"",
                    "protocol = \"tcp\"\naffinity = \"app-cookie\"\ncookie = \"SID\"\nwithout_agent = \"wait\"",
                ),
                "without_agent",
            ),
        ];
        for (text, field) in cases {
            let message = error_of(&text);
            assert!(message.contains(field), "{field:?} not named in: {message}");
        }
    }

    #[test]
    fn cookie_services_place_new_connections_by_their_fallback_while_no_agent_runs() {
        let with = |settings: &str| {
            let text = VALID.replace(
                "protocol = \"tcp\"",
                &format!(
                    "protocol = \"tcp\"\naffinity = \"app-cookie\"\ncookie = \"SID\"\n{settings}"
                ),
            );
            let config = Config::parse(&text).expect("a valid config");
            config.services[0].without_agent_code()
        };
        assert_eq!(with(""), without_agent::PLACE_BY_FLOW);
        assert_eq!(
            with("cookie_fallback = \"source-ip\""),
            without_agent::PLACE_BY_SOURCE
        );
        assert_eq!(with("without_agent = \"reset\""), without_agent::RESET);
    }

    #[test]
    fn duplicate_endpoints_are_rejected() {
        let twice = format!(
            "{VALID}\n[[service]]\nname = \"web2\"\nvip = \"203.0.113.10\"\nport = 80\nprotocol = \"tcp\"\n"
        );
        assert!(error_of(&twice).contains("service[1] (web2).vip"));
    }
}
