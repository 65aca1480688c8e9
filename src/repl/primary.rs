//! The primary's sub-machine (docs/PROTOCOL.md §5): it streams its journal entries in seq
//! order and releases each only when the secondary acknowledges it *durable*, copies a peer
//! that needs it (in full, or the blocks of the difference bitmap), falls back to the
//! bitmap when the backlog outgrows the journal limit, forwards online verify requests on
//! the stream, and — restarted after a crash in sync mode — takes back from its peer the
//! entries it lost before it admits writes (reconciliation).
//!
//! Its handlers are methods of [`PrimaryState`] that get the state both roles share as a
//! [`Ctx`]; [`Replicator`] calls them for a node that is primary. Copies and the
//! bitmap fallback are in `primary/copy.rs`, the reconciliation in `primary/reconcile.rs`.

mod copy;
mod reconcile;
mod retake;

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use self::copy::{CopyState, copy_kind_for_peer};
use self::reconcile::Reconcile;
use self::retake::RetakeAsk;
#[cfg(doc)]
use super::Replicator;
use super::replicator::{Ctx, LocalJournal, PeerView, VerifyRequest, lineage_follows};
use super::{
    Action, Backlog, Backpressure, CopyKind, Degraded, EntryMeta, Hello, MAX_ENTRY_WIRE_BYTES,
    Message, Mode, PairState, Status, Takeover,
};
use crate::types::Seq;

/// The smallest entry a peer's journal must take: the filesystem's largest transaction (a
/// 1 MiB write with its metadata) with room to spare. A peer that takes less is refused at
/// pairing, naming both sizes, rather than failing writes later. An entry takes at most a
/// quarter of a journal: a 16 MiB journal takes entries of almost 4 MiB.
pub const MIN_PEER_ENTRY_BYTES: u64 = 2 << 20;

/// Busy time one sample of the peer's drain rate spans at least.
const DRAIN_SAMPLE: Duration = Duration::from_millis(250);
/// The slowest delivery assumed when waiting for an acknowledgement before resending
/// (bytes per second; see `resend_at`): 1 MiB/s, an 8 Mbit/s link.
const RESEND_MIN_RATE: f64 = (1 << 20) as f64;

/// What only a primary keeps: its entries and how far the peer has them, the copy, the
/// reconciliation, the verify requests.
pub(super) struct PrimaryState {
    /// Newest local entry handed in (sendable).
    last_seq: Seq,
    /// Newest local seq durable.
    local_durable: Seq,
    /// Entries the peer does not have durably (or that were never sent).
    retained: VecDeque<EntryMeta>,
    /// Journal bytes of the retained entries (the journal limit applies to these).
    retained_bytes: u64,
    /// Newest seq sent on this connection.
    sent_upto: Seq,
    /// Bytes of the entries sent and not acknowledged received (held to the window).
    in_flight: u64,
    /// The last sign of progress (the connection, an ack, an entry taken back, a resend
    /// or pull): resends and pulls are timed from it.
    last_progress: Option<Instant>,
    /// The peer's apply rate (bytes of entries per second), smoothed over about a second
    /// of acks received while it had a backlog (an idle peer's acks say nothing of its
    /// speed). `None` until measured.
    drain_rate: Option<f64>,
    /// Bytes applied and busy time since the last sample of `drain_rate` (a sample spans
    /// at least [`DRAIN_SAMPLE`]).
    drain_acc: (u64, Duration),
    /// When the last ack came, if the peer still had a backlog after it.
    busy_since: Option<Instant>,
    /// The copy to the peer, if one runs.
    copy: Option<CopyState>,
    /// Its progress as the driver reports it: (blocks sent, blocks to send).
    copy_progress: Option<(u64, u64)>,
    /// The id of the last copy started.
    copy_ids: u64,
    /// Restarted after a crash in sync mode: writes wait until this ends.
    reconcile: Option<Reconcile>,
    /// The backlog went to the bitmap while a copy was being sent: a bitmap copy follows.
    copy_again: bool,
    /// Online verify: requests waiting for their entry to be sent.
    verifies: VecDeque<VerifyRequest>,
    /// Online verify: the ids of the requests sent and not answered.
    verifies_out: BTreeSet<u64>,
    /// Restarted after a crash, and no copy or stream has run since: a copy the crash
    /// interrupted may have sent the peer data this node then lost (copies read what is
    /// committed, not only what is durable), so a peer left mid-copy gets a full copy.
    crashed: bool,
    /// Frozen for a takeover at this seq (docs/PROTOCOL.md §7.3): no writes, the entries up
    /// to it drain to the taker, then this node becomes secondary.
    frozen: Option<Seq>,
    /// A freeze is under way (the driver seals and hands in the last entries): those entries
    /// stay entries, whatever the journal limit — the taker drains them in order, and a
    /// frozen node's backlog cannot grow.
    freezing: bool,
    /// An [`Action::SyncLocal`] is out: entries sent and not durable here reached what the
    /// peer's journal keeps.
    local_sync_asked: bool,
    /// Frozen, and taking over again from the peer frozen at this seq (failback while the
    /// peer drains, §7.6): writes go to the local-unreflected area.
    retaking: Option<Seq>,
    /// A failback asked of the peer on this connection, not answered yet.
    retake_ask: Option<RetakeAsk>,
    /// Newest seq whose header was sent on this connection.
    headers_sent: Seq,
}

impl PrimaryState {
    /// A node becomes primary with `journal` (retained entries, oldest first): it keeps
    /// them for a peer it has been paired with (else releases them), and reconciles first
    /// if it ran in sync mode and did not close cleanly — unless a role change is under
    /// way: a frozen primary (or one taking over again) made its journal durable up to its
    /// freeze point before it recorded the freeze, so it lost nothing, and the entries its
    /// peer holds beyond that point are the peer's own writes, not this node's lost ones.
    pub(super) fn start(ctx: &mut Ctx, journal: LocalJournal, now: Instant) -> Self {
        let LocalJournal {
            retained,
            durable,
            unclean,
        } = journal;
        let persisted = &ctx.persisted;
        let lost_some =
            unclean && persisted.sync_mode && persisted.paired && persisted.takeover.is_none();
        let reconcile = lost_some.then(|| Reconcile {
            deadline: now + ctx.cfg.sync_timeout,
            target: None,
        });
        ctx.state = if reconcile.is_some() {
            PairState::Reconciling
        } else if !persisted.paired {
            PairState::Simplex
        } else {
            PairState::Suspended
        };
        let mut p = PrimaryState {
            last_seq: retained.last().map_or(durable, |e| durable.max(e.seq)),
            local_durable: durable,
            retained_bytes: retained.iter().map(|e| e.journal_bytes).sum(),
            retained: retained.into(),
            sent_upto: Seq::NONE,
            in_flight: 0,
            last_progress: None,
            drain_rate: None,
            drain_acc: (0, Duration::ZERO),
            busy_since: None,
            copy: None,
            copy_progress: None,
            copy_ids: 0,
            reconcile,
            copy_again: false,
            verifies: VecDeque::new(),
            verifies_out: BTreeSet::new(),
            crashed: unclean,
            frozen: match ctx.persisted.takeover {
                Some(Takeover::Source { freeze }) => Some(freeze),
                Some(Takeover::Retaker { source, .. }) => Some(source),
                _ => None,
            },
            retaking: match ctx.persisted.takeover {
                Some(Takeover::Retaker { freeze, .. }) => Some(freeze),
                _ => None,
            },
            retake_ask: None,
            freezing: false,
            local_sync_asked: false,
            headers_sent: Seq::NONE,
        };
        if !ctx.persisted.paired && !p.retained.is_empty() {
            // Never paired: nobody needs the backlog (a first pairing copies everything).
            let upto = p.last_seq;
            p.release_through(ctx, upto);
        }
        let sync = ctx.cfg.mode == Mode::Sync;
        if ctx.persisted.sync_mode != sync && p.reconcile.is_none() {
            ctx.persisted.sync_mode = sync;
            ctx.persist();
        }
        if p.reconcile.is_some() {
            tracing::warn!(
                newest = %p.last_seq,
                "restarted after a crash in sync mode: the peer may hold entries this node \
                 lost; writes wait until they are taken back from it"
            );
        }
        p
    }

    /// The newest seq and the newest durable seq of this node's journal (for its hello).
    pub(super) fn progress(&self) -> (Seq, Seq) {
        (self.last_seq, self.local_durable)
    }

    /// Whether the filesystem may write (not while reconciling, not frozen unless taking
    /// over again: then into the local-unreflected area).
    pub(super) fn admits_writes(&self) -> bool {
        self.reconcile.is_none() && (self.frozen.is_none() || self.retaking.is_some())
    }

    /// Frozen for a takeover at this seq.
    pub(super) fn frozen(&self) -> Option<Seq> {
        self.frozen
    }

    /// Hands out the headers of retained entries not yet announced on this connection.
    fn send_headers(&mut self, ctx: &mut Ctx) {
        let after = self.headers_sent.max(ctx.peer_received());
        let new: Vec<EntryMeta> = self
            .retained
            .iter()
            .filter(|e| e.seq > after)
            .copied()
            .collect();
        if let Some(last) = new.last() {
            self.headers_sent = last.seq;
            ctx.out.push_back(Action::SendHeaders(new));
        }
    }

    /// Asked by the secondary to hand over: freeze (or, already frozen, answer again).
    fn on_takeover(&mut self, ctx: &mut Ctx, id: u64) {
        if let Some(freeze) = self.frozen {
            let epoch = ctx.persisted.epoch;
            self.send_headers(ctx);
            ctx.send(Message::Frozen {
                epoch,
                id,
                seq: freeze,
            });
            return;
        }
        if ctx.state != PairState::Pair || self.reconcile.is_some() {
            ctx.refuse(format!(
                "cannot hand over while the pair is {}: the peer is not a consistent replica",
                ctx.state
            ));
            return;
        }
        tracing::info!(request = id, "the peer takes over: freezing");
        self.freezing = true;
        ctx.out.push_back(Action::Freeze { id });
    }

    /// The driver froze the filesystem: every entry up to `newest` is handed in and
    /// durable. The epoch moves, the role change is persisted, and the taker gets the last
    /// headers and the freeze point.
    pub(super) fn on_frozen(&mut self, ctx: &mut Ctx, id: u64, newest: Seq) {
        let freeze = newest.max(self.last_seq);
        self.frozen = Some(freeze);
        ctx.persisted.epoch = super::Epoch(ctx.persisted.epoch.0 + 1);
        ctx.persisted.takeover = Some(Takeover::Source { freeze });
        ctx.persist();
        tracing::info!(seq = %freeze, epoch = ctx.persisted.epoch.0, "frozen for a takeover: the peer drains the backlog");
        if ctx.peer.is_some() {
            self.send_headers(ctx);
            let epoch = ctx.persisted.epoch;
            ctx.send(Message::Frozen {
                epoch,
                id,
                seq: freeze,
            });
        }
    }

    /// When [`PrimaryState::on_timeout`] has something to do next.
    pub(super) fn poll_timeout(&self, ctx: &Ctx) -> Option<Instant> {
        let resend_after = ctx.cfg.resend_after;
        if let Some(r) = &self.reconcile {
            let pull_again = r.target.and(self.last_progress).map(|t| t + resend_after);
            return Some(pull_again.map_or(r.deadline, |t| t.min(r.deadline)));
        }
        if ctx.connected && self.sent_upto > ctx.peer_received() {
            self.resend_at(ctx)
        } else {
            None
        }
    }

    /// When entries sent and not acknowledged are sent again, barring progress:
    /// `resend_after` after the last progress, plus twice the time the bytes in flight take
    /// at the peer's measured rate (at least [`RESEND_MIN_RATE`]). On a link slower than the
    /// window per `resend_after` (64 MiB per 2 s: 256 Mbit/s) a fixed timeout would resend
    /// the window while it is still being delivered, again and again, and the resends
    /// would take the link.
    fn resend_at(&self, ctx: &Ctx) -> Option<Instant> {
        let rate = self.drain_rate.unwrap_or(0.0).max(RESEND_MIN_RATE);
        let transit = Duration::from_secs_f64(2.0 * self.in_flight as f64 / rate);
        self.last_progress
            .map(|t| t + ctx.cfg.resend_after + transit)
    }

    /// The backlog writers are held to (see [`Replicator::backpressure`]).
    pub(super) fn backpressure(&self, ctx: &Ctx) -> Option<Backpressure> {
        let max_lag = ctx.cfg.max_lag?;
        // Frozen: what the peer lacks is a drain, which no writer of this node waits for.
        if ctx.cfg.mode != Mode::Async
            || !ctx.connected
            || ctx.state != PairState::Pair
            || self.frozen.is_some()
        {
            return None;
        }
        let mut unacked = self.unacked(ctx.peer_received());
        let first = unacked.next()?;
        Some(Backpressure {
            oldest_ns: first.timestamp_ns,
            bytes: first.bytes + unacked.map(|e| e.bytes).sum::<u64>(),
            max_lag_ns: u64::try_from(max_lag.as_nanos()).unwrap_or(u64::MAX),
            max_bytes: ctx.cfg.journal_limit / 2,
            // Saturating float-to-int conversion; a rate under 1 B/s counts as unmeasured.
            drain_rate: self.drain_rate.map_or(0, |r| r as u64),
        })
    }

    /// Counts `bytes` applied by a busy peer in `dt` towards the drain rate. Every
    /// [`DRAIN_SAMPLE`] of busy time makes one sample, folded in by exponential smoothing
    /// with a one-second time constant (the first sample is taken as is). Acks come in
    /// bursts (one per entry, entries of up to 32 MiB, an apply stalled behind a disk
    /// flush then several at once): over a single ack's interval the rate would be off by
    /// far more than the backlog it is meant to predict.
    fn measure_drain(&mut self, bytes: u64, dt: Duration) {
        let (b, t) = &mut self.drain_acc;
        *b += bytes;
        *t += dt;
        if *t < DRAIN_SAMPLE {
            return;
        }
        let secs = t.as_secs_f64();
        let sample = *b as f64 / secs;
        let weight = secs.min(1.0);
        self.drain_acc = (0, Duration::ZERO);
        self.drain_rate = Some(match self.drain_rate {
            Some(r) => r + (sample - r) * weight,
            None => sample,
        });
    }

    /// Retained entries after `received` (what the peer has not acknowledged received),
    /// oldest first.
    fn unacked(&self, received: Seq) -> impl Iterator<Item = &EntryMeta> {
        self.retained.iter().filter(move |e| e.seq > received)
    }

    /// The primary's part of a snapshot for `pairfs status`.
    pub(super) fn status(&self, ctx: &Ctx, s: &mut Status) {
        let unacked: Vec<&EntryMeta> = self.unacked(ctx.peer_received()).collect();
        s.last_seq = self.last_seq;
        s.sent = self.sent_upto;
        s.received = ctx.peer_received();
        s.durable = ctx.peer.as_ref().map_or(Seq::NONE, |p| p.durable);
        s.lag_entries = unacked.len() as u64;
        s.lag_bytes = unacked.iter().map(|e| e.bytes).sum();
        s.oldest_unacked_ns = unacked.first().map(|e| e.timestamp_ns);
        // Saturating float-to-int conversion.
        s.apply_rate = self.drain_rate.map(|r| r as u64);
        s.copy_progress = self.copy_progress;
    }

    /// A new connection: it starts from nothing sent.
    pub(super) fn on_connected(&mut self, now: Instant) {
        self.sent_upto = Seq::NONE;
        self.headers_sent = Seq::NONE;
        // A failback asked on the last connection is asked again on this one.
        self.retake_ask = None;
        self.in_flight = 0;
        self.last_progress = Some(now);
    }

    /// The requests of an online verify the connection took away are answered "not
    /// compared" (asked again).
    pub(super) fn clear_verifies(&mut self, ctx: &mut Ctx) {
        let lost: Vec<u64> = self
            .verifies
            .drain(..)
            .map(|(id, _, _)| id)
            .chain(std::mem::take(&mut self.verifies_out))
            .collect();
        for id in lost {
            ctx.out.push_back(Action::VerifyAnswer { id, differ: None });
        }
    }

    /// The connection went away: the copy stops, the pair is suspended (a reconciliation
    /// goes on with the next connection).
    pub(super) fn on_disconnected(&mut self, ctx: &mut Ctx) {
        self.sent_upto = Seq::NONE;
        self.in_flight = 0;
        self.busy_since = None;
        self.drain_acc = (0, Duration::ZERO);
        if let Some(r) = &mut self.reconcile {
            r.target = None; // taken up again with the next connection
        }
        if matches!(self.copy, Some(CopyState::Sending { .. })) {
            ctx.out.push_back(Action::StopCopy);
        }
        self.copy = None;
        self.copy_progress = None;
        self.copy_again = false;
        if !matches!(ctx.state, PairState::Simplex | PairState::Reconciling) {
            ctx.state = PairState::Suspended;
        }
    }

    /// The peer refused this node.
    pub(super) fn on_refused(&mut self, ctx: &mut Ctx) {
        if self.reconcile.as_ref().is_some_and(|r| r.target.is_some()) {
            // It cannot give back what this node lost: continue without it.
            self.give_up_reconciling(ctx, "the peer could not send its entries back");
        }
    }

    /// A message from the peer, after its hello; one a primary does not take is handed
    /// back.
    // The message a role does not take is handed back as it came (moved, not copied).
    #[allow(clippy::result_large_err)]
    pub(super) fn on_message(
        &mut self,
        ctx: &mut Ctx,
        m: Message,
        now: Instant,
    ) -> Result<(), Message> {
        match m {
            Message::Ack {
                received, durable, ..
            } => self.on_ack(ctx, received, durable, now),
            Message::Entry { entry, .. } if self.reconcile.is_some() => {
                self.on_reconcile_entry(ctx, entry)
            }
            // The answer to a pull sent again just before the reconciliation ended.
            Message::Entry { entry, .. } if entry.seq <= self.last_seq => {}
            Message::Takeover { id, .. } => self.on_takeover(ctx, id),
            Message::Headers { entries, .. } => self.on_retake_headers(ctx, entries),
            Message::Frozen { id, seq, epoch } => self.on_retake_frozen(ctx, id, seq, epoch),
            Message::Verified { id, differ, .. } => {
                if self.verifies_out.remove(&id) {
                    ctx.out.push_back(Action::VerifyAnswer { id, differ });
                }
            }
            m => return Err(m),
        }
        Ok(())
    }

    /// The secondary's hello (its role, protocol and geometry already checked).
    pub(super) fn on_hello(&mut self, ctx: &mut Ctx, h: Hello, now: Instant) {
        if self.failback_unrecorded(ctx, &h) {
            // Asked again: the peer answers the same freeze (§7.6). Meanwhile it still
            // drains this node's entries.
            self.start_streaming(ctx, h, false, now);
            self.ask_retake_again(ctx);
            return;
        }
        if h.epoch > ctx.persisted.epoch {
            ctx.refuse(format!(
                "the peer is at epoch {} and this primary at {}: it has a newer role history",
                h.epoch.0, ctx.persisted.epoch.0
            ));
            return;
        }
        let full = h.empty || h.volume != ctx.cfg.volume;
        if !h.empty && h.volume != ctx.cfg.volume {
            ctx.refuse(format!(
                "the peer holds another volume ({}, this node {})",
                h.volume, ctx.cfg.volume
            ));
            return;
        }
        if let Some(blocks) = &h.rejoin {
            // Rejoining after a divergence (§7.8): to be overwritten, lineage and all.
            if let Some(&b) = blocks.iter().find(|&&b| b >= ctx.cfg.blocks) {
                ctx.refuse(format!(
                    "protocol violation: the rejoining peer names block {b} of {}",
                    ctx.cfg.blocks
                ));
                return;
            }
            if !h.inconsistent {
                ctx.refuse(
                    "protocol violation: a rejoining peer that says it is consistent".into(),
                );
                return;
            }
            self.accept_rejoin(ctx, blocks.clone());
        } else if !full {
            if let Err(why) =
                lineage_follows(&h.generations, h.last_seq, &ctx.persisted.generations)
            {
                ctx.refuse(format!(
                    "the nodes' data diverged: {why}; nothing is overwritten automatically"
                ));
                return;
            }
            if h.last_seq > self.last_seq && h.generations == ctx.persisted.generations {
                if self.reconcile.is_some() {
                    // The peer has entries this node lost in its crash: take them back.
                    self.reconcile_from(ctx, h, now);
                    return;
                }
                ctx.refuse(format!(
                    "the peer has seq {} beyond this primary's newest {} (and this node did \
                     not crash in sync mode: refusing to guess)",
                    h.last_seq.0, self.last_seq.0
                ));
                return;
            }
        }
        if self.reconcile.is_some() {
            self.finish_reconciling(ctx);
            tracing::info!(newest = %self.last_seq, "the peer holds nothing newer: writes resume");
        }
        self.start_streaming(ctx, h, full, now);
    }

    /// Hello accepted: resume the stream, or start the copy the peer needs.
    fn start_streaming(&mut self, ctx: &mut Ctx, h: Hello, full: bool, now: Instant) {
        if h.max_entry_bytes < MIN_PEER_ENTRY_BYTES {
            ctx.refuse(format!(
                "the peer's journal takes entries of at most {} bytes, and this primary's \
                 transactions need {} (its own limit: {}): re-create the peer with a journal \
                 of at least 16 MiB (`pairfs init --journal-size 16M`)",
                h.max_entry_bytes, MIN_PEER_ENTRY_BYTES, ctx.cfg.max_entry_bytes,
            ));
            return;
        }
        let (received, durable, inconsistent) = (h.last_seq, h.durable, h.inconsistent);
        ctx.out.push_back(Action::LimitEntries(
            h.max_entry_bytes.min(MAX_ENTRY_WIRE_BYTES),
        ));
        ctx.peer = Some(PeerView {
            hello: h,
            received,
            durable,
        });
        ctx.refused = None;
        self.last_progress = Some(now);
        let covered = self
            .retained
            .front()
            .map_or(received == self.last_seq, |e| e.prev_seq <= received);
        let plan = if full || ctx.persisted.full_copy || (inconsistent && self.crashed) {
            Some(CopyKind::Full)
        } else if !inconsistent && covered && ctx.persisted.backlog == Backlog::Journal {
            None
        } else {
            Some(copy_kind_for_peer(ctx))
        };
        self.crashed = false;
        if let (Some(kind), Some(_)) = (plan, self.frozen) {
            // Frozen: never a copy (its end would be an entry after the freeze point). A
            // consistent peer is caught up by one entry; any other cannot take over.
            let bitmap = kind == CopyKind::Bitmap;
            if inconsistent || kind == CopyKind::Full {
                ctx.refuse(
                    "this node is frozen for a takeover and its peer would need a full copy: \
                     it cannot hand over in order (force the takeover, or take over again here)"
                        .into(),
                );
                return;
            }
            ctx.state = PairState::Pair;
            self.sent_upto = received;
            self.release_through(ctx, durable);
            self.catch_up(ctx, received, bitmap);
            return;
        }
        match plan {
            None => {
                ctx.state = PairState::Pair;
                self.sent_upto = received;
                // Entries the peer already has durably.
                self.release_through(ctx, durable);
                let local = self.local_durable;
                let epoch = ctx.persisted.epoch;
                ctx.send(Message::Durable { epoch, seq: local });
                self.send_headers(ctx);
                self.note_caught_up(ctx);
                self.pump(ctx);
            }
            Some(kind) => self.start_copy(ctx, kind),
        }
    }

    /// A local journal entry can be sent (durable, or in sync mode sealed).
    pub(super) fn on_local_entry(&mut self, ctx: &mut Ctx, e: EntryMeta) {
        if e.seq <= self.last_seq {
            return;
        }
        self.last_seq = e.seq;
        if ctx.state == PairState::Simplex {
            // Never paired: a first pairing copies everything, nothing to keep.
            ctx.out.push_back(Action::Release(e.seq));
            return;
        }
        self.retained.push_back(e);
        self.retained_bytes += e.journal_bytes;
        let frozen = self.freezing || self.frozen.is_some();
        if self.retained_bytes > ctx.cfg.journal_limit && !frozen {
            self.enter_bitmap(ctx);
            return;
        }
        if ctx.state == PairState::Pair && ctx.peer.is_some() {
            self.send_headers(ctx);
        }
        self.pump(ctx);
    }

    /// The local journal is durable up to `seq`.
    pub(super) fn on_local_durable(&mut self, ctx: &mut Ctx, seq: Seq, now: Instant) {
        let target = self.reconcile.as_ref().and_then(|r| r.target);
        if target.is_some_and(|t| self.last_seq >= t && seq >= t) {
            self.local_durable = self.local_durable.max(seq);
            self.reconciled(ctx, now);
            return;
        }
        if seq <= self.local_durable {
            return;
        }
        self.local_durable = seq;
        self.local_sync_asked = false;
        if ctx.connected && ctx.state == PairState::Pair && ctx.peer.is_some() {
            let epoch = ctx.persisted.epoch;
            ctx.send(Message::Durable { epoch, seq });
            // Entries held back for it may go now.
            self.pump(ctx);
        }
    }

    /// The driver reopened the volume: recovery left it at `durable`.
    pub(super) fn on_volume_reopened(&mut self, durable: Seq) {
        self.local_durable = durable;
    }

    /// An fsync wants everything up to `upto` durable on the peer too.
    pub(super) fn on_fsync(&self, ctx: &mut Ctx, upto: Seq) {
        if ctx.connected && ctx.peer.is_some() && ctx.state == PairState::Pair {
            let epoch = ctx.persisted.epoch;
            ctx.send(Message::Flush { epoch, upto });
        }
    }

    /// Sync mode: writes from `seq` on are acknowledged without the peer (see
    /// [`Replicator::handle_degraded`]).
    pub(super) fn on_degraded(&self, ctx: &mut Ctx, seq: Seq, now_ns: u64) {
        if ctx.persisted.degraded.is_some() {
            return;
        }
        ctx.persisted.degraded = Some(Degraded {
            since: seq,
            at_ns: now_ns,
        });
        ctx.persist();
        tracing::warn!(
            since = %seq,
            "sync replication degraded: the peer did not answer within the sync timeout; \
             writes from this seq on are acknowledged without it until it catches up"
        );
    }

    /// Degraded and the peer has everything again: sync mode waits for it again.
    fn note_caught_up(&self, ctx: &mut Ctx) {
        if ctx.persisted.degraded.is_none()
            || ctx.state != PairState::Pair
            || ctx.peer_received() < self.last_seq
        {
            return;
        }
        if let Some(d) = ctx.persisted.degraded.take() {
            tracing::info!(since = %d.since, upto = %self.last_seq, "the peer caught up: sync replication no longer degraded");
        }
        ctx.persist();
    }

    /// Entries up to `seq` are no longer needed: drop them and release their journal space.
    fn release_through(&mut self, ctx: &mut Ctx, seq: Seq) {
        while self.retained.front().is_some_and(|e| e.seq <= seq) {
            if let Some(e) = self.retained.pop_front() {
                self.retained_bytes -= e.journal_bytes;
            }
        }
        ctx.out.push_back(Action::Release(seq));
    }

    /// The peer's progress: release what it has durably, measure its speed, complete a
    /// copy it has applied, send more.
    fn on_ack(&mut self, ctx: &mut Ctx, received: Seq, durable: Seq, now: Instant) {
        if let Some(r) = &mut self.reconcile {
            // The peer applied one more entry it had been sent before this node crashed:
            // take that one back too.
            if let Some(t) = &mut r.target {
                *t = (*t).max(received);
            }
            return;
        }
        let Some(p) = ctx.peer.as_mut() else { return };
        if received > self.last_seq || durable > received {
            let (r, d, l) = (received.0, durable.0, self.last_seq.0);
            ctx.refuse(format!(
                "the peer acknowledged seq {r} (durable {d}) beyond this primary's newest {l}"
            ));
            return;
        }
        if received <= p.received && durable <= p.durable {
            return; // duplicate or reordered ack
        }
        let before = p.received;
        p.received = p.received.max(received);
        p.durable = p.durable.max(durable);
        let (received, durable) = (p.received, p.durable);
        self.last_progress = Some(now);
        if received > before {
            let drained: u64 = self
                .retained
                .iter()
                .filter(|e| e.seq > before && e.seq <= received)
                .map(|e| e.bytes)
                .sum();
            // (An ack of entries without data, such as the one recording a copy's end, says
            // nothing of the peer's speed.)
            if let Some(t) = self.busy_since.filter(|_| drained > 0) {
                self.measure_drain(drained, now.saturating_duration_since(t));
            }
            let backlog = self.unacked(received).next().is_some();
            self.busy_since = backlog.then_some(now);
        }
        self.release_through(ctx, durable);
        self.in_flight = self
            .retained
            .iter()
            .filter(|e| e.seq > received && e.seq <= self.sent_upto)
            .map(|e| e.bytes)
            .sum();
        ctx.out.push_back(Action::Acked { received, durable });
        if let Some(CopyState::Finishing { consistent_at }) = self.copy {
            if durable >= consistent_at {
                self.copy_complete(ctx, durable);
            }
        }
        self.note_caught_up(ctx);
        self.pump(ctx);
    }

    /// Sends retained entries in order while the window allows.
    fn pump(&mut self, ctx: &mut Ctx) {
        if !ctx.connected || self.reconcile.is_some() {
            return;
        }
        let Some(limit) = ctx.peer.as_ref().map(|p| p.hello.max_entry_bytes) else {
            return;
        };
        if matches!(self.copy, Some(CopyState::Sending { .. })) {
            return;
        }
        let window = ctx.cfg.window_bytes;
        // Sync mode sends entries before they are durable here, and the peer keeps each one
        // until this node has it durably (it may have to hand it back, §4): what is sent
        // and not durable here is held to half the peer's journal (four times its largest
        // entry), and past that this node syncs first.
        let peer_room = 2 * limit;
        // (The retained entries are in seq order: both ranges are found by bisection, so
        // a pump costs what it sends, not the whole backlog.)
        let unsent = self.retained.partition_point(|e| e.seq <= self.sent_upto);
        let not_durable = self
            .retained
            .partition_point(|e| e.seq <= self.local_durable);
        let mut unsynced: u64 = self
            .retained
            .range(not_durable.min(unsent)..unsent)
            .map(|e| e.journal_bytes)
            .sum();
        let mut needs_sync = false;
        let mut to_send = Vec::new();
        for e in self.retained.range(unsent..) {
            if e.seq > self.local_durable {
                if unsynced > 0 && unsynced + e.journal_bytes > peer_room {
                    needs_sync = true;
                    break;
                }
                unsynced += e.journal_bytes;
            }
            if e.bytes > limit {
                // Sealed before the peer said what it takes: it goes by bitmap instead.
                let seq = e.seq;
                tracing::warn!(%seq, bytes = e.bytes, limit, "entry larger than the peer's journal takes");
                self.on_entry_unavailable(ctx, seq);
                return;
            }
            if self.in_flight > 0 && self.in_flight + e.bytes > window {
                break;
            }
            self.in_flight += e.bytes;
            to_send.push(*e);
        }
        if needs_sync && !std::mem::replace(&mut self.local_sync_asked, true) {
            ctx.out.push_back(Action::SyncLocal);
        }
        self.send_verifies(ctx); // those whose entry went out before
        for e in to_send {
            self.sent_upto = e.seq;
            ctx.out.push_back(Action::SendEntry(e));
            // Right behind their entry, before the next: the peer compares in that state.
            self.send_verifies(ctx);
        }
    }

    /// Sends the verify requests whose entry has been sent.
    fn send_verifies(&mut self, ctx: &mut Ctx) {
        while self
            .verifies
            .front()
            .is_some_and(|(_, at, _)| *at <= self.sent_upto)
        {
            if let Some((id, at, blocks)) = self.verifies.pop_front() {
                let epoch = ctx.persisted.epoch;
                self.verifies_out.insert(id);
                ctx.send(Message::Verify {
                    epoch,
                    id,
                    at,
                    blocks,
                });
            }
        }
    }

    /// Online verify (see [`Replicator::handle_verify_request`]).
    pub(super) fn on_verify_request(
        &mut self,
        ctx: &mut Ctx,
        id: u64,
        at: Seq,
        blocks: Vec<(u64, u32)>,
    ) {
        let streaming = ctx.connected && ctx.peer.is_some() && ctx.state == PairState::Pair;
        if !streaming || at < self.last_seq {
            ctx.out.push_back(Action::VerifyAnswer { id, differ: None });
            return;
        }
        self.verifies.push_back((id, at, blocks));
        self.send_verifies(ctx);
    }

    /// Time passed: resend what was not acknowledged in time; pull again what a
    /// reconciliation did not get; give up reconciling. True when the connection must be
    /// dropped (the reconciliation gave up while connected: the peer's hello came before
    /// the new generation).
    #[must_use]
    pub(super) fn on_timeout(&mut self, ctx: &mut Ctx, now: Instant) -> bool {
        if let Some(r) = &self.reconcile {
            if now < r.deadline && r.target.is_some() && ctx.connected && ctx.applying.is_none() {
                let stalled = self
                    .last_progress
                    .is_none_or(|t| now.duration_since(t) >= ctx.cfg.resend_after);
                if stalled {
                    self.last_progress = Some(now);
                    let (epoch, after) = (ctx.persisted.epoch, self.last_seq);
                    ctx.send(Message::Pull { epoch, after });
                }
                return false;
            }
        }
        if self.reconcile.as_ref().is_some_and(|r| now >= r.deadline) {
            self.give_up_reconciling(ctx, "the peer was unreachable for the sync timeout");
            return ctx.connected;
        }
        if !ctx.connected || ctx.peer.is_none() {
            return false;
        }
        let received = ctx.peer_received();
        if self.sent_upto > received && self.resend_at(ctx).is_some_and(|t| now >= t) {
            tracing::debug!(from = %received, upto = %self.sent_upto, "no acknowledgement: resending");
            self.sent_upto = received;
            self.in_flight = 0;
            self.last_progress = Some(now);
            self.pump(ctx);
        }
        false
    }
}
