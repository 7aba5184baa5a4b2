//! A run's figures, and two runs side by side (`compare`).

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::system::System;

/// The figures of a run.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub system: System,
    pub offered_msgs_per_sec: f64,
    pub subscribers: usize,
    pub sent: u64,
    pub expected: u64,
    pub delivered: u64,
    pub delivered_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub lost: u64,
    pub out_of_order: u64,
    pub errors: u64,
    pub server_rss_bytes: u64,
    pub server_cpu_s: f64,
    /// The server's CPU time per delivery in the window, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_delivery: Option<f64>,
    /// This generator's own CPU time in the window: near the window's length, it was
    /// saturated too, and the figures say as much about it as about the server.
    pub load_cpu_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_per_connection_bytes: Option<u64>,
    /// Idle: the server's CPU over the quiet window, percent of one core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_cpu_pct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_p99_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_rise_pct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalled_rss_growth_bytes: Option<i64>,
}

impl Report {
    /// The report with its latency figures taken from `latency`, and the CPU per delivery.
    pub fn with_latency(mut self, latency: &Histogram<u64>) -> Self {
        self.p50_us = latency.value_at_quantile(0.5);
        self.p99_us = latency.value_at_quantile(0.99);
        self.p999_us = latency.value_at_quantile(0.999);
        self.max_us = latency.max();
        if self.delivered > 0 {
            let per = self.server_cpu_s * 1e6 / self.delivered as f64;
            self.server_cpu_us_per_delivery = Some((per * 100.0).round() / 100.0);
        }
        self
    }

    /// Whether the run lost, reordered or had refused anything.
    pub fn failed(&self) -> bool {
        self.lost > 0 || self.out_of_order > 0 || self.errors > 0
    }

    /// What went wrong, in one line.
    pub fn failure(&self) -> String {
        format!(
            "{} on {}: {} lost, {} out of order, {} errors",
            self.scenario, self.system, self.lost, self.out_of_order, self.errors
        )
    }

    pub fn print(&self, json: bool) -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string(self)?);
            return Ok(());
        }
        let value = serde_json::to_value(self)?;
        for (key, value) in value.as_object().into_iter().flatten() {
            println!("{key:>27}: {value}");
        }
        Ok(())
    }
}

/// The same scenario on Confab and on nats-server, run back to back.
#[derive(Debug, Serialize)]
pub struct Comparison {
    pub confab: Report,
    pub nats: Report,
}

/// A row of the side-by-side table: its label and how to read it off a report.
type Row = (&'static str, fn(&Report) -> Option<f64>);

const ROWS: &[Row] = &[
    ("connections", |r| r.connections.map(|c| c as f64)),
    ("delivered/s", |r| {
        (r.delivered > 0).then_some(r.delivered_per_sec)
    }),
    ("p50 (µs)", |r| {
        (r.delivered > 0).then_some(r.p50_us as f64)
    }),
    ("p99 (µs)", |r| {
        (r.delivered > 0).then_some(r.p99_us as f64)
    }),
    ("p99.9 (µs)", |r| {
        (r.delivered > 0).then_some(r.p999_us as f64)
    }),
    ("max (µs)", |r| {
        (r.delivered > 0).then_some(r.max_us as f64)
    }),
    ("lost", |r| (r.expected > 0).then_some(r.lost as f64)),
    ("server CPU (s)", |r| Some(r.server_cpu_s)),
    ("server CPU per delivery (µs)", |r| {
        r.server_cpu_us_per_delivery
    }),
    ("idle server CPU (% of a core)", |r| r.idle_cpu_pct),
    ("server RSS (MiB)", |r| {
        Some(r.server_rss_bytes as f64 / (1 << 20) as f64)
    }),
    ("RSS per connection (KiB)", |r| {
        r.rss_per_connection_bytes.map(|b| b as f64 / 1024.0)
    }),
    ("generator CPU (s)", |r| Some(r.load_cpu_s)),
];

impl Comparison {
    /// Whether Confab's run lost, reordered or had anything refused. nats-server's losses
    /// are a finding of the comparison (it drops what a slow consumer cannot take), not a
    /// failure of the run.
    pub fn failed(&self) -> bool {
        self.confab.failed()
    }

    pub fn print(&self, json: bool) -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string(self)?);
            return Ok(());
        }
        // Idle and pingpong have no publishing schedule to tell.
        if self.confab.offered_msgs_per_sec > 0.0 {
            println!(
                "{}: {} msg/s offered, {} subscribers",
                self.confab.scenario, self.confab.offered_msgs_per_sec, self.confab.subscribers
            );
        } else {
            println!("{}", self.confab.scenario);
        }
        println!(
            "{:<30} {:>14} {:>14} {:>12}",
            "", "confab", "nats-server", "confab/nats"
        );
        for (label, read) in ROWS {
            let (Some(confab), Some(nats)) = (read(&self.confab), read(&self.nats)) else {
                continue;
            };
            let ratio = if nats != 0.0 {
                format!("{:.2}", confab / nats)
            } else if confab == 0.0 {
                "=".to_owned()
            } else {
                "-".to_owned()
            };
            println!(
                "{label:<30} {:>14} {:>14} {ratio:>12}",
                figure(confab),
                figure(nats)
            );
        }
        Ok(())
    }
}

/// A figure as the table shows it: whole numbers without decimals.
fn figure(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}
