//! Where a cookie service's connection goes, the placement policy of the agent: the backend
//! its genuine balancer cookie names while that backend keeps sessions, the one its
//! application cookie's value hashes to, else the service's fallback; and what its first
//! response gets (the balancer's cookie, a companion, a rewritten prefix).
//!
//! When a service has groups of backends (blue/green, canary), a new session takes a group
//! by the groups' weights, then a backend by the group's own Maglev table. XDP, which places
//! the flows of L4 services and a cookie service's connections while no agent runs, reads
//! one table over all the backends, each weighted by its share of its group times its
//! group's share of the service.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use balancer_common::{backend_state, client_hash, flow_hash, mix, Addr, FlowKey};

use super::{
    counters::{BACKEND_UNUSABLE, REJECTION_REASONS},
    response::Issue,
    BackendRuntime, ServiceRuntime,
};
use crate::{
    config::{CookieFallback, OnBackendDown, Route, ServiceConfig},
    cookie::{backend_token, CookieKeys, GroupPin},
    http, rewrite,
};

/// A group of a service's backends as the agent places sessions in it.
#[derive(Clone)]
pub struct GroupRuntime {
    pub name: String,
    /// The group's name as cookies carry it.
    pub token: u32,
    /// Share of new sessions; set by the configuration or `balancer group weight`.
    pub weight: u32,
    /// Backend ids by slot, over the group's backends that take new sessions.
    pub lookup: Vec<u32>,
    /// The backends of `lookup`, once each.
    pub members: Vec<u32>,
}

impl GroupRuntime {
    pub fn new(name: &str, weight: u32) -> GroupRuntime {
        GroupRuntime {
            name: name.to_owned(),
            token: backend_token(name),
            weight,
            lookup: Vec::new(),
            members: Vec::new(),
        }
    }
}

/// What a backend weighs in its service's whole table, in parts of [`WEIGHT_SCALE`]: its
/// weight's share of its group's times the group's share of all groups' weights. Positive
/// wherever both weights are, so a light backend of a light group still takes some slots.
pub fn weight_in_service(
    backend_weight: u32,
    group_backends_weight: u32,
    group_weight: u32,
    groups_weight: u32,
) -> u32 {
    if backend_weight == 0 || group_weight == 0 {
        return 0;
    }
    let share = f64::from(backend_weight) / f64::from(group_backends_weight)
        * f64::from(group_weight)
        / f64::from(groups_weight);
    ((share * f64::from(WEIGHT_SCALE)).round() as u32).max(1)
}

/// The resolution of [`weight_in_service`]: the Maglev tables weigh relative to the heaviest.
const WEIGHT_SCALE: u32 = 10_000;

/// The group a new session of `hash` goes to: by weight among the groups with a backend
/// taking new sessions; none when no such group has weight.
pub fn pick_group(groups: &[GroupRuntime], hash: u32) -> Option<usize> {
    let open = |g: &GroupRuntime| g.weight > 0 && !g.lookup.is_empty();
    let total: u64 = groups
        .iter()
        .filter(|g| open(g))
        .map(|g| u64::from(g.weight))
        .sum();
    if total == 0 {
        return None;
    }
    // Mixed again: the backend's slot in the group's table comes from `hash` itself.
    let mut point = u64::from(mix(hash ^ 0x2545_f491)) % total;
    for (index, group) in groups.iter().enumerate().filter(|(_, g)| open(g)) {
        let weight = u64::from(group.weight);
        if point < weight {
            return Some(index);
        }
        point -= weight;
    }
    None
}

/// The first backend id of `lookup` from `hash`'s slot on that `usable` accepts; the walk is
/// bounded, so a table whose backends were all tried gives none quickly.
pub fn walk(lookup: &[u32], hash: u32, usable: impl Fn(u32) -> bool) -> Option<u32> {
    let len = lookup.len();
    if len == 0 {
        return None;
    }
    let start = hash as usize % len;
    (0..len.min(4096))
        .map(|step| lookup[(start + step) % len])
        .find(|id| usable(*id))
}

/// The backends a lookup table holds, once each.
pub fn members(lookup: &[u32]) -> Vec<u32> {
    let members: BTreeSet<u32> = lookup.iter().copied().collect();
    members.into_iter().collect()
}

/// The most active connections one of `members` (a table's backends) may hold for a new
/// session to be placed on it: `factor` percent of their average with one more connection
/// than now, rounded up (consistent hashing with bounded loads, Mirrokni et al.), so some
/// backend is always under it.
pub fn load_limit(members: &[u32], loads: &HashMap<u32, u64>, factor: u32) -> u64 {
    if members.is_empty() {
        return 0;
    }
    let total: u64 = members
        .iter()
        .map(|id| loads.get(id).copied().unwrap_or(0))
        .sum();
    (u64::from(factor) * (total + 1)).div_ceil(100 * members.len() as u64)
}

#[derive(Clone, Copy)]
pub(super) struct Target {
    pub id: u32,
    pub addr: IpAddr,
    pub port: u16,
    /// The backend's name as cookies carry it.
    pub token: u32,
    /// The session's group and until when it stays there, for its cookie.
    pub group: Option<GroupPin>,
}

impl ServiceRuntime {
    pub(super) fn target(&self, backend: &BackendRuntime) -> Target {
        Target {
            id: backend.id,
            addr: backend.config.address,
            port: backend.config.port_for(&self.config),
            token: backend_token(&backend.config.name),
            group: None,
        }
    }
}

/// What a connection's cookie did to its placement.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Cookie {
    /// No cookie of the service's name.
    Absent,
    /// An application cookie's value, hashed into the lookup table.
    Hashed(String),
    /// A genuine balancer cookie naming a backend that keeps its sessions; `renew` when less
    /// than half its life is left (from unix second `renew_at` on), so an active session
    /// does not end at its first cookie's expiry.
    Session {
        backend: String,
        renew: bool,
        renew_at: u32,
    },
    /// A balancer cookie that counts as absent, by [`REJECTION_REASONS`] index.
    Rejected(usize),
    /// A genuine balancer cookie whose backend is down, on a service whose sessions return
    /// home: served elsewhere for now, its cookie left as it is.
    Away { home: String },
}

impl std::fmt::Display for Cookie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cookie::Absent => f.write_str("none"),
            Cookie::Hashed(value) => write!(f, "app {value}"),
            Cookie::Session { backend, renew, .. } => {
                write!(f, "session on {backend}")?;
                if *renew {
                    f.write_str(", renewed")?;
                }
                Ok(())
            }
            Cookie::Rejected(reason) => write!(f, "rejected ({})", REJECTION_REASONS[*reason]),
            Cookie::Away { home } => write!(f, "away from {home}"),
        }
    }
}

/// Why a connection has no backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unplaced {
    /// None left to try, or none takes new sessions.
    NoBackend,
    /// The service routes requests and none of its routes matches this one.
    NoRoute,
    /// The session's backend is down and the service holds its sessions for it
    /// (`on_backend_down` `keep` or `reject`): answered 503, to try again after so many
    /// seconds.
    Held { retry_after: u32 },
}

/// A connection's backend as [`choose`] found it, with what its cookie did, the route its
/// request took and the session settings that applied there.
pub(super) struct Choice<'s> {
    pub target: Target,
    pub cookie: Cookie,
    pub route: Option<Route<'s>>,
    pub sessions: &'s ServiceConfig,
}

/// The backend for a connection: the one a genuine balancer cookie names while it keeps its
/// sessions (up, or draining within the drain timeout), the one an application cookie's value
/// hashes to, else the service's fallback; backends already tried are skipped. A routed
/// request is read by its route's session settings.
pub(super) fn choose<'s>(
    service: &'s ServiceRuntime,
    asking: Asking<'_>,
    keys: &CookieKeys,
    now: u32,
) -> Result<Choice<'s>, Unplaced> {
    if service.lookup.is_empty() {
        return Err(Unplaced::NoBackend);
    }
    let route = route_of(&service.config, asking.request).map_err(|_| Unplaced::NoRoute)?;
    let sessions = service.config.sessions(route);
    let placing = Placing {
        service,
        asking,
        route,
        sessions,
        now,
    };
    let (target, cookie) = placing.choose(keys)?;
    Ok(Choice {
        target,
        cookie,
        route,
        sessions,
    })
}

/// The connection asking for a backend: its client, its request as read so far and the
/// backends it tried already.
#[derive(Clone, Copy)]
pub(super) struct Asking<'a> {
    pub key: &'a FlowKey,
    pub client: IpAddr,
    pub request: &'a [u8],
    pub tried: &'a [u32],
}

/// A request being placed: its connection, its route and the session settings that apply.
struct Placing<'a> {
    service: &'a ServiceRuntime,
    asking: Asking<'a>,
    route: Option<Route<'a>>,
    sessions: &'a ServiceConfig,
    now: u32,
}

/// What a genuine cookie's session gets.
enum ByCookie {
    /// This backend, and what the cookie did.
    Served(Target, Cookie),
    /// A place as a connection without a session gets, the cookie having done this.
    Afresh(Cookie),
}

/// The session a cookie carries: its backend's token, whether to renew the cookie (less
/// than half its life left, so an active session does not end at its first cookie's
/// expiry) and the session's group pin.
#[derive(Clone, Copy)]
struct CookieSession {
    token: u32,
    renew: bool,
    /// Unix second from which the cookie is renewed.
    renew_at: u32,
    pin: Option<GroupPin>,
}

/// A group a session stays in, with its pin (none on a route, which keeps it there).
type Home = Option<(usize, Option<GroupPin>)>;

impl Placing<'_> {
    fn choose(&self, keys: &CookieKeys) -> Result<(Target, Cookie), Unplaced> {
        let sessions = self.sessions;
        let request = &self.asking.request;
        let value = session_cookie(sessions, request).map(|(_, value)| value);
        let mut home = None;
        let cookie = match value {
            None => Cookie::Absent,
            Some(value) => match self.session_of(keys, &value) {
                // The application's own value, set before the balancer prefixed it.
                None if sessions.rewritten_cookie().is_some() => Cookie::Absent,
                None => Cookie::Hashed(value),
                Some(Err(reason)) => Cookie::Rejected(reason),
                Some(Ok(session)) => {
                    home = self.home_of(session.pin);
                    match self.by_cookie(session, home, &value)? {
                        ByCookie::Served(target, cookie) => return Ok((target, cookie)),
                        ByCookie::Afresh(cookie) => cookie,
                    }
                }
            },
        };
        // A routed request is placed in its route's group alone, without a pin: the route,
        // not the weights, keeps it there.
        let (home, confined) = match self.route {
            Some(route) => (Some((route.group, None)), true),
            None => (home, false),
        };
        let target = self
            .place(&cookie, home, confined)
            .ok_or(Unplaced::NoBackend)?;
        Ok((target, cookie))
    }

    /// The session a signed or rewritten cookie's value carries; `None` for an
    /// application's plain value, `Err` with the [`REJECTION_REASONS`] index of a refused
    /// signed one.
    fn session_of(&self, keys: &CookieKeys, value: &str) -> Option<Result<CookieSession, usize>> {
        let sessions = self.sessions;
        if sessions.balancer_cookie().is_some() {
            let half_life = sessions.cookie_duration / 2;
            let opened = keys
                .open(&sessions.name, value, self.now)
                .map(|session| CookieSession {
                    token: session.token,
                    renew: session.expires - self.now < half_life,
                    renew_at: session.expires - half_life,
                    pin: session.group,
                });
            Some(opened.map_err(|r| r as usize))
        } else if sessions.rewritten_cookie().is_some() {
            rewrite::split(value).map(|(token, _)| {
                Ok(CookieSession {
                    token,
                    renew: false,
                    renew_at: u32::MAX,
                    pin: None,
                })
            })
        } else {
            None
        }
    }

    /// The group a session's pin still keeps it in.
    fn home_of(&self, pin: Option<GroupPin>) -> Home {
        let pin = pin.filter(|p| p.until > self.now)?;
        let groups = &self.service.groups;
        let group = groups.iter().position(|g| g.token == pin.token)?;
        Some((group, Some(pin)))
    }

    /// The session of a genuine cookie naming backend `token`: served there while it is
    /// usable; when its checks failed, held, served elsewhere (`return_home`) or moved as
    /// the service's policy says.
    fn by_cookie(
        &self,
        session: CookieSession,
        home: Home,
        value: &str,
    ) -> Result<ByCookie, Unplaced> {
        let (service, tried) = (self.service, self.asking.tried);
        let unusable = ByCookie::Afresh(Cookie::Rejected(BACKEND_UNUSABLE));
        let named = |b: &&BackendRuntime| backend_token(&b.config.name) == session.token;
        let Some(backend) = service.backends.iter().find(named) else {
            return Ok(unusable);
        };
        let route_group = self.route.map(|r| r.group);
        // Another route's session (another application's backend): this request starts
        // one of its own.
        if route_group.is_some() && backend.config.group != route_group {
            return Ok(ByCookie::Afresh(Cookie::Absent));
        }
        if tried.contains(&backend.id) {
            return Ok(unusable);
        }
        if backend.state(service.drain_timeout()) != backend_state::DOWN {
            return Ok(self.on_its_backend(backend, session, home));
        }
        if backend.healthy {
            return Ok(unusable);
        }
        let config = &service.config;
        let waited = backend.down_since.map_or(Duration::ZERO, |t| t.elapsed());
        let held = match config.on_backend_down {
            OnBackendDown::Reject => true,
            OnBackendDown::Keep => waited.as_secs() < u64::from(config.keep_timeout),
            OnBackendDown::Failover => false,
        };
        if held {
            return Err(Unplaced::Held {
                retry_after: recovery_seconds(config),
            });
        }
        if !config.return_home {
            return Ok(unusable);
        }
        // Served meanwhile by the backend its cookie's value hashes to, the same on every
        // request; the cookie keeps naming its own, which it goes back to once it recovers.
        let hashed = Cookie::Hashed(value.to_owned());
        let target = self
            .place(&hashed, home, false)
            .ok_or(Unplaced::NoBackend)?;
        let away = Cookie::Away {
            home: backend.config.name.clone(),
        };
        Ok(ByCookie::Served(target, away))
    }

    /// A session on a usable backend: served there, unless it belongs to another group
    /// than the one its pin keeps it in, or, its time in the group over, the weights of now
    /// send it to another group.
    fn on_its_backend(
        &self,
        backend: &BackendRuntime,
        cookie: CookieSession,
        home: Home,
    ) -> ByCookie {
        let service = self.service;
        let renew = cookie.renew;
        let session = |renew| Cookie::Session {
            backend: backend.config.name.clone(),
            renew,
            renew_at: cookie.renew_at,
        };
        let mut target = service.target(backend);
        if service.groups.is_empty() || self.route.is_some() {
            return ByCookie::Served(target, session(renew));
        }
        match home {
            Some((group, pin)) if backend.config.group == Some(group) => {
                target.group = pin;
                ByCookie::Served(target, session(renew))
            }
            Some(_) => ByCookie::Afresh(Cookie::Rejected(BACKEND_UNUSABLE)),
            None => {
                // Its time in the group is over: the session picks a group as a new one
                // would, and stays on its backend if that is the group.
                let hash = self.fallback_hash(&Cookie::Absent);
                let group = pick_group(&service.groups, hash);
                if group.is_some() && backend.config.group == group {
                    target.group = group.map(|g| service.pin(g, self.now));
                    return ByCookie::Served(target, session(true));
                }
                ByCookie::Afresh(Cookie::Absent)
            }
        }
    }

    /// What places a connection without a usable session: an application cookie's value,
    /// the client's masked address or the flow, as `cookie_fallback` says.
    fn fallback_hash(&self, cookie: &Cookie) -> u32 {
        match (cookie, self.sessions.cookie_fallback) {
            (Cookie::Hashed(value), _) => value_hash(value.as_bytes()),
            (_, CookieFallback::SourceIp) => {
                let mask = self.service.config.source_mask();
                client_hash(&Addr::from(self.asking.client).masked(&mask))
            }
            (_, CookieFallback::Flow) => flow_hash(self.asking.key),
        }
    }

    /// A backend for a connection without a usable session, by its fallback hash, skipping
    /// the backends it tried: in its `home` group (while its session stays there, or its
    /// route's), else in a group picked by weight; from the whole table without groups or
    /// once the group's backends were all tried, unless `confined` to its home.
    fn place(&self, cookie: &Cookie, home: Home, confined: bool) -> Option<Target> {
        let service = self.service;
        let hash = self.fallback_hash(cookie);
        let untried = |id: u32| !self.asking.tried.contains(&id);
        // Bounded load: the first backend from the hash's slot under the bound, if any is.
        let walk = |lookup: &[u32], members: &[u32]| {
            let bounded = service.config.balance_factor.and_then(|factor| {
                let limit = load_limit(members, &service.loads, factor);
                let light = |id: u32| service.loads.get(&id).copied().unwrap_or(0) < limit;
                walk(lookup, hash, |id| untried(id) && light(id))
            });
            bounded.or_else(|| walk(lookup, hash, untried))
        };
        let in_group = |(group, pin): (usize, Option<GroupPin>)| {
            let group = &service.groups[group];
            let id = walk(&group.lookup, &group.members)?;
            Some((id, pin))
        };
        let chosen = home.and_then(in_group);
        let (id, pin) = if confined {
            chosen?
        } else {
            chosen
                .or_else(|| {
                    let group = pick_group(&service.groups, hash)?;
                    in_group((group, Some(service.pin(group, self.now))))
                })
                .or_else(|| Some((walk(&service.lookup, &service.members)?, None)))?
        };
        let backend = service.backends.iter().find(|b| b.id == id)?;
        let mut target = service.target(backend);
        target.group = match (pin, confined) {
            (Some(pin), _) => Some(pin),
            (None, true) => None,
            (None, false) => backend.config.group.map(|g| service.pin(g, self.now)),
        };
        Some(target)
    }
}

/// The route `request` takes, reading its head only when the service has routes.
fn route_of<'a>(
    service: &'a ServiceConfig,
    request: &[u8],
) -> Result<Option<Route<'a>>, crate::config::NoRoute> {
    if service.routes.is_empty() {
        return Ok(None);
    }
    let (host, path) = http::host_and_path(request);
    service.route(host.as_deref(), &path)
}

/// Seconds a failed backend takes at least to count as up again (its checks' interval times
/// `rise`), for a held session's `Retry-After`.
fn recovery_seconds(config: &ServiceConfig) -> u32 {
    config
        .health_check
        .as_ref()
        .map_or(5, |check| {
            (check.interval * f64::from(check.rise)).ceil() as u32
        })
        .max(1)
}

impl ServiceRuntime {
    /// A session's pin to group `group` from `now` on.
    fn pin(&self, group: usize, now: u32) -> GroupPin {
        GroupPin {
            token: self.groups[group].token,
            until: now.saturating_add(self.config.group_stickiness()),
        }
    }
}

/// What the connection's first response head gets: the balancer's cookie (and its
/// cross-origin variant) naming the chosen backend, unless the request's cookie already
/// names it with more than half its life left; in companion mode, whenever the application
/// sets its cookie; in rewrite mode, the prefix on the application's cookie, re-issued when
/// the session moved, and the end of the connection. A routed session's cookie goes back to
/// its route alone (its `Path`): two applications on one host keep cookies of their own.
pub(super) fn issue(choice: &Choice<'_>, keys: &CookieKeys, request: &[u8]) -> Option<Issue> {
    let (service, target, cookie) = (choice.sessions, choice.target, &choice.cookie);
    let cookie_path = choice.route.map_or("/", |r| r.path);
    if let Some(app) = service.rewritten_cookie() {
        let prefix = rewrite::prefix(target.token);
        let moved = cookie_value(request, app).and_then(|value| {
            let (token, own) = rewrite::split(&value)?;
            (token != target.token).then(|| format!("Set-Cookie: {app}={prefix}{own}; Path=/\r\n"))
        });
        return Some(Issue {
            lines: moved.unwrap_or_default(),
            own: app.to_owned(),
            prefix: Some((app.to_owned(), prefix)),
            close: true,
            ..Issue::default()
        });
    }
    let own = service.balancer_cookie()?;
    if matches!(cookie, Cookie::Away { .. }) {
        return None;
    }
    let companion_of = service.companion_of();
    if companion_of.is_none() && matches!(cookie, Cookie::Session { renew: false, .. }) {
        return None;
    }
    // A companion follows the application's cookie; one that named a backend no longer
    // usable (or was rejected) is issued again for a request that still carries it.
    let when_set = companion_of.and_then(|app| {
        let moved = matches!(cookie, Cookie::Rejected(_)) && cookie_value(request, app).is_some();
        (!moved).then(|| app.to_owned())
    });
    let duration = service.cookie_duration;
    let value = keys.seal(
        &service.name,
        target.token,
        unix_now().saturating_add(duration),
        target.group,
    )?;
    let mut lines =
        format!("Set-Cookie: {own}={value}; Max-Age={duration}; Path={cookie_path}; HttpOnly\r\n");
    if let Some(cors) = service.cors_cookie_name() {
        lines += &format!(
            "Set-Cookie: {cors}={value}; Max-Age={duration}; Path={cookie_path}; HttpOnly; SameSite=None; Secure\r\n"
        );
    }
    Some(Issue {
        lines,
        own: own.to_owned(),
        when_set,
        ..Issue::default()
    })
}

pub(super) fn unix_now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32)
}

/// The name and value of the cookie that places a request: the balancer's (or the
/// application's) cookie, its cross-origin variant, which carries the same value for
/// requests that only send it, or the URL parameter.
pub(super) fn session_cookie(sessions: &ServiceConfig, request: &[u8]) -> Option<(String, String)> {
    let named = |name: &str, value: Option<String>| value.map(|v| (name.to_owned(), v));
    sessions
        .cookie_name()
        .and_then(|name| named(name, cookie_value(request, name)))
        .or_else(|| {
            let name = sessions.cors_cookie_name()?;
            named(&name, cookie_value(request, &name))
        })
        .or_else(|| {
            let name = sessions.url_param()?;
            named(name, http::url_param(request, name))
        })
}

/// The value of cookie `name` in the request head's `Cookie` headers.
pub(super) fn cookie_value(request: &[u8], name: &str) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    // A partial head (too large) still has its complete header lines parsed.
    let _ = parsed.parse(request);
    parsed
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
        .flat_map(|h| std::str::from_utf8(h.value).unwrap_or("").split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

/// FNV-1a of a cookie value folded to 32 bits, finalised with the flow hash's mixer.
fn value_hash(value: &[u8]) -> u32 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in value {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix((h ^ (h >> 32)) as u32 ^ 0x5bd1_e995)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, weight: u32, backend: u32) -> GroupRuntime {
        GroupRuntime {
            lookup: vec![backend; 7],
            ..GroupRuntime::new(name, weight)
        }
    }

    #[test]
    fn groups_take_new_sessions_in_proportion_to_their_weights() {
        let groups = [group("blue", 90, 1), group("green", 10, 2)];
        let mut green = 0;
        for hash in 0..100_000u32 {
            if pick_group(&groups, mix(hash)) == Some(1) {
                green += 1;
            }
        }
        assert!(
            (9_500..10_500).contains(&green),
            "green took {green} of 100000"
        );
    }

    #[test]
    fn a_group_without_weight_or_serving_backends_takes_none() {
        let mut groups = [group("blue", 0, 1), group("green", 10, 2)];
        assert!((0..1000).all(|h| pick_group(&groups, h) == Some(1)));
        groups[1].lookup.clear();
        assert_eq!(pick_group(&groups, 5), None);
    }

    #[test]
    fn the_load_limit_is_the_factor_of_the_average_with_the_next_connection() {
        let members = members(&[1, 2, 3, 1, 2, 3]);
        assert_eq!(members, [1, 2, 3]);
        let loads = HashMap::from([(1, 10), (2, 5), (3, 0)]);
        // (10 + 5 + 0 + 1) / 3 * 1.25 = 6.67, rounded up.
        assert_eq!(load_limit(&members, &loads, 125), 7);
        assert_eq!(load_limit(&members, &HashMap::new(), 125), 1);
        assert_eq!(load_limit(&[], &loads, 125), 0);
    }

    #[test]
    fn weights_in_the_service_table_are_the_product_of_the_shares() {
        // Blue 90 over two equal backends, green 10 over one.
        assert_eq!(weight_in_service(1, 2, 90, 100), 4500);
        assert_eq!(weight_in_service(1, 1, 10, 100), 1000);
        assert_eq!(weight_in_service(1, 1000, 1, 10_000), 1);
        assert_eq!(weight_in_service(1, 1, 0, 100), 0);
        assert_eq!(weight_in_service(0, 1, 50, 100), 0);
    }

    #[test]
    fn cookie_values_are_found_among_several_cookies_and_headers() {
        let head =
            b"GET / HTTP/1.1\r\nHost: x\r\nCookie: a=1; SID=abc123 ; b=2\r\nCookie: c=3\r\n\r\n";
        assert_eq!(cookie_value(head, "SID").as_deref(), Some("abc123"));
        assert_eq!(cookie_value(head, "c").as_deref(), Some("3"));
        assert_eq!(cookie_value(head, "sid"), None, "names are case-sensitive");
        assert_eq!(
            cookie_value(b"GET / HTTP/1.1\r\nCookie: SID=\r\n\r\n", "SID"),
            None
        );
        assert_eq!(cookie_value(b"garbage\x00\xff", "SID"), None);
    }

    #[test]
    fn cookie_values_hash_stably() {
        assert_eq!(value_hash(b"abc123"), value_hash(b"abc123"));
        assert_ne!(value_hash(b"abc123"), value_hash(b"abc124"));
    }
}
