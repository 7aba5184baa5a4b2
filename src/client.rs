//! The typed client: the only gRPC client code in Confab.
//!
//! [`Client`] holds one HTTP/2 channel and the caller's credentials; every call it makes
//! carries `authorization: Bearer <token>` once [`Client::login`] succeeded. Unary calls go
//! through [`Client::rpc`]; the interactive session is [`ChatStream`], opened by
//! [`Client::chat`], which numbers frames and makes idempotency keys so that callers only
//! say what they want.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rand::Rng as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Status,
    codec::CompressionEncoding,
    metadata::{AsciiMetadataValue, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::pb::{
    self, ChatRequest, ChatResponse, JoinRoom, LeaveRoom, OutgoingMessage, SetTyping,
    chat_request::Command, chat_service_client::ChatServiceClient,
};

/// The generated stub with Confab's credentials attached to every call.
pub type Rpc = ChatServiceClient<InterceptedService<Channel, Credentials>>;

/// How many frames a [`ChatStream`] queues before `send` waits for the network.
const OUTBOUND_QUEUE: usize = 64;
/// A connection silent this long is pinged (the server's default too).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// How long a ping may go unanswered before the connection counts as dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// What can go wrong in the client library.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address is not a valid URI.
    #[error("invalid server address {address:?}: {source}")]
    InvalidAddress {
        /// The address as given.
        address: String,
        /// Why it was refused.
        source: tonic::transport::Error,
    },
    /// No connection could be made to the server.
    #[error("cannot reach {address}: {cause}")]
    Unreachable {
        /// The address as given.
        address: String,
        /// Why, in plain words.
        cause: Unreachable,
    },
    /// The connection was lost.
    #[error("the connection failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The server answered with an error status: its message is what people are shown.
    #[error("{}", status_text(.0))]
    Status(#[from] Status),
    /// The token the server issued cannot be sent as metadata.
    #[error("the server returned a token that is not valid ASCII metadata")]
    BadToken,
    /// The chat stream ended (the server closed it or the connection dropped).
    #[error("the chat stream is closed")]
    StreamClosed,
}

impl ClientError {
    /// Whether trying again as things are cannot help: an invalid address, a server whose
    /// certificate is not trusted, or a login the server refused (a nickname that is
    /// invalid or taken, a bad or expired token). Anything else (a server down, a
    /// connection reset, a server shutting down) may pass.
    pub fn is_permanent(&self) -> bool {
        match self {
            ClientError::InvalidAddress { .. } | ClientError::BadToken => true,
            ClientError::Unreachable { cause, .. } => matches!(cause, Unreachable::Tls(_)),
            ClientError::Status(status) => matches!(
                status.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::AlreadyExists
                    | tonic::Code::Unauthenticated
                    | tonic::Code::PermissionDenied
            ),
            ClientError::Transport(_) | ClientError::StreamClosed => false,
        }
    }

    /// Whether nothing listens at the address (the server is not running there).
    pub fn is_refused(&self) -> bool {
        matches!(
            self,
            ClientError::Unreachable {
                cause: Unreachable::Refused,
                ..
            }
        )
    }
}

/// A status as people should read it: the server's own words, or (a status with no
/// message, from a proxy or the transport) what its code means.
fn status_text(status: &Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_owned()
    }
}

/// Why a connection could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreachable {
    /// Nothing listens at the address.
    #[error("connection refused (no server is listening there)")]
    Refused,
    /// The host name does not resolve.
    #[error("no such host")]
    NoSuchHost,
    /// No answer within the connect timeout.
    #[error("no answer (timed out)")]
    TimedOut,
    /// The TLS handshake failed, and why (an untrusted or mismatched certificate…).
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// Anything else the network said.
    #[error("{0}")]
    Other(String),
}

impl Unreachable {
    /// Reads the cause out of a transport error's chain of sources.
    fn of(error: &tonic::transport::Error) -> Self {
        let mut chain: Vec<&(dyn std::error::Error + 'static)> = Vec::new();
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(error) = next {
            chain.push(error);
            next = error.source();
        }
        let text = |e: &&(dyn std::error::Error + 'static)| e.to_string().to_lowercase();
        if let Some(tls) = chain.iter().find(|e| {
            let t = text(e);
            t.contains("certificate") || t.contains("tls") || t.contains("handshake")
        }) {
            // The innermost cause says most (rustls' own words).
            let innermost = chain
                .last()
                .map_or_else(|| tls.to_string(), |e| e.to_string());
            return Self::Tls(innermost);
        }
        for error in &chain {
            if let Some(io) = error.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => return Self::Refused,
                    std::io::ErrorKind::TimedOut => return Self::TimedOut,
                    _ => {}
                }
            }
            let t = text(error);
            if t.contains("dns error") || t.contains("failed to lookup address") {
                return Self::NoSuchHost;
            }
            if t.contains("timed out") {
                return Self::TimedOut;
            }
        }
        Self::Other(
            chain
                .last()
                .map_or_else(|| error.to_string(), |e| e.to_string()),
        )
    }
}

/// A server address as [`Client::connect`] takes it: `http://host:port`, `https://…`, or
/// a bare `host:port` (as grpcurl takes it), which means `http://host:port`.
pub fn server_url(address: &str) -> String {
    if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    }
}

/// How to check the server (and, for mutual TLS, who this client is).
#[derive(Clone, Debug, Default)]
pub struct Tls {
    /// The CA (PEM) that signed the server's certificate; `None`: the usual web roots.
    pub ca_pem: Option<Vec<u8>>,
    /// For mutual TLS: this client's certificate and key (PEM).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Adds `authorization: Bearer <token>` to every call once a token is known.
#[derive(Clone, Default)]
pub struct Credentials {
    /// The full header value, `Bearer <token>`; `None` before login.
    authorization: Option<AsciiMetadataValue>,
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A connection to a Confab server and the identity it speaks for.
#[derive(Clone)]
pub struct Client {
    /// The HTTP/2 channel; cloned into every stub, multiplexing all calls on one connection.
    channel: Channel,
    /// The stub with the current credentials.
    rpc: Rpc,
    /// The session token from the last successful login.
    token: Option<String>,
    /// The nickname the token speaks for.
    nickname: Option<String>,
    /// Compression for requests and (if the server agrees) responses.
    compression: Option<CompressionEncoding>,
}

impl Client {
    /// Connects to `address` (`http://host:port`, a bare `host:port`, or `https://` with
    /// the web's usual roots), without logging in.
    pub async fn connect(address: &str) -> Result<Self, ClientError> {
        Self::connect_with(address, None).await
    }

    /// Connects to `address` with TLS settings (used for `https://` addresses).
    pub async fn connect_with(address: &str, tls: Option<&Tls>) -> Result<Self, ClientError> {
        let invalid = |source| ClientError::InvalidAddress {
            address: address.to_owned(),
            source,
        };
        let url = server_url(address);
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(invalid)?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            // The server's own defaults: a silently dead network is noticed within 80 s
            // (a server that stops closes its sockets and is noticed at once), and 10,000
            // quiet clients cost the server a few pings a second each minute, not thousands.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            // h2 closes a connection (ENHANCE_YOUR_CALM) once the server's small DATA
            // frames that the application has not read yet cost more framing overhead
            // than half the connection window. Chat frames are small (~100 bytes, one per
            // event when a room is quiet), so with hyper's defaults (2 MiB per stream,
            // 5 MiB per connection) a reader paused for a few thousand events would be cut
            // off by its own library before flow control stopped the server. A stream
            // window of 1 MiB in a connection window of 8 MiB makes flow control come
            // first: a paused stream's 1 MiB of frames costs under 2 MiB of the 4 MiB.
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(8 << 20);
        if url.starts_with("https://") {
            let tls = tls.cloned().unwrap_or_default();
            let mut config = ClientTlsConfig::new();
            config = match tls.ca_pem {
                Some(ca) => config.ca_certificate(Certificate::from_pem(ca)),
                None => config.with_webpki_roots(),
            };
            if let Some((cert, key)) = tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint.tls_config(config).map_err(invalid)?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| ClientError::Unreachable {
                address: address.to_owned(),
                cause: Unreachable::of(&error),
            })?;
        Ok(Self::from_channel(channel))
    }

    /// Wraps an existing channel (for callers that build their own, e.g. with TLS).
    pub fn from_channel(channel: Channel) -> Self {
        let mut client = Self {
            rpc: ChatServiceClient::with_interceptor(channel.clone(), Credentials::default()),
            channel,
            token: None,
            nickname: None,
            compression: None,
        };
        client.rpc = client.stub(Credentials::default());
        client
    }

    /// Compresses requests with `encoding` and asks for compressed responses (worth it on
    /// slow links; on loopback it only costs CPU).
    pub fn with_compression(mut self, encoding: CompressionEncoding) -> Self {
        self.compression = Some(encoding);
        let credentials = self.credentials();
        self.rpc = self.stub(credentials);
        self
    }

    fn credentials(&self) -> Credentials {
        Credentials {
            authorization: self
                .token
                .as_ref()
                .and_then(|t| MetadataValue::try_from(format!("Bearer {t}")).ok()),
        }
    }

    /// A stub over the channel with `credentials` and the chosen compression.
    fn stub(&self, credentials: Credentials) -> Rpc {
        let stub = ChatServiceClient::with_interceptor(self.channel.clone(), credentials);
        match self.compression {
            Some(encoding) => stub.send_compressed(encoding).accept_compressed(encoding),
            None => stub,
        }
    }

    /// Claims `nickname`; later calls carry the returned token. A token from an earlier
    /// login of the same nickname reclaims it even while the old session looks alive.
    pub async fn login(&mut self, nickname: &str) -> Result<pb::LoginResponse, ClientError> {
        let request = pb::LoginRequest {
            nickname: nickname.to_owned(),
            resume_token: self.token.clone().unwrap_or_default(),
        };
        // Login goes without credentials: an old token travels only as `resume_token`,
        // where a stale one (from before a server restart) is no error.
        let reply = ChatServiceClient::new(self.channel.clone())
            .login(request)
            .await?
            .into_inner();
        self.set_token(&reply.token)?;
        self.nickname = Some(reply.nickname.clone());
        Ok(reply)
    }

    /// Logs in with a token from an identity provider (a server started with `--jwt-*`):
    /// the server confirms it and says which user it speaks for. `nickname`, if not empty,
    /// must be that user.
    pub async fn login_with_token(
        &mut self,
        token: &str,
        nickname: &str,
    ) -> Result<pb::LoginResponse, ClientError> {
        self.set_token(token)?;
        let request = pb::LoginRequest {
            nickname: nickname.to_owned(),
            resume_token: String::new(),
        };
        let reply = self.rpc.clone().login(request).await?.into_inner();
        self.nickname = Some(reply.nickname.clone());
        Ok(reply)
    }

    /// Uses `token` for later calls (one issued by [`Client::login`] earlier).
    pub fn set_token(&mut self, token: &str) -> Result<(), ClientError> {
        let value: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| ClientError::BadToken)?;
        self.rpc = self.stub(Credentials {
            authorization: Some(value),
        });
        self.token = Some(token.to_owned());
        Ok(())
    }

    /// The session token, once logged in.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The nickname this client speaks for, once logged in.
    pub fn nickname(&self) -> Option<&str> {
        self.nickname.as_deref()
    }

    /// The generated stub, for unary and streaming calls as they are in the protocol.
    pub fn rpc(&self) -> Rpc {
        self.rpc.clone()
    }

    /// Opens the interactive `Chat` stream.
    pub async fn chat(&self) -> Result<ChatStream, ClientError> {
        let (frames, outbound) = mpsc::channel(OUTBOUND_QUEUE);
        let events = self
            .rpc
            .clone()
            .chat(ReceiverStream::new(outbound))
            .await?
            .into_inner();
        Ok(ChatStream {
            sender: ChatSender {
                frames,
                next_request_id: Arc::new(AtomicU64::new(1)),
            },
            events,
        })
    }
}

/// Makes a fresh idempotency key for a message.
pub fn new_client_msg_id() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

/// One open `Chat` stream: commands go up with fresh request ids, events come down.
///
/// [`ChatStream::split`] separates the two halves, so that one task can read while others
/// send (a client that sends without reading would stall once the server's buffer for it
/// is full: that is the backpressure working).
pub struct ChatStream {
    /// The sending half.
    sender: ChatSender,
    /// Events from the server.
    events: tonic::Streaming<ChatResponse>,
}

impl ChatStream {
    /// The sending half, to send commands.
    pub fn sender(&self) -> &ChatSender {
        &self.sender
    }

    /// The next event; `Ok(None)` when the server ended the stream cleanly.
    pub async fn next_event(&mut self) -> Result<Option<ChatResponse>, Status> {
        self.events.message().await
    }

    /// The sending half and the events, to use from different tasks.
    pub fn split(self) -> (ChatSender, tonic::Streaming<ChatResponse>) {
        (self.sender, self.events)
    }
}

/// The sending half of a `Chat` stream. Clones share one request-id sequence; the stream's
/// sending side ends when every clone is dropped.
#[derive(Clone)]
pub struct ChatSender {
    /// Frames to the server.
    frames: mpsc::Sender<ChatRequest>,
    /// The request id the next frame gets.
    next_request_id: Arc<AtomicU64>,
}

impl ChatSender {
    /// Sends `command` and returns the request id its reply will carry.
    pub async fn command(&self, command: Command) -> Result<u64, ClientError> {
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        self.send_frame(ChatRequest {
            request_id,
            command: Some(command),
        })
        .await?;
        Ok(request_id)
    }

    /// Whether a frame can be queued now without waiting.
    pub fn has_room(&self) -> bool {
        self.frames.capacity() > 0
    }

    /// Resolves once a frame can be queued without waiting (or the stream is closed): a
    /// full queue is waited on, not polled.
    pub async fn room(&self) {
        // The slot is reserved only to learn it is free; dropping the permit frees it.
        let _ = self.frames.reserve().await;
    }

    /// Sends a frame as it is (for callers that manage request ids themselves).
    pub async fn send_frame(&self, frame: ChatRequest) -> Result<(), ClientError> {
        self.frames
            .send(frame)
            .await
            .map_err(|_| ClientError::StreamClosed)
    }

    /// Joins `room`; with `after_seq`, resumes after that seq instead of recent history.
    pub async fn join(&self, room: &str, after_seq: Option<u64>) -> Result<u64, ClientError> {
        self.join_at(room, after_seq, "").await
    }

    /// Joins `room` as [`ChatSender::join`] does, `after_seq` counting in the room's
    /// `epoch` (from the last `Joined`, empty if unknown): if the room's log has started
    /// again since, the server replays the new one after a reset gap.
    pub async fn join_at(
        &self,
        room: &str,
        after_seq: Option<u64>,
        epoch: &str,
    ) -> Result<u64, ClientError> {
        self.command(Command::Join(JoinRoom {
            room: room.to_owned(),
            after_seq,
            epoch: epoch.to_owned(),
        }))
        .await
    }

    /// Leaves `room`.
    pub async fn leave(&self, room: &str) -> Result<u64, ClientError> {
        self.command(Command::Leave(LeaveRoom {
            room: room.to_owned(),
        }))
        .await
    }

    /// Sends a text message with a fresh idempotency key; returns the request id and key.
    pub async fn say(&self, room: &str, text: &str) -> Result<(u64, String), ClientError> {
        let client_msg_id = new_client_msg_id();
        let request_id = self
            .send(OutgoingMessage {
                room: room.to_owned(),
                text: text.to_owned(),
                client_msg_id: client_msg_id.clone(),
                kind: pb::MessageKind::Text as i32,
            })
            .await?;
        Ok((request_id, client_msg_id))
    }

    /// Sends a message as given (its `client_msg_id` is the caller's).
    pub async fn send(&self, message: OutgoingMessage) -> Result<u64, ClientError> {
        self.command(Command::Send(message)).await
    }

    /// Tells `room` that this user is (or stopped) typing.
    pub async fn typing(&self, room: &str, typing: bool) -> Result<u64, ClientError> {
        self.command(Command::Typing(SetTyping {
            room: room.to_owned(),
            typing,
        }))
        .await
    }

    /// Sets `room`'s topic.
    pub async fn set_topic(&self, room: &str, topic: &str) -> Result<u64, ClientError> {
        self.command(Command::SetTopic(pb::SetTopic {
            room: room.to_owned(),
            topic: topic.to_owned(),
        }))
        .await
    }

    /// Owner only: lets `user` into private `room` (and lifts a ban); `moderation_done` confirms.
    pub async fn invite(&self, room: &str, user: &str) -> Result<u64, ClientError> {
        self.command(Command::Invite(pb::Invite {
            room: room.to_owned(),
            user: user.to_owned(),
        }))
        .await
    }

    /// Owner only: puts `user` out of `room` (they may come back).
    pub async fn kick(&self, room: &str, user: &str, reason: &str) -> Result<u64, ClientError> {
        self.command(Command::Kick(pb::Kick {
            room: room.to_owned(),
            user: user.to_owned(),
            reason: reason.to_owned(),
        }))
        .await
    }

    /// Owner only: puts `user` out of `room` and keeps them out.
    pub async fn ban(&self, room: &str, user: &str, reason: &str) -> Result<u64, ClientError> {
        self.command(Command::Ban(pb::Ban {
            room: room.to_owned(),
            user: user.to_owned(),
            reason: reason.to_owned(),
        }))
        .await
    }

    /// Chats as `nickname` from now on; `renamed` (with a token for it) or an error answers.
    pub async fn rename(&self, nickname: &str) -> Result<u64, ClientError> {
        self.command(Command::Rename(pb::Rename {
            nickname: nickname.to_owned(),
        }))
        .await
    }

    /// Asks for a pong carrying `client_time_micros`.
    pub async fn ping(&self, client_time_micros: i64) -> Result<u64, ClientError> {
        self.command(Command::Ping(pb::Ping { client_time_micros }))
            .await
    }
}
