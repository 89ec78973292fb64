//! Connection options: encoding, timeouts, the reconnect policy.

use std::time::Duration;

pub use reach_proto::Encoding;

/// When and how often the client reconnects after losing its connection.
///
/// Delays grow exponentially from `base` up to `cap`, with *full jitter*: attempt `n` waits a
/// uniformly random time in `0..=min(cap, base * 2^n)`, so clients that lost the same server
/// do not come back in lockstep. A `goodbye` from a draining server replaces the first delay
/// with the server's `retry_after_ms`. A successful `welcome` resets the attempt count.
///
/// ```
/// use std::time::Duration;
/// use reach_client::ReconnectPolicy;
///
/// let policy = ReconnectPolicy::exponential(Duration::from_millis(100), Duration::from_secs(5))
///     .max_attempts(10);
/// for attempt in 0..20 {
///     assert!(policy.delay(attempt) <= Duration::from_secs(5));
/// }
/// assert!(policy.delay(0) <= Duration::from_millis(100));
/// assert!(!ReconnectPolicy::none().is_enabled());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconnectPolicy {
    enabled: bool,
    base: Duration,
    cap: Duration,
    max_attempts: Option<u32>,
}

impl Default for ReconnectPolicy {
    /// Base 500 ms, cap 30 s, unlimited attempts.
    fn default() -> Self {
        ReconnectPolicy::exponential(Duration::from_millis(500), Duration::from_secs(30))
    }
}

impl ReconnectPolicy {
    /// Never reconnect: a lost connection ends in [`Disconnected`](crate::ConnectionState).
    pub fn none() -> Self {
        ReconnectPolicy {
            enabled: false,
            base: Duration::ZERO,
            cap: Duration::ZERO,
            max_attempts: Some(0),
        }
    }

    /// Exponential backoff with full jitter from `base` up to `cap`, unlimited attempts.
    pub fn exponential(base: Duration, cap: Duration) -> Self {
        ReconnectPolicy {
            enabled: true,
            base,
            cap: cap.max(base),
            max_attempts: None,
        }
    }

    /// Gives up (state `Disconnected`) after this many failed attempts in a row.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// False for [`ReconnectPolicy::none`].
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Whether attempt number `attempt` (0-based, counting failures in a row) may be made.
    pub(crate) fn allows(&self, attempt: u32) -> bool {
        self.enabled && self.max_attempts.is_none_or(|max| attempt < max)
    }

    /// The upper bound of the delay before attempt `attempt`: `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A random delay before attempt `attempt`, uniform in `0..=ceiling(attempt)`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt).as_millis() as u64;
        Duration::from_millis(rand::random_range(0..=ceiling))
    }
}

/// Everything the builder sets; copied into the client's background task.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub encoding: Encoding,
    pub reconnect: ReconnectPolicy,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// `None`: 2.5 × the server's heartbeat interval.
    pub dead_after: Option<Duration>,
    pub client_name: String,
    pub event_capacity: usize,
    /// Trusted certificates for `wss://` (`None`: the system's roots, loaded when needed).
    pub tls: Option<crate::tls::TlsConfig>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            encoding: Encoding::MsgPack,
            reconnect: ReconnectPolicy::default(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            dead_after: None,
            client_name: concat!("reach-client-rust/", env!("CARGO_PKG_VERSION")).to_owned(),
            event_capacity: 4096,
            tls: None,
        }
    }
}

impl Options {
    /// How long silence from the server may last before it counts as dead.
    pub fn dead_after(&self, heartbeat_interval: Duration) -> Duration {
        self.dead_after
            .unwrap_or_else(|| heartbeat_interval.mul_f64(2.5))
            .max(Duration::from_millis(50))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let p = ReconnectPolicy::exponential(Duration::from_millis(100), Duration::from_secs(1));
        let got: Vec<u128> = (0..6).map(|a| p.ceiling(a).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.ceiling(500), Duration::from_secs(1), "no overflow");
    }

    #[test]
    fn full_jitter_spreads_over_the_whole_range() {
        let p = ReconnectPolicy::exponential(Duration::from_millis(1000), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..200).map(|_| p.delay(3)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert!(delays.iter().any(|d| *d < Duration::from_millis(250)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(750)));
    }

    #[test]
    fn attempts_are_limited_only_when_asked() {
        let p = ReconnectPolicy::default();
        assert!(p.allows(1_000_000));
        let p = p.max_attempts(2);
        assert!(p.allows(1) && !p.allows(2));
        assert!(!ReconnectPolicy::none().allows(0));
    }

    #[test]
    fn dead_server_deadline_follows_the_heartbeat() {
        let o = Options::default();
        assert_eq!(
            o.dead_after(Duration::from_millis(200)),
            Duration::from_millis(500)
        );
        let o = Options {
            dead_after: Some(Duration::from_secs(3)),
            ..Options::default()
        };
        assert_eq!(
            o.dead_after(Duration::from_millis(200)),
            Duration::from_secs(3)
        );
    }
}
