//! Events: what the client tells its consumers, and the per-consumer queues that carry them.
//!
//! The background task calls [`Hub::emit`] and never waits: each consumer
//! ([`Client::events`](crate::Client::events), [`User::updates`](crate::User::updates)) owns a
//! [`Queue`] that the hub pushes into under a short lock. Presence is state, not a log, so a
//! queue keeps at most one pending `UserUpdated` per identity: a newer update for an identity
//! whose update is still queued merges its reasons into it (the event reads the user's latest
//! state when it is taken). Other events are kept in order up to the queue's capacity; past it
//! the oldest of them is dropped. Both are counted ([`EventStats`]), never silent. A queue's
//! memory is thus bounded by the number of identities plus the capacity.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use futures_util::Stream;
use reach_proto::{Reasons, UpdateReason};
use serde::{Deserialize, Serialize};

use crate::user::{User, UserUpdate};

/// The state of the client's connection, with the hosted SDK's names in serde.
///
/// ```
/// use reach_client::ConnectionState;
/// assert_eq!(serde_json::to_string(&ConnectionState::Connected).unwrap(), r#""connected""#);
/// assert_eq!(ConnectionState::Denied.to_string(), "denied");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    /// Opening a connection (first connect, or reconnecting after a loss).
    Connecting,
    /// `welcome` received; requests and pushes flow.
    Connected,
    /// Closing on request ([`Client::close`](crate::Client::close)).
    Disconnecting,
    /// Closed for good: closed on request, forbidden (4003), or reconnects given up.
    Disconnected,
    /// The server refused the token (4001). [`Client::update_token`](crate::Client::update_token)
    /// with a valid token connects again.
    Denied,
}

impl ConnectionState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Connecting => "connecting",
            ConnectionState::Connected => "connected",
            ConnectionState::Disconnecting => "disconnecting",
            ConnectionState::Disconnected => "disconnected",
            ConnectionState::Denied => "denied",
        }
    }
}

impl std::fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened to the client or to a user it watches.
///
/// Serialised with the hosted SDK's event and field names (`userUpdated` with `user` and
/// `updateReasons`, `connectionStateChanged`, ...):
///
/// ```
/// use reach_client::{ClientEvent, ConnectionState, UpdateReason, User};
///
/// let e = ClientEvent::ConnectionStateChanged(ConnectionState::Connecting);
/// assert_eq!(
///     serde_json::to_value(&e).unwrap(),
///     serde_json::json!({"event": "connectionStateChanged", "state": "connecting"}),
/// );
///
/// let alice = User::from_snapshot(reach_client::proto::User {
///     identity: "alice".into(),
///     friendly_name: None,
///     attributes: "{}".into(),
///     is_online: Some(true),
///     is_notifiable: Some(false),
///     last_seen_at: None,
/// });
/// let e = ClientEvent::UserUpdated {
///     user: alice,
///     reasons: vec![UpdateReason::ReachabilityOnline, UpdateReason::ReachabilityNotifiable],
/// };
/// let v = serde_json::to_value(&e).unwrap();
/// assert_eq!(v["event"], "userUpdated");
/// assert_eq!(v["user"]["isOnline"], true);
/// assert_eq!(v["updateReasons"], serde_json::json!(["reachabilityOnline", "reachabilityNotifiable"]));
/// ```
#[derive(Debug, Clone)]
pub enum ClientEvent {
    /// A watched user (or the client's own user) changed. `user` reads the latest state.
    UserUpdated {
        user: User,
        reasons: Vec<UpdateReason>,
    },
    /// A subscription began (from a `subscribe_user(s)` call).
    UserSubscribed(User),
    /// A subscription ended: `unsubscribe`, or the user was gone after a reconnect.
    UserUnsubscribed(User),
    ConnectionStateChanged(ConnectionState),
    /// The service's reachability switch changed.
    ServiceUpdated {
        reachability_enabled: bool,
    },
    /// The access token expires in a few minutes: call
    /// [`Client::update_token`](crate::Client::update_token).
    TokenAboutToExpire,
    /// The access token expired; the state is now [`ConnectionState::Denied`].
    TokenExpired,
}

impl ClientEvent {
    /// The hosted SDK's name of this event (`userUpdated`, `tokenExpired`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            ClientEvent::UserUpdated { .. } => "userUpdated",
            ClientEvent::UserSubscribed(_) => "userSubscribed",
            ClientEvent::UserUnsubscribed(_) => "userUnsubscribed",
            ClientEvent::ConnectionStateChanged(_) => "connectionStateChanged",
            ClientEvent::ServiceUpdated { .. } => "serviceUpdated",
            ClientEvent::TokenAboutToExpire => "tokenAboutToExpire",
            ClientEvent::TokenExpired => "tokenExpired",
        }
    }
}

#[derive(Serialize)]
#[serde(tag = "event", rename_all = "camelCase")]
enum WireEvent<'a> {
    UserUpdated {
        user: &'a User,
        #[serde(rename = "updateReasons")]
        reasons: &'a [UpdateReason],
    },
    UserSubscribed {
        user: &'a User,
    },
    UserUnsubscribed {
        user: &'a User,
    },
    ConnectionStateChanged {
        state: ConnectionState,
    },
    ServiceUpdated {
        #[serde(rename = "reachabilityEnabled")]
        reachability_enabled: bool,
    },
    TokenAboutToExpire,
    TokenExpired,
}

impl Serialize for ClientEvent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let wire = match self {
            ClientEvent::UserUpdated { user, reasons } => WireEvent::UserUpdated { user, reasons },
            ClientEvent::UserSubscribed(user) => WireEvent::UserSubscribed { user },
            ClientEvent::UserUnsubscribed(user) => WireEvent::UserUnsubscribed { user },
            ClientEvent::ConnectionStateChanged(state) => {
                WireEvent::ConnectionStateChanged { state: *state }
            }
            ClientEvent::ServiceUpdated {
                reachability_enabled,
            } => WireEvent::ServiceUpdated {
                reachability_enabled: *reachability_enabled,
            },
            ClientEvent::TokenAboutToExpire => WireEvent::TokenAboutToExpire,
            ClientEvent::TokenExpired => WireEvent::TokenExpired,
        };
        wire.serialize(s)
    }
}

/// Counters of what the client's event queues did to keep up with slow consumers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventStats {
    /// `UserUpdated` events merged into one still waiting in a queue.
    pub coalesced_updates: u64,
    /// Other events dropped because a queue held `capacity` of them already.
    pub dropped_events: u64,
}

/// Which events a queue takes.
#[derive(Debug, Clone)]
pub(crate) enum Filter {
    All,
    /// Only `UserUpdated` of this identity.
    Identity(Arc<str>),
}

/// The fan-out point: the background task emits, each consumer's queue receives.
#[derive(Debug)]
pub(crate) struct Hub {
    inner: Mutex<HubInner>,
    capacity: usize,
    coalesced: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct HubInner {
    queues: Vec<Weak<Queue>>,
    /// Set when the client has ended; new queues are born closed.
    closed: bool,
}

impl Hub {
    pub fn new(capacity: usize) -> Hub {
        Hub {
            inner: Mutex::new(HubInner::default()),
            capacity: capacity.max(1),
            coalesced: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new consumer queue that receives the events emitted from now on.
    pub fn subscribe(&self, filter: Filter) -> Arc<Queue> {
        let mut inner = self.lock();
        let queue = Arc::new(Queue::new(filter, self.capacity, inner.closed));
        inner.queues.retain(|q| q.strong_count() > 0);
        inner.queues.push(Arc::downgrade(&queue));
        queue
    }

    /// Hands `event` to every live queue. Never waits on a consumer.
    pub fn emit(&self, event: ClientEvent) {
        let mut inner = self.lock();
        let mut gone = false;
        for q in &inner.queues {
            match q.upgrade() {
                Some(q) => q.push(&event, self),
                None => gone = true,
            }
        }
        if gone {
            inner.queues.retain(|q| q.strong_count() > 0);
        }
    }

    /// Ends every stream once it has yielded what it holds.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        for q in inner.queues.drain(..).filter_map(|q| q.upgrade()) {
            q.close();
        }
    }

    pub fn stats(&self) -> EventStats {
        EventStats {
            coalesced_updates: self.coalesced.load(Ordering::Relaxed),
            dropped_events: self.dropped.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug)]
enum Item {
    /// A `UserUpdated` for this identity; its user and reasons wait in `pending`.
    Update(Arc<str>),
    Event(ClientEvent),
}

/// One consumer's queue.
#[derive(Debug)]
pub(crate) struct Queue {
    filter: Filter,
    capacity: usize,
    inner: Mutex<QueueInner>,
}

#[derive(Debug, Default)]
struct QueueInner {
    items: VecDeque<Item>,
    /// Invariant: holds an entry exactly for the identities with an `Item::Update` in `items`.
    pending: HashMap<Arc<str>, (User, Reasons)>,
    /// How many `Item::Event`s `items` holds (at most `capacity`).
    events: usize,
    waker: Option<Waker>,
    closed: bool,
}

/// What a queue yields.
enum Popped {
    Update(User, Reasons),
    Event(ClientEvent),
}

impl Queue {
    fn new(filter: Filter, capacity: usize, closed: bool) -> Queue {
        Queue {
            filter,
            capacity,
            inner: Mutex::new(QueueInner {
                closed,
                ..QueueInner::default()
            }),
        }
    }

    /// A queue that yields nothing (for handles without a client).
    pub fn closed() -> Arc<Queue> {
        Arc::new(Queue::new(Filter::All, 1, true))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, event: &ClientEvent, hub: &Hub) {
        if let Filter::Identity(id) = &self.filter {
            match event {
                ClientEvent::UserUpdated { user, .. } if user.identity() == &**id => {}
                _ => return,
            }
        }
        let mut q = self.lock();
        if q.closed {
            return;
        }
        match event {
            ClientEvent::UserUpdated { user, reasons } => {
                let reasons: Reasons = reasons.iter().copied().collect();
                let id = &user.cell.identity;
                if let Some((_, merged)) = q.pending.get_mut(id) {
                    *merged = merged.union(reasons);
                    hub.coalesced.fetch_add(1, Ordering::Relaxed);
                } else {
                    q.pending.insert(Arc::clone(id), (user.clone(), reasons));
                    q.items.push_back(Item::Update(Arc::clone(id)));
                }
            }
            other => {
                if q.events >= self.capacity
                    && let Some(at) = q.items.iter().position(|i| matches!(i, Item::Event(_)))
                {
                    q.items.remove(at);
                    q.events -= 1;
                    hub.dropped.fetch_add(1, Ordering::Relaxed);
                }
                q.items.push_back(Item::Event(other.clone()));
                q.events += 1;
            }
        }
        if let Some(w) = q.waker.take() {
            w.wake();
        }
    }

    fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        if let Some(w) = q.waker.take() {
            w.wake();
        }
    }

    fn pop(q: &mut QueueInner) -> Option<Popped> {
        match q.items.pop_front()? {
            Item::Update(id) => {
                let (user, reasons) = q.pending.remove(&id)?;
                Some(Popped::Update(user, reasons))
            }
            Item::Event(e) => {
                q.events -= 1;
                Some(Popped::Event(e))
            }
        }
    }

    fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<Popped>> {
        let mut q = self.lock();
        if let Some(p) = Self::pop(&mut q) {
            return Poll::Ready(Some(p));
        }
        if q.closed {
            return Poll::Ready(None);
        }
        q.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn try_pop(&self) -> Option<Popped> {
        Self::pop(&mut self.lock())
    }

    fn len(&self) -> usize {
        self.lock().items.len()
    }
}

impl Popped {
    fn into_event(self) -> ClientEvent {
        match self {
            Popped::Update(user, reasons) => ClientEvent::UserUpdated {
                user,
                reasons: reasons.to_vec(),
            },
            Popped::Event(e) => e,
        }
    }

    fn into_update(self) -> Option<UserUpdate> {
        match self {
            Popped::Update(user, reasons) => Some(UserUpdate {
                user,
                reasons: reasons.to_vec(),
            }),
            Popped::Event(_) => None,
        }
    }
}

/// The client's events from the moment [`Client::events`](crate::Client::events) was called:
/// a [`Stream`] of [`ClientEvent`]s (also readable with [`recv`](EventStream::recv)). Ends when
/// the client has ended (closed, forbidden, or reconnects given up) and every event was read.
#[derive(Debug)]
pub struct EventStream {
    queue: Arc<Queue>,
}

impl EventStream {
    pub(crate) fn new(queue: Arc<Queue>) -> Self {
        EventStream { queue }
    }

    /// The next event; `None` once the client has ended and the queue is empty.
    pub async fn recv(&mut self) -> Option<ClientEvent> {
        std::future::poll_fn(|cx| self.queue.poll_pop(cx))
            .await
            .map(Popped::into_event)
    }

    /// The next event if one is queued, without waiting.
    pub fn try_recv(&mut self) -> Option<ClientEvent> {
        self.queue.try_pop().map(Popped::into_event)
    }

    /// How many events are queued (each coalesced user update counts once).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Stream for EventStream {
    type Item = ClientEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ClientEvent>> {
        self.queue.poll_pop(cx).map(|p| p.map(Popped::into_event))
    }
}

/// The updates of one user: see [`User::updates`](crate::User::updates).
#[derive(Debug)]
pub struct UserUpdates {
    queue: Arc<Queue>,
}

impl UserUpdates {
    pub(crate) fn new(queue: Arc<Queue>) -> Self {
        UserUpdates { queue }
    }

    /// The next update; `None` once the client has ended.
    pub async fn recv(&mut self) -> Option<UserUpdate> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }

    /// The next update if one is queued, without waiting.
    pub fn try_recv(&mut self) -> Option<UserUpdate> {
        while let Some(p) = self.queue.try_pop() {
            if let Some(u) = p.into_update() {
                return Some(u);
            }
        }
        None
    }
}

impl Stream for UserUpdates {
    type Item = UserUpdate;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<UserUpdate>> {
        loop {
            match self.queue.poll_pop(cx) {
                Poll::Ready(Some(p)) => {
                    if let Some(u) = p.into_update() {
                        return Poll::Ready(Some(u));
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(identity: &str, online: Option<bool>) -> User {
        User::from_snapshot(reach_proto::User {
            identity: identity.into(),
            friendly_name: None,
            attributes: "{}".into(),
            is_online: online,
            is_notifiable: None,
            last_seen_at: None,
        })
    }

    fn updated(u: &User, reasons: &[UpdateReason]) -> ClientEvent {
        ClientEvent::UserUpdated {
            user: u.clone(),
            reasons: reasons.to_vec(),
        }
    }

    #[test]
    fn a_lagging_queue_keeps_one_update_per_user_with_merged_reasons() {
        let hub = Hub::new(16);
        let q = hub.subscribe(Filter::All);
        let mut events = EventStream::new(Arc::clone(&q));
        let (alice, bob) = (user("alice", Some(true)), user("bob", None));
        hub.emit(updated(&alice, &[UpdateReason::ReachabilityOnline]));
        hub.emit(ClientEvent::TokenAboutToExpire);
        hub.emit(updated(&bob, &[UpdateReason::FriendlyName]));
        for _ in 0..50 {
            hub.emit(updated(&alice, &[UpdateReason::Attributes]));
        }
        assert_eq!(
            events.len(),
            3,
            "bounded: one item per user plus the other event"
        );
        match events.try_recv() {
            Some(ClientEvent::UserUpdated { user, reasons }) => {
                assert_eq!(user.identity(), "alice");
                assert_eq!(
                    reasons,
                    vec![UpdateReason::Attributes, UpdateReason::ReachabilityOnline]
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            events.try_recv(),
            Some(ClientEvent::TokenAboutToExpire)
        ));
        assert!(
            matches!(events.try_recv(), Some(ClientEvent::UserUpdated { user, .. }) if user.identity() == "bob")
        );
        assert!(events.try_recv().is_none());
        assert_eq!(hub.stats().coalesced_updates, 50);
        // Once read, the next update is queued anew rather than merged.
        hub.emit(updated(&alice, &[UpdateReason::FriendlyName]));
        assert!(
            matches!(events.try_recv(), Some(ClientEvent::UserUpdated { reasons, .. }) if reasons == vec![UpdateReason::FriendlyName])
        );
    }

    #[test]
    fn other_events_past_capacity_drop_the_oldest_and_are_counted() {
        let hub = Hub::new(2);
        let mut events = EventStream::new(hub.subscribe(Filter::All));
        hub.emit(ClientEvent::ConnectionStateChanged(
            ConnectionState::Connecting,
        ));
        hub.emit(ClientEvent::ConnectionStateChanged(
            ConnectionState::Connected,
        ));
        hub.emit(ClientEvent::TokenExpired);
        assert_eq!(events.len(), 2);
        assert_eq!(hub.stats().dropped_events, 1);
        assert!(matches!(
            events.try_recv(),
            Some(ClientEvent::ConnectionStateChanged(
                ConnectionState::Connected
            ))
        ));
        assert!(matches!(events.try_recv(), Some(ClientEvent::TokenExpired)));
    }

    #[test]
    fn a_user_filter_takes_only_that_users_updates() {
        let hub = Hub::new(4);
        let alice = user("alice", Some(true));
        let mut updates = UserUpdates::new(hub.subscribe(Filter::Identity("alice".into())));
        hub.emit(updated(&user("bob", None), &[UpdateReason::FriendlyName]));
        hub.emit(ClientEvent::TokenExpired);
        hub.emit(updated(&alice, &[UpdateReason::ReachabilityOnline]));
        let u = updates.try_recv().expect("alice's update");
        assert_eq!(u.user.identity(), "alice");
        assert!(updates.try_recv().is_none());
    }

    #[tokio::test]
    async fn streams_wake_on_emit_and_end_after_close() {
        use futures_util::StreamExt;
        let hub = Arc::new(Hub::new(4));
        let mut events = EventStream::new(hub.subscribe(Filter::All));
        let h = Arc::clone(&hub);
        let emitter = tokio::spawn(async move {
            tokio::task::yield_now().await;
            h.emit(ClientEvent::TokenAboutToExpire);
            h.close();
        });
        assert!(matches!(
            events.next().await,
            Some(ClientEvent::TokenAboutToExpire)
        ));
        assert!(events.next().await.is_none());
        emitter.await.unwrap();
        let mut late = EventStream::new(hub.subscribe(Filter::All));
        assert!(late.recv().await.is_none(), "born closed");
    }

    #[test]
    fn dropped_consumers_are_forgotten() {
        let hub = Hub::new(4);
        let q = hub.subscribe(Filter::All);
        drop(q);
        hub.emit(ClientEvent::TokenExpired);
        assert!(hub.lock().queues.is_empty());
    }
}
