//! Forced takeover on real processes (docs/PROTOCOL.md §7.7–7.8): the old primary is gone
//! (killed with SIGKILL, or cut off mid-drain); `pairfs takeover --force` on the other node
//! continues from the consistent state it holds and reports exactly what it lacks; a
//! taker's own writes made on top of blocks it never received are set aside, not dropped;
//! the old primary, back, is fenced (read-only, its tail kept). Each test ends with fsck of
//! both nodes and a comparison of the files that must have survived.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pair::{Netns, PairNode, pair, pair_with};
use common::takeover::{
    checksums_of, force_takeover, slow_link_config, stop_and_fsck, streaming_again, takeover,
};
use common::{bin, run, sh};

fn md5(path: &str) -> String {
    sh(&format!("md5sum < {path}"))
}

/// Waits until `cond` holds on `n`'s status.
fn wait_for(n: &PairNode, what: &str, limit: Duration, cond: impl Fn(&serde_json::Value) -> bool) {
    let t = Instant::now();
    loop {
        let j = n.json();
        if cond(&j) {
            return;
        }
        assert!(
            t.elapsed() < limit,
            "{}: {what} did not happen in {limit:?}: {j}\nlog:\n{}",
            n.name,
            n.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A write on `m` fails with EROFS.
fn refuses_writes(m: &Path) -> bool {
    let out = run(Command::new("sh")
        .arg("-c")
        .arg(format!("echo x > {}/refused", m.display())));
    !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Read-only")
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_forced_takeover_reports_exactly_what_the_killed_primary_held_and_the_old_primary_rejoins() {
    let net = Netns::new("fa");
    let slow = slow_link_config("3s");
    let mut p = pair_with("fal", "2G", &["--journal-size", "768M"], &slow);
    p.across(&net, &slow);
    p.start();
    let (ma, mb) = (p.a.mnt.display().to_string(), p.b.mnt.display().to_string());
    sh(&format!(
        "mkdir {ma}/base && head -c 8M /dev/urandom > {ma}/base/one \
         && head -c 64M /dev/urandom > {ma}/base/big \
         && cp -a /usr/include/linux {ma}/base/linux && head -c 4M /dev/urandom > {ma}/old.bin"
    ));
    p.fsync_a();
    p.caught_up(Duration::from_secs(60));
    let base = checksums_of(&p.a.mnt, "base");
    let old = md5(&format!("{ma}/old.bin"));
    // 1 MB/s: the data of what follows stays behind on the old primary, while the headers
    // (small, on the control stream) reach b at once.
    sh(&format!(
        "tc qdisc add dev {} root tbf rate 8mbit burst 32kb latency 400ms",
        net.host_if
    ));
    sh(&format!(
        "head -c 24M /dev/urandom > {ma}/lost.bin \
         && dd if=/dev/urandom of={ma}/old.bin bs=64k count=16 seek=8 conv=notrunc status=none"
    ));
    // (Read before the newest seq is taken: a read updates the file's atime, a
    // transaction of its own.)
    let overwritten = md5(&format!("{ma}/old.bin"));
    p.fsync_a();
    let newest = p.a.u("durable_seq");
    wait_for(&p.b, "the headers' arrival", Duration::from_secs(30), |j| {
        j["headers_seq"].as_u64() >= Some(newest)
    });
    p.a.kill9();
    let r = force_takeover(&p.b, &p.a);
    eprintln!("{r:#}");
    let f = &r["forced"];
    let lost = &f["lost"];
    let base_seq = f["base_seq"].as_u64().unwrap();
    assert!(base_seq < newest, "nothing was lost: {r}");
    // Exact: every entry after what b applied up to the old primary's newest durable seq.
    assert_eq!(lost["first_seq"].as_u64(), Some(base_seq + 1), "{r}");
    assert_eq!(lost["last_seq"].as_u64(), Some(newest), "{r}");
    assert_eq!(lost["entries"].as_u64(), Some(newest - base_seq), "{r}");
    assert!(
        strings(&lost["files"]).iter().any(|f| f == "/old.bin"),
        "the overwritten file is not reported: {r}"
    );
    assert!(
        lost["unreferenced_blocks"].as_u64() > Some(0),
        "the new file's blocks are not reported: {r}"
    );
    assert!(
        Path::new(f["dir"].as_str().unwrap())
            .join("report.json")
            .exists()
    );
    // b serves the state it held, and writes.
    assert_eq!(
        checksums_of(&p.b.mnt, "base"),
        base,
        "files from before are damaged"
    );
    assert_eq!(
        md5(&format!("{mb}/old.bin")),
        old,
        "the lost overwrite is half there"
    );
    sh(&format!("echo after > {mb}/after && sync {mb}/after"));
    let jb = p.b.json();
    assert_eq!(jb["role"], "primary", "{jb}");
    assert_eq!(
        jb["last_forced"]["base_seq"].as_u64(),
        Some(base_seq),
        "{jb}"
    );
    // The old primary comes back: it steps down, stops writing, and keeps its tail (its
    // mount, read-only, still shows what it held).
    sh(&format!("tc qdisc del dev {} root", net.host_if));
    p.a.start(&[]);
    p.a.wait_mounted();
    wait_for(&p.a, "the fencing", Duration::from_secs(30), |j| {
        j["role"] == "secondary"
            && j["refused"]
                .as_str()
                .is_some_and(|r| r.contains("diverged"))
    });
    assert!(refuses_writes(&p.a.mnt), "the fenced old primary writes");
    assert_eq!(
        p.a.u("durable_seq"),
        newest,
        "the old primary held more than the report says"
    );
    assert_eq!(
        md5(&format!("{ma}/old.bin")),
        overwritten,
        "its tail is gone"
    );
    assert_eq!(
        md5(&format!("{ma}/base/one")),
        md5(&format!("{mb}/base/one"))
    );
    sh(&format!("echo again >> {mb}/after && sync {mb}/after"));
    assert_eq!(p.b.json()["role"], "primary");
    // `pairfs rejoin` (node stopped): the tail is reported and its files copied out...
    p.a.stop();
    let out = run(Command::new(bin())
        .args(["rejoin", "--json", "--config"])
        .arg(&p.a.config));
    assert!(
        out.status.success(),
        "rejoin: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rj: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{rj:#}");
    assert_eq!(rj["base_seq"].as_u64(), Some(base_seq), "{rj}");
    assert_eq!(rj["tail"]["first_seq"].as_u64(), Some(base_seq + 1), "{rj}");
    assert_eq!(rj["tail"]["last_seq"].as_u64(), Some(newest), "{rj}");
    let kept = Path::new(rj["dir"].as_str().unwrap()).join("files/old.bin");
    assert_eq!(
        md5(&kept.display().to_string()),
        overwritten,
        "the tail's file was not kept"
    );
    // ... and at its start only the blocks changed on either side are resynced.
    let tail_bytes = rj["tail_blocks"].as_u64().unwrap() * 4096;
    let sent_before = p.b.u("wire_bytes_sent");
    p.a.start(&[]);
    p.a.wait_mounted();
    p.swap();
    p.caught_up(Duration::from_secs(120));
    p.fsync_a();
    p.caught_up_durably(Duration::from_secs(60));
    let sent = p.a.u("wire_bytes_sent") - sent_before;
    eprintln!("rejoin resync: {sent} bytes on the wire, the tail wrote {tail_bytes} bytes");
    // The tail (24 MiB of new file, 1 MiB overwritten, metadata) and b's one small file,
    // against more than 80 MiB in use: a full copy would send all of it.
    assert!(
        sent < tail_bytes + tail_bytes / 10 + (2 << 20),
        "the resync sent {sent} bytes: more than the changed blocks ({tail_bytes} bytes of tail)"
    );
    p.assert_verified();
    p.assert_same_files();
    assert_eq!(sh(&format!("cat {ma}/after")), "after\nagain\n");
    stop_and_fsck(p);
}

#[test]
fn in_sync_mode_a_forced_takeover_after_kill9_keeps_every_acknowledged_write() {
    let mut p = pair("fsy", "1G", "[replication]\nmode = \"sync\"\n");
    p.start();
    let ma = p.a.mnt.display().to_string();
    let src = p.a.root.join("src");
    let src = src.display();
    sh(&format!("head -c 48M /dev/urandom > {src}"));
    sh(&format!("echo first > {ma}/first"));
    p.fsync_a();
    p.caught_up(Duration::from_secs(60));
    // Each write returns once b has it; no fsync: the primary is killed right after.
    sh(&format!(
        "for k in $(seq 1 12); do dd if={src} of={ma}/f$k bs=1M skip=$((k*4-4)) count=4 status=none; done"
    ));
    p.a.kill9();
    let want: String = (1..=12)
        .map(|k| {
            sh(&format!(
                "dd if={src} bs=1M skip={} count=4 status=none | md5sum",
                k * 4 - 4
            ))
        })
        .collect();
    // b restarts before the operator forces: the headers it had went with the restart,
    // and the report says it cannot know what it lacks.
    p.b.stop();
    p.b.start(&[]);
    p.b.wait_mounted();
    let r = force_takeover(&p.b, &p.a);
    eprintln!("{r:#}");
    assert_eq!(r["forced"]["partial"], true, "{r}");
    let mb = p.b.mnt.display().to_string();
    let got: String = (1..=12)
        .map(|k| sh(&format!("md5sum < {mb}/f{k}")))
        .collect();
    assert_eq!(got, want, "an acknowledged write is lost");
    assert_eq!(sh(&format!("cat {mb}/first")), "first\n");
    // Writes go on at once (degraded: the peer is gone).
    sh(&format!("echo after > {mb}/after && sync {mb}/after"));
    let jb = p.b.json();
    assert!(jb["degraded_since_seq"].as_u64().is_some(), "{jb}");
    stop_and_fsck(p);
}

#[test]
fn the_link_cut_mid_drain_gives_eio_then_a_forced_takeover_sets_the_local_writes_aside() {
    let net = Netns::new("fc");
    let slow = slow_link_config("3s");
    let init = ["--journal-size", "768M", "--lu-size", "128M"];
    let mut p = pair_with("fcl", "2G", &init, &slow);
    p.across(&net, &slow);
    p.start();
    let (ma, mb) = (p.a.mnt.display().to_string(), p.b.mnt.display().to_string());
    sh(&format!("echo start > {ma}/start"));
    p.fsync_a();
    p.caught_up(Duration::from_secs(60));
    let start = checksums_of(&p.a.mnt, "start");
    net.link(false);
    sh(&format!("head -c 100M /dev/urandom > {ma}/big"));
    p.fsync_a();
    sh(&format!(
        "tc qdisc add dev {} root tbf rate 50mbit burst 64kb latency 200ms",
        net.host_if
    ));
    net.link(true);
    streaming_again(&p);
    let t = takeover(&p.b, &p.a);
    let freeze = t["freeze_seq"].as_u64().unwrap();
    sh(&format!("echo during > {mb}/during && sync {mb}/during"));
    assert_eq!(p.b.json()["takeover"]["phase"], "draining");
    // The link goes: a read of a block still on the old primary fails after the timeout.
    net.link(false);
    let out = run(Command::new("dd").arg(format!("if={mb}/big")).args([
        "of=/dev/null",
        "bs=1M",
        "skip=99",
        "count=1",
    ]));
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
        "a read of a block on the unreachable old primary: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jb = p.b.json();
    assert!(jb["takeover"]["fetch_errors"].as_u64() > Some(0), "{jb}");
    // The operator makes sure the old primary is gone, then forces.
    p.a.kill9();
    let r = force_takeover(&p.b, &p.a);
    eprintln!("{r:#}");
    let f = &r["forced"];
    let base_seq = f["base_seq"].as_u64().unwrap();
    assert!(base_seq < freeze, "{r}");
    assert_eq!(f["lost"]["first_seq"].as_u64(), Some(base_seq + 1), "{r}");
    assert_eq!(f["lost"]["last_seq"].as_u64(), Some(freeze), "{r}");
    let kept = &f["preserved"];
    assert_eq!(kept["freeze_seq"].as_u64(), Some(freeze), "{r}");
    assert!(kept["entries"]["entries"].as_u64() >= Some(1), "{r}");
    assert_eq!(
        kept["entries"]["first_seq"].as_u64(),
        Some(freeze + 1),
        "{r}"
    );
    let copy = Path::new(kept["file"].as_str().unwrap());
    assert!(copy.metadata().map(|m| m.len()).unwrap_or(0) > 0, "{r}");
    // b is the old primary's state after base_seq: what came before, without the write
    // made on top of blocks it never received; and it writes.
    assert!(
        !Path::new(&format!("{mb}/during")).exists(),
        "the set-aside write is visible"
    );
    assert_eq!(checksums_of(&p.b.mnt, "start"), start);
    sh(&format!("echo after > {mb}/after && sync {mb}/after"));
    let jb = p.b.json();
    assert!(jb["takeover"].is_null() && jb["role"] == "primary", "{jb}");
    stop_and_fsck(p);
}
