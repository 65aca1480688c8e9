//! Small domain types shared by every layer: sequence numbers, block numbers, volume ids,
//! and the little-endian codec helpers used by every on-disk structure.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A journal sequence number (docs/DESIGN.md §3): strictly increasing along the log, persisted,
/// never reused. `Seq(0)` means "none".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Seq(pub u64);

impl Seq {
    /// "No entry".
    pub const NONE: Seq = Seq(0);
    /// The following sequence number.
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A block number in the normal area.
pub type BlockNo = u64;

/// The identity of a volume (shared by the FS superblock and the journal header).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct VolumeId(pub [u8; 16]);

impl VolumeId {
    /// A fresh random id (from the kernel's CSPRNG).
    pub fn random() -> std::io::Result<Self> {
        let mut b = [0u8; 16];
        fill_random(&mut b)?;
        // RFC 4122 version 4 / variant bits, so that tools print it as a normal UUID.
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Ok(Self(b))
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Fills `buf` from the kernel's random source.
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// CRC-32C (Castagnoli), the checksum of every on-disk and on-wire structure.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Reads a little-endian `u16` at `off`. Callers pass offsets inside `b` (fixed layouts
/// checked against the buffer length before decoding).
pub fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
/// Reads a little-endian `u32` at `off` (see [`get_u16`]).
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
/// Reads a little-endian `u64` at `off` (see [`get_u16`]).
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
/// Writes a little-endian `u16` at `off`.
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
/// Writes a little-endian `u32` at `off`.
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
/// Writes a little-endian `u64` at `off`.
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Wall-clock time in nanoseconds since the Unix epoch (the host timestamp of
/// docs/DESIGN.md §3).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_id_prints_as_uuid() {
        let id = VolumeId([0xab; 16]);
        assert_eq!(id.to_string(), "abababab-abab-abab-abab-abababababab");
        let r = VolumeId::random().unwrap();
        assert_eq!(r.0[6] >> 4, 4);
        assert_ne!(r, VolumeId::random().unwrap());
    }

    #[test]
    fn le_helpers_round_trip() {
        let mut b = [0u8; 16];
        put_u16(&mut b, 0, 0xbeef);
        put_u32(&mut b, 2, 0xdead_beef);
        put_u64(&mut b, 6, u64::MAX - 5);
        assert_eq!(get_u16(&b, 0), 0xbeef);
        assert_eq!(get_u32(&b, 2), 0xdead_beef);
        assert_eq!(get_u64(&b, 6), u64::MAX - 5);
        assert_eq!(b[0], 0xef, "little-endian");
    }
}
