//! The pair: both nodes, the network's queues, the lineage.

use super::*;

// ------------------------------------------------------------------ the pair --

pub(crate) struct Sim {
    pub(crate) rng: Rng,
    pub(crate) now: Instant,
    pub(crate) mode: Mode,
    pub(crate) nodes: [Node; 2],
    pub(crate) net: Arc<Net>,
    pub(crate) lineage: Lineage,
    pub(crate) partitioned: bool,
    /// Per direction (0: a→b, 1: b→a) and stream (0: control, 1: replication).
    pub(crate) queues: [[VecDeque<Message>; 2]; 2],
    /// Steps a killed node stays down.
    pub(crate) down_for: [u64; 2],
    /// The node's peer took over by force while it was down.
    pub(crate) forced_away: [bool; 2],
    pub(crate) next_value: u64,
    pub(crate) next_ask: u64,
    pub(crate) trace: bool,
    pub(crate) cov: Coverage,
}

impl Sim {
    pub(crate) fn new(seed: u64, trace: bool) -> Sim {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mode = if rng.chance(50) {
            Mode::Sync
        } else {
            Mode::Async
        };
        let now = Instant::now();
        let nodes = [
            Node::new("a", true, mode, now),
            Node::new("b", false, mode, now),
        ];
        let net = Arc::new(Net::default());
        *net.vols.lock().unwrap() = [Some(nodes[0].vol.clone()), Some(nodes[1].vol.clone())];
        let sim = Sim {
            rng,
            now,
            mode,
            nodes,
            net,
            lineage: Lineage::default(),
            partitioned: false,
            queues: Default::default(),
            down_for: [0; 2],
            forced_away: [false; 2],
            next_value: 1,
            next_ask: 1,
            trace,
            cov: Coverage::default(),
        };
        sim.publish();
        sim
    }

    pub(crate) fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("  {}", what());
        }
    }

    pub(crate) fn connected(&self) -> bool {
        self.net.connected.load(Ordering::Acquire)
    }

    /// What each node's fetch server answers from, as the driver sets it.
    pub(crate) fn publish(&self) {
        for (i, n) in self.nodes.iter().enumerate() {
            let s = if n.up {
                serving_of(n.repl.takeover())
            } else {
                0
            };
            self.net.serving[i].store(s, Ordering::Release);
        }
    }
}
