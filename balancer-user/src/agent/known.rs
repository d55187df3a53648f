//! Sessions XDP binds without the agent. When the agent binds a connection by a genuine
//! balancer cookie that needs no new one, or by an application cookie's hashed value, it
//! leaves XDP the cookie's bytes (`name=value`) and the backend (`KnownSession`, by client
//! address and service). The client's next connections whose first segment carries the whole
//! request head with those bytes, where the cookie's first four bytes first appear, go to
//! that backend without the agent, while the service is unchanged (its generation), the
//! backend up, and until the cookie is due for renewal (see the XDP program's `bind`).
//!
//! New sessions likewise: when the agent starts a session for a request without a cookie,
//! the cookie lines it issues name the backend and the expiry alone, so it leaves them to
//! XDP for that backend (`SessionStart`). XDP then binds requests that carry no cookie of
//! the service's name to the backend the cookie fallback places them on and puts the same
//! lines into their first response heads, until the agent's issue is due again or the
//! service changes.
//!
//! XDP does not parse the head: the bytes it finds may stand in a URL parameter or another
//! header rather than the `Cookie` header the agent reads. They are then still a cookie
//! value the balancer placed this client by; only a client crafting its own requests can
//! make the two differ, and only for its own connections.

use balancer_common::{HeadInsert, KnownSession, SessionStart, MAX_KNOWN_COOKIE};
use bytemuck::Zeroable;

use super::placement::{session_cookie, unix_now, Choice, Cookie};
use crate::{config::AffinityMode, connections::ConnectionMaps, dataplane::monotonic_seconds};

/// The bytes of a cookie XDP searches a request for (see the XDP program's `bind`): shorter
/// cookies are left to the agent.
const COOKIE_PREFIX: usize = 4;
/// How long XDP binds by one known session at most before the agent decides again.
const KNOWN_SESSION_TTL_S: u32 = 60;
/// How long XDP starts sessions with one issue of a backend's cookie lines. Their cookie's
/// signed expiry then comes up to this much before its `Max-Age` ends; a session renews its
/// cookie at half its life, long before.
const SESSION_START_TTL_S: u32 = 10;

/// What XDP may bind the client's next connections by, when `choice` came from a genuine
/// cookie that needs no new one or from an application cookie's hashed value (without
/// bounded loads), outside routes and groups (whose placement reads more than the cookie), in
/// the service's `generation`. The caller checks that the request reaches the backend unchanged.
pub(super) fn session(
    choice: &Choice<'_>,
    request: &[u8],
    generation: u32,
) -> Option<KnownSession> {
    let for_s = match choice.cookie {
        Cookie::Session {
            renew: false,
            renew_at,
            ..
        } => renew_at.saturating_sub(unix_now()).min(KNOWN_SESSION_TTL_S),
        // Bounded loads move a hashed value off a backend over its bound.
        Cookie::Hashed(_) if choice.sessions.balance_factor.is_none() => KNOWN_SESSION_TTL_S,
        _ => return None,
    };
    if for_s == 0 || choice.route.is_some() || choice.target.group.is_some() {
        return None;
    }
    let (name, value) = session_cookie(choice.sessions, request)?;
    let cookie = format!("{name}={value}");
    let len = cookie.len();
    if !(COOKIE_PREFIX..=MAX_KNOWN_COOKIE).contains(&len) {
        return None;
    }
    let mut session = KnownSession::zeroed();
    session.cookie[..len].copy_from_slice(cookie.as_bytes());
    session.len = len as u16;
    session.backend_id = choice.target.id;
    session.until_s = monotonic_seconds().wrapping_add(for_s);
    session.generation = generation;
    Some(session)
}

/// What XDP may start the sessions of requests without a cookie by, when `choice` started one
/// so in an lb-cookie service, outside routes and groups and without bounded loads (the
/// cookie fallback's table alone places them, as in XDP), with `lines` in the first response
/// head, in the service's `generation`: not where XDP's search for the cookie's name could
/// miss a cookie the agent places by (a name under three bytes, a cross-origin variant of
/// another name). The caller checks that the request reaches the backend unchanged.
pub(super) fn session_start(
    choice: &Choice<'_>,
    lines: &HeadInsert,
    generation: u32,
) -> Option<SessionStart> {
    let sessions = choice.sessions;
    let plain = matches!(choice.cookie, Cookie::Absent)
        && sessions.affinity == AffinityMode::LbCookie
        && sessions.balance_factor.is_none()
        && choice.route.is_none()
        && choice.target.group.is_none();
    let name = sessions.balancer_cookie().filter(|_| plain)?;
    // The prefix XDP searches for: the name's first bytes, or all of it with the `=`. The
    // cross-origin variant, which places a request too, must start with them.
    let named = format!("{name}=");
    let prefix: [u8; COOKIE_PREFIX] = named.as_bytes().get(..COOKIE_PREFIX)?.try_into().ok()?;
    if sessions
        .cors_cookie_name()
        .is_some_and(|cors| !cors.as_bytes().starts_with(&prefix))
    {
        return None;
    }
    let mut start = SessionStart::zeroed();
    start.lines = HeadInsert {
        max_payload: 0,
        status_len: 0,
        ..*lines
    };
    start.name_prefix = prefix;
    start.generation = generation;
    start.until_s = monotonic_seconds().wrapping_add(SESSION_START_TTL_S);
    Some(start)
}

/// The backends (by id) a worker left XDP cookie lines to start sessions with, with the
/// service generation and until when.
#[derive(Default)]
pub(super) struct SessionStarts(foldhash::HashMap<u32, (u32, u32)>);

impl SessionStarts {
    /// Leaves XDP the cookie lines to start sessions on backend `backend` with, unless what
    /// this worker left there last is of the same service generation and far from its end.
    pub fn start(&mut self, maps: &mut ConnectionMaps, backend: u32, start: &SessionStart) {
        let half_life = (SESSION_START_TTL_S / 2) as i32;
        let now = monotonic_seconds();
        let current = self.0.get(&backend).is_some_and(|&(generation, until)| {
            generation == start.generation && until.wrapping_sub(now) as i32 > half_life
        });
        if !current {
            maps.start_sessions(backend, start);
            self.0.insert(backend, (start.generation, start.until_s));
        }
    }

    /// Stops XDP starting sessions on backend `backend` (it refused or did not answer a SYN,
    /// or answered one as XDP cannot record), whichever worker had it do so.
    pub fn stop(&mut self, maps: &mut ConnectionMaps, backend: u32) {
        self.0.remove(&backend);
        maps.stop_sessions(backend);
    }
}
