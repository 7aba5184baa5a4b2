//! The hub: every room, its seq counter, its members and its fan-out ring.
//!
//! A [`Room`] appends under a short std `Mutex`: check the idempotency key, take the next
//! seq, and hand the message to the store. When the store has committed it, the store's
//! callback (in seq order) advances the room's committed seq and publishes one
//! [`RoomEvent`] on the room's `broadcast` channel; only then is the sender acked. So
//! readers and senders only ever see committed messages, and a seq once seen is never
//! reused, even across a crash. The event holds a [`ChatMessage`], an `Arc` that encodes
//! once, so a room of N readers costs one allocation and one encode per message, not N.
//!
//! Readers are [`Cursor`]s into that ring (see `cursor.rs`); membership is a [`Presence`]
//! guard whose `Drop` sends the leave event, so however a session ends (leave, stream end,
//! dropped connection, shutdown, panic) the user leaves the room at once.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use confab::{
    ChatMessage, ChatMessageRecord,
    pb::{self, PresenceKind},
};
use dashmap::{DashMap, mapref::entry::Entry};
use futures::{FutureExt as _, future::Shared};
use tokio::sync::{broadcast, oneshot, watch};

use crate::{
    cursor::Cursor,
    error::{ChatError, quote},
    limits::Limits,
    metrics::Metrics,
    nickname,
    store::{Access, Committed, RoomRecord, SentKey, Store, StoreError, on_commit},
    validate::Outgoing,
};

/// Settings of the hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Events each room's ring holds. A reader that falls further behind reads the missed
    /// messages from the store; the ring bounds memory, not correctness.
    pub ring_capacity: usize,
    /// Messages replayed to a join that does not resume from a seq.
    pub history_on_join: u64,
    /// How long a `client_msg_id` is recognised as a retry.
    pub dedupe_window: Duration,
}

/// Idempotency keys remembered per room in memory; older ones are found in the store.
const RECENT_SENDS: usize = 4096;

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
}

/// Where an appended message landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Its seq in the room.
    pub seq: u64,
    /// True when the idempotency key was seen before and nothing new was stored.
    pub duplicate: bool,
}

/// Why the owner put a user out of a room, as its streams are told.
#[derive(Debug, Clone, PartialEq)]
pub struct Removal {
    /// Kicked or banned.
    pub reason: pb::LeaveReason,
    /// The owner who did it.
    pub by: String,
    /// The owner's words, if any.
    pub message: String,
}

/// What the owner does to a user.
#[derive(Debug, Clone, PartialEq)]
pub enum Moderation {
    /// Admit to the private room, and lift a ban.
    Invite,
    /// Put out; may come back.
    Kick(String),
    /// Put out and keep out.
    Ban(String),
}

/// A chat room.
pub struct Room {
    /// The room's name (validated; never changes).
    name: String,
    /// Whether only the owner and invited users may enter (never changes).
    private: bool,
    /// The fan-out ring. Every reader holds a `Receiver`: a position in it. Only
    /// committed messages are published, in seq order.
    events: broadcast::Sender<RoomEvent>,
    /// The seq of the newest committed message: what readers may be given. Advanced by
    /// the store's callback before it publishes, so a reader that subscribes and then
    /// reads it finds every message either at or below it or on the ring.
    committed: AtomicU64,
    /// Seq, topic, members, recent idempotency keys. A std `Mutex`: held for a few
    /// operations, never across an `.await`, and it is what orders appends, so seqs are
    /// assigned without holes and reach the store in order.
    state: Mutex<RoomState>,
    /// Shared figures (messages in, commit latency).
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
    /// What the store keeps about the room; `head_seq` is the last *assigned* seq, which
    /// may be ahead of `Room::committed` while a group commit is under way.
    record: RoomRecord,
    /// Present users and how many of their streams joined. A `BTreeMap` so that member
    /// lists come out sorted, as `ListMembers` pages them.
    members: BTreeMap<String, usize>,
    /// Per present user (lower-cased), where a kick or ban is announced to each of
    /// their streams in the room.
    removals: HashMap<String, watch::Sender<Option<Arc<Removal>>>>,
    /// Recent idempotency keys, including those whose message is not committed yet (the
    /// store cannot see those), so a quick retry waits for the original instead of being
    /// stored twice.
    recent: RecentSends,
}

/// The outcome of a commit, awaitable by the sender and by any retry of the same key.
type Commit = Shared<oneshot::Receiver<Result<(), StoreError>>>;

/// Recent `(sender, client_msg_id)` → seq, oldest first, and what has been forgotten.
///
/// Every key of this process's sends is here until it is forgotten (oldest first, and only
/// once its message is committed); every other key is in the store. Of the keys in the
/// store that are still within the dedupe window (at start: all of them; later: the
/// forgotten ones) a fingerprint is kept, so that a new key, whose fingerprint is not
/// among them, needs no store read at all; a matching fingerprint (a retry, or rarely a
/// collision) is looked up. `forgotten_through` makes that lookup exact (see
/// [`Room::append`]): every key with a higher seq is here.
#[derive(Debug)]
struct RecentSends {
    by_key: HashMap<(String, String), (u64, SystemTime, Commit)>,
    order: VecDeque<(String, String)>,
    /// Every key with a seq above this is in `by_key` (or was never sent).
    forgotten_through: u64,
    /// Fingerprints of the stored keys within the window, oldest first, with when their
    /// message was sent (to let them go as the window moves on).
    fingerprints: VecDeque<(SystemTime, u64)>,
    /// How many of `fingerprints` have each value.
    counts: HashMap<u64, u32>,
    /// Keyed per room, so that no one can aim collisions at it.
    hasher: std::hash::RandomState,
}

impl RecentSends {
    /// Nothing recent; the store holds the room's messages up to `stored_through`, those
    /// sent within the window with `stored` keys (in any order).
    fn new(stored_through: u64, mut stored: Vec<SentKey>) -> Self {
        let mut recent = Self {
            by_key: HashMap::new(),
            order: VecDeque::new(),
            forgotten_through: stored_through,
            fingerprints: VecDeque::new(),
            counts: HashMap::new(),
            hasher: std::hash::RandomState::new(),
        };
        stored.sort_by_key(|key| key.sent_at);
        for key in stored {
            let fingerprint = recent.fingerprint(&key.sender, &key.client_msg_id);
            recent.remember(key.sent_at, fingerprint);
        }
        recent
    }

    fn fingerprint(&self, sender: &str, client_msg_id: &str) -> u64 {
        use std::hash::BuildHasher as _;
        self.hasher.hash_one((sender, client_msg_id))
    }

    fn remember(&mut self, sent: SystemTime, fingerprint: u64) {
        self.fingerprints.push_back((sent, fingerprint));
        *self.counts.entry(fingerprint).or_insert(0) += 1;
    }

    fn get(&self, key: &(String, String), since: SystemTime) -> Option<(u64, Commit)> {
        let (seq, sent, commit) = self.by_key.get(key)?;
        (*sent >= since).then(|| (*seq, commit.clone()))
    }

    /// Whether `key`, not here, may be in the store as a send after `since`; lets go of
    /// the fingerprints older than that.
    fn may_be_stored(&mut self, key: &(String, String), since: SystemTime) -> bool {
        while let Some((sent, fingerprint)) = self.fingerprints.front().copied()
            && sent < since
        {
            self.fingerprints.pop_front();
            if let std::collections::hash_map::Entry::Occupied(mut count) =
                self.counts.entry(fingerprint)
            {
                *count.get_mut() -= 1;
                if *count.get() == 0 {
                    count.remove();
                }
            }
        }
        // Most rooms have nothing stored within the window: no hash to compute.
        if self.counts.is_empty() {
            return false;
        }
        let fingerprint = self.fingerprint(&key.0, &key.1);
        self.counts.contains_key(&fingerprint)
    }

    fn insert(&mut self, key: (String, String), seq: u64, commit: Commit, committed: u64) {
        self.order.push_back(key.clone());
        self.by_key.insert(key, (seq, SystemTime::now(), commit));
        // Forget the oldest keys once their message is committed (the store finds them
        // from then on); one still in flight is kept, however many there are.
        while self.order.len() > RECENT_SENDS {
            let oldest = &self.order[0];
            if self
                .by_key
                .get(oldest)
                .is_some_and(|(seq, ..)| *seq > committed)
            {
                break;
            }
            if let Some(oldest) = self.order.pop_front()
                && let Some((seq, sent, _)) = self.by_key.remove(&oldest)
            {
                self.forgotten_through = self.forgotten_through.max(seq);
                let fingerprint = self.fingerprint(&oldest.0, &oldest.1);
                self.remember(sent, fingerprint);
            }
        }
    }
}

/// What `Room::append` does next, decided under the room's lock.
enum Step {
    /// Wait for this commit (of the message, or of the original it repeats).
    Wait {
        seq: u64,
        duplicate: bool,
        commit: Commit,
    },
    /// Look the key up in the store (off the lock), which must have committed at least
    /// this seq for the answer to be exact.
    Lookup { committed: u64 },
}

fn now() -> prost_types::Timestamp {
    SystemTime::now().into()
}

impl Room {
    /// A room as `record` describes it; its log holds messages up to `record.head_seq`,
    /// those within the dedupe window sent with `stored` keys.
    fn new(
        record: RoomRecord,
        stored: Vec<SentKey>,
        ring_capacity: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (events, _) = broadcast::channel(ring_capacity);
        let recent = RecentSends::new(record.head_seq, stored);
        Self {
            name: record.name.clone(),
            private: record.private,
            events,
            committed: AtomicU64::new(record.head_seq),
            state: Mutex::new(RoomState {
                record,
                members: BTreeMap::new(),
                removals: HashMap::new(),
                recent,
            }),
            metrics,
        }
    }

    /// The shared figures.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
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

    /// The owner's `action` on `target`; PERMISSION_DENIED unless `by` owns the room.
    /// Resolves once what must be kept (an invite, a ban) is stored; a kicked or banned
    /// user's streams are put out at once.
    pub async fn moderate(
        &self,
        store: &dyn Store,
        by: &str,
        target: &str,
        action: Moderation,
    ) -> Result<(), ChatError> {
        let stored = {
            let mut state = self.state();
            owner_only(&state.record, by, "invite, kick or ban")?;
            let key = nickname::key(target);
            if key == nickname::key(&state.record.created_by) {
                return Err(ChatError::invalid(
                    "user",
                    "the owner cannot be put out of their own room",
                ));
            }
            let (access, removal) = match action {
                Moderation::Invite => (Some(Some(Access::Invited)), None),
                Moderation::Kick(message) => (None, Some((pb::LeaveReason::Kicked, message))),
                Moderation::Ban(message) => (
                    Some(Some(Access::Banned)),
                    Some((pb::LeaveReason::Banned, message)),
                ),
            };
            if let Some((reason, message)) = removal {
                match state.removals.get(&key) {
                    Some(removals) => {
                        removals.send_replace(Some(Arc::new(Removal {
                            reason,
                            by: by.to_owned(),
                            message,
                        })));
                        // Streams that join from now on get a fresh, unremoved channel.
                        state.removals.insert(key.clone(), watch::channel(None).0);
                    }
                    // A ban also keeps out someone who is not here; a kick has no one
                    // to put out, and the owner should know (a typo, or they left).
                    None if reason == pb::LeaveReason::Kicked => {
                        return Err(ChatError::precondition(
                            "user",
                            format!("{} is not in room {}", quote(target), quote(&self.name)),
                        ));
                    }
                    None => {}
                }
            }
            access.map(|access| {
                match access {
                    Some(access) => state.record.access.insert(key.clone(), access),
                    None => state.record.access.remove(&key),
                };
                let (done, stored) = on_commit();
                store.set_access(&self.name, &key, access, done);
                stored
            })
        };
        if let Some(stored) = stored {
            stored.await?;
        }
        Ok(())
    }

    fn state(&self) -> MutexGuard<'_, RoomState> {
        // Every update of the state is complete before anything that can panic, so a
        // poisoned lock still guards consistent data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The room's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The seq of the newest committed message.
    pub fn head_seq(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// The room as the protocol describes it.
    pub fn info(&self) -> pb::RoomInfo {
        info(&self.state(), self.head_seq())
    }

    /// Up to `limit` present users after `after` (exclusive), in order, and whether more follow.
    pub fn members_page(&self, after: Option<&str>, limit: usize) -> (Vec<String>, bool) {
        let state = self.state();
        page(state.members.keys(), after, limit)
    }

    /// Appends a message from `sender`, unless its idempotency key was seen already;
    /// resolves once the message (or the original it repeats) is committed.
    ///
    /// The room's lock is held only for memory work: the recent keys, the seq, handing the
    /// message to the store's queue. When the key is not recent but could be a stored one
    /// (after a restart, or once it was forgotten), the store is asked on a blocking
    /// thread with the lock released; then, under the lock again, the answer counts only
    /// if the store had committed every forgotten key by then (`RecentSends`), and a key
    /// sent meanwhile is in the recent keys. Otherwise it asks again, so a retry within
    /// the dedupe window is always acked with its original seq.
    async fn append(
        self: &Arc<Self>,
        store: &Arc<dyn Store>,
        limits: &Limits,
        sender: &str,
        message: Outgoing,
        dedupe_window: Duration,
    ) -> Result<Published, ChatError> {
        let mut key = (sender.to_owned(), message.client_msg_id.clone());
        let mut message = Some(message);
        // The committed seq at the last store lookup that found nothing.
        let mut looked_up: Option<u64> = None;
        let (seq, duplicate, commit) = loop {
            let since = SystemTime::now() - dedupe_window;
            let step = {
                let mut state = self.state();
                admit(&state.record, sender)?;
                if let Some((seq, commit)) = state.recent.get(&key, since) {
                    // A retry of a recent send (a client resending what it sent before a
                    // reconnect) costs no token: it stores nothing.
                    Step::Wait {
                        seq,
                        duplicate: true,
                        commit,
                    }
                } else {
                    if looked_up.is_none() {
                        // Before the store is asked about older sends: a refused flood
                        // costs no read.
                        limits.send(sender)?;
                    }
                    let exact = looked_up
                        .is_some_and(|committed| state.recent.forgotten_through <= committed);
                    if !exact && state.recent.may_be_stored(&key, since) {
                        Step::Lookup {
                            committed: self.head_seq(),
                        }
                    } else {
                        let Some(message) = message.take() else {
                            unreachable!("a message is appended once: the loop ends here");
                        };
                        // Taken, not cloned: the loop ends with this step.
                        let key = std::mem::take(&mut key);
                        let (seq, commit) = self.assign(&mut state, store.as_ref(), key, message);
                        Step::Wait {
                            seq,
                            duplicate: false,
                            commit,
                        }
                    }
                }
            };
            match step {
                Step::Wait {
                    seq,
                    duplicate,
                    commit,
                } => break (seq, duplicate, commit),
                Step::Lookup { committed } => {
                    if let Some(seq) = self.find_sent(store, sender, &key.1, since).await? {
                        // Found in the store: committed already.
                        return Ok(Published {
                            seq,
                            duplicate: true,
                        });
                    }
                    looked_up = Some(committed);
                }
            }
        };
        match commit.await {
            Ok(Ok(())) => Ok(Published { seq, duplicate }),
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(StoreError::Closed.into()),
        }
    }

    /// Takes the next seq for `message` and hands it to the store; called under the lock,
    /// so the store gets each room's messages in seq order.
    fn assign(
        self: &Arc<Self>,
        state: &mut RoomState,
        store: &dyn Store,
        key: (String, String),
        message: Outgoing,
    ) -> (u64, Commit) {
        let seq = state.record.head_seq + 1;
        state.record.head_seq = seq;
        let stored = ChatMessage::new(ChatMessageRecord {
            room: self.name.clone(),
            seq,
            sender: key.0.clone(),
            text: message.text,
            kind: message.kind as i32,
            client_msg_id: message.client_msg_id,
            sent_at: Some(now()),
        });
        let (tx, rx) = oneshot::channel();
        let commit = rx.shared();
        state
            .recent
            .insert(key, seq, commit.clone(), self.head_seq());
        store.append(
            stored.clone(),
            self.on_committed(stored, tx, Instant::now()),
        );
        (seq, commit)
    }

    /// The store's seq for `sender`'s `client_msg_id` sent after `since`, read on a
    /// blocking thread: a SQLite read may wait on the disk (or its busy timeout), which
    /// neither the room's lock nor a runtime worker should.
    async fn find_sent(
        &self,
        store: &Arc<dyn Store>,
        sender: &str,
        client_msg_id: &str,
        since: SystemTime,
    ) -> Result<Option<u64>, StoreError> {
        let (store, room, sender, id) = (
            store.clone(),
            self.name.clone(),
            sender.to_owned(),
            client_msg_id.to_owned(),
        );
        tokio::task::spawn_blocking(move || store.find_sent(&room, &sender, &id, since))
            .await
            .map_err(|_| StoreError::ReadPanicked)?
    }

    /// What the store calls when `message` is committed: advance the committed seq, publish
    /// it to the readers, and resolve the sender's wait. The store calls these in seq order.
    fn on_committed(
        self: &Arc<Self>,
        message: ChatMessage,
        sender: oneshot::Sender<Result<(), StoreError>>,
        appended: Instant,
    ) -> Committed {
        let room = self.clone();
        Box::new(move |result| {
            if result.is_ok() {
                room.metrics.committed(appended.elapsed());
                room.metrics.messages_in.inc();
                room.committed.store(message.seq, Ordering::SeqCst);
                // `send` fails only when no one is reading, which is fine.
                let _ = room.events.send(RoomEvent::Message(message));
            }
            let _ = sender.send(result);
        })
    }

    /// Sets the topic as `user`, who must own the room (PERMISSION_DENIED otherwise);
    /// every reader hears of it once it is stored.
    pub async fn set_topic(
        &self,
        store: &dyn Store,
        user: &str,
        topic: &str,
    ) -> Result<(), ChatError> {
        let stored = {
            let mut state = self.state();
            owner_only(&state.record, user, "set the topic")?;
            state.record.topic = topic.to_owned();
            // Built under the lock, published by the store's callback (which must not take
            // the lock), so topic changes reach readers in the order they were made.
            let update = RoomEvent::Updated(Arc::new(pb::RoomUpdated {
                room: Some(info(&state, self.head_seq())),
                updated_by: user.to_owned(),
            }));
            let events = self.events.clone();
            let (done, stored) = on_commit();
            store.set_topic(
                &self.name,
                topic,
                Box::new(move |result| {
                    if result.is_ok() {
                        let _ = events.send(update);
                    }
                    done(result);
                }),
            );
            stored
        };
        stored.await?;
        Ok(())
    }

    /// Tells readers that `user` is or stopped typing.
    pub fn typing(&self, user: &str, typing: bool) {
        let _ = self
            .events
            .send(RoomEvent::Typing(Arc::new(pb::TypingEvent {
                room: self.name.clone(),
                user: user.to_owned(),
                typing,
            })));
    }

    /// Enters `user` into the room on one stream and opens a cursor for it.
    ///
    /// With `after_seq`, the cursor replays exactly the messages after it; without, the
    /// last `history` messages. Both then go live without a gap or a duplicate: the cursor
    /// subscribes to the ring *before* it reads the committed seq, and the store's callback
    /// advances that seq *before* it publishes, so every message is either at or below the
    /// seq read (replayed from the store) or still to come on the ring (or both: the
    /// cursor drops what it has already delivered).
    pub fn join(
        self: &Arc<Self>,
        store: Arc<dyn Store>,
        user: &str,
        after_seq: Option<u64>,
        history: u64,
    ) -> Result<(pb::Joined, Cursor, Presence), ChatError> {
        let mut state = self.state();
        admit(&state.record, user)?;
        let removed = state
            .removals
            .entry(nickname::key(user))
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        let live = self.events.subscribe();
        let head = self.head_seq();
        let start_after = match after_seq {
            // A client that saw more than exists (the server lost its memory) gets live
            // messages only; there is nothing to replay.
            Some(seq) => seq.min(head),
            None => head.saturating_sub(history),
        };
        let streams = state.members.entry(user.to_owned()).or_insert(0);
        *streams += 1;
        if *streams == 1 {
            self.presence(user, PresenceKind::Joined);
        }
        let joined = pb::Joined {
            room: Some(info(&state, head)),
            members: state.members.keys().cloned().collect(),
            replay_from_seq: start_after + 1,
        };
        drop(state);
        let cursor = Cursor::new(
            self.clone(),
            store,
            live,
            start_after,
            head,
            Some(user.to_owned()),
        );
        let presence = Presence {
            room: self.clone(),
            user: user.to_owned(),
            removed,
        };
        Ok((joined, cursor, presence))
    }

    /// Opens a read-only cursor (no presence): after `after_seq`, or live from the head.
    pub fn tail(self: &Arc<Self>, store: Arc<dyn Store>, after_seq: Option<u64>) -> Cursor {
        let live = self.events.subscribe();
        let head = self.head_seq();
        let start_after = after_seq.map_or(head, |seq| seq.min(head));
        Cursor::new(self.clone(), store, live, start_after, head, None)
    }

    /// One of `user`'s streams left; the last one makes the user leave.
    fn exit(&self, user: &str) {
        let mut state = self.state();
        let Some(streams) = state.members.get_mut(user) else {
            return;
        };
        *streams -= 1;
        if *streams == 0 {
            state.members.remove(user);
            state.removals.remove(&nickname::key(user));
            self.presence(user, PresenceKind::Left);
        }
    }

    /// Publishes a presence event; called with the state lock held, so presence events are
    /// in the same order as the member set changes.
    fn presence(&self, user: &str, kind: PresenceKind) {
        let _ = self
            .events
            .send(RoomEvent::Presence(Arc::new(pb::PresenceEvent {
                room: self.name.clone(),
                user: user.to_owned(),
                kind: kind as i32,
                at: Some(now()),
                previous: String::new(),
            })));
    }

    /// One of `old`'s streams is `new` from now on: the member set follows, and the room
    /// hears of it as a rename when that was `old`'s last stream and `new`'s first (as a
    /// join or a leave when the user is present under the other name on another stream).
    /// The new name's removal signal, for the stream's `Presence`.
    fn rename(&self, old: &str, new: &str) -> watch::Receiver<Option<Arc<Removal>>> {
        let mut state = self.state();
        let old_gone = match state.members.get_mut(old) {
            Some(streams) if *streams > 1 => {
                *streams -= 1;
                false
            }
            _ => {
                state.members.remove(old);
                state.removals.remove(&nickname::key(old));
                true
            }
        };
        let streams = state.members.entry(new.to_owned()).or_insert(0);
        *streams += 1;
        let new_here = *streams == 1;
        let removed = state
            .removals
            .entry(nickname::key(new))
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        match (old_gone, new_here) {
            (true, true) => {
                let _ = self
                    .events
                    .send(RoomEvent::Presence(Arc::new(pb::PresenceEvent {
                        room: self.name.clone(),
                        user: new.to_owned(),
                        kind: PresenceKind::Renamed as i32,
                        at: Some(now()),
                        previous: old.to_owned(),
                    })));
            }
            (true, false) => self.presence(old, PresenceKind::Left),
            (false, true) => self.presence(new, PresenceKind::Joined),
            (false, false) => {}
        }
        removed
    }
}

fn info(state: &RoomState, head_seq: u64) -> pb::RoomInfo {
    let record = &state.record;
    pb::RoomInfo {
        name: record.name.clone(),
        topic: record.topic.clone(),
        head_seq,
        member_count: u32::try_from(state.members.len()).unwrap_or(u32::MAX),
        created_at: Some(record.created_at.into()),
        created_by: record.created_by.clone(),
        private: record.private,
    }
}

/// PERMISSION_DENIED unless `user` owns the room `record` describes.
fn owner_only(record: &RoomRecord, user: &str, what: &str) -> Result<(), ChatError> {
    if nickname::key(user) == nickname::key(&record.created_by) {
        return Ok(());
    }
    Err(ChatError::denied(
        "room",
        format!("only the room's owner ({}) may {what}", record.created_by),
    ))
}

/// Whether `user` may be in the room `record` describes.
fn admit(record: &RoomRecord, user: &str) -> Result<(), ChatError> {
    if !record.private && record.access.is_empty() {
        return Ok(());
    }
    let key = nickname::key(user);
    if key == nickname::key(&record.created_by) {
        return Ok(());
    }
    match record.access.get(&key) {
        Some(Access::Banned) => Err(ChatError::denied(
            "room",
            format!("you are banned from room {}", quote(&record.name)),
        )),
        Some(Access::Invited) => Ok(()),
        None if record.private => Err(ChatError::denied(
            "room",
            format!(
                "room {} is private; its owner must invite you",
                quote(&record.name)
            ),
        )),
        None => Ok(()),
    }
}

/// Up to `limit` items of a sorted sequence after `after`, and whether more follow.
fn page<'a>(
    sorted: impl Iterator<Item = &'a String>,
    after: Option<&str>,
    limit: usize,
) -> (Vec<String>, bool) {
    let mut items = sorted.skip_while(|item| after.is_some_and(|after| item.as_str() <= after));
    let page: Vec<String> = items.by_ref().take(limit).cloned().collect();
    let more = items.next().is_some();
    (page, more)
}

/// A user's presence in a room through one stream. Dropping it leaves.
#[derive(Debug)]
pub struct Presence {
    room: Arc<Room>,
    user: String,
    /// Becomes `Some` when the owner puts the user out.
    removed: watch::Receiver<Option<Arc<Removal>>>,
}

impl Presence {
    /// Whether `new` may be in this presence's room (checked for every room before a
    /// rename changes any).
    pub fn admits(&self, new: &str) -> Result<(), ChatError> {
        self.room.admit(new)
    }

    /// This stream's user is `new` from now on (see `Room::rename`).
    pub fn rename(&mut self, new: &str) {
        self.removed = self.room.rename(&self.user, new);
        new.clone_into(&mut self.user);
    }

    /// Resolves when the owner kicks or bans the user (never, otherwise).
    pub fn removed(&self) -> impl std::future::Future<Output = Arc<Removal>> + Send + 'static {
        let mut removed = self.removed.clone();
        async move {
            loop {
                if let Some(removal) = removed.borrow_and_update().clone() {
                    return removal;
                }
                if removed.changed().await.is_err() {
                    // The member left and its channel is gone: nothing more will come.
                    return std::future::pending().await;
                }
            }
        }
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.room.exit(&self.user);
    }
}

/// All rooms.
pub struct Hub {
    /// Rooms by name. A `DashMap`: lookups on every command from every session, sharded
    /// so they do not contend; each room has its own lock for its own state.
    rooms: DashMap<String, Arc<Room>>,
    /// The storage engine.
    store: Arc<dyn Store>,
    /// Settings.
    config: HubConfig,
    /// Rate limits and counts.
    limits: Arc<Limits>,
    /// Shared figures.
    metrics: Arc<Metrics>,
}

impl Hub {
    /// A hub over `store`, with the rooms it already holds.
    pub fn new(
        store: Arc<dyn Store>,
        config: HubConfig,
        limits: Arc<Limits>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let rooms = DashMap::new();
        for record in store.rooms()? {
            // The keys a send may repeat: those stored within the dedupe window.
            let stored =
                store.sent_since(&record.name, SystemTime::now() - config.dedupe_window)?;
            rooms.insert(
                record.name.clone(),
                Arc::new(Room::new(
                    record,
                    stored,
                    config.ring_capacity,
                    metrics.clone(),
                )),
            );
        }
        Ok(Self {
            rooms,
            store,
            config,
            limits,
            metrics,
        })
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The shared figures.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// How many rooms there are.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// The storage engine.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The settings.
    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// The room `name`, named by request field `field`; NOT_FOUND if it does not exist.
    pub fn room(&self, field: &str, name: &str) -> Result<Arc<Room>, ChatError> {
        self.rooms
            .get(name)
            .map(|room| room.clone())
            .ok_or_else(|| ChatError::room_not_found(field, name))
    }

    /// Creates room `name`; ALREADY_EXISTS if it exists. Resolves once it is stored.
    pub async fn create_room(
        &self,
        name: &str,
        topic: &str,
        creator: &str,
        private: bool,
    ) -> Result<Arc<Room>, ChatError> {
        if self.rooms.contains_key(name) {
            return Err(ChatError::RoomExists(name.to_owned()));
        }
        self.limits.create_room(creator, self.rooms.len())?;
        let (room, stored) = match self.rooms.entry(name.to_owned()) {
            Entry::Occupied(_) => return Err(ChatError::RoomExists(name.to_owned())),
            Entry::Vacant(slot) => {
                let (room, stored) = self.new_room(name, topic, creator, private);
                (slot.insert(room).clone(), stored)
            }
        };
        stored.await?;
        Ok(room)
    }

    /// The room `name`, created (by `creator`, without a topic) if it does not exist.
    pub async fn open_room(&self, name: &str, creator: &str) -> Result<Arc<Room>, ChatError> {
        if let Some(room) = self.rooms.get(name) {
            return Ok(room.clone());
        }
        self.limits.create_room(creator, self.rooms.len())?;
        let (room, stored) = match self.rooms.entry(name.to_owned()) {
            Entry::Occupied(room) => return Ok(room.get().clone()),
            Entry::Vacant(slot) => {
                let (room, stored) = self.new_room(name, "", creator, false);
                (slot.insert(room).clone(), stored)
            }
        };
        stored.await?;
        Ok(room)
    }

    /// A new room, and the wait for its record to be stored. The write is queued while the
    /// map's entry is held, so it reaches the store before any message of the room.
    fn new_room(
        &self,
        name: &str,
        topic: &str,
        creator: &str,
        private: bool,
    ) -> (
        Arc<Room>,
        impl std::future::Future<Output = Result<(), StoreError>> + use<>,
    ) {
        let record = RoomRecord {
            name: name.to_owned(),
            topic: topic.to_owned(),
            created_at: SystemTime::now(),
            created_by: creator.to_owned(),
            head_seq: 0,
            private,
            access: Default::default(),
        };
        let room = Arc::new(Room::new(
            record.clone(),
            Vec::new(),
            self.config.ring_capacity,
            self.metrics.clone(),
        ));
        let (done, stored) = on_commit();
        self.store.create_room(record, done);
        tracing::info!(room = name, by = creator, "room created");
        (room, stored)
    }

    /// Up to `limit` of the rooms `user` may know of ([`Room::visible_to`]) after `after`
    /// (exclusive) in name order, and whether more follow.
    pub fn rooms_page(
        &self,
        user: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<Arc<Room>>, bool) {
        let mut rooms: Vec<Arc<Room>> = self
            .rooms
            .iter()
            .filter(|room| room.visible_to(user))
            .map(|room| room.value().clone())
            .collect();
        rooms.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let start = rooms.partition_point(|room| after.is_some_and(|after| *room.name <= *after));
        let end = rooms.len().min(start + limit);
        let more = end < rooms.len();
        (rooms.drain(start..end).collect(), more)
    }

    /// Appends `message` from `sender` to its room (which must exist); resolves once it is
    /// committed.
    pub async fn publish(
        &self,
        field: &str,
        sender: &str,
        message: Outgoing,
    ) -> Result<Published, ChatError> {
        let room = self.room(field, &message.room)?;
        room.append(
            &self.store,
            &self.limits,
            sender,
            message,
            self.config.dedupe_window,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use confab::MessageKind;

    use super::*;
    use crate::{cursor::Delivery, store::MemoryStore};

    fn hub(ring_capacity: usize) -> Hub {
        limited_hub(ring_capacity, crate::limits::LimitConfig::unlimited())
    }

    fn limited_hub(ring_capacity: usize, limits: crate::limits::LimitConfig) -> Hub {
        let metrics = Arc::new(Metrics::new());
        let limits = Limits::new(limits, metrics.clone());
        Hub::new(
            Arc::new(MemoryStore::new()),
            HubConfig {
                ring_capacity,
                history_on_join: 3,
                dedupe_window: Duration::from_secs(600),
            },
            Arc::new(limits.unwrap()),
            metrics,
        )
        .unwrap()
    }

    async fn say(hub: &Hub, room: &str, text: &str) -> Published {
        hub.publish(
            "room",
            "alice",
            Outgoing {
                room: room.into(),
                text: text.into(),
                client_msg_id: format!("id-{text}"),
                kind: MessageKind::Text,
            },
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn retries_of_recent_sends_cost_no_send_token() {
        let hub = limited_hub(
            16,
            crate::limits::LimitConfig {
                send_rate: 0.001,
                send_burst: 2,
                ..crate::limits::LimitConfig::unlimited()
            },
        );
        hub.open_room("r", "alice").await.unwrap();
        assert_eq!(say(&hub, "r", "a").await.seq, 1);
        for _ in 0..5 {
            let retry = say(&hub, "r", "a").await;
            assert_eq!((retry.seq, retry.duplicate), (1, true));
        }
        assert_eq!(say(&hub, "r", "b").await.seq, 2, "the burst's second token");
        let refused = hub
            .publish(
                "room",
                "alice",
                Outgoing {
                    room: "r".into(),
                    text: "c".into(),
                    client_msg_id: "id-c".into(),
                    kind: MessageKind::Text,
                },
            )
            .await;
        assert!(matches!(refused, Err(ChatError::ResourceExhausted { .. })));
        assert_eq!(hub.room("room", "r").unwrap().head_seq(), 2);
    }

    #[tokio::test]
    async fn a_retry_of_a_forgotten_send_gets_its_original_seq_from_the_store() {
        let hub = hub(16);
        hub.open_room("r", "alice").await.unwrap();
        assert_eq!(say(&hub, "r", "first").await.seq, 1);
        for n in 0..RECENT_SENDS + 10 {
            say(&hub, "r", &n.to_string()).await;
        }
        let head = hub.room("room", "r").unwrap().head_seq();
        assert_eq!(head, RECENT_SENDS as u64 + 11);
        let retry = say(&hub, "r", "first").await;
        assert_eq!(
            retry,
            Published {
                seq: 1,
                duplicate: true
            }
        );
        assert_eq!(hub.room("room", "r").unwrap().head_seq(), head);
    }

    #[tokio::test]
    async fn a_retry_after_a_restart_gets_its_original_seq_from_the_store() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let open = |store: Arc<dyn Store>| {
            let metrics = Arc::new(Metrics::new());
            let limits =
                Limits::new(crate::limits::LimitConfig::unlimited(), metrics.clone()).unwrap();
            Hub::new(
                store,
                HubConfig {
                    ring_capacity: 16,
                    history_on_join: 3,
                    dedupe_window: Duration::from_secs(600),
                },
                Arc::new(limits),
                metrics,
            )
            .unwrap()
        };
        let before = open(store.clone());
        before.open_room("r", "alice").await.unwrap();
        assert_eq!(say(&before, "r", "a").await.seq, 1);
        assert_eq!(say(&before, "r", "b").await.seq, 2);
        drop(before);
        let after = open(store);
        assert_eq!(
            say(&after, "r", "a").await,
            Published {
                seq: 1,
                duplicate: true
            }
        );
        assert_eq!(say(&after, "r", "c").await.seq, 3);
    }

    /// A memory store whose idempotency lookups for `slow` wait until the test lets them
    /// go, as a SQLite read may wait on a busy disk.
    struct SlowLookups {
        inner: MemoryStore,
        /// Told when a lookup for `slow` starts; waited on before it ends.
        gate: std::sync::Mutex<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>,
    }

    impl Store for SlowLookups {
        fn rooms(&self) -> Result<Vec<RoomRecord>, StoreError> {
            self.inner.rooms()
        }
        fn create_room(&self, room: RoomRecord, done: Committed) {
            self.inner.create_room(room, done)
        }
        fn append(&self, message: ChatMessage, done: Committed) {
            self.inner.append(message, done)
        }
        fn set_topic(&self, room: &str, topic: &str, done: Committed) {
            self.inner.set_topic(room, topic, done)
        }
        fn set_access(&self, room: &str, user: &str, access: Option<Access>, done: Committed) {
            self.inner.set_access(room, user, access, done)
        }
        fn apply_retention(&self, retention: crate::store::Retention, done: Committed) {
            self.inner.apply_retention(retention, done)
        }
        fn read_after(&self, room: &str, after: u64, limit: usize) -> StoreResult {
            self.inner.read_after(room, after, limit)
        }
        fn read_before(&self, room: &str, before: u64, limit: usize) -> StoreResult {
            self.inner.read_before(room, before, limit)
        }
        fn first_seq(&self, room: &str) -> Result<Option<u64>, StoreError> {
            self.inner.first_seq(room)
        }
        fn sent_since(&self, room: &str, since: SystemTime) -> Result<Vec<SentKey>, StoreError> {
            self.inner.sent_since(room, since)
        }
        fn find_sent(
            &self,
            room: &str,
            sender: &str,
            id: &str,
            since: SystemTime,
        ) -> Result<Option<u64>, StoreError> {
            if sender == "slow" {
                let gate = self.gate.lock().unwrap();
                let _ = gate.0.send(());
                let _ = gate.1.recv();
            }
            self.inner.find_sent(room, sender, id, since)
        }
    }

    type StoreResult = Result<Vec<ChatMessage>, StoreError>;

    /// A retry whose idempotency key must be looked up in a slow store holds up no one
    /// else in its room: the lookup runs with the room's lock released (and a new key,
    /// whose fingerprint matches no stored one, is not looked up at all).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_idempotency_lookup_holds_up_no_one_else() {
        let (release, released) = std::sync::mpsc::channel();
        let (entered, lookup_started) = std::sync::mpsc::channel();
        let inner = MemoryStore::new();
        // A room with a message `slow` sent just now, as after a restart: its retry must
        // be looked up in the store.
        let (done, stored) = on_commit();
        inner.create_room(
            RoomRecord {
                name: "r".into(),
                topic: String::new(),
                created_at: SystemTime::now(),
                created_by: "alice".into(),
                head_seq: 0,
                private: false,
                access: Default::default(),
            },
            done,
        );
        stored.await.unwrap();
        let (done, stored) = on_commit();
        inner.append(
            ChatMessage::new(ChatMessageRecord {
                room: "r".into(),
                seq: 1,
                sender: "slow".into(),
                text: "before the restart".into(),
                kind: 1,
                client_msg_id: "s1".into(),
                sent_at: Some(now()),
            }),
            done,
        );
        stored.await.unwrap();
        let store = SlowLookups {
            inner,
            gate: std::sync::Mutex::new((entered, released)),
        };
        let metrics = Arc::new(Metrics::new());
        let limits = Limits::new(crate::limits::LimitConfig::unlimited(), metrics.clone());
        let hub = Arc::new(
            Hub::new(
                Arc::new(store),
                HubConfig {
                    ring_capacity: 16,
                    history_on_join: 3,
                    dedupe_window: Duration::from_secs(600),
                },
                Arc::new(limits.unwrap()),
                metrics,
            )
            .unwrap(),
        );
        let send = |hub: Arc<Hub>, sender: &'static str, id: &'static str| async move {
            let message = Outgoing {
                room: "r".into(),
                text: "hi".into(),
                client_msg_id: id.into(),
                kind: MessageKind::Text,
            };
            hub.publish("room", sender, message).await
        };
        let slow = tokio::spawn(send(hub.clone(), "slow", "s1"));
        // The waits below block this (the test's) thread, not the runtime's workers: if
        // the room's lock were held through the lookup, bob's send would block a worker
        // and the wait would fail instead of hanging.
        let wait = Duration::from_secs(20);
        lookup_started
            .recv_timeout(wait)
            .expect("slow's lookup to start");
        let (sent, fast) = std::sync::mpsc::channel();
        tokio::spawn(async move {
            let _ = sent.send(send(hub, "bob", "b1").await);
        });
        let fast = fast
            .recv_timeout(wait)
            .expect("bob's send is not held up by slow's lookup")
            .unwrap();
        assert_eq!(fast.seq, 2);
        assert!(!slow.is_finished(), "slow's lookup is still waiting");
        release.send(()).unwrap();
        assert_eq!(
            slow.await.unwrap().unwrap(),
            Published {
                seq: 1,
                duplicate: true
            }
        );
    }

    async fn next_seq(cursor: &mut Cursor) -> u64 {
        loop {
            match cursor.next().await.unwrap() {
                Some(Delivery::Event(RoomEvent::Message(m))) => return m.seq,
                Some(_) => continue,
                None => panic!("cursor ended"),
            }
        }
    }

    #[tokio::test]
    async fn seqs_count_up_without_holes_and_retries_are_deduplicated() {
        let hub = hub(16);
        hub.open_room("r", "alice").await.unwrap();
        assert_eq!(say(&hub, "r", "a").await.seq, 1);
        assert_eq!(say(&hub, "r", "b").await.seq, 2);
        let retry = say(&hub, "r", "a").await;
        assert_eq!(
            retry,
            Published {
                seq: 1,
                duplicate: true
            }
        );
        assert_eq!(say(&hub, "r", "c").await.seq, 3);
    }

    #[tokio::test]
    async fn a_lagging_cursor_reads_what_it_missed_from_the_store() {
        let hub = hub(4);
        let room = hub.open_room("r", "alice").await.unwrap();
        let mut cursor = room.tail(hub.store().clone(), Some(0));
        for i in 0..50 {
            say(&hub, "r", &i.to_string()).await;
        }
        for expected in 1..=50 {
            assert_eq!(next_seq(&mut cursor).await, expected);
        }
    }

    #[tokio::test]
    async fn join_replays_recent_history_then_goes_live() {
        let hub = hub(16);
        let room = hub.open_room("r", "alice").await.unwrap();
        for i in 0..10 {
            say(&hub, "r", &i.to_string()).await;
        }
        let (joined, mut cursor, _presence) =
            room.join(hub.store().clone(), "bob", None, 3).unwrap();
        assert_eq!(joined.replay_from_seq, 8);
        assert_eq!(joined.members, vec!["bob".to_string()]);
        say(&hub, "r", "live").await;
        for expected in 8..=11 {
            assert_eq!(next_seq(&mut cursor).await, expected);
        }
    }

    #[tokio::test]
    async fn dropping_the_last_presence_leaves_the_room() {
        let hub = hub(16);
        let room = hub.open_room("r", "alice").await.unwrap();
        let mut watcher = room.tail(hub.store().clone(), None);
        let (_, _, first) = room.join(hub.store().clone(), "bob", None, 0).unwrap();
        let (_, _, second) = room.join(hub.store().clone(), "bob", None, 0).unwrap();
        drop(first);
        assert_eq!(room.info().member_count, 1);
        drop(second);
        assert_eq!(room.info().member_count, 0);
        let mut kinds = Vec::new();
        while kinds.len() < 2 {
            if let Some(Delivery::Event(RoomEvent::Presence(p))) = watcher.next().await.unwrap() {
                kinds.push(p.kind());
            }
        }
        assert_eq!(kinds, vec![PresenceKind::Joined, PresenceKind::Left]);
    }

    #[test]
    fn pages_are_sorted_and_say_whether_more_follow() {
        let names: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            page(names.iter(), None, 2),
            (vec!["a".into(), "b".into()], true)
        );
        assert_eq!(
            page(names.iter(), Some("b"), 2),
            (vec!["c".into(), "d".into()], false)
        );
        assert_eq!(page(names.iter(), Some("d"), 2), (vec![], false));
    }
}
