//! [`Presence`]: a user's presence in a room through one stream; dropping it leaves, so
//! however a session ends (leave, stream end, dropped connection, shutdown, panic) the
//! user leaves the room at once.

use std::sync::Arc;

use tokio::sync::watch;

use super::Room;
use crate::{engine::Removal, error::ChatError};

/// A user's presence in a room through one stream. Dropping it leaves.
#[derive(Debug)]
pub struct Presence {
    room: Arc<Room>,
    user: String,
    /// Becomes `Some` when the owner puts the user out.
    removed: watch::Receiver<Option<Arc<Removal>>>,
}

impl Presence {
    pub(super) fn new(
        room: Arc<Room>,
        user: String,
        removed: watch::Receiver<Option<Arc<Removal>>>,
    ) -> Self {
        Self {
            room,
            user,
            removed,
        }
    }

    /// Whether `new` may be in this presence's room (checked for every room before a
    /// rename changes any).
    pub fn admits(&self, new: &str) -> Result<(), ChatError> {
        self.room.admit(new)
    }

    /// This stream's user is `new` from now on (see `Room::rename`).
    pub fn rename(&mut self, new: &str) {
        self.removed = self.room.rename(&self.user, new);
        new.clone_into(&mut self.user);
    }

    /// Resolves when the owner kicks or bans the user (never, otherwise).
    pub fn removed(&self) -> impl std::future::Future<Output = Arc<Removal>> + Send + 'static {
        let mut removed = self.removed.clone();
        async move {
            loop {
                if let Some(removal) = removed.borrow_and_update().clone() {
                    return removal;
                }
                if removed.changed().await.is_err() {
                    // The member left and its channel is gone: nothing more will come.
                    return std::future::pending().await;
                }
            }
        }
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.room.exit(&self.user);
    }
}
