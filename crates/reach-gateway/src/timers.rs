//! Socket deadlines (server pings, heartbeat timeout, token warning and expiry, write stall)
//! on one shared coarse timer instead of a tokio `Sleep` in every socket's task.
//!
//! A session registers its connection at the tick of its next deadline (rounded up to
//! [`RESOLUTION`]); one driver task wakes the connections whose tick has come through their
//! outboxes ([`reach_core::Outbox::wake_timer`]), and the session then checks its deadlines
//! against the clock. So a deadline fires at most one resolution late, never early, and an
//! idle socket's task holds no timer of its own (docs/benchmarks.md, memory, has what that
//! saves per socket). A registration is a `Weak` pointer: a connection that is gone (its
//! session ended and its socket, whose read waker holds the connection, was dropped) is
//! skipped; one still closing, and stale registrations (a deadline that moved), only cause a
//! wake-up that finds nothing due.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use reach_core::Conn;
use tokio::time::{Instant, MissedTickBehavior};

/// How late a socket deadline may fire.
pub const RESOLUTION: Duration = Duration::from_millis(50);

/// A duration in nanoseconds as `u64` (584 years), for cheap integer tick arithmetic (the
/// session computes its tick on every wake-up).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The registrations, by tick (multiples of [`RESOLUTION`] since `start`).
pub struct Timers {
    start: Instant,
    slots: Mutex<BTreeMap<u64, Vec<Weak<Conn>>>>,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            start: Instant::now(),
            slots: Mutex::new(BTreeMap::new()),
        }
    }
}

impl std::fmt::Debug for Timers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timers").finish_non_exhaustive()
    }
}

impl Timers {
    /// The first tick at or after `deadline`.
    pub fn tick_of(&self, deadline: Instant) -> u64 {
        nanos(deadline.saturating_duration_since(self.start)).div_ceil(nanos(RESOLUTION))
    }

    /// The last tick that has begun at `now`.
    fn tick_at(&self, now: Instant) -> u64 {
        nanos(now.saturating_duration_since(self.start)) / nanos(RESOLUTION)
    }

    /// Whether `tick` has come.
    pub fn passed(&self, tick: u64) -> bool {
        self.tick_at(Instant::now()) >= tick
    }

    /// Wakes `conn` once `tick` has come.
    pub fn arm(&self, tick: u64, conn: &Arc<Conn>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(tick).or_default().push(Arc::downgrade(conn));
    }

    /// Takes out every registration whose tick has come by `now`.
    fn due(&self, now: Instant) -> Vec<Vec<Weak<Conn>>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let later = slots.split_off(&(self.tick_at(now) + 1));
        std::mem::replace(&mut *slots, later)
            .into_values()
            .collect()
    }

    /// The driver: every [`RESOLUTION`], wakes the sessions whose deadline has come. Ends
    /// when the timers are dropped (the app is gone).
    pub async fn drive(timers: Weak<Timers>) {
        let mut interval = tokio::time::interval(RESOLUTION);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let Some(timers) = timers.upgrade() else {
                return;
            };
            for conn in timers.due(Instant::now()).into_iter().flatten() {
                if let Some(conn) = conn.upgrade() {
                    conn.outbox.wake_timer();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reach_core::{Engine, EngineConfig, EngineMetrics};
    use reach_proto::Encoding;

    #[test]
    fn a_registration_fires_at_its_tick_never_before() {
        let timers = Timers::default();
        let engine = Engine::new(EngineConfig::default(), EngineMetrics::unregistered(), None);
        let a = engine.new_conn("IS1", "a", Encoding::Json);
        let b = engine.new_conn("IS1", "b", Encoding::Json);
        let now = Instant::now();
        let deadline = now + Duration::from_millis(120);
        let tick = timers.tick_of(deadline);
        assert!(timers.start + RESOLUTION * tick as u32 >= deadline);
        timers.arm(tick, &a);
        timers.arm(timers.tick_of(now + Duration::from_secs(5)), &b);
        assert!(timers.due(now + Duration::from_millis(100)).is_empty());
        let fired = timers.due(now + Duration::from_millis(150));
        assert_eq!(fired.len(), 1);
        assert!(Weak::ptr_eq(&fired[0][0], &Arc::downgrade(&a)));
        assert!(timers.due(now + Duration::from_millis(150)).is_empty());
        assert_eq!(timers.due(now + Duration::from_secs(6)).len(), 1);
    }
}
