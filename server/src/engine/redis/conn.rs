//! [`Conn`]: the engine's connection for commands and scripts, to one Redis or to a Redis
//! Cluster, behind one type (both reconnect by themselves).

use redis::{
    Cmd, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager},
    cluster_async::ClusterConnection,
};

/// Commands and scripts, to one Redis or to a Redis Cluster (which routes each to the node
/// holding its key's slot: every key of a room shares the slot of its `{room}` tag).
#[derive(Clone)]
pub(crate) enum Conn {
    /// One Redis.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

impl Conn {
    /// Whether one pipeline may carry the keys of several rooms. One Redis runs any
    /// pipeline in order; a Redis Cluster refuses one whose keys are in different slots,
    /// and every room's keys have a slot of their own (their `{room}` tag).
    pub(crate) fn pipelines_across_rooms(&self) -> bool {
        matches!(self, Conn::Single(_))
    }
}
