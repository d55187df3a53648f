//! What the agent tells the data plane in `AGENT`: that it is there to bind cookie
//! connections (a heartbeat every fraction of a second; one older than the timeout means it is
//! gone, crashed, stopped or restarting, and cookie services answer new connections without
//! it), and which interface faces which side.

use aya_ebpf::programs::XdpContext;
use balancer_common::DEFAULT_AGENT_TIMEOUT_S;

use crate::maps::AGENT;

/// Seconds without a heartbeat after which the agent counts as gone.
const AGENT_TIMEOUT_S: u32 = match option_env!("BALANCER_AGENT_TIMEOUT_S") {
    Some(text) => parse_seconds(text),
    None => DEFAULT_AGENT_TIMEOUT_S,
};

/// Whether the agent wrote its heartbeat within the timeout of `now_s`.
#[inline(always)]
pub fn present(now_s: u32) -> bool {
    AGENT
        .get(0)
        .is_some_and(|agent| now_s.wrapping_sub(agent.heartbeat_s) <= AGENT_TIMEOUT_S)
}

/// Seconds a client may take between its handshake and its request.
#[inline(always)]
pub fn request_timeout_s() -> u32 {
    AGENT
        .get(0)
        .map_or(u32::MAX, |agent| agent.request_timeout_s)
}

/// Whether the packet came in on the client interface of a balancer whose clients and
/// backends are on different interfaces: no backend's reply can come from there.
#[inline(always)]
pub fn from_client_side(ctx: &XdpContext) -> bool {
    // SAFETY: reading the context's ingress interface index.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    AGENT.get(0).is_some_and(|agent| {
        agent.client_ifindex != agent.backend_ifindex && ingress == agent.client_ifindex
    })
}

/// A decimal number of seconds, at compile time.
const fn parse_seconds(text: &str) -> u32 {
    let bytes = text.as_bytes();
    assert!(!bytes.is_empty(), "BALANCER_AGENT_TIMEOUT_S is empty");
    let mut value = 0u32;
    let mut i = 0;
    while i < bytes.len() {
        assert!(
            bytes[i].is_ascii_digit(),
            "BALANCER_AGENT_TIMEOUT_S must be a number of seconds"
        );
        value = value * 10 + (bytes[i] - b'0') as u32;
        i += 1;
    }
    value
}
