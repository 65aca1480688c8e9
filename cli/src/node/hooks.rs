//! What the FUSE threads see of the node ([`FsHooks`]): whether they may write, how far
//! the peer has got, and the waits of sync mode and of async mode's `max_lag`.
//!
//! The driver is the only task that touches the replicator; after every event it publishes
//! what the writers need here ([`Shared::publish`]), and the writers wait on condition
//! variables — never on the driver itself, except for the moment it takes to persist that
//! the pair is degraded.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use pairfs::Seq;
use pairfs::repl::{Backpressure, Takeover};
use pairfs_fs::{Fs, FsError, FsHooks, FsResult};
use tokio::sync::mpsc;

use super::Event;

/// How long a writer waits for the driver to persist that the pair is degraded before it
/// goes on (the driver does it in a millisecond; this only bounds a stuck disk).
const DEGRADED_PERSIST_WAIT: Duration = Duration::from_secs(1);

/// The peer's progress as last acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerProgress {
    pub received: Seq,
    pub durable: Seq,
}

/// What the driver publishes for the writers after every event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gate {
    /// The filesystem may write (not while a primary reconciles after a crash).
    pub admits: bool,
    /// Sync mode, not degraded: writes and fsyncs wait for the peer.
    pub sync_waits: bool,
    /// Async mode: the backlog writers are held to.
    pub backpressure: Option<Backpressure>,
}

/// Shared between the driver, the FUSE threads and the control socket.
pub struct Shared {
    pub events: mpsc::UnboundedSender<Event>,
    /// Events the driver takes before those waiting in `events`: the operator's requests
    /// (status, verify, takeover), the peer's control-stream messages and the connections
    /// they arrive on. None of them waits behind the replicated entries queued for apply
    /// (up to two of the largest); the two streams are independent on the wire already
    /// (docs/PROTOCOL.md §3), so this changes no order the protocol relies on.
    pub priority: mpsc::UnboundedSender<Event>,
    peer: Mutex<PeerProgress>,
    peer_cv: Condvar,
    gate: Mutex<Gate>,
    gate_cv: Condvar,
    /// The connection's bytes on the wire, as of the last status or its end.
    pub wire_sent: AtomicU64,
    pub wire_received: AtomicU64,
    /// A writer gave up waiting for the backlog to shrink (logged once per episode).
    lag_warned: AtomicBool,
    sync_timeout: Duration,
    /// What the peer's fetches are answered from ([`Serving`] as a number).
    serving: AtomicU8,
    /// This node's role just changed: the dialler reconnects without its backoff.
    pub role_changed: AtomicBool,
    /// What fetches are answered from (set once the node's volume is known).
    pub fetch_source: std::sync::OnceLock<std::sync::Arc<super::fetch::FetchSource>>,
    /// What this node's reads of blocks on the peer go through; the link publishes each
    /// connection to it directly, so that a reader never waits for the driver.
    pub fetch_client: std::sync::OnceLock<std::sync::Arc<super::fetch::FetchClient>>,
}

impl Shared {
    pub fn new(
        events: mpsc::UnboundedSender<Event>,
        priority: mpsc::UnboundedSender<Event>,
        sync_timeout: Duration,
    ) -> Shared {
        Shared {
            events,
            priority,
            peer: Mutex::new(PeerProgress::default()),
            peer_cv: Condvar::new(),
            gate: Mutex::new(Gate {
                admits: false,
                sync_waits: false,
                backpressure: None,
            }),
            gate_cv: Condvar::new(),
            wire_sent: AtomicU64::new(0),
            wire_received: AtomicU64::new(0),
            lag_warned: AtomicBool::new(false),
            sync_timeout,
            serving: AtomicU8::new(Serving::Nothing as u8),
            role_changed: AtomicBool::new(false),
            fetch_source: std::sync::OnceLock::new(),
            fetch_client: std::sync::OnceLock::new(),
        }
    }

    /// Driver: the peer acknowledged this progress.
    /// The role change under way is now `t`: what the peer's fetches are answered from.
    pub fn set_serving(&self, t: Option<Takeover>) {
        self.serving.store(Serving::of(t) as u8, Ordering::Release);
    }

    /// What the peer's fetches are answered from.
    pub fn serving(&self) -> Serving {
        match self.serving.load(Ordering::Acquire) {
            1 => Serving::Newest,
            2 => Serving::Applied,
            _ => Serving::Nothing,
        }
    }

    pub fn set_peer(&self, p: PeerProgress) {
        let mut g = lock(&self.peer);
        if *g != p {
            *g = p;
            self.peer_cv.notify_all();
        }
    }

    /// Driver: what the writers may do now.
    pub fn publish(&self, gate: Gate) {
        let mut g = lock(&self.gate);
        if *g == gate {
            return;
        }
        if gate.backpressure.is_none() {
            self.lag_warned.store(false, Ordering::Release);
        }
        let stops_waiting = g.sync_waits && !gate.sync_waits;
        *g = gate;
        self.gate_cv.notify_all();
        drop(g);
        if stops_waiting {
            // Wake the writers waiting for the peer: they no longer need to.
            let _p = lock(&self.peer);
            self.peer_cv.notify_all();
        }
    }

    fn gate(&self) -> Gate {
        *lock(&self.gate)
    }

    /// Async mode: waits while the peer is further behind than `max_lag` allows (for at
    /// most the sync timeout per write, so a peer that stalls without disconnecting slows
    /// writers down but does not stop them).
    fn lag_wait(&self, fs: &Fs) {
        let gave_up = wait_while(&self.gate, &self.gate_cv, self.sync_timeout, |g| {
            g.backpressure.is_some_and(|b| {
                // (Never called with the volume locked: FS hooks run after the commit.)
                let open = fs.with_volume(|v| v.open_entry_bytes());
                b.exceeded(pairfs::types::now_ns(), open)
            })
        });
        if let Some(b) = gave_up.and_then(|g| g.backpressure) {
            if !self.lag_warned.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    lag_bytes = b.bytes,
                    "replication: the peer stays behind the lag limit; writers go on without waiting for it"
                );
            }
        }
    }

    /// Sync mode: waits until the peer has `target` (`what` of its progress), at most the
    /// sync timeout; then the pair is degraded (persisted before this returns).
    fn wait_peer(&self, target: Seq, what: fn(&PeerProgress) -> Seq) {
        let gave_up = wait_while(&self.peer, &self.peer_cv, self.sync_timeout, |p| {
            what(p) < target && self.gate().sync_waits
        });
        if gave_up.is_none() {
            return;
        }
        let (done, persisted) = std::sync::mpsc::channel();
        if self
            .events
            .send(Event::Degraded { seq: target, done })
            .is_ok()
        {
            let _ = persisted.recv_timeout(DEGRADED_PERSIST_WAIT);
        }
    }
}

impl FsHooks for Shared {
    fn entries(&self) {
        let _ = self.events.send(Event::Entries);
    }

    fn admit(&self) -> FsResult<()> {
        // A reconciliation ends within the sync timeout (then writes go on in a new
        // generation); twice that and more means the node is stuck: fail the write.
        let limit = 2 * self.sync_timeout + Duration::from_secs(5);
        match wait_while(&self.gate, &self.gate_cv, limit, |g| !g.admits) {
            None => Ok(()),
            Some(_) => Err(FsError::Replication(
                "the node does not admit writes (still reconciling with its peer after a crash)"
                    .into(),
            )),
        }
    }

    fn admits(&self) -> bool {
        self.gate().admits
    }

    fn committed(&self, fs: &Fs) -> FsResult<()> {
        if !self.gate().sync_waits {
            self.lag_wait(fs);
            return Ok(());
        }
        // Sync mode: the write is acknowledged once its entry is written on both nodes.
        // Seal it (with whatever other writers committed meanwhile), then wait.
        let target = fs.seal()?;
        self.wait_peer(target, |p| p.received);
        Ok(())
    }

    fn syncing(&self, seq: Seq) {
        if self.gate().sync_waits {
            let _ = self.events.send(Event::Flush(seq));
        }
    }

    fn synced(&self, seq: Seq) -> FsResult<()> {
        if self.gate().sync_waits {
            self.wait_peer(seq, |p| p.durable);
        }
        Ok(())
    }
}

/// What a node answers its peer's fetches from (docs/PROTOCOL.md §7.4, §7.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serving {
    /// Not frozen: it serves no fetches.
    Nothing = 0,
    /// A frozen node (an old primary, or a taker frozen by a failback): the newest version
    /// it holds, its local-unreflected area included.
    Newest = 1,
    /// A frozen old primary taking over again: the version of its own freeze point, in its
    /// journal and normal area (its new writes, in its local-unreflected area, come later
    /// in the chain than anything the peer may ask for).
    Applied = 2,
}

impl Serving {
    fn of(t: Option<Takeover>) -> Serving {
        match t {
            Some(Takeover::Source { .. } | Takeover::FrozenTaker { .. }) => Serving::Newest,
            Some(Takeover::Retaker { .. }) => Serving::Applied,
            Some(Takeover::Taker { .. }) | None => Serving::Nothing,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv` while `blocked` holds for the value in `m`, for at most `limit`. Returns
/// the value when it gave up, `None` when no longer blocked.
fn wait_while<T: Copy>(
    m: &Mutex<T>,
    cv: &Condvar,
    limit: Duration,
    mut blocked: impl FnMut(&T) -> bool,
) -> Option<T> {
    let deadline = Instant::now() + limit;
    let mut g = lock(m);
    while blocked(&g) {
        let now = Instant::now();
        if now >= deadline {
            return Some(*g);
        }
        g = cv
            .wait_timeout(g, deadline - now)
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
    None
}
