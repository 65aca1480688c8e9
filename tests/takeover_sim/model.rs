//! The model: coverage counters and the lineage.

use super::*;

#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct Coverage {
    pub(crate) takeovers: u64,
    pub(crate) failbacks: u64,
    pub(crate) merges: u64,
    pub(crate) step_downs: u64,
    pub(crate) kills: u64,
    pub(crate) kills_taking_over: u64,
    pub(crate) kills_frozen: u64,
    pub(crate) kills_merging: u64,
    /// Kills that lost local-unreflected entries sealed but not written yet.
    pub(crate) kills_lost_unwritten: u64,
    /// Applies that wrote blocks in place between their plan and finish.
    pub(crate) applies_split: u64,
    /// Kills between an apply's in-place write and its finish.
    pub(crate) kills_mid_apply: u64,
    pub(crate) fetched_blocks: u64,
    pub(crate) fetch_failures: u64,
    pub(crate) lu_writes: u64,
    pub(crate) lu_full: u64,
    pub(crate) merge_full: u64,
    pub(crate) merges_to_bitmap: u64,
    pub(crate) catch_ups: u64,
    pub(crate) forces: u64,
    pub(crate) forces_cut_short: u64,
    pub(crate) forces_refused: u64,
    pub(crate) forced_lost_entries: u64,
    pub(crate) reads: u64,
    pub(crate) copies: u64,
    pub(crate) asks_refused: u64,
    pub(crate) refusals: u64,
    pub(crate) steps: u64,
}

impl Coverage {
    pub(crate) fn add(&mut self, c: &Coverage) {
        let pairs = [
            (&mut self.takeovers, c.takeovers),
            (&mut self.failbacks, c.failbacks),
            (&mut self.merges, c.merges),
            (&mut self.step_downs, c.step_downs),
            (&mut self.kills, c.kills),
            (&mut self.kills_taking_over, c.kills_taking_over),
            (&mut self.kills_frozen, c.kills_frozen),
            (&mut self.kills_merging, c.kills_merging),
            (&mut self.kills_lost_unwritten, c.kills_lost_unwritten),
            (&mut self.applies_split, c.applies_split),
            (&mut self.kills_mid_apply, c.kills_mid_apply),
            (&mut self.fetched_blocks, c.fetched_blocks),
            (&mut self.fetch_failures, c.fetch_failures),
            (&mut self.lu_writes, c.lu_writes),
            (&mut self.lu_full, c.lu_full),
            (&mut self.merge_full, c.merge_full),
            (&mut self.merges_to_bitmap, c.merges_to_bitmap),
            (&mut self.catch_ups, c.catch_ups),
            (&mut self.forces, c.forces),
            (&mut self.forces_cut_short, c.forces_cut_short),
            (&mut self.forces_refused, c.forces_refused),
            (&mut self.forced_lost_entries, c.forced_lost_entries),
            (&mut self.reads, c.reads),
            (&mut self.copies, c.copies),
            (&mut self.asks_refused, c.asks_refused),
            (&mut self.refusals, c.refusals),
            (&mut self.steps, c.steps),
        ];
        for (a, b) in pairs {
            *a += b;
        }
    }
}

// ---------------------------------------------------------------- the lineage --

#[derive(Default)]
pub(crate) struct Lineage {
    /// Every entry sealed, by seq: the blocks it wrote and their values.
    pub(crate) entries: BTreeMap<Seq, BTreeMap<u64, u64>>,
}

impl Lineage {
    /// Block values after the entries up to `seq`.
    pub(crate) fn state_at(&self, seq: Seq) -> BTreeMap<u64, u64> {
        let mut st = BTreeMap::new();
        for (_, e) in self.entries.range(..=seq) {
            st.extend(e.iter().map(|(b, v)| (*b, *v)));
        }
        st
    }

    /// The value entry `seq` wrote to `b`.
    pub(crate) fn version(&self, seq: Seq, b: u64) -> Option<u64> {
        self.entries.get(&seq)?.get(&b).copied()
    }

    pub(crate) fn newest(&self) -> Seq {
        self.entries
            .keys()
            .next_back()
            .copied()
            .unwrap_or(Seq::NONE)
    }
}
