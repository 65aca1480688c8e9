//! Fuzzes the frame decoder (`pairfs_transport::frame`) with arbitrary bytes, decoding into
//! the real pairfs message enum. Property: no input panics, and whatever decodes
//! re-encodes to a frame that decodes to the same message.
//!
//! The input is used twice: as a whole frame (header checks, then payload checks), and as
//! a bare payload behind a header made valid for it (correct length and CRC), so that most
//! inputs reach the bincode decoder instead of stopping at the CRC.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pairfs::repl::Message;
use pairfs_transport::frame::{self, DEFAULT_MAX_FRAME, HEADER_LEN, Header};

fuzz_target!(|data: &[u8]| {
    // 1. As a frame off the wire.
    if let Some((head, payload)) = data.split_first_chunk::<HEADER_LEN>() {
        if let Ok(header) = frame::decode_header(head, DEFAULT_MAX_FRAME) {
            if let Ok(msg) = frame::decode_payload::<Message>(&header, payload) {
                round_trip(header.kind, &msg);
            }
        }
    }

    // 2. As a payload behind a valid header.
    let Ok(len) = u32::try_from(data.len()) else {
        return;
    };
    let header = Header {
        kind: 0,
        len,
        crc: crc32c::crc32c(data),
    };
    if let Ok(msg) = frame::decode_payload::<Message>(&header, data) {
        round_trip(0, &msg);
    }
});

fn round_trip(kind: u8, msg: &Message) {
    let bytes = frame::encode(kind, msg, DEFAULT_MAX_FRAME).expect("a decoded message encodes");
    let (head, payload) = bytes
        .split_first_chunk::<HEADER_LEN>()
        .expect("a frame has a header");
    let header = frame::decode_header(head, DEFAULT_MAX_FRAME).expect("own header decodes");
    assert_eq!(header.kind, kind);
    let again: Message = frame::decode_payload(&header, payload).expect("own payload decodes");
    assert_eq!(&again, msg);
}
