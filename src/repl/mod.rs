//! Replication of a volume to a peer node (docs/DESIGN.md §4, docs/PROTOCOL.md).
//!
//! Sans-IO (docs/DESIGN.md §10.1, after `quinn-proto`): [`Replicator`] is a state machine
//! that takes events — a connection came up or went down, a message arrived, a local
//! journal entry became durable, the driver finished applying something, time passed — and hands out
//! [`Action`]s: messages to send, entries to read and send, entries to apply, journal space
//! to release, state to persist. It never touches a socket, a file or the clock. The QUIC
//! transport and the daemon drive it; the deterministic simulation in `tests/repl_sim.rs`
//! drives two of them through drops, duplicates, reordering, partitions and crashes.

mod api;
mod primary;
mod replicator;
mod secondary;

use serde::{Deserialize, Serialize};

pub use api::{
    Action, Backpressure, CopyKind, DEFAULT_MAX_LAG, DEFAULT_SYNC_TIMEOUT, EntryMeta, ForcePlan,
    ReplConfig, Status,
};
pub use primary::MIN_PEER_ENTRY_BYTES;
pub use replicator::Replicator;

use crate::types::{Seq, VolumeId};

/// Protocol version spoken by this build (docs/PROTOCOL.md title). Version 2: two
/// acknowledgements (received, durable), flush and reconciliation (issue 9). Version 3:
/// headers ahead of data, planned takeover (issue 10, docs/PROTOCOL.md §7). Version 4: a
/// node rejoining after a divergence names the blocks of its tail in its hello (§7.8).
/// Version 5: failback while a drain is still running (§7.6: a node taking over from a
/// taker, the taker's headers and freeze).
pub const PROTOCOL_VERSION: u32 = 5;

/// Largest journal entry a primary sends, in bytes of block data (docs/PROTOCOL.md §4):
/// with a peer, the open entry is sealed before its blocks would exceed it, so one entry
/// is one message. 32 MiB: a normal-area sync per 32 MiB of bulk data costs little, and the
/// peer buffers one such message at a time. A peer whose journal takes less says so in its
/// hello, and the primary seals at that size instead.
pub const MAX_ENTRY_WIRE_BYTES: u64 = 32 << 20;

/// Largest frame on the wire: an entry of [`MAX_ENTRY_WIRE_BYTES`] plus its block numbers
/// and the encoding's lengths (17 bytes a block: 1/240 of the data at 4 KiB), with room.
pub const MAX_FRAME: u32 = (MAX_ENTRY_WIRE_BYTES + (MAX_ENTRY_WIRE_BYTES >> 3)) as u32;

/// Increases whenever the primary role moves; every message carries the sender's.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Epoch(pub u64);

/// What a node is in its pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Writes, and streams its journal to the peer.
    Primary,
    /// Applies the primary's entries in order; its mount is read-only.
    Secondary,
}

/// When a write is acknowledged to the application (README §Durability).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// After the local journal commit; entries are sent once durable locally (DRBD
    /// protocol A).
    Async,
    /// Once the entry is written — in order, not necessarily synced — on both nodes;
    /// `fsync` makes it durable on both (DRBD protocol C).
    Sync,
}

/// The state of the pair (docs/PROTOCOL.md §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PairState {
    /// No peer, or never paired.
    Simplex,
    /// Initial copy or bitmap resync in progress: the secondary is inconsistent.
    Copying,
    /// Entries stream in order; the secondary is consistent at every instant.
    Pair,
    /// The link is down: the primary retains entries, then marks a bitmap.
    Suspended,
    /// Primary, after an unclean restart in sync mode: its peer may hold entries it lost,
    /// so it writes nothing until it has taken them back (or given up: a new generation).
    Reconciling,
}

impl std::fmt::Display for PairState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PairState::Simplex => "simplex",
            PairState::Copying => "copying",
            PairState::Pair => "pair",
            PairState::Suspended => "suspended",
            PairState::Reconciling => "reconciling",
        })
    }
}

/// One lineage of a node's data: a random id, and where it branched off the previous one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Generation {
    /// Random identifier.
    pub id: u64,
    /// The newest seq of the previous generation this one continues from (`Seq::NONE` for
    /// the first): a node of the previous generation that holds a seq beyond it holds
    /// changes this lineage does not have — the two diverged.
    pub base: Seq,
}

/// Sync mode: the pair acknowledged writes without the peer (docs/PROTOCOL.md §5.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Degraded {
    /// The first seq acknowledged without the peer having it.
    pub since: Seq,
    /// When (host clock, ns since the Unix epoch).
    pub at_ns: u64,
}

/// How the primary keeps what the secondary has not applied yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Backlog {
    /// Retained journal entries (the normal case).
    Journal,
    /// The difference bitmap: every block changed after `base` (the peer's applied seq
    /// when the journal limit was reached) is marked.
    Bitmap {
        /// Peer's applied seq from which the bitmap covers the changes.
        base: Seq,
    },
}

/// What a node persists about its pair (the pair state file), written durably whenever an
/// [`Action::Persist`] asks for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedState {
    /// This node's role.
    pub role: Role,
    /// Current epoch.
    pub epoch: Epoch,
    /// Lineages, oldest first.
    pub generations: Vec<Generation>,
    /// Primary: how the backlog is kept.
    pub backlog: Backlog,
    /// Secondary: a copy or resync is incomplete; consistent again once applied ≥ this seq
    /// after the copy ended (`Some(Seq::NONE)` while the copy is still running).
    pub inconsistent_until: Option<Seq>,
    /// Secondary: the volume has never been filled from a primary.
    pub empty: bool,
    /// Primary: a peer has been paired at least once (so entries are kept for it).
    pub paired: bool,
    /// Primary: the pair ran in sync mode, where entries reach the peer before they are
    /// durable here — after an unclean restart the peer may be ahead (reconcile first).
    pub sync_mode: bool,
    /// Primary, sync mode: writes were acknowledged without the peer since then.
    pub degraded: Option<Degraded>,
    /// Primary: a full copy started and has not completed: the next copy sends every block
    /// too, however often it is interrupted (the peer's blocks may be in any state).
    pub full_copy: bool,
    /// A role change under way (docs/PROTOCOL.md §7); the last field, so that a version 2
    /// file reads as this one with `None` (FORMAT.md §5.3).
    pub takeover: Option<Takeover>,
}

/// A role change under way (docs/PROTOCOL.md §7.3–7.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Takeover {
    /// An old primary frozen at `freeze`: it refuses writes, drains its entries up to it
    /// to the taker and serves its fetches, then becomes secondary.
    Source {
        /// Its newest seq when it froze.
        freeze: Seq,
    },
    /// A new primary while the old one's entries up to `freeze` drain and its own writes
    /// (in the local-unreflected area) wait to be merged.
    Taker {
        /// The old primary's newest seq.
        freeze: Seq,
    },
    /// Failback while the peer still drains (docs/PROTOCOL.md §7.6): a frozen old primary
    /// that takes over again from the taker frozen at `freeze`. It still streams its
    /// entries up to `source` to the peer and serves the peer's fetches of them, while its
    /// own writes go to its local-unreflected area; once the peer has merged and is a
    /// frozen source at `freeze`, this node becomes `Taker { freeze }`.
    Retaker {
        /// Its own freeze point, what the peer still drains.
        source: Seq,
        /// The peer's newest seq when it froze.
        freeze: Seq,
    },
    /// A taker frozen by a failback before its drain and merge completed: it refuses
    /// writes, still applies the old primary's entries up to `drain`, merges its
    /// local-unreflected entries up to `freeze`, and then becomes `Source { freeze }`.
    FrozenTaker {
        /// The old primary's freeze point, what this node still drains.
        drain: Seq,
        /// Its newest seq when it froze.
        freeze: Seq,
    },
}

impl Takeover {
    /// A secondary taking over (a taker, frozen or not): the old primary's freeze point,
    /// up to which it drains; its own entries follow it.
    pub fn drain_point(&self) -> Option<Seq> {
        match *self {
            Takeover::Taker { freeze } | Takeover::FrozenTaker { drain: freeze, .. } => {
                Some(freeze)
            }
            Takeover::Source { .. } | Takeover::Retaker { .. } => None,
        }
    }
}

impl PersistedState {
    /// A new primary with a first generation.
    pub fn new_primary(generation_id: u64) -> Self {
        PersistedState {
            role: Role::Primary,
            epoch: Epoch(1),
            generations: vec![Generation {
                id: generation_id,
                base: Seq::NONE,
            }],
            backlog: Backlog::Journal,
            inconsistent_until: None,
            empty: false,
            paired: false,
            sync_mode: false,
            degraded: None,
            full_copy: false,
            takeover: None,
        }
    }

    /// A new, empty secondary.
    pub fn new_secondary() -> Self {
        PersistedState {
            role: Role::Secondary,
            epoch: Epoch(0),
            generations: Vec::new(),
            backlog: Backlog::Journal,
            inconsistent_until: None,
            empty: true,
            paired: false,
            sync_mode: false,
            degraded: None,
            full_copy: false,
            takeover: None,
        }
    }
}

/// The first message on a connection, in both directions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version.
    pub proto: u32,
    /// Sender's node name.
    pub node: String,
    /// Volume id (a new secondary sends the nil id).
    pub volume: VolumeId,
    /// Block size.
    pub block_size: u32,
    /// Blocks of the normal area.
    pub blocks: u64,
    /// Sender's role.
    pub role: Role,
    /// Sender's epoch.
    pub epoch: Epoch,
    /// Sender's lineages.
    pub generations: Vec<Generation>,
    /// Newest seq in the sender's journal (a secondary: the newest it received).
    pub last_seq: Seq,
    /// Newest seq durable in the sender's journal.
    pub durable: Seq,
    /// Secondary: its volume is mid-copy and not consistent.
    pub inconsistent: bool,
    /// Secondary: never filled from a primary.
    pub empty: bool,
    /// Largest entry (bytes of block data) the sender's journal takes: a primary seals its
    /// entries at the smaller of this and its own limit.
    pub max_entry_bytes: u64,
    /// The sender's role change under way, if any (a frozen old primary says so: a new
    /// primary then waits for it to step down instead of refusing two primaries).
    pub takeover: Option<Takeover>,
    /// Secondary rejoining after a divergence (`pairfs rejoin`, docs/PROTOCOL.md §7.8): the
    /// blocks its own tail wrote, which the primary resyncs along with the blocks it
    /// changed since; the sender's lineage is then not checked (it is to be overwritten).
    pub rejoin: Option<Vec<crate::types::BlockNo>>,
}

/// One journal entry on the wire, with the content of every block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    /// Its seq.
    pub seq: Seq,
    /// Seq of the entry before it.
    pub prev_seq: Seq,
    /// Host time of the entry.
    pub timestamp_ns: u64,
    /// `(block, content)` pairs.
    pub blocks: Vec<WireBlock>,
    /// A transaction in the entry freed blocks: a replica makes it durable before it
    /// writes a *fresh* block of a later entry in place (that block may be one it freed).
    pub frees: bool,
}

/// One block of an entry or of a copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireBlock {
    /// Block number.
    pub block: u64,
    /// Content (one block).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// The block was free before this entry (a replica may write it in place before the
    /// entry is applied: no visible state changes until then).
    pub fresh: bool,
}

/// Messages between two nodes (docs/PROTOCOL.md §4). Every one carries the sender's epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Identity and progress, first on a connection.
    Hello(Hello),
    /// A journal entry (primary → secondary).
    Entry {
        /// Sender's epoch.
        epoch: Epoch,
        /// The entry.
        entry: WireEntry,
    },
    /// Copy or resync data (primary → secondary).
    CopyBlocks {
        /// Sender's epoch.
        epoch: Epoch,
        /// The blocks.
        blocks: Vec<WireBlock>,
    },
    /// The copy is complete: entries after `base` follow; the secondary is consistent once
    /// it has applied `consistent_at`.
    CopyEnd {
        /// Sender's epoch.
        epoch: Epoch,
        /// Seq the entries that follow continue from.
        base: Seq,
        /// Seq from which the secondary is consistent.
        consistent_at: Seq,
    },
    /// Progress of the secondary (secondary → primary).
    Ack {
        /// Sender's epoch.
        epoch: Epoch,
        /// Newest seq received: written to its journal, applied, not necessarily synced
        /// (releases sync-mode writers).
        received: Seq,
        /// Newest seq durable in its journal (releases the primary's journal space).
        durable: Seq,
    },
    /// The primary's own journal is durable up to `seq` (primary → secondary): the
    /// secondary may release its copies of entries up to it; newer ones it keeps, since a
    /// crashed primary takes them back from it (sync mode).
    Durable {
        /// Sender's epoch.
        epoch: Epoch,
        /// Newest seq durable on the primary.
        seq: Seq,
    },
    /// Make every entry up to `upto` durable and acknowledge (an `fsync` on the primary).
    Flush {
        /// Sender's epoch.
        epoch: Epoch,
        /// Seq to make durable.
        upto: Seq,
    },
    /// Reconciliation (primary → secondary): send back the entries after `after` (the
    /// primary's newest), which the primary lost in a crash.
    Pull {
        /// Sender's epoch.
        epoch: Epoch,
        /// The newest seq the primary has.
        after: Seq,
    },
    /// Online verify (primary → secondary, on the replication stream right after the
    /// entry `at`): the checksums of these blocks in the primary's state after `at`.
    Verify {
        /// Sender's epoch.
        epoch: Epoch,
        /// Identifies the request.
        id: u64,
        /// The state compared: after this seq.
        at: Seq,
        /// `(block, CRC-32C of its content)`, blocks in increasing order.
        blocks: Vec<(u64, u32)>,
    },
    /// The answer to a [`Message::Verify`] (secondary → primary).
    Verified {
        /// Sender's epoch.
        epoch: Epoch,
        /// The request answered.
        id: u64,
        /// The blocks whose content differs here; `None`: not compared (this node was not
        /// at that state, or is not consistent), ask again.
        differ: Option<Vec<u64>>,
    },
    /// Headers of entries, ahead of their data (primary → secondary, control stream,
    /// docs/PROTOCOL.md §7.2).
    Headers {
        /// Sender's epoch.
        epoch: Epoch,
        /// In seq order.
        entries: Vec<crate::takeover::EntryHeader>,
    },
    /// Secondary → primary: freeze and hand over the primary role (§7.3).
    Takeover {
        /// Sender's epoch.
        epoch: Epoch,
        /// Identifies the request.
        id: u64,
    },
    /// Primary → secondary: frozen at `seq`, the epoch moved (every header up to `seq` was
    /// sent before this on the same stream).
    Frozen {
        /// The new epoch.
        epoch: Epoch,
        /// The request answered.
        id: u64,
        /// The freeze point: the newest seq of the old primary.
        seq: Seq,
    },
    /// The connection will not be used, and why.
    Refuse {
        /// Sender's epoch.
        epoch: Epoch,
        /// Human-readable reason.
        reason: String,
    },
}

impl Message {
    /// The sender's epoch.
    pub fn epoch(&self) -> Epoch {
        match self {
            Message::Hello(h) => h.epoch,
            Message::Entry { epoch, .. }
            | Message::CopyBlocks { epoch, .. }
            | Message::CopyEnd { epoch, .. }
            | Message::Ack { epoch, .. }
            | Message::Durable { epoch, .. }
            | Message::Flush { epoch, .. }
            | Message::Pull { epoch, .. }
            | Message::Verify { epoch, .. }
            | Message::Verified { epoch, .. }
            | Message::Headers { epoch, .. }
            | Message::Takeover { epoch, .. }
            | Message::Frozen { epoch, .. }
            | Message::Refuse { epoch, .. } => *epoch,
        }
    }

    /// The stream a message travels on (docs/PROTOCOL.md §3).
    pub fn stream(&self) -> Stream {
        match self {
            Message::Entry { .. }
            | Message::CopyBlocks { .. }
            | Message::CopyEnd { .. }
            | Message::Flush { .. }
            | Message::Verify { .. } => Stream::Replication,
            _ => Stream::Control,
        }
    }
}

impl Message {
    /// Bytes of block data the message carries (what a receiver buffers).
    pub fn data_bytes(&self) -> u64 {
        match self {
            Message::Entry { entry, .. } => entry.data_bytes(),
            Message::CopyBlocks { blocks, .. } => blocks.iter().map(|b| b.data.len() as u64).sum(),
            _ => 0,
        }
    }
}

impl WireEntry {
    /// Bytes of block data in the entry.
    pub fn data_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.data.len() as u64).sum()
    }
}

/// Which stream of the connection carries a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Hello, acks, refusals.
    Control,
    /// Entries and copy data.
    Replication,
}
