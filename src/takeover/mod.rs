//! Takeover support in the core (docs/PROTOCOL.md §7, FORMAT.md §5; JP 2003-402994
//! embodiment 2, ¶0069–0098): what a node knows of the entries it lacks
//! ([`RemoteIndex`], fed by headers that stream ahead of the data), where the newest
//! version of each block is ([`locate`]: the data-location table), and the
//! local-unreflected area a node writes to while it cannot apply its own writes yet
//! ([`LuArea`]).
//!
//! Built so far: these structures, their persistence and recovery. The role sub-machines
//! that drive them (freeze, drain, merge, stream-back) are being built (issue 10).

mod behind;
mod fetch;
mod location;
mod lu;

pub use behind::LuFlush;
pub use fetch::{FetchMessage, MAX_FETCH_BLOCKS};
pub use location::{
    BacklogSummary, EntryHeader, HeaderError, Location, MAX_HEADER_BLOCKS, RemoteIndex, locate,
};
pub use lu::LuArea;
