//! Test fixture: starts the real `reachd` binary on port 0 with a temporary SQLite file and
//! talks to it over real sockets.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine as _;

/// Test fixture credentials (not secrets: they exist only in these tests).
pub const ACCOUNT_SID: &str = "AC11111111111111111111111111111111";
pub const AUTH_TOKEN: &str = "test-fixture-auth-token-1";
pub const KEY_SID: &str = "SK11111111111111111111111111111111";
pub const KEY_SECRET: &str = "test-fixture-key-secret-1";
pub const OTHER_ACCOUNT_SID: &str = "AC22222222222222222222222222222222";
pub const OTHER_AUTH_TOKEN: &str = "test-fixture-auth-token-2";
pub const OTHER_KEY_SID: &str = "SK22222222222222222222222222222222";
pub const OTHER_KEY_SECRET: &str = "test-fixture-key-secret-2";

/// A running reachd.
pub struct Reachd {
    child: Option<Child>,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    extra: String,
    env: Vec<(String, String)>,
    lines: mpsc::Receiver<String>,
    startup: Vec<String>,
}

fn config_text(dir: &Path, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
drain_grace_ms = 3000
drain_retry_max_ms = 2000

[storage]
sqlite_path = "{db}"

[log]
format = "json"
filter = "info"

[[accounts]]
sid = "{ACCOUNT_SID}"
auth_token = "{AUTH_TOKEN}"

[[accounts]]
sid = "{OTHER_ACCOUNT_SID}"
auth_token = "{OTHER_AUTH_TOKEN}"

[[api_keys]]
sid = "{KEY_SID}"
secret = "{KEY_SECRET}"
account_sid = "{ACCOUNT_SID}"

[[api_keys]]
sid = "{OTHER_KEY_SID}"
secret = "{OTHER_KEY_SECRET}"
account_sid = "{OTHER_ACCOUNT_SID}"
{extra}
"#,
        db = dir.join("reach.db").display()
    )
}

impl Reachd {
    /// Starts reachd with the fixture accounts; `extra` is appended to the config file
    /// (e.g. a `[presence]` section with short intervals).
    pub fn start(extra: &str) -> Reachd {
        Self::start_with_env(extra, &[])
    }

    pub fn start_with_env(extra: &str, env: &[(&str, &str)]) -> Reachd {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_owned();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::spawn(dir, Some(tmp), extra.to_owned(), env)
    }

    fn spawn(
        dir: PathBuf,
        tmp: Option<tempfile::TempDir>,
        extra: String,
        env: Vec<(String, String)>,
    ) -> Reachd {
        let config = dir.join("reachd.toml");
        std::fs::write(&config, config_text(&dir, &extra)).expect("write config");
        // `ULIMIT_NOFILE` (a fixture setting, not reachd's): start it under that open-file limit.
        let mut cmd = match env.iter().find(|(k, _)| k == "ULIMIT_NOFILE") {
            Some((_, n)) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", "ulimit -n \"$1\" && shift && exec \"$@\"", "sh", n])
                    .arg(env!("CARGO_BIN_EXE_reachd"));
                sh
            }
            None => Command::new(env!("CARGO_BIN_EXE_reachd")),
        };
        cmd.arg("--config").arg(&config).env_remove("RUST_LOG");
        for (k, v) in env.iter().filter(|(k, _)| k != "ULIMIT_NOFILE") {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start reachd");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("REACH_TEST_LOGS").is_some() {
                    eprintln!("reachd: {line}");
                }
                let _ = tx.send(line);
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut startup = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                let status = child.wait();
                panic!("reachd did not become ready (exit: {status:?})");
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                startup.push(line);
                continue;
            };
            if v["message"] != "reachd ready" {
                startup.push(line);
            } else {
                let http = v["listen"].as_str().unwrap().parse().unwrap();
                let admin = v["admin"].as_str().unwrap().parse().unwrap();
                return Reachd {
                    child: Some(child),
                    http,
                    admin,
                    dir,
                    _tmp: tmp,
                    extra,
                    env,
                    lines: rx,
                    startup,
                };
            }
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.http)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, then start again on the same data folder (new ports).
    pub fn kill9_and_restart(mut self) -> Reachd {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let tmp = self._tmp.take();
        Self::spawn(self.dir.clone(), tmp, self.extra.clone(), self.env.clone())
    }

    /// SIGKILL; [`Stopped::restart`] starts it again on the same data folder and settings.
    pub fn kill9(mut self) -> Stopped {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        Stopped {
            dir: self.dir.clone(),
            tmp: self._tmp.take(),
            extra: self.extra.clone(),
            env: self.env.clone(),
        }
    }

    /// SIGTERM (a drain) and the exit; [`Stopped::restart`] starts it again on the same data
    /// folder and settings.
    pub fn stop(mut self) -> Stopped {
        let dir = self.dir.clone();
        let tmp = self._tmp.take();
        let (extra, env) = (self.extra.clone(), self.env.clone());
        let status = self.terminate();
        assert!(status.success(), "reachd exited with {status}");
        Stopped {
            dir,
            tmp,
            extra,
            env,
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "reachd did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log lines written before `reachd ready`.
    pub fn startup_logs(&self) -> &[String] {
        &self.startup
    }

    /// Log lines seen so far (JSON), without waiting.
    pub fn drain_logs(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn client(&self) -> Rest {
        Rest {
            base: self.base(),
            user: ACCOUNT_SID.into(),
            password: AUTH_TOKEN.into(),
        }
    }

    pub fn client_as(&self, user: &str, password: &str) -> Rest {
        Rest {
            base: self.base(),
            user: user.into(),
            password: password.into(),
        }
    }

    /// A token for `identity` in `service`, signed with the fixture key of the first account.
    pub fn token(&self, service: &str, identity: &str) -> String {
        mint(KEY_SID, KEY_SECRET, ACCOUNT_SID, service, identity, 3600)
    }
}

/// A reachd killed by [`Reachd::kill9`].
pub struct Stopped {
    dir: PathBuf,
    tmp: Option<tempfile::TempDir>,
    extra: String,
    env: Vec<(String, String)>,
}

impl Stopped {
    pub fn restart(self) -> Reachd {
        Reachd::spawn(self.dir, self.tmp, self.extra, self.env)
    }
}

impl Drop for Reachd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Creates user `identity` in `svc` over REST (as the first fixture account).
pub async fn create_user(d: &Reachd, svc: &str, identity: &str) {
    let r = d
        .client()
        .post(
            &format!("/v1/Services/{svc}/Users"),
            &[("Identity", identity)],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Mints a token with arbitrary claims, the way the helper libraries do.
pub fn mint(
    key_sid: &str,
    secret: &str,
    account: &str,
    service: &str,
    identity: &str,
    ttl: i64,
) -> String {
    let claims = serde_json::json!({
        "jti": format!("{key_sid}-{}", now()),
        "iss": key_sid,
        "sub": account,
        "exp": now() + ttl,
        "grants": {"identity": identity, "chat": {"service_sid": service}}
    });
    sign(&claims, secret)
}

pub fn sign(claims: &serde_json::Value, secret: &str) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.typ = Some("JWT".into());
    header.cty = Some("twilio-fpa;v=1".into());
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A REST client with HTTP Basic credentials.
pub struct Rest {
    pub base: String,
    pub user: String,
    pub password: String,
}

pub struct Response {
    pub status: u16,
    pub body: serde_json::Value,
    pub text: String,
}

impl Rest {
    fn auth(&self) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", self.user, self.password))
        )
    }

    pub async fn request(&self, method: &str, path: &str, form: &[(&str, &str)]) -> Response {
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{}", self.base, path)
        };
        let client = reqwest::Client::new();
        let mut req = client
            .request(method.parse().unwrap(), url)
            .header("Authorization", self.auth());
        if !form.is_empty() {
            let body = form
                .iter()
                .map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v)))
                .collect::<Vec<_>>()
                .join("&");
            req = req
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(body);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        Response { status, body, text }
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[]).await
    }
    pub async fn post(&self, path: &str, form: &[(&str, &str)]) -> Response {
        self.request("POST", path, form).await
    }
    pub async fn delete(&self, path: &str) -> Response {
        self.request("DELETE", path, &[]).await
    }

    /// Creates a service and returns its SID.
    pub async fn create_service(&self, name: &str) -> String {
        let r = self.post("/v1/Services", &[("FriendlyName", name)]).await;
        assert_eq!(r.status, 201, "{}", r.text);
        r.body["sid"].as_str().unwrap().to_owned()
    }

    pub async fn set_reachability(&self, service: &str, enabled: bool) {
        let r = self
            .post(
                &format!("/v1/Services/{service}/Configuration"),
                &[(
                    "ReachabilityEnabled",
                    if enabled { "true" } else { "false" },
                )],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
}

/// `s` with everything but RFC 3986's unreserved characters percent-escaped.
pub fn urlencode(s: &str) -> String {
    const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

// Redis and PostgreSQL of the cluster tests (tests/cluster.rs, tests/observability.rs).

/// The servers named by the environment, or `None` after saying the test is skipped.
pub fn servers(test: &str) -> Option<(String, String)> {
    match (
        std::env::var("REACH_TEST_REDIS_URL"),
        std::env::var("REACH_TEST_POSTGRES_URL"),
    ) {
        (Ok(r), Ok(p)) if !r.is_empty() && !p.is_empty() => Some((r, p)),
        _ => {
            // Straight to stderr: the test harness would hide an eprintln! of a passing test.
            let _ = std::io::Write::write_fmt(
                &mut std::io::stderr(),
                format_args!(
                    "skipped: {test}: REACH_TEST_REDIS_URL and REACH_TEST_POSTGRES_URL are not both set\n"
                ),
            );
            None
        }
    }
}

/// A PostgreSQL database of the test's own, dropped at the end.
pub struct TestDb {
    admin_url: String,
    name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create(admin_url: &str) -> TestDb {
        let name = format!("reach_cluster_test_{:016x}", rand_u64());
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(admin_url)
            .await
            .expect("connect to REACH_TEST_POSTGRES_URL");
        sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create test database");
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url, |(base, _)| base);
        TestDb {
            admin_url: admin_url.to_owned(),
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut c) = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await {
                    let _ = sqlx::Executor::execute(
                        &mut c,
                        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str(),
                    )
                    .await;
                }
            });
        })
        .join();
    }
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// `url` with its database number replaced by `db`: each test keeps its node registry in a
/// Redis database of its own, so nodes of tests running at the same time never clean up after
/// each other.
pub fn redis_db(url: &str, db: u32) -> String {
    let base = match url.rsplit_once('/') {
        Some((base, last)) if !base.ends_with('/') && last.chars().all(|c| c.is_ascii_digit()) => {
            base
        }
        _ => url.trim_end_matches('/'),
    };
    format!("{base}/{db}")
}
