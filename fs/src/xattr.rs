//! Extended attributes: all of an inode's attributes in one block (FORMAT.md §3.6).

use pairfs::types::{crc32c, get_u16, get_u32, get_u64, put_u16, put_u32, put_u64};

use crate::error::{FsError, FsResult};

const MAGIC: u32 = 0x5441_5850;
const HDR: usize = 16;
const ENTRY_HDR: usize = 4;
/// Longest attribute name (Linux `XATTR_NAME_MAX`).
pub(crate) const MAX_XATTR_NAME: usize = 255;
/// Largest attribute value Linux passes (`XATTR_SIZE_MAX`).
pub(crate) const MAX_XATTR_VALUE: usize = 65536;

/// An inode's attributes, in insertion order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Xattrs {
    pub(crate) entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Xattrs {
    pub(crate) fn decode(b: &[u8], owner: u64) -> FsResult<Xattrs> {
        let bs = b.len();
        let bad = |w: &str| FsError::corrupt(format!("xattr block of inode {owner}: {w}"));
        if get_u32(b, 0) != MAGIC {
            return Err(bad("bad magic"));
        }
        if crc32c(&b[..bs - 4]) != get_u32(b, bs - 4) {
            return Err(bad("checksum mismatch"));
        }
        if get_u64(b, 8) != owner {
            return Err(bad("belongs to another inode"));
        }
        let count = get_u16(b, 4) as usize;
        let mut at = HDR;
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            if at + ENTRY_HDR > bs - 4 {
                return Err(bad("entry outside the block"));
            }
            let nl = b[at] as usize;
            let vl = get_u16(b, at + 2) as usize;
            let end = at + ENTRY_HDR + nl + vl;
            if nl == 0 || end > bs - 4 {
                return Err(bad("entry outside the block"));
            }
            let name = b[at + ENTRY_HDR..at + ENTRY_HDR + nl].to_vec();
            let val = b[at + ENTRY_HDR + nl..end].to_vec();
            entries.push((name, val));
            at = end;
        }
        if at - HDR != get_u16(b, 6) as usize {
            return Err(bad("used size mismatch"));
        }
        Ok(Xattrs { entries })
    }

    /// Encodes into a block; `None` if the attributes do not fit.
    pub(crate) fn encode(&self, bs: usize, owner: u64) -> Option<Vec<u8>> {
        let used: usize = self
            .entries
            .iter()
            .map(|(n, v)| ENTRY_HDR + n.len() + v.len())
            .sum();
        if HDR + used + 4 > bs || used > u16::MAX as usize {
            return None;
        }
        let mut b = vec![0u8; bs];
        put_u32(&mut b, 0, MAGIC);
        put_u16(&mut b, 4, self.entries.len() as u16);
        put_u16(&mut b, 6, used as u16);
        put_u64(&mut b, 8, owner);
        let mut at = HDR;
        for (n, v) in &self.entries {
            b[at] = n.len() as u8;
            put_u16(&mut b, at + 2, v.len() as u16);
            b[at + ENTRY_HDR..at + ENTRY_HDR + n.len()].copy_from_slice(n);
            b[at + ENTRY_HDR + n.len()..at + ENTRY_HDR + n.len() + v.len()].copy_from_slice(v);
            at += ENTRY_HDR + n.len() + v.len();
        }
        let crc = crc32c(&b[..bs - 4]);
        put_u32(&mut b, bs - 4, crc);
        Some(b)
    }

    pub(crate) fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Sets `name`; `flags` are `XATTR_CREATE` / `XATTR_REPLACE`.
    pub(crate) fn set(&mut self, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        if name.is_empty() || name.len() > MAX_XATTR_NAME {
            return Err(FsError::Range);
        }
        if value.len() > MAX_XATTR_VALUE {
            return Err(FsError::TooBig);
        }
        match self.entries.iter_mut().find(|(n, _)| n == name) {
            Some(_) if flags & libc::XATTR_CREATE != 0 => Err(FsError::Exists),
            Some((_, v)) => {
                *v = value.to_vec();
                Ok(())
            }
            None if flags & libc::XATTR_REPLACE != 0 => Err(FsError::NoAttr),
            None => {
                self.entries.push((name.to_vec(), value.to_vec()));
                Ok(())
            }
        }
    }

    pub(crate) fn remove(&mut self, name: &[u8]) -> FsResult<()> {
        let before = self.entries.len();
        self.entries.retain(|(n, _)| n != name);
        if self.entries.len() == before {
            return Err(FsError::NoAttr);
        }
        Ok(())
    }

    /// Names, NUL-terminated and concatenated (the `listxattr` format).
    pub(crate) fn list(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, _) in &self.entries {
            out.extend_from_slice(n);
            out.push(0);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_flags_and_limits() {
        let mut x = Xattrs::default();
        x.set(b"user.a", b"1", 0).unwrap();
        x.set(b"user.b", &[7; 100], libc::XATTR_CREATE).unwrap();
        assert!(matches!(
            x.set(b"user.a", b"2", libc::XATTR_CREATE),
            Err(FsError::Exists)
        ));
        assert!(matches!(
            x.set(b"user.c", b"2", libc::XATTR_REPLACE),
            Err(FsError::NoAttr)
        ));
        x.set(b"user.a", b"22", libc::XATTR_REPLACE).unwrap();
        let b = x.encode(4096, 5).unwrap();
        let y = Xattrs::decode(&b, 5).unwrap();
        assert_eq!(y, x);
        assert_eq!(y.get(b"user.a"), Some(&b"22"[..]));
        assert_eq!(y.list(), b"user.a\0user.b\0");
        assert!(Xattrs::decode(&b, 6).is_err());
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert!(Xattrs::decode(&bad, 5).is_err());
        x.set(b"user.big", &[0; 5000], 0).unwrap();
        assert!(x.encode(4096, 5).is_none());
        assert!(matches!(x.set(&[b'a'; 256], b"", 0), Err(FsError::Range)));
        assert!(matches!(
            x.set(b"user.z", &vec![0; 70000], 0),
            Err(FsError::TooBig)
        ));
        x.remove(b"user.big").unwrap();
        assert!(matches!(x.remove(b"user.big"), Err(FsError::NoAttr)));
    }
}
