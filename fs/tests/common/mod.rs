//! A reference model of the filesystem and a random workload, shared by the model-based
//! test (`model.rs`) and the crash test (`crash.rs`). docs/DESIGN.md §10.4: an `Op` enum
//! applied to the FS core and to a simple in-memory model, compared after every step.

#![allow(clippy::unwrap_used)]
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use pairfs::{BlockDevice, Volume, VolumeId, VolumeOptions};
use pairfs_fs::format::{Kind, ROOT_INO};
use pairfs_fs::{Ctx, FormatOptions, Fs, FsError, FsOptions, RenameFlags, SetAttr};
use proptest::prelude::*;

pub const CTX: Ctx = Ctx { uid: 0, gid: 0 };
pub const NAMES: [&str; 5] = ["a", "b", "c", "dd", "e"];
pub const XNAMES: [&str; 3] = ["user.x", "user.y", "trusted.z"];

/// One step of a workload. Indices pick among existing directories / nodes (modulo).
#[derive(Clone, Debug)]
pub enum Op {
    Create {
        dir: usize,
        name: usize,
    },
    Mkdir {
        dir: usize,
        name: usize,
    },
    Symlink {
        dir: usize,
        name: usize,
        len: usize,
    },
    Write {
        file: usize,
        off: u64,
        len: usize,
        seed: u8,
    },
    Truncate {
        file: usize,
        size: u64,
    },
    Fallocate {
        file: usize,
        off: u64,
        len: u64,
    },
    Link {
        file: usize,
        dir: usize,
        name: usize,
    },
    Unlink {
        dir: usize,
        name: usize,
    },
    Rmdir {
        dir: usize,
        name: usize,
    },
    Rename {
        sdir: usize,
        sname: usize,
        ddir: usize,
        dname: usize,
        flags: u8,
    },
    Chmod {
        node: usize,
        mode: u32,
    },
    SetXattr {
        node: usize,
        name: usize,
        len: usize,
        seed: u8,
    },
    RemoveXattr {
        node: usize,
        name: usize,
    },
    Sync,
    Remount,
}

/// Op generator; `big` allows writes large enough to go in place.
pub fn op_strategy(big: bool) -> impl Strategy<Value = Op> {
    let max_len = if big { 300_000usize } else { 40_000 };
    prop_oneof![
        4 => (0..8usize, 0..5usize).prop_map(|(dir, name)| Op::Create { dir, name }),
        2 => (0..8usize, 0..5usize).prop_map(|(dir, name)| Op::Mkdir { dir, name }),
        1 => (0..8usize, 0..5usize, 1..300usize).prop_map(|(dir, name, len)| Op::Symlink { dir, name, len }),
        6 => (0..16usize, 0..400_000u64, 0..max_len, any::<u8>())
            .prop_map(|(file, off, len, seed)| Op::Write { file, off, len, seed }),
        2 => (0..16usize, 0..400_000u64).prop_map(|(file, size)| Op::Truncate { file, size }),
        1 => (0..16usize, 0..300_000u64, 0..100_000u64)
            .prop_map(|(file, off, len)| Op::Fallocate { file, off, len }),
        1 => (0..16usize, 0..8usize, 0..5usize).prop_map(|(file, dir, name)| Op::Link { file, dir, name }),
        2 => (0..8usize, 0..5usize).prop_map(|(dir, name)| Op::Unlink { dir, name }),
        1 => (0..8usize, 0..5usize).prop_map(|(dir, name)| Op::Rmdir { dir, name }),
        2 => (0..8usize, 0..5usize, 0..8usize, 0..5usize, 0..4u8)
            .prop_map(|(sdir, sname, ddir, dname, flags)| Op::Rename { sdir, sname, ddir, dname, flags }),
        1 => (0..24usize, 0..0o7777u32).prop_map(|(node, mode)| Op::Chmod { node, mode }),
        1 => (0..24usize, 0..3usize, 0..200usize, any::<u8>())
            .prop_map(|(node, name, len, seed)| Op::SetXattr { node, name, len, seed }),
        1 => (0..24usize, 0..3usize).prop_map(|(node, name)| Op::RemoveXattr { node, name }),
        1 => Just(Op::Sync),
        1 => Just(Op::Remount),
    ]
}

/// Deterministic content: position-dependent so misplaced blocks are caught.
pub fn pattern(seed: u8, off: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (off + i)
                .wrapping_mul(0x9E37_79B9)
                .wrapping_add(u64::from(seed) * 131);
            (x >> 7) as u8
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MNode {
    File {
        data: Vec<u8>,
        nlink: u32,
        mode: u32,
        xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    },
    Dir {
        entries: BTreeMap<Vec<u8>, usize>,
        parent: usize,
        mode: u32,
        xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    },
    Symlink {
        target: Vec<u8>,
        xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    },
}

/// The reference model: nodes by model id (0 = root).
#[derive(Clone, Debug)]
pub struct Model {
    pub nodes: HashMap<usize, MNode>,
    pub next: usize,
}

/// What one path holds, for comparisons (file contents as a hash, so that the crash test
/// can keep one snapshot per step).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub kind: Kind,
    pub size: u64,
    pub nlink: u32,
    pub mode: u32,
    pub content: u64,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

pub fn hash(b: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    // DefaultHasher::new() uses fixed keys: deterministic within and across runs.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

pub type Canon = BTreeMap<String, Seen>;

impl Default for Model {
    fn default() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            0,
            MNode::Dir {
                entries: BTreeMap::new(),
                parent: 0,
                mode: 0o755,
                xattrs: BTreeMap::new(),
            },
        );
        Model { nodes, next: 1 }
    }
}

impl Model {
    /// Directories in a stable order (by id).
    pub fn dirs(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .nodes
            .iter()
            .filter(|(_, n)| matches!(n, MNode::Dir { .. }))
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }
    pub fn files(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .nodes
            .iter()
            .filter(|(_, n)| matches!(n, MNode::File { .. }))
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }
    pub fn all(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.nodes.keys().copied().collect();
        v.sort_unstable();
        v
    }
    fn entries(&self, d: usize) -> &BTreeMap<Vec<u8>, usize> {
        match &self.nodes[&d] {
            MNode::Dir { entries, .. } => entries,
            _ => unreachable!("not a dir"),
        }
    }
    fn entries_mut(&mut self, d: usize) -> &mut BTreeMap<Vec<u8>, usize> {
        match self.nodes.get_mut(&d) {
            Some(MNode::Dir { entries, .. }) => entries,
            _ => unreachable!("not a dir"),
        }
    }
    fn is_dir(&self, id: usize) -> bool {
        matches!(self.nodes[&id], MNode::Dir { .. })
    }
    fn parent(&self, id: usize) -> usize {
        match &self.nodes[&id] {
            MNode::Dir { parent, .. } => *parent,
            _ => unreachable!(),
        }
    }
    fn is_ancestor(&self, anc: usize, mut id: usize) -> bool {
        loop {
            if id == anc {
                return true;
            }
            if id == 0 {
                return false;
            }
            id = self.parent(id);
        }
    }
    fn add(&mut self, n: MNode) -> usize {
        let id = self.next;
        self.next += 1;
        self.nodes.insert(id, n);
        id
    }
    /// Drops a link to `id` (already removed from its directory).
    fn drop_link(&mut self, id: usize) {
        match self.nodes.get_mut(&id) {
            Some(MNode::File { nlink, .. }) => {
                *nlink -= 1;
                if *nlink == 0 {
                    self.nodes.remove(&id);
                }
            }
            _ => {
                self.nodes.remove(&id);
            }
        }
    }
    fn xattrs_mut(&mut self, id: usize) -> &mut BTreeMap<Vec<u8>, Vec<u8>> {
        match self.nodes.get_mut(&id) {
            Some(
                MNode::File { xattrs, .. }
                | MNode::Dir { xattrs, .. }
                | MNode::Symlink { xattrs, .. },
            ) => xattrs,
            None => unreachable!(),
        }
    }

    /// The canonical view of the model.
    pub fn canon(&self) -> Canon {
        let mut out = BTreeMap::new();
        self.canon_rec(0, String::new(), &mut out);
        out
    }
    fn canon_rec(&self, id: usize, path: String, out: &mut Canon) {
        let seen = match &self.nodes[&id] {
            MNode::File {
                data,
                nlink,
                mode,
                xattrs,
            } => Seen {
                kind: Kind::File,
                size: data.len() as u64,
                nlink: *nlink,
                mode: *mode,
                content: hash(data),
                xattrs: xattrs.clone(),
            },
            MNode::Dir {
                entries,
                mode,
                xattrs,
                ..
            } => Seen {
                kind: Kind::Dir,
                size: 0,
                nlink: 2 + entries.values().filter(|c| self.is_dir(**c)).count() as u32,
                mode: *mode,
                content: hash(&[]),
                xattrs: xattrs.clone(),
            },
            MNode::Symlink { target, xattrs } => Seen {
                kind: Kind::Symlink,
                size: target.len() as u64,
                nlink: 1,
                mode: 0o777,
                content: hash(target),
                xattrs: xattrs.clone(),
            },
        };
        out.insert(
            if path.is_empty() {
                "/".into()
            } else {
                path.clone()
            },
            seen,
        );
        if let MNode::Dir { entries, .. } = &self.nodes[&id] {
            for (name, c) in entries {
                self.canon_rec(*c, format!("{path}/{}", String::from_utf8_lossy(name)), out);
            }
        }
    }
}

/// The canonical view of a live FS.
pub fn fs_canon(fs: &Fs) -> Canon {
    let mut out = BTreeMap::new();
    fs_canon_rec(fs, ROOT_INO, String::new(), &mut out);
    out
}

fn fs_canon_rec(fs: &Fs, ino: u64, path: String, out: &mut Canon) {
    let a = fs.getattr(ino).expect("getattr");
    let mut names = Vec::new();
    let xl = fs.listxattr(ino).expect("listxattr");
    for n in xl.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        names.push(n.to_vec());
    }
    let xattrs = names
        .into_iter()
        .map(|n| {
            let v = fs.getxattr(ino, &n).expect("getxattr");
            (n, v)
        })
        .collect();
    let content = match a.kind {
        Kind::File => {
            let d = fs.read(ino, 0, a.size as u32).expect("read");
            assert_eq!(d.len() as u64, a.size, "short read of {path}");
            d
        }
        Kind::Symlink => fs.readlink(ino).expect("readlink"),
        _ => Vec::new(),
    };
    let size = if a.kind == Kind::Dir { 0 } else { a.size };
    out.insert(
        if path.is_empty() {
            "/".into()
        } else {
            path.clone()
        },
        Seen {
            kind: a.kind,
            size,
            nlink: a.nlink,
            mode: u32::from(a.perm),
            content: hash(&content),
            xattrs,
        },
    );
    if a.kind == Kind::Dir {
        let mut items = Vec::new();
        fs.readdir(ino, 0, |it| {
            items.push(it.clone());
            false
        })
        .expect("readdir");
        let mut seen_names = std::collections::HashSet::new();
        for it in items {
            if it.name == b"." || it.name == b".." {
                continue;
            }
            assert!(
                seen_names.insert(it.name.clone()),
                "duplicate entry {:?} in {path}",
                it.name
            );
            fs_canon_rec(
                fs,
                it.ino,
                format!("{path}/{}", String::from_utf8_lossy(&it.name)),
                out,
            );
        }
    }
}

/// A filesystem on two devices, which can be closed and reopened.
pub struct Harness {
    pub normal: Arc<dyn BlockDevice>,
    pub journal: Arc<dyn BlockDevice>,
    pub opts: VolumeOptions,
    pub fs: Option<Fs>,
    /// model id -> FS inode
    pub ino: HashMap<usize, u64>,
    pub model: Model,
}

impl Harness {
    pub fn new(
        normal: Arc<dyn BlockDevice>,
        journal: Arc<dyn BlockDevice>,
        opts: VolumeOptions,
    ) -> Self {
        Volume::create(&*normal, &*journal, VolumeId([9; 16]), 4096).expect("create");
        let mut v = Volume::open(
            Box::new(normal.clone()),
            Box::new(journal.clone()),
            opts.clone(),
        )
        .expect("open");
        Fs::format(&mut v, &FormatOptions::default()).expect("format");
        let fs = Fs::open(v, FsOptions::default()).expect("fs open");
        let mut ino = HashMap::new();
        ino.insert(0, ROOT_INO);
        Harness {
            normal,
            journal,
            opts,
            fs: Some(fs),
            ino,
            model: Model::default(),
        }
    }

    pub fn fs(&self) -> &Fs {
        self.fs.as_ref().expect("mounted")
    }

    pub fn remount(&mut self) {
        let fs = self.fs.take().expect("mounted");
        fs.close().expect("close");
        drop(fs.into_volume());
        let v = Volume::open(
            Box::new(self.normal.clone()),
            Box::new(self.journal.clone()),
            self.opts.clone(),
        )
        .expect("reopen");
        self.fs = Some(Fs::open(v, FsOptions::default()).expect("fs reopen"));
    }

    /// Applies `op` to the model and the FS; panics if their outcomes differ.
    pub fn apply(&mut self, op: &Op) {
        let (want, got) = self.apply_both(op);
        assert_eq!(got, want, "outcome of {op:?}");
    }

    fn pick(v: &[usize], i: usize) -> Option<usize> {
        (!v.is_empty()).then(|| v[i % v.len()])
    }

    /// Returns (model outcome, FS outcome) as errno options.
    fn apply_both(&mut self, op: &Op) -> (Result<(), i32>, Result<(), i32>) {
        let dirs = self.model.dirs();
        let files = self.model.files();
        let all = self.model.all();
        let e = |r: Result<(), FsError>| r.map_err(|e| e.errno());
        match *op {
            Op::Create { dir, name } | Op::Mkdir { dir, name } | Op::Symlink { dir, name, .. } => {
                let d = Self::pick(&dirs, dir).expect("root exists");
                let nm = NAMES[name].as_bytes().to_vec();
                let want = if self.model.entries(d).contains_key(&nm) {
                    Err(libc::EEXIST)
                } else {
                    Ok(())
                };
                let pino = self.ino[&d];
                let got = match op {
                    Op::Create { .. } => self.fs().mknod(CTX, pino, &nm, libc::S_IFREG | 0o644, 0),
                    Op::Mkdir { .. } => self.fs().mkdir(CTX, pino, &nm, 0o755),
                    Op::Symlink { len, .. } => self.fs().symlink(CTX, pino, &nm, &vec![b't'; *len]),
                    _ => unreachable!(),
                };
                if let (Ok(()), Ok(a)) = (&want, &got) {
                    let node = match op {
                        Op::Create { .. } => MNode::File {
                            data: Vec::new(),
                            nlink: 1,
                            mode: 0o644,
                            xattrs: BTreeMap::new(),
                        },
                        Op::Mkdir { .. } => {
                            // A directory created in a setgid directory is setgid too.
                            let inherit = match &self.model.nodes[&d] {
                                MNode::Dir { mode, .. } => mode & libc::S_ISGID,
                                _ => 0,
                            };
                            MNode::Dir {
                                entries: BTreeMap::new(),
                                parent: d,
                                mode: 0o755 | inherit,
                                xattrs: BTreeMap::new(),
                            }
                        }
                        Op::Symlink { len, .. } => MNode::Symlink {
                            target: vec![b't'; *len],
                            xattrs: BTreeMap::new(),
                        },
                        _ => unreachable!(),
                    };
                    let id = self.model.add(node);
                    self.model.entries_mut(d).insert(nm, id);
                    self.ino.insert(id, a.ino);
                }
                (want, got.map(|_| ()).map_err(|e| e.errno()))
            }
            Op::Write {
                file,
                off,
                len,
                seed,
            } => {
                let Some(f) = Self::pick(&files, file) else {
                    return (Ok(()), Ok(()));
                };
                let data = pattern(seed, off, len);
                if let Some(MNode::File { data: d, .. }) = self.model.nodes.get_mut(&f) {
                    if !data.is_empty() {
                        let end = off as usize + len;
                        if d.len() < end {
                            d.resize(end, 0);
                        }
                        d[off as usize..end].copy_from_slice(&data);
                    }
                }
                (
                    Ok(()),
                    e(self.fs().write(CTX, self.ino[&f], off, &data).map(|_| ())),
                )
            }
            Op::Truncate { file, size } => {
                let Some(f) = Self::pick(&files, file) else {
                    return (Ok(()), Ok(()));
                };
                if let Some(MNode::File { data, .. }) = self.model.nodes.get_mut(&f) {
                    data.resize(size as usize, 0);
                }
                let s = SetAttr {
                    size: Some(size),
                    ..SetAttr::default()
                };
                (
                    Ok(()),
                    e(self.fs().setattr(CTX, self.ino[&f], &s).map(|_| ())),
                )
            }
            Op::Fallocate { file, off, len } => {
                let Some(f) = Self::pick(&files, file) else {
                    return (Ok(()), Ok(()));
                };
                let want = if len == 0 {
                    Err(libc::EINVAL)
                } else {
                    if let Some(MNode::File { data, .. }) = self.model.nodes.get_mut(&f) {
                        if data.len() < (off + len) as usize {
                            data.resize((off + len) as usize, 0);
                        }
                    }
                    Ok(())
                };
                (want, e(self.fs().fallocate(self.ino[&f], off, len, 0)))
            }
            Op::Link { file, dir, name } => {
                let Some(f) = Self::pick(&files, file) else {
                    return (Ok(()), Ok(()));
                };
                let d = Self::pick(&dirs, dir).expect("root");
                let nm = NAMES[name].as_bytes().to_vec();
                let want = if self.model.entries(d).contains_key(&nm) {
                    Err(libc::EEXIST)
                } else {
                    Ok(())
                };
                if want.is_ok() {
                    self.model.entries_mut(d).insert(nm.clone(), f);
                    if let Some(MNode::File { nlink, .. }) = self.model.nodes.get_mut(&f) {
                        *nlink += 1;
                    }
                }
                (
                    want,
                    e(self.fs().link(self.ino[&f], self.ino[&d], &nm).map(|_| ())),
                )
            }
            Op::Unlink { dir, name } | Op::Rmdir { dir, name } => {
                let d = Self::pick(&dirs, dir).expect("root");
                let nm = NAMES[name].as_bytes().to_vec();
                let rmdir = matches!(op, Op::Rmdir { .. });
                let want = match self.model.entries(d).get(&nm).copied() {
                    None => Err(libc::ENOENT),
                    Some(c) if !rmdir && self.model.is_dir(c) => Err(libc::EISDIR),
                    Some(c) if rmdir && !self.model.is_dir(c) => Err(libc::ENOTDIR),
                    Some(c) if rmdir && !self.model.entries(c).is_empty() => Err(libc::ENOTEMPTY),
                    Some(c) => {
                        self.model.entries_mut(d).remove(&nm);
                        self.model.drop_link(c);
                        Ok(())
                    }
                };
                let pino = self.ino[&d];
                let got = if rmdir {
                    self.fs().rmdir(pino, &nm)
                } else {
                    self.fs().unlink(pino, &nm)
                };
                (want, e(got))
            }
            Op::Rename {
                sdir,
                sname,
                ddir,
                dname,
                flags,
            } => {
                let sd = Self::pick(&dirs, sdir).expect("root");
                let dd = Self::pick(&dirs, ddir).expect("root");
                let (sn, dn) = (
                    NAMES[sname].as_bytes().to_vec(),
                    NAMES[dname].as_bytes().to_vec(),
                );
                let f = RenameFlags {
                    noreplace: flags == 1,
                    exchange: flags == 2,
                };
                let want = self.model_rename(sd, &sn, dd, &dn, f);
                (
                    want,
                    e(self.fs().rename(self.ino[&sd], &sn, self.ino[&dd], &dn, f)),
                )
            }
            Op::Chmod { node, mode } => {
                let id = Self::pick(&all, node).expect("root");
                if let Some(MNode::File { mode: m, .. } | MNode::Dir { mode: m, .. }) =
                    self.model.nodes.get_mut(&id)
                {
                    *m = mode;
                }
                if matches!(self.model.nodes[&id], MNode::Symlink { .. }) {
                    return (Ok(()), Ok(())); // chmod follows symlinks in POSIX: not modelled
                }
                let s = SetAttr {
                    mode: Some(mode),
                    ..SetAttr::default()
                };
                (
                    Ok(()),
                    e(self.fs().setattr(CTX, self.ino[&id], &s).map(|_| ())),
                )
            }
            Op::SetXattr {
                node,
                name,
                len,
                seed,
            } => {
                let id = Self::pick(&all, node).expect("root");
                let v = pattern(seed, 0, len);
                self.model
                    .xattrs_mut(id)
                    .insert(XNAMES[name].as_bytes().to_vec(), v.clone());
                (
                    Ok(()),
                    e(self
                        .fs()
                        .setxattr(self.ino[&id], XNAMES[name].as_bytes(), &v, 0)),
                )
            }
            Op::RemoveXattr { node, name } => {
                let id = Self::pick(&all, node).expect("root");
                let want = match self.model.xattrs_mut(id).remove(XNAMES[name].as_bytes()) {
                    Some(_) => Ok(()),
                    None => Err(libc::ENODATA),
                };
                (
                    want,
                    e(self
                        .fs()
                        .removexattr(self.ino[&id], XNAMES[name].as_bytes())),
                )
            }
            Op::Sync => (Ok(()), e(self.fs().sync())),
            Op::Remount => {
                self.remount();
                (Ok(()), Ok(()))
            }
        }
    }

    /// The model's rename, with the FS core's order of checks.
    fn model_rename(
        &mut self,
        sd: usize,
        sn: &[u8],
        dd: usize,
        dn: &[u8],
        f: RenameFlags,
    ) -> Result<(), i32> {
        let m = &mut self.model;
        let s = *m.entries(sd).get(sn).ok_or(libc::ENOENT)?;
        let dst = m.entries(dd).get(dn).copied();
        if f.exchange {
            let d = dst.ok_or(libc::ENOENT)?;
            if s == d {
                return Ok(());
            }
            if sd != dd {
                if m.is_dir(s) && m.is_ancestor(s, dd) {
                    return Err(libc::EINVAL);
                }
                if m.is_dir(d) && m.is_ancestor(d, sd) {
                    return Err(libc::EINVAL);
                }
            }
            m.entries_mut(sd).insert(sn.to_vec(), d);
            m.entries_mut(dd).insert(dn.to_vec(), s);
            for (id, to) in [(s, dd), (d, sd)] {
                if let Some(MNode::Dir { parent, .. }) = m.nodes.get_mut(&id) {
                    *parent = to;
                }
            }
            return Ok(());
        }
        if let Some(d) = dst {
            if f.noreplace {
                return Err(libc::EEXIST);
            }
            if d == s {
                return Ok(());
            }
            if m.is_dir(s) {
                if !m.is_dir(d) {
                    return Err(libc::ENOTDIR);
                }
                if !m.entries(d).is_empty() {
                    return Err(libc::ENOTEMPTY);
                }
            } else if m.is_dir(d) {
                return Err(libc::EISDIR);
            }
            if m.is_dir(s) && m.is_ancestor(s, dd) {
                return Err(libc::EINVAL);
            }
            m.entries_mut(dd).remove(dn);
            m.drop_link(d);
        } else if m.is_dir(s) && sd != dd && m.is_ancestor(s, dd) {
            return Err(libc::EINVAL);
        }
        m.entries_mut(sd).remove(sn);
        m.entries_mut(dd).insert(dn.to_vec(), s);
        if let Some(MNode::Dir { parent, .. }) = m.nodes.get_mut(&s) {
            *parent = dd;
        }
        Ok(())
    }
}
