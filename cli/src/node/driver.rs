//! The driver: the only task that touches the [`Replicator`]. It turns what happens — a
//! connection, a message, entries sealed or durable, a copy's progress, a status request —
//! into the replicator's events, and carries out its actions on the volume, the network
//! and the node's files, in order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pairfs::repl::{
    Action, CopyKind, Message, Mode, Replicator, Role, Stream, WireBlock, WireEntry,
};
use pairfs::{Seq, VolumeError};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::block_in_place;

use super::fetch::FetchClient;
use super::hooks::{Gate, PeerProgress};
use super::link::ConnHandle;
use super::takeover::PendingTakeover;
use super::verify::{Step, VerifyJob, VerifyReport, VerifyUpdate};
use super::{Event, Host, Shared, StatusReport};
use crate::config::NodeConfig;
use crate::state::{DiffBitmap, save_state, write_durably};

/// The last verify's report in the data directory.
const VERIFY_FILE: &str = "verify.json";

/// Blocks per copy message: 256 × 4 KiB = 1 MiB frames, well under the frame limit.
const COPY_BATCH: usize = 256;
/// A step of the driver's loop longer than this is logged (debug).
const SLOW_STEP: Duration = Duration::from_millis(2);

/// Entries up to this size (journal bytes) are read for sending on the driver's thread
/// ([`Host::vol_quick`]); larger ones leave the worker to the network tasks meanwhile.
const QUICK_READ: u64 = 256 << 10;
/// Entries with up to this much data are applied on the driver's thread: one of metadata
/// and a few blocks takes less time than `block_in_place`'s hand-over of the worker's
/// other tasks to another thread (a few context switches, per entry; as
/// [`Host::vol_mut_quick`]). What it may wait for meanwhile is the filesystem's lock and
/// the replica's reads in flight (FUSE threads, which never wait for the runtime).
const QUICK_APPLY: u64 = 256 << 10;
/// A secondary whose volume an I/O error poisoned reopens it after this long, doubling up
/// to [`REOPEN_MAX`] while it keeps failing (a full disk takes an operator's minutes).
const REOPEN_FIRST: Duration = Duration::from_millis(500);
const REOPEN_MAX: Duration = Duration::from_secs(30);

/// What must wait until the actions of an event are carried out.
enum After {
    Nothing,
    /// The peer's message holds its share of the receive budget until handled.
    Release(OwnedSemaphorePermit),
    /// A writer waits until the degraded state is persisted.
    Notify(std::sync::mpsc::Sender<()>),
}

pub struct Driver {
    pub(super) cfg: NodeConfig,
    pub(super) host: Arc<Host>,
    pub(super) shared: Arc<Shared>,
    pub(super) repl: Replicator,
    bitmap: DiffBitmap,
    conn: Option<ConnHandle>,
    /// Replication-stream messages of this connection waiting for room in the link's
    /// queue, oldest first. The driver never waits for that room: meanwhile it would not
    /// hear the peer (a takeover request, a freeze) nor serve status. Bounded by what the
    /// replicator has in flight (its window).
    outbox: std::collections::VecDeque<Message>,
    copy_cancel: Option<Arc<AtomicBool>>,
    copy_started: Option<Instant>,
    /// The volume is poisoned: try to reopen it at this instant.
    reopen_at: Option<Instant>,
    reopen_delay: Duration,
    reopen_error: Option<String>,
    /// Writes were admitted at the last publish (orphans are freed when they first are).
    admitted: bool,
    /// A `pairfs verify` running, and the last one's result.
    verify: Option<VerifyJob>,
    last_verify: Option<VerifyReport>,
    verify_ids: u64,
    /// Secondary: blocks a verify found different here. The kernel may cache their old
    /// content without any inode having changed: when an entry (the repair) writes one,
    /// everything the kernel caches is dropped.
    suspect: std::collections::HashSet<u64>,
    /// Reads of blocks whose newest version is on the peer (while taking over).
    pub(super) fetch: Arc<FetchClient>,
    /// A `pairfs takeover` waiting for the primary to freeze.
    pub(super) takeover_req: Option<PendingTakeover>,
    pub(super) takeover_ids: u64,
    /// Taking over: the merge of the local-unreflected area is running.
    pub(super) merging: bool,
    /// The last forced takeover's report (persisted).
    pub(super) last_forced: Option<super::force::LossReport>,
    /// A `pairfs takeover --force` waiting for the peer's connection to time out.
    pub(super) pending_force: Option<super::force::PendingForce>,
    /// Rejoining after a divergence (`pairfs rejoin`): the blocks of this node's tail.
    rejoin: Option<DiffBitmap>,
}

impl Driver {
    pub fn new(
        cfg: NodeConfig,
        host: Arc<Host>,
        shared: Arc<Shared>,
        repl: Replicator,
        bitmap: DiffBitmap,
        fetch: Arc<FetchClient>,
    ) -> Driver {
        Driver {
            last_forced: super::force::load_last(&cfg.data),
            pending_force: None,
            rejoin: None,
            host,
            shared,
            repl,
            bitmap,
            conn: None,
            outbox: std::collections::VecDeque::new(),
            copy_cancel: None,
            copy_started: None,
            reopen_at: None,
            reopen_delay: REOPEN_FIRST,
            reopen_error: None,
            admitted: false,
            last_verify: std::fs::read(cfg.data.join(VERIFY_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok()),
            cfg,
            verify: None,
            verify_ids: 0,
            suspect: Default::default(),
            fetch,
            takeover_req: None,
            takeover_ids: 0,
            merging: false,
        }
    }

    /// A node rejoining after a divergence names its tail's blocks in its hellos.
    pub fn rejoining(&mut self, tail: DiffBitmap) {
        self.repl.set_rejoin(Some(tail.marked()));
        self.rejoin = Some(tail);
    }

    pub async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Event>,
        mut priority: mpsc::UnboundedReceiver<Event>,
    ) {
        // Entries that became sendable before the runtime started.
        self.take_entries();
        self.actions().await;
        self.publish();
        loop {
            let now = Instant::now();
            let next = [self.repl.poll_timeout(), self.reopen_at]
                .into_iter()
                .flatten()
                .min();
            let idle = if self.merging {
                Duration::ZERO
            } else if self.verify.is_some()
                || self.takeover_req.is_some()
                || self.pending_force.is_some()
            {
                Duration::from_millis(20)
            } else {
                Duration::from_millis(250)
            };
            let timeout = next
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or(idle)
                .min(idle);
            let next_event = async {
                tokio::select! {
                    biased;
                    Some(ev) = priority.recv() => Some(ev),
                    ev = rx.recv() => ev,
                }
            };
            let recv = tokio::time::timeout(timeout, next_event);
            let room = self
                .conn
                .as_ref()
                .filter(|_| !self.outbox.is_empty())
                .map(|c| c.repl.clone());
            let received = match room {
                Some(tx) => tokio::select! {
                    r = recv => Some(r),
                    permit = tx.reserve_owned() => {
                        self.send_queued(permit.ok());
                        None
                    }
                },
                None => Some(recv.await),
            };
            let Some(received) = received else {
                continue;
            };
            let step = Instant::now();
            let mut kind = "timeout";
            let after = match received {
                Ok(Some(Event::Stop)) | Ok(None) => return,
                Ok(Some(ev)) => {
                    kind = ev.kind();
                    self.on_event(ev)
                }
                Err(_) => {
                    // (Durability reached by a group commit nobody announced, too.)
                    self.take_entries();
                    self.repl.handle_timeout(Instant::now());
                    self.maybe_reopen();
                    After::Nothing
                }
            };
            self.actions().await;
            self.drive_verify().await;
            if self.merging {
                self.merge_some();
                self.actions().await;
            }
            self.drive_takeover_request();
            self.drive_force().await;
            self.publish();
            if step.elapsed() > SLOW_STEP {
                // What an operator's request or the peer's answer arriving meanwhile waited for.
                let ms = step.elapsed().as_secs_f64() * 1e3;
                tracing::debug!(event = kind, ms, "a long driver step");
            }
            match after {
                After::Nothing => {}
                After::Release(permit) => drop(permit),
                After::Notify(done) => {
                    let _ = done.send(());
                }
            }
        }
    }

    /// Primary: hands the replicator the entries it may now send; both roles: how far the
    /// local journal is durable.
    pub(super) fn take_entries(&mut self) {
        let primary = self.repl.role() == Role::Primary;
        let unsynced = self.repl.sends_unsynced();
        let (metas, durable) = self.host.vol_mut_quick(|v| {
            let metas = if primary {
                v.take_entries(unsynced)
            } else {
                Vec::new()
            };
            (metas, v.journal().durable_seq())
        });
        for m in metas {
            self.repl.handle_local_entry(m);
        }
        self.repl.handle_local_durable(durable, Instant::now());
    }

    fn on_event(&mut self, ev: Event) -> After {
        let now = Instant::now();
        match ev {
            Event::Connected(h) => {
                self.outbox.clear();
                if let Some(old) = self.conn.take() {
                    old.conn.close(1, "replaced");
                    self.repl.handle_disconnected();
                }
                if self.reopen_at.is_some() {
                    // No stream until the volume is usable again.
                    h.conn.close(1, "the volume is being reopened");
                    return After::Nothing;
                }
                self.conn = Some(h);
                self.repl.handle_connected(now);
            }
            Event::Disconnected(id) => {
                if self.conn.as_ref().is_some_and(|c| c.id == id) {
                    self.publish_wire_bytes();
                    self.conn = None;
                    self.outbox.clear();
                    self.repl.handle_disconnected();
                }
            }
            Event::Message(id, r) => {
                if self.conn.as_ref().is_some_and(|c| c.id == id) {
                    self.repl.handle_message(r.message, now);
                }
                return After::Release(r.permit);
            }
            Event::Entries => self.take_entries(),
            Event::Flush(seq) => {
                self.take_entries();
                self.repl.handle_fsync(seq);
            }
            Event::Degraded { seq, done } => {
                self.repl.handle_degraded(seq, pairfs::types::now_ns());
                return After::Notify(done);
            }
            Event::CopyProgress { sent, total } => self.repl.handle_copy_progress(sent, total),
            Event::CopyDone { id, newest } => {
                self.take_entries();
                self.repl.handle_copy_sent(id, newest);
            }
            Event::CopyFailed { id, error } => {
                tracing::warn!(copy = id, %error, "copy failed; it restarts with the connection");
                if let Some(c) = self.conn.take() {
                    c.conn.close(1, "copy failed");
                }
                self.outbox.clear();
                self.repl.handle_disconnected();
            }
            Event::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Event::Verify { repair, updates } => self.start_verify(repair, updates),
            Event::Takeover {
                force: false,
                reply,
            } => self.request_takeover(reply),
            Event::Takeover { force: true, reply } => self.force_takeover(reply),
            // (Taken by the loop before it gets here.)
            Event::Stop => {}
        }
        After::Nothing
    }

    fn start_verify(&mut self, repair: bool, updates: mpsc::UnboundedSender<VerifyUpdate>) {
        let refuse = |why: String| {
            let _ = updates.send(VerifyUpdate::Failed { error: why });
        };
        if self.repl.role() != Role::Primary {
            let peer = self
                .cfg
                .peer
                .as_ref()
                .map_or("the primary", |p| p.name.as_str());
            return refuse(format!(
                "this node is the secondary: run `pairfs verify` on the primary ({peer})"
            ));
        }
        if self.verify.is_some() {
            return refuse("a verify is already running on this node".into());
        }
        let st = self.repl.status();
        if !st.connected || st.state != pairfs::repl::PairState::Pair {
            return refuse(format!(
                "the pair is {} ({}): verify compares a connected, streaming pair",
                st.state,
                if st.connected {
                    "connected"
                } else {
                    "peer unreachable"
                }
            ));
        }
        let (blocks, bs, used) = self.host.vol(|v| {
            let used = pairfs_fs::inspect::superblock(v)
                .and_then(|sb| {
                    pairfs_fs::inspect::blocks_in_use(v, &sb, 0, sb.total_blocks)
                        .map(|u| u.len() as u64)
                })
                .unwrap_or(v.block_count());
            (v.block_count(), v.block_size() as u64, used)
        });
        tracing::info!(repair, blocks = used, "verify starts");
        self.verify = Some(VerifyJob::new(
            repair,
            updates,
            blocks,
            used,
            bs,
            self.verify_ids + 1,
        ));
    }

    /// Advances a running verify: batches while it has room, its end.
    async fn drive_verify(&mut self) {
        let Some(mut job) = self.verify.take() else {
            return;
        };
        loop {
            let host = self.host.clone();
            let r = block_in_place(|| job.step(&host, &mut || self.take_entries()));
            match r {
                Ok(Step::Batch { id, at, blocks }) => {
                    self.verify_ids = self.verify_ids.max(id);
                    self.repl.handle_verify_request(id, at, blocks);
                    self.actions_for_verify(&mut job).await;
                }
                Ok(Step::Wait) => {
                    job.report_progress();
                    self.verify = Some(job);
                    return;
                }
                Ok(Step::Finished(report)) => {
                    tracing::info!(
                        compared = report.blocks_compared,
                        differing = report.differing,
                        repaired = ?report.repaired,
                        "verify finished"
                    );
                    if let Ok(json) = serde_json::to_vec(&report) {
                        if let Err(e) = write_durably(&self.cfg.data.join(VERIFY_FILE), &json) {
                            tracing::warn!(error = %format!("{e:#}"), "recording the verify result");
                        }
                    }
                    self.last_verify = Some(report);
                    return;
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    tracing::warn!(error = %msg, "verify failed");
                    job.fail(&msg);
                    return;
                }
            }
        }
    }

    /// Carries out the replicator's actions while a verify job is out of `self`.
    async fn actions_for_verify(&mut self, job: &mut VerifyJob) {
        while let Some(a) = self.repl.poll_action() {
            if let Action::VerifyAnswer { id, differ } = a {
                job.answer(id, differ);
                continue;
            }
            if let Err(e) = self.act(a).await {
                tracing::error!(error = %format!("{e:#}"), "replication action failed");
            }
        }
    }

    /// Carries out the replicator's actions, in order.
    pub(super) async fn actions(&mut self) {
        while let Some(a) = self.repl.poll_action() {
            if let Err(e) = self.act(a).await {
                tracing::error!(error = %format!("{e:#}"), "replication action failed");
            }
        }
    }

    pub(super) async fn send(&mut self, m: Message) {
        let Some(c) = self.conn.as_ref() else { return };
        match m.stream() {
            Stream::Control => {
                if let Message::Frozen { seq, .. } = &m {
                    tracing::debug!(%seq, "takeover: the freeze point handed to the link");
                }
                let _ = c.ctrl.send(m);
            }
            Stream::Replication => {
                self.outbox.push_back(m);
                self.send_queued(None);
            }
        }
    }

    /// Hands the link the queued replication messages it has room for (`permit`: room
    /// for the first, reserved; `None` when the link went away with the reservation).
    fn send_queued(&mut self, permit: Option<mpsc::OwnedPermit<Message>>) {
        let Some(c) = self.conn.as_ref() else {
            self.outbox.clear();
            return;
        };
        if let Some(p) = permit {
            if let Some(m) = self.outbox.pop_front() {
                p.send(m);
            }
        }
        while let Some(m) = self.outbox.pop_front() {
            match c.repl.try_send(m) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(m)) => {
                    self.outbox.push_front(m);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.outbox.clear();
                    return;
                }
            }
        }
    }

    /// Waits until every queued replication message is with the link (before a copy,
    /// whose blocks go to the link from a thread of their own, after them).
    async fn flush_queued(&mut self) {
        let Some(tx) = self.conn.as_ref().map(|c| c.repl.clone()) else {
            self.outbox.clear();
            return;
        };
        while let Some(m) = self.outbox.pop_front() {
            if tx.send(m).await.is_err() {
                self.outbox.clear();
                return;
            }
        }
    }

    async fn act(&mut self, a: Action) -> Result<()> {
        match a {
            Action::Send(m) => self.send(m).await,
            Action::SendEntry(meta) => {
                // Large entries' disk reads leave the worker thread to the network tasks; a
                // small one, just written, is in the page cache.
                let read = |v: &pairfs::Volume| v.read_wire_entry(meta.seq);
                let r = if meta.journal_bytes <= QUICK_READ {
                    self.host.vol_quick(read)
                } else {
                    block_in_place(|| self.host.vol(read))
                };
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
            Action::SendOwnEntries { after, upto } => self.send_own_entries(after, upto).await,
            Action::SendCatchUp {
                after,
                upto,
                bitmap,
                max_bytes,
            } => {
                let extra = if bitmap {
                    self.bitmap.marked()
                } else {
                    Vec::new()
                };
                let r = block_in_place(|| {
                    self.host
                        .vol(|v| v.catch_up_entry(after, upto, &extra, max_bytes))
                });
                match r {
                    Ok(entry) => {
                        let epoch = self.repl.persisted().epoch;
                        self.send(Message::Entry { epoch, entry }).await;
                    }
                    Err(e) => self.repl.handle_catch_up_failed(&e.to_string()),
                }
            }
            Action::StartCopy { kind, id } => {
                self.flush_queued().await;
                self.start_copy(kind, id)
            }
            Action::StopCopy => {
                if let Some(c) = self.copy_cancel.take() {
                    c.store(true, Ordering::Release);
                }
            }
            Action::LimitEntries(bytes) => {
                if bytes < pairfs::repl::MAX_ENTRY_WIRE_BYTES {
                    tracing::info!(
                        peer_takes = bytes,
                        ours = pairfs::repl::MAX_ENTRY_WIRE_BYTES,
                        "the peer's journal takes smaller entries than ours: entries are sealed at its size"
                    );
                }
                self.host.vol_mut(|v| v.set_max_entry_wire_bytes(bytes));
            }
            Action::Apply(e) => {
                let seq = e.seq;
                // (Not the end of a copy: the filesystem reloads after it.)
                let r = if !e.blocks.is_empty() && e.data_bytes() <= QUICK_APPLY {
                    self.apply(&e)
                } else {
                    block_in_place(|| self.apply(&e))
                };
                match r {
                    Ok(meta) => self.repl.handle_applied(meta, Instant::now()),
                    Err(err) => {
                        self.repl
                            .handle_apply_failed(Some(seq), &format!("{err:#}"));
                        self.schedule_reopen();
                    }
                }
            }
            Action::ApplyCopy(blocks) => {
                let r = block_in_place(|| self.host.vol_mut(|v| v.write_copy_blocks(&blocks)));
                if let Err(err) = r {
                    self.repl.handle_apply_failed(None, &err.to_string());
                    self.schedule_reopen();
                }
            }
            Action::AdoptVolume(id) => {
                self.host
                    .vol_mut(|v| v.adopt_id(id))
                    .context("taking the primary's volume identity")?;
                tracing::info!(volume = %id, "this node now replicates volume");
            }
            Action::SyncLocal => match block_in_place(|| self.host.sync()) {
                Ok(durable) => self.repl.handle_local_durable(durable, Instant::now()),
                Err(err) => {
                    self.repl.handle_sync_failed(&format!("{err:#}"));
                    self.schedule_reopen();
                }
            },
            Action::Release(seq) => self.host.vol_mut_quick(|v| v.set_release_limit(seq)),
            Action::MarkBitmapAfter { after, upto } => {
                let blocks = self.host.vol(|v| v.retained_blocks_after(after, upto))?;
                self.bitmap.mark(blocks);
                self.bitmap.persist()?;
                self.host.vol_mut(|v| v.force_release(upto))?;
            }
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
            Action::Persist(st) => {
                let t = Instant::now();
                save_state(&self.cfg.data, &st)?;
                tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "state persisted");
                self.shared.set_serving(st.takeover);
            }
            Action::Fenced { base, newest } => {
                let f = crate::state::Fenced {
                    base: base.0,
                    newest: newest.0,
                    at_ns: pairfs::types::now_ns(),
                };
                f.save(&self.cfg.data)?;
            }
            Action::MarkBlocks(blocks) => {
                self.bitmap.mark(blocks);
                self.bitmap.persist()?;
            }
            Action::Acked { received, durable } => {
                self.shared.set_peer(PeerProgress { received, durable });
            }
            Action::Disconnect {
                reason,
                role_change,
            } => {
                self.outbox.clear();
                if let Some(c) = self.conn.take() {
                    let code = if role_change {
                        pairfs_transport::CLOSE_ROLE_CHANGE
                    } else {
                        2
                    };
                    c.conn.close(code, &reason);
                }
                self.repl.handle_disconnected();
            }
            Action::SendHeaders(metas) => self.send_headers(metas).await,
            // A taker asked by a failback (§7.6), or the primary by a takeover.
            Action::Freeze { id } if self.repl.role() == Role::Secondary => {
                self.freeze_taker(id)?
            }
            Action::Freeze { id } => self.freeze(id)?,
            Action::BeginTakeover {
                id,
                freeze,
                index,
                state,
            } => self.begin_takeover(id, freeze, index, &state),
            Action::Merge => self.merging = true,
            Action::RoleChanged(role) => self.role_changed(role),
            Action::VerifyAnswer { id, differ } => {
                if let Some(job) = self.verify.as_mut().filter(|j| j.owns(id)) {
                    job.answer(id, differ);
                }
            }
            Action::VerifyBlocks { id, blocks } => {
                let differ = block_in_place(|| {
                    self.host.vol(|v| {
                        let mut buf = vec![0u8; v.block_size()];
                        let mut differ = Vec::new();
                        for (b, crc) in blocks {
                            let same = v.read_current(b, &mut buf).is_ok()
                                && pairfs::types::crc32c(&buf) == crc;
                            if !same {
                                differ.push(b);
                            }
                        }
                        differ
                    })
                });
                if !differ.is_empty() {
                    tracing::warn!(blocks = ?differ, "verify: blocks differ from the primary's");
                    self.suspect.extend(&differ);
                }
                self.repl.handle_verify_done(id, differ);
            }
        }
        Ok(())
    }

    /// Applies one replicated entry (secondary; or a primary reconciling), then drops what
    /// the caches (ours and the kernel's) hold of what it changed.
    fn apply(&mut self, e: &WireEntry) -> Result<pairfs::repl::EntryMeta> {
        let r = self.apply_inner(e);
        if r.is_ok() {
            // The volume works again: a later failure starts the reopen backoff afresh.
            self.reopen_delay = REOPEN_FIRST;
        }
        r
    }

    fn apply_inner(&mut self, e: &WireEntry) -> Result<pairfs::repl::EntryMeta> {
        let repairs =
            !self.suspect.is_empty() && e.blocks.iter().any(|b| self.suspect.remove(&b.block));
        if let Some(fs) = self.host.fs().filter(|fs| fs.is_read_only()) {
            let (meta, mut inv) = fs.apply_replicated(e).context("applying an entry")?;
            if e.blocks.is_empty() || repairs {
                // The end of a copy, or a repair: anything may have changed underneath.
                fs.reload().context("reloading after a copy")?;
                inv.inodes = fs.referenced_inode_list();
                inv.inodes.push(1);
            }
            self.host.invalidate(&inv);
            return Ok(meta);
        }
        // The in-place writes (most of a drain entry's 32 MiB) without the lock, so that
        // the writers and readers of a node taking over do not wait for them.
        let plan = self
            .host
            .vol_mut(|v| v.plan_apply(e))
            .context("applying an entry")?;
        let written = block_in_place(|| plan.write(e));
        self.host
            .vol_mut(|v| v.finish_apply(e, plan, written))
            .context("applying an entry")
    }

    /// Secondary, answering a reconciling primary: its own entries after `after`.
    async fn send_own_entries(&mut self, after: Seq, upto: Seq) {
        let r = block_in_place(|| {
            self.host.vol(|v| {
                let locs: Vec<Seq> = v
                    .retained_entries()
                    .iter()
                    .filter(|e| e.seq > after && e.seq <= upto)
                    .map(|e| e.seq)
                    .collect();
                let mut out = Vec::with_capacity(locs.len());
                for seq in locs {
                    out.push(v.read_wire_entry(seq)?);
                }
                Ok::<_, VolumeError>(out)
            })
        });
        let entries = match r {
            Ok(v) if v.first().is_some_and(|e| e.prev_seq == after) => v,
            Ok(_) => {
                let why = format!("this node no longer holds the entry after seq {after}");
                self.repl.handle_pull_failed(&why);
                return;
            }
            Err(e) => {
                self.repl.handle_pull_failed(&e.to_string());
                return;
            }
        };
        tracing::warn!(
            after = %after,
            upto = %upto,
            count = entries.len(),
            "sending back entries the primary lost in a crash"
        );
        let epoch = self.repl.persisted().epoch;
        for entry in entries {
            self.send(Message::Entry { epoch, entry }).await;
        }
    }

    /// After a failed apply or sync: if that poisoned the volume, reopen it soon.
    fn schedule_reopen(&mut self) {
        let poisoned = self.host.vol(|v| v.is_poisoned());
        if poisoned && self.reopen_at.is_none() && self.repl.role() == Role::Secondary {
            tracing::warn!(
                in_ms = self.reopen_delay.as_millis() as u64,
                "the volume refuses writes after an I/O error: reopening it"
            );
            self.reopen_at = Some(Instant::now() + self.reopen_delay);
        }
    }

    fn maybe_reopen(&mut self) {
        let Some(at) = self.reopen_at else { return };
        if Instant::now() < at {
            return;
        }
        match block_in_place(|| self.host.reopen()) {
            Ok(()) => {
                let durable = self.host.vol(|v| v.journal().durable_seq());
                self.repl.handle_volume_reopened(durable);
                self.reopen_at = None;
                // Not reset until an entry applies: a disk that stays full fails the next
                // apply at once, and the reopens must back off all the same.
                self.reopen_delay = (self.reopen_delay * 2).min(REOPEN_MAX);
                self.reopen_error = None;
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!(error = %msg, retry_in_s = self.reopen_delay.as_secs_f64(), "reopening the volume failed");
                self.reopen_error = Some(msg);
                self.reopen_delay = (self.reopen_delay * 2).min(REOPEN_MAX);
                self.reopen_at = Some(Instant::now() + self.reopen_delay);
            }
        }
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

    /// Tells the writers what they may do; frees orphans when writes are first admitted;
    /// ends a rejoin once the node is consistent again.
    fn publish(&mut self) {
        if let Some(r) = self.rejoin.as_ref() {
            let s = self.repl.status();
            if !s.inconsistent && s.state == pairfs::repl::PairState::Pair {
                match r.remove() {
                    Ok(()) => {
                        tracing::info!("rejoined: this node is the primary's replica again");
                        self.repl.set_rejoin(None);
                        self.rejoin = None;
                    }
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "ending the rejoin"),
                }
            }
        }
        // A primary (not reconciling, not frozen), or a node taking over.
        let admits = self.repl.admits_writes();
        self.shared.publish(Gate {
            admits,
            sync_waits: self.repl.sync_waits(),
            backpressure: self.repl.backpressure(),
        });
        if admits && !self.admitted {
            if let Some(fs) = self.host.fs_arc().filter(|fs| !fs.is_read_only()) {
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = fs.reap_orphans() {
                        tracing::warn!(error = %e, "freeing unlinked files left by a crash failed");
                    }
                });
            }
        }
        self.admitted = admits;
    }

    /// The current connection's bytes on the wire, into the shared counters (read when
    /// asked for, not per message: quinn's statistics take the connection's lock).
    fn publish_wire_bytes(&self) {
        if let Some(c) = &self.conn {
            let stats = c.conn.stats();
            self.shared
                .wire_sent
                .store(stats.bytes_sent, Ordering::Relaxed);
            self.shared
                .wire_received
                .store(stats.bytes_received, Ordering::Relaxed);
        }
    }

    fn status(&self) -> StatusReport {
        self.publish_wire_bytes();
        let s = self.repl.status();
        let (committed, durable, used, cap, bs) = self.host.vol(|v| {
            let j = v.journal();
            (
                j.last_seq().0,
                j.durable_seq().0,
                j.used_bytes(),
                j.capacity_for_entries(),
                v.block_size() as f64,
            )
        });
        let lag_seconds = s
            .oldest_unacked_ns
            .map(|t| (pairfs::types::now_ns().saturating_sub(t)) as f64 / 1e9)
            .unwrap_or(0.0);
        let rate = match (self.copy_started, s.copy_progress) {
            (Some(t), Some((sent, _))) => {
                let secs = t.elapsed().as_secs_f64().max(0.001);
                Some(sent as f64 * bs / secs)
            }
            _ => None,
        };
        let apply_error = match (&s.apply_error, &self.reopen_error) {
            (Some(a), Some(r)) => Some(format!("{a}; reopening the volume failed: {r}")),
            (a, _) => a.clone(),
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
            replica_received_seq: s.received.0,
            replica_durable_seq: s.durable.0,
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
            degraded_since_seq: s.degraded.map(|d| d.since.0),
            degraded_since_ns: s.degraded.map(|d| d.at_ns),
            apply_error,
            writable: self.admitted,
            last_verify: self.last_verify.clone(),
            verify_running: self.verify.is_some(),
            takeover: self.takeover_status(),
            last_forced: self.last_forced.clone(),
            headers_seq: s.headers_seq.0,
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
    // Every block sent reflects a state at or before what is committed now: a marker entry
    // after it, durable, is where the peer is consistent (PROTOCOL.md §5.2).
    host.vol_mut(|v| v.append_marker())
        .context("ending the copy")?;
    let newest = host.sync()?;
    Ok(Some(newest))
}
