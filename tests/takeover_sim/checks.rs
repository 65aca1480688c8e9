//! The checks after every step, a step, and the convergence at the end.

use super::*;

impl Sim {
    // ------------------------------------------------------------------ checks --

    /// Reads `blocks` on node `i` (through the table) and compares them with `want`.
    /// A read that failed to reach the peer is counted, not compared.
    pub(crate) fn check_reads(
        &mut self,
        i: usize,
        want: &BTreeMap<u64, u64>,
        blocks: &[u64],
        what: &str,
    ) {
        let mut bad = Vec::new();
        for &b in blocks {
            let mut buf = vec![0u8; BS];
            let r = self.nodes[i].v().read_current(b, &mut buf);
            self.cov.reads += 1;
            match r {
                Ok(()) => {
                    let got = value_of(&buf);
                    let w = want.get(&b).copied().unwrap_or(0);
                    if got != w {
                        let at = self.nodes[i].v().locate(b);
                        bad.push((b, got, w, at));
                    }
                }
                Err(VolumeError::PeerFetch { reason, .. }) => {
                    assert!(
                        !self.connected() || reason.contains("not frozen"),
                        "{}: a fetch failed while connected: {reason}",
                        self.nodes[i].name
                    );
                    self.cov.fetch_failures += 1;
                }
                Err(e) => panic!("{}: read of block {b}: {e}", self.nodes[i].name),
            }
        }
        assert!(
            bad.is_empty(),
            "{what} ({}, {}): (block, has, should have, location) {bad:?}",
            self.nodes[i].name,
            self.nodes[i].phase()
        );
    }

    pub(crate) fn sample(&mut self, st: &BTreeMap<u64, u64>, all: bool) -> Vec<u64> {
        let keys: Vec<u64> = st.keys().copied().collect();
        if all || keys.len() <= 6 {
            return keys;
        }
        (0..6)
            .map(|_| keys[self.rng.below(keys.len() as u64) as usize])
            .collect()
    }

    /// T4: what the peers served is the version the table named.
    pub(crate) fn check_served(&mut self) {
        let served = std::mem::take(&mut *self.net.served.lock().unwrap());
        for (peer, b, seq, got) in served {
            self.cov.fetched_blocks += 1;
            let want = self.lineage.version(seq, b);
            assert_eq!(
                Some(got),
                want,
                "T4: {} served block {b} as {got}, but seq {seq} wrote {want:?}",
                self.nodes[peer].name
            );
        }
    }

    pub(crate) fn check(&mut self, all: bool) {
        self.cov.steps += 1;
        let writer = self.writer();
        for i in 0..2 {
            if !self.nodes[i].up {
                continue;
            }
            if Some(i) == writer {
                let want = self.expected(i);
                let blocks = self.sample(&want, all);
                self.check_reads(i, &want, &blocks, "T2: the writer");
                continue;
            }
            let at = match self.nodes[i].repl.takeover() {
                Some(Takeover::Source { freeze } | Takeover::FrozenTaker { freeze, .. }) => freeze,
                Some(_) => continue,
                None if self.nodes[i].repl.role() == Role::Primary => continue, // reconciling
                None => {
                    let p = &self.nodes[i].persisted;
                    if p.empty || p.inconsistent_until.is_some() {
                        continue;
                    }
                    self.nodes[i].v().journal().last_seq()
                }
            };
            let want = self.lineage.state_at(at);
            let blocks = self.sample(&want, all);
            self.check_reads(i, &want, &blocks, "T3: a node that does not write");
        }
        self.check_served();
    }

    pub(crate) fn step(&mut self) {
        for i in 0..2 {
            if !self.nodes[i].up {
                self.down_for[i] = self.down_for[i].saturating_sub(1);
                if self.down_for[i] == 0 {
                    self.come_back(i);
                }
            }
        }
        if self.partitioned && self.rng.chance(3) {
            self.partitioned = false;
            self.log(|| "partition healed".into());
        }
        let i = self.rng.below(2) as usize;
        let r = self.rng.below(1000);
        self.log(|| format!("step {r} on {}", self.nodes[i].name));
        self.audit("before the step");
        match r {
            0..=199 => self.commit(),
            200..=239 => {
                if let Some(w) = self.writer() {
                    self.seal(w);
                }
            }
            240..=269 => {
                if self.nodes[i].up {
                    self.sync(i)
                }
            }
            270..=579 => self.deliver(),
            580..=679 => self.disk(i),
            680..=709 => self.group_commit(i),
            710..=759 => self.copy_step(i),
            760..=809 => self.merge_step(i),
            810..=829 => self.ask(i),
            830..=832 => self.disconnect(),
            835..=899 => self.connect(),
            900..=901 if !self.partitioned => {
                self.partitioned = true;
                self.log(|| "partitioned".into());
                self.disconnect();
            }
            903..=906 => {
                self.kill(i);
                // The operator, seeing the node gone, forces the takeover on its peer.
                if self.rng.chance(10) {
                    self.force(1 - i);
                }
            }
            907..=909 => self.force(i),
            _ => {
                self.now += Duration::from_millis(self.rng.below(400));
                let now = self.now;
                for n in self.nodes.iter_mut().filter(|n| n.up) {
                    n.repl.handle_timeout(now);
                }
                self.run_actions();
            }
        }
        self.audit("step");
        let all = self.cov.steps % 64 == 0;
        self.check(all);
    }

    /// Heals everything, asks nothing more, and runs until nothing moves: one primary,
    /// nothing under way, both volumes the lineage's state.
    pub(crate) fn converge(&mut self) {
        self.partitioned = false;
        for n in &mut self.nodes {
            n.asked = None;
        }
        for i in 0..2 {
            self.come_back(i);
        }
        for round in 0..200_000u64 {
            self.connect();
            // A frozen node whose peer is not taking over waits for a takeover: the
            // operator asks it again (a failback whose answer was lost ends this way).
            for i in 0..2 {
                let frozen_peer = matches!(
                    self.nodes[1 - i].repl.takeover(),
                    Some(Takeover::Source { .. })
                );
                if frozen_peer && self.nodes[i].repl.takeover().is_none() && round % 50 == 0 {
                    self.ask(i);
                }
            }
            if let Some(w) = self.writer() {
                self.sync(w);
            }
            for i in 0..2 {
                self.copy_step(i);
                self.merge_step(i);
                self.disk(i);
            }
            let busy = self.queues.iter().flatten().any(|q| !q.is_empty())
                || self
                    .nodes
                    .iter()
                    .any(|n| !n.disk.is_empty() || n.copy.is_some());
            if busy {
                self.deliver();
            } else {
                for i in 0..2 {
                    self.group_commit(i);
                }
                self.now += Duration::from_secs(3);
                let now = self.now;
                for n in &mut self.nodes {
                    n.repl.handle_timeout(now);
                }
                self.run_actions();
                if self.settled() {
                    self.log(|| format!("settled after {round} rounds"));
                    break;
                }
            }
            self.check(false);
        }
        assert!(
            self.settled(),
            "the pair did not converge: {} / {}, {:?} / {:?}",
            self.nodes[0].phase(),
            self.nodes[1].phase(),
            self.nodes[0].repl.status().state,
            self.nodes[1].repl.status().state,
        );
        let p = (0..2)
            .find(|&i| self.nodes[i].repl.role() == Role::Primary)
            .unwrap();
        let newest = self.nodes[p].v().journal().last_seq();
        let want = self.lineage.state_at(newest);
        assert!(
            self.lineage.newest() <= newest,
            "the primary ends at {newest}, the lineage at {}",
            self.lineage.newest()
        );
        let blocks: Vec<u64> = (0..BLOCKS).collect();
        for i in 0..2 {
            self.check_reads(i, &want, &blocks, "at the end");
        }
        self.check_served();
    }

    pub(crate) fn settled(&self) -> bool {
        let quiet = !self.queues.iter().flatten().any(|q| !q.is_empty())
            && self
                .nodes
                .iter()
                .all(|n| n.disk.is_empty() && n.copy.is_none());
        let roles: Vec<Role> = self.nodes.iter().map(|n| n.repl.role()).collect();
        let one_primary = roles.contains(&Role::Primary) && roles.contains(&Role::Secondary);
        let nothing_under_way = self.nodes.iter().all(|n| n.repl.takeover().is_none());
        let (p, s) = if roles[0] == Role::Primary {
            (0, 1)
        } else {
            (1, 0)
        };
        quiet
            && one_primary
            && nothing_under_way
            && self.nodes[p].repl.status().state == PairState::Pair
            && self.nodes[s].v().journal().durable_seq() >= self.nodes[p].v().journal().last_seq()
    }
}
