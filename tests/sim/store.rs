//! The storage under a simulated node: a model (maps of block values and entries) or the
//! real [`Volume`] on crash-simulating devices. The simulation writes and compares block
//! *values* (`u64`); the volume store turns each into a whole block and back.

use std::collections::BTreeMap;
use std::sync::Arc;

use pairfs::crash::CrashDevice;
use pairfs::repl::{EntryMeta, WireBlock, WireEntry};
use pairfs::{BlockDevice, Seq, Transaction, Volume, VolumeId, VolumeOptions};

/// Blocks of every simulated volume.
pub(crate) const BLOCKS: u64 = 48;
/// Blocks `0..META` are metadata: always journaled, always in use once written.
pub(crate) const META: u64 = 4;

/// One write of a transaction: block, value, and whether the block was free before.
pub(crate) type Write = (u64, u64, bool);

/// How a node goes down.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Crash {
    /// `kill -9`: everything written survives (the page cache), nothing unwritten.
    Kill,
    /// Power loss: what was synced, plus an arbitrary part of the rest (from the seed).
    PowerLoss(u64),
}

/// What a simulated node stores.
pub(crate) trait Store {
    /// Commits a transaction (visible at once, durable at a later sync); `frees`: it frees
    /// blocks.
    fn commit(&mut self, writes: &[Write], frees: bool);
    /// Seals what is committed into one entry; its seq and prev, if anything was.
    fn seal(&mut self) -> Option<(Seq, Seq)>;
    /// Makes everything durable; the newest durable seq.
    fn sync(&mut self) -> Seq;
    /// Seals what is committed, then writes an entry without blocks (a copy's end); the
    /// seq of each (the first `None` if nothing was committed).
    fn marker(&mut self) -> (Option<Seq>, Seq);
    /// Checkpoints (writes journaled images to their place).
    fn checkpoint(&mut self);
    /// The periodic work of a volume (a checkpoint when due; nothing is sealed that was
    /// not already).
    fn maintain(&mut self);
    /// Entries the replication driver has not had: durable ones, or with `unsynced` every
    /// sealed one.
    fn take_entries(&mut self, unsynced: bool) -> Vec<EntryMeta>;
    /// A retained entry as it goes on the wire (`None`: released).
    fn read_entry(&self, seq: Seq) -> Option<WireEntry>;
    /// A retained entry's header: what it writes, without the data (`None`: released).
    fn header(&self, seq: Seq) -> Option<pairfs::takeover::EntryHeader>;
    /// Retained entries (metadata), oldest first.
    fn retained(&self) -> Vec<EntryMeta>;
    /// Entries up to `seq` may leave the journal.
    fn release(&mut self, seq: Seq);
    /// Marks blocks of retained entries up to `seq` (returned) and releases them now.
    fn force_release(&mut self, seq: Seq) -> Vec<u64>;
    /// Applies a replicated entry (as one of its own entries).
    fn apply(&mut self, e: &WireEntry) -> EntryMeta;
    /// Writes copy blocks straight into place.
    fn write_copy(&mut self, blocks: &[WireBlock]);
    /// Takes the primary's identity (a blank secondary).
    fn adopt(&mut self, id: VolumeId);
    /// The current value of block `b`.
    fn read(&self, b: u64) -> u64;
    /// The whole block as a copy sends it.
    fn read_block(&self, b: u64) -> Vec<u8>;
    /// Newest seq in the journal (sealed).
    fn last(&self) -> Seq;
    /// Newest durable seq.
    fn durable(&self) -> Seq;
    /// Goes down and comes back: recovery runs. Returns the newest seq it recovered.
    fn crash(&mut self, how: Crash) -> Seq;
    /// Seal entries before their blocks exceed this many bytes.
    fn limit_entries(&mut self, bytes: u64);
}

// ------------------------------------------------------------------- the model --

#[derive(Clone, Debug)]
struct ModelEntry {
    seq: Seq,
    prev: Seq,
    blocks: BTreeMap<u64, u64>,
}

/// Maps of values: the current state, the durable one, the journal's entries.
pub(crate) struct ModelStore {
    /// Committed values.
    current: BTreeMap<u64, u64>,
    /// Committed, not sealed.
    open: BTreeMap<u64, u64>,
    /// Sealed entries still retained.
    journal: BTreeMap<Seq, ModelEntry>,
    /// Values after every sealed entry, and after the durable ones only.
    sealed_state: BTreeMap<u64, u64>,
    durable_state: BTreeMap<u64, u64>,
    /// Sealed entries not yet durable, oldest first (a crash may keep a prefix).
    unsynced: Vec<ModelEntry>,
    last: Seq,
    durable: Seq,
    next: u64,
    reported: Seq,
    release_limit: Seq,
}

/// The size the model gives a block on the wire.
const MODEL_BS: usize = 8;

impl ModelStore {
    pub(crate) fn new() -> ModelStore {
        ModelStore {
            current: BTreeMap::new(),
            open: BTreeMap::new(),
            journal: BTreeMap::new(),
            sealed_state: BTreeMap::new(),
            durable_state: BTreeMap::new(),
            unsynced: Vec::new(),
            last: Seq::NONE,
            durable: Seq::NONE,
            next: 1,
            reported: Seq::NONE,
            release_limit: Seq::NONE,
        }
    }

    fn append(&mut self, seq: Seq, blocks: BTreeMap<u64, u64>) -> ModelEntry {
        let e = ModelEntry {
            seq,
            prev: self.last,
            blocks,
        };
        for (b, v) in &e.blocks {
            self.sealed_state.insert(*b, *v);
        }
        self.last = seq;
        self.next = self.next.max(seq.0 + 1);
        self.journal.insert(seq, e.clone());
        self.unsynced.push(e.clone());
        e
    }

    fn meta(e: &ModelEntry) -> EntryMeta {
        let bytes = (e.blocks.len() * MODEL_BS) as u64;
        EntryMeta {
            seq: e.seq,
            prev_seq: e.prev,
            bytes,
            journal_bytes: bytes,
            timestamp_ns: 0,
        }
    }

    fn trim(&mut self) {
        let keep = self.release_limit.min(self.durable);
        self.journal.retain(|s, _| *s > keep);
    }
}

impl Store for ModelStore {
    fn commit(&mut self, writes: &[Write], _frees: bool) {
        for &(b, v, _) in writes {
            self.current.insert(b, v);
            self.open.insert(b, v);
        }
    }

    fn seal(&mut self) -> Option<(Seq, Seq)> {
        if self.open.is_empty() {
            return None;
        }
        let blocks = std::mem::take(&mut self.open);
        let seq = Seq(self.next);
        let e = self.append(seq, blocks);
        Some((e.seq, e.prev))
    }

    fn sync(&mut self) -> Seq {
        self.seal();
        for e in std::mem::take(&mut self.unsynced) {
            for (b, v) in e.blocks {
                self.durable_state.insert(b, v);
            }
        }
        self.durable = self.last;
        self.trim();
        self.durable
    }

    fn checkpoint(&mut self) {
        self.sync();
    }

    fn maintain(&mut self) {}

    fn marker(&mut self) -> (Option<Seq>, Seq) {
        let sealed = self.seal().map(|(s, _)| s);
        let seq = Seq(self.next);
        self.append(seq, BTreeMap::new());
        (sealed, seq)
    }

    fn take_entries(&mut self, unsynced: bool) -> Vec<EntryMeta> {
        let upto = if unsynced { self.last } else { self.durable };
        if upto <= self.reported {
            return Vec::new();
        }
        let from = std::mem::replace(&mut self.reported, upto);
        self.journal
            .range(from.next()..=upto)
            .map(|(_, e)| Self::meta(e))
            .collect()
    }

    fn header(&self, seq: Seq) -> Option<pairfs::takeover::EntryHeader> {
        let e = self.journal.get(&seq)?;
        Some(pairfs::takeover::EntryHeader {
            seq: e.seq,
            prev_seq: e.prev,
            timestamp_ns: 0,
            bytes: 8 * e.blocks.len() as u64,
            blocks: e.blocks.keys().copied().collect(),
        })
    }

    fn read_entry(&self, seq: Seq) -> Option<WireEntry> {
        let e = self.journal.get(&seq)?;
        Some(WireEntry {
            seq: e.seq,
            prev_seq: e.prev,
            timestamp_ns: 0,
            blocks: e
                .blocks
                .iter()
                .map(|(&b, &v)| WireBlock {
                    block: b,
                    data: v.to_le_bytes().to_vec(),
                    fresh: false,
                })
                .collect(),
            frees: false,
        })
    }

    fn retained(&self) -> Vec<EntryMeta> {
        self.journal.values().map(Self::meta).collect()
    }

    fn release(&mut self, seq: Seq) {
        self.release_limit = self.release_limit.max(seq);
        self.trim();
    }

    fn force_release(&mut self, seq: Seq) -> Vec<u64> {
        let blocks = self
            .journal
            .range(..=seq)
            .flat_map(|(_, e)| e.blocks.keys().copied())
            .collect();
        self.release(seq);
        self.sync();
        blocks
    }

    fn apply(&mut self, e: &WireEntry) -> EntryMeta {
        assert!(self.open.is_empty(), "apply over committed changes");
        let blocks: BTreeMap<u64, u64> = e
            .blocks
            .iter()
            .map(|b| (b.block, value_of(&b.data)))
            .collect();
        for (&b, &v) in &blocks {
            self.current.insert(b, v);
        }
        let me = self.append(e.seq, blocks);
        // (The entry that ends a copy records its seq over whatever came before.)
        assert!(
            e.blocks.is_empty() || me.prev == e.prev_seq,
            "apply of {} after {}, but the journal ends at {}",
            e.seq,
            e.prev_seq,
            me.prev
        );
        self.reported = self.reported.max(e.seq);
        Self::meta(&me)
    }

    fn write_copy(&mut self, blocks: &[WireBlock]) {
        self.sync();
        for b in blocks {
            let v = value_of(&b.data);
            self.current.insert(b.block, v);
            self.sealed_state.insert(b.block, v);
            self.durable_state.insert(b.block, v);
        }
    }

    fn adopt(&mut self, _id: VolumeId) {}

    fn read(&self, b: u64) -> u64 {
        self.current.get(&b).copied().unwrap_or(0)
    }

    fn read_block(&self, b: u64) -> Vec<u8> {
        self.read(b).to_le_bytes().to_vec()
    }

    fn last(&self) -> Seq {
        self.last
    }

    fn durable(&self) -> Seq {
        self.durable
    }

    fn crash(&mut self, how: Crash) -> Seq {
        // A kill keeps every entry written; a power loss a prefix of the unsynced ones.
        let keep = match how {
            Crash::Kill => self.unsynced.len(),
            Crash::PowerLoss(seed) => (seed % (self.unsynced.len() as u64 + 1)) as usize,
        };
        let mut state = self.durable_state.clone();
        let mut last = self.durable;
        for e in &self.unsynced[..keep] {
            for (b, v) in &e.blocks {
                state.insert(*b, *v);
            }
            last = e.seq;
        }
        let lost: Vec<Seq> = self.unsynced[keep..].iter().map(|e| e.seq).collect();
        for s in lost {
            self.journal.remove(&s);
        }
        self.unsynced.clear();
        self.open.clear();
        self.current = state.clone();
        self.sealed_state = state.clone();
        self.durable_state = state;
        self.last = last;
        self.durable = last;
        self.reported = last;
        // A crash may lose a reserved range of seqs: the next ones jump.
        self.next += 1 + (self.next % 5);
        self.release_limit = Seq::NONE;
        last
    }

    fn limit_entries(&mut self, _bytes: u64) {}
}

// ------------------------------------------------------------------ the volume --

const BS: usize = 4096;
/// Journal of the simulated volumes: 256 blocks, so that an entry of every block of the
/// volume fits a quarter of it (the volume never seals an entry by itself).
const JOURNAL_BLOCKS: u64 = 256;

/// The block a value stands for: the value in every 8-byte word, each word mixed with its
/// position (so that a block torn by a crash — sectors of two versions — is no value's).
pub(crate) fn block_of(v: u64) -> Vec<u8> {
    if v == 0 {
        return vec![0u8; BS];
    }
    let mut b = Vec::with_capacity(BS);
    for i in 0..(BS / 8) as u64 {
        b.extend_from_slice(&word(v, i).to_le_bytes());
    }
    b
}

fn word(v: u64, i: u64) -> u64 {
    if i == 0 {
        v
    } else {
        v ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

/// The value a block (of either store) holds; a block that is no value's is reported as
/// `u64::MAX` (so a comparison fails loudly). One word of every 512-byte sector is checked:
/// a crash tears blocks at sector boundaries.
pub(crate) fn value_of(data: &[u8]) -> u64 {
    let at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&data[i * 8..i * 8 + 8]);
        u64::from_le_bytes(a)
    };
    let v = at(0);
    if data.len() == 8 {
        return v;
    }
    let words_per_sector = pairfs::crash::SECTOR / 8;
    let whole = (0..data.len() / 8).step_by(words_per_sector).all(|i| {
        let last = i + words_per_sector - 1;
        let want = |j: usize| if v == 0 { 0 } else { word(v, j as u64) };
        at(i) == want(i) && at(last) == want(last)
    });
    if whole { v } else { u64::MAX }
}

/// The real [`Volume`] on two crash-simulating devices.
pub(crate) struct VolumeStore {
    normal: Arc<CrashDevice>,
    journal: Arc<CrashDevice>,
    opts: VolumeOptions,
    v: Volume,
}

impl VolumeStore {
    /// A formatted, empty volume with identity `id`. `evacuation`: bytes of overwritten,
    /// unsent in-place data it may keep aside.
    pub(crate) fn new(id: VolumeId, evacuation: u64) -> VolumeStore {
        let normal = Arc::new(CrashDevice::new(BLOCKS * BS as u64));
        let journal = Arc::new(CrashDevice::new(JOURNAL_BLOCKS * BS as u64));
        Volume::create(&*normal, &*journal, id, BS as u32).expect("create");
        let opts = VolumeOptions {
            retain: true,
            // Runs of two fresh blocks go in place: both paths run.
            inplace_min_blocks: 2,
            // The simulation decides when to seal and to sync.
            commit_interval: std::time::Duration::from_secs(3600),
            checkpoint_bytes: 6 * BS as u64,
            checkpoint_inplace_bytes: 12 * BS as u64,
            evacuation_limit: evacuation,
            ..VolumeOptions::default()
        };
        let v = Self::open(&normal, &journal, &opts);
        VolumeStore {
            normal,
            journal,
            opts,
            v,
        }
    }

    fn open(n: &Arc<CrashDevice>, j: &Arc<CrashDevice>, opts: &VolumeOptions) -> Volume {
        Volume::open(Box::new(n.clone()), Box::new(j.clone()), opts.clone())
            .unwrap_or_else(|e| panic!("recovery failed: {e}"))
    }
}

impl Store for VolumeStore {
    fn commit(&mut self, writes: &[Write], frees: bool) {
        let mut tx = Transaction::new();
        if frees {
            tx.frees_blocks();
        }
        // Data as runs of consecutive blocks, fresh or not, as the filesystem writes them.
        let mut run: Vec<(u64, u64)> = Vec::new();
        let mut run_fresh = false;
        let flush = |tx: &mut Transaction<'_>, run: &mut Vec<(u64, u64)>, fresh: bool| {
            if let Some(&(start, _)) = run.first() {
                let data: Vec<u8> = run.iter().flat_map(|&(_, v)| block_of(v)).collect();
                tx.write_data(start, data, fresh);
                run.clear();
            }
        };
        for &(b, v, fresh) in writes {
            if b < META {
                tx.write_meta(b, Arc::from(block_of(v)));
                continue;
            }
            if run.last().is_some_and(|&(l, _)| l + 1 != b)
                || (!run.is_empty() && run_fresh != fresh)
            {
                flush(&mut tx, &mut run, run_fresh);
            }
            run_fresh = fresh;
            run.push((b, v));
        }
        flush(&mut tx, &mut run, run_fresh);
        self.v.commit(tx).expect("commit");
    }

    fn seal(&mut self) -> Option<(Seq, Seq)> {
        let before = self.v.journal().last_seq();
        let after = self.v.seal_open().expect("seal");
        (after != before).then_some((after, before))
    }

    fn sync(&mut self) -> Seq {
        self.v.sync().expect("sync");
        self.v.journal().durable_seq()
    }

    fn checkpoint(&mut self) {
        self.v.checkpoint().expect("checkpoint");
    }

    fn maintain(&mut self) {
        self.v
            .maintain(std::time::Instant::now())
            .expect("maintain");
    }

    fn marker(&mut self) -> (Option<Seq>, Seq) {
        let before = self.v.journal().last_seq();
        let sealed = self.v.seal_open().expect("seal");
        let m = self.v.append_marker().expect("marker");
        ((sealed != before).then_some(sealed), m)
    }

    fn take_entries(&mut self, unsynced: bool) -> Vec<EntryMeta> {
        self.v.take_entries(unsynced)
    }

    fn header(&self, seq: Seq) -> Option<pairfs::takeover::EntryHeader> {
        match self.v.entry_header(seq) {
            Ok(h) => Some(h),
            Err(pairfs::VolumeError::EntryGone { .. }) => None,
            Err(e) => panic!("reading the header of entry {seq}: {e}"),
        }
    }

    fn read_entry(&self, seq: Seq) -> Option<WireEntry> {
        match self.v.read_wire_entry(seq) {
            Ok(e) => Some(e),
            Err(
                pairfs::VolumeError::EntryGone { .. } | pairfs::VolumeError::InPlaceChanged { .. },
            ) => None,
            Err(e) => panic!("reading entry {seq}: {e}"),
        }
    }

    fn retained(&self) -> Vec<EntryMeta> {
        self.v.retained_entries()
    }

    fn release(&mut self, seq: Seq) {
        self.v.set_release_limit(seq);
    }

    fn force_release(&mut self, seq: Seq) -> Vec<u64> {
        let blocks = self.v.retained_blocks(seq).expect("retained blocks");
        self.v.force_release(seq).expect("force release");
        blocks
    }

    fn apply(&mut self, e: &WireEntry) -> EntryMeta {
        // Wire blocks of the model are 8 bytes; the simulation sends whole blocks here.
        self.v.apply_replicated(e).expect("apply")
    }

    fn write_copy(&mut self, blocks: &[WireBlock]) {
        self.v.write_copy_blocks(blocks).expect("copy");
    }

    fn adopt(&mut self, id: VolumeId) {
        self.v.adopt_id(id).expect("adopt");
    }

    fn read(&self, b: u64) -> u64 {
        value_of(&self.read_block(b))
    }

    fn read_block(&self, b: u64) -> Vec<u8> {
        let mut buf = vec![0u8; BS];
        self.v.read_current(b, &mut buf).expect("read");
        buf
    }

    fn last(&self) -> Seq {
        self.v.journal().last_seq()
    }

    fn durable(&self) -> Seq {
        self.v.journal().durable_seq()
    }

    fn crash(&mut self, how: Crash) -> Seq {
        let image = |d: &CrashDevice| match how {
            Crash::Kill => d.written(),
            Crash::PowerLoss(seed) => d.crash_point().image(seed),
        };
        let n = Arc::new(CrashDevice::from_bytes(image(&self.normal)));
        let j = Arc::new(CrashDevice::from_bytes(image(&self.journal)));
        // (The old volume is dropped without closing: a crash writes nothing more.)
        self.v = Self::open(&n, &j, &self.opts);
        self.normal = n;
        self.journal = j;
        let _ = self.normal.len();
        self.v.journal().last_seq()
    }

    fn limit_entries(&mut self, bytes: u64) {
        self.v.set_max_entry_wire_bytes(bytes);
    }
}
