//! [`Nodes`]: this node's presence over the cluster, its heartbeat, and the purge of the
//! users of nodes that died.
//!
//! Each node registers its users of a room in a set of its own (`keys::node_presence`),
//! and the rooms where it has any in `keys::node_rooms`; a shared hash counts, per user,
//! the nodes that have them, so a user is announced once when the first node gains them
//! and once when the last one loses them. Each node writes its heartbeat every
//! [`HEARTBEAT`]; a node silent for [`DEAD_AFTER`] is purged by whichever node notices
//! first (the purge script is idempotent): its users leave every room, announced.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use redis::{AsyncCommands as _, aio::ConnectionManager};
use tokio::sync::mpsc;

use super::{Scripts, keys, unavailable};
use crate::{
    engine::{Applied, EngineError, PresenceChange},
    metrics::Metrics,
};

/// How often a node says it is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a node may be silent before the others take it for dead.
const DEAD_AFTER: Duration = Duration::from_secs(5);

/// A presence change of one room, and whom to tell when it is applied.
pub(super) type Change = (String, PresenceChange, Option<Applied>);

/// This node's part in cluster presence.
#[derive(Clone)]
pub(super) struct Nodes {
    node: String,
    conn: ConnectionManager,
    scripts: Arc<Scripts>,
    metrics: Arc<Metrics>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Nodes {
    pub(super) fn new(
        node: String,
        conn: ConnectionManager,
        scripts: Arc<Scripts>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            node,
            conn,
            scripts,
            metrics,
        }
    }

    /// Applies this node's presence changes in order; a change that fails (Redis out of
    /// reach) is tried again until it is applied, so none is lost or reordered.
    pub(super) async fn apply_presence(self, mut changes: mpsc::UnboundedReceiver<Change>) {
        while let Some((room, change, applied)) = changes.recv().await {
            let mut backoff = Duration::from_millis(50);
            while let Err(error) = self.change(&room, &change).await {
                tracing::warn!(room, %error, ?backoff, "a presence change waits for Redis");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            if let Some(applied) = applied {
                let _ = applied.send(());
            }
        }
    }

    async fn change(&self, room: &str, change: &PresenceChange) -> Result<(), EngineError> {
        let mut conn = self.conn.clone();
        let (op, user, new) = match change {
            PresenceChange::Enter(user) => ("enter", user.as_str(), ""),
            PresenceChange::Exit(user) => ("exit", user.as_str(), ""),
            PresenceChange::Rename { old, new } => ("rename", old.as_str(), new.as_str()),
        };
        if op != "exit" {
            // Recorded first, so a purge after this node dies finds the room.
            let _: i64 = conn
                .sadd(keys::node_rooms(&self.node), room)
                .await
                .map_err(unavailable)?;
        }
        let _: i64 = self
            .scripts
            .presence
            .key(keys::presence(room))
            .key(keys::node_presence(room, &self.node))
            .arg(op)
            .arg(keys::channel(room))
            .arg(user)
            .arg(new)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Every user `node` had leaves every room, announced; then `node` is forgotten.
    pub(super) async fn purge(&self, node: &str) -> Result<(), EngineError> {
        let mut conn = self.conn.clone();
        let rooms: Vec<String> = conn
            .smembers(keys::node_rooms(node))
            .await
            .map_err(unavailable)?;
        for room in &rooms {
            let _: i64 = self
                .scripts
                .presence
                .key(keys::presence(room))
                .key(keys::node_presence(room, node))
                .arg("purge")
                .arg(keys::channel(room))
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        let _: () = redis::pipe()
            .del(keys::node_rooms(node))
            .hdel(keys::NODES, node)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if !rooms.is_empty() {
            tracing::info!(node, rooms = rooms.len(), "purged a node's presence");
        }
        Ok(())
    }

    /// Says this node is alive every [`HEARTBEAT`], counts the live nodes, and purges any
    /// that fell silent.
    pub(super) async fn heartbeat(self) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(error) = self.beat().await {
                tracing::warn!(%error, "heartbeat failed");
            }
        }
    }

    async fn beat(&self) -> Result<(), EngineError> {
        let mut conn = self.conn.clone();
        let now = now_ms();
        let _: i64 = conn
            .hset(keys::NODES, &self.node, now)
            .await
            .map_err(unavailable)?;
        let beats: Vec<(String, u64)> = conn.hgetall(keys::NODES).await.map_err(unavailable)?;
        let dead_after = u64::try_from(DEAD_AFTER.as_millis()).unwrap_or(u64::MAX);
        let mut alive = 0;
        for (node, last) in beats {
            if now.saturating_sub(last) < dead_after {
                alive += 1;
            } else {
                tracing::warn!(node, silent_ms = now - last, "a node fell silent");
                self.purge(&node).await?;
            }
        }
        self.metrics.nodes.set(alive);
        Ok(())
    }
}
