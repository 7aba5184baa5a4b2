//! The hub's hot path: append + fan-out, in process, with no network.
//!
//! One room on the in-memory store; `readers` cursors (as sessions hold them) each pull
//! every message on tasks of their own while one publisher appends 1,000 messages with
//! 100 bytes of text. The clock runs from the first append to the last reader's last
//! message, so a figure is the cost of one append plus its delivery to every reader;
//! throughput is counted in deliveries (messages × readers; messages alone with no reader).
//!
//! `send_path`: a room's send path on the SQLite store, as the server runs it: 16 senders
//! on their own tasks each send 64 messages (1,024 in all) to one room and wait for every
//! ack. `fresh`: a new room, whose keys are all in memory. `after_restart`: a room whose
//! newest stored message is a second old, as after a restart, so every new key is also
//! looked up in the store (the idempotency guarantee across restarts).
//!
//! Run: `cargo bench -p confab-server --bench hub`.

use std::{sync::Arc, time::Duration};

use confab::MessageKind;
use confab_server::{
    cursor::Delivery,
    engine::LocalEngine,
    hub::{Hub, HubConfig, RoomEvent},
    limits::{LimitConfig, Limits},
    metrics::Metrics,
    store::{MemoryStore, SqliteStore, Store},
    validate::Outgoing,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const MESSAGES: u64 = 1_000;

fn hub() -> Hub {
    hub_on(Arc::new(MemoryStore::new()))
}

fn hub_on(store: Arc<dyn Store>) -> Hub {
    let metrics = Arc::new(Metrics::new());
    let limits = Limits::new(LimitConfig::unlimited(), metrics.clone()).unwrap();
    let engine = LocalEngine::open(store, Duration::from_secs(600), metrics.clone()).unwrap();
    Hub::new(
        Arc::new(engine),
        HubConfig {
            ring_capacity: 1024,
            history_on_join: 0,
        },
        Arc::new(limits),
        metrics,
    )
}

/// One round: `readers` cursors receive `MESSAGES` appends; returns the time it took.
async fn round(readers: u64) -> Duration {
    let hub = hub();
    let room = hub.open_room("bench", "publisher").await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..readers {
        let mut cursor = room.tail(None, "").await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut seen = 0;
            while seen < MESSAGES {
                match cursor.next().await.unwrap() {
                    Some(Delivery::Event(RoomEvent::Message(_))) => seen += 1,
                    Some(_) => {}
                    None => panic!("the room closed"),
                }
            }
        }));
    }
    let text = "x".repeat(100);
    let start = tokio::time::Instant::now();
    for n in 0..MESSAGES {
        let message = Outgoing {
            room: "bench".into(),
            text: text.clone(),
            client_msg_id: n.to_string(),
            kind: MessageKind::Text,
        };
        hub.publish_one("room", "publisher", message).await.unwrap();
    }
    for task in tasks {
        task.await.unwrap();
    }
    start.elapsed()
}

/// Two workers, as the server runs on the 2-core machines the figures come from.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// 3 s of warm-up, 10 s of measurement, 20 samples: every group here is timed alike.
fn settle(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group.measurement_time(Duration::from_secs(10));
    group.warm_up_time(Duration::from_secs(3));
    group.sample_size(20);
}

fn bench(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("hub_append_fanout");
    settle(&mut group);
    for readers in [0, 1, 100, 1_000] {
        group.throughput(Throughput::Elements(MESSAGES * readers.max(1)));
        group.bench_with_input(
            BenchmarkId::from_parameter(readers),
            &readers,
            |b, &readers| {
                b.iter_custom(|iterations| {
                    runtime.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iterations {
                            total += round(readers).await;
                        }
                        total
                    })
                })
            },
        );
    }
    group.finish();
}

/// Senders on their own tasks, and messages each, in a `send_path` round.
const SENDERS: u64 = 16;
const PER_SENDER: u64 = 64;

/// One `send_path` round on `hub`'s room `room`: every sender's messages, each acked.
async fn sends(hub: &Arc<Hub>, room: &str, round: u64) -> Duration {
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for sender in 0..SENDERS {
        let (hub, room) = (hub.clone(), room.to_owned());
        tasks.push(tokio::spawn(async move {
            let name = format!("sender{sender}");
            for n in 0..PER_SENDER {
                let message = Outgoing {
                    room: room.clone(),
                    text: "x".repeat(100),
                    client_msg_id: format!("{round}-{n}"),
                    kind: MessageKind::Text,
                };
                hub.publish_one("room", &name, message).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    start.elapsed()
}

fn send_path(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("send_path");
    settle(&mut group);
    group.throughput(Throughput::Elements(SENDERS * PER_SENDER));
    for case in ["fresh", "after_restart"] {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let hub = runtime.block_on(async {
            let hub = hub_on(store.clone());
            hub.open_room("bench", "publisher").await.unwrap();
            if case == "after_restart" {
                sends(&Arc::new(hub), "bench", u64::MAX).await;
                // The same store under a new hub: nothing recent in memory.
                hub_on(store)
            } else {
                hub
            }
        });
        let hub = Arc::new(hub);
        let mut round = 0;
        group.bench_function(case, |b| {
            b.iter_custom(|iterations| {
                runtime.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        round += 1;
                        total += sends(&hub, "bench", round).await;
                    }
                    total
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench, send_path);
criterion_main!(benches);
