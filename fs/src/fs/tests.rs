use std::sync::Arc;
use std::time::Instant;

use pairfs::crash::CrashDevice;
use pairfs::{Volume, VolumeId, VolumeOptions};

use super::*;

pub(crate) fn new_volume(blocks: u64) -> (Volume, Arc<CrashDevice>, Arc<CrashDevice>) {
    let n = Arc::new(CrashDevice::new(blocks * 4096));
    let j = Arc::new(CrashDevice::new(256 * 4096));
    Volume::create(&*n, &*j, VolumeId([3; 16]), 4096).unwrap();
    let v = Volume::open(
        Box::new(n.clone()),
        Box::new(j.clone()),
        VolumeOptions::default(),
    )
    .unwrap();
    (v, n, j)
}

pub(crate) fn new_fs(blocks: u64) -> Fs {
    new_fs_with(blocks, None)
}

pub(crate) fn new_fs_with(blocks: u64, inodes: Option<u64>) -> Fs {
    let (mut v, _, _) = new_volume(blocks);
    Fs::format(&mut v, &FormatOptions { inodes }).unwrap();
    Fs::open(v, FsOptions::default()).unwrap()
}

const C: Ctx = Ctx {
    uid: 1000,
    gid: 1000,
};

/// Runs fsck on the live state and fails with its report.
pub(crate) fn assert_clean(fs: &Fs) {
    let r = fs.with_volume(crate::fsck::fsck);
    assert!(r.is_clean(), "fsck: {:#?}", r.errors);
}

#[test]
fn create_write_read_rename_unlink() {
    let fs = new_fs(4096);
    let a = fs
        .mknod(C, ROOT_INO, b"a", libc::S_IFREG | 0o644, 0)
        .unwrap();
    assert_eq!(a.kind, Kind::File);
    assert_eq!(fs.write(C, a.ino, 10, b"hello").unwrap(), 5);
    assert_eq!(
        fs.read(a.ino, 0, 100).unwrap(),
        b"\0\0\0\0\0\0\0\0\0\0hello"
    );
    let d = fs.mkdir(C, ROOT_INO, b"d", 0o755).unwrap();
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 3);
    fs.rename(ROOT_INO, b"a", d.ino, b"b", RenameFlags::default())
        .unwrap();
    assert!(matches!(fs.lookup(ROOT_INO, b"a"), Err(FsError::NotFound)));
    assert_eq!(fs.lookup(d.ino, b"b").unwrap().ino, a.ino);
    assert!(matches!(fs.rmdir(ROOT_INO, b"d"), Err(FsError::NotEmpty)));
    fs.unlink(d.ino, b"b").unwrap();
    fs.rmdir(ROOT_INO, b"d").unwrap();
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 2);
    assert!(matches!(fs.getattr(a.ino), Err(FsError::Stale)));
    assert_clean(&fs);
}

#[test]
fn big_write_spans_extents_and_truncate_frees() {
    let fs = new_fs(8192);
    let free0 = fs.statfs().bfree;
    let a = fs
        .mknod(C, ROOT_INO, b"big", libc::S_IFREG | 0o644, 0)
        .unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    for (k, chunk) in data.chunks(1 << 20).enumerate() {
        fs.write(C, a.ino, (k << 20) as u64, chunk).unwrap();
    }
    assert_eq!(fs.read(a.ino, 0, 3_000_000).unwrap(), data);
    assert_eq!(
        fs.read(a.ino, 1_234_567, 10).unwrap(),
        &data[1_234_567..1_234_577]
    );
    let s = SetAttr {
        size: Some(5000),
        ..SetAttr::default()
    };
    fs.setattr(C, a.ino, &s).unwrap();
    let s = SetAttr {
        size: Some(9000),
        ..SetAttr::default()
    };
    fs.setattr(C, a.ino, &s).unwrap();
    let back = fs.read(a.ino, 0, 9000).unwrap();
    assert_eq!(&back[..5000], &data[..5000]);
    assert!(
        back[5000..].iter().all(|&b| b == 0),
        "extension reads zeros"
    );
    fs.unlink(ROOT_INO, b"big").unwrap();
    fs.sync().unwrap();
    fs.maintain().unwrap();
    assert_eq!(fs.statfs().bfree, free0);
    assert_clean(&fs);
}

#[test]
fn hundred_thousand_entries_in_one_directory() {
    let fs = new_fs_with(65536, Some(110_000));
    let d = fs.mkdir(C, ROOT_INO, b"d", 0o755).unwrap();
    let t = Instant::now();
    for i in 0..100_000 {
        fs.mknod(
            C,
            d.ino,
            format!("file-{i:06}").as_bytes(),
            libc::S_IFREG | 0o644,
            0,
        )
        .unwrap();
    }
    eprintln!("100k creates: {:?}", t.elapsed());
    for i in (0..100_000).step_by(7) {
        fs.lookup(d.ino, format!("file-{i:06}").as_bytes()).unwrap();
    }
    let mut n = 0;
    fs.readdir(d.ino, 0, |_| {
        n += 1;
        false
    })
    .unwrap();
    assert_eq!(n, 100_002);
    fs.unlink(d.ino, b"file-050000").unwrap();
    assert!(matches!(
        fs.lookup(d.ino, b"file-050000"),
        Err(FsError::NotFound)
    ));
    assert!(fs.lookup(d.ino, b"file-050001").is_ok());
    assert_clean(&fs);
}

#[test]
fn xattrs_symlinks_links_and_exchange() {
    let fs = new_fs(4096);
    let f = fs
        .mknod(C, ROOT_INO, b"f", libc::S_IFREG | 0o600, 0)
        .unwrap();
    fs.setxattr(f.ino, b"user.k", b"v", 0).unwrap();
    assert_eq!(fs.getxattr(f.ino, b"user.k").unwrap(), b"v");
    assert_eq!(fs.listxattr(f.ino).unwrap(), b"user.k\0");
    fs.removexattr(f.ino, b"user.k").unwrap();
    assert!(matches!(
        fs.getxattr(f.ino, b"user.k"),
        Err(FsError::NoAttr)
    ));
    let long: Vec<u8> = vec![b'x'; 300];
    let s = fs.symlink(C, ROOT_INO, b"s", &long).unwrap();
    assert_eq!(fs.readlink(s.ino).unwrap(), long);
    let s2 = fs.symlink(C, ROOT_INO, b"s2", b"short").unwrap();
    assert_eq!(fs.readlink(s2.ino).unwrap(), b"short");
    let l = fs.link(f.ino, ROOT_INO, b"g").unwrap();
    assert_eq!(l.nlink, 2);
    let x = RenameFlags {
        exchange: true,
        ..RenameFlags::default()
    };
    fs.rename(ROOT_INO, b"g", ROOT_INO, b"s", x).unwrap();
    assert_eq!(fs.lookup(ROOT_INO, b"s").unwrap().ino, f.ino);
    assert_eq!(fs.lookup(ROOT_INO, b"g").unwrap().ino, s.ino);
    let nr = RenameFlags {
        noreplace: true,
        ..RenameFlags::default()
    };
    assert!(matches!(
        fs.rename(ROOT_INO, b"g", ROOT_INO, b"f", nr),
        Err(FsError::Exists)
    ));
    assert_clean(&fs);
}

#[test]
fn exchange_and_noreplace_leave_a_clean_fs() {
    let fs = new_fs(4096);
    let d1 = fs.mkdir(C, ROOT_INO, b"d1", 0o755).unwrap();
    let d2 = fs.mkdir(C, ROOT_INO, b"d2", 0o755).unwrap();
    let sub = fs.mkdir(C, d1.ino, b"sub", 0o755).unwrap();
    fs.mknod(C, d2.ino, b"file", libc::S_IFREG | 0o644, 0)
        .unwrap();
    let x = RenameFlags {
        exchange: true,
        ..RenameFlags::default()
    };
    // A directory and a file swap places across directories: link counts move with them.
    fs.rename(d1.ino, b"sub", d2.ino, b"file", x).unwrap();
    assert_eq!(fs.lookup(d2.ino, b"file").unwrap().ino, sub.ino);
    assert_eq!(fs.getattr(d1.ino).unwrap().nlink, 2);
    assert_eq!(fs.getattr(d2.ino).unwrap().nlink, 3);
    // A directory cannot move under itself.
    let err = fs
        .rename(d2.ino, b"file", sub.ino, b"x", RenameFlags::default())
        .unwrap_err();
    assert!(matches!(err, FsError::Invalid(_)), "{err:?}");
    assert_clean(&fs);
}

#[test]
fn fsck_reports_corruption() {
    let fs = new_fs(4096);
    let f = fs
        .mknod(C, ROOT_INO, b"f", libc::S_IFREG | 0o600, 0)
        .unwrap();
    fs.write(C, f.ino, 0, &[1; 100_000]).unwrap();
    assert_clean(&fs);
    // Link count off, written behind the FS's back.
    {
        let mut core = fs.write_core();
        let Core { vol, sb, alloc } = &mut *core;
        let mut tx = FsTx::new(vol, alloc, sb);
        let mut i = load(&tx, sb, f.ino).unwrap();
        i.nlink = 5;
        tx.write_inode(f.ino, &i).unwrap();
        let (t, _) = tx.finish().unwrap();
        vol.commit(t).unwrap();
    }
    let r = fs.with_volume(crate::fsck::fsck);
    assert!(
        r.errors.iter().any(|e| e.contains("nlink 5 but 1")),
        "{:?}",
        r.errors
    );
}

#[test]
fn enospc_is_clean_and_loses_nothing() {
    let fs = new_fs(1024); // 4 MiB
    let a = fs
        .mknod(C, ROOT_INO, b"a", libc::S_IFREG | 0o644, 0)
        .unwrap();
    fs.write(C, a.ino, 0, &[7; 100_000]).unwrap();
    let b = fs
        .mknod(C, ROOT_INO, b"b", libc::S_IFREG | 0o644, 0)
        .unwrap();
    let mut off = 0u64;
    let err = loop {
        match fs.write(C, b.ino, off, &[9; 65536]) {
            Ok(n) => off += u64::from(n),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, FsError::NoSpace), "{err:?}");
    assert!(off > 2_000_000, "the volume filled up: {off}");
    assert_eq!(fs.read(a.ino, 0, 100_000).unwrap(), vec![7; 100_000]);
    assert_eq!(fs.getattr(b.ino).unwrap().size, off);
    assert!(
        fs.read(b.ino, 0, off as u32)
            .unwrap()
            .iter()
            .all(|&x| x == 9)
    );
    assert_clean(&fs);
    // Freeing space makes writes possible again (free-pending blocks are released).
    fs.unlink(ROOT_INO, b"b").unwrap();
    let c = fs
        .mknod(C, ROOT_INO, b"c", libc::S_IFREG | 0o644, 0)
        .unwrap();
    fs.write(C, c.ino, 0, &[1; 65536]).unwrap();
    assert_clean(&fs);
}

/// A primary on a retaining volume, formatted, with nothing left to send, and its replica:
/// a byte copy of it in replica mode, on devices of its own (which can crash).
struct Pair {
    primary: Fs,
    replica: Fs,
    replica_normal: Arc<CrashDevice>,
    replica_journal: Arc<CrashDevice>,
}

fn pair() -> Pair {
    let n = Arc::new(CrashDevice::new(8192 * 4096));
    let j = Arc::new(CrashDevice::new(512 * 4096));
    Volume::create(&*n, &*j, VolumeId([3; 16]), 4096).unwrap();
    let retain = VolumeOptions {
        retain: true,
        ..VolumeOptions::default()
    };
    let mut v = Volume::open(Box::new(n.clone()), Box::new(j.clone()), retain).unwrap();
    Fs::format(&mut v, &FormatOptions { inodes: None }).unwrap();
    let primary = Fs::open(v, FsOptions::default()).unwrap();
    primary.sync().unwrap();
    primary.with_volume_mut(|v| v.checkpoint()).unwrap();
    let _ = primary.with_volume_mut(|v| v.take_entries(false));
    let rn = Arc::new(CrashDevice::from_bytes(n.crash_point().durable_image()));
    let rj = Arc::new(CrashDevice::from_bytes(j.crash_point().durable_image()));
    let replica = replica_on(Box::new(rn.clone()), Box::new(rj.clone()));
    Pair {
        primary,
        replica,
        replica_normal: rn,
        replica_journal: rj,
    }
}

/// A replica (retaining volume, replica mode) on these devices.
fn replica_on(normal: Box<dyn pairfs::BlockDevice>, journal: Box<dyn pairfs::BlockDevice>) -> Fs {
    let retain = VolumeOptions {
        retain: true,
        ..VolumeOptions::default()
    };
    let rv = Volume::open(normal, journal, retain).unwrap();
    let mode = FsMode::Replica;
    Fs::open(
        rv,
        FsOptions {
            mode,
            ..FsOptions::default()
        },
    )
    .unwrap()
}

/// Applies to `to` the entries `from` sealed, durable or not (as sync mode sends them).
fn ship(from: &Fs, to: &Fs) {
    from.seal().unwrap();
    let metas = from.with_volume_mut(|v| v.take_entries(true));
    assert!(!metas.is_empty());
    for m in metas {
        let e = from.with_volume(|v| v.read_wire_entry(m.seq)).unwrap();
        to.apply_replicated(&e).unwrap();
    }
}

#[test]
fn a_replica_follows_the_allocation_bitmaps_entry_by_entry() {
    // The replica starts as a byte copy of the primary and then applies the primary's
    // entries. Its in-memory allocator, patched block by block, must equal one loaded
    // from scratch.
    let Pair {
        primary, replica, ..
    } = pair();
    let before = replica.statfs();
    let d = primary.mkdir(C, ROOT_INO, b"d", 0o755).unwrap();
    for i in 0..60u32 {
        let name = format!("f{i}");
        let f = primary
            .mknod(C, d.ino, name.as_bytes(), libc::S_IFREG | 0o644, 0)
            .unwrap();
        primary
            .write(C, f.ino, 0, &vec![i as u8; 40 * 1024])
            .unwrap();
        if i % 3 == 0 {
            primary.sync().unwrap(); // several entries
        }
    }
    for i in (0..60u32).step_by(4) {
        primary.unlink(d.ino, format!("f{i}").as_bytes()).unwrap();
    }
    primary.sync().unwrap();
    let metas = primary.with_volume_mut(|v| v.take_entries(false));
    assert!(metas.len() > 10, "{} entries", metas.len());
    for m in metas {
        let e = primary.with_volume(|v| v.read_wire_entry(m.seq)).unwrap();
        replica.apply_replicated(&e).unwrap();
        let patched = replica.statfs();
        replica.reload().unwrap();
        let loaded = replica.statfs();
        assert_eq!(
            (patched.bfree, patched.ffree),
            (loaded.bfree, loaded.ffree),
            "after seq {}",
            m.seq
        );
    }
    let after = replica.statfs();
    assert!(
        after.bfree + 40 * 10 < before.bfree,
        "{after:?} vs {before:?}"
    );
    assert!(after.ffree + 40 < before.ffree);
    assert_eq!(
        (after.bfree, after.ffree),
        (primary.statfs().bfree, primary.statfs().ffree)
    );
}

/// A device whose writes of at least `at_least` bytes (and, once `syncs` is set, its
/// syncs) wait at a gate while it is closed.
struct GatedWrites {
    inner: Arc<CrashDevice>,
    at_least: usize,
    syncs: AtomicBool,
    open: Mutex<bool>,
    opened: std::sync::Condvar,
    waiting: std::sync::atomic::AtomicUsize,
}

impl GatedWrites {
    fn pass(&self, len: usize) {
        if len < self.at_least {
            return;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    fn set_open(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.opened.notify_all();
    }

    /// Waits until something waits at the gate.
    fn until_waiting(&self, what: &str) {
        let t = Instant::now();
        while self.waiting.load(Ordering::SeqCst) == 0 {
            assert!(t.elapsed().as_secs() < 10, "{what} never reached the gate");
            std::thread::yield_now();
        }
    }
}

impl pairfs::BlockDevice for GatedWrites {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.pass(buf.len());
        self.inner.write_at(buf, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> std::io::Result<()> {
        self.pass(bufs.iter().map(|b| b.len()).sum());
        self.inner.write_vectored_at(bufs, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        if self.syncs.load(Ordering::SeqCst) {
            self.pass(usize::MAX);
        }
        self.inner.sync()
    }
}

/// A replica whose normal area is a [`GatedWrites`] (gate closed, writes of 16 blocks or
/// more held), and the primary it follows.
fn gated_pair() -> (Fs, Arc<Fs>, Arc<GatedWrites>) {
    let Pair {
        primary,
        replica,
        replica_normal,
        replica_journal,
    } = pair();
    drop(replica);
    let gated = Arc::new(GatedWrites {
        inner: replica_normal,
        at_least: 16 * 4096,
        syncs: Default::default(),
        open: Mutex::new(false),
        opened: std::sync::Condvar::new(),
        waiting: Default::default(),
    });
    let replica = replica_on(Box::new(gated.clone()), Box::new(replica_journal));
    (primary, Arc::new(replica), gated)
}

/// The entries of a 256 KiB file `name` written on `primary` (fresh blocks: in place), and
/// its data.
fn file_entries(primary: &Fs, name: &[u8]) -> (Vec<pairfs::repl::WireEntry>, Vec<u8>) {
    let f = primary
        .mknod(C, ROOT_INO, name, libc::S_IFREG | 0o644, 0)
        .unwrap();
    let data: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    primary.write(C, f.ino, 0, &data).unwrap();
    primary.seal().unwrap();
    let metas = primary.with_volume_mut(|v| v.take_entries(true));
    let entries: Vec<pairfs::repl::WireEntry> = metas
        .iter()
        .map(|m| primary.with_volume(|v| v.read_wire_entry(m.seq)).unwrap())
        .collect();
    assert!(entries.iter().any(|e| e.blocks.iter().any(|b| b.fresh)));
    (entries, data)
}

/// Whether a `getattr` on `fs` completes (within 5 s) while something waits at the gate.
fn getattr_completes(fs: &Arc<Fs>) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let fs = fs.clone();
    std::thread::spawn(move || {
        let _ = tx.send(fs.getattr(ROOT_INO).map(|a| a.ino));
    });
    matches!(rx.recv_timeout(Duration::from_secs(5)), Ok(Ok(ROOT_INO)))
}

#[test]
fn a_replica_serves_its_readers_while_an_entry_is_written_in_place() {
    let (primary, replica, gated) = gated_pair();
    let (entries, data) = file_entries(&primary, b"f");
    let applier = {
        let replica = replica.clone();
        std::thread::spawn(move || {
            for e in &entries {
                replica.apply_replicated(e).unwrap();
            }
        })
    };
    gated.until_waiting("the apply's in-place write");
    let served = getattr_completes(&replica);
    gated.set_open(true);
    applier.join().unwrap();
    assert!(served, "a getattr waited for the apply's in-place write");
    let a = replica.lookup(ROOT_INO, b"f").unwrap();
    assert_eq!(replica.read(a.ino, 0, data.len() as u32).unwrap(), data);
}

#[test]
fn a_replica_serves_its_readers_while_its_sync_flushes_the_data_written_in_place() {
    let (primary, replica, gated) = gated_pair();
    let (entries, data) = file_entries(&primary, b"f");
    gated.set_open(true);
    for e in &entries {
        replica.apply_replicated(e).unwrap();
    }
    gated.set_open(false);
    gated.syncs.store(true, Ordering::SeqCst);
    let syncer = {
        let replica = replica.clone();
        std::thread::spawn(move || replica.sync_applied())
    };
    gated.until_waiting("the sync of the normal area");
    let served = getattr_completes(&replica);
    gated.set_open(true);
    syncer.join().unwrap().unwrap();
    assert!(served, "a getattr waited for the normal area's sync");
    let last = primary.with_volume(|v| v.journal().last_seq());
    assert_eq!(replica.with_volume(|v| v.journal().durable_seq()), last);
    let a = replica.lookup(ROOT_INO, b"f").unwrap();
    assert_eq!(replica.read(a.ino, 0, data.len() as u32).unwrap(), data);
}

#[test]
fn replica_mode_refuses_every_change_and_writable_mode_admits_them_again() {
    let fs = new_fs(4096);
    let f = fs
        .mknod(C, ROOT_INO, b"f", libc::S_IFREG | 0o644, 0)
        .unwrap();
    fs.write(C, f.ino, 0, b"one").unwrap();
    let d = fs.mkdir(C, ROOT_INO, b"d", 0o755).unwrap();
    fs.setxattr(f.ino, b"user.k", b"v", 0).unwrap();
    assert_eq!(fs.mode(), FsMode::Writable);
    fs.set_mode(FsMode::Replica).unwrap();
    assert_eq!(fs.mode(), FsMode::Replica);
    assert!(fs.is_read_only());
    let ro = |r: FsResult<()>, what: &str| {
        assert!(matches!(r, Err(FsError::ReadOnly)), "{what}: {r:?}");
    };
    let truncate = SetAttr {
        size: Some(0),
        ..SetAttr::default()
    };
    let chmod = SetAttr {
        mode: Some(0o600),
        ..SetAttr::default()
    };
    ro(fs.write(C, f.ino, 0, b"two").map(drop), "write");
    ro(fs.setattr(C, f.ino, &truncate).map(drop), "truncate");
    ro(fs.setattr(C, f.ino, &chmod).map(drop), "chmod");
    ro(fs.fallocate(f.ino, 0, 8192, 0), "fallocate");
    ro(
        fs.mknod(C, ROOT_INO, b"g", libc::S_IFREG | 0o644, 0)
            .map(drop),
        "mknod",
    );
    ro(fs.mkdir(C, ROOT_INO, b"e", 0o755).map(drop), "mkdir");
    ro(fs.symlink(C, ROOT_INO, b"s", b"f").map(drop), "symlink");
    ro(fs.link(f.ino, ROOT_INO, b"h").map(drop), "link");
    ro(fs.unlink(ROOT_INO, b"f"), "unlink");
    ro(fs.rmdir(ROOT_INO, b"d"), "rmdir");
    ro(
        fs.rename(ROOT_INO, b"f", d.ino, b"f", RenameFlags::default()),
        "rename",
    );
    ro(fs.setxattr(f.ino, b"user.k", b"w", 0), "setxattr");
    ro(fs.removexattr(f.ino, b"user.k"), "removexattr");
    // Reads go on; the atime update a read would make is not attempted; fsync succeeds.
    let atime = fs.getattr(f.ino).unwrap().atime;
    assert_eq!(fs.read(f.ino, 0, 10).unwrap(), b"one");
    assert_eq!(fs.getattr(f.ino).unwrap().atime, atime);
    assert_eq!(fs.lookup(ROOT_INO, b"d").unwrap().ino, d.ino);
    assert_eq!(fs.getxattr(f.ino, b"user.k").unwrap(), b"v");
    fs.sync().unwrap();
    // Switching again to the same mode changes nothing.
    fs.set_mode(FsMode::Replica).unwrap();
    fs.set_mode(FsMode::Writable).unwrap();
    assert!(!fs.is_read_only());
    fs.write(C, f.ino, 0, b"two").unwrap();
    fs.rename(ROOT_INO, b"f", d.ino, b"f", RenameFlags::default())
        .unwrap();
    assert_eq!(fs.read(f.ino, 0, 10).unwrap(), b"two");
    assert_clean(&fs);
}

/// Hooks whose `admit` waits until the test lets it go on, to hold a writer between its
/// first look at the mode and the transaction.
struct HeldAdmit {
    entered: std::sync::mpsc::SyncSender<()>,
    go: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl FsHooks for HeldAdmit {
    fn entries(&self) {}
    fn admit(&self) -> FsResult<()> {
        let _ = self.entered.send(());
        let _ = self.go.lock().unwrap().recv();
        Ok(())
    }
    fn admits(&self) -> bool {
        true
    }
    fn committed(&self, _fs: &Fs) -> FsResult<()> {
        Ok(())
    }
    fn syncing(&self, _seq: pairfs::Seq) {}
    fn synced(&self, _seq: pairfs::Seq) -> FsResult<()> {
        Ok(())
    }
}

#[test]
fn a_writer_admitted_before_a_switch_to_replica_mode_is_refused_after_it() {
    let fs = Arc::new(new_fs(4096));
    let f = fs
        .mknod(C, ROOT_INO, b"f", libc::S_IFREG | 0o644, 0)
        .unwrap();
    let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
    let (go, go_rx) = std::sync::mpsc::channel();
    fs.set_hooks(Arc::new(HeldAdmit {
        entered: entered_tx,
        go: Mutex::new(go_rx),
    }));
    let writer = {
        let fs = fs.clone();
        std::thread::spawn(move || fs.write(C, f.ino, 0, b"late"))
    };
    // The writer saw writable mode and waits in `admit`; the switch comes now.
    entered.recv().unwrap();
    fs.set_mode(FsMode::Replica).unwrap();
    go.send(()).unwrap();
    let r = writer.join().unwrap();
    assert!(matches!(r, Err(FsError::ReadOnly)), "{r:?}");
    assert_eq!(fs.getattr(f.ino).unwrap().size, 0);
}

/// A replica that applied entries and then turns writable: it allocates from the applied
/// state, and a crash right after its first writes loses nothing the primary had freed
/// and reused: the switch made the applied entries durable before anything was allocated.
#[test]
fn a_replica_turned_writable_allocates_from_the_applied_state_durably() {
    let Pair {
        primary,
        replica,
        replica_normal: rn,
        replica_journal: rj,
    } = pair();
    let old_data = vec![0x0a; 64 * 4096];
    let old = primary
        .mknod(C, ROOT_INO, b"old", libc::S_IFREG | 0o644, 0)
        .unwrap();
    primary.write(C, old.ino, 0, &old_data).unwrap();
    let keep = primary
        .mknod(C, ROOT_INO, b"keep", libc::S_IFREG | 0o644, 0)
        .unwrap();
    primary.write(C, keep.ino, 0, &[0x0c; 20_000]).unwrap();
    primary.sync().unwrap();
    ship(&primary, &replica);
    // Applied, durable and checkpointed on the replica (its node syncs what it applies).
    replica.with_volume_mut(|v| v.checkpoint()).unwrap();
    // The primary frees the blocks of `old`; the replica applies that, not durably yet.
    primary.unlink(ROOT_INO, b"old").unwrap();
    primary.sync().unwrap();
    ship(&primary, &replica);
    assert!(matches!(
        replica.lookup(ROOT_INO, b"old"),
        Err(FsError::NotFound)
    ));
    // Takeover: the replica turns writable and writes a file as large as `old`, in place.
    replica.set_mode(FsMode::Writable).unwrap();
    let new = replica
        .mknod(C, ROOT_INO, b"new", libc::S_IFREG | 0o644, 0)
        .unwrap();
    replica
        .write(C, new.ino, 0, &vec![0x0b; 64 * 4096])
        .unwrap();
    assert_eq!(
        replica.read(keep.ino, 0, 20_000).unwrap(),
        vec![0x0c; 20_000]
    );
    assert_clean(&replica);
    // Its allocator is the one its volume holds (nothing stale from the replica's time).
    let patched = replica.statfs();
    replica.reload().unwrap();
    let loaded = replica.statfs();
    assert_eq!((patched.bfree, patched.ffree), (loaded.bfree, loaded.ffree));
    // A crash now: the in-place data reached the disk, the journal kept only what was
    // durable. `old` must be gone, or else intact.
    let crashed = Volume::open(
        Box::new(pairfs::MemDevice::from_bytes(
            rn.crash_point().image_with(|_| true),
        )),
        Box::new(pairfs::MemDevice::from_bytes(
            rj.crash_point().durable_image(),
        )),
        VolumeOptions::default(),
    )
    .unwrap();
    let after = Fs::open(crashed, FsOptions::default()).unwrap();
    assert_clean(&after);
    if let Ok(a) = after.lookup(ROOT_INO, b"old") {
        let back = after.read(a.ino, 0, old_data.len() as u32).unwrap();
        assert!(
            back == old_data,
            "`old` survived the crash with the new file's bytes in it"
        );
    }
    assert_eq!(after.read(keep.ino, 0, 20_000).unwrap(), vec![0x0c; 20_000]);
}

/// Takeover and back on one pair of filesystems: the primary turns replica while blocks it
/// freed wait for their entry to be durable (free-pending), the replica turns writable and
/// reuses those blocks, and the former primary applies that. Its allocator must follow
/// the volume, not release its old free-pending blocks over the new primary's data.
#[test]
fn a_demoted_primary_follows_the_new_primary_block_for_block() {
    let Pair {
        primary: a,
        replica: b,
        ..
    } = pair();
    let x = a
        .mknod(C, ROOT_INO, b"x", libc::S_IFREG | 0o644, 0)
        .unwrap();
    a.write(C, x.ino, 0, &[1; 64 * 4096]).unwrap();
    a.sync().unwrap();
    ship(&a, &b);
    // `a` frees x's blocks; the entry is sent before it is durable on `a`.
    a.unlink(ROOT_INO, b"x").unwrap();
    ship(&a, &b);
    assert!(a.read_core().alloc.pending_blocks() > 0);
    // Takeover: `a` turns replica, `b` writable; `b` writes where x was.
    a.set_mode(FsMode::Replica).unwrap();
    b.set_mode(FsMode::Writable).unwrap();
    let y = b
        .mknod(C, ROOT_INO, b"y", libc::S_IFREG | 0o644, 0)
        .unwrap();
    b.write(C, y.ino, 0, &[2; 64 * 4096]).unwrap();
    b.sync().unwrap();
    ship(&b, &a);
    // `a` makes it durable (and would release what was free-pending) and goes on.
    a.sync().unwrap();
    a.maintain().unwrap();
    assert_eq!(a.read(y.ino, 0, 64 * 4096).unwrap(), vec![2; 64 * 4096]);
    let followed = a.statfs();
    assert_eq!(
        (followed.bfree, followed.ffree),
        (b.statfs().bfree, b.statfs().ffree)
    );
    a.reload().unwrap();
    let loaded = a.statfs();
    assert_eq!(
        (followed.bfree, followed.ffree),
        (loaded.bfree, loaded.ffree)
    );
    // Failback: `a` writable again, allocating from what it applied.
    b.set_mode(FsMode::Replica).unwrap();
    a.set_mode(FsMode::Writable).unwrap();
    let z = a
        .mknod(C, ROOT_INO, b"z", libc::S_IFREG | 0o644, 0)
        .unwrap();
    a.write(C, z.ino, 0, &[3; 64 * 4096]).unwrap();
    assert_eq!(a.read(y.ino, 0, 64 * 4096).unwrap(), vec![2; 64 * 4096]);
    assert_clean(&a);
    ship(&a, &b);
    assert_eq!(b.read(z.ino, 0, 64 * 4096).unwrap(), vec![3; 64 * 4096]);
    assert_clean(&b);
}

/// The old primary's volume answering a taker's fetches, behind a gate the test opens.
struct GatedPeer {
    vol: Arc<Mutex<Option<Fs>>>,
    open: Mutex<bool>,
    opened: std::sync::Condvar,
    waiting: std::sync::atomic::AtomicUsize,
}

impl pairfs::volume::PeerFetch for GatedPeer {
    fn fetch(&self, blocks: &[(pairfs::BlockNo, pairfs::Seq)]) -> Result<Vec<Vec<u8>>, String> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        drop(open);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        let g = self.vol.lock().unwrap();
        let fs = g.as_ref().expect("the old primary");
        Ok(blocks
            .iter()
            .map(|&(b, _)| fs.with_volume(|v| v.read_block(b)).unwrap().to_vec())
            .collect())
    }
}

impl GatedPeer {
    fn set_open(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.opened.notify_all();
    }
}

/// Runs `op` on its own thread while `peer` holds its answers back, and checks that a
/// write on `fs` (to file `ino`, none of whose blocks is on the peer) completes meanwhile;
/// then lets the peer answer and returns what `op` returned.
fn while_the_peer_waits<T: Send + 'static>(
    fs: &Arc<Fs>,
    peer: &GatedPeer,
    ino: u64,
    op: impl FnOnce(&Fs) -> T + Send + 'static,
) -> T {
    peer.set_open(false);
    let reader = {
        let fs = fs.clone();
        std::thread::spawn(move || op(&fs))
    };
    let asking = Instant::now();
    while peer.waiting.load(Ordering::SeqCst) == 0 {
        assert!(
            asking.elapsed() < Duration::from_secs(20),
            "the operation never asked the peer"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let (done, wrote) = std::sync::mpsc::channel();
    {
        let fs = fs.clone();
        std::thread::spawn(move || done.send(fs.write(C, ino, 0, &[7; 4096])).ok());
    }
    let r = wrote.recv_timeout(Duration::from_secs(20));
    assert!(
        matches!(r, Ok(Ok(4096))),
        "the writer waited for the reader's fetch: {r:?}"
    );
    assert_eq!(peer.waiting.load(Ordering::SeqCst), 1, "still waiting");
    assert!(!reader.is_finished());
    peer.set_open(true);
    reader.join().unwrap()
}

#[test]
fn a_reader_waiting_for_the_peer_keeps_no_writer_out() {
    use pairfs::takeover::{EntryHeader, LuArea, RemoteIndex};
    let Pair {
        primary, replica, ..
    } = pair();
    // Files in two inode blocks: f1..f3 in the first, h in another.
    let mut inos = Vec::new();
    for k in 0..40 {
        let name = format!("f{k}");
        let a = primary
            .mknod(C, ROOT_INO, name.as_bytes(), libc::S_IFREG | 0o644, 0)
            .unwrap();
        inos.push(a.ino);
    }
    // g: in a third inode block, only ever read by the listing.
    let (f1, f2, f3, g, h) = (inos[0], inos[1], inos[2], inos[20], inos[39]);
    let sb = primary.superblock();
    let block_of = |i: u64| sb.inode_location(i).0;
    assert_ne!(block_of(f1), block_of(h));
    assert!(![block_of(f1), block_of(h)].contains(&block_of(g)));
    for f in [f1, f2, f3, g] {
        primary.write(C, f, 0, &vec![1; 64 << 10]).unwrap();
    }
    ship(&primary, &replica);
    // Then rewritten on the primary only: the backlog the replica takes over with.
    for f in [f1, f2, f3, g] {
        primary.write(C, f, 0, &vec![2; 64 << 10]).unwrap();
    }
    primary.seal().unwrap();
    let metas = primary.with_volume_mut(|v| v.take_entries(true));
    let applied = replica.with_volume(|v| v.journal().last_seq());
    let mut remote = RemoteIndex::new(applied);
    for m in &metas {
        let e = primary.with_volume(|v| v.read_wire_entry(m.seq)).unwrap();
        let h = EntryHeader {
            seq: e.seq,
            prev_seq: e.prev_seq,
            timestamp_ns: e.timestamp_ns,
            bytes: e.data_bytes(),
            blocks: e.blocks.iter().map(|b| b.block).collect(),
        };
        remote.add(h, 8192).unwrap();
    }
    let freeze = metas.last().unwrap().seq;
    let lu_dev = pairfs::MemDevice::new(1024 * 4096);
    LuArea::format(&lu_dev, VolumeId([3; 16]), 4096, 8192).unwrap();
    let expect = pairfs::journal::JournalExpect {
        block_size: 4096,
        normal_blocks: 8192,
    };
    let lu = LuArea::open(Box::new(lu_dev), expect, pairfs::Seq::NONE).unwrap();
    let peer = Arc::new(GatedPeer {
        vol: Arc::new(Mutex::new(Some(primary))),
        open: Mutex::new(true),
        opened: std::sync::Condvar::new(),
        waiting: Default::default(),
    });
    replica
        .with_volume_mut(|v| v.begin_takeover(freeze, lu, remote, peer.clone()))
        .unwrap();
    replica.reload().unwrap();
    replica.set_mode(FsMode::Writable).unwrap();
    let fs = Arc::new(replica);
    // A metadata read (the inodes' block is on the peer), a read of data, and a write that
    // reads the block it changes part of.
    let attr = while_the_peer_waits(&fs, &peer, h, move |fs| fs.getattr(f1));
    assert_eq!(attr.unwrap().size, 64 << 10);
    let data = while_the_peer_waits(&fs, &peer, h, move |fs| fs.read(f2, 0, 64 << 10));
    assert_eq!(data.unwrap(), vec![2; 64 << 10]);
    let wrote = while_the_peer_waits(&fs, &peer, h, move |fs| fs.write(C, f3, 100, b"xyz"));
    assert_eq!(wrote.unwrap(), 3);
    // A listing with attributes: g's inode block is on the peer and not fetched yet.
    let listed = while_the_peer_waits(&fs, &peer, h, move |fs| {
        let mut sizes = Vec::new();
        fs.readdir_plus(ROOT_INO, 0, |item, a| {
            sizes.push((item.name.clone(), a.size));
            false
        })
        .map(|()| sizes)
    });
    let listed = listed.unwrap();
    assert_eq!(listed.len(), 2 + 40, "{listed:?}");
    assert!(listed.contains(&(b"f1".to_vec(), 64 << 10)), "{listed:?}");
    assert!(listed.contains(&(b"f20".to_vec(), 64 << 10)), "{listed:?}");
    let mut want = vec![2; 64 << 10];
    want[100..103].copy_from_slice(b"xyz");
    assert_eq!(fs.read(f3, 0, 64 << 10).unwrap(), want);
    assert_eq!(fs.read(h, 0, 4096).unwrap(), vec![7; 4096]);
    assert_clean(&fs);
}
