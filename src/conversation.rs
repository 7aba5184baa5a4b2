//! [`Conversation`]: a chat session that survives the network.
//!
//! One task owns the connection. When the server goes away (it restarts, the network
//! drops, it asks clients to reconnect), the task waits with exponential backoff and
//! jitter, logs in again with its token (so it keeps its nickname), rejoins every room with
//! `after_seq` = the last seq it delivered, and sends again every message not yet acked,
//! with its original `client_msg_id`, so the server stores it once. Messages are delivered
//! to the application in seq order per room, each once: anything at or below the last seq
//! delivered is dropped.
//!
//! The application talks to the task through the [`Conversation`] handle and hears from
//! it through a channel of [`ConversationEvent`]s, which include [`ConnectionState`]
//! changes for a status line.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    num::NonZeroU32,
    time::Duration,
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng as _;
use tokio::sync::mpsc;
use tonic::Code;

use crate::{
    Client, ClientError,
    client::{ChatSender, new_client_msg_id},
    pb::{self, ChatResponse, OutgoingMessage, chat_request::Command, chat_response::Event},
};

/// Events the application queues before `say` and friends wait.
const COMMAND_QUEUE: usize = 256;
/// Events queued for the application before the connection task waits for it.
const EVENT_QUEUE: usize = 1024;

/// How to reach the server and whom to be.
#[derive(Debug, Clone)]
pub struct ConversationConfig {
    /// The servers' addresses (`http://host:port`): the nodes of one cluster, or one
    /// server. The first is tried first; when one cannot be reached or goes away, the next
    /// in turn (with backoff), and every room resumes from its last seq there.
    pub servers: Vec<String>,
    /// The nickname to claim.
    pub nickname: String,
    /// Rooms to join from the start.
    pub rooms: Vec<String>,
    /// How long to wait between attempts.
    pub backoff: Backoff,
    /// TLS settings for `https://` servers.
    pub tls: Option<crate::Tls>,
    /// A token from the server's identity provider (servers started with `--jwt-*`): used
    /// instead of claiming `nickname` with a login of its own.
    pub identity_token: Option<String>,
}

impl ConversationConfig {
    /// Settings for `nickname` at `server`, joining `rooms`, with the default backoff.
    pub fn new(server: impl Into<String>, nickname: impl Into<String>, rooms: &[&str]) -> Self {
        Self {
            servers: vec![server.into()],
            nickname: nickname.into(),
            rooms: rooms.iter().map(|r| r.to_string()).collect(),
            backoff: Backoff::default(),
            tls: None,
            identity_token: None,
        }
    }
}

/// Exponential backoff with jitter: attempt `n` waits between half and all of
/// `min(max, initial * 2^n)`, so clients that lost the same server do not return in step.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first wait.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The wait before attempt `attempt` (counting from 1 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
            .min(self.max);
        let half = ceiling / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }
}

/// Where the connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connecting; `attempt` is 0 for the first try.
    Connecting {
        /// How many attempts failed before this one.
        attempt: u32,
        /// The server this attempt goes to.
        server: String,
    },
    /// Connected and every room rejoined.
    Connected {
        /// True when every room resumed exactly after the last seq delivered (false when
        /// the server no longer had some of the missed messages: a gap event said which).
        /// Always true on the first connection.
        resume_complete: bool,
    },
    /// The server refused this client for a reason that trying again cannot fix (a
    /// nickname that is invalid or taken, a bad or expired token, a certificate not
    /// trusted). Nothing more is tried until [`Conversation::set_nickname`] gives a new
    /// nickname.
    Refused {
        /// What was refused and why, for people.
        reason: String,
        /// True when the login was refused (the nickname, or the token for it), which
        /// another nickname may fix; false when the server itself was refused (its
        /// address or certificate).
        login: bool,
    },
    /// The connection was lost; the next attempt comes after `retry_in`.
    Disconnected {
        /// What happened, for people.
        reason: String,
        /// The wait before the next attempt.
        retry_in: Duration,
    },
}

/// What a [`Conversation`] tells the application.
#[derive(Debug, Clone, PartialEq)]
pub enum ConversationEvent {
    /// The connection changed state.
    Connection(ConnectionState),
    /// An event from the server, messages deduplicated across reconnects.
    Server(ChatResponse),
    /// The answer to [`Conversation::list_rooms`]: the server's rooms, by name.
    Rooms(Vec<pb::RoomInfo>),
    /// A request outside the chat stream failed (e.g. listing rooms).
    Failed(String),
    /// The answer to [`Conversation::history`]: a page of `room`'s log, in seq order.
    History {
        /// The room.
        room: String,
        /// Which way the page was read.
        direction: HistoryDirection,
        /// The messages, oldest first.
        messages: Vec<pb::ChatMessage>,
        /// Whether the log goes on past the page in that direction.
        more: bool,
    },
    /// The server refused a message for good (it will not be sent again).
    Refused {
        /// The message's idempotency key, as [`Conversation::say`] returned it.
        client_msg_id: String,
        /// Why.
        error: pb::CommandError,
    },
}

/// Which way [`Conversation::history`] reads a room's log from a seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryDirection {
    /// Messages before the seq: scrolling back.
    Older,
    /// Messages after the seq: coming back down.
    Newer,
}

enum Op {
    Send(OutgoingMessage),
    History(String, HistoryDirection, u64, u32),
    Join(String),
    Leave(String),
    Typing(String, bool),
    Ping(i64),
    SetTopic(String, String),
    Moderate(Command),
    ListRooms,
    Nickname(String),
}

/// The handle to a conversation; dropping it ends the conversation.
#[derive(Clone)]
pub struct Conversation {
    ops: mpsc::Sender<Op>,
}

impl Conversation {
    /// Starts the conversation; events arrive on the returned receiver.
    pub fn start(config: ConversationConfig) -> (Self, mpsc::Receiver<ConversationEvent>) {
        let (ops, op_rx) = mpsc::channel(COMMAND_QUEUE);
        let (events, event_rx) = mpsc::channel(EVENT_QUEUE);
        let task = Task {
            rooms: config.rooms.iter().map(|r| (r.clone(), None)).collect(),
            config,
            next_server: 0,
            epochs: HashMap::new(),
            token: None,
            pending: VecDeque::new(),
            events,
            ops: op_rx,
        };
        tokio::spawn(task.run());
        (Self { ops }, event_rx)
    }

    async fn op(&self, op: Op) -> Result<(), ClientError> {
        self.ops
            .send(op)
            .await
            .map_err(|_| ClientError::StreamClosed)
    }

    /// Sends `text` to `room`; returns its `client_msg_id`. It is sent again after a
    /// reconnect until the server acks it.
    pub async fn say(&self, room: &str, text: &str) -> Result<String, ClientError> {
        self.send(room, text, pb::MessageKind::Text).await
    }

    /// Sends a message of `kind` (text or action); returns its `client_msg_id`.
    pub async fn send(
        &self,
        room: &str,
        text: &str,
        kind: pb::MessageKind,
    ) -> Result<String, ClientError> {
        let client_msg_id = new_client_msg_id();
        self.op(Op::Send(OutgoingMessage {
            room: room.to_owned(),
            text: text.to_owned(),
            client_msg_id: client_msg_id.clone(),
            kind: kind as i32,
        }))
        .await?;
        Ok(client_msg_id)
    }

    /// Joins `room` (and rejoins it after every reconnect).
    pub async fn join(&self, room: &str) -> Result<(), ClientError> {
        self.op(Op::Join(room.to_owned())).await
    }

    /// Leaves `room`.
    pub async fn leave(&self, room: &str) -> Result<(), ClientError> {
        self.op(Op::Leave(room.to_owned())).await
    }

    /// Tells `room` this user is (or stopped) typing; dropped while disconnected.
    pub async fn typing(&self, room: &str, typing: bool) -> Result<(), ClientError> {
        self.op(Op::Typing(room.to_owned(), typing)).await
    }

    /// Sets `room`'s topic; the `room_updated` event confirms it.
    pub async fn set_topic(&self, room: &str, topic: &str) -> Result<(), ClientError> {
        self.op(Op::SetTopic(room.to_owned(), topic.to_owned()))
            .await
    }

    /// Owner only: lets `user` into private `room`; `moderation_done` (or an error) answers.
    pub async fn invite(&self, room: &str, user: &str) -> Result<(), ClientError> {
        self.op(Op::Moderate(Command::Invite(pb::Invite {
            room: room.to_owned(),
            user: user.to_owned(),
        })))
        .await
    }

    /// Owner only: puts `user` out of `room`.
    pub async fn kick(&self, room: &str, user: &str, reason: &str) -> Result<(), ClientError> {
        self.op(Op::Moderate(Command::Kick(pb::Kick {
            room: room.to_owned(),
            user: user.to_owned(),
            reason: reason.to_owned(),
        })))
        .await
    }

    /// Owner only: puts `user` out of `room` and keeps them out.
    pub async fn ban(&self, room: &str, user: &str, reason: &str) -> Result<(), ClientError> {
        self.op(Op::Moderate(Command::Ban(pb::Ban {
            room: room.to_owned(),
            user: user.to_owned(),
            reason: reason.to_owned(),
        })))
        .await
    }

    /// Chats as `nickname` from now on: on a live connection the server renames the user
    /// in place (its rooms see a rename, and a `renamed` event confirms it, or an error
    /// event says why not); after a [`ConnectionState::Refused`] login, at once; while
    /// disconnected, from the next login.
    pub async fn set_nickname(&self, nickname: &str) -> Result<(), ClientError> {
        self.op(Op::Nickname(nickname.to_owned())).await
    }

    /// Asks for up to `limit` messages of `room` before (or after) `seq`; they arrive as
    /// [`ConversationEvent::History`].
    pub async fn history(
        &self,
        room: &str,
        direction: HistoryDirection,
        seq: u64,
        limit: u32,
    ) -> Result<(), ClientError> {
        self.op(Op::History(room.to_owned(), direction, seq, limit))
            .await
    }

    /// Asks for the server's rooms; they arrive as [`ConversationEvent::Rooms`].
    pub async fn list_rooms(&self) -> Result<(), ClientError> {
        self.op(Op::ListRooms).await
    }

    /// Pings the server; the pong comes back as a server event.
    pub async fn ping(&self, client_time_micros: i64) -> Result<(), ClientError> {
        self.op(Op::Ping(client_time_micros)).await
    }
}

/// Why a connection ended.
enum Lost {
    /// The application dropped its handle: stop.
    Closed,
    /// The connection failed: try again.
    Retry(String),
    /// The server refused what this client is (its nickname, token or trust): trying
    /// again as things are cannot help. `login`: it was the login that was refused.
    Refused { reason: String, login: bool },
}

impl Lost {
    /// `error` (of the login, if `login`), told as `reason`: retried, unless trying again
    /// cannot help.
    fn failed(reason: String, error: &ClientError, login: bool) -> Self {
        if error.is_permanent() {
            Lost::Refused { reason, login }
        } else {
            Lost::Retry(reason)
        }
    }
}

struct Task {
    config: ConversationConfig,
    /// Which of `config.servers` the next connection goes to.
    next_server: usize,
    /// The session token, presented again to keep the nickname.
    token: Option<String>,
    /// Joined rooms and the last seq delivered in each (`None`: nothing yet).
    rooms: BTreeMap<String, Option<u64>>,
    /// Each joined room's epoch, as the last join said: the seqs above count in it.
    epochs: HashMap<String, String>,
    /// Messages sent and not yet acked, in the order they were sent.
    pending: VecDeque<OutgoingMessage>,
    /// To the application.
    events: mpsc::Sender<ConversationEvent>,
    /// From the application.
    ops: mpsc::Receiver<Op>,
}

/// How long a send the server could not store for now (UNAVAILABLE) waits to go again.
const UNAVAILABLE_RETRY: Duration = Duration::from_millis(250);

/// What one connection has asked of the server and not heard back about yet.
struct Live {
    /// The connection, for unary calls beside the stream.
    client: Client,
    /// The chat stream's sending half.
    sender: ChatSender,
    /// Joins not answered yet, by request id: the connection counts as up once every
    /// room has answered.
    joins: HashMap<u64, String>,
    /// Sends not answered yet: request id → `client_msg_id`.
    sends: HashMap<u64, String>,
    /// Messages to send (again, after a reconnect), in order.
    unsent: VecDeque<OutgoingMessage>,
    /// False once a room could not resume exactly where it left off.
    resume_complete: bool,
    /// Paces sends a little inside the server's rate limit.
    pacer: Option<DefaultDirectRateLimiter>,
    /// Set when the server refused a message for the rate: nothing is sent before it.
    hold_until: Option<tokio::time::Instant>,
}

impl Live {
    /// Sends the next queued message.
    async fn send_next(&mut self) -> Result<(), Lost> {
        let Some(message) = self.unsent.pop_front() else {
            return Ok(());
        };
        let client_msg_id = message.client_msg_id.clone();
        let id = self
            .sender
            .send(message)
            .await
            .map_err(|error| Lost::Retry(error.to_string()))?;
        self.sends.insert(id, client_msg_id);
        Ok(())
    }
}

impl Task {
    /// The server the next connection goes to.
    fn server(&self) -> &str {
        self.config
            .servers
            .get(self.next_server)
            .map_or("", String::as_str)
    }

    async fn run(mut self) {
        let mut attempt = 0;
        loop {
            let server = self.server().to_owned();
            if !self
                .state(ConnectionState::Connecting { attempt, server })
                .await
            {
                return;
            }
            let reason = match self.connect_and_chat(&mut attempt).await {
                Lost::Closed => return,
                Lost::Retry(reason) => reason,
                Lost::Refused { reason, login } => {
                    tracing::debug!(%reason, "refused");
                    if !self.state(ConnectionState::Refused { reason, login }).await
                        || !self.until_nickname().await
                    {
                        return;
                    }
                    attempt = 0;
                    continue;
                }
            };
            attempt += 1;
            // A node that went away (or cannot be reached) is most likely still away: the
            // next attempt goes to the next server.
            self.next_server = (self.next_server + 1) % self.config.servers.len().max(1);
            let retry_in = self.config.backoff.delay(attempt);
            tracing::debug!(%reason, ?retry_in, "connection lost");
            if !self
                .state(ConnectionState::Disconnected { reason, retry_in })
                .await
            {
                return;
            }
            // Keep taking the application's commands while waiting.
            let wait = tokio::time::sleep(retry_in);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    op = self.ops.recv() => match op {
                        Some(op) => self.offline(op),
                        None => return,
                    },
                }
            }
        }
    }

    /// After a refusal: takes the application's commands until it gives a new nickname;
    /// false when it is gone.
    async fn until_nickname(&mut self) -> bool {
        loop {
            match self.ops.recv().await {
                Some(Op::Nickname(nickname)) => {
                    self.rename(nickname);
                    return true;
                }
                Some(op) => self.offline(op),
                None => return false,
            }
        }
    }

    /// Logs in as `nickname` from the next connection on (the old token speaks for the
    /// old nickname, so it is dropped).
    fn rename(&mut self, nickname: String) {
        self.config.nickname = nickname;
        self.token = None;
    }

    /// Tells the application; false when it is gone.
    async fn state(&self, state: ConnectionState) -> bool {
        self.events
            .send(ConversationEvent::Connection(state))
            .await
            .is_ok()
    }

    /// What a command does while there is no connection.
    fn offline(&mut self, op: Op) {
        match op {
            Op::Send(message) => self.pending.push_back(message),
            Op::Join(room) => {
                self.rooms.entry(room).or_insert(None);
            }
            Op::Leave(room) => {
                self.rooms.remove(&room);
            }
            Op::Nickname(nickname) => self.rename(nickname),
            // Ephemeral, or needing the server: meaningless later.
            Op::Typing(..) | Op::Ping(_) | Op::SetTopic(..) => {}
            Op::ListRooms | Op::Moderate(_) | Op::History(..) => {
                let _ = self.events.try_send(ConversationEvent::Failed(
                    "not connected; try again once connected".into(),
                ));
            }
        }
    }

    /// One connection, from connecting to losing it: connect, log in, rejoin every room,
    /// then serve the application's commands and the server's events until it ends.
    async fn connect_and_chat(&mut self, attempt: &mut u32) -> Lost {
        let (mut live, mut events) = match self.open(attempt).await {
            Ok(opened) => opened,
            Err(lost) => return lost,
        };
        // This loop never waits to send: it takes a command, or sends a queued message,
        // only when the stream has room, and reads events all the while. (A client that
        // waited to send while the server waited for it to read would never move again.)
        loop {
            let has_room = live.sender.has_room();
            let sending = !live.unsent.is_empty();
            // The branches' futures are dropped before a handler runs, so the handlers may
            // take `live` mutably.
            let step = tokio::select! {
                () = pace(live.pacer.as_ref(), live.hold_until), if sending && has_room => {
                    live.send_next().await
                }
                // A full stream frees up as the server reads: wait for its queue (frames
                // such as typing notices get no reply that would wake this loop).
                () = live.sender.room(), if !has_room => Ok(()),
                op = self.ops.recv(), if !sending && has_room => {
                    self.command(op, &mut live).await
                }
                event = events.message() => match event {
                    Ok(Some(event)) => self.on_event(event, &mut live, attempt).await,
                    Ok(None) => Err(Lost::Retry("the server closed the stream".into())),
                    Err(status) => Err(Lost::Retry(ClientError::from(status).to_string())),
                },
            };
            if let Err(lost) = step {
                return lost;
            }
        }
    }

    /// Connects, logs in (keeping the nickname with the last token) and opens the chat
    /// stream, rejoining every room after the last seq delivered; unacked messages are
    /// queued to go out again.
    async fn open(
        &mut self,
        attempt: &mut u32,
    ) -> Result<(Live, tonic::Streaming<ChatResponse>), Lost> {
        let (client, limits) = self.login().await?;
        let chat = client
            .chat()
            .await
            .map_err(|error| Lost::Retry(error.to_string()))?;
        let (sender, events) = chat.split();
        let mut joins = HashMap::new();
        for (room, last) in &self.rooms {
            let epoch = self.epochs.get(room).map_or("", String::as_str);
            let id = sender
                .join_at(room, *last, epoch)
                .await
                .map_err(|error| Lost::Retry(error.to_string()))?;
            joins.insert(id, room.clone());
        }
        let live = Live {
            pacer: pacer(&limits),
            client,
            sender,
            joins,
            sends: HashMap::new(),
            unsent: self.pending.iter().cloned().collect(),
            resume_complete: true,
            hold_until: None,
        };
        if live.joins.is_empty() && !self.connected(true, attempt).await {
            return Err(Lost::Closed);
        }
        Ok((live, events))
    }

    /// Connects and logs in; the server's limits, for pacing.
    async fn login(&mut self) -> Result<(Client, pb::ServerLimits), Lost> {
        let mut client = Client::connect_with(self.server(), self.config.tls.as_ref())
            .await
            .map_err(|error| Lost::failed(error.to_string(), &error, false))?;
        let login = match &self.config.identity_token {
            Some(token) => client.login_with_token(token, &self.config.nickname).await,
            None => {
                if let Some(token) = &self.token
                    && client.set_token(token).is_err()
                {
                    self.token = None;
                }
                client.login(&self.config.nickname).await
            }
        };
        let limits = match login {
            Ok(reply) => reply.limits.unwrap_or_default(),
            Err(error) => {
                let reason = format!("login as {:?} failed: {error}", self.config.nickname);
                return Err(Lost::failed(reason, &error, true));
            }
        };
        self.token = client.token().map(str::to_owned);
        Ok((client, limits))
    }

    /// The application's next command, on a live connection with room for a frame.
    async fn command(&mut self, op: Option<Op>, live: &mut Live) -> Result<(), Lost> {
        let Some(op) = op else {
            return Err(Lost::Closed);
        };
        self.online(op, live)
            .await
            .map_err(|error| Lost::Retry(error.to_string()))
    }

    /// One event from the server: keeps the rooms' positions and the unacked messages
    /// up to date, and passes it on to the application (a message once only).
    async fn on_event(
        &mut self,
        event: ChatResponse,
        live: &mut Live,
        attempt: &mut u32,
    ) -> Result<(), Lost> {
        let id = event.request_id;
        let Some(payload) = &event.event else {
            return Ok(());
        };
        match payload {
            Event::Message(message) => {
                let Some(last) = self.rooms.get_mut(&message.room) else {
                    return Ok(());
                };
                if last.is_some_and(|last| message.seq <= last) {
                    return Ok(());
                }
                *last = Some(message.seq);
            }
            Event::Gap(gap) => {
                live.resume_complete = false;
                if let Some(last) = self.rooms.get_mut(&gap.room) {
                    *last = Some(if gap.reset {
                        // The room's log started again: its seqs count from 1 again.
                        self.epochs.insert(gap.room.clone(), gap.epoch.clone());
                        0
                    } else {
                        last.unwrap_or(0).max(gap.to_seq)
                    });
                }
            }
            Event::Ack(ack) => {
                live.sends.remove(&id);
                self.pending
                    .retain(|m| m.client_msg_id != ack.client_msg_id);
            }
            Event::Error(error) => {
                let tell = self.on_error(id, error, live, attempt).await?;
                if !tell {
                    return Ok(());
                }
            }
            Event::Joined(joined) => self.on_joined(id, joined, live, attempt).await?,
            Event::Renamed(renamed) => {
                // Logins from now on (after a reconnect) claim the new nickname with it.
                self.config.nickname.clone_from(&renamed.nickname);
                self.token = Some(renamed.token.clone());
                live.client
                    .set_token(&renamed.token)
                    .map_err(|error| Lost::Retry(error.to_string()))?;
            }
            Event::Left(left) if left.reason != pb::LeaveReason::Requested as i32 => {
                // Put out by the owner: not to be rejoined on a reconnect.
                self.rooms.remove(&left.room);
            }
            Event::Reconnect(notice) => {
                return Err(Lost::Retry(format!(
                    "the server asked to reconnect: {}",
                    notice.reason
                )));
            }
            _ => {}
        }
        self.tell(ConversationEvent::Server(event)).await
    }

    /// An error event: a send refused for the rate goes out again after the wait; any
    /// other refused send is final; a refused join drops the room. Whether the
    /// application is told (a retried send is not).
    async fn on_error(
        &mut self,
        id: u64,
        error: &pb::CommandError,
        live: &mut Live,
        attempt: &mut u32,
    ) -> Result<bool, Lost> {
        // Over the send rate (which pacing keeps clear of, but the user may have other
        // clients): wait as told, send it again first.
        if Code::from(error.code) == Code::ResourceExhausted
            && let Some(retry_after) = error.retry_after
            && live.sends.contains_key(&id)
        {
            let wait = Duration::try_from(retry_after).unwrap_or_default();
            self.requeue(id, live, wait.min(Duration::from_secs(5)));
            return Ok(false);
        }
        // The server cannot reach its storage for now (a cluster's Redis is down): nothing
        // is refused for good. A send goes out again under its client_msg_id in a moment
        // (it lands once, whatever became of this try); anything else reconnects.
        if Code::from(error.code) == Code::Unavailable {
            if live.sends.contains_key(&id) {
                self.requeue(id, live, UNAVAILABLE_RETRY);
                return Ok(false);
            }
            return Err(Lost::Retry(error.message.clone()));
        }
        if let Some(client_msg_id) = live.sends.remove(&id) {
            self.pending.retain(|m| m.client_msg_id != client_msg_id);
            let error = error.clone();
            self.tell(ConversationEvent::Refused {
                client_msg_id,
                error,
            })
            .await?;
            return Ok(false);
        }
        if let Some(room) = live.joins.remove(&id) {
            self.rooms.remove(&room);
            if live.joins.is_empty() && !self.connected(live.resume_complete, attempt).await {
                return Err(Lost::Closed);
            }
        }
        Ok(true)
    }

    /// Sends the message of request `id` again after `wait`: every message not in flight
    /// goes out again in the order it was first sent.
    fn requeue(&mut self, id: u64, live: &mut Live, wait: Duration) {
        live.sends.remove(&id);
        let in_flight: HashSet<&String> = live.sends.values().collect();
        live.unsent = self
            .pending
            .iter()
            .filter(|m| !in_flight.contains(&m.client_msg_id))
            .cloned()
            .collect();
        live.hold_until = Some(tokio::time::Instant::now() + wait);
    }

    /// A room joined (or rejoined): where it resumes from; the connection is up once
    /// every room is.
    async fn on_joined(
        &mut self,
        id: u64,
        joined: &pb::Joined,
        live: &mut Live,
        attempt: &mut u32,
    ) -> Result<(), Lost> {
        // The position the server starts this room at: where a resume continues from,
        // even before any message arrives.
        let start = joined.replay_from_seq.saturating_sub(1);
        let room = joined
            .room
            .as_ref()
            .map(|r| r.name.as_str())
            .unwrap_or_default();
        if self.rooms.contains_key(room) {
            self.epochs.insert(room.to_owned(), joined.epoch.clone());
        }
        if let Some(last) = self.rooms.get_mut(room) {
            match *last {
                None => *last = Some(start),
                Some(seen) if seen == start => {}
                // The server's log is not where this client left it (it lost messages,
                // or it is another server): start over from where it is.
                Some(_) => {
                    live.resume_complete = false;
                    *last = Some(start);
                }
            }
        }
        if live.joins.remove(&id).is_some()
            && live.joins.is_empty()
            && !self.connected(live.resume_complete, attempt).await
        {
            return Err(Lost::Closed);
        }
        Ok(())
    }

    /// Passes `event` to the application; `Lost::Closed` when it is gone.
    async fn tell(&self, event: ConversationEvent) -> Result<(), Lost> {
        self.events.send(event).await.map_err(|_| Lost::Closed)
    }

    /// Reports the connection as up and resets the backoff; false when the app is gone.
    async fn connected(&self, resume_complete: bool, attempt: &mut u32) -> bool {
        *attempt = 0;
        self.state(ConnectionState::Connected { resume_complete })
            .await
    }

    /// What a command does on a live connection (which has room for one frame).
    async fn online(&mut self, op: Op, live: &mut Live) -> Result<(), ClientError> {
        let (client, sender) = (&live.client, &live.sender);
        match op {
            Op::Send(message) => {
                self.pending.push_back(message.clone());
                live.unsent.push_back(message);
            }
            Op::Join(room) => {
                if !self.rooms.contains_key(&room) {
                    self.rooms.insert(room.clone(), None);
                    sender.join(&room, None).await?;
                }
            }
            Op::Leave(room) => {
                if self.rooms.remove(&room).is_some() {
                    sender.leave(&room).await?;
                }
            }
            Op::Typing(room, typing) => {
                sender.typing(&room, typing).await?;
            }
            Op::Ping(micros) => {
                sender.ping(micros).await?;
            }
            Op::SetTopic(room, topic) => {
                sender.set_topic(&room, &topic).await?;
            }
            Op::Moderate(command) => {
                sender.command(command).await?;
            }
            // Renamed in place; the `renamed` reply brings the new token.
            Op::Nickname(nickname) => {
                sender.rename(&nickname).await?;
            }
            Op::History(room, direction, seq, limit) => {
                // A unary call beside the stream, answered from its own task so that the
                // stream keeps flowing meanwhile.
                let rpc = client.rpc();
                let events = self.events.clone();
                tokio::spawn(async move {
                    let request = pb::GetHistoryRequest {
                        room: room.clone(),
                        page_size: i32::try_from(limit).unwrap_or(i32::MAX),
                        page_token: String::new(),
                        direction: match direction {
                            HistoryDirection::Older => pb::HistoryDirection::Backward,
                            HistoryDirection::Newer => pb::HistoryDirection::Forward,
                        } as i32,
                        start_seq: Some(seq),
                    };
                    let event = match rpc.clone().get_history(request).await {
                        Ok(reply) => {
                            let page = reply.into_inner();
                            ConversationEvent::History {
                                room,
                                direction,
                                messages: page.messages,
                                more: !page.next_page_token.is_empty(),
                            }
                        }
                        Err(status) => ConversationEvent::Failed(format!(
                            "reading {room}'s history failed: {}",
                            ClientError::from(status)
                        )),
                    };
                    let _ = events.send(event).await;
                });
            }
            Op::ListRooms => {
                // A unary call beside the stream, answered from its own task so that the
                // stream keeps flowing meanwhile.
                let rpc = client.rpc();
                let events = self.events.clone();
                tokio::spawn(async move {
                    let request = pb::ListRoomsRequest {
                        page_size: 1000,
                        page_token: String::new(),
                    };
                    let event = match rpc.clone().list_rooms(request).await {
                        Ok(reply) => ConversationEvent::Rooms(reply.into_inner().rooms),
                        Err(status) => ConversationEvent::Failed(format!(
                            "listing rooms failed: {}",
                            status.message()
                        )),
                    };
                    let _ = events.send(event).await;
                });
            }
        }
        Ok(())
    }
}

/// A local token bucket a little inside the server's send limit, so that paced messages
/// are never refused (network jitter can bunch them up on the way); none without a limit.
fn pacer(limits: &pb::ServerLimits) -> Option<DefaultDirectRateLimiter> {
    let rate = limits.send_rate_per_second * 0.9;
    if !(rate > 0.0 && rate.is_finite()) {
        return None;
    }
    let burst = NonZeroU32::new(limits.send_burst.saturating_sub(2).max(1))?;
    let quota = Quota::with_period(Duration::from_secs_f64(1.0 / rate))?.allow_burst(burst);
    Some(RateLimiter::direct(quota))
}

/// Resolves when the pacer lets the next message go (at once without one), and not before
/// `hold_until`.
async fn pace(pacer: Option<&DefaultDirectRateLimiter>, hold_until: Option<tokio::time::Instant>) {
    if let Some(hold_until) = hold_until {
        tokio::time::sleep_until(hold_until).await;
    }
    if let Some(pacer) = pacer {
        pacer.until_ready().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_ceiling_with_jitter() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for (attempt, ceiling) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (30, 1000),
        ] {
            let delay = backoff.delay(attempt);
            let ceiling = Duration::from_millis(ceiling);
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "attempt {attempt}: {delay:?}"
            );
        }
    }
}
