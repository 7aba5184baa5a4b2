//! [`ServerProcess`]: the real `confab-server` binary as a child process. Only the server
//! package's tests include this file (`#[path = "common/process.rs"] mod process;`): the
//! binary is theirs.

#![allow(dead_code)] // each test file uses its own part of this

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::common::{Storage, within};

/// A started `confab-server` process.
pub struct ServerProcess {
    child: Child,
    /// Where it listens, `http://…`.
    pub url: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its metrics are served.
    pub metrics_addr: SocketAddr,
}

impl ServerProcess {
    /// Starts the binary on `data_dir` and `listen` (`127.0.0.1:0` for any free port) and
    /// waits for the line that says where it listens.
    pub fn start(data_dir: &Path, listen: &str) -> Self {
        Self::with_args(
            &["--data-dir".into(), data_dir.display().to_string()],
            listen,
        )
    }

    /// Starts the binary storing in `storage` (a data dir, or a Redis) on `listen`.
    pub fn start_on(storage: &Storage, listen: &str) -> Self {
        Self::with_args(&storage.args(), listen)
    }

    /// Starts the binary as cluster node `node` on `storage` (a Redis), on any free port.
    pub fn start_node(storage: &Storage, node: &str) -> Self {
        let mut args = storage.args();
        args.extend(["--node-id".to_owned(), node.to_owned()]);
        Self::with_args(&args, "127.0.0.1:0")
    }

    fn with_args(storage: &[String], listen: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_confab-server"))
            .args(["--listen", listen])
            .args(storage)
            // The tests flood on purpose; flood control has tests of its own.
            .args(["--send-rate", "0", "--max-streams-per-user", "1000"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start confab-server");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let (mut addr, mut metrics_addr) = (None, None);
        while addr.is_none() || metrics_addr.is_none() {
            let line = lines
                .next()
                .expect("confab-server exited before listening")
                .expect("read log");
            let after = |marker: &str| {
                line.split(marker)
                    .nth(1)
                    .and_then(|rest| rest.split(['/', ' ']).next())
                    .map(str::to_owned)
            };
            addr = addr.or(after("listening on "));
            metrics_addr = metrics_addr.or(after("metrics at http://"));
        }
        let addr = addr.expect("address");
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self {
            child,
            url: format!("http://{addr}"),
            addr: addr.parse().expect("a socket address"),
            metrics_addr: metrics_addr
                .expect("metrics address")
                .parse()
                .expect("a socket address"),
        }
    }

    /// Kills the process outright (SIGKILL: no drain, no flush) and waits for it.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill confab-server");
        self.child.wait().expect("wait for confab-server");
    }

    /// Sends `signal` (`TERM`, `INT`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for the process to exit (polling with a deadline) and returns its status.
    pub async fn exit_status(&mut self) -> std::process::ExitStatus {
        within("confab-server to exit", async {
            loop {
                if let Some(status) = self.child.try_wait().expect("wait") {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
