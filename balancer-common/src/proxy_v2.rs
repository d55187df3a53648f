//! The PROXY protocol v2 header (haproxy.org's proxy-protocol.txt, §2.2): the client's and
//! the virtual IP's addresses and ports, in front of a connection's first bytes, for backends
//! that see the balancer's address instead of the client's (full NAT). The agent writes it
//! before a cookie service's replayed request, XDP into an L4 flow's first data segment.

use crate::Addr;

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY (the connection is relayed for another party).
pub const VERSION_PROXY: u8 = 0x21;
/// Address family and transport: TCP over IPv4, TCP over IPv6.
pub const TCP_OVER_IPV4: u8 = 0x11;
pub const TCP_OVER_IPV6: u8 = 0x21;
/// The header's length for a TCP connection over IPv4 and over IPv6.
pub const IPV4_LEN: usize = 16 + 12;
pub const IPV6_LEN: usize = 16 + 36;

/// The header's length for a connection of the family `v6` says.
#[inline(always)]
pub const fn len(v6: bool) -> usize {
    if v6 {
        IPV6_LEN
    } else {
        IPV4_LEN
    }
}

/// Writes into `out` the header of a TCP connection from `client` to `vip` (of one family,
/// IPv4 mapped; ports in network byte order) and returns its length.
#[inline(always)]
pub fn write(
    out: &mut [u8; IPV6_LEN],
    (client, client_port): (Addr, u16),
    (vip, vip_port): (Addr, u16),
) -> usize {
    let v6 = !client.is_v4();
    let len = len(v6);
    out[..12].copy_from_slice(&SIGNATURE);
    out[12] = VERSION_PROXY;
    out[13] = if v6 { TCP_OVER_IPV6 } else { TCP_OVER_IPV4 };
    out[14..16].copy_from_slice(&((len - 16) as u16).to_be_bytes());
    let (client, vip) = (client.octets(), vip.octets());
    let ports = if v6 {
        out[16..32].copy_from_slice(&client);
        out[32..48].copy_from_slice(&vip);
        48
    } else {
        out[16..20].copy_from_slice(&client[12..]);
        out[20..24].copy_from_slice(&vip[12..]);
        24
    };
    out[ports..ports + 2].copy_from_slice(&client_port.to_ne_bytes());
    out[ports + 2..ports + 4].copy_from_slice(&vip_port.to_ne_bytes());
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> Addr {
        Addr::from(text.parse::<core::net::IpAddr>().unwrap())
    }

    #[test]
    fn ipv4_and_ipv6_headers_are_laid_out_as_the_specification_says() {
        let mut out = [0u8; IPV6_LEN];
        let client = (addr("198.18.0.2"), 40000u16.to_be());
        let vip = (addr("203.0.113.10"), 80u16.to_be());
        let len = write(&mut out, client, vip);
        assert_eq!(len, IPV4_LEN);
        assert_eq!(&out[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(
            &out[12..len],
            &[0x21, 0x11, 0, 12, 198, 18, 0, 2, 203, 0, 113, 10, 0x9c, 0x40, 0, 80]
        );

        let client = (addr("2001:db8:c::2"), 40000u16.to_be());
        let vip = (addr("2001:db8:f::10"), 443u16.to_be());
        let len = write(&mut out, client, vip);
        assert_eq!(len, IPV6_LEN);
        assert_eq!(&out[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(&out[16..32], &client.0.octets());
        assert_eq!(&out[32..48], &vip.0.octets());
        assert_eq!(&out[48..], &[0x9c, 0x40, 0x01, 0xbb]);
    }
}
