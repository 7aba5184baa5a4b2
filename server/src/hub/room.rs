//! [`Room`]: one room as this node serves it: its fan-out ring, the seq readers may be
//! given, the room's record and members as the engine's feed tells them, and this node's
//! streams in it.
//!
//! The engine's feed ([`Feed::deliver`]) is the one way anything reaches the ring: a
//! committed message (in seq order, without gaps), a presence change, typing, a new topic,
//! a change of access, a removal. The event on the ring holds a [`ChatMessage`], an `Arc`
//! that encodes once, so a room of N readers costs one allocation and one encode per
//! message, not N.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use confab::{ChatMessage, pb};
use tokio::sync::{broadcast, oneshot, watch};

use super::{
    access::{Moderation, admit, owner_only},
    presence::Presence,
};
use crate::{
    cursor::Cursor,
    engine::{Attached, Engine, Feed, FeedEvent, PresenceChange, Removal},
    error::{ChatError, quote},
    metrics::Metrics,
    nickname,
    store::{Access, RoomRecord},
};

/// How long a join waits for the engine to count the user present.
const ENTER_WAIT: Duration = Duration::from_secs(3);

/// How long a join or a subscription waits for this node's feed to bring what the engine
/// has committed.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);

/// One event on a room's ring. Cloning it (once per reader) only bumps reference counts.
#[derive(Debug, Clone)]
pub enum RoomEvent {
    /// A stored message.
    Message(ChatMessage),
    /// A user arrived or left.
    Presence(Arc<pb::PresenceEvent>),
    /// A user started or stopped typing (ephemeral: never stored).
    Typing(Arc<pb::TypingEvent>),
    /// The room's description changed.
    Updated(Arc<pb::RoomUpdated>),
    /// The room's log was lost and started again under this epoch (seqs from 1).
    Reset(String),
}

/// A chat room on this node.
pub struct Room {
    /// The room's name (validated; never changes).
    name: String,
    /// Whether only the owner and invited users may enter (never changes).
    private: bool,
    /// The fan-out ring. Every reader holds a `Receiver`: a position in it. Only
    /// committed messages are published, in seq order.
    events: broadcast::Sender<RoomEvent>,
    /// The seq of the newest message on the ring: what readers may be given. Advanced
    /// before the message is published, so a reader that subscribes and then reads it
    /// finds every message either at or below it (in the log) or on the ring.
    committed: AtomicU64,
    /// The record as the feed tells it, and this node's streams. A std `Mutex`: held for a
    /// few operations, never across an `.await`.
    state: Mutex<RoomState>,
    /// The users present over every node, sorted, as the feed tells them (so `ListMembers`
    /// pages them in order). Taken after `state` when both are.
    roster: Mutex<BTreeSet<String>>,
    /// Where seqs, the log and the feed come from.
    engine: Arc<dyn Engine>,
    /// Shared figures.
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Room")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct RoomState {
    /// Owner, topic, access; `head_seq` is not kept up to date here (see `committed`).
    record: RoomRecord,
    /// This node's users in the room and how many of their streams joined.
    streams: HashMap<String, usize>,
    /// Per user here (by comparison key), where a kick or ban is announced to each of
    /// their streams in the room.
    removals: HashMap<String, watch::Sender<Option<Arc<Removal>>>>,
}

impl Room {
    /// The room as `attached` describes it; the engine's feed goes on from there.
    pub(super) fn new(
        attached: Attached,
        ring_capacity: usize,
        engine: Arc<dyn Engine>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (events, _) = broadcast::channel(ring_capacity);
        let Attached { record, members } = attached;
        Self {
            name: record.name.clone(),
            private: record.private,
            events,
            committed: AtomicU64::new(record.head_seq),
            state: Mutex::new(RoomState {
                record,
                streams: HashMap::new(),
                removals: HashMap::new(),
            }),
            roster: Mutex::new(members.into_iter().collect()),
            engine,
            metrics,
        }
    }

    fn state(&self) -> MutexGuard<'_, RoomState> {
        // Every update of the state is complete before anything that can panic, so a
        // poisoned lock still guards consistent data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn roster(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.roster.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The room's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The engine behind the room.
    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// The shared figures.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The seq of the newest message readers may be given.
    pub fn head_seq(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// PERMISSION_DENIED unless `user` may be in the room: the owner always; others
    /// unless banned, and in a private room only when invited.
    pub fn admit(&self, user: &str) -> Result<(), ChatError> {
        admit(&self.state().record, user)
    }

    /// Whether `user` may know of the room: a private room is known only to those it admits.
    pub fn visible_to(&self, user: &str) -> bool {
        !self.private || self.admit(user).is_ok()
    }

    /// The room as the protocol describes it.
    pub fn info(&self) -> pb::RoomInfo {
        let state = self.state();
        let members = self.roster().len();
        info(&state.record, members, self.head_seq())
    }

    /// The room as the protocol describes it, its head seq the engine's: in a cluster a
    /// message acked through any node counts, even before this node's feed brings it.
    pub async fn info_now(&self) -> Result<pb::RoomInfo, ChatError> {
        let head = self.engine.head_seq(&self.name).await?;
        let mut info = self.info();
        info.head_seq = info.head_seq.max(head);
        Ok(info)
    }

    /// Up to `limit` present users (over every node) after `after` (exclusive), in order,
    /// and whether more follow.
    pub async fn members_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, bool), ChatError> {
        let members = self.engine.members(&self.name).await?;
        Ok(page(members.iter(), after, limit))
    }

    /// Sets the topic as `user`, who must own the room (PERMISSION_DENIED otherwise);
    /// every reader hears of it once it is stored.
    pub async fn set_topic(&self, user: &str, topic: &str) -> Result<(), ChatError> {
        owner_only(&self.state().record, user, "set the topic")?;
        Ok(self.engine.set_topic(&self.name, user, topic).await?)
    }

    /// The owner's `action` on `target`; PERMISSION_DENIED unless `by` owns the room.
    /// Resolves once what must be kept (an invite, a ban) is stored; a kicked or banned
    /// user's streams (on every node) are put out at once.
    pub async fn moderate(
        &self,
        by: &str,
        target: &str,
        action: Moderation,
    ) -> Result<(), ChatError> {
        let key = nickname::key(target);
        {
            let state = self.state();
            owner_only(&state.record, by, "invite, kick or ban")?;
            if key == nickname::key(&state.record.created_by) {
                return Err(ChatError::invalid(
                    "user",
                    "the owner cannot be put out of their own room",
                ));
            }
        }
        let removal = |reason, message| FeedEvent::Removed {
            user: key.clone(),
            removal: Arc::new(Removal {
                reason,
                by: by.to_owned(),
                message,
            }),
        };
        match action {
            Moderation::Invite => {
                self.engine
                    .set_access(&self.name, &key, Some(Access::Invited))
                    .await?;
            }
            Moderation::Kick(message) => {
                // A kick has no one to put out when the user is not here, and the owner
                // should know (a typo, or they left).
                let members = self.engine.members(&self.name).await?;
                if !members.iter().any(|user| nickname::key(user) == key) {
                    return Err(ChatError::precondition(
                        "user",
                        format!("{} is not in room {}", quote(target), quote(&self.name)),
                    ));
                }
                self.engine
                    .announce(&self.name, removal(pb::LeaveReason::Kicked, message));
            }
            Moderation::Ban(message) => {
                // Stored first, so that a stream put out cannot come straight back.
                self.engine
                    .set_access(&self.name, &key, Some(Access::Banned))
                    .await?;
                self.engine
                    .announce(&self.name, removal(pb::LeaveReason::Banned, message));
            }
        }
        Ok(())
    }

    /// Tells readers (on every node) that `user` is or stopped typing.
    pub fn typing(&self, user: &str, typing: bool) {
        self.engine.announce(
            &self.name,
            FeedEvent::Typing(Arc::new(pb::TypingEvent {
                room: self.name.clone(),
                user: user.to_owned(),
                typing,
            })),
        );
    }

    /// Where a reader resuming after `after_seq` of `epoch` starts: there, unless it saw
    /// more than the room has (and then at the room's head; when this node's ring is behind
    /// the seq, the engine's head decides), or its epoch is not the room's (and then at the
    /// new log's start, after a reset).
    async fn resume_point(&self, after_seq: u64, epoch: &str) -> Result<Resume, ChatError> {
        let current = self.epoch();
        if !epoch.is_empty() && epoch != current {
            return Ok(Resume {
                after: 0,
                reset: Some((current, after_seq)),
            });
        }
        let after = if after_seq <= self.head_seq() {
            after_seq
        } else {
            after_seq.min(self.engine.head_seq(&self.name).await?)
        };
        Ok(Resume { after, reset: None })
    }

    /// Waits (a little, at most [`CATCH_UP_WAIT`]) until this node's ring has every
    /// message the engine has committed now, so that a join or a subscription sees every
    /// message acked before it, through whichever node. Locally the two are the same.
    async fn caught_up(&self) -> Result<(), ChatError> {
        let head = self.engine.head_seq(&self.name).await?;
        if self.head_seq() >= head {
            return Ok(());
        }
        let mut live = self.events.subscribe();
        let wait = async {
            // Subscribed before the check: a message put on the ring meanwhile wakes us.
            while self.head_seq() < head {
                if let Err(broadcast::error::RecvError::Closed) = live.recv().await {
                    return;
                }
            }
        };
        // The feed brings them within milliseconds; past the wait the reader still misses
        // nothing (its cursor reads the log), it only starts further back.
        let _ = tokio::time::timeout(CATCH_UP_WAIT, wait).await;
        Ok(())
    }

    /// The room's epoch.
    pub fn epoch(&self) -> String {
        self.state().record.epoch.clone()
    }

    /// Enters `user` into the room on one stream and opens a cursor for it.
    ///
    /// With `after_seq`, the cursor replays exactly the messages after it; without, the
    /// last `history` messages. Both then go live without a gap or a duplicate: the cursor
    /// subscribes to the ring *before* it reads the committed seq, and the feed advances
    /// that seq *before* it publishes, so every message is either at or below the seq read
    /// (replayed from the log) or still to come on the ring (or both: the cursor drops what
    /// it has already delivered).
    pub async fn join(
        self: &Arc<Self>,
        user: &str,
        after_seq: Option<u64>,
        epoch: &str,
        history: u64,
    ) -> Result<(pb::Joined, Cursor, Presence), ChatError> {
        self.caught_up().await?;
        let resume = match after_seq {
            Some(seq) => Some(self.resume_point(seq, epoch).await?),
            None => None,
        };
        let (joined, cursor, presence, entered) = {
            let mut state = self.state();
            admit(&state.record, user)?;
            let removed = state
                .removals
                .entry(nickname::key(user))
                .or_insert_with(|| watch::channel(None).0)
                .subscribe();
            let live = self.events.subscribe();
            let head = self.head_seq();
            let start_after = resume
                .as_ref()
                .map_or_else(|| head.saturating_sub(history), |r| r.after);
            let streams = state.streams.entry(user.to_owned()).or_insert(0);
            *streams += 1;
            let mut entered = None;
            if *streams == 1 {
                // Under the lock, so this node's changes reach the engine in order.
                let (applied, done) = oneshot::channel();
                self.engine.presence(
                    &self.name,
                    PresenceChange::Enter(user.to_owned()),
                    Some(applied),
                );
                entered = Some(done);
            }
            let mut members = self.roster().clone();
            // Present now, whenever the feed tells the roster.
            members.insert(user.to_owned());
            let joined = pb::Joined {
                room: Some(info(&state.record, members.len(), head)),
                members: members.into_iter().collect(),
                replay_from_seq: start_after + 1,
                epoch: state.record.epoch.clone(),
            };
            let mut cursor =
                Cursor::new(self.clone(), live, start_after, head, Some(user.to_owned()));
            if let Some((epoch, through)) = resume.and_then(|r| r.reset) {
                cursor = cursor.after_reset(epoch, through);
            }
            // Made before anything is awaited: however the join ends, the user leaves.
            let presence = Presence::new(self.clone(), user.to_owned(), removed);
            (joined, cursor, presence, entered)
        };
        if let Some(entered) = entered {
            // Present over every node before the join is answered, so that a member list
            // asked for next has the user (the wait is bounded: the engine may be away).
            let _ = tokio::time::timeout(ENTER_WAIT, entered).await;
        }
        Ok((joined, cursor, presence))
    }

    /// Opens a read-only cursor (no presence): after `after_seq` (of `epoch`, if named),
    /// or live from the head.
    pub async fn tail(
        self: &Arc<Self>,
        after_seq: Option<u64>,
        epoch: &str,
    ) -> Result<Cursor, ChatError> {
        self.caught_up().await?;
        let resume = match after_seq {
            Some(seq) => Some(self.resume_point(seq, epoch).await?),
            None => None,
        };
        let live = self.events.subscribe();
        let head = self.head_seq();
        let after = resume.as_ref().map_or(head, |r| r.after);
        let cursor = Cursor::new(self.clone(), live, after, head, None);
        Ok(match resume.and_then(|r| r.reset) {
            Some((epoch, through)) => cursor.after_reset(epoch, through),
            None => cursor,
        })
    }

    /// One of `user`'s streams left; the last one here makes the user leave this node.
    pub(super) fn exit(&self, user: &str) {
        let mut state = self.state();
        let Some(streams) = state.streams.get_mut(user) else {
            return;
        };
        *streams -= 1;
        if *streams == 0 {
            state.streams.remove(user);
            state.removals.remove(&nickname::key(user));
            self.engine
                .presence(&self.name, PresenceChange::Exit(user.to_owned()), None);
        }
    }

    /// One of `old`'s streams is `new` from now on: this node's streams follow, and the
    /// room hears of it as a rename when that was `old`'s last stream here and `new`'s
    /// first (as a join or a leave when the user is here under the other name on another
    /// stream). The new name's removal signal, for the stream's `Presence`.
    pub(super) fn rename(&self, old: &str, new: &str) -> watch::Receiver<Option<Arc<Removal>>> {
        let mut state = self.state();
        let old_gone = match state.streams.get_mut(old) {
            Some(streams) if *streams > 1 => {
                *streams -= 1;
                false
            }
            _ => {
                state.streams.remove(old);
                state.removals.remove(&nickname::key(old));
                true
            }
        };
        let streams = state.streams.entry(new.to_owned()).or_insert(0);
        *streams += 1;
        let new_here = *streams == 1;
        let removed = state
            .removals
            .entry(nickname::key(new))
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        let change = match (old_gone, new_here) {
            (true, true) => Some(PresenceChange::Rename {
                old: old.to_owned(),
                new: new.to_owned(),
            }),
            (true, false) => Some(PresenceChange::Exit(old.to_owned())),
            (false, true) => Some(PresenceChange::Enter(new.to_owned())),
            (false, false) => None,
        };
        if let Some(change) = change {
            self.engine.presence(&self.name, change, None);
        }
        removed
    }

    fn publish(&self, event: RoomEvent) {
        // `send` fails only when no one is reading, which is fine.
        let _ = self.events.send(event);
    }
}

impl Feed for Room {
    fn readers(&self) -> usize {
        self.events.receiver_count()
    }

    fn deliver(&self, event: FeedEvent) {
        match event {
            FeedEvent::Message(message) => {
                // The feed delivers in order; one already here is a repeat.
                if message.seq <= self.head_seq() {
                    return;
                }
                self.committed.store(message.seq, Ordering::SeqCst);
                self.publish(RoomEvent::Message(message));
            }
            FeedEvent::Presence(presence) => {
                // Under the roster's lock, so presence events are in the same order as
                // the roster's changes.
                let mut roster = self.roster();
                match presence.kind() {
                    pb::PresenceKind::Joined => {
                        roster.insert(presence.user.clone());
                    }
                    pb::PresenceKind::Left => {
                        roster.remove(&presence.user);
                    }
                    pb::PresenceKind::Renamed => {
                        roster.remove(&presence.previous);
                        roster.insert(presence.user.clone());
                    }
                    pb::PresenceKind::Unspecified => return,
                }
                self.publish(RoomEvent::Presence(presence));
            }
            FeedEvent::Typing(typing) => self.publish(RoomEvent::Typing(typing)),
            FeedEvent::Topic { topic, by } => {
                let mut state = self.state();
                state.record.topic = topic;
                let members = self.roster().len();
                // Published under the lock, so topic changes reach readers in order.
                self.publish(RoomEvent::Updated(Arc::new(pb::RoomUpdated {
                    room: Some(info(&state.record, members, self.head_seq())),
                    updated_by: by,
                })));
            }
            FeedEvent::Access { user, access } => {
                let mut state = self.state();
                match access {
                    Some(access) => state.record.access.insert(user, access),
                    None => state.record.access.remove(&user),
                };
            }
            FeedEvent::Resync { record, members } => {
                let mut state = self.state();
                state.record.access = record.access;
                let mut roster = self.roster();
                *roster = members.into_iter().collect();
                if state.record.topic != record.topic {
                    state.record.topic = record.topic;
                    self.publish(RoomEvent::Updated(Arc::new(pb::RoomUpdated {
                        room: Some(info(&state.record, roster.len(), self.head_seq())),
                        updated_by: String::new(),
                    })));
                }
            }
            FeedEvent::Reset { epoch } => {
                let mut state = self.state();
                if state.record.epoch == epoch {
                    return;
                }
                tracing::warn!(
                    room = self.name,
                    epoch,
                    "the room's log was lost: a new epoch"
                );
                state.record.epoch.clone_from(&epoch);
                // Under the lock: a join reads the epoch and the head together.
                self.committed.store(0, Ordering::SeqCst);
                self.publish(RoomEvent::Reset(epoch));
            }
            FeedEvent::Removed { user, removal } => {
                let mut state = self.state();
                if let Some(removals) = state.removals.get(&user) {
                    removals.send_replace(Some(removal));
                    // Streams that join from now on get a fresh, unremoved channel.
                    state.removals.insert(user, watch::channel(None).0);
                }
            }
        }
    }
}

fn info(record: &RoomRecord, members: usize, head_seq: u64) -> pb::RoomInfo {
    pb::RoomInfo {
        name: record.name.clone(),
        topic: record.topic.clone(),
        head_seq,
        member_count: u32::try_from(members).unwrap_or(u32::MAX),
        created_at: Some(record.created_at.into()),
        created_by: record.created_by.clone(),
        private: record.private,
    }
}

/// Up to `limit` items of a sorted sequence after `after`, and whether more follow.
pub(super) fn page<'a>(
    sorted: impl Iterator<Item = &'a String>,
    after: Option<&str>,
    limit: usize,
) -> (Vec<String>, bool) {
    let mut items = sorted.skip_while(|item| after.is_some_and(|after| item.as_str() <= after));
    let page: Vec<String> = items.by_ref().take(limit).cloned().collect();
    let more = items.next().is_some();
    (page, more)
}

/// Where a resume starts, and, when its epoch was not the room's, the reset to say first
/// (the room's epoch, and the last seq the reader had of the old one).
struct Resume {
    after: u64,
    reset: Option<(String, u64)>,
}

/// A new room's record.
pub(super) fn new_record(name: &str, topic: &str, creator: &str, private: bool) -> RoomRecord {
    RoomRecord {
        name: name.to_owned(),
        topic: topic.to_owned(),
        created_at: SystemTime::now(),
        created_by: creator.to_owned(),
        head_seq: 0,
        private,
        access: Default::default(),
        epoch: crate::engine::new_epoch(),
    }
}
