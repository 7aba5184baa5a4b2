//! Durability and lossless delivery under faults: kill -9, dropped connections, stalled
//! readers, restarts, retention.

mod common;
#[path = "common/process.rs"]
mod process;

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use common::{
    Engine, Events, Proxy, Storage, TestServer,
    conversation::{acked, connected, converse, history, until},
    flood_past_a_stalled_reader, metric, metrics_until, subscribe, within,
};
use confab::{
    Client, ConnectionState,
    pb::{self, chat_response::Event},
};
use confab_server::Config;
use process::ServerProcess;
use tonic::Code;

/// Kill -9 mid-stream and restart on the same data dir: every acked message is there
/// exactly once with its seq, no seq is reused, and the messages the client library sent
/// again after the restart land exactly once.
async fn acked_messages_survive_kill_9_and_retries_land_once(engine: Engine) {
    const USERS: usize = 3;
    const PER_USER: usize = 200;
    let storage = Storage::new(engine);
    let mut server = ServerProcess::start_on(&storage, "127.0.0.1:0");
    let addr = server.addr.to_string();

    let users: Vec<_> = (0..USERS)
        .map(|u| converse(&server.url, &format!("user{u}")))
        .collect();
    for (_, seen) in &users {
        until("every user to connect", || connected(seen)).await;
    }
    // id → text, for every message sent.
    let mut sent: HashMap<String, String> = HashMap::new();
    for (u, (conversation, _)) in users.iter().enumerate() {
        for n in 0..PER_USER / 2 {
            let text = format!("user{u} message {n}");
            sent.insert(conversation.say("r", &text).await.unwrap(), text);
        }
    }
    until("some acks before the crash", || {
        acked(&users) >= USERS * PER_USER / 4
    })
    .await;

    // The second half goes out while the server dies under it.
    for (u, (conversation, _)) in users.iter().enumerate() {
        for n in PER_USER / 2..PER_USER {
            let text = format!("user{u} message {n}");
            sent.insert(conversation.say("r", &text).await.unwrap(), text);
        }
    }
    let acked_before_crash: HashMap<String, u64> = users
        .iter()
        .flat_map(|(_, s)| s.lock().unwrap().acks.clone())
        .collect();
    server.kill();
    assert!(!acked_before_crash.is_empty());

    let _restarted = ServerProcess::start_on(&storage, &addr);
    until("every message to be acked after the restart", || {
        acked(&users) == USERS * PER_USER
    })
    .await;

    let mut reader = Client::connect(&format!("http://{addr}")).await.unwrap();
    reader.login("auditor").await.unwrap();
    let stored = history(&reader, "r").await;
    let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=(USERS * PER_USER) as u64).collect::<Vec<_>>(),
        "no hole, no reuse"
    );
    let by_id: HashMap<&str, &pb::ChatMessage> = stored
        .iter()
        .map(|m| (m.client_msg_id.as_str(), m))
        .collect();
    assert_eq!(
        by_id.len(),
        USERS * PER_USER,
        "every message stored exactly once"
    );
    for (id, text) in &sent {
        assert_eq!(&by_id[id.as_str()].text, text);
    }
    for (id, seq) in &acked_before_crash {
        assert_eq!(
            by_id[id.as_str()].seq,
            *seq,
            "an acked message kept its seq"
        );
    }
    for (_, seen) in &users {
        for (id, seq) in &seen.lock().unwrap().acks {
            assert_eq!(
                by_id[id.as_str()].seq,
                *seq,
                "every ack names the stored seq"
            );
        }
    }
    // And every reader got every message, across the crash, once each, in order.
    for (_, seen) in &users {
        until("every reader to get every message", || {
            seen.lock().unwrap().seqs.len() >= USERS * PER_USER
        })
        .await;
        assert_eq!(seen.lock().unwrap().seqs, seqs);
    }
}
on_every_engine!(
    acked_messages_survive_kill_9_and_retries_land_once,
    tokio::test(flavor = "multi_thread", worker_threads = 2)
);

/// A client whose connection drops while others keep sending reconnects by itself and
/// receives every message exactly once, in order.
async fn a_dropped_client_resumes_without_loss_or_duplicates(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    let proxy = Proxy::start(server.addr).await;
    let (_bob, bob_seen) = converse(&proxy.url(), "bob");
    let (alice, alice_seen) = converse(&server.url(), "alice");
    let (carol, carol_seen) = converse(&server.url(), "carol");
    for seen in [&bob_seen, &alice_seen, &carol_seen] {
        until("everyone to connect", || connected(seen)).await;
    }

    for n in 0..300 {
        alice.say("r", &format!("alice {n}")).await.unwrap();
        carol.say("r", &format!("carol {n}")).await.unwrap();
    }
    until("bob to read some", || {
        bob_seen.lock().unwrap().seqs.len() >= 200
    })
    .await;
    proxy.cut();
    until("bob to notice", || {
        bob_seen
            .lock()
            .unwrap()
            .states
            .iter()
            .any(|s| matches!(s, ConnectionState::Disconnected { .. }))
    })
    .await;
    // These are sent while bob is away.
    for n in 300..500 {
        alice.say("r", &format!("alice {n}")).await.unwrap();
        carol.say("r", &format!("carol {n}")).await.unwrap();
    }
    until("bob to get all 1,000", || {
        bob_seen.lock().unwrap().seqs.len() >= 1000
    })
    .await;

    let seen = bob_seen.lock().unwrap();
    assert_eq!(seen.seqs, (1..=1000).collect::<Vec<_>>());
    let after_drop = seen
        .states
        .iter()
        .skip_while(|s| !matches!(s, ConnectionState::Disconnected { .. }))
        .find(|s| matches!(s, ConnectionState::Connected { .. }));
    assert_eq!(
        after_drop,
        Some(&ConnectionState::Connected {
            resume_complete: true
        })
    );
}
on_every_engine!(
    a_dropped_client_resumes_without_loss_or_duplicates,
    tokio::test(flavor = "multi_thread", worker_threads = 2)
);

/// The stall timeout of the stalled-reader tests. Long against a loaded machine's
/// scheduling hiccups, so that a brisk reader is never taken for a stalled one; the
/// stalled reader reads nothing until the server has cut it off, so that the flood need
/// not outlast it.
const STALL: Duration = Duration::from_secs(1);

/// Waits until the server has ended a stream whose client stopped reading.
async fn until_a_stalled_stream_is_ended(server: &TestServer) {
    metrics_until(
        server.metrics_addr,
        "a stalled stream to be ended",
        |page| metric(page, "confab_slow_reader_disconnects_total") >= 1.0,
    )
    .await;
}

/// One reader stops reading while 20,000 messages flow: the others get all of them; the
/// stalled one is ended with RESOURCE_EXHAUSTED, resumes from its last seq, and ends up
/// with all of them, in order, once each.
async fn a_stalled_reader_is_ended_and_resumes_without_loss(engine: Engine) {
    const MESSAGES: u64 = 20_000;
    let config = Config {
        stall_timeout: STALL,
        ..common::config()
    };
    let server = TestServer::with_on(engine, config).await;
    let (stalled_client, mut stalled, publishing) =
        flood_past_a_stalled_reader(&server, MESSAGES).await;
    within("the batch", publishing).await.unwrap().unwrap();
    until_a_stalled_stream_is_ended(&server).await;

    // The stalled reader reads what reached it, then learns it was cut off.
    let mut got = Vec::new();
    let status = within("the stalled stream's end", async {
        loop {
            match stalled.chat.next_event().await {
                Ok(Some(event)) => {
                    if let Some(Event::Message(m)) = event.event {
                        got.push(m.seq);
                    }
                }
                Ok(None) => panic!("the stalled stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!((got.len() as u64) < MESSAGES);

    let mut resumed = Events::open(&stalled_client).await;
    resumed.join("flood", got.last().copied()).await;
    while got.len() < MESSAGES as usize {
        got.push(resumed.message().await.seq);
    }
    assert_eq!(got, (1..=MESSAGES).collect::<Vec<_>>());
}
on_every_engine!(
    a_stalled_reader_is_ended_and_resumes_without_loss,
    tokio::test(flavor = "multi_thread", worker_threads = 2)
);

/// The same for a `Subscribe` stream: one that is not read while 20,000 messages flow is
/// ended with RESOURCE_EXHAUSTED after what reached it, and a new one from its last seq
/// brings every message, in order, once each.
async fn a_stalled_subscription_is_ended_and_resumes_without_loss(engine: Engine) {
    const MESSAGES: u64 = 20_000;
    let config = Config {
        stall_timeout: STALL,
        ..common::config()
    };
    let server = TestServer::with_on(engine, config).await;
    let brisk_client = server.client("brisk").await;
    let mut brisk = Events::open(&brisk_client).await;
    brisk.join("flood", None).await;
    let reader = server.client("reader").await;
    let mut stalled = subscribe(&reader, "flood", None).await;
    let publishing = common::flood(server.client("publisher").await, "flood", MESSAGES);
    assert_eq!(
        brisk.seqs(MESSAGES as usize).await,
        (1..=MESSAGES).collect::<Vec<_>>(),
        "the brisk reader keeps up while the subscription reads nothing"
    );
    within("the batch", publishing).await.unwrap().unwrap();
    until_a_stalled_stream_is_ended(&server).await;

    let mut got = Vec::new();
    let status = within("the stalled subscription's end", async {
        loop {
            match stalled.message().await {
                Ok(Some(response)) => {
                    if let Some(pb::subscribe_response::Event::Message(m)) = response.event {
                        got.push(m.seq);
                    }
                }
                Ok(None) => panic!("the stalled subscription ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!((got.len() as u64) < MESSAGES);

    let mut resumed = subscribe(&reader, "flood", got.last().copied()).await;
    while got.len() < MESSAGES as usize {
        let response = within("the resumed subscription", resumed.message())
            .await
            .expect("the resumed subscription")
            .expect("the resumed subscription ended");
        if let Some(pb::subscribe_response::Event::Message(m)) = response.event {
            got.push(m.seq);
        }
    }
    assert_eq!(got, (1..=MESSAGES).collect::<Vec<_>>());
}
on_every_engine!(
    a_stalled_subscription_is_ended_and_resumes_without_loss,
    tokio::test(flavor = "multi_thread", worker_threads = 2)
);

/// A retried client_msg_id is stored once and acked with the original seq, also after a
/// restart, on Chat, Publish and PublishBatch alike.
async fn retries_are_stored_once_even_after_a_restart(engine: Engine) {
    let storage = Storage::new(engine);
    let config = storage.apply(common::config());
    let server = TestServer::on("127.0.0.1:0", config.clone()).await;
    let alice = server.client("alice").await;
    let mut chat = Events::open(&alice).await;
    chat.join("r", None).await;
    let message = |text: &str, id: &str| pb::OutgoingMessage {
        room: "r".into(),
        text: text.into(),
        client_msg_id: id.into(),
        kind: 0,
    };
    let id = chat
        .chat
        .sender()
        .send(message("first", "id-1"))
        .await
        .unwrap();
    assert!(matches!(chat.reply(id).await, Event::Ack(a) if a.seq == 1 && !a.duplicate));
    // A retry straight away, while the original may still be committing.
    let id = chat
        .chat
        .sender()
        .send(message("first", "id-1"))
        .await
        .unwrap();
    assert!(matches!(chat.reply(id).await, Event::Ack(a) if a.seq == 1 && a.duplicate));
    drop(chat);
    server.stop().await.unwrap();

    let server = TestServer::on("127.0.0.1:0", config).await;
    let alice = server.client("alice").await;
    let reply = alice
        .rpc()
        .publish(pb::PublishRequest {
            message: Some(message("first", "id-1")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply,
        pb::PublishResponse {
            seq: 1,
            duplicate: true
        }
    );

    let mut chat = Events::open(&alice).await;
    chat.join("r", None).await;
    let id = chat
        .chat
        .sender()
        .send(message("first", "id-1"))
        .await
        .unwrap();
    assert!(matches!(chat.reply(id).await, Event::Ack(a) if a.seq == 1 && a.duplicate));

    let batch = [message("first", "id-1"), message("second", "id-2")]
        .map(|m| pb::PublishBatchRequest { message: Some(m) });
    let summary = alice
        .rpc()
        .publish_batch(futures::stream::iter(batch))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.accepted, 2);
    assert_eq!(
        summary.seq_ranges,
        [pb::RoomSeqRange {
            room: "r".into(),
            first_seq: 1,
            last_seq: 2
        }]
    );
    let texts: Vec<String> = history(&alice, "r")
        .await
        .into_iter()
        .map(|m| m.text.clone())
        .collect();
    assert_eq!(texts, ["first", "second"]);
}
on_every_engine!(retries_are_stored_once_even_after_a_restart);

/// With a small retention limit, a resume from an old seq gets an explicit gap event and
/// then the retained messages; history and Subscribe report the gap too.
async fn resuming_past_retention_reports_the_gap(engine: Engine) {
    let config = Config {
        retention_messages: Some(10),
        retention_interval: Duration::from_millis(50),
        ..common::config()
    };
    let server = TestServer::with_on(engine, config).await;
    let alice = server.client("alice").await;
    alice
        .rpc()
        .create_room(pb::CreateRoomRequest {
            room: "r".into(),
            topic: String::new(),
            private: false,
        })
        .await
        .unwrap();
    for n in 1..=50 {
        alice
            .rpc()
            .publish(pb::PublishRequest {
                message: Some(pb::OutgoingMessage {
                    room: "r".into(),
                    text: format!("m{n}"),
                    client_msg_id: n.to_string(),
                    kind: 0,
                }),
            })
            .await
            .unwrap();
    }
    // Retention runs in the background; wait until it has.
    let page = within("retention to run", async {
        loop {
            let page = alice
                .rpc()
                .get_history(pb::GetHistoryRequest {
                    room: "r".into(),
                    page_size: 100,
                    direction: pb::HistoryDirection::Forward as i32,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            if page.messages.len() == 10 {
                return page;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        page.gap,
        Some(pb::HistoryGap {
            room: "r".into(),
            from_seq: 1,
            to_seq: 40,
            ..Default::default()
        })
    );
    assert_eq!(page.messages.first().map(|m| m.seq), Some(41));

    let mut chat = Events::open(&alice).await;
    chat.join("r", Some(5)).await;
    let event = chat
        .until("the gap", |e| {
            matches!(e.event, Some(Event::Gap(_)) | Some(Event::Message(_)))
        })
        .await;
    assert_eq!(
        event.event,
        Some(Event::Gap(pb::HistoryGap {
            room: "r".into(),
            from_seq: 6,
            to_seq: 40,
            ..Default::default()
        }))
    );
    let mut seqs = Vec::new();
    while seqs.len() < 10 {
        seqs.push(chat.message().await.seq);
    }
    assert_eq!(seqs, (41..=50).collect::<Vec<_>>());

    let mut tail = subscribe(&alice, "r", Some(0)).await;
    let first = within("the subscription's gap", tail.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first.event,
        Some(pb::subscribe_response::Event::Gap(pb::HistoryGap {
            room: "r".into(),
            from_seq: 1,
            to_seq: 40,
            ..Default::default()
        }))
    );
    let texts: HashSet<String> = history(&alice, "r")
        .await
        .into_iter()
        .map(|m| m.text.clone())
        .collect();
    assert_eq!(texts.len(), 10);
}
on_every_engine!(resuming_past_retention_reports_the_gap);

/// A session token stays valid across a restart on the same data dir (the signing secret
/// is kept there), and an expired token is refused.
async fn tokens_outlive_a_restart_and_expire(engine: Engine) {
    let storage = Storage::new(engine);
    let config = storage.apply(common::config());
    let server = TestServer::on("127.0.0.1:0", config.clone()).await;
    let token = server.client("alice").await.token().unwrap().to_owned();
    server.stop().await.unwrap();

    let server = TestServer::on("127.0.0.1:0", config).await;
    let mut alice = server.anonymous().await;
    alice.set_token(&token).unwrap();
    alice
        .rpc()
        .list_rooms(pb::ListRoomsRequest::default())
        .await
        .expect("the old token is still good");

    let short_lived = TestServer::with_on(
        engine,
        Config {
            token_ttl: Duration::ZERO,
            ..common::config()
        },
    )
    .await;
    let bob = short_lived.client("bob").await;
    let status = bob
        .rpc()
        .list_rooms(pb::ListRoomsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("expired"), "{status:?}");
}
on_every_engine!(tokens_outlive_a_restart_and_expire);
