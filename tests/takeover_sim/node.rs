//! A simulated node: its replicator, volume, local-unreflected area and table.

use super::*;

// --------------------------------------------------------------------- a node --

/// The takeover table (`takeover.dlt`, FORMAT.md §5.2), durable.
#[derive(Clone)]
pub(crate) struct Table {
    pub(crate) freeze: Seq,
    pub(crate) applied_at_ready: Seq,
    pub(crate) entries: Vec<EntryHeader>,
}

/// A secondary's disk: applies and syncs carried out at later steps, in order. An apply
/// takes two: its plan and in-place write, then (at a later step, other steps between, as
/// the node's driver releases the lock between them) its finish.
pub(crate) enum DiskOp {
    Apply(WireEntry),
    Finish(Box<(WireEntry, PlannedApply, std::io::Result<()>)>),
    Copy(Vec<WireBlock>),
    Sync,
}

pub(crate) struct Node {
    pub(crate) name: &'static str,
    pub(crate) up: bool,
    pub(crate) repl: Replicator,
    pub(crate) persisted: PersistedState,
    pub(crate) vol: Arc<Mutex<Volume>>,
    pub(crate) normal: Arc<CrashDevice>,
    pub(crate) journal: Arc<CrashDevice>,
    pub(crate) lu: Arc<CrashDevice>,
    pub(crate) table: Option<Table>,
    pub(crate) disk: VecDeque<DiskOp>,
    pub(crate) merging: bool,
    /// Committed here, not sealed yet: block → value.
    pub(crate) pending: BTreeMap<u64, u64>,
    pub(crate) copy: Option<(u64, VecDeque<u64>, u64)>,
    pub(crate) bitmap: BTreeSet<u64>,
    /// A `pairfs takeover` asked here and not answered.
    pub(crate) asked: Option<u64>,
}

pub(crate) fn opts() -> VolumeOptions {
    VolumeOptions {
        retain: true,
        // Runs of two fresh blocks go in place: an entry whose in-place data a later one
        // overwrote cannot be sent after a restart (a frozen primary then catches its
        // taker up with one entry).
        inplace_min_blocks: 2,
        commit_interval: Duration::from_secs(3600),
        checkpoint_bytes: 6 * BS as u64,
        checkpoint_inplace_bytes: 12 * BS as u64,
        evacuation_limit: 1 << 20,
        // The local-unreflected area's entries reach the device at the volume's next step,
        // not when a thread gets to them: a crash point then follows from the seed alone.
        lu_writer_thread: false,
        ..VolumeOptions::default()
    }
}

pub(crate) fn expect() -> JournalExpect {
    JournalExpect {
        block_size: BS as u32,
        normal_blocks: BLOCKS,
    }
}

pub(crate) fn open_volume(n: &Arc<CrashDevice>, j: &Arc<CrashDevice>) -> Volume {
    Volume::open(Box::new(n.clone()), Box::new(j.clone()), opts())
        .unwrap_or_else(|e| panic!("recovery failed: {e}"))
}

/// The replicator's settings, as the node daemon makes them from its volume.
pub(crate) fn config(name: &str, mode: Mode, v: &Volume) -> ReplConfig {
    let mut c = ReplConfig::new(name, v.id(), BS as u32, BLOCKS);
    c.max_entry_bytes = v.max_replicated_entry_bytes();
    c.mode = mode;
    c.journal_limit = 100 * BS as u64;
    c.window_bytes = 24 * BS as u64;
    c.resend_after = Duration::from_millis(300);
    c.max_out_of_order_bytes = 8 * BS as u64;
    c.sync_timeout = Duration::from_secs(3600);
    c.next_generation_id = 99;
    c
}

impl Node {
    pub(crate) fn new(name: &'static str, primary: bool, mode: Mode, now: Instant) -> Node {
        let normal = Arc::new(CrashDevice::new(BLOCKS * BS as u64));
        let journal = Arc::new(CrashDevice::new(JOURNAL_BLOCKS * BS as u64));
        let lu = Arc::new(CrashDevice::new(LU_BLOCKS * BS as u64));
        let id = if primary { VOL } else { VolumeId::default() };
        Volume::create(&*normal, &*journal, id, BS as u32).expect("create");
        LuArea::format(&*lu, id, BS as u32, BLOCKS).expect("format the LU");
        let vol = open_volume(&normal, &journal);
        let persisted = if primary {
            PersistedState::new_primary(7)
        } else {
            PersistedState::new_secondary()
        };
        let repl = Replicator::new(
            config(name, mode, &vol),
            persisted.clone(),
            vec![],
            Seq::NONE,
            false,
            now,
        );
        Node {
            name,
            up: true,
            repl,
            persisted,
            vol: Arc::new(Mutex::new(vol)),
            normal,
            journal,
            lu,
            table: None,
            disk: VecDeque::new(),
            merging: false,
            pending: BTreeMap::new(),
            copy: None,
            bitmap: BTreeSet::new(),
            asked: None,
        }
    }

    pub(crate) fn v(&self) -> std::sync::MutexGuard<'_, Volume> {
        self.vol.lock().unwrap()
    }

    pub(crate) fn newest(&self) -> Seq {
        self.v().newest_seq()
    }

    pub(crate) fn phase(&self) -> String {
        match self.repl.takeover() {
            None => format!("{:?}", self.repl.role()),
            Some(t) => format!("{:?} {t:?}", self.repl.role()),
        }
    }
}
