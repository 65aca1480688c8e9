//! A congestion controller that keeps the bottleneck's queue short: CUBIC's window, capped
//! at what the path delivers in its base round trip plus a target queueing delay
//! (docs/PROTOCOL.md §3, "The link's queue").
//!
//! Why: a drain that saturates the link with CUBIC fills the bottleneck's queue (a router,
//! a `tc` shaper), and every small message sent meanwhile — a fetch's answer, a control
//! message — waits for the whole queue: QUIC's stream priorities order what is still in
//! the sender, not what the router holds. With the window capped, the queue stays in the
//! sender, where the fetch streams' priority applies, and the router's queue holds about
//! `target` of data.
//!
//! The cap follows the delivery rate measured over each round trip:
//! `cap = rate × (min_rtt + target)`. While the queue (smoothed round trip − minimum) is
//! shorter than `target` the round trip is below `min_rtt + target` and the cap grows; while
//! it is longer the cap shrinks (at most ÷2 a round trip). It converges where the queue
//! holds `target`. Well below the target (under half) the cap doubles each round trip, up to
//! twice what is in flight (a path with room is found as fast as slow start finds it). The
//! minimum round trip is windowed (10 s), so a path that gets longer is followed. Periods in
//! which the sender had nothing to send do not move the cap: they measure the application,
//! not the path.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics, CubicConfig};
use quinn_proto::RttEstimator;

/// The queueing delay the default controller lets the link's bottleneck hold
/// (`replication.queue_target`): a fetch's answer waits about this long behind a drain.
pub const DEFAULT_QUEUE_TARGET: Duration = Duration::from_micros(500);
/// The window never goes below this many datagrams.
const FLOOR_DATAGRAMS: u64 = 4;
/// How long one minimum round trip counts (the window of the windowed minimum is twice).
const MIN_RTT_HALF_WINDOW: Duration = Duration::from_secs(5);
/// The shortest measuring period (a round trip on loopback is tens of µs).
const MIN_PERIOD: Duration = Duration::from_millis(1);

/// The factory quinn calls for each connection.
#[derive(Debug)]
pub struct QueueBoundConfig {
    /// The queueing delay the cap aims at.
    pub target: Duration,
}

impl ControllerFactory for QueueBoundConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let inner = Arc::new(CubicConfig::default()).build(now, current_mtu);
        Box::new(QueueBound::new(inner, self.target, current_mtu))
    }
}

/// The windowed minimum of round-trip samples: the smaller of this half-window's and the
/// previous one's.
#[derive(Clone, Copy, Debug)]
struct WindowedMin {
    started: Option<Instant>,
    current: Option<Duration>,
    previous: Option<Duration>,
}

impl WindowedMin {
    fn update(&mut self, now: Instant, sample: Duration) {
        match self.started {
            Some(t) if now.saturating_duration_since(t) < MIN_RTT_HALF_WINDOW => {}
            _ => {
                self.previous = self.current.take();
                self.started = Some(now);
            }
        }
        self.current = Some(self.current.map_or(sample, |c| c.min(sample)));
    }

    fn get(&self) -> Option<Duration> {
        match (self.current, self.previous) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The cap's arithmetic, apart from quinn's types (so that the tests can drive it).
#[derive(Clone, Debug)]
struct Bound {
    target: Duration,
    mtu: u64,
    /// `None` until the first period has been measured.
    cap: Option<u64>,
    /// The smallest `now - sent` of the acknowledgements in the current batch: the newest
    /// packet's, whose acknowledgement was not held back by the batching.
    batch_sample: Option<Duration>,
    smoothed: Option<Duration>,
    min: WindowedMin,
    period_start: Option<Instant>,
    period_bytes: u64,
    period_app_limited: bool,
}

impl Bound {
    fn new(target: Duration, mtu: u16) -> Self {
        Bound {
            target,
            mtu: u64::from(mtu),
            cap: None,
            batch_sample: None,
            smoothed: None,
            min: WindowedMin {
                started: None,
                current: None,
                previous: None,
            },
            period_start: None,
            period_bytes: 0,
            period_app_limited: false,
        }
    }

    fn floor(&self) -> u64 {
        FLOOR_DATAGRAMS * self.mtu
    }

    /// The window allowed, given the inner controller's.
    fn window(&self, inner: u64) -> u64 {
        match self.cap {
            Some(cap) => inner.min(cap.max(self.floor())),
            None => inner,
        }
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool) {
        let sample = now.saturating_duration_since(sent);
        self.batch_sample = Some(self.batch_sample.map_or(sample, |s| s.min(sample)));
        self.period_bytes += bytes;
        self.period_app_limited |= app_limited;
    }

    fn on_end_acks(&mut self, now: Instant, app_limited: bool) {
        if let Some(sample) = self.batch_sample.take() {
            self.smoothed = Some(self.smoothed.map_or(sample, |s| (s * 7 + sample) / 8));
            self.min.update(now, sample);
        }
        self.period_app_limited |= app_limited;
        self.end_period(now);
    }

    /// Ends a measuring period that has lasted a round trip: the cap moves towards what
    /// the path delivered, times the base round trip plus the target.
    fn end_period(&mut self, now: Instant) {
        let Some(start) = self.period_start else {
            self.period_start = Some(now);
            return;
        };
        let (Some(smoothed), Some(min)) = (self.smoothed, self.min.get()) else {
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < smoothed.max(MIN_PERIOD) {
            return;
        }
        if !self.period_app_limited && self.period_bytes > 0 {
            let rate = self.period_bytes as f64 / elapsed.as_secs_f64();
            let want = (rate * (min + self.target).as_secs_f64()) as u64;
            let queue = smoothed.saturating_sub(min);
            let cap = match self.cap {
                None => want,
                // Well below the target: the path has room. Probe as slow start does —
                // double, but to no more than twice what is in flight, so that a cap that
                // does not limit (CUBIC's window is smaller) does not grow without end.
                Some(cap) if queue < self.target / 2 => {
                    let in_flight = (rate * smoothed.as_secs_f64()) as u64;
                    cap.saturating_mul(2)
                        .min(in_flight.saturating_mul(2))
                        .max(want)
                }
                Some(cap) => want.clamp(cap / 2, cap.saturating_mul(2)),
            };
            self.cap = Some(cap.max(self.floor()));
            tracing::trace!(
                rate_mib_s = rate / (1024.0 * 1024.0),
                min_us = min.as_micros() as u64,
                smoothed_us = smoothed.as_micros() as u64,
                cap = self.cap,
                "queue bound"
            );
        }
        self.period_start = Some(now);
        self.period_bytes = 0;
        self.period_app_limited = false;
    }
}

/// CUBIC capped by the queue bound (see the module's text).
pub struct QueueBound {
    inner: Box<dyn Controller>,
    bound: Bound,
}

impl QueueBound {
    fn new(inner: Box<dyn Controller>, target: Duration, mtu: u16) -> Self {
        QueueBound {
            inner,
            bound: Bound::new(target, mtu),
        }
    }
}

impl Clone for QueueBound {
    fn clone(&self) -> Self {
        QueueBound {
            inner: self.inner.clone_box(),
            bound: self.bound.clone(),
        }
    }
}

impl Controller for QueueBound {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
        self.bound.on_ack(now, sent, bytes, app_limited);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
        self.bound.on_end_acks(now, app_limited);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
        self.bound.mtu = u64::from(new_mtu);
    }

    fn window(&self) -> u64 {
        self.bound.window(self.inner.window())
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    const MTU: u16 = 1200;
    /// CUBIC's window after a long loss-free drain (the benchmark saw 50 MB): far above
    /// any cap.
    const INNER: u64 = 64 << 20;

    /// A sender always having data (unless `app_limited`), through a bottleneck of `rate`
    /// bytes/s with a FIFO queue, on a path of round trip `base` without the queue.
    struct Path {
        bound: Bound,
        rate: f64,
        base: Duration,
        now: Instant,
        busy_until: Instant,
        in_flight: u64,
        /// (ack arrives, sent)
        acks: VecDeque<(Instant, Instant)>,
        delivered: u64,
        /// Queueing delay of each packet sent (µs).
        queued_us: Vec<u64>,
    }

    impl Path {
        fn new(rate: f64, base: Duration, target: Duration) -> Path {
            let t0 = Instant::now();
            Path {
                bound: Bound::new(target, MTU),
                rate,
                base,
                now: t0,
                busy_until: t0,
                in_flight: 0,
                acks: VecDeque::new(),
                delivered: 0,
                queued_us: Vec::new(),
            }
        }

        /// 200 Mbit/s, a LAN's round trip, the default target: the takeover benchmark's link.
        fn lan() -> Path {
            Path::new(25e6, Duration::from_micros(100), DEFAULT_QUEUE_TARGET)
        }

        /// Runs for `d` in steps of 20 µs.
        fn run(&mut self, d: Duration, app_limited: bool) {
            let end = self.now + d;
            let step = Duration::from_micros(20);
            let mtu = u64::from(MTU);
            let serialise = Duration::from_secs_f64(mtu as f64 / self.rate);
            while self.now < end {
                self.now += step;
                let mut batch = false;
                while self.acks.front().is_some_and(|&(at, _)| at <= self.now) {
                    let (_, sent) = self.acks.pop_front().unwrap();
                    self.bound.on_ack(self.now, sent, mtu, app_limited);
                    self.in_flight -= mtu;
                    self.delivered += mtu;
                    batch = true;
                }
                if batch {
                    self.bound.on_end_acks(self.now, app_limited);
                }
                // An application-limited sender has one packet in flight at most; CUBIC's
                // window grows as in slow start (by what is acknowledged) up to INNER.
                let limit = if app_limited {
                    mtu
                } else {
                    self.bound.window((14_720 + self.delivered).min(INNER))
                };
                while self.in_flight + mtu <= limit {
                    let start = self.busy_until.max(self.now);
                    self.queued_us
                        .push(start.saturating_duration_since(self.now).as_micros() as u64);
                    self.busy_until = start + serialise;
                    self.acks.push_back((self.busy_until + self.base, self.now));
                    self.in_flight += mtu;
                }
            }
        }

        /// Bytes per second delivered and the median queueing delay over `d`.
        fn measure(&mut self, d: Duration) -> (f64, Duration) {
            let (bytes, sends) = (self.delivered, self.queued_us.len());
            self.run(d, false);
            let rate = (self.delivered - bytes) as f64 / d.as_secs_f64();
            let mut q = self.queued_us[sends..].to_vec();
            q.sort_unstable();
            (rate, Duration::from_micros(q[q.len() / 2]))
        }
    }

    #[test]
    fn the_queue_holds_about_the_target_and_the_link_stays_full() {
        // 200 Mbit/s, a LAN's round trip: the takeover benchmark's link.
        let mut p = Path::lan();
        p.run(Duration::from_secs(1), false);
        let (rate, queued) = p.measure(Duration::from_secs(1));
        assert!(rate > 0.95 * 25e6, "the link is not kept full: {rate} B/s");
        assert!(
            queued <= Duration::from_micros(800),
            "the queue holds {queued:?}, the target is 500 µs"
        );
        // With a target that bounds nothing (CUBIC's window alone), the same queue holds
        // tens of milliseconds.
        let mut unbounded = Path::new(25e6, Duration::from_micros(100), Duration::from_secs(3600));
        unbounded.run(Duration::from_secs(1), false);
        let (_, queued) = unbounded.measure(Duration::from_secs(1));
        assert!(queued > Duration::from_millis(50), "{queued:?}");
    }

    #[test]
    fn a_faster_link_is_filled_too() {
        // 10 Gbit/s, 50 µs.
        let mut p = Path::new(
            1.25e9,
            Duration::from_micros(50),
            Duration::from_micros(500),
        );
        p.run(Duration::from_millis(300), false);
        let (rate, queued) = p.measure(Duration::from_millis(200));
        assert!(rate > 0.9 * 1.25e9, "{rate} B/s");
        assert!(queued <= Duration::from_micros(800), "{queued:?}");
    }

    #[test]
    fn a_cap_that_does_not_limit_stays_near_what_is_in_flight() {
        // CUBIC's window (here 64 KB after a loss) below the cap: the cap probes to no more
        // than twice the window, so that when CUBIC grows again the queue is still bounded.
        let mut p = Path::lan();
        let mtu = u64::from(MTU);
        let mut sent_at: VecDeque<Instant> = VecDeque::new();
        for _ in 0..2000 {
            p.now += Duration::from_millis(1);
            // 64 KB a millisecond, acknowledged a millisecond later: rate 64 MB/s, no queue.
            for s in sent_at.drain(..) {
                for _ in 0..(65_536 / mtu) {
                    p.bound.on_ack(p.now, s, mtu, false);
                }
            }
            p.bound.on_end_acks(p.now, false);
            sent_at.push_back(p.now);
        }
        let cap = p.bound.cap.expect("measured");
        assert!(cap <= 2 * 65_536 + mtu * 64, "cap {cap}");
    }

    #[test]
    fn periods_with_nothing_to_send_leave_the_cap_alone() {
        let mut p = Path::lan();
        p.run(Duration::from_secs(1), false);
        let cap = p.bound.cap.expect("measured");
        p.run(Duration::from_secs(1), true);
        assert_eq!(p.bound.cap, Some(cap));
    }

    #[test]
    fn a_path_that_gets_longer_is_followed() {
        let mut p = Path::lan();
        p.run(Duration::from_secs(1), false);
        // The route changes: 20 ms round trip. Within the minimum's window (10 s) the old
        // minimum makes the longer round trip look like a queue; after it, the link is full.
        p.base = Duration::from_millis(20);
        p.run(Duration::from_secs(10), false);
        let (rate, queued) = p.measure(Duration::from_secs(1));
        assert!(rate > 0.9 * 25e6, "{rate} B/s after the path got longer");
        assert!(queued <= Duration::from_millis(1), "{queued:?}");
    }

    #[test]
    fn before_any_measurement_the_window_is_the_inner_one() {
        let b = Bound::new(Duration::from_micros(500), MTU);
        assert_eq!(b.window(123_456), 123_456);
        let mut p = Path::lan();
        p.run(Duration::from_millis(100), false);
        assert!(p.bound.window(INNER) >= FLOOR_DATAGRAMS * u64::from(MTU));
        assert!(p.bound.window(1) == 1, "never above the inner window");
    }
}
