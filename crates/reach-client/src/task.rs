//! The background task that owns the socket: the session and reconnect loop.
//!
//! One task per client. It runs *sessions* (one per WebSocket connection) in a loop:
//!
//! 1. A session starts from a `welcome`. After a reconnect it first resubscribes every
//!    identity the client had subscribed, then sends the requests that were waiting.
//! 2. It then `select!`s over: the socket's reads (replies, pushes: applied by `apply.rs`),
//!    the command channel (requests from [`Client`](crate::Client) and [`User`](crate::User)
//!    handles; each gets a fresh id in `request.rs` and its reply travels back over a
//!    oneshot), a timer (a `ping` every heartbeat interval; no frame at all for the dead-server
//!    deadline ends the session) and the shutdown signal.
//! 3. How the session ended decides what follows: close 4001 -> `Denied` (and `TokenExpired`
//!    if the error was 20104), waiting for [`update_token`](crate::Client::update_token);
//!    4003 -> `Disconnected`; a `goodbye` -> reconnect after its `retry_after_ms`; anything
//!    else -> reconnect with the policy's backoff. Requests that were in flight are sent
//!    again on the next connection (opened by `connect.rs`).

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reach_proto::{ClientFrame, CloseCode, Encoding, ErrorCode, ServerFrame};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::apply;
use crate::connect::{Connection, Ws, close_parts, decode, open, to_message};
use crate::error::{Error, Result};
use crate::events::{ClientEvent, ConnectionState};
use crate::request::{Command, Link, Pending, Reply, ReplyTx, Request, Requests, chunk_identities};
use crate::state::{Disconnect, Shared};

/// How long a closing handshake may take.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// How a session ended.
enum End {
    /// The application closed the client (or dropped it): `bye` was said.
    Shutdown,
    /// The connection was lost; reconnect (after `retry_after`, if the server said so).
    Lost { retry_after: Option<Duration> },
    /// Close 4001.
    Denied { code: u32, message: String },
    /// Close 4003: the service or user is gone.
    Forbidden,
}

/// What the reconnect loop produced.
enum Next {
    Connected(Box<Connection>),
    Denied { code: u32, message: String },
    Stop,
}

/// Shutdown or the end of a waiting period.
enum Idle {
    Elapsed,
    Shutdown,
}

pub(crate) struct Task {
    link: Arc<Link>,
    url: String,
    cmds: mpsc::Receiver<Command>,
    shutdown: Arc<Notify>,
    /// What waits for a connection or a reply.
    requests: Requests,
    /// Who asked for the close, to be told when it is done.
    closing: Vec<oneshot::Sender<()>>,
}

impl Task {
    pub fn new(
        link: Arc<Link>,
        url: String,
        cmds: mpsc::Receiver<Command>,
        shutdown: Arc<Notify>,
    ) -> Task {
        Task {
            link,
            url,
            cmds,
            shutdown,
            requests: Requests::default(),
            closing: vec![],
        }
    }

    fn shared(&self) -> &Shared {
        &self.link.shared
    }

    /// Runs sessions until the client ends.
    pub async fn run(mut self, first: Connection) {
        let mut conn = first;
        let mut resubscribe = false;
        loop {
            let encoding = conn.encoding;
            let heartbeat = conn.welcome.heartbeat_interval;
            let end = self
                .session(&mut conn.ws, encoding, heartbeat, resubscribe)
                .await;
            resubscribe = true;
            let next = match end {
                End::Shutdown => Next::Stop,
                End::Forbidden => {
                    self.requests.fail_all(|| Error::Closed {
                        code: Some(CloseCode::Forbidden.as_u16()),
                        reason: "forbidden: the service or user no longer exists".into(),
                    });
                    Next::Stop
                }
                End::Denied { code, message } => Next::Denied { code, message },
                End::Lost { retry_after } => {
                    self.requests.requeue_in_flight();
                    self.reconnect(retry_after).await
                }
            };
            conn = match next {
                Next::Connected(c) => *c,
                Next::Stop => break,
                Next::Denied { code, message } => match self.denied(code, message).await {
                    Some(c) => c,
                    None => break,
                },
            };
        }
        self.finish();
    }

    /// Applies a new connection's `welcome` and reports it connected.
    fn on_welcome(&self, conn: &Connection) {
        let events = apply::welcome(&self.link, &conn.welcome, conn.encoding);
        self.shared().set_connection(ConnectionState::Connected);
        self.shared().emit_all(events);
    }

    /// One connection's life; see the module doc.
    async fn session(
        &mut self,
        ws: &mut Ws,
        encoding: Encoding,
        heartbeat: Duration,
        resubscribe: bool,
    ) -> End {
        let dead_after = self.shared().options.dead_after(heartbeat);
        let mut last_heard = Instant::now();
        let mut next_ping = last_heard + heartbeat;
        let mut last_error: Option<(u32, String)> = None;
        let mut goodbye: Option<Duration> = None;
        // Only the latest heartbeat ping is tracked; an unanswered older one is forgotten.
        let mut heartbeat_id: Option<i64> = None;
        if resubscribe {
            let identities: Vec<String> = {
                let st = self.shared().state();
                st.users.keys().map(|k| k.to_string()).collect()
            };
            for chunk in chunk_identities(identities) {
                let frame = self.requests.resubscribe(chunk);
                if let Err(reason) = send(ws, &frame, encoding, dead_after).await {
                    return self.lost(None, reason, None);
                }
            }
        }
        while let Some((request, reply)) = self.requests.next_queued() {
            let frame = self.requests.send(request, reply);
            if let Err(reason) = send(ws, &frame, encoding, dead_after).await {
                return self.lost(None, reason, None);
            }
        }
        loop {
            let deadline = next_ping.min(last_heard + dead_after);
            tokio::select! {
                biased;
                _ = self.shutdown.notified() => return self.say_bye(ws, encoding).await,
                msg = ws.next() => {
                    last_heard = Instant::now();
                    let msg = match msg {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => return self.lost(None, format!("transport error: {e}"), None),
                        None => return self.lost(None, "the server dropped the connection".into(), None),
                    };
                    if let Message::Close(frame) = &msg {
                        let (code, reason) = close_parts(frame.as_ref());
                        drain_close(ws).await;
                        return self.on_close(code, reason, last_error, goodbye);
                    }
                    match decode(&msg) {
                        None => {}
                        Some(Ok(frame)) => self.on_frame(frame, &mut last_error, &mut goodbye),
                        Some(Err(e)) => tracing::warn!(error = %e, "undecodable frame ignored"),
                    }
                }
                cmd = self.cmds.recv() => match cmd {
                    None => return self.say_bye(ws, encoding).await,
                    Some(Command::Close { done }) => {
                        self.closing.push(done);
                        return self.say_bye(ws, encoding).await;
                    }
                    Some(Command::Request { request, reply }) => {
                        let frame = self.requests.send(request, reply);
                        if let Err(reason) = send(ws, &frame, encoding, dead_after).await {
                            return self.lost(None, reason, None);
                        }
                    }
                },
                _ = tokio::time::sleep_until(deadline) => {
                    let now = Instant::now();
                    if now >= last_heard + dead_after {
                        return self.lost(
                            None,
                            format!("nothing heard from the server for {dead_after:?}"),
                            None,
                        );
                    }
                    if now >= next_ping {
                        next_ping = now + heartbeat;
                        let (id, ping) = self.requests.heartbeat(heartbeat_id);
                        heartbeat_id = Some(id);
                        if let Err(reason) = send(ws, &ping, encoding, dead_after).await {
                            return self.lost(None, reason, None);
                        }
                    }
                }
            }
        }
    }

    /// Records a lost connection; the caller reconnects.
    fn lost(&self, code: Option<u16>, reason: String, retry_after: Option<Duration>) -> End {
        tracing::info!(?code, %reason, ?retry_after, "connection lost");
        self.record_disconnect(code, reason, retry_after);
        End::Lost { retry_after }
    }

    fn record_disconnect(&self, code: Option<u16>, reason: String, retry_after: Option<Duration>) {
        let mut st = self.shared().state();
        st.last_disconnect = Some(Disconnect {
            code,
            reason,
            retry_after,
            at: std::time::Instant::now(),
        });
        st.connected_since = None;
    }

    fn on_close(
        &self,
        code: Option<u16>,
        reason: String,
        last_error: Option<(u32, String)>,
        goodbye: Option<Duration>,
    ) -> End {
        let why = match &last_error {
            Some((c, m)) => format!("error {c}: {m}"),
            None if reason.is_empty() => "closed by the server".to_owned(),
            None => reason.clone(),
        };
        match code.and_then(CloseCode::from_u16) {
            Some(CloseCode::Unauthorized) => {
                self.record_disconnect(code, why, None);
                let (code, message) = last_error.unwrap_or((
                    ErrorCode::InvalidAccessToken.as_u32(),
                    "the access token was refused".into(),
                ));
                End::Denied { code, message }
            }
            Some(CloseCode::Forbidden) => {
                self.record_disconnect(code, why, None);
                End::Forbidden
            }
            Some(CloseCode::GoingAway) => self.lost(code, why, goodbye),
            _ => self.lost(code, why, None),
        }
    }

    /// A frame read in a session: a reply goes to whoever waits for it, after being applied.
    fn on_frame(
        &mut self,
        frame: ServerFrame,
        last_error: &mut Option<(u32, String)>,
        goodbye: &mut Option<Duration>,
    ) {
        let shared = Arc::clone(&self.link.shared);
        match frame {
            ServerFrame::Subscribed { id, users, errors } => match self.requests.take(id) {
                Some(Pending::Resubscribe) => {
                    shared.emit_all(apply::resubscribed(&self.link, users, errors));
                }
                Some(Pending::App { reply, .. }) => {
                    let (handles, events) = apply::subscribed(&self.link, users);
                    shared.emit_all(events);
                    let _ = reply.send(Ok(Reply::Subscribed {
                        users: handles,
                        errors,
                    }));
                }
                _ => shared.emit_all(apply::subscribed(&self.link, users).1),
            },
            ServerFrame::Unsubscribed { id } => {
                if let Some(Pending::App { request, reply, .. }) = self.requests.take(id) {
                    if let Request::Unsubscribe(identities) = request {
                        shared.emit_all(apply::unsubscribed(&self.link, &identities));
                    }
                    let _ = reply.send(Ok(Reply::Done));
                }
            }
            ServerFrame::Pong { id } => {
                if let Some(Pending::App { reply, sent, .. }) = self.requests.take(id) {
                    let _ = reply.send(Ok(Reply::Pong {
                        rtt: sent.elapsed(),
                    }));
                }
            }
            ServerFrame::TokenUpdated {
                id,
                token_expires_at,
            } => {
                if let Some(Pending::App { request, reply, .. }) = self.requests.take(id) {
                    if let Request::UpdateToken(token) = request {
                        apply::token_updated(&self.link, token, token_expires_at);
                    }
                    let _ = reply.send(Ok(Reply::TokenUpdated {
                        expires_at: token_expires_at,
                    }));
                }
            }
            ServerFrame::PushRegistered { id, binding_sid } => {
                if let Some(Pending::App { reply, .. }) = self.requests.take(id) {
                    let _ = reply.send(Ok(Reply::PushRegistered { binding_sid }));
                }
            }
            ServerFrame::PushUnregistered { id } => {
                if let Some(Pending::App { reply, .. }) = self.requests.take(id) {
                    let _ = reply.send(Ok(Reply::Done));
                }
            }
            ServerFrame::UserUpdated { user, reasons } => {
                if let Some(event) = apply::user_updated(&self.link, user, reasons) {
                    shared.hub.emit(event);
                }
            }
            ServerFrame::ServiceUpdated {
                reachability_enabled,
            } => shared
                .hub
                .emit(apply::service_updated(&self.link, reachability_enabled)),
            ServerFrame::TokenAboutToExpire { expires_at } => shared
                .hub
                .emit(apply::token_about_to_expire(&self.link, expires_at)),
            ServerFrame::Goodbye {
                reason,
                retry_after_ms,
            } => {
                tracing::info!(%reason, retry_after_ms, "goodbye from the server");
                *goodbye = Some(Duration::from_millis(retry_after_ms));
            }
            ServerFrame::Error {
                id: Some(id),
                code,
                message,
            } => match self.requests.take(id) {
                Some(Pending::App { reply, .. }) => {
                    let _ = reply.send(Err(Error::Server { code, message }));
                }
                Some(Pending::Resubscribe) => {
                    tracing::warn!(code, %message, "resubscription refused");
                }
                _ => {}
            },
            ServerFrame::Error {
                id: None,
                code,
                message,
            } => {
                tracing::debug!(code, %message, "error from the server");
                *last_error = Some((code, message));
            }
            ServerFrame::Welcome { .. } => tracing::warn!("unexpected second welcome ignored"),
        }
    }

    /// Says `bye` and waits (briefly) for the server's close.
    async fn say_bye(&mut self, ws: &mut Ws, encoding: Encoding) -> End {
        self.shared().set_connection(ConnectionState::Disconnecting);
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            ws.send(to_message(&ClientFrame::Bye, encoding)).await?;
            while let Some(msg) = ws.next().await {
                if matches!(msg?, Message::Close(_)) {
                    break;
                }
            }
            // Complete the closing handshake.
            while ws.next().await.is_some() {}
            Ok::<(), tungstenite::Error>(())
        })
        .await;
        self.record_disconnect(
            Some(CloseCode::Normal.as_u16()),
            "closed by the client".into(),
            None,
        );
        End::Shutdown
    }

    /// Queues a request that came while there is no connection.
    fn queue(&mut self, request: Request, reply: ReplyTx) {
        if let Request::UpdateToken(token) = &request {
            // The next hello presents it; the replayed update_token confirms it.
            self.shared().state().token = token.clone();
        }
        self.requests.queue(request, reply);
    }

    /// Waits `delay`, queueing requests meanwhile; stops early on shutdown or close.
    async fn idle(&mut self, delay: Duration) -> Idle {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.notified() => return Idle::Shutdown,
                cmd = self.cmds.recv() => match cmd {
                    None => return Idle::Shutdown,
                    Some(Command::Close { done }) => {
                        self.closing.push(done);
                        return Idle::Shutdown;
                    }
                    Some(Command::Request { request, reply }) => self.queue(request, reply),
                },
                _ = tokio::time::sleep_until(until) => return Idle::Elapsed,
            }
        }
    }

    /// One connection attempt with the latest token; `None` on shutdown or close.
    async fn attempt(&mut self) -> Option<Result<Connection>> {
        let token = self.shared().state().token.clone();
        let options = self.shared().options.clone();
        let url = self.url.clone();
        let opening = open(&url, &token, &options);
        tokio::pin!(opening);
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.notified() => return None,
                cmd = self.cmds.recv() => match cmd {
                    None => return None,
                    Some(Command::Close { done }) => {
                        self.closing.push(done);
                        return None;
                    }
                    Some(Command::Request { request, reply }) => self.queue(request, reply),
                },
                r = &mut opening => return Some(r),
            }
        }
    }

    /// Reconnects with backoff (the first delay is the server's `retry_after`, if any).
    async fn reconnect(&mut self, retry_after: Option<Duration>) -> Next {
        let policy = self.shared().options.reconnect.clone();
        let mut attempt: u32 = 0;
        let mut delay = retry_after.unwrap_or_else(|| policy.delay(0));
        loop {
            if !policy.allows(attempt) {
                tracing::info!(attempts = attempt, "giving up reconnecting");
                self.requests.fail_all(|| Error::Closed {
                    code: None,
                    reason: "the connection was lost and not re-established".into(),
                });
                return Next::Stop;
            }
            self.shared().set_connection(ConnectionState::Connecting);
            tracing::debug!(?delay, attempt, "reconnecting after a delay");
            if let Idle::Shutdown = self.idle(delay).await {
                return Next::Stop;
            }
            match self.attempt().await {
                None => return Next::Stop,
                Some(Ok(conn)) => {
                    self.on_welcome(&conn);
                    return Next::Connected(Box::new(conn));
                }
                Some(Err(Error::Denied { code, message })) => {
                    self.record_disconnect(
                        Some(CloseCode::Unauthorized.as_u16()),
                        format!("error {code}: {message}"),
                        None,
                    );
                    return Next::Denied { code, message };
                }
                Some(Err(e)) => {
                    tracing::info!(error = %e, attempt, "reconnect attempt failed");
                    attempt = attempt.saturating_add(1);
                    delay = policy.delay(attempt);
                }
            }
        }
    }

    /// The token was refused: `Denied` until the application hands over a new token.
    async fn denied(&mut self, mut code: u32, mut message: String) -> Option<Connection> {
        loop {
            let expired = code == ErrorCode::TokenExpired.as_u32();
            tracing::info!(code, %message, "access denied");
            let denied = |code: u32, message: &str| Error::Denied {
                code,
                message: message.to_owned(),
            };
            // Only an update_token can lead anywhere now.
            let tokens = self.requests.deny(|| denied(code, &message));
            self.shared().set_connection(ConnectionState::Denied);
            if expired {
                self.shared().hub.emit(ClientEvent::TokenExpired);
            }
            for (request, reply) in tokens {
                // An update_token in flight when the token expired: reply after reconnecting.
                self.queue(request, reply);
            }
            if !self.requests.has_queued() {
                loop {
                    let cmd = tokio::select! {
                        biased;
                        _ = self.shutdown.notified() => return None,
                        cmd = self.cmds.recv() => cmd,
                    };
                    match cmd {
                        None => return None,
                        Some(Command::Close { done }) => {
                            self.closing.push(done);
                            return None;
                        }
                        Some(Command::Request {
                            request: request @ Request::UpdateToken(_),
                            reply,
                        }) => {
                            self.queue(request, reply);
                            break;
                        }
                        Some(Command::Request { reply, .. }) => {
                            let _ = reply.send(Err(denied(code, &message)));
                        }
                    }
                }
            }
            self.shared().set_connection(ConnectionState::Connecting);
            match self.attempt().await {
                None => return None,
                Some(Ok(conn)) => {
                    self.on_welcome(&conn);
                    return Some(conn);
                }
                Some(Err(Error::Denied {
                    code: c,
                    message: m,
                })) => {
                    code = c;
                    message = m;
                }
                Some(Err(e)) => {
                    tracing::info!(error = %e, "reconnect with the new token failed");
                    match self.reconnect(None).await {
                        Next::Connected(conn) => return Some(*conn),
                        Next::Stop => return None,
                        Next::Denied {
                            code: c,
                            message: m,
                        } => {
                            code = c;
                            message = m;
                        }
                    }
                }
            }
        }
    }

    /// The client has ended: fail what waits, end the streams, tell `close` callers.
    fn finish(mut self) {
        self.requests.fail_all(|| Error::ClientClosed);
        self.shared().set_connection(ConnectionState::Disconnected);
        self.shared().hub.close();
        for done in self.closing.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Sends one frame, giving up after `limit` (a server that takes nothing is as good as dead).
async fn send(
    ws: &mut Ws,
    frame: &ClientFrame,
    encoding: Encoding,
    limit: Duration,
) -> std::result::Result<(), String> {
    match tokio::time::timeout(limit, ws.send(to_message(frame, encoding))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("cannot send: {e}")),
        Err(_) => Err(format!("the server took no data for {limit:?}")),
    }
}

/// Reads until the peer ends the connection, so the closing handshake completes.
async fn drain_close(ws: &mut Ws) {
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}
