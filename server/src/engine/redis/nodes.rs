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
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use redis::AsyncCommands as _;
use tokio::sync::mpsc;

use super::{Conn, Scripts, keys, unavailable};
use crate::{
    engine::{Applied, EngineError, PresenceChange},
    metrics::Metrics,
};

/// How often a node says it is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a node may be silent before the others take it for dead.
const DEAD_AFTER: Duration = Duration::from_secs(5);

/// What the presence task does, in order.
pub(super) enum Work {
    /// A presence change of one room, and whom to tell when it is applied.
    Change(String, PresenceChange, Option<Applied>),
    /// Register every user this node has again: the others took it for dead (it was cut off
    /// from Redis for longer than [`DEAD_AFTER`]) and purged them.
    Resync,
}

/// This node's part in cluster presence.
#[derive(Clone)]
pub(super) struct Nodes {
    node: String,
    conn: Conn,
    scripts: Arc<Scripts>,
    metrics: Arc<Metrics>,
    /// The users this node has registered, per room: what a resync registers again.
    registered: Arc<Mutex<HashMap<String, BTreeSet<String>>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Nodes {
    pub(super) fn new(
        node: String,
        conn: Conn,
        scripts: Arc<Scripts>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            node,
            conn,
            scripts,
            metrics,
            registered: Arc::default(),
        }
    }

    fn registered(&self) -> MutexGuard<'_, HashMap<String, BTreeSet<String>>> {
        self.registered.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies this node's presence changes in order; a change that fails (Redis out of
    /// reach) is tried again until it is applied, so none is lost or reordered.
    pub(super) async fn apply_presence(self, mut work: mpsc::UnboundedReceiver<Work>) {
        while let Some(next) = work.recv().await {
            match next {
                Work::Change(room, change, applied) => {
                    self.until_applied(&room, &change).await;
                    let mut registered = self.registered();
                    let users = registered.entry(room.clone()).or_default();
                    match &change {
                        PresenceChange::Enter(user) => {
                            users.insert(user.clone());
                        }
                        PresenceChange::Exit(user) => {
                            users.remove(user);
                        }
                        PresenceChange::Rename { old, new } => {
                            users.remove(old);
                            users.insert(new.clone());
                        }
                    }
                    if users.is_empty() {
                        registered.remove(&room);
                    }
                    drop(registered);
                    if let Some(applied) = applied {
                        let _ = applied.send(());
                    }
                }
                Work::Resync => {
                    let everyone: Vec<(String, String)> = self
                        .registered()
                        .iter()
                        .flat_map(|(room, users)| users.iter().map(|u| (room.clone(), u.clone())))
                        .collect();
                    if !everyone.is_empty() {
                        tracing::warn!(
                            users = everyone.len(),
                            "registering this node's users again"
                        );
                    }
                    for (room, user) in everyone {
                        // Entering again is a no-op for a user still registered.
                        self.until_applied(&room, &PresenceChange::Enter(user))
                            .await;
                    }
                }
            }
        }
    }

    /// Applies `change`, trying again (with backoff) while Redis is out of reach.
    async fn until_applied(&self, room: &str, change: &PresenceChange) {
        let mut backoff = Duration::from_millis(50);
        while let Err(error) = self.change(room, change).await {
            tracing::warn!(room, %error, ?backoff, "a presence change waits for Redis");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
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
        // Two commands, not a pipeline: on a Redis Cluster the keys are in different slots.
        let _: () = conn
            .del(keys::node_rooms(node))
            .await
            .map_err(unavailable)?;
        let _: () = conn.hdel(keys::NODES, node).await.map_err(unavailable)?;
        if !rooms.is_empty() {
            tracing::info!(node, rooms = rooms.len(), "purged a node's presence");
        }
        Ok(())
    }

    /// Says this node is alive every [`HEARTBEAT`], counts the live nodes, and purges any
    /// that fell silent. A node purges others only once its own beats have gone through
    /// for [`DEAD_AFTER`]: after an outage of Redis every node is silent for a while, and
    /// the first back must not take the others for dead. If the others purged this node
    /// (it was cut off), it registers its users again (`Work::Resync`).
    pub(super) async fn heartbeat(self, work: mpsc::UnboundedSender<Work>) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Since when this node's beats have gone through, if they do.
        let mut steady_since: Option<Instant> = None;
        loop {
            tick.tick().await;
            let may_purge = steady_since.is_some_and(|since| since.elapsed() >= DEAD_AFTER);
            match self.beat(may_purge).await {
                Ok(was_gone) => {
                    if was_gone {
                        // The first beat of this node (nothing to register yet), or the
                        // first after the others purged it.
                        let _ = work.send(Work::Resync);
                    }
                    steady_since.get_or_insert_with(Instant::now);
                }
                Err(error) => {
                    steady_since = None;
                    tracing::warn!(%error, "heartbeat failed");
                }
            }
        }
    }

    /// One heartbeat; whether this node was missing from the live nodes (purged, or new).
    async fn beat(&self, may_purge: bool) -> Result<bool, EngineError> {
        let mut conn = self.conn.clone();
        let now = now_ms();
        let added: i64 = conn
            .hset(keys::NODES, &self.node, now)
            .await
            .map_err(unavailable)?;
        let beats: Vec<(String, u64)> = conn.hgetall(keys::NODES).await.map_err(unavailable)?;
        let dead_after = u64::try_from(DEAD_AFTER.as_millis()).unwrap_or(u64::MAX);
        let mut alive = 0;
        for (node, last) in beats {
            if now.saturating_sub(last) < dead_after {
                alive += 1;
            } else if may_purge {
                tracing::warn!(node, silent_ms = now - last, "a node fell silent");
                self.purge(&node).await?;
            }
        }
        self.metrics.nodes.set(alive);
        Ok(added == 1)
    }
}
