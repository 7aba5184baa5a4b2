//! The other RPCs end to end: Subscribe, Publish, PublishBatch, rooms, members, history
//! pagination, and what every call does without credentials.

mod common;

use common::{Engine, TestServer, fields, violated_fields, within};
use confab::{
    Client,
    pb::{self, HistoryDirection, subscribe_response::Event},
};
use tonic::Code;

fn outgoing(room: &str, text: &str, id: &str) -> pb::OutgoingMessage {
    pb::OutgoingMessage {
        room: room.into(),
        text: text.into(),
        client_msg_id: id.into(),
        kind: 0,
    }
}

async fn publish(client: &Client, room: &str, text: &str, id: &str) -> pb::PublishResponse {
    client
        .rpc()
        .publish(pb::PublishRequest {
            message: Some(outgoing(room, text, id)),
        })
        .await
        .expect("publish")
        .into_inner()
}

async fn create(client: &Client, room: &str) {
    client
        .rpc()
        .create_room(pb::CreateRoomRequest {
            room: room.into(),
            topic: format!("all about {room}"),
            private: false,
        })
        .await
        .expect("create room");
}

/// Publish assigns seqs; a retry with the same client_msg_id gets the original seq.
async fn publish_assigns_seqs_and_deduplicates_retries(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    let bot = server.client("bot").await;
    create(&bot, "news").await;
    assert_eq!(
        publish(&bot, "news", "one", "a").await,
        pb::PublishResponse {
            seq: 1,
            duplicate: false
        }
    );
    assert_eq!(
        publish(&bot, "news", "two", "b").await,
        pb::PublishResponse {
            seq: 2,
            duplicate: false
        }
    );
    assert_eq!(
        publish(&bot, "news", "one", "a").await,
        pb::PublishResponse {
            seq: 1,
            duplicate: true
        }
    );

    // The same key from someone else is their own message.
    let other = server.client("other").await;
    assert_eq!(publish(&other, "news", "mine", "a").await.seq, 3);

    let status = bot
        .rpc()
        .publish(pb::PublishRequest {
            message: Some(outgoing("missing", "hi", "c")),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(violated_fields(&status), ["message.room"]);

    let status = bot
        .rpc()
        .publish(pb::PublishRequest {
            message: Some(outgoing("news", "", "d")),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["message.text"]);

    let status = bot
        .rpc()
        .publish(pb::PublishRequest { message: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["message"]);
}
on_every_engine!(publish_assigns_seqs_and_deduplicates_retries);

/// A batch stores the good messages, reports each bad one by index with its reason, and
/// gives the seq range per room.
async fn publish_batch_summarises_accepted_rejected_and_ranges(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    let importer = server.client("importer").await;
    create(&importer, "a").await;
    create(&importer, "b").await;
    let batch = vec![
        outgoing("a", "a1", "1"),
        outgoing("b", "b1", "2"),
        outgoing("nope", "lost", "3"),
        outgoing("a", "a2", "4"),
        outgoing("a", "", "5"),
        outgoing("a", "a1 again", "1"), // a retry of the first: accepted, not stored twice
        outgoing("b", "b2", "6"),
    ];
    let summary = importer
        .rpc()
        .publish_batch(futures::stream::iter(
            batch
                .into_iter()
                .map(|m| pb::PublishBatchRequest { message: Some(m) }),
        ))
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(summary.accepted, 5);
    let rejected: Vec<(u32, String, Code, Vec<String>)> = summary
        .rejected
        .iter()
        .map(|r| {
            let error = r.error.clone().unwrap();
            (
                r.index,
                r.client_msg_id.clone(),
                Code::from(error.code),
                fields(&error),
            )
        })
        .collect();
    assert_eq!(
        rejected,
        [
            (2, "3".into(), Code::NotFound, vec!["message.room".into()]),
            (
                4,
                "5".into(),
                Code::InvalidArgument,
                vec!["message.text".into()]
            ),
        ]
    );
    assert_eq!(
        summary.seq_ranges,
        [
            pb::RoomSeqRange {
                room: "a".into(),
                first_seq: 1,
                last_seq: 2
            },
            pb::RoomSeqRange {
                room: "b".into(),
                first_seq: 1,
                last_seq: 2
            },
        ]
    );
    let room = importer
        .rpc()
        .get_room(pb::GetRoomRequest { room: "a".into() })
        .await
        .unwrap()
        .into_inner()
        .room
        .unwrap();
    assert_eq!(room.head_seq, 2, "the retry was not stored again");
}
on_every_engine!(publish_batch_summarises_accepted_rejected_and_ranges);

/// Subscribe replays after the given seq, then delivers live messages, for several rooms.
async fn subscribe_replays_from_a_seq_then_goes_live(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    let bot = server.client("bot").await;
    create(&bot, "one").await;
    create(&bot, "two").await;
    for n in 1..=10 {
        publish(&bot, "one", &format!("one-{n}"), &format!("o{n}")).await;
    }
    publish(&bot, "two", "two-1", "t1").await;

    let reader = server.client("reader").await;
    let mut tail = reader
        .rpc()
        .subscribe(pb::SubscribeRequest {
            rooms: vec![
                pb::RoomPosition {
                    room: "one".into(),
                    after_seq: Some(6),
                    ..Default::default()
                },
                pb::RoomPosition {
                    room: "two".into(),
                    after_seq: None,
                    ..Default::default()
                },
            ],
        })
        .await
        .expect("subscribe")
        .into_inner();
    publish(&bot, "one", "one-11", "o11").await;
    publish(&bot, "two", "two-2", "t2").await;

    let mut one = Vec::new();
    let mut two = Vec::new();
    while one.len() < 5 || two.is_empty() {
        let event = within("subscription events", tail.message())
            .await
            .unwrap()
            .unwrap();
        match event.event {
            Some(Event::Message(m)) if m.room == "one" => one.push(m.seq),
            Some(Event::Message(m)) => two.push(m.text.clone()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(one, [7, 8, 9, 10, 11]);
    assert_eq!(two, ["two-2"], "no after_seq means live messages only");
}
on_every_engine!(subscribe_replays_from_a_seq_then_goes_live);

/// Subscribe refuses unknown rooms, bad names, duplicates and empty requests up front.
async fn subscribe_checks_its_rooms(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    let reader = server.client("reader").await;
    create(&reader, "real").await;
    let cases = [
        (vec![], Code::InvalidArgument, "rooms"),
        (vec!["ghost"], Code::NotFound, "rooms[0].room"),
        (vec!["real", "Bad!"], Code::InvalidArgument, "rooms[1].room"),
        (vec!["real", "real"], Code::InvalidArgument, "rooms[1].room"),
    ];
    for (rooms, code, field) in cases {
        let status = reader
            .rpc()
            .subscribe(pb::SubscribeRequest {
                rooms: rooms
                    .iter()
                    .map(|r| pb::RoomPosition {
                        room: r.to_string(),
                        after_seq: Some(0),
                        ..Default::default()
                    })
                    .collect(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), violated_fields(&status)),
            (code, vec![field.to_string()]),
            "{rooms:?}"
        );
    }
}
on_every_engine!(subscribe_checks_its_rooms);

/// Rooms: create, get, ALREADY_EXISTS, NOT_FOUND, and pagination by name.
async fn rooms_are_created_described_and_listed_in_pages(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    let admin = server.client("admin").await;
    for n in 0..25 {
        create(&admin, &format!("room-{n:02}")).await;
    }
    let status = admin
        .rpc()
        .create_room(pb::CreateRoomRequest {
            room: "room-00".into(),
            topic: String::new(),
            private: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    let status = admin
        .rpc()
        .create_room(pb::CreateRoomRequest {
            room: "topical".into(),
            topic: "x".repeat(600),
            private: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), violated_fields(&status)),
        (Code::InvalidArgument, vec!["topic".into()])
    );

    let room = admin
        .rpc()
        .get_room(pb::GetRoomRequest {
            room: "room-07".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .room
        .unwrap();
    assert_eq!(
        (room.topic.as_str(), room.created_by.as_str()),
        ("all about room-07", "admin")
    );
    let status = admin
        .rpc()
        .get_room(pb::GetRoomRequest {
            room: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), violated_fields(&status)),
        (Code::NotFound, vec!["room".into()])
    );

    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = admin
            .rpc()
            .list_rooms(pb::ListRoomsRequest {
                page_size: 10,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.rooms.len() <= 10);
        names.extend(page.rooms.into_iter().map(|r| r.name));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        names,
        (0..25).map(|n| format!("room-{n:02}")).collect::<Vec<_>>()
    );

    for (request, field) in [
        (
            pb::ListRoomsRequest {
                page_size: -1,
                page_token: String::new(),
            },
            "page_size",
        ),
        (
            pb::ListRoomsRequest {
                page_size: 10,
                page_token: "garbage".into(),
            },
            "page_token",
        ),
    ] {
        let status = admin.rpc().list_rooms(request).await.unwrap_err();
        assert_eq!(
            (status.code(), violated_fields(&status)),
            (Code::InvalidArgument, vec![field.into()])
        );
    }
}
on_every_engine!(rooms_are_created_described_and_listed_in_pages);

/// History pages walk backward (newest first, the way a client scrolls) and forward (the
/// way an exporter reads), each page in ascending seq order, with no overlap and no hole.
async fn history_pages_walk_both_directions(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    let bot = server.client("bot").await;
    create(&bot, "log").await;
    for n in 1..=120 {
        publish(&bot, "log", &format!("line {n}"), &n.to_string()).await;
    }
    let read_all = |direction: HistoryDirection, start_seq: Option<u64>| {
        let bot = bot.clone();
        async move {
            let mut pages = Vec::new();
            let mut token = String::new();
            loop {
                let page = bot
                    .rpc()
                    .get_history(pb::GetHistoryRequest {
                        room: "log".into(),
                        page_size: 50,
                        page_token: token,
                        direction: direction as i32,
                        start_seq,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                pages.push(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>());
                token = page.next_page_token;
                if token.is_empty() {
                    return pages;
                }
            }
        }
    };
    let span = |a: u64, b: u64| (a..=b).collect::<Vec<_>>();
    assert_eq!(
        read_all(HistoryDirection::Backward, None).await,
        [span(71, 120), span(21, 70), span(1, 20)]
    );
    assert_eq!(
        read_all(HistoryDirection::Forward, None).await,
        [span(1, 50), span(51, 100), span(101, 120)]
    );
    assert_eq!(
        read_all(HistoryDirection::Backward, Some(31)).await,
        [span(1, 30)]
    );
    assert_eq!(
        read_all(HistoryDirection::Forward, Some(90)).await,
        [span(91, 120)]
    );
    // Unspecified reads backward.
    assert_eq!(
        read_all(HistoryDirection::Unspecified, Some(3)).await,
        [span(1, 2)]
    );

    let first = bot
        .rpc()
        .get_history(pb::GetHistoryRequest {
            room: "log".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.messages[0].text, "line 120");
    // A token is bound to its room.
    create(&bot, "other").await;
    let status = bot
        .rpc()
        .get_history(pb::GetHistoryRequest {
            room: "other".into(),
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), violated_fields(&status)),
        (Code::InvalidArgument, vec!["page_token".into()])
    );
    let status = bot
        .rpc()
        .get_history(pb::GetHistoryRequest {
            room: "log".into(),
            direction: 7,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), violated_fields(&status)),
        (Code::InvalidArgument, vec!["direction".into()])
    );
}
on_every_engine!(history_pages_walk_both_directions);

/// Members are listed in nickname order, a page at a time.
async fn members_are_listed_in_pages(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    let mut streams = Vec::new();
    for n in 0..7 {
        let client = server.client(&format!("member{n}")).await;
        let mut events = common::Events::open(&client).await;
        events.join("club", None).await;
        streams.push((client, events));
    }
    let reader = &streams[0].0;
    let mut members = Vec::new();
    let mut token = String::new();
    loop {
        let page = reader
            .rpc()
            .list_members(pb::ListMembersRequest {
                room: "club".into(),
                page_size: 3,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.members.len() <= 3);
        members.extend(page.members);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(
        members,
        (0..7).map(|n| format!("member{n}")).collect::<Vec<_>>()
    );
}
on_every_engine!(members_are_listed_in_pages);

/// Every call but Login needs a token; a forged or foreign token is refused.
async fn every_call_but_login_needs_a_valid_token(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    let anonymous = server.anonymous().await;
    let rpc = anonymous.rpc();
    let codes = [
        rpc.clone()
            .list_rooms(pb::ListRoomsRequest::default())
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
        rpc.clone()
            .get_room(pb::GetRoomRequest::default())
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
        rpc.clone()
            .create_room(pb::CreateRoomRequest::default())
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
        rpc.clone()
            .list_members(pb::ListMembersRequest::default())
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
        rpc.clone()
            .get_history(pb::GetHistoryRequest::default())
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
        rpc.clone()
            .publish(pb::PublishRequest::default())
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
        rpc.clone()
            .publish_batch(futures::stream::empty())
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
        rpc.clone()
            .subscribe(pb::SubscribeRequest::default())
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
        anonymous
            .chat()
            .await
            .map(|_| ())
            .map_err(|e| match e {
                confab::ClientError::Status(s) => s.code(),
                other => panic!("{other:?}"),
            })
            .unwrap_err(),
    ];
    assert!(
        codes.iter().all(|&c| c == Code::Unauthenticated),
        "{codes:?}"
    );

    // A token signed by another server is refused.
    let other = TestServer::start_on(engine).await;
    let foreign = other.client("alice").await;
    let mut forged = server.anonymous().await;
    forged.set_token(foreign.token().unwrap()).unwrap();
    let status = forged
        .rpc()
        .list_rooms(pb::ListRoomsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // Login itself checks the nickname.
    let status = server
        .anonymous()
        .await
        .rpc()
        .login(pb::LoginRequest {
            nickname: "no spaces".into(),
            resume_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), violated_fields(&status)),
        (Code::InvalidArgument, vec!["nickname".into()])
    );
}
on_every_engine!(every_call_but_login_needs_a_valid_token);
