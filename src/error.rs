//! Errors of the core layer: one enum per component (docs/DESIGN.md §10.2).

use std::io;

use crate::types::Seq;

/// Errors of the journal (the remote-unreflected area).
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The journal file could not be read or written.
    #[error("journal I/O error while {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Neither header slot holds a valid header (wrong magic, version or checksum).
    #[error(
        "journal header is invalid in both slots ({0}); the journal is not a pairfs journal or is corrupt"
    )]
    BadHeader(String),
    /// The header does not describe this volume (wrong uuid, block size, sizes).
    #[error("journal does not belong to this volume: {0}")]
    Mismatch(String),
    /// A durable entry in the middle of the log fails its checks.
    #[error(
        "journal entry after seq {after} is corrupt ({reason}), but entry seq {proof} \
         written later records that seqs up to {durable} were durable; refusing to drop \
         committed transactions"
    )]
    Corrupt {
        /// The last valid seq before the corrupt entry.
        after: Seq,
        /// Why the entry was rejected.
        reason: String,
        /// A later entry proving the corrupt one was durable.
        proof: Seq,
        /// The `durable_seq` recorded by that later entry.
        durable: Seq,
    },
    /// Not enough free space for an entry: retained entries must be released first.
    #[error("journal full: entry of {needed} bytes, {free} bytes free")]
    Full {
        /// Size of the entry that did not fit.
        needed: u64,
        /// Free bytes in the log.
        free: u64,
    },
    /// An entry larger than the whole journal can hold.
    #[error("journal entry of {needed} bytes exceeds the journal capacity of {capacity} bytes")]
    TooLarge {
        /// Size of the entry.
        needed: u64,
        /// Usable journal capacity.
        capacity: u64,
    },
    /// An entry with an explicit seq that does not follow the journal's newest.
    #[error("journal entry seq {seq} does not follow the newest seq {last}")]
    SeqOrder {
        /// The seq asked for.
        seq: Seq,
        /// The newest seq in the journal.
        last: Seq,
    },
    /// An entry's seq is not below the durable reservation: `Journal::reserve` first.
    #[error("journal entry seq {seq} is not reserved yet")]
    NotReserved {
        /// The seq.
        seq: Seq,
    },
    /// A retained entry read back for replay or streaming fails its checks.
    #[error("journal entry seq {seq} at offset {offset} is unreadable: {reason}")]
    BadEntry {
        /// The entry's seq.
        seq: Seq,
        /// Its byte offset in the journal file.
        offset: u64,
        /// What failed.
        reason: String,
    },
}

/// Errors of the volume (normal area + journal + caches).
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A journal error.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The normal area could not be read or written.
    #[error("volume I/O error while {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A block number outside the normal area.
    #[error("block {block} is outside the volume ({blocks} blocks)")]
    OutOfRange {
        /// The requested block.
        block: u64,
        /// The volume size in blocks.
        blocks: u64,
    },
    /// An earlier write or sync failed: the volume refuses writes until it is reopened
    /// (the state on disk is unknown; docs/DESIGN.md §10.2, after redb's `PreviousIo`).
    #[error(
        "volume stopped accepting writes after an earlier I/O error; remount (a secondary \
         reopens it by itself)"
    )]
    Poisoned,
    /// The volume was opened read-only.
    #[error("volume is read-only")]
    ReadOnly,
    /// A journal entry asked for is no longer retained.
    #[error("journal entry seq {seq} is no longer in the journal")]
    EntryGone {
        /// The seq asked for.
        seq: Seq,
    },
    /// A retained entry's in-place block was overwritten and not saved aside: the entry
    /// can no longer be sent as it was (replication falls back to the bitmap).
    #[error("entry seq {seq}: block {block} was overwritten before it was replicated")]
    InPlaceChanged {
        /// The entry.
        seq: Seq,
        /// The block.
        block: u64,
    },
    /// Invalid parameters at creation.
    #[error("invalid volume parameters: {0}")]
    InvalidParams(String),
    /// A block whose newest version is on the peer could not be fetched from it (a
    /// takeover's reads, docs/PROTOCOL.md §7.4).
    #[error("block {block} (seq {seq}) could not be read from the peer: {reason}")]
    PeerFetch {
        /// The block.
        block: u64,
        /// The seq of the version asked for.
        seq: Seq,
        /// Why.
        reason: String,
    },
    /// The local-unreflected area has no room for the transaction until the merge frees
    /// some (the writer waits and retries; nothing was written).
    #[error(
        "the local-unreflected area is full ({used} of {capacity} bytes) until the merge frees room"
    )]
    LocalUnreflectedFull {
        /// Bytes in use.
        used: u64,
        /// Bytes for entries.
        capacity: u64,
    },
    /// A read needs blocks from the peer while this thread defers fetches
    /// ([`crate::volume::defer_fetches`]): the caller releases its lock, runs the fetch
    /// and reads again. Nothing was read or changed.
    #[error("a read needs {} blocks from the peer (fetched once the lock is released)", .0.blocks())]
    FetchDeferred(Box<crate::volume::PeerRead>),
}

impl VolumeError {
    pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> VolumeError {
        move |source| VolumeError::Io { op, source }
    }
}

impl JournalError {
    pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> JournalError {
        move |source| JournalError::Io { op, source }
    }
}
