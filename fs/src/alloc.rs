//! Block and inode allocation (FORMAT.md §3.1, §3.5).
//!
//! The on-disk bitmaps are the truth after a crash; at mount they are loaded into memory
//! and from then on the in-memory copy decides. A bit is set in memory for a block that is
//! in use, reserved by the transaction being built, or *free-pending*: freed by a
//! transaction whose journal entry is not yet durable. A free-pending block returns to the
//! pool only when [`Allocator::release_durable`] sees its transaction durable, so an
//! in-place data write can never overwrite a block that a durable entry still references.

use std::collections::VecDeque;

use bitvec::prelude::*;
use pairfs::{BlockNo, TxId, Volume};

use crate::error::{FsError, FsResult};
use crate::format::Superblock;

/// See the module documentation.
pub(crate) struct Allocator {
    blocks: BitVec<u64, Lsb0>,
    inodes: BitVec<u64, Lsb0>,
    free_blocks: u64,
    free_inodes: u64,
    pending: VecDeque<(TxId, BlockNo, u64)>,
    pending_blocks: u64,
    cursor: BlockNo,
    data_start: BlockNo,
}

/// Loads `nbits` bits from consecutive bitmap blocks starting at `start`.
pub(crate) fn load_bitmap(
    vol: &Volume,
    start: BlockNo,
    nblocks: u64,
    nbits: u64,
) -> FsResult<BitVec<u64, Lsb0>> {
    let mut words: Vec<u64> = Vec::with_capacity((nblocks as usize * vol.block_size()) / 8);
    for i in 0..nblocks {
        let b = vol.read_block(start + i)?;
        words.extend(b.chunks_exact(8).map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        }));
    }
    let mut bv = BitVec::<u64, Lsb0>::from_vec(words);
    bv.truncate(nbits as usize);
    Ok(bv)
}

impl Allocator {
    /// Loads both bitmaps.
    pub(crate) fn load(vol: &Volume, sb: &Superblock) -> FsResult<Allocator> {
        let blocks = load_bitmap(vol, sb.bbm_start, sb.bbm_blocks, sb.total_blocks)?;
        let inodes = load_bitmap(vol, sb.ibm_start, sb.ibm_blocks, sb.inode_count)?;
        let a = Allocator {
            free_blocks: blocks.count_zeros() as u64,
            free_inodes: inodes.count_zeros() as u64,
            blocks,
            inodes,
            pending: VecDeque::new(),
            pending_blocks: 0,
            cursor: sb.data_start,
            data_start: sb.data_start,
        };
        a.check_metadata_in_use()?;
        Ok(a)
    }

    /// A replica's volume changed underneath: reloads just the bitmap blocks among
    /// `changed` (a whole reload is the size of the volume: 32 MiB of bitmap per TiB, for
    /// every applied entry). Free counts follow. A replica allocates nothing, so nothing is
    /// pending.
    pub(crate) fn reload_bitmap_blocks(
        &mut self,
        vol: &Volume,
        sb: &Superblock,
        changed: &[BlockNo],
    ) -> FsResult<()> {
        let bits_per_block = vol.block_size() * 8;
        for &b in changed {
            let (map, free, index) = if (sb.bbm_start..sb.bbm_start + sb.bbm_blocks).contains(&b) {
                (&mut self.blocks, &mut self.free_blocks, b - sb.bbm_start)
            } else if (sb.ibm_start..sb.ibm_start + sb.ibm_blocks).contains(&b) {
                (&mut self.inodes, &mut self.free_inodes, b - sb.ibm_start)
            } else {
                continue;
            };
            let start = (index as usize)
                .saturating_mul(bits_per_block)
                .min(map.len());
            let end = start.saturating_add(bits_per_block).min(map.len());
            let data = vol.read_block(b)?;
            let (was, now) = store_bits(map, start..end, &data);
            *free = (*free + now as u64).saturating_sub(was as u64);
        }
        self.check_metadata_in_use()
    }

    /// The metadata area (superblock to `data_start`) is always marked in use.
    fn check_metadata_in_use(&self) -> FsResult<()> {
        if !self.blocks[..self.data_start as usize].all() {
            return Err(FsError::corrupt(
                "block bitmap marks metadata blocks as free",
            ));
        }
        Ok(())
    }

    /// Blocks free now plus those that will be once their frees are durable.
    pub(crate) fn free_blocks(&self) -> u64 {
        self.free_blocks + self.pending_blocks
    }

    /// Free inode slots.
    pub(crate) fn free_inodes(&self) -> u64 {
        self.free_inodes
    }

    /// Blocks waiting for their frees to become durable.
    pub(crate) fn pending_blocks(&self) -> u64 {
        self.pending_blocks
    }

    /// Allocates up to `max` contiguous blocks, preferably starting at `goal`.
    pub(crate) fn alloc_run(&mut self, goal: BlockNo, max: u64) -> Option<(BlockNo, u64)> {
        if self.free_blocks == 0 || max == 0 {
            return None;
        }
        let total = self.blocks.len();
        let goal = if (goal as usize) < total && goal >= self.data_start {
            goal
        } else {
            self.cursor
        } as usize;
        let start = self.blocks[goal..]
            .first_zero()
            .map(|i| i + goal)
            .or_else(|| {
                self.blocks[self.data_start as usize..goal]
                    .first_zero()
                    .map(|i| i + self.data_start as usize)
            })?;
        // Only look as far as needed: the free region may span the whole volume.
        let window = total.min(start.saturating_add(max as usize));
        let len = self.blocks[start..window]
            .first_one()
            .unwrap_or(window - start) as u64;
        self.blocks[start..start + len as usize].fill(true);
        self.free_blocks -= len;
        self.cursor = start as u64 + len;
        if self.cursor as usize >= total {
            self.cursor = self.data_start;
        }
        Some((start as u64, len))
    }

    /// Gives back blocks reserved by a transaction that was abandoned.
    pub(crate) fn unreserve(&mut self, start: BlockNo, len: u64) {
        self.blocks[start as usize..(start + len) as usize].fill(false);
        self.free_blocks += len;
    }

    /// Records blocks freed by transaction `tx`: free-pending until `tx` is durable.
    pub(crate) fn free_pending(&mut self, tx: TxId, start: BlockNo, len: u64) {
        self.pending.push_back((tx, start, len));
        self.pending_blocks += len;
    }

    /// Returns to the pool the free-pending blocks of durable transactions.
    pub(crate) fn release_durable(&mut self, durable: TxId) {
        while let Some(&(tx, start, len)) = self.pending.front() {
            if tx > durable {
                break;
            }
            self.pending.pop_front();
            self.blocks[start as usize..(start + len) as usize].fill(false);
            self.free_blocks += len;
            self.pending_blocks -= len;
        }
    }

    /// Allocates an inode slot, preferably near `goal`.
    pub(crate) fn alloc_inode(&mut self, goal: u64) -> Option<u64> {
        if self.free_inodes == 0 {
            return None;
        }
        let g = (goal.saturating_sub(1) as usize).min(self.inodes.len());
        let idx = self.inodes[g..]
            .first_zero()
            .map(|i| i + g)
            .or_else(|| self.inodes[..g].first_zero())?;
        self.inodes.set(idx, true);
        self.free_inodes -= 1;
        Some(idx as u64 + 1)
    }

    /// Frees an inode slot (or gives back an abandoned reservation).
    pub(crate) fn free_inode(&mut self, ino: u64) {
        let idx = ino as usize - 1;
        if self.inodes[idx] {
            self.inodes.set(idx, false);
            self.free_inodes += 1;
        }
    }
}

/// Overwrites bits `range` of `map` with the first `range.len()` bits of `data` (a bitmap
/// block's image, least significant bit first) and returns how many of them were free
/// before and are free now. A word at a time when the range starts on a word, as a
/// bitmap block's range does (bitvec copies between stores of different widths bit by
/// bit: for every applied entry, a replica spent ~8 % of its CPU there).
fn store_bits(
    map: &mut BitVec<u64, Lsb0>,
    range: std::ops::Range<usize>,
    data: &[u8],
) -> (usize, usize) {
    let new = &data.view_bits::<Lsb0>()[..range.len()];
    let was = map[range.clone()].count_zeros();
    let now = new.count_zeros();
    if range.start % 64 != 0 {
        map[range].clone_from_bitslice(new);
        return (was, now);
    }
    let first = range.start / 64;
    let (full, rest) = (range.len() / 64, range.len() % 64);
    let word = |i: usize| {
        let mut a = [0u8; 8];
        let bytes = &data[i * 8..(i * 8 + 8).min(data.len())];
        a[..bytes.len()].copy_from_slice(bytes);
        u64::from_le_bytes(a)
    };
    let words = map.as_raw_mut_slice();
    for i in 0..full {
        words[first + i] = word(i);
    }
    if rest > 0 {
        let mask = (1u64 << rest) - 1;
        let w = &mut words[first + full];
        *w = (*w & !mask) | (word(full) & mask);
    }
    (was, now)
}

/// Sets or clears bits `start..start+len` in a bitmap block image whose first bit is
/// `first_bit`. Only the part of the range inside this block is touched.
pub(crate) fn set_bits(img: &mut [u8], first_bit: u64, start: u64, len: u64, value: bool) {
    let nbits = img.len() as u64 * 8;
    let lo = start.max(first_bit);
    let hi = (start + len).min(first_bit + nbits);
    let bits = img.view_bits_mut::<Lsb0>();
    if lo < hi {
        bits[(lo - first_bit) as usize..(hi - first_bit) as usize].fill(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_bits_equals_a_bit_by_bit_copy() {
        let data: Vec<u8> = (0..64u32).map(|i| (i * 37 + 11) as u8).collect();
        // Ranges on and off a word, whole words and a partial last word.
        for (len, start, n) in [
            (1024, 0, 512),
            (1024, 64, 300),
            (1024, 128, 1),
            (700, 3, 200),
        ] {
            let mut map = BitVec::<u64, Lsb0>::repeat(true, len);
            map.set(start + n, false); // a bit past the range: must stay
            let mut want = map.clone();
            want[start..start + n].clone_from_bitslice(&data.view_bits::<Lsb0>()[..n]);
            let (was, now) = store_bits(&mut map, start..start + n, &data);
            assert_eq!(map, want, "len {len} start {start} n {n}");
            assert_eq!(was, 0);
            assert_eq!(now, want[start..start + n].count_zeros());
            assert!(!map[start + n]);
        }
    }

    #[test]
    fn set_bits_is_lsb_first_and_clipped() {
        let mut img = [0u8; 4];
        set_bits(&mut img, 0, 3, 6, true);
        assert_eq!(img, [0b1111_1000, 0b0000_0001, 0, 0]);
        // A block holding bits 32..64: only bits 32..40 of the range 0..40 land in it.
        set_bits(&mut img, 32, 0, 40, true);
        assert_eq!(img, [0xff, 0b0000_0001, 0, 0]);
        set_bits(&mut img, 0, 8, 8, false);
        assert_eq!(img, [0xff, 0, 0, 0]);
        set_bits(&mut img, 0, 100, 8, true); // entirely outside
        assert_eq!(img, [0xff, 0, 0, 0]);
    }
}
