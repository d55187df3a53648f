//! A trivial XDP router, for `cargo xtask bench` only: the kernel FIB picks the next hop and
//! the frame leaves through `bpf_redirect`, nothing else. It is the ceiling of any XDP
//! balancer on the lab's path (what parsing, lookups and rewrites cost comes on top), so the
//! bench reports the balancer against it as well as against plain kernel routing.
#![no_std]
#![no_main]

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    macros::xdp,
    programs::XdpContext,
};
use balancer_common::csum;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

const AF_INET: u8 = 2;

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
    if eth.ether_type != EtherType::Ipv4 as u16 || ip.ttl <= 1 {
        return None;
    }
    // SAFETY: `bpf_fib_lookup` is plain data; all-zero is its documented initial state.
    let mut fib: bpf_fib_lookup = unsafe { zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = ip.proto as u8;
    fib.__bindgen_anon_1.tot_len = ip.tot_len();
    fib.__bindgen_anon_2.tos = ip.tos;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src_addr);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst_addr);
    // SAFETY: reading the context's ingress interface index.
    fib.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    // SAFETY: `fib` is a valid `bpf_fib_lookup` of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.ctx.cast(),
            &mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return None;
    }
    let old_word = u16::from_ne_bytes([ip.ttl, ip.proto as u8]);
    ip.ttl -= 1;
    let new_word = u16::from_ne_bytes([ip.ttl, ip.proto as u8]);
    ip.check = csum::replace16(u16::from_ne_bytes(ip.check), old_word, new_word).to_ne_bytes();
    eth.dst_addr = fib.dmac;
    eth.src_addr = fib.smac;
    // SAFETY: a helper taking plain values.
    Some(unsafe { bpf_redirect(fib.ifindex, 0) } as u32)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
