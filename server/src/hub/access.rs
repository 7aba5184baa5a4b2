//! Who may be in a room and who may change it: the owner, invites, bans.

use crate::{
    error::{ChatError, quote},
    nickname,
    store::{Access, RoomRecord},
};

/// What the owner does to a user.
#[derive(Debug, Clone, PartialEq)]
pub enum Moderation {
    /// Admit to the private room, and lift a ban.
    Invite,
    /// Put out; may come back.
    Kick(String),
    /// Put out and keep out.
    Ban(String),
}

/// PERMISSION_DENIED unless `user` owns the room `record` describes.
pub(super) fn owner_only(record: &RoomRecord, user: &str, what: &str) -> Result<(), ChatError> {
    if nickname::key(user) == nickname::key(&record.created_by) {
        return Ok(());
    }
    Err(ChatError::denied(
        "room",
        format!("only the room's owner ({}) may {what}", record.created_by),
    ))
}

/// Whether `user` may be in the room `record` describes: the owner always; others unless
/// banned, and in a private room only when invited.
pub(super) fn admit(record: &RoomRecord, user: &str) -> Result<(), ChatError> {
    if !record.private && record.access.is_empty() {
        return Ok(());
    }
    let key = nickname::key(user);
    if key == nickname::key(&record.created_by) {
        return Ok(());
    }
    match record.access.get(&key) {
        Some(Access::Banned) => Err(ChatError::denied(
            "room",
            format!("you are banned from room {}", quote(&record.name)),
        )),
        Some(Access::Invited) => Ok(()),
        None if record.private => Err(ChatError::denied(
            "room",
            format!(
                "room {} is private; its owner must invite you",
                quote(&record.name)
            ),
        )),
        None => Ok(()),
    }
}
