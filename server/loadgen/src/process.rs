//! The servers under test: started here (pinned to CPU 0; Confab with no limits that would
//! get in a load test's way) or found at `--server`; and what `/proc` says they cost.

use std::{
    ffi::OsString,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// A server this run started; killed when dropped (its data dir with it).
pub struct Spawned {
    child: Child,
    /// Where it listens, `http://…` or `nats://…`.
    pub url: String,
    _data: Option<tempfile::TempDir>,
}

/// Where a started Confab keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Store {
    /// The default engine: SQLite in a fresh temporary data dir.
    Sqlite,
    /// `--in-memory`.
    Memory,
}

impl Spawned {
    /// Starts `confab-server` from `binary` (limits off) on `store`.
    pub async fn confab(binary: &Path, store: Store, pin: bool) -> anyhow::Result<Self> {
        let listen = free_address()?;
        let mut args: Vec<OsString> = vec!["--listen".into(), listen.clone().into()];
        let data = match store {
            Store::Memory => {
                args.push("--in-memory".into());
                None
            }
            Store::Sqlite => {
                let dir = tempfile::tempdir()?;
                args.extend(["--data-dir".into(), dir.path().into()]);
                Some(dir)
            }
        };
        args.extend(
            [
                "--send-rate",
                "0",
                "--room-creation-per-minute",
                "0",
                "--max-rooms",
                "100000000",
                "--max-connections-per-ip",
                "1000000",
                "--max-streams-per-user",
                "1000000",
                "--max-rooms-per-stream",
                "100000",
                "--history-on-join",
                "0",
            ]
            .map(OsString::from),
        );
        // Its warnings (a stalled reader ended, say) belong in the run's output.
        let mut spawned =
            Self::start(binary, &args, &listen, "http", pin, Stdio::inherit()).await?;
        spawned._data = data;
        Ok(spawned)
    }

    /// Starts nats-server (`binary`, the distribution's package) with its defaults.
    pub async fn nats(binary: &Path, pin: bool) -> anyhow::Result<Self> {
        let listen = free_address()?;
        let (host, port) = listen.split_once(':').expect("host:port");
        let args = ["-a", host, "-p", port].map(OsString::from);
        // Its banner does not.
        Self::start(binary, &args, &listen, "nats", pin, Stdio::null()).await
    }

    /// Starts `binary args…`, under `taskset -c 0` when `pin`, and waits until it listens.
    async fn start(
        binary: &Path,
        args: &[OsString],
        listen: &str,
        scheme: &str,
        pin: bool,
        stderr: Stdio,
    ) -> anyhow::Result<Self> {
        let mut command = if pin {
            let mut command = Command::new("taskset");
            command.args(["-c", "0"]).arg(binary);
            command
        } else {
            Command::new(binary)
        };
        command
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let spawned = Self {
            child,
            url: format!("{scheme}://{listen}"),
            _data: None,
        };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(listen).await.is_ok() {
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

/// A free loopback address, picked by the OS; the server binds it a moment later.
fn free_address() -> anyhow::Result<String> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    Ok(format!("127.0.0.1:{port}"))
}

/// `nats-server` on the PATH (Debian's package installs it in /usr/bin).
pub fn nats_server() -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .context("nats-server is not installed (apt-get install nats-server), or pass --nats-bin")
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

/// How many TCP connections `pid` holds open on its listening `port`: the ESTABLISHED rows
/// of `/proc/<pid>/net/tcp` and `tcp6` (its own network namespace) with that local port.
pub fn established(pid: u32, port: u16) -> anyhow::Result<usize> {
    let mut count = 0;
    for table in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{table}");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            // A kernel without IPv6 has no tcp6.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error).with_context(|| format!("cannot read {path}")),
        };
        // `sl local_address rem_address st …`, addresses as `HEXADDR:HEXPORT`; 01 is ESTABLISHED.
        count += text
            .lines()
            .skip(1)
            .filter(|row| {
                let mut fields = row.split_whitespace().skip(1);
                let local_port = fields
                    .next()
                    .and_then(|local| local.rsplit_once(':'))
                    .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok());
                let state = fields.nth(1);
                local_port == Some(port) && state == Some("01")
            })
            .count();
    }
    Ok(count)
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

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn it_counts_the_connections_a_process_holds_on_its_port() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let pid = std::process::id();
        assert_eq!(established(pid, port).unwrap(), 0);
        // This process holds both ends; only the accepted ends have the listening port.
        let clients: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let mut accepted: Vec<TcpStream> = (0..3).map(|_| listener.accept().unwrap().0).collect();
        assert_eq!(established(pid, port).unwrap(), 3);
        // A connection this side closed is no longer held.
        drop(accepted.pop());
        assert_eq!(established(pid, port).unwrap(), 2);
        drop(clients);
    }
}
