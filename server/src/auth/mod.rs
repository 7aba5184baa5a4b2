//! Identity: who is calling, and how they prove it.
//!
//! * [`tokens`]: `Login` claims a nickname and returns a session token `<payload>.<mac>`:
//!   the payload names the nickname, a login id and an expiry, and the MAC is
//!   HMAC-SHA256 under the server's key (kept in the data dir), so a token cannot be
//!   forged or altered.
//! * [`nicknames`]: a nickname belongs to one login at a time. It stays claimed
//!   while the login has a stream open and for a lease after its last call, so a client
//!   that drops off and comes back in time (presenting its old token to `Login`) gets its
//!   nickname back, while someone else trying it, or a look-alike of it, meanwhile gets
//!   ALREADY_EXISTS.
//! * [`jwt`]: with `--jwt-secret` (HS256) or `--jwt-public-key` (RS256 or ES256) the server
//!   takes tokens from an identity provider instead: the user is the token's `sub`,
//!   checked like a nickname, and `Login` only confirms a token it is called with. The
//!   provider vouches for the user, so there are no nickname claims in that mode.
//! * [`interceptor`]: the [`Authenticator`] checks the token on every call and puts the
//!   caller's [`Identity`] in the request's extensions; handlers take it with [`caller`].
//!   A call without a token reaches only `Login`.

pub mod interceptor;
pub mod jwt;
pub mod nicknames;
pub mod tokens;

use std::{sync::Arc, time::SystemTime};

use tonic::Status;

pub use interceptor::{Authenticator, ProviderToken, caller};
pub use jwt::{JwtError, JwtVerifier};
pub use nicknames::{Nicknames, StreamClaim};
pub use tokens::{TokenError, Tokens};

/// Who is calling: what a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The nickname the token speaks for.
    pub nickname: String,
    /// The login the token belongs to: one `Login` call, which every token it issues,
    /// and every stream and call made with them, share. (A `Chat` stream's task is a
    /// [`crate::session::Session`]; a login may have several.)
    pub login: u64,
}

/// How callers prove who they are.
pub enum AuthMode {
    /// Session tokens from `Login`, which claims a nickname.
    Sessions {
        /// Issues and verifies the tokens.
        tokens: Arc<Tokens>,
        /// Who holds which nickname.
        nicknames: Arc<Nicknames>,
    },
    /// Tokens from an identity provider.
    Jwt(Box<JwtVerifier>),
}

impl AuthMode {
    /// The identity `token` proves (and when it expires, for a JWT).
    pub fn verify(&self, token: &str) -> Result<(Identity, Option<SystemTime>), Status> {
        match self {
            AuthMode::Sessions { tokens, nicknames } => {
                let identity = tokens
                    .verify(token)
                    .map_err(|e| Status::unauthenticated(e.to_string()))?;
                if !nicknames.admit(&identity) {
                    return Err(Status::unauthenticated(format!(
                        "nickname {} now belongs to another login; log in again",
                        crate::error::quote(&identity.nickname)
                    )));
                }
                Ok((identity, None))
            }
            AuthMode::Jwt(verifier) => {
                let (identity, expires) = verifier
                    .verify(token)
                    .map_err(|e| Status::unauthenticated(e.to_string()))?;
                Ok((identity, Some(expires)))
            }
        }
    }
}
