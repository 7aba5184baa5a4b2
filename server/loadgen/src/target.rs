//! The server (or the nodes of a cluster) under load: where it listens, and what it costs.

use crate::{
    Common,
    process::{self, Spawned, Usage},
    system::System,
};

/// The server (or the nodes of a cluster) under load, and how to read its usage.
pub struct Target {
    pub system: System,
    /// Where it listens; subscribers connect to each in turn.
    pub urls: Vec<String>,
    /// Where publishers connect, in turn.
    pub publish_urls: Vec<String>,
    pids: Vec<u32>,
    _spawned: Option<Spawned>,
}

impl Target {
    /// The running Confab server (or cluster) named by `--server`.
    pub fn given(common: &Common) -> Self {
        Self {
            system: System::Confab,
            urls: common.server.clone(),
            publish_urls: if common.publish_server.is_empty() {
                common.server[..1].to_vec()
            } else {
                common.publish_server.clone()
            },
            pids: common.server_pid.clone(),
            _spawned: None,
        }
    }

    /// Starts `system` for this run (pinned to CPU 0 unless `--no-pin`); stopped when dropped.
    pub async fn spawn(system: System, common: &Common) -> anyhow::Result<Self> {
        let pin = !common.no_pin;
        let spawned = match system {
            System::Confab => {
                let binary = match &common.server_bin {
                    Some(binary) => binary.clone(),
                    None => process::sibling_server()?,
                };
                Spawned::confab(&binary, common.store, pin).await?
            }
            System::Nats => {
                let binary = match &common.nats_bin {
                    Some(binary) => binary.clone(),
                    None => process::nats_server()?,
                };
                Spawned::nats(&binary, pin).await?
            }
        };
        Ok(Self {
            system,
            urls: vec![spawned.url.clone()],
            publish_urls: vec![spawned.url.clone()],
            pids: vec![spawned.pid()],
            _spawned: Some(spawned),
        })
    }

    /// The first server's address (pingpong, idle, the stalled reader).
    pub fn url(&self) -> &str {
        &self.urls[0]
    }

    /// Where publisher `p` connects.
    pub fn publish_url(&self, p: usize) -> &str {
        &self.publish_urls[p % self.publish_urls.len()]
    }

    /// How many connections the first server holds open now, if its process id is known
    /// (always for a server this run started) and its address has a port.
    pub fn connections_held(&self) -> anyhow::Result<Option<usize>> {
        let port = self
            .url()
            .trim_end_matches('/')
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok());
        match (self.pids.first(), port) {
            (Some(&pid), Some(port)) => process::established(pid, port).map(Some),
            _ => Ok(None),
        }
    }

    /// The servers' usage, summed.
    pub fn usage(&self) -> Usage {
        self.pids
            .iter()
            .filter_map(|pid| process::usage(*pid).ok())
            .fold(Usage::default(), |sum, usage| Usage {
                rss_bytes: sum.rss_bytes + usage.rss_bytes,
                cpu_s: sum.cpu_s + usage.cpu_s,
            })
    }
}
