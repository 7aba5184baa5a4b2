//! [`MemoryStore`]: rooms and logs in memory (`--in-memory`). Nothing survives the process.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, MutexGuard},
    time::SystemTime,
};

use confab::ChatMessage;

use super::{Access, Committed, Lead, Retention, RoomRecord, SentKey, Store, StoreError, sent_at};

/// A store that keeps everything in memory. Writes are "committed" the moment they are
/// made, so their callbacks run inline.
///
/// A std `Mutex`, not tokio's: every critical section is a few map operations and is never
/// held across an `.await`.
#[derive(Default)]
pub struct MemoryStore {
    /// Rooms by name, with their logs.
    rooms: Mutex<HashMap<String, MemoryRoom>>,
}

struct MemoryRoom {
    record: RoomRecord,
    /// The retained log: consecutive seqs, oldest first.
    messages: VecDeque<ChatMessage>,
    /// `(sender, client_msg_id)` → seq, for the retained messages.
    sent: HashMap<(String, String), u64>,
}

impl MemoryRoom {
    /// The index of `seq` in `messages`, clamped to `0..=len`.
    fn index(&self, seq: u64) -> usize {
        let first = self
            .messages
            .front()
            .map_or(self.record.head_seq + 1, |m| m.seq);
        usize::try_from(seq.saturating_sub(first))
            .unwrap_or(usize::MAX)
            .min(self.messages.len())
    }

    fn drop_oldest(&mut self) {
        if let Some(oldest) = self.messages.pop_front() {
            self.sent
                .remove(&(oldest.sender.clone(), oldest.client_msg_id.clone()));
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn rooms(&self) -> MutexGuard<'_, HashMap<String, MemoryRoom>> {
        // Every update below completes before anything that can panic, so a poisoned lock
        // still guards consistent data.
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn room<T>(&self, name: &str, read: impl FnOnce(&MemoryRoom) -> T) -> Result<T, StoreError> {
        let rooms = self.rooms();
        let room = rooms
            .get(name)
            .ok_or_else(|| StoreError::NoSuchRoom(name.to_owned()))?;
        Ok(read(room))
    }
}

impl Store for MemoryStore {
    fn rooms(&self) -> Result<Vec<RoomRecord>, StoreError> {
        Ok(self.rooms().values().map(|r| r.record.clone()).collect())
    }

    fn create_room(&self, room: RoomRecord, done: Committed) {
        self.rooms().insert(
            room.name.clone(),
            MemoryRoom {
                record: room,
                messages: VecDeque::new(),
                sent: HashMap::new(),
            },
        );
        done(Ok(()));
    }

    fn append(&self, message: ChatMessage, done: Committed) -> Lead {
        let result = {
            let mut rooms = self.rooms();
            match rooms.get_mut(&message.room) {
                None => Err(StoreError::NoSuchRoom(message.room.clone())),
                Some(room) if message.seq != room.record.head_seq + 1 => {
                    Err(StoreError::OutOfOrder {
                        room: message.room.clone(),
                        seq: message.seq,
                        head: room.record.head_seq,
                    })
                }
                Some(room) => {
                    room.record.head_seq = message.seq;
                    room.sent.insert(
                        (message.sender.clone(), message.client_msg_id.clone()),
                        message.seq,
                    );
                    room.messages.push_back(message);
                    Ok(())
                }
            }
        };
        done(result);
        Lead::none()
    }

    fn set_topic(&self, room: &str, topic: &str, done: Committed) {
        let result = match self.rooms().get_mut(room) {
            Some(stored) => {
                stored.record.topic = topic.to_owned();
                Ok(())
            }
            None => Err(StoreError::NoSuchRoom(room.to_owned())),
        };
        done(result);
    }

    fn set_access(&self, room: &str, user: &str, access: Option<Access>, done: Committed) {
        let result = match self.rooms().get_mut(room) {
            Some(stored) => {
                match access {
                    Some(access) => stored.record.access.insert(user.to_owned(), access),
                    None => stored.record.access.remove(user),
                };
                Ok(())
            }
            None => Err(StoreError::NoSuchRoom(room.to_owned())),
        };
        done(result);
    }

    fn apply_retention(&self, retention: Retention, done: Committed) {
        let cutoff = retention
            .max_age
            .and_then(|age| SystemTime::now().checked_sub(age));
        for room in self.rooms().values_mut() {
            if let Some(max) = retention.max_messages {
                let max = usize::try_from(max).unwrap_or(usize::MAX);
                while room.messages.len() > max {
                    room.drop_oldest();
                }
            }
            if let Some(cutoff) = cutoff {
                while room.messages.front().is_some_and(|m| sent_at(m) < cutoff) {
                    room.drop_oldest();
                }
            }
        }
        done(Ok(()));
    }

    fn read_after(
        &self,
        room: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        self.room(room, |room| {
            let start = room.index(after_seq.saturating_add(1));
            room.messages
                .iter()
                .skip(start)
                .take(limit)
                .cloned()
                .collect()
        })
    }

    fn read_before(
        &self,
        room: &str,
        before_seq: u64,
        limit: usize,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        self.room(room, |room| {
            let end = room.index(before_seq);
            let start = end.saturating_sub(limit);
            room.messages.range(start..end).cloned().collect()
        })
    }

    fn first_seq(&self, room: &str) -> Result<Option<u64>, StoreError> {
        self.room(room, |room| room.messages.front().map(|m| m.seq))
    }

    fn sent_since(&self, room: &str, since: SystemTime) -> Result<Vec<SentKey>, StoreError> {
        self.room(room, |room| {
            room.messages
                .iter()
                .rev()
                .take_while(|m| sent_at(m) >= since)
                .map(|m| SentKey {
                    sender: m.sender.clone(),
                    client_msg_id: m.client_msg_id.clone(),
                    sent_at: sent_at(m),
                })
                .collect()
        })
    }

    fn find_sent(
        &self,
        room: &str,
        sender: &str,
        client_msg_id: &str,
        since: SystemTime,
    ) -> Result<Option<u64>, StoreError> {
        self.room(room, |room| {
            let seq = *room
                .sent
                .get(&(sender.to_owned(), client_msg_id.to_owned()))?;
            let message = room.messages.get(room.index(seq))?;
            (sent_at(message) >= since).then_some(seq)
        })
    }
}
