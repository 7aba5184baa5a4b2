//! [`Config`]: every setting of the server, from flags or environment variables.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The Confab chat server.
#[derive(Debug, Clone, Parser)]
#[command(name = "confab-server", version, about)]
pub struct Config {
    /// Address to listen on (`127.0.0.1:0` picks a free port; the log says which).
    #[arg(long, env = "CONFAB_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Directory of the SQLite store (created if missing). One server per directory.
    #[arg(long, env = "CONFAB_DATA_DIR", default_value = "confab-data")]
    pub data_dir: PathBuf,

    /// Keep everything in memory instead (a throwaway server: nothing survives it).
    #[arg(long, env = "CONFAB_IN_MEMORY")]
    pub in_memory: bool,

    /// Run as a node of a cluster on this Redis (`redis://HOST:PORT[/DB]`) instead of on
    /// local storage: every node on one Redis serves the same rooms, seqs and members. For
    /// a Redis Cluster, name its seed nodes (repeat the flag, or separate them with commas;
    /// or write one `redis+cluster://HOST:PORT`).
    #[arg(
        long,
        env = "CONFAB_REDIS_URL",
        value_delimiter = ',',
        conflicts_with = "in_memory"
    )]
    pub redis: Vec<String>,

    /// This node's name in the cluster (logs, metrics, presence). Default: a random one.
    #[arg(long, env = "CONFAB_NODE_ID")]
    pub node_id: Option<String>,

    /// Keep at most this many newest messages per room (default: all).
    #[arg(long, env = "CONFAB_RETENTION_MESSAGES")]
    pub retention_messages: Option<u64>,

    /// Remove messages older than this, e.g. `30d` (default: keep them).
    #[arg(long, env = "CONFAB_RETENTION_AGE", value_parser = humantime::parse_duration)]
    pub retention_age: Option<Duration>,

    /// How often retention runs, when a limit is set.
    #[arg(long, env = "CONFAB_RETENTION_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub retention_interval: Duration,

    /// End a stream whose client has read nothing for this long with RESOURCE_EXHAUSTED
    /// (it can resume from its last seq).
    #[arg(long, env = "CONFAB_STALL_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,

    /// TLS: the server's certificate chain (PEM). With --tls-key, the server speaks only TLS.
    #[arg(long, env = "CONFAB_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS: the server's private key (PEM).
    #[arg(long, env = "CONFAB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: accept only clients whose certificate this CA (PEM) signed.
    #[arg(long, env = "CONFAB_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Largest gRPC message the server accepts, in bytes; bigger frames are refused.
    #[arg(long, env = "CONFAB_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Longest message text, in bytes of UTF-8.
    #[arg(long, env = "CONFAB_MAX_TEXT_BYTES", default_value_t = 4096)]
    pub max_text_bytes: usize,

    /// Messages replayed to a client that joins a room without resuming from a seq.
    #[arg(long, env = "CONFAB_HISTORY_ON_JOIN", default_value_t = 50)]
    pub history_on_join: u64,

    /// Events each room's fan-out ring holds; readers further behind catch up from storage.
    #[arg(long, env = "CONFAB_RING_CAPACITY", default_value_t = 1024)]
    pub ring_capacity: usize,

    /// How long a retried client_msg_id is recognised and acked with its original seq.
    #[arg(long, env = "CONFAB_DEDUPE_WINDOW", default_value = "10m", value_parser = humantime::parse_duration)]
    pub dedupe_window: Duration,

    /// The secret session tokens are signed with (at least 32 characters). Unset: one is
    /// made once and kept in `<data-dir>/token-secret` (mode 0600); with --redis, in Redis,
    /// made by the first node and shared by all; with --in-memory, a fresh one per process.
    #[arg(long, env = "CONFAB_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,

    /// Take HS256 tokens from an identity provider, signed with this secret, instead of
    /// session tokens from Login; the user is the token's `sub`.
    #[arg(
        long,
        env = "CONFAB_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "jwt_public_key"
    )]
    pub jwt_secret: Option<String>,

    /// Take RS256 or ES256 tokens from an identity provider, checked with this public key
    /// (PEM), instead of session tokens from Login.
    #[arg(long, env = "CONFAB_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// With JWTs: require this `iss`.
    #[arg(long, env = "CONFAB_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// With JWTs: require this `aud`.
    #[arg(long, env = "CONFAB_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// How long a session token is accepted.
    #[arg(long, env = "CONFAB_TOKEN_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub token_ttl: Duration,

    /// How long a nickname stays reserved for its session after its last stream or call.
    #[arg(long, env = "CONFAB_NICKNAME_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub nickname_lease: Duration,

    /// HTTP/2 keepalive: a connection that has sent nothing for this long is pinged, and a
    /// silently dead network is noticed within interval + timeout (80 s by default). A
    /// client whose process ends closes its socket and is seen at once; pings only find
    /// networks that vanish without a word, and every ping costs the server CPU (10,000
    /// quiet users at 2 s cost 10 % of a core, at 60 s 0.6 %: see BENCHMARKS.md).
    #[arg(long, env = "CONFAB_KEEPALIVE_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "CONFAB_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// On shutdown, how long to wait for streams to end before closing connections.
    #[arg(long, env = "CONFAB_SHUTDOWN_GRACE", default_value = "3s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Serve Prometheus metrics at `http://ADDR/metrics` (off unless set).
    #[arg(long, env = "CONFAB_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Flood control.
    #[command(flatten)]
    pub limits: crate::limits::LimitConfig,

    /// Log format (the level comes from RUST_LOG, default `info`).
    #[arg(long, env = "CONFAB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Config {
    /// What retention the flags ask for.
    pub fn retention(&self) -> crate::store::Retention {
        crate::store::Retention {
            max_messages: self.retention_messages,
            max_age: self.retention_age,
        }
    }
}

impl Default for Config {
    /// The defaults of every flag.
    fn default() -> Self {
        Self::parse_from(["confab-server"])
    }
}
