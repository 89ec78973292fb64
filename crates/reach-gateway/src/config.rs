//! `reachd` configuration: documented defaults, then the TOML file (`--config`), then
//! environment variables `REACH_<SECTION>__<KEY>` (e.g. `REACH_SERVER__LISTEN=0.0.0.0:8080`).
//! Everything is validated at start-up; a bad value exits non-zero with the key named.
//!
//! `config/reachd.toml` lists every key with its default and meaning.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};

/// What a client sent away by a drain needs, after `goodbye.retry_after_ms`, to be back (its
/// reconnect and `hello`) before its grace ends: [`Config::warnings`].
pub const DRAIN_RECONNECT_MARGIN_MS: u64 = 1_000;
use reach_proto::{AccountSid, ApiKeySid};
use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub cluster: ClusterConfig,
    pub presence: PresenceConfig,
    pub limits: LimitsConfig,
    pub webhooks: WebhooksConfig,
    pub log: LogConfig,
    pub accounts: Vec<AccountConfig>,
    pub api_keys: Vec<ApiKeyConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// REST API and WebSocket (`/v1/ws`).
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: SocketAddr,
    /// Base of the absolute URLs in REST responses, e.g. `https://reach.example.com`. Empty:
    /// `http://` plus the request's `Host` header.
    pub public_url: String,
    /// On SIGTERM/SIGINT, how long to wait for sockets to close after `goodbye`.
    pub drain_grace_ms: u64,
    /// Upper bound of the jittered `retry_after_ms` sent in `goodbye`.
    pub drain_retry_max_ms: u64,
    /// Listen backlog of the public listener.
    pub backlog: u32,
    /// Runtime worker threads; 0 means one per CPU core.
    pub worker_threads: usize,
    /// A connection must send a whole request head within this long, from its accept and
    /// again after each response on a kept-alive connection; else it is closed.
    pub header_read_timeout_ms: u64,
    /// A kept-alive connection with no request in flight for this long after its last
    /// response is closed (it cannot be idle for longer than `header_read_timeout_ms` either).
    pub keepalive_idle_timeout_ms: u64,
    /// A TLS handshake must complete within this long.
    pub tls_handshake_timeout_ms: u64,
    /// PEM certificate chain of the public listener: with `tls_key_path`, REST is served
    /// over HTTPS and sockets over `wss://`. Empty: plain HTTP and `ws://`. Reloaded on SIGHUP.
    pub tls_cert_path: PathBuf,
    /// PEM private key of `tls_cert_path` (PKCS#8, PKCS#1 or SEC1).
    pub tls_key_path: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".parse().expect("valid default"),
            admin_listen: "127.0.0.1:9090".parse().expect("valid default"),
            public_url: String::new(),
            drain_grace_ms: 10_000,
            drain_retry_max_ms: 2_500,
            backlog: 4096,
            worker_threads: 0,
            header_read_timeout_ms: 10_000,
            keepalive_idle_timeout_ms: 5_000,
            tls_handshake_timeout_ms: 10_000,
            tls_cert_path: PathBuf::new(),
            tls_key_path: PathBuf::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// The SQLite file; its folder also keeps generated credentials.
    pub sqlite_path: PathBuf,
    /// `postgres://user:password@host:port/database`: keep the records in PostgreSQL instead
    /// of SQLite (required in a cluster). Empty: SQLite.
    pub postgres_url: String,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            sqlite_path: PathBuf::from("data/reach.db"),
            postgres_url: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://host:port/db`: join the cluster whose nodes share this Redis. Empty: a single
    /// node.
    pub redis_url: String,
    /// This node's id, unique in the cluster (letters, digits, `-`, `_`, `.`). Empty: a
    /// random one at each start.
    pub node_id: String,
    /// A node that stops renewing its liveness for this long counts as dead; its users go
    /// offline after the offline grace unless they reconnect elsewhere.
    pub node_ttl_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis_url: String::new(),
            node_id: String::new(),
            node_ttl_ms: 3_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// Interval of the server's WebSocket pings, and the client ping interval announced in
    /// `welcome`.
    pub heartbeat_interval_ms: u64,
    /// A connection that sends nothing for this long is closed with 4008.
    pub heartbeat_timeout_ms: u64,
    /// How long a user stays online after its last connection ended abruptly.
    pub offline_grace_ms: u64,
    /// Time allowed between the upgrade and `hello`.
    pub auth_timeout_ms: u64,
    /// `token_about_to_expire` is sent this many seconds before the token expires.
    pub token_warning_s: u64,
    /// Subscriptions one connection may hold (its own user not counted).
    pub max_subscriptions_per_connection: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            heartbeat_interval_ms: 10_000,
            heartbeat_timeout_ms: 30_000,
            offline_grace_ms: 5_000,
            auth_timeout_ms: 10_000,
            token_warning_s: 180,
            max_subscriptions_per_connection: 1_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open WebSockets; one more is answered with an error and close 4029.
    pub max_connections: usize,
    /// Largest WebSocket message accepted; larger ones close with 1009.
    pub max_frame_bytes: usize,
    /// Bytes queued for one connection before it is closed with 4009.
    pub max_outbox_bytes: usize,
    /// A socket whose writes make no progress for this long is closed with 4009.
    pub write_stall_timeout_ms: u64,
    /// Read buffer of each socket (tungstenite's `read_buffer_size`).
    pub read_buffer_bytes: usize,
    /// 0 (the default): whole messages, written once per batch. Otherwise messages longer
    /// than this go out as WebSocket fragments of this size, and a socket writes whenever
    /// this much is buffered, so its write buffer stays near twice this while it is busy
    /// (more write calls, less memory per busy socket; a quiet socket is parked
    /// without buffers either way).
    pub write_fragment_bytes: usize,
    /// Connections that are not authenticated sockets yet (HTTP connections, and upgraded
    /// sockets before `welcome`), in all; one more is closed at once.
    pub max_pending_connections: usize,
    /// The same, per source address (IPv6: per /64).
    pub max_pending_per_address: usize,
    /// REST requests per second per account (a token bucket; 0: no limit). Past the burst a
    /// request is answered 429, code 20429, with `Retry-After`.
    pub rest_requests_per_second: u32,
    /// Requests an account may make at once before the rate applies.
    pub rest_request_burst: u32,
    /// Failed authentications (REST credentials, `hello` tokens) per source address and
    /// minute (0: no limit). Past the burst, everything that address sends to authenticate is
    /// refused (REST 429 / `error` 20429 and close 4029) until the bucket refills.
    pub auth_failures_per_minute: u32,
    /// Failed authentications an address may make at once before the rate applies.
    pub auth_failure_burst: u32,
    /// Frames (WebSocket messages, pings included) an authenticated socket may send per
    /// second (0: no limit). Past the burst each one is refused with `error` 20429; another
    /// burst's worth refused in a row closes the socket with 4029.
    pub socket_frames_per_second: u32,
    /// Frames a socket may send at once before the rate applies.
    pub socket_frame_burst: u32,
    /// Identities one `subscribe` or `unsubscribe` may name; more: `error` 20429.
    pub max_identities_per_request: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 10_000,
            max_frame_bytes: 65_536,
            max_outbox_bytes: 1 << 20,
            write_stall_timeout_ms: 10_000,
            read_buffer_bytes: 128,
            write_fragment_bytes: 0,
            max_pending_connections: 4_096,
            max_pending_per_address: 512,
            rest_requests_per_second: 500,
            rest_request_burst: 1_000,
            auth_failures_per_minute: 10,
            auth_failure_burst: 20,
            socket_frames_per_second: 50,
            socket_frame_burst: 500,
            max_identities_per_request: 500,
        }
    }
}

/// Delivery of webhook events (`docs/webhooks.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// One attempt may take this long (connect, send, the receiver's answer); then it counts as
    /// failed and is retried.
    pub timeout_ms: u64,
    /// Delay before the first retry; each next one doubles, up to `retry_max_ms`, with jitter.
    pub retry_initial_ms: u64,
    /// Longest delay between two attempts.
    pub retry_max_ms: u64,
    /// Attempts of one event, the first included, before it is given up.
    pub max_attempts: u32,
    /// An event not delivered this long after it was recorded is given up.
    pub max_age_ms: u64,
    /// Requests in flight from this node at once.
    pub max_in_flight: usize,
    /// How long a node holds an event it is delivering before another node may take it (the
    /// node died): more than `timeout_ms`.
    pub lease_ms: u64,
    /// How often a node looks for events to deliver besides being woken by its own (new
    /// events recorded by other nodes, retries that came due).
    pub poll_interval_ms: u64,
    /// Presence changes are written to the store in batches at most this far apart.
    pub record_batch_ms: u64,
    /// Allows webhook URLs on link-local addresses (169.254.0.0/16, fe80::/10) and the cloud
    /// metadata endpoints, which are refused by default (server-side request forgery).
    pub allow_link_local: bool,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            timeout_ms: 5_000,
            retry_initial_ms: 1_000,
            retry_max_ms: 600_000,
            max_attempts: 20,
            max_age_ms: 4 * 3_600_000,
            max_in_flight: 64,
            lease_ms: 30_000,
            poll_interval_ms: 1_000,
            record_batch_ms: 50,
            allow_link_local: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `reach_gateway=debug,info`. `RUST_LOG` wins if set.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Pretty,
            filter: "info".into(),
        }
    }
}

/// An account and its auth token (HTTP Basic user and password). A SID of the wrong shape is
/// refused when the configuration is read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    pub sid: AccountSid,
    pub auth_token: String,
}

/// An API key: signs access tokens, and authenticates REST calls for its account.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub sid: ApiKeySid,
    pub secret: String,
    pub account_sid: AccountSid,
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that does not parse, or an unknown key, in the file or the environment.
    #[error("{}", describe(.error, .file.as_deref()))]
    Load {
        error: Box<figment::Error>,
        /// The file as it was given (`--config`), to name it the same way.
        file: Option<PathBuf>,
    },
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("config file {0} not found")]
    Missing(PathBuf),
}

/// Each of figment's errors as one line: the key as the file writes it (`presence.x`), the
/// value or the unknown name, and where it came from (the file as given, or the variable).
fn describe(error: &figment::Error, file: Option<&Path>) -> String {
    use figment::Source;
    use figment::error::Kind;
    error
        .clone()
        .into_iter()
        .map(|e| {
            let key = e.path.join(".").to_lowercase();
            let from_env = e
                .metadata
                .as_ref()
                .is_some_and(|m| m.name.contains("environment"));
            let place = if from_env {
                format!(
                    " (from REACH_{})",
                    e.path
                        .iter()
                        .map(|p| p.to_uppercase())
                        .collect::<Vec<_>>()
                        .join("__")
                )
            } else {
                match (e.metadata.as_ref().and_then(|m| m.source.as_ref()), file) {
                    (Some(Source::File(_)), Some(file)) => format!(" in {}", file.display()),
                    _ => String::new(),
                }
            };
            match &e.kind {
                Kind::UnknownField(found, expected) => format!(
                    "unknown key `{key}`{place}: `{found}` is not one of {}",
                    expected.join(", ")
                ),
                Kind::Message(message) => format!("invalid value for `{key}`{place}: {message}"),
                other => format!("invalid value for `{key}`{place}: {other}"),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

impl Config {
    /// Defaults, then the file (if given; it must exist), then `REACH_*` variables.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::Missing(path.to_owned()));
            }
            figment = figment.merge(Toml::file(path));
        }
        // Only REACH_<SECTION>__<KEY> names are configuration; other REACH_* variables (such as
        // REACH_CONFIG or test settings) are not.
        figment = figment.merge(
            Env::prefixed("REACH_")
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
        let config: Config = figment.extract().map_err(|e| ConfigError::Load {
            error: Box::new(e),
            file: path.map(Path::to_owned),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Settings that work but probably not as meant, for a warning at startup.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let (grace, retry) = (
            self.presence.offline_grace_ms,
            self.server.drain_retry_max_ms,
        );
        // A client sent away by a drain comes back after up to `retry` plus its reconnect; if
        // that can outlast the grace, its subscribers see it go offline and come back.
        if grace > 0 && retry.saturating_add(DRAIN_RECONNECT_MARGIN_MS) > grace {
            warnings.push(format!(
                "server.drain_retry_max_ms ({retry}) leaves less than {DRAIN_RECONNECT_MARGIN_MS} ms of presence.offline_grace_ms ({grace}) for a reconnect: clients sent away by a drain may be seen offline"
            ));
        }
        warnings
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.presence;
        let positive = [
            ("presence.heartbeat_interval_ms", p.heartbeat_interval_ms),
            ("presence.heartbeat_timeout_ms", p.heartbeat_timeout_ms),
            ("presence.auth_timeout_ms", p.auth_timeout_ms),
            (
                "limits.write_stall_timeout_ms",
                self.limits.write_stall_timeout_ms,
            ),
            ("limits.max_connections", self.limits.max_connections as u64),
            ("limits.max_frame_bytes", self.limits.max_frame_bytes as u64),
            (
                "limits.max_outbox_bytes",
                self.limits.max_outbox_bytes as u64,
            ),
            (
                "limits.read_buffer_bytes",
                self.limits.read_buffer_bytes as u64,
            ),
            ("server.backlog", u64::from(self.server.backlog)),
            (
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
            ),
            (
                "server.keepalive_idle_timeout_ms",
                self.server.keepalive_idle_timeout_ms,
            ),
            (
                "server.tls_handshake_timeout_ms",
                self.server.tls_handshake_timeout_ms,
            ),
            (
                "limits.max_pending_connections",
                self.limits.max_pending_connections as u64,
            ),
            (
                "limits.max_pending_per_address",
                self.limits.max_pending_per_address as u64,
            ),
            ("cluster.node_ttl_ms", self.cluster.node_ttl_ms),
            (
                "limits.max_identities_per_request",
                self.limits.max_identities_per_request as u64,
            ),
            ("webhooks.timeout_ms", self.webhooks.timeout_ms),
            ("webhooks.retry_initial_ms", self.webhooks.retry_initial_ms),
            (
                "webhooks.max_attempts",
                u64::from(self.webhooks.max_attempts),
            ),
            ("webhooks.max_age_ms", self.webhooks.max_age_ms),
            ("webhooks.max_in_flight", self.webhooks.max_in_flight as u64),
            ("webhooks.poll_interval_ms", self.webhooks.poll_interval_ms),
            ("webhooks.record_batch_ms", self.webhooks.record_batch_ms),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if p.heartbeat_timeout_ms <= p.heartbeat_interval_ms {
            return Err(invalid(
                "presence.heartbeat_timeout_ms",
                format!(
                    "must be greater than presence.heartbeat_interval_ms ({})",
                    p.heartbeat_interval_ms
                ),
            ));
        }
        let l = &self.limits;
        for (rate, key, burst) in [
            (
                l.rest_requests_per_second,
                "limits.rest_request_burst",
                l.rest_request_burst,
            ),
            (
                l.auth_failures_per_minute,
                "limits.auth_failure_burst",
                l.auth_failure_burst,
            ),
            (
                l.socket_frames_per_second,
                "limits.socket_frame_burst",
                l.socket_frame_burst,
            ),
        ] {
            if rate > 0 && burst == 0 {
                return Err(invalid(key, "must be greater than 0 when its rate is set"));
            }
        }
        if self.limits.max_frame_bytes < 256 {
            return Err(invalid("limits.max_frame_bytes", "must be at least 256"));
        }
        if (1..64).contains(&self.limits.write_fragment_bytes) {
            return Err(invalid(
                "limits.write_fragment_bytes",
                "must be 0 (no fragments) or at least 64",
            ));
        }
        let w = &self.webhooks;
        if w.retry_max_ms < w.retry_initial_ms {
            return Err(invalid(
                "webhooks.retry_max_ms",
                format!(
                    "must be at least webhooks.retry_initial_ms ({})",
                    w.retry_initial_ms
                ),
            ));
        }
        if w.lease_ms <= w.timeout_ms {
            return Err(invalid(
                "webhooks.lease_ms",
                format!(
                    "must be greater than webhooks.timeout_ms ({}): a node must finish an attempt before another may take the event",
                    w.timeout_ms
                ),
            ));
        }
        let url = &self.server.public_url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(
                "server.public_url",
                "must start with http:// or https://",
            ));
        }
        let s = &self.server;
        if s.tls_cert_path.as_os_str().is_empty() != s.tls_key_path.as_os_str().is_empty() {
            return Err(invalid(
                if s.tls_cert_path.as_os_str().is_empty() {
                    "server.tls_cert_path"
                } else {
                    "server.tls_key_path"
                },
                "server.tls_cert_path and server.tls_key_path go together: set both or neither",
            ));
        }
        if self.storage.sqlite_path.as_os_str().is_empty() {
            return Err(invalid("storage.sqlite_path", "must not be empty"));
        }
        let pg = &self.storage.postgres_url;
        if !(pg.is_empty() || pg.starts_with("postgres://") || pg.starts_with("postgresql://")) {
            return Err(invalid(
                "storage.postgres_url",
                "must start with postgres:// or postgresql://",
            ));
        }
        let c = &self.cluster;
        if !c.redis_url.is_empty() {
            if !(c.redis_url.starts_with("redis://") || c.redis_url.starts_with("rediss://")) {
                return Err(invalid(
                    "cluster.redis_url",
                    "must start with redis:// or rediss://",
                ));
            }
            if pg.is_empty() {
                return Err(invalid(
                    "storage.postgres_url",
                    "must be set when cluster.redis_url is: the nodes of a cluster share their records in PostgreSQL",
                ));
            }
            if self.accounts.is_empty() || self.api_keys.is_empty() {
                return Err(invalid(
                    "accounts",
                    "a cluster needs [[accounts]] and [[api_keys]] in its configuration, the same on every node (generated credentials are per node)",
                ));
            }
            if c.node_ttl_ms < 300 {
                return Err(invalid("cluster.node_ttl_ms", "must be at least 300"));
            }
        }
        if !(c.node_id.is_empty() || reach_cluster::valid_node_id(&c.node_id)) {
            return Err(invalid(
                "cluster.node_id",
                "must be 1 to 64 letters, digits, '-', '_' or '.'",
            ));
        }
        for (i, a) in self.accounts.iter().enumerate() {
            if a.auth_token.len() < 16 {
                return Err(invalid(
                    &format!("accounts[{i}].auth_token"),
                    "must be at least 16 characters",
                ));
            }
        }
        for (i, k) in self.api_keys.iter().enumerate() {
            if k.secret.len() < 16 {
                return Err(invalid(
                    &format!("api_keys[{i}].secret"),
                    "must be at least 16 characters",
                ));
            }
            if !self.accounts.iter().any(|a| a.sid == k.account_sid) {
                return Err(invalid(
                    &format!("api_keys[{i}].account_sid"),
                    format!(
                        "{} is not one of the configured [[accounts]]",
                        k.account_sid
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.presence.heartbeat_interval_ms)
    }
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.presence.heartbeat_timeout_ms)
    }
    pub fn auth_timeout(&self) -> Duration {
        Duration::from_millis(self.presence.auth_timeout_ms)
    }
    pub fn offline_grace(&self) -> Duration {
        Duration::from_millis(self.presence.offline_grace_ms)
    }
    pub fn clustered(&self) -> bool {
        !self.cluster.redis_url.is_empty()
    }

    /// The folder that holds the database and generated credentials.
    pub fn data_dir(&self) -> PathBuf {
        match self.storage.sqlite_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_documented_values() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.presence.offline_grace_ms, 5000);
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    }

    #[test]
    fn a_drain_retry_that_outlasts_the_grace_is_warned_of() {
        let mut c = Config::default();
        c.server.drain_retry_max_ms = 4_500;
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("server.drain_retry_max_ms (4500)"), "{w:?}");
        c.presence.offline_grace_ms = 0;
        assert!(c.warnings().is_empty(), "no grace: nothing to outlast");
    }

    #[test]
    fn the_shipped_config_file_parses_to_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/reachd.toml");
        let figment = Figment::from(Toml::file(&path));
        let from_file: Config = figment.extract().expect("config/reachd.toml parses");
        let d = Config::default();
        assert_eq!(
            serde_json::to_value(&from_file).unwrap(),
            serde_json::to_value(&d).unwrap(),
            "config/reachd.toml documents the defaults"
        );
    }

    #[test]
    fn the_example_cluster_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/cluster.toml");
        let figment =
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::file(&path));
        let c: Config = figment.extract().expect("config/cluster.toml parses");
        c.validate().unwrap();
        assert!(c.clustered());
        assert!(c.storage.postgres_url.starts_with("postgres://"));
    }

    #[test]
    fn write_fragments_are_off_or_at_least_64_bytes() {
        let mut c = Config::default();
        for (n, ok) in [(0, true), (1, false), (63, false), (64, true), (4096, true)] {
            c.limits.write_fragment_bytes = n;
            match c.validate() {
                Ok(()) => assert!(ok, "{n} accepted"),
                Err(e) => {
                    assert!(!ok, "{n} refused: {e}");
                    assert!(e.to_string().contains("limits.write_fragment_bytes"), "{e}");
                }
            }
        }
    }

    #[test]
    fn webhook_settings_that_cannot_work_are_refused() {
        let mut c = Config::default();
        c.webhooks.lease_ms = c.webhooks.timeout_ms;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("webhooks.lease_ms"), "{e}");
        let mut c = Config::default();
        c.webhooks.retry_max_ms = c.webhooks.retry_initial_ms - 1;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("webhooks.retry_max_ms"), "{e}");
        let mut c = Config::default();
        c.webhooks.max_attempts = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("webhooks.max_attempts"), "{e}");
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let mut c = Config::default();
        c.presence.heartbeat_timeout_ms = 100;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("presence.heartbeat_timeout_ms"), "{e}");
        c = Config::default();
        c.api_keys.push(ApiKeyConfig {
            sid: "SK00000000000000000000000000000000".parse().unwrap(),
            secret: "0123456789abcdef".into(),
            account_sid: "AC00000000000000000000000000000000".parse().unwrap(),
        });
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("api_keys[0].account_sid"), "{e}");
    }

    #[test]
    fn a_malformed_sid_in_the_file_is_refused_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reachd.toml");
        std::fs::write(
            &path,
            "[[accounts]]\nsid = \"AC123\"\nauth_token = \"0123456789abcdef\"\n",
        )
        .unwrap();
        let e = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(e.contains("accounts.0.sid"), "{e}");
        assert!(
            e.contains("must be AC followed by 32 lowercase hex digits"),
            "{e}"
        );
    }

    #[test]
    fn load_errors_name_the_key_and_the_file_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conf.toml");
        std::fs::write(&path, "[presence]\nheartbeat_interval_ms = \"ten\"\n").unwrap();
        let e = Config::load(Some(&path)).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "invalid value for `presence.heartbeat_interval_ms` in {}: invalid type: found string \"ten\", expected u64",
                path.display()
            )
        );
        std::fs::write(&path, "[presence]\nofline_grace_ms = 5\n").unwrap();
        let e = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "unknown key `presence.ofline_grace_ms` in {}: `ofline_grace_ms` is not one of heartbeat_interval_ms,",
                path.display()
            )),
            "{e}"
        );
        assert!(!e.contains("default."), "{e}");
    }

    #[test]
    fn a_cluster_needs_postgres_and_a_valid_node_id() {
        let mut c = Config::default();
        c.cluster.redis_url = "redis://127.0.0.1:6379".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("storage.postgres_url"), "{e}");
        c.storage.postgres_url = "postgres://reach@127.0.0.1/reach".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("[[accounts]]"), "{e}");
        c.accounts.push(AccountConfig {
            sid: "AC00000000000000000000000000000000".parse().unwrap(),
            auth_token: "0123456789abcdef".into(),
        });
        c.api_keys.push(ApiKeyConfig {
            sid: "SK00000000000000000000000000000000".parse().unwrap(),
            secret: "0123456789abcdef".into(),
            account_sid: "AC00000000000000000000000000000000".parse().unwrap(),
        });
        c.validate().unwrap();
        c.cluster.node_id = "node 1".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("cluster.node_id"), "{e}");
        c.cluster.node_id = "node-1".into();
        c.cluster.redis_url = "http://x".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("cluster.redis_url"), "{e}");
    }
}
