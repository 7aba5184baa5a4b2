//! [`ChatMessage`]: one message of a room's log, shared by `Arc` and encoded once.
//!
//! A room delivers each message to every member. If every delivery encoded the message
//! again, a room of 1,000 readers would pay 1,000 encodes per message. Instead the message
//! is an `Arc`: cloning it for a receiver is a reference-count bump, and the protobuf
//! encoding is made once, by the first receiver that is written to, and copied from then on.
//!
//! On the wire nothing is special: `ChatMessage` is the plain `chat.v1.ChatMessage`
//! message, so clients in any language see ordinary protobuf. Reading a field goes through
//! [`Deref`] to the generated [`ChatMessageRecord`].

use std::{
    fmt,
    hash::{Hash, Hasher},
    ops::Deref,
    sync::{Arc, OnceLock},
};

use bytes::{Buf, BufMut, Bytes};
use prost::{
    DecodeError, Message,
    encoding::{DecodeContext, WireType},
};

mod record {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/record/chat.v1.rs"));
}

/// The fields of a chat message, as generated from `proto/chat/v1/message.proto`.
pub use record::ChatMessage as ChatMessageRecord;
pub use record::MessageKind;

/// One message of a room's log; cheap to clone, encoded at most once.
#[derive(Clone, Default)]
pub struct ChatMessage(Arc<Shared>);

#[derive(Default)]
struct Shared {
    /// The message's fields.
    record: ChatMessageRecord,
    /// The protobuf encoding of `record`, made by the first writer that needs it. A
    /// `OnceLock` and not a lock: after the first encode every reader only loads a pointer.
    encoded: OnceLock<Bytes>,
}

impl Clone for Shared {
    /// Used only by `Arc::make_mut` before a change, so the cached encoding is not kept.
    fn clone(&self) -> Self {
        Self {
            record: self.record.clone(),
            encoded: OnceLock::new(),
        }
    }
}

impl ChatMessage {
    /// Wraps a record for sharing.
    pub fn new(record: ChatMessageRecord) -> Self {
        Self(Arc::new(Shared {
            record,
            encoded: OnceLock::new(),
        }))
    }

    /// The message's fields.
    pub fn record(&self) -> &ChatMessageRecord {
        &self.0.record
    }

    /// The message's fields, owned (cloned only if the message is shared).
    pub fn into_record(self) -> ChatMessageRecord {
        match Arc::try_unwrap(self.0) {
            Ok(shared) => shared.record,
            Err(shared) => shared.record.clone(),
        }
    }

    /// The protobuf encoding of the record, made on first use.
    pub fn encoded(&self) -> &Bytes {
        self.0
            .encoded
            .get_or_init(|| Bytes::from(self.0.record.encode_to_vec()))
    }

    /// Mutable access for decoding; drops a cached encoding that would be stale.
    fn record_mut(&mut self) -> &mut ChatMessageRecord {
        let shared = Arc::make_mut(&mut self.0);
        shared.encoded = OnceLock::new();
        &mut shared.record
    }
}

impl From<ChatMessageRecord> for ChatMessage {
    fn from(record: ChatMessageRecord) -> Self {
        Self::new(record)
    }
}

impl Deref for ChatMessage {
    type Target = ChatMessageRecord;

    fn deref(&self) -> &ChatMessageRecord {
        &self.0.record
    }
}

impl PartialEq for ChatMessage {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.record == other.0.record
    }
}

impl Eq for ChatMessage {}

impl Hash for ChatMessage {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.record.hash(state);
    }
}

impl fmt::Debug for ChatMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.record.fmt(f)
    }
}

impl Message for ChatMessage {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(self.encoded());
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        self.record_mut().merge_field(tag, wire_type, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.encoded().len()
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ChatMessage {
        ChatMessage::new(ChatMessageRecord {
            room: "lobby".into(),
            seq: 7,
            sender: "alice".into(),
            text: "hello, world".into(),
            kind: MessageKind::Action as i32,
            client_msg_id: "m-1".into(),
            sent_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
        })
    }

    #[test]
    fn encodes_exactly_like_the_plain_record() {
        let message = sample();
        assert_eq!(message.encode_to_vec(), message.record().encode_to_vec());
    }

    #[test]
    fn decodes_back_to_the_same_fields() {
        let message = sample();
        let decoded = ChatMessage::decode(message.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, message);
        assert_eq!(decoded.text, "hello, world");
    }

    #[test]
    fn clones_share_one_encoding() {
        let message = sample();
        let clone = message.clone();
        assert!(std::ptr::eq(
            message.encoded().as_ptr(),
            clone.encoded().as_ptr()
        ));
    }

    #[test]
    fn nested_in_an_event_it_round_trips() {
        use crate::pb::{ChatResponse, chat_response::Event};
        let event = ChatResponse {
            request_id: 0,
            event: Some(Event::Message(sample())),
        };
        let decoded = ChatResponse::decode(event.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, event);
    }
}
