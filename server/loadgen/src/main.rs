//! `confab-bench`: Confab's load generator, and its comparison with nats-server.
//!
//! Each run: set up every connection and stream, publish through a warm-up, measure for
//! the duration, stop publishing, wait for the last deliveries (at most 10 s), report (the
//! method is in [`load`]). The server's RSS and CPU time come from `/proc`. With no
//! `--server`, it starts `confab-server` pinned to CPU 0 and pins itself to CPU 1;
//! `compare` starts Confab and then nats-server the same way and runs the same scenario on
//! each, one connection per subscriber unless told otherwise.

mod load;
mod pace;
mod probes;
mod process;
mod report;
mod system;
mod target;
mod wire;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    load::{Plan, load},
    process::{Store, Usage},
    report::{Comparison, Report},
    system::System,
    target::Target,
};

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
    /// The nats-server binary `compare` starts [default: `nats-server` on the PATH].
    #[arg(long, global = true)]
    nats_bin: Option<PathBuf>,
    /// Where a Confab this run starts keeps its data.
    #[arg(long, global = true, value_enum, default_value_t = Store::Sqlite)]
    store: Store,
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
    Rooms(Rooms),
    /// One message in flight: send, wait for it to come back, repeat.
    Pingpong {
        /// Text bytes per message.
        #[arg(long, default_value_t = 100)]
        payload: usize,
    },
    /// Open connections that do nothing, each with a Chat stream: the memory each costs the
    /// server, and its CPU while they stay quiet for --duration.
    Idle(Idle),
    /// Fan-out with one subscriber that never reads, against the same run without it.
    SlowReader(Fanout),
    /// The same scenario against Confab and nats-server, back to back, each started here
    /// and pinned alike: both reports and their ratio. Fan-out by default (`--subscribers`),
    /// rooms with `--rooms`, `compare idle` or `compare pingpong`.
    Compare(Compare),
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
    /// Connections the subscribers share [default: one per subscriber].
    #[arg(long)]
    connections: Option<usize>,
}

#[derive(Debug, Clone, Args)]
struct Rooms {
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
    /// Connections the subscribers share [default: one per subscriber].
    #[arg(long)]
    connections: Option<usize>,
}

#[derive(Debug, Clone, Args)]
struct Idle {
    /// Connections.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Only connect (and log in): no Chat stream or subscription, to tell the costs apart.
    #[arg(long)]
    without_stream: bool,
}

#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
struct Compare {
    #[command(subcommand)]
    probe: Option<CompareProbe>,
    /// Subscribers of the one room (fan-out).
    #[arg(long, default_value_t = 100, conflicts_with = "rooms")]
    subscribers: usize,
    /// Many rooms instead: this many, with --per-room subscribers each.
    #[arg(long)]
    rooms: Option<usize>,
    /// With --rooms: subscribers per room.
    #[arg(long, default_value_t = 10, requires = "rooms")]
    per_room: usize,
    /// Messages per second: from the publisher (fan-out) [default: 100], or into each
    /// room (--rooms) [default: 1]. bench-compare.sh sweeps the rates of BENCHMARKS.md.
    #[arg(long)]
    rate: Option<f64>,
    /// Text bytes per message.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Connections the subscribers share [default: one per subscriber].
    #[arg(long)]
    connections: Option<usize>,
}

#[derive(Debug, Clone, Subcommand)]
enum CompareProbe {
    /// Idle connections on each: memory per connection and CPU while quiet.
    Idle(Idle),
    /// One message in flight on each: the round trip through the server.
    Pingpong {
        /// Text bytes per message.
        #[arg(long, default_value_t = 100)]
        payload: usize,
    },
}

/// This process's own usage.
fn own_usage() -> Usage {
    process::usage(std::process::id()).unwrap_or_default()
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every error in one line, the causes after colons: no backtrace, no "Error:" debug form.
    match bench(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("confab-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the scenario and prints its figures; `false` if it lost or reordered anything.
fn bench(cli: Cli) -> anyhow::Result<bool> {
    let spawn = cli.common.server.is_empty();
    if matches!(cli.scenario, Scenario::Compare(_)) && !spawn {
        anyhow::bail!("compare starts both servers itself: drop --server");
    }
    if spawn && !cli.common.no_pin {
        // Before the runtime starts its threads, so that they inherit the pinning.
        process::pin_self();
    }
    process::raise_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let json = cli.common.json;
    runtime.block_on(async move {
        if let Scenario::Compare(compare) = &cli.scenario {
            let comparison = self::compare(compare, &cli.common).await?;
            comparison.print(json)?;
            if comparison.failed() {
                eprintln!("confab-bench: {}", comparison.confab.failure());
            }
            return Ok(!comparison.failed());
        }
        let target = if spawn {
            Target::spawn(System::Confab, &cli.common).await?
        } else {
            Target::given(&cli.common)
        };
        let report = run(&cli.scenario, &cli.common, &target).await?;
        report.print(json)?;
        if report.failed() {
            eprintln!("confab-bench: {}", report.failure());
        }
        Ok(!report.failed())
    })
}

async fn run(scenario: &Scenario, common: &Common, target: &Target) -> anyhow::Result<Report> {
    match scenario {
        Scenario::Fanout(fanout) => {
            let mut report = load(&Plan::fanout("fanout", fanout), common, target, false).await?;
            report.scenario = format!("fanout-{}", fanout.subscribers);
            Ok(report)
        }
        Scenario::Rooms(rooms) => {
            let mut report = load(&Plan::rooms(rooms), common, target, false).await?;
            report.scenario = format!("rooms-{}x{}", rooms.rooms, rooms.per_room);
            Ok(report)
        }
        Scenario::Pingpong { payload } => probes::pingpong(*payload, common, target).await,
        Scenario::Idle(idle) => {
            probes::idle(idle.connections, !idle.without_stream, common, target).await
        }
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
        Scenario::Compare(_) => unreachable!("compare runs two targets"),
    }
}

/// Runs the compared scenario on Confab, then on nats-server, each started for it.
async fn compare(compare: &Compare, common: &Common) -> anyhow::Result<Comparison> {
    let scenario = match (&compare.probe, compare.rooms) {
        (Some(CompareProbe::Idle(idle)), _) => Scenario::Idle(idle.clone()),
        (Some(CompareProbe::Pingpong { payload }), _) => Scenario::Pingpong { payload: *payload },
        (None, Some(rooms)) => Scenario::Rooms(Rooms {
            rooms,
            per_room: compare.per_room,
            rate: compare.rate.unwrap_or(1.0),
            payload: compare.payload,
            connections: compare.connections,
        }),
        (None, None) => Scenario::Fanout(Fanout {
            subscribers: compare.subscribers,
            rate: compare.rate.unwrap_or(100.0),
            payload: compare.payload,
            connections: compare.connections,
        }),
    };
    let mut reports = Vec::new();
    for system in [System::Confab, System::Nats] {
        let target = Target::spawn(system, common).await?;
        let report = run(&scenario, common, &target)
            .await
            .map_err(|error| error.context(format!("on {system}")))?;
        reports.push(report);
    }
    let nats = reports.pop().expect("two runs");
    let confab = reports.pop().expect("two runs");
    Ok(Comparison { confab, nats })
}

impl Plan {
    fn fanout(room: &str, fanout: &Fanout) -> Self {
        Self {
            rooms: vec![room.to_owned()],
            per_room: fanout.subscribers,
            rate_per_room: fanout.rate,
            payload: fanout.payload,
            connections: fanout.connections.unwrap_or(fanout.subscribers),
            publishers: 1,
        }
    }

    fn rooms(rooms: &Rooms) -> Self {
        Self {
            rooms: (0..rooms.rooms).map(|i| format!("room-{i}")).collect(),
            per_room: rooms.per_room,
            rate_per_room: rooms.rate,
            payload: rooms.payload,
            connections: rooms.connections.unwrap_or(rooms.rooms * rooms.per_room),
            publishers: rooms.rooms.clamp(1, 10),
        }
    }
}
