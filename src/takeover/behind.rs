//! Local-unreflected entries written behind the writers (FORMAT.md §5.1, "Write-behind").
//!
//! A taker's writers fill the LU's open entry in memory; when it reaches its size limit it
//! is sealed. Writing those megabytes under the volume's lock made every writer wait for
//! them (a 7 MiB entry: 6–20 ms). Instead the entry is placed in the LU's journal at once
//! ([`crate::journal::Journal::prepare_entry`]) and its bytes are written by the area's
//! writer thread while the writers go on; until it is written, reads of its blocks are
//! served from the copy kept here. Whoever needs the bytes on the device first (a sync,
//! a release, a full queue) writes them itself, or waits for the thread to finish.
//! Entries are written in the order they were placed, and the journal counts one as
//! written only once it and every older one are ([`crate::journal::Journal::entry_written`]),
//! so no sync claims an entry whose bytes are not on the device.

use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::JoinHandle;

use crate::device::BlockDevice;
use crate::types::{BlockNo, Seq};

/// One entry placed in the LU's journal, written or not yet.
pub(super) struct Behind {
    pub(super) seq: Seq,
    offset: u64,
    /// The entry's header and descriptors.
    head: Vec<u8>,
    /// Its blocks in the entry's order (each an image).
    pub(super) blocks: Vec<(BlockNo, Arc<[u8]>)>,
    state: Mutex<State>,
}

enum State {
    Pending,
    Written,
    Failed(io::ErrorKind, String),
}

impl Behind {
    pub(super) fn new(
        seq: Seq,
        offset: u64,
        head: Vec<u8>,
        blocks: Vec<(BlockNo, Arc<[u8]>)>,
    ) -> Arc<Self> {
        Arc::new(Behind {
            seq,
            offset,
            head,
            blocks,
            state: Mutex::new(State::Pending),
        })
    }

    /// Writes the entry to `dev` unless that is done (waits while another thread writes
    /// it); an earlier failure is returned again.
    pub(super) fn write(&self, dev: &dyn BlockDevice) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &*st {
            State::Written => Ok(()),
            State::Failed(kind, msg) => Err(io::Error::new(*kind, msg.clone())),
            State::Pending => {
                let mut bufs: Vec<&[u8]> = Vec::with_capacity(self.blocks.len() + 1);
                bufs.push(&self.head);
                bufs.extend(self.blocks.iter().map(|(_, d)| &d[..]));
                let r = dev.write_vectored_at(&bufs, self.offset);
                *st = match &r {
                    Ok(()) => State::Written,
                    Err(e) => State::Failed(e.kind(), e.to_string()),
                };
                r
            }
        }
    }

    /// `Some` once the write ended (with its outcome), `None` while pending or under way.
    pub(super) fn outcome(&self) -> Option<io::Result<()>> {
        let st = match self.state.try_lock() {
            Ok(st) => st,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        match &*st {
            State::Pending => None,
            State::Written => Some(Ok(())),
            State::Failed(kind, msg) => Some(Err(io::Error::new(*kind, msg.clone()))),
        }
    }
}

/// What a sync flushes of the LU without the volume's lock: the entries under way, written
/// (or waited for) first, then the device synced. See `Volume::flush_ahead`.
pub struct LuFlush {
    pub(super) dev: Arc<dyn BlockDevice>,
    /// The journal's write mark once every entry here is counted written.
    pub(super) mark: u64,
    pub(super) behind: Vec<Arc<Behind>>,
}

impl LuFlush {
    /// The mark, for `FlushMarks`.
    pub fn mark(&self) -> u64 {
        self.mark
    }

    /// Writes what is still under way, then syncs (call without the volume's lock); the
    /// device and mark for [`crate::takeover::LuArea::synced_ahead`].
    pub fn run(self) -> (Arc<dyn BlockDevice>, u64, io::Result<()>) {
        let r = self
            .behind
            .iter()
            .try_for_each(|b| b.write(&*self.dev))
            .and_then(|()| self.dev.sync_separately());
        (self.dev, self.mark, r)
    }
}

/// The thread that writes an area's entries behind the writers, oldest first. It stops at
/// the first failed write (the area reports it at its next step and the volume stops);
/// dropping the writer ends the thread after the write under way.
pub(super) struct Writer {
    tx: Option<mpsc::Sender<Arc<Behind>>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub(super) fn start(dev: Arc<dyn BlockDevice>) -> io::Result<Writer> {
        let (tx, rx) = mpsc::channel::<Arc<Behind>>();
        let thread = std::thread::Builder::new()
            .name("lu-writer".into())
            .spawn(move || {
                for b in rx {
                    if let Err(e) = b.write(&*dev) {
                        tracing::warn!(seq = %b.seq, error = %e, "writing a local-unreflected entry failed");
                        break;
                    }
                }
            })?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues `b` (after a failure the thread is gone: whoever needs it writes it).
    pub(super) fn send(&self, b: Arc<Behind>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(b);
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
