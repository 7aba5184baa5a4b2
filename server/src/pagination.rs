//! Page sizes and page tokens for `ListRooms`, `ListMembers` and `GetHistory`.
//!
//! A page token is opaque to clients: base64 of `kind|scope|position`, where `kind` says
//! which call issued it and `scope` what it pages over (a room), so a token cannot be
//! replayed against another call or room. Positions are names or seqs, never offsets, so
//! pages stay correct while rooms and logs change underneath.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::error::Violation;

/// Page size when the request asks for 0.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page; bigger requests are reduced to it.
pub const MAX_PAGE_SIZE: usize = 1000;

/// The page size a request asks for: 0 → default, above the maximum → the maximum.
pub fn page_size(requested: i32) -> Result<usize, Violation> {
    match requested {
        n if n < 0 => Err(Violation::new("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok(usize::try_from(n)
            .unwrap_or(MAX_PAGE_SIZE)
            .min(MAX_PAGE_SIZE)),
    }
}

/// A token continuing after `position` in `kind`/`scope`.
pub fn encode(kind: &str, scope: &str, position: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{kind}|{scope}|{position}"))
}

/// The position in a token from [`encode`] with the same `kind` and `scope`; `None` for
/// an empty token (the first page).
pub fn decode(token: &str, kind: &str, scope: &str) -> Result<Option<String>, Violation> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || {
        Violation::new(
            "page_token",
            "not a page token from this call; pass next_page_token back unchanged",
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let mut parts = text.splitn(3, '|');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(k), Some(s), Some(position)) if k == kind && s == scope => {
            Ok(Some(position.to_owned()))
        }
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_only_in_their_own_scope() {
        let token = encode("members", "lobby", "bob");
        assert_eq!(
            decode(&token, "members", "lobby").unwrap(),
            Some("bob".into())
        );
        assert!(decode(&token, "members", "other").is_err());
        assert!(decode(&token, "rooms", "").is_err());
        assert!(decode("%%%", "rooms", "").is_err());
        assert_eq!(decode("", "rooms", "").unwrap(), None);
    }

    #[test]
    fn page_sizes_default_and_clamp() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(7).unwrap(), 7);
        assert_eq!(page_size(1_000_000).unwrap(), MAX_PAGE_SIZE);
        assert_eq!(page_size(-1).unwrap_err().field, "page_size");
    }
}
