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
use reach_core::{Engine, EngineConfig, PersistEvent, Profile, ServiceState};
use reach_store::{ServiceConfig, Store, UserRecord};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Credentials;
use crate::config::Config;
use crate::metrics::Metrics;

/// State shared by REST handlers and socket tasks.
pub struct App {
    pub config: Config,
    pub creds: Credentials,
    pub store: Arc<dyn Store>,
    pub engine: Arc<Engine>,
    pub metrics: Metrics,
    /// One permit per open socket (`limits.max_connections`).
    pub conn_permits: Arc<Semaphore>,
    /// Cancelled when the gateway starts draining.
    pub shutdown: CancellationToken,
    /// Every socket task, so draining can wait for them.
    pub sockets: TaskTracker,
    /// Services by SID, so a `hello` does not read the store for its service each time.
    /// Filled on first use; a deleted service stays as `None` (a tombstone), so a read that
    /// raced with the delete cannot bring it back.
    services: dashmap::DashMap<String, Option<reach_store::Service>>,
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
        let engine = Engine::new(
            EngineConfig {
                offline_grace: config.offline_grace(),
                max_outbox_bytes: config.limits.max_outbox_bytes,
            },
            metrics.engine.clone(),
            Some(persist_tx),
        );
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
            metrics,
            shutdown: CancellationToken::new(),
            sockets: TaskTracker::new(),
            services: dashmap::DashMap::new(),
            ready: AtomicBool::new(true),
        });
        Ok(app)
    }

    /// The service with this SID (any account), from memory when it was seen before.
    pub async fn find_service(&self, sid: &str) -> reach_store::Result<reach_store::Service> {
        if let Some(s) = self.services.get(sid) {
            return s.clone().ok_or(reach_store::StoreError::NotFound);
        }
        let service = self.store.find_service(sid).await?;
        self.services
            .entry(sid.to_owned())
            .or_insert(Some(service))
            .clone()
            .ok_or(reach_store::StoreError::NotFound)
    }

    /// Forgets a deleted service: its connections are closed and its tokens refused.
    pub fn service_deleted(&self, sid: &str) {
        self.services.insert(sid.to_owned(), None);
        self.engine.remove_service(sid);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.shutdown.is_cancelled()
    }

    /// `(is_online, is_notifiable)` of a user as REST and the socket report it.
    pub fn user_flags(
        &self,
        cfg: &ServiceConfig,
        rec: &UserRecord,
    ) -> (Option<bool>, Option<bool>) {
        let svc = service_state(cfg);
        let (online, epoch) = self
            .engine
            .presence(&cfg.service_sid, &rec.identity)
            .unwrap_or((false, rec.online_epoch));
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

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
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
        async move {
            shutdown.await;
            token.cancel();
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
    admin_stop.cancel();
    let _ = admin_task.await;
    Ok(())
}
