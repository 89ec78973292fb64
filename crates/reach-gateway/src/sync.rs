//! The background tasks that keep this node, the store and the other nodes in step, off the
//! hot path:
//!
//! - [`record`] writes what the engine (and, in a cluster, the backplane) reports for the
//!   store: that a user came online in the service's current reachability epoch (what REST's
//!   `is_online` is computed from for users not in memory), and each change of a user's
//!   presence as subscribers see it (the last-seen time, and the webhook events the store
//!   records with it). They come down an unbounded channel, so no socket waits on the store;
//!   they are written in batches (`webhooks.record_batch_ms` apart at most), in the order they
//!   came. While the store cannot be written they wait in memory, and past a bound only the
//!   latest change of each user is kept (counted).
//! - [`recover`] (single node): a process that stopped, even with `kill -9`, left the users it
//!   had online recorded as online. At the next start, after the offline grace (so a user that
//!   reconnects in time shows no change), each of them that is not online again is reported
//!   offline as of the last time the old process recorded itself alive, so a backend never keeps
//!   a ghost. [`alive`] records the process alive every few seconds, and at its stop.
//! - [`sweep`] (cluster): the other nodes report a dead node's users offline (the backplane's
//!   clean-up); a report lost with a node that died while writing it, or a Redis that lost its
//!   data, could still leave a user recorded online. After a node joins (once the clean-ups of
//!   nodes that died before had their time) and then every [`SWEEP_EVERY`], one node of the
//!   cluster (whose turn it is, in Redis) reports offline each user recorded online that no
//!   node holds, with the version Redis has for it.
//! - [`apply_control`] (cluster mode) applies the record changes other nodes announce on the
//!   backplane: it re-reads them from the shared store and lets the engine notify this node's
//!   sockets, as the REST handlers do for a change made here.
//!
//! [`crate::server::start`] spawns them over the [`Feeds`] of [`App::new`].

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use reach_cluster::Control;
use reach_core::{PersistEvent, PresenceChange, UserKey};
use reach_proto::ServiceSid;
use reach_store::{PresenceRecord, Store, StoreError};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::state::{App, Feeds, SINGLE_NODE, profile_of, service_state};

/// Presence changes held in memory while the store cannot be written, before only the latest
/// of each user is kept.
const MAX_PENDING: usize = 100_000;
/// How often a single node records itself alive.
const ALIVE_EVERY: Duration = Duration::from_secs(5);
/// Users read from the store at once by the recovery and the sweep.
const PAGE: i64 = 500;
/// How often one node of a cluster sweeps the users recorded online.
pub const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// Spawns the tasks over `feeds`; they end when their channel closes, the app stops or is gone.
pub fn spawn(app: &Arc<App>, feeds: Feeds) {
    app.background.spawn(record(Arc::clone(app), feeds.persist));
    if let Some(control) = feeds.control {
        tokio::spawn(apply_control(Arc::downgrade(app), control));
    }
    if app.cluster.is_some() {
        tokio::spawn(sweep(Arc::downgrade(app)));
    }
}

/// Writes the engine's reports to the store in batches, in the order they came, until the app
/// stops (then what is left is written once more).
pub async fn record(app: Arc<App>, mut rx: mpsc::UnboundedReceiver<PersistEvent>) {
    let window = Duration::from_millis(app.config.webhooks.record_batch_ms);
    let stopping = app.stopping.clone();
    let metrics = app.metrics.webhooks.clone();
    let mut pending: Vec<PersistEvent> = Vec::new();
    let mut failures = 0u32;
    loop {
        let stop = if pending.is_empty() {
            tokio::select! {
                event = rx.recv() => match event {
                    Some(e) => { pending.push(e); false }
                    None => true,
                },
                _ = stopping.cancelled() => true,
            }
        } else {
            false
        };
        let stop = stop || gather(&mut rx, &mut pending, window, &stopping).await;
        if stop {
            while let Ok(e) = rx.try_recv() {
                pending.push(e);
            }
        }
        if pending.len() > MAX_PENDING {
            let before = pending.len();
            coalesce(&mut pending);
            metrics
                .presence_coalesced
                .inc_by((before - pending.len()) as u64);
        }
        metrics.presence_pending.set(pending.len() as i64);
        match write(app.store.as_ref(), &pending).await {
            Ok(presence) => {
                for event in &pending {
                    if let PersistEvent::Online {
                        service_sid,
                        identity,
                        epoch,
                    } = event
                    {
                        app.engine.epoch_recorded(service_sid, identity, *epoch);
                    }
                }
                pending.clear();
                failures = 0;
                if presence {
                    app.wake_webhooks();
                }
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(60) {
                    tracing::warn!(error = %e, waiting = pending.len(), "cannot write presence changes to the store; keeping them and retrying");
                }
                if !stop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        metrics.presence_pending.set(pending.len() as i64);
        if stop {
            return;
        }
    }
}

/// Adds what arrives within `window` to `pending`; true when the app stops or the channel
/// closed.
async fn gather(
    rx: &mut mpsc::UnboundedReceiver<PersistEvent>,
    pending: &mut Vec<PersistEvent>,
    window: Duration,
    stopping: &tokio_util::sync::CancellationToken,
) -> bool {
    let deadline = Instant::now() + window;
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(e) => pending.push(e),
                None => return true,
            },
            _ = tokio::time::sleep_until(deadline) => return false,
            _ = stopping.cancelled() => return true,
        }
    }
}

/// Keeps, of each user, its latest presence change and its highest online epoch.
fn coalesce(pending: &mut Vec<PersistEvent>) {
    let mut last: HashMap<(UserKey, bool), usize> = HashMap::new();
    for (i, event) in pending.iter().enumerate() {
        let key = match event {
            PersistEvent::Presence(change) => (change.key.clone(), true),
            PersistEvent::Online {
                service_sid,
                identity,
                ..
            } => (UserKey::new(service_sid, identity), false),
        };
        last.insert(key, i);
    }
    let keep: std::collections::HashSet<usize> = last.into_values().collect();
    let mut i = 0;
    pending.retain(|_| {
        let kept = keep.contains(&i);
        i += 1;
        kept
    });
}

/// Writes one batch; true when it held presence changes (webhook events may have been
/// recorded).
async fn write(store: &dyn Store, batch: &[PersistEvent]) -> reach_store::Result<bool> {
    // A change to online records the service's current epoch with it, in the batch's one
    // transaction (`Store::record_presence`): the users it covers need no write of their own
    // (a user's first `hello` in an epoch sends both).
    let covered: std::collections::HashSet<(&str, &str)> = batch
        .iter()
        .filter_map(|event| match event {
            PersistEvent::Presence(change) if change.online => {
                Some((change.key.service(), change.key.identity()))
            }
            _ => None,
        })
        .collect();
    let mut changes = Vec::new();
    for event in batch {
        match event {
            PersistEvent::Online {
                service_sid,
                identity,
                ..
            } if covered.contains(&(service_sid.as_str(), identity.as_str())) => {}
            PersistEvent::Online {
                service_sid,
                identity,
                epoch,
            } => {
                // The engine's keys hold the SIDs of the services it was given.
                let Ok(sid) = ServiceSid::parse(service_sid) else {
                    tracing::warn!(%service_sid, %identity, "online epoch of a malformed service SID");
                    continue;
                };
                match store.mark_online(&sid, identity, *epoch).await {
                    Ok(()) | Err(StoreError::NotFound) => {}
                    Err(e) => return Err(e),
                }
            }
            PersistEvent::Presence(change) => {
                if let Some(record) = presence_record(change) {
                    changes.push(record);
                }
            }
        }
    }
    // In one order of users (each user's changes keeping theirs), so two nodes' batches lock
    // the same users' rows in the same order.
    changes.sort_by(|a, b| {
        (a.service_sid.as_str(), a.identity.as_str(), a.version).cmp(&(
            b.service_sid.as_str(),
            b.identity.as_str(),
            b.version,
        ))
    });
    store.record_presence(&changes).await?;
    Ok(!changes.is_empty())
}

fn presence_record(change: &PresenceChange) -> Option<PresenceRecord> {
    let Ok(service_sid) = ServiceSid::parse(change.key.service()) else {
        tracing::warn!(
            user = change.key.as_str(),
            "presence change of a malformed service SID"
        );
        return None;
    };
    Some(PresenceRecord {
        service_sid,
        identity: change.key.identity().to_owned(),
        online: change.online,
        at: change.at,
        version: change.version,
    })
}

/// Single node, before serving: gives back the webhook leases of the previous process (the
/// deliveries it had in flight are sent again) and returns when it last recorded itself alive.
pub async fn prepare_single(app: &App) -> reach_store::Result<Option<i64>> {
    let previous = app
        .store
        .touch_node(SINGLE_NODE, reach_proto::now_unix())
        .await?;
    let released = app.store.release_events(None).await?;
    if released > 0 {
        tracing::info!(
            events = released,
            "webhook events in flight when reachd last stopped are sent again"
        );
    }
    Ok(previous)
}

/// Single node: see the module doc. `previous` is when the last process recorded itself alive.
pub async fn recover(app: Weak<App>, previous: Option<i64>) {
    let Some((grace, stopping)) = app
        .upgrade()
        .map(|a| (a.config.offline_grace(), a.stopping.clone()))
    else {
        return;
    };
    tokio::select! {
        _ = tokio::time::sleep(grace) => {}
        // Stopped within the grace: the next start does it.
        _ = stopping.cancelled() => return,
    }
    let mut after = 0;
    let mut reported = 0usize;
    loop {
        let Some(app) = app.upgrade() else { return };
        let users = match app.store.online_users(after, PAGE).await {
            Ok(users) => users,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the users recorded online; retrying");
                drop(app);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stopping.cancelled() => return,
                }
            }
        };
        let last_alive = previous.unwrap_or_else(reach_proto::now_unix);
        for user in &users {
            after = user.seq;
            // Seen until the old process's last sign of life, or its own login if later.
            let at = last_alive.max(user.version / 1_000_000);
            app.engine
                .report_offline_unless_online(&user.service_sid, &user.identity, at);
            reported += 1;
        }
        if users.len() < PAGE as usize {
            break;
        }
    }
    if reported > 0 {
        tracing::info!(
            users = reported,
            "users online when reachd last stopped: reported offline unless back"
        );
    }
}

/// Single node: records this process alive every few seconds, and once more when it stops
/// (what the next start reads in [`prepare_single`]).
pub async fn alive(app: Weak<App>) {
    let Some(stopping) = app.upgrade().map(|a| a.stopping.clone()) else {
        return;
    };
    loop {
        let stop = tokio::select! {
            _ = tokio::time::sleep(ALIVE_EVERY) => false,
            _ = stopping.cancelled() => true,
        };
        let Some(app) = app.upgrade() else { return };
        if let Err(e) = app
            .store
            .touch_node(SINGLE_NODE, reach_proto::now_unix())
            .await
        {
            tracing::debug!(error = %e, "cannot record this node alive");
        }
        if stop {
            return;
        }
    }
}

/// Cluster: see the module doc.
async fn sweep(app: Weak<App>) {
    // Joined, and the clean-ups of nodes that died before had their time.
    loop {
        let Some(app) = app.upgrade() else { return };
        if app.cluster.as_ref().is_some_and(|c| c.is_up()) {
            break;
        }
        drop(app);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let Some(wait) = app.upgrade().map(|a| {
        a.config.offline_grace()
            + Duration::from_millis(2 * a.config.cluster.node_ttl_ms)
            + Duration::from_secs(2)
    }) else {
        return;
    };
    tokio::time::sleep(wait).await;
    loop {
        let Some(cluster) = app.upgrade().and_then(|a| a.cluster.clone()) else {
            return;
        };
        if cluster.take_turn("sweep", SWEEP_EVERY).await == Some(true) {
            sweep_once(&app).await;
        }
        tokio::time::sleep(SWEEP_EVERY).await;
    }
}

/// One pass over the users recorded online.
async fn sweep_once(app: &Weak<App>) {
    let mut after = 0;
    let mut reported = 0usize;
    loop {
        let Some(app) = app.upgrade() else { return };
        let Some(cluster) = app.cluster.clone() else {
            return;
        };
        let users = match app.store.online_users(after, PAGE).await {
            Ok(users) => users,
            Err(e) => {
                tracing::warn!(error = %e, "cluster sweep: cannot read the users recorded online");
                return;
            }
        };
        let keys: Vec<UserKey> = users
            .iter()
            .map(|u| UserKey::new(&u.service_sid, &u.identity))
            .collect();
        let Some(states) = cluster.holders(&keys).await else {
            tracing::debug!("cluster sweep: Redis unavailable; skipped");
            return;
        };
        for (key, (version, held)) in keys.into_iter().zip(states) {
            if !held {
                reported += 1;
                let _ = app.persist.send(PersistEvent::Presence(PresenceChange {
                    key,
                    online: false,
                    at: i64::try_from(version / 1_000_000).unwrap_or(i64::MAX),
                    version: i64::try_from(version).unwrap_or(i64::MAX),
                }));
            }
        }
        if let Some(last) = users.last() {
            after = last.seq;
        }
        if users.len() < PAGE as usize {
            break;
        }
    }
    if reported > 0 {
        tracing::info!(
            users = reported,
            "cluster sweep: users recorded online that no node holds, reported offline"
        );
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
