//! Endpoints, connections and framed streams over QUIC (quinn).
//!
//! An [`Endpoint`] is one UDP socket that is both a QUIC server and a QUIC client, for
//! exactly one peer: both directions use the TLS configurations of [`crate::tls`], pinned
//! to the peer's fingerprint. Which node dials and when to reconnect (with [`Backoff`](crate::Backoff))
//! is the caller's policy (docs/PROTOCOL.md §3: the node whose name sorts first dials).
//!
//! [`Endpoint::accept`] never fails because of a stranger: an incoming connection that
//! presents the wrong certificate, the wrong ALPN or garbage is logged and skipped, and
//! the endpoint keeps listening. UDP datagrams that are not QUIC are dropped by quinn.
//! Handshakes run concurrently (bounded, with QUIC Retry under load), so a stranger's
//! half-open handshake does not hold up the peer's.
//!
//! A [`Connection`] hands out streams as a [`FrameSender`] (write half) and a
//! [`FrameReceiver`] (read half), which carry whole messages as frames ([`crate::frame`]).
//! A receiver that meets a bad frame returns [`TransportError::Frame`]; the stream is then
//! out of step and the caller should close the connection with
//! [`Connection::close_with_error`], which tells the peer why.
//!
//! Liveness: both sides send a keep-alive every [`TransportConfig::keepalive`] and close
//! the connection after [`TransportConfig::idle_timeout`] without hearing anything, so a
//! dead peer or a cut link is noticed in about a second ([`TransportError::is_timeout`]).
//!
//! Each connection has a `tracing` span (`conn`, with the remote address and direction)
//! that its streams' log events are attached to.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, VarInt};
use rustls::pki_types::CertificateDer;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tracing::Span;

use crate::frame::{self, FrameError, HEADER_LEN, Header};
use crate::tls::{self, SERVER_NAME};
use crate::{Fingerprint, Identity, Result, TransportError};

/// Application close code of an orderly close.
pub const CLOSE_NORMAL: u32 = 0;
/// Application close code after a bad frame (the reason names the check that failed).
pub const CLOSE_FRAME_ERROR: u32 = 1;
/// Application close code of a node whose role just changed: the peer reconnects at once
/// (its backoff would otherwise delay the next hello).
pub const CLOSE_ROLE_CHANGE: u32 = 3;

/// Default keep-alive interval: four per idle timeout, so that losing up to three
/// consecutive keep-alives (or their acks) on a lossy link does not end the connection.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_millis(250);
/// Default idle timeout: a dead peer is noticed in about a second (docs/PROTOCOL.md §3);
/// the pair is then suspended (sync-mode writers wait up to `replication.sync_timeout`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// Tuning of the transport; the defaults are those of docs/PROTOCOL.md §3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportConfig {
    /// Interval between keep-alive packets when nothing else is sent.
    pub keepalive: Duration,
    /// A connection that hears nothing for this long is closed (the shorter of the two
    /// peers' values applies). Must be longer than `keepalive`.
    pub idle_timeout: Duration,
    /// Largest frame payload sent or accepted, in bytes.
    pub max_frame: u32,
    /// The congestion controller.
    pub congestion: Congestion,
}

/// The congestion controller of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 8312), quinn's default: on a saturated link it keeps the bottleneck's
    /// queue full, so a small message sent meanwhile waits for the whole queue.
    Cubic,
    /// BBR (experimental in quinn): paces at the measured bottleneck rate and keeps the
    /// queue short, so that a fetch sent during a drain does not wait behind the drain.
    Bbr,
    /// CUBIC with its window capped so that the bottleneck's queue holds about this
    /// much delay ([`crate::congestion`]). The default, with
    /// [`crate::congestion::DEFAULT_QUEUE_TARGET`].
    QueueBound(Duration),
}

impl Default for Congestion {
    fn default() -> Self {
        Congestion::QueueBound(crate::congestion::DEFAULT_QUEUE_TARGET)
    }
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            keepalive: DEFAULT_KEEPALIVE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_frame: frame::DEFAULT_MAX_FRAME,
            congestion: Congestion::default(),
        }
    }
}

impl TransportConfig {
    /// The quinn transport configuration with keep-alive and idle timeout set.
    fn quinn(&self) -> Result<quinn::TransportConfig> {
        if self.keepalive.is_zero() || self.keepalive >= self.idle_timeout {
            return Err(TransportError::InvalidConfig(format!(
                "keepalive ({:?}) must be non-zero and shorter than idle_timeout ({:?})",
                self.keepalive, self.idle_timeout
            )));
        }
        if self.max_frame == 0 {
            return Err(TransportError::InvalidConfig("max_frame is 0".into()));
        }
        let idle = IdleTimeout::try_from(self.idle_timeout).map_err(|_| {
            TransportError::InvalidConfig(format!(
                "idle_timeout {:?} is out of range",
                self.idle_timeout
            ))
        })?;
        let mut config = quinn::TransportConfig::default();
        config
            .keep_alive_interval(Some(self.keepalive))
            .max_idle_timeout(Some(idle));
        match self.congestion {
            Congestion::Cubic => {}
            Congestion::Bbr => {
                config.congestion_controller_factory(Arc::new(
                    quinn::congestion::BbrConfig::default(),
                ));
            }
            Congestion::QueueBound(target) => {
                config.congestion_controller_factory(Arc::new(
                    crate::congestion::QueueBoundConfig { target },
                ));
            }
        }
        Ok(config)
    }
}

/// Handshakes in progress at once on the accepting side. Only one peer can complete
/// one; the others are strangers (scanners, misconfigured nodes, spoofed Initials), each
/// lasting at most the idle timeout (in quinn at least three probe timeouts: about 3 s
/// before any round trip is measured). Enough that a burst of strangers does not refuse the
/// real peer, few enough to bound the memory and CPU they can take.
const MAX_HANDSHAKES: usize = 64;
/// Above this many handshakes in progress, a client whose address is not yet validated
/// is sent a QUIC Retry first: a spoofed source address cannot answer it, so it cannot
/// hold a handshake slot. Below it, no extra round trip for the real peer.
const RETRY_ABOVE: usize = 4;
/// Accepted connections waiting for [`Endpoint::accept`]; with one peer, more than a few
/// means the caller is not accepting, and handshakes then wait (counting towards
/// [`MAX_HANDSHAKES`]).
const ACCEPTED_QUEUE: usize = 4;

/// A QUIC endpoint that accepts from and dials to one pinned peer.
///
/// Incoming handshakes run concurrently in a background task (spawned by
/// [`Endpoint::bind`], ended when the endpoint is closed or dropped), so a stranger's
/// half-open handshake never delays the peer's.
#[derive(Debug)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    peer: Fingerprint,
    max_frame: u32,
    accepted: tokio::sync::Mutex<mpsc::Receiver<Connection>>,
    acceptor: JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        // The task holds a handle on the quinn endpoint: stop it so the socket is released.
        self.acceptor.abort();
    }
}

/// Takes incoming connections, completes their handshakes concurrently, and queues the
/// ones that succeed. Ends when the quinn endpoint is closed.
async fn run_acceptor(endpoint: quinn::Endpoint, queue: mpsc::Sender<Connection>, max_frame: u32) {
    let mut handshakes = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => continue,
        };
        let addr = incoming.remote_address();
        if handshakes.len() >= MAX_HANDSHAKES {
            tracing::warn!(%addr, in_progress = handshakes.len(), "too many handshakes in progress; refusing");
            incoming.refuse();
            continue;
        }
        if handshakes.len() >= RETRY_ABOVE
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            tracing::debug!(%addr, "asking an unvalidated address to retry");
            if let Err(e) = incoming.retry() {
                // Only fails if `may_retry` was false, which was just checked.
                e.into_incoming().ignore();
            }
            continue;
        }
        let queue = queue.clone();
        handshakes.spawn(async move {
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "incoming connection refused or failed");
                    return;
                }
            };
            match Connection::new(conn, "in", max_frame) {
                // An error means the endpoint is gone: the connection is dropped (closed).
                Ok(conn) => {
                    let _ = queue.send(conn).await;
                }
                Err(e) => tracing::warn!(%addr, error = %e, "incoming connection unusable"),
            }
        });
    }
    tracing::debug!("endpoint closed; acceptor ends");
}

impl Endpoint {
    /// Binds `listen` (port 0 for any) with our `identity`, accepting only `peer`, as both
    /// server and client. Must be called within a Tokio runtime.
    pub fn bind(
        listen: SocketAddr,
        identity: &Identity,
        peer: Fingerprint,
        cfg: TransportConfig,
    ) -> Result<Endpoint> {
        // Checked first: spawning the acceptor outside a runtime would panic.
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            TransportError::InvalidConfig(
                "Endpoint::bind must be called within a Tokio runtime".into(),
            )
        })?;
        let transport = Arc::new(cfg.quinn()?);

        let server_tls = tls::server_config(identity, peer)?;
        let server_crypto = QuicServerConfig::try_from(server_tls)
            .map_err(|e| TransportError::InvalidConfig(format!("QUIC server TLS: {e}")))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(Arc::clone(&transport));

        let client_tls = tls::client_config(identity, peer)?;
        let client_crypto = QuicClientConfig::try_from(client_tls)
            .map_err(|e| TransportError::InvalidConfig(format!("QUIC client TLS: {e}")))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);

        let mut inner =
            quinn::Endpoint::server(server, listen).map_err(|source| TransportError::Bind {
                addr: listen,
                source,
            })?;
        inner.set_default_client_config(client);
        tracing::info!(
            local = ?inner.local_addr().ok(),
            me = %identity.fingerprint(),
            peer = %peer,
            "transport endpoint bound"
        );
        let (queue, accepted) = mpsc::channel(ACCEPTED_QUEUE);
        let acceptor = runtime.spawn(run_acceptor(inner.clone(), queue, cfg.max_frame));
        Ok(Endpoint {
            inner,
            peer,
            max_frame: cfg.max_frame,
            accepted: tokio::sync::Mutex::new(accepted),
            acceptor,
        })
    }

    /// The address the socket is bound to (with the real port if bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.inner.local_addr().map_err(TransportError::Socket)
    }

    /// The fingerprint this endpoint accepts.
    pub fn peer(&self) -> Fingerprint {
        self.peer
    }

    /// Dials the peer at `addr`. Fails with [`TransportError::Handshake`] if it does not
    /// present the pinned certificate, or if it does not answer: after the idle timeout,
    /// but no sooner than three probe timeouts, which before any round trip is measured
    /// (quinn's initial RTT estimate, 333 ms) come to about 3 s.
    ///
    /// In TLS 1.3 the client's certificate is checked after the client considers the
    /// handshake done, so a server that refuses *our* certificate shows up as a
    /// connection closed right after this returns (its reason names our fingerprint).
    pub async fn connect(&self, addr: SocketAddr) -> Result<Connection> {
        let connecting = self
            .inner
            .connect(addr, SERVER_NAME)
            .map_err(|source| TransportError::Connect { addr, source })?;
        let conn = connecting.await.map_err(|source| {
            tracing::warn!(%addr, error = %source, "dialling the peer failed");
            TransportError::Handshake { addr, source }
        })?;
        Connection::new(conn, "out", self.max_frame)
    }

    /// Waits for the peer to connect. Connections that fail the handshake (wrong
    /// certificate, wrong ALPN, timeout) are logged and skipped. `None` once the endpoint
    /// is closed.
    ///
    /// Cancel-safe; concurrent callers are served one connection each.
    pub async fn accept(&self) -> Result<Option<Connection>> {
        Ok(self.accepted.lock().await.recv().await)
    }

    /// Closes every connection with `code` and `reason` and stops accepting; pending and
    /// later [`Endpoint::accept`] calls return `None`.
    pub fn close(&self, code: u32, reason: &str) {
        self.inner.close(VarInt::from_u32(code), reason.as_bytes());
    }

    /// Waits until every connection is closed and its close has been sent (call after
    /// [`Endpoint::close`] before exiting, so the peer hears of it rather than timing out).
    pub async fn wait_idle(&self) {
        self.inner.wait_idle().await;
    }
}

/// Bytes and packets of one connection (UDP payload, headers and retransmissions included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnStats {
    /// UDP payload bytes sent.
    pub bytes_sent: u64,
    /// UDP payload bytes received.
    pub bytes_received: u64,
    /// Packets sent.
    pub packets_sent: u64,
    /// Packets declared lost.
    pub packets_lost: u64,
    /// Current smoothed round-trip time estimate.
    pub rtt: Duration,
}

/// An authenticated connection to the pinned peer. Cheap to clone (a handle).
#[derive(Debug, Clone)]
pub struct Connection {
    inner: quinn::Connection,
    peer: Fingerprint,
    max_frame: u32,
    span: Span,
}

impl Connection {
    fn new(inner: quinn::Connection, direction: &'static str, max_frame: u32) -> Result<Self> {
        let peer = inner
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|certs| certs.first().map(|cert| Fingerprint::of_cert(cert)))
            .ok_or(TransportError::NoPeerCertificate)?;
        let span = tracing::info_span!(
            "conn",
            remote = %inner.remote_address(),
            dir = direction,
            id = inner.stable_id(),
        );
        tracing::info!(parent: &span, %peer, "connection established");
        Ok(Connection {
            inner,
            peer,
            max_frame,
            span,
        })
    }

    /// The fingerprint of the certificate the peer authenticated with (always the pinned
    /// one: anything else is refused during the handshake).
    pub fn peer_fingerprint(&self) -> Fingerprint {
        self.peer
    }

    /// The peer's current UDP address.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// The `tracing` span of this connection, for the caller's own events.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Opens a bidirectional stream. The peer learns of it (and its
    /// [`Connection::accept_bi`] returns) only when the first frame is sent on it.
    pub async fn open_bi(&self) -> Result<(FrameSender, FrameReceiver)> {
        let (send, recv) = self.inner.open_bi().await?;
        tracing::debug!(parent: &self.span, stream = %send.id(), "opened bidirectional stream");
        Ok((self.sender(send), self.receiver(recv)))
    }

    /// Waits for the peer to open a bidirectional stream.
    pub async fn accept_bi(&self) -> Result<(FrameSender, FrameReceiver)> {
        let (send, recv) = self.inner.accept_bi().await?;
        tracing::debug!(parent: &self.span, stream = %send.id(), "accepted bidirectional stream");
        Ok((self.sender(send), self.receiver(recv)))
    }

    /// Opens a unidirectional stream towards the peer.
    pub async fn open_uni(&self) -> Result<FrameSender> {
        let send = self.inner.open_uni().await?;
        tracing::debug!(parent: &self.span, stream = %send.id(), "opened unidirectional stream");
        Ok(self.sender(send))
    }

    /// Waits for the peer to open a unidirectional stream.
    pub async fn accept_uni(&self) -> Result<FrameReceiver> {
        let recv = self.inner.accept_uni().await?;
        tracing::debug!(parent: &self.span, stream = %recv.id(), "accepted unidirectional stream");
        Ok(self.receiver(recv))
    }

    /// Waits until the connection is closed, by either side or by the idle timeout, and
    /// returns why ([`TransportError::is_timeout`] tells a dead peer).
    pub async fn closed(&self) -> TransportError {
        let reason = self.inner.closed().await;
        tracing::info!(parent: &self.span, %reason, "connection closed");
        TransportError::Connection(reason)
    }

    /// Whether `other` is a handle on this same connection.
    pub fn same_as(&self, other: &Connection) -> bool {
        self.inner.stable_id() == other.inner.stable_id()
    }

    /// The application close code, if the connection was closed by the application on
    /// either side (`None` while open, or after a timeout or a transport error).
    pub fn close_code(&self) -> Option<u32> {
        match self.inner.close_reason()? {
            quinn::ConnectionError::ApplicationClosed(a) => {
                u32::try_from(a.error_code.into_inner()).ok()
            }
            quinn::ConnectionError::LocallyClosed => None,
            _ => None,
        }
    }

    /// Why the connection is closed, or `None` while it is open.
    pub fn close_reason(&self) -> Option<TransportError> {
        self.inner.close_reason().map(TransportError::Connection)
    }

    /// Closes the connection at once with an application `code` and `reason` (sent to the
    /// peer). Data not yet acknowledged is abandoned.
    pub fn close(&self, code: u32, reason: &str) {
        tracing::info!(parent: &self.span, code, reason, "closing connection");
        self.inner.close(VarInt::from_u32(code), reason.as_bytes());
    }

    /// Closes the connection after a bad frame, with [`CLOSE_FRAME_ERROR`] and the
    /// failed check as reason.
    pub fn close_with_error(&self, err: &FrameError) {
        tracing::warn!(parent: &self.span, error = %err, "closing connection after a bad frame");
        let reason = format!("bad frame: {err}");
        self.inner
            .close(VarInt::from_u32(CLOSE_FRAME_ERROR), reason.as_bytes());
    }

    /// Traffic counters of this connection.
    pub fn stats(&self) -> ConnStats {
        let stats = self.inner.stats();
        ConnStats {
            bytes_sent: stats.udp_tx.bytes,
            bytes_received: stats.udp_rx.bytes,
            packets_sent: stats.path.sent_packets,
            packets_lost: stats.path.lost_packets,
            rtt: stats.path.rtt,
        }
    }

    fn sender(&self, send: quinn::SendStream) -> FrameSender {
        FrameSender {
            send,
            max_frame: self.max_frame,
            span: self.span.clone(),
            buf: Vec::new(),
        }
    }

    fn receiver(&self, recv: quinn::RecvStream) -> FrameReceiver {
        FrameReceiver {
            recv,
            max_frame: self.max_frame,
            span: self.span.clone(),
            header: [0; HEADER_LEN],
            state: ReadState::Header { filled: 0 },
            payload: Vec::new(),
        }
    }
}

/// The write half of a stream: sends messages as frames.
#[derive(Debug)]
pub struct FrameSender {
    send: quinn::SendStream,
    max_frame: u32,
    span: Span,
    /// The frame being written, reused from one message to the next (its capacity grows
    /// to the largest frame sent, at most the frame limit).
    buf: Vec<u8>,
}

impl FrameSender {
    /// Encodes `msg` as a frame of `kind` and writes it. Returns once the bytes are handed
    /// to QUIC (flow control permitting), not when the peer has them. A message over the
    /// frame limit is refused with [`FrameError::TooLarge`] and nothing is written.
    ///
    /// Not cancel-safe: if the future is dropped midway the stream holds part of a frame
    /// and must be reset.
    pub async fn send<M: Serialize + ?Sized>(&mut self, kind: u8, msg: &M) -> Result<()> {
        frame::encode_into(kind, msg, self.max_frame, &mut self.buf)?;
        self.send.write_all(&self.buf).await?;
        tracing::trace!(parent: &self.span, stream = %self.send.id(), bytes = self.buf.len(), "frame sent");
        Ok(())
    }

    /// [`FrameSender::send`], with the encoding (bincode and CRC-32C: milliseconds for a
    /// 32 MiB entry) on a blocking thread, so that it holds none of the runtime's workers
    /// (which the other tasks of the node, its driver included, are waiting for).
    pub async fn send_off_runtime<M: Serialize + Send + 'static>(
        &mut self,
        kind: u8,
        msg: M,
    ) -> Result<()> {
        let mut buf = std::mem::take(&mut self.buf);
        let max_frame = self.max_frame;
        let (buf, encoded) = tokio::task::spawn_blocking(move || {
            let r = frame::encode_into(kind, &msg, max_frame, &mut buf);
            (buf, r)
        })
        .await
        .map_err(|e| TransportError::Blocking(format!("encoding a frame: {e}")))?;
        self.buf = buf;
        encoded?;
        self.send.write_all(&self.buf).await?;
        tracing::trace!(parent: &self.span, stream = %self.send.id(), bytes = self.buf.len(), "frame sent");
        Ok(())
    }

    /// Writes a frame already made by [`frame::encode`] (to encode off the async path,
    /// or once for several streams). The peer refuses anything that is not a frame.
    pub async fn send_encoded(&mut self, frame_bytes: &[u8]) -> Result<()> {
        self.send.write_all(frame_bytes).await?;
        tracing::trace!(parent: &self.span, stream = %self.send.id(), bytes = frame_bytes.len(), "frame sent");
        Ok(())
    }

    /// Sends this stream's data before that of streams of a lower priority (default 0)
    /// on the same connection: a small answer does not wait behind a bulk stream's
    /// buffered data.
    pub fn set_priority(&self, priority: i32) {
        let _ = self.send.set_priority(priority);
    }

    /// Ends the stream cleanly: the peer's [`FrameReceiver::recv`] returns `None` after
    /// the last frame.
    pub fn finish(&mut self) -> Result<()> {
        self.send.finish().map_err(|_| TransportError::StreamClosed)
    }

    /// Abandons the stream with an application `code`; unsent data is dropped.
    pub fn reset(&mut self, code: u32) -> Result<()> {
        self.send
            .reset(VarInt::from_u32(code))
            .map_err(|_| TransportError::StreamClosed)
    }

    /// Waits until the peer has received everything sent on the finished stream (or stops
    /// it).
    pub async fn stopped(&mut self) -> Result<Option<u32>> {
        match self.send.stopped().await {
            Ok(None) => Ok(None),
            // Application codes we send are u32; a larger one from a peer is saturated.
            Ok(Some(code)) => Ok(Some(u32::try_from(code.into_inner()).unwrap_or(u32::MAX))),
            Err(quinn::StoppedError::ConnectionLost(e)) => Err(TransportError::Connection(e)),
            Err(quinn::StoppedError::ZeroRttRejected) => Err(TransportError::StreamClosed),
        }
    }
}

/// Payload bytes reserved when a header arrives; a larger payload grows the buffer as its
/// bytes actually arrive. Most frames (acks, hellos, small entries) fit; a header alone,
/// announcing 16 MiB on each of many streams, reserves no more than this per stream.
const PAYLOAD_RESERVE: usize = 256 * 1024;

/// Where a [`FrameReceiver`] is within the current frame.
#[derive(Debug)]
enum ReadState {
    /// Reading the 12-byte header; `filled` bytes of it are in `header`.
    Header { filled: usize },
    /// Reading the payload announced by `header` into the receiver's `payload`.
    Payload { header: Header },
}

/// The read half of a stream: receives frames and decodes them.
#[derive(Debug)]
pub struct FrameReceiver {
    recv: quinn::RecvStream,
    max_frame: u32,
    span: Span,
    header: [u8; HEADER_LEN],
    state: ReadState,
    /// The payload being read, reused from one frame to the next (its capacity grows
    /// with the bytes that actually arrive, up to the largest frame received).
    payload: Vec<u8>,
}

impl FrameReceiver {
    /// Receives the next message: `(kind, message)`, or `None` when the peer finished the
    /// stream cleanly between two frames.
    ///
    /// Cancel-safe: the partial frame is kept, so this may be used in `tokio::select!`.
    pub async fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<(u8, M)>> {
        let Some(header) = self.next_frame().await? else {
            return Ok(None);
        };
        let msg = frame::decode_payload(&header, &self.payload).map_err(|e| self.bad_frame(e))?;
        Ok(Some((header.kind, msg)))
    }

    /// Receives the next frame without decoding its payload (to choose the message type
    /// from `header.kind`, then [`frame::decode_payload`]). The header is already checked
    /// (magic, version, size); the CRC is checked by `decode_payload`. Cancel-safe.
    pub async fn recv_frame(&mut self) -> Result<Option<(Header, Vec<u8>)>> {
        Ok(self
            .next_frame()
            .await?
            .map(|header| (header, std::mem::take(&mut self.payload))))
    }

    /// Reads the next frame: its header, with its payload in `self.payload`. Cancel-safe.
    async fn next_frame(&mut self) -> Result<Option<Header>> {
        loop {
            match &mut self.state {
                ReadState::Header { filled } => {
                    if *filled == HEADER_LEN {
                        let header = frame::decode_header(&self.header, self.max_frame)
                            .map_err(|e| self.bad_frame(e))?;
                        // header.len <= max_frame, a u32: fits in usize (>= 32 bits).
                        let reserve = (header.len as usize).min(PAYLOAD_RESERVE);
                        self.payload.clear();
                        self.payload.reserve(reserve);
                        self.state = ReadState::Payload { header };
                        continue;
                    }
                    match self.recv.read(&mut self.header[*filled..]).await? {
                        Some(n) => *filled += n,
                        None if *filled == 0 => return Ok(None),
                        None => {
                            return Err(TransportError::TruncatedFrame {
                                received: *filled,
                                expected: HEADER_LEN,
                            });
                        }
                    }
                }
                ReadState::Payload { header } => {
                    let expected = header.len as usize;
                    if self.payload.len() == expected {
                        let header = *header;
                        self.state = ReadState::Header { filled: 0 };
                        tracing::trace!(
                            parent: &self.span,
                            stream = %self.recv.id(),
                            kind = header.kind,
                            len = header.len,
                            "frame received"
                        );
                        return Ok(Some(header));
                    }
                    // Ordered, at most the rest of this frame: the next frame's bytes stay
                    // in the stream. Cancel-safe like `read`.
                    match self
                        .recv
                        .read_chunk(expected - self.payload.len(), true)
                        .await?
                    {
                        Some(chunk) => self.payload.extend_from_slice(&chunk.bytes),
                        None => {
                            return Err(TransportError::TruncatedFrame {
                                received: HEADER_LEN + self.payload.len(),
                                expected: HEADER_LEN + expected,
                            });
                        }
                    }
                }
            }
        }
    }

    /// Tells the peer to stop sending on this stream, with an application `code`.
    pub fn stop(&mut self, code: u32) -> Result<()> {
        self.recv
            .stop(VarInt::from_u32(code))
            .map_err(|_| TransportError::StreamClosed)
    }

    fn bad_frame(&self, err: FrameError) -> TransportError {
        tracing::warn!(parent: &self.span, stream = %self.recv.id(), error = %err, "bad frame received");
        TransportError::Frame(err)
    }
}
