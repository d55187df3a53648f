//! IP addresses of either family in one shape, so every key and value holds one and the
//! program's lookups and rewrites need no second copy per family.

use bytemuck::{Pod, Zeroable};

/// An IPv6 address, or an IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`), as four 32-bit
/// words in network byte order: the bytes exactly as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Addr {
    pub words: [u32; 4],
}

/// The third word of an IPv4-mapped address, `0000:ffff`, in network byte order.
const MAPPED_V4: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Addr {
    /// An IPv4 address given as its 32-bit word in network byte order.
    #[inline(always)]
    pub const fn v4(word: u32) -> Self {
        Self {
            words: [0, 0, MAPPED_V4, word],
        }
    }

    /// An IPv6 address given as its 16 bytes.
    #[inline(always)]
    pub const fn v6(bytes: [u8; 16]) -> Self {
        let b = bytes;
        Self {
            words: [
                u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
                u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
                u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
                u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
            ],
        }
    }

    #[inline(always)]
    pub const fn is_v4(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == MAPPED_V4
    }

    /// The IPv4 address as its word in network byte order (the last word of the mapping).
    #[inline(always)]
    pub const fn v4_word(&self) -> u32 {
        self.words[3]
    }

    /// The 16 bytes as on the wire.
    #[inline(always)]
    pub fn octets(&self) -> [u8; 16] {
        let mut bytes = [0; 16];
        let mut i = 0;
        while i < 4 {
            let word = self.words[i].to_ne_bytes();
            bytes[4 * i] = word[0];
            bytes[4 * i + 1] = word[1];
            bytes[4 * i + 2] = word[2];
            bytes[4 * i + 3] = word[3];
            i += 1;
        }
        bytes
    }

    /// The address with only the bits of `mask` kept.
    #[inline(always)]
    pub const fn masked(&self, mask: &Addr) -> Addr {
        Addr {
            words: [
                self.words[0] & mask.words[0],
                self.words[1] & mask.words[1],
                self.words[2] & mask.words[2],
                self.words[3] & mask.words[3],
            ],
        }
    }

    /// The mask of a prefix of `bits` for an address of this family: an IPv4 prefix counts
    /// from the mapped address's 97th bit, so its first 96 bits (the mapping) are kept.
    pub const fn prefix_mask(v4: bool, bits: u32) -> Addr {
        let bits = if v4 { bits + 96 } else { bits };
        let mut words = [0u32; 4];
        let mut i = 0;
        while i < 4 {
            let start = 32 * i as u32;
            let host = if bits >= start + 32 {
                u32::MAX
            } else if bits <= start {
                0
            } else {
                u32::MAX << (32 - (bits - start))
            };
            words[i] = host.to_be();
            i += 1;
        }
        Addr { words }
    }
}

impl From<core::net::IpAddr> for Addr {
    fn from(ip: core::net::IpAddr) -> Self {
        match ip {
            core::net::IpAddr::V4(v4) => Addr::v4(u32::from_ne_bytes(v4.octets())),
            core::net::IpAddr::V6(v6) => Addr::v6(v6.octets()),
        }
    }
}

impl From<Addr> for core::net::IpAddr {
    fn from(addr: Addr) -> Self {
        let v6 = core::net::Ipv6Addr::from(addr.octets());
        match v6.to_ipv4_mapped() {
            Some(v4) => core::net::IpAddr::V4(v4),
            None => core::net::IpAddr::V6(v6),
        }
    }
}

impl core::fmt::Display for Addr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::net::IpAddr::from(*self).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use core::net::IpAddr;
    use std::string::ToString;

    use super::*;

    #[test]
    fn both_families_round_trip_and_print_as_themselves() {
        for text in [
            "198.18.0.2",
            "2001:db8::2",
            "::1",
            "2001:db8:0:1:0:ffff:c612:2",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            let addr = Addr::from(ip);
            assert_eq!(IpAddr::from(addr), ip);
            assert_eq!(addr.to_string(), text);
            assert_eq!(addr.is_v4(), ip.is_ipv4(), "{text}");
        }
        let v4 = Addr::from("198.18.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(v4.v4_word(), u32::from_ne_bytes([198, 18, 0, 2]));
    }

    #[test]
    fn prefix_masks_keep_the_prefix_of_either_family() {
        let v4 = Addr::from("198.18.7.9".parse::<IpAddr>().unwrap());
        let masked = v4.masked(&Addr::prefix_mask(true, 24));
        assert_eq!(masked.to_string(), "198.18.7.0");
        assert!(masked.is_v4());
        assert_eq!(v4.masked(&Addr::prefix_mask(true, 32)), v4);
        assert_eq!(
            v4.masked(&Addr::prefix_mask(true, 0)).to_string(),
            "0.0.0.0"
        );

        let v6 = Addr::from("2001:db8:1:2:3:4:5:6".parse::<IpAddr>().unwrap());
        assert_eq!(
            v6.masked(&Addr::prefix_mask(false, 64)).to_string(),
            "2001:db8:1:2::"
        );
        assert_eq!(
            v6.masked(&Addr::prefix_mask(false, 56)).to_string(),
            "2001:db8:1::"
        );
        assert_eq!(v6.masked(&Addr::prefix_mask(false, 128)), v6);
    }
}
