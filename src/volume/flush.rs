//! Syncs without the volume's lock: what a group commit or an `fsync` can make durable
//! while the filesystem goes on serving (the flush of a second of sequential writes takes
//! hundreds of milliseconds, with every reader and writer waiting if it ran under the
//! lock), and the writeback started ahead of it.
//!
//! Two areas are written outside the journal's ordered appends: the normal area (data
//! written in place) and, while taking over, the local-unreflected area (the writers'
//! entries). [`Volume::flush_ahead`] names each with a mark of its writes so far (for the
//! LU, counting the entries still being written behind, which the flush writes or waits
//! for first: FORMAT.md §5.1); the caller syncs them without the lock
//! ([`FlushAhead::run`]) and hands the result back
//! ([`Volume::flushed_ahead`]); the sync under the lock then syncs again only what was
//! written after the marks. Making written data durable early never breaks an ordering
//! rule (FORMAT.md §2.4: they say what must be durable before something is *written*).

use std::io;
use std::sync::Arc;

use super::{Volume, VolumeError};
use crate::device::BlockDevice;
use crate::takeover::LuFlush;

/// What a sync can flush without the volume's lock: each area's device with writes not
/// yet durable, and a mark of those writes.
pub struct FlushAhead {
    normal: Option<(Arc<dyn BlockDevice>, u64)>,
    lu: Option<LuFlush>,
}

/// Each area's mark in a [`FlushAhead`] (`None`: nothing to flush there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushMarks {
    pub normal: Option<u64>,
    pub lu: Option<u64>,
}

/// The outcome of [`FlushAhead::run`], for [`Volume::flushed_ahead`].
#[derive(Default)]
pub struct Flushed {
    pub(super) normal: Option<(u64, io::Result<()>)>,
    pub(super) lu: Option<(Arc<dyn BlockDevice>, u64, io::Result<()>)>,
}

impl FlushAhead {
    /// The marks: equal marks in two rounds mean nothing was written in between.
    pub fn marks(&self) -> FlushMarks {
        FlushMarks {
            normal: self.normal.as_ref().map(|(_, m)| *m),
            lu: self.lu.as_ref().map(LuFlush::mark),
        }
    }

    /// Syncs each device (call without the volume's lock); stops at a failure.
    pub fn run(self) -> Flushed {
        let mut out = Flushed::default();
        if let Some((dev, mark)) = self.normal {
            let r = dev.sync_separately();
            let failed = r.is_err();
            out.normal = Some((mark, r));
            if failed {
                return out;
            }
        }
        if let Some(lu) = self.lu {
            out.lu = Some(lu.run());
        }
        out
    }
}

impl Flushed {
    /// A sync failed (the volume is poisoned once this is handed back).
    pub fn failed(&self) -> bool {
        self.normal.as_ref().is_some_and(|(_, r)| r.is_err())
            || self.lu.as_ref().is_some_and(|(_, _, r)| r.is_err())
    }

    /// This round's results over an earlier round's: an area this round did not flush
    /// keeps the earlier result (nothing was written to it in between, or it would have).
    pub fn after(self, earlier: Flushed) -> Flushed {
        Flushed {
            normal: self.normal.or(earlier.normal),
            lu: self.lu.or(earlier.lu),
        }
    }
}

/// Starts the writeback [`Volume::take_writeback`] asked for (call without the volume's
/// lock). A failure is only logged: the next sync, the barrier, reports it.
pub fn start_writeback(devs: Vec<Arc<dyn BlockDevice>>) {
    for d in devs {
        if let Err(e) = d.start_writeback() {
            tracing::debug!(error = %e, "starting writeback ahead of a sync");
        }
    }
}

impl Volume {
    /// A sync, first half, for a caller that must not hold the volume's lock while the
    /// disk flushes: the areas written and not durable yet (data written in place; the
    /// local-unreflected area while taking over), or `None`. The caller runs
    /// [`FlushAhead::run`] *without* the lock, then hands the result to
    /// [`Volume::flushed_ahead`] before its sync or `maintain`.
    pub fn flush_ahead(&self) -> Option<FlushAhead> {
        if self.poisoned || self.opts.read_only {
            return None;
        }
        let normal = self
            .normal_dirty
            .then(|| (self.normal.clone(), self.inplace_writes));
        let lu = self.taking.as_ref().and_then(|t| t.lu_flush_ahead());
        (normal.is_some() || lu.is_some()).then_some(FlushAhead { normal, lu })
    }

    /// The result of the flush [`Volume::flush_ahead`] asked for: an area written to only
    /// before its mark is durable, and the sync that follows need not sync it again
    /// (FORMAT.md §2.4 rule 2 holds: the normal area's sync returned before the entry that
    /// names its data is written); anything written since is synced as usual. A failure
    /// poisons the volume like any failed sync.
    pub fn flushed_ahead(&mut self, f: Flushed) -> Result<(), VolumeError> {
        if let Some((mark, r)) = f.normal {
            if let Err(source) = r {
                return self.poison(VolumeError::Io {
                    op: "syncing in-place data",
                    source,
                });
            }
            if mark == self.inplace_writes {
                self.normal_dirty = false;
            }
        }
        if let Some((dev, mark, r)) = f.lu {
            if let Err(source) = r {
                return self.poison(VolumeError::Io {
                    op: "syncing the local-unreflected area",
                    source,
                });
            }
            if let Some(t) = self.taking.as_mut() {
                t.lu_synced_ahead(&dev, mark);
            }
        }
        Ok(())
    }

    /// The devices written since the last call and not synced yet (data in place; the
    /// local-unreflected area's entries): the caller starts their writeback
    /// ([`start_writeback`]) *without* the volume's lock, so that the next sync — made
    /// under the lock, or ahead of it — finds most of it written already. A hint only:
    /// the ordering rules rest on the syncs alone.
    pub fn take_writeback(&mut self) -> Vec<Arc<dyn BlockDevice>> {
        let mut out = Vec::new();
        // (Not when a sync came since: sync mode syncs every write itself.)
        let new =
            std::mem::replace(&mut self.writeback_mark, self.inplace_writes) != self.inplace_writes;
        if new && self.normal_dirty {
            out.push(self.normal.clone());
        }
        if let Some(dev) = self.taking.as_mut().and_then(|t| t.lu_take_writeback()) {
            out.push(dev);
        }
        out
    }
}
