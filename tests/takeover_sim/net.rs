//! The network both nodes' fetches go through.

use super::*;

// ------------------------------------------------------------------ the network --

/// What the fetch path of both nodes sees: whether they are connected, each node's volume
/// and what it serves (as `hooks::Serving`: 0 nothing, 1 its newest state, 2 its applied
/// state), and every block served, for T4.
#[derive(Default)]
pub(crate) struct Net {
    pub(crate) connected: AtomicBool,
    pub(crate) serving: [AtomicU8; 2],
    pub(crate) vols: Mutex<[Option<Arc<Mutex<Volume>>>; 2]>,
    pub(crate) served: Mutex<Vec<(usize, BlockNo, Seq, u64)>>,
}

pub(crate) fn serving_of(t: Option<Takeover>) -> u8 {
    match t {
        Some(Takeover::Source { .. } | Takeover::FrozenTaker { .. }) => 1,
        Some(Takeover::Retaker { .. }) => 2,
        Some(Takeover::Taker { .. }) | None => 0,
    }
}

/// The fetch client of node `me`: the peer's fetch server, called directly.
pub(crate) struct SimFetch {
    pub(crate) me: usize,
    pub(crate) net: Arc<Net>,
}

impl PeerFetch for SimFetch {
    fn fetch(&self, blocks: &[(BlockNo, Seq)]) -> Result<Vec<Vec<u8>>, String> {
        let peer = 1 - self.me;
        if !self.net.connected.load(Ordering::Acquire) {
            return Err("no connection to the peer".into());
        }
        let serving = self.net.serving[peer].load(Ordering::Acquire);
        if serving == 0 {
            return Err("the peer is not frozen".into());
        }
        let vol = self.net.vols.lock().unwrap()[peer].clone();
        let vol = vol.ok_or("the peer is down")?;
        let v = vol
            .try_lock()
            .expect("a fetch cycle: the peer's fetch server waits for this node's read");
        let mut out = Vec::with_capacity(blocks.len());
        for &(b, seq) in blocks {
            let mut buf = vec![0u8; BS];
            let r = if serving == 2 {
                v.read_applied(b, &mut buf)
            } else {
                v.read_current(b, &mut buf)
            };
            r.map_err(|e| e.to_string())?;
            self.net
                .served
                .lock()
                .unwrap()
                .push((peer, b, seq, value_of(&buf)));
            out.push(buf);
        }
        Ok(out)
    }
}
