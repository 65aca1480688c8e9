//! The filesystem's mode switched while it is mounted (a real FUSE mount, served by this
//! process): a file open for writing gets EROFS once the mode is replica, reads go on, and
//! the same file writes again once the mode is writable; the kernel mount stays
//! read-write, and its read-only flag follows the mode when no file is open for writing
//! (`access(W_OK)`).
//!
//! Needs root and `/dev/fuse` (fails, never skips, without them).

#![allow(clippy::unwrap_used)]

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pairfs::{MemDevice, Volume, VolumeId, VolumeOptions};
use pairfs_fs::fuse::{FuseOptions, PairFuse, ReadOnlyFlag, session_config};
use pairfs_fs::{FormatOptions, Fs, FsMode, FsOptions};

/// Unmounts (lazily) and removes the mountpoint, even when the test fails.
struct Mountpoint(PathBuf);

impl Drop for Mountpoint {
    fn drop(&mut self) {
        if let Ok(c) = CString::new(self.0.as_os_str().as_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn new_fs() -> Arc<Fs> {
    let n = Arc::new(MemDevice::new(64 << 20));
    let j = Arc::new(MemDevice::new(4 << 20));
    Volume::create(&*n, &*j, VolumeId([7; 16]), 4096).unwrap();
    let mut v = Volume::open(Box::new(n), Box::new(j), VolumeOptions::default()).unwrap();
    Fs::format(&mut v, &FormatOptions::default()).unwrap();
    let opts = FsOptions {
        track_lookups: true,
        ..FsOptions::default()
    };
    Arc::new(Fs::open(v, opts).unwrap())
}

/// Mounts `fs` as `pairfs mount` does.
fn mount(fs: &Arc<Fs>, at: &Path) -> fuser::BackgroundSession {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "this test mounts a FUSE filesystem: run it as root"
    );
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
    let config = session_config("pairfs:test".into(), 2);
    let adapter = PairFuse::new(fs.clone(), FuseOptions::default());
    fuser::Session::new(adapter, at, &config)
        .unwrap()
        .spawn()
        .unwrap()
}

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> Option<i32> {
    r.expect_err("refused").raw_os_error()
}

/// `access(2)`: 0 or the errno.
fn access(p: &Path, mode: libc::c_int) -> i32 {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), mode) } == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap()
    }
}

/// Whether `statvfs` reports the mount read-only.
fn statvfs_read_only(p: &Path) -> bool {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs fills the zeroed buffer.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_flag & libc::ST_RDONLY != 0
}

/// Every change by path is refused with EROFS.
fn assert_changes_refused(m: &Path) {
    let f = m.join("f");
    let refused = [
        ("create", errno(std::fs::write(m.join("new"), b"x"))),
        ("mkdir", errno(std::fs::create_dir(m.join("d2")))),
        (
            "open for writing",
            errno(OpenOptions::new().write(true).open(&f)),
        ),
        (
            "open for appending",
            errno(OpenOptions::new().append(true).open(&f)),
        ),
        (
            "truncate",
            errno(OpenOptions::new().write(true).truncate(true).open(&f)),
        ),
        (
            "chmod",
            errno(std::fs::set_permissions(
                &f,
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )),
        ),
        ("rename", errno(std::fs::rename(&f, m.join("g")))),
        ("unlink", errno(std::fs::remove_file(m.join("d/inner")))),
        ("rmdir", errno(std::fs::remove_dir(m.join("e")))),
        ("link", errno(std::fs::hard_link(&f, m.join("h")))),
        (
            "symlink",
            errno(std::os::unix::fs::symlink("f", m.join("s"))),
        ),
    ];
    for (what, e) in refused {
        assert_eq!(e, Some(libc::EROFS), "{what}");
    }
}

#[test]
fn a_mounted_filesystem_switches_modes_under_a_file_open_for_writing() {
    let mnt = Mountpoint(PathBuf::from(format!(
        "/var/tmp/pairfs-fstest-{}-mode",
        std::process::id()
    )));
    std::fs::create_dir_all(&mnt.0).unwrap();
    let m = mnt.0.clone();
    let fs = new_fs();
    let session = mount(&fs, &m);
    let mut flag = ReadOnlyFlag::new(&m).unwrap();
    let f = m.join("f");
    std::fs::write(&f, b"one").unwrap();
    std::fs::create_dir(m.join("d")).unwrap();
    std::fs::write(m.join("d/inner"), b"in").unwrap();
    std::fs::create_dir(m.join("e")).unwrap();
    let mut w = OpenOptions::new().append(true).open(&f).unwrap();
    w.write_all(b"+1").unwrap();
    assert!(
        flag.follow(fs.mode()),
        "writable: the flag stays as mounted"
    );

    // Replica mode with the file open for writing.
    fs.set_mode(FsMode::Replica).unwrap();
    assert_eq!(errno(w.write_all(b"+2")), Some(libc::EROFS));
    assert_eq!(std::fs::read(&f).unwrap(), b"one+1", "reads go on");
    assert_eq!(std::fs::read(m.join("d/inner")).unwrap(), b"in");
    assert_eq!(std::fs::read_dir(&m).unwrap().count(), 3);
    // The kernel cannot make the mount read-only while a file is open for writing: the
    // filesystem refuses every change itself.
    assert!(!flag.follow(fs.mode()));
    assert_eq!(errno(flag.set(true)), Some(libc::EBUSY));
    assert!(!statvfs_read_only(&m));
    assert_changes_refused(&m);
    w.sync_all().unwrap(); // fsync: what was written before the switch is durable

    // Writable again: the same open file writes.
    fs.set_mode(FsMode::Writable).unwrap();
    assert!(flag.follow(fs.mode()));
    w.write_all(b"+3").unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"one+1+3");
    drop(w);

    // Replica mode with nothing open for writing: the mount's read-only flag follows, and
    // the kernel answers what it answers alone (access, statvfs) as for a read-only mount.
    fs.set_mode(FsMode::Replica).unwrap();
    assert_eq!(access(&f, libc::W_OK), 0, "before the flag follows");
    assert!(flag.follow(fs.mode()));
    assert!(flag.is_read_only());
    assert_eq!(access(&f, libc::W_OK), libc::EROFS);
    assert_eq!(access(&m, libc::W_OK), libc::EROFS);
    assert_eq!(access(&f, libc::R_OK), 0);
    assert!(statvfs_read_only(&m));
    assert_changes_refused(&m);
    assert_eq!(std::fs::read(&f).unwrap(), b"one+1+3");

    // And writable again: the flag goes, writes go through.
    fs.set_mode(FsMode::Writable).unwrap();
    assert!(flag.follow(fs.mode()));
    assert!(!flag.is_read_only());
    assert_eq!(access(&f, libc::W_OK), 0);
    assert!(!statvfs_read_only(&m));
    let mut w = OpenOptions::new().append(true).open(&f).unwrap();
    w.write_all(b"+4").unwrap();
    drop(w);
    std::fs::write(m.join("new"), b"x").unwrap();
    std::fs::rename(m.join("new"), m.join("newer")).unwrap();
    assert_eq!(std::fs::read(&f).unwrap(), b"one+1+3+4");

    session.umount_and_join().unwrap();
    let r = fs.with_volume(pairfs_fs::fsck::fsck);
    assert!(r.is_clean(), "fsck: {:?}", r.errors);
}
