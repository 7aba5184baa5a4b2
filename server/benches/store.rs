//! The store's sustained write rate.
//!
//! `group_commit`: many writers at once, as under load: every append is queued without
//! waiting, and the clock stops when the last one is committed, so the writer thread
//! commits them in groups. `one_by_one`: a single writer that waits for each commit before
//! the next append: the latency-bound worst case, for comparison.
//!
//! Messages carry 100 bytes of text. The database lives in a temporary directory and grows
//! across iterations (new rooms), as a long-running server's does.
//!
//! Run: `cargo bench -p confab-server --bench store`.

use std::{
    sync::mpsc,
    time::{Duration, Instant, SystemTime},
};

use confab::{ChatMessage, ChatMessageRecord};
use confab_server::store::{RoomRecord, SqliteStore, Store, StoreError};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const BATCH: u64 = 10_000;

fn room(name: String) -> RoomRecord {
    RoomRecord {
        name,
        topic: String::new(),
        created_at: SystemTime::now(),
        created_by: "bench".into(),
        head_seq: 0,
        private: false,
        access: Default::default(),
        epoch: "bench".into(),
    }
}

fn message(room: &str, seq: u64) -> ChatMessage {
    ChatMessage::new(ChatMessageRecord {
        room: room.to_owned(),
        seq,
        sender: format!("user{}", seq % 50),
        text: "x".repeat(100),
        kind: 1,
        client_msg_id: format!("{seq:032x}"),
        sent_at: Some(SystemTime::now().into()),
    })
}

fn wait(
    store: &SqliteStore,
    write: impl FnOnce(&SqliteStore, Box<dyn FnOnce(Result<(), StoreError>) + Send>),
) {
    let (tx, rx) = mpsc::channel();
    write(store, Box::new(move |result| tx.send(result).unwrap()));
    rx.recv().unwrap().unwrap();
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    let mut rooms = 0u64;
    let mut new_room = |store: &SqliteStore| {
        rooms += 1;
        let name = format!("room-{rooms}");
        wait(store, |s, done| s.create_room(room(name.clone()), done));
        name
    };

    let mut group = c.benchmark_group("store_append");
    group.throughput(Throughput::Elements(BATCH));
    group.measurement_time(Duration::from_secs(20));
    group.warm_up_time(Duration::from_secs(5));
    group.sample_size(20);

    group.bench_function("group_commit", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let name = new_room(&store);
                let messages: Vec<ChatMessage> =
                    (1..=BATCH).map(|seq| message(&name, seq)).collect();
                let (tx, rx) = mpsc::channel();
                let start = Instant::now();
                for message in messages {
                    let tx = tx.clone();
                    // The leads go to the writer thread, as they do under load: the
                    // thread commits what queues while it commits.
                    drop(store.append(message, Box::new(move |result| tx.send(result).unwrap())));
                }
                for _ in 0..BATCH {
                    rx.recv().unwrap().unwrap();
                }
                total += start.elapsed();
            }
            total
        })
    });

    group.throughput(Throughput::Elements(1_000));
    group.bench_function("one_by_one", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let name = new_room(&store);
                let start = Instant::now();
                for seq in 1..=1_000 {
                    // Each committed by its caller, as at light load.
                    wait(&store, |s, done| {
                        s.append(message(&name, seq), done).commit()
                    });
                }
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
