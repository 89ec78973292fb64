//! The WebSocket endpoint `/v1/ws` (protocol v1, `docs/protocol.md`).
//!
//! One task per socket. Before `hello` the task writes to the socket directly; after it, the
//! connection has an [`Outbox`](reach_core::Outbox) in the engine and the task runs one loop
//! over one future per wake-up (`Session::next_io`, one unsplit stream): the outbox's replies
//! and pushes (written in batches, flushed once per batch), then the session's deadlines
//! (server pings, heartbeat timeout, token warning and expiry, write stall: registered with
//! the gateway's shared [`Timers`](crate::timers)), then the socket's reads. The drain
//! reaches sessions through their outboxes ([`goodbye`]). So an idle socket's task waits on
//! its socket and outbox only: no timer, no channel, no split lock of its own.
//!
//! Writes are pulled from the outbox only when the socket is ready to take them, so a wake-up
//! that ends in a read or a deadline never loses a frame. A socket whose writes make no progress for
//! `write_stall_timeout_ms`, or whose outbox passes `max_outbox_bytes`, is closed with 4009.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use reach_core::{Attach, Conn, Outgoing, SlotFrame, UserKey};
use reach_proto::{
    ClientFrame, CloseCode, DecodeError, Encoding, ErrorCode, IdentityError, ServerFrame,
    decode_client, encode,
};
use reach_store::{Service, StoreError};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tracing::Instrument;

use crate::app::{App, profile_of};
use crate::auth::{MAX_IDENTITY_LEN, TokenError, TokenGrant, verify_token};

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Push binding types a client may register.
pub const BINDING_TYPES: [&str; 3] = ["apn", "gcm", "fcm"];
const MAX_ADDRESS_LEN: usize = 1024;
/// How long a closing handshake may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

pub fn router(app: Arc<App>) -> Router {
    Router::new().route("/v1/ws", get(upgrade)).with_state(app)
}

fn http_error(status: StatusCode, code: u32, message: &str) -> Response {
    let body = serde_json::json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status.as_u16(),
    });
    (status, axum::Json(body)).into_response()
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
    mut req: Request,
) -> Response {
    if !header_has_token(&req, header::CONNECTION, "upgrade")
        || !header_has_token(&req, header::UPGRADE, "websocket")
    {
        return http_error(
            StatusCode::BAD_REQUEST,
            20001,
            "expected a WebSocket upgrade request",
        );
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return http_error(
            StatusCode::BAD_REQUEST,
            20001,
            "Sec-WebSocket-Version must be 13",
        );
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return http_error(
            StatusCode::BAD_REQUEST,
            20001,
            "Sec-WebSocket-Key is missing",
        );
    };
    let offer: Vec<&str> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let offer = (!offer.is_empty()).then(|| offer.join(","));
    let chosen = match Encoding::negotiate(offer.as_deref()) {
        Ok(c) => c,
        Err(()) => {
            return http_error(
                StatusCode::BAD_REQUEST,
                20001,
                "unsupported subprotocol: offer reach.v1.msgpack or reach.v1.json",
            );
        }
    };
    if app.shutdown.is_cancelled() {
        return http_error(
            StatusCode::SERVICE_UNAVAILABLE,
            20503,
            "the gateway is draining",
        );
    }
    let encoding = chosen.unwrap_or(Encoding::Json);
    let permit = Arc::clone(&app.conn_permits).try_acquire_owned().ok();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let task_app = Arc::clone(&app);
    app.sockets.spawn(
        async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade failed");
                    return;
                }
            };
            let ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                // Built here, not captured: a captured value stays in the task for its life.
                Some(ws_config(&task_app)),
            )
            .await;
            let _permit = permit.as_ref();
            // Boxed: the stream (~330 bytes) would otherwise widen every socket's task.
            serve_socket(task_app, Box::new(ws), encoding, permit.is_some()).await;
        }
        .instrument(tracing::info_span!("ws", %peer, conn = tracing::field::Empty)),
    );
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
    resp
}

fn ws_config(app: &App) -> WebSocketConfig {
    let limits = &app.config.limits;
    let config = WebSocketConfig::default()
        .read_buffer_size(limits.read_buffer_bytes)
        .max_message_size(Some(hard_frame_limit(limits.max_frame_bytes)))
        .max_frame_size(Some(hard_frame_limit(limits.max_frame_bytes)));
    match limits.write_fragment_bytes {
        // Whole messages, written once per batch (tungstenite's default buffer target).
        0 => config,
        // Written as soon as a fragment's worth is buffered: the buffer's high-water mark
        // stays near two fragments.
        n => config.write_buffer_size(n),
    }
}

/// How a socket ended, for the close-reason metric and the presence rules.
#[derive(Debug, Clone, Copy)]
enum End {
    /// We close with this code.
    Close(CloseCode),
    /// Internal error (close 1011).
    Internal,
    /// The client closed (close frame or EOF) or the transport failed.
    Gone(&'static str),
}

impl End {
    fn label(self) -> &'static str {
        match self {
            End::Close(c) => c.label(),
            End::Internal => "internal_error",
            End::Gone(l) => l,
        }
    }
}

/// Queues one message, as WebSocket fragments of at most `fragment` bytes when it is longer
/// (`limits.write_fragment_bytes`; 0: whole). Fragments of one message are queued back to
/// back; RFC 6455 lets control frames (pings, pongs) come between them, nothing else.
fn send_message(
    ws: &mut Socket,
    mut rest: Bytes,
    encoding: Encoding,
    fragment: usize,
) -> Result<(), tungstenite::Error> {
    if fragment == 0 || rest.len() <= fragment {
        return ws.start_send_unpin(message(rest, encoding));
    }
    let mut op = OpCode::Data(match encoding {
        Encoding::MsgPack => Data::Binary,
        Encoding::Json => Data::Text,
    });
    while !rest.is_empty() {
        let chunk = rest.split_to(fragment.min(rest.len()));
        let fin = rest.is_empty();
        ws.start_send_unpin(Message::Frame(Frame::message(chunk, op, fin)))?;
        op = OpCode::Data(Data::Continue);
    }
    Ok(())
}

fn message(bytes: Bytes, encoding: Encoding) -> Message {
    match encoding {
        Encoding::MsgPack => Message::Binary(bytes),
        Encoding::Json => match Utf8Bytes::try_from(bytes) {
            Ok(text) => Message::Text(text),
            // JSON from serde_json is UTF-8; this arm is unreachable in practice.
            Err(_) => Message::Text(Utf8Bytes::from_static("{}")),
        },
    }
}

fn error_frame(id: Option<i64>, code: ErrorCode, message: impl Into<String>) -> ServerFrame {
    ServerFrame::Error {
        id,
        code: code.as_u32(),
        message: message.into(),
    }
}

/// What one read from the socket produced.
enum Read {
    Frame(ClientFrame),
    /// A control frame or something else that needs no action.
    Nothing,
    /// Bad input: send this error, then close with this code.
    Fail(ErrorCode, String, CloseCode),
    Gone(&'static str),
}

fn too_big(len: usize, max: usize) -> Read {
    Read::Fail(
        ErrorCode::FrameTooBig,
        format!("frame of {len} bytes exceeds max_frame_bytes ({max})"),
        CloseCode::TooBig,
    )
}

/// Where tungstenite itself stops reading a message. Messages between `max_frame_bytes` and
/// this are read whole and refused by [`classify`] (error 20413, close 1009), which leaves the
/// socket clean so the client receives both; past this the connection is cut at the header.
fn hard_frame_limit(max_frame_bytes: usize) -> usize {
    max_frame_bytes.saturating_mul(4).max(1 << 20)
}

fn classify(
    item: Option<Result<Message, tungstenite::Error>>,
    encoding: Encoding,
    max_frame: usize,
) -> Read {
    if let Some(Ok(Message::Text(t))) = &item
        && t.len() > max_frame
    {
        return too_big(t.len(), max_frame);
    }
    if let Some(Ok(Message::Binary(b))) = &item
        && b.len() > max_frame
    {
        return too_big(b.len(), max_frame);
    }
    let payload = match item {
        None => return Read::Gone("client_gone"),
        Some(Ok(Message::Text(t))) => {
            if encoding != Encoding::Json {
                let e = DecodeError::WrongMessageKind("reach.v1.msgpack", "binary");
                return Read::Fail(e.code(), e.to_string(), e.close_code());
            }
            Bytes::from(t)
        }
        Some(Ok(Message::Binary(b))) => {
            if encoding != Encoding::MsgPack {
                let e = DecodeError::WrongMessageKind("reach.v1.json", "text");
                return Read::Fail(e.code(), e.to_string(), e.close_code());
            }
            b
        }
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => return Read::Nothing,
        Some(Ok(Message::Close(_))) => return Read::Gone("client_closed"),
        Some(Err(tungstenite::Error::Capacity(e))) => {
            return Read::Fail(
                ErrorCode::FrameTooBig,
                format!("frame too big: {e}"),
                CloseCode::TooBig,
            );
        }
        Some(Err(tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ))) => return Read::Gone("client_gone"),
        Some(Err(tungstenite::Error::Protocol(e))) => {
            return Read::Fail(
                ErrorCode::MalformedFrame,
                format!("WebSocket protocol error: {e}"),
                CloseCode::ProtocolError,
            );
        }
        Some(Err(tungstenite::Error::Utf8(e))) => {
            return Read::Fail(
                ErrorCode::MalformedFrame,
                format!("text frame is not UTF-8: {e}"),
                CloseCode::ProtocolError,
            );
        }
        Some(Err(_)) => return Read::Gone("transport_error"),
    };
    match decode_client(&payload, encoding) {
        Ok(frame) => Read::Frame(frame),
        Err(e) => Read::Fail(e.code(), e.to_string(), e.close_code()),
    }
}

/// Sends `frame` (if any) and a close frame directly, then waits briefly for the peer's close.
async fn close_direct(
    ws: &mut Socket,
    encoding: Encoding,
    frame: Option<ServerFrame>,
    code: u16,
    reason: &str,
) {
    let reason = reason.chars().take(100).collect::<String>();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if let Some(f) = frame {
            ws.feed(message(encode(&f, encoding), encoding)).await?;
        }
        ws.send(Message::Close(Some(CloseFrame {
            code: code.into(),
            reason: reason.into(),
        })))
        .await?;
        // Wait for the peer's close so the TCP connection ends cleanly.
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
        Ok::<(), tungstenite::Error>(())
    })
    .await;
}

async fn serve_socket(app: Arc<App>, mut ws: Box<Socket>, encoding: Encoding, admitted: bool) {
    let m = &app.metrics;
    m.connections.inc();
    m.connections_opened.inc();
    // Everything but the session loop runs in boxed futures that are gone once they finish:
    // an idle socket's task then holds only the session and its loop (an async fn's layout
    // reserves room for every phase it awaits inline; see docs/benchmarks.md, memory).
    let prepared = Box::pin(prepare(&app, &mut ws, encoding, admitted)).await;
    let end = match prepared {
        Ok(mut session) => {
            let end = session.run(&mut ws).await;
            Box::pin(session.finish(&mut ws, end)).await;
            end
        }
        Err(end) => end,
    };
    if let End::Gone("client_closed") = end {
        // tungstenite queued the reply to the client's close frame: send it, completing the
        // closing handshake (else the client sees 1006).
        let _ = Box::pin(tokio::time::timeout(CLOSE_TIMEOUT, ws.flush())).await;
    }
    m.connections.dec();
    m.connections_closed.with_label_values(&[end.label()]).inc();
    tracing::debug!(reason = end.label(), "socket closed");
}

/// Admission, `hello` and the session's start; on failure the socket is closed here and the
/// end is returned.
async fn prepare(
    app: &Arc<App>,
    ws: &mut Socket,
    encoding: Encoding,
    admitted: bool,
) -> Result<Box<Session>, End> {
    if !admitted {
        let f = error_frame(None, ErrorCode::TooMany, "too many connections");
        close_direct(ws, encoding, Some(f), 4029, "too many connections").await;
        return Err(End::Close(CloseCode::RateLimited));
    }
    let (grant, service) = await_hello(app, ws, encoding).await?;
    match Session::start(app, grant, service, encoding).await {
        // Boxed, so the task does not keep both this result and the session.
        Ok(session) => Ok(Box::new(session)),
        Err(()) => {
            let f = error_frame(None, ErrorCode::Internal, "internal error; retry later");
            close_direct(ws, encoding, Some(f), 1011, "internal error").await;
            Err(End::Internal)
        }
    }
}

/// Waits for `hello`, verifies its token and service. On failure the socket is closed here.
async fn await_hello(
    app: &Arc<App>,
    ws: &mut Socket,
    encoding: Encoding,
) -> Result<(TokenGrant, Arc<Service>), End> {
    let deadline = Instant::now() + app.config.auth_timeout();
    loop {
        let read = tokio::select! {
            item = ws.next() => classify(item, encoding, app.config.limits.max_frame_bytes),
            _ = tokio::time::sleep_until(deadline) => {
                let f = error_frame(None, ErrorCode::Timeout, "no hello within auth_timeout");
                close_direct(ws, encoding, Some(f), 4001, "no hello").await;
                app.metrics.auth_failures.with_label_values(&["auth_timeout"]).inc();
                return Err(End::Close(CloseCode::Unauthorized));
            }
            _ = app.shutdown.cancelled() => {
                close_direct(ws, encoding, None, 1001, "draining").await;
                return Err(End::Close(CloseCode::GoingAway));
            }
        };
        app.metrics.frames_received.inc();
        match read {
            Read::Nothing => continue,
            Read::Gone(label) => return Err(End::Gone(label)),
            Read::Fail(code, msg, close) => {
                close_direct(
                    ws,
                    encoding,
                    Some(error_frame(None, code, msg)),
                    close.as_u16(),
                    "bad frame",
                )
                .await;
                return Err(End::Close(close));
            }
            Read::Frame(ClientFrame::Hello { token, .. }) => {
                let result = match verify_token(&app.creds, &token, reach_store::now_unix()) {
                    Ok(grant) => match app.find_service(&grant.service_sid).await {
                        Ok(service) if service.account_sid == grant.account_sid => {
                            Ok((grant, service))
                        }
                        Ok(_) => Err(TokenError::WrongAccount),
                        Err(StoreError::NotFound) => Err(TokenError::UnknownService),
                        Err(e) => {
                            tracing::warn!(
                                error = %e,
                                service = %grant.service_sid,
                                identity = %grant.identity,
                                "store failure during hello"
                            );
                            let f = error_frame(
                                None,
                                ErrorCode::Internal,
                                "internal error; retry later",
                            );
                            close_direct(ws, encoding, Some(f), 1011, "internal error").await;
                            return Err(End::Internal);
                        }
                    },
                    Err(e) => Err(e),
                };
                return match result {
                    Ok(ok) => Ok(ok),
                    Err(e) => {
                        app.metrics
                            .auth_failures
                            .with_label_values(&[e.label()])
                            .inc();
                        let f = error_frame(None, e.code(), e.to_string());
                        close_direct(ws, encoding, Some(f), 4001, "unauthorized").await;
                        Err(End::Close(CloseCode::Unauthorized))
                    }
                };
            }
            Read::Frame(other) => {
                let f = error_frame(
                    other.id(),
                    ErrorCode::UnexpectedFrame,
                    "the first frame must be hello",
                );
                close_direct(ws, encoding, Some(f), 4002, "hello expected").await;
                return Err(End::Close(CloseCode::ProtocolError));
            }
        }
    }
}

/// Tells an authenticated connection that the gateway drains: `goodbye` with a random
/// `retry_after_ms` (so clients do not all come back at once), then close 1001. Called for
/// every connection when the drain starts; sockets hold no per-socket wait for it.
pub(crate) fn goodbye(app: &App, conn: &Conn) {
    conn.outbox.push_frame(&ServerFrame::Goodbye {
        reason: "draining".into(),
        retry_after_ms: rand::random_range(0..=app.config.server.drain_retry_max_ms),
    });
    conn.outbox.close(CloseCode::GoingAway);
}

/// Unix seconds -> a tokio instant (clamped to now for the past).
fn instant_at(unix: i64) -> Instant {
    let delta = unix - reach_store::now_unix();
    Instant::now() + Duration::from_secs(delta.max(0) as u64)
}

/// Write-side bookkeeping that survives across wake-ups.
#[derive(Default)]
struct WriteState {
    /// Frames written to the sink but not flushed yet.
    dirty: bool,
    /// Since when the socket has refused to take more bytes.
    blocked_since: Option<Instant>,
    ping_due: bool,
}

/// The users a connection watches: the engine's keys (sharing the presence map's
/// allocations), sorted by identity (a connection watches users of its own service), 16 bytes
/// each; searched by identity without building a key.
#[derive(Default)]
struct Watched(Vec<UserKey>);

impl Watched {
    fn find(&self, identity: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|k| k.identity().cmp(identity))
    }

    fn contains(&self, identity: &str) -> bool {
        self.find(identity).is_ok()
    }

    fn insert(&mut self, key: UserKey) {
        if let Err(at) = self.find(key.identity()) {
            self.0.insert(at, key);
        }
    }

    fn remove(&mut self, identity: &str) -> bool {
        match self.find(identity) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// An authenticated connection. Kept small: every idle socket holds one (its identity and
/// service are in `conn`'s key, the service record is shared).
struct Session {
    app: Arc<App>,
    conn: Arc<Conn>,
    service: Arc<Service>,
    /// The current token's push credential (for `register_push`).
    push_credential_sid: Option<Box<str>>,
    /// The current token's expiry (unix seconds).
    token_expires_at: i64,
    /// Identities subscribed to besides the connection's own.
    /// (The engine's keys: their text is shared with the presence map.)
    watched: Watched,
    last_heard: Instant,
    /// The tick this session is registered at with the shared timers, if still to come.
    armed: Option<u64>,
    next_ping: Instant,
    expires_at: Instant,
    warn_at: Option<Instant>,
    bye: bool,
    /// The socket's read side must be polled: it has not returned `Pending` since it was last
    /// woken (reads are polled with the connection as waker, see `next_io`).
    must_read: bool,
}

impl Session {
    /// Registers the connection in the engine and queues `welcome`.
    async fn start(
        app: &Arc<App>,
        grant: TokenGrant,
        service: Arc<Service>,
        encoding: Encoding,
    ) -> Result<Session, ()> {
        let started = std::time::Instant::now();
        let engine = &app.engine;
        let conn = engine.new_conn(&service.sid, &grant.identity, encoding);
        let connection_id = reach_store::new_sid("CN");
        tracing::Span::current().record("conn", connection_id.as_str());
        tracing::debug!(
            identity = %grant.identity,
            service = %service.sid,
            "authenticated"
        );
        let slot = conn.outbox.reserve(SlotFrame::Welcome {
            connection_id,
            identity: grant.identity.clone(),
            service_sid: service.sid.clone(),
            reachability_enabled: engine.service(&service.sid).enabled,
            heartbeat_interval_ms: app.config.presence.heartbeat_interval_ms,
            token_expires_at: grant.expires_at,
            user: None,
        });
        // The connection is not registered yet (`attach` does that), so no drain or delete
        // can have closed its outbox.
        let Some(slot) = slot else { return Err(()) };
        let (fill, new_epoch) = engine.attach(&conn, slot);
        if fill == Attach::NeedsProfile {
            match app
                .store
                .get_or_create_user(&service, &grant.identity)
                .await
            {
                Ok(rec) if rec.identity == grant.identity => {
                    engine.load_profile(&service.sid, &grant.identity, profile_of(&rec));
                    engine.fill(&conn, &grant.identity, slot);
                }
                other => {
                    if let Err(e) = other {
                        tracing::warn!(
                            error = %e,
                            service = %service.sid,
                            identity = %grant.identity,
                            "cannot load the user at hello"
                        );
                    }
                    engine.detach(&conn, &[], false);
                    return Err(());
                }
            }
        }
        if let Some(epoch) = new_epoch
            && let Err(e) = app
                .store
                .mark_online(&service.sid, &grant.identity, epoch)
                .await
        {
            tracing::warn!(
                error = %e,
                service = %service.sid,
                identity = %grant.identity,
                "cannot record the user online"
            );
        }
        conn.outbox.seal(slot);
        app.metrics
            .hello_duration
            .observe(started.elapsed().as_secs_f64());
        let now = Instant::now();
        let mut s = Session {
            app: Arc::clone(app),
            conn,
            service,
            watched: Watched::default(),
            last_heard: now,
            armed: None,
            next_ping: now + app.config.heartbeat_interval(),
            expires_at: now,
            warn_at: None,
            bye: false,
            must_read: true,
            push_credential_sid: grant.push_credential_sid.map(String::into_boxed_str),
            token_expires_at: grant.expires_at,
        };
        s.set_expiry();
        if app.shutdown.is_cancelled() {
            // The drain's sweep over the engine's connections may have run before this one
            // attached; it is told here instead (a second goodbye is dropped by the outbox).
            goodbye(app, &s.conn);
        }
        Ok(s)
    }

    fn set_expiry(&mut self) {
        self.expires_at = instant_at(self.token_expires_at);
        let warn = self.token_expires_at - self.app.config.presence.token_warning_s as i64;
        self.warn_at = Some(instant_at(warn));
    }

    fn push(&self, frame: &ServerFrame) {
        self.conn.outbox.push_frame(frame);
    }

    fn fail(&self, code: ErrorCode, msg: impl Into<String>, close: CloseCode) {
        self.push(&error_frame(None, code, msg));
        self.conn.outbox.close(close);
    }

    fn next_deadline(&self, w: &WriteState) -> Instant {
        let stall = Duration::from_millis(self.app.config.limits.write_stall_timeout_ms);
        let mut d = self
            .next_ping
            .min(self.last_heard + self.app.config.heartbeat_timeout())
            .min(self.expires_at);
        if let Some(warn) = self.warn_at {
            d = d.min(warn);
        }
        if let Some(b) = w.blocked_since {
            d = d.min(b + stall);
        }
        d
    }

    /// The main loop; returns how the connection ends.
    async fn run(&mut self, ws: &mut Socket) -> End {
        let mut w = WriteState::default();
        let encoding = self.conn.outbox.encoding();
        loop {
            let item = match self.next_io(ws, &mut w).await {
                Io::Closing(Ok(code)) => return End::Close(code),
                Io::Closing(Err(_)) => return End::Gone("transport_error"),
                Io::Timer => {
                    // The registration that fired is the armed one (or a later, stale one).
                    if self.armed.is_some_and(|t| self.app.timers.passed(t)) {
                        self.armed = None;
                    }
                    if let Some(end) = self.tick(&mut w) {
                        return end;
                    }
                    continue;
                }
                Io::Read(item) => item,
            };
            self.last_heard = Instant::now();
            self.app.metrics.frames_received.inc();
            match classify(item, encoding, self.app.config.limits.max_frame_bytes) {
                Read::Nothing => {}
                Read::Gone(label) => return End::Gone(label),
                Read::Fail(code, msg, close) => self.fail(code, msg, close),
                // Boxed: a frame's handling (store calls) lives on the heap only while it
                // runs, instead of widening every idle socket's task.
                Read::Frame(frame) => Box::pin(self.handle(frame)).await,
            }
        }
    }

    /// The socket's next event, all in one future over one unsplit stream: first writes what
    /// the outbox holds while the socket takes it (flushed once per batch), then arms the
    /// shared timer for the next deadline and checks whether it fired, then reads. Reads are
    /// polled with the connection as waker (`Conn` is `Wake`): their readiness reaches the
    /// task through the outbox as a read event, so a wake-up for writes alone (every
    /// delivery) does not poll the read side again.
    fn next_io<'a>(
        &'a mut self,
        ws: &'a mut Socket,
        w: &'a mut WriteState,
    ) -> impl Future<Output = Io> + 'a {
        std::future::poll_fn(move |cx| {
            if let Poll::Ready(r) = poll_write(ws, &self.conn, w, &self.app, cx) {
                return Poll::Ready(Io::Closing(r));
            }
            self.arm(w);
            let events = self.conn.outbox.take_events(cx.waker());
            self.must_read |= events.read;
            if events.timer {
                return Poll::Ready(Io::Timer);
            }
            if !self.must_read {
                return Poll::Pending;
            }
            let waker = Waker::from(Arc::clone(&self.conn));
            match ws.poll_next_unpin(&mut Context::from_waker(&waker)) {
                Poll::Pending => {
                    self.must_read = false;
                    Poll::Pending
                }
                read => read.map(Io::Read),
            }
        })
    }

    /// Registers the session with the shared timers for its next deadline, unless an earlier
    /// or equal registration is still to come (a later one left behind by a deadline that
    /// moved earlier only causes a check that finds nothing due). `armed` is cleared when its
    /// tick fires (`Io::Timer`), so this reads no clock: it runs on every wake-up.
    fn arm(&mut self, w: &WriteState) {
        let timers = &self.app.timers;
        let tick = timers.tick_of(self.next_deadline(w));
        if self.armed.is_none_or(|t| tick < t) {
            timers.arm(tick, &self.conn);
            self.armed = Some(tick);
        }
    }

    /// Timers; returns an end when the socket must go now.
    fn tick(&mut self, w: &mut WriteState) -> Option<End> {
        let now = Instant::now();
        let stall = Duration::from_millis(self.app.config.limits.write_stall_timeout_ms);
        if w.blocked_since.is_some_and(|b| now >= b + stall) {
            // The socket takes nothing: no error frame could reach the client.
            return Some(End::Close(CloseCode::SlowConsumer));
        }
        if now >= self.last_heard + self.app.config.heartbeat_timeout() {
            self.app.metrics.heartbeat_timeouts.inc();
            self.fail(
                ErrorCode::Timeout,
                "nothing heard within heartbeat_timeout",
                CloseCode::HeartbeatTimeout,
            );
            self.last_heard = now;
            return None;
        }
        if now >= self.expires_at {
            self.app
                .metrics
                .auth_failures
                .with_label_values(&["expired"])
                .inc();
            self.fail(
                ErrorCode::TokenExpired,
                "the access token has expired",
                CloseCode::Unauthorized,
            );
            self.expires_at = now + Duration::from_secs(3600);
            self.warn_at = None;
            return None;
        }
        if self.warn_at.is_some_and(|t| now >= t) {
            self.warn_at = None;
            self.push(&ServerFrame::TokenAboutToExpire {
                expires_at: self.token_expires_at,
            });
        }
        if now >= self.next_ping {
            w.ping_due = true;
            self.next_ping = now + self.app.config.heartbeat_interval();
        }
        None
    }

    async fn handle(&mut self, frame: ClientFrame) {
        match frame {
            ClientFrame::Hello { .. } => {
                self.fail(
                    ErrorCode::UnexpectedFrame,
                    "hello was already received",
                    CloseCode::ProtocolError,
                );
            }
            ClientFrame::Ping { id } => self.push(&ServerFrame::Pong { id }),
            ClientFrame::Subscribe { id, identities } => self.subscribe(id, identities).await,
            ClientFrame::Unsubscribe { id, identities } => {
                for identity in identities {
                    if self.watched.remove(identity.as_str()) {
                        self.app.engine.unsubscribe(&self.conn, &identity);
                    }
                }
                self.push(&ServerFrame::Unsubscribed { id });
            }
            ClientFrame::UpdateToken { id, token } => self.update_token(id, &token),
            ClientFrame::RegisterPush {
                id,
                binding_type,
                address,
            } => {
                self.register_push(id, &binding_type, &address).await;
            }
            ClientFrame::UnregisterPush {
                id,
                binding_type,
                address,
            } => {
                self.unregister_push(id, &binding_type, &address).await;
            }
            ClientFrame::Bye => {
                self.bye = true;
                self.conn.outbox.close(CloseCode::Normal);
            }
        }
    }

    async fn subscribe(&mut self, id: i64, identities: Vec<String>) {
        let engine = Arc::clone(&self.app.engine);
        let outbox = &self.conn.outbox;
        let Some(slot) = outbox.reserve(SlotFrame::Subscribed {
            id,
            users: vec![],
            errors: vec![],
        }) else {
            return;
        };
        let limit = self.app.config.presence.max_subscriptions_per_connection;
        let mut seen = HashSet::new();
        let mut cold = Vec::new();
        let err = |identity: &str, code: ErrorCode, message: &str| IdentityError {
            identity: identity.to_owned(),
            code: code.as_u32(),
            message: message.to_owned(),
        };
        for identity in identities {
            if !seen.insert(identity.clone()) {
                continue;
            }
            if identity.is_empty() || identity.len() > MAX_IDENTITY_LEN {
                outbox.add_error(
                    slot,
                    err(
                        &identity,
                        ErrorCode::InvalidParameter,
                        "identity must be 1 to 256 bytes",
                    ),
                );
                continue;
            }
            let own = identity == self.conn.identity();
            if !own && !self.watched.contains(identity.as_str()) && self.watched.len() >= limit {
                outbox.add_error(
                    slot,
                    err(
                        &identity,
                        ErrorCode::TooMany,
                        "max_subscriptions_per_connection reached",
                    ),
                );
                continue;
            }
            let (attach, key) = engine.subscribe(&self.conn, &identity, slot);
            if !own {
                self.watched.insert(key);
            }
            if attach == Attach::NeedsProfile {
                cold.push(identity);
            }
        }
        // Most connections subscribe once or twice: keep no slack.
        self.watched.0.shrink_to_fit();
        for identity in cold {
            match self.app.store.get_user(&self.service.sid, &identity).await {
                Ok(rec) if rec.identity == identity => {
                    engine.load_profile(&self.service.sid, &identity, profile_of(&rec));
                    engine.fill(&self.conn, &identity, slot);
                }
                Ok(_) | Err(StoreError::NotFound) => {
                    self.watched.remove(identity.as_str());
                    engine.unsubscribe(&self.conn, &identity);
                    let msg = format!("User {identity} not found in service {}", self.service.sid);
                    outbox.add_error(slot, err(&identity, ErrorCode::NotFound, &msg));
                }
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        service = %self.service.sid,
                        identity = %self.conn.identity(),
                        watched = %identity,
                        "store failure during subscribe"
                    );
                    self.watched.remove(identity.as_str());
                    engine.unsubscribe(&self.conn, &identity);
                    outbox.add_error(
                        slot,
                        err(
                            &identity,
                            ErrorCode::Internal,
                            "internal error; retry later",
                        ),
                    );
                }
            }
        }
        outbox.seal(slot);
    }

    fn update_token(&mut self, id: i64, token: &str) {
        let grant = verify_token(&self.app.creds, token, reach_store::now_unix()).and_then(|g| {
            if g.identity == self.conn.identity()
                && g.service_sid == self.service.sid
                && g.account_sid == self.service.account_sid
            {
                Ok(g)
            } else {
                Err(TokenError::OtherPrincipal)
            }
        });
        match grant {
            Ok(grant) => {
                self.push_credential_sid = grant.push_credential_sid.map(String::into_boxed_str);
                self.token_expires_at = grant.expires_at;
                self.set_expiry();
                self.push(&ServerFrame::TokenUpdated {
                    id,
                    token_expires_at: self.token_expires_at,
                });
            }
            Err(e) => {
                self.app
                    .metrics
                    .auth_failures
                    .with_label_values(&[e.label()])
                    .inc();
                self.push(&error_frame(Some(id), e.code(), e.to_string()));
            }
        }
    }

    fn check_binding(&self, id: i64, binding_type: &str, address: &str) -> bool {
        if !BINDING_TYPES.contains(&binding_type) {
            self.push(&error_frame(
                Some(id),
                ErrorCode::InvalidParameter,
                "binding_type must be one of apn, gcm, fcm",
            ));
            return false;
        }
        if address.is_empty() || address.len() > MAX_ADDRESS_LEN {
            self.push(&error_frame(
                Some(id),
                ErrorCode::InvalidParameter,
                "address must be 1 to 1024 bytes",
            ));
            return false;
        }
        true
    }

    /// Re-reads the own user after a binding change and lets the engine publish it.
    async fn refresh_own_profile(&self) {
        if let Ok(rec) = self
            .app
            .store
            .get_user(&self.service.sid, self.conn.identity())
            .await
            && rec.identity == self.conn.identity()
        {
            self.app.user_changed(&rec).await;
        }
    }

    async fn register_push(&self, id: i64, binding_type: &str, address: &str) {
        if !self.check_binding(id, binding_type, address) {
            return;
        }
        let credential = self.push_credential_sid.as_deref();
        match self
            .app
            .store
            .upsert_binding(
                &self.service,
                self.conn.identity(),
                binding_type,
                address,
                credential,
            )
            .await
        {
            Ok(binding) => {
                self.refresh_own_profile().await;
                self.push(&ServerFrame::PushRegistered {
                    id,
                    binding_sid: binding.sid,
                });
            }
            Err(StoreError::NotFound) => {
                self.push(&error_frame(
                    Some(id),
                    ErrorCode::NotFound,
                    "the user no longer exists",
                ));
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    service = %self.service.sid,
                    identity = %self.conn.identity(),
                    "store failure during register_push"
                );
                self.push(&error_frame(
                    Some(id),
                    ErrorCode::Internal,
                    "internal error; retry later",
                ));
            }
        }
    }

    async fn unregister_push(&self, id: i64, binding_type: &str, address: &str) {
        if !self.check_binding(id, binding_type, address) {
            return;
        }
        match self
            .app
            .store
            .delete_binding_by_address(
                &self.service.sid,
                self.conn.identity(),
                binding_type,
                address,
            )
            .await
        {
            Ok(_) => {
                self.refresh_own_profile().await;
                self.push(&ServerFrame::PushUnregistered { id });
            }
            Err(StoreError::NotFound) => {
                self.push(&error_frame(
                    Some(id),
                    ErrorCode::NotFound,
                    "no such push registration",
                ));
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    service = %self.service.sid,
                    identity = %self.conn.identity(),
                    "store failure during unregister_push"
                );
                self.push(&error_frame(
                    Some(id),
                    ErrorCode::Internal,
                    "internal error; retry later",
                ));
            }
        }
    }

    /// Leaves the engine (presence rules apply) and closes the socket as `end` says.
    async fn finish(mut self, ws: &mut Socket, end: End) {
        let watched = std::mem::take(&mut self.watched.0);
        self.app.engine.detach(&self.conn, &watched, self.bye);
        if let End::Close(code) = end {
            let reason = match code {
                CloseCode::Normal => "bye",
                CloseCode::GoingAway => "draining",
                other => other.label(),
            };
            let encoding = self.conn.outbox.encoding();
            close_direct(ws, encoding, None, code.as_u16(), reason).await;
        }
    }
}

/// What one wake-up of a socket produced.
enum Io {
    /// The connection must close with this code, or the socket failed.
    Closing(Result<CloseCode, tungstenite::Error>),
    /// A deadline registered with the shared timers has come.
    Timer,
    /// A read from the socket.
    Read(Option<Result<Message, tungstenite::Error>>),
}

/// Writes what the outbox holds while the socket takes it; flushes once per batch.
/// Ready only when the connection must close (`Ok(code)`) or the socket failed.
fn poll_write(
    ws: &mut Socket,
    conn: &Conn,
    w: &mut WriteState,
    app: &App,
    cx: &mut Context<'_>,
) -> Poll<Result<CloseCode, tungstenite::Error>> {
    let encoding = conn.outbox.encoding();
    loop {
        match ws.poll_ready_unpin(cx) {
            Poll::Pending => {
                w.blocked_since.get_or_insert_with(Instant::now);
                return Poll::Pending;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => w.blocked_since = None,
        }
        if w.ping_due {
            w.ping_due = false;
            ws.start_send_unpin(Message::Ping(Bytes::new()))?;
            w.dirty = true;
            continue;
        }
        match conn.outbox.pop(cx.waker()) {
            Some(Outgoing::Message(bytes)) => {
                send_message(ws, bytes, encoding, app.config.limits.write_fragment_bytes)?;
                app.metrics.frames_sent.inc();
                w.dirty = true;
            }
            Some(Outgoing::Close(code)) => {
                return flush_dirty(ws, w, cx).map_ok(|()| code);
            }
            None => {
                return match flush_dirty(ws, w, cx) {
                    Poll::Ready(Ok(())) => {
                        w.blocked_since = None;
                        Poll::Pending
                    }
                    other => other.map_ok(|()| CloseCode::Normal),
                };
            }
        }
    }
}

/// Flushes what was written since the last flush; notes when the socket blocks.
fn flush_dirty(
    ws: &mut Socket,
    w: &mut WriteState,
    cx: &mut Context<'_>,
) -> Poll<Result<(), tungstenite::Error>> {
    if !w.dirty {
        return Poll::Ready(Ok(()));
    }
    match ws.poll_flush_unpin(cx) {
        Poll::Pending => {
            w.blocked_since.get_or_insert_with(Instant::now);
            Poll::Pending
        }
        Poll::Ready(result) => {
            if result.is_ok() {
                w.dirty = false;
            }
            Poll::Ready(result)
        }
    }
}
