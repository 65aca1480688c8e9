//! A node's data directory (FORMAT.md §1): the `volume` file (normal area), the `journal`
//! file (remote-unreflected area), the `lu` file (local-unreflected area, FORMAT.md §5.1)
//! and a `lock` file that one process at a time holds.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::device::{BlockDevice, FileDevice};
use crate::error::VolumeError;
use crate::journal::{Journal, JournalExpect};
use crate::takeover::LuArea;
use crate::types::{Seq, VolumeId};
use crate::volume::{Volume, valid_block_size};

/// File name of the normal area.
pub const VOLUME_FILE: &str = "volume";
/// File name of the journal.
pub const JOURNAL_FILE: &str = "journal";
/// File name of the local-unreflected area.
pub const LU_FILE: &str = "lu";
/// File name of the lock.
pub const LOCK_FILE: &str = "lock";

/// Smallest journal pairfs creates by default.
pub const MIN_DEFAULT_JOURNAL: u64 = 16 << 20;
/// Largest journal pairfs creates by default (a replication backlog of about four seconds
/// at full disk speed before the bitmap fallback; `--journal-size` raises it).
pub const MAX_DEFAULT_JOURNAL: u64 = 1 << 30;

/// Errors of data-directory handling.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Filesystem error on a path.
    #[error("{path}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The directory already holds a node.
    #[error("{0} already holds a pairfs node (volume, journal); pass --force to overwrite it")]
    Exists(PathBuf),
    /// The directory does not hold a node.
    #[error(
        "{0} is not a pairfs data directory (no volume/journal files); create one with `pairfs init`"
    )]
    Missing(PathBuf),
    /// Another process has the node open.
    #[error("{0} is in use by another pairfs process (lock held)")]
    Locked(PathBuf),
    /// Bad creation parameters.
    #[error("{0}")]
    Invalid(String),
    /// Volume-level error.
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

/// Creation parameters.
#[derive(Clone, Debug)]
pub struct CreateParams {
    /// Size of the normal area in bytes (rounded down to the block size).
    pub size: u64,
    /// Block size.
    pub block_size: u32,
    /// Journal size in bytes; `None` picks one from the volume size.
    pub journal_size: Option<u64>,
    /// Size of the local-unreflected area in bytes; `None`: the journal's.
    pub lu_size: Option<u64>,
    /// Overwrite an existing node.
    pub force: bool,
}

/// The two devices of a node: (normal area, journal).
pub type Devices = (Box<dyn BlockDevice>, Box<dyn BlockDevice>);

/// An open data directory: the lock is held for as long as this value lives.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    _lock: File,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The default journal size for a volume of `size` bytes: an eighth of it, clamped.
pub fn default_journal_size(size: u64, block_size: u32) -> u64 {
    let bs = u64::from(block_size);
    let j = (size / 8).clamp(MIN_DEFAULT_JOURNAL, MAX_DEFAULT_JOURNAL);
    (j / bs * bs).max(Journal::min_capacity(block_size))
}

impl DataDir {
    /// Locks `path` (which must exist) for exclusive use.
    fn lock(path: &Path) -> Result<File, DataDirError> {
        let lp = path.join(LOCK_FILE);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lp)
            .map_err(io_at(&lp))?;
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(DataDirError::Locked(path.to_path_buf()));
            }
            return Err(DataDirError::Io {
                path: lp,
                source: e,
            });
        }
        Ok(f)
    }

    /// Creates a node's data directory and formats its journal. Returns the open
    /// directory and the new volume id; the caller then formats the FS on the volume.
    pub fn create(path: &Path, p: &CreateParams) -> Result<(DataDir, VolumeId), DataDirError> {
        if !valid_block_size(p.block_size) {
            return Err(DataDirError::Invalid(format!(
                "block size {} is invalid: use a power of two from 4096 to 65536",
                p.block_size
            )));
        }
        let bs = u64::from(p.block_size);
        let size = p.size / bs * bs;
        if size < 64 * bs {
            return Err(DataDirError::Invalid(format!(
                "volume size {} is too small: at least {} bytes (64 blocks of {bs})",
                p.size,
                64 * bs
            )));
        }
        let log_size = |what: &str, v: u64| {
            let v = v / bs * bs;
            if v < Journal::min_capacity(p.block_size) {
                return Err(DataDirError::Invalid(format!(
                    "{what} size {v} is too small: at least {} bytes",
                    Journal::min_capacity(p.block_size)
                )));
            }
            Ok(v)
        };
        let jsize = match p.journal_size {
            Some(j) => log_size("journal", j)?,
            None => default_journal_size(size, p.block_size),
        };
        let lsize = match p.lu_size {
            Some(l) => log_size("local-unreflected area", l)?,
            None => jsize,
        };
        std::fs::create_dir_all(path).map_err(io_at(path))?;
        let lock = Self::lock(path)?;
        let vp = path.join(VOLUME_FILE);
        let jp = path.join(JOURNAL_FILE);
        let lp = path.join(LU_FILE);
        if vp.exists() || jp.exists() {
            if !p.force {
                return Err(DataDirError::Exists(path.to_path_buf()));
            }
            for f in [&vp, &jp, &lp] {
                match std::fs::remove_file(f) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(DataDirError::Io {
                            path: f.to_path_buf(),
                            source: e,
                        });
                    }
                    _ => {}
                }
            }
        }
        let normal = FileDevice::create(&vp, size).map_err(io_at(&vp))?;
        let journal = FileDevice::create(&jp, jsize).map_err(io_at(&jp))?;
        journal.preallocate(jsize).map_err(io_at(&jp))?;
        let id = VolumeId::random().map_err(io_at(path))?;
        Volume::create(&normal, &journal, id, p.block_size)?;
        create_lu(&lp, lsize, id, p.block_size, size / bs)?;
        normal.sync().map_err(io_at(&vp))?;
        sync_dir(path)?;
        Ok((
            DataDir {
                path: path.to_path_buf(),
                _lock: lock,
            },
            id,
        ))
    }

    /// Opens and locks an existing data directory.
    pub fn open(path: &Path) -> Result<DataDir, DataDirError> {
        if !path.join(VOLUME_FILE).exists() || !path.join(JOURNAL_FILE).exists() {
            return Err(DataDirError::Missing(path.to_path_buf()));
        }
        let lock = Self::lock(path)?;
        Ok(DataDir {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// Opens the local-unreflected area (FORMAT.md §5.1) and recovers it; entries at or
    /// below `merged` are released. A node made before the area existed gets one now, the
    /// size of its journal.
    pub fn open_lu(
        &self,
        volume_id: VolumeId,
        expect: JournalExpect,
        merged: Seq,
    ) -> Result<LuArea, DataDirError> {
        open_lu(&self.path, volume_id, expect, merged)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the two devices (read-write unless `read_only`).
    pub fn devices(&self, read_only: bool) -> Result<Devices, DataDirError> {
        let vp = self.path.join(VOLUME_FILE);
        let jp = self.path.join(JOURNAL_FILE);
        let open = |p: &Path| {
            if read_only {
                FileDevice::open_read_only(p)
            } else {
                FileDevice::open(p)
            }
        };
        let n = open(&vp).map_err(io_at(&vp))?;
        let j = open(&jp).map_err(io_at(&jp))?;
        Ok((Box::new(n), Box::new(j)))
    }
}

/// [`DataDir::open_lu`] for the node whose data directory is `path` (its daemon holds
/// the lock).
pub fn open_lu(
    path: &Path,
    volume_id: VolumeId,
    expect: JournalExpect,
    merged: Seq,
) -> Result<LuArea, DataDirError> {
    let lp = path.join(LU_FILE);
    if !lp.exists() {
        let jp = path.join(JOURNAL_FILE);
        let jsize = std::fs::metadata(&jp).map_err(io_at(&jp))?.len();
        create_lu(
            &lp,
            jsize,
            volume_id,
            expect.block_size,
            expect.normal_blocks,
        )?;
        sync_dir(path)?;
    }
    let dev = FileDevice::open(&lp).map_err(io_at(&lp))?;
    LuArea::open(Box::new(dev), expect, merged).map_err(|e| DataDirError::Volume(e.into()))
}

/// Creates and formats a local-unreflected area file of `len` bytes.
fn create_lu(
    path: &Path,
    len: u64,
    id: VolumeId,
    block_size: u32,
    normal_blocks: u64,
) -> Result<(), DataDirError> {
    let dev = FileDevice::create(path, len).map_err(io_at(path))?;
    dev.preallocate(len).map_err(io_at(path))?;
    LuArea::format(&dev, id, block_size, normal_blocks)
        .map_err(|e| DataDirError::Volume(e.into()))?;
    dev.sync().map_err(io_at(path))
}

/// Replaces the journal of the node in `path` with an empty one of the same size and
/// identity (`pairfs rejoin`, PROTOCOL.md §7.8: a node whose tail was set aside starts a
/// new chain, and none of its old entries may continue it). The volume must be closed
/// with everything checkpointed into the normal area, the directory locked by the caller.
pub fn recreate_journal(
    path: &Path,
    id: VolumeId,
    block_size: u32,
    normal_blocks: u64,
) -> Result<(), DataDirError> {
    let jp = path.join(JOURNAL_FILE);
    let len = std::fs::metadata(&jp).map_err(io_at(&jp))?.len();
    let tmp = path.join("journal.new");
    let dev = FileDevice::create(&tmp, len).map_err(io_at(&tmp))?;
    dev.preallocate(len).map_err(io_at(&tmp))?;
    Journal::format(&dev, id, block_size, normal_blocks)
        .map_err(|e| DataDirError::Volume(e.into()))?;
    dev.sync().map_err(io_at(&tmp))?;
    drop(dev);
    std::fs::rename(&tmp, &jp).map_err(io_at(&jp))?;
    sync_dir(path)
}

/// Makes a directory's entries durable (after creating or renaming files in it).
pub fn sync_dir(path: &Path) -> Result<(), DataDirError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_at(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("pairfs-dd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    fn params(size: u64) -> CreateParams {
        CreateParams {
            size,
            block_size: 4096,
            journal_size: None,
            lu_size: None,
            force: false,
        }
    }

    #[test]
    fn create_refuses_to_overwrite_without_force_and_locks() {
        let p = tmp("create");
        let (dd, _) = DataDir::create(&p, &params(8 << 20)).unwrap();
        assert!(matches!(DataDir::open(&p), Err(DataDirError::Locked(_))));
        drop(dd);
        let err = DataDir::create(&p, &params(8 << 20)).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        let force = CreateParams {
            force: true,
            ..params(8 << 20)
        };
        let (dd, _) = DataDir::create(&p, &force).unwrap();
        let (n, j) = dd.devices(false).unwrap();
        assert_eq!(n.len().unwrap(), 8 << 20);
        assert_eq!(j.len().unwrap(), MIN_DEFAULT_JOURNAL);
        let expect = JournalExpect {
            block_size: 4096,
            normal_blocks: 2048,
        };
        let lu = dd.open_lu(VolumeId::default(), expect, Seq::NONE).unwrap();
        assert_eq!(
            lu.usage().1,
            MIN_DEFAULT_JOURNAL - 4096,
            "the LU area is the journal's size"
        );
        drop(dd);
        std::fs::remove_dir_all(&p).unwrap();
    }

    #[test]
    fn bad_sizes_are_clear_errors() {
        let p = tmp("bad");
        let e = DataDir::create(&p, &params(1000)).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        let e = DataDir::create(
            &p,
            &CreateParams {
                block_size: 3000,
                ..params(8 << 20)
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("power of two"), "{e}");
        assert!(matches!(DataDir::open(&p), Err(DataDirError::Missing(_))));
        let _ = std::fs::remove_dir_all(&p);
    }

    #[test]
    fn default_journal_sizes() {
        assert_eq!(default_journal_size(1 << 20, 4096), MIN_DEFAULT_JOURNAL);
        assert_eq!(default_journal_size(1 << 30, 4096), 128 << 20);
        assert_eq!(default_journal_size(1 << 40, 4096), MAX_DEFAULT_JOURNAL);
    }
}
