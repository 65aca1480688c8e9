//! pairfs transport: QUIC (quinn) with mutual TLS and pinned peer identities, and the
//! framing of messages (docs/PROTOCOL.md §3). It knows nothing of volumes.
//!
//! The layers, bottom up:
//!
//! - [`identity`]: a node's key and self-signed certificate (`DIR/identity.key`,
//!   `DIR/identity.crt`) and its [`Fingerprint`] (`sha256:` + hex of the certificate DER).
//! - [`tls`]: rustls configurations for QUIC whose only trust is one pinned peer
//!   fingerprint, in both directions (mutual authentication), ALPN `pairfs/1`, TLS 1.3 only.
//! - [`frame`]: the byte format of one message on a stream (magic, version, kind, length,
//!   CRC-32C, bincode payload). Pure functions, no I/O, fuzzed (`fuzz/`).
//! - [`conn`]: an [`Endpoint`] that is both server and client for exactly one peer, the
//!   [`Connection`] to that peer, and [`FrameSender`]/[`FrameReceiver`] that carry typed
//!   messages on QUIC streams.
//! - [`backoff`]: the dialler's reconnect delay (100 ms to 5 s, exponential, jittered).
//!
//! The message types are the caller's: anything `Serialize`/`DeserializeOwned`, tagged
//! with a `kind` byte that the transport carries but does not interpret.

pub mod backoff;
pub mod conn;
mod error;
pub mod frame;
pub mod identity;
pub mod tls;

pub use backoff::Backoff;
pub use conn::{
    CLOSE_FRAME_ERROR, CLOSE_NORMAL, ConnStats, Connection, Endpoint, FrameReceiver, FrameSender,
    TransportConfig,
};
pub use error::TransportError;
pub use frame::{DEFAULT_MAX_FRAME, FrameError, Header};
pub use identity::{Fingerprint, FingerprintError, Identity};

/// Result of the transport layer.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;
