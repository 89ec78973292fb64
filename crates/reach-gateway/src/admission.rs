//! Who may open a connection: the cap on connections that are not authenticated sockets yet
//! (`limits.max_pending_connections`, and `limits.max_pending_per_address` per source address).
//!
//! A connection is *pending* from its accept until it is closed or becomes an authenticated
//! socket (`welcome`): an HTTP connection, kept alive or not, and an upgraded socket waiting
//! for `hello`. The accept loop asks [`Pending::admit`] before it reads a byte; the slot it gets
//! travels with the connection (as a request extension into the WebSocket upgrade, then into
//! the socket's task) and is given back when its last holder drops it. So a stranger who opens
//! connections and sends nothing, or half a request, holds at most its address's share, and
//! honest clients from other addresses are still admitted.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use dashmap::DashMap;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

/// Why a connection was not admitted; the `reason` label of `reach_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every descriptor of the [`Budget`] is held by an open connection.
    OpenFiles,
    /// `limits.max_pending_connections` pending connections in all.
    PendingTotal,
    /// `limits.max_pending_per_address` pending connections from this address.
    PendingPerAddress,
}

impl Refused {
    /// Every reason.
    pub const ALL: [Refused; 3] = [
        Refused::OpenFiles,
        Refused::PendingTotal,
        Refused::PendingPerAddress,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refused::OpenFiles => "open_files",
            Refused::PendingTotal => "pending_total",
            Refused::PendingPerAddress => "pending_per_address",
        }
    }
}

/// The pending connections, in all and per address.
#[derive(Debug)]
pub struct Pending {
    max_total: usize,
    max_per_address: usize,
    total: AtomicUsize,
    per_address: DashMap<IpAddr, usize, foldhash::fast::RandomState>,
    /// `reach_pending_connections`.
    gauge: IntGauge,
}

impl Pending {
    pub fn new(max_total: usize, max_per_address: usize, gauge: IntGauge) -> Arc<Pending> {
        Arc::new(Pending {
            max_total,
            max_per_address,
            total: AtomicUsize::new(0),
            per_address: DashMap::default(),
            gauge,
        })
    }

    /// A slot for a new connection from `address` (an IPv6 address counts per /64), unless a
    /// cap is reached.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Result<Slot, Refused> {
        let address = crate::throttle::address_key(address);
        if self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_total).then_some(n + 1)
            })
            .is_err()
        {
            return Err(Refused::PendingTotal);
        }
        let mut count = self.per_address.entry(address).or_insert(0);
        if *count >= self.max_per_address {
            drop(count);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::PendingPerAddress);
        }
        *count += 1;
        self.gauge.inc();
        Ok(Slot {
            _held: Arc::new(Held {
                pending: Arc::clone(self),
                address,
            }),
        })
    }

    /// Pending connections now.
    pub fn len(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn release(&self, address: IpAddr) {
        if let dashmap::Entry::Occupied(mut e) = self.per_address.entry(address) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
        self.total.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// One admitted connection's place; given back when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Slot {
    _held: Arc<Held>,
}

#[derive(Debug)]
struct Held {
    pending: Arc<Pending>,
    address: IpAddr,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.pending.release(self.address);
    }
}

/// File descriptors never given to public connections: the admin listener and its requests,
/// the database, logs, the backplane.
pub const RESERVED_FDS: usize = 128;

/// Descriptors kept for REST and pending connections when the socket cap must be lowered to
/// fit the open-file limit: at most this many, and at most a quarter of what is left.
pub const REST_ROOM: usize = 256;

/// How many descriptors public connections may take, and the caps fitted to them.
///
/// Every accepted connection holds one descriptor (a permit of [`Budget::connections`]) until
/// it is closed, whatever it becomes; past that the accept loop closes new ones at once, so the
/// process never runs out and the admin endpoints always answer. Sockets are capped below it
/// by at least [`REST_ROOM`] (or a quarter), so at the socket cap REST still has room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Open public connections of any kind.
    pub connections: usize,
    /// `limits.max_connections`, lowered if it had to be.
    pub sockets: usize,
    /// `limits.max_pending_connections`, lowered if it had to be.
    pub pending: usize,
    /// The open-file limit they were fitted to, when a cap had to be lowered.
    pub lowered_for: Option<usize>,
}

impl Budget {
    /// Fits `sockets` and `pending` into `open_files` (if known).
    pub fn fit(sockets: usize, pending: usize, open_files: Option<usize>) -> Budget {
        let Some(limit) = open_files else {
            return Budget {
                connections: usize::MAX,
                sockets,
                pending,
                lowered_for: None,
            };
        };
        let connections = limit.saturating_sub(RESERVED_FDS).max(2);
        let room = REST_ROOM.min(connections / 4).max(1);
        let fitted = Budget {
            connections,
            sockets: sockets.min(connections - room),
            pending: pending.min(connections),
            lowered_for: None,
        };
        Budget {
            lowered_for: (fitted.sockets < sockets || fitted.pending < pending).then_some(limit),
            ..fitted
        }
    }
}

/// The soft limit on open files of this process, where the system says (Linux).
pub fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// A public connection's stream with its descriptor, given back when the stream is closed,
/// whatever it has become by then (an HTTP connection, a TLS stream, a WebSocket).
pub(crate) struct Counted {
    tcp: Arc<Tcp>,
    _descriptor: OwnedSemaphorePermit,
}

/// An accepted TCP connection, shared: a WebSocket session on plain TCP lends it to its
/// outbox while it waits, so the fan-out writes updates to it without waking the session
/// (`reach_core::Sink`, implemented in `ws::socket`). Read and written through `&self` (the
/// runtime's readiness, then a non-blocking read or write), as the runtime's own stream is.
pub(crate) struct Tcp(TcpStream);

impl Tcp {
    /// Sends `buf` with one `send`, without the runtime's readiness check (see
    /// `ws::wire::SendNow`); `WouldBlock` when the socket takes nothing now. With
    /// `MSG_NOSIGNAL`, as the runtime's own writes: a peer gone gives `EPIPE`, never SIGPIPE.
    pub(crate) fn send_now(&self, buf: &[u8]) -> io::Result<usize> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let flags = libc::MSG_NOSIGNAL;
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let flags = 0;
        socket2::SockRef::from(&self.0).send_with_flags(buf, flags)
    }
}

impl Counted {
    pub(crate) fn new(tcp: TcpStream, descriptor: OwnedSemaphorePermit) -> Self {
        Counted {
            tcp: Arc::new(Tcp(tcp)),
            _descriptor: descriptor,
        }
    }

    /// The connection, shared (see [`Tcp`]).
    pub(crate) fn shared(&self) -> &Arc<Tcp> {
        &self.tcp
    }

    /// See [`Tcp::send_now`].
    pub(crate) fn send_now(&self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.send_now(buf)
    }

    /// Reads what the client sent without taking it from the connection.
    pub(crate) async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.tcp.0.peek(buf).await
    }
}

/// Runs `op` once the connection is ready for it, until it does not say `WouldBlock` (which
/// clears the runtime's readiness, so the next poll waits for the next event).
fn poll_io<T>(
    cx: &mut Context<'_>,
    ready: impl Fn(&mut Context<'_>) -> Poll<io::Result<()>>,
    mut op: impl FnMut() -> io::Result<T>,
) -> Poll<io::Result<T>> {
    loop {
        std::task::ready!(ready(cx))?;
        match op() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            done => return Poll::Ready(done),
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let tcp = &self.tcp.0;
        let n = std::task::ready!(poll_io(
            cx,
            |cx| tcp.poll_read_ready(cx),
            || tcp.try_read(buf.initialize_unfilled())
        ))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let tcp = &self.tcp.0;
        poll_io(cx, |cx| tcp.poll_write_ready(cx), || tcp.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let tcp = &self.tcp.0;
        poll_io(
            cx,
            |cx| tcp.poll_write_ready(cx),
            || tcp.try_write_vectored(bufs),
        )
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&self.tcp.0).shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_keeps_descriptors_free_for_rest_and_admin() {
        let roomy = Budget::fit(10_000, 4_096, Some(20_000));
        assert_eq!(
            (
                roomy.connections,
                roomy.sockets,
                roomy.pending,
                roomy.lowered_for
            ),
            (20_000 - RESERVED_FDS, 10_000, 4_096, None)
        );
        // A load run's caps on the same limit: sockets keep all but REST_ROOM.
        let bench = Budget::fit(25_000, 25_000, Some(20_000));
        assert_eq!(bench.sockets, 20_000 - RESERVED_FDS - REST_ROOM);
        assert_eq!(bench.pending, 20_000 - RESERVED_FDS);
        assert_eq!(bench.lowered_for, Some(20_000));
        // A small limit: a quarter of it stays for REST.
        let tight = Budget::fit(10_000, 4_096, Some(700));
        assert_eq!((tight.connections, tight.sockets), (572, 429));
        assert_eq!(Budget::fit(10, 5, None).sockets, 10);
        assert!(open_file_limit().is_some_and(|n| n > 0));
    }

    #[test]
    fn caps_hold_in_all_and_per_address_and_slots_come_back() {
        let gauge = IntGauge::new("pending", "test").unwrap();
        let pending = Pending::new(3, 2, gauge.clone());
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let a1 = pending.admit(a).unwrap();
        let a2 = pending.admit(a).unwrap();
        assert_eq!(pending.admit(a).unwrap_err(), Refused::PendingPerAddress);
        let b1 = pending.admit(b).unwrap();
        assert_eq!(pending.admit(b).unwrap_err(), Refused::PendingTotal);
        assert_eq!(pending.len(), 3);
        // A clone (the upgrade's) keeps the slot until it is dropped too.
        let upgraded = a1.clone();
        drop(a1);
        assert_eq!(pending.len(), 3);
        drop(upgraded);
        assert_eq!(pending.len(), 2);
        let a3 = pending.admit(a).unwrap();
        drop((a2, b1));
        assert_eq!(pending.len(), 1);
        assert_eq!(gauge.get(), 1);
        drop(a3);
        assert!(pending.is_empty());
        assert_eq!(gauge.get(), 0);
        // One IPv6 /64 is one address.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let _c = pending.admit(v6("2001:db8::1")).unwrap();
        let _d = pending.admit(v6("2001:db8::2:3")).unwrap();
        assert_eq!(
            pending.admit(v6("2001:db8::4")).unwrap_err(),
            Refused::PendingPerAddress
        );
        let _e = pending.admit(v6("2001:db8:0:1::1")).unwrap();
    }
}
