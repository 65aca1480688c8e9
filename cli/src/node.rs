//! The node daemon: drives the sans-IO [`Replicator`] with a QUIC connection to the peer,
//! the local volume (directly, or through the mounted filesystem) and the files of
//! `state.rs` (DESIGN §2: "the transport and the daemon only drive it").
//!
//! Threads: a tokio runtime (two workers) runs the connection manager, the per-connection
//! readers and writers, the control socket and the driver; the driver is the only task
//! that touches the replicator, and carries out its actions in order. Copies run on a
//! blocking thread. The FUSE threads reach the node only through [`FsHooks`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pairfs::repl::{
    Action, Backpressure, CopyKind, Message, Mode, PersistedState, ReplConfig, Replicator, Role,
    Stream, WireBlock, WireEntry,
};
use pairfs::{Seq, Volume, VolumeError};
use pairfs_fs::replica::Invalidations;
use pairfs_fs::{Fs, FsHooks};
use pairfs_transport::{Backoff, Connection, Endpoint, Identity, TransportConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::block_in_place;

use crate::config::NodeConfig;
use crate::state::{DiffBitmap, load_state, save_state};

/// Frame kinds on the wire (the transport carries them, the node reads them).
const KIND_CONTROL: u8 = 1;
const KIND_REPLICATION: u8 = 2;
/// Largest message: an entry of up to `max_entry_wire_bytes` (32 MiB) of blocks plus
/// their numbers and the encoding's lengths.
const MAX_FRAME: u32 = 40 << 20;
/// Blocks per copy message: 256 × 4 KiB = 1 MiB frames, well under the frame limit.
const COPY_BATCH: usize = 256;
/// Replication messages queued per connection before the driver waits (back-pressure).
const REPL_QUEUE: usize = 32;
/// Control socket name in the data directory.
pub(crate) const CONTROL_SOCKET: &str = "control.sock";
/// How long a sync-mode writer waits for the peer before the pair counts as degraded and
/// the write proceeds (a dead peer must not stop the primary).
const SYNC_WAIT_LIMIT: Duration = Duration::from_secs(5);

/// Where the node's volume lives: alone (`serve`, or a secondary waiting for its first
/// copy) or inside the mounted filesystem.
pub(crate) struct Host {
    bare: Mutex<Option<Volume>>,
    fs: OnceLock<Arc<Fs>>,
    notifier: Mutex<Option<fuser::Notifier>>,
    shared: OnceLock<Arc<Shared>>,
}

impl Host {
    pub(crate) fn bare(v: Volume) -> Arc<Host> {
        Arc::new(Host {
            bare: Mutex::new(Some(v)),
            fs: OnceLock::new(),
            notifier: Mutex::new(None),
            shared: OnceLock::new(),
        })
    }

    pub(crate) fn with_fs(fs: Arc<Fs>) -> Arc<Host> {
        let h = Host {
            bare: Mutex::new(None),
            fs: OnceLock::new(),
            notifier: Mutex::new(None),
            shared: OnceLock::new(),
        };
        let _ = h.fs.set(fs);
        Arc::new(h)
    }

    pub(crate) fn set_notifier(&self, n: fuser::Notifier) {
        *self.notifier.lock().unwrap_or_else(|e| e.into_inner()) = Some(n);
    }

    fn fs(&self) -> Option<&Arc<Fs>> {
        self.fs.get()
    }

    /// The mounted filesystem, if any.
    pub(crate) fn fs_arc(&self) -> Option<Arc<Fs>> {
        self.fs.get().cloned()
    }

    /// Opens the filesystem on the bare volume (atomically for the driver).
    pub(crate) fn promote(
        &self,
        open: impl FnOnce(Volume) -> pairfs_fs::FsResult<Fs>,
    ) -> Result<()> {
        let mut g = self.bare.lock().unwrap_or_else(|e| e.into_inner());
        let v = g.take().context("the volume is already in a filesystem")?;
        let fs = Arc::new(open(v)?);
        let _ = self.fs.set(fs);
        drop(g);
        Ok(())
    }

    /// Group commit and checkpoints of a bare volume (a mounted one has its own thread).
    pub(crate) fn maintain(&self) {
        if self.fs.get().is_some() {
            return;
        }
        let (did, writeback) = self.vol_mut(|v| (v.maintain(Instant::now()), v.take_writeback()));
        pairfs::volume::start_writeback(writeback);
        match did {
            Ok(true) => {
                if let Some(s) = self.shared.get() {
                    s.durable();
                }
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "background commit failed"),
        }
    }

    /// Flushes everything at shutdown.
    pub(crate) fn close(&self) -> Result<()> {
        match self.fs.get() {
            Some(fs) => fs.close().context("flushing at shutdown"),
            None => self.vol_mut(|v| v.close()).context("flushing at shutdown"),
        }
    }

    /// Runs `f` with the volume (write access).
    fn vol_mut<T>(&self, f: impl FnOnce(&mut Volume) -> T) -> T {
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

    /// Runs `f` with the volume (read access; shares the filesystem's read lock).
    fn vol<T>(&self, f: impl FnOnce(&Volume) -> T) -> T {
        if let Some(fs) = self.fs.get() {
            return fs.with_volume(f);
        }
        self.vol_mut(|v| f(v))
    }

    /// Makes committed transactions durable.
    fn sync(&self) -> Result<(), String> {
        if let Some(fs) = self.fs.get() {
            if !fs.is_read_only() {
                return fs.sync().map_err(|e| e.to_string());
            }
        }
        self.vol_mut(|v| v.sync()).map_err(|e| e.to_string())
    }

    fn invalidate(&self, inv: &Invalidations) {
        let n = self.notifier.lock().unwrap_or_else(|e| e.into_inner());
        let Some(n) = n.as_ref() else { return };
        for &ino in &inv.inodes {
            let _ = n.inval_inode(fuser::INodeNo(ino), 0, 0);
        }
        for (dir, name) in &inv.entries {
            let _ = n.inval_entry(
                fuser::INodeNo(*dir),
                std::ffi::OsStr::new(&String::from_utf8_lossy(name).into_owned()),
            );
        }
    }
}

/// The status a node reports (`pairfs status`, control socket).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct StatusReport {
    pub(crate) node: String,
    pub(crate) role: String,
    pub(crate) state: String,
    pub(crate) mode: String,
    pub(crate) epoch: u64,
    pub(crate) peer: Option<String>,
    pub(crate) peer_address: Option<String>,
    pub(crate) connected: bool,
    pub(crate) committed_seq: u64,
    pub(crate) durable_seq: u64,
    pub(crate) sent_seq: u64,
    pub(crate) applied_seq: u64,
    pub(crate) lag_entries: u64,
    pub(crate) lag_bytes: u64,
    pub(crate) lag_seconds: f64,
    /// The peer's apply rate as last measured while it had a backlog (bytes/s).
    pub(crate) peer_apply_rate_bps: Option<f64>,
    pub(crate) backlog: String,
    pub(crate) bitmap_blocks: u64,
    pub(crate) copy_sent: Option<u64>,
    pub(crate) copy_total: Option<u64>,
    pub(crate) copy_rate_bps: Option<f64>,
    pub(crate) inconsistent: bool,
    pub(crate) journal_used: u64,
    pub(crate) journal_capacity: u64,
    pub(crate) refused: Option<String>,
    pub(crate) wire_bytes_sent: u64,
    pub(crate) wire_bytes_received: u64,
    pub(crate) sync_degraded: bool,
}

enum Event {
    Connected(ConnHandle),
    Disconnected(u64),
    Message(u64, Message),
    Durable,
    CopyProgress { sent: u64, total: u64 },
    CopyDone { id: u64, newest: Seq },
    CopyFailed { id: u64, error: String },
    Status(oneshot::Sender<StatusReport>),
}

struct ConnHandle {
    id: u64,
    conn: Connection,
    ctrl: mpsc::UnboundedSender<Message>,
    repl: mpsc::Sender<Message>,
}

/// Shared between the driver, the FUSE threads (sync mode) and the control socket.
pub(crate) struct Shared {
    events: mpsc::UnboundedSender<Event>,
    /// Newest seq the peer has durably (sync mode).
    acked: Mutex<Seq>,
    acked_cv: Condvar,
    /// The pair is streaming in sync mode: writers wait for the peer.
    sync_waits: AtomicBool,
    /// A writer gave up waiting (peer too slow or gone).
    degraded: AtomicBool,
    wire_sent: AtomicU64,
    wire_received: AtomicU64,
    /// Async mode: the backlog writers are held to (`Replicator::backpressure`), published
    /// by the driver after every event.
    backpressure: Mutex<Option<Backpressure>>,
    backpressure_cv: Condvar,
    /// A writer gave up waiting for the backlog to shrink (logged once per episode).
    lag_warned: AtomicBool,
}

impl Shared {
    /// Async mode: waits while the peer is further behind than `max_lag` allows (for at
    /// most [`SYNC_WAIT_LIMIT`] per write, so a peer that stalls without disconnecting
    /// slows writers down but does not stop them).
    fn lag_wait(&self, fs: &Fs) {
        let gave_up = wait_while(&self.backpressure, &self.backpressure_cv, |bp| {
            bp.is_some_and(|b| {
                // (Never called with the volume locked: FS hooks run after the commit.)
                let open = fs.with_volume(|v| v.open_entry_bytes());
                b.exceeded(pairfs::types::now_ns(), open)
            })
        });
        if let Some(b) = gave_up.flatten() {
            if !self.lag_warned.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    lag_bytes = b.bytes,
                    "replication: the peer stays behind the lag limit; writers go on without waiting for it"
                );
            }
        }
    }
}

/// Waits on `cv` while `blocked` holds for the value in `m`, for at most
/// [`SYNC_WAIT_LIMIT`]. Returns the value when it gave up, `None` when no longer blocked.
fn wait_while<T: Copy>(
    m: &Mutex<T>,
    cv: &Condvar,
    mut blocked: impl FnMut(&T) -> bool,
) -> Option<T> {
    let deadline = Instant::now() + SYNC_WAIT_LIMIT;
    let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
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

impl FsHooks for Shared {
    fn durable(&self) {
        let _ = self.events.send(Event::Durable);
    }

    fn committed(&self, fs: &Fs) {
        if !self.sync_waits.load(Ordering::Acquire) {
            self.lag_wait(fs);
            return;
        }
        // Sync mode: the write is acknowledged once the peer has it durably. Make it
        // durable here first (group commit with the other writers), then wait.
        if fs.sync().is_err() {
            return;
        }
        let target = fs.with_volume(|v| v.journal().durable_seq());
        let gave_up = wait_while(&self.acked, &self.acked_cv, |acked| {
            *acked < target && self.sync_waits.load(Ordering::Acquire)
        });
        if gave_up.is_some() && !self.degraded.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                seq = %target,
                "sync replication: the peer did not acknowledge in time; continuing degraded"
            );
        }
    }
}

/// A running node; dropping it stops the runtime.
pub(crate) struct NodeHandle {
    pub(crate) shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// The pair state at startup: from `pair.state`, or new for the configured role.
pub(crate) fn initial_state(cfg: &NodeConfig) -> Result<PersistedState> {
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
        Role::Primary => {
            let mut id = [0u8; 8];
            pairfs::types::fill_random(&mut id).context("reading randomness")?;
            PersistedState::new_primary(u64::from_le_bytes(id))
        }
        Role::Secondary => anyhow::bail!(
            "{} has no pair state: create a secondary with `pairfs init --secondary` (it must \
             be empty: its volume will be overwritten by the primary's)",
            cfg.data.display()
        ),
    };
    save_state(&cfg.data, &st)?;
    Ok(st)
}

/// Starts the node's runtime.
pub(crate) fn start(cfg: NodeConfig, host: Arc<Host>, st: PersistedState) -> Result<NodeHandle> {
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
    let shared = Arc::new(Shared {
        events: tx,
        acked: Mutex::new(Seq::NONE),
        acked_cv: Condvar::new(),
        sync_waits: AtomicBool::new(false),
        degraded: AtomicBool::new(false),
        wire_sent: AtomicU64::new(0),
        wire_received: AtomicU64::new(0),
        backpressure: Mutex::new(None),
        backpressure_cv: Condvar::new(),
        lag_warned: AtomicBool::new(false),
    });
    let (block_size, blocks, volume, retained, last) = host.vol(|v| {
        (
            v.block_size() as u32,
            v.block_count(),
            v.id(),
            v.retained_entries(),
            v.journal().durable_seq(),
        )
    });
    let mut rcfg = ReplConfig::new(&cfg.name, volume, block_size, blocks);
    rcfg.mode = cfg.mode;
    rcfg.journal_limit = cfg.journal_limit;
    rcfg.max_lag = cfg.max_lag;
    let role = st.role;
    let repl = Replicator::new(
        rcfg,
        st,
        if role == Role::Primary {
            retained
        } else {
            vec![]
        },
        last,
    );
    let bitmap = DiffBitmap::load(&cfg.data, blocks)?;
    let _ = host.shared.set(shared.clone());
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
                    max_frame: MAX_FRAME,
                },
            )
            .with_context(|| format!("listening on {}", cfg.listen))?,
        ),
        None => None,
    };
    let driver = Driver {
        cfg: cfg.clone(),
        host: host.clone(),
        shared: shared.clone(),
        repl,
        bitmap,
        conn: None,
        copy_cancel: None,
        copy_started: None,
        copy_progress: (0, 0),
        data_dir: cfg.data.clone(),
    };
    rt.spawn(driver.run(rx));
    if let (Some(ep), Some(p)) = (endpoint, cfg.peer.clone()) {
        let dial = cfg.name < p.name;
        rt.spawn(connection_manager(
            Arc::new(ep),
            p.address,
            dial,
            shared.clone(),
        ));
    }
    rt.spawn(control_socket(cfg.data.clone(), shared.clone()));
    drop(_guard);
    Ok(NodeHandle {
        shared,
        rt: Some(rt),
    })
}

/// Keeps one connection to the peer: dials (with backoff) if this node's name sorts first.
/// Every node also accepts: the peer dials the other way, and strangers must be answered
/// (and refused by the certificate pin, with a log line) rather than ignored.
async fn connection_manager(ep: Arc<Endpoint>, peer: SocketAddr, dial: bool, shared: Arc<Shared>) {
    let ids = Arc::new(AtomicU64::new(0));
    {
        let (ep, shared, ids) = (ep.clone(), shared.clone(), ids.clone());
        tokio::spawn(async move {
            loop {
                match ep.accept().await {
                    Ok(Some(c)) => {
                        let id = ids.fetch_add(1, Ordering::AcqRel) + 1;
                        tracing::info!(conn = id, "the peer connected");
                        run_connection(id, c, false, shared.clone()).await;
                    }
                    Ok(None) => return,
                    Err(e) => tracing::debug!(error = %e, "accept failed"),
                }
            }
        });
    }
    if !dial {
        return;
    }
    let mut backoff = Backoff::with_seed(0x5eed);
    loop {
        let conn = match ep.connect(peer).await {
            Ok(c) => c,
            Err(e) => {
                let d = backoff.next();
                tracing::debug!(error = %e, retry_in = ?d, "peer unreachable");
                tokio::time::sleep(d).await;
                continue;
            }
        };
        backoff.reset();
        let id = ids.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::info!(conn = id, "connected to the peer");
        let closed = run_connection(id, conn, true, shared.clone()).await;
        // Wait for this connection to end before dialling again.
        closed.notified().await;
        tracing::info!(conn = id, "connection to the peer lost");
        tokio::time::sleep(backoff.next()).await;
    }
}

/// Sets up the streams of a connection; returns a notifier fired when it ends.
async fn run_connection(
    id: u64,
    conn: Connection,
    dialer: bool,
    shared: Arc<Shared>,
) -> Arc<Notify> {
    let closed = Arc::new(Notify::new());
    let (ctrl_tx, mut ctrl_rx) = mpsc::unbounded_channel::<Message>();
    let (repl_tx, mut repl_rx) = mpsc::channel::<Message>(REPL_QUEUE);
    let ended = Arc::new(AtomicBool::new(false));
    let end = {
        let (shared, closed, ended, conn) =
            (shared.clone(), closed.clone(), ended.clone(), conn.clone());
        move |why: String| {
            if !ended.swap(true, Ordering::AcqRel) {
                tracing::debug!(conn = id, %why, "connection ends");
                conn.close(1, &why);
                let _ = shared.events.send(Event::Disconnected(id));
                closed.notify_one();
            }
        }
    };
    let end = Arc::new(end);
    // Control stream: the dialler opens it, the acceptor waits for it.
    let ctrl = if dialer {
        conn.open_bi().await
    } else {
        conn.accept_bi().await
    };
    let (mut csend, mut crecv) = match ctrl {
        Ok(s) => s,
        Err(e) => {
            end(format!("control stream: {e}"));
            return closed;
        }
    };
    let _ = shared.events.send(Event::Connected(ConnHandle {
        id,
        conn: conn.clone(),
        ctrl: ctrl_tx,
        repl: repl_tx,
    }));
    {
        let end = end.clone();
        tokio::spawn(async move {
            while let Some(m) = ctrl_rx.recv().await {
                if let Err(e) = csend.send(KIND_CONTROL, &m).await {
                    end(format!("sending: {e}"));
                    return;
                }
            }
        });
    }
    {
        let (end, shared) = (end.clone(), shared.clone());
        tokio::spawn(async move {
            loop {
                match crecv.recv::<Message>().await {
                    Ok(Some((_, m))) => {
                        let _ = shared.events.send(Event::Message(id, m));
                    }
                    Ok(None) => return end("control stream closed".into()),
                    Err(e) => return end(format!("control stream: {e}")),
                }
            }
        });
    }
    {
        let (end, conn2, shared) = (end.clone(), conn.clone(), shared.clone());
        tokio::spawn(async move {
            let mut sender = None;
            while let Some(m) = repl_rx.recv().await {
                if sender.is_none() {
                    match conn2.open_uni().await {
                        Ok(s) => sender = Some(s),
                        Err(e) => return end(format!("replication stream: {e}")),
                    }
                }
                let Some(s) = sender.as_mut() else { return };
                if let Err(e) = s.send(KIND_REPLICATION, &m).await {
                    return end(format!("sending: {e}"));
                }
                shared
                    .wire_sent
                    .store(conn2.stats().bytes_sent, Ordering::Relaxed);
            }
        });
    }
    {
        let (end, conn2, shared) = (end.clone(), conn.clone(), shared.clone());
        tokio::spawn(async move {
            let mut r = match conn2.accept_uni().await {
                Ok(r) => r,
                Err(e) => return end(format!("replication stream: {e}")),
            };
            loop {
                match r.recv::<Message>().await {
                    Ok(Some((_, m))) => {
                        shared
                            .wire_received
                            .store(conn2.stats().bytes_received, Ordering::Relaxed);
                        let _ = shared.events.send(Event::Message(id, m));
                    }
                    Ok(None) => return end("replication stream closed".into()),
                    Err(e) => return end(format!("replication stream: {e}")),
                }
            }
        });
    }
    {
        let (end, conn2) = (end.clone(), conn.clone());
        tokio::spawn(async move {
            let why = conn2.closed().await;
            end(format!("closed: {why}"));
        });
    }
    closed
}

struct Driver {
    cfg: NodeConfig,
    host: Arc<Host>,
    shared: Arc<Shared>,
    repl: Replicator,
    bitmap: DiffBitmap,
    conn: Option<ConnHandle>,
    copy_cancel: Option<Arc<AtomicBool>>,
    copy_started: Option<Instant>,
    copy_progress: (u64, u64),
    data_dir: PathBuf,
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Event>) {
        // Entries that became durable before the runtime started.
        self.take_durable();
        self.actions().await;
        loop {
            let timeout = self
                .repl
                .poll_timeout()
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_millis(250));
            let ev = tokio::time::timeout(timeout, rx.recv()).await;
            match ev {
                Ok(Some(ev)) => self.on_event(ev),
                Ok(None) => return,
                Err(_) => self.repl.handle_timeout(Instant::now()),
            }
            self.actions().await;
            self.publish();
        }
    }

    fn take_durable(&mut self) {
        if self.repl.role() != Role::Primary {
            return;
        }
        let metas = self.host.vol_mut(|v| v.take_durable_entries());
        for m in metas {
            self.repl.handle_local_entry(m);
        }
    }

    fn on_event(&mut self, ev: Event) {
        let now = Instant::now();
        match ev {
            Event::Connected(h) => {
                if let Some(old) = self.conn.take() {
                    old.conn.close(1, "replaced");
                    self.repl.handle_disconnected();
                }
                self.conn = Some(h);
                self.repl.handle_connected(now);
            }
            Event::Disconnected(id) => {
                if self.conn.as_ref().is_some_and(|c| c.id == id) {
                    self.conn = None;
                    self.repl.handle_disconnected();
                }
            }
            Event::Message(id, m) => {
                if self.conn.as_ref().is_some_and(|c| c.id == id) {
                    self.repl.handle_message(m, now);
                }
            }
            Event::Durable => self.take_durable(),
            Event::CopyProgress { sent, total } => {
                self.copy_progress = (sent, total);
                self.repl.handle_copy_progress(sent, total);
            }
            Event::CopyDone { id, newest } => {
                self.take_durable();
                self.repl.handle_copy_sent(id, newest);
            }
            Event::CopyFailed { id, error } => {
                tracing::warn!(copy = id, %error, "copy failed; it restarts with the connection");
                if let Some(c) = self.conn.take() {
                    c.conn.close(1, "copy failed");
                }
                self.repl.handle_disconnected();
            }
            Event::Status(reply) => {
                let _ = reply.send(self.status());
            }
        }
    }

    /// Carries out the replicator's actions, in order.
    async fn actions(&mut self) {
        while let Some(a) = self.repl.poll_action() {
            if let Err(e) = self.act(a).await {
                tracing::error!(error = %format!("{e:#}"), "replication action failed");
            }
        }
    }

    async fn send(&mut self, m: Message) {
        let Some(c) = self.conn.as_ref() else { return };
        match m.stream() {
            Stream::Control => {
                let _ = c.ctrl.send(m);
            }
            Stream::Replication => {
                let tx = c.repl.clone();
                let _ = tx.send(m).await;
            }
        }
    }

    async fn act(&mut self, a: Action) -> Result<()> {
        match a {
            Action::Send(m) => self.send(m).await,
            Action::SendEntry(meta) => {
                // Disk reads and fsyncs leave the worker thread to the network tasks.
                let r = block_in_place(|| self.host.vol(|v| v.read_wire_entry(meta.seq)));
                match r {
                    Ok(entry) => {
                        let epoch = self.repl.persisted().epoch;
                        self.send(Message::Entry { epoch, entry }).await;
                    }
                    Err(VolumeError::InPlaceChanged { .. } | VolumeError::EntryGone { .. }) => {
                        self.repl.handle_entry_unavailable(meta.seq);
                    }
                    Err(e) => return Err(e).context("reading an entry to send"),
                }
            }
            Action::StartCopy { kind, id } => self.start_copy(kind, id),
            Action::StopCopy => {
                if let Some(c) = self.copy_cancel.take() {
                    c.store(true, Ordering::Release);
                }
            }
            Action::Apply(e) => {
                let seq = e.seq;
                block_in_place(|| self.apply(&e))?;
                self.repl.handle_applied(seq);
            }
            Action::ApplyCopy(blocks) => {
                block_in_place(|| self.host.vol_mut(|v| v.write_copy_blocks(&blocks)))
                    .context("writing copy blocks")?;
            }
            Action::AdoptVolume(id) => {
                self.host
                    .vol_mut(|v| v.adopt_id(id))
                    .context("taking the primary's volume identity")?;
                tracing::info!(volume = %id, "this node now replicates volume");
            }
            Action::Release(seq) => self.host.vol_mut(|v| v.set_release_limit(seq)),
            Action::MarkBitmap(seq) => {
                let blocks = self.host.vol(|v| v.retained_blocks(seq))?;
                self.bitmap.mark(blocks);
                self.bitmap.persist()?;
                self.host.vol_mut(|v| v.force_release(seq))?;
            }
            Action::ClearBitmap => {
                if self.bitmap.count() > 0 {
                    self.bitmap.clear();
                    self.bitmap.persist()?;
                }
            }
            Action::Persist(st) => save_state(&self.data_dir, &st)?,
            Action::Acked(seq) => {
                let mut g = self.shared.acked.lock().unwrap_or_else(|e| e.into_inner());
                *g = (*g).max(seq);
                self.shared.acked_cv.notify_all();
            }
            Action::Disconnect(reason) => {
                if let Some(c) = self.conn.take() {
                    c.conn.close(2, &reason);
                }
                self.repl.handle_disconnected();
            }
        }
        Ok(())
    }

    /// Secondary: applies one replicated entry durably, then drops what the caches (ours
    /// and the kernel's) hold of what it changed.
    fn apply(&self, e: &WireEntry) -> Result<()> {
        if let Some(fs) = self.host.fs() {
            let mut inv = fs.apply_replicated(e).context("applying an entry")?;
            if e.blocks.is_empty() {
                // The end of a copy: anything may have changed underneath.
                fs.reload().context("reloading after a copy")?;
                inv.inodes = fs.referenced_inode_list();
                inv.inodes.push(1);
            }
            self.host.invalidate(&inv);
        } else {
            self.host
                .vol_mut(|v| v.apply_replicated(e))
                .context("applying an entry")?;
        }
        // The acknowledgement that follows says "applied durably".
        self.host
            .vol_mut(|v| v.sync())
            .context("making an applied entry durable")?;
        Ok(())
    }

    fn start_copy(&mut self, kind: CopyKind, id: u64) {
        if let Some(c) = self.copy_cancel.take() {
            c.store(true, Ordering::Release);
        }
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        let cancel = Arc::new(AtomicBool::new(false));
        self.copy_cancel = Some(cancel.clone());
        self.copy_started = Some(Instant::now());
        let host = self.host.clone();
        let events = self.shared.events.clone();
        let tx = conn.repl.clone();
        let epoch = self.repl.persisted().epoch;
        let marked = if kind == CopyKind::Bitmap {
            Some(self.bitmap.marked())
        } else {
            None
        };
        tracing::info!(copy = id, ?kind, "copy starts");
        tokio::task::spawn_blocking(move || {
            let r = copy_blocks(&host, &tx, &events, &cancel, epoch, marked);
            match r {
                Ok(Some(newest)) => {
                    let _ = events.send(Event::CopyDone { id, newest });
                }
                Ok(None) => {} // cancelled
                Err(e) => {
                    let _ = events.send(Event::CopyFailed {
                        id,
                        error: format!("{e:#}"),
                    });
                }
            }
        });
    }

    fn publish(&self) {
        let waits = self.repl.sync_waits();
        let before = self.shared.sync_waits.swap(waits, Ordering::AcqRel);
        if before && !waits {
            self.shared.acked_cv.notify_all();
        }
        if waits {
            self.shared.degraded.store(false, Ordering::Release);
        }
        let bp = self.repl.backpressure();
        let mut g = self
            .shared
            .backpressure
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *g != bp {
            if bp.is_none() {
                self.shared.lag_warned.store(false, Ordering::Release);
            }
            *g = bp;
            self.shared.backpressure_cv.notify_all();
        }
    }

    fn status(&self) -> StatusReport {
        let s = self.repl.status();
        let (committed, durable, used, cap) = self.host.vol(|v| {
            let j = v.journal();
            (
                j.last_seq().0,
                j.durable_seq().0,
                j.used_bytes(),
                j.capacity_for_entries(),
            )
        });
        let lag_seconds = s
            .oldest_unacked_ns
            .map(|t| (pairfs::types::now_ns().saturating_sub(t)) as f64 / 1e9)
            .unwrap_or(0.0);
        let rate = match (self.copy_started, s.copy_progress) {
            (Some(t), Some((sent, _))) => {
                let secs = t.elapsed().as_secs_f64().max(0.001);
                Some(sent as f64 * f64::from(self.host.vol(|v| v.block_size() as u32)) / secs)
            }
            _ => None,
        };
        StatusReport {
            node: self.cfg.name.clone(),
            role: format!("{:?}", s.role).to_lowercase(),
            state: s.state.to_string(),
            mode: match self.cfg.mode {
                Mode::Async => "async".into(),
                Mode::Sync => "sync".into(),
            },
            epoch: s.epoch.0,
            peer: self.cfg.peer.as_ref().map(|p| p.name.clone()),
            peer_address: self.cfg.peer.as_ref().map(|p| p.address.to_string()),
            connected: s.connected,
            committed_seq: committed,
            durable_seq: durable,
            sent_seq: s.sent.0,
            applied_seq: s.applied.0,
            lag_entries: s.lag_entries,
            lag_bytes: s.lag_bytes,
            lag_seconds,
            peer_apply_rate_bps: s.apply_rate.map(|r| r as f64),
            backlog: match s.backlog {
                pairfs::repl::Backlog::Journal => "journal".into(),
                pairfs::repl::Backlog::Bitmap { .. } => "bitmap".into(),
            },
            bitmap_blocks: self.bitmap.count(),
            copy_sent: s.copy_progress.map(|(a, _)| a),
            copy_total: s.copy_progress.map(|(_, b)| b),
            copy_rate_bps: rate,
            inconsistent: s.inconsistent,
            journal_used: used,
            journal_capacity: cap,
            refused: s.refused,
            wire_bytes_sent: self.shared.wire_sent.load(Ordering::Relaxed),
            wire_bytes_received: self.shared.wire_received.load(Ordering::Relaxed),
            sync_degraded: self.shared.degraded.load(Ordering::Relaxed),
        }
    }
}

/// Streams a copy (on a blocking thread): every block ever written (`marked = None`) or
/// the marked ones. Returns the newest durable seq once everything was sent, `None` if
/// cancelled.
fn copy_blocks(
    host: &Host,
    tx: &mpsc::Sender<Message>,
    events: &mpsc::UnboundedSender<Event>,
    cancel: &AtomicBool,
    epoch: pairfs::repl::Epoch,
    marked: Option<Vec<u64>>,
) -> Result<Option<Seq>> {
    let list: Vec<u64> = match marked {
        Some(m) => m,
        None => {
            let ranges = host.vol(|v| v.written_ranges())?;
            ranges.iter().flat_map(|&(s, n)| s..s + n).collect()
        }
    };
    let total = list.len() as u64;
    let bs = host.vol(|v| v.block_size());
    let mut sent = 0u64;
    let mut last_report = Instant::now();
    for chunk in list.chunks(COPY_BATCH) {
        if cancel.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut blocks = Vec::with_capacity(chunk.len());
        host.vol(|v| -> Result<(), VolumeError> {
            for &b in chunk {
                let mut data = vec![0u8; bs];
                v.read_current(b, &mut data)?;
                blocks.push(WireBlock {
                    block: b,
                    data,
                    fresh: false,
                });
            }
            Ok(())
        })?;
        if tx
            .blocking_send(Message::CopyBlocks { epoch, blocks })
            .is_err()
        {
            return Ok(None); // the connection went away
        }
        sent += chunk.len() as u64;
        if last_report.elapsed() > Duration::from_millis(200) {
            last_report = Instant::now();
            let _ = events.send(Event::CopyProgress { sent, total });
        }
    }
    let _ = events.send(Event::CopyProgress { sent, total });
    // Seal: every block sent reflects a state at or before the newest durable seq.
    host.sync().map_err(|e| anyhow::anyhow!(e))?;
    let newest = host.vol(|v| v.journal().durable_seq());
    Ok(Some(newest))
}

/// Serves `status` requests on `DIR/control.sock` (mode 0600).
async fn control_socket(dir: PathBuf, shared: Arc<Shared>) {
    let path = dir.join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "control socket unavailable");
            return;
        }
    };
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
            let (r, mut w) = stream.split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match line.trim() {
                "status" => {
                    let (tx, rx) = oneshot::channel();
                    if shared.events.send(Event::Status(tx)).is_err() {
                        return;
                    }
                    match rx.await {
                        Ok(s) => serde_json::to_string(&s).unwrap_or_default(),
                        Err(_) => return,
                    }
                }
                other => format!("{{\"error\":\"unknown request {other:?}\"}}"),
            };
            let _ = w.write_all(reply.as_bytes()).await;
            let _ = w.write_all(b"\n").await;
        });
    }
}

/// Asks a running node for its status through its control socket.
pub(crate) fn query_status(dir: &Path) -> Result<StatusReport> {
    use std::io::{BufRead, BufReader, Write};
    let path = dir.join(CONTROL_SOCKET);
    let mut s = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "no pairfs daemon answers on {} (is `pairfs mount`/`pairfs serve` running?)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"status\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).context("decoding the daemon's status")
}

/// True when a secondary's volume holds a consistent filesystem (it can be mounted).
pub(crate) fn mountable(st: &PersistedState) -> bool {
    !(st.empty || st.inconsistent_until.is_some())
}
