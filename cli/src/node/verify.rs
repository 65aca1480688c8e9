//! Online verify (`pairfs verify`, docs/PROTOCOL.md §5.5; DRBD's online verify): the
//! primary compares the checksum of every block in use with the secondary's while the pair
//! runs.
//!
//! The driver runs the job between its events. A *batch* is one window of the volume: under
//! the volume's lock the driver seals what is committed (entry `at`), hands the entries up
//! to it to the replicator, and takes the CRC-32C of every block in use in the window in
//! the state after `at`. The replicator sends the request on the replication stream right
//! behind entry `at`, so the secondary compares in exactly that state. A batch that could
//! not be compared (the peer was elsewhere, the connection dropped) is sent again. Blocks
//! found different are located in the tree (file and offset, or which metadata); blocks
//! whose content no reader can see (free, or allocated and never written) do not count.
//! With `--repair` the differing blocks are written again, unchanged, on the primary — the
//! entries that carry them repair the secondary — and compared once more.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pairfs::Seq;
use pairfs::types::crc32c;
use pairfs_fs::inspect::{self, Owner};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::Host;

/// Blocks of the volume per batch: 1,024 × 4 KiB = 4 MiB read under the lock (a few
/// milliseconds), 12 KiB of checksums on the wire.
const WINDOW: u64 = 1024;
/// Batches in flight: enough to hide the round trip, few enough to bound what the peer
/// queues (it holds at most 64).
const IN_FLIGHT: usize = 8;
/// A batch not answered in this long is sent again.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Batches that could not be compared, in a row, before the job gives up (the pair is not
/// streaming).
const MAX_MISSES: u32 = 50;
/// Differing blocks listed in the report (all are counted).
const MAX_LISTED: usize = 1000;

/// What the job tells the command that started it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VerifyUpdate {
    /// Progress: blocks compared so far out of those in use (an estimate that follows
    /// the volume), differences so far.
    Progress {
        compared: u64,
        total: u64,
        differ: u64,
        bytes_per_s: f64,
    },
    /// Finished.
    Done(VerifyReport),
    /// Could not finish.
    Failed { error: String },
}

/// The result of a verify (also the last one, in `status`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    /// When it finished (ns since the Unix epoch).
    pub finished_ns: u64,
    pub seconds: f64,
    pub blocks_compared: u64,
    pub bytes_compared: u64,
    /// Blocks whose content differed (visible content only).
    pub differing: u64,
    /// The first of them, with what they belong to.
    pub listed: Vec<(u64, String)>,
    /// Blocks that differed but whose content no reader sees (free, never written).
    pub invisible: u64,
    /// `--repair` ran: blocks written again from the primary and found equal afterwards.
    pub repaired: Option<u64>,
    /// Blocks still different after the repair.
    pub unrepaired: u64,
}

enum Window {
    Range(u64, u64),
    Blocks(Vec<u64>),
}

enum Phase {
    Verify,
    /// Comparing the repaired blocks again.
    Recheck {
        repaired: Vec<u64>,
    },
}

/// A running verify.
pub struct VerifyJob {
    repair: bool,
    updates: mpsc::UnboundedSender<VerifyUpdate>,
    todo: VecDeque<Window>,
    /// Batches sent: their window, when, and how many blocks they compare.
    out: HashMap<u64, (Window, Instant, u64)>,
    next_id: u64,
    total: u64,
    compared: u64,
    differ: BTreeSet<u64>,
    misses: u32,
    started: Instant,
    last_progress: Instant,
    phase: Phase,
    /// Result of the first pass, kept while the repaired blocks are compared again.
    first: Option<VerifyReport>,
    bs: u64,
}

/// What the driver does next for the job.
pub enum Step {
    /// Send this batch: the replicator compares `blocks` in the state after `at`.
    Batch {
        id: u64,
        at: Seq,
        blocks: Vec<(u64, u32)>,
    },
    /// Nothing to send now.
    Wait,
    /// The job is over (its last update was sent).
    Finished(VerifyReport),
}

impl VerifyJob {
    /// A job over every block of a volume of `blocks` blocks, `used` of them in use.
    pub fn new(
        repair: bool,
        updates: mpsc::UnboundedSender<VerifyUpdate>,
        blocks: u64,
        used: u64,
        bs: u64,
        first_id: u64,
    ) -> VerifyJob {
        let todo = (0..blocks.div_ceil(WINDOW))
            .map(|w| Window::Range(w * WINDOW, ((w + 1) * WINDOW).min(blocks)))
            .collect();
        let now = Instant::now();
        VerifyJob {
            repair,
            updates,
            todo,
            out: HashMap::new(),
            next_id: first_id,
            total: used,
            compared: 0,
            differ: BTreeSet::new(),
            misses: 0,
            started: now,
            last_progress: now,
            phase: Phase::Verify,
            first: None,
            bs,
        }
    }

    /// The ids of this job's batches start here (the replicator's answers carry them).
    pub fn owns(&self, id: u64) -> bool {
        self.out.contains_key(&id)
    }

    /// The next thing to do: a batch to send (computed with the volume in `host`, whose
    /// state after the sealed seq `at` it describes; `hand_entries` gives the replicator
    /// the entries up to it first), waiting, or the end.
    pub fn step(&mut self, host: &Host, hand_entries: &mut dyn FnMut()) -> Result<Step> {
        if self.misses > MAX_MISSES {
            bail!(
                "the secondary could not compare {MAX_MISSES} batches in a row: the pair must \
                 be connected and streaming (state `pair`) to verify"
            );
        }
        let now = Instant::now();
        let stale: Vec<u64> = self
            .out
            .iter()
            .filter(|(_, (_, t, _))| now.duration_since(*t) > ANSWER_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.answer(id, None);
        }
        if self.out.len() >= IN_FLIGHT {
            return Ok(Step::Wait);
        }
        let Some(w) = self.todo.pop_front() else {
            if self.out.is_empty() {
                return Ok(match self.finish(host)? {
                    Some(report) => Step::Finished(report),
                    None => Step::Wait, // the repaired blocks are compared again
                });
            }
            return Ok(Step::Wait);
        };
        let (at, blocks) = host.vol_mut(|v| -> Result<(Seq, Vec<(u64, u32)>)> {
            let at = v.seal_open().context("sealing for a verify batch")?;
            let list = match &w {
                Window::Range(s, e) => {
                    let sb = inspect::superblock(v)?;
                    inspect::blocks_in_use(v, &sb, *s, *e)?
                }
                Window::Blocks(b) => b.clone(),
            };
            let mut buf = vec![0u8; v.block_size()];
            let mut out = Vec::with_capacity(list.len());
            for b in list {
                v.read_current(b, &mut buf)
                    .context("reading a block to verify")?;
                out.push((b, crc32c(&buf)));
            }
            Ok((at, out))
        })?;
        hand_entries();
        let id = self.next_id;
        self.next_id += 1;
        self.out.insert(id, (w, now, blocks.len() as u64));
        Ok(Step::Batch { id, at, blocks })
    }

    /// The replicator's answer to batch `id`.
    pub fn answer(&mut self, id: u64, differ: Option<Vec<u64>>) {
        let Some((w, _, n)) = self.out.remove(&id) else {
            return;
        };
        match differ {
            None => {
                self.misses += 1;
                self.todo.push_back(w);
            }
            Some(d) => {
                self.misses = 0;
                self.compared += n;
                self.differ.extend(d);
            }
        }
    }

    /// Sends a progress update now and then.
    pub fn report_progress(&mut self) {
        if self.last_progress.elapsed() < Duration::from_millis(500) {
            return;
        }
        self.last_progress = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let _ = self.updates.send(VerifyUpdate::Progress {
            compared: self.compared,
            total: self.total.max(self.compared),
            differ: self.differ.len() as u64,
            bytes_per_s: self.compared as f64 * self.bs as f64 / secs,
        });
    }

    /// All batches answered: the report — or `None` after a repair, whose blocks are then
    /// compared again.
    fn finish(&mut self, host: &Host) -> Result<Option<VerifyReport>> {
        let differ: Vec<u64> = std::mem::take(&mut self.differ).into_iter().collect();
        let owners = if differ.is_empty() {
            Default::default()
        } else {
            host.vol(|v| inspect::locate(v, &differ))
                .context("finding what the differing blocks belong to")?
        };
        let visible: Vec<u64> = differ
            .iter()
            .copied()
            .filter(|b| owners.get(b).is_none_or(Owner::visible))
            .collect();
        match std::mem::replace(&mut self.phase, Phase::Verify) {
            Phase::Verify => {
                let report = VerifyReport {
                    finished_ns: pairfs::types::now_ns(),
                    seconds: self.started.elapsed().as_secs_f64(),
                    blocks_compared: self.compared,
                    bytes_compared: self.compared * self.bs,
                    differing: visible.len() as u64,
                    listed: visible
                        .iter()
                        .take(MAX_LISTED)
                        .map(|b| (*b, owners.get(b).map_or("?".into(), |o| o.to_string())))
                        .collect(),
                    invisible: (differ.len() - visible.len()) as u64,
                    repaired: None,
                    unrepaired: 0,
                };
                if !self.repair || visible.is_empty() {
                    return Ok(Some(self.done(report)));
                }
                host.vol_mut(|v| v.rewrite_blocks(&visible))
                    .context("writing the differing blocks again")?;
                tracing::warn!(
                    blocks = visible.len(),
                    "verify: repairing blocks from the primary"
                );
                self.first = Some(report);
                self.todo.push_back(Window::Blocks(visible.clone()));
                self.phase = Phase::Recheck { repaired: visible };
                Ok(None)
            }
            Phase::Recheck { repaired } => {
                let mut report = self.first.take().unwrap_or_default();
                report.unrepaired = visible.len() as u64;
                report.repaired = Some(repaired.len() as u64 - report.unrepaired);
                report.seconds = self.started.elapsed().as_secs_f64();
                report.finished_ns = pairfs::types::now_ns();
                Ok(Some(self.done(report)))
            }
        }
    }

    fn done(&mut self, report: VerifyReport) -> VerifyReport {
        let _ = self.updates.send(VerifyUpdate::Done(report.clone()));
        report
    }

    /// The job could not finish.
    pub fn fail(&self, error: &str) {
        let _ = self.updates.send(VerifyUpdate::Failed {
            error: error.to_string(),
        });
    }
}
