//! Parsing: one pass over Ethernet, IPv4 and TCP/UDP into a [`Packet`], with every access
//! bounds-checked by [`ptr_at`].

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use balancer_common::{FlowKey, Reason, PROTO_TCP, PROTO_UDP};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::stats::Verdict;

/// Offset of the IPv4 header; VLAN-tagged frames are left to the host.
pub const IP_OFFSET: usize = EthHdr::LEN;
/// Offset of the TCP/UDP header; IPv4 options are left to the host, so it is fixed.
pub const L4_OFFSET: usize = IP_OFFSET + Ipv4Hdr::LEN;

const IP_MORE_FRAGMENTS: u8 = 0b001;

/// A parsed TCP or UDP over IPv4 packet.
pub struct Packet {
    /// The 5-tuple exactly as on the wire (network byte order).
    pub key: FlowKey,
    /// Offset of the L4 checksum field from the start of the frame.
    pub l4_check_offset: usize,
    /// The client is ending a TCP flow (FIN or RST); always false for UDP.
    pub closing: bool,
    /// TCP: the flags byte (`TCP_*`); 0 for UDP.
    pub tcp_flags: u8,
    /// TCP: header length in bytes, options included.
    pub tcp_header_len: usize,
    /// TCP: payload bytes, from the IPv4 total length.
    pub payload_len: usize,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// Offset of the TCP flags byte from the start of the frame.
pub const TCP_FLAGS_OFFSET: usize = L4_OFFSET + 13;

/// A pointer to a `T` at `offset` in the frame, if the whole `T` lies inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
fn header<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Verdict> {
    ptr_at(ctx, offset).ok_or(Verdict::drop(Reason::DropTruncated))
}

/// Parses the frame, or says what to do with a frame the balancer does not handle.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Verdict> {
    let eth: *const EthHdr = header(ctx, 0)?;
    // SAFETY: `header` checked that the Ethernet header lies inside the frame.
    let ether_type = unsafe { (*eth).ether_type };
    // `EtherType` values are already in network byte order.
    if ether_type == EtherType::Ieee8021q as u16 || ether_type == EtherType::Ieee8021ad as u16 {
        return Err(Verdict::pass(Reason::PassVlan));
    }
    if ether_type != EtherType::Ipv4 as u16 {
        return Err(Verdict::pass(Reason::PassNotIpv4));
    }

    let ip: *const Ipv4Hdr = header(ctx, IP_OFFSET)?;
    // SAFETY: `header` checked that the IPv4 header lies inside the frame.
    let ip = unsafe { &*ip };
    let header_len = usize::from(ip.ihl());
    if ip.version() != 4 || header_len < Ipv4Hdr::LEN {
        return Err(Verdict::drop(Reason::DropBadIpHeader));
    }
    let total_len = usize::from(ip.tot_len());
    if total_len < header_len || IP_OFFSET + total_len > ctx.data_end() - ctx.data() {
        return Err(Verdict::drop(Reason::DropBadIpHeader));
    }
    if header_len != Ipv4Hdr::LEN {
        return Err(Verdict::pass(Reason::PassIpOptions));
    }
    if ip.frag_offset() != 0 || ip.frag_flags() & IP_MORE_FRAGMENTS != 0 {
        return Err(Verdict::pass(Reason::PassFragment));
    }

    let (sport, dport, l4_check_offset, closing, tcp_flags, tcp_header_len) = match ip.proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = header(ctx, L4_OFFSET)?;
            // SAFETY: `header` checked that the TCP header lies inside the frame.
            let tcp = unsafe { &*tcp };
            if usize::from(tcp.doff()) * 4 < TcpHdr::LEN || total_len < Ipv4Hdr::LEN + TcpHdr::LEN {
                return Err(Verdict::drop(Reason::DropTruncated));
            }
            let closing = tcp.fin() != 0 || tcp.rst() != 0;
            let flags: *const u8 = header(ctx, TCP_FLAGS_OFFSET)?;
            // SAFETY: the flags byte lies inside the checked TCP header.
            let flags = unsafe { *flags };
            let header_len = usize::from(tcp.doff()) * 4;
            (
                tcp.source,
                tcp.dest,
                L4_OFFSET + 16,
                closing,
                flags,
                header_len,
            )
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = header(ctx, L4_OFFSET)?;
            // SAFETY: `header` checked that the UDP header lies inside the frame.
            let udp = unsafe { &*udp };
            if total_len < Ipv4Hdr::LEN + UdpHdr::LEN {
                return Err(Verdict::drop(Reason::DropTruncated));
            }
            (udp.src, udp.dst, L4_OFFSET + 6, false, 0, 0)
        }
        _ => return Err(Verdict::pass(Reason::PassNotTcpUdp)),
    };

    Ok(Packet {
        key: FlowKey {
            src: u32::from_ne_bytes(ip.src_addr),
            dst: u32::from_ne_bytes(ip.dst_addr),
            sport: u16::from_ne_bytes(sport),
            dport: u16::from_ne_bytes(dport),
            proto: ip.proto,
            _pad: [0; 3],
        },
        l4_check_offset,
        closing,
        tcp_flags,
        tcp_header_len,
        payload_len: total_len.saturating_sub(Ipv4Hdr::LEN + tcp_header_len),
    })
}
