//! Operations end to end: health, graceful shutdown of the library and of the real
//! `confab-server` binary on SIGTERM and SIGINT.

mod common;
#[path = "common/process.rs"]
mod process;

use common::{Events, TestServer, client_at, subscribe, within};
use confab::pb::{self, chat_response::Event, subscribe_response};
use process::ServerProcess;
use tokio::io::AsyncBufReadExt as _;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Health says SERVING while up, and NOT_SERVING as soon as the drain starts.
#[tokio::test]
async fn health_reports_serving_then_not_serving_on_drain() {
    let mut server = TestServer::start().await;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "chat.v1.ChatService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "chat.v1.ChatService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = within("the first health update", watch.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    server.signal_stop();
    let next = within("the drain's health update", watch.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
}

/// Shutdown tells every open stream to reconnect, ends it with UNAVAILABLE, and `run`
/// returns although clients are still connected.
#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable_and_returns() {
    let server = TestServer::start().await;
    let alice = server.client("alice").await;
    let mut chat = Events::open(&alice).await;
    chat.join("r", None).await;
    let mut tail = subscribe(&alice, "r", Some(0)).await;

    let stopping = tokio::spawn(server.stop());

    let reconnect = chat
        .until("the reconnect notice", |e| {
            matches!(e.event, Some(Event::Reconnect(_)))
        })
        .await;
    assert_eq!(reconnect.request_id, 0);
    assert_eq!(chat.end_status().await.code(), Code::Unavailable);

    let event = within("the subscription's notice", tail.message())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(event.event, Some(subscribe_response::Event::Reconnect(_))),
        "{event:?}"
    );
    let status = within("the subscription's end", tail.message())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    within("run to return", stopping)
        .await
        .unwrap()
        .expect("clean shutdown");
    // The client is still holding its connection; nothing is serving it any more.
    assert!(
        alice
            .rpc()
            .list_rooms(pb::ListRoomsRequest::default())
            .await
            .is_err()
    );
}

/// The binary logs where it listens, serves, and on SIGTERM or SIGINT tells its clients to
/// reconnect and exits 0 while they are still connected.
#[tokio::test]
async fn the_binary_drains_and_exits_on_sigterm_and_sigint() {
    for signal in ["TERM", "INT"] {
        let data_dir = tempfile::tempdir().unwrap();
        let mut server = ServerProcess::start(data_dir.path(), "127.0.0.1:0");
        let alice = client_at(&server.url, "alice").await;
        let mut chat = Events::open(&alice).await;
        chat.join("r", None).await;
        assert_eq!(chat.say("r", "hello").await, 1);

        server.signal(signal);
        chat.until("the reconnect notice", |e| {
            matches!(e.event, Some(Event::Reconnect(_)))
        })
        .await;
        assert_eq!(chat.end_status().await.code(), Code::Unavailable);
        let status = server.exit_status().await;
        assert!(status.success(), "SIG{signal}: {status:?}");
    }
}

/// "listening on", the line scripts wait for, comes only once the store is open, migrated
/// and loaded; a store that cannot open ends the process with one line saying why, and
/// nothing ever claims to listen.
#[tokio::test]
async fn the_binary_announces_itself_only_once_its_store_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let run = |data_dir: &std::path::Path| {
        let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_confab-server"));
        server
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .kill_on_drop(true);
        server
    };

    let not_a_dir = dir.path().join("a-file");
    std::fs::write(&not_a_dir, "not a data dir").unwrap();
    let output = within("the server to give up", run(&not_a_dir).output())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(!stderr.contains("listening on"), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("confab-server: storage: ") && last.contains("a-file"),
        "one line that says why: {stderr}"
    );
    assert_eq!(stderr.matches("a-file").count(), 2, "said once: {stderr}");

    // A good data dir: the store's migrations are logged before "listening on".
    let mut child = run(&dir.path().join("data"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut before = Vec::new();
    within("the server to listen", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("listening on") {
                return;
            }
            before.push(line);
        }
        panic!("the server exited: {before:?}");
    })
    .await;
    assert!(
        before.iter().any(|l| l.contains("store schema migrated")),
        "{before:?}"
    );
}

/// Reflection v1 and v1alpha both list every service and describe the chat service, so
/// grpcurl and `buf curl` work whichever version they speak.
#[tokio::test]
async fn reflection_lists_every_service_in_both_versions() {
    use tonic_reflection::pb::{v1, v1alpha};
    let server = TestServer::start().await;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let expected = [
        "chat.v1.ChatService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut replies = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = within("a v1 reflection reply", replies.message())
        .await
        .unwrap()
        .unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("{reply:?}")
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, expected);

    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "chat.v1.ChatService".into(),
            ),
        ),
    };
    let mut replies = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = within("a v1alpha reflection reply", replies.message())
        .await
        .unwrap()
        .unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        reply.message_response
    else {
        panic!("{reply:?}")
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

/// Every service accepts gzip and zstd, and answers compressed when asked: the chat
/// service, health and reflection alike.
#[tokio::test]
async fn every_service_speaks_gzip_and_zstd() {
    use tonic::codec::CompressionEncoding::{Gzip, Zstd};
    let server = TestServer::start().await;
    for (encoding, name) in [(Gzip, "gzip"), (Zstd, "zstd")] {
        let mut client = confab::Client::connect(&server.url())
            .await
            .unwrap()
            .with_compression(encoding);
        client.login(&format!("user-{name}")).await.unwrap();
        let reply = client
            .rpc()
            .create_room(pb::CreateRoomRequest {
                room: format!("room-{name}"),
                topic: "x".repeat(200),
                private: false,
            })
            .await
            .expect("a compressed request is accepted");
        assert_eq!(reply.metadata().get("grpc-encoding").unwrap(), name);

        let mut chat = Events::open(&client).await;
        chat.join(&format!("room-{name}"), None).await;
        assert_eq!(chat.say(&format!("room-{name}"), "squeezed").await, 1);

        let channel = tonic::transport::Endpoint::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let health = HealthClient::new(channel.clone())
            .send_compressed(encoding)
            .accept_compressed(encoding)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health accepts it");
        assert_eq!(health.metadata().get("grpc-encoding").unwrap(), name);

        use tonic_reflection::pb::v1;
        let mut reflection = v1::server_reflection_client::ServerReflectionClient::new(channel)
            .send_compressed(encoding)
            .accept_compressed(encoding);
        let request = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        let replies = reflection
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .expect("reflection accepts it");
        assert_eq!(replies.metadata().get("grpc-encoding").unwrap(), name);
        let mut replies = replies.into_inner();
        within("a compressed reflection reply", replies.message())
            .await
            .unwrap()
            .unwrap();
    }
}
