//! The background tasks that keep this node, the store and the other nodes in step, off the
//! hot path:
//!
//! - [`persist_online`] records in the store that a user came online in the service's current
//!   reachability epoch (what REST's `is_online` is computed from for users not in memory);
//!   the engine sends these events down an unbounded channel and never waits on the store.
//! - [`apply_control`] (cluster mode) applies the record changes other nodes announce on the
//!   backplane: it re-reads them from the shared store and lets the engine notify this node's
//!   sockets, as the REST handlers do for a change made here.
//!
//! [`crate::server::start`] spawns both over the [`Feeds`] of [`App::new`].

use std::sync::{Arc, Weak};

use reach_cluster::Control;
use reach_core::PersistEvent;
use reach_proto::ServiceSid;
use reach_store::{Store, StoreError};
use tokio::sync::mpsc;

use crate::state::{App, Feeds, profile_of, service_state};

/// Spawns the tasks over `feeds`; they end when their channel closes or the app is gone.
pub fn spawn(app: &Arc<App>, feeds: Feeds) {
    tokio::spawn(persist_online(Arc::clone(&app.store), feeds.persist));
    if let Some(control) = feeds.control {
        tokio::spawn(apply_control(Arc::downgrade(app), control));
    }
}

/// Writes each "online in this epoch" to the store, in the order the engine reported them.
pub async fn persist_online(store: Arc<dyn Store>, mut rx: mpsc::UnboundedReceiver<PersistEvent>) {
    while let Some(event) = rx.recv().await {
        match event {
            PersistEvent::Online {
                service_sid,
                identity,
                epoch,
            } => {
                // The engine's keys hold the SIDs of the services it was given.
                let Ok(sid) = ServiceSid::parse(&service_sid) else {
                    tracing::warn!(%service_sid, %identity, "online epoch of a malformed service SID");
                    continue;
                };
                if let Err(e) = store.mark_online(&sid, &identity, epoch).await {
                    tracing::debug!(%service_sid, %identity, error = %e, "could not record online epoch");
                }
            }
        }
    }
}

/// Applies record changes announced by other nodes: re-reads them from the shared store and
/// lets the engine notify this node's sockets.
pub async fn apply_control(app: Weak<App>, mut rx: mpsc::UnboundedReceiver<Control>) {
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
