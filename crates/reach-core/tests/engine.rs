//! Presence rules of the engine, with tokio's paused clock, plus a property test over random
//! interleavings of connects, disconnects, byes, subscribes, clock advances and switch flips.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use reach_core::{
    Attach, ClusterEvent, Conn, Engine, EngineConfig, EngineMetrics, Outgoing, Profile,
    ServiceState, SlotFrame, UserKey,
};
use reach_proto::{Encoding, ServerFrame, UpdateReason, decode_server};

const SVC: &str = "IS00000000000000000000000000000001";
const GRACE: Duration = Duration::from_secs(5);

fn engine() -> Arc<Engine> {
    let e = Engine::new(
        EngineConfig {
            offline_grace: GRACE,
            max_outbox_bytes: 1 << 20,
        },
        EngineMetrics::unregistered(),
        None,
    );
    e.set_service(
        SVC,
        ServiceState {
            enabled: true,
            epoch: 1,
        },
    );
    e
}

fn profile(rev: i64) -> Profile {
    Profile {
        revision: rev,
        friendly_name: None,
        attributes: "{}".into(),
        binding_count: 0,
        ever_had_binding: false,
        online_epoch: 0,
        last_seen_at: None,
    }
}

fn connect(e: &Arc<Engine>, identity: &str) -> Arc<Conn> {
    let conn = e.new_conn(SVC, identity, Encoding::Json);
    let slot = conn
        .outbox
        .reserve(SlotFrame::Welcome {
            connection_id: conn.id.to_string(),
            identity: identity.into(),
            service_sid: SVC.into(),
            reachability_enabled: true,
            heartbeat_interval_ms: 1000,
            token_expires_at: 0,
            user: None,
        })
        .unwrap();
    if e.attach(&conn, slot) == Attach::NeedsProfile {
        e.load_profile(SVC, identity, profile(1));
        assert_eq!(e.fill(&conn, identity, slot), Attach::Filled);
    }
    conn.outbox.seal(slot);
    conn
}

fn reserve_subscribed(conn: &Conn) -> reach_core::SlotId {
    conn.outbox
        .reserve(SlotFrame::Subscribed {
            id: 1,
            users: vec![],
            errors: vec![],
        })
        .unwrap()
}

fn subscribe(e: &Arc<Engine>, conn: &Arc<Conn>, identities: &[&str]) {
    let slot = reserve_subscribed(conn);
    for id in identities {
        if e.subscribe(conn, id, slot).0 == Attach::NeedsProfile {
            e.load_profile(SVC, id, profile(1));
            assert_eq!(e.fill(conn, id, slot), Attach::Filled);
        }
    }
    conn.outbox.seal(slot);
}

fn drain(conn: &Conn) -> Vec<ServerFrame> {
    let mut out = Vec::new();
    while let Some(Outgoing::Message(b)) = conn.outbox.pop(std::task::Waker::noop()) {
        out.push(decode_server(&b, Encoding::Json).unwrap());
    }
    out
}

/// (identity, is_online) of each user_updated frame.
fn presence_updates(frames: &[ServerFrame]) -> Vec<(String, Option<bool>)> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::UserUpdated { user, reasons }
                if reasons.contains(&UpdateReason::ReachabilityOnline) =>
            {
                Some((user.identity.clone(), user.is_online))
            }
            _ => None,
        })
        .collect()
}

async fn advance(d: Duration) {
    tokio::time::advance(d).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn reconnect_inside_the_grace_is_not_a_flap() {
    let e = engine();
    let watcher = connect(&e, "w");
    subscribe(&e, &watcher, &["alice"]);
    drain(&watcher);
    let a1 = connect(&e, "alice");
    assert_eq!(
        presence_updates(&drain(&watcher)),
        vec![("alice".into(), Some(true))]
    );
    e.detach(&a1, &[], false);
    advance(Duration::from_secs(4)).await;
    let _a2 = connect(&e, "alice");
    advance(Duration::from_secs(10)).await;
    assert!(
        drain(&watcher).is_empty(),
        "no offline-then-online inside the grace"
    );
    assert_eq!(e.presence(SVC, "alice").map(|p| p.online), Some(true));
}

#[tokio::test(start_paused = true)]
async fn last_connection_goes_offline_after_the_grace() {
    let e = engine();
    let watcher = connect(&e, "w");
    subscribe(&e, &watcher, &["alice"]);
    let a1 = connect(&e, "alice");
    drain(&watcher);
    e.detach(&a1, &[], false);
    advance(GRACE - Duration::from_millis(1)).await;
    assert!(drain(&watcher).is_empty(), "still inside the grace");
    advance(Duration::from_millis(1)).await;
    assert_eq!(
        presence_updates(&drain(&watcher)),
        vec![("alice".into(), Some(false))]
    );
}

#[tokio::test(start_paused = true)]
async fn bye_goes_offline_at_once_only_for_the_last_connection() {
    let e = engine();
    let watcher = connect(&e, "w");
    subscribe(&e, &watcher, &["alice"]);
    let a1 = connect(&e, "alice");
    let a2 = connect(&e, "alice");
    drain(&watcher);
    e.detach(&a1, &[], true);
    assert!(
        drain(&watcher).is_empty(),
        "another connection is still open"
    );
    e.detach(&a2, &[], true);
    assert_eq!(
        presence_updates(&drain(&watcher)),
        vec![("alice".into(), Some(false))]
    );
}

#[tokio::test(start_paused = true)]
async fn disabled_service_publishes_nothing_and_enabling_publishes_online_users() {
    let e = engine();
    e.set_service(
        SVC,
        ServiceState {
            enabled: false,
            epoch: 1,
        },
    );
    let watcher = connect(&e, "w");
    subscribe(&e, &watcher, &["alice", "bob"]);
    let frames = drain(&watcher);
    match &frames[1] {
        ServerFrame::Subscribed { users, .. } => {
            assert!(
                users
                    .iter()
                    .all(|u| u.is_online.is_none() && u.is_notifiable.is_none())
            )
        }
        other => panic!("{other:?}"),
    }
    let _alice = connect(&e, "alice");
    assert!(drain(&watcher).is_empty());
    e.set_service(
        SVC,
        ServiceState {
            enabled: true,
            epoch: 2,
        },
    );
    let frames = drain(&watcher);
    assert_eq!(
        frames[0],
        ServerFrame::ServiceUpdated {
            reachability_enabled: true
        }
    );
    let updates = presence_updates(&frames);
    assert!(
        updates.contains(&("alice".into(), Some(true))),
        "{frames:?}"
    );
    assert!(
        !updates.iter().any(|(i, _)| i == "bob"),
        "bob was never online: still null"
    );
    e.set_service(
        SVC,
        ServiceState {
            enabled: false,
            epoch: 2,
        },
    );
    // Disabling: alice's flag and the watcher's own, shown as true, become null at their
    // subscribers; bob's was null already, so nothing is sent for him.
    let frames = drain(&watcher);
    assert_eq!(
        frames[0],
        ServerFrame::ServiceUpdated {
            reachability_enabled: false
        }
    );
    let mut updates = presence_updates(&frames);
    updates.sort(); // one scan of the map: no order between users
    assert_eq!(
        updates,
        vec![("alice".into(), None), ("w".into(), None)],
        "{frames:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn profile_updates_carry_reasons_and_older_revisions_are_ignored() {
    let e = engine();
    let watcher = connect(&e, "w");
    subscribe(&e, &watcher, &["alice"]);
    drain(&watcher);
    let mut p = profile(2);
    p.friendly_name = Some("Alice".into());
    e.update_profile(SVC, "alice", p.clone());
    let mut frames = drain(&watcher);
    p.revision = 3;
    p.attributes = r#"{"a":1}"#.into();
    p.binding_count = 1;
    p.ever_had_binding = true;
    e.update_profile(SVC, "alice", p.clone());
    e.update_profile(SVC, "alice", profile(1));
    frames.extend(drain(&watcher));
    let reasons: Vec<_> = frames
        .iter()
        .map(|f| match f {
            ServerFrame::UserUpdated { reasons, .. } => reasons.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            vec![UpdateReason::FriendlyName],
            vec![
                UpdateReason::Attributes,
                UpdateReason::ReachabilityNotifiable
            ]
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn slow_subscriber_holds_one_pending_update_with_the_latest_state() {
    let e = engine();
    let watcher = connect(&e, "w");
    subscribe(&e, &watcher, &["alice"]);
    drain(&watcher);
    for _ in 0..100 {
        let a = connect(&e, "alice");
        e.detach(&a, &[], true);
    }
    let a = connect(&e, "alice");
    assert_eq!(watcher.outbox.len(), 1, "coalesced to one pending update");
    assert_eq!(e.metrics().coalesced.get(), 200);
    let frames = drain(&watcher);
    assert_eq!(
        presence_updates(&frames),
        vec![("alice".into(), Some(true))]
    );
    e.detach(&a, &[], true);
}

fn clustered() -> (
    Arc<Engine>,
    tokio::sync::mpsc::UnboundedReceiver<ClusterEvent>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let e = Engine::new_clustered(
        EngineConfig {
            offline_grace: GRACE,
            max_outbox_bytes: 1 << 20,
        },
        EngineMetrics::unregistered(),
        None,
        tx,
    );
    e.set_service(
        SVC,
        ServiceState {
            enabled: true,
            epoch: 1,
        },
    );
    (e, rx)
}

fn events(rx: &mut tokio::sync::mpsc::UnboundedReceiver<ClusterEvent>) -> Vec<ClusterEvent> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

fn key(identity: &str) -> UserKey {
    UserKey::new(SVC, identity)
}

#[tokio::test(start_paused = true)]
async fn cluster_events_report_holds_and_watches_in_order() {
    let (e, mut rx) = clustered();
    assert_eq!(e.cluster_events_sent(), 0);
    let w = connect(&e, "w");
    let a = connect(&e, "alice");
    // Read after alice's hold was sent: the hold's position in the channel.
    assert_eq!(e.cluster_events_sent(), 2);
    subscribe(&e, &w, &["alice"]);
    e.detach(&a, &[], false);
    advance(GRACE + Duration::from_millis(1)).await;
    e.unsubscribe(&w, "alice");
    assert_eq!(e.cluster_events_sent(), 5);
    assert_eq!(
        events(&mut rx),
        vec![
            ClusterEvent::Held(key("w")),
            ClusterEvent::Held(key("alice")),
            ClusterEvent::Watch(key("alice")),
            ClusterEvent::Released(key("alice")),
            ClusterEvent::Unwatch(key("alice")),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_subscribed_reply_waits_for_the_cluster_state() {
    let (e, _rx) = clustered();
    let w = connect(&e, "w");
    drain(&w);
    e.load_profile(SVC, "alice", profile(1));
    subscribe(&e, &w, &["alice"]);
    assert!(
        drain(&w).is_empty(),
        "held back until the backplane answers"
    );
    e.apply_remote(&key("alice"), 10, true);
    let frames = drain(&w);
    match &frames[..] {
        [ServerFrame::Subscribed { users, .. }] => {
            assert_eq!(users[0].identity, "alice");
            assert_eq!(users[0].is_online, Some(true), "held by another node");
        }
        other => panic!("{other:?}"),
    }
    // An older report changes nothing; a newer one publishes offline.
    e.apply_remote(&key("alice"), 9, false);
    assert!(drain(&w).is_empty());
    e.apply_remote(&key("alice"), 11, false);
    assert_eq!(
        presence_updates(&drain(&w)),
        vec![("alice".into(), Some(false))],
        "false, not null: she was online in this epoch"
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiting_reply_gets_the_latest_state_and_no_repeat() {
    let (e, _rx) = clustered();
    let w = connect(&e, "w");
    drain(&w);
    subscribe(&e, &w, &["alice"]);
    // alice connects here while w's reply waits for the cluster state.
    let _a = connect(&e, "alice");
    assert!(drain(&w).is_empty());
    e.apply_remote(&key("alice"), 5, false);
    let frames = drain(&w);
    match &frames[..] {
        [ServerFrame::Subscribed { users, .. }] => assert_eq!(users[0].is_online, Some(true)),
        other => panic!("one reply with the latest state, no repeated update: {other:?}"),
    }
}

/// The one `subscribed` reply a watcher got, as (identity, is_online) of its users; panics on
/// anything else, a repeated update included.
fn only_reply(frames: &[ServerFrame]) -> Vec<(String, Option<bool>)> {
    match frames {
        [ServerFrame::Subscribed { users, .. }] => users
            .iter()
            .map(|u| (u.identity.clone(), u.is_online))
            .collect(),
        other => panic!("one reply with the state at its fill, nothing after it: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_change_while_a_reply_loads_the_profile_is_in_the_reply_only() {
    let e = engine();
    let (w1, w2) = (connect(&e, "w1"), connect(&e, "w2"));
    drain(&w1);
    drain(&w2);
    // bob is in no memory: w1's reply waits for his profile from the store.
    let slot = reserve_subscribed(&w1);
    assert_eq!(e.subscribe(&w1, "bob", slot).0, Attach::NeedsProfile);
    // Meanwhile another socket's read loads it, and bob comes online.
    subscribe(&e, &w2, &["bob"]);
    let bob = connect(&e, "bob");
    assert_eq!(
        presence_updates(&drain(&w2)),
        vec![("bob".into(), Some(true))]
    );
    // w1's read comes back: the reply says online, and no update repeats it.
    e.load_profile(SVC, "bob", profile(1));
    assert_eq!(e.fill(&w1, "bob", slot), Attach::Filled);
    w1.outbox.seal(slot);
    assert_eq!(only_reply(&drain(&w1)), vec![("bob".into(), Some(true))]);
    // Once filled, w1 hears bob's changes again.
    e.detach(&bob, &[], true);
    assert_eq!(
        presence_updates(&drain(&w1)),
        vec![("bob".into(), Some(false))]
    );
}

#[tokio::test(start_paused = true)]
async fn a_reply_loading_the_profile_misses_nothing_when_the_watch_ends() {
    let e = engine();
    let (w1, w2) = (connect(&e, "w1"), connect(&e, "w2"));
    let slot = reserve_subscribed(&w1);
    assert_eq!(e.subscribe(&w1, "bob", slot).0, Attach::NeedsProfile);
    // w2 watches bob too, so his entry stays.
    subscribe(&e, &w2, &["bob"]);
    // w1's read failed: the socket gives the watch up (as after a store failure).
    e.unsubscribe(&w1, "bob");
    w1.outbox.seal(slot);
    drain(&w1);
    // Subscribed again, w1 is an ordinary watcher: it hears bob come online.
    subscribe(&e, &w1, &["bob"]);
    drain(&w1);
    let _bob = connect(&e, "bob");
    assert_eq!(
        presence_updates(&drain(&w1)),
        vec![("bob".into(), Some(true))]
    );
}

#[tokio::test(start_paused = true)]
async fn the_cluster_state_arriving_while_a_reply_loads_the_profile_is_not_repeated() {
    let (e, _rx) = clustered();
    let (w1, w2) = (connect(&e, "w1"), connect(&e, "w2"));
    drain(&w1);
    drain(&w2);
    // alice is held by another node. w1's reply waits for her profile; w2's read has it
    // first and waits for the backplane.
    let slot = reserve_subscribed(&w1);
    assert_eq!(e.subscribe(&w1, "alice", slot).0, Attach::NeedsProfile);
    subscribe(&e, &w2, &["alice"]);
    e.apply_remote(&key("alice"), 10, true);
    assert_eq!(only_reply(&drain(&w2)), vec![("alice".into(), Some(true))]);
    // w1's read comes back after the backplane's answer: its reply has it, once.
    e.load_profile(SVC, "alice", profile(1));
    assert_eq!(e.fill(&w1, "alice", slot), Attach::Filled);
    w1.outbox.seal(slot);
    assert_eq!(only_reply(&drain(&w1)), vec![("alice".into(), Some(true))]);
}

#[tokio::test(start_paused = true)]
async fn a_user_held_elsewhere_does_not_flap_when_it_leaves_here() {
    let (e, _rx) = clustered();
    let w = connect(&e, "w");
    let a = connect(&e, "alice");
    subscribe(&e, &w, &["alice"]);
    e.apply_remote(&key("alice"), 1, true);
    drain(&w);
    // Leaves this node (bye): still held by another node, so nothing is published.
    e.detach(&a, &[], true);
    assert!(drain(&w).is_empty());
    assert_eq!(e.presence(SVC, "alice").map(|p| p.online), Some(true));
    // The other node releases: offline.
    e.apply_remote(&key("alice"), 2, false);
    assert_eq!(
        presence_updates(&drain(&w)),
        vec![("alice".into(), Some(false))]
    );
    // Comes back here while not held elsewhere: online at once, without the backplane.
    let _a = connect(&e, "alice");
    assert_eq!(
        presence_updates(&drain(&w)),
        vec![("alice".into(), Some(true))]
    );
}

#[tokio::test(start_paused = true)]
async fn a_deleted_service_closes_its_connections_with_4003() {
    let e = engine();
    let a = connect(&e, "alice");
    drain(&a);
    e.remove_service(SVC);
    assert!(matches!(
        a.outbox.pop(std::task::Waker::noop()),
        Some(Outgoing::Close(reach_proto::CloseCode::Forbidden))
    ));
}

// ---------- property test ----------

#[derive(Debug, Clone)]
enum Op {
    Connect(usize),
    Drop(usize),
    Bye(usize),
    Subscribe(usize, usize),
    Advance(u64),
    Toggle,
}

const USERS: [&str; 3] = ["alice", "bob", "carol"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..USERS.len()).prop_map(Op::Connect),
        2 => any::<usize>().prop_map(Op::Drop),
        1 => any::<usize>().prop_map(Op::Bye),
        1 => (any::<usize>(), 0..USERS.len()).prop_map(|(c, u)| Op::Subscribe(c, u)),
        3 => (1u64..7000).prop_map(Op::Advance),
        1 => Just(Op::Toggle),
    ]
}

/// The reference model of one user.
#[derive(Debug, Default, Clone)]
struct ModelUser {
    conns: u32,
    online: bool,
    grace_deadline: Option<Duration>,
    online_epoch: i64,
}

struct Model {
    now: Duration,
    enabled: bool,
    epoch: i64,
    users: HashMap<&'static str, ModelUser>,
    /// Expected presence notifications at the watcher, in order.
    expected: Vec<(String, Option<bool>)>,
}

impl Model {
    fn view(&self, u: &ModelUser) -> Option<bool> {
        if !self.enabled {
            None
        } else if u.online {
            Some(true)
        } else if u.online_epoch == self.epoch {
            Some(false)
        } else {
            None
        }
    }

    fn set_online(&mut self, name: &'static str, online: bool) {
        let (enabled, epoch) = (self.enabled, self.epoch);
        let u = self.users.get_mut(name).unwrap();
        u.online = online;
        if online && enabled {
            u.online_epoch = epoch;
        }
        if enabled {
            self.expected.push((name.into(), Some(online)));
        }
    }

    fn expire(&mut self) {
        let due: Vec<_> = self
            .users
            .iter()
            .filter(|(_, u)| u.grace_deadline.is_some_and(|d| d <= self.now))
            .map(|(n, _)| *n)
            .collect();
        for name in due {
            self.users.get_mut(name).unwrap().grace_deadline = None;
            self.set_online(name, false);
        }
    }
}

fn run_case(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let e = engine();
        let watcher = connect(&e, "w");
        subscribe(&e, &watcher, &USERS);
        drain(&watcher);
        let mut model = Model {
            now: Duration::ZERO,
            enabled: true,
            epoch: 1,
            users: USERS.iter().map(|u| (*u, ModelUser::default())).collect(),
            expected: Vec::new(),
        };
        let mut seen = Vec::new();
        let mut toggles = Vec::new();
        // Live connections: (user index, conn, identities it watches besides its own).
        let mut live: Vec<(usize, Arc<Conn>, Vec<String>)> = Vec::new();
        for op in ops {
            match op {
                Op::Connect(u) => {
                    let name = USERS[u];
                    let conn = connect(&e, name);
                    let mu = model.users.get_mut(name).unwrap();
                    mu.conns += 1;
                    mu.grace_deadline = None;
                    if mu.conns == 1 && !mu.online {
                        model.set_online(name, true);
                    }
                    live.push((u, conn, Vec::new()));
                }
                Op::Drop(i) | Op::Bye(i) if !live.is_empty() => {
                    let bye = matches!(op, Op::Bye(_));
                    let (u, conn, watched) = live.remove(i % live.len());
                    let watched: Vec<UserKey> =
                        watched.iter().map(|w| UserKey::new(SVC, w)).collect();
                    e.detach(&conn, &watched, bye);
                    let name = USERS[u];
                    let mu = model.users.get_mut(name).unwrap();
                    mu.conns -= 1;
                    if mu.conns == 0 {
                        if bye {
                            mu.grace_deadline = None;
                            model.set_online(name, false);
                        } else {
                            mu.grace_deadline = Some(model.now + GRACE);
                        }
                    }
                }
                Op::Subscribe(i, u) if !live.is_empty() => {
                    let idx = i % live.len();
                    let conn = Arc::clone(&live[idx].1);
                    subscribe(&e, &conn, &[USERS[u]]);
                    live[idx].2.push(USERS[u].to_string());
                }
                Op::Advance(ms) => {
                    // Step to each grace deadline in order, as the clock would.
                    let target = model.now + Duration::from_millis(ms);
                    loop {
                        let next = model
                            .users
                            .values()
                            .filter_map(|u| u.grace_deadline)
                            .filter(|d| *d <= target)
                            .min();
                        let Some(next) = next else { break };
                        advance(next - model.now).await;
                        model.now = next;
                        model.expire();
                    }
                    advance(target - model.now).await;
                    model.now = target;
                }
                Op::Toggle => {
                    // Disabling nulls the flags that had a value, at every subscriber.
                    if model.enabled {
                        let mut names: Vec<_> = model
                            .users
                            .iter()
                            .filter(|(_, u)| model.view(u).is_some())
                            .map(|(n, _)| *n)
                            .collect();
                        names.sort();
                        for n in names {
                            model.expected.push((n.into(), None));
                        }
                    }
                    model.enabled = !model.enabled;
                    if model.enabled {
                        model.epoch += 1;
                    }
                    e.set_service(
                        SVC,
                        ServiceState {
                            enabled: model.enabled,
                            epoch: model.epoch,
                        },
                    );
                    toggles.push(model.enabled);
                    if model.enabled {
                        let mut names: Vec<_> = model
                            .users
                            .iter()
                            .filter(|(_, u)| u.online)
                            .map(|(n, _)| *n)
                            .collect();
                        names.sort();
                        for n in names {
                            model.users.get_mut(n).unwrap().online_epoch = model.epoch;
                            model.expected.push((n.into(), Some(true)));
                        }
                    }
                }
                _ => {}
            }
            // Drain after every op, so the order of notifications is exact (no coalescing).
            let frames = drain(&watcher);
            let mut batch = presence_updates(&frames);
            batch.retain(|(identity, _)| identity != "w");
            if frames
                .iter()
                .any(|f| matches!(f, ServerFrame::ServiceUpdated { .. }))
            {
                batch.sort();
            }
            seen.extend(batch);
            for f in &frames {
                if let ServerFrame::ServiceUpdated {
                    reachability_enabled,
                } = f
                {
                    prop_assert_eq!(Some(reachability_enabled), toggles.first());
                    toggles.remove(0);
                }
            }
        }
        prop_assert!(toggles.is_empty(), "every flip was announced");
        // Per user, the exact sequence (the order between users at one instant is free).
        for name in USERS {
            let got: Vec<_> = seen.iter().filter(|(i, _)| i == name).collect();
            let want: Vec<_> = model.expected.iter().filter(|(i, _)| i == name).collect();
            prop_assert_eq!(
                got,
                want,
                "exactly the notifications the rules allow for {}",
                name
            );
        }
        // Final state: engine agrees with the model, and every live subscriber's view too.
        for name in USERS {
            let mu = &model.users[name];
            let online = e.presence(SVC, name).map(|p| p.online).unwrap_or(false);
            prop_assert_eq!(online, mu.online, "engine state of {}", name);
        }
        for (u, conn, watched) in &live {
            let mut view: HashMap<String, Option<bool>> = HashMap::new();
            for f in drain(conn) {
                match f {
                    ServerFrame::Welcome { user, .. } => {
                        view.insert(user.identity, user.is_online);
                    }
                    ServerFrame::Subscribed { users, .. } => {
                        for user in users {
                            view.insert(user.identity, user.is_online);
                        }
                    }
                    ServerFrame::UserUpdated { user, .. } => {
                        view.insert(user.identity, user.is_online);
                    }
                    ServerFrame::ServiceUpdated {
                        reachability_enabled: false,
                    } => {
                        for v in view.values_mut() {
                            *v = None;
                        }
                    }
                    _ => {}
                }
            }
            for name in watched.iter().map(String::as_str).chain([USERS[*u]]) {
                let mu = &model.users[name];
                prop_assert_eq!(
                    view.get(name).copied().flatten(),
                    model.view(mu),
                    "view of {}",
                    name
                );
            }
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn any_interleaving_ends_right_with_exact_notifications(ops in proptest::collection::vec(op(), 1..60)) {
        run_case(ops)?;
    }
}
