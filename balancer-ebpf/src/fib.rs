//! The next hop of an IPv4 packet from the kernel FIB: the lookup, the TTL decrement and the
//! Ethernet addresses of the hop. Shared by the balancer and the bench's trivial router.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use balancer_common::csum;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

const AF_INET: u8 = 2;

pub enum Hop {
    /// The TTL runs out here: the host stack answers with ICMP time exceeded.
    Expired,
    /// The FIB has no complete answer (no route, or the neighbour is not resolved yet).
    Unknown,
    /// Leave through this interface; the frame is ready for it.
    Via(u32),
}

/// Routes the frame: on success its TTL is one less and its MAC addresses are the hop's.
#[inline(always)]
pub fn next_hop(ctx: &XdpContext, eth: &mut EthHdr, ip: &mut Ipv4Hdr) -> Hop {
    if ip.ttl <= 1 {
        return Hop::Expired;
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
        return Hop::Unknown;
    }
    let old_word = u16::from_ne_bytes([ip.ttl, ip.proto as u8]);
    ip.ttl -= 1;
    let new_word = u16::from_ne_bytes([ip.ttl, ip.proto as u8]);
    ip.check = csum::replace16(u16::from_ne_bytes(ip.check), old_word, new_word).to_ne_bytes();
    eth.dst_addr = fib.dmac;
    eth.src_addr = fib.smac;
    Hop::Via(fib.ifindex)
}
