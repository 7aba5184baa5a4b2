//! The server under test: started here (pinned to CPU 0, with no limits that would get in
//! a load test's way) or found at `--server`; and what `/proc` says it costs.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// A server this run started; killed when dropped.
pub struct Spawned {
    child: Child,
    /// Where it listens, `http://…`.
    pub url: String,
}

impl Spawned {
    /// Starts `binary` (in memory, limits off), under `taskset -c 0` when `pin`.
    pub async fn start(binary: PathBuf, pin: bool) -> anyhow::Result<Self> {
        // A free port, picked by the OS; the server binds it a moment later.
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let listen = format!("127.0.0.1:{port}");
        let mut command = if pin {
            let mut command = Command::new("taskset");
            command.args(["-c", "0"]).arg(&binary);
            command
        } else {
            Command::new(&binary)
        };
        command
            .args(["--in-memory", "--listen", &listen])
            .args(["--send-rate", "0", "--room-creation-per-minute", "0"])
            .args([
                "--max-rooms",
                "100000000",
                "--max-connections-per-ip",
                "1000000",
            ])
            .args(["--max-streams-per-user", "1000000"])
            .args(["--max-rooms-per-stream", "100000"])
            .args(["--history-on-join", "0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let spawned = Self {
            child,
            url: format!("http://{listen}"),
        };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(&listen).await.is_ok() {
                return Ok(spawned);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("{} did not start listening on {listen}", binary.display())
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `confab-server` beside this binary (both are built into the same target dir).
pub fn sibling_server() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let server = exe.with_file_name("confab-server");
    if !server.exists() {
        bail!(
            "no confab-server beside {}; build it (`cargo build --release -p confab-server`) or pass --server-bin",
            exe.display()
        );
    }
    Ok(server)
}

/// A process's resident memory and CPU time so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// User + system CPU time, seconds.
    pub cpu_s: f64,
}

/// What `/proc/<pid>` says about `pid` now.
pub fn usage(pid: u32) -> anyhow::Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .context("VmRSS in /proc/<pid>/status")?
        .parse()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; the fields after it are plain.
    let after_name = stat.rsplit_once(')').context("/proc/<pid>/stat")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = if per_second > 0 {
        per_second as f64
    } else {
        100.0
    };
    Ok(Usage {
        rss_bytes: rss_kib * 1024,
        cpu_s: ticks as f64 / per_second,
    })
}

/// Pins this process (and the threads it starts from now on) to CPU 1.
pub fn pin_self() {
    let pid = std::process::id().to_string();
    match Command::new("taskset")
        .args(["-p", "-c", "1", &pid])
        .stdout(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => {}
        _ => eprintln!("confab-bench: could not pin itself to CPU 1 (is taskset installed?)"),
    }
}

/// Raises the open-file limit to its ceiling, for runs with thousands of connections.
pub fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill and setrlimit to read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
