//! Parsing: one pass over Ethernet, IPv4 or IPv6 (with its extension headers) and TCP/UDP
//! into a [`Packet`], with every access bounds-checked by [`ptr_at`]. Nothing after it parses
//! a header again: it works from the offsets recorded here.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use balancer_common::{
    csum,
    proto::{
        ipv6_ext, tcp_field, tcp_flag, ETH_P_IPV4, ETH_P_IPV6, IPV4_HEADER_LEN, IPV6_HEADER_LEN,
        TCP_HEADER_LEN, UDP_CHECK, UDP_HEADER_LEN,
    },
    Addr, FlowKey, Reason, PROTO_TCP, PROTO_UDP,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

use crate::{maps::OFFSET_SCRATCH, stats::Verdict};

/// Offset of the IP header; VLAN-tagged frames are left to the host.
pub const IP_OFFSET: usize = EthHdr::LEN;
/// Offset of the TCP/UDP header of an IPv4 packet (options are left to the host) and of an
/// IPv6 packet without extension headers; the offset of frames the program builds itself.
pub const L4_OFFSET_V4: usize = IP_OFFSET + IPV4_HEADER_LEN;
pub const L4_OFFSET_V6: usize = IP_OFFSET + IPV6_HEADER_LEN;

const IP_MORE_FRAGMENTS: u8 = 0b001;
/// IPv6 extension headers skipped on the way to the transport header (hop-by-hop, routing,
/// destination options: a packet carries each at most once or twice). A packet with more is
/// left to the host.
const MAX_EXTENSION_HEADERS: usize = 4;
/// The transport header starts before this offset; one behind longer extension headers is
/// left to the host. A power of two: offsets are masked with it after [`opaque`].
pub const L4_OFFSET_LIMIT: usize = 512;

/// A parsed TCP or UDP packet over IPv4 or IPv6.
#[derive(Clone, Copy)]
pub struct Packet {
    /// The 5-tuple exactly as on the wire (network byte order).
    pub key: FlowKey,
    pub v6: bool,
    /// Offset of the TCP/UDP header from the start of the frame.
    pub l4_offset: usize,
    /// Offset of the L4 checksum field from the start of the frame.
    pub l4_check_offset: usize,
    /// The client is ending a TCP flow (FIN or RST); always false for UDP.
    pub closing: bool,
    /// TCP: the flags byte (`tcp_flag`); 0 for UDP.
    pub tcp_flags: u8,
    /// TCP: header length in bytes, options included.
    pub tcp_header_len: usize,
    /// TCP: payload bytes, from the IP header's length.
    pub payload_len: usize,
}

impl Packet {
    /// Offset of a TCP header field (`tcp_field`) from the start of the frame.
    #[inline(always)]
    pub fn tcp_field(&self, field: usize) -> usize {
        self.l4_offset + field
    }
}

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

/// Where the IP header ends and the transport header starts.
struct Network {
    src: Addr,
    dst: Addr,
    proto: u8,
    l4_offset: usize,
    /// Offset just past the IP packet (frames may carry padding beyond it).
    end: usize,
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
    let v6 = ether_type == ETH_P_IPV6;
    let ip = if ether_type == ETH_P_IPV4 {
        ipv4(ctx)?
    } else if v6 {
        ipv6(ctx)?
    } else {
        return Err(Verdict::pass(Reason::PassNotIp));
    };
    let l4_offset = opaque(ip.l4_offset, L4_OFFSET_LIMIT).unwrap_or(ip.l4_offset);
    let l4_len = ip.end.saturating_sub(l4_offset);

    let (sport, dport, l4_check_offset, closing, tcp_flags, tcp_header_len) = match ip.proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = header(ctx, l4_offset)?;
            // SAFETY: `header` checked that the TCP header lies inside the frame.
            let tcp = unsafe { &*tcp };
            let header_len = usize::from(tcp.doff()) * 4;
            if header_len < TCP_HEADER_LEN || l4_len < header_len {
                return Err(Verdict::drop(Reason::DropTruncated));
            }
            // SAFETY: the flags byte lies inside the checked TCP header (read through the
            // header's own pointer: a pointer computed anew would need a check of its own).
            let flags = unsafe { *core::ptr::from_ref(tcp).cast::<u8>().add(tcp_field::FLAGS) };
            let closing = flags & (tcp_flag::FIN | tcp_flag::RST) != 0;
            (
                tcp.source,
                tcp.dest,
                l4_offset + tcp_field::CHECK,
                closing,
                flags,
                header_len,
            )
        }
        PROTO_UDP => {
            let ports: *const [[u8; 2]; 2] = header(ctx, l4_offset)?;
            if l4_len < UDP_HEADER_LEN {
                return Err(Verdict::drop(Reason::DropTruncated));
            }
            // SAFETY: `header` checked that the ports lie inside the frame.
            let [sport, dport] = unsafe { *ports };
            (sport, dport, l4_offset + UDP_CHECK, false, 0, 0)
        }
        _ => return Err(Verdict::pass(Reason::PassNotTcpUdp)),
    };

    Ok(Packet {
        key: FlowKey {
            src: ip.src,
            dst: ip.dst,
            sport: u16::from_ne_bytes(sport),
            dport: u16::from_ne_bytes(dport),
            proto: ip.proto,
            _pad: [0; 3],
        },
        v6,
        l4_offset,
        l4_check_offset,
        closing,
        tcp_flags,
        tcp_header_len,
        payload_len: l4_len.saturating_sub(tcp_header_len),
    })
}

#[inline(always)]
fn ipv4(ctx: &XdpContext) -> Result<Network, Verdict> {
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
    Ok(Network {
        src: Addr::v4(u32::from_ne_bytes(ip.src_addr)),
        dst: Addr::v4(u32::from_ne_bytes(ip.dst_addr)),
        proto: ip.proto as u8,
        l4_offset: L4_OFFSET_V4,
        end: IP_OFFSET + total_len,
    })
}

/// The IPv6 header, and the extension headers a host may put before the transport header:
/// hop-by-hop, routing and destination options are skipped (none of them changes what the
/// balancer does with the packet); a fragment is left to the host, as in IPv4, and so is any
/// other extension (ESP, AH, mobility, ...), which the balancer cannot look through.
#[inline(always)]
fn ipv6(ctx: &XdpContext) -> Result<Network, Verdict> {
    let ip: *const Ipv6Hdr = header(ctx, IP_OFFSET)?;
    // SAFETY: `header` checked that the IPv6 header lies inside the frame.
    let ip = unsafe { &*ip };
    if ip.version() != 6 {
        return Err(Verdict::drop(Reason::DropBadIpHeader));
    }
    let end = L4_OFFSET_V6 + usize::from(ip.payload_len());
    if end > ctx.data_end() - ctx.data() {
        return Err(Verdict::drop(Reason::DropBadIpHeader));
    }
    let mut next = ip.next_hdr;
    let mut offset = L4_OFFSET_V6;
    for _ in 0..MAX_EXTENSION_HEADERS {
        if !matches!(
            next,
            ipv6_ext::HOP_BY_HOP | ipv6_ext::ROUTING | ipv6_ext::DESTINATION_OPTIONS
        ) {
            break;
        }
        // Next header, then the length in 8-byte units past the first eight.
        let ext: *const [u8; 2] = header(ctx, offset)?;
        // SAFETY: `header` checked that both bytes lie inside the frame.
        let [following, units] = unsafe { *ext };
        next = following;
        offset += (usize::from(units) + 1) * 8;
    }
    if offset > end {
        return Err(Verdict::drop(Reason::DropTruncated));
    }
    if offset >= L4_OFFSET_LIMIT {
        return Err(Verdict::pass(Reason::PassIpv6Extension));
    }
    if next == ipv6_ext::FRAGMENT {
        return Err(Verdict::pass(Reason::PassFragment));
    }
    if ipv6_ext::is_extension(next) {
        return Err(Verdict::pass(Reason::PassIpv6Extension));
    }
    Ok(Network {
        src: Addr::v6(ip.src_addr),
        dst: Addr::v6(ip.dst_addr),
        proto: next,
        l4_offset: offset,
        end,
    })
}

/// `value` passed through `OFFSET_SCRATCH` and bounded below `limit` (a power of two), so the
/// verifier sees any value below `limit` rather than the one this path computed: the paths
/// after it are then verified once for all of them (the transport header's offset after
/// parsing: for IPv4, IPv6 and every extension header layout alike; the place a search
/// found), where each would multiply the verifier's work.
#[inline(always)]
pub fn opaque(value: usize, limit: usize) -> Option<usize> {
    let slot = OFFSET_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the slot is this CPU's, and only this program run touches it meanwhile.
    let seen = unsafe {
        core::ptr::write_volatile(slot, value as u32);
        core::ptr::read_volatile(slot)
    };
    Some(seen as usize & (limit - 1))
}

/// Fixes the lengths and checksums of a TCP segment that grew by `by` bytes of data, whose
/// words sum to `sum` where they now lie (see `csum`), and which the caller has put in.
/// `packet` still describes the segment before it grew.
#[inline(always)]
pub fn lengthen(ctx: &XdpContext, packet: &Packet, by: u16, sum: u16) -> Option<()> {
    let tcp_len = (packet.tcp_header_len + packet.payload_len) as u16;
    let grown = tcp_len + by;
    if packet.v6 {
        let payload_len: *mut [u8; 2] = ptr_at(ctx, IP_OFFSET + 4)?;
        // SAFETY: `ptr_at` checked that the field lies inside the frame.
        unsafe {
            let extensions = u16::from_be_bytes(*payload_len) - tcp_len;
            *payload_len = (extensions + grown).to_be_bytes();
        }
    } else {
        let total_len: *mut [u8; 2] = ptr_at(ctx, IP_OFFSET + 2)?;
        let check: *mut [u8; 2] = ptr_at(ctx, IP_OFFSET + 10)?;
        // SAFETY: `ptr_at` checked that both fields lie inside the frame.
        unsafe {
            let old = *total_len;
            let new = (u16::from_be_bytes(old) + by).to_be_bytes();
            *total_len = new;
            *check = csum::replace16(
                u16::from_ne_bytes(*check),
                u16::from_ne_bytes(old),
                u16::from_ne_bytes(new),
            )
            .to_ne_bytes();
        }
    }
    // The pseudo header's length grows, and the new words join the sum.
    let check: *mut [u8; 2] = ptr_at(ctx, packet.l4_check_offset)?;
    // SAFETY: `ptr_at` checked that the field lies inside the frame.
    unsafe {
        let lengthened =
            csum::replace16(u16::from_ne_bytes(*check), tcp_len.to_be(), grown.to_be());
        *check = (!csum::fold(u32::from(!lengthened) + u32::from(sum))).to_ne_bytes();
    }
    Some(())
}

/// `bpf_xdp_store_bytes` with its length in a whole register: LLVM leaves the upper half of
/// a `u32` argument undefined, where the verifier bounds all 64 bits.
///
/// # Safety
/// As the helper: `from` holds `len` bytes.
#[inline(always)]
pub unsafe fn store_bytes(ctx: *mut xdp_md, offset: u32, from: *mut c_void, len: u64) -> i64 {
    const BPF_FUNC_XDP_STORE_BYTES: usize = 190;
    // SAFETY: the kernel resolves this helper number, whose signature this is.
    let helper: unsafe extern "C" fn(*mut xdp_md, u32, *mut c_void, u64) -> i64 =
        unsafe { core::mem::transmute(BPF_FUNC_XDP_STORE_BYTES) };
    // SAFETY: as the caller promises.
    unsafe { helper(ctx, offset, from, len) }
}
