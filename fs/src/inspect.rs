//! Read-only questions about the filesystem on a volume, for tools such as `pairfs verify`:
//! which blocks are in use (the block bitmap, FORMAT.md §3.1), and what a block belongs to
//! (a walk of the tree, like `fsck`'s). Both read through [`Volume::read_block`], so they
//! see the volume's current state, committed images included.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use bitvec::prelude::*;
use pairfs::{BlockNo, Volume};

use crate::btree::{BTree, TREE_DIR, TREE_EXTENT};
use crate::dir;
use crate::error::{FsError, FsResult};
use crate::extent::ExtentMap;
use crate::format::{FLAG_EXTENT_TREE, INLINE_SYMLINK_MAX, Kind, ORPHAN_INO, ROOT_INO, Superblock};
use crate::tx::read_inode;

/// The superblock of the filesystem on `vol`.
pub fn superblock(vol: &Volume) -> FsResult<Superblock> {
    let b = vol.read_block(0)?;
    Superblock::decode(&b, vol.block_count()).map_err(FsError::BadSuperblock)
}

/// The blocks in use among `start..end`, in order, from the block bitmap.
pub fn blocks_in_use(vol: &Volume, sb: &Superblock, start: u64, end: u64) -> FsResult<Vec<u64>> {
    let end = end.min(sb.total_blocks);
    let bits = vol.block_size() as u64 * 8;
    let mut out = Vec::new();
    let mut b = start;
    while b < end {
        let index = b / bits;
        if index >= sb.bbm_blocks {
            break;
        }
        let map = vol.read_block(sb.bbm_start + index)?;
        let bitmap = map.view_bits::<Lsb0>();
        let stop = end.min((index + 1) * bits);
        for n in b..stop {
            if bitmap[(n - index * bits) as usize] {
                out.push(n);
            }
        }
        b = stop;
    }
    Ok(out)
}

/// What a block of the volume belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// Filesystem metadata: the superblock, a bitmap, the inode table, a directory or
    /// extent tree node, an attribute or symlink block.
    Metadata(String),
    /// Data of a file, at this byte offset.
    File {
        /// Inode number.
        ino: u64,
        /// A path to it (`<unlinked>` for an unlinked-but-open file).
        path: String,
        /// Byte offset of the block in the file.
        offset: u64,
        /// Allocated by `fallocate` and never written: its content is not visible (reads
        /// as zeros), so a difference there changes nothing.
        unwritten: bool,
    },
    /// Nothing in the tree references it (free now, or leaked).
    Unreferenced,
}

impl Owner {
    /// True when the block's content is something a reader of the filesystem can see.
    pub fn visible(&self) -> bool {
        !matches!(
            self,
            Owner::Unreferenced
                | Owner::File {
                    unwritten: true,
                    ..
                }
        )
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Metadata(what) => write!(f, "metadata: {what}"),
            Owner::File {
                path,
                offset,
                unwritten,
                ..
            } => write!(
                f,
                "{path} at offset {offset}{}",
                if *unwritten {
                    " (allocated, never written: not visible)"
                } else {
                    ""
                }
            ),
            Owner::Unreferenced => f.write_str("not referenced by any file (free)"),
        }
    }
}

/// What each of `blocks` belongs to: one walk of the whole tree (as long as `fsck`'s).
pub fn locate(vol: &Volume, blocks: &[BlockNo]) -> FsResult<BTreeMap<BlockNo, Owner>> {
    let sb = superblock(vol)?;
    let wanted: HashSet<BlockNo> = blocks.iter().copied().collect();
    let mut found: BTreeMap<BlockNo, Owner> = BTreeMap::new();
    let meta = |b: BlockNo, what: &dyn Fn() -> String, found: &mut BTreeMap<_, _>| {
        if wanted.contains(&b) {
            found.insert(b, Owner::Metadata(what()));
        }
    };
    for &b in blocks {
        let area = if b == 0 {
            Some("superblock".to_string())
        } else if (sb.bbm_start..sb.bbm_start + sb.bbm_blocks).contains(&b) {
            Some("block bitmap".into())
        } else if (sb.ibm_start..sb.ibm_start + sb.ibm_blocks).contains(&b) {
            Some("inode bitmap".into())
        } else if (sb.itab_start..sb.itab_start + sb.itab_blocks).contains(&b) {
            let per = sb.inodes_per_block();
            let first = (b - sb.itab_start) * per + 1;
            Some(format!("inode table (inodes {first}..{})", first + per - 1))
        } else if b < sb.data_start {
            Some("reserved".into())
        } else {
            None
        };
        if let Some(a) = area {
            found.insert(b, Owner::Metadata(a));
        }
    }
    // Breadth first from the root, the name of each inode as first met.
    let mut names: HashMap<u64, (u64, Vec<u8>)> = HashMap::new();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut queue: VecDeque<u64> = VecDeque::from([ROOT_INO, ORPHAN_INO]);
    seen.extend([ROOT_INO, ORPHAN_INO]);
    let mut owners: Vec<(BlockNo, u64, u64, bool)> = Vec::new(); // block, ino, offset, unwritten
    while let Some(ino) = queue.pop_front() {
        let Ok(i) = read_inode(vol, &sb, ino) else {
            continue;
        };
        if i.xattr_block != 0 {
            meta(
                i.xattr_block,
                &|| format!("attributes of inode {ino}"),
                &mut found,
            );
        }
        match i.kind() {
            Some(Kind::Dir) => {
                let tree = BTree {
                    root: i.root,
                    tree: TREE_DIR,
                    owner: ino,
                };
                let _ = tree.visit(vol, &mut |b, _| {
                    meta(b, &|| format!("directory tree of inode {ino}"), &mut found);
                    Ok(())
                });
                let _ = tree.range(vol, 0, &mut |_, v| {
                    let e = dir::decode(v)?;
                    if seen.insert(e.ino) {
                        names.insert(e.ino, (ino, e.name));
                        queue.push_back(e.ino);
                    }
                    Ok(true)
                });
            }
            Some(Kind::File) | Some(Kind::Symlink) => {
                if i.kind() == Some(Kind::Symlink) && i.size <= INLINE_SYMLINK_MAX as u64 {
                    continue;
                }
                let Ok(map) = ExtentMap::load(&i, ino) else {
                    continue;
                };
                if i.flags & FLAG_EXTENT_TREE != 0 {
                    let tree = BTree {
                        root: i.root,
                        tree: TREE_EXTENT,
                        owner: ino,
                    };
                    let _ = tree.visit(vol, &mut |b, _| {
                        meta(b, &|| format!("extent tree of inode {ino}"), &mut found);
                        Ok(())
                    });
                }
                let bs = vol.block_size() as u64;
                for e in map.all(vol).unwrap_or_default() {
                    for &b in blocks {
                        if b >= e.phys && b < e.phys + e.len {
                            owners.push((b, ino, (e.logical + b - e.phys) * bs, e.unwritten));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    for (b, ino, offset, unwritten) in owners {
        found.insert(
            b,
            Owner::File {
                ino,
                path: path_of(ino, &names),
                offset,
                unwritten,
            },
        );
    }
    for &b in blocks {
        found.entry(b).or_insert(Owner::Unreferenced);
    }
    Ok(found)
}

/// A path from the root to `ino` along the names met on the walk.
fn path_of(mut ino: u64, names: &HashMap<u64, (u64, Vec<u8>)>) -> String {
    let mut parts: Vec<String> = Vec::new();
    for _ in 0..names.len() + 1 {
        match names.get(&ino) {
            Some((parent, name)) if *parent == ORPHAN_INO => {
                let _ = name;
                return "<unlinked>".into();
            }
            Some((parent, name)) => {
                parts.push(String::from_utf8_lossy(name).into_owned());
                ino = *parent;
            }
            None => break,
        }
    }
    parts.reverse();
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pairfs::{MemDevice, VolumeId, VolumeOptions};

    use super::*;
    use crate::fs::{Ctx, FormatOptions, Fs, FsOptions};

    #[test]
    fn blocks_of_a_file_are_located_with_their_path_and_offset() {
        let n = Arc::new(MemDevice::new(4096 * 4096));
        let j = Arc::new(MemDevice::new(256 * 4096));
        Volume::create(&*n, &*j, VolumeId([5; 16]), 4096).unwrap();
        let mut v = Volume::open(Box::new(n), Box::new(j), VolumeOptions::default()).unwrap();
        Fs::format(&mut v, &FormatOptions::default()).unwrap();
        let fs = Fs::open(v, FsOptions::default()).unwrap();
        let c = Ctx::default();
        let d = fs.mkdir(c, ROOT_INO, b"dir", 0o755).unwrap();
        let f = fs.mknod(c, d.ino, b"f", libc::S_IFREG | 0o644, 0).unwrap();
        fs.write(c, f.ino, 0, &vec![7u8; 5 * 4096]).unwrap();
        fs.fallocate(f.ino, 5 * 4096, 4096, 0).unwrap();
        fs.sync().unwrap();
        let (sb, used) = fs.with_volume(|v| {
            let sb = superblock(v).unwrap();
            let used = blocks_in_use(v, &sb, sb.data_start, sb.total_blocks).unwrap();
            (sb, used)
        });
        assert!(used.len() >= 6, "{used:?}");
        let owners = fs.with_volume(|v| locate(v, &used)).unwrap();
        let files: Vec<&Owner> = owners
            .values()
            .filter(|o| matches!(o, Owner::File { .. }))
            .collect();
        assert_eq!(files.len(), 6, "{owners:?}");
        assert!(files.iter().any(|o| matches!(o, Owner::File { path, offset: 8192, unwritten: false, .. } if path == "/dir/f")));
        assert_eq!(
            files.iter().filter(|o| !o.visible()).count(),
            1,
            "the fallocated block"
        );
        let meta = fs
            .with_volume(|v| locate(v, &[0, sb.itab_start, sb.bbm_start]))
            .unwrap();
        assert!(
            meta.values().all(|o| matches!(o, Owner::Metadata(_))),
            "{meta:?}"
        );
        let far = fs
            .with_volume(|v| locate(v, &[sb.total_blocks - 1]))
            .unwrap();
        assert_eq!(far[&(sb.total_blocks - 1)], Owner::Unreferenced);
    }
}
