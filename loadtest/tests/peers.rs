//! The harness's peer drivers end to end: the smoke scenario (rooms with churn, two worker
//! processes) against a Mosquitto and a Soketi started by the test on free loopback ports. Each
//! test skips, saying why, when its peer is not installed (loadtest/peers/install.sh), so the
//! default test run needs neither Debian's mosquitto nor npm.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A peer server started for one test; killed when dropped.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(peer: &mut Peer, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            peer.0.try_wait().unwrap().is_none(),
            "the peer exited at start"
        );
        assert!(
            Instant::now() < deadline,
            "the peer never listened on {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the smoke scenario against `target` and checks it ran clean.
fn smoke(target: &str, url: &str, pid: u32, out: &Path) {
    let harness = PathBuf::from(env!("CARGO_BIN_EXE_reach-loadtest"));
    let status = Command::new(&harness)
        .current_dir(root().parent().unwrap())
        .args(["run", "--quiet", "--strict", "--scenario"])
        .arg(root().join("scenarios/smoke.toml"))
        .arg(format!("--target={target}"))
        .arg(format!("--url={url}"))
        .arg(format!("--server-pid={pid}"))
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .status()
        .expect("run reach-loadtest");
    assert!(status.success(), "reach-loadtest failed: {status}");
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("result.json")).unwrap()).unwrap();
    assert!(result["correctness"]["matched"].as_u64().unwrap() > 0);
    assert_eq!(result["correctness"]["missed"], 0);
    assert_eq!(result["correctness"]["spurious"], 0);
    assert!(result["server"]["loaded_rss_bytes"].as_u64().unwrap() > 0);
    let _ = std::fs::remove_dir_all(out);
}

fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn smoke_scenario_runs_clean_against_mosquitto() {
    if !installed("mosquitto") {
        skip("mosquitto not installed (loadtest/peers/install.sh mosquitto)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("reach-peer-mqtt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_connections -1\nlog_dest stderr\nlog_type error\n"
        ),
    )
    .unwrap();
    let mut peer = Peer(
        Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .spawn()
            .expect("start mosquitto"),
    );
    wait_listening(&mut peer, port);
    smoke(
        "mqtt",
        &format!("mqtt://127.0.0.1:{port}"),
        peer.0.id(),
        &dir.join("out"),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn smoke_scenario_runs_clean_against_soketi() {
    let server = root().join("peers/soketi/node_modules/@soketi/soketi/bin/server.js");
    if !server.exists() || !installed("node") {
        skip("soketi not installed (loadtest/peers/install.sh soketi)");
        return;
    }
    let (port, metrics, cluster) = (free_port(), free_port(), free_port());
    // The same settings as loadtest/peers/start.sh, on free ports.
    let mut peer = Peer(
        Command::new("node")
            .arg(&server)
            .arg("start")
            .arg(format!(
                "--config={}",
                root().join("peers/soketi.json").display()
            ))
            .env("SOKETI_DEFAULT_APP_ID", "loadtest-fixture-app")
            .env("SOKETI_DEFAULT_APP_KEY", "loadtest-fixture-key")
            .env("SOKETI_DEFAULT_APP_SECRET", "loadtest-fixture-secret")
            .env("SOKETI_HOST", "127.0.0.1")
            .env("SOKETI_PORT", port.to_string())
            .env("SOKETI_METRICS_HOST", "127.0.0.1")
            .env("SOKETI_METRICS_SERVER_PORT", metrics.to_string())
            .env("SOKETI_CLUSTER_HOST", "127.0.0.1")
            .env("SOKETI_CLUSTER_UNICAST_ADDRESSES", "127.0.0.1")
            .env("SOKETI_CLUSTER_BROADCAST_ADDRESS", "127.255.255.255")
            .env("SOKETI_CLUSTER_PORT", cluster.to_string())
            .env("SOKETI_PRESENCE_MAX_MEMBERS", "1000000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start soketi"),
    );
    wait_listening(&mut peer, port);
    let out = std::env::temp_dir().join(format!("reach-peer-pusher-{}", std::process::id()));
    smoke(
        "pusher",
        &format!("ws://127.0.0.1:{port}"),
        peer.0.id(),
        &out,
    );
}

/// Says why a test does not run, straight to the process's stderr (libtest captures
/// `eprintln!` of a passing test), so `.ci/test` can count it.
fn skip(why: &str) {
    use std::io::Write as _;
    let _ = std::io::stderr().write_all(format!("skipped: {why}\n").as_bytes());
}
