//! `pairfs rejoin --config FILE` (docs/PROTOCOL.md §7.8): an old primary fenced on its
//! return after a forced takeover becomes the new primary's secondary again, resynced by
//! the blocks changed on either side since the divergence — not a full copy.
//!
//! Run with the node stopped. In this order, each step durable before the next, so that a
//! crash anywhere leaves a state from which the command can simply be run again:
//!
//! 1. the tail (this node's entries after the branch point) is reported — seqs, time span,
//!    bytes, blocks, the files it touched — and those files are copied as this node holds
//!    them into `DATA/preserved/diverged-<unix time>-seq<base>/files/`, with `report.json`;
//! 2. the blocks the tail wrote (its retained entries, plus the difference bitmap if the
//!    node had fallen back to it) go to `DATA/rejoin.bitmap`;
//! 3. everything is checkpointed into the normal area, and the pair state says
//!    *inconsistent, no lineage*: the node no longer mounts its tail as a filesystem;
//! 4. the journal is replaced by an empty one (no old entry may continue the new chain);
//!    the fencing record and the difference bitmap are removed.
//!
//! At its next start the node names the tail's blocks in its hello; the primary marks them
//! with the blocks it changed since, and a bitmap copy of their union follows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use pairfs::datadir::DataDir;
use pairfs::repl::Role;
use pairfs::takeover::EntryHeader;
use pairfs::{BlockNo, Seq, VolumeOptions};
use pairfs_fs::inspect::{self, Owner};
use pairfs_fs::{Fs, FsMode, FsOptions};
use serde::Serialize;

use crate::config::NodeConfig;
use crate::node::force::{EntriesReport, PRESERVED_DIR, summarize, write_report};
use crate::state::{DiffBitmap, FENCED_FILE, Fenced, REJOIN_FILE, load_state, save_state};

/// Bytes read from a file at a time when exporting it.
const EXPORT_CHUNK: u32 = 1 << 20;

/// What `pairfs rejoin` set aside.
#[derive(Debug, Serialize)]
pub struct RejoinReport {
    pub at_ns: u64,
    /// The new primary's generation branched off at this seq.
    pub base_seq: u64,
    /// This node's tail: its entries after `base_seq`.
    pub tail: EntriesReport,
    /// The node had fallen back to its difference bitmap: the tail has blocks no entry
    /// names (counted in `tail_blocks`, not in `tail`).
    pub partial: bool,
    /// Every block the tail wrote (the primary resyncs these, and its own changes).
    pub tail_blocks: u64,
    /// The files copied into `dir/files/`, and those that could not be.
    pub exported: Vec<String>,
    pub not_exported: Vec<String>,
    pub dir: String,
}

/// Runs `pairfs rejoin`.
pub fn rejoin(config: &Path) -> Result<RejoinReport> {
    let cfg = NodeConfig::load(config)?;
    let dd = DataDir::open(&cfg.data).context("the node must be stopped for a rejoin")?;
    let st = load_state(&cfg.data)?
        .with_context(|| format!("{} is not a node of a pair", cfg.data.display()))?;
    let fenced = Fenced::load(&cfg.data)?;
    let Some(fenced) = fenced.filter(|_| st.role == Role::Secondary) else {
        bail!(
            "{} was not fenced after a forced takeover (no {FENCED_FILE}): there is no \
             divergent tail to set aside",
            cfg.data.display()
        );
    };
    let vol = crate::daemon::open_volume(
        &dd,
        VolumeOptions {
            retain: true,
            ..VolumeOptions::default()
        },
    )?;
    let blocks = vol.block_count();
    let (id, bs) = (vol.id(), vol.block_size() as u32);
    let base = Seq(fenced.base);
    let mut tail: Vec<EntryHeader> = Vec::new();
    for m in vol.retained_entries() {
        if m.seq > base {
            tail.push(
                vol.entry_header(m.seq)
                    .context("reading the tail's entries")?,
            );
        }
    }
    let mut tail_blocks = DiffBitmap::load_at(cfg.data.join(REJOIN_FILE), blocks)?;
    let own = DiffBitmap::load(&cfg.data, blocks)?;
    let partial = own.count() > 0;
    tail_blocks.mark(own.marked());
    tail_blocks.mark(vol.retained_blocks(vol.journal().last_seq())?);
    tail_blocks.mark(tail.iter().flat_map(|h| h.blocks.iter().copied()));

    // 1. The report and the files the tail touched.
    let at_ns = pairfs::types::now_ns();
    let dir = cfg.data.join(PRESERVED_DIR).join(format!(
        "diverged-{}-seq{}",
        at_ns / 1_000_000_000,
        fenced.base
    ));
    std::fs::create_dir_all(dir.join("files"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let fs = Fs::open(
        vol,
        FsOptions {
            track_lookups: false,
            atime: false,
            mode: FsMode::Replica,
            reap_at_open: false,
        },
    )
    .context("opening the filesystem to export the tail's files")?;
    let wanted = tail_blocks.marked();
    let owners: BTreeMap<BlockNo, Owner> = fs
        .with_volume(|v| inspect::locate(v, &wanted))
        .context("finding the files the tail touched")?;
    let summary = summarize(&tail, &owners);
    let mut files: Vec<String> = owners
        .values()
        .filter_map(|o| match o {
            Owner::File { path, .. } if path.starts_with('/') => Some(path.clone()),
            _ => None,
        })
        .collect();
    files.sort();
    files.dedup();
    let (mut exported, mut not_exported) = (Vec::new(), Vec::new());
    for f in files {
        match export_file(&fs, &f, &dir.join("files")) {
            Ok(()) => exported.push(f),
            Err(e) => {
                tracing::warn!(file = %f, error = %format!("{e:#}"), "exporting a file of the tail");
                not_exported.push(f);
            }
        }
    }
    pairfs::datadir::sync_dir(&dir)?;
    let report = RejoinReport {
        at_ns,
        base_seq: fenced.base,
        tail: summary,
        partial,
        tail_blocks: tail_blocks.count(),
        exported,
        not_exported,
        dir: dir.display().to_string(),
    };
    write_report(&dir.join("report.json"), &report)?;

    // 2. The tail's blocks, for the primary.
    tail_blocks.persist()?;

    // 3. Everything into the normal area; the state no longer claims a filesystem.
    let mut vol = fs.into_volume();
    let last = vol.journal().last_seq();
    vol.force_release(last)
        .context("checkpointing the volume")?;
    vol.close().context("closing the volume")?;
    drop(vol);
    let mut st = st;
    st.inconsistent_until = Some(Seq::NONE);
    st.generations.clear();
    st.empty = false;
    st.takeover = None;
    st.degraded = None;
    st.backlog = pairfs::repl::Backlog::Journal;
    st.full_copy = false;
    save_state(&cfg.data, &st)?;

    // 4. A new chain.
    pairfs::datadir::recreate_journal(&cfg.data, id, bs, blocks)?;
    let mut own = own;
    own.clear();
    own.persist()?;
    let fp = cfg.data.join(FENCED_FILE);
    std::fs::remove_file(&fp).with_context(|| format!("removing {}", fp.display()))?;
    pairfs::datadir::sync_dir(&cfg.data)?;
    drop(dd);
    Ok(report)
}

/// Copies the file at `path` (absolute, in the filesystem) under `into`.
fn export_file(fs: &Fs, path: &str, into: &Path) -> Result<()> {
    let mut ino = 1u64;
    let mut dest = PathBuf::from(into);
    for part in path.split('/').filter(|p| !p.is_empty()) {
        ino = fs.lookup(ino, part.as_bytes())?.ino;
        dest.push(part);
    }
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let size = fs.getattr(ino)?.size;
    let mut out = std::fs::File::create(&dest)?;
    let mut off = 0;
    while off < size {
        let data = fs.read(ino, off, EXPORT_CHUNK)?;
        if data.is_empty() {
            break;
        }
        std::io::Write::write_all(&mut out, &data)?;
        off += data.len() as u64;
    }
    out.sync_all()?;
    Ok(())
}

impl RejoinReport {
    /// The report for a person.
    pub fn describe(&self) -> String {
        let t = &self.tail;
        let seqs = match (t.first_seq, t.last_seq) {
            (Some(a), Some(b)) => format!("seqs {a}..={b}, "),
            _ => String::new(),
        };
        format!(
            "rejoin: this node's tail after seq {} is set aside: {} entries ({seqs}{}), {} \
             blocks{}\n  files copied out: {}{}\n  details: {}/report.json\n  start the node: \
             the primary resyncs these blocks and those it changed since, then streams",
            self.base_seq,
            t.entries,
            crate::size::human(t.bytes),
            self.tail_blocks,
            if self.partial {
                " (some known only by the difference bitmap)"
            } else {
                ""
            },
            if self.exported.is_empty() {
                "none".to_string()
            } else {
                self.exported.join(", ")
            },
            if self.not_exported.is_empty() {
                String::new()
            } else {
                format!("\n  could not be copied: {}", self.not_exported.join(", "))
            },
            self.dir
        )
    }
}
