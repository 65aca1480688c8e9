//! A primary's reconciliation (docs/PROTOCOL.md §5.6): restarted after a crash in sync
//! mode, it may be *behind* its peer, which got entries this node had not made durable. It
//! takes them back ([`Message::Pull`]) and admits writes only once they are durable here —
//! or, with the peer unreachable for `sync_timeout` (or unable to send them), continues in
//! a new generation, so that the peer's tail shows as a divergence, never overwritten.

use std::time::Instant;

use super::PrimaryState;
use crate::repl::replicator::{Ctx, PeerView};
use crate::repl::{Action, EntryMeta, Generation, Hello, Message, Mode, PairState, WireEntry};
use crate::types::Seq;

/// A primary's reconciliation after an unclean restart in sync mode.
pub(super) struct Reconcile {
    /// Give up (new generation) at this instant.
    pub(super) deadline: Instant,
    /// The peer's newest seq, once its hello said it has more than this node.
    pub(super) target: Option<Seq>,
}

impl PrimaryState {
    /// The peer's hello says it holds entries after this node's newest: pull them.
    pub(super) fn reconcile_from(&mut self, ctx: &mut Ctx, h: Hello, now: Instant) {
        let target = h.last_seq;
        tracing::warn!(
            ours = %self.last_seq,
            peer = %target,
            "the peer holds entries this node lost in its crash: taking them back"
        );
        if let Some(r) = &mut self.reconcile {
            r.target = Some(target);
            r.deadline = now + ctx.cfg.sync_timeout;
        }
        let (received, durable) = (h.last_seq, h.durable);
        ctx.peer = Some(PeerView {
            hello: h,
            received,
            durable,
        });
        let epoch = ctx.persisted.epoch;
        let after = self.last_seq;
        self.last_progress = Some(now);
        ctx.send(Message::Pull { epoch, after });
    }

    /// An entry the peer sends back: applied if it is the next one.
    pub(super) fn on_reconcile_entry(&mut self, ctx: &mut Ctx, e: WireEntry) {
        let Some(target) = self.reconcile.as_ref().and_then(|r| r.target) else {
            ctx.refuse("protocol violation: an entry for a primary that did not pull".into());
            return;
        };
        if e.seq <= self.last_seq || ctx.applying.is_some() {
            return; // a duplicate
        }
        if e.seq > target {
            ctx.refuse(format!(
                "protocol violation: entry {} beyond the {} the peer said it holds",
                e.seq, target
            ));
            return;
        }
        if e.prev_seq != self.last_seq {
            return; // one was lost on the way: pulled again on the timeout
        }
        ctx.applying = Some(e.seq);
        ctx.out.push_back(Action::Apply(e));
    }

    /// Reconciling: an entry taken back from the peer is applied (it is one of this node's
    /// entries again, to be released as usual once the peer has it durably).
    pub(in crate::repl) fn reconciled_entry(&mut self, ctx: &mut Ctx, e: EntryMeta, now: Instant) {
        self.last_seq = e.seq;
        self.last_progress = Some(now);
        self.retained.push_back(e);
        self.retained_bytes += e.journal_bytes;
        let timeout = ctx.cfg.sync_timeout;
        let Some(r) = self.reconcile.as_mut() else {
            return;
        };
        // Progress: the take-back gives up only after `sync_timeout` without any (a long
        // backlog on a slow link must not end in a new generation halfway).
        r.deadline = now + timeout;
        let Some(target) = r.target else {
            return;
        };
        if self.last_seq < target {
            return;
        }
        // Durable here before any write: the filesystem may reuse blocks those entries
        // freed only once their frees are durable (FORMAT.md §3.5).
        ctx.out.push_back(Action::SyncLocal);
    }

    /// Reconciling: everything taken back is durable here.
    pub(super) fn reconciled(&mut self, ctx: &mut Ctx, now: Instant) {
        self.finish_reconciling(ctx);
        tracing::info!(seq = %self.last_seq, "reconciled with the peer: writes resume");
        // The peer is connected: stream from here (it has everything up to the target).
        if let Some(p) = ctx.peer.take() {
            self.start_streaming(ctx, p.hello, false, now);
        }
    }

    /// The reconciliation is over (writes resume); the sync mode now configured is
    /// persisted.
    pub(super) fn finish_reconciling(&mut self, ctx: &mut Ctx) {
        self.reconcile = None;
        ctx.state = PairState::Suspended;
        let sync = ctx.cfg.mode == Mode::Sync;
        if ctx.persisted.sync_mode != sync {
            ctx.persisted.sync_mode = sync;
            ctx.persist();
        }
    }

    /// Reconciling without the peer (unreachable for `sync_timeout`, or unable to send
    /// its entries back): continue in a new generation, so that whatever the peer holds
    /// beyond this node's newest seq shows as a divergence when it returns.
    pub(super) fn give_up_reconciling(&mut self, ctx: &mut Ctx, why: &str) {
        if self.reconcile.is_none() {
            return;
        }
        let base = self.last_seq;
        ctx.persisted.generations.push(Generation {
            id: ctx.cfg.next_generation_id,
            base,
        });
        ctx.persist();
        self.finish_reconciling(ctx);
        tracing::warn!(
            base = %base,
            %why,
            "could not reconcile with the peer: writes resume in a new generation; entries \
             the peer may hold beyond this seq will show as a divergence, never overwritten"
        );
    }
}
