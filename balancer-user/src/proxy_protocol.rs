//! The PROXY protocol v2 header (haproxy.org's proxy-protocol.txt, §2.2): the client's and
//! the virtual IP's addresses and ports, in front of a connection's first bytes, for backends
//! that see the balancer's address instead of the client's (full NAT).

use std::net::SocketAddr;

/// The 12-byte signature every v2 header starts with.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY (the connection is relayed for another party).
const VERSION_PROXY: u8 = 0x21;
/// Address family and transport: TCP over IPv4, TCP over IPv6.
const TCP_OVER_IPV4: u8 = 0x11;
const TCP_OVER_IPV6: u8 = 0x21;

/// The header for a TCP connection from `client` to `vip` (both of one family).
pub fn header(client: SocketAddr, vip: SocketAddr) -> Vec<u8> {
    let mut header = SIGNATURE.to_vec();
    header.push(VERSION_PROXY);
    let addresses = match (client, vip) {
        (SocketAddr::V4(c), SocketAddr::V4(v)) => {
            header.push(TCP_OVER_IPV4);
            [c.ip().octets().as_slice(), v.ip().octets().as_slice()].concat()
        }
        _ => {
            header.push(TCP_OVER_IPV6);
            let v6 = |a: SocketAddr| match a.ip() {
                std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                std::net::IpAddr::V6(v6) => v6.octets(),
            };
            [v6(client), v6(vip)].concat()
        }
    };
    let len = (addresses.len() + 4) as u16;
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(&addresses);
    header.extend_from_slice(&client.port().to_be_bytes());
    header.extend_from_slice(&vip.port().to_be_bytes());
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_and_ipv6_headers_are_laid_out_as_the_specification_says() {
        let v4 = header(
            "198.18.0.2:40000".parse().unwrap(),
            "203.0.113.10:80".parse().unwrap(),
        );
        let mut expected = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0, 12, 198, 18, 0, 2, 203, 0, 113, 10]);
        expected.extend_from_slice(&[0x9c, 0x40, 0, 80]);
        assert_eq!(v4, expected);

        let v6 = header(
            "[2001:db8:c::2]:40000".parse().unwrap(),
            "[2001:db8:f::10]:443".parse().unwrap(),
        );
        assert_eq!(v6.len(), 16 + 36);
        assert_eq!(&v6[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(&v6[16..20], &[0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(&v6[48..52], &[0x9c, 0x40, 0x01, 0xbb]);
    }
}
