//! The background task that owns the socket, and the state it shares with the handles.
//!
//! One task per client. It runs *sessions* (one per WebSocket connection) in a loop:
//!
//! 1. A session starts from a `welcome`. After a reconnect it first resubscribes every
//!    identity the client had subscribed, then replays the requests that were waiting.
//! 2. It then `select!`s over: the socket's reads (replies, pushes), the command channel
//!    (requests from [`Client`](crate::Client) and [`User`] handles; each gets a fresh id and
//!    its reply travels back over a oneshot), a timer (a `ping` every heartbeat interval; no
//!    frame at all for the dead-server deadline ends the session) and the shutdown signal.
//! 3. How the session ended decides what follows: close 4001 -> `Denied` (and `TokenExpired`
//!    if the error was 20104), waiting for [`update_token`](crate::Client::update_token);
//!    4003 -> `Disconnected`; a `goodbye` -> reconnect after its `retry_after_ms`; anything
//!    else -> reconnect with the policy's backoff. Requests that were in flight are replayed
//!    on the next connection (opened by `connect.rs`).
//!
//! Replies and pushes are applied to the shared state *by this task*, in the order the server
//! sent them, before any event is emitted; the server never lets a `user_updated` overtake the
//! `subscribed` reply that carries the same user, so the state never goes backwards. After a
//! reconnect the resubscription reply is compared with what the client knew, and only the
//! fields that really changed become `UserUpdated` events.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reach_proto::{ClientFrame, Encoding, ErrorCode, IdentityError, Reasons, ServerFrame};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::connect::{Connection, Ws, close_parts, decode, open, to_message};
use crate::error::{Error, Result};
use crate::events::{ClientEvent, ConnectionState, Hub};
use crate::options::Options;
use crate::user::{User, UserCell};

/// How long a closing handshake may take.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Largest total identity length per `subscribe` frame (the server's default frame limit is
/// 64 KiB; this leaves room for the frame's other bytes).
const SUBSCRIBE_CHUNK_BYTES: usize = 16 * 1024;
const SUBSCRIBE_CHUNK_IDENTITIES: usize = 500;

/// How the last connection ended, as [`Client::last_disconnect`](crate::Client::last_disconnect)
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// The WebSocket close code, if the server sent one.
    pub code: Option<u16>,
    /// The close reason, the error the server sent before closing, or what the client saw.
    pub reason: String,
    /// The delay a draining server asked for in `goodbye`.
    pub retry_after: Option<Duration>,
    /// When the client noticed.
    pub at: std::time::Instant,
}

/// State shared by the task and every handle. Getters lock briefly; no lock is held across
/// an `.await`. Lock order: `state`, then a user cell, then the hub.
#[derive(Debug)]
pub(crate) struct Shared {
    pub hub: Hub,
    pub options: Options,
    state: Mutex<ClientState>,
}

#[derive(Debug)]
pub(crate) struct ClientState {
    pub connection: ConnectionState,
    pub reachability_enabled: bool,
    pub service_sid: String,
    pub connection_id: String,
    pub encoding: Encoding,
    /// The client's own user; always subscribed.
    pub own: Arc<UserCell>,
    /// The token the next `hello` presents (the latest one the server accepted or that the
    /// application handed over while disconnected).
    pub token: String,
    pub token_expires_at: i64,
    pub heartbeat_interval: Duration,
    /// Subscribed identities besides the own one.
    pub users: HashMap<Arc<str>, Arc<UserCell>>,
    /// Unsubscribed identities whose handles may still be alive, so that subscribing again
    /// revives the same handles.
    pub detached: HashMap<Arc<str>, Weak<UserCell>>,
    pub last_disconnect: Option<Disconnect>,
    pub connected_since: Option<std::time::Instant>,
}

impl ClientState {
    fn cell(&self, identity: &str) -> Option<&Arc<UserCell>> {
        if *self.own.identity == *identity {
            Some(&self.own)
        } else {
            self.users.get(identity)
        }
    }

    /// Subscribes `user`'s cell (reviving a detached one); returns it, whether it was newly
    /// subscribed, and what changed in its state.
    fn subscribe(&mut self, user: reach_proto::User) -> (Arc<UserCell>, bool, Reasons) {
        if let Some(cell) = self.cell(&user.identity).cloned() {
            let reasons = cell.replace(user);
            return (cell, false, reasons);
        }
        let identity: Arc<str> = Arc::from(user.identity.as_str());
        let cell = match self.detached.remove(&identity).and_then(|w| w.upgrade()) {
            Some(cell) => {
                cell.replace(user);
                cell.set_subscribed(true);
                cell
            }
            None => UserCell::new(user, true),
        };
        self.users.insert(identity, Arc::clone(&cell));
        (cell, true, Reasons::EMPTY)
    }

    fn unsubscribe(&mut self, identity: &str) -> Option<Arc<UserCell>> {
        let cell = self.users.remove(identity)?;
        cell.set_subscribed(false);
        self.detached.retain(|_, w| w.strong_count() > 0);
        self.detached
            .insert(Arc::clone(&cell.identity), Arc::downgrade(&cell));
        Some(cell)
    }
}

impl Shared {
    pub fn new(options: Options, state: ClientState) -> Shared {
        Shared {
            hub: Hub::new(options.event_capacity),
            options,
            state: Mutex::new(state),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, ClientState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the connection state; emits `ConnectionStateChanged` if it changed.
    fn set_connection(&self, to: ConnectionState) {
        let changed = {
            let mut st = self.state();
            std::mem::replace(&mut st.connection, to) != to
        };
        if changed {
            tracing::debug!(state = %to, "connection state");
            self.hub.emit(ClientEvent::ConnectionStateChanged(to));
        }
    }
}

/// A request from the application.
#[derive(Debug, Clone)]
pub(crate) enum Request {
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    UpdateToken(String),
    RegisterPush {
        binding_type: String,
        address: String,
    },
    UnregisterPush {
        binding_type: String,
        address: String,
    },
    Ping,
}

impl Request {
    fn frame(&self, id: i64) -> ClientFrame {
        match self.clone() {
            Request::Subscribe(identities) => ClientFrame::Subscribe { id, identities },
            Request::Unsubscribe(identities) => ClientFrame::Unsubscribe { id, identities },
            Request::UpdateToken(token) => ClientFrame::UpdateToken { id, token },
            Request::RegisterPush {
                binding_type,
                address,
            } => ClientFrame::RegisterPush {
                id,
                binding_type,
                address,
            },
            Request::UnregisterPush {
                binding_type,
                address,
            } => ClientFrame::UnregisterPush {
                id,
                binding_type,
                address,
            },
            Request::Ping => ClientFrame::Ping { id },
        }
    }
}

/// The task's answer to a request.
#[derive(Debug)]
pub(crate) enum Reply {
    Done,
    Subscribed {
        users: Vec<User>,
        errors: Vec<IdentityError>,
    },
    TokenUpdated {
        expires_at: i64,
    },
    PushRegistered {
        binding_sid: String,
    },
    Pong {
        rtt: Duration,
    },
}

type ReplyTx = oneshot::Sender<Result<Reply>>;

pub(crate) enum Command {
    Request {
        request: Request,
        reply: ReplyTx,
    },
    /// Say `bye`, close, end the task; `done` fires when it has.
    Close {
        done: oneshot::Sender<()>,
    },
}

/// What handles hold to reach the task: the command channel and the shared state.
#[derive(Debug)]
pub(crate) struct Link {
    pub shared: Arc<Shared>,
    pub cmds: mpsc::Sender<Command>,
}

impl Link {
    /// Sends a request and waits for its reply, at most the request timeout.
    pub async fn request(&self, request: Request) -> Result<Reply> {
        let timeout = self.shared.options.request_timeout;
        let (tx, rx) = oneshot::channel();
        let exchange = async {
            self.cmds
                .send(Command::Request { request, reply: tx })
                .await
                .map_err(|_| Error::ClientClosed)?;
            rx.await.map_err(|_| Error::ClientClosed)?
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Error::Timeout(timeout))?
    }

    pub fn user(self: &Arc<Self>, cell: Arc<UserCell>) -> User {
        User {
            cell,
            link: Some(Arc::clone(self)),
        }
    }
}

/// Splits identities into `subscribe` frames that stay well under the server's frame limit.
pub(crate) fn chunk_identities(identities: Vec<String>) -> Vec<Vec<String>> {
    let mut chunks = vec![];
    let mut current: Vec<String> = vec![];
    let mut bytes = 0;
    for identity in identities {
        if !current.is_empty()
            && (bytes + identity.len() > SUBSCRIBE_CHUNK_BYTES
                || current.len() >= SUBSCRIBE_CHUNK_IDENTITIES)
        {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += identity.len() + 3;
        current.push(identity);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// A request sent on the current connection, waiting for its reply.
enum Pending {
    App {
        request: Request,
        reply: ReplyTx,
        sent: Instant,
    },
    /// The task's own heartbeat `ping`.
    Heartbeat,
    /// The resubscription after a reconnect.
    Resubscribe,
}

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
    next_id: i64,
    /// Requests waiting for a connection, in arrival order.
    queued: VecDeque<(Request, ReplyTx)>,
    /// Requests sent on the current connection, by id.
    pending: HashMap<i64, Pending>,
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
            next_id: 1,
            queued: VecDeque::new(),
            pending: HashMap::new(),
            closing: vec![],
        }
    }

    fn shared(&self) -> &Shared {
        &self.link.shared
    }

    fn emit_all(&self, events: Vec<ClientEvent>) {
        for e in events {
            self.shared().hub.emit(e);
        }
    }

    fn id(&mut self) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        id
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
                    self.fail_all(|| Error::Closed {
                        code: Some(4003),
                        reason: "forbidden: the service or user no longer exists".into(),
                    });
                    Next::Stop
                }
                End::Denied { code, message } => Next::Denied { code, message },
                End::Lost { retry_after } => {
                    self.requeue_pending();
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

    /// Applies a `welcome` (after a reconnect: reports only what changed).
    fn on_welcome(&self, conn: &Connection) {
        let w = &conn.welcome;
        let mut events = vec![];
        {
            let mut st = self.shared().state();
            st.connection_id = w.connection_id.clone();
            st.service_sid = w.service_sid.clone();
            st.token_expires_at = w.token_expires_at;
            st.heartbeat_interval = w.heartbeat_interval;
            st.encoding = conn.encoding;
            st.connected_since = Some(std::time::Instant::now());
            if st.reachability_enabled != w.reachability_enabled {
                st.reachability_enabled = w.reachability_enabled;
                events.push(ClientEvent::ServiceUpdated {
                    reachability_enabled: w.reachability_enabled,
                });
            }
            let own = Arc::clone(&st.own);
            let reasons = own.replace(w.user.clone());
            if !reasons.is_empty() {
                events.push(ClientEvent::UserUpdated {
                    user: self.link.user(own),
                    reasons: reasons.to_vec(),
                });
            }
        }
        self.shared().set_connection(ConnectionState::Connected);
        self.emit_all(events);
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
                let id = self.id();
                let frame = ClientFrame::Subscribe {
                    id,
                    identities: chunk,
                };
                self.pending.insert(id, Pending::Resubscribe);
                if let Err(reason) = send(ws, &frame, encoding, dead_after).await {
                    return self.lost(None, reason, None);
                }
            }
        }
        while let Some((request, reply)) = self.queued.pop_front() {
            if reply.is_closed() {
                continue;
            }
            if let Err(reason) = self
                .send_request(ws, encoding, dead_after, request, reply)
                .await
            {
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
                        if let Err(reason) = self.send_request(ws, encoding, dead_after, request, reply).await {
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
                        let id = self.id();
                        if let Some(previous) = heartbeat_id.replace(id) {
                            self.pending.remove(&previous);
                        }
                        self.pending.insert(id, Pending::Heartbeat);
                        if let Err(reason) = send(ws, &ClientFrame::Ping { id }, encoding, dead_after).await {
                            return self.lost(None, reason, None);
                        }
                    }
                }
            }
        }
    }

    async fn send_request(
        &mut self,
        ws: &mut Ws,
        encoding: Encoding,
        limit: Duration,
        request: Request,
        reply: ReplyTx,
    ) -> std::result::Result<(), String> {
        let id = self.id();
        let frame = request.frame(id);
        self.pending.insert(
            id,
            Pending::App {
                request,
                reply,
                sent: Instant::now(),
            },
        );
        send(ws, &frame, encoding, limit).await
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
        match code {
            Some(4001) => {
                self.record_disconnect(code, why, None);
                let (code, message) = last_error.unwrap_or((
                    ErrorCode::InvalidAccessToken.as_u32(),
                    "the access token was refused".into(),
                ));
                End::Denied { code, message }
            }
            Some(4003) => {
                self.record_disconnect(code, why, None);
                End::Forbidden
            }
            Some(1001) => self.lost(code, why, goodbye),
            _ => self.lost(code, why, None),
        }
    }

    fn on_frame(
        &mut self,
        frame: ServerFrame,
        last_error: &mut Option<(u32, String)>,
        goodbye: &mut Option<Duration>,
    ) {
        match frame {
            ServerFrame::Subscribed { id, users, errors } => match self.pending.remove(&id) {
                Some(Pending::Resubscribe) => self.on_resubscribed(users, errors),
                Some(Pending::App { reply, .. }) => {
                    let handles = self.on_subscribed(users);
                    let _ = reply.send(Ok(Reply::Subscribed {
                        users: handles,
                        errors,
                    }));
                }
                _ => {
                    self.on_subscribed(users);
                }
            },
            ServerFrame::Unsubscribed { id } => {
                if let Some(Pending::App { request, reply, .. }) = self.pending.remove(&id) {
                    if let Request::Unsubscribe(identities) = request {
                        self.on_unsubscribed(&identities);
                    }
                    let _ = reply.send(Ok(Reply::Done));
                }
            }
            ServerFrame::Pong { id } => {
                if let Some(Pending::App { reply, sent, .. }) = self.pending.remove(&id) {
                    let _ = reply.send(Ok(Reply::Pong {
                        rtt: sent.elapsed(),
                    }));
                }
            }
            ServerFrame::TokenUpdated {
                id,
                token_expires_at,
            } => {
                if let Some(Pending::App { request, reply, .. }) = self.pending.remove(&id) {
                    if let Request::UpdateToken(token) = request {
                        let mut st = self.shared().state();
                        st.token = token;
                        st.token_expires_at = token_expires_at;
                    }
                    let _ = reply.send(Ok(Reply::TokenUpdated {
                        expires_at: token_expires_at,
                    }));
                }
            }
            ServerFrame::PushRegistered { id, binding_sid } => {
                if let Some(Pending::App { reply, .. }) = self.pending.remove(&id) {
                    let _ = reply.send(Ok(Reply::PushRegistered { binding_sid }));
                }
            }
            ServerFrame::PushUnregistered { id } => {
                if let Some(Pending::App { reply, .. }) = self.pending.remove(&id) {
                    let _ = reply.send(Ok(Reply::Done));
                }
            }
            ServerFrame::UserUpdated { user, reasons } => self.on_user_updated(user, reasons),
            ServerFrame::ServiceUpdated {
                reachability_enabled,
            } => {
                self.shared().state().reachability_enabled = reachability_enabled;
                self.shared().hub.emit(ClientEvent::ServiceUpdated {
                    reachability_enabled,
                });
            }
            ServerFrame::TokenAboutToExpire { expires_at } => {
                self.shared().state().token_expires_at = expires_at;
                self.shared().hub.emit(ClientEvent::TokenAboutToExpire);
            }
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
            } => match self.pending.remove(&id) {
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

    /// Applies a `subscribed` reply to an application request.
    fn on_subscribed(&self, users: Vec<reach_proto::User>) -> Vec<User> {
        let mut events = vec![];
        let mut handles = Vec::with_capacity(users.len());
        {
            let mut st = self.shared().state();
            for user in users {
                let (cell, newly, reasons) = st.subscribe(user);
                let handle = self.link.user(cell);
                if newly {
                    events.push(ClientEvent::UserSubscribed(handle.clone()));
                } else if !reasons.is_empty() {
                    events.push(ClientEvent::UserUpdated {
                        user: handle.clone(),
                        reasons: reasons.to_vec(),
                    });
                }
                handles.push(handle);
            }
        }
        self.emit_all(events);
        handles
    }

    /// Applies the resubscription after a reconnect: only real changes become events; users
    /// the server no longer has are unsubscribed.
    fn on_resubscribed(&self, users: Vec<reach_proto::User>, errors: Vec<IdentityError>) {
        let mut events = vec![];
        {
            let mut st = self.shared().state();
            for user in users {
                let Some(cell) = st.users.get(user.identity.as_str()).cloned() else {
                    continue;
                };
                let reasons = cell.replace(user);
                if !reasons.is_empty() {
                    events.push(ClientEvent::UserUpdated {
                        user: self.link.user(cell),
                        reasons: reasons.to_vec(),
                    });
                }
            }
            for e in errors {
                tracing::info!(identity = %e.identity, code = e.code, message = %e.message,
                    "not resubscribed after the reconnect");
                if let Some(cell) = st.unsubscribe(&e.identity) {
                    events.push(ClientEvent::UserUnsubscribed(self.link.user(cell)));
                }
            }
        }
        self.emit_all(events);
    }

    fn on_unsubscribed(&self, identities: &[String]) {
        let mut events = vec![];
        {
            let mut st = self.shared().state();
            for identity in identities {
                if let Some(cell) = st.unsubscribe(identity) {
                    events.push(ClientEvent::UserUnsubscribed(self.link.user(cell)));
                }
            }
        }
        self.emit_all(events);
    }

    fn on_user_updated(&self, user: reach_proto::User, reasons: Vec<reach_proto::UpdateReason>) {
        let cell = {
            let st = self.shared().state();
            st.cell(&user.identity).cloned()
        };
        // An update for an identity unsubscribed a moment ago: nobody watches it any more.
        let Some(cell) = cell else { return };
        let changed = cell.replace(user);
        let reasons = if reasons.is_empty() {
            changed.to_vec()
        } else {
            reasons
        };
        if !reasons.is_empty() {
            self.shared().hub.emit(ClientEvent::UserUpdated {
                user: self.link.user(cell),
                reasons,
            });
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
        self.record_disconnect(Some(1000), "closed by the client".into(), None);
        End::Shutdown
    }

    /// Moves the requests that were in flight back to the queue, to be sent again.
    fn requeue_pending(&mut self) {
        let mut in_flight: Vec<(i64, Request, ReplyTx)> = self
            .pending
            .drain()
            .filter_map(|(id, p)| match p {
                Pending::App { request, reply, .. } if !reply.is_closed() => {
                    Some((id, request, reply))
                }
                _ => None,
            })
            .collect();
        in_flight.sort_by_key(|(id, ..)| *id);
        for (_, request, reply) in in_flight.into_iter().rev() {
            self.queued.push_front((request, reply));
        }
    }

    /// Fails every waiting request.
    fn fail_all(&mut self, error: impl Fn() -> Error) {
        for (_, p) in self.pending.drain() {
            if let Pending::App { reply, .. } = p {
                let _ = reply.send(Err(error()));
            }
        }
        for (_, reply) in self.queued.drain(..) {
            let _ = reply.send(Err(error()));
        }
    }

    /// Queues a request that came while there is no connection.
    fn queue(&mut self, request: Request, reply: ReplyTx) {
        if let Request::UpdateToken(token) = &request {
            // The next hello presents it; the replayed update_token confirms it.
            self.shared().state().token = token.clone();
        }
        self.queued.retain(|(_, r)| !r.is_closed());
        self.queued.push_back((request, reply));
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
                self.fail_all(|| Error::Closed {
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
                    self.record_disconnect(Some(4001), format!("error {code}: {message}"), None);
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
            let mut tokens = VecDeque::new();
            for (_, p) in self.pending.drain() {
                if let Pending::App { request, reply, .. } = p {
                    match request {
                        Request::UpdateToken(_) => tokens.push_back((request, reply)),
                        _ => {
                            let _ = reply.send(Err(denied(code, &message)));
                        }
                    }
                }
            }
            for (_, reply) in self.queued.drain(..) {
                let _ = reply.send(Err(denied(code, &message)));
            }
            self.shared().set_connection(ConnectionState::Denied);
            if expired {
                self.shared().hub.emit(ClientEvent::TokenExpired);
            }
            for (request, reply) in tokens {
                // An update_token in flight when the token expired: reply after reconnecting.
                self.queue(request, reply);
            }
            if self.queued.is_empty() {
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
        self.fail_all(|| Error::ClientClosed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_subscriptions_are_split_into_frames_under_the_limit() {
        let ids: Vec<String> = (0..1200).map(|i| format!("user-{i:05}")).collect();
        let chunks = chunk_identities(ids.clone());
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| c.len() <= SUBSCRIBE_CHUNK_IDENTITIES));
        assert_eq!(chunks.concat(), ids);
        let long: Vec<String> = (0..200).map(|i| format!("{i:0>250}")).collect();
        for c in chunk_identities(long) {
            let frame = reach_proto::encode(
                &ClientFrame::Subscribe {
                    id: 1,
                    identities: c,
                },
                Encoding::Json,
            );
            assert!(frame.len() < 64 * 1024);
        }
        assert!(chunk_identities(vec![]).is_empty());
    }
}
