//! Storage behind a trait (docs/DESIGN.md §10.1, after redb's `StorageBackend`).
//!
//! A [`BlockDevice`] is a flat, positional byte store: the normal area and the journal of a
//! node each live on one. Three implementations:
//!
//! - [`FileDevice`]: a file of the data directory (`pread`/`pwrite`/`fdatasync`);
//! - [`MemDevice`]: a byte vector, for unit tests;
//! - [`crate::crash::CrashDevice`]: keeps what was written apart from what is durable and
//!   produces the image a crash would leave.
//!
//! `sync` (and `sync_separately`, the same barrier through another open file) is the only
//! durability barrier: nothing written before it may be lost after it returns, anything
//! written since the previous one may be. `start_writeback` is a hint, not a barrier.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::RwLock;

/// A positional byte store with an explicit durability barrier.
#[allow(clippy::len_without_is_empty)] // a device is never "empty": it has a size
pub trait BlockDevice: Send + Sync {
    /// Fills `buf` from `offset`. Reading past the end is an error (`UnexpectedEof`).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Fills `bufs` one after the other from `offset`: one contiguous range read straight
    /// into separate buffers (a file reads it in one system call per [`IOV_MAX`] buffers).
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
        let mut off = offset;
        for b in bufs.iter_mut() {
            self.read_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    /// Writes all of `buf` at `offset`, growing the device if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes `bufs` one after the other from `offset`: one contiguous range written
    /// straight from separate buffers (a file writes it in one system call per
    /// [`IOV_MAX`] buffers), with no copy into one buffer first.
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut off = offset;
        for b in bufs {
            self.write_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Sets the length (new bytes read as zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes everything written so far durable.
    fn sync(&self) -> io::Result<()>;
    /// The same barrier as [`sync`](Self::sync), through an open file description of its
    /// own where the device has one: Linux reports a writeback error once per open file
    /// description, so an error seen here is still reported to the next `sync` as well.
    /// That lets a caller run it outside the lock that orders the other syncs (see
    /// `Volume::flush_ahead`). The default is `sync`.
    fn sync_separately(&self) -> io::Result<()> {
        self.sync()
    }
    /// Starts writing back what was written, without waiting for it and without making
    /// anything durable: a hint, so that a later [`sync`](Self::sync) (the barrier) finds
    /// less left to do. The default does nothing.
    fn start_writeback(&self) -> io::Result<()> {
        Ok(())
    }
    /// Byte ranges that may hold data, as `(offset, length)`: everything else reads as
    /// zeros and was never written (sparse files). The default is the whole device.
    fn data_ranges(&self) -> io::Result<Vec<(u64, u64)>> {
        Ok(vec![(0, self.len()?)])
    }
}

/// A device backed by a file (the production implementation).
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    /// A second open of the same file, for [`BlockDevice::sync_separately`] (read-write
    /// devices only).
    flush: Option<File>,
}

impl FileDevice {
    /// Opens an existing file read-write.
    pub fn open(path: &Path) -> io::Result<Self> {
        let rw = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
        };
        Ok(Self {
            file: rw()?,
            flush: Some(rw()?),
        })
    }

    /// Opens an existing file read-only: writes fail with `PermissionDenied`-like errors.
    pub fn open_read_only(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).open(path)?;
        Ok(Self { file, flush: None })
    }

    /// Creates a new file (fails if it exists) of `len` bytes (sparse).
    pub fn create(path: &Path, len: u64) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(len)?;
        let flush = std::fs::OpenOptions::new().write(true).open(path)?;
        Ok(Self {
            file,
            flush: Some(flush),
        })
    }

    /// Reserves the file's blocks on the host filesystem so that later writes cannot fail
    /// with ENOSPC and `fdatasync` has no allocation metadata to flush (used for the journal).
    pub fn preallocate(&self, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let len = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
        // SAFETY: plain syscall on a file descriptor we own.
        let rc = unsafe { libc::posix_fallocate(self.file.as_raw_fd(), 0, len) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }
}

/// Buffers per `preadv` call (Linux's `IOV_MAX`).
pub const IOV_MAX: usize = 1024;

/// The loop of a positional vectored transfer of all of `slices` from `off`: `call` makes
/// one `preadv`/`pwritev` of the slices left at a position and returns what it returned;
/// a short transfer moves on past what was done, `EINTR` retries, 0 bytes is `zero`.
/// Returns the offset after the last byte.
fn all_vectored<S>(
    slices: &mut [S],
    mut off: u64,
    zero: io::ErrorKind,
    advance: fn(&mut &mut [S], usize),
    mut call: impl FnMut(&[S], libc::off_t) -> isize,
) -> io::Result<u64> {
    let mut rest = slices;
    while !rest.is_empty() {
        let pos = libc::off_t::try_from(off)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset"))?;
        let n = call(rest, pos);
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(zero));
        }
        off += n as u64;
        advance(&mut rest, n as usize);
    }
    Ok(off)
}

impl BlockDevice for FileDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut off = offset;
        for group in bufs.chunks_mut(IOV_MAX) {
            let mut slices: Vec<io::IoSliceMut<'_>> =
                group.iter_mut().map(|b| io::IoSliceMut::new(b)).collect();
            let eof = io::ErrorKind::UnexpectedEof;
            off = all_vectored(
                &mut slices,
                off,
                eof,
                io::IoSliceMut::advance_slices,
                |rest, pos| {
                    // SAFETY: `IoSliceMut` is ABI-compatible with `iovec`; `rest` holds at most
                    // IOV_MAX valid, writable buffers borrowed for the call.
                    unsafe {
                        libc::preadv(
                            self.file.as_raw_fd(),
                            rest.as_ptr().cast::<libc::iovec>(),
                            rest.len() as libc::c_int,
                            pos,
                        )
                    }
                },
            )?;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut off = offset;
        for group in bufs.chunks(IOV_MAX) {
            let mut slices: Vec<io::IoSlice<'_>> =
                group.iter().map(|b| io::IoSlice::new(b)).collect();
            let zero = io::ErrorKind::WriteZero;
            off = all_vectored(
                &mut slices,
                off,
                zero,
                io::IoSlice::advance_slices,
                |rest, pos| {
                    // SAFETY: `IoSlice` is ABI-compatible with `iovec`; `rest` holds at most
                    // IOV_MAX valid buffers borrowed for the call.
                    unsafe {
                        libc::pwritev(
                            self.file.as_raw_fd(),
                            rest.as_ptr().cast::<libc::iovec>(),
                            rest.len() as libc::c_int,
                            pos,
                        )
                    }
                },
            )?;
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn sync_separately(&self) -> io::Result<()> {
        self.flush.as_ref().unwrap_or(&self.file).sync_data()
    }
    fn start_writeback(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // Only SYNC_FILE_RANGE_WRITE: it does not wait, so it does not collect (and so
        // cannot hide from the next fdatasync) a writeback error.
        // SAFETY: a plain system call on a descriptor we own; the result is checked.
        let r = unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    fn data_ranges(&self) -> io::Result<Vec<(u64, u64)>> {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        let len = self.len()?;
        let mut out = Vec::new();
        let mut pos: u64 = 0;
        while pos < len {
            // SAFETY: lseek on a descriptor we own; errors are checked.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break; // no data after pos
                }
                if e.raw_os_error() == Some(libc::EINVAL) {
                    return Ok(vec![(0, len)]); // no SEEK_DATA support: assume all
                }
                return Err(e);
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(io::Error::last_os_error());
            }
            out.push((data as u64, (hole - data) as u64));
            pos = hole as u64;
        }
        Ok(out)
    }
}

/// An in-memory device; `sync` is a no-op (everything written is "durable").
#[derive(Debug, Default)]
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
}

impl MemDevice {
    /// A zero-filled device of `len` bytes.
    pub fn new(len: u64) -> Self {
        Self::from_bytes(vec![0; len as usize])
    }
    /// A device holding `bytes` (e.g. a crash image).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            data: RwLock::new(bytes),
        }
    }
    /// A copy of the contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        read_lock(&self.data).clone()
    }
}

pub(crate) fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it; the bytes are
    // still the bytes (these devices have no multi-step invariants).
    l.read().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn write_lock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn read_from(data: &[u8], buf: &mut [u8], offset: u64) -> io::Result<()> {
    let start = usize::try_from(offset).map_err(|_| eof())?;
    let end = start.checked_add(buf.len()).ok_or_else(eof)?;
    let src = data.get(start..end).ok_or_else(eof)?;
    buf.copy_from_slice(src);
    Ok(())
}

pub(crate) fn write_into(data: &mut Vec<u8>, buf: &[u8], offset: u64) -> io::Result<()> {
    let start = usize::try_from(offset).map_err(|_| eof())?;
    let end = start.checked_add(buf.len()).ok_or_else(eof)?;
    if data.len() < end {
        data.resize(end, 0);
    }
    data[start..end].copy_from_slice(buf);
    Ok(())
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "read past the end of the device",
    )
}

impl BlockDevice for MemDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_from(&read_lock(&self.data), buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        write_into(&mut write_lock(&self.data), buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(read_lock(&self.data).len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        write_lock(&self.data).resize(len as usize, 0);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

impl<D: BlockDevice + ?Sized> BlockDevice for std::sync::Arc<D> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
        (**self).read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        (**self).write_vectored_at(bufs, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn sync_separately(&self) -> io::Result<()> {
        (**self).sync_separately()
    }
    fn start_writeback(&self) -> io::Result<()> {
        (**self).start_writeback()
    }
    fn data_ranges(&self) -> io::Result<Vec<(u64, u64)>> {
        (**self).data_ranges()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_device_reads_back_and_rejects_reads_past_end() {
        let d = MemDevice::new(16);
        d.write_at(b"abcd", 4).unwrap();
        let mut buf = [0u8; 6];
        d.read_at(&mut buf, 2).unwrap();
        assert_eq!(&buf, b"\0\0abcd");
        assert_eq!(
            d.read_at(&mut buf, 12).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        d.write_at(b"xy", 20).unwrap();
        assert_eq!(d.len().unwrap(), 22);
    }

    /// More buffers than one `preadv` takes, of uneven sizes, from an uneven offset: the
    /// same bytes as one plain read; and past the end, an error like `read_at`'s.
    #[test]
    fn file_device_vectored_reads_match_plain_reads() {
        let path = std::env::temp_dir().join(format!("pairfs-devv-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let content: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let d = FileDevice::create(&path, content.len() as u64).unwrap();
        d.write_at(&content, 0).unwrap();
        let sizes: Vec<usize> = (0..IOV_MAX * 2 + 77).map(|i| 1 + i % 61).collect();
        let total: usize = sizes.iter().sum();
        let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
        let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
        d.read_vectored_at(&mut slices, 13).unwrap();
        assert_eq!(bufs.concat(), &content[13..13 + total]);
        let mut tail = [vec![0u8; 10], vec![0u8; 10]];
        let mut slices: Vec<&mut [u8]> = tail.iter_mut().map(Vec::as_mut_slice).collect();
        let err = d
            .read_vectored_at(&mut slices, content.len() as u64 - 15)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let _ = std::fs::remove_file(&path);
    }

    /// More buffers than one `pwritev` takes, of uneven sizes, at an uneven offset: the
    /// same bytes as one plain write, and nothing around them touched.
    #[test]
    fn file_device_vectored_writes_match_plain_writes() {
        let path = std::env::temp_dir().join(format!("pairfs-devw-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let d = FileDevice::create(&path, 300_000).unwrap();
        d.write_at(&vec![0xee; 300_000], 0).unwrap();
        let sizes: Vec<usize> = (0..IOV_MAX * 2 + 77).map(|i| 1 + i % 61).collect();
        let bufs: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![(i % 251) as u8; n])
            .collect();
        let slices: Vec<&[u8]> = bufs.iter().map(Vec::as_slice).collect();
        d.write_vectored_at(&slices, 13).unwrap();
        let want = bufs.concat();
        let mut got = vec![0u8; want.len() + 26];
        d.read_at(&mut got, 0).unwrap();
        assert_eq!(&got[..13], &[0xee; 13]);
        assert_eq!(&got[13..13 + want.len()], &want[..]);
        assert_eq!(&got[13 + want.len()..], &[0xee; 13]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn file_device_round_trip() {
        let dir = std::env::temp_dir().join(format!("pairfs-dev-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let d = FileDevice::create(&dir, 8192).unwrap();
        d.write_at(b"hello", 4096).unwrap();
        d.sync().unwrap();
        let mut buf = [0u8; 5];
        d.read_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(d.len().unwrap(), 8192);
        assert!(
            FileDevice::create(&dir, 1).is_err(),
            "create must not overwrite"
        );
        std::fs::remove_file(&dir).unwrap();
    }
}
