//! What a node knows of the entries it lacks, and where the newest version of each block
//! is (docs/PROTOCOL.md §7.1–7.2; the data-location table of JP 2003-402994 ¶0078–0081).
//!
//! [`RemoteIndex`] holds the headers of entries the peer has and this node has not applied
//! (they stream ahead of the entries' data). Together with the index of the node's own
//! local-unreflected area ([`super::LuArea::newest`]) it answers [`locate`]: the newest
//! version of a block is either here (local), in the LU area, or on the peer — and then
//! which seq wrote it.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::types::{BlockNo, Seq};

/// Most block numbers a [`RemoteIndex`] holds (64 MiB of them): a peer whose unapplied
/// backlog names more stops sending headers and says so (the index then overflows).
pub const MAX_HEADER_BLOCKS: usize = 8 << 20;

/// The header of an entry: what it writes, without the data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryHeader {
    /// Its seq.
    pub seq: Seq,
    /// The seq before it in the lineage's chain.
    pub prev_seq: Seq,
    /// Host time of its newest transaction (a label, for reports).
    pub timestamp_ns: u64,
    /// Bytes of block data it carries.
    pub bytes: u64,
    /// The blocks it writes, each once.
    pub blocks: Vec<BlockNo>,
}

/// Where the newest version of a block is, when it is not in the local state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Location {
    /// On the peer, written by this seq (the source's `-2`).
    Peer {
        /// The entry that wrote the newest version.
        seq: Seq,
    },
    /// In this node's local-unreflected area, written by this seq (the source's `n`).
    LocalUnreflected {
        /// The LU entry that wrote the newest version.
        seq: Seq,
    },
}

impl Location {
    /// The seq that wrote the version this location holds.
    pub fn seq(self) -> Seq {
        match self {
            Location::Peer { seq } | Location::LocalUnreflected { seq } => seq,
        }
    }
}

/// The newest version of `block`, given the peer's unapplied headers and the newest seq
/// of the block in the LU area: the higher seq wins (either may be newer after several
/// role changes); `None` when neither holds it — the local state is the newest.
pub fn locate(remote: &RemoteIndex, lu_newest: Option<Seq>, block: BlockNo) -> Option<Location> {
    let peer = remote.newest(block).map(|seq| Location::Peer { seq });
    let lu = lu_newest.map(|seq| Location::LocalUnreflected { seq });
    match (peer, lu) {
        (Some(p), Some(l)) => Some(if p.seq() > l.seq() { p } else { l }),
        (p, l) => p.or(l),
    }
}

/// A header the index cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The header does not continue the chain of those already held.
    #[error("entry header {seq} follows {prev}, but the newest header held is {last}")]
    Chain {
        /// The header's seq.
        seq: Seq,
        /// Its prev_seq.
        prev: Seq,
        /// The newest seq held.
        last: Seq,
    },
    /// The header names a block twice, or a block outside the volume.
    #[error("entry header {seq}: {reason}")]
    Bad {
        /// The header's seq.
        seq: Seq,
        /// What is wrong.
        reason: String,
    },
}

/// Headers of the entries after the applied seq, in chain order, and for each block the
/// newest seq among them. Memory grows with the backlog (one `u64` per block per entry,
/// plus the map), capped at [`MAX_HEADER_BLOCKS`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoteIndex {
    /// Newest seq applied locally: headers up to it are dropped.
    applied: Seq,
    entries: VecDeque<EntryHeader>,
    newest: HashMap<BlockNo, Seq>,
    block_refs: usize,
    /// Newest header seen, held or dropped (the chain continues from it).
    seen: Seq,
    /// Headers were dropped for lack of room: the index is partial.
    overflow: bool,
}

/// What the index says of the backlog, for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BacklogSummary {
    /// Entries not applied.
    pub entries: u64,
    /// Distinct blocks whose newest version is in them.
    pub blocks: u64,
    /// Bytes of block data in them.
    pub bytes: u64,
    /// Oldest and newest seq.
    pub seqs: Option<(Seq, Seq)>,
    /// Host times of the oldest and newest.
    pub span_ns: Option<(u64, u64)>,
}

impl RemoteIndex {
    /// An empty index for a node that has applied everything up to `applied`.
    pub fn new(applied: Seq) -> Self {
        RemoteIndex {
            applied,
            seen: applied,
            ..Default::default()
        }
    }

    /// Adds a header. One at or below the applied seq, or already held, is ignored (a
    /// duplicate); one that does not continue the chain is refused. Beyond
    /// [`MAX_HEADER_BLOCKS`] the header is dropped and the index marked overflowed.
    pub fn add(&mut self, h: EntryHeader, volume_blocks: u64) -> Result<(), HeaderError> {
        let last = self.last();
        if h.seq <= last {
            return Ok(());
        }
        if h.prev_seq != last {
            return Err(HeaderError::Chain {
                seq: h.seq,
                prev: h.prev_seq,
                last,
            });
        }
        let mut seen = std::collections::HashSet::with_capacity(h.blocks.len());
        for &b in &h.blocks {
            if b >= volume_blocks {
                return Err(HeaderError::Bad {
                    seq: h.seq,
                    reason: format!("block {b} is outside the volume ({volume_blocks} blocks)"),
                });
            }
            if !seen.insert(b) {
                return Err(HeaderError::Bad {
                    seq: h.seq,
                    reason: format!("block {b} named twice"),
                });
            }
        }
        self.seen = h.seq;
        if self.overflow || self.block_refs + h.blocks.len() > MAX_HEADER_BLOCKS {
            self.overflow = true;
            return Ok(());
        }
        for &b in &h.blocks {
            self.newest.insert(b, h.seq);
        }
        self.block_refs += h.blocks.len();
        self.entries.push_back(h);
        Ok(())
    }

    /// The entry `seq` (and every one before it) is applied locally: blocks whose newest
    /// version it wrote are local now; blocks newer in a later entry stay with the peer.
    pub fn applied(&mut self, seq: Seq) {
        if seq <= self.applied {
            return;
        }
        self.applied = seq;
        self.seen = self.seen.max(seq);
        while self.entries.front().is_some_and(|e| e.seq <= seq) {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            self.block_refs -= e.blocks.len();
            for b in e.blocks {
                if self.newest.get(&b).is_some_and(|&s| s <= seq) {
                    self.newest.remove(&b);
                }
            }
        }
        if self.entries.is_empty() && seq >= self.seen {
            // Everything announced has arrived: later headers are complete again.
            self.overflow = false;
        }
    }

    /// Hands the whole index over (to the volume taking over) and keeps what a secondary's
    /// replicator still asks of it afterwards: the headers (a forced takeover reports
    /// them), the applied and newest seqs, the overflow — not the per-block map, the
    /// bulk of the index (a copy of it took milliseconds at ready with 131,080 blocks).
    /// The copy kept answers [`RemoteIndex::newest`] and [`RemoteIndex::peer_blocks`]
    /// with nothing: the volume's index is the one that locates blocks.
    pub fn hand_over(&mut self) -> RemoteIndex {
        let kept = RemoteIndex {
            applied: self.applied,
            entries: self.entries.clone(),
            newest: HashMap::new(),
            block_refs: self.block_refs,
            seen: self.seen,
            overflow: self.overflow,
        };
        std::mem::replace(self, kept)
    }

    /// The newest unapplied seq that writes `block`.
    pub fn newest(&self, block: BlockNo) -> Option<Seq> {
        self.newest.get(&block).copied()
    }

    /// Up to `max` blocks of `range` whose newest version is on the peer, the most
    /// recently written first, found from the newest header back reading at most `scan`
    /// block numbers: what a taker fetches with its bitmaps, ahead of its first writes
    /// (the inode table's recent blocks).
    pub fn newest_in(&self, range: Range<BlockNo>, max: usize, scan: usize) -> Vec<(BlockNo, Seq)> {
        let mut found = Vec::new();
        let named = self
            .entries
            .iter()
            .rev()
            .flat_map(|e| e.blocks.iter().map(|&b| (b, e.seq)));
        for (b, seq) in named.take(scan) {
            if found.len() == max {
                break;
            }
            // Each block is named once by the entry of its newest version.
            if range.contains(&b) && self.newest.get(&b) == Some(&seq) {
                found.push((b, seq));
            }
        }
        found
    }

    /// The newest seq announced (held, or dropped in an overflow), or the applied seq.
    pub fn last(&self) -> Seq {
        self.seen
    }

    /// The newest seq applied locally.
    pub fn applied_seq(&self) -> Seq {
        self.applied
    }

    /// Headers were dropped for lack of room: the index does not know every block.
    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    /// The headers held, oldest first.
    pub fn entries(&self) -> impl Iterator<Item = &EntryHeader> {
        self.entries.iter()
    }

    /// Blocks whose newest version is on the peer, in no particular order.
    pub fn peer_blocks(&self) -> impl Iterator<Item = (BlockNo, Seq)> + '_ {
        self.newest.iter().map(|(&b, &s)| (b, s))
    }

    /// The backlog the headers describe.
    pub fn summary(&self) -> BacklogSummary {
        let (first, last) = (self.entries.front(), self.entries.back());
        BacklogSummary {
            entries: self.entries.len() as u64,
            blocks: self.newest.len() as u64,
            bytes: self.entries.iter().map(|e| e.bytes).sum(),
            seqs: first.zip(last).map(|(f, l)| (f.seq, l.seq)),
            span_ns: first
                .zip(last)
                .map(|(f, l)| (f.timestamp_ns, l.timestamp_ns)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(seq: u64, prev: u64, blocks: &[u64]) -> EntryHeader {
        EntryHeader {
            seq: Seq(seq),
            prev_seq: Seq(prev),
            timestamp_ns: seq * 1000,
            bytes: 4096 * blocks.len() as u64,
            blocks: blocks.to_vec(),
        }
    }

    #[test]
    fn a_block_stays_with_the_peer_until_the_entry_of_its_newest_version_is_applied() {
        let mut r = RemoteIndex::new(Seq(10));
        r.add(h(11, 10, &[1, 2]), 100).unwrap();
        r.add(h(13, 11, &[2, 3]), 100).unwrap();
        assert_eq!(r.newest(1), Some(Seq(11)));
        assert_eq!(r.newest(2), Some(Seq(13)));
        // The older version of block 2 arrives first: it does not make the block local.
        r.applied(Seq(11));
        assert_eq!(r.newest(1), None);
        assert_eq!(r.newest(2), Some(Seq(13)));
        assert_eq!(r.newest(3), Some(Seq(13)));
        r.applied(Seq(13));
        assert_eq!((r.newest(2), r.newest(3)), (None, None));
        assert_eq!(r.summary(), BacklogSummary::default());
    }

    #[test]
    fn the_newest_blocks_of_a_range_come_most_recent_first_within_the_bounds() {
        let mut r = RemoteIndex::new(Seq(10));
        r.add(h(11, 10, &[5, 6, 50]), 100).unwrap();
        r.add(h(12, 11, &[7, 60]), 100).unwrap();
        r.add(h(13, 12, &[5, 61]), 100).unwrap();
        // Block 5's newest version is 13's; 50-61 are outside the range.
        assert_eq!(
            r.newest_in(0..10, 8, 100),
            vec![(5, Seq(13)), (7, Seq(12)), (6, Seq(11))]
        );
        assert_eq!(r.newest_in(0..10, 2, 100), vec![(5, Seq(13)), (7, Seq(12))]);
        // Four block numbers read, from the newest header back: 5, 61, 7, 60.
        assert_eq!(r.newest_in(0..10, 8, 4), vec![(5, Seq(13)), (7, Seq(12))]);
        r.applied(Seq(12));
        assert_eq!(r.newest_in(0..10, 8, 100), vec![(5, Seq(13))]);
    }

    #[test]
    fn handing_the_index_over_keeps_the_headers_and_gives_away_the_block_map() {
        let mut r = RemoteIndex::new(Seq(10));
        r.add(h(11, 10, &[1, 2]), 100).unwrap();
        r.add(h(12, 11, &[2, 3]), 100).unwrap();
        let whole = r.clone();
        let given = r.hand_over();
        assert!(given == whole, "the volume gets the whole index");
        assert_eq!(given.newest(2), Some(Seq(12)));
        assert_eq!(r.newest(2), None, "the map went with it");
        let seqs: Vec<Seq> = r.entries().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![Seq(11), Seq(12)]);
        assert_eq!(
            (r.last(), r.applied_seq(), r.overflowed()),
            (Seq(12), Seq(10), false)
        );
        // It follows the drain as before, and chains the next header.
        r.applied(Seq(11));
        assert_eq!(r.entries().count(), 1);
        r.add(h(13, 12, &[4]), 100).unwrap();
        assert_eq!(r.last(), Seq(13));
    }

    #[test]
    fn duplicates_are_ignored_and_a_broken_chain_is_refused() {
        let mut r = RemoteIndex::new(Seq(5));
        r.add(h(5, 4, &[9]), 100).unwrap();
        assert_eq!(r.newest(9), None, "at or below the applied seq");
        r.add(h(7, 5, &[1]), 100).unwrap();
        r.add(h(7, 5, &[1]), 100).unwrap();
        assert_eq!(r.summary().entries, 1);
        let e = r.add(h(9, 8, &[2]), 100).unwrap_err();
        assert!(matches!(e, HeaderError::Chain { last: Seq(7), .. }), "{e}");
        assert!(r.add(h(8, 7, &[2, 2]), 100).is_err(), "a block named twice");
        assert!(r.add(h(8, 7, &[100]), 100).is_err(), "outside the volume");
        assert_eq!(r.last(), Seq(7));
    }

    #[test]
    fn the_higher_seq_wins_between_the_peer_and_the_local_unreflected_area() {
        let mut r = RemoteIndex::new(Seq(0));
        r.add(h(4, 0, &[1, 2]), 10).unwrap();
        assert_eq!(locate(&r, None, 1), Some(Location::Peer { seq: Seq(4) }));
        assert_eq!(
            locate(&r, Some(Seq(6)), 1),
            Some(Location::LocalUnreflected { seq: Seq(6) })
        );
        // After a failback the peer may hold a version newer than this node's LU.
        assert_eq!(
            locate(&r, Some(Seq(3)), 2),
            Some(Location::Peer { seq: Seq(4) })
        );
        assert_eq!(locate(&r, None, 7), None);
    }

    #[test]
    fn the_summary_reports_seqs_time_span_and_bytes() {
        let mut r = RemoteIndex::new(Seq(1));
        r.add(h(2, 1, &[1, 2, 3]), 10).unwrap();
        r.add(h(5, 2, &[3]), 10).unwrap();
        let s = r.summary();
        assert_eq!(s.entries, 2);
        assert_eq!(s.blocks, 3);
        assert_eq!(s.bytes, 4 * 4096);
        assert_eq!(s.seqs, Some((Seq(2), Seq(5))));
        assert_eq!(s.span_ns, Some((2000, 5000)));
    }

    #[test]
    fn an_index_beyond_its_cap_says_it_is_partial_until_the_backlog_has_arrived() {
        let mut r = RemoteIndex::new(Seq(0));
        r.block_refs = MAX_HEADER_BLOCKS - 1;
        r.add(h(1, 0, &[1, 2]), 10).unwrap();
        assert!(r.overflowed());
        assert_eq!(r.newest(1), None, "a dropped header is not held");
        // The chain goes on from the dropped header; later headers are dropped too.
        r.block_refs = 0;
        r.add(h(2, 1, &[3]), 10).unwrap();
        assert_eq!((r.newest(3), r.last()), (None, Seq(2)));
        r.applied(Seq(1));
        assert!(r.overflowed(), "entry 2 has not arrived");
        r.applied(Seq(2));
        assert!(!r.overflowed());
        r.add(h(3, 2, &[4]), 10).unwrap();
        assert_eq!(r.newest(4), Some(Seq(3)));
    }
}
