//! What an authenticated connection holds while its session runs ([`Session`]): the engine's
//! connection and its outbox, the service, the token's expiry and push credential, the users it
//! watches, and the state of its deadlines; with the few helpers every request uses (queue a
//! frame, fail with a close). The loop that drives it is in [`super::session`], the requests in
//! [`super::requests`].

use std::num::NonZeroU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use reach_core::{Conn, UserKey};
use reach_proto::{CloseCode, ErrorCode, ServerFrame};
use reach_store::Service;
use sync_wrapper::SyncWrapper;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::socket::{Link, error_frame};
use crate::auth::TokenGrant;
use crate::state::App;
use crate::throttle::FrameBucket;

/// Unix seconds -> a moment (clamped to now for the past).
fn moment_at(unix: i64) -> At {
    let delta = unix - reach_proto::now_unix();
    At::now() + Duration::from_secs(delta.max(0) as u64)
}

/// A moment on the monotonic clock, in 8 bytes where an `Instant` takes 16 (and `Option<At>`
/// 8 too): microseconds since the first moment this process took, plus one. Every session
/// keeps six of them (its deadlines and write bookkeeping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct At(NonZeroU64);

/// The moment microseconds are counted from.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl At {
    pub(super) fn now() -> At {
        At::from_instant(Instant::now())
    }

    fn from_instant(instant: Instant) -> At {
        At(NonZeroU64::MIN.saturating_add(micros(instant.saturating_duration_since(origin()))))
    }

    /// The same moment as an `Instant`.
    pub(super) fn instant(self) -> Instant {
        origin() + Duration::from_micros(self.0.get() - 1)
    }
}

impl std::ops::Add<Duration> for At {
    type Output = At;

    fn add(self, d: Duration) -> At {
        At(self.0.saturating_add(micros(d)))
    }
}

/// The users a connection watches: the engine's keys (sharing the presence map's
/// allocations), sorted by identity (a connection watches users of its own service), and
/// searched by identity without building a key.
#[derive(Default)]
pub(super) struct Watched(Vec<UserKey>);

impl Watched {
    fn find(&self, identity: &str) -> Result<usize, usize> {
        // Every key starts with the same `<service SID>/`: its length, found once, is where
        // each key's identity starts (instead of a search for the `/` at every step).
        let Some(first) = self.0.first() else {
            return Err(0);
        };
        let start = first.as_str().len() - first.identity().len();
        self.0
            .binary_search_by(|k| k.as_str().get(start..).unwrap_or("").cmp(identity))
    }

    pub(super) fn contains(&self, identity: &str) -> bool {
        self.find(identity).is_ok()
    }

    pub(super) fn insert(&mut self, key: UserKey) {
        debug_assert!(self.0.first().is_none_or(|k| k.service() == key.service()));
        if let Err(at) = self.find(key.identity()) {
            self.0.insert(at, key);
        }
    }

    pub(super) fn remove(&mut self, identity: &str) -> bool {
        match self.find(identity) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// Drops the spare capacity (most connections subscribe once or twice).
    pub(super) fn shrink(&mut self) {
        self.0.shrink_to_fit();
    }

    /// Every watched user's key, leaving none.
    pub(super) fn take(&mut self) -> Vec<UserKey> {
        std::mem::take(&mut self.0)
    }
}

/// Write-side bookkeeping that survives across wake-ups.
#[derive(Default)]
pub(super) struct WriteState {
    /// Frames written to the sink (or part of one to the wire, see `direct`) but not flushed
    /// yet.
    pub(super) dirty: bool,
    /// tungstenite holds nothing unwritten and the wire owes nothing (a flush succeeded, or a
    /// parked socket's stream was just built, and nothing was sent through the stream nor
    /// read from it since: a read may queue an automatic pong): small messages are then
    /// written past the stream, straight to the connection (`socket::write_direct`), which
    /// spares a delivery the stream's state and copy.
    pub(super) direct: bool,
    /// Since when the socket has refused to take more bytes.
    pub(super) blocked_since: Option<At>,
    pub(super) ping_due: bool,
    /// The last read or write that may have grown tungstenite's buffers since its stream was
    /// built (a message other than a ping or pong); None while they are as built. The socket
    /// is parked once it has been quiet for [`QUIET`] after it.
    pub(super) grown_at: Option<At>,
    /// Bytes of messages written since the last flush.
    pub(super) batch_bytes: usize,
    /// tungstenite's buffers surely grew past their initial sizes (a message read longer than
    /// the read buffer, a batch of at least [`BIG_BATCH`] written): the socket is parked as
    /// soon as everything is flushed, without waiting for a quiet second.
    pub(super) big: bool,
    /// Quiet checks in a row that found the socket busy, up to [`MAX_BUSY_CHECKS`]: each
    /// doubles the wait for the next ([`WriteState::quiet_check`]).
    pub(super) busy_checks: u8,
    /// The connection is plain TCP and its outbox has it as a sink (`socket::lend`): the
    /// session lends it while it waits with nothing unwritten.
    pub(super) lendable: bool,
    /// The session lent the connection at its last wait (`reach_core::Outbox::grant`), and
    /// takes it back before it writes or reads (`Session::take_back`).
    pub(super) lent: bool,
}

impl WriteState {
    /// When to check whether the socket has gone quiet: [`QUIET`] after its buffers last grew,
    /// doubled for each check in a row that found it busy. A socket that keeps writing is
    /// woken for the check every 4 s instead of every second (each such wake-up costs about
    /// what a delivery's does); one that stops is parked at most 4 s after its last write.
    pub(super) fn quiet_check(&self) -> Option<At> {
        self.grown_at
            .map(|t| t + QUIET * (1u32 << self.busy_checks))
    }
}

/// At most this many doublings of the wait between quiet checks ([`WriteState::quiet_check`]).
pub(super) const MAX_BUSY_CHECKS: u8 = 2;

/// A batch this large leaves tungstenite's write buffer at least this large (a `subscribed`
/// reply): worth parking the socket at once.
pub(super) const BIG_BATCH: usize = 512;

/// How long a socket stays quiet (nothing but pings and pongs) before it is parked.
pub(super) const QUIET: Duration = Duration::from_millis(1000);

/// An authenticated connection. Kept small: every idle socket holds one (its identity and
/// service are in `conn`'s key, the service record is shared).
///
/// `repr(C)`, the fields every wake-up of a delivery reads first: they fill the first 96
/// bytes, two or three cache lines wherever the allocator puts the box, where the compiler's
/// order spread them over the whole struct among fields only requests and closes read. A
/// delivery's user-space time is mostly such cache misses (docs/benchmarks.md, "A delivery's
/// cache misses").
#[repr(C)]
pub(super) struct Session {
    pub(super) app: Arc<App>,
    pub(super) conn: Arc<Conn>,
    pub(super) w: WriteState,
    /// The deadline this session is registered for with the shared timers (at its tick), if
    /// that tick is still to come.
    pub(super) armed: Option<At>,
    pub(super) next_ping: At,
    pub(super) last_heard: At,
    pub(super) expires_at: At,
    pub(super) warn_at: Option<At>,
    /// The socket's read side must be polled: it has not returned `Pending` since it was last
    /// woken (reads are polled with the connection as waker, see `next_io`).
    pub(super) must_read: bool,
    /// The client said `bye`: it goes offline at once, without grace.
    pub(super) bye: bool,
    pub(super) service: Arc<Service>,
    /// The current token's push credential (for `register_push`).
    pub(super) push_credential_sid: Option<Box<str>>,
    /// The current token's expiry (unix seconds).
    pub(super) token_expires_at: i64,
    /// Identities subscribed to besides the connection's own.
    pub(super) watched: Watched,
    /// The connection's place under `limits.max_connections`.
    pub(super) permit: Option<OwnedSemaphorePermit>,
    /// `limits.socket_frames_per_second` (None: no limit).
    pub(super) frames: Option<FrameBucket>,
    /// The connection while the socket is parked (see `session::Session::park`): kept here,
    /// not in the socket's task, so that the task fits a smaller allocation. Used only through
    /// `&mut` (hyper's `Upgraded`, under a TLS socket, is not `Sync`; requests hold `&Session`
    /// across awaits).
    pub(super) parked: Option<SyncWrapper<Link>>,
}

/// The session gives up the connection it may have lent to its outbox, so the connection
/// closes with the session, whatever way it ends.
impl Drop for Session {
    fn drop(&mut self) {
        if self.w.lendable {
            self.conn.outbox.drop_sink();
        }
    }
}

impl Session {
    /// The session of a connection just attached with this grant.
    pub(super) fn new(
        app: &Arc<App>,
        conn: Arc<Conn>,
        service: Arc<Service>,
        grant: TokenGrant,
    ) -> Session {
        let now = At::now();
        let mut s = Session {
            app: Arc::clone(app),
            conn,
            service,
            watched: Watched::default(),
            last_heard: now,
            armed: None,
            next_ping: now + app.config.heartbeat_interval(),
            expires_at: now,
            warn_at: None,
            bye: false,
            must_read: true,
            push_credential_sid: grant.push_credential_sid.map(String::into_boxed_str),
            token_expires_at: grant.expires_at,
            permit: None,
            frames: app.throttles.frame_bucket(),
            // The `hello` (with its token, longer than the read buffer) was just read: the
            // socket is parked as soon as its `welcome` is flushed, so a connect storm holds
            // a stream only for the sockets in their handshake.
            w: WriteState {
                grown_at: Some(now),
                big: true,
                ..WriteState::default()
            },
            parked: None,
        };
        s.set_expiry();
        s
    }

    /// Re-arms the token's expiry and warning after `token_expires_at` changed.
    pub(super) fn set_expiry(&mut self) {
        self.expires_at = moment_at(self.token_expires_at);
        let warn = self.token_expires_at - self.app.config.presence.token_warning_s as i64;
        self.warn_at = Some(moment_at(warn));
    }

    /// Queues a frame for this connection.
    pub(super) fn push(&self, frame: &ServerFrame) {
        self.conn.outbox.push_frame(frame);
    }

    /// Queues an error frame, then the close.
    pub(super) fn fail(&self, code: ErrorCode, msg: impl Into<String>, close: CloseCode) {
        self.push(&error_frame(None, code, msg));
        self.conn.outbox.close(close);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moments order as the instants they stand for, add durations, and read back to within a
    /// microsecond; `Option<At>` costs no more than `At`.
    #[test]
    fn moments_keep_the_monotonic_clock_in_eight_bytes() {
        assert_eq!(std::mem::size_of::<Option<At>>(), 8);
        let a = At::now();
        let b = a + Duration::from_millis(1500);
        assert!(a < b && b == a + Duration::from_micros(1_500_000));
        let back = b.instant().saturating_duration_since(a.instant());
        assert_eq!(back, Duration::from_millis(1500));
        let now = Instant::now();
        let read = At::from_instant(now).instant();
        assert!(now.saturating_duration_since(read) < Duration::from_micros(1));
        assert!(read <= now);
        assert!(At::now() >= a);
        assert_eq!(
            a + Duration::MAX,
            At(NonZeroU64::MAX),
            "saturates, never wraps"
        );
    }

    /// What a delivery's wake-up reads first stays in the first 96 bytes (see [`Session`]).
    #[test]
    fn the_hot_fields_come_first() {
        assert!(std::mem::offset_of!(Session, bye) < 96);
        assert_eq!(std::mem::offset_of!(Session, service), 96);
    }

    /// A busy socket's quiet checks come 1, 2, then every 4 s after its last write.
    #[test]
    fn busy_quiet_checks_back_off_to_four_seconds() {
        let t = At::now();
        let mut w = WriteState::default();
        assert_eq!(w.quiet_check(), None, "nothing grew: nothing to check");
        w.grown_at = Some(t);
        let waits: Vec<Option<At>> = (0..=MAX_BUSY_CHECKS)
            .map(|n| {
                w.busy_checks = n;
                w.quiet_check()
            })
            .collect();
        let secs = |s| Some(t + Duration::from_secs(s));
        assert_eq!(waits, vec![secs(1), secs(2), secs(4)]);
    }

    /// Watched users are found by identity, also identities holding a `/` or sorting before
    /// and after each other only past a common start.
    #[test]
    fn watched_users_are_found_by_identity() {
        let svc = "IS00000000000000000000000000000001";
        let names = ["bob", "a/b", "alice", "al", "", "zoe/", "alice2"];
        let mut w = Watched::default();
        assert!(!w.contains("alice"), "an empty list holds nobody");
        for n in names {
            w.insert(UserKey::new(svc, n));
        }
        w.insert(UserKey::new(svc, "bob"));
        assert_eq!(w.len(), names.len(), "a second insert of bob adds nothing");
        let order: Vec<&str> = w.0.iter().map(UserKey::identity).collect();
        assert!(order.is_sorted(), "{order:?}");
        for n in names {
            assert!(w.contains(n), "{n:?}");
        }
        for n in [
            "a",
            "alice3",
            "zoe",
            "b/",
            "IS00000000000000000000000000000001/bob",
        ] {
            assert!(!w.contains(n), "{n:?}");
        }
        assert!(w.remove("a/b") && !w.contains("a/b") && w.contains("alice"));
        assert!(!w.remove("a/b"));
    }
}
