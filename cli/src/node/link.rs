//! The connection to the peer: one QUIC connection, dialled by the node whose name sorts
//! first and accepted by both (docs/PROTOCOL.md §3), with a control stream and one
//! replication stream per direction.
//!
//! Memory taken from the peer is bounded in bytes: a reader hands a frame to the driver only
//! once it holds permits for its size from the connection's budget, and the driver returns
//! them when it has handled the message. A slow driver therefore stops the readers, and
//! QUIC's flow control then stops the peer — nothing queues without bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pairfs::repl::{MAX_FRAME, Message};
use pairfs_transport::{Backoff, Connection, Endpoint, FrameReceiver, frame};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

use super::{Event, Shared};

/// Frame kinds on the wire (the transport carries them, the node reads them).
pub const KIND_CONTROL: u8 = 1;
pub const KIND_REPLICATION: u8 = 2;
/// Replication messages queued per connection for the sender task before the driver waits.
const REPL_QUEUE: usize = 32;
/// Bytes of the peer's replication messages held at once between the reader and the
/// driver: two of the largest frames, so that one is handled while the next is read.
const RECEIVE_BUDGET: usize = 2 * MAX_FRAME as usize;
/// The same for the control stream, a budget of its own so that a control message never
/// waits for the replication stream's permits (they are released only as entries are
/// applied): one of the largest frames.
const CONTROL_BUDGET: usize = MAX_FRAME as usize;
/// The least a message counts against that budget: bounds how many small (control)
/// messages can queue.
const MIN_PERMIT: usize = 4096;
/// Frames larger than this are encoded and decoded on a blocking thread: a 32 MiB entry's
/// bincode and CRC take milliseconds, during which a runtime worker would run nothing else
/// (the driver, the other stream's reader).
const OFF_RUNTIME: usize = 1 << 20;
/// A connection that lasted this long resets the dialler's backoff: one that ends sooner
/// (the peer refused it: diverged, another volume) is redialled ever more slowly, up to
/// the backoff's maximum, instead of every 100 ms.
const STABLE_CONNECTION: std::time::Duration = std::time::Duration::from_secs(10);

/// A message from the peer and the share of the receive budget it holds until dropped.
pub struct Received {
    pub message: Message,
    pub permit: OwnedSemaphorePermit,
}

/// The driver's handle on a connection.
pub struct ConnHandle {
    pub id: u64,
    pub conn: Connection,
    pub ctrl: mpsc::UnboundedSender<Message>,
    pub repl: mpsc::Sender<Message>,
}

/// Keeps one connection to the peer: dials (with backoff) if this node's name sorts first.
/// Every node also accepts: the peer dials the other way, and strangers must be answered
/// (and refused by the certificate pin, with a log line) rather than ignored.
pub async fn connection_manager(
    ep: Arc<Endpoint>,
    peer: SocketAddr,
    dial: bool,
    shared: Arc<Shared>,
) {
    let ids = Arc::new(AtomicU64::new(0));
    {
        let (ep, shared, ids) = (ep.clone(), shared.clone(), ids.clone());
        tokio::spawn(async move {
            loop {
                match ep.accept().await {
                    Ok(Some(c)) => {
                        let id = ids.fetch_add(1, Ordering::AcqRel) + 1;
                        tracing::info!(conn = id, "the peer connected");
                        run_connection(id, c, false, shared.clone()).await;
                    }
                    Ok(None) => return,
                    Err(e) => tracing::debug!(error = %e, "accept failed"),
                }
            }
        });
    }
    if !dial {
        return;
    }
    let mut backoff = Backoff::with_seed(0x5eed);
    loop {
        let conn = match ep.connect(peer).await {
            Ok(c) => c,
            Err(e) => {
                let d = backoff.next();
                tracing::debug!(error = %e, retry_in = ?d, "peer unreachable");
                tokio::time::sleep(d).await;
                continue;
            }
        };
        let id = ids.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::info!(conn = id, "connected to the peer");
        let since = std::time::Instant::now();
        let closed = run_connection(id, conn.clone(), true, shared.clone()).await;
        // Wait for this connection to end before dialling again.
        closed.notified().await;
        tracing::info!(conn = id, "connection to the peer lost");
        let role_change = conn.close_code() == Some(pairfs_transport::CLOSE_ROLE_CHANGE)
            || shared.role_changed.swap(false, Ordering::AcqRel);
        if since.elapsed() >= STABLE_CONNECTION || role_change {
            backoff.reset();
        }
        if role_change {
            // One side changed its role: the hello of the new roles is due at once.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        }
        tokio::time::sleep(backoff.next()).await;
    }
}

/// Sets up the streams of a connection; returns a notifier fired when it ends.
async fn run_connection(
    id: u64,
    conn: Connection,
    dialer: bool,
    shared: Arc<Shared>,
) -> Arc<Notify> {
    let closed = Arc::new(Notify::new());
    let (ctrl_tx, mut ctrl_rx) = mpsc::unbounded_channel::<Message>();
    let (repl_tx, mut repl_rx) = mpsc::channel::<Message>(REPL_QUEUE);
    let budget = Arc::new(Semaphore::new(RECEIVE_BUDGET));
    let control_budget = Arc::new(Semaphore::new(CONTROL_BUDGET));
    let ended = Arc::new(AtomicBool::new(false));
    let end = {
        let (shared, closed, ended, conn) =
            (shared.clone(), closed.clone(), ended.clone(), conn.clone());
        move |why: String| {
            if !ended.swap(true, Ordering::AcqRel) {
                tracing::debug!(conn = id, %why, "connection ends");
                if let Some(client) = shared.fetch_client.get() {
                    client.forget_connection(&conn);
                }
                conn.close(1, &why);
                let _ = shared.events.send(Event::Disconnected(id));
                closed.notify_one();
            }
        }
    };
    let end = Arc::new(end);
    // Control stream: the dialler opens it, the acceptor waits for it.
    let ctrl = if dialer {
        conn.open_bi().await
    } else {
        conn.accept_bi().await
    };
    let (mut csend, crecv) = match ctrl {
        Ok(s) => s,
        Err(e) => {
            end(format!("control stream: {e}"));
            return closed;
        }
    };
    if let Some(source) = shared.fetch_source.get() {
        tokio::spawn(super::fetch::serve(conn.clone(), source.clone()));
    }
    if let Some(client) = shared.fetch_client.get() {
        client.set_connection(Some(conn.clone()));
    }
    // On the priority queue, as the control stream's messages are: the driver knows the
    // connection before any of them.
    let _ = shared.priority.send(Event::Connected(ConnHandle {
        id,
        conn: conn.clone(),
        ctrl: ctrl_tx,
        repl: repl_tx,
    }));
    {
        let end = end.clone();
        tokio::spawn(async move {
            while let Some(m) = ctrl_rx.recv().await {
                if let Err(e) = csend.send(KIND_CONTROL, &m).await {
                    end(format!("sending: {e}"));
                    return;
                }
            }
        });
    }
    {
        let (end, shared) = (end.clone(), shared.clone());
        tokio::spawn(async move {
            let to = shared.priority.clone();
            let why = read_messages(id, crecv, &to, &control_budget).await;
            end(format!("control stream: {why}"));
        });
    }
    {
        let (end, conn2) = (end.clone(), conn.clone());
        tokio::spawn(async move {
            let mut sender = None;
            while let Some(m) = repl_rx.recv().await {
                if sender.is_none() {
                    match conn2.open_uni().await {
                        Ok(s) => sender = Some(s),
                        Err(e) => return end(format!("replication stream: {e}")),
                    }
                }
                let Some(s) = sender.as_mut() else { return };
                let sent = if m.data_bytes() as usize > OFF_RUNTIME {
                    s.send_off_runtime(KIND_REPLICATION, m).await
                } else {
                    s.send(KIND_REPLICATION, &m).await
                };
                if let Err(e) = sent {
                    return end(format!("sending: {e}"));
                }
            }
        });
    }
    {
        let (end, conn2, shared) = (end.clone(), conn.clone(), shared.clone());
        tokio::spawn(async move {
            let r = match conn2.accept_uni().await {
                Ok(r) => r,
                Err(e) => return end(format!("replication stream: {e}")),
            };
            let to = shared.events.clone();
            let why = read_messages(id, r, &to, &budget).await;
            end(format!("replication stream: {why}"));
        });
    }
    {
        let (end, conn2) = (end.clone(), conn.clone());
        tokio::spawn(async move {
            let why = conn2.closed().await;
            end(format!("closed: {why}"));
        });
    }
    closed
}

/// Reads the messages of one stream into the driver's queue `to`, each once it holds its
/// share of `budget`; returns why the stream ended.
async fn read_messages(
    id: u64,
    mut r: FrameReceiver,
    to: &mpsc::UnboundedSender<Event>,
    budget: &Arc<Semaphore>,
) -> String {
    loop {
        let (header, payload) = match r.recv_frame().await {
            Ok(Some(f)) => f,
            Ok(None) => return "closed by the peer".into(),
            Err(e) => return e.to_string(),
        };
        let decoded = if header.len as usize > OFF_RUNTIME {
            match tokio::task::spawn_blocking(move || {
                frame::decode_payload::<Message>(&header, &payload)
            })
            .await
            {
                Ok(d) => d,
                Err(e) => return format!("decoding a frame: {e}"),
            }
        } else {
            let d = frame::decode_payload(&header, &payload);
            drop(payload);
            d
        };
        let message: Message = match decoded {
            Ok(m) => m,
            Err(e) => return format!("bad frame: {e}"),
        };
        if let Message::Frozen { seq, .. } = &message {
            tracing::debug!(%seq, "takeover: the freeze point received");
        }
        // (A frame is at most MAX_FRAME long: no share exceeds either budget.)
        let share = (header.len as usize).clamp(MIN_PERMIT, MAX_FRAME as usize);
        let Ok(permit) = budget.clone().acquire_many_owned(share as u32).await else {
            return "receive budget closed".into();
        };
        let received = Received { message, permit };
        if to.send(Event::Message(id, received)).is_err() {
            return "the node stopped".into();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_alpn_names_this_protocol_version() {
        // One place for the version: a node of another version must fail the handshake.
        assert_eq!(
            pairfs_transport::tls::ALPN,
            format!("pairfs/{}", pairfs::repl::PROTOCOL_VERSION).as_bytes()
        );
    }
}
