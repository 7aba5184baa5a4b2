//! Session tokens: issued by `Login`, checked on every call, signed with a key that
//! outlives restarts.

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use rand::Rng as _;
use sha2::Sha256;

use super::Identity;

type HmacSha256 = Hmac<Sha256>;

/// Why a session token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of this format at all.
    #[error("the token is malformed")]
    Malformed,
    /// Well-formed, but not signed with this server's key.
    #[error("the token was not issued by this server")]
    Foreign,
    /// Genuine, and too old.
    #[error("the token has expired; log in again")]
    Expired,
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
            identity.nickname, identity.login
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
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        const MALFORMED: TokenError = TokenError::Malformed;
        let (payload, tag) = token.split_once('.').ok_or(MALFORMED)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| MALFORMED)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| MALFORMED)?;
        let mut mac = self.key.clone();
        mac.update(&payload);
        mac.verify_slice(&tag).map_err(|_| TokenError::Foreign)?;
        let payload = String::from_utf8(payload).map_err(|_| MALFORMED)?;
        // `v1:<nickname>:<login>:<expiry>`, read from the right: a nickname may hold `:`.
        let rest = payload.strip_prefix("v1:").ok_or(MALFORMED)?;
        let mut fields = rest.rsplitn(3, ':');
        let (Some(expires), Some(login), Some(nickname)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(MALFORMED);
        };
        let login = u64::from_str_radix(login, 16).map_err(|_| MALFORMED)?;
        let expires: u64 = expires.parse().map_err(|_| MALFORMED)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if now >= expires {
            return Err(TokenError::Expired);
        }
        Ok(Identity {
            nickname: nickname.to_owned(),
            login,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Identity {
        Identity {
            nickname: "alice".into(),
            login: 42,
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
        assert_eq!(
            tokens.verify(&format!("{forged_payload}.{tag}")),
            Err(TokenError::Foreign)
        );
        assert_eq!(tokens.verify("not-a-token"), Err(TokenError::Malformed));

        let other_server = Tokens::ephemeral(Duration::from_secs(60));
        assert_eq!(other_server.verify(&token), Err(TokenError::Foreign));

        let expired = Tokens::new(b"k", Duration::ZERO);
        let (token, _) = expired.issue(&alice());
        assert_eq!(expired.verify(&token), Err(TokenError::Expired));
    }

    #[test]
    fn nicknames_with_colons_and_any_script_round_trip() {
        let tokens = Tokens::new(b"k", Duration::from_secs(60));
        for nickname in ["a:b", "李雷", "zoë:"] {
            let identity = Identity {
                nickname: nickname.into(),
                login: 7,
            };
            let (token, _) = tokens.issue(&identity);
            assert_eq!(tokens.verify(&token), Ok(identity));
        }
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
}
