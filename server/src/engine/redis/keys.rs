//! Where everything lives in Redis. Every key of a room carries the hash tag `{room}`, so
//! a room lives in one slot of a Redis Cluster and one script can touch all of its keys.

/// The room's record: name, owner, creation time, private flag, topic, `head` (the last
/// seq assigned) and `epoch`.
pub(super) fn meta(room: &str) -> String {
    format!("confab:{{{room}}}:meta")
}

/// The room's log: a stream whose entry IDs are `<seq>-0`.
pub(super) fn log(room: &str) -> String {
    format!("confab:{{{room}}}:log")
}

/// Invited and banned users: comparison key → `invited` | `banned`.
pub(super) fn access(room: &str) -> String {
    format!("confab:{{{room}}}:access")
}

/// Users present: nickname → how many nodes have them.
pub(super) fn presence(room: &str) -> String {
    format!("confab:{{{room}}}:presence")
}

/// The room's users on one node.
pub(super) fn node_presence(room: &str, node: &str) -> String {
    format!("confab:{{{room}}}:presence:{node}")
}

/// An idempotency key → the seq it was stored under; expires with the dedupe window. The
/// sender's length comes first, so no pair of sender and id can spell another's key.
pub(super) fn sent(room: &str, sender: &str, client_msg_id: &str) -> String {
    format!(
        "confab:{{{room}}}:sent:{}:{sender}:{client_msg_id}",
        sender.len()
    )
}

/// The room's feed channel.
pub(super) fn channel(room: &str) -> String {
    format!("confab:{{{room}}}:feed")
}

/// The room a feed channel belongs to.
pub(super) fn room_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix("confab:{")?.strip_suffix("}:feed")
}

/// Every room's name (a sorted set, all scores 0, read in name order).
pub(super) const ROOMS: &str = "confab:rooms";

/// Each node's last heartbeat (ms since the Unix epoch).
pub(super) const NODES: &str = "confab:nodes";

/// The rooms where a node has (or had) users, for purging them when it dies.
pub(super) fn node_rooms(node: &str) -> String {
    format!("confab:node:{node}:rooms")
}

/// Which login holds a nickname (by its comparison key), expiring with its lease.
pub(super) fn nickname(key: &str) -> String {
    format!("confab:nick:{key}")
}

/// The secret the nodes sign session tokens with, made by the first node.
pub(super) const TOKEN_SECRET: &str = "confab:token-secret";

#[cfg(test)]
mod tests {
    #[test]
    fn a_channel_names_its_room() {
        assert_eq!(
            super::room_of_channel(&super::channel("a-b_1")),
            Some("a-b_1")
        );
        assert_eq!(super::room_of_channel("other"), None);
    }
}
