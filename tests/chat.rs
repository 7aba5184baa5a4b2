//! The `Chat` stream end to end: fan-out, order, presence, errors, typing, resume.

mod common;

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use common::{
    Engine, Events, Proxy, TestServer, client_at, command_error, flood,
    flood_past_a_stalled_reader, within,
};
use confab::pb::{
    ChatRequest, OutgoingMessage, PresenceKind, RoomPosition, SubscribeRequest,
    chat_request::Command, chat_response::Event, subscribe_response,
};
use confab_server::Config;
use tonic::Code;

/// Every client sees every message exactly once, in seq order, while several senders
/// send at once; every sender gets an ack with a distinct seq for each of its messages.
async fn every_client_receives_every_message_once_in_seq_order(engine: Engine) {
    const CLIENTS: usize = 4;
    const SENDERS: usize = 3;
    const PER_SENDER: usize = 334; // 1,002 messages in all
    const TOTAL: usize = SENDERS * PER_SENDER;

    let server = TestServer::start_on(engine).await;
    let mut readers = Vec::new();
    let mut senders = Vec::new();
    for i in 0..CLIENTS {
        let client = server.client(&format!("user{i}")).await;
        let mut events = Events::open(&client).await;
        events.join("fanout", None).await;
        let (sender, mut stream) = events.chat.split();
        if i < SENDERS {
            senders.push(sender.clone());
        }
        readers.push(tokio::spawn(async move {
            let _client = client; // keeps the channel open
            let _sender = sender;
            let mut seqs = Vec::new();
            let mut texts = HashSet::new();
            let mut acks = Vec::new();
            while seqs.len() < TOTAL || (i < SENDERS && acks.len() < PER_SENDER) {
                let event = stream
                    .message()
                    .await
                    .expect("stream ok")
                    .expect("stream open");
                match event.event {
                    Some(Event::Message(m)) => {
                        seqs.push(m.seq);
                        assert!(texts.insert(m.text.clone()), "duplicate text {}", m.text);
                    }
                    Some(Event::Ack(ack)) => acks.push(ack.seq),
                    Some(Event::Error(e)) => panic!("unexpected error {e:?}"),
                    _ => {}
                }
            }
            (seqs, texts, acks)
        }));
    }

    let sending: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(s, sender)| {
            tokio::spawn(async move {
                for n in 0..PER_SENDER {
                    sender
                        .say("fanout", &format!("s{s}-m{n}"))
                        .await
                        .expect("send");
                }
            })
        })
        .collect();
    for task in sending {
        within("the senders", task).await.unwrap();
    }

    let expected_texts: HashSet<String> = (0..SENDERS)
        .flat_map(|s| (0..PER_SENDER).map(move |n| format!("s{s}-m{n}")))
        .collect();
    let mut all_acks = Vec::new();
    for reader in readers {
        let (seqs, texts, acks) = within("a reader to get every message", reader)
            .await
            .unwrap();
        assert_eq!(
            seqs,
            (1..=TOTAL as u64).collect::<Vec<_>>(),
            "seqs in order, no gaps, no duplicates"
        );
        assert_eq!(texts, expected_texts);
        all_acks.extend(acks);
    }
    all_acks.sort_unstable();
    assert_eq!(
        all_acks,
        (1..=TOTAL as u64).collect::<Vec<_>>(),
        "one ack per message"
    );
}
on_every_engine!(
    every_client_receives_every_message_once_in_seq_order,
    tokio::test(flavor = "multi_thread", worker_threads = 2)
);

/// A command's reply comes before what the command caused, with many commands in flight:
/// `joined` before the room's history, each `ack` before the sender's own copy of that
/// message, and nothing of the room after `left`.
async fn replies_come_before_what_their_commands_caused(engine: Engine) {
    const MESSAGES: usize = 200;
    let server = TestServer::start_on(engine).await;
    let alice = server.client("alice").await;
    let mut chat = Events::open(&alice).await;
    let sender = chat.chat.sender();
    let join = sender.join("r", None).await.unwrap();
    let mut sent = HashSet::new();
    for n in 0..MESSAGES {
        let (_, client_msg_id) = sender.say("r", &format!("m{n}")).await.unwrap();
        sent.insert(client_msg_id);
    }
    let leave = sender.leave("r").await.unwrap();
    let ping = sender.ping(0).await.unwrap();
    let (mut joined, mut acked, mut left) = (false, HashSet::new(), false);
    within("every reply and message", async {
        loop {
            let event = chat
                .chat
                .next_event()
                .await
                .unwrap()
                .expect("the stream goes on");
            match event.event {
                Some(Event::Joined(_)) if event.request_id == join => joined = true,
                Some(Event::Ack(ack)) => {
                    assert!(sent.contains(&ack.client_msg_id));
                    acked.insert(ack.client_msg_id);
                }
                Some(Event::Message(message)) => {
                    assert!(joined, "a message before `joined`");
                    assert!(!left, "seq {} came after `left`", message.seq);
                    assert!(
                        acked.contains(&message.client_msg_id),
                        "seq {} came before its ack",
                        message.seq
                    );
                }
                Some(Event::Left(_)) if event.request_id == leave => {
                    assert_eq!(acked.len(), MESSAGES, "every ack came before `left`");
                    left = true;
                }
                Some(Event::Pong(_)) if event.request_id == ping => {
                    assert!(left, "`left` before the pong sent after it");
                    return;
                }
                _ => {}
            }
        }
    })
    .await;
}
on_every_engine!(
    replies_come_before_what_their_commands_caused,
    tokio::test(flavor = "multi_thread", worker_threads = 2)
);

/// Joining and leaving are announced to the room, and the member list follows.
async fn presence_is_announced_on_join_and_leave(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    let alice = server.client("alice").await;
    let mut alice_events = Events::open(&alice).await;
    let joined = alice_events.join("den", None).await;
    assert_eq!(joined.members, ["alice"]);

    let bob = server.client("bob").await;
    let mut bob_events = Events::open(&bob).await;
    let joined = bob_events.join("den", None).await;
    assert_eq!(joined.members, ["alice", "bob"]);
    assert_eq!(joined.room.unwrap().member_count, 2);

    let presence = alice_events.presence("bob", PresenceKind::Joined).await;
    let Some(Event::Presence(p)) = presence.event else {
        unreachable!()
    };
    assert_eq!(p.kind(), PresenceKind::Joined);
    assert_eq!(p.room, "den");

    let id = bob_events.chat.sender().leave("den").await.unwrap();
    assert!(matches!(bob_events.reply(id).await, Event::Left(l) if l.room == "den"));
    let presence = alice_events
        .until(
            "bob's leave",
            |e| matches!(&e.event, Some(Event::Presence(p)) if p.user == "bob"),
        )
        .await;
    let Some(Event::Presence(p)) = presence.event else {
        unreachable!()
    };
    assert_eq!(p.kind(), PresenceKind::Left);

    let members = common::members(&alice, "den").await;
    assert_eq!(members, ["alice"]);
}
on_every_engine!(presence_is_announced_on_join_and_leave);

/// A user with two streams in a room stays present until the last one leaves.
async fn presence_counts_streams_not_connections(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    let watcher = server.client("watcher").await;
    let mut watching = Events::open(&watcher).await;
    watching.join("r", None).await;

    let bob = server.client("bob").await;
    let mut first = Events::open(&bob).await;
    let mut second = Events::open(&bob).await;
    first.join("r", None).await;
    second.join("r", None).await;
    drop(first);
    // The second stream is still in: a message from it arrives before any leave event.
    second.say("r", "still here").await;
    let event = watching
        .until("bob's message or leave", |e| {
            matches!(&e.event, Some(Event::Message(_)))
                || matches!(&e.event, Some(Event::Presence(p)) if p.kind() == PresenceKind::Left)
        })
        .await;
    assert!(matches!(event.event, Some(Event::Message(m)) if m.text == "still here"));
    drop(second);
    watching.presence("bob", PresenceKind::Left).await;
}
on_every_engine!(presence_counts_streams_not_connections);

/// A client whose connection is closed without a word (killed process) leaves the room.
async fn a_killed_connection_leaves_the_room(engine: Engine) {
    leaves_when_its_connection_fails(engine, common::config(), Proxy::cut).await;
}
on_every_engine!(a_killed_connection_leaves_the_room);

/// A client whose network goes silent (no FIN, no RST) is found dead by keepalive and
/// leaves the room within a few seconds.
async fn a_silent_connection_is_found_by_keepalive_and_leaves(engine: Engine) {
    let config = Config {
        keepalive_interval: Duration::from_millis(500),
        keepalive_timeout: Duration::from_millis(500),
        ..common::config()
    };
    leaves_when_its_connection_fails(engine, config, Proxy::freeze).await;
}
on_every_engine!(a_silent_connection_is_found_by_keepalive_and_leaves);

/// Bob joins through a proxy, `fail` breaks his connection, and alice sees him leave.
async fn leaves_when_its_connection_fails(
    engine: Engine,
    config: Config,
    fail: impl FnOnce(&Proxy),
) {
    let server = TestServer::with_on(engine, config).await;
    let alice = server.client("alice").await;
    let mut alice_events = Events::open(&alice).await;
    alice_events.join("r", None).await;

    let proxy = Proxy::start(server.addr).await;
    let bob = client_at(&proxy.url(), "bob").await;
    let mut bob_events = Events::open(&bob).await;
    bob_events.join("r", None).await;
    alice_events.presence("bob", PresenceKind::Joined).await;

    fail(&proxy);
    let leave = alice_events.presence("bob", PresenceKind::Left).await;
    assert_eq!(leave.request_id, 0, "a leave is pushed, not a reply");
}

/// Bad commands get an in-band error with the right code and field, and the stream goes on.
async fn bad_commands_get_errors_and_the_stream_goes_on(engine: Engine) {
    let config = Config {
        max_text_bytes: 16,
        ..common::config()
    };
    let server = TestServer::with_on(engine, config).await;
    let alice = server.client("alice").await;
    let mut events = Events::open(&alice).await;
    events.join("here", None).await;
    // A room that exists but is not joined on this stream.
    common::create_room(&alice, "elsewhere").await;
    let sender = events.chat.sender().clone();

    let id = sender.say("nowhere", "hi").await.unwrap().0;
    assert_eq!(
        command_error(events.reply(id).await),
        (Code::NotFound, vec!["send.room".into()])
    );

    let id = sender.say("elsewhere", "hi").await.unwrap().0;
    assert_eq!(
        command_error(events.reply(id).await),
        (Code::FailedPrecondition, vec!["send.room".into()])
    );

    let id = sender.join("Not A Room", None).await.unwrap();
    assert_eq!(
        command_error(events.reply(id).await),
        (Code::InvalidArgument, vec!["join.room".into()])
    );

    let id = sender.join("here", None).await.unwrap();
    assert_eq!(
        command_error(events.reply(id).await),
        (Code::FailedPrecondition, vec!["join.room".into()])
    );

    let id = sender
        .say("here", "this text is longer than sixteen bytes")
        .await
        .unwrap()
        .0;
    assert_eq!(
        command_error(events.reply(id).await),
        (Code::InvalidArgument, vec!["send.text".into()])
    );

    let id = sender.say("here", "   ").await.unwrap().0;
    assert_eq!(
        command_error(events.reply(id).await),
        (Code::InvalidArgument, vec!["send.text".into()])
    );

    let id = sender
        .send(OutgoingMessage {
            room: "here".into(),
            text: "no id".into(),
            client_msg_id: String::new(),
            kind: 0,
        })
        .await
        .unwrap();
    assert_eq!(
        command_error(events.reply(id).await),
        (Code::InvalidArgument, vec!["send.client_msg_id".into()])
    );

    let id = sender
        .send(OutgoingMessage {
            room: "here".into(),
            text: "odd kind".into(),
            client_msg_id: "k".into(),
            kind: 42,
        })
        .await
        .unwrap();
    assert_eq!(
        command_error(events.reply(id).await),
        (Code::InvalidArgument, vec!["send.kind".into()])
    );

    let id = sender.typing("elsewhere", true).await.unwrap();
    assert_eq!(
        command_error(events.reply(id).await),
        (Code::FailedPrecondition, vec!["typing.room".into()])
    );

    let id = sender.leave("elsewhere").await.unwrap();
    assert_eq!(
        command_error(events.reply(id).await),
        (Code::FailedPrecondition, vec!["leave.room".into()])
    );

    sender
        .send_frame(ChatRequest {
            request_id: 9_999,
            command: None,
        })
        .await
        .unwrap();
    assert_eq!(
        command_error(events.reply(9_999).await),
        (Code::InvalidArgument, vec!["command".into()])
    );

    // After all that, the stream still works.
    let seq = events.say("here", "still fine").await;
    assert_eq!(seq, 1);
    assert_eq!(events.message().await.text, "still fine");
}
on_every_engine!(bad_commands_get_errors_and_the_stream_goes_on);

/// Frames sent in one burst (which the server takes as one run where it can) are answered
/// in the order sent: a refused frame between sends keeps its place, each ack comes before
/// the message it acks, a retry within the burst is acked with its original's seq, and the
/// messages take consecutive seqs in the order sent.
async fn a_burst_of_frames_is_answered_in_the_order_sent(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    let client = server.client("alice").await;
    let mut events = Events::open(&client).await;
    events.join("burst", None).await;
    // A room that exists but is not joined on this stream.
    common::create_room(&client, "elsewhere").await;
    let sender = events.chat.sender();
    let say = |id: &str| {
        Some(Command::Send(OutgoingMessage {
            room: "burst".into(),
            text: format!("text of {id}"),
            client_msg_id: id.into(),
            kind: 0,
        }))
    };
    let frames = [
        say("m1"),
        say("m2"),
        None,
        Some(Command::Send(OutgoingMessage {
            room: "elsewhere".into(),
            text: "not joined".into(),
            client_msg_id: "x1".into(),
            kind: 0,
        })),
        say("m3"),
        Some(Command::Ping(confab::pb::Ping {
            client_time_micros: 7,
        })),
        say("m1"),
        say("m4"),
    ];
    for (n, command) in frames.into_iter().enumerate() {
        sender
            .send_frame(ChatRequest {
                request_id: 100 + n as u64,
                command,
            })
            .await
            .unwrap();
    }
    let mut replies = Vec::new();
    let mut order: Vec<String> = Vec::new();
    while replies.len() < 8 || order.iter().filter(|e| e.starts_with("message")).count() < 4 {
        let event = events.next().await;
        let entry = match event.event.expect("an event") {
            Event::Ack(ack) => format!("ack {} {} {}", ack.client_msg_id, ack.seq, ack.duplicate),
            Event::Error(error) => format!("error {}", error.code),
            Event::Pong(pong) => format!("pong {}", pong.client_time_micros),
            Event::Message(m) => {
                order.push(format!("message {} {}", m.client_msg_id, m.seq));
                continue;
            }
            _ => continue,
        };
        order.push(entry.clone());
        replies.push((event.request_id, entry));
    }
    assert_eq!(
        replies,
        vec![
            (100, "ack m1 1 false".to_owned()),
            (101, "ack m2 2 false".to_owned()),
            (102, format!("error {}", Code::InvalidArgument as i32)),
            (103, format!("error {}", Code::FailedPrecondition as i32)),
            (104, "ack m3 3 false".to_owned()),
            (105, "pong 7".to_owned()),
            (106, "ack m1 1 true".to_owned()),
            (107, "ack m4 4 false".to_owned()),
        ]
    );
    let position = |what: &str| order.iter().position(|e| e == what).unwrap();
    for (id, seq) in [("m1", 1), ("m2", 2), ("m3", 3), ("m4", 4)] {
        assert!(
            position(&format!("ack {id} {seq} false")) < position(&format!("message {id} {seq}")),
            "{id}'s ack comes before its message: {order:?}"
        );
    }
    let messages: Vec<_> = order.iter().filter(|e| e.starts_with("message")).collect();
    assert_eq!(
        messages,
        [
            "message m1 1",
            "message m2 2",
            "message m3 3",
            "message m4 4"
        ],
        "each message once, in seq order"
    );
}
on_every_engine!(a_burst_of_frames_is_answered_in_the_order_sent);

/// A frame over the size limit is refused by the transport limit, not read into memory,
/// and the server goes on serving others.
async fn oversized_frames_are_refused_by_the_size_limit(engine: Engine) {
    let config = Config {
        max_message_bytes: 8 * 1024,
        max_text_bytes: 64 * 1024,
        ..common::config()
    };
    let server = TestServer::with_on(engine, config).await;
    let alice = server.client("alice").await;
    let mut events = Events::open(&alice).await;
    events.join("r", None).await;
    let huge = "x".repeat(32 * 1024);
    events.chat.sender().say("r", &huge).await.unwrap();
    let status = events.end_status().await;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");

    let bob = server.client("bob").await;
    let mut bob_events = Events::open(&bob).await;
    bob_events.join("r", None).await;
    assert_eq!(bob_events.say("r", "small is fine").await, 1);
}
on_every_engine!(oversized_frames_are_refused_by_the_size_limit);

/// Typing notices reach the others, not the typist, and are never stored; ping gets pong.
async fn typing_is_ephemeral_and_ping_gets_pong(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    let alice = server.client("alice").await;
    let bob = server.client("bob").await;
    let mut alice_events = Events::open(&alice).await;
    let mut bob_events = Events::open(&bob).await;
    alice_events.join("r", None).await;
    bob_events.join("r", None).await;

    bob_events.chat.sender().typing("r", true).await.unwrap();
    let event = alice_events
        .until("bob typing", |e| matches!(e.event, Some(Event::Typing(_))))
        .await;
    let Some(Event::Typing(typing)) = event.event else {
        unreachable!()
    };
    assert_eq!((typing.user.as_str(), typing.typing), ("bob", true));

    // Bob's own stream: the next thing after his typing notice is his pong, not the notice.
    let id = bob_events.chat.sender().ping(1234).await.unwrap();
    let event = bob_events
        .until("bob's pong or an echoed typing notice", |e| {
            e.request_id == id || matches!(e.event, Some(Event::Typing(_)))
        })
        .await;
    let Some(Event::Pong(pong)) = event.event else {
        panic!("typing echoed to the typist: {event:?}")
    };
    assert_eq!(pong.client_time_micros, 1234);

    let history = alice
        .rpc()
        .get_history(confab::pb::GetHistoryRequest {
            room: "r".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        history.messages.is_empty(),
        "typing was stored: {history:?}"
    );
}
on_every_engine!(typing_is_ephemeral_and_ping_gets_pong);

/// Join without `after_seq` replays the last N messages; with it, exactly those after it.
async fn join_replays_recent_history_or_resumes_after_a_seq(engine: Engine) {
    let config = Config {
        history_on_join: 5,
        ..common::config()
    };
    let server = TestServer::with_on(engine, config).await;
    let alice = server.client("alice").await;
    let mut alice_events = Events::open(&alice).await;
    alice_events.join("r", None).await;
    for n in 1..=20 {
        alice_events.say("r", &format!("m{n}")).await;
    }

    let bob = server.client("bob").await;
    let mut fresh = Events::open(&bob).await;
    let joined = fresh.join("r", None).await;
    assert_eq!(joined.room.unwrap().head_seq, 20);
    assert_eq!(joined.replay_from_seq, 16);
    let replayed: Vec<u64> = futures_collect(&mut fresh, 5).await;
    assert_eq!(replayed, [16, 17, 18, 19, 20]);

    let mut resumed = Events::open(&bob).await;
    let joined = resumed.join("r", Some(12)).await;
    assert_eq!(joined.replay_from_seq, 13);
    alice_events.say("r", "m21").await;
    let replayed: Vec<u64> = futures_collect(&mut resumed, 9).await;
    assert_eq!(replayed, (13..=21).collect::<Vec<_>>());
}
on_every_engine!(join_replays_recent_history_or_resumes_after_a_seq);

async fn futures_collect(events: &mut Events, n: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    while seqs.len() < n {
        seqs.push(events.message().await.seq);
    }
    seqs
}

/// A nickname held by a live session cannot be taken; the holder can reclaim it.
async fn a_live_nickname_cannot_be_taken(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    let mut alice = server.client("alice").await;
    let _stream = Events::open(&alice).await;

    let mut impostor = server.anonymous().await;
    let status = impostor.login("Alice").await.unwrap_err();
    let confab::ClientError::Status(status) = status else {
        panic!("{status:?}")
    };
    assert_eq!(status.code(), Code::AlreadyExists);

    // The holder logging in again with its token keeps the nickname.
    alice
        .login("alice")
        .await
        .expect("the holder reclaims its nickname");
}
on_every_engine!(a_live_nickname_cannot_be_taken);

/// A reader that stops reading while the room floods does not slow the others, and once it
/// reads again it gets every message exactly once, in order: what fell off the ring is read
/// from the store.
/// `rename` moves a live user to another nickname: the rooms of the stream see one rename
/// event, members and messages carry the new name, the old name is free for others, the
/// new token works, and a refused rename changes nothing and ends nothing.
async fn a_live_user_is_renamed_in_place_and_the_rooms_are_told(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    let alice = server.client("alice").await;
    let bob = server.client("bob").await;
    let carol = server.client("carol").await;
    let mut alice_chat = Events::open(&alice).await;
    let mut bob_chat = Events::open(&bob).await;
    let mut carol_chat = Events::open(&carol).await;
    alice_chat.join("lobby", None).await;
    bob_chat.join("lobby", None).await;
    carol_chat.join("lobby", None).await;

    // Taken by bob: refused, naming the field; alice is still alice, and chats on.
    let id = alice_chat.chat.sender().rename("Bob").await.unwrap();
    let (code, fields) = common::command_error(alice_chat.reply(id).await);
    assert_eq!((code, fields), (Code::AlreadyExists, vec![]));
    alice_chat.say("lobby", "still alice").await;
    assert_eq!(bob_chat.message().await.sender, "alice");

    let id = alice_chat.chat.sender().rename("Alicia").await.unwrap();
    let renamed = match alice_chat.reply(id).await {
        Event::Renamed(renamed) => renamed,
        other => panic!("expected renamed, got {other:?}"),
    };
    assert_eq!(renamed.nickname, "Alicia");
    let told = bob_chat
        .until(
            "the rename",
            |e| matches!(&e.event, Some(Event::Presence(p)) if p.kind() == PresenceKind::Renamed),
        )
        .await;
    let Some(Event::Presence(presence)) = told.event else {
        unreachable!()
    };
    assert_eq!(
        (presence.previous.as_str(), presence.user.as_str()),
        ("alice", "Alicia")
    );

    alice_chat.say("lobby", "as alicia").await;
    assert_eq!(bob_chat.message().await.sender, "Alicia");
    let members = common::members(&bob, "lobby").await;
    assert_eq!(members, ["Alicia", "bob", "carol"]);

    // The new token speaks for the new name; the old name is free for someone else.
    let mut again = server.anonymous().await;
    again.set_token(&renamed.token).unwrap();
    let room = again
        .rpc()
        .get_room(confab::pb::GetRoomRequest {
            room: "lobby".into(),
        })
        .await;
    assert!(room.is_ok(), "{room:?}");
    let newcomer = server.client("alice").await;
    assert_eq!(newcomer.nickname(), Some("alice"));
}
on_every_engine!(a_live_user_is_renamed_in_place_and_the_rooms_are_told);

async fn a_stalled_reader_catches_up_without_loss_or_duplicates(engine: Engine) {
    const MESSAGES: u64 = 20_000;
    let config = Config {
        ring_capacity: 16,
        ..common::config()
    };
    let server = TestServer::with_on(engine, config).await;
    let (_stalled_client, mut stalled, publishing) =
        flood_past_a_stalled_reader(&server, MESSAGES).await;
    let summary = within("the batch", publishing)
        .await
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(summary.accepted, MESSAGES as u32);

    assert_eq!(
        stalled.seqs(MESSAGES as usize).await,
        (1..=MESSAGES).collect::<Vec<_>>()
    );
}
on_every_engine!(
    a_stalled_reader_catches_up_without_loss_or_duplicates,
    tokio::test(flavor = "multi_thread", worker_threads = 2)
);

/// A stream in more rooms than `CursorSet` polls directly (each room then wakes it through a
/// waker of its own) gets every room's messages once and in order while all of them flood
/// at once; so does a subscription to as many rooms; and the stream keeps doing so after it
/// leaves most rooms (direct polling) and joins them again (queued polling).
async fn a_stream_in_many_rooms_gets_each_rooms_messages_once_in_order(engine: Engine) {
    const ROOMS: usize = 12;
    const PER_ROOM: u64 = 100;
    const MORE: u64 = 10;
    let server = TestServer::start_on(engine).await;
    let reader = server.client("reader").await;
    let mut chat = Events::open(&reader).await;
    let rooms: Vec<String> = (0..ROOMS).map(|r| format!("room-{r}")).collect();
    for room in &rooms {
        chat.join(room, None).await;
    }
    let tailer = server.client("tailer").await;
    let mut tail = tailer
        .rpc()
        .subscribe(SubscribeRequest {
            rooms: rooms
                .iter()
                .map(|room| RoomPosition {
                    room: room.clone(),
                    after_seq: Some(0),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .expect("subscribe")
        .into_inner();

    // Reads `n` messages and returns each room's seqs in the order they came.
    async fn by_room(chat: &mut Events, n: u64) -> HashMap<String, Vec<u64>> {
        let mut seqs: HashMap<String, Vec<u64>> = HashMap::new();
        for _ in 0..n {
            let message = chat.message().await;
            seqs.entry(message.room.clone())
                .or_default()
                .push(message.seq);
        }
        seqs
    }
    let publisher = server.client("publisher").await;
    let floods: Vec<_> = rooms
        .iter()
        .map(|room| flood(publisher.clone(), room, PER_ROOM))
        .collect();
    let seen = by_room(&mut chat, ROOMS as u64 * PER_ROOM).await;
    let mut tailed: HashMap<String, Vec<u64>> = HashMap::new();
    for _ in 0..ROOMS as u64 * PER_ROOM {
        let event = within("the subscription", tail.message())
            .await
            .expect("subscription ok")
            .expect("subscription open");
        match event.event {
            Some(subscribe_response::Event::Message(m)) => {
                tailed.entry(m.room.clone()).or_default().push(m.seq)
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    for room in &rooms {
        let all: Vec<u64> = (1..=PER_ROOM).collect();
        assert_eq!(seen[room], all, "{room} on the chat stream");
        assert_eq!(tailed[room], all, "{room} on the subscription");
    }
    for flooding in floods {
        flooding.await.unwrap().unwrap();
    }

    // Down to three rooms: polled directly.
    for room in &rooms[3..] {
        let id = chat.chat.sender().leave(room).await.unwrap();
        assert!(matches!(chat.reply(id).await, Event::Left(_)));
    }
    let again = server.client("again").await;
    let floods: Vec<_> = rooms[..3]
        .iter()
        .map(|room| flood(again.clone(), room, MORE))
        .collect();
    let seen = by_room(&mut chat, 3 * MORE).await;
    for room in &rooms[..3] {
        assert_eq!(
            seen[room],
            (PER_ROOM + 1..=PER_ROOM + MORE).collect::<Vec<_>>()
        );
    }
    for flooding in floods {
        flooding.await.unwrap().unwrap();
    }

    // And back past four, resuming where the stream left each room.
    for room in &rooms[3..] {
        chat.join(room, Some(PER_ROOM)).await;
    }
    let last = server.client("last").await;
    let floods: Vec<_> = rooms
        .iter()
        .map(|room| flood(last.clone(), room, MORE))
        .collect();
    let seen = by_room(&mut chat, ROOMS as u64 * MORE).await;
    for (r, room) in rooms.iter().enumerate() {
        let first = if r < 3 { PER_ROOM + MORE } else { PER_ROOM } + 1;
        assert_eq!(
            seen[room],
            (first..first + MORE).collect::<Vec<_>>(),
            "{room}"
        );
    }
    for flooding in floods {
        flooding.await.unwrap().unwrap();
    }
}
on_every_engine!(
    a_stream_in_many_rooms_gets_each_rooms_messages_once_in_order,
    tokio::test(flavor = "multi_thread", worker_threads = 2)
);

/// Many clients joining a room that does not exist yet, all at once (each join may be the
/// one that makes it): the room is made once and every reader gets every message.
async fn a_room_made_by_concurrent_joins_feeds_everyone(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    common::joins_at_once_make_one_room(&[&server]).await;
}
on_every_engine!(
    a_room_made_by_concurrent_joins_feeds_everyone,
    tokio::test(flavor = "multi_thread", worker_threads = 2)
);
