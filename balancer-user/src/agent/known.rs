//! Sessions XDP binds without the agent. When the agent binds a connection by a genuine
//! balancer cookie that needs no new one, or by an application cookie's hashed value, it
//! leaves XDP the cookie's bytes (`name=value`) and the backend (`KnownSession`, by client
//! address and service). The client's next connections whose first segment carries the whole
//! request head with those bytes, where the cookie's first four bytes first appear, go to
//! that backend without the agent, while the service is unchanged (its generation), the
//! backend up, and until the cookie is due for renewal (see the XDP program's `bind`).
//!
//! XDP does not parse the head: the bytes it finds may stand in a URL parameter or another
//! header rather than the `Cookie` header the agent reads. They are then still a cookie
//! value the balancer placed this client by; only a client crafting its own requests can
//! make the two differ, and only for its own connections.

use balancer_common::{KnownSession, MAX_KNOWN_COOKIE};
use bytemuck::Zeroable;

use super::placement::{session_cookie, unix_now, Choice, Cookie};
use crate::dataplane::monotonic_seconds;

/// The bytes of a cookie XDP searches a request for (see the XDP program's `bind`): shorter
/// cookies are left to the agent.
const COOKIE_PREFIX: usize = 4;
/// How long XDP binds by one known session at most before the agent decides again.
const KNOWN_SESSION_TTL_S: u32 = 60;

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
