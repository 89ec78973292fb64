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
use reach_store::{Service, ServiceConfig, ServiceSid, Store, StoreError, UserRecord};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Budget, Pending, open_file_limit};
use crate::auth::Credentials;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::throttle::Throttles;
use crate::timers::Timers;
use crate::tls::{Tls, TlsError};

/// State shared by REST handlers and socket tasks.
pub struct App {
    pub config: Config,
    pub creds: Credentials,
    pub store: Arc<dyn Store>,
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
    /// Services by SID, so a `hello` does not read the store for its service each time.
    /// Filled on first use; a deleted service stays as `None` (a tombstone), so a read that
    /// raced with the delete cannot bring it back.
    services: dashmap::DashMap<String, Option<Arc<Service>>>,
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
    /// Users online in a new reachability epoch, to record in the store.
    pub persist: mpsc::UnboundedReceiver<PersistEvent>,
    /// Record changes announced by other nodes (cluster mode).
    pub control: Option<mpsc::UnboundedReceiver<Control>>,
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
        let (engine, cluster, control) = if config.clustered() {
            let (tx, rx) = mpsc::unbounded_channel();
            let engine =
                Engine::new_clustered(engine_config, metrics.engine.clone(), Some(persist_tx), tx);
            let node_id = match config.cluster.node_id.as_str() {
                "" => reach_cluster::random_node_id(),
                id => id.to_owned(),
            };
            tracing::info!(node_id = %node_id, "joining the cluster");
            let (cluster, control) = Cluster::start(
                ClusterConfig {
                    redis_url: config.cluster.redis_url.clone(),
                    node_id,
                    node_ttl: Duration::from_millis(config.cluster.node_ttl_ms),
                    offline_grace: config.offline_grace(),
                },
                Arc::clone(&engine),
                rx,
                &metrics.registry,
            )?;
            (engine, Some(cluster), Some(control))
        } else {
            let engine = Engine::new(engine_config, metrics.engine.clone(), Some(persist_tx));
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
            store,
            engine,
            cluster,
            metrics,
            shutdown: CancellationToken::new(),
            sockets: TaskTracker::new(),
            timers: Arc::new(Timers::default()),
            services: dashmap::DashMap::new(),
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

    async fn announce(&self, change: Control) {
        if let Some(cluster) = &self.cluster {
            cluster.announce(change).await;
        }
    }

    /// Ready for traffic: not draining and, in a cluster, connected to Redis.
    pub fn is_ready(&self) -> bool {
        !self.shutdown.is_cancelled() && self.cluster.as_ref().is_none_or(|c| c.is_up())
    }

    /// `(is_online, is_notifiable)` of a user as REST and the socket report it. In a cluster,
    /// online means held by any node (asked of Redis; what this node knows while Redis is
    /// away).
    pub async fn user_flags(
        &self,
        cfg: &ServiceConfig,
        rec: &UserRecord,
    ) -> (Option<bool>, Option<bool>) {
        let svc = service_state(cfg);
        let (mut online, epoch) = self
            .engine
            .presence(&cfg.service_sid, &rec.identity)
            .unwrap_or((false, rec.online_epoch));
        if let Some(cluster) = &self.cluster
            && svc.enabled
            && let Some(anywhere) = cluster
                .held_anywhere(&UserKey::new(&cfg.service_sid, &rec.identity))
                .await
        {
            // This node's own hold may not have reached Redis yet.
            online = online || anywhere;
        }
        let is_online = reach_core::is_online_flag(svc, online, epoch.max(rec.online_epoch));
        let is_notifiable =
            reach_core::is_notifiable_flag(svc, rec.ever_had_binding, rec.binding_count);
        (is_online, is_notifiable)
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
