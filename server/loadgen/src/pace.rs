//! A publisher's clock, to the microsecond: a Linux `timerfd` in tokio's reactor.
//!
//! tokio's timers fire on a 1 ms grid (its driver sleeps in `epoll_wait`, whose timeout is
//! in milliseconds), so a message paced by them leaves up to a millisecond after its
//! intended time. At 10 or 100 msg/s every interval is a whole number of milliseconds, so
//! every message of a run is late by about the same amount: the grid's phase, a fraction
//! of a millisecond that changes from run to run. Latency is measured from the intended
//! time, so that offset moved a run's p50 by up to a millisecond, as much as the
//! difference between the servers being compared. A `timerfd` wakes the reactor when its
//! time comes (an hrtimer, without the timer slack of `nanosleep`), so a message now
//! leaves within the time it takes to wake a thread.

use std::{io, os::fd::OwnedFd};

use rustix::time::{
    Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create,
    timerfd_settime,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    time::Instant,
};

/// A one-shot timer that the publisher re-arms for each wake.
pub struct Pacer {
    timer: AsyncFd<OwnedFd>,
}

impl Pacer {
    pub fn new() -> io::Result<Self> {
        let timer = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // SAFETY: the descriptor is the `OwnedFd` the `AsyncFd` owns: open, and the same
        // one, until the `AsyncFd` drops it.
        let timer = unsafe { AsyncFd::register_with_interest(timer, Interest::READABLE) }?;
        Ok(Self { timer })
    }

    /// Waits until `deadline`; returns at once if it has passed.
    pub async fn until(&mut self, deadline: Instant) -> io::Result<()> {
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return Ok(());
        }
        let due = Itimerspec {
            // One-shot: no interval.
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: Timespec::try_from(wait).map_err(io::Error::other)?,
        };
        timerfd_settime(self.timer.get_ref(), TimerfdTimerFlags::empty(), &due)?;
        loop {
            let mut ready = self.timer.readable().await?;
            // The expiry count: 8 bytes, readable once the timer has fired. A readiness
            // left over from the last wake reads nothing (`WouldBlock`) and is cleared.
            let mut expirations = [0u8; 8];
            match ready.try_io(|timer| Ok(rustix::io::read(timer.get_ref(), &mut expirations)?)) {
                Ok(read) => return read.map(drop),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn it_wakes_at_each_deadline_and_never_before() {
        let mut pacer = Pacer::new().unwrap();
        // Deadlines off tokio's millisecond grid; each wake must come at or after its own.
        let start = Instant::now();
        for step in 1..=20u64 {
            let deadline = start + Duration::from_micros(step * 1_300);
            pacer.until(deadline).await.unwrap();
            assert!(Instant::now() >= deadline, "woke before deadline {step}");
        }
        // A deadline already passed returns at once, timer armed or not.
        pacer.until(start).await.unwrap();
    }
}
