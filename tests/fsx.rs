//! `fsx` (the File System eXerciser, crate `fsx`) against a real mount: random reads,
//! writes, mmap reads/writes, truncates, fallocate, fsync, copy_file_range and
//! close/reopen, every read checked against fsx's own model of the file.
//! At least 100,000 operations (two files exercised concurrently), zero failures.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};

use common::Node;

const CONFIG: &str = r#"
# Files up to 1 MiB, operations up to 128 KiB: crosses the in-place threshold both ways.
flen = 1048576
[opsize]
max = 131072
[weights]
close_open = 1
read = 10
write = 10
mapread = 5
mapwrite = 5
invalidate = 1
truncate = 3
fsync = 1
fdatasync = 1
posix_fallocate = 2
sendfile = 1
posix_fadvise = 1
copy_file_range = 1
"#;

fn fsx_bin() -> String {
    if let Ok(p) = std::env::var("FSX_BIN") {
        return p;
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cargo_bin = format!("{home}/.cargo/bin/fsx");
    if std::path::Path::new(&cargo_bin).exists() {
        return cargo_bin;
    }
    "fsx".into()
}

fn ops() -> u64 {
    std::env::var("PAIRFS_FSX_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000)
}

#[test]
fn fsx_100k_operations_zero_failures() {
    run_fsx(ops(), &[]);
}

/// The same with the kernel's writeback cache (`--writeback-cache`): writes reach pairfs
/// later, merged, and mmap writes take another path.
#[test]
fn fsx_with_writeback_cache() {
    run_fsx(ops() / 2, &["--writeback-cache"]);
}

fn run_fsx(ops: u64, mount_args: &[&str]) {
    let mut n = Node::new("fsx");
    n.init("1G", &[]);
    n.mount(mount_args);
    let cfg = n.root.join("fsx.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let procs: Vec<_> = (0..2u64)
        .map(|i| {
            Command::new(fsx_bin())
                .args([
                    "-N",
                    &(ops / 2).to_string(),
                    "-S",
                    &(1000 + i).to_string(),
                    "-f",
                ])
                .arg(&cfg)
                .arg(n.mnt.join(format!("fsx{i}")))
                .current_dir(&n.root)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run fsx ({e}): install it with `cargo install fsx --version 0.3.2`"
                    )
                })
        })
        .collect();
    let outs: Vec<_> = procs
        .into_iter()
        .map(|p| p.wait_with_output().expect("fsx"))
        .collect();
    for (i, out) in outs.iter().enumerate() {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "fsx {i} failed:\n{text}");
        assert!(
            text.contains("All operations completed A-OK"),
            "fsx {i}:\n{text}"
        );
    }
    n.unmount();
    n.assert_fsck_clean();
}
