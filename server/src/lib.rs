//! The Confab chat server.
//!
//! How a message travels, and where each part lives:
//!
//! ```text
//! accept ─► auth (interceptor) ─► rpc ─► session task per Chat stream
//!                                              │ commands ─► hub ─► room { ring }
//!                                              │                   │ append   ▲ feed
//!                                              │                   ▼          │
//!                                              │               engine: local (store) | redis
//!                                              ◄─ outbound (body) ◄─ cursor per joined room
//! ```
//!
//! * [`server`]: [`server::Ready::open`] checks the settings and opens the store;
//!   [`server::Ready::serve`] wires everything on a listener and drains on shutdown
//!   ([`server::run`] does both).
//! * [`config`]: every flag, with its environment variable and default.
//! * [`auth`]: who is calling: session tokens, nickname claims, identity-provider tokens,
//!   the interceptor.
//! * [`nickname`]: what a nickname is (PRECIS), when two are the same, look-alikes.
//! * [`rpc`]: the `chat.v1.ChatService` handlers.
//! * [`session`]: the task behind one `Chat` stream; the one place a client frame is
//!   applied.
//! * [`hub`]: this node's rooms: the fan-out ring, fed by the engine; access, presence.
//! * [`engine`]: what the nodes of a cluster share (seqs, the log, idempotency, room
//!   state, nicknames, presence, the feed): local (SQLite or memory) or Redis.
//! * [`cursor`]: one reader in one room: replay, live, catch-up; no gaps, no duplicates.
//! * [`cursor_set`]: the cursors of every room a stream reads, polled by readiness.
//! * [`outbound`]: a server stream's two halves: the response body, which pulls the
//!   rooms' events itself, and the task's, for replies and how the stream ends.
//! * [`stall`]: the watchdog that finds streams whose client stopped reading.
//! * [`store`]: the local engine's storage (SQLite, or memory).
//! * [`connection`]: accepted connections, counted per address.
//! * [`coalesce`]: a connection's small writes, gathered across its streams when that pays.
//! * [`limits`]: flood control (send rate, room creation, connections, streams, rooms).
//! * [`metrics`]: the Prometheus figures and their endpoint.
//! * [`validate`], [`pagination`], [`error`]: checks of client input and how failures
//!   become gRPC statuses (quoting a client's values cut short).
//!
//! `main.rs` only parses flags, sets up logging, binds, opens the server and serves.

pub mod auth;
pub mod coalesce;
pub mod config;
pub mod connection;
pub mod cursor;
pub mod cursor_set;
pub mod engine;
pub mod error;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod nickname;
pub mod outbound;
pub mod pagination;
pub mod rpc;
pub mod server;
pub mod session;
pub mod stall;
pub mod store;
pub mod validate;

pub use config::{Config, LogFormat};
pub use server::{Ready, ServerError, bind_metrics, run, run_with_metrics};
