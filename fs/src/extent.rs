//! File extents (FORMAT.md §3.5): up to five inline in the inode, else an extent B-tree.
//!
//! Every operation is phrased as "what maps `[l0, l1)`" ([`ExtentMap::overlapping`]),
//! "unmap `[l0, l1)`" ([`ExtentMap::remove_range`], which splits extents crossing the
//! bounds) and "map this unmapped range" ([`ExtentMap::insert_merge`], which merges with
//! contiguous neighbours), so the inline and tree forms share one set of rules.

use pairfs::BlockNo;
use pairfs::types::{get_u32, get_u64, put_u32, put_u64};

use crate::btree::{BTree, TREE_EXTENT};
use crate::error::{FsError, FsResult};
use crate::format::{FLAG_EXTENT_TREE, INLINE_EXTENTS, Inode};
use crate::tx::{BlockRead, BlockWrite};

/// Longest extent: the on-disk length is a `u32`.
pub(crate) const MAX_EXTENT_LEN: u64 = u32::MAX as u64;
/// Extent flag: allocated but never written (reads as zeros).
pub(crate) const EXT_UNWRITTEN: u32 = 1;

/// `len` logical blocks from `logical` mapped to physical blocks from `phys`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    /// First logical block.
    pub(crate) logical: u64,
    /// First physical block.
    pub(crate) phys: BlockNo,
    /// Number of blocks.
    pub(crate) len: u64,
    /// Allocated by `fallocate`, reads as zeros.
    pub(crate) unwritten: bool,
}

impl Extent {
    /// One past the last logical block.
    pub(crate) fn end(&self) -> u64 {
        self.logical + self.len
    }
    fn flags(&self) -> u32 {
        if self.unwritten { EXT_UNWRITTEN } else { 0 }
    }
    fn value(&self) -> [u8; 16] {
        let mut v = [0u8; 16];
        put_u64(&mut v, 0, self.phys);
        put_u32(&mut v, 8, self.len as u32);
        put_u32(&mut v, 12, self.flags());
        v
    }
    fn from_value(logical: u64, v: &[u8]) -> FsResult<Extent> {
        if v.len() != 16 {
            return Err(FsError::corrupt("extent value length"));
        }
        let e = Extent {
            logical,
            phys: get_u64(v, 0),
            len: u64::from(get_u32(v, 8)),
            unwritten: get_u32(v, 12) & EXT_UNWRITTEN != 0,
        };
        if e.len == 0 {
            return Err(FsError::corrupt("empty extent"));
        }
        Ok(e)
    }
    /// The part of this extent inside `[l0, l1)`, if any.
    pub(crate) fn clip(&self, l0: u64, l1: u64) -> Option<Extent> {
        let s = self.logical.max(l0);
        let e = self.end().min(l1);
        (s < e).then(|| Extent {
            logical: s,
            phys: self.phys + (s - self.logical),
            len: e - s,
            unwritten: self.unwritten,
        })
    }
    fn joins(&self, next: &Extent) -> bool {
        self.end() == next.logical
            && self.phys + self.len == next.phys
            && self.unwritten == next.unwritten
            && self.len + next.len <= MAX_EXTENT_LEN
    }
}

/// A file's extent map, in one of its two forms.
#[derive(Debug)]
pub(crate) struct ExtentMap {
    /// The owning inode.
    ino: u64,
    form: Form,
}

#[derive(Debug)]
enum Form {
    Inline(Vec<Extent>),
    Tree(BTree),
}

impl ExtentMap {
    /// An empty inline map for inode `ino`.
    pub(crate) fn empty(ino: u64) -> ExtentMap {
        ExtentMap {
            ino,
            form: Form::Inline(Vec::new()),
        }
    }

    /// True when the extents are in a B-tree.
    #[cfg(test)]
    pub(crate) fn is_tree(&self) -> bool {
        matches!(self.form, Form::Tree(_))
    }

    /// The map of inode `ino`.
    pub(crate) fn load(inode: &Inode, ino: u64) -> FsResult<ExtentMap> {
        if inode.flags & FLAG_EXTENT_TREE != 0 {
            return Ok(ExtentMap {
                ino,
                form: Form::Tree(BTree {
                    root: inode.root,
                    tree: TREE_EXTENT,
                    owner: ino,
                }),
            });
        }
        let n = inode.count as usize;
        if n > INLINE_EXTENTS {
            return Err(FsError::corrupt(format!("inode {ino}: {n} inline extents")));
        }
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            let b = &inode.inline[i * 24..(i + 1) * 24];
            let e = Extent::from_value(get_u64(b, 0), &b[8..24])?;
            if v.last().is_some_and(|p: &Extent| p.end() > e.logical) {
                return Err(FsError::corrupt(format!(
                    "inode {ino}: overlapping extents"
                )));
            }
            v.push(e);
        }
        Ok(ExtentMap {
            ino,
            form: Form::Inline(v),
        })
    }

    /// Writes the map back into the inode.
    pub(crate) fn store(&self, inode: &mut Inode) {
        match &self.form {
            Form::Inline(v) => {
                inode.flags &= !FLAG_EXTENT_TREE;
                inode.root = 0;
                inode.count = v.len() as u64;
                inode.inline = [0; 120];
                for (i, e) in v.iter().enumerate() {
                    let b = &mut inode.inline[i * 24..(i + 1) * 24];
                    put_u64(b, 0, e.logical);
                    b[8..24].copy_from_slice(&e.value());
                }
            }
            Form::Tree(t) => {
                inode.flags |= FLAG_EXTENT_TREE;
                inode.root = t.root;
                inode.count = 0;
                inode.inline = [0; 120];
            }
        }
    }

    /// Extents intersecting `[l0, l1)`, whole (not clipped), in logical order.
    pub(crate) fn overlapping(
        &self,
        r: &impl BlockRead,
        l0: u64,
        l1: u64,
    ) -> FsResult<Vec<Extent>> {
        match &self.form {
            Form::Inline(v) => Ok(v
                .iter()
                .filter(|e| e.logical < l1 && e.end() > l0)
                .copied()
                .collect()),
            Form::Tree(t) => {
                let mut out = Vec::new();
                if let Some((k, v)) = t.get_le(r, l0)? {
                    let e = Extent::from_value(k, &v)?;
                    if e.end() > l0 {
                        out.push(e);
                    }
                }
                t.range(r, l0.saturating_add(1).min(l1), &mut |k, v| {
                    if k >= l1 {
                        return Ok(false);
                    }
                    let e = Extent::from_value(k, v)?;
                    if out.last().is_some_and(|p: &Extent| p.logical == e.logical) {
                        return Ok(true);
                    }
                    out.push(e);
                    Ok(true)
                })?;
                if out.windows(2).any(|w| w[0].end() > w[1].logical) {
                    return Err(FsError::corrupt("overlapping extents"));
                }
                Ok(out)
            }
        }
    }

    /// All extents.
    pub(crate) fn all(&self, r: &impl BlockRead) -> FsResult<Vec<Extent>> {
        self.overlapping(r, 0, u64::MAX)
    }

    fn raw_remove(&mut self, w: &mut impl BlockWrite, e: &Extent) -> FsResult<()> {
        match &mut self.form {
            Form::Inline(v) => v.retain(|x| x.logical != e.logical),
            Form::Tree(t) => {
                t.remove(w, e.logical)?;
            }
        }
        Ok(())
    }

    fn raw_insert(&mut self, w: &mut impl BlockWrite, e: Extent) -> FsResult<()> {
        match &mut self.form {
            Form::Inline(v) => {
                let i = v.partition_point(|x| x.logical < e.logical);
                v.insert(i, e);
                if v.len() > INLINE_EXTENTS {
                    // Grow into a tree, placed near the file's first data block.
                    let mut t = BTree::create(w, TREE_EXTENT, self.ino, v[0].phys)?;
                    for x in v.iter() {
                        t.insert(w, x.logical, &x.value())?;
                    }
                    self.form = Form::Tree(t);
                }
            }
            Form::Tree(t) => t.insert(w, e.logical, &e.value())?,
        }
        Ok(())
    }

    /// Unmaps `[l0, l1)`; returns the physical pieces that were mapped there.
    pub(crate) fn remove_range(
        &mut self,
        w: &mut impl BlockWrite,
        l0: u64,
        l1: u64,
    ) -> FsResult<Vec<Extent>> {
        let hit = self.overlapping(w, l0, l1)?;
        let mut removed = Vec::with_capacity(hit.len());
        for e in hit {
            self.raw_remove(w, &e)?;
            if let Some(left) = e.clip(e.logical, l0) {
                self.raw_insert(w, left)?;
            }
            if let Some(right) = e.clip(l1, e.end()) {
                self.raw_insert(w, right)?;
            }
            if let Some(mid) = e.clip(l0, l1) {
                removed.push(mid);
            }
        }
        Ok(removed)
    }

    /// Maps an unmapped range, merging with contiguous neighbours.
    pub(crate) fn insert_merge(&mut self, w: &mut impl BlockWrite, mut e: Extent) -> FsResult<()> {
        if e.logical > 0 {
            if let Some(prev) = self
                .overlapping(w, e.logical - 1, e.logical)?
                .first()
                .copied()
            {
                if prev.joins(&e) {
                    self.raw_remove(w, &prev)?;
                    e = Extent {
                        logical: prev.logical,
                        phys: prev.phys,
                        len: prev.len + e.len,
                        unwritten: e.unwritten,
                    };
                }
            }
        }
        if let Some(next) = self.overlapping(w, e.end(), e.end() + 1)?.first().copied() {
            if e.joins(&next) && next.logical == e.end() {
                self.raw_remove(w, &next)?;
                e.len += next.len;
            }
        }
        self.raw_insert(w, e)
    }

    /// Goes back to the inline form when the tree is empty.
    pub(crate) fn shrink(&mut self, w: &mut impl BlockWrite) -> FsResult<()> {
        if let Form::Tree(t) = &self.form {
            if t.is_empty(w)? {
                t.destroy(w)?;
                self.form = Form::Inline(Vec::new());
            }
        }
        Ok(())
    }

    /// Frees the tree nodes (not the data blocks).
    pub(crate) fn destroy(self, w: &mut impl BlockWrite) -> FsResult<()> {
        if let Form::Tree(t) = self.form {
            t.destroy(w)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::btree::tests::MemStore;

    fn ext(l: u64, p: u64, n: u64) -> Extent {
        Extent {
            logical: l,
            phys: p,
            len: n,
            unwritten: false,
        }
    }

    #[test]
    fn merge_split_and_grow_into_a_tree() {
        let mut s = MemStore::new(4096);
        let mut m = ExtentMap::empty(42);
        m.insert_merge(&mut s, ext(0, 100, 4)).unwrap();
        m.insert_merge(&mut s, ext(4, 104, 4)).unwrap(); // merges
        assert_eq!(m.all(&s).unwrap(), vec![ext(0, 100, 8)]);
        let removed = m.remove_range(&mut s, 2, 5).unwrap();
        assert_eq!(removed, vec![ext(2, 102, 3)]);
        assert_eq!(m.all(&s).unwrap(), vec![ext(0, 100, 2), ext(5, 105, 3)]);
        for i in 0..10 {
            m.insert_merge(&mut s, ext(100 + 2 * i, 1000 + 10 * i, 1))
                .unwrap();
        }
        assert!(m.is_tree());
        assert_eq!(m.all(&s).unwrap().len(), 12);
        let mut inode = Inode::free(0);
        m.store(&mut inode);
        let m2 = ExtentMap::load(&inode, 42).unwrap();
        assert_eq!(m2.all(&s).unwrap().len(), 12);
        let mut m2 = m2;
        m2.remove_range(&mut s, 0, u64::MAX).unwrap();
        m2.shrink(&mut s).unwrap();
        assert!(!m2.is_tree());
        assert!(m2.all(&s).unwrap().is_empty());
        assert!(s.live.is_empty(), "tree nodes freed");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random map/unmap of ranges agrees with a per-block model.
        #[test]
        fn agrees_with_a_block_model(ops in proptest::collection::vec((0u64..200, 1u64..40, any::<bool>()), 1..80)) {
            let mut s = MemStore::new(4096);
            let mut m = ExtentMap::empty(9);
            let mut model: BTreeMap<u64, u64> = BTreeMap::new();
            let mut next_phys = 10_000u64;
            for (l, n, map) in ops {
                let removed = m.remove_range(&mut s, l, l + n).unwrap();
                for e in &removed {
                    for i in 0..e.len {
                        prop_assert_eq!(model.remove(&(e.logical + i)), Some(e.phys + i));
                    }
                }
                prop_assert!((l..l + n).all(|b| !model.contains_key(&b)));
                if map {
                    m.insert_merge(&mut s, ext(l, next_phys, n)).unwrap();
                    for i in 0..n {
                        model.insert(l + i, next_phys + i);
                    }
                    next_phys += n + (l % 3); // sometimes contiguous, sometimes not
                }
                let all = m.all(&s).unwrap();
                let mut flat = BTreeMap::new();
                for e in &all {
                    for i in 0..e.len {
                        flat.insert(e.logical + i, e.phys + i);
                    }
                }
                prop_assert_eq!(&flat, &model);
                prop_assert!(all.windows(2).all(|w| !w[0].joins(&w[1])), "adjacent extents merged");
            }
        }
    }
}
