//! Deterministic simulation of a replicated pair (STYLE.md "Sans-IO core";
//! docs/PROTOCOL.md §6): two `Replicator`s with model volumes and journals, a network that
//! drops, duplicates and reorders entries and acks, breaks connections and partitions, and
//! node crashes at any step. After every step the invariants are checked:
//!
//! - I1: a consistent secondary equals the primary's state after exactly the entries up to
//!   its applied seq;
//! - I2: the secondary's applied seq never goes backwards, across crashes too;
//! - I3: in sync mode, nothing acknowledged to a writer is missing on the secondary;
//! - at the end, with the network healed, the pair converges (same data, state `pair`).
//!
//! `PAIRFS_SIM_SEEDS` (default 2000) seeds run; a failure prints its seed, and
//! `PAIRFS_SIM_SEED=n` replays exactly that one, with a trace of every step.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use pairfs::repl::{
    Action, Backlog, Backpressure, CopyKind, EntryMeta, Message, Mode, PairState, PersistedState,
    ReplConfig, Replicator, Stream, WireBlock, WireEntry,
};
use pairfs::{Seq, VolumeId};

const BLOCKS: u64 = 48;
const BS: usize = 8;

/// How often each interesting path ran, over all seeds (so the test cannot pass without
/// exercising them).
#[derive(Default, Debug, Clone, Copy)]
struct Coverage {
    full_copies: u64,
    bitmap_copies: u64,
    copies_completed: u64,
    bitmap_fallbacks: u64,
    applies: u64,
    drops: u64,
    dups: u64,
    reorders: u64,
    crashes: u64,
    sync_acks: u64,
    unavailable: u64,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

type Blocks = BTreeMap<u64, Vec<u8>>;

#[derive(Clone, Debug)]
struct ModelEntry {
    seq: Seq,
    prev: Seq,
    blocks: Vec<(u64, Vec<u8>)>,
}

struct Primary {
    repl: Replicator,
    persisted: PersistedState,
    /// Durable entries still in the journal.
    journal: BTreeMap<Seq, ModelEntry>,
    /// State after every durable entry.
    volume: Blocks,
    durable: Seq,
    /// Committed, not yet durable.
    pending: Vec<Vec<(u64, Vec<u8>)>>,
    next_seq: u64,
    bitmap: BTreeSet<u64>,
    copy: Option<VecDeque<u64>>,
    copy_total: u64,
    copy_id: u64,
    /// Sync mode: the peer acknowledged everything up to this seq.
    acked: Seq,
}

struct Secondary {
    repl: Replicator,
    persisted: PersistedState,
    volume: Blocks,
    applied: Seq,
    volume_id: VolumeId,
    /// Applies handed out, carried out in order at later steps (a slow disk), lost in a
    /// crash: `Ok` an entry, `Err` copy blocks.
    applying: VecDeque<Result<WireEntry, Vec<WireBlock>>>,
}

struct Sim {
    rng: Rng,
    now: Instant,
    mode: Mode,
    p: Primary,
    s: Secondary,
    /// Every durable primary entry ever, for the prefix oracle.
    history: BTreeMap<Seq, ModelEntry>,
    connected: bool,
    partitioned: bool,
    /// Per direction (0: p→s, 1: s→p) and stream (0: control, 1: replication).
    queues: [[VecDeque<Message>; 2]; 2],
    faults: bool,
    max_applied: Seq,
    trace: bool,
    journal_limit: u64,
    cov: Coverage,
}

fn cfg(node: &str, volume: VolumeId, mode: Mode, limit: u64) -> ReplConfig {
    let mut c = ReplConfig::new(node, volume, BS as u32, BLOCKS);
    c.mode = mode;
    c.journal_limit = limit;
    c.window_bytes = 20 * BS as u64;
    c.resend_after = Duration::from_millis(300);
    c.max_out_of_order = 8;
    c
}

const PVOL: VolumeId = VolumeId([7; 16]);

impl Sim {
    fn new(seed: u64, trace: bool) -> Sim {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mode = if rng.chance(50) {
            Mode::Sync
        } else {
            Mode::Async
        };
        // Small limits make the bitmap fallback frequent.
        let journal_limit = [12, 60, 100_000][rng.below(3) as usize] * BS as u64;
        Sim::with(rng, trace, mode, journal_limit, |_| {})
    }

    /// A simulation with this mode and journal limit; `tune` adjusts both nodes' config.
    fn with(
        rng: Rng,
        trace: bool,
        mode: Mode,
        journal_limit: u64,
        tune: impl Fn(&mut ReplConfig),
    ) -> Sim {
        let mut rng = rng;
        let config = |node: &str, volume: VolumeId| {
            let mut c = cfg(node, volume, mode, journal_limit);
            tune(&mut c);
            c
        };
        let pp = PersistedState::new_primary(rng.next());
        let sp = PersistedState::new_secondary();
        Sim {
            now: Instant::now(),
            mode,
            p: Primary {
                repl: Replicator::new(config("a", PVOL), pp.clone(), vec![], Seq::NONE),
                persisted: pp,
                journal: BTreeMap::new(),
                volume: BTreeMap::new(),
                durable: Seq::NONE,
                pending: Vec::new(),
                next_seq: 1,
                bitmap: BTreeSet::new(),
                copy: None,
                copy_total: 0,
                copy_id: 0,
                acked: Seq::NONE,
            },
            s: Secondary {
                repl: Replicator::new(
                    config("b", VolumeId::default()),
                    sp.clone(),
                    vec![],
                    Seq::NONE,
                ),
                persisted: sp,
                volume: BTreeMap::new(),
                applied: Seq::NONE,
                volume_id: VolumeId::default(),
                applying: VecDeque::new(),
            },
            history: BTreeMap::new(),
            connected: false,
            partitioned: false,
            queues: Default::default(),
            faults: true,
            max_applied: Seq::NONE,
            trace,
            journal_limit,
            cov: Coverage::default(),
            rng,
        }
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("  {}", what());
        }
    }

    fn state_at(&self, seq: Seq) -> Blocks {
        let mut v = Blocks::new();
        for e in self.history.range(..=seq).map(|(_, e)| e) {
            for (b, d) in &e.blocks {
                v.insert(*b, d.clone());
            }
        }
        v
    }

    // ------------------------------------------------------------ drivers --

    fn run_actions(&mut self) {
        loop {
            let mut did = false;
            while let Some(a) = self.p.repl.poll_action() {
                did = true;
                self.primary_action(a);
            }
            while let Some(a) = self.s.repl.poll_action() {
                did = true;
                self.secondary_action(a);
            }
            if !did {
                break;
            }
        }
    }

    fn enqueue(&mut self, dir: usize, m: Message) {
        if !self.connected {
            return;
        }
        let stream = match m.stream() {
            Stream::Control => 0,
            Stream::Replication => 1,
        };
        self.queues[dir][stream].push_back(m);
    }

    fn primary_action(&mut self, a: Action) {
        self.log(|| format!("P action {}", short(&a)));
        match a {
            Action::Send(m) => self.enqueue(0, m),
            Action::SendEntry(meta) if self.faults && self.rng.chance(1) => {
                // The entry's in-place data was overwritten before it could be sent.
                self.log(|| format!("entry {} unavailable", meta.seq));
                self.cov.unavailable += 1;
                self.p.repl.handle_entry_unavailable(meta.seq);
            }
            Action::SendEntry(meta) => {
                let e = self.p.journal.get(&meta.seq).unwrap_or_else(|| {
                    panic!("SendEntry({}) for an entry not in the journal", meta.seq)
                });
                let entry = WireEntry {
                    seq: e.seq,
                    prev_seq: e.prev,
                    timestamp_ns: 0,
                    blocks: e
                        .blocks
                        .iter()
                        .map(|(b, d)| WireBlock {
                            block: *b,
                            data: d.clone(),
                            fresh: false,
                        })
                        .collect(),
                };
                let epoch = self.p.persisted.epoch;
                self.enqueue(0, Message::Entry { epoch, entry });
            }
            Action::StartCopy { kind, id } => {
                match kind {
                    CopyKind::Full => self.cov.full_copies += 1,
                    CopyKind::Bitmap => self.cov.bitmap_copies += 1,
                }
                self.p.copy_id = id;
                let blocks: VecDeque<u64> = match kind {
                    CopyKind::Full => self.p.volume.keys().copied().collect(),
                    CopyKind::Bitmap => self.p.bitmap.iter().copied().collect(),
                };
                self.p.copy_total = blocks.len() as u64;
                self.p.copy = Some(blocks);
            }
            Action::StopCopy => self.p.copy = None,
            Action::Release(seq) => {
                self.p.journal.retain(|s, _| *s > seq);
            }
            Action::MarkBitmap(seq) => {
                self.cov.bitmap_fallbacks += 1;
                let marked: Vec<Seq> = self.p.journal.range(..=seq).map(|(s, _)| *s).collect();
                for s in marked {
                    let e = self.p.journal.remove(&s).unwrap();
                    for (b, _) in e.blocks {
                        self.p.bitmap.insert(b);
                    }
                }
            }
            Action::ClearBitmap => {
                self.cov.copies_completed += 1;
                self.p.bitmap.clear();
            }
            Action::Persist(st) => self.p.persisted = st,
            Action::Acked(seq) => {
                self.cov.sync_acks += 1;
                self.p.acked = self.p.acked.max(seq);
            }
            Action::Disconnect(reason) => {
                panic!("primary disconnected unexpectedly: {reason}");
            }
            a @ (Action::Apply(_) | Action::ApplyCopy(_) | Action::AdoptVolume(_)) => {
                panic!("secondary action on the primary: {a:?}")
            }
        }
    }

    fn secondary_action(&mut self, a: Action) {
        self.log(|| format!("S action {}", short(&a)));
        match a {
            Action::Send(m) => self.enqueue(1, m),
            Action::Apply(e) => self.s.applying.push_back(Ok(e)),
            Action::ApplyCopy(blocks) => self.s.applying.push_back(Err(blocks)),
            Action::AdoptVolume(v) => self.s.volume_id = v,
            Action::Persist(st) => self.s.persisted = st,
            Action::Disconnect(reason) => {
                panic!("secondary disconnected unexpectedly: {reason}");
            }
            a => panic!("primary action on the secondary: {a:?}"),
        }
    }

    // ---------------------------------------------------------------- steps --

    fn commit(&mut self) {
        let n = 1 + self.rng.below(3);
        let mut blocks = Vec::new();
        for _ in 0..n {
            let b = self.rng.below(BLOCKS);
            let v = self.rng.next().to_le_bytes().to_vec();
            blocks.retain(|(x, _): &(u64, Vec<u8>)| *x != b);
            blocks.push((b, v));
        }
        self.p.pending.push(blocks);
    }

    fn make_durable(&mut self) {
        for blocks in std::mem::take(&mut self.p.pending) {
            let seq = Seq(self.p.next_seq);
            self.p.next_seq += 1;
            let e = ModelEntry {
                seq,
                prev: self.p.durable,
                blocks,
            };
            for (b, d) in &e.blocks {
                self.p.volume.insert(*b, d.clone());
            }
            self.p.durable = seq;
            self.history.insert(seq, e.clone());
            self.p.journal.insert(seq, e.clone());
            let bytes = (e.blocks.len() * BS) as u64;
            self.log(|| format!("P durable {seq}"));
            self.p.repl.handle_local_entry(EntryMeta {
                seq,
                prev_seq: e.prev,
                bytes,
                journal_bytes: bytes,
                timestamp_ns: 0,
            });
            self.run_actions();
        }
    }

    fn copy_step(&mut self) {
        let Some(q) = self.p.copy.as_mut() else {
            return;
        };
        let mut blocks = Vec::new();
        for _ in 0..3 {
            if let Some(b) = q.pop_front() {
                blocks.push(WireBlock {
                    block: b,
                    data: self
                        .p
                        .volume
                        .get(&b)
                        .cloned()
                        .unwrap_or_else(|| vec![0; BS]),
                    fresh: false,
                });
            }
        }
        let left = q.len() as u64;
        let epoch = self.p.persisted.epoch;
        if !blocks.is_empty() {
            self.enqueue(0, Message::CopyBlocks { epoch, blocks });
        }
        let total = self.p.copy_total;
        self.p.repl.handle_copy_progress(total - left, total);
        if left == 0 {
            self.p.copy = None;
            let id = self.p.copy_id;
            // Seal: every copied block reflects a state at or before the newest durable seq.
            // (Sealing may itself restart the copy: then this one is superseded.)
            self.make_durable();
            let newest = self.p.durable;
            self.p.repl.handle_copy_sent(id, newest);
        }
        self.run_actions();
    }

    fn deliver(&mut self) {
        let mut nonempty = Vec::new();
        for d in 0..2 {
            for st in 0..2 {
                if !self.queues[d][st].is_empty() {
                    nonempty.push((d, st));
                }
            }
        }
        if nonempty.is_empty() {
            return;
        }
        let (d, st) = nonempty[self.rng.below(nonempty.len() as u64) as usize];
        let m = self.queues[d][st].pop_front().unwrap();
        let fault_ok = self.faults && matches!(m, Message::Entry { .. } | Message::Ack { .. });
        if fault_ok && self.rng.chance(5) {
            self.log(|| format!("drop {}", short_msg(&m)));
            self.cov.drops += 1;
            return;
        }
        if fault_ok && self.rng.chance(5) {
            self.log(|| format!("dup {}", short_msg(&m)));
            self.cov.dups += 1;
            self.queues[d][st].push_back(m.clone());
        }
        if fault_ok && self.rng.chance(5) && !self.queues[d][st].is_empty() {
            // Reorder: let the next message overtake this one.
            self.log(|| format!("reorder {}", short_msg(&m)));
            self.cov.reorders += 1;
            let pos = 1 + self.rng.below(self.queues[d][st].len() as u64) as usize;
            let pos = pos.min(self.queues[d][st].len());
            self.queues[d][st].insert(pos, m);
            return;
        }
        self.log(|| {
            format!(
                "deliver {} {}",
                if d == 0 { "P→S" } else { "S→P" },
                short_msg(&m)
            )
        });
        let now = self.now;
        if d == 0 {
            self.s.repl.handle_message(m, now);
        } else {
            self.p.repl.handle_message(m, now);
        }
        self.run_actions();
    }

    fn finish_apply(&mut self) {
        let e = match self.s.applying.pop_front() {
            None => return,
            Some(Err(blocks)) => {
                for b in blocks {
                    self.s.volume.insert(b.block, b.data);
                }
                return;
            }
            Some(Ok(e)) => e,
        };
        assert!(
            e.blocks.is_empty() || e.prev_seq == self.s.applied,
            "apply of {} after {}, expected prev {}",
            e.seq,
            self.s.applied,
            e.prev_seq
        );
        for b in e.blocks {
            self.s.volume.insert(b.block, b.data);
        }
        self.s.applied = e.seq;
        self.cov.applies += 1;
        self.log(|| format!("S applied {}", e.seq));
        self.s.repl.handle_applied(e.seq);
        self.run_actions();
    }

    fn disconnect(&mut self) {
        if self.connected {
            self.log(|| "disconnect".into());
            self.connected = false;
            self.queues = Default::default();
            self.p.repl.handle_disconnected();
            self.s.repl.handle_disconnected();
            self.run_actions();
        }
    }

    fn connect(&mut self) {
        if !self.connected && !self.partitioned {
            self.log(|| "connect".into());
            self.connected = true;
            let now = self.now;
            self.p.repl.handle_connected(now);
            self.s.repl.handle_connected(now);
            self.run_actions();
        }
    }

    fn crash_primary(&mut self) {
        self.log(|| "CRASH primary".into());
        self.cov.crashes += 1;
        self.disconnect();
        self.p.pending.clear();
        self.p.copy = None;
        // A crash may lose a reserved range of seqs: the next ones jump.
        self.p.next_seq += 1 + self.rng.below(5);
        let retained: Vec<EntryMeta> = self
            .p
            .journal
            .values()
            .map(|e| EntryMeta {
                seq: e.seq,
                prev_seq: e.prev,
                bytes: (e.blocks.len() * BS) as u64,
                journal_bytes: (e.blocks.len() * BS) as u64,
                timestamp_ns: 0,
            })
            .collect();
        self.p.repl = Replicator::new(
            cfg("a", PVOL, self.mode, self.journal_limit),
            self.p.persisted.clone(),
            retained,
            self.p.durable,
        );
        self.run_actions();
    }

    fn crash_secondary(&mut self) {
        self.log(|| "CRASH secondary".into());
        self.cov.crashes += 1;
        self.disconnect();
        self.s.applying.clear();
        self.s.repl = Replicator::new(
            cfg("b", self.s.volume_id, self.mode, self.journal_limit),
            self.s.persisted.clone(),
            vec![],
            self.s.applied,
        );
        self.run_actions();
    }

    fn check(&mut self) {
        assert!(self.s.applied >= self.max_applied, "I2: applied went back");
        self.max_applied = self.s.applied;
        let consistent = self.s.persisted.inconsistent_until.is_none() && !self.s.persisted.empty;
        if consistent {
            let want = self.state_at(self.s.applied);
            if self.s.volume != want {
                let diff: Vec<_> = (0..BLOCKS)
                    .filter(|b| self.s.volume.get(b) != want.get(b))
                    .map(|b| (b, self.s.volume.get(&b).cloned(), want.get(&b).cloned()))
                    .collect();
                panic!(
                    "I1: secondary at seq {} differs from the primary's state at that seq: \
                     (block, secondary, primary) {diff:?}",
                    self.s.applied
                );
            }
        }
        if self.mode == Mode::Sync {
            assert!(
                self.s.applied >= self.p.acked,
                "I3: sync ack for seq {} but the secondary has only {}",
                self.p.acked,
                self.s.applied
            );
        }
        assert!(
            self.p.durable >= self.s.applied,
            "secondary ahead of the primary"
        );
    }

    fn step(&mut self) {
        let r = self.rng.below(1000);
        match r {
            0..=199 => self.commit(),
            200..=299 => self.make_durable(),
            300..=649 => self.deliver(),
            650..=779 => self.finish_apply(),
            780..=859 => self.copy_step(),
            860..=879 => self.disconnect(),
            880..=939 => self.connect(),
            940..=949 => {
                self.partitioned = !self.partitioned;
                self.log(|| format!("partitioned = {}", self.partitioned));
                if self.partitioned {
                    self.disconnect();
                }
            }
            950..=954 => self.crash_primary(),
            955..=959 => self.crash_secondary(),
            _ => {
                self.now += Duration::from_millis(self.rng.below(400));
                let now = self.now;
                self.p.repl.handle_timeout(now);
                self.run_actions();
            }
        }
        self.check();
    }

    /// Heals everything and runs until nothing moves; the pair must then be in sync.
    fn converge(&mut self) {
        self.faults = false;
        self.partitioned = false;
        self.make_durable();
        for _ in 0..100_000 {
            self.connect();
            let busy = self.queues.iter().flatten().any(|q| !q.is_empty())
                || !self.s.applying.is_empty()
                || self.p.copy.is_some();
            if !busy {
                self.now += Duration::from_secs(3);
                let now = self.now;
                self.p.repl.handle_timeout(now);
                self.run_actions();
                if !self.queues.iter().flatten().any(|q| !q.is_empty()) {
                    break;
                }
            }
            if self.p.copy.is_some() {
                self.copy_step();
            }
            self.deliver();
            self.finish_apply();
            self.check();
        }
        let st = self.s.repl.status();
        assert_eq!(
            self.s.applied,
            self.p.durable,
            "did not converge: {st:?} / {:?}",
            self.p.repl.status()
        );
        assert_eq!(
            self.s.volume, self.p.volume,
            "converged with different data"
        );
        assert_eq!(st.state, PairState::Pair);
        assert!(!st.inconsistent);
        assert_eq!(self.p.repl.status().state, PairState::Pair);
        assert_eq!(self.p.persisted.backlog, Backlog::Journal);
    }
}

fn short(a: &Action) -> String {
    match a {
        Action::Send(m) => format!("Send({})", short_msg(m)),
        Action::Apply(e) => format!(
            "Apply({} after {}, {} blocks)",
            e.seq,
            e.prev_seq,
            e.blocks.len()
        ),
        Action::ApplyCopy(b) => format!("ApplyCopy({} blocks)", b.len()),
        a => format!("{a:?}"),
    }
}

fn short_msg(m: &Message) -> String {
    match m {
        Message::Entry { entry, .. } => format!("Entry({} after {})", entry.seq, entry.prev_seq),
        Message::CopyBlocks { blocks, .. } => format!("CopyBlocks({})", blocks.len()),
        Message::Hello(h) => format!(
            "Hello({:?}, applied {}, last {})",
            h.role, h.applied, h.last_seq
        ),
        m => format!("{m:?}"),
    }
}

fn run_seed(seed: u64, trace: bool) -> Coverage {
    let mut sim = Sim::new(seed, trace);
    let steps = 300 + sim.rng.below(500);
    for _ in 0..steps {
        sim.step();
    }
    sim.converge();
    sim.cov
}

#[test]
fn simulated_pair_keeps_its_invariants() {
    if let Ok(s) = std::env::var("PAIRFS_SIM_SEED") {
        let seed: u64 = s.parse().expect("PAIRFS_SIM_SEED must be a number");
        run_seed(seed, true);
        return;
    }
    let seeds: u64 = std::env::var("PAIRFS_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let mut total = Coverage::default();
    for seed in 0..seeds {
        match std::panic::catch_unwind(|| run_seed(seed, false)) {
            Ok(c) => {
                total.full_copies += c.full_copies;
                total.bitmap_copies += c.bitmap_copies;
                total.copies_completed += c.copies_completed;
                total.bitmap_fallbacks += c.bitmap_fallbacks;
                total.applies += c.applies;
                total.drops += c.drops;
                total.dups += c.dups;
                total.reorders += c.reorders;
                total.crashes += c.crashes;
                total.sync_acks += c.sync_acks;
                total.unavailable += c.unavailable;
            }
            Err(_) => {
                panic!("simulation failed for seed {seed}: replay with PAIRFS_SIM_SEED={seed}")
            }
        }
    }
    eprintln!("{seeds} seeds: {total:?}");
    if seeds >= 1000 {
        // Every path must have run many times, or the seeds are not exploring.
        let c = total;
        for (what, n) in [
            ("full copies", c.full_copies),
            ("bitmap copies", c.bitmap_copies),
            ("completed copies", c.copies_completed),
            ("bitmap fallbacks", c.bitmap_fallbacks),
            ("applies", c.applies),
            ("drops", c.drops),
            ("duplicates", c.dups),
            ("reorders", c.reorders),
            ("crashes", c.crashes),
            ("sync acks", c.sync_acks),
        ] {
            assert!(n >= seeds / 10, "only {n} {what} in {seeds} seeds");
        }
        assert!(
            c.unavailable >= seeds / 50,
            "only {} unavailable entries in {seeds} seeds",
            c.unavailable
        );
    }
}

/// An async pair streaming with `max_lag` = 400 ms, the peer having received (not yet
/// applied) twelve one-block entries (BS bytes each).
fn streaming_with_a_backlog_of_12() -> Sim {
    let mut sim = Sim::with(Rng(7), false, Mode::Async, 1 << 20, |c| {
        c.max_lag = Some(Duration::from_millis(400));
        c.window_bytes = 1 << 20;
        c.max_out_of_order = 64; // the whole backlog waits at the peer, none is resent
    });
    sim.faults = false;
    // A first entry: the initial copy completes when the peer has applied past it.
    sim.p.pending.push(vec![(0, vec![9; BS])]);
    sim.make_durable();
    sim.connect();
    for _ in 0..1000 {
        if sim.p.repl.status().state == PairState::Pair {
            break;
        }
        if sim.p.copy.is_some() {
            sim.copy_step();
        } else {
            sim.now += Duration::from_secs(3);
            let now = sim.now;
            sim.p.repl.handle_timeout(now);
            sim.run_actions();
        }
        sim.deliver();
        sim.finish_apply();
    }
    assert_eq!(sim.p.repl.status().state, PairState::Pair);
    deliver_all(&mut sim);
    for _ in 0..12 {
        sim.p.pending.push(vec![(1, vec![1; BS])]);
        sim.make_durable();
    }
    deliver_all(&mut sim);
    sim
}

fn deliver_all(sim: &mut Sim) {
    while sim.queues.iter().flatten().any(|q| !q.is_empty()) {
        sim.deliver();
    }
}

/// The peer applies one entry after `dt`; returns the backpressure then (`None`: no
/// backlog left).
fn apply_one_after(sim: &mut Sim, dt: Duration) -> Option<Backpressure> {
    sim.now += dt;
    sim.finish_apply();
    deliver_all(sim);
    sim.p.repl.backpressure()
}

/// `max_lag` bounds the lag of every write, not only the oldest entry's age: once the
/// peer's apply rate is measured, writers are held while the backlog (and what is
/// committed but not sealed yet) would take longer than `max_lag` to apply, even when its
/// oldest entry is still young — and let go once it would not.
#[test]
fn writers_are_held_while_the_backlog_would_take_longer_than_max_lag_to_apply() {
    let mut sim = streaming_with_a_backlog_of_12();
    let bp = sim
        .p
        .repl
        .backpressure()
        .expect("streaming with max_lag set");
    assert_eq!(bp.drain_rate, 0, "nothing applied yet: rate unknown");
    assert_eq!(bp.bytes, 12 * BS as u64);
    // Age 0 (the model's timestamps are 0): with the rate unknown, only the age counts.
    assert!(!bp.exceeded(0, 0));
    assert!(bp.exceeded(400_000_001, 0));
    // The peer applies one entry per 100 ms.
    let mut held = Vec::new();
    for _ in 0..12 {
        let Some(bp) = apply_one_after(&mut sim, Duration::from_millis(100)) else {
            break;
        };
        held.push((
            bp.bytes / BS as u64,
            bp.drain_rate,
            bp.exceeded(0, 0),
            bp.exceeded(0, BS as u64),
        ));
    }
    assert_eq!(held.len(), 11, "{held:?}");
    // The first ack only starts the measurement; the first sample spans at least 250 ms
    // of acks (three more); from then on the rate is BS per 100 ms, and a backlog of n
    // entries takes n × 100 ms, held to 3/4 of 400 ms: held while n > 3, or n > 2 with one
    // more block committed.
    let want_rate = (BS * 10) as u64;
    assert!(held[..3].iter().all(|h| h.1 == 0), "{held:?}");
    for &(n, rate, exceeded, exceeded_open) in &held[3..] {
        assert!(
            rate.abs_diff(want_rate) <= 1,
            "rate {rate}, expected {want_rate}: {held:?}"
        );
        assert_eq!(exceeded, n > 3, "{n} entries left: {held:?}");
        assert_eq!(exceeded_open, n > 2, "{n} entries left, one open: {held:?}");
    }
    assert!(
        held.iter().any(|h| h.2) && held.iter().any(|h| !h.2),
        "{held:?}"
    );
}

/// Acks come in bursts: the rate is never estimated from less than 250 ms of them, so two
/// entries applied 10 ms apart do not make a peer that applies one per 100 ms look ten
/// times as fast (writers would then run far past `max_lag`).
#[test]
fn a_burst_of_acks_does_not_set_the_drain_rate() {
    let mut sim = streaming_with_a_backlog_of_12();
    let ms = Duration::from_millis;
    apply_one_after(&mut sim, ms(100)); // starts the measurement
    let bp = apply_one_after(&mut sim, ms(10)).expect("backlog left");
    assert_eq!(bp.drain_rate, 0, "10 ms of acks: no estimate yet");
    let mut rates = Vec::new();
    for _ in 0..10 {
        let Some(bp) = apply_one_after(&mut sim, ms(190)) else {
            break;
        };
        rates.push(bp.drain_rate);
    }
    // True rate: BS per 100 ms over the first 200 ms, then BS per 190 ms.
    let (fast, slow) = ((BS * 10) as u64, (BS as f64 / 0.19) as u64);
    assert_eq!(rates[0], 0, "200 ms of acks: no estimate yet: {rates:?}");
    assert!(
        rates[1..].iter().all(|&r| r >= slow * 9 / 10 && r <= fast),
        "rates {rates:?} outside [{slow}, {fast}]"
    );
}
