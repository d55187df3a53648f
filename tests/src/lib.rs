//! The namespace lab: a client, a balancer host, a switch and three backends, each in its own
//! network namespace, joined by veth pairs. Used by the integration tests, `cargo xtask run`
//! and `cargo xtask bench`. Only the benchmarking and documentation ranges are used: clients
//! in 198.18.0.0/16, backends in 198.19.0.0/24, the VIP in 203.0.113.0/24; for IPv6, beside
//! them, clients in 2001:db8:c::/48, backends in 2001:db8:b::/64, the VIP in 2001:db8:f::/64.
//!
//! ```text
//!  client ns            balancer ns (lb)            switch ns (sw)         backend ns (b1..b3)
//!  eth0 198.18.0.2 ── lb-client 198.18.0.1
//!       2001:db8:c::2           2001:db8:c::1
//!                       lb-backend 198.19.0.1 ── sw-lb ┐
//!                                  2001:db8:b::1       br0 ─ sw-b1 ── eth0 198.19.0.11, ::11
//!                                                          ─ sw-b2 ── eth0 198.19.0.12, ::12
//!                                                          ─ sw-b3 ── eth0 198.19.0.13, ::13
//! ```
//!
//! [`Lab::with_impaired_client_link`] puts a relay namespace (`wire`) on the client link, whose
//! `lab-impair` drops, reorders, duplicates and delays frames (the kernel has no netem).
//!
//! The client's default route points at the balancer host, which forwards between its two
//! networks; the VIP has no route there, the balancer's XDP program answers for it.
//! Everything is removed when the [`Lab`] is dropped, also during a panic; a lab whose process
//! was killed is removed by the next [`Lab::new`] (or [`reap_stale_labs`]).

pub mod config;
pub mod data;
pub mod impair;
mod lab;
pub mod netns;
pub mod process;
pub mod xdp;

use std::net::{Ipv4Addr, Ipv6Addr};

pub use crate::{
    config::{ServiceOptions, COOKIE_PORT, LB_COOKIE_PORT},
    data::{test_data_sha256, write_test_data},
    impair::Impairment,
    lab::{Lab, Launch, EXEC_TIMEOUT},
    netns::reap_stale_labs,
};

pub const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const BACKEND_COUNT: usize = 3;
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const BALANCER_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const BALANCER_BACKEND_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x10);
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 2);
pub const BALANCER_CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1);
pub const BALANCER_BACKEND_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 1);
pub const HTTP_PORT: u16 = 80;
pub const ECHO_PORT: u16 = 7;

/// Whether this process runs as root, which the lab needs.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
