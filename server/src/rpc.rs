//! [`ChatServer`]: the `chat.v1.ChatService` implementation.
//!
//! Handlers check their input, ask the hub, and shape the answer; the rules live in the
//! hub, the cursor and `validate`. Streaming handlers return their response stream at once
//! and leave the work to a task (a handler that awaited the client first would leave the
//! client waiting for response headers).

use std::{collections::BTreeMap, sync::Arc};

use confab::pb::{self, chat_service_server::ChatService, subscribe_response};
use futures::{FutureExt as _, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::{
    auth::{AuthMode, Identity, Nicknames, ProviderToken, caller},
    cursor::Cursor,
    cursor_set::CursorSet,
    engine::MAX_RUN,
    error::{ChatError, quote},
    hub::Hub,
    limits::StreamGuard,
    metrics::Held,
    nickname,
    outbound::{End, Events, Outbound, reconnect_notice},
    pagination,
    session::Session,
    stall::Watchdog,
    validate::{self, Outgoing},
};

/// The service state shared by every call.
#[derive(Clone)]
pub struct ChatServer {
    /// The rooms.
    hub: Arc<Hub>,
    /// How callers prove who they are.
    auth: Arc<AuthMode>,
    /// Who holds which nickname.
    nicknames: Arc<Nicknames>,
    /// Cancelled when the server starts draining.
    shutdown: CancellationToken,
    /// The longest message text, in bytes.
    max_text_bytes: usize,
    /// Finds the streams whose client stopped reading.
    watchdog: Arc<Watchdog>,
}

impl ChatServer {
    /// A service over `hub`.
    pub fn new(
        hub: Arc<Hub>,
        auth: Arc<AuthMode>,
        nicknames: Arc<Nicknames>,
        shutdown: CancellationToken,
        max_text_bytes: usize,
        watchdog: Arc<Watchdog>,
    ) -> Self {
        Self {
            hub,
            auth,
            nicknames,
            shutdown,
            max_text_bytes,
            watchdog,
        }
    }

    /// Checks a room name and returns the room (NOT_FOUND if absent).
    async fn existing_room(
        &self,
        field: &str,
        name: &str,
    ) -> Result<Arc<crate::hub::Room>, ChatError> {
        validate::room_name(field, name)?;
        tracing::Span::current().record("room", name);
        self.hub.room(field, name).await
    }

    /// The room, if `user` may read it (PERMISSION_DENIED for a private room they are not
    /// invited to, or one they are banned from).
    async fn readable_room(
        &self,
        field: &str,
        name: &str,
        user: &Identity,
    ) -> Result<Arc<crate::hub::Room>, ChatError> {
        let room = self.existing_room(field, name).await?;
        room.admit(&user.nickname)?;
        Ok(room)
    }

    /// Holds `identity`'s nickname over every node (ALREADY_EXISTS while another node's
    /// login holds it); the local claim is let go if the cluster refuses.
    async fn hold_over_the_cluster(&self, identity: &Identity) -> Result<(), ChatError> {
        if !matches!(self.auth.as_ref(), AuthMode::Sessions { .. }) {
            // The identity provider says who is who.
            return Ok(());
        }
        let key = crate::nickname::key(&identity.nickname);
        let held = self
            .hub
            .engine()
            .hold_nickname(&key, identity.login, self.nicknames.lease())
            .await;
        match held {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.nicknames.release(identity);
                Err(ChatError::NicknameTaken(identity.nickname.clone()))
            }
            Err(error) => {
                self.nicknames.release(identity);
                Err(error.into())
            }
        }
    }

    /// `Login` on a server that takes identity-provider tokens: the call must carry one;
    /// it is confirmed, and the user is its subject.
    fn confirm_jwt(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let user = caller(&request).map_err(|_| {
            Status::from(ChatError::Unauthenticated(
                "this server takes tokens from its identity provider: call with \
                 `authorization: Bearer <JWT>`"
                    .into(),
            ))
        })?;
        let asked = &request.get_ref().nickname;
        if !asked.is_empty() && nickname::key(asked) != nickname::key(&user.nickname) {
            return Err(ChatError::denied(
                "nickname",
                format!(
                    "your token speaks for {}, not {}",
                    quote(&user.nickname),
                    quote(asked)
                ),
            )
            .into());
        }
        // The interceptor verified the token and kept it for this.
        let Some(ProviderToken { token, expires }) = request.extensions().get().cloned() else {
            return Err(ChatError::Unauthenticated("no identity-provider token".into()).into());
        };
        tracing::info!(nickname = %user.nickname, "login with an identity-provider token");
        Ok(Response::new(pb::LoginResponse {
            token,
            nickname: user.nickname,
            expires_at: Some(expires.into()),
            limits: Some(self.hub.limits().config().advertised()),
        }))
    }

    /// Checks a message to publish, named `message` in the request.
    fn check(&self, message: Option<pb::OutgoingMessage>) -> Result<Outgoing, ChatError> {
        let message =
            message.ok_or_else(|| ChatError::invalid("message", "a message is required"))?;
        validate::outgoing(message, self.max_text_bytes)
            .map_err(|v| ChatError::InvalidArgument(v.within("message")))
    }
}

type SubscribeStream = Events<pb::SubscribeResponse>;
type ChatStream = Events<pb::ChatResponse>;

#[tonic::async_trait]
impl ChatService for ChatServer {
    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let tokens = match self.auth.as_ref() {
            AuthMode::Sessions { tokens, .. } => tokens,
            AuthMode::Jwt(_) => return self.confirm_jwt(request),
        };
        let request = request.into_inner();
        let nickname =
            validate::nickname("nickname", &request.nickname).map_err(ChatError::from)?;
        // An unusable resume token (expired, from an earlier server) is no error: the
        // login simply does not reclaim anything.
        let resume = (!request.resume_token.is_empty())
            .then(|| tokens.verify(&request.resume_token).ok())
            .flatten();
        let identity = self.nicknames.claim(&nickname, resume.as_ref())?;
        self.hold_over_the_cluster(&identity).await?;
        let (token, expires) = tokens.issue(&identity);
        tracing::info!(nickname = %identity.nickname, resumed = resume.is_some(), "login");
        Ok(Response::new(pb::LoginResponse {
            token,
            nickname: identity.nickname,
            expires_at: Some(expires.into()),
            limits: Some(self.hub.limits().config().advertised()),
        }))
    }

    async fn list_rooms(
        &self,
        request: Request<pb::ListRoomsRequest>,
    ) -> Result<Response<pb::ListRoomsResponse>, Status> {
        let user = caller(&request)?;
        let request = request.into_inner();
        let size = pagination::page_size(request.page_size).map_err(ChatError::from)?;
        let after =
            pagination::decode(&request.page_token, "rooms", "").map_err(ChatError::from)?;
        let (rooms, more) = self
            .hub
            .rooms_page(&user.nickname, after.as_deref(), size)
            .await?;
        let next_page_token = match rooms.last() {
            Some(last) if more => pagination::encode("rooms", "", last.name()),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListRoomsResponse {
            rooms: futures::future::try_join_all(rooms.iter().map(|room| room.info_now())).await?,
            next_page_token,
        }))
    }

    async fn get_room(
        &self,
        request: Request<pb::GetRoomRequest>,
    ) -> Result<Response<pb::GetRoomResponse>, Status> {
        let user = caller(&request)?;
        let room = self
            .readable_room("room", &request.get_ref().room, &user)
            .await?;
        Ok(Response::new(pb::GetRoomResponse {
            room: Some(room.info_now().await?),
        }))
    }

    async fn create_room(
        &self,
        request: Request<pb::CreateRoomRequest>,
    ) -> Result<Response<pb::CreateRoomResponse>, Status> {
        let user = caller(&request)?;
        let request = request.into_inner();
        validate::room_name("room", &request.room).map_err(ChatError::from)?;
        validate::topic("topic", &request.topic).map_err(ChatError::from)?;
        let room = self
            .hub
            .create_room(
                &request.room,
                &request.topic,
                &user.nickname,
                request.private,
            )
            .await?;
        Ok(Response::new(pb::CreateRoomResponse {
            room: Some(room.info_now().await?),
        }))
    }

    async fn list_members(
        &self,
        request: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let user = caller(&request)?;
        let request = request.into_inner();
        let room = self.readable_room("room", &request.room, &user).await?;
        let size = pagination::page_size(request.page_size).map_err(ChatError::from)?;
        let after = pagination::decode(&request.page_token, "members", room.name())
            .map_err(ChatError::from)?;
        let (members, more) = room.members_page(after.as_deref(), size).await?;
        let next_page_token = match members.last() {
            Some(last) if more => pagination::encode("members", room.name(), last),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListMembersResponse {
            members,
            next_page_token,
        }))
    }

    async fn get_history(
        &self,
        request: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<pb::GetHistoryResponse>, Status> {
        let user = caller(&request)?;
        let request = request.into_inner();
        let room = self.readable_room("room", &request.room, &user).await?;
        let size = pagination::page_size(request.page_size).map_err(ChatError::from)?;
        let (direction, start) =
            match pagination::decode(&request.page_token, "history", room.name())
                .map_err(ChatError::from)?
            {
                Some(position) => parse_history_position(&position)?,
                None => {
                    let direction =
                        pb::HistoryDirection::try_from(request.direction).map_err(|_| {
                            ChatError::invalid(
                                "direction",
                                format!("{} is not a HistoryDirection", request.direction),
                            )
                        })?;
                    (direction, request.start_seq)
                }
            };
        let engine = room.engine();
        // The engine's head, not this node's ring's: a message acked through another node
        // is history here too.
        let head = engine
            .head_seq(room.name())
            .await
            .map_err(ChatError::from)?;
        // Everything below the oldest stored seq was removed by retention.
        let oldest = engine
            .first_seq(room.name())
            .await
            .map_err(ChatError::from)?
            .unwrap_or(head + 1);
        let gap = |from: u64, to: u64| {
            (from <= to).then(|| pb::HistoryGap {
                room: room.name().to_owned(),
                from_seq: from,
                to_seq: to,
                ..Default::default()
            })
        };
        let (messages, next, gap) = match direction {
            pb::HistoryDirection::Forward => {
                let after = start.unwrap_or(0);
                let messages = engine
                    .read_after(room.name(), after, size)
                    .await
                    .map_err(ChatError::from)?;
                let next = messages.last().map(|m| m.seq).filter(|&last| last < head);
                // What is kept is contiguous, so the page's first message tells exactly
                // what was removed before it, as of the read that found it. `oldest` was
                // read before, and retention may have run since.
                let kept_from = messages.first().map_or(oldest.min(head + 1), |m| m.seq);
                let gap = gap(after + 1, kept_from - 1);
                (messages, next.map(|seq| format!("f:{seq}")), gap)
            }
            pb::HistoryDirection::Backward | pb::HistoryDirection::Unspecified => {
                let before = start.unwrap_or(head.saturating_add(1));
                let messages = engine
                    .read_before(room.name(), before, size)
                    .await
                    .map_err(ChatError::from)?;
                let lowest = messages.first().map_or(before, |m| m.seq);
                if lowest > oldest {
                    (messages, Some(format!("b:{lowest}")), None)
                } else {
                    let gap = gap(1, oldest.min(before) - 1);
                    (messages, None, gap)
                }
            }
        };
        Ok(Response::new(pb::GetHistoryResponse {
            messages,
            next_page_token: next
                .map(|position| pagination::encode("history", room.name(), &position))
                .unwrap_or_default(),
            gap,
        }))
    }

    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let user = caller(&request)?;
        let message = self.check(request.into_inner().message)?;
        let published = self
            .hub
            .publish_one("message.room", &user.nickname, message)
            .await?;
        Ok(Response::new(pb::PublishResponse {
            seq: published.seq,
            duplicate: published.duplicate,
        }))
    }

    async fn publish_batch(
        &self,
        request: Request<Streaming<pb::PublishBatchRequest>>,
    ) -> Result<Response<pb::PublishBatchResponse>, Status> {
        let user = caller(&request)?;
        let mut inbound = request.into_inner();
        let mut summary = pb::PublishBatchResponse::default();
        let mut ranges: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut index: u32 = 0;
        let mut ended = false;
        while !ended {
            let item = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Err(ChatError::ShuttingDown.into()),
                item = inbound.message() => item?,
            };
            let Some(item) = item else { break };
            // The items already here go as one run, committed together. A failure of the
            // stream behind them ends the call once they are published, as it would have
            // one item at a time.
            let mut items = vec![item];
            let mut failed = None;
            while !ended && failed.is_none() && items.len() < MAX_RUN {
                match inbound.next().now_or_never() {
                    Some(Some(Ok(item))) => items.push(item),
                    Some(Some(Err(status))) => failed = Some(status),
                    Some(None) => ended = true,
                    None => break,
                }
            }
            let (ids, run): (Vec<_>, Vec<_>) = items
                .into_iter()
                .map(|item| {
                    // Echoed in a rejection only when it could be a key: a summary never
                    // repeats more than a key's worth of a client's bytes per message.
                    let client_msg_id = item
                        .message
                        .as_ref()
                        .map(|m| &m.client_msg_id)
                        .filter(|id| id.len() <= validate::MAX_CLIENT_MSG_ID)
                        .cloned()
                        .unwrap_or_default();
                    let message = self.check(item.message);
                    let room = message.as_ref().map(|m| m.room.clone()).unwrap_or_default();
                    ((client_msg_id, room), message)
                })
                .unzip();
            let published = self
                .hub
                .publish("message.room", &user.nickname, run, |_| Ok(()))
                .await;
            for ((client_msg_id, room), published) in ids.into_iter().zip(published) {
                match published {
                    Ok(published) => {
                        summary.accepted += 1;
                        let range = ranges.entry(room).or_insert((published.seq, published.seq));
                        range.0 = range.0.min(published.seq);
                        range.1 = range.1.max(published.seq);
                    }
                    Err(ChatError::Engine(error)) => return Err(ChatError::Engine(error).into()),
                    Err(error) => summary.rejected.push(pb::PublishRejection {
                        index,
                        client_msg_id,
                        error: Some(error.to_command_error()),
                    }),
                }
                index = index.saturating_add(1);
            }
            if let Some(status) = failed {
                return Err(status);
            }
        }
        summary.seq_ranges = ranges
            .into_iter()
            .map(|(room, (first_seq, last_seq))| pb::RoomSeqRange {
                room,
                first_seq,
                last_seq,
            })
            .collect();
        tracing::info!(
            user = %user.nickname,
            accepted = summary.accepted,
            rejected = summary.rejected.len(),
            "batch published"
        );
        Ok(Response::new(summary))
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let user = caller(&request)?;
        let request = request.into_inner();
        if request.rooms.is_empty() {
            return Err(ChatError::invalid("rooms", "name at least one room").into());
        }
        let most = self.hub.limits().config().max_rooms_per_stream;
        if request.rooms.len() > most {
            return Err(ChatError::invalid(
                "rooms",
                format!("at most {most} rooms per subscription"),
            )
            .into());
        }
        let mut cursors = CursorSet::default();
        for (i, position) in request.rooms.iter().enumerate() {
            let field = format!("rooms[{i}].room");
            let room = self.readable_room(&field, &position.room, &user).await?;
            if cursors.contains(&position.room) {
                return Err(ChatError::invalid(field, "this room is named twice").into());
            }
            validate::epoch(&format!("rooms[{i}].epoch"), &position.epoch)
                .map_err(ChatError::from)?;
            let cursor: Cursor = room.tail(position.after_seq, &position.epoch).await?;
            cursors.insert(&position.room, cursor.into_stream());
        }
        let guard = self.hub.limits().open_stream(&user.nickname)?;
        let open = (Held::new(&self.hub.metrics().subscribe_streams), guard);
        let (out, stream) = Outbound::channel(
            self.shutdown.clone(),
            &self.watchdog,
            self.hub.metrics().clone(),
            cursors,
        );
        let rooms: Vec<&str> = request.rooms.iter().map(|r| r.room.as_str()).collect();
        let span = tracing::info_span!("subscribe", user = %user.nickname, rooms = ?rooms);
        tokio::spawn(tail(out, open).instrument(span));
        Ok(Response::new(stream))
    }

    type ChatStream = ChatStream;

    async fn chat(
        &self,
        request: Request<Streaming<pb::ChatRequest>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let user = caller(&request)?;
        if self.shutdown.is_cancelled() {
            return Err(ChatError::ShuttingDown.into());
        }
        let guard = self.hub.limits().open_stream(&user.nickname)?;
        // A token made on another node (this client's last one, before it failed over).
        self.hold_over_the_cluster(&user).await?;
        let claim = self.nicknames.open_stream(&user);
        let span = tracing::info_span!("chat", user = %user.nickname);
        let session = Session::new(
            self.hub.clone(),
            self.auth.clone(),
            user,
            claim,
            guard,
            self.max_text_bytes,
        );
        let (out, stream) = Outbound::channel(
            self.shutdown.clone(),
            &self.watchdog,
            self.hub.metrics().clone(),
            CursorSet::default(),
        );
        tokio::spawn(session.run(request.into_inner(), out).instrument(span));
        Ok(Response::new(stream))
    }
}

/// A history page token's position: `b:<seq>` (backward, before seq) or `f:<seq>`.
fn parse_history_position(
    position: &str,
) -> Result<(pb::HistoryDirection, Option<u64>), ChatError> {
    let invalid = || ChatError::invalid("page_token", "not a page token from GetHistory");
    let (direction, seq) = position.split_once(':').ok_or_else(invalid)?;
    let seq: u64 = seq.parse().map_err(|_| invalid())?;
    match direction {
        "b" => Ok((pb::HistoryDirection::Backward, Some(seq))),
        "f" => Ok((pb::HistoryDirection::Forward, Some(seq))),
        _ => Err(invalid()),
    }
}

/// The task behind a `Subscribe` call. The response body pulls the tailed rooms' messages
/// and gaps, in seq order per room, only as fast as the client reads them; the task ends
/// the stream on shutdown or a stall, and goes when the client does.
async fn tail(out: Outbound<pb::SubscribeResponse>, _open: (Held, StreamGuard)) {
    let end = tokio::select! {
        biased;
        () = out.shutdown() => End::Shutdown,
        () = out.closed() => End::ClientGone,
        end = out.stalled() => end,
    };
    out.finish(end, || pb::SubscribeResponse {
        event: Some(subscribe_response::Event::Reconnect(reconnect_notice())),
    });
}
