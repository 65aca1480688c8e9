//! The frame: how one message is laid out on a QUIC stream (docs/PROTOCOL.md §3).
//!
//! ```text
//! offset size field
//!      0    2 magic   u16 LE = 0x5046
//!      2    1 version u8     = 1
//!      3    1 kind    u8       (the caller's message kind; not interpreted here)
//!      4    4 len     u32 LE   (payload bytes, <= max_frame)
//!      8    4 crc     u32 LE   (CRC-32C of the payload)
//!     12  len payload          (bincode 1.3: fixed-width little-endian integers)
//! ```
//!
//! Pure functions, no I/O: the stream code reads 12 bytes, calls [`decode_header`], reads
//! `len` bytes, calls [`decode_payload`]. Everything from the network is untrusted: the
//! header is checked before any payload is read (so `len` bounds the allocation), the CRC
//! before decoding, and bincode decodes with a byte limit of `len` (so no length prefix
//! inside the payload can make it allocate more) and refuses trailing bytes. No input
//! makes these functions panic; `fuzz/fuzz_targets/frame.rs` and the property tests below
//! check it.
//!
//! QUIC already protects the bytes in flight; the CRC catches bugs on either side (a
//! sender that serialised from a buffer being modified, a receiver that lost its place in
//! the stream), which would otherwise decode into plausible but wrong messages.

use bincode::Options;
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

/// First two bytes of every frame (`PF` read as a big-endian pair of ASCII letters).
pub const MAGIC: u16 = 0x5046;
/// The frame format version this code writes and reads.
pub const VERSION: u8 = 1;
/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 12;
/// Default limit on a frame's payload: 16 MiB.
///
/// Large enough for a replication entry of a few thousand 4 KiB blocks, or a copy batch
/// (the node raises it to fit its largest entry); small enough that the receiver may allocate
/// it up front for every stream (the header is checked before the allocation) without a
/// peer being able to make it reserve much memory, and that one frame takes well under a
/// second on a gigabit link, so it does not hold the replication stream for long.
pub const DEFAULT_MAX_FRAME: u32 = 16 * 1024 * 1024;

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The first two bytes are not [`MAGIC`]: the stream is not a pairfs stream, or the
    /// reader lost its place in it.
    #[error("bad magic {found:#06x} (expected {MAGIC:#06x})")]
    BadMagic {
        /// The two bytes found, read little-endian.
        found: u16,
    },
    /// The version byte is not one this code understands.
    #[error("unsupported frame version {found} (this node speaks {VERSION})")]
    UnsupportedVersion {
        /// The version found.
        found: u8,
    },
    /// The payload is larger than the frame limit (announced by a header, or a message to
    /// encode).
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The payload size.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// The payload handed to [`decode_payload`] is not as long as its header says.
    #[error("payload is {actual} bytes but the header announces {expected}")]
    LengthMismatch {
        /// The length in the header.
        expected: u32,
        /// The length of the payload given.
        actual: usize,
    },
    /// The CRC-32C of the payload does not match the header.
    #[error("payload checksum {actual:#010x} does not match the header's {expected:#010x}")]
    Checksum {
        /// The CRC in the header.
        expected: u32,
        /// The CRC of the payload received.
        actual: u32,
    },
    /// The payload is not a valid encoding of the expected message type (including
    /// trailing bytes after the message).
    #[error("payload does not decode: {0}")]
    Decode(String),
    /// The message could not be serialised.
    #[error("message does not encode: {0}")]
    Encode(String),
}

/// A decoded, checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The message kind, chosen by the caller.
    pub kind: u8,
    /// Payload length in bytes (already checked against the frame limit).
    pub len: u32,
    /// CRC-32C of the payload.
    pub crc: u32,
}

/// The bincode configuration of payloads: fixed-width little-endian integers, at most
/// `limit` bytes read, no trailing bytes.
fn bincode_options(limit: u64) -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(limit)
        .reject_trailing_bytes()
}

/// Encodes `msg` as one frame of kind `kind`, refusing a payload over `max_frame` bytes
/// (before serialising it).
pub fn encode<M: Serialize + ?Sized>(
    kind: u8,
    msg: &M,
    max_frame: u32,
) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_into(kind, msg, max_frame, &mut out)?;
    Ok(out)
}

/// [`encode`] into `out`, so that a sender can reuse one buffer for every frame instead
/// of allocating (and faulting in) a fresh one per message. `out` holds exactly the frame,
/// or nothing if the message is refused.
pub fn encode_into<M: Serialize + ?Sized>(
    kind: u8,
    msg: &M,
    max_frame: u32,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    out.clear();
    let r = encode_frame(kind, msg, max_frame, out);
    if r.is_err() {
        out.clear();
    }
    r
}

fn encode_frame<M: Serialize + ?Sized>(
    kind: u8,
    msg: &M,
    max_frame: u32,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let size = bincode_options(u64::MAX)
        .serialized_size(msg)
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    if size > u64::from(max_frame) {
        return Err(FrameError::TooLarge {
            len: size,
            max: max_frame,
        });
    }
    // size <= max_frame, a u32: it fits in usize on every supported target (>= 32 bits).
    out.reserve(HEADER_LEN + size as usize);
    out.extend_from_slice(&[0; HEADER_LEN]);
    bincode_options(size)
        .serialize_into(&mut *out, msg)
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let payload = &out[HEADER_LEN..];
    // The message serialised to exactly `serialized_size` bytes unless its Serialize is
    // not deterministic; the limit above makes a larger one fail, check a smaller one too.
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&len| u64::from(len) == size)
        .ok_or_else(|| {
            FrameError::Encode(format!(
                "message serialised to {} bytes, {size} expected",
                payload.len()
            ))
        })?;
    let header = encode_header(Header {
        kind,
        len,
        crc: crc32c::crc32c(payload),
    });
    out[..HEADER_LEN].copy_from_slice(&header);
    Ok(())
}

/// The 12 bytes of a header (no checks: used to build frames, valid or deliberately not).
pub fn encode_header(header: Header) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[0..2].copy_from_slice(&MAGIC.to_le_bytes());
    out[2] = VERSION;
    out[3] = header.kind;
    out[4..8].copy_from_slice(&header.len.to_le_bytes());
    out[8..12].copy_from_slice(&header.crc.to_le_bytes());
    out
}

/// Checks and decodes a frame header: magic, version, and `len <= max_frame`.
pub fn decode_header(bytes: &[u8; HEADER_LEN], max_frame: u32) -> Result<Header, FrameError> {
    let magic = u16::from_le_bytes([bytes[0], bytes[1]]);
    if magic != MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    if bytes[2] != VERSION {
        return Err(FrameError::UnsupportedVersion { found: bytes[2] });
    }
    let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if len > max_frame {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max: max_frame,
        });
    }
    Ok(Header {
        kind: bytes[3],
        len,
        crc: u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
    })
}

/// Checks the payload of a frame against its header (length, CRC) and decodes it as `M`,
/// reading at most `header.len` bytes and refusing trailing bytes.
pub fn decode_payload<M: DeserializeOwned>(
    header: &Header,
    payload: &[u8],
) -> Result<M, FrameError> {
    if payload.len() != header.len as usize {
        return Err(FrameError::LengthMismatch {
            expected: header.len,
            actual: payload.len(),
        });
    }
    let actual = crc32c::crc32c(payload);
    if actual != header.crc {
        return Err(FrameError::Checksum {
            expected: header.crc,
            actual,
        });
    }
    bincode_options(u64::from(header.len))
        .deserialize(payload)
        .map_err(|e| FrameError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Hello { name: String, epoch: u64 },
        Blocks(Vec<(u64, Vec<u8>)>),
        Ack { received: u64, applied: u64 },
        Nothing,
    }

    fn split(frame: &[u8]) -> ([u8; HEADER_LEN], &[u8]) {
        let (h, p) = frame.split_at(HEADER_LEN);
        (h.try_into().unwrap(), p)
    }

    #[test]
    fn layout_is_as_documented() {
        let frame = encode(7, &0x0102_0304u32, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(&frame[0..2], &[0x46, 0x50]);
        assert_eq!(frame[2], 1);
        assert_eq!(frame[3], 7);
        assert_eq!(&frame[4..8], &4u32.to_le_bytes());
        assert_eq!(&frame[8..12], &crc32c::crc32c(&[4, 3, 2, 1]).to_le_bytes());
        assert_eq!(&frame[12..], &[4, 3, 2, 1]);
    }

    #[test]
    fn round_trip() {
        let msg = Msg::Hello {
            name: "alpha".into(),
            epoch: 9,
        };
        let frame = encode(3, &msg, DEFAULT_MAX_FRAME).unwrap();
        let (h, p) = split(&frame);
        let header = decode_header(&h, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(header.kind, 3);
        assert_eq!(decode_payload::<Msg>(&header, p).unwrap(), msg);
    }

    #[test]
    fn every_check_has_its_error() {
        let frame = encode(
            1,
            &Msg::Ack {
                received: 1,
                applied: 2,
            },
            1024,
        )
        .unwrap();
        let (h, p) = split(&frame);

        let mut bad = h;
        bad[0] ^= 0xff;
        assert!(matches!(
            decode_header(&bad, 1024),
            Err(FrameError::BadMagic { .. })
        ));

        let mut bad = h;
        bad[2] = 2;
        assert_eq!(
            decode_header(&bad, 1024),
            Err(FrameError::UnsupportedVersion { found: 2 })
        );

        let mut bad = h;
        bad[4..8].copy_from_slice(&1025u32.to_le_bytes());
        assert_eq!(
            decode_header(&bad, 1024),
            Err(FrameError::TooLarge {
                len: 1025,
                max: 1024
            })
        );

        let header = decode_header(&h, 1024).unwrap();
        assert!(matches!(
            decode_payload::<Msg>(&header, &p[1..]),
            Err(FrameError::LengthMismatch { .. })
        ));

        let mut corrupt = p.to_vec();
        corrupt[5] ^= 1;
        assert!(matches!(
            decode_payload::<Msg>(&header, &corrupt),
            Err(FrameError::Checksum { .. })
        ));

        // A valid CRC over bytes that are not a Msg: variant index 200 does not exist.
        let junk = [200u8, 0, 0, 0];
        let header = Header {
            kind: 1,
            len: 4,
            crc: crc32c::crc32c(&junk),
        };
        assert!(matches!(
            decode_payload::<Msg>(&header, &junk),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut payload = bincode_options(100).serialize(&Msg::Nothing).unwrap();
        payload.push(0);
        let header = Header {
            kind: 0,
            len: payload.len() as u32,
            crc: crc32c::crc32c(&payload),
        };
        assert!(matches!(
            decode_payload::<Msg>(&header, &payload),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn length_prefix_beyond_payload_does_not_allocate() {
        // A Vec<u8> claiming u64::MAX / 2 elements in a 12-byte payload: refused by the
        // limit, not by an allocation failure.
        let mut payload = 1u32.to_le_bytes().to_vec(); // variant index of Msg::Blocks
        payload.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
        let header = Header {
            kind: 0,
            len: payload.len() as u32,
            crc: crc32c::crc32c(&payload),
        };
        assert!(matches!(
            decode_payload::<Msg>(&header, &payload),
            Err(FrameError::Decode(_))
        ));
        let payload = &payload[4..];
        let header = Header {
            kind: 0,
            len: payload.len() as u32,
            crc: crc32c::crc32c(payload),
        };
        assert!(matches!(
            decode_payload::<Vec<u8>>(&header, payload),
            Err(FrameError::Decode(_))
        ));
        assert!(matches!(
            decode_payload::<String>(&header, payload),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn oversize_message_is_refused_before_encoding() {
        let msg = Msg::Blocks(vec![(0, vec![0u8; 2048])]);
        match encode(0, &msg, 1024) {
            Err(FrameError::TooLarge { len, max: 1024 }) => assert!(len > 2048),
            other => panic!("{other:?}"),
        }
        // Exactly at the limit is fine.
        let size = bincode_options(u64::MAX).serialized_size(&msg).unwrap() as u32;
        encode(0, &msg, size).unwrap();
        assert!(encode(0, &msg, size - 1).is_err());
    }

    fn arb_msg() -> impl Strategy<Value = Msg> {
        prop_oneof![
            (".{0,40}", any::<u64>()).prop_map(|(name, epoch)| Msg::Hello { name, epoch }),
            proptest::collection::vec(
                (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64)),
                0..8
            )
            .prop_map(Msg::Blocks),
            (any::<u64>(), any::<u64>())
                .prop_map(|(received, applied)| Msg::Ack { received, applied }),
            Just(Msg::Nothing),
        ]
    }

    proptest! {
        #[test]
        fn prop_round_trip(kind in any::<u8>(), msg in arb_msg()) {
            let frame = encode(kind, &msg, DEFAULT_MAX_FRAME).unwrap();
            let (h, p) = split(&frame);
            let header = decode_header(&h, DEFAULT_MAX_FRAME).unwrap();
            prop_assert_eq!(header.kind, kind);
            prop_assert_eq!(header.len as usize, p.len());
            prop_assert_eq!(decode_payload::<Msg>(&header, p).unwrap(), msg);
        }

        /// A reused buffer (sender side) yields exactly the frame of a fresh one, whatever
        /// it held before, and a refused message leaves nothing to send.
        #[test]
        fn prop_encode_into_a_reused_buffer(a in arb_msg(), b in arb_msg(), junk in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = junk;
            encode_into(1, &a, DEFAULT_MAX_FRAME, &mut buf).unwrap();
            prop_assert_eq!(&buf, &encode(1, &a, DEFAULT_MAX_FRAME).unwrap());
            encode_into(2, &b, DEFAULT_MAX_FRAME, &mut buf).unwrap();
            prop_assert_eq!(&buf, &encode(2, &b, DEFAULT_MAX_FRAME).unwrap());
            match encode_into(3, &a, 4, &mut buf) {
                Err(_) => prop_assert!(buf.is_empty()),
                Ok(()) => prop_assert_eq!(&buf, &encode(3, &a, 4).unwrap()),
            }
        }

        #[test]
        fn prop_decode_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
            max in 0u32..512,
            fix_header in any::<bool>(),
        ) {
            let mut bytes = bytes;
            if bytes.len() >= HEADER_LEN && fix_header {
                // Make most inputs reach the payload decoder: valid magic, version, len
                // and CRC over whatever follows.
                let payload_len = (bytes.len() - HEADER_LEN) as u32;
                let crc = crc32c::crc32c(&bytes[HEADER_LEN..]);
                let h = encode_header(Header { kind: bytes[3], len: payload_len, crc });
                bytes[..HEADER_LEN].copy_from_slice(&h);
            }
            if bytes.len() >= HEADER_LEN {
                let (h, p) = split(&bytes);
                if let Ok(header) = decode_header(&h, max) {
                    let _ = decode_payload::<Msg>(&header, p);
                    let _ = decode_payload::<String>(&header, p);
                    let _ = decode_payload::<Vec<u64>>(&header, p);
                }
                let header = Header { kind: 0, len: p.len() as u32, crc: crc32c::crc32c(p) };
                let _ = decode_payload::<Msg>(&header, p);
            }
        }

        #[test]
        fn prop_single_bit_flip_is_detected(msg in arb_msg(), bit in any::<usize>()) {
            let frame = encode(5, &msg, DEFAULT_MAX_FRAME).unwrap();
            let mut bad = frame.clone();
            let bit = bit % (bad.len() * 8);
            bad[bit / 8] ^= 1 << (bit % 8);
            let (h, p) = split(&bad);
            let decoded = decode_header(&h, DEFAULT_MAX_FRAME)
                .and_then(|header| decode_payload::<Msg>(&header, p).map(|m| (header, m)));
            // Only a flip in the kind byte goes unnoticed (the kind is the caller's).
            if bit / 8 == 3 {
                let (header, m) = decoded.unwrap();
                prop_assert_eq!(header.kind, 5 ^ (1 << (bit % 8)));
                prop_assert_eq!(m, msg);
            } else {
                prop_assert!(decoded.is_err());
            }
        }
    }
}
