//! Directories: entries in a B-tree keyed by a hash *cookie* of the name (FORMAT.md §3.4).
//!
//! A lookup hashes the name and reads the few keys in `[h, h + PROBE)` (one leaf, almost
//! always one key), so lookups and inserts cost O(log n) blocks at any directory size. The
//! cookie is also the entry's stable `readdir` offset.

use pairfs::types::get_u64;

use crate::btree::BTree;
use crate::error::{FsError, FsResult};
use crate::format::{Kind, MAX_NAME};
use crate::siphash::siphash13;
use crate::tx::{BlockRead, BlockWrite};

/// Cookies start here: 0 is "start", 1 "after .", 2 "after ..".
pub(crate) const FIRST_COOKIE: u64 = 3;
/// How many cookies after the hash an entry may take when hashes collide.
pub(crate) const PROBE: u64 = 16;

/// A decoded directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DirEntry {
    /// Inode number.
    pub(crate) ino: u64,
    /// File type.
    pub(crate) kind: Kind,
    /// Name.
    pub(crate) name: Vec<u8>,
}

/// The cookie a name hashes to.
pub(crate) fn name_hash(key: &[u8; 16], name: &[u8]) -> u64 {
    (siphash13(key, name) >> 2) + FIRST_COOKIE
}

pub(crate) fn encode(ino: u64, kind: Kind, name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(10 + name.len());
    v.extend_from_slice(&ino.to_le_bytes());
    v.push(kind.to_byte());
    v.push(name.len() as u8);
    v.extend_from_slice(name);
    v
}

pub(crate) fn decode(v: &[u8]) -> FsResult<DirEntry> {
    if v.len() < 10 {
        return Err(FsError::corrupt("directory entry too short"));
    }
    let ino = get_u64(v, 0);
    let kind = Kind::from_byte(v[8])
        .ok_or_else(|| FsError::corrupt(format!("directory entry with type {}", v[8])))?;
    let n = v[9] as usize;
    if v.len() != 10 + n {
        return Err(FsError::corrupt("directory entry length mismatch"));
    }
    Ok(DirEntry {
        ino,
        kind,
        name: v[10..].to_vec(),
    })
}

/// Checks a name for a new entry.
pub(crate) fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > MAX_NAME {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(FsError::Invalid("bad file name"));
    }
    Ok(())
}

/// Finds `name`: its cookie and entry.
pub(crate) fn lookup(
    r: &impl BlockRead,
    tree: &BTree,
    key: &[u8; 16],
    name: &[u8],
) -> FsResult<Option<(u64, DirEntry)>> {
    if name.len() > MAX_NAME {
        return Err(FsError::NameTooLong);
    }
    let h = name_hash(key, name);
    let mut found = None;
    tree.range(r, h, &mut |k, v| {
        if k >= h + PROBE {
            return Ok(false);
        }
        let e = decode(v)?;
        if e.name == name {
            found = Some((k, e));
            return Ok(false);
        }
        Ok(true)
    })?;
    Ok(found)
}

/// Inserts an entry that does not exist yet; returns its cookie.
pub(crate) fn insert(
    w: &mut impl BlockWrite,
    tree: &mut BTree,
    key: &[u8; 16],
    name: &[u8],
    ino: u64,
    kind: Kind,
) -> FsResult<u64> {
    let h = name_hash(key, name);
    let mut used = Vec::new();
    tree.range(w, h, &mut |k, _| {
        if k >= h + PROBE {
            return Ok(false);
        }
        used.push(k);
        Ok(true)
    })?;
    let cookie = (h..h + PROBE)
        .find(|c| !used.contains(c))
        .ok_or(FsError::NoSpace)?;
    tree.insert(w, cookie, &encode(ino, kind, name))?;
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btree::TREE_DIR;
    use crate::btree::tests::MemStore;

    #[test]
    fn lookup_insert_remove_with_forced_collisions() {
        let mut s = MemStore::new(4096);
        let mut t = BTree::create(&mut s, TREE_DIR, 1, 0).unwrap();
        let key = [5u8; 16];
        let c1 = insert(&mut s, &mut t, &key, b"alpha", 10, Kind::File).unwrap();
        // Occupy the next cookies by hand to force probing for a colliding name.
        let h = name_hash(&key, b"beta");
        for i in 0..3 {
            t.insert(
                &mut s,
                h + i,
                &encode(99, Kind::File, format!("x{i}").as_bytes()),
            )
            .unwrap();
        }
        let c2 = insert(&mut s, &mut t, &key, b"beta", 11, Kind::Dir).unwrap();
        assert_eq!(c2, h + 3);
        assert_eq!(lookup(&s, &t, &key, b"alpha").unwrap().unwrap().0, c1);
        let (c, e) = lookup(&s, &t, &key, b"beta").unwrap().unwrap();
        assert_eq!((c, e.ino, e.kind), (c2, 11, Kind::Dir));
        // A hole in the probe sequence does not hide later entries.
        t.remove(&mut s, h + 1).unwrap();
        assert!(lookup(&s, &t, &key, b"beta").unwrap().is_some());
        assert!(lookup(&s, &t, &key, b"gamma").unwrap().is_none());
        for i in 0..PROBE {
            let _ = t.insert(&mut s, h + i, &encode(1, Kind::File, b"z"));
        }
        assert!(matches!(
            insert(&mut s, &mut t, &key, b"beta2", 1, Kind::File).map(|_| ()),
            Ok(()) | Err(FsError::NoSpace)
        ));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name(b"ok").is_ok());
        assert!(matches!(
            check_name(&[b'a'; 256]),
            Err(FsError::NameTooLong)
        ));
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert!(matches!(check_name(bad), Err(FsError::Invalid(_))));
        }
        assert!(decode(&[0u8; 5]).is_err());
        assert!(decode(&encode(1, Kind::File, b"abc")[..12]).is_err());
    }
}
