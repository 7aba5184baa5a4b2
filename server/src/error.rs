//! [`ChatError`]: every way a client's request can fail, each mapped to one gRPC code.
//!
//! The same error becomes a call's `Status` (unary calls, stream-level failures) or an
//! in-band `CommandError` event on the `Chat` stream, so both carry the same code, message
//! and field violations.

use std::time::Duration;

use confab::pb;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{engine::EngineError, store::StoreError};

/// How many bytes of a client's value an error quotes at most (escaped); the rest is cut.
pub const QUOTE_BYTES: usize = 48;
/// Longest message or field description an error carries, whatever it quotes: a bound on
/// the trailers (or the error event) one bad request can cost, far below what standard
/// clients accept by default (grpcio: 8 KiB of metadata).
pub const MAX_ERROR_TEXT: usize = 300;

/// `value` quoted for an error message, escaped like `{:?}` and cut after
/// [`QUOTE_BYTES`] bytes (marked as cut, with its full length), so that an error never
/// repeats more of a client's input than a person needs to recognise it.
pub fn quote(value: &str) -> String {
    let mut quoted = String::from('"');
    for c in value.chars() {
        if quoted.len() > QUOTE_BYTES {
            return format!("{quoted}\"… (cut; {} bytes in all)", value.len());
        }
        quoted.extend(c.escape_debug());
    }
    quoted.push('"');
    quoted
}

/// `text` cut to at most [`MAX_ERROR_TEXT`] bytes on a character boundary, marked as cut.
fn bounded(mut text: String) -> String {
    if text.len() > MAX_ERROR_TEXT {
        let mut end = MAX_ERROR_TEXT - "…".len();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// One request field that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The field's path in the request, such as `send.text`.
    pub field: String,
    /// What is wrong with it, for people.
    pub description: String,
}

impl Violation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }

    /// The same violation with `prefix.` in front of the field path.
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}.{}", self.field);
        self
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// A field is malformed: INVALID_ARGUMENT with a BadRequest field violation.
    #[error("invalid {}: {}", .0.field, .0.description)]
    InvalidArgument(Violation),
    /// The named room does not exist: NOT_FOUND.
    #[error("room {} does not exist", quote(room))]
    RoomNotFound {
        /// The field that named it.
        field: String,
        /// The room name.
        room: String,
    },
    /// A room with that name exists already: ALREADY_EXISTS.
    #[error("room {} already exists", quote(.0))]
    RoomExists(String),
    /// Another live session holds the nickname: ALREADY_EXISTS.
    #[error("nickname {} is in use by someone else", quote(.0))]
    NicknameTaken(String),
    /// The nickname looks like one another live session holds: ALREADY_EXISTS.
    #[error(
        "nickname {} looks like {}, which someone else is using",
        quote(nickname),
        quote(held)
    )]
    NicknameLookalike {
        /// The nickname asked for.
        nickname: String,
        /// The held nickname it could be taken for.
        held: String,
    },
    /// The command needs a state the session is not in (e.g. sending to a room it has not
    /// joined): FAILED_PRECONDITION, with the field that names the room.
    #[error("{description}")]
    FailedPrecondition {
        /// The field the precondition is about.
        field: String,
        /// What is missing, for people.
        description: String,
    },
    /// No or bad credentials: UNAUTHENTICATED.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this (not the owner, banned, not invited): PERMISSION_DENIED,
    /// with the field that names the room.
    #[error("{description}")]
    PermissionDenied {
        /// The field naming what is out of bounds.
        field: String,
        /// Why, for people.
        description: String,
    },
    /// Too many requests: RESOURCE_EXHAUSTED with RetryInfo.
    #[error("{description}")]
    ResourceExhausted {
        /// What limit was hit, for people.
        description: String,
        /// When trying again may succeed.
        retry_after: Option<Duration>,
    },
    /// The server is shutting down: UNAVAILABLE.
    #[error("the server is shutting down; reconnect")]
    ShuttingDown,
    /// The engine failed: UNAVAILABLE when it is out of reach (the client may retry),
    /// INTERNAL otherwise (details are logged, not sent).
    #[error("{}", match .0 {
        EngineError::Unavailable(_) => "storage is unreachable for now; try again",
        _ => "storage failure",
    })]
    Engine(#[from] EngineError),
}

impl ChatError {
    /// INVALID_ARGUMENT for `field`.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(Violation::new(field, description))
    }

    /// NOT_FOUND for the room named in `field`.
    pub fn room_not_found(field: impl Into<String>, room: impl Into<String>) -> Self {
        Self::RoomNotFound {
            field: field.into(),
            room: room.into(),
        }
    }

    /// PERMISSION_DENIED about `field`.
    pub fn denied(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::PermissionDenied {
            field: field.into(),
            description: description.into(),
        }
    }

    /// FAILED_PRECONDITION about `field`.
    pub fn precondition(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::FailedPrecondition {
            field: field.into(),
            description: description.into(),
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::RoomNotFound { .. } => Code::NotFound,
            Self::RoomExists(_) | Self::NicknameTaken(_) | Self::NicknameLookalike { .. } => {
                Code::AlreadyExists
            }
            Self::FailedPrecondition { .. } => Code::FailedPrecondition,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied { .. } => Code::PermissionDenied,
            Self::ResourceExhausted { .. } => Code::ResourceExhausted,
            Self::ShuttingDown => Code::Unavailable,
            Self::Engine(EngineError::Unavailable(_)) => Code::Unavailable,
            Self::Engine(_) => Code::Internal,
        }
    }

    /// The field the error is about, if any (reported as a field violation).
    fn violation(&self) -> Option<Violation> {
        match self {
            Self::InvalidArgument(v) => Some(v.clone()),
            Self::RoomNotFound { field, .. }
            | Self::FailedPrecondition { field, .. }
            | Self::PermissionDenied { field, .. } => {
                Some(Violation::new(field.clone(), self.to_string()))
            }
            _ => None,
        }
    }

    /// Same error with its field path put under `prefix` (`room` → `send.room`).
    pub fn within(self, prefix: &str) -> Self {
        match self {
            Self::InvalidArgument(v) => Self::InvalidArgument(v.within(prefix)),
            Self::RoomNotFound { field, room } => Self::RoomNotFound {
                field: format!("{prefix}.{field}"),
                room,
            },
            Self::FailedPrecondition { field, description } => Self::FailedPrecondition {
                field: format!("{prefix}.{field}"),
                description,
            },
            Self::PermissionDenied { field, description } => Self::PermissionDenied {
                field: format!("{prefix}.{field}"),
                description,
            },
            other => other,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::ResourceExhausted { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// As an in-band error event of the `Chat` stream.
    pub fn to_command_error(&self) -> pb::CommandError {
        self.log();
        pb::CommandError {
            code: self.code() as i32,
            message: bounded(self.to_string()),
            field_violations: self
                .violation()
                .into_iter()
                .map(|v| pb::FieldViolation {
                    field: v.field,
                    description: bounded(v.description),
                })
                .collect(),
            retry_after: self
                .retry_after()
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
        }
    }

    /// Engine failures are the server's business: log the cause, send the client only
    /// the code.
    fn log(&self) {
        match self {
            Self::Engine(EngineError::Unavailable(cause)) => {
                tracing::warn!(%cause, "engine unreachable");
            }
            Self::Engine(source) => tracing::error!(error = %source, "engine failure"),
            _ => {}
        }
    }
}

impl From<StoreError> for ChatError {
    fn from(error: StoreError) -> Self {
        ChatError::Engine(error.into())
    }
}

impl From<Violation> for ChatError {
    fn from(violation: Violation) -> Self {
        ChatError::InvalidArgument(violation)
    }
}

impl From<ChatError> for Status {
    fn from(error: ChatError) -> Status {
        error.log();
        let mut details = ErrorDetails::new();
        if let Some(v) = error.violation() {
            details.add_bad_request_violation(v.field, bounded(v.description));
        }
        if let Some(delay) = error.retry_after() {
            details.set_retry_info(Some(delay));
        }
        Status::with_error_details(error.code(), bounded(error.to_string()), details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_quoted_whole_and_long_ones_cut_with_their_length() {
        assert_eq!(quote("lobby"), r#""lobby""#);
        assert_eq!(quote("a\nb"), r#""a\nb""#);
        let long = "x".repeat(60_000);
        let quoted = quote(&long);
        assert!(quoted.len() < QUOTE_BYTES + 40, "{quoted}");
        assert!(quoted.ends_with("… (cut; 60000 bytes in all)"), "{quoted}");
        // Escapes count toward the bound: control characters cannot blow it up.
        assert!(quote(&"\u{1}".repeat(10_000)).len() < QUOTE_BYTES + 40);
    }

    #[test]
    fn every_error_text_is_bounded_on_a_char_boundary() {
        let text = bounded("é".repeat(1000));
        assert!(text.len() <= MAX_ERROR_TEXT && text.ends_with('…'));
        assert_eq!(bounded("short".into()), "short");
    }
}
