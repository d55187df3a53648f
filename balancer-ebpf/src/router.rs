//! A trivial XDP router, for `cargo xtask bench` only: the kernel FIB picks the next hop and
//! the frame leaves through `bpf_redirect`, nothing else. It is the ceiling of any XDP
//! balancer on the lab's path (what parsing, lookups and rewrites cost comes on top), so the
//! bench reports the balancer against it as well as against plain kernel routing.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, helpers::bpf_redirect, macros::xdp, programs::XdpContext};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};

#[path = "fib.rs"]
mod fib;

#[xdp]
pub fn router(ctx: XdpContext) -> u32 {
    route(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

/// The redirect of an IPv4 or IPv6 frame the FIB can route; `None` leaves it to the kernel.
#[inline(always)]
fn route(ctx: &XdpContext) -> Option<u32> {
    let start = ctx.data();
    if start + EthHdr::LEN > ctx.data_end() {
        return None;
    }
    // SAFETY: the Ethernet header lies inside the frame (checked above).
    let eth = unsafe { &mut *(start as *mut EthHdr) };
    let ip_start = start + EthHdr::LEN;
    let hop = if eth.ether_type == EtherType::Ipv4 as u16 {
        if ip_start + Ipv4Hdr::LEN > ctx.data_end() {
            return None;
        }
        // SAFETY: the IPv4 header lies inside the frame (checked above).
        fib::next_hop_v4(ctx, eth, unsafe { &mut *(ip_start as *mut Ipv4Hdr) })
    } else if eth.ether_type == EtherType::Ipv6 as u16 {
        if ip_start + Ipv6Hdr::LEN > ctx.data_end() {
            return None;
        }
        // SAFETY: the IPv6 header lies inside the frame (checked above).
        fib::next_hop_v6(ctx, eth, unsafe { &mut *(ip_start as *mut Ipv6Hdr) })
    } else {
        return None;
    };
    match hop {
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
