//! Where rooms and their logs live: the [`Store`] trait and its engines.
//!
//! The hub is the only caller. It appends under the room's lock, so each room's messages
//! reach the store in seq order; the store never assigns seqs itself. Reads return
//! messages in ascending seq order.
//!
//! Engines: [`MemoryStore`] (everything in memory, lost on exit). The durable SQLite engine
//! takes its place behind the same trait.

mod memory;

use std::time::SystemTime;

use confab::ChatMessage;

pub use memory::MemoryStore;

/// A store failure. The client sees INTERNAL; the cause goes to the log.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// What the store keeps about a room besides its messages.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomRecord {
    /// The room name (already validated).
    pub name: String,
    /// The topic line.
    pub topic: String,
    /// When it was created.
    pub created_at: SystemTime,
    /// Who created it.
    pub created_by: String,
    /// The seq of its newest message, 0 if none: where numbering continues after a restart.
    pub head_seq: u64,
}

/// The storage engine behind the hub.
pub trait Store: Send + Sync + 'static {
    /// Every room, for the hub to load at start.
    fn rooms(&self) -> Result<Vec<RoomRecord>, StoreError>;

    /// Records a new room. The hub has checked that the name is free.
    fn create_room(&self, room: &RoomRecord) -> Result<(), StoreError>;

    /// Appends `message` to its room's log; called in seq order per room.
    fn append(&self, message: &ChatMessage) -> Result<(), StoreError>;

    /// Up to `limit` messages of `room` with seq > `after_seq`, oldest first.
    fn read_after(
        &self,
        room: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError>;

    /// Up to `limit` messages of `room` with seq < `before_seq`, the newest of them,
    /// returned oldest first.
    fn read_before(
        &self,
        room: &str,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError>;

    /// The seq stored for `client_msg_id` from `sender` in `room`, if it was sent within
    /// the dedupe window.
    fn find_sent(
        &self,
        room: &str,
        sender: &str,
        client_msg_id: &str,
    ) -> Result<Option<u64>, StoreError>;
}
