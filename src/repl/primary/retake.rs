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
use super::super::{Action, Message, Takeover};
use super::PrimaryState;
use crate::takeover::{EntryHeader, RemoteIndex};
use crate::types::Seq;

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
        let headers: Vec<EntryHeader> = ask.headers.entries().cloned().collect();
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
            headers,
            state: ctx.persisted.clone(),
        });
    }
}
