//! The driver's part of a takeover (docs/PROTOCOL.md §7): freezing the old primary,
//! starting the new one's takeover (table, pair state, volume, filesystem, in that order),
//! merging its local-unreflected area, the status and the `pairfs takeover` request.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pairfs::journal::JournalExpect;
use pairfs::repl::{Message, Role, Takeover};
use pairfs::takeover::{EntryHeader, RemoteIndex};
use pairfs::volume::MergeStep;
use pairfs::volume::PeerFetch;
use pairfs::{BlockNo, Seq, VolumeError};
use pairfs_fs::{Fs, FsMode};
use tokio::sync::oneshot;
use tokio::task::block_in_place;

use super::driver::Driver;
use super::{TakeoverReport, TakeoverStatus};
use crate::state::{TakeoverTable, save_state};

/// How long `pairfs takeover` waits for the primary to freeze.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(15);
/// Inode-table blocks the backlog wrote last that a taker fetches at ready with its
/// bitmaps, in the same request (16 KiB at 4 KiB blocks: 0.7 ms on a 200 Mbit/s link,
/// 13 µs at 10 Gbit/s, against a round trip for each first write that needs one)...
const RECENT_INODE_BLOCKS: usize = 4;
/// ... found among this many block numbers of the newest headers (a bound on the search:
/// a 512 MiB backlog names 131,072).
const RECENT_SCAN: usize = 65_536;
/// A merge runs in slices of this long, so the driver keeps serving the network.
const MERGE_SLICE: Duration = Duration::from_millis(20);

/// A `pairfs takeover` waiting for its answer.
pub struct PendingTakeover {
    id: u64,
    started: Instant,
    reply: oneshot::Sender<TakeoverReport>,
    /// Sent to the primary; until then, why it could not be yet (a node that is still
    /// stepping down from an earlier takeover, or not yet streaming, asks once it is).
    waiting: Option<String>,
}

/// What a taker fetches from the old primary at ready in one request: those of the
/// filesystem's allocation blocks, root inode and root directory's tree root (where this
/// node has it: [`Fs::dir_tree_root`]) that are on the peer, and the inode table's blocks
/// the backlog wrote last (up to [`RECENT_INODE_BLOCKS`]).
fn fetch_ahead(fs: &Fs, index: &RemoteIndex) -> Vec<(BlockNo, Seq)> {
    let sb = fs.superblock();
    let (root, itab) = Fs::inode_blocks_ahead(&sb);
    let root_dir = fs.dir_tree_root(pairfs_fs::format::ROOT_INO).ok();
    let mut wanted: Vec<(BlockNo, Seq)> = Fs::allocation_blocks(&sb)
        .into_iter()
        .chain([root])
        .chain(root_dir)
        .filter_map(|b| index.newest(b).map(|s| (b, s)))
        .collect();
    for recent in index.newest_in(itab, RECENT_INODE_BLOCKS, RECENT_SCAN) {
        if !wanted.contains(&recent) {
            wanted.push(recent);
        }
    }
    wanted
}

pub(super) fn failed(error: String) -> TakeoverReport {
    TakeoverReport {
        ok: false,
        error: Some(error),
        ..TakeoverReport::default()
    }
}

impl Driver {
    /// `pairfs takeover` on this node.
    pub(super) fn request_takeover(&mut self, reply: oneshot::Sender<TakeoverReport>) {
        if self.takeover_req.is_some() {
            let _ = reply.send(failed("a takeover is already being asked for".into()));
            return;
        }
        if self.repl.role() == Role::Primary && self.repl.takeover().is_none() {
            let _ = reply.send(failed("this node is already the primary".into()));
            return;
        }
        self.takeover_ids += 1;
        self.takeover_req = Some(PendingTakeover {
            id: self.takeover_ids,
            started: Instant::now(),
            reply,
            waiting: Some("not asked yet".into()),
        });
        self.drive_takeover_request();
    }

    /// Asks the primary once this node can; fails a request not answered in time.
    pub(super) fn drive_takeover_request(&mut self) {
        let Some(p) = self.takeover_req.as_mut() else {
            return;
        };
        if p.waiting.is_none()
            && self.repl.takeover_asked() != Some(p.id)
            && self.repl.takeover().is_none()
        {
            // The request was lost with its connection (the primary answers a repeated one
            // with the same freeze point): ask again on the next.
            p.waiting = Some("the connection to the primary was lost".into());
        }
        if p.waiting.is_some() {
            match self.repl.handle_takeover_request(p.id) {
                Ok(()) => {
                    tracing::info!(request = p.id, "takeover asked of the primary");
                    p.waiting = None;
                }
                Err(e) => p.waiting = Some(e),
            }
        }
        if p.started.elapsed() > FREEZE_TIMEOUT {
            if let Some(p) = self.takeover_req.take() {
                let why = match p.waiting {
                    Some(e) => e,
                    None => format!("the primary did not freeze within {FREEZE_TIMEOUT:?}"),
                };
                let _ = p.reply.send(failed(format!("{why}; nothing changed here")));
            }
        }
    }

    /// The headers of these entries, for the peer.
    pub(super) async fn send_headers(&mut self, metas: Vec<pairfs::repl::EntryMeta>) {
        let r = block_in_place(|| {
            self.host.vol(|v| {
                let mut out = Vec::with_capacity(metas.len());
                for m in &metas {
                    match v.entry_header(m.seq) {
                        Ok(h) => out.push(h),
                        // Released meanwhile (the peer has it durably): not announced.
                        Err(VolumeError::EntryGone { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok::<Vec<EntryHeader>, VolumeError>(out)
            })
        });
        match r {
            Ok(entries) if entries.is_empty() => {}
            Ok(entries) => {
                let epoch = self.repl.persisted().epoch;
                self.send(Message::Headers { epoch, entries }).await;
            }
            Err(e) => tracing::warn!(error = %e, "reading entry headers to send"),
        }
    }

    /// The old primary freezes: writes refused from the next transaction on, everything
    /// durable and handed in, then the replicator moves the epoch and answers.
    pub(super) fn freeze(&mut self, id: u64) -> Result<()> {
        block_in_place(|| -> Result<()> {
            if let Some(fs) = self.host.fs() {
                fs.set_mode(FsMode::Replica)
                    .context("turning the filesystem read-only")?;
                self.host.follow_mode_now();
            }
            self.host.sync().context("making everything durable")?;
            Ok(())
        })?;
        self.take_entries();
        let newest = self.host.vol(|v| v.journal().last_seq());
        self.repl.handle_frozen(id, newest);
        self.shared.set_serving(self.repl.takeover());
        Ok(())
    }

    /// A taker frozen by a failback (docs/PROTOCOL.md §7.6): writes refused from the next
    /// transaction on, the local-unreflected area's open entry sealed and the area durable;
    /// then the replicator moves the epoch and answers with the headers of this
    /// node's entries after its drain point (merged ones from the journal, the rest from
    /// the area).
    pub(super) fn freeze_taker(&mut self, id: u64) -> Result<()> {
        let Some(drain) = self.repl.takeover().and_then(|t| t.drain_point()) else {
            return Ok(());
        };
        let (newest, headers) = block_in_place(|| -> Result<(Seq, Vec<EntryHeader>)> {
            if let Some(fs) = self.host.fs() {
                fs.set_mode(FsMode::Replica)
                    .context("turning the filesystem read-only")?;
                self.host.follow_mode_now();
            }
            // Only the LU: the drain's entries are the peer's own (a full sync would wait
            // for everything the drain wrote since the last one).
            self.host
                .vol_mut(|v| v.sync_local_unreflected())
                .context("making the local-unreflected area durable")?;
            let headers = self
                .host
                .vol(|v| v.headers_after(drain))
                .context("reading the headers of this node's entries")?;
            Ok((headers.last().map_or(drain, |h| h.seq), headers))
        })?;
        self.repl.handle_frozen_taker(id, newest, headers);
        self.shared.set_serving(self.repl.takeover());
        Ok(())
    }

    /// The new primary starts its takeover; answers `pairfs takeover` with the outcome.
    pub(super) fn begin_takeover(
        &mut self,
        id: u64,
        freeze: Seq,
        index: RemoteIndex,
        state: &pairfs::repl::PersistedState,
    ) {
        let r = block_in_place(|| self.start_taking_over(freeze, index, state));
        let report = match r {
            Ok(()) => {
                let p = self.host.vol(|v| v.takeover_progress());
                let b = p.map(|p| p.backlog).unwrap_or_default();
                tracing::info!(
                    seq = %freeze,
                    backlog_entries = b.entries,
                    backlog_blocks = b.blocks,
                    backlog_bytes = b.bytes,
                    "takeover: this node accepts writes; the old primary's backlog drains"
                );
                TakeoverReport {
                    ok: true,
                    error: None,
                    seconds: 0.0,
                    freeze_seq: freeze.0,
                    backlog_entries: b.entries,
                    backlog_blocks: b.blocks,
                    backlog_bytes: b.bytes,
                    forced: None,
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::error!(error = %msg, "takeover failed to start");
                failed(msg)
            }
        };
        if let Some(p) = self.takeover_req.take().filter(|p| p.id == id) {
            let _ = p.reply.send(TakeoverReport {
                seconds: p.started.elapsed().as_secs_f64(),
                ..report
            });
        }
    }

    /// Table, then pair state (both durable), then the volume's takeover and the
    /// filesystem writable (FORMAT.md §5.2: after a crash the table says what is on the
    /// peer before anything is served).
    fn start_taking_over(
        &mut self,
        freeze: Seq,
        index: RemoteIndex,
        state: &pairfs::repl::PersistedState,
    ) -> Result<()> {
        let t0 = Instant::now();
        let asked_ms = self
            .takeover_req
            .as_ref()
            .map(|p| p.started.elapsed().as_secs_f64() * 1e3);
        let applied = self.host.vol(|v| v.journal().last_seq());
        let table = TakeoverTable {
            freeze,
            applied_at_ready: applied,
            entries: index.entries().cloned().collect(),
            bitmap: None,
        };
        // The allocation blocks the filesystem reads as it turns writable, and the inode
        // blocks its first writes are likely to need, fetched while the table and the
        // state are made durable (nothing orders the two; a failed fetch of the
        // allocation blocks is retried there, the others by the reads that need them).
        let wanted = self
            .host
            .fs()
            .map(|fs| fetch_ahead(fs, &index))
            .unwrap_or_default();
        let fetch = self.fetch.clone();
        let (saved, fetched) = std::thread::scope(|scope| {
            let fetching = (!wanted.is_empty()).then(|| scope.spawn(|| fetch.fetch(&wanted)));
            let saved = table
                .save(&self.cfg.data)
                .map(|()| Instant::now())
                .and_then(|t1| save_state(&self.cfg.data, state).map(|()| t1));
            let fetched = fetching.and_then(|h| h.join().ok()).and_then(Result::ok);
            (saved, fetched)
        });
        let t1 = saved?;
        let t2 = Instant::now();
        self.shared.set_serving(state.takeover);
        let ahead: Vec<(BlockNo, Seq, Vec<u8>)> = wanted
            .iter()
            .zip(fetched.unwrap_or_default())
            .map(|(&(b, s), d)| (b, s, d))
            .collect();
        let data = &self.cfg.data;
        start_volume_takeover(data, &self.host, fetch, table, Some(index), ahead, true)?;
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        tracing::info!(
            answer_after_ms = asked_ms,
            table_ms = ms(t0, t1),
            state_ms = ms(t1, t2),
            volume_and_fs_ms = ms(t2, Instant::now()),
            "takeover: where the time to ready went"
        );
        Ok(())
    }

    /// A slice of the merge; at its end the node becomes primary.
    pub(super) fn merge_some(&mut self) {
        let until = Instant::now() + MERGE_SLICE;
        loop {
            match block_in_place(|| self.host.vol_mut(|v| v.merge_step())) {
                Ok(MergeStep::Merged(_)) if Instant::now() < until => {}
                Ok(MergeStep::Merged(_)) => return self.merge_progress(false),
                Ok(MergeStep::Draining) => return,
                Ok(MergeStep::NoRoom) => return self.merge_progress(true),
                Ok(MergeStep::Done) => {
                    self.merging = false;
                    let (retained, durable) = self
                        .host
                        .vol(|v| (v.retained_entries(), v.journal().durable_seq()));
                    self.repl.handle_merged(retained, durable, Instant::now());
                    if let Err(e) = TakeoverTable::remove(&self.cfg.data) {
                        tracing::warn!(error = %format!("{e:#}"), "removing the takeover table");
                    }
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "takeover: merging failed; retrying");
                    return;
                }
            }
        }
    }

    /// What the journal holds of this node's merged entries, for the replicator's limit.
    fn merge_progress(&mut self, no_room: bool) {
        let Some(drain) = self.repl.takeover().and_then(|t| t.drain_point()) else {
            return;
        };
        let (newest, merged) = self
            .host
            .vol(|v| (v.journal().last_seq(), v.retained_bytes_after(drain)));
        self.repl.handle_merge_progress(newest, merged, no_room);
    }

    /// The role changed here.
    /// The pair state is persisted by now. The filesystem follows the role: writable on a
    /// primary (a forced takeover's node was a replica), read-only on a secondary (an old
    /// primary fenced on its return after a forced takeover was writable).
    pub(super) fn role_changed(&mut self, role: Role) {
        self.shared
            .role_changed
            .store(true, std::sync::atomic::Ordering::Release);
        // A taker frozen by a failback becomes a frozen primary, and the node that took over
        // again meanwhile a writing secondary (a taker, §7.6).
        let mode = if self.repl.admits_writes() {
            FsMode::Writable
        } else {
            FsMode::Replica
        };
        if let Some(fs) = self.host.fs().filter(|fs| fs.mode() != mode) {
            match block_in_place(|| fs.set_mode(mode)) {
                Ok(()) => self.host.follow_mode_now(),
                Err(e) => tracing::error!(error = %e, ?mode, "switching the filesystem's mode"),
            }
        }
        self.shared.set_serving(self.repl.takeover());
        if role == Role::Primary {
            if let Err(e) = TakeoverTable::remove(&self.cfg.data) {
                tracing::warn!(error = %format!("{e:#}"), "removing the takeover table");
            }
        }
    }

    /// The takeover part of `pairfs status`.
    pub(super) fn takeover_status(&self) -> Option<TakeoverStatus> {
        let t = self.repl.takeover()?;
        let p = self.host.vol(|v| v.takeover_progress());
        let mut s = TakeoverStatus::default();
        let merging = if self.merging { "merging" } else { "draining" };
        let (phase, freeze) = match t {
            Takeover::Source { freeze } => ("draining out".to_string(), freeze),
            Takeover::Taker { freeze } => (merging.to_string(), freeze),
            // Failback while the peer drains (§7.6).
            Takeover::Retaker { freeze, .. } => ("draining out, then draining in".into(), freeze),
            Takeover::FrozenTaker { freeze, .. } => (format!("frozen, {merging}"), freeze),
        };
        s.phase = phase;
        s.freeze_seq = freeze.0;
        if let Some(p) = p {
            s.backlog_entries = p.backlog.entries;
            s.backlog_blocks = p.backlog.blocks;
            s.backlog_bytes = p.backlog.bytes;
            s.lu_entries = p.lu_entries;
            s.lu_blocks = p.lu_blocks;
            (s.lu_used, s.lu_capacity) = p.lu_bytes;
            s.remote_reads = p.remote_reads;
            s.remote_read_blocks = p.remote_read_blocks;
            s.remote_read_mean_ms =
                (p.remote_reads > 0).then(|| p.remote_read_ns as f64 / p.remote_reads as f64 / 1e6);
            s.fetch_errors = p.fetch_errors;
        }
        s.writers_waiting = self.host.fs().map_or(0, |fs| fs.writers_waiting_for_room());
        Some(s)
    }
}

/// Starts (or, after a restart, resumes) the volume's takeover from `table` — from `index`
/// when the replicator hands one over (the headers of `table`, already indexed) — then
/// turns the filesystem writable and drops what the kernel cached.
pub(super) fn start_volume_takeover(
    data: &std::path::Path,
    host: &super::Host,
    fetch: std::sync::Arc<super::fetch::FetchClient>,
    table: TakeoverTable,
    index: Option<RemoteIndex>,
    ahead: Vec<(BlockNo, Seq, Vec<u8>)>,
    writable: bool,
) -> Result<()> {
    let (applied, blocks, bs, id) = host.vol(|v| {
        (
            v.journal().last_seq(),
            v.block_count(),
            v.block_size() as u32,
            v.id(),
        )
    });
    let t0 = Instant::now();
    let mut remote = match index {
        Some(index) => index,
        None => {
            let mut remote = RemoteIndex::new(table.applied_at_ready.min(applied));
            for h in table.entries {
                remote
                    .add(h, blocks)
                    .context("the takeover table does not chain")?;
            }
            remote
        }
    };
    // The journal may hold merged LU entries beyond the freeze point (restarted during the
    // merge): of the old primary's chain, it holds up to the freeze point at most.
    remote.applied(applied.min(table.freeze));
    let t_index = Instant::now();
    let expect = JournalExpect {
        block_size: bs,
        normal_blocks: blocks,
    };
    let lu = pairfs::datadir::open_lu(data, id, expect, Seq::NONE)
        .context("opening the local-unreflected area")?;
    let t1 = Instant::now();
    host.vol_mut(|v| {
        v.begin_takeover(table.freeze, lu, remote, fetch)?;
        v.keep_prefetched(ahead);
        Ok::<_, VolumeError>(())
    })
    .context("starting the takeover")?;
    let t2 = Instant::now();
    if let Some(fs) = host.fs().filter(|_| writable) {
        fs.set_mode(FsMode::Writable)
            .context("turning the filesystem writable")?;
        host.follow_mode_now();
        // Everything the kernel cached may be older than what the old primary holds.
        host.invalidate_all(fs);
    }
    let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
    tracing::debug!(
        index_ms = ms(t0, t_index),
        lu_ms = ms(t_index, t1),
        begin_ms = ms(t1, t2),
        fs_ms = ms(t2, Instant::now()),
        "takeover: the volume's part"
    );
    Ok(())
}

/// At startup: a node that was taking over resumes from its table (before anything is
/// served), or refuses to start without one.
pub(super) fn resume(
    data: &std::path::Path,
    host: &super::Host,
    fetch: std::sync::Arc<super::fetch::FetchClient>,
    writable: bool,
) -> Result<()> {
    let table = TakeoverTable::load(data)?.with_context(|| {
        format!(
            "{} says this node is taking over, but its takeover table ({}) is missing",
            data.join(crate::state::STATE_FILE).display(),
            crate::state::DLT_FILE
        )
    })?;
    tracing::info!(freeze = %table.freeze, "resuming the takeover");
    start_volume_takeover(data, host, fetch, table, None, Vec::new(), writable)
}

/// Whether a node in role change `t` has its volume taking over (a table and a
/// local-unreflected area).
pub(super) fn takes_over(t: &Takeover) -> bool {
    !matches!(t, Takeover::Source { .. })
}
