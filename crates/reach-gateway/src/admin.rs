//! The operator endpoints on the admin listener (`server.admin_listen`), without
//! authentication: `/metrics` (Prometheus text), `/healthz` (the process answers), `/readyz`
//! (200 while ready for traffic; 503 once draining, and in a cluster while Redis is away) and
//! `/debug/status` (what this node is and holds, as JSON: build, node id and cluster peers,
//! sockets, users online, services, the webhook queue, open files). The server keeps this
//! listener up through the drain, so `/readyz` can say 503 while sockets close.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::get;

use crate::state::App;

/// The admin router: `/metrics`, `/healthz`, `/readyz`, `/debug/status`.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/debug/status", get(status))
        .with_state(app)
}

/// `/debug/status`: this node at a glance, for an operator's `curl` (the same figures are
/// metrics, for dashboards).
async fn status(State(app): State<Arc<App>>) -> axum::Json<serde_json::Value> {
    let engine = &app.engine;
    let webhooks = &app.metrics.webhooks;
    let open_files = std::fs::read_dir("/proc/self/fd")
        .map(|dir| dir.count())
        .ok();
    axum::Json(serde_json::json!({
        "version": crate::metrics::VERSION,
        "commit": crate::metrics::COMMIT,
        "node_id": app.node_id,
        "cluster": app.cluster.as_ref().map(|c| serde_json::json!({
            "redis_up": c.is_up(),
            "peers": c.peers(),
        })),
        "ready": app.is_ready(),
        "draining": app.shutdown.is_cancelled(),
        "uptime_seconds": app.started.elapsed().as_secs(),
        "sockets": engine.connection_count(),
        "users_online": engine.metrics().online_users.get(),
        "subscriptions": engine.metrics().subscriptions.get(),
        "services": engine.service_count(),
        "webhooks": {
            "queue_depth": webhooks.queue_depth.get(),
            "oldest_pending_age_seconds": webhooks.oldest_age.get(),
            "presence_changes_pending": webhooks.presence_pending.get(),
        },
        "open_files": {
            "open": open_files,
            "limit": crate::admission::open_file_limit(),
        },
    }))
}

async fn metrics(State(app): State<Arc<App>>) -> impl axum::response::IntoResponse {
    app.metrics.ready.set(i64::from(app.is_ready()));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

async fn readyz(State(app): State<Arc<App>>) -> (StatusCode, &'static str) {
    if app.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
