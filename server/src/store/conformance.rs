//! The contract of [`Store`], as tests every engine runs: the same suite for the memory
//! engine and SQLite today, and for any engine that comes next (add a line to
//! `conformance!` below). What an engine must do is what the hub relies on: writes in
//! order with their callbacks in order, reads of committed data only, pages in seq order,
//! idempotency keys within a window, room state that is kept, retention that removes a
//! prefix and never the head.

use std::time::{Duration, SystemTime};

use confab::{ChatMessage, ChatMessageRecord};

use super::{Access, Committed, Retention, RoomRecord, Store, StoreError};

/// Makes a fresh, empty engine; the second value keeps whatever it lives in (a temporary
/// directory) alive as long as the engine.
pub type Open = fn() -> (Box<dyn Store>, Box<dyn std::any::Any>);

fn room(name: &str) -> RoomRecord {
    RoomRecord {
        name: name.into(),
        topic: String::new(),
        created_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        created_by: "owner".into(),
        private: false,
        access: Default::default(),
        head_seq: 0,
        epoch: "e1".into(),
    }
}

fn message(room: &str, seq: u64, sender: &str, id: &str, sent: SystemTime) -> ChatMessage {
    ChatMessage::new(ChatMessageRecord {
        room: room.into(),
        seq,
        sender: sender.into(),
        text: format!("message {seq}"),
        kind: 1,
        client_msg_id: id.into(),
        sent_at: Some(sent.into()),
    })
}

/// Runs one write and waits for its callback.
fn wait(write: impl FnOnce(Committed)) -> Result<(), StoreError> {
    let (tx, rx) = std::sync::mpsc::channel();
    write(Box::new(move |result| {
        let _ = tx.send(result);
    }));
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the write's callback ran")
}

/// A store with room `r` holding messages 1..=n, sent by `alice` as `id-<seq>` now.
fn filled(open: Open, n: u64) -> (Box<dyn Store>, Box<dyn std::any::Any>) {
    let (store, guard) = open();
    wait(|done| store.create_room(room("r"), done)).unwrap();
    for seq in 1..=n {
        let m = message("r", seq, "alice", &format!("id-{seq}"), SystemTime::now());
        wait(|done| store.append(m, done).commit()).unwrap();
    }
    (store, guard)
}

fn seqs(messages: &[ChatMessage]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

pub fn rooms_are_listed_as_created(open: Open) {
    let (store, _guard) = open();
    assert!(store.rooms().unwrap().is_empty());
    let mut private = room("p");
    private.private = true;
    wait(|done| store.create_room(room("a"), done)).unwrap();
    wait(|done| store.create_room(private.clone(), done)).unwrap();
    let mut rooms = store.rooms().unwrap();
    rooms.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(rooms, vec![room("a"), private]);
}

pub fn callbacks_run_in_write_order(open: Open) {
    let (store, _guard) = open();
    wait(|done| store.create_room(room("r"), done)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for seq in 1..=200 {
        let tx = tx.clone();
        let m = message("r", seq, "alice", &format!("id-{seq}"), SystemTime::now());
        let lead = store.append(
            m,
            Box::new(move |result| {
                result.unwrap();
                tx.send(seq).unwrap();
            }),
        );
        // Some leads are committed here and some handed to the store's own committer:
        // the order holds either way.
        if seq % 3 == 0 {
            lead.commit();
        } else {
            drop(lead);
        }
    }
    drop(tx);
    let order: Vec<u64> = rx.iter().collect();
    assert_eq!(order, (1..=200).collect::<Vec<_>>());
}

pub fn reads_page_in_seq_order_both_ways(open: Open) {
    let (store, _guard) = filled(open, 10);
    assert_eq!(seqs(&store.read_after("r", 0, 4).unwrap()), [1, 2, 3, 4]);
    assert_eq!(seqs(&store.read_after("r", 8, 4).unwrap()), [9, 10]);
    assert!(store.read_after("r", 10, 4).unwrap().is_empty());
    assert_eq!(seqs(&store.read_before("r", 11, 3).unwrap()), [8, 9, 10]);
    assert_eq!(seqs(&store.read_before("r", 3, 5).unwrap()), [1, 2]);
    assert!(store.read_before("r", 1, 5).unwrap().is_empty());
    assert_eq!(store.first_seq("r").unwrap(), Some(1));
    let m = &store.read_after("r", 4, 1).unwrap()[0];
    assert_eq!(
        (m.sender.as_str(), m.client_msg_id.as_str(), m.text.as_str()),
        ("alice", "id-5", "message 5")
    );
}

pub fn an_unknown_room_reads_as_an_error_or_nothing(open: Open) {
    let (store, _guard) = open();
    // Either is fine for the hub, which never reads a room it does not have; what an
    // engine must not do is invent messages.
    if let Ok(messages) = store.read_after("nowhere", 0, 10) {
        assert!(messages.is_empty());
    }
    if let Ok(first) = store.first_seq("nowhere") {
        assert_eq!(first, None);
    }
}

pub fn idempotency_keys_are_found_within_the_window(open: Open) {
    let (store, _guard) = open();
    wait(|done| store.create_room(room("r"), done)).unwrap();
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let old = message("r", 1, "alice", "old", hour_ago);
    wait(|done| store.append(old, done).commit()).unwrap();
    let new = message("r", 2, "alice", "new", SystemTime::now());
    wait(|done| store.append(new, done).commit()).unwrap();
    let window = SystemTime::now() - Duration::from_secs(600);
    assert_eq!(
        store.find_sent("r", "alice", "new", window).unwrap(),
        Some(2)
    );
    assert_eq!(store.find_sent("r", "alice", "old", window).unwrap(), None);
    assert_eq!(
        store
            .find_sent("r", "alice", "old", hour_ago - Duration::from_secs(1))
            .unwrap(),
        Some(1)
    );
    // Keys are per sender and per room.
    assert_eq!(store.find_sent("r", "bob", "new", window).unwrap(), None);
    wait(|done| store.create_room(room("s"), done)).unwrap();
    assert_eq!(store.find_sent("s", "alice", "new", window).unwrap(), None);
}

pub fn the_keys_sent_within_a_window_are_listed_newest_first(open: Open) {
    let (store, _guard) = open();
    wait(|done| store.create_room(room("r"), done)).unwrap();
    let now = SystemTime::now();
    let hour_ago = now - Duration::from_secs(3600);
    for (seq, sent, id) in [(1, hour_ago, "old"), (2, now, "a"), (3, now, "b")] {
        let m = message("r", seq, "alice", id, sent);
        wait(|done| store.append(m, done).commit()).unwrap();
    }
    let keys = store
        .sent_since("r", now - Duration::from_secs(600))
        .unwrap();
    let ids: Vec<&str> = keys.iter().map(|k| k.client_msg_id.as_str()).collect();
    assert_eq!(ids, ["b", "a"]);
    assert!(keys.iter().all(|k| k.sender == "alice"));
    let all = store.sent_since("r", SystemTime::UNIX_EPOCH).unwrap();
    assert_eq!(all.len(), 3);
}

pub fn topic_and_access_are_kept(open: Open) {
    let (store, _guard) = open();
    wait(|done| store.create_room(room("r"), done)).unwrap();
    wait(|done| store.set_topic("r", "rust", done)).unwrap();
    wait(|done| store.set_access("r", "bob", Some(Access::Banned), done)).unwrap();
    wait(|done| store.set_access("r", "carol", Some(Access::Invited), done)).unwrap();
    wait(|done| store.set_access("r", "carol", None, done)).unwrap();
    let record = store.rooms().unwrap().pop().unwrap();
    assert_eq!(record.topic, "rust");
    assert_eq!(
        record.access.into_iter().collect::<Vec<_>>(),
        [("bob".to_string(), Access::Banned)]
    );
}

pub fn the_head_seq_follows_appends(open: Open) {
    let (store, _guard) = filled(open, 7);
    assert_eq!(store.rooms().unwrap()[0].head_seq, 7);
}

pub fn retention_removes_a_prefix_and_keeps_the_head(open: Open) {
    let (store, _guard) = filled(open, 10);
    let keep_three = Retention {
        max_messages: Some(3),
        max_age: None,
    };
    wait(|done| store.apply_retention(keep_three, done)).unwrap();
    assert_eq!(seqs(&store.read_after("r", 0, 100).unwrap()), [8, 9, 10]);
    assert_eq!(store.first_seq("r").unwrap(), Some(8));
    // Removed keys are no longer found; kept ones are.
    let window = SystemTime::now() - Duration::from_secs(600);
    assert_eq!(store.find_sent("r", "alice", "id-2", window).unwrap(), None);
    assert_eq!(
        store.find_sent("r", "alice", "id-9", window).unwrap(),
        Some(9)
    );
    // Everything gone by age: the head stays, so numbering goes on from it.
    let by_age = Retention {
        max_messages: None,
        max_age: Some(Duration::ZERO),
    };
    std::thread::sleep(Duration::from_millis(5));
    wait(|done| store.apply_retention(by_age, done)).unwrap();
    assert!(store.read_after("r", 0, 100).unwrap().is_empty());
    assert_eq!(store.first_seq("r").unwrap(), None);
    assert_eq!(store.rooms().unwrap()[0].head_seq, 10);
    let next = message("r", 11, "alice", "id-11", SystemTime::now());
    wait(|done| store.append(next, done).commit()).unwrap();
    assert_eq!(seqs(&store.read_after("r", 0, 100).unwrap()), [11]);
}

/// Every test of the contract, for one engine.
macro_rules! conformance {
    ($engine:ident, $open:expr) => {
        mod $engine {

            #[test]
            fn rooms_are_listed_as_created() {
                super::rooms_are_listed_as_created($open);
            }
            #[test]
            fn callbacks_run_in_write_order() {
                super::callbacks_run_in_write_order($open);
            }
            #[test]
            fn reads_page_in_seq_order_both_ways() {
                super::reads_page_in_seq_order_both_ways($open);
            }
            #[test]
            fn an_unknown_room_reads_as_an_error_or_nothing() {
                super::an_unknown_room_reads_as_an_error_or_nothing($open);
            }
            #[test]
            fn idempotency_keys_are_found_within_the_window() {
                super::idempotency_keys_are_found_within_the_window($open);
            }
            #[test]
            fn the_keys_sent_within_a_window_are_listed_newest_first() {
                super::the_keys_sent_within_a_window_are_listed_newest_first($open);
            }
            #[test]
            fn topic_and_access_are_kept() {
                super::topic_and_access_are_kept($open);
            }
            #[test]
            fn the_head_seq_follows_appends() {
                super::the_head_seq_follows_appends($open);
            }
            #[test]
            fn retention_removes_a_prefix_and_keeps_the_head() {
                super::retention_removes_a_prefix_and_keeps_the_head($open);
            }
        }
    };
}

conformance!(memory, || (
    Box::new(crate::store::MemoryStore::new()),
    Box::new(())
));

conformance!(sqlite, || {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = crate::store::SqliteStore::open(dir.path()).expect("open the store");
    (Box::new(store), Box::new(dir))
});
