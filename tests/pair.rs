//! Replication on real processes: two nodes on loopback (two data dirs, two ports, two
//! mounts), killed with SIGKILL, frozen, and talked to by strangers.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pair::{Netns, Pair, fingerprint, node, pair, port, write_config};
use common::{bin, is_mounted, run, sh};

#[test]
fn two_nodes_replicate_a_real_tree() {
    let mut p = pair("tree", "2G", "");
    p.start();
    let (ma, mb) = (p.a.mnt.display().to_string(), p.b.mnt.display().to_string());
    sh(&format!(
        "cp -a /usr/include {ma}/inc && mkdir {ma}/d && echo hello > {ma}/d/f && ln -s d/f {ma}/l"
    ));
    p.fsync_a();
    p.caught_up(Duration::from_secs(60));
    // The first copy moved the blocks ever written, not the 2 GiB volume.
    let moved = p.b.u("wire_bytes_received");
    assert!(moved < 600_000_000, "the initial copy moved {moved} bytes");
    sh(&format!("diff -r --no-dereference {ma} {mb}"));
    let sums = |m: &str| {
        sh(&format!(
            "cd {m} && find . -type f -print0 | sort -z | xargs -0 md5sum"
        ))
    };
    assert_eq!(sums(&ma), sums(&mb));
    assert_eq!(sh(&format!("cat {mb}/d/f")), "hello\n");
    // The secondary's mount is read-only.
    let out = run(Command::new("touch").arg(format!("{mb}/x")));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only"));
    // The kernel mount is read-write (to turn writable without a remount) and answers
    // access(2) alone: the mount's read-only flag makes it say EROFS for writing.
    let access = |path: &str, mode: u32| {
        sh(&format!(
            "python3 -c 'import ctypes; l = ctypes.CDLL(None, use_errno=True); \
             r = l.access(b\"{path}\", {mode}); print(r, ctypes.get_errno() if r else 0)'"
        ))
    };
    assert_eq!(
        access(&format!("{mb}/d/f"), 2).trim(),
        format!("-1 {}", libc::EROFS)
    );
    assert_eq!(access(&mb, 2).trim(), format!("-1 {}", libc::EROFS));
    assert_eq!(access(&format!("{mb}/d/f"), 4).trim(), "0 0");
    // Changes after the first copy stream as journal entries and appear on the replica.
    sh(&format!(
        "rm -rf {ma}/inc/linux && mv {ma}/d {ma}/e && echo more >> {ma}/e/f"
    ));
    p.fsync_a();
    p.caught_up(Duration::from_secs(30));
    let t = Instant::now();
    while sh(&format!("cat {mb}/e/f 2>/dev/null || true")) != "hello\nmore\n" {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the replica mount did not refresh"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    sh(&format!("diff -r --no-dereference {ma} {mb}"));
    p.b.stop();
    p.a.stop();
}

/// The replica's kernel caches names for a second (the replica mount's TTL); when an entry
/// changes a directory, the replica invalidates the names it touched at once. A name that
/// is not UTF-8 must be invalidated as the bytes it is: a lossy conversion names another
/// entry, and the replica went on resolving the old name to the renamed file until the
/// TTL ran out.
#[test]
fn the_replica_forgets_renamed_names_that_are_not_utf8() {
    let mut p = pair("nonutf8", "1G", "");
    p.start();
    let (ma, mb) = (p.a.mnt.display().to_string(), p.b.mnt.display().to_string());
    let exists = |path: &str| {
        let out = sh(&format!(
            "python3 -c 'import os; print(os.path.exists(b\"{path}\"))'"
        ));
        out.trim() == "True"
    };
    // A round is conclusive only if the check comes within the TTL of the replica's last
    // lookup of the old name (else the kernel forgot it anyway).
    let mut conclusive = 0;
    for round in 0..5 {
        let old = format!("caf\\xe9{round}");
        sh(&format!(
            "python3 -c 'open(b\"{ma}/{old}\", \"w\").write(\"one\")'"
        ));
        p.fsync_a();
        p.caught_up(Duration::from_secs(30));
        let t = Instant::now();
        while !exists(&format!("{mb}/{old}")) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the replica never showed the file"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let looked_up = Instant::now(); // the kernel caches the name from here
        sh(&format!(
            "python3 -c 'import os; os.rename(b\"{ma}/{old}\", b\"{ma}/renamed{round}\")'"
        ));
        p.fsync_a();
        p.caught_up(Duration::from_secs(30));
        let still_there = exists(&format!("{mb}/{old}"));
        if looked_up.elapsed() >= Duration::from_millis(900) {
            continue;
        }
        assert!(
            !still_there,
            "round {round}: the replica still resolves the old name after the rename was applied"
        );
        assert_eq!(sh(&format!("cat {mb}/renamed{round}")), "one");
        conclusive += 1;
        break;
    }
    assert!(
        conclusive > 0,
        "no round checked within the TTL (machine too slow?)"
    );
    p.b.stop();
    p.a.stop();
}

#[test]
fn killed_secondary_catches_up_from_the_journal() {
    let mut p = pair("kill", "4G", "[replication]\njournal_limit = \"256M\"\n");
    p.start();
    let ma = p.a.mnt.display().to_string();
    sh(&format!("head -c 50000000 /dev/urandom > {ma}/before"));
    p.fsync_a();
    p.caught_up(Duration::from_secs(60));
    // Killed mid-stream: a writer is filling the primary while the secondary dies.
    let writer = {
        let ma = ma.clone();
        std::thread::spawn(move || sh(&format!("head -c 30000000 /dev/urandom > {ma}/during")))
    };
    std::thread::sleep(Duration::from_millis(100));
    p.b.kill9();
    writer.join().unwrap();
    p.fsync_a();
    p.b.start(&[]);
    p.b.wait_mounted();
    p.caught_up(Duration::from_secs(60));
    let received = p.b.u("wire_bytes_received");
    assert!(
        received < 60_000_000,
        "catch-up moved {received} bytes for a 30 MB backlog (a full copy would be > 80 MB)"
    );
    assert!(
        received > 25_000_000,
        "catch-up moved only {received} bytes"
    );
    sh(&format!("cmp {ma}/during {}/during", p.b.mnt.display()));
    sh(&format!("cmp {ma}/before {}/before", p.b.mnt.display()));
    p.b.stop();
    p.a.stop();
}

#[test]
fn link_loss_resyncs_by_journal_then_by_bitmap() {
    // Node b on a second host (a network namespace); the link between them is cut.
    let net = Netns::new("ll");
    let extra = "[replication]\njournal_limit = \"8M\"\n[timeouts]\nkeepalive = \"100ms\"\nidle = \"500ms\"\n";
    let mut p = pair("link", "2G", extra);
    p.across(&net, extra);
    p.start();
    let ma = p.a.mnt.display().to_string();
    let mb = p.b.mnt.display().to_string();
    sh(&format!("echo start > {ma}/start"));
    p.fsync_a();
    p.caught_up(Duration::from_secs(60));
    let wait_disconnected = |p: &Pair| {
        let t = Instant::now();
        while p.a.json()["connected"] == serde_json::Value::Bool(true) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the primary did not notice the loss"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        t.elapsed()
    };
    // Link loss, a backlog the journal holds, then the link returns.
    net.link(false);
    let noticed = wait_disconnected(&p);
    assert!(
        noticed < Duration::from_secs(3),
        "loss noticed after {noticed:?}"
    );
    sh(&format!("head -c 2000000 /dev/urandom > {ma}/small"));
    p.fsync_a();
    assert_eq!(p.a.json()["backlog"], "journal");
    net.link(true);
    p.caught_up(Duration::from_secs(30));
    sh(&format!("cmp {ma}/small {mb}/small"));
    // A longer outage: more than the journal limit, so the bitmap takes over.
    net.link(false);
    wait_disconnected(&p);
    sh(&format!(
        "head -c 20000000 /dev/urandom > {ma}/big && echo tail > {ma}/tail"
    ));
    p.fsync_a();
    let j = p.a.json();
    assert_eq!(j["backlog"], "bitmap", "{j}");
    assert!(j["bitmap_blocks"].as_u64().unwrap() > 1000, "{j}");
    net.link(true);
    p.caught_up(Duration::from_secs(60));
    assert_eq!(p.a.json()["backlog"], "journal", "bitmap resync completed");
    sh(&format!(
        "cmp {ma}/big {mb}/big && cmp {ma}/tail {mb}/tail && diff -r --no-dereference {ma} {mb}"
    ));
    p.b.stop();
    p.a.stop();
}

#[test]
fn async_writers_wait_while_the_peer_is_further_behind_than_max_lag() {
    // A peer that stops applying but stays connected (SIGSTOP; the idle timeout is far
    // away): once the oldest entry it has not applied is older than max_lag, writers on
    // the primary wait for it, so what a failover could lose stays bounded.
    let cfg = "[replication]\nmax_lag = \"1s\"\n[timeouts]\nkeepalive = \"1s\"\nidle = \"60s\"\n";
    let mut p = pair("lag", "2G", cfg);
    p.start();
    let (ma, mb) = (p.a.mnt.display().to_string(), p.b.mnt.display().to_string());
    sh(&format!("echo warm > {ma}/warm"));
    p.fsync_a();
    p.caught_up(Duration::from_secs(60));
    p.b.signal(libc::SIGSTOP);
    let t0 = Instant::now();
    // 64 KiB + fsync for 8 s; the seconds since t0 at which each one completed.
    let writer = {
        let ma = ma.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut done = Vec::new();
            let mut f = std::fs::File::create(format!("{ma}/stream")).unwrap();
            let mut i = 0u8;
            while start.elapsed() < Duration::from_secs(8) {
                f.write_all(&[i; 65536]).unwrap();
                f.sync_all().unwrap();
                done.push(t0.elapsed().as_secs_f64());
                i = i.wrapping_add(1);
            }
            done
        })
    };
    std::thread::sleep(Duration::from_secs(6));
    p.b.signal(libc::SIGCONT);
    let done = writer.join().unwrap();
    let early = done.iter().filter(|&&t| t < 0.9).count();
    let held = done.iter().filter(|&&t| (2.5..4.5).contains(&t)).count();
    let after = done.iter().filter(|&&t| t > 6.5).count();
    assert!(
        early >= 5,
        "the writer barely ran before the limit: {early} writes"
    );
    assert!(
        held <= 1,
        "{held} writes completed between 2.5 s and 4.5 s while the peer was 1.5 s+ behind (max_lag 1s)"
    );
    assert!(
        after >= 5,
        "writes did not resume once the peer did: {after}"
    );
    p.fsync_a();
    p.caught_up(Duration::from_secs(60));
    sh(&format!("cmp {ma}/stream {mb}/stream"));
    p.b.stop();
    p.a.stop();
}

#[test]
fn sync_mode_kill_of_the_primary_after_a_write_loses_nothing() {
    let mut p = pair("sync", "1G", "[replication]\nmode = \"sync\"\n");
    p.start();
    let (ma, mb) = (p.a.mnt.display().to_string(), p.b.mnt.display().to_string());
    sh(&format!("echo warm > {ma}/warm"));
    p.fsync_a();
    p.caught_up(Duration::from_secs(60));
    // Plain writes (no fsync): each returns only once the secondary has it durably.
    for i in 0..20 {
        sh(&format!("echo line-{i} >> {ma}/log"));
    }
    p.a.kill9();
    let want: String = (0..20).map(|i| format!("line-{i}\n")).collect();
    let t = Instant::now();
    loop {
        let got = sh(&format!("cat {mb}/log 2>/dev/null || true"));
        if got == want {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "secondary has {got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And durably: the secondary restarted without its peer still has it.
    p.b.kill9();
    p.b.start(&[]);
    p.b.wait_mounted();
    assert_eq!(sh(&format!("cat {mb}/log")), want);
    p.b.stop();
}

#[test]
fn unpinned_peers_and_garbage_are_refused_without_disturbing_the_pair() {
    let mut p = pair("pin", "1G", "");
    p.start();
    let ma = p.a.mnt.display().to_string();
    // A third node with its own identity (its name sorts first, so it dials the primary).
    let mut c = node("pin", "0c");
    run(Command::new(bin())
        .args([
            "init",
            "--size",
            "1G",
            "--name",
            "0c",
            "--secondary",
            "--data",
        ])
        .arg(&c.data));
    let a_listen = std::fs::read_to_string(&p.a.config)
        .unwrap()
        .lines()
        .find(|l| l.starts_with("listen"))
        .unwrap()
        .split('"')
        .nth(1)
        .unwrap()
        .to_string();
    let a_port: u16 = a_listen.rsplit(':').next().unwrap().parse().unwrap();
    write_config(
        &c,
        port(),
        "secondary",
        "a",
        a_port,
        &fingerprint(&p.a.data),
        "",
    );
    c.start(&[]);
    // Garbage datagrams at the primary's QUIC port, meanwhile.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut x: u64 = 0x1234_5678;
    for i in 0..2000 {
        let len = 1 + (i * 37) % 1400;
        let buf: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = sock.send_to(&buf, &a_listen);
    }
    sh(&format!("echo still-working > {ma}/ok"));
    p.fsync_a();
    p.caught_up(Duration::from_secs(30));
    assert_eq!(
        sh(&format!("cat {}/ok", p.b.mnt.display())),
        "still-working\n"
    );
    std::thread::sleep(Duration::from_secs(2));
    let log = p.a.log_text();
    assert!(
        log.contains("not the pinned"),
        "the primary did not log the refusal:\n{log}\nthe stranger's log:\n{}",
        c.log_text()
    );
    assert_eq!(c.json()["connected"], serde_json::Value::Bool(false));
    c.stop_quietly();
    p.b.stop();
    p.a.stop();
}

/// A secondary started before its primary waits for its first copy before mounting; an
/// operator's Ctrl-C or `systemctl stop` (SIGINT/SIGTERM) must stop it then too.
#[test]
fn a_secondary_waiting_for_its_first_copy_stops_on_sigterm() {
    let mut p = pair("wait", "1G", "");
    p.b.start(&[]);
    let t = Instant::now();
    while !p.b.log_text().contains("waiting before mounting") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the secondary did not start waiting: {}",
            p.b.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let t = Instant::now();
        p.b.signal(sig);
        let mut c = p.b.child.take().unwrap();
        let st = loop {
            if let Some(st) = c.try_wait().unwrap() {
                break st;
            }
            if t.elapsed() > Duration::from_secs(10) {
                let _ = c.kill();
                let _ = c.wait();
                panic!("signal {sig}: the waiting secondary did not stop within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            st.success(),
            "signal {sig}: exited with {st}: {}",
            p.b.log_text()
        );
        assert!(!is_mounted(&p.b.mnt));
        if sig == libc::SIGTERM {
            p.b.start(&[]);
            let t = Instant::now();
            while p.b.json().is_null() {
                assert!(t.elapsed() < Duration::from_secs(30), "{}", p.b.log_text());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
