//! The next hop of an IPv4 or IPv6 packet from the kernel FIB: the lookup, the TTL or hop
//! limit decrement and the Ethernet addresses of the hop. Shared by the balancer and the
//! bench's trivial router.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use balancer_common::csum;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

pub enum Hop {
    /// The TTL runs out here: the host stack answers with ICMP time exceeded.
    Expired,
    /// The FIB has no complete answer (no route, or the neighbour is not resolved yet).
    Unknown,
    /// Leave through this interface; the frame is ready for it.
    Via(u32),
}

/// Routes an IPv4 frame: on success its TTL is one less and its MAC addresses are the hop's.
#[inline(always)]
pub fn next_hop_v4(ctx: &XdpContext, eth: &mut EthHdr, ip: &mut Ipv4Hdr) -> Hop {
    if ip.ttl <= 1 {
        return Hop::Expired;
    }
    // SAFETY: `bpf_fib_lookup` is plain data; all-zero is its documented initial state.
    let mut fib: bpf_fib_lookup = unsafe { zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = ip.proto;
    fib.__bindgen_anon_1.tot_len = ip.tot_len();
    fib.__bindgen_anon_2.tos = ip.tos;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src_addr);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst_addr);
    let Some(ifindex) = lookup(ctx, &mut fib, eth) else {
        return Hop::Unknown;
    };
    let old_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    let new_word = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.check = csum::replace16(u16::from_ne_bytes(ip.check), old_word, new_word).to_ne_bytes();
    Hop::Via(ifindex)
}

/// Routes an IPv6 frame: on success its hop limit is one less (IPv6 has no header checksum)
/// and its MAC addresses are the hop's.
#[inline(always)]
pub fn next_hop_v6(ctx: &XdpContext, eth: &mut EthHdr, ip: &mut Ipv6Hdr) -> Hop {
    if ip.hop_limit <= 1 {
        return Hop::Expired;
    }
    // SAFETY: `bpf_fib_lookup` is plain data; all-zero is its documented initial state.
    let mut fib: bpf_fib_lookup = unsafe { zeroed() };
    fib.family = AF_INET6;
    fib.l4_protocol = ip.next_hdr;
    fib.__bindgen_anon_1.tot_len = ip.payload_len() + Ipv6Hdr::LEN as u16;
    // Traffic class and flow label, without the version.
    let [vcf0, vcf1, vcf2, vcf3] = ip.vcf;
    fib.__bindgen_anon_2.flowinfo = u32::from_ne_bytes([vcf0 & 0x0f, vcf1, vcf2, vcf3]);
    fib.__bindgen_anon_3.ipv6_src = words(ip.src_addr);
    fib.__bindgen_anon_4.ipv6_dst = words(ip.dst_addr);
    let Some(ifindex) = lookup(ctx, &mut fib, eth) else {
        return Hop::Unknown;
    };
    ip.hop_limit -= 1;
    Hop::Via(ifindex)
}

/// The FIB's egress interface for `fib`, with the hop's MAC addresses written to `eth`.
#[inline(always)]
fn lookup(ctx: &XdpContext, fib: &mut bpf_fib_lookup, eth: &mut EthHdr) -> Option<u32> {
    // SAFETY: reading the context's ingress interface index.
    fib.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    // SAFETY: `fib` is a valid `bpf_fib_lookup` of the size passed.
    let rc = unsafe { fib_lookup(ctx.ctx.cast(), fib, size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return None;
    }
    eth.dst_addr = fib.dmac;
    eth.src_addr = fib.smac;
    Some(fib.ifindex)
}

#[inline(always)]
fn words(bytes: [u8; 16]) -> [u32; 4] {
    let b = bytes;
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}
