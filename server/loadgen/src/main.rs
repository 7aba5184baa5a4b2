//! `confab-bench`: Confab's load generator.
//!
//! Publishers are open-loop: message n of a publisher is due at `start + n / rate` and
//! carries that intended time, so a server that falls behind shows as latency instead of
//! quietly lowering the offered load. Every subscriber records the latency of every
//! delivery (now − intended) in an HDR histogram and counts what it got; the run fails if
//! anything sent in the measured window did not arrive (or arrived twice, or out of order).
//! The server's RSS and CPU time come from `/proc`.
//!
//! Each run: set up every connection and stream, publish through a warm-up, measure for
//! the duration, stop publishing, wait for the last deliveries (at most 10 s), report.
//! With no `--server`, it starts `confab-server` pinned to CPU 0 and pins itself to CPU 1.

mod process;
mod wire;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use confab::pb::{self, chat_request::Command};
use futures::{StreamExt as _, TryStreamExt as _, stream};
use hdrhistogram::Histogram;
use prost::Message as _;
use serde::Serialize;
use tokio::{
    sync::{mpsc, watch},
    time::{Instant, MissedTickBehavior},
};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    process::{Spawned, Usage},
    wire::Connection,
};

/// How long the last deliveries may take after publishing stops, before they count as lost.
const DRAIN: Duration = Duration::from_secs(10);
/// Streams and connections set up at once.
const SETUP_CONCURRENCY: usize = 64;

#[derive(Debug, Parser)]
#[command(name = "confab-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Clone, Args)]
struct Common {
    /// Load a running server (`http://host:port`, started with the limits off) instead of
    /// starting one. Repeat it for the nodes of a cluster: subscribers' connections are
    /// spread over them in turn; publishers (and pingpong, idle) use the first.
    #[arg(long, global = true)]
    server: Vec<String>,
    /// With --server: a server's process id, for the RSS and CPU figures (repeat it for
    /// each node; the figures are their sums).
    #[arg(long, global = true, requires = "server")]
    server_pid: Vec<u32>,
    /// With --server: where the publishers connect (repeat it to spread them in turn over
    /// several nodes) [default: the first --server].
    #[arg(long, global = true, requires = "server")]
    publish_server: Vec<String>,
    /// The confab-server binary to start [default: the one beside this binary].
    #[arg(long, global = true)]
    server_bin: Option<PathBuf>,
    /// Do not pin the server to CPU 0 and this process to CPU 1.
    #[arg(long, global = true)]
    no_pin: bool,
    /// Load before measuring.
    #[arg(long, global = true, default_value = "5s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// How long to measure.
    #[arg(long, global = true, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Print the figures as one JSON object.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Clone, Subcommand)]
enum Scenario {
    /// One room, one publisher, many subscribers.
    Fanout(Fanout),
    /// Many rooms with a few subscribers each, publishers spread over them.
    Rooms {
        /// Rooms.
        #[arg(long, default_value_t = 1000)]
        rooms: usize,
        /// Subscribers per room.
        #[arg(long, default_value_t = 10)]
        per_room: usize,
        /// Messages per second into each room.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Text bytes per message.
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Connections the subscribers share.
        #[arg(long, default_value_t = 100)]
        connections: usize,
    },
    /// One message in flight: send, wait for it to come back, repeat.
    Pingpong {
        /// Text bytes per message.
        #[arg(long, default_value_t = 100)]
        payload: usize,
    },
    /// Open connections that do nothing, each with a Chat stream; what each costs the server.
    Idle {
        /// Connections.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Only connect and log in: no Chat stream (to tell the two costs apart).
        #[arg(long)]
        without_stream: bool,
    },
    /// Fan-out with one subscriber that never reads, against the same run without it.
    SlowReader(Fanout),
}

#[derive(Debug, Clone, Args)]
struct Fanout {
    /// Subscribers.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Messages per second from the publisher.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Text bytes per message.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Connections the subscribers share.
    #[arg(long, default_value_t = 50)]
    connections: usize,
}

/// The figures of a run.
#[derive(Debug, Default, Serialize)]
struct Report {
    scenario: String,
    offered_msgs_per_sec: f64,
    subscribers: usize,
    sent: u64,
    expected: u64,
    delivered: u64,
    delivered_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    lost: u64,
    out_of_order: u64,
    errors: u64,
    server_rss_bytes: u64,
    server_cpu_s: f64,
    /// This generator's own CPU time in the window: near the window's length, it was
    /// saturated too, and the figures say as much about it as about the server.
    load_cpu_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_per_connection_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_p99_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_rise_pct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stalled_rss_growth_bytes: Option<i64>,
}

impl Report {
    /// The report with its latency figures taken from `latency`.
    fn with_latency(mut self, latency: &Histogram<u64>) -> Self {
        self.p50_us = latency.value_at_quantile(0.5);
        self.p99_us = latency.value_at_quantile(0.99);
        self.p999_us = latency.value_at_quantile(0.999);
        self.max_us = latency.max();
        self
    }

    fn failed(&self) -> bool {
        self.lost > 0 || self.out_of_order > 0 || self.errors > 0
    }

    fn print(&self, json: bool) -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string(self)?);
            return Ok(());
        }
        let value = serde_json::to_value(self)?;
        for (key, value) in value.as_object().into_iter().flatten() {
            println!("{key:>26}: {value}");
        }
        Ok(())
    }
}

/// The server (or the nodes of a cluster) under load, and how to read its usage.
struct Target {
    /// Where it listens; subscribers connect to each in turn.
    urls: Vec<String>,
    /// Where publishers connect, in turn.
    publish_urls: Vec<String>,
    pids: Vec<u32>,
    _spawned: Option<Spawned>,
}

impl Target {
    /// The first server's address (pingpong, idle, the stalled reader).
    fn url(&self) -> &str {
        &self.urls[0]
    }

    /// Where publisher `p` connects.
    fn publish_url(&self, p: usize) -> &str {
        &self.publish_urls[p % self.publish_urls.len()]
    }

    /// The servers' usage, summed.
    fn usage(&self) -> Usage {
        self.pids
            .iter()
            .filter_map(|pid| process::usage(*pid).ok())
            .fold(Usage::default(), |sum, usage| Usage {
                rss_bytes: sum.rss_bytes + usage.rss_bytes,
                cpu_s: sum.cpu_s + usage.cpu_s,
            })
    }
}

/// This process's own usage.
fn own_usage() -> Usage {
    process::usage(std::process::id()).unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let spawn = cli.common.server.is_empty();
    if spawn && !cli.common.no_pin {
        // Before the runtime starts its threads, so that they inherit the pinning.
        process::pin_self();
    }
    process::raise_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let json = cli.common.json;
    let report = runtime.block_on(async move {
        let target = match cli.common.server.as_slice() {
            [first, ..] => Target {
                urls: cli.common.server.clone(),
                publish_urls: if cli.common.publish_server.is_empty() {
                    vec![first.clone()]
                } else {
                    cli.common.publish_server.clone()
                },
                pids: cli.common.server_pid.clone(),
                _spawned: None,
            },
            [] => {
                let binary = match &cli.common.server_bin {
                    Some(binary) => binary.clone(),
                    None => process::sibling_server()?,
                };
                let spawned = Spawned::start(binary, !cli.common.no_pin).await?;
                Target {
                    urls: vec![spawned.url.clone()],
                    publish_urls: vec![spawned.url.clone()],
                    pids: vec![spawned.pid()],
                    _spawned: Some(spawned),
                }
            }
        };
        run(&cli.scenario, &cli.common, &target).await
    })?;
    report.print(json)?;
    if report.failed() {
        bail!(
            "{}: {} lost, {} out of order, {} errors",
            report.scenario,
            report.lost,
            report.out_of_order,
            report.errors
        );
    }
    Ok(())
}

async fn run(scenario: &Scenario, common: &Common, target: &Target) -> anyhow::Result<Report> {
    match scenario {
        Scenario::Fanout(fanout) => {
            let plan = Plan::fanout("fanout", fanout);
            let mut report = load(&plan, common, target, false).await?;
            report.scenario = format!("fanout-{}", fanout.subscribers);
            Ok(report)
        }
        Scenario::Rooms {
            rooms,
            per_room,
            rate,
            payload,
            connections,
        } => {
            let plan = Plan {
                rooms: (0..*rooms).map(|i| format!("room-{i}")).collect(),
                per_room: *per_room,
                rate_per_room: *rate,
                payload: *payload,
                connections: *connections,
                publishers: (*rooms).clamp(1, 10),
            };
            let mut report = load(&plan, common, target, false).await?;
            report.scenario = format!("rooms-{rooms}x{per_room}");
            Ok(report)
        }
        Scenario::Pingpong { payload } => pingpong(*payload, common, target).await,
        Scenario::Idle {
            connections,
            without_stream,
        } => idle(*connections, !*without_stream, target).await,
        Scenario::SlowReader(fanout) => {
            let baseline = load(&Plan::fanout("steady", fanout), common, target, false).await?;
            let mut report = load(&Plan::fanout("stalled", fanout), common, target, true).await?;
            report.scenario = format!("slow-reader-{}", fanout.subscribers);
            report.baseline_p99_us = Some(baseline.p99_us);
            let rise =
                (report.p99_us as f64 - baseline.p99_us as f64) / baseline.p99_us.max(1) as f64;
            report.p99_rise_pct = Some((rise * 1000.0).round() / 10.0);
            // Both runs' losses count: the stalled subscriber is not among the counted.
            report.lost += baseline.lost;
            report.out_of_order += baseline.out_of_order;
            report.errors += baseline.errors;
            Ok(report)
        }
    }
}

/// Who publishes where and who listens.
struct Plan {
    rooms: Vec<String>,
    per_room: usize,
    rate_per_room: f64,
    payload: usize,
    connections: usize,
    publishers: usize,
}

impl Plan {
    fn fanout(room: &str, fanout: &Fanout) -> Self {
        Self {
            rooms: vec![room.to_owned()],
            per_room: fanout.subscribers,
            rate_per_room: fanout.rate,
            payload: fanout.payload,
            connections: fanout.connections,
            publishers: 1,
        }
    }
}

/// The measured window, in µs since the epoch of the intended send times.
#[derive(Debug, Clone, Copy)]
struct Window {
    from: u64,
    to: u64,
}

/// What one subscriber saw.
struct Seen {
    latency: Histogram<u64>,
    delivered: u64,
    out_of_order: u64,
    /// The number of the last message received.
    previous: Option<u64>,
}

/// Per room: the number of the last message sent in the window, once publishing is over
/// (0: none was).
type Last = Arc<watch::Sender<Option<u64>>>;

async fn load(
    plan: &Plan,
    common: &Common,
    target: &Target,
    stalled: bool,
) -> anyhow::Result<Report> {
    let subscribers = plan.rooms.len() * plan.per_room;
    // Nicknames unique to this run (and this process: a server, or a cluster, keeps a
    // nickname for a while after its user, so a second run right after must not reuse them).
    let tag = &format!("{}-{:x}", plan.rooms[0], std::process::id());
    let connections: Vec<Connection> =
        open_connections(&target.urls, &format!("{tag}-sub"), plan.connections.max(1)).await?;
    let lasts: Vec<Last> = plan
        .rooms
        .iter()
        .map(|_| Arc::new(watch::channel(None).0))
        .collect();
    // The window is known only once everything is set up; subscribers learn it by watch.
    let (window_tx, window_rx) = watch::channel(None::<Window>);

    let readers = stream::iter(0..subscribers)
        .map(|i| {
            let room_index = i % plan.rooms.len();
            let connection = connections[i % connections.len()].clone();
            let room = plan.rooms[room_index].clone();
            let last = lasts[room_index].subscribe();
            let window = window_rx.clone();
            async move {
                let mut responses = connection
                    .chat(
                        stream::once(async move { wire::join(1, &room) }).chain(stream::pending()),
                    )
                    .await?;
                // The first frame is the reply to the join.
                responses
                    .message()
                    .await?
                    .context("the stream ended before joining")?;
                anyhow::Ok(tokio::spawn(read(responses, window, last)))
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;

    // One subscriber that joins and never reads, on a connection of its own.
    let _stalled = if stalled {
        let connection = Connection::open(target.url(), &format!("{tag}-stalled")).await?;
        let room = plan.rooms[0].clone();
        let responses = connection
            .chat(stream::once(async move { wire::join(1, &room) }).chain(stream::pending()))
            .await?;
        Some((connection, responses))
    } else {
        None
    };

    // Publishers, each with its share of the rooms, on connections of their own.
    let publishers = plan.publishers.clamp(1, plan.rooms.len());
    let mut outlets = Vec::new();
    for p in 0..publishers {
        let rooms: Vec<(String, Last)> = (p..plan.rooms.len())
            .step_by(publishers)
            .map(|i| (plan.rooms[i].clone(), lasts[i].clone()))
            .collect();
        let connection = Connection::open(target.publish_url(p), &format!("{tag}-pub{p}")).await?;
        outlets.push(Publisher::start(connection, rooms).await?);
    }

    let start = Instant::now();
    let start_micros = wire::now_micros();
    let window = Window {
        from: start_micros + micros(common.warmup),
        to: start_micros + micros(common.warmup + common.duration),
    };
    window_tx.send_replace(Some(window));
    let end = start + common.warmup + common.duration;
    let mut sending = Vec::new();
    for outlet in outlets {
        let rate = plan.rate_per_room * outlet.rooms.len() as f64;
        sending.push(tokio::spawn(outlet.run(
            rate,
            plan.payload,
            start,
            start_micros,
            end,
            window,
        )));
    }
    tokio::time::sleep_until(start + common.warmup).await;
    let (before, load_before) = (target.usage(), own_usage());
    tokio::time::sleep_until(end).await;
    let (after, load_after) = (target.usage(), own_usage());

    let mut sent = 0;
    let mut errors = 0;
    let mut expected = 0;
    for publisher in sending {
        let outcome = publisher.await??;
        sent += outcome.sent;
        errors += outcome.errors;
        expected += outcome.in_window * plan.per_room as u64;
    }
    let mut latency = histogram();
    let (mut delivered, mut out_of_order) = (0, 0);
    for reader in readers {
        let seen = reader.await?;
        latency.add(&seen.latency)?;
        delivered += seen.delivered;
        out_of_order += seen.out_of_order;
    }
    Ok(Report {
        scenario: String::new(),
        offered_msgs_per_sec: plan.rate_per_room * plan.rooms.len() as f64,
        subscribers,
        sent,
        expected,
        delivered,
        delivered_per_sec: delivered as f64 / common.duration.as_secs_f64(),
        lost: expected.saturating_sub(delivered),
        out_of_order,
        errors,
        server_rss_bytes: after.rss_bytes,
        server_cpu_s: round2(after.cpu_s - before.cpu_s),
        load_cpu_s: round2(load_after.cpu_s - load_before.cpu_s),
        stalled_rss_growth_bytes: stalled.then(|| after.rss_bytes as i64 - before.rss_bytes as i64),
        ..Report::default()
    }
    .with_latency(&latency))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// A latency histogram: 1 µs to 60 s at 3 significant figures (longer is recorded as 60 s).
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// `count` connections, each logged in as `<prefix><n>`.
/// `count` connections, the n-th to `urls[n % urls.len()]`, in that order.
async fn open_connections(
    urls: &[String],
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<Connection>> {
    stream::iter(0..count)
        .map(|n| async move {
            Connection::open(&urls[n % urls.len()], &format!("{prefix}{n}")).await
        })
        .buffered(SETUP_CONCURRENCY)
        .try_collect()
        .await
}

/// A subscriber's loop: count and time every marked message of the window, until the
/// room's last one arrived (or the drain time is up).
async fn read(
    mut responses: tonic::Streaming<Bytes>,
    mut window: watch::Receiver<Option<Window>>,
    mut last: watch::Receiver<Option<u64>>,
) -> Seen {
    let mut seen = Seen {
        latency: histogram(),
        delivered: 0,
        out_of_order: 0,
        previous: None,
    };
    let window = match window.wait_for(Option::is_some).await {
        Ok(window) => window.expect("waited for it"),
        Err(_) => return seen,
    };
    // While publishing is on: every frame as it comes (no timer per frame).
    let finished = loop {
        tokio::select! {
            biased;
            next = responses.message() => match next {
                Ok(Some(frame)) => seen.frame(&frame, window),
                _ => return seen,
            },
            changed = last.changed() => match (changed, *last.borrow()) {
                (Ok(()), Some(finished)) => break finished,
                (Ok(()), None) => {}
                (Err(_), _) => return seen,
            },
        }
    };
    // Then until the room's last message arrived, or the drain time is up.
    let deadline = Instant::now() + DRAIN;
    while seen.previous.is_none_or(|p| p < finished) && finished > 0 {
        match tokio::time::timeout_at(deadline, responses.message()).await {
            Ok(Ok(Some(frame))) => seen.frame(&frame, window),
            _ => break,
        }
    }
    seen
}

impl Seen {
    /// Counts and times one frame, if it is a marked message.
    fn frame(&mut self, frame: &[u8], window: Window) {
        let Some((intended, number)) = wire::stamp(frame) else {
            return;
        };
        if self.previous.is_some_and(|p| number <= p) {
            self.out_of_order += 1;
        }
        self.previous = Some(number);
        if (window.from..window.to).contains(&intended) {
            self.delivered += 1;
            let latency = wire::now_micros().saturating_sub(intended).max(1);
            self.latency.saturating_record(latency);
        }
    }
}

/// A publishing stream joined to its rooms.
struct Publisher {
    frames: mpsc::Sender<Bytes>,
    rooms: Vec<(String, Last)>,
    replies: tokio::task::JoinHandle<u64>,
}

/// What a publisher did.
struct Published {
    sent: u64,
    in_window: u64,
    errors: u64,
}

impl Publisher {
    async fn start(connection: Connection, rooms: Vec<(String, Last)>) -> anyhow::Result<Self> {
        let (frames, outgoing) = mpsc::channel::<Bytes>(1024);
        let mut responses = connection.chat(ReceiverStream::new(outgoing)).await?;
        for (i, (room, _)) in rooms.iter().enumerate() {
            frames.send(wire::join(i as u64 + 1, room)).await?;
        }
        // Wait for every join's reply before publishing.
        let mut joined = 0;
        while joined < rooms.len() {
            let frame = responses
                .message()
                .await?
                .context("the publisher's stream ended")?;
            match pb::ChatResponse::decode(frame)?.event {
                Some(pb::chat_response::Event::Joined(_)) => joined += 1,
                Some(pb::chat_response::Event::Error(error)) => {
                    bail!("join refused: {}", error.message)
                }
                _ => {}
            }
        }
        // The replies from here on: acks (counted as fine) and errors (counted).
        let replies = tokio::spawn(async move {
            let mut errors = 0;
            while let Ok(Some(frame)) = responses.message().await {
                // Only replies carry a request id; pushed room events do not.
                if let Ok(response) = pb::ChatResponse::decode(frame)
                    && let Some(pb::chat_response::Event::Error(error)) = response.event
                {
                    if errors == 0 {
                        eprintln!("confab-bench: a send was refused: {}", error.message);
                    }
                    errors += 1;
                }
            }
            errors
        });
        Ok(Self {
            frames,
            rooms,
            replies,
        })
    }

    /// Publishes at `rate` messages a second over its rooms, round robin, until `end`.
    async fn run(
        self,
        rate: f64,
        payload: usize,
        start: Instant,
        start_micros: u64,
        end: Instant,
        window: Window,
    ) -> anyhow::Result<Published> {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut sent: u64 = 0;
        let mut in_window: u64 = 0;
        let mut last_in_window = vec![0u64; self.rooms.len()];
        let rooms = self.rooms.len() as u64;
        loop {
            let now = tick.tick().await;
            // Message n is due at `start + n / rate`: by now, all up to floor(elapsed · rate).
            let total = ((end - start).as_secs_f64() * rate) as u64;
            let due = (((now - start).as_secs_f64() * rate) as u64 + 1).min(total);
            while sent < due {
                let n = sent;
                let intended = start_micros + (n as f64 * 1e6 / rate) as u64;
                let room = (n % rooms) as usize;
                // Numbers count from 1 per publisher, so 0 means "nothing sent".
                let number = n + 1;
                if (window.from..window.to).contains(&intended) {
                    in_window += 1;
                    last_in_window[room] = number;
                }
                let frame =
                    wire::message(n + 1_000, &self.rooms[room].0, intended, number, payload);
                self.frames.send(frame).await?;
                sent += 1;
            }
            if now >= end {
                break;
            }
        }
        for ((_, last), number) in self.rooms.iter().zip(last_in_window) {
            last.send_replace(Some(number));
        }
        // Let the acks of the last messages come back, then close the stream.
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(self.frames);
        let errors = tokio::time::timeout(DRAIN, self.replies)
            .await
            .map(|r| r.unwrap_or(0))
            .unwrap_or(0);
        Ok(Published {
            sent,
            in_window,
            errors,
        })
    }
}

/// One message in flight at a time: its round trip is the latency.
async fn pingpong(payload: usize, common: &Common, target: &Target) -> anyhow::Result<Report> {
    let connection =
        Connection::open(target.url(), &format!("pinger-{:x}", std::process::id())).await?;
    let (frames, outgoing) = mpsc::channel::<Bytes>(16);
    let mut responses = connection.chat(ReceiverStream::new(outgoing)).await?;
    frames.send(wire::join(1, "pingpong")).await?;
    responses.message().await?.context("joined")?;
    let mut latency = histogram();
    let start = Instant::now();
    let measure_from = start + common.warmup;
    let end = measure_from + common.duration;
    let mut before = None;
    let mut number = 0u64;
    let mut delivered = 0u64;
    while Instant::now() < end {
        number += 1;
        let sent_at = Instant::now();
        frames
            .send(wire::message(
                number + 1,
                "pingpong",
                wire::now_micros(),
                number,
                payload,
            ))
            .await?;
        loop {
            let frame = responses.message().await?.context("the stream ended")?;
            if wire::stamp(&frame).is_some_and(|(_, n)| n == number) {
                break;
            }
        }
        if sent_at >= measure_from {
            if before.is_none() {
                before = Some((target.usage(), own_usage()));
            }
            latency.saturating_record(micros(sent_at.elapsed()).max(1));
            delivered += 1;
        }
    }
    let (after, load_after) = (target.usage(), own_usage());
    let (before, load_before) = before.unwrap_or((after, load_after));
    Ok(Report {
        scenario: "pingpong".into(),
        subscribers: 1,
        sent: number,
        expected: delivered,
        delivered,
        delivered_per_sec: delivered as f64 / common.duration.as_secs_f64(),
        server_rss_bytes: after.rss_bytes,
        server_cpu_s: round2(after.cpu_s - before.cpu_s),
        load_cpu_s: round2(load_after.cpu_s - load_before.cpu_s),
        ..Report::default()
    }
    .with_latency(&latency))
}

/// `connections` idle connections, each with a Chat stream that answered a ping.
async fn idle(connections: usize, with_stream: bool, target: &Target) -> anyhow::Result<Report> {
    let before = target.usage();
    let open = stream::iter(0..connections)
        .map(|n| {
            let url = target.url().to_owned();
            async move {
                let connection =
                    Connection::open(&url, &format!("idle{n}-{:x}", std::process::id())).await?;
                if !with_stream {
                    return anyhow::Ok((connection, None));
                }
                let ping = wire::frame(1, Command::Ping(pb::Ping::default()));
                let mut responses = connection
                    .chat(stream::once(async move { ping }).chain(stream::pending()))
                    .await?;
                responses.message().await?.context("the pong")?;
                anyhow::Ok((connection, Some(responses)))
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    // Let the server settle (buffers shrink after the handshakes).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = target.usage();
    drop(open);
    let grown = after.rss_bytes.saturating_sub(before.rss_bytes);
    Ok(Report {
        scenario: format!("idle-{connections}"),
        server_rss_bytes: after.rss_bytes,
        server_cpu_s: round2(after.cpu_s - before.cpu_s),
        connections: Some(connections),
        rss_per_connection_bytes: Some(grown / connections.max(1) as u64),
        ..Report::default()
    })
}
