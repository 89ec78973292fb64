//! The engine's Prometheus metrics, registered in a registry the caller passes in.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};

/// Counters and gauges the engine updates on its hot path (atomics only).
#[derive(Clone, Debug)]
pub struct EngineMetrics {
    /// Users currently online on this node (published state, grace included).
    pub online_users: IntGauge,
    /// Subscriptions held by live connections (own user included).
    pub subscriptions: IntGauge,
    /// Presence and profile diffs published.
    pub diffs: IntCounter,
    /// `user_updated` frames queued to subscribers.
    pub deliveries: IntCounter,
    /// Updates merged into a still-queued update of the same user.
    pub coalesced: IntCounter,
    /// Time to hand one diff to all its subscribers' outboxes.
    pub fanout_seconds: Histogram,
    /// Frames written to sockets (by their sessions, and by the fan-out to sockets lent to it).
    pub frames_sent: IntCounter,
    /// Of those, the frames the fan-out wrote itself, to sockets their waiting sessions lent
    /// it (no task woken for them).
    pub fanout_writes: IntCounter,
}

impl EngineMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self::unregistered();
        registry.register(Box::new(m.online_users.clone()))?;
        registry.register(Box::new(m.subscriptions.clone()))?;
        registry.register(Box::new(m.diffs.clone()))?;
        registry.register(Box::new(m.deliveries.clone()))?;
        registry.register(Box::new(m.coalesced.clone()))?;
        registry.register(Box::new(m.fanout_seconds.clone()))?;
        registry.register(Box::new(m.frames_sent.clone()))?;
        registry.register(Box::new(m.fanout_writes.clone()))?;
        Ok(m)
    }

    /// Metrics not registered anywhere (tests).
    pub fn unregistered() -> Self {
        let gauge = |n: &str, h: &str| IntGauge::new(n, h).expect("valid metric");
        let counter = |n: &str, h: &str| IntCounter::new(n, h).expect("valid metric");
        EngineMetrics {
            online_users: gauge(
                "reach_online_users",
                "Users online on this node (grace included)",
            ),
            subscriptions: gauge(
                "reach_subscriptions",
                "Subscriptions held by live connections",
            ),
            diffs: counter(
                "reach_diffs_emitted_total",
                "Presence and profile diffs published",
            ),
            deliveries: counter(
                "reach_updates_queued_total",
                "user_updated frames queued to subscribers",
            ),
            coalesced: counter(
                "reach_updates_coalesced_total",
                "Updates merged into a still-queued update of the same user",
            ),
            fanout_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "reach_fanout_duration_seconds",
                    "Time to hand one diff to all its subscribers' outboxes",
                )
                .buckets(vec![
                    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001,
                    0.002_5, 0.005, 0.01, 0.025, 0.05,
                ]),
            )
            .expect("valid metric"),
            frames_sent: counter("reach_frames_sent_total", "Frames written to sockets"),
            fanout_writes: counter(
                "reach_fanout_writes_total",
                "Frames the fan-out wrote itself to sockets lent by their waiting sessions",
            ),
        }
    }
}
