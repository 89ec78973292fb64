//! Durable records of a Reach deployment: services, their configuration, users and push
//! bindings, behind the [`Store`] trait.
//!
//! Data flow: the gateway's REST handlers and its connection tasks (hello, subscribe to a user
//! not yet in memory, register_push) call the store; the presence engine never does. Every
//! acknowledged write is committed before the call returns (SQLite: WAL with
//! `synchronous=FULL`; PostgreSQL: the `COMMIT` has returned, with the server's default
//! `synchronous_commit=on`), so it survives a restart or `kill -9`.
//!
//! The store also keeps what backends are told of: each user's presence as subscribers saw it
//! (`presence_online`, `last_seen_at`, written in batches by [`Store::record_presence`]), each
//! service's webhook ([`WebhookConfig`]) and the queue of webhook events ([`hooks`]). An event
//! is recorded in the same transaction as the write that causes it, so a REST write and its
//! event commit together or not at all; delivery takes the events back with leases
//! ([`Store::claim_events`]), so in a cluster one node delivers each, in order per user.
//!
//! Backends: [`sqlite::SqliteStore`] (single node, the default: one file) and
//! [`postgres::PgStore`] (clusters: every reachd node connects to one database, which it
//! migrates under an advisory lock at start). Both behave the same for every [`Store`] method;
//! `tests/conformance.rs` runs one suite against each.
//!
//! Times are unix seconds. SIDs are made by `reach_proto::sid` (two letters and 32 lowercase hex
//! digits).

pub mod hooks;
pub mod postgres;
mod rows;
pub mod sqlite;

use async_trait::async_trait;
pub use hooks::{
    Claim, ClaimedEvent, Completion, OnlineUser, PresenceRecord, QueueStats, Source, Target,
    UserEvent, WebhookConfig, WebhookMethod, WebhookUpdate,
};
pub use reach_proto::{AccountSid, ServiceSid, now_unix};

/// `2026-11-25T20:43:04Z`: how REST responses and webhook parameters write a unix time.
pub fn iso8601(unix: i64) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

/// A conversations service: the scope of users, bindings and the reachability switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub sid: ServiceSid,
    pub account_sid: AccountSid,
    pub friendly_name: String,
    pub date_created: i64,
    pub date_updated: i64,
}

/// A service's configuration resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub service_sid: ServiceSid,
    pub reachability_enabled: bool,
    /// Bumped each time reachability goes from disabled to enabled. A user whose
    /// `online_epoch` equals it has been online since the latest enabling (else `is_online`
    /// is null).
    pub reachability_epoch: i64,
    pub default_conversation_creator_role_sid: Option<String>,
    pub default_conversation_role_sid: Option<String>,
    pub default_chat_service_role_sid: Option<String>,
}

/// Fields of a configuration update; `None` leaves a field unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigUpdate {
    pub reachability_enabled: Option<bool>,
    pub default_conversation_creator_role_sid: Option<String>,
    pub default_conversation_role_sid: Option<String>,
    pub default_chat_service_role_sid: Option<String>,
}

/// A user of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub sid: String,
    pub account_sid: AccountSid,
    pub service_sid: ServiceSid,
    pub identity: String,
    pub friendly_name: Option<String>,
    /// JSON text; `"{}"` when unset.
    pub attributes: String,
    pub role_sid: Option<String>,
    pub date_created: i64,
    pub date_updated: i64,
    /// Increases on every update of friendly name, attributes or role, and on every binding
    /// change.
    pub revision: i64,
    /// The service's `reachability_epoch` when the user was last seen online; 0 = never.
    pub online_epoch: i64,
    /// True once the user has had a push binding.
    pub ever_had_binding: bool,
    /// Number of push bindings the user has now.
    pub binding_count: i64,
    /// Online, as subscribers last saw it (recorded by [`Store::record_presence`]).
    pub presence_online: bool,
    /// When the user last went offline, as subscribers saw it (unix seconds); `None` until the
    /// first time.
    pub last_seen_at: Option<i64>,
}

/// Fields for a new user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewUser {
    pub identity: String,
    pub friendly_name: Option<String>,
    pub attributes: Option<String>,
    pub role_sid: Option<String>,
}

/// Fields of a user update; `None` leaves a field unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserUpdate {
    pub friendly_name: Option<String>,
    pub attributes: Option<String>,
    pub role_sid: Option<String>,
}

/// A push registration of one user's device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub sid: String,
    pub account_sid: AccountSid,
    pub service_sid: ServiceSid,
    pub credential_sid: Option<String>,
    pub identity: String,
    /// `apn`, `gcm` or `fcm`.
    pub binding_type: String,
    /// The device token.
    pub address: String,
    pub date_created: i64,
    pub date_updated: i64,
}

/// Where a list page starts, and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// Keyset cursor: return rows after this one (from a previous page's `next_cursor`).
    pub after: Option<i64>,
    /// Offset, used when `after` is `None`.
    pub offset: i64,
    /// Rows per page, 1..=1000.
    pub limit: i64,
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Cursor of the next page, when there are more rows.
    pub next_cursor: Option<i64>,
}

impl<T> Page<T> {
    /// The same page with each item mapped.
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            next_cursor: self.next_cursor,
        }
    }
}

/// Binding list filters; empty vectors mean "any".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BindingFilter {
    pub binding_types: Vec<String>,
    pub identities: Vec<String>,
}

/// What a store call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("a user with identity {0:?} already exists")]
    UserExists(String),
    #[error("storage failure: {0}")]
    Backend(String),
    /// The SQLite file is held by another process (one data folder, one `reachd`).
    #[error("it is in use by another process (its lock file {0} is held)")]
    InUse(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Durable records. Implementations must commit each write before returning.
///
/// Lookups by service are always scoped by `account_sid` at the REST layer: a service of
/// another account is reported as `NotFound`. Account and service SIDs are typed, so the two
/// cannot be swapped.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn create_service(
        &self,
        account_sid: &AccountSid,
        friendly_name: &str,
    ) -> Result<Service>;
    /// `NotFound` unless the service exists and belongs to `account_sid`.
    async fn get_service(
        &self,
        account_sid: &AccountSid,
        service_sid: &ServiceSid,
    ) -> Result<Service>;
    /// The service regardless of account (used for access tokens, which name both).
    async fn find_service(&self, service_sid: &ServiceSid) -> Result<Service>;
    async fn list_services(
        &self,
        account_sid: &AccountSid,
        page: PageRequest,
    ) -> Result<Page<Service>>;
    /// Deletes the service with its configuration, users and bindings.
    async fn delete_service(
        &self,
        account_sid: &AccountSid,
        service_sid: &ServiceSid,
    ) -> Result<()>;

    async fn get_config(&self, service_sid: &ServiceSid) -> Result<ServiceConfig>;
    /// Applies the update; when reachability goes from disabled to enabled,
    /// `reachability_epoch` is incremented in the same transaction.
    async fn update_config(
        &self,
        service_sid: &ServiceSid,
        update: &ConfigUpdate,
    ) -> Result<ServiceConfig>;
    /// Every service's configuration (loaded into the engine at start).
    async fn list_configs(&self) -> Result<Vec<ServiceConfig>>;

    /// `UserExists` when the identity is taken in this service. With `fire`, records
    /// `onUserAdded` for the service's webhook (if it listens) in the same transaction.
    async fn create_user(
        &self,
        service: &Service,
        user: &NewUser,
        fire: Option<Source>,
    ) -> Result<UserRecord>;
    /// Returns the user, creating it with defaults when it does not exist (a first `hello`:
    /// `onUserAdded` with source `SDK` is recorded with it).
    async fn get_or_create_user(&self, service: &Service, identity: &str) -> Result<UserRecord>;
    /// By SID (`US...`) or identity.
    async fn get_user(&self, service_sid: &ServiceSid, sid_or_identity: &str)
    -> Result<UserRecord>;
    /// The users with these identities (distinct; missing ones are left out, in no particular
    /// order), in one query per 64 of them: what a `subscribe` to users not in memory reads.
    async fn get_users_by_identity(
        &self,
        service_sid: &ServiceSid,
        identities: &[String],
    ) -> Result<Vec<UserRecord>>;
    async fn list_users(
        &self,
        service_sid: &ServiceSid,
        page: PageRequest,
    ) -> Result<Page<UserRecord>>;
    /// Applies the update and bumps `revision` and `date_updated`. With `fire`, a change of
    /// friendly name or attributes records `onUserUpdated` in the same transaction.
    async fn update_user(
        &self,
        service_sid: &ServiceSid,
        sid_or_identity: &str,
        update: &UserUpdate,
        fire: Option<Source>,
    ) -> Result<UserRecord>;
    /// Deletes the user and its bindings; returns what was deleted. With `fire`, records
    /// `onUserRemoved` in the same transaction.
    async fn delete_user(
        &self,
        service_sid: &ServiceSid,
        sid_or_identity: &str,
        fire: Option<Source>,
    ) -> Result<UserRecord>;
    /// Records that the user was online in the given reachability epoch.
    async fn mark_online(&self, service_sid: &ServiceSid, identity: &str, epoch: i64)
    -> Result<()>;

    /// Creates the binding, or returns the existing one for the same identity, type and
    /// address. Sets the user's `ever_had_binding`. The user must exist. A change of
    /// `is_notifiable` records `onUserUpdated` (source `SDK`: bindings are registered over
    /// sockets).
    async fn upsert_binding(
        &self,
        service: &Service,
        identity: &str,
        binding_type: &str,
        address: &str,
        credential_sid: Option<&str>,
    ) -> Result<Binding>;
    /// Deletes the identity's binding of that type and address; `NotFound` if there is none.
    /// A change of `is_notifiable` records `onUserUpdated` (source `SDK`).
    async fn delete_binding_by_address(
        &self,
        service_sid: &ServiceSid,
        identity: &str,
        binding_type: &str,
        address: &str,
    ) -> Result<Binding>;
    async fn get_binding(&self, service_sid: &ServiceSid, binding_sid: &str) -> Result<Binding>;
    /// With `fire`, a change of `is_notifiable` records `onUserUpdated`.
    async fn delete_binding(
        &self,
        service_sid: &ServiceSid,
        binding_sid: &str,
        fire: Option<Source>,
    ) -> Result<Binding>;
    async fn list_bindings(
        &self,
        service_sid: &ServiceSid,
        filter: &BindingFilter,
        page: PageRequest,
    ) -> Result<Page<Binding>>;
    /// Number of bindings the identity has now.
    async fn count_bindings(&self, service_sid: &ServiceSid, identity: &str) -> Result<i64>;

    /// The service's webhook (the defaults when never set); `NotFound` without the service.
    async fn get_webhook(&self, service_sid: &ServiceSid) -> Result<WebhookConfig>;
    /// Applies the update (checked by the caller) and returns the result.
    async fn update_webhook(
        &self,
        service_sid: &ServiceSid,
        update: &WebhookUpdate,
    ) -> Result<WebhookConfig>;

    /// Records presence changes in one transaction, each only if its version is newer than the
    /// user's last one: the user's `presence_online`, its `last_seen_at` when it went offline,
    /// its `online_epoch` when it came online while reachability is enabled, and, when the
    /// state flipped while reachability is enabled, `onUserUpdated` (source `SDK`) for the
    /// service's webhook. Changes of users that do not exist (any more) are skipped.
    async fn record_presence(&self, changes: &[PresenceRecord]) -> Result<()>;
    /// Users recorded online, in `seq` order after `after` (a keyset cursor: the `seq` of the
    /// previous page's last; 0 for the first page), at most `limit`.
    async fn online_users(&self, after: i64, limit: i64) -> Result<Vec<OnlineUser>>;
    /// The largest presence version recorded (0 when none).
    async fn max_presence_version(&self) -> Result<i64>;

    /// Takes up to `limit` events due at `now_ms` for delivery by `node`, leased until
    /// `now_ms + lease_ms`: of each user, only its oldest event, and only while no other lease
    /// on it is live, so a user's events go out one at a time, in order. Each claim counts as
    /// an attempt.
    async fn claim_events(
        &self,
        node: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: i64,
    ) -> Result<Vec<ClaimedEvent>>;
    /// Applies delivery outcomes of events `node` holds, each to the claim it answers; an
    /// event claimed again meanwhile (its lease ran out) is left to that claim.
    async fn complete_events(&self, node: &str, outcomes: &[(Claim, Completion)]) -> Result<()>;
    /// Gives back the leases of `node` (all leases with `None`), so the events are taken again
    /// at once. Returns how many.
    async fn release_events(&self, node: Option<&str>) -> Result<u64>;
    /// Events waiting for delivery and the age of the oldest.
    async fn queue_stats(&self) -> Result<QueueStats>;

    /// Records that `node` is alive at `now` (unix seconds); returns the time it recorded
    /// before, if any (a single node reads there when it stopped last).
    async fn touch_node(&self, node: &str, now: i64) -> Result<Option<i64>>;
}
