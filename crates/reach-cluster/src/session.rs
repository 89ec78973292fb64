//! The backplane task: one session per Redis connection; on any failure, start over.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use reach_core::{ClusterEvent, PersistEvent, UserKey};
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::{AsyncConnectionConfig, RedisError, RedisResult};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, sleep_until, timeout};

use crate::{Control, Shared, scripts};

pub const CONTROL_CHANNEL: &str = "reach:control";
const NODES_KEY: &str = "reach:nodes";
/// How long a holder hash with no holder left keeps its version.
const EMPTY_HASH_TTL_MS: u64 = 3_600_000;
const RETRY: Duration = Duration::from_millis(250);
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Engine events handled in one pipeline at most.
const BATCH: usize = 1024;
const DEAD_SCAN: Duration = Duration::from_secs(1);

pub fn holders_key(key: &UserKey) -> String {
    format!("reach:{{{}}}:holders:{}", key.service(), key.identity())
}

pub fn presence_channel(key: &UserKey) -> String {
    format!("reach:{{{}}}:presence:{}", key.service(), key.identity())
}

fn user_of_channel(channel: &str) -> Option<UserKey> {
    let rest = channel.strip_prefix("reach:{")?;
    let (service, rest) = rest.split_once('}')?;
    let identity = rest.strip_prefix(":presence:")?;
    Some(UserKey::new(service, identity))
}

pub fn liveness_key(node: &str) -> String {
    format!("reach:node:{node}")
}

fn users_key(node: &str, incarnation: &str) -> String {
    format!("reach:node:{node}:{incarnation}:users")
}

/// Every incarnation of a node whose holds may still be in Redis.
fn incarnations_key(node: &str) -> String {
    format!("reach:node:{node}:incarnations")
}

fn reap_key(node: &str) -> String {
    format!("reach:reap:{node}")
}

/// Set by a node that leaves in an orderly way (a drain), so the others clean up after it as
/// a node that left, not one that died.
pub fn left_key(node: &str) -> String {
    format!("reach:left:{node}")
}

/// How long a node's `left` mark lasts: past the grace and the clean-up of the others.
pub fn left_ttl_ms(grace: Duration, node_ttl: Duration) -> u64 {
    ttl_ms(grace) + ttl_ms(node_ttl) + 60_000
}

fn ttl_ms(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

/// Holds of an old incarnation of this node, to release once `due` (those the engine does
/// not hold again by then).
struct Cleanup {
    incarnation: String,
    due: Instant,
}

/// The engine's events, counted as they are taken off the channel.
struct Events {
    rx: mpsc::UnboundedReceiver<ClusterEvent>,
    taken: u64,
}

impl Events {
    async fn recv(&mut self) -> Option<ClusterEvent> {
        let event = self.rx.recv().await;
        self.taken += u64::from(event.is_some());
        event
    }

    fn try_recv(&mut self) -> Option<ClusterEvent> {
        let event = self.rx.try_recv().ok();
        self.taken += u64::from(event.is_some());
        event
    }
}

/// Whatever way the backplane's task ends (a panic included), nobody waits on it any more:
/// [`crate::Cluster::written`] returns at once.
struct Ended<'a>(&'a Shared);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.up.store(false, Ordering::Relaxed);
        self.0.metrics.up.set(0);
        self.0.done.send_replace(u64::MAX);
    }
}

/// Runs the backplane until the engine's event channel closes.
pub async fn run(shared: Arc<Shared>, events: mpsc::UnboundedReceiver<ClusterEvent>) {
    let _ended = Ended(&shared);
    let mut events = Events {
        rx: events,
        taken: 0,
    };
    let mut first = true;
    let mut was_up = false;
    let mut cleanups: Vec<Cleanup> = Vec::new();
    loop {
        let outcome = match Session::open(&shared).await {
            Ok(mut session) => {
                let result = session
                    .run(&shared, &mut events, first, &mut cleanups)
                    .await;
                first = false;
                result
            }
            Err(e) => Err(e),
        };
        let up = shared.up.swap(false, Ordering::Relaxed);
        shared.metrics.up.set(0);
        // The events taken but not written are redone from the engine's state.
        shared.done.send_replace(events.taken);
        if let Ok(mut conn) = shared.conn.lock() {
            *conn = None;
        }
        match outcome {
            Ok(()) => return,
            Err(e) if up || !was_up => {
                tracing::warn!(error = %e, "cluster backplane: Redis unavailable; serving local presence, retrying");
            }
            Err(_) => {}
        }
        was_up = was_up || up;
        // Nobody waits on Redis while it is away: watches get local presence at once.
        for key in shared.engine.watched_users() {
            shared.engine.apply_remote(&key, 0, false);
        }
        let deadline = Instant::now() + RETRY;
        loop {
            tokio::select! {
                _ = sleep_until(deadline) => break,
                event = events.recv() => {
                    match event {
                        None => return,
                        Some(ClusterEvent::Watch(key)) => shared.engine.apply_remote(&key, 0, false),
                        // Redone from the engine's state at the resynchronisation.
                        Some(_) => {}
                    }
                    shared.done.send_replace(events.taken);
                }
            }
        }
    }
}

struct Session {
    conn: MultiplexedConnection,
    sink: PubSubSink,
    stream: PubSubStream,
    incarnation: String,
    subscribed: HashSet<UserKey>,
}

fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "Redis did not answer in time",
    ))
}

async fn within<T>(f: impl Future<Output = RedisResult<T>>) -> RedisResult<T> {
    timeout(IO_TIMEOUT, f).await.map_err(|_| timed_out())?
}

impl Session {
    async fn open(shared: &Shared) -> RedisResult<Session> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(IO_TIMEOUT))
            .set_response_timeout(Some(IO_TIMEOUT));
        let conn = shared
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let pubsub = within(shared.client.get_async_pubsub()).await?;
        let (sink, stream) = pubsub.split();
        Ok(Session {
            conn,
            sink,
            stream,
            incarnation: format!("{:016x}", rand::random::<u64>()),
            subscribed: HashSet::new(),
        })
    }

    async fn run(
        &mut self,
        shared: &Shared,
        events: &mut Events,
        first: bool,
        cleanups: &mut Vec<Cleanup>,
    ) -> RedisResult<()> {
        self.resync(shared, first, cleanups).await?;
        let mut heartbeat = tokio::time::interval(shared.config.node_ttl / 3);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut dead_scan = tokio::time::interval(DEAD_SCAN);
        dead_scan.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let next_cleanup = cleanups.iter().map(|c| c.due).min();
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else { return Ok(()) };
                    let mut batch = vec![event];
                    while batch.len() < BATCH {
                        match events.try_recv() {
                            Some(e) => batch.push(e),
                            None => break,
                        }
                    }
                    if shared.leaving.load(Ordering::Relaxed) {
                        // Left: the holds still in Redis are the other nodes' to release
                        // (after the grace), and theirs to report; a release made here now
                        // could be reported too late for this node's store writer.
                        batch.retain(|e| !matches!(e, ClusterEvent::Held(_) | ClusterEvent::Released(_)));
                    }
                    self.apply(shared, batch).await?;
                    shared.done.send_replace(events.taken);
                }
                msg = self.stream.next() => {
                    let Some(msg) = msg else {
                        return Err(RedisError::from(std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "pub/sub connection closed",
                        )));
                    };
                    self.on_message(shared, &msg);
                }
                _ = heartbeat.tick() => self.heartbeat(shared).await?,
                _ = dead_scan.tick() => self.scan_dead(shared).await?,
                _ = sleep_until(next_cleanup.unwrap_or_else(Instant::now)), if next_cleanup.is_some() => {
                    self.run_cleanups(shared, cleanups).await?;
                }
            }
        }
    }

    /// Rebuilds this node's part of the cluster state from the engine.
    async fn resync(
        &mut self,
        shared: &Shared,
        first: bool,
        cleanups: &mut Vec<Cleanup>,
    ) -> RedisResult<()> {
        let node = shared.config.node_id.as_str();
        let m = &shared.metrics;
        let mut load = redis::pipe();
        for lua in [scripts::hold(), scripts::release(), scripts::peek()] {
            load.cmd("SCRIPT").arg("LOAD").arg(&lua.source).ignore();
        }
        load.cmd("SMEMBERS").arg(incarnations_key(node));
        let (previous,): (Vec<String>,) = load.query_async(&mut self.conn).await?;
        m.commands.inc_by(4);

        let ttl = ttl_ms(shared.config.node_ttl);
        let mut register = redis::pipe();
        register
            .cmd("SET")
            .arg(liveness_key(node))
            .arg(&self.incarnation)
            .arg("PX")
            .arg(ttl)
            .ignore()
            // Back after leaving: a later death is a death again.
            .cmd("DEL")
            .arg(left_key(node))
            .ignore()
            .cmd("HSET")
            .arg(NODES_KEY)
            .arg(node)
            .arg(&self.incarnation)
            .ignore()
            .cmd("SADD")
            .arg(incarnations_key(node))
            .arg(&self.incarnation)
            .ignore();
        register.query_async::<()>(&mut self.conn).await?;
        m.commands.inc_by(4);

        within(self.sink.subscribe(CONTROL_CHANNEL)).await?;
        let held = shared.engine.held_users();
        let events: Vec<ClusterEvent> = held.iter().cloned().map(ClusterEvent::Held).collect();
        self.apply(shared, events).await?;

        // Every earlier incarnation still listed (a restart, or several in a row that each
        // stopped before cleaning up): release what the engine does not hold again.
        for old in previous {
            if old == self.incarnation || cleanups.iter().any(|c| c.incarnation == old) {
                continue;
            }
            let due = if first {
                // A restart with the same node id: its users may come back within the grace.
                Instant::now() + shared.config.offline_grace
            } else {
                Instant::now()
            };
            cleanups.push(Cleanup {
                incarnation: old,
                due,
            });
        }

        self.subscribed.clear();
        let watched: Vec<ClusterEvent> = shared
            .engine
            .watched_users()
            .into_iter()
            .map(ClusterEvent::Watch)
            .collect();
        self.apply(shared, watched).await?;

        if let Ok(mut conn) = shared.conn.lock() {
            *conn = Some(self.conn.clone());
        }
        shared.up.store(true, Ordering::Relaxed);
        m.up.set(1);
        m.resyncs.inc();
        if !first {
            let _ = shared.control.send(Control::Resynchronised);
        }
        tracing::info!(node, incarnation = %self.incarnation, held = held.len(), "cluster backplane in sync");
        Ok(())
    }

    /// Sends a batch of engine events as one pipeline (plus the pub/sub changes).
    async fn apply(&mut self, shared: &Shared, batch: Vec<ClusterEvent>) -> RedisResult<()> {
        let node = shared.config.node_id.as_str();
        let users = users_key(node, &self.incarnation);
        let mut pipe = redis::pipe();
        let mut commands = 0u64;
        let mut watch: HashMap<UserKey, bool> = HashMap::new();
        // The holds and releases whose answers say whether the cluster's presence changed.
        let mut changes: Vec<(UserKey, bool)> = Vec::new();
        for event in batch {
            match event {
                ClusterEvent::Held(key) => {
                    pipe.cmd("SADD").arg(&users).arg(key.as_str()).ignore();
                    pipe.cmd("EVALSHA")
                        .arg(scripts::hold().sha())
                        .arg(1)
                        .arg(holders_key(&key))
                        .arg(node)
                        .arg(&self.incarnation)
                        .arg(presence_channel(&key));
                    changes.push((key, true));
                    commands += 2;
                }
                ClusterEvent::Released(key) => {
                    pipe.cmd("EVALSHA")
                        .arg(scripts::release().sha())
                        .arg(1)
                        .arg(holders_key(&key))
                        .arg(node)
                        .arg("")
                        .arg(presence_channel(&key))
                        .arg(EMPTY_HASH_TTL_MS);
                    pipe.cmd("SREM").arg(&users).arg(key.as_str()).ignore();
                    changes.push((key, false));
                    commands += 2;
                }
                ClusterEvent::Watch(key) => {
                    watch.insert(key, true);
                }
                ClusterEvent::Unwatch(key) => {
                    watch.insert(key, false);
                }
            }
        }
        let mut to_read = Vec::new();
        let mut to_unsubscribe = Vec::new();
        for (key, watched) in watch {
            if watched {
                to_read.push(key);
            } else if self.subscribed.remove(&key) {
                to_unsubscribe.push(presence_channel(&key));
            }
        }
        let to_subscribe: Vec<String> = to_read
            .iter()
            .filter(|k| !self.subscribed.contains(*k))
            .map(presence_channel)
            .collect();
        if !to_subscribe.is_empty() {
            // Subscribe before reading, so no change falls between the read and the messages.
            within(self.sink.subscribe(&to_subscribe)).await?;
            commands += 1;
            self.subscribed.extend(to_read.iter().cloned());
        }
        for key in &to_read {
            pipe.cmd("EVALSHA")
                .arg(scripts::peek().sha())
                .arg(1)
                .arg(holders_key(key));
            commands += 1;
        }
        if commands > 0 {
            let replies: Vec<redis::Value> = pipe.query_async(&mut self.conn).await?;
            let (counts, states) = replies.split_at(changes.len().min(replies.len()));
            for ((key, online), count) in changes.iter().zip(counts) {
                report_change(&shared.persist, key, *online, count);
            }
            for (key, state) in to_read.iter().zip(states) {
                match redis::from_redis_value_ref::<Vec<u8>>(state) {
                    Ok(state) => self.apply_state(shared, key, &state),
                    Err(e) => {
                        tracing::warn!(user = key.as_str(), error = %e, "unreadable presence state")
                    }
                }
            }
        }
        if !to_unsubscribe.is_empty() {
            within(self.sink.unsubscribe(&to_unsubscribe)).await?;
            commands += 1;
        }
        shared.metrics.commands.inc_by(commands);
        Ok(())
    }

    /// Applies a holder set (`[version, [nodes]]`) to the engine.
    fn apply_state(&self, shared: &Shared, key: &UserKey, state: &[u8]) {
        match scripts::decode_state(state) {
            Ok((version, nodes)) => {
                // Held elsewhere: by another node, or by this node's previous life (a restart
                // with the same id), whose holds stand until they are released after the grace.
                let elsewhere = nodes.iter().any(|entry| {
                    let (node, incarnation) = scripts::holder(entry);
                    node != shared.config.node_id
                        || incarnation.is_some_and(|i| i != self.incarnation)
                });
                shared.engine.apply_remote(key, version, elsewhere);
            }
            Err(e) => tracing::warn!(user = key.as_str(), error = %e, "unreadable presence state"),
        }
    }

    fn on_message(&self, shared: &Shared, msg: &redis::Msg) {
        let Ok(channel) = msg.get_channel::<String>() else {
            return;
        };
        if channel == CONTROL_CHANNEL {
            shared
                .metrics
                .messages
                .with_label_values(&["control"])
                .inc();
            match rmp_serde::from_slice::<(String, Control)>(msg.get_payload_bytes()) {
                Ok((from, change)) if from != shared.config.node_id => {
                    let _ = shared.control.send(change);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "unreadable control message"),
            }
        } else if let Some(key) = user_of_channel(&channel) {
            shared
                .metrics
                .messages
                .with_label_values(&["presence"])
                .inc();
            self.apply_state(shared, &key, msg.get_payload_bytes());
        }
    }

    /// Renews the liveness key; if it was gone (expired, Redis restarted), starts over.
    async fn heartbeat(&mut self, shared: &Shared) -> RedisResult<()> {
        if shared.leaving.load(Ordering::Relaxed) {
            // Left on purpose (`Cluster::leave`): the others clean up after the grace.
            return Ok(());
        }
        let node = shared.config.node_id.as_str();
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(liveness_key(node))
            .arg(&self.incarnation)
            .arg("PX")
            .arg(ttl_ms(shared.config.node_ttl))
            .arg("GET")
            .cmd("HSET")
            .arg(NODES_KEY)
            .arg(node)
            .arg(&self.incarnation)
            .ignore();
        let (previous,): (Option<String>,) = pipe.query_async(&mut self.conn).await?;
        shared.metrics.commands.inc_by(2);
        if previous.as_deref() != Some(self.incarnation.as_str()) {
            return Err(RedisError::from(std::io::Error::other(
                "this node's liveness key was lost (expired or Redis restarted)",
            )));
        }
        Ok(())
    }

    /// Looks for nodes whose liveness key is gone and cleans up after one of them.
    async fn scan_dead(&mut self, shared: &Shared) -> RedisResult<()> {
        if shared.leaving.load(Ordering::Relaxed) {
            return Ok(());
        }
        let node = shared.config.node_id.as_str();
        let nodes: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(NODES_KEY)
            .query_async(&mut self.conn)
            .await?;
        let others: Vec<(&String, &String)> = nodes.iter().filter(|(n, _)| *n != node).collect();
        let mut pipe = redis::pipe();
        for (other, _) in &others {
            pipe.cmd("EXISTS").arg(liveness_key(other));
            pipe.cmd("EXISTS").arg(left_key(other));
        }
        let flags: Vec<bool> = if others.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut self.conn).await?
        };
        shared.metrics.commands.inc_by(1 + 2 * others.len() as u64);
        let states: Vec<(bool, bool)> = flags.chunks(2).map(|f| (f[0], f[1])).collect();
        shared
            .metrics
            .nodes
            .set(1 + states.iter().filter(|(alive, _)| *alive).count() as i64);
        let mut alive: Vec<String> = others
            .iter()
            .zip(&states)
            .filter(|(_, (up, _))| *up)
            .map(|((n, _), _)| (*n).clone())
            .collect();
        alive.sort();
        if let Ok(mut peers) = shared.peers.lock() {
            *peers = alive;
        }
        for ((other, incarnation), (alive, left)) in others.into_iter().zip(states) {
            if alive {
                continue;
            }
            // Long enough for the grace and the clean-up; short, so that if this node dies
            // while cleaning up, another one takes over soon.
            let claim_ms =
                ttl_ms(shared.config.offline_grace) + ttl_ms(shared.config.node_ttl) + 1_000;
            let claimed: Option<String> = redis::cmd("SET")
                .arg(reap_key(other))
                .arg(node)
                .arg("NX")
                .arg("PX")
                .arg(claim_ms)
                .query_async(&mut self.conn)
                .await?;
            shared.metrics.commands.inc();
            if claimed.is_some() {
                if left {
                    tracing::info!(node = %other, "cluster: node left; its users go offline after the grace unless they reconnect");
                } else {
                    tracing::info!(dead = %other, "cluster: node stopped; its users go offline after the grace unless they reconnect");
                }
                tokio::spawn(reap(
                    self.conn.clone(),
                    shared.config.offline_grace,
                    other.clone(),
                    incarnation.clone(),
                    left,
                    shared.metrics.clone(),
                    shared.persist.clone(),
                ));
            }
        }
        Ok(())
    }

    async fn run_cleanups(
        &mut self,
        shared: &Shared,
        cleanups: &mut Vec<Cleanup>,
    ) -> RedisResult<()> {
        let now = Instant::now();
        let node = shared.config.node_id.clone();
        while let Some(i) = cleanups.iter().position(|c| c.due <= now) {
            let incarnation = cleanups[i].incarnation.clone();
            release_all(
                &mut self.conn,
                &node,
                &incarnation,
                &shared.metrics,
                &shared.persist,
            )
            .await?;
            cleanups.swap_remove(i);
        }
        Ok(())
    }
}

/// Releases every hold of `node` written by `incarnation` (holds re-written since by a newer
/// incarnation stay), then forgets that incarnation's user set.
async fn release_all(
    conn: &mut MultiplexedConnection,
    node: &str,
    incarnation: &str,
    metrics: &crate::ClusterMetrics,
    persist: &mpsc::UnboundedSender<PersistEvent>,
) -> RedisResult<usize> {
    let users = users_key(node, incarnation);
    let members: Vec<String> = redis::cmd("SMEMBERS").arg(&users).query_async(conn).await?;
    let mut pipe = redis::pipe();
    let mut keys = Vec::new();
    for member in &members {
        let Some(key) = UserKey::parse(member) else {
            continue;
        };
        pipe.cmd("EVALSHA")
            .arg(scripts::release().sha())
            .arg(1)
            .arg(holders_key(&key))
            .arg(node)
            .arg(incarnation)
            .arg(presence_channel(&key))
            .arg(EMPTY_HASH_TTL_MS);
        keys.push(key);
    }
    pipe.cmd("DEL").arg(&users).ignore();
    pipe.cmd("SREM")
        .arg(incarnations_key(node))
        .arg(incarnation)
        .ignore();
    let counts: Vec<redis::Value> = pipe.query_async(conn).await?;
    for (key, count) in keys.iter().zip(&counts) {
        report_change(persist, key, false, count);
    }
    metrics.commands.inc_by(3 + keys.len() as u64);
    Ok(keys.len())
}

/// Reports the cluster's presence change a hold (`online`) or release script made, if it made
/// one: the first holder anywhere, or none left.
fn report_change(
    persist: &mpsc::UnboundedSender<PersistEvent>,
    key: &UserKey,
    online: bool,
    reply: &redis::Value,
) {
    match scripts::decode_count(reply) {
        Some((version, holders)) if version > 0 => {
            if (online && holders == 1) || (!online && holders == 0) {
                crate::report(persist, key, online, version);
            }
        }
        Some(_) => {}
        None => tracing::warn!(
            user = key.as_str(),
            "unreadable answer of a presence script"
        ),
    }
}

async fn release_claim(
    conn: &mut MultiplexedConnection,
    node: &str,
    metrics: &crate::ClusterMetrics,
) -> RedisResult<()> {
    metrics.commands.inc();
    redis::cmd("DEL")
        .arg(reap_key(node))
        .query_async(conn)
        .await
}

/// Cleans up after a node that died (or `left`) once the grace is over, unless it came back
/// meanwhile. Only a node that died counts in `reach_cluster_reaped_nodes_total`.
async fn reap(
    mut conn: MultiplexedConnection,
    grace: Duration,
    node: String,
    incarnation: String,
    left: bool,
    metrics: crate::ClusterMetrics,
    persist: mpsc::UnboundedSender<PersistEvent>,
) {
    tokio::time::sleep(grace).await;
    let result: RedisResult<()> = async {
        let (alive, current): (bool, Option<String>) = redis::pipe()
            .cmd("EXISTS")
            .arg(liveness_key(&node))
            .cmd("HGET")
            .arg(NODES_KEY)
            .arg(&node)
            .query_async(&mut conn)
            .await?;
        metrics.commands.inc_by(2);
        if alive {
            tracing::info!(node = %node, "cluster: node came back; nothing to clean up");
            return release_claim(&mut conn, &node, &metrics).await;
        }
        let mut incarnations: Vec<String> = redis::cmd("SMEMBERS")
            .arg(incarnations_key(&node))
            .query_async(&mut conn)
            .await?;
        metrics.commands.inc();
        if !incarnations.contains(&incarnation) {
            incarnations.push(incarnation.clone());
        }
        let mut released = 0;
        for inc in &incarnations {
            released += release_all(&mut conn, &node, inc, &metrics, &persist).await?;
        }
        if current.as_deref() == Some(incarnation.as_str()) {
            // Only if it did not come back with a new incarnation meanwhile.
            redis::cmd("HDEL")
                .arg(NODES_KEY)
                .arg(&node)
                .query_async::<()>(&mut conn)
                .await?;
            metrics.commands.inc();
        }
        if left {
            redis::cmd("DEL")
                .arg(left_key(&node))
                .query_async::<()>(&mut conn)
                .await?;
            metrics.commands.inc();
            tracing::info!(node = %node, released, "cluster: released the users of a node that left");
        } else {
            metrics.reaped.inc();
            tracing::info!(node = %node, released, "cluster: released the users of a stopped node");
        }
        // So the same node id, if it comes back and dies again, is cleaned up again at once.
        release_claim(&mut conn, &node, &metrics).await
    }
    .await;
    if let Err(e) = result {
        // The claim expires; another node (or this one) tries again.
        tracing::warn!(node = %node, error = %e, "cluster: could not clean up after a stopped node");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_service_as_hash_tag() {
        let key = UserKey::new("IS0123", "alice/x:y");
        assert_eq!(holders_key(&key), "reach:{IS0123}:holders:alice/x:y");
        let channel = presence_channel(&key);
        assert_eq!(channel, "reach:{IS0123}:presence:alice/x:y");
        assert_eq!(user_of_channel(&channel), Some(key));
        assert_eq!(user_of_channel("reach:control"), None);
    }
}
