//! Parts of the replication simulation (`tests/repl_sim.rs`).

pub(crate) mod store;
