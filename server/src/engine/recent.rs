//! [`RecentSends`]: the local engine's memory of recent idempotency keys, and what it
//! forgot to the store.

use std::{
    collections::{HashMap, VecDeque},
    time::SystemTime,
};

use futures::future::Shared;
use tokio::sync::oneshot;

use crate::store::{SentKey, StoreError};

/// Idempotency keys remembered per room in memory; older ones are found in the store.
pub(crate) const RECENT_SENDS: usize = 4096;

/// The outcome of a commit, awaitable by the sender and by any retry of the same key.
pub(super) type Commit = Shared<oneshot::Receiver<Result<(), StoreError>>>;

/// Recent `(sender, client_msg_id)` → seq, oldest first, and what has been forgotten.
///
/// Every key of this process's sends is here until it is forgotten (oldest first, and only
/// once its message is committed); every other key is in the store. Of the keys in the
/// store that are still within the dedupe window (at start: all of them; later: the
/// forgotten ones) a fingerprint is kept, so that a new key, whose fingerprint is not
/// among them, needs no store read at all; a matching fingerprint (a retry, or rarely a
/// collision) is looked up. `forgotten_through` makes that lookup exact (see
/// `LocalEngine::place`): every key with a higher seq is here.
#[derive(Debug)]
pub(super) struct RecentSends {
    by_key: HashMap<(String, String), (u64, SystemTime, Commit)>,
    order: VecDeque<(String, String)>,
    /// Every key with a seq above this is in `by_key` (or was never sent).
    pub(super) forgotten_through: u64,
    /// Fingerprints of the stored keys within the window, oldest first, with when their
    /// message was sent (to let them go as the window moves on).
    fingerprints: VecDeque<(SystemTime, u64)>,
    /// How many of `fingerprints` have each value.
    counts: HashMap<u64, u32>,
    /// Keyed per room, so that no one can aim collisions at it.
    hasher: std::hash::RandomState,
}

impl RecentSends {
    /// Nothing recent; the store holds the room's messages up to `stored_through`, those
    /// sent within the window with `stored` keys (in any order).
    pub(super) fn new(stored_through: u64, mut stored: Vec<SentKey>) -> Self {
        let mut recent = Self {
            by_key: HashMap::new(),
            order: VecDeque::new(),
            forgotten_through: stored_through,
            fingerprints: VecDeque::new(),
            counts: HashMap::new(),
            hasher: std::hash::RandomState::new(),
        };
        stored.sort_by_key(|key| key.sent_at);
        for key in stored {
            let fingerprint = recent.fingerprint(&key.sender, &key.client_msg_id);
            recent.remember(key.sent_at, fingerprint);
        }
        recent
    }

    fn fingerprint(&self, sender: &str, client_msg_id: &str) -> u64 {
        use std::hash::BuildHasher as _;
        self.hasher.hash_one((sender, client_msg_id))
    }

    fn remember(&mut self, sent: SystemTime, fingerprint: u64) {
        self.fingerprints.push_back((sent, fingerprint));
        *self.counts.entry(fingerprint).or_insert(0) += 1;
    }

    pub(super) fn get(&self, key: &(String, String), since: SystemTime) -> Option<(u64, Commit)> {
        let (seq, sent, commit) = self.by_key.get(key)?;
        (*sent >= since).then(|| (*seq, commit.clone()))
    }

    /// Whether `key`, not here, may be in the store as a send after `since`; lets go of
    /// the fingerprints older than that.
    pub(super) fn may_be_stored(&mut self, key: &(String, String), since: SystemTime) -> bool {
        while let Some((sent, fingerprint)) = self.fingerprints.front().copied()
            && sent < since
        {
            self.fingerprints.pop_front();
            if let std::collections::hash_map::Entry::Occupied(mut count) =
                self.counts.entry(fingerprint)
            {
                *count.get_mut() -= 1;
                if *count.get() == 0 {
                    count.remove();
                }
            }
        }
        // Most rooms have nothing stored within the window: no hash to compute.
        if self.counts.is_empty() {
            return false;
        }
        let fingerprint = self.fingerprint(&key.0, &key.1);
        self.counts.contains_key(&fingerprint)
    }

    pub(super) fn insert(
        &mut self,
        key: (String, String),
        seq: u64,
        commit: Commit,
        committed: u64,
    ) {
        self.order.push_back(key.clone());
        self.by_key.insert(key, (seq, SystemTime::now(), commit));
        // Forget the oldest keys once their message is committed (the store finds them
        // from then on); one still in flight is kept, however many there are.
        while self.order.len() > RECENT_SENDS {
            let oldest = &self.order[0];
            if self
                .by_key
                .get(oldest)
                .is_some_and(|(seq, ..)| *seq > committed)
            {
                break;
            }
            if let Some(oldest) = self.order.pop_front()
                && let Some((seq, sent, _)) = self.by_key.remove(&oldest)
            {
                self.forgotten_through = self.forgotten_through.max(seq);
                let fingerprint = self.fingerprint(&oldest.0, &oldest.1);
                self.remember(sent, fingerprint);
            }
        }
    }
}
