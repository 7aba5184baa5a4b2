//! [`RedisEngine`]: several nodes on one Redis, keeping every guarantee of one node.
//!
//! The shape is Centrifugo's: one atomic script per append (idempotency key, `HINCRBY` of
//! the room's head, `XADD` with the seq as the entry's ID, trim, `PUBLISH` on the room's
//! channel), a pub/sub feed per room with gaps filled from the log (`feed.rs`), an epoch
//! per room, and node heartbeats for presence (`nodes.rs`). What each key holds is in
//! `keys.rs`, the encodings in `wire.rs`, the scripts in `lua/`; a sender's run of messages
//! goes through the append script as in `append.rs` (one round trip per room's part).
//!
//! A message is acked once Redis has run its script: what survives a Redis crash is what
//! its persistence (AOF, `appendfsync`) kept. When Redis cannot be reached, calls fail with
//! UNAVAILABLE within [`CALL_TIMEOUT`] (a send retried under the same `client_msg_id`
//! lands once), open streams stay, and when it returns the feed resubscribes and fills
//! every gap from the log.

mod append;
mod conn;
mod feed;
mod keys;
mod nodes;
mod wire;

use std::{
    collections::BTreeMap,
    sync::{Arc, Weak},
    time::{Duration, Instant, SystemTime},
};

use async_trait::async_trait;
use confab::ChatMessage;
use dashmap::DashMap;
use rand::Rng as _;
use redis::{
    AsyncCommands as _, Script, ScriptInvocation, aio::ConnectionManagerConfig,
    cluster::ClusterClient, streams::StreamRangeReply,
};
use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    Applied, Attached, Charge, Engine, EngineError, Feed, FeedEvent, PresenceChange, Published,
};
use crate::{
    error::ChatError,
    metrics::Metrics,
    store::{Access, Retention, RoomRecord, to_micros},
    validate::Outgoing,
};
use conn::Conn;
use feed::Feeds;

/// The longest a call to Redis may take before the client is told UNAVAILABLE.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// What a cluster node needs to know.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://HOST:PORT[/DB]` for one Redis; for a Redis Cluster, its seed nodes
    /// (several URLs, or any of them written `redis+cluster://`).
    pub urls: Vec<String>,
    /// This node's name.
    pub node_id: String,
    /// How long a `client_msg_id` is recognised as a retry.
    pub dedupe_window: Duration,
    /// How much of each room's log to keep.
    pub retention: Retention,
}

/// The engine of a cluster node.
pub struct RedisEngine {
    node: String,
    /// Commands and scripts (one multiplexed connection, remade when it drops; or a
    /// cluster connection routing each command to its slot's node).
    conn: Conn,
    /// The rooms this node follows, and the subscription.
    feeds: Arc<Feeds>,
    /// Each followed room's record as first read, to rebuild its meta should Redis lose it.
    records: DashMap<String, RoomRecord>,
    /// This node's presence changes, applied in order by one task.
    presence: mpsc::UnboundedSender<nodes::Work>,
    scripts: Arc<Scripts>,
    dedupe_window: Duration,
    retention: Retention,
    metrics: Arc<Metrics>,
    /// The feed, presence and heartbeat tasks, stopped at close.
    tasks: Vec<JoinHandle<()>>,
}

/// The server-side scripts: sent by hash, and sent again whole when Redis has forgotten
/// them (`Script` does that on NOSCRIPT).
struct Scripts {
    append: Script,
    create_room: Script,
    set_topic: Script,
    set_access: Script,
    presence: Script,
    trim_age: Script,
    nickname: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            append: Script::new(append::APPEND_LUA),
            create_room: Script::new(include_str!("lua/create_room.lua")),
            set_topic: Script::new(include_str!("lua/set_topic.lua")),
            set_access: Script::new(include_str!("lua/set_access.lua")),
            presence: Script::new(include_str!("lua/presence.lua")),
            trim_age: Script::new(include_str!("lua/trim_age.lua")),
            nickname: Script::new(include_str!("lua/nickname.lua")),
        }
    }
}

/// A Redis failure as the engine reports it: out of reach (UNAVAILABLE), or a reply this
/// server does not understand.
pub(crate) fn unavailable(error: redis::RedisError) -> EngineError {
    if error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
    {
        EngineError::Unavailable(error.to_string())
    } else {
        EngineError::Protocol(error.to_string())
    }
}

/// Messages of `room` with seqs `from..=to`, at most `limit`, oldest first.
async fn read_range(
    conn: &mut Conn,
    room: &str,
    from: u64,
    to: u64,
    limit: usize,
) -> Result<Vec<ChatMessage>, EngineError> {
    let reply: StreamRangeReply = conn
        .xrange_count(
            keys::log(room),
            format!("{from}-0"),
            format!("{to}-0"),
            limit,
        )
        .await
        .map_err(unavailable)?;
    messages(room, reply)
}

fn messages(room: &str, reply: StreamRangeReply) -> Result<Vec<ChatMessage>, EngineError> {
    reply
        .ids
        .into_iter()
        .map(|entry| {
            let seq = wire::entry_seq(&entry.id)
                .ok_or_else(|| EngineError::Protocol(format!("a log entry ID {:?}", entry.id)))?;
            let body: Vec<u8> = entry
                .get("m")
                .ok_or_else(|| EngineError::Protocol(format!("log entry {seq} has no body")))?;
            wire::decode_message(room, seq, &body)
        })
        .collect()
}

impl RedisEngine {
    /// Connects to Redis at `config.url` and starts this node's tasks: the feed
    /// subscription, presence, and the heartbeat that finds dead nodes.
    pub async fn connect(config: RedisConfig, metrics: Arc<Metrics>) -> Result<Self, EngineError> {
        let shown = config.urls.join(",");
        let is_cluster = config.urls.len() > 1
            || config
                .urls
                .iter()
                .any(|url| url.starts_with("redis+cluster://"));
        let urls: Vec<String> = config
            .urls
            .iter()
            .map(|url| url.replacen("redis+cluster://", "redis://", 1))
            .collect();
        let bad = |e: redis::RedisError| EngineError::Protocol(format!("--redis {shown}: {e}"));
        // Pub/sub: one subscription, to any node (a Redis Cluster passes every PUBLISH to
        // every node), moved to the next seed when it drops.
        let seeds = urls
            .iter()
            .map(|url| redis::Client::open(url.as_str()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        let connecting = async {
            if is_cluster {
                let client = ClusterClient::builder(urls.clone())
                    .connection_timeout(Duration::from_secs(1))
                    .response_timeout(CALL_TIMEOUT)
                    .retries(3)
                    .build()
                    .map_err(bad)?;
                let conn = client.get_async_connection().await.map_err(unavailable)?;
                Ok::<_, EngineError>(Conn::Cluster(conn))
            } else {
                let manager = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(1)))
                    .set_response_timeout(Some(CALL_TIMEOUT))
                    .set_number_of_retries(3)
                    .set_max_delay(Duration::from_secs(1));
                let conn = seeds[0]
                    .get_connection_manager_with_config(manager)
                    .await
                    .map_err(unavailable)?;
                Ok(Conn::Single(conn))
            }
        };
        let conn = tokio::time::timeout(CALL_TIMEOUT, connecting)
            .await
            .map_err(|_| EngineError::Unavailable(format!("{shown}: no answer")))??;
        metrics.set_node(&config.node_id);
        let scripts = Arc::new(Scripts::new());
        let feeds = Arc::new(Feeds::new(seeds, conn.clone(), metrics.clone()));
        let (presence, changes) = mpsc::unbounded_channel();
        let nodes = nodes::Nodes::new(
            config.node_id.clone(),
            conn.clone(),
            scripts.clone(),
            metrics.clone(),
        );
        // A node that comes back under its old name starts with no one present.
        nodes.purge(&config.node_id).await?;
        let tasks = vec![
            tokio::spawn(feeds.clone().run()),
            tokio::spawn(nodes.clone().apply_presence(changes)),
            tokio::spawn(nodes.heartbeat(presence.clone())),
        ];
        tracing::info!(
            node = config.node_id,
            redis = shown,
            cluster = is_cluster,
            "engine: Redis"
        );
        Ok(Self {
            node: config.node_id,
            conn,
            feeds,
            records: DashMap::new(),
            presence,
            scripts,
            dedupe_window: config.dedupe_window,
            retention: config.retention,
            metrics,
            tasks,
        })
    }

    /// The shared secret for session tokens: the one in Redis, made by the first node.
    pub async fn token_secret(&self) -> Result<String, EngineError> {
        let mut conn = self.conn.clone();
        let made: String = {
            let mut bytes = [0u8; 32];
            rand::rng().fill(&mut bytes);
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        };
        let _: bool = conn
            .set_nx(keys::TOKEN_SECRET, made)
            .await
            .map_err(unavailable)?;
        conn.get(keys::TOKEN_SECRET).await.map_err(unavailable)
    }

    /// Runs `call`, timed as `name`, failing with UNAVAILABLE after [`CALL_TIMEOUT`].
    async fn timed<T>(
        &self,
        name: &'static str,
        call: impl Future<Output = Result<T, EngineError>>,
    ) -> Result<T, EngineError> {
        let started = Instant::now();
        let result = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .unwrap_or_else(|_| Err(EngineError::Unavailable(format!("{name}: no answer"))));
        self.metrics.engine_call(name, started.elapsed());
        result
    }

    /// Runs a script call, timed as `name`.
    async fn script<T: redis::FromRedisValue>(
        &self,
        name: &'static str,
        call: &ScriptInvocation<'_>,
    ) -> Result<T, EngineError> {
        self.timed(name, async {
            let mut conn = self.conn.clone();
            call.invoke_async(&mut conn).await.map_err(unavailable)
        })
        .await
    }

    /// The room's record, if it exists.
    async fn read_record(&self, room: &str) -> Result<Option<RoomRecord>, EngineError> {
        let mut conn = self.conn.clone();
        let (meta, access): (BTreeMap<String, String>, BTreeMap<String, String>) = redis::pipe()
            .hgetall(keys::meta(room))
            .hgetall(keys::access(room))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(wire::record_from(&meta, &access))
    }

    fn publish(&self, room: &str, frame: Vec<u8>) {
        let mut conn = self.conn.clone();
        let channel = keys::channel(room);
        tokio::spawn(async move {
            let published: Result<(), _> =
                tokio::time::timeout(CALL_TIMEOUT, conn.publish(channel.as_str(), frame))
                    .await
                    .unwrap_or_else(|_| {
                        Err(redis::RedisError::from((redis::ErrorKind::Io, "no answer")))
                    });
            if let Err(error) = published {
                tracing::warn!(%error, channel, "an announcement was not published");
            }
        });
    }
}

#[async_trait]
impl Engine for RedisEngine {
    fn node_id(&self) -> &str {
        &self.node
    }

    fn is_available(&self) -> bool {
        self.feeds.is_connected()
    }

    async fn room(&self, name: &str) -> Result<Option<RoomRecord>, EngineError> {
        self.timed("room", self.read_record(name)).await
    }

    async fn room_names(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, EngineError> {
        let min = after.map_or_else(|| "-".to_owned(), |after| format!("({after}"));
        self.timed("room_names", async {
            let mut conn = self.conn.clone();
            conn.zrangebylex_limit(
                keys::ROOMS,
                min,
                "+",
                0,
                isize::try_from(limit).unwrap_or(isize::MAX),
            )
            .await
            .map_err(unavailable)
        })
        .await
    }

    async fn room_count(&self) -> Result<usize, EngineError> {
        self.timed("room_count", async {
            let mut conn = self.conn.clone();
            conn.zcard(keys::ROOMS).await.map_err(unavailable)
        })
        .await
    }

    async fn create_room(&self, record: RoomRecord) -> Result<bool, EngineError> {
        let mut call = self.scripts.create_room.key(keys::meta(&record.name));
        call.arg(&record.epoch);
        for (_, value) in wire::meta_fields(&record) {
            call.arg(value);
        }
        let created: i64 = self.script("create_room", &call).await?;
        // Indexed after: a node that dies in between leaves a room that is found by name
        // and indexed again when a node next loads it.
        self.timed("create_room", async {
            let mut conn = self.conn.clone();
            let _: i64 = conn
                .zadd(keys::ROOMS, &record.name, 0)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
        .await?;
        Ok(created == 1)
    }

    async fn attach(&self, room: &str) -> Result<Option<Attached>, EngineError> {
        // A name that is no room is not followed, even for a moment: following and letting
        // go again could undo a follow made meanwhile for the room being created.
        let exists: bool = self
            .timed("attach", async {
                let mut conn = self.conn.clone();
                conn.exists(keys::meta(room)).await.map_err(unavailable)
            })
            .await?;
        if !exists {
            return Ok(None);
        }
        // Subscribed before the head is read: every message is at or below it, or to come.
        self.timed("attach", self.feeds.follow(room)).await?;
        let read = self
            .timed("attach", async {
                let mut conn = self.conn.clone();
                let (meta, access, members): (
                    BTreeMap<String, String>,
                    BTreeMap<String, String>,
                    Vec<String>,
                ) = redis::pipe()
                    .hgetall(keys::meta(room))
                    .hgetall(keys::access(room))
                    .hkeys(keys::presence(room))
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                Ok((meta, access, members))
            })
            .await;
        let (meta, access, mut members) = match read {
            Ok(read) => read,
            Err(error) => {
                self.feeds.unfollow(room).await;
                return Err(error);
            }
        };
        let Some(record) = wire::record_from(&meta, &access) else {
            self.feeds.unfollow(room).await;
            return Ok(None);
        };
        let epoch = meta.get("epoch").cloned().unwrap_or_default();
        self.feeds.described(room, record.head_seq, epoch).await;
        self.records.insert(room.to_owned(), record.clone());
        let mut conn = self.conn.clone();
        let _: Result<i64, _> = conn.zadd(keys::ROOMS, room, 0).await;
        members.sort_unstable();
        Ok(Some(Attached { record, members }))
    }

    fn feed(&self, room: &str, feed: Weak<dyn Feed>) {
        let feeds = self.feeds.clone();
        let room = room.to_owned();
        tokio::spawn(async move { feeds.start(&room, feed).await });
    }

    async fn append(
        &self,
        sender: &str,
        run: Vec<Outgoing>,
        charge: Charge<'_>,
    ) -> Vec<Result<Published, ChatError>> {
        self.append_run(sender, run, charge).await
    }

    async fn set_topic(&self, room: &str, by: &str, topic: &str) -> Result<(), EngineError> {
        let frame = wire::event_frame(&FeedEvent::Topic {
            topic: topic.to_owned(),
            by: by.to_owned(),
        });
        let mut call = self.scripts.set_topic.key(keys::meta(room));
        call.arg(topic).arg(keys::channel(room)).arg(frame);
        let _: i64 = self.script("set_topic", &call).await?;
        Ok(())
    }

    async fn set_access(
        &self,
        room: &str,
        user: &str,
        access: Option<Access>,
    ) -> Result<(), EngineError> {
        let frame = wire::event_frame(&FeedEvent::Access {
            user: user.to_owned(),
            access,
        });
        let mut call = self.scripts.set_access.key(keys::access(room));
        call.arg(user)
            .arg(access.map(Access::as_str).unwrap_or_default())
            .arg(keys::channel(room))
            .arg(frame);
        let _: i64 = self.script("set_access", &call).await?;
        Ok(())
    }

    fn announce(&self, room: &str, event: FeedEvent) {
        if let Some(frame) = wire::event_frame(&event) {
            self.publish(room, frame);
        }
    }

    fn presence(&self, room: &str, change: PresenceChange, applied: Option<Applied>) {
        let _ = self
            .presence
            .send(nodes::Work::Change(room.to_owned(), change, applied));
    }

    async fn members(&self, room: &str) -> Result<Vec<String>, EngineError> {
        self.timed("members", async {
            let mut conn = self.conn.clone();
            let mut members: Vec<String> = conn
                .hkeys(keys::presence(room))
                .await
                .map_err(unavailable)?;
            members.sort_unstable();
            Ok(members)
        })
        .await
    }

    async fn hold_nickname(
        &self,
        key: &str,
        login: u64,
        lease: Duration,
    ) -> Result<bool, EngineError> {
        let mut call = self.scripts.nickname.key(keys::nickname(key));
        call.arg("hold")
            .arg(login)
            .arg(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1));
        let held: i64 = self.script("hold_nickname", &call).await?;
        Ok(held == 1)
    }

    async fn release_nickname(&self, key: &str, login: u64) -> Result<(), EngineError> {
        let mut call = self.scripts.nickname.key(keys::nickname(key));
        call.arg("release").arg(login).arg(0);
        let _: i64 = self.script("release_nickname", &call).await?;
        Ok(())
    }

    async fn read_after(
        &self,
        room: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, EngineError> {
        self.timed("read", async {
            let mut conn = self.conn.clone();
            let reply: StreamRangeReply = conn
                .xrange_count(keys::log(room), format!("({after_seq}-0"), "+", limit)
                .await
                .map_err(unavailable)?;
            messages(room, reply)
        })
        .await
    }

    async fn read_before(
        &self,
        room: &str,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, EngineError> {
        if before_seq <= 1 {
            return Ok(Vec::new());
        }
        self.timed("read", async {
            let mut conn = self.conn.clone();
            let reply: StreamRangeReply = conn
                .xrevrange_count(keys::log(room), format!("({before_seq}-0"), "-", limit)
                .await
                .map_err(unavailable)?;
            let mut messages = messages(room, reply)?;
            messages.reverse();
            Ok(messages)
        })
        .await
    }

    async fn first_seq(&self, room: &str) -> Result<Option<u64>, EngineError> {
        self.timed("read", async {
            let mut conn = self.conn.clone();
            let reply: StreamRangeReply = conn
                .xrange_count(keys::log(room), "-", "+", 1)
                .await
                .map_err(unavailable)?;
            Ok(reply
                .ids
                .first()
                .and_then(|entry| wire::entry_seq(&entry.id)))
        })
        .await
    }

    async fn head_seq(&self, room: &str) -> Result<u64, EngineError> {
        self.timed("head", async {
            let mut conn = self.conn.clone();
            let head: Option<u64> = conn
                .hget(keys::meta(room), "head")
                .await
                .map_err(unavailable)?;
            Ok(head.unwrap_or(0))
        })
        .await
    }

    async fn apply_retention(&self, retention: Retention) -> Result<(), EngineError> {
        let mut after: Option<String> = None;
        loop {
            let rooms = self.room_names(after.as_deref(), 256).await?;
            let Some(last) = rooms.last().cloned() else {
                return Ok(());
            };
            for room in &rooms {
                self.timed("retention", async {
                    let mut conn = self.conn.clone();
                    if let Some(most) = retention.max_messages {
                        let _: i64 = redis::cmd("XTRIM")
                            .arg(keys::log(room))
                            .arg("MAXLEN")
                            .arg(most)
                            .query_async(&mut conn)
                            .await
                            .map_err(unavailable)?;
                    }
                    if let Some(age) = retention.max_age {
                        let cutoff = to_micros(SystemTime::now() - age);
                        let _: i64 = self
                            .scripts
                            .trim_age
                            .key(keys::log(room))
                            .arg(cutoff)
                            .invoke_async(&mut conn)
                            .await
                            .map_err(unavailable)?;
                    }
                    Ok(())
                })
                .await?;
            }
            after = Some(last);
        }
    }

    async fn close(&self) {
        for task in &self.tasks {
            task.abort();
        }
        // This node's users leave now rather than when its heartbeat lapses.
        let nodes = nodes::Nodes::new(
            self.node.clone(),
            self.conn.clone(),
            self.scripts.clone(),
            self.metrics.clone(),
        );
        if let Err(error) = self.timed("close", nodes.purge(&self.node)).await {
            tracing::warn!(%error, "could not clear this node's presence");
        }
    }
}
