//! A sender's run of messages through the append script (`lua/append.lua`).
//!
//! A run is cut into segments: consecutive messages of one room. On one Redis the whole
//! run goes in one round trip; on a Redis Cluster each segment does, since a pipeline
//! may not cross slots and each room's keys have a slot of their own (so a segment goes
//! to the one node that holds its room). A round trip of one call is one `EVALSHA`
//! (sent again as `EVAL` when Redis has not cached the script); of several, one
//! pipeline of `EVAL`s, which Redis runs in order on one connection. Not `EVALSHA`
//! there: if another node loaded the script while the pipeline ran, an early message
//! could fail as an unknown script after a later one had run, and the room's seqs would
//! no longer follow the run's order. `EVAL` costs Redis a hash of the script (1.6 KB)
//! per message, where a round trip per message cost the sender far more.

use std::time::SystemTime;

use confab::ChatMessageRecord;
use redis::{Cmd, ErrorKind, RedisWrite as _, ServerErrorKind, ToRedisArgs as _};

use super::{RedisEngine, keys, unavailable, wire};
use crate::{
    engine::{Charge, EngineError, Published, in_place, new_epoch},
    error::ChatError,
    store::{RoomRecord, to_micros},
    validate::Outgoing,
};

/// The append script's source.
pub(super) const APPEND_LUA: &str = include_str!("lua/append.lua");

/// What the script answers: the seq, 1 for a retry, the room's epoch.
type Answer = (u64, u8, String);

/// One message's call of the append script: its keys and arguments.
struct AppendCall {
    keys: [String; 3],
    args: Vec<Vec<u8>>,
    sent_at: SystemTime,
}

impl AppendCall {
    fn new(engine: &RedisEngine, sender: &str, message: Outgoing, record: &RoomRecord) -> Self {
        let room = record.name.as_str();
        let sent_at = SystemTime::now();
        let keys = [
            keys::meta(room),
            keys::log(room),
            keys::sent(room, sender, &message.client_msg_id),
        ];
        let body = wire::encode_body(&ChatMessageRecord {
            room: room.to_owned(),
            seq: 0,
            sender: sender.to_owned(),
            text: message.text,
            kind: message.kind as i32,
            client_msg_id: message.client_msg_id,
            sent_at: Some(sent_at.into()),
        });
        let mut args: Vec<Vec<u8>> = Vec::new();
        args.write_arg(&body);
        to_micros(sent_at).write_redis_args(&mut args);
        u64::try_from(engine.dedupe_window.as_millis())
            .unwrap_or(u64::MAX)
            .write_redis_args(&mut args);
        engine
            .retention
            .max_messages
            .unwrap_or(0)
            .write_redis_args(&mut args);
        keys::channel(room).write_redis_args(&mut args);
        new_epoch().write_redis_args(&mut args);
        for (_, value) in wire::meta_fields(record) {
            value.write_redis_args(&mut args);
        }
        Self {
            keys,
            args,
            sent_at,
        }
    }

    /// The call as `command` (`EVALSHA` or `EVAL`) of `script` (its hash or its source).
    fn cmd(&self, command: &str, script: &str) -> Cmd {
        let mut cmd = redis::cmd(command);
        cmd.arg(script)
            .arg(self.keys.len())
            .arg(&self.keys[..])
            .arg(&self.args[..]);
        cmd
    }
}

/// A segment of a run made ready to send: each message's refusal, if any, and the calls
/// of the others, in order.
struct Segment {
    refused: Vec<Option<ChatError>>,
    calls: Vec<AppendCall>,
}

impl RedisEngine {
    /// Appends `sender`'s run (see the module doc): on one Redis in one round trip, on a
    /// Redis Cluster one round trip per segment.
    pub(super) async fn append_run(
        &self,
        sender: &str,
        run: Vec<Outgoing>,
        charge: Charge<'_>,
    ) -> Vec<Result<Published, ChatError>> {
        let mut segments = Vec::new();
        let mut run = run.into_iter().peekable();
        while let Some(first) = run.next() {
            let mut segment = vec![first];
            while let Some(next) = run.next_if(|m| m.room == segment[0].room) {
                segment.push(next);
            }
            segments.push(self.segment(sender, segment, charge));
        }
        // The round trips, in order: the whole run, or each segment.
        let trips: Vec<Vec<&AppendCall>> = if self.conn.pipelines_across_rooms() {
            vec![segments.iter().flat_map(|s| &s.calls).collect()]
        } else {
            segments.iter().map(|s| s.calls.iter().collect()).collect()
        };
        let mut answers = Vec::new();
        for trip in &trips {
            answers.extend(self.eval(trip).await);
        }
        let mut answers = answers.into_iter();
        let mut published = Vec::new();
        for Segment { refused, calls } in segments {
            let answered = calls.iter().zip(answers.by_ref()).map(|(call, answer)| {
                let (seq, duplicate, _epoch) = answer?;
                if duplicate == 0 {
                    self.metrics
                        .committed(call.sent_at.elapsed().unwrap_or_default());
                    self.metrics.messages_in.inc();
                }
                Ok(Published {
                    seq,
                    duplicate: duplicate == 1,
                })
            });
            published.extend(in_place(refused, answered));
        }
        published
    }

    /// Consecutive messages of one room, charged and made into calls.
    fn segment(&self, sender: &str, segment: Vec<Outgoing>, charge: Charge<'_>) -> Segment {
        let room = &segment[0].room;
        let Some(record) = self.records.get(room).map(|r| r.clone()) else {
            let error = EngineError::Protocol(format!("room {room} is not attached"));
            return Segment {
                refused: segment.iter().map(|_| Some(error.clone().into())).collect(),
                calls: Vec::new(),
            };
        };
        // Per message, its refusal, if any. Across nodes a retry cannot be told before the
        // script runs: every send costs its sender a token on the node it reaches.
        let mut refused = Vec::with_capacity(segment.len());
        let mut calls = Vec::with_capacity(segment.len());
        for message in segment {
            match charge() {
                Ok(()) => {
                    refused.push(None);
                    calls.push(AppendCall::new(self, sender, message, &record));
                }
                Err(error) => refused.push(Some(error)),
            }
        }
        Segment { refused, calls }
    }

    /// Calls in one round trip, answered in order; a failed round trip fails every call.
    async fn eval(&self, calls: &[&AppendCall]) -> Vec<Result<Answer, EngineError>> {
        let answers = match calls {
            [] => Ok(Vec::new()),
            [call] => self.eval_one(call).await.map(|answer| vec![answer]),
            calls => self.eval_pipelined(calls).await,
        };
        match answers {
            Ok(answers) => answers.into_iter().map(Ok).collect(),
            Err(error) => vec![Err(error); calls.len()],
        }
    }

    /// One call: `EVALSHA`, and `EVAL` if Redis has not cached the script.
    async fn eval_one(&self, call: &AppendCall) -> Result<Answer, EngineError> {
        self.timed("append", async {
            let mut conn = self.conn.clone();
            let hash = self.scripts.append.get_hash();
            match call.cmd("EVALSHA", hash).query_async(&mut conn).await {
                Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    call.cmd("EVAL", APPEND_LUA).query_async(&mut conn).await
                }
                answer => answer,
            }
            .map_err(unavailable)
        })
        .await
    }

    /// Several calls as one pipeline of `EVAL`s, run in order.
    async fn eval_pipelined(&self, calls: &[&AppendCall]) -> Result<Vec<Answer>, EngineError> {
        let mut pipe = redis::pipe();
        for call in calls {
            pipe.add_command(call.cmd("EVAL", APPEND_LUA));
        }
        self.timed("append", async {
            let mut conn = self.conn.clone();
            pipe.query_async(&mut conn).await.map_err(unavailable)
        })
        .await
    }
}
