//! Confab's protocol and client library.
//!
//! Confab is a chat room server on gRPC streaming. This crate is what every Confab client
//! shares (the terminal client, the load generator, bots and the tests):
//!
//! * [`pb`]: the `chat.v1` protocol generated from `proto/` (messages, client and server
//!   stubs). Its `ChatMessage` is [`ChatMessage`], a shared message that encodes once.
//! * [`FILE_DESCRIPTOR_SET`]: the encoded descriptors of `chat.v1`, for gRPC reflection.
//! * [`Client`]: a typed client: connect, log in, unary calls, and [`ChatStream`], the
//!   interactive session with request ids and idempotency keys filled in.
//! * [`Conversation`]: a chat session that survives the network: it reconnects with
//!   backoff, resumes every room after the last seq it delivered, and sends unacked
//!   messages again under their original ids, so nothing is lost or repeated.
//!
//! The server is the `confab-server` crate; the protocol's guarantees are documented on
//! the service in `proto/chat/v1/chat.proto`.

pub mod client;
pub mod codec;
pub mod conversation;
mod message;

pub use client::{ChatSender, ChatStream, Client, ClientError, Tls, Unreachable, server_url};
pub use conversation::{
    Backoff, ConnectionState, Conversation, ConversationConfig, ConversationEvent, HistoryDirection,
};
pub use message::{ChatMessage, ChatMessageRecord, MessageKind};

/// The `chat.v1` protocol, generated at build time from `proto/chat/v1/*.proto`.
pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("chat.v1");

    pub use crate::message::{ChatMessage, ChatMessageRecord, MessageKind};
}

/// The encoded `FileDescriptorSet` of `chat.v1` and its imports, for the reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/chat_v1_descriptor.bin"));
