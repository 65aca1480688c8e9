//! The replication state machine of one node (docs/PROTOCOL.md §2, §5).
//!
//! One type for both roles. A primary streams its journal entries in seq order — once they
//! are durable locally (async mode), or once they are sealed, before they are durable here
//! (sync mode: the write then completes when the peer has it) — and releases each only
//! when the secondary acknowledges it *durable*. A secondary applies entries strictly in
//! order and acknowledges each twice: *received* (in its journal and visible, the moment it
//! is applied) and *durable* (after its own group commit, or a flush the primary asked
//! for). The data path stays outside: the primary's driver reads an entry from its journal
//! when told [`Action::SendEntry`] and streams copy blocks itself after
//! [`Action::StartCopy`]; the secondary's driver applies what [`Action::Apply`] and
//! [`Action::ApplyCopy`] hand it and reports back with [`Replicator::handle_applied`] and
//! [`Replicator::handle_local_durable`].
//!
//! A sync-mode primary that restarts after a crash may be *behind* its peer (the peer got
//! entries it had not made durable): it starts [`PairState::Reconciling`], takes the
//! missing entries back from the peer ([`Message::Pull`]) and admits writes only then — or,
//! with the peer unreachable for `sync_timeout`, starts a new generation, so that the peer's
//! tail is detected as a divergence when it returns, never silently overwritten.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::{
    Backlog, Degraded, Epoch, Generation, Hello, Message, Mode, PROTOCOL_VERSION, PairState,
    PersistedState, Role, WireBlock, WireEntry,
};
use crate::types::{Seq, VolumeId};

/// The smallest entry a peer's journal must take: the filesystem's largest transaction (a
/// 1 MiB write with its metadata) with room to spare. A peer that takes less is refused at
/// pairing, naming both sizes, rather than failing writes later. An entry takes at most a
/// quarter of a journal: a 16 MiB journal takes entries of almost 4 MiB.
pub const MIN_PEER_ENTRY_BYTES: u64 = 2 << 20;

/// Entries a secondary buffers ahead of a gap, whatever their size (entries without blocks
/// would otherwise escape the byte bound); beyond, they are dropped and come again.
const MAX_OUT_OF_ORDER_ENTRIES: usize = 4096;
/// Messages kept while waiting for the peer's hello (a few replication frames can overtake
/// it; more means the peer is not speaking the protocol).
const MAX_EARLY: usize = 256;
/// Bytes of block data those may hold: one entry's worth and a margin.
const MAX_EARLY_BYTES: u64 = 2 * super::MAX_ENTRY_WIRE_BYTES;
/// Verify requests a secondary holds for a state it has not reached (a primary keeps a
/// few in flight; more is not a primary speaking the protocol).
const MAX_VERIFY_WAIT: usize = 64;
/// Busy time one sample of the peer's drain rate spans at least.
const DRAIN_SAMPLE: Duration = Duration::from_millis(250);
/// The fraction of `max_lag` the predicted lag of a new write is held to (see
/// [`Backpressure::exceeded`]).
const LAG_TARGET: (u128, u128) = (3, 4);
/// The apply rate assumed while the peer's is not measured yet (bytes per second): about
/// half a gigabit link. Writers are held to `max_lag` at this rate meanwhile.
const UNMEASURED_RATE: u64 = 64 << 20;
/// Async mode: how far behind the connected peer may fall before writers wait for it
/// (`replication.max_lag`, README).
pub const DEFAULT_MAX_LAG: Duration = Duration::from_secs(5);
/// Sync mode: how long a writer waits for the peer before the pair counts as degraded and
/// writes go on without it; also how long a primary restarted after a crash waits for its
/// peer to reconcile (`replication.sync_timeout`, README). Five seconds: a few idle
/// timeouts and reconnect attempts, short enough that a dead peer stalls writers briefly.
pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// An online verify request: its id, the seq whose state it describes, and the blocks'
/// checksums there.
type VerifyRequest = (u64, Seq, Vec<(u64, u32)>);

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
    /// Bytes of entries a secondary buffers ahead of a gap (beyond, they are dropped and
    /// resent).
    pub max_out_of_order_bytes: u64,
    /// Async mode, streaming to a connected peer: how far (age of the oldest entry the peer
    /// has not applied, or the time it would take to apply the backlog at its measured
    /// rate) it may fall behind before writers wait for it — the bound on what a failover
    /// can lose while the pair is up. `None`: never wait (the lag is then bounded
    /// only by `journal_limit`, after which the peer is resynced by bitmap).
    pub max_lag: Option<Duration>,
    /// Sync mode: see [`DEFAULT_SYNC_TIMEOUT`].
    pub sync_timeout: Duration,
    /// Largest entry this node's journal takes (bytes of block data), told to the peer.
    pub max_entry_bytes: u64,
    /// A random id for a generation this node may have to start (the replicator itself
    /// has no source of randomness).
    pub next_generation_id: u64,
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
            // 1 GiB of backlog, about four seconds of writes at full disk speed (the node
            // holds it to half its journal).
            journal_limit: 1 << 30,
            // 64 MiB in flight: several round trips of a fast link without filling memory.
            window_bytes: 64 << 20,
            resend_after: Duration::from_secs(2),
            // Two entries' worth: on an ordered stream nothing arrives ahead of a gap; the
            // buffer only smooths a resend.
            max_out_of_order_bytes: 2 * super::MAX_ENTRY_WIRE_BYTES,
            max_lag: Some(DEFAULT_MAX_LAG),
            sync_timeout: DEFAULT_SYNC_TIMEOUT,
            max_entry_bytes: super::MAX_ENTRY_WIRE_BYTES,
            next_generation_id: 0,
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

/// A local journal entry the primary may send.
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
    /// Secondary (answering a [`Message::Pull`]): send its own journal entries after
    /// `after` up to `upto`, in order, as [`Message::Entry`] on its replication stream, or
    /// call [`Replicator::handle_pull_failed`] if one is no longer there.
    SendOwnEntries {
        /// The newest seq the primary has.
        after: Seq,
        /// The newest seq to send.
        upto: Seq,
    },
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
    /// Primary: seal entries before their blocks exceed this many bytes (what the peer's
    /// journal takes, at most [`super::MAX_ENTRY_WIRE_BYTES`]).
    LimitEntries(u64),
    /// Apply this entry as one transaction of the local journal (same seq), then call
    /// [`Replicator::handle_applied`] — or [`Replicator::handle_apply_failed`]. Durability
    /// comes later ([`Action::SyncLocal`] or the group commit). An entry without blocks
    /// only records the seq (the end of a copy). On a primary: an entry taken back from the
    /// peer while reconciling.
    Apply(WireEntry),
    /// Secondary: write these copy blocks into the volume (no ordering among them).
    ApplyCopy(Vec<WireBlock>),
    /// Secondary: the volume is a replica of `volume` (a new secondary takes the
    /// primary's identity before the first copy).
    AdoptVolume(VolumeId),
    /// Make everything applied durable now, then call
    /// [`Replicator::handle_local_durable`] (a secondary asked to flush; a primary that took
    /// entries back from its peer, before it writes).
    SyncLocal,
    /// Journal entries up to this seq are no longer needed by the peer (primary: the peer
    /// has them durably; secondary: the primary has them durably).
    Release(Seq),
    /// Primary: mark the blocks of every retained entry up to this seq in the difference
    /// bitmap, persist the bitmap, then release those entries.
    MarkBitmap(Seq),
    /// Primary: the resync completed; clear and persist the difference bitmap.
    ClearBitmap,
    /// Write the pair state durably.
    Persist(PersistedState),
    /// Primary: the peer's progress, for the writers that wait on it.
    Acked {
        /// Newest seq the peer received.
        received: Seq,
        /// Newest seq the peer has durably.
        durable: Seq,
    },
    /// Secondary (online verify): compare these checksums with the blocks' content in the
    /// state now (the one the primary computed them in), then call
    /// [`Replicator::handle_verify_done`] with the blocks that differ.
    VerifyBlocks {
        /// The request.
        id: u64,
        /// `(block, CRC-32C on the primary)`.
        blocks: Vec<(u64, u32)>,
    },
    /// Primary (online verify): the answer to request `id` — the blocks that differ, or
    /// `None` if they could not be compared (ask again).
    VerifyAnswer {
        /// The request.
        id: u64,
        /// Differing blocks.
        differ: Option<Vec<u64>>,
    },
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
    /// Newest local seq (primary: handed to the replicator; secondary: received).
    pub last_seq: Seq,
    /// Primary: newest seq sent on this connection.
    pub sent: Seq,
    /// Newest seq the secondary received (primary: as acknowledged).
    pub received: Seq,
    /// Newest seq durable on the secondary (primary: as acknowledged).
    pub durable: Seq,
    /// Primary: entries not yet acknowledged received.
    pub lag_entries: u64,
    /// Primary: bytes not yet acknowledged received.
    pub lag_bytes: u64,
    /// Primary: host time of the oldest entry not acknowledged received.
    pub oldest_unacked_ns: Option<u64>,
    /// Primary: the peer's measured apply rate, bytes per second (see `max_lag`).
    pub apply_rate: Option<u64>,
    /// How the backlog is kept.
    pub backlog: Backlog,
    /// A copy is running: (blocks sent, blocks to send).
    pub copy_progress: Option<(u64, u64)>,
    /// Secondary: not write-order consistent (copy or resync incomplete).
    pub inconsistent: bool,
    /// Primary, sync mode: writes acknowledged without the peer since then.
    pub degraded: Option<Degraded>,
    /// The last failed apply, until one succeeds.
    pub apply_error: Option<String>,
    /// The last refusal, if any.
    pub refused: Option<String>,
}

struct PeerView {
    hello: Hello,
    /// Newest seq the peer received (as far as we know).
    received: Seq,
    /// Newest seq the peer has durably (as far as we know).
    durable: Seq,
}

enum CopyState {
    /// Blocks are being sent; entries after `base` follow.
    Sending { base: Seq, id: u64 },
    /// CopyEnd sent; done once the peer has `consistent_at` durably.
    Finishing { consistent_at: Seq },
}

/// A primary's reconciliation after an unclean restart in sync mode.
struct Reconcile {
    /// Give up (new generation) at this instant.
    deadline: Instant,
    /// The peer's newest seq, once its hello said it has more than this node.
    target: Option<Seq>,
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
    early_bytes: u64,
    apply_error: Option<String>,

    // --- primary ---
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
    reconcile: Option<Reconcile>,
    /// The backlog went to the bitmap while a copy was being sent: a bitmap copy follows.
    copy_again: bool,
    /// Online verify: requests waiting for their entry to be sent, and those sent.
    verifies: VecDeque<VerifyRequest>,
    verifies_out: std::collections::BTreeSet<u64>,
    /// Restarted after a crash, and no copy or stream has run since: a copy the crash
    /// interrupted may have sent the peer data this node then lost (copies read what is
    /// committed, not only what is durable), so a peer left mid-copy gets a full copy.
    crashed: bool,

    // --- secondary ---
    /// Newest seq applied (received).
    received: Seq,
    /// Newest seq durable.
    durable: Seq,
    /// Entries received ahead of a gap, by their prev_seq.
    ooo: BTreeMap<Seq, WireEntry>,
    ooo_bytes: u64,
    /// The seq of the entry handed to the driver to apply.
    applying: Option<Seq>,
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
}

impl Replicator {
    /// A replicator for a node whose journal holds `retained` (primary: entries not
    /// released, oldest first) and whose newest durable seq is `durable`. A primary that
    /// ran in sync mode and did not close cleanly (`unclean`) reconciles with its peer
    /// before it admits writes.
    pub fn new(
        cfg: ReplConfig,
        persisted: PersistedState,
        retained: Vec<EntryMeta>,
        durable: Seq,
        unclean: bool,
        now: Instant,
    ) -> Self {
        let retained_bytes = retained.iter().map(|e| e.journal_bytes).sum();
        let primary = persisted.role == Role::Primary;
        let reconcile =
            (primary && unclean && persisted.sync_mode && persisted.paired).then(|| Reconcile {
                deadline: now + cfg.sync_timeout,
                target: None,
            });
        let state = if reconcile.is_some() {
            PairState::Reconciling
        } else if primary && !persisted.paired {
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
            early_bytes: 0,
            apply_error: None,
            last_seq: durable,
            local_durable: durable,
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
            reconcile,
            crashed: unclean,
            copy_again: false,
            verifies: VecDeque::new(),
            verifies_out: Default::default(),
            received: durable,
            durable,
            ooo: BTreeMap::new(),
            ooo_bytes: 0,
            applying: None,
            flush_wanted: Seq::NONE,
            syncing: false,
            copy_end: None,
            pull: None,
            verify_wait: VecDeque::new(),
            persisted,
        };
        if primary {
            if let Some(e) = r.retained.back() {
                r.last_seq = r.last_seq.max(e.seq);
            }
            if !r.persisted.paired && !r.retained.is_empty() {
                // Never paired: nobody needs the backlog (a first pairing copies everything).
                let upto = r.last_seq;
                r.release_through(upto);
            }
            let sync = r.cfg.mode == Mode::Sync;
            if r.persisted.sync_mode != sync && r.reconcile.is_none() {
                r.persisted.sync_mode = sync;
                r.persist();
            }
        }
        if r.state == PairState::Reconciling {
            tracing::warn!(
                newest = %r.last_seq,
                "restarted after a crash in sync mode: the peer may hold entries this node \
                 lost; writes wait until they are taken back from it"
            );
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
        if let Some(r) = &self.reconcile {
            let pull_again = r
                .target
                .and(self.last_progress)
                .map(|t| t + self.cfg.resend_after);
            return Some(pull_again.map_or(r.deadline, |t| t.min(r.deadline)));
        }
        if self.persisted.role == Role::Primary
            && self.connected
            && self.sent_upto > self.peer_received()
        {
            self.last_progress.map(|t| t + self.cfg.resend_after)
        } else {
            None
        }
    }

    /// Primary: whether the filesystem may write (not while reconciling after a crash).
    pub fn admits_writes(&self) -> bool {
        self.persisted.role == Role::Primary && self.reconcile.is_none()
    }

    /// True when a sync-mode writer must wait for the peer to have its entry (received),
    /// and an fsync for the peer to have it durably: sync mode, paired, not degraded, and
    /// not copying (until a copy completes the peer is inconsistent: writes are
    /// acknowledged here, and status says so). Writers wait at most `sync_timeout` — the
    /// peer may be reconnecting — then report [`Replicator::handle_degraded`].
    pub fn sync_waits(&self) -> bool {
        self.cfg.mode == Mode::Sync
            && self.persisted.role == Role::Primary
            && self.persisted.paired
            && self.persisted.degraded.is_none()
            && !matches!(self.state, PairState::Copying | PairState::Simplex)
    }

    /// Primary: an fsync wants everything up to `upto` durable on the peer too.
    pub fn handle_fsync(&mut self, upto: Seq) {
        if self.persisted.role == Role::Primary
            && self.connected
            && self.peer.is_some()
            && self.state == PairState::Pair
        {
            let epoch = self.persisted.epoch;
            self.send(Message::Flush { epoch, upto });
        }
    }

    /// Sync mode: entries are sent once sealed, before they are durable locally.
    pub fn sends_unsynced(&self) -> bool {
        self.cfg.mode == Mode::Sync
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

    /// Retained entries the peer has not acknowledged received, oldest first.
    fn unacked(&self) -> impl Iterator<Item = &EntryMeta> {
        let received = self.peer_received();
        self.retained.iter().filter(move |e| e.seq > received)
    }

    fn peer_received(&self) -> Seq {
        self.peer.as_ref().map_or(Seq::NONE, |p| p.received)
    }

    fn hello(&self) -> Hello {
        let primary = self.persisted.role == Role::Primary;
        Hello {
            proto: PROTOCOL_VERSION,
            node: self.cfg.node.clone(),
            volume: self.cfg.volume,
            block_size: self.cfg.block_size,
            blocks: self.cfg.blocks,
            role: self.persisted.role,
            epoch: self.persisted.epoch,
            generations: self.persisted.generations.clone(),
            last_seq: if primary {
                self.last_seq
            } else {
                // An apply under way completes (atomically) before any message of this
                // connection is handled: the peer must count on it.
                self.applying.unwrap_or(self.received).max(self.received)
            },
            durable: if primary {
                self.local_durable
            } else {
                self.durable
            },
            inconsistent: self.persisted.inconsistent_until.is_some(),
            empty: self.persisted.empty,
            max_entry_bytes: self.cfg.max_entry_bytes,
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
        self.clear_buffers();
        let h = self.hello();
        self.send(Message::Hello(h));
    }

    fn clear_buffers(&mut self) {
        self.pull = None;
        self.verify_wait.clear();
        let lost: Vec<u64> = self
            .verifies
            .drain(..)
            .map(|(id, _, _)| id)
            .chain(std::mem::take(&mut self.verifies_out))
            .collect();
        for id in lost {
            self.out
                .push_back(Action::VerifyAnswer { id, differ: None });
        }
        self.ooo.clear();
        self.ooo_bytes = 0;
        self.early.clear();
        self.early_bytes = 0;
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
        self.clear_buffers();
        if let Some(r) = &mut self.reconcile {
            r.target = None; // taken up again with the next connection
        }
        if self.persisted.role == Role::Primary {
            if matches!(self.copy, Some(CopyState::Sending { .. })) {
                self.out.push_back(Action::StopCopy);
            }
            self.copy = None;
            self.copy_progress = None;
            self.copy_again = false;
            if !matches!(self.state, PairState::Simplex | PairState::Reconciling) {
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
            if self.reconcile.as_ref().is_some_and(|r| r.target.is_some()) {
                // It cannot give back what this node lost: continue without it.
                self.give_up_reconciling("the peer could not send its entries back");
            }
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
                    self.early_bytes = 0;
                    for m in std::mem::take(&mut self.early) {
                        self.handle_message(m, now);
                    }
                }
            }
            (_, m) if self.peer.is_none() => {
                // The replication stream may overtake the control stream's hello.
                let bytes = m.data_bytes();
                if self.early.len() >= MAX_EARLY || self.early_bytes + bytes > MAX_EARLY_BYTES {
                    self.refuse("protocol violation: no hello".into());
                } else {
                    self.early_bytes += bytes;
                    self.early.push(m);
                }
            }
            (
                Role::Primary,
                Message::Ack {
                    received, durable, ..
                },
            ) => self.on_ack(received, durable, now),
            (Role::Primary, Message::Entry { entry, .. }) if self.reconcile.is_some() => {
                self.on_reconcile_entry(entry)
            }
            // The answer to a pull sent again just before the reconciliation ended.
            (Role::Primary, Message::Entry { entry, .. }) if entry.seq <= self.last_seq => {}
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
            (Role::Secondary, Message::Flush { upto, .. }) => self.on_flush(upto),
            (Role::Secondary, Message::Durable { seq, .. }) => {
                self.out.push_back(Action::Release(seq));
            }
            (Role::Secondary, Message::Pull { after, .. }) => self.on_pull(after),
            (Role::Secondary, Message::Verify { id, at, blocks, .. }) => {
                self.on_verify(id, at, blocks)
            }
            (Role::Primary, Message::Verified { id, differ, .. }) => {
                if self.verifies_out.remove(&id) {
                    self.out.push_back(Action::VerifyAnswer { id, differ });
                }
            }
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
            if let Err(why) =
                lineage_follows(&h.generations, h.last_seq, &self.persisted.generations)
            {
                self.refuse(format!(
                    "the nodes' data diverged: {why}; nothing is overwritten automatically"
                ));
                return;
            }
            if h.last_seq > self.last_seq && h.generations == self.persisted.generations {
                if self.reconcile.is_some() {
                    // The peer has entries this node lost in its crash: take them back.
                    self.reconcile_from(h, now);
                    return;
                }
                self.refuse(format!(
                    "the peer has seq {} beyond this primary's newest {} (and this node did \
                     not crash in sync mode: refusing to guess)",
                    h.last_seq.0, self.last_seq.0
                ));
                return;
            }
        }
        if self.reconcile.is_some() {
            self.finish_reconciling();
            tracing::info!(newest = %self.last_seq, "the peer holds nothing newer: writes resume");
        }
        self.start_streaming(h, full, now);
    }

    /// Hello accepted: resume the stream, or start the copy the peer needs.
    fn start_streaming(&mut self, h: Hello, full: bool, now: Instant) {
        if h.max_entry_bytes < MIN_PEER_ENTRY_BYTES {
            self.refuse(format!(
                "the peer's journal takes entries of at most {} bytes, and this primary's \
                 transactions need {} (its own limit: {}): re-create the peer with a journal \
                 of at least 16 MiB (`pairfs init --journal-size 16M`)",
                h.max_entry_bytes, MIN_PEER_ENTRY_BYTES, self.cfg.max_entry_bytes,
            ));
            return;
        }
        let (received, durable, inconsistent) = (h.last_seq, h.durable, h.inconsistent);
        self.out.push_back(Action::LimitEntries(
            h.max_entry_bytes.min(super::MAX_ENTRY_WIRE_BYTES),
        ));
        self.peer = Some(PeerView {
            hello: h,
            received,
            durable,
        });
        self.refused = None;
        self.last_progress = Some(now);
        let covered = self
            .retained
            .front()
            .map_or(received == self.last_seq, |e| e.prev_seq <= received);
        let plan = if full || self.persisted.full_copy || (inconsistent && self.crashed) {
            Some(CopyKind::Full)
        } else if !inconsistent && covered && self.persisted.backlog == Backlog::Journal {
            None
        } else {
            Some(self.copy_kind_for_peer())
        };
        self.crashed = false;
        match plan {
            None => {
                self.state = PairState::Pair;
                self.sent_upto = received;
                // Entries the peer already has durably.
                self.release_through(durable);
                let local = self.local_durable;
                let epoch = self.persisted.epoch;
                self.send(Message::Durable { epoch, seq: local });
                self.note_caught_up();
                self.pump();
            }
            Some(kind) => self.start_copy(kind),
        }
    }

    fn reconcile_from(&mut self, h: Hello, now: Instant) {
        let target = h.last_seq;
        tracing::warn!(
            ours = %self.last_seq,
            peer = %target,
            "the peer holds entries this node lost in its crash: taking them back"
        );
        if let Some(r) = &mut self.reconcile {
            r.target = Some(target);
            r.deadline = now + self.cfg.sync_timeout;
        }
        let (received, durable) = (h.last_seq, h.durable);
        self.peer = Some(PeerView {
            hello: h,
            received,
            durable,
        });
        let epoch = self.persisted.epoch;
        let after = self.last_seq;
        self.last_progress = Some(now);
        self.send(Message::Pull { epoch, after });
    }

    fn on_reconcile_entry(&mut self, e: WireEntry) {
        let Some(target) = self.reconcile.as_ref().and_then(|r| r.target) else {
            self.refuse("protocol violation: an entry for a primary that did not pull".into());
            return;
        };
        if e.seq <= self.last_seq || self.applying.is_some() {
            return; // a duplicate
        }
        if e.seq > target {
            self.refuse(format!(
                "protocol violation: entry {} beyond the {} the peer said it holds",
                e.seq, target
            ));
            return;
        }
        if e.prev_seq != self.last_seq {
            return; // one was lost on the way: pulled again on the timeout
        }
        self.applying = Some(e.seq);
        self.out.push_back(Action::Apply(e));
    }

    /// Reconciling: an entry taken back from the peer is applied (it is one of this node's
    /// entries again, to be released as usual once the peer has it durably).
    fn reconciled_entry(&mut self, e: EntryMeta, now: Instant) {
        self.last_seq = e.seq;
        self.last_progress = Some(now);
        self.retained.push_back(e);
        self.retained_bytes += e.journal_bytes;
        let timeout = self.cfg.sync_timeout;
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
        self.out.push_back(Action::SyncLocal);
    }

    /// Reconciling: everything taken back is durable here.
    fn reconciled(&mut self, now: Instant) {
        self.finish_reconciling();
        tracing::info!(seq = %self.last_seq, "reconciled with the peer: writes resume");
        // The peer is connected: stream from here (it has everything up to the target).
        if let Some(p) = self.peer.take() {
            self.start_streaming(p.hello, false, now);
        }
    }

    fn finish_reconciling(&mut self) {
        self.reconcile = None;
        self.state = PairState::Suspended;
        let sync = self.cfg.mode == Mode::Sync;
        if self.persisted.sync_mode != sync {
            self.persisted.sync_mode = sync;
            self.persist();
        }
    }

    /// Reconciling without the peer (unreachable for `sync_timeout`, or unable to send
    /// its entries back): continue in a new generation, so that whatever the peer holds
    /// beyond this node's newest seq shows as a divergence when it returns.
    fn give_up_reconciling(&mut self, why: &str) {
        if self.reconcile.is_none() {
            return;
        }
        let base = self.last_seq;
        self.persisted.generations.push(Generation {
            id: self.cfg.next_generation_id,
            base,
        });
        self.persist();
        self.finish_reconciling();
        tracing::warn!(
            base = %base,
            %why,
            "could not reconcile with the peer: writes resume in a new generation; entries \
             the peer may hold beyond this seq will show as a divergence, never overwritten"
        );
    }

    /// Which copy brings the connected peer back: the bitmap if it covers everything the
    /// peer lacks (the peer holds data and applied at least the bitmap's base), else all.
    fn copy_kind_for_peer(&self) -> CopyKind {
        let Some(p) = &self.peer else {
            return CopyKind::Full;
        };
        if self.persisted.full_copy {
            return CopyKind::Full;
        }
        match self.persisted.backlog {
            Backlog::Bitmap { base } if !p.hello.empty && p.durable >= base => CopyKind::Bitmap,
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
        let full = kind == CopyKind::Full;
        if !self.persisted.paired || (full && !self.persisted.full_copy) {
            // A full copy interrupted leaves any block of the peer in any state (copied
            // blocks are not journaled there): until one completes, every copy is full.
            self.persisted.paired = true;
            self.persisted.full_copy |= full;
            self.persist();
        }
        self.copy_ids += 1;
        let id = self.copy_ids;
        self.copy = Some(CopyState::Sending {
            base: self.last_seq,
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
        if std::mem::take(&mut self.copy_again) {
            // What changed while it was sent overflowed into the bitmap: send that too.
            self.start_copy(CopyKind::Bitmap);
            return;
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

    /// Primary: a local journal entry can be sent (durable, or in sync mode sealed).
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

    /// Primary: the local journal is durable up to `seq`.
    pub fn handle_local_durable(&mut self, seq: Seq, now: Instant) {
        match self.persisted.role {
            Role::Primary => {
                let target = self.reconcile.as_ref().and_then(|r| r.target);
                if target.is_some_and(|t| self.last_seq >= t && seq >= t) {
                    self.local_durable = self.local_durable.max(seq);
                    self.reconciled(now);
                    return;
                }
                if seq <= self.local_durable {
                    return;
                }
                self.local_durable = seq;
                if self.connected && self.state == PairState::Pair && self.peer.is_some() {
                    let epoch = self.persisted.epoch;
                    self.send(Message::Durable { epoch, seq });
                }
            }
            Role::Secondary => self.secondary_durable(seq),
        }
    }

    /// Primary, sync mode: a writer waited `sync_timeout` for the peer in vain; its entry
    /// `seq` (and everything after) is acknowledged without the peer until it catches up.
    pub fn handle_degraded(&mut self, seq: Seq, now_ns: u64) {
        if self.persisted.role != Role::Primary || self.persisted.degraded.is_some() {
            return;
        }
        self.persisted.degraded = Some(Degraded {
            since: seq,
            at_ns: now_ns,
        });
        self.persist();
        tracing::warn!(
            since = %seq,
            "sync replication degraded: the peer did not answer within the sync timeout; \
             writes from this seq on are acknowledged without it until it catches up"
        );
    }

    /// Degraded and the peer has everything again: sync mode waits for it again.
    fn note_caught_up(&mut self) {
        if self.persisted.degraded.is_none()
            || self.state != PairState::Pair
            || self.peer_received() < self.last_seq
        {
            return;
        }
        if let Some(d) = self.persisted.degraded.take() {
            tracing::info!(since = %d.since, upto = %self.last_seq, "the peer caught up: sync replication no longer degraded");
        }
        self.persist();
    }

    /// Primary: the driver could not read entry `seq` as it was (an in-place block was
    /// overwritten before it was sent and could not be saved aside, or it is larger than
    /// the peer takes): what the peer lacks goes through the difference bitmap instead.
    pub fn handle_entry_unavailable(&mut self, seq: Seq) {
        tracing::warn!(%seq, "entry can no longer be sent as written: resync by bitmap");
        self.enter_bitmap();
    }

    /// The backlog outgrew the journal limit: keep it as a bitmap instead.
    fn enter_bitmap(&mut self) {
        let base = match self.persisted.backlog {
            Backlog::Bitmap { base } => base,
            Backlog::Journal => self.peer_durable_or_released(),
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
            // What the peer still needs is only in the bitmap now. A copy being sent goes
            // on (restarting it would never end while writes outrun the link): once its
            // blocks are sent, a bitmap copy of what changed meanwhile follows, the peer
            // staying mid-copy. A copy whose blocks are all sent is followed by one now; a
            // stream becomes a copy.
            match self.copy {
                Some(CopyState::Sending { .. }) => self.copy_again = true,
                Some(CopyState::Finishing { .. }) => self.start_copy(CopyKind::Bitmap),
                None => {
                    let kind = self.copy_kind_for_peer();
                    self.start_copy(kind);
                }
            }
        }
    }

    /// The newest seq the peer is known to have durably: entries are released exactly when
    /// the peer acknowledges them durable, so everything before the oldest retained entry.
    fn peer_durable_or_released(&self) -> Seq {
        let released = self.retained.front().map_or(self.last_seq, |e| e.prev_seq);
        released.max(self.peer.as_ref().map_or(Seq::NONE, |p| p.durable))
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

    fn on_ack(&mut self, received: Seq, durable: Seq, now: Instant) {
        if let Some(r) = &mut self.reconcile {
            // The peer applied one more entry it had been sent before this node crashed:
            // take that one back too.
            if let Some(t) = &mut r.target {
                *t = (*t).max(received);
            }
            return;
        }
        let Some(p) = self.peer.as_mut() else { return };
        if received > self.last_seq || durable > received {
            let (r, d, l) = (received.0, durable.0, self.last_seq.0);
            self.refuse(format!(
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
            let backlog = self.unacked().next().is_some();
            self.busy_since = backlog.then_some(now);
        }
        self.release_through(durable);
        self.in_flight = self
            .retained
            .iter()
            .filter(|e| e.seq > received && e.seq <= self.sent_upto)
            .map(|e| e.bytes)
            .sum();
        self.out.push_back(Action::Acked { received, durable });
        if let Some(CopyState::Finishing { consistent_at }) = self.copy {
            if durable >= consistent_at {
                self.copy = None;
                self.copy_progress = None;
                self.state = PairState::Pair;
                // The peer holds everything the bitmap marks, durably.
                self.out.push_back(Action::ClearBitmap);
                if matches!(self.persisted.backlog, Backlog::Bitmap { .. })
                    || self.persisted.full_copy
                {
                    self.persisted.backlog = Backlog::Journal;
                    self.persisted.full_copy = false;
                    self.persist();
                }
                tracing::info!(seq = %durable, "copy complete: the pair is in sync");
            }
        }
        self.note_caught_up();
        self.pump();
    }

    /// Sends retained entries in order while the window allows.
    fn pump(&mut self) {
        if !self.connected || self.peer.is_none() || self.reconcile.is_some() {
            return;
        }
        if matches!(self.copy, Some(CopyState::Sending { .. })) {
            return;
        }
        let window = self.cfg.window_bytes;
        let limit = self.peer.as_ref().map_or(0, |p| p.hello.max_entry_bytes);
        let mut to_send = Vec::new();
        for e in &self.retained {
            if e.seq <= self.sent_upto {
                continue;
            }
            if e.bytes > limit {
                // Sealed before the peer said what it takes: it goes by bitmap instead.
                let seq = e.seq;
                tracing::warn!(%seq, bytes = e.bytes, limit, "entry larger than the peer's journal takes");
                self.handle_entry_unavailable(seq);
                return;
            }
            if self.in_flight > 0 && self.in_flight + e.bytes > window {
                break;
            }
            self.in_flight += e.bytes;
            to_send.push(*e);
        }
        self.send_verifies(); // those whose entry went out before
        for e in to_send {
            self.sent_upto = e.seq;
            self.out.push_back(Action::SendEntry(e));
            // Right behind their entry, before the next: the peer compares in that state.
            self.send_verifies();
        }
    }

    /// Sends the verify requests whose entry has been sent.
    fn send_verifies(&mut self) {
        while self
            .verifies
            .front()
            .is_some_and(|(_, at, _)| *at <= self.sent_upto)
        {
            if let Some((id, at, blocks)) = self.verifies.pop_front() {
                let epoch = self.persisted.epoch;
                self.verifies_out.insert(id);
                self.send(Message::Verify {
                    epoch,
                    id,
                    at,
                    blocks,
                });
            }
        }
    }

    /// Primary, online verify (docs/PROTOCOL.md §5.5): compare `blocks` — their
    /// checksums in this node's state after `at`, which the caller sealed so that no entry
    /// after it has been handed in yet — with the peer's. The answer comes as
    /// [`Action::VerifyAnswer`]; at once if the pair is not streaming.
    pub fn handle_verify_request(&mut self, id: u64, at: Seq, blocks: Vec<(u64, u32)>) {
        let streaming = self.persisted.role == Role::Primary
            && self.connected
            && self.peer.is_some()
            && self.state == PairState::Pair;
        if !streaming || at < self.last_seq {
            self.out
                .push_back(Action::VerifyAnswer { id, differ: None });
            return;
        }
        self.verifies.push_back((id, at, blocks));
        self.send_verifies();
    }

    /// Secondary: the driver compared request `id`.
    pub fn handle_verify_done(&mut self, id: u64, differ: Vec<u64>) {
        let epoch = self.persisted.epoch;
        self.send(Message::Verified {
            epoch,
            id,
            differ: Some(differ),
        });
    }

    fn on_verify(&mut self, id: u64, at: Seq, blocks: Vec<(u64, u32)>) {
        let consistent = self.persisted.inconsistent_until.is_none() && !self.persisted.empty;
        if !consistent || at < self.received || self.verify_wait.len() >= MAX_VERIFY_WAIT {
            self.send(Message::Verified {
                epoch: self.persisted.epoch,
                id,
                differ: None,
            });
            return;
        }
        self.verify_wait.push_back((id, at, blocks));
        self.verify_waiting();
    }

    /// Compares the verify requests for the state this node is in; refuses those it has
    /// passed.
    fn verify_waiting(&mut self) {
        if self.applying.is_some() {
            return;
        }
        // (A copy since the request: the state is not a prefix's.)
        let consistent = self.persisted.inconsistent_until.is_none() && !self.persisted.empty;
        while let Some((id, at, _)) = self.verify_wait.front() {
            let (id, at) = (*id, *at);
            if at > self.received && consistent {
                return;
            }
            let Some((_, _, blocks)) = self.verify_wait.pop_front() else {
                return;
            };
            if at == self.received && consistent {
                self.out.push_back(Action::VerifyBlocks { id, blocks });
            } else {
                let epoch = self.persisted.epoch;
                self.send(Message::Verified {
                    epoch,
                    id,
                    differ: None,
                });
            }
        }
    }

    /// Time passed: resend what was not acknowledged in time; pull again what a
    /// reconciliation did not get; give up reconciling.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(r) = &self.reconcile {
            if now < r.deadline && r.target.is_some() && self.connected && self.applying.is_none() {
                let stalled = self
                    .last_progress
                    .is_none_or(|t| now.duration_since(t) >= self.cfg.resend_after);
                if stalled {
                    self.last_progress = Some(now);
                    let (epoch, after) = (self.persisted.epoch, self.last_seq);
                    self.send(Message::Pull { epoch, after });
                }
                return;
            }
        }
        if self.reconcile.as_ref().is_some_and(|r| now >= r.deadline) {
            self.give_up_reconciling("the peer was unreachable for the sync timeout");
            if self.connected {
                // The peer's hello came before the new generation: say hello again.
                self.out
                    .push_back(Action::Disconnect("reconciliation gave up".into()));
                self.handle_disconnected();
            }
            return;
        }
        if self.persisted.role != Role::Primary || !self.connected || self.peer.is_none() {
            return;
        }
        let received = self.peer_received();
        if self.sent_upto > received
            && self
                .last_progress
                .is_some_and(|t| now.duration_since(t) >= self.cfg.resend_after)
        {
            tracing::debug!(from = %received, upto = %self.sent_upto, "no acknowledgement: resending");
            self.sent_upto = received;
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
            if let Err(why) = lineage_follows(ours, self.received, &h.generations) {
                self.refuse(format!(
                    "the nodes' data diverged: {why}; nothing is overwritten automatically"
                ));
                return;
            }
        }
        if h.max_entry_bytes == 0 {
            self.refuse("protocol violation: the primary takes no entries".into());
            return;
        }
        if h.epoch > self.persisted.epoch || h.generations != self.persisted.generations {
            // Adopted only up to where this node's data follows: a primary that is behind
            // (reconciling) keeps the lineage this node already has.
            self.persisted.epoch = h.epoch;
            self.persisted.generations = h.generations.clone();
            self.persist();
        }
        if self.persisted.empty && h.volume != self.cfg.volume {
            self.cfg.volume = h.volume;
            self.out.push_back(Action::AdoptVolume(h.volume));
        }
        let (received, durable) = (self.received, self.durable);
        self.peer = Some(PeerView {
            hello: h,
            received,
            durable,
        });
        self.refused = None;
        self.state = if self.persisted.inconsistent_until.is_some() || self.persisted.empty {
            PairState::Copying
        } else {
            PairState::Pair
        };
    }

    fn ack(&mut self) {
        if !self.connected || self.peer.is_none() {
            return;
        }
        let epoch = self.persisted.epoch;
        let (received, durable) = (self.received, self.durable);
        self.send(Message::Ack {
            epoch,
            received,
            durable,
        });
    }

    fn on_entry(&mut self, e: WireEntry) {
        if self.persisted.inconsistent_until == Some(Seq::NONE) {
            // Entries come only after the copy ended; these belong to an older stream.
            return;
        }
        if e.seq <= self.received || self.applying.is_some_and(|s| e.seq <= s) {
            if self.applying.is_none() {
                self.ack(); // a duplicate: the primary may have missed our ack
            }
            return;
        }
        if e.prev_seq == self.received && self.applying.is_none() {
            self.applying = Some(e.seq);
            self.out.push_back(Action::Apply(e));
            return;
        }
        let bytes = e.data_bytes();
        let room = self.ooo.len() < MAX_OUT_OF_ORDER_ENTRIES || self.ooo.contains_key(&e.prev_seq);
        if room && self.ooo_bytes + bytes <= self.cfg.max_out_of_order_bytes {
            self.ooo_bytes += bytes;
            if let Some(old) = self.ooo.insert(e.prev_seq, e) {
                self.ooo_bytes -= old.data_bytes();
            }
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
            self.ooo_bytes = 0;
        }
        self.out.push_back(Action::ApplyCopy(blocks));
    }

    fn on_copy_end(&mut self, base: Seq, consistent_at: Seq) {
        self.persisted.inconsistent_until = Some(consistent_at.max(base));
        self.persisted.empty = false;
        self.persist();
        self.ooo.clear();
        self.ooo_bytes = 0;
        // Consistent once durable: ask for the sync now rather than a commit interval later.
        self.flush_wanted = self.flush_wanted.max(consistent_at.max(base));
        self.copy_end = Some(base);
        if self.applying.is_none() {
            self.record_copy_end();
        }
    }

    /// The copy ended at `base` (and no apply is outstanding): record that the volume now
    /// holds everything up to it.
    fn record_copy_end(&mut self) {
        let Some(base) = self.copy_end.take() else {
            return;
        };
        if base > self.received {
            self.applying = Some(base);
            self.out.push_back(Action::Apply(WireEntry {
                seq: base,
                prev_seq: self.received,
                timestamp_ns: 0,
                blocks: Vec::new(),
                frees: false,
            }));
        } else {
            self.after_apply();
        }
    }

    fn on_flush(&mut self, upto: Seq) {
        self.flush_wanted = self.flush_wanted.max(upto);
        self.maybe_sync();
    }

    /// Asks for a local sync when the primary wants entries durable that are applied here.
    fn maybe_sync(&mut self) {
        if !self.syncing && self.durable < self.flush_wanted.min(self.received) {
            self.syncing = true;
            self.out.push_back(Action::SyncLocal);
        }
    }

    fn on_pull(&mut self, after: Seq) {
        if self.applying.is_some() {
            // An entry sent before the primary crashed is being applied: once it is, send
            // it back too.
            self.pull = Some(after);
            return;
        }
        if after >= self.received {
            return;
        }
        self.out.push_back(Action::SendOwnEntries {
            after,
            upto: self.received,
        });
    }

    /// Secondary: the driver could not send back an entry a reconciling primary asked for.
    pub fn handle_pull_failed(&mut self, why: &str) {
        self.refuse(format!(
            "cannot send back the entries the primary lost: {why}"
        ));
    }

    /// The driver applied the entry `e` describes (visible, in the journal, not yet
    /// durable).
    pub fn handle_applied(&mut self, e: EntryMeta, now: Instant) {
        if self.applying != Some(e.seq) {
            return;
        }
        self.applying = None;
        self.apply_error = None;
        if self.persisted.role == Role::Primary {
            // Reconciling: one of this node's own entries, taken back.
            self.reconciled_entry(e, now);
            return;
        }
        self.received = e.seq;
        if let Some(after) = self.pull.take() {
            self.ack();
            self.on_pull(after);
            return;
        }
        if self.copy_end.is_some() {
            // An apply handed out before the copy ended: now record its end.
            self.record_copy_end();
            return;
        }
        self.after_apply();
    }

    /// The driver failed to make what it applied durable ([`Action::SyncLocal`]): reported,
    /// and the stream restarts once the volume is usable again.
    pub fn handle_sync_failed(&mut self, error: &str) {
        self.syncing = false;
        self.apply_error = Some(format!("sync: {error}"));
        tracing::error!(%error, "making replicated entries durable failed");
        if self.connected {
            self.out
                .push_back(Action::Disconnect("local sync failed".into()));
            self.handle_disconnected();
        }
    }

    /// The driver reopened the volume (after an I/O error poisoned it): recovery left it at
    /// `durable`; the stream starts again from there with the next connection.
    pub fn handle_volume_reopened(&mut self, durable: Seq) {
        self.applying = None;
        self.syncing = false;
        self.ooo.clear();
        self.ooo_bytes = 0;
        if self.persisted.role == Role::Secondary {
            self.received = durable;
            self.durable = durable;
        }
        self.local_durable = durable;
        tracing::info!(seq = %durable, "volume reopened");
    }

    /// The driver failed to apply entry `seq` (`None`: copy blocks): reported, and the
    /// connection is dropped so that the stream starts again from what this node has (the
    /// driver reopens the volume first if the failure poisoned it).
    pub fn handle_apply_failed(&mut self, seq: Option<Seq>, error: &str) {
        match seq {
            Some(s) if self.applying != Some(s) => return,
            Some(_) => self.applying = None,
            None => {}
        }
        let what = seq.map_or("copy blocks".to_string(), |s| format!("seq {s}"));
        self.apply_error = Some(format!("{what}: {error}"));
        tracing::error!(%what, %error, "applying replicated data failed; the stream restarts");
        if self.connected {
            self.out
                .push_back(Action::Disconnect(format!("applying {what} failed")));
            self.handle_disconnected();
        }
    }

    fn after_apply(&mut self) {
        self.ack();
        self.maybe_sync();
        self.verify_waiting();
        if self.persisted.inconsistent_until == Some(Seq::NONE) {
            return; // copy data is arriving: entries resume after the copy's end
        }
        // Anything buffered that now follows?
        while let Some(e) = self.ooo.remove(&self.received) {
            self.ooo_bytes -= e.data_bytes();
            if e.seq > self.received {
                self.applying = Some(e.seq);
                self.out.push_back(Action::Apply(e));
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

    /// Secondary: the local journal is durable up to `seq` (a group commit, or the sync
    /// [`Action::SyncLocal`] asked for).
    fn secondary_durable(&mut self, seq: Seq) {
        self.syncing = false;
        let before = self.durable;
        self.durable = self.durable.max(seq.min(self.received));
        if let Some(until) = self.persisted.inconsistent_until {
            // `until` is a seq the primary wrote after the copy's blocks (PROTOCOL.md §5.2):
            // durable here, it proves they are too.
            if until != Seq::NONE && self.copy_end.is_none() && self.durable >= until {
                self.persisted.inconsistent_until = None;
                self.persist();
                self.state = PairState::Pair;
                tracing::info!(seq = %self.durable, "replica consistent again");
            }
        }
        if self.durable > before {
            self.ack();
        }
        self.maybe_sync();
    }

    /// A snapshot for `pairfs status`.
    pub fn status(&self) -> Status {
        let primary = self.persisted.role == Role::Primary;
        let unacked: Vec<&EntryMeta> = self.unacked().collect();
        let peer = |f: fn(&PeerView) -> Seq| self.peer.as_ref().map_or(Seq::NONE, f);
        Status {
            role: self.persisted.role,
            state: self.state,
            epoch: self.persisted.epoch,
            connected: self.connected && self.peer.is_some(),
            last_seq: if primary {
                self.last_seq
            } else {
                self.received
            },
            sent: self.sent_upto,
            received: if primary {
                peer(|p| p.received)
            } else {
                self.received
            },
            durable: if primary {
                peer(|p| p.durable)
            } else {
                self.durable
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
            degraded: self.persisted.degraded,
            apply_error: self.apply_error.clone(),
            refused: self.refused.clone(),
        }
    }
}

/// Whether data of lineage `theirs`, holding seqs up to `newest`, follows lineage `ours`
/// (is a prefix of it, and holds nothing beyond where `ours` branched off).
fn lineage_follows(theirs: &[Generation], newest: Seq, ours: &[Generation]) -> Result<(), String> {
    let prefix = theirs.len() <= ours.len() && theirs.iter().zip(ours).all(|(a, b)| a.id == b.id);
    if !prefix {
        return Err("the generation histories differ".into());
    }
    if let Some(next) = ours.get(theirs.len()) {
        if theirs.is_empty() {
            return Ok(()); // never had a lineage: a blank node
        }
        if newest > next.base {
            return Err(format!(
                "the node behind holds seqs {}..={} of a generation the other left at seq {}",
                next.base.0 + 1,
                newest.0,
                next.base.0
            ));
        }
    }
    Ok(())
}

fn message_name(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "Hello",
        Message::Entry { .. } => "Entry",
        Message::CopyBlocks { .. } => "CopyBlocks",
        Message::CopyEnd { .. } => "CopyEnd",
        Message::Ack { .. } => "Ack",
        Message::Durable { .. } => "Durable",
        Message::Flush { .. } => "Flush",
        Message::Pull { .. } => "Pull",
        Message::Verify { .. } => "Verify",
        Message::Verified { .. } => "Verified",
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
