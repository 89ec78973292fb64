//! The drain, when `reachd` gets SIGTERM or SIGINT ([`crate::server::run`] runs it):
//!
//! 1. [`begin`]: `App::shutdown` is cancelled, so the public listener stops accepting, `/readyz`
//!    turns 503, new upgrades are refused with 503 and sockets still waiting for `hello` close
//!    with 1001; then one sweep over the engine's connections tells every authenticated one
//!    [`goodbye`]. A `hello` that attaches after the sweep sees the token and says goodbye to
//!    itself.
//! 2. [`wait`]: the socket tasks (which axum's graceful shutdown does not track once upgraded)
//!    are waited for, at most `server.drain_grace_ms`.
//!
//! The server then leaves the cluster and stops the admin listener, which stayed up throughout.

use std::time::Duration;

use reach_core::Conn;
use reach_proto::{CloseCode, ServerFrame};

use crate::state::App;

/// Starts draining: no new sockets, and every authenticated one is told goodbye.
pub fn begin(app: &App) {
    app.shutdown.cancel();
    // Sockets that have not said hello yet see the token; the others are told here.
    for conn in app.engine.connections() {
        goodbye(app, &conn);
    }
}

/// Tells an authenticated connection that the gateway drains: `goodbye` with a random
/// `retry_after_ms` (so clients do not all come back at once), then close 1001. A second
/// goodbye to the same connection is dropped by its outbox.
pub fn goodbye(app: &App, conn: &Conn) {
    conn.outbox.push_frame(&ServerFrame::Goodbye {
        reason: "draining".into(),
        retry_after_ms: rand::random_range(0..=app.config.server.drain_retry_max_ms),
    });
    conn.outbox.close(CloseCode::GoingAway);
}

/// Waits for the socket tasks to end, at most `server.drain_grace_ms`.
pub async fn wait(app: &App) {
    app.sockets.close();
    let grace = Duration::from_millis(app.config.server.drain_grace_ms);
    if tokio::time::timeout(grace, app.sockets.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = app.sockets.len(),
            "drain grace over; closing the remaining sockets"
        );
    }
}
