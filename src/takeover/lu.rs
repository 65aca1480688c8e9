//! The local-unreflected area (FORMAT.md §5.1; JP 2003-402994 ¶0071–0074, ¶0092–0098).
//!
//! A node that serves the filesystem before it holds the whole chain of seqs (a taker
//! while the old primary's backlog drains) writes its transactions here, as entries of a
//! second journal, instead of into its journal and normal area: the normal area stays
//! exactly the old primary's prefix. Reads of the blocks written here come from here
//! ([`LuArea::read`]); once the node has applied the seq the area's oldest entry follows,
//! the entries are merged oldest first ([`LuArea::oldest`], [`LuArea::wire_entry`]) and
//! released once the journal holds them durably ([`LuArea::release_through`]).
//!
//! Every block is an image (nothing in place). The index — per block the newest seq that
//! writes it here and where its image is — is rebuilt from the entries at open.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::behind::{Behind, LuFlush, Writer};
use crate::device::BlockDevice;
use crate::error::JournalError;
use crate::journal::{EntryBlock, EntryInfo, FLAG_FREES, Journal, JournalExpect, NewEntry};
use crate::repl::{WireBlock, WireEntry};
use crate::types::{BlockNo, Seq, VolumeId};

/// An append slower than this is logged (debug) with where its time went.
const SLOW_APPEND: std::time::Duration = std::time::Duration::from_millis(5);
/// Entries written behind the writers at most at once ([`LuArea::append_behind`]): what
/// memory holds of them beyond the open entry. A writer that would exceed it waits for the
/// oldest.
const MAX_BEHIND: usize = 2;

/// The local-unreflected area of one node.
pub struct LuArea {
    journal: Journal,
    /// The journal's device, shared: synced without the volume's lock
    /// ([`LuArea::flush_ahead`]).
    dev: Arc<dyn BlockDevice>,
    /// The journal's write mark at the last [`LuArea::take_writeback`].
    writeback_mark: Option<u64>,
    /// Entries not released, oldest first, with their descriptors.
    entries: VecDeque<EntryInfo>,
    /// For every block written here: the newest seq and the index of its descriptor.
    newest: HashMap<BlockNo, (Seq, usize)>,
    /// Entries placed whose bytes are not known written yet, oldest first (served from
    /// here until then).
    behind: VecDeque<Arc<Behind>>,
    /// Writes them; `None` until the first is placed, or for good if entries are written
    /// by this area's next step instead ([`LuArea::write_behind_by_thread`]).
    writer: Option<Writer>,
    threaded: bool,
    bs: usize,
}

impl std::fmt::Debug for LuArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuArea")
            .field("entries", &self.entries.len())
            .field("blocks", &self.newest.len())
            .field("journal", &self.journal)
            .finish_non_exhaustive()
    }
}

/// The journal entry of one LU entry: every block an image.
fn lu_entry<'a>(
    seq: Seq,
    timestamp_ns: u64,
    n_tx: u32,
    frees: bool,
    blocks: &'a [(BlockNo, EntryBlock<'a>)],
) -> NewEntry<'a> {
    NewEntry {
        seq: Some(seq),
        timestamp_ns,
        n_tx,
        flags: if frees { FLAG_FREES } else { 0 },
        blocks,
    }
}

impl LuArea {
    /// Writes an empty area on `dev` (at `init`).
    pub fn format(
        dev: &dyn BlockDevice,
        volume_id: VolumeId,
        block_size: u32,
        normal_blocks: u64,
    ) -> Result<(), JournalError> {
        Journal::format(dev, volume_id, block_size, normal_blocks)
    }

    /// Opens the area and recovers its entries; those at or below `merged` (the journal
    /// already holds them durably) are released. Starts a writing session.
    pub fn open(
        dev: Box<dyn BlockDevice>,
        expect: JournalExpect,
        merged: Seq,
    ) -> Result<LuArea, JournalError> {
        let dev: Arc<dyn BlockDevice> = Arc::from(dev);
        let (journal, entries) = Journal::open(Box::new(dev.clone()), expect)?;
        let mut lu = LuArea {
            journal,
            dev,
            writeback_mark: None,
            entries: VecDeque::new(),
            newest: HashMap::new(),
            behind: VecDeque::new(),
            writer: None,
            threaded: true,
            bs: expect.block_size as usize,
        };
        for e in entries {
            lu.index(e);
        }
        lu.journal.begin_session()?;
        lu.release_through(merged)?;
        Ok(lu)
    }

    fn index(&mut self, e: EntryInfo) {
        for (i, d) in e.descriptors.iter().enumerate() {
            self.newest.insert(d.block, (e.seq, i));
        }
        self.entries.push_back(e);
    }

    /// Starts a stint after the freeze point `after`: the next entry follows it. The area
    /// must be empty (everything of an earlier stint merged).
    pub fn begin(&mut self, after: Seq) -> Result<(), JournalError> {
        self.journal.restart_after(after)
    }

    /// The seq the oldest entry here follows (the freeze point while nothing is merged),
    /// or `None` when empty.
    pub fn base(&self) -> Option<Seq> {
        self.entries.front().map(|e| e.prev_seq)
    }

    /// The newest seq written here (the freeze point right after [`LuArea::begin`]).
    pub fn last_seq(&self) -> Seq {
        self.journal.last_seq()
    }

    /// Appends one entry of images with this seq (above every seq here); durable at the
    /// next [`LuArea::sync`]. Fails with [`JournalError::Full`] when the area is full: the
    /// caller makes the writer wait for the merge.
    pub fn append(
        &mut self,
        seq: Seq,
        timestamp_ns: u64,
        n_tx: u32,
        frees: bool,
        blocks: &[(BlockNo, &[u8])],
    ) -> Result<(), JournalError> {
        self.check_block_sizes(blocks.iter().map(|(_, d)| d.len()))?;
        // Its write comes after theirs: the journal counts entries written in order.
        self.settle()?;
        let t0 = std::time::Instant::now();
        let mut sorted: Vec<(BlockNo, EntryBlock<'_>)> = blocks
            .iter()
            .map(|(b, d)| (*b, EntryBlock::Image(d)))
            .collect();
        sorted.sort_by_key(|(b, _)| *b);
        let reserved = self.reserve_for(seq)?;
        let t1 = std::time::Instant::now();
        let (_, info) =
            self.journal
                .append_with_info(&lu_entry(seq, timestamp_ns, n_tx, frees, &sorted))?;
        let t2 = std::time::Instant::now();
        self.index(info);
        let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
        if t0.elapsed() > SLOW_APPEND {
            tracing::debug!(
                blocks = blocks.len(),
                reserved,
                sort_and_reserve_ms = ms(t0, t1),
                write_ms = ms(t1, t2),
                index_ms = ms(t2, std::time::Instant::now()),
                "a slow local-unreflected entry"
            );
        }
        Ok(())
    }

    /// Appends one entry as [`LuArea::append`] does, but leaves its bytes to be written
    /// behind the caller (by the area's writer thread, or by its next step): its blocks
    /// are read from memory until then. At most [`MAX_BEHIND`] are under way; beyond, the
    /// caller writes or waits for the oldest. `blocks` are in increasing order.
    pub fn append_behind(
        &mut self,
        seq: Seq,
        timestamp_ns: u64,
        n_tx: u32,
        frees: bool,
        blocks: Vec<(BlockNo, Arc<[u8]>)>,
    ) -> Result<(), JournalError> {
        self.check_block_sizes(blocks.iter().map(|(_, d)| d.len()))?;
        self.reap()?;
        while self.behind.len() >= MAX_BEHIND {
            self.write_oldest()?;
        }
        self.reserve_for(seq)?;
        let refs: Vec<(BlockNo, EntryBlock<'_>)> = blocks
            .iter()
            .map(|(b, d)| (*b, EntryBlock::Image(d)))
            .collect();
        let (info, head) =
            self.journal
                .prepare_entry(&lu_entry(seq, timestamp_ns, n_tx, frees, &refs))?;
        drop(refs);
        let b = Behind::new(seq, info.offset, head, blocks);
        self.index(info);
        self.behind.push_back(b.clone());
        if self.threaded && self.writer.is_none() {
            match Writer::start(self.dev.clone()) {
                Ok(w) => self.writer = Some(w),
                // Then the area's next steps write them (and no thread is tried again).
                Err(e) => {
                    self.threaded = false;
                    tracing::warn!(error = %e, "no thread to write local-unreflected entries: writing them inline")
                }
            }
        }
        if let Some(w) = &self.writer {
            w.send(b);
        }
        Ok(())
    }

    /// Entries are written by this area's next step ([`LuArea::reap`], and everything that
    /// needs them on the device) instead of a thread: `false` makes the timing of the
    /// writes a function of the calls (the deterministic simulation's crash points).
    pub fn write_behind_by_thread(&mut self, threaded: bool) {
        self.threaded = threaded;
    }

    fn check_block_sizes(&self, mut lens: impl Iterator<Item = usize>) -> Result<(), JournalError> {
        if lens.any(|l| l != self.bs) {
            return Err(JournalError::Mismatch(format!(
                "an LU entry block is not {} bytes",
                self.bs
            )));
        }
        Ok(())
    }

    /// Raises the journal's seq reservation if `seq` needs it; whether it did.
    fn reserve_for(&mut self, seq: Seq) -> Result<bool, JournalError> {
        let needed = self.journal.needs_reservation(seq);
        if needed {
            self.journal.reserve(seq)?;
        }
        Ok(needed)
    }

    /// Counts the entries written behind that are done, oldest first, as written (the
    /// next sync makes them durable); fails if one of them failed. Without a writer
    /// thread, writes them first.
    pub fn reap(&mut self) -> Result<(), JournalError> {
        if self.writer.is_none() && !self.behind.is_empty() {
            return self.settle();
        }
        while let Some(b) = self.behind.front() {
            match b.outcome() {
                None => break,
                Some(Ok(())) => {
                    self.journal.entry_written(b.seq);
                    self.behind.pop_front();
                }
                Some(Err(e)) => {
                    return Err(JournalError::io("writing a local-unreflected entry")(e));
                }
            }
        }
        Ok(())
    }

    /// Writes the oldest entry written behind (or waits for the thread writing it).
    fn write_oldest(&mut self) -> Result<(), JournalError> {
        // (A failed one stays: its blocks are still read from memory.)
        if let Some(b) = self.behind.front().cloned() {
            b.write(&*self.dev)
                .map_err(JournalError::io("writing a local-unreflected entry"))?;
            self.journal.entry_written(b.seq);
            self.behind.pop_front();
        }
        Ok(())
    }

    /// Every entry placed is on the device (not necessarily durable) on return.
    pub fn settle(&mut self) -> Result<(), JournalError> {
        while !self.behind.is_empty() {
            self.write_oldest()?;
        }
        Ok(())
    }

    /// The seqs of the entries placed whose bytes are not known written yet (a kill
    /// before their write loses them, as it loses the open entry).
    pub fn unwritten(&self) -> Vec<Seq> {
        self.behind.iter().map(|b| b.seq).collect()
    }

    /// The entry written behind with this seq, if not known written yet.
    fn behind(&self, seq: Seq) -> Option<&Behind> {
        self.behind.iter().find(|b| b.seq == seq).map(|b| &**b)
    }

    /// Makes every entry appended durable.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.settle()?;
        self.journal.sync()
    }

    /// Entries written and not durable: the device, for a sync without the volume's lock,
    /// and a mark of the writes so far for [`LuArea::synced_ahead`].
    pub fn flush_ahead(&self) -> Option<LuFlush> {
        let mark = match self.journal.unsynced_mark() {
            Some(m) => m,
            None if !self.behind.is_empty() => self.journal.write_mark(),
            None => return None,
        };
        Some(LuFlush {
            dev: self.dev.clone(),
            // Each entry under way counts one write once reaped.
            mark: mark + self.behind.len() as u64,
            behind: self.behind.iter().cloned().collect(),
        })
    }

    /// The device, if entries were written since the last call and are not durable: for
    /// the caller to start their writeback without the volume's lock.
    pub fn take_writeback(&mut self) -> Option<Arc<dyn BlockDevice>> {
        let mark = self.journal.unsynced_mark()?;
        (self.writeback_mark.replace(mark) != Some(mark)).then(|| self.dev.clone())
    }

    /// The device `dev` was synced after the writes up to `mark`: see
    /// [`Journal::synced_ahead`]. A flush of another area's device (this one was replaced
    /// meanwhile) counts for nothing.
    pub fn synced_ahead(&mut self, dev: &Arc<dyn BlockDevice>, mark: u64) {
        if Arc::ptr_eq(dev, &self.dev) {
            // (A failed write is reported by the area's next step.)
            if self.reap().is_ok() {
                self.journal.synced_ahead(mark);
            }
        }
    }

    /// Newest seq durable here.
    pub fn durable_seq(&self) -> Seq {
        self.journal.durable_seq()
    }

    /// The newest seq that writes `block` here.
    pub fn newest(&self, block: BlockNo) -> Option<Seq> {
        self.newest.get(&block).map(|&(s, _)| s)
    }

    /// Reads the newest version of `block` written here into `buf`; `None` if the area does
    /// not hold the block.
    pub fn read(&self, block: BlockNo, buf: &mut [u8]) -> Result<Option<Seq>, JournalError> {
        let Some(&(seq, idx)) = self.newest.get(&block) else {
            return Ok(None);
        };
        if let Some(b) = self.behind(seq) {
            let (_, d) = b.blocks.get(idx).ok_or_else(|| {
                JournalError::Mismatch(format!("LU entry {seq} has no block {idx}"))
            })?;
            buf.copy_from_slice(d);
            return Ok(Some(seq));
        }
        let e = self.entry(seq).ok_or_else(|| {
            JournalError::Mismatch(format!("LU index names entry {seq}, which is not held"))
        })?;
        self.journal.read_image(e, idx, buf)?;
        Ok(Some(seq))
    }

    fn entry(&self, seq: Seq) -> Option<&EntryInfo> {
        let i = self.entries.partition_point(|e| e.seq < seq);
        self.entries.get(i).filter(|e| e.seq == seq)
    }

    /// The oldest entry not released: the next to merge.
    pub fn oldest(&self) -> Option<&EntryInfo> {
        self.entries.front()
    }

    /// The oldest entry with a seq above `seq`: the next to merge into a journal whose
    /// newest seq is `seq`.
    pub fn oldest_after(&self, seq: Seq) -> Option<&EntryInfo> {
        let i = self.entries.partition_point(|e| e.seq <= seq);
        self.entries.get(i)
    }

    /// The entry `seq` as the journal applies it (every block an image, none fresh).
    pub fn wire_entry(&self, seq: Seq) -> Result<WireEntry, JournalError> {
        if let (Some(b), Some(info)) = (self.behind(seq), self.entry(seq)) {
            return Ok(WireEntry {
                seq,
                prev_seq: info.prev_seq,
                timestamp_ns: info.timestamp_ns,
                blocks: b
                    .blocks
                    .iter()
                    .map(|(block, d)| WireBlock {
                        block: *block,
                        data: d.to_vec(),
                        fresh: false,
                    })
                    .collect(),
                frees: info.flags & FLAG_FREES != 0,
            });
        }
        let loc = self
            .journal
            .find(seq)
            .ok_or_else(|| JournalError::Mismatch(format!("LU entry {seq} is not held")))?;
        let (info, images) = self.journal.read_entry_images(&loc)?;
        let blocks = info
            .descriptors
            .iter()
            .zip(images)
            .map(|(d, img)| {
                img.map(|data| WireBlock {
                    block: d.block,
                    data,
                    fresh: false,
                })
                .ok_or_else(|| {
                    JournalError::Mismatch(format!(
                        "LU entry {seq}: block {} is not an image",
                        d.block
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(WireEntry {
            seq: info.seq,
            prev_seq: info.prev_seq,
            timestamp_ns: info.timestamp_ns,
            blocks,
            frees: info.flags & FLAG_FREES != 0,
        })
    }

    /// Entries up to `seq` are merged and durable in the journal: releases them (durable on
    /// return, so a crash does not merge them twice — merging twice would be harmless, but
    /// the area's room must be real).
    pub fn release_through(&mut self, seq: Seq) -> Result<(), JournalError> {
        if self.entries.front().is_none_or(|e| e.seq > seq) {
            return Ok(());
        }
        // No write may land in room that is free again.
        self.settle()?;
        while self.entries.front().is_some_and(|e| e.seq <= seq) {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            for d in e.descriptors {
                if self.newest.get(&d.block).is_some_and(|&(s, _)| s <= seq) {
                    self.newest.remove(&d.block);
                }
            }
        }
        self.journal.release_through(seq);
        self.journal.persist_tail(seq, false)
    }

    /// The headers of the entries held, oldest first (what a forced takeover exports and
    /// reports, docs/PROTOCOL.md §7.7).
    pub fn headers(&self) -> Vec<crate::takeover::EntryHeader> {
        let bs = self.bs as u64;
        self.entries
            .iter()
            .map(|e| crate::takeover::EntryHeader {
                seq: e.seq,
                prev_seq: e.prev_seq,
                timestamp_ns: e.timestamp_ns,
                bytes: e.descriptors.len() as u64 * bs,
                blocks: e.descriptors.iter().map(|d| d.block).collect(),
            })
            .collect()
    }

    /// Releases every entry (durable on return): what a forced takeover could not keep,
    /// once exported. The area is empty, ready for the next [`LuArea::begin`].
    pub fn discard(&mut self) -> Result<(), JournalError> {
        let last = self.journal.last_seq();
        self.release_through(last)
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Distinct blocks whose newest version is here.
    pub fn blocks(&self) -> usize {
        self.newest.len()
    }

    /// Bytes in use and total bytes for entries (for status and back-pressure).
    pub fn usage(&self) -> (u64, u64) {
        (
            self.journal.used_bytes(),
            self.journal.capacity_for_entries(),
        )
    }

    /// Whether an entry of `n_blocks` images would fit now (in one piece: room split by
    /// the end of the ring does not count as one).
    pub fn fits(&self, n_blocks: usize) -> bool {
        self.journal
            .fits(self.journal.entry_len(n_blocks, n_blocks))
    }

    /// Closes cleanly.
    pub fn close(&mut self) -> Result<(), JournalError> {
        self.sync()?;
        let merged = self.base().unwrap_or(self.journal.last_seq());
        self.journal.persist_tail(merged, true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::crash::CrashDevice;
    use crate::device::MemDevice;

    const BS: usize = 4096;

    fn expect() -> JournalExpect {
        JournalExpect {
            block_size: BS as u32,
            normal_blocks: 1000,
        }
    }

    fn block(fill: u8) -> Vec<u8> {
        vec![fill; BS]
    }

    fn fresh(len: u64) -> LuArea {
        let dev = MemDevice::new(len);
        LuArea::format(&dev, VolumeId::default(), BS as u32, 1000).unwrap();
        LuArea::open(Box::new(dev), expect(), Seq::NONE).unwrap()
    }

    #[test]
    fn reads_return_the_newest_version_written_and_entries_chain_from_the_freeze_point() {
        let mut lu = fresh(64 * BS as u64);
        lu.begin(Seq(40)).unwrap();
        assert_eq!(lu.last_seq(), Seq(40));
        lu.append(Seq(41), 1, 1, false, &[(7, &block(1)), (3, &block(2))])
            .unwrap();
        lu.append(Seq(42), 2, 1, true, &[(7, &block(3))]).unwrap();
        let mut buf = block(0);
        assert_eq!(lu.read(7, &mut buf).unwrap(), Some(Seq(42)));
        assert_eq!(buf, block(3));
        assert_eq!(lu.read(3, &mut buf).unwrap(), Some(Seq(41)));
        assert_eq!(buf, block(2));
        assert_eq!(lu.read(5, &mut buf).unwrap(), None);
        assert_eq!(lu.base(), Some(Seq(40)));
        let w = lu.wire_entry(Seq(41)).unwrap();
        assert_eq!((w.prev_seq, w.frees), (Seq(40), false));
        assert_eq!(
            w.blocks.iter().map(|b| b.block).collect::<Vec<_>>(),
            vec![3, 7],
            "blocks in order"
        );
        let w = lu.wire_entry(Seq(42)).unwrap();
        assert_eq!((w.prev_seq, w.frees), (Seq(41), true));
    }

    #[test]
    fn a_merged_entry_leaves_only_the_blocks_no_later_entry_rewrites() {
        let mut lu = fresh(64 * BS as u64);
        lu.begin(Seq(1)).unwrap();
        lu.append(Seq(2), 1, 1, false, &[(1, &block(1)), (2, &block(1))])
            .unwrap();
        lu.append(Seq(3), 1, 1, false, &[(2, &block(2))]).unwrap();
        lu.release_through(Seq(2)).unwrap();
        assert_eq!((lu.newest(1), lu.newest(2)), (None, Some(Seq(3))));
        assert_eq!(lu.base(), Some(Seq(2)));
        lu.release_through(Seq(3)).unwrap();
        assert!(lu.is_empty());
        assert_eq!(lu.base(), None);
        // A new stint starts after a later freeze point.
        lu.begin(Seq(10)).unwrap();
        lu.append(Seq(11), 1, 1, false, &[(4, &block(4))]).unwrap();
        assert_eq!(lu.base(), Some(Seq(10)));
    }

    #[test]
    fn a_full_area_refuses_the_entry_and_keeps_what_it_holds() {
        let mut lu = fresh(16 * BS as u64);
        lu.begin(Seq(0)).unwrap();
        let mut seq = 0;
        let err = loop {
            seq += 1;
            match lu.append(Seq(seq), 1, 1, false, &[(seq, &block(seq as u8))]) {
                Ok(()) => assert!(seq < 100),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, JournalError::Full { .. }), "{err}");
        assert!(!lu.fits(1));
        let mut buf = block(0);
        assert_eq!(lu.read(1, &mut buf).unwrap(), Some(Seq(1)));
        assert_eq!(buf, block(1));
        lu.release_through(Seq(3)).unwrap();
        assert!(lu.fits(1), "merged entries make room");
        lu.append(Seq(seq), 1, 1, false, &[(seq, &block(9))])
            .unwrap();
    }

    /// Free room split by the end of the ring (some after the head, some before the oldest
    /// entry) is no room for an entry larger than either part: `fits` says what `append`
    /// does (the LU seals its open entry at a sync, and a sync that found no room would stop
    /// the volume).
    #[test]
    fn room_split_at_the_end_of_the_ring_does_not_fit_an_entry_larger_than_either_part() {
        let mut lu = fresh(16 * BS as u64);
        lu.begin(Seq(0)).unwrap();
        let blocks = |n: u64, fill: u8| -> Vec<(u64, Vec<u8>)> {
            (0..n).map(|b| (b, block(fill))).collect()
        };
        let append = |lu: &mut LuArea, seq: u64, n: u64| {
            let bl = blocks(n, seq as u8);
            let list: Vec<(u64, &[u8])> = bl.iter().map(|(b, d)| (*b, &d[..])).collect();
            lu.append(Seq(seq), seq, 1, false, &list)
        };
        // Four entries of two images (three blocks each with the descriptor block) after
        // the header leave the ring's last three blocks free; merging the first frees three
        // at its start: six blocks free, three in a row at most.
        for seq in 1..=4 {
            append(&mut lu, seq, 2).unwrap();
        }
        lu.release_through(Seq(1)).unwrap();
        let (used, cap) = lu.usage();
        assert!(cap - used >= 6 * BS as u64, "{used} of {cap}");
        let mut n = 1;
        while lu.fits(n + 1) {
            n += 1;
        }
        // The largest entry `fits` admits is one `append` takes (it admitted five images,
        // six blocks, counting both parts together).
        assert!(n < 5, "fits admits {n} images");
        append(&mut lu, 5, n as u64).unwrap();
        assert!(!lu.fits(1) || append(&mut lu, 6, 1).is_ok());
    }

    #[test]
    fn restarting_a_stint_before_everything_is_merged_is_refused() {
        let mut lu = fresh(64 * BS as u64);
        lu.begin(Seq(5)).unwrap();
        lu.append(Seq(6), 1, 1, false, &[(1, &block(1))]).unwrap();
        assert!(lu.begin(Seq(9)).is_err());
        lu.release_through(Seq(6)).unwrap();
        assert!(
            lu.begin(Seq(4)).is_err(),
            "a freeze point below a seq written here"
        );
    }

    /// After a crash the area holds exactly the entries it made durable (and perhaps some
    /// written later), their index rebuilt; merged ones stay released.
    #[test]
    fn recovery_keeps_every_synced_entry_and_rebuilds_the_index() {
        for seed in 0..40u64 {
            let dev = Arc::new(CrashDevice::new(64 * BS as u64));
            LuArea::format(&*dev, VolumeId::default(), BS as u32, 1000).unwrap();
            let mut lu = LuArea::open(Box::new(dev.clone()), expect(), Seq::NONE).unwrap();
            lu.begin(Seq(100)).unwrap();
            for s in 101..=106u64 {
                lu.append(
                    Seq(s),
                    s,
                    1,
                    false,
                    &[(s % 3, &block(s as u8)), (50 + s, &block(1))],
                )
                .unwrap();
                if s == 103 {
                    lu.sync().unwrap();
                }
            }
            lu.release_through(Seq(101)).unwrap(); // merged (durable: a header write)
            lu.append(Seq(107), 107, 1, false, &[(2, &block(107))])
                .unwrap();
            let img = dev.crash_point().image(seed);
            // Opened without saying what was merged: the release of 101 was made durable.
            let lu =
                LuArea::open(Box::new(MemDevice::from_bytes(img)), expect(), Seq::NONE).unwrap();
            let last = lu.last_seq();
            assert!(
                last >= Seq(106),
                "seed {seed}: synced entries lost (last {last})"
            );
            assert_eq!(lu.base(), Some(Seq(101)), "seed {seed}");
            // The newest version of each block among the recovered entries.
            for b in 0..3u64 {
                let want = (102..=last.0).rev().find(|s| s % 3 == b);
                let mut buf = block(0);
                let got = lu.read(b, &mut buf).unwrap();
                assert_eq!(got.map(|s| s.0), want, "seed {seed} block {b}");
                if let Some(s) = want {
                    assert_eq!(buf, block(s as u8), "seed {seed} block {b}");
                }
            }
            assert_eq!(
                lu.newest(50 + 101),
                None,
                "seed {seed}: a merged entry came back"
            );
        }
    }

    /// A device whose writes wait while its gate is closed (a slow disk under the writer
    /// thread).
    struct Gated {
        dev: Arc<CrashDevice>,
        open: std::sync::Mutex<bool>,
        opened: std::sync::Condvar,
    }

    impl Gated {
        fn set(&self, open: bool) {
            *self.open.lock().unwrap() = open;
            self.opened.notify_all();
        }
        fn wait(&self) {
            let mut g = self.open.lock().unwrap();
            while !*g {
                g = self.opened.wait(g).unwrap();
            }
        }
    }

    impl BlockDevice for Gated {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.dev.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.wait();
            self.dev.write_at(buf, offset)
        }
        fn len(&self) -> std::io::Result<u64> {
            self.dev.len()
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.dev.set_len(len)
        }
        fn sync(&self) -> std::io::Result<()> {
            self.dev.sync()
        }
    }

    fn arcs(blocks: &[(u64, u8)]) -> Vec<(u64, Arc<[u8]>)> {
        blocks
            .iter()
            .map(|&(b, f)| (b, Arc::from(block(f))))
            .collect()
    }

    fn reopened(img: Vec<u8>) -> LuArea {
        LuArea::open(Box::new(MemDevice::from_bytes(img)), expect(), Seq::NONE).unwrap()
    }

    #[test]
    fn an_entry_written_behind_is_read_from_memory_until_written_and_durable_only_once_written() {
        let dev = Arc::new(CrashDevice::new(64 * BS as u64));
        LuArea::format(&*dev, VolumeId::default(), BS as u32, 1000).unwrap();
        let gated = Arc::new(Gated {
            dev: dev.clone(),
            open: std::sync::Mutex::new(true),
            opened: std::sync::Condvar::new(),
        });
        let mut lu = LuArea::open(Box::new(gated.clone()), expect(), Seq::NONE).unwrap();
        lu.begin(Seq(100)).unwrap();
        gated.set(false);
        lu.append_behind(Seq(101), 5, 2, true, arcs(&[(3, 1), (7, 2)]))
            .unwrap();
        // Not on the device yet: served from memory, indexed, not durable.
        let mut buf = block(0);
        assert_eq!(lu.read(7, &mut buf).unwrap(), Some(Seq(101)));
        assert_eq!(buf, block(2));
        let w = lu.wire_entry(Seq(101)).unwrap();
        assert_eq!((w.prev_seq, w.timestamp_ns, w.frees), (Seq(100), 5, true));
        assert_eq!(
            w.blocks
                .iter()
                .map(|b| (b.block, b.data[0]))
                .collect::<Vec<_>>(),
            vec![(3, 1), (7, 2)]
        );
        lu.reap().unwrap();
        assert_eq!(lu.last_seq(), Seq(101));
        assert_eq!(lu.durable_seq(), Seq(100));
        assert_eq!(
            reopened(dev.written()).last_seq(),
            Seq(100),
            "nothing written yet"
        );
        // The thread writes it once the disk lets it; a sync waits for that.
        gated.set(true);
        lu.sync().unwrap();
        assert_eq!(lu.durable_seq(), Seq(101));
        let back = reopened(dev.crash_point().durable_image());
        assert_eq!(back.last_seq(), Seq(101));
        assert_eq!(back.read(3, &mut buf).unwrap(), Some(Seq(101)));
        assert_eq!(buf, block(1));
        // An entry appended inline after one written behind follows it on the device.
        gated.set(false);
        lu.append_behind(Seq(102), 6, 1, false, arcs(&[(7, 3)]))
            .unwrap();
        gated.set(true);
        lu.append(Seq(103), 7, 1, false, &[(8, &block(4))]).unwrap();
        lu.sync().unwrap();
        let back = reopened(dev.crash_point().durable_image());
        assert_eq!(back.last_seq(), Seq(103));
        assert_eq!(back.read(7, &mut buf).unwrap(), Some(Seq(102)));
        assert_eq!(buf, block(3));
    }

    #[test]
    fn without_the_thread_an_entry_behind_reaches_the_device_at_the_areas_next_step() {
        let dev = Arc::new(CrashDevice::new(64 * BS as u64));
        LuArea::format(&*dev, VolumeId::default(), BS as u32, 1000).unwrap();
        let mut lu = LuArea::open(Box::new(dev.clone()), expect(), Seq::NONE).unwrap();
        lu.write_behind_by_thread(false);
        lu.begin(Seq(10)).unwrap();
        let before = dev.written();
        lu.append_behind(Seq(11), 1, 1, false, arcs(&[(1, 9)]))
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(dev.written() == before, "written before the next step");
        let mut buf = block(0);
        assert_eq!(lu.read(1, &mut buf).unwrap(), Some(Seq(11)));
        assert_eq!(buf, block(9));
        lu.reap().unwrap();
        assert_eq!(reopened(dev.written()).last_seq(), Seq(11));
        lu.sync().unwrap();
        assert_eq!(lu.durable_seq(), Seq(11));
    }

    #[test]
    fn a_failed_write_behind_is_reported_and_its_blocks_stay_readable() {
        let dev = Arc::new(CrashDevice::new(64 * BS as u64));
        LuArea::format(&*dev, VolumeId::default(), BS as u32, 1000).unwrap();
        let mut lu = LuArea::open(Box::new(dev.clone()), expect(), Seq::NONE).unwrap();
        lu.begin(Seq(10)).unwrap();
        dev.fail_from_now();
        lu.append_behind(Seq(11), 1, 1, false, arcs(&[(4, 5)]))
            .unwrap();
        let err = lu.sync().unwrap_err();
        assert!(matches!(err, JournalError::Io { .. }), "{err}");
        assert!(lu.reap().is_err(), "the failure is reported again");
        let mut buf = block(0);
        assert_eq!(lu.read(4, &mut buf).unwrap(), Some(Seq(11)));
        assert_eq!(buf, block(5));
        assert_eq!(lu.durable_seq(), Seq(10));
    }
}
