//! The node daemon: drives the sans-IO [`Replicator`] with a QUIC connection to the peer,
//! the local volume (directly, or through the mounted filesystem) and the files of
//! `state.rs` (docs/DESIGN.md §2: the transport and the daemon only drive the core).
//!
//! Threads: a tokio runtime (two workers) runs the connection manager, the per-connection
//! readers and writers, the control socket and the driver; the driver is the only task
//! that touches the replicator, and carries out its actions in order. Copies run on a
//! blocking thread. The FUSE threads reach the node only through [`FsHooks`]
//! (`hooks.rs`).
//!
//! - `link.rs`: the QUIC connection and its streams, with a bounded receive budget;
//! - `driver.rs`: the replicator's events and actions on the volume;
//! - `hooks.rs`: what the writers wait for;
//! - `control.rs`: the control socket (`pairfs status`, `pairfs verify`);
//! - `verify.rs`: the online verify job (docs/PROTOCOL.md §5.5);
//! - `takeover.rs`, `fetch.rs`, `force.rs`: planned and forced takeovers (§7).

pub mod control;
pub mod driver;
pub mod fetch;
pub mod force;
pub mod hooks;
pub mod link;
pub mod takeover;
pub mod verify;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pairfs::repl::{PersistedState, ReplConfig, Replicator, Role};
use pairfs::{Seq, Volume};
use pairfs_fs::Fs;
use pairfs_fs::replica::Invalidations;
use pairfs_transport::{Endpoint, Identity, TransportConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

pub use control::{query_status, run_takeover, run_verify};
pub use hooks::Shared;
pub use verify::{VerifyReport, VerifyUpdate};

use crate::config::NodeConfig;
use crate::state::{DiffBitmap, load_state, save_state};

/// The mount's read-only flag, shared by the maintenance loop (which makes it follow the
/// filesystem's mode) and a role change (which must not wait for that loop).
pub type MountFlag = Arc<Mutex<Option<pairfs_fs::fuse::ReadOnlyFlag>>>;

/// Opens the node's volume again (after an I/O error poisoned it).
pub type Reopen = Box<dyn Fn() -> Result<Volume> + Send + Sync>;

/// Where the node's volume lives: alone (`serve`, or a secondary waiting for its first
/// copy) or inside the mounted filesystem.
pub struct Host {
    bare: Mutex<Option<Volume>>,
    fs: OnceLock<Arc<Fs>>,
    notifier: Mutex<Option<fuser::Notifier>>,
    shared: OnceLock<Arc<Shared>>,
    reopen: Reopen,
    mount_flag: OnceLock<MountFlag>,
}

impl Host {
    pub fn bare(v: Volume, reopen: Reopen) -> Arc<Host> {
        Arc::new(Host {
            bare: Mutex::new(Some(v)),
            fs: OnceLock::new(),
            notifier: Mutex::new(None),
            shared: OnceLock::new(),
            reopen,
            mount_flag: OnceLock::new(),
        })
    }

    pub fn with_fs(fs: Arc<Fs>, reopen: Reopen) -> Arc<Host> {
        let h = Host {
            bare: Mutex::new(None),
            fs: OnceLock::new(),
            notifier: Mutex::new(None),
            shared: OnceLock::new(),
            reopen,
            mount_flag: OnceLock::new(),
        };
        let _ = h.fs.set(fs);
        Arc::new(h)
    }

    pub fn set_mount_flag(&self, f: MountFlag) {
        let _ = self.mount_flag.set(f);
    }

    /// Makes the mount's read-only flag match the filesystem's mode now (turning writable
    /// always succeeds; turning read-only is refused while files are open for writing, and
    /// the maintenance loop retries it).
    pub fn follow_mode_now(&self) {
        let (Some(fs), Some(flag)) = (self.fs.get(), self.mount_flag.get()) else {
            return;
        };
        let mut g = flag.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = g.as_mut() {
            let want = fs.mode() == pairfs_fs::FsMode::Replica;
            if let Err(e) = f.set(want) {
                tracing::debug!(error = %e, read_only = want, "the mount's flag follows later");
            }
        }
    }

    pub fn set_notifier(&self, n: fuser::Notifier) {
        *self.notifier.lock().unwrap_or_else(|e| e.into_inner()) = Some(n);
    }

    fn fs(&self) -> Option<&Arc<Fs>> {
        self.fs.get()
    }

    /// The mounted filesystem, if any.
    pub fn fs_arc(&self) -> Option<Arc<Fs>> {
        self.fs.get().cloned()
    }

    /// Opens the filesystem on the bare volume (atomically for the driver).
    pub fn promote(&self, open: impl FnOnce(Volume) -> pairfs_fs::FsResult<Fs>) -> Result<()> {
        let mut g = self.bare.lock().unwrap_or_else(|e| e.into_inner());
        let v = g.take().context("the volume is already in a filesystem")?;
        let fs = Arc::new(open(v)?);
        let _ = self.fs.set(fs);
        drop(g);
        Ok(())
    }

    /// Group commit and checkpoints of a bare volume (a mounted one has its own thread).
    pub fn maintain(&self) {
        if self.fs.get().is_some() {
            return;
        }
        let (did, writeback) = self.vol_mut(|v| (v.maintain(Instant::now()), v.take_writeback()));
        pairfs::volume::start_writeback(writeback);
        match did {
            Ok(true) => {
                if let Some(s) = self.shared.get() {
                    pairfs_fs::FsHooks::entries(&**s);
                }
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "background commit failed"),
        }
    }

    /// Flushes everything at shutdown.
    pub fn close(&self) -> Result<()> {
        match self.fs.get() {
            Some(fs) => fs.close().context("flushing at shutdown"),
            None => self.vol_mut(|v| v.close()).context("flushing at shutdown"),
        }
    }

    /// Runs `f` with the volume (write access). The filesystem's lock may be held for a
    /// while (a taker's reader waiting for a block from the peer): on a runtime worker the
    /// wait leaves the worker's other tasks — the connection among them, which that block
    /// arrives on — to another thread.
    fn vol_mut<T>(&self, f: impl FnOnce(&mut Volume) -> T) -> T {
        tokio::task::block_in_place(|| self.vol_mut_here(f))
    }

    /// [`Host::vol_mut`] for work that touches only memory or a few cached blocks, never
    /// the peer: run on this thread if the lock is free at once. `block_in_place` hands
    /// the worker's other tasks to another thread, a few context switches each time:
    /// per replicated entry, more than the work itself.
    fn vol_mut_quick<T>(&self, f: impl FnOnce(&mut Volume) -> T) -> T {
        match self.fs.get() {
            Some(fs) => match fs.try_with_volume_mut(f) {
                Ok(t) => t,
                Err(f) => self.vol_mut(f),
            },
            None => self.vol_mut(f),
        }
    }

    /// [`Host::vol`] as [`Host::vol_mut_quick`] is to [`Host::vol_mut`].
    fn vol_quick<T>(&self, f: impl FnOnce(&Volume) -> T) -> T {
        match self.fs.get() {
            Some(fs) => match fs.try_with_volume(f) {
                Ok(t) => t,
                Err(f) => self.vol(f),
            },
            None => self.vol(f),
        }
    }

    fn vol_mut_here<T>(&self, f: impl FnOnce(&mut Volume) -> T) -> T {
        if let Some(fs) = self.fs.get() {
            return fs.with_volume_mut(f);
        }
        let mut g = self.bare.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_mut() {
            Some(v) => f(v),
            None => {
                drop(g);
                // The volume moved into the filesystem in between.
                self.fs
                    .get()
                    .map(|fs| fs.with_volume_mut(f))
                    .expect("the volume is either bare or in the filesystem")
            }
        }
    }

    /// Runs `f` with the volume (read access; shares the filesystem's read lock; on a
    /// runtime worker, as [`Host::vol_mut`]).
    fn vol<T>(&self, f: impl FnOnce(&Volume) -> T) -> T {
        tokio::task::block_in_place(|| {
            if let Some(fs) = self.fs.get() {
                return fs.with_volume(f);
            }
            self.vol_mut_here(|v| f(v))
        })
    }

    /// Makes everything committed or applied durable; returns the newest durable seq.
    fn sync(&self) -> Result<Seq> {
        if let Some(fs) = self.fs.get() {
            match fs.is_read_only() {
                false => fs.sync()?,
                true => fs.sync_applied()?,
            }
            return Ok(fs.with_volume(|v| v.journal().durable_seq()));
        }
        self.vol_mut(|v| {
            v.sync()?;
            Ok(v.journal().durable_seq())
        })
    }

    /// Reopens the volume from disk (recovery runs again) in place of a poisoned one; a
    /// mounted filesystem reloads, and the kernel forgets everything it cached.
    fn reopen(&self) -> Result<()> {
        let v = (self.reopen)()?;
        match self.fs.get() {
            Some(fs) => {
                fs.replace_volume(v).context("reloading the filesystem")?;
                self.invalidate_all(fs);
            }
            None => {
                let mut g = self.bare.lock().unwrap_or_else(|e| e.into_inner());
                *g = Some(v);
            }
        }
        Ok(())
    }

    /// Makes the kernel forget every inode it holds of `fs` (the state underneath changed
    /// as a whole: a reopen, a takeover's start, a forced takeover going back).
    fn invalidate_all(&self, fs: &Fs) {
        let mut inodes = fs.referenced_inode_list();
        inodes.push(1);
        self.invalidate(&Invalidations {
            inodes,
            entries: Vec::new(),
        });
    }

    /// Makes the kernel forget what changed underneath a replica's mount. Reads that were
    /// served from the state before are answered first, so that no page they bring into
    /// the kernel's cache can outlive the invalidation.
    fn invalidate(&self, inv: &Invalidations) {
        let n = self.notifier.lock().unwrap_or_else(|e| e.into_inner());
        let Some(n) = n.as_ref() else { return };
        if let Some(fs) = self.fs.get() {
            fs.wait_for_reads();
        }
        for &ino in &inv.inodes {
            let _ = n.inval_inode(fuser::INodeNo(ino), 0, 0);
        }
        for (dir, name) in &inv.entries {
            // Names are bytes: a name that is not UTF-8 must be invalidated as it is.
            let _ = n.inval_entry(fuser::INodeNo(*dir), OsStr::from_bytes(name));
        }
    }
}

/// The status a node reports (`pairfs status`, control socket).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatusReport {
    pub node: String,
    pub role: String,
    pub state: String,
    pub mode: String,
    pub epoch: u64,
    pub peer: Option<String>,
    pub peer_address: Option<String>,
    pub connected: bool,
    pub committed_seq: u64,
    pub durable_seq: u64,
    pub sent_seq: u64,
    /// The secondary's newest received seq (applied, visible on its mount).
    pub replica_received_seq: u64,
    /// The secondary's newest durable seq.
    pub replica_durable_seq: u64,
    pub lag_entries: u64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    /// The peer's apply rate as last measured while it had a backlog (bytes/s).
    pub peer_apply_rate_bps: Option<f64>,
    pub backlog: String,
    pub bitmap_blocks: u64,
    pub copy_sent: Option<u64>,
    pub copy_total: Option<u64>,
    pub copy_rate_bps: Option<f64>,
    pub inconsistent: bool,
    pub journal_used: u64,
    pub journal_capacity: u64,
    pub refused: Option<String>,
    pub wire_bytes_sent: u64,
    pub wire_bytes_received: u64,
    /// Sync mode: writes acknowledged without the peer since this seq.
    pub degraded_since_seq: Option<u64>,
    /// … and since this time (ns since the Unix epoch).
    pub degraded_since_ns: Option<u64>,
    /// The last failed apply (secondary), until one succeeds.
    pub apply_error: Option<String>,
    /// The filesystem admits writes (a primary not reconciling).
    pub writable: bool,
    /// The last `pairfs verify` (persisted), and whether one is running.
    pub last_verify: Option<VerifyReport>,
    pub verify_running: bool,
    /// A takeover under way here (docs/PROTOCOL.md §7), with its progress.
    pub takeover: Option<TakeoverStatus>,
    /// Secondary: the newest seq whose header arrived from the primary.
    pub headers_seq: u64,
    /// The last forced takeover of this node: what it could not have (§7.7).
    pub last_forced: Option<force::LossReport>,
}

/// A takeover in `pairfs status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TakeoverStatus {
    /// `draining out` (the old primary), `draining` (the new one, old primary's entries
    /// still arriving), `merging`.
    pub phase: String,
    /// The old primary's newest seq when it froze.
    pub freeze_seq: u64,
    /// The old primary's entries not applied here yet, their distinct blocks and bytes.
    pub backlog_entries: u64,
    pub backlog_blocks: u64,
    pub backlog_bytes: u64,
    /// Entries and blocks in the local-unreflected area, and its bytes in use / capacity.
    pub lu_entries: u64,
    pub lu_blocks: u64,
    pub lu_used: u64,
    pub lu_capacity: u64,
    /// Reads served by the old primary: requests, blocks, mean latency, failures.
    pub remote_reads: u64,
    pub remote_read_blocks: u64,
    pub remote_read_mean_ms: Option<f64>,
    pub fetch_errors: u64,
    /// Writers waiting for room in the local-unreflected area (full until the merge).
    pub writers_waiting: u64,
}

/// The answer to `pairfs takeover`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TakeoverReport {
    pub ok: bool,
    pub error: Option<String>,
    /// From the request to the node accepting writes.
    pub seconds: f64,
    /// The old primary's newest seq.
    pub freeze_seq: u64,
    /// What the old primary still holds that this node has not applied.
    pub backlog_entries: u64,
    pub backlog_blocks: u64,
    pub backlog_bytes: u64,
    /// A forced takeover: what this node could not have, and what it set aside.
    pub forced: Option<force::LossReport>,
}

impl Event {
    /// A name for the logs.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Event::Message(_, r) => match &r.message {
                pairfs::repl::Message::Entry { .. } => "entry",
                pairfs::repl::Message::Headers { .. } => "headers",
                pairfs::repl::Message::Frozen { .. } => "frozen",
                _ => "message",
            },
            Event::Connected(_) => "connected",
            Event::Entries => "entries",
            Event::Flush(_) => "flush",
            Event::Status(_) => "status",
            Event::Takeover { .. } => "takeover",
            _ => "other",
        }
    }
}

/// What the driver hears about.
pub enum Event {
    Connected(link::ConnHandle),
    Disconnected(u64),
    Message(u64, link::Received),
    /// Entries were sealed or became durable.
    Entries,
    /// An fsync wants the peer to make everything up to this seq durable.
    Flush(Seq),
    /// A sync-mode writer waited for the peer in vain; `done` once that is persisted.
    Degraded {
        seq: Seq,
        done: std::sync::mpsc::Sender<()>,
    },
    CopyProgress {
        sent: u64,
        total: u64,
    },
    CopyDone {
        id: u64,
        newest: Seq,
    },
    CopyFailed {
        id: u64,
        error: String,
    },
    Status(oneshot::Sender<StatusReport>),
    /// `pairfs takeover [--force]`: answered once the node accepts writes, or with why not.
    Takeover {
        force: bool,
        reply: oneshot::Sender<TakeoverReport>,
    },
    /// `pairfs verify`: start one; its updates go to `updates`.
    Verify {
        repair: bool,
        updates: mpsc::UnboundedSender<VerifyUpdate>,
    },
    /// The node stops: the driver returns after the step it is in.
    Stop,
}

/// A running node; dropping it stops the driver, then the runtime.
pub struct NodeHandle {
    pub shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
    driver: Option<tokio::task::JoinHandle<()>>,
}

/// How long a stopping node waits for its driver to finish the step it is in.
const DRIVER_STOP_WAIT: Duration = Duration::from_secs(5);

impl Drop for NodeHandle {
    fn drop(&mut self) {
        let Some(rt) = self.rt.take() else { return };
        // The driver first, between two of its steps: a step that is on a thread of its
        // own (`block_in_place`: a sync, a disk read) when the runtime stops would come
        // back to find the runtime's timers gone, and panic.
        let _ = self.shared.priority.send(Event::Stop);
        if let Some(driver) = self.driver.take() {
            if tokio::runtime::Handle::try_current().is_err() {
                // (The timer made within the runtime: outside, there is no timer to make.)
                let _ = rt.block_on(async { tokio::time::timeout(DRIVER_STOP_WAIT, driver).await });
            }
        }
        rt.shutdown_timeout(Duration::from_secs(2));
    }
}

/// The pair state at startup: from `pair.state`, or new for the configured role.
pub fn initial_state(cfg: &NodeConfig) -> Result<PersistedState> {
    if let Some(st) = load_state(&cfg.data)? {
        if st.role != cfg.role {
            tracing::info!(
                persisted = ?st.role,
                configured = ?cfg.role,
                "the persisted role wins over the configured one"
            );
        }
        return Ok(st);
    }
    let st = match cfg.role {
        Role::Primary => PersistedState::new_primary(random_u64()?),
        Role::Secondary => anyhow::bail!(
            "{} has no pair state: create a secondary with `pairfs init --secondary` (it must \
             be empty: its volume will be overwritten by the primary's)",
            cfg.data.display()
        ),
    };
    save_state(&cfg.data, &st)?;
    Ok(st)
}

fn random_u64() -> Result<u64> {
    let mut id = [0u8; 8];
    pairfs::types::fill_random(&mut id).context("reading randomness")?;
    Ok(u64::from_le_bytes(id))
}

/// Starts the node's runtime.
pub fn start(cfg: NodeConfig, host: Arc<Host>, st: PersistedState) -> Result<NodeHandle> {
    let identity = Identity::load(&cfg.data).with_context(|| {
        format!(
            "loading the identity of {} (created by `pairfs init`)",
            cfg.data.display()
        )
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pairfs-node")
        .enable_all()
        .build()
        .context("starting the node runtime")?;
    let (tx, rx) = mpsc::unbounded_channel();
    let (prio_tx, prio_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared::new(tx, prio_tx, cfg.sync_timeout));
    let (block_size, blocks, volume, retained, durable, unclean, capacity, max_entry) =
        host.vol(|v| {
            (
                v.block_size() as u32,
                v.block_count(),
                v.id(),
                v.retained_entries(),
                v.journal().durable_seq(),
                v.recovery().unclean,
                v.journal().header().capacity,
                v.max_replicated_entry_bytes(),
            )
        });
    let mut rcfg = ReplConfig::new(&cfg.name, volume, block_size, blocks);
    rcfg.mode = cfg.mode;
    rcfg.journal_limit = cfg.journal_limit_for(capacity)?;
    rcfg.max_lag = cfg.max_lag;
    rcfg.sync_timeout = cfg.sync_timeout;
    rcfg.max_entry_bytes = max_entry;
    rcfg.next_generation_id = random_u64()?;
    let role = st.role;
    let repl = Replicator::new(
        rcfg,
        st,
        if role == Role::Primary {
            retained
        } else {
            vec![]
        },
        durable,
        unclean,
        Instant::now(),
    );
    let bitmap = DiffBitmap::load(&cfg.data, blocks)?;
    let _ = host.shared.set(shared.clone());
    {
        let (host, shared2) = (host.clone(), shared.clone());
        let source: Arc<fetch::FetchSource> = Arc::new(move |blocks: &[u64]| {
            let serving = shared2.serving();
            if serving == hooks::Serving::Nothing {
                return Err("this node is not frozen for a takeover: it serves no fetches".into());
            }
            // A few reads of blocks (on a runtime worker for small fetches: `serve`).
            host.vol_quick(|v| {
                let mut out = Vec::with_capacity(blocks.len());
                for &b in blocks {
                    let mut buf = vec![0u8; v.block_size()];
                    let r = match serving {
                        hooks::Serving::Applied => v.read_applied(b, &mut buf),
                        _ => v.read_current(b, &mut buf),
                    };
                    r.map_err(|e| e.to_string())?;
                    out.push(buf);
                }
                Ok(out)
            })
        });
        let _ = shared.fetch_source.set(source);
    }
    shared.set_serving(repl.takeover());
    let _guard = rt.enter();
    let endpoint = match &cfg.peer {
        Some(p) => Some(
            Endpoint::bind(
                cfg.listen,
                &identity,
                p.fingerprint,
                TransportConfig {
                    keepalive: cfg.keepalive,
                    idle_timeout: cfg.idle_timeout,
                    max_frame: pairfs::repl::MAX_FRAME,
                    congestion: cfg.congestion,
                },
            )
            .with_context(|| format!("listening on {}", cfg.listen))?,
        ),
        None => None,
    };
    let fetch = Arc::new(fetch::FetchClient::new(
        rt.handle().clone(),
        cfg.fetch_timeout,
        repl.persisted().epoch,
    ));
    let _ = shared.fetch_client.set(fetch.clone());
    // The link first: a node resuming a takeover reads blocks from the peer (the
    // allocation bitmaps) before its driver runs; the link's events wait in the channel.
    if let (Some(ep), Some(p)) = (endpoint, cfg.peer.clone()) {
        let dial = cfg.name < p.name;
        rt.spawn(link::connection_manager(
            Arc::new(ep),
            p.address,
            dial,
            shared.clone(),
        ));
    }
    // A node whose volume was taking over resumes it (a taker frozen by a failback stays
    // read-only).
    if let Some(t) = repl.takeover().filter(takeover::takes_over) {
        let writable = !matches!(t, pairfs::repl::Takeover::FrozenTaker { .. });
        takeover::resume(&cfg.data, &host, fetch.clone(), writable)?;
    }
    let mut driver = driver::Driver::new(
        cfg.clone(),
        host.clone(),
        shared.clone(),
        repl,
        bitmap,
        fetch,
    );
    let tail = DiffBitmap::load_at(cfg.data.join(crate::state::REJOIN_FILE), blocks)?;
    if tail.exists() {
        tracing::info!(
            blocks = tail.count(),
            "rejoining: the primary resyncs this node's tail"
        );
        driver.rejoining(tail);
    }
    let driver = rt.spawn(driver.run(rx, prio_rx));
    rt.spawn(control::control_socket(cfg.data.clone(), shared.clone()));
    drop(_guard);
    Ok(NodeHandle {
        shared,
        rt: Some(rt),
        driver: Some(driver),
    })
}

/// True when a secondary's volume holds a consistent filesystem (it can be mounted).
pub fn mountable(st: &PersistedState) -> bool {
    !(st.empty || st.inconsistent_until.is_some())
}
