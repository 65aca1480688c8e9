//! `kill -9` of `pairfs mount` during heavy writes, then fsck + remount + "every fsync'ed
//! byte is there", for many rounds on the same volume.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Node, content};

/// Rounds in CI (the issue asks for at least 20); `PAIRFS_KILL9_ROUNDS` overrides.
fn rounds() -> usize {
    std::env::var("PAIRFS_KILL9_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

/// A writer: files of various sizes (small ones journaled, big ones written in place),
/// renames and deletes; records every file whose fsync returned.
fn writer(
    dir: PathBuf,
    round: usize,
    stop: Arc<AtomicBool>,
    synced: Arc<Mutex<Vec<(PathBuf, u64, usize)>>>,
) {
    let sub = dir.join(format!("r{round}"));
    if std::fs::create_dir_all(&sub).is_err() {
        return;
    }
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let seed = (round as u64) << 32 | i;
        let len = match i % 4 {
            0 => 100,
            1 => 5_000,
            2 => 300_000,
            _ => 2_000_000,
        };
        let tmp = sub.join(format!("f{i}.tmp"));
        let path = sub.join(format!("f{i}"));
        let r = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&content(seed, len))?;
            if i % 3 != 0 {
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &path)?;
            if i % 3 != 0 {
                std::fs::File::open(&sub)?.sync_all()?;
                synced.lock().unwrap().push((path.clone(), seed, len));
            }
            if i % 5 == 0 {
                let _ = std::fs::remove_file(sub.join(format!("f{}", i - 2)));
            }
            Ok(())
        })();
        if r.is_err() {
            return; // the daemon is gone
        }
    }
}

/// Writers delete `f{i-2}` when `i % 5 == 0`: those files may legitimately be gone.
fn deleted_by_writer(p: &Path) -> bool {
    let name = p
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let i: u64 = name.trim_start_matches('f').parse().unwrap_or(0);
    (i + 2) % 5 == 0
}

fn verify(mnt: &Path, synced: &[(PathBuf, u64, usize)], removed_ok: impl Fn(&Path) -> bool) {
    for (p, seed, len) in synced {
        if removed_ok(p) {
            continue;
        }
        let rel = p.strip_prefix(mnt).unwrap_or(p);
        let got = std::fs::read(p).unwrap_or_else(|e| panic!("fsynced file {rel:?} lost: {e}"));
        assert_eq!(got.len(), *len, "fsynced file {rel:?} has the wrong size");
        assert!(
            got == content(*seed, *len),
            "fsynced file {rel:?} has the wrong content"
        );
    }
}

#[test]
fn kill_9_during_heavy_writes_loses_nothing_fsynced() {
    let mut n = Node::new("kill9");
    n.init("4G", &["--journal-size", "64M"]);
    let mut all_synced: Vec<(PathBuf, u64, usize)> = Vec::new();
    let mut last_round: Vec<(PathBuf, u64, usize)> = Vec::new();
    for round in 0..rounds() {
        let t = std::time::Instant::now();
        n.mount(&["--commit-interval", "0.2"]);
        // What the last round fsynced survived its kill and recovery (all rounds are
        // checked again at the end).
        verify(&n.mnt, &last_round, deleted_by_writer);
        let stop = Arc::new(AtomicBool::new(false));
        let synced = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..3)
            .map(|t| {
                let (d, s, y) = (n.mnt.join(format!("w{t}")), stop.clone(), synced.clone());
                std::thread::spawn(move || writer(d, round, s, y))
            })
            .collect();
        // Kill at a varying moment of the load.
        std::thread::sleep(Duration::from_millis(300 + (round as u64 * 137) % 900));
        n.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        n.assert_fsck_clean();
        last_round = std::mem::take(&mut *synced.lock().unwrap());
        eprintln!(
            "round {round}: {} files fsynced, {:?}",
            last_round.len(),
            t.elapsed()
        );
        all_synced.extend(last_round.iter().cloned());
    }
    n.mount(&[]);
    verify(&n.mnt, &all_synced, deleted_by_writer);
    assert!(
        all_synced.len() > 3 * rounds(),
        "too few fsynced files: {}",
        all_synced.len()
    );
    n.unmount();
    n.assert_fsck_clean();
}
