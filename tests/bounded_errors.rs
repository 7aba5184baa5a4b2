//! Errors never echo a client's input at length: every entry point (page tokens included),
//! given a 60,000-byte value, answers INVALID_ARGUMENT naming the field, with a message and
//! details that quote at most a few dozen bytes of the value, so the trailers (or the
//! in-band error event) stay well under 1 KiB and a standard client with default metadata
//! limits reads them.
//!
//! The values are 30,000 × `Ä` (two bytes of UTF-8 each): the worst case, since
//! `grpc-message` percent-encodes every byte outside printable ASCII as three.

mod common;

use common::{Events, TestServer, fields, violated_fields, within};
use confab::pb::{
    self, ChatRequest, CommandError, OutgoingMessage, chat_request::Command, chat_response::Event,
};
use prost::Message as _;
use tonic::{Code, Status};

/// Trailers stay under this, whatever the input.
const TRAILER_LIMIT: usize = 1024;

/// 60,000 bytes that are neither a room name, a nickname, nor within any length limit.
fn huge() -> String {
    "Ä".repeat(30_000)
}

/// The bytes of a status's trailers as they go over the wire (HPACK aside): `grpc-status`,
/// `grpc-message` percent-encoded as the gRPC spec says, `grpc-status-details-bin` in
/// base64, and any other metadata.
fn trailer_bytes(status: &Status) -> usize {
    let message: usize = status
        .message()
        .bytes()
        .map(|b| {
            if (0x20..=0x7e).contains(&b) && b != b'%' {
                1
            } else {
                3
            }
        })
        .sum();
    let details = status.details().len().div_ceil(3) * 4;
    let other: usize = status
        .metadata()
        .iter()
        .map(|entry| match entry {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                k.as_str().len() + v.as_encoded_bytes().len()
            }
            tonic::metadata::KeyAndValueRef::Binary(k, v) => {
                k.as_str().len() + v.as_encoded_bytes().len()
            }
        })
        .sum();
    "grpc-status".len()
        + 2
        + "grpc-message".len()
        + message
        + "grpc-status-details-bin".len()
        + details
        + other
}

/// The call was refused as INVALID_ARGUMENT naming `field`, in small trailers.
fn assert_refused(what: &str, status: Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: the code");
    assert_eq!(violated_fields(&status), [field], "{what}: the field");
    let bytes = trailer_bytes(&status);
    assert!(
        bytes < TRAILER_LIMIT,
        "{what}: {bytes} bytes of trailers: {:?}",
        status.message()
    );
}

/// An in-band error event refusing `field`, itself small.
fn assert_refused_in_band(what: &str, error: &CommandError, field: &str) {
    assert_eq!(
        Code::from(error.code),
        Code::InvalidArgument,
        "{what}: the code"
    );
    assert_eq!(fields(error), [field], "{what}: the field");
    let bytes = error.encoded_len();
    assert!(
        bytes < TRAILER_LIMIT,
        "{what}: an error event of {bytes} bytes: {:?}",
        error.message
    );
}

/// Sends `command` on `events`' stream and checks the refusal names `field`; then checks
/// the stream goes on (a ping is answered).
async fn refused_in_band(events: &mut Events, command: Command, field: &str) {
    let sender = events.chat.sender().clone();
    let id = sender.command(command).await.expect("send the frame");
    match events.reply(id).await {
        Event::Error(error) => assert_refused_in_band(field, &error, field),
        other => panic!("{field}: expected an error, got a {}", event_kind(&other)),
    }
    let ping = sender.ping(7).await.expect("send a ping");
    assert!(
        matches!(events.reply(ping).await, Event::Pong(_)),
        "{field}: the stream goes on"
    );
}

fn event_kind(event: &Event) -> &'static str {
    match event {
        Event::Error(_) => "error",
        Event::Ack(_) => "ack",
        Event::Joined(_) => "joined",
        _ => "another event",
    }
}

async fn chat(server: &TestServer) -> Events {
    let client = server.client("alice").await;
    Events::open(&client).await
}

#[tokio::test]
async fn login_nickname() {
    let server = TestServer::start().await;
    let status = server
        .anonymous()
        .await
        .rpc()
        .login(pb::LoginRequest {
            nickname: huge(),
            resume_token: String::new(),
        })
        .await
        .expect_err("a 60,000-byte nickname");
    assert_refused("Login", status, "nickname");
}

#[tokio::test]
async fn room_names_of_unary_calls() {
    let server = TestServer::start().await;
    let mut rpc = server.client("alice").await.rpc();
    let status = rpc
        .get_room(pb::GetRoomRequest { room: huge() })
        .await
        .unwrap_err();
    assert_refused("GetRoom", status, "room");
    let status = rpc
        .create_room(pb::CreateRoomRequest {
            room: huge(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_refused("CreateRoom", status, "room");
    let status = rpc
        .list_members(pb::ListMembersRequest {
            room: huge(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_refused("ListMembers", status, "room");
    let status = rpc
        .get_history(pb::GetHistoryRequest {
            room: huge(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_refused("GetHistory", status, "room");
}

#[tokio::test]
async fn page_tokens() {
    let server = TestServer::start().await;
    let mut rpc = server.client("alice").await.rpc();
    rpc.create_room(pb::CreateRoomRequest {
        room: "r".into(),
        ..Default::default()
    })
    .await
    .expect("create the room");
    let status = rpc
        .list_rooms(pb::ListRoomsRequest {
            page_size: 0,
            page_token: huge(),
        })
        .await
        .unwrap_err();
    assert_refused("ListRooms", status, "page_token");
    let status = rpc
        .list_members(pb::ListMembersRequest {
            room: "r".into(),
            page_size: 0,
            page_token: huge(),
        })
        .await
        .unwrap_err();
    assert_refused("ListMembers", status, "page_token");
    let status = rpc
        .get_history(pb::GetHistoryRequest {
            room: "r".into(),
            page_token: huge(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_refused("GetHistory", status, "page_token");
}

#[tokio::test]
async fn create_room_topic() {
    let server = TestServer::start().await;
    let mut rpc = server.client("alice").await.rpc();
    let status = rpc
        .create_room(pb::CreateRoomRequest {
            room: "r".into(),
            topic: huge(),
            private: false,
        })
        .await
        .unwrap_err();
    assert_refused("CreateRoom", status, "topic");
}

#[tokio::test]
async fn publish_fields() {
    let server = TestServer::start().await;
    let mut rpc = server.client("alice").await.rpc();
    let ok = || OutgoingMessage {
        room: "r".into(),
        text: "hi".into(),
        client_msg_id: "1".into(),
        kind: 0,
    };
    for (message, field) in [
        (
            OutgoingMessage {
                room: huge(),
                ..ok()
            },
            "message.room",
        ),
        (
            OutgoingMessage {
                text: huge(),
                ..ok()
            },
            "message.text",
        ),
        (
            OutgoingMessage {
                client_msg_id: huge(),
                ..ok()
            },
            "message.client_msg_id",
        ),
    ] {
        let status = rpc
            .publish(pb::PublishRequest {
                message: Some(message),
            })
            .await
            .expect_err(field);
        assert_refused("Publish", status, field);
    }
}

#[tokio::test]
async fn publish_batch_rejections() {
    let server = TestServer::start().await;
    let mut rpc = server.client("alice").await.rpc();
    let batch = [
        OutgoingMessage {
            room: huge(),
            text: "hi".into(),
            client_msg_id: "1".into(),
            kind: 0,
        },
        OutgoingMessage {
            room: "r".into(),
            text: "hi".into(),
            client_msg_id: huge(),
            kind: 0,
        },
    ]
    .map(|message| pb::PublishBatchRequest {
        message: Some(message),
    });
    let summary = within(
        "the batch summary",
        rpc.publish_batch(futures::stream::iter(batch)),
    )
    .await
    .expect("a summary")
    .into_inner();
    assert_eq!(summary.accepted, 0);
    let rejected: Vec<_> = summary.rejected.iter().collect();
    assert_eq!(rejected.len(), 2);
    for (rejection, field) in rejected
        .iter()
        .zip(["message.room", "message.client_msg_id"])
    {
        let error = rejection.error.as_ref().expect("a reason");
        assert_refused_in_band("PublishBatch", error, field);
        assert!(rejection.encoded_len() < TRAILER_LIMIT, "{field}");
    }
}

#[tokio::test]
async fn subscribe_room_and_epoch() {
    let server = TestServer::start().await;
    let alice = server.client("alice").await;
    common::create_room(&alice, "r").await;
    let mut rpc = alice.rpc();
    let huge_room = pb::RoomPosition {
        room: huge(),
        ..Default::default()
    };
    let huge_epoch = pb::RoomPosition {
        room: "r".into(),
        after_seq: Some(0),
        epoch: huge(),
    };
    for (position, field) in [(huge_room, "rooms[0].room"), (huge_epoch, "rooms[0].epoch")] {
        let request = pb::SubscribeRequest {
            rooms: vec![position],
        };
        let status = match rpc.subscribe(request).await {
            Err(status) => status,
            Ok(stream) => stream
                .into_inner()
                .message()
                .await
                .expect_err("refused on the stream"),
        };
        assert_refused("Subscribe", status, field);
    }
}

#[tokio::test]
async fn chat_join_and_leave_rooms() {
    let server = TestServer::start().await;
    let mut events = chat(&server).await;
    let join = Command::Join(pb::JoinRoom {
        room: huge(),
        ..Default::default()
    });
    refused_in_band(&mut events, join, "join.room").await;
    let join = Command::Join(pb::JoinRoom {
        room: "r".into(),
        after_seq: Some(1),
        epoch: huge(),
    });
    refused_in_band(&mut events, join, "join.epoch").await;
    let leave = Command::Leave(pb::LeaveRoom { room: huge() });
    refused_in_band(&mut events, leave, "leave.room").await;
    let typing = Command::Typing(pb::SetTyping {
        room: huge(),
        typing: true,
    });
    refused_in_band(&mut events, typing, "typing.room").await;
}

#[tokio::test]
async fn chat_send_fields() {
    let server = TestServer::start().await;
    let mut events = chat(&server).await;
    events.join("r", None).await;
    let ok = || OutgoingMessage {
        room: "r".into(),
        text: "hi".into(),
        client_msg_id: "1".into(),
        kind: 0,
    };
    let cases = [
        (
            OutgoingMessage {
                room: huge(),
                ..ok()
            },
            "send.room",
        ),
        (
            OutgoingMessage {
                text: huge(),
                ..ok()
            },
            "send.text",
        ),
        (
            OutgoingMessage {
                client_msg_id: huge(),
                ..ok()
            },
            "send.client_msg_id",
        ),
    ];
    for (message, field) in cases {
        refused_in_band(&mut events, Command::Send(message), field).await;
    }
}

#[tokio::test]
async fn chat_topic_fields() {
    let server = TestServer::start().await;
    let mut events = chat(&server).await;
    events.join("r", None).await;
    let room = Command::SetTopic(pb::SetTopic {
        room: huge(),
        topic: "t".into(),
    });
    refused_in_band(&mut events, room, "set_topic.room").await;
    let topic = Command::SetTopic(pb::SetTopic {
        room: "r".into(),
        topic: huge(),
    });
    refused_in_band(&mut events, topic, "set_topic.topic").await;
}

#[tokio::test]
async fn chat_moderation_fields() {
    let server = TestServer::start().await;
    let mut events = chat(&server).await;
    events.join("r", None).await;
    let room = || "r".to_string();
    let user = || "bob".to_string();
    for (command, field) in [
        (
            Command::Invite(pb::Invite {
                room: huge(),
                user: user(),
            }),
            "invite.room",
        ),
        (
            Command::Invite(pb::Invite {
                room: room(),
                user: huge(),
            }),
            "invite.user",
        ),
        (
            Command::Kick(pb::Kick {
                room: huge(),
                user: user(),
                reason: String::new(),
            }),
            "kick.room",
        ),
        (
            Command::Kick(pb::Kick {
                room: room(),
                user: huge(),
                reason: String::new(),
            }),
            "kick.user",
        ),
        (
            Command::Kick(pb::Kick {
                room: room(),
                user: user(),
                reason: huge(),
            }),
            "kick.reason",
        ),
        (
            Command::Ban(pb::Ban {
                room: huge(),
                user: user(),
                reason: String::new(),
            }),
            "ban.room",
        ),
        (
            Command::Ban(pb::Ban {
                room: room(),
                user: huge(),
                reason: String::new(),
            }),
            "ban.user",
        ),
        (
            Command::Ban(pb::Ban {
                room: room(),
                user: user(),
                reason: huge(),
            }),
            "ban.reason",
        ),
    ] {
        refused_in_band(&mut events, command, field).await;
    }
}

/// A frame sent whole (request id and all) with a 60,000-byte value still fits the
/// server's frame limit, so these are refusals of the field, not of the frame.
#[test]
fn the_frames_fit_the_frame_limit() {
    let frame = ChatRequest {
        request_id: u64::MAX,
        command: Some(Command::Kick(pb::Kick {
            room: "r".into(),
            user: "bob".into(),
            reason: huge(),
        })),
    };
    assert!(frame.encoded_len() < confab_server::Config::default().max_message_bytes);
}
