//! What the Redis engine writes: log entries, feed frames, room records.
//!
//! A message is stored and published as its protobuf encoding *without* its seq (the
//! append script assigns the seq, and Lua does not encode protobuf): the log entry's ID is
//! `<seq>-0`, and a message frame carries the seq in front of the body. Every other frame
//! is encoded here, by the node that publishes it (or hands it to a script to publish).
//!
//! Frames on a room's channel (the first byte says which):
//!
//! * `m<epoch>:<seq>:<body>`: a committed message (from the append script);
//! * `p<kind>:<user>\n<previous>`: a presence change over every node (from the presence
//!   script; `kind` is a `PresenceKind` number);
//! * `e<Event>`: anything else ([`Event`], protobuf), from a node.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use confab::{ChatMessage, ChatMessageRecord, pb};
use prost::Message as _;

use crate::{
    engine::{EngineError, FeedEvent, Removal},
    store::{Access, RoomRecord, from_micros, to_micros},
};

/// A frame published by a node (`e`), as protobuf.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Event {
    /// What happened.
    #[prost(oneof = "EventKind", tags = "1, 2, 3, 4")]
    pub kind: Option<EventKind>,
}

/// The kinds of [`Event`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub(super) enum EventKind {
    /// Someone is typing.
    #[prost(message, tag = "1")]
    Typing(pb::TypingEvent),
    /// The topic changed.
    #[prost(message, tag = "2")]
    Topic(TopicSet),
    /// A user's standing changed.
    #[prost(message, tag = "3")]
    Access(AccessSet),
    /// The owner put a user out.
    #[prost(message, tag = "4")]
    Removed(UserRemoved),
}

/// [`FeedEvent::Topic`] on the wire.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct TopicSet {
    #[prost(string, tag = "1")]
    pub topic: String,
    #[prost(string, tag = "2")]
    pub by: String,
}

/// [`FeedEvent::Access`] on the wire; `access` empty for neither.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct AccessSet {
    #[prost(string, tag = "1")]
    pub user: String,
    #[prost(string, tag = "2")]
    pub access: String,
}

/// [`FeedEvent::Removed`] on the wire.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct UserRemoved {
    #[prost(string, tag = "1")]
    pub user: String,
    #[prost(enumeration = "pb::LeaveReason", tag = "2")]
    pub reason: i32,
    #[prost(string, tag = "3")]
    pub by: String,
    #[prost(string, tag = "4")]
    pub message: String,
}

/// The `e` frame of a feed event a node publishes (typing, topic, access, removal);
/// `None` for messages and presence, which scripts publish.
pub(super) fn event_frame(event: &FeedEvent) -> Option<Vec<u8>> {
    let kind = match event {
        FeedEvent::Typing(typing) => EventKind::Typing((**typing).clone()),
        FeedEvent::Topic { topic, by } => EventKind::Topic(TopicSet {
            topic: topic.clone(),
            by: by.clone(),
        }),
        FeedEvent::Access { user, access } => EventKind::Access(AccessSet {
            user: user.clone(),
            access: access.map(Access::as_str).unwrap_or_default().to_owned(),
        }),
        FeedEvent::Removed { user, removal } => EventKind::Removed(UserRemoved {
            user: user.clone(),
            reason: removal.reason as i32,
            by: removal.by.clone(),
            message: removal.message.clone(),
        }),
        FeedEvent::Message(_)
        | FeedEvent::Presence(_)
        | FeedEvent::Reset { .. }
        | FeedEvent::Resync { .. } => return None,
    };
    let mut frame = vec![b'e'];
    Event { kind: Some(kind) }.encode(&mut frame).ok()?;
    Some(frame)
}

/// A frame read off a room's channel.
#[derive(Debug)]
pub(super) enum Frame {
    /// A committed message of the room's `epoch`.
    Message {
        /// The room's epoch when it was appended.
        epoch: String,
        /// The message, seq set.
        message: ChatMessage,
    },
    /// Anything else.
    Event(FeedEvent),
}

/// Reads a frame of `room`'s channel.
pub(super) fn parse_frame(room: &str, frame: &[u8]) -> Result<Frame, EngineError> {
    let bad = |what: &str| EngineError::Protocol(format!("room {room}: {what}"));
    let (&tag, rest) = frame.split_first().ok_or_else(|| bad("an empty frame"))?;
    match tag {
        b'm' => {
            let mut parts = rest.splitn(3, |&b| b == b':');
            let (Some(epoch), Some(seq), Some(body)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(bad("a message frame without epoch and seq"));
            };
            let epoch = String::from_utf8(epoch.to_vec()).map_err(|_| bad("a bad epoch"))?;
            let seq = std::str::from_utf8(seq)
                .ok()
                .and_then(|seq| seq.parse().ok())
                .ok_or_else(|| bad("a bad seq"))?;
            Ok(Frame::Message {
                epoch,
                message: decode_message(room, seq, body)?,
            })
        }
        b'p' => {
            let text = std::str::from_utf8(rest).map_err(|_| bad("a presence frame not UTF-8"))?;
            let (head, previous) = text.split_once('\n').unwrap_or((text, ""));
            let (kind, user) = head
                .split_once(':')
                .ok_or_else(|| bad("a presence frame without kind"))?;
            let kind: i32 = kind.parse().map_err(|_| bad("a bad presence kind"))?;
            Ok(Frame::Event(FeedEvent::Presence(Arc::new(
                pb::PresenceEvent {
                    room: room.to_owned(),
                    user: user.to_owned(),
                    kind,
                    at: Some(SystemTime::now().into()),
                    previous: previous.to_owned(),
                },
            ))))
        }
        b'e' => {
            let event = Event::decode(rest).map_err(|e| bad(&format!("an event frame: {e}")))?;
            let event = match event.kind.ok_or_else(|| bad("an empty event"))? {
                EventKind::Typing(typing) => FeedEvent::Typing(Arc::new(typing)),
                EventKind::Topic(set) => FeedEvent::Topic {
                    topic: set.topic,
                    by: set.by,
                },
                EventKind::Access(set) => FeedEvent::Access {
                    access: Access::parse(&set.access),
                    user: set.user,
                },
                EventKind::Removed(removed) => FeedEvent::Removed {
                    user: removed.user,
                    removal: Arc::new(Removal {
                        reason: pb::LeaveReason::try_from(removed.reason)
                            .unwrap_or(pb::LeaveReason::Kicked),
                        by: removed.by,
                        message: removed.message,
                    }),
                },
            };
            Ok(Frame::Event(event))
        }
        _ => Err(bad("a frame of an unknown kind")),
    }
}

/// A message's body as stored and published: its encoding without the seq.
pub(super) fn encode_body(record: &ChatMessageRecord) -> Vec<u8> {
    debug_assert_eq!(record.seq, 0, "the script assigns the seq");
    record.encode_to_vec()
}

/// A stored or published body, with its seq.
pub(super) fn decode_message(
    room: &str,
    seq: u64,
    body: &[u8],
) -> Result<ChatMessage, EngineError> {
    let mut record = ChatMessageRecord::decode(body)
        .map_err(|e| EngineError::Protocol(format!("room {room}: message {seq}: {e}")))?;
    record.seq = seq;
    Ok(ChatMessage::new(record))
}

/// The seq of a log entry's ID (`<seq>-0`).
pub(super) fn entry_seq(id: &str) -> Option<u64> {
    id.split_once('-').and_then(|(seq, _)| seq.parse().ok())
}

/// The fields of a room's `meta` hash for `record` (besides `head` and `epoch`).
pub(super) fn meta_fields(record: &RoomRecord) -> [(&'static str, String); 5] {
    [
        ("name", record.name.clone()),
        ("created_by", record.created_by.clone()),
        ("created_at", to_micros(record.created_at).to_string()),
        ("private", u8::from(record.private).to_string()),
        ("topic", record.topic.clone()),
    ]
}

/// A room's record from its `meta` and `access` hashes; `None` if `meta` is empty.
pub(super) fn record_from(
    meta: &BTreeMap<String, String>,
    access: &BTreeMap<String, String>,
) -> Option<RoomRecord> {
    let name = meta.get("name")?.clone();
    Some(RoomRecord {
        topic: meta.get("topic").cloned().unwrap_or_default(),
        created_at: from_micros(
            meta.get("created_at")
                .and_then(|t| t.parse().ok())
                .unwrap_or(0),
        ),
        created_by: meta.get("created_by").cloned().unwrap_or_default(),
        private: meta.get("private").is_some_and(|p| p == "1"),
        access: access
            .iter()
            .filter_map(|(user, access)| Some((user.clone(), Access::parse(access)?)))
            .collect(),
        head_seq: meta.get("head").and_then(|h| h.parse().ok()).unwrap_or(0),
        epoch: meta.get("epoch").cloned().unwrap_or_default(),
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_the_wire() {
        let removal = FeedEvent::Removed {
            user: "bob".into(),
            removal: Arc::new(Removal {
                reason: pb::LeaveReason::Banned,
                by: "alice".into(),
                message: "bye".into(),
            }),
        };
        let frame = event_frame(&removal).unwrap();
        let Frame::Event(FeedEvent::Removed { user, removal }) = parse_frame("r", &frame).unwrap()
        else {
            panic!("not a removal");
        };
        assert_eq!(user, "bob");
        assert_eq!(removal.reason, pb::LeaveReason::Banned);
        assert_eq!(removal.by, "alice");
    }

    #[test]
    fn a_message_frame_carries_epoch_and_seq_before_the_body() {
        let body = encode_body(&ChatMessageRecord {
            room: "r".into(),
            sender: "zoë".into(),
            text: "a:b:c".into(),
            ..Default::default()
        });
        let mut frame = b"mE1:42:".to_vec();
        frame.extend_from_slice(&body);
        let Frame::Message { epoch, message } = parse_frame("r", &frame).unwrap() else {
            panic!("not a message");
        };
        assert_eq!((epoch.as_str(), message.seq), ("E1", 42));
        assert_eq!(message.text, "a:b:c");
    }

    #[test]
    fn a_presence_frame_names_the_previous_nickname_after_a_newline() {
        let Frame::Event(FeedEvent::Presence(p)) =
            parse_frame("r", "p3:new:x\nold".as_bytes()).unwrap()
        else {
            panic!("not presence");
        };
        assert_eq!(
            (p.kind, p.user.as_str(), p.previous.as_str()),
            (3, "new:x", "old")
        );
        assert!(parse_frame("r", b"x").is_err());
        assert!(parse_frame("r", b"").is_err());
    }
}
