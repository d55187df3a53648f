//! Protocol numbers, flags and header offsets, one copy for the program, the agent and the
//! fixtures that build frames for both.

/// IP protocol numbers (IPv4's protocol, IPv6's next header).
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// EtherTypes in network byte order, as the Ethernet header holds them read natively.
pub const ETH_P_IPV4: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6: u16 = 0x86ddu16.to_be();

pub const ETH_HEADER_LEN: usize = 14;
pub const IPV4_HEADER_LEN: usize = 20;
pub const IPV6_HEADER_LEN: usize = 40;
pub const TCP_HEADER_LEN: usize = 20;
pub const UDP_HEADER_LEN: usize = 8;

/// IPv6 next-header values of extension headers (RFC 8200 §4 and the IANA list).
pub mod ipv6_ext {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const ESP: u8 = 50;
    pub const AUTHENTICATION: u8 = 51;
    pub const DESTINATION_OPTIONS: u8 = 60;
    pub const MOBILITY: u8 = 135;
    pub const HIP: u8 = 139;
    pub const SHIM6: u8 = 140;
    pub const EXPERIMENT_1: u8 = 253;
    pub const EXPERIMENT_2: u8 = 254;

    /// Whether a next-header value names an extension header rather than a transport.
    #[inline(always)]
    pub const fn is_extension(next: u8) -> bool {
        matches!(
            next,
            HOP_BY_HOP
                | ROUTING
                | FRAGMENT
                | ESP
                | AUTHENTICATION
                | DESTINATION_OPTIONS
                | MOBILITY
                | HIP
                | SHIM6
                | EXPERIMENT_1
                | EXPERIMENT_2
        )
    }
}

/// TCP header flags (byte 13).
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// Offsets of TCP header fields from the start of the TCP header.
pub mod tcp_field {
    pub const SEQ: usize = 4;
    pub const ACK: usize = 8;
    pub const FLAGS: usize = 13;
    pub const WINDOW: usize = 14;
    pub const CHECK: usize = 16;
}

/// Offset of the UDP checksum from the start of the UDP header.
pub const UDP_CHECK: usize = 6;

/// TCP option kinds.
pub mod tcp_option {
    pub const END: u8 = 0;
    pub const NOP: u8 = 1;
    pub const MSS: u8 = 2;
    pub const WINDOW_SCALE: u8 = 3;
    pub const SACK_PERMITTED: u8 = 4;
    pub const SACK: u8 = 5;
    pub const TIMESTAMP: u8 = 8;
}
