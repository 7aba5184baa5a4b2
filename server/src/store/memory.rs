//! [`MemoryStore`]: rooms and logs in memory. Nothing survives the process.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use confab::ChatMessage;

use super::{RoomRecord, Store, StoreError};

/// A store that keeps everything in memory.
///
/// std `Mutex`es, not tokio's: every critical section is a few map operations and is never
/// held across an `.await`.
pub struct MemoryStore {
    /// Rooms by name, with their logs.
    rooms: Mutex<HashMap<String, MemoryRoom>>,
    /// Idempotency keys seen within the dedupe window.
    sent: Mutex<SentKeys>,
}

struct MemoryRoom {
    record: RoomRecord,
    /// The log; the message with seq `n` is at index `n - 1`.
    messages: Vec<ChatMessage>,
}

/// Idempotency keys, expiring after the dedupe window.
struct SentKeys {
    /// How long a key is remembered.
    window: Duration,
    /// `(room, sender, client_msg_id)` → seq.
    seqs: HashMap<(String, String, String), u64>,
    /// Keys in the order they were stored, for expiry.
    order: VecDeque<(Instant, (String, String, String))>,
}

impl SentKeys {
    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < self.window {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                self.seqs.remove(&key);
            }
        }
    }
}

impl MemoryStore {
    /// An empty store that remembers idempotency keys for `dedupe_window`.
    pub fn new(dedupe_window: Duration) -> Self {
        Self {
            rooms: Mutex::new(HashMap::new()),
            sent: Mutex::new(SentKeys {
                window: dedupe_window,
                seqs: HashMap::new(),
                order: VecDeque::new(),
            }),
        }
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<String, MemoryRoom>> {
        // A panic while holding the lock cannot leave a map half-updated in a way that
        // matters more than losing the server, so a poisoned lock is taken over.
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn unknown(room: &str) -> StoreError {
    StoreError(format!("room {room:?} is not in the store"))
}

impl Store for MemoryStore {
    fn rooms(&self) -> Result<Vec<RoomRecord>, StoreError> {
        Ok(self.rooms().values().map(|r| r.record.clone()).collect())
    }

    fn create_room(&self, room: &RoomRecord) -> Result<(), StoreError> {
        self.rooms().insert(
            room.name.clone(),
            MemoryRoom {
                record: room.clone(),
                messages: Vec::new(),
            },
        );
        Ok(())
    }

    fn append(&self, message: &ChatMessage) -> Result<(), StoreError> {
        let mut rooms = self.rooms();
        let room = rooms
            .get_mut(&message.room)
            .ok_or_else(|| unknown(&message.room))?;
        if message.seq != room.messages.len() as u64 + 1 {
            return Err(StoreError(format!(
                "room {:?}: seq {} appended after {}",
                message.room,
                message.seq,
                room.messages.len()
            )));
        }
        room.messages.push(message.clone());
        room.record.head_seq = message.seq;
        drop(rooms);

        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        sent.expire(now);
        let key = (
            message.room.clone(),
            message.sender.clone(),
            message.client_msg_id.clone(),
        );
        sent.seqs.insert(key.clone(), message.seq);
        sent.order.push_back((now, key));
        Ok(())
    }

    fn read_after(
        &self,
        room: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let rooms = self.rooms();
        let log = &rooms.get(room).ok_or_else(|| unknown(room))?.messages;
        let start = usize::try_from(after_seq)
            .unwrap_or(usize::MAX)
            .min(log.len());
        let end = start.saturating_add(limit).min(log.len());
        Ok(log[start..end].to_vec())
    }

    fn read_before(
        &self,
        room: &str,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let rooms = self.rooms();
        let log = &rooms.get(room).ok_or_else(|| unknown(room))?.messages;
        // Messages with seq < before_seq are at indexes 0 .. before_seq - 1.
        let end = usize::try_from(before_seq.saturating_sub(1))
            .unwrap_or(usize::MAX)
            .min(log.len());
        let start = end.saturating_sub(limit);
        Ok(log[start..end].to_vec())
    }

    fn find_sent(
        &self,
        room: &str,
        sender: &str,
        client_msg_id: &str,
    ) -> Result<Option<u64>, StoreError> {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        sent.expire(Instant::now());
        let key = (room.to_owned(), sender.to_owned(), client_msg_id.to_owned());
        Ok(sent.seqs.get(&key).copied())
    }
}
