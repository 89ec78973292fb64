//! The public listener's accept loop: every connection is admitted (or closed at once) before a
//! byte is read, given TCP_NODELAY, taken through TLS when it is configured, and served as
//! HTTP/1.1 with a header read timeout, so a client that opens connections and sends nothing,
//! or half a request, holds them for `server.header_read_timeout_ms` at most and only within
//! its address's share ([`crate::admission`]).
//!
//! A failed accept (out of file descriptors, usually) is counted, logged at most once a
//! second, and backed off (up to a second) instead of retried in a busy loop. On shutdown the
//! loop stops accepting and every HTTP connection is shut down gracefully: a request in
//! flight completes, an idle kept-alive connection closes. Upgraded sockets are not HTTP
//! connections any more; the drain takes care of them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::admission::Slot;
use crate::state::App;

/// The longest pause after failed accepts.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until the app's shutdown token is cancelled, then waits for
/// the HTTP connections to finish.
pub async fn serve(app: Arc<App>, listener: TcpListener, router: Router) {
    let connections = TaskTracker::new();
    let stop = app.shutdown.clone();
    let mut backoff = Duration::ZERO;
    let mut last_warning: Option<Instant> = None;
    loop {
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
        connections.spawn(connection(
            Arc::clone(&app),
            router.clone(),
            tcp,
            peer,
            slot,
        ));
    }
    connections.close();
    connections.wait().await;
}

/// One accepted connection: TLS if configured, then HTTP.
async fn connection(app: Arc<App>, router: Router, tcp: TcpStream, peer: SocketAddr, slot: Slot) {
    let Some(tls) = app.tls.clone() else {
        return http(app, router, tcp, peer, slot).await;
    };
    let timeout = Duration::from_millis(app.config.server.tls_handshake_timeout_ms);
    match tokio::time::timeout(timeout, tls.acceptor().accept(tcp)).await {
        Ok(Ok(stream)) => http(app, router, stream, peer, slot).await,
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
async fn http<S>(app: Arc<App>, router: Router, stream: S, peer: SocketAddr, slot: Slot)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        // The WebSocket upgrade keeps the connection's slot until `welcome`.
        req.extensions_mut().insert(slot.clone());
        router.clone().oneshot(req)
    });
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
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        }
        () = app.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
