//! Files a replicated node keeps next to its volume (docs/PROTOCOL.md §1, §5.1):
//!
//! - `pair.state`: the replicator's persisted state (role, epoch, generations, backlog);
//! - `diff.bitmap`: the difference bitmap (blocks changed and not known to be on the peer).
//!
//! Both are small and rewritten whole: temp file, fsync, rename, fsync of the directory
//! (docs/DESIGN.md §10.3 "Durable file replacement"), with a magic and a CRC-32C so that a damaged
//! file is an error, never a silently wrong state.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use bitvec::prelude::*;
use pairfs::repl::PersistedState;
use pairfs::types::crc32c;

/// Version 2 (issue 9): generations record where they branched (`base`), and the state
/// records sync mode and a degraded pair. Version 1 files are read and upgraded.
const STATE_MAGIC: &[u8; 8] = b"PFSTATE3";
const STATE_MAGIC_V2: &[u8; 8] = b"PFSTATE2";
const STATE_MAGIC_V1: &[u8; 8] = b"PFSTATE1";
const BITMAP_MAGIC: &[u8; 8] = b"PFDBMAP1";

/// Name of the pair state file in the data directory.
pub const STATE_FILE: &str = "pair.state";
/// Name of the difference bitmap file in the data directory.
pub const BITMAP_FILE: &str = "diff.bitmap";
/// A node rejoining after a divergence: the blocks of its own tail (format of
/// [`BITMAP_FILE`]; docs/PROTOCOL.md §7.8), until it is consistent again.
pub const REJOIN_FILE: &str = "rejoin.bitmap";
/// An old primary fenced on its return after a forced takeover (JSON, [`Fenced`]).
pub const FENCED_FILE: &str = "fenced.json";

/// Where a fenced old primary's lineage left the new primary's (for `pairfs rejoin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fenced {
    /// The new primary's generation branches off at this seq.
    pub base: u64,
    /// This node's newest durable seq when it was fenced: its tail is `base + 1..=newest`.
    pub newest: u64,
    /// When (ns since the Unix epoch).
    pub at_ns: u64,
}

impl Fenced {
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut b = serde_json::to_vec_pretty(self).context("encoding the fencing record")?;
        b.push(b'\n');
        write_durably(&dir.join(FENCED_FILE), &b)
    }

    pub fn load(dir: &Path) -> Result<Option<Fenced>> {
        let path = dir.join(FENCED_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .with_context(|| format!("{} is not a fencing record", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// Replaces `path` durably with `bytes`.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    if let Some(dir) = path.parent() {
        pairfs::datadir::sync_dir(dir)?;
    }
    Ok(())
}

fn framed(magic: &[u8; 8], payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + payload.len());
    v.extend_from_slice(magic);
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(&crc32c(payload).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

fn unframe<'a>(magic: &[u8; 8], bytes: &'a [u8], what: &Path) -> Result<&'a [u8]> {
    if bytes.len() < 16 || &bytes[..8] != magic {
        bail!(
            "{} is not a pairfs file of this kind (bad magic)",
            what.display()
        );
    }
    let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    let crc = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    let payload = bytes
        .get(16..16 + len)
        .with_context(|| format!("{} is truncated", what.display()))?;
    if crc32c(payload) != crc {
        bail!("{} is corrupt (checksum mismatch)", what.display());
    }
    Ok(payload)
}

/// Reads `pair.state`, if it exists.
pub fn load_state(dir: &Path) -> Result<Option<PersistedState>> {
    let path = dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if bytes.starts_with(STATE_MAGIC_V1) {
        let payload = unframe(STATE_MAGIC_V1, &bytes, &path)?;
        let v1: v1::PersistedState = bincode::deserialize(payload)
            .with_context(|| format!("{} does not decode", path.display()))?;
        return Ok(Some(v1.upgrade()));
    }
    if bytes.starts_with(STATE_MAGIC_V2) {
        // Version 3 only appends `takeover` (an Option): version 2 is version 3 with None.
        let mut payload = unframe(STATE_MAGIC_V2, &bytes, &path)?.to_vec();
        payload.push(0);
        let st = bincode::deserialize(&payload)
            .with_context(|| format!("{} does not decode", path.display()))?;
        return Ok(Some(st));
    }
    let payload = unframe(STATE_MAGIC, &bytes, &path)?;
    let st = bincode::deserialize(payload)
        .with_context(|| format!("{} does not decode", path.display()))?;
    Ok(Some(st))
}

/// The version-1 layout of `pair.state` (before issue 9), read to upgrade it.
mod v1 {
    use pairfs::Seq;
    use pairfs::repl::{Backlog, Epoch, Generation, Role};
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub(super) struct GenerationV1 {
        id: u64,
        start: Seq,
    }

    #[derive(Deserialize)]
    pub(super) struct PersistedState {
        role: Role,
        epoch: Epoch,
        generations: Vec<GenerationV1>,
        backlog: Backlog,
        inconsistent_until: Option<Seq>,
        empty: bool,
        paired: bool,
    }

    impl PersistedState {
        /// Version 1 wrote a generation's first seq; a later one continued from the seq
        /// before it.
        pub(super) fn upgrade(self) -> pairfs::repl::PersistedState {
            pairfs::repl::PersistedState {
                role: self.role,
                epoch: self.epoch,
                generations: self
                    .generations
                    .iter()
                    .enumerate()
                    .map(|(i, g)| Generation {
                        id: g.id,
                        base: if i == 0 {
                            Seq::NONE
                        } else {
                            Seq(g.start.0.saturating_sub(1))
                        },
                    })
                    .collect(),
                backlog: self.backlog,
                inconsistent_until: self.inconsistent_until,
                empty: self.empty,
                paired: self.paired,
                sync_mode: false,
                degraded: None,
                full_copy: false,
                takeover: None,
            }
        }
    }
}

/// Writes `pair.state` durably.
pub fn save_state(dir: &Path, st: &PersistedState) -> Result<()> {
    let payload = bincode::serialize(st).context("encoding the pair state")?;
    write_durably(&dir.join(STATE_FILE), &framed(STATE_MAGIC, &payload))
}

/// The difference bitmap: one bit per block of the volume.
pub struct DiffBitmap {
    path: PathBuf,
    bits: BitVec<u64, Lsb0>,
}

impl DiffBitmap {
    /// Loads the bitmap of a volume of `blocks` blocks (empty if there is none yet).
    pub fn load(dir: &Path, blocks: u64) -> Result<DiffBitmap> {
        Self::load_at(dir.join(BITMAP_FILE), blocks)
    }

    /// [`DiffBitmap::load`] from another file of the same format.
    pub fn load_at(path: PathBuf, blocks: u64) -> Result<DiffBitmap> {
        let mut bits = bitvec![u64, Lsb0; 0; blocks as usize];
        match std::fs::read(&path) {
            Ok(bytes) => {
                let payload = unframe(BITMAP_MAGIC, &bytes, &path)?;
                if payload.len() < 8 {
                    bail!("{} is truncated", path.display());
                }
                let n = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
                if n != blocks {
                    bail!(
                        "{} is for a volume of {n} blocks, this one has {blocks}",
                        path.display()
                    );
                }
                let raw = &payload[8..];
                let stored = BitSlice::<u8, Lsb0>::from_slice(raw);
                if stored.len() < blocks as usize {
                    bail!("{} is truncated", path.display());
                }
                for i in stored[..blocks as usize].iter_ones() {
                    bits.set(i, true);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        Ok(DiffBitmap { path, bits })
    }

    /// Marks blocks as changed.
    pub fn mark(&mut self, blocks: impl IntoIterator<Item = u64>) {
        for b in blocks {
            if let Some(mut bit) = self.bits.get_mut(b as usize) {
                *bit = true;
            }
        }
    }

    /// Clears every mark.
    pub fn clear(&mut self) {
        self.bits.fill(false);
    }

    /// Marked blocks, in order.
    pub fn marked(&self) -> Vec<u64> {
        self.bits.iter_ones().map(|i| i as u64).collect()
    }

    /// The file exists.
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Removes the file (durably).
    pub fn remove(&self) -> Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", self.path.display()))
            }
            _ => match self.path.parent() {
                Some(d) => pairfs::datadir::sync_dir(d).map_err(Into::into),
                None => Ok(()),
            },
        }
    }

    /// Number of marked blocks.
    pub fn count(&self) -> u64 {
        self.bits.count_ones() as u64
    }

    /// Writes the bitmap durably.
    pub fn persist(&self) -> Result<()> {
        let mut payload = Vec::with_capacity(8 + self.bits.len() / 8 + 8);
        payload.extend_from_slice(&(self.bits.len() as u64).to_le_bytes());
        let mut bytes: BitVec<u8, Lsb0> = BitVec::with_capacity(self.bits.len());
        bytes.extend_from_bitslice(&self.bits);
        payload.extend_from_slice(bytes.as_raw_slice());
        write_durably(&self.path, &framed(BITMAP_MAGIC, &payload))
    }
}

/// The table a taker persists at ready (FORMAT.md §5.2): the freeze point and the headers
/// of the old primary's entries it had not applied then.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TakeoverTable {
    pub freeze: pairfs::Seq,
    pub applied_at_ready: pairfs::Seq,
    pub entries: Vec<pairfs::takeover::EntryHeader>,
    pub bitmap: Option<Vec<u8>>,
}

/// Version 1: every header's blocks one `u64` each. Read, never written.
const DLT_MAGIC_V1: &[u8; 8] = b"PFDLT001";
/// Version 2: every header's blocks as runs of consecutive blocks (FORMAT.md §5.2).
const DLT_MAGIC: &[u8; 8] = b"PFDLT002";
/// File name of the takeover table.
pub const DLT_FILE: &str = "takeover.dlt";

/// A header as version 2 stores it.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredHeader {
    seq: pairfs::Seq,
    prev_seq: pairfs::Seq,
    timestamp_ns: u64,
    bytes: u64,
    /// `(first block, blocks)`, in the header's order.
    runs: Vec<(u64, u32)>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredTable {
    freeze: pairfs::Seq,
    applied_at_ready: pairfs::Seq,
    entries: Vec<StoredHeader>,
    bitmap: Option<Vec<u8>>,
}

/// Blocks as runs of consecutive ones (a backlog of file data is mostly extents: its table
/// is a few bytes per run, not eight per block, and is written at ready).
fn runs(blocks: &[u64]) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((start, n)) if *n < u32::MAX && start.checked_add(u64::from(*n)) == Some(b) => {
                *n += 1
            }
            _ => out.push((b, 1)),
        }
    }
    out
}

fn unruns(runs: &[(u64, u32)], what: &Path) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for &(start, n) in runs {
        let end = start
            .checked_add(u64::from(n))
            .with_context(|| format!("{} names a run past the largest block", what.display()))?;
        out.extend(start..end);
    }
    Ok(out)
}

impl TakeoverTable {
    /// Writes the table durably.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let stored = StoredTable {
            freeze: self.freeze,
            applied_at_ready: self.applied_at_ready,
            entries: self
                .entries
                .iter()
                .map(|h| StoredHeader {
                    seq: h.seq,
                    prev_seq: h.prev_seq,
                    timestamp_ns: h.timestamp_ns,
                    bytes: h.bytes,
                    runs: runs(&h.blocks),
                })
                .collect(),
            bitmap: self.bitmap.clone(),
        };
        let payload = bincode::serialize(&stored).context("encoding the takeover table")?;
        write_durably(&dir.join(DLT_FILE), &framed(DLT_MAGIC, &payload))
    }

    /// Reads the table, if there is one.
    pub fn load(dir: &Path) -> Result<Option<TakeoverTable>> {
        let path = dir.join(DLT_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let not_a_table = || format!("{} is not a takeover table", path.display());
        if bytes.starts_with(DLT_MAGIC_V1) {
            let payload = unframe(DLT_MAGIC_V1, &bytes, &path)?;
            return Ok(Some(
                bincode::deserialize(payload).with_context(not_a_table)?,
            ));
        }
        let payload = unframe(DLT_MAGIC, &bytes, &path)?;
        let t: StoredTable = bincode::deserialize(payload).with_context(not_a_table)?;
        let mut entries = Vec::with_capacity(t.entries.len());
        for h in t.entries {
            entries.push(pairfs::takeover::EntryHeader {
                seq: h.seq,
                prev_seq: h.prev_seq,
                timestamp_ns: h.timestamp_ns,
                bytes: h.bytes,
                blocks: unruns(&h.runs, &path)?,
            });
        }
        Ok(Some(TakeoverTable {
            freeze: t.freeze,
            applied_at_ready: t.applied_at_ready,
            entries,
            bitmap: t.bitmap,
        }))
    }

    /// The drain is complete: the table is no longer needed.
    pub fn remove(dir: &Path) -> Result<()> {
        let path = dir.join(DLT_FILE);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => pairfs::datadir::sync_dir(dir).map_err(Into::into),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("pairfs-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn the_takeover_table_round_trips_and_a_corrupt_one_is_an_error() {
        let d = tmp("dlt");
        assert!(TakeoverTable::load(&d).unwrap().is_none());
        let t = TakeoverTable {
            freeze: pairfs::Seq(9),
            applied_at_ready: pairfs::Seq(4),
            entries: vec![pairfs::takeover::EntryHeader {
                seq: pairfs::Seq(9),
                prev_seq: pairfs::Seq(4),
                timestamp_ns: 77,
                bytes: 8192,
                blocks: vec![3, 5],
            }],
            bitmap: None,
        };
        t.save(&d).unwrap();
        assert_eq!(TakeoverTable::load(&d).unwrap(), Some(t));
        let p = d.join(DLT_FILE);
        let mut b = std::fs::read(&p).unwrap();
        b[20] ^= 1;
        std::fs::write(&p, b).unwrap();
        assert!(format!("{:#}", TakeoverTable::load(&d).unwrap_err()).contains("corrupt"));
        TakeoverTable::remove(&d).unwrap();
        assert!(TakeoverTable::load(&d).unwrap().is_none());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_table_stores_runs_of_blocks_in_their_order_and_a_version_1_table_still_reads() {
        let d = tmp("dlt-runs");
        let blocks: Vec<u64> = (100..20_100).chain([7, 3, 4, 5, 1_000_000]).collect();
        let t = TakeoverTable {
            freeze: pairfs::Seq(2),
            applied_at_ready: pairfs::Seq(1),
            entries: vec![pairfs::takeover::EntryHeader {
                seq: pairfs::Seq(2),
                prev_seq: pairfs::Seq(1),
                timestamp_ns: 5,
                bytes: blocks.len() as u64 * 4096,
                blocks,
            }],
            bitmap: None,
        };
        t.save(&d).unwrap();
        let size = std::fs::metadata(d.join(DLT_FILE)).unwrap().len();
        assert!(size < 200, "20,005 blocks in four runs take {size} bytes");
        assert_eq!(TakeoverTable::load(&d).unwrap().as_ref(), Some(&t));
        let v1 = bincode::serialize(&t).unwrap();
        std::fs::write(d.join(DLT_FILE), framed(DLT_MAGIC_V1, &v1)).unwrap();
        assert_eq!(TakeoverTable::load(&d).unwrap(), Some(t));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn state_round_trip_and_corruption() {
        let d = tmp("state");
        assert!(load_state(&d).unwrap().is_none());
        let st = PersistedState::new_primary(42);
        save_state(&d, &st).unwrap();
        assert_eq!(load_state(&d).unwrap().unwrap(), st);
        let p = d.join(STATE_FILE);
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n - 1] ^= 1;
        std::fs::write(&p, b).unwrap();
        assert!(format!("{:#}", load_state(&d).unwrap_err()).contains("corrupt"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_version_2_state_reads_as_version_3_without_a_takeover() {
        let d = tmp("v2");
        let mut st = PersistedState::new_primary(7);
        st.paired = true;
        let mut payload = bincode::serialize(&st).unwrap();
        assert_eq!(payload.pop(), Some(0), "takeover is the last field");
        std::fs::write(d.join(STATE_FILE), framed(STATE_MAGIC_V2, &payload)).unwrap();
        assert_eq!(load_state(&d).unwrap(), Some(st));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_version_1_state_is_upgraded() {
        #[derive(serde::Serialize)]
        struct G {
            id: u64,
            start: pairfs::Seq,
        }
        #[derive(serde::Serialize)]
        struct V1 {
            role: pairfs::repl::Role,
            epoch: pairfs::repl::Epoch,
            generations: Vec<G>,
            backlog: pairfs::repl::Backlog,
            inconsistent_until: Option<pairfs::Seq>,
            empty: bool,
            paired: bool,
        }
        let d = tmp("v1");
        let old = V1 {
            role: pairfs::repl::Role::Primary,
            epoch: pairfs::repl::Epoch(3),
            generations: vec![G {
                id: 9,
                start: pairfs::Seq(1),
            }],
            backlog: pairfs::repl::Backlog::Journal,
            inconsistent_until: None,
            empty: false,
            paired: true,
        };
        let payload = bincode::serialize(&old).unwrap();
        std::fs::write(d.join(STATE_FILE), framed(STATE_MAGIC_V1, &payload)).unwrap();
        let st = load_state(&d).unwrap().unwrap();
        assert_eq!(st.epoch, pairfs::repl::Epoch(3));
        assert_eq!(st.generations[0].id, 9);
        assert_eq!(st.generations[0].base, pairfs::Seq::NONE);
        assert!(st.paired && !st.sync_mode && st.degraded.is_none() && !st.full_copy);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bitmap_round_trip() {
        let d = tmp("bitmap");
        let mut m = DiffBitmap::load(&d, 1000).unwrap();
        m.mark([3, 999, 5000]);
        m.persist().unwrap();
        let m2 = DiffBitmap::load(&d, 1000).unwrap();
        assert_eq!(m2.marked(), vec![3, 999]);
        assert!(DiffBitmap::load(&d, 999).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
