//! Hostile input against the real binary, one behaviour per test: frames that are not
//! protobuf, strings that are not UTF-8, values out of range, oversized and overlong
//! requests, junk that is not HTTP/2 at all, and thousands of connections and streams torn
//! down mid-flight. Through the storms two users chat and lose nothing; afterwards the
//! server's open streams, connections and tasks (read from its metrics) are back where
//! they started.

mod common;
#[path = "common/process.rs"]
mod process;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use common::{Events, client_at, metric, metrics_until, scrape, within};
use confab::{
    codec::RawCodec,
    pb::{PresenceKind, chat_response::Event},
};
use process::ServerProcess;
use tokio::{io::AsyncWriteExt as _, net::TcpStream, task::JoinSet};
use tonic::{Code, Request, Status, transport::Channel};

/// Calls unary `method` with `body` as the request message, as `token`'s user.
async fn raw_call(channel: &Channel, token: &str, method: &'static str, body: Vec<u8>) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    let mut request = Request::new(Bytes::from(body));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    match grpc.unary(request, path, RawCodec).await {
        Ok(reply) => panic!("{method} accepted a hostile frame: {:?}", reply.get_ref()),
        Err(status) => status,
    }
}

/// A length-delimited protobuf field.
fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![(number << 3) | 2];
    let mut len = bytes.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(bytes);
    out
}

const PUBLISH: &str = "/chat.v1.ChatService/Publish";
const SUBSCRIBE: &str = "/chat.v1.ChatService/Subscribe";

/// A server, and an intruder's channel and token to send it raw frames with.
struct Target {
    server: ServerProcess,
    channel: Channel,
    token: String,
    _data_dir: tempfile::TempDir,
}

impl Target {
    async fn start() -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        let server = ServerProcess::start(data_dir.path(), "127.0.0.1:0");
        let intruder = client_at(&server.url, "mallory").await;
        let token = intruder.token().unwrap().to_owned();
        let channel = Channel::from_shared(server.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self {
            server,
            channel,
            token,
            _data_dir: data_dir,
        }
    }

    /// Calls `method` with `body` as its request message; returns the refusal.
    async fn call(&self, method: &'static str, body: Vec<u8>) -> Status {
        raw_call(&self.channel, &self.token, method, body).await
    }
}

/// Two users chatting every 10 ms while a test does its worst; [`Chatter::check`] stops
/// them and checks that every message arrived in order and that the server's streams,
/// connections and tasks are back at what they were when the chat began.
struct Chatter {
    stop: Arc<AtomicBool>,
    alice: tokio::task::JoinHandle<(u64, Events)>,
    bob_chat: Events,
    base_tasks: f64,
    metrics_addr: std::net::SocketAddr,
}

impl Chatter {
    async fn start(server: &ServerProcess) -> Self {
        let alice = client_at(&server.url, "alice").await;
        let bob = client_at(&server.url, "bob").await;
        let mut alice_chat = Events::open(&alice).await;
        let mut bob_chat = Events::open(&bob).await;
        alice_chat.join("lobby", None).await;
        bob_chat.join("lobby", None).await;
        alice_chat.presence("bob", PresenceKind::Joined).await;
        let baseline = scrape(server.metrics_addr).await;
        assert_eq!(metric(&baseline, r#"confab_streams{kind="chat"}"#), 2.0);
        let stop = Arc::new(AtomicBool::new(false));
        let alice = {
            let stop = stop.clone();
            tokio::spawn(async move {
                // The clients stay alive as long as their streams: keep them here.
                let _clients = (alice, bob);
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    alice_chat.say("lobby", &format!("still here {sent}")).await;
                    sent += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (sent, alice_chat)
            })
        };
        Self {
            stop,
            alice,
            bob_chat,
            base_tasks: metric(&baseline, "confab_tasks"),
            metrics_addr: server.metrics_addr,
        }
    }

    /// Stops the chat and checks it and the server (whose only connections by then must be
    /// the two users'); returns the metrics page.
    async fn check(mut self) -> String {
        self.stop.store(true, Ordering::Relaxed);
        let (sent, _alice_chat) = within("the chatter to stop", self.alice).await.unwrap();
        assert!(sent > 0);
        let mut next = 0;
        while next < sent {
            let event = self.bob_chat.next().await;
            if let Some(Event::Message(message)) = event.event {
                assert_eq!(message.text, format!("still here {next}"));
                next += 1;
            }
        }
        let base_tasks = self.base_tasks;
        metrics_until(
            self.metrics_addr,
            "the server to be back at its baseline",
            |page| {
                metric(page, r#"confab_streams{kind="chat"}"#) == 2.0
                    && metric(page, r#"confab_streams{kind="subscribe"}"#) == 0.0
                    && metric(page, "confab_connections") == 2.0
                    && metric(page, "confab_tasks") <= base_tasks
            },
        )
        .await
    }
}

#[tokio::test]
async fn bytes_that_are_not_protobuf_are_internal() {
    let target = Target::start().await;
    let status = target.call(PUBLISH, vec![0xff; 16]).await;
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("decode"), "{status:?}");
}

#[tokio::test]
async fn a_string_that_is_not_utf8_is_internal_naming_the_field() {
    let target = Target::start().await;
    let outgoing = [field(1, b"lobby"), field(2, &[0xff, 0xfe, 0xfd])].concat();
    let status = target.call(PUBLISH, field(1, &outgoing)).await;
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("text"), "{status:?}");
}

#[tokio::test]
async fn an_enum_value_that_does_not_exist_is_invalid_argument() {
    let target = Target::start().await;
    let outgoing = [
        field(1, b"lobby"),
        field(2, b"hi"),
        field(3, b"id-1"),
        vec![4 << 3, 99],
    ]
    .concat();
    let status = target.call(PUBLISH, field(1, &outgoing)).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(common::violated_fields(&status), ["message.kind"]);
}

#[tokio::test]
async fn an_empty_request_is_invalid_argument() {
    let target = Target::start().await;
    let status = target.call(PUBLISH, Vec::new()).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(common::violated_fields(&status), ["message"]);
}

#[tokio::test]
async fn ten_thousand_rooms_in_one_subscription_are_refused() {
    let target = Target::start().await;
    let rooms: Vec<u8> = (0..10_000)
        .flat_map(|_| field(1, &field(1, b"a")))
        .collect();
    let status = target.call(SUBSCRIBE, rooms).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(common::violated_fields(&status), ["rooms"]);
}

#[tokio::test]
async fn a_frame_over_the_size_limit_is_out_of_range() {
    let target = Target::start().await;
    let huge = field(1, &field(2, &vec![b'x'; 200_000]));
    let status = target.call(PUBLISH, huge).await;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
}

/// Junk that is not HTTP/2, half a preface, and connections reset with RST: a thousand
/// of them, while two users chat.
#[tokio::test]
async fn junk_and_reset_connections_leave_nothing_behind() {
    let target = Target::start().await;
    let chatter = Chatter::start(&target.server).await;
    let mut storm = JoinSet::new();
    for round in 0..1_000usize {
        let addr = target.server.addr;
        storm.spawn(async move {
            let Ok(mut stream) = TcpStream::connect(addr).await else {
                return;
            };
            match round % 3 {
                0 => {
                    let _ = stream
                        .write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff garbage")
                        .await;
                }
                1 => {
                    let _ = stream.write_all(b"PRI * HTTP/2.0\r\n").await;
                }
                _ => {}
            }
            // SO_LINGER 0: closing sends RST instead of FIN.
            let _ = stream.set_zero_linger();
            drop(stream);
        });
        if storm.len() >= 32 {
            storm.join_next().await;
        }
    }
    while storm.join_next().await.is_some() {}
    drop(target.channel);
    let after = chatter.check().await;
    assert!(metric(&after, "confab_connections_accepted_total") >= 1_000.0);
}

/// Streams opened, joined and dropped without a word, thousands of them, on a handful of
/// connections: every one becomes an RST_STREAM the server must clean up after.
#[tokio::test]
async fn thousands_of_dropped_streams_leave_nothing_behind() {
    let target = Target::start().await;
    let chatter = Chatter::start(&target.server).await;
    let mut clients = Vec::new();
    for n in 0..8 {
        clients.push(client_at(&target.server.url, &format!("vandal{n}")).await);
    }
    let mut storm = JoinSet::new();
    for round in 0..2_000usize {
        let client = clients[round % clients.len()].clone();
        storm.spawn(async move {
            if let Ok(chat) = client.chat().await {
                let _ = chat.sender().join("lobby", None).await;
                if round % 2 == 0 {
                    tokio::task::yield_now().await;
                }
                drop(chat);
            }
        });
        if storm.len() >= 64 {
            storm.join_next().await;
        }
    }
    while storm.join_next().await.is_some() {}
    drop((clients, target.channel));
    chatter.check().await;
}
