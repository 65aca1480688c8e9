//! Failback while the peer still drains (docs/PROTOCOL.md §7.6): a frozen old primary
//! takes over again from its taker before that one's drain and merge have completed. It
//! asks the taker to freeze, receives the headers of the taker's entries after its own
//! freeze point (all it lacks), and from the freeze on its writes go to its
//! local-unreflected area — while it still streams its own entries up to its freeze point
//! to the peer. Once the peer has merged and is a frozen source, this node becomes a taker
//! ([`Replicator`]'s hello handling), and the ordinary drain, merge and stream-back follow.

#[cfg(doc)]
use super::super::Replicator;
use super::super::replicator::Ctx;
use super::super::{Action, Hello, Message, Takeover};
use super::PrimaryState;
use crate::takeover::{EntryHeader, RemoteIndex};
use crate::types::Seq;

/// The request id of a failback asked again after a restart.
const RESUMED: u64 = u64::MAX;

/// A failback asked of the peer and not answered yet.
pub(super) struct RetakeAsk {
    /// The request's id.
    id: u64,
    /// The headers of the peer's entries received for it.
    headers: RemoteIndex,
}

impl PrimaryState {
    /// Taking over again (the peer's freeze point), while this node's own entries drain.
    pub(in super::super) fn retaking(&self) -> Option<Seq> {
        self.retaking
    }

    /// The failback request sent on this connection and not answered yet.
    pub(in super::super) fn retake_asked(&self) -> Option<u64> {
        self.retake_ask.as_ref().map(|a| a.id)
    }

    /// `pairfs takeover` on a frozen old primary: asks the taker, still draining or
    /// merging, to freeze in turn.
    pub(in super::super) fn request_retake(
        &mut self,
        ctx: &mut Ctx,
        id: u64,
    ) -> Result<(), String> {
        let Some(source) = self.frozen else {
            return Err("this node is already the primary".into());
        };
        if self.retaking.is_some() {
            return Err("this node is already taking over".into());
        }
        // The peer of a frozen node is its taker: its hello may predate the takeover, but a
        // taker that completes restarts the connection (and this node steps down on the
        // next, then asks as a secondary).
        if ctx.peer.is_none() {
            return Err(
                "the peer taking over from this node is unreachable: a failback needs it".into(),
            );
        }
        self.retake_ask = Some(RetakeAsk {
            id,
            headers: RemoteIndex::new(source),
        });
        let epoch = ctx.persisted.epoch;
        ctx.send(Message::Takeover { epoch, id });
        Ok(())
    }

    /// The peer froze for a failback this node asked for, and this node restarted before
    /// it recorded the answer: the peer's hello is that of a frozen taker of this node's
    /// freeze point, one epoch ahead.
    pub(super) fn failback_unrecorded(&self, ctx: &Ctx, h: &Hello) -> bool {
        self.retaking.is_none()
            && self.frozen.is_some_and(|source| {
                matches!(h.takeover, Some(Takeover::FrozenTaker { drain, .. }) if drain == source)
            })
            && h.epoch.0 == ctx.persisted.epoch.0 + 1
    }

    /// Asks the peer frozen by an unrecorded failback for its answer again (no command
    /// waits for it: the failback completes as it was asked).
    pub(super) fn ask_retake_again(&mut self, ctx: &mut Ctx) {
        let Some(source) = self.frozen else {
            return;
        };
        tracing::info!(
            "the peer froze for a failback this node asked before it restarted: asking again"
        );
        self.retake_ask = Some(RetakeAsk {
            id: RESUMED,
            headers: RemoteIndex::new(source),
        });
        let epoch = ctx.persisted.epoch;
        ctx.send(Message::Takeover { epoch, id: RESUMED });
    }

    /// Headers of the peer's entries after this node's freeze point, for a failback asked.
    pub(super) fn on_retake_headers(&mut self, ctx: &mut Ctx, entries: Vec<EntryHeader>) {
        let Some(ask) = self.retake_ask.as_mut() else {
            ctx.refuse("protocol violation: headers sent to a primary that asked for none".into());
            return;
        };
        for h in entries {
            if let Err(e) = ask.headers.add(h, ctx.cfg.blocks) {
                ctx.refuse(format!("protocol violation: {e}"));
                return;
            }
        }
    }

    /// The taker froze at `freeze` and moved the epoch: this node takes over again.
    pub(super) fn on_retake_frozen(
        &mut self,
        ctx: &mut Ctx,
        id: u64,
        freeze: Seq,
        epoch: super::super::Epoch,
    ) {
        let Some(source) = self.frozen else {
            ctx.refuse("protocol violation: a freeze sent to a primary that is not frozen".into());
            return;
        };
        if self.retake_asked() != Some(id) || self.retaking.is_some() {
            tracing::info!(
                request = id,
                "a freeze answering no request of this node: ignored"
            );
            return;
        }
        let Some(ask) = self.retake_ask.take() else {
            return;
        };
        if ask.headers.overflowed() || ask.headers.last().max(source) != freeze {
            ctx.refuse(format!(
                "protocol violation: frozen at seq {freeze}, but the headers received end at {}",
                ask.headers.last()
            ));
            return;
        }
        let index = ask.headers;
        ctx.persisted.epoch = epoch;
        ctx.persisted.takeover = Some(Takeover::Retaker { source, freeze });
        self.retaking = Some(freeze);
        tracing::info!(
            %freeze,
            %source,
            "failback: this node takes over again while the peer still drains its entries"
        );
        ctx.out.push_back(Action::BeginTakeover {
            id,
            freeze,
            index,
            state: ctx.persisted.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use crate::repl::{
        Action, EntryMeta, Epoch, Message, PairState, PersistedState, ReplConfig, Replicator, Role,
        Takeover,
    };
    use crate::takeover::EntryHeader;
    use crate::types::{Seq, VolumeId};

    const VOLUME: VolumeId = VolumeId([3; 16]);

    fn node(name: &str, st: PersistedState, retained: Vec<EntryMeta>, durable: u64) -> Replicator {
        let cfg = ReplConfig::new(name, VOLUME, 4096, 1024);
        Replicator::new(cfg, st, retained, Seq(durable), false, Instant::now())
    }

    fn meta(seq: u64) -> EntryMeta {
        EntryMeta {
            seq: Seq(seq),
            prev_seq: Seq(seq - 1),
            bytes: 4096,
            journal_bytes: 8192,
            timestamp_ns: seq,
        }
    }

    fn header(seq: u64, block: u64) -> EntryHeader {
        EntryHeader {
            seq: Seq(seq),
            prev_seq: Seq(seq - 1),
            timestamp_ns: seq,
            bytes: 4096,
            blocks: vec![block],
        }
    }

    /// Hands out `n`'s actions: the messages it sends, and the rest.
    fn drain(n: &mut Replicator) -> (Vec<Message>, Vec<Action>) {
        let (mut sent, mut other) = (Vec::new(), Vec::new());
        while let Some(a) = n.poll_action() {
            match a {
                Action::Send(m) => sent.push(m),
                a => other.push(a),
            }
        }
        (sent, other)
    }

    /// Delivers what `from` sends to `to` until neither sends more; the other actions of
    /// each, in order.
    fn exchange(a: &mut Replicator, b: &mut Replicator) -> (Vec<Action>, Vec<Action>) {
        let (mut acts_a, mut acts_b) = (Vec::new(), Vec::new());
        loop {
            let (to_b, other_a) = drain(a);
            let (to_a, other_b) = drain(b);
            acts_a.extend(other_a);
            acts_b.extend(other_b);
            if to_a.is_empty() && to_b.is_empty() {
                return (acts_a, acts_b);
            }
            for m in to_b {
                b.handle_message(m, Instant::now());
            }
            for m in to_a {
                a.handle_message(m, Instant::now());
            }
        }
    }

    fn reconnect(a: &mut Replicator, b: &mut Replicator) -> (Vec<Action>, Vec<Action>) {
        a.handle_disconnected();
        b.handle_disconnected();
        a.handle_connected(Instant::now());
        b.handle_connected(Instant::now());
        exchange(a, b)
    }

    fn refusals(acts: &[Action]) -> Vec<String> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Disconnect {
                    reason,
                    role_change: false,
                } => Some(reason.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_failback_mid_drain_runs_the_chain_of_roles_to_its_end_without_a_refusal_across_a_restart()
    {
        // a froze at seq 10 (epoch 2); b took over and has applied up to 5, with its own
        // writes 11 and 12 in its local-unreflected area.
        let mut sa = PersistedState::new_primary(7);
        sa.epoch = Epoch(2);
        sa.paired = true;
        sa.takeover = Some(Takeover::Source { freeze: Seq(10) });
        let mut sb = sa.clone();
        sb.role = Role::Secondary;
        sb.takeover = Some(Takeover::Taker { freeze: Seq(10) });
        let sa_before = sa.clone();
        let mut a = node("a", sa, (6..=10).map(meta).collect(), 10);
        let mut b = node("b", sb, vec![], 5);
        assert!(!a.admits_writes() && b.admits_writes());
        let (acts_a, acts_b) = reconnect(&mut a, &mut b);
        assert!(refusals(&acts_a).is_empty() && refusals(&acts_b).is_empty());
        assert!(a.handle_takeover_request(1).is_ok());
        assert_eq!(a.takeover_asked(), Some(1));
        // b freezes: the driver hands in its entries after the drain point.
        let (_, acts_b) = exchange(&mut a, &mut b);
        assert!(
            matches!(acts_b[..], [Action::Freeze { id: 1 }]),
            "{acts_b:?}"
        );
        let headers = || vec![header(11, 40), header(12, 41)];
        b.handle_frozen_taker(1, Seq(12), headers());
        assert!(!b.admits_writes());
        // a is killed before it records the answer: restarted as it was, it meets b one
        // epoch behind, asks again, and b answers the same freeze.
        let _lost = drain(&mut b);
        let mut a = node("a", sa_before.clone(), (6..=10).map(meta).collect(), 10);
        let (acts_a, acts_b) = reconnect(&mut a, &mut b);
        assert!(refusals(&acts_a).is_empty(), "{acts_a:?}");
        assert!(refusals(&acts_b).is_empty(), "{acts_b:?}");
        let id = acts_b.iter().find_map(|x| match x {
            Action::Freeze { id } => Some(*id),
            _ => None,
        });
        let id = id.unwrap_or_else(|| panic!("b was not asked again: {acts_b:?}"));
        b.handle_frozen_taker(id, Seq(12), headers());
        assert_eq!(
            b.takeover(),
            Some(Takeover::FrozenTaker {
                drain: Seq(10),
                freeze: Seq(12)
            })
        );
        let (acts_a, _) = exchange(&mut a, &mut b);
        let begin = acts_a.iter().find_map(|x| match x {
            Action::BeginTakeover { freeze, index, .. } => Some((*freeze, index.entries().count())),
            _ => None,
        });
        assert_eq!(begin, Some((Seq(12), 2)), "{acts_a:?}");
        assert_eq!(
            a.takeover(),
            Some(Takeover::Retaker {
                source: Seq(10),
                freeze: Seq(12)
            })
        );
        assert_eq!(a.persisted().epoch, Epoch(3));
        assert_eq!(b.persisted().epoch, Epoch(3));
        // a writes (into its LU) without waiting for b, and is still b's source.
        assert!(a.admits_writes() && !a.sync_waits());
        assert_eq!(a.role(), Role::Primary);
        // b's drain and merge complete: a frozen source at 12.
        b.handle_merged(vec![meta(11), meta(12)], Seq(12), Instant::now());
        assert_eq!(b.role(), Role::Primary);
        assert_eq!(b.takeover(), Some(Takeover::Source { freeze: Seq(12) }));
        assert!(!b.admits_writes());
        // They meet: a becomes the taker of b, b waits for it (no refusal)...
        let (acts_a, acts_b) = reconnect(&mut a, &mut b);
        assert!(refusals(&acts_a).is_empty(), "{acts_a:?}");
        assert!(refusals(&acts_b).is_empty(), "{acts_b:?}");
        assert_eq!(a.role(), Role::Secondary);
        assert_eq!(a.takeover(), Some(Takeover::Taker { freeze: Seq(12) }));
        assert!(a.admits_writes(), "a taker keeps writing into its LU");
        // ... and on the next connection b streams its entries 11 and 12 to a.
        let (acts_a, acts_b) = reconnect(&mut a, &mut b);
        assert!(refusals(&acts_a).is_empty() && refusals(&acts_b).is_empty());
        assert_eq!(b.status().state, PairState::Pair);
        let sent: Vec<Seq> = acts_b
            .iter()
            .filter_map(|x| match x {
                Action::SendEntry(m) => Some(m.seq),
                _ => None,
            })
            .collect();
        assert_eq!(sent, vec![Seq(11), Seq(12)], "{acts_b:?}");
    }
}
