//! Talking to Confab cheaply enough that the load generator is not what is measured.
//!
//! Publishers encode their frames with the generated types. Subscribers never decode a
//! response: `confab::codec::RawCodec` hands each frame over as bytes, and [`stamp`] finds the
//! payload's marker (`@` + 16 digits of the intended send time in µs since the epoch + 10
//! digits of the message's number + `@`) in them. Everything else on the stream (joined,
//! presence, acks) has no marker and is skipped.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use confab::{
    codec::RawCodec,
    pb::{self, chat_request::Command},
};
use futures::Stream;
use prost::Message as _;
use tonic::{Request, Streaming, metadata::AsciiMetadataValue, transport::Channel};

/// The payload marker's length: `@`, 16 + 10 digits, `@`.
pub const MARKER_LEN: usize = 28;

/// One HTTP/2 connection, logged in as its own user.
#[derive(Clone)]
pub struct Connection {
    channel: Channel,
    authorization: AsciiMetadataValue,
}

impl Connection {
    /// Connects to `url` and logs in as `nickname`.
    pub async fn open(url: &str, nickname: &str) -> anyhow::Result<Self> {
        // Windows large enough that flow control never waits on this process's reading
        // pace: what is measured is the server.
        let channel = Channel::from_shared(url.to_owned())?
            .tcp_nodelay(true)
            .initial_connection_window_size(16 << 20)
            .initial_stream_window_size(4 << 20)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        let mut client = confab::Client::from_channel(channel.clone());
        client.login(nickname).await.context("login")?;
        let token = client.token().context("a token")?;
        Ok(Self {
            channel,
            authorization: format!("Bearer {token}").parse()?,
        })
    }

    /// Opens a `Chat` stream that sends `frames`; its responses come back as raw frames.
    pub async fn chat(
        &self,
        frames: impl Stream<Item = Bytes> + Send + 'static,
    ) -> anyhow::Result<Streaming<Bytes>> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await?;
        let mut request = Request::new(frames);
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        let path =
            tonic::codegen::http::uri::PathAndQuery::from_static("/chat.v1.ChatService/Chat");
        Ok(grpc.streaming(request, path, RawCodec).await?.into_inner())
    }
}

/// A `Chat` frame, encoded.
pub fn frame(request_id: u64, command: Command) -> Bytes {
    pb::ChatRequest {
        request_id,
        command: Some(command),
    }
    .encode_to_vec()
    .into()
}

/// `join room` (live only: no history).
pub fn join(request_id: u64, room: &str) -> Bytes {
    let head = Some(u64::MAX); // "after" a seq beyond the head: nothing is replayed
    frame(
        request_id,
        Command::Join(pb::JoinRoom {
            room: room.to_owned(),
            after_seq: head,
            ..Default::default()
        }),
    )
}

/// A message to `room` marked with `intended` (µs since the epoch) and `number`, padded
/// with `x` to `payload` bytes of text.
pub fn message(request_id: u64, room: &str, intended: u64, number: u64, payload: usize) -> Bytes {
    let text = marked_text(intended, number, payload);
    frame(
        request_id,
        Command::Send(pb::OutgoingMessage {
            room: room.to_owned(),
            text,
            client_msg_id: format!("m{number}"),
            kind: pb::MessageKind::Text as i32,
        }),
    )
}

/// A message's text: the marker of `intended` (µs since the epoch) and `number`, padded
/// with `x` to `payload` bytes.
pub fn marked_text(intended: u64, number: u64, payload: usize) -> String {
    let mut text = format!("@{intended:016}{number:010}@");
    if text.len() < payload {
        text.extend(std::iter::repeat_n('x', payload - text.len()));
    }
    text
}

/// What the server said when it refused a command, if `frame` (a `ChatResponse`) is an
/// error reply.
pub fn refusal(frame: Bytes) -> Option<String> {
    match pb::ChatResponse::decode(frame).ok()?.event? {
        pb::chat_response::Event::Error(error) => Some(error.message),
        _ => None,
    }
}

/// The marker of a message event: its intended send time (µs) and number.
pub fn stamp(frame: &[u8]) -> Option<(u64, u64)> {
    let mut from = 0;
    while let Some(at) = frame[from..].iter().position(|&b| b == b'@') {
        let start = from + at;
        let marker = frame.get(start..start + MARKER_LEN)?;
        let digits = &marker[1..MARKER_LEN - 1];
        if marker[MARKER_LEN - 1] == b'@' && digits.iter().all(u8::is_ascii_digit) {
            let number = |bytes: &[u8]| {
                bytes
                    .iter()
                    .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'))
            };
            return Some((number(&digits[..16]), number(&digits[16..])));
        }
        from = start + 1;
    }
    None
}

/// Microseconds since the epoch, now.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_frame_carries_a_stamp_that_is_found_again() {
        let sent = message(7, "room", 1_700_000_000_123_456, 42, 100);
        let request = pb::ChatRequest::decode(sent.as_ref()).unwrap();
        let Some(Command::Send(message)) = request.command else {
            panic!("a send");
        };
        assert_eq!(message.text.len(), 100);
        // As the server sends it back: inside a ChatResponse, after other fields.
        let response = pb::ChatResponse {
            request_id: 0,
            event: Some(pb::chat_response::Event::Error(pb::CommandError {
                message: message.text,
                ..Default::default()
            })),
        }
        .encode_to_vec();
        assert_eq!(stamp(&response), Some((1_700_000_000_123_456, 42)));
        assert_eq!(stamp(b"@123@ no marker here"), None);
    }
}
