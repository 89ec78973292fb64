//! deploy/compose.yaml brought up by docker-compose: three reachd nodes behind HAProxy, Redis,
//! PostgreSQL and Prometheus on the host's network. The nodes join one cluster (each lists the
//! other two), presence crosses them, Prometheus scrapes all three with the alerting rules
//! loaded; then a rolling update (each node restarted in turn, as docs/operations.md says) with
//! 30 users and 3 watchers connected through HAProxy: no watcher sees anyone go offline, and the
//! figures are printed. Then everything is taken down with its volume.
//!
//! Opt-in (`REACH_TEST_COMPOSE=1`, with the images of Redis, PostgreSQL and Prometheus named by
//! `REACH_REDIS_IMAGE`, `REACH_POSTGRES_IMAGE`, `REACH_PROMETHEUS_IMAGE` when the official
//! ones cannot be pulled): it takes the fixed ports the compose file names (8081-8083,
//! 9091-9093, 6390, 5442, 9099). `.ci/run` builds the images (deploy/image.sh,
//! deploy/local/images.sh) and sets it; otherwise the test says `skipped: ...` and passes.

mod common;
mod ws_client;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Rest, mint};
use futures_util::StreamExt;
use reach_client::{Client, ClientEvent, ConnectionState, ReconnectPolicy};
use reach_proto::ClientFrame;
use ws_client::Ws;

/// The example credentials of config/cluster.toml, which the compose file mounts.
const ACCOUNT: &str = "AC00000000000000000000000000000001";
const AUTH_TOKEN: &str = "example-auth-token-replace-me";
const KEY: &str = "SK00000000000000000000000000000001";
const SECRET: &str = "example-key-secret-replace-me";
const PROJECT: &str = "reach-compose-test";

fn compose(args: &[&str]) -> std::process::Output {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/compose.yaml");
    Command::new("docker-compose")
        .args(["-f", file, "-p", PROJECT])
        .args(args)
        .output()
        .expect("run docker-compose")
}

/// Takes everything down (containers and the PostgreSQL volume) when dropped.
struct Up;

impl Drop for Up {
    fn drop(&mut self) {
        let _ = compose(&["down", "-v", "--timeout", "20"]);
    }
}

async fn eventually<F, Fut>(wait: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + wait;
    while !f().await {
        assert!(Instant::now() < deadline, "not within {wait:?}: {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn the_compose_file_runs_a_cluster_that_prometheus_scrapes() {
    if std::env::var("REACH_TEST_COMPOSE").as_deref() != Ok("1") {
        let _ = writeln!(
            std::io::stderr(),
            "skipped: compose test: REACH_TEST_COMPOSE is not 1 (the_compose_file_runs_a_cluster_that_prometheus_scrapes)"
        );
        return;
    }
    let _ = compose(&["down", "-v"]);
    let up = compose(&["up", "-d"]);
    assert!(
        up.status.success(),
        "docker-compose up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let _up = Up;

    // Three nodes ready, each seeing the two others.
    for admin in [9091, 9092, 9093] {
        eventually(
            Duration::from_secs(60),
            "a node sees its two peers",
            || async move {
                let Ok(r) = reqwest::get(format!("http://127.0.0.1:{admin}/debug/status")).await
                else {
                    return false;
                };
                let status: serde_json::Value = r.json().await.unwrap_or_default();
                status["ready"] == true
                    && status["cluster"]["peers"]
                        .as_array()
                        .is_some_and(|p| p.len() == 2)
            },
        )
        .await;
    }

    // Presence crosses the nodes: bob at node 3 watches alice at node 2.
    let rest = Rest {
        base: "http://127.0.0.1:8081".into(),
        user: ACCOUNT.into(),
        password: AUTH_TOKEN.into(),
    };
    let svc = rest.create_service("compose").await;
    rest.set_reachability(&svc, true).await;
    let r = rest
        .post(
            &format!("/v1/Services/{svc}/Users"),
            &[("Identity", "alice")],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let token = |identity: &str| mint(KEY, SECRET, ACCOUNT, &svc, identity, 600);
    let (mut bob, _) = Ws::hello("ws://127.0.0.1:8083/v1/ws", &token("bob"), None).await;
    bob.request(ClientFrame::Subscribe {
        id: 1,
        identities: vec!["alice".into()],
    })
    .await;
    let (mut alice, _) = Ws::hello("ws://127.0.0.1:8082/v1/ws", &token("alice"), None).await;
    assert_eq!(bob.is_online_of("alice").await, Some(true));
    alice.send(&ClientFrame::Bye).await;
    assert_eq!(bob.is_online_of("alice").await, Some(false));

    // Prometheus scrapes the three, with the alerting rules loaded.
    eventually(Duration::from_secs(60), "3 targets up", || async {
        let Ok(r) = reqwest::get(
            "http://127.0.0.1:9099/api/v1/query?query=sum(up%7Bjob%3D%22reachd%22%7D)",
        )
        .await
        else {
            return false;
        };
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        v["data"]["result"][0]["value"][1] == "3"
    })
    .await;
    let rules: serde_json::Value = reqwest::get("http://127.0.0.1:9099/api/v1/rules")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let loaded = rules["data"]["groups"][0]["rules"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(loaded, 8, "{rules}");

    rolling_update(&rest, &svc, &token).await;
}

/// docs/operations.md's upgrade of a cluster, measured: each node restarted in turn while 30
/// users and 3 watchers of all of them stay connected through HAProxy.
async fn rolling_update(rest: &Rest, svc: &str, token: &impl Fn(&str) -> String) {
    const USERS: usize = 30;
    let through = "ws://127.0.0.1:8090/v1/ws";
    let connect = |identity: String| {
        let t = token(&identity);
        async move {
            Client::builder(through, t)
                .reconnect(ReconnectPolicy::exponential(
                    Duration::from_millis(100),
                    Duration::from_secs(2),
                ))
                .connect()
                .await
                .unwrap()
        }
    };
    let names: Vec<String> = (0..USERS).map(|i| format!("u{i}")).collect();
    let mut users = Vec::new();
    for name in &names {
        users.push(connect(name.clone()).await);
    }
    // Watchers record every user they see go offline.
    let offline = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut watchers = Vec::new();
    for w in 0..3 {
        let watcher = connect(format!("watcher{w}")).await;
        let mut events = watcher.events();
        let subscribed = watcher.subscribe_users(names.clone()).await.unwrap();
        assert!(subscribed.errors.is_empty(), "{:?}", subscribed.errors);
        let seen = std::sync::Arc::clone(&offline);
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                if let ClientEvent::UserUpdated { user, .. } = event
                    && user.is_online() == Some(false)
                {
                    seen.lock().unwrap().push(user.identity().to_owned());
                }
            }
        });
        watchers.push(watcher);
    }
    let all_online = || async {
        for name in &names {
            let r = rest.get(&format!("/v1/Services/{svc}/Users/{name}")).await;
            if r.body["is_online"] != true {
                return false;
            }
        }
        true
    };
    eventually(Duration::from_secs(30), "every user online", all_online).await;

    for node in ["reachd-1", "reachd-2", "reachd-3"] {
        let admin = 9090 + node[7..].parse::<u16>().unwrap();
        let started = Instant::now();
        let restart = tokio::task::spawn_blocking(move || compose(&["restart", "-t", "20", node]));
        // The node drains: its clients move to the other nodes.
        let out = restart.await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let restarted = started.elapsed();
        eventually(
            Duration::from_secs(60),
            "the node ready again",
            || async move {
                reqwest::get(format!("http://127.0.0.1:{admin}/readyz"))
                    .await
                    .is_ok_and(|r| r.status() == 200)
            },
        )
        .await;
        let ready = started.elapsed();
        eventually(
            Duration::from_secs(60),
            "every client connected",
            || async {
                users
                    .iter()
                    .chain(&watchers)
                    .all(|c| c.connection_state() == ConnectionState::Connected)
            },
        )
        .await;
        eventually(Duration::from_secs(30), "every user online", all_online).await;
        let _ = writeln!(
            std::io::stderr(),
            "rolling update: {node} restarted in {:.1} s, ready after {:.1} s, every client connected and online after {:.1} s; users seen offline so far: {}",
            restarted.as_secs_f64(),
            ready.as_secs_f64(),
            started.elapsed().as_secs_f64(),
            offline.lock().unwrap().len()
        );
    }
    let seen = offline.lock().unwrap().clone();
    assert!(
        seen.is_empty(),
        "users seen offline during the rolling update: {seen:?}"
    );
}
