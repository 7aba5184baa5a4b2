//! The system under load, behind one face: Confab (through [`wire`]) or nats-server
//! (through `async_nats`), so that one plan runs against either and the two are measured
//! the same way.
//!
//! A room is a Confab room or a NATS subject (`bench.<room>`); a subscriber is a joined
//! `Chat` stream or a subscription; a link is one connection (an HTTP/2 connection logged
//! in as a user of its own, or a NATS client); a message is the same marked text either way
//! (see [`wire::stamp`]), so the readers count and time both alike.

use std::fmt;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use confab::pb::{self, chat_request::Command};
use futures::{StreamExt as _, stream};
use prost::Message as _;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::wire::{self, Connection};

/// Which server is under load.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum System {
    #[default]
    #[serde(rename = "confab")]
    Confab,
    #[serde(rename = "nats-server")]
    Nats,
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Confab => "confab",
            Self::Nats => "nats-server",
        })
    }
}

/// The NATS subject that stands for `room`.
fn subject(room: &str) -> String {
    format!("bench.{room}")
}

/// One connection to the system under load.
#[derive(Clone)]
pub enum Link {
    Confab(Connection),
    Nats(async_nats::Client),
}

impl Link {
    /// Connects to `url`; on Confab, logs in as `name` (unique to this run).
    pub async fn open(system: System, url: &str, name: &str) -> anyhow::Result<Self> {
        match system {
            System::Confab => Ok(Self::Confab(Connection::open(url, name).await?)),
            System::Nats => {
                let client = async_nats::ConnectOptions::new()
                    .name(name)
                    .connect(url)
                    .await
                    .with_context(|| format!("cannot connect to {url}"))?;
                Ok(Self::Nats(client))
            }
        }
    }

    /// Subscribes to `room`: once this returns, the server has the subscription, and
    /// everything published to the room from then on reaches the feed.
    pub async fn subscribe(&self, room: &str) -> anyhow::Result<Feed> {
        match self {
            Self::Confab(connection) => {
                let join = wire::join(1, room);
                let mut responses = connection
                    .chat(stream::once(async move { join }).chain(stream::pending()))
                    .await?;
                // The first frame is the reply to the join.
                responses
                    .message()
                    .await?
                    .context("the stream ended before joining")?;
                Ok(Feed::Confab(responses))
            }
            Self::Nats(client) => {
                let subscription = client.subscribe(subject(room)).await?;
                round_trip(client).await?;
                Ok(Feed::Nats(subscription))
            }
        }
    }

    /// Opens what an idle user holds: on Confab a `Chat` stream that has answered a ping,
    /// on NATS a subscription of its own (subject `idle.<n>`) that the server has.
    pub async fn idle_stream(&self, n: usize) -> anyhow::Result<Feed> {
        match self {
            Self::Confab(connection) => {
                let ping = wire::frame(1, Command::Ping(pb::Ping::default()));
                let mut responses = connection
                    .chat(stream::once(async move { ping }).chain(stream::pending()))
                    .await?;
                responses.message().await?.context("the pong")?;
                Ok(Feed::Confab(responses))
            }
            Self::Nats(client) => {
                let subscription = client.subscribe(format!("idle.{n}")).await?;
                round_trip(client).await?;
                Ok(Feed::Nats(subscription))
            }
        }
    }

    /// A publisher to `rooms`, ready to send (on Confab: joined to each of them).
    pub async fn publisher(&self, rooms: &[String]) -> anyhow::Result<Outlet> {
        match self {
            Self::Confab(connection) => Outlet::confab(connection, rooms).await,
            Self::Nats(client) => Ok(Outlet::Nats {
                client: client.clone(),
                subjects: rooms.iter().map(|room| subject(room).into()).collect(),
            }),
        }
    }
}

/// One connection that sends a message and waits for it to come back (`pingpong`): on
/// Confab a `Chat` stream joined to the room, which gets its own messages back as a chat
/// client does; on NATS a client subscribed to the subject it publishes to.
pub enum Echo {
    Confab {
        frames: mpsc::Sender<Bytes>,
        responses: tonic::Streaming<Bytes>,
        room: String,
    },
    Nats {
        client: async_nats::Client,
        subject: async_nats::Subject,
        subscription: async_nats::Subscriber,
    },
}

impl Echo {
    /// Connects to `url` (on Confab, as `name`) and joins or subscribes to `room`.
    pub async fn open(system: System, url: &str, name: &str, room: &str) -> anyhow::Result<Self> {
        match Link::open(system, url, name).await? {
            Link::Confab(connection) => {
                let (frames, outgoing) = mpsc::channel::<Bytes>(16);
                let mut responses = connection.chat(ReceiverStream::new(outgoing)).await?;
                frames.send(wire::join(1, room)).await?;
                responses
                    .message()
                    .await?
                    .context("the reply to the join")?;
                Ok(Self::Confab {
                    frames,
                    responses,
                    room: room.to_owned(),
                })
            }
            Link::Nats(client) => {
                let subject = subject(room);
                let subscription = client.subscribe(subject.clone()).await?;
                round_trip(&client).await?;
                Ok(Self::Nats {
                    client,
                    subject: subject.into(),
                    subscription,
                })
            }
        }
    }

    /// Sends message `number`, padded to `payload` bytes.
    pub async fn send(&mut self, number: u64, payload: usize) -> anyhow::Result<()> {
        let intended = wire::now_micros();
        match self {
            Self::Confab { frames, room, .. } => {
                // Request ids 2 and up: 1 was the join.
                let frame = wire::message(number + 1, room, intended, number, payload);
                frames.send(frame).await?;
            }
            Self::Nats {
                client, subject, ..
            } => {
                let text = wire::marked_text(intended, number, payload);
                client.publish(subject.clone(), text.into()).await?;
            }
        }
        Ok(())
    }

    /// Waits until message `number` comes back; whatever else arrives meanwhile (on
    /// Confab, the acks) is passed over, and a refusal ends the run.
    pub async fn back(&mut self, number: u64) -> anyhow::Result<()> {
        loop {
            let frame = match self {
                Self::Confab { responses, .. } => responses.message().await?,
                Self::Nats { subscription, .. } => {
                    subscription.next().await.map(|message| message.payload)
                }
            };
            let frame = frame.context("the stream ended")?;
            if wire::stamp(&frame).is_some_and(|(_, n)| n == number) {
                return Ok(());
            }
            if let Self::Confab { .. } = self
                && let Some(refusal) = wire::refusal(frame)
            {
                bail!("message {number} was refused: {refusal}");
            }
        }
    }
}

/// Waits until nats-server has read everything this client sent before: a request that
/// no one answers comes back as "no responders" only after the server has read it, and it
/// reads a connection's commands in order.
async fn round_trip(client: &async_nats::Client) -> anyhow::Result<()> {
    match client.request("_bench.sync", Bytes::new()).await {
        Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
        Err(error) => Err(error).context("the round trip to nats-server"),
        Ok(_) => bail!("something answered on _bench.sync"),
    }
}

/// What a subscriber receives.
#[expect(
    clippy::large_enum_variant,
    reason = "one per subscriber, each in a task of its own for the whole run"
)]
pub enum Feed {
    Confab(tonic::Streaming<Bytes>),
    Nats(async_nats::Subscriber),
}

impl Feed {
    /// The next frame (Confab: a whole response; NATS: a message's payload), or `None`
    /// once the feed has ended or failed.
    pub async fn next(&mut self) -> Option<Bytes> {
        match self {
            Self::Confab(responses) => responses.message().await.ok().flatten(),
            Self::Nats(subscription) => subscription.next().await.map(|message| message.payload),
        }
    }
}

/// A publisher's sending half.
pub enum Outlet {
    /// A `Chat` stream joined to the rooms; a task counts the refusals among its replies.
    Confab {
        frames: mpsc::Sender<Bytes>,
        rooms: Vec<String>,
        replies: tokio::task::JoinHandle<u64>,
    },
    Nats {
        client: async_nats::Client,
        /// Shared bytes: a publish clones a reference, not the name.
        subjects: Vec<async_nats::Subject>,
    },
}

impl Outlet {
    async fn confab(connection: &Connection, rooms: &[String]) -> anyhow::Result<Self> {
        let (frames, outgoing) = mpsc::channel::<Bytes>(1024);
        let mut responses = connection.chat(ReceiverStream::new(outgoing)).await?;
        for (i, room) in rooms.iter().enumerate() {
            frames.send(wire::join(i as u64 + 1, room)).await?;
        }
        // Wait for every join's reply before publishing.
        let mut joined = 0;
        while joined < rooms.len() {
            let frame = responses
                .message()
                .await?
                .context("the publisher's stream ended")?;
            match pb::ChatResponse::decode(frame)?.event {
                Some(pb::chat_response::Event::Joined(_)) => joined += 1,
                Some(pb::chat_response::Event::Error(error)) => {
                    bail!("join refused: {}", error.message)
                }
                _ => {}
            }
        }
        // The replies from here on: acks (counted as fine) and errors (counted).
        let replies = tokio::spawn(async move {
            let mut errors = 0;
            while let Ok(Some(frame)) = responses.message().await {
                if let Some(refusal) = wire::refusal(frame) {
                    if errors == 0 {
                        eprintln!("confab-bench: a send was refused: {refusal}");
                    }
                    errors += 1;
                }
            }
            errors
        });
        Ok(Self::Confab {
            frames,
            rooms: rooms.to_vec(),
            replies,
        })
    }

    /// Publishes message `number` (intended at `intended`, µs since the epoch) to the
    /// publisher's room `room`, padded to `payload` bytes.
    pub async fn send(
        &self,
        room: usize,
        intended: u64,
        number: u64,
        payload: usize,
    ) -> anyhow::Result<()> {
        match self {
            Self::Confab { frames, rooms, .. } => {
                let frame = wire::message(number + 1_000, &rooms[room], intended, number, payload);
                frames.send(frame).await?;
            }
            Self::Nats { client, subjects } => {
                let text = wire::marked_text(intended, number, payload);
                client.publish(subjects[room].clone(), text.into()).await?;
            }
        }
        Ok(())
    }

    /// Ends publishing once what was sent has had time to be answered; returns how many
    /// sends the server refused.
    pub async fn finish(self) -> u64 {
        match self {
            Self::Confab {
                frames, replies, ..
            } => {
                // Let the acks of the last messages come back, then close the stream.
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                drop(frames);
                tokio::time::timeout(crate::load::DRAIN, replies)
                    .await
                    .map(|r| r.unwrap_or(0))
                    .unwrap_or(0)
            }
            Self::Nats { client, .. } => match client.flush().await {
                Ok(()) => 0,
                Err(error) => {
                    eprintln!("confab-bench: flushing the publisher failed: {error}");
                    1
                }
            },
        }
    }
}
