//! A newcomer's first minute with the real `confab` binary: a refused nickname is said
//! once and can be fixed in place, a bare `host:port` works, a server that is not there
//! ends a script instead of hanging it, and people chat under their own names.

mod common;
#[path = "common/tmux.rs"]
mod tmux;

use std::process::{Output, Stdio};

use common::{TestServer, within};
use serde_json::Value;
use tmux::Tmux;

const CONFAB: &str = env!("CARGO_BIN_EXE_confab");

/// Runs `confab ARGS` with `stdin` as its input and returns what it did; it must end by
/// itself within the test deadline.
async fn confab(args: &[&str], stdin: &str) -> Output {
    let mut command = tokio::process::Command::new(CONFAB);
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("start confab");
    let mut input = child.stdin.take().expect("stdin");
    tokio::io::AsyncWriteExt::write_all(&mut input, stdin.as_bytes())
        .await
        .expect("write stdin");
    drop(input);
    within(
        &format!("confab {args:?} to exit"),
        child.wait_with_output(),
    )
    .await
    .expect("wait for confab")
}

/// Its stderr, which must be one line.
fn one_line(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    stderr.trim_end().to_owned()
}

/// The JSON lines it printed of `kind`.
fn lines_of(output: &Output, kind: &str) -> Vec<Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("every line is JSON"))
        .filter(|v| v["kind"] == kind)
        .collect()
}

/// A `confab --pipe --follow` holding `nick` in room `room` until the test ends, once it
/// has joined.
async fn holder(url: &str, nick: &str, room: &str) -> tokio::process::Child {
    let mut child = tokio::process::Command::new(CONFAB)
        .args(["--pipe", "--follow", "--server", url, "--nick", nick])
        .args(["--room", room])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the holder");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    within("the holder to join", async {
        while let Some(line) = lines.next_line().await.expect("read") {
            if line.contains(r#""kind":"joined""#) {
                break;
            }
        }
    })
    .await;
    // Keep reading, so the holder never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipe_mode_exits_at_once_when_the_nickname_is_invalid() {
    let server = TestServer::start().await;
    let args = ["--pipe", "--server", &server.url(), "--nick", "two words"];
    let output = confab(&args, "").await;
    assert!(!output.status.success());
    let line = one_line(&output);
    assert!(
        line.starts_with("confab: login as \"two words\" failed:")
            && line.contains("one word, without spaces"),
        "{line}"
    );
    assert_eq!(lines_of(&output, "refused").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipe_mode_exits_at_once_when_the_nickname_is_taken() {
    let server = TestServer::start().await;
    let url = server.url();
    let _sam = holder(&url, "sam", "lobby").await;
    let output = confab(&["--pipe", "--server", &url, "--nick", "sam"], "hi\n").await;
    assert!(!output.status.success());
    let line = one_line(&output);
    assert!(
        line.contains(r#"nickname "sam" is in use by someone else"#),
        "{line}"
    );
    // Said in the server's words, not the library's code descriptions.
    assert!(!line.contains("Some entity"), "{line}");
    assert!(
        lines_of(&output, "ack").is_empty(),
        "nothing was sent as sam"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_host_and_port_is_a_server_address() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let output = confab(&["--pipe", "--server", &addr, "--nick", "ann"], "hello\n").await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(lines_of(&output, "ack").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipe_mode_gives_up_on_an_unreachable_server_after_the_connect_timeout() {
    // A port that was free a moment ago: nothing listens there.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let args = [
        "--pipe",
        "--server",
        &addr,
        "--nick",
        "ann",
        "--connect-timeout",
        "1s",
    ];
    let output = confab(&args, "hello\n").await;
    assert!(!output.status.success());
    let line = one_line(&output);
    assert!(
        line.starts_with(&format!("confab: could not connect to {addr} within 1s"))
            && line.contains(&format!("cannot reach {addr}: connection refused")),
        "{line}"
    );
    assert!(
        !lines_of(&output, "disconnected").is_empty(),
        "it did keep trying until then"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_chat_under_their_own_names() {
    let server = TestServer::start().await;
    let url = server.url();
    let mut li_lei = tokio::process::Command::new(CONFAB)
        .args(["--pipe", "--follow", "--server", &url, "--nick", "李雷"])
        .args(["--room", "cafe"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start 李雷");
    let stdout = li_lei.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));

    let zoe = confab(
        &[
            "--pipe", "--server", &url, "--nick", "zoë", "--room", "cafe",
        ],
        "bonjour 李雷\n",
    )
    .await;
    assert!(
        zoe.status.success(),
        "{}",
        String::from_utf8_lossy(&zoe.stderr)
    );
    let seen = within("李雷 to see zoë's message", async {
        loop {
            let line = lines.next_line().await.expect("read").expect("李雷 ended");
            let value: Value = serde_json::from_str(&line).expect("JSON");
            if value["kind"] == "message" {
                return value;
            }
        }
    })
    .await;
    assert_eq!(seen["from"], "zoë");
    assert_eq!(seen["text"], "bonjour 李雷");

    // zoë's claim outlives her pipe for the nickname lease: Zoë is the same name.
    let upper = confab(&["--pipe", "--server", &url, "--nick", "Zoë"], "").await;
    assert!(!upper.status.success());
    assert!(one_line(&upper).contains("is in use"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_terminal_client_says_a_refusal_once_and_nick_recovers() {
    let server = TestServer::start().await;
    let url = server.url();
    let _sam = holder(&url, "sam", "lobby").await;
    let tui = Tmux::start("sam", &format!("--server {url} --nick sam --room lobby"));
    tui.wait_for_text("nickname refused").await;
    // Nothing is retried behind the user's back: wait a few backoff periods' worth of
    // screens and count the reason.
    for _ in 0..10 {
        let screen = tui.capture();
        assert_eq!(
            screen.matches("is in use by someone else").count(),
            1,
            "{screen}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tui.wait_for_text("/nick NAME").await;

    tui.type_text("/nick samwise");
    tui.press("Enter");
    tui.wait_for_text("● connected").await;
    tui.type_text("hello as samwise");
    tui.press("Enter");
    tui.wait_for_text("<samwise> hello as samwise").await;
}
