//! The filesystem core: POSIX operations over the pairfs volume (docs/DESIGN.md §2).
//!
//! Every mutation is one transaction: it runs against an [`FsTx`] under the write lock and
//! is committed to the volume whole, or not at all (an error midway leaves nothing behind).
//! Reads run under the read lock, concurrently. The FUSE adapter (`fuse.rs`) is a thin
//! layer over this type, which is tested without a mount.
//!
//! Inode lifetime follows the kernel's lookup counts when `track_lookups` is on (the FUSE
//! adapter turns it on): an inode whose last link goes while the kernel still references
//! it moves to the hidden orphan directory and is freed at its last `forget`, or at the
//! next mount after a crash.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};
use std::time::{Duration, Instant};

use pairfs::types::fill_random;
use pairfs::volume::{FlushMarks, Flushed, defer_fetches};
use pairfs::{Transaction, Volume, VolumeError};

use crate::alloc::{Allocator, set_bits};
use crate::btree::{BTree, TREE_DIR};
use crate::dir::{self, FIRST_COOKIE, check_name};
use crate::error::{FsError, FsResult};
use crate::extent::{Extent, ExtentMap};
use crate::format::{
    INLINE_SYMLINK_MAX, Inode, Kind, MAX_SYMLINK, ORPHAN_INO, ROOT_INO, Superblock, Timespec,
};
use crate::tx::{BlockRead, BlockWrite, FsTx, read_inode};
use crate::xattr::Xattrs;

/// Largest file size (16 TiB): keeps logical block numbers and offsets far from overflow.
pub const MAX_FILE_SIZE: u64 = 1 << 44;
/// Most hard links an inode may have (ext4's limit).
pub const MAX_LINKS: u32 = 65_000;
/// Most blocks one write reserves per allocation call (an extent's worth at 4 KiB blocks
/// is 16 TiB; this only bounds a single reservation).
const ALLOC_CHUNK: u64 = 1 << 16;
/// How long a writer waits for room in a full local-unreflected area before its write
/// fails with `ENOSPC` (the merge frees room once the old primary's backlog has drained:
/// a drain stuck on an unreachable old primary must not hang writers for ever).
const LU_FULL_WAIT: Duration = Duration::from_secs(300);
/// How often a waiting writer tries again.
const LU_FULL_POLL: Duration = Duration::from_millis(20);
/// Times a read or a transaction fetches from the peer with the lock released and runs
/// again (a block can move between two runs: applied, or written on the taker) before it
/// fetches under the lock.
const FETCH_ROUNDS: usize = 3;
/// Entries a listing reads ahead, while taking over, to fetch with the lock released: more
/// than one reply holds (a 4 KiB READDIRPLUS reply takes about 25).
const READDIR_AHEAD: usize = 256;

/// Options of an open filesystem.
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// Follow the kernel's lookup counts to keep unlinked-but-open inodes alive.
    pub track_lookups: bool,
    /// Update access times (relatime rules); off is `noatime`.
    pub atime: bool,
    /// The mode the filesystem opens in ([`Fs::set_mode`] changes it later).
    pub mode: FsMode,
    /// Free the inodes a crash left unlinked-but-open at open (a replicated primary does it
    /// later, with [`Fs::reap_orphans`], once it may write). Only in writable mode.
    pub reap_at_open: bool,
}

/// What the filesystem admits. It changes online ([`Fs::set_mode`]): a node's role changes
/// while its filesystem stays mounted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FsMode {
    /// Changes go through the filesystem: a primary, or a volume of its own.
    #[default]
    Writable,
    /// Every change is refused (EROFS); the volume changes only by replication underneath
    /// ([`Fs::apply_replicated`]): a secondary.
    Replica,
}

/// Callbacks into the node that runs the filesystem (replication). All are called outside
/// the filesystem's lock.
pub trait FsHooks: Send + Sync {
    /// Journal entries were sealed or became durable: the node may send them.
    fn entries(&self);
    /// Before a change: waits while the node may not write (a primary reconciling with
    /// its peer after a crash). An error fails the operation.
    fn admit(&self) -> FsResult<()>;
    /// Whether a change would be admitted now, without waiting (for changes nobody waits
    /// for, such as access times).
    fn admits(&self) -> bool;
    /// A change was committed, before the operation returns: sync-mode replication seals
    /// it and waits until the peer has it. An error fails the operation.
    fn committed(&self, fs: &Fs) -> FsResult<()>;
    /// An fsync begins: every change up to entry `seq` is being made durable here; the
    /// peer should make it durable too.
    fn syncing(&self, seq: pairfs::Seq);
    /// An fsync: every change up to entry `seq` is durable here; sync-mode replication
    /// waits until it is durable on the peer. An error fails the fsync.
    fn synced(&self, seq: pairfs::Seq) -> FsResult<()>;
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            track_lookups: false,
            atime: true,
            mode: FsMode::Writable,
            reap_at_open: true,
        }
    }
}

/// Options of `format`.
#[derive(Clone, Debug, Default)]
pub struct FormatOptions {
    /// Number of inodes (default: one per 16 KiB).
    pub inodes: Option<u64>,
}

/// Who performs an operation (ownership of new inodes, setuid clearing).
#[derive(Clone, Copy, Debug, Default)]
pub struct Ctx {
    /// Caller's uid.
    pub uid: u32,
    /// Caller's gid.
    pub gid: u32,
}

/// The attributes of an inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Allocated size in 512-byte units.
    pub blocks: u64,
    /// Access time.
    pub atime: Timespec,
    /// Modification time.
    pub mtime: Timespec,
    /// Change time.
    pub ctime: Timespec,
    /// Creation time.
    pub crtime: Timespec,
    /// File type.
    pub kind: Kind,
    /// Permission bits (including setuid, setgid, sticky).
    pub perm: u16,
    /// Hard links.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number.
    pub rdev: u32,
    /// Preferred I/O size.
    pub blksize: u32,
    /// Generation of the inode slot.
    pub generation: u32,
}

/// A time to set.
#[derive(Clone, Copy, Debug)]
pub enum TimeSet {
    /// The current time.
    Now,
    /// A given time.
    At(Timespec),
}

/// Attribute changes (`setattr`).
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (truncate or extend).
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<TimeSet>,
    /// New modification time.
    pub mtime: Option<TimeSet>,
    /// New change time.
    pub ctime: Option<Timespec>,
}

/// `rename` flags.
#[derive(Clone, Copy, Debug, Default)]
pub struct RenameFlags {
    /// `RENAME_NOREPLACE`: fail if the target exists.
    pub noreplace: bool,
    /// `RENAME_EXCHANGE`: swap source and target.
    pub exchange: bool,
}

/// One `readdir` item.
#[derive(Clone, Debug)]
pub struct DirItem {
    /// Inode number.
    pub ino: u64,
    /// File type.
    pub kind: Kind,
    /// Name.
    pub name: Vec<u8>,
    /// Offset to resume after this item.
    pub next: u64,
}

/// `statfs` figures.
#[derive(Clone, Copy, Debug)]
pub struct StatFs {
    /// Total blocks.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Free blocks for unprivileged users.
    pub bavail: u64,
    /// Total inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Block size.
    pub bsize: u32,
    /// Longest name.
    pub namelen: u32,
}

/// What `create_node` makes.
struct NewNode<'a> {
    kind: Kind,
    mode: u32,
    rdev: u32,
    target: Option<&'a [u8]>,
}

struct Core {
    vol: Volume,
    sb: Superblock,
    alloc: Allocator,
}

/// The filesystem; see the module documentation.
pub struct Fs {
    core: RwLock<Core>,
    lookups: Mutex<HashMap<u64, u64>>,
    opts: FsOptions,
    /// True in [`FsMode::Replica`]. Changed only with the core write lock held, so a
    /// transaction that checks it under that lock runs wholly in one mode.
    replica: AtomicBool,
    /// Writers waiting for room in a taker's local-unreflected area (status).
    lu_waiting: std::sync::atomic::AtomicU64,
    hooks: std::sync::OnceLock<Arc<dyn FsHooks>>,
    /// Held (shared) by every read from its start until its reply is sent, and by the FUSE
    /// adapter around its replies ([`Fs::reply_guard`]): a replica's node takes it
    /// exclusively after an apply ([`Fs::wait_for_reads`]) so that no reply computed from
    /// the state before can reach the kernel's cache after the invalidation of what
    /// changed; a switch to replica mode takes it too, so that no reply cached for as long
    /// as a writable mount allows arrives after the switch returns.
    replies: RwLock<()>,
    /// True while the volume is taking over (its reads may wait for the peer with the
    /// core lock held): writers then poll for the lock instead of queueing on it
    /// ([`Fs::write_core`]).
    fetching: Arc<AtomicBool>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("opts", &self.opts)
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

fn now() -> Timespec {
    Timespec::now()
}

/// Reads a live inode.
fn load(r: &impl BlockRead, sb: &Superblock, ino: u64) -> FsResult<Inode> {
    let i = read_inode(r, sb, ino)?;
    if i.is_free() {
        return Err(FsError::Stale);
    }
    Ok(i)
}

fn dir_tree(ino: u64, i: &Inode) -> FsResult<BTree> {
    if i.kind() != Some(Kind::Dir) {
        return Err(FsError::NotDir);
    }
    Ok(BTree {
        root: i.root,
        tree: TREE_DIR,
        owner: ino,
    })
}

fn kind_of(i: &Inode) -> FsResult<Kind> {
    i.kind()
        .ok_or_else(|| FsError::corrupt(format!("bad mode {:o}", i.mode)))
}

fn to_attr(ino: u64, i: &Inode, bs: usize) -> FsResult<Attr> {
    let kind = kind_of(i)?;
    let size = if kind == Kind::Dir {
        i.blocks * bs as u64
    } else {
        i.size
    };
    Ok(Attr {
        ino,
        size,
        blocks: i.blocks * (bs as u64 / 512),
        atime: i.atime,
        mtime: i.mtime,
        ctime: i.ctime,
        crtime: i.crtime,
        kind,
        perm: (i.mode & 0o7777) as u16,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        blksize: bs as u32,
        generation: i.generation,
    })
}

fn apply_delta(blocks: u64, delta: i64) -> u64 {
    blocks.checked_add_signed(delta).unwrap_or(0)
}

/// Inserts an entry into directory `dir`, updating its inode (count, blocks, link count
/// for a subdirectory, times).
fn dir_add(tx: &mut FsTx<'_, '_>, dir: u64, name: &[u8], child: u64, kind: Kind) -> FsResult<()> {
    let sb = tx.sb();
    let mut d = load(tx, sb, dir)?;
    let mut tree = dir_tree(dir, &d)?;
    if kind == Kind::Dir && d.nlink >= MAX_LINKS {
        return Err(FsError::TooManyLinks);
    }
    let before = tx.meta_delta();
    dir::insert(tx, &mut tree, &sb.hash_key, name, child, kind)?;
    d.blocks = apply_delta(d.blocks, tx.meta_delta() - before);
    d.root = tree.root;
    d.count += 1;
    if kind == Kind::Dir {
        d.nlink += 1;
    }
    let t = now();
    d.mtime = t;
    d.ctime = t;
    tx.write_inode(dir, &d)
}

/// Removes the entry at `cookie` of directory `dir`.
fn dir_remove(tx: &mut FsTx<'_, '_>, dir: u64, cookie: u64, was_dir: bool) -> FsResult<()> {
    let sb = tx.sb();
    let mut d = load(tx, sb, dir)?;
    let mut tree = dir_tree(dir, &d)?;
    let before = tx.meta_delta();
    if !tree.remove(tx, cookie)? {
        return Err(FsError::corrupt(format!(
            "directory {dir} lost entry {cookie}"
        )));
    }
    d.blocks = apply_delta(d.blocks, tx.meta_delta() - before);
    d.root = tree.root;
    d.count = d.count.saturating_sub(1);
    if was_dir {
        d.nlink = d.nlink.saturating_sub(1);
    }
    let t = now();
    d.mtime = t;
    d.ctime = t;
    tx.write_inode(dir, &d)
}

/// Points the entry at `cookie` of `dir` to another inode (`RENAME_EXCHANGE`).
fn dir_replace(
    tx: &mut FsTx<'_, '_>,
    dir: u64,
    cookie: u64,
    name: &[u8],
    child: u64,
    kind: Kind,
    nlink_delta: i32,
) -> FsResult<()> {
    let sb = tx.sb();
    let mut d = load(tx, sb, dir)?;
    let mut tree = dir_tree(dir, &d)?;
    let before = tx.meta_delta();
    tree.insert(tx, cookie, &dir::encode(child, kind, name))?;
    d.blocks = apply_delta(d.blocks, tx.meta_delta() - before);
    d.root = tree.root;
    d.nlink = d.nlink.saturating_add_signed(nlink_delta);
    let t = now();
    d.mtime = t;
    d.ctime = t;
    tx.write_inode(dir, &d)
}

/// Frees an inode and everything it owns.
fn free_inode(tx: &mut FsTx<'_, '_>, ino: u64, i: &Inode) -> FsResult<()> {
    match kind_of(i)? {
        Kind::Dir => dir_tree(ino, i)?.destroy(tx)?,
        Kind::File | Kind::Symlink => {
            let map = ExtentMap::load(i, ino)?;
            for e in map.all(tx)? {
                tx.free_blocks(e.phys, e.len);
            }
            map.destroy(tx)?;
        }
        _ => {}
    }
    if i.xattr_block != 0 {
        tx.free_meta(i.xattr_block);
    }
    tx.write_inode(ino, &Inode::free(i.generation))?;
    tx.free_ino(ino);
    Ok(())
}

/// Drops one link of `ino` (already removed from its directory). `referenced`: the kernel
/// still holds the inode, so it becomes an orphan instead of being freed.
fn drop_link(tx: &mut FsTx<'_, '_>, ino: u64, referenced: bool, whole_dir: bool) -> FsResult<()> {
    let sb = tx.sb();
    let mut i = load(tx, sb, ino)?;
    i.nlink = if whole_dir {
        0
    } else {
        i.nlink.saturating_sub(1)
    };
    i.ctime = now();
    if i.nlink > 0 {
        return tx.write_inode(ino, &i);
    }
    if referenced {
        let mut o = load(tx, sb, ORPHAN_INO)?;
        let mut tree = dir_tree(ORPHAN_INO, &o)?;
        let before = tx.meta_delta();
        tree.insert(tx, ino, &dir::encode(ino, kind_of(&i)?, b""))?;
        o.blocks = apply_delta(o.blocks, tx.meta_delta() - before);
        o.root = tree.root;
        o.count += 1;
        tx.write_inode(ORPHAN_INO, &o)?;
        return tx.write_inode(ino, &i);
    }
    free_inode(tx, ino, &i)
}

/// Removes an orphan (an unlinked inode the kernel no longer references).
fn reap_orphan(tx: &mut FsTx<'_, '_>, ino: u64) -> FsResult<()> {
    let sb = tx.sb();
    let mut o = load(tx, sb, ORPHAN_INO)?;
    let mut tree = dir_tree(ORPHAN_INO, &o)?;
    let before = tx.meta_delta();
    if !tree.remove(tx, ino)? {
        return Ok(());
    }
    o.blocks = apply_delta(o.blocks, tx.meta_delta() - before);
    o.root = tree.root;
    o.count = o.count.saturating_sub(1);
    tx.write_inode(ORPHAN_INO, &o)?;
    let i = read_inode(tx, sb, ino)?;
    if !i.is_free() && i.nlink == 0 {
        free_inode(tx, ino, &i)?;
    }
    Ok(())
}

/// True if `anc` is `ino` or one of its ancestors.
fn is_ancestor(r: &impl BlockRead, sb: &Superblock, anc: u64, mut ino: u64) -> FsResult<bool> {
    // Deeper than the number of inodes means a parent cycle: corruption.
    for _ in 0..=sb.inode_count {
        if ino == anc {
            return Ok(true);
        }
        if ino == ROOT_INO {
            return Ok(false);
        }
        ino = load(r, sb, ino)?.parent;
    }
    Err(FsError::corrupt("directory parent pointers form a cycle"))
}

/// Writes `data` at `off` of regular file `ino`.
fn write_file<'d>(
    tx: &mut FsTx<'_, 'd>,
    ctx: Ctx,
    ino: u64,
    off: u64,
    data: &'d [u8],
) -> FsResult<()> {
    let sb = tx.sb();
    let bs = tx.bs() as u64;
    let mut i = load(tx, sb, ino)?;
    match kind_of(&i)? {
        Kind::File => {}
        Kind::Dir => return Err(FsError::IsDir),
        _ => return Err(FsError::Invalid("write to a special file")),
    }
    let len = data.len() as u64;
    let end = off.checked_add(len).ok_or(FsError::FileTooLarge)?;
    if end > MAX_FILE_SIZE {
        return Err(FsError::FileTooLarge);
    }
    if len == 0 {
        return Ok(());
    }
    let l0 = off / bs;
    let l1 = end.div_ceil(bs);
    let mut map = ExtentMap::load(&i, ino)?;
    let existing = map.overlapping(tx, l0, l1)?;
    // The mapping of [l0, l1) after this write, and whether it differs from before.
    let mut plan: Vec<(Extent, bool)> = Vec::new(); // (segment, previously written)
    let mut changed = false;
    let mut allocated = 0u64;
    let mut goal = match l0.checked_sub(1) {
        Some(prev) => map
            .overlapping(tx, prev, l0)?
            .first()
            .map_or(0, |e| e.phys + (prev - e.logical) + 1),
        None => 0,
    };
    let mut cursor = l0;
    let mut next_existing = existing.iter().peekable();
    while cursor < l1 {
        match next_existing.peek() {
            Some(e) if e.logical <= cursor => {
                let seg = e
                    .clip(cursor, l1)
                    .ok_or(FsError::corrupt("extent bounds"))?;
                changed |= seg.unwritten;
                plan.push((seg, !seg.unwritten));
                goal = seg.phys + seg.len;
                cursor = seg.end();
                next_existing.next();
            }
            next => {
                let hole_end = next.map_or(l1, |e| e.logical.min(l1));
                let want = (hole_end - cursor).min(ALLOC_CHUNK);
                let (phys, got) = tx.alloc_data(goal, want)?;
                plan.push((
                    Extent {
                        logical: cursor,
                        phys,
                        len: got,
                        unwritten: false,
                    },
                    false,
                ));
                allocated += got;
                changed = true;
                goal = phys + got;
                cursor += got;
            }
        }
    }
    // Stage the data, one run per segment: whole blocks copied once from the request,
    // partial blocks (at most the first and last) merged with what was there.
    for (seg, was_written) in &plan {
        let (s0, s1) = (seg.logical * bs, seg.end() * bs);
        if s0 >= off && s1 <= end {
            // Whole blocks: handed to the volume straight from the request buffer.
            tx.write_data(
                seg.phys,
                &data[(s0 - off) as usize..(s1 - off) as usize],
                !was_written,
            );
            continue;
        }
        let mut run = Vec::with_capacity((seg.len * bs) as usize);
        for k in 0..seg.len {
            let bstart = (seg.logical + k) * bs;
            let from = off.max(bstart) - bstart;
            let to = end.min(bstart + bs) - bstart;
            let src = &data[(bstart + from - off) as usize..(bstart + to - off) as usize];
            if from == 0 && to == bs {
                run.extend_from_slice(src);
                continue;
            }
            let at = run.len();
            run.resize(at + bs as usize, 0);
            let blk = &mut run[at..];
            if *was_written {
                tx.read_data_block(seg.phys + k, blk)?;
            }
            blk[from as usize..to as usize].copy_from_slice(src);
        }
        tx.write_data(seg.phys, run, !was_written);
    }
    let before = tx.meta_delta();
    if changed {
        map.remove_range(tx, l0, l1)?;
        for (seg, _) in plan {
            map.insert_merge(
                tx,
                Extent {
                    unwritten: false,
                    ..seg
                },
            )?;
        }
        map.store(&mut i);
    }
    i.blocks = apply_delta(i.blocks + allocated, tx.meta_delta() - before);
    i.size = i.size.max(end);
    let t = now();
    i.mtime = t;
    i.ctime = t;
    clear_setid_on_write(&mut i, ctx);
    tx.write_inode(ino, &i)
}

/// A write or truncate by anyone but root clears setuid, and setgid when group-executable.
fn clear_setid_on_write(i: &mut Inode, ctx: Ctx) {
    if ctx.uid != 0 {
        i.mode &= !libc::S_ISUID;
        if i.mode & libc::S_IXGRP != 0 {
            i.mode &= !libc::S_ISGID;
        }
    }
}

/// Sets the size of regular file `ino` (shrinking frees blocks and zeroes the tail).
fn truncate_file(tx: &mut FsTx<'_, '_>, i: &mut Inode, ino: u64, size: u64) -> FsResult<()> {
    if size > MAX_FILE_SIZE {
        return Err(FsError::FileTooLarge);
    }
    let bs = tx.bs() as u64;
    if size < i.size {
        let mut map = ExtentMap::load(i, ino)?;
        let keep = size.div_ceil(bs);
        let before = tx.meta_delta();
        let removed = map.remove_range(tx, keep, u64::MAX)?;
        let mut freed = 0;
        for e in &removed {
            tx.free_blocks(e.phys, e.len);
            freed += e.len;
        }
        // Zero the tail of a partial last block, so a later extension reads zeros.
        if size % bs != 0 {
            let last = size / bs;
            if let Some(e) = map.overlapping(tx, last, last + 1)?.first() {
                if !e.unwritten {
                    let phys = e.phys + (last - e.logical);
                    let mut b = vec![0u8; bs as usize];
                    tx.read_data_block(phys, &mut b)?;
                    b[(size % bs) as usize..].fill(0);
                    tx.write_data(phys, b, false);
                }
            }
        }
        map.shrink(tx)?;
        map.store(i);
        i.blocks = apply_delta(i.blocks.saturating_sub(freed), tx.meta_delta() - before);
    }
    i.size = size;
    Ok(())
}

fn fallocate_file(tx: &mut FsTx<'_, '_>, ino: u64, off: u64, len: u64) -> FsResult<()> {
    let sb = tx.sb();
    let bs = tx.bs() as u64;
    let mut i = load(tx, sb, ino)?;
    if kind_of(&i)? != Kind::File {
        return Err(FsError::Invalid("fallocate on a non-regular file"));
    }
    let end = off.checked_add(len).ok_or(FsError::FileTooLarge)?;
    if end > MAX_FILE_SIZE {
        return Err(FsError::FileTooLarge);
    }
    if len == 0 {
        return Err(FsError::Invalid("fallocate of length 0"));
    }
    let (l0, l1) = (off / bs, end.div_ceil(bs));
    let mut map = ExtentMap::load(&i, ino)?;
    let existing = map.overlapping(tx, l0, l1)?;
    let mut holes = Vec::new();
    let mut cursor = l0;
    for e in &existing {
        if e.logical > cursor {
            holes.push((cursor, e.logical));
        }
        cursor = cursor.max(e.end());
    }
    if cursor < l1 {
        holes.push((cursor, l1));
    }
    let before = tx.meta_delta();
    let mut allocated = 0;
    for (mut h0, h1) in holes {
        while h0 < h1 {
            let (phys, got) = tx.alloc_data(0, (h1 - h0).min(ALLOC_CHUNK))?;
            map.insert_merge(
                tx,
                Extent {
                    logical: h0,
                    phys,
                    len: got,
                    unwritten: true,
                },
            )?;
            allocated += got;
            h0 += got;
        }
    }
    map.store(&mut i);
    i.blocks = apply_delta(i.blocks + allocated, tx.meta_delta() - before);
    if end > i.size {
        i.size = end;
    }
    i.ctime = now();
    tx.write_inode(ino, &i)
}

impl Fs {
    /// Writes a fresh filesystem onto `vol` (root and orphan directories, bitmaps).
    pub fn format(vol: &mut Volume, opts: &FormatOptions) -> FsResult<()> {
        let bs = vol.block_size();
        let mut key = [0u8; 16];
        fill_random(&mut key).map_err(|e| FsError::corrupt(format!("no randomness: {e}")))?;
        let sb = Superblock::new(
            vol.block_count(),
            bs as u32,
            opts.inodes,
            vol.id(),
            key,
            pairfs::types::now_ns(),
        )
        .map_err(FsError::BadFormat)?;
        // Superblock and bitmaps with only the metadata area in use.
        let mut t = Transaction::new();
        t.write_meta(0, sb.encode().into());
        let bits = bs as u64 * 8;
        for i in 0..sb.bbm_blocks {
            let mut img = vec![0u8; bs];
            set_bits(&mut img, i * bits, 0, sb.data_start, true);
            let past = sb.total_blocks;
            set_bits(
                &mut img,
                i * bits,
                past,
                (i + 1) * bits - past.min((i + 1) * bits),
                true,
            );
            t.write_meta(sb.bbm_start + i, img.into());
        }
        for i in 0..sb.ibm_blocks {
            let mut img = vec![0u8; bs];
            let past = sb.inode_count;
            set_bits(
                &mut img,
                i * bits,
                past,
                (i + 1) * bits - past.min((i + 1) * bits),
                true,
            );
            t.write_meta(sb.ibm_start + i, img.into());
        }
        // Zero the inode table's first block: a reused volume file may hold old bytes.
        for i in 0..sb.itab_blocks.min(1) {
            t.write_meta(sb.itab_start + i, vec![0u8; bs].into());
        }
        vol.commit(t)?;
        vol.sync()?;
        let mut alloc = Allocator::load(vol, &sb)?;
        let t = now();
        let (t_img, fin) = {
            let mut tx = FsTx::new(vol, &mut alloc, &sb);
            for (ino, parent, mode) in
                [(ROOT_INO, ROOT_INO, 0o755), (ORPHAN_INO, ORPHAN_INO, 0o700)]
            {
                let got = tx.alloc_ino(ino)?;
                if got != ino {
                    return Err(FsError::corrupt("fresh inode bitmap not empty"));
                }
                let tree = BTree::create(&mut tx, TREE_DIR, ino, sb.data_start)?;
                let mut i = Inode::free(1);
                i.mode = libc::S_IFDIR | mode;
                i.nlink = 2;
                i.blocks = 1;
                i.root = tree.root;
                i.parent = parent;
                i.atime = t;
                i.mtime = t;
                i.ctime = t;
                i.crtime = t;
                tx.write_inode(ino, &i)?;
            }
            tx.finish()?
        };
        let id = vol.commit(t_img)?;
        fin.apply(&mut alloc, id);
        vol.checkpoint()?;
        Ok(())
    }

    /// Opens the filesystem on a recovered volume, and frees the orphans a crash left.
    pub fn open(vol: Volume, opts: FsOptions) -> FsResult<Fs> {
        let sb0 = vol.read_block(0)?;
        let sb = Superblock::decode(&sb0, vol.block_count()).map_err(FsError::BadSuperblock)?;
        if sb.block_size as usize != vol.block_size() || sb.uuid != vol.id() {
            return Err(FsError::BadSuperblock(format!(
                "superblock (uuid {}, block size {}) does not match the volume (uuid {}, block size {})",
                sb.uuid,
                sb.block_size,
                vol.id(),
                vol.block_size()
            )));
        }
        let alloc = Allocator::load(&vol, &sb)?;
        for ino in [ROOT_INO, ORPHAN_INO] {
            let i = load(&vol, &sb, ino)?;
            if i.kind() != Some(Kind::Dir) {
                return Err(FsError::corrupt(format!("inode {ino} is not a directory")));
            }
        }
        let reap = opts.mode == FsMode::Writable && opts.reap_at_open;
        let fetching = Arc::new(AtomicBool::new(false));
        let mut vol = vol;
        vol.share_fetch_flag(fetching.clone());
        let fs = Fs {
            fetching,
            core: RwLock::new(Core { vol, sb, alloc }),
            lookups: Mutex::new(HashMap::new()),
            replica: AtomicBool::new(opts.mode == FsMode::Replica),
            lu_waiting: std::sync::atomic::AtomicU64::new(0),
            opts,
            hooks: std::sync::OnceLock::new(),
            replies: RwLock::new(()),
        };
        if reap {
            fs.reap_orphans()?;
        }
        Ok(fs)
    }

    fn read_core(&self) -> RwLockReadGuard<'_, Core> {
        // A panic while holding the lock is a bug; the state is still the committed one
        // (transactions apply whole), so continuing is as safe as anything else.
        self.core.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The core lock, exclusively. While the volume is taking over, a reader may hold the
    /// lock shared while it waits for a block from the peer, and the peer's own reads may
    /// wait for this node's fetch server, which takes the lock shared too: a writer queued
    /// on the lock would keep that server out (the standard lock lets no reader in behind
    /// a waiting writer), and two nodes fetching from each other (a failback while a drain
    /// runs, docs/PROTOCOL.md §7.6) would wait for each other for
    /// ever. So meanwhile writers never queue: they poll.
    fn write_core(&self) -> RwLockWriteGuard<'_, Core> {
        let mut pause = Duration::from_micros(20);
        while self.fetching.load(Ordering::Acquire) {
            match self.core.try_write() {
                Ok(g) => return g,
                Err(TryLockError::Poisoned(e)) => return e.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(1));
                }
            }
        }
        self.core.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the read-only `f` under the lock shared. While the volume is taking over, a
    /// block `f` needs from the peer is fetched with the lock released and `f` runs again
    /// ([`pairfs::volume::defer_fetches`]), at most [`FETCH_ROUNDS`] times, then with the
    /// fetches under the lock: so a reader waiting for the peer keeps no writer out. `f`
    /// has no effect unless it returns `Ok`.
    fn reading<T>(&self, mut f: impl FnMut(&Core) -> FsResult<T>) -> FsResult<T> {
        for _ in 0..FETCH_ROUNDS {
            let core = self.read_core();
            if !core.vol.is_taking_over() {
                return f(&core);
            }
            match defer_fetches(|| f(&core)) {
                Err(FsError::Volume(VolumeError::FetchDeferred(fetch))) => {
                    drop(core);
                    fetch.run()?;
                }
                r => return r,
            }
        }
        f(&self.read_core())
    }

    fn lookups(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        self.lookups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one kernel reference to `ino` (called with the core lock held).
    fn remember(&self, ino: u64) {
        if self.opts.track_lookups {
            *self.lookups().entry(ino).or_insert(0) += 1;
        }
    }

    fn referenced(&self, ino: u64) -> bool {
        self.opts.track_lookups && self.lookups().get(&ino).is_some_and(|&n| n > 0)
    }

    /// Runs one transaction; `after` runs on its result with the lock still held.
    fn mutate<'d, T>(
        &self,
        f: impl for<'a> Fn(&mut FsTx<'a, 'd>) -> FsResult<T>,
        after: impl FnOnce(&T),
    ) -> FsResult<T> {
        if self.is_read_only() {
            return Err(FsError::ReadOnly);
        }
        if let Some(h) = self.hooks.get() {
            h.admit()?;
        }
        // A taker's local-unreflected area is full: the writer waits (the lock released)
        // until the merge frees room, and the transaction runs again — nothing it did was
        // kept (docs/PROTOCOL.md §7.5).
        let started = Instant::now();
        let mut after = Some(after);
        let mut fetches = 0;
        loop {
            // While taking over, what the transaction needs from the peer is fetched with
            // the lock released, then it runs again (as [`Fs::reading`]).
            let defer = fetches < FETCH_ROUNDS;
            match self.mutate_once(&f, &mut after, defer) {
                Err(FsError::Volume(VolumeError::FetchDeferred(fetch))) => {
                    fetches += 1;
                    fetch.run()?;
                }
                Err(FsError::Volume(VolumeError::LocalUnreflectedFull { used, capacity }))
                    if started.elapsed() < LU_FULL_WAIT =>
                {
                    if self.lu_waiting.fetch_add(1, Ordering::AcqRel) == 0 {
                        tracing::warn!(
                            used,
                            capacity,
                            "the local-unreflected area is full: writers wait for the merge"
                        );
                    }
                    std::thread::sleep(LU_FULL_POLL);
                    self.lu_waiting.fetch_sub(1, Ordering::AcqRel);
                }
                r => return r,
            }
        }
    }

    /// Writers waiting for room in the local-unreflected area now.
    pub fn writers_waiting_for_room(&self) -> u64 {
        self.lu_waiting.load(Ordering::Acquire)
    }

    fn mutate_once<'d, T, A: FnOnce(&T)>(
        &self,
        f: &impl for<'a> Fn(&mut FsTx<'a, 'd>) -> FsResult<T>,
        after: &mut Option<A>,
        defer_fetches_: bool,
    ) -> FsResult<T> {
        let (out, became_durable) = {
            let mut guard = self.write_core();
            // Again under the lock: a switch to replica mode while this writer waited
            // refuses it (the switch happens between two transactions, never inside one).
            if self.is_read_only() {
                return Err(FsError::ReadOnly);
            }
            let core = &mut *guard;
            let durable = core.vol.durable_tx();
            core.alloc.release_durable(durable);
            let durable_seq = core.vol.journal().durable_seq();
            let run = |core: &mut Core| match defer_fetches_ && core.vol.is_taking_over() {
                true => defer_fetches(|| Self::run_tx(core, f)),
                false => Self::run_tx(core, f),
            };
            let out = match run(core) {
                // Blocks freed by transactions not yet durable: make them durable and retry.
                Err(FsError::NoSpace) if core.alloc.pending_blocks() > 0 => {
                    core.vol.sync()?;
                    let durable = core.vol.durable_tx();
                    core.alloc.release_durable(durable);
                    run(core)
                }
                r => r,
            }?;
            if let Some(after) = after.take() {
                after(&out);
            }
            (out, core.vol.journal().durable_seq() > durable_seq)
        };
        if became_durable {
            // The volume synced on its own (an entry full for the wire, or space freed).
            self.notify_entries();
        }
        if let Some(h) = self.hooks.get() {
            h.committed(self)?;
        }
        Ok(out)
    }

    /// The current mode.
    pub fn mode(&self) -> FsMode {
        if self.replica.load(Ordering::Acquire) {
            FsMode::Replica
        } else {
            FsMode::Writable
        }
    }

    /// True in replica mode (changes refused).
    pub fn is_read_only(&self) -> bool {
        self.mode() == FsMode::Replica
    }

    /// Switches the mode online, between two transactions: the one under way (if any)
    /// completes first, every later one follows the new mode.
    ///
    /// Both ways reload what the filesystem derives from its volume (superblock,
    /// allocator): a replica's allocator only mirrored the bitmaps entry by entry, a
    /// primary's held blocks whose frees were not durable yet. To writable, everything
    /// applied is made durable first: a block freed by an applied entry that is not yet
    /// durable is still referenced by the durable state, and an in-place write into it
    /// could reach the disk before the entry that freed it (the free-pending rule of
    /// `alloc.rs`). To replica, the switch returns once every reply computed before it has
    /// been sent ([`Fs::reply_guard`]), so that none can reach the kernel after what the
    /// node applies next. Fails (and stays in the old mode) if the volume cannot be read or
    /// synced.
    pub fn set_mode(&self, mode: FsMode) -> FsResult<()> {
        {
            let mut core = self.write_core();
            if self.mode() == mode {
                return Ok(());
            }
            let t0 = Instant::now();
            let (mut t1, mut prefetched) = (t0, 0);
            if mode == FsMode::Writable {
                core.vol.sync()?;
                t1 = Instant::now();
                // Taking over: what is on the peer of the superblock and the bitmaps, in
                // one request (their places are fixed at mkfs).
                prefetched = core.vol.prefetch(Self::allocation_blocks(&core.sb))?;
            }
            let t2 = Instant::now();
            (core.sb, core.alloc) = Self::derived(&core.vol)?;
            tracing::debug!(
                sync_ms = (t1 - t0).as_secs_f64() * 1e3,
                prefetched,
                prefetch_ms = (t2 - t1).as_secs_f64() * 1e3,
                derive_ms = t2.elapsed().as_secs_f64() * 1e3,
                "filesystem mode: where the time went"
            );
            self.replica
                .store(mode == FsMode::Replica, Ordering::Release);
        }
        tracing::info!(?mode, "filesystem mode switched");
        match mode {
            // The sync may have made entries durable: the node may send or acknowledge them.
            FsMode::Writable => self.notify_entries(),
            FsMode::Replica => self.wait_for_reads(),
        }
        Ok(())
    }

    /// Held by the FUSE adapter from the moment it reads what a reply carries (or, after a
    /// change, the mode that decides how long the kernel may cache it) until the reply is
    /// sent: see `replies`. Never held across a change (its waits would hold up the
    /// node's invalidations) nor around [`Fs::read_with`], which holds it itself.
    pub fn reply_guard(&self) -> RwLockReadGuard<'_, ()> {
        self.replies.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Installs the node's callbacks (once).
    pub fn set_hooks(&self, hooks: Arc<dyn FsHooks>) {
        let _ = self.hooks.set(hooks);
    }

    fn notify_entries(&self) {
        if let Some(h) = self.hooks.get() {
            h.entries();
        }
    }

    /// Seals the changes committed so far into a journal entry (written, not yet durable:
    /// what sync-mode replication sends) and returns the newest seq.
    pub fn seal(&self) -> FsResult<pairfs::Seq> {
        self.seal_with_lu(false)
    }

    /// [`Fs::seal`], and with `lu` the local-unreflected area's open entry too (taking
    /// over: written, not durable, so that a sync flushes it without the lock).
    fn seal_with_lu(&self, lu: bool) -> FsResult<pairfs::Seq> {
        let seq = {
            let mut core = self.write_core();
            let seq = core.vol.seal_open()?;
            if lu {
                core.vol.seal_local_unreflected()?;
            }
            seq
        };
        self.notify_entries();
        Ok(seq)
    }

    /// Replaces the volume underneath (reopened after an I/O error poisoned it) and
    /// reloads everything derived from it.
    pub fn replace_volume(&self, mut vol: Volume) -> FsResult<()> {
        let mut core = self.write_core();
        let (sb, alloc) = Self::derived(&vol)?;
        vol.share_fetch_flag(self.fetching.clone());
        *core = Core { vol, sb, alloc };
        Ok(())
    }

    /// What the filesystem derives from its volume: the superblock and the allocation
    /// state.
    fn derived(vol: &Volume) -> FsResult<(Superblock, Allocator)> {
        let b0 = vol.read_block(0)?;
        let sb = Superblock::decode(&b0, vol.block_count()).map_err(FsError::BadSuperblock)?;
        let alloc = Allocator::load(vol, &sb)?;
        Ok((sb, alloc))
    }

    /// Runs `f` with the volume under the write lock (replication applies, copies).
    pub fn with_volume_mut<T>(&self, f: impl FnOnce(&mut Volume) -> T) -> T {
        f(&mut self.write_core().vol)
    }

    /// [`Fs::with_volume_mut`] if the lock is free at once; otherwise `f` back, unrun.
    pub fn try_with_volume_mut<T, F: FnOnce(&mut Volume) -> T>(&self, f: F) -> Result<T, F> {
        match self.core.try_write() {
            Ok(mut g) => Ok(f(&mut g.vol)),
            Err(TryLockError::Poisoned(e)) => Ok(f(&mut e.into_inner().vol)),
            Err(TryLockError::WouldBlock) => Err(f),
        }
    }

    /// [`Fs::with_volume`] if the lock is free at once; otherwise `f` back, unrun.
    pub fn try_with_volume<T, F: FnOnce(&Volume) -> T>(&self, f: F) -> Result<T, F> {
        match self.core.try_read() {
            Ok(g) => Ok(f(&g.vol)),
            Err(TryLockError::Poisoned(e)) => Ok(f(&e.into_inner().vol)),
            Err(TryLockError::WouldBlock) => Err(f),
        }
    }

    /// After replication changed the volume underneath (a secondary): reload the bitmap
    /// blocks among `changed` into the in-memory allocation state.
    pub fn refresh_after_apply(&self, changed: &[pairfs::BlockNo]) -> FsResult<()> {
        let mut core = self.write_core();
        let Core { vol, sb, alloc } = &mut *core;
        alloc.reload_bitmap_blocks(vol, sb, changed)
    }

    /// Reloads the superblock and allocation state after the whole volume was replaced by
    /// a copy (a secondary's first copy).
    pub fn reload(&self) -> FsResult<()> {
        let mut core = self.write_core();
        (core.sb, core.alloc) = Self::derived(&core.vol)?;
        Ok(())
    }

    /// The volume's state changes underneath a writable filesystem (a forced takeover
    /// gives up what it could not keep and goes back to the state it holds, docs/PROTOCOL.md
    /// §7.7): runs `f` on the volume and reloads what the filesystem derives from it, under
    /// one hold of the lock, so that no transaction sees the state before with the
    /// allocation state after or the reverse; the filesystem is in `mode` from then on.
    /// The kernel's caches are the caller's.
    pub fn rebase<T>(
        &self,
        mode: FsMode,
        f: impl FnOnce(&mut Volume) -> FsResult<T>,
    ) -> FsResult<T> {
        let mut core = self.write_core();
        let out = f(&mut core.vol)?;
        (core.sb, core.alloc) = Self::derived(&core.vol)?;
        self.replica
            .store(mode == FsMode::Replica, Ordering::Release);
        tracing::info!(?mode, "filesystem reloaded from the volume's state");
        Ok(out)
    }

    fn run_tx<'d, T>(
        core: &mut Core,
        f: &impl for<'a> Fn(&mut FsTx<'a, 'd>) -> FsResult<T>,
    ) -> FsResult<T> {
        let Core { vol, sb, alloc } = core;
        let (out, t, fin) = {
            let mut tx = FsTx::new(vol, alloc, sb);
            let out = f(&mut tx)?;
            let (t, fin) = tx.finish()?;
            (out, t, fin)
        };
        let id = vol.commit(t)?;
        fin.apply(alloc, id);
        Ok(out)
    }

    fn attr_of(core: &Core, ino: u64) -> FsResult<Attr> {
        let i = load(&core.vol, &core.sb, ino)?;
        to_attr(ino, &i, core.vol.block_size())
    }

    /// Frees the inodes a crash left unlinked-but-open (their last reference went with the
    /// crash), or that a former primary left there. Those this node's kernel still holds
    /// (a replica's reader had one open when the primary unlinked it) stay until their last
    /// `forget`.
    pub fn reap_orphans(&self) -> FsResult<()> {
        let orphans: Vec<u64> = {
            let core = self.read_core();
            let o = load(&core.vol, &core.sb, ORPHAN_INO)?;
            let tree = dir_tree(ORPHAN_INO, &o)?;
            let mut v = Vec::new();
            tree.range(&core.vol, 0, &mut |k, _| {
                if !self.referenced(k) {
                    v.push(k);
                }
                Ok(true)
            })?;
            v
        };
        if orphans.is_empty() || self.read_core().vol.is_poisoned() {
            return Ok(());
        }
        tracing::info!(
            count = orphans.len(),
            "freeing unlinked files left open at the last shutdown"
        );
        for ino in orphans {
            self.mutate(|tx| reap_orphan(tx, ino), |_| {})?;
        }
        Ok(())
    }

    /// Looks up `name` in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        self.reading(|core| {
            let p = load(&core.vol, &core.sb, parent)?;
            let tree = dir_tree(parent, &p)?;
            let (_, e) =
                dir::lookup(&core.vol, &tree, &core.sb.hash_key, name)?.ok_or(FsError::NotFound)?;
            let a = Self::attr_of(core, e.ino)?;
            self.remember(e.ino);
            Ok(a)
        })
    }

    /// Attributes of `ino`.
    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.reading(|core| Self::attr_of(core, ino))
    }

    /// Changes attributes (chmod, chown, truncate, utimens).
    pub fn setattr(&self, ctx: Ctx, ino: u64, s: &SetAttr) -> FsResult<Attr> {
        let bs = self.read_core().vol.block_size();
        self.mutate(
            |tx| {
                let sb = tx.sb();
                let mut i = load(tx, sb, ino)?;
                let t = now();
                let kind = kind_of(&i)?;
                if let Some(size) = s.size {
                    match kind {
                        Kind::File => {}
                        Kind::Dir => return Err(FsError::IsDir),
                        _ => return Err(FsError::Invalid("truncate of a special file")),
                    }
                    truncate_file(tx, &mut i, ino, size)?;
                    i.mtime = t;
                    clear_setid_on_write(&mut i, ctx);
                }
                if s.uid.is_some() || s.gid.is_some() {
                    let changes =
                        s.uid.is_some_and(|u| u != i.uid) || s.gid.is_some_and(|g| g != i.gid);
                    if changes && kind != Kind::Dir && s.mode.is_none() {
                        // As chown(2): setuid goes, setgid too when group-executable.
                        i.mode &= !libc::S_ISUID;
                        if i.mode & libc::S_IXGRP != 0 {
                            i.mode &= !libc::S_ISGID;
                        }
                    }
                    i.uid = s.uid.unwrap_or(i.uid);
                    i.gid = s.gid.unwrap_or(i.gid);
                }
                if let Some(mode) = s.mode {
                    i.mode = (i.mode & libc::S_IFMT) | (mode & 0o7777);
                }
                let pick = |ts: TimeSet| match ts {
                    TimeSet::Now => t,
                    TimeSet::At(x) => x,
                };
                if let Some(a) = s.atime {
                    i.atime = pick(a);
                }
                if let Some(m) = s.mtime {
                    i.mtime = pick(m);
                }
                i.ctime = s.ctime.unwrap_or(t);
                tx.write_inode(ino, &i)?;
                to_attr(ino, &i, bs)
            },
            |_| {},
        )
    }

    fn create_node(&self, ctx: Ctx, parent: u64, name: &[u8], node: NewNode<'_>) -> FsResult<Attr> {
        let NewNode {
            kind,
            mode,
            rdev,
            target,
        } = node;
        check_name(name)?;
        let bs = self.read_core().vol.block_size();
        self.mutate(
            |tx| {
                let sb = tx.sb();
                let p = load(tx, sb, parent)?;
                let ptree = dir_tree(parent, &p)?;
                if dir::lookup(tx, &ptree, &sb.hash_key, name)?.is_some() {
                    return Err(FsError::Exists);
                }
                let ino = tx.alloc_ino(parent)?;
                let old = read_inode(tx, sb, ino)?;
                if !old.is_free() {
                    return Err(FsError::corrupt(format!(
                        "inode {ino} is free in the bitmap but in use in the table"
                    )));
                }
                let t = now();
                let mut n = Inode::free(old.generation.wrapping_add(1));
                n.mode = kind.mode_bits() | (mode & 0o7777);
                n.uid = ctx.uid;
                n.gid = ctx.gid;
                if p.mode & libc::S_ISGID != 0 {
                    n.gid = p.gid;
                    if kind == Kind::Dir {
                        n.mode |= libc::S_ISGID;
                    }
                }
                n.nlink = if kind == Kind::Dir { 2 } else { 1 };
                n.rdev = rdev;
                n.atime = t;
                n.mtime = t;
                n.ctime = t;
                n.crtime = t;
                match kind {
                    Kind::Dir => {
                        let tree = BTree::create(tx, TREE_DIR, ino, p.root)?;
                        n.root = tree.root;
                        n.parent = parent;
                        n.blocks = 1;
                    }
                    Kind::Symlink => {
                        let target = target.unwrap_or_default();
                        n.size = target.len() as u64;
                        if target.len() <= INLINE_SYMLINK_MAX {
                            n.inline[..target.len()].copy_from_slice(target);
                        } else {
                            let (phys, _) = tx.alloc_data(0, 1)?;
                            let mut b = vec![0u8; tx.bs()];
                            b[..target.len()].copy_from_slice(target);
                            tx.write_data(phys, b, true);
                            let mut map = ExtentMap::empty(ino);
                            map.insert_merge(
                                tx,
                                Extent {
                                    logical: 0,
                                    phys,
                                    len: 1,
                                    unwritten: false,
                                },
                            )?;
                            map.store(&mut n);
                            n.blocks = 1;
                        }
                    }
                    _ => {}
                }
                tx.write_inode(ino, &n)?;
                dir_add(tx, parent, name, ino, kind)?;
                to_attr(ino, &n, bs)
            },
            |a| self.remember(a.ino),
        )
    }

    /// Creates a regular file, device, fifo or socket (`mode` carries the type).
    pub fn mknod(
        &self,
        ctx: Ctx,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
    ) -> FsResult<Attr> {
        let kind = Kind::from_mode(mode).ok_or(FsError::Invalid("bad file type"))?;
        if matches!(kind, Kind::Dir | Kind::Symlink) {
            return Err(FsError::Invalid("mknod of a directory or symlink"));
        }
        self.create_node(
            ctx,
            parent,
            name,
            NewNode {
                kind,
                mode,
                rdev,
                target: None,
            },
        )
    }

    /// Creates a directory.
    pub fn mkdir(&self, ctx: Ctx, parent: u64, name: &[u8], mode: u32) -> FsResult<Attr> {
        self.create_node(
            ctx,
            parent,
            name,
            NewNode {
                kind: Kind::Dir,
                mode,
                rdev: 0,
                target: None,
            },
        )
    }

    /// Creates a symbolic link.
    pub fn symlink(&self, ctx: Ctx, parent: u64, name: &[u8], target: &[u8]) -> FsResult<Attr> {
        if target.len() > MAX_SYMLINK {
            return Err(FsError::NameTooLong);
        }
        if target.is_empty() {
            return Err(FsError::NotFound);
        }
        self.create_node(
            ctx,
            parent,
            name,
            NewNode {
                kind: Kind::Symlink,
                mode: 0o777,
                rdev: 0,
                target: Some(target),
            },
        )
    }

    /// Adds a hard link `newparent/newname` to `ino`.
    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> FsResult<Attr> {
        check_name(newname)?;
        let bs = self.read_core().vol.block_size();
        self.mutate(
            |tx| {
                let sb = tx.sb();
                let mut i = load(tx, sb, ino)?;
                let kind = kind_of(&i)?;
                if kind == Kind::Dir {
                    return Err(FsError::NotPermitted);
                }
                if i.nlink == 0 {
                    return Err(FsError::NotFound);
                }
                if i.nlink >= MAX_LINKS {
                    return Err(FsError::TooManyLinks);
                }
                let np = load(tx, sb, newparent)?;
                if dir::lookup(tx, &dir_tree(newparent, &np)?, &sb.hash_key, newname)?.is_some() {
                    return Err(FsError::Exists);
                }
                dir_add(tx, newparent, newname, ino, kind)?;
                i.nlink += 1;
                i.ctime = now();
                tx.write_inode(ino, &i)?;
                to_attr(ino, &i, bs)
            },
            |a| self.remember(a.ino),
        )
    }

    /// Removes a non-directory entry.
    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.mutate(
            |tx| {
                let sb = tx.sb();
                let p = load(tx, sb, parent)?;
                let (cookie, e) = dir::lookup(tx, &dir_tree(parent, &p)?, &sb.hash_key, name)?
                    .ok_or(FsError::NotFound)?;
                if e.kind == Kind::Dir {
                    return Err(FsError::IsDir);
                }
                dir_remove(tx, parent, cookie, false)?;
                drop_link(tx, e.ino, self.referenced(e.ino), false)
            },
            |_| {},
        )
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        if name == b"." {
            return Err(FsError::Invalid("rmdir ."));
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        self.mutate(
            |tx| {
                let sb = tx.sb();
                let p = load(tx, sb, parent)?;
                let (cookie, e) = dir::lookup(tx, &dir_tree(parent, &p)?, &sb.hash_key, name)?
                    .ok_or(FsError::NotFound)?;
                if e.kind != Kind::Dir {
                    return Err(FsError::NotDir);
                }
                let d = load(tx, sb, e.ino)?;
                if !dir_tree(e.ino, &d)?.is_empty(tx)? {
                    return Err(FsError::NotEmpty);
                }
                dir_remove(tx, parent, cookie, true)?;
                drop_link(tx, e.ino, self.referenced(e.ino), true)
            },
            |_| {},
        )
    }

    /// Renames `parent/name` to `newparent/newname`.
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: RenameFlags,
    ) -> FsResult<()> {
        check_name(newname)?;
        if flags.noreplace && flags.exchange {
            return Err(FsError::Invalid("RENAME_NOREPLACE with RENAME_EXCHANGE"));
        }
        self.mutate(
            |tx| {
                let sb = tx.sb();
                let key = &sb.hash_key;
                let p = load(tx, sb, parent)?;
                let (scookie, se) =
                    dir::lookup(tx, &dir_tree(parent, &p)?, key, name)?.ok_or(FsError::NotFound)?;
                let np = load(tx, sb, newparent)?;
                let dst = dir::lookup(tx, &dir_tree(newparent, &np)?, key, newname)?;
                if flags.exchange {
                    let (dcookie, de) = dst.ok_or(FsError::NotFound)?;
                    if se.ino == de.ino {
                        return Ok(());
                    }
                    if parent != newparent {
                        if se.kind == Kind::Dir && is_ancestor(tx, sb, se.ino, newparent)? {
                            return Err(FsError::Invalid("rename into own subdirectory"));
                        }
                        if de.kind == Kind::Dir && is_ancestor(tx, sb, de.ino, parent)? {
                            return Err(FsError::Invalid("rename into own subdirectory"));
                        }
                    }
                    let sd = i32::from(se.kind == Kind::Dir);
                    let dd = i32::from(de.kind == Kind::Dir);
                    let (pdelta, npdelta) = if parent != newparent {
                        (dd - sd, sd - dd)
                    } else {
                        (0, 0)
                    };
                    dir_replace(tx, parent, scookie, name, de.ino, de.kind, pdelta)?;
                    dir_replace(tx, newparent, dcookie, newname, se.ino, se.kind, npdelta)?;
                    let t = now();
                    for (ino, to) in [(se.ino, newparent), (de.ino, parent)] {
                        let mut i = load(tx, sb, ino)?;
                        if i.kind() == Some(Kind::Dir) {
                            i.parent = to;
                        }
                        i.ctime = t;
                        tx.write_inode(ino, &i)?;
                    }
                    return Ok(());
                }
                if let Some((dcookie, de)) = &dst {
                    if flags.noreplace {
                        return Err(FsError::Exists);
                    }
                    if de.ino == se.ino {
                        return Ok(()); // two links of one inode: rename does nothing
                    }
                    if se.kind == Kind::Dir {
                        if de.kind != Kind::Dir {
                            return Err(FsError::NotDir);
                        }
                        let d = load(tx, sb, de.ino)?;
                        if !dir_tree(de.ino, &d)?.is_empty(tx)? {
                            return Err(FsError::NotEmpty);
                        }
                    } else if de.kind == Kind::Dir {
                        return Err(FsError::IsDir);
                    }
                    if se.kind == Kind::Dir && is_ancestor(tx, sb, se.ino, newparent)? {
                        return Err(FsError::Invalid("rename into own subdirectory"));
                    }
                    dir_remove(tx, newparent, *dcookie, de.kind == Kind::Dir)?;
                    drop_link(tx, de.ino, self.referenced(de.ino), de.kind == Kind::Dir)?;
                } else if se.kind == Kind::Dir
                    && parent != newparent
                    && is_ancestor(tx, sb, se.ino, newparent)?
                {
                    return Err(FsError::Invalid("rename into own subdirectory"));
                }
                dir_remove(tx, parent, scookie, se.kind == Kind::Dir)?;
                dir_add(tx, newparent, newname, se.ino, se.kind)?;
                let mut i = load(tx, sb, se.ino)?;
                if se.kind == Kind::Dir {
                    i.parent = newparent;
                }
                i.ctime = now();
                tx.write_inode(se.ino, &i)
            },
            |_| {},
        )
    }

    /// The target of a symbolic link.
    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        self.reading(|core| {
            let i = load(&core.vol, &core.sb, ino)?;
            if kind_of(&i)? != Kind::Symlink {
                return Err(FsError::Invalid("not a symlink"));
            }
            let n = i.size as usize;
            if n > MAX_SYMLINK {
                return Err(FsError::corrupt(format!("symlink {ino} of {n} bytes")));
            }
            if n <= INLINE_SYMLINK_MAX {
                return Ok(i.inline[..n].to_vec());
            }
            let map = ExtentMap::load(&i, ino)?;
            let e = map
                .overlapping(&core.vol, 0, 1)?
                .first()
                .copied()
                .ok_or_else(|| FsError::corrupt(format!("symlink {ino} has no data block")))?;
            let mut b = vec![0u8; core.vol.block_size()];
            core.vol.read_data(e.phys, &mut b)?;
            b.truncate(n);
            Ok(b)
        })
    }

    /// Reads up to `size` bytes at `off`.
    pub fn read(&self, ino: u64, off: u64, size: u32) -> FsResult<Vec<u8>> {
        self.read_with(ino, off, size, <[u8]>::to_vec)
    }

    /// Reads up to `size` bytes at `off` and hands them to `f` (the FUSE reply), from a
    /// per-thread buffer: no allocation or zeroing per read on the hot path.
    pub fn read_with<R>(
        &self,
        ino: u64,
        off: u64,
        size: u32,
        f: impl FnOnce(&[u8]) -> R,
    ) -> FsResult<R> {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let replying = self.replies.read().unwrap_or_else(|e| e.into_inner());
        let (out, touch) = BUF.with(|cell| -> FsResult<(R, bool)> {
            let mut buf = cell.borrow_mut();
            let (core, plan) = self.read_planned(ino, off, size)?;
            let bs = core.vol.block_size() as u64;
            let Some(ReadPlan {
                i,
                end,
                l0,
                l1,
                segs,
            }) = plan
            else {
                return Ok((f(&[]), false));
            };
            let len = ((l1 - l0) * bs) as usize;
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let buf = &mut buf[..len];
            // Holes and unwritten extents read as zeros; everything else from the volume.
            let mut filled = 0usize;
            for seg in segs {
                let at = ((seg.logical - l0) * bs) as usize;
                let n = (seg.len * bs) as usize;
                buf[filled..at].fill(0);
                if seg.unwritten {
                    buf[at..at + n].fill(0);
                } else {
                    core.vol.read_data(seg.phys, &mut buf[at..at + n])?;
                }
                filled = at + n;
            }
            buf[filled..].fill(0);
            let from = (off - l0 * bs) as usize;
            let to = (end - l0 * bs) as usize;
            // relatime: update atime when it is older than mtime/ctime or a day old.
            let t = now();
            let touch = self.opts.atime
                && !self.is_read_only()
                && !core.vol.is_poisoned()
                && self.hooks.get().is_none_or(|h| h.admits())
                && (i.atime <= i.mtime || i.atime <= i.ctime || t.sec - i.atime.sec >= 86_400);
            drop(core);
            Ok((f(&buf[from..to]), touch))
        })?;
        drop(replying);
        if touch {
            let r = self.mutate(
                |tx| {
                    let mut i = load(tx, tx.sb(), ino)?;
                    i.atime = now();
                    tx.write_inode(ino, &i)
                },
                |_| {},
            );
            if let Err(e) = r {
                tracing::debug!(ino, error = %e, "atime update failed");
            }
        }
        Ok(out)
    }

    /// The lock shared and the plan of a read ([`ReadPlan::of`]). While the volume is
    /// taking over, what the plan and the read need from the peer — its inode and extent
    /// blocks, then its data with the read-ahead, in one request — is fetched first with
    /// the lock released (as [`Fs::reading`]), so that the read under the lock finds it.
    fn read_planned(
        &self,
        ino: u64,
        off: u64,
        size: u32,
    ) -> FsResult<(RwLockReadGuard<'_, Core>, Option<ReadPlan>)> {
        for _ in 0..FETCH_ROUNDS {
            let core = self.read_core();
            if !core.vol.is_taking_over() {
                break;
            }
            let fetch = match defer_fetches(|| ReadPlan::of(&core, ino, off, size)) {
                Err(FsError::Volume(VolumeError::FetchDeferred(fetch))) => *fetch,
                Err(e) => return Err(e),
                Ok(plan) => match plan.as_ref().and_then(|p| p.peer_read(&core.vol)) {
                    None => return Ok((core, plan)),
                    Some(fetch) => fetch,
                },
            };
            drop(core);
            fetch.run()?;
        }
        let core = self.read_core();
        let plan = ReadPlan::of(&core, ino, off, size)?;
        Ok((core, plan))
    }

    /// Writes `data` at `off`; returns the bytes written.
    pub fn write(&self, ctx: Ctx, ino: u64, off: u64, data: &[u8]) -> FsResult<u32> {
        if data.len() > u32::MAX as usize {
            return Err(FsError::Invalid("write too large"));
        }
        self.mutate(|tx| write_file(tx, ctx, ino, off, data), |_| {})?;
        Ok(data.len() as u32)
    }

    /// `fallocate(2)`; only mode 0 (allocate, extending the size) is supported.
    pub fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> FsResult<()> {
        if mode != 0 {
            return Err(FsError::NotSupported);
        }
        self.mutate(|tx| fallocate_file(tx, ino, off, len), |_| {})
    }

    /// Lists directory `ino` from `offset`; `f` returns true when its buffer is full.
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        mut f: impl FnMut(&DirItem) -> bool,
    ) -> FsResult<()> {
        self.readdir_inner(ino, offset, false, &mut |item, _| f(item))
    }

    /// As `readdir`, with each entry's attributes (counts a lookup for each, except `.`
    /// and `..`, as the kernel expects of READDIRPLUS).
    pub fn readdir_plus(
        &self,
        ino: u64,
        offset: u64,
        mut f: impl FnMut(&DirItem, &Attr) -> bool,
    ) -> FsResult<()> {
        self.readdir_inner(ino, offset, true, &mut |item, a| {
            let a = a.expect("attributes are loaded in plus mode");
            f(item, a)
        })
    }

    fn readdir_inner(
        &self,
        ino: u64,
        offset: u64,
        plus: bool,
        f: &mut dyn FnMut(&DirItem, Option<&Attr>) -> bool,
    ) -> FsResult<()> {
        if self.read_core().vol.is_taking_over() {
            // The reply cannot be filled twice, so the listing is not run through
            // [`Fs::reading`] itself: a pass that keeps nothing goes first, fetching what
            // the listing reads with the lock released, and the listing then finds it.
            let mut n = 0;
            self.reading(|core| {
                n = 0;
                Self::list(core, ino, offset, plus, &mut |_, _, _| {
                    n += 1;
                    n >= READDIR_AHEAD
                })
            })?;
        }
        let core = self.read_core();
        Self::list(&core, ino, offset, plus, &mut |item, a, dot| {
            let full = f(item, a);
            if plus && !full && !dot {
                self.remember(item.ino);
            }
            full
        })
    }

    /// The entries of directory `ino` from `offset` (with their attributes if `plus`) to
    /// `f`, which is told which are `.` and `..` and returns true to stop.
    fn list(
        core: &Core,
        ino: u64,
        offset: u64,
        plus: bool,
        f: &mut dyn FnMut(&DirItem, Option<&Attr>, bool) -> bool,
    ) -> FsResult<()> {
        let d = load(&core.vol, &core.sb, ino)?;
        let tree = dir_tree(ino, &d)?;
        let attr_for = |i: u64| -> FsResult<Option<Attr>> {
            if plus {
                Ok(Some(Self::attr_of(core, i)?))
            } else {
                Ok(None)
            }
        };
        let dots = [(0u64, ino, &b"."[..]), (1, d.parent, &b".."[..])];
        for (pos, dino, name) in dots {
            if offset <= pos {
                let item = DirItem {
                    ino: dino,
                    kind: Kind::Dir,
                    name: name.to_vec(),
                    next: pos + 1,
                };
                if f(&item, attr_for(dino)?.as_ref(), true) {
                    return Ok(());
                }
            }
        }
        tree.range(&core.vol, offset.max(FIRST_COOKIE), &mut |k, v| {
            let e = dir::decode(v)?;
            let item = DirItem {
                ino: e.ino,
                kind: e.kind,
                name: e.name,
                next: k + 1,
            };
            let a = attr_for(e.ino)?;
            Ok(!f(&item, a.as_ref(), false))
        })?;
        Ok(())
    }

    fn xattrs_of(r: &impl BlockRead, ino: u64, i: &Inode) -> FsResult<Xattrs> {
        if i.xattr_block == 0 {
            return Ok(Xattrs::default());
        }
        Xattrs::decode(&r.read(i.xattr_block)?, ino)
    }

    /// The value of attribute `name`.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        self.reading(|core| {
            let i = load(&core.vol, &core.sb, ino)?;
            Self::xattrs_of(&core.vol, ino, &i)?
                .get(name)
                .map(<[u8]>::to_vec)
                .ok_or(FsError::NoAttr)
        })
    }

    /// All attribute names, NUL-terminated.
    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        self.reading(|core| {
            let i = load(&core.vol, &core.sb, ino)?;
            Ok(Self::xattrs_of(&core.vol, ino, &i)?.list())
        })
    }

    fn update_xattrs(&self, ino: u64, f: impl Fn(&mut Xattrs) -> FsResult<()>) -> FsResult<()> {
        self.mutate(
            |tx| {
                let sb = tx.sb();
                let mut i = load(tx, sb, ino)?;
                let mut x = Self::xattrs_of(tx, ino, &i)?;
                f(&mut x)?;
                if x.entries.is_empty() {
                    if i.xattr_block != 0 {
                        tx.free_meta(i.xattr_block);
                        i.xattr_block = 0;
                        i.blocks = i.blocks.saturating_sub(1);
                    }
                } else {
                    let img = x.encode(tx.bs(), ino).ok_or(FsError::NoSpace)?;
                    if i.xattr_block == 0 {
                        i.xattr_block = tx.alloc_meta(i.root)?;
                        i.blocks += 1;
                    }
                    tx.write(i.xattr_block, img);
                }
                i.ctime = now();
                tx.write_inode(ino, &i)
            },
            |_| {},
        )
    }

    /// Sets attribute `name` (`flags`: `XATTR_CREATE`, `XATTR_REPLACE`).
    ///
    /// POSIX ACLs are refused (EOPNOTSUPP): stored without being enforced they would
    /// promise access rules that the mount does not apply.
    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        if name.starts_with(b"system.posix_acl_") {
            return Err(FsError::NotSupported);
        }
        self.update_xattrs(ino, |x| x.set(name, value, flags))
    }

    /// Removes attribute `name`.
    pub fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        self.update_xattrs(ino, |x| x.remove(name))
    }

    /// Filesystem figures.
    pub fn statfs(&self) -> StatFs {
        let core = self.read_core();
        let free = core.alloc.free_blocks();
        StatFs {
            blocks: core.sb.total_blocks,
            bfree: free,
            bavail: free,
            files: core.sb.inode_count,
            ffree: core.alloc.free_inodes(),
            bsize: core.sb.block_size,
            namelen: crate::format::MAX_NAME as u32,
        }
    }

    /// Makes everything written so far durable (fsync, fsyncdir, syncfs). In replica mode
    /// too: what was written before a switch to replica mode, and what was applied.
    pub fn sync(&self) -> FsResult<()> {
        // (The LU's open entry too: the flush below, without the lock, then covers it.)
        let target = self.seal_with_lu(true)?;
        if let Some(h) = self.hooks.get() {
            h.syncing(target);
        }
        {
            let mut core = self.sync_volume()?;
            let durable = core.vol.durable_tx();
            core.alloc.release_durable(durable);
        }
        self.notify_entries();
        if let Some(h) = self.hooks.get() {
            h.synced(target)?;
        }
        Ok(())
    }

    /// Makes what was applied durable: a read-only secondary's sync (nothing to seal, no
    /// writer to answer). As [`Fs::sync`], the data written in place is flushed first
    /// without the lock, so that the mount's readers wait only for the rest.
    pub fn sync_applied(&self) -> FsResult<()> {
        self.sync_volume().map(drop)
    }

    /// The volume's sync, its in-place data (and LU) flushed ahead without the lock first;
    /// returns the lock, still held.
    fn sync_volume(&self) -> FsResult<RwLockWriteGuard<'_, Core>> {
        let flushed = self.flush_unlocked(|_| true);
        let mut core = self.write_core();
        if let Some(f) = flushed {
            core.vol.flushed_ahead(f)?;
        }
        core.vol.sync()?;
        Ok(core)
    }

    /// The first half of a sync, without the lock (`Volume::flush_ahead`): if `due`,
    /// flushes what was written in place or to the local-unreflected area so far, again
    /// while writers added more during the flush (a few rounds: each flushes what came
    /// during the last, so the sync under the lock is left with little). Returns what
    /// `Volume::flushed_ahead` takes.
    fn flush_unlocked(&self, due: impl FnOnce(&Volume) -> bool) -> Option<Flushed> {
        const ROUNDS: usize = 4;
        if !due(&self.read_core().vol) {
            return None;
        }
        let mut last: Option<(Flushed, FlushMarks)> = None;
        for _ in 0..ROUNDS {
            let Some(ahead) = self.read_core().vol.flush_ahead() else {
                break;
            };
            let marks = ahead.marks();
            if last.as_ref().is_some_and(|(_, m)| *m == marks) {
                break; // nothing written since the last round
            }
            let done = ahead.run();
            let failed = done.failed();
            let done = match last {
                Some((earlier, _)) => done.after(earlier),
                None => done,
            };
            last = Some((done, marks));
            if failed {
                break;
            }
        }
        last.map(|(f, _)| f)
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        if !self.opts.track_lookups {
            return;
        }
        let core = self.write_core();
        let gone = {
            let mut l = self.lookups();
            match l.get_mut(&ino) {
                Some(c) if *c > n => {
                    *c -= n;
                    false
                }
                Some(_) => {
                    l.remove(&ino);
                    true
                }
                None => false,
            }
        };
        if !gone || core.vol.is_poisoned() || self.is_read_only() {
            return;
        }
        let orphan =
            read_inode(&core.vol, &core.sb, ino).is_ok_and(|i| !i.is_free() && i.nlink == 0);
        drop(core);
        if orphan {
            if let Err(e) = self.mutate(|tx| reap_orphan(tx, ino), |_| {}) {
                tracing::warn!(ino, error = %e, "could not free an unlinked inode; it is freed at the next mount");
            }
        }
    }

    /// Periodic work (group commit timer, checkpoints); call about every 100 ms.
    pub fn maintain(&self) -> FsResult<()> {
        let now = Instant::now();
        // Without the lock: a due group commit's flush of the data written in place (and
        // of the LU's open entry, sealed first under a short lock) runs while the
        // filesystem goes on serving.
        let (due, taking) = {
            let core = self.read_core();
            (core.vol.commit_due(now), core.vol.is_taking_over())
        };
        if due && taking {
            self.write_core().vol.seal_local_unreflected()?;
        }
        let flushed = self.flush_unlocked(|_| due);
        let (did, writeback) = {
            let mut core = self.write_core();
            if let Some(f) = flushed {
                core.vol.flushed_ahead(f)?;
            }
            let did = core.vol.maintain(now)?;
            let durable = core.vol.durable_tx();
            core.alloc.release_durable(durable);
            (did, core.vol.take_writeback())
        };
        // Data written in place and still not durable starts its way to the disk.
        pairfs::volume::start_writeback(writeback);
        if did {
            self.notify_entries();
        }
        Ok(())
    }

    /// Checkpoints everything and marks the journal clean (unmount).
    pub fn close(&self) -> FsResult<()> {
        let mut core = self.write_core();
        core.vol.close()?;
        Ok(())
    }

    /// Waits until every read that started before now has sent its reply (see `replies`).
    pub fn wait_for_reads(&self) {
        drop(self.replies.write().unwrap_or_else(|e| e.into_inner()));
    }

    /// Runs `f` with the volume (status, statistics).
    pub fn with_volume<T>(&self, f: impl FnOnce(&Volume) -> T) -> T {
        f(&self.read_core().vol)
    }

    /// The blocks a filesystem turning writable reads first: the superblock and the
    /// allocation bitmaps (their places are fixed at mkfs).
    pub fn allocation_blocks(sb: &Superblock) -> Vec<pairfs::BlockNo> {
        std::iter::once(0)
            .chain(sb.bbm_start..sb.bbm_start + sb.bbm_blocks)
            .chain(sb.ibm_start..sb.ibm_start + sb.ibm_blocks)
            .collect()
    }

    /// What a taker fetches from the old primary with the allocation blocks, in the same
    /// request: the root directory's inode, and the inode table (of which the taker asks
    /// for the blocks the backlog wrote last: a new inode is allocated after its parent's,
    /// so the first creates after ready are likely to land in them).
    pub fn inode_blocks_ahead(
        sb: &Superblock,
    ) -> (pairfs::BlockNo, std::ops::Range<pairfs::BlockNo>) {
        let root = sb.inode_location(ROOT_INO).0;
        (root, sb.itab_start..sb.itab_start + sb.itab_blocks)
    }

    /// The block of directory `ino`'s B-tree root as this node's state has it. A taker
    /// asks for it at ready (if the backlog changed it) as its guess of where the old
    /// primary's root directory starts: every path's lookup reads it, and a tree's root
    /// moves only when it splits or shrinks (a wrong guess costs one block fetched).
    pub fn dir_tree_root(&self, ino: u64) -> FsResult<pairfs::BlockNo> {
        let core = self.read_core();
        let i = load(&core.vol, &core.sb, ino)?;
        Ok(dir_tree(ino, &i)?.root)
    }

    /// The superblock.
    pub fn superblock(&self) -> Superblock {
        self.read_core().sb.clone()
    }

    /// Number of kernel-referenced inodes (tests, diagnostics).
    pub fn referenced_inodes(&self) -> usize {
        self.lookups().len()
    }

    /// The inodes the kernel holds references to (to invalidate them all on a replica
    /// whose volume was replaced by a copy).
    pub fn referenced_inode_list(&self) -> Vec<u64> {
        self.lookups().keys().copied().collect()
    }

    /// Gives the volume back (after `close`), e.g. to run `fsck` on it.
    pub fn into_volume(self) -> Volume {
        self.core
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .vol
    }
}

/// What a read of a file covers: its inode, the end of the bytes it returns, its block
/// range and the extents inside it (clipped to it).
struct ReadPlan {
    i: Inode,
    end: u64,
    l0: u64,
    l1: u64,
    segs: Vec<Extent>,
}

impl ReadPlan {
    /// The plan of a read of `size` bytes at `off` of file `ino`; `None` if it reads
    /// nothing (at or past the end).
    fn of(core: &Core, ino: u64, off: u64, size: u32) -> FsResult<Option<ReadPlan>> {
        let bs = core.vol.block_size() as u64;
        let i = load(&core.vol, &core.sb, ino)?;
        match kind_of(&i)? {
            Kind::File => {}
            Kind::Dir => return Err(FsError::IsDir),
            _ => return Err(FsError::Invalid("read of a special file")),
        }
        let end = off.saturating_add(u64::from(size)).min(i.size);
        if off >= end {
            return Ok(None);
        }
        let (l0, l1) = (off / bs, end.div_ceil(bs));
        let map = ExtentMap::load(&i, ino)?;
        let segs = map
            .overlapping(&core.vol, l0, l1)?
            .iter()
            .filter_map(|e| e.clip(l0, l1))
            .collect();
        Ok(Some(ReadPlan {
            i,
            end,
            l0,
            l1,
            segs,
        }))
    }

    /// The fetch from the peer its written extents need, if the volume is taking over.
    fn peer_read(&self, vol: &Volume) -> Option<pairfs::volume::PeerRead> {
        if !vol.is_taking_over() {
            return None;
        }
        let ranges: Vec<(u64, u64)> = self
            .segs
            .iter()
            .filter(|s| !s.unwritten)
            .map(|s| (s.phys, s.len))
            .collect();
        vol.plan_peer_read(&ranges)
    }
}

#[cfg(test)]
mod tests;
