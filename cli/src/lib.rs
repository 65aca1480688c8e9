//! pairfs's node daemon and the modules of its command-line tool, as a library (the
//! binary, `src/main.rs`, parses the command line and prints): the node's configuration
//! and persisted state, the replicating node ([`node`]), the daemon that mounts a volume
//! and runs the node ([`daemon`]), the rejoin of a fenced node ([`rejoin`]).

pub mod config;
pub mod daemon;
pub mod node;
pub mod rejoin;
pub mod size;
pub mod state;
