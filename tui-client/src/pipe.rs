//! Pipe mode, for scripts, bots and demos: each line of stdin is a message to the room;
//! every event is printed as one JSON object per line on stdout, with at least `kind`,
//! `room`, `seq`, `from` and `text` where they apply. When stdin ends, it waits until every
//! line is acked (or refused) and everything the join replays (up to the head seq the join
//! reported) is printed, then exits 0; with `--follow` it keeps printing.
//!
//! It exits non-zero, with one line on stderr, when the server refuses it for good (an
//! invalid or taken nickname, a bad token, an untrusted certificate) and, without
//! `--follow`, when it has been unable to connect for the connect timeout.

use std::{collections::HashSet, io::Write as _, time::Duration};

use confab::{
    ConnectionState, Conversation, ConversationConfig, ConversationEvent,
    pb::{self, chat_response::Event},
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};

/// Runs pipe mode in `room` until stdin ends and everything is acked (or forever with
/// `follow`). Without `follow`, gives up after `connect_timeout` without a connection.
pub async fn run(
    config: ConversationConfig,
    room: &str,
    follow: bool,
    connect_timeout: Duration,
) -> anyhow::Result<()> {
    let server = config.servers.join(", ");
    let (conversation, mut events) = Conversation::start(config);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut unacked: HashSet<String> = HashSet::new();
    let mut replay = Replay::default();
    let mut failures = 0usize;
    // While not connected: when to give up, and the last reason the connection gave.
    let mut give_up = (!follow).then(|| tokio::time::Instant::now() + connect_timeout);
    let mut last_failure = String::from("no answer yet");
    loop {
        if !stdin_open && replay.done() && unacked.is_empty() && !follow {
            break;
        }
        tokio::select! {
            () = sleep_until(give_up) => {
                anyhow::bail!(
                    "could not connect to {server} within {}: {last_failure}",
                    humantime::format_duration(connect_timeout)
                );
            }
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(line)) if line.trim().is_empty() => {}
                Ok(Some(line)) => {
                    let id = conversation.say(room, &line).await?;
                    unacked.insert(id);
                }
                Ok(None) | Err(_) => stdin_open = false,
            },
            event = events.recv() => {
                let Some(event) = event else { break };
                match &event {
                    ConversationEvent::Connection(ConnectionState::Connected { .. }) => {
                        give_up = None;
                    }
                    ConversationEvent::Connection(ConnectionState::Disconnected { reason, .. }) => {
                        last_failure.clone_from(reason);
                        if give_up.is_none() && !follow {
                            give_up = Some(tokio::time::Instant::now() + connect_timeout);
                        }
                    }
                    ConversationEvent::Server(response) => match &response.event {
                        Some(Event::Ack(ack)) => {
                            unacked.remove(&ack.client_msg_id);
                        }
                        Some(Event::Joined(j)) if j.room.as_ref().is_some_and(|r| r.name == room) => {
                            replay.joined(j);
                        }
                        Some(Event::Message(m)) if m.room == room => replay.reached(m.seq),
                        Some(Event::Gap(g)) if g.room == room => replay.reached(g.to_seq),
                        _ => {}
                    },
                    ConversationEvent::Refused { client_msg_id, .. } => {
                        unacked.remove(client_msg_id);
                        failures += 1;
                    }
                    _ => {}
                }
                if let Some(line) = json_line(&event) {
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{line}")?;
                    out.flush()?;
                }
                if let ConversationEvent::Connection(ConnectionState::Refused { reason, .. }) = &event {
                    anyhow::bail!("{reason}");
                }
            }
        }
    }
    if failures > 0 {
        eprintln!("confab: the server refused {failures} line(s); see the error events");
    }
    Ok(())
}

/// Resolves at `deadline`, or never without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// How far the room's replay has come: pipe mode does not end before the join's history
/// is printed, so that a script reading a room gets all of it.
#[derive(Debug, Default)]
struct Replay {
    /// The head seq the (last) join reported; `None` before the room is joined.
    head: Option<u64>,
    /// The last seq printed (a message, or the end of a gap).
    reached: u64,
}

impl Replay {
    fn joined(&mut self, joined: &pb::Joined) {
        self.head = Some(joined.room.as_ref().map_or(0, |r| r.head_seq));
    }

    fn reached(&mut self, seq: u64) {
        self.reached = self.reached.max(seq);
    }

    /// Joined, and everything up to the head the join reported is printed.
    fn done(&self) -> bool {
        self.head.is_some_and(|head| self.reached >= head)
    }
}

/// One event as a JSON object, or `None` for events not worth a line.
fn json_line(event: &ConversationEvent) -> Option<Value> {
    Some(match event {
        ConversationEvent::Connection(state) => match state {
            ConnectionState::Connecting { attempt, server } => {
                json!({"kind": "connecting", "attempt": attempt, "server": server})
            }
            ConnectionState::Connected { resume_complete } => {
                json!({"kind": "connected", "resume_complete": resume_complete})
            }
            ConnectionState::Disconnected { reason, retry_in } => json!({
                "kind": "disconnected", "reason": reason, "retry_in_ms": retry_in.as_millis() as u64
            }),
            ConnectionState::Refused { reason, .. } => json!({"kind": "refused", "reason": reason}),
        },
        ConversationEvent::Rooms(rooms) => {
            json!({"kind": "rooms", "rooms": rooms.iter().map(|r| r.name.clone()).collect::<Vec<_>>()})
        }
        ConversationEvent::Failed(reason) => json!({"kind": "error", "text": reason}),
        // Pipe mode asks for no history pages.
        ConversationEvent::History { .. } => return None,
        ConversationEvent::Refused {
            client_msg_id,
            error,
        } => json!({
            "kind": "error",
            "client_msg_id": client_msg_id,
            "code": error.code,
            "text": error.message,
            "fields": error.field_violations.iter().map(|v| v.field.clone()).collect::<Vec<_>>(),
        }),
        ConversationEvent::Server(response) => match response.event.as_ref()? {
            Event::Message(m) => json!({
                "kind": if m.kind() == pb::MessageKind::Action { "action" } else { "message" },
                "room": m.room,
                "seq": m.seq,
                "from": m.sender,
                "text": m.text,
                "client_msg_id": m.client_msg_id,
                "sent_at": m.sent_at.map(|t| t.to_string()),
            }),
            Event::Joined(j) => {
                let room = j.room.clone().unwrap_or_default();
                json!({
                    "kind": "joined",
                    "room": room.name,
                    "topic": room.topic,
                    "head_seq": room.head_seq,
                    "replay_from_seq": j.replay_from_seq,
                    "members": j.members,
                })
            }
            Event::Ack(a) => json!({
                "kind": "ack", "room": a.room, "seq": a.seq,
                "client_msg_id": a.client_msg_id, "duplicate": a.duplicate,
            }),
            Event::Presence(p) => match p.kind() {
                pb::PresenceKind::Renamed => json!({
                    "kind": "rename", "room": p.room, "from": p.previous, "to": p.user,
                }),
                kind => json!({
                    "kind": if kind == pb::PresenceKind::Joined { "join" } else { "leave" },
                    "room": p.room, "from": p.user,
                }),
            },
            Event::Typing(t) => {
                json!({"kind": "typing", "room": t.room, "from": t.user, "typing": t.typing})
            }
            Event::RoomUpdated(u) => {
                let room = u.room.clone().unwrap_or_default();
                json!({"kind": "topic", "room": room.name, "from": u.updated_by, "text": room.topic})
            }
            Event::Gap(g) => {
                json!({"kind": "gap", "room": g.room, "from_seq": g.from_seq, "to_seq": g.to_seq})
            }
            Event::Error(e) => json!({
                "kind": "error", "code": e.code, "text": e.message,
                "fields": e.field_violations.iter().map(|v| v.field.clone()).collect::<Vec<_>>(),
            }),
            Event::Left(l) => json!({
                "kind": "left", "room": l.room,
                "reason": l.reason().as_str_name(), "by": l.by, "text": l.message,
            }),
            Event::Renamed(r) => json!({"kind": "renamed", "nickname": r.nickname}),
            Event::ModerationDone(d) => {
                json!({"kind": "moderation_done", "room": d.room, "user": d.user})
            }
            Event::Pong(_) | Event::Reconnect(_) => return None,
        },
    })
}
