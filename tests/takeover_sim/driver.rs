//! What the node daemon's driver does with each action, node by node, in order.

use super::*;

impl Sim {
    // ------------------------------------------------------------ the driver --

    pub(crate) fn run_actions(&mut self) {
        loop {
            let mut did = false;
            for i in 0..2 {
                while let Some(a) = self.nodes[i].repl.poll_action() {
                    did = true;
                    self.act(i, a);
                }
            }
            if !did {
                break;
            }
        }
        self.publish();
    }

    pub(crate) fn enqueue(&mut self, from: usize, m: Message) {
        if !self.connected() {
            return;
        }
        let st = match m.stream() {
            Stream::Control => 0,
            Stream::Replication => 1,
        };
        self.queues[from][st].push_back(m);
    }

    pub(crate) fn act(&mut self, i: usize, a: Action) {
        let what = short(&a);
        // Whatever the action, what it sealed holds what was pending (a force-release
        // seals the open entry, for one).
        let before = self.nodes[i].newest();
        self.act_inner(i, a);
        self.sealed_maybe(i, before);
        self.audit(&what);
    }

    pub(crate) fn audit(&self, at: &str) {
        for n in &self.nodes {
            let newest = n.newest();
            assert!(
                newest <= self.lineage.newest() || n.pending.is_empty(),
                "{}: sealed {newest} unseen, at {at}",
                n.name
            );
        }
    }

    pub(crate) fn act_inner(&mut self, i: usize, a: Action) {
        let name = self.nodes[i].name;
        if matches!(
            a,
            Action::BeginTakeover { .. }
                | Action::Freeze { .. }
                | Action::Merge
                | Action::RoleChanged(_)
                | Action::SendOwnEntries { .. }
        ) {
            // The driver carries out actions in order: the applies queued on the disk
            // come first.
            self.flush_disk(i);
        }
        self.log(|| format!("{name} action {}", short(&a)));
        let now = self.now;
        match a {
            Action::Send(m) => self.enqueue(i, m),
            Action::SendEntry(meta) => {
                let r = self.nodes[i].v().read_wire_entry(meta.seq);
                match r {
                    Ok(entry) => {
                        let epoch = self.nodes[i].repl.persisted().epoch;
                        self.enqueue(i, Message::Entry { epoch, entry });
                    }
                    Err(VolumeError::InPlaceChanged { .. } | VolumeError::EntryGone { .. }) => {
                        self.nodes[i].repl.handle_entry_unavailable(meta.seq)
                    }
                    Err(e) => panic!("{name}: reading entry {}: {e}", meta.seq),
                }
            }
            Action::SendHeaders(metas) => {
                let entries: Vec<EntryHeader> = {
                    let v = self.nodes[i].v();
                    metas
                        .iter()
                        .filter_map(|m| match v.entry_header(m.seq) {
                            Ok(h) => Some(h),
                            Err(VolumeError::EntryGone { .. }) => None,
                            Err(e) => panic!("{name}: header of {}: {e}", m.seq),
                        })
                        .collect()
                };
                if !entries.is_empty() {
                    let epoch = self.nodes[i].repl.persisted().epoch;
                    self.enqueue(i, Message::Headers { epoch, entries });
                }
            }
            Action::SendCatchUp {
                after,
                upto,
                bitmap,
                max_bytes,
            } => {
                self.cov.catch_ups += 1;
                let extra: Vec<u64> = if bitmap {
                    self.nodes[i].bitmap.iter().copied().collect()
                } else {
                    Vec::new()
                };
                let r = self.nodes[i]
                    .v()
                    .catch_up_entry(after, upto, &extra, max_bytes);
                match r {
                    Ok(entry) => {
                        // What it carries is the lineage's state at `upto`: one entry of
                        // the lineage's (the entries it stands for stay in the model).
                        let want = self.lineage.state_at(upto);
                        for b in &entry.blocks {
                            assert_eq!(
                                Some(value_of(&b.data)),
                                want.get(&b.block).copied().or(Some(0)),
                                "{name}: catch-up block {} is not the state at {upto}",
                                b.block
                            );
                        }
                        let epoch = self.nodes[i].repl.persisted().epoch;
                        self.enqueue(i, Message::Entry { epoch, entry });
                    }
                    Err(e) => self.nodes[i].repl.handle_catch_up_failed(&e.to_string()),
                }
            }
            Action::SendOwnEntries { after, upto } => {
                let entries: Vec<WireEntry> = {
                    let v = self.nodes[i].v();
                    v.retained_entries()
                        .iter()
                        .filter(|e| e.seq > after && e.seq <= upto)
                        .filter_map(|e| v.read_wire_entry(e.seq).ok())
                        .collect()
                };
                if entries.first().is_none_or(|e| e.prev_seq != after) {
                    self.nodes[i].repl.handle_pull_failed("entries gone");
                } else {
                    let epoch = self.nodes[i].repl.persisted().epoch;
                    for entry in entries {
                        self.enqueue(i, Message::Entry { epoch, entry });
                    }
                }
            }
            Action::StartCopy { kind, id } => {
                self.cov.copies += 1;
                let list: VecDeque<u64> = match kind {
                    CopyKind::Full => (0..BLOCKS).collect(),
                    CopyKind::Bitmap => self.nodes[i].bitmap.iter().copied().collect(),
                };
                let total = list.len() as u64;
                self.nodes[i].copy = Some((id, list, total));
            }
            Action::StopCopy => self.nodes[i].copy = None,
            Action::LimitEntries(bytes) => self.nodes[i].v().set_max_entry_wire_bytes(bytes),
            Action::Apply(e) if self.nodes[i].repl.role() == Role::Secondary => {
                self.nodes[i].disk.push_back(DiskOp::Apply(e))
            }
            Action::Apply(e) => {
                // A primary reconciling takes back what it lost: exactly its own entry.
                let want = self.lineage.entries.get(&e.seq).cloned();
                let got: BTreeMap<u64, u64> = e
                    .blocks
                    .iter()
                    .map(|b| (b.block, value_of(&b.data)))
                    .collect();
                assert_eq!(Some(got), want, "{name}: entry {} came back changed", e.seq);
                let meta = self.nodes[i].v().apply_replicated(&e).expect("apply");
                self.nodes[i].repl.handle_applied(meta, now);
                self.take_entries(i);
            }
            Action::ApplyCopy(blocks) => self.nodes[i].disk.push_back(DiskOp::Copy(blocks)),
            Action::AdoptVolume(id) => self.nodes[i].v().adopt_id(id).expect("adopt"),
            Action::SyncLocal if self.nodes[i].repl.role() == Role::Secondary => {
                self.nodes[i].disk.push_back(DiskOp::Sync)
            }
            Action::SyncLocal => {
                self.sync(i);
            }
            Action::Release(seq) => self.nodes[i].v().set_release_limit(seq),
            Action::MarkBitmap(seq) => {
                let blocks = {
                    let mut v = self.nodes[i].v();
                    let b = v.retained_blocks(seq).expect("retained blocks");
                    v.force_release(seq).expect("force release");
                    b
                };
                self.nodes[i].bitmap.extend(blocks);
            }
            Action::ClearBitmap => self.nodes[i].bitmap.clear(),
            Action::MarkBitmapAfter { after, upto } => {
                self.cov.merges_to_bitmap += 1;
                let blocks = {
                    let mut v = self.nodes[i].v();
                    let b = v
                        .retained_blocks_after(after, upto)
                        .expect("retained blocks");
                    v.force_release(upto).expect("force release");
                    b
                };
                self.nodes[i].bitmap.extend(blocks);
            }
            Action::Persist(st) => {
                self.nodes[i].persisted = st;
                self.publish();
            }
            Action::Acked { .. } => {}
            Action::Disconnect {
                reason,
                role_change,
            } => {
                if !role_change {
                    // A request made at the wrong time is refused and the connection
                    // closed (the peer reconnects); a violation is a bug.
                    assert!(
                        !reason.contains("violation") && !reason.contains("epoch"),
                        "{name} refused its peer: {reason}"
                    );
                    self.cov.refusals += 1;
                    self.log(|| format!("{name} refuses: {reason}"));
                }
                self.disconnect();
            }
            Action::Freeze { id } if self.nodes[i].repl.role() == Role::Secondary => {
                self.freeze_taker(i, id)
            }
            Action::Freeze { id } => {
                self.sync(i);
                let newest = self.nodes[i].v().journal().last_seq();
                self.nodes[i].repl.handle_frozen(id, newest);
            }
            Action::BeginTakeover {
                freeze,
                index,
                state,
                ..
            } => self.begin_takeover(i, freeze, index, state),
            Action::Merge => self.nodes[i].merging = true,
            Action::RoleChanged(role) => {
                if role == Role::Primary {
                    self.nodes[i].table = None;
                } else if self.nodes[i].repl.takeover().is_none() {
                    self.cov.step_downs += 1;
                }
                self.nodes[i].merging &= role == Role::Secondary;
            }
            a @ (Action::VerifyBlocks { .. }
            | Action::VerifyAnswer { .. }
            | Action::Fenced { .. }
            | Action::MarkBlocks(_)) => panic!("{name}: not simulated here: {a:?}"),
        }
    }

    /// A taker frozen by a failback: the LU sealed and durable, the headers of its own
    /// entries after the drain point handed to the replicator.
    pub(crate) fn freeze_taker(&mut self, i: usize, id: u64) {
        let Some(drain) = self.nodes[i].repl.takeover().and_then(|t| t.drain_point()) else {
            return;
        };
        let before = self.nodes[i].newest();
        let headers = {
            let mut v = self.nodes[i].v();
            v.sync_local_unreflected().expect("sync the LU");
            v.headers_after(drain).expect("headers")
        };
        self.sealed_maybe(i, before);
        let newest = headers.last().map_or(drain, |h| h.seq);
        self.nodes[i].repl.handle_frozen_taker(id, newest, headers);
    }

    /// Table, then state, then the volume's takeover (as the driver, FORMAT.md §5.2).
    pub(crate) fn begin_takeover(
        &mut self,
        i: usize,
        freeze: Seq,
        index: RemoteIndex,
        state: PersistedState,
    ) {
        let applied = self.nodes[i].v().journal().last_seq();
        let retaking = matches!(state.takeover, Some(Takeover::Retaker { .. }));
        if retaking {
            // (A retaker's peer is always still draining or merging: once it is done, a
            // failback is an ordinary takeover.)
            self.cov.failbacks += 1;
        } else {
            self.cov.takeovers += 1;
        }
        self.log(|| format!("{} takes over at {freeze}", self.nodes[i].name));
        self.nodes[i].table = Some(Table {
            freeze,
            applied_at_ready: applied,
            entries: index.entries().cloned().collect(),
        });
        self.nodes[i].persisted = state;
        self.start_volume_takeover(i, Some(index));
    }

    /// Starts (or after a restart resumes) node `i`'s volume takeover from its table —
    /// from `index` when the replicator hands one over, which must then be exactly what the
    /// table rebuilds (the driver skips that rebuild at ready).
    pub(crate) fn start_volume_takeover(&mut self, i: usize, index: Option<RemoteIndex>) {
        let t = self.nodes[i].table.clone().expect("a takeover table");
        let node = &self.nodes[i];
        let mut v = node.v();
        let applied = v.journal().last_seq();
        let mut remote = RemoteIndex::new(t.applied_at_ready.min(applied));
        for h in t.entries {
            remote.add(h, BLOCKS).expect("the table chains");
        }
        remote.applied(applied.min(t.freeze));
        if let Some(mut index) = index {
            index.applied(applied.min(t.freeze));
            assert_eq!(
                index, remote,
                "{}: the handed-over index differs from the table's",
                node.name
            );
        }
        let lu = LuArea::open(Box::new(node.lu.clone()), expect(), Seq::NONE).expect("open LU");
        let fetch = Arc::new(SimFetch {
            me: i,
            net: self.net.clone(),
        });
        v.begin_takeover(t.freeze, lu, remote, fetch)
            .unwrap_or_else(|e| panic!("{}: starting the takeover: {e}", node.name));
    }

    /// Hands a primary's replicator what it may send, and its durable seq.
    pub(crate) fn take_entries(&mut self, i: usize) {
        if self.nodes[i].repl.role() != Role::Primary {
            return;
        }
        let unsynced = self.nodes[i].repl.sends_unsynced();
        let (metas, durable) = {
            let mut v = self.nodes[i].v();
            (v.take_entries(unsynced), v.journal().durable_seq())
        };
        for m in metas {
            self.nodes[i].repl.handle_local_entry(m);
        }
        let now = self.now;
        self.nodes[i].repl.handle_local_durable(durable, now);
        self.run_actions();
    }

    /// If node `i` sealed a new entry since its newest seq was `before`, it holds what was
    /// pending there: it joins the lineage.
    pub(crate) fn sealed_maybe(&mut self, i: usize, before: Seq) {
        let after = self.nodes[i].newest();
        if after == before || self.nodes[i].pending.is_empty() {
            return;
        }
        assert!(
            !self.lineage.entries.contains_key(&after),
            "{}: sealed seq {after}, which the lineage has already",
            self.nodes[i].name
        );
        let e = std::mem::take(&mut self.nodes[i].pending);
        self.log(|| format!("{} sealed {after}: {e:?}", self.nodes[i].name));
        self.lineage.entries.insert(after, e);
    }

    /// Everything durable on node `i`.
    pub(crate) fn sync(&mut self, i: usize) {
        let before = self.nodes[i].newest();
        self.nodes[i].v().sync().expect("sync");
        self.sealed_maybe(i, before);
        if self.nodes[i].repl.role() == Role::Primary {
            self.take_entries(i);
        }
    }
}
