//! The operator endpoints on the admin listener (`server.admin_listen`), without
//! authentication: `/metrics` (Prometheus text), `/healthz` (the process answers) and `/readyz`
//! (200 while ready for traffic; 503 once draining, and in a cluster while Redis is away). The
//! server keeps this listener up through the drain, so `/readyz` can say 503 while sockets
//! close.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::get;

use crate::state::App;

/// The admin router: `/metrics`, `/healthz`, `/readyz`.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(app)
}

async fn metrics(State(app): State<Arc<App>>) -> impl axum::response::IntoResponse {
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
