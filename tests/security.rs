//! Flood control, room ownership and the metrics that show both: every limit refuses
//! with the right status while everyone else carries on; private rooms, kicks and bans
//! keep the right people out, across a restart too.

mod common;

use std::time::Duration;

use common::{
    Engine, Events, Storage, TestServer, command_error, config, eventually, metric, metrics_until,
    scrape, within,
};
use confab::{
    Client, Conversation, ConversationConfig, ConversationEvent,
    pb::{self, LeaveReason, PresenceKind, chat_response::Event},
};
use confab_server::{Config, limits::LimitConfig};
use tonic::Code;
use tonic_types::StatusExt as _;

fn limited(limits: LimitConfig) -> Config {
    Config { limits, ..config() }
}

fn message(room: &str, text: &str) -> pb::OutgoingMessage {
    pb::OutgoingMessage {
        room: room.into(),
        text: text.into(),
        client_msg_id: confab::client::new_client_msg_id(),
        kind: pb::MessageKind::Text as i32,
    }
}

async fn a_flooding_user_is_refused_with_retry_info_while_others_flow(engine: Engine) {
    let server = TestServer::with_on(
        engine,
        limited(LimitConfig {
            send_rate: 2.0,
            send_burst: 5,
            ..LimitConfig::unlimited()
        }),
    )
    .await;
    let alice = server.client("alice").await;
    let bob = server.client("bob").await;
    let mut alice_chat = Events::open(&alice).await;
    let mut bob_chat = Events::open(&bob).await;
    alice_chat.join("lobby", None).await;
    bob_chat.join("lobby", None).await;

    // Alice sends 30 at once: the burst is acked, the rest refused with a retry delay.
    let mut ids = Vec::new();
    for n in 0..30 {
        let (id, _) = alice_chat
            .chat
            .sender()
            .say("lobby", &format!("flood {n}"))
            .await
            .unwrap();
        ids.push(id);
    }
    let (mut acked, mut refused) = (0, 0);
    for id in ids {
        match alice_chat.reply(id).await {
            Event::Ack(_) => acked += 1,
            Event::Error(error) => {
                assert_eq!(Code::from(error.code), Code::ResourceExhausted);
                let retry = Duration::try_from(error.retry_after.expect("a retry delay")).unwrap();
                assert!(retry > Duration::ZERO && retry <= Duration::from_secs(1));
                refused += 1;
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert!((5..=6).contains(&acked), "the burst gets through: {acked}");
    assert_eq!(acked + refused, 30);

    // Bob has a bucket of his own: his messages are accepted and delivered meanwhile.
    for n in 0..3 {
        bob_chat.say("lobby", &format!("bob {n}")).await;
    }
    let mut from_bob = Vec::new();
    while from_bob.last().is_none_or(|t| t != "bob 2") {
        let event = alice_chat
            .until(
                "bob's messages",
                |e| matches!(&e.event, Some(Event::Message(m)) if m.sender == "bob"),
            )
            .await;
        if let Some(Event::Message(m)) = event.event {
            from_bob.push(m.text.clone());
        }
    }
    assert_eq!(from_bob, ["bob 0", "bob 1", "bob 2"]);

    // The unary call says the same, in a RetryInfo detail.
    let status = alice
        .rpc()
        .publish(pb::PublishRequest {
            message: Some(message("lobby", "one more")),
        })
        .await
        .expect_err("still over the rate");
    assert_eq!(status.code(), Code::ResourceExhausted);
    let retry = status.get_details_retry_info().expect("RetryInfo");
    assert!(retry.retry_delay.is_some_and(|d| d > Duration::ZERO));

    let page = scrape(server.metrics_addr).await;
    assert!(metric(&page, r#"confab_limited_total{limit="send_rate"}"#) >= 26.0);
}
on_every_engine!(a_flooding_user_is_refused_with_retry_info_while_others_flow);

async fn a_conversation_paces_itself_to_the_advertised_rate_and_keeps_its_order(engine: Engine) {
    let server = TestServer::with_on(
        engine,
        limited(LimitConfig {
            send_rate: 20.0,
            send_burst: 5,
            ..LimitConfig::unlimited()
        }),
    )
    .await;
    let mut login = server.anonymous().await;
    let limits = login.login("probe").await.unwrap().limits.expect("limits");
    assert_eq!(limits.send_rate_per_second, 20.0);
    assert_eq!(limits.send_burst, 5);

    let (alice, mut events) =
        Conversation::start(ConversationConfig::new(server.url(), "alice", &["lobby"]));
    for n in 0..25 {
        alice.say("lobby", &format!("m{n}")).await.unwrap();
    }
    let mut texts = Vec::new();
    within("25 messages back", async {
        while texts.len() < 25 {
            match events.recv().await.expect("conversation ended") {
                ConversationEvent::Server(pb::ChatResponse {
                    event: Some(Event::Message(m)),
                    ..
                }) => texts.push(m.text.clone()),
                ConversationEvent::Refused { error, .. } => panic!("refused: {error:?}"),
                _ => {}
            }
        }
    })
    .await;
    let expected: Vec<String> = (0..25).map(|n| format!("m{n}")).collect();
    assert_eq!(texts, expected);
    let page = scrape(server.metrics_addr).await;
    assert_eq!(
        metric(&page, r#"confab_limited_total{limit="send_rate"}"#),
        0.0
    );
}
on_every_engine!(a_conversation_paces_itself_to_the_advertised_rate_and_keeps_its_order);

async fn streams_per_user_are_limited(engine: Engine) {
    let server = TestServer::with_on(
        engine,
        limited(LimitConfig {
            max_streams_per_user: 2,
            ..LimitConfig::unlimited()
        }),
    )
    .await;
    let alice = server.client("alice").await;
    let first = alice.chat().await.unwrap();
    let _second = alice.chat().await.unwrap();
    let status = match alice.chat().await {
        Err(confab::ClientError::Status(status)) => status,
        other => panic!("a third stream is refused, got {:?}", other.is_ok()),
    };
    assert_eq!(status.code(), Code::ResourceExhausted);
    let bob = server.client("bob").await;
    bob.chat().await.expect("bob has streams of his own");

    // Closing one makes room (the server notices it a moment later).
    drop(first);
    eventually("a stream slot to free up", || async {
        alice.chat().await.ok()
    })
    .await;
    let page = scrape(server.metrics_addr).await;
    assert!(metric(&page, r#"confab_limited_total{limit="streams_per_user"}"#) >= 1.0);
}
on_every_engine!(streams_per_user_are_limited);

async fn rooms_per_stream_are_limited(engine: Engine) {
    let server = TestServer::with_on(
        engine,
        limited(LimitConfig {
            max_rooms_per_stream: 2,
            ..LimitConfig::unlimited()
        }),
    )
    .await;
    let alice = server.client("alice").await;
    let mut chat = Events::open(&alice).await;
    chat.join("a", None).await;
    chat.join("b", None).await;
    let id = chat.chat.sender().join("c", None).await.unwrap();
    let (code, _) = command_error(chat.reply(id).await);
    assert_eq!(code, Code::ResourceExhausted);
    // The stream goes on: leave one, and the third fits.
    let id = chat.chat.sender().leave("a").await.unwrap();
    assert!(matches!(chat.reply(id).await, Event::Left(_)));
    chat.join("c", None).await;
}
on_every_engine!(rooms_per_stream_are_limited);

async fn room_creation_is_limited_per_user_and_in_total(engine: Engine) {
    let server = TestServer::with_on(
        engine,
        limited(LimitConfig {
            room_creation_per_minute: 2,
            max_rooms: 3,
            ..LimitConfig::unlimited()
        }),
    )
    .await;
    let alice = server.client("alice").await;
    let create = |name: &str| pb::CreateRoomRequest {
        room: name.into(),
        topic: String::new(),
        private: false,
    };
    alice.rpc().create_room(create("one")).await.unwrap();
    alice.rpc().create_room(create("two")).await.unwrap();
    let status = alice.rpc().create_room(create("three")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.get_details_retry_info().is_some());
    // Joining a room that does not exist creates it, so it is limited the same way.
    let mut chat = Events::open(&alice).await;
    let id = chat.chat.sender().join("four", None).await.unwrap();
    assert_eq!(
        command_error(chat.reply(id).await).0,
        Code::ResourceExhausted
    );
    // Existing rooms are open to join.
    chat.join("one", None).await;

    let bob = server.client("bob").await;
    bob.rpc().create_room(create("three")).await.unwrap();
    let status = bob.rpc().create_room(create("five")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "the server is full");
    assert!(status.message().contains("most rooms"));
}
on_every_engine!(room_creation_is_limited_per_user_and_in_total);

async fn connections_per_address_are_limited(engine: Engine) {
    let server = TestServer::with_on(
        engine,
        limited(LimitConfig {
            max_connections_per_ip: 2,
            ..LimitConfig::unlimited()
        }),
    )
    .await;
    let first = server.client("alice").await;
    let _second = server.client("bob").await;
    let mut third = Client::connect(&server.url()).await.unwrap();
    third
        .login("carol")
        .await
        .expect_err("a third connection from one address is closed");
    // Alice and Bob are not disturbed.
    let mut alice = Events::open(&first).await;
    alice.join("lobby", None).await;
    alice.say("lobby", "still here").await;

    drop(alice);
    drop(first);
    eventually("a connection slot to free up", || async {
        let mut client = Client::connect(&server.url()).await.unwrap();
        client.login("carol").await.ok()
    })
    .await;
    let page = scrape(server.metrics_addr).await;
    assert!(metric(&page, r#"confab_limited_total{limit="connections_per_ip"}"#) >= 1.0);
}
on_every_engine!(connections_per_address_are_limited);

async fn a_private_room_admits_only_its_owner_and_invited_users(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    let alice = server.client("alice").await;
    let bob = server.client("bob").await;
    let room = alice
        .rpc()
        .create_room(pb::CreateRoomRequest {
            room: "secret".into(),
            topic: String::new(),
            private: true,
        })
        .await
        .unwrap()
        .into_inner()
        .room
        .unwrap();
    assert!(room.private);
    assert_eq!(room.created_by, "alice");

    let mut alice_chat = Events::open(&alice).await;
    alice_chat.join("secret", None).await;
    alice_chat.say("secret", "for invited eyes").await;

    let mut bob_chat = Events::open(&bob).await;
    let id = bob_chat.chat.sender().join("secret", None).await.unwrap();
    let (code, fields) = command_error(bob_chat.reply(id).await);
    assert_eq!(code, Code::PermissionDenied);
    assert_eq!(fields, ["join.room"]);
    // Nor can Bob read or write it some other way.
    let history = bob
        .rpc()
        .get_history(pb::GetHistoryRequest {
            room: "secret".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(history.code(), Code::PermissionDenied);
    let publish = bob
        .rpc()
        .publish(pb::PublishRequest {
            message: Some(message("secret", "let me in")),
        })
        .await
        .unwrap_err();
    assert_eq!(publish.code(), Code::PermissionDenied);
    let subscribe = bob
        .rpc()
        .subscribe(pb::SubscribeRequest {
            rooms: vec![pb::RoomPosition {
                room: "secret".into(),
                after_seq: None,
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(subscribe.code(), Code::PermissionDenied);
    // Nor is it listed to him: only public rooms and those that admit him are.
    let listed = |client: &confab::Client| {
        let mut rpc = client.rpc();
        async move {
            let page = rpc.list_rooms(pb::ListRoomsRequest::default()).await;
            let rooms = page.unwrap().into_inner().rooms;
            rooms.into_iter().map(|r| r.name).collect::<Vec<_>>()
        }
    };
    alice
        .rpc()
        .create_room(pb::CreateRoomRequest {
            room: "plaza".into(),
            topic: String::new(),
            private: false,
        })
        .await
        .unwrap();
    assert_eq!(listed(&alice).await, ["plaza", "secret"]);
    assert_eq!(listed(&bob).await, ["plaza"]);
    // Only the owner invites.
    let id = bob_chat
        .chat
        .sender()
        .invite("secret", "bob")
        .await
        .unwrap();
    assert_eq!(
        command_error(bob_chat.reply(id).await).0,
        Code::PermissionDenied
    );

    let id = alice_chat
        .chat
        .sender()
        .invite("secret", "Bob")
        .await
        .unwrap();
    assert!(matches!(
        alice_chat.reply(id).await,
        Event::ModerationDone(_)
    ));
    assert_eq!(listed(&bob).await, ["plaza", "secret"]);
    let joined = bob_chat.join("secret", None).await;
    assert_eq!(joined.members, ["alice", "bob"]);
    assert_eq!(bob_chat.message().await.text, "for invited eyes");

    // The topic is the owner's to set.
    let id = bob_chat
        .chat
        .sender()
        .set_topic("secret", "bob was here")
        .await
        .unwrap();
    let (code, fields) = command_error(bob_chat.reply(id).await);
    assert_eq!(
        (code, fields),
        (Code::PermissionDenied, vec!["set_topic.room".into()])
    );
    alice_chat
        .chat
        .sender()
        .set_topic("secret", "plans")
        .await
        .unwrap();
    let updated = bob_chat
        .until("the topic", |e| {
            matches!(e.event, Some(Event::RoomUpdated(_)))
        })
        .await;
    let Some(Event::RoomUpdated(updated)) = updated.event else {
        unreachable!()
    };
    assert_eq!(updated.updated_by, "alice");
    assert_eq!(updated.room.unwrap().topic, "plans", "and not bob's");
}
on_every_engine!(a_private_room_admits_only_its_owner_and_invited_users);

async fn the_owner_kicks_and_bans_and_a_ban_outlives_a_restart(engine: Engine) {
    let storage = Storage::new(engine);
    let server = TestServer::on("127.0.0.1:0", storage.apply(config())).await;
    let alice = server.client("alice").await;
    let bob = server.client("bob").await;
    let mut alice_chat = Events::open(&alice).await;
    alice_chat.join("den", None).await;
    let mut bob_phone = Events::open(&bob).await;
    let mut bob_laptop = Events::open(&bob).await;
    bob_phone.join("den", None).await;
    bob_laptop.join("den", None).await;

    // Bob cannot kick the owner, nor anyone: he does not own the room.
    let id = bob_phone
        .chat
        .sender()
        .kick("den", "alice", "")
        .await
        .unwrap();
    assert_eq!(
        command_error(bob_phone.reply(id).await).0,
        Code::PermissionDenied
    );

    let id = alice_chat
        .chat
        .sender()
        .kick("den", "bob", "cool off")
        .await
        .unwrap();
    assert!(matches!(
        alice_chat.reply(id).await,
        Event::ModerationDone(_)
    ));
    for stream in [&mut bob_phone, &mut bob_laptop] {
        let left = stream
            .until("the kick", |e| matches!(e.event, Some(Event::Left(_))))
            .await;
        let Some(Event::Left(left)) = left.event else {
            unreachable!()
        };
        assert_eq!(left.reason(), LeaveReason::Kicked);
        assert_eq!(left.by, "alice");
        assert_eq!(left.message, "cool off");
    }
    alice_chat.presence("bob", PresenceKind::Left).await;
    let id = bob_phone.chat.sender().say("den", "hey").await.unwrap().0;
    assert_eq!(
        command_error(bob_phone.reply(id).await).0,
        Code::FailedPrecondition,
        "a kicked stream is no longer in the room"
    );
    // A kick is not a ban: Bob may come back.
    bob_phone.join("den", None).await;

    let id = alice_chat
        .chat
        .sender()
        .ban("den", "bob", "")
        .await
        .unwrap();
    assert!(matches!(
        alice_chat.reply(id).await,
        Event::ModerationDone(_)
    ));
    let left = bob_phone
        .until("the ban", |e| matches!(e.event, Some(Event::Left(_))))
        .await;
    assert!(matches!(left.event, Some(Event::Left(l)) if l.reason() == LeaveReason::Banned));
    let id = bob_phone.chat.sender().join("den", None).await.unwrap();
    assert_eq!(
        command_error(bob_phone.reply(id).await).0,
        Code::PermissionDenied
    );
    // Bob is out now, so a kick has no one to put out, and says so.
    let id = alice_chat
        .chat
        .sender()
        .kick("den", "bob", "")
        .await
        .unwrap();
    assert_eq!(
        command_error(alice_chat.reply(id).await),
        (Code::FailedPrecondition, vec!["kick.user".into()])
    );

    // The ban is stored: it holds after a restart.
    drop((alice_chat, bob_phone, bob_laptop, alice, bob));
    server.stop().await.unwrap();
    let server = TestServer::on("127.0.0.1:0", storage.apply(config())).await;
    let bob = server.client("bob").await;
    let mut bob_chat = Events::open(&bob).await;
    let id = bob_chat.chat.sender().join("den", None).await.unwrap();
    assert_eq!(
        command_error(bob_chat.reply(id).await).0,
        Code::PermissionDenied
    );
    // An invite lifts it.
    let alice = server.client("alice").await;
    let mut alice_chat = Events::open(&alice).await;
    let id = alice_chat.chat.sender().invite("den", "bob").await.unwrap();
    assert!(matches!(
        alice_chat.reply(id).await,
        Event::ModerationDone(_)
    ));
    bob_chat.join("den", None).await;
}
on_every_engine!(the_owner_kicks_and_bans_and_a_ban_outlives_a_restart);

async fn the_metrics_page_counts_what_happened(engine: Engine) {
    let server = TestServer::start_on(engine).await;
    let alice = server.client("alice").await;
    let bob = server.client("bob").await;
    let mut alice_chat = Events::open(&alice).await;
    let mut bob_chat = Events::open(&bob).await;
    alice_chat.join("lobby", None).await;
    bob_chat.join("lobby", None).await;
    for n in 0..10 {
        alice_chat.say("lobby", &format!("m{n}")).await;
    }
    bob_chat.seqs(10).await;

    let page = scrape(server.metrics_addr).await;
    assert_eq!(metric(&page, "confab_connections_accepted_total"), 2.0);
    assert!(
        metric(&page, "confab_tasks") >= 2.0,
        "at least the two chat sessions' tasks"
    );
    assert_eq!(metric(&page, "confab_lagged_backfills_total"), 0.0);
    assert_eq!(metric(&page, "confab_slow_reader_disconnects_total"), 0.0);
    assert_eq!(metric(&page, "confab_connections"), 2.0);
    assert_eq!(metric(&page, r#"confab_streams{kind="chat"}"#), 2.0);
    assert_eq!(metric(&page, "confab_rooms"), 1.0);
    assert_eq!(metric(&page, "confab_messages_in_total"), 10.0);
    assert_eq!(metric(&page, "confab_store_commit_seconds_count"), 10.0);
    assert!(metric(&page, "confab_store_commit_seconds_sum") > 0.0);
    assert_eq!(metric(&page, "confab_deliveries_total"), 20.0);
    assert!(page.contains("# TYPE confab_store_commit_seconds histogram"));

    drop((alice_chat, bob_chat, alice, bob));
    metrics_until(
        server.metrics_addr,
        "streams and connections to close",
        |page| {
            metric(page, r#"confab_streams{kind="chat"}"#) == 0.0
                && metric(page, "confab_connections") == 0.0
        },
    )
    .await;
}
on_every_engine!(the_metrics_page_counts_what_happened);

/// What an identity provider signs.
#[derive(serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    iss: &'a str,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn identity_provider_tokens_name_the_user(engine: Engine) {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    // The provider's ES256 key pair, made for this test.
    let provider = rcgen::KeyPair::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let public_key = dir.path().join("provider.pem");
    std::fs::write(&public_key, provider.public_key_pem()).unwrap();
    let server = TestServer::with_on(
        engine,
        Config {
            jwt_public_key: Some(public_key),
            jwt_issuer: Some("https://idp.example".into()),
            in_memory: true,
            ..config()
        },
    )
    .await;
    let signing = EncodingKey::from_ec_pem(provider.serialize_pem().as_bytes()).unwrap();
    let sign = |sub: &str, exp: u64, iss: &str| {
        encode(
            &Header::new(Algorithm::ES256),
            &Claims { sub, exp, iss },
            &signing,
        )
        .unwrap()
    };
    let idp = "https://idp.example";
    let token = sign("alice", unix_now() + 600, idp);

    let mut alice = server.anonymous().await;
    let reply = alice.login_with_token(&token, "").await.unwrap();
    assert_eq!(reply.nickname, "alice");
    assert_eq!(reply.token, token);
    assert!(reply.expires_at.is_some());
    let mut chat = Events::open(&alice).await;
    chat.join("lobby", None).await;
    chat.say("lobby", "signed in by my provider").await;
    assert_eq!(chat.message().await.sender, "alice");

    // A user can only speak as itself.
    let mut again = server.anonymous().await;
    let status = again.login_with_token(&token, "mallory").await.unwrap_err();
    assert!(
        matches!(&status, confab::ClientError::Status(s) if s.code() == Code::PermissionDenied),
        "{status:?}"
    );
    // Session logins are not how this server works.
    let mut plain = server.anonymous().await;
    let refused = plain.login("bob").await.unwrap_err();
    assert!(
        matches!(&refused, confab::ClientError::Status(s) if s.code() == Code::Unauthenticated)
    );

    // Tampered, expired, foreign-issuer and other-key tokens are refused.
    let mut tampered = token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let other_key = {
        let other = rcgen::KeyPair::generate().unwrap();
        let key = EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).unwrap();
        let claims = Claims {
            sub: "alice",
            exp: unix_now() + 600,
            iss: idp,
        };
        encode(&Header::new(Algorithm::ES256), &claims, &key).unwrap()
    };
    for bad in [
        tampered,
        sign("alice", unix_now() - 3600, idp),
        sign("alice", unix_now() + 600, "https://evil.example"),
        sign("not a nickname", unix_now() + 600, idp),
        other_key,
    ] {
        let mut client = server.anonymous().await;
        client.set_token(&bad).unwrap();
        let status = client
            .rpc()
            .list_rooms(pb::ListRoomsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{bad}: {status:?}");
    }
}
on_every_engine!(identity_provider_tokens_name_the_user);

async fn a_shared_secret_works_for_hs256_providers(engine: Engine) {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let secret = "a-provider-secret-of-at-least-32-chars";
    let server = TestServer::with_on(
        engine,
        Config {
            jwt_secret: Some(secret.into()),
            in_memory: true,
            ..config()
        },
    )
    .await;
    let claims = Claims {
        sub: "carol",
        exp: unix_now() + 600,
        iss: "anyone",
    };
    let token = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let mut carol = server.anonymous().await;
    assert_eq!(
        carol
            .login_with_token(&token, "Carol")
            .await
            .unwrap()
            .nickname,
        "carol"
    );
    carol
        .rpc()
        .list_rooms(pb::ListRoomsRequest::default())
        .await
        .unwrap();
}
on_every_engine!(a_shared_secret_works_for_hs256_providers);
