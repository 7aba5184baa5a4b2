//! [`Session`]: the task behind one `Chat` stream.
//!
//! One loop `select!`s over everything that can happen to the stream:
//!
//! * the server drains → tell the client to reconnect, end with UNAVAILABLE;
//! * the client goes away (response stream dropped) → stop at once;
//! * the client stopped reading for the stall timeout → end with RESOURCE_EXHAUSTED;
//! * the owner of a room put the client out → leave it;
//! * a frame arrives → [`Session::apply`] it; a bad command gets an error event carrying
//!   its `request_id` and the stream goes on.
//!
//! Room events do not pass through here: the response body pulls them from the cursors the
//! session hands it ([`Outbound::follow`]), when the client's window has room. When the
//! loop ends, the session is dropped, and with it every cursor and [`Presence`]: the user
//! leaves each room and the others see it at once.

use std::{collections::HashMap, sync::Arc};

use confab::pb::{self, ChatRequest, ChatResponse, chat_request::Command, chat_response::Event};
use futures::{FutureExt as _, StreamExt as _, stream};
use tonic::Streaming;

use crate::{
    auth::{AuthMode, Identity, StreamClaim},
    cursor::{Delivery, DeliveryStream},
    engine::MAX_RUN,
    error::{ChatError, quote},
    hub::{Hub, Moderation, Presence},
    limits::StreamGuard,
    metrics::Held,
    nickname,
    outbound::{End, Outbound, reconnect_notice},
    validate,
};

/// The state of one `Chat` stream.
pub struct Session {
    /// The rooms and the store.
    hub: Arc<Hub>,
    /// Who is chatting.
    user: Identity,
    /// Rooms joined on this stream; dropping an entry leaves the room.
    rooms: HashMap<String, Presence>,
    /// The longest text a message may have.
    max_text_bytes: usize,
    /// Keeps the nickname claimed while the stream is open (replaced by a rename).
    claim: StreamClaim,
    /// How callers prove who they are: the nickname registry and the token issuer, for
    /// renames.
    auth: Arc<AuthMode>,
    /// Counts the stream as open, and against its user's limit.
    _open: (Held, StreamGuard),
}

impl Session {
    /// A session for `user`.
    pub fn new(
        hub: Arc<Hub>,
        auth: Arc<AuthMode>,
        user: Identity,
        claim: StreamClaim,
        stream: StreamGuard,
        max_text_bytes: usize,
    ) -> Self {
        let open = (Held::new(&hub.metrics().chat_streams), stream);
        Self {
            hub,
            user,
            rooms: HashMap::new(),
            max_text_bytes,
            claim,
            auth,
            _open: open,
        }
    }

    /// Runs the session until the client leaves, the connection drops or the server drains.
    ///
    /// An `async move` block rather than an `async fn`: an `async fn` keeps its arguments
    /// twice in the task for as long as it runs (as arguments and as the locals they are
    /// moved into), 464 bytes per open stream.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would store the arguments twice"
    )]
    pub fn run(
        mut self,
        mut inbound: Streaming<ChatRequest>,
        out: Outbound<ChatResponse>,
    ) -> impl Future<Output = ()> + Send {
        async move {
            let end = self.serve(&mut inbound, &out).await;
            tracing::debug!(?end, "chat stream ended");
            // Leave every room before the final words, so presence is prompt even when the
            // client is too stalled to take them.
            self.rooms.clear();
            out.finish(end, || push(Event::Reconnect(reconnect_notice())));
        }
    }

    /// The session's loop: client frames and what the body reports, until the stream
    /// ends, and why.
    async fn serve(
        &mut self,
        inbound: &mut Streaming<ChatRequest>,
        out: &Outbound<ChatResponse>,
    ) -> End {
        // Made once and kept: a wait registered anew on every turn of the loop would cost
        // a registration and a removal per frame.
        let shutdown = out.shutdown();
        let closed = out.closed();
        let stalled = out.stalled();
        tokio::pin!(shutdown, closed, stalled);
        loop {
            let frame = tokio::select! {
                biased;
                () = &mut shutdown => return End::Shutdown,
                () = &mut closed => return End::ClientGone,
                end = &mut stalled => return end,
                () = out.put_out_notice() => None,
                frame = inbound.message() => match frame {
                    Ok(Some(frame)) => Some(frame),
                    Ok(None) => return End::ClientDone,
                    Err(status) => return inbound_failure(status),
                },
            };
            // Rooms the client was put out of are left before any frame is applied, so a
            // command sees the rooms as the client was told they are.
            self.leave_put_out(out);
            if let Some(frame) = frame {
                // Boxed: a command's future is the largest of the loop's (1.4 KB), and
                // inline it would sit in every open stream's task while idle; commands
                // are rare beside deliveries, so one allocation each is the cheaper side.
                if let Err(end) = Box::pin(self.apply_ready(frame, inbound, out)).await {
                    return end;
                }
            }
        }
    }

    /// Applies `frame` and, when it is a send, the frames the client sent behind it that
    /// are here already (never waiting for one): a run of sends goes to the hub together,
    /// so that one commit carries the run, and each is acked in order. The run ends at the
    /// first frame that is not a valid send, which is applied after it.
    async fn apply_ready(
        &mut self,
        frame: ChatRequest,
        inbound: &mut Streaming<ChatRequest>,
        out: &Outbound<ChatResponse>,
    ) -> Result<(), End> {
        // No room event goes out until the replies have: `Joined` before the history that
        // follows it, an `Ack` before the message it acks.
        let _hold = out.hold();
        let mut sends = Vec::new();
        let mut next = Some(frame);
        let mut end = None;
        while let Some(frame) = next.take() {
            let request_id = frame.request_id;
            match self.check(frame) {
                Ok(Command::Send(message)) => {
                    sends.push((request_id, validate::Outgoing::checked(message)));
                    if sends.len() < MAX_RUN {
                        match inbound.next().now_or_never() {
                            Some(Some(Ok(frame))) => next = Some(frame),
                            Some(Some(Err(status))) => end = Some(inbound_failure(status)),
                            Some(None) => end = Some(End::ClientDone),
                            None => {}
                        }
                    }
                }
                command => {
                    self.send(std::mem::take(&mut sends), out).await?;
                    self.leave_put_out(out);
                    self.apply(request_id, command, out).await?;
                }
            }
        }
        self.send(sends, out).await?;
        end.map_or(Ok(()), Err)
    }

    /// The frame's command, every field checked (the handlers below rely on it).
    fn check(&self, frame: ChatRequest) -> Result<Command, ChatError> {
        let command = frame.command.ok_or_else(|| {
            ChatError::invalid(
                "command",
                "the frame has no command: set one of join, leave, send, typing, ping, \
                 set_topic, invite, kick, ban, rename",
            )
        })?;
        validate::command(&command, self.max_text_bytes).map_err(ChatError::InvalidArgument)?;
        Ok(command)
    }

    /// Applies one checked command (or answers why it was refused) and sends its reply;
    /// the caller holds the rooms' events back.
    async fn apply(
        &mut self,
        request_id: u64,
        command: Result<Command, ChatError>,
        out: &Outbound<ChatResponse>,
    ) -> Result<(), End> {
        let command = match command {
            Ok(command) => command,
            Err(error) => return refuse(out, request_id, error).await,
        };
        let reply = match command {
            Command::Join(join) => match self.join(join).await {
                Ok((joined, room, stream)) => {
                    // The reply goes out before the room's first event, so a client always
                    // sees `joined` before the history that follows it.
                    out.send(reply_to(request_id, Event::Joined(joined)))
                        .await?;
                    out.follow(&room, stream);
                    return Ok(());
                }
                Err(error) => Err(error.within("join")),
            },
            Command::Leave(leave) => self
                .leave(&leave.room, out)
                .await
                .map(|room| {
                    Some(Event::Left(pb::Left {
                        room,
                        reason: pb::LeaveReason::Requested as i32,
                        ..pb::Left::default()
                    }))
                })
                .map_err(|e| e.within("leave")),
            Command::Send(message) => {
                let run = vec![(request_id, validate::Outgoing::checked(message))];
                return self.send(run, out).await;
            }
            Command::Typing(typing) => self
                .typing(typing)
                .await
                .map(|()| None)
                .map_err(|e| e.within("typing")),
            Command::SetTopic(set) => self
                .set_topic(set)
                .await
                .map(|()| None)
                .map_err(|e| e.within("set_topic")),
            Command::Invite(invite) => self
                .moderate(&invite.room, &invite.user, "", |_| Moderation::Invite)
                .await
                .map(Some)
                .map_err(|e| e.within("invite")),
            Command::Kick(kick) => self
                .moderate(&kick.room, &kick.user, &kick.reason, Moderation::Kick)
                .await
                .map(Some)
                .map_err(|e| e.within("kick")),
            Command::Ban(ban) => self
                .moderate(&ban.room, &ban.user, &ban.reason, Moderation::Ban)
                .await
                .map(Some)
                .map_err(|e| e.within("ban")),
            Command::Rename(rename) => self
                .rename(&rename.nickname)
                .await
                .map(|renamed| Some(Event::Renamed(renamed)))
                .map_err(|e| e.within("rename")),
            Command::Ping(ping) => Ok(Some(Event::Pong(pb::Pong {
                client_time_micros: ping.client_time_micros,
                server_time: Some(std::time::SystemTime::now().into()),
            }))),
        };
        match reply {
            Ok(Some(event)) => out.send(reply_to(request_id, event)).await,
            Ok(None) => Ok(()),
            Err(error) => refuse(out, request_id, error).await,
        }
    }

    /// Moves this stream's login to `nickname`: every joined room must admit the new name
    /// first; then the claim moves, the rooms hear of it, and a token for it is issued.
    async fn rename(&mut self, nickname: &str) -> Result<pb::Renamed, ChatError> {
        let AuthMode::Sessions { tokens, nicknames } = self.auth.as_ref() else {
            return Err(ChatError::precondition(
                "nickname",
                "this server takes nicknames from its identity provider",
            ));
        };
        let nickname = validate::nickname("nickname", nickname)?;
        for presence in self.rooms.values() {
            presence
                .admits(&nickname)
                .map_err(|e| ChatError::denied("nickname", e.to_string()))?;
        }
        // Held over the cluster first; let go again if this node's registry refuses.
        let engine = self.hub.engine();
        let (old_key, new_key) = (nickname::key(&self.user.nickname), nickname::key(&nickname));
        if !engine
            .hold_nickname(&new_key, self.user.login, nicknames.lease())
            .await?
        {
            return Err(ChatError::NicknameTaken(nickname));
        }
        let renamed = match nicknames.rename(&self.user, &nickname) {
            Ok(renamed) => renamed,
            Err(error) => {
                if new_key != old_key {
                    engine.release_nickname(&new_key, self.user.login).await?;
                }
                return Err(error);
            }
        };
        if new_key != old_key {
            engine.release_nickname(&old_key, self.user.login).await?;
        }
        self.claim = nicknames.open_stream(&renamed);
        for presence in self.rooms.values_mut() {
            presence.rename(&renamed.nickname);
        }
        tracing::info!(from = %self.user.nickname, to = %renamed.nickname, "renamed");
        let (token, expires) = tokens.issue(&renamed);
        self.user = renamed;
        Ok(pb::Renamed {
            nickname: self.user.nickname.clone(),
            token,
            expires_at: Some(expires.into()),
        })
    }

    async fn join(
        &mut self,
        join: pb::JoinRoom,
    ) -> Result<(pb::Joined, String, DeliveryStream), ChatError> {
        if self.rooms.contains_key(&join.room) {
            return Err(ChatError::precondition(
                "room",
                format!(
                    "room {} is already joined on this stream",
                    quote(&join.room)
                ),
            ));
        }
        self.hub.limits().join(self.rooms.len())?;
        let room = self.hub.open_room(&join.room, &self.user.nickname).await?;
        let (joined, cursor, presence) = room
            .join(
                &self.user.nickname,
                join.after_seq,
                &join.epoch,
                self.hub.config().history_on_join,
            )
            .await?;
        // The room's events, and, should the owner put this user out, word of it.
        let removed = presence.removals().map(|r| Ok(Delivery::Removed(r)));
        let deliveries = stream::select(cursor.into_stream(), removed);
        self.rooms.insert(join.room.clone(), presence);
        Ok((joined, join.room, Box::pin(deliveries)))
    }

    async fn leave(
        &mut self,
        room: &str,
        out: &Outbound<ChatResponse>,
    ) -> Result<String, ChatError> {
        self.joined("room", room).await?;
        out.unfollow(room);
        self.rooms.remove(room);
        Ok(room.to_owned())
    }

    /// Sends a run of checked messages (each with its frame's request id) and acks or
    /// refuses each, in order.
    async fn send(
        &self,
        run: Vec<(u64, validate::Outgoing)>,
        out: &Outbound<ChatResponse>,
    ) -> Result<(), End> {
        if run.is_empty() {
            return Ok(());
        }
        let mut replies = Vec::with_capacity(run.len());
        let mut messages = Vec::with_capacity(run.len());
        for (request_id, message) in run {
            replies.push((
                request_id,
                message.room.clone(),
                message.client_msg_id.clone(),
            ));
            messages.push(Ok(message));
        }
        let rooms = &self.rooms;
        let published = self
            .hub
            .publish("room", &self.user.nickname, messages, |room| {
                if rooms.contains_key(room) {
                    Ok(())
                } else {
                    Err(not_joined("room", room))
                }
            })
            .await;
        for ((request_id, room, client_msg_id), published) in replies.into_iter().zip(published) {
            match published {
                Ok(published) => {
                    let ack = pb::Ack {
                        room,
                        client_msg_id,
                        seq: published.seq,
                        duplicate: published.duplicate,
                    };
                    out.send(reply_to(request_id, Event::Ack(ack))).await?;
                }
                Err(error) => refuse(out, request_id, error.within("send")).await?,
            }
        }
        Ok(())
    }

    async fn typing(&mut self, typing: pb::SetTyping) -> Result<(), ChatError> {
        self.joined("room", &typing.room).await?;
        self.hub
            .room("room", &typing.room)
            .await?
            .typing(&self.user.nickname, typing.typing);
        Ok(())
    }

    async fn set_topic(&mut self, set: pb::SetTopic) -> Result<(), ChatError> {
        self.joined("room", &set.room).await?;
        self.hub
            .room("room", &set.room)
            .await?
            .set_topic(&self.user.nickname, &set.topic)
            .await
    }

    /// The owner's invite, kick or ban of `user` in `room`.
    async fn moderate(
        &mut self,
        room: &str,
        user: &str,
        reason: &str,
        action: impl FnOnce(String) -> Moderation,
    ) -> Result<Event, ChatError> {
        self.hub
            .room("room", room)
            .await?
            .moderate(&self.user.nickname, user, action(reason.to_owned()))
            .await?;
        tracing::info!(room, user, "moderated");
        Ok(Event::ModerationDone(pb::ModerationDone {
            room: room.to_owned(),
            user: user.to_owned(),
        }))
    }

    /// Leaves the rooms whose owner put this user out (the body has stopped their events
    /// and told the client).
    fn leave_put_out(&mut self, out: &Outbound<ChatResponse>) {
        for (room, removal) in out.put_out() {
            tracing::info!(%room, by = %removal.by, reason = ?removal.reason, "put out of a room");
            self.rooms.remove(&*room);
        }
    }

    /// Checks that `room` (a valid name) is joined on this stream: NOT_FOUND for no such
    /// room, FAILED_PRECONDITION for a room not joined.
    async fn joined(&self, field: &str, room: &str) -> Result<(), ChatError> {
        if self.rooms.contains_key(room) {
            return Ok(());
        }
        self.hub.room(field, room).await?;
        Err(not_joined(field, room))
    }
}

/// FAILED_PRECONDITION: `room`, named by `field`, is not joined on this stream.
fn not_joined(field: &str, room: &str) -> ChatError {
    ChatError::precondition(
        field,
        format!(
            "room {} is not joined on this stream; join it first",
            quote(room)
        ),
    )
}

/// A decode failure or a frame over the size limit ends the stream with its status: the
/// framing cannot be trusted after it.
fn inbound_failure(status: tonic::Status) -> End {
    if status.code() == tonic::Code::Cancelled {
        End::ClientGone
    } else {
        End::Failed(status)
    }
}

/// Answers the frame with `request_id` with `error`; the stream goes on.
async fn refuse(
    out: &Outbound<ChatResponse>,
    request_id: u64,
    error: ChatError,
) -> Result<(), End> {
    tracing::debug!(request_id, %error, "command refused");
    out.send(reply_to(request_id, Event::Error(error.to_command_error())))
        .await
}

/// An event pushed by a room (no request id).
fn push(event: Event) -> ChatResponse {
    reply_to(0, event)
}

/// A reply to the frame with `request_id`.
fn reply_to(request_id: u64, event: Event) -> ChatResponse {
    ChatResponse {
        request_id,
        event: Some(event),
    }
}
