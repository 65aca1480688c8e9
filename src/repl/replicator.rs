//! The replication state machine of one node (docs/PROTOCOL.md §2, §5).
//!
//! One type for both roles, with a sub-machine per role: [`Replicator`] holds what both
//! share (settings, persisted state, pair state, the connection and the peer, the actions
//! for the driver), takes every event and hands it to the current role's state — each
//! role's state and handlers are in `primary.rs` and `secondary.rs`.
//!
//! A primary streams its journal entries in seq order — once they are durable locally
//! (async mode), or once they are sealed, before they are durable here (sync mode: the
//! write then completes when the peer has it) — and releases each only when the secondary
//! acknowledges it *durable*. A secondary applies entries strictly in order and
//! acknowledges each twice: *received* (in its journal and visible, the moment it is
//! applied) and *durable* (after its own group commit, or a flush the primary asked for).
//! The data path stays outside: the primary's driver reads an entry from its journal when
//! told [`Action::SendEntry`] and streams copy blocks itself after [`Action::StartCopy`];
//! the secondary's driver applies what [`Action::Apply`] and [`Action::ApplyCopy`] hand it
//! and reports back with [`Replicator::handle_applied`] and
//! [`Replicator::handle_local_durable`].
//!
//! A sync-mode primary that restarts after a crash may be *behind* its peer (the peer got
//! entries it had not made durable): it starts [`PairState::Reconciling`], takes the
//! missing entries back from the peer ([`Message::Pull`]) and admits writes only then — or,
//! with the peer unreachable for `sync_timeout`, starts a new generation, so that the peer's
//! tail is detected as a divergence when it returns, never silently overwritten.

use std::collections::VecDeque;
use std::time::Instant;

use super::primary::PrimaryState;
use super::secondary::SecondaryState;
use super::{
    Action, Backpressure, EntryMeta, ForcePlan, Generation, Hello, MAX_ENTRY_WIRE_BYTES, Message,
    Mode, PROTOCOL_VERSION, PairState, PersistedState, ReplConfig, Role, Status, Takeover,
};
use crate::types::Seq;

/// Messages kept while waiting for the peer's hello (a few replication frames can overtake
/// it; more means the peer is not speaking the protocol).
const MAX_EARLY: usize = 256;
/// Bytes of block data those may hold: one entry's worth and a margin.
const MAX_EARLY_BYTES: u64 = 2 * MAX_ENTRY_WIRE_BYTES;

/// An online verify request: its id, the seq whose state it describes, and the blocks'
/// checksums there.
pub(super) type VerifyRequest = (u64, Seq, Vec<(u64, u32)>);

/// What this node knows of its peer, once the peer's hello was accepted.
pub(super) struct PeerView {
    /// The peer's hello.
    pub(super) hello: Hello,
    /// Newest seq the peer received (as far as we know).
    pub(super) received: Seq,
    /// Newest seq the peer has durably (as far as we know).
    pub(super) durable: Seq,
}

/// The state both roles share, which the handlers of each role get along with their own.
pub(super) struct Ctx {
    /// Settings (a new secondary adopts its primary's volume id).
    pub(super) cfg: ReplConfig,
    /// What the pair state file holds (handed out with every [`Action::Persist`]).
    pub(super) persisted: PersistedState,
    /// Pair state.
    pub(super) state: PairState,
    /// A connection to the peer is up (past the hello exchange once `peer` is set too).
    pub(super) connected: bool,
    /// The peer, once its hello was accepted on this connection.
    pub(super) peer: Option<PeerView>,
    /// Actions for the driver, in order.
    pub(super) out: VecDeque<Action>,
    /// The last refusal, either way, until a hello is accepted.
    pub(super) refused: Option<String>,
    /// The seq of the entry handed to the driver to apply (a secondary: the primary's next
    /// entry or a copy's end; a primary: an entry taken back while reconciling).
    pub(super) applying: Option<Seq>,
}

impl Ctx {
    /// Hands out a message for the peer.
    pub(super) fn send(&mut self, m: Message) {
        self.out.push_back(Action::Send(m));
    }

    /// Hands out the persisted state to be written durably.
    pub(super) fn persist(&mut self) {
        self.out.push_back(Action::Persist(self.persisted.clone()));
    }

    /// Refuses the peer: says why and closes the connection.
    pub(super) fn refuse(&mut self, reason: String) {
        tracing::warn!(%reason, "refusing the peer");
        let epoch = self.persisted.epoch;
        self.send(Message::Refuse {
            epoch,
            reason: reason.clone(),
        });
        self.out.push_back(Action::Disconnect {
            reason: reason.clone(),
            role_change: false,
        });
        self.refused = Some(reason);
        self.peer = None;
    }

    /// Newest seq the peer received, as far as this node knows.
    pub(super) fn peer_received(&self) -> Seq {
        self.peer.as_ref().map_or(Seq::NONE, |p| p.received)
    }
}

/// What the local journal holds when a node takes a role.
pub(super) struct LocalJournal {
    /// Primary: the entries not released, oldest first.
    pub(super) retained: Vec<EntryMeta>,
    /// The newest durable seq.
    pub(super) durable: Seq,
    /// The node did not close cleanly.
    pub(super) unclean: bool,
}

/// The state of the node's current role: one sub-machine per role, started by
/// [`Replicator::set_role`].
enum RoleState {
    /// Writes, and streams its journal to the peer.
    Primary(PrimaryState),
    /// Applies the primary's entries in order.
    Secondary(SecondaryState),
}

/// The replication state machine of one node.
pub struct Replicator {
    /// What both roles share.
    ctx: Ctx,
    /// What only the current role has.
    role: RoleState,
    /// Messages that overtook the peer's hello (streams are independent).
    early: Vec<Message>,
    /// Bytes of block data in `early`.
    early_bytes: u64,
    /// The last failed apply or sync, until an apply succeeds.
    apply_error: Option<String>,
}

impl Replicator {
    /// A replicator for a node whose journal holds `retained` (primary: entries not
    /// released, oldest first) and whose newest durable seq is `durable`. A primary that
    /// ran in sync mode and did not close cleanly (`unclean`) reconciles with its peer
    /// before it admits writes.
    pub fn new(
        cfg: ReplConfig,
        persisted: PersistedState,
        retained: Vec<EntryMeta>,
        durable: Seq,
        unclean: bool,
        now: Instant,
    ) -> Self {
        let role = persisted.role;
        let mut r = Replicator {
            ctx: Ctx {
                cfg,
                persisted,
                state: PairState::Suspended,
                connected: false,
                peer: None,
                out: VecDeque::new(),
                refused: None,
                applying: None,
            },
            // Replaced at once by the persisted role's.
            role: RoleState::Secondary(SecondaryState::default()),
            early: Vec::new(),
            early_bytes: 0,
            apply_error: None,
        };
        let journal = LocalJournal {
            retained,
            durable,
            unclean,
        };
        r.set_role(role, journal, now);
        r
    }

    /// Makes this node `role` with what its local journal holds: a fresh state for the
    /// role, built from the persisted state and `journal` — the one seam between roles.
    /// It sets the role in the persisted state but hands out no [`Action::Persist`] for it
    /// (at startup the role is the persisted one); it leaves the connection alone.
    fn set_role(&mut self, role: Role, journal: LocalJournal, now: Instant) {
        self.ctx.persisted.role = role;
        self.role = match role {
            Role::Primary => RoleState::Primary(PrimaryState::start(&mut self.ctx, journal, now)),
            Role::Secondary => {
                RoleState::Secondary(SecondaryState::start(&mut self.ctx, journal.durable))
            }
        };
    }

    /// The persisted part of the state (as last handed out by [`Action::Persist`]).
    pub fn persisted(&self) -> &PersistedState {
        &self.ctx.persisted
    }

    /// This node's role.
    pub fn role(&self) -> Role {
        self.ctx.persisted.role
    }

    /// Next action for the driver.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.ctx.out.pop_front()
    }

    /// When [`Replicator::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.role {
            RoleState::Primary(p) => p.poll_timeout(&self.ctx),
            RoleState::Secondary(_) => None,
        }
    }

    /// Whether the filesystem may write: a primary (not while reconciling after a crash,
    /// not frozen for a takeover), or a node taking over.
    pub fn admits_writes(&self) -> bool {
        match &self.role {
            RoleState::Primary(p) => p.admits_writes(),
            RoleState::Secondary(s) => s.admits_writes(),
        }
    }

    /// The role change under way here, if any (docs/PROTOCOL.md §7).
    pub fn takeover(&self) -> Option<Takeover> {
        self.ctx.persisted.takeover
    }

    /// Secondary: asks the primary to freeze and hand over (docs/PROTOCOL.md §7.3). The
    /// answer comes as [`Action::BeginTakeover`]; an error says why it cannot be asked now.
    pub fn handle_takeover_request(&mut self, id: u64) -> Result<(), String> {
        match &mut self.role {
            RoleState::Secondary(s) => s.request_takeover(&mut self.ctx, id),
            // Failback while the peer drains (§7.6).
            RoleState::Primary(p) => p.request_retake(&mut self.ctx, id),
        }
    }

    /// Secondary: the takeover request sent on this connection and not answered yet (a
    /// request lost with its connection is asked again by the driver).
    pub fn takeover_asked(&self) -> Option<u64> {
        match &self.role {
            RoleState::Secondary(s) => s.asked(),
            RoleState::Primary(p) => p.retake_asked(),
        }
    }

    /// Primary: the driver froze the filesystem for request `id` (after
    /// [`Action::Freeze`]); `newest` is the newest seq, durable and handed in.
    pub fn handle_frozen(&mut self, id: u64, newest: Seq) {
        if let RoleState::Primary(p) = &mut self.role {
            p.on_frozen(&mut self.ctx, id, newest);
        }
    }

    /// Taker: the driver froze the filesystem for a failback asked by the peer (after
    /// [`Action::Freeze`]); `newest` is the newest local seq, durable, and `headers` the
    /// headers of the local entries after the drain point (docs/PROTOCOL.md §7.6).
    pub fn handle_frozen_taker(
        &mut self,
        id: u64,
        newest: Seq,
        headers: Vec<crate::takeover::EntryHeader>,
    ) {
        if let RoleState::Secondary(s) = &mut self.role {
            s.on_frozen_here(&mut self.ctx, id, newest, headers);
        }
    }

    /// Taker: the merge is complete ([`Action::Merge`]); `journal` is what the local journal
    /// holds now. The node becomes primary — persisted, then the connection restarts so
    /// that the old primary, seeing a primary of the new epoch, steps down. A taker frozen
    /// by a failback becomes a frozen source instead, and the peer, seeing it, a taker.
    pub fn handle_merged(&mut self, retained: Vec<EntryMeta>, durable: Seq, now: Instant) {
        let RoleState::Secondary(s) = &self.role else {
            return;
        };
        if s.taking_over().is_none() {
            return;
        }
        // Frozen by a failback: a frozen source at its freeze point, for the peer to drain.
        let frozen = s.frozen();
        self.ctx.persisted.takeover = frozen.map(|freeze| Takeover::Source { freeze });
        self.ctx.persisted.paired = true;
        let journal = LocalJournal {
            retained,
            durable,
            unclean: false,
        };
        self.set_role(Role::Primary, journal, now);
        self.ctx.persist();
        self.ctx.out.push_back(Action::RoleChanged(Role::Primary));
        if frozen.is_some() {
            tracing::info!(seq = %durable, "merge complete: frozen, the peer drains this node's entries");
        } else {
            tracing::info!(seq = %durable, "takeover complete: this node is the primary");
        }
        self.drop_connection("role change: this node is now the primary".into(), true);
    }

    /// Frozen primary: the entry of an [`Action::SendCatchUp`] could not be made (`why`):
    /// the peer cannot drain this node in order. Refused, with the reason, for the
    /// operator (a forced takeover on the peer).
    pub fn handle_catch_up_failed(&mut self, why: &str) {
        self.ctx.refuse(format!(
            "frozen, this node cannot catch its peer up in order ({why}): force the takeover \
             on the peer (`pairfs takeover --force`)"
        ));
    }

    /// Taker, merging: the journal holds `merged_bytes` of this node's own merged entries
    /// (up to `newest`), kept for the stream back to the old primary, which cannot start
    /// before the merge ends; `no_room`: it has no room for the next local-unreflected
    /// entry ([`crate::volume::MergeStep::NoRoom`]). Past the journal limit (a primary's
    /// backlog rule), or without room, those entries go into the difference bitmap
    /// ([`Action::Persist`] of a bitmap backlog from the drain point, then
    /// [`Action::MarkBitmapAfter`]), and the stream back becomes a bitmap copy. A taker
    /// frozen by a failback cannot do that (its peer drains those entries in order): past
    /// the limit it goes on, and without room its merge waits, logged once.
    pub fn handle_merge_progress(&mut self, newest: Seq, merged_bytes: u64, no_room: bool) {
        let limit = self.ctx.cfg.journal_limit;
        let RoleState::Secondary(s) = &mut self.role else {
            return;
        };
        let Some(drain) = s.taking_over() else {
            return;
        };
        let bitmap = matches!(self.ctx.persisted.backlog, super::Backlog::Bitmap { .. });
        if !no_room && (merged_bytes <= limit || bitmap) {
            return;
        }
        if s.frozen().is_some() {
            if !no_room {
                return;
            }
            if !std::mem::replace(&mut s.merge_full_logged, true) {
                tracing::error!(
                    %drain,
                    %newest,
                    "frozen by a failback, this node's journal has no room for the rest of                      its local-unreflected area: the merge waits (the journal is too small                      for the area: re-create the node with a larger journal or smaller area)"
                );
            }
            return;
        }
        tracing::warn!(
            %drain,
            %newest,
            "takeover: the journal is full of merged entries: they go into the difference              bitmap, and the old primary will be resynced by a bitmap copy"
        );
        self.ctx.persisted.backlog = super::Backlog::Bitmap { base: drain };
        self.ctx.persist();
        self.ctx.out.push_back(Action::MarkBitmapAfter {
            after: drain,
            upto: newest,
        });
    }

    /// `pairfs takeover --force` (docs/PROTOCOL.md §7.7): what this node cannot have from
    /// the old primary, or why a takeover cannot be forced now. Changes nothing.
    pub fn force_plan(&self) -> Result<ForcePlan, String> {
        match &self.role {
            RoleState::Secondary(s) => s.force_plan(&self.ctx),
            RoleState::Primary(p) if p.frozen().is_some() => Err(
                "this node is the old primary, frozen while its peer takes over: force the \
                 takeover on the peer, or, with the peer reachable, take over again without \
                 --force (forcing a frozen node back is not supported)"
                    .into(),
            ),
            RoleState::Primary(_) => Err("this node is already the primary".into()),
        }
    }

    /// Forced takeover: the driver made the volume durably the old lineage's state after
    /// `base` (what it could not keep exported first); `retained` is what the journal
    /// holds. This node becomes the primary of a new generation that branches off at
    /// `base` — persisted ([`Action::Persist`]) before [`Action::RoleChanged`], after which
    /// the driver admits writes. In sync mode the pair is degraded from `base + 1` on (the
    /// peer is gone: writers do not wait for it).
    pub fn handle_forced(
        &mut self,
        base: Seq,
        retained: Vec<EntryMeta>,
        now_ns: u64,
        now: Instant,
    ) {
        if self.role() != Role::Secondary {
            return;
        }
        let sync = self.ctx.cfg.mode == Mode::Sync;
        let id = self.ctx.cfg.next_generation_id;
        // A later generation of this process gets another id (splitmix64's step).
        self.ctx.cfg.next_generation_id = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let p = &mut self.ctx.persisted;
        p.takeover = None;
        p.epoch = super::Epoch(p.epoch.0 + 1);
        p.generations.push(Generation { id, base });
        p.paired = true;
        p.backlog = super::Backlog::Journal;
        p.sync_mode = sync;
        p.degraded = sync.then_some(super::Degraded {
            since: base.next(),
            at_ns: now_ns,
        });
        p.full_copy = false;
        let journal = LocalJournal {
            retained,
            durable: base,
            unclean: false,
        };
        self.set_role(Role::Primary, journal, now);
        self.ctx.persist();
        self.ctx.out.push_back(Action::RoleChanged(Role::Primary));
        tracing::warn!(
            %base,
            generation = format_args!("{id:016x}"),
            "forced takeover: this node is the primary of a new generation; what the old \
             primary held beyond this seq is not here (see the loss report)"
        );
        self.drop_connection("role change: forced takeover".into(), true);
    }

    /// A frozen old primary meets the new primary: it steps down (persisted) and
    /// reconnects as secondary.
    fn step_down(&mut self, durable: Seq, now: Instant) {
        self.become_secondary(None, durable, now);
        tracing::info!(seq = %durable, "the new primary is up: this node is now its secondary");
        self.drop_connection("role change: this node is now the secondary".into(), true);
    }

    /// Failback (§7.6): the peer merged and is a frozen source at `freeze`. This node,
    /// which took over again meanwhile (its writes in its local-unreflected area), becomes
    /// a taker of it: it drains the peer's entries after its own `durable`, then merges.
    fn become_taker(&mut self, freeze: Seq, durable: Seq, now: Instant) {
        self.become_secondary(Some(Takeover::Taker { freeze }), durable, now);
        tracing::info!(%freeze, seq = %durable, "failback: the peer has merged; this node drains its entries");
        self.drop_connection("role change: this node now drains the peer".into(), true);
    }

    /// This node becomes secondary, with `takeover` under way and its journal durable up to
    /// `durable`: persisted, and the driver told.
    fn become_secondary(&mut self, takeover: Option<Takeover>, durable: Seq, now: Instant) {
        self.ctx.persisted.takeover = takeover;
        let journal = LocalJournal {
            retained: Vec::new(),
            durable,
            unclean: false,
        };
        self.set_role(Role::Secondary, journal, now);
        self.ctx.persist();
        self.ctx.out.push_back(Action::RoleChanged(Role::Secondary));
    }

    /// True when a sync-mode writer must wait for the peer to have its entry (received),
    /// and an fsync for the peer to have it durably: sync mode, paired, not degraded, and
    /// not copying (until a copy completes the peer is inconsistent: writes are
    /// acknowledged here, and status says so). Writers wait at most `sync_timeout` — the
    /// peer may be reconnecting — then report [`Replicator::handle_degraded`].
    pub fn sync_waits(&self) -> bool {
        let ctx = &self.ctx;
        ctx.cfg.mode == Mode::Sync
            && matches!(&self.role, RoleState::Primary(p) if p.frozen().is_none())
            && ctx.persisted.paired
            && ctx.persisted.degraded.is_none()
            && !matches!(ctx.state, PairState::Copying | PairState::Simplex)
    }

    /// Primary: an fsync wants everything up to `upto` durable on the peer too.
    pub fn handle_fsync(&mut self, upto: Seq) {
        if let RoleState::Primary(p) = &self.role {
            p.on_fsync(&mut self.ctx, upto);
        }
    }

    /// Sync mode: entries are sent once sealed, before they are durable locally.
    pub fn sends_unsynced(&self) -> bool {
        self.ctx.cfg.mode == Mode::Sync
    }

    /// Async primary streaming to its peer with `max_lag` set: the backlog writers are held
    /// to, or `None` when they never wait (sync mode waits on every write instead; an
    /// absent peer is covered by the journal, then the bitmap; a copy in progress is not a
    /// backlog of entries).
    pub fn backpressure(&self) -> Option<Backpressure> {
        match &self.role {
            RoleState::Primary(p) => p.backpressure(&self.ctx),
            RoleState::Secondary(_) => None,
        }
    }

    /// This node's hello.
    fn hello(&self) -> Hello {
        let ctx = &self.ctx;
        let (last_seq, durable) = match &self.role {
            RoleState::Primary(p) => p.progress(),
            RoleState::Secondary(s) => s.progress(ctx.applying),
        };
        Hello {
            proto: PROTOCOL_VERSION,
            node: ctx.cfg.node.clone(),
            volume: ctx.cfg.volume,
            block_size: ctx.cfg.block_size,
            blocks: ctx.cfg.blocks,
            role: ctx.persisted.role,
            epoch: ctx.persisted.epoch,
            generations: ctx.persisted.generations.clone(),
            last_seq,
            durable,
            inconsistent: ctx.persisted.inconsistent_until.is_some(),
            empty: ctx.persisted.empty,
            max_entry_bytes: ctx.cfg.max_entry_bytes,
            takeover: ctx.persisted.takeover,
            rejoin: match &self.role {
                RoleState::Secondary(s) => s.rejoin().map(<[_]>::to_vec),
                RoleState::Primary(_) => None,
            },
        }
    }

    /// Secondary, rejoining after a divergence (docs/PROTOCOL.md §7.8): the blocks its
    /// tail wrote, named in its hellos until it is consistent again.
    pub fn set_rejoin(&mut self, blocks: Option<Vec<crate::types::BlockNo>>) {
        if let RoleState::Secondary(s) = &mut self.role {
            s.set_rejoin(blocks);
        }
    }

    /// The connection to the peer is up: say hello.
    pub fn handle_connected(&mut self, now: Instant) {
        self.ctx.connected = true;
        self.ctx.peer = None;
        if let RoleState::Primary(p) = &mut self.role {
            p.on_connected(now);
        }
        self.clear_buffers();
        if let RoleState::Secondary(s) = &mut self.role {
            s.on_connected(self.ctx.applying);
        }
        let h = self.hello();
        self.ctx.send(Message::Hello(h));
    }

    /// Forgets what the last connection brought (verify requests lost with it are
    /// answered "not compared").
    fn clear_buffers(&mut self) {
        match &mut self.role {
            RoleState::Primary(p) => p.clear_verifies(&mut self.ctx),
            RoleState::Secondary(s) => s.clear_buffers(),
        }
        self.early.clear();
        self.early_bytes = 0;
    }

    /// The connection went away (or was refused).
    pub fn handle_disconnected(&mut self) {
        let was = self.ctx.connected;
        self.ctx.connected = false;
        self.ctx.peer = None;
        self.clear_buffers();
        match &mut self.role {
            RoleState::Primary(p) => p.on_disconnected(&mut self.ctx),
            RoleState::Secondary(_) if was => self.ctx.state = PairState::Suspended,
            RoleState::Secondary(_) => {}
        }
    }

    /// Closes the connection, if one is up, for `reason`; `role_change`: the peer
    /// reconnects at once to meet this node's new role.
    fn drop_connection(&mut self, reason: String, role_change: bool) {
        if self.ctx.connected {
            self.ctx.out.push_back(Action::Disconnect {
                reason,
                role_change,
            });
            self.handle_disconnected();
        }
    }

    /// A message from the peer.
    pub fn handle_message(&mut self, m: Message, now: Instant) {
        if !self.ctx.connected {
            return; // a late message of a closed connection
        }
        let epoch = self.ctx.persisted.epoch;
        if let Message::Refuse { reason, .. } = &m {
            tracing::warn!(%reason, "the peer refused this node");
            self.ctx.refused = Some(format!("peer: {reason}"));
            self.ctx.out.push_back(Action::Disconnect {
                reason: format!("refused by the peer: {reason}"),
                role_change: false,
            });
            if let RoleState::Primary(p) = &mut self.role {
                p.on_refused(&mut self.ctx);
            }
            return;
        }
        // A takeover moved the epoch while messages of the one before were on their way
        // (the two streams are not ordered): the taker's, sent before it heard of the new
        // epoch, reach the frozen old primary; the old primary's last entries, sent before
        // it froze, reach the taker.
        let moving = match &self.role {
            RoleState::Primary(p) => p.frozen().is_some(),
            RoleState::Secondary(s) => s.taking_over().is_some(),
        };
        // A failback during a drain moves it twice while the source's oldest entries are
        // still in flight: what the peer sent on this connection is as recent as its hello.
        let floor = match (&self.ctx.peer, moving) {
            (_, false) => epoch,
            (Some(p), true) => super::Epoch(epoch.0.saturating_sub(1)).min(p.hello.epoch),
            (None, true) => super::Epoch(epoch.0.saturating_sub(1)),
        };
        if m.epoch() < floor && !matches!(m, Message::Hello(_)) {
            self.ctx
                .refuse(format!("stale epoch {} (ours is {})", m.epoch().0, epoch.0));
            return;
        }
        if let Message::Hello(h) = m {
            self.on_hello(h, now);
            if self.ctx.peer.is_some() {
                self.early_bytes = 0;
                for m in std::mem::take(&mut self.early) {
                    self.handle_message(m, now);
                }
            }
            return;
        }
        if self.ctx.peer.is_none() {
            // The replication stream may overtake the control stream's hello.
            let bytes = m.data_bytes();
            if self.early.len() >= MAX_EARLY || self.early_bytes + bytes > MAX_EARLY_BYTES {
                self.ctx.refuse("protocol violation: no hello".into());
            } else {
                self.early_bytes += bytes;
                self.early.push(m);
            }
            return;
        }
        let ctx = &mut self.ctx;
        let (role, handled) = match &mut self.role {
            RoleState::Primary(p) => ("primary", p.on_message(ctx, m, now)),
            RoleState::Secondary(s) => ("secondary", s.on_message(ctx, m)),
        };
        if let Err(m) = handled {
            let what = message_name(&m);
            ctx.refuse(format!("protocol violation: {role} got {what}"));
        }
    }

    /// The peer's hello: the checks for both roles, then the role's own.
    fn on_hello(&mut self, h: Hello, now: Instant) {
        let ctx = &mut self.ctx;
        if ctx.peer.is_some() {
            ctx.refuse("protocol violation: second hello".into());
            return;
        }
        if h.proto != PROTOCOL_VERSION {
            ctx.refuse(format!(
                "protocol version {} (this node speaks {PROTOCOL_VERSION})",
                h.proto
            ));
            return;
        }
        if h.block_size != ctx.cfg.block_size || h.blocks != ctx.cfg.blocks {
            ctx.refuse(format!(
                "volume geometry differs: peer {} blocks of {}, this node {} blocks of {}",
                h.blocks, h.block_size, ctx.cfg.blocks, ctx.cfg.block_size
            ));
            return;
        }
        if h.role == Role::Primary && ctx.persisted.role == Role::Primary {
            // After a takeover: the frozen old primary and the new one meet.
            let (frozen, retaking) = match &self.role {
                RoleState::Primary(p) => (p.frozen(), p.retaking()),
                RoleState::Secondary(_) => (None, None),
            };
            let (_, durable) = match &self.role {
                RoleState::Primary(p) => p.progress(),
                RoleState::Secondary(s) => s.progress(ctx.applying),
            };
            if let Some(freeze) = retaking {
                // Failback (§7.6): the peer merged and froze at `freeze`; this node drains it.
                if h.takeover == Some(Takeover::Source { freeze }) && h.epoch == ctx.persisted.epoch
                {
                    self.become_taker(freeze, durable, now);
                    return;
                }
            } else if let Some(freeze) = frozen {
                if matches!(h.takeover, Some(Takeover::Retaker { freeze: f, .. }) if f == freeze)
                    && h.epoch == ctx.persisted.epoch
                {
                    tracing::info!("the peer takes over again: waiting for it to drain this node");
                    return;
                }
                if h.epoch >= ctx.persisted.epoch && h.takeover.is_none() && h.last_seq >= freeze {
                    self.step_down(durable, now);
                    return;
                }
                // This node asked for a failback; the peer froze for it, answered, merged and
                // is now a frozen source one epoch on — the answer was lost before this node
                // recorded it, so it never wrote after its freeze (and holds no table of the
                // peer's entries). It steps down: the peer streams it its entries, and a
                // takeover asked again (`pairfs takeover`) is answered with the same freeze
                // point (§7.6).
                if let Some(Takeover::Source { freeze: f }) = h.takeover {
                    if h.epoch.0 == ctx.persisted.epoch.0 + 1 && f >= freeze {
                        tracing::warn!(
                            peer_freeze = %f,
                            "the peer froze for this node's failback, but the answer was lost:                              this node becomes its secondary; take over again to finish"
                        );
                        ctx.persisted.epoch = h.epoch;
                        self.step_down(durable, now);
                        return;
                    }
                }
            } else if matches!(h.takeover, Some(Takeover::Source { .. }))
                && h.epoch == ctx.persisted.epoch
            {
                tracing::info!("the old primary is still frozen: waiting for it to step down");
                return;
            } else if let Some(branch) = forced_past(&ctx.persisted, &h) {
                ctx.out.push_back(Action::Fenced {
                    base: branch,
                    newest: durable,
                });
                // The peer took over by force while this node was away (§7.8): it never
                // writes as primary again; what it holds beyond the branch point stays.
                tracing::error!(
                    peer_epoch = h.epoch.0,
                    epoch = ctx.persisted.epoch.0,
                    %branch,
                    newest = %durable,
                    "the peer took over by force while this node was away: this node steps \
                     down and stops writing; its entries after the branch point are kept here, \
                     read-only, and the pair refuses to stream until they are dealt with"
                );
                self.step_down(durable, now);
                return;
            }
        }
        if h.role == ctx.persisted.role {
            ctx.refuse(format!(
                "both nodes are {:?}: only one node may be primary",
                h.role
            ));
            return;
        }
        match &mut self.role {
            RoleState::Primary(p) => p.on_hello(ctx, h, now),
            RoleState::Secondary(s) => s.on_hello(ctx, h),
        }
    }

    /// Primary: the driver reports copy progress (blocks sent, blocks to send).
    pub fn handle_copy_progress(&mut self, sent: u64, total: u64) {
        if let RoleState::Primary(p) = &mut self.role {
            p.on_copy_progress(sent, total);
        }
    }

    /// Primary: all blocks of copy `id` are sent and the open entry was sealed; `newest`
    /// is the newest durable seq (every copied block reflects a state at or before it).
    pub fn handle_copy_sent(&mut self, id: u64, newest: Seq) {
        if let RoleState::Primary(p) = &mut self.role {
            p.on_copy_sent(&mut self.ctx, id, newest);
        }
    }

    /// Primary: a local journal entry can be sent (durable, or in sync mode sealed).
    pub fn handle_local_entry(&mut self, e: EntryMeta) {
        if let RoleState::Primary(p) = &mut self.role {
            p.on_local_entry(&mut self.ctx, e);
        }
    }

    /// The local journal is durable up to `seq` (a secondary: a group commit, or the sync
    /// [`Action::SyncLocal`] asked for).
    pub fn handle_local_durable(&mut self, seq: Seq, now: Instant) {
        match &mut self.role {
            RoleState::Primary(p) => p.on_local_durable(&mut self.ctx, seq, now),
            RoleState::Secondary(s) => s.on_local_durable(&mut self.ctx, seq),
        }
    }

    /// Primary, sync mode: a writer waited `sync_timeout` for the peer in vain; its entry
    /// `seq` (and everything after) is acknowledged without the peer until it catches up.
    pub fn handle_degraded(&mut self, seq: Seq, now_ns: u64) {
        if let RoleState::Primary(p) = &self.role {
            p.on_degraded(&mut self.ctx, seq, now_ns);
        }
    }

    /// Primary: the driver could not read entry `seq` as it was (an in-place block was
    /// overwritten before it was sent and could not be saved aside, or it is larger than
    /// the peer takes): what the peer lacks goes through the difference bitmap instead.
    pub fn handle_entry_unavailable(&mut self, seq: Seq) {
        if let RoleState::Primary(p) = &mut self.role {
            p.on_entry_unavailable(&mut self.ctx, seq);
        }
    }

    /// Primary, online verify (docs/PROTOCOL.md §5.5): compare `blocks` — their
    /// checksums in this node's state after `at`, which the caller sealed so that no entry
    /// after it has been handed in yet — with the peer's. The answer comes as
    /// [`Action::VerifyAnswer`]; at once if the pair is not streaming.
    pub fn handle_verify_request(&mut self, id: u64, at: Seq, blocks: Vec<(u64, u32)>) {
        match &mut self.role {
            RoleState::Primary(p) => p.on_verify_request(&mut self.ctx, id, at, blocks),
            RoleState::Secondary(_) => {
                let answer = Action::VerifyAnswer { id, differ: None };
                self.ctx.out.push_back(answer);
            }
        }
    }

    /// Secondary: the driver compared request `id`.
    pub fn handle_verify_done(&mut self, id: u64, differ: Vec<u64>) {
        let epoch = self.ctx.persisted.epoch;
        self.ctx.send(Message::Verified {
            epoch,
            id,
            differ: Some(differ),
        });
    }

    /// Time passed: resend what was not acknowledged in time; pull again what a
    /// reconciliation did not get; give up reconciling.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let RoleState::Primary(p) = &mut self.role {
            if p.on_timeout(&mut self.ctx, now) {
                // The peer's hello came before the new generation: say hello again.
                self.drop_connection("reconciliation gave up".into(), false);
            }
        }
    }

    /// Secondary: the driver could not send back an entry a reconciling primary asked for.
    pub fn handle_pull_failed(&mut self, why: &str) {
        self.ctx.refuse(format!(
            "cannot send back the entries the primary lost: {why}"
        ));
    }

    /// The driver applied the entry `e` describes (visible, in the journal, not yet
    /// durable).
    pub fn handle_applied(&mut self, e: EntryMeta, now: Instant) {
        if self.ctx.applying != Some(e.seq) {
            return;
        }
        self.ctx.applying = None;
        self.apply_error = None;
        match &mut self.role {
            // Reconciling: one of this node's own entries, taken back.
            RoleState::Primary(p) => p.reconciled_entry(&mut self.ctx, e, now),
            RoleState::Secondary(s) => s.on_applied(&mut self.ctx, e.seq),
        }
    }

    /// The driver failed to make what it applied durable ([`Action::SyncLocal`]): reported,
    /// and the stream restarts once the volume is usable again.
    pub fn handle_sync_failed(&mut self, error: &str) {
        if let RoleState::Secondary(s) = &mut self.role {
            s.on_sync_failed();
        }
        self.apply_error = Some(format!("sync: {error}"));
        tracing::error!(%error, "making replicated entries durable failed");
        self.drop_connection("local sync failed".into(), false);
    }

    /// The driver reopened the volume (after an I/O error poisoned it): recovery left it at
    /// `durable`; the stream starts again from there with the next connection.
    pub fn handle_volume_reopened(&mut self, durable: Seq) {
        self.ctx.applying = None;
        match &mut self.role {
            RoleState::Primary(p) => p.on_volume_reopened(durable),
            RoleState::Secondary(s) => s.on_volume_reopened(durable),
        }
        tracing::info!(seq = %durable, "volume reopened");
    }

    /// The driver failed to apply entry `seq` (`None`: copy blocks): reported, and the
    /// connection is dropped so that the stream starts again from what this node has (the
    /// driver reopens the volume first if the failure poisoned it).
    pub fn handle_apply_failed(&mut self, seq: Option<Seq>, error: &str) {
        match seq {
            Some(s) if self.ctx.applying != Some(s) => return,
            Some(_) => self.ctx.applying = None,
            None => {}
        }
        let what = seq.map_or("copy blocks".to_string(), |s| format!("seq {s}"));
        self.apply_error = Some(format!("{what}: {error}"));
        tracing::error!(%what, %error, "applying replicated data failed; the stream restarts");
        self.drop_connection(format!("applying {what} failed"), false);
    }

    /// A snapshot for `pairfs status`.
    pub fn status(&self) -> Status {
        let ctx = &self.ctx;
        let mut s = Status {
            role: ctx.persisted.role,
            state: ctx.state,
            epoch: ctx.persisted.epoch,
            connected: ctx.connected && ctx.peer.is_some(),
            last_seq: Seq::NONE,
            sent: Seq::NONE,
            received: Seq::NONE,
            durable: Seq::NONE,
            lag_entries: 0,
            lag_bytes: 0,
            oldest_unacked_ns: None,
            apply_rate: None,
            backlog: ctx.persisted.backlog,
            copy_progress: None,
            inconsistent: ctx.persisted.inconsistent_until.is_some(),
            degraded: ctx.persisted.degraded,
            apply_error: self.apply_error.clone(),
            refused: ctx.refused.clone(),
            takeover: ctx.persisted.takeover,
            headers_seq: Seq::NONE,
        };
        match &self.role {
            RoleState::Primary(p) => p.status(ctx, &mut s),
            RoleState::Secondary(sec) => sec.status(&mut s),
        }
        s
    }
}

/// Whether data of lineage `theirs`, holding seqs up to `newest`, follows lineage `ours`
/// (is a prefix of it, and holds nothing beyond where `ours` branched off).
pub(super) fn lineage_follows(
    theirs: &[Generation],
    newest: Seq,
    ours: &[Generation],
) -> Result<(), String> {
    let prefix = theirs.len() <= ours.len() && theirs.iter().zip(ours).all(|(a, b)| a.id == b.id);
    if !prefix {
        return Err("the generation histories differ".into());
    }
    if let Some(next) = ours.get(theirs.len()) {
        if theirs.is_empty() {
            return Ok(()); // never had a lineage: a blank node
        }
        if newest > next.base {
            return Err(format!(
                "the node behind holds seqs {}..={} of a generation the other left at seq {}",
                next.base.0 + 1,
                newest.0,
                next.base.0
            ));
        }
    }
    Ok(())
}

/// The branch point, if the primary `h` continues this node's lineage `ours` in a
/// generation of its own started later (a forced takeover, docs/PROTOCOL.md §7.7) at a
/// higher epoch.
fn forced_past(st: &PersistedState, h: &Hello) -> Option<Seq> {
    let (ours, theirs) = (&st.generations, &h.generations);
    let extends = h.epoch > st.epoch
        && !ours.is_empty()
        && ours.len() < theirs.len()
        && ours.iter().zip(theirs).all(|(a, b)| a.id == b.id);
    extends.then(|| theirs[ours.len()].base)
}

/// A message's kind, for a refusal.
fn message_name(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "Hello",
        Message::Entry { .. } => "Entry",
        Message::CopyBlocks { .. } => "CopyBlocks",
        Message::CopyEnd { .. } => "CopyEnd",
        Message::Ack { .. } => "Ack",
        Message::Durable { .. } => "Durable",
        Message::Flush { .. } => "Flush",
        Message::Pull { .. } => "Pull",
        Message::Verify { .. } => "Verify",
        Message::Verified { .. } => "Verified",
        Message::Headers { .. } => "Headers",
        Message::Takeover { .. } => "Takeover",
        Message::Frozen { .. } => "Frozen",
        Message::Refuse { .. } => "Refuse",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repl::Epoch;

    fn g(id: u64, base: u64) -> Generation {
        Generation {
            id,
            base: Seq(base),
        }
    }

    fn primary_hello(epoch: u64, generations: Vec<Generation>) -> Hello {
        Hello {
            proto: PROTOCOL_VERSION,
            node: "b".into(),
            volume: crate::types::VolumeId([1; 16]),
            block_size: 4096,
            blocks: 64,
            role: Role::Primary,
            epoch: Epoch(epoch),
            generations,
            last_seq: Seq(9),
            durable: Seq(9),
            inconsistent: false,
            empty: false,
            max_entry_bytes: 1 << 20,
            takeover: None,
            rejoin: None,
        }
    }

    /// Delivers the messages of both until neither sends more; the other actions of `a`.
    fn exchange(a: &mut Replicator, b: &mut Replicator) -> Vec<Action> {
        let mut acts = Vec::new();
        loop {
            let mut to_b = Vec::new();
            while let Some(x) = a.poll_action() {
                match x {
                    Action::Send(m) => to_b.push(m),
                    x => acts.push(x),
                }
            }
            let mut to_a = Vec::new();
            while let Some(x) = b.poll_action() {
                if let Action::Send(m) = x {
                    to_a.push(m);
                }
            }
            if to_a.is_empty() && to_b.is_empty() {
                return acts;
            }
            for m in to_b {
                b.handle_message(m, Instant::now());
            }
            for m in to_a {
                a.handle_message(m, Instant::now());
            }
        }
    }

    /// Sync mode sends entries before they are durable here, and the peer keeps them until
    /// they are: what is sent ahead is held to half the peer's journal (twice its largest
    /// entry), and the primary syncs to send more.
    #[test]
    fn sync_mode_holds_what_it_sends_ahead_of_its_own_durability_to_half_the_peers_journal() {
        let volume = crate::types::VolumeId([1; 16]);
        let now = Instant::now();
        let mut pc = ReplConfig::new("a", volume, 4096, 1024);
        pc.mode = Mode::Sync;
        let mut sc = ReplConfig::new("b", volume, 4096, 1024);
        sc.mode = Mode::Sync;
        sc.max_entry_bytes = crate::repl::MIN_PEER_ENTRY_BYTES;
        let mut ps = PersistedState::new_primary(7);
        ps.paired = true;
        ps.sync_mode = true;
        let mut ss = PersistedState::new_secondary();
        ss.empty = false;
        ss.epoch = ps.epoch;
        ss.generations = ps.generations.clone();
        let mut a = Replicator::new(pc, ps, vec![], Seq::NONE, false, now);
        let mut b = Replicator::new(sc, ss, vec![], Seq::NONE, false, now);
        a.handle_connected(now);
        b.handle_connected(now);
        exchange(&mut a, &mut b);
        assert_eq!(a.status().state, PairState::Pair);
        for s in 1..=10u64 {
            a.handle_local_entry(EntryMeta {
                seq: Seq(s),
                prev_seq: Seq(s - 1),
                bytes: 900 << 10,
                journal_bytes: crate::repl::MIN_PEER_ENTRY_BYTES / 2,
                timestamp_ns: s,
            });
        }
        let sent = |acts: &[Action]| -> (Vec<u64>, usize) {
            let seqs = acts
                .iter()
                .filter_map(|x| match x {
                    Action::SendEntry(m) => Some(m.seq.0),
                    _ => None,
                })
                .collect();
            let syncs = acts.iter().filter(|x| **x == Action::SyncLocal).count();
            (seqs, syncs)
        };
        let mut acts = Vec::new();
        while let Some(x) = a.poll_action() {
            acts.push(x);
        }
        // Four halves of the peer's largest entry: twice that entry.
        assert_eq!(sent(&acts), (vec![1, 2, 3, 4], 1), "{acts:?}");
        a.handle_local_durable(Seq(4), now);
        let mut acts = Vec::new();
        while let Some(x) = a.poll_action() {
            acts.push(x);
        }
        assert_eq!(sent(&acts), (vec![5, 6, 7, 8], 1), "{acts:?}");
    }

    #[test]
    fn a_primary_steps_down_only_before_a_forced_generation_branching_off_its_own_lineage() {
        let mut ours = PersistedState::new_primary(7);
        ours.epoch = Epoch(3);
        // The peer took over by force at seq 5: a later epoch, our lineage plus its own.
        let forced = primary_hello(4, vec![g(7, 0), g(8, 5)]);
        assert_eq!(forced_past(&ours, &forced), Some(Seq(5)));
        // Not at a later epoch: two primaries, refused as such.
        assert_eq!(
            forced_past(&ours, &primary_hello(3, vec![g(7, 0), g(8, 5)])),
            None
        );
        // Our own lineage, not extended: nothing was forced.
        assert_eq!(forced_past(&ours, &primary_hello(4, vec![g(7, 0)])), None);
        // Another lineage altogether.
        assert_eq!(
            forced_past(&ours, &primary_hello(4, vec![g(9, 0), g(8, 5)])),
            None
        );
        // This node also started a generation of its own since (it gave up reconciling):
        // the lineages differ, and neither steps down.
        ours.generations.push(g(10, 6));
        assert_eq!(forced_past(&ours, &forced), None);
        // A blank node has no lineage to be fenced from.
        ours.generations.clear();
        assert_eq!(forced_past(&ours, &forced), None);
    }
}
