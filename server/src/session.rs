//! [`Session`]: the task behind one `Chat` stream.
//!
//! One loop `select!`s over everything that can happen to the stream:
//!
//! * the server drains → tell the client to reconnect, end with UNAVAILABLE;
//! * the client goes away (response stream dropped) → stop at once;
//! * a frame arrives → [`Session::apply`] it; a bad command gets an error event carrying
//!   its `request_id` and the stream goes on;
//! * a joined room has an event → send it, waiting while the client is not reading.
//!
//! Events are pulled from the room cursors only when the loop is ready to send, so a slow
//! client slows nobody but itself. When the loop ends, the session is dropped, and with it
//! every cursor and [`Presence`]: the user leaves each room and the others see it at once.

use std::{collections::HashMap, sync::Arc};

use confab::pb::{self, ChatRequest, ChatResponse, chat_request::Command, chat_response::Event};
use futures::{FutureExt as _, StreamExt as _, stream};
use tonic::Streaming;

use crate::{
    auth::{AuthMode, Identity, StreamClaim},
    cursor::{Delivery, DeliveryStream},
    cursor_set::CursorSet,
    engine::Removal,
    error::{ChatError, quote},
    hub::{Hub, Moderation, Presence, RoomEvent},
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
            let mut cursors = CursorSet::default();
            let end = self.serve(&mut inbound, &out, &mut cursors).await;
            tracing::debug!(?end, "chat stream ended");
            // Leave every room before the final words, so presence is prompt even when the
            // client is too stalled to take them.
            drop(cursors);
            self.rooms.clear();
            out.finish(end, || push(Event::Reconnect(reconnect_notice())));
        }
    }

    /// The session's loop: client frames and room events, until the stream ends, and why.
    async fn serve(
        &mut self,
        inbound: &mut Streaming<ChatRequest>,
        out: &Outbound<ChatResponse>,
        cursors: &mut CursorSet,
    ) -> End {
        // Made once and kept: a wait registered anew on every turn of the loop would cost
        // two registrations and two removals per delivery.
        let shutdown = out.shutdown();
        let closed = out.closed();
        tokio::pin!(shutdown, closed);
        loop {
            // Shutdown and a vanished client come first; between the client's frames and
            // the rooms' events the choice is fair, so a client sending a burst still
            // receives, and a busy room does not keep a client from sending.
            let step = tokio::select! {
                biased;
                () = &mut shutdown => Err(End::Shutdown),
                () = &mut closed => Err(End::ClientGone),
                step = next_step(inbound, cursors) => step,
            };
            let step = match step {
                Err(end) => Err(end),
                // Boxed: a command's future is the largest of the loop's (1.4 KB), and
                // inline it would sit in every open stream's task while idle; commands
                // are rare beside deliveries, so one allocation each is the cheaper side.
                Ok(Step::Frame(frame)) => Box::pin(self.apply(frame, out, cursors)).await,
                Ok(Step::Deliver(room, delivery)) => {
                    match self.deliver(room, delivery, out, cursors).await {
                        Ok(()) => self.deliver_ready(out, cursors).await,
                        Err(end) => Err(end),
                    }
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Sends one room event to the client (leaving the room first if it is a removal).
    async fn deliver(
        &mut self,
        room: Arc<str>,
        delivery: Delivery,
        out: &Outbound<ChatResponse>,
        cursors: &mut CursorSet,
    ) -> Result<(), End> {
        if let Delivery::Removed(removal) = &delivery {
            self.put_out(&room, removal, cursors);
        }
        out.send(push(chat_event(&room, delivery))).await
    }

    /// Sends whatever else the rooms have ready, while the client's stream has room, up to
    /// a batch: one wake-up of this task then carries many deliveries (and tonic encodes
    /// them into one write), instead of one trip through the main loop each. The batch
    /// bound keeps the client's own frames from waiting behind a busy room.
    async fn deliver_ready(
        &mut self,
        out: &Outbound<ChatResponse>,
        cursors: &mut CursorSet,
    ) -> Result<(), End> {
        for _ in 0..DELIVERY_BATCH {
            if !out.has_room() {
                break;
            }
            match cursors.next().now_or_never() {
                Some(Some((room, Ok(delivery)))) => {
                    self.deliver(room, delivery, out, cursors).await?
                }
                Some(Some((_, Err(error)))) => return Err(End::Failed(error.into())),
                Some(None) | None => break,
            }
        }
        Ok(())
    }

    /// Applies one client frame and sends its reply.
    async fn apply(
        &mut self,
        frame: ChatRequest,
        out: &Outbound<ChatResponse>,
        cursors: &mut CursorSet,
    ) -> Result<(), End> {
        let request_id = frame.request_id;
        let Some(command) = frame.command else {
            let error = ChatError::invalid(
                "command",
                "the frame has no command: set one of join, leave, send, typing, ping, \
                 set_topic, invite, kick, ban, rename",
            );
            return refuse(out, request_id, error).await;
        };
        // Every field of the command is checked here, once; the handlers below rely on it.
        if let Err(violation) = validate::command(&command, self.max_text_bytes) {
            return refuse(out, request_id, ChatError::InvalidArgument(violation)).await;
        }
        let reply = match command {
            Command::Join(join) => match self.join(join).await {
                Ok((joined, room, stream)) => {
                    // The reply goes out before the room's first event, so a client always
                    // sees `joined` before the history that follows it.
                    out.send(reply_to(request_id, Event::Joined(joined)))
                        .await?;
                    cursors.insert(&room, stream);
                    return Ok(());
                }
                Err(error) => Err(error.within("join")),
            },
            Command::Leave(leave) => self
                .leave(&leave.room, cursors)
                .await
                .map(|room| {
                    Some(Event::Left(pb::Left {
                        room,
                        reason: pb::LeaveReason::Requested as i32,
                        ..pb::Left::default()
                    }))
                })
                .map_err(|e| e.within("leave")),
            Command::Send(message) => self
                .send(message)
                .await
                .map(|ack| Some(Event::Ack(ack)))
                .map_err(|e| e.within("send")),
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
        let removed = stream::once(presence.removed()).map(|r| Ok(Delivery::Removed(r)));
        let deliveries = stream::select(cursor.into_stream(), removed);
        self.rooms.insert(join.room.clone(), presence);
        Ok((joined, join.room, Box::pin(deliveries)))
    }

    async fn leave(&mut self, room: &str, cursors: &mut CursorSet) -> Result<String, ChatError> {
        self.joined("room", room).await?;
        cursors.remove(room);
        self.rooms.remove(room);
        Ok(room.to_owned())
    }

    async fn send(&mut self, message: pb::OutgoingMessage) -> Result<pb::Ack, ChatError> {
        let message = validate::Outgoing::checked(message);
        self.joined("room", &message.room).await?;
        let room = message.room.clone();
        let client_msg_id = message.client_msg_id.clone();
        let published = self
            .hub
            .publish("room", &self.user.nickname, message)
            .await?;
        Ok(pb::Ack {
            room,
            client_msg_id,
            seq: published.seq,
            duplicate: published.duplicate,
        })
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

    /// Leaves `room` because its owner put this user out.
    fn put_out(&mut self, room: &str, removal: &Removal, cursors: &mut CursorSet) {
        tracing::info!(room, by = %removal.by, reason = ?removal.reason, "put out of a room");
        cursors.remove(room);
        self.rooms.remove(room);
    }

    /// Checks that `room` (a valid name) is joined on this stream: NOT_FOUND for no such
    /// room, FAILED_PRECONDITION for a room not joined.
    async fn joined(&self, field: &str, room: &str) -> Result<(), ChatError> {
        if self.rooms.contains_key(room) {
            return Ok(());
        }
        self.hub.room(field, room).await?;
        Err(ChatError::precondition(
            field,
            format!(
                "room {} is not joined on this stream; join it first",
                quote(room)
            ),
        ))
    }
}

/// Most room events sent per wake-up before the session looks at the client's frames again.
const DELIVERY_BATCH: usize = 32;

/// What the session does next.
enum Step {
    /// Apply a client frame.
    Frame(ChatRequest),
    /// Send a room's event.
    Deliver(Arc<str>, Delivery),
}

/// Waits for the next frame or room event, whichever comes first (fairly, when both are
/// ready); the stream's end or failure ends the session.
async fn next_step(
    inbound: &mut Streaming<ChatRequest>,
    cursors: &mut CursorSet,
) -> Result<Step, End> {
    tokio::select! {
        frame = inbound.message() => match frame {
            Ok(Some(frame)) => Ok(Step::Frame(frame)),
            Ok(None) => Err(End::ClientDone),
            Err(status) => Err(inbound_failure(status)),
        },
        Some((room, delivery)) = cursors.next(), if !cursors.is_empty() => match delivery {
            Ok(delivery) => Ok(Step::Deliver(room, delivery)),
            Err(error) => Err(End::Failed(error.into())),
        },
    }
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

/// A room's delivery as a `Chat` event.
fn chat_event(room: &str, delivery: Delivery) -> Event {
    match delivery {
        Delivery::Event(RoomEvent::Message(message)) => Event::Message(message),
        Delivery::Event(RoomEvent::Presence(presence)) => Event::Presence((*presence).clone()),
        Delivery::Event(RoomEvent::Typing(typing)) => Event::Typing((*typing).clone()),
        Delivery::Event(RoomEvent::Updated(update)) => Event::RoomUpdated((*update).clone()),
        // A cursor turns the ring's reset into `Delivery::Reset`, with the reader's place.
        Delivery::Event(RoomEvent::Reset(epoch)) => Event::Gap(pb::HistoryGap {
            room: room.to_owned(),
            reset: true,
            epoch,
            ..Default::default()
        }),
        Delivery::Gap { .. } | Delivery::Reset { .. } => Event::Gap(
            delivery
                .history_gap(room)
                .unwrap_or_else(|| unreachable!("a gap or reset")),
        ),
        Delivery::Removed(removal) => Event::Left(pb::Left {
            room: room.to_owned(),
            reason: removal.reason as i32,
            by: removal.by.clone(),
            message: removal.message.clone(),
        }),
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
