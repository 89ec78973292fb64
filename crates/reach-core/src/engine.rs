//! The presence engine: a sharded map of users keyed by (service SID, identity), the
//! subscription index, presence diffs and their fan-out.
//!
//! Each [`Entry`] lives in one shard of a `DashMap` and holds everything one diff needs: the
//! user's local connection count, its published online state, its profile (friendly name,
//! attributes, bindings; loaded from the store on first interest), and the connections
//! subscribed to it. A transition locks only that user's shard, builds one [`Update`] and hands
//! the same `Arc` to each subscriber's [`Outbox`]; the bytes are encoded once per encoding, on
//! first use by a writer. No lock is held across an `.await`.
//!
//! Rules (protocol.md, "Presence rules"):
//! - online while at least one connection is attached; after the last one ends, the user stays
//!   online for `offline_grace` and goes offline only if nobody reconnected (`bye` skips the
//!   grace);
//! - while the service has reachability disabled no presence is published and the flags read
//!   null; disabling publishes the null flags to those who were shown a value, enabling
//!   publishes the users already online at once;
//! - `is_online` is null for a user not online since the latest enabling (`online_epoch`),
//!   `is_notifiable` null for a user that never had a push binding.
//!
//! Entries with no connection, no subscriber and no grace pending are removed.
//!
//! Cluster mode (an engine built with [`Engine::new_clustered`]): a user is online while any
//! node *holds* it (has a connection, or is inside its grace). The entry's `online` is this
//! node's hold; `remote` is whether another node holds it, learned from the backplane. What
//! subscribers see is `online || remote.held`. The engine reports, through a channel of
//! [`ClusterEvent`]s sent under the user's shard lock (so per user they are in order), when
//! this node starts or stops holding a user and when a user gains its first or loses its last
//! watcher here; the backplane answers with [`Engine::apply_remote`]. A `subscribed` reply for
//! a user whose remote state is not known yet waits (its outbox slot is held back) until the
//! backplane's answer arrives, so the first state a watcher sees is the cluster's.
//!
//! In any mode, a watcher whose `subscribed` reply waits for the user's profile from the store
//! is skipped by fan-outs until [`Engine::fill`]: the reply carries the state as it is then,
//! and an update queued behind it would only repeat it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arcstr::ArcStr;
use dashmap::DashMap;
use foldhash::fast::RandomState;
pub use reach_proto::ServiceState;
use reach_proto::flags::{is_notifiable_flag, is_online_flag, last_seen};
use reach_proto::{
    CloseCode, Encoding, Reasons, ServerFrame, UpdateReason, User, encode, now_unix,
};
use tokio::sync::mpsc;

use crate::metrics::EngineMetrics;
use crate::outbox::{Outbox, PushOutcome, SlotId, Update};

/// Connections whose queued updates one task sends ([`Engine::flush_later`]).
const FLUSH_CHUNK: usize = 256;

/// Identifies a connection within this process.
pub type ConnId = u64;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub offline_grace: Duration,
    /// Bytes an outbox may hold before its connection is closed with 4009.
    pub max_outbox_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            offline_grace: Duration::from_secs(5),
            max_outbox_bytes: 1 << 20,
        }
    }
}

/// Key of a user: `<service SID>/<identity>` (a service SID never holds a `/`). One pointer
/// (the length is kept in the shared allocation, not beside the pointer as in an `Arc<str>`):
/// every idle socket keeps one key per user it watches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserKey(ArcStr);

impl UserKey {
    pub fn new(service_sid: &str, identity: &str) -> Self {
        let mut s = String::with_capacity(service_sid.len() + 1 + identity.len());
        s.push_str(service_sid);
        s.push('/');
        s.push_str(identity);
        UserKey(ArcStr::from(s))
    }
    pub fn service(&self) -> &str {
        self.0.split_once('/').map_or("", |(s, _)| s)
    }
    pub fn identity(&self) -> &str {
        self.0.split_once('/').map_or("", |(_, i)| i)
    }
    /// `<service SID>/<identity>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The inverse of [`UserKey::as_str`].
    pub fn parse(s: &str) -> Option<UserKey> {
        s.split_once('/').map(|(svc, id)| UserKey::new(svc, id))
    }
}

/// What the store knows of a user, as the engine needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// Store revision; a profile only ever replaces an older one.
    pub revision: i64,
    pub friendly_name: Option<String>,
    pub attributes: String,
    pub binding_count: i64,
    pub ever_had_binding: bool,
    /// Reachability epoch in which the user was last online (0 = never).
    pub online_epoch: i64,
    /// When the user went offline, as the store last recorded it (unix seconds).
    pub last_seen_at: Option<i64>,
}

/// Something the engine wants written to the store, off the hot path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PersistEvent {
    /// The user was online in this reachability epoch.
    Online {
        service_sid: String,
        identity: String,
        epoch: i64,
    },
    /// The user's presence, as subscribers see it, changed (the store keeps it for the
    /// last-seen time, for webhooks and for the recovery after a crash).
    Presence(PresenceChange),
}

/// A change of a user's presence as every subscriber sees it: online at its first connection
/// anywhere, offline when the last one ended and the grace ran out (or at `bye`). Made by the
/// engine of a single node, and by the cluster backplane when a node's hold was the first or the
/// last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    pub key: UserKey,
    pub online: bool,
    /// When it changed, unix seconds.
    pub at: i64,
    /// Orders the changes of one user (newer is larger; a store keeps only newer ones): unix
    /// microseconds made strictly increasing by [`PresenceClock`], or the cluster's version.
    pub version: i64,
}

/// Versions of [`PresenceChange`]s on one node: unix microseconds, strictly increasing even if
/// the system clock steps back; [`PresenceClock::advance`] raises it past the versions already
/// stored before a restart.
#[derive(Debug, Default)]
pub struct PresenceClock(AtomicI64);

impl PresenceClock {
    /// The next version: now in microseconds, or one more than the last one if that is later.
    pub fn next(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let mut last = self.0.load(Ordering::Relaxed);
        loop {
            let next = now.max(last.saturating_add(1));
            match self
                .0
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Makes every later version greater than `floor`.
    pub fn advance(&self, floor: i64) {
        self.0.fetch_max(floor, Ordering::Relaxed);
    }
}

/// A user's presence as the engine knows it ([`Engine::presence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presence {
    /// Online as subscribers see it.
    pub online: bool,
    /// The latest reachability epoch the user was seen online in.
    pub online_epoch: i64,
    /// When it last went offline (unix seconds), if known here.
    pub last_seen_at: Option<i64>,
}

/// What the engine tells the cluster backplane (cluster mode only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// This node started holding the user (first connection, not inside a grace).
    Held(UserKey),
    /// This node stopped holding the user (grace over, or `bye`).
    Released(UserKey),
    /// The first connection of this node watching the user (other than its own).
    Watch(UserKey),
    /// The last watcher of the user on this node went away.
    Unwatch(UserKey),
}

/// Whether other nodes hold a user, as the backplane last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Remote {
    /// Orders the backplane's reports: a report applies only if newer than the last one.
    version: u64,
    held: bool,
}

/// One live connection as the engine sees it.
#[derive(Debug)]
pub struct Conn {
    pub id: ConnId,
    /// Its user (service and identity are read from it: one allocation per connection).
    pub key: UserKey,
    pub outbox: Outbox,
}

/// A connection is the waker its socket's reads are polled with: a wake-up reaches the session
/// through the outbox ([`Outbox::wake_read`]), which tells it to poll the read side again. A
/// wake-up that only the queue caused then writes and leaves the read side alone.
impl std::task::Wake for Conn {
    fn wake(self: Arc<Self>) {
        self.outbox.wake_read();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.outbox.wake_read();
    }
}

impl Conn {
    pub fn service(&self) -> &str {
        self.key.service()
    }
    pub fn identity(&self) -> &str {
        self.key.identity()
    }
}

/// What only some entries need for a while: a watched user's state from the backplane (cluster
/// mode), and the `subscribed` replies to fill once something arrives.
#[derive(Default)]
struct Side {
    /// Whether another node holds the user; `None` until the backplane answered.
    remote: Option<Remote>,
    /// `subscribed` slots waiting for `remote`.
    waiting: Vec<(Arc<Conn>, SlotId)>,
    /// Watchers whose `subscribed` slot waits for the user's profile from the store
    /// ([`Attach::NeedsProfile`], until [`Engine::fill`]). Fan-outs skip them: the fill puts
    /// the state of its own time in the slot, so a change made before it is in the reply, and
    /// an update of it queued behind the slot would repeat it.
    loading: Vec<(Arc<Conn>, SlotId)>,
}

impl Side {
    fn is_empty(&self) -> bool {
        self.remote.is_none() && self.waiting.is_empty() && self.loading.is_empty()
    }
}

struct Entry {
    /// Connections of this user attached on this node.
    conns: u32,
    /// This node holds the user: true while `conns > 0` or inside the offline grace. Without a
    /// cluster, this is the published presence.
    online: bool,
    /// `online_epoch` went down the persist channel and the store may not have it yet: the
    /// entry stays in memory (REST reads the epoch from it) until `Engine::epoch_recorded`.
    epoch_pending: bool,
    /// Cluster mode: subscribers that are not the user's own connections.
    watchers: u32,
    /// Cluster mode, while the user is watched here: what the backplane said; and watchers
    /// whose reply waits (`Side`). Boxed, so a user's entry carries one pointer for it while
    /// it has none of them.
    side: Option<Box<Side>>,
    /// Non-zero while an offline grace timer is pending; a timer acts only if it still matches.
    grace_gen: u64,
    /// Highest epoch seen online (from the store, raised when the user comes online).
    online_epoch: i64,
    /// `None` until loaded from the store.
    profile: Option<Stored>,
    /// Connections subscribed to this user (its own connections included).
    subscribers: Subscribers,
}

/// A [`Profile`] as an entry keeps it: only what the engine reads back, in fewer bytes (every
/// user in memory holds one, in its map's bucket), and no allocation for what is unset.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    revision: i64,
    friendly_name: Option<Box<str>>,
    /// `None`: the store's default, `{}`.
    attributes: Option<Box<str>>,
    binding_count: u32,
    ever_had_binding: bool,
    last_seen_at: Option<i64>,
}

/// The attributes of a user who has none.
const NO_ATTRIBUTES: &str = "{}";

impl From<Profile> for Stored {
    fn from(p: Profile) -> Stored {
        Stored {
            revision: p.revision,
            friendly_name: p.friendly_name.map(String::into_boxed_str),
            attributes: (p.attributes != NO_ATTRIBUTES).then(|| p.attributes.into_boxed_str()),
            binding_count: u32::try_from(p.binding_count.max(0)).unwrap_or(u32::MAX),
            ever_had_binding: p.ever_had_binding,
            last_seen_at: p.last_seen_at,
        }
    }
}

impl Stored {
    fn attributes(&self) -> &str {
        self.attributes.as_deref().unwrap_or(NO_ATTRIBUTES)
    }

    fn is_notifiable(&self, svc: ServiceState) -> Option<bool> {
        is_notifiable_flag(svc, self.ever_had_binding, i64::from(self.binding_count))
    }
}

/// A user's subscribers: connections sorted by id, one pointer each (a hash map costs several
/// times that per entry, and every idle socket is in one of these lists per user it watches,
/// its own included; docs/benchmarks.md has the figures). Ids grow, so a new connection's
/// subscribe appends; a small list is searched by address first, a large one by id (binary
/// search); a removal moves the tail (one pointer per subscriber after it, cheap even for a
/// user watched by thousands).
#[derive(Default)]
struct Subscribers(Vec<Arc<Conn>>);

/// Up to this length, subscriber lists grow exactly.
const SMALL_LIST: usize = 32;

impl Subscribers {
    /// Where `conn` is (or would go), by id. In a small list it is first looked for by address,
    /// which reads no connection (each one read is a cache miss of its own); when it is not
    /// there, the last one's id decides whether it goes last (a new connection's id is the
    /// newest), and only otherwise is the list searched by id.
    fn find(&self, conn: &Conn) -> Result<usize, usize> {
        let list = &self.0;
        if list.len() <= SMALL_LIST {
            if let Some(at) = list.iter().position(|c| std::ptr::eq(&**c, conn)) {
                return Ok(at);
            }
            if list.last().is_none_or(|c| c.id < conn.id) {
                return Err(list.len());
            }
        }
        list.binary_search_by_key(&conn.id, |c| c.id)
    }

    /// Adds `conn`; false if it was there already.
    fn insert(&mut self, conn: &Arc<Conn>) -> bool {
        match self.find(conn) {
            Ok(_) => false,
            Err(at) => {
                // Small lists grow one slot at a time (a room of 10 keeps 10 slots, not 16);
                // past that, the usual doubling.
                if self.0.len() == self.0.capacity() && self.0.len() < SMALL_LIST {
                    self.0.reserve_exact(1);
                }
                self.0.insert(at, Arc::clone(conn));
                true
            }
        }
    }

    fn remove(&mut self, conn: &Conn) -> Option<Arc<Conn>> {
        let at = self.find(conn).ok()?;
        let conn = self.0.remove(at);
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        Some(conn)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn iter(&self) -> impl Iterator<Item = &Arc<Conn>> {
        self.0.iter()
    }
}

impl Entry {
    fn boxed() -> Box<Self> {
        Box::new(Entry {
            conns: 0,
            online: false,
            watchers: 0,
            side: None,
            grace_gen: 0,
            online_epoch: 0,
            epoch_pending: false,
            profile: None,
            subscribers: Subscribers::default(),
        })
    }

    fn is_idle(&self) -> bool {
        self.conns == 0 && !self.online && self.subscribers.is_empty() && !self.epoch_pending
    }

    /// The presence subscribers see: held here or by another node.
    fn visible(&self) -> bool {
        self.online || self.remote().is_some_and(|r| r.held)
    }

    /// Whether another node holds the user; `None` until the backplane answered.
    fn remote(&self) -> Option<Remote> {
        self.side.as_ref().and_then(|b| b.remote)
    }

    /// `subscribed` slots waiting for the backplane's answer.
    fn waiting(&self) -> &[(Arc<Conn>, SlotId)] {
        self.side.as_ref().map_or(&[], |b| &b.waiting)
    }

    /// Watchers whose `subscribed` slot waits for the user's profile ([`Side::loading`]).
    fn loading(&self) -> &[(Arc<Conn>, SlotId)] {
        self.side.as_ref().map_or(&[], |b| &b.loading)
    }

    /// `conn`'s reply no longer waits for the profile: its `slot` is filled now, or `conn`
    /// stops watching (`None`: every slot of it).
    fn loaded(&mut self, conn: &Conn, slot: Option<SlotId>) {
        let Some(side) = self.side.as_mut() else {
            return;
        };
        side.loading
            .retain(|(c, s)| c.id != conn.id || slot.is_some_and(|slot| *s != slot));
        if side.is_empty() {
            self.side = None;
        }
    }

    fn is_online(&self, svc: ServiceState) -> Option<bool> {
        is_online_flag(svc, self.visible(), self.online_epoch)
    }

    fn is_notifiable(&self, svc: ServiceState) -> Option<bool> {
        self.profile.as_ref()?.is_notifiable(svc)
    }

    fn view(&self, identity: &str, svc: ServiceState) -> Option<User> {
        let p = self.profile.as_ref()?;
        Some(User {
            identity: identity.to_owned(),
            friendly_name: p.friendly_name.as_deref().map(str::to_owned),
            attributes: p.attributes().to_owned(),
            is_online: self.is_online(svc),
            is_notifiable: self.is_notifiable(svc),
            last_seen_at: last_seen(self.is_online(svc), p.last_seen_at, now_unix()),
        })
    }

    /// Notes that the user went offline at `at` (unix seconds), as subscribers saw it.
    fn went_offline(&mut self, at: i64) {
        self.went_offline_at(Some(at));
    }

    /// Keeps the later of the last-seen time held and `at` (a profile re-read from the store
    /// may predate the latest offline, which is written in batches).
    fn went_offline_at(&mut self, at: Option<i64>) {
        if let Some(p) = self.profile.as_mut() {
            p.last_seen_at = p.last_seen_at.max(at);
        }
    }
}

/// What attaching or subscribing found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// The slot was filled with the user's current state.
    Filled,
    /// The user's profile is not in memory: load it, then call [`Engine::load_profile`] and
    /// [`Engine::fill`].
    NeedsProfile,
}

/// The presence engine. See the module doc.
pub struct Engine {
    config: EngineConfig,
    /// Boxed entries: a map's buckets are 44-87 % full, and an empty bucket of a boxed map
    /// costs a key and a pointer, not a whole entry.
    users: DashMap<UserKey, Box<Entry>, RandomState>,
    services: DashMap<Arc<str>, ServiceState, RandomState>,
    conns: DashMap<ConnId, Arc<Conn>, RandomState>,
    next_conn: AtomicU64,
    next_grace: AtomicU64,
    /// Versions of the presence changes this engine reports (single node only).
    clock: PresenceClock,
    persist: Option<mpsc::UnboundedSender<PersistEvent>>,
    cluster: Option<mpsc::UnboundedSender<ClusterEvent>>,
    /// How many events were sent (or are about to be) on `cluster`: see
    /// [`Engine::cluster_events_sent`].
    cluster_sent: AtomicU64,
    metrics: EngineMetrics,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("users", &self.users.len())
            .field("conns", &self.conns.len())
            .finish()
    }
}

impl Engine {
    pub fn new(
        config: EngineConfig,
        metrics: EngineMetrics,
        persist: Option<mpsc::UnboundedSender<PersistEvent>>,
    ) -> Arc<Engine> {
        Self::build(config, metrics, persist, None)
    }

    /// An engine of a cluster node: it reports holds and watches on `cluster` and expects
    /// [`Engine::apply_remote`] calls for every `Watch` (see the module doc).
    pub fn new_clustered(
        config: EngineConfig,
        metrics: EngineMetrics,
        persist: Option<mpsc::UnboundedSender<PersistEvent>>,
        cluster: mpsc::UnboundedSender<ClusterEvent>,
    ) -> Arc<Engine> {
        Self::build(config, metrics, persist, Some(cluster))
    }

    fn build(
        config: EngineConfig,
        metrics: EngineMetrics,
        persist: Option<mpsc::UnboundedSender<PersistEvent>>,
        cluster: Option<mpsc::UnboundedSender<ClusterEvent>>,
    ) -> Arc<Engine> {
        Arc::new(Engine {
            config,
            users: DashMap::default(),
            services: DashMap::default(),
            conns: DashMap::default(),
            next_conn: AtomicU64::new(1),
            next_grace: AtomicU64::new(1),
            clock: PresenceClock::default(),
            persist,
            cluster,
            cluster_sent: AtomicU64::new(0),
            metrics,
        })
    }

    fn tell_cluster(&self, event: impl FnOnce() -> ClusterEvent) {
        if let Some(tx) = &self.cluster {
            let event = event();
            // Counted before it is sent: a count read after a send covers that event's place
            // in the channel, whatever other threads send meanwhile.
            self.cluster_sent.fetch_add(1, Ordering::SeqCst);
            let _ = tx.send(event);
        }
    }

    /// How many events this engine has reported to the cluster so far. Read after a call
    /// that reported an event (`attach` of a user's first connection here sends `Held`), it
    /// is at least that event's position in the channel (counting from 1): the backplane has
    /// written it once it has written that many events.
    pub fn cluster_events_sent(&self) -> u64 {
        self.cluster_sent.load(Ordering::SeqCst)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn metrics(&self) -> &EngineMetrics {
        &self.metrics
    }

    /// The engine's view of a service's switch (disabled if unknown).
    pub fn service(&self, service_sid: &str) -> ServiceState {
        self.services
            .get(service_sid)
            .map(|s| *s)
            .unwrap_or_default()
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Number of services whose switch the engine knows.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Creates a connection handle; [`Engine::attach`] registers it.
    pub fn new_conn(&self, service_sid: &str, identity: &str, encoding: Encoding) -> Arc<Conn> {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        Arc::new(Conn {
            id,
            key: UserKey::new(service_sid, identity),
            outbox: Outbox::new(encoding, self.config.max_outbox_bytes),
        })
    }

    /// Attaches an authenticated connection to its own user: registers it (for service-wide
    /// pushes, closes and the drain; only now, so nothing closes it before its `welcome` slot
    /// is reserved), counts it (0 -> 1 publishes online, or cancels a pending offline grace),
    /// subscribes it to its own user and fills `slot` with the user's state.
    ///
    /// The first time a user is online in a reachability epoch, the epoch goes down the
    /// persist channel (`PersistEvent::Online`): the store learns it in the next batch, so that
    /// `is_online` reads `false`, not `null`, after a restart. Nothing here waits on the store.
    pub fn attach(&self, conn: &Arc<Conn>, slot: SlotId) -> Attach {
        self.attach_with(conn, slot, None)
    }

    /// [`Engine::attach`] with the user's profile as the caller just read it from the store
    /// (kept unless a newer one is in memory), so the user exists in the store before its
    /// presence is reported and the `welcome` slot is filled at once.
    pub fn attach_with(&self, conn: &Arc<Conn>, slot: SlotId, profile: Option<Profile>) -> Attach {
        self.conns.insert(conn.id, Arc::clone(conn));
        let svc = self.service(conn.service());
        let mut entry = self
            .users
            .entry(conn.key.clone())
            .or_insert_with(Entry::boxed);
        if let Some(profile) = profile {
            Self::keep_newer(&mut entry, profile);
        }
        entry.conns += 1;
        if entry.conns == 1 {
            entry.grace_gen = 0;
            if !entry.online {
                let was_visible = entry.visible();
                entry.online = true;
                self.metrics.online_users.inc();
                self.tell_cluster(|| ClusterEvent::Held(conn.key.clone()));
                self.note_online(&conn.key, &mut entry, svc);
                if !was_visible {
                    self.report_presence(&conn.key, true, now_unix());
                    self.publish(
                        &conn.key,
                        &entry,
                        svc,
                        Reasons::of(UpdateReason::ReachabilityOnline),
                    );
                }
            }
        }
        if entry.subscribers.insert(conn) {
            self.metrics.subscriptions.inc();
        }
        self.fill_locked(&entry, conn.identity(), conn, slot, svc)
    }

    /// Subscribes `conn` to a user and fills `slot` with its state.
    ///
    /// In cluster mode, a user whose remote state is not known yet is filled in later by
    /// [`Engine::apply_remote`]; the slot is held back until then (this still returns
    /// `Filled`).
    ///
    /// On [`Attach::NeedsProfile`] the caller must load the profile and call [`Engine::fill`],
    /// or give the watch up ([`Engine::unsubscribe`], [`Engine::detach`]): until one of them,
    /// fan-outs skip `conn` for this user.
    ///
    /// Also returns the user's key as the engine stores it (sharing its allocation), for the
    /// caller's list of what the connection watches.
    pub fn subscribe(&self, conn: &Arc<Conn>, identity: &str, slot: SlotId) -> (Attach, UserKey) {
        let key = UserKey::new(conn.service(), identity);
        let svc = self.service(conn.service());
        let watcher = key != conn.key;
        let mut entry = self.users.entry(key).or_insert_with(Entry::boxed);
        let key = entry.key().clone();
        if entry.subscribers.insert(conn) {
            self.metrics.subscriptions.inc();
            if watcher {
                entry.watchers += 1;
                if entry.watchers == 1 {
                    self.tell_cluster(|| ClusterEvent::Watch(key.clone()));
                }
            }
        }
        let attach = self.fill_or_wait(&mut entry, identity, conn, slot, svc);
        if attach == Attach::NeedsProfile && watcher {
            let side = entry.side.get_or_insert_with(Box::default);
            side.loading.push((Arc::clone(conn), slot));
        }
        (attach, key)
    }

    /// Fills `slot` with the user's current state once its profile is loaded.
    pub fn fill(&self, conn: &Arc<Conn>, identity: &str, slot: SlotId) -> Attach {
        let key = UserKey::new(conn.service(), identity);
        let svc = self.service(conn.service());
        match self.users.get_mut(&key) {
            Some(mut entry) => {
                entry.loaded(conn, Some(slot));
                self.fill_or_wait(&mut entry, identity, conn, slot, svc)
            }
            None => Attach::NeedsProfile,
        }
    }

    fn fill_or_wait(
        &self,
        entry: &mut Entry,
        identity: &str,
        conn: &Arc<Conn>,
        slot: SlotId,
        svc: ServiceState,
    ) -> Attach {
        let own = identity == conn.identity();
        if self.cluster.is_some() && !own && entry.remote().is_none() && entry.profile.is_some() {
            conn.outbox.expect(slot);
            let side = entry.side.get_or_insert_with(Box::default);
            side.waiting.push((Arc::clone(conn), slot));
            return Attach::Filled;
        }
        self.fill_locked(entry, identity, conn, slot, svc)
    }

    fn fill_locked(
        &self,
        entry: &Entry,
        identity: &str,
        conn: &Conn,
        slot: SlotId,
        svc: ServiceState,
    ) -> Attach {
        match entry.view(identity, svc) {
            Some(user) => {
                conn.outbox.fill(slot, user);
                Attach::Filled
            }
            None => Attach::NeedsProfile,
        }
    }

    /// Removes `conn`'s subscription to a user. Its own user cannot be unsubscribed.
    pub fn unsubscribe(&self, conn: &Conn, identity: &str) {
        if identity == conn.identity() {
            return;
        }
        let key = UserKey::new(conn.service(), identity);
        self.remove_subscriber(&key, conn);
    }

    fn remove_subscriber(&self, key: &UserKey, conn: &Conn) {
        if let Some(mut entry) = self.users.get_mut(key)
            && let Some(conn) = entry.subscribers.remove(conn)
        {
            self.metrics.subscriptions.dec();
            if conn.key != *key {
                entry.loaded(&conn, None);
                if let Some(side) = entry.side.as_mut() {
                    side.waiting.retain(|(c, slot)| {
                        let keep = c.id != conn.id;
                        if !keep {
                            c.outbox.release(*slot);
                        }
                        keep
                    });
                }
                entry.watchers -= 1;
                if entry.watchers == 0 {
                    // No watcher left, so no slot waits either.
                    entry.side = None;
                    self.tell_cluster(|| ClusterEvent::Unwatch(key.clone()));
                }
            }
        }
        self.users.remove_if(key, |_, e| e.is_idle());
    }

    /// Ends a connection: drops its subscriptions (`watched` lists the identities it subscribed
    /// to besides its own) and its connection count. The last connection
    /// of a user starts the offline grace, or, after `bye`, publishes offline at once.
    pub fn detach(self: &Arc<Self>, conn: &Conn, watched: &[UserKey], bye: bool) {
        self.conns.remove(&conn.id);
        for key in watched {
            if *key != conn.key {
                self.remove_subscriber(key, conn);
            }
        }
        let svc = self.service(conn.service());
        let mut start_grace = None;
        if let Some(mut entry) = self.users.get_mut(&conn.key) {
            if entry.subscribers.remove(conn).is_some() {
                self.metrics.subscriptions.dec();
            }
            entry.conns = entry.conns.saturating_sub(1);
            if entry.conns == 0 && entry.online {
                if bye || self.config.offline_grace.is_zero() {
                    self.go_offline(&conn.key, &mut entry, svc);
                } else {
                    let generation = self.next_grace.fetch_add(1, Ordering::Relaxed);
                    entry.grace_gen = generation;
                    start_grace = Some(generation);
                }
            }
        }
        self.users.remove_if(&conn.key, |_, e| e.is_idle());
        if let Some(generation) = start_grace {
            let engine = Arc::clone(self);
            let key = conn.key.clone();
            let deadline = tokio::time::Instant::now() + self.config.offline_grace;
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline).await;
                engine.grace_expired(&key, generation);
            });
        }
    }

    fn grace_expired(&self, key: &UserKey, generation: u64) {
        let svc = self.service(key.service());
        if let Some(mut entry) = self.users.get_mut(key)
            && entry.grace_gen == generation
            && entry.conns == 0
            && entry.online
        {
            self.go_offline(key, &mut entry, svc);
        }
        self.users.remove_if(key, |_, e| e.is_idle());
    }

    fn go_offline(&self, key: &UserKey, entry: &mut Entry, svc: ServiceState) {
        entry.grace_gen = 0;
        entry.online = false;
        self.metrics.online_users.dec();
        self.tell_cluster(|| ClusterEvent::Released(key.clone()));
        if !entry.visible() {
            let at = now_unix();
            entry.went_offline(at);
            self.report_presence(key, false, at);
            self.publish(
                key,
                entry,
                svc,
                Reasons::of(UpdateReason::ReachabilityOnline),
            );
        }
    }

    /// Single node: reports a change of the user's presence as subscribers see it (in a
    /// cluster the backplane reports them: only it knows whether a hold was the first or the
    /// last one anywhere). Called under the user's shard lock, so a user's changes are sent in
    /// their order.
    fn report_presence(&self, key: &UserKey, online: bool, at: i64) {
        if self.cluster.is_some() {
            return;
        }
        if let Some(tx) = &self.persist {
            let _ = tx.send(PersistEvent::Presence(PresenceChange {
                key: key.clone(),
                online,
                at,
                version: self.clock.next(),
            }));
        }
    }

    /// The clock of this node's presence versions, to raise past what the store holds.
    pub fn presence_clock(&self) -> &PresenceClock {
        &self.clock
    }

    /// Single node, after a restart: reports the user offline at `at` unless it is online here
    /// now (it reconnected since). Under the user's shard lock, so a connection attaching at the
    /// same time reports its own online after this.
    pub fn report_offline_unless_online(&self, service_sid: &str, identity: &str, at: i64) {
        let key = UserKey::new(service_sid, identity);
        {
            let entry = self.users.entry(key.clone()).or_insert_with(Entry::boxed);
            if !entry.online {
                self.report_presence(entry.key(), false, at);
            }
        }
        self.users.remove_if(&key, |_, e| e.is_idle());
    }

    /// Cluster mode: the backplane's report of whether other nodes hold a watched user.
    /// Applies only if `version` is newer than the last report (any version when none is
    /// known yet); publishes when the visible presence changes, and completes `subscribed`
    /// replies waiting for it.
    pub fn apply_remote(&self, key: &UserKey, version: u64, held: bool) {
        let Some(mut entry) = self.users.get_mut(key) else {
            return;
        };
        if entry.watchers == 0 || entry.remote().is_some_and(|r| r.version >= version) {
            return;
        }
        let svc = self.service(key.service());
        let before = entry.visible();
        let side = entry.side.get_or_insert_with(Box::default);
        side.remote = Some(Remote { version, held });
        let waiting = std::mem::take(&mut side.waiting);
        let after = entry.visible();
        if before && !after {
            // The cluster's version is the change's time in Redis, in microseconds.
            entry.went_offline(i64::try_from(version / 1_000_000).unwrap_or(i64::MAX));
        }
        if after && svc.enabled {
            // Recorded in the store by the holding node; kept here so `false` is not read
            // as null when the user goes offline again.
            entry.online_epoch = entry.online_epoch.max(svc.epoch);
        }
        for (conn, slot) in &waiting {
            self.fill_locked(&entry, key.identity(), conn, *slot, svc);
            conn.outbox.release(*slot);
        }
        if before != after {
            self.publish_except(
                key,
                &entry,
                svc,
                Reasons::of(UpdateReason::ReachabilityOnline),
                &waiting,
            );
        }
    }

    /// Cluster mode: users this node holds (for the backplane's resynchronisation).
    pub fn held_users(&self) -> Vec<UserKey> {
        self.users
            .iter()
            .filter(|e| e.online)
            .map(|e| e.key().clone())
            .collect()
    }

    /// Cluster mode: users watched by connections of this node, besides their own.
    pub fn watched_users(&self) -> Vec<UserKey> {
        self.users
            .iter()
            .filter(|e| e.watchers > 0)
            .map(|e| e.key().clone())
            .collect()
    }

    /// Whether the user is in memory here (connected, in grace or watched).
    pub fn knows(&self, service_sid: &str, identity: &str) -> bool {
        self.users
            .contains_key(&UserKey::new(service_sid, identity))
    }

    fn note_online(&self, key: &UserKey, entry: &mut Entry, svc: ServiceState) {
        if svc.enabled && entry.online_epoch < svc.epoch {
            entry.online_epoch = svc.epoch;
            entry.epoch_pending = self.persist.is_some();
            self.persist_online(key, svc.epoch);
        }
    }

    /// The store has recorded that the user was online in `epoch` (the persist channel's
    /// `PersistEvent::Online` was written): its entry may leave memory once idle.
    pub fn epoch_recorded(&self, service_sid: &str, identity: &str, epoch: i64) {
        let key = UserKey::new(service_sid, identity);
        if let Some(mut entry) = self.users.get_mut(&key)
            && entry.online_epoch <= epoch
        {
            entry.epoch_pending = false;
        }
        self.users.remove_if(&key, |_, e| e.is_idle());
    }

    fn persist_online(&self, key: &UserKey, epoch: i64) {
        if let Some(tx) = &self.persist {
            let _ = tx.send(PersistEvent::Online {
                service_sid: key.service().to_owned(),
                identity: key.identity().to_owned(),
                epoch,
            });
        }
    }

    /// Fans a diff out to the user's subscribers. Nothing is published while reachability is
    /// disabled for presence reasons, or before the profile is loaded (nobody has seen it yet).
    /// Connections whose `subscribed` reply still waits for the cluster state or the profile
    /// are skipped ([`Engine::fan_out`]).
    fn publish(&self, key: &UserKey, entry: &Entry, svc: ServiceState, reasons: Reasons) {
        self.publish_except(key, entry, svc, reasons, &[]);
    }

    /// [`Engine::publish`], skipping the connections in `skip` (they were just given the state
    /// in a reply).
    fn publish_except(
        &self,
        key: &UserKey,
        entry: &Entry,
        svc: ServiceState,
        reasons: Reasons,
        skip: &[(Arc<Conn>, SlotId)],
    ) {
        let presence_only = !reasons.contains(UpdateReason::FriendlyName)
            && !reasons.contains(UpdateReason::Attributes);
        if presence_only && !svc.enabled {
            return;
        }
        self.fan_out(key, entry, svc, reasons, skip);
    }

    /// Sends the user's current view, with `reasons`, to its subscribers except `skip` and those
    /// whose `subscribed` reply still waits, for the cluster state ([`Side::waiting`]) or the
    /// profile ([`Side::loading`]): the reply, filled later, carries the state as it is then.
    fn fan_out(
        &self,
        key: &UserKey,
        entry: &Entry,
        svc: ServiceState,
        reasons: Reasons,
        skip: &[(Arc<Conn>, SlotId)],
    ) {
        if entry.subscribers.is_empty() {
            return;
        }
        let Some(user) = entry.view(key.identity(), svc) else {
            return;
        };
        let started = Instant::now();
        self.metrics.diffs.inc();
        let update = Update::new(user, reasons);
        let identity: Arc<str> = Arc::from(key.identity());
        let (mut queued, mut coalesced) = (0u64, 0u64);
        let mut held = Vec::new();
        let pending = [skip, entry.waiting(), entry.loading()];
        let skipping = pending.iter().any(|p| !p.is_empty());
        for conn in entry.subscribers.iter() {
            if skipping && pending.into_iter().flatten().any(|(c, _)| c.id == conn.id) {
                continue;
            }
            match conn.outbox.push_update(&identity, &update) {
                PushOutcome::Queued => queued += 1,
                PushOutcome::Held => {
                    queued += 1;
                    if held.is_empty() {
                        held.reserve(FLUSH_CHUNK.min(entry.subscribers.len()));
                    }
                    held.push(Arc::clone(conn));
                    if held.len() == FLUSH_CHUNK {
                        self.flush_later(std::mem::take(&mut held));
                    }
                }
                PushOutcome::Coalesced => coalesced += 1,
                PushOutcome::Dropped => {}
            }
        }
        if !held.is_empty() {
            self.flush_later(held);
        }
        self.metrics.deliveries.inc_by(queued);
        self.metrics.coalesced.inc_by(coalesced);
        self.metrics
            .fanout_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    /// Sends the updates just queued to connections whose sessions lent their sockets
    /// ([`Outbox::flush`]), outside the user's shard lock: in a task of its own on the runtime
    /// (a diff's watchers in pieces of [`FLUSH_CHUNK`], so a large fan-out is spread over the
    /// workers), or here when there is no runtime. Each connection's queue is sent in order,
    /// whoever flushes it.
    fn flush_later(&self, held: Vec<Arc<Conn>>) {
        let (sent, writes) = (
            self.metrics.frames_sent.clone(),
            self.metrics.fanout_writes.clone(),
        );
        let flush = move || {
            let n: usize = held.iter().map(|conn| conn.outbox.flush()).sum();
            sent.inc_by(n as u64);
            writes.inc_by(n as u64);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(async move { flush() })),
            Err(_) => flush(),
        }
    }

    /// Stores a loaded profile unless a newer one is already in memory. Presence that changed
    /// while the profile was loading is not published (nobody had the user's state yet).
    pub fn load_profile(&self, service_sid: &str, identity: &str, profile: Profile) {
        let key = UserKey::new(service_sid, identity);
        if let Some(mut entry) = self.users.get_mut(&key) {
            Self::keep_newer(&mut entry, profile);
        }
    }

    /// Whether the user's profile is in memory (a `hello` then needs no store read).
    pub fn has_profile(&self, service_sid: &str, identity: &str) -> bool {
        self.users
            .get(&UserKey::new(service_sid, identity))
            .is_some_and(|e| e.profile.is_some())
    }

    fn keep_newer(entry: &mut Entry, profile: Profile) {
        entry.online_epoch = entry.online_epoch.max(profile.online_epoch);
        if entry
            .profile
            .as_ref()
            .is_none_or(|p| p.revision < profile.revision)
        {
            let seen = entry.profile.as_ref().and_then(|p| p.last_seen_at);
            entry.profile = Some(profile.into());
            entry.went_offline_at(seen);
        }
    }

    /// Applies a profile written through REST or a push registration and publishes what
    /// changed (`friendlyName`, `attributes`, `reachabilityNotifiable`). Users not in memory are
    /// skipped: whoever loads them later reads the new record.
    pub fn update_profile(&self, service_sid: &str, identity: &str, profile: Profile) {
        let key = UserKey::new(service_sid, identity);
        let svc = self.service(service_sid);
        let Some(mut entry) = self.users.get_mut(&key) else {
            return;
        };
        entry.online_epoch = entry.online_epoch.max(profile.online_epoch);
        let profile = Stored::from(profile);
        let Some(old) = entry.profile.take() else {
            entry.profile = Some(profile);
            return;
        };
        if old.revision >= profile.revision {
            entry.profile = Some(old);
            return;
        }
        let notifiable_before = old.is_notifiable(svc);
        let mut reasons = Reasons::EMPTY;
        if old.friendly_name != profile.friendly_name {
            reasons = reasons.with(UpdateReason::FriendlyName);
        }
        if old.attributes() != profile.attributes() {
            reasons = reasons.with(UpdateReason::Attributes);
        }
        entry.profile = Some(profile);
        entry.went_offline_at(old.last_seen_at);
        if entry.is_notifiable(svc) != notifiable_before {
            reasons = reasons.with(UpdateReason::ReachabilityNotifiable);
        }
        if !reasons.is_empty() {
            self.publish(&key, &entry, svc, reasons);
        }
    }

    /// Presence of a user as REST reports it, if in memory. In cluster mode `online` is what
    /// this node knows: held here, or by another node as last reported for a watched user.
    pub fn presence(&self, service_sid: &str, identity: &str) -> Option<Presence> {
        self.users
            .get(&UserKey::new(service_sid, identity))
            .map(|e| Presence {
                online: e.visible(),
                online_epoch: e.online_epoch,
                last_seen_at: e.profile.as_ref().and_then(|p| p.last_seen_at),
            })
    }

    /// Sets a service's switch (at start, on create, on a configuration update). A change
    /// pushes `service_updated` to every connection of the service; enabling also publishes the
    /// users already online, and the notifiable flags that stop being null; disabling
    /// publishes the flags that become null to the users' subscribers.
    pub fn set_service(&self, service_sid: &str, state: ServiceState) {
        let previous = self.services.insert(Arc::from(service_sid), state);
        let Some(previous) = previous else { return };
        if previous.enabled == state.enabled {
            return;
        }
        let frames = Encoding::ALL.map(|enc| {
            encode(
                &ServerFrame::ServiceUpdated {
                    reachability_enabled: state.enabled,
                },
                enc,
            )
        });
        for conn in self.conns.iter() {
            if conn.service() == service_sid {
                let enc = conn.outbox.encoding();
                conn.outbox.push_bytes(frames[enc.index()].clone());
            }
        }
        // A scan of the map, done once per switch flip (an admin operation).
        for mut entry in self.users.iter_mut() {
            let key = entry.key().clone();
            if key.service() != service_sid {
                continue;
            }
            let entry = entry.value_mut();
            if !state.enabled {
                // Disabling: the flags read null now. Subscribers that were shown a value
                // are told, or they would keep showing it (and, should the user go offline
                // before the next enabling, still show it online then).
                let mut reasons = Reasons::EMPTY;
                if entry.is_online(previous).is_some() {
                    reasons = reasons.with(UpdateReason::ReachabilityOnline);
                }
                if entry.is_notifiable(previous).is_some() {
                    reasons = reasons.with(UpdateReason::ReachabilityNotifiable);
                }
                if !reasons.is_empty() {
                    self.fan_out(&key, entry, state, reasons, &[]);
                }
                continue;
            }
            let mut reasons = Reasons::EMPTY;
            if entry.online {
                self.note_online(&key, entry, state);
                reasons = reasons.with(UpdateReason::ReachabilityOnline);
            } else if entry.visible() {
                entry.online_epoch = entry.online_epoch.max(state.epoch);
                reasons = reasons.with(UpdateReason::ReachabilityOnline);
            }
            if entry.is_notifiable(state).is_some() {
                reasons = reasons.with(UpdateReason::ReachabilityNotifiable);
            }
            if !reasons.is_empty() {
                self.publish(&key, entry, state, reasons);
            }
        }
    }

    /// Forgets a deleted service and closes its connections with 4003.
    pub fn remove_service(&self, service_sid: &str) {
        self.services.remove(service_sid);
        for conn in self.conns.iter() {
            if conn.service() == service_sid {
                conn.outbox.close(CloseCode::Forbidden);
            }
        }
    }

    /// Closes the connections of a deleted user with 4003.
    pub fn remove_user(&self, service_sid: &str, identity: &str) {
        for conn in self.conns.iter() {
            if conn.service() == service_sid && conn.identity() == identity {
                conn.outbox.close(CloseCode::Forbidden);
            }
        }
    }

    /// Every live connection (for draining).
    pub fn connections(&self) -> Vec<Arc<Conn>> {
        self.conns.iter().map(|c| Arc::clone(c.value())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: ConnId) -> Arc<Conn> {
        Arc::new(Conn {
            id,
            key: UserKey::new("IS1", "u"),
            outbox: Outbox::new(Encoding::Json, 1 << 20),
        })
    }

    #[test]
    fn subscribers_stay_sorted_and_unique_in_any_order() {
        let mut subs = Subscribers::default();
        for id in [5, 3, 9, 1, 7] {
            assert!(subs.insert(&conn(id)));
        }
        assert!(
            !subs.insert(&conn(3)),
            "a second insert of one id is refused"
        );
        let ids: Vec<ConnId> = subs.iter().map(|c| c.id).collect();
        assert_eq!(ids, [1, 3, 5, 7, 9]);
        assert_eq!(subs.remove(&conn(3)).map(|c| c.id), Some(3));
        assert!(subs.remove(&conn(3)).is_none());
        assert!(subs.remove(&conn(4)).is_none());
        for id in [1, 5, 7, 9] {
            assert!(subs.remove(&conn(id)).is_some());
        }
        assert!(subs.is_empty());
        assert_eq!(subs.0.capacity(), 0, "an emptied list frees its buffer");
        for id in 0..10 {
            subs.insert(&conn(id));
        }
        assert_eq!(subs.0.capacity(), 10, "a small list has no slack");
    }

    /// The same connections found by address (a small list) and by id (a large one), whatever
    /// order they came in.
    #[test]
    fn subscribers_are_found_by_address_and_by_id() {
        for n in [3, SMALL_LIST, SMALL_LIST + 9] {
            let conns: Vec<Arc<Conn>> = (0..n as ConnId).map(|i| conn(i * 2)).collect();
            let mut subs = Subscribers::default();
            // Newest first, then the rest from the middle: appends and inserts.
            let order: Vec<usize> = (n / 2..n).rev().chain(0..n / 2).collect();
            for &i in &order {
                assert!(subs.insert(&conns[i]));
                assert!(!subs.insert(&conns[i]), "{n}: the same connection twice");
            }
            let ids: Vec<ConnId> = subs.iter().map(|c| c.id).collect();
            assert!(ids.is_sorted() && ids.len() == n, "{n}: {ids:?}");
            assert!(subs.remove(&conn(1)).is_none(), "{n}: an id never added");
            for (k, &i) in order.iter().enumerate() {
                let gone = subs.remove(&conns[i]).expect("added");
                assert!(Arc::ptr_eq(&gone, &conns[i]));
                assert_eq!(subs.iter().count(), n - k - 1);
                assert!(subs.remove(&conns[i]).is_none(), "{n}: removed twice");
            }
        }
    }

    /// An entry keeps a profile without allocating what is unset, and gives back what it was
    /// given.
    #[test]
    fn a_stored_profile_reads_back_as_loaded() {
        let loaded = |friendly_name: Option<&str>, attributes: &str, binding_count| Profile {
            revision: 3,
            friendly_name: friendly_name.map(str::to_owned),
            attributes: attributes.to_owned(),
            binding_count,
            ever_had_binding: binding_count > 0,
            online_epoch: 2,
            last_seen_at: Some(1_700_000_000),
        };
        let bare = Stored::from(loaded(None, "{}", 0));
        assert_eq!(
            (bare.friendly_name.as_deref(), bare.attributes.as_deref()),
            (None, None)
        );
        assert_eq!(bare.attributes(), "{}");
        let full = Stored::from(loaded(Some("Ann"), r#"{"a":1}"#, 2));
        assert_eq!(full.friendly_name.as_deref(), Some("Ann"));
        assert_eq!(full.attributes(), r#"{"a":1}"#);
        assert_eq!((full.binding_count, full.revision), (2, 3));
        assert_eq!(full.last_seen_at, Some(1_700_000_000));
        assert_eq!(Stored::from(loaded(None, "{}", -1)).binding_count, 0);
        assert_eq!(
            Stored::from(loaded(None, "{}", i64::MAX)).binding_count,
            u32::MAX
        );
        let mut entry = Entry::boxed();
        entry.profile = Some(full);
        let user = entry.view("ann", ServiceState::default()).unwrap();
        assert_eq!(user.friendly_name.as_deref(), Some("Ann"));
        assert_eq!(user.attributes, r#"{"a":1}"#);
    }

    /// A key is one pointer and reads back what it was built from.
    #[test]
    fn a_user_key_is_one_pointer() {
        assert_eq!(std::mem::size_of::<UserKey>(), 8);
        let key = UserKey::new("IS0123", "ann/b");
        assert_eq!((key.service(), key.identity()), ("IS0123", "ann/b"));
        assert_eq!(key.as_str(), "IS0123/ann/b");
        assert_eq!(UserKey::parse("IS0123/ann/b"), Some(key));
    }
}
