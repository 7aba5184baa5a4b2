//! What the end-to-end tests share: a real server on `127.0.0.1:0`, logged-in clients, a
//! reader that waits for events with a deadline, and a TCP proxy that can cut or freeze a
//! connection the way a crashed client or a dead network would.

#![allow(dead_code)] // each test file uses its own part of this

pub mod conversation;
pub mod storage;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use confab::{
    ChatMessage, ChatStream, Client,
    pb::{
        ChatResponse, CommandError, OutgoingMessage, PresenceKind, PublishBatchRequest,
        PublishBatchResponse, RoomPosition, SubscribeRequest, SubscribeResponse,
        chat_response::Event,
    },
};
use confab_server::{Config, ServerError, limits::LimitConfig};
pub use storage::{Engine, Storage};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Notify, oneshot},
    task::JoinHandle,
};
use tonic::{Code, Status};

/// How long any single wait in a test may take before the test fails. Generous: it is a
/// bound on a hang, not a performance assertion.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Awaits `future`, failing the test with `what` if it takes longer than [`DEADLINE`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// The default settings without flood control: the tests flood on purpose (flood control
/// has tests of its own, which set the limits they test).
pub fn config() -> Config {
    Config {
        limits: LimitConfig::unlimited(),
        ..Config::default()
    }
}

/// How often [`eventually`] and [`metrics_until`] look again.
const POLL: Duration = Duration::from_millis(20);

/// Tries `attempt` until it gives a value, failing the test with `what` after [`DEADLINE`]:
/// for what the server does on its own a moment later (notice a closed stream, free a slot).
pub async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> T {
    within(what, async {
        loop {
            if let Some(value) = attempt().await {
                return value;
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await
}

/// A running server.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its metrics are served (`http://{metrics_addr}/metrics`).
    pub metrics_addr: SocketAddr,
    /// Its storage, when the test did not give one (removed with the server).
    _storage: Option<Storage>,
    /// Sends the shutdown signal.
    stop: Option<oneshot::Sender<()>>,
    /// The server task; resolves when `run` returns.
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    /// A server with the [`config`] settings.
    pub async fn start() -> Self {
        Self::with(config()).await
    }

    /// A server with `config` (its `listen` is ignored: the port is picked by the OS),
    /// storing into a fresh temporary data dir unless it is `in_memory`.
    pub async fn with(config: Config) -> Self {
        if config.in_memory {
            return Self::on("127.0.0.1:0", config).await;
        }
        Self::with_on(Engine::Sqlite, config).await
    }

    /// A server with the [`config`] settings on fresh storage of `engine`.
    pub async fn start_on(engine: Engine) -> Self {
        Self::with_on(engine, config()).await
    }

    /// A server with `config` (its `listen` and storage ignored) on fresh storage of
    /// `engine`, removed with the server.
    pub async fn with_on(engine: Engine, config: Config) -> Self {
        let storage = Storage::new(engine);
        let mut server = Self::on("127.0.0.1:0", storage.apply(config)).await;
        server._storage = Some(storage);
        server
    }

    /// A server on `addr` with `config` as it is (its data dir included).
    pub async fn on(addr: &str, config: Config) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let metrics = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let metrics_addr = metrics.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(confab_server::run_with_metrics(
            listener,
            Some(metrics),
            config,
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            metrics_addr,
            _storage: None,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `http://` address of the server.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client connected and logged in as `nickname`.
    pub async fn client(&self, nickname: &str) -> Client {
        client_at(&self.url(), nickname).await
    }

    /// A client connected but not logged in.
    pub async fn anonymous(&self) -> Client {
        Client::connect(&self.url()).await.expect("connect")
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        self.signal_stop();
        let task = self.task.take().expect("server task");
        within("the server to stop", task)
            .await
            .expect("server task panicked")
    }

    /// Signals shutdown without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

/// A client at `url`, logged in as `nickname`.
pub async fn client_at(url: &str, nickname: &str) -> Client {
    let mut client = Client::connect(url).await.expect("connect");
    client.login(nickname).await.expect("login");
    client
}

/// Reads events from a chat stream with a deadline.
pub struct Events {
    /// The stream being read.
    pub chat: ChatStream,
}

impl Events {
    /// Opens a chat stream for `client`.
    pub async fn open(client: &Client) -> Self {
        Self {
            chat: client.chat().await.expect("open chat stream"),
        }
    }

    /// The next event.
    pub async fn next(&mut self) -> ChatResponse {
        within("the next chat event", self.chat.next_event())
            .await
            .expect("chat stream failed")
            .expect("chat stream ended")
    }

    /// Skips events until one matches, and returns it.
    pub async fn until(
        &mut self,
        what: &str,
        mut matches: impl FnMut(&ChatResponse) -> bool,
    ) -> ChatResponse {
        within(what, async {
            loop {
                let event = self
                    .chat
                    .next_event()
                    .await
                    .unwrap_or_else(|status| {
                        panic!("chat stream failed waiting for {what}: {status:?}")
                    })
                    .unwrap_or_else(|| panic!("chat stream ended waiting for {what}"));
                if matches(&event) {
                    return event;
                }
            }
        })
        .await
    }

    /// The reply to `request_id`.
    pub async fn reply(&mut self, request_id: u64) -> Event {
        self.until(&format!("the reply to request {request_id}"), |e| {
            e.request_id == request_id
        })
        .await
        .event
        .expect("reply without event")
    }

    /// Joins `room` and returns the `Joined` reply.
    pub async fn join(&mut self, room: &str, after_seq: Option<u64>) -> confab::pb::Joined {
        let id = self
            .chat
            .sender()
            .join(room, after_seq)
            .await
            .expect("send join");
        match self.reply(id).await {
            Event::Joined(joined) => joined,
            other => panic!("join {room} failed: {other:?}"),
        }
    }

    /// Sends `text` to `room` and returns the acked seq.
    pub async fn say(&mut self, room: &str, text: &str) -> u64 {
        let (id, _) = self.chat.sender().say(room, text).await.expect("send");
        match self.reply(id).await {
            Event::Ack(ack) => ack.seq,
            other => panic!("send to {room} failed: {other:?}"),
        }
    }

    /// The next chat message (skipping presence, typing, replies).
    pub async fn message(&mut self) -> ChatMessage {
        match self
            .until("a message", |e| matches!(e.event, Some(Event::Message(_))))
            .await
            .event
        {
            Some(Event::Message(message)) => message,
            _ => unreachable!(),
        }
    }

    /// Skips events until `user`'s presence changes as `kind` says, and returns the event.
    pub async fn presence(&mut self, user: &str, kind: PresenceKind) -> ChatResponse {
        self.until(
            &format!("{user} {kind:?}"),
            |e| matches!(&e.event, Some(Event::Presence(p)) if p.user == user && p.kind() == kind),
        )
        .await
    }

    /// The seqs of the next `n` messages.
    pub async fn seqs(&mut self, n: usize) -> Vec<u64> {
        let mut seqs = Vec::with_capacity(n);
        while seqs.len() < n {
            seqs.push(self.message().await.seq);
        }
        seqs
    }

    /// Reads until the stream ends with an error status, and returns it.
    pub async fn end_status(&mut self) -> Status {
        within("the stream to end", async {
            loop {
                match self.chat.next_event().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("stream ended without an error status"),
                    Err(status) => return status,
                }
            }
        })
        .await
    }
}

/// Sixteen readers, spread over `servers` in turn, join room `fresh` (which does not exist
/// yet) all at once, so that any of them may be the one that makes it; then a publisher
/// on the first server sends 50 messages, and every reader must get all of them, in order.
pub async fn joins_at_once_make_one_room(servers: &[&TestServer]) {
    const READERS: usize = 16;
    let mut joining = tokio::task::JoinSet::new();
    for r in 0..READERS {
        let client = servers[r % servers.len()]
            .client(&format!("reader{r}"))
            .await;
        joining.spawn(async move {
            let mut events = Events::open(&client).await;
            events.join("fresh", None).await;
            (client, events)
        });
    }
    let mut readers = Vec::new();
    while let Some(joined) = joining.join_next().await {
        readers.push(joined.expect("a join"));
    }
    let publisher = servers[0].client("publisher").await;
    let mut publishing = Events::open(&publisher).await;
    publishing.join("fresh", None).await;
    for n in 0..50 {
        publishing.say("fresh", &format!("m{n}")).await;
    }
    for (_, events) in &mut readers {
        assert_eq!(events.seqs(50).await, (1..=50).collect::<Vec<_>>());
    }
}

/// The first page of `room`'s members, as `client`'s user sees it.
pub async fn members(client: &Client, room: &str) -> Vec<String> {
    client
        .rpc()
        .list_members(confab::pb::ListMembersRequest {
            room: room.into(),
            ..Default::default()
        })
        .await
        .expect("list the members")
        .into_inner()
        .members
}

/// Creates room `room` as `client`'s user.
pub async fn create_room(client: &Client, room: &str) {
    client
        .rpc()
        .create_room(confab::pb::CreateRoomRequest {
            room: room.into(),
            ..Default::default()
        })
        .await
        .expect("create the room");
}

/// Publishes `count` messages to `room` on one `PublishBatch` stream, from a task.
pub fn flood(
    client: Client,
    room: &str,
    count: u64,
) -> JoinHandle<Result<tonic::Response<PublishBatchResponse>, Status>> {
    let room = room.to_owned();
    let batch = futures::stream::iter((1..=count).map(move |n| PublishBatchRequest {
        message: Some(OutgoingMessage {
            room: room.clone(),
            text: format!("flood message {n} with some padding to make it longer"),
            client_msg_id: format!("flood-{n}"),
            kind: 0,
        }),
    }));
    tokio::spawn(async move { client.rpc().publish_batch(batch).await })
}

/// A reader that stops reading while `count` messages flood room `flood`: joins it and a
/// brisk reader, publishes, and checks that the brisk reader got every message in order
/// meanwhile. Returns the stalled reader's client and stream (not read yet) and the batch.
pub async fn flood_past_a_stalled_reader(
    server: &TestServer,
    count: u64,
) -> (
    Client,
    Events,
    JoinHandle<Result<tonic::Response<PublishBatchResponse>, Status>>,
) {
    let stalled_client = server.client("stalled").await;
    let mut stalled = Events::open(&stalled_client).await;
    stalled.join("flood", None).await;
    let brisk_client = server.client("brisk").await;
    let mut brisk = Events::open(&brisk_client).await;
    brisk.join("flood", None).await;

    let publishing = flood(server.client("publisher").await, "flood", count);
    assert_eq!(
        brisk.seqs(count as usize).await,
        (1..=count).collect::<Vec<_>>(),
        "the brisk reader keeps up while the stalled one reads nothing"
    );
    (stalled_client, stalled, publishing)
}

/// A `Subscribe` stream of one room after `after_seq`.
pub async fn subscribe(
    client: &Client,
    room: &str,
    after_seq: Option<u64>,
) -> tonic::Streaming<SubscribeResponse> {
    client
        .rpc()
        .subscribe(SubscribeRequest {
            rooms: vec![RoomPosition {
                room: room.into(),
                after_seq,
                ..Default::default()
            }],
        })
        .await
        .expect("subscribe")
        .into_inner()
}

/// The code and field violations of an in-band error event.
pub fn command_error(event: Event) -> (Code, Vec<String>) {
    match event {
        Event::Error(error) => (Code::from(error.code), fields(&error)),
        other => panic!("expected an error event, got {other:?}"),
    }
}

/// The field paths an in-band error names.
pub fn fields(error: &CommandError) -> Vec<String> {
    error
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect()
}

/// The field paths of a status's BadRequest details.
pub fn violated_fields(status: &Status) -> Vec<String> {
    use tonic_types::StatusExt as _;
    status
        .get_details_bad_request()
        .map(|bad| bad.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// A TCP proxy in front of a server, whose connections the test can sever.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Set to drop every connection at once (like a killed process: the kernel closes it).
    cut: Arc<Notify>,
    /// Set to stop forwarding while keeping sockets open (like a dead network path).
    frozen: Arc<AtomicBool>,
}

impl Proxy {
    /// A proxy that forwards to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(Notify::new());
        let frozen = Arc::new(AtomicBool::new(false));
        let (cut_all, frozen_all) = (cut.clone(), frozen.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let cut = cut_all.clone();
                let frozen = frozen_all.clone();
                tokio::spawn(async move {
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        _ = pump(client_read, server_write, frozen.clone()) => {}
                        _ = pump(server_read, client_write, frozen) => {}
                        _ = cut.notified() => {}
                    }
                    // Dropping both halves closes both sockets.
                });
            }
        });
        Self { addr, cut, frozen }
    }

    /// `http://` address of the proxy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every proxied connection at once.
    pub fn cut(&self) {
        self.cut.notify_waiters();
    }

    /// Stops forwarding bytes in both directions, keeping the sockets open.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Swallow everything from now on, as a dead path would.
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The server's metrics page (`GET /metrics` on `addr`), as text.
pub async fn scrape(addr: SocketAddr) -> String {
    within("the metrics page", async {
        let mut stream = TcpStream::connect(addr).await.expect("connect to metrics");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("send request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("read response");
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "metrics answered {response:?}"
        );
        response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .expect("a body")
    })
    .await
}

/// The value of the sample `name` (with its labels, as written: `confab_streams{kind="chat"}`)
/// on a metrics page.
pub fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|line| {
            let (sample, value) = line.rsplit_once(' ')?;
            (sample == name).then(|| value.parse().expect("a number"))
        })
        .unwrap_or_else(|| panic!("no sample {name} in:\n{page}"))
}

/// Scrapes until `done` holds for the page (the server notices closed streams a moment
/// after the client closes them); returns that page.
pub async fn metrics_until(addr: SocketAddr, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let page = scrape(addr).await;
        if done(&page) {
            return page;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}; the last page:\n{page}");
        }
        tokio::time::sleep(POLL).await;
    }
}
