//! The `reach` binary: `reach token` output verifies and is accepted by a gateway;
//! `reach watch` prints a line when a watched user comes online (text and JSON), and fails
//! clearly (with its documented exit status) for a bad URL, an unreachable server, a refused
//! token, unknown users and an expiring token.
//!
//! The gateway runs in-process (the reach-gateway library on a port-0 listener, with a
//! temporary SQLite file), on its own runtime, so these tests need no separately built
//! `reachd`; the `reach` binary is the one Cargo builds for this package.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use reach_gateway::auth::Credentials;
use reach_gateway::{Config, server};
use reach_store::sqlite::SqliteStore;

const ACCOUNT_SID: &str = "AC11111111111111111111111111111111";
const AUTH_TOKEN: &str = "cli-test-auth-token-1";
const KEY_SID: &str = "SK11111111111111111111111111111111";
const KEY_SECRET: &str = "cli-test-key-secret-1";
const WAIT: Duration = Duration::from_secs(10);

/// A gateway running in this process.
struct Gateway {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Gateway {
    fn start() -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("reachd.toml");
        std::fs::write(
            &config_path,
            format!(
                r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[storage]
sqlite_path = "{db}"

[presence]
heartbeat_interval_ms = 200
offline_grace_ms = 400
token_warning_s = 1

[[accounts]]
sid = "{ACCOUNT_SID}"
auth_token = "{AUTH_TOKEN}"

[[api_keys]]
sid = "{KEY_SID}"
secret = "{KEY_SECRET}"
account_sid = "{ACCOUNT_SID}"
"#,
                db = dir.path().join("reach.db").display()
            ),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let addr = rt.block_on(async {
            let config = Config::load(Some(&config_path)).expect("config");
            let store = SqliteStore::open(&config.storage.sqlite_path)
                .await
                .unwrap();
            let creds = Credentials::new(&config.accounts, &config.api_keys);
            let public = server::bind(config.server.listen, 128).unwrap();
            let admin = server::bind(config.server.admin_listen, 128).unwrap();
            let addr = public.local_addr().unwrap();
            let app = server::start(config, creds, Arc::new(store)).await.unwrap();
            tokio::spawn(server::run(app, public, admin, std::future::pending()));
            addr
        });
        Gateway {
            rt,
            addr,
            _dir: dir,
        }
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// A REST POST with the account's credentials; returns the JSON body.
    fn post(&self, path: &str, form: &[(&str, &str)]) -> serde_json::Value {
        let url = format!("http://{}{path}", self.addr);
        self.rt.block_on(async {
            let resp = reqwest::Client::new()
                .post(url)
                .basic_auth(ACCOUNT_SID, Some(AUTH_TOKEN))
                .form(form)
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success(), "{}", resp.status());
            resp.json().await.unwrap()
        })
    }

    /// A service with reachability enabled and the given users.
    fn service_with_users(&self, identities: &[&str]) -> String {
        let svc = self.post("/v1/Services", &[("FriendlyName", "cli")])["sid"]
            .as_str()
            .unwrap()
            .to_owned();
        self.post(
            &format!("/v1/Services/{svc}/Configuration"),
            &[("ReachabilityEnabled", "true")],
        );
        for id in identities {
            self.post(&format!("/v1/Services/{svc}/Users"), &[("Identity", id)]);
        }
        svc
    }
}

fn reach() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reach"));
    for (k, _) in std::env::vars() {
        if k.starts_with("REACH_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// `reach token` for `identity` in `service`; returns the token.
fn token(service: &str, identity: &str, ttl: i64) -> String {
    let out = reach()
        .args(["token", "--account", ACCOUNT_SID, "--key", KEY_SID])
        .args(["--secret", KEY_SECRET, "--service", service])
        .args(["--identity", identity, "--ttl", &ttl.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A running `reach watch` whose standard output arrives line by line.
struct Watch {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Watch {
    fn start(args: &[&str]) -> Watch {
        let mut child = reach()
            .arg("watch")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Watch { child, lines }
    }

    fn next_line(&self) -> String {
        self.lines
            .recv_timeout(WAIT)
            .expect("a line from reach watch within the wait")
    }

    /// Waits for the exit; returns the status code and standard error.
    fn wait(mut self) -> (Option<i32>, String) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(&mut self.child.stderr.take().unwrap(), &mut err)
                    .unwrap();
                return (status.code(), err);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "reach watch did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_watch(args: &[&str]) -> Output {
    reach().arg("watch").args(args).output().unwrap()
}

#[test]
fn token_prints_a_jwt_in_the_helper_library_format() {
    let service = "IS0123456789abcdef0123456789abcdef";
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let token = token(service, "alice", 600);
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, Algorithm::HS256);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    assert_eq!(header.cty.as_deref(), Some("twilio-fpa;v=1"));
    let data = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &DecodingKey::from_secret(KEY_SECRET.as_bytes()),
        &Validation::new(Algorithm::HS256),
    )
    .expect("the signature verifies with the key's secret");
    let c = data.claims;
    assert_eq!(c["iss"], KEY_SID);
    assert_eq!(c["sub"], ACCOUNT_SID);
    assert!(
        c["jti"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{KEY_SID}-"))
    );
    let exp = c["exp"].as_i64().unwrap();
    assert!((before + 600..=before + 602).contains(&exp), "{exp}");
    assert_eq!(
        c["grants"],
        serde_json::json!({"identity": "alice", "chat": {"service_sid": service}})
    );
    // Bad input: exit 2 and the option named.
    for (args, option) in [
        (["--service", "nope", "--ttl", "60"], "--service"),
        (["--service", service, "--ttl", "0"], "--ttl"),
        (["--service", service, "--ttl", "90000"], "--ttl"),
    ] {
        let out = reach()
            .args(["token", "--account", ACCOUNT_SID, "--key", KEY_SID])
            .args(["--secret", KEY_SECRET, "--identity", "alice"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(text(&out.stderr).contains(option), "{}", text(&out.stderr));
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn watch_prints_a_line_when_a_watched_user_comes_online() {
    let gw = Gateway::start();
    let svc = gw.service_with_users(&["alice"]);
    let bob = token(&svc, "bob", 3600);
    let url = gw.ws_url();
    let text_watch = Watch::start(&["--url", &url, "--token", &bob, "alice"]);
    let json_watch = Watch::start(&[
        "--url",
        &url,
        "--token",
        &bob,
        "--json",
        "--encoding",
        "json",
        "alice",
    ]);
    let first = text_watch.next_line();
    assert!(
        first.ends_with(" alice unknown notifiable=unknown reasons=subscribed"),
        "{first}"
    );
    let first = json_watch.next_line();
    let v: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(v["event"], "userSubscribed", "{first}");
    // alice connects, with a token that `reach token` minted.
    let alice = gw.rt.block_on(async {
        reach_client::Client::connect(&url, &token(&svc, "alice", 3600))
            .await
            .expect("the gateway accepts the minted token")
    });
    let line = text_watch.next_line();
    let (time, rest) = line.split_once(' ').unwrap();
    assert_eq!(time.len(), "2026-01-01T00:00:00Z".len(), "{line}");
    assert!(time.ends_with('Z'), "{line}");
    assert_eq!(
        rest,
        "alice online notifiable=unknown reasons=reachabilityOnline"
    );
    let v: serde_json::Value = serde_json::from_str(&json_watch.next_line()).unwrap();
    assert_eq!(v["event"], "userUpdated");
    assert_eq!(v["user"]["identity"], "alice");
    assert_eq!(v["user"]["isOnline"], true);
    assert_eq!(
        v["updateReasons"],
        serde_json::json!(["reachabilityOnline"])
    );
    drop(alice);
}

#[test]
fn watch_fails_clearly_with_its_exit_status() {
    let gw = Gateway::start();
    let svc = gw.service_with_users(&["alice"]);
    let bob = token(&svc, "bob", 3600);
    // A bad URL: 2.
    let out = run_watch(&[
        "--url",
        "http://127.0.0.1:1/v1/ws",
        "--token",
        &bob,
        "alice",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("invalid URL"),
        "{}",
        text(&out.stderr)
    );
    // Nobody listens: 4.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = run_watch(&[
        "--url",
        &format!("ws://127.0.0.1:{port}"),
        "--token",
        &bob,
        "alice",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("cannot reach"),
        "{}",
        text(&out.stderr)
    );
    // A refused token: 3.
    let out = run_watch(&["--url", &gw.ws_url(), "--token", "garbage", "alice"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("refused the access token (error 20101)"),
        "{}",
        text(&out.stderr)
    );
    // Nobody to watch: 1.
    let out = run_watch(&["--url", &gw.ws_url(), "--token", &bob, "nobody"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("cannot watch nobody (error 20404)"));
    // A token that expires while watching: 3, after saying so.
    let short = token(&svc, "bob", 2);
    let w = Watch::start(&["--url", &gw.ws_url(), "--token", &short, "alice"]);
    w.next_line();
    let (code, err) = w.wait();
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("expires soon"), "{err}");
    assert!(err.contains("access denied (error 20104"), "{err}");
}
