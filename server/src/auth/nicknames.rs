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
use crate::{error::ChatError, nickname};

/// Which login holds each nickname.
pub struct Nicknames {
    /// Claims by the nickname's comparison key ([`nickname::key`]), so `Zoë` and `zoë`
    /// are one name.
    claims: DashMap<String, Claim>,
    /// The nickname whose claim last took each look-alike skeleton ([`nickname::skeleton`]):
    /// a claim of another nickname with the same skeleton is refused while that one is
    /// live. Claims take the skeleton's entry before the claim's (always in that order),
    /// so two look-alikes claimed at once cannot both win.
    skeletons: DashMap<String, Holder>,
    /// How long a claim outlives its login's last stream or call.
    lease: Duration,
}

/// A nickname as the skeleton index knows it.
#[derive(Debug, Clone)]
struct Holder {
    /// Its comparison key (the claim's key).
    key: String,
    /// As its holder wrote it, for the refusal's message.
    nickname: String,
}

#[derive(Debug)]
struct Claim {
    /// The login holding the nickname.
    login: u64,
    /// How many of its streams are open; the claim is live while any is.
    streams: usize,
    /// When it last made a call or closed a stream.
    last_seen: Instant,
}

impl Claim {
    fn new(login: u64) -> Self {
        Self {
            login,
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
            skeletons: DashMap::new(),
            lease,
        }
    }

    /// Claims `nickname` (enforced already) for a new login, or for the login of
    /// `resume` if it held it. ALREADY_EXISTS while another live login holds it or a
    /// look-alike of it.
    pub fn claim(&self, nickname: &str, resume: Option<&Identity>) -> Result<Identity, ChatError> {
        let key = nickname::key(nickname);
        let resumed = resume
            .filter(|r| nickname::key(&r.nickname) == key)
            .map(|r| r.login);
        let skeleton = self.skeletons.entry(nickname::skeleton(nickname));
        if let Some(holder) = self.lookalike(&skeleton, &key) {
            return Err(ChatError::NicknameLookalike {
                nickname: nickname.to_owned(),
                held: holder.nickname,
            });
        }
        let login = match self.claims.entry(key.clone()) {
            Entry::Vacant(slot) => {
                let login = resumed.unwrap_or_else(new_login);
                slot.insert(Claim::new(login));
                login
            }
            Entry::Occupied(mut slot) => {
                let claim = slot.get_mut();
                if resumed == Some(claim.login) {
                    claim.last_seen = Instant::now();
                    claim.login
                } else if !claim.is_live(self.lease) {
                    let login = resumed.unwrap_or_else(new_login);
                    *claim = Claim::new(login);
                    login
                } else {
                    return Err(ChatError::NicknameTaken(nickname.to_owned()));
                }
            }
        };
        skeleton.insert(Holder {
            key,
            nickname: nickname.to_owned(),
        });
        Ok(Identity {
            nickname: nickname.to_owned(),
            login,
        })
    }

    /// Moves `from`'s login to `nickname` (enforced already): claimed as [`Nicknames::claim`]
    /// would (ALREADY_EXISTS while another login holds it or a look-alike), then the old
    /// nickname is released. The caller opens a [`StreamClaim`] for the new identity.
    pub fn rename(&self, from: &Identity, nickname: &str) -> Result<Identity, ChatError> {
        let to = self.claim(
            nickname,
            Some(&Identity {
                nickname: nickname.to_owned(),
                login: from.login,
            }),
        )?;
        let old = nickname::key(&from.nickname);
        if old != nickname::key(nickname) {
            self.claims
                .remove_if(&old, |_, claim| claim.login == from.login);
        }
        Ok(to)
    }

    /// The live holder of a look-alike of the nickname keyed `key`, if there is one.
    fn lookalike(&self, skeleton: &Entry<'_, String, Holder>, key: &str) -> Option<Holder> {
        let Entry::Occupied(holder) = skeleton else {
            return None;
        };
        let holder = holder.get();
        let live = holder.key != key
            && self
                .claims
                .get(&holder.key)
                .is_some_and(|claim| claim.is_live(self.lease));
        live.then(|| holder.clone())
    }

    /// Whether `identity` may speak for its nickname; touches its claim. A token whose
    /// claim lapsed takes the nickname back if no one else took it (or a look-alike of
    /// it) meanwhile.
    pub fn admit(&self, identity: &Identity) -> bool {
        let key = nickname::key(&identity.nickname);
        // The common case, on every call: the caller's own claim. It passed the look-alike
        // check when it was taken, so the skeleton index is not needed.
        if let Some(mut claim) = self.claims.get_mut(&key)
            && claim.login == identity.login
        {
            claim.last_seen = Instant::now();
            return true;
        }
        let skeleton = self.skeletons.entry(nickname::skeleton(&identity.nickname));
        if self.lookalike(&skeleton, &key).is_some() {
            return false;
        }
        let admitted = match self.claims.entry(key.clone()) {
            Entry::Vacant(slot) => {
                slot.insert(Claim::new(identity.login));
                true
            }
            Entry::Occupied(mut slot) => {
                let claim = slot.get_mut();
                if claim.login == identity.login {
                    claim.last_seen = Instant::now();
                    true
                } else if !claim.is_live(self.lease) {
                    *claim = Claim::new(identity.login);
                    true
                } else {
                    false
                }
            }
        };
        if admitted {
            skeleton.insert(Holder {
                key,
                nickname: identity.nickname.clone(),
            });
        }
        admitted
    }

    /// Marks a stream of `identity` open until the guard is dropped.
    pub fn open_stream(self: &Arc<Self>, identity: &Identity) -> StreamClaim {
        let key = nickname::key(&identity.nickname);
        if let Some(mut claim) = self.claims.get_mut(&key)
            && claim.login == identity.login
        {
            claim.streams += 1;
        }
        StreamClaim {
            nicknames: self.clone(),
            key,
            login: identity.login,
        }
    }

    /// How long a claim outlives its login's last stream or call.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Lets `identity`'s claim go at once (the cluster refused it).
    pub fn release(&self, identity: &Identity) {
        self.claims
            .remove_if(&nickname::key(&identity.nickname), |_, claim| {
                claim.login == identity.login
            });
    }

    /// The live claims, by comparison key and login: what this node keeps held over the
    /// cluster.
    pub fn live_claims(&self) -> Vec<(String, u64)> {
        self.claims
            .iter()
            .filter(|claim| claim.is_live(self.lease))
            .map(|claim| (claim.key().clone(), claim.login))
            .collect()
    }

    /// Forgets claims that are no longer live, and the skeletons of forgotten claims, so
    /// the registry does not grow forever.
    pub fn prune(&self) {
        self.claims.retain(|_, claim| claim.is_live(self.lease));
        self.skeletons
            .retain(|_, holder| self.claims.contains_key(&holder.key));
    }
}

fn new_login() -> u64 {
    rand::rng().random()
}

/// An open stream that keeps its nickname's claim live.
pub struct StreamClaim {
    nicknames: Arc<Nicknames>,
    key: String,
    login: u64,
}

impl Drop for StreamClaim {
    fn drop(&mut self) {
        if let Some(mut claim) = self.nicknames.claims.get_mut(&self.key)
            && claim.login == self.login
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
    fn a_live_claim_keeps_others_out_but_lets_its_login_back() {
        let nicknames = Arc::new(Nicknames::new(Duration::from_secs(60)));
        let first = nicknames.claim("alice", None).unwrap();
        assert!(matches!(
            nicknames.claim("Alice", None),
            Err(ChatError::NicknameTaken(_))
        ));
        let again = nicknames.claim("alice", Some(&first)).unwrap();
        assert_eq!(again.login, first.login);
    }

    #[test]
    fn case_and_look_alikes_of_a_held_nickname_are_refused_until_it_lapses() {
        let nicknames = Arc::new(Nicknames::new(Duration::ZERO));
        let zoe = nicknames.claim("zoë", None).unwrap();
        let stream = nicknames.open_stream(&zoe);
        assert!(matches!(
            nicknames.claim("Zoë", None),
            Err(ChatError::NicknameTaken(_))
        ));
        let paul = nicknames.claim("paul", None).unwrap();
        let _paul_stream = nicknames.open_stream(&paul);
        // A Cyrillic а.
        assert!(matches!(
            nicknames.claim("p\u{430}ul", None),
            Err(ChatError::NicknameLookalike { held, .. }) if held == "paul"
        ));
        assert!(nicknames.claim("李雷", None).is_ok());
        drop(stream);
        assert!(nicknames.claim("Zoë", None).is_ok(), "lapsed: free again");
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
        assert_ne!(second.login, first.login);
        let _held = nicknames.open_stream(&second);
        assert!(!nicknames.admit(&first));
        assert!(nicknames.admit(&second));
    }
}
