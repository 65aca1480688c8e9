//! pairfs transport: QUIC (quinn) with mutual TLS and pinned peer identities, and the
//! framing of messages (docs/PROTOCOL.md §3). It knows nothing of volumes.
//!
//! The layers, bottom up:
//!
//! - [`identity`]: a node's key and self-signed certificate (`DIR/identity.key`,
//!   `DIR/identity.crt`) and its [`Fingerprint`] (`sha256:` + hex of the certificate DER).
//! - [`tls`]: rustls configurations for QUIC whose only trust is one pinned peer
//!   fingerprint, in both directions (mutual authentication), ALPN `pairfs/5`, TLS 1.3 only.
//! - [`frame`]: the byte format of one message on a stream (magic, version, kind, length,
//!   CRC-32C, bincode payload). Pure functions, no I/O, fuzzed (`fuzz/`).
//! - [`conn`]: an [`Endpoint`] that is both server and client for exactly one peer, the
//!   [`Connection`] to that peer, and [`FrameSender`]/[`FrameReceiver`] that carry typed
//!   messages on QUIC streams.
//! - [`backoff`]: the dialler's reconnect delay (100 ms to 1 s, exponential, jittered).
//!
//! The message types are the caller's: anything `Serialize`/`DeserializeOwned`, tagged
//! with a `kind` byte that the transport carries but does not interpret.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use pairfs_transport::{Endpoint, Fingerprint, Identity, TransportConfig};
//!
//! let me = Identity::load("/var/lib/pairfs".as_ref())?;
//! let peer: Fingerprint =
//!     "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".parse()?;
//! let endpoint = Endpoint::bind("0.0.0.0:7000".parse()?, &me, peer, TransportConfig::default())?;
//!
//! // The dialler; the other node calls `endpoint.accept()` and `conn.accept_bi()`.
//! let conn = endpoint.connect("192.0.2.7:7000".parse()?).await?;
//! let (mut send, mut recv) = conn.open_bi().await?;
//! send.send(1, &("hello", 42u64)).await?;
//! match recv.recv::<(String, u64)>().await {
//!     Ok(Some((kind, reply))) => println!("kind {kind}: {reply:?}"),
//!     Ok(None) => println!("the peer finished the stream"),
//!     Err(pairfs_transport::TransportError::Frame(bad)) => conn.close_with_error(&bad),
//!     Err(other) => return Err(other.into()),
//! }
//! # Ok(())
//! # }
//! ```

pub mod backoff;
pub mod congestion;
pub mod conn;
mod error;
pub mod frame;
pub mod identity;
pub mod tls;

pub use backoff::Backoff;
pub use conn::{
    CLOSE_FRAME_ERROR, CLOSE_NORMAL, CLOSE_ROLE_CHANGE, Congestion, ConnStats, Connection,
    Endpoint, FrameReceiver, FrameSender, TransportConfig,
};
pub use error::TransportError;
pub use frame::{DEFAULT_MAX_FRAME, FrameError, Header};
pub use identity::{Fingerprint, FingerprintError, Identity};

/// Result of the transport layer.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;
