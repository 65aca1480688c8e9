//! A B+tree of `u64` keys and byte-string values, one node per block (FORMAT.md §3.4).
//!
//! Used for directories (key: name-hash cookie) and extent trees (key: logical block), so
//! that a lookup, insert or delete touches O(log n) blocks whatever the size of the
//! directory or file. Every node carries its tree type, its owner inode and a CRC; a node
//! read from disk is validated completely before use and a bad one is an error, never a
//! panic. Deletion is lazy: nodes are only unlinked when they become empty.

use std::sync::Arc;

use pairfs::BlockNo;
use pairfs::types::{crc32c, get_u16, get_u64, put_u16, put_u32, put_u64};

use crate::error::{FsError, FsResult};
use crate::tx::{BlockRead, BlockWrite};

/// Tree type of directories.
pub(crate) const TREE_DIR: u8 = 1;
/// Tree type of extent trees.
pub(crate) const TREE_EXTENT: u8 = 2;

const MAGIC: u16 = 0x5442;
const KIND_LEAF: u8 = 1;
const KIND_INTERNAL: u8 = 2;
const HDR: usize = 16;
const SLOT: usize = 12;
const CRC: usize = 4;
/// Deeper than this is a corrupt (e.g. cyclic) tree: with at least two entries per node a
/// tree of 2^32 entries is 32 levels deep.
const MAX_DEPTH: usize = 32;

/// Largest value the tree accepts for block size `bs`: three values and their slots must
/// fit in a leaf, so that a split always yields two valid leaves.
pub(crate) fn max_value(bs: usize) -> usize {
    (bs - HDR - CRC) / 3 - SLOT
}

#[derive(Debug)]
struct Leaf {
    buf: Arc<[u8]>,
    /// (key, value offset, value length)
    slots: Vec<(u64, usize, usize)>,
}

impl Leaf {
    fn val(&self, i: usize) -> &[u8] {
        let (_, o, l) = self.slots[i];
        &self.buf[o..o + l]
    }
    /// The entries, borrowing the node's buffer (no copy per entry).
    fn entries(&self) -> Vec<(u64, &[u8])> {
        (0..self.slots.len())
            .map(|i| (self.slots[i].0, self.val(i)))
            .collect()
    }
}

/// What a removal did to a node, for its parent.
enum Shrink {
    /// Still valid where it is.
    Keep,
    /// A leaf left without entries (not rewritten).
    Empty,
    /// An internal node left with one child: it was freed and the child replaces it.
    Replace(BlockNo),
}

#[derive(Debug)]
enum Node {
    Leaf(Leaf),
    Internal { keys: Vec<u64>, children: Vec<u64> },
}

fn leaf_size<V: AsRef<[u8]>>(entries: &[(u64, V)]) -> usize {
    HDR + CRC
        + entries
            .iter()
            .map(|(_, v)| SLOT + v.as_ref().len())
            .sum::<usize>()
}

fn internal_size(nkeys: usize) -> usize {
    HDR + 8 + 16 * nkeys + CRC
}

/// A tree handle: root block, type and owner. The root changes on splits and merges; the
/// owner stores it back in its inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BTree {
    pub(crate) root: BlockNo,
    pub(crate) tree: u8,
    pub(crate) owner: u64,
}

fn header(b: &mut [u8], kind: u8, tree: u8, nkeys: usize, owner: u64) {
    put_u16(b, 0, MAGIC);
    b[2] = kind;
    b[3] = tree;
    put_u16(b, 4, nkeys as u16);
    put_u64(b, 8, owner);
}

fn seal(b: &mut [u8]) {
    let n = b.len();
    let crc = crc32c(&b[..n - CRC]);
    put_u32(b, n - CRC, crc);
}

impl BTree {
    /// Creates an empty tree (one empty leaf).
    pub(crate) fn create(
        w: &mut impl BlockWrite,
        tree: u8,
        owner: u64,
        goal: BlockNo,
    ) -> FsResult<BTree> {
        let root = w.alloc_meta(goal)?;
        let t = BTree { root, tree, owner };
        let img = t
            .encode_leaf::<&[u8]>(w.bs(), &[])
            .ok_or(FsError::Invalid("empty leaf"))?;
        w.write(root, img);
        Ok(t)
    }

    fn corrupt(&self, b: BlockNo, what: &str) -> FsError {
        FsError::corrupt(format!(
            "tree node {b} (owner inode {}, type {}): {what}",
            self.owner, self.tree
        ))
    }

    fn load(&self, r: &impl BlockRead, b: BlockNo) -> FsResult<Node> {
        let buf = r.read(b)?;
        let bs = buf.len();
        if get_u16(&buf, 0) != MAGIC {
            return Err(self.corrupt(b, "bad magic"));
        }
        if crc32c(&buf[..bs - CRC]) != pairfs::types::get_u32(&buf, bs - CRC) {
            return Err(self.corrupt(b, "checksum mismatch"));
        }
        if buf[3] != self.tree || get_u64(&buf, 8) != self.owner {
            return Err(self.corrupt(b, "belongs to another tree"));
        }
        let n = get_u16(&buf, 4) as usize;
        match buf[2] {
            KIND_LEAF => {
                if HDR + SLOT * n + CRC > bs {
                    return Err(self.corrupt(b, "too many slots"));
                }
                let mut slots = Vec::with_capacity(n);
                let lo = HDR + SLOT * n;
                for i in 0..n {
                    let s = HDR + SLOT * i;
                    let key = get_u64(&buf, s);
                    let off = get_u16(&buf, s + 8) as usize;
                    let len = get_u16(&buf, s + 10) as usize;
                    if off < lo || off + len > bs - CRC {
                        return Err(self.corrupt(b, "value outside the node"));
                    }
                    if slots.last().is_some_and(|&(k, _, _)| k >= key) {
                        return Err(self.corrupt(b, "keys out of order"));
                    }
                    slots.push((key, off, len));
                }
                Ok(Node::Leaf(Leaf { buf, slots }))
            }
            KIND_INTERNAL => {
                if n == 0 || internal_size(n) > bs {
                    return Err(self.corrupt(b, "bad key count"));
                }
                let mut keys = Vec::with_capacity(n);
                let mut children = Vec::with_capacity(n + 1);
                children.push(get_u64(&buf, HDR));
                for i in 0..n {
                    let k = get_u64(&buf, HDR + 8 + 16 * i);
                    if keys.last().is_some_and(|&p| p >= k) {
                        return Err(self.corrupt(b, "keys out of order"));
                    }
                    keys.push(k);
                    children.push(get_u64(&buf, HDR + 16 + 16 * i));
                }
                if children.iter().any(|&c| c == 0 || c == b) {
                    return Err(self.corrupt(b, "bad child pointer"));
                }
                Ok(Node::Internal { keys, children })
            }
            _ => Err(self.corrupt(b, "unknown node kind")),
        }
    }

    fn encode_leaf<V: AsRef<[u8]>>(&self, bs: usize, entries: &[(u64, V)]) -> Option<Vec<u8>> {
        if leaf_size(entries) > bs {
            return None;
        }
        let mut b = vec![0u8; bs];
        header(&mut b, KIND_LEAF, self.tree, entries.len(), self.owner);
        let mut top = bs - CRC;
        for (i, (k, v)) in entries.iter().enumerate() {
            let v = v.as_ref();
            top -= v.len();
            b[top..top + v.len()].copy_from_slice(v);
            let s = HDR + SLOT * i;
            put_u64(&mut b, s, *k);
            put_u16(&mut b, s + 8, top as u16);
            put_u16(&mut b, s + 10, v.len() as u16);
        }
        seal(&mut b);
        Some(b)
    }

    fn encode_internal(&self, bs: usize, keys: &[u64], children: &[u64]) -> Option<Vec<u8>> {
        if internal_size(keys.len()) > bs {
            return None;
        }
        let mut b = vec![0u8; bs];
        header(&mut b, KIND_INTERNAL, self.tree, keys.len(), self.owner);
        put_u64(&mut b, HDR, children[0]);
        for (i, k) in keys.iter().enumerate() {
            put_u64(&mut b, HDR + 8 + 16 * i, *k);
            put_u64(&mut b, HDR + 16 + 16 * i, children[i + 1]);
        }
        seal(&mut b);
        Some(b)
    }

    fn write_leaf<V: AsRef<[u8]>>(
        &self,
        w: &mut impl BlockWrite,
        b: BlockNo,
        entries: &[(u64, V)],
    ) -> FsResult<()> {
        let img = self
            .encode_leaf(w.bs(), entries)
            .ok_or_else(|| self.corrupt(b, "leaf overflow"))?;
        w.write(b, img);
        Ok(())
    }

    fn write_internal(
        &self,
        w: &mut impl BlockWrite,
        b: BlockNo,
        keys: &[u64],
        children: &[u64],
    ) -> FsResult<()> {
        let img = self
            .encode_internal(w.bs(), keys, children)
            .ok_or_else(|| self.corrupt(b, "internal node overflow"))?;
        w.write(b, img);
        Ok(())
    }

    /// The value stored under `key`.
    #[cfg(test)]
    pub(crate) fn get(&self, r: &impl BlockRead, key: u64) -> FsResult<Option<Vec<u8>>> {
        let mut b = self.root;
        for _ in 0..MAX_DEPTH {
            match self.load(r, b)? {
                Node::Leaf(l) => {
                    return Ok(l
                        .slots
                        .binary_search_by_key(&key, |s| s.0)
                        .ok()
                        .map(|i| l.val(i).to_vec()));
                }
                Node::Internal { keys, children } => {
                    b = children[keys.partition_point(|&k| k <= key)];
                }
            }
        }
        Err(self.corrupt(b, "tree too deep"))
    }

    /// The entry with the largest key not above `key`.
    pub(crate) fn get_le(&self, r: &impl BlockRead, key: u64) -> FsResult<Option<(u64, Vec<u8>)>> {
        self.get_le_rec(r, self.root, key, 0)
    }

    fn get_le_rec(
        &self,
        r: &impl BlockRead,
        b: BlockNo,
        key: u64,
        depth: usize,
    ) -> FsResult<Option<(u64, Vec<u8>)>> {
        if depth > MAX_DEPTH {
            return Err(self.corrupt(b, "tree too deep"));
        }
        match self.load(r, b)? {
            Node::Leaf(l) => {
                let i = l.slots.partition_point(|s| s.0 <= key);
                Ok((i > 0).then(|| (l.slots[i - 1].0, l.val(i - 1).to_vec())))
            }
            Node::Internal { keys, children } => {
                let idx = keys.partition_point(|&k| k <= key);
                for i in (0..=idx).rev() {
                    if let Some(e) = self.get_le_rec(r, children[i], key, depth + 1)? {
                        return Ok(Some(e));
                    }
                }
                Ok(None)
            }
        }
    }

    /// Calls `f` on every entry with key ≥ `from`, in key order, until it returns false.
    /// Returns false if `f` stopped the iteration.
    pub(crate) fn range(
        &self,
        r: &impl BlockRead,
        from: u64,
        f: &mut dyn FnMut(u64, &[u8]) -> FsResult<bool>,
    ) -> FsResult<bool> {
        self.range_rec(r, self.root, from, f, 0)
    }

    fn range_rec(
        &self,
        r: &impl BlockRead,
        b: BlockNo,
        from: u64,
        f: &mut dyn FnMut(u64, &[u8]) -> FsResult<bool>,
        depth: usize,
    ) -> FsResult<bool> {
        if depth > MAX_DEPTH {
            return Err(self.corrupt(b, "tree too deep"));
        }
        match self.load(r, b)? {
            Node::Leaf(l) => {
                let start = l.slots.partition_point(|s| s.0 < from);
                for i in start..l.slots.len() {
                    if !f(l.slots[i].0, l.val(i))? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Node::Internal { keys, children } => {
                let idx = keys.partition_point(|&k| k <= from);
                for &c in &children[idx..] {
                    if !self.range_rec(r, c, from, f, depth + 1)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        }
    }

    /// True if the tree holds no entry.
    pub(crate) fn is_empty(&self, r: &impl BlockRead) -> FsResult<bool> {
        self.range(r, 0, &mut |_, _| Ok(false))
    }

    /// Inserts or replaces `key`.
    pub(crate) fn insert(&mut self, w: &mut impl BlockWrite, key: u64, val: &[u8]) -> FsResult<()> {
        if val.len() > max_value(w.bs()) {
            return Err(FsError::Invalid("tree value too large"));
        }
        if let Some((sep, right)) = self.insert_rec(w, self.root, key, val, 0)? {
            let new_root = w.alloc_meta(self.root)?;
            self.write_internal(w, new_root, &[sep], &[self.root, right])?;
            self.root = new_root;
        }
        Ok(())
    }

    fn insert_rec(
        &self,
        w: &mut impl BlockWrite,
        b: BlockNo,
        key: u64,
        val: &[u8],
        depth: usize,
    ) -> FsResult<Option<(u64, BlockNo)>> {
        if depth > MAX_DEPTH {
            return Err(self.corrupt(b, "tree too deep"));
        }
        let bs = w.bs();
        match self.load(w, b)? {
            Node::Leaf(l) => {
                let mut entries = l.entries();
                match entries.binary_search_by_key(&key, |e| e.0) {
                    Ok(i) => entries[i].1 = val,
                    Err(i) => entries.insert(i, (key, val)),
                }
                if leaf_size(&entries) <= bs {
                    self.write_leaf(w, b, &entries)?;
                    return Ok(None);
                }
                // Split by bytes: the left half takes entries until it holds half the bytes.
                let total = leaf_size(&entries);
                let mut acc = HDR + CRC;
                let mut at = 0;
                while at < entries.len() - 1 && acc < total / 2 {
                    acc += SLOT + entries[at].1.len();
                    at += 1;
                }
                let at = at.clamp(1, entries.len() - 1);
                let right_entries = entries.split_off(at);
                let sep = right_entries[0].0;
                let right = w.alloc_meta(b)?;
                self.write_leaf(w, b, &entries)?;
                self.write_leaf(w, right, &right_entries)?;
                Ok(Some((sep, right)))
            }
            Node::Internal {
                mut keys,
                mut children,
            } => {
                let idx = keys.partition_point(|&k| k <= key);
                let Some((sep, new_child)) =
                    self.insert_rec(w, children[idx], key, val, depth + 1)?
                else {
                    return Ok(None);
                };
                keys.insert(idx, sep);
                children.insert(idx + 1, new_child);
                if internal_size(keys.len()) <= bs {
                    self.write_internal(w, b, &keys, &children)?;
                    return Ok(None);
                }
                let m = keys.len() / 2;
                let up = keys[m];
                let right_keys = keys.split_off(m + 1);
                keys.pop();
                let right_children = children.split_off(m + 1);
                let right = w.alloc_meta(b)?;
                self.write_internal(w, b, &keys, &children)?;
                self.write_internal(w, right, &right_keys, &right_children)?;
                Ok(Some((up, right)))
            }
        }
    }

    /// Removes `key`; returns whether it was present.
    pub(crate) fn remove(&mut self, w: &mut impl BlockWrite, key: u64) -> FsResult<bool> {
        let (removed, shrink) = self.remove_rec(w, self.root, key, 0)?;
        match shrink {
            Shrink::Keep => {}
            // The root is a leaf that lost its last entry: an empty tree keeps its root.
            Shrink::Empty => self.write_leaf::<&[u8]>(w, self.root, &[])?,
            Shrink::Replace(child) => self.root = child,
        }
        Ok(removed)
    }

    fn remove_rec(
        &self,
        w: &mut impl BlockWrite,
        b: BlockNo,
        key: u64,
        depth: usize,
    ) -> FsResult<(bool, Shrink)> {
        if depth > MAX_DEPTH {
            return Err(self.corrupt(b, "tree too deep"));
        }
        match self.load(w, b)? {
            Node::Leaf(l) => match l.slots.binary_search_by_key(&key, |s| s.0) {
                Ok(i) => {
                    let mut entries = l.entries();
                    entries.remove(i);
                    if entries.is_empty() {
                        // Not written: the parent frees it (or `remove` rewrites the root).
                        return Ok((true, Shrink::Empty));
                    }
                    self.write_leaf(w, b, &entries)?;
                    Ok((true, Shrink::Keep))
                }
                Err(_) => Ok((false, Shrink::Keep)),
            },
            Node::Internal {
                mut keys,
                mut children,
            } => {
                let idx = keys.partition_point(|&k| k <= key);
                let (removed, shrink) = self.remove_rec(w, children[idx], key, depth + 1)?;
                match shrink {
                    Shrink::Keep => return Ok((removed, Shrink::Keep)),
                    Shrink::Replace(c) => children[idx] = c,
                    Shrink::Empty => {
                        w.free_meta(children[idx]);
                        children.remove(idx);
                        // Drop the separator that bounded the removed child.
                        keys.remove(idx.saturating_sub(1));
                        if keys.is_empty() {
                            // One child left: this node disappears, the child takes its place.
                            w.free_meta(b);
                            return Ok((removed, Shrink::Replace(children[0])));
                        }
                    }
                }
                self.write_internal(w, b, &keys, &children)?;
                Ok((removed, Shrink::Keep))
            }
        }
    }

    /// Frees every node of the tree.
    pub(crate) fn destroy(self, w: &mut impl BlockWrite) -> FsResult<()> {
        let mut nodes = Vec::new();
        self.visit(w, &mut |b, _| {
            nodes.push(b);
            Ok(())
        })?;
        for b in nodes {
            w.free_meta(b);
        }
        Ok(())
    }

    /// Calls `f(block, depth)` for every node, checking that the keys of each subtree stay
    /// within the bounds its parent gives (for `fsck` and `destroy`).
    pub(crate) fn visit(
        &self,
        r: &impl BlockRead,
        f: &mut dyn FnMut(BlockNo, usize) -> FsResult<()>,
    ) -> FsResult<()> {
        self.visit_rec(r, self.root, 0, None, None, f)
    }

    fn visit_rec(
        &self,
        r: &impl BlockRead,
        b: BlockNo,
        depth: usize,
        lo: Option<u64>,
        hi: Option<u64>,
        f: &mut dyn FnMut(BlockNo, usize) -> FsResult<()>,
    ) -> FsResult<()> {
        if depth > MAX_DEPTH {
            return Err(self.corrupt(b, "tree too deep"));
        }
        f(b, depth)?;
        let in_bounds = |k: u64| lo.is_none_or(|l| k >= l) && hi.is_none_or(|h| k < h);
        match self.load(r, b)? {
            Node::Leaf(l) => {
                if l.slots.iter().any(|s| !in_bounds(s.0)) {
                    return Err(self.corrupt(b, "key outside its parent's bounds"));
                }
                Ok(())
            }
            Node::Internal { keys, children } => {
                if keys.iter().any(|&k| !in_bounds(k)) {
                    return Err(self.corrupt(b, "key outside its parent's bounds"));
                }
                for (i, &c) in children.iter().enumerate() {
                    let clo = if i == 0 { lo } else { Some(keys[i - 1]) };
                    let chi = if i == keys.len() { hi } else { Some(keys[i]) };
                    self.visit_rec(r, c, depth + 1, clo, chi, f)?;
                }
                Ok(())
            }
        }
    }
}

/// The `(name, inode)` entries of a directory leaf.
pub(crate) type LeafNames = Vec<(Vec<u8>, u64)>;

/// Reads a block as a directory leaf, if it is one (for cache invalidation on a
/// replica): its owner and its `(name, inode)` entries. Anything else gives `None`.
pub(crate) fn decode_dir_leaf(buf: &[u8]) -> Option<(u64, LeafNames)> {
    if buf.len() < HDR + CRC
        || get_u16(buf, 0) != MAGIC
        || buf[2] != KIND_LEAF
        || buf[3] != TREE_DIR
    {
        return None;
    }
    let owner = get_u64(buf, 8);
    let t = BTree {
        root: 0,
        tree: TREE_DIR,
        owner,
    };
    struct One<'a>(&'a [u8]);
    impl BlockRead for One<'_> {
        fn bs(&self) -> usize {
            self.0.len()
        }
        fn read(&self, _b: BlockNo) -> FsResult<Arc<[u8]>> {
            Ok(Arc::from(self.0))
        }
    }
    let Ok(Node::Leaf(l)) = t.load(&One(buf), 0) else {
        return None;
    };
    let mut out = Vec::with_capacity(l.slots.len());
    for i in 0..l.slots.len() {
        let e = crate::dir::decode(l.val(i)).ok()?;
        out.push((e.name, e.ino));
    }
    Some((owner, out))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeMap, HashMap};

    use proptest::prelude::*;

    use super::*;

    /// An in-memory block store for tree tests.
    pub(crate) struct MemStore {
        pub(crate) blocks: HashMap<BlockNo, Arc<[u8]>>,
        next: BlockNo,
        pub(crate) live: std::collections::HashSet<BlockNo>,
        bs: usize,
    }

    impl MemStore {
        pub(crate) fn new(bs: usize) -> Self {
            Self {
                blocks: HashMap::new(),
                next: 100,
                live: Default::default(),
                bs,
            }
        }
    }

    impl BlockRead for MemStore {
        fn bs(&self) -> usize {
            self.bs
        }
        fn read(&self, b: BlockNo) -> FsResult<Arc<[u8]>> {
            self.blocks
                .get(&b)
                .cloned()
                .ok_or_else(|| FsError::corrupt(format!("no block {b}")))
        }
    }

    impl BlockWrite for MemStore {
        fn write(&mut self, b: BlockNo, data: Vec<u8>) {
            self.blocks.insert(b, Arc::from(data));
        }
        fn alloc_meta(&mut self, _goal: BlockNo) -> FsResult<BlockNo> {
            self.next += 1;
            self.live.insert(self.next);
            Ok(self.next)
        }
        fn free_meta(&mut self, b: BlockNo) {
            assert!(self.live.remove(&b), "double free of {b}");
            self.blocks.remove(&b);
        }
    }

    fn collect(t: &BTree, s: &MemStore) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        t.range(s, 0, &mut |k, v| {
            out.push((k, v.to_vec()));
            Ok(true)
        })
        .unwrap();
        out
    }

    #[test]
    fn many_inserts_split_and_deletes_shrink_back() {
        let mut s = MemStore::new(4096);
        let mut t = BTree::create(&mut s, TREE_DIR, 7, 0).unwrap();
        for k in 0..5000u64 {
            let key = k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 8;
            t.insert(&mut s, key, &[k as u8; 40]).unwrap();
        }
        let all = collect(&t, &s);
        assert_eq!(all.len(), 5000);
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
        let mut depth = 0;
        t.visit(&s, &mut |_, d| {
            depth = depth.max(d);
            Ok(())
        })
        .unwrap();
        assert!(depth >= 1, "the tree grew internal levels");
        for k in 0..5000u64 {
            let key = k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 8;
            assert!(t.remove(&mut s, key).unwrap());
        }
        assert!(t.is_empty(&s).unwrap());
        assert_eq!(s.live.len(), 1, "only the root leaf remains");
        t.destroy(&mut s).unwrap();
        assert!(s.live.is_empty());
    }

    #[test]
    fn corrupt_nodes_are_errors_not_panics() {
        let mut s = MemStore::new(4096);
        let mut t = BTree::create(&mut s, TREE_DIR, 7, 0).unwrap();
        t.insert(&mut s, 5, b"hello").unwrap();
        let mut img = s.read(t.root).unwrap().to_vec();
        img[20] ^= 0xff;
        s.write(t.root, img);
        assert!(matches!(t.get(&s, 5), Err(FsError::Corrupt(_))));
        // Right checksum, garbage structure.
        let mut img = vec![0xffu8; 4096];
        put_u16(&mut img, 0, MAGIC);
        img[2] = KIND_LEAF;
        img[3] = TREE_DIR;
        put_u64(&mut img, 8, 7);
        seal(&mut img);
        s.write(t.root, img);
        assert!(matches!(t.get(&s, 5), Err(FsError::Corrupt(_))));
        let other = BTree { owner: 8, ..t };
        s.write(t.root, t.encode_leaf::<&[u8]>(4096, &[]).unwrap());
        assert!(matches!(other.get(&s, 5), Err(FsError::Corrupt(_))));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, usize),
        Remove(u64),
        GetLe(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u64..2000, 0usize..300).prop_map(|(k, l)| Op::Insert(k, l)),
            2 => (0u64..2000).prop_map(Op::Remove),
            1 => (0u64..2100).prop_map(Op::GetLe),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn behaves_like_a_btreemap(ops in proptest::collection::vec(op(), 1..600)) {
            let mut s = MemStore::new(4096);
            let mut t = BTree::create(&mut s, TREE_EXTENT, 3, 0).unwrap();
            let mut m: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            for o in ops {
                match o {
                    Op::Insert(k, l) => {
                        let v = vec![(k % 251) as u8; l];
                        t.insert(&mut s, k, &v).unwrap();
                        m.insert(k, v);
                    }
                    Op::Remove(k) => {
                        prop_assert_eq!(t.remove(&mut s, k).unwrap(), m.remove(&k).is_some());
                    }
                    Op::GetLe(k) => {
                        let want = m.range(..=k).next_back().map(|(a, b)| (*a, b.clone()));
                        prop_assert_eq!(t.get_le(&s, k).unwrap(), want);
                    }
                }
            }
            let got = collect(&t, &s);
            let want: Vec<_> = m.into_iter().collect();
            prop_assert_eq!(got, want);
            let mut n = 0;
            t.visit(&s, &mut |_, _| { n += 1; Ok(()) }).unwrap();
            prop_assert_eq!(n, s.live.len(), "no leaked or shared nodes");
        }
    }
}
