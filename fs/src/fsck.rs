//! `fsck`: checks every on-disk invariant of FORMAT.md §3 and reports each violation.
//!
//! It walks the tree from the root (and the orphan directory), validating every inode,
//! directory and extent tree on the way, recomputes link counts, block counts and both
//! bitmaps, and compares them with what is stored. It never writes: it runs on a volume
//! opened read-only, whose journal is replayed in memory.

use std::collections::{HashMap, VecDeque};

use bitvec::prelude::*;
use pairfs::{BlockNo, Volume};

use crate::alloc::load_bitmap;
use crate::btree::{BTree, TREE_DIR};
use crate::dir;
use crate::error::FsError;
use crate::extent::ExtentMap;
use crate::format::{
    FLAG_EXTENT_TREE, INLINE_SYMLINK_MAX, Inode, Kind, MAX_NAME, MAX_SYMLINK, ORPHAN_INO, ROOT_INO,
    Superblock,
};
use crate::fs::{MAX_FILE_SIZE, MAX_LINKS};
use crate::tx::read_inode;
use crate::xattr::Xattrs;

/// Most problems listed per kind before the rest are only counted.
const MAX_LISTED: usize = 50;

/// What `fsck` found.
#[derive(Clone, Debug, Default)]
pub struct FsckReport {
    /// Invariant violations, one readable line each.
    pub errors: Vec<String>,
    /// Violations beyond `MAX_LISTED` (counted, not listed).
    pub more_errors: usize,
    /// Directories checked.
    pub dirs: u64,
    /// Regular files checked.
    pub files: u64,
    /// Symlinks checked.
    pub symlinks: u64,
    /// Other special files checked.
    pub specials: u64,
    /// Blocks in use.
    pub blocks_used: u64,
    /// Unlinked-but-open inodes waiting to be freed.
    pub orphans: u64,
}

impl FsckReport {
    /// True if no invariant is violated.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }

    fn error(&mut self, msg: String) {
        if self.errors.len() < MAX_LISTED {
            self.errors.push(msg);
        } else {
            self.more_errors += 1;
        }
    }
}

struct Checker<'a> {
    vol: &'a Volume,
    sb: Superblock,
    /// Blocks owned by something (recomputed bitmap).
    owned: BitVec<u64, Lsb0>,
    /// Directory entries pointing at each inode.
    refs: HashMap<u64, u32>,
    /// Subdirectories of each directory.
    subdirs: HashMap<u64, u32>,
    /// Inodes reached, with their inode.
    seen: HashMap<u64, Inode>,
    /// Inodes listed in the orphan directory.
    orphans: std::collections::HashSet<u64>,
    report: FsckReport,
}

/// Checks the filesystem on `vol`.
pub fn fsck(vol: &Volume) -> FsckReport {
    let mut report = FsckReport::default();
    let sb = match vol
        .read_block(0)
        .map_err(FsError::from)
        .and_then(|b| Superblock::decode(&b, vol.block_count()).map_err(FsError::BadSuperblock))
    {
        Ok(sb) => sb,
        Err(e) => {
            report.error(format!("superblock: {e}"));
            return report;
        }
    };
    if sb.uuid != vol.id() {
        report.error(format!(
            "superblock uuid {} differs from the journal's {}",
            sb.uuid,
            vol.id()
        ));
    }
    let mut c = Checker {
        vol,
        owned: bitvec![u64, Lsb0; 0; sb.total_blocks as usize],
        sb,
        refs: HashMap::new(),
        subdirs: HashMap::new(),
        seen: HashMap::new(),
        orphans: Default::default(),
        report,
    };
    c.owned[..c.sb.data_start as usize].fill(true);
    c.walk();
    c.check_counts();
    c.check_bitmaps();
    c.report.blocks_used = c.owned.count_ones() as u64;
    c.report
}

impl Checker<'_> {
    fn claim(&mut self, b: BlockNo, what: &str) {
        if b < self.sb.data_start || b >= self.sb.total_blocks {
            self.report
                .error(format!("{what}: block {b} outside the data area"));
            return;
        }
        if self.owned[b as usize] {
            self.report
                .error(format!("{what}: block {b} is used twice"));
        }
        self.owned.set(b as usize, true);
    }

    fn inode(&mut self, ino: u64, ctx: &str) -> Option<Inode> {
        match read_inode(self.vol, &self.sb, ino) {
            Ok(i) if i.is_free() => {
                self.report
                    .error(format!("{ctx}: inode {ino} is referenced but free"));
                None
            }
            Ok(i) => Some(i),
            Err(e) => {
                self.report.error(format!("{ctx}: inode {ino}: {e}"));
                None
            }
        }
    }

    fn walk(&mut self) {
        let mut queue: VecDeque<u64> = VecDeque::new();
        for top in [ROOT_INO, ORPHAN_INO] {
            if let Some(i) = self.inode(top, "root") {
                if i.kind() != Some(Kind::Dir) {
                    self.report.error(format!("inode {top} is not a directory"));
                    continue;
                }
                if i.parent != top {
                    self.report.error(format!(
                        "inode {top}: parent {} instead of itself",
                        i.parent
                    ));
                }
                self.seen.insert(top, i);
                queue.push_back(top);
            }
        }
        while let Some(d) = queue.pop_front() {
            let Some(di) = self.seen.get(&d).cloned() else {
                continue;
            };
            self.check_owned_blocks(d, &di);
            if di.kind() != Some(Kind::Dir) {
                continue;
            }
            let tree = BTree {
                root: di.root,
                tree: TREE_DIR,
                owner: d,
            };
            let mut nodes = Vec::new();
            if let Err(e) = tree.visit(self.vol, &mut |b, _| {
                nodes.push(b);
                Ok(())
            }) {
                self.report.error(format!("directory {d}: {e}"));
            }
            for &b in &nodes {
                self.claim(b, &format!("directory {d} tree"));
            }
            if di.blocks != nodes.len() as u64 + u64::from(di.xattr_block != 0) {
                self.report.error(format!(
                    "directory {d}: blocks {} but owns {}",
                    di.blocks,
                    nodes.len() as u64 + u64::from(di.xattr_block != 0)
                ));
            }
            let mut entries = Vec::new();
            if let Err(e) = tree.range(self.vol, 0, &mut |k, v| {
                entries.push((k, dir::decode(v)?));
                Ok(true)
            }) {
                self.report.error(format!("directory {d}: {e}"));
            }
            if di.count != entries.len() as u64 {
                self.report.error(format!(
                    "directory {d}: count {} but {} entries",
                    di.count,
                    entries.len()
                ));
            }
            for (cookie, e) in entries {
                self.check_entry(d, cookie, &e, &mut queue);
            }
        }
    }

    fn check_entry(&mut self, d: u64, cookie: u64, e: &dir::DirEntry, queue: &mut VecDeque<u64>) {
        let ctx = format!("directory {d} entry {:?}", String::from_utf8_lossy(&e.name));
        if d == ORPHAN_INO {
            if cookie != e.ino || !e.name.is_empty() {
                self.report
                    .error(format!("orphan directory: bad entry {cookie} -> {}", e.ino));
            }
        } else {
            if e.name.is_empty() || e.name.len() > MAX_NAME || e.name.contains(&b'/') {
                self.report.error(format!("{ctx}: invalid name"));
            }
            let h = dir::name_hash(&self.sb.hash_key, &e.name);
            if cookie < h || cookie >= h + dir::PROBE {
                self.report.error(format!(
                    "{ctx}: cookie {cookie} does not match the name hash"
                ));
            }
        }
        if !self.sb.valid_ino(e.ino) || e.ino == ROOT_INO || e.ino == ORPHAN_INO {
            self.report
                .error(format!("{ctx}: invalid inode number {}", e.ino));
            return;
        }
        if d == ORPHAN_INO {
            self.orphans.insert(e.ino);
        } else {
            *self.refs.entry(e.ino).or_insert(0) += 1;
            if e.kind == Kind::Dir {
                *self.subdirs.entry(d).or_insert(0) += 1;
            }
        }
        if self.seen.contains_key(&e.ino) {
            if e.kind == Kind::Dir {
                self.report
                    .error(format!("{ctx}: directory {} linked twice", e.ino));
            }
            return;
        }
        let Some(i) = self.inode(e.ino, &ctx) else {
            return;
        };
        if i.kind() != Some(e.kind) {
            self.report.error(format!(
                "{ctx}: entry type {:?} but inode {} has mode {:o}",
                e.kind, e.ino, i.mode
            ));
        }
        if e.kind == Kind::Dir && d != ORPHAN_INO && i.parent != d {
            self.report.error(format!(
                "{ctx}: directory {} has parent {} instead of {d}",
                e.ino, i.parent
            ));
        }
        if d == ORPHAN_INO {
            self.report.orphans += 1;
        }
        match i.kind() {
            Some(Kind::Dir) => self.report.dirs += 1,
            Some(Kind::File) => self.report.files += 1,
            Some(Kind::Symlink) => self.report.symlinks += 1,
            _ => self.report.specials += 1,
        }
        self.seen.insert(e.ino, i);
        queue.push_back(e.ino);
    }

    /// Extents, extent tree, xattr block and block count of a non-directory (and the xattr
    /// block of a directory).
    fn check_owned_blocks(&mut self, ino: u64, i: &Inode) {
        if i.xattr_block != 0 {
            self.claim(i.xattr_block, &format!("inode {ino} xattr block"));
            match self.vol.read_block(i.xattr_block) {
                Ok(b) => {
                    if let Err(e) = Xattrs::decode(&b, ino) {
                        self.report.error(e.to_string());
                    }
                }
                Err(e) => self.report.error(format!("inode {ino} xattr block: {e}")),
            }
        }
        let kind = i.kind();
        if kind == Some(Kind::Dir) {
            return;
        }
        let uses_extents = match kind {
            Some(Kind::File) => true,
            Some(Kind::Symlink) => {
                if i.size == 0 || i.size > MAX_SYMLINK as u64 {
                    self.report
                        .error(format!("symlink {ino}: bad length {}", i.size));
                }
                i.size > INLINE_SYMLINK_MAX as u64
            }
            _ => false,
        };
        if !uses_extents {
            if i.flags & FLAG_EXTENT_TREE != 0 || (kind != Some(Kind::Symlink) && i.count != 0) {
                self.report
                    .error(format!("inode {ino}: special file with extents"));
            }
            if i.blocks != u64::from(i.xattr_block != 0) {
                self.report.error(format!(
                    "inode {ino}: blocks {} for a special file",
                    i.blocks
                ));
            }
            return;
        }
        if i.size > MAX_FILE_SIZE {
            self.report
                .error(format!("inode {ino}: size {} too large", i.size));
        }
        let map = match ExtentMap::load(i, ino) {
            Ok(m) => m,
            Err(e) => {
                self.report.error(format!("inode {ino}: {e}"));
                return;
            }
        };
        let mut owned = u64::from(i.xattr_block != 0);
        if i.flags & FLAG_EXTENT_TREE != 0 {
            let tree = BTree {
                root: i.root,
                tree: crate::btree::TREE_EXTENT,
                owner: ino,
            };
            let mut nodes = Vec::new();
            if let Err(e) = tree.visit(self.vol, &mut |b, _| {
                nodes.push(b);
                Ok(())
            }) {
                self.report.error(format!("inode {ino} extent tree: {e}"));
            }
            for &b in &nodes {
                self.claim(b, &format!("inode {ino} extent tree"));
            }
            owned += nodes.len() as u64;
        }
        let bs = u64::from(self.sb.block_size);
        match map.all(self.vol) {
            Ok(exts) => {
                for e in exts {
                    if e.phys < self.sb.data_start
                        || e.phys
                            .checked_add(e.len)
                            .is_none_or(|end| end > self.sb.total_blocks)
                    {
                        self.report.error(format!(
                            "inode {ino}: extent {}+{} -> {} outside the data area",
                            e.logical, e.len, e.phys
                        ));
                        continue;
                    }
                    if e.end() > i.size.div_ceil(bs) {
                        self.report.error(format!(
                            "inode {ino}: extent {}+{} beyond the size {}",
                            e.logical, e.len, i.size
                        ));
                    }
                    for b in e.phys..e.phys + e.len {
                        self.claim(b, &format!("inode {ino} data"));
                    }
                    owned += e.len;
                }
            }
            Err(e) => self.report.error(format!("inode {ino} extents: {e}")),
        }
        if owned != i.blocks {
            self.report
                .error(format!("inode {ino}: blocks {} but owns {owned}", i.blocks));
        }
    }

    fn check_counts(&mut self) {
        let seen: Vec<(u64, u32, bool)> = self
            .seen
            .iter()
            .map(|(k, v)| (*k, v.nlink, v.kind() == Some(Kind::Dir)))
            .collect();
        for (ino, nlink, is_dir) in seen {
            let refs = self.refs.get(&ino).copied().unwrap_or(0);
            let expect = if self.orphans.contains(&ino) {
                if refs > 0 {
                    self.report.error(format!(
                        "inode {ino}: orphan that is still linked {refs} times"
                    ));
                }
                0
            } else if is_dir {
                2 + self.subdirs.get(&ino).copied().unwrap_or(0)
            } else {
                refs
            };
            if nlink != expect {
                self.report
                    .error(format!("inode {ino}: nlink {nlink} but {expect} links"));
            }
            if nlink > MAX_LINKS + 2 {
                self.report
                    .error(format!("inode {ino}: nlink {nlink} too large"));
            }
        }
    }

    fn check_bitmaps(&mut self) {
        let sb = self.sb.clone();
        match load_bitmap(self.vol, sb.bbm_start, sb.bbm_blocks, sb.total_blocks) {
            Ok(disk) => {
                let mut listed = 0;
                for b in 0..sb.total_blocks as usize {
                    if disk[b] != self.owned[b] {
                        listed += 1;
                        if listed <= 20 {
                            self.report.error(if disk[b] {
                                format!("block {b} is marked used but nothing owns it (leak)")
                            } else {
                                format!("block {b} is in use but marked free")
                            });
                        }
                    }
                }
                if listed > 20 {
                    self.report
                        .error(format!("… {} more block bitmap differences", listed - 20));
                }
            }
            Err(e) => self.report.error(format!("block bitmap: {e}")),
        }
        match load_bitmap(self.vol, sb.ibm_start, sb.ibm_blocks, sb.inode_count) {
            Ok(disk) => {
                let mut listed = 0;
                for idx in 0..sb.inode_count as usize {
                    let ino = idx as u64 + 1;
                    let reached = self.seen.contains_key(&ino);
                    if disk[idx] != reached {
                        listed += 1;
                        if listed <= 20 {
                            self.report.error(if disk[idx] {
                                format!("inode {ino} is allocated but in no directory")
                            } else {
                                format!("inode {ino} is in use but marked free")
                            });
                        }
                    }
                }
                if listed > 20 {
                    self.report
                        .error(format!("… {} more inode bitmap differences", listed - 20));
                }
            }
            Err(e) => self.report.error(format!("inode bitmap: {e}")),
        }
    }
}
