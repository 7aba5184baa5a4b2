//! Fan-out under an open-loop load: the machinery of `fanout`, `rooms`, `slow-reader` and
//! `compare`, the same for every [`System`](crate::system::System).
//!
//! Publishers are open-loop: message n of a publisher is due at `start + n / rate` and
//! carries that intended time, so a server that falls behind shows as latency instead of
//! quietly lowering the offered load. Every subscriber records the latency of every
//! delivery (now − intended) in an HDR histogram and counts what it got; the run fails if
//! anything sent in the measured window did not arrive (or arrived twice, or out of order).

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _, stream};
use hdrhistogram::Histogram;
use tokio::{sync::watch, time::Instant};

use crate::{
    Common, Report,
    pace::Pacer,
    system::{Feed, Link, Outlet, System},
    target::Target,
    wire,
};

/// How long the last deliveries may take after publishing stops, before they count as lost.
pub const DRAIN: Duration = Duration::from_secs(10);
/// Streams and connections set up at once.
pub const SETUP_CONCURRENCY: usize = 64;

/// Who publishes where and who listens.
pub struct Plan {
    pub rooms: Vec<String>,
    pub per_room: usize,
    pub rate_per_room: f64,
    pub payload: usize,
    /// Connections the subscribers share (one each when it equals their number).
    pub connections: usize,
    pub publishers: usize,
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

/// Runs `plan` against `target`; with `stalled`, one more subscriber joins the first room
/// and never reads.
pub async fn load(
    plan: &Plan,
    common: &Common,
    target: &Target,
    stalled: bool,
) -> anyhow::Result<Report> {
    let subscribers = plan.rooms.len() * plan.per_room;
    // Names unique to this run (and this process: a server, or a cluster, keeps a
    // nickname for a while after its user, so a second run right after must not reuse them).
    let tag = &format!("{}-{:x}", plan.rooms[0], std::process::id());
    let links = open_links(
        target.system,
        &target.urls,
        &format!("{tag}-sub"),
        plan.connections.clamp(1, subscribers.max(1)),
    )
    .await?;
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
            let link = links[i % links.len()].clone();
            let room = plan.rooms[room_index].clone();
            let last = lasts[room_index].subscribe();
            let window = window_rx.clone();
            async move {
                let feed = link.subscribe(&room).await?;
                anyhow::Ok(tokio::spawn(read(feed, window, last)))
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;

    // One subscriber that joins and never reads, on a connection of its own.
    let _stalled = if stalled {
        let link = Link::open(target.system, target.url(), &format!("{tag}-stalled")).await?;
        let feed = link.subscribe(&plan.rooms[0]).await?;
        Some((link, feed))
    } else {
        None
    };

    // Publishers, each with its share of the rooms, on connections of their own.
    let publishers = plan.publishers.clamp(1, plan.rooms.len());
    let mut outlets = Vec::new();
    for p in 0..publishers {
        let rooms: Vec<usize> = (p..plan.rooms.len()).step_by(publishers).collect();
        let names: Vec<String> = rooms.iter().map(|&i| plan.rooms[i].clone()).collect();
        let link = Link::open(
            target.system,
            target.publish_url(p),
            &format!("{tag}-pub{p}"),
        )
        .await?;
        let outlet = link.publisher(&names).await?;
        let lasts: Vec<Last> = rooms.iter().map(|&i| lasts[i].clone()).collect();
        outlets.push((link, outlet, lasts));
    }

    let start = Instant::now();
    let start_micros = wire::now_micros();
    let window = Window {
        from: start_micros + micros(common.warmup),
        to: start_micros + micros(common.warmup + common.duration),
    };
    window_tx.send_replace(Some(window));
    let clock = Clock {
        start,
        start_micros,
        end: start + common.warmup + common.duration,
        window,
    };
    let payload = plan.payload;
    let mut sending = Vec::new();
    for (link, outlet, lasts) in outlets {
        let rate = plan.rate_per_room * lasts.len() as f64;
        sending.push(tokio::spawn(async move {
            let published = publish(&outlet, &lasts, rate, payload, clock).await;
            let errors = outlet.finish().await;
            drop(link);
            published.map(|published| Published {
                errors: published.errors + errors,
                ..published
            })
        }));
    }
    tokio::time::sleep_until(start + common.warmup).await;
    let (before, load_before) = (target.usage(), crate::own_usage());
    tokio::time::sleep_until(clock.end).await;
    let (after, load_after) = (target.usage(), crate::own_usage());

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
        system: target.system,
        offered_msgs_per_sec: plan.rate_per_room * plan.rooms.len() as f64,
        subscribers,
        connections: Some(links.len()),
        sent,
        expected,
        delivered,
        delivered_per_sec: delivered as f64 / common.duration.as_secs_f64(),
        lost: expected.saturating_sub(delivered),
        out_of_order,
        errors,
        server_rss_bytes: after.rss_bytes,
        server_cpu_s: crate::round2(after.cpu_s - before.cpu_s),
        load_cpu_s: crate::round2(load_after.cpu_s - load_before.cpu_s),
        stalled_rss_growth_bytes: stalled.then(|| after.rss_bytes as i64 - before.rss_bytes as i64),
        ..Report::default()
    }
    .with_latency(&latency))
}

/// A latency histogram: 1 µs to 60 s at 3 significant figures (longer is recorded as 60 s).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

pub fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// `count` links, the n-th to `urls[n % urls.len()]`, named `<prefix><n>`, in that order.
pub async fn open_links(
    system: System,
    urls: &[String],
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<Link>> {
    stream::iter(0..count)
        .map(|n| async move {
            Link::open(system, &urls[n % urls.len()], &format!("{prefix}{n}")).await
        })
        .buffered(SETUP_CONCURRENCY)
        .try_collect()
        .await
}

/// A subscriber's loop: count and time every marked message of the window, until the
/// room's last one arrived (or the drain time is up).
async fn read(
    mut feed: Feed,
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
            next = feed.next() => match next {
                Some(frame) => seen.frame(&frame, window),
                None => return seen,
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
        match tokio::time::timeout_at(deadline, feed.next()).await {
            Ok(Some(frame)) => seen.frame(&frame, window),
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

/// The run's schedule, shared by its publishers.
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    /// `start` in µs since the epoch.
    start_micros: u64,
    end: Instant,
    window: Window,
}

/// What a publisher did.
struct Published {
    sent: u64,
    in_window: u64,
    errors: u64,
}

/// Wakes of a publisher come at least this far apart: above 1,000 msg/s, each wake sends
/// every message then due, as one burst.
const MIN_STEP: Duration = Duration::from_millis(1);

/// Publishes at `rate` messages a second over the outlet's rooms, round robin, until the
/// clock's end; then tells each room's readers the number of its last message in the window.
/// Each message is sent at its intended time (or in the first burst after it, above
/// [`MIN_STEP`]'s rate), to the microsecond: see [`Pacer`].
async fn publish(
    outlet: &Outlet,
    lasts: &[Last],
    rate: f64,
    payload: usize,
    clock: Clock,
) -> anyhow::Result<Published> {
    let mut pacer = Pacer::new().context("a timer for the publisher")?;
    let mut sent: u64 = 0;
    let mut in_window: u64 = 0;
    let mut last_in_window = vec![0u64; lasts.len()];
    let rooms = lasts.len() as u64;
    let total = ((clock.end - clock.start).as_secs_f64() * rate) as u64;
    // Message n is due at `start + n / rate`, to the µs its marker carries.
    let offset = |n: u64| (n as f64 * 1e6 / rate) as u64;
    let due_at = |n: u64| clock.start + Duration::from_micros(offset(n));
    let mut woke: Option<Instant> = None;
    while sent < total {
        let next = due_at(sent);
        let wake = woke.map_or(next, |woke| next.max(woke + MIN_STEP));
        pacer.until(wake).await?;
        woke = Some(wake);
        let now = Instant::now().max(wake);
        while sent < total && due_at(sent) <= now {
            let n = sent;
            let intended = clock.start_micros + offset(n);
            let room = (n % rooms) as usize;
            // Numbers count from 1 per publisher, so 0 means "nothing sent".
            let number = n + 1;
            if (clock.window.from..clock.window.to).contains(&intended) {
                in_window += 1;
                last_in_window[room] = number;
            }
            outlet.send(room, intended, number, payload).await?;
            sent += 1;
        }
    }
    tokio::time::sleep_until(clock.end).await;
    for (last, number) in lasts.iter().zip(last_in_window) {
        last.send_replace(Some(number));
    }
    Ok(Published {
        sent,
        in_window,
        errors: 0,
    })
}
