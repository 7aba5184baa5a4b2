//! Identity: session tokens, nickname claims, and the interceptor that checks them.
//!
//! `Login` claims a nickname and returns a token `<payload>.<mac>`: the payload names the
//! nickname, a session id and an expiry, and the MAC is HMAC-SHA256 under the server's key,
//! so a token cannot be forged or altered. The [`Authenticator`] interceptor checks the
//! token on every call and puts the caller's [`Identity`] in the request's extensions;
//! handlers take it with [`caller`]. A call without a token reaches only `Login`.
//!
//! With `--jwt-secret` (HS256) or `--jwt-public-key` (RS256 or ES256) the server takes
//! tokens from an identity provider instead ([`JwtVerifier`]): the user is the token's
//! `sub`, checked like a nickname, and `Login` only confirms a token it is called with.
//! The provider vouches for the user, so there are no nickname claims in that mode.
//!
//! A nickname belongs to one session at a time. It stays claimed while the session has a
//! stream open and for a lease after its last call, so a client that drops off and comes
//! back in time (presenting its old token to `Login`) gets its nickname back, while someone
//! else trying it meanwhile gets ALREADY_EXISTS.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use dashmap::{DashMap, mapref::entry::Entry};
use hmac::{Hmac, Mac};
use rand::Rng as _;
use sha2::Sha256;
use tonic::{Request, Status, service::Interceptor};

use crate::error::ChatError;

type HmacSha256 = Hmac<Sha256>;

/// Who is calling: what a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The nickname the token speaks for.
    pub nickname: String,
    /// The login session the token belongs to.
    pub session: u64,
}

/// Issues and verifies session tokens.
pub struct Tokens {
    /// The HMAC key, ready to clone for each token.
    key: HmacSha256,
    /// How long a token is accepted after it is issued.
    ttl: Duration,
}

impl Tokens {
    /// Tokens signed with `secret` that last `ttl`.
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        Self {
            // HMAC takes keys of any length, so this cannot fail.
            key: HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length"),
            ttl,
        }
    }

    /// Tokens under a fresh random secret: valid until this process ends.
    pub fn ephemeral(ttl: Duration) -> Self {
        Self::new(&rand::rng().random::<[u8; 32]>(), ttl)
    }

    /// Tokens under the secret kept in `path`, made (32 random bytes, hex, file mode
    /// 0600) the first time, so that tokens stay valid across restarts.
    pub fn persistent(path: &Path, ttl: Duration) -> std::io::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(secret) => {
                let secret = secret.trim();
                if secret.len() < 32 {
                    return Err(std::io::Error::other(format!(
                        "{} holds a secret shorter than 32 characters",
                        path.display()
                    )));
                }
                Ok(Self::new(secret.as_bytes(), ttl))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let secret: String = rand::rng()
                    .random::<[u8; 32]>()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut file = options.open(path)?;
                std::io::Write::write_all(&mut file, secret.as_bytes())?;
                file.sync_all()?;
                tracing::info!(path = %path.display(), "made a new token signing secret");
                Ok(Self::new(secret.as_bytes(), ttl))
            }
            Err(error) => Err(error),
        }
    }

    /// A token for `identity`, and when it expires.
    pub fn issue(&self, identity: &Identity) -> (String, SystemTime) {
        let expires = SystemTime::now() + self.ttl;
        let expires_unix = expires
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let payload = format!(
            "v1:{}:{:016x}:{expires_unix}",
            identity.nickname, identity.session
        );
        let mut mac = self.key.clone();
        mac.update(payload.as_bytes());
        let token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        );
        (token, expires)
    }

    /// The identity a token speaks for, if it is genuine and not expired.
    pub fn verify(&self, token: &str) -> Result<Identity, &'static str> {
        const MALFORMED: &str = "the token is malformed";
        let (payload, tag) = token.split_once('.').ok_or(MALFORMED)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| MALFORMED)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| MALFORMED)?;
        let mut mac = self.key.clone();
        mac.update(&payload);
        mac.verify_slice(&tag)
            .map_err(|_| "the token was not issued by this server")?;
        let payload = String::from_utf8(payload).map_err(|_| MALFORMED)?;
        let mut fields = payload.split(':');
        let (Some("v1"), Some(nickname), Some(session), Some(expires), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return Err(MALFORMED);
        };
        let session = u64::from_str_radix(session, 16).map_err(|_| MALFORMED)?;
        let expires: u64 = expires.parse().map_err(|_| MALFORMED)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if now >= expires {
            return Err("the token has expired; log in again");
        }
        Ok(Identity {
            nickname: nickname.to_owned(),
            session,
        })
    }
}

/// Which session holds each nickname.
pub struct Nicknames {
    /// Claims by lower-cased nickname, so `Alice` and `alice` are one name.
    claims: DashMap<String, Claim>,
    /// How long a claim outlives its session's last stream or call.
    lease: Duration,
}

#[derive(Debug)]
struct Claim {
    /// The session holding the nickname.
    session: u64,
    /// How many of its streams are open; the claim is live while any is.
    streams: usize,
    /// When it last made a call or closed a stream.
    last_seen: Instant,
}

impl Claim {
    fn new(session: u64) -> Self {
        Self {
            session,
            streams: 0,
            last_seen: Instant::now(),
        }
    }

    fn is_live(&self, lease: Duration) -> bool {
        self.streams > 0 || self.last_seen.elapsed() < lease
    }
}

impl Nicknames {
    /// An empty registry whose claims last `lease` after their last activity.
    pub fn new(lease: Duration) -> Self {
        Self {
            claims: DashMap::new(),
            lease,
        }
    }

    /// Claims `nickname` for a new session, or for the session of `resume` if it held it.
    pub fn claim(&self, nickname: &str, resume: Option<&Identity>) -> Result<Identity, ChatError> {
        let key = nickname.to_lowercase();
        let resumed = resume
            .filter(|r| r.nickname.to_lowercase() == key)
            .map(|r| r.session);
        let session = match self.claims.entry(key) {
            Entry::Vacant(slot) => {
                let session = resumed.unwrap_or_else(new_session);
                slot.insert(Claim::new(session));
                session
            }
            Entry::Occupied(mut slot) => {
                let claim = slot.get_mut();
                if resumed == Some(claim.session) {
                    claim.last_seen = Instant::now();
                    claim.session
                } else if !claim.is_live(self.lease) {
                    let session = resumed.unwrap_or_else(new_session);
                    *claim = Claim::new(session);
                    session
                } else {
                    return Err(ChatError::NicknameTaken(nickname.to_owned()));
                }
            }
        };
        Ok(Identity {
            nickname: nickname.to_owned(),
            session,
        })
    }

    /// Whether `identity` may speak for its nickname; touches its claim. A token whose
    /// claim lapsed takes the nickname back if no one else took it meanwhile.
    pub fn admit(&self, identity: &Identity) -> bool {
        match self.claims.entry(identity.nickname.to_lowercase()) {
            Entry::Vacant(slot) => {
                slot.insert(Claim::new(identity.session));
                true
            }
            Entry::Occupied(mut slot) => {
                let claim = slot.get_mut();
                if claim.session == identity.session {
                    claim.last_seen = Instant::now();
                    true
                } else if !claim.is_live(self.lease) {
                    *claim = Claim::new(identity.session);
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Marks a stream of `identity` open until the guard is dropped.
    pub fn open_stream(self: &Arc<Self>, identity: &Identity) -> StreamClaim {
        let key = identity.nickname.to_lowercase();
        if let Some(mut claim) = self.claims.get_mut(&key)
            && claim.session == identity.session
        {
            claim.streams += 1;
        }
        StreamClaim {
            nicknames: self.clone(),
            key,
            session: identity.session,
        }
    }

    /// Forgets claims that are no longer live, so the registry does not grow forever.
    pub fn prune(&self) {
        self.claims.retain(|_, claim| claim.is_live(self.lease));
    }
}

fn new_session() -> u64 {
    rand::rng().random()
}

/// An open stream that keeps its nickname's claim live.
pub struct StreamClaim {
    nicknames: Arc<Nicknames>,
    key: String,
    session: u64,
}

impl Drop for StreamClaim {
    fn drop(&mut self) {
        if let Some(mut claim) = self.nicknames.claims.get_mut(&self.key)
            && claim.session == self.session
        {
            claim.streams = claim.streams.saturating_sub(1);
            claim.last_seen = Instant::now();
        }
    }
}

/// The claims Confab reads from an identity provider's token.
#[derive(Debug, serde::Deserialize)]
struct Claims {
    /// The user: becomes the nickname.
    sub: String,
    /// Expiry, seconds since the epoch (required).
    exp: u64,
}

/// Verifies identity-provider tokens (JWTs): signature, algorithm, expiry, and the issuer
/// and audience when configured.
pub struct JwtVerifier {
    key: jsonwebtoken::DecodingKey,
    validation: jsonwebtoken::Validation,
}

impl JwtVerifier {
    /// HS256 tokens signed with `secret`.
    pub fn hs256(secret: &[u8]) -> Self {
        Self::with(
            jsonwebtoken::DecodingKey::from_secret(secret),
            jsonwebtoken::Algorithm::HS256,
        )
    }

    /// RS256 or ES256 tokens, whichever kind of public key `pem` holds.
    pub fn public_key(pem: &[u8]) -> Result<Self, String> {
        use jsonwebtoken::{Algorithm, DecodingKey};
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Self::with(key, Algorithm::RS256));
        }
        DecodingKey::from_ec_pem(pem)
            .map(|key| Self::with(key, Algorithm::ES256))
            .map_err(|e| format!("not an RSA or P-256 public key in PEM: {e}"))
    }

    fn with(key: jsonwebtoken::DecodingKey, algorithm: jsonwebtoken::Algorithm) -> Self {
        let mut validation = jsonwebtoken::Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 30;
        Self { key, validation }
    }

    /// Also requires the `iss` claim to be `issuer`.
    pub fn issuer(mut self, issuer: &str) -> Self {
        self.validation.set_issuer(&[issuer]);
        self
    }

    /// Also requires the `aud` claim to include `audience`.
    pub fn audience(mut self, audience: &str) -> Self {
        self.validation.set_audience(&[audience]);
        self
    }

    /// The user a token speaks for, and when it expires.
    pub fn verify(&self, token: &str) -> Result<(Identity, SystemTime), String> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| format!("the token is not accepted: {e}"))?
            .claims;
        crate::validate::nickname("sub", &claims.sub).map_err(|v| {
            format!(
                "the token's subject cannot be a nickname: {}",
                v.description
            )
        })?;
        let identity = Identity {
            nickname: claims.sub,
            session: 0,
        };
        Ok((identity, UNIX_EPOCH + Duration::from_secs(claims.exp)))
    }
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

impl AuthMode {
    /// The identity `token` proves (and when it expires, for a JWT).
    pub fn verify(&self, token: &str) -> Result<(Identity, Option<SystemTime>), Status> {
        match self {
            AuthMode::Sessions { tokens, nicknames } => {
                let identity = tokens.verify(token).map_err(Status::unauthenticated)?;
                if !nicknames.admit(&identity) {
                    return Err(Status::unauthenticated(format!(
                        "nickname {} now belongs to another session; log in again",
                        crate::error::quote(&identity.nickname)
                    )));
                }
                Ok((identity, None))
            }
            AuthMode::Jwt(verifier) => {
                let (identity, expires) =
                    verifier.verify(token).map_err(Status::unauthenticated)?;
                Ok((identity, Some(expires)))
            }
        }
    }
}

/// The caller's verified identity-provider token and its expiry (JWT mode only), for
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

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Identity {
        Identity {
            nickname: "alice".into(),
            session: 42,
        }
    }

    #[test]
    fn a_token_verifies_to_its_identity() {
        let tokens = Tokens::ephemeral(Duration::from_secs(60));
        let (token, _) = tokens.issue(&alice());
        assert_eq!(tokens.verify(&token), Ok(alice()));
    }

    #[test]
    fn altered_foreign_and_expired_tokens_are_refused() {
        let tokens = Tokens::ephemeral(Duration::from_secs(60));
        let (token, _) = tokens.issue(&alice());
        let (payload, tag) = token.split_once('.').unwrap();
        let forged_payload = URL_SAFE_NO_PAD.encode(
            String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap())
                .unwrap()
                .replace("alice", "mallory"),
        );
        assert!(tokens.verify(&format!("{forged_payload}.{tag}")).is_err());
        assert!(tokens.verify("not-a-token").is_err());

        let other_server = Tokens::ephemeral(Duration::from_secs(60));
        assert!(other_server.verify(&token).is_err());

        let expired = Tokens::new(b"k", Duration::ZERO);
        let (token, _) = expired.issue(&alice());
        assert!(expired.verify(&token).is_err());
    }

    #[test]
    fn a_persistent_secret_is_private_and_outlives_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token-secret");
        let (token, _) = Tokens::persistent(&path, Duration::from_secs(60))
            .unwrap()
            .issue(&alice());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = Tokens::persistent(&path, Duration::from_secs(60)).unwrap();
        assert_eq!(again.verify(&token), Ok(alice()));
        std::fs::write(&path, "short").unwrap();
        assert!(Tokens::persistent(&path, Duration::from_secs(60)).is_err());
    }

    #[test]
    fn identity_provider_tokens_are_checked_for_signature_expiry_and_subject() {
        use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let sign = |secret: &[u8], claims: signed::Claims| {
            encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(secret),
            )
            .unwrap()
        };
        let verifier = JwtVerifier::hs256(b"provider-secret").issuer("idp");
        let good = signed::Claims::new("alice", now + 600, "idp");
        let (identity, expires) = verifier.verify(&sign(b"provider-secret", good)).unwrap();
        assert_eq!(identity.nickname, "alice");
        assert_eq!(expires, UNIX_EPOCH + Duration::from_secs(now + 600));

        let wrong_key = sign(
            b"not-the-secret",
            signed::Claims::new("alice", now + 600, "idp"),
        );
        assert!(verifier.verify(&wrong_key).is_err());
        let expired = sign(
            b"provider-secret",
            signed::Claims::new("alice", now - 600, "idp"),
        );
        assert!(verifier.verify(&expired).unwrap_err().contains("Expired"));
        let other_issuer = sign(
            b"provider-secret",
            signed::Claims::new("alice", now + 600, "evil"),
        );
        assert!(verifier.verify(&other_issuer).is_err());
        let bad_subject = sign(
            b"provider-secret",
            signed::Claims::new("no spaces", now + 600, "idp"),
        );
        assert!(
            verifier
                .verify(&bad_subject)
                .unwrap_err()
                .contains("nickname")
        );
    }

    #[test]
    fn rs256_tokens_are_checked_against_the_providers_rsa_key() {
        use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
        use rsa::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let rsa_key = |bits| rsa::RsaPrivateKey::new(&mut rand_core::OsRng, bits).unwrap();
        let provider = rsa_key(2048);
        let public_pem = provider
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        let verifier = JwtVerifier::public_key(public_pem.as_bytes()).unwrap();
        let sign = |key: &rsa::RsaPrivateKey, claims: signed::Claims| {
            let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap();
            encode(
                &Header::new(Algorithm::RS256),
                &claims,
                &EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
            )
            .unwrap()
        };

        let good = sign(&provider, signed::Claims::new("alice", now + 600, "idp"));
        assert_eq!(verifier.verify(&good).unwrap().0.nickname, "alice");
        let expired = sign(&provider, signed::Claims::new("alice", now - 600, "idp"));
        assert!(verifier.verify(&expired).unwrap_err().contains("Expired"));
        let other_key = sign(
            &rsa_key(2048),
            signed::Claims::new("alice", now + 600, "idp"),
        );
        assert!(verifier.verify(&other_key).is_err());
        // The classic confusion: an HS256 token whose "secret" is the public key itself.
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &signed::Claims::new("alice", now + 600, "idp"),
            &EncodingKey::from_secret(public_pem.as_bytes()),
        )
        .unwrap();
        assert!(verifier.verify(&confused).is_err());
        // Neither RSA nor P-256: refused when the server starts.
        assert!(JwtVerifier::public_key(b"not a key").is_err());
    }

    /// The claims a provider signs, for the tests.
    mod signed {
        #[derive(serde::Serialize)]
        pub struct Claims {
            sub: String,
            exp: u64,
            iss: String,
        }

        impl Claims {
            pub fn new(sub: &str, exp: u64, iss: &str) -> Self {
                Self {
                    sub: sub.into(),
                    exp,
                    iss: iss.into(),
                }
            }
        }
    }

    #[test]
    fn a_live_claim_keeps_others_out_but_lets_its_session_back() {
        let nicknames = Arc::new(Nicknames::new(Duration::from_secs(60)));
        let first = nicknames.claim("alice", None).unwrap();
        assert!(matches!(
            nicknames.claim("Alice", None),
            Err(ChatError::NicknameTaken(_))
        ));
        let again = nicknames.claim("alice", Some(&first)).unwrap();
        assert_eq!(again.session, first.session);
    }

    #[test]
    fn a_lapsed_claim_can_be_taken_and_the_old_token_is_refused() {
        let nicknames = Arc::new(Nicknames::new(Duration::ZERO));
        let first = nicknames.claim("alice", None).unwrap();
        let stream = nicknames.open_stream(&first);
        assert!(
            nicknames.claim("alice", None).is_err(),
            "live while a stream is open"
        );
        drop(stream);
        let second = nicknames.claim("alice", None).unwrap();
        assert_ne!(second.session, first.session);
        let _held = nicknames.open_stream(&second);
        assert!(!nicknames.admit(&first));
        assert!(nicknames.admit(&second));
    }
}
