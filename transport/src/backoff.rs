//! The dialler's reconnect delay: exponential from 100 ms to 1 s, jittered
//! (docs/PROTOCOL.md §3).
//!
//! Each failed attempt doubles the base delay, capped at [`MAX_DELAY`]; the delay returned
//! is the base scaled by a random factor in `[1 - JITTER, 1 + JITTER]` and clamped to
//! `[MIN_DELAY, MAX_DELAY]`. The jitter keeps two nodes that lost the link at the same
//! instant (one failing switch) from retrying in lockstep against a peer that is busy
//! starting. [`Backoff::reset`] after a connection that worked.
//!
//! The random numbers come from a small SplitMix64 generator seeded by the caller, so a
//! test or a simulation gets the same delays every run; [`Backoff::new`] seeds it from the
//! process's hash randomness.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

/// First delay: short enough that a peer restarting (a daemon upgrade) is reached again
/// within a fraction of a second, long enough not to spin on a refused connection.
pub const MIN_DELAY: Duration = Duration::from_millis(100);
/// Longest delay: a peer back after an outage is found within about a second — well within
/// the sync timeout (5 s by default) for which a primary restarted after a crash waits for
/// its peer to reconcile — while a node whose peer is down sends about one handshake a
/// second (negligible).
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// Relative jitter, ±20 %: enough to desynchronise, small enough to keep the schedule.
const JITTER: f64 = 0.2;

/// Reconnect delays, exponential with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Number of delays handed out since the last reset (saturating).
    attempt: u32,
    rng: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// A backoff with a random seed.
    pub fn new() -> Self {
        Self::with_seed(RandomState::new().hash_one(0u8))
    }

    /// A backoff whose jitter is determined by `seed` (tests, simulations).
    pub fn with_seed(seed: u64) -> Self {
        Backoff {
            attempt: 0,
            rng: seed,
        }
    }

    /// The delay before the next attempt.
    #[allow(
        clippy::should_implement_trait,
        reason = "an endless sequence: an Iterator would make every caller unwrap an Option"
    )]
    pub fn next(&mut self) -> Duration {
        // 100 ms · 2^6 = 6.4 s > 1 s: past the doublings the base stays at the cap.
        let base = MIN_DELAY
            .saturating_mul(1 << self.attempt.min(6))
            .min(MAX_DELAY);
        self.attempt = self.attempt.saturating_add(1);
        // Uniform in [0, 1) from the top 53 bits.
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let factor = 1.0 - JITTER + 2.0 * JITTER * unit;
        base.mul_f64(factor).clamp(MIN_DELAY, MAX_DELAY)
    }

    /// Starts again from [`MIN_DELAY`] (call after a connection that was established).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// SplitMix64 (Steele, Lea, Flood 2014): tiny, and good enough for jitter.
    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_from_100ms_to_1s_with_jitter() {
        let mut b = Backoff::with_seed(42);
        let delays: Vec<Duration> = (0..20).map(|_| b.next()).collect();
        for d in &delays {
            assert!((MIN_DELAY..=MAX_DELAY).contains(d), "{d:?}");
        }
        // Base 100, 200, 400, 800, 1000 ms, each ±20 %.
        let bases = [100u64, 200, 400, 800, 1000];
        for (d, base) in delays.iter().zip(bases) {
            let ms = d.as_secs_f64() * 1000.0;
            assert!(
                ms >= (base as f64 * 0.8).max(100.0) - 1e-6
                    && ms <= (base as f64 * 1.2).min(1000.0) + 1e-6,
                "{ms} vs base {base}"
            );
        }
        assert!(
            delays[10..]
                .iter()
                .all(|d| *d >= Duration::from_millis(800))
        );
        // Jittered: not all equal at the cap.
        assert!(delays[10..].windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn same_seed_same_delays_and_reset() {
        let mut a = Backoff::with_seed(7);
        let mut b = Backoff::with_seed(7);
        let da: Vec<_> = (0..10).map(|_| a.next()).collect();
        let db: Vec<_> = (0..10).map(|_| b.next()).collect();
        assert_eq!(da, db);
        let mut c = Backoff::with_seed(8);
        assert_ne!(da, (0..10).map(|_| c.next()).collect::<Vec<_>>());
        a.reset();
        assert!(a.next() <= Duration::from_millis(120));
    }

    #[test]
    fn never_overflows() {
        let mut b = Backoff::with_seed(1);
        for _ in 0..10_000 {
            assert!(b.next() <= MAX_DELAY);
        }
    }
}
