//! The on-disk format of the filesystem (FORMAT.md §3): superblock, layout, inodes.
//!
//! Everything here is pure encoding and decoding with checks; nothing does I/O. Decoders
//! never trust their input: a block read from disk may be anything.

use pairfs::types::{crc32c, get_u32, get_u64, put_u32, put_u64};
use pairfs::{BlockNo, VolumeId};

/// Superblock magic.
pub const SB_MAGIC: &[u8; 8] = b"PAIRFS\0\x01";
/// Format version written by this code.
pub const FS_VERSION: u32 = 1;
/// Size of an on-disk inode.
pub const INODE_SIZE: usize = 256;
/// The root directory.
pub const ROOT_INO: u64 = 1;
/// The hidden directory of unlinked-but-open inodes.
pub const ORPHAN_INO: u64 = 2;
/// Extents stored in the inode before an extent tree is needed.
pub const INLINE_EXTENTS: usize = 5;
/// Longest symlink target stored inside the inode.
pub const INLINE_SYMLINK_MAX: usize = 120;
/// Longest name of a directory entry (as Linux's `NAME_MAX`).
pub const MAX_NAME: usize = 255;
/// Longest symlink target (as Linux's `PATH_MAX` without the NUL).
pub const MAX_SYMLINK: usize = 4095;
/// Default bytes of volume per inode (as ext4's default `inode_ratio`).
pub const DEFAULT_BYTES_PER_INODE: u64 = 16 << 10;
/// Inode flag: extents live in a B-tree rooted at `root`.
pub const FLAG_EXTENT_TREE: u32 = 1;

/// File types as stored in directory entries (FORMAT.md §3.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Character device.
    CharDev,
    /// Block device.
    BlockDev,
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
}

impl Kind {
    /// From the `S_IFMT` bits of a mode.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            _ => return None,
        })
    }
    /// The `S_IFMT` bits.
    pub fn mode_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
        }
    }
    /// The directory-entry type byte.
    pub fn to_byte(self) -> u8 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
            Kind::CharDev => 4,
            Kind::BlockDev => 5,
            Kind::Fifo => 6,
            Kind::Socket => 7,
        }
    }
    /// From a directory-entry type byte.
    pub fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::CharDev,
            5 => Kind::BlockDev,
            6 => Kind::Fifo,
            7 => Kind::Socket,
            _ => return None,
        })
    }
}

/// The superblock (FORMAT.md §3.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Block size.
    pub block_size: u32,
    /// Volume id.
    pub uuid: VolumeId,
    /// Blocks of the normal area.
    pub total_blocks: u64,
    /// Number of inode slots.
    pub inode_count: u64,
    /// First block of the block bitmap.
    pub bbm_start: BlockNo,
    /// Blocks of the block bitmap.
    pub bbm_blocks: u64,
    /// First block of the inode bitmap.
    pub ibm_start: BlockNo,
    /// Blocks of the inode bitmap.
    pub ibm_blocks: u64,
    /// First block of the inode table.
    pub itab_start: BlockNo,
    /// Blocks of the inode table.
    pub itab_blocks: u64,
    /// First data block.
    pub data_start: BlockNo,
    /// SipHash key of directory name hashes.
    pub hash_key: [u8; 16],
    /// Creation time (ns since the epoch).
    pub created_ns: u64,
}

impl Superblock {
    /// Computes the layout of a new filesystem.
    pub fn new(
        total_blocks: u64,
        block_size: u32,
        inode_count: Option<u64>,
        uuid: VolumeId,
        hash_key: [u8; 16],
        created_ns: u64,
    ) -> Result<Superblock, String> {
        let bs = u64::from(block_size);
        let per_block = bs / INODE_SIZE as u64;
        let want = inode_count.unwrap_or(total_blocks * bs / DEFAULT_BYTES_PER_INODE);
        if want > u64::from(u32::MAX) {
            return Err(format!(
                "{want} inodes is more than the maximum {}",
                u32::MAX
            ));
        }
        // Fill the last inode-table block.
        let inode_count = want.max(64).div_ceil(per_block) * per_block;
        let bits = bs * 8;
        let bbm_blocks = total_blocks.div_ceil(bits);
        let ibm_blocks = inode_count.div_ceil(bits);
        let itab_blocks = inode_count / per_block;
        let bbm_start = 1;
        let ibm_start = bbm_start + bbm_blocks;
        let itab_start = ibm_start + ibm_blocks;
        let data_start = itab_start + itab_blocks;
        // Room for the root and orphan directories and some data.
        if data_start + 16 > total_blocks {
            return Err(format!(
                "volume of {total_blocks} blocks is too small for {inode_count} inodes \
                 ({data_start} blocks of metadata); use a larger size or fewer inodes"
            ));
        }
        Ok(Superblock {
            block_size,
            uuid,
            total_blocks,
            inode_count,
            bbm_start,
            bbm_blocks,
            ibm_start,
            ibm_blocks,
            itab_start,
            itab_blocks,
            data_start,
            hash_key,
            created_ns,
        })
    }

    /// Encodes into a full block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.block_size as usize];
        b[0..8].copy_from_slice(SB_MAGIC);
        put_u32(&mut b, 8, FS_VERSION);
        put_u32(&mut b, 12, self.block_size);
        b[16..32].copy_from_slice(&self.uuid.0);
        put_u64(&mut b, 32, self.total_blocks);
        put_u64(&mut b, 40, self.inode_count);
        put_u64(&mut b, 48, self.bbm_start);
        put_u64(&mut b, 56, self.bbm_blocks);
        put_u64(&mut b, 64, self.ibm_start);
        put_u64(&mut b, 72, self.ibm_blocks);
        put_u64(&mut b, 80, self.itab_start);
        put_u64(&mut b, 88, self.itab_blocks);
        put_u64(&mut b, 96, self.data_start);
        put_u64(&mut b, 104, ROOT_INO);
        put_u64(&mut b, 112, ORPHAN_INO);
        b[120..136].copy_from_slice(&self.hash_key);
        put_u64(&mut b, 136, self.created_ns);
        put_u32(&mut b, 144, INODE_SIZE as u32);
        let crc = crc32c(&b[..508]);
        put_u32(&mut b, 508, crc);
        b
    }

    /// Decodes and checks a superblock read from block 0 of a volume of `total_blocks`.
    pub fn decode(b: &[u8], total_blocks: u64) -> Result<Superblock, String> {
        if b.len() < 512 {
            return Err("superblock too short".into());
        }
        if &b[0..8] != SB_MAGIC {
            return Err("bad magic: not a pairfs filesystem".into());
        }
        if crc32c(&b[..508]) != get_u32(b, 508) {
            return Err("superblock checksum mismatch (corrupt superblock)".into());
        }
        let version = get_u32(b, 8);
        if version != FS_VERSION {
            return Err(format!("unsupported filesystem version {version}"));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        let mut hash_key = [0u8; 16];
        hash_key.copy_from_slice(&b[120..136]);
        let sb = Superblock {
            block_size: get_u32(b, 12),
            uuid: VolumeId(uuid),
            total_blocks: get_u64(b, 32),
            inode_count: get_u64(b, 40),
            bbm_start: get_u64(b, 48),
            bbm_blocks: get_u64(b, 56),
            ibm_start: get_u64(b, 64),
            ibm_blocks: get_u64(b, 72),
            itab_start: get_u64(b, 80),
            itab_blocks: get_u64(b, 88),
            data_start: get_u64(b, 96),
            hash_key,
            created_ns: get_u64(b, 136),
        };
        if get_u64(b, 104) != ROOT_INO || get_u64(b, 112) != ORPHAN_INO {
            return Err("unexpected root/orphan inode numbers".into());
        }
        if get_u32(b, 144) != INODE_SIZE as u32 {
            return Err("unexpected inode size".into());
        }
        // The layout must be exactly what `new` computes for these parameters.
        let expect = Superblock::new(
            sb.total_blocks,
            sb.block_size,
            Some(sb.inode_count),
            sb.uuid,
            sb.hash_key,
            sb.created_ns,
        )?;
        if expect != sb {
            return Err("superblock layout fields are inconsistent".into());
        }
        if sb.total_blocks != total_blocks {
            return Err(format!(
                "superblock says {} blocks, the volume has {total_blocks}",
                sb.total_blocks
            ));
        }
        Ok(sb)
    }

    /// Inodes per inode-table block.
    pub fn inodes_per_block(&self) -> u64 {
        u64::from(self.block_size) / INODE_SIZE as u64
    }

    /// Where inode `ino` lives: (block, byte offset in it). `ino` must be valid.
    pub fn inode_location(&self, ino: u64) -> (BlockNo, usize) {
        let idx = ino - 1;
        let per = self.inodes_per_block();
        (
            self.itab_start + idx / per,
            (idx % per) as usize * INODE_SIZE,
        )
    }

    /// True if `ino` names an inode slot.
    pub fn valid_ino(&self, ino: u64) -> bool {
        ino >= 1 && ino <= self.inode_count
    }
}

/// A timestamp: seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timespec {
    /// Seconds (may be negative).
    pub sec: i64,
    /// Nanoseconds, below 1e9.
    pub nsec: u32,
}

impl Timespec {
    /// The current time.
    pub fn now() -> Timespec {
        Timespec::from_system(std::time::SystemTime::now())
    }
    /// From a `SystemTime`.
    pub fn from_system(t: std::time::SystemTime) -> Timespec {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Timespec {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                if d.subsec_nanos() == 0 {
                    Timespec {
                        sec: -(d.as_secs() as i64),
                        nsec: 0,
                    }
                } else {
                    Timespec {
                        sec: -(d.as_secs() as i64) - 1,
                        nsec: 1_000_000_000 - d.subsec_nanos(),
                    }
                }
            }
        }
    }
    /// To a `SystemTime`.
    pub fn to_system(self) -> std::time::SystemTime {
        let base = std::time::UNIX_EPOCH;
        if self.sec >= 0 {
            base + std::time::Duration::new(self.sec as u64, self.nsec)
        } else {
            base - std::time::Duration::from_secs(self.sec.unsigned_abs())
                + std::time::Duration::from_nanos(u64::from(self.nsec))
        }
    }
    fn put(self, b: &mut [u8], off: usize) {
        b[off..off + 8].copy_from_slice(&self.sec.to_le_bytes());
        put_u32(b, off + 8, self.nsec);
    }
    fn get(b: &[u8], off: usize) -> Timespec {
        Timespec {
            sec: get_u64(b, off) as i64,
            nsec: get_u32(b, off + 8),
        }
    }
}

/// An inode (FORMAT.md §3.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    /// Type and permission bits; 0 for a free slot.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Hard links.
    pub nlink: u32,
    /// Size in bytes.
    pub size: u64,
    /// Blocks owned.
    pub blocks: u64,
    /// Access time.
    pub atime: Timespec,
    /// Modification time.
    pub mtime: Timespec,
    /// Change time.
    pub ctime: Timespec,
    /// Creation time.
    pub crtime: Timespec,
    /// Reuse counter of the slot.
    pub generation: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Device number.
    pub rdev: u32,
    /// Extended-attribute block (0: none).
    pub xattr_block: BlockNo,
    /// Directory B-tree root, or extent-tree root.
    pub root: BlockNo,
    /// Parent directory (directories).
    pub parent: u64,
    /// Entries (directories) or inline extents (files, symlinks).
    pub count: u64,
    /// Inline extents or symlink target.
    pub inline: [u8; 120],
}

impl Inode {
    /// A free slot carrying `generation`.
    pub fn free(generation: u32) -> Inode {
        Inode {
            mode: 0,
            uid: 0,
            gid: 0,
            nlink: 0,
            size: 0,
            blocks: 0,
            atime: Timespec::default(),
            mtime: Timespec::default(),
            ctime: Timespec::default(),
            crtime: Timespec::default(),
            generation,
            flags: 0,
            rdev: 0,
            xattr_block: 0,
            root: 0,
            parent: 0,
            count: 0,
            inline: [0; 120],
        }
    }

    /// True for a free slot.
    pub fn is_free(&self) -> bool {
        self.mode == 0
    }

    /// The file type (None for a free slot or bad mode).
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_mode(self.mode)
    }

    /// Encodes into a 256-byte slot.
    pub fn encode_into(&self, b: &mut [u8]) {
        let b = &mut b[..INODE_SIZE];
        b.fill(0);
        put_u32(b, 0, self.mode);
        put_u32(b, 4, self.uid);
        put_u32(b, 8, self.gid);
        put_u32(b, 12, self.nlink);
        put_u64(b, 16, self.size);
        put_u64(b, 24, self.blocks);
        self.atime.put(b, 32);
        self.mtime.put(b, 44);
        self.ctime.put(b, 56);
        self.crtime.put(b, 68);
        put_u32(b, 80, self.generation);
        put_u32(b, 84, self.flags);
        put_u32(b, 88, self.rdev);
        put_u64(b, 96, self.xattr_block);
        put_u64(b, 104, self.root);
        put_u64(b, 112, self.parent);
        put_u64(b, 120, self.count);
        b[128..248].copy_from_slice(&self.inline);
        let crc = crc32c(&b[..252]);
        put_u32(b, 252, crc);
    }

    /// Decodes a 256-byte slot (an all-zero slot is a free inode of generation 0).
    pub fn decode(b: &[u8]) -> Result<Inode, String> {
        let b = b.get(..INODE_SIZE).ok_or("short inode")?;
        if b.iter().all(|&x| x == 0) {
            return Ok(Inode::free(0));
        }
        if crc32c(&b[..252]) != get_u32(b, 252) {
            return Err("inode checksum mismatch".into());
        }
        let mut inline = [0u8; 120];
        inline.copy_from_slice(&b[128..248]);
        let ino = Inode {
            mode: get_u32(b, 0),
            uid: get_u32(b, 4),
            gid: get_u32(b, 8),
            nlink: get_u32(b, 12),
            size: get_u64(b, 16),
            blocks: get_u64(b, 24),
            atime: Timespec::get(b, 32),
            mtime: Timespec::get(b, 44),
            ctime: Timespec::get(b, 56),
            crtime: Timespec::get(b, 68),
            generation: get_u32(b, 80),
            flags: get_u32(b, 84),
            rdev: get_u32(b, 88),
            xattr_block: get_u64(b, 96),
            root: get_u64(b, 104),
            parent: get_u64(b, 112),
            count: get_u64(b, 120),
            inline,
        };
        if ino.mode != 0 && ino.kind().is_none() {
            return Err(format!("invalid file type in mode {:o}", ino.mode));
        }
        for t in [ino.atime, ino.mtime, ino.ctime, ino.crtime] {
            if t.nsec >= 1_000_000_000 {
                return Err("invalid timestamp".into());
            }
        }
        Ok(ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trip_and_checks() {
        let sb = Superblock::new(4096, 4096, None, VolumeId([9; 16]), [1; 16], 5).unwrap();
        assert_eq!(sb.bbm_start, 1);
        assert_eq!(sb.inode_count, 1024); // 16 MiB / 16 KiB
        assert_eq!(sb.itab_blocks, 64);
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b, 4096).unwrap(), sb);
        assert!(Superblock::decode(&b, 4095).unwrap_err().contains("4095"));
        let mut bad = b.clone();
        bad[40] ^= 1;
        assert!(
            Superblock::decode(&bad, 4096)
                .unwrap_err()
                .contains("checksum")
        );
        let mut bad = b;
        bad[0] = b'X';
        assert!(
            Superblock::decode(&bad, 4096)
                .unwrap_err()
                .contains("magic")
        );
        assert!(Superblock::new(64, 4096, Some(10_000), VolumeId([0; 16]), [0; 16], 0).is_err());
    }

    #[test]
    fn inode_round_trip_zero_slot_and_corruption() {
        let mut i = Inode::free(3);
        i.mode = libc::S_IFREG | 0o644;
        i.size = 12345;
        i.mtime = Timespec {
            sec: -5,
            nsec: 999_999_999,
        };
        i.inline[7] = 42;
        let mut b = [0u8; INODE_SIZE];
        i.encode_into(&mut b);
        assert_eq!(Inode::decode(&b).unwrap(), i);
        assert_eq!(Inode::decode(&[0u8; INODE_SIZE]).unwrap(), Inode::free(0));
        b[20] ^= 4;
        assert!(Inode::decode(&b).is_err());
    }

    #[test]
    fn timespec_system_round_trip() {
        for t in [
            Timespec { sec: 0, nsec: 0 },
            Timespec {
                sec: 1_700_000_000,
                nsec: 123,
            },
            Timespec {
                sec: -1,
                nsec: 500_000_000,
            },
        ] {
            assert_eq!(Timespec::from_system(t.to_system()), t);
        }
    }
}
