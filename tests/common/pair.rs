//! Helpers for tests of a pair on real processes: two nodes (two data directories, two
//! ports, two mounts) on loopback or in two network namespaces, their configs and status.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use super::{bin, is_mounted, require_fuse, run, sh};

static PORT: AtomicU16 = AtomicU16::new(0);

pub fn port() -> u16 {
    let base = 17_000 + (std::process::id() % 2000) as u16 * 8;
    base + PORT.fetch_add(1, Ordering::SeqCst)
}

pub struct PairNode {
    pub name: &'static str,
    /// Runs in this network namespace (a separate host).
    pub netns: Option<String>,
    pub root: PathBuf,
    pub data: PathBuf,
    pub mnt: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl PairNode {
    pub fn json(&self) -> serde_json::Value {
        let out = run(Command::new(bin())
            .args(["status", "--json", "--config"])
            .arg(&self.config));
        if !out.status.success() {
            return serde_json::Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    pub fn u(&self, key: &str) -> u64 {
        self.json()[key].as_u64().unwrap_or(0)
    }

    pub fn start(&mut self, extra: &[&str]) {
        assert!(self.child.is_none());
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match &self.netns {
            Some(ns) => {
                // Only the network namespace: `ip netns exec` would also give the node its
                // own mount namespace, hiding its mount from this host.
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}")).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let child = cmd
            .args(["mount", "--config"])
            .arg(&self.config)
            .arg(&self.mnt)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn wait_mounted(&mut self) {
        let t = Instant::now();
        while !is_mounted(&self.mnt) {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("{} exited with {st}: {}", self.name, self.log_text());
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{} did not mount: {}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        unsafe { libc::kill(pid, sig) };
    }

    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let mut c = self.child.take().unwrap();
        let _ = c.wait();
        let _ = run(Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.mnt));
    }

    pub fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.signal(libc::SIGTERM);
        let mut c = self.child.take().unwrap();
        let t = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(
                    st.success(),
                    "{} exited with {st}: {}",
                    self.name,
                    self.log_text()
                );
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{} did not stop",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PairNode {
    fn drop(&mut self) {
        super::clean_up(self.child.take(), &self.mnt, &self.root);
    }
}

pub struct Pair {
    pub a: PairNode,
    pub b: PairNode,
}

pub fn node(tag: &str, name: &'static str) -> PairNode {
    let root = PathBuf::from(format!(
        "/var/tmp/pairfs-pair-{}-{tag}-{name}",
        std::process::id()
    ));
    let _ = Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(root.join("mnt"))
        .output();
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("mnt")).unwrap();
    PairNode {
        name,
        netns: None,
        data: root.join("data"),
        mnt: root.join("mnt"),
        config: root.join("node.toml"),
        log: root.join("node.log"),
        root,
        child: None,
    }
}

pub fn fingerprint(data: &Path) -> String {
    let out = run(Command::new(bin()).args(["id", "--data"]).arg(data));
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub fn write_config(
    n: &PairNode,
    listen: u16,
    role: &str,
    peer: &str,
    peer_port: u16,
    fp: &str,
    extra: &str,
) {
    write_config_at(
        n,
        ("127.0.0.1", listen),
        role,
        peer,
        ("127.0.0.1", peer_port),
        fp,
        extra,
    );
}

pub fn write_config_at(
    n: &PairNode,
    listen: (&str, u16),
    role: &str,
    peer: &str,
    peer_at: (&str, u16),
    fp: &str,
    extra: &str,
) {
    let text = format!(
        "name = \"{}\"\ndata = \"{}\"\nlisten = \"{}:{}\"\nrole = \"{role}\"\n\
         [peer]\nname = \"{peer}\"\naddress = \"{}:{}\"\nfingerprint = \"{fp}\"\n{extra}",
        n.name,
        n.data.display(),
        listen.0,
        listen.1,
        peer_at.0,
        peer_at.1,
    );
    std::fs::write(&n.config, text).unwrap();
}

/// A second host: a network namespace joined to this one by a veth pair, whose link can be
/// cut and restored.
pub struct Netns {
    pub name: String,
    pub host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let id = std::process::id() % 250 + 1;
        let name = format!("pfs-{tag}-{id}");
        let host_if = format!("pfa{tag}{id}");
        let ns_if = format!("pfb{tag}{id}");
        let (host_ip, ns_ip) = (format!("10.213.{id}.1"), format!("10.213.{id}.2"));
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        sh(&format!(
            "ip netns add {name} && ip link add {host_if} type veth peer name {ns_if} \
             && ip link set {ns_if} netns {name} && ip addr add {host_ip}/24 dev {host_if} \
             && ip link set {host_if} up && ip netns exec {name} ip addr add {ns_ip}/24 dev {ns_if} \
             && ip netns exec {name} ip link set {ns_if} up && ip netns exec {name} ip link set lo up"
        ));
        Netns {
            name,
            host_if,
            host_ip,
            ns_ip,
        }
    }

    pub fn link(&self, up: bool) {
        sh(&format!(
            "ip link set {} {}",
            self.host_if,
            if up { "up" } else { "down" }
        ));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A fresh pair: `a` primary (initialised with a filesystem), `b` a blank secondary.
pub fn pair(tag: &str, size: &str, replication: &str) -> Pair {
    pair_with(tag, size, &[], replication)
}

/// [`pair`] with more `pairfs init` arguments for both nodes (e.g. a journal size).
pub fn pair_with(tag: &str, size: &str, init: &[&str], replication: &str) -> Pair {
    require_fuse();
    let a = node(tag, "a");
    let b = node(tag, "b");
    let ok = |o: std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr))
    };
    ok(run(Command::new(bin())
        .args(["init", "--size", size, "--name", "a"])
        .args(init)
        .arg("--data")
        .arg(&a.data)));
    ok(run(Command::new(bin())
        .args(["init", "--size", size, "--name", "b", "--secondary"])
        .args(init)
        .arg("--data")
        .arg(&b.data)));
    let (pa, pb) = (port(), port());
    let (fa, fb) = (fingerprint(&a.data), fingerprint(&b.data));
    write_config(&a, pa, "primary", "b", pb, &fb, replication);
    write_config(&b, pb, "secondary", "a", pa, &fa, replication);
    Pair { a, b }
}

impl Pair {
    /// After a takeover: `a` names the primary again (the helpers below act on `a` as the
    /// primary and `b` as the secondary).
    pub fn swap(&mut self) {
        std::mem::swap(&mut self.a, &mut self.b);
    }

    /// Puts `b` on the second host `net` (its own network namespace, joined to this one
    /// by a veth pair) and rewrites both configs with `extra` for the addresses across it.
    pub fn across(&mut self, net: &Netns, extra: &str) {
        let (pa, pb) = (port(), port());
        let (fa, fb) = (fingerprint(&self.a.data), fingerprint(&self.b.data));
        let (a, b) = ((net.host_ip.as_str(), pa), (net.ns_ip.as_str(), pb));
        write_config_at(&self.a, a, "primary", "b", b, &fb, extra);
        write_config_at(&self.b, b, "secondary", "a", a, &fa, extra);
        self.b.netns = Some(net.name.clone());
    }

    pub fn start(&mut self) {
        self.a.start(&[]);
        self.b.start(&[]);
        self.a.wait_mounted();
        self.b.wait_mounted();
    }

    /// Waits until the secondary applied everything the primary has committed.
    pub fn caught_up(&self, limit: Duration) {
        self.wait_for_statuses(limit, |ja, jb| {
            let committed = ja["durable_seq"].as_u64().unwrap_or(0);
            let applied = jb["replica_received_seq"].as_u64().unwrap_or(0);
            let consistent = jb["inconsistent"] == serde_json::Value::Bool(false);
            committed > 0 && applied >= committed && consistent && ja["state"] == "pair"
        });
    }

    /// Polls both nodes' status until `done(primary, secondary)`, at most `limit`.
    fn wait_for_statuses(
        &self,
        limit: Duration,
        done: impl Fn(&serde_json::Value, &serde_json::Value) -> bool,
    ) {
        let t = Instant::now();
        loop {
            let (ja, jb) = (self.a.json(), self.b.json());
            if done(&ja, &jb) {
                return;
            }
            assert!(
                t.elapsed() < limit,
                "no catch-up: primary {ja}\nsecondary {jb}\nlogs:\n{}\n{}",
                self.a.log_text(),
                self.b.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn fsync_a(&self) {
        sh(&format!(
            "python3 -c \"import os; os.fsync(os.open('{}', os.O_RDONLY))\"",
            self.a.mnt.display()
        ));
    }
}

impl PairNode {
    pub fn stop_quietly(&mut self) {
        if let Some(mut ch) = self.child.take() {
            let _ = ch.kill();
            let _ = ch.wait();
        }
    }
}

impl PairNode {
    /// `pairfs verify` on this node: (exit code, stdout and stderr).
    pub fn verify(&self, repair: bool) -> (i32, String) {
        let mut cmd = Command::new(bin());
        cmd.args(["verify", "--config"]).arg(&self.config);
        if repair {
            cmd.arg("--repair");
        }
        let out = run(&mut cmd);
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Pair {
    /// Asserts that `pairfs verify` finds no difference.
    pub fn assert_verified(&self) {
        let (code, out) = self.a.verify(false);
        assert_eq!(
            code,
            0,
            "verify: {out}\nlogs:\n{}\n{}",
            self.a.log_text(),
            self.b.log_text()
        );
        assert!(out.contains("the same data"), "{out}");
    }

    /// Asserts that every file has the same checksum (and every entry the same metadata) on
    /// both mounts, read through the mounts as a user would.
    pub fn assert_same_files(&self) {
        let listing = |m: &Path| {
            sh(&format!(
                "cd {} && find . -type f -print0 | sort -z | xargs -0 -r md5sum && \
                 find . -printf '%p %y %m %s %n\\n' | sort",
                m.display()
            ))
        };
        let (a, b) = (listing(&self.a.mnt), listing(&self.b.mnt));
        if a != b {
            let diff = a
                .lines()
                .zip(b.lines())
                .filter(|(x, y)| x != y)
                .take(5)
                .collect::<Vec<_>>();
            panic!("the mounts differ: {diff:?}");
        }
    }

    /// Waits until the secondary has durably everything the primary has, and the pair
    /// streams.
    pub fn caught_up_durably(&self, limit: Duration) {
        self.wait_for_statuses(limit, |ja, jb| {
            let durable = ja["durable_seq"].as_u64().unwrap_or(0);
            let peer = ja["replica_durable_seq"].as_u64().unwrap_or(0);
            durable > 0 && peer >= durable && ja["state"] == "pair" && jb["state"] == "pair"
        });
    }
}

/// Ordinary tools changing files on `mnt` until `stop`: in-place overwrites of `big`,
/// appends to `log`, truncates of `trunc`, `cp -a` of a tree — each command's failure is
/// ignored (the mount under it may be killed).
pub fn churn(
    mnt: &Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seed: u64,
) -> std::thread::JoinHandle<u64> {
    let mnt = mnt.display().to_string();
    std::thread::spawn(move || {
        let mut i = seed;
        let mut done = 0;
        while !stop.load(Ordering::Relaxed) {
            let cmd = match i % 4 {
                0 => format!(
                    "dd if=/dev/urandom of={mnt}/big bs=1M count=4 seek={} conv=notrunc status=none",
                    (i * 7) % 60
                ),
                1 => format!(
                    "head -c {} /dev/urandom >> {mnt}/log",
                    1000 + (i * 7919) % 300_000
                ),
                2 => format!("truncate -s {} {mnt}/trunc", (i * 104_729) % (8 << 20)),
                _ => format!(
                    "rm -rf {mnt}/tree{n} && cp -a /usr/include/linux {mnt}/tree{n}",
                    n = i % 2
                ),
            };
            let ok = Command::new("bash")
                .arg("-c")
                .arg(&cmd)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            done += u64::from(ok);
            i += 1;
        }
        done
    })
}
