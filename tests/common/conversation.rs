//! A [`Conversation`] (the client library that reconnects, resumes and resends by itself)
//! whose every delivery and ack is recorded, for the tests that break things under it; and
//! a room's whole history, read page by page.

#![allow(dead_code)] // each test file uses its own part of this

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use confab::{
    Backoff, Client, ConnectionState, Conversation, ConversationConfig, ConversationEvent,
    pb::{self, chat_response::Event},
};
use tokio::sync::mpsc;

use super::within;

/// What one conversation has seen.
#[derive(Default)]
pub struct Seen {
    /// Seqs of the messages delivered, in delivery order.
    pub seqs: Vec<u64>,
    /// client_msg_id → acked seq.
    pub acks: HashMap<String, u64>,
    /// Connection states, in order.
    pub states: Vec<ConnectionState>,
    /// Gaps and resets, in order.
    pub gaps: Vec<pb::HistoryGap>,
}

/// Starts a conversation as `nickname` in room `r` on `servers` (tried in turn) and a task
/// that records what it delivers.
pub fn converse_on(servers: &[String], nickname: &str) -> (Conversation, Arc<Mutex<Seen>>) {
    let config = ConversationConfig {
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        },
        servers: servers.to_vec(),
        ..ConversationConfig::new("", nickname, &["r"])
    };
    let (conversation, events) = Conversation::start(config);
    let seen = Arc::new(Mutex::new(Seen::default()));
    tokio::spawn(record(events, seen.clone()));
    (conversation, seen)
}

/// [`converse_on`] one server.
pub fn converse(url: &str, nickname: &str) -> (Conversation, Arc<Mutex<Seen>>) {
    converse_on(&[url.to_owned()], nickname)
}

async fn record(mut events: mpsc::Receiver<ConversationEvent>, seen: Arc<Mutex<Seen>>) {
    while let Some(event) = events.recv().await {
        let mut seen = seen.lock().unwrap();
        match event {
            ConversationEvent::Connection(state) => seen.states.push(state),
            ConversationEvent::Server(response) => match response.event {
                Some(Event::Message(m)) => seen.seqs.push(m.seq),
                Some(Event::Ack(ack)) => {
                    seen.acks.insert(ack.client_msg_id, ack.seq);
                }
                Some(Event::Gap(gap)) => seen.gaps.push(gap),
                _ => {}
            },
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Polls `check` until it holds (or the deadline fails the test).
pub async fn until(what: &str, mut check: impl FnMut() -> bool) {
    within(what, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Whether the conversation's connection is up.
pub fn connected(seen: &Mutex<Seen>) -> bool {
    matches!(
        seen.lock().unwrap().states.last(),
        Some(ConnectionState::Connected { .. })
    )
}

/// How many of its sends the conversations have had acked.
pub fn acked(users: &[(Conversation, Arc<Mutex<Seen>>)]) -> usize {
    users
        .iter()
        .map(|(_, seen)| seen.lock().unwrap().acks.len())
        .sum()
}

/// Every message of `room` in storage, read forward page by page.
pub async fn history(client: &Client, room: &str) -> Vec<pb::ChatMessage> {
    let mut messages = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .rpc()
            .get_history(pb::GetHistoryRequest {
                room: room.into(),
                page_size: 1000,
                page_token: token,
                direction: pb::HistoryDirection::Forward as i32,
                start_seq: None,
            })
            .await
            .expect("history")
            .into_inner();
        messages.extend(page.messages);
        token = page.next_page_token;
        if token.is_empty() {
            return messages;
        }
    }
}
