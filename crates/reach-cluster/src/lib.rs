//! The cluster backplane: several reachd nodes, one presence view, through Redis.
//!
//! Each node's engine ([`reach_core::Engine::new_clustered`]) reports when this node starts or
//! stops *holding* a user (its first connection; the end of its offline grace, or `bye`) and
//! when a user gains its first or loses its last watcher here. The backplane writes the holds
//! to Redis, subscribes to the users its sockets watch, and feeds what other nodes hold back
//! into the engine ([`reach_core::Engine::apply_remote`]). A user is online while any node
//! holds it, so a user moving between nodes inside the grace never flaps.
//!
//! # Why redis-rs
//!
//! `redis` (redis-rs) is the most used Redis client for Rust and is maintained with the Redis
//! project's involvement; it has what the backplane needs and nothing it has to work around: a
//! multiplexed async connection with response timeouts (pipelines of many commands in one
//! round trip), a pub/sub connection that splits into a subscribe sink and a message stream,
//! and Lua scripts (`EVALSHA`). fred would also do, with more built-in machinery (reconnection
//! policies, pools) that the backplane replaces anyway: on any failure it rebuilds its whole
//! state in Redis from the engine (see "Failures"), so its reconnection is a plain loop.
//!
//! # Keys and channels
//!
//! Every per-user key and channel carries the service SID as a hash tag (`{IS...}`), so the
//! layout works on Redis Cluster (each script touches one key; pub/sub messages are
//! broadcast cluster-wide, or can move to sharded pub/sub per tag).
//!
//! | name | type | content |
//! |---|---|---|
//! | `reach:{<service>}:holders:<identity>` | hash | field per holding node: `<node id>` -> its incarnation; field `~v` -> the last version |
//! | `reach:{<service>}:presence:<identity>` | channel | every change of the holder set |
//! | `reach:nodes` | hash | `<node id>` -> incarnation (rewritten at every heartbeat) |
//! | `reach:node:<node id>` | string, expires after `node_ttl_ms` | incarnation: the node's liveness |
//! | `reach:node:<node id>:<incarnation>:users` | set | `<service>/<identity>` of every user the node holds |
//! | `reach:node:<node id>:incarnations` | set | the node's incarnations whose holds are not cleaned up yet |
//! | `reach:reap:<node id>` | string, expires | the node cleaning up after a dead one |
//! | `reach:left:<node id>` | string, expires | the node left in an orderly way (a drain) |
//! | `reach:turn:<task>` | string, expires | the node whose turn it is to run a periodic task (the sweep of users recorded online) |
//! | `reach:control` | channel | record changes made at one node (below) |
//!
//! An *incarnation* is a random token a node picks at each (re)connection to Redis. Holds are
//! written with it, and a node cleaning up after a dead one removes only holds with the dead
//! incarnation, so a node that comes back and re-asserts its holds is never undone by a late
//! cleanup.
//!
//! # Messages
//!
//! Presence (channel `reach:{<service>}:presence:<identity>`): MessagePack `[version,
//! ["<node id>@<incarnation>", ...]]`, the complete holder set after the change. A node
//! restarted with the same id counts a hold of its previous incarnation as held elsewhere: its
//! users stay online to its watchers until they come back or the old holds are released.
//! Written by a Lua script in the same step as the hash, so the messages of one user are in the
//! order of its changes.
//! `version` is `max(last + 1, Redis TIME in microseconds + 1)`: it increases with every change
//! and also across a Redis restart that lost the data. A node applies a message (or the answer
//! to its own read of the hash) only if its version is newer than the one it has, so a late
//! reply to a read can never undo a newer message; as each message carries the whole set, no
//! message depends on an earlier one. A user is held elsewhere when the set names another node.
//!
//! Control (channel `reach:control`): MessagePack `[origin node id, change]`, change one of
//! [`Control`]. Records live in the shared PostgreSQL database; the message only tells other
//! nodes to re-read them (a switch flip, a profile or binding change, a deletion) and to
//! notify their sockets.
//!
//! # Order of operations
//!
//! - Hold: `SADD` to the node's user set, then the hold script (`HSET`, publish if the node was
//!   not holding). Release: the release script (`HDEL` if the incarnation matches, publish,
//!   let the hash expire once empty), then `SREM`. So the set always covers the holds.
//! - Watch: `SUBSCRIBE` first, then read the hash, so no change falls between the two.
//! - Events of one user come from the engine in order and go to Redis in order (one task, one
//!   multiplexed connection, batches sent as pipelines).
//! - A connection's `welcome` waits until the backplane has written every event the engine
//!   had reported by then ([`Cluster::written`]), so its hold is in Redis when the client
//!   hears it is connected.
//!
//! # Presence changes for the store
//!
//! Only the backplane knows when a user's presence changes for the whole cluster: when a hold
//! is the first one anywhere (the hold script answers one holder) and when a release leaves
//! none (also the releases of a dead node's holds, made by the node that cleans up after it).
//! The node whose script made that change reports it, once, as a
//! [`reach_core::PersistEvent::Presence`] on the channel the engine uses for the store, with
//! the script's version (a change's version is its time in Redis, in microseconds), so the
//! store keeps only newer ones. Presence is recorded once per change in the cluster, not per
//! node: webhooks and last-seen times come from these reports.
//!
//! # Failures
//!
//! - Liveness: every `node_ttl_ms / 3` a node rewrites its liveness key (`SET ... PX ttl GET`)
//!   and its `reach:nodes` entry. Every second each node looks for entries of `reach:nodes`
//!   whose liveness key is gone; the first to take `reach:reap:<node>` waits the offline grace
//!   (a user of the dead node may reconnect elsewhere meanwhile), checks the node is still
//!   gone, then releases each of its holds (of that incarnation) and deletes its set. Users of a
//!   `kill -9`ed node go offline within `node_ttl_ms + 1 s + offline_grace`. The claim expires
//!   after `offline_grace + node_ttl_ms + 1 s`, so if the cleaning node dies too, another
//!   takes over.
//! - If a heartbeat finds its liveness key gone (expired, or Redis restarted), or any command
//!   fails, the node starts over: new connections, new incarnation, every hold of the engine
//!   written again, holds of the old incarnation that the engine no longer has released, every
//!   watched user subscribed and read again. While Redis is unreachable the node keeps serving
//!   its own presence (and the last known state of other nodes' users), retries every 250 ms,
//!   and reports down (`/readyz` answers 503). Watches made meanwhile are answered with local
//!   presence only and corrected at the resynchronisation.
//! - A node leaving in an orderly way (drain) marks itself as left (`reach:left:<node id>`,
//!   expiring) and deletes its liveness key, so the others clean up after the grace without
//!   waiting for the TTL, as after a node that left: it is logged as such and not counted in
//!   `reach_cluster_reaped_nodes_total`. From then on it writes no hold or release of its own:
//!   the users it still holds are released, and their offline reported, by the node that
//!   cleans up after it.

mod scripts;
mod session;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use reach_core::{ClusterEvent, Engine, PersistEvent, PresenceChange, UserKey};
use reach_proto::ServiceSid;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

/// Settings of a cluster node.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `redis://host:port/db`.
    pub redis_url: String,
    /// Unique among the nodes; letters, digits, `-`, `_`, `.`.
    pub node_id: String,
    /// How long a node counts as alive after its last heartbeat.
    pub node_ttl: Duration,
    /// The engine's offline grace (a dead node's users stay online this long after detection).
    pub offline_grace: Duration,
}

/// A change of records made at one node, for the others to re-read and publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// The service's configuration (the reachability switch) changed, or it was created.
    ServiceChanged { service_sid: ServiceSid },
    /// The service was deleted.
    ServiceDeleted { service_sid: ServiceSid },
    /// A user's profile or push bindings changed.
    UserChanged {
        service_sid: ServiceSid,
        identity: String,
    },
    /// A user was deleted.
    UserDeleted {
        service_sid: ServiceSid,
        identity: String,
    },
    /// Not sent over Redis: delivered locally after the backplane reconnected, when control
    /// messages may have been missed; the node re-reads every service's configuration.
    Resynchronised,
}

/// Why the backplane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("invalid redis_url: {0}")]
    Url(redis::RedisError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The backplane's Prometheus metrics.
#[derive(Debug, Clone)]
pub(crate) struct ClusterMetrics {
    pub up: IntGauge,
    pub commands: IntCounter,
    pub messages: IntCounterVec,
    pub resyncs: IntCounter,
    pub reaped: IntCounter,
    pub nodes: IntGauge,
}

impl ClusterMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = ClusterMetrics {
            up: IntGauge::new(
                "reach_cluster_redis_up",
                "1 while the backplane is connected to Redis and in sync",
            )?,
            commands: IntCounter::new(
                "reach_cluster_redis_commands_total",
                "Redis commands sent by the backplane (each command of a pipeline counts)",
            )?,
            messages: IntCounterVec::new(
                Opts::new(
                    "reach_cluster_messages_total",
                    "Pub/sub messages received, by kind (presence, control)",
                ),
                &["kind"],
            )?,
            resyncs: IntCounter::new(
                "reach_cluster_resyncs_total",
                "Times the node rebuilt its state in Redis (start, reconnection, lost liveness)",
            )?,
            reaped: IntCounter::new(
                "reach_cluster_reaped_nodes_total",
                "Dead nodes whose holds this node released",
            )?,
            nodes: IntGauge::new(
                "reach_cluster_nodes",
                "Live nodes seen at the last liveness scan, this one included",
            )?,
        };
        registry.register(Box::new(m.up.clone()))?;
        registry.register(Box::new(m.commands.clone()))?;
        registry.register(Box::new(m.messages.clone()))?;
        registry.register(Box::new(m.resyncs.clone()))?;
        registry.register(Box::new(m.reaped.clone()))?;
        registry.register(Box::new(m.nodes.clone()))?;
        Ok(m)
    }
}

pub(crate) struct Shared {
    pub config: ClusterConfig,
    pub client: redis::Client,
    pub up: AtomicBool,
    /// The current session's command connection (for REST reads and control messages).
    pub conn: Mutex<Option<MultiplexedConnection>>,
    pub metrics: ClusterMetrics,
    pub engine: Arc<Engine>,
    pub control: mpsc::UnboundedSender<Control>,
    /// Where the presence changes this node made for the cluster go (to the store).
    pub persist: mpsc::UnboundedSender<PersistEvent>,
    /// The other nodes alive at the last liveness scan.
    pub peers: Mutex<Vec<String>>,
    pub leaving: AtomicBool,
    /// How many of the engine's events the backplane is done with: written to Redis, or
    /// dropped while Redis was away (redone from the engine's state when it is back).
    pub done: watch::Sender<u64>,
}

/// Reports a change of the user's presence in the whole cluster, made by a script of this node
/// at `version`.
pub(crate) fn report(
    persist: &mpsc::UnboundedSender<PersistEvent>,
    key: &UserKey,
    online: bool,
    version: u64,
) {
    let _ = persist.send(PersistEvent::Presence(PresenceChange {
        key: key.clone(),
        online,
        at: i64::try_from(version / 1_000_000).unwrap_or(i64::MAX),
        version: i64::try_from(version).unwrap_or(i64::MAX),
    }));
}

/// Handle of the backplane. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.shared.config.node_id)
            .field("up", &self.is_up())
            .finish()
    }
}

/// A random node id, `node-` and 12 hex digits.
pub fn random_node_id() -> String {
    format!("node-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// Whether `id` is a valid node id.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Cluster {
    /// Starts the backplane task. `events` is the receiving end of the channel given to
    /// [`Engine::new_clustered`]; `persist` receives the presence changes of the cluster that
    /// this node made (see the module doc). Returns at once (Redis may be down); the second
    /// value receives the record changes other nodes announce.
    pub fn start(
        config: ClusterConfig,
        engine: Arc<Engine>,
        events: mpsc::UnboundedReceiver<ClusterEvent>,
        persist: mpsc::UnboundedSender<PersistEvent>,
        registry: &Registry,
    ) -> Result<(Cluster, mpsc::UnboundedReceiver<Control>), ClusterError> {
        let client = redis::Client::open(config.redis_url.as_str()).map_err(ClusterError::Url)?;
        let metrics = ClusterMetrics::new(registry)?;
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            config,
            client,
            up: AtomicBool::new(false),
            conn: Mutex::new(None),
            metrics,
            engine,
            control: control_tx,
            persist,
            peers: Mutex::new(Vec::new()),
            leaving: AtomicBool::new(false),
            done: watch::Sender::new(0),
        });
        tokio::spawn(session::run(Arc::clone(&shared), events));
        Ok((Cluster { shared }, control_rx))
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.shared.config.node_id
    }

    /// The other nodes alive at the last liveness scan (every second), sorted.
    pub fn peers(&self) -> Vec<String> {
        self.shared
            .peers
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
    }

    /// True while connected to Redis and in sync.
    pub fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Relaxed)
    }

    /// Waits until the backplane has written the first `events` events of the engine to Redis
    /// (a count from [`Engine::cluster_events_sent`]), so the other nodes see what they
    /// changed: a hold written before a `welcome` is sent keeps a `bye` of the same user at
    /// another node from reading as its last hold. Returns at once while Redis is away
    /// (local presence is served meanwhile) and after at most the command timeout.
    pub async fn written(&self, events: u64) {
        if !self.is_up() {
            return;
        }
        let mut done = self.shared.done.subscribe();
        let _ = tokio::time::timeout(session::IO_TIMEOUT, done.wait_for(|d| *d >= events)).await;
    }

    fn connection(&self) -> Option<MultiplexedConnection> {
        if !self.is_up() {
            return None;
        }
        self.shared.conn.lock().ok()?.clone()
    }

    /// Tells the other nodes about a record change (best effort: a node that misses it while
    /// Redis is down re-reads configurations when it reconnects).
    pub async fn announce(&self, change: Control) {
        let Some(mut conn) = self.connection() else {
            return;
        };
        let payload = match rmp_serde::to_vec(&(&self.shared.config.node_id, &change)) {
            Ok(p) => p,
            Err(_) => return,
        };
        self.shared.metrics.commands.inc();
        let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(session::CONTROL_CHANNEL)
            .arg(payload)
            .query_async(&mut conn)
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "could not announce a record change");
        }
    }

    /// Of each user, the version of its holder set and whether any node holds it, from Redis;
    /// `None` while Redis is unreachable. (A user with no hash reads as not held, at Redis's
    /// current time.)
    pub async fn holders(&self, keys: &[UserKey]) -> Option<Vec<(u64, bool)>> {
        let mut conn = self.connection()?;
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("EVALSHA")
                .arg(scripts::peek().sha())
                .arg(1)
                .arg(session::holders_key(key));
        }
        self.shared.metrics.commands.inc_by(keys.len() as u64);
        let replies: Vec<Vec<u8>> = pipe.query_async(&mut conn).await.ok()?;
        replies
            .iter()
            .map(|r| {
                scripts::decode_state(r)
                    .ok()
                    .map(|(v, nodes)| (v, !nodes.is_empty()))
            })
            .collect()
    }

    /// Takes the cluster-wide turn of a periodic task named `task` for `period` (`SET NX`):
    /// true when this node is the one to run it now; `None` while Redis is unreachable.
    pub async fn take_turn(&self, task: &str, period: Duration) -> Option<bool> {
        let mut conn = self.connection()?;
        self.shared.metrics.commands.inc();
        let taken: Option<String> = redis::cmd("SET")
            .arg(format!("reach:turn:{task}"))
            .arg(&self.shared.config.node_id)
            .arg("NX")
            .arg("PX")
            .arg(u64::try_from(period.as_millis()).unwrap_or(u64::MAX).max(1))
            .query_async(&mut conn)
            .await
            .ok()?;
        Some(taken.is_some())
    }

    /// Whether any node holds the user, from Redis; `None` while Redis is unreachable.
    pub async fn held_anywhere(&self, key: &UserKey) -> Option<bool> {
        let mut conn = self.connection()?;
        self.shared.metrics.commands.inc();
        let reply: Vec<u8> = scripts::peek()
            .script
            .key(session::holders_key(key))
            .invoke_async(&mut conn)
            .await
            .ok()?;
        let (_, nodes) = scripts::decode_state(&reply).ok()?;
        Some(!nodes.is_empty())
    }

    /// Orderly exit (end of a drain): deletes this node's liveness key, so the other nodes
    /// release its users after the grace without waiting for the TTL.
    pub async fn leave(&self) {
        self.shared.leaving.store(true, Ordering::Relaxed);
        let Some(mut conn) = self.connection() else {
            return;
        };
        let node = &self.shared.config.node_id;
        let ttl = session::left_ttl_ms(
            self.shared.config.offline_grace,
            self.shared.config.node_ttl,
        );
        let _: redis::RedisResult<()> = redis::pipe()
            .cmd("SET")
            .arg(session::left_key(node))
            .arg(1)
            .arg("PX")
            .arg(ttl)
            .ignore()
            .cmd("DEL")
            .arg(session::liveness_key(node))
            .ignore()
            .query_async(&mut conn)
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids() {
        assert!(valid_node_id("node-1"));
        assert!(valid_node_id("a.b_c-9"));
        assert!(!valid_node_id(""));
        assert!(!valid_node_id("a b"));
        assert!(!valid_node_id("a:b"));
        assert!(!valid_node_id(&"x".repeat(65)));
        let id = random_node_id();
        assert!(valid_node_id(&id) && id.starts_with("node-"), "{id}");
    }

    #[test]
    fn control_round_trips_as_messagepack() {
        let c = Control::UserChanged {
            service_sid: "IS0123456789abcdef0123456789abcdef".parse().unwrap(),
            identity: "alice".into(),
        };
        let bytes = rmp_serde::to_vec(&("n1", &c)).unwrap();
        let (from, back): (String, Control) = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!((from.as_str(), back), ("n1", c));
        /// The same message shape with any string as the SID.
        #[derive(Serialize)]
        enum Untyped {
            ServiceDeleted { service_sid: String },
        }
        let message = |sid: &str| {
            rmp_serde::to_vec(&(
                "n1",
                Untyped::ServiceDeleted {
                    service_sid: sid.into(),
                },
            ))
            .unwrap()
        };
        let good = message("IS0123456789abcdef0123456789abcdef");
        assert!(rmp_serde::from_slice::<(String, Control)>(&good).is_ok());
        let bad = message("IS1");
        assert!(
            rmp_serde::from_slice::<(String, Control)>(&bad).is_err(),
            "a malformed service SID is refused when read"
        );
    }
}
