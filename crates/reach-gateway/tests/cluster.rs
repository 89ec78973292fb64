//! Cluster mode against real Redis and PostgreSQL, with 2-3 real reachd processes (and, for
//! webhooks, real receivers).
//!
//! Needs `REACH_TEST_REDIS_URL` (e.g. `redis://127.0.0.1:6379`) and `REACH_TEST_POSTGRES_URL`
//! (e.g. `postgres://postgres@127.0.0.1:5432/postgres`); without them each test says
//! `skipped: ...` on stderr and passes. Each test gets a PostgreSQL database of its own and a
//! Redis database number of its own (1-9) on the given server, except the Redis-restart test,
//! which starts a private `redis-server` it can stop.

mod common;
mod receiver;
mod ws_client;

use std::io::Write;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use reach_proto::{ClientFrame, ServerFrame, UpdateReason};
use sqlx::{Connection, PgConnection};
use ws_client::*;

/// Short grace and node TTL so failures are observed quickly.
const FAST: &str = r#"
[presence]
offline_grace_ms = 1000
"#;
const TTL_MS: &str = "1000";
const GRACE: Duration = Duration::from_millis(1000);

/// Starts a node of the cluster on `redis` and `db`.
fn node(redis: &str, db: &TestDb, id: &str) -> Reachd {
    Reachd::start_with_env(
        FAST,
        &[
            ("REACH_STORAGE__POSTGRES_URL", &db.url),
            ("REACH_CLUSTER__REDIS_URL", redis),
            ("REACH_CLUSTER__NODE_ID", id),
            ("REACH_CLUSTER__NODE_TTL_MS", TTL_MS),
        ],
    )
}

fn node_id(test: &str, n: u32) -> String {
    format!("{test}-{:08x}-{n}", rand_u64() as u32)
}

async fn enabled_service(d: &Reachd) -> String {
    let rest = d.client();
    let svc = rest.create_service("cluster tests").await;
    rest.set_reachability(&svc, true).await;
    svc
}

async fn subscribe(ws: &mut Ws, identities: &[&str]) -> ServerFrame {
    ws.request(ClientFrame::Subscribe {
        id: 1,
        identities: identities.iter().map(|s| s.to_string()).collect(),
    })
    .await
}

fn online_in(f: &ServerFrame, identity: &str) -> Option<bool> {
    match f {
        ServerFrame::Subscribed { users, .. } => users
            .iter()
            .find(|u| u.identity == identity)
            .and_then(|u| u.is_online),
        ServerFrame::UserUpdated { user, .. } if user.identity == identity => user.is_online,
        other => panic!("no state of {identity} in {other:?}"),
    }
}

async fn rest_online(d: &Reachd, svc: &str, identity: &str) -> Option<bool> {
    let r = d
        .client()
        .get(&format!("/v1/Services/{svc}/Users/{identity}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["is_online"].as_bool()
}

/// Polls until `f` holds, for up to `wait`.
async fn eventually<F, Fut>(wait: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + wait;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {wait:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn readyz(d: &Reachd) -> u16 {
    match reqwest::get(format!("http://{}/readyz", d.admin)).await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// The nodes holding `identity` in Redis (the fields of its holder hash).
async fn holders(redis: &str, svc: &str, identity: &str) -> Vec<String> {
    let client = redis::Client::open(redis).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("reach:{{{svc}}}:holders:{identity}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    fields.into_iter().filter(|f| f != "~v").collect()
}

/// A node's id, from its `/debug/status`.
async fn node_id_of(d: &Reachd) -> String {
    let status: serde_json::Value = reqwest::get(format!("http://{}/debug/status", d.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    status["node_id"].as_str().unwrap().to_owned()
}

/// Asserts that no `user_updated` of `identity` arrives within `wait`.
async fn no_update_of(ws: &mut Ws, identity: &str, wait: Duration) {
    let got = tokio::time::timeout(wait, ws.update_of(identity)).await;
    assert!(got.is_err(), "unexpected update: {got:?}");
}

#[tokio::test]
async fn presence_crosses_nodes_and_rest_reads_at_any_node() {
    let Some((redis, pg)) = servers("presence_crosses_nodes") else {
        return;
    };
    let redis = redis_db(&redis, 1);
    let db = TestDb::create(&pg).await;
    let (id_a, id_b) = (node_id("cross", 1), node_id("cross", 2));
    let a = node(&redis, &db, &id_a);
    let b = node(&redis, &db, &id_b);
    let svc = enabled_service(&a).await;
    create_user(&a, &svc, "alice").await;
    // Each node's status page names it and its live peer.
    eventually(Duration::from_secs(10), "A sees B as a peer", || async {
        let status: serde_json::Value = reqwest::get(format!("http://{}/debug/status", a.admin))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        status["node_id"] == id_a.as_str()
            && status["cluster"]["redis_up"] == true
            && status["cluster"]["peers"]
                .as_array()
                .is_some_and(|p| p.iter().any(|n| n == id_b.as_str()))
    })
    .await;

    // bob at B watches alice, created at A (records are shared).
    let (mut bob, _) = Ws::hello(&b.ws_url(), &b.token(&svc, "bob"), None).await;
    let sub = subscribe(&mut bob, &["alice"]).await;
    assert_eq!(online_in(&sub, "alice"), None, "never online yet: null");

    // alice connects at A: bob at B is told.
    let started = Instant::now();
    let (mut alice, _) = Ws::hello(&a.ws_url(), &a.token(&svc, "alice"), None).await;
    let on = bob.update_of("alice").await;
    assert_eq!(online_in(&on, "alice"), Some(true));
    eprintln!("cross-node online after {:?}", started.elapsed());
    // REST at B reads what A holds.
    assert_eq!(rest_online(&b, &svc, "alice").await, Some(true));
    // A later subscriber at B gets the cluster's state in its reply.
    let (mut carol, _) = Ws::hello(&b.ws_url(), &b.token(&svc, "carol"), None).await;
    let sub = subscribe(&mut carol, &["alice"]).await;
    assert_eq!(online_in(&sub, "alice"), Some(true));

    // bye at A: offline at B at once (no grace).
    alice.send(&ClientFrame::Bye).await;
    let off = bob.update_of("alice").await;
    assert_eq!(online_in(&off, "alice"), Some(false));
    assert_eq!(
        online_in(&carol.update_of("alice").await, "alice"),
        Some(false)
    );
    assert_eq!(rest_online(&b, &svc, "alice").await, Some(false));
    assert_eq!(rest_online(&a, &svc, "alice").await, Some(false));
}

#[tokio::test]
async fn one_user_on_two_nodes_stays_online_until_both_leave() {
    let Some((redis, pg)) = servers("one_user_on_two_nodes") else {
        return;
    };
    let redis = redis_db(&redis, 2);
    let db = TestDb::create(&pg).await;
    let a = node(&redis, &db, &node_id("two", 1));
    let b = node(&redis, &db, &node_id("two", 2));
    let c = node(&redis, &db, &node_id("two", 3));
    let svc = enabled_service(&a).await;
    create_user(&a, &svc, "alice").await;
    let (mut bob, _) = Ws::hello(&c.ws_url(), &c.token(&svc, "bob"), None).await;
    subscribe(&mut bob, &["alice"]).await;

    let (mut alice_a, _) = Ws::hello(&a.ws_url(), &a.token(&svc, "alice"), None).await;
    assert_eq!(
        online_in(&bob.update_of("alice").await, "alice"),
        Some(true)
    );
    let (mut alice_b, _) = Ws::hello(&b.ws_url(), &b.token(&svc, "alice"), None).await;
    // B's `welcome` waits for its hold to be in Redis. So leaving A (even with bye) changes
    // nothing while B holds her.
    let b_id = node_id_of(&b).await;
    assert!(
        holders(&redis, &svc, "alice").await.contains(&b_id),
        "B's hold is in Redis when its welcome arrives"
    );
    alice_a.send(&ClientFrame::Bye).await;
    assert_eq!(alice_a.closed().await.code, Some(1000));
    no_update_of(&mut bob, "alice", GRACE * 2).await;
    assert_eq!(rest_online(&c, &svc, "alice").await, Some(true));
    // An abrupt close at B: offline after the grace.
    let left = Instant::now();
    alice_b.send(&ClientFrame::Ping { id: 1 }).await;
    alice_b.abort();
    let off = bob.update_of("alice").await;
    assert_eq!(online_in(&off, "alice"), Some(false));
    let took = left.elapsed();
    assert!(took >= GRACE - Duration::from_millis(50), "{took:?}");
}

#[tokio::test]
async fn switch_and_profile_changes_at_one_node_reach_sockets_on_others() {
    let Some((redis, pg)) = servers("switch_and_profile_changes") else {
        return;
    };
    let redis = redis_db(&redis, 3);
    let db = TestDb::create(&pg).await;
    let a = node(&redis, &db, &node_id("ctl", 1));
    let b = node(&redis, &db, &node_id("ctl", 2));
    let rest = a.client();
    let svc = rest.create_service("cluster control").await;
    create_user(&a, &svc, "alice").await;
    let (mut bob, welcome) = Ws::hello(&b.ws_url(), &b.token(&svc, "bob"), None).await;
    assert!(matches!(
        welcome,
        ServerFrame::Welcome {
            reachability_enabled: false,
            ..
        }
    ));
    subscribe(&mut bob, &["alice"]).await;
    let (_alice, _) = Ws::hello(&a.ws_url(), &a.token(&svc, "alice"), None).await;

    // Enabling at A: bob's socket at B hears it, then alice's presence.
    rest.set_reachability(&svc, true).await;
    let f = bob
        .recv_until(|f| matches!(f, ServerFrame::ServiceUpdated { .. }))
        .await;
    assert!(matches!(
        f,
        ServerFrame::ServiceUpdated {
            reachability_enabled: true
        }
    ));
    let on = bob.update_of("alice").await;
    assert_eq!(online_in(&on, "alice"), Some(true));

    // A profile update at A is published at B with its reason, and read back at B.
    let r = rest
        .post(
            &format!("/v1/Services/{svc}/Users/alice"),
            &[("FriendlyName", "Alice A.")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let upd = bob.update_of("alice").await;
    match &upd {
        ServerFrame::UserUpdated { user, reasons } => {
            assert_eq!(user.friendly_name.as_deref(), Some("Alice A."));
            assert!(reasons.contains(&UpdateReason::FriendlyName), "{reasons:?}");
        }
        other => panic!("{other:?}"),
    }
    let r = b
        .client()
        .get(&format!("/v1/Services/{svc}/Users/alice"))
        .await;
    assert_eq!(r.body["friendly_name"], "Alice A.");

    // Deleting alice at A closes her socket... and bob's view of the service stays.
    // Disabling at A: bob hears it at B.
    rest.set_reachability(&svc, false).await;
    let f = bob
        .recv_until(|f| matches!(f, ServerFrame::ServiceUpdated { .. }))
        .await;
    assert!(matches!(
        f,
        ServerFrame::ServiceUpdated {
            reachability_enabled: false
        }
    ));
}

#[tokio::test]
async fn deleting_a_user_at_one_node_closes_its_sockets_on_others() {
    let Some((redis, pg)) = servers("deleting_a_user") else {
        return;
    };
    let redis = redis_db(&redis, 4);
    let db = TestDb::create(&pg).await;
    let a = node(&redis, &db, &node_id("del", 1));
    let b = node(&redis, &db, &node_id("del", 2));
    let svc = enabled_service(&a).await;
    create_user(&a, &svc, "alice").await;
    let (alice, _) = Ws::hello(&b.ws_url(), &b.token(&svc, "alice"), None).await;
    let r = a
        .client()
        .delete(&format!("/v1/Services/{svc}/Users/alice"))
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(alice.closed().await.code, Some(4003));
}

#[tokio::test]
async fn a_killed_node_s_users_go_offline_and_a_restarted_node_leaves_no_ghost() {
    let Some((redis, pg)) = servers("a_killed_node") else {
        return;
    };
    let redis = redis_db(&redis, 5);
    let db = TestDb::create(&pg).await;
    let a = node(&redis, &db, &node_id("kill", 1));
    let b = node(&redis, &db, &node_id("kill", 2));
    let svc = enabled_service(&a).await;
    create_user(&a, &svc, "alice").await;
    create_user(&a, &svc, "dave").await;
    let (mut bob, _) = Ws::hello(&b.ws_url(), &b.token(&svc, "bob"), None).await;
    subscribe(&mut bob, &["alice", "dave"]).await;
    let (alice, _) = Ws::hello(&a.ws_url(), &a.token(&svc, "alice"), None).await;
    assert_eq!(
        online_in(&bob.update_of("alice").await, "alice"),
        Some(true)
    );

    // kill -9 of A: alice goes offline at B after the grace, within 5 s more.
    let killed = Instant::now();
    let a = a.kill9();
    drop(alice);
    let off = bob.update_of("alice").await;
    assert_eq!(online_in(&off, "alice"), Some(false));
    let took = killed.elapsed();
    eprintln!("offline after kill -9: {took:?}");
    assert!(took >= GRACE, "not before the grace: {took:?}");
    assert!(took <= GRACE + Duration::from_secs(5), "{took:?}");

    // A comes back with the same node id; dave connects there: online at B, then offline.
    let a = a.restart();
    let (dave, _) = Ws::hello(&a.ws_url(), &a.token(&svc, "dave"), None).await;
    assert_eq!(online_in(&bob.update_of("dave").await, "dave"), Some(true));
    assert_eq!(
        rest_online(&b, &svc, "alice").await,
        Some(false),
        "no ghost"
    );

    // kill -9 and an immediate restart with the same id: dave, gone with the old process,
    // must not stay online (the restarted node releases its old holds after the grace).
    let a = a.kill9_and_restart();
    dave.abort();
    let off = bob.update_of("dave").await;
    assert_eq!(online_in(&off, "dave"), Some(false));
    eventually(
        Duration::from_secs(5),
        "REST reads dave offline",
        || async { rest_online(&b, &svc, "dave").await == Some(false) },
    )
    .await;
    // The same node id dies again: cleaned up again (not blocked by the first clean-up).
    create_user(&b, &svc, "erin").await;
    bob.request(ClientFrame::Subscribe {
        id: 2,
        identities: vec!["erin".into()],
    })
    .await;
    let (erin, _) = Ws::hello(&a.ws_url(), &a.token(&svc, "erin"), None).await;
    assert_eq!(online_in(&bob.update_of("erin").await, "erin"), Some(true));
    let killed = Instant::now();
    let _stopped = a.kill9();
    drop(erin);
    assert_eq!(online_in(&bob.update_of("erin").await, "erin"), Some(false));
    let took = killed.elapsed();
    assert!(took <= GRACE + Duration::from_secs(5), "{took:?}");
}

/// A private redis-server this test can stop and start again on the same port.
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start() -> Option<PrivateRedis> {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut r = PrivateRedis { port, child: None };
        r.resume().ok()?;
        Some(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn resume(&mut self) -> std::io::Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                return Err(std::io::Error::other("redis-server did not start"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test]
async fn redis_down_keeps_local_presence_and_the_view_reconverges() {
    let Some((_, pg)) = servers("redis_down") else {
        return;
    };
    let Some(mut redis) = PrivateRedis::start() else {
        let _ = writeln!(
            std::io::stderr(),
            "skipped: cluster test redis_down: no redis-server binary on PATH"
        );
        return;
    };
    let db = TestDb::create(&pg).await;
    let a = node(&redis.url(), &db, &node_id("redis", 1));
    let b = node(&redis.url(), &db, &node_id("redis", 2));
    let svc = enabled_service(&a).await;
    for u in ["alice", "erin", "carol"] {
        create_user(&a, &svc, u).await;
    }
    let (mut bob, _) = Ws::hello(&b.ws_url(), &b.token(&svc, "bob"), None).await;
    subscribe(&mut bob, &["alice", "erin"]).await;
    let (mut alice, _) = Ws::hello(&a.ws_url(), &a.token(&svc, "alice"), None).await;
    assert_eq!(
        online_in(&bob.update_of("alice").await, "alice"),
        Some(true)
    );
    assert_eq!(readyz(&a).await, 200);

    redis.stop();
    eventually(Duration::from_secs(10), "both nodes not ready", || async {
        readyz(&a).await == 503 && readyz(&b).await == 503
    })
    .await;

    // Local presence still works at A: carol watches alice there and sees her online.
    let (mut carol, _) = Ws::hello(&a.ws_url(), &a.token(&svc, "carol"), None).await;
    let sub = subscribe(&mut carol, &["alice"]).await;
    assert_eq!(online_in(&sub, "alice"), Some(true));
    // While Redis is away: alice leaves A and erin connects at A.
    alice.send(&ClientFrame::Bye).await;
    assert_eq!(
        online_in(&carol.update_of("alice").await, "alice"),
        Some(false)
    );
    let (_erin, _) = Ws::hello(&a.ws_url(), &a.token(&svc, "erin"), None).await;

    // Redis returns (empty): within 5 s both nodes are ready and bob's view is the truth.
    redis.resume().unwrap();
    let back = Instant::now();
    let (mut alice_seen, mut erin_seen) = (None, None);
    while alice_seen != Some(false) || erin_seen != Some(true) {
        let left = Duration::from_secs(5).saturating_sub(back.elapsed());
        let f = tokio::time::timeout(
            left,
            bob.recv_until(|f| matches!(f, ServerFrame::UserUpdated { .. })),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("not reconverged in 5 s: alice {alice_seen:?}, erin {erin_seen:?}")
        });
        if let ServerFrame::UserUpdated { user, .. } = f {
            match user.identity.as_str() {
                "alice" => alice_seen = user.is_online,
                "erin" => erin_seen = user.is_online,
                _ => {}
            }
        }
    }
    eprintln!("reconverged {:?} after Redis returned", back.elapsed());
    eventually(Duration::from_secs(5), "both nodes ready again", || async {
        readyz(&a).await == 200 && readyz(&b).await == 200
    })
    .await;
    assert_eq!(rest_online(&b, &svc, "alice").await, Some(false));
    assert_eq!(rest_online(&b, &svc, "erin").await, Some(true));
}

#[tokio::test]
async fn restarts_in_a_row_leave_no_user_stuck_online() {
    let Some((redis, pg)) = servers("restarts_in_a_row") else {
        return;
    };
    let redis = redis_db(&redis, 6);
    let db = TestDb::create(&pg).await;
    let a = node(&redis, &db, &node_id("again", 1));
    let b = node(&redis, &db, &node_id("again", 2));
    let svc = enabled_service(&a).await;
    create_user(&a, &svc, "carol").await;
    let (mut bob, _) = Ws::hello(&b.ws_url(), &b.token(&svc, "bob"), None).await;
    subscribe(&mut bob, &["carol"]).await;
    let (carol, _) = Ws::hello(&a.ws_url(), &a.token(&svc, "carol"), None).await;
    assert_eq!(
        online_in(&bob.update_of("carol").await, "carol"),
        Some(true)
    );
    // Killed with carol connected, restarted, killed again before its clean-up (the grace),
    // restarted again: carol, who never came back, must still go offline.
    let a = a.kill9_and_restart();
    drop(carol);
    let a = a.kill9_and_restart();
    let started = Instant::now();
    let off = bob.update_of("carol").await;
    assert_eq!(online_in(&off, "carol"), Some(false));
    assert!(started.elapsed() <= GRACE + Duration::from_secs(5));
    drop(a);
}

/// A node restarted with the same id (a rolling update) counts the holds its previous life
/// left as held elsewhere: a watcher on it sees those users online through the grace, and sees
/// nothing at all when they come back at another node in time.
#[tokio::test]
async fn a_restarted_node_s_watchers_see_its_previous_life_s_users_online() {
    let Some((redis, pg)) = servers("previous_life") else {
        return;
    };
    let redis = redis_db(&redis, 11);
    let db = TestDb::create(&pg).await;
    let grace = Duration::from_secs(4);
    let start = |id: &str| {
        Reachd::start_with_env(
            "[presence]\noffline_grace_ms = 4000\n",
            &[
                ("REACH_STORAGE__POSTGRES_URL", &db.url),
                ("REACH_CLUSTER__REDIS_URL", &redis),
                ("REACH_CLUSTER__NODE_ID", id),
                ("REACH_CLUSTER__NODE_TTL_MS", TTL_MS),
            ],
        )
    };
    let a = start(&node_id("life", 1));
    let b = start(&node_id("life", 2));
    let svc = enabled_service(&a).await;
    let (alice, _) = Ws::hello(&a.ws_url(), &a.token(&svc, "alice"), None).await;
    eventually(Duration::from_secs(5), "alice online", || async {
        rest_online(&b, &svc, "alice").await == Some(true)
    })
    .await;

    // A clean stop (SIGTERM: alice is sent away) and a start with the same id.
    let a = a.stop();
    drop(alice);
    let a = a.restart();
    let (mut carol, _) = Ws::hello(&a.ws_url(), &a.token(&svc, "carol"), None).await;
    let state = subscribe(&mut carol, &["alice"]).await;
    assert_eq!(
        online_in(&state, "alice"),
        Some(true),
        "alice is held by the node's previous life"
    );
    let (alice, _) = Ws::hello(&b.ws_url(), &b.token(&svc, "alice"), None).await;
    no_update_of(&mut carol, "alice", grace + Duration::from_secs(1)).await;

    // Gone for good: offline at the restarted node after the grace.
    drop(alice);
    let off = carol.update_of("alice").await;
    assert_eq!(online_in(&off, "alice"), Some(false));
}

#[tokio::test]
async fn a_node_stopped_cleanly_is_cleaned_up_as_one_that_left_not_one_that_died() {
    let Some((redis, pg)) = servers("left_cleanly") else {
        return;
    };
    let redis = redis_db(&redis, 6);
    let db = TestDb::create(&pg).await;
    let a = node(&redis, &db, &node_id("left", 1));
    let b = node(&redis, &db, &node_id("left", 2));
    let svc = enabled_service(&a).await;
    create_user(&a, &svc, "alice").await;
    let (mut bob, _) = Ws::hello(&b.ws_url(), &b.token(&svc, "bob"), None).await;
    subscribe(&mut bob, &["alice"]).await;
    let (alice, _) = Ws::hello(&a.ws_url(), &a.token(&svc, "alice"), None).await;
    assert_eq!(
        online_in(&bob.update_of("alice").await, "alice"),
        Some(true)
    );

    // SIGTERM: A drains and leaves; alice goes offline at B after the grace.
    let status = tokio::task::spawn_blocking(move || a.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    drop(alice);
    let off = bob.update_of("alice").await;
    assert_eq!(online_in(&off, "alice"), Some(false));
    let mut logs = Vec::new();
    eventually(Duration::from_secs(5), "B released A's users", || {
        logs.extend(b.drain_logs());
        let done = logs
            .iter()
            .any(|l| l.contains("released the users of a node that left"));
        async move { done }
    })
    .await;
    assert!(
        logs.iter().any(|l| l.contains("cluster: node left")),
        "{logs:?}"
    );
    assert!(!logs.iter().any(|l| l.contains("node stopped")), "{logs:?}");
    let metrics = b.metrics().await;
    assert!(
        metrics.contains("reach_cluster_reaped_nodes_total 0"),
        "a node that left is not counted as dead"
    );
}

/// A node whose webhook deliveries retry fast (and time out after 2 s).
fn hook_node(redis: &str, db: &TestDb, id: &str) -> Reachd {
    hook_node_with(redis, db, id, &[])
}

/// [`hook_node`] with more settings (variables).
fn hook_node_with(redis: &str, db: &TestDb, id: &str, more: &[(&str, &str)]) -> Reachd {
    let mut env = vec![
        ("REACH_STORAGE__POSTGRES_URL", db.url.as_str()),
        ("REACH_CLUSTER__REDIS_URL", redis),
        ("REACH_CLUSTER__NODE_ID", id),
        ("REACH_CLUSTER__NODE_TTL_MS", TTL_MS),
        ("REACH_WEBHOOKS__TIMEOUT_MS", "2000"),
        ("REACH_WEBHOOKS__LEASE_MS", "3000"),
        ("REACH_WEBHOOKS__RETRY_INITIAL_MS", "200"),
        ("REACH_WEBHOOKS__RETRY_MAX_MS", "1000"),
        ("REACH_WEBHOOKS__POLL_INTERVAL_MS", "100"),
        ("REACH_WEBHOOKS__MAX_ATTEMPTS", "50"),
    ];
    for (key, value) in more {
        env.retain(|(k, _)| k != key);
        env.push((key, value));
    }
    Reachd::start_with_env(FAST, &env)
}

/// Points the service's webhook at `url` for the three user events.
async fn listen(d: &Reachd, svc: &str, url: &str) {
    let r = d
        .client()
        .post(
            &format!("/v1/Services/{svc}/Configuration/Webhooks"),
            &[
                ("PostWebhookUrl", url),
                ("Filters", "onUserAdded"),
                ("Filters", "onUserUpdated"),
                ("Filters", "onUserRemoved"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
}

/// Creates a user over REST with X-Twilio-Webhook-Enabled: true.
async fn create_user_firing(d: &Reachd, svc: &str, identity: &str) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/Services/{svc}/Users", d.base()))
        .basic_auth(ACCOUNT_SID, Some(AUTH_TOKEN))
        .header("X-Twilio-Webhook-Enabled", "true")
        .form(&[("Identity", identity)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
}

#[tokio::test]
async fn each_change_is_one_webhook_event_for_the_whole_cluster() {
    let Some((redis, pg)) = servers("webhooks_once") else {
        return;
    };
    let redis = redis_db(&redis, 7);
    let db = TestDb::create(&pg).await;
    let mut rx = receiver::Receiver::start().await;
    let a = hook_node(&redis, &db, &node_id("once", 1));
    let b = hook_node(&redis, &db, &node_id("once", 2));
    let svc = enabled_service(&a).await;
    listen(&a, &svc, &rx.url("/hook")).await;
    create_user_firing(&b, &svc, "alice").await;
    let added = rx.next().await;
    assert_eq!(added.event(), "onUserAdded");
    assert!(added.signature_valid(AUTH_TOKEN));

    // Watchers on both nodes; alice on both nodes: one online, one offline.
    let (mut bob, _) = Ws::hello(&a.ws_url(), &a.token(&svc, "bob"), None).await;
    let (mut carol, _) = Ws::hello(&b.ws_url(), &b.token(&svc, "carol"), None).await;
    for ws in [&mut bob, &mut carol] {
        subscribe(ws, &["alice"]).await;
    }
    // bob and carol came online: one event each.
    let mut others: Vec<String> = Vec::new();
    for _ in 0..4 {
        let hook = rx.next().await;
        others.push(format!("{} {}", hook.param("Identity"), hook.event()));
    }
    others.sort();
    assert_eq!(
        others,
        [
            "bob onUserAdded",
            "bob onUserUpdated",
            "carol onUserAdded",
            "carol onUserUpdated"
        ]
    );
    let (mut alice_a, _) = Ws::hello(&a.ws_url(), &a.token(&svc, "alice"), None).await;
    let online = rx.next().await;
    assert_eq!(
        (online.param("Identity"), online.param("IsOnline")),
        ("alice", "true")
    );
    let (mut alice_b, _) = Ws::hello(&b.ws_url(), &b.token(&svc, "alice"), None).await;
    alice_a.send(&ClientFrame::Bye).await;
    assert_eq!(alice_a.closed().await.code, Some(1000));
    // Still online at B: nothing, on either node.
    rx.none_within(GRACE * 2).await;
    alice_b.send(&ClientFrame::Bye).await;
    let left = now();
    let offline = rx.next().await;
    assert_eq!(
        (offline.param("Identity"), offline.param("IsOnline")),
        ("alice", "false")
    );
    let seen = offline.param("DateLastSeen");
    assert!(!seen.is_empty());
    rx.none_within(GRACE * 2).await;
    // Last seen is the same at every node, REST and frames.
    for d in [&a, &b] {
        let r = d
            .client()
            .get(&format!("/v1/Services/{svc}/Users/alice"))
            .await;
        assert_eq!(r.body["is_online"], false);
        assert_eq!(r.body["date_last_seen"].as_str(), Some(seen), "{}", r.text);
    }
    for ws in [&mut bob, &mut carol] {
        let f = ws
            .recv_until(|f| {
                matches!(f, ServerFrame::UserUpdated { user, .. }
                    if user.identity == "alice" && user.is_online == Some(false))
            })
            .await;
        let ServerFrame::UserUpdated { user, .. } = f else {
            unreachable!()
        };
        let at = user.last_seen_at.expect("offline: last seen");
        assert!((at - left).abs() <= 2, "{at} vs {left}");
    }
}

#[tokio::test]
async fn a_killed_delivering_node_leaves_its_events_to_the_others() {
    let Some((redis, pg)) = servers("webhooks_killed") else {
        return;
    };
    let redis = redis_db(&redis, 8);
    let db = TestDb::create(&pg).await;
    let mut rx = receiver::Receiver::start().await;
    // A alone: it takes the head event of each user, and the receiver holds those requests.
    rx.script(std::iter::repeat_n(receiver::Reply::Hang, 4));
    let slow = [
        ("REACH_WEBHOOKS__TIMEOUT_MS", "4000"),
        ("REACH_WEBHOOKS__LEASE_MS", "5000"),
    ];
    let a = hook_node_with(&redis, &db, &node_id("killed", 1), &slow);
    let svc = enabled_service(&a).await;
    listen(&a, &svc, &rx.url("/hook")).await;
    for identity in ["u1", "u2", "u3"] {
        create_user_firing(&a, &svc, identity).await;
    }
    let (alice, _) = Ws::hello(&a.ws_url(), &a.token(&svc, "alice"), None).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(rx.next().await);
    }
    let mut who: Vec<&str> = held.iter().map(|h| h.param("Identity")).collect();
    who.sort_unstable();
    assert_eq!(who, ["alice", "u1", "u2", "u3"], "A is delivering");
    // alice's online is recorded too (behind her first event).
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhook_events")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        if n == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "{n} events queued, not 5");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // B joins; A dies mid-delivery, with alice online.
    let b = hook_node_with(&redis, &db, &node_id("killed", 2), &slow);
    let stopped = a.kill9();
    drop(alice);

    // B delivers every event: the four A held (their tokens, after A's leases ran out),
    // alice's online, and her offline once it has cleaned up after A.
    let mut tokens = std::collections::HashMap::new();
    let mut alice_offline = None;
    while tokens.len() < 6 {
        let hook = rx.next().await;
        assert!(hook.signature_valid(AUTH_TOKEN));
        let what = format!(
            "{} {} {}",
            hook.param("Identity"),
            hook.event(),
            hook.param("IsOnline")
        );
        if what == "alice onUserUpdated false" {
            alice_offline = Some(hook.param("DateLastSeen").to_owned());
        }
        tokens.entry(hook.token().to_owned()).or_insert(what);
    }
    for hook in &held {
        assert!(tokens.contains_key(hook.token()), "{:?} again", hook.params);
    }
    let mut seen: Vec<&str> = tokens.values().map(String::as_str).collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        [
            "alice onUserAdded ",
            "alice onUserUpdated false",
            "alice onUserUpdated true",
            "u1 onUserAdded ",
            "u2 onUserAdded ",
            "u3 onUserAdded ",
        ]
    );
    // B reported her offline after A's TTL and the grace, as of then.
    let seen_at = alice_offline.expect("alice reported offline by B");
    let r = b
        .client()
        .get(&format!("/v1/Services/{svc}/Users/alice"))
        .await;
    assert_eq!(r.body["is_online"], false);
    assert_eq!(r.body["date_last_seen"].as_str(), Some(seen_at.as_str()));
    drop(stopped);
}

#[tokio::test]
async fn users_recorded_online_that_no_node_holds_are_swept_offline() {
    let Some((redis, pg)) = servers("webhooks_sweep") else {
        return;
    };
    let redis = redis_db(&redis, 9);
    let db = TestDb::create(&pg).await;
    let mut rx = receiver::Receiver::start().await;
    let a = hook_node(&redis, &db, &node_id("sweep", 1));
    let svc = enabled_service(&a).await;
    listen(&a, &svc, &rx.url("/hook")).await;
    let (alice, _) = Ws::hello(&a.ws_url(), &a.token(&svc, "alice"), None).await;
    let added = rx.next().await;
    assert_eq!(added.event(), "onUserAdded");
    let online = rx.next().await;
    assert_eq!(online.param("IsOnline"), "true");
    // The whole cluster dies and Redis loses its data: nobody is left to release alice.
    let stopped = a.kill9();
    drop(alice);
    let client = redis::Client::open(redis.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("FLUSHDB").query_async(&mut conn).await.unwrap();
    drop(stopped);
    // A new node, once joined and past the clean-ups' time, finds her recorded online and
    // held by nobody.
    let b = hook_node(&redis, &db, &node_id("sweep", 2));
    // (An event whose outcome A had not written yet may come again, with its token.)
    let offline = loop {
        let hook = rx.next().await;
        if hook.token() != added.token() && hook.token() != online.token() {
            break hook;
        }
    };
    assert_eq!(
        (offline.param("Identity"), offline.param("IsOnline")),
        ("alice", "false")
    );
    let r = b
        .client()
        .get(&format!("/v1/Services/{svc}/Users/alice"))
        .await;
    assert_eq!(r.body["is_online"], false);
    assert!(r.body["date_last_seen"].is_string(), "{}", r.text);
}
