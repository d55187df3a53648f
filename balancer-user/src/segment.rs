//! TCP segments over IPv4 or IPv6 as the agent sees them: parsing the frames XDP punts,
//! building the packets it sends to backends (and resets to clients) through a raw socket.

use std::net::{IpAddr, Ipv4Addr};

use balancer_common::{
    proto::{
        ipv6_ext, tcp_option, ETH_HEADER_LEN, IPV4_HEADER_LEN, IPV6_HEADER_LEN, TCP_HEADER_LEN,
    },
    Addr, FlowKey, PROTO_TCP,
};

pub use balancer_common::proto::tcp_flag::{ACK, FIN, PSH, RST, SYN};

/// IPv6 extension headers walked to the TCP header, as XDP walks them.
const MAX_EXTENSION_HEADERS: usize = 4;

/// A parsed TCP segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// MSS option, if present.
    pub mss: Option<u16>,
    /// Window scale option, if present.
    pub window_shift: Option<u8>,
    /// SACK-permitted option present.
    pub sack_permitted: bool,
    /// Timestamp option, if present.
    pub timestamps: Option<Timestamps>,
    pub payload: Vec<u8>,
}

/// The timestamp option (RFC 7323): the sender's clock, and the latest value of the other
/// end's it echoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamps {
    pub value: u32,
    pub echo: u32,
}

impl Segment {
    /// A segment with every field zero or empty, to fill in with struct update syntax.
    pub fn empty() -> Segment {
        Segment {
            src: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            sport: 0,
            dport: 0,
            seq: 0,
            ack: 0,
            flags: 0,
            window: 0,
            mss: None,
            window_shift: None,
            sack_permitted: false,
            timestamps: None,
            payload: Vec::new(),
        }
    }

    /// Parses an Ethernet frame holding IPv4 (no options) or IPv6 (with the extension
    /// headers XDP skips) and TCP, as XDP punts them.
    pub fn from_frame(frame: &[u8]) -> Option<Segment> {
        let ip = frame.get(ETH_HEADER_LEN..)?;
        let (src, dst, tcp) = match ip.first()? >> 4 {
            4 => {
                if ip.len() < IPV4_HEADER_LEN || ip[0] != 0x45 || ip[9] != PROTO_TCP {
                    return None;
                }
                let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
                let src: [u8; 4] = ip[12..16].try_into().ok()?;
                let dst: [u8; 4] = ip[16..20].try_into().ok()?;
                (
                    IpAddr::from(src),
                    IpAddr::from(dst),
                    ip.get(IPV4_HEADER_LEN..total)?,
                )
            }
            6 => {
                if ip.len() < IPV6_HEADER_LEN {
                    return None;
                }
                let end = (IPV6_HEADER_LEN + usize::from(u16::from_be_bytes([ip[4], ip[5]])))
                    .min(ip.len());
                let src: [u8; 16] = ip[8..24].try_into().ok()?;
                let dst: [u8; 16] = ip[24..40].try_into().ok()?;
                let (mut next, mut offset) = (ip[6], IPV6_HEADER_LEN);
                for _ in 0..MAX_EXTENSION_HEADERS {
                    if !matches!(
                        next,
                        ipv6_ext::HOP_BY_HOP | ipv6_ext::ROUTING | ipv6_ext::DESTINATION_OPTIONS
                    ) {
                        break;
                    }
                    next = *ip.get(offset)?;
                    offset += (usize::from(*ip.get(offset + 1)?) + 1) * 8;
                }
                if next != PROTO_TCP {
                    return None;
                }
                (IpAddr::from(src), IpAddr::from(dst), ip.get(offset..end)?)
            }
            _ => return None,
        };
        let header_len = usize::from(tcp.get(12)? >> 4) * 4;
        if header_len < TCP_HEADER_LEN || tcp.len() < header_len {
            return None;
        }
        let mut segment = Segment {
            src,
            dst,
            sport: u16::from_be_bytes([tcp[0], tcp[1]]),
            dport: u16::from_be_bytes([tcp[2], tcp[3]]),
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            ack: u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
            flags: tcp[13],
            window: u16::from_be_bytes([tcp[14], tcp[15]]),
            mss: None,
            window_shift: None,
            sack_permitted: false,
            timestamps: None,
            payload: tcp[header_len..].to_vec(),
        };
        let mut options = &tcp[TCP_HEADER_LEN..header_len];
        while let [kind, rest @ ..] = options {
            match *kind {
                tcp_option::END => break,
                tcp_option::NOP => {
                    options = rest;
                    continue;
                }
                _ => {}
            }
            let len = usize::from(*rest.first()?);
            let option = options.get(..len.max(2))?;
            match (*kind, len) {
                (tcp_option::MSS, 4) => {
                    segment.mss = Some(u16::from_be_bytes([option[2], option[3]]))
                }
                (tcp_option::WINDOW_SCALE, 3) => segment.window_shift = Some(option[2].min(14)),
                (tcp_option::SACK_PERMITTED, 2) => segment.sack_permitted = true,
                (tcp_option::TIMESTAMP, 10) => {
                    let word = |at: usize| {
                        u32::from_be_bytes([
                            option[at],
                            option[at + 1],
                            option[at + 2],
                            option[at + 3],
                        ])
                    };
                    segment.timestamps = Some(Timestamps {
                        value: word(2),
                        echo: word(6),
                    });
                }
                _ => {}
            }
            options = &options[len.max(2)..];
        }
        Some(segment)
    }

    /// The 5-tuple in wire order, as the maps key it.
    pub fn key(&self) -> FlowKey {
        FlowKey {
            src: Addr::from(self.src),
            dst: Addr::from(self.dst),
            sport: self.sport.to_be(),
            dport: self.dport.to_be(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        }
    }

    /// The IP packet (an IPv4 or IPv6 header, the TCP header with the MSS, timestamp, window
    /// scale and SACK-permitted options when set, and the payload) with its checksums. The
    /// timestamps come first but for the MSS, behind two NOPs, where XDP looks for them.
    pub fn to_packet(&self) -> Vec<u8> {
        let mut options = Vec::new();
        if let Some(mss) = self.mss {
            options.extend_from_slice(&[tcp_option::MSS, 4]);
            options.extend_from_slice(&mss.to_be_bytes());
        }
        if let Some(timestamps) = self.timestamps {
            options.extend_from_slice(&[
                tcp_option::NOP,
                tcp_option::NOP,
                tcp_option::TIMESTAMP,
                10,
            ]);
            options.extend_from_slice(&timestamps.value.to_be_bytes());
            options.extend_from_slice(&timestamps.echo.to_be_bytes());
        }
        if let Some(shift) = self.window_shift {
            options.extend_from_slice(&[tcp_option::NOP, tcp_option::WINDOW_SCALE, 3, shift]);
        }
        if self.sack_permitted {
            options.extend_from_slice(&[
                tcp_option::NOP,
                tcp_option::NOP,
                tcp_option::SACK_PERMITTED,
                2,
            ]);
        }
        let tcp_len = TCP_HEADER_LEN + options.len() + self.payload.len();
        let (src, dst) = (ip_octets(self.src), ip_octets(self.dst));
        let mut packet = Vec::with_capacity(IPV6_HEADER_LEN + tcp_len);
        if self.dst.is_ipv4() {
            packet.extend_from_slice(&[0x45, 0]);
            packet.extend_from_slice(&((IPV4_HEADER_LEN + tcp_len) as u16).to_be_bytes());
            packet.extend_from_slice(&[0, 0, 0x40, 0, 64, PROTO_TCP, 0, 0]);
            packet.extend_from_slice(&src);
            packet.extend_from_slice(&dst);
            let ip_check = checksum(&[&packet]);
            packet[10..12].copy_from_slice(&ip_check.to_be_bytes());
        } else {
            packet.extend_from_slice(&[0x60, 0, 0, 0]);
            packet.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            packet.extend_from_slice(&[PROTO_TCP, 64]);
            packet.extend_from_slice(&src);
            packet.extend_from_slice(&dst);
        }
        let ip_len = packet.len();

        packet.extend_from_slice(&self.sport.to_be_bytes());
        packet.extend_from_slice(&self.dport.to_be_bytes());
        packet.extend_from_slice(&self.seq.to_be_bytes());
        packet.extend_from_slice(&self.ack.to_be_bytes());
        packet.push((((TCP_HEADER_LEN + options.len()) / 4) as u8) << 4);
        packet.push(self.flags);
        packet.extend_from_slice(&self.window.to_be_bytes());
        packet.extend_from_slice(&[0, 0, 0, 0]);
        packet.extend_from_slice(&options);
        packet.extend_from_slice(&self.payload);
        let mut pseudo = Vec::with_capacity(40);
        pseudo.extend_from_slice(&src);
        pseudo.extend_from_slice(&dst);
        pseudo.extend_from_slice(&[0, PROTO_TCP]);
        pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        let tcp_check = checksum(&[&pseudo, &packet[ip_len..]]);
        packet[ip_len + 16..ip_len + 18].copy_from_slice(&tcp_check.to_be_bytes());
        packet
    }
}

/// The address's bytes as its header carries them: 4 for IPv4, 16 for IPv6.
fn ip_octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The Internet checksum over the concatenation of `parts` (each of even length but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for part in parts {
        for word in part.chunks(2) {
            sum += u32::from(u16::from_be_bytes([word[0], *word.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment() -> Segment {
        Segment {
            src: IpAddr::from([198, 18, 0, 2]),
            dst: IpAddr::from([198, 19, 0, 11]),
            sport: 40000,
            dport: 80,
            seq: 0x1234_5678,
            ack: 0,
            flags: SYN,
            window: 64240,
            mss: Some(1460),
            window_shift: Some(7),
            sack_permitted: true,
            timestamps: Some(Timestamps {
                value: 0x0102_0304,
                echo: 0xfffe_fdfc,
            }),
            payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        }
    }

    const IP_LEN: usize = IPV4_HEADER_LEN;
    const ETH_LEN: usize = ETH_HEADER_LEN;

    fn segment_v6() -> Segment {
        Segment {
            src: "2001:db8::2".parse().unwrap(),
            dst: "2001:db8:1::11".parse().unwrap(),
            ..segment()
        }
    }

    #[test]
    fn a_built_packet_parses_back_with_valid_checksums() {
        let original = segment();
        let packet = original.to_packet();
        assert_eq!(checksum(&[&packet[..IP_LEN]]), 0, "IPv4 checksum");
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&packet[12..20]);
        pseudo.extend_from_slice(&[0, PROTO_TCP]);
        pseudo.extend_from_slice(&((packet.len() - IP_LEN) as u16).to_be_bytes());
        assert_eq!(checksum(&[&pseudo, &packet[IP_LEN..]]), 0, "TCP checksum");
        let mut frame = vec![0u8; ETH_LEN];
        frame.extend_from_slice(&packet);
        assert_eq!(Segment::from_frame(&frame), Some(original));
    }

    #[test]
    fn an_ipv6_packet_parses_back_with_a_valid_checksum_also_behind_extension_headers() {
        let original = segment_v6();
        let packet = original.to_packet();
        assert_eq!(packet[0] >> 4, 6);
        let tcp_len = packet.len() - IPV6_HEADER_LEN;
        assert_eq!(
            usize::from(u16::from_be_bytes([packet[4], packet[5]])),
            tcp_len
        );
        let mut pseudo = packet[8..40].to_vec();
        pseudo.extend_from_slice(&[0, PROTO_TCP]);
        pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        assert_eq!(
            checksum(&[&pseudo, &packet[IPV6_HEADER_LEN..]]),
            0,
            "TCP checksum"
        );
        let mut frame = vec![0u8; ETH_LEN];
        frame.extend_from_slice(&packet);
        assert_eq!(Segment::from_frame(&frame), Some(original.clone()));

        // The same segment behind an 8-byte hop-by-hop header (a PadN option).
        let mut with_hop_by_hop = frame[..ETH_LEN + IPV6_HEADER_LEN].to_vec();
        with_hop_by_hop[ETH_LEN + 6] = ipv6_ext::HOP_BY_HOP;
        let payload_len = (tcp_len + 8) as u16;
        with_hop_by_hop[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&payload_len.to_be_bytes());
        with_hop_by_hop.extend_from_slice(&[PROTO_TCP, 0, 1, 4, 0, 0, 0, 0]);
        with_hop_by_hop.extend_from_slice(&packet[IPV6_HEADER_LEN..]);
        assert_eq!(Segment::from_frame(&with_hop_by_hop), Some(original));
    }

    #[test]
    fn truncated_or_foreign_frames_are_rejected() {
        let mut frame = vec![0u8; ETH_LEN];
        frame.extend_from_slice(&segment().to_packet());
        for cut in [0, 10, ETH_LEN + 10, ETH_LEN + 30] {
            assert_eq!(Segment::from_frame(&frame[..cut]), None, "cut at {cut}");
        }
        let mut udp = frame.clone();
        udp[ETH_LEN + 9] = 17;
        assert_eq!(Segment::from_frame(&udp), None);
        let mut bad_options = frame;
        bad_options[ETH_LEN + IP_LEN + 21] = 200; // MSS option claims 200 bytes
        assert!(Segment::from_frame(&bad_options).is_none_or(|s| s.mss.is_none()));
    }
}
