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

#[test]
fn a_replica_follows_the_allocation_bitmaps_entry_by_entry() {
    // A primary with a retaining volume; the replica starts as a byte copy of it and then
    // applies the primary's entries. Its in-memory allocator, patched block by block,
    // must equal one loaded from scratch.
    let n = Arc::new(CrashDevice::new(8192 * 4096));
    let j = Arc::new(CrashDevice::new(256 * 4096));
    Volume::create(&*n, &*j, VolumeId([3; 16]), 4096).unwrap();
    let opts = VolumeOptions {
        retain: true,
        ..VolumeOptions::default()
    };
    let mut v = Volume::open(Box::new(n.clone()), Box::new(j.clone()), opts).unwrap();
    Fs::format(&mut v, &FormatOptions { inodes: None }).unwrap();
    let primary = Fs::open(v, FsOptions::default()).unwrap();
    primary.sync().unwrap();
    primary.with_volume_mut(|v| v.checkpoint()).unwrap();
    let _ = primary.with_volume_mut(|v| v.take_entries(false));
    let rv = Volume::open(
        Box::new(pairfs::MemDevice::from_bytes(
            n.crash_point().durable_image(),
        )),
        Box::new(pairfs::MemDevice::from_bytes(
            j.crash_point().durable_image(),
        )),
        VolumeOptions::default(),
    )
    .unwrap();
    let replica = Fs::open(
        rv,
        FsOptions {
            read_only: true,
            ..FsOptions::default()
        },
    )
    .unwrap();
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
