//! Messages of the fetch streams (docs/PROTOCOL.md §7.4): a taker reads blocks whose newest
//! version is on the old primary. Each request is a bidirectional stream of its own — one
//! `Fetch`, one answer — so a fetch never waits behind an entry on the replication stream
//! or behind another fetch.

use serde::{Deserialize, Serialize};

use crate::repl::Epoch;

/// Most blocks one `Fetch` may ask for (1 MiB at 4 KiB, 16 MiB at 64 KiB): bounds the
/// answer a server builds and the client buffers.
pub const MAX_FETCH_BLOCKS: usize = 256;

/// A message on a fetch stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchMessage {
    /// Taker → source: the content of these blocks as the source holds them.
    Fetch {
        /// The sender's epoch.
        epoch: Epoch,
        /// Blocks, at most [`MAX_FETCH_BLOCKS`].
        blocks: Vec<u64>,
    },
    /// Source → taker: the blocks' content, in the order asked.
    Fetched {
        /// One block each.
        blocks: Vec<serde_bytes::ByteBuf>,
    },
    /// Source → taker: the fetch cannot be served, and why (not frozen, bad request, I/O).
    Refused {
        /// Human-readable reason.
        reason: String,
    },
}

impl FetchMessage {
    /// The answer carrying these blocks.
    pub fn fetched(blocks: Vec<Vec<u8>>) -> FetchMessage {
        FetchMessage::Fetched {
            blocks: blocks.into_iter().map(serde_bytes::ByteBuf::from).collect(),
        }
    }
}
