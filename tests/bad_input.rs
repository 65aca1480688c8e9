//! Bad input gets a clear error and loses nothing: corrupted superblock, journal entry and
//! inode blocks are caught by their checksums; bad arguments get readable messages; nothing
//! panics.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::{Node, bin, run, sh};

fn pairfs(args: &[&str]) -> (i32, String) {
    let out = run(Command::new(bin()).args(args));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "pairfs panicked: {text}");
    (out.status.code().unwrap_or(-1), text)
}

fn flip(path: &std::path::Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xa5;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

fn u64_at(path: &std::path::Path, offset: u64) -> u64 {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut b = [0u8; 8];
    f.read_exact(&mut b).unwrap();
    u64::from_le_bytes(b)
}

/// Mounting fails with `needle` in the message, and the daemon exits non-zero.
fn mount_fails(n: &Node, needle: &str) {
    let d = n.data.display().to_string();
    let m = n.mnt.display().to_string();
    let (code, text) = pairfs(&["mount", "--data", &d, &m]);
    assert_ne!(code, 0, "mount of a corrupt volume succeeded: {text}");
    assert!(
        text.contains(needle),
        "mount error does not say {needle:?}: {text}"
    );
    assert!(!common::is_mounted(&n.mnt));
}

fn fsck_fails(n: &Node, needle: &str) {
    let (ok, text) = n.fsck();
    assert!(!ok, "fsck passed a corrupt volume: {text}");
    assert!(
        text.contains(needle),
        "fsck report does not say {needle:?}: {text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn corrupt_superblock_is_refused_clearly() {
    let n = Node::new("badsb");
    n.init("64M", &[]);
    flip(&n.data.join("volume"), 40);
    mount_fails(&n, "superblock checksum mismatch");
    fsck_fails(&n, "superblock");
}

#[test]
fn corrupt_journal_entry_is_refused_and_nothing_is_lost() {
    let mut n = Node::new("badjournal");
    n.init("64M", &["--journal-size", "16M"]);
    n.mount(&["--commit-interval", "1000"]);
    let m = n.mnt.display().to_string();
    // Three durable entries that are not checkpointed yet; then a crash.
    sh(&format!(
        "echo one > {m}/a && sync {m}/a && echo two > {m}/b && sync {m}/b && echo three > {m}/c && sync {m}/c"
    ));
    n.kill9();
    let journal = n.data.join("journal");
    let pristine = std::fs::read(&journal).unwrap();
    // The current header slot is the one with the higher generation.
    let (g0, g1) = (u64_at(&journal, 16), u64_at(&journal, 512 + 16));
    let slot = if g1 > g0 { 512 } else { 0 };
    let tail = u64_at(&journal, slot + 64);
    // The first retained entry: header block, then its block images.
    flip(&journal, tail + 4096 + 100);
    mount_fails(&n, "is corrupt");
    fsck_fails(&n, "is corrupt");
    // Nothing was changed by the failed attempts: restoring the byte recovers everything.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap();
    f.write_all(&pristine).unwrap();
    f.sync_all().unwrap();
    drop(f);
    n.assert_fsck_clean();
    n.mount(&[]);
    assert_eq!(sh(&format!("cat {m}/a {m}/b {m}/c")), "one\ntwo\nthree\n");
    n.unmount();
}

#[test]
fn corrupt_inode_blocks_give_eio_not_a_crash() {
    let mut n = Node::new("badinode");
    n.init("64M", &[]);
    n.mount(&[]);
    let m = n.mnt.display().to_string();
    sh(&format!("echo hello > {m}/victim && echo fine > {m}/other"));
    let ino = sh(&format!("stat -c %i {m}/victim"))
        .trim()
        .parse::<u64>()
        .unwrap();
    n.unmount();
    let volume = n.data.join("volume");
    let itab_start = u64_at(&volume, 80);
    // Inode slot (ino - 1), 256 bytes each, in 4 KiB blocks: hit its size field.
    flip(&volume, itab_start * 4096 + (ino - 1) * 256 + 17);
    fsck_fails(&n, &format!("inode {ino}"));
    n.mount(&[]);
    let out = run(Command::new("cat").arg(n.mnt.join("victim")));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The daemon keeps serving the rest of the volume.
    assert_eq!(sh(&format!("cat {m}/other")), "fine\n");
    n.unmount();
    // The root inode: the filesystem cannot be opened, and says why.
    flip(&volume, itab_start * 4096 + 17);
    mount_fails(&n, "inode 1");
}

#[test]
fn bad_arguments_get_clear_messages() {
    let n = Node::new("args");
    let d = n.data.display().to_string();
    let m = n.mnt.display().to_string();
    let cases: &[(&[&str], &str)] = &[
        (
            &["init", "--data", &d, "--size", "12X"],
            "invalid size '12X'",
        ),
        (&["init", "--data", &d, "--size", "100K"], "too small"),
        (
            &[
                "init",
                "--data",
                &d,
                "--size",
                "64M",
                "--block-size",
                "3000",
            ],
            "power of two",
        ),
        (
            &[
                "init",
                "--data",
                &d,
                "--size",
                "64M",
                "--journal-size",
                "4K",
            ],
            "journal size",
        ),
        (&["mount", "--data", &d, &m], "not a pairfs data directory"),
        (&["fsck", "--data", &d], "not a pairfs data directory"),
    ];
    for (args, needle) in cases {
        let (code, text) = pairfs(args);
        assert_ne!(code, 0, "{args:?} succeeded");
        assert!(text.contains(needle), "{args:?}: {text:?} lacks {needle:?}");
    }
    n.init("64M", &[]);
    let (code, text) = pairfs(&["init", "--data", &d, "--size", "64M"]);
    assert_ne!(code, 0);
    assert!(text.contains("--force"), "{text}");
    let (code, text) = pairfs(&["mount", "--data", &d, "/nonexistent/mnt"]);
    assert_ne!(code, 0);
    assert!(text.contains("/nonexistent/mnt"), "{text}");
    let mut n = n;
    n.mount(&[]);
    let (code, text) = pairfs(&["mount", "--data", &d, &m]);
    assert_ne!(code, 0);
    assert!(text.contains("in use by another pairfs process"), "{text}");
    let (code, text) = pairfs(&["fsck", "--data", &d]);
    assert_ne!(code, 0);
    assert!(text.contains("in use"), "{text}");
    n.unmount();
    n.assert_fsck_clean();
}
