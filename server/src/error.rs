//! [`ChatError`]: every way a client's request can fail, each mapped to one gRPC code.
//!
//! The same error becomes a call's `Status` (unary calls, stream-level failures) or an
//! in-band `CommandError` event on the `Chat` stream, so both carry the same code, message
//! and field violations.

use std::time::Duration;

use confab::pb;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::store::StoreError;

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
    #[error("room {room:?} does not exist")]
    RoomNotFound {
        /// The field that named it.
        field: String,
        /// The room name.
        room: String,
    },
    /// A room with that name exists already: ALREADY_EXISTS.
    #[error("room {0:?} already exists")]
    RoomExists(String),
    /// Another live session holds the nickname: ALREADY_EXISTS.
    #[error("nickname {0:?} is in use by another session")]
    NicknameTaken(String),
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
    /// The store failed: INTERNAL (details are logged, not sent).
    #[error("storage failure")]
    Store(#[from] StoreError),
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
            Self::RoomExists(_) | Self::NicknameTaken(_) => Code::AlreadyExists,
            Self::FailedPrecondition { .. } => Code::FailedPrecondition,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied { .. } => Code::PermissionDenied,
            Self::ResourceExhausted { .. } => Code::ResourceExhausted,
            Self::ShuttingDown => Code::Unavailable,
            Self::Store(_) => Code::Internal,
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
            message: self.to_string(),
            field_violations: self
                .violation()
                .into_iter()
                .map(|v| pb::FieldViolation {
                    field: v.field,
                    description: v.description,
                })
                .collect(),
            retry_after: self
                .retry_after()
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
        }
    }

    /// Store failures are the server's fault: log the cause, send the client only the code.
    fn log(&self) {
        if let Self::Store(source) = self {
            tracing::error!(error = %source, "store failure");
        }
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
            details.add_bad_request_violation(v.field, v.description);
        }
        if let Some(delay) = error.retry_after() {
            details.set_retry_info(Some(delay));
        }
        Status::with_error_details(error.code(), error.to_string(), details)
    }
}
