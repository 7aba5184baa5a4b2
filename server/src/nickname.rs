//! What a nickname is, and when two are the same.
//!
//! People's own names are nicknames: `zoë`, `José`, `李雷`. A nickname follows the PRECIS
//! nickname profile (RFC 8266, through `precis-profiles`): [`enforce`] gives the form that
//! is stored and shown (NFKC, spaces mapped), and [`key`] the comparison form (enforced,
//! then lower-cased and normalised again), so `Zoë` and `zoë` are one name wherever names
//! are compared: claims, room owners, invites and bans, kicks, rate buckets.
//!
//! On top of the profile, Confab asks for one word (commands name users by one word) of
//! at most [`MAX_NICKNAME_CHARS`] characters, starting with a letter or digit.
//!
//! [`skeleton`] is the look-alike form of Unicode TS #39 (`unicode-security`): `pаul`
//! with a Cyrillic `а` has the skeleton of `paul`. The nickname registry refuses a name
//! whose skeleton is that of a name someone else holds, so that no one can pass for
//! another user.

use precis_core::profile::{PrecisFastInvocation as _, Rules as _};
use precis_profiles::Nickname;

/// Longest nickname, in characters.
pub const MAX_NICKNAME_CHARS: usize = 32;

/// Why a string is not a nickname.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NicknameError {
    /// Nothing (or only spaces).
    #[error("a nickname is required")]
    Empty,
    /// Longer than [`MAX_NICKNAME_CHARS`].
    #[error("a nickname has at most {MAX_NICKNAME_CHARS} characters; this has {0}")]
    TooLong(usize),
    /// More than one word.
    #[error("a nickname is one word, without spaces")]
    Spaces,
    /// Starts with a symbol or punctuation.
    #[error("a nickname starts with a letter or digit")]
    BadStart,
    /// A character the PRECIS nickname profile does not allow (control, unassigned,
    /// invisible…).
    #[error("a nickname cannot hold that character ({0})")]
    Disallowed(String),
}

/// The nickname `name` stands for, as stored and shown; or why it cannot be one.
pub fn enforce(name: &str) -> Result<String, NicknameError> {
    // Cheap bounds first: PRECIS work on a 60,000-byte value is wasted.
    let chars = name.chars().count();
    if chars > MAX_NICKNAME_CHARS * 4 {
        return Err(NicknameError::TooLong(chars));
    }
    let enforced = Nickname::enforce(name).map_err(|error| match error {
        precis_core::Error::Invalid => NicknameError::Empty,
        other => NicknameError::Disallowed(other.to_string()),
    })?;
    let chars = enforced.chars().count();
    if chars > MAX_NICKNAME_CHARS {
        return Err(NicknameError::TooLong(chars));
    }
    if enforced.contains(' ') {
        return Err(NicknameError::Spaces);
    }
    if !enforced.chars().next().is_some_and(char::is_alphanumeric) {
        return Err(NicknameError::BadStart);
    }
    Ok(enforced.into_owned())
}

/// The form in which two nicknames are compared: equal keys, one name. For names that are
/// not nicknames (never stored, but a client may name one in a command), the lower-cased
/// name, which matches no nickname's key by accident of case alone.
pub fn key(nickname: &str) -> String {
    // Printable ASCII is its own PRECIS form (allowed, nothing to map or normalise), so its
    // key is its lower case: the common case, and one that every send and call pays for.
    if !nickname.is_empty() && nickname.bytes().all(|b| b.is_ascii_graphic()) {
        return nickname.to_ascii_lowercase();
    }
    precis_key(nickname)
}

/// [`key`] by the profile's rules, whatever the name.
fn precis_key(nickname: &str) -> String {
    let profile = Nickname::new();
    Nickname::enforce(nickname)
        .and_then(|enforced| profile.case_mapping_rule(enforced))
        .and_then(|lower| profile.normalization_rule(lower))
        .map_or_else(|_| nickname.to_lowercase(), |key| key.into_owned())
}

/// The look-alike form of a nickname's key: two names with one skeleton are easily taken
/// for each other.
pub fn skeleton(nickname: &str) -> String {
    unicode_security::skeleton(&key(nickname)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peoples_own_names_are_nicknames() {
        for name in [
            "zoë", "José", "李雷", "alice", "Bob", "a.b-c_d", "7", "Ωmega",
        ] {
            assert_eq!(enforce(name).as_deref(), Ok(name), "{name:?}");
        }
        // Enforcement normalises: a decomposed ë becomes the composed one.
        assert_eq!(enforce("zoe\u{308}").as_deref(), Ok("zoë"));
        assert_eq!(enforce("  zoë ").as_deref(), Ok("zoë"));
    }

    #[test]
    fn what_is_not_a_nickname_says_why() {
        assert_eq!(enforce(""), Err(NicknameError::Empty));
        assert_eq!(enforce("   "), Err(NicknameError::Empty));
        assert_eq!(enforce("a b"), Err(NicknameError::Spaces));
        assert_eq!(enforce(".a"), Err(NicknameError::BadStart));
        assert_eq!(enforce(&"n".repeat(33)), Err(NicknameError::TooLong(33)));
        assert_eq!(
            enforce(&"n".repeat(60_000)),
            Err(NicknameError::TooLong(60_000))
        );
        assert!(matches!(
            enforce("a\u{7}b"),
            Err(NicknameError::Disallowed(_))
        ));
        assert!(matches!(
            enforce("a\u{200b}b"),
            Err(NicknameError::Disallowed(_))
        ));
    }

    #[test]
    fn case_and_normal_form_do_not_make_another_name() {
        assert_eq!(key("Zoë"), key("zoë"));
        assert_eq!(key("ZOË"), key("zoe\u{308}"));
        assert_eq!(key("李雷"), "李雷");
        assert_ne!(key("zoe"), key("zoë"));
    }

    #[test]
    fn the_ascii_shortcut_gives_the_profiles_key() {
        let names = (0x21u8..=0x7e)
            .map(|b| char::from(b).to_string())
            .chain(["Alice", "a.b-c_D", "X:Y", "~tilde", "ALL-CAPS_9"].map(String::from));
        for name in names {
            assert_eq!(key(&name), precis_key(&name), "{name:?}");
        }
    }

    #[test]
    fn look_alikes_share_a_skeleton() {
        // A Cyrillic а in a Latin name.
        assert_eq!(skeleton("p\u{430}ul"), skeleton("paul"));
        assert_eq!(skeleton("PAUL"), skeleton("paul"));
        assert_ne!(skeleton("paula"), skeleton("paul"));
    }
}
