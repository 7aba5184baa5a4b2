//! Nickname claims: which login session holds each nickname, keyed by the nickname's
//! comparison form (so `Zoë` and `zoë` are one name), with look-alikes of a held nickname
//! refused too.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use dashmap::{DashMap, mapref::entry::Entry};
use rand::Rng as _;

use super::Identity;
use crate::error::ChatError;

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
#[cfg(test)]
mod tests {
    use super::*;

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
