//! Rust client SDK for the Reach presence gateway (`reachd`, protocol v1): connect with an
//! access token, subscribe to users, and follow their presence (`is_online`,
//! `is_notifiable`), profile and the service's reachability switch as they change.
//!
//! # Parts
//! - [`Client`]: the application's handle (cheap to clone). Requests are `async` methods;
//!   getters ([`Client::connection_state`], [`Client::reachability_enabled`], [`Client::user`])
//!   are synchronous and read shared state.
//! - [`User`]: a handle on one user whose getters always return the latest known state.
//! - [`ClientEvent`] / [`EventStream`] ([`Client::events`]) and [`UserUpdates`]
//!   ([`User::updates`]): what happened, with [`UpdateReason`]s.
//! - [`ClientBuilder`] and [`ReconnectPolicy`]: encoding, timeouts, backoff.
//! - Inside: one background task per client owns the WebSocket and runs its sessions and
//!   reconnects (`task.rs`); `connect.rs` opens each connection (URL check, upgrade, `hello`,
//!   `welcome`); `request.rs` carries requests and replies between the handles and the task;
//!   `apply.rs` applies each frame to the shared state (`state.rs`) and says which events
//!   follow, reporting only what changed; `events.rs` queues events per consumer.
//!
//! # Data flow
//! ```text
//!  Client / User ──requests (mpsc, id'd)──▶ background task ──frames──▶ reachd
//!        ▲   ▲                                 │   ▲
//!        │   └──replies (oneshot, by id)───────┘   │ replies, pushes, pings
//!        │                                     │
//!   getters read ◀── shared state (users' cells, flags) ◀── task applies every frame
//!                                              │
//!   EventStream / UserUpdates ◀── per-consumer queues ◀── task emits (never waits)
//! ```
//! The task applies each reply and push to the shared state first, then emits events. A
//! consumer that falls behind never slows the socket: its queue keeps one pending update per
//! user (latest state, reasons merged), so memory stays bounded and the final state is never
//! lost. The task pings at the interval the server announces; silence for 2.5 intervals
//! counts as a dead server. A lost connection is re-established with exponential backoff and
//! full jitter (or after a draining server's `retry_after_ms`); the task then resubscribes
//! and reports only what really changed meanwhile. A refused token (close 4001) leaves the
//! client `Denied` until [`Client::update_token`] hands over a valid one.
//!
//! # Example
//! ```no_run
//! use futures_util::StreamExt;
//! use reach_client::{Client, ClientEvent};
//!
//! # async fn run() -> Result<(), reach_client::Error> {
//! let client = Client::connect("ws://127.0.0.1:8080/v1/ws", "<access token>").await?;
//! let mut events = client.events();
//! let alice = client.subscribe_user("alice").await?;
//! println!("alice online: {:?}", alice.is_online());
//! while let Some(event) = events.next().await {
//!     if let ClientEvent::UserUpdated { user, reasons } = event {
//!         println!("{} online={:?} because {reasons:?}", user.identity(), user.is_online());
//!     }
//! }
//! # Ok(()) }
//! ```

mod apply;
mod connect;
mod error;
mod events;
mod options;
mod request;
mod state;
mod task;
mod tls;
mod user;

use std::sync::Arc;
use std::time::Duration;

pub use error::{Error, Result};
pub use events::{ClientEvent, ConnectionState, EventStats, EventStream, UserUpdates};
pub use options::{Encoding, ReconnectPolicy};
/// The wire protocol crate (frames, codes, the wire [`User`](reach_proto::User) object).
pub use reach_proto as proto;
pub use reach_proto::{BindingType, IdentityError, Reasons, UpdateReason};
pub use state::Disconnect;
pub use tls::TlsConfig;
pub use user::{User, UserUpdate, reasons_between};

use events::Filter;
use options::Options;
use request::{Command, Link, Reply, Request};
use state::{ClientState, Shared};
use task::Task;
use tokio::sync::{Notify, mpsc};
use user::UserCell;

/// Capacity of the command channel between handles and the background task.
const COMMAND_QUEUE: usize = 256;

/// The outcome of [`Client::subscribe_users`]: the users now subscribed and the identities
/// that could not be (20404 for an identity the service does not have, 20429 past the
/// per-connection limit, ...), each list in the order the identities were asked for.
#[derive(Debug, Clone)]
pub struct Subscribed {
    pub users: Vec<User>,
    pub errors: Vec<IdentityError>,
}

/// Configures a [`Client`] before connecting; from [`Client::builder`].
///
/// ```no_run
/// use std::time::Duration;
/// use reach_client::{Client, Encoding, ReconnectPolicy};
///
/// # async fn run() -> Result<(), reach_client::Error> {
/// let client = Client::builder("ws://127.0.0.1:8080", "<access token>")
///     .encoding(Encoding::Json)
///     .reconnect(ReconnectPolicy::exponential(Duration::from_millis(200), Duration::from_secs(10)))
///     .request_timeout(Duration::from_secs(5))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    url: String,
    token: String,
    options: Options,
}

impl ClientBuilder {
    /// `reach.v1.msgpack` (the default) or `reach.v1.json`.
    pub fn encoding(mut self, encoding: Encoding) -> Self {
        self.options.encoding = encoding;
        self
    }

    /// How to reconnect after a loss; [`ReconnectPolicy::none`] disables reconnecting.
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.options.reconnect = policy;
        self
    }

    /// How long a request waits for its reply (default 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.options.request_timeout = timeout;
        self
    }

    /// How long connecting (TCP, upgrade, hello, welcome) may take (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.options.connect_timeout = timeout;
        self
    }

    /// Silence from the server after which it counts as dead and the client reconnects
    /// (default: 2.5 × the heartbeat interval announced in `welcome`).
    pub fn dead_server_timeout(mut self, timeout: Duration) -> Self {
        self.options.dead_after = Some(timeout);
        self
    }

    /// The certificates a `wss://` gateway may present (default: the system's trusted roots).
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.options.tls = Some(tls);
        self
    }

    /// The `client` field of `hello` (default `reach-client-rust/<version>`).
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.options.client_name = name.into();
        self
    }

    /// How many events other than user updates a lagging consumer's queue keeps before it
    /// drops the oldest (default 4096; user updates coalesce and need no limit).
    pub fn event_queue_capacity(mut self, capacity: usize) -> Self {
        self.options.event_capacity = capacity.max(1);
        self
    }

    /// Connects and returns once `welcome` has arrived.
    ///
    /// Fails with [`Error::InvalidUrl`], [`Error::Connect`] (unreachable),
    /// [`Error::Rejected`] (upgrade refused), [`Error::Denied`] (token refused) or
    /// [`Error::Timeout`]. The first connection is not retried; later losses are.
    pub async fn connect(self) -> Result<Client> {
        let url = connect::normalize_url(&self.url)?;
        let conn = connect::open(&url, &self.token, &self.options).await?;
        let state = ClientState::new(conn.welcome.clone(), conn.encoding, self.token);
        let shared = Arc::new(Shared::new(self.options, state));
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let link = Arc::new(Link { shared, cmds: tx });
        let shutdown = Arc::new(Notify::new());
        let task = Task::new(Arc::clone(&link), url, rx, Arc::clone(&shutdown));
        tokio::spawn(task.run(conn));
        Ok(Client {
            link,
            _guard: Arc::new(Guard { shutdown }),
        })
    }
}

/// Ends the background task when the last [`Client`] clone is dropped.
#[derive(Debug)]
struct Guard {
    shutdown: Arc<Notify>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shutdown.notify_one();
    }
}

/// A connection to a Reach gateway, kept alive (and re-established) by a background task.
///
/// Clones share the connection; when the last clone is dropped the client says `bye` and
/// its event streams end. See the [crate docs](crate) for the data flow.
#[derive(Clone)]
pub struct Client {
    link: Arc<Link>,
    _guard: Arc<Guard>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.link.shared.state();
        f.debug_struct("Client")
            .field("identity", &st.own.identity)
            .field("service_sid", &st.service_sid)
            .field("connection", &st.connection)
            .finish()
    }
}

impl Client {
    /// Connects with the default options (MessagePack, reconnects with backoff, 10 s request
    /// timeout); returns once `welcome` has arrived.
    ///
    /// `url` is the gateway's WebSocket URL, `ws://HOST:PORT/v1/ws` (`ws://HOST:PORT` works
    /// too); `token` an access token (JWT) naming the identity and service.
    pub async fn connect(url: &str, token: &str) -> Result<Client> {
        Self::builder(url, token).connect().await
    }

    /// Starts configuring a client; finish with [`ClientBuilder::connect`].
    pub fn builder(url: impl Into<String>, token: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            token: token.into(),
            options: Options::default(),
        }
    }

    /// The service's reachability switch, as last reported by the server.
    pub fn reachability_enabled(&self) -> bool {
        self.link.shared.state().reachability_enabled
    }

    /// The client's own user (always subscribed).
    pub fn user(&self) -> User {
        let own = Arc::clone(&self.link.shared.state().own);
        self.link.user(own)
    }

    pub fn connection_state(&self) -> ConnectionState {
        self.link.shared.state().connection
    }

    /// The service SID the token names.
    pub fn service_sid(&self) -> String {
        self.link.shared.state().service_sid.clone()
    }

    /// The id the server gave the current (or last) connection.
    pub fn connection_id(&self) -> String {
        self.link.shared.state().connection_id.clone()
    }

    /// The encoding the server chose for the current connection.
    pub fn encoding(&self) -> Encoding {
        self.link.shared.state().encoding
    }

    /// When the current access token expires (unix seconds).
    pub fn token_expires_at(&self) -> i64 {
        self.link.shared.state().token_expires_at
    }

    /// How the last connection ended, if one did: close code, reason, the server's
    /// `retry_after`, and when.
    pub fn last_disconnect(&self) -> Option<Disconnect> {
        self.link.shared.state().last_disconnect.clone()
    }

    /// When the current connection's `welcome` arrived; `None` while not connected.
    pub fn connected_since(&self) -> Option<std::time::Instant> {
        self.link.shared.state().connected_since
    }

    /// The subscribed users (not including the own user), in no particular order.
    pub fn subscribed_users(&self) -> Vec<User> {
        let cells: Vec<Arc<UserCell>> = self.link.shared.state().users.values().cloned().collect();
        cells.into_iter().map(|c| self.link.user(c)).collect()
    }

    /// The events from now on, as a [`Stream`](futures_util::Stream). Each call makes an
    /// independent consumer; a slow one never holds up the others or the socket.
    pub fn events(&self) -> EventStream {
        EventStream::new(self.link.shared.hub.subscribe(Filter::All))
    }

    /// What the event queues did for slow consumers (coalesced updates, dropped events).
    pub fn event_stats(&self) -> EventStats {
        self.link.shared.hub.stats()
    }

    /// Subscribes to one user and returns its handle with the current state.
    ///
    /// An identity the service does not have fails with [`Error::Server`] (code 20404).
    pub async fn subscribe_user(&self, identity: &str) -> Result<User> {
        let mut outcome = self.subscribe_users([identity]).await?;
        if let Some(e) = outcome.errors.pop() {
            return Err(Error::Server {
                code: e.code,
                message: e.message,
            });
        }
        outcome
            .users
            .pop()
            .ok_or_else(|| Error::Protocol(format!("no user {identity:?} in the reply")))
    }

    /// Subscribes to several users at once (split into frames of at most 500 identities).
    /// Identities that fail are listed in [`Subscribed::errors`]; the others succeed.
    pub async fn subscribe_users<I, S>(&self, identities: I) -> Result<Subscribed>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let identities: Vec<String> = identities
            .into_iter()
            .map(|s| s.as_ref().to_owned())
            .collect();
        let order: std::collections::HashMap<String, usize> = identities
            .iter()
            .enumerate()
            .rev()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        let mut outcome = Subscribed {
            users: Vec::with_capacity(identities.len()),
            errors: vec![],
        };
        for chunk in request::chunk_identities(identities) {
            match self.link.request(Request::Subscribe(chunk)).await? {
                Reply::Subscribed { users, errors } => {
                    outcome.users.extend(users);
                    outcome.errors.extend(errors);
                }
                other => return Err(unexpected("subscribe", &other)),
            }
        }
        // The server fills its reply as profiles load; hand them back in the order asked.
        let rank = |identity: &str| order.get(identity).copied().unwrap_or(usize::MAX);
        outcome.users.sort_by_key(|u| rank(u.identity()));
        outcome.errors.sort_by_key(|e| rank(&e.identity));
        Ok(outcome)
    }

    /// Unsubscribes from several users (see [`User::unsubscribe`]).
    pub async fn unsubscribe_users<I, S>(&self, identities: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let identities: Vec<String> = identities
            .into_iter()
            .map(|s| s.as_ref().to_owned())
            .collect();
        for chunk in request::chunk_identities(identities) {
            match self.link.request(Request::Unsubscribe(chunk)).await? {
                Reply::Done => {}
                other => return Err(unexpected("unsubscribe", &other)),
            }
        }
        Ok(())
    }

    /// Hands over a fresh access token (same identity and service); returns its expiry (unix
    /// seconds). Later reconnects present it. In the `Denied` state this reconnects.
    pub async fn update_token(&self, token: impl Into<String>) -> Result<i64> {
        match self
            .link
            .request(Request::UpdateToken(token.into()))
            .await?
        {
            Reply::TokenUpdated { expires_at } => Ok(expires_at),
            other => Err(unexpected("update_token", &other)),
        }
    }

    /// Registers a device for push notifications (making the own user notifiable); returns
    /// the binding SID (`BS...`). Registering the same device again updates it.
    pub async fn set_push_registration(
        &self,
        binding_type: BindingType,
        address: &str,
    ) -> Result<String> {
        let request = Request::RegisterPush {
            binding_type: binding_type.as_str().to_owned(),
            address: address.to_owned(),
        };
        match self.link.request(request).await? {
            Reply::PushRegistered { binding_sid } => Ok(binding_sid),
            other => Err(unexpected("register_push", &other)),
        }
    }

    /// Removes a push registration made with [`set_push_registration`](Self::set_push_registration).
    /// An unknown registration fails with [`Error::Server`] (code 20404).
    pub async fn remove_push_registration(
        &self,
        binding_type: BindingType,
        address: &str,
    ) -> Result<()> {
        let request = Request::UnregisterPush {
            binding_type: binding_type.as_str().to_owned(),
            address: address.to_owned(),
        };
        match self.link.request(request).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected("unregister_push", &other)),
        }
    }

    /// A round trip to the server; returns its duration.
    pub async fn ping(&self) -> Result<Duration> {
        match self.link.request(Request::Ping).await? {
            Reply::Pong { rtt } => Ok(rtt),
            other => Err(unexpected("ping", &other)),
        }
    }

    /// Says `bye` (the own user goes offline at once if this was its last connection),
    /// closes the socket and ends the background task and the event streams. Waits until
    /// done; the state is then `Disconnected` for every clone.
    pub async fn close(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self
            .link
            .cmds
            .send(Command::Close { done: tx })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }
}

fn unexpected(request: &str, reply: &Reply) -> Error {
    Error::Protocol(format!("unexpected reply to {request}: {reply:?}"))
}
