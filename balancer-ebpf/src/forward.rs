//! Forwarding: the kernel FIB names the egress interface and next hop, the frame leaves through
//! `TX_PORTS`. Anything the FIB cannot resolve yet goes up the host stack, already rewritten,
//! which forwards it and resolves the neighbour for the packets that follow.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use balancer_common::{csum, Reason};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    maps::TX_PORTS,
    packet::{ptr_at, IP_OFFSET},
    stats::Verdict,
};

const AF_INET: u8 = 2;

/// Sends a rewritten packet towards its new destination; `reason` is what success counts as.
#[inline(always)]
pub fn redirect(ctx: &XdpContext, reason: Reason) -> Result<Verdict, Verdict> {
    let truncated = Verdict::drop(Reason::DropTruncated);
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(truncated)?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, IP_OFFSET).ok_or(truncated)?;
    // SAFETY: `ptr_at` checked that both headers lie inside the frame.
    let (eth, ip) = unsafe { (&mut *eth, &mut *ip) };

    // Expiring packets go up the stack, which answers with ICMP time exceeded.
    if ip.ttl <= 1 {
        return Ok(Verdict::pass(Reason::PassTtlExpired));
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
        return Ok(Verdict::pass(Reason::PassNoRoute));
    }

    let old_word = u16::from_ne_bytes([ip.ttl, ip.proto as u8]);
    ip.ttl -= 1;
    let new_word = u16::from_ne_bytes([ip.ttl, ip.proto as u8]);
    ip.check = csum::replace16(u16::from_ne_bytes(ip.check), old_word, new_word).to_ne_bytes();
    eth.dst_addr = fib.dmac;
    eth.src_addr = fib.smac;

    match TX_PORTS.redirect(fib.ifindex, u64::from(xdp_action::XDP_PASS)) {
        Ok(action) => Ok(Verdict { action, reason }),
        Err(_) => Ok(Verdict::pass(Reason::PassNoRoute)),
    }
}
