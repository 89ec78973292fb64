//! The route `GET /v1/ws`: checks the upgrade request, negotiates the encoding, takes a
//! connection permit, answers `101` itself and spawns the socket's task on `App::sockets`
//! (so the drain can wait for it). Refusals carry the REST error body ([`ApiError`]).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use reach_proto::Encoding;
use tokio_tungstenite::tungstenite;
use tracing::Instrument;

use super::session::{Setup, Start, serve_socket};
use super::socket::{link, stream_over};
use crate::admission::Slot;
use crate::rest::ApiError;
use crate::state::App;

/// The WebSocket route. Another method than GET is a 405 with the error body, as on the
/// REST routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/ws", get(upgrade))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: "/ws".into(),
    }
}

fn header_has_token(req: &Request, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

async fn upgrade(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    match accept(app, peer, req) {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

fn accept(app: Arc<App>, peer: SocketAddr, mut req: Request) -> Result<Response, ApiError> {
    if !header_has_token(&req, header::CONNECTION, "upgrade")
        || !header_has_token(&req, header::UPGRADE, "websocket")
    {
        return Err(ApiError::invalid("expected a WebSocket upgrade request"));
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return Err(ApiError::invalid("Sec-WebSocket-Version must be 13"));
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return Err(ApiError::invalid("Sec-WebSocket-Key is missing"));
    };
    let offer: Vec<&str> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let offer = (!offer.is_empty()).then(|| offer.join(","));
    let chosen =
        Encoding::negotiate(offer.as_deref()).map_err(|e| ApiError::invalid(e.to_string()))?;
    if app.shutdown.is_cancelled() {
        return Err(ApiError::Draining);
    }
    let encoding = chosen.unwrap_or(Encoding::Json);
    let permit = Arc::clone(&app.conn_permits).try_acquire_owned().ok();
    // The connection stays pending (capped per address) until its socket is welcomed.
    let pending = req.extensions_mut().remove::<Slot>();
    let on_upgrade = hyper::upgrade::on(&mut req);
    // The upgrade and the stream's construction run boxed, and are gone once done: an idle
    // socket's task keeps only the session's loop (see docs/benchmarks.md, memory).
    let limits_app = Arc::clone(&app);
    let setup: Setup = Box::pin(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return None;
            }
        };
        let (link, read) = link(upgraded);
        let ws = stream_over(link, read.to_vec(), &limits_app.config.limits).await;
        Some(Box::new(ws))
    });
    let task = serve_socket(Box::new(Start {
        app: Arc::clone(&app),
        setup,
        encoding,
        permit,
        pending,
        peer: peer.ip(),
    }))
    .instrument(tracing::info_span!("ws", %peer, conn = tracing::field::Empty));
    app.sockets.spawn(task);
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header"),
    );
    if let Some(enc) = chosen {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(enc.subprotocol()),
        );
    }
    Ok(resp)
}
