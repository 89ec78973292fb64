//! deploy/compose.yaml brought up by docker-compose: three reachd nodes, Redis, PostgreSQL and
//! Prometheus on the host's network. The nodes join one cluster (each lists the other two),
//! presence crosses them, Prometheus scrapes all three with the alerting rules loaded; then
//! everything is taken down with its volume.
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
use reach_proto::{ClientFrame, ServerFrame};
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
    let on = bob.update_of("alice").await;
    assert!(
        matches!(on, ServerFrame::UserUpdated { ref user, .. } if user.is_online == Some(true))
    );
    alice.send(&ClientFrame::Bye).await;
    let off = bob.update_of("alice").await;
    assert!(
        matches!(off, ServerFrame::UserUpdated { ref user, .. } if user.is_online == Some(false))
    );

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
}
