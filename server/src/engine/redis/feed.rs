//! [`Feeds`]: the rooms this node follows on Redis pub/sub, delivered to the hub's rooms in
//! seq order without gaps.
//!
//! A node subscribes to a room's channel while the hub has the room, *before* it reads
//! the room's head (`RedisEngine::attach`), so every message is either at or below that
//! head or still to come on the channel. It keeps the last seq it delivered per room: a
//! frame with a later seq than the next one (pub/sub drops what is published while a
//! subscriber is disconnected) is preceded by the missing messages, read from the log; a
//! stale one is dropped. After a reconnect every room is resubscribed and caught up to its
//! head from the log. So every node's ring is the same gap-free sequence.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use dashmap::DashMap;
use futures::StreamExt as _;
use redis::aio::PubSubSink;
use tokio::sync::Mutex;

use super::{Conn, keys, unavailable, wire};
use crate::{
    engine::{EngineError, Feed, FeedEvent},
    metrics::Metrics,
};

/// Messages read from the log at a time when filling a gap.
const FILL_CHUNK: usize = 512;

/// The rooms this node follows.
pub(super) struct Feeds {
    /// Where the pub/sub connection (one, this node's) may go: one Redis, or the seed
    /// nodes of a Redis Cluster, tried in turn.
    seeds: Vec<redis::Client>,
    /// For reading the log and heads.
    conn: Conn,
    /// Followed rooms by name.
    rooms: DashMap<String, Arc<RoomFeed>>,
    /// The live subscription's command half; `None` while disconnected. Held while the
    /// reader resubscribes, so a room followed meanwhile is subscribed by one or the other.
    sink: Mutex<Option<PubSubSink>>,
    /// Whether the subscription is up.
    connected: AtomicBool,
    /// Shared figures.
    metrics: Arc<Metrics>,
}

/// One followed room.
pub(super) struct RoomFeed {
    room: String,
    /// Taken for every frame, so frames are delivered one at a time, in order (and while
    /// a gap is filled, the frames after it wait).
    state: Mutex<FeedState>,
}

#[derive(Default)]
struct FeedState {
    /// The seq of the last message delivered (or, before the hub's room is fed, the head
    /// it was described with); `None` until then.
    last: Option<u64>,
    /// The room's epoch as last seen.
    epoch: String,
    /// The hub's room, once `RedisEngine::feed` names it.
    target: Option<Weak<dyn Feed>>,
    /// Frames that came before the target was named, in order.
    held: Vec<wire::Frame>,
}

impl Feeds {
    pub(super) fn new(seeds: Vec<redis::Client>, conn: Conn, metrics: Arc<Metrics>) -> Self {
        Self {
            seeds,
            conn,
            rooms: DashMap::new(),
            sink: Mutex::new(None),
            connected: AtomicBool::new(false),
            metrics,
        }
    }

    /// Whether the subscription is up.
    pub(super) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Follows `room`: subscribed when this returns if the subscription is up, else as soon
    /// as it is.
    pub(super) async fn follow(&self, room: &str) -> Result<(), EngineError> {
        self.rooms.entry(room.to_owned()).or_insert_with(|| {
            Arc::new(RoomFeed {
                room: room.to_owned(),
                state: Mutex::new(FeedState::default()),
            })
        });
        let sink = self.sink.lock().await;
        if let Some(sink) = sink.as_ref() {
            sink.clone()
                .subscribe(keys::channel(room))
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// Stops following `room` (it does not exist after all).
    pub(super) async fn unfollow(&self, room: &str) {
        self.rooms.remove(room);
        if let Some(sink) = self.sink.lock().await.as_ref() {
            let _ = sink.clone().unsubscribe(keys::channel(room)).await;
        }
    }

    /// Records what `attach` read: `room`'s head and epoch.
    pub(super) async fn described(&self, room: &str, head: u64, epoch: String) {
        if let Some(feed) = self.room(room) {
            let mut state = feed.state.lock().await;
            state.last = Some(head);
            state.epoch = epoch;
        }
    }

    /// Delivers `room`'s frames to `target`: those held so far, then every one after.
    pub(super) async fn start(&self, room: &str, target: Weak<dyn Feed>) {
        let Some(feed) = self.room(room) else { return };
        let mut state = feed.state.lock().await;
        state.target = Some(target);
        for frame in std::mem::take(&mut state.held) {
            self.deliver(&feed.room, &mut state, frame).await;
        }
    }

    fn room(&self, room: &str) -> Option<Arc<RoomFeed>> {
        self.rooms.get(room).map(|feed| feed.clone())
    }

    /// The subscription's task: connects, subscribes every followed room, catches each up
    /// from the log, and delivers frames until the connection drops; then again.
    pub(super) async fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        let mut seed = 0;
        loop {
            match self
                .subscribe_all(&self.seeds[seed % self.seeds.len()])
                .await
            {
                Ok(mut stream) => {
                    backoff = Duration::from_millis(100);
                    tracing::info!(rooms = self.rooms.len(), "subscribed to the room feeds");
                    self.catch_up_all().await;
                    while let Some(message) = stream.next().await {
                        self.on_message(&message).await;
                    }
                    self.connected.store(false, Ordering::SeqCst);
                    *self.sink.lock().await = None;
                    self.metrics.redis_reconnects.inc();
                    tracing::warn!("the feed subscription dropped; reconnecting");
                }
                Err(error) => {
                    // Another seed next time: this one may be the node that went away.
                    seed += 1;
                    tracing::warn!(%error, ?backoff, "cannot subscribe to the room feeds");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn subscribe_all(
        &self,
        seed: &redis::Client,
    ) -> Result<redis::aio::PubSubStream, redis::RedisError> {
        let pubsub = seed.get_async_pubsub().await?;
        let (mut sink, stream) = pubsub.split();
        let mut current = self.sink.lock().await;
        let channels: Vec<String> = self.rooms.iter().map(|r| keys::channel(r.key())).collect();
        for chunk in channels.chunks(1024) {
            sink.subscribe(chunk).await?;
        }
        *current = Some(sink);
        self.connected.store(true, Ordering::SeqCst);
        Ok(stream)
    }

    /// Everything published while this node was not subscribed is gone from pub/sub: read
    /// it from the log.
    async fn catch_up_all(&self) {
        let rooms: Vec<Arc<RoomFeed>> = self.rooms.iter().map(|r| r.value().clone()).collect();
        for feed in rooms {
            if let Err(error) = self.catch_up(&feed).await {
                tracing::warn!(room = feed.room, %error, "cannot catch the room up");
            }
        }
    }

    async fn catch_up(&self, feed: &RoomFeed) -> Result<(), EngineError> {
        let mut state = feed.state.lock().await;
        let Some(last) = state.last else {
            // Not described yet: `attach` reads the head after subscribing.
            return Ok(());
        };
        let mut conn = self.conn.clone();
        let (head, epoch): (Option<u64>, Option<String>) = redis::cmd("HMGET")
            .arg(keys::meta(&feed.room))
            .arg("head")
            .arg("epoch")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if state.target.is_none() {
            return Ok(());
        }
        let mut last = last;
        if let Some(epoch) = epoch
            && epoch != state.epoch
        {
            // The room's data was lost (and made again by a send) while this node was not
            // listening.
            tracing::warn!(room = feed.room, "a room's log started again");
            reset(&mut state, epoch);
            last = 0;
        }
        let head = head.unwrap_or(0);
        if head > last {
            self.fill(&feed.room, &mut state, head).await?;
        }
        // Topic, access and presence changes published meanwhile are gone too: the room
        // takes its state as it is now (a ban made meanwhile holds here from now on).
        let (meta, access, members): (
            BTreeMap<String, String>,
            BTreeMap<String, String>,
            Vec<String>,
        ) = redis::pipe()
            .hgetall(keys::meta(&feed.room))
            .hgetall(keys::access(&feed.room))
            .hkeys(keys::presence(&feed.room))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if let Some(record) = wire::record_from(&meta, &access) {
            let mut members = members;
            members.sort_unstable();
            give(&state, FeedEvent::Resync { record, members });
        }
        Ok(())
    }

    async fn on_message(&self, message: &redis::Msg) {
        let Some(room) = keys::room_of_channel(message.get_channel_name()) else {
            return;
        };
        let Some(feed) = self.room(room) else { return };
        let frame = match wire::parse_frame(room, message.get_payload_bytes()) {
            Ok(frame) => frame,
            Err(error) => {
                tracing::error!(%error, "a feed frame this node cannot read");
                return;
            }
        };
        let mut state = feed.state.lock().await;
        if state.target.is_none() || state.last.is_none() {
            state.held.push(frame);
            return;
        }
        self.deliver(room, &mut state, frame).await;
    }

    /// Delivers one frame, filling a gap before a message first.
    async fn deliver(&self, room: &str, state: &mut FeedState, frame: wire::Frame) {
        match frame {
            wire::Frame::Message { epoch, message } => {
                if epoch != state.epoch {
                    tracing::warn!(room, "a room's log started again");
                    reset(state, epoch);
                }
                let last = state.last.unwrap_or(0);
                if message.seq <= last {
                    return;
                }
                if message.seq > last + 1
                    && let Err(error) = self.fill(room, state, message.seq - 1).await
                {
                    // The hub's readers read what they miss from the log themselves.
                    tracing::warn!(room, %error, "cannot fill a feed gap");
                }
                state.last = Some(message.seq);
                give(state, FeedEvent::Message(message));
            }
            wire::Frame::Event(event) => give(state, event),
        }
    }

    /// Delivers the messages after `state.last` through `to` from the log.
    async fn fill(&self, room: &str, state: &mut FeedState, to: u64) -> Result<(), EngineError> {
        self.metrics.feed_gaps_filled.inc();
        let mut conn = self.conn.clone();
        while let Some(last) = state.last
            && last < to
        {
            let messages = super::read_range(&mut conn, room, last + 1, to, FILL_CHUNK).await?;
            let Some(newest) = messages.last().map(|m| m.seq) else {
                // Removed by retention meanwhile: the readers learn of the gap from the log.
                state.last = Some(to);
                break;
            };
            for message in messages {
                give(state, FeedEvent::Message(message));
            }
            state.last = Some(newest);
        }
        Ok(())
    }
}

/// The room's log started again under `epoch`: the hub's room hears of it, and the next
/// message expected is the new log's first.
fn reset(state: &mut FeedState, epoch: String) {
    state.epoch.clone_from(&epoch);
    state.last = Some(0);
    give(state, FeedEvent::Reset { epoch });
}

fn give(state: &FeedState, event: FeedEvent) {
    if let Some(target) = state.target.as_ref().and_then(Weak::upgrade) {
        target.deliver(event);
    }
}
