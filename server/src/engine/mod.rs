//! The engine: what the nodes of a cluster share, or what one node keeps for itself.
//!
//! The hub, sessions, cursors and backpressure are the same code whatever the engine; what
//! changes with it is here:
//!
//! * assigning a room's seq (atomically, once per message, whichever node the sender is
//!   on) and idempotency keys ([`Engine::append`], a sender's run of messages at a time);
//! * the log: read after or before a seq, its first seq, retention;
//! * room state: owner, topic, private, invites, bans;
//! * presence across nodes ([`Engine::presence`]) and ephemeral notices
//!   ([`Engine::announce`]);
//! * the *feed* ([`Engine::attach`]): a room's committed events, in seq order and without
//!   gaps, delivered to the node's [`Feed`] (the hub's room), which puts them on the room's
//!   ring.
//!
//! Engines: [`LocalEngine`] (one node: SQLite, or memory with `--in-memory`) and
//! [`RedisEngine`] (several nodes on one Redis).

mod local;
mod recent;
pub mod redis;
#[cfg(test)]
pub(crate) use recent::RECENT_SENDS;

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use async_trait::async_trait;
use confab::{ChatMessage, pb};

pub use local::LocalEngine;
pub use redis::{RedisConfig, RedisEngine};

use crate::{
    error::ChatError,
    store::{Access, Retention, RoomRecord, StoreError},
    validate::Outgoing,
};

/// An engine failure. The client sees UNAVAILABLE when the engine is out of reach (and may
/// retry: a send under the same `client_msg_id` lands once), INTERNAL otherwise.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The shared engine could not be reached, or did not answer in time.
    #[error("the shared engine is unreachable: {0}")]
    Unavailable(String),
    /// The shared engine answered something this server does not understand.
    #[error("the shared engine answered unexpectedly: {0}")]
    Protocol(String),
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

/// One event of a room's feed, as every node hears it.
#[derive(Debug, Clone)]
pub enum FeedEvent {
    /// A committed message; the feed delivers them in seq order, without gaps.
    Message(ChatMessage),
    /// A user arrived, left or was renamed (over every node: announced once per user).
    Presence(Arc<pb::PresenceEvent>),
    /// A user started or stopped typing (never stored).
    Typing(Arc<pb::TypingEvent>),
    /// The topic changed (stored).
    Topic {
        /// The new topic.
        topic: String,
        /// Who set it.
        by: String,
    },
    /// A user's standing changed (stored), by comparison key.
    Access {
        /// The user's [`crate::nickname::key`].
        user: String,
        /// Invited, banned, or neither.
        access: Option<Access>,
    },
    /// The room's state as it is now, after a time the node could not hear the feed (its
    /// subscription dropped): changes of topic, access and presence made meanwhile were
    /// published while no one listened.
    Resync {
        /// Owner, topic, private, access.
        record: RoomRecord,
        /// Who is present over every node, sorted.
        members: Vec<String>,
    },
    /// The room's log was lost and started again under `epoch` (seqs from 1).
    Reset {
        /// The new epoch.
        epoch: String,
    },
    /// The owner put a user out: their streams on every node leave the room.
    Removed {
        /// The user's [`crate::nickname::key`].
        user: String,
        /// Why, and by whom.
        removal: Arc<Removal>,
    },
}

/// What a node's room does with its feed: the hub's room implements it.
pub trait Feed: Send + Sync {
    /// One event. Messages come in seq order, without gaps; the engine may repeat one
    /// already delivered (the feed drops it). Must be quick and must not block.
    fn deliver(&self, event: FeedEvent);

    /// How many readers an event wakes.
    fn readers(&self) -> usize;
}

/// A change of one node's members in a room, for presence over every node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceChange {
    /// The user's first stream on this node joined.
    Enter(String),
    /// The user's last stream on this node left.
    Exit(String),
    /// The user's only stream on this node is now under another name.
    Rename {
        /// The name it had.
        old: String,
        /// The name it has.
        new: String,
    },
}

/// A room as a node starts feeding it.
#[derive(Debug, Clone)]
pub struct Attached {
    /// The room's record, `head_seq` being the newest message fed from here on.
    pub record: RoomRecord,
    /// The users present over every node, sorted.
    pub members: Vec<String>,
}

/// Told when a presence change is applied (and then seen by [`Engine::members`]).
pub type Applied = tokio::sync::oneshot::Sender<()>;

/// A new epoch: random, so that a room made again after a loss never repeats an old one.
pub(crate) fn new_epoch() -> String {
    use rand::Rng as _;
    format!("{:016x}", rand::rng().random::<u64>())
}

/// The most messages one run takes ([`Engine::append`]): as many as the SQLite store's
/// caller-led commit takes at once.
pub const MAX_RUN: usize = 64;

/// A run's results in the run's order: `refused` holds, per message, its refusal before it
/// got this far (`None` for the others), whose results `rest` gives, in order.
pub(crate) fn in_place<T>(
    refused: Vec<Option<ChatError>>,
    rest: impl IntoIterator<Item = Result<T, ChatError>>,
) -> Vec<Result<T, ChatError>> {
    let mut rest = rest.into_iter();
    refused
        .into_iter()
        .map(|refused| match refused {
            Some(error) => Err(error),
            None => rest.next().unwrap_or_else(|| {
                Err(EngineError::Protocol("a message of the run went unanswered".into()).into())
            }),
        })
        .collect()
}

/// Decides whether a new message may be sent (the sender's rate); called only for a send
/// that is not a retry of one already stored, where the engine can tell.
pub type Charge<'a> = &'a (dyn Fn() -> Result<(), ChatError> + Send + Sync);

/// The engine behind the hub: one per process.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// This node's name, for logs and metrics.
    fn node_id(&self) -> &str;

    /// Whether the engine can be reached (health says NOT_SERVING when not).
    fn is_available(&self) -> bool {
        true
    }

    /// The room `name`, if it exists.
    async fn room(&self, name: &str) -> Result<Option<RoomRecord>, EngineError>;

    /// Up to `limit` room names after `after` (exclusive), in name order.
    async fn room_names(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, EngineError>;

    /// How many rooms there are.
    async fn room_count(&self) -> Result<usize, EngineError>;

    /// Records a new room; `false` if the name is taken. Resolves once it is stored.
    async fn create_room(&self, record: RoomRecord) -> Result<bool, EngineError>;

    /// Starts following `room` (`None` if it does not exist): the record and members as of
    /// now. What happens from here on is held until [`Engine::feed`] names where it goes,
    /// and follows the returned record's `head_seq` without a gap.
    async fn attach(&self, room: &str) -> Result<Option<Attached>, EngineError>;

    /// Delivers `room`'s feed to `feed` from the moment [`Engine::attach`] described on
    /// (events held since, then everything after), until `feed` is dropped.
    fn feed(&self, room: &str, feed: Weak<dyn Feed>);

    /// Appends a run of `sender`'s messages (each to its `room`, which exists), in order,
    /// each unless its idempotency key was used within the dedupe window; resolves once
    /// every message (or the original it repeats) is committed, which is when the feed has
    /// it or is about to. One result per message, in the run's order: a message refused
    /// (by `charge`, say) does not stop the rest. An engine may commit a run together, but
    /// its messages take their seqs in the run's order.
    async fn append(
        &self,
        sender: &str,
        run: Vec<Outgoing>,
        charge: Charge<'_>,
    ) -> Vec<Result<Published, ChatError>>;

    /// Sets `room`'s topic; every node's feed hears of it once it is stored.
    async fn set_topic(&self, room: &str, by: &str, topic: &str) -> Result<(), EngineError>;

    /// Records `user`'s (comparison key) standing in `room`; every node's feed hears of it.
    async fn set_access(
        &self,
        room: &str,
        user: &str,
        access: Option<Access>,
    ) -> Result<(), EngineError>;

    /// Tells every node's feed of `room` an ephemeral event (typing, a removal).
    fn announce(&self, room: &str, event: FeedEvent);

    /// This node's members of `room` changed; the engine announces what changed over every
    /// node, once per user. Changes of one room are applied in the order they are made;
    /// `applied` (if given) is told when this one is.
    fn presence(&self, room: &str, change: PresenceChange, applied: Option<Applied>);

    /// The users present in `room` over every node, sorted.
    async fn members(&self, room: &str) -> Result<Vec<String>, EngineError>;

    /// Holds the nickname keyed `key` ([`crate::nickname::key`]) for `login` over every
    /// node until `lease` from now; `false` while another login holds it. This node's
    /// [`crate::auth::Nicknames`] decides first; this is what other nodes see.
    async fn hold_nickname(
        &self,
        key: &str,
        login: u64,
        lease: Duration,
    ) -> Result<bool, EngineError>;

    /// Lets `login`'s hold of the nickname keyed `key` go at once (after a rename).
    async fn release_nickname(&self, key: &str, login: u64) -> Result<(), EngineError>;

    /// Up to `limit` messages of `room` with seq > `after_seq`, oldest first.
    async fn read_after(
        &self,
        room: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, EngineError>;

    /// Up to `limit` messages of `room` with seq < `before_seq`, the newest of them,
    /// oldest first.
    async fn read_before(
        &self,
        room: &str,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, EngineError>;

    /// The seq of the oldest message of `room` still kept, if any.
    async fn first_seq(&self, room: &str) -> Result<Option<u64>, EngineError>;

    /// The seq of `room`'s newest committed message.
    async fn head_seq(&self, room: &str) -> Result<u64, EngineError>;

    /// Removes what `retention` no longer keeps.
    async fn apply_retention(&self, retention: Retention) -> Result<(), EngineError>;

    /// Makes every write so far durable and lets go of shared state (at shutdown).
    async fn close(&self);
}
