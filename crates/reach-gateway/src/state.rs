//! The state every handler shares: [`App`]. REST handlers and socket tasks reach the engine,
//! the store, the backplane and the metrics through it, and tell it of every record change
//! (`service_changed`, `service_deleted`, `user_changed`, `user_deleted`), which it hands to
//! the engine (so this node's subscribers are told) and, in a cluster, announces to the other
//! nodes. It also keeps the adapters between store records and what the engine and REST show
//! ([`profile_of`], [`service_state`], [`App::user_flags`]).
//!
//! Handlers depend on this module; it depends on no handler. The background tasks that feed it
//! ([`crate::sync`]) and the listeners ([`crate::server`]) are started by the server.

use std::sync::Arc;
use std::time::Duration;

use reach_cluster::{Cluster, ClusterConfig, Control};
use reach_core::{Engine, EngineConfig, PersistEvent, Profile, ServiceState, UserKey};
use reach_proto::flags;
use reach_store::{Service, ServiceConfig, ServiceSid, Store, StoreError, UserRecord};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Budget, Pending, open_file_limit};
use crate::auth::Credentials;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::profiles::ProfileReads;
use crate::throttle::Throttles;
use crate::timers::Timers;
use crate::tls::{Tls, TlsError};

/// State shared by REST handlers and socket tasks.
pub struct App {
    pub config: Config,
    pub creds: Credentials,
    pub store: Arc<dyn Store>,
    /// The profile reads of `subscribe`, coalesced across sockets.
    pub profiles: ProfileReads,
    pub engine: Arc<Engine>,
    /// The backplane, when this node is part of a cluster (`cluster.redis_url`).
    pub cluster: Option<Cluster>,
    pub metrics: Metrics,
    /// One permit per open socket (`limits.max_connections`).
    pub conn_permits: Arc<Semaphore>,
    /// One permit per open public connection of any kind: the descriptors they may hold
    /// ([`Budget::connections`]).
    pub open_connections: Arc<Semaphore>,
    /// Cancelled when the gateway starts draining.
    pub shutdown: CancellationToken,
    /// Every socket task, so draining can wait for them.
    pub sockets: TaskTracker,
    /// The sockets' deadlines, on one shared timer.
    pub timers: Arc<Timers>,
    /// Connections that are not authenticated sockets yet, capped in all and per address.
    pub pending: Arc<Pending>,
    /// REST requests per account, failed authentications per address, frames per socket.
    pub throttles: Throttles,
    /// TLS of the public listener, when `server.tls_cert_path` is set.
    pub tls: Option<Arc<Tls>>,
    /// This node's name in the store's webhook leases and liveness: the cluster node id, or
    /// [`SINGLE_NODE`].
    pub node_id: String,
    /// Woken after a write that may have recorded webhook events ([`App::wake_webhooks`]).
    pub webhook_wake: Arc<Notify>,
    /// The channel the engine reports to the store on (also used by the recovery and the
    /// cluster's sweep, so a user's changes stay in one order).
    pub persist: mpsc::UnboundedSender<PersistEvent>,
    /// Cancelled once the sockets are drained: the background writers write what they hold
    /// and end.
    pub stopping: CancellationToken,
    /// The background writers the server waits for after the drain ([`App::stopping`]).
    pub background: TaskTracker,
    /// When the app was built (`/debug/status`'s uptime).
    pub started: std::time::Instant,
    /// Services by SID, so a `hello` does not read the store for its service each time.
    /// Filled on first use; a deleted service stays as `None` (a tombstone), so a read that
    /// raced with the delete cannot bring it back.
    services: dashmap::DashMap<String, Option<Arc<Service>>, foldhash::fast::RandomState>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

/// What the engine and the backplane report to the background tasks of [`crate::sync`].
#[derive(Debug)]
pub struct Feeds {
    /// What to record in the store: users online in a new reachability epoch, and presence
    /// changes as subscribers see them.
    pub persist: mpsc::UnboundedReceiver<PersistEvent>,
    /// Record changes announced by other nodes (cluster mode).
    pub control: Option<mpsc::UnboundedReceiver<Control>>,
}

/// The node name of a gateway that is not part of a cluster (its data folder has one process).
pub const SINGLE_NODE: &str = "single";

/// A user's flags as REST and webhooks report them (`is_online`, `is_notifiable`,
/// `date_last_seen` in unix seconds), by the null rules of `reach_proto::flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flags {
    pub is_online: Option<bool>,
    pub is_notifiable: Option<bool>,
    pub last_seen_at: Option<i64>,
}

impl Flags {
    /// What a list shows: nothing.
    pub const NONE: Flags = Flags {
        is_online: None,
        is_notifiable: None,
        last_seen_at: None,
    };
}

/// Converts a store record into what the engine keeps.
pub fn profile_of(rec: &UserRecord) -> Profile {
    Profile {
        revision: rec.revision,
        friendly_name: rec.friendly_name.clone(),
        attributes: rec.attributes.clone(),
        binding_count: rec.binding_count,
        ever_had_binding: rec.ever_had_binding,
        online_epoch: rec.online_epoch,
        last_seen_at: rec.last_seen_at,
    }
}

/// The engine's view of a configuration row.
pub fn service_state(cfg: &ServiceConfig) -> ServiceState {
    ServiceState {
        enabled: cfg.reachability_enabled,
        epoch: cfg.reachability_epoch,
    }
}

impl App {
    /// Builds the app over an opened store: the engine (clustered when `cluster.redis_url` is
    /// set, joining the backplane), every service's switch loaded into it. The returned
    /// [`Feeds`] are for [`crate::sync`]; [`crate::server::start`] does both.
    pub async fn new(
        config: Config,
        creds: Credentials,
        store: Arc<dyn Store>,
    ) -> Result<(Arc<App>, Feeds), StartError> {
        let metrics = Metrics::new()?;
        let tls = if config.server.tls_cert_path.as_os_str().is_empty() {
            None
        } else {
            Some(Arc::new(Tls::load(
                &config.server.tls_cert_path,
                &config.server.tls_key_path,
            )?))
        };
        let limits = &config.limits;
        let budget = Budget::fit(
            limits.max_connections,
            limits.max_pending_connections,
            open_file_limit(),
        );
        if let Some(open_files) = budget.lowered_for {
            tracing::warn!(
                open_files,
                sockets = budget.sockets,
                pending = budget.pending,
                "the open-file limit cannot hold the configured caps: limits.max_connections and limits.max_pending_connections lowered, so that REST and the admin endpoints keep answering at the socket cap (raise `ulimit -n` to lift this)"
            );
        }
        let pending = Pending::new(
            budget.pending,
            limits.max_pending_per_address.min(budget.pending),
            metrics.pending_connections.clone(),
        );
        let (persist_tx, persist) = mpsc::unbounded_channel();
        let engine_config = EngineConfig {
            offline_grace: config.offline_grace(),
            max_outbox_bytes: config.limits.max_outbox_bytes,
        };
        let node_id = match (config.clustered(), config.cluster.node_id.as_str()) {
            (false, _) => SINGLE_NODE.to_owned(),
            (true, "") => reach_cluster::random_node_id(),
            (true, id) => id.to_owned(),
        };
        let (engine, cluster, control) = if config.clustered() {
            let (tx, rx) = mpsc::unbounded_channel();
            let engine = Engine::new_clustered(
                engine_config,
                metrics.engine.clone(),
                Some(persist_tx.clone()),
                tx,
            );
            tracing::info!(node_id = %node_id, "joining the cluster");
            let (cluster, control) = Cluster::start(
                ClusterConfig {
                    redis_url: config.cluster.redis_url.clone(),
                    node_id: node_id.clone(),
                    node_ttl: Duration::from_millis(config.cluster.node_ttl_ms),
                    offline_grace: config.offline_grace(),
                },
                Arc::clone(&engine),
                rx,
                persist_tx.clone(),
                &metrics.registry,
            )?;
            (engine, Some(cluster), Some(control))
        } else {
            let engine = Engine::new(
                engine_config,
                metrics.engine.clone(),
                Some(persist_tx.clone()),
            );
            // Versions of this node's presence changes continue from what the store holds,
            // whatever the clock did meanwhile.
            engine
                .presence_clock()
                .advance(store.max_presence_version().await?);
            (engine, None, None)
        };
        for cfg in store.list_configs().await? {
            engine.set_service(&cfg.service_sid, service_state(&cfg));
        }
        let throttles = Throttles::new(&config.limits, metrics.rate_limited.clone());
        let app = Arc::new(App {
            conn_permits: Arc::new(Semaphore::new(budget.sockets)),
            open_connections: Arc::new(Semaphore::new(
                budget.connections.min(Semaphore::MAX_PERMITS),
            )),
            config,
            creds,
            profiles: ProfileReads::over(Arc::clone(&store)),
            store,
            engine,
            cluster,
            metrics,
            shutdown: CancellationToken::new(),
            sockets: TaskTracker::new(),
            timers: Arc::new(Timers::default()),
            services: dashmap::DashMap::default(),
            node_id,
            webhook_wake: Arc::new(Notify::new()),
            persist: persist_tx,
            stopping: CancellationToken::new(),
            background: TaskTracker::new(),
            started: std::time::Instant::now(),
            pending,
            throttles,
            tls,
        });
        Ok((app, Feeds { persist, control }))
    }

    /// The service with this SID (any account), from memory when it was seen before.
    pub async fn find_service(&self, sid: &ServiceSid) -> reach_store::Result<Arc<Service>> {
        if let Some(s) = self.services.get(sid.as_str()) {
            return s.clone().ok_or(StoreError::NotFound);
        }
        let service = self.store.find_service(sid).await?;
        self.services
            .entry(sid.to_string())
            .or_insert(Some(Arc::new(service)))
            .clone()
            .ok_or(StoreError::NotFound)
    }

    /// Forgets a deleted service: its connections are closed and its tokens refused. Other
    /// nodes are told.
    pub async fn service_deleted(&self, sid: &ServiceSid) {
        self.forget_service(sid);
        self.announce(Control::ServiceDeleted {
            service_sid: sid.clone(),
        })
        .await;
    }

    /// A service deleted here or at another node: tombstoned in the cache, its sockets closed
    /// with 4003.
    pub(crate) fn forget_service(&self, sid: &ServiceSid) {
        self.services.insert(sid.to_string(), None);
        self.engine.remove_service(sid);
    }

    /// A service was created or its configuration changed: the engine applies the switch
    /// (pushing `service_updated` on a change), and other nodes are told.
    pub async fn service_changed(&self, cfg: &ServiceConfig) {
        self.engine
            .set_service(&cfg.service_sid, service_state(cfg));
        self.announce(Control::ServiceChanged {
            service_sid: cfg.service_sid.clone(),
        })
        .await;
    }

    /// A user's record changed (profile or bindings): watchers here and on other nodes are
    /// notified of what changed.
    pub async fn user_changed(&self, rec: &UserRecord) {
        self.engine
            .update_profile(&rec.service_sid, &rec.identity, profile_of(rec));
        self.announce(Control::UserChanged {
            service_sid: rec.service_sid.clone(),
            identity: rec.identity.clone(),
        })
        .await;
    }

    /// A user was deleted: its sockets here and on other nodes close with 4003.
    pub async fn user_deleted(&self, service_sid: &ServiceSid, identity: &str) {
        self.engine.remove_user(service_sid, identity);
        self.announce(Control::UserDeleted {
            service_sid: service_sid.clone(),
            identity: identity.to_owned(),
        })
        .await;
    }

    /// Tells this node's webhook deliverer that events may have been recorded.
    pub fn wake_webhooks(&self) {
        self.webhook_wake.notify_one();
    }

    /// After a write made with `fire`: wakes the deliverer (the write may have recorded events).
    pub fn events_recorded(&self, fire: Option<reach_store::Source>) {
        if fire.is_some() {
            self.wake_webhooks();
        }
    }

    async fn announce(&self, change: Control) {
        if let Some(cluster) = &self.cluster {
            cluster.announce(change).await;
        }
    }

    /// Ready for traffic: not draining and, in a cluster, connected to Redis.
    pub fn is_ready(&self) -> bool {
        !self.shutdown.is_cancelled() && self.cluster.as_ref().is_none_or(|c| c.is_up())
    }

    /// A user's flags as REST reports them. In a cluster, online means held by any node
    /// (asked of Redis; what this node knows while Redis is away). The last-seen time is the
    /// later of what this node's engine and the store know (the store is written in batches).
    pub async fn user_flags(&self, cfg: &ServiceConfig, rec: &UserRecord) -> Flags {
        let svc = service_state(cfg);
        let here = self.engine.presence(&cfg.service_sid, &rec.identity);
        let mut online = here.is_some_and(|p| p.online);
        let epoch = here.map_or(rec.online_epoch, |p| p.online_epoch);
        let went_offline = here.and_then(|p| p.last_seen_at).max(rec.last_seen_at);
        if let Some(cluster) = &self.cluster
            && svc.enabled
            && let Some(anywhere) = cluster
                .held_anywhere(&UserKey::new(&cfg.service_sid, &rec.identity))
                .await
        {
            // This node's own hold may not have reached Redis yet.
            online = online || anywhere;
        }
        let is_online = flags::is_online_flag(svc, online, epoch.max(rec.online_epoch));
        Flags {
            is_online,
            is_notifiable: flags::is_notifiable_flag(svc, rec.ever_had_binding, rec.binding_count),
            last_seen_at: flags::last_seen(is_online, went_offline, reach_proto::now_unix()),
        }
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cluster: {0}")]
    Cluster(#[from] reach_cluster::ClusterError),
    #[error("storage: {0}")]
    Store(#[from] reach_store::StoreError),
    #[error("{0}")]
    Tls(#[from] TlsError),
}
