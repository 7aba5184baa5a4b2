//! Cluster mode end to end: several nodes on one real Redis keep every promise of one
//! node — fan-out in seq order across nodes, one presence, kicks that reach every node,
//! idempotency and nicknames over the cluster — and nothing acked is lost when a node is
//! killed, when Redis is killed and comes back, or when the nodes' feeds drop.

mod common;
#[path = "common/process.rs"]
mod process;

use std::{
    collections::{BTreeSet, HashMap},
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{
    Engine, Events, Storage, TestServer, client_at,
    conversation::{acked, connected, converse_on, history, until},
    eventually, metric, scrape, within,
};
use confab::{
    Client,
    pb::{self, LeaveReason, PresenceKind, chat_response::Event},
};
use confab_server::Config;
use futures::StreamExt as _;
use process::ServerProcess;
use tokio::task::JoinSet;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Settings of cluster node `node` on `storage`.
fn node_config(storage: &Storage, node: &str) -> Config {
    Config {
        node_id: Some(node.to_owned()),
        ..storage.apply(common::config())
    }
}

/// `n` nodes (in this process) on one fresh Redis.
async fn cluster(n: usize) -> (Storage, Vec<TestServer>) {
    cluster_on(Engine::Redis, n).await
}

/// `n` nodes (in this process) on fresh storage of `engine` (a Redis, or a Redis Cluster).
async fn cluster_on(engine: Engine, n: usize) -> (Storage, Vec<TestServer>) {
    let storage = Storage::new(engine);
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes
            .push(TestServer::on("127.0.0.1:0", node_config(&storage, &format!("node-{i}"))).await);
    }
    (storage, nodes)
}

/// Every member of `room` as node `url` lists them, page by page.
async fn members_at(url: &str, viewer: &str, room: &str) -> Vec<String> {
    common::members(&client_at(url, viewer).await, room).await
}

/// Three nodes, readers spread over them, a sender on each: every reader gets every
/// message exactly once, in seq order; every node lists the same members; and a kick
/// made on one node puts the user out of their stream on another.
async fn three_nodes_deliver_every_message_once_in_order_and_agree(engine: Engine) {
    const PER_SENDER: usize = 400;
    let (_storage, nodes) = cluster_on(engine, 3).await;
    let owner = nodes[0].client("owner").await;
    common::create_room(&owner, "hall").await;
    let mut owner_chat = Events::open(&owner).await;
    owner_chat.join("hall", Some(0)).await;

    let mut readers = Vec::new();
    for r in 0..6 {
        let client = nodes[r % 3].client(&format!("reader{r}")).await;
        let mut events = Events::open(&client).await;
        events.join("hall", Some(0)).await;
        readers.push((client, events));
    }
    let mut senders = JoinSet::new();
    for (s, node) in nodes.iter().enumerate() {
        let client = node.client(&format!("sender{s}")).await;
        senders.spawn(async move {
            let mut events = Events::open(&client).await;
            events.join("hall", Some(0)).await;
            let mut acked = Vec::new();
            for n in 0..PER_SENDER {
                let text = format!("sender{s} {n}");
                acked.push((events.say("hall", &text).await, text));
            }
            (client, events, acked)
        });
    }
    let mut sent: HashMap<u64, String> = HashMap::new();
    let mut sender_streams = Vec::new();
    while let Some(done) = senders.join_next().await {
        let (client, events, acked) = done.unwrap();
        for (seq, text) in acked {
            assert!(sent.insert(seq, text).is_none(), "seq {seq} acked twice");
        }
        sender_streams.push((client, events));
    }
    let total = 3 * PER_SENDER;
    assert_eq!(sent.len(), total);
    for (_, events) in &mut readers {
        let mut got = Vec::with_capacity(total);
        while got.len() < total {
            let message = events.message().await;
            assert_eq!(
                sent.get(&message.seq),
                Some(&message.text),
                "what was acked"
            );
            got.push(message.seq);
        }
        assert_eq!(got, (1..=total as u64).collect::<Vec<_>>());
    }

    // One presence over the cluster: every node lists everyone, once.
    let mut everyone: Vec<String> = ["owner".to_owned()]
        .into_iter()
        .chain((0..6).map(|r| format!("reader{r}")))
        .chain((0..3).map(|s| format!("sender{s}")))
        .collect();
    everyone.sort();
    for (i, node) in nodes.iter().enumerate() {
        let viewer = format!("viewer{i}");
        assert_eq!(members_at(&node.url(), &viewer, "hall").await, everyone);
    }

    // The owner, on node 0, kicks reader1, on node 1: reader1's stream there is put out,
    // and the room on node 2 hears that reader1 left.
    let id = owner_chat
        .chat
        .sender()
        .kick("hall", "reader1", "enough")
        .await
        .unwrap();
    assert!(matches!(
        owner_chat.reply(id).await,
        Event::ModerationDone(_)
    ));
    let left = readers[1]
        .1
        .until("the kick", |e| matches!(e.event, Some(Event::Left(_))))
        .await;
    let Some(Event::Left(left)) = left.event else {
        unreachable!()
    };
    assert_eq!(
        (left.reason(), left.by.as_str(), left.message.as_str()),
        (LeaveReason::Kicked, "owner", "enough")
    );
    readers[2].1.presence("reader1", PresenceKind::Left).await;
    everyone.retain(|user| user != "reader1");
    for (i, node) in nodes.iter().enumerate() {
        let viewer = client_at(&node.url(), &format!("later{i}")).await;
        eventually("reader1 gone from every node's list", || async {
            (common::members(&viewer, "hall").await == everyone).then_some(())
        })
        .await;
    }
}

/// On one Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_one_redis() {
    three_nodes_deliver_every_message_once_in_order_and_agree(Engine::Redis).await;
}

/// On a Redis Cluster of three shards: each room's keys in one slot, its scripts run there,
/// its feed published through the cluster bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_a_redis_cluster() {
    three_nodes_deliver_every_message_once_in_order_and_agree(Engine::RedisCluster).await;
}

/// The same client_msg_id sent at once through two nodes is stored once, and both acks
/// carry its seq; a nickname live on one node cannot be taken on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_and_nicknames_hold_across_nodes() {
    let (_storage, nodes) = cluster(2).await;
    let on_a = nodes[0].client("alice").await;
    common::create_room(&on_a, "r").await;
    // The same login on node B (a client that moved, with its token).
    let mut on_b = Client::connect(&nodes[1].url()).await.unwrap();
    on_b.set_token(on_a.token().unwrap()).unwrap();
    for n in 0..20 {
        let message = pb::OutgoingMessage {
            room: "r".into(),
            text: format!("once {n}"),
            client_msg_id: format!("same-{n}"),
            kind: 0,
        };
        let publish = |client: &Client| {
            let mut rpc = client.rpc();
            let request = pb::PublishRequest {
                message: Some(message.clone()),
            };
            async move { rpc.publish(request).await.unwrap().into_inner() }
        };
        let (a, b) = tokio::join!(publish(&on_a), publish(&on_b));
        assert_eq!(a.seq, b.seq, "both acks name the one stored message");
        assert!(a.duplicate != b.duplicate, "exactly one of them stored it");
    }
    let stored = history(&on_a, "r").await;
    assert_eq!(
        stored.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );

    // zed is live on node A (a stream open): node B refuses the name to anyone else.
    let zed = nodes[0].client("zed").await;
    let _zed_stream = Events::open(&zed).await;
    let mut impostor = Client::connect(&nodes[1].url()).await.unwrap();
    for name in ["zed", "Zed"] {
        let refused = impostor.login(name).await.unwrap_err();
        let confab::ClientError::Status(status) = refused else {
            panic!("{refused:?}")
        };
        assert_eq!(status.code(), Code::AlreadyExists, "{name}: {status:?}");
    }
}

/// The node's append calls so far, from its metrics page (none before the first).
fn append_calls(page: &str) -> f64 {
    let name = "confab_engine_call_seconds_count{call=\"append\"}";
    if page.contains(name) {
        metric(page, name)
    } else {
        0.0
    }
}

/// Opens `client`'s `Chat` stream with `frames` written at once (so a run of sends among
/// them is all there when the session reads its first) and returns the first `n` acks
/// with their frames' request ids; any command error fails the test.
async fn acks_of_one_write(
    client: &Client,
    frames: Vec<pb::ChatRequest>,
    n: usize,
) -> Vec<(u64, pb::Ack)> {
    let mut chat = client
        .rpc()
        .chat(futures::stream::iter(frames).chain(futures::stream::pending()))
        .await
        .unwrap()
        .into_inner();
    let mut acks = Vec::new();
    while acks.len() < n {
        let event = within("the acks", chat.message()).await.unwrap().unwrap();
        match event.event {
            Some(Event::Ack(ack)) => acks.push((event.request_id, ack)),
            Some(Event::Error(error)) => panic!("refused: {error:?}"),
            _ => {}
        }
    }
    acks
}

/// A stream's sends that arrive together reach Redis as one pipeline (fewer calls than
/// messages), and land in the order sent, each once, even when Redis has forgotten the
/// append script (after a restart or `SCRIPT FLUSH`): a lone send loads it again, and a
/// pipeline never depends on it.
#[tokio::test]
async fn a_run_of_sends_is_one_pipeline_in_order_even_when_redis_forgot_the_script() {
    let (storage, nodes) = cluster(1).await;
    let redis = storage.redis().expect("a Redis");
    let alice = nodes[0].client("alice").await;
    common::create_room(&alice, "r").await;
    let send = |id: u64, text: &str| pb::ChatRequest {
        request_id: id,
        command: Some(pb::chat_request::Command::Send(pb::OutgoingMessage {
            room: "r".into(),
            text: text.into(),
            client_msg_id: text.into(),
            kind: 0,
        })),
    };
    let join = pb::ChatRequest {
        request_id: 1,
        command: Some(pb::chat_request::Command::Join(pb::JoinRoom {
            room: "r".into(),
            ..Default::default()
        })),
    };
    // A lone send with the script forgotten: sent again as EVAL.
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    let mut events = Events::open(&alice).await;
    events.join("r", None).await;
    assert_eq!(events.say("r", "lone").await, 1);
    // Then a run, on a stream of its own, with the script forgotten again: the join
    // before it ends any run, and everything after it is in the same write, so it is all
    // here when the session reads the first send.
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    let before = append_calls(&scrape(nodes[0].metrics_addr).await);
    let mut frames = vec![join];
    frames.extend((0..10).map(|n| send(10 + n, &format!("run-{n}"))));
    let acks: Vec<_> = acks_of_one_write(&alice, frames, 10)
        .await
        .into_iter()
        .map(|(request_id, ack)| (request_id, ack.seq, ack.duplicate))
        .collect();
    let expected: Vec<_> = (0..10).map(|n| (10 + n, 2 + n, false)).collect();
    assert_eq!(
        acks, expected,
        "acked in the order sent, with seqs in that order"
    );
    let calls = append_calls(&scrape(nodes[0].metrics_addr).await) - before;
    assert!(
        calls < 10.0,
        "ten sends took {calls} append calls: the run was not one pipeline"
    );
    let stored = history(&alice, "r").await;
    let texts: Vec<_> = stored.iter().map(|m| (m.seq, m.text.as_str())).collect();
    let mut want = vec![(1, "lone".to_owned())];
    want.extend((0..10).map(|n| (2 + n, format!("run-{n}"))));
    assert_eq!(
        texts,
        want.iter()
            .map(|(s, t)| (*s, t.as_str()))
            .collect::<Vec<_>>()
    );
}

/// A run that alternates two rooms: on one Redis it goes in fewer round trips than it
/// has rooms' segments (one, when it all arrives together), on a Redis Cluster in one per
/// segment (a pipeline may not cross slots); on both, each room's messages land in the
/// order sent and the acks come back in frame order.
async fn a_run_across_rooms_lands_in_order(engine: Engine) {
    let (_storage, nodes) = cluster_on(engine, 1).await;
    let alice = nodes[0].client("alice").await;
    let rooms = ["r", "s"];
    let mut frames = Vec::new();
    for (n, room) in rooms.iter().enumerate() {
        common::create_room(&alice, room).await;
        frames.push(pb::ChatRequest {
            request_id: n as u64 + 1,
            command: Some(pb::chat_request::Command::Join(pb::JoinRoom {
                room: (*room).into(),
                ..Default::default()
            })),
        });
    }
    // Ten sends, r and s in turn: ten segments of one message each.
    frames.extend((0..10u64).map(|n| pb::ChatRequest {
        request_id: 10 + n,
        command: Some(pb::chat_request::Command::Send(pb::OutgoingMessage {
            room: rooms[n as usize % 2].into(),
            text: format!("run-{n}"),
            client_msg_id: format!("run-{n}"),
            kind: 0,
        })),
    }));
    let before = append_calls(&scrape(nodes[0].metrics_addr).await);
    let acks: Vec<_> = acks_of_one_write(&alice, frames, 10)
        .await
        .into_iter()
        .map(|(request_id, ack)| (request_id, ack.room, ack.seq))
        .collect();
    let expected: Vec<_> = (0..10u64)
        .map(|n| (10 + n, rooms[n as usize % 2].to_owned(), n / 2 + 1))
        .collect();
    assert_eq!(
        acks, expected,
        "acked in frame order, each room's seqs in send order"
    );
    let calls = append_calls(&scrape(nodes[0].metrics_addr).await) - before;
    match engine {
        Engine::Redis => assert!(
            calls < 10.0,
            "ten sends in two rooms took {calls} append calls: the run was cut per room"
        ),
        // Ten segments of one message each, none of which may share a pipeline.
        Engine::RedisCluster => assert_eq!(calls, 10.0, "ten sends in alternating rooms"),
        Engine::Sqlite => unreachable!("the run's calls are the cluster engines'"),
    }
    for (k, room) in rooms.iter().enumerate() {
        let stored: Vec<_> = history(&alice, room)
            .await
            .iter()
            .map(|m| (m.seq, m.text.clone()))
            .collect();
        let want: Vec<_> = (0..5u64)
            .map(|i| (i + 1, format!("run-{}", 2 * i + k as u64)))
            .collect();
        assert_eq!(stored, want, "room {room}");
    }
}

#[tokio::test]
async fn a_run_across_rooms_is_one_round_trip_on_one_redis() {
    a_run_across_rooms_lands_in_order(Engine::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_across_rooms_is_a_round_trip_per_room_on_a_redis_cluster() {
    a_run_across_rooms_lands_in_order(Engine::RedisCluster).await;
}

/// `confab --pipe` (the real binary) on `servers`, in room `r` as `nick`: its stdin to
/// write lines to, and every JSON line it prints, as they come.
fn pipe_client(
    servers: &[&str],
    nick: &str,
) -> (std::process::Child, Arc<Mutex<Vec<serde_json::Value>>>) {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_confab-server")).with_file_name("confab");
    assert!(
        binary.exists(),
        "{} is not built: run `cargo test --workspace` (it builds the client too)",
        binary.display()
    );
    let mut command = Command::new(binary);
    command.args(["--pipe", "--follow", "--nick", nick, "--room", "r"]);
    for server in servers {
        command.args(["--server", server]);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start confab");
    let stdout = child.stdout.take().expect("stdout");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Ok(value) = serde_json::from_str(&line) {
                sink.lock().unwrap().push(value);
            }
        }
    });
    (child, lines)
}

/// The values of `field` in the printed lines of `kind`.
fn printed(
    lines: &Mutex<Vec<serde_json::Value>>,
    kind: &str,
    field: &str,
) -> Vec<serde_json::Value> {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line["kind"] == kind)
        .map(|line| line[field].clone())
        .collect()
}

/// `kill -9` of a node mid-stream: its clients that know another node (the client library,
/// and the `confab` binary in pipe mode) move there and resume with nothing lost or
/// repeated, their unacked sends retried land once, and the others see the users who did
/// not come back leave within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_clients_fail_over_and_lose_nothing() {
    const FIRST: usize = 100;
    const SECOND: usize = 100;
    const PIPED: usize = 20;
    let storage = Storage::new(Engine::Redis);
    let mut doomed = ServerProcess::start_node(&storage, "doomed");
    let survivor = ServerProcess::start_node(&storage, "survivor");
    let servers = [doomed.url.clone(), survivor.url.clone()];

    let (walker, walker_seen) = converse_on(&servers, "walker");
    let (watcher, watcher_seen) = converse_on(&servers, "watcher");
    for seen in [&walker_seen, &watcher_seen] {
        until("both to connect to the first node", || connected(seen)).await;
    }
    let (mut piper, piped) = pipe_client(&[&servers[0], &servers[1]], "piper");
    until("the pipe client to join", || {
        !printed(&piped, "joined", "room").is_empty()
    })
    .await;
    // Someone on the doomed node without a second address: the others see them go.
    let ghost = client_at(&doomed.url, "ghost").await;
    let mut ghost_chat = Events::open(&ghost).await;
    ghost_chat.join("r", None).await;
    let observer = client_at(&survivor.url, "observer").await;
    let mut observer_chat = Events::open(&observer).await;
    observer_chat.join("r", None).await;

    let mut stdin = piper.stdin.take().expect("stdin");
    let mut sent = Vec::new();
    for n in 0..FIRST {
        sent.push(walker.say("r", &format!("walk {n}")).await.unwrap());
    }
    for n in 0..PIPED / 2 {
        writeln!(stdin, "pipe {n}").unwrap();
    }
    until("some acks before the kill", || {
        walker_seen.lock().unwrap().acks.len() >= FIRST / 2
    })
    .await;

    doomed.kill();
    for n in FIRST..FIRST + SECOND {
        sent.push(walker.say("r", &format!("walk {n}")).await.unwrap());
    }
    for n in PIPED / 2..PIPED {
        writeln!(stdin, "pipe {n}").unwrap();
    }
    // Bounded by the heartbeat (a node silent for 5 s is purged): within 10 s.
    tokio::time::timeout(
        Duration::from_secs(10),
        observer_chat.presence("ghost", PresenceKind::Left),
    )
    .await
    .expect("the killed node's user leaves within 10 s");

    until("every send acked on the surviving node", || {
        walker_seen.lock().unwrap().acks.len() == FIRST + SECOND
            && printed(&piped, "ack", "seq").len() == PIPED
    })
    .await;
    let total = FIRST + SECOND + PIPED;
    let stored = history(&observer, "r").await;
    assert_eq!(
        stored.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=total as u64).collect::<Vec<_>>(),
        "every message once, no hole"
    );
    let ids: BTreeSet<&str> = stored.iter().map(|m| m.client_msg_id.as_str()).collect();
    assert_eq!(ids.len(), total, "no message stored twice");
    for id in &sent {
        assert!(ids.contains(id.as_str()), "{id} was stored");
    }
    let moved = |seen: &Mutex<common::conversation::Seen>| {
        seen.lock()
            .unwrap()
            .states
            .iter()
            .any(|s| matches!(s, confab::ConnectionState::Connecting { server, .. } if *server == servers[1]))
    };
    assert!(
        moved(&walker_seen) && moved(&watcher_seen),
        "both moved to the survivor"
    );
    until("the watcher to get everything", || {
        watcher_seen.lock().unwrap().seqs.len() >= total
    })
    .await;
    assert_eq!(
        watcher_seen.lock().unwrap().seqs,
        (1..=total as u64).collect::<Vec<_>>()
    );
    until("the pipe client to print everything", || {
        printed(&piped, "message", "seq").len() >= total
    })
    .await;
    let piped_seqs: Vec<u64> = printed(&piped, "message", "seq")
        .iter()
        .map(|seq| seq.as_u64().unwrap())
        .collect();
    assert_eq!(piped_seqs, (1..=total as u64).collect::<Vec<_>>());
    drop((walker, watcher));
    let _ = piper.kill();
    let _ = piper.wait();
}

/// Whether `url`'s health says SERVING.
async fn serving(url: &str) -> bool {
    let channel = tonic::transport::Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|r| r.into_inner().status() == ServingStatus::Serving)
        .unwrap_or(false)
}

/// `kill -9` of Redis (AOF, appendfsync always) mid-stream, and a restart: sends in the
/// outage get UNAVAILABLE and are retried, health says NOT_SERVING meanwhile, and
/// afterwards every acked message is in history once with its seq, and readers on every
/// node got every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_crash_loses_nothing_acked() {
    const BEFORE: usize = 60;
    const DURING: usize = 30;
    let (mut storage, nodes) = cluster(2).await;
    let urls: Vec<String> = nodes.iter().map(TestServer::url).collect();
    let reversed: Vec<String> = urls.iter().rev().cloned().collect();
    let users = vec![converse_on(&urls, "ann"), converse_on(&reversed, "ben")];
    for (_, seen) in &users {
        until("both to connect", || connected(seen)).await;
    }
    let alice = nodes[0].client("alice").await;
    for n in 0..BEFORE {
        for (u, (conversation, _)) in users.iter().enumerate() {
            conversation
                .say("r", &format!("u{u} before {n}"))
                .await
                .unwrap();
        }
    }
    until("the first messages acked", || acked(&users) == 2 * BEFORE).await;
    let acked_before: HashMap<String, u64> = users
        .iter()
        .flat_map(|(_, seen)| seen.lock().unwrap().acks.clone())
        .collect();

    storage.redis_mut().unwrap().kill();
    let status = eventually("a send to fail while Redis is down", || async {
        alice
            .rpc()
            .publish(pb::PublishRequest {
                message: Some(pb::OutgoingMessage {
                    room: "r".into(),
                    text: "in the outage".into(),
                    client_msg_id: "outage-1".into(),
                    kind: 0,
                }),
            })
            .await
            .err()
    })
    .await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    eventually("health to say NOT_SERVING", || async {
        (!serving(&urls[0]).await).then_some(())
    })
    .await;
    for n in 0..DURING {
        for (u, (conversation, _)) in users.iter().enumerate() {
            conversation
                .say("r", &format!("u{u} during {n}"))
                .await
                .unwrap();
        }
    }
    // Down for longer than a node may be silent before the others purge it: when Redis is
    // back no node takes the others for dead, and the users stay present.
    tokio::time::sleep(Duration::from_secs(6)).await;
    storage.redis_mut().unwrap().restart();
    eventually("health to say SERVING again", || async {
        serving(&urls[0]).await.then_some(())
    })
    .await;
    until("every send acked after the restart", || {
        acked(&users) == 2 * (BEFORE + DURING)
    })
    .await;

    let total = 2 * (BEFORE + DURING);
    let reader = nodes[1].client("auditor").await;
    let stored = history(&reader, "r").await;
    assert_eq!(
        stored.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=total as u64).collect::<Vec<_>>()
    );
    let by_id: HashMap<&str, u64> = stored
        .iter()
        .map(|m| (m.client_msg_id.as_str(), m.seq))
        .collect();
    assert_eq!(by_id.len(), total, "every message stored once");
    for (id, seq) in &acked_before {
        assert_eq!(by_id[id.as_str()], *seq, "an acked message kept its seq");
    }
    for (_, seen) in &users {
        for (id, seq) in &seen.lock().unwrap().acks {
            assert_eq!(by_id[id.as_str()], *seq, "every ack names the stored seq");
        }
    }
    for (i, url) in urls.iter().enumerate() {
        let viewer = client_at(url, &format!("viewer{i}")).await;
        eventually(
            "both users present on every node after the outage",
            || async {
                let members = common::members(&viewer, "r").await;
                (members.contains(&"ann".to_owned()) && members.contains(&"ben".to_owned()))
                    .then_some(())
            },
        )
        .await;
    }
    for (_, seen) in &users {
        until("every reader to get every message", || {
            seen.lock().unwrap().seqs.len() >= total
        })
        .await;
        assert_eq!(
            seen.lock().unwrap().seqs,
            (1..=total as u64).collect::<Vec<_>>()
        );
    }
}

/// Pub/sub drops what is published while a subscriber is away: with the nodes' pub/sub
/// connections killed again and again (`CLIENT KILL TYPE pubsub`) while a flood flows, a
/// reader on another node still gets every message once, in order, the gaps filled from
/// the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_in_the_feed_are_filled_from_the_log() {
    const MESSAGES: u64 = 3_000;
    let (storage, nodes) = cluster(2).await;
    let publisher = nodes[0].client("publisher").await;
    common::create_room(&publisher, "flood").await;
    let reader = nodes[1].client("reader").await;
    let mut reading = Events::open(&reader).await;
    reading.join("flood", Some(0)).await;

    let flood = common::flood(publisher, "flood", MESSAGES);
    let redis = storage.redis().unwrap();
    let mut kills = 0;
    while !flood.is_finished() {
        let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        kills += killed.trim().parse::<u32>().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let summary = within("the flood", flood)
        .await
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(summary.accepted, MESSAGES as u32);
    assert!(kills > 0, "the feeds were cut");
    assert_eq!(
        reading.seqs(MESSAGES as usize).await,
        (1..=MESSAGES).collect::<Vec<_>>()
    );
    let page = scrape(nodes[1].metrics_addr).await;
    assert!(metric(&page, "confab_redis_reconnects_total") > 0.0);
    assert!(
        metric(&page, "confab_feed_gaps_filled_total") > 0.0,
        "the reader's node filled gaps from the log"
    );
}

/// When a room's data is lost from Redis, its log starts again under a new epoch: a
/// client resuming with the old epoch gets a reset, then only the new messages; a reader
/// that was live all along gets the reset too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_room_starts_again_under_a_new_epoch() {
    let (storage, nodes) = cluster(2).await;
    let alice = nodes[0].client("alice").await;
    let mut alice_chat = Events::open(&alice).await;
    let joined = alice_chat.join("r", None).await;
    let old_epoch = joined.epoch.clone();
    assert!(!old_epoch.is_empty());
    for n in 0..5 {
        alice_chat.say("r", &format!("old {n}")).await;
    }
    let live = nodes[1].client("live").await;
    let mut live_chat = Events::open(&live).await;
    live_chat.join("r", Some(5)).await;

    // Redis loses the room (flushed, or restored from before it existed).
    let redis = storage.redis().unwrap();
    let keys = redis.cli(&["--scan", "--pattern", "confab:{r}:*"]);
    let keys: Vec<&str> = keys.lines().collect();
    assert!(!keys.is_empty());
    let mut del = vec!["DEL"];
    del.extend(keys);
    redis.cli(&del);

    assert_eq!(alice_chat.say("r", "new 1").await, 1, "seqs start again");
    let reset = live_chat
        .until("the live reader's reset", |e| {
            matches!(e.event, Some(Event::Gap(_)))
        })
        .await;
    let Some(Event::Gap(reset)) = reset.event else {
        unreachable!()
    };
    assert!(reset.reset);
    assert_ne!(reset.epoch, old_epoch);
    let message = live_chat.message().await;
    assert_eq!((message.seq, message.text.as_str()), (1, "new 1"));

    // A client that saw seq 5 of the old epoch resumes on the other node.
    let bob = nodes[1].client("bob").await;
    let mut bob_chat = Events::open(&bob).await;
    let id = bob_chat
        .chat
        .sender()
        .join_at("r", Some(5), &old_epoch)
        .await
        .unwrap();
    let Event::Joined(joined) = bob_chat.reply(id).await else {
        panic!("the join was refused")
    };
    assert_eq!(joined.epoch, reset.epoch);
    assert_eq!(joined.replay_from_seq, 1);
    let gap = bob_chat
        .until("bob's reset", |e| {
            matches!(e.event, Some(Event::Gap(_)) | Some(Event::Message(_)))
        })
        .await;
    let Some(Event::Gap(gap)) = gap.event else {
        panic!("a message came before the reset: {gap:?}")
    };
    assert_eq!(
        (gap.reset, gap.epoch.as_str(), gap.to_seq),
        (true, reset.epoch.as_str(), 5)
    );
    let message = bob_chat.message().await;
    assert_eq!((message.seq, message.text.as_str()), (1, "new 1"));
    alice_chat.say("r", "new 2").await;
    let message = bob_chat.message().await;
    assert_eq!((message.seq, message.text.as_str()), (2, "new 2"));
}

/// Many clients joining a room that does not exist yet, all at once on two nodes (each
/// join may be the one that makes it): the room is made once, every node follows its
/// feed, and every reader gets every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_made_by_concurrent_joins_on_two_nodes_feeds_everyone() {
    let (_storage, nodes) = cluster(2).await;
    common::joins_at_once_make_one_room(&[&nodes[0], &nodes[1]]).await;
}

/// The events `events` receives up to and including the first that `last` matches.
async fn events_until(
    events: &mut Events,
    what: &str,
    last: impl Fn(&Event) -> bool,
) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let event = events.until(what, |_| true).await.event;
        let Some(event) = event else { continue };
        let done = last(&event);
        seen.push(event);
        if done {
            return seen;
        }
    }
}

/// The presence changes of `user` among `events`.
fn presence_of(events: &[Event], user: &str) -> Vec<PresenceKind> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::Presence(p) if p.user == user => Some(p.kind()),
            _ => None,
        })
        .collect()
}

/// A user with streams on two nodes is present once: the room hears one join (when the
/// first node has them) and one leave (when the last stream, on whichever node, goes), and
/// every node lists them while any stream is in; typing crosses nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_one_over_the_nodes_and_typing_crosses_them() {
    let (storage, nodes) = cluster(2).await;
    let observer = nodes[1].client("observer").await;
    let mut watching = Events::open(&observer).await;
    watching.join("r", None).await;

    let on_a = nodes[0].client("alice").await;
    let mut on_b = Client::connect(&nodes[1].url()).await.unwrap();
    on_b.set_token(on_a.token().unwrap()).unwrap();
    let mut stream_a = Events::open(&on_a).await;
    stream_a.join("r", None).await;
    let mut stream_b = Events::open(&on_b).await;
    stream_b.join("r", None).await;
    // Typing on node A reaches the observer on node B; nothing about alice came before
    // it but the one join.
    stream_a.chat.sender().typing("r", true).await.unwrap();
    let seen = events_until(
        &mut watching,
        "alice typing",
        |e| matches!(e, Event::Typing(t) if t.user == "alice" && t.typing),
    )
    .await;
    assert_eq!(presence_of(&seen, "alice"), [PresenceKind::Joined]);

    // Her stream on node A leaves: she is still in through node B.
    let id = stream_a.chat.sender().leave("r").await.unwrap();
    assert!(matches!(stream_a.reply(id).await, Event::Left(_)));
    let redis = storage.redis().unwrap();
    eventually("node A to let her go in Redis", || async {
        let on_a = redis.cli(&["SISMEMBER", "confab:{r}:presence:node-0", "alice"]);
        (on_a.trim() == "0").then_some(())
    })
    .await;
    assert_eq!(
        redis.cli(&["HGET", "confab:{r}:presence", "alice"]).trim(),
        "1",
        "one node has her"
    );
    for (i, node) in nodes.iter().enumerate() {
        let viewer = client_at(&node.url(), &format!("viewer{i}")).await;
        let members = common::members(&viewer, "r").await;
        assert!(
            members.contains(&"alice".to_owned()),
            "node {i}: {members:?}"
        );
    }
    stream_b.say("r", "still here").await;
    let seen = events_until(
        &mut watching,
        "alice's message",
        |e| matches!(e, Event::Message(m) if m.text == "still here"),
    )
    .await;
    assert!(
        presence_of(&seen, "alice").is_empty(),
        "no leave while a stream is in"
    );

    // Her last stream goes: one leave.
    drop(stream_b);
    let seen = events_until(
        &mut watching,
        "alice's leave",
        |e| matches!(e, Event::Presence(p) if p.user == "alice"),
    )
    .await;
    assert_eq!(presence_of(&seen, "alice"), [PresenceKind::Left]);
}
