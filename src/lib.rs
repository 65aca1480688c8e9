//! pairfs core: the block volume of a node and the rules that keep it consistent.
//!
//! docs/DESIGN.md §2–§3. A node's data lives in a block-addressed *normal area*; every
//! change goes first through the *journal* (the remote-unreflected area), as whole
//! transactions with a [`Seq`], a host timestamp and per-block checksums. The journal is at
//! once the write-ahead log that makes crashes harmless and the ordered queue that
//! replication streams from.
//!
//! - [`device`]: the [`BlockDevice`] trait and its file and memory implementations;
//! - [`crash`]: a device that can produce the image a crash leaves, for crash tests;
//! - [`journal`]: the on-disk log (FORMAT.md §2);
//! - [`volume`]: transactions, group commit, reads, checkpoints and recovery;
//! - [`datadir`]: a node's data directory (files, lock, creation);
//! - [`takeover`]: the data-location table and the local-unreflected area (issue 10);
//! - [`types`]: `Seq`, `VolumeId` and the byte-level codec helpers.

mod cache;
pub mod crash;
pub mod datadir;
pub mod device;
pub mod error;
pub mod journal;
pub mod repl;
pub mod takeover;
pub mod types;
pub mod volume;

pub use device::{BlockDevice, FileDevice, MemDevice};
pub use error::{JournalError, VolumeError};
pub use types::{BlockNo, Seq, VolumeId};
pub use volume::{Transaction, TxId, Volume, VolumeOptions};
