//! The scenarios without a publishing schedule: `pingpong` (one message in flight) and
//! `idle` (open connections that do nothing).

use std::time::Duration;

use anyhow::bail;
use futures::{StreamExt as _, TryStreamExt as _, stream};
use tokio::time::Instant;

use crate::{
    Common, Report,
    load::{SETUP_CONCURRENCY, histogram, micros},
    own_usage, round2,
    system::{Echo, Link},
    target::Target,
};

/// How long the server is left to settle after the idle connections are open (buffers
/// shrink after the handshakes) before its memory is read.
const SETTLE: Duration = Duration::from_secs(2);

/// One message in flight at a time: its round trip through the server is the latency
/// ([`Echo`]: on Confab a joined `Chat` stream that gets its own messages back, on NATS a
/// client subscribed to its own subject).
pub async fn pingpong(payload: usize, common: &Common, target: &Target) -> anyhow::Result<Report> {
    let name = format!("pinger-{:x}", std::process::id());
    let mut echo = Echo::open(target.system, target.url(), &name, "pingpong").await?;
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
        echo.send(number, payload).await?;
        echo.back(number).await?;
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
        system: target.system,
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

/// `connections` idle connections, each (unless `!with_stream`) holding what an idle user
/// holds ([`Link::idle_stream`]): the memory each costs the server once settled, and the
/// server's CPU while they stay quiet for `--duration` (keepalive pings, timers).
pub async fn idle(
    connections: usize,
    with_stream: bool,
    common: &Common,
    target: &Target,
) -> anyhow::Result<Report> {
    let before = target.usage();
    let system = target.system;
    let tag = &format!("idle-{:x}", std::process::id());
    let open = stream::iter(0..connections)
        .map(|n| async move {
            let link = Link::open(system, target.url(), &format!("{tag}-{n}")).await?;
            let feed = match with_stream {
                true => Some(link.idle_stream(n).await?),
                false => None,
            };
            anyhow::Ok((link, feed))
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    tokio::time::sleep(SETTLE).await;
    // Counted before the quiet window starts, so that the count's time is not in it.
    all_held(target, connections, "once they were all open")?;
    let (settled, load_settled) = (target.usage(), own_usage());
    tokio::time::sleep(common.duration).await;
    let (after, load_after) = (target.usage(), own_usage());
    all_held(target, connections, "after the quiet window")?;
    drop(open);
    let grown = settled.rss_bytes.saturating_sub(before.rss_bytes);
    let cpu_s = after.cpu_s - settled.cpu_s;
    Ok(Report {
        scenario: format!("idle-{connections}"),
        system,
        server_rss_bytes: settled.rss_bytes,
        server_cpu_s: round2(cpu_s),
        load_cpu_s: round2(load_after.cpu_s - load_settled.cpu_s),
        connections: Some(connections),
        rss_per_connection_bytes: Some(grown / connections.max(1) as u64),
        idle_cpu_pct: Some(round2(cpu_s * 100.0 / common.duration.as_secs_f64())),
        ..Report::default()
    })
}

/// Fails unless the server still holds all `connections` idle connections. Memory per
/// connection is only worth reading if none were lost: a server that closed some (keepalive
/// pings answered too late by a loaded client, say) would look cheaper than it is.
fn all_held(target: &Target, connections: usize, when: &str) -> anyhow::Result<()> {
    if let Some(held) = target.connections_held()?
        && held < connections
    {
        bail!(
            "idle on {}: the server holds {held} of the {connections} connections {when}; \
             the others were closed",
            target.system
        );
    }
    Ok(())
}
