//! A crash-simulating device.
//!
//! [`CrashDevice`] keeps what was *written* apart from what is *durable*: a write lands in
//! the written image and in a list of pending writes; `sync` makes the written image
//! durable. [`CrashPoint::image`] then produces what a power cut would leave: the durable
//! bytes plus an arbitrary subset of the pending 512-byte sectors (applied in write order),
//! which models a disk that persists writes partly and out of order between barriers.
//!
//! Crash tests install a hook ([`CrashDevice::set_sync_hook`]) that runs at the start of every
//! `sync` of any device of a node, before the barrier takes effect, and records a
//! [`CrashPoint`] of all of them: one run of a workload yields the crash image of every sync
//! point. Failure injection ([`CrashDevice::fail_from_now`]) makes writes and syncs return
//! `EIO`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::device::{BlockDevice, read_from, write_into};

/// The unit in which a crash may tear a write (a disk sector).
pub const SECTOR: usize = 512;

type SyncHook = Box<dyn Fn() + Send + Sync>;

/// See the module documentation.
pub struct CrashDevice {
    state: Mutex<CrashState>,
    hook: Mutex<Option<Arc<SyncHook>>>,
    failing: AtomicBool,
}

#[derive(Clone, Debug, Default)]
struct CrashState {
    written: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
}

/// What one device holds at a crash: its durable bytes and the writes since its last sync.
#[derive(Clone, Debug)]
pub struct CrashPoint {
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
}

impl std::fmt::Debug for CrashDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrashDevice").finish_non_exhaustive()
    }
}

impl CrashDevice {
    /// A zero-filled device of `len` bytes, all durable.
    pub fn new(len: u64) -> Self {
        Self::from_bytes(vec![0; len as usize])
    }

    /// A device whose durable and written contents are `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            state: Mutex::new(CrashState {
                written: bytes.clone(),
                durable: bytes,
                pending: Vec::new(),
            }),
            hook: Mutex::new(None),
            failing: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CrashState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Installs a hook run at the start of every `sync`, before it takes effect.
    pub fn set_sync_hook(&self, hook: impl Fn() + Send + Sync + 'static) {
        *self.hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(Box::new(hook)));
    }

    /// The state a crash at this instant would start from.
    pub fn crash_point(&self) -> CrashPoint {
        let s = self.lock();
        CrashPoint {
            durable: s.durable.clone(),
            pending: s.pending.clone(),
        }
    }

    /// The bytes written so far (what a clean shutdown would leave once synced).
    pub fn written(&self) -> Vec<u8> {
        self.lock().written.clone()
    }

    /// From now on every write and sync fails with `EIO` (a dying disk).
    pub fn fail_from_now(&self) {
        self.failing.store(true, Ordering::SeqCst);
    }

    fn check_failing(&self) -> io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

impl CrashPoint {
    /// The image left by a crash: the durable bytes, plus each pending sector kept or lost
    /// according to `keep(i)` for the i-th pending sector (in write order).
    pub fn image_with(&self, mut keep: impl FnMut(usize) -> bool) -> Vec<u8> {
        let mut img = self.durable.clone();
        let mut n = 0usize;
        for (off, data) in &self.pending {
            let mut pos = 0usize;
            while pos < data.len() {
                // Sector boundaries are absolute offsets on the device.
                let abs = *off as usize + pos;
                let len = (SECTOR - abs % SECTOR).min(data.len() - pos);
                if keep(n) {
                    // Cannot fail: offsets come from writes that succeeded on `written`.
                    let _ = write_into(&mut img, &data[pos..pos + len], abs as u64);
                }
                n += 1;
                pos += len;
            }
        }
        img
    }

    /// Only what was durable: every pending write lost.
    pub fn durable_image(&self) -> Vec<u8> {
        self.durable.clone()
    }

    /// A pseudo-random subset of pending sectors kept, reproducible from `seed`.
    pub fn image(&self, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        self.image_with(|_| {
            // xorshift64*: a tiny deterministic generator, good enough to pick sectors.
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 63 == 1
        })
    }

    /// Number of pending sectors (for exhaustive small cases).
    pub fn pending_sectors(&self) -> usize {
        let mut n = 0;
        self.image_with(|_| {
            n += 1;
            false
        });
        n
    }
}

impl BlockDevice for CrashDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_from(&self.lock().written, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_failing()?;
        let mut s = self.lock();
        write_into(&mut s.written, buf, offset)?;
        s.pending.push((offset, buf.to_vec()));
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().written.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_failing()?;
        let mut s = self.lock();
        s.written.resize(len as usize, 0);
        // A length change is treated as durable at once (files here are sized at creation).
        s.durable.resize(len as usize, 0);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.check_failing()?;
        let hook = self.hook.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(h) = hook {
            h();
        }
        let mut s = self.lock();
        // Apply the pending writes rather than copying the whole image: syncs are frequent
        // and devices in tests can be hundreds of MiB.
        let pending = std::mem::take(&mut s.pending);
        for (off, data) in pending {
            write_into(&mut s.durable, &data, off)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_writes_are_lost_and_synced_ones_kept() {
        let d = CrashDevice::new(4096);
        d.write_at(&[1; 1024], 0).unwrap();
        d.sync().unwrap();
        d.write_at(&[2; 1024], 1024).unwrap();
        let p = d.crash_point();
        let img = p.durable_image();
        assert!(img[..1024].iter().all(|&b| b == 1));
        assert!(img[1024..2048].iter().all(|&b| b == 0));
        let all = p.image_with(|_| true);
        assert!(all[1024..2048].iter().all(|&b| b == 2));
        assert_eq!(p.pending_sectors(), 2);
        // Keep only the first sector of the pending write: a torn write.
        let torn = p.image_with(|i| i == 0);
        assert!(torn[1024..1536].iter().all(|&b| b == 2));
        assert!(torn[1536..2048].iter().all(|&b| b == 0));
    }

    #[test]
    fn hook_sees_state_before_the_barrier() {
        let d = Arc::new(CrashDevice::new(1024));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (d2, s2) = (Arc::downgrade(&d), seen.clone());
        d.set_sync_hook(move || {
            if let Some(d) = d2.upgrade() {
                s2.lock().unwrap().push(d.crash_point().pending_sectors());
            }
        });
        d.write_at(&[7; 600], 0).unwrap();
        d.sync().unwrap();
        d.sync().unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![2, 0]);
    }

    #[test]
    fn failure_injection_returns_eio() {
        let d = CrashDevice::new(1024);
        d.fail_from_now();
        assert_eq!(
            d.write_at(&[1], 0).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        assert_eq!(d.sync().unwrap_err().raw_os_error(), Some(libc::EIO));
    }
}
