//! The terminal client end to end: the real `confab` binary in tmux (and in pipe mode)
//! against a real server on 127.0.0.1.

mod common;
#[path = "common/tmux.rs"]
mod tmux;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::{Events, TestServer, client_at, within};
use confab::pb::chat_response::Event;
use confab_server::Config;
use serde_json::Value;
use tmux::{Tmux, input_line};

const CONFAB: &str = env!("CARGO_BIN_EXE_confab");

/// `confab` as alice and as bob, both in `lobby` at `url` and connected.
async fn alice_and_bob(url: &str) -> (Tmux, Tmux) {
    let alice = Tmux::start(
        "alice",
        &format!("--server {url} --nick alice --room lobby"),
    );
    let bob = Tmux::start("bob", &format!("--server {url} --nick bob --room lobby"));
    alice.wait_for_text("● connected").await;
    bob.wait_for_text("● connected").await;
    (alice, bob)
}

/// Two clients talk; `/join`, `/me` and `/quit` work; after `/quit` the terminal is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_chat_and_quit_restores_the_terminal() {
    let server = TestServer::start().await;
    let url = server.url();
    let (alice, bob) = alice_and_bob(&url).await;
    assert_eq!(
        alice.pane("#{alternate_on} #{mouse_any_flag}"),
        "1 1",
        "full screen with the mouse on"
    );

    alice.type_text("hello from alice");
    alice.press("Enter");
    bob.wait_for_text("<alice> hello from alice").await;

    bob.type_text("/me dances");
    bob.press("Enter");
    alice.wait_for_text("* bob dances").await;

    alice.type_text("/join second");
    alice.press("Enter");
    alice.wait_for_text("#second").await;
    bob.type_text("/join second");
    bob.press("Enter");
    let screen = alice.wait_for_text("→ bob joined").await;
    assert!(
        screen.lines().next().unwrap_or("").contains("lobby"),
        "both rooms are tabs:\n{screen}"
    );

    alice.type_text("/quit");
    alice.press("Enter");
    let screen = alice.wait_for_text("EXIT:").await;
    assert!(screen.contains("EXIT:0"), "{screen}");
    let shell = alice.wait_for_text("icanon").await;
    assert!(
        shell.contains("icanon echo") && !shell.contains("-icanon"),
        "raw mode is off:\n{shell}"
    );
    assert_eq!(
        alice.pane("#{alternate_on} #{mouse_any_flag}"),
        "0 0",
        "alternate screen and mouse are off"
    );
}

/// `/nick NAME` while connected renames in place: the other client sees it said once, and
/// what is sent next comes from the new name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nick_renames_a_connected_user_in_place() {
    let server = TestServer::start().await;
    let url = server.url();
    let (alice, bob) = alice_and_bob(&url).await;
    bob.wait_for_text("alice").await;

    alice.type_text("/nick alicia");
    alice.press("Enter");
    alice.wait_for_text("you are now alicia").await;
    let screen = bob.wait_for_text("alice is now known as alicia").await;
    assert!(
        !screen.contains("← alice left"),
        "a rename, not a leave:\n{screen}"
    );
    alice.type_text("hello again");
    alice.press("Enter");
    bob.wait_for_text("<alicia> hello again").await;
}

/// The server restarts under a connected client: the client shows it, reconnects by
/// itself, and shows what was sent while it was away, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_rides_out_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_owned(),
        ..common::config()
    };
    let server = TestServer::on("127.0.0.1:0", config.clone()).await;
    let addr = server.addr.to_string();
    let alice = Tmux::start(
        "alice",
        &format!("--server {} --nick alice --room lobby", server.url()),
    );
    alice.wait_for_text("● connected").await;

    let bot = client_at(&server.url(), "bot").await;
    let mut chat = Events::open(&bot).await;
    chat.join("lobby", None).await;
    chat.say("lobby", "before the restart").await;
    alice.wait_for_text("<bot> before the restart").await;
    drop(chat);

    server.stop().await.unwrap();
    alice.wait_for_text("connection lost").await;

    let server = TestServer::on(&addr, config).await;
    let bot = client_at(&server.url(), "bot").await;
    let mut chat = Events::open(&bot).await;
    chat.join("lobby", None).await;
    chat.say("lobby", "sent while you were away").await;
    chat.say("lobby", "and this too").await;

    let screen = alice.wait_for_text("<bot> and this too").await;
    assert!(
        screen.contains("<bot> sent while you were away"),
        "{screen}"
    );
    assert_eq!(
        screen.matches("before the restart").count(),
        1,
        "nothing twice:\n{screen}"
    );
    let screen = alice.wait_for_text("● connected").await;
    assert!(screen.contains("reconnected"), "{screen}");
}

/// While another client floods the room with 1,000 messages a second, keystrokes still
/// show in the input line at once and the typed message goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_stays_responsive_during_a_flood() {
    let server = TestServer::start().await;
    let alice = Tmux::start(
        "alice",
        &format!("--server {} --nick alice --room lobby", server.url()),
    );
    alice.wait_for_text("● connected").await;

    let flooder = client_at(&server.url(), "flooder").await;
    let mut events = Events::open(&flooder).await;
    events.join("lobby", None).await;
    let (sender, mut stream) = events.chat.split();
    let flooding = Arc::new(AtomicBool::new(true));
    let flood = {
        let flooding = flooding.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            let mut n = 0u64;
            // 1,000 a second until the test is done, and at least 3 seconds' worth.
            while flooding.load(Ordering::SeqCst) || n < 3_000 {
                tick.tick().await;
                n += 1;
                if sender.say("lobby", &format!("flood {n}")).await.is_err() {
                    break;
                }
            }
            // The sender goes back with the count: dropping it would end the stream (a
            // client that stops sending has left) before the last messages come back.
            (n, sender)
        })
    };
    // The flooder reads too (its own messages come back), watching for alice's line, and
    // stays until its last message has come back (so all of it was delivered).
    let (alice_said, heard_alice) = tokio::sync::oneshot::channel();
    let (last_sent, mut last) = tokio::sync::watch::channel(0u64);
    let seen = tokio::spawn(async move {
        let mut alice_said = Some(alice_said);
        let mut newest = 0;
        loop {
            let sent = *last.borrow();
            if sent > 0 && newest >= sent {
                return;
            }
            tokio::select! {
                _ = last.changed() => continue,
                event = stream.message() => {
                    let Ok(Some(event)) = event else { panic!("the flooder's stream ended") };
                    let Some(Event::Message(m)) = event.event else { continue };
                    if m.sender == "alice"
                        && let Some(said) = alice_said.take()
                    {
                        let _ = said.send(m.text.clone());
                    }
                    if let Some(n) = m.text.strip_prefix("flood ").and_then(|n| n.parse().ok()) {
                        newest = n;
                    }
                }
            }
        }
    });

    alice.wait_for_text("<flooder> flood 100").await;
    alice.type_text("typed during the flood");
    alice
        .wait_for("the keystrokes in the input line", |screen| {
            input_line(screen) == "> typed during the flood"
        })
        .await;
    alice.press("Enter");
    let text = within("alice's message to reach the flooder", heard_alice)
        .await
        .unwrap();
    assert_eq!(text, "typed during the flood");
    flooding.store(false, Ordering::SeqCst);
    let (sent, _sender) = within("the flood to end", flood).await.unwrap();
    last_sent.send_replace(sent);
    within("the flood to come back to the flooder", seen)
        .await
        .unwrap();
    // The client kept up with the whole flood: its last message reaches the screen.
    alice
        .wait_for_text(&format!("<flooder> flood {sent}"))
        .await;
}

/// Pipe mode: 500 stdin lines are sent and acked, the process exits 0, and a second pipe
/// client sees the 500 messages in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipe_mode_sends_every_line_and_exits_when_all_are_acked() {
    let server = TestServer::start().await;
    let url = server.url();
    let mut follower = Command::new(CONFAB)
        .args([
            "--pipe", "--follow", "--server", &url, "--nick", "b", "--room", "r",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the follower");
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let value: Value = serde_json::from_str(&line).expect("every line is JSON");
            if lines_tx.send(value).is_err() {
                return;
            }
        }
    });
    within("the follower to join", async {
        while let Some(line) = lines.recv().await {
            if line["kind"] == "joined" {
                return;
            }
        }
    })
    .await;

    let sender = tokio::task::spawn_blocking(move || {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "seq 1 500 | {CONFAB} --pipe --server {url} --nick a --room r"
            ))
            .output()
            .expect("run the sender")
    });
    let output = within("the sender to finish", sender).await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let acks = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("JSON"))
        .filter(|v| v["kind"] == "ack")
        .count();
    assert_eq!(acks, 500);

    let texts = within("the follower to see all 500", async {
        let mut texts = Vec::new();
        while texts.len() < 500 {
            let line = lines.recv().await.expect("the follower ended");
            if line["kind"] == "message" && line["from"] == "a" {
                assert!(line["seq"].is_u64() && line["room"] == "r");
                texts.push(line["text"].as_str().unwrap_or_default().to_owned());
            }
        }
        texts
    })
    .await;
    assert_eq!(texts, (1..=500).map(|n| n.to_string()).collect::<Vec<_>>());
    let _ = follower.kill();
    let _ = follower.wait();
}

/// The room's messages on a screen, by number (`msg-0042` → 42), top to bottom.
fn numbers_on(screen: &str) -> Vec<u64> {
    screen
        .split("msg-")
        .skip(1)
        .filter_map(|rest| rest.get(..4)?.parse().ok())
        .collect()
}

/// With a scrollback of 100 lines, paging up through a room of 300 messages reads the
/// older ones back from the server: every screen on the way shows consecutive messages
/// (none twice at a page's seam), all the way to the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrolling_back_past_the_scrollback_reads_history_from_the_server() {
    let server = TestServer::start().await;
    let writer = server.client("writer").await;
    let batch = futures::stream::iter((1..=300).map(|n| confab::pb::PublishBatchRequest {
        message: Some(confab::pb::OutgoingMessage {
            room: "log".into(),
            text: format!("msg-{n:04}"),
            client_msg_id: format!("m{n}"),
            kind: 0,
        }),
    }));
    common::create_room(&writer, "log").await;
    let summary = writer
        .rpc()
        .publish_batch(batch)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.accepted, 300);

    let reader = Tmux::start(
        "reader",
        &format!(
            "--server {} --nick reader --room log --scrollback 100",
            server.url()
        ),
    );
    reader.wait_for_text("msg-0300").await;
    let deadline = tokio::time::Instant::now() + common::DEADLINE * 3;
    let mut previous = reader.capture();
    let mut seen: std::collections::BTreeSet<u64> = numbers_on(&previous).into_iter().collect();
    while !seen.contains(&1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "did not reach the first message; the screen:\n{previous}"
        );
        reader.press("PageUp");
        // The view moves at once, or once the page it asked for arrives; a screen is read
        // once two captures agree (not in the middle of a redraw).
        let mut screen = reader.capture();
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(25)).await;
            let again = reader.capture();
            if again == screen && screen != previous {
                break;
            }
            screen = again;
        }
        let numbers = numbers_on(&screen);
        assert!(
            numbers.windows(2).all(|w| w[1] == w[0] + 1),
            "consecutive, none twice:\n{screen}"
        );
        seen.extend(numbers);
        previous = screen;
    }
    assert_eq!(seen.len(), 300, "every message was on a screen");
}

/// Runs `confab --pipe` with stdin from /dev/null against `url`, room `room`, and returns
/// the seqs of the messages it printed; it must exit 0 by itself.
async fn dump_with_pipe(url: &str, room: &str) -> Vec<u64> {
    let mut dump = tokio::process::Command::new(CONFAB);
    dump.args([
        "--pipe", "--server", url, "--nick", "reader", "--room", room,
    ])
    .stdin(Stdio::null())
    .kill_on_drop(true);
    let output = within("pipe mode to print the room and exit", dump.output())
        .await
        .expect("run confab --pipe");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("every line is JSON"))
        .filter(|v| v["kind"] == "message")
        .map(|v| v["seq"].as_u64().expect("a message has a seq"))
        .collect()
}

/// Pipe mode with stdin closed prints everything its join replays before it exits, in
/// order and once each; the same from a restarted server reading its data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipe_mode_prints_the_history_it_joined_with() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = || Config {
        data_dir: dir.path().to_owned(),
        history_on_join: 1000,
        ..common::config()
    };
    let server = TestServer::on("127.0.0.1:0", config()).await;
    let writer = server.client("writer").await;
    common::create_room(&writer, "log").await;
    let summary = common::flood(writer, "log", 600).await.unwrap().unwrap();
    assert_eq!(summary.into_inner().accepted, 600);
    let all: Vec<u64> = (1..=600).collect();
    assert_eq!(dump_with_pipe(&server.url(), "log").await, all);

    server.stop().await.expect("clean stop");
    let server = TestServer::on("127.0.0.1:0", config()).await;
    assert_eq!(dump_with_pipe(&server.url(), "log").await, all);
}

/// `confab demo` runs a server of its own and fills the room with simulated users who
/// chat with the person in the normal UI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_mode_brings_a_room_to_life() {
    let demo = Tmux::start("demo", "--nick you demo --users 3");
    demo.wait_for_text("4 here").await;
    assert_eq!(demo.pane("#{alternate_on} #{mouse_any_flag}"), "1 1");
    demo.wait_for("a simulated user to say something", |screen| {
        ["<ada>", "<linus>", "<grace>", "* ada", "* linus", "* grace"]
            .iter()
            .any(|who| screen.contains(who))
    })
    .await;
    demo.type_text("hello everyone");
    demo.press("Enter");
    demo.wait_for_text("<you> hello everyone").await;
    // Ctrl-C leaves as /quit does, and the terminal is back too.
    demo.press("C-c");
    demo.wait_for_text("EXIT:0").await;
    let shell = demo.wait_for_text("icanon").await;
    assert!(
        shell.contains("icanon echo") && !shell.contains("-icanon"),
        "{shell}"
    );
    assert_eq!(demo.pane("#{alternate_on} #{mouse_any_flag}"), "0 0");
}
