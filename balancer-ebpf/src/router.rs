//! A trivial XDP router, for `cargo xtask bench` only: the kernel FIB picks the next hop and
//! the frame leaves through `bpf_redirect`, nothing else. It is the ceiling of any XDP
//! balancer on the lab's path (what parsing, lookups and rewrites cost comes on top), so the
//! bench reports the balancer against it as well as against plain kernel routing.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, helpers::bpf_redirect, macros::xdp, programs::XdpContext};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

#[path = "fib.rs"]
mod fib;

#[xdp]
pub fn router(ctx: XdpContext) -> u32 {
    route(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

/// The redirect of an IPv4 frame the FIB can route; `None` leaves it to the kernel.
#[inline(always)]
fn route(ctx: &XdpContext) -> Option<u32> {
    let start = ctx.data();
    if start + EthHdr::LEN + Ipv4Hdr::LEN > ctx.data_end() {
        return None;
    }
    // SAFETY: both headers lie inside the frame (checked above).
    let (eth, ip) = unsafe {
        (
            &mut *(start as *mut EthHdr),
            &mut *((start + EthHdr::LEN) as *mut Ipv4Hdr),
        )
    };
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return None;
    }
    match fib::next_hop(ctx, eth, ip) {
        // SAFETY: a helper taking plain values.
        fib::Hop::Via(ifindex) => Some(unsafe { bpf_redirect(ifindex, 0) } as u32),
        fib::Hop::Expired | fib::Hop::Unknown => None,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
