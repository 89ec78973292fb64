//! The running gateway: shared state ([`App`]), the two listeners, and draining.
//!
//! `run` takes bound listeners and a shutdown future, so tests bind port 0. On shutdown the
//! public listener stops accepting, every socket gets `goodbye` and a 1001 close, and `run`
//! waits for the socket tasks (which axum's graceful shutdown does not track once upgraded)
//! up to `drain_grace_ms`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::serve::ListenerExt;
use reach_cluster::{Cluster, ClusterConfig, Control};
use reach_core::{Engine, EngineConfig, PersistEvent, Profile, ServiceState, UserKey};
use reach_store::{ServiceConfig, Store, StoreError, UserRecord};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Credentials;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::timers::Timers;

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
    /// Cancelled when the gateway starts draining.
    pub shutdown: CancellationToken,
    /// Every socket task, so draining can wait for them.
    pub sockets: TaskTracker,
    /// The sockets' deadlines, on one shared timer.
    pub timers: Arc<Timers>,
    /// Services by SID, so a `hello` does not read the store for its service each time.
    /// Filled on first use; a deleted service stays as `None` (a tombstone), so a read that
    /// raced with the delete cannot bring it back.
    services: dashmap::DashMap<String, Option<Arc<reach_store::Service>>>,
    ready: AtomicBool,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
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

impl App {
    /// Builds the app over an opened store; loads every service's switch into the engine and
    /// starts the task that records "online in this epoch" off the hot path.
    pub async fn new(
        config: Config,
        creds: Credentials,
        store: Arc<dyn Store>,
    ) -> Result<Arc<App>, StartError> {
        let metrics = Metrics::new()?;
        let (persist_tx, persist_rx) = mpsc::unbounded_channel();
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
        tokio::spawn(persist_online(Arc::clone(&store), persist_rx));
        let app = Arc::new(App {
            conn_permits: Arc::new(Semaphore::new(config.limits.max_connections)),
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
            ready: AtomicBool::new(true),
        });
        tokio::spawn(Timers::drive(Arc::downgrade(&app.timers)));
        if let Some(control) = control {
            tokio::spawn(apply_control(Arc::downgrade(&app), control));
        }
        Ok(app)
    }

    /// The service with this SID (any account), from memory when it was seen before.
    pub async fn find_service(&self, sid: &str) -> reach_store::Result<Arc<reach_store::Service>> {
        if let Some(s) = self.services.get(sid) {
            return s.clone().ok_or(reach_store::StoreError::NotFound);
        }
        let service = self.store.find_service(sid).await?;
        self.services
            .entry(sid.to_owned())
            .or_insert(Some(Arc::new(service)))
            .clone()
            .ok_or(reach_store::StoreError::NotFound)
    }

    /// Forgets a deleted service: its connections are closed and its tokens refused. Other
    /// nodes are told.
    pub async fn service_deleted(&self, sid: &str) {
        self.forget_service(sid);
        self.announce(Control::ServiceDeleted {
            service_sid: sid.to_owned(),
        })
        .await;
    }

    fn forget_service(&self, sid: &str) {
        self.services.insert(sid.to_owned(), None);
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
    pub async fn user_deleted(&self, service_sid: &str, identity: &str) {
        self.engine.remove_user(service_sid, identity);
        self.announce(Control::UserDeleted {
            service_sid: service_sid.to_owned(),
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
        self.ready.load(Ordering::Relaxed)
            && !self.shutdown.is_cancelled()
            && self.cluster.as_ref().is_none_or(|c| c.is_up())
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

/// The engine's view of a configuration row.
pub fn service_state(cfg: &ServiceConfig) -> ServiceState {
    ServiceState {
        enabled: cfg.reachability_enabled,
        epoch: cfg.reachability_epoch,
    }
}

async fn persist_online(store: Arc<dyn Store>, mut rx: mpsc::UnboundedReceiver<PersistEvent>) {
    while let Some(event) = rx.recv().await {
        match event {
            PersistEvent::Online {
                service_sid,
                identity,
                epoch,
            } => {
                if let Err(e) = store.mark_online(&service_sid, &identity, epoch).await {
                    tracing::debug!(%service_sid, %identity, error = %e, "could not record online epoch");
                }
            }
        }
    }
}

/// Applies record changes announced by other nodes: re-reads them from the shared store and
/// lets the engine notify this node's sockets.
async fn apply_control(app: std::sync::Weak<App>, mut rx: mpsc::UnboundedReceiver<Control>) {
    while let Some(change) = rx.recv().await {
        let Some(app) = app.upgrade() else { return };
        match change {
            Control::ServiceChanged { service_sid } => {
                match app.store.get_config(&service_sid).await {
                    Ok(cfg) => app.engine.set_service(&service_sid, service_state(&cfg)),
                    Err(StoreError::NotFound) => {}
                    Err(e) => {
                        tracing::warn!(%service_sid, error = %e, "could not re-read a service configuration")
                    }
                }
            }
            Control::ServiceDeleted { service_sid } => app.forget_service(&service_sid),
            Control::UserChanged {
                service_sid,
                identity,
            } => {
                if !app.engine.knows(&service_sid, &identity) {
                    continue;
                }
                match app.store.get_user(&service_sid, &identity).await {
                    Ok(rec) if rec.identity == identity => {
                        app.engine
                            .update_profile(&service_sid, &identity, profile_of(&rec));
                    }
                    Ok(_) | Err(StoreError::NotFound) => {}
                    Err(e) => {
                        tracing::warn!(%service_sid, %identity, error = %e, "could not re-read a user")
                    }
                }
            }
            Control::UserDeleted {
                service_sid,
                identity,
            } => app.engine.remove_user(&service_sid, &identity),
            Control::Resynchronised => match app.store.list_configs().await {
                Ok(configs) => {
                    for cfg in configs {
                        app.engine
                            .set_service(&cfg.service_sid, service_state(&cfg));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not re-read service configurations"),
            },
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
}

/// Binds a TCP listener with the given backlog.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The public router: REST and the WebSocket endpoint.
pub fn public_router(app: Arc<App>) -> Router {
    crate::rest::router(Arc::clone(&app)).merge(crate::ws::router(app))
}

/// The admin router: `/metrics`, `/healthz`, `/readyz`.
pub fn admin_router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(app): State<Arc<App>>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    app.metrics.render(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(app): State<Arc<App>>| async move {
                if app.is_ready() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        )
        .with_state(app)
}

/// Serves both listeners until `shutdown` resolves, then drains (see the module doc).
pub async fn run(
    app: Arc<App>,
    public: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let token = app.shutdown.clone();
    tokio::spawn({
        let token = token.clone();
        let app = Arc::clone(&app);
        async move {
            shutdown.await;
            token.cancel();
            // Sockets that have not said hello yet see the token; the others are told here.
            for conn in app.engine.connections() {
                crate::ws::goodbye(&app, &conn);
            }
        }
    });
    // The admin listener outlives the drain, so /readyz answers 503 while sockets close.
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn({
        let router = admin_router(Arc::clone(&app));
        let stop = admin_stop.clone();
        async move {
            let _ = axum::serve(admin, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        }
    });
    let router =
        public_router(Arc::clone(&app)).into_make_service_with_connect_info::<SocketAddr>();
    let public_token = token.clone();
    // TCP_NODELAY: presence frames are small and must leave at once; with Nagle a frame
    // written while the previous one is unacknowledged waits for the peer's delayed ACK
    // (~40 ms).
    let public = public.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(public, router)
        .with_graceful_shutdown(async move { public_token.cancelled().await })
        .await?;
    // Draining: socket tasks saw the cancellation and are saying goodbye.
    app.sockets.close();
    let grace = Duration::from_millis(app.config.server.drain_grace_ms);
    if tokio::time::timeout(grace, app.sockets.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = app.sockets.len(),
            "drain grace over; closing the remaining sockets"
        );
    }
    if let Some(cluster) = &app.cluster {
        cluster.leave().await;
    }
    admin_stop.cancel();
    let _ = admin_task.await;
    Ok(())
}
