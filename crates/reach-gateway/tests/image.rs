//! The container image (deploy/Dockerfile, built here by deploy/image.sh) run by a real Docker
//! daemon: its health check, the README's REST walkthrough and one presence exchange against
//! it, then SIGTERM and the drain (goodbye, close 1001, exit 0 within the grace).
//!
//! Needs a Docker daemon and the image (`REACH_TEST_IMAGE`, default `reach/reachd:local`);
//! without either the test says `skipped: ...` on stderr and passes. `.ci/run` starts a daemon
//! (`dockerd --bridge=none --iptables=false`: containers use the host's network) and builds the
//! image first.

mod common;
mod ws_client;

use std::io::Write;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Rest, mint};
use reach_proto::{ClientFrame, ServerFrame};
use ws_client::Ws;

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("run docker")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A container, removed when dropped.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.0]);
    }
}

fn field(text: &str, label: &str) -> String {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("{label} missing in {text}"))
}

#[tokio::test]
async fn the_image_serves_rest_and_presence_and_drains_on_sigterm() {
    let image = std::env::var("REACH_TEST_IMAGE").unwrap_or_else(|_| "reach/reachd:local".into());
    let skip = |why: &str| {
        // Straight to stderr: the harness hides an eprintln! of a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "skipped: container image test: {why} (the_image_serves_rest_and_presence_and_drains_on_sigterm)"
        );
    };
    match Command::new("docker").arg("info").output() {
        Ok(o) if o.status.success() => {}
        _ => return skip("no Docker daemon answers"),
    }
    if !docker(&["image", "inspect", &image]).status.success() {
        return skip(&format!("image {image} not built (deploy/image.sh)"));
    }

    let (port, admin) = (free_port(), free_port());
    let listen = format!("REACH_SERVER__LISTEN=127.0.0.1:{port}");
    let admin_listen = format!("REACH_SERVER__ADMIN_LISTEN=127.0.0.1:{admin}");
    let run = docker(&[
        "run",
        "-d",
        "--network",
        "host",
        "-e",
        &listen,
        "-e",
        &admin_listen,
        "-e",
        "REACH_PRESENCE__OFFLINE_GRACE_MS=1000",
        "-e",
        "REACH_SERVER__DRAIN_GRACE_MS=8000",
        &image,
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let container = Container(String::from_utf8_lossy(&run.stdout).trim().to_owned());
    let id = container.0.clone();

    // Ready, and healthy by its own health check.
    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = reqwest::get(format!("http://127.0.0.1:{admin}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready: {:?}",
            docker(&["logs", &id])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let health = docker(&["inspect", "--format", "{{.State.Health.Status}}", &id]);
        if String::from_utf8_lossy(&health.stdout).trim() == "healthy" {
            break;
        }
        assert!(Instant::now() < deadline, "never healthy");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let healthy = started.elapsed();
    // It runs as its unprivileged user, with its data in the volume.
    let user = docker(&["exec", &id, "id", "-u"]);
    assert_eq!(String::from_utf8_lossy(&user.stdout).trim(), "10001");

    // The README's walkthrough: the generated credentials, a service, reachability, a user.
    let creds = docker(&["exec", &id, "reachd", "credentials"]);
    let creds = String::from_utf8_lossy(&creds.stdout).into_owned();
    let (account, auth_token) = (field(&creds, "Account SID:"), field(&creds, "Auth token:"));
    let (key, secret) = (
        field(&creds, "API key SID:"),
        field(&creds, "API key secret:"),
    );
    let rest = Rest {
        base: format!("http://127.0.0.1:{port}"),
        user: account.clone(),
        password: auth_token,
    };
    let svc = rest.create_service("image").await;
    rest.set_reachability(&svc, true).await;
    let r = rest
        .post(
            &format!("/v1/Services/{svc}/Users"),
            &[("Identity", "alice"), ("FriendlyName", "Alice")],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["is_online"], serde_json::Value::Null);

    // bob watches alice; alice comes and says bye.
    let url = format!("ws://127.0.0.1:{port}/v1/ws");
    let token = |identity: &str| mint(&key, &secret, &account, &svc, identity, 600);
    let (mut bob, _) = Ws::hello(&url, &token("bob"), None).await;
    bob.request(ClientFrame::Subscribe {
        id: 1,
        identities: vec!["alice".into()],
    })
    .await;
    let (mut alice, _) = Ws::hello(&url, &token("alice"), None).await;
    assert_eq!(bob.is_online_of("alice").await, Some(true));
    alice.send(&ClientFrame::Bye).await;
    assert_eq!(bob.is_online_of("alice").await, Some(false));
    let r = rest.get(&format!("/v1/Services/{svc}/Users/alice")).await;
    assert_eq!(r.body["is_online"], false);

    // SIGTERM (the image's STOPSIGNAL): goodbye and 1001 to bob, exit 0 within the grace.
    let stopped = Instant::now();
    let stop = {
        let id = id.clone();
        tokio::task::spawn_blocking(move || docker(&["stop", "--time", "20", &id]))
    };
    let closed = bob.closed().await;
    assert!(
        closed
            .frames
            .iter()
            .any(|f| matches!(f, ServerFrame::Goodbye { .. })),
        "{closed:?}"
    );
    assert_eq!(closed.code, Some(1001));
    assert!(stop.await.unwrap().status.success());
    let took = stopped.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "drained in {took:?}, the grace is 8 s"
    );
    let code = docker(&["inspect", "--format", "{{.State.ExitCode}}", &id]);
    assert_eq!(String::from_utf8_lossy(&code.stdout).trim(), "0");
    let logs = docker(&["logs", &id]);
    let logs = String::from_utf8_lossy(&logs.stderr);
    assert!(
        logs.contains("SIGTERM: draining") && logs.contains("drained; bye"),
        "{logs}"
    );
    let _ = writeln!(
        std::io::stderr(),
        "image {image}: /readyz 200 after {ready:.1?}, healthy (the first health check runs at its 10 s interval) after {healthy:.1?}, drained and exited 0 {took:.1?} after SIGTERM"
    );
}
