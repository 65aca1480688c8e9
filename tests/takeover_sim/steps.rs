//! The random steps: writes, deliveries, disks, role changes, kills, forced takeovers.

use super::*;

impl Sim {
    // ------------------------------------------------------------------ steps --

    /// The node that accepts writes (T1: at most one).
    pub(crate) fn writer(&self) -> Option<usize> {
        let w: Vec<usize> = (0..2)
            .filter(|&i| self.nodes[i].up && self.nodes[i].repl.admits_writes())
            .collect();
        assert!(
            w.len() <= 1,
            "T1: both nodes accept writes ({} and {})",
            self.nodes[0].phase(),
            self.nodes[1].phase()
        );
        w.first().copied()
    }

    /// What the writer's reads must return: the lineage, then its pending writes.
    pub(crate) fn expected(&self, i: usize) -> BTreeMap<u64, u64> {
        let mut st = self.lineage.state_at(self.nodes[i].newest());
        st.extend(self.nodes[i].pending.iter().map(|(b, v)| (*b, *v)));
        st
    }

    pub(crate) fn commit(&mut self) {
        let Some(i) = self.writer() else { return };
        let in_use = self.expected(i);
        let mut tx = Transaction::new();
        let mut writes = BTreeMap::new();
        let mut value = || {
            self.next_value += 1;
            self.next_value
        };
        if self.rng.chance(60) {
            let b = self.rng.below(META);
            let v = value();
            tx.write_meta(b, Arc::from(block_of(v)));
            writes.insert(b, v);
        }
        let start = META + self.rng.below(BLOCKS - META);
        let fresh = !in_use.contains_key(&start);
        let n = 1 + self.rng.below(3);
        let mut data = Vec::new();
        for b in start..(start + n).min(BLOCKS) {
            if in_use.contains_key(&b) == fresh {
                break;
            }
            let v = value();
            data.extend(block_of(v));
            writes.insert(b, v);
        }
        tx.write_data(start, data, fresh);
        let before = self.nodes[i].newest();
        let taking = self.nodes[i].v().is_taking_over();
        let r = self.nodes[i].v().commit(tx);
        // The LU seals its open entry by itself when the next transaction would not fit
        // (and then may still find no room for it).
        self.sealed_maybe(i, before);
        match r {
            Ok(_) => {}
            Err(VolumeError::LocalUnreflectedFull { .. }) => {
                // The writer waits for the merge: nothing committed.
                self.cov.lu_full += 1;
                return;
            }
            Err(e) => panic!("{}: commit: {e}", self.nodes[i].name),
        }
        self.cov.lu_writes += u64::from(taking);
        self.log(|| format!("{} commit {writes:?}", self.nodes[i].name));
        self.nodes[i].pending.extend(writes);
        if self.nodes[i].repl.sync_waits() {
            self.seal(i);
        }
    }

    pub(crate) fn seal(&mut self, i: usize) {
        let before = self.nodes[i].newest();
        let r = self.nodes[i].v().seal_open();
        if let Err(e) = r {
            panic!("{}: seal: {e}", self.nodes[i].name);
        }
        self.sealed_maybe(i, before);
        let before = self.nodes[i].newest();
        self.nodes[i].v().maintain(self.now).expect("maintain");
        self.sealed_maybe(i, before);
        self.take_entries(i);
    }

    pub(crate) fn deliver(&mut self) {
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
        self.log(|| format!("deliver {}→ {}", self.nodes[d].name, short_msg(&m)));
        let now = self.now;
        self.nodes[1 - d].repl.handle_message(m, now);
        self.run_actions();
    }

    /// Node `i`'s disk carries out its next operation (a secondary's applies).
    pub(crate) fn disk(&mut self, i: usize) {
        if !self.nodes[i].up {
            return;
        }
        self.disk_op(i);
        self.run_actions();
    }

    /// One queued disk operation of node `i` (its actions are handled by the caller).
    pub(crate) fn disk_op(&mut self, i: usize) {
        let now = self.now;
        let name = self.nodes[i].name;
        match self.nodes[i].disk.pop_front() {
            None => {}
            Some(DiskOp::Copy(blocks)) => {
                self.nodes[i].v().write_copy_blocks(&blocks).expect("copy")
            }
            Some(DiskOp::Sync) => {
                let d = {
                    let mut v = self.nodes[i].v();
                    v.sync().expect("sync");
                    v.journal().durable_seq()
                };
                self.nodes[i].repl.handle_local_durable(d, now);
            }
            Some(DiskOp::Apply(e)) => {
                let r = self.nodes[i].v().plan_apply(&e);
                let plan = r.unwrap_or_else(|err| panic!("{name}: apply of {}: {err}", e.seq));
                let written = plan.write(&e);
                self.cov.applies_split += u64::from(plan.inplace_bytes() > 0);
                let finish = Box::new((e, plan, written));
                self.nodes[i].disk.push_front(DiskOp::Finish(finish));
            }
            Some(DiskOp::Finish(f)) => {
                let (e, plan, written) = *f;
                let r = self.nodes[i].v().finish_apply(&e, plan, written);
                let meta = r.unwrap_or_else(|err| panic!("{name}: apply of {}: {err}", e.seq));
                self.log(|| format!("{name} applied {}", e.seq));
                self.nodes[i].repl.handle_applied(meta, now);
            }
        }
    }

    /// Carries out everything queued on node `i`'s disk, in order.
    pub(crate) fn flush_disk(&mut self, i: usize) {
        while !self.nodes[i].disk.is_empty() {
            self.disk_op(i);
        }
    }

    /// A secondary's group commit.
    pub(crate) fn group_commit(&mut self, i: usize) {
        let n = &self.nodes[i];
        if !n.up || n.repl.role() != Role::Secondary || !n.disk.is_empty() {
            return;
        }
        let before = self.nodes[i].newest();
        let d = {
            let mut v = self.nodes[i].v();
            v.sync().expect("sync");
            v.journal().durable_seq()
        };
        // A taker's sync seals its LU's open entry.
        self.sealed_maybe(i, before);
        let now = self.now;
        self.nodes[i].repl.handle_local_durable(d, now);
        self.run_actions();
    }

    pub(crate) fn copy_step(&mut self, i: usize) {
        if !self.nodes[i].up {
            return;
        }
        let Some((id, mut list, total)) = self.nodes[i].copy.take() else {
            return;
        };
        let batch: Vec<u64> = (0..20).filter_map(|_| list.pop_front()).collect();
        let blocks: Vec<WireBlock> = {
            let v = self.nodes[i].v();
            batch
                .iter()
                .map(|&b| {
                    let mut data = vec![0u8; BS];
                    v.read_current(b, &mut data).expect("copy read");
                    WireBlock {
                        block: b,
                        data,
                        fresh: false,
                    }
                })
                .collect()
        };
        let epoch = self.nodes[i].repl.persisted().epoch;
        if !blocks.is_empty() {
            self.enqueue(i, Message::CopyBlocks { epoch, blocks });
        }
        let left = list.len() as u64;
        self.nodes[i].repl.handle_copy_progress(total - left, total);
        if left > 0 {
            self.nodes[i].copy = Some((id, list, total));
        } else {
            // A marker entry after the copied blocks, durable, is where the peer is
            // consistent.
            let before = self.nodes[i].newest();
            self.nodes[i].v().seal_open().expect("seal");
            self.sealed_maybe(i, before);
            let marker = self.nodes[i].v().append_marker().expect("marker");
            self.lineage.entries.insert(marker, BTreeMap::new());
            self.nodes[i].v().sync().expect("sync");
            let durable = self.nodes[i].v().journal().durable_seq();
            self.nodes[i].repl.handle_copy_sent(id, durable);
        }
        self.run_actions();
    }

    pub(crate) fn merge_step(&mut self, i: usize) {
        if !self.nodes[i].up || !self.nodes[i].merging {
            return;
        }
        let before = self.nodes[i].newest();
        let r = self.nodes[i].v().merge_step();
        // The merge's last step moves the LU's open entry into the journal: sealed.
        self.sealed_maybe(i, before);
        match r {
            Ok(MergeStep::Draining) => {}
            Ok(MergeStep::Merged(_)) => {
                self.merge_progress(i, false);
                self.run_actions();
            }
            Ok(MergeStep::NoRoom) => {
                self.cov.merge_full += 1;
                self.log(|| {
                    let v = self.nodes[i].v();
                    let r: Vec<(u64, u64)> = v
                        .retained_entries()
                        .iter()
                        .map(|e| (e.seq.0, e.journal_bytes))
                        .collect();
                    format!(
                        "{}: no room to merge: journal {} of {}, retained {r:?}",
                        self.nodes[i].name,
                        v.journal().used_bytes(),
                        v.journal().capacity_for_entries()
                    )
                });
                self.merge_progress(i, true);
                self.run_actions();
            }
            Ok(MergeStep::Done) => {
                self.cov.merges += 1;
                self.nodes[i].merging = false;
                let (retained, durable) = {
                    let v = self.nodes[i].v();
                    (v.retained_entries(), v.journal().durable_seq())
                };
                let now = self.now;
                self.nodes[i].repl.handle_merged(retained, durable, now);
                self.nodes[i].table = None;
                self.run_actions();
            }
            Err(e) => panic!("{}: merge: {e}", self.nodes[i].name),
        }
    }

    /// What the journal holds of node `i`'s merged entries (as the driver reports it).
    pub(crate) fn merge_progress(&mut self, i: usize, no_room: bool) {
        let Some(drain) = self.nodes[i].repl.takeover().and_then(|t| t.drain_point()) else {
            return;
        };
        let (newest, merged) = {
            let v = self.nodes[i].v();
            (v.journal().last_seq(), v.retained_bytes_after(drain))
        };
        self.nodes[i]
            .repl
            .handle_merge_progress(newest, merged, no_room);
    }

    /// `pairfs takeover` on node `i` (asked again on a new connection while unanswered, as
    /// the driver does).
    pub(crate) fn ask(&mut self, i: usize) {
        if !self.nodes[i].up || self.nodes[i].repl.admits_writes() {
            return;
        }
        let id = self.next_ask;
        self.next_ask += 1;
        match self.nodes[i].repl.handle_takeover_request(id) {
            Ok(()) => {
                self.log(|| format!("{} asks to take over ({id})", self.nodes[i].name));
                self.nodes[i].asked = Some(id);
            }
            Err(e) => {
                self.log(|| format!("{} cannot ask: {e}", self.nodes[i].name));
                self.cov.asks_refused += 1;
            }
        }
        self.run_actions();
    }

    pub(crate) fn disconnect(&mut self) {
        if self.connected() {
            self.log(|| "disconnect".into());
            self.net.connected.store(false, Ordering::Release);
            self.queues = Default::default();
            for n in self.nodes.iter_mut().filter(|n| n.up) {
                n.repl.handle_disconnected();
            }
            self.run_actions();
        }
    }

    pub(crate) fn connect(&mut self) {
        if self.connected() || self.partitioned || !self.nodes.iter().all(|n| n.up) {
            return;
        }
        self.log(|| "connect".into());
        self.net.connected.store(true, Ordering::Release);
        let now = self.now;
        for n in &mut self.nodes {
            n.repl.handle_connected(now);
        }
        self.run_actions();
        // The driver asks again a takeover whose request went with the last connection.
        for i in 0..2 {
            if let Some(id) = self.nodes[i].asked {
                let n = &mut self.nodes[i];
                if n.repl.takeover_asked() != Some(id) && !n.repl.admits_writes() {
                    let r = n.repl.handle_takeover_request(id);
                    self.log(|| format!("{} asks again ({id}): {r:?}", self.nodes[i].name));
                }
            }
        }
        self.run_actions();
    }

    /// `kill -9` of node `i`: what was written survives; it stays down a few steps.
    pub(crate) fn kill(&mut self, i: usize) {
        if !self.nodes[i].up {
            return;
        }
        self.cov.kills += 1;
        let t = self.nodes[i].repl.takeover();
        self.cov.kills_merging += u64::from(self.nodes[i].merging);
        self.cov.kills_taking_over += u64::from(matches!(
            t,
            Some(Takeover::Taker { .. } | Takeover::Retaker { .. })
        ));
        self.cov.kills_frozen += u64::from(matches!(
            t,
            Some(Takeover::Source { .. } | Takeover::FrozenTaker { .. })
        ));
        self.log(|| format!("KILL {} ({})", self.nodes[i].name, self.nodes[i].phase()));
        self.disconnect();
        let sealed = self.nodes[i].newest();
        // Sealed, but still in memory: lost with the process, as the open entry is.
        let unwritten = self.nodes[i].v().local_unreflected_unwritten();
        self.cov.kills_mid_apply += u64::from(matches!(
            self.nodes[i].disk.front(),
            Some(DiskOp::Finish(_))
        ));
        let n = &mut self.nodes[i];
        n.up = false;
        n.pending.clear();
        n.disk.clear();
        n.copy = None;
        n.merging = false;
        n.asked = None;
        self.net.vols.lock().unwrap()[i] = None;
        self.down_for[i] = 1 + self.rng.below(30);
        // Devices as the kill left them (the page cache survives).
        let n = &mut self.nodes[i];
        n.normal = Arc::new(CrashDevice::from_bytes(n.normal.written()));
        n.journal = Arc::new(CrashDevice::from_bytes(n.journal.written()));
        n.lu = Arc::new(CrashDevice::from_bytes(n.lu.written()));
        n.vol = Arc::new(Mutex::new(open_volume(&n.normal, &n.journal)));
        self.restart(i, sealed, &unwritten);
    }

    /// Node `i` comes back from a kill: recovery, the replicator from its persisted state,
    /// and a takeover resumed from its table before anything is served.
    pub(crate) fn restart(&mut self, i: usize, sealed: Seq, unwritten: &[Seq]) {
        let now = self.now;
        let n = &mut self.nodes[i];
        let (retained, durable, unclean, cfg) = {
            let v = n.v();
            (
                v.retained_entries(),
                v.journal().durable_seq(),
                v.recovery().unclean,
                config(n.name, self.mode, &v),
            )
        };
        let role = n.persisted.role;
        n.repl = Replicator::new(
            cfg,
            n.persisted.clone(),
            if role == Role::Primary {
                retained
            } else {
                vec![]
            },
            durable,
            unclean,
            now,
        );
        let resumes = n
            .repl
            .takeover()
            .is_some_and(|t| !matches!(t, Takeover::Source { .. }));
        if resumes {
            self.start_volume_takeover(i, None);
        }
        let recovered = self.nodes[i].newest();
        self.log(|| {
            let v = self.nodes[i].v();
            format!(
                "{} recovered: journal {}, newest {recovered}, LU headers {:?}",
                self.nodes[i].name,
                v.journal().last_seq(),
                v.headers_after(Seq::NONE).map(|h| h
                    .iter()
                    .map(|h| (h.seq.0, h.blocks.clone()))
                    .collect::<Vec<_>>())
            )
        });
        let lost: Vec<Seq> = match recovered < sealed {
            true => self
                .lineage
                .entries
                .range(recovered.next()..=sealed)
                .map(|(s, _)| *s)
                .collect(),
            false => Vec::new(),
        };
        assert!(
            recovered <= sealed && lost.iter().all(|s| unwritten.contains(s)),
            "T5: {} sealed up to {sealed} before the kill and recovered up to {recovered} \
             (unwritten local-unreflected entries: {unwritten:?})",
            self.nodes[i].name
        );
        if !lost.is_empty() {
            self.cov.kills_lost_unwritten += 1;
            self.log(|| format!("lost with the process, unwritten: {lost:?}"));
            for s in lost {
                self.lineage.entries.remove(&s);
            }
        }
        self.run_actions();
        self.take_entries(i);
    }

    /// `pairfs takeover --force` on node `i` while its peer is down (as the driver,
    /// `cli/src/node/force.rs`): what it cannot have is reported — checked here against the
    /// lineage — and a taker cut short sets its local-unreflected entries aside; the node
    /// continues from the lineage's state at the seq it applied, as the primary of a new
    /// generation; the lineage after that seq is gone.
    pub(crate) fn force(&mut self, i: usize) {
        let peer = 1 - i;
        let n = &self.nodes[i];
        if !n.up || self.nodes[peer].up || n.repl.role() != Role::Secondary {
            return;
        }
        let name = self.nodes[i].name;
        let plan = match self.nodes[i].repl.force_plan() {
            Ok(p) => p,
            Err(e) => {
                self.log(|| format!("{name} cannot force: {e}"));
                self.cov.forces_refused += 1;
                return;
            }
        };
        self.flush_disk(i);
        self.log(|| format!("{name} FORCES a takeover at {} ({plan:?})", plan.base));
        let (lost, lu_headers) = match plan.cut_short {
            None => {
                self.nodes[i].v().sync().expect("sync");
                (plan.lost.clone(), Vec::new())
            }
            Some(_) => {
                self.cov.forces_cut_short += 1;
                let mut v = self.nodes[i].v();
                let lost: Vec<EntryHeader> = v
                    .takeover_remote()
                    .map(|r| r.entries().cloned().collect())
                    .unwrap_or_default();
                let mut lu = v.abandon_takeover().expect("abandon the takeover");
                v.sync().expect("sync");
                let headers = lu.headers();
                lu.discard().expect("empty the LU");
                lu.close().expect("close the LU");
                (lost, headers)
            }
        };
        let newest = self.nodes[i].v().journal().durable_seq();
        assert_eq!(
            newest, plan.base,
            "{name}: the volume is not at the plan's base"
        );
        // The report is exact: every entry it names is the lineage's, chained from the base.
        let mut prev = plan.base;
        for h in &lost {
            let want: Option<Vec<u64>> = self
                .lineage
                .entries
                .get(&h.seq)
                .map(|e| e.keys().copied().collect());
            let mut got = h.blocks.clone();
            got.sort_unstable();
            assert_eq!(Some(got), want, "{name}: lost entry {} misreported", h.seq);
            assert_eq!(h.prev_seq, prev, "{name}: the lost entries do not chain");
            prev = h.seq;
        }
        // The writes set aside are this node's own, as the lineage has them (the last one,
        // sealed by the abandon, is what was pending).
        let pending = std::mem::take(&mut self.nodes[i].pending);
        for h in &lu_headers {
            let mut got = h.blocks.clone();
            got.sort_unstable();
            let want: Vec<u64> = match self.lineage.entries.get(&h.seq) {
                Some(e) => e.keys().copied().collect(),
                None => pending.keys().copied().collect(),
            };
            assert_eq!(
                got, want,
                "{name}: LU entry {} set aside misreported",
                h.seq
            );
        }
        self.cov.forces += 1;
        self.cov.forced_lost_entries += lost.len() as u64;
        self.lineage.entries.retain(|s, _| *s <= plan.base);
        let retained = self.nodes[i].v().retained_entries();
        let now = self.now;
        self.nodes[i]
            .repl
            .handle_forced(plan.base, retained, 1, now);
        self.forced_away[peer] = true;
        self.run_actions();
    }

    pub(crate) fn come_back(&mut self, i: usize) {
        if self.nodes[i].up {
            return;
        }
        if std::mem::take(&mut self.forced_away[i]) {
            // Its peer took over by force: the operator makes it a new, empty secondary
            // (its divergent tail kept aside is `pairfs rejoin`'s, tests/forced.rs).
            self.log(|| format!("{} is re-created as an empty secondary", self.nodes[i].name));
            self.nodes[i] = Node::new(self.nodes[i].name, false, self.mode, self.now);
        }
        self.log(|| format!("{} is back ({})", self.nodes[i].name, self.nodes[i].phase()));
        self.nodes[i].up = true;
        self.net.vols.lock().unwrap()[i] = Some(self.nodes[i].vol.clone());
        self.publish();
    }
}
