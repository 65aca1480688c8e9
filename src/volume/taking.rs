//! A volume that serves the filesystem before it holds the whole chain of seqs: a taker
//! while the old primary's backlog drains, and while its own writes are merged
//! (docs/PROTOCOL.md §7.1 and §7.5; JP 2003-402994 ¶0052–0068, ¶0088–0098).
//!
//! While taking over, the volume has three places a block's newest version can be, and
//! the data-location table ([`crate::takeover::locate`]) picks one per read:
//!
//! - the local-unreflected area ([`LuArea`]): every transaction committed now goes there,
//!   as an entry with the next seq after the freeze point, never into the journal or the
//!   normal area — those receive only the old primary's entries, in order, so that they
//!   stay exactly its prefix;
//! - the peer: blocks named by the headers of entries not applied yet are fetched from it
//!   ([`PeerFetch`]); a block stays there until the entry of its newest version is applied;
//! - the volume itself (journal images, cache, normal area), for every other block.
//!
//! Once the old primary's last entry is applied, [`Volume::merge_step`] applies the LU
//! entries oldest first as ordinary entries of the journal and releases them from the LU
//! once durable; when the LU is empty the volume leaves this mode under the same lock, so
//! the next transaction goes to the journal (the merge's cut-over ends while writes go on).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Relaxed, Release};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{Transaction, TxId, Volume};
use crate::device::BlockDevice;
use crate::error::{JournalError, VolumeError};
use crate::repl::{WireBlock, WireEntry};
use crate::takeover::{BacklogSummary, EntryHeader, Location, LuArea, RemoteIndex, locate};
use crate::types::{BlockNo, Seq, now_ns};

/// Reads blocks from the peer (the old primary) for a volume that is taking over.
pub trait PeerFetch: Send + Sync {
    /// Returns the peer's content of each `(block, seq)` (the version `seq` wrote: the
    /// peer is frozen), in order. Blocks the calling thread; fails after the node's fetch
    /// timeout with a reason for the log.
    fn fetch(&self, blocks: &[(BlockNo, Seq)]) -> Result<Vec<Vec<u8>>, String>;
}

/// Blocks one fetch asks for at most: what the read needs, then the following blocks that
/// are on the peer too (readahead: reading a file that is all on the peer costs one round
/// trip per 256 blocks, not per read request).
const FETCH_BLOCKS: usize = crate::takeover::MAX_FETCH_BLOCKS;
/// Blocks read ahead kept in memory, at most (64 MiB at 4 KiB).
const PREFETCHED_MAX: usize = 16_384;

/// Blocks fetched from the peer, for the reads that want them again (metadata is read
/// over and over) or next (read ahead). Each is used only while the block is still `Peer`
/// with the seq it was fetched for (docs/PROTOCOL.md §7.4); the oldest go first.
#[derive(Default)]
struct Prefetched {
    blocks: HashMap<BlockNo, (Seq, Arc<[u8]>)>,
    order: VecDeque<BlockNo>,
}

impl Prefetched {
    fn get(&self, b: BlockNo, seq: Seq) -> Option<Arc<[u8]>> {
        match self.blocks.get(&b) {
            Some((s, d)) if *s == seq => Some(d.clone()),
            _ => None,
        }
    }

    fn put(&mut self, b: BlockNo, seq: Seq, d: Arc<[u8]>) {
        if self.blocks.insert(b, (seq, d)).is_none() {
            self.order.push_back(b);
        }
        while self.order.len() > PREFETCHED_MAX {
            if let Some(old) = self.order.pop_front() {
                self.blocks.remove(&old);
            }
        }
    }
}

/// The takeover state of a volume.
pub(super) struct Taking {
    lu: LuArea,
    remote: RemoteIndex,
    peer: Arc<Peer>,
    /// The freeze point: the old primary's newest seq.
    freeze: Seq,
    /// The block after the last read: a read starting there is sequential, and only then
    /// are the following blocks on the peer read ahead (a random read waits for its own
    /// blocks only, not for a megabyte it will not use).
    sequential_at: AtomicU64,
    /// Transactions committed since the last LU entry (group commit, as the journal's
    /// open entry): appended as one entry at the next sync, seal or size limit.
    open: OpenLu,
}

/// The peer's side of a takeover, shared with the fetches that run without the volume's
/// lock ([`PeerRead`]).
struct Peer {
    fetch: Arc<dyn PeerFetch>,
    counters: TakeoverCounters,
    prefetched: Mutex<Prefetched>,
}

impl Peer {
    fn prefetched(&self) -> std::sync::MutexGuard<'_, Prefetched> {
        self.prefetched.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A read's fetch from the peer, planned under the volume's lock
/// ([`Volume::plan_peer_read`]) and run without it, so that a reader waiting for the
/// peer (up to the fetch timeout when it is gone) keeps no writer out. What it fetches
/// is kept as [`Volume::prefetch`]'s is: the read, run again under the lock, finds it
/// while each block is still `Peer` with that seq, and reads anything that moved.
pub struct PeerRead {
    peer: Arc<Peer>,
    asked: Vec<(BlockNo, Seq)>,
    bs: usize,
}

impl std::fmt::Debug for PeerRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerRead")
            .field("blocks", &self.asked.len())
            .finish()
    }
}

thread_local! {
    /// This thread's reads of `Peer` blocks are deferred ([`defer_fetches`]).
    static DEFERRING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this thread's fetches from the peer deferred: a read of the volume that
/// would wait for the peer fails instead with [`VolumeError::FetchDeferred`], which
/// carries the fetch ([`PeerRead`]) for the caller to run once it has released the lock
/// it holds (the filesystem's), before it runs `f` again — which then finds the blocks.
/// Nothing else changes: reads served locally, from the LU or from blocks fetched
/// before are served as always.
pub fn defer_fetches<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            DEFERRING.with(|d| d.set(self.0));
        }
    }
    let _restore = Restore(DEFERRING.with(|d| d.replace(true)));
    f()
}

impl PeerRead {
    /// Fetches the blocks, one request per [`crate::takeover::MAX_FETCH_BLOCKS`]; returns
    /// how many. Fails as a read from the peer fails (counted, logged).
    pub fn run(self) -> Result<usize, VolumeError> {
        for chunk in self.asked.chunks(FETCH_BLOCKS) {
            let data = fetch_from_peer(&self.peer, chunk, self.bs)?;
            let mut pre = self.peer.prefetched();
            for (&(b, seq), d) in chunk.iter().zip(data) {
                pre.put(b, seq, Arc::from(d));
            }
        }
        Ok(self.asked.len())
    }

    /// The blocks it fetches.
    pub fn blocks(&self) -> usize {
        self.asked.len()
    }
}

/// The LU's open entry.
#[derive(Default)]
struct OpenLu {
    blocks: BTreeMap<BlockNo, Arc<[u8]>>,
    n_tx: u32,
    frees: bool,
    last_ts: u64,
}

impl Taking {
    /// Where the newest version of `b` is, if not in the volume itself (the LU's open
    /// entry counts as the LU, with the seq it will have).
    fn where_is(&self, b: BlockNo) -> Option<Location> {
        if self.open.blocks.contains_key(&b) {
            return Some(Location::LocalUnreflected {
                seq: self.lu.last_seq().next(),
            });
        }
        locate(&self.remote, self.lu.newest(b), b)
    }

    /// Reads `b` from the LU (its open entry first) into `buf`; false if not there.
    fn read_lu(&self, b: BlockNo, buf: &mut [u8]) -> Result<bool, JournalError> {
        if let Some(d) = self.open.blocks.get(&b) {
            buf.copy_from_slice(d);
            return Ok(true);
        }
        Ok(self.lu.read(b, buf)?.is_some())
    }

    /// See [`LuArea::flush_ahead`].
    pub(super) fn lu_flush_ahead(&self) -> Option<crate::takeover::LuFlush> {
        self.lu.flush_ahead()
    }

    /// See [`LuArea::synced_ahead`].
    pub(super) fn lu_synced_ahead(&mut self, dev: &Arc<dyn BlockDevice>, mark: u64) {
        self.lu.synced_ahead(dev, mark);
    }

    /// See [`LuArea::take_writeback`].
    pub(super) fn lu_take_writeback(&mut self) -> Option<Arc<dyn BlockDevice>> {
        self.lu.take_writeback()
    }

    /// Appends the open entry to the LU, with the next seq, its bytes written behind the
    /// caller ([`LuArea::append_behind`]): what a writer whose transaction fills the open
    /// entry does, without waiting for megabytes to be written.
    fn seal_open_behind(&mut self) -> Result<(), JournalError> {
        if self.open.blocks.is_empty() {
            return Ok(());
        }
        let seq = self.lu.last_seq().next();
        let o = &self.open;
        // (Shared, not moved: if the append fails, the open entry still serves its reads.)
        let blocks: Vec<(BlockNo, Arc<[u8]>)> =
            o.blocks.iter().map(|(b, d)| (*b, d.clone())).collect();
        self.lu
            .append_behind(seq, o.last_ts, o.n_tx, o.frees, blocks)?;
        self.open = OpenLu::default();
        Ok(())
    }

    /// Appends the open entry to the LU, with the next seq.
    fn seal_open(&mut self) -> Result<(), JournalError> {
        if self.open.blocks.is_empty() {
            return Ok(());
        }
        let seq = self.lu.last_seq().next();
        let o = &self.open;
        let list: Vec<(BlockNo, &[u8])> = o.blocks.iter().map(|(b, d)| (*b, &d[..])).collect();
        self.lu.append(seq, o.last_ts, o.n_tx, o.frees, &list)?;
        self.open = OpenLu::default();
        Ok(())
    }

    /// Takes the open entry as the journal applies it, following `prev` (every block an
    /// image, none fresh), or `None` if it is empty.
    fn take_open(&mut self, prev: Seq) -> Option<WireEntry> {
        if self.open.blocks.is_empty() {
            return None;
        }
        let o = std::mem::take(&mut self.open);
        Some(WireEntry {
            seq: prev.next(),
            prev_seq: prev,
            timestamp_ns: o.last_ts,
            blocks: o
                .blocks
                .into_iter()
                .map(|(block, d)| WireBlock {
                    block,
                    data: d.to_vec(),
                    fresh: false,
                })
                .collect(),
            frees: o.frees,
        })
    }
}

/// Where a takeover stands, for status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TakeoverProgress {
    /// The old primary's newest seq.
    pub freeze: Seq,
    /// The old primary's entries not applied yet (empty once the drain is complete).
    pub backlog: BacklogSummary,
    /// The headers did not name every block (the backlog was too large for them).
    pub partial: bool,
    /// Entries in the local-unreflected area (merged ones until they are durable).
    pub lu_entries: u64,
    /// Distinct blocks whose newest version is there.
    pub lu_blocks: u64,
    /// Bytes of the LU area in use, and its capacity.
    pub lu_bytes: (u64, u64),
    /// Fetches from the peer that succeeded.
    pub remote_reads: u64,
    /// Blocks fetched.
    pub remote_read_blocks: u64,
    /// Total time of the fetches, in ns.
    pub remote_read_ns: u64,
    /// Fetches that failed.
    pub fetch_errors: u64,
}

/// What one [`Volume::merge_step`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeStep {
    /// The old primary's entries are still arriving: nothing to merge yet.
    Draining,
    /// This LU entry was applied to the journal.
    Merged(Seq),
    /// The LU is empty: the volume left the takeover mode.
    Done,
    /// The journal has no room for the next LU entry, even after a checkpoint: the
    /// merged entries it retains (this node's own, kept for the stream back to the old
    /// primary) fill it. They must leave it — their blocks into the difference bitmap,
    /// `Replicator::handle_merge_progress` — before the merge goes on.
    NoRoom,
}

impl Volume {
    /// Starts serving as a taker: `remote` holds the headers of the old primary's entries
    /// after this volume's newest seq, up to the freeze point; `lu` is empty (a new
    /// takeover: it is restarted after the freeze point) or holds this node's entries of a
    /// takeover interrupted by a crash. From now on reads follow the data-location table
    /// and commits go to `lu`.
    pub fn begin_takeover(
        &mut self,
        freeze: Seq,
        mut lu: LuArea,
        remote: RemoteIndex,
        fetch: Arc<dyn PeerFetch>,
    ) -> Result<(), VolumeError> {
        self.check_writable()?;
        self.seal()?;
        let last = self.journal.last_seq();
        if remote.applied_seq() > last || remote.last() > freeze || last > freeze.max(lu.last_seq())
        {
            return Err(VolumeError::InvalidParams(format!(
                "takeover at freeze point {freeze}: headers from {} to {}, but this volume \
                 holds up to {last} and its LU up to {}",
                remote.applied_seq(),
                remote.last(),
                lu.last_seq()
            )));
        }
        match lu.base() {
            // A new takeover: the LU's chain starts after the freeze point.
            None => lu.begin(freeze)?,
            // Resumed after a crash: nothing merged yet, or merged up to the journal.
            Some(base) if base == freeze || (freeze <= base && base <= last) => {}
            Some(base) => {
                return Err(VolumeError::InvalidParams(format!(
                    "the local-unreflected area continues from seq {base}, neither the freeze \
                     point {freeze} nor merged (the journal holds up to {last})"
                )));
            }
        }
        let mut remote = remote;
        remote.applied(last);
        lu.write_behind_by_thread(self.opts.lu_writer_thread);
        self.fetching.store(true, Release);
        self.taking = Some(Box::new(Taking {
            lu,
            remote,
            peer: Arc::new(Peer {
                fetch,
                counters: TakeoverCounters::default(),
                prefetched: Mutex::default(),
            }),
            freeze,
            sequential_at: AtomicU64::new(u64::MAX),
            open: OpenLu::default(),
        }));
        Ok(())
    }

    /// The volume is taking over (reads follow the data-location table, commits go to the
    /// local-unreflected area).
    pub fn is_taking_over(&self) -> bool {
        self.taking.is_some()
    }

    /// A frozen old primary's catch-up entry (docs/PROTOCOL.md §7.3, `Action::SendCatchUp`):
    /// seq `upto` following `after`, with every block the retained entries after `after`
    /// write and every block of `extra` (the difference bitmap's), each as this volume holds
    /// it now — its journal and normal area only (`read_applied`: a node taking over again
    /// never hands out its local-unreflected area). Fails when the blocks exceed
    /// `max_bytes`.
    pub fn catch_up_entry(
        &self,
        after: Seq,
        upto: Seq,
        extra: &[BlockNo],
        max_bytes: u64,
    ) -> Result<WireEntry, VolumeError> {
        let mut blocks: std::collections::BTreeSet<BlockNo> = self
            .retained_blocks_after(after, upto)?
            .into_iter()
            .collect();
        blocks.extend(extra.iter().copied());
        let bytes = blocks.len() as u64 * self.bs as u64;
        if bytes > max_bytes {
            return Err(VolumeError::InvalidParams(format!(
                "the {} blocks changed after seq {after} ({bytes} bytes) exceed the {max_bytes} \
                 bytes of one entry of the peer's",
                blocks.len()
            )));
        }
        let mut out = Vec::with_capacity(blocks.len());
        for block in blocks {
            let mut data = vec![0u8; self.bs];
            self.read_applied(block, &mut data)?;
            out.push(WireBlock {
                block,
                data,
                fresh: false,
            });
        }
        Ok(WireEntry {
            seq: upto,
            prev_seq: after,
            timestamp_ns: now_ns(),
            blocks: out,
            // Conservative: the blocks may include frees' bitmaps.
            frees: true,
        })
    }

    /// Taking over: the LU entries sealed whose bytes are not known written yet
    /// ([`LuArea::unwritten`]).
    pub fn local_unreflected_unwritten(&self) -> Vec<Seq> {
        self.taking
            .as_ref()
            .map_or_else(Vec::new, |t| t.lu.unwritten())
    }

    /// The newest seq sealed here: while taking over, the local-unreflected area's (its
    /// entries follow the freeze point; merged ones are in the journal with the same seqs),
    /// else the journal's.
    pub fn newest_seq(&self) -> Seq {
        let journal = self.journal.last_seq();
        self.taking
            .as_ref()
            .map_or(journal, |t| t.lu.last_seq().max(journal))
    }

    /// The headers of the entries still on the peer (for persisting the table).
    pub fn takeover_remote(&self) -> Option<&RemoteIndex> {
        self.taking.as_ref().map(|t| &t.remote)
    }

    /// Where the takeover stands.
    pub fn takeover_progress(&self) -> Option<TakeoverProgress> {
        let t = self.taking.as_ref()?;
        Some(TakeoverProgress {
            freeze: t.freeze,
            backlog: t.remote.summary(),
            partial: t.remote.overflowed(),
            lu_entries: t.lu.len() as u64,
            lu_blocks: t.lu.blocks() as u64,
            lu_bytes: t.lu.usage(),
            remote_reads: t.peer.counters.reads.load(Relaxed),
            remote_read_blocks: t.peer.counters.blocks.load(Relaxed),
            remote_read_ns: t.peer.counters.ns.load(Relaxed),
            fetch_errors: t.peer.counters.errors.load(Relaxed),
        })
    }

    /// Where the newest version of `b` is, if not in the volume itself.
    pub fn locate(&self, b: BlockNo) -> Option<Location> {
        self.taking.as_ref()?.where_is(b)
    }

    /// Reads blocks `start..start + n` into `buf` from the LU area and the peer where the
    /// table says so; returns the blocks it did not fill (to be read from the volume).
    pub(super) fn read_located(
        &self,
        start: BlockNo,
        buf: &mut [u8],
    ) -> Result<Vec<bool>, VolumeError> {
        let bs = self.bs;
        let n = buf.len() / bs;
        let mut filled = vec![false; n];
        let Some(t) = self.taking.as_ref() else {
            return Ok(filled);
        };
        let end = start + n as u64;
        let sequential = t.sequential_at.swap(end, Relaxed) == start;
        let mut from_peer: Vec<(usize, BlockNo, Seq)> = Vec::new();
        for (i, chunk) in buf.chunks_exact_mut(bs).enumerate() {
            let b = start + i as u64;
            match t.where_is(b) {
                None => {}
                Some(Location::LocalUnreflected { .. }) => {
                    filled[i] = t.read_lu(b, chunk)?;
                }
                Some(Location::Peer { seq }) => from_peer.push((i, b, seq)),
            }
        }
        if from_peer.is_empty() {
            return Ok(filled);
        }
        let pre = t.peer.prefetched();
        from_peer.retain(|&(i, b, seq)| match pre.get(b, seq) {
            Some(d) => {
                buf[i * bs..(i + 1) * bs].copy_from_slice(&d);
                filled[i] = true;
                false
            }
            None => true,
        });
        if from_peer.is_empty() {
            return Ok(filled);
        }
        let mut asked: Vec<(BlockNo, Seq)> = from_peer.iter().map(|&(_, b, s)| (b, s)).collect();
        if sequential {
            self.read_ahead(t, &pre, end, &mut asked);
        }
        drop(pre);
        if DEFERRING.with(std::cell::Cell::get) {
            return Err(VolumeError::FetchDeferred(Box::new(PeerRead {
                peer: t.peer.clone(),
                asked,
                bs,
            })));
        }
        let data = fetch_from_peer(&t.peer, &asked, bs)?;
        for ((i, _, _), d) in from_peer.iter().zip(&data) {
            buf[i * bs..(i + 1) * bs].copy_from_slice(d);
            filled[*i] = true;
        }
        let mut pre = t.peer.prefetched();
        for (&(b, seq), d) in asked.iter().zip(data) {
            pre.put(b, seq, Arc::from(d));
        }
        Ok(filled)
    }

    /// Read ahead, for a sequential read that ends at `end` and fetches `asked`: the blocks
    /// after it that are on the peer too (and not fetched), up to one request's worth.
    fn read_ahead(
        &self,
        t: &Taking,
        pre: &Prefetched,
        end: BlockNo,
        asked: &mut Vec<(BlockNo, Seq)>,
    ) {
        let mut b = end;
        while asked.len() < FETCH_BLOCKS && b < self.blocks && b < end + FETCH_BLOCKS as u64 {
            if let Some(Location::Peer { seq }) = t.where_is(b) {
                if !pre.blocks.contains_key(&b) {
                    asked.push((b, seq));
                }
            }
            b += 1;
        }
    }

    /// Taking over: the fetch a read of the block ranges `ranges` (`(start, n)`, in the
    /// read's order) would make — its blocks whose newest version is on the peer and not
    /// fetched yet, and the read-ahead of a sequential one — to run without the lock
    /// ([`PeerRead`]). `None` when the read needs nothing from the peer.
    pub fn plan_peer_read(&self, ranges: &[(BlockNo, u64)]) -> Option<PeerRead> {
        let t = self.taking.as_ref()?;
        let pre = t.peer.prefetched();
        let mut asked: Vec<(BlockNo, Seq)> = Vec::new();
        for &(start, n) in ranges {
            let end = start.saturating_add(n).min(self.blocks);
            let sequential = t.sequential_at.swap(end, Relaxed) == start;
            let before = asked.len();
            for b in start..end {
                if let Some(Location::Peer { seq }) = t.where_is(b) {
                    if pre.get(b, seq).is_none() {
                        asked.push((b, seq));
                    }
                }
            }
            if sequential && asked.len() > before {
                self.read_ahead(t, &pre, end, &mut asked);
            }
        }
        drop(pre);
        asked.sort_unstable();
        asked.dedup_by_key(|&mut (b, _)| b);
        (!asked.is_empty()).then(|| PeerRead {
            peer: t.peer.clone(),
            asked,
            bs: self.bs,
        })
    }

    /// Taking over: fetches, in as few requests as it can (one per
    /// `MAX_FETCH_BLOCKS`), those of `blocks` whose newest version is on the peer and not
    /// already fetched, and keeps them for the reads that follow (a read finds them while
    /// the block is still `Peer` with that seq). Returns how many it fetched; none when not
    /// taking over. The filesystem asks for its allocation bitmaps this way before it turns
    /// writable: one round trip instead of one per bitmap block.
    pub fn prefetch(
        &self,
        blocks: impl IntoIterator<Item = BlockNo>,
    ) -> Result<usize, VolumeError> {
        let Some(t) = self.taking.as_ref() else {
            return Ok(0);
        };
        let asked: Vec<(BlockNo, Seq)> = {
            let pre = t.peer.prefetched();
            blocks
                .into_iter()
                .filter(|&b| b < self.blocks)
                .filter_map(|b| match t.where_is(b) {
                    Some(Location::Peer { seq }) if pre.get(b, seq).is_none() => Some((b, seq)),
                    _ => None,
                })
                .collect()
        };
        for chunk in asked.chunks(FETCH_BLOCKS) {
            let data = fetch_from_peer(&t.peer, chunk, self.bs)?;
            self.keep_prefetched(chunk.iter().zip(data).map(|(&(b, s), d)| (b, s, d)));
        }
        Ok(asked.len())
    }

    /// Keeps blocks fetched from the peer outside the volume (before the takeover began),
    /// those of the right size whose newest version is still on the peer with that seq:
    /// the reads that follow find them as they find [`Volume::prefetch`]'s.
    pub fn keep_prefetched(&self, blocks: impl IntoIterator<Item = (BlockNo, Seq, Vec<u8>)>) {
        let Some(t) = self.taking.as_ref() else {
            return;
        };
        let mut pre = t.peer.prefetched();
        for (b, seq, d) in blocks {
            if d.len() == self.bs && t.where_is(b) == Some(Location::Peer { seq }) {
                pre.put(b, seq, Arc::from(d));
            }
        }
    }

    /// A transaction while taking over: into the LU's open entry (group commit: one LU
    /// entry, with the next seq, per sync or commit interval, or when the entry reaches
    /// the size of one journal entry and one message of the stream back).
    pub(super) fn commit_taking(&mut self, tx: Transaction<'_>) -> Result<TxId, VolumeError> {
        let bs = self.bs;
        let mut blocks: BTreeMap<BlockNo, &[u8]> = BTreeMap::new();
        for (b, d) in &tx.meta {
            blocks.insert(*b, d);
        }
        for (start, d, _) in &tx.data {
            for (k, blk) in d.chunks_exact(bs).enumerate() {
                blocks.insert(start + k as u64, blk);
            }
        }
        let list: Vec<(BlockNo, &[u8])> = blocks.into_iter().collect();
        let limit = self
            .opts
            .max_entry_bytes
            .min(self.opts.max_entry_wire_bytes);
        let Some(t) = self.taking.as_mut() else {
            return Err(VolumeError::InvalidParams("not taking over".into()));
        };
        if let Err(e) = t.lu.reap() {
            return self.poison(e.into());
        }
        let grown = |t: &Taking| {
            t.open.blocks.len()
                + list
                    .iter()
                    .filter(|(b, _)| !t.open.blocks.contains_key(b))
                    .count()
        };
        // The open entry always fits the area (checked at every transaction), so sealing it
        // never runs out of room.
        let n = grown(t);
        if !t.open.blocks.is_empty() && (!t.lu.fits(n) || (n * bs) as u64 > limit) {
            if let Err(e) = t.seal_open_behind() {
                return self.poison(e.into());
            }
        }
        let Some(t) = self.taking.as_mut() else {
            return Err(VolumeError::InvalidParams("not taking over".into()));
        };
        if !t.lu.fits(grown(t)) {
            let (used, capacity) = t.lu.usage();
            return Err(VolumeError::LocalUnreflectedFull { used, capacity });
        }
        for (b, d) in &list {
            t.open.blocks.insert(*b, Arc::from(*d));
        }
        t.open.n_tx += 1;
        t.open.frees |= tx.frees;
        t.open.last_ts = now_ns();
        for (b, _) in &list {
            self.cache.remove(*b);
        }
        let id = self.next_tx;
        self.next_tx = TxId(id.0 + 1);
        self.sealed_tx = id;
        self.unsynced_since.get_or_insert_with(Instant::now);
        self.stats.transactions += 1;
        Ok(id)
    }

    /// Seals the LU's open entry and makes the LU durable (part of [`Volume::sync`] while
    /// taking over).
    pub(super) fn sync_taking(&mut self) -> Result<(), VolumeError> {
        if let Some(t) = self.taking.as_mut() {
            if let Err(e) = t.seal_open().and_then(|()| t.lu.sync()) {
                return self.poison(e.into());
            }
        }
        Ok(())
    }

    /// Taking over: the headers of this node's own entries after `after`, oldest first —
    /// those already merged into the journal, then those still in the LU. What a taker
    /// frozen by a failback hands the peer (docs/PROTOCOL.md §7.6).
    pub fn headers_after(&self, after: Seq) -> Result<Vec<EntryHeader>, VolumeError> {
        let mut out = Vec::new();
        for e in self.journal.retained() {
            if e.seq > after {
                out.push(self.entry_header(e.seq)?);
            }
        }
        if let Some(t) = &self.taking {
            let last = out.last().map_or(after, |h| h.seq);
            out.extend(t.lu.headers().into_iter().filter(|h| h.seq > last));
        }
        Ok(out)
    }

    /// Taking over: appends the LU's open entry, its bytes written behind the caller (not
    /// durable), so that a sync writes and flushes it without the lock
    /// ([`Volume::flush_ahead`]). Nothing otherwise.
    pub fn seal_local_unreflected(&mut self) -> Result<(), VolumeError> {
        if let Some(t) = self.taking.as_mut() {
            if let Err(e) = t.seal_open_behind() {
                return self.poison(e.into());
            }
        }
        Ok(())
    }

    /// Seals the LU's open entry and makes the LU durable — only the LU: what a taker frozen
    /// by a failback needs before its peer serves what it wrote (the drain's entries in the
    /// journal and normal area are the peer's own, which it holds; docs/PROTOCOL.md §7.6).
    pub fn sync_local_unreflected(&mut self) -> Result<(), VolumeError> {
        self.sync_taking()
    }

    /// A forced takeover cut the drain short (docs/PROTOCOL.md §7.7): makes the LU's
    /// entries durable and leaves the takeover mode, returning the area for the caller to
    /// export and then empty ([`LuArea::discard`]). The volume is then what its journal and
    /// normal area hold — the old primary's state after the newest seq applied here, a
    /// consistent filesystem — and the next transaction goes to the journal.
    pub fn abandon_takeover(&mut self) -> Result<LuArea, VolumeError> {
        self.sync_taking()?;
        let t = self
            .taking
            .take()
            .ok_or_else(|| VolumeError::InvalidParams("not taking over".into()))?;
        self.fetching.store(false, Release);
        tracing::warn!(
            seq = %self.journal.last_seq(),
            lu_entries = t.lu.len(),
            "takeover abandoned: the volume is the old primary's state after this seq"
        );
        Ok(t.lu)
    }

    /// An entry of the old primary was applied: blocks whose newest version it wrote are
    /// local now.
    pub(super) fn applied_taking(&mut self, seq: Seq) {
        if let Some(t) = self.taking.as_mut() {
            t.remote.applied(seq);
        }
    }

    /// One step of the merge: once the old primary's last entry is applied, applies the
    /// oldest LU entry not yet in the journal as an entry of its own seq; releases from the
    /// LU what the journal holds durably; leaves the takeover mode when the LU is empty.
    pub fn merge_step(&mut self) -> Result<MergeStep, VolumeError> {
        let last = self.journal.last_seq();
        let Some(t) = self.taking.as_ref() else {
            return Ok(MergeStep::Done);
        };
        if t.remote.last() > last {
            return Ok(MergeStep::Draining);
        }
        let next =
            t.lu.oldest_after(last)
                .map(|e| (e.seq, e.prev_seq, e.descriptors.len()));
        if let Some((seq, prev, n_blocks)) = next {
            if prev != last {
                return Err(VolumeError::InvalidParams(format!(
                    "LU entry {seq} follows {prev}, but the journal's newest seq is {last}"
                )));
            }
            // (Room first: a merge waiting for it reads nothing meanwhile.)
            if !self.journal_room_for(n_blocks)? {
                return Ok(MergeStep::NoRoom);
            }
            let w = self
                .taking
                .as_ref()
                .map(|t| t.lu.wire_entry(seq))
                .transpose()?
                .ok_or_else(|| VolumeError::InvalidParams("not taking over".into()))?;
            self.apply_replicated(&w)?;
            self.release_merged()?;
            return Ok(MergeStep::Merged(seq));
        }
        // Everything sealed is in the journal. The open entry goes there too, under this
        // lock (no writer in between): then everything is made durable, released, and the
        // volume cuts over — so the merge ends while writes go on.
        let open = self.taking.as_ref().map_or(0, |t| t.open.blocks.len());
        if open > 0 && !self.journal_room_for(open)? {
            return Ok(MergeStep::NoRoom);
        }
        if let Some(w) = self.taking.as_mut().and_then(|t| t.take_open(last)) {
            self.apply_replicated(&w)?;
        }
        self.sync()?;
        self.release_merged()?;
        if self.taking.as_ref().is_some_and(|t| t.lu.is_empty()) {
            self.taking = None;
            self.fetching.store(false, Release);
            tracing::info!(seq = %last, "takeover: merge complete; writes go to the journal");
            return Ok(MergeStep::Done);
        }
        Ok(MergeStep::Merged(last))
    }

    /// Whether the journal takes an entry of `n` images now, after a checkpoint if need be
    /// (the merge's entries are all images).
    fn journal_room_for(&mut self, n: usize) -> Result<bool, VolumeError> {
        let len = self.journal.entry_len(n, n);
        if self.journal.fits(len) {
            return Ok(true);
        }
        self.checkpoint_sealed()?;
        Ok(self.journal.fits(len))
    }

    /// Releases LU entries the journal holds durably.
    fn release_merged(&mut self) -> Result<(), VolumeError> {
        let durable = self.journal.durable_seq();
        if let Some(t) = self.taking.as_mut() {
            if t.lu.oldest().is_some_and(|e| e.seq <= durable) {
                if let Err(e) = t.lu.release_through(durable) {
                    return self.poison(e.into());
                }
            }
        }
        Ok(())
    }
}

fn fetch_from_peer(
    t: &Peer,
    asked: &[(BlockNo, Seq)],
    bs: usize,
) -> Result<Vec<Vec<u8>>, VolumeError> {
    let started = Instant::now();
    let (first, seq) = asked[0];
    let fail = |reason: String| {
        t.counters.errors.fetch_add(1, Relaxed);
        tracing::warn!(block = first, %seq, blocks = asked.len(), %reason, "takeover: a read from the peer failed");
        VolumeError::PeerFetch {
            block: first,
            seq,
            reason,
        }
    };
    let data = t.fetch.fetch(asked).map_err(fail)?;
    if data.len() != asked.len() || data.iter().any(|d| d.len() != bs) {
        return Err(fail(format!(
            "the peer answered {} blocks for {} asked, or blocks of the wrong size",
            data.len(),
            asked.len()
        )));
    }
    t.counters.reads.fetch_add(1, Relaxed);
    t.counters.blocks.fetch_add(asked.len() as u64, Relaxed);
    t.counters
        .ns
        .fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
    Ok(data)
}

/// Counters of reads served by the peer (updated from `&self` reads).
#[derive(Debug, Default)]
struct TakeoverCounters {
    reads: AtomicU64,
    blocks: AtomicU64,
    ns: AtomicU64,
    errors: AtomicU64,
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::crash::CrashDevice;
    use crate::device::MemDevice;
    use crate::journal::JournalExpect;
    use crate::takeover::EntryHeader;
    use crate::types::VolumeId;
    use crate::volume::VolumeOptions;

    const BS: usize = 4096;
    const BLOCKS: u64 = 64;

    struct Devs {
        normal: Arc<CrashDevice>,
        journal: Arc<CrashDevice>,
    }

    fn devs() -> Devs {
        let normal = Arc::new(CrashDevice::new(BLOCKS * BS as u64));
        let journal = Arc::new(CrashDevice::new(128 * BS as u64));
        Volume::create(&*normal, &*journal, VolumeId([1; 16]), BS as u32).unwrap();
        Devs { normal, journal }
    }

    /// The devices as a power loss leaves them: only what was durable.
    fn power_lost(d: &Devs) -> Devs {
        let image =
            |c: &CrashDevice| Arc::new(CrashDevice::from_bytes(c.crash_point().durable_image()));
        Devs {
            normal: image(&d.normal),
            journal: image(&d.journal),
        }
    }

    fn open(d: &Devs) -> Volume {
        let opts = VolumeOptions {
            retain: true,
            ..VolumeOptions::default()
        };
        Volume::open(
            Box::new(d.normal.clone()),
            Box::new(d.journal.clone()),
            opts,
        )
        .unwrap()
    }

    fn lu(blocks: u64) -> LuArea {
        let dev = MemDevice::new(blocks * BS as u64);
        LuArea::format(&dev, VolumeId([1; 16]), BS as u32, BLOCKS).unwrap();
        lu_on(Box::new(dev))
    }

    /// The area on a formatted device.
    fn lu_on(dev: Box<dyn BlockDevice>) -> LuArea {
        let expect = JournalExpect {
            block_size: BS as u32,
            normal_blocks: BLOCKS,
        };
        LuArea::open(dev, expect, Seq::NONE).unwrap()
    }

    fn blk(v: u8) -> Arc<[u8]> {
        Arc::from(vec![v; BS])
    }

    /// One entry writing `blocks` with `v` (metadata-style images).
    fn write(v: &mut Volume, blocks: &[u64], fill: u8) {
        commit_images(v, blocks, fill);
        v.sync().unwrap();
    }

    /// One transaction writing `blocks` with `fill`, committed only.
    fn commit_images(v: &mut Volume, blocks: &[u64], fill: u8) {
        let mut tx = Transaction::new();
        for &b in blocks {
            tx.write_meta(b, blk(fill));
        }
        v.commit(tx).unwrap();
    }

    fn header(v: &Volume, seq: u64) -> EntryHeader {
        let e = v.read_wire_entry(Seq(seq)).unwrap();
        EntryHeader {
            seq: e.seq,
            prev_seq: e.prev_seq,
            timestamp_ns: e.timestamp_ns,
            bytes: e.data_bytes(),
            blocks: e.blocks.iter().map(|b| b.block).collect(),
        }
    }

    /// The old primary, frozen, answering fetches (and counting them).
    struct Frozen {
        vol: Mutex<Volume>,
        fetched: AtomicUsize,
        calls: AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
    }

    impl PeerFetch for Frozen {
        fn fetch(&self, blocks: &[(BlockNo, Seq)]) -> Result<Vec<Vec<u8>>, String> {
            if self.fail.load(Relaxed) {
                return Err("the peer is unreachable".into());
            }
            self.fetched.fetch_add(blocks.len(), Relaxed);
            self.calls.fetch_add(1, Relaxed);
            let v = self.vol.lock().unwrap();
            Ok(blocks
                .iter()
                .map(|&(b, _)| v.read_block(b).unwrap().to_vec())
                .collect())
        }
    }

    /// A primary with entries 1..=5, a secondary that applied 1..=2, and the secondary
    /// taking over at freeze point 5 with the headers of 3..=5.
    fn pair_taking_over(lu_blocks: u64) -> (Arc<Frozen>, Devs, Volume) {
        pair_taking_over_with(lu(lu_blocks))
    }

    fn pair_taking_over_with(area: LuArea) -> (Arc<Frozen>, Devs, Volume) {
        let da = devs();
        let mut a = open(&da);
        write(&mut a, &[1, 2, 3], 1);
        write(&mut a, &[3, 4], 2);
        write(&mut a, &[4, 5, 6], 3);
        write(&mut a, &[1, 6], 4);
        write(&mut a, &[7], 5);
        assert_eq!(a.journal().last_seq(), Seq(5));
        let db = devs();
        let mut b = open(&db);
        for s in 1..=2 {
            b.apply_replicated(&a.read_wire_entry(Seq(s)).unwrap())
                .unwrap();
        }
        b.sync().unwrap();
        let mut remote = RemoteIndex::new(Seq(2));
        for s in 3..=5 {
            remote.add(header(&a, s), BLOCKS).unwrap();
        }
        let frozen = Arc::new(Frozen {
            vol: Mutex::new(a),
            fetched: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
            fail: Default::default(),
        });
        b.begin_takeover(Seq(5), area, remote, frozen.clone())
            .unwrap();
        (frozen, db, b)
    }

    fn drain(frozen: &Frozen, b: &mut Volume, upto: u64) {
        let a = frozen.vol.lock().unwrap();
        for s in b.journal().last_seq().0 + 1..=upto {
            b.apply_replicated(&a.read_wire_entry(Seq(s)).unwrap())
                .unwrap();
        }
    }

    /// The first byte of every block, read as metadata and as file data (both must agree).
    fn content(v: &Volume) -> Vec<u8> {
        let meta: Vec<u8> = (0..BLOCKS).map(|b| v.read_block(b).unwrap()[0]).collect();
        let mut buf = vec![0u8; BLOCKS as usize * BS];
        v.read_data(0, &mut buf).unwrap();
        let data: Vec<u8> = buf.chunks_exact(BS).map(|c| c[0]).collect();
        assert_eq!(meta, data, "read_block and read_data disagree");
        meta
    }

    #[test]
    fn an_abandoned_takeover_leaves_the_old_primarys_prefix_and_hands_back_the_lu_entries() {
        let (frozen, db, mut b) = pair_taking_over(64);
        drain(&frozen, &mut b, 3);
        write(&mut b, &[4, 2], 9);
        write(&mut b, &[8], 10);
        // The old primary is gone from here on: state 3 is what this node holds.
        frozen.fail.store(true, Relaxed);
        let mut lu = b.abandon_takeover().unwrap();
        assert!(!b.is_taking_over());
        let prefix = {
            let d = devs();
            let mut p = open(&d);
            let a = frozen.vol.lock().unwrap();
            for s in 1..=3 {
                p.apply_replicated(&a.read_wire_entry(Seq(s)).unwrap())
                    .unwrap();
            }
            content(&p)
        };
        assert_eq!(content(&b), prefix, "the old primary's state after seq 3");
        let h = lu.headers();
        let got: Vec<(Seq, Seq, Vec<u64>)> = h
            .iter()
            .map(|h| (h.seq, h.prev_seq, h.blocks.clone()))
            .collect();
        assert_eq!(
            got,
            vec![(Seq(6), Seq(5), vec![2, 4]), (Seq(7), Seq(6), vec![8])],
            "the LU entries, to export"
        );
        assert_eq!(h[0].bytes, 2 * BS as u64);
        lu.discard().unwrap();
        assert!(lu.is_empty());
        // Writes go to the journal again, after seq 3.
        write(&mut b, &[10], 12);
        assert_eq!(b.journal().last_seq(), Seq(4));
        assert_eq!(b.read_block(10).unwrap()[0], 12);
        drop(b);
        // After a crash the volume recovers to that state too.
        let crashed = power_lost(&db);
        let b = open(&crashed);
        let mut want = prefix.clone();
        want[10] = 12;
        assert_eq!(content(&b), want);
    }

    #[test]
    fn a_taker_serves_the_old_primarys_newest_state_at_once_then_drains_merges_and_cuts_over() {
        let (frozen, db, mut b) = pair_taking_over(64);
        let old = content(&frozen.vol.lock().unwrap());
        assert_eq!(content(&b), old, "every block as the old primary holds it");
        assert!(
            frozen.fetched.load(Relaxed) > 0,
            "the missing blocks came from the peer"
        );
        assert_eq!(b.locate(7), Some(Location::Peer { seq: Seq(5) }));
        assert_eq!(b.locate(2), None, "applied before the takeover");
        // Writes go to the LU area, on top of blocks still on the peer too.
        write(&mut b, &[4, 2], 9);
        assert_eq!(
            b.locate(4),
            Some(Location::LocalUnreflected { seq: Seq(6) })
        );
        let mut want = old.clone();
        want[4] = 9;
        want[2] = 9;
        assert_eq!(content(&b), want);
        assert_eq!(b.merge_step().unwrap(), MergeStep::Draining);
        // The drain: entry 3 holds an older version of block 4 than entry 4's; neither
        // overwrites the LU's.
        drain(&frozen, &mut b, 3);
        assert_eq!(
            b.locate(3),
            None,
            "block 3's newest version (seq 3) applied"
        );
        assert_eq!(b.locate(6), Some(Location::Peer { seq: Seq(4) }));
        assert_eq!(content(&b), want);
        drain(&frozen, &mut b, 5);
        let p = b.takeover_progress().unwrap();
        assert_eq!((p.backlog.entries, p.lu_entries), (0, 1));
        write(&mut b, &[8], 10);
        want[8] = 10;
        let fetched = frozen.fetched.load(Relaxed);
        assert_eq!(content(&b), want);
        assert_eq!(
            frozen.fetched.load(Relaxed),
            fetched,
            "nothing left on the peer"
        );
        // The merge: LU entries 6 and 7 become entries of the journal with their seqs.
        assert_eq!(b.merge_step().unwrap(), MergeStep::Merged(Seq(6)));
        assert_eq!(b.merge_step().unwrap(), MergeStep::Merged(Seq(7)));
        assert_eq!(content(&b), want);
        assert_eq!(b.merge_step().unwrap(), MergeStep::Done);
        assert!(!b.is_taking_over());
        write(&mut b, &[9], 11);
        want[9] = 11;
        assert_eq!(
            b.journal().last_seq(),
            Seq(8),
            "after the merge, writes go to the journal"
        );
        assert_eq!(content(&b), want);
        // The journal holds the old primary's entries and the merged ones, in one chain:
        // what the second process streams back.
        assert_eq!(b.read_wire_entry(Seq(6)).unwrap().prev_seq, Seq(5));
        b.close().unwrap();
        drop(b);
        assert_eq!(
            content(&open(&db)),
            want,
            "reopened without any takeover state"
        );
    }

    #[test]
    fn a_drain_entry_written_in_place_without_the_lock_is_fetched_until_applied() {
        let (frozen, db, mut b) = pair_taking_over(64);
        drain(&frozen, &mut b, 5);
        // The old primary goes on: entry 6 writes blocks 20..28 that were free (file data,
        // in place) and 3 as an image; b learns its header, then takes it.
        let e6 = {
            let mut a = frozen.vol.lock().unwrap();
            let mut tx = Transaction::new();
            tx.write_data(20, vec![6; 8 * BS], true);
            tx.write_meta(3, blk(6));
            a.commit(tx).unwrap();
            a.sync().unwrap();
            a.read_wire_entry(Seq(6)).unwrap()
        };
        b.abandon_takeover().unwrap().discard().unwrap();
        let prefix = content(&b);
        let mut remote = RemoteIndex::new(Seq(5));
        remote
            .add(header(&frozen.vol.lock().unwrap(), 6), BLOCKS)
            .unwrap();
        b.begin_takeover(Seq(6), lu(64), remote, frozen.clone())
            .unwrap();
        let plan = b.plan_apply(&e6).unwrap();
        assert_eq!(plan.inplace_bytes(), 8 * BS as u64);
        let written = plan.write(&e6);
        // Between the write and the finish (the lock free): the blocks are still the
        // peer's, reads fetch them, and writes go on into the LU.
        assert_eq!(b.locate(20), Some(Location::Peer { seq: Seq(6) }));
        let fetched = frozen.fetched.load(Relaxed);
        assert_eq!(b.read_block(21).unwrap()[0], 6);
        assert!(frozen.fetched.load(Relaxed) > fetched, "fetched");
        write(&mut b, &[40], 9);
        // A crash here: the state recovered is still the old primary's after seq 5.
        let crashed = power_lost(&db);
        let r = open(&crashed);
        assert_eq!(r.journal().last_seq(), Seq(5));
        let mut lost = content(&r);
        lost[20..28].copy_from_slice(&prefix[20..28]);
        assert_eq!(lost, prefix, "every block but the free ones");
        drop(r);
        b.finish_apply(&e6, plan, written).unwrap();
        assert_eq!(b.locate(20), None, "applied");
        let fetched = frozen.fetched.load(Relaxed);
        let mut want = content(&frozen.vol.lock().unwrap());
        want[40] = 9;
        assert_eq!(content(&b), want);
        assert_eq!(frozen.fetched.load(Relaxed), fetched, "read locally now");
    }

    #[test]
    fn while_taking_over_the_normal_area_and_journal_stay_the_old_primarys_prefix() {
        let (frozen, db, mut b) = pair_taking_over(64);
        write(&mut b, &[1, 2, 40], 9);
        drain(&frozen, &mut b, 3);
        b.sync().unwrap();
        // A crash: the volume alone (without the LU area) is the old primary's state
        // after seq 3, whatever the LU holds.
        let n = MemDevice::from_bytes(db.normal.crash_point().durable_image());
        let j = MemDevice::from_bytes(db.journal.crash_point().durable_image());
        let r = Volume::open(Box::new(n), Box::new(j), VolumeOptions::default()).unwrap();
        assert_eq!(r.journal().last_seq(), Seq(3));
        let mut want = vec![0u8; BLOCKS as usize];
        for (blocks, fill) in [(&[1, 2, 3][..], 1), (&[3, 4], 2), (&[4, 5, 6], 3)] {
            for &b in blocks {
                want[b as usize] = fill;
            }
        }
        assert_eq!(content(&r), want);
    }

    #[test]
    fn reading_block_after_block_on_the_peer_fetches_ahead_and_serves_each_version_once() {
        let (frozen, _db, b) = pair_taking_over(64);
        let old: Vec<u8> = {
            let a = frozen.vol.lock().unwrap();
            (0..BLOCKS).map(|x| a.read_block(x).unwrap()[0]).collect()
        };
        let mut buf = vec![0u8; BS];
        for x in 0..BLOCKS {
            b.read_data(x, &mut buf).unwrap();
            assert_eq!(buf[0], old[x as usize], "block {x}");
        }
        assert_eq!(
            frozen.calls.load(Relaxed),
            1,
            "one round trip for the peer's blocks, read in sequence"
        );
        // Fetched blocks are kept while they are still on the peer with that version.
        let calls = frozen.calls.load(Relaxed);
        assert_eq!(b.read_block(7).unwrap()[0], old[7]);
        b.read_data(4, &mut buf).unwrap();
        assert_eq!(buf[0], old[4]);
        assert_eq!(frozen.calls.load(Relaxed), calls, "read again from memory");
    }

    #[test]
    fn a_read_out_of_sequence_fetches_its_own_blocks_only_and_an_applied_block_is_read_locally() {
        let (frozen, _db, mut b) = pair_taking_over(64);
        let mut buf = vec![0u8; BS];
        b.read_data(4, &mut buf).unwrap();
        assert_eq!(frozen.fetched.load(Relaxed), 1, "no readahead");
        assert_eq!(b.locate(6), Some(Location::Peer { seq: Seq(4) }));
        // Block 6's newest version (seq 4) is fetched for itself, the drain under way.
        drain(&frozen, &mut b, 3);
        b.read_data(6, &mut buf).unwrap();
        let want = frozen.vol.lock().unwrap().read_block(6).unwrap()[0];
        assert_eq!(buf[0], want);
        assert_eq!(frozen.fetched.load(Relaxed), 2);
        // Once its entry is applied the block is local: neither memory nor the peer.
        drain(&frozen, &mut b, 5);
        b.read_data(6, &mut buf).unwrap();
        assert_eq!(buf[0], want);
        assert_eq!(frozen.fetched.load(Relaxed), 2);
    }

    #[test]
    fn a_read_the_peer_cannot_serve_fails_naming_the_block_and_is_counted() {
        let (frozen, _db, b) = pair_taking_over(64);
        frozen.fail.store(true, Relaxed);
        let e = b.read_block(7).unwrap_err();
        assert!(
            matches!(
                e,
                VolumeError::PeerFetch {
                    block: 7,
                    seq: Seq(5),
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(b.takeover_progress().unwrap().fetch_errors, 1);
        assert_eq!(
            b.read_block(2).unwrap()[0],
            1,
            "local blocks are still served"
        );
    }

    #[test]
    fn a_full_local_unreflected_area_refuses_writes_until_the_merge_frees_room() {
        let (frozen, _db, mut b) = pair_taking_over(16);
        let mut n = 0u8;
        // Each transaction synced (an fsync per write): an LU entry each.
        let err = loop {
            let mut tx = Transaction::new();
            tx.write_meta(20 + u64::from(n % 8), blk(n));
            match b.commit(tx).and_then(|_| b.sync()) {
                Ok(()) => n += 1,
                Err(e) => break e,
            }
            assert!(n < 100);
        };
        assert!(
            matches!(err, VolumeError::LocalUnreflectedFull { .. }),
            "{err}"
        );
        drain(&frozen, &mut b, 5);
        while b.merge_step().unwrap() != MergeStep::Done {}
        write(&mut b, &[30], 1);
        assert_eq!(b.read_block(20 + u64::from((n - 1) % 8)).unwrap()[0], n - 1);
    }

    /// Merged entries stay in the journal for the stream back (the release limit is the
    /// old primary's freeze point): a local-unreflected area larger than the journal's room
    /// makes the merge stop with `NoRoom` — not fail, not stop the volume — until the
    /// driver releases them (into the bitmap); then it goes on to the end.
    #[test]
    fn a_merge_that_fills_the_journal_stops_for_room_and_goes_on_once_released() {
        let (frozen, _db, mut b) = pair_taking_over(512);
        b.set_release_limit(Seq(5));
        // 60 synced transactions of 4 blocks each: 300 journal blocks merged, the journal
        // holding 127.
        for n in 0..60u8 {
            let first = 10 + u64::from(n % 12) * 4;
            write(&mut b, &[first, first + 1, first + 2, first + 3], n);
        }
        drain(&frozen, &mut b, 5);
        let mut no_room = 0;
        loop {
            match b.merge_step().unwrap() {
                MergeStep::Done => break,
                MergeStep::NoRoom => {
                    no_room += 1;
                    assert!(no_room < 100);
                    let newest = b.journal().last_seq();
                    b.force_release(newest).unwrap();
                }
                MergeStep::Merged(_) => {}
                MergeStep::Draining => panic!("drained"),
            }
        }
        assert!(no_room > 0, "the journal never filled");
        assert!(!b.is_taking_over());
        for n in 48..60u8 {
            let first = 10 + u64::from(n % 12) * 4;
            assert_eq!(b.read_block(first + 3).unwrap()[0], n, "the newest write");
        }
        write(&mut b, &[9], 1);
    }

    /// One transaction writing `blocks` with `fill`, its LU entry appended, not synced.
    fn write_unsynced(v: &mut Volume, blocks: &[u64], fill: u8) {
        commit_images(v, blocks, fill);
        v.seal_local_unreflected().unwrap();
    }

    #[test]
    fn a_sync_flushes_the_lu_without_the_lock_and_then_syncs_only_what_came_after() {
        let dev = Arc::new(CrashDevice::new(64 * BS as u64));
        LuArea::format(&*dev, VolumeId([1; 16]), BS as u32, BLOCKS).unwrap();
        let (_frozen, _db, mut b) = pair_taking_over_with(lu_on(Box::new(dev.clone())));
        let syncs = Arc::new(AtomicUsize::new(0));
        let counted = syncs.clone();
        dev.set_sync_hook(move || {
            counted.fetch_add(1, Relaxed);
        });
        let durable_lu = || {
            lu_on(Box::new(MemDevice::from_bytes(
                dev.crash_point().durable_image(),
            )))
        };
        write_unsynced(&mut b, &[20, 21], 7);
        assert_eq!(durable_lu().len(), 0, "appended, not durable");
        let ahead = b.flush_ahead().expect("an LU entry written, not durable");
        assert!(ahead.marks().lu.is_some());
        let done = ahead.run(); // (without the volume's lock, in production)
        assert_eq!(syncs.load(Relaxed), 1);
        assert_eq!(durable_lu().len(), 1, "the flush made the entry durable");
        b.flushed_ahead(done).unwrap();
        b.sync().unwrap();
        assert_eq!(
            syncs.load(Relaxed),
            1,
            "the sync under the lock synced the LU again"
        );
        // An entry appended while the flush ran is synced by the sync that follows.
        write_unsynced(&mut b, &[22], 8);
        let done = b.flush_ahead().unwrap().run();
        write_unsynced(&mut b, &[23], 9);
        b.flushed_ahead(done).unwrap();
        b.sync().unwrap();
        assert_eq!(syncs.load(Relaxed), 3);
        let lu = durable_lu();
        assert_eq!(
            lu.len(),
            3,
            "the entry appended during the flush is durable"
        );
        let mut buf = vec![0u8; BS];
        assert!(lu.read(23, &mut buf).unwrap().is_some());
        assert_eq!(buf[0], 9);
        // A failed flush poisons the volume, as a failed sync does.
        write_unsynced(&mut b, &[24], 10);
        dev.fail_from_now();
        let err = b.flushed_ahead(b.flush_ahead().unwrap().run());
        assert!(matches!(err, Err(VolumeError::Io { .. })), "{err:?}");
        assert!(b.is_poisoned());
    }

    #[test]
    fn transactions_between_two_syncs_make_one_lu_entry_and_are_read_before_it() {
        let (frozen, db, mut b) = pair_taking_over(64);
        for n in 0..50u8 {
            let mut tx = Transaction::new();
            tx.write_meta(20 + u64::from(n % 5), blk(n));
            b.commit(tx).unwrap();
            assert_eq!(
                b.read_block(20 + u64::from(n % 5)).unwrap()[0],
                n,
                "read before the sync"
            );
            assert_eq!(
                b.locate(20 + u64::from(n % 5)),
                Some(Location::LocalUnreflected { seq: Seq(6) })
            );
        }
        assert_eq!(
            b.takeover_progress().unwrap().lu_entries,
            0,
            "nothing sealed yet"
        );
        b.sync().unwrap();
        let p = b.takeover_progress().unwrap();
        assert_eq!(
            (p.lu_entries, p.lu_blocks),
            (1, 5),
            "one entry for 50 transactions"
        );
        // Writes go on after the drain, while the merge runs: the open entry is merged
        // under the lock at the end, and the merge ends although writes never stopped.
        drain(&frozen, &mut b, 5);
        let mut steps = 0;
        loop {
            let mut tx = Transaction::new();
            tx.write_meta(30, blk(steps));
            b.commit(tx).unwrap();
            if b.merge_step().unwrap() == MergeStep::Done {
                break;
            }
            steps += 1;
            assert!(steps < 10, "the merge chases the writers");
        }
        assert!(!b.is_taking_over());
        assert_eq!(b.read_block(30).unwrap()[0], steps);
        assert_eq!(b.read_block(24).unwrap()[0], 49);
        b.sync().unwrap();
        drop(b);
        let crashed = power_lost(&db);
        let v = open(&crashed);
        assert_eq!(v.read_block(30).unwrap()[0], steps, "merged and durable");
        assert_eq!(v.read_block(24).unwrap()[0], 49);
    }

    #[test]
    fn a_takeover_whose_local_unreflected_area_starts_elsewhere_is_refused() {
        let da = devs();
        let mut v = open(&da);
        write(&mut v, &[1], 1);
        let mut area = lu(64);
        area.begin(Seq(0)).unwrap();
        area.append(Seq(1), 1, 1, false, &[(2, &blk(2))]).unwrap();
        area.begin(Seq(0)).unwrap_err();
        // This area's entries follow seq 0; the volume already holds seq 1.
        let fetch = Arc::new(Frozen {
            vol: Mutex::new(open(&devs())),
            fetched: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
            fail: Default::default(),
        });
        let e = v
            .begin_takeover(Seq(3), area, RemoteIndex::new(Seq(1)), fetch)
            .unwrap_err();
        assert!(e.to_string().contains("local-unreflected"), "{e}");
    }

    #[test]
    fn a_prefetch_asks_for_the_peer_blocks_in_one_request_and_the_reads_find_them() {
        let (frozen, _db, b) = pair_taking_over(64);
        // On the peer: 4, 5 (seq 3), 1, 6 (seq 4), 7 (seq 5); 0, 2, 3 are local.
        assert_eq!(b.prefetch(0..BLOCKS).unwrap(), 5);
        assert_eq!(frozen.calls.load(Relaxed), 1, "one request");
        assert_eq!(frozen.fetched.load(Relaxed), 5, "only the peer's blocks");
        assert_eq!(b.prefetch(0..BLOCKS).unwrap(), 0, "already fetched");
        let want: Vec<u8> = {
            let a = frozen.vol.lock().unwrap();
            (0..8).map(|blk| a.read_block(blk).unwrap()[0]).collect()
        };
        let got: Vec<u8> = (0..8).map(|blk| b.read_block(blk).unwrap()[0]).collect();
        assert_eq!(got, want, "the old primary's newest versions");
        assert_eq!(frozen.calls.load(Relaxed), 1, "the reads needed no fetch");
        // Not taking over: nothing to fetch.
        let d = devs();
        assert_eq!(open(&d).prefetch(0..BLOCKS).unwrap(), 0);
    }

    #[test]
    fn blocks_fetched_before_the_takeover_are_kept_only_while_they_are_the_newest() {
        let (frozen, _db, b) = pair_taking_over(64);
        let a_block = |blk: u64| frozen.vol.lock().unwrap().read_block(blk).unwrap().to_vec();
        b.keep_prefetched([
            (4, Seq(3), a_block(4)),  // Peer{3}: kept
            (6, Seq(3), a_block(6)),  // Peer{4}, not 3: an older version, dropped
            (2, Seq(2), a_block(2)),  // local: dropped
            (7, Seq(5), vec![0; 10]), // the wrong size: dropped
        ]);
        assert_eq!(b.read_block(4).unwrap()[0], a_block(4)[0]);
        assert_eq!(
            frozen.calls.load(Relaxed),
            0,
            "block 4 came from what was kept"
        );
        assert_eq!(b.read_block(6).unwrap()[0], a_block(6)[0]);
        assert_eq!(b.read_block(7).unwrap()[0], a_block(7)[0]);
        assert_eq!(frozen.calls.load(Relaxed), 2, "6 and 7 were fetched");
    }
}
