//! A real mount exercised with ordinary tools: `cp -a` of a real tree, `tar`, `rsync -a`,
//! `mv`, `ln`, `ln -s`, `chmod`, `truncate`, `find`, `du`, `diff -r` against the source;
//! then unmount, remount, and the same result; fsck clean throughout.

#![allow(clippy::unwrap_used)]

mod common;

use common::{Node, sh};

#[test]
fn ordinary_tools_on_a_real_mount_survive_remount() {
    let mut n = Node::new("tools");
    n.init("2G", &[]);
    n.mount(&[]);
    let m = n.mnt.display().to_string();
    let r = n.root.display().to_string();
    // A real tree: the system headers (thousands of files, symlinks, nested dirs).
    sh(&format!(
        "cp -a /usr/include {m}/inc && diff -r /usr/include {m}/inc"
    ));
    sh(&format!(
        "tar cf {r}/inc.tar -C /usr include && mkdir {m}/t && tar xf {r}/inc.tar -C {m}/t \
         && diff -r /usr/include {m}/t/include"
    ));
    sh(&format!(
        "tar cf {r}/back.tar -C {m}/t include && cmp <(tar tf {r}/inc.tar | sort) <(tar tf {r}/back.tar | sort)"
    ));
    sh(&format!(
        "rsync -a /usr/include/ {m}/r/ && diff -r /usr/include {m}/r"
    ));
    sh(&format!(
        "cd {m} && mv r r2 && mv inc/stdio.h inc/stdio2.h && test ! -e inc/stdio.h \
         && ln r2/stdio.h hard && ln -s r2/stdio.h soft && cmp hard soft \
         && test $(stat -c %h hard) = 2 && chmod 640 hard && test $(stat -c %a r2/stdio.h) = 640 \
         && truncate -s 100 hard && test $(stat -c %s r2/stdio.h) = 100 \
         && truncate -s 1G sparse && test $(stat -c %s sparse) = 1073741824 && test $(du -k sparse | cut -f1) = 0"
    ));
    let files = sh(&format!("find {m}/inc -type f | wc -l"))
        .trim()
        .parse::<u64>()
        .unwrap();
    let want = sh("find /usr/include -type f | wc -l")
        .trim()
        .parse::<u64>()
        .unwrap();
    assert_eq!(files, want);
    let du = sh(&format!("du -sk {m}/inc | cut -f1"))
        .trim()
        .parse::<u64>()
        .unwrap();
    assert!(du > 1000, "du of the copied tree: {du} KiB");
    // Everything listed, with attributes, before and after a remount.
    let listing = format!(
        "cd {m} && find . -printf '%p %y %s %m %n %l\\n' | sort && md5sum $(find . -type f | sort) | md5sum"
    );
    let before = sh(&listing);
    n.unmount();
    n.assert_fsck_clean();
    n.mount(&[]);
    let after = sh(&listing);
    assert_eq!(before, after, "the tree changed across a remount");
    sh(&format!(
        "diff -r /usr/include {m}/inc -x stdio.h -x stdio2.h"
    ));
    // Remove everything: the volume is back to (almost) empty and fsck is clean.
    sh(&format!(
        "rm -rf {m}/inc {m}/t {m}/r2 {m}/hard {m}/soft {m}/sparse && test -z \"$(ls -A {m})\""
    ));
    n.unmount();
    n.assert_fsck_clean();
}

#[test]
fn sigterm_unmounts_cleanly_and_other_users_get_permission_checks() {
    let mut n = Node::new("perm");
    n.init("256M", &[]);
    n.mount(&[]);
    let m = n.mnt.display().to_string();
    sh(&format!(
        "mkdir {m}/private {m}/shared && chmod 700 {m}/private && chmod 1777 {m}/shared \
         && echo secret > {m}/private/s && echo hi > {m}/shared/rootfile"
    ));
    // `nobody` sees the mount (allow_other) but ordinary permission checks apply
    // (default_permissions).
    sh(&format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups bash -c '\
           ls {m} >/dev/null \
           && ! cat {m}/private/s 2>/dev/null \
           && echo mine > {m}/shared/nobodyfile \
           && ! rm -f {m}/shared/rootfile 2>/dev/null \
           && test \"$(stat -c %u {m}/shared/nobodyfile)\" = 65534'"
    ));
    // An unlinked file stays readable while open.
    sh(&format!(
        "exec 3<{m}/shared/rootfile && rm {m}/shared/rootfile && test \"$(cat <&3)\" = hi"
    ));
    n.signal(libc::SIGTERM);
    n.wait_exit(true);
    assert!(!common::is_mounted(&n.mnt));
    assert!(
        n.log_text().contains("unmounted cleanly"),
        "{}",
        n.log_text()
    );
    n.assert_fsck_clean();
}
