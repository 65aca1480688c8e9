//! The driver's part of a forced takeover (`pairfs takeover --force`, docs/PROTOCOL.md
//! §7.7): the operator attests that the old primary is gone. This node continues from the
//! old lineage's state after the newest seq it applied — a consistent filesystem — as the
//! primary of a new generation, and reports exactly what it cannot have: the entries whose
//! headers it received and never applied (seqs, time span, bytes, blocks, the files those
//! blocks belong to in the state it continues from). A taker whose drain was cut short
//! also made writes on top of blocks it never received; they cannot be applied to that
//! state, so its local-unreflected area is exported (`DATA/preserved/…/lu`, with the
//! report) before it is emptied — never dropped silently.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use pairfs::BlockNo;
use pairfs::takeover::{EntryHeader, LuArea};
use pairfs_fs::FsMode;
use pairfs_fs::inspect::{self, Owner};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::block_in_place;

use super::TakeoverReport;
use super::driver::Driver;
use crate::state::write_durably;

/// The last forced takeover's report in the data directory (for `status`).
pub(super) const FORCED_FILE: &str = "forced.json";
/// Where what a forced takeover (or a rejoin) could not keep goes, one directory each.
pub const PRESERVED_DIR: &str = "preserved";
/// Files named in a report at most (the counts cover the rest).
const MAX_FILES: usize = 1000;
/// Files and metadata kinds the command prints (the report has them all).
const SHOWN: usize = 20;

/// What a forced takeover could not have, or had to set aside.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LossReport {
    /// When (ns since the Unix epoch).
    pub at_ns: u64,
    /// The new generation's id (hex) and the seq it continues from.
    pub generation: String,
    pub base_seq: u64,
    /// The old primary's entries after `base_seq` whose headers this node received and
    /// never applied.
    pub lost: EntriesReport,
    /// The headers may not name everything (the backlog had outgrown them, or this node
    /// restarted after it last heard the primary): more may have been lost.
    pub partial: bool,
    /// A taker whose drain was cut short: its own writes, exported.
    pub preserved: Option<Preserved>,
    /// The report's directory (`DATA/preserved/…`).
    pub dir: String,
}

/// Entries summed up, with the files their blocks belong to.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EntriesReport {
    pub entries: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Host times of the first and the last entry (ns since the Unix epoch).
    pub first_ns: Option<u64>,
    pub last_ns: Option<u64>,
    pub bytes: u64,
    /// Distinct blocks.
    pub blocks: u64,
    /// Paths of the files whose data blocks are among them, in the state this node
    /// continues from (at most [`MAX_FILES`]), and the kinds of metadata (with their
    /// blocks when more than one).
    pub files: Vec<String>,
    pub metadata: Vec<String>,
    /// Blocks no file uses in that state (new files, or data appended after it).
    pub unreferenced_blocks: u64,
}

/// The local-unreflected entries a forced takeover set aside.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Preserved {
    /// The old primary's freeze point these entries followed.
    pub freeze_seq: u64,
    /// The copy of the area (FORMAT.md §5.1: a journal of images).
    pub file: String,
    pub entries: EntriesReport,
}

/// A `pairfs takeover --force` waiting for the connection to a silent peer to time out.
pub(super) struct PendingForce {
    started: Instant,
    /// Refused if the peer is still connected then: it is alive.
    until: Instant,
    reply: oneshot::Sender<TakeoverReport>,
}

impl Driver {
    /// `pairfs takeover --force` on this node. A peer killed without a word still looks
    /// connected until the connection's idle timeout: the request waits that long (and a
    /// second) for it to go, and is refused if the peer is still there — it is alive, and
    /// a planned takeover loses nothing.
    pub(super) fn force_takeover(&mut self, reply: oneshot::Sender<TakeoverReport>) {
        if self.pending_force.is_some() {
            let _ = reply.send(super::takeover::failed(
                "a forced takeover is already waiting".into(),
            ));
            return;
        }
        let now = Instant::now();
        self.pending_force = Some(PendingForce {
            started: now,
            until: now + self.cfg.idle_timeout + std::time::Duration::from_secs(1),
            reply,
        });
    }

    /// Carries out the waiting forced takeover once the peer is gone; answers once the
    /// new generation is persisted and the filesystem writable.
    pub(super) async fn drive_force(&mut self) {
        let Some(p) = self.pending_force.take() else {
            return;
        };
        if self.repl.status().connected && Instant::now() < p.until {
            self.pending_force = Some(p);
            return;
        }
        let started = p.started;
        let reply = p.reply;
        let r = block_in_place(|| self.force());
        self.actions().await;
        let report = match r {
            Ok(loss) => TakeoverReport {
                ok: true,
                seconds: started.elapsed().as_secs_f64(),
                forced: Some(loss),
                ..TakeoverReport::default()
            },
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::error!(error = %msg, "forced takeover refused");
                super::takeover::failed(msg)
            }
        };
        let _ = reply.send(report);
    }

    fn force(&mut self) -> Result<LossReport> {
        if self.takeover_req.is_some() {
            bail!(
                "a planned takeover is being asked for: wait for its answer (it gives up within \
                 15 s when the primary does not freeze)"
            );
        }
        let plan = self.repl.force_plan().map_err(anyhow::Error::msg)?;
        let (lost, mut lu) = match plan.cut_short {
            None => {
                self.host
                    .sync()
                    .context("making what this node holds durable")?;
                (plan.lost.clone(), None)
            }
            Some(_) => {
                let (lost, lu) = self.abandon_volume_takeover()?;
                (lost, Some(lu))
            }
        };
        let newest = self.host.vol(|v| v.journal().durable_seq());
        if newest != plan.base {
            bail!(
                "this node's journal is durable up to seq {newest}, not the seq {} it applied",
                plan.base
            );
        }
        let at_ns = pairfs::types::now_ns();
        let dir = self.cfg.data.join(PRESERVED_DIR).join(format!(
            "forced-{}-seq{}",
            at_ns / 1_000_000_000,
            plan.base.0
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let lu_headers = lu.as_ref().map(LuArea::headers).unwrap_or_default();
        let owners = self.owners(&lost, &lu_headers)?;
        let preserved = match plan.cut_short {
            Some(freeze) if !lu_headers.is_empty() => Some(Preserved {
                freeze_seq: freeze.0,
                file: preserve_lu(&self.cfg.data, &dir)?.display().to_string(),
                entries: summarize(&lu_headers, &owners),
            }),
            _ => None,
        };
        let mut report = LossReport {
            at_ns,
            generation: String::new(),
            base_seq: plan.base.0,
            lost: summarize(&lost, &owners),
            partial: plan.partial,
            preserved,
            dir: dir.display().to_string(),
        };
        // Exported first, durably: only then is the area emptied.
        write_report(&dir.join("report.json"), &report)?;
        if let Some(lu) = lu.as_mut() {
            lu.discard()
                .context("emptying the local-unreflected area")?;
            lu.close().context("closing the local-unreflected area")?;
        }
        let retained = self.host.vol(|v| v.retained_entries());
        self.repl
            .handle_forced(plan.base, retained, at_ns, Instant::now());
        let g = self.repl.persisted().generations.last().map(|g| g.id);
        report.generation = g.map(|g| format!("{g:016x}")).unwrap_or_default();
        write_report(&dir.join("report.json"), &report)?;
        write_report(&self.cfg.data.join(FORCED_FILE), &report)?;
        tracing::warn!(
            base = report.base_seq,
            lost_entries = report.lost.entries,
            lost_bytes = report.lost.bytes,
            preserved_entries = report.preserved.as_ref().map_or(0, |p| p.entries.entries),
            report = %dir.display(),
            "forced takeover"
        );
        self.last_forced = Some(report.clone());
        Ok(report)
    }

    /// A taker cut short: leaves the volume's takeover mode (its state is then the old
    /// primary's after the newest seq applied here), with the filesystem refusing writes
    /// until the new generation is persisted; returns the headers still on the old
    /// primary and the local-unreflected area.
    fn abandon_volume_takeover(&mut self) -> Result<(Vec<EntryHeader>, LuArea)> {
        let abandon = |v: &mut pairfs::Volume| {
            let lost: Vec<EntryHeader> = v
                .takeover_remote()
                .map(|r| r.entries().cloned().collect())
                .unwrap_or_default();
            let lu = v.abandon_takeover()?;
            v.sync()?;
            Ok::<_, pairfs::VolumeError>((lost, lu))
        };
        let Some(fs) = self.host.fs() else {
            return Ok(self.host.vol_mut(abandon)?);
        };
        let r = fs
            .rebase(FsMode::Replica, |v| abandon(v).map_err(Into::into))
            .context("going back to the state this node holds")?;
        self.host.follow_mode_now();
        // Everything the kernel cached came from the state given up.
        self.host.invalidate_all(fs);
        Ok(r)
    }

    /// What each block of these entries belongs to in the state this node holds.
    fn owners(&self, lost: &[EntryHeader], lu: &[EntryHeader]) -> Result<BTreeMap<BlockNo, Owner>> {
        let blocks: BTreeSet<BlockNo> = lost
            .iter()
            .chain(lu)
            .flat_map(|h| h.blocks.iter().copied())
            .collect();
        if blocks.is_empty() {
            return Ok(BTreeMap::new());
        }
        let blocks: Vec<BlockNo> = blocks.into_iter().collect();
        self.host
            .vol(|v| inspect::locate(v, &blocks))
            .context("finding the files the lost blocks belong to")
    }
}

/// Counts, time span and files of `entries`.
pub fn summarize(entries: &[EntryHeader], owners: &BTreeMap<BlockNo, Owner>) -> EntriesReport {
    let blocks: BTreeSet<BlockNo> = entries
        .iter()
        .flat_map(|h| h.blocks.iter().copied())
        .collect();
    let mut files = BTreeSet::new();
    // Metadata by kind ("inode table (inodes 1..16)" counts as "inode table").
    let mut metadata: BTreeMap<String, u64> = BTreeMap::new();
    let mut unreferenced = 0;
    for b in &blocks {
        match owners.get(b) {
            Some(Owner::File { path, .. }) => {
                files.insert(path.clone());
            }
            Some(Owner::Metadata(what)) => {
                let kind = what.split(" (").next().unwrap_or(what);
                *metadata.entry(kind.to_string()).or_default() += 1;
            }
            Some(Owner::Unreferenced) | None => unreferenced += 1,
        }
    }
    EntriesReport {
        entries: entries.len() as u64,
        first_seq: entries.first().map(|h| h.seq.0),
        last_seq: entries.last().map(|h| h.seq.0),
        first_ns: entries.first().map(|h| h.timestamp_ns),
        last_ns: entries.last().map(|h| h.timestamp_ns),
        bytes: entries.iter().map(|h| h.bytes).sum(),
        blocks: blocks.len() as u64,
        files: files.into_iter().take(MAX_FILES).collect(),
        metadata: metadata
            .into_iter()
            .take(MAX_FILES)
            .map(|(kind, n)| match n {
                1 => kind,
                n => format!("{kind} ({n} blocks)"),
            })
            .collect(),
        unreferenced_blocks: unreferenced,
    }
}

/// Copies the local-unreflected area into `dir`, durably.
fn preserve_lu(data: &Path, dir: &Path) -> Result<PathBuf> {
    let from = data.join(pairfs::datadir::LU_FILE);
    let to = dir.join(pairfs::datadir::LU_FILE);
    std::fs::copy(&from, &to)
        .and_then(|_| std::fs::File::open(&to)?.sync_all())
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    pairfs::datadir::sync_dir(dir)?;
    Ok(to)
}

pub fn write_report(path: &Path, r: &impl Serialize) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(r).context("encoding the loss report")?;
    bytes.push(b'\n');
    write_durably(path, &bytes)
}

/// The last forced takeover's report, if any.
pub(super) fn load_last(data: &Path) -> Option<LossReport> {
    let b = std::fs::read(data.join(FORCED_FILE)).ok()?;
    serde_json::from_slice(&b).ok()
}

impl LossReport {
    /// The report for a person: what was lost, what was set aside, where the details are.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "forced takeover: this node is the primary of generation {}, continuing from seq {}",
            self.generation, self.base_seq
        );
        let l = &self.lost;
        if l.entries == 0 && self.partial {
            let _ = writeln!(
                o,
                "  lost: not known — this node restarted after it last heard the old primary, \
                 and the headers it had went with the restart"
            );
        } else if l.entries == 0 {
            let _ = writeln!(
                o,
                "  lost: nothing this node heard of (entries the old primary sealed after its \
                 last header reached here are not known)"
            );
        } else {
            let _ = writeln!(
                o,
                "  lost: {}{}",
                entries_line(l),
                if self.partial {
                    " — and possibly more: the headers do not name everything (the backlog \
                     outgrew them, or this node restarted after it last heard the primary)"
                } else {
                    ""
                }
            );
            files_lines(&mut o, l);
        }
        if let Some(p) = &self.preserved {
            let _ = writeln!(
                o,
                "  set aside (written here on top of the old primary's seq {}, not in this \
                 state): {}, copied to {}",
                p.freeze_seq,
                entries_line(&p.entries),
                p.file
            );
            files_lines(&mut o, &p.entries);
        }
        let _ = write!(o, "  details: {}/report.json", self.dir);
        o
    }
}

fn entries_line(e: &EntriesReport) -> String {
    let seqs = match (e.first_seq, e.last_seq) {
        (Some(a), Some(b)) => format!("seqs {a}..={b}, "),
        _ => String::new(),
    };
    let span = match (e.first_ns, e.last_ns) {
        (Some(a), Some(b)) => format!(
            ", written over {:.3} s, the last {:.1} s before this report",
            b.saturating_sub(a) as f64 / 1e9,
            pairfs::types::now_ns().saturating_sub(b) as f64 / 1e9
        ),
        _ => String::new(),
    };
    format!(
        "{} entries ({seqs}{}, {} blocks){span}",
        e.entries,
        crate::size::human(e.bytes),
        e.blocks
    )
}

fn files_lines(o: &mut String, e: &EntriesReport) {
    use std::fmt::Write;
    let list = |v: &[String], sep: &str| {
        let mut s = v.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(sep);
        if v.len() > SHOWN {
            s.push_str(&format!("{sep}… {} more in the report", v.len() - SHOWN));
        }
        s
    };
    if !e.files.is_empty() {
        let _ = writeln!(o, "    files: {}", list(&e.files, ", "));
    }
    if !e.metadata.is_empty() {
        let _ = writeln!(o, "    metadata: {}", list(&e.metadata, "; "));
    }
    if e.unreferenced_blocks > 0 {
        let _ = writeln!(
            o,
            "    {} blocks no file uses in this state (new files, or data appended)",
            e.unreferenced_blocks
        );
    }
}
