//! Planned takeover and failback on real processes (docs/PROTOCOL.md §7): the secondary
//! becomes the primary at once, serving every file as the old primary acknowledged it
//! while the old primary's backlog still drains over a rate-limited link; writes go on
//! there with ordinary tools; the roles swap back and forth; each run ends with `pairfs
//! verify`, every file's checksum on both mounts and fsck of both nodes.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::pair::{Netns, pair};
use common::takeover::{
    checksums, checksums_of, pair_across, settle_and_compare, settled, stop_and_fsck,
    streaming_again, takeover,
};
use common::{run, sh};

/// One round of changes with ordinary tools on `m`.
fn workload(m: &Path, round: u32) {
    let m = m.display();
    sh(&format!(
        "mkdir -p {m}/r{round} && for k in 1 2 3 4 5; do head -c $((4096 * k * {n} + 17)) /dev/urandom > {m}/r{round}/f$k; done \
         && dd if=/dev/urandom of={m}/shared bs=64k count=4 seek={round} conv=notrunc status=none \
         && echo round {round} >> {m}/log \
         && if [ {round} -gt 0 ]; then mv {m}/r{prev}/f1 {m}/r{round}/moved && rm -f {m}/r{prev}/f2 \
            && truncate -s 1234 {m}/r{prev}/f3; fi",
        n = round % 7 + 1,
        prev = round.saturating_sub(1),
    ));
}

#[test]
fn ten_takeovers_and_failbacks_keep_every_acknowledged_file() {
    let mut p = pair("tkcy", "1G", "");
    p.start();
    workload(&p.a.mnt, 0);
    p.fsync_a();
    p.caught_up(Duration::from_secs(60));
    for round in 1..=10 {
        workload(&p.a.mnt, round);
        let want = checksums(&p.a.mnt);
        let r = takeover(&p.b, &p.a);
        // The new primary serves at once what the old one acknowledged, and writes.
        assert_eq!(
            checksums(&p.b.mnt),
            want,
            "round {round}: the new primary's files differ"
        );
        sh(&format!("echo taken {round} >> {}/log", p.b.mnt.display()));
        eprintln!(
            "round {round}: ready in {:.1} ms with {} bytes of backlog",
            r["seconds"].as_f64().unwrap_or(0.0) * 1e3,
            r["backlog_bytes"]
        );
        p.swap();
        settled(&p, Duration::from_secs(60));
    }
    p.fsync_a();
    p.caught_up_durably(Duration::from_secs(60));
    p.assert_verified();
    p.assert_same_files();
    stop_and_fsck(p);
}

#[test]
fn a_takeover_serves_everything_at_once_while_a_large_backlog_drains() {
    // b on a second host, its link to a cut and then limited, so that more than 256 MiB
    // of backlog drains after the takeover.
    let net = Netns::new("tk");
    let mut p = pair_across("tkbl", &net, "128M");
    let (ma, mb) = (p.a.mnt.display().to_string(), p.b.mnt.display().to_string());
    // The backlog: a real tree and a large file written while the link is down (kept in
    // the old primary's journal), then the link comes back limited to 200 Mbit/s and the
    // secondary takes over as soon as the pair streams again.
    net.link(false);
    sh(&format!(
        "tar -C /usr -cf - include | tar -C {ma} -xf - && head -c 200M /dev/urandom > {ma}/big \
         && cp -a {ma}/include/linux {ma}/linux-copy"
    ));
    p.fsync_a();
    let old_tree = "start include big linux-copy";
    let want = checksums_of(&p.a.mnt, old_tree);
    sh(&format!(
        "tc qdisc add dev {} root tbf rate 200mbit burst 256kb latency 200ms",
        net.host_if
    ));
    net.link(true);
    streaming_again(&p);
    let lag = p.a.u("lag_bytes");
    let r = takeover(&p.b, &p.a);
    let backlog = r["backlog_bytes"].as_u64().unwrap_or(0);
    eprintln!(
        "ready in {:.1} ms; backlog {} entries, {} blocks, {backlog} bytes (lag before: {lag})",
        r["seconds"].as_f64().unwrap_or(0.0) * 1e3,
        r["backlog_entries"],
        r["backlog_blocks"],
    );
    assert!(backlog >= 256 << 20, "only {backlog} bytes of backlog: {r}");
    let jb = p.b.json();
    assert_eq!(jb["takeover"]["phase"], "draining", "{jb}");
    assert!(jb["takeover"]["backlog_entries"].as_u64() > Some(0), "{jb}");
    // The large file was written last: its blocks drain last, and are read from the old
    // primary now.
    let head = |m: &Path| sh(&format!("head -c 1048576 {}/big | md5sum", m.display()));
    assert_eq!(head(&p.b.mnt), head(&p.a.mnt));
    let jb = p.b.json();
    assert!(
        jb["takeover"]["remote_reads"].as_u64() > Some(0),
        "no block came from the old primary: {jb}"
    );
    // Ordinary tools on the new primary while the old one's backlog drains (new paths:
    // the old tree is compared below).
    sh(&format!(
        "mkdir {mb}/w && cp -a /usr/include/linux {mb}/w/linux && tar -C {mb}/w -cf {mb}/w/l.tar linux \
         && mv {mb}/w/linux/netfilter {mb}/w/nf && rm -rf {mb}/w/linux/usb \
         && truncate -s 1000 {mb}/w/l.tar && echo after > {mb}/after"
    ));
    let jb = p.b.json();
    eprintln!("after the writes: {}", jb["takeover"]);
    assert!(
        jb["takeover"]["lu_entries"].as_u64() > Some(0),
        "the writes did not go to the local-unreflected area during the drain: {jb}"
    );
    // Every file as the old primary acknowledged it, read while the drain runs.
    let got = checksums_of(&p.b.mnt, old_tree);
    assert_eq!(
        got, want,
        "the new primary's files differ from the old primary's"
    );
    settle_and_compare(&mut p, &net);
    assert!(
        sh(&format!("cat {}/after", p.b.mnt.display())).contains("after"),
        "the new primary's writes reached the old primary"
    );
    stop_and_fsck(p);
}

/// b takes over from a while a's backlog drains over `net`'s link limited to 20 Mbit/s,
/// writes with ordinary tools, and a takes over again before the drain is complete
/// (docs/PROTOCOL.md §7.6). Checked at once: a serves every file as b acknowledged it (b's
/// writes fetched from b), and b, frozen, refuses writes and still drains.
fn failed_back_mid_drain(net: &Netns, tag: &str) -> common::pair::Pair {
    let p = pair_across(tag, net, "128M");
    let (ma, mb) = (p.a.mnt.display().to_string(), p.b.mnt.display().to_string());
    net.link(false);
    sh(&format!(
        "tar -C /usr -cf - include/linux | tar -C {ma} -xf - && head -c 120M /dev/urandom > {ma}/big"
    ));
    p.fsync_a();
    sh(&format!(
        "tc qdisc add dev {} root tbf rate 20mbit burst 64kb latency 20ms",
        net.host_if
    ));
    net.link(true);
    streaming_again(&p);
    takeover(&p.b, &p.a);
    assert_eq!(p.b.json()["takeover"]["phase"], "draining");
    // Writes on b during its drain: into its local-unreflected area.
    sh(&format!(
        "cp -a {mb}/include/linux {mb}/b-copy && mv {mb}/b-copy/netfilter {mb}/b-nf && rm -rf {mb}/b-copy/usb \
         && dd if=/dev/urandom of={mb}/big bs=64k count=16 seek=100 conv=notrunc,fsync status=none \
         && echo from-b > {mb}/b-note && sync {mb}/b-note"
    ));
    let want = checksums(&p.b.mnt);
    // The failback, with b's drain still running.
    let r = takeover(&p.a, &p.b);
    eprintln!(
        "failback ready in {:.1} ms: {} entries of b ({} bytes) on b",
        r["seconds"].as_f64().unwrap_or(0.0) * 1e3,
        r["backlog_entries"],
        r["backlog_bytes"]
    );
    assert!(r["backlog_entries"].as_u64() > Some(0), "{r}");
    let (ja, jb) = (p.a.json(), p.b.json());
    assert_eq!(jb["takeover"]["phase"], "frozen, draining", "{jb}");
    assert_eq!(ja["role"], "primary", "{ja}");
    assert_eq!(
        checksums(&p.a.mnt),
        want,
        "after the failback a's files differ from what b acknowledged"
    );
    assert_read_only(&p.b.mnt, "the frozen taker");
    p
}

/// A write on `m` fails with "Read-only".
fn assert_read_only(m: &Path, what: &str) {
    let out = run(Command::new("sh")
        .arg("-c")
        .arg(format!("echo x > {}/refused", m.display())));
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Read-only"),
        "{what} accepted a write: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// b's drain is still running (else the test would not check what it says).
fn still_frozen_draining(p: &common::pair::Pair, when: &str) {
    let jb = p.b.json();
    assert_eq!(
        jb["takeover"]["phase"], "frozen, draining",
        "b's drain ended before {when}: the test checked nothing of the failback mid-drain: {jb}"
    );
}

/// After a failback mid-drain: the link's limit removed, the rest of the chain waited for
/// (a primary, b its secondary), a's files still `want`; then the two nodes compared
/// (`pairfs verify`, every file's checksum on both mounts) and checked with fsck.
fn settle_back_and_compare(p: common::pair::Pair, net: &Netns, want: &str) {
    sh(&format!("tc qdisc del dev {} root", net.host_if));
    settled(&p, Duration::from_secs(300));
    assert_eq!(
        checksums(&p.a.mnt),
        want,
        "a's files changed while it settled"
    );
    p.fsync_a();
    p.caught_up_durably(Duration::from_secs(120));
    p.assert_verified();
    p.assert_same_files();
    stop_and_fsck(p);
}

#[test]
fn a_failback_during_the_drain_serves_both_nodes_writes_at_once_and_loses_nothing() {
    // Then writes on a while b still drains, and the rest of the chain: b merges, a drains
    // b's writes back, merges its own, and the pair streams a → b.
    let net = Netns::new("fb");
    let p = failed_back_mid_drain(&net, "tkfb");
    let ma = p.a.mnt.display().to_string();
    sh(&format!(
        "echo from-a > {ma}/a-note && mv {ma}/b-nf {ma}/a-nf && rm -f {ma}/b-note \
         && cp -a {ma}/b-copy/can {ma}/a-can && truncate -s 5000 {ma}/big && sync {ma}/a-note"
    ));
    still_frozen_draining(&p, "a's writes");
    let ja = p.a.json();
    assert!(
        ja["takeover"]["lu_entries"].as_u64() > Some(0),
        "a's writes did not go to its local-unreflected area: {ja}"
    );
    let want = checksums(&p.a.mnt);
    settle_back_and_compare(p, &net, &want);
}

#[test]
fn both_nodes_killed_during_a_failback_mid_drain_resume_it_and_lose_nothing() {
    // a (taking over again) and then b (frozen, draining) are killed with SIGKILL and
    // restarted: each resumes its part from what it persisted.
    let net = Netns::new("fk");
    let mut p = failed_back_mid_drain(&net, "tkfk");
    let ma = p.a.mnt.display().to_string();
    sh(&format!("echo from-a > {ma}/a-note && sync {ma}/a-note"));
    let want = checksums(&p.a.mnt);
    still_frozen_draining(&p, "a was killed");
    p.a.kill9();
    p.a.start(&[]);
    p.a.wait_mounted();
    assert_eq!(
        checksums(&p.a.mnt),
        want,
        "after its restart a's files differ"
    );
    sh(&format!("echo again > {ma}/a-again && sync {ma}/a-again"));
    let want = checksums(&p.a.mnt);
    still_frozen_draining(&p, "b was killed");
    p.b.kill9();
    p.b.start(&[]);
    p.b.wait_mounted();
    assert_read_only(&p.b.mnt, "the frozen taker, restarted,");
    let jb = p.b.json();
    assert!(
        jb["takeover"]["phase"]
            .as_str()
            .is_some_and(|s| s.starts_with("frozen")),
        "b did not come back frozen: {jb}"
    );
    settle_back_and_compare(p, &net, &want);
}

#[test]
fn a_taker_killed_during_the_drain_resumes_and_loses_nothing() {
    killed_during_the_drain(true, "tkk");
}

#[test]
fn an_old_primary_killed_during_the_drain_comes_back_frozen_and_the_drain_completes() {
    killed_during_the_drain(false, "tko");
}

fn killed_during_the_drain(kill_taker: bool, tag: &str) {
    // As above, with a smaller backlog: one node is killed (SIGKILL) while the old
    // primary's backlog drains, and restarted: the takeover resumes from what each persisted.
    let net = Netns::new(tag);
    let mut p = pair_across(&format!("{tag}l"), &net, "128M");
    let (ma, mb) = (p.a.mnt.display().to_string(), p.b.mnt.display().to_string());
    net.link(false);
    sh(&format!(
        "tar -C /usr -cf - include/linux | tar -C {ma} -xf - && head -c 150M /dev/urandom > {ma}/big"
    ));
    p.fsync_a();
    let want = checksums(&p.a.mnt);
    sh(&format!(
        "tc qdisc add dev {} root tbf rate 100mbit burst 128kb latency 200ms",
        net.host_if
    ));
    net.link(true);
    streaming_again(&p);
    takeover(&p.b, &p.a);
    sh(&format!("echo during > {mb}/during && sync {mb}/during"));
    assert_eq!(p.b.json()["takeover"]["phase"], "draining");
    let killed = if kill_taker { &mut p.b } else { &mut p.a };
    killed.kill9();
    killed.start(&[]);
    killed.wait_mounted();
    if !kill_taker {
        // The old primary came back frozen: its mount refuses writes.
        let out = run(Command::new("sh")
            .arg("-c")
            .arg(format!("echo x > {ma}/refused")));
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Read-only"),
            "the restarted old primary accepted a write: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // At once after the restart: the old tree as acknowledged, and the write made during
    // the drain, whatever the drain has reached (with the old primary killed, the new one
    // waits for it to come back for the blocks it still lacks).
    let mut got = checksums(&p.b.mnt);
    assert!(
        sh(&format!("cat {mb}/during")).contains("during"),
        "the write acknowledged during the drain is lost"
    );
    got = got
        .lines()
        .filter(|l| !l.ends_with("./during"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        got, want,
        "after the restart the new primary's files differ"
    );
    settle_and_compare(&mut p, &net);
    stop_and_fsck(p);
}

#[test]
fn writers_wait_for_room_when_the_local_unreflected_area_is_full_and_lose_nothing() {
    // An 8 MiB local-unreflected area and 24 MiB written during the drain: the writer
    // waits (status says so) until the drain is complete and the merge frees room.
    let net = Netns::new("tkf");
    let mut p = pair_across("tkfl", &net, "8M");
    let (ma, mb) = (p.a.mnt.display().to_string(), p.b.mnt.display().to_string());
    let src = p.b.root.join("src");
    let src = src.display().to_string();
    sh(&format!("head -c 24M /dev/urandom > {src}"));
    net.link(false);
    sh(&format!("head -c 96M /dev/urandom > {ma}/big"));
    p.fsync_a();
    sh(&format!(
        "tc qdisc add dev {} root tbf rate 100mbit burst 128kb latency 200ms",
        net.host_if
    ));
    net.link(true);
    streaming_again(&p);
    takeover(&p.b, &p.a);
    assert_eq!(p.b.json()["takeover"]["phase"], "draining");
    let writer = {
        let cmd = format!("dd if={src} of={mb}/w bs=1M conv=fsync status=none");
        std::thread::spawn(move || run(Command::new("sh").arg("-c").arg(cmd)))
    };
    let t = std::time::Instant::now();
    let mut waited = false;
    while !writer.is_finished() && t.elapsed() < Duration::from_secs(120) {
        let j = p.b.json();
        waited |= j["takeover"]["writers_waiting"].as_u64() > Some(0);
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = writer.join().unwrap();
    assert!(
        out.status.success(),
        "the write failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(waited, "no writer was ever seen waiting for room");
    assert_eq!(
        sh(&format!("md5sum < {mb}/w")),
        sh(&format!("md5sum < {src}")),
        "the file written while the area was full differs"
    );
    settle_and_compare(&mut p, &net);
    stop_and_fsck(p);
}

#[test]
fn a_taker_killed_during_the_merge_resumes_it_and_loses_nothing() {
    // The taker writes 96 MiB during the drain (into its local-unreflected area); once the
    // drain is complete it merges them, and is killed (SIGKILL) while status says
    // `merging`: restarted, it resumes the merge from what its journal and area hold.
    let net = Netns::new("tkm");
    let mut p = pair_across("tkml", &net, "384M");
    let (ma, mb) = (p.a.mnt.display().to_string(), p.b.mnt.display().to_string());
    net.link(false);
    sh(&format!("head -c 64M /dev/urandom > {ma}/big"));
    p.fsync_a();
    let want_old = checksums(&p.a.mnt);
    sh(&format!(
        "tc qdisc add dev {} root tbf rate 16mbit burst 64kb latency 200ms",
        net.host_if
    ));
    net.link(true);
    streaming_again(&p);
    takeover(&p.b, &p.a);
    let w = std::time::Instant::now();
    sh(&format!(
        "mkdir {mb}/new && head -c 96M /dev/urandom > {mb}/new/during && sync {mb}/new/during"
    ));
    eprintln!("96 MiB written during the drain in {:?}", w.elapsed());
    let j = p.b.json();
    eprintln!("after the writes: {}", j["takeover"]);
    assert!(
        j["takeover"]["phase"] == "draining" || j["takeover"]["phase"] == "merging",
        "the merge ended before the writes did: too short to catch ({j})"
    );
    let want_new = checksums_of(&p.b.mnt, "new");
    let t = std::time::Instant::now();
    loop {
        let j = p.b.json();
        if j["takeover"]["phase"] == "merging" {
            break;
        }
        assert!(
            j["takeover"].is_object() && t.elapsed() < Duration::from_secs(120),
            "the merge was never seen: {j}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    p.b.kill9();
    p.b.start(&[]);
    p.b.wait_mounted();
    assert_eq!(
        checksums_of(&p.b.mnt, "new"),
        want_new,
        "a write acknowledged during the drain is lost"
    );
    let got: String = checksums(&p.b.mnt)
        .lines()
        .filter(|l| !l.contains("./new/"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        got, want_old,
        "after the restart the old primary's files differ"
    );
    settle_and_compare(&mut p, &net);
    stop_and_fsck(p);
}
