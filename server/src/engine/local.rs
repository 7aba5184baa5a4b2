//! [`LocalEngine`]: one node, its rooms in memory, its log in a [`Store`] (SQLite, or
//! memory with `--in-memory`), its feed an in-process call.
//!
//! A room appends under a short std `Mutex`: check the idempotency key, take the next
//! seq, and hand the message to the store. The store may hand back the commit (a
//! [`Lead`]: no commit was under way), which the sender's task runs once the lock is let
//! go: one small commit on a runtime worker, with no hand-off to the store's thread. A
//! sender's run of messages (the sends a stream had already buffered) all take their
//! places before that commit, so one commit carries the run. When the store has
//! committed a message, the store's callback (in seq order) advances the room's committed
//! seq and delivers the message to the room's feed; only then is the sender acked. So
//! readers and senders only ever see committed messages, and a seq once seen is never
//! reused, even across a crash.

use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use async_trait::async_trait;
use confab::{ChatMessage, ChatMessageRecord, pb};
use dashmap::{DashMap, mapref::entry::Entry};
use futures::FutureExt as _;
use tokio::sync::oneshot;

use super::{
    Applied, Attached, Charge, Engine, EngineError, Feed, FeedEvent, PresenceChange, Published,
    recent::{Commit, RecentSends},
};
use crate::{
    error::ChatError,
    metrics::Metrics,
    store::{Access, Committed, Lead, Retention, RoomRecord, Store, StoreError, on_commit},
    validate::Outgoing,
};

/// Most readers a room may have for its sender to commit a message itself ([`Lead`]):
/// half of a tokio worker's local run queue (256 tasks).
const LEAD_READERS: usize = 128;

/// The engine of a server that is alone: every room in this process.
pub struct LocalEngine {
    /// Where the rooms and their logs are kept.
    store: Arc<dyn Store>,
    /// Every room, loaded at start. A `DashMap`: sharded, so lookups do not contend.
    rooms: DashMap<String, Arc<LocalRoom>>,
    /// How long a `client_msg_id` is recognised as a retry.
    dedupe_window: Duration,
    /// Shared figures (messages in, commit latency).
    metrics: Arc<Metrics>,
}

/// One room of the local engine.
struct LocalRoom {
    /// The room's name.
    name: String,
    /// The seq of the newest committed message. Advanced by the store's callback before it
    /// delivers the message to the feed.
    committed: AtomicU64,
    /// The record (whose `head_seq` is the last *assigned* seq, which may be ahead of
    /// `committed` while a group commit is under way) and the recent idempotency keys. A
    /// std `Mutex`: held for a few operations, never across an `.await`, and it is what
    /// orders appends, so seqs are assigned without holes and reach the store in order.
    state: Mutex<LocalState>,
    /// The node's room, once the hub attached it.
    feed: OnceLock<Weak<dyn Feed>>,
    /// Who is present. A lock of its own, held while the change is delivered (so the
    /// feed's presence events are in the order of the changes) and never while taking
    /// another: the hub calls `presence` under its room's lock, and a commit callback run
    /// inline under `state` takes that lock.
    members: Mutex<BTreeSet<String>>,
}

struct LocalState {
    record: RoomRecord,
    /// Recent idempotency keys, including those whose message is not committed yet (the
    /// store cannot see those), so a quick retry waits for the original instead of being
    /// stored twice.
    recent: RecentSends,
}

/// What [`LocalEngine::place`] does next, decided under the room's lock.
enum Step {
    /// Wait for this commit (of the message, or of the original it repeats).
    Wait {
        seq: u64,
        duplicate: bool,
        commit: Commit,
        /// The store's commit, when no commit was under way (see [`RunLead`]).
        lead: Lead,
    },
    /// Look the key up in the store (off the lock), which must have committed at least
    /// this seq for the answer to be exact.
    Lookup { committed: u64 },
}

/// Where a message of a run stands once it has its place.
enum Placed {
    /// A retry of a message the store holds: committed long ago.
    Stored(Published),
    /// Its seq (or the original's, for a retry) and the commit to wait for.
    Waiting {
        seq: u64,
        duplicate: bool,
        commit: Commit,
    },
}

/// The store's commit, when one of a run's messages found none under way: the run's task
/// runs it once every message has its place, and the rooms whose readers it wakes.
#[derive(Default)]
struct RunLead {
    lead: Option<Lead>,
    /// The rooms of the run's new messages, each once.
    rooms: Vec<Arc<LocalRoom>>,
}

impl RunLead {
    /// A new message of `room` was queued, handing back `lead`.
    fn queued(&mut self, room: &Arc<LocalRoom>, lead: Lead) {
        if lead.is_held() {
            self.lead = Some(lead);
        }
        if !self.rooms.iter().any(|r| Arc::ptr_eq(r, room)) {
            self.rooms.push(room.clone());
        }
    }

    /// Commits what has queued, on this task, if the run holds the lead; or hands it to
    /// the store's thread.
    ///
    /// With the rooms' locks let go: a commit here holds up no one else in the rooms, and
    /// anyone who queued meanwhile shares it. Not when the commit wakes more readers than
    /// a runtime worker's local queue holds well: woken from a worker, they would overflow
    /// it and be run out of order (fan-out 1,000 × 500 msg/s: p50 13 against 8.5 ms);
    /// woken from the store's thread, they queue in order.
    ///
    /// No yield after the commit, though it is blocking work that tokio's budget counts as
    /// one step of 128: a sender whose frames are buffered commits run after run before its
    /// worker runs anything else, until the budget is spent. Yielding after each commit put
    /// the publisher behind every connection's task, one message per write: fan-out 100 ×
    /// 10,000 msg/s went from p50 3 ms to 22 s. Counting a commit as eight steps (a yield
    /// every 16) still cost p99: 32–136 against 8–25 ms at 12,000 msg/s.
    fn commit(&mut self) {
        let rooms = std::mem::take(&mut self.rooms);
        if let Some(lead) = self.lead.take() {
            if rooms.iter().map(|room| room.readers()).sum::<usize>() <= LEAD_READERS {
                lead.commit();
            } else {
                drop(lead);
            }
        }
    }
}

impl LocalRoom {
    fn new(record: RoomRecord, recent: RecentSends) -> Self {
        Self {
            name: record.name.clone(),
            committed: AtomicU64::new(record.head_seq),
            state: Mutex::new(LocalState { record, recent }),
            feed: OnceLock::new(),
            members: Mutex::new(BTreeSet::new()),
        }
    }

    fn state(&self) -> MutexGuard<'_, LocalState> {
        // Every update of the state is complete before anything that can panic, so a
        // poisoned lock still guards consistent data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    fn deliver(&self, event: FeedEvent) {
        if let Some(feed) = self.feed.get().and_then(Weak::upgrade) {
            feed.deliver(event);
        }
    }

    /// How many readers the room's messages wake.
    fn readers(&self) -> usize {
        self.feed
            .get()
            .and_then(Weak::upgrade)
            .map_or(0, |feed| feed.readers())
    }

    /// A [`Committed`] callback that delivers `event` once the write is stored, then
    /// resolves the returned wait.
    fn deliver_on_commit(
        self: &Arc<Self>,
        event: FeedEvent,
    ) -> (
        Committed,
        impl Future<Output = Result<(), StoreError>> + use<>,
    ) {
        let (done, stored) = on_commit();
        let room = self.clone();
        let done: Committed = Box::new(move |result| {
            if result.is_ok() {
                room.deliver(event);
            }
            done(result);
        });
        (done, stored)
    }
}

impl LocalEngine {
    /// The engine over `store`, with every room it holds and the idempotency keys stored
    /// within `dedupe_window`.
    pub fn open(
        store: Arc<dyn Store>,
        dedupe_window: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let rooms = DashMap::new();
        for record in store.rooms()? {
            // The keys a send may repeat: those stored within the dedupe window.
            let stored = store.sent_since(&record.name, SystemTime::now() - dedupe_window)?;
            let recent = RecentSends::new(record.head_seq, stored);
            rooms.insert(
                record.name.clone(),
                Arc::new(LocalRoom::new(record, recent)),
            );
        }
        Ok(Self {
            store,
            rooms,
            dedupe_window,
            metrics,
        })
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn local(&self, room: &str) -> Result<Arc<LocalRoom>, StoreError> {
        self.rooms
            .get(room)
            .map(|room| room.clone())
            .ok_or_else(|| StoreError::NoSuchRoom(room.to_owned()))
    }

    /// Takes the next seq for `message` and hands it to the store; called under the lock,
    /// so the store gets each room's messages in seq order.
    fn assign(
        &self,
        room: &Arc<LocalRoom>,
        state: &mut LocalState,
        key: (String, String),
        message: Outgoing,
    ) -> (u64, Commit, Lead) {
        let seq = state.record.head_seq + 1;
        state.record.head_seq = seq;
        let stored = ChatMessage::new(ChatMessageRecord {
            room: room.name.clone(),
            seq,
            sender: key.0.clone(),
            text: message.text,
            kind: message.kind as i32,
            client_msg_id: message.client_msg_id,
            sent_at: Some(SystemTime::now().into()),
        });
        let (tx, rx) = oneshot::channel();
        let commit = rx.shared();
        state
            .recent
            .insert(key, seq, commit.clone(), room.committed());
        let lead = self
            .store
            .append(stored.clone(), self.on_committed(room, stored, tx));
        (seq, commit, lead)
    }

    /// What the store calls when `message` is committed: advance the committed seq, deliver
    /// it to the feed, and resolve the sender's wait. The store calls these in seq order.
    fn on_committed(
        &self,
        room: &Arc<LocalRoom>,
        message: ChatMessage,
        sender: oneshot::Sender<Result<(), StoreError>>,
    ) -> Committed {
        let room = room.clone();
        let metrics = self.metrics.clone();
        let appended = Instant::now();
        Box::new(move |result| {
            if result.is_ok() {
                metrics.committed(appended.elapsed());
                metrics.messages_in.inc();
                room.committed.store(message.seq, Ordering::SeqCst);
                room.deliver(FeedEvent::Message(message));
            }
            let _ = sender.send(result);
        })
    }

    /// The store's seq for `sender`'s `client_msg_id` sent after `since`, read on a
    /// blocking thread: a SQLite read may wait on the disk (or its busy timeout), which
    /// neither the room's lock nor a runtime worker should.
    async fn find_sent(
        &self,
        room: &str,
        sender: &str,
        client_msg_id: &str,
        since: SystemTime,
    ) -> Result<Option<u64>, StoreError> {
        let (store, room, sender, id) = (
            self.store.clone(),
            room.to_owned(),
            sender.to_owned(),
            client_msg_id.to_owned(),
        );
        tokio::task::spawn_blocking(move || store.find_sent(&room, &sender, &id, since))
            .await
            .map_err(|_| StoreError::ReadPanicked)?
    }

    /// Gives `sender`'s `message` its place in its room (unless its idempotency key was
    /// used within the dedupe window): its seq and its turn in the store's queue, or, for
    /// a retry, the original's. The commit is left to the run ([`RunLead`]).
    async fn place(
        &self,
        sender: &str,
        message: Outgoing,
        charge: Charge<'_>,
        lead: &mut RunLead,
    ) -> Result<Placed, ChatError> {
        let local = self.local(&message.room)?;
        let mut key = (sender.to_owned(), message.client_msg_id.clone());
        let mut message = Some(message);
        // The committed seq at the last store lookup that found nothing.
        let mut looked_up: Option<u64> = None;
        // The room's lock is held only for memory work: the recent keys, the seq, handing
        // the message to the store's queue. When the key is not recent but could be a
        // stored one (after a restart, or once it was forgotten), the store is asked on a
        // blocking thread with the lock released; then, under the lock again, the answer
        // counts only if the store had committed every forgotten key by then
        // (`RecentSends`), and a key sent meanwhile is in the recent keys. Otherwise it
        // asks again, so a retry within the dedupe window is always acked with its
        // original seq.
        loop {
            let since = SystemTime::now() - self.dedupe_window;
            let step = {
                let mut state = local.state();
                if let Some((seq, commit)) = state.recent.get(&key, since) {
                    // A retry of a recent send (a client resending what it sent before a
                    // reconnect) costs no token: it stores nothing.
                    Step::Wait {
                        seq,
                        duplicate: true,
                        commit,
                        lead: Lead::none(),
                    }
                } else {
                    if looked_up.is_none() {
                        // Before the store is asked about older sends: a refused flood
                        // costs no read.
                        charge()?;
                    }
                    let exact = looked_up
                        .is_some_and(|committed| state.recent.forgotten_through <= committed);
                    if !exact && state.recent.may_be_stored(&key, since) {
                        Step::Lookup {
                            committed: local.committed(),
                        }
                    } else {
                        let Some(message) = message.take() else {
                            unreachable!("a message is appended once: the loop ends here");
                        };
                        // Taken, not cloned: the loop ends with this step.
                        let key = std::mem::take(&mut key);
                        let (seq, commit, queued) = self.assign(&local, &mut state, key, message);
                        Step::Wait {
                            seq,
                            duplicate: false,
                            commit,
                            lead: queued,
                        }
                    }
                }
            };
            match step {
                Step::Wait {
                    seq,
                    duplicate,
                    commit,
                    lead: queued,
                } => {
                    if !duplicate {
                        lead.queued(&local, queued);
                    }
                    return Ok(Placed::Waiting {
                        seq,
                        duplicate,
                        commit,
                    });
                }
                Step::Lookup { committed } => {
                    // No lead is held through a read: everyone's commits would wait on it.
                    lead.commit();
                    if let Some(seq) = self.find_sent(&local.name, sender, &key.1, since).await? {
                        // Found in the store: committed already.
                        return Ok(Placed::Stored(Published {
                            seq,
                            duplicate: true,
                        }));
                    }
                    looked_up = Some(committed);
                }
            }
        }
    }
}

#[async_trait]
impl Engine for LocalEngine {
    fn node_id(&self) -> &str {
        "local"
    }

    async fn room(&self, name: &str) -> Result<Option<RoomRecord>, EngineError> {
        Ok(self.rooms.get(name).map(|room| {
            let mut record = room.state().record.clone();
            record.head_seq = room.committed();
            record
        }))
    }

    async fn room_names(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, EngineError> {
        let mut names: Vec<String> = self
            .rooms
            .iter()
            .map(|room| room.key().clone())
            .filter(|name| after.is_none_or(|after| name.as_str() > after))
            .collect();
        names.sort_unstable();
        names.truncate(limit);
        Ok(names)
    }

    async fn room_count(&self) -> Result<usize, EngineError> {
        Ok(self.rooms.len())
    }

    async fn create_room(&self, record: RoomRecord) -> Result<bool, EngineError> {
        let stored = match self.rooms.entry(record.name.clone()) {
            Entry::Occupied(_) => return Ok(false),
            Entry::Vacant(slot) => {
                // Queued while the map's entry is held, so the room reaches the store
                // before any message of it.
                let (done, stored) = on_commit();
                self.store.create_room(record.clone(), done);
                let recent = RecentSends::new(0, Vec::new());
                slot.insert(Arc::new(LocalRoom::new(record, recent)));
                stored
            }
        };
        stored.await?;
        Ok(true)
    }

    async fn attach(&self, room: &str) -> Result<Option<Attached>, EngineError> {
        Ok(self.rooms.get(room).map(|local| {
            let mut record = local.state().record.clone();
            record.head_seq = local.committed();
            Attached {
                record,
                // Presence is this node's alone, and nothing of the room is here yet.
                members: Vec::new(),
            }
        }))
    }

    fn feed(&self, room: &str, feed: Weak<dyn Feed>) {
        // Nothing happens in a room before the hub has it, so nothing is held: every
        // event comes from a call through the hub's room, which is fed from its start.
        if let Ok(local) = self.local(room) {
            let _ = local.feed.set(feed);
        }
    }

    async fn append(
        &self,
        sender: &str,
        run: Vec<Outgoing>,
        charge: Charge<'_>,
    ) -> Vec<Result<Published, ChatError>> {
        // Every message takes its place first (its seq, its turn in the store's queue);
        // only then does the run's lead commit, so that one commit carries the whole run
        // instead of one commit each.
        let mut lead = RunLead::default();
        let mut placed = Vec::with_capacity(run.len());
        for message in run {
            placed.push(self.place(sender, message, charge, &mut lead).await);
        }
        lead.commit();
        let mut published = Vec::with_capacity(placed.len());
        for place in placed {
            published.push(match place {
                Ok(Placed::Stored(stored)) => Ok(stored),
                Ok(Placed::Waiting {
                    seq,
                    duplicate,
                    commit,
                }) => match commit.await {
                    Ok(Ok(())) => Ok(Published { seq, duplicate }),
                    Ok(Err(error)) => Err(EngineError::from(error).into()),
                    Err(_) => Err(EngineError::from(StoreError::Closed).into()),
                },
                Err(error) => Err(error),
            });
        }
        published
    }

    async fn set_topic(&self, room: &str, by: &str, topic: &str) -> Result<(), EngineError> {
        let local = self.local(room)?;
        let stored = {
            let mut state = local.state();
            topic.clone_into(&mut state.record.topic);
            // Queued under the lock, delivered by the store's callback (in write order),
            // so topic changes reach readers in the order they were made.
            let (done, stored) = local.deliver_on_commit(FeedEvent::Topic {
                topic: topic.to_owned(),
                by: by.to_owned(),
            });
            self.store.set_topic(room, topic, done);
            stored
        };
        Ok(stored.await?)
    }

    async fn set_access(
        &self,
        room: &str,
        user: &str,
        access: Option<Access>,
    ) -> Result<(), EngineError> {
        let local = self.local(room)?;
        let stored = {
            let mut state = local.state();
            match access {
                Some(access) => state.record.access.insert(user.to_owned(), access),
                None => state.record.access.remove(user),
            };
            let (done, stored) = local.deliver_on_commit(FeedEvent::Access {
                user: user.to_owned(),
                access,
            });
            self.store.set_access(room, user, access, done);
            stored
        };
        Ok(stored.await?)
    }

    fn announce(&self, room: &str, event: FeedEvent) {
        if let Ok(local) = self.local(room) {
            local.deliver(event);
        }
    }

    fn presence(&self, room: &str, change: PresenceChange, applied: Option<Applied>) {
        let Ok(local) = self.local(room) else {
            return;
        };
        let mut members = local.members.lock().unwrap_or_else(|e| e.into_inner());
        // This node is every node: each change is announced as it is.
        let (kind, user, previous) = match change {
            PresenceChange::Enter(user) => {
                members.insert(user.clone());
                (pb::PresenceKind::Joined, user, String::new())
            }
            PresenceChange::Exit(user) => {
                members.remove(&user);
                (pb::PresenceKind::Left, user, String::new())
            }
            PresenceChange::Rename { old, new } => {
                members.remove(&old);
                members.insert(new.clone());
                (pb::PresenceKind::Renamed, new, old)
            }
        };
        if let Some(applied) = applied {
            let _ = applied.send(());
        }
        local.deliver(FeedEvent::Presence(Arc::new(pb::PresenceEvent {
            room: room.to_owned(),
            user,
            kind: kind as i32,
            at: Some(SystemTime::now().into()),
            previous,
        })));
    }

    async fn hold_nickname(
        &self,
        _key: &str,
        _login: u64,
        _lease: Duration,
    ) -> Result<bool, EngineError> {
        // One node: its own registry of claims is every node's.
        Ok(true)
    }

    async fn release_nickname(&self, _key: &str, _login: u64) -> Result<(), EngineError> {
        Ok(())
    }

    async fn members(&self, room: &str) -> Result<Vec<String>, EngineError> {
        let local = self.local(room)?;
        let members = local.members.lock().unwrap_or_else(|e| e.into_inner());
        Ok(members.iter().cloned().collect())
    }

    async fn read_after(
        &self,
        room: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, EngineError> {
        Ok(self.store.read_after(room, after_seq, limit)?)
    }

    async fn read_before(
        &self,
        room: &str,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, EngineError> {
        Ok(self.store.read_before(room, before_seq, limit)?)
    }

    async fn first_seq(&self, room: &str) -> Result<Option<u64>, EngineError> {
        Ok(self.store.first_seq(room)?)
    }

    async fn head_seq(&self, room: &str) -> Result<u64, EngineError> {
        Ok(self.local(room)?.committed())
    }

    async fn apply_retention(&self, retention: Retention) -> Result<(), EngineError> {
        let (done, applied) = on_commit();
        self.store.apply_retention(retention, done);
        Ok(applied.await?)
    }

    async fn close(&self) {
        // Every acked message is committed already; closing checkpoints the WAL.
        let store = self.store.clone();
        if tokio::task::spawn_blocking(move || store.close())
            .await
            .is_err()
        {
            tracing::error!("closing the store panicked");
        }
    }
}
