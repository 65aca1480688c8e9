//! Parts of the simulations (`tests/repl_sim.rs`, `tests/takeover_sim/`).

pub(crate) mod rng;
pub(crate) mod store;
