//! [`Metrics`]: what the server counts, and the Prometheus endpoint that shows it.
//!
//! Each server has its own registry (no globals), so tests that run several servers in one
//! process read each one's figures apart. Counters and gauges are atomics shared by
//! handle: the hot paths (an append, a delivery) pay one relaxed atomic add. Gauges that
//! are cheaper to read than to track (rooms, live tasks) are read when scraped.
//!
//! `--metrics-listen ADDR` serves them at `http://ADDR/metrics` in the OpenMetrics text
//! format that Prometheus scrapes.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::hub::Hub;

/// Which limit refused something (the `limit` label of `confab_limited_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// A user sent faster than its send rate.
    SendRate,
    /// An address opened more connections than allowed.
    ConnectionsPerIp,
    /// A user opened more streams than allowed.
    StreamsPerUser,
    /// A stream joined more rooms than allowed.
    RoomsPerStream,
    /// A user created rooms faster than allowed, or the server holds its most rooms.
    RoomCreation,
}

impl Limit {
    fn label(self) -> &'static str {
        match self {
            Limit::SendRate => "send_rate",
            Limit::ConnectionsPerIp => "connections_per_ip",
            Limit::StreamsPerUser => "streams_per_user",
            Limit::RoomsPerStream => "rooms_per_stream",
            Limit::RoomCreation => "room_creation",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StreamLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CallLabels {
    call: &'static str,
}

/// A histogram of seconds from 50 µs to ~1.6 s.
fn seconds() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        50e-6, 2.0, 16,
    ))
}

/// Every figure the server keeps.
pub struct Metrics {
    registry: Registry,
    /// Open client connections.
    pub connections: Gauge,
    /// Connections accepted since start.
    pub connections_accepted: Counter,
    /// Open `Chat` streams.
    pub chat_streams: Gauge,
    /// Open `Subscribe` streams.
    pub subscribe_streams: Gauge,
    /// Rooms (set when scraped).
    rooms: Gauge,
    /// Live tokio tasks (set when scraped): what a leak would show first.
    tasks: Gauge,
    /// Messages accepted and stored (retries of a stored message not counted).
    pub messages_in: Counter,
    /// Messages delivered to readers, one per reader.
    pub deliveries: Counter,
    /// Times a reader fell off a room's ring and read what it missed from the store.
    pub lagged_backfills: Counter,
    /// Streams ended because their client read nothing for the stall timeout.
    pub slow_reader_disconnects: Counter,
    /// Requests refused by a limit, by limit.
    limited: Family<LimitLabels, Counter>,
    /// From a message's append to its commit (queueing and group commit), in seconds.
    pub commit_latency: Histogram,
    /// This node's name, as a label of a gauge set to 1.
    node: Family<NodeLabels, Gauge>,
    /// Calls to a shared engine, by call, in seconds.
    engine_calls: Family<CallLabels, Histogram, fn() -> Histogram>,
    /// Gaps in a room's feed filled from the log.
    pub feed_gaps_filled: Counter,
    /// Times the connection to the shared engine's feed was lost and made again.
    pub redis_reconnects: Counter,
    /// Nodes of the cluster with a live heartbeat, as last seen.
    pub nodes: Gauge,
}

impl Metrics {
    /// A fresh set of figures, all zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("confab");
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        let connections_accepted = Counter::default();
        registry.register(
            "connections_accepted",
            "Client connections accepted",
            connections_accepted.clone(),
        );
        let streams = Family::<StreamLabels, Gauge>::default();
        registry.register("streams", "Open streaming calls", streams.clone());
        let chat_streams = streams
            .get_or_create(&StreamLabels { kind: "chat" })
            .clone();
        let subscribe_streams = streams
            .get_or_create(&StreamLabels { kind: "subscribe" })
            .clone();
        let rooms = Gauge::default();
        registry.register("rooms", "Rooms", rooms.clone());
        let tasks = Gauge::default();
        registry.register("tasks", "Live tokio tasks", tasks.clone());
        let messages_in = Counter::default();
        registry.register("messages_in", "Messages accepted", messages_in.clone());
        let deliveries = Counter::default();
        registry.register(
            "deliveries",
            "Messages delivered to readers (one per reader)",
            deliveries.clone(),
        );
        let lagged_backfills = Counter::default();
        registry.register(
            "lagged_backfills",
            "Readers that fell off a room's ring and caught up from storage",
            lagged_backfills.clone(),
        );
        let slow_reader_disconnects = Counter::default();
        registry.register(
            "slow_reader_disconnects",
            "Streams ended because the client read nothing for the stall timeout",
            slow_reader_disconnects.clone(),
        );
        let limited = Family::<LimitLabels, Counter>::default();
        registry.register("limited", "Requests refused by a limit", limited.clone());
        for limit in [
            Limit::SendRate,
            Limit::ConnectionsPerIp,
            Limit::StreamsPerUser,
            Limit::RoomsPerStream,
            Limit::RoomCreation,
        ] {
            // Every label shows from the start, at zero.
            drop(limited.get_or_create(&LimitLabels {
                limit: limit.label(),
            }));
        }
        let commit_latency = seconds();
        registry.register(
            "store_commit_seconds",
            "Time from a message's append to its durable commit",
            commit_latency.clone(),
        );
        let node = Family::<NodeLabels, Gauge>::default();
        registry.register("node", "This node's name (--node-id)", node.clone());
        let engine_calls =
            Family::<CallLabels, Histogram, fn() -> Histogram>::new_with_constructor(seconds);
        registry.register(
            "engine_call_seconds",
            "Time a call to the shared engine (Redis) took, by call",
            engine_calls.clone(),
        );
        let feed_gaps_filled = Counter::default();
        registry.register(
            "feed_gaps_filled",
            "Gaps in a room's feed filled from the log",
            feed_gaps_filled.clone(),
        );
        let redis_reconnects = Counter::default();
        registry.register(
            "redis_reconnects",
            "Times the feed's connection to Redis dropped and was made again",
            redis_reconnects.clone(),
        );
        let nodes = Gauge::default();
        registry.register(
            "cluster_nodes",
            "Nodes of the cluster with a live heartbeat",
            nodes.clone(),
        );
        Self {
            registry,
            connections,
            connections_accepted,
            chat_streams,
            subscribe_streams,
            rooms,
            tasks,
            messages_in,
            deliveries,
            lagged_backfills,
            slow_reader_disconnects,
            limited,
            commit_latency,
            node,
            engine_calls,
            feed_gaps_filled,
            redis_reconnects,
            nodes,
        }
    }

    /// Names this node in the figures.
    pub fn set_node(&self, node: &str) {
        self.node
            .get_or_create(&NodeLabels {
                node: node.to_owned(),
            })
            .set(1);
    }

    /// Records a call to the shared engine that took `elapsed`.
    pub fn engine_call(&self, call: &'static str, elapsed: Duration) {
        self.engine_calls
            .get_or_create(&CallLabels { call })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one refusal by `limit`.
    pub fn limited(&self, limit: Limit) {
        self.limited
            .get_or_create(&LimitLabels {
                limit: limit.label(),
            })
            .inc();
    }

    /// How many refusals `limit` made so far.
    pub fn limited_count(&self, limit: Limit) -> u64 {
        self.limited
            .get_or_create(&LimitLabels {
                limit: limit.label(),
            })
            .get()
    }

    /// Records a commit that took `elapsed`.
    pub fn committed(&self, elapsed: Duration) {
        self.commit_latency.observe(elapsed.as_secs_f64());
    }

    /// The figures in the OpenMetrics text format, the read-on-scrape gauges refreshed.
    pub async fn render(&self, hub: &Hub) -> String {
        // An engine out of reach leaves the last count standing.
        if let Ok(rooms) = hub.room_count().await {
            self.rooms.set(i64::try_from(rooms).unwrap_or(i64::MAX));
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let tasks = runtime.metrics().num_alive_tasks();
            self.tasks.set(i64::try_from(tasks).unwrap_or(i64::MAX));
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A gauge raised while this guard lives: an open stream, an open connection.
pub struct Held(Gauge);

impl Held {
    /// Raises `gauge` until the guard is dropped.
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    hub: Arc<Hub>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    async fn scrape(State((metrics, hub)): State<(Arc<Metrics>, Arc<Hub>)>) -> impl IntoResponse {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            metrics.render(&hub).await,
        )
    }
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state((metrics, hub));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
