//! The secondary's sub-machine (docs/PROTOCOL.md §5): it applies the primary's entries
//! strictly in order and acknowledges each twice — *received* (in its journal and visible,
//! the moment it is applied) and *durable* (after its own group commit, or a flush the
//! primary asked for) — writes copy blocks, becomes consistent again once a copy's last
//! seq is durable, sends back to a reconciling primary the entries it lost, and compares
//! the blocks of an online verify in the state the primary computed them in.
//!
//! Its handlers are methods of [`SecondaryState`] that get the state both roles share as a
//! [`Ctx`]; [`Replicator`] calls them for a node that is secondary.

use std::collections::{BTreeMap, VecDeque};

#[cfg(doc)]
use super::Replicator;
use super::replicator::{Ctx, PeerView, VerifyRequest, lineage_follows};
use super::{Action, ForcePlan, Hello, Message, PairState, Status, Takeover, WireBlock, WireEntry};
use crate::takeover::{EntryHeader, RemoteIndex};
use crate::types::Seq;

/// Entries a secondary buffers ahead of a gap, whatever their size (entries without blocks
/// would otherwise escape the byte bound); beyond, they are dropped and come again.
const MAX_OUT_OF_ORDER_ENTRIES: usize = 4096;
/// Verify requests a secondary holds for a state it has not reached (a primary keeps a
/// few in flight; more is not a primary speaking the protocol).
const MAX_VERIFY_WAIT: usize = 64;
/// Block numbers per `Headers` message a frozen taker sends (8 bytes each on the wire).
const HEADER_BATCH_BLOCKS: usize = 64 << 10;

/// What only a secondary keeps: how far it has the primary's entries, what arrived ahead
/// of a gap, and what the primary asked of it.
#[derive(Default)]
pub(super) struct SecondaryState {
    /// Newest seq applied (received).
    received: Seq,
    /// Newest seq durable.
    durable: Seq,
    /// Entries received ahead of a gap, by their prev_seq.
    ooo: BTreeMap<Seq, WireEntry>,
    /// Bytes of block data in `ooo`.
    ooo_bytes: u64,
    /// The primary asked for everything up to this seq to be made durable.
    flush_wanted: Seq,
    /// A [`Action::SyncLocal`] is out.
    syncing: bool,
    /// A copy ended at this seq while an apply was outstanding.
    copy_end: Option<Seq>,
    /// A reconciling primary pulled entries after this seq while an apply was outstanding.
    pull: Option<Seq>,
    /// Verify requests for a state this node has not reached yet.
    verify_wait: VecDeque<VerifyRequest>,
    /// Headers of the primary's entries not applied yet (docs/PROTOCOL.md §7.2).
    remote: RemoteIndex,
    /// A takeover this node asked for, not answered yet.
    asked: Option<u64>,
    /// Taking over: the old primary's freeze point, until the drain and merge are done.
    taking: Option<Seq>,
    /// Taking over: the merge was handed out.
    merging: bool,
    /// Taking over, and frozen at this seq by a failback (§7.6): writes refused; once the
    /// drain and merge are complete this node is a frozen source.
    frozen: Option<Seq>,
    /// On this connection, the newest seq the primary showed it holds (its `Durable`, the
    /// predecessor of an entry it sent): a pull for entries before it is stale.
    primary_has: Seq,
    /// Rejoining after a divergence: the blocks of this node's own tail (§7.8).
    rejoin: Option<Vec<crate::types::BlockNo>>,
    /// Frozen by a failback, the merge found the journal full (logged once).
    pub(super) merge_full_logged: bool,
    /// A primary's hello was accepted since this node started: the headers held are those
    /// of its last connection (before, a forced takeover cannot know what it lacks).
    heard_primary: bool,
}

impl SecondaryState {
    /// A node becomes secondary with its journal durable up to `durable` (all it has).
    pub(super) fn start(ctx: &mut Ctx, durable: Seq) -> Self {
        ctx.state = PairState::Suspended;
        let (taking, frozen) = match ctx.persisted.takeover {
            Some(Takeover::Taker { freeze }) => (Some(freeze), None),
            Some(Takeover::FrozenTaker { drain, freeze }) => (Some(drain), Some(freeze)),
            _ => (None, None),
        };
        // A taker restarted during its merge holds its own merged entries after the drain
        // point in its journal: of the old primary's chain it has the drain point at most.
        let durable = taking.map_or(durable, |f| durable.min(f));
        let mut s = SecondaryState {
            received: durable,
            durable,
            remote: RemoteIndex::new(durable),
            taking,
            frozen,
            ..SecondaryState::default()
        };
        // Restarted with the drain complete: the merge goes on.
        s.maybe_merge(ctx);
        s
    }

    /// Rejoining: the blocks of this node's tail, for its hello.
    pub(super) fn rejoin(&self) -> Option<&[crate::types::BlockNo]> {
        self.rejoin.as_deref()
    }

    pub(super) fn set_rejoin(&mut self, blocks: Option<Vec<crate::types::BlockNo>>) {
        self.rejoin = blocks;
    }

    /// The takeover request sent on this connection and not answered yet.
    pub(super) fn asked(&self) -> Option<u64> {
        self.asked
    }

    /// Taking over (the old primary's freeze point, what this node drains).
    pub(super) fn taking_over(&self) -> Option<Seq> {
        self.taking
    }

    /// Taking over and not frozen by a failback: the filesystem writes to the
    /// local-unreflected area.
    pub(super) fn admits_writes(&self) -> bool {
        self.taking.is_some() && self.frozen.is_none()
    }

    /// Frozen by a failback at this seq (§7.6).
    pub(super) fn frozen(&self) -> Option<Seq> {
        self.frozen
    }

    /// The old primary, frozen, takes over again before this node's drain and merge are
    /// complete (failback, §7.6): the driver freezes the filesystem and hands this node's
    /// entries after the drain point to [`SecondaryState::on_frozen_here`]. Asked again
    /// (the answer was lost with its connection), it answers the same.
    fn on_takeover(&mut self, ctx: &mut Ctx, id: u64) {
        if self.taking.is_none() {
            ctx.refuse(
                "a takeover asked of a secondary that is not taking over: this node is not \
                 the primary"
                    .into(),
            );
            return;
        }
        if matches!(ctx.persisted.backlog, super::Backlog::Bitmap { .. }) {
            // Its merged entries went into the difference bitmap: the peer could not drain
            // them in order.
            ctx.refuse(
                "this node's merged entries overflowed its journal into the difference \
                 bitmap: take over again once its merge is complete"
                    .into(),
            );
            return;
        }
        tracing::info!(
            request = id,
            "failback: the old primary takes over again: freezing"
        );
        ctx.out.push_back(Action::Freeze { id });
    }

    /// Frozen for a failback: every local entry up to `newest` is durable, with `headers`
    /// those after the drain point. The epoch moves (the first time), the role change is
    /// persisted, and the peer gets the headers and the freeze point.
    pub(super) fn on_frozen_here(
        &mut self,
        ctx: &mut Ctx,
        id: u64,
        newest: Seq,
        headers: Vec<EntryHeader>,
    ) {
        let Some(drain) = self.taking else {
            return;
        };
        let freeze = match self.frozen {
            Some(f) => f,
            None => {
                let freeze = newest.max(drain);
                self.frozen = Some(freeze);
                ctx.persisted.epoch = super::Epoch(ctx.persisted.epoch.0 + 1);
                ctx.persisted.takeover = Some(Takeover::FrozenTaker { drain, freeze });
                ctx.persist();
                tracing::info!(
                    seq = %freeze,
                    epoch = ctx.persisted.epoch.0,
                    "frozen for a failback: the drain and merge complete here, then the peer \
                     drains this node's entries"
                );
                freeze
            }
        };
        if ctx.peer.is_none() {
            return;
        }
        let epoch = ctx.persisted.epoch;
        let mut batch: Vec<EntryHeader> = Vec::new();
        let mut blocks = 0;
        for h in headers
            .into_iter()
            .filter(|h| h.seq > drain && h.seq <= freeze)
        {
            blocks += h.blocks.len();
            batch.push(h);
            if blocks >= HEADER_BATCH_BLOCKS {
                let entries = std::mem::take(&mut batch);
                ctx.send(Message::Headers { epoch, entries });
                blocks = 0;
            }
        }
        if !batch.is_empty() {
            ctx.send(Message::Headers {
                epoch,
                entries: batch,
            });
        }
        ctx.send(Message::Frozen {
            epoch,
            id,
            seq: freeze,
        });
    }

    /// Asks the primary to freeze and hand over (docs/PROTOCOL.md §7.3).
    pub(super) fn request_takeover(&mut self, ctx: &mut Ctx, id: u64) -> Result<(), String> {
        if self.frozen.is_some() {
            return Err(
                "this node is frozen: the peer is taking over again (failback); it becomes \
                 the peer's secondary once its drain and merge are complete"
                    .into(),
            );
        }
        if self.taking.is_some() {
            return Err("this node is already taking over".into());
        }
        if ctx.peer.is_none() || ctx.state != PairState::Pair {
            return Err(format!(
                "the pair is {} and the primary {}: a planned takeover needs the primary \
                 reachable and the replica consistent (`--force` when the primary is gone)",
                ctx.state,
                if ctx.peer.is_some() {
                    "connected"
                } else {
                    "unreachable"
                }
            ));
        }
        if self.remote.overflowed() {
            return Err(
                "the primary's backlog is larger than the headers this node keeps: wait until \
                 it has drained further"
                    .into(),
            );
        }
        self.asked = Some(id);
        let epoch = ctx.persisted.epoch;
        ctx.send(Message::Takeover { epoch, id });
        Ok(())
    }

    /// The primary froze at `freeze` and moved the epoch: this node takes over.
    fn on_frozen(&mut self, ctx: &mut Ctx, id: u64, freeze: Seq, epoch: super::Epoch) {
        if self.asked != Some(id) || self.taking.is_some() {
            tracing::info!(
                request = id,
                "a freeze answering no request of this node: ignored"
            );
            return;
        }
        self.asked = None;
        if self.remote.last().max(self.received) != freeze {
            ctx.refuse(format!(
                "protocol violation: frozen at seq {freeze}, but the headers received end at {}",
                self.remote.last()
            ));
            return;
        }
        let index = self.remote.hand_over();
        ctx.persisted.epoch = epoch;
        ctx.persisted.takeover = Some(Takeover::Taker { freeze });
        self.taking = Some(freeze);
        ctx.out.push_back(Action::BeginTakeover {
            id,
            freeze,
            index,
            state: ctx.persisted.clone(),
        });
        self.maybe_merge(ctx);
    }

    /// Taking over: once the old primary's last entry is applied, the merge begins.
    fn maybe_merge(&mut self, ctx: &mut Ctx) {
        if self.taking.is_some_and(|f| self.received >= f) && !self.merging {
            self.merging = true;
            ctx.out.push_back(Action::Merge);
        }
    }

    /// Headers of the primary's entries, ahead of their data.
    fn on_headers(&mut self, ctx: &mut Ctx, entries: Vec<EntryHeader>) {
        for h in entries {
            if let Err(e) = self.remote.add(h, ctx.cfg.blocks) {
                ctx.refuse(format!("protocol violation: {e}"));
                return;
            }
        }
    }

    /// The newest seq received and the newest durable (for its hello), counting the apply
    /// under way (`applying`).
    pub(super) fn progress(&self, applying: Option<Seq>) -> (Seq, Seq) {
        // An apply under way completes (atomically) before any message of this connection
        // is handled: the peer must count on it.
        let received = applying.unwrap_or(self.received).max(self.received);
        (received, self.durable)
    }

    /// The secondary's part of a snapshot for `pairfs status`.
    pub(super) fn status(&self, s: &mut Status) {
        s.last_seq = self.received;
        s.received = self.received;
        s.durable = self.durable;
        s.headers_seq = self.remote.last().max(self.received);
    }

    /// What a connection brought and the next one will not: requests of the primary, and
    /// entries ahead of a gap. The headers stay until the next connection: they are what a
    /// forced takeover reports lost if the primary does not come back (§7.7).
    pub(super) fn clear_buffers(&mut self) {
        self.pull = None;
        self.verify_wait.clear();
        self.clear_ooo();
        self.primary_has = Seq::NONE;
        self.asked = None;
    }

    /// A new connection: the primary sends the headers of what this node lacks again,
    /// after the seq of its hello (which counts the apply under way).
    pub(super) fn on_connected(&mut self, applying: Option<Seq>) {
        self.remote = RemoteIndex::new(self.progress(applying).0);
    }

    /// What a forced takeover cannot have (docs/PROTOCOL.md §7.7), or why it cannot be
    /// forced now.
    pub(super) fn force_plan(&self, ctx: &Ctx) -> Result<ForcePlan, String> {
        if ctx.peer.is_some() {
            return Err(
                "the primary is connected: use a planned takeover (without --force), \
                        which loses nothing"
                    .into(),
            );
        }
        if ctx.persisted.empty || ctx.persisted.inconsistent_until.is_some() {
            return Err(
                "this node's replica is not consistent (its copy or resync is \
                        incomplete): it holds no filesystem it could serve"
                    .into(),
            );
        }
        if ctx.applying.is_some() {
            return Err("an entry of the primary is being applied: try again".into());
        }
        if self.taking.is_some_and(|f| self.received >= f) {
            return Err(
                "every entry of the old primary is here: the merge completes and this \
                        node becomes the primary without it"
                    .into(),
            );
        }
        Ok(ForcePlan {
            base: self.received,
            lost: self
                .remote
                .entries()
                .filter(|h| h.seq > self.received)
                .cloned()
                .collect(),
            // Restarted since the primary was last heard: its headers went with the restart.
            partial: self.remote.overflowed() || (!self.heard_primary && self.taking.is_none()),
            cut_short: self.taking,
        })
    }

    /// Drops the entries held ahead of a gap.
    fn clear_ooo(&mut self) {
        self.ooo.clear();
        self.ooo_bytes = 0;
    }

    /// A message from the primary, after its hello; one a secondary does not take is
    /// handed back.
    // The message a role does not take is handed back as it came (moved, not copied).
    #[allow(clippy::result_large_err)]
    pub(super) fn on_message(&mut self, ctx: &mut Ctx, m: Message) -> Result<(), Message> {
        match m {
            Message::Entry { entry, .. } => self.on_entry(ctx, entry),
            Message::CopyBlocks { blocks, .. } => self.on_copy_blocks(ctx, blocks),
            Message::CopyEnd {
                base,
                consistent_at,
                ..
            } => self.on_copy_end(ctx, base, consistent_at),
            Message::Flush { upto, .. } => self.on_flush(ctx, upto),
            Message::Durable { seq, .. } => {
                self.primary_has = self.primary_has.max(seq);
                ctx.out.push_back(Action::Release(seq));
            }
            Message::Pull { after, .. } => self.on_pull(ctx, after),
            Message::Verify { id, at, blocks, .. } => self.on_verify(ctx, id, at, blocks),
            Message::Headers { entries, .. } => self.on_headers(ctx, entries),
            Message::Frozen { id, seq, epoch } => self.on_frozen(ctx, id, seq, epoch),
            Message::Takeover { id, .. } => self.on_takeover(ctx, id),
            m => return Err(m),
        }
        Ok(())
    }

    /// The primary's hello (its role, protocol and geometry already checked).
    pub(super) fn on_hello(&mut self, ctx: &mut Ctx, h: Hello) {
        // Frozen by a failback, the old primary may have restarted before it recorded the
        // answer: it is one epoch behind, and asks again (§7.6).
        let unrecorded = self.frozen.is_some()
            && matches!(h.takeover, Some(Takeover::Source { freeze }) if Some(freeze) == self.taking)
            && h.epoch.0 + 1 == ctx.persisted.epoch.0;
        if h.epoch < ctx.persisted.epoch && !unrecorded {
            ctx.refuse(format!(
                "the primary is at epoch {}, this node at {}: stale primary",
                h.epoch.0, ctx.persisted.epoch.0
            ));
            return;
        }
        if !ctx.persisted.empty && ctx.persisted.inconsistent_until.is_none() {
            if h.volume != ctx.cfg.volume {
                ctx.refuse(format!(
                    "the primary holds another volume ({}, this node {})",
                    h.volume, ctx.cfg.volume
                ));
                return;
            }
            let ours = &ctx.persisted.generations;
            if let Err(why) = lineage_follows(ours, self.received, &h.generations) {
                ctx.refuse(format!(
                    "the nodes' data diverged: {why}; nothing is overwritten automatically"
                ));
                return;
            }
        }
        if h.max_entry_bytes == 0 {
            ctx.refuse("protocol violation: the primary takes no entries".into());
            return;
        }
        if h.epoch > ctx.persisted.epoch || h.generations != ctx.persisted.generations {
            // Adopted only up to where this node's data follows: a primary that is behind
            // (reconciling) keeps the lineage this node already has.
            ctx.persisted.epoch = h.epoch;
            ctx.persisted.generations = h.generations.clone();
            ctx.persist();
        }
        if ctx.persisted.empty && h.volume != ctx.cfg.volume {
            ctx.cfg.volume = h.volume;
            ctx.out.push_back(Action::AdoptVolume(h.volume));
        }
        let (received, durable) = (self.received, self.durable);
        self.heard_primary = true;
        ctx.peer = Some(PeerView {
            hello: h,
            received,
            durable,
        });
        ctx.refused = None;
        ctx.state = if ctx.persisted.inconsistent_until.is_some() || ctx.persisted.empty {
            PairState::Copying
        } else {
            PairState::Pair
        };
    }

    /// Acknowledges what is received and durable here.
    fn ack(&self, ctx: &mut Ctx) {
        if !ctx.connected || ctx.peer.is_none() {
            return;
        }
        let epoch = ctx.persisted.epoch;
        let (received, durable) = (self.received, self.durable);
        ctx.send(Message::Ack {
            epoch,
            received,
            durable,
        });
    }

    /// An entry of the stream: applied if it is the next, held if it is ahead of a gap
    /// (room permitting), acknowledged again if it is a duplicate.
    fn on_entry(&mut self, ctx: &mut Ctx, e: WireEntry) {
        self.primary_has = self.primary_has.max(e.prev_seq);
        if ctx.persisted.inconsistent_until == Some(Seq::NONE) {
            // Entries come only after the copy ended; these belong to an older stream.
            return;
        }
        if e.seq <= self.received || ctx.applying.is_some_and(|s| e.seq <= s) {
            if ctx.applying.is_none() {
                self.ack(ctx); // a duplicate: the primary may have missed our ack
            }
            return;
        }
        if e.prev_seq == self.received && ctx.applying.is_none() {
            ctx.applying = Some(e.seq);
            ctx.out.push_back(Action::Apply(e));
            return;
        }
        let bytes = e.data_bytes();
        let room = self.ooo.len() < MAX_OUT_OF_ORDER_ENTRIES || self.ooo.contains_key(&e.prev_seq);
        if room && self.ooo_bytes + bytes <= ctx.cfg.max_out_of_order_bytes {
            self.ooo_bytes += bytes;
            if let Some(old) = self.ooo.insert(e.prev_seq, e) {
                self.ooo_bytes -= old.data_bytes();
            }
        }
    }

    /// Copy data: written into the volume, which is mid-copy from now on.
    fn on_copy_blocks(&mut self, ctx: &mut Ctx, blocks: Vec<WireBlock>) {
        if ctx.persisted.inconsistent_until != Some(Seq::NONE) {
            // The first copy data: from now on the volume is not a consistent image, and
            // entries of the stream before the copy must not land after copy blocks.
            ctx.persisted.inconsistent_until = Some(Seq::NONE);
            ctx.persist();
            ctx.state = PairState::Copying;
            self.clear_ooo();
        }
        ctx.out.push_back(Action::ApplyCopy(blocks));
    }

    /// The copy is complete: consistent once everything up to `consistent_at` is durable.
    fn on_copy_end(&mut self, ctx: &mut Ctx, base: Seq, consistent_at: Seq) {
        ctx.persisted.inconsistent_until = Some(consistent_at.max(base));
        ctx.persisted.empty = false;
        ctx.persist();
        self.clear_ooo();
        // Consistent once durable: ask for the sync now rather than a commit interval later.
        self.flush_wanted = self.flush_wanted.max(consistent_at.max(base));
        self.copy_end = Some(base);
        if ctx.applying.is_none() {
            self.record_copy_end(ctx);
        }
    }

    /// The copy ended at `base` (and no apply is outstanding): record that the volume now
    /// holds everything up to it.
    fn record_copy_end(&mut self, ctx: &mut Ctx) {
        let Some(base) = self.copy_end.take() else {
            return;
        };
        if base > self.received {
            ctx.applying = Some(base);
            ctx.out.push_back(Action::Apply(WireEntry {
                seq: base,
                prev_seq: self.received,
                timestamp_ns: 0,
                blocks: Vec::new(),
                frees: false,
            }));
        } else {
            self.after_apply(ctx);
        }
    }

    /// The primary wants everything up to `upto` durable (an fsync there).
    fn on_flush(&mut self, ctx: &mut Ctx, upto: Seq) {
        self.flush_wanted = self.flush_wanted.max(upto);
        self.maybe_sync(ctx);
    }

    /// Asks for a local sync when the primary wants entries durable that are applied here.
    fn maybe_sync(&mut self, ctx: &mut Ctx) {
        if !self.syncing && self.durable < self.flush_wanted.min(self.received) {
            self.syncing = true;
            ctx.out.push_back(Action::SyncLocal);
        }
    }

    /// A reconciling primary wants back the entries this node holds after `after`.
    fn on_pull(&mut self, ctx: &mut Ctx, after: Seq) {
        if ctx.applying.is_some() {
            // An entry sent before the primary crashed is being applied: once it is, send
            // it back too.
            self.pull = Some(after);
            return;
        }
        if after >= self.received || after < self.primary_has {
            // Nothing newer here, or a pull sent again before the primary took its entries
            // back and went on (it has shown it holds more since).
            return;
        }
        ctx.out.push_back(Action::SendOwnEntries {
            after,
            upto: self.received,
        });
    }

    /// An online verify request for the state after `at`: compared once this node is
    /// there; answered "not compared" if it is past it, not consistent, or holds too many.
    fn on_verify(&mut self, ctx: &mut Ctx, id: u64, at: Seq, blocks: Vec<(u64, u32)>) {
        let consistent = ctx.persisted.inconsistent_until.is_none() && !ctx.persisted.empty;
        if !consistent || at < self.received || self.verify_wait.len() >= MAX_VERIFY_WAIT {
            ctx.send(Message::Verified {
                epoch: ctx.persisted.epoch,
                id,
                differ: None,
            });
            return;
        }
        self.verify_wait.push_back((id, at, blocks));
        self.verify_waiting(ctx);
    }

    /// Compares the verify requests for the state this node is in; refuses those it has
    /// passed.
    fn verify_waiting(&mut self, ctx: &mut Ctx) {
        if ctx.applying.is_some() {
            return;
        }
        // (A copy since the request: the state is not a prefix's.)
        let consistent = ctx.persisted.inconsistent_until.is_none() && !ctx.persisted.empty;
        while let Some((id, at, _)) = self.verify_wait.front() {
            let (id, at) = (*id, *at);
            if at > self.received && consistent {
                return;
            }
            let Some((_, _, blocks)) = self.verify_wait.pop_front() else {
                return;
            };
            if at == self.received && consistent {
                ctx.out.push_back(Action::VerifyBlocks { id, blocks });
            } else {
                let epoch = ctx.persisted.epoch;
                ctx.send(Message::Verified {
                    epoch,
                    id,
                    differ: None,
                });
            }
        }
    }

    /// The driver applied entry `seq` (visible, in the journal, not yet durable).
    pub(super) fn on_applied(&mut self, ctx: &mut Ctx, seq: Seq) {
        self.received = seq;
        self.remote.applied(seq);
        self.maybe_merge(ctx);
        if let Some(after) = self.pull.take() {
            self.ack(ctx);
            self.on_pull(ctx, after);
            return;
        }
        if self.copy_end.is_some() {
            // An apply handed out before the copy ended: now record its end.
            self.record_copy_end(ctx);
            return;
        }
        self.after_apply(ctx);
    }

    /// An entry or a copy's end is applied: acknowledge, sync if asked, answer the verify
    /// requests for this state, and apply what was held for it.
    fn after_apply(&mut self, ctx: &mut Ctx) {
        self.ack(ctx);
        self.maybe_sync(ctx);
        self.verify_waiting(ctx);
        if ctx.persisted.inconsistent_until == Some(Seq::NONE) {
            return; // copy data is arriving: entries resume after the copy's end
        }
        // Anything buffered that now follows?
        while let Some(e) = self.ooo.remove(&self.received) {
            self.ooo_bytes -= e.data_bytes();
            if e.seq > self.received {
                ctx.applying = Some(e.seq);
                ctx.out.push_back(Action::Apply(e));
                break;
            }
        }
        let received = self.received;
        let mut dropped = 0;
        self.ooo.retain(|_, e| {
            let keep = e.seq > received;
            if !keep {
                dropped += e.data_bytes();
            }
            keep
        });
        self.ooo_bytes -= dropped;
    }

    /// The local journal is durable up to `seq` (a group commit, or the sync
    /// [`Action::SyncLocal`] asked for).
    pub(super) fn on_local_durable(&mut self, ctx: &mut Ctx, seq: Seq) {
        self.syncing = false;
        let before = self.durable;
        self.durable = self.durable.max(seq.min(self.received));
        if let Some(until) = ctx.persisted.inconsistent_until {
            // `until` is a seq the primary wrote after the copy's blocks (PROTOCOL.md §5.2):
            // durable here, it proves they are too.
            if until != Seq::NONE && self.copy_end.is_none() && self.durable >= until {
                ctx.persisted.inconsistent_until = None;
                ctx.persist();
                ctx.state = PairState::Pair;
                tracing::info!(seq = %self.durable, "replica consistent again");
            }
        }
        if self.durable > before {
            self.ack(ctx);
        }
        self.maybe_sync(ctx);
    }

    /// The driver could not make what it applied durable: no sync is out any more.
    pub(super) fn on_sync_failed(&mut self) {
        self.syncing = false;
    }

    /// The driver reopened the volume: recovery left it at `durable`, and the stream
    /// starts again from there.
    pub(super) fn on_volume_reopened(&mut self, durable: Seq) {
        self.syncing = false;
        self.clear_ooo();
        self.received = durable;
        self.durable = durable;
        self.remote = RemoteIndex::new(durable);
    }
}
