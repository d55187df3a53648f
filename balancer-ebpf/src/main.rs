//! XDP entry point of the balancer: L4 gateway NAT for virtual IPs.
//!
//! Client → VIP packets are rewritten to a backend and redirected; the backend's replies are
//! rewritten back to the VIP. Everything else is left to the host. Every exit is counted under
//! one [`Reason`](balancer_common::Reason) in `STATS`.
#![no_std]
#![feature(core_intrinsics)]
#![allow(internal_features)]
#![no_main]

mod agent;
mod bind;
mod choose;
mod dispatch;
mod fib;
mod forward;
mod full_nat;
mod handshake;
mod head;
mod maps;
mod nat;
mod packet;
mod proxy;
mod punt;
mod replay;
mod reply;
mod reset;
mod source;
mod splice;
mod stats;
mod synack;
mod tcp_options;

use aya_ebpf::{macros::xdp, programs::XdpContext};

use balancer_common::Reason;

use crate::stats::{Direction, Verdict};

/// The entry point, written out rather than by `#[xdp]`, whose inner function would be a
/// BPF subprogram: the kernel allows full NAT's tail call only from the program itself.
#[unsafe(no_mangle)]
#[unsafe(link_section = "xdp")]
pub extern "C" fn balancer(raw: *mut aya_ebpf::bindings::xdp_md) -> u32 {
    let ctx = XdpContext::new(raw);
    let verdict = match try_balancer(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    };
    stats::count(verdict.reason, ctx.data_end() - ctx.data());
    verdict.action
}

#[inline(always)]
fn try_balancer(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let packet = packet::parse(ctx)?;
    if let Some((reason, backend_id)) = dispatch::to_backend(ctx, &packet)? {
        stats::count_backend(
            backend_id,
            Direction::ToBackend,
            ctx.data_end() - ctx.data(),
        );
        return forward::redirect(ctx, &packet, reason);
    }
    if let Some((reason, backend_id)) = dispatch::to_client(ctx, &packet)? {
        stats::count_backend(backend_id, Direction::ToClient, ctx.data_end() - ctx.data());
        return forward::redirect(ctx, &packet, reason);
    }
    nat::forget_reused_tuple(&packet);
    Err(Verdict::pass(Reason::PassNotService))
}

/// Full NAT's placement of a new flow, reached by a tail call from `balancer` (see
/// `full_nat`).
#[xdp]
pub fn balancer_full_nat(ctx: XdpContext) -> u32 {
    let verdict = match full_nat::place(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    };
    stats::count(verdict.reason, ctx.data_end() - ctx.data());
    verdict.action
}

/// The cookie lines put into a first response head, reached by a tail call from `balancer`
/// (see `head`).
#[xdp]
pub fn balancer_response_head(ctx: XdpContext) -> u32 {
    let verdict = match head::edit(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    };
    stats::count(verdict.reason, ctx.data_end() - ctx.data());
    verdict.action
}

/// The backend's SYN-ACK answered with the replay, reached by a tail call from `balancer`
/// (see `replay`).
#[xdp]
pub fn balancer_replay(ctx: XdpContext) -> u32 {
    let verdict = match replay::answer(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    };
    stats::count(verdict.reason, ctx.data_end() - ctx.data());
    verdict.action
}

/// A returning session's connection bound without the agent, reached by a tail call from
/// `balancer` (see `bind`).
#[xdp]
pub fn balancer_bind(ctx: XdpContext) -> u32 {
    let verdict = bind::connect(&ctx);
    stats::count(verdict.reason, ctx.data_end() - ctx.data());
    verdict.action
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
