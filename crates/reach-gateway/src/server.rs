//! The running gateway: it assembles the app and its background tasks ([`start`]), binds the
//! listeners ([`bind`]), routes them ([`public_router`], [`crate::admin::router`]), serves them
//! and drains ([`run`]).
//!
//! `run` takes bound listeners and a shutdown future, so tests bind port 0; when the future
//! resolves it drains ([`crate::drain`]: no new sockets, `goodbye` to every connection, a
//! bounded wait for the socket tasks), then leaves the cluster and stops the admin listener,
//! which stayed up throughout so `/readyz` could answer 503.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use reach_store::Store;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use crate::auth::Credentials;
use crate::config::Config;
use crate::state::{App, StartError};
use crate::timers::Timers;

/// Builds the gateway over an opened store and starts its background tasks: the driver of
/// the shared socket timers, the store and cluster sync of [`crate::sync`] (with, on a single
/// node, the recovery after the previous process) and the webhook deliverer.
pub async fn start(
    config: Config,
    creds: Credentials,
    store: Arc<dyn Store>,
) -> Result<Arc<App>, StartError> {
    let (app, feeds) = App::new(config, creds, store).await?;
    tokio::spawn(Timers::drive(Arc::downgrade(&app.timers)));
    if let Some(tls) = app.tls.clone() {
        tokio::spawn(reload_on_sighup(tls));
    }
    if app.cluster.is_none() {
        let previous = crate::sync::prepare_single(&app).await?;
        app.background
            .spawn(crate::sync::recover(Arc::downgrade(&app), previous));
        app.background
            .spawn(crate::sync::alive(Arc::downgrade(&app)));
    }
    crate::sync::spawn(&app, feeds);
    app.background
        .spawn(crate::webhooks::run(Arc::clone(&app), app.node_id.clone()));
    tokio::spawn(crate::webhooks::watch_queue(Arc::downgrade(&app)));
    tokio::spawn(sweep_throttles(Arc::downgrade(&app)));
    Ok(app)
}

/// Every minute, forgets the rate-limit buckets that are full again (until the app is gone).
async fn sweep_throttles(app: std::sync::Weak<App>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(app) = app.upgrade() else {
            return;
        };
        app.throttles.sweep();
    }
}

/// Reloads the certificate on every SIGHUP (open connections keep theirs).
async fn reload_on_sighup(tls: Arc<crate::tls::Tls>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: the certificate is not reloadable");
            return;
        };
        while hup.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: certificate reloaded"),
                Err(e) => {
                    tracing::warn!(error = %e, "SIGHUP: certificate not reloaded; keeping the old one")
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tls;
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

/// Serves both listeners until `shutdown` resolves, then drains (see the module doc).
pub async fn run(
    app: Arc<App>,
    public: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tokio::spawn({
        let app = Arc::clone(&app);
        async move {
            shutdown.await;
            crate::drain::begin(&app);
        }
    });
    // The admin listener outlives the drain, so /readyz answers 503 while sockets close.
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn({
        let router = crate::admin::router(Arc::clone(&app));
        let stop = admin_stop.clone();
        async move {
            let _ = axum::serve(admin, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        }
    });
    // Spawned, not run on the thread that called `block_on`: the accept loop then runs on a
    // worker, and the connections it spawns start on that worker's own queue instead of
    // waking another thread for each (docs/benchmarks.md, connection churn).
    let accept = tokio::spawn(crate::listener::serve(
        Arc::clone(&app),
        public,
        public_router(Arc::clone(&app)),
    ));
    if let Err(e) = accept.await {
        tracing::error!(error = %e, "the public listener's task failed");
    }
    // Draining: socket tasks saw the cancellation and are saying goodbye.
    crate::drain::wait(&app).await;
    // The background writers write what they hold (presence changes, webhook outcomes).
    app.stopping.cancel();
    app.background.close();
    let flush = app.config.webhooks.timeout_ms + 2_000;
    if tokio::time::timeout(
        std::time::Duration::from_millis(flush),
        app.background.wait(),
    )
    .await
    .is_err()
    {
        tracing::warn!("background writers still busy at exit");
    }
    if let Some(cluster) = &app.cluster {
        cluster.leave().await;
    }
    admin_stop.cancel();
    let _ = admin_task.await;
    Ok(())
}
