//! A replica that never silently differs from its primary (issue 9), on real processes:
//! `kill -9` of either node in the middle of in-place overwrites, appends, truncates and a
//! `cp -a`, round after round; each round ends with `pairfs verify` and every file's
//! checksum on both mounts. Sync mode's promise with nodes killed, a block corrupted on the
//! secondary found and repaired, and a failed apply the pair recovers from without a
//! restart.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::pair::{Pair, churn, pair};
use common::sh;

/// Rounds of each kill test (the issue asks for at least ten).
fn rounds() -> u64 {
    std::env::var("PAIRFS_PAIR_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

/// A pair with a 64 MiB file, synced and replicated.
fn loaded_pair(tag: &str, replication: &str) -> Pair {
    let mut p = pair(tag, "2G", replication);
    p.start();
    sh(&format!(
        "dd if=/dev/urandom of={}/big bs=1M count=64 conv=fsync status=none",
        p.a.mnt.display()
    ));
    p.fsync_a();
    p.caught_up_durably(Duration::from_secs(120));
    p
}

/// Kills one node (`primary` or not) with SIGKILL in the middle of the churn, restarts
/// it, and checks that the two nodes hold the same data once the pair is back.
fn kill_rounds(p: &mut Pair, primary: bool) {
    for round in 0..rounds() {
        let stop = Arc::new(AtomicBool::new(false));
        let worker = churn(&p.a.mnt, stop.clone(), round * 13);
        std::thread::sleep(Duration::from_millis(300 + (round * 397) % 1200));
        if primary {
            p.a.kill9();
        } else {
            p.b.kill9();
        }
        stop.store(true, Ordering::Relaxed);
        worker.join().unwrap();
        if primary {
            p.a.start(&[]);
            p.a.wait_mounted();
        } else {
            p.b.start(&[]);
            p.b.wait_mounted();
        }
        p.fsync_a();
        p.caught_up_durably(Duration::from_secs(120));
        let t = Instant::now();
        p.assert_verified();
        p.assert_same_files();
        eprintln!("round {round}: verified in {:?}", t.elapsed());
    }
    p.b.stop();
    p.a.stop();
}

#[test]
fn kill_9_of_the_primary_during_changes_leaves_no_difference() {
    let mut p = loaded_pair("k9p", "");
    kill_rounds(&mut p, true);
}

#[test]
fn kill_9_of_the_secondary_during_changes_leaves_no_difference() {
    let mut p = loaded_pair("k9s", "");
    kill_rounds(&mut p, false);
}

/// A block of a file corrupted on the secondary's disk (behind pairfs' back) is found by
/// `pairfs verify`, named with its file, and repaired from the primary by `--repair`.
#[test]
fn verify_finds_and_repair_fixes_a_block_corrupted_on_the_secondary() {
    let mut p = pair("vfy", "1G", "");
    p.start();
    let ma = p.a.mnt.display().to_string();
    // A file of sixteen blocks, each filled with one byte: easy to find on disk.
    sh(&format!(
        "python3 -c \"import os; f=open('{ma}/f','wb'); \
         f.write(b''.join(bytes([0xA0 + i])*4096 for i in range(16))); f.flush(); os.fsync(f.fileno())\" \
         && cp -a /usr/include/linux {ma}/tree"
    ));
    p.fsync_a();
    p.caught_up_durably(Duration::from_secs(60));
    p.assert_verified();
    // Read the block through the replica's mount first, so that its page cache holds it.
    let mb = p.b.mnt.display().to_string();
    sh(&format!("cat {mb}/f > /dev/null"));
    let volume = p.b.data.join("volume");
    let block = sh(&format!(
        "python3 -c \"import os; pat=bytes([0xA5])*4096; fd=os.open('{}', os.O_RDWR); \
         off=0\nwhile True:\n  d=os.pread(fd, 1<<22, off)\n  i=d.find(pat)\n  \
         if i>=0 and (off+i)%4096==0: break\n  off+=len(d)-4096\n\
         os.pwrite(fd, b'corrupt!'*512, off+i); print((off+i)//4096)\"",
        volume.display()
    ));
    let block: u64 = block.trim().parse().unwrap();
    let (code, out) = p.a.verify(false);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("1 block(s) DIFFER"), "{out}");
    assert!(
        out.contains(&format!("block {block}: /f at offset {}", 5 * 4096)),
        "{out}"
    );
    let (code, out) = p.a.verify(true);
    assert_eq!(code, 1, "differences were found: {out}");
    assert!(out.contains("1 block(s) written again"), "{out}");
    assert!(out.contains("now equal"), "{out}");
    p.assert_verified();
    // The replica's readers see the repaired content, page cache or not.
    sh(&format!("cmp {ma}/f {mb}/f"));
    let st = p.a.json();
    assert_eq!(st["last_verify"]["differing"], 0, "{st}");
    p.b.stop();
    p.a.stop();
}

/// Sync mode (DRBD protocol C): a write returns once its entry is on both nodes, so a
/// primary killed right after loses nothing; an fsync returns once it is durable on the
/// peer; a dead peer degrades the pair after the sync timeout (recorded, shown), and the
/// pair is whole again once the peer has caught up.
#[test]
fn sync_mode_loses_no_acknowledged_write_when_a_node_is_killed() {
    let cfg = "[replication]\nmode = \"sync\"\nsync_timeout = \"1s\"\n";
    let mut p = pair("syn", "1G", cfg);
    p.start();
    let (ma, mb) = (p.a.mnt.display().to_string(), p.b.mnt.display().to_string());
    sh(&format!("echo warm > {ma}/warm"));
    p.fsync_a();
    p.caught_up_durably(Duration::from_secs(60));
    // Plain writes (no fsync), each returning only once the secondary has it.
    for i in 0..20 {
        sh(&format!("echo line-{i} >> {ma}/log"));
    }
    p.a.kill9();
    let want: String = (0..20).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(
        sh(&format!("cat {mb}/log")),
        want,
        "the secondary has every write"
    );
    // The primary restarted after a crash in sync mode reconciles before it writes.
    p.a.start(&[]);
    p.a.wait_mounted();
    sh(&format!("echo after-restart >> {ma}/log"));
    assert!(
        p.a.log_text().contains("reconcil") || p.a.log_text().contains("holds nothing newer"),
        "{}",
        p.a.log_text()
    );
    // An fsync returns once the peer has everything durably.
    sh(&format!(
        "python3 -c \"import os; f=open('{ma}/synced','wb'); f.write(os.urandom(1<<20)); \
         f.flush(); os.fsync(f.fileno())\""
    ));
    let ja = p.a.json();
    assert!(
        ja["replica_durable_seq"].as_u64() >= ja["durable_seq"].as_u64(),
        "fsync returned before the peer had it durably: {ja}"
    );
    // The peer killed: a writer waits the sync timeout, then the pair is degraded.
    p.b.kill9();
    let t = Instant::now();
    sh(&format!("echo alone >> {ma}/log"));
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(900), "waited {waited:?}");
    let ja = p.a.json();
    let since = ja["degraded_since_seq"].as_u64();
    assert!(since.is_some(), "not degraded: {ja}");
    let t = Instant::now();
    sh(&format!("echo alone-again >> {ma}/log"));
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "degraded writes still wait"
    );
    assert!(
        sh(&format!(
            "{} status --config {}",
            common::bin().display(),
            p.a.config.display()
        ))
        .contains("DEGRADED"),
        "status does not say so"
    );
    // The peer returns and catches up: sync mode is whole again.
    p.b.start(&[]);
    p.b.wait_mounted();
    p.fsync_a();
    p.caught_up_durably(Duration::from_secs(60));
    let t = Instant::now();
    while !p.a.json()["degraded_since_seq"].is_null() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "still degraded: {}",
            p.a.json()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    p.assert_verified();
    p.assert_same_files();
    p.b.stop();
    p.a.stop();
}

/// A tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        sh(&format!(
            "mount -t tmpfs -o size={size} tmpfs {}",
            at.display()
        ));
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .output();
    }
}

/// The secondary's disk fills up: its applies fail (ENOSPC), which it reports (status,
/// log) instead of going silent; once there is room again it reopens its volume and the
/// pair catches up — without a restart of either node.
#[test]
fn a_failed_apply_on_the_secondary_is_reported_and_the_pair_recovers() {
    use common::pair::{fingerprint, node, write_config};
    use common::{bin, run};
    common::require_fuse();
    let mut a = node("fap", "a");
    let mut b = node("fap", "b");
    let disk = Tmpfs::mount(&b.data, "96M");
    for (n, extra) in [
        (&a, vec!["--name", "a"]),
        (&b, vec!["--name", "b", "--secondary"]),
    ] {
        let out = run(std::process::Command::new(bin())
            .args(["init", "--size", "1G", "--journal-size", "24M", "--data"])
            .arg(&n.data)
            .args(extra));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (pa, pb) = (common::pair::port(), common::pair::port());
    let (fa, fb) = (fingerprint(&a.data), fingerprint(&b.data));
    write_config(&a, pa, "primary", "b", pb, &fb, "");
    write_config(&b, pb, "secondary", "a", pa, &fa, "");
    a.start(&[]);
    b.start(&[]);
    a.wait_mounted();
    b.wait_mounted();
    let mut p = Pair { a, b };
    let ma = p.a.mnt.display().to_string();
    sh(&format!("echo before > {ma}/before"));
    p.fsync_a();
    p.caught_up_durably(Duration::from_secs(60));
    // Leave the secondary's disk 8 MiB, then write 40 MB.
    let free: u64 = sh(&format!(
        "df --output=avail -B1 {} | tail -1",
        p.b.data.display()
    ))
    .trim()
    .parse()
    .unwrap();
    let filler = p.b.data.join("filler");
    sh(&format!(
        "fallocate -l {} {}",
        free.saturating_sub(8 << 20),
        filler.display()
    ));
    sh(&format!(
        "dd if=/dev/urandom of={ma}/big bs=1M count=40 conv=fsync status=none"
    ));
    let t = Instant::now();
    loop {
        let jb = p.b.json();
        if let Some(e) = jb["apply_error"].as_str() {
            assert!(e.contains("space") || e.contains("I/O"), "{e}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no apply error reported: {jb}\n{}",
            p.b.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(p.b.log_text().contains("failed"), "{}", p.b.log_text());
    // (Reopening while the disk is still full fails, and is tried again later.)
    std::thread::sleep(Duration::from_millis(1500));
    // Room again: the secondary reopens its volume by itself and catches up.
    std::fs::remove_file(&filler).unwrap();
    p.fsync_a();
    p.caught_up_durably(Duration::from_secs(120));
    assert!(
        p.b.log_text().contains("volume reopened"),
        "{}",
        p.b.log_text()
    );
    assert!(p.b.json()["apply_error"].is_null(), "{}", p.b.json());
    p.assert_verified();
    p.assert_same_files();
    p.b.stop();
    p.a.stop();
    // The small disk goes before the nodes' directories are removed (it is mounted on one).
    drop(disk);
}
