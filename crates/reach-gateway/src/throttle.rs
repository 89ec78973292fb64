//! Rate limits, as token buckets (governor's GCRA): REST requests per account, failed
//! authentications per source address, and frames per socket (`[limits]` in
//! `config/reachd.toml`; `docs/security.md`). Each refusal is counted in
//! `reach_rate_limited_total{reason}`.
//!
//! - [`Throttles::rest_request`]: one token per authenticated REST request of an account;
//!   empty, the request is answered 429 (code 20429) with `Retry-After`.
//! - [`Throttles::auth_allowed`] / [`Throttles::auth_failed`]: a failed authentication (REST
//!   credentials or a `hello` token) takes a token of its address; the one that finds the
//!   bucket empty blocks the address until a token is back, and while it is blocked nothing it
//!   sends to authenticate is checked at all, right or wrong (so a guess cannot be confirmed by
//!   a different answer). Other addresses are not affected.
//! - [`FrameBucket`]: one per authenticated socket; a frame past the burst is refused with
//!   `error` 20429, and another burst's worth refused in a row closes the socket with 4029.
//!
//! Addresses are keyed per IPv4 address and per IPv6 /64 (one host's usual allocation), so an
//! IPv6 client cannot step around its bucket by rotating addresses in its own network.
//! [`Throttles::sweep`] drops buckets that are full again, so the maps hold only the addresses
//! and accounts seen recently.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use prometheus::IntCounterVec;
use reach_proto::AccountSid;

use crate::config::LimitsConfig;

type Instant = <MonotonicClock as Clock>::Instant;
type Keyed<K> = RateLimiter<K, DashMapStateStore<K>, MonotonicClock, NoOpMiddleware<Instant>>;
type Direct = RateLimiter<NotKeyed, InMemoryState, MonotonicClock, NoOpMiddleware<Instant>>;

/// Why something was refused; the `reason` label of `reach_rate_limited_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// `limits.rest_requests_per_second` of an account.
    RestAccount,
    /// `limits.auth_failures_per_minute` of an address.
    AuthFailures,
    /// `limits.socket_frames_per_second` of a socket.
    SocketFrames,
    /// `limits.max_identities_per_request`.
    RequestIdentities,
}

impl Limited {
    /// Every limit.
    pub const ALL: [Limited; 4] = [
        Limited::RestAccount,
        Limited::AuthFailures,
        Limited::SocketFrames,
        Limited::RequestIdentities,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Limited::RestAccount => "rest_account",
            Limited::AuthFailures => "auth_failures",
            Limited::SocketFrames => "socket_frames",
            Limited::RequestIdentities => "request_identities",
        }
    }
}

/// The key of an address's bucket: the IPv4 address, or the /64 of an IPv6 one.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1))),
        },
    }
}

/// A refusal's wait: when a token is back, in whole seconds (at least 1) for `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    pub fn seconds(self) -> u64 {
        (self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0)).max(1)
    }
}

/// The gateway's rate limits.
pub struct Throttles {
    clock: MonotonicClock,
    rest: Option<Keyed<AccountSid>>,
    auth_failures: Option<Keyed<IpAddr>>,
    /// Addresses whose failures emptied their bucket, and until when they are blocked.
    blocked: DashMap<IpAddr, Instant, foldhash::fast::RandomState>,
    frames: Option<(Quota, u32)>,
    /// `reach_rate_limited_total`.
    counter: IntCounterVec,
}

impl std::fmt::Debug for Throttles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttles")
            .field("blocked", &self.blocked.len())
            .finish_non_exhaustive()
    }
}

/// A quota of `per` tokens per `period` with `burst` at once; None when `per` is 0.
fn quota(per: u32, period: Duration, burst: u32) -> Option<Quota> {
    let per = NonZeroU32::new(per)?;
    let burst = NonZeroU32::new(burst).unwrap_or(per);
    Some(
        Quota::with_period(period / per.get())
            .expect("a positive period")
            .allow_burst(burst),
    )
}

impl Throttles {
    pub fn new(limits: &LimitsConfig, counter: IntCounterVec) -> Throttles {
        // Every reason's series exists from the start, at 0 (dashboards and alerts read rates).
        for limited in Limited::ALL {
            counter.with_label_values(&[limited.label()]);
        }
        let second = Duration::from_secs(1);
        Throttles {
            clock: MonotonicClock,
            rest: quota(
                limits.rest_requests_per_second,
                second,
                limits.rest_request_burst,
            )
            .map(|q| RateLimiter::dashmap_with_clock(q, MonotonicClock)),
            auth_failures: quota(
                limits.auth_failures_per_minute,
                Duration::from_secs(60),
                limits.auth_failure_burst,
            )
            .map(|q| RateLimiter::dashmap_with_clock(q, MonotonicClock)),
            blocked: DashMap::default(),
            frames: quota(
                limits.socket_frames_per_second,
                second,
                limits.socket_frame_burst,
            )
            .map(|q| (q, limits.socket_frame_burst)),
            counter,
        }
    }

    /// Counts a refusal.
    pub fn count(&self, why: Limited) {
        self.counter.with_label_values(&[why.label()]).inc();
    }

    /// Takes a token of `account`'s REST bucket.
    pub fn rest_request(&self, account: &AccountSid) -> Result<(), RetryAfter> {
        let Some(rest) = &self.rest else {
            return Ok(());
        };
        rest.check_key(account).map_err(|not_until| {
            self.count(Limited::RestAccount);
            RetryAfter(not_until.wait_time_from(self.clock.now()))
        })
    }

    /// Whether `ip` may try to authenticate now (it is not blocked).
    pub fn auth_allowed(&self, ip: IpAddr) -> Result<(), RetryAfter> {
        let key = address_key(ip);
        let now = self.clock.now();
        let Some(until) = self.blocked.get(&key).map(|u| *u) else {
            return Ok(());
        };
        if until <= now {
            self.blocked.remove_if(&key, |_, u| *u <= now);
            return Ok(());
        }
        self.count(Limited::AuthFailures);
        Err(RetryAfter(until.duration_since(now)))
    }

    /// Takes a token of `ip`'s failure bucket for a failed authentication; when there was none
    /// left, the address is blocked until one is back (and this failure is refused too).
    pub fn auth_failed(&self, ip: IpAddr) -> Result<(), RetryAfter> {
        let Some(failures) = &self.auth_failures else {
            return Ok(());
        };
        let key = address_key(ip);
        failures.check_key(&key).map_err(|not_until| {
            let now = self.clock.now();
            let wait = not_until.wait_time_from(now);
            self.blocked.insert(key, not_until.earliest_possible());
            self.count(Limited::AuthFailures);
            tracing::warn!(address = %key, retry_after_ms = wait.as_millis() as u64, "too many failed authentications; address blocked");
            RetryAfter(wait)
        })
    }

    /// A new socket's frame bucket (None: no limit).
    pub fn frame_bucket(&self) -> Option<FrameBucket> {
        let (quota, burst) = self.frames?;
        Some(FrameBucket {
            limiter: RateLimiter::direct_with_clock(quota, MonotonicClock),
            refused_in_a_row: 0,
            burst,
        })
    }

    /// Forgets buckets that are full again and blocks that have ended.
    pub fn sweep(&self) {
        if let Some(failures) = &self.auth_failures {
            failures.retain_recent();
            failures.shrink_to_fit();
        }
        if let Some(rest) = &self.rest {
            rest.retain_recent();
            rest.shrink_to_fit();
        }
        let now = self.clock.now();
        self.blocked.retain(|_, until| *until > now);
        self.blocked.shrink_to_fit();
    }

    /// Addresses and accounts with a bucket now (for the tests of [`Throttles::sweep`]).
    pub fn tracked(&self) -> usize {
        self.rest.as_ref().map_or(0, |r| r.len())
            + self.auth_failures.as_ref().map_or(0, |r| r.len())
            + self.blocked.len()
    }
}

/// A socket's frame bucket.
pub struct FrameBucket {
    limiter: Direct,
    /// Frames refused since the last one taken.
    refused_in_a_row: u32,
    burst: u32,
}

impl std::fmt::Debug for FrameBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameBucket")
            .field("refused_in_a_row", &self.refused_in_a_row)
            .finish_non_exhaustive()
    }
}

/// What to do with a socket's frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameVerdict {
    Take,
    /// Refuse it with `error` 20429.
    Refuse(RetryAfter),
    /// Another burst's worth refused in a row: close with 4029.
    Close,
}

impl FrameBucket {
    pub fn check(&mut self) -> FrameVerdict {
        match self.limiter.check() {
            Ok(()) => {
                self.refused_in_a_row = 0;
                FrameVerdict::Take
            }
            Err(not_until) => {
                self.refused_in_a_row += 1;
                if self.refused_in_a_row > self.burst {
                    FrameVerdict::Close
                } else {
                    FrameVerdict::Refuse(RetryAfter(not_until.wait_time_from(MonotonicClock.now())))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    fn throttles(edit: impl FnOnce(&mut LimitsConfig)) -> Throttles {
        let mut limits = LimitsConfig::default();
        edit(&mut limits);
        let counter = IntCounterVec::new(Opts::new("t", "t"), &["reason"]).unwrap();
        Throttles::new(&limits, counter)
    }

    fn refused(t: &Throttles, why: Limited) -> u64 {
        t.counter.with_label_values(&[why.label()]).get()
    }

    #[test]
    fn an_account_gets_its_burst_then_waits() {
        let t = throttles(|l| {
            l.rest_requests_per_second = 10;
            l.rest_request_burst = 3;
        });
        let a = AccountSid::parse("AC00000000000000000000000000000001").unwrap();
        let b = AccountSid::parse("AC00000000000000000000000000000002").unwrap();
        for _ in 0..3 {
            t.rest_request(&a).unwrap();
        }
        let wait = t.rest_request(&a).unwrap_err();
        assert!(wait.0 <= Duration::from_millis(100), "{wait:?}");
        assert_eq!(wait.seconds(), 1);
        t.rest_request(&b)
            .expect("another account has its own bucket");
        assert_eq!(refused(&t, Limited::RestAccount), 1);
    }

    #[test]
    fn failures_block_their_address_only_and_right_answers_too() {
        let t = throttles(|l| {
            l.auth_failures_per_minute = 1;
            l.auth_failure_burst = 2;
        });
        let bad: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..2 {
            t.auth_allowed(bad).unwrap();
            t.auth_failed(bad).unwrap();
        }
        // The third failure finds the bucket empty: refused, and the address is blocked.
        let wait = t.auth_failed(bad).unwrap_err();
        assert!(wait.0 > Duration::from_secs(50), "{wait:?}");
        assert!(t.auth_allowed(bad).is_err(), "blocked, whatever it sends");
        t.auth_allowed(other).expect("another address is not");
        t.auth_failed(other).unwrap();
        assert_eq!(refused(&t, Limited::AuthFailures), 2);
    }

    #[test]
    fn ipv6_addresses_share_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(address_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_socket_is_refused_past_its_burst_and_closed_after_another() {
        let t = throttles(|l| {
            l.socket_frames_per_second = 1;
            l.socket_frame_burst = 3;
        });
        let mut bucket = t.frame_bucket().unwrap();
        for _ in 0..3 {
            assert_eq!(bucket.check(), FrameVerdict::Take);
        }
        for _ in 0..3 {
            assert!(matches!(bucket.check(), FrameVerdict::Refuse(_)));
        }
        assert_eq!(bucket.check(), FrameVerdict::Close);
    }

    #[test]
    fn zero_means_no_limit() {
        let t = throttles(|l| {
            l.rest_requests_per_second = 0;
            l.socket_frames_per_second = 0;
        });
        let a = AccountSid::parse("AC00000000000000000000000000000001").unwrap();
        for _ in 0..10_000 {
            t.rest_request(&a).unwrap();
        }
        assert!(t.frame_bucket().is_none());
        t.auth_failed("192.0.2.1".parse().unwrap()).unwrap();
        assert_eq!(t.tracked(), 1);
        assert_eq!(RetryAfter(Duration::ZERO).seconds(), 1);
        assert_eq!(RetryAfter(Duration::from_millis(2500)).seconds(), 3);
        assert_eq!(RetryAfter(Duration::from_secs(2)).seconds(), 2);
    }
}
