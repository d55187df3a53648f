//! The balancer configuration for a lab: services `web` (tcp/80), `echo-tcp` and `echo-udp`
//! (port 7) on the VIP, each over the lab's backends, and the same three on the IPv6 VIP over
//! the backends' IPv6 addresses (`web-v6`, `echo-tcp-v6`, `echo-udp-v6`).

use std::{net::IpAddr, ops::Range};

use crate::{Lab, BACKEND_COUNT, ECHO_PORT, HTTP_PORT, VIP, VIP6};

/// Variations of the lab's `web` service.
#[derive(Default)]
pub struct ServiceOptions {
    /// Extra TOML lines for the service.
    pub web_settings: String,
    /// Only the first backends (all three when `None`).
    pub web_backend_count: Option<usize>,
    /// A second HTTP service, `web-cookie` on port [`COOKIE_PORT`], with `app-cookie`
    /// affinity on the backends' `SID` cookie, over as many backends as `web` but counted from
    /// the last: the backend leg of a cookie connection carries the balancer's clock in its
    /// timestamps, `web`'s L4 flows the client's (which Linux here offsets per 4-tuple), so the
    /// backends' TIME_WAIT sockets one leaves cannot tell the other's new connection from the
    /// same client port from an old segment, and would stall it.
    pub cookie_service: bool,
    /// A third HTTP service, `web-lb-cookie` on port [`LB_COOKIE_PORT`], with `lb-cookie`
    /// affinity, on this backend alone (for the same TIME_WAIT reason).
    pub lb_cookie_backend: Option<usize>,
    /// Extra TOML lines for the `web-v6` service.
    pub web6_settings: String,
    /// Only the first backends for `web-v6` (all three when `None`).
    pub web6_backend_count: Option<usize>,
    /// TOML tables after the services (`[[source_network]]`, more `[[service]]`s).
    pub extra_tables: String,
}

/// The key that signs the lab's `lb-cookie` cookies.
pub const LAB_COOKIE_SECRET: &str = "the namespace lab's cookie signing key";

/// The VIP port of the optional `web-cookie` service.
pub const COOKIE_PORT: u16 = 8080;
/// The VIP port of the optional `web-lb-cookie` service.
pub const LB_COOKIE_PORT: u16 = 8081;

/// The environment variable that sets the agent's binding workers in the lab's configuration
/// (absent: the agent's default, one per CPU).
pub const AGENT_WORKERS_VARIABLE: &str = "LAB_AGENT_WORKERS";

impl Lab {
    /// The agent's TOML configuration for this lab.
    pub fn balancer_config(&self) -> String {
        self.balancer_config_with(&ServiceOptions::default())
    }

    /// The lab's configuration with extra settings for the `web` service.
    pub fn balancer_config_with(&self, options: &ServiceOptions) -> String {
        let web_count = options.web_backend_count.unwrap_or(BACKEND_COUNT);
        let mut toml = format!(
            "instance = \"{}\"\n\
             client_interface = \"lb-client\"\n\
             backend_interface = \"lb-backend\"\n\
             xdp_mode = \"native\"\n\
             stats_interval = 1\n\
             cookie_keys = [{{ id = 1, secret = \"{LAB_COOKIE_SECRET}\" }}]\n",
            self.instance()
        );
        // `cargo xtask test` runs the cookie suites again on one binding worker.
        if let Ok(workers) = std::env::var(AGENT_WORKERS_VARIABLE) {
            toml += &format!("agent_workers = {workers}\n");
        }
        toml += &service("web", HTTP_PORT, "tcp", &options.web_settings, 0..web_count);
        let web6_count = options.web6_backend_count.unwrap_or(BACKEND_COUNT);
        toml += &service_v6(
            "web-v6",
            HTTP_PORT,
            "tcp",
            &options.web6_settings,
            0..web6_count,
        );
        if options.cookie_service {
            let settings = "affinity = \"app-cookie\"\ncookie = \"SID\"";
            toml += &service_on(
                "web-cookie",
                COOKIE_PORT,
                HTTP_PORT,
                "tcp",
                settings,
                BACKEND_COUNT - web_count..BACKEND_COUNT,
            );
        }
        if let Some(backend) = options.lb_cookie_backend {
            toml += &service_on(
                "web-lb-cookie",
                LB_COOKIE_PORT,
                HTTP_PORT,
                "tcp",
                "affinity = \"lb-cookie\"",
                backend..backend + 1,
            );
        }
        toml += &service("echo-tcp", ECHO_PORT, "tcp", "", 0..BACKEND_COUNT);
        toml += &service("echo-udp", ECHO_PORT, "udp", "", 0..BACKEND_COUNT);
        toml += &service_v6("echo-tcp-v6", ECHO_PORT, "tcp", "", 0..BACKEND_COUNT);
        toml += &service_v6("echo-udp-v6", ECHO_PORT, "udp", "", 0..BACKEND_COUNT);
        toml += "\n";
        toml += &options.extra_tables;
        toml
    }
}

/// A service on the IPv6 VIP over the IPv6 addresses of the lab's backends `backends`.
fn service_v6(
    name: &str,
    port: u16,
    protocol: &str,
    settings: &str,
    backends: Range<usize>,
) -> String {
    let backends = backends.map(|i| (i, IpAddr::from(Lab::backend_addr6(i))));
    service_at(
        IpAddr::from(VIP6),
        name,
        (port, port),
        protocol,
        settings,
        backends,
    )
}

fn service(
    name: &str,
    port: u16,
    protocol: &str,
    settings: &str,
    backends: Range<usize>,
) -> String {
    service_on(name, port, port, protocol, settings, backends)
}

/// A service on VIP port `port` over the lab's backends `backends`, listening on
/// `backend_port`.
fn service_on(
    name: &str,
    port: u16,
    backend_port: u16,
    protocol: &str,
    settings: &str,
    backends: Range<usize>,
) -> String {
    let addrs = backends.map(|i| (i, IpAddr::from(Lab::backend_addr(i))));
    service_at(
        IpAddr::from(VIP),
        name,
        (port, backend_port),
        protocol,
        settings,
        addrs,
    )
}

fn service_at(
    vip: IpAddr,
    name: &str,
    (port, backend_port): (u16, u16),
    protocol: &str,
    settings: &str,
    backends: impl Iterator<Item = (usize, IpAddr)>,
) -> String {
    let mut toml = format!(
        "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \"{protocol}\"\n"
    );
    if !settings.is_empty() {
        toml += settings.trim_end();
        toml += "\n";
    }
    for (index, addr) in backends {
        toml += &format!(
            "  [[service.backend]]\n  name = \"{}\"\n  address = \"{addr}\"\n  port = {backend_port}\n",
            Lab::backend_name(index)
        );
    }
    toml
}
