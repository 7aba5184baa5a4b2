//! Where a test server keeps its data, per engine: a temporary SQLite data dir, or a real
//! `redis-server` of the test's own (on a free loopback port, in a temporary dir, AOF on
//! with `appendfsync always`), stopped when the test is done. [`on_every_engine!`] runs a
//! test once per engine.

#![allow(dead_code)] // each test file uses its own part of this

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use confab_server::Config;

/// The engines every guarantee is tested on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// One node, its data in a SQLite file (the default).
    Sqlite,
    /// A cluster node on Redis.
    Redis,
    /// A cluster node on a Redis Cluster of three shards.
    RedisCluster,
}

/// Runs the test `name`, an `async fn name(engine: Engine)`, once per [`Engine`]: as the
/// tests `name::sqlite` and `name::redis`, under the test attribute given (default
/// `tokio::test`).
#[macro_export]
macro_rules! on_every_engine {
    ($name:ident) => {
        $crate::on_every_engine!($name, tokio::test);
    };
    ($name:ident, $($test:tt)+) => {
        mod $name {
            #[$($test)+]
            async fn sqlite() {
                super::$name($crate::common::Engine::Sqlite).await
            }

            #[$($test)+]
            async fn redis() {
                super::$name($crate::common::Engine::Redis).await
            }

            #[$($test)+]
            async fn redis_cluster() {
                super::$name($crate::common::Engine::RedisCluster).await
            }
        }
    };
}

/// Where one server (or the nodes of one cluster) keeps its data; it outlives a restart.
pub enum Storage {
    /// A SQLite data dir.
    Dir(tempfile::TempDir),
    /// A Redis of the test's own.
    Redis(RedisServer),
    /// A Redis Cluster of the test's own: three shards, no replicas.
    RedisCluster(Vec<RedisServer>),
}

impl Storage {
    /// Fresh, empty storage for `engine`.
    pub fn new(engine: Engine) -> Self {
        match engine {
            Engine::Sqlite => Storage::Dir(tempfile::tempdir().expect("temp dir")),
            Engine::Redis => Storage::Redis(RedisServer::start()),
            Engine::RedisCluster => Storage::RedisCluster(RedisServer::cluster(3)),
        }
    }

    /// `config`, storing here.
    pub fn apply(&self, mut config: Config) -> Config {
        config.in_memory = false;
        match self {
            Storage::Dir(dir) => config.data_dir = dir.path().to_owned(),
            Storage::Redis(redis) => {
                config.redis = vec![redis.url()];
                // Nothing is kept locally; a dir of its own keeps nodes from sharing one.
                config.data_dir = redis.dir().join("unused-data-dir");
            }
            Storage::RedisCluster(shards) => {
                config.redis = shards.iter().map(RedisServer::url).collect();
                config.data_dir = shards[0].dir().join("unused-data-dir");
            }
        }
        config
    }

    /// The flags of the `confab-server` binary that store here.
    pub fn args(&self) -> Vec<String> {
        match self {
            Storage::Dir(dir) => vec!["--data-dir".into(), dir.path().display().to_string()],
            Storage::Redis(redis) => vec!["--redis".into(), redis.url()],
            Storage::RedisCluster(shards) => vec![
                "--redis".into(),
                shards
                    .iter()
                    .map(RedisServer::url)
                    .collect::<Vec<_>>()
                    .join(","),
            ],
        }
    }

    /// The Redis, if this is one.
    pub fn redis(&self) -> Option<&RedisServer> {
        match self {
            Storage::Redis(redis) => Some(redis),
            Storage::Dir(_) | Storage::RedisCluster(_) => None,
        }
    }

    /// The Redis, mutably (to kill and restart it).
    pub fn redis_mut(&mut self) -> Option<&mut RedisServer> {
        match self {
            Storage::Redis(redis) => Some(redis),
            Storage::Dir(_) | Storage::RedisCluster(_) => None,
        }
    }
}

/// A real `redis-server` child process on a free loopback port.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    /// Its cluster bus port, if it is a shard of a Redis Cluster. Chosen free like `port`:
    /// Redis would otherwise take `port + 10000`, which nothing has checked is free.
    bus_port: Option<u16>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one and waits until it answers PING. Panics (saying what to install) if
    /// `redis-server` is not on the PATH.
    pub fn start() -> Self {
        Self::start_as(false)
    }

    /// A port found free may be taken by someone else before redis-server binds it; a
    /// server that exits at once is started again on other ports, a few times.
    fn start_as(shard: bool) -> Self {
        const ATTEMPTS: usize = 5;
        let mut exits = Vec::new();
        for _ in 0..ATTEMPTS {
            let ports = free_ports(if shard { 2 } else { 1 });
            let mut redis = Self {
                child: None,
                port: ports[0],
                bus_port: ports.get(1).copied(),
                dir: tempfile::tempdir().expect("temp dir"),
            };
            match redis.spawn() {
                Ok(()) => return redis,
                Err(exit) => exits.push(exit),
            }
        }
        panic!(
            "redis-server exited at start {ATTEMPTS} times:\n{}",
            exits.join("\n")
        );
    }

    /// A Redis Cluster of `shards` masters (no replicas), its slots spread over them by
    /// `redis-cli --cluster create`, once every shard says it is ready.
    pub fn cluster(shards: usize) -> Vec<Self> {
        let servers: Vec<Self> = (0..shards).map(|_| Self::start_as(true)).collect();
        let addresses: Vec<String> = servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let started = Instant::now();
        while !servers
            .iter()
            .all(|s| s.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the Redis Cluster did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        servers
    }

    /// Starts redis-server and waits until it answers. `Err` (saying why, from its
    /// log) if it exited first; panics if it neither answers nor exits within 20 s.
    fn spawn(&mut self) -> Result<(), String> {
        let bus_port = self.bus_port.map(|port| port.to_string());
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--logfile", "redis.log"])
            .args(match &bus_port {
                Some(bus_port) => vec![
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    bus_port,
                ],
                None => vec![],
            })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (install the distribution's package: .ci/run does)");
        let log = self.dir.path().join("redis.log");
        let started = Instant::now();
        while !self.answers_as(child.id()) {
            if let Ok(Some(status)) = child.try_wait() {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "redis-server on port {} exited ({status}); its log:\n{said}",
                    self.port
                ));
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!(
                    "redis-server did not answer on port {}; see {}",
                    self.port,
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        Ok(())
    }

    /// Whether the process `pid` answers on the port, its data loaded. Another test's
    /// redis-server may have taken the port first (ours then exits): its answer does not
    /// count. `INFO` is answered while the AOF loads; `PING` only once it has.
    fn answers_as(&self, pid: u32) -> bool {
        let Ok(mut conn) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
        if conn.write_all(b"INFO server\r\nPING\r\n").is_err() {
            return false;
        }
        // A bulk string: `$LEN\r\n`, then LEN bytes.
        let mut reply = std::io::BufReader::new(conn);
        let mut header = String::new();
        let Some(len) = reply
            .read_line(&mut header)
            .ok()
            .and_then(|_| header.trim_end().strip_prefix('$')?.parse::<usize>().ok())
        else {
            return false;
        };
        // Then `\r\n`, and PING's `+PONG\r\n`.
        let mut info = vec![0; len + 2];
        let mut pong = [0u8; 7];
        reply.read_exact(&mut info).is_ok()
            && String::from_utf8_lossy(&info).contains(&format!("process_id:{pid}\r\n"))
            && reply.read_exact(&mut pong).is_ok()
            && &pong == b"+PONG\r\n"
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its working dir (the AOF is there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills it with SIGKILL: what was acked is what the AOF kept.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and dir.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(exit) = self.spawn() {
            panic!("{exit}");
        }
    }

    /// Runs `redis-cli` with `args` against it and returns what it printed.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// `count` distinct loopback ports that were free a moment ago (all bound at once, so no
/// two are the same).
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("its address").port())
        .collect()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
