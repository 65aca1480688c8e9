//! A bounded cache of clean metadata blocks (CLOCK replacement).
//!
//! Holds blocks whose content equals the normal area's (read from it, or written to it at a
//! checkpoint). Blocks with newer, not yet checkpointed images are never served from here:
//! the volume checks its open and pending images first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::types::BlockNo;

struct Slot {
    block: BlockNo,
    data: Arc<[u8]>,
    referenced: bool,
}

struct Inner {
    map: HashMap<BlockNo, usize>,
    slots: Vec<Slot>,
    hand: usize,
    capacity: usize,
    hits: u64,
    misses: u64,
}

/// See the module documentation.
pub(crate) struct BlockCache {
    inner: Mutex<Inner>,
}

impl BlockCache {
    /// A cache of at most `capacity` blocks (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                slots: Vec::new(),
                hand: 0,
                capacity: capacity.max(1),
                hits: 0,
                misses: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The cache holds only copies of durable blocks: a poisoned lock leaves it usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self, block: BlockNo) -> Option<Arc<[u8]>> {
        let mut g = self.lock();
        match g.map.get(&block).copied() {
            Some(i) => {
                g.hits += 1;
                let s = &mut g.slots[i];
                s.referenced = true;
                Some(s.data.clone())
            }
            None => {
                g.misses += 1;
                None
            }
        }
    }

    pub(crate) fn insert(&self, block: BlockNo, data: Arc<[u8]>) {
        let mut g = self.lock();
        if let Some(&i) = g.map.get(&block) {
            g.slots[i].data = data;
            g.slots[i].referenced = true;
            return;
        }
        if g.slots.len() < g.capacity {
            let i = g.slots.len();
            g.slots.push(Slot {
                block,
                data,
                referenced: false,
            });
            g.map.insert(block, i);
            return;
        }
        // Sweep: clear reference bits until an unreferenced slot is found (at most two laps).
        loop {
            let h = g.hand;
            g.hand = (h + 1) % g.slots.len();
            if g.slots[h].referenced {
                g.slots[h].referenced = false;
                continue;
            }
            let old = g.slots[h].block;
            g.map.remove(&old);
            g.slots[h] = Slot {
                block,
                data,
                referenced: false,
            };
            g.map.insert(block, h);
            return;
        }
    }

    pub(crate) fn remove(&self, block: BlockNo) {
        let mut g = self.lock();
        if let Some(i) = g.map.remove(&block) {
            // Keep the slot vector dense: move the last slot into the hole.
            let last = g.slots.len() - 1;
            g.slots.swap(i, last);
            g.slots.pop();
            if i < g.slots.len() {
                let moved = g.slots[i].block;
                g.map.insert(moved, i);
            }
            if g.hand >= g.slots.len() {
                g.hand = 0;
            }
        }
    }

    /// (hits, misses, blocks held)
    pub(crate) fn stats(&self) -> (u64, u64, usize) {
        let g = self.lock();
        (g.hits, g.misses, g.slots.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blk(b: u8) -> Arc<[u8]> {
        Arc::from(vec![b; 4])
    }

    #[test]
    fn evicts_unreferenced_first_and_stays_bounded() {
        let c = BlockCache::new(3);
        c.insert(1, blk(1));
        c.insert(2, blk(2));
        c.insert(3, blk(3));
        assert!(c.get(1).is_some()); // 1 referenced
        c.insert(4, blk(4)); // evicts 2 (first unreferenced after the hand sweeps 1)
        assert!(c.get(1).is_some());
        assert!(c.get(2).is_none());
        assert_eq!(c.stats().2, 3);
        c.remove(3);
        assert!(c.get(3).is_none());
        assert_eq!(&*c.get(4).unwrap(), &[4, 4, 4, 4]);
        c.insert(4, blk(9));
        assert_eq!(&*c.get(4).unwrap(), &[9, 9, 9, 9]);
    }
}
