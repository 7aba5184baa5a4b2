//! `confab demo`: a room brought to life for one person. Simulated users join, type,
//! chat, answer when mentioned, wander off and come back, while the person chats with them
//! in the normal UI. Without `--server` it runs its own in-memory server on a free
//! loopback port, so it works with nothing else running.

use std::time::Duration;

use confab::{
    Backoff, Conversation, ConversationConfig, ConversationEvent, pb::chat_response::Event,
};
use rand::{Rng as _, seq::IndexedRandom as _};
use tokio::{net::TcpListener, sync::oneshot};

/// Names the simulated users take, in order.
const NAMES: &[&str] = &[
    "ada", "linus", "grace", "ken", "barbara", "dennis", "margaret", "alan", "radia", "guido",
    "frances", "bjarne",
];

/// What they say, picked at random.
const LINES: &[&str] = &[
    "morning all",
    "has anyone tried the new build?",
    "it compiles, ship it",
    "I think the bug is in the cursor code",
    "coffee first, then code",
    "who broke main? 👀",
    "the tests are green on my machine",
    "that's a great point",
    "lol",
    "brb",
    "anyone up for a code review?",
    "the benchmark numbers look good today",
    "I'm refactoring the hub, wish me luck",
    "did you see the release notes?",
    "pair on this later?",
    "TIL about HTTP/2 flow control",
    "backpressure is a feature, not a bug",
    "naming things is hard",
    "works for me ¯\\_(ツ)_/¯",
    "let's write a test for that first",
    "rebasing… again",
    "I'll take the next issue",
];

/// Actions (`/me`), now and then.
const ACTIONS: &[&str] = &[
    "waves",
    "grabs another coffee",
    "is reading the docs",
    "stretches",
    "nods",
];

/// Answers when mentioned.
const REPLIES: &[&str] = &[
    "yes?",
    "good question!",
    "hmm, let me think about that",
    "agreed",
    "can you say more?",
    "on it",
];

/// Starts an in-memory server on a free loopback port; stops it when the sender is dropped.
pub async fn embedded_server() -> anyhow::Result<(String, oneshot::Sender<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = confab_server::Config {
        in_memory: true,
        ..confab_server::Config::default()
    };
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(confab_server::run(listener, config, async {
        let _ = stopped.await;
    }));
    Ok((format!("http://{addr}"), stop))
}

/// Starts `users` simulated users in `room` on `server`; they run until the process ends.
pub fn start_users(servers: &[String], room: &str, users: usize) {
    for name in NAMES
        .iter()
        .cycle()
        .take(users.min(NAMES.len() * 4))
        .enumerate()
        .map(|(i, n)| {
            if i < NAMES.len() {
                (*n).to_owned()
            } else {
                format!("{n}{}", i / NAMES.len() + 1)
            }
        })
    {
        tokio::spawn(simulate(servers.to_vec(), room.to_owned(), name));
    }
}

fn pause(min_ms: u64, max_ms: u64) -> Duration {
    Duration::from_millis(rand::rng().random_range(min_ms..=max_ms))
}

/// One simulated user: listens, and every few seconds does something.
async fn simulate(servers: Vec<String>, room: String, name: String) {
    let config = ConversationConfig {
        backoff: Backoff::default(),
        servers,
        ..ConversationConfig::new("", &name, &[&room])
    };
    let (chat, mut events) = Conversation::start(config);
    let mut next = Box::pin(tokio::time::sleep(pause(1_000, 4_000)));
    let mut away = false;
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { return };
                // Someone mentioned this user: answer after a moment.
                if let ConversationEvent::Server(response) = event
                    && let Some(Event::Message(m)) = response.event
                    && m.sender != name
                    && m.text.to_lowercase().contains(&name)
                    && !away
                {
                    let reply = format!("{}: {}", m.sender, REPLIES.choose(&mut rand::rng()).unwrap_or(&"hi"));
                    let (chat, room) = (chat.clone(), room.clone());
                    tokio::spawn(async move {
                        let _ = chat.typing(&room, true).await;
                        tokio::time::sleep(pause(800, 2_000)).await;
                        let _ = chat.say(&room, &reply).await;
                    });
                }
            }
            () = &mut next => {
                let roll: u32 = rand::rng().random_range(0..100);
                let result = if away {
                    away = false;
                    chat.join(&room).await
                } else if roll < 5 {
                    away = true;
                    chat.leave(&room).await
                } else if roll < 15 {
                    let action = *ACTIONS.choose(&mut rand::rng()).unwrap_or(&"waves");
                    chat.send(&room, action, confab::pb::MessageKind::Action).await.map(drop)
                } else {
                    let line = *LINES.choose(&mut rand::rng()).unwrap_or(&"hi");
                    let _ = chat.typing(&room, true).await;
                    tokio::time::sleep(pause(600, 2_500)).await;
                    chat.say(&room, line).await.map(drop)
                };
                if result.is_err() {
                    return;
                }
                next = Box::pin(tokio::time::sleep(if away { pause(5_000, 15_000) } else { pause(2_000, 9_000) }));
            }
        }
    }
}
