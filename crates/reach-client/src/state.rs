//! The state the background task shares with every handle: the connection's state, the
//! service's switch, the own user and each subscribed user's cell, the token, and how the last
//! connection ended. Only the task writes it (`apply.rs`, `task.rs`); handles read it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use reach_proto::{Encoding, Reasons};

use crate::connect::Welcome;
use crate::events::{ClientEvent, ConnectionState, Hub};
use crate::options::Options;
use crate::user::UserCell;

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
    /// The state of a client whose first connection was welcomed with `w`.
    pub fn new(w: Welcome, encoding: Encoding, token: String) -> ClientState {
        ClientState {
            connection: ConnectionState::Connected,
            reachability_enabled: w.reachability_enabled,
            service_sid: w.service_sid,
            connection_id: w.connection_id,
            encoding,
            own: UserCell::new(w.user, true),
            token,
            token_expires_at: w.token_expires_at,
            heartbeat_interval: w.heartbeat_interval,
            users: HashMap::new(),
            detached: HashMap::new(),
            last_disconnect: None,
            connected_since: Some(std::time::Instant::now()),
        }
    }

    /// The cell of `identity`: the own user or a subscribed one.
    pub fn cell(&self, identity: &str) -> Option<&Arc<UserCell>> {
        if *self.own.identity == *identity {
            Some(&self.own)
        } else {
            self.users.get(identity)
        }
    }

    /// Subscribes `user`'s cell (reviving a detached one); returns it, whether it was newly
    /// subscribed, and what changed in its state.
    pub fn subscribe(&mut self, user: reach_proto::User) -> (Arc<UserCell>, bool, Reasons) {
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

    /// Unsubscribes `identity`; its cell is kept (weakly) for handles still alive.
    pub fn unsubscribe(&mut self, identity: &str) -> Option<Arc<UserCell>> {
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
    pub fn set_connection(&self, to: ConnectionState) {
        let changed = {
            let mut st = self.state();
            std::mem::replace(&mut st.connection, to) != to
        };
        if changed {
            tracing::debug!(state = %to, "connection state");
            self.hub.emit(ClientEvent::ConnectionStateChanged(to));
        }
    }

    /// Emits events in order.
    pub fn emit_all(&self, events: Vec<ClientEvent>) {
        for e in events {
            self.hub.emit(e);
        }
    }
}
