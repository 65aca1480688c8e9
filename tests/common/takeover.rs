//! Helpers for takeover tests on real processes (docs/PROTOCOL.md §7).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::pair::{Netns, Pair, PairNode, pair_with};
use super::{bin, run, sh};

/// `pairfs takeover --json` on `n`; panics with the daemon's logs if it fails.
pub fn takeover(n: &PairNode, other: &PairNode) -> serde_json::Value {
    takeover_with(n, other, &[])
}

/// `pairfs takeover --force --json` on `n` (the old primary is gone); panics with the
/// daemon's logs if it fails.
pub fn force_takeover(n: &PairNode, other: &PairNode) -> serde_json::Value {
    takeover_with(n, other, &["--force"])
}

fn takeover_with(n: &PairNode, other: &PairNode, args: &[&str]) -> serde_json::Value {
    let out = run(Command::new(bin())
        .args(["takeover", "--json"])
        .args(args)
        .arg("--config")
        .arg(&n.config));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success() && r["ok"] == true,
        "takeover on {} failed: {}{}\nlogs:\n{}\n{}",
        n.name,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        n.log_text(),
        other.log_text()
    );
    r
}

/// Every regular file under `m` with its MD5, sorted by path.
pub fn checksums(m: &Path) -> String {
    checksums_of(m, ".")
}

/// Every regular file under the paths `under` (relative to `m`) with its MD5.
pub fn checksums_of(m: &Path, under: &str) -> String {
    sh(&format!(
        "cd {} && find {under} -type f -print0 | sort -z | xargs -0 -r md5sum",
        m.display()
    ))
}

/// Waits until the takeover has completed on both sides: `p.a` the primary, `p.b` its
/// secondary, neither with a role change under way, the pair streaming and caught up.
pub fn settled(p: &Pair, limit: Duration) {
    let t = Instant::now();
    loop {
        let (ja, jb) = (p.a.json(), p.b.json());
        let done = ja["role"] == "primary"
            && jb["role"] == "secondary"
            && ja["takeover"].is_null()
            && jb["takeover"].is_null()
            && ja["state"] == "pair"
            && jb["state"] == "pair"
            && ja["connected"] == true
            && jb["replica_received_seq"].as_u64() >= ja["durable_seq"].as_u64();
        if done {
            return;
        }
        assert!(
            t.elapsed() < limit,
            "the role change did not complete in {limit:?}:\n{ja}\n{jb}\nlogs:\n{}\n{}",
            p.a.log_text(),
            p.b.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// After the link came back: waits until the pair streams on a live connection (the
/// peer acknowledges entries again: the connection from before the cut may still look up
/// until its idle timeout, and a takeover asked on it would wait for that).
pub fn streaming_again(p: &Pair) {
    let t = Instant::now();
    let before = p.a.u("replica_received_seq");
    loop {
        let (ja, jb) = (p.a.json(), p.b.json());
        if ja["state"] == "pair"
            && jb["state"] == "pair"
            && ja["replica_received_seq"].as_u64().unwrap_or(0) > before
        {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the pair did not stream again"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Settings for a pair across a slow link the drain saturates: such a link drops and
/// delays packets (the default 1 s idle timeout would flap), and reads of blocks on the old
/// primary wait for them up to `fetch_timeout`.
pub fn slow_link_config(fetch_timeout: &str) -> String {
    format!(
        "[replication]\nmax_lag = \"off\"\njournal_limit = \"384M\"\n\
         [timeouts]\nkeepalive = \"500ms\"\nidle = \"5s\"\n\
         [takeover]\nfetch_timeout = \"{fetch_timeout}\"\n"
    )
}

/// A pair with b on the second host `net` (2 GiB volumes, 768 MiB journals, local-
/// unreflected areas of `lu`, [`slow_link_config`] with a 60 s fetch timeout), started,
/// with a first file on a replicated.
pub fn pair_across(tag: &str, net: &Netns, lu: &str) -> Pair {
    let extra = slow_link_config("60s");
    let init = ["--journal-size", "768M", "--lu-size", lu];
    let mut p = pair_with(tag, "2G", &init, &extra);
    p.across(net, &extra);
    p.start();
    sh(&format!("echo start > {}/start", p.a.mnt.display()));
    p.fsync_a();
    p.caught_up(Duration::from_secs(60));
    p
}

/// After a takeover from `p.a` to `p.b` over `net`'s limited link: the limit removed, the
/// roles swapped and the role change waited for; then the two nodes compared (`pairfs
/// verify`, every file's checksum on both mounts).
pub fn settle_and_compare(p: &mut Pair, net: &Netns) {
    sh(&format!("tc qdisc del dev {} root", net.host_if));
    p.swap();
    settled(p, Duration::from_secs(300));
    p.fsync_a();
    p.caught_up_durably(Duration::from_secs(120));
    p.assert_verified();
    p.assert_same_files();
}

/// `pairfs fsck` of a stopped node passes.
pub fn fsck(n: &PairNode) {
    let out = run(Command::new(bin()).args(["fsck", "--data"]).arg(&n.data));
    assert!(
        out.status.success(),
        "fsck of {}: {}{}",
        n.name,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stops both nodes, checks both with fsck and removes their files.
pub fn stop_and_fsck(mut p: Pair) {
    p.a.stop();
    p.b.stop();
    fsck(&p.a);
    fsck(&p.b);
    for n in [&p.a, &p.b] {
        let _ = std::fs::remove_dir_all(&n.root);
    }
}
