//! Fetch streams (docs/PROTOCOL.md §7.4): the client a taking-over volume reads `Peer`
//! blocks through ([`FetchClient`], a [`PeerFetch`]), and the server that answers them on
//! the old primary ([`serve`]).
//!
//! The client is called by FUSE threads (and the driver's blocking sections), at times with
//! the filesystem's lock held (a third round, a listing beyond its read-ahead), so it never
//! waits on the driver: the connection it uses is published by the driver
//! ([`FetchClient::set_connection`]), and each fetch is a stream of its own, waited for
//! with the fetch timeout (driven by the calling thread itself when it is not one of the
//! runtime's). A fetch that fails on one connection is tried again on the next one until
//! the timeout, then fails (the read gets `EIO`).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use pairfs::BlockNo;
use pairfs::Seq;
use pairfs::repl::Epoch;
use pairfs::takeover::{FetchMessage, MAX_FETCH_BLOCKS};
use pairfs::volume::PeerFetch;
use pairfs_transport::Connection;

/// Frame kind of the fetch streams.
pub const KIND_FETCH: u8 = 3;
/// Pause before a failed fetch is tried again (on a new connection).
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Fetches go before the drain's entries on the connection (docs/PROTOCOL.md §7.4).
const FETCH_PRIORITY: i32 = 10;
/// Fetches of at most this many blocks are read on the runtime worker that received them,
/// at once (a few reads of a frozen node's blocks, two thread hops fewer); larger ones on a
/// blocking thread.
const QUICK_FETCH_BLOCKS: usize = 4;

/// Reads blocks from the peer for a taking-over volume.
pub struct FetchClient {
    conn: Mutex<Option<Connection>>,
    conn_cv: Condvar,
    rt: tokio::runtime::Handle,
    timeout: Duration,
    epoch: Epoch,
}

impl FetchClient {
    pub fn new(rt: tokio::runtime::Handle, timeout: Duration, epoch: Epoch) -> Self {
        FetchClient {
            conn: Mutex::new(None),
            conn_cv: Condvar::new(),
            rt,
            timeout,
            epoch,
        }
    }

    /// The link: the connection to the peer now (`None`: none).
    pub fn set_connection(&self, c: Option<Connection>) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = c;
        self.conn_cv.notify_all();
    }

    /// The link: `c` ended; forgotten unless a newer connection replaced it already.
    pub fn forget_connection(&self, c: &Connection) {
        let mut g = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if g.as_ref().is_some_and(|cur| cur.same_as(c)) {
            *g = None;
        }
    }

    /// Waits for a connection until `deadline`.
    fn connection(&self, deadline: Instant) -> Option<Connection> {
        let mut g = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(c) = g.as_ref() {
                return Some(c.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self
                .conn_cv
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    fn fetch_chunk(&self, blocks: &[BlockNo], deadline: Instant) -> Result<Vec<Vec<u8>>, String> {
        let mut last = "no connection to the peer".to_string();
        loop {
            let Some(conn) = self.connection(deadline) else {
                return Err(last);
            };
            let req = FetchMessage::Fetch {
                epoch: self.epoch,
                blocks: blocks.to_vec(),
            };
            match self.ask(conn, req, blocks.len(), deadline) {
                Ok(data) => return Ok(data),
                Err(Some(e)) => last = e,
                Err(None) => return Err(format!("no answer within {:?} ({last})", self.timeout)),
            }
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(last);
            }
            std::thread::sleep(RETRY_PAUSE);
        }
    }

    /// One fetch on `conn`, waited for until `deadline` (`Err(None)`: no answer by then).
    /// A thread outside the runtime (a FUSE worker) drives the fetch itself, so the answer
    /// wakes it directly; a runtime thread (the driver, in `block_in_place`) cannot, and
    /// hands it to a task whose answer comes back over a channel — one thread hop more.
    fn ask(
        &self,
        conn: Connection,
        req: FetchMessage,
        n: usize,
        deadline: Instant,
    ) -> Result<Vec<Vec<u8>>, Option<String>> {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::runtime::Handle::try_current().is_err() {
            // The timer is made inside: `block_on` enters the runtime's context.
            let answer = self
                .rt
                .block_on(async { tokio::time::timeout(left, fetch_once(&conn, &req, n)).await });
            return answer.map_err(|_| None)?.map_err(Some);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let _ = tx.send(fetch_once(&conn, &req, n).await);
        });
        rx.recv_timeout(left).map_err(|_| None)?.map_err(Some)
    }
}

impl PeerFetch for FetchClient {
    fn fetch(&self, blocks: &[(BlockNo, Seq)]) -> Result<Vec<Vec<u8>>, String> {
        let deadline = Instant::now() + self.timeout;
        let mut out = Vec::with_capacity(blocks.len());
        for chunk in blocks.chunks(MAX_FETCH_BLOCKS) {
            let ask: Vec<BlockNo> = chunk.iter().map(|&(b, _)| b).collect();
            out.extend(self.fetch_chunk(&ask, deadline)?);
        }
        Ok(out)
    }
}

/// One fetch on a stream of its own.
async fn fetch_once(
    conn: &Connection,
    req: &FetchMessage,
    n: usize,
) -> Result<Vec<Vec<u8>>, String> {
    let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
    s.set_priority(FETCH_PRIORITY);
    s.send(KIND_FETCH, req).await.map_err(|e| e.to_string())?;
    let _ = s.finish();
    match r.recv::<FetchMessage>().await.map_err(|e| e.to_string())? {
        Some((_, FetchMessage::Fetched { blocks })) if blocks.len() == n => {
            Ok(blocks.into_iter().map(|b| b.into_vec()).collect())
        }
        Some((_, FetchMessage::Fetched { blocks })) => Err(format!(
            "the peer answered {} blocks for {n} asked",
            blocks.len()
        )),
        Some((_, FetchMessage::Refused { reason })) => Err(format!("the peer refused: {reason}")),
        Some((_, FetchMessage::Fetch { .. })) => Err("the peer answered with a fetch".into()),
        None => Err("the peer closed the fetch stream".into()),
    }
}

/// What a node answers fetches from: the content of blocks as it holds them, or why it
/// cannot serve them now.
pub type FetchSource = dyn Fn(&[BlockNo]) -> Result<Vec<Vec<u8>>, String> + Send + Sync;

/// Answers the peer's fetch streams on `conn` until it closes. Each stream is served on a
/// task of its own (reads of more than [`QUICK_FETCH_BLOCKS`] on a blocking thread), so one
/// slow read delays no other.
pub async fn serve(conn: Connection, source: Arc<FetchSource>) {
    loop {
        let Ok((mut s, mut r)) = conn.accept_bi().await else {
            return;
        };
        let source = source.clone();
        tokio::spawn(async move {
            let answer = match r.recv::<FetchMessage>().await {
                Ok(Some((_, FetchMessage::Fetch { blocks, .. })))
                    if blocks.len() <= MAX_FETCH_BLOCKS =>
                {
                    let read = if blocks.len() <= QUICK_FETCH_BLOCKS {
                        Ok(source(&blocks))
                    } else {
                        tokio::task::spawn_blocking(move || source(&blocks)).await
                    };
                    match read {
                        Ok(Ok(data)) => FetchMessage::fetched(data),
                        Ok(Err(reason)) => FetchMessage::Refused { reason },
                        Err(e) => FetchMessage::Refused {
                            reason: format!("reading failed: {e}"),
                        },
                    }
                }
                Ok(Some((_, FetchMessage::Fetch { blocks, .. }))) => FetchMessage::Refused {
                    reason: format!(
                        "{} blocks asked, at most {MAX_FETCH_BLOCKS} per fetch",
                        blocks.len()
                    ),
                },
                Ok(Some(_)) => FetchMessage::Refused {
                    reason: "expected a fetch".into(),
                },
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "a bad fetch stream");
                    return;
                }
            };
            s.set_priority(FETCH_PRIORITY);
            if s.send(KIND_FETCH, &answer).await.is_ok() {
                let _ = s.finish();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use pairfs_transport::{Endpoint, Identity, TransportConfig};

    use super::*;

    /// A client and a server over a real QUIC connection on loopback.
    fn pair(
        rt: &tokio::runtime::Runtime,
        source: Arc<FetchSource>,
    ) -> (Arc<FetchClient>, Vec<Endpoint>) {
        rt.block_on(async {
            let a = Identity::generate("a").unwrap();
            let b = Identity::generate("b").unwrap();
            let lo = "127.0.0.1:0".parse().unwrap();
            let cfg = TransportConfig {
                max_frame: pairfs::repl::MAX_FRAME,
                ..TransportConfig::default()
            };
            let ea = Endpoint::bind(lo, &a, b.fingerprint(), cfg).unwrap();
            let eb = Endpoint::bind(lo, &b, a.fingerprint(), cfg).unwrap();
            let addr = eb.local_addr().unwrap();
            let ca = ea.connect(addr).await.unwrap();
            let cb = eb.accept().await.unwrap().unwrap();
            tokio::spawn(serve(cb, source));
            let client = Arc::new(FetchClient::new(
                rt.handle().clone(),
                Duration::from_millis(500),
                Epoch(2),
            ));
            client.set_connection(Some(ca));
            (client, vec![ea, eb])
        })
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn blocks_are_fetched_in_order_across_several_requests() {
        let rt = runtime();
        let (client, _eps) = pair(&rt, Arc::new(numbered));
        let asked: Vec<(u64, Seq)> = (0..600).map(|b| (b, Seq(7))).collect();
        let got = client.fetch(&asked).unwrap();
        assert_eq!(got.len(), 600, "more than one request's worth");
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d, &vec![i as u8; 4096]);
        }
    }

    #[test]
    fn a_refusal_or_no_connection_fails_within_the_timeout_with_the_reason() {
        let rt = runtime();
        let source: Arc<FetchSource> = Arc::new(|_: &[u64]| Err("not frozen".into()));
        let (client, _eps) = pair(&rt, source);
        let t = Instant::now();
        let e = client.fetch(&[(1, Seq(1))]).unwrap_err();
        assert!(e.contains("not frozen"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
        client.set_connection(None);
        let t = Instant::now();
        let e = client.fetch(&[(1, Seq(1))]).unwrap_err();
        assert!(e.contains("no connection"), "{e}");
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "waited for a connection"
        );
    }

    /// Block `b` of the test sources: its number in every byte.
    fn numbered(blocks: &[u64]) -> Result<Vec<Vec<u8>>, String> {
        Ok(blocks.iter().map(|&b| vec![b as u8; 4096]).collect())
    }

    #[test]
    fn a_runtime_thread_gets_its_blocks_through_a_task_and_a_fuse_thread_by_itself() {
        let rt = runtime();
        let (client, _eps) = pair(&rt, Arc::new(numbered));
        // The driver's way: a runtime worker inside `block_in_place`.
        let c = client.clone();
        let got = rt.block_on(async move {
            tokio::spawn(async move {
                tokio::task::block_in_place(|| c.fetch(&[(3, Seq(1)), (9, Seq(1))]))
            })
            .await
            .unwrap()
        });
        assert_eq!(got.unwrap(), vec![vec![3u8; 4096], vec![9u8; 4096]]);
        // A FUSE worker's: a thread of its own (a small fetch, read at once by the server).
        let c = client.clone();
        let got = std::thread::spawn(move || c.fetch(&[(5, Seq(1))]))
            .join()
            .unwrap();
        assert_eq!(got.unwrap(), vec![vec![5u8; 4096]]);
    }

    #[test]
    fn a_source_that_does_not_answer_fails_the_fetch_at_the_timeout() {
        let rt = runtime();
        let source: Arc<FetchSource> = Arc::new(|blocks: &[u64]| {
            std::thread::sleep(Duration::from_millis(1500));
            numbered(blocks)
        });
        let (client, _eps) = pair(&rt, source);
        let t = Instant::now();
        // Small (read on the server's worker) and large (on a blocking thread).
        for n in [1u64, 40] {
            let asked: Vec<(u64, Seq)> = (0..n).map(|b| (b, Seq(1))).collect();
            let e = client.fetch(&asked).unwrap_err();
            assert!(e.contains("no answer within"), "{e}");
        }
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(1000) && waited < Duration::from_millis(2900),
            "two fetches of a 500 ms timeout took {waited:?}"
        );
    }
}
