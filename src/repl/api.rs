//! What a driver exchanges with a [`Replicator`]: its settings ([`ReplConfig`]), the
//! [`Action`]s it carries out, what it reports ([`EntryMeta`]), what it reads
//! ([`Status`], [`Backpressure`]).

use std::time::Duration;

#[cfg(doc)]
use super::Replicator;
use super::{
    Backlog, Degraded, Epoch, Message, Mode, PairState, PersistedState, Role, WireBlock, WireEntry,
};
use crate::types::{Seq, VolumeId};

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
    /// Frozen primary (docs/PROTOCOL.md §7.3): the peer lacks entries after `after` that can
    /// no longer all be sent as they were written. Send one entry instead, seq `upto` (the
    /// freeze point) following `after`, whose blocks are every block the retained entries
    /// after `after` write (with `bitmap`, and every block marked in the difference
    /// bitmap), each as this node holds it now — its state at `upto` (a node taking over
    /// again reads its journal and normal area, never its local-unreflected area). Applied
    /// atomically, it takes the peer from the state after `after` to the state at `upto`.
    /// If its blocks exceed `max_bytes` (what the peer's journal takes), call
    /// [`super::Replicator::handle_catch_up_failed`] instead.
    SendCatchUp {
        /// The peer's newest seq of this lineage.
        after: Seq,
        /// The freeze point.
        upto: Seq,
        /// The difference bitmap's blocks too.
        bitmap: bool,
        /// The largest entry the peer takes (bytes of block data).
        max_bytes: u64,
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
    /// entries back from its peer, before it writes; a sync-mode primary whose entries sent
    /// and not durable here reached half the peer's journal, before it sends more).
    SyncLocal,
    /// Journal entries up to this seq are no longer needed by the peer (primary: the peer
    /// has them durably; secondary: the primary has them durably).
    Release(Seq),
    /// Primary: mark the blocks of every retained entry up to this seq in the difference
    /// bitmap, persist the bitmap, then release those entries.
    MarkBitmap(Seq),
    /// Primary, a peer rejoining after a divergence (docs/PROTOCOL.md §7.8): as
    /// [`Action::MarkBitmap`]`(upto)`, but only the blocks of retained entries after
    /// `after` are marked (those up to it are the lineage both nodes share).
    MarkBitmapAfter {
        /// The branch point.
        after: Seq,
        /// Release every retained entry up to this seq.
        upto: Seq,
    },
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
    /// Close the connection with a reason (refused peer, protocol violation, a role
    /// change).
    Disconnect {
        /// Why, for the log and the peer.
        reason: String,
        /// The peer should reconnect at once (the roles changed here), without its backoff.
        role_change: bool,
    },
    /// Primary: send [`super::Message::Headers`] for these entries (the driver reads their
    /// block numbers from the journal; docs/PROTOCOL.md §7.2).
    SendHeaders(Vec<EntryMeta>),
    /// Primary, asked to hand over (docs/PROTOCOL.md §7.3): refuse writes from the next
    /// transaction on, seal and make everything durable, hand in the last entries, then
    /// call [`super::Replicator::handle_frozen`] with `id`.
    Freeze {
        /// The request.
        id: u64,
    },
    /// Secondary: the old primary froze at `freeze` and this node takes over. In this
    /// order: write the takeover table (the headers of `index`: the entries not applied
    /// here) durably,
    /// then `state`, then start the volume's takeover and make the filesystem writable;
    /// then call [`super::Replicator::handle_taken_over`] (or report the failure with
    /// [`super::Replicator::handle_takeover_failed`]).
    BeginTakeover {
        /// The request.
        id: u64,
        /// The freeze point.
        freeze: Seq,
        /// The headers of the old primary's entries after this node's newest seq, indexed
        /// as they arrived (the table is written from them, and the volume's takeover
        /// starts from this index: nothing proportional to the backlog is rebuilt at
        /// ready).
        index: crate::takeover::RemoteIndex,
        /// The pair state to persist (role change under way).
        state: PersistedState,
    },
    /// Taker: the old primary's entries are all applied: merge the local-unreflected area
    /// into the journal (writes go on), then call [`super::Replicator::handle_merged`].
    Merge,
    /// The role changed here (a taker became primary, a source secondary): the driver
    /// adapts the filesystem (a primary writes, a secondary follows the stream).
    RoleChanged(Role),
    /// This primary met a primary that took over by force while it was away (§7.8): it
    /// steps down (the actions that follow); its entries after `base`, up to `newest`, are
    /// a tail the new primary does not have. The driver records it durably (for `pairfs
    /// rejoin`) before anything else.
    Fenced {
        /// The branch point of the new primary's generation.
        base: Seq,
        /// This node's newest durable seq.
        newest: Seq,
    },
    /// Primary: mark these blocks in the difference bitmap and persist it (the tail of a
    /// node rejoining after a divergence, before the bitmap copy that follows).
    MarkBlocks(Vec<crate::types::BlockNo>),
}

/// What a forced takeover cannot have (docs/PROTOCOL.md §7.7), from
/// [`Replicator::force_plan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForcePlan {
    /// The newest seq of the old lineage this node holds (applied): the new generation
    /// branches off there.
    pub base: Seq,
    /// Headers of the old primary's entries after `base` that this node received and never
    /// applied, in seq order (a taker's come from its volume's table instead).
    pub lost: Vec<crate::takeover::EntryHeader>,
    /// The headers may not name every entry: the backlog outgrew them, or this node was
    /// restarted since it last heard the primary.
    pub partial: bool,
    /// This node was taking over from the old primary frozen at this seq, with the drain
    /// cut short: its local-unreflected entries follow seqs it will never have.
    pub cut_short: Option<Seq>,
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
    /// A role change under way here (docs/PROTOCOL.md §7).
    pub takeover: Option<super::Takeover>,
    /// Secondary: the newest seq whose header arrived (entries up to it that are not
    /// applied are what a forced takeover would report lost).
    pub headers_seq: Seq,
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
