//! TCP/IPv4 segments as the agent sees them: parsing the frames XDP punts, building the
//! packets it sends to backends (and resets to clients) through a raw socket.

use std::net::Ipv4Addr;

use balancer_common::{FlowKey, PROTO_TCP};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const OPTION_MSS: u8 = 2;
const OPTION_WINDOW_SCALE: u8 = 3;
const OPTION_SACK_PERMITTED: u8 = 4;

/// A parsed TCP segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
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
    pub payload: Vec<u8>,
}

impl Segment {
    /// A segment with every field zero or empty, to fill in with struct update syntax.
    pub fn empty() -> Segment {
        Segment {
            src: Ipv4Addr::UNSPECIFIED,
            dst: Ipv4Addr::UNSPECIFIED,
            sport: 0,
            dport: 0,
            seq: 0,
            ack: 0,
            flags: 0,
            window: 0,
            mss: None,
            window_shift: None,
            sack_permitted: false,
            payload: Vec::new(),
        }
    }

    /// Parses an Ethernet frame holding IPv4 (no options) and TCP, as XDP punts them.
    pub fn from_frame(frame: &[u8]) -> Option<Segment> {
        let ip = frame.get(ETH_LEN..)?;
        if ip.len() < IP_LEN || ip[0] != 0x45 || ip[9] != PROTO_TCP {
            return None;
        }
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
        let tcp = ip.get(IP_LEN..total)?;
        let header_len = usize::from(tcp.get(12)? >> 4) * 4;
        if header_len < 20 || tcp.len() < header_len {
            return None;
        }
        let mut segment = Segment {
            src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            sport: u16::from_be_bytes([tcp[0], tcp[1]]),
            dport: u16::from_be_bytes([tcp[2], tcp[3]]),
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            ack: u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
            flags: tcp[13],
            window: u16::from_be_bytes([tcp[14], tcp[15]]),
            mss: None,
            window_shift: None,
            sack_permitted: false,
            payload: tcp[header_len..].to_vec(),
        };
        let mut options = &tcp[20..header_len];
        while let [kind, rest @ ..] = options {
            match *kind {
                0 => break,
                1 => {
                    options = rest;
                    continue;
                }
                _ => {}
            }
            let len = usize::from(*rest.first()?);
            let option = options.get(..len.max(2))?;
            match (*kind, len) {
                (OPTION_MSS, 4) => segment.mss = Some(u16::from_be_bytes([option[2], option[3]])),
                (OPTION_WINDOW_SCALE, 3) => segment.window_shift = Some(option[2].min(14)),
                (OPTION_SACK_PERMITTED, 2) => segment.sack_permitted = true,
                _ => {}
            }
            options = &options[len.max(2)..];
        }
        Some(segment)
    }

    /// The 5-tuple in wire order, as the maps key it.
    pub fn key(&self) -> FlowKey {
        FlowKey {
            src: u32::from_ne_bytes(self.src.octets()),
            dst: u32::from_ne_bytes(self.dst.octets()),
            sport: self.sport.to_be(),
            dport: self.dport.to_be(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        }
    }

    /// The IPv4 packet (header, TCP header with the MSS, window scale and SACK-permitted
    /// options when set, and payload) with both checksums.
    pub fn to_packet(&self) -> Vec<u8> {
        let mut options = Vec::new();
        if let Some(mss) = self.mss {
            options.extend_from_slice(&[OPTION_MSS, 4]);
            options.extend_from_slice(&mss.to_be_bytes());
        }
        if let Some(shift) = self.window_shift {
            options.extend_from_slice(&[1, OPTION_WINDOW_SCALE, 3, shift]);
        }
        if self.sack_permitted {
            options.extend_from_slice(&[1, 1, OPTION_SACK_PERMITTED, 2]);
        }
        let tcp_len = 20 + options.len() + self.payload.len();
        let mut packet = Vec::with_capacity(IP_LEN + tcp_len);
        packet.extend_from_slice(&[0x45, 0]);
        packet.extend_from_slice(&((IP_LEN + tcp_len) as u16).to_be_bytes());
        packet.extend_from_slice(&[0, 0, 0x40, 0, 64, PROTO_TCP, 0, 0]);
        packet.extend_from_slice(&self.src.octets());
        packet.extend_from_slice(&self.dst.octets());
        let ip_check = checksum(&[&packet[..IP_LEN]]);
        packet[10..12].copy_from_slice(&ip_check.to_be_bytes());

        packet.extend_from_slice(&self.sport.to_be_bytes());
        packet.extend_from_slice(&self.dport.to_be_bytes());
        packet.extend_from_slice(&self.seq.to_be_bytes());
        packet.extend_from_slice(&self.ack.to_be_bytes());
        packet.push((((20 + options.len()) / 4) as u8) << 4);
        packet.push(self.flags);
        packet.extend_from_slice(&self.window.to_be_bytes());
        packet.extend_from_slice(&[0, 0, 0, 0]);
        packet.extend_from_slice(&options);
        packet.extend_from_slice(&self.payload);
        let mut pseudo = Vec::with_capacity(12);
        pseudo.extend_from_slice(&self.src.octets());
        pseudo.extend_from_slice(&self.dst.octets());
        pseudo.extend_from_slice(&[0, PROTO_TCP]);
        pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        let tcp_check = checksum(&[&pseudo, &packet[IP_LEN..]]);
        packet[IP_LEN + 16..IP_LEN + 18].copy_from_slice(&tcp_check.to_be_bytes());
        packet
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
            src: Ipv4Addr::new(198, 18, 0, 2),
            dst: Ipv4Addr::new(198, 19, 0, 11),
            sport: 40000,
            dport: 80,
            seq: 0x1234_5678,
            ack: 0,
            flags: SYN,
            window: 64240,
            mss: Some(1460),
            window_shift: Some(7),
            sack_permitted: true,
            payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
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
