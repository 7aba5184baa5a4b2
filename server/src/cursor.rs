//! [`Cursor`]: one reader's position in one room; where "in seq order, no gaps, no
//! duplicates" is kept.
//!
//! A cursor knows the seq it must deliver next. It takes messages from two places:
//!
//! * the store, for everything up to `replay_until` (history on join, a resume, or what
//!   the reader missed while it lagged), read in chunks;
//! * the room's broadcast ring, for live events.
//!
//! Whatever arrives with a seq it has already delivered is dropped; a seq beyond the next
//! one means it missed something, which it reads from the store first. When the ring
//! overwrites events the reader had not taken (`Lagged`), everything up to the room's head
//! is read from the store. So a slow reader loses nothing, and never holds more than one
//! chunk of messages of its own: the ring is shared and bounded.
//!
//! The cursor is pulled, never pushed: the session asks for the next event only when its
//! response stream has room, so how fast a reader reads is its own business.

use std::{collections::VecDeque, pin::Pin, sync::Arc};

use confab::{ChatMessage, pb};
use futures::Stream;
use tokio::sync::broadcast::{self, error::RecvError};

use crate::{
    engine::Removal,
    error::ChatError,
    hub::{Room, RoomEvent},
};

/// Messages read from the log at a time when replaying.
const REPLAY_CHUNK: usize = 256;

/// A cursor as a stream; a session keeps one per room in its [`crate::cursor_set::CursorSet`].
pub type DeliveryStream = Pin<Box<dyn Stream<Item = Result<Delivery, ChatError>> + Send>>;

/// What a cursor yields.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// The next event.
    Event(RoomEvent),
    /// Messages `from..=to` are not in the store (removed by retention) and never will be.
    Gap {
        /// The first missing seq.
        from: u64,
        /// The last missing seq.
        to: u64,
    },
    /// The room's log was lost and started again under `epoch`: the reader's seqs up to
    /// `through` name nothing any more, and what follows is the new log from seq 1.
    Reset {
        /// The new epoch.
        epoch: String,
        /// The last seq the reader had of the old log.
        through: u64,
    },
    /// The room's owner put the reader out (see [`crate::hub::Presence::removed`]).
    Removed(Arc<Removal>),
}

impl Delivery {
    /// A gap or reset as the protocol says it; `None` for anything else.
    pub fn history_gap(&self, room: &str) -> Option<pb::HistoryGap> {
        Some(match self {
            Delivery::Gap { from, to } => pb::HistoryGap {
                room: room.to_owned(),
                from_seq: *from,
                to_seq: *to,
                ..Default::default()
            },
            Delivery::Reset { epoch, through } => pb::HistoryGap {
                room: room.to_owned(),
                from_seq: 1,
                to_seq: *through,
                reset: true,
                epoch: epoch.clone(),
            },
            Delivery::Event(_) | Delivery::Removed(_) => return None,
        })
    }
}

/// One reader's position in one room.
pub struct Cursor {
    /// The room, for its name, its head seq and the engine replayed messages come from.
    room: Arc<Room>,
    /// The reader's position in the room's ring.
    live: broadcast::Receiver<RoomEvent>,
    /// The seq of the next message to deliver.
    next_seq: u64,
    /// Messages up to this seq come from the store before anything live is delivered.
    replay_until: u64,
    /// Messages read from the store and not yet delivered, in order.
    backlog: VecDeque<ChatMessage>,
    /// The reader's nickname: its own typing notices are not sent back to it.
    reader: Option<String>,
    /// Said before anything else (a resume that named an epoch the room no longer has).
    reset: Option<Delivery>,
}

impl Cursor {
    /// A cursor that delivers the messages after `after_seq`: those up to `head` from the
    /// store, then live ones from `live` (which was subscribed when `head` was read).
    pub(crate) fn new(
        room: Arc<Room>,
        live: broadcast::Receiver<RoomEvent>,
        after_seq: u64,
        head: u64,
        reader: Option<String>,
    ) -> Self {
        Self {
            room,
            live,
            next_seq: after_seq + 1,
            replay_until: head,
            backlog: VecDeque::new(),
            reader,
            reset: None,
        }
    }

    /// This cursor first says that the reader's seqs up to `through` are of a log that
    /// started again under `epoch`.
    pub(crate) fn after_reset(mut self, epoch: String, through: u64) -> Self {
        self.reset = Some(Delivery::Reset { epoch, through });
        self
    }

    /// The room this cursor reads.
    pub fn room(&self) -> &Arc<Room> {
        &self.room
    }

    /// The next delivery; `None` if the room's ring closed (the hub is gone).
    pub async fn next(&mut self) -> Result<Option<Delivery>, ChatError> {
        if let Some(reset) = self.reset.take() {
            return Ok(Some(reset));
        }
        loop {
            if let Some(message) = self.backlog.pop_front() {
                self.next_seq = message.seq + 1;
                self.room.metrics().deliveries.inc();
                return Ok(Some(Delivery::Event(RoomEvent::Message(message))));
            }
            if self.next_seq <= self.replay_until {
                if let Some(gap) = self.refill().await? {
                    return Ok(Some(gap));
                }
                continue;
            }
            match self.live.recv().await {
                Ok(RoomEvent::Message(message)) => {
                    if message.seq < self.next_seq {
                        // Already delivered from the store.
                        continue;
                    }
                    if message.seq > self.next_seq {
                        // Something between is missing here: it is in the store, and so is
                        // this one, so read them in order from there.
                        self.replay_until = message.seq;
                        continue;
                    }
                    self.next_seq = message.seq + 1;
                    self.room.metrics().deliveries.inc();
                    return Ok(Some(Delivery::Event(RoomEvent::Message(message))));
                }
                Ok(RoomEvent::Typing(typing))
                    if self.reader.as_deref() == Some(typing.user.as_str()) =>
                {
                    continue;
                }
                Ok(RoomEvent::Reset(epoch)) => {
                    // What was read of the old log means nothing now; the new one is read
                    // from its start.
                    let through = self.next_seq - 1;
                    self.backlog.clear();
                    self.next_seq = 1;
                    self.replay_until = self.room.head_seq();
                    return Ok(Some(Delivery::Reset { epoch, through }));
                }
                Ok(event) => return Ok(Some(Delivery::Event(event))),
                Err(RecvError::Lagged(skipped)) => {
                    // The ring moved past this reader. Every message up to the head is in
                    // the store; presence and typing notices that were overwritten are
                    // ephemeral and not replayed.
                    tracing::debug!(
                        room = self.room.name(),
                        skipped,
                        "reader lagged; reading from the store"
                    );
                    self.room.metrics().lagged_backfills.inc();
                    self.replay_until = self.replay_until.max(self.room.head_seq());
                }
                Err(RecvError::Closed) => return Ok(None),
            }
        }
    }

    /// Reads the next chunk of `next_seq..=replay_until` into the backlog. Returns a gap
    /// when the store no longer has the first of those messages.
    async fn refill(&mut self) -> Result<Option<Delivery>, ChatError> {
        let wanted = usize::try_from(self.replay_until - self.next_seq + 1).unwrap_or(usize::MAX);
        let messages = self
            .room
            .engine()
            .read_after(
                self.room.name(),
                self.next_seq - 1,
                wanted.min(REPLAY_CHUNK),
            )
            .await?;
        let first = messages.first().map_or(self.replay_until + 1, |m| m.seq);
        self.backlog.extend(
            messages
                .into_iter()
                .take_while(|m| m.seq <= self.replay_until),
        );
        if first > self.next_seq {
            let gap = Delivery::Gap {
                from: self.next_seq,
                to: first - 1,
            };
            self.next_seq = first;
            return Ok(Some(gap));
        }
        Ok(None)
    }

    /// The cursor as a stream, for reading many rooms at once with [`crate::cursor_set::CursorSet`].
    pub fn into_stream(self) -> DeliveryStream {
        Box::pin(futures::stream::unfold(Some(self), |cursor| async move {
            let mut cursor = cursor?;
            match cursor.next().await {
                Ok(Some(delivery)) => Some((Ok(delivery), Some(cursor))),
                Ok(None) => None,
                // A store failure ends this cursor after reporting it.
                Err(error) => Some((Err(error), None)),
            }
        }))
    }
}
