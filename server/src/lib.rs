//! The Confab chat server.
//!
//! How a message travels, and where each part lives:
//!
//! ```text
//! accept ─► auth (interceptor) ─► service ─► session task per Chat stream
//!                                              │ commands ─► hub ─► room { seq, ring }
//!                                              │                       │ append ─► store
//!                                              ◄─ outbound ◄─ cursor per joined room
//! ```
//!
//! * [`server::run`] wires everything on a listener and drains on shutdown.
//! * [`auth`]: tokens, nickname claims and the interceptor.
//! * [`service`]: the `chat.v1.ChatService` handlers.
//! * [`session`]: the task behind one `Chat` stream.
//! * [`hub`]: rooms, seqs, members, the fan-out ring.
//! * [`cursor`]: one reader in one room: replay, live, catch-up; no gaps, no duplicates.
//! * [`outbound`]: the sending half of a server stream, and how a stream ends.
//! * [`store`]: the storage engine behind the hub.
//! * [`connection`]: accepted connections: counted per address, small writes coalesced.
//! * [`limits`]: flood control (send rate, room creation, connections, streams, rooms).
//! * [`metrics`]: the Prometheus figures and their endpoint.
//! * [`validate`], [`pagination`], [`error`]: checks of client input and how failures
//!   become gRPC statuses.
//!
//! `main.rs` only parses flags, sets up logging, binds and calls [`server::run`].

pub mod auth;
pub mod config;
pub mod connection;
pub mod cursor;
pub mod cursors;
pub mod error;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod nickname;
pub mod outbound;
pub mod pagination;
pub mod server;
pub mod service;
pub mod session;
pub mod store;
pub mod validate;

pub use config::{Config, LogFormat};
pub use server::{Ready, ServerError, bind_metrics, run, run_with_metrics};
