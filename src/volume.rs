//! The volume: the normal area, the journal in front of it, and the caches
//! (docs/DESIGN.md §3).
//!
//! Writers hand the volume whole [`Transaction`]s (the block writes of one FS operation).
//! `commit` merges a transaction into the *open entry* (group commit: later writes of a
//! block replace earlier ones); the open entry is *sealed* into one journal entry with its
//! `Seq` when [`Volume::sync`] is called or when it grows past `max_entry_bytes` (or, with a
//! peer, past `max_entry_wire_bytes`). Everything committed is made durable (sealed, and the
//! journal synced) at the latest `commit_interval` after the oldest transaction not yet
//! durable ([`Volume::maintain`]), however many entries were sealed meanwhile. A sealed
//! entry is durable once the journal is synced; a crash recovers exactly a prefix of sealed
//! entries, so every state a reader of the normal area can see after recovery is the state
//! after some whole prefix of transactions.
//!
//! **Where a block's new content goes.** Metadata blocks, small data writes and every
//! overwrite of a block the state before the transaction uses travel as IMAGEs in the
//! journal and reach the normal area at the next checkpoint. A transaction writing at least
//! `inplace_min_blocks` data blocks writes those of them that were *free* before it (newly
//! allocated) straight into the normal area (IN_PLACE; the entry keeps only their
//! checksums), so bulk file data is written once (FORMAT.md §2.4 for the ordering rules
//! this relies on). Nothing any committed state references is ever changed before the
//! entry that changes it is durable: after any crash the normal area (every block in use)
//! is exactly the state after the recovered prefix of entries, which is what lets a
//! replica equal its primary block for block.
//!
//! **Reads** resolve a block in the order of docs/DESIGN.md §3: the open entry's images, the
//! images of sealed entries not yet checkpointed (`pending`), the clean cache, the normal
//! area.
//!
//! **Errors.** After a failed write or sync the volume is *poisoned*: every later commit
//! fails until it is reopened, because the state on disk is unknown.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::cache::BlockCache;
use crate::device::BlockDevice;
use crate::error::VolumeError;
use crate::journal::{
    DescriptorKind, EntryBlock, EntryInfo, FLAG_DATA_UNSYNCED, FLAG_FREES, Journal, JournalExpect,
    NewEntry,
};
use crate::repl::{EntryMeta, WireBlock, WireEntry};
use crate::types::{BlockNo, Seq, VolumeId, crc32c, now_ns};

mod apply;
mod flush;
mod taking;

pub use apply::PlannedApply;
pub use flush::{FlushAhead, FlushMarks, Flushed, start_writeback};
pub use taking::{MergeStep, PeerFetch, PeerRead, TakeoverProgress, defer_fetches};

/// Tunables of a volume (policy apart from mechanism; defaults are safe).
#[derive(Clone, Debug)]
pub struct VolumeOptions {
    /// Seal the open entry when it is older than this: bounds what a crash can lose when
    /// nobody calls fsync. Shorter than ext4's 5 s because `sync(2)` cannot reach a FUSE
    /// daemon, so this interval is all that `sync` users get.
    pub commit_interval: Duration,
    /// Seal the open entry when its images and descriptors reach this many bytes.
    pub max_entry_bytes: u64,
    /// Checkpoint when the images of sealed entries in memory reach this many bytes.
    pub checkpoint_bytes: u64,
    /// Size of the clean metadata cache in bytes.
    pub cache_bytes: u64,
    /// A transaction writing at least this many data blocks writes them in place.
    pub inplace_min_blocks: usize,
    /// Open without writing anything (journal replayed in memory only).
    pub read_only: bool,
    /// Replication is configured: journal entries stay after their checkpoint until the
    /// replication driver releases them ([`Volume::set_release_limit`]).
    pub retain: bool,
    /// Bytes of overwritten, not yet replicated in-place data kept aside in memory
    /// (JP 2003-418907 ¶0136); beyond it such entries fall back to a bitmap resync.
    pub evacuation_limit: u64,
    /// With `retain`: seal the open entry when its blocks (in-place data included) reach
    /// this many bytes, so that one entry is one message on the wire.
    pub max_entry_wire_bytes: u64,
    /// Checkpoint when entries since the last checkpoint hold this many bytes written in
    /// place: bounds what recovery reads to check that data (FORMAT.md §2.3).
    pub checkpoint_inplace_bytes: u64,
    /// While taking over, a thread writes the local-unreflected area's full entries
    /// behind the writers (FORMAT.md §5.1); `false`: the area's next step does, so that
    /// when they reach the device follows from the calls alone (the deterministic
    /// simulation's crash points).
    pub lu_writer_thread: bool,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        Self {
            commit_interval: Duration::from_secs(1),
            // 8 MiB: big enough to merge the metadata of thousands of creates into one
            // entry, small enough that sealing one costs a few milliseconds of I/O.
            max_entry_bytes: 8 << 20,
            // 32 MiB of images kept in memory before they are written to the normal area.
            checkpoint_bytes: 32 << 20,
            // 32 MiB of clean metadata: the inode blocks and directory leaves of ~500k files
            // (256-byte inodes, ~100 directory entries per 4 KiB leaf). With the two above,
            // the daemon stays well under 256 MiB (BENCHMARKS.md).
            cache_bytes: 32 << 20,
            // 8 blocks (32 KiB with 4 KiB blocks): below that, journaling the data costs less
            // than the extra sync of the normal area an in-place write needs at fsync.
            inplace_min_blocks: 8,
            read_only: false,
            retain: false,
            // 64 MiB: overwrites of data the peer has not acknowledged yet are rare with a
            // responsive peer; a slow one falls back to the bitmap rather than use memory.
            evacuation_limit: 64 << 20,
            max_entry_wire_bytes: crate::repl::MAX_ENTRY_WIRE_BYTES,
            // 128 MiB: a checkpoint (two syncs) per 128 MiB of bulk data costs nothing
            // measurable, and recovery then reads at most that much to check it.
            checkpoint_inplace_bytes: 128 << 20,
            lu_writer_thread: true,
        }
    }
}

/// Identifies a committed transaction, in commit order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxId(pub u64);

/// The block writes of one FS operation, applied atomically by [`Volume::commit`].
#[derive(Debug, Default)]
pub struct Transaction<'d> {
    meta: BTreeMap<BlockNo, Arc<[u8]>>,
    /// File data as runs of consecutive blocks: (first block, bytes, a multiple of the
    /// block size, whether the blocks were free before), possibly borrowed from the caller's
    /// request buffer. Runs do not overlap each other or the metadata blocks.
    data: Vec<(BlockNo, Cow<'d, [u8]>, bool)>,
    /// The transaction frees blocks (see [`Transaction::frees_blocks`]).
    frees: bool,
}

impl<'d> Transaction<'d> {
    /// An empty transaction.
    pub fn new() -> Self {
        Self::default()
    }
    /// Says that the transaction frees blocks that the state before it used. A replica
    /// that has not made such an entry durable yet must not write a block that was free
    /// in place before it does (the block may be one the freeing entry freed; a crash
    /// would then leave its durable state with a block overwritten under it).
    pub fn frees_blocks(&mut self) {
        self.frees = true;
    }
    /// Writes a metadata block (always journaled as an image).
    pub fn write_meta(&mut self, block: BlockNo, data: Arc<[u8]>) {
        self.meta.insert(block, data);
    }
    /// Writes file data to consecutive blocks from `start` (may be written in place, see
    /// the module documentation); `data` is a whole number of blocks. `fresh`: the blocks
    /// were free before this transaction (newly allocated), which lets a replica write them
    /// in place too.
    pub fn write_data(&mut self, start: BlockNo, data: impl Into<Cow<'d, [u8]>>, fresh: bool) {
        self.data.push((start, data.into(), fresh));
    }
    /// True if nothing is written.
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty() && self.data.is_empty() && !self.frees
    }
}

#[derive(Debug, Clone)]
enum OpenBlock {
    Image(Arc<[u8]>),
    /// Written in place: checksum, and whether the block was free before.
    InPlace(u32, bool),
}

#[derive(Debug, Default)]
struct OpenEntry {
    blocks: BTreeMap<BlockNo, OpenBlock>,
    image_bytes: u64,
    n_tx: u32,
    has_inplace: bool,
    /// A transaction in it frees blocks.
    frees: bool,
    last_ts: u64,
    last_tx: TxId,
}

/// Counters for status and benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeStats {
    /// Transactions committed.
    pub transactions: u64,
    /// Journal entries sealed.
    pub entries: u64,
    /// Bytes of block images written to the journal.
    pub journal_image_bytes: u64,
    /// Bytes of data written in place.
    pub inplace_bytes: u64,
    /// Checkpoints completed.
    pub checkpoints: u64,
    /// Bytes written to the normal area by checkpoints.
    pub checkpoint_bytes: u64,
    /// Syncs of the journal device.
    pub journal_syncs: u64,
    /// Syncs of the normal-area device.
    pub normal_syncs: u64,
}

/// What recovery did at open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Entries found in the journal.
    pub entries_found: usize,
    /// Entries replayed (not yet checkpointed before the crash).
    pub entries_replayed: usize,
    /// Blocks written back from images.
    pub blocks_replayed: usize,
    /// Entries that scanned as valid but whose data written in place did not reach the
    /// disk before a crash: never durable, dropped (FORMAT.md §2.3).
    pub entries_dropped: usize,
    /// Seq of the newest valid entry.
    pub last_seq: Seq,
    /// The previous session did not close cleanly.
    pub unclean: bool,
}

/// The volume; see the module documentation.
pub struct Volume {
    normal: Arc<dyn BlockDevice>,
    journal: Journal,
    id: VolumeId,
    bs: usize,
    blocks: u64,
    opts: VolumeOptions,
    open: OpenEntry,
    /// Newest image of each block in sealed entries not yet checkpointed.
    pending: HashMap<BlockNo, Arc<[u8]>>,
    cache: BlockCache,
    /// In-place writes since the normal area was last synced.
    normal_dirty: bool,
    /// In-place writes so far (a mark for [`Volume::flush_ahead`]).
    inplace_writes: u64,
    /// `inplace_writes` at the last [`Volume::take_writeback`].
    writeback_mark: u64,
    /// When the oldest transaction not yet durable was committed: the group commit is due
    /// one `commit_interval` later, however many entries were sealed since.
    unsynced_since: Option<Instant>,
    poisoned: bool,
    next_tx: TxId,
    /// Newest transaction in a sealed entry.
    sealed_tx: TxId,
    /// Newest transaction in a durable entry.
    durable_tx: TxId,
    checkpoint_seq: Seq,
    stats: VolumeStats,
    recovery: RecoveryReport,
    /// With `retain`: entries up to this seq may be released once checkpointed.
    release_limit: Seq,
    /// Newest seq handed to the replication driver by [`Volume::take_entries`].
    reported: Seq,
    /// With `retain`: for blocks held IN_PLACE by a retained entry, the newest such seq.
    inplace_refs: HashMap<BlockNo, Seq>,
    /// Blocks held IN_PLACE by sealed entries after the last checkpoint, and the seq of
    /// that entry. Such a block is never written in place again before the next
    /// checkpoint (FORMAT.md §2.4 rule 2): recovery checks its content against the entry.
    inplace_since_checkpoint: HashMap<BlockNo, Seq>,
    /// Content of such blocks saved before an overwrite, by (entry seq, block).
    evacuated: HashMap<(Seq, BlockNo), Arc<[u8]>>,
    evacuated_bytes: u64,
    /// Copy blocks are being written straight into the normal area (secondary).
    copying: bool,
    /// Secondary: an entry applied and not yet durable frees blocks.
    unsynced_frees: bool,
    /// Taking over: the data-location table and the local-unreflected area
    /// (docs/PROTOCOL.md §7).
    taking: Option<Box<taking::Taking>>,
    /// True while taking over: reads may wait for the peer (shared with the caller that
    /// holds this volume behind a lock, [`Volume::share_fetch_flag`]).
    fetching: Arc<AtomicBool>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("id", &self.id)
            .field("bs", &self.bs)
            .field("blocks", &self.blocks)
            .field("journal", &self.journal)
            .finish_non_exhaustive()
    }
}

/// Block sizes pairfs accepts: powers of two from 4 KiB (the page size: smaller blocks
/// would make every page write a read-modify-write) to 64 KiB (B-tree value offsets are
/// `u16`, FORMAT.md §3.4).
pub fn valid_block_size(bs: u32) -> bool {
    bs.is_power_of_two() && (4096..=65536).contains(&bs)
}

impl Volume {
    /// Formats a new volume: writes the journal header. The normal area must already have
    /// its final size (a multiple of `block_size`).
    pub fn create(
        normal: &dyn BlockDevice,
        journal: &dyn BlockDevice,
        id: VolumeId,
        block_size: u32,
    ) -> Result<(), VolumeError> {
        if !valid_block_size(block_size) {
            return Err(VolumeError::InvalidParams(format!(
                "block size {block_size} is not a power of two between 4096 and 65536"
            )));
        }
        let len = normal.len().map_err(VolumeError::io("sizing the volume"))?;
        if len % u64::from(block_size) != 0 || len == 0 {
            return Err(VolumeError::InvalidParams(format!(
                "volume size {len} is not a positive multiple of the block size {block_size}"
            )));
        }
        Journal::format(journal, id, block_size, len / u64::from(block_size))?;
        Ok(())
    }

    /// Opens a volume and recovers it: replays the journal entries that were committed and
    /// not yet checkpointed (in memory only when `read_only`).
    pub fn open(
        normal: Box<dyn BlockDevice>,
        journal_dev: Box<dyn BlockDevice>,
        opts: VolumeOptions,
    ) -> Result<Volume, VolumeError> {
        let (hdr, _) = Journal::read_header(&*journal_dev)?;
        let len = normal.len().map_err(VolumeError::io("sizing the volume"))?;
        let bs = hdr.block_size;
        if !valid_block_size(bs) {
            return Err(VolumeError::Journal(crate::error::JournalError::BadHeader(
                format!("block size {bs} is invalid"),
            )));
        }
        let (mut journal, mut entries) = Journal::open(
            journal_dev,
            JournalExpect {
                block_size: bs,
                normal_blocks: len / u64::from(bs),
            },
        )?;
        let hdr = journal.header().clone();
        let keep = entries_with_their_data(&*normal, bs as usize, &entries, hdr.checkpoint_seq)?;
        let dropped = entries.len() - keep;
        if dropped > 0 {
            let first = entries[keep].seq;
            let before = keep
                .checked_sub(1)
                .map_or(hdr.tail_prev_seq, |i| entries[i].seq);
            let reason = format!("data written in place by entry seq {first} is not on disk");
            journal.check_no_durable_successor(before, &reason)?;
            tracing::warn!(
                first = %first,
                entries = dropped,
                "journal entries written before a crash whose data never reached the disk; dropped"
            );
            journal.drop_tail(&entries, keep, !opts.read_only)?;
            entries.truncate(keep);
        }
        let mut recovery = RecoveryReport {
            entries_found: entries.len(),
            entries_dropped: dropped,
            unclean: !hdr.clean,
            last_seq: journal.last_seq(),
            ..RecoveryReport::default()
        };
        // Newest version of every block among the entries to replay.
        let mut newest: HashMap<BlockNo, (usize, usize)> = HashMap::new();
        for (ei, e) in entries.iter().enumerate() {
            if e.seq <= hdr.checkpoint_seq {
                continue;
            }
            recovery.entries_replayed += 1;
            for (di, d) in e.descriptors.iter().enumerate() {
                newest.insert(d.block, (ei, di));
            }
        }
        let mut order: Vec<_> = newest.into_iter().collect();
        order.sort_unstable_by_key(|(b, _)| *b);
        let mut pending = HashMap::new();
        let mut buf = vec![0u8; bs as usize];
        for (block, (ei, di)) in order {
            let e = &entries[ei];
            if e.descriptors[di].kind != DescriptorKind::Image {
                continue; // in place: the data is already in the normal area
            }
            journal.read_image(e, di, &mut buf)?;
            recovery.blocks_replayed += 1;
            if opts.read_only {
                pending.insert(block, Arc::from(buf.as_slice()));
            } else {
                normal
                    .write_at(&buf, block * u64::from(bs))
                    .map_err(VolumeError::io("replaying the journal"))?;
            }
        }
        let last = journal.last_seq();
        let mut checkpoint_seq = hdr.checkpoint_seq;
        if !opts.read_only {
            normal
                .sync()
                .map_err(VolumeError::io("syncing the replayed volume"))?;
            if !opts.retain {
                journal.release_through(last);
            }
            journal.begin_session()?;
            journal.persist_tail(last, false)?;
            checkpoint_seq = last;
        }
        if recovery.entries_replayed > 0 {
            tracing::info!(
                entries = recovery.entries_replayed,
                blocks = recovery.blocks_replayed,
                last_seq = %last,
                "journal replayed"
            );
        }
        let mut inplace_refs = HashMap::new();
        if opts.retain {
            for e in &entries {
                for d in &e.descriptors {
                    if d.kind != DescriptorKind::Image {
                        inplace_refs.insert(d.block, e.seq);
                    }
                }
            }
        }
        Ok(Volume {
            normal: Arc::from(normal),
            journal,
            id: hdr.volume_id,
            bs: bs as usize,
            blocks: len / u64::from(bs),
            cache: BlockCache::new((opts.cache_bytes / u64::from(bs)) as usize),
            opts,
            open: OpenEntry::default(),
            pending,
            normal_dirty: false,
            inplace_writes: 0,
            writeback_mark: 0,
            unsynced_since: None,
            poisoned: false,
            next_tx: TxId(1),
            sealed_tx: TxId(0),
            durable_tx: TxId(0),
            checkpoint_seq,
            stats: VolumeStats::default(),
            recovery,
            release_limit: Seq::NONE,
            reported: last,
            inplace_refs,
            inplace_since_checkpoint: HashMap::new(),
            evacuated: HashMap::new(),
            evacuated_bytes: 0,
            copying: false,
            unsynced_frees: false,
            taking: None,
            fetching: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> usize {
        self.bs
    }
    /// Number of blocks of the normal area.
    pub fn block_count(&self) -> u64 {
        self.blocks
    }
    /// The volume's identity.
    pub fn id(&self) -> VolumeId {
        self.id
    }
    /// What recovery did at open.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }
    /// Counters.
    pub fn stats(&self) -> VolumeStats {
        self.stats.clone()
    }
    /// (cache hits, cache misses, cached blocks)
    pub fn cache_stats(&self) -> (u64, u64, usize) {
        self.cache.stats()
    }
    /// The journal (read-only view, e.g. for status and streaming).
    pub fn journal(&self) -> &Journal {
        &self.journal
    }
    /// True once an I/O error stopped the volume accepting writes.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }
    /// Newest transaction whose journal entry is durable.
    pub fn durable_tx(&self) -> TxId {
        self.durable_tx
    }
    /// The id the next committed transaction will get.
    pub fn next_tx(&self) -> TxId {
        self.next_tx
    }

    fn check_block(&self, block: BlockNo) -> Result<(), VolumeError> {
        if block >= self.blocks {
            return Err(VolumeError::OutOfRange {
                block,
                blocks: self.blocks,
            });
        }
        Ok(())
    }

    fn newest_image(&self, block: BlockNo) -> Option<Arc<[u8]>> {
        if let Some(OpenBlock::Image(d)) = self.open.blocks.get(&block) {
            return Some(d.clone());
        }
        self.pending.get(&block).cloned()
    }

    /// Reads a metadata block (cached).
    pub fn read_block(&self, block: BlockNo) -> Result<Arc<[u8]>, VolumeError> {
        self.check_block(block)?;
        if self.locate(block).is_some() {
            // Newest in the LU area or on the peer (taking over): not cached here.
            let mut buf = vec![0u8; self.bs];
            self.read_located(block, &mut buf)?;
            return Ok(Arc::from(buf));
        }
        if let Some(d) = self.newest_image(block) {
            return Ok(d);
        }
        if let Some(d) = self.cache.get(block) {
            return Ok(d);
        }
        let mut buf = vec![0u8; self.bs];
        self.normal
            .read_at(&mut buf, block * self.bs as u64)
            .map_err(VolumeError::io("reading a block"))?;
        let d: Arc<[u8]> = Arc::from(buf);
        self.cache.insert(block, d.clone());
        Ok(d)
    }

    /// Reads `buf.len() / block_size` consecutive file-data blocks starting at `start`
    /// (one read from the normal area, not cached, newer images overlaid).
    pub fn read_data(&self, start: BlockNo, buf: &mut [u8]) -> Result<(), VolumeError> {
        let n = (buf.len() / self.bs) as u64;
        debug_assert_eq!(buf.len() % self.bs, 0);
        if n == 0 {
            return Ok(());
        }
        self.check_block(start + n - 1)?;
        self.normal
            .read_at(buf, start * self.bs as u64)
            .map_err(VolumeError::io("reading data"))?;
        if self.open.image_bytes > 0 || !self.pending.is_empty() {
            for i in 0..n {
                if let Some(d) = self.newest_image(start + i) {
                    let at = (i as usize) * self.bs;
                    buf[at..at + self.bs].copy_from_slice(&d);
                }
            }
        }
        if self.taking.is_some() {
            // Blocks newest in the LU area or on the peer replace what was read.
            self.read_located(start, buf)?;
        }
        Ok(())
    }

    fn poison<T>(&mut self, e: VolumeError) -> Result<T, VolumeError> {
        if !self.poisoned {
            tracing::error!(error = %e, "volume I/O failed; refusing further writes until it is reopened");
        }
        self.poisoned = true;
        Err(e)
    }

    fn check_writable(&self) -> Result<(), VolumeError> {
        if self.opts.read_only {
            return Err(VolumeError::ReadOnly);
        }
        if self.poisoned {
            return Err(VolumeError::Poisoned);
        }
        Ok(())
    }

    /// Applies a transaction atomically (durable at the next [`Volume::sync`]).
    pub fn commit(&mut self, tx: Transaction<'_>) -> Result<TxId, VolumeError> {
        self.check_writable()?;
        if tx.is_empty() {
            return Ok(TxId(self.next_tx.0 - 1));
        }
        if self.taking.is_some() {
            self.check_tx(&tx)?;
            return self.commit_taking(tx);
        }
        let bs = self.bs;
        let data_blocks = self.check_tx(&tx)?;
        if self.opts.retain {
            // With a peer an entry must fit one message (PROTOCOL.md §4): seal the open
            // entry first if this transaction would take it over the limit.
            let limit = self.opts.max_entry_wire_bytes;
            let tx_bytes = (tx.meta.len() + data_blocks) as u64 * bs as u64;
            if tx_bytes > limit {
                return Err(VolumeError::InvalidParams(format!(
                    "a transaction of {tx_bytes} bytes exceeds the replication entry limit \
                     of {limit} bytes"
                )));
            }
            if self.open_entry_bytes() + tx_bytes > limit {
                // A full message's worth: durable at once, since the peer can have it
                // only then (PROTOCOL.md §5), rather than up to a commit interval later.
                self.sync()?;
            }
        }
        let bulk = data_blocks >= self.opts.inplace_min_blocks;
        let mut images: Vec<(BlockNo, Arc<[u8]>)> = tx.meta.into_iter().collect();
        let mut inplace: Vec<(BlockNo, u32, bool)> = Vec::new();
        for (start, d, fresh) in &tx.data {
            let n = d.len() / bs;
            let mut i = 0;
            while i < n {
                let eligible =
                    |k: usize| bulk && *fresh && self.may_write_in_place(start + k as u64);
                let here = eligible(i);
                let mut j = i + 1;
                while j < n && eligible(j) == here {
                    j += 1;
                }
                let chunk = &d[i * bs..j * bs];
                if here {
                    if !self.inplace_refs.is_empty() {
                        for k in i..j {
                            self.evacuate(start + k as u64)?;
                        }
                    }
                    if let Err(e) = self.normal.write_at(chunk, (start + i as u64) * bs as u64) {
                        return self.poison(VolumeError::Io {
                            op: "writing data in place",
                            source: e,
                        });
                    }
                    self.wrote_normal();
                    self.stats.inplace_bytes += chunk.len() as u64;
                    for (k, blk) in chunk.chunks_exact(bs).enumerate() {
                        let b = start + (i + k) as u64;
                        self.cache.remove(b);
                        inplace.push((b, crc32c(blk), *fresh));
                    }
                } else {
                    for (k, blk) in chunk.chunks_exact(bs).enumerate() {
                        images.push((start + (i + k) as u64, Arc::from(blk)));
                    }
                }
                i = j;
            }
        }
        let now = Instant::now();
        let open = &mut self.open;
        let mut put = |b: BlockNo, new: OpenBlock| {
            if let OpenBlock::Image(d) = &new {
                open.image_bytes += d.len() as u64;
            }
            if let Some(OpenBlock::Image(old)) = open.blocks.insert(b, new) {
                open.image_bytes -= old.len() as u64;
            }
        };
        for (b, d) in images {
            put(b, OpenBlock::Image(d));
        }
        if !inplace.is_empty() {
            for (b, crc, fresh) in inplace {
                // Merged with an earlier write of the same open entry, a block stays fresh
                // only if it was fresh then too (and an image there means it was not).
                let prev_fresh = match open.blocks.get(&b) {
                    None => true,
                    Some(OpenBlock::InPlace(_, f)) => *f,
                    Some(OpenBlock::Image(_)) => false,
                };
                let new = OpenBlock::InPlace(crc, fresh && prev_fresh);
                if let Some(OpenBlock::Image(old)) = open.blocks.insert(b, new) {
                    open.image_bytes -= old.len() as u64;
                }
            }
            open.has_inplace = true;
        }
        open.n_tx += 1;
        open.frees |= tx.frees;
        self.unsynced_since.get_or_insert(now);
        open.last_ts = now_ns();
        let id = self.next_tx;
        open.last_tx = id;
        self.next_tx = TxId(id.0 + 1);
        self.stats.transactions += 1;
        let descr = self.open.blocks.len() as u64 * crate::journal::DESCRIPTOR_LEN as u64;
        if self.open.image_bytes + descr >= self.max_entry_bytes() {
            self.seal()?;
        }
        Ok(id)
    }

    /// Checks a transaction's blocks (inside the volume, whole blocks); returns how many
    /// data blocks it writes.
    fn check_tx(&self, tx: &Transaction<'_>) -> Result<usize, VolumeError> {
        let bs = self.bs;
        for (&b, d) in &tx.meta {
            self.check_block(b)?;
            if d.len() != bs {
                return Err(VolumeError::InvalidParams(format!(
                    "block {b} written with {} bytes, block size is {bs}",
                    d.len()
                )));
            }
        }
        let mut data_blocks = 0usize;
        for (start, d, _) in &tx.data {
            if d.is_empty() || d.len() % bs != 0 {
                return Err(VolumeError::InvalidParams(format!(
                    "data run at block {start} of {} bytes is not whole blocks",
                    d.len()
                )));
            }
            self.check_block(start + (d.len() / bs) as u64 - 1)?;
            data_blocks += d.len() / bs;
        }
        Ok(data_blocks)
    }

    fn max_entry_bytes(&self) -> u64 {
        // An entry never takes more than a quarter of the journal, so that a full journal
        // can always be drained by one checkpoint and the next entry then fits.
        self.opts
            .max_entry_bytes
            .min(self.journal.capacity_for_entries() / 4)
            .max(self.bs as u64)
    }

    /// FORMAT.md §2.4 rule 2: a block that was free before a transaction may be written in
    /// place, unless a crash could then replay an older image over it (an image of it is
    /// pending) or recovery could no longer check the entry that wrote it in place last
    /// (that entry is after the last checkpoint).
    fn may_write_in_place(&self, b: BlockNo) -> bool {
        !self.pending.contains_key(&b) && !self.inplace_since_checkpoint.contains_key(&b)
    }

    /// Seals the open entry into a journal entry (written, not yet durable). Its in-place
    /// data is written but not necessarily durable yet: the sync that makes the entry
    /// durable syncs the normal area first (FORMAT.md §2.4 rule 2).
    fn seal(&mut self) -> Result<(), VolumeError> {
        if self.open.blocks.is_empty() {
            return Ok(());
        }
        self.check_writable()?;
        let open = std::mem::take(&mut self.open);
        let blocks: Vec<(BlockNo, EntryBlock<'_>)> = open
            .blocks
            .iter()
            .map(|(&b, ob)| {
                (
                    b,
                    match ob {
                        OpenBlock::Image(d) => EntryBlock::Image(d),
                        OpenBlock::InPlace(c, false) => EntryBlock::InPlace(*c),
                        OpenBlock::InPlace(c, true) => EntryBlock::InPlaceFresh(*c),
                    },
                )
            })
            .collect();
        let entry = NewEntry {
            seq: None,
            timestamp_ns: open.last_ts,
            n_tx: open.n_tx,
            flags: entry_flags(open.has_inplace, open.frees),
            blocks: &blocks,
        };
        let appended = self.append_entry(&entry);
        drop(blocks);
        let seq = match appended {
            Ok(loc) => loc.seq,
            Err(e) => {
                self.open = open;
                return Err(e);
            }
        };
        self.stats.entries += 1;
        self.stats.journal_image_bytes += open.image_bytes;
        for (b, ob) in open.blocks {
            match ob {
                OpenBlock::Image(d) => {
                    self.pending.insert(b, d);
                }
                OpenBlock::InPlace(..) => self.sealed_in_place(b, seq),
            }
        }
        self.sealed_tx = open.last_tx;
        Ok(())
    }

    /// Block `b` is IN_PLACE in the newly sealed entry `seq`.
    fn sealed_in_place(&mut self, b: BlockNo, seq: Seq) {
        self.pending.remove(&b);
        self.inplace_since_checkpoint.insert(b, seq);
        if self.opts.retain {
            self.inplace_refs.insert(b, seq);
        }
    }

    /// Appends an entry to the journal: reserves seqs first when due (a journal sync, so
    /// the normal area is synced before it), and checkpoints to make room when the journal
    /// is full. An I/O error poisons the volume; a refused entry does not.
    fn append_entry(
        &mut self,
        entry: &NewEntry<'_>,
    ) -> Result<crate::journal::EntryLoc, VolumeError> {
        if self.journal.needs_reservation(entry.seq) {
            self.sync_normal()?;
            if let Err(e) = self.journal.reserve(entry.seq) {
                return self.poison(e.into());
            }
            self.stats.journal_syncs += 1;
        }
        let r = match self.journal.append(entry) {
            Err(crate::error::JournalError::Full { .. }) => {
                // Make room: checkpoint what is sealed, then the entry fits (an entry never
                // takes more than a quarter of the journal).
                self.checkpoint_sealed()?;
                self.journal.append(entry)
            }
            r => r,
        };
        match r {
            Ok(loc) => Ok(loc),
            Err(
                e @ (crate::error::JournalError::SeqOrder { .. }
                | crate::error::JournalError::BadEntry { .. }),
            ) => Err(e.into()),
            Err(e) => self.poison(e.into()),
        }
    }

    /// Syncs the normal area if anything was written to it since its last sync.
    fn sync_normal(&mut self) -> Result<(), VolumeError> {
        if !self.normal_dirty {
            return Ok(());
        }
        if let Err(e) = self.normal.sync() {
            return self.poison(VolumeError::Io {
                op: "syncing the normal area",
                source: e,
            });
        }
        self.stats.normal_syncs += 1;
        self.normal_dirty = false;
        Ok(())
    }

    /// Makes every entry written so far durable: the normal area first, so that no entry
    /// is durable before the data it names (FORMAT.md §2.4 rule 2), then the journal.
    fn make_durable(&mut self) -> Result<(), VolumeError> {
        self.sync_normal()?;
        if let Err(e) = self.journal.sync() {
            return self.poison(e.into());
        }
        self.stats.journal_syncs += 1;
        self.unsynced_frees = false;
        Ok(())
    }

    /// Seals what is committed into a journal entry (written, not durable: sync-mode
    /// replication sends it before the next sync) and returns the newest seq.
    pub fn seal_open(&mut self) -> Result<Seq, VolumeError> {
        self.check_writable()?;
        self.seal()?;
        Ok(self.journal.last_seq())
    }

    /// The end of a copy (PROTOCOL.md §5.2): seals what is committed, then writes an entry
    /// without blocks — a seq the peer cannot already have, so that its acknowledging that
    /// seq durable proves it applied the copy's end and synced after it. Written, not yet
    /// durable; returns its seq.
    pub fn append_marker(&mut self) -> Result<Seq, VolumeError> {
        self.check_writable()?;
        self.seal()?;
        let entry = NewEntry {
            seq: None,
            timestamp_ns: now_ns(),
            n_tx: 0,
            flags: 0,
            blocks: &[],
        };
        let loc = self.append_entry(&entry)?;
        self.stats.entries += 1;
        Ok(loc.seq)
    }

    /// Online verify's repair (PROTOCOL.md §5.5): commits the current content of `blocks`
    /// again, unchanged, as images, so that the entries that follow carry it to the peer.
    /// Nothing changes here.
    pub fn rewrite_blocks(&mut self, blocks: &[BlockNo]) -> Result<(), VolumeError> {
        // A few hundred blocks a transaction, well under every entry limit.
        const PER_TX: usize = 256;
        let mut buf = vec![0u8; self.bs];
        for chunk in blocks.chunks(PER_TX) {
            let mut tx = Transaction::new();
            for &b in chunk {
                self.read_current(b, &mut buf)?;
                tx.write_meta(b, Arc::from(buf.as_slice()));
            }
            self.commit(tx)?;
        }
        Ok(())
    }

    /// Makes every committed transaction durable (group commit: one journal sync).
    pub fn sync(&mut self) -> Result<(), VolumeError> {
        self.check_writable()?;
        self.seal()?;
        // Taking over: the LU first, whatever the journal's state (a checkpoint counts
        // every transaction as durable, the LU's included, so the test below would skip it).
        self.sync_taking()?;
        if !self.normal_dirty
            && self.durable_tx == self.sealed_tx
            && self.journal.durable_seq() == self.journal.last_seq()
        {
            self.unsynced_since = None;
            return Ok(());
        }
        self.make_durable()?;
        self.durable_tx = self.sealed_tx;
        self.unsynced_since = None;
        Ok(())
    }

    /// Writes the images of sealed entries to the normal area and frees their journal space.
    pub fn checkpoint(&mut self) -> Result<(), VolumeError> {
        self.check_writable()?;
        self.seal()?;
        self.checkpoint_sealed()
    }

    fn checkpoint_sealed(&mut self) -> Result<(), VolumeError> {
        self.make_durable()?;
        self.durable_tx = self.sealed_tx;
        if self.open.blocks.is_empty() {
            self.unsynced_since = None;
        }
        let last = self.journal.last_seq();
        // What may leave the journal: everything checkpointed, unless replication still
        // needs it.
        let rel = if self.opts.retain {
            self.release_limit.min(last)
        } else {
            last
        };
        let releasable = self
            .journal
            .retained()
            .front()
            .is_some_and(|e| e.seq <= rel);
        if self.pending.is_empty() && !releasable && self.inplace_since_checkpoint.is_empty() {
            return Ok(());
        }
        let mut order: Vec<BlockNo> = self.pending.keys().copied().collect();
        order.sort_unstable();
        if !self.inplace_refs.is_empty() {
            for &b in &order {
                self.evacuate(b)?;
            }
        }
        let mut buf = Vec::new();
        let mut i = 0;
        while i < order.len() {
            // Coalesce consecutive blocks into one write.
            let start = order[i];
            buf.clear();
            while i < order.len() && order[i] == start + (buf.len() / self.bs) as u64 {
                buf.extend_from_slice(&self.pending[&order[i]]);
                i += 1;
            }
            if let Err(e) = self.normal.write_at(&buf, start * self.bs as u64) {
                return self.poison(VolumeError::Io {
                    op: "checkpointing",
                    source: e,
                });
            }
            self.stats.checkpoint_bytes += buf.len() as u64;
        }
        if let Err(e) = self.normal.sync() {
            return self.poison(VolumeError::Io {
                op: "syncing the checkpoint",
                source: e,
            });
        }
        self.stats.normal_syncs += 1;
        self.normal_dirty = false;
        self.journal.release_through(rel);
        if let Err(e) = self.journal.persist_tail(last, false) {
            return self.poison(e.into());
        }
        self.checkpoint_seq = last;
        self.inplace_since_checkpoint.clear();
        if !self.inplace_refs.is_empty() {
            self.inplace_refs.retain(|_, s| *s > rel);
            self.evacuated.retain(|(s, _), _| *s > rel);
            self.evacuated_bytes = self.evacuated.len() as u64 * self.bs as u64;
        }
        for (b, d) in self.pending.drain() {
            self.cache.insert(b, d);
        }
        self.stats.checkpoints += 1;
        Ok(())
    }

    /// Periodic work: seal and sync an old open entry, checkpoint when memory or journal
    /// fill call for it. Returns true if anything was done.
    pub fn maintain(&mut self, now: Instant) -> Result<bool, VolumeError> {
        if self.opts.read_only || self.poisoned {
            return Ok(false);
        }
        let mut did = false;
        if self.commit_due(now) {
            self.sync()?;
            did = true;
        }
        let pending_bytes = self.pending.len() as u64 * self.bs as u64;
        let journal_half_full = self.journal.used_bytes() * 2 > self.journal.capacity_for_entries();
        let inplace_bytes = self.inplace_since_checkpoint.len() as u64 * self.bs as u64;
        if pending_bytes >= self.opts.checkpoint_bytes
            || journal_half_full
            || inplace_bytes >= self.opts.checkpoint_inplace_bytes
        {
            self.checkpoint()?;
            did = true;
        }
        Ok(did)
    }

    /// Checkpoints everything and marks the journal clean. The volume stays usable.
    pub fn close(&mut self) -> Result<(), VolumeError> {
        if self.opts.read_only {
            return Ok(());
        }
        self.checkpoint()?;
        let last = self.journal.last_seq();
        if let Err(e) = self.journal.persist_tail(last, true) {
            return self.poison(e.into());
        }
        Ok(())
    }

    /// Writes whole blocks into the normal area ([`write_runs`]); a failure poisons.
    fn write_blocks(
        &mut self,
        blocks: &[(BlockNo, &[u8])],
        op: &'static str,
    ) -> Result<(), VolumeError> {
        match write_runs(&*self.normal, self.bs, blocks) {
            Ok(()) => Ok(()),
            Err(source) => self.poison(VolumeError::Io { op, source }),
        }
    }

    /// Saves aside the current content of `b` if a retained entry holds it in place and it
    /// is about to be overwritten (JP 2003-418907 ¶0136: the entry must still be sent with
    /// the data it had). Beyond `evacuation_limit` nothing is saved: sending that entry then
    /// fails its checksum and replication falls back to the bitmap.
    fn evacuate(&mut self, b: BlockNo) -> Result<(), VolumeError> {
        let Some(&seq) = self.inplace_refs.get(&b) else {
            return Ok(());
        };
        if self.evacuated.contains_key(&(seq, b)) {
            return Ok(());
        }
        if self.evacuated_bytes + self.bs as u64 > self.opts.evacuation_limit {
            tracing::debug!(block = b, %seq, "evacuation limit reached");
            return Ok(());
        }
        let mut buf = vec![0u8; self.bs];
        if let Err(e) = self.normal.read_at(&mut buf, b * self.bs as u64) {
            return self.poison(VolumeError::Io {
                op: "saving data aside",
                source: e,
            });
        }
        self.evacuated.insert((seq, b), Arc::from(buf));
        self.evacuated_bytes += self.bs as u64;
        Ok(())
    }

    // ------------------------------------------------------------- replication --

    /// Replication: entries up to `seq` are no longer needed by the peer; they leave the
    /// journal at the next checkpoint.
    pub fn set_release_limit(&mut self, seq: Seq) {
        self.release_limit = self.release_limit.max(seq);
    }

    /// Replication: releases entries up to `seq` now (after a checkpoint), whether or not
    /// the peer has them (their blocks were recorded in the difference bitmap).
    pub fn force_release(&mut self, seq: Seq) -> Result<(), VolumeError> {
        self.set_release_limit(seq);
        self.checkpoint()
    }

    /// Journal entries still retained, oldest first (for a new replicator; after an open
    /// every one is durable).
    pub fn retained_entries(&self) -> Vec<EntryMeta> {
        self.journal
            .retained()
            .iter()
            .map(|e| self.entry_meta(e))
            .collect()
    }

    fn entry_meta(&self, e: &crate::journal::EntryLoc) -> EntryMeta {
        EntryMeta {
            seq: e.seq,
            prev_seq: e.prev_seq,
            bytes: u64::from(e.n_blocks) * self.bs as u64,
            journal_bytes: e.total_len,
            timestamp_ns: e.timestamp_ns,
        }
    }

    /// Entries the replication driver has not had yet: those that became durable since
    /// the last call, or with `unsynced` (sync mode) every sealed one.
    pub fn take_entries(&mut self, unsynced: bool) -> Vec<EntryMeta> {
        let upto = if unsynced {
            self.journal.last_seq()
        } else {
            self.journal.durable_seq()
        };
        if upto <= self.reported {
            return Vec::new();
        }
        let from = std::mem::replace(&mut self.reported, upto);
        self.journal
            .retained_between(from, upto)
            .map(|e| self.entry_meta(e))
            .collect()
    }

    /// The largest entry (bytes of block data) this volume's journal takes from a peer:
    /// a quarter of the journal, like its own entries, less the descriptors.
    pub fn max_replicated_entry_bytes(&self) -> u64 {
        let bs = self.bs as u64;
        let quarter = self.journal.capacity_for_entries() / 4;
        let blocks = quarter.saturating_sub(bs) / (bs + crate::journal::DESCRIPTOR_LEN as u64);
        blocks * bs
    }

    /// With a peer: seal entries before their blocks exceed `bytes` (the smaller of this
    /// build's limit and what the peer's journal takes).
    pub fn set_max_entry_wire_bytes(&mut self, bytes: u64) {
        self.opts.max_entry_wire_bytes = bytes.max(self.bs as u64);
    }

    /// Journal bytes of the retained entries after `seq` (a taker's merged entries, kept
    /// for the stream back, after its drain point).
    pub fn retained_bytes_after(&self, seq: Seq) -> u64 {
        self.journal
            .retained_between(seq, Seq(u64::MAX))
            .map(|e| e.total_len)
            .sum()
    }

    /// The blocks written by retained entries up to `seq` (to mark them in the bitmap).
    pub fn retained_blocks(&self, seq: Seq) -> Result<Vec<BlockNo>, VolumeError> {
        self.retained_blocks_after(Seq::NONE, seq)
    }

    /// [`Volume::retained_blocks`] of the entries after `after` only.
    pub fn retained_blocks_after(&self, after: Seq, seq: Seq) -> Result<Vec<BlockNo>, VolumeError> {
        let mut out = Vec::new();
        for loc in self.journal.retained_between(after, seq) {
            out.extend(self.journal.read_blocks(loc)?);
        }
        Ok(out)
    }

    /// The header of retained entry `seq` (what it writes, not the data): what a primary
    /// sends ahead of the entry (docs/PROTOCOL.md §7.2).
    pub fn entry_header(&self, seq: Seq) -> Result<crate::takeover::EntryHeader, VolumeError> {
        let loc = self
            .journal
            .find(seq)
            .ok_or(VolumeError::EntryGone { seq })?;
        let blocks = self.journal.read_blocks(&loc)?;
        Ok(crate::takeover::EntryHeader {
            seq: loc.seq,
            prev_seq: loc.prev_seq,
            timestamp_ns: loc.timestamp_ns,
            bytes: blocks.len() as u64 * self.bs as u64,
            blocks,
        })
    }

    /// Reads a retained entry for sending: images from the journal, in-place blocks from
    /// the volume (or from what was saved aside), every block checked against the entry's
    /// checksum. `InPlaceChanged` means the entry cannot be sent faithfully any more.
    pub fn read_wire_entry(&self, seq: Seq) -> Result<WireEntry, VolumeError> {
        let loc = self
            .journal
            .find(seq)
            .ok_or(VolumeError::EntryGone { seq })?;
        let (info, mut images) = self.journal.read_entry_images(&loc)?;
        // Blocks written in place: from the copy saved aside, else from the normal area,
        // contiguous runs in one read each.
        let mut from_disk: Vec<(usize, BlockNo)> = Vec::new();
        for (i, (d, img)) in info.descriptors.iter().zip(images.iter_mut()).enumerate() {
            if img.is_none() {
                match self.evacuated.get(&(seq, d.block)) {
                    Some(saved) => *img = Some(saved.to_vec()),
                    None => from_disk.push((i, d.block)),
                }
            }
        }
        for run in block_runs(&from_disk, |&(_, b)| b, self.bs) {
            // Straight into each block's own buffer (no run-sized buffer to fault in and
            // copy out of).
            let mut bufs: Vec<Vec<u8>> = run.iter().map(|_| vec![0u8; self.bs]).collect();
            let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
            self.normal
                .read_vectored_at(&mut slices, run[0].1 * self.bs as u64)
                .map_err(VolumeError::io("reading data to send"))?;
            for (&(i, _), data) in run.iter().zip(bufs) {
                images[i] = Some(data);
            }
        }
        let mut blocks = Vec::with_capacity(info.descriptors.len());
        for (d, img) in info.descriptors.iter().zip(images) {
            // Every in-place block was filled above; were one not, it is as unreadable as
            // a changed one (the peer is then resynced by bitmap).
            let Some(data) = img else {
                return Err(VolumeError::InPlaceChanged {
                    seq,
                    block: d.block,
                });
            };
            if crc32c(&data) != d.crc {
                return Err(VolumeError::InPlaceChanged {
                    seq,
                    block: d.block,
                });
            }
            blocks.push(WireBlock {
                block: d.block,
                data,
                fresh: d.kind == DescriptorKind::InPlaceFresh,
            });
        }
        Ok(WireEntry {
            seq,
            prev_seq: info.prev_seq,
            timestamp_ns: info.timestamp_ns,
            blocks,
            frees: info.flags & FLAG_FREES != 0,
        })
    }

    /// Secondary: writes copy blocks straight into the volume (the replica is marked
    /// inconsistent until the copy ends, so they need no journal).
    pub fn write_copy_blocks(&mut self, blocks: &[WireBlock]) -> Result<(), VolumeError> {
        self.check_writable()?;
        if !self.copying {
            // Nothing older may be replayed over copied blocks after a crash.
            self.checkpoint()?;
            self.copying = true;
        }
        self.check_wire_blocks(blocks)?;
        for b in blocks {
            self.pending.remove(&b.block);
            self.cache.remove(b.block);
        }
        let direct: Vec<(BlockNo, &[u8])> = blocks.iter().map(|b| (b.block, &b.data[..])).collect();
        self.write_blocks(&direct, "writing copied blocks")?;
        self.wrote_normal();
        Ok(())
    }

    /// Secondary: takes the primary's volume identity before its first copy. Everything is
    /// checkpointed and released first, so no entry of the old identity remains.
    pub fn adopt_id(&mut self, id: VolumeId) -> Result<(), VolumeError> {
        self.check_writable()?;
        if id == self.id {
            return Ok(());
        }
        self.checkpoint()?;
        if !self.journal.retained().is_empty() {
            return Err(VolumeError::InvalidParams(
                "cannot change the volume identity while journal entries are retained".into(),
            ));
        }
        if let Err(e) = self.journal.update_header(|h| h.volume_id = id) {
            return self.poison(e.into());
        }
        self.id = id;
        Ok(())
    }

    /// Reads the current content of block `b` (newest image, else the volume) without
    /// caching it: what a copy sends.
    pub fn read_current(&self, b: BlockNo, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.check_block(b)?;
        if self.locate(b).is_some() {
            self.read_located(b, buf)?;
            return Ok(());
        }
        self.read_applied(b, buf)
    }

    /// Shares `flag`, true while this volume is taking over and its reads may wait for a
    /// block from the peer: a caller that holds the volume behind a lock must not let a
    /// writer queue on it meanwhile (docs/PROTOCOL.md §7.6).
    pub fn share_fetch_flag(&mut self, flag: Arc<AtomicBool>) {
        flag.store(self.taking.is_some(), std::sync::atomic::Ordering::Release);
        self.fetching = flag;
    }

    /// Reads block `b` as the journal and normal area hold it — the state after the newest
    /// seq applied here — ignoring a takeover's table: what a frozen old primary that takes
    /// over again serves its peer's fetches from (docs/PROTOCOL.md §7.6).
    pub fn read_applied(&self, b: BlockNo, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.check_block(b)?;
        if let Some(d) = self.newest_image(b) {
            buf.copy_from_slice(&d);
            return Ok(());
        }
        self.normal
            .read_at(buf, b * self.bs as u64)
            .map_err(VolumeError::io("reading a block to copy"))
    }

    /// Ranges of blocks ever written (holes of the sparse volume file are skipped): what
    /// an initial copy sends.
    pub fn written_ranges(&self) -> Result<Vec<(BlockNo, u64)>, VolumeError> {
        let bs = self.bs as u64;
        let ranges = self
            .normal
            .data_ranges()
            .map_err(VolumeError::io("listing written ranges"))?;
        let mut out: Vec<(BlockNo, u64)> = Vec::new();
        for (off, len) in ranges {
            let first = off / bs;
            let end = (off + len).div_ceil(bs).min(self.blocks);
            if end > first {
                out.push((first, end - first));
            }
        }
        // Blocks with images not yet checkpointed may lie in holes.
        let mut extra: Vec<BlockNo> = self
            .pending
            .keys()
            .chain(self.open.blocks.keys())
            .copied()
            .collect();
        extra.sort_unstable();
        extra.dedup();
        for b in extra {
            if !out.iter().any(|(s, n)| b >= *s && b < s + n) {
                out.push((b, 1));
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Data was written to the normal area that is not durable yet.
    fn wrote_normal(&mut self) {
        self.normal_dirty = true;
        self.inplace_writes += 1;
    }

    /// Whether the group commit is due at `now` (what [`Volume::maintain`] syncs for).
    pub fn commit_due(&self, now: Instant) -> bool {
        self.unsynced_since
            .is_some_and(|s| now.duration_since(s) >= self.opts.commit_interval)
    }

    /// Bytes of the open entry: committed, not yet sealed (nor sent to a peer).
    pub fn open_entry_bytes(&self) -> u64 {
        self.open.blocks.len() as u64 * self.bs as u64
    }

    /// Bytes of images held in memory (open entry + sealed, not checkpointed).
    pub fn dirty_bytes(&self) -> u64 {
        self.open.image_bytes + self.pending.len() as u64 * self.bs as u64
    }

    /// Seq of the newest durable checkpoint.
    pub fn checkpoint_seq(&self) -> Seq {
        self.checkpoint_seq
    }
}

/// Recovery (FORMAT.md §2.3): an entry flagged [`FLAG_DATA_UNSYNCED`] after the last
/// checkpoint was written before its in-place data was durable, so a crash may have kept
/// the entry and lost the data. Its in-place blocks are checked against their checksums —
/// except those a later kept entry names (a checkpoint may have written that entry's newer
/// image there). Returns how many entries to keep: all, or those before the first one whose
/// data is not on disk (that entry was never durable, nor any after it). The check repeats
/// on the kept prefix until it holds, since dropping entries can expose a block that a
/// dropped entry had covered.
fn entries_with_their_data(
    normal: &dyn BlockDevice,
    bs: usize,
    entries: &[EntryInfo],
    checkpoint_seq: Seq,
) -> Result<usize, VolumeError> {
    let mut keep = entries.len();
    let mut buf = vec![0u8; bs];
    loop {
        let mut named_later: HashMap<BlockNo, usize> = HashMap::new();
        for (i, e) in entries[..keep].iter().enumerate() {
            for d in &e.descriptors {
                named_later.insert(d.block, i);
            }
        }
        let mut first_bad = None;
        'entries: for (i, e) in entries[..keep].iter().enumerate() {
            if e.seq <= checkpoint_seq || e.flags & FLAG_DATA_UNSYNCED == 0 {
                continue;
            }
            for d in &e.descriptors {
                if d.kind == DescriptorKind::Image || named_later.get(&d.block) != Some(&i) {
                    continue;
                }
                normal
                    .read_at(&mut buf, d.block * bs as u64)
                    .map_err(VolumeError::io("checking data written in place"))?;
                if crc32c(&buf) != d.crc {
                    first_bad = Some(i);
                    break 'entries;
                }
            }
        }
        match first_bad {
            None => return Ok(keep),
            Some(i) => keep = i,
        }
    }
}

/// The flags of an entry that holds data written in place (`inplace`) and that frees
/// blocks (`frees`), FORMAT.md §2.2.
fn entry_flags(inplace: bool, frees: bool) -> u16 {
    (if inplace { FLAG_DATA_UNSYNCED } else { 0 }) | (if frees { FLAG_FREES } else { 0 })
}

/// Writes whole blocks into `dev`, each run of consecutive block numbers in one write (a
/// replicated entry or copy batch holds thousands of 4 KiB blocks).
fn write_runs(
    dev: &dyn BlockDevice,
    bs: usize,
    blocks: &[(BlockNo, &[u8])],
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for run in block_runs(blocks, |&(b, _)| b, bs) {
        if let [(b, data)] = run {
            dev.write_at(data, b * bs as u64)?;
        } else {
            buf.clear();
            for (_, data) in run {
                buf.extend_from_slice(data);
            }
            dev.write_at(&buf, run[0].0 * bs as u64)?;
        }
    }
    Ok(())
}

/// Largest run [`block_runs`] makes, in bytes: bounds the staging buffer of one I/O.
const MAX_RUN_BYTES: usize = 8 << 20;

/// Splits `items` into runs whose block numbers (`block(item)`) follow each other, each at
/// most [`MAX_RUN_BYTES`] of `bs`-byte blocks, so that every run is one contiguous I/O.
fn block_runs<T>(
    items: &[T],
    block: impl Fn(&T) -> BlockNo,
    bs: usize,
) -> impl Iterator<Item = &[T]> {
    let max = (MAX_RUN_BYTES / bs.max(1)).max(1);
    let mut rest = items;
    std::iter::from_fn(move || {
        let first = block(rest.first()?);
        let mut n = 1;
        while n < rest.len() && n < max && block(&rest[n]).checked_sub(first) == Some(n as u64) {
            n += 1;
        }
        let (run, tail) = rest.split_at(n);
        rest = tail;
        Some(run)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::crash::CrashDevice;
    use crate::device::MemDevice;

    const BS: usize = 4096;

    struct Devs {
        normal: Arc<CrashDevice>,
        journal: Arc<CrashDevice>,
    }

    fn devs(blocks: u64, jblocks: u64) -> Devs {
        let normal = Arc::new(CrashDevice::new(blocks * BS as u64));
        let journal = Arc::new(CrashDevice::new(jblocks * BS as u64));
        Volume::create(&*normal, &*journal, VolumeId([1; 16]), BS as u32).unwrap();
        Devs { normal, journal }
    }

    fn open(d: &Devs, opts: VolumeOptions) -> Volume {
        Volume::open(
            Box::new(d.normal.clone()),
            Box::new(d.journal.clone()),
            opts,
        )
        .unwrap()
    }

    fn blk(v: u8) -> Arc<[u8]> {
        Arc::from(vec![v; BS])
    }

    fn crash_open(d: &Devs) -> Volume {
        let n = MemDevice::from_bytes(d.normal.crash_point().durable_image());
        let j = MemDevice::from_bytes(d.journal.crash_point().durable_image());
        Volume::open(Box::new(n), Box::new(j), VolumeOptions::default()).unwrap()
    }

    #[test]
    fn committed_and_synced_survives_crash_unsynced_does_not() {
        let d = devs(64, 64);
        let mut v = open(&d, VolumeOptions::default());
        let mut tx = Transaction::new();
        tx.write_meta(3, blk(3));
        tx.write_meta(4, blk(4));
        v.commit(tx).unwrap();
        v.sync().unwrap();
        let mut tx = Transaction::new();
        tx.write_meta(3, blk(33));
        v.commit(tx).unwrap();
        assert_eq!(
            v.read_block(3).unwrap()[0],
            33,
            "reads see uncommitted-to-disk writes"
        );
        let r = crash_open(&d);
        assert_eq!(r.read_block(3).unwrap()[0], 3);
        assert_eq!(r.read_block(4).unwrap()[0], 4);
        assert_eq!(r.recovery().entries_replayed, 1);
    }

    #[test]
    fn checkpoint_writes_images_and_frees_the_journal() {
        let d = devs(64, 32);
        let mut v = open(&d, VolumeOptions::default());
        for round in 0..50u8 {
            let mut tx = Transaction::new();
            for b in 10..14 {
                tx.write_meta(b, blk(round));
            }
            v.commit(tx).unwrap();
            v.sync().unwrap();
            v.maintain(Instant::now()).unwrap();
        }
        v.close().unwrap();
        assert!(v.stats().checkpoints > 0);
        let mut buf = vec![0u8; BS];
        d.normal.read_at(&mut buf, 12 * BS as u64).unwrap();
        assert_eq!(buf[0], 49);
        let r = crash_open(&d);
        assert_eq!(r.read_block(13).unwrap()[0], 49);
        assert_eq!(r.recovery().entries_replayed, 0);
        assert!(!r.recovery().unclean);
    }

    #[test]
    fn bulk_data_goes_in_place_and_small_data_is_journaled() {
        let d = devs(256, 64);
        let opts = VolumeOptions {
            inplace_min_blocks: 4,
            ..VolumeOptions::default()
        };
        let mut v = open(&d, opts);
        let mut tx = Transaction::new();
        for b in 100..108 {
            tx.write_data(b, vec![b as u8; BS], true);
        }
        tx.write_meta(5, blk(5));
        v.commit(tx).unwrap();
        let mut tx = Transaction::new();
        tx.write_data(120, vec![120; BS], true);
        v.commit(tx).unwrap();
        v.sync().unwrap();
        let s = v.stats();
        assert_eq!(s.inplace_bytes, 8 * BS as u64);
        assert_eq!(s.journal_image_bytes, 2 * BS as u64);
        let mut buf = vec![0u8; 9 * BS];
        v.read_data(100, &mut buf).unwrap();
        assert_eq!(buf[7 * BS], 107);
        let r = crash_open(&d);
        let mut buf = vec![0u8; BS];
        r.read_data(104, &mut buf).unwrap();
        assert_eq!(buf[0], 104, "in-place data durable with its entry");
        r.read_data(120, &mut buf).unwrap();
        assert_eq!(buf[0], 120);
    }

    /// A bulk transaction of 8 in-place blocks from `start`, each filled with `v`.
    fn bulk(v: &mut Volume, start: BlockNo, fill: u8) {
        let mut tx = Transaction::new();
        tx.write_data(start, vec![fill; 8 * BS], true);
        v.commit(tx).unwrap();
    }

    /// A volume with blocks 100..108 (filled with 7) written in place, not synced.
    fn with_unsynced_bulk() -> (Devs, Volume) {
        let d = devs(256, 64);
        let mut v = open(&d, VolumeOptions::default());
        bulk(&mut v, 100, 7);
        (d, v)
    }

    fn first_byte_after_crash(d: &Devs, b: BlockNo) -> u8 {
        let mut buf = vec![0u8; BS];
        crash_open(d).read_data(b, &mut buf).unwrap();
        buf[0]
    }

    /// Reopens the volume from what a `kill -9` leaves: everything written (the page
    /// cache survives), synced or not.
    fn kill_open(d: &Devs) -> Volume {
        let n = MemDevice::from_bytes(d.normal.written());
        let j = MemDevice::from_bytes(d.journal.written());
        Volume::open(Box::new(n), Box::new(j), VolumeOptions::default()).unwrap()
    }

    /// Reopens the volume from a power loss at this instant that kept the pending writes
    /// `keep` picks (per device, by sector index).
    fn power_loss_open(
        d: &Devs,
        keep_normal: impl FnMut(usize) -> bool,
        keep_journal: impl FnMut(usize) -> bool,
    ) -> Result<Volume, VolumeError> {
        let n = MemDevice::from_bytes(d.normal.crash_point().image_with(keep_normal));
        let j = MemDevice::from_bytes(d.journal.crash_point().image_with(keep_journal));
        Volume::open(Box::new(n), Box::new(j), VolumeOptions::default())
    }

    fn fill_of(v: &Volume, start: BlockNo, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n * BS];
        v.read_data(start, &mut buf).unwrap();
        buf.chunks(BS).map(|b| b[0]).collect()
    }

    /// The defect of issue 9: an overwrite of blocks a file already owns was written into
    /// the normal area at commit, before any entry recorded it; a `kill -9` then left the
    /// new data in a volume whose journal knew nothing of it (so a replica never got it).
    /// Now every state a crash leaves is exactly the state after the recovered prefix:
    /// every block in use holds what that prefix wrote.
    #[test]
    fn a_crash_during_overwrites_and_appends_leaves_exactly_the_state_after_a_prefix() {
        let d = devs(512, 512);
        let mut v = open(&d, VolumeOptions::default());
        let mut tx = Transaction::new();
        tx.write_data(100, vec![1; 32 * BS], true); // a new file: in place
        v.commit(tx).unwrap();
        v.checkpoint().unwrap();
        // The blocks in use and their first byte after each entry.
        let mut model: BTreeMap<BlockNo, u8> = (100..132).map(|b| (b, 1)).collect();
        let mut states = vec![(v.journal().last_seq(), model.clone())];
        for fill in 2..12u8 {
            let mut tx = Transaction::new();
            tx.write_data(100, vec![fill; 32 * BS], false); // an overwrite: journaled
            let end = 200 + 8 * u64::from(fill);
            tx.write_data(end, vec![fill; 8 * BS], true); // an append: in place
            v.commit(tx).unwrap();
            model.extend((100..132).chain(end..end + 8).map(|b| (b, fill)));
            match fill % 3 {
                0 => v.sync().unwrap(),
                1 => v.seal().unwrap(), // written, not synced
                _ => continue,          // merged with the next one
            }
            states.push((v.journal().last_seq(), model.clone()));
            if fill == 10 {
                v.checkpoint().unwrap();
            }
        }
        // The last transaction (11, right after a checkpoint) is committed, not yet in any
        // entry.
        let check = |r: &Volume, what: &str| {
            let last = r.journal().last_seq();
            let (_, want) = states
                .iter()
                .find(|(s, _)| *s == last)
                .unwrap_or_else(|| panic!("{what}: recovered to seq {last}, which is no state"));
            for (&b, &fill) in want {
                assert_eq!(
                    fill_of(r, b, 1),
                    vec![fill],
                    "{what}: block {b} at seq {last}"
                );
            }
        };
        check(&kill_open(&d), "kill -9");
        for seed in 0..60u64 {
            let mut x = seed;
            let mut coin = move |_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                x >> 63 == 1
            };
            let mut y = !seed;
            let coin2 = move |_| {
                y = y
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                y >> 63 == 1
            };
            let p = power_loss_open(&d, &mut coin, coin2).unwrap();
            check(&p, &format!("power loss, seed {seed}"));
        }
    }

    /// FORMAT.md §2.3: an entry may be written before the data it holds in place is
    /// durable; a crash that kept the entry and lost the data must drop the entry (it was
    /// never durable), never replay it over garbage.
    #[test]
    fn an_entry_whose_data_never_reached_the_disk_is_dropped() {
        let (d, mut v) = with_unsynced_bulk();
        let before = v.journal().last_seq();
        v.seal().unwrap(); // written to the journal, nothing synced
        assert_eq!(v.stats().normal_syncs, 0, "sealing syncs nothing");
        let lost = power_loss_open(&d, |_| false, |_| true).unwrap();
        assert_eq!(lost.recovery().entries_dropped, 1);
        assert_eq!(lost.journal().last_seq(), before);
        assert_eq!(fill_of(&lost, 100, 8), vec![0; 8]);
        let kept = power_loss_open(&d, |_| true, |_| true).unwrap();
        assert_eq!(kept.recovery().entries_dropped, 0);
        assert_eq!(fill_of(&kept, 100, 8), vec![7; 8]);
    }

    /// The same loss in an entry that a later one proves durable is damage, not a torn
    /// write: the open fails rather than drop committed transactions.
    #[test]
    fn lost_data_of_an_entry_proven_durable_refuses_the_open() {
        let (d, mut v) = with_unsynced_bulk();
        v.sync().unwrap();
        let mut tx = Transaction::new();
        tx.write_meta(5, blk(5));
        v.commit(tx).unwrap();
        v.sync().unwrap(); // this entry records that the first one was durable
        d.normal.write_at(&[0xee; 16], 103 * BS as u64).unwrap();
        d.normal.sync().unwrap();
        let r = power_loss_open(&d, |_| false, |_| false);
        assert!(
            matches!(
                r,
                Err(VolumeError::Journal(
                    crate::error::JournalError::Corrupt { .. }
                ))
            ),
            "{r:?}"
        );
    }

    /// A block written in place since the last checkpoint is journaled when it is written
    /// again (freed and allocated anew), so that recovery can still check the first entry.
    #[test]
    fn a_block_written_in_place_since_the_checkpoint_is_journaled_when_written_again() {
        let (_d, mut v) = with_unsynced_bulk();
        v.sync().unwrap();
        let inplace = v.stats().inplace_bytes;
        bulk(&mut v, 100, 8);
        v.sync().unwrap();
        assert_eq!(v.stats().inplace_bytes, inplace, "written in place again");
        v.checkpoint().unwrap();
        bulk(&mut v, 100, 9);
        assert_eq!(v.stats().inplace_bytes, 2 * inplace);
        assert_eq!(fill_of(&v, 100, 8), vec![9; 8]);
    }

    /// A checkpoint writes the newest image of a block over what an earlier entry wrote in
    /// place; a crash before its header write must keep both entries (the later image is
    /// replayed), not mistake the first one for torn.
    #[test]
    fn a_checkpoint_cut_short_keeps_an_entry_whose_block_a_later_image_covers() {
        let (d, mut v) = with_unsynced_bulk();
        let mut tx = Transaction::new();
        tx.write_data(100, vec![8; 8 * BS], false); // overwrite: images
        v.commit(tx).unwrap();
        v.sync().unwrap();
        let last = v.journal().last_seq();
        let at_checkpoint = Arc::new(Mutex::new(None));
        {
            let (n, j, at) = (
                Arc::downgrade(&d.normal),
                Arc::downgrade(&d.journal),
                at_checkpoint.clone(),
            );
            d.normal.set_sync_hook(move || {
                if let (Some(n), Some(j)) = (n.upgrade(), j.upgrade()) {
                    let mut at = at.lock().unwrap();
                    if at.is_none() {
                        *at = Some((n.crash_point(), j.crash_point()));
                    }
                }
            });
        }
        v.checkpoint().unwrap();
        let (n, j) = at_checkpoint
            .lock()
            .unwrap()
            .take()
            .expect("a normal-area sync");
        // The images reached the disk, the header recording the checkpoint did not.
        let r = Volume::open(
            Box::new(MemDevice::from_bytes(n.image_with(|_| true))),
            Box::new(MemDevice::from_bytes(j.durable_image())),
            VolumeOptions::default(),
        )
        .unwrap();
        assert_eq!(r.recovery().entries_dropped, 0);
        assert_eq!(r.journal().last_seq(), last);
        assert_eq!(fill_of(&r, 100, 8), vec![8; 8]);
    }

    #[test]
    fn after_a_flush_ahead_the_seal_does_not_sync_the_data_again() {
        let (d, mut v) = with_unsynced_bulk();
        let ahead = v.flush_ahead().expect("in-place data not durable");
        // (The lock is not held here in production.)
        v.flushed_ahead(ahead.run()).unwrap();
        assert!(v.flush_ahead().is_none(), "nothing left to flush");
        let before = v.stats().normal_syncs;
        v.sync().unwrap();
        assert_eq!(
            v.stats().normal_syncs,
            before,
            "the seal synced the data again"
        );
        assert_eq!(first_byte_after_crash(&d, 103), 7);
    }

    #[test]
    fn data_written_during_a_flush_ahead_is_synced_by_the_seal() {
        let (d, mut v) = with_unsynced_bulk();
        let done = v.flush_ahead().unwrap().run();
        bulk(&mut v, 120, 9); // a writer got the lock while the flush ran
        v.flushed_ahead(done).unwrap();
        v.sync().unwrap();
        assert_eq!(first_byte_after_crash(&d, 103), 7);
        assert_eq!(
            first_byte_after_crash(&d, 125),
            9,
            "an entry is durable but data it names is not"
        );
    }

    #[test]
    fn a_failed_flush_ahead_poisons_the_volume() {
        let (_d, mut v) = with_unsynced_bulk();
        let mark = v.flush_ahead().unwrap().marks().normal;
        let failed = Flushed {
            normal: Some((mark.unwrap(), Err(std::io::Error::other("EIO")))),
            lu: None,
        };
        let err = v.flushed_ahead(failed);
        assert!(matches!(err, Err(VolumeError::Io { .. })), "{err:?}");
        assert!(v.is_poisoned());
        let mut tx = Transaction::new();
        tx.write_meta(5, blk(5));
        assert!(v.commit(tx).is_err(), "a poisoned volume took a commit");
    }

    #[test]
    fn in_place_write_never_lands_under_a_pending_image() {
        let d = devs(256, 64);
        let opts = VolumeOptions {
            inplace_min_blocks: 2,
            ..VolumeOptions::default()
        };
        let mut v = open(&d, opts);
        let mut tx = Transaction::new();
        tx.write_data(50, vec![1; BS], true); // small: an image
        v.commit(tx).unwrap();
        v.sync().unwrap(); // sealed, durable, not checkpointed
        // Block 50 freed and allocated again (fresh) while its image is still pending.
        let mut tx = Transaction::new();
        tx.write_data(50, vec![2; 2 * BS], true);
        v.commit(tx).unwrap(); // bulk, but 50 has a pending image: journaled
        v.sync().unwrap();
        assert_eq!(v.stats().inplace_bytes, BS as u64, "only block 51 in place");
        let r = crash_open(&d);
        let mut buf = vec![0u8; 2 * BS];
        r.read_data(50, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 2));
    }

    #[test]
    fn io_error_poisons_until_reopen() {
        let d = devs(64, 64);
        let mut v = open(&d, VolumeOptions::default());
        d.journal.fail_from_now();
        let mut tx = Transaction::new();
        tx.write_meta(1, blk(1));
        v.commit(tx).unwrap();
        assert!(v.sync().is_err());
        let mut tx = Transaction::new();
        tx.write_meta(2, blk(2));
        assert!(matches!(v.commit(tx), Err(VolumeError::Poisoned)));
    }

    #[test]
    fn read_only_open_replays_in_memory_without_writing() {
        let d = devs(64, 64);
        let mut v = open(&d, VolumeOptions::default());
        let mut tx = Transaction::new();
        tx.write_meta(7, blk(7));
        v.commit(tx).unwrap();
        v.sync().unwrap();
        let n = Arc::new(MemDevice::from_bytes(
            d.normal.crash_point().durable_image(),
        ));
        let j = Arc::new(MemDevice::from_bytes(
            d.journal.crash_point().durable_image(),
        ));
        let before = (n.to_bytes(), j.to_bytes());
        let ro = Volume::open(
            Box::new(n.clone()),
            Box::new(j.clone()),
            VolumeOptions {
                read_only: true,
                ..VolumeOptions::default()
            },
        )
        .unwrap();
        assert_eq!(ro.read_block(7).unwrap()[0], 7);
        assert_eq!((n.to_bytes(), j.to_bytes()), before, "nothing written");
        let mut ro = ro;
        assert!(matches!(
            ro.commit(Transaction::new()),
            Err(VolumeError::ReadOnly)
        ));
    }

    #[test]
    fn full_journal_checkpoints_by_itself() {
        let d = devs(512, 24);
        let mut v = open(&d, VolumeOptions::default());
        for round in 0..40u64 {
            let mut tx = Transaction::new();
            for b in 0..6 {
                tx.write_meta(round * 6 + b, blk(round as u8));
            }
            v.commit(tx).unwrap();
            v.sync().unwrap();
        }
        assert!(v.stats().checkpoints > 0);
        let r = crash_open(&d);
        assert_eq!(r.read_block(39 * 6).unwrap()[0], 39);
        assert_eq!(r.read_block(0).unwrap()[0], 0);
        assert_eq!(r.read_block(6).unwrap()[0], 1);
    }

    fn retaining() -> VolumeOptions {
        VolumeOptions {
            retain: true,
            inplace_min_blocks: 2,
            ..VolumeOptions::default()
        }
    }

    /// A retaining volume whose entries may carry 5 blocks on the wire, after `n`
    /// transactions of 2 fresh blocks each (blocks 100, 102, …).
    fn two_block_writes_under_a_five_block_wire_limit(d: &Devs, n: u64) -> Volume {
        let opts = VolumeOptions {
            max_entry_wire_bytes: 5 * BS as u64,
            ..retaining()
        };
        let mut v = open(d, opts);
        for i in 0..n {
            let mut tx = Transaction::new();
            tx.write_data(100 + 2 * i, vec![1; 2 * BS], true);
            v.commit(tx).unwrap();
        }
        v
    }

    #[test]
    fn retained_entries_never_exceed_the_wire_limit() {
        let d = devs(256, 64);
        let mut v = two_block_writes_under_a_five_block_wire_limit(&d, 4);
        v.sync().unwrap();
        let metas = v.take_entries(false);
        let blocks: Vec<usize> = metas
            .iter()
            .map(|m| v.read_wire_entry(m.seq).unwrap().blocks.len())
            .collect();
        // Sealed before the third 2-block transaction would make 6 blocks.
        assert_eq!(blocks, vec![4, 4]);
        let mut tx = Transaction::new();
        tx.write_data(120, vec![1; 6 * BS], true);
        assert!(matches!(v.commit(tx), Err(VolumeError::InvalidParams(_))));
    }

    #[test]
    fn with_a_peer_an_entry_sealed_at_the_wire_limit_is_durable_at_once() {
        let d = devs(256, 64);
        let mut v = two_block_writes_under_a_five_block_wire_limit(&d, 3);
        // The third transaction sealed the first two into an entry, and synced it.
        let metas = v.take_entries(false);
        assert_eq!(metas.len(), 1);
        assert_eq!(v.journal().durable_seq(), metas[0].seq);
    }

    #[test]
    fn the_commit_interval_counts_from_the_oldest_change_not_yet_durable() {
        // Sustained writes seal an entry whenever it is full; the group commit must still
        // happen one interval after the first of them, not wait for a quiet moment.
        let d = devs(256, 64);
        let opts = VolumeOptions {
            max_entry_bytes: 4 * BS as u64,
            commit_interval: Duration::from_millis(200),
            ..VolumeOptions::default()
        };
        let mut v = open(&d, opts);
        let write = |v: &mut Volume, b: u64| {
            let mut tx = Transaction::new();
            tx.write_meta(b, blk(1));
            tx.write_meta(b + 1, blk(1));
            v.commit(tx).unwrap();
        };
        let start = v.journal().durable_seq();
        write(&mut v, 10);
        write(&mut v, 12); // full: sealed, not durable
        std::thread::sleep(Duration::from_millis(150));
        write(&mut v, 14); // a fresh open entry
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(v.journal().durable_seq(), start);
        assert!(v.maintain(Instant::now()).unwrap(), "no group commit");
        assert!(v.journal().durable_seq() > start);
        assert_eq!(v.journal().durable_seq(), v.journal().last_seq());
    }

    #[test]
    fn retained_entries_are_sent_with_their_data_even_after_overwrites() {
        let d = devs(256, 64);
        let mut v = open(&d, retaining());
        let mut tx = Transaction::new();
        tx.write_data(100, vec![1; 3 * BS], true); // bulk: in place
        tx.write_meta(5, blk(5));
        v.commit(tx).unwrap();
        v.sync().unwrap();
        let metas = v.take_entries(false);
        assert_eq!(metas.len(), 1);
        assert_eq!(metas[0].bytes, 4 * BS as u64);
        assert!(v.take_entries(false).is_empty(), "reported once");
        let seq = metas[0].seq;
        // Overwrite the in-place blocks before the entry was sent: saved aside first.
        let mut tx = Transaction::new();
        tx.write_data(100, vec![2; 3 * BS], false);
        v.commit(tx).unwrap();
        v.sync().unwrap();
        v.checkpoint().unwrap();
        let e = v.read_wire_entry(seq).unwrap();
        assert_eq!(e.blocks.len(), 4);
        for b in &e.blocks {
            let want = if b.block == 5 { 5 } else { 1 };
            assert!(b.data.iter().all(|&x| x == want), "block {}", b.block);
        }
        // Retained after checkpoint until released by the replication driver.
        assert!(v.journal().find(seq).is_some());
        v.set_release_limit(seq);
        v.checkpoint().unwrap();
        assert!(v.journal().find(seq).is_none());
        assert!(matches!(
            v.read_wire_entry(seq),
            Err(VolumeError::EntryGone { .. })
        ));
    }

    #[test]
    fn without_room_to_save_aside_the_entry_is_refused_not_sent_wrong() {
        let d = devs(256, 64);
        let mut v = open(
            &d,
            VolumeOptions {
                evacuation_limit: 0,
                ..retaining()
            },
        );
        let mut tx = Transaction::new();
        tx.write_data(100, vec![1; 2 * BS], true);
        v.commit(tx).unwrap();
        v.sync().unwrap();
        let seq = v.take_entries(false)[0].seq;
        let mut tx = Transaction::new();
        tx.write_data(100, vec![2; 2 * BS], false);
        v.commit(tx).unwrap();
        v.checkpoint().unwrap(); // the overwrite reaches the normal area
        assert!(matches!(
            v.read_wire_entry(seq),
            Err(VolumeError::InPlaceChanged { .. })
        ));
    }

    #[test]
    fn retained_entries_survive_a_crash_of_the_primary() {
        let d = devs(256, 64);
        let mut v = open(&d, retaining());
        let mut tx = Transaction::new();
        tx.write_meta(9, blk(9));
        v.commit(tx).unwrap();
        v.sync().unwrap();
        v.checkpoint().unwrap();
        let n = MemDevice::from_bytes(d.normal.crash_point().durable_image());
        let j = MemDevice::from_bytes(d.journal.crash_point().durable_image());
        let r = Volume::open(Box::new(n), Box::new(j), retaining()).unwrap();
        let kept = r.retained_entries();
        assert_eq!(kept.len(), 1);
        assert_eq!(r.read_wire_entry(kept[0].seq).unwrap().blocks[0].data[0], 9);
    }

    #[test]
    fn secondary_applies_in_order_with_the_primarys_seqs_durably() {
        let d = devs(256, 64);
        let mut v = open(&d, VolumeOptions::default());
        let e1 = WireEntry {
            seq: Seq(10),
            prev_seq: Seq::NONE,
            timestamp_ns: 1,
            blocks: vec![WireBlock {
                block: 3,
                data: vec![3; BS],
                fresh: false,
            }],
            frees: false,
        };
        v.apply_replicated(&e1).unwrap();
        assert_eq!(v.read_block(3).unwrap()[0], 3, "applied: visible at once");
        assert_eq!(
            crash_open(&d).journal().last_seq(),
            Seq::NONE,
            "not durable before a sync"
        );
        v.sync().unwrap();
        assert_eq!(crash_open(&d).journal().last_seq(), Seq(10));
        let stale = WireEntry {
            seq: Seq(10),
            ..e1.clone()
        };
        assert!(v.apply_replicated(&stale).is_err(), "seqs only go forward");
        // A copy, then the entry that ends it.
        v.write_copy_blocks(&[WireBlock {
            block: 3,
            data: vec![7; BS],
            fresh: false,
        }])
        .unwrap();
        v.apply_replicated(&WireEntry {
            seq: Seq(20),
            prev_seq: Seq(10),
            timestamp_ns: 2,
            blocks: vec![],
            frees: false,
        })
        .unwrap();
        v.sync().unwrap();
        let r = crash_open(&d);
        assert_eq!(r.journal().last_seq(), Seq(20));
        assert_eq!(
            r.read_block(3).unwrap()[0],
            7,
            "nothing older replayed over the copy"
        );
    }

    #[test]
    fn a_replicated_entry_naming_a_block_twice_is_refused_and_changes_nothing() {
        let d = devs(256, 64);
        let mut v = open(&d, VolumeOptions::default());
        // Fresh blocks: they would be written in place before the entry is journaled.
        let block = |n: u64, fill: u8| WireBlock {
            block: n,
            data: vec![fill; BS],
            fresh: true,
        };
        let entry = |seq: u64, blocks: Vec<WireBlock>| WireEntry {
            seq: Seq(seq),
            prev_seq: Seq::NONE,
            timestamp_ns: 1,
            blocks,
            frees: false,
        };
        for (why, blocks) in [
            ("twice", vec![block(3, 1), block(5, 1), block(3, 2)]),
            ("out of order", vec![block(5, 1), block(3, 1)]),
            ("outside the volume", vec![block(3, 1), block(256, 1)]),
        ] {
            let err = v.apply_replicated(&entry(10, blocks)).unwrap_err();
            assert!(
                matches!(
                    err,
                    VolumeError::InvalidParams(_) | VolumeError::OutOfRange { .. }
                ),
                "{why}: {err:?}"
            );
            assert_eq!(v.read_block(3).unwrap()[0], 0, "{why}: nothing applied");
            assert_eq!(
                v.journal().last_seq(),
                Seq::NONE,
                "{why}: nothing journaled"
            );
        }
        // Refused as data, not as an I/O failure: the volume goes on.
        v.apply_replicated(&entry(10, vec![block(3, 4)])).unwrap();
        assert_eq!(v.read_block(3).unwrap()[0], 4);
    }

    #[test]
    fn an_apply_in_three_steps_journals_after_the_in_place_write_and_refuses_a_volume_changed_between()
     {
        let d = devs(256, 64);
        let mut v = open(&d, VolumeOptions::default());
        let entry = |seq: u64, fill: u8| WireEntry {
            seq: Seq(seq),
            prev_seq: Seq::NONE,
            timestamp_ns: 1,
            blocks: vec![
                WireBlock {
                    block: 3,
                    data: vec![fill; BS],
                    fresh: false,
                },
                WireBlock {
                    block: 20,
                    data: vec![fill; BS],
                    fresh: true,
                },
            ],
            frees: false,
        };
        let e = entry(10, 1);
        let plan = v.plan_apply(&e).unwrap();
        assert_eq!(plan.inplace_bytes(), BS as u64, "only the fresh block");
        assert_eq!(v.journal().last_seq(), Seq::NONE, "nothing journaled yet");
        let written = plan.write(&e);
        assert_eq!(
            v.read_block(3).unwrap()[0],
            0,
            "not applied before the finish"
        );
        v.finish_apply(&e, plan, written).unwrap();
        assert_eq!(v.read_block(3).unwrap()[0], 1);
        assert_eq!(v.read_block(20).unwrap()[0], 1);
        v.sync().unwrap();
        assert_eq!(crash_open(&d).read_block(20).unwrap()[0], 1);
        // Another entry applied between a plan and its finish: the finish refuses and the
        // volume stops (its in-place writes may have overlapped the other's).
        let e = entry(11, 2);
        let plan = v.plan_apply(&e).unwrap();
        let written = plan.write(&e);
        v.apply_replicated(&entry(12, 3)).unwrap();
        assert!(v.finish_apply(&e, plan, written).is_err());
        assert!(matches!(
            v.apply_replicated(&entry(13, 4)),
            Err(VolumeError::Poisoned)
        ));
        // A failed in-place write is an I/O failure of the apply.
        let mut v = open(&devs(256, 64), VolumeOptions::default());
        let e = entry(10, 1);
        let plan = v.plan_apply(&e).unwrap();
        let r = v.finish_apply(&e, plan, Err(std::io::Error::other("EIO")));
        assert!(matches!(r, Err(VolumeError::Io { .. })), "{r:?}");
        assert_eq!(v.journal().last_seq(), Seq::NONE);
    }

    #[test]
    fn written_ranges_skip_holes() {
        let path = std::env::temp_dir().join(format!("pairfs-ranges-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let jpath = path.with_extension("j");
        let _ = std::fs::remove_file(&jpath);
        let n = crate::device::FileDevice::create(&path, 1 << 26).unwrap();
        let j = crate::device::FileDevice::create(&jpath, 1 << 20).unwrap();
        Volume::create(&n, &j, VolumeId([1; 16]), BS as u32).unwrap();
        n.write_at(&[1; BS], 4096 * 1000).unwrap();
        let v = Volume::open(Box::new(n), Box::new(j), VolumeOptions::default()).unwrap();
        let r = v.written_ranges().unwrap();
        assert!(r.iter().any(|(s, n)| *s <= 1000 && 1000 < s + n), "{r:?}");
        let total: u64 = r.iter().map(|(_, n)| n).sum();
        assert!(total < 1000, "holes are skipped: {r:?}");
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&jpath).unwrap();
    }
}
