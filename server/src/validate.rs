//! Checks of client-controlled fields. Each returns the [`Violation`] of the field it
//! checks, named as in the proto; callers put it under the message it belongs to.

use confab::pb::{self, MessageKind, chat_request::Command};

use crate::error::{Violation, quote};

/// Longest room name: `[a-z0-9][a-z0-9_-]{0,63}`.
pub const MAX_ROOM_NAME: usize = 64;
/// Longest idempotency key.
pub const MAX_CLIENT_MSG_ID: usize = 128;
/// Longest topic.
pub const MAX_TOPIC: usize = 512;

/// A room name: `[a-z0-9][a-z0-9_-]{0,63}`.
pub fn room_name(field: &str, name: &str) -> Result<(), Violation> {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Err(Violation::new(field, "a room name is required"));
    };
    let valid_rest = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
    if name.len() > MAX_ROOM_NAME
        || !(first.is_ascii_lowercase() || first.is_ascii_digit())
        || !chars.all(valid_rest)
    {
        return Err(Violation::new(
            field,
            format!(
                "{} is not a room name: use 1 to {MAX_ROOM_NAME} of a-z 0-9 _ -, starting with a letter or digit",
                quote(name)
            ),
        ));
    }
    Ok(())
}

/// A nickname (see [`crate::nickname`]): its enforced form, the one to store and show.
pub fn nickname(field: &str, nick: &str) -> Result<String, Violation> {
    crate::nickname::enforce(nick).map_err(|error| {
        Violation::new(field, format!("{} is not a nickname: {error}", quote(nick)))
    })
}

/// Message text: non-empty, not only white space, at most `max_bytes` bytes of UTF-8.
pub fn text(field: &str, text: &str, max_bytes: usize) -> Result<(), Violation> {
    if text.trim().is_empty() {
        return Err(Violation::new(field, "the text is empty"));
    }
    if text.len() > max_bytes {
        return Err(Violation::new(
            field,
            format!("the text is {} bytes; the limit is {max_bytes}", text.len()),
        ));
    }
    Ok(())
}

/// A topic: at most [`MAX_TOPIC`] bytes, one line.
pub fn topic(field: &str, topic: &str) -> Result<(), Violation> {
    if topic.len() > MAX_TOPIC {
        return Err(Violation::new(
            field,
            format!(
                "the topic is {} bytes; the limit is {MAX_TOPIC}",
                topic.len()
            ),
        ));
    }
    if topic.contains(['\n', '\r']) {
        return Err(Violation::new(field, "the topic must be one line"));
    }
    Ok(())
}

/// Longest epoch a client may name; the server's are 16 hex digits.
pub const MAX_EPOCH: usize = 64;

/// An epoch a client names to resume from (empty: none): at most [`MAX_EPOCH`] bytes. One
/// that is not the room's is no error: it asks for a reset.
pub fn epoch(field: &str, epoch: &str) -> Result<(), Violation> {
    if epoch.len() > MAX_EPOCH {
        return Err(Violation::new(
            field,
            format!(
                "an epoch is at most {MAX_EPOCH} bytes; this one is {}",
                epoch.len()
            ),
        ));
    }
    Ok(())
}

/// An idempotency key: 1 to 128 bytes.
pub fn client_msg_id(field: &str, id: &str) -> Result<(), Violation> {
    if id.is_empty() {
        return Err(Violation::new(
            field,
            "a client_msg_id is required (any unique string; retries reuse it)",
        ));
    }
    if id.len() > MAX_CLIENT_MSG_ID {
        return Err(Violation::new(
            field,
            format!(
                "the id is {} bytes; the limit is {MAX_CLIENT_MSG_ID}",
                id.len()
            ),
        ));
    }
    Ok(())
}

/// A message kind: a known value; UNSPECIFIED reads as TEXT.
pub fn message_kind(field: &str, kind: i32) -> Result<MessageKind, Violation> {
    match MessageKind::try_from(kind) {
        Ok(MessageKind::Unspecified) => Ok(MessageKind::Text),
        Ok(kind) => Ok(kind),
        Err(_) => Err(Violation::new(
            field,
            format!("{kind} is not a MessageKind"),
        )),
    }
}

/// A message a client wants stored, once its fields have been checked.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The room it goes to.
    pub room: String,
    /// The text.
    pub text: String,
    /// The sender's idempotency key.
    pub client_msg_id: String,
    /// Text or action.
    pub kind: MessageKind,
}

impl Outgoing {
    /// `message`, whose fields [`command`] (or [`outgoing`]) has checked already.
    pub fn checked(message: pb::OutgoingMessage) -> Self {
        Self {
            kind: message_kind("kind", message.kind).unwrap_or(MessageKind::Text),
            room: message.room,
            text: message.text,
            client_msg_id: message.client_msg_id,
        }
    }
}

/// Checks every field of an `OutgoingMessage` (violations are named relative to it).
fn check_outgoing(message: &pb::OutgoingMessage, max_text_bytes: usize) -> Result<(), Violation> {
    room_name("room", &message.room)?;
    text("text", &message.text, max_text_bytes)?;
    client_msg_id("client_msg_id", &message.client_msg_id)?;
    message_kind("kind", message.kind).map(drop)
}

/// Checks every field of an `OutgoingMessage`; violations are named relative to it.
pub fn outgoing(
    message: pb::OutgoingMessage,
    max_text_bytes: usize,
) -> Result<Outgoing, Violation> {
    check_outgoing(&message, max_text_bytes)?;
    Ok(Outgoing::checked(message))
}

/// Checks the fields of one `Chat` command, named as in the frame (`send.text`,
/// `kick.user`); the session does this, once, before it acts on any frame, and its
/// handlers rely on it. Whether the rooms exist and the user may act in them is the hub's
/// business, not this.
pub fn command(command: &Command, max_text_bytes: usize) -> Result<(), Violation> {
    match command {
        Command::Join(join) => room_name("room", &join.room)
            .and_then(|()| epoch("epoch", &join.epoch))
            .map_err(|v| v.within("join")),
        Command::Leave(leave) => room_name("room", &leave.room).map_err(|v| v.within("leave")),
        Command::Send(message) => {
            check_outgoing(message, max_text_bytes).map_err(|v| v.within("send"))
        }
        Command::Typing(typing) => room_name("room", &typing.room).map_err(|v| v.within("typing")),
        Command::SetTopic(set) => room_name("room", &set.room)
            .and_then(|()| topic("topic", &set.topic))
            .map_err(|v| v.within("set_topic")),
        Command::Invite(invite) => room_name("room", &invite.room)
            .and_then(|()| nickname("user", &invite.user).map(drop))
            .map_err(|v| v.within("invite")),
        Command::Kick(pb::Kick { room, user, reason }) => {
            moderation(room, user, reason).map_err(|v| v.within("kick"))
        }
        Command::Ban(pb::Ban { room, user, reason }) => {
            moderation(room, user, reason).map_err(|v| v.within("ban"))
        }
        Command::Ping(_) => Ok(()),
        Command::Rename(rename) => nickname("nickname", &rename.nickname)
            .map(drop)
            .map_err(|v| v.within("rename")),
    }
}

fn moderation(room: &str, user: &str, reason: &str) -> Result<(), Violation> {
    room_name("room", room)?;
    nickname("user", user)?;
    topic("reason", reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_follow_the_pattern() {
        for ok in ["a", "lobby", "0day", "rust-lang", "a_b", &"x".repeat(64)] {
            assert!(room_name("room", ok).is_ok(), "{ok:?} should be valid");
        }
        for bad in ["", "Lobby", "-x", "_x", "a b", "a.b", "é", &"x".repeat(65)] {
            let v = room_name("room", bad).unwrap_err();
            assert_eq!(v.field, "room", "{bad:?}");
        }
    }

    #[test]
    fn a_refused_nickname_names_its_field_and_says_why() {
        assert_eq!(nickname("nickname", "zoë").as_deref(), Ok("zoë"));
        let v = nickname("nickname", "a b").unwrap_err();
        assert_eq!(v.field, "nickname");
        assert_eq!(
            v.description,
            r#""a b" is not a nickname: a nickname is one word, without spaces"#
        );
    }

    #[test]
    fn text_limits_count_bytes_not_chars() {
        assert!(text("text", "hi", 4).is_ok());
        assert!(text("text", "   ", 4).is_err());
        // Two 2-byte characters: 4 bytes fits, a third does not.
        assert!(text("text", "éé", 4).is_ok());
        let v = text("text", "ééé", 4).unwrap_err();
        assert!(v.description.contains("6 bytes"), "{}", v.description);
    }

    #[test]
    fn violations_nest_under_their_message() {
        let v = outgoing(
            pb::OutgoingMessage {
                room: "lobby".into(),
                text: "hi".into(),
                client_msg_id: String::new(),
                kind: 0,
            },
            100,
        )
        .unwrap_err()
        .within("send");
        assert_eq!(v.field, "send.client_msg_id");
    }

    #[test]
    fn unknown_message_kinds_are_refused() {
        assert_eq!(message_kind("kind", 0).unwrap(), MessageKind::Text);
        assert!(message_kind("kind", 99).is_err());
    }
}
