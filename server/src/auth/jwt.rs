//! Tokens from an identity provider (JWTs): the provider vouches for the user.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Identity;

/// The claims Confab reads from an identity provider's token.
#[derive(Debug, serde::Deserialize)]
struct Claims {
    /// The user: becomes the nickname.
    sub: String,
    /// Expiry, seconds since the epoch (required).
    exp: u64,
}

/// Why an identity-provider token or key is refused.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// The signature, algorithm, expiry, issuer or audience is wrong.
    #[error("the token is not accepted: {0}")]
    Rejected(jsonwebtoken::errors::Error),
    /// The token's `sub` is not a nickname.
    #[error("the token's subject cannot be a nickname: {0}")]
    BadSubject(String),
    /// The configured key is not one the server can check tokens with.
    #[error("not an RSA or P-256 public key in PEM: {0}")]
    BadKey(jsonwebtoken::errors::Error),
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
    pub fn public_key(pem: &[u8]) -> Result<Self, JwtError> {
        use jsonwebtoken::{Algorithm, DecodingKey};
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Self::with(key, Algorithm::RS256));
        }
        DecodingKey::from_ec_pem(pem)
            .map(|key| Self::with(key, Algorithm::ES256))
            .map_err(JwtError::BadKey)
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
    pub fn verify(&self, token: &str) -> Result<(Identity, SystemTime), JwtError> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(JwtError::Rejected)?
            .claims;
        let nickname = crate::validate::nickname("sub", &claims.sub)
            .map_err(|v| JwtError::BadSubject(v.description))?;
        let identity = Identity { nickname, login: 0 };
        Ok((identity, UNIX_EPOCH + Duration::from_secs(claims.exp)))
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::errors::ErrorKind;

    use super::*;

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
        assert!(matches!(
            verifier.verify(&wrong_key),
            Err(JwtError::Rejected(e)) if *e.kind() == ErrorKind::InvalidSignature
        ));
        let expired = sign(
            b"provider-secret",
            signed::Claims::new("alice", now - 600, "idp"),
        );
        assert!(matches!(
            verifier.verify(&expired),
            Err(JwtError::Rejected(e)) if *e.kind() == ErrorKind::ExpiredSignature
        ));
        let other_issuer = sign(
            b"provider-secret",
            signed::Claims::new("alice", now + 600, "evil"),
        );
        assert!(matches!(
            verifier.verify(&other_issuer),
            Err(JwtError::Rejected(e)) if *e.kind() == ErrorKind::InvalidIssuer
        ));
        let bad_subject = sign(
            b"provider-secret",
            signed::Claims::new("no spaces", now + 600, "idp"),
        );
        assert!(matches!(
            verifier.verify(&bad_subject),
            Err(JwtError::BadSubject(_))
        ));
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
        assert!(matches!(
            verifier.verify(&expired),
            Err(JwtError::Rejected(e)) if *e.kind() == ErrorKind::ExpiredSignature
        ));
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
        assert!(matches!(
            JwtVerifier::public_key(b"not a key"),
            Err(JwtError::BadKey(_))
        ));
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
}
