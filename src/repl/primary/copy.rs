//! A primary's copies (docs/PROTOCOL.md §5.1, §5.2): the blocks of the difference bitmap
//! when they cover what the peer lacks, else every block (a peer that is empty, was left
//! mid-copy by a full copy or a crash, or is behind the bitmap's base); and the fallback to
//! the bitmap when the backlog outgrows the journal limit or an entry can no longer be
//! sent as it was written.

use super::PrimaryState;
#[cfg(doc)]
use crate::repl::Replicator;
use crate::repl::replicator::Ctx;
use crate::repl::{Action, Backlog, CopyKind, Message, PairState};
use crate::types::Seq;

/// Where a copy to the peer stands.
pub(super) enum CopyState {
    /// Blocks are being sent; entries after `base` follow.
    Sending { base: Seq, id: u64 },
    /// CopyEnd sent; done once the peer has `consistent_at` durably.
    Finishing { consistent_at: Seq },
}

impl PrimaryState {
    /// Starts a copy of `kind` to the peer (mid-copy until the peer has it durably).
    pub(super) fn start_copy(&mut self, ctx: &mut Ctx, kind: CopyKind) {
        if kind == CopyKind::Bitmap && !self.retained.is_empty() {
            // The copy stands for everything up to now: entries still retained must be in
            // the bitmap too, or their blocks would be skipped.
            let upto = self.last_seq;
            ctx.out.push_back(Action::MarkBitmap(upto));
            self.retained.clear();
            self.retained_bytes = 0;
            self.in_flight = 0;
        }
        ctx.state = PairState::Copying;
        let full = kind == CopyKind::Full;
        if !ctx.persisted.paired || (full && !ctx.persisted.full_copy) {
            // A full copy interrupted leaves any block of the peer in any state (copied
            // blocks are not journaled there): until one completes, every copy is full.
            ctx.persisted.paired = true;
            ctx.persisted.full_copy |= full;
            ctx.persist();
        }
        self.copy_ids += 1;
        let id = self.copy_ids;
        self.copy = Some(CopyState::Sending {
            base: self.last_seq,
            id,
        });
        self.copy_progress = Some((0, 0));
        ctx.out.push_back(Action::StartCopy { kind, id });
    }

    /// The driver reports copy progress (blocks sent, blocks to send).
    pub(in crate::repl) fn on_copy_progress(&mut self, sent: u64, total: u64) {
        if self.copy.is_some() {
            self.copy_progress = Some((sent, total));
        }
    }

    /// All blocks of copy `id` are sent (see [`Replicator::handle_copy_sent`]).
    pub(in crate::repl) fn on_copy_sent(&mut self, ctx: &mut Ctx, id: u64, newest: Seq) {
        let Some(CopyState::Sending {
            base, id: current, ..
        }) = self.copy
        else {
            return;
        };
        if id != current {
            return; // a superseded copy
        }
        if std::mem::take(&mut self.copy_again) {
            // What changed while it was sent overflowed into the bitmap: send that too.
            self.start_copy(ctx, CopyKind::Bitmap);
            return;
        }
        let epoch = ctx.persisted.epoch;
        let consistent_at = newest.max(base);
        ctx.send(Message::CopyEnd {
            epoch,
            base,
            consistent_at,
        });
        // The copy carries everything up to `base`, but until the peer has applied it the
        // entries must stay accounted for: mark their blocks in the bitmap (cleared when
        // the copy completes), so an interrupted copy can still be resumed by bitmap.
        if self.retained.front().is_some_and(|e| e.seq <= base) {
            ctx.out.push_back(Action::MarkBitmap(base));
            while self.retained.front().is_some_and(|e| e.seq <= base) {
                if let Some(e) = self.retained.pop_front() {
                    self.retained_bytes -= e.journal_bytes;
                }
            }
        }
        self.sent_upto = base;
        self.copy = Some(CopyState::Finishing { consistent_at });
        self.pump(ctx);
    }

    /// The peer has the copy's last seq durably: the pair is in sync.
    pub(super) fn copy_complete(&mut self, ctx: &mut Ctx, durable: Seq) {
        self.copy = None;
        self.copy_progress = None;
        ctx.state = PairState::Pair;
        // The peer holds everything the bitmap marks, durably.
        ctx.out.push_back(Action::ClearBitmap);
        if matches!(ctx.persisted.backlog, Backlog::Bitmap { .. }) || ctx.persisted.full_copy {
            ctx.persisted.backlog = Backlog::Journal;
            ctx.persisted.full_copy = false;
            ctx.persist();
        }
        tracing::info!(seq = %durable, "copy complete: the pair is in sync");
    }

    /// Entry `seq` cannot be sent as it was: what the peer lacks goes through the
    /// difference bitmap instead.
    pub(in crate::repl) fn on_entry_unavailable(&mut self, ctx: &mut Ctx, seq: Seq) {
        if self.frozen().is_some() {
            // The peer drains this node in order: no copy (it would add an entry after the
            // freeze point), but one entry that catches it up.
            let after = self
                .retained
                .iter()
                .find(|e| e.seq == seq)
                .map_or(ctx.peer_received(), |e| e.prev_seq);
            self.catch_up(ctx, after, false);
            return;
        }
        tracing::warn!(%seq, "entry can no longer be sent as written: resync by bitmap");
        self.enter_bitmap(ctx);
    }

    /// Frozen: the peer, at `after`, gets the rest up to the freeze point as one entry
    /// ([`Action::SendCatchUp`]).
    pub(super) fn catch_up(&mut self, ctx: &mut Ctx, after: Seq, bitmap: bool) {
        let (Some(upto), Some(peer)) = (self.frozen(), ctx.peer.as_ref()) else {
            return;
        };
        let max_bytes = peer.hello.max_entry_bytes;
        tracing::warn!(
            %after,
            %upto,
            "frozen: the peer's missing entries can no longer all be sent as written; one \
             entry with the state at the freeze point of every block they change catches it up"
        );
        let bytes: u64 = self
            .retained
            .iter()
            .filter(|e| e.seq > after && e.seq > self.sent_upto)
            .map(|e| e.bytes)
            .sum();
        self.sent_upto = upto;
        self.in_flight += bytes;
        ctx.out.push_back(Action::SendCatchUp {
            after,
            upto,
            bitmap,
            max_bytes,
        });
    }

    /// The backlog outgrew the journal limit: keep it as a bitmap instead.
    /// A peer rejoins after a divergence (docs/PROTOCOL.md §7.8) naming the blocks of its
    /// own tail: the difference bitmap gets those and the blocks of every entry this node
    /// retains (everything it changed since the peer last had its data), and the copy that
    /// the hello plan then starts is a bitmap copy of their union.
    pub(super) fn accept_rejoin(&mut self, ctx: &mut Ctx, blocks: Vec<crate::types::BlockNo>) {
        tracing::warn!(
            peer_tail_blocks = blocks.len(),
            retained_entries = self.retained.len(),
            "the peer rejoins after a divergence: the blocks changed on either side are resynced"
        );
        ctx.persisted.backlog = Backlog::Bitmap { base: Seq::NONE };
        ctx.persisted.full_copy = false;
        ctx.persist();
        // This node's own generation branched off at its base: entries up to it are the
        // lineage the peer holds too (it was their primary, or applied them).
        let after = ctx
            .persisted
            .generations
            .last()
            .map_or(Seq::NONE, |g| g.base);
        ctx.out.push_back(Action::MarkBitmapAfter {
            after,
            upto: self.last_seq,
        });
        ctx.out.push_back(Action::MarkBlocks(blocks));
        self.retained.clear();
        self.retained_bytes = 0;
        self.in_flight = 0;
    }

    pub(super) fn enter_bitmap(&mut self, ctx: &mut Ctx) {
        let base = match ctx.persisted.backlog {
            Backlog::Bitmap { base } => base,
            Backlog::Journal => self.peer_durable_or_released(ctx),
        };
        ctx.persisted.backlog = Backlog::Bitmap { base };
        ctx.persist();
        let upto = self.last_seq;
        ctx.out.push_back(Action::MarkBitmap(upto));
        self.retained.clear();
        self.retained_bytes = 0;
        self.in_flight = 0;
        tracing::warn!(
            base = %base,
            upto = %upto,
            "replication backlog exceeds the journal limit: falling back to the difference bitmap"
        );
        if ctx.connected && ctx.peer.is_some() {
            // What the peer still needs is only in the bitmap now. A copy being sent goes
            // on (restarting it would never end while writes outrun the link): once its
            // blocks are sent, a bitmap copy of what changed meanwhile follows, the peer
            // staying mid-copy. A copy whose blocks are all sent is followed by one now; a
            // stream becomes a copy.
            match self.copy {
                Some(CopyState::Sending { .. }) => self.copy_again = true,
                Some(CopyState::Finishing { .. }) => self.start_copy(ctx, CopyKind::Bitmap),
                None => {
                    let kind = copy_kind_for_peer(ctx);
                    self.start_copy(ctx, kind);
                }
            }
        }
    }

    /// The newest seq the peer is known to have durably: entries are released exactly when
    /// the peer acknowledges them durable, so everything before the oldest retained entry.
    fn peer_durable_or_released(&self, ctx: &Ctx) -> Seq {
        let released = self.retained.front().map_or(self.last_seq, |e| e.prev_seq);
        released.max(ctx.peer.as_ref().map_or(Seq::NONE, |p| p.durable))
    }
}

/// Which copy brings the connected peer back: the bitmap if it covers everything the
/// peer lacks (the peer holds data and applied at least the bitmap's base), else all.
pub(super) fn copy_kind_for_peer(ctx: &Ctx) -> CopyKind {
    let Some(p) = &ctx.peer else {
        return CopyKind::Full;
    };
    if ctx.persisted.full_copy {
        return CopyKind::Full;
    }
    match ctx.persisted.backlog {
        Backlog::Bitmap { base } if !p.hello.empty && p.durable >= base => CopyKind::Bitmap,
        _ => CopyKind::Full,
    }
}
