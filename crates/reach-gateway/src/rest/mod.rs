//! The REST surface: Services, their Configuration, Users and Bindings, with the hosted
//! Conversations API's paths, PascalCase form parameters, snake_case JSON, status codes, error
//! body and paging envelope (`docs/rest.md`).
//!
//! - one file per resource, with its routes, handlers and JSON shape: [`services`],
//!   [`configuration`], [`webhooks`] (the service's webhook), [`users`], [`bindings`]; a new
//!   resource is a new file, merged into [`router`];
//! - [`error`]: [`ApiError`] and its JSON body (the WebSocket upgrade's refusals use it too);
//! - [`extract`]: the routes' state, the authenticated context ([`extract::Ctx`]) and the
//!   strict decoding of the path, the query string and the form body;
//! - [`json`]: absolute URLs and timestamps; [`paging`]: list pages;
//! - [`openapi`]: `GET /v1/openapi.json`, the contract of all of the above
//!   (`docs/openapi.yaml`), without authentication.
//!
//! Data flow of a request: the metrics middleware ([`track`]) times it and counts it by route
//! template; the extractors check HTTP Basic credentials and decode the parameters; the handler
//! reads or writes the store, scoped by the service's account (a service of another account is
//! a 404), and then tells the app about every change that subscribed sockets must see:
//!
//! - service created or configuration updated: `App::service_changed` -> `Engine::set_service`
//!   (pushes `service_updated`; enabling publishes the users already online);
//! - service deleted: `App::service_deleted` -> `Engine::remove_service`; user deleted:
//!   `App::user_deleted` -> `Engine::remove_user`;
//! - user updated, binding deleted: `App::user_changed` -> `Engine::update_profile` with the
//!   re-read record (the store bumps the user's revision on both, so `friendlyName`,
//!   `attributes` and `reachabilityNotifiable` changes are published).
//!
//! Writes made with `X-Twilio-Webhook-Enabled: true` record their webhook events in the same
//! store transaction (so an answered write has its event) and wake the deliverer
//! (`App::events_recorded`).
//!
//! In a cluster each `App` method also announces the change on the backplane, and the other
//! nodes re-read the record and do the same for their sockets.

mod bindings;
mod configuration;
mod error;
mod extract;
mod json;
pub mod openapi;
mod paging;
mod services;
mod users;
mod webhooks;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::Response;

pub use error::{ApiError, ApiResult};
pub use extract::Params;
use extract::{Ctx, Rest, RestState};

use crate::state::App;

/// The REST routes under `/v1`, with their 404/405 answers and the request metrics.
pub fn router(app: Arc<App>) -> Router {
    let state = Arc::new(Rest {
        app,
        switch_writes: tokio::sync::Mutex::new(()),
    });
    Router::new()
        .merge(services::routes())
        .merge(configuration::routes())
        .merge(users::routes())
        .merge(bindings::routes())
        .merge(webhooks::routes())
        .merge(openapi::routes())
        // Applies to the routes above only (not to routes merged in later).
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(Arc::clone(&state), track))
        .with_state(state)
}

/// Counts each request by route template (or `unmatched`), method and status, and observes its
/// duration.
async fn track(State(state): State<RestState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = method_label(req.method());
    let started = Instant::now();
    let response = next.run(req).await;
    let metrics = &state.app.metrics;
    metrics
        .http_requests
        .with_label_values(&[route.as_str(), method, response.status().as_str()])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[route.as_str(), method])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// A bounded label: the standard methods, else `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

async fn not_found(ctx: Ctx) -> ApiError {
    ApiError::NotFound(ctx.resource)
}

async fn method_not_allowed(ctx: Ctx, method: Method) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: ctx.resource,
    }
}
