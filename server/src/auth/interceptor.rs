//! The interceptor that checks every call's credentials, and how handlers learn who
//! is calling.

use std::{sync::Arc, time::SystemTime};

use tonic::{Request, Status, service::Interceptor};

use super::{AuthMode, Identity};
use crate::error::ChatError;

/// The interceptor: verifies `authorization: Bearer <token>` and records the [`Identity`].
#[derive(Clone)]
pub struct Authenticator {
    mode: Arc<AuthMode>,
}

impl Authenticator {
    /// An interceptor for `mode`.
    pub fn new(mode: Arc<AuthMode>) -> Self {
        Self { mode }
    }
}

/// `Login` to confirm.
#[derive(Debug, Clone)]
pub struct ProviderToken {
    /// The token as presented.
    pub token: String,
    /// When it stops being accepted.
    pub expires: SystemTime,
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        // No token: only Login will accept the call (see `caller`).
        // A cheap clone (shared bytes), so the request can be written to below.
        let Some(value) = request.metadata().get("authorization").cloned() else {
            return Ok(request);
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
        let token = token.trim();
        let (identity, expires) = self.mode.verify(token)?;
        request.extensions_mut().insert(identity);
        if let Some(expires) = expires {
            request.extensions_mut().insert(ProviderToken {
                token: token.to_owned(),
                expires,
            });
        }
        Ok(request)
    }
}

/// The caller's identity; UNAUTHENTICATED when the call carried no token.
/// It is recorded as `user` on the call's span.
pub fn caller<T>(request: &Request<T>) -> Result<Identity, Status> {
    request
        .extensions()
        .get::<Identity>()
        .cloned()
        .inspect(|identity| {
            tracing::Span::current().record("user", identity.nickname.as_str());
        })
        .ok_or_else(|| {
            ChatError::Unauthenticated(
                "this call needs `authorization: Bearer <token>` metadata; call Login first".into(),
            )
            .into()
        })
}
