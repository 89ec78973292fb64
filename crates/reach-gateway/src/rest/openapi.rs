//! `GET /v1/openapi.json`: the REST contract (`docs/openapi.yaml`, turned into JSON by
//! `build.rs`), served without authentication.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::extract::RestState;

/// The OpenAPI document, as JSON.
pub const SPEC_JSON: &str = include_str!(concat!(env!("OUT_DIR"), "/openapi.json"));

pub(super) fn routes() -> Router<RestState> {
    Router::new().route("/v1/openapi.json", get(spec))
}

async fn spec() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], SPEC_JSON)
}
