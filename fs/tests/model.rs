//! Model-based test of the FS core (docs/DESIGN.md §10.4): random operations applied to the FS and to
//! an in-memory model, with the whole tree, every file's bytes, link counts, modes and
//! xattrs compared after every step, and fsck run after every step. Remounts in the
//! workload check that everything persists through close/reopen.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{Harness, fs_canon, op_strategy};
use pairfs::{MemDevice, VolumeOptions};
use pairfs_fs::fsck::fsck;
use proptest::prelude::*;

fn check(h: &Harness) -> Result<(), TestCaseError> {
    prop_assert_eq!(fs_canon(h.fs()), h.model.canon());
    let r = h.fs().with_volume(fsck);
    prop_assert!(r.is_clean(), "fsck: {:?}", r.errors);
    Ok(())
}

fn run(ops: &[common::Op], opts: VolumeOptions) -> Result<(), TestCaseError> {
    let normal = Arc::new(MemDevice::new(32 << 20));
    // A small journal: entries wrap around and checkpoints happen often.
    let journal = Arc::new(MemDevice::new(1 << 20));
    let mut h = Harness::new(normal, journal, opts);
    for op in ops {
        h.apply(op);
        check(&h)?;
    }
    h.remount();
    check(&h)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Default policy: bulk writes in place, small ones journaled.
    #[test]
    fn fs_matches_model(ops in proptest::collection::vec(op_strategy(true), 1..100)) {
        run(&ops, VolumeOptions::default())?;
    }

    /// Everything journaled, and a group commit after every transaction.
    #[test]
    fn fs_matches_model_all_journaled(ops in proptest::collection::vec(op_strategy(false), 1..100)) {
        let opts = VolumeOptions {
            inplace_min_blocks: usize::MAX,
            max_entry_bytes: 4096,
            ..VolumeOptions::default()
        };
        run(&ops, opts)?;
    }
}
