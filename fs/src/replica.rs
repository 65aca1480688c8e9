//! A secondary's filesystem: the volume changes underneath by replication, and the caches
//! above it — the FS core's and the kernel's — must follow at every entry boundary.
//!
//! [`Fs::apply_replicated`] applies one entry and works out what the kernel may hold that
//! changed: inodes whose on-disk slot changed (attributes, size, content) and directory
//! entries that disappeared or now point elsewhere. The node invalidates those through
//! fuser's notifier, outside every lock.

use std::collections::HashMap;

use pairfs::repl::{EntryMeta, WireEntry};

use crate::btree::decode_dir_leaf;
use crate::error::FsResult;
use crate::format::INODE_SIZE;
use crate::fs::Fs;

/// What the kernel must forget after an apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Invalidations {
    /// Inodes whose attributes or data changed.
    pub inodes: Vec<u64>,
    /// `(directory, name)` entries removed or redirected.
    pub entries: Vec<(u64, Vec<u8>)>,
}

impl Fs {
    /// Applies a replicated entry to the volume (visible at once, durable with the next
    /// sync) and returns it as it is in this journal and what changed for the kernel's
    /// caches.
    pub fn apply_replicated(&self, e: &WireEntry) -> FsResult<(EntryMeta, Invalidations)> {
        let sb = self.superblock();
        let per_block = sb.inodes_per_block();
        let itab = sb.itab_start..sb.itab_start + sb.itab_blocks;
        // Old content of the blocks that are (or were) inode-table blocks or directory
        // leaves, read before the apply (a freed leaf's entries vanish without a new image).
        // A block the primary marked fresh was free before this entry: nothing the kernel
        // holds came from it, so the bulk of a data write is not read back here.
        let mut old: HashMap<u64, Vec<u8>> = HashMap::new();
        self.with_volume(|v| {
            let mut buf = vec![0u8; v.block_size()];
            for b in &e.blocks {
                if b.fresh && !itab.contains(&b.block) {
                    continue;
                }
                if v.read_current(b.block, &mut buf).is_err() {
                    continue;
                }
                if itab.contains(&b.block) || decode_dir_leaf(&buf).is_some() {
                    old.insert(b.block, buf.clone());
                }
            }
        });
        // The entry's blocks written in place (fresh: free in the applied state, so that no
        // reader reaches them) without the lock: readers of the replica go on meanwhile
        // (FORMAT.md §2.4 rule 2).
        let plan = self.with_volume_mut(|v| v.plan_apply(e))?;
        let written = plan.write(e);
        let meta = self.with_volume_mut(|v| v.finish_apply(e, plan, written))?;
        let blocks: Vec<u64> = e.blocks.iter().map(|b| b.block).collect();
        self.refresh_after_apply(&blocks)?;
        let mut inv = Invalidations::default();
        for b in &e.blocks {
            let Some(before) = old.get(&b.block) else {
                continue;
            };
            if itab.contains(&b.block) {
                for i in 0..per_block as usize {
                    let r = i * INODE_SIZE..(i + 1) * INODE_SIZE;
                    if before[r.clone()] != b.data[r] {
                        inv.inodes
                            .push((b.block - sb.itab_start) * per_block + i as u64 + 1);
                    }
                }
                continue;
            }
            if let Some((owner, was)) = decode_dir_leaf(before) {
                let now: HashMap<Vec<u8>, u64> = decode_dir_leaf(&b.data)
                    .filter(|(o, _)| *o == owner)
                    .map(|(_, v)| v.into_iter().collect())
                    .unwrap_or_default();
                for (name, ino) in was {
                    if now.get(&name) != Some(&ino) {
                        inv.entries.push((owner, name));
                    }
                }
            }
        }
        Ok((meta, inv))
    }
}
