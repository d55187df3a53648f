//! The agent's binding workers. Each is a thread that owns the cookie connections XDP steers
//! to its punt ring (those of the client prefixes that hash to it, see
//! [`balancer_common::worker_of`]): it reads the ring, keeps their state, budgets and raw
//! sockets, and writes their map entries through handles of its own, so no two workers share
//! anything on the way of a connection. The agent's task (control socket, health checks,
//! reloads, metrics) reaches the workers by messages: the services they place by after every
//! change, and requests for what they counted.

use std::{
    cell::RefCell,
    net::IpAddr,
    sync::{mpsc as reply, Arc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use balancer_common::Punt;
use prometheus_client::metrics::histogram::Histogram;
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tracing::{error, info};

use super::{
    binding::{Binder, BindingLimits},
    counters::Tallies,
    ServiceRuntime,
};
use crate::{config::Config, connections::ConnectionMaps};

/// Punted frames handled before the worker looks at its timers and messages again.
const PUNT_BATCH: usize = 256;
/// How often a worker resends what went unanswered and lets go of what timed out.
const BINDING_TICK: Duration = Duration::from_millis(200);
/// How long the agent waits for its workers to say what they counted, all together: it
/// waits on the task that also tells the data plane it is alive. A worker late to answer
/// counts with its previous answer.
const TALLY_WAIT: Duration = Duration::from_millis(200);
/// New sources a worker's tally channel holds for the agent (drained ten times a second).
const NEW_SOURCE_BACKLOG: usize = 16_384;

/// What placement reads, as the agent's task last changed it.
pub struct View {
    pub services: Vec<ServiceRuntime>,
    pub config: Arc<Config>,
    pub limits: BindingLimits,
}

enum Message {
    View(Arc<View>),
    Tallies(reply::Sender<Tallies>),
}

/// A new connection's client and service, for the agent's tally of top sources, with the
/// second it came.
pub type NewSource = (IpAddr, u32, u64);

/// The binding state of one worker's connections and what it binds them with.
pub struct Worker {
    pub(super) binder: Binder,
    pub(super) maps: ConnectionMaps,
    pub(super) services: Vec<ServiceRuntime>,
    pub(super) config: Arc<Config>,
    new_sources: reply::SyncSender<NewSource>,
}

impl Worker {
    fn take_view(&mut self, view: &View) {
        self.services = view.services.clone();
        self.config = view.config.clone();
        self.binder.set_limits(view.limits);
    }

    /// Tells the agent's tally a new connection came from `client` to `service`; dropped
    /// when the agent is behind.
    pub(super) fn note_new_source(&self, client: IpAddr, service: u32) {
        let now = u64::from(crate::dataplane::monotonic_seconds());
        let _ = self.new_sources.try_send((client, service, now));
    }

    async fn run(
        mut self,
        ring: RingBuf<MapData>,
        mut inbox: mpsc::UnboundedReceiver<Message>,
    ) -> Result<()> {
        // SAFETY: the ring buffer owns its descriptor for as long as the `AsyncFd` owns it.
        let mut punts = unsafe { AsyncFd::register(ring) }
            .map_err(|error| anyhow::anyhow!("watching the punt ring: {}", error.into_parts().1))?;
        // Frames a previous run left in the ring need the services to be placed: the worker
        // reads it once the agent has shared them.
        loop {
            match inbox.recv().await {
                Some(Message::View(view)) => {
                    self.take_view(&view);
                    break;
                }
                Some(Message::Tallies(answer)) => {
                    let _ = answer.send(self.binder.tallies());
                }
                None => return Ok(()),
            }
        }
        let mut tick = tokio::time::interval(BINDING_TICK);
        let mut record = Vec::with_capacity(size_of::<Punt>());
        loop {
            tokio::select! {
                ready = punts.readable_mut() => {
                    let mut guard = ready.context("waiting on the punt ring")?;
                    let ring = guard.get_inner_mut();
                    let mut handled = 0;
                    while handled < PUNT_BATCH {
                        let Some(item) = ring.next() else { break };
                        record.clear();
                        record.extend_from_slice(&item[..Punt::used_len(&item)]);
                        drop(item);
                        self.on_punt(&record);
                        handled += 1;
                    }
                    // A full batch leaves the ring ready: the loop comes back to it after the
                    // tick and messages that are due.
                    if handled < PUNT_BATCH {
                        guard.clear_ready();
                    }
                }
                _ = tick.tick() => self.binding_tick(),
                message = inbox.recv() => match message {
                    Some(Message::View(view)) => self.take_view(&view),
                    Some(Message::Tallies(answer)) => {
                        let _ = answer.send(self.binder.tallies());
                    }
                    // The agent is stopping.
                    None => break,
                },
            }
            self.flush_sends();
        }
        Ok(())
    }
}

/// The agent's side of its workers.
pub struct Workers {
    inboxes: Vec<mpsc::UnboundedSender<Message>>,
    threads: Vec<JoinHandle<()>>,
    /// Every worker's new connections, for the tally of top sources.
    pub new_sources: reply::Receiver<NewSource>,
    /// Each worker's latest answer to [`Workers::tallies_each`].
    answered: RefCell<Vec<Tallies>>,
}

impl Workers {
    /// Starts a worker on each ring, the `n`th reading `rings[n]` once the first view is
    /// shared.
    pub fn start(
        rings: Vec<RingBuf<MapData>>,
        config: &Config,
        binding_latency: &Histogram,
    ) -> Result<Workers> {
        let (tally, new_sources) = reply::sync_channel(NEW_SOURCE_BACKLOG);
        let mut workers = Workers {
            inboxes: Vec::new(),
            threads: Vec::new(),
            new_sources,
            answered: RefCell::new(vec![Tallies::default(); rings.len()]),
        };
        let count = rings.len() as u32;
        let shared_config = Arc::new(config.clone());
        for (index, ring) in rings.into_iter().enumerate() {
            let share = (index as u32, count);
            let worker = Worker {
                binder: Binder::new(
                    super::binding_limits(config, count),
                    binding_latency.clone(),
                    share,
                )?,
                maps: ConnectionMaps::open(&config.instance)?,
                services: Vec::new(),
                config: shared_config.clone(),
                new_sources: tally.clone(),
            };
            let (inbox, messages) = mpsc::unbounded_channel();
            let thread = std::thread::Builder::new()
                .name(format!("binder-{index}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    let outcome = runtime
                        .context("starting the worker's runtime")
                        .and_then(|runtime| runtime.block_on(worker.run(ring, messages)));
                    if let Err(error) = outcome {
                        error!(worker = index, "binding worker stopped: {error:#}");
                    }
                })
                .context("starting a binding worker")?;
            workers.inboxes.push(inbox);
            workers.threads.push(thread);
        }
        info!(workers = workers.threads.len(), "binding workers started");
        Ok(workers)
    }

    /// Hands every worker the services and settings placement reads now.
    pub fn share(&self, view: View) {
        let view = Arc::new(view);
        for inbox in &self.inboxes {
            let _ = inbox.send(Message::View(view.clone()));
        }
    }

    /// What the workers counted, summed.
    pub fn tallies(&self) -> Tallies {
        Tallies::sum(self.tallies_each())
    }

    /// What each worker counted (as it last said, for one that did not answer in time).
    pub fn tallies_each(&self) -> Vec<Tallies> {
        let answers: Vec<_> = self
            .inboxes
            .iter()
            .map(|inbox| {
                let (answer, tally) = reply::channel();
                let _ = inbox.send(Message::Tallies(answer));
                tally
            })
            .collect();
        let deadline = Instant::now() + TALLY_WAIT;
        let mut answered = self.answered.borrow_mut();
        for (last, tally) in answered.iter_mut().zip(answers) {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(tallies) = tally.recv_timeout(left) {
                *last = tallies;
            }
        }
        answered.clone()
    }

    /// The first worker that stopped, if one did: its connections would go unbound.
    pub fn stopped(&self) -> Option<usize> {
        self.threads.iter().position(|thread| thread.is_finished())
    }

    /// Stops the workers, each after the batch it is on.
    pub fn stop(self) {
        drop(self.inboxes);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}
