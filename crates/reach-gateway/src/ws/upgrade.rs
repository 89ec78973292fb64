//! The route `GET /v1/ws`: checks the upgrade request, negotiates the encoding, takes a
//! connection permit, answers `101` itself and spawns the socket's task on `App::sockets`
//! (so the drain can wait for it). Refusals carry the REST error body ([`ApiError`]).
//!
//! Two paths lead here: the HTTP server's route ([`router`]), and on a plain (not TLS)
//! connection [`direct`], which answers a whole, valid upgrade request without the HTTP
//! server and leaves everything else to it. Both run the same [`check`] and spawn the socket
//! the same way.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use reach_proto::Encoding;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite;
use tokio_util::either::Either;
use tracing::Instrument;

use super::session::{Setup, Start, serve_socket};
use super::socket::{link, stream_over};
use crate::admission::{Counted, Slot};
use crate::metrics;
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

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
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

/// What a valid upgrade request negotiated.
struct Handshake {
    /// `Sec-WebSocket-Accept`.
    accept: String,
    /// The subprotocol chosen, if the client offered any.
    chosen: Option<Encoding>,
}

impl Handshake {
    fn encoding(&self) -> Encoding {
        self.chosen.unwrap_or(Encoding::Json)
    }

    /// The `101`'s header fields, the same on both paths.
    fn fields(&self) -> impl Iterator<Item = (header::HeaderName, &str)> {
        [
            (header::CONNECTION, "upgrade"),
            (header::UPGRADE, "websocket"),
            (header::SEC_WEBSOCKET_ACCEPT, self.accept.as_str()),
        ]
        .into_iter()
        .chain(
            self.chosen
                .map(|enc| (header::SEC_WEBSOCKET_PROTOCOL, enc.subprotocol())),
        )
    }
}

/// The checks of an upgrade request, the same on both paths: the upgrade headers, version 13,
/// a key, a subprotocol this gateway speaks (if any is offered), and a gateway that is not
/// draining.
fn check(app: &App, headers: &HeaderMap) -> Result<Handshake, ApiError> {
    if !header_has_token(headers, header::CONNECTION, "upgrade")
        || !header_has_token(headers, header::UPGRADE, "websocket")
    {
        return Err(ApiError::invalid("expected a WebSocket upgrade request"));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return Err(ApiError::invalid("Sec-WebSocket-Version must be 13"));
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(ApiError::invalid("Sec-WebSocket-Key is missing"));
    };
    let offer: Vec<&str> = headers
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
    Ok(Handshake {
        accept: tungstenite::handshake::derive_accept_key(key.as_bytes()),
        chosen,
    })
}

/// Takes the connection's place under `limits.max_connections` (refused after the upgrade
/// when there is none) and spawns the socket's task over `setup`.
fn spawn_socket(
    app: Arc<App>,
    peer: SocketAddr,
    encoding: Encoding,
    pending: Option<Slot>,
    setup: Setup,
) {
    let permit = Arc::clone(&app.conn_permits).try_acquire_owned().ok();
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
}

fn accept(app: Arc<App>, peer: SocketAddr, mut req: Request) -> Result<Response, ApiError> {
    let handshake = check(&app, req.headers())?;
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
        limits_app
            .metrics
            .upgrades
            .with_label_values(&[metrics::UPGRADE_HTTP])
            .inc();
        let (link, read) = link(upgraded);
        let ws = stream_over(link, read.to_vec(), Bytes::new(), &limits_app.config.limits).await;
        Some(Box::new(ws))
    });
    spawn_socket(app, peer, handshake.encoding(), pending, setup);
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    for (name, value) in handshake.fields() {
        h.insert(
            name,
            HeaderValue::from_str(value).expect("tokens and base64 are valid header values"),
        );
    }
    Ok(resp)
}

/// The most a plain connection's first bytes are looked at for an upgrade request
/// ([`direct`]); a longer request head (large cookies, say) goes through the HTTP server.
const DIRECT_HEAD: usize = 4096;
/// The most header fields an upgrade request on the direct path may have.
const DIRECT_HEADERS: usize = 32;

/// How [`direct`] left a plain connection.
pub(crate) enum Direct {
    /// Upgraded: the socket's task has the connection.
    Upgraded,
    /// Not a WebSocket upgrade this path answers: the HTTP server is to serve the connection,
    /// which nothing has been read from.
    Http(Counted, Slot),
    /// Nothing arrived before `deadline`, the client went away, or the `101` could not be
    /// written: the connection is closed.
    Closed,
}

/// The WebSocket upgrade of a plain connection, without the HTTP server: looks at the
/// client's first bytes without taking them (`peek`), and when they hold a whole `GET /v1/ws`
/// request that passes [`check`], takes exactly that request, writes the `101` and spawns the
/// socket's task; its frames (even ones sent with the request) stay in the connection for the
/// socket's stream. Anything else (another request, a refusal, a partial or long head, a body)
/// is left to the HTTP server untouched, which answers it as it always does, refusals
/// included. Saves a churning gateway the HTTP connection's machinery per socket.
pub(crate) async fn direct(
    app: &Arc<App>,
    mut tcp: Counted,
    peer: SocketAddr,
    slot: Slot,
    deadline: tokio::time::Instant,
) -> Direct {
    let mut head = vec![0u8; DIRECT_HEAD];
    let peeked = tokio::select! {
        peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut head)) => peeked,
        // Draining: a connection that has asked for nothing yet is closed at once (as hyper
        // closes an idle one), so it does not hold the drain for the header read timeout.
        () = app.shutdown.cancelled() => return Direct::Closed,
    };
    let n = match peeked {
        Ok(Ok(n)) if n > 0 => n,
        // The client closed, or sent nothing within the header read timeout.
        _ => return Direct::Closed,
    };
    let Some((len, handshake)) = direct_request(app, &head[..n]) else {
        return Direct::Http(tcp, slot);
    };
    // The request is already there (peeked): this takes it and nothing after it.
    let taken = tokio::time::timeout_at(deadline, tcp.read_exact(&mut head[..len])).await;
    if !matches!(taken, Ok(Ok(_))) {
        return Direct::Closed;
    }
    let mut response = String::from("HTTP/1.1 101 Switching Protocols\r\n");
    for (name, value) in handshake.fields() {
        response.push_str(name.as_str());
        response.push_str(": ");
        response.push_str(value);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    let written = tokio::time::timeout_at(deadline, tcp.write_all(response.as_bytes())).await;
    if !matches!(written, Ok(Ok(()))) {
        return Direct::Closed;
    }
    drop(head);
    app.metrics
        .upgrades
        .with_label_values(&[metrics::UPGRADE_DIRECT])
        .inc();
    let ws = stream_over(
        Either::Left(tcp),
        Vec::new(),
        Bytes::new(),
        &app.config.limits,
    );
    let setup: Setup = Box::pin(async move { Some(Box::new(ws.await)) });
    spawn_socket(
        Arc::clone(app),
        peer,
        handshake.encoding(),
        Some(slot),
        setup,
    );
    Direct::Upgraded
}

/// The length of the upgrade request at the start of `bytes` and what it negotiated, when
/// `bytes` start with a whole HTTP/1.1 `GET /v1/ws` request without a body that passes
/// [`check`]; `None` sends the connection to the HTTP server.
fn direct_request(app: &App, bytes: &[u8]) -> Option<(usize, Handshake)> {
    let mut fields = [httparse::EMPTY_HEADER; DIRECT_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let httparse::Status::Complete(len) = req.parse(bytes).ok()? else {
        return None;
    };
    // Only what hyper would take as it is: an ASCII target (hyper refuses others).
    let path = req.path.filter(|p| p.is_ascii())?;
    let route = path.split_once('?').map_or(path, |(route, _)| route);
    if req.method != Some("GET") || req.version != Some(1) || route != "/v1/ws" {
        return None;
    }
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for field in req.headers.iter() {
        let name = header::HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            return None;
        }
        headers.append(name, HeaderValue::from_bytes(field.value).ok()?);
    }
    let handshake = check(app, &headers).ok()?;
    Some((len, handshake))
}
