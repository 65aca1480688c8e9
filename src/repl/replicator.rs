//! The replication state machine of one node (docs/PROTOCOL.md §2, §5).
//!
//! One type for both roles: a primary streams its durable journal entries in seq order
//! and releases them only when the secondary acknowledges them applied; a secondary applies
//! entries strictly in order. The data path stays outside: the primary's driver reads an
//! entry from its journal when told [`Action::SendEntry`], and streams copy blocks itself
//! after [`Action::StartCopy`]; the secondary's driver applies what [`Action::Apply`] and
//! [`Action::ApplyCopy`] hand it and reports back with [`Replicator::handle_applied`].

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::{
    Backlog, Epoch, Hello, Message, Mode, PROTOCOL_VERSION, PairState, PersistedState, Role,
    WireBlock, WireEntry,
};
use crate::types::{Seq, VolumeId};

/// Messages kept while waiting for the peer's hello (a few replication frames can overtake
/// it; more means the peer is not speaking the protocol).
const MAX_EARLY: usize = 256;
/// Busy time one sample of the peer's drain rate spans at least.
const DRAIN_SAMPLE: Duration = Duration::from_millis(250);
/// The fraction of `max_lag` the predicted lag of a new write is held to (see
/// [`Backpressure::exceeded`]).
const LAG_TARGET: (u128, u128) = (3, 4);
/// The apply rate assumed while the peer's is not measured yet (bytes per second): about
/// half a gigabit link. Writers are held to `max_lag` at this rate meanwhile.
const UNMEASURED_RATE: u64 = 64 << 20;

/// Static settings of a replicator.
#[derive(Clone, Debug)]
pub struct ReplConfig {
    /// This node's name.
    pub node: String,
    /// This node's volume id (the nil id for a secondary never filled).
    pub volume: VolumeId,
    /// Block size of the volume.
    pub block_size: u32,
    /// Blocks of the volume.
    pub blocks: u64,
    /// When writes are acknowledged.
    pub mode: Mode,
    /// Bytes of unacknowledged entries the primary keeps before it falls back to the
    /// difference bitmap.
    pub journal_limit: u64,
    /// Bytes of entries sent and not yet acknowledged before the primary waits.
    pub window_bytes: u64,
    /// With entries unacknowledged and no progress for this long, resend from the peer's
    /// last acknowledged seq (messages can be lost on a lossy network).
    pub resend_after: Duration,
    /// Entries a secondary buffers ahead of a gap.
    pub max_out_of_order: usize,
    /// Async mode, streaming to a connected peer: how far (age of the oldest entry the peer
    /// has not applied, or the time it would take to apply the backlog at its measured
    /// rate) it may fall behind before writers wait for it — the bound on what a failover
    /// can lose while the pair is up. `None`: never wait (the lag is then bounded
    /// only by `journal_limit`, after which the peer is resynced by bitmap).
    pub max_lag: Option<Duration>,
}

impl ReplConfig {
    /// Defaults for a node.
    pub fn new(node: &str, volume: VolumeId, block_size: u32, blocks: u64) -> Self {
        ReplConfig {
            node: node.to_string(),
            volume,
            block_size,
            blocks,
            mode: Mode::Async,
            // 1 GiB of backlog, about four seconds of writes at full disk speed.
            journal_limit: 1 << 30,
            // 64 MiB in flight: several round trips of a fast link without filling memory.
            window_bytes: 64 << 20,
            resend_after: Duration::from_secs(2),
            max_out_of_order: 1024,
            max_lag: Some(Duration::from_secs(5)),
        }
    }
}

/// The backlog of an async pair that is streaming, published to the writers (see
/// [`Replicator::backpressure`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backpressure {
    /// Commit time (host clock, ns since the Unix epoch) of the oldest entry the peer has
    /// not applied.
    pub oldest_ns: u64,
    /// Bytes of entries the peer has not applied.
    pub bytes: u64,
    /// The lag allowed, in ns.
    pub max_lag_ns: u64,
    /// The backlog allowed, in bytes: half the journal limit, so that a pair that is up
    /// never falls back to the bitmap (and out of write order) just because writes outrun
    /// the link.
    pub max_bytes: u64,
    /// The peer's measured apply rate in bytes per second (0: not measured yet).
    pub drain_rate: u64,
}

impl Backpressure {
    /// Whether a writer must wait at `now_ns`, `open_bytes` being what was committed
    /// locally but is not in the backlog yet (the open entry, sealed within a commit
    /// interval):
    /// - the oldest unapplied entry is older than the lag allowed;
    /// - the peer's speed being known, a write made now would wait longer than
    ///   [`LAG_TARGET`] of the lag allowed behind the backlog and the open entry (so the lag
    ///   stays within `max_lag` rather than overshoot it by what built up while the oldest
    ///   entry was young; the rest is headroom for the peer's speed varying: a target of
    ///   `max_lag` itself is overshot half the time);
    /// - the speed not known yet, the backlog and the open entry hold more than `max_lag`
    ///   at [`UNMEASURED_RATE`] (a peer slower than the writer would otherwise start with
    ///   a backlog of `max_lag` times the writer's speed);
    /// - or the backlog outgrew its byte limit.
    pub fn exceeded(&self, now_ns: u64, open_bytes: u64) -> bool {
        let ahead = self.bytes.saturating_add(open_bytes);
        let too_slow = if self.drain_rate == 0 {
            u128::from(ahead) * 1_000_000_000
                > u128::from(self.max_lag_ns) * u128::from(UNMEASURED_RATE)
        } else {
            self.drain_ns(open_bytes) > self.target_ns()
        };
        now_ns.saturating_sub(self.oldest_ns) > self.max_lag_ns
            || too_slow
            || self.bytes > self.max_bytes
    }

    /// The lag the writers are held to: [`LAG_TARGET`] of `max_lag`.
    fn target_ns(&self) -> u64 {
        let (num, den) = LAG_TARGET;
        u64::try_from(u128::from(self.max_lag_ns) * num / den).unwrap_or(u64::MAX)
    }

    /// Time the peer needs to apply the backlog and `open_bytes` more at its measured
    /// rate (0 if not measured).
    pub fn drain_ns(&self, open_bytes: u64) -> u64 {
        if self.drain_rate == 0 {
            return 0;
        }
        let bytes = u128::from(self.bytes) + u128::from(open_bytes);
        let ns = bytes * 1_000_000_000 / u128::from(self.drain_rate);
        u64::try_from(ns).unwrap_or(u64::MAX)
    }
}

/// A durable local journal entry the primary may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryMeta {
    /// Its seq.
    pub seq: Seq,
    /// The seq before it.
    pub prev_seq: Seq,
    /// Its size on the wire (block data), for flow control.
    pub bytes: u64,
    /// The space it takes in the journal (data written in place takes none), for the
    /// journal limit.
    pub journal_bytes: u64,
    /// Host time of the entry.
    pub timestamp_ns: u64,
}

/// What a copy sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyKind {
    /// Every block ever written (initial copy).
    Full,
    /// The blocks marked in the difference bitmap (resync after a long outage).
    Bitmap,
}

/// What the driver must do, in order. An action that persists state must be durable before
/// the driver carries out the next one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a message.
    Send(Message),
    /// Primary: read this entry from the journal (blocks in place read from the volume) and
    /// send it as [`Message::Entry`].
    SendEntry(EntryMeta),
    /// Primary: stream copy data with [`Message::CopyBlocks`], then seal and sync the open
    /// entry and call [`Replicator::handle_copy_sent`] with this copy's id and the newest
    /// durable seq. A later `StartCopy` or `StopCopy` supersedes it.
    StartCopy {
        /// What to copy.
        kind: CopyKind,
        /// Identifies this copy in [`Replicator::handle_copy_sent`].
        id: u64,
    },
    /// Primary: stop a copy in progress (the connection went away).
    StopCopy,
    /// Secondary: apply this entry as one transaction of the local journal (same seq), make
    /// it durable, then call [`Replicator::handle_applied`]. An entry without blocks only
    /// records the seq (the end of a copy).
    Apply(WireEntry),
    /// Secondary: write these copy blocks into the volume (no ordering among them).
    ApplyCopy(Vec<WireBlock>),
    /// Secondary: the volume is a replica of `volume` (a new secondary takes the
    /// primary's identity before the first copy).
    AdoptVolume(VolumeId),
    /// Primary: journal entries up to this seq are no longer needed by the peer.
    Release(Seq),
    /// Primary: mark the blocks of every retained entry up to this seq in the difference
    /// bitmap, persist the bitmap, then release those entries.
    MarkBitmap(Seq),
    /// Primary: the resync completed; clear and persist the difference bitmap.
    ClearBitmap,
    /// Write the pair state durably.
    Persist(PersistedState),
    /// Primary: the peer has every entry up to this seq durably (sync-mode waiters).
    Acked(Seq),
    /// Close the connection with a reason (refused peer, protocol violation).
    Disconnect(String),
}

/// A snapshot for `pairfs status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// This node's role.
    pub role: Role,
    /// Pair state.
    pub state: PairState,
    /// Epoch.
    pub epoch: Epoch,
    /// Connected to the peer and past the hello exchange.
    pub connected: bool,
    /// Newest local seq (primary: durable in its journal; secondary: applied).
    pub last_seq: Seq,
    /// Primary: newest seq sent on this connection.
    pub sent: Seq,
    /// Newest seq the secondary applied (primary: as acknowledged).
    pub applied: Seq,
    /// Primary: entries not yet acknowledged.
    pub lag_entries: u64,
    /// Primary: bytes not yet acknowledged.
    pub lag_bytes: u64,
    /// Primary: host time of the oldest unacknowledged entry.
    pub oldest_unacked_ns: Option<u64>,
    /// Primary: the peer's measured apply rate, bytes per second (see `max_lag`).
    pub apply_rate: Option<u64>,
    /// How the backlog is kept.
    pub backlog: Backlog,
    /// A copy is running: (blocks sent, blocks to send).
    pub copy_progress: Option<(u64, u64)>,
    /// Secondary: not write-order consistent (copy or resync incomplete).
    pub inconsistent: bool,
    /// The last refusal, if any.
    pub refused: Option<String>,
}

struct PeerView {
    hello: Hello,
    /// Newest seq the peer applied (as far as we know).
    applied: Seq,
}

enum CopyState {
    /// Blocks are being sent; entries after `base` follow.
    Sending { base: Seq, kind: CopyKind, id: u64 },
    /// CopyEnd sent; done once the peer applied `consistent_at`.
    Finishing { consistent_at: Seq },
}

/// The replication state machine of one node.
pub struct Replicator {
    cfg: ReplConfig,
    persisted: PersistedState,
    state: PairState,
    connected: bool,
    peer: Option<PeerView>,
    out: VecDeque<Action>,
    refused: Option<String>,
    /// Messages that overtook the peer's hello (streams are independent).
    early: Vec<Message>,

    // --- primary ---
    /// Newest durable local entry.
    last_seq: Seq,
    /// Durable entries the peer has not acknowledged (or that were never sent).
    retained: VecDeque<EntryMeta>,
    /// Journal bytes of the retained entries (the journal limit applies to these).
    retained_bytes: u64,
    /// Newest seq sent on this connection.
    sent_upto: Seq,
    in_flight: u64,
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
    copy: Option<CopyState>,
    copy_progress: Option<(u64, u64)>,
    copy_ids: u64,

    // --- secondary ---
    /// Newest seq applied durably.
    applied: Seq,
    /// Entries received ahead of a gap, by their prev_seq.
    ooo: BTreeMap<Seq, WireEntry>,
    /// The seq of the entry handed to the driver to apply.
    applying: Option<Seq>,
}

impl Replicator {
    /// A replicator for a node whose journal holds `retained` (primary: durable entries
    /// not released, oldest first) and whose newest durable seq is `last_seq` (for a
    /// secondary: its applied seq).
    pub fn new(
        cfg: ReplConfig,
        persisted: PersistedState,
        retained: Vec<EntryMeta>,
        last_seq: Seq,
    ) -> Self {
        let retained_bytes = retained.iter().map(|e| e.journal_bytes).sum();
        let state = if persisted.role == Role::Primary && !persisted.paired {
            PairState::Simplex
        } else {
            PairState::Suspended
        };
        let mut r = Replicator {
            cfg,
            state,
            connected: false,
            peer: None,
            out: VecDeque::new(),
            refused: None,
            early: Vec::new(),
            last_seq,
            retained: retained.into(),
            retained_bytes,
            sent_upto: Seq::NONE,
            in_flight: 0,
            last_progress: None,
            drain_rate: None,
            drain_acc: (0, Duration::ZERO),
            busy_since: None,
            copy: None,
            copy_progress: None,
            copy_ids: 0,
            applied: last_seq,
            ooo: BTreeMap::new(),
            applying: None,
            persisted,
        };
        if r.persisted.role == Role::Primary && !r.persisted.paired && !r.retained.is_empty() {
            // Never paired: nobody needs the backlog (a first pairing copies everything).
            let upto = r.last_seq;
            r.release_through(upto);
        }
        r
    }

    /// The persisted part of the state (as last handed out by [`Action::Persist`]).
    pub fn persisted(&self) -> &PersistedState {
        &self.persisted
    }

    /// This node's role.
    pub fn role(&self) -> Role {
        self.persisted.role
    }

    /// Next action for the driver.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    /// When [`Replicator::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.persisted.role == Role::Primary
            && self.connected
            && self.sent_upto > self.peer_applied()
        {
            self.last_progress.map(|t| t + self.cfg.resend_after)
        } else {
            None
        }
    }

    /// True when a sync-mode writer must wait for the peer: the pair is streaming.
    /// (Disconnected, sync degrades to async rather than stopping the volume; status shows it.)
    pub fn sync_waits(&self) -> bool {
        self.cfg.mode == Mode::Sync && self.connected && self.state == PairState::Pair
    }

    /// Async primary streaming to its peer with `max_lag` set: the backlog writers are held
    /// to, or `None` when they never wait (sync mode waits on every write instead; an
    /// absent peer is covered by the journal, then the bitmap; a copy in progress is not a
    /// backlog of entries).
    pub fn backpressure(&self) -> Option<Backpressure> {
        let max_lag = self.cfg.max_lag?;
        if self.cfg.mode != Mode::Async
            || self.persisted.role != Role::Primary
            || !self.connected
            || self.state != PairState::Pair
        {
            return None;
        }
        let mut unacked = self.unacked();
        let first = unacked.next()?;
        Some(Backpressure {
            oldest_ns: first.timestamp_ns,
            bytes: first.bytes + unacked.map(|e| e.bytes).sum::<u64>(),
            max_lag_ns: u64::try_from(max_lag.as_nanos()).unwrap_or(u64::MAX),
            max_bytes: self.cfg.journal_limit / 2,
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

    /// Retained entries the peer has not acknowledged applied, oldest first.
    fn unacked(&self) -> impl Iterator<Item = &EntryMeta> {
        let applied = self.peer_applied();
        self.retained.iter().filter(move |e| e.seq > applied)
    }

    fn peer_applied(&self) -> Seq {
        self.peer.as_ref().map_or(Seq::NONE, |p| p.applied)
    }

    fn hello(&self) -> Hello {
        Hello {
            proto: PROTOCOL_VERSION,
            node: self.cfg.node.clone(),
            volume: self.cfg.volume,
            block_size: self.cfg.block_size,
            blocks: self.cfg.blocks,
            role: self.persisted.role,
            epoch: self.persisted.epoch,
            generations: self.persisted.generations.clone(),
            last_seq: if self.persisted.role == Role::Primary {
                self.last_seq
            } else {
                self.applied
            },
            applied: self.applied,
            inconsistent: self.persisted.inconsistent_until.is_some(),
            empty: self.persisted.empty,
        }
    }

    fn send(&mut self, m: Message) {
        self.out.push_back(Action::Send(m));
    }

    fn persist(&mut self) {
        self.out.push_back(Action::Persist(self.persisted.clone()));
    }

    fn refuse(&mut self, reason: String) {
        tracing::warn!(%reason, "refusing the peer");
        let epoch = self.persisted.epoch;
        self.send(Message::Refuse {
            epoch,
            reason: reason.clone(),
        });
        self.out.push_back(Action::Disconnect(reason.clone()));
        self.refused = Some(reason);
        self.peer = None;
    }

    /// The connection to the peer is up: say hello.
    pub fn handle_connected(&mut self, now: Instant) {
        self.connected = true;
        self.peer = None;
        self.sent_upto = Seq::NONE;
        self.in_flight = 0;
        self.last_progress = Some(now);
        self.ooo.clear();
        self.early.clear();
        let h = self.hello();
        self.send(Message::Hello(h));
    }

    /// The connection went away (or was refused).
    pub fn handle_disconnected(&mut self) {
        let was = self.connected;
        self.connected = false;
        self.peer = None;
        self.sent_upto = Seq::NONE;
        self.in_flight = 0;
        self.busy_since = None;
        self.drain_acc = (0, Duration::ZERO);
        self.ooo.clear();
        self.early.clear();
        if self.persisted.role == Role::Primary {
            if matches!(self.copy, Some(CopyState::Sending { .. })) {
                self.out.push_back(Action::StopCopy);
            }
            self.copy = None;
            self.copy_progress = None;
            if self.state != PairState::Simplex {
                self.state = PairState::Suspended;
            }
        } else if was {
            self.state = PairState::Suspended;
        }
    }

    /// A message from the peer.
    pub fn handle_message(&mut self, m: Message, now: Instant) {
        if !self.connected {
            return; // a late message of a closed connection
        }
        let epoch = self.persisted.epoch;
        if let Message::Refuse { reason, .. } = &m {
            tracing::warn!(%reason, "the peer refused this node");
            self.refused = Some(format!("peer: {reason}"));
            self.out
                .push_back(Action::Disconnect(format!("refused by the peer: {reason}")));
            return;
        }
        if m.epoch() < epoch && !matches!(m, Message::Hello(_)) {
            self.refuse(format!("stale epoch {} (ours is {})", m.epoch().0, epoch.0));
            return;
        }
        match (self.persisted.role, m) {
            (_, Message::Hello(h)) => {
                self.on_hello(h, now);
                if self.peer.is_some() {
                    for m in std::mem::take(&mut self.early) {
                        self.handle_message(m, now);
                    }
                }
            }
            (_, m) if self.peer.is_none() => {
                // The replication stream may overtake the control stream's hello.
                if self.early.len() >= MAX_EARLY {
                    self.refuse("protocol violation: no hello".into());
                } else {
                    self.early.push(m);
                }
            }
            (Role::Primary, Message::Ack { applied, .. }) => self.on_ack(applied, now),
            (Role::Secondary, Message::Entry { entry, .. }) => self.on_entry(entry),
            (Role::Secondary, Message::CopyBlocks { blocks, .. }) => self.on_copy_blocks(blocks),
            (
                Role::Secondary,
                Message::CopyEnd {
                    base,
                    consistent_at,
                    ..
                },
            ) => self.on_copy_end(base, consistent_at),
            (role, m) => {
                self.refuse(format!(
                    "protocol violation: {} got {}",
                    match role {
                        Role::Primary => "primary",
                        Role::Secondary => "secondary",
                    },
                    message_name(&m)
                ));
            }
        }
    }

    fn on_hello(&mut self, h: Hello, now: Instant) {
        if self.peer.is_some() {
            self.refuse("protocol violation: second hello".into());
            return;
        }
        if h.proto != PROTOCOL_VERSION {
            self.refuse(format!(
                "protocol version {} (this node speaks {PROTOCOL_VERSION})",
                h.proto
            ));
            return;
        }
        if h.block_size != self.cfg.block_size || h.blocks != self.cfg.blocks {
            self.refuse(format!(
                "volume geometry differs: peer {} blocks of {}, this node {} blocks of {}",
                h.blocks, h.block_size, self.cfg.blocks, self.cfg.block_size
            ));
            return;
        }
        if h.role == self.persisted.role {
            self.refuse(format!(
                "both nodes are {:?}: only one node may be primary",
                h.role
            ));
            return;
        }
        match self.persisted.role {
            Role::Primary => self.primary_hello(h, now),
            Role::Secondary => self.secondary_hello(h),
        }
    }

    // ------------------------------------------------------------------ primary --

    fn primary_hello(&mut self, h: Hello, now: Instant) {
        if h.epoch > self.persisted.epoch {
            self.refuse(format!(
                "the peer is at epoch {} and this primary at {}: it has a newer role history",
                h.epoch.0, self.persisted.epoch.0
            ));
            return;
        }
        let full = h.empty || h.volume != self.cfg.volume;
        if !h.empty && h.volume != self.cfg.volume {
            self.refuse(format!(
                "the peer holds another volume ({}, this node {})",
                h.volume, self.cfg.volume
            ));
            return;
        }
        if !full {
            // The peer's lineage must be a prefix of ours.
            let ours = &self.persisted.generations;
            let prefix = h.generations.len() <= ours.len()
                && h.generations.iter().zip(ours).all(|(a, b)| a == b);
            if !prefix {
                self.refuse(
                    "the nodes' data diverged (generation histories differ); nothing is \
                     overwritten automatically"
                        .into(),
                );
                return;
            }
            if h.applied > self.last_seq {
                self.refuse(format!(
                    "the peer has applied seq {} beyond this primary's newest {}",
                    h.applied.0, self.last_seq.0
                ));
                return;
            }
        }
        let applied = h.applied;
        let inconsistent = h.inconsistent;
        self.peer = Some(PeerView { hello: h, applied });
        self.refused = None;
        self.last_progress = Some(now);
        let covered = self
            .retained
            .front()
            .map_or(applied == self.last_seq, |e| e.prev_seq <= applied);
        let plan = if full {
            Some(CopyKind::Full)
        } else if !inconsistent && covered && self.persisted.backlog == Backlog::Journal {
            None
        } else {
            Some(self.copy_kind_for_peer())
        };
        match plan {
            None => {
                self.state = PairState::Pair;
                self.sent_upto = applied;
                // Entries the peer already has.
                self.release_through(applied);
                self.pump();
            }
            Some(kind) => self.start_copy(kind),
        }
    }

    /// Which copy brings the connected peer back: the bitmap if it covers everything the
    /// peer lacks (the peer holds data and applied at least the bitmap's base), else all.
    fn copy_kind_for_peer(&self) -> CopyKind {
        let Some(p) = &self.peer else {
            return CopyKind::Full;
        };
        match self.persisted.backlog {
            Backlog::Bitmap { base } if !p.hello.empty && p.applied >= base => CopyKind::Bitmap,
            _ => CopyKind::Full,
        }
    }

    fn start_copy(&mut self, kind: CopyKind) {
        if kind == CopyKind::Bitmap && !self.retained.is_empty() {
            // The copy stands for everything up to now: entries still retained must be in
            // the bitmap too, or their blocks would be skipped.
            let upto = self.last_seq;
            self.out.push_back(Action::MarkBitmap(upto));
            self.retained.clear();
            self.retained_bytes = 0;
            self.in_flight = 0;
        }
        self.state = PairState::Copying;
        if !self.persisted.paired {
            self.persisted.paired = true;
            self.persist();
        }
        self.copy_ids += 1;
        let id = self.copy_ids;
        self.copy = Some(CopyState::Sending {
            base: self.last_seq,
            kind,
            id,
        });
        self.copy_progress = Some((0, 0));
        self.out.push_back(Action::StartCopy { kind, id });
    }

    /// Primary: the driver reports copy progress (blocks sent, blocks to send).
    pub fn handle_copy_progress(&mut self, sent: u64, total: u64) {
        if self.copy.is_some() {
            self.copy_progress = Some((sent, total));
        }
    }

    /// Primary: all blocks of copy `id` are sent and the open entry was sealed; `newest`
    /// is the newest durable seq (every copied block reflects a state at or before it).
    pub fn handle_copy_sent(&mut self, id: u64, newest: Seq) {
        let Some(CopyState::Sending {
            base, id: current, ..
        }) = self.copy
        else {
            return;
        };
        if id != current {
            return; // a superseded copy
        }
        let epoch = self.persisted.epoch;
        let consistent_at = newest.max(base);
        self.send(Message::CopyEnd {
            epoch,
            base,
            consistent_at,
        });
        // The copy carries everything up to `base`, but until the peer has applied it the
        // entries must stay accounted for: mark their blocks in the bitmap (cleared when
        // the copy completes), so an interrupted copy can still be resumed by bitmap.
        if self.retained.front().is_some_and(|e| e.seq <= base) {
            self.out.push_back(Action::MarkBitmap(base));
            while self.retained.front().is_some_and(|e| e.seq <= base) {
                if let Some(e) = self.retained.pop_front() {
                    self.retained_bytes -= e.journal_bytes;
                }
            }
        }
        self.sent_upto = base;
        self.copy = Some(CopyState::Finishing { consistent_at });
        self.pump();
    }

    /// Primary: a local journal entry became durable.
    pub fn handle_local_entry(&mut self, e: EntryMeta) {
        if self.persisted.role != Role::Primary || e.seq <= self.last_seq {
            return;
        }
        self.last_seq = e.seq;
        if self.state == PairState::Simplex {
            // Never paired: a first pairing copies everything, nothing to keep.
            self.out.push_back(Action::Release(e.seq));
            return;
        }
        self.retained.push_back(e);
        self.retained_bytes += e.journal_bytes;
        if self.retained_bytes > self.cfg.journal_limit {
            self.enter_bitmap();
            return;
        }
        self.pump();
    }

    /// Primary: the driver could not read entry `seq` as it was (an in-place block was
    /// overwritten before it was sent and could not be saved aside): what the peer lacks
    /// goes through the difference bitmap instead.
    pub fn handle_entry_unavailable(&mut self, seq: Seq) {
        tracing::warn!(%seq, "entry can no longer be sent as written: resync by bitmap");
        self.enter_bitmap();
    }

    /// The backlog outgrew the journal limit: keep it as a bitmap instead.
    fn enter_bitmap(&mut self) {
        let base = match self.persisted.backlog {
            Backlog::Bitmap { base } => base,
            Backlog::Journal => self.peer_applied_or_released(),
        };
        self.persisted.backlog = Backlog::Bitmap { base };
        self.persist();
        let upto = self.last_seq;
        self.out.push_back(Action::MarkBitmap(upto));
        self.retained.clear();
        self.retained_bytes = 0;
        self.in_flight = 0;
        tracing::warn!(
            base = %base,
            upto = %upto,
            "replication backlog exceeds the journal limit: falling back to the difference bitmap"
        );
        if self.connected && self.peer.is_some() {
            // What the peer still needs is only in the bitmap now: (re)start a copy. A full
            // copy in progress restarts as a full copy (the bitmap does not cover an empty
            // or partly filled peer).
            let kind = match self.copy {
                Some(CopyState::Sending {
                    kind: CopyKind::Full,
                    ..
                }) => CopyKind::Full,
                _ => self.copy_kind_for_peer(),
            };
            if let Some(CopyState::Sending { .. }) = self.copy {
                self.out.push_back(Action::StopCopy);
            }
            self.start_copy(kind);
        }
    }

    /// The newest seq the peer is known to have: entries are released exactly when the
    /// peer acknowledges them, so everything before the oldest retained entry.
    fn peer_applied_or_released(&self) -> Seq {
        let released = self.retained.front().map_or(self.last_seq, |e| e.prev_seq);
        released.max(self.peer_applied())
    }

    fn release_through(&mut self, seq: Seq) {
        let mut any = false;
        while self.retained.front().is_some_and(|e| e.seq <= seq) {
            if let Some(e) = self.retained.pop_front() {
                self.retained_bytes -= e.journal_bytes;
                any = true;
            }
        }
        if any || self.persisted.role == Role::Primary {
            self.out.push_back(Action::Release(seq));
        }
    }

    fn on_ack(&mut self, applied: Seq, now: Instant) {
        let Some(p) = self.peer.as_mut() else { return };
        if applied <= p.applied {
            return; // duplicate or reordered ack
        }
        if applied > self.last_seq {
            self.refuse(format!(
                "the peer acknowledged seq {} beyond this primary's newest {}",
                applied.0, self.last_seq.0
            ));
            return;
        }
        let before = p.applied;
        p.applied = applied;
        self.last_progress = Some(now);
        let drained: u64 = self
            .retained
            .iter()
            .filter(|e| e.seq > before && e.seq <= applied)
            .map(|e| e.bytes)
            .sum();
        // (An ack of entries without data, such as the one recording a copy's end, says
        // nothing of the peer's speed.)
        if let Some(t) = self.busy_since.filter(|_| drained > 0) {
            self.measure_drain(drained, now.saturating_duration_since(t));
        }
        self.release_through(applied);
        let backlog = self.unacked().next().is_some();
        self.busy_since = backlog.then_some(now);
        self.in_flight = self
            .retained
            .iter()
            .take_while(|e| e.seq <= self.sent_upto)
            .map(|e| e.bytes)
            .sum();
        if self.cfg.mode == Mode::Sync {
            self.out.push_back(Action::Acked(applied));
        }
        if let Some(CopyState::Finishing { consistent_at }) = self.copy {
            if applied >= consistent_at {
                self.copy = None;
                self.copy_progress = None;
                self.state = PairState::Pair;
                // The peer holds everything the bitmap marks.
                self.out.push_back(Action::ClearBitmap);
                if matches!(self.persisted.backlog, Backlog::Bitmap { .. }) {
                    self.persisted.backlog = Backlog::Journal;
                    self.persist();
                }
                tracing::info!(seq = %applied, "copy complete: the pair is in sync");
            }
        }
        self.pump();
    }

    /// Sends retained entries in order while the window allows.
    fn pump(&mut self) {
        if !self.connected || self.peer.is_none() {
            return;
        }
        if matches!(self.copy, Some(CopyState::Sending { .. })) {
            return;
        }
        let window = self.cfg.window_bytes;
        let mut to_send = Vec::new();
        for e in &self.retained {
            if e.seq <= self.sent_upto {
                continue;
            }
            if self.in_flight > 0 && self.in_flight + e.bytes > window {
                break;
            }
            self.in_flight += e.bytes;
            to_send.push(*e);
        }
        if let Some(last) = to_send.last() {
            self.sent_upto = last.seq;
        }
        for e in to_send {
            self.out.push_back(Action::SendEntry(e));
        }
    }

    /// Time passed: resend what was not acknowledged in time.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.persisted.role != Role::Primary || !self.connected || self.peer.is_none() {
            return;
        }
        let applied = self.peer_applied();
        if self.sent_upto > applied
            && self
                .last_progress
                .is_some_and(|t| now.duration_since(t) >= self.cfg.resend_after)
        {
            tracing::debug!(from = %applied, upto = %self.sent_upto, "no acknowledgement: resending");
            self.sent_upto = applied;
            self.in_flight = 0;
            self.last_progress = Some(now);
            self.pump();
        }
    }

    // ---------------------------------------------------------------- secondary --

    fn secondary_hello(&mut self, h: Hello) {
        if h.epoch < self.persisted.epoch {
            self.refuse(format!(
                "the primary is at epoch {}, this node at {}: stale primary",
                h.epoch.0, self.persisted.epoch.0
            ));
            return;
        }
        if !self.persisted.empty && self.persisted.inconsistent_until.is_none() {
            if h.volume != self.cfg.volume {
                self.refuse(format!(
                    "the primary holds another volume ({}, this node {})",
                    h.volume, self.cfg.volume
                ));
                return;
            }
            let ours = &self.persisted.generations;
            let prefix = ours.len() <= h.generations.len()
                && ours.iter().zip(&h.generations).all(|(a, b)| a == b);
            if !prefix {
                self.refuse(
                    "the nodes' data diverged (generation histories differ); nothing is \
                     overwritten automatically"
                        .into(),
                );
                return;
            }
        }
        if h.epoch > self.persisted.epoch || h.generations != self.persisted.generations {
            self.persisted.epoch = h.epoch;
            self.persisted.generations = h.generations.clone();
            self.persist();
        }
        if self.persisted.empty && h.volume != self.cfg.volume {
            self.cfg.volume = h.volume;
            self.out.push_back(Action::AdoptVolume(h.volume));
        }
        let applied = self.applied;
        self.peer = Some(PeerView { hello: h, applied });
        self.refused = None;
        self.state = if self.persisted.inconsistent_until.is_some() || self.persisted.empty {
            PairState::Copying
        } else {
            PairState::Pair
        };
    }

    fn ack(&mut self) {
        let epoch = self.persisted.epoch;
        let applied = self.applied;
        self.send(Message::Ack { epoch, applied });
    }

    fn on_entry(&mut self, e: WireEntry) {
        if self.persisted.inconsistent_until == Some(Seq::NONE) {
            // Entries come only after the copy ended; these belong to an older stream.
            return;
        }
        if e.seq <= self.applied || self.applying.is_some_and(|s| e.seq <= s) {
            if self.applying.is_none() {
                self.ack(); // a duplicate: the primary may have missed our ack
            }
            return;
        }
        if e.prev_seq == self.applied && self.applying.is_none() {
            self.applying = Some(e.seq);
            self.out.push_back(Action::Apply(e));
            return;
        }
        if self.ooo.len() < self.cfg.max_out_of_order {
            self.ooo.insert(e.prev_seq, e);
        }
    }

    fn on_copy_blocks(&mut self, blocks: Vec<WireBlock>) {
        if self.persisted.inconsistent_until != Some(Seq::NONE) {
            // The first copy data: from now on the volume is not a consistent image, and
            // entries of the stream before the copy must not land after copy blocks.
            self.persisted.inconsistent_until = Some(Seq::NONE);
            self.persist();
            self.state = PairState::Copying;
            self.ooo.clear();
        }
        self.out.push_back(Action::ApplyCopy(blocks));
    }

    fn on_copy_end(&mut self, base: Seq, consistent_at: Seq) {
        self.persisted.inconsistent_until = Some(consistent_at.max(base));
        self.persisted.empty = false;
        self.persist();
        self.ooo.clear();
        if base > self.applied {
            // Record that the volume now holds everything up to `base`.
            self.applying = Some(base);
            self.out.push_back(Action::Apply(WireEntry {
                seq: base,
                prev_seq: self.applied,
                timestamp_ns: 0,
                blocks: Vec::new(),
            }));
        } else {
            self.finish_apply_checks();
        }
    }

    /// Secondary: the driver applied (durably) the entry with this seq.
    pub fn handle_applied(&mut self, seq: Seq) {
        if self.applying != Some(seq) {
            return;
        }
        self.applying = None;
        self.applied = seq;
        self.finish_apply_checks();
    }

    fn finish_apply_checks(&mut self) {
        if let Some(until) = self.persisted.inconsistent_until {
            if until != Seq::NONE && self.applied >= until {
                self.persisted.inconsistent_until = None;
                self.persist();
                self.state = PairState::Pair;
                tracing::info!(seq = %self.applied, "replica consistent again");
            }
        }
        if self.connected && self.peer.is_some() {
            self.ack();
        }
        if self.persisted.inconsistent_until == Some(Seq::NONE) {
            return; // copy data is arriving: entries resume after the copy's end
        }
        // Anything buffered that now follows?
        while let Some(e) = self.ooo.remove(&self.applied) {
            if e.seq > self.applied {
                self.applying = Some(e.seq);
                self.out.push_back(Action::Apply(e));
                break;
            }
        }
        let applied = self.applied;
        self.ooo.retain(|_, e| e.seq > applied);
    }

    /// A snapshot for `pairfs status`.
    pub fn status(&self) -> Status {
        let primary = self.persisted.role == Role::Primary;
        let unacked: Vec<&EntryMeta> = self.unacked().collect();
        Status {
            role: self.persisted.role,
            state: self.state,
            epoch: self.persisted.epoch,
            connected: self.connected && self.peer.is_some(),
            last_seq: if primary { self.last_seq } else { self.applied },
            sent: self.sent_upto,
            applied: if primary {
                self.peer_applied()
            } else {
                self.applied
            },
            lag_entries: if primary { unacked.len() as u64 } else { 0 },
            lag_bytes: if primary {
                unacked.iter().map(|e| e.bytes).sum()
            } else {
                0
            },
            oldest_unacked_ns: if primary {
                unacked.first().map(|e| e.timestamp_ns)
            } else {
                None
            },
            // Saturating float-to-int conversion.
            apply_rate: self.drain_rate.filter(|_| primary).map(|r| r as u64),
            backlog: self.persisted.backlog,
            copy_progress: self.copy_progress,
            inconsistent: self.persisted.inconsistent_until.is_some(),
            refused: self.refused.clone(),
        }
    }
}

fn message_name(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "Hello",
        Message::Entry { .. } => "Entry",
        Message::CopyBlocks { .. } => "CopyBlocks",
        Message::CopyEnd { .. } => "CopyEnd",
        Message::Ack { .. } => "Ack",
        Message::Refuse { .. } => "Refuse",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bp(bytes: u64, drain_rate: u64) -> Backpressure {
        Backpressure {
            oldest_ns: 1_000_000_000,
            bytes,
            max_lag_ns: 1_000_000_000,
            max_bytes: 1 << 40,
            drain_rate,
        }
    }

    #[test]
    fn writers_are_held_to_three_quarters_of_max_lag_at_the_measured_rate() {
        let mib = 1 << 20;
        // 100 MiB/s: 75 MiB is the most a write may wait behind.
        assert!(!bp(75 * mib, 100 * mib).exceeded(1_000_000_000, 0));
        assert!(bp(75 * mib + 1, 100 * mib).exceeded(1_000_000_000, 0));
        assert!(bp(70 * mib, 100 * mib).exceeded(1_000_000_000, 5 * mib + 1));
        // The age bound is max_lag itself.
        assert!(!bp(mib, 100 * mib).exceeded(2_000_000_000, 0));
        assert!(bp(mib, 100 * mib).exceeded(2_000_000_001, 0));
    }

    #[test]
    fn until_the_rate_is_measured_the_backlog_is_held_to_max_lag_at_64_mib_per_s() {
        // max_lag 1 s: 64 MiB.
        let cap = 64 << 20;
        assert!(!bp(cap, 0).exceeded(1_000_000_000, 0));
        assert!(bp(cap, 0).exceeded(1_000_000_000, 1));
        assert!(bp(cap + 1, 0).exceeded(1_000_000_000, 0));
        // max_lag 5 s: 320 MiB.
        let five = Backpressure {
            max_lag_ns: 5_000_000_000,
            ..bp(5 * cap, 0)
        };
        assert!(!five.exceeded(1_000_000_000, 0));
        assert!(five.exceeded(1_000_000_000, 1));
    }
}
