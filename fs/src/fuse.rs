//! The FUSE adapter: a thin wrapper that maps fuser callbacks onto [`Fs`] (docs/DESIGN.md
//! §10.1, after mountpoint-s3 `fuse.rs`). Each callback converts its arguments, calls the FS
//! core and replies; errors become an errno here and nowhere else.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags as FuseRenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::error::FsError;
use crate::format::{Kind, Timespec};
use crate::fs::{Attr, Ctx, Fs, FsMode, RenameFlags, SetAttr, TimeSet};

/// Largest write the kernel sends in one request (1 MiB, the kernel's FUSE limit of 256
/// pages): fewer, larger transactions for sequential writes.
const MAX_WRITE: u32 = 1 << 20;

/// Mount-time options of the adapter.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    /// How long the kernel may cache entries and attributes in writable mode. pairfs is the
    /// only writer of its volume then, so a long TTL is safe.
    pub ttl: Duration,
    /// The same in replica mode: the volume changes underneath; what changed is also
    /// invalidated explicitly, a short TTL bounds what a missed invalidation can show.
    pub replica_ttl: Duration,
    /// Let the kernel cache writes (FUSE writeback cache): fewer, larger write requests.
    /// Only for a filesystem that never switches to replica mode: written into the kernel's
    /// cache, data is acknowledged before the filesystem sees it, and what the kernel writes
    /// back after a switch would be refused, so lost.
    pub writeback_cache: bool,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            ttl: Duration::from_secs(60),
            replica_ttl: Duration::from_secs(1),
            // Off by default: measured faster here for sequential writes (655 vs 482 MB/s)
            // and small-file creates (7,900 vs 6,200 files/s); only untar of many small
            // chunked writes gains from it (BENCHMARKS.md).
            writeback_cache: false,
        }
    }
}

/// How pairfs is mounted: `fs_name` (as `mount` lists it), read-write whatever the mode
/// (so that it can turn writable without a remount; see [`ReadOnlyFlag`]), with
/// `default_permissions` (the kernel checks permissions), `allow_other`, devices and setuid
/// honoured, served by `threads` threads.
pub fn session_config(fs_name: String, threads: usize) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(fs_name),
        fuser::MountOption::Subtype("pairfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::RW,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(threads);
    config.clone_fd = true;
    config
}

/// The fuser `Filesystem` of pairfs.
#[derive(Debug)]
pub struct PairFuse {
    fs: Arc<Fs>,
    opts: FuseOptions,
}

impl PairFuse {
    /// Wraps a filesystem (opened with `track_lookups`).
    pub fn new(fs: Arc<Fs>, opts: FuseOptions) -> Self {
        PairFuse { fs, opts }
    }
}

fn errno(e: &FsError) -> Errno {
    if matches!(
        e,
        FsError::Corrupt(_)
            | FsError::Volume(_)
            | FsError::BadSuperblock(_)
            | FsError::Replication(_)
    ) {
        tracing::error!(error = %e, "I/O error");
    }
    Errno::from_i32(e.errno())
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime.to_system(),
        mtime: a.mtime.to_system(),
        ctime: a.ctime.to_system(),
        crtime: a.crtime.to_system(),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(s) => TimeSet::At(Timespec::from_system(s)),
    }
}

/// Whether an open with these flags may change the file.
fn opens_for_writing(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

// Replies follow the filesystem's mode at the time they are sent: how long the kernel may
// cache what they carry, and whether it keeps a file's pages across opens. Each reply holds
// `Fs::reply_guard` from the moment it reads the mode (and, for a lookup, the state it
// carries) until it is sent, so that a switch to replica mode cannot return while a reply
// made for a writable mount is on its way.
impl PairFuse {
    /// How long the kernel may cache entries and attributes now.
    fn ttl(&self) -> Duration {
        match self.fs.mode() {
            FsMode::Writable => self.opts.ttl,
            FsMode::Replica => self.opts.replica_ttl,
        }
    }

    /// How a file is opened now. In writable mode every change to a file goes through this
    /// mount, so the kernel's page cache stays valid across opens. A replica's files change
    /// underneath: each open starts from what is applied (changes while a file is open are
    /// invalidated by the node, after the reads in flight have been answered).
    fn open_flags(&self) -> FopenFlags {
        match self.fs.mode() {
            FsMode::Writable => FopenFlags::FOPEN_KEEP_CACHE,
            FsMode::Replica => FopenFlags::empty(),
        }
    }

    /// Replies with an entry; the caller holds the reply guard.
    fn entry(&self, r: Result<Attr, FsError>, reply: ReplyEntry) {
        match r {
            Ok(a) => reply.entry(
                &self.ttl(),
                &file_attr(&a),
                Generation(u64::from(a.generation)),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Replies with an entry made by a change (the guard is taken after the change).
    fn new_entry(&self, r: Result<Attr, FsError>, reply: ReplyEntry) {
        let _replying = self.fs.reply_guard();
        self.entry(r, reply);
    }

    /// Replies with attributes; the caller holds the reply guard.
    fn attr(&self, r: Result<Attr, FsError>, reply: ReplyAttr) {
        match r {
            Ok(a) => reply.attr(&self.ttl(), &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn empty(r: Result<(), FsError>, reply: ReplyEmpty) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn xattr_reply(r: Result<Vec<u8>, FsError>, size: u32, reply: ReplyXattr) {
        match r {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

impl Filesystem for PairFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let mut want = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS;
        if self.opts.writeback_cache {
            want |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        let have = config.capabilities();
        if let Err(missing) = config.add_capabilities(want & have) {
            tracing::warn!(?missing, "kernel lacks FUSE capabilities");
        }
        if let Err(nearest) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(nearest);
        }
        tracing::debug!(capabilities = ?have, "FUSE session initialised");
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.fs.close() {
            tracing::error!(error = %e, "flushing the journal at unmount failed");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _replying = self.fs.reply_guard();
        self.entry(self.fs.lookup(parent.0, name.as_bytes()), reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _replying = self.fs.reply_guard();
        self.attr(self.fs.getattr(ino.0), reply);
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let s = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
            ctime: ctime.map(Timespec::from_system),
        };
        let r = self.fs.setattr(ctx(req), ino.0, &s);
        let _replying = self.fs.reply_guard();
        self.attr(r, reply);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.new_entry(
            self.fs
                .mknod(ctx(req), parent.0, name.as_bytes(), mode, rdev),
            reply,
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.new_entry(
            self.fs.mkdir(ctx(req), parent.0, name.as_bytes(), mode),
            reply,
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.fs.unlink(parent.0, name.as_bytes()), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.fs.rmdir(parent.0, name.as_bytes()), reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.fs.symlink(
            ctx(req),
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
        );
        self.new_entry(r, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: FuseRenameFlags,
        reply: ReplyEmpty,
    ) {
        let known = FuseRenameFlags::RENAME_NOREPLACE | FuseRenameFlags::RENAME_EXCHANGE;
        if !known.contains(flags) {
            reply.error(Errno::EINVAL); // RENAME_WHITEOUT is for overlay filesystems
            return;
        }
        let f = RenameFlags {
            noreplace: flags.contains(FuseRenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(FuseRenameFlags::RENAME_EXCHANGE),
        };
        let r = self.fs.rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            f,
        );
        Self::empty(r, reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.new_entry(self.fs.link(ino.0, newparent.0, newname.as_bytes()), reply);
    }

    fn open(&self, _req: &Request, _ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // The kernel mount is read-write (to become writable without a remount), and its
        // read-only flag cannot follow replica mode while files are open for writing (nor
        // on other mounts of this filesystem): refusing here is what makes such an open
        // fail then.
        if opens_for_writing(flags.0) && self.fs.is_read_only() {
            reply.error(Errno::EROFS);
            return;
        }
        let _replying = self.fs.reply_guard();
        reply.opened(FileHandle(0), self.open_flags());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut reply = Some(reply);
        let r = self.fs.read_with(ino.0, offset, size, |d| {
            if let Some(r) = reply.take() {
                r.data(d);
            }
        });
        if let (Err(e), Some(r)) = (r, reply.take()) {
            r.error(errno(&e));
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write(ctx(req), ino.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) is not a durability point (as on ext4); fsync is. ENOSYS tells the kernel
        // never to send FLUSH again: one round trip less per close (dirty pages are still
        // written back by the kernel before close returns).
        reply.error(Errno::ENOSYS);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        Self::empty(self.fs.sync(), reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.fs.readdir(ino.0, offset, |item| {
            reply.add(
                INodeNo(item.ino),
                item.next,
                file_type(item.kind),
                OsStr::from_bytes(&item.name),
            )
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _replying = self.fs.reply_guard();
        let ttl = self.ttl();
        let r = self.fs.readdir_plus(ino.0, offset, |item, a| {
            reply.add(
                INodeNo(item.ino),
                item.next,
                OsStr::from_bytes(&item.name),
                &ttl,
                &file_attr(a),
                Generation(u64::from(a.generation)),
            )
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        Self::empty(self.fs.sync(), reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        Self::empty(
            self.fs.setxattr(ino.0, name.as_bytes(), value, flags),
            reply,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        Self::xattr_reply(self.fs.getxattr(ino.0, name.as_bytes()), size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        Self::xattr_reply(self.fs.listxattr(ino.0), size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.fs.removexattr(ino.0, name.as_bytes()), reply);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // The mount uses default_permissions: the kernel checks access itself and never
        // sends ACCESS (a replica's `access(W_OK)` is answered by the mount's read-only
        // flag, see `ReadOnlyFlag`). Should one come, it gets the answer a read-only
        // filesystem gives.
        if mask.contains(fuser::AccessFlags::W_OK) && self.fs.is_read_only() {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mode = (mode & !libc::S_IFMT) | libc::S_IFREG;
        let r = self.fs.mknod(ctx(req), parent.0, name.as_bytes(), mode, 0);
        let _replying = self.fs.reply_guard();
        match r {
            Ok(a) => reply.created(
                &self.ttl(),
                &file_attr(&a),
                Generation(u64::from(a.generation)),
                FileHandle(0),
                self.open_flags(),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        Self::empty(self.fs.fallocate(ino.0, offset, length, mode), reply);
    }
}

/// The kernel's read-only flag of a pairfs mount, made to follow the filesystem's mode.
///
/// The filesystem is mounted read-write whatever its mode, so that it can become writable
/// without a remount; in replica mode the daemon refuses every change itself (EROFS). But
/// the mount uses `default_permissions`, so the kernel answers `access(2)` alone and never
/// asks the daemon: on a read-write mount, `access(W_OK)` would say yes on a replica. The
/// mount's own read-only flag (`mount_setattr(2)` with `MOUNT_ATTR_RDONLY`: an attribute of
/// this mount, not of the filesystem, so nothing is remounted and open files stay open)
/// makes the kernel answer `access(W_OK)` and every new open for writing with EROFS, and
/// `statvfs` report `ST_RDONLY`.
///
/// Linux refuses to set that flag (EBUSY) while a file of the mount is open for writing (or
/// a write is under way). After a switch to replica mode with such files open, the mount
/// stays read-write for the kernel until the last of them is closed: their writes, and every
/// other change, fail with EROFS from the daemon meanwhile, but `access(W_OK)` says yes.
/// [`ReadOnlyFlag::follow`] tries again until it succeeds. Other mounts of the same
/// filesystem (bind mounts, copies in other mount namespaces) keep their own flag.
#[derive(Debug)]
pub struct ReadOnlyFlag {
    path: CString,
    /// The mount's id when this was made: the flag is set only on that mount, not on
    /// whatever is mounted over it later.
    mnt_id: u64,
    /// The flag as last set (false: as mounted).
    read_only: bool,
    /// The next attempt after a refused one.
    retry_at: Option<Instant>,
}

/// `MOUNT_ATTR_RDONLY` of `<linux/mount.h>`.
const MOUNT_ATTR_RDONLY: u64 = 0x1;

/// `struct mount_attr` of `<linux/mount.h>`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// How long [`ReadOnlyFlag::follow`] waits before trying again after a refusal.
const READ_ONLY_RETRY: Duration = Duration::from_millis(200);

impl ReadOnlyFlag {
    /// The flag of the pairfs mount at `mountpoint`, which is read-write (as
    /// [`fuser::Session::new`] mounts it). Needs no FUSE request: can be called before the
    /// session serves.
    pub fn new(mountpoint: &Path) -> io::Result<ReadOnlyFlag> {
        let path = CString::new(mountpoint.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mnt_id = mount_id(&path)?;
        Ok(ReadOnlyFlag {
            path,
            mnt_id,
            read_only: false,
            retry_at: None,
        })
    }

    /// Whether the kernel's flag is set (as far as this knows).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Sets or clears the flag now (one attempt). EBUSY: files are open for writing.
    pub fn set(&mut self, read_only: bool) -> io::Result<()> {
        if mount_id(&self.path)? != self.mnt_id {
            return Err(io::Error::other(
                "the mountpoint no longer leads to this mount",
            ));
        }
        let attr = MountAttr {
            attr_set: if read_only { MOUNT_ATTR_RDONLY } else { 0 },
            attr_clr: if read_only { 0 } else { MOUNT_ATTR_RDONLY },
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: a NUL-terminated path and a `struct mount_attr` of the size passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                self.path.as_ptr(),
                0 as libc::c_uint,
                &attr as *const MountAttr,
                size_of::<MountAttr>(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        self.read_only = read_only;
        Ok(())
    }

    /// Makes the flag follow `mode` (read-only in replica mode); call it often (the
    /// maintenance loop). A refused attempt is tried again after a while; returns whether
    /// the flag matches the mode now.
    pub fn follow(&mut self, mode: FsMode) -> bool {
        let want = mode == FsMode::Replica;
        if want == self.read_only {
            self.retry_at = None;
            return true;
        }
        let now = Instant::now();
        if self.retry_at.is_some_and(|t| now < t) {
            return false;
        }
        let first = self.retry_at.is_none();
        match self.set(want) {
            Ok(()) => {
                tracing::info!(
                    read_only = want,
                    "the mount's read-only flag follows the mode"
                );
                self.retry_at = None;
                true
            }
            Err(e) => {
                if first {
                    if e.raw_os_error() == Some(libc::EBUSY) {
                        tracing::info!(
                            "files stay open for writing: the mount stays read-write for the \
                             kernel until they are closed (their writes fail with EROFS)"
                        );
                    } else {
                        tracing::warn!(error = %e, read_only = want, "cannot set the mount's read-only flag");
                    }
                }
                self.retry_at = Some(now + READ_ONLY_RETRY);
                false
            }
        }
    }
}

/// The id of the mount `path` leads to (`statx`, from the cached attributes: no FUSE
/// request).
fn mount_id(path: &CString) -> io::Result<u64> {
    // SAFETY: statx fills the zeroed buffer; the path is NUL-terminated.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_STATX_DONT_SYNC,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(io::Error::from(io::ErrorKind::Unsupported));
    }
    Ok(stx.stx_mnt_id)
}
