//! The public listener's accept loop: every connection is admitted (or closed at once) before a
//! byte is read, given TCP_NODELAY, taken through TLS when it is configured, and served as
//! HTTP/1.1 with a header read timeout (a plain connection that starts with a WebSocket
//! upgrade request is upgraded without the HTTP server: [`crate::ws::direct`]), so a client
//! that opens connections and sends nothing, or half a request, holds them for
//! `server.header_read_timeout_ms` at most and only within its address's share
//! ([`crate::admission`]).
//!
//! Each connection takes one descriptor of the budget ([`App::open_connections`]) before it
//! is accepted. When the budget is spent, connections wait in the listen backlog for up to
//! half a second for one to be freed (in a reconnect storm the old sockets free theirs as
//! they close), then those that are ready are accepted and closed at once, counted as
//! `open_files`, until a descriptor is free again.
//!
//! A failed accept (out of file descriptors, usually) is counted, logged at most once a
//! second, and backed off (up to a second) instead of retried in a busy loop. On shutdown the
//! loop stops accepting and every HTTP connection is shut down gracefully: a request in
//! flight completes, an idle kept-alive connection closes. Upgraded sockets are not HTTP
//! connections any more; the drain takes care of them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::admission::{Counted, Refused, Slot};
use crate::state::App;

/// The longest pause after failed accepts.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// How long connections wait in the listen backlog for a descriptor of the budget to be freed
/// before they are closed at once.
const DESCRIPTOR_WAIT: Duration = Duration::from_millis(500);

/// Serves `router` on `listener` until the app's shutdown token is cancelled, then waits for
/// the HTTP connections to finish.
pub async fn serve(app: Arc<App>, listener: TcpListener, router: Router) {
    let connections = TaskTracker::new();
    let stop = app.shutdown.clone();
    let mut backoff = Duration::ZERO;
    let mut last_warning: Option<Instant> = None;
    // Set once a wait for a descriptor ran out: connections are then closed at once until
    // one is free again.
    let mut refusing = false;
    loop {
        // The descriptor first: while the budget is spent, connections wait in the listen
        // backlog (a reconnect storm frees descriptors as the old sockets close) for up to
        // DESCRIPTOR_WAIT, then those that are ready are accepted and closed at once.
        let descriptor = match Arc::clone(&app.open_connections).try_acquire_owned() {
            Ok(permit) => {
                refusing = false;
                Some(permit)
            }
            Err(_) if refusing => None,
            Err(_) => tokio::select! {
                permit = Arc::clone(&app.open_connections).acquire_owned() => permit.ok(),
                () = tokio::time::sleep(DESCRIPTOR_WAIT) => {
                    refusing = true;
                    None
                }
                () = stop.cancelled() => break,
            },
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::ZERO;
                pair
            }
            Err(e) => {
                app.metrics.accept_errors.inc();
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    last_warning = Some(Instant::now());
                    tracing::warn!(error = %e, "cannot accept connections; backing off");
                }
                backoff = (backoff * 2)
                    .max(Duration::from_millis(10))
                    .min(MAX_ACCEPT_BACKOFF);
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => break,
                }
                continue;
            }
        };
        let Some(descriptor) = descriptor else {
            app.metrics
                .connections_refused
                .with_label_values(&[Refused::OpenFiles.label()])
                .inc();
            continue;
        };
        let slot = match app.pending.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refused) => {
                app.metrics
                    .connections_refused
                    .with_label_values(&[refused.label()])
                    .inc();
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            // Presence frames are small and must leave at once.
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let stream = Counted::new(tcp, descriptor);
        connections.spawn(connection(
            Arc::clone(&app),
            router.clone(),
            stream,
            peer,
            slot,
        ));
    }
    connections.close();
    connections.wait().await;
}

/// One accepted connection: TLS if configured, then HTTP. A plain connection that starts with
/// a WebSocket upgrade request is upgraded without the HTTP server ([`crate::ws::direct`]).
async fn connection(app: Arc<App>, router: Router, tcp: Counted, peer: SocketAddr, slot: Slot) {
    let header_timeout = Duration::from_millis(app.config.server.header_read_timeout_ms);
    let Some(tls) = app.tls.clone() else {
        let deadline = tokio::time::Instant::now() + header_timeout;
        return match crate::ws::direct(&app, tcp, peer, slot, deadline).await {
            // The first request's head is due by `deadline` still: the header read timeout
            // counts from the accept, as on the other paths.
            crate::ws::Direct::Http(tcp, slot) => {
                http(app, router, tcp, peer, slot, Some(deadline)).await
            }
            crate::ws::Direct::Upgraded | crate::ws::Direct::Closed => {}
        };
    };
    let timeout = Duration::from_millis(app.config.server.tls_handshake_timeout_ms);
    match tokio::time::timeout(timeout, tls.acceptor().accept(tcp)).await {
        Ok(Ok(stream)) => http(app, router, stream, peer, slot, None).await,
        Ok(Err(e)) => {
            app.metrics
                .tls_handshake_failures
                .with_label_values(&["error"])
                .inc();
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            app.metrics
                .tls_handshake_failures
                .with_label_values(&["timeout"])
                .inc();
            tracing::debug!(%peer, "TLS handshake timed out");
        }
    }
}

/// HTTP/1.1 on one connection, with upgrades (the WebSocket endpoint takes the socket).
/// hyper's header read timeout runs from its first read and again after each response;
/// `first_head_by`, when the connection waited before (`ws::direct`), is when its first
/// request's head is due: a connection with no request by then is closed.
async fn http<S>(
    app: Arc<App>,
    router: Router,
    stream: S,
    peer: SocketAddr,
    slot: Slot,
    mut first_head_by: Option<tokio::time::Instant>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let service = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            // The WebSocket upgrade keeps the connection's slot until `welcome`.
            req.extensions_mut().insert(slot.clone());
            let busy = activity.begin();
            let response = router.clone().oneshot(req);
            async move {
                let response = response.await;
                drop(busy);
                response
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(
            app.config.server.header_read_timeout_ms,
        ))
        .keep_alive(true);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let idle = Duration::from_millis(app.config.server.keepalive_idle_timeout_ms);
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            () = app.shutdown.cancelled() => break,
            () = tokio::time::sleep_until(first_head_by.unwrap_or_else(tokio::time::Instant::now)),
                if first_head_by.is_some() =>
            {
                if !activity.started() {
                    tracing::debug!(%peer, "no request within the header read timeout");
                    // Closed, as hyper closes a connection whose head is late.
                    return;
                }
                first_head_by = None;
            }
            () = tokio::time::sleep_until(activity.idle_deadline(idle)) => {
                if activity.idle_since().is_some_and(|since| since.elapsed() >= idle) {
                    break;
                }
            }
        }
    }
    // Shutting down, or kept alive and idle for too long: a request in flight completes, an
    // idle connection closes.
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// Whether an HTTP connection is serving a request, and since when it has not been.
#[derive(Debug, Default)]
struct Activity {
    /// Requests in flight, and when the last one was answered (None before the first).
    state: Mutex<(usize, Option<tokio::time::Instant>)>,
}

impl Activity {
    /// Marks a request in flight until the guard is dropped.
    fn begin(self: &Arc<Self>) -> Busy {
        self.state.lock().expect("activity lock").0 += 1;
        Busy(Arc::clone(self))
    }

    /// Whether a request has reached the service (its head was read).
    fn started(&self) -> bool {
        let state = self.state.lock().expect("activity lock");
        state.0 > 0 || state.1.is_some()
    }

    /// When the connection has been idle (no request in flight) since, if it has served one:
    /// before its first request only the header read timeout applies.
    fn idle_since(&self) -> Option<tokio::time::Instant> {
        match *self.state.lock().expect("activity lock") {
            (0, since) => since,
            _ => None,
        }
    }

    /// When to look again whether the connection has been idle for `idle`.
    fn idle_deadline(&self, idle: Duration) -> tokio::time::Instant {
        match self.idle_since() {
            Some(since) => since + idle,
            None => tokio::time::Instant::now() + idle,
        }
    }
}

struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().expect("activity lock");
        state.0 -= 1;
        state.1 = Some(tokio::time::Instant::now());
    }
}
