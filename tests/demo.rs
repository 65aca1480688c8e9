//! The README's main command, `examples/pair-demo.sh`, on real processes: it brings a pair
//! up, a file written on the primary's mount appears on the replica's, and Ctrl-C stops
//! both nodes and unmounts them.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, is_mounted, require_fuse};

fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool, log: &Path) {
    let t = Instant::now();
    while !done() {
        assert!(
            t.elapsed() < limit,
            "{what}; demo logs:\n{}\n{}",
            std::fs::read_to_string(log.join("a.log")).unwrap_or_default(),
            std::fs::read_to_string(log.join("b.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_demo_replicates_and_stops_on_ctrl_c() {
    require_fuse();
    let root =
        std::path::PathBuf::from(format!("/var/tmp/pairfs-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (demo, ma, mb) = (root.join("demo"), root.join("ma"), root.join("mb"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/pair-demo.sh");
    let mut cmd = Command::new(script);
    // As from a terminal: the tests may run with SIGINT ignored (started in the background
    // of a script), and a shell that starts with a signal ignored cannot trap it.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd
        .env("DEMO", &demo)
        .env("MNT_A", &ma)
        .env("MNT_B", &mb)
        .env("SIZE", "1G")
        .env("PAIRFS", bin())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(
        Duration::from_secs(60),
        "the demo's nodes did not mount",
        || is_mounted(&ma) && is_mounted(&mb),
        &demo,
    );
    std::fs::write(ma.join("hello"), "from a\n").unwrap();
    // (Closed at once: an open file would keep the mount busy at Ctrl-C.)
    std::fs::File::open(&ma).unwrap().sync_all().unwrap();
    wait_for(
        Duration::from_secs(30),
        "the file never appeared on the replica",
        || std::fs::read_to_string(mb.join("hello")).is_ok_and(|s| s == "from a\n"),
        &demo,
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the demo stopped on its own"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the demo ignored Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        !is_mounted(&ma) && !is_mounted(&mb),
        "still mounted after Ctrl-C"
    );
    assert!(
        status.success(),
        "Ctrl-C is a clean stop: {status:?}, stderr: {err}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// The README's first command, `examples/failover-demo.sh`, in both variants: it fails
/// (exit status, and says why) if any of its checks does — a file on the new primary that
/// differs from what the old one acknowledged, `pairfs verify` finding a difference, a
/// fenced old primary that writes.
fn failover_demo(variant: &str, hosts: &str, subnet: &str, expect: &[&str]) {
    require_fuse();
    let demo = format!(
        "/var/tmp/pairfs-failover-test-{variant}-{}",
        std::process::id()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/failover-demo.sh");
    let out = Command::new(script)
        .env("VARIANT", variant)
        .env("DEMO", &demo)
        .env("HOSTS", hosts)
        .env("SUBNET", subnet)
        .env("BACKLOG_MIB", "96")
        .env("PAIRFS", bin())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let logs: String = ["a.log", "b.log"]
        .iter()
        .map(|f| std::fs::read_to_string(format!("{demo}.logs/{f}")).unwrap_or_default())
        .collect();
    assert!(
        out.status.success(),
        "the demo failed: {:?}\n{stdout}\n{}\nlogs:\n{logs}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for e in expect {
        assert!(stdout.contains(e), "the demo did not say {e:?}:\n{stdout}");
    }
    assert!(!Path::new(&demo).exists(), "the demo left {demo} behind");
    let _ = std::fs::remove_dir_all(format!("{demo}.logs"));
}

#[test]
fn the_failover_demo_takes_over_with_a_backlog_draining_and_fails_back() {
    failover_demo(
        "planned",
        "pftp",
        "78",
        &[
            "files on B are identical to what A acknowledged",
            "the nodes hold the same data",
            "A serves every file as B had it",
            "nothing acknowledged was lost",
        ],
    );
}

#[test]
fn the_failover_demo_forces_a_takeover_after_kill9_and_fences_the_old_primary() {
    failover_demo(
        "force",
        "pftf",
        "79",
        &[
            "forced takeover: this node is the primary of generation",
            "lost:",
            "A refuses writes",
            "A's files are exactly what it acknowledged before it died",
            "rejoin: this node's tail after seq",
            "the nodes hold the same data",
            "A its secondary again",
        ],
    );
}
