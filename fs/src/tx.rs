//! Building one FS transaction: a staged view of the blocks an operation changes.
//!
//! An operation reads through its [`FsTx`] (staged images first, then the volume), stages
//! new images, reserves blocks and inodes from the allocator, and ends with
//! [`FsTx::finish`], which adds the bitmap updates and yields one [`Transaction`] for
//! [`Volume::commit`]. Dropping an unfinished `FsTx` (an error midway, e.g. ENOSPC) gives
//! back its reservations: nothing of the operation happened.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use pairfs::{BlockNo, Transaction, TxId, Volume};

use crate::alloc::{Allocator, set_bits};
use crate::error::{FsError, FsResult};
use crate::format::{INODE_SIZE, Inode, Superblock};

/// Read access to blocks.
pub(crate) trait BlockRead {
    /// Block size.
    fn bs(&self) -> usize;
    /// Reads a metadata block.
    fn read(&self, b: BlockNo) -> FsResult<Arc<[u8]>>;
}

/// Write access to metadata blocks, for structures like the B-tree.
pub(crate) trait BlockWrite: BlockRead {
    /// Stages a new image of a metadata block.
    fn write(&mut self, b: BlockNo, data: Vec<u8>);
    /// Allocates one metadata block near `goal`.
    fn alloc_meta(&mut self, goal: BlockNo) -> FsResult<BlockNo>;
    /// Frees one metadata block.
    fn free_meta(&mut self, b: BlockNo);
}

impl BlockRead for Volume {
    fn bs(&self) -> usize {
        self.block_size()
    }
    fn read(&self, b: BlockNo) -> FsResult<Arc<[u8]>> {
        Ok(self.read_block(b)?)
    }
}

/// See the module documentation.
pub(crate) struct FsTx<'a, 'd> {
    vol: &'a Volume,
    alloc: &'a mut Allocator,
    sb: &'a Superblock,
    meta: HashMap<BlockNo, Arc<[u8]>>,
    /// Data runs by first block (borrowed from the request where possible), and whether
    /// their blocks were free before this transaction.
    data: BTreeMap<BlockNo, (Cow<'d, [u8]>, bool)>,
    allocated: Vec<(BlockNo, u64)>,
    freed: Vec<(BlockNo, u64)>,
    inodes_allocated: Vec<u64>,
    inodes_freed: Vec<u64>,
    /// Metadata blocks allocated minus freed (for inode block counts).
    meta_delta: i64,
    done: bool,
}

/// What the caller must apply to the allocator once the transaction is committed.
pub(crate) struct Finished {
    freed: Vec<(BlockNo, u64)>,
    inodes_freed: Vec<u64>,
}

impl Finished {
    /// Applies the frees of committed transaction `tx`.
    pub(crate) fn apply(self, alloc: &mut Allocator, tx: TxId) {
        for (s, l) in self.freed {
            alloc.free_pending(tx, s, l);
        }
        for ino in self.inodes_freed {
            alloc.free_inode(ino);
        }
    }
}

impl<'a, 'd> FsTx<'a, 'd> {
    pub(crate) fn new(vol: &'a Volume, alloc: &'a mut Allocator, sb: &'a Superblock) -> Self {
        FsTx {
            vol,
            alloc,
            sb,
            meta: HashMap::new(),
            data: BTreeMap::new(),
            allocated: Vec::new(),
            freed: Vec::new(),
            inodes_allocated: Vec::new(),
            inodes_freed: Vec::new(),
            meta_delta: 0,
            done: false,
        }
    }

    /// The superblock.
    pub(crate) fn sb(&self) -> &'a Superblock {
        self.sb
    }

    /// Metadata blocks allocated minus freed so far.
    pub(crate) fn meta_delta(&self) -> i64 {
        self.meta_delta
    }

    /// Stages a new version of inode `ino`.
    pub(crate) fn write_inode(&mut self, ino: u64, inode: &Inode) -> FsResult<()> {
        let (blk, off) = self.sb.inode_location(ino);
        let mut img = self.read(blk)?.to_vec();
        inode.encode_into(&mut img[off..off + INODE_SIZE]);
        self.write(blk, img);
        Ok(())
    }

    /// Reserves up to `max` contiguous data blocks near `goal` (at least one).
    pub(crate) fn alloc_data(&mut self, goal: BlockNo, max: u64) -> FsResult<(BlockNo, u64)> {
        let (s, l) = self.alloc.alloc_run(goal, max).ok_or(FsError::NoSpace)?;
        self.allocated.push((s, l));
        Ok((s, l))
    }

    /// Frees blocks (free-pending until the transaction is durable).
    pub(crate) fn free_blocks(&mut self, start: BlockNo, len: u64) {
        if len > 0 {
            self.freed.push((start, len));
        }
    }

    /// Reserves an inode slot near `goal`.
    pub(crate) fn alloc_ino(&mut self, goal: u64) -> FsResult<u64> {
        let ino = self.alloc.alloc_inode(goal).ok_or(FsError::NoSpace)?;
        self.inodes_allocated.push(ino);
        Ok(ino)
    }

    /// Frees an inode slot.
    pub(crate) fn free_ino(&mut self, ino: u64) {
        self.inodes_freed.push(ino);
    }

    /// Stages file data for consecutive blocks from `start` (whole blocks; the runs of
    /// one transaction do not overlap). `fresh`: the blocks were free before (newly
    /// allocated or never written), see `Transaction::write_data`.
    pub(crate) fn write_data(
        &mut self,
        start: BlockNo,
        data: impl Into<Cow<'d, [u8]>>,
        fresh: bool,
    ) {
        self.data.insert(start, (data.into(), fresh));
    }

    /// Reads a file-data block, seeing this transaction's own writes.
    pub(crate) fn read_data_block(&self, b: BlockNo, buf: &mut [u8]) -> FsResult<()> {
        let bs = buf.len();
        if let Some((&start, (d, _))) = self.data.range(..=b).next_back() {
            let at = (b - start) as usize * bs;
            if at < d.len() {
                buf.copy_from_slice(&d[at..at + bs]);
                return Ok(());
            }
        }
        Ok(self.vol.read_data(b, buf)?)
    }

    /// Adds the bitmap updates and returns the volume transaction.
    pub(crate) fn finish(mut self) -> FsResult<(Transaction<'d>, Finished)> {
        let bits_per_block = self.bs() as u64 * 8;
        let sb = self.sb;
        // Block bitmap: allocations set bits, frees clear them (in that order: a block
        // allocated and freed by the same operation ends up free).
        let changes: Vec<(u64, u64, bool)> = self
            .allocated
            .iter()
            .map(|&(s, l)| (s, l, true))
            .chain(self.freed.iter().map(|&(s, l)| (s, l, false)))
            .collect();
        for (s, l, v) in changes {
            let first = s / bits_per_block;
            let last = (s + l - 1) / bits_per_block;
            for bi in first..=last {
                let blk = sb.bbm_start + bi;
                let mut img = self.read(blk)?.to_vec();
                set_bits(&mut img, bi * bits_per_block, s, l, v);
                self.write(blk, img);
            }
        }
        let ichanges: Vec<(u64, bool)> = self
            .inodes_allocated
            .iter()
            .map(|&i| (i, true))
            .chain(self.inodes_freed.iter().map(|&i| (i, false)))
            .collect();
        for (ino, v) in ichanges {
            let bit = ino - 1;
            let blk = sb.ibm_start + bit / bits_per_block;
            let mut img = self.read(blk)?.to_vec();
            set_bits(&mut img, (bit / bits_per_block) * bits_per_block, bit, 1, v);
            self.write(blk, img);
        }
        let mut t = Transaction::new();
        for (b, d) in self.meta.drain() {
            t.write_meta(b, d);
        }
        for (b, (d, fresh)) in std::mem::take(&mut self.data) {
            t.write_data(b, d, fresh);
        }
        if !self.freed.is_empty() {
            t.frees_blocks();
        }
        self.done = true;
        let fin = Finished {
            freed: std::mem::take(&mut self.freed),
            inodes_freed: std::mem::take(&mut self.inodes_freed),
        };
        Ok((t, fin))
    }
}

impl Drop for FsTx<'_, '_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for &(s, l) in &self.allocated {
            self.alloc.unreserve(s, l);
        }
        for &ino in &self.inodes_allocated {
            self.alloc.free_inode(ino);
        }
    }
}

impl BlockRead for FsTx<'_, '_> {
    fn bs(&self) -> usize {
        self.vol.block_size()
    }
    fn read(&self, b: BlockNo) -> FsResult<Arc<[u8]>> {
        if let Some(d) = self.meta.get(&b) {
            return Ok(d.clone());
        }
        Ok(self.vol.read_block(b)?)
    }
}

impl BlockWrite for FsTx<'_, '_> {
    fn write(&mut self, b: BlockNo, data: Vec<u8>) {
        self.meta.insert(b, Arc::from(data));
    }
    fn alloc_meta(&mut self, goal: BlockNo) -> FsResult<BlockNo> {
        let (b, _) = self.alloc_data(goal, 1)?;
        self.meta_delta += 1;
        Ok(b)
    }
    fn free_meta(&mut self, b: BlockNo) {
        self.free_blocks(b, 1);
        self.meta_delta -= 1;
    }
}

/// Reads and decodes inode `ino` through any block reader.
pub(crate) fn read_inode(r: &impl BlockRead, sb: &Superblock, ino: u64) -> FsResult<Inode> {
    if !sb.valid_ino(ino) {
        return Err(FsError::Stale);
    }
    let (blk, off) = sb.inode_location(ino);
    let b = r.read(blk)?;
    Inode::decode(&b[off..off + INODE_SIZE])
        .map_err(|e| FsError::corrupt(format!("inode {ino}: {e}")))
}
