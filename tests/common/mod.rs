//! Helpers for the system tests: real `pairfs` processes, real FUSE mounts.
//!
//! These tests need root, `/dev/fuse` and `fusermount3` (the README's test command
//! installs it). They fail — never skip — when those are missing.

#![allow(clippy::unwrap_used)]
#![allow(dead_code, unreachable_pub)]

pub mod pair;
pub mod takeover;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The `pairfs` binary under test: `$PAIRFS_BIN`, else the workspace's release build,
/// else its debug build.
pub fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PAIRFS_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("pairfs");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "the pairfs binary is not built: run `cargo build --release -p pairfs-cli` first \
         (or set PAIRFS_BIN)"
    );
}

/// Fails clearly when the machine cannot run FUSE tests.
pub fn require_fuse() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "system tests need root (they mount FUSE filesystems with allow_other)"
    );
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
    assert!(
        Command::new("fusermount3").arg("-V").output().is_ok(),
        "fusermount3 is missing: apt-get install -y fuse3"
    );
}

/// Runs a command, returning its output; panics if it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a shell command and asserts success.
pub fn sh(script: &str) -> String {
    let out = run(Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script));
    assert!(
        out.status.success(),
        "`{script}` failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True if `path` is a mountpoint right now.
pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let p = path.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(&p))
}

/// One pairfs node: a data directory, a mountpoint and maybe a running daemon.
pub struct Node {
    pub root: PathBuf,
    pub data: PathBuf,
    pub mnt: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl Node {
    /// A fresh node directory (not initialised).
    pub fn new(name: &str) -> Node {
        require_fuse();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let root = PathBuf::from(format!(
            "/var/tmp/pairfs-test-{}-{name}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("mnt")).expect("mkdir");
        Node {
            data: root.join("data"),
            mnt: root.join("mnt"),
            log: root.join("mount.log"),
            root,
            child: None,
        }
    }

    /// `pairfs init` with extra arguments; asserts success.
    pub fn init(&self, size: &str, extra: &[&str]) {
        let out = run(Command::new(bin())
            .args(["init", "--data"])
            .arg(&self.data)
            .args(["--size", size])
            .args(extra));
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts `pairfs mount` and waits until the mount is live.
    pub fn mount(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "already mounted");
        let log = std::fs::File::create(&self.log).expect("log");
        let child = Command::new(bin())
            .args(["mount", "--data"])
            .arg(&self.data)
            .arg(&self.mnt)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn pairfs mount");
        self.child = Some(child);
        let t = Instant::now();
        while !is_mounted(&self.mnt) {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("pairfs mount exited with {st}: {}", self.log_text());
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "mount did not appear: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Unmounts with `fusermount3 -u` and checks the daemon exits 0.
    pub fn unmount(&mut self) {
        let out = run(Command::new("fusermount3").arg("-u").arg(&self.mnt));
        assert!(
            out.status.success(),
            "fusermount3 -u: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_exit(true);
    }

    /// Sends a signal to the daemon (SIGTERM: clean unmount expected).
    pub fn signal(&mut self, sig: i32) {
        let pid = self.child.as_ref().expect("running").id() as i32;
        unsafe { libc::kill(pid, sig) };
    }

    /// Waits for the daemon to exit; with `clean`, asserts exit status 0.
    pub fn wait_exit(&mut self, clean: bool) {
        let mut c = self.child.take().expect("running");
        let t = Instant::now();
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                if clean {
                    assert!(
                        st.success(),
                        "pairfs mount exited with {st}: {}",
                        self.log_text()
                    );
                }
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "daemon did not exit: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if !clean {
            return; // a killed daemon leaves its mount behind
        }
        let t = Instant::now();
        while is_mounted(&self.mnt) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "mount stays after exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9` of the daemon, then the dead mount is detached.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait_exit(false);
        let _ = run(Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.mnt));
        let t = Instant::now();
        while is_mounted(&self.mnt) {
            assert!(t.elapsed() < Duration::from_secs(10), "dead mount stays");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `pairfs fsck`; returns (clean, report).
    pub fn fsck(&self) -> (bool, String) {
        let out = run(Command::new(bin()).args(["fsck", "--data"]).arg(&self.data));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    pub fn assert_fsck_clean(&self) {
        let (ok, text) = self.fsck();
        assert!(ok, "fsck not clean:\n{text}");
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        clean_up(self.child.take(), &self.mnt, &self.root);
    }
}

/// What a test node leaves behind: kills its daemon, unmounts lazily, and removes its
/// directory unless the test failed (kept for the post-mortem).
pub fn clean_up(child: Option<Child>, mnt: &Path, root: &Path) {
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mnt)
        .output();
    if !std::thread::panicking() {
        let _ = std::fs::remove_dir_all(root);
    }
}

/// Deterministic file content.
pub fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
