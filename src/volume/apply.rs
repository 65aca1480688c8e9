//! Applying a replicated entry (a secondary; a node taking over, draining the old
//! primary's backlog; a primary reconciling) in three steps, so that its largest part — the
//! blocks written in place, up to an entry's 32 MiB — can be written without the volume's
//! lock while the filesystem goes on serving:
//!
//! 1. [`Volume::plan_apply`] (under the lock) checks the entry and decides which of its
//!    blocks go in place: those free before the entry ([`WireBlock::fresh`]) that FORMAT.md
//!    §2.4 rule 2 lets be written there. It saves aside what a retained entry still needs
//!    of them and drops them from the cache.
//! 2. [`PlannedApply::write`] (no lock) writes them. No state of the volume references
//!    them: they are free in the applied state, so no reader asks for their content (a
//!    node taking over finds them `Peer` in its data-location table until the entry is
//!    applied, and fetches them), and a crash before the entry is in the journal leaves
//!    free blocks with other bytes.
//! 3. [`Volume::finish_apply`] (under the lock) appends the entry; from then on every read
//!    sees it.
//!
//! The contract between 1 and 3: nothing else applies or commits on the volume (the node's
//! driver is its only applier, and a node applying entries takes no writes into its
//! journal). `finish_apply` checks it and poisons the volume if it was broken.

use std::io;
use std::sync::Arc;

use super::{Volume, VolumeError, entry_flags, write_runs};
use crate::device::BlockDevice;
use crate::journal::{EntryBlock, NewEntry};
use crate::repl::{EntryMeta, WireBlock, WireEntry};
use crate::types::{BlockNo, Seq, crc32c};

/// An entry's apply between [`Volume::plan_apply`] and [`Volume::finish_apply`].
pub struct PlannedApply {
    seq: Seq,
    /// The journal's newest seq when planned: unchanged at the finish.
    last: Seq,
    /// The entry's blocks written in place: index in the entry, checksum of the data.
    inplace: Vec<(usize, u32)>,
    normal: Arc<dyn BlockDevice>,
    bs: usize,
}

impl PlannedApply {
    /// Writes the entry's in-place blocks into the normal area (no lock needed; see the
    /// module's doc). `e` is the entry planned.
    pub fn write(&self, e: &WireEntry) -> io::Result<()> {
        if e.seq != self.seq {
            return Err(io::Error::other(format!(
                "entry {} is not the one planned ({})",
                e.seq, self.seq
            )));
        }
        let direct: Vec<(BlockNo, &[u8])> = self
            .inplace
            .iter()
            .map(|&(i, _)| (e.blocks[i].block, e.blocks[i].data.as_slice()))
            .collect();
        write_runs(&*self.normal, self.bs, &direct)
    }

    /// Bytes [`PlannedApply::write`] writes.
    pub fn inplace_bytes(&self) -> u64 {
        (self.inplace.len() * self.bs) as u64
    }
}

impl Volume {
    /// Secondary: applies a replicated entry as one entry of this journal with the same
    /// seq (an entry without blocks only records the seq). On return it is applied — every
    /// read sees it — and written to the journal, not yet durable: the next [`Volume::sync`]
    /// (or group commit) makes it so. A malformed entry (a block outside the volume, of the
    /// wrong size, or named twice) is refused without writing anything. The same as
    /// [`Volume::plan_apply`], [`PlannedApply::write`] and [`Volume::finish_apply`] in a row.
    pub fn apply_replicated(&mut self, e: &WireEntry) -> Result<EntryMeta, VolumeError> {
        let plan = self.plan_apply(e)?;
        let written = plan.write(e);
        self.finish_apply(e, plan, written)
    }

    /// The first step of an apply (module doc): checks `e` and prepares its in-place
    /// writes. Nothing is applied yet; a refused entry changes nothing.
    pub fn plan_apply(&mut self, e: &WireEntry) -> Result<PlannedApply, VolumeError> {
        self.check_writable()?;
        self.seal()?;
        if e.seq <= self.journal.last_seq() {
            // Not an I/O problem: refuse without stopping the volume.
            return Err(crate::error::JournalError::SeqOrder {
                seq: e.seq,
                last: self.journal.last_seq(),
            }
            .into());
        }
        self.check_wire_blocks(&e.blocks)?;
        self.copying = false;
        if self.unsynced_frees && e.blocks.iter().any(|b| b.fresh) {
            // A fresh block may be one an entry applied here, not yet durable, freed: make
            // that entry durable before the block is overwritten in place.
            self.sync()?;
        }
        // Blocks that were free before this entry go straight to their place (written
        // once); the others, which the state before the entry still uses, go through the
        // journal so that the entry applies atomically.
        let mut inplace = Vec::new();
        for (i, b) in e.blocks.iter().enumerate() {
            if b.fresh && self.may_write_in_place(b.block) {
                self.evacuate(b.block)?;
                self.cache.remove(b.block);
                inplace.push((i, crc32c(&b.data)));
            }
        }
        Ok(PlannedApply {
            seq: e.seq,
            last: self.journal.last_seq(),
            inplace,
            normal: self.normal.clone(),
            bs: self.bs,
        })
    }

    /// The last step of an apply (module doc): with what [`PlannedApply::write`] returned,
    /// appends the entry. A failed write poisons the volume, as a failed apply does.
    pub fn finish_apply(
        &mut self,
        e: &WireEntry,
        plan: PlannedApply,
        written: io::Result<()>,
    ) -> Result<EntryMeta, VolumeError> {
        let op = "writing replicated data in place";
        if let Err(source) = written {
            return self.poison(VolumeError::Io { op, source });
        }
        self.check_writable()?;
        if plan.seq != e.seq || self.journal.last_seq() != plan.last || !self.open.blocks.is_empty()
        {
            // Something wrote between the plan and now: its writes and the in-place ones
            // may overlap. Nothing is known good any more.
            return self.poison(VolumeError::Io {
                op,
                source: io::Error::other(format!(
                    "the volume changed while entry {} was written in place",
                    e.seq
                )),
            });
        }
        if !plan.inplace.is_empty() {
            self.wrote_normal();
            self.stats.inplace_bytes += plan.inplace_bytes();
        }
        let mut is_inplace = vec![false; e.blocks.len()];
        for &(i, _) in &plan.inplace {
            is_inplace[i] = true;
            // A read between the plan and the write may have cached the block's old bytes.
            self.cache.remove(e.blocks[i].block);
        }
        let images: Vec<(BlockNo, Arc<[u8]>)> = e
            .blocks
            .iter()
            .zip(&is_inplace)
            .filter(|(_, inplace)| !**inplace)
            .map(|(b, _)| (b.block, Arc::from(b.data.as_slice())))
            .collect();
        let mut refs: Vec<(BlockNo, EntryBlock<'_>)> = images
            .iter()
            .map(|(b, d)| (*b, EntryBlock::Image(d)))
            .collect();
        refs.extend(
            plan.inplace
                .iter()
                .map(|&(i, crc)| (e.blocks[i].block, EntryBlock::InPlaceFresh(crc))),
        );
        refs.sort_unstable_by_key(|(b, _)| *b);
        let entry = NewEntry {
            seq: Some(e.seq),
            timestamp_ns: e.timestamp_ns,
            n_tx: 1,
            flags: entry_flags(!plan.inplace.is_empty(), e.frees),
            blocks: &refs,
        };
        let appended = self.append_entry(&entry);
        drop(refs);
        let loc = appended?;
        let seq = loc.seq;
        self.stats.entries += 1;
        self.stats.journal_image_bytes += (images.len() * self.bs) as u64;
        for (b, d) in images {
            self.pending.insert(b, d);
        }
        for &(i, _) in &plan.inplace {
            self.sealed_in_place(e.blocks[i].block, seq);
        }
        self.unsynced_frees |= e.frees;
        self.unsynced_since
            .get_or_insert_with(std::time::Instant::now);
        // Reported here, not again by `take_entries`.
        self.reported = self.reported.max(seq);
        self.applied_taking(seq);
        Ok(self.entry_meta(&loc))
    }

    /// Checks the blocks of a replicated entry or copy batch: inside the volume, one block
    /// each, and (for an entry) each block once, in increasing order.
    pub(super) fn check_wire_blocks(&self, blocks: &[WireBlock]) -> Result<(), VolumeError> {
        for (i, b) in blocks.iter().enumerate() {
            self.check_block(b.block)?;
            if b.data.len() != self.bs {
                return Err(VolumeError::InvalidParams(format!(
                    "replicated block {} has {} bytes, block size is {}",
                    b.block,
                    b.data.len(),
                    self.bs
                )));
            }
            if i > 0 && blocks[i - 1].block >= b.block {
                return Err(VolumeError::InvalidParams(format!(
                    "replicated entry names block {} twice or out of order",
                    b.block
                )));
            }
        }
        Ok(())
    }
}
