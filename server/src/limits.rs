//! Flood control: what one client may ask of the server, so that no one can starve the rest.
//!
//! * **Send rate**, per user: a token bucket (GCRA, from `governor`) of `--send-rate`
//!   messages a second with bursts of `--send-burst`. A message over it is refused with
//!   RESOURCE_EXHAUSTED and a RetryInfo saying when the next one will be accepted. The
//!   limit is told to clients at login (`LoginResponse.limits`) so that a well-behaved
//!   client paces itself and is never refused: a refusal would land its retry after the
//!   messages that followed it, out of the user's order.
//! * **Room creation**, per user: `--room-creation-per-minute`; and at most `--max-rooms`
//!   rooms on the server.
//! * **Connections per IP address**: counted as they are accepted ([`Incoming`](crate::connection::Incoming)); one over
//!   the limit is closed at once, before any TLS or HTTP/2 work is done for it (see
//!   `connection.rs`).
//! * **Streams per user** and **rooms per stream** are counted where they are opened (the
//!   nickname registry and the chat session).
//!
//! Every refusal is counted in `confab_limited_total{limit=...}`.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use clap::Args;
use dashmap::DashMap;
use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock as _, DefaultClock},
};

use crate::{
    error::ChatError,
    metrics::{Limit, Metrics},
};

/// The limits, as flags.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct LimitConfig {
    /// Messages a user may send per second, on average (0: no limit).
    #[arg(long, env = "CONFAB_SEND_RATE", default_value_t = 10.0)]
    pub send_rate: f64,

    /// Messages a user may send at once above the average rate.
    #[arg(long, env = "CONFAB_SEND_BURST", default_value_t = 20)]
    pub send_burst: u32,

    /// Rooms a user may create per minute (0: no limit).
    #[arg(long, env = "CONFAB_ROOM_CREATION_PER_MINUTE", default_value_t = 10)]
    pub room_creation_per_minute: u32,

    /// Most rooms the server holds.
    #[arg(long, env = "CONFAB_MAX_ROOMS", default_value_t = 10_000)]
    pub max_rooms: usize,

    /// Most connections open at once from one IP address.
    #[arg(long, env = "CONFAB_MAX_CONNECTIONS_PER_IP", default_value_t = 64)]
    pub max_connections_per_ip: usize,

    /// Most `Chat` and `Subscribe` streams one user may have open at once.
    #[arg(long, env = "CONFAB_MAX_STREAMS_PER_USER", default_value_t = 8)]
    pub max_streams_per_user: usize,

    /// Most rooms one `Chat` stream (or `Subscribe` call) may be in at once.
    #[arg(long, env = "CONFAB_MAX_ROOMS_PER_STREAM", default_value_t = 64)]
    pub max_rooms_per_stream: usize,
}

impl LimitConfig {
    /// Limits no test or benchmark reaches (the send rate off, the counts very high).
    pub fn unlimited() -> Self {
        Self {
            send_rate: 0.0,
            send_burst: 1,
            room_creation_per_minute: 0,
            max_rooms: usize::MAX,
            max_connections_per_ip: usize::MAX,
            max_streams_per_user: usize::MAX,
            max_rooms_per_stream: 10_000,
        }
    }

    /// What clients are told at login.
    pub fn advertised(&self) -> confab::pb::ServerLimits {
        confab::pb::ServerLimits {
            send_rate_per_second: self.send_rate,
            send_burst: self.send_burst,
            max_rooms_per_stream: u32::try_from(self.max_rooms_per_stream).unwrap_or(u32::MAX),
        }
    }
}

/// A keyed token bucket, or none when the rate is 0.
fn keyed(quota: Option<Quota>) -> Option<DefaultKeyedRateLimiter<String>> {
    quota.map(RateLimiter::keyed)
}

/// The per-user rate limits.
pub struct Limits {
    config: LimitConfig,
    sends: Option<DefaultKeyedRateLimiter<String>>,
    creations: Option<DefaultKeyedRateLimiter<String>>,
    /// Open streams per user (lower-cased nickname).
    streams: Arc<DashMap<String, usize>>,
    metrics: Arc<Metrics>,
}

/// A limit setting that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// `--send-burst 0` would refuse every message.
    #[error("--send-burst must be at least 1")]
    ZeroBurst,
    /// A send rate so high that its period is below the clock's resolution.
    #[error("--send-rate is too high")]
    RateTooHigh,
    /// A negative, infinite or NaN send rate.
    #[error("--send-rate must be a positive number, or 0 for no limit")]
    BadRate,
}

impl Limits {
    /// Limits as `config` says, counting refusals in `metrics`.
    pub fn new(config: LimitConfig, metrics: Arc<Metrics>) -> Result<Self, LimitError> {
        let burst = NonZeroU32::new(config.send_burst).ok_or(LimitError::ZeroBurst)?;
        let sends = if config.send_rate > 0.0 && config.send_rate.is_finite() {
            Some(
                Quota::with_period(Duration::from_secs_f64(1.0 / config.send_rate))
                    .ok_or(LimitError::RateTooHigh)?
                    .allow_burst(burst),
            )
        } else if config.send_rate == 0.0 {
            None
        } else {
            return Err(LimitError::BadRate);
        };
        let creations = NonZeroU32::new(config.room_creation_per_minute).map(Quota::per_minute);
        Ok(Self {
            sends: keyed(sends),
            creations: keyed(creations),
            streams: Arc::new(DashMap::new()),
            config,
            metrics,
        })
    }

    /// The settings.
    pub fn config(&self) -> &LimitConfig {
        &self.config
    }

    /// Takes one send from `user`'s bucket, or says when one will be there.
    pub fn send(&self, user: &str) -> Result<(), ChatError> {
        check(
            self.sends.as_ref(),
            user,
            &self.metrics,
            Limit::SendRate,
            || {
                format!(
                    "you are sending faster than {} messages a second (bursts of {}); slow down",
                    self.config.send_rate, self.config.send_burst
                )
            },
        )
    }

    /// Takes one room creation from `user`'s allowance, or says when one will be there.
    pub fn create_room(&self, user: &str, rooms_now: usize) -> Result<(), ChatError> {
        if rooms_now >= self.config.max_rooms {
            self.metrics.limited(Limit::RoomCreation);
            return Err(ChatError::ResourceExhausted {
                description: format!(
                    "the server holds its most rooms ({}); join an existing one",
                    self.config.max_rooms
                ),
                retry_after: None,
            });
        }
        check(
            self.creations.as_ref(),
            user,
            &self.metrics,
            Limit::RoomCreation,
            || {
                format!(
                    "you may create {} rooms a minute",
                    self.config.room_creation_per_minute
                )
            },
        )
    }

    /// RESOURCE_EXHAUSTED when a stream already has its most rooms.
    pub fn join(&self, rooms_on_stream: usize) -> Result<(), ChatError> {
        if rooms_on_stream < self.config.max_rooms_per_stream {
            return Ok(());
        }
        self.metrics.limited(Limit::RoomsPerStream);
        Err(ChatError::ResourceExhausted {
            description: format!(
                "a stream may be in at most {} rooms; leave one first",
                self.config.max_rooms_per_stream
            ),
            retry_after: None,
        })
    }

    /// Counts a stream of `user` as open until the guard is dropped; RESOURCE_EXHAUSTED
    /// when the user has its most streams open already.
    pub fn open_stream(&self, user: &str) -> Result<StreamGuard, ChatError> {
        let key = crate::nickname::key(user);
        let mut open = self.streams.entry(key.clone()).or_insert(0);
        if *open >= self.config.max_streams_per_user {
            drop(open);
            self.metrics.limited(Limit::StreamsPerUser);
            return Err(ChatError::ResourceExhausted {
                description: format!(
                    "a user may have at most {} streams open; close one first",
                    self.config.max_streams_per_user
                ),
                retry_after: None,
            });
        }
        *open += 1;
        Ok(StreamGuard {
            streams: self.streams.clone(),
            key,
        })
    }

    /// Forgets buckets that are full again, so the maps hold only recent users.
    pub fn prune(&self) {
        for limiter in [&self.sends, &self.creations].into_iter().flatten() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

fn check(
    limiter: Option<&DefaultKeyedRateLimiter<String>>,
    user: &str,
    metrics: &Metrics,
    limit: Limit,
    description: impl FnOnce() -> String,
) -> Result<(), ChatError> {
    let Some(limiter) = limiter else {
        return Ok(());
    };
    match limiter.check_key(&crate::nickname::key(user)) {
        Ok(()) => Ok(()),
        Err(not_until) => {
            metrics.limited(limit);
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Err(ChatError::ResourceExhausted {
                description: description(),
                retry_after: Some(wait.max(Duration::from_millis(1))),
            })
        }
    }
}

/// An open stream, counted against its user's limit until dropped.
pub struct StreamGuard {
    streams: Arc<DashMap<String, usize>>,
    key: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.streams.remove_if_mut(&self.key, |_, open| {
            *open -= 1;
            *open == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(config: LimitConfig) -> (Limits, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        (Limits::new(config, metrics.clone()).unwrap(), metrics)
    }

    #[test]
    fn a_burst_passes_then_sends_wait_with_a_retry_delay() {
        let (limits, metrics) = limits(LimitConfig {
            send_rate: 1.0,
            send_burst: 3,
            ..LimitConfig::unlimited()
        });
        for _ in 0..3 {
            limits.send("alice").unwrap();
        }
        let Err(ChatError::ResourceExhausted { retry_after, .. }) = limits.send("Alice") else {
            panic!("the fourth send within the burst is refused, whatever the case");
        };
        let retry_after = retry_after.expect("a retry delay");
        assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1));
        limits
            .send("bob")
            .expect("another user has a bucket of its own");
        assert_eq!(metrics.limited_count(Limit::SendRate), 1);
    }

    #[test]
    fn zero_rate_means_no_limit_and_bad_rates_are_refused() {
        let (limits, _) = limits(LimitConfig::unlimited());
        for _ in 0..10_000 {
            limits.send("alice").unwrap();
        }
        for rate in [-1.0, f64::NAN, f64::INFINITY] {
            let config = LimitConfig {
                send_rate: rate,
                ..LimitConfig::unlimited()
            };
            assert!(Limits::new(config, Arc::new(Metrics::new())).is_err());
        }
    }

    #[test]
    fn streams_are_counted_per_user_until_closed() {
        let (limits, metrics) = limits(LimitConfig {
            max_streams_per_user: 2,
            ..LimitConfig::unlimited()
        });
        let first = limits.open_stream("alice").unwrap();
        let _second = limits.open_stream("Alice").unwrap();
        assert!(limits.open_stream("alice").is_err());
        let _bob = limits.open_stream("bob").unwrap();
        drop(first);
        let _third = limits.open_stream("alice").unwrap();
        assert_eq!(metrics.limited_count(Limit::StreamsPerUser), 1);
    }

    #[test]
    fn room_creation_is_limited_per_user_and_in_total() {
        let (limits, metrics) = limits(LimitConfig {
            room_creation_per_minute: 2,
            max_rooms: 5,
            ..LimitConfig::unlimited()
        });
        limits.create_room("alice", 0).unwrap();
        limits.create_room("alice", 1).unwrap();
        assert!(limits.create_room("alice", 2).is_err());
        limits.create_room("bob", 2).unwrap();
        assert!(limits.create_room("carol", 5).is_err());
        assert_eq!(metrics.limited_count(Limit::RoomCreation), 2);
    }
}
