//! `lab-impair`: the lab's impairment relay. Bridges two interfaces of its namespace frame by
//! frame over AF_PACKET sockets and, in each direction, drops, duplicates, reorders and
//! delays frames at the rates given (see `balancer_lab::impair`). Writes its counters every
//! 100 ms to the file named by `--counters`; runs until it is killed.

use std::{
    collections::VecDeque,
    fs,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use balancer_lab::{
    impair::{Impairment, COUNTERS, DIRECTIONS, MAX_WIRE_FRAME},
    xdp,
};
use clap::Parser;

/// How long a frame chosen for reordering waits for a later frame to overtake it.
const REORDER_HOLD: Duration = Duration::from_millis(2);
const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];

/// Room in each socket's receive queue: the relay must not add losses of its own.
const RECEIVE_BUFFER: libc::c_int = 8 << 20;
const COUNTER_PERIOD: Duration = Duration::from_millis(100);
/// Larger than any frame the lab sends (GRO is off on the relay's ports).
const MAX_FRAME: usize = 65536;

const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

#[derive(Parser)]
#[command(
    about = "The namespace lab's impairment relay: bridges two interfaces and drops, \
                   duplicates, reorders and delays frames at the given rates"
)]
struct Args {
    /// The port towards the client.
    #[arg(long)]
    client_port: String,
    /// The port towards the balancer host; an XDP program that passes every frame is attached
    /// to it, so that frames the balancer's XDP program sends into the link are accepted.
    #[arg(long)]
    balancer_port: String,
    /// Percent of frames dropped, per direction.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Percent of frames held back behind the next frame, per direction.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// Percent of frames sent twice, per direction.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Delay added to every frame, in microseconds.
    #[arg(long, default_value_t = 0)]
    delay_us: u64,
    /// Where to write the counters.
    #[arg(long)]
    counters: PathBuf,
    /// Seed of the random choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
}

type Counters = [AtomicU64; COUNTERS.len()];

fn counter(name: &str) -> usize {
    COUNTERS
        .iter()
        .position(|c| *c == name)
        .unwrap_or_else(|| unreachable!("{name} is one of COUNTERS"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let impairment = Impairment {
        loss: args.loss,
        reorder: args.reorder,
        duplicate: args.duplicate,
        delay: Duration::from_micros(args.delay_us),
    };
    impairment.validate()?;
    let client = packet_socket(&args.client_port)?;
    let balancer = packet_socket(&args.balancer_port)?;
    // A veth drops frames that an XDP program redirects into it unless it runs XDP itself or
    // has GRO on, and GRO would hand the relay merged frames larger than the link can send.
    let _pass = xdp::attach(xdp::interface_index(&args.balancer_port)?, 0.0)
        .with_context(|| format!("attaching an XDP pass program to {}", args.balancer_port))?;

    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let counters: Arc<[Counters; 2]> = Arc::new(Default::default());
    let sockets = [(&client, &balancer), (&balancer, &client)];
    for (index, (from, to)) in sockets.into_iter().enumerate() {
        let relay = Relay {
            from: from.as_raw_fd(),
            to: to.as_raw_fd(),
            impairment: impairment.clone(),
            random: Random::new(seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            counters: counters.clone(),
            direction: index,
            held: None,
            delayed: VecDeque::new(),
        };
        thread::Builder::new()
            .name(DIRECTIONS[index].into())
            .spawn(move || relay.run())
            .context("starting a relay thread")?;
    }
    eprintln!(
        "lab-impair: {} <-> {}: {impairment:?}, seed {seed}",
        args.client_port, args.balancer_port
    );
    let receivers = [client.as_raw_fd(), balancer.as_raw_fd()];
    loop {
        for (direction, fd) in receivers.into_iter().enumerate() {
            counters[direction][counter("socket_drops")]
                .fetch_add(socket_drops(fd), Ordering::Relaxed);
        }
        write_counters(&args.counters, &counters)?;
        thread::sleep(COUNTER_PERIOD);
    }
}

/// One direction of the link.
struct Relay {
    from: RawFd,
    to: RawFd,
    impairment: Impairment,
    random: Random,
    counters: Arc<[Counters; 2]>,
    direction: usize,
    /// A frame waiting for a later one to overtake it, and when it goes anyway.
    held: Option<(Instant, Vec<u8>)>,
    /// Frames waiting out the delay, with when each is due.
    delayed: VecDeque<(Instant, Vec<u8>)>,
}

impl Relay {
    fn run(mut self) {
        let mut frame = vec![0u8; MAX_FRAME];
        loop {
            if wait_readable(self.from, self.next_due()) {
                // SAFETY: `frame` is a writable buffer of `frame.len()` bytes.
                let read = unsafe {
                    libc::recv(
                        self.from,
                        frame.as_mut_ptr().cast(),
                        frame.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if read > 0 {
                    self.impair(&frame[..read as usize]);
                }
            }
            self.release_due(Instant::now());
        }
    }

    fn count(&self, name: &str) {
        self.counters[self.direction][counter(name)].fetch_add(1, Ordering::Relaxed);
    }

    fn chance(&mut self, percent: f64) -> bool {
        percent > 0.0 && self.random.percent() < percent
    }

    fn impair(&mut self, frame: &[u8]) {
        self.count("frames");
        if frame.len() > MAX_WIRE_FRAME {
            self.count("oversized");
        }
        // Address resolution passes untouched: three lost ARP requests make the kernel fail a
        // connect with "no route to host" after 3 s, a loss the IP traffic under test never saw.
        if frame.get(12..14) == Some(&ETHERTYPE_ARP) {
            self.emit(frame.to_vec());
            return;
        }
        if self.chance(self.impairment.loss) {
            self.count("dropped");
            return;
        }
        let copies = if self.chance(self.impairment.duplicate) {
            self.count("duplicated");
            2
        } else {
            1
        };
        for _ in 0..copies {
            if self.held.is_none() && self.chance(self.impairment.reorder) {
                self.held = Some((Instant::now() + REORDER_HOLD, frame.to_vec()));
                continue;
            }
            self.emit(frame.to_vec());
            if let Some((_, overtaken)) = self.held.take() {
                self.count("reordered");
                self.emit(overtaken);
            }
        }
    }

    /// Sends a frame after the delay.
    fn emit(&mut self, frame: Vec<u8>) {
        if self.impairment.delay.is_zero() {
            self.send(&frame);
        } else {
            self.delayed
                .push_back((Instant::now() + self.impairment.delay, frame));
        }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is a readable buffer of `frame.len()` bytes.
        let sent = unsafe { libc::send(self.to, frame.as_ptr().cast(), frame.len(), 0) };
        if sent < 0 {
            self.count("send_errors");
        }
    }

    fn next_due(&self) -> Option<Instant> {
        let held = self.held.as_ref().map(|(due, _)| *due);
        let delayed = self.delayed.front().map(|(due, _)| *due);
        held.into_iter().chain(delayed).min()
    }

    fn release_due(&mut self, now: Instant) {
        if self.held.as_ref().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, frame)) = self.held.take() {
                self.emit(frame);
            }
        }
        while self.delayed.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, frame)) = self.delayed.pop_front() {
                self.send(&frame);
            }
        }
    }
}

/// xorshift64*: plenty for choosing frames, and reproducible from `--seed`.
struct Random(u64);

impl Random {
    fn new(seed: u64) -> Random {
        Random(seed.max(1))
    }

    /// Uniform in [0, 100).
    fn percent(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
        bits as f64 / (1u64 << 53) as f64 * 100.0
    }
}

/// Waits until `fd` has a frame or `due` comes (at most 100 ms); true when readable.
fn wait_readable(fd: RawFd, due: Option<Instant>) -> bool {
    let wait = due.map_or(COUNTER_PERIOD, |due| {
        due.saturating_duration_since(Instant::now())
    });
    let timeout = libc::timespec {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_nsec: wait.subsec_nanos() as libc::c_long,
    };
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a valid timeout, no signal mask.
    let ready = unsafe { libc::ppoll(&mut poll, 1, &timeout, std::ptr::null()) };
    ready > 0 && poll.revents & libc::POLLIN != 0
}

fn check(rc: libc::c_int, what: &str) -> Result<()> {
    if rc < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_option<T>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
    what: &str,
) -> Result<()> {
    // SAFETY: `value` is a valid `T` for the option's size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    check(rc, what)
}

/// A packet socket on `name` that sees every frame the interface receives, in promiscuous
/// mode, but not the frames sent on it.
fn packet_socket(name: &str) -> Result<OwnedFd> {
    let index = xdp::interface_index(name)?;
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket call; the fd is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, all.into()) };
    check(fd, "opening a packet socket")?;
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zero is a valid start.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = all;
    address.sll_ifindex = index as i32;
    // SAFETY: `address` is a valid sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd,
            (&address as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    check(rc, &format!("binding a packet socket to {name}"))?;
    set_option(
        fd,
        libc::SOL_PACKET,
        PACKET_IGNORE_OUTGOING,
        &1i32,
        "ignoring outgoing frames",
    )?;
    let promiscuous = libc::packet_mreq {
        mr_ifindex: index as i32,
        mr_type: libc::PACKET_MR_PROMISC as u16,
        mr_alen: 0,
        mr_address: [0; 8],
    };
    set_option(
        fd,
        libc::SOL_PACKET,
        libc::PACKET_ADD_MEMBERSHIP,
        &promiscuous,
        "promiscuous mode",
    )?;
    set_option(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        &RECEIVE_BUFFER,
        "the receive buffer",
    )?;
    Ok(socket)
}

/// Frames the kernel dropped on `fd` since the last call (reading the statistics resets them).
fn socket_drops(fd: RawFd) -> u64 {
    let mut stats = libc::tpacket_stats {
        tp_packets: 0,
        tp_drops: 0,
    };
    let mut size = size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: `stats` is writable for `size` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut stats as *mut libc::tpacket_stats).cast(),
            &mut size,
        )
    };
    if rc == 0 {
        stats.tp_drops.into()
    } else {
        0
    }
}

/// Writes `<direction>_<counter> <value>` lines, replacing the file whole.
fn write_counters(path: &Path, counters: &[Counters; 2]) -> Result<()> {
    let mut text = String::new();
    for (direction, values) in DIRECTIONS.iter().zip(counters) {
        for (name, value) in COUNTERS.iter().zip(values) {
            text.push_str(&format!(
                "{direction}_{name} {}\n",
                value.load(Ordering::Relaxed)
            ));
        }
    }
    let partial = path.with_extension("partial");
    fs::write(&partial, text).with_context(|| format!("writing {}", partial.display()))?;
    fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))
}
