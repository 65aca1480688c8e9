//! The error of the transport layer.
//!
//! One enum for the whole crate (docs/DESIGN.md §10.2: one `thiserror` enum per layer),
//! except the two pure decoders that have their own small error types: [`FrameError`] for frames (wrapped
//! here as [`TransportError::Frame`]) and [`FingerprintError`](crate::FingerprintError)
//! for parsing a fingerprint from configuration text.
//!
//! Errors from the network keep quinn's error inside (`#[source]`) so that callers can tell
//! a timeout from a close by the peer ([`TransportError::is_timeout`]).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use thiserror::Error;

use crate::frame::FrameError;

/// An error of the transport layer.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TransportError {
    /// An identity file (`identity.key` or `identity.crt`) does not exist.
    #[error("identity file {} does not exist (run `pairfs init` first)", path.display())]
    IdentityMissing {
        /// The missing file.
        path: PathBuf,
    },

    /// Refused to overwrite an existing identity: a new key would silently unpair the node.
    #[error(
        "identity file {} already exists; remove it first to make a new identity",
        path.display()
    )]
    IdentityExists {
        /// The existing file.
        path: PathBuf,
    },

    /// Reading or writing an identity file failed.
    #[error("identity file {}: {source}", path.display())]
    IdentityIo {
        /// The file (or directory) involved.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },

    /// An identity file exists but its content is not a usable PEM key or certificate, or
    /// the key does not belong to the certificate.
    #[error("identity file {}: {reason}", path.display())]
    IdentityInvalid {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The private key file can be read by the group or by others: refused, like ssh does.
    #[error(
        "private key {} has mode {mode:04o}, readable by group or others; run `chmod 600` on it",
        path.display()
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },

    /// Generating a key or a certificate failed.
    #[error("generating the identity failed: {0}")]
    Generate(String),

    /// rustls refused the TLS configuration (typically: key and certificate do not match).
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),

    /// The [`TransportConfig`](crate::TransportConfig) is not usable.
    #[error("invalid transport configuration: {0}")]
    InvalidConfig(String),

    /// The UDP socket could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address we tried to listen on.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: io::Error,
    },

    /// The bound socket could not be queried.
    #[error("socket: {0}")]
    Socket(#[source] io::Error),

    /// The endpoint refused to start a connection (closed endpoint, unusable address).
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: SocketAddr,
        /// Why quinn refused.
        #[source]
        source: quinn::ConnectError,
    },

    /// The handshake with `addr` failed: unreachable, timed out, or one side refused the
    /// other's certificate (not the pinned fingerprint).
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// The remote address.
        addr: SocketAddr,
        /// The reason given by quinn (includes the TLS alert or the peer's close reason).
        #[source]
        source: quinn::ConnectionError,
    },

    /// The established connection is lost or closed (by us, by the peer, or by the idle
    /// timeout: see [`TransportError::is_timeout`]).
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),

    /// Writing to a stream failed (stream stopped by the peer, connection lost).
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),

    /// Reading from a stream failed (stream reset by the peer, connection lost).
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadError),

    /// The local stream was already finished or reset.
    #[error("stream already closed")]
    StreamClosed,

    /// The peer finished its stream in the middle of a frame.
    #[error("stream ended in the middle of a frame ({received} of {expected} bytes)")]
    TruncatedFrame {
        /// Bytes of the frame (header included) received before the end.
        received: usize,
        /// Bytes the frame should have had (the header alone if it was cut short).
        expected: usize,
    },

    /// A frame failed a check (magic, version, size, checksum, decoding). The caller should
    /// close the connection with [`Connection::close_with_error`](crate::Connection::close_with_error).
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),

    /// Encoding or decoding a frame on a blocking thread did not complete (the runtime is
    /// shutting down).
    #[error("{0}")]
    Blocking(String),

    /// The connection has no peer certificate; cannot happen after a mutual TLS handshake.
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
}

impl TransportError {
    /// True if the connection ended because the peer stayed silent longer than the idle
    /// timeout (dead peer, broken network), as opposed to a close or a refusal.
    pub fn is_timeout(&self) -> bool {
        let conn = match self {
            Self::Connection(e) | Self::Handshake { source: e, .. } => Some(e),
            Self::Read(quinn::ReadError::ConnectionLost(e))
            | Self::Write(quinn::WriteError::ConnectionLost(e)) => Some(e),
            _ => None,
        };
        matches!(conn, Some(quinn::ConnectionError::TimedOut))
    }
}
