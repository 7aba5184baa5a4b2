//! The hub: this node's rooms, each with its fan-out ring, fed by the engine.
//!
//! A [`Room`] is loaded the first time anything on this node touches it: the engine
//! describes it ([`Engine::attach`]) and feeds it from then on ([`Engine::feed`]), so a
//! room made on another node of a cluster is found here too. Sends go through the room to
//! the engine, which assigns the seq and commits; the commit comes back through the feed,
//! which puts it on the ring, so readers only ever see committed messages, and a seq once
//! seen is never reused, even across a crash.
//!
//! Readers are [`crate::cursor::Cursor`]s into that ring (see `cursor.rs`); membership is a
//! [`Presence`] guard whose `Drop` leaves.
//!
//! * `room.rs`: [`Room`], the ring and the feed;
//! * `access.rs`: who may be in a room, and the owner's [`Moderation`];
//! * `presence.rs`: [`Presence`].

mod access;
mod presence;
mod room;

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::OnceCell;

pub use access::Moderation;
pub use presence::Presence;
pub use room::{Room, RoomEvent};

use crate::{
    engine::{Engine, Feed, Published, in_place},
    error::ChatError,
    limits::Limits,
    metrics::Metrics,
    validate::Outgoing,
};

/// Settings of the hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Events each room's ring holds. A reader that falls further behind reads the missed
    /// messages from the log; the ring bounds memory, not correctness.
    pub ring_capacity: usize,
    /// Messages replayed to a join that does not resume from a seq.
    pub history_on_join: u64,
}

/// This node's rooms.
pub struct Hub {
    /// Rooms by name, each loaded once. A `DashMap`: lookups on every command from every
    /// session, sharded so they do not contend; each room has its own locks.
    rooms: DashMap<String, Arc<OnceCell<Arc<Room>>>>,
    /// The engine.
    engine: Arc<dyn Engine>,
    /// Settings.
    config: HubConfig,
    /// Rate limits and counts.
    limits: Arc<Limits>,
    /// Shared figures.
    metrics: Arc<Metrics>,
}

impl Hub {
    /// A hub over `engine`.
    pub fn new(
        engine: Arc<dyn Engine>,
        config: HubConfig,
        limits: Arc<Limits>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            rooms: DashMap::new(),
            engine,
            config,
            limits,
            metrics,
        }
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The shared figures.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// The settings.
    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// How many rooms there are (over every node).
    pub async fn room_count(&self) -> Result<usize, ChatError> {
        Ok(self.engine.room_count().await?)
    }

    /// The room `name`, named by request field `field`; NOT_FOUND if it does not exist.
    pub async fn room(&self, field: &str, name: &str) -> Result<Arc<Room>, ChatError> {
        if let Some(cell) = self.rooms.get(name)
            && let Some(room) = cell.get()
        {
            return Ok(room.clone());
        }
        let cell = self.rooms.entry(name.to_owned()).or_default().clone();
        match cell.get_or_try_init(|| self.load(field, name)).await {
            Ok(room) => Ok(room.clone()),
            Err(error) => {
                // A name that is not a room takes no memory. The cell goes only while no
                // one else holds it (the map's shard lock keeps anyone from taking it
                // meanwhile): a caller waiting on it tries the load next, on this same
                // cell, so a room is never loaded twice.
                self.rooms.remove_if(name, |_, held| {
                    Arc::ptr_eq(held, &cell) && !held.initialized() && Arc::strong_count(held) <= 2
                });
                Err(error)
            }
        }
    }

    /// Loads room `name` from the engine and has its feed delivered to it.
    async fn load(&self, field: &str, name: &str) -> Result<Arc<Room>, ChatError> {
        let attached = self
            .engine
            .attach(name)
            .await?
            .ok_or_else(|| ChatError::room_not_found(field, name))?;
        let room = Arc::new(Room::new(
            attached,
            self.config.ring_capacity,
            self.engine.clone(),
            self.metrics.clone(),
        ));
        let feed: Arc<dyn Feed> = room.clone();
        self.engine.feed(name, Arc::downgrade(&feed));
        Ok(room)
    }

    /// Creates room `name`; ALREADY_EXISTS if it exists. Resolves once it is stored.
    pub async fn create_room(
        &self,
        name: &str,
        topic: &str,
        creator: &str,
        private: bool,
    ) -> Result<Arc<Room>, ChatError> {
        if self.rooms.get(name).is_some_and(|cell| cell.initialized()) {
            return Err(ChatError::RoomExists(name.to_owned()));
        }
        self.limits
            .create_room(creator, self.engine.room_count().await?)?;
        let record = room::new_record(name, topic, creator, private);
        if !self.engine.create_room(record).await? {
            return Err(ChatError::RoomExists(name.to_owned()));
        }
        tracing::info!(room = name, by = creator, "room created");
        self.room("room", name).await
    }

    /// The room `name`, created (by `creator`, without a topic) if it does not exist.
    pub async fn open_room(&self, name: &str, creator: &str) -> Result<Arc<Room>, ChatError> {
        match self.room("room", name).await {
            Err(ChatError::RoomNotFound { .. }) => {}
            found => return found,
        }
        match self.create_room(name, "", creator, false).await {
            // Made meanwhile, here or on another node.
            Err(ChatError::RoomExists(_)) => self.room("room", name).await,
            made => made,
        }
    }

    /// Up to `limit` of the rooms `user` may know of ([`Room::visible_to`]) after `after`
    /// (exclusive) in name order, and whether more follow.
    pub async fn rooms_page(
        &self,
        user: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Arc<Room>>, bool), ChatError> {
        let mut page = Vec::new();
        let mut from = after.map(str::to_owned);
        loop {
            let names = self.engine.room_names(from.as_deref(), limit + 1).await?;
            let exhausted = names.len() <= limit;
            for name in names {
                let room = self.room("page_token", &name).await?;
                if room.visible_to(user) {
                    if page.len() == limit {
                        return Ok((page, true));
                    }
                    page.push(room);
                }
                from = Some(name);
            }
            if exhausted {
                return Ok((page, false));
            }
        }
    }

    /// Appends one message of `sender`'s to its room: [`Self::publish`] with a run of one.
    pub async fn publish_one(
        &self,
        field: &str,
        sender: &str,
        message: Outgoing,
    ) -> Result<Published, ChatError> {
        let mut published = self
            .publish(field, sender, vec![Ok(message)], |_| Ok(()))
            .await;
        published.pop().expect("one result per message")
    }

    /// Appends a run of `sender`'s messages, each to its room, in order: NOT_FOUND for a
    /// room that does not exist, `may_send`'s refusal, or PERMISSION_DENIED where `sender`
    /// may not be. A message the caller refused already keeps its place in the run with its
    /// refusal. Resolves once every message is committed (or refused), with one result per
    /// message, in the run's order; a refused message does not stop the rest.
    pub async fn publish(
        &self,
        field: &str,
        sender: &str,
        run: Vec<Result<Outgoing, ChatError>>,
        may_send: impl Fn(&str) -> Result<(), ChatError>,
    ) -> Vec<Result<Published, ChatError>> {
        // Per message, its refusal, if any; the rest go to the engine together.
        let mut refused = Vec::with_capacity(run.len());
        let mut admitted = Vec::with_capacity(run.len());
        let admit = async |message: Outgoing| {
            let room = self.room(field, &message.room).await?;
            may_send(&message.room)?;
            room.admit(sender)?;
            Ok::<_, ChatError>(message)
        };
        for message in run {
            let checked = match message {
                Ok(message) => admit(message).await,
                Err(error) => Err(error),
            };
            match checked {
                Ok(message) => {
                    refused.push(None);
                    admitted.push(message);
                }
                Err(error) => refused.push(Some(error)),
            }
        }
        let limits = &self.limits;
        let appended = self
            .engine
            .append(sender, admitted, &|| limits.send(sender))
            .await;
        in_place(refused, appended)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use confab::MessageKind;

    use std::time::SystemTime;

    use confab::{ChatMessage, ChatMessageRecord, pb::PresenceKind};

    use super::*;
    use crate::{
        cursor::{Cursor, Delivery},
        engine::LocalEngine,
        store::{
            Access, Committed, Lead, MemoryStore, RoomRecord, SentKey, Store, StoreError, on_commit,
        },
    };

    /// A hub over a local engine on `store`, whose idempotency keys last ten minutes.
    fn hub_on(
        store: Arc<dyn Store>,
        ring_capacity: usize,
        limits: crate::limits::LimitConfig,
    ) -> Hub {
        let metrics = Arc::new(Metrics::new());
        let limits = Limits::new(limits, metrics.clone()).unwrap();
        let engine = LocalEngine::open(store, Duration::from_secs(600), metrics.clone()).unwrap();
        Hub::new(
            Arc::new(engine),
            HubConfig {
                ring_capacity,
                history_on_join: 3,
            },
            Arc::new(limits),
            metrics,
        )
    }

    fn hub(ring_capacity: usize) -> Hub {
        limited_hub(ring_capacity, crate::limits::LimitConfig::unlimited())
    }

    fn limited_hub(ring_capacity: usize, limits: crate::limits::LimitConfig) -> Hub {
        hub_on(Arc::new(MemoryStore::new()), ring_capacity, limits)
    }

    async fn say(hub: &Hub, room: &str, text: &str) -> Published {
        hub.publish_one(
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
            .publish_one(
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
        assert_eq!(hub.room("room", "r").await.unwrap().head_seq(), 2);
    }

    #[tokio::test]
    async fn a_retry_of_a_forgotten_send_gets_its_original_seq_from_the_store() {
        let hub = hub(16);
        hub.open_room("r", "alice").await.unwrap();
        assert_eq!(say(&hub, "r", "first").await.seq, 1);
        for n in 0..crate::engine::RECENT_SENDS + 10 {
            say(&hub, "r", &n.to_string()).await;
        }
        let head = hub.room("room", "r").await.unwrap().head_seq();
        assert_eq!(head, crate::engine::RECENT_SENDS as u64 + 11);
        let retry = say(&hub, "r", "first").await;
        assert_eq!(
            retry,
            Published {
                seq: 1,
                duplicate: true
            }
        );
        assert_eq!(hub.room("room", "r").await.unwrap().head_seq(), head);
    }

    #[tokio::test]
    async fn a_retry_after_a_restart_gets_its_original_seq_from_the_store() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let open =
            |store: Arc<dyn Store>| hub_on(store, 16, crate::limits::LimitConfig::unlimited());
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

    /// What a [`Gated`] store holds until the test lets it go.
    #[derive(PartialEq)]
    enum Held {
        /// Idempotency lookups for `slow`, as a SQLite read may wait on a busy disk.
        SlowLookups,
        /// The first lead's commit, as a SQLite commit takes its time; messages appended
        /// meanwhile queue behind it, as they do in the SQLite writer.
        FirstLead,
    }

    /// A memory store that holds up what [`Held`] says.
    struct Gated {
        inner: MemoryStore,
        held: Held,
        /// Told of what happens ("lookup", "appended", "leading").
        told: std::sync::Mutex<std::sync::mpsc::Sender<&'static str>>,
        /// Waited on by what is held.
        release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
        /// With `FirstLead`: messages not committed yet, and whether the lead was given.
        queued: std::sync::Mutex<Vec<(ChatMessage, Committed)>>,
        led: std::sync::atomic::AtomicBool,
    }

    impl Gated {
        fn new(
            inner: MemoryStore,
            held: Held,
        ) -> (
            Arc<Self>,
            std::sync::mpsc::Receiver<&'static str>,
            std::sync::mpsc::Sender<()>,
        ) {
            let (told, events) = std::sync::mpsc::channel();
            let (release, released) = std::sync::mpsc::channel();
            let gated = Arc::new(Gated {
                inner,
                held,
                told: std::sync::Mutex::new(told),
                release: std::sync::Mutex::new(released),
                queued: std::sync::Mutex::new(Vec::new()),
                led: std::sync::atomic::AtomicBool::new(false),
            });
            (gated, events, release)
        }

        fn tell(&self, what: &'static str) {
            let _ = self.told.lock().unwrap().send(what);
        }

        fn commit_queued(&self) {
            for (message, done) in self.queued.lock().unwrap().drain(..) {
                self.inner.append(message, done).commit();
            }
        }
    }

    impl crate::store::Leader for Gated {
        fn lead(&self) {
            self.tell("leading");
            let _ = self.release.lock().unwrap().recv();
            self.commit_queued();
        }

        fn decline(&self) {
            self.commit_queued();
        }
    }

    /// The store the hub gets: the `Arc` is what a lead holds.
    struct GatedStore(Arc<Gated>);

    impl Store for GatedStore {
        fn rooms(&self) -> Result<Vec<RoomRecord>, StoreError> {
            self.0.inner.rooms()
        }
        fn create_room(&self, room: RoomRecord, done: Committed) {
            self.0.inner.create_room(room, done)
        }
        fn append(&self, message: ChatMessage, done: Committed) -> Lead {
            if self.0.held != Held::FirstLead {
                return self.0.inner.append(message, done);
            }
            self.0.queued.lock().unwrap().push((message, done));
            self.0.tell("appended");
            if self.0.led.swap(true, std::sync::atomic::Ordering::SeqCst) {
                Lead::none()
            } else {
                Lead::to(self.0.clone())
            }
        }
        fn set_topic(&self, room: &str, topic: &str, done: Committed) {
            self.0.inner.set_topic(room, topic, done)
        }
        fn set_access(&self, room: &str, user: &str, access: Option<Access>, done: Committed) {
            self.0.inner.set_access(room, user, access, done)
        }
        fn apply_retention(&self, retention: crate::store::Retention, done: Committed) {
            self.0.inner.apply_retention(retention, done)
        }
        fn read_after(&self, room: &str, after: u64, limit: usize) -> StoreResult {
            self.0.inner.read_after(room, after, limit)
        }
        fn read_before(&self, room: &str, before: u64, limit: usize) -> StoreResult {
            self.0.inner.read_before(room, before, limit)
        }
        fn first_seq(&self, room: &str) -> Result<Option<u64>, StoreError> {
            self.0.inner.first_seq(room)
        }
        fn sent_since(&self, room: &str, since: SystemTime) -> Result<Vec<SentKey>, StoreError> {
            self.0.inner.sent_since(room, since)
        }
        fn find_sent(
            &self,
            room: &str,
            sender: &str,
            id: &str,
            since: SystemTime,
        ) -> Result<Option<u64>, StoreError> {
            if self.0.held == Held::SlowLookups && sender == "slow" {
                self.0.tell("lookup");
                let _ = self.0.release.lock().unwrap().recv();
            }
            self.0.inner.find_sent(room, sender, id, since)
        }
    }

    /// A hub on a [`Gated`] store, without limits.
    fn gated_hub(store: Arc<Gated>) -> Arc<Hub> {
        let limits = crate::limits::LimitConfig::unlimited();
        Arc::new(hub_on(Arc::new(GatedStore(store)), 16, limits))
    }

    /// `sender` says "hi" in room `r` under the idempotency key `id`.
    async fn send(hub: Arc<Hub>, sender: &'static str, id: &'static str) -> Published {
        let message = Outgoing {
            room: "r".into(),
            text: "hi".into(),
            client_msg_id: id.into(),
            kind: MessageKind::Text,
        };
        hub.publish_one("room", sender, message).await.unwrap()
    }

    type StoreResult = Result<Vec<ChatMessage>, StoreError>;

    /// A retry whose idempotency key must be looked up in a slow store holds up no one
    /// else in its room: the lookup runs with the room's lock released (and a new key,
    /// whose fingerprint matches no stored one, is not looked up at all).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_idempotency_lookup_holds_up_no_one_else() {
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
                epoch: "e1".into(),
            },
            done,
        );
        stored.await.unwrap();
        let (done, stored) = on_commit();
        inner
            .append(
                ChatMessage::new(ChatMessageRecord {
                    room: "r".into(),
                    seq: 1,
                    sender: "slow".into(),
                    text: "before the restart".into(),
                    kind: 1,
                    client_msg_id: "s1".into(),
                    sent_at: Some(SystemTime::now().into()),
                }),
                done,
            )
            .commit();
        stored.await.unwrap();
        let (store, told, release) = Gated::new(inner, Held::SlowLookups);
        let hub = gated_hub(store);
        let slow = tokio::spawn(send(hub.clone(), "slow", "s1"));
        // The waits below block this (the test's) thread, not the runtime's workers: if
        // the room's lock were held through the lookup, bob's send would block a worker
        // and the wait would fail instead of hanging.
        let wait = Duration::from_secs(20);
        assert_eq!(
            told.recv_timeout(wait),
            Ok("lookup"),
            "slow's lookup started"
        );
        let (sent, fast) = std::sync::mpsc::channel();
        tokio::spawn(async move {
            let _ = sent.send(send(hub, "bob", "b1").await);
        });
        let fast = fast
            .recv_timeout(wait)
            .expect("bob's send is not held up by slow's lookup");
        assert_eq!(fast.seq, 2);
        assert!(!slow.is_finished(), "slow's lookup is still waiting");
        release.send(()).unwrap();
        assert_eq!(
            slow.await.unwrap(),
            Published {
                seq: 1,
                duplicate: true
            }
        );
    }

    /// A sender's commit handed back by the store (a lead) runs with the room's lock let
    /// go: while it commits, the room's next sender takes its seq and queues behind it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_led_by_its_sender_holds_up_no_one_else_in_the_room() {
        let (store, told, release) = Gated::new(MemoryStore::new(), Held::FirstLead);
        let hub = gated_hub(store);
        hub.open_room("r", "alice").await.unwrap();
        let alice = tokio::spawn(send(hub.clone(), "alice", "a1"));
        // These waits block the test's thread, not a worker: if the lead were run under
        // the room's lock, bob's send would block on it and the wait would fail.
        let wait = Duration::from_secs(20);
        assert_eq!(told.recv_timeout(wait), Ok("appended"));
        assert_eq!(
            told.recv_timeout(wait),
            Ok("leading"),
            "alice leads her commit"
        );
        let bob = tokio::spawn(send(hub.clone(), "bob", "b1"));
        assert_eq!(
            told.recv_timeout(wait),
            Ok("appended"),
            "bob's message is appended while alice's commit is under way"
        );
        assert!(
            !alice.is_finished() && !bob.is_finished(),
            "nothing is committed yet"
        );
        release.send(()).unwrap();
        assert_eq!(alice.await.unwrap().seq, 1);
        assert_eq!(bob.await.unwrap().seq, 2);
    }

    /// A run's messages all take their places (seq, store queue) before its lead commits
    /// them, together; a message refused within the run keeps its place among the results,
    /// and a retry within the run waits for its original.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_of_sends_is_placed_whole_then_committed_together() {
        let (store, told, release) = Gated::new(MemoryStore::new(), Held::FirstLead);
        let hub = gated_hub(store);
        hub.open_room("r", "alice").await.unwrap();
        let message = |room: &str, id: &str| {
            Ok(Outgoing {
                room: room.into(),
                text: "hi".into(),
                client_msg_id: id.into(),
                kind: MessageKind::Text,
            })
        };
        let run = vec![
            message("r", "a1"),
            message("nowhere", "a2"),
            Err(ChatError::invalid("text", "refused by the caller")),
            message("r", "a3"),
            message("r", "a1"),
            message("r", "a4"),
        ];
        let published = tokio::spawn({
            let hub = hub.clone();
            async move { hub.publish("room", "alice", run, |_| Ok(())).await }
        });
        let wait = Duration::from_secs(20);
        for n in 1..=3 {
            assert_eq!(
                told.recv_timeout(wait),
                Ok("appended"),
                "new message {n} of the run is queued"
            );
        }
        assert_eq!(
            told.recv_timeout(wait),
            Ok("leading"),
            "the lead commits once every message has its place"
        );
        release.send(()).unwrap();
        let published = published.await.unwrap();
        let outcome: Vec<_> = published
            .iter()
            .map(|p| match p {
                Ok(p) => Ok((p.seq, p.duplicate)),
                Err(e) => Err(e.to_string()),
            })
            .collect();
        assert_eq!(
            outcome,
            vec![
                Ok((1, false)),
                Err("room \"nowhere\" does not exist".to_owned()),
                Err("invalid text: refused by the caller".to_owned()),
                Ok((2, false)),
                Ok((1, true)),
                Ok((3, false)),
            ]
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
        let mut cursor = room.tail(Some(0), "").await.unwrap();
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
        let (joined, mut cursor, _presence) = room.join("bob", None, "", 3).await.unwrap();
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
        let mut watcher = room.tail(None, "").await.unwrap();
        let (_, _, first) = room.join("bob", None, "", 0).await.unwrap();
        let (_, _, second) = room.join("bob", None, "", 0).await.unwrap();
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

    /// After a time its node could not hear the feed, a room takes the state it missed:
    /// a ban made meanwhile holds, the topic is announced, the member list is the one
    /// given.
    #[tokio::test]
    async fn a_resync_brings_in_what_the_feed_missed() {
        use crate::engine::{Feed as _, FeedEvent};

        let hub = hub(16);
        let room = hub.open_room("r", "alice").await.unwrap();
        let mut watcher = room.tail(None, "").await.unwrap();
        let (_, _, _bob) = room.join("bob", None, "", 0).await.unwrap();
        assert!(room.admit("bob").is_ok());
        let mut record = crate::hub::room::new_record("r", "plans", "alice", false);
        record.access.insert("bob".into(), Access::Banned);
        room.deliver(FeedEvent::Resync {
            record,
            members: vec!["alice".into(), "carol".into()],
        });
        assert!(room.admit("bob").is_err(), "the ban holds here now");
        let info = room.info();
        assert_eq!((info.topic.as_str(), info.member_count), ("plans", 2));
        assert_eq!(
            room.members_page(None, 10).await.unwrap().0,
            ["bob"],
            "the engine's own list is untouched"
        );
        loop {
            match watcher.next().await.unwrap() {
                Some(Delivery::Event(RoomEvent::Updated(update))) => {
                    assert_eq!(update.room.as_ref().unwrap().topic, "plans");
                    break;
                }
                Some(_) => continue,
                None => panic!("cursor ended"),
            }
        }
    }

    #[test]
    fn pages_are_sorted_and_say_whether_more_follow() {
        let names: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            room::page(names.iter(), None, 2),
            (vec!["a".into(), "b".into()], true)
        );
        assert_eq!(
            room::page(names.iter(), Some("b"), 2),
            (vec!["c".into(), "d".into()], false)
        );
        assert_eq!(room::page(names.iter(), Some("d"), 2), (vec![], false));
    }
}
