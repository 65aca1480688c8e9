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

use crate::device::BlockDevice;
use crate::error::JournalError;
use crate::journal::{EntryBlock, EntryInfo, FLAG_FREES, Journal, JournalExpect, NewEntry};
use crate::repl::{WireBlock, WireEntry};
use crate::types::{BlockNo, Seq, VolumeId};

/// An append slower than this is logged (debug) with where its time went.
const SLOW_APPEND: std::time::Duration = std::time::Duration::from_millis(5);

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
        if blocks.iter().any(|(_, d)| d.len() != self.bs) {
            return Err(JournalError::Mismatch(format!(
                "an LU entry block is not {} bytes",
                self.bs
            )));
        }
        let t0 = std::time::Instant::now();
        let mut sorted: Vec<(BlockNo, EntryBlock<'_>)> = blocks
            .iter()
            .map(|(b, d)| (*b, EntryBlock::Image(d)))
            .collect();
        sorted.sort_by_key(|(b, _)| *b);
        let reserved = self.journal.needs_reservation(seq);
        if reserved {
            self.journal.reserve(seq)?;
        }
        let t1 = std::time::Instant::now();
        let (_, info) = self.journal.append_with_info(&NewEntry {
            seq: Some(seq),
            timestamp_ns,
            n_tx,
            flags: if frees { FLAG_FREES } else { 0 },
            blocks: &sorted,
        })?;
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

    /// Makes every entry written durable.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.journal.sync()
    }

    /// Entries written and not durable: the device, for a sync without the volume's lock,
    /// and a mark of the writes so far for [`LuArea::synced_ahead`].
    pub fn flush_ahead(&self) -> Option<(Arc<dyn BlockDevice>, u64)> {
        self.journal
            .unsynced_mark()
            .map(|mark| (self.dev.clone(), mark))
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
            self.journal.synced_ahead(mark);
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
        self.journal.sync()?;
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
}
