//! PostgreSQL backend of [`Store`]: one database shared by every node of a cluster.
//!
//! It keeps the records, and behaves, exactly like [`crate::sqlite::SqliteStore`] (the same
//! errors, paging cursors and revision rules); the shared conformance suite in
//! `tests/conformance.rs` runs every case against both backends.
//!
//! # Schema (version 2)
//!
//! The tables of the SQLite backend, with PostgreSQL types: `BIGINT` times and counters,
//! `BOOLEAN` flags, `TEXT` SIDs. Version 2 added the presence columns of `users`,
//! `service_webhooks`, `webhook_events` and `nodes` (see [`crate::sqlite`] and
//! [`crate::hooks`]).
//!
//! - `services`: one row per service, scoped by `account_sid`.
//! - `service_configs`: one row per service (created with it), `ON DELETE CASCADE`.
//! - `users`: `UNIQUE(service_sid, identity)` (constraint `users_identity_key`, whose
//!   violation is [`StoreError::UserExists`]), cascade-deleted with their service.
//! - `bindings`: `UNIQUE(service_sid, identity, binding_type, address)`, cascade-deleted with
//!   their service and with their user (and also deleted explicitly in `delete_user`).
//!
//! Every listed table has `seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY` (a sequence,
//! never reused) next to its `sid UNIQUE`: lists are ordered by `seq`, i.e. by insertion, and a
//! page's `next_cursor` is the `seq` of its last row (keyset paging; `offset` is the fallback).
//!
//! # Migrations
//!
//! [`PgStore::connect`] brings the schema up to date before it returns. The migrations are
//! numbered SQL scripts ([`MIGRATIONS`]; version `n` is the `n`-th); each applied version is
//! a row of `reach_schema_version`. They run in one transaction that first takes
//! `pg_advisory_xact_lock(MIGRATION_LOCK_KEY)`: nodes that start at once against the same
//! database queue on that lock, the first applies the scripts, and the others then find the
//! schema current and apply nothing. A database whose version is newer than this build knows
//! is refused (nothing is changed), as the SQLite backend refuses a newer `user_version`.
//!
//! # Durability
//!
//! Each method returns only after its transaction (or its single autocommitted statement)
//! has committed. With the server's default `synchronous_commit = on`, a commit returns once
//! its WAL record is flushed to disk (and, with synchronous standbys configured, once they
//! have it too), so an acknowledged write survives a crash of the server or of the node. The
//! backend does not override the setting: a server configured with `synchronous_commit = off`
//! weakens that guarantee to "committed, flushed within a few hundred milliseconds".
//!
//! # Concurrency
//!
//! Several nodes write the same rows at once, at PostgreSQL's default `READ COMMITTED`
//! isolation. Where the SQLite backend relies on `BEGIN IMMEDIATE` (one writer at a time),
//! this one uses single-statement updates or row locks:
//!
//! - `get_or_create_user` is `INSERT ... ON CONFLICT DO NOTHING` and then a `SELECT`: a racing
//!   insert of the same identity waits for the other one to commit and then reads its row, so
//!   every caller gets the same SID.
//! - `update_config` is one `UPDATE ... RETURNING` whose epoch bump reads the row it updates,
//!   so two nodes enabling reachability at once bump the epoch once.
//! - Writes to a user and its bindings (`update_user`, `delete_user`, `upsert_binding`,
//!   `delete_binding*`) lock the user's row first (`SELECT ... FOR UPDATE` or the `UPDATE` of
//!   its revision) and then touch its bindings, always in that order, so they serialise per
//!   user without deadlocking each other, and `revision = revision + 1` never loses a bump.
//!
//! Keyset paging has one difference: identity values are handed out at insert time, but
//! transactions commit in any order, so a cursor taken while inserts are in flight can be past
//! the `seq` of a row whose insert commits later; the pages after that cursor miss the row
//! (a listing started afresh has it). With one writer at a time (SQLite) it cannot happen.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use reach_proto::SidKind;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, Postgres, Transaction};

use crate::hooks::{Claim, OnlineUser};
use crate::{
    AccountSid, Binding, BindingFilter, ClaimedEvent, Completion, ConfigUpdate, NewUser, Page,
    PageRequest, PresenceRecord, QueueStats, Result, Service, ServiceConfig, ServiceSid, Source,
    Store, StoreError, UserEvent, UserRecord, UserUpdate, WebhookConfig, WebhookUpdate, now_unix,
};

/// The schema migrations, in order: version `n` is `MIGRATIONS[n - 1]`. Never edit an entry
/// that has shipped; append a new one.
pub const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2];

/// The schema version this code writes and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Key of the transaction-scoped advisory lock that serialises migrations across nodes
/// (the bytes of `"reachmig"`).
pub const MIGRATION_LOCK_KEY: i64 = 0x7265_6163_686d_6967;

/// Connections per node.
const MAX_CONNECTIONS: u32 = 8;

/// How long a call waits for a free connection, and `connect` for its first one.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Name of the unique constraint on `users (service_sid, identity)`.
const USERS_IDENTITY_KEY: &str = "users_identity_key";

const SCHEMA_V1: &str = r#"
CREATE TABLE services (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sid           TEXT   NOT NULL UNIQUE,
    account_sid   TEXT   NOT NULL,
    friendly_name TEXT   NOT NULL,
    date_created  BIGINT NOT NULL,
    date_updated  BIGINT NOT NULL
);
CREATE INDEX services_by_account ON services (account_sid, seq);

CREATE TABLE service_configs (
    service_sid                           TEXT    NOT NULL PRIMARY KEY
                                                  REFERENCES services (sid) ON DELETE CASCADE,
    reachability_enabled                  BOOLEAN NOT NULL DEFAULT FALSE,
    reachability_epoch                    BIGINT  NOT NULL DEFAULT 0,
    default_conversation_creator_role_sid TEXT,
    default_conversation_role_sid         TEXT,
    default_chat_service_role_sid         TEXT
);

CREATE TABLE users (
    seq              BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sid              TEXT    NOT NULL UNIQUE,
    service_sid      TEXT    NOT NULL REFERENCES services (sid) ON DELETE CASCADE,
    account_sid      TEXT    NOT NULL,
    identity         TEXT    NOT NULL,
    friendly_name    TEXT,
    attributes       TEXT,
    role_sid         TEXT,
    date_created     BIGINT  NOT NULL,
    date_updated     BIGINT  NOT NULL,
    revision         BIGINT  NOT NULL DEFAULT 0,
    online_epoch     BIGINT  NOT NULL DEFAULT 0,
    ever_had_binding BOOLEAN NOT NULL DEFAULT FALSE,
    CONSTRAINT users_identity_key UNIQUE (service_sid, identity)
);
CREATE INDEX users_by_service ON users (service_sid, seq);

CREATE TABLE bindings (
    seq            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sid            TEXT   NOT NULL UNIQUE,
    service_sid    TEXT   NOT NULL REFERENCES services (sid) ON DELETE CASCADE,
    account_sid    TEXT   NOT NULL,
    identity       TEXT   NOT NULL,
    binding_type   TEXT   NOT NULL,
    address        TEXT   NOT NULL,
    credential_sid TEXT,
    date_created   BIGINT NOT NULL,
    date_updated   BIGINT NOT NULL,
    UNIQUE (service_sid, identity, binding_type, address),
    FOREIGN KEY (service_sid, identity) REFERENCES users (service_sid, identity)
        ON DELETE CASCADE
);
CREATE INDEX bindings_by_service ON bindings (service_sid, seq);
"#;

const SCHEMA_V2: &str = r#"
ALTER TABLE users
    ADD COLUMN presence_online  BOOLEAN NOT NULL DEFAULT FALSE,
    ADD COLUMN presence_version BIGINT  NOT NULL DEFAULT 0,
    ADD COLUMN last_seen_at     BIGINT;
CREATE INDEX users_online ON users (seq) WHERE presence_online = TRUE;

CREATE TABLE service_webhooks (
    service_sid      TEXT   NOT NULL PRIMARY KEY
                            REFERENCES services (sid) ON DELETE CASCADE,
    pre_webhook_url  TEXT,
    post_webhook_url TEXT,
    method           TEXT   NOT NULL DEFAULT 'POST',
    filters          TEXT   NOT NULL DEFAULT '',
    date_updated     BIGINT NOT NULL
);

CREATE TABLE webhook_events (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token           TEXT   NOT NULL UNIQUE,
    service_sid     TEXT   NOT NULL REFERENCES services (sid) ON DELETE CASCADE,
    identity        TEXT   NOT NULL,
    event_type      TEXT   NOT NULL,
    params          TEXT   NOT NULL,
    created_ms      BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT NOT NULL,
    lease_owner     TEXT,
    lease_until_ms  BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT
);
CREATE INDEX webhook_events_by_user ON webhook_events (service_sid, identity, seq);

CREATE TABLE nodes (
    node_id  TEXT   NOT NULL PRIMARY KEY,
    alive_at BIGINT NOT NULL
);
"#;

const SERVICE_COLS: &str = "seq, sid, account_sid, friendly_name, date_created, date_updated";

const CONFIG_COLS: &str = "c.service_sid, c.reachability_enabled, c.reachability_epoch, \
     c.default_conversation_creator_role_sid, c.default_conversation_role_sid, \
     c.default_chat_service_role_sid";

const BINDING_COLS: &str = "seq, sid, account_sid, service_sid, credential_sid, identity, \
     binding_type, address, date_created, date_updated";

/// [`Store`] on a PostgreSQL database. Cheap to clone (the clones share one connection pool).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    growth: Arc<Growth>,
}

/// Users inserted through this store, to refresh the planner's statistics as the table grows.
///
/// PostgreSQL plans a prepared statement once per connection (after five custom plans) and
/// keeps that plan until the table's statistics change. Planned while `users` is nearly empty
/// (a fresh database), a lookup by identity may keep scanning `users_by_service`, every user of
/// the service per lookup, until autovacuum's next ANALYZE, up to a minute or more later:
/// measured on a fresh cluster, 2,000 new users subscribing to 10 each waited 6.3-7.8 s (p50) for
/// `subscribed`, against 0.85 s after an ANALYZE. So the store runs `ANALYZE` itself
/// when the users it inserted reach 1,000, then 2,000, 4,000 and so on; the new statistics
/// invalidate the cached plans. `bindings` has the same two candidate indexes for a user's
/// count of bindings, and is analyzed with it.
#[derive(Debug)]
struct Growth {
    inserted: AtomicU64,
    next: AtomicU64,
}

/// Users inserted before the first `ANALYZE`.
const FIRST_ANALYZE: u64 = 1_000;

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/database`, with
    /// sqlx's query parameters such as `sslmode`), creates or migrates the schema over a first
    /// connection, and returns a store whose pool opens up to 8 connections as calls need them.
    ///
    /// Errors are [`StoreError::Backend`] naming the step that failed (parsing the URL,
    /// connecting, migrating) and the server as `user@host:port/database`; they never contain
    /// the password.
    pub async fn connect(url: &str) -> Result<PgStore> {
        let secrets = url_secrets(url);
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| connect_error(&secrets, "invalid database URL", &e))?;
        let target = describe(&options);
        // One connection first, on its own: the pool would retry a failing connect until its
        // timeout and then report only "timed out", where this reports the cause (refused,
        // unknown database, authentication failed).
        let step = format!("cannot connect to {target}");
        let connecting = PgConnection::connect_with(&options);
        let mut conn = match tokio::time::timeout(ACQUIRE_TIMEOUT, connecting).await {
            Ok(connected) => connected.map_err(|e| connect_error(&secrets, &step, &e))?,
            Err(_) => {
                let cause = format!("no answer within {} s", ACQUIRE_TIMEOUT.as_secs());
                return Err(connect_error(&secrets, &step, &cause));
            }
        };
        let migrated = migrate(&mut conn).await;
        // Best effort: the migration has committed (or rolled back) already.
        let _ = conn.close().await;
        if let Err(e) = migrated {
            let detail = match e {
                StoreError::Backend(detail) => detail,
                other => other.to_string(),
            };
            let step = format!("cannot migrate the schema of {target}");
            return Err(connect_error(&secrets, &step, &detail));
        }
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        let growth = Arc::new(Growth {
            inserted: AtomicU64::new(0),
            next: AtomicU64::new(FIRST_ANALYZE),
        });
        Ok(PgStore { pool, growth })
    }

    /// Counts one inserted user; at each threshold, refreshes the table's statistics in the
    /// background (see [`Growth`]).
    fn grew(&self) {
        let inserted = self.growth.inserted.fetch_add(1, Ordering::Relaxed) + 1;
        let next = self.growth.next.load(Ordering::Relaxed);
        if inserted < next
            || self
                .growth
                .next
                .compare_exchange(next, next * 2, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let pool = self.pool.clone();
        tokio::spawn(async move {
            if let Err(e) = sqlx::query("ANALYZE users, bindings").execute(&pool).await {
                tracing::warn!(error = %e, "ANALYZE users, bindings failed");
            }
        });
    }

    /// Waits for the connections in use to be returned, then closes them all.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>> {
        self.pool.begin().await.map_err(db)
    }
}

/// Applies the missing migrations, under the advisory lock, in one transaction.
async fn migrate(conn: &mut PgConnection) -> Result<()> {
    let mut tx = conn.begin().await.map_err(db)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    // Checked rather than `CREATE TABLE IF NOT EXISTS`, which leaves a notice in the
    // server's answer (and so in the logs) at every start.
    let has_versions: bool =
        sqlx::query_scalar("SELECT to_regclass('reach_schema_version') IS NOT NULL")
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
    if !has_versions {
        let create = sqlx::raw_sql(
            "CREATE TABLE reach_schema_version (\
             version BIGINT NOT NULL PRIMARY KEY, applied_at BIGINT NOT NULL)",
        );
        Executor::execute(&mut *tx, create).await.map_err(db)?;
    }
    let version: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM reach_schema_version")
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Backend(format!(
            "database schema version {version} is newer than this build ({SCHEMA_VERSION})"
        )));
    }
    // By index: an iterator over the list held across the awaits would make this future
    // (and `connect`'s) not `Send` (a limit of the compiler's lifetime checks).
    for v in version + 1..=SCHEMA_VERSION {
        let script: &'static str = MIGRATIONS[(v - 1) as usize];
        Executor::execute(&mut *tx, sqlx::raw_sql(script))
            .await
            .map_err(|e| StoreError::Backend(format!("migration {v}: {e}")))?;
        sqlx::query("INSERT INTO reach_schema_version (version, applied_at) VALUES ($1, $2)")
            .bind(v)
            .bind(now_unix())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
    }
    tx.commit().await.map_err(db)
}

/// A failure of [`PgStore::connect`]: the step, then the cause, with any password of the URL
/// blotted out.
fn connect_error(secrets: &[String], step: &str, cause: &dyn std::fmt::Display) -> StoreError {
    StoreError::Backend(redact(&format!("PostgreSQL: {step}: {cause}"), secrets))
}

/// The server a connection goes to, without credentials: `user@host:port/database`.
fn describe(options: &PgConnectOptions) -> String {
    let host = match options.get_socket() {
        Some(socket) => socket.display().to_string(),
        None => options.get_host().to_owned(),
    };
    format!(
        "{}@{}:{}/{}",
        options.get_username(),
        host,
        options.get_port(),
        options.get_database().unwrap_or(options.get_username())
    )
}

/// The passwords a URL carries (in its user info or a `password` query parameter), as written
/// and percent-decoded, so that an error message quoting any of them can be cleaned.
fn url_secrets(url: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    if let Some((user_info, _host)) = authority.rsplit_once('@')
        && let Some((_user, password)) = user_info.split_once(':')
    {
        secrets.push(password.to_owned());
    }
    if let Some((_, query)) = rest.split_once('?') {
        let query = query.split('#').next().unwrap_or("");
        for pair in query.split('&') {
            if let Some(("password", password)) = pair.split_once('=') {
                secrets.push(password.to_owned());
                secrets.push(password.replace('+', " "));
            }
        }
    }
    let decoded: Vec<String> = secrets.iter().map(|s| percent_decode(s)).collect();
    secrets.extend(decoded);
    secrets.retain(|s| !s.is_empty());
    secrets.sort();
    secrets.dedup();
    // Longest first, so a password that contains another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets
}

/// `%XX` escapes decoded (invalid escapes are kept as they are; text that does not decode to
/// UTF-8 is kept whole).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map_or_else(|_| s.to_owned(), |d| d.into_owned())
}

/// `message` with each secret replaced by `***`.
fn redact(message: &str, secrets: &[String]) -> String {
    secrets.iter().fold(message.to_owned(), |m, secret| {
        m.replace(secret.as_str(), "***")
    })
}

use crate::rows::{
    USER_COLS, binding_row, config_row, db, db_fk, page_of, service_row, user_row, window,
};

/// The SQL of webhooks and presence that both backends share ([`crate::hooks`]). A user's
/// presence is read under its row lock, like every other write of a user, so one user's events
/// get their `seq` in commit order; concurrent claims skip each other's rows.
mod sq {
    crate::hooks::shared_sql!(
        sqlx::PgConnection,
        "FOR UPDATE OF u",
        "FOR UPDATE SKIP LOCKED",
        "UPDATE"
    );
}

/// Whether a read also locks the rows it returns until the transaction ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lock {
    None,
    ForUpdate,
}

/// Reads one user by SID or identity; `NotFound` when there is none.
///
/// A key with the shape of a user SID (`US` + 32 hex digits) matches the SID first and, failing
/// that, an identity spelled the same way; any other key is an identity.
async fn fetch_user<'e, E>(
    exec: E,
    service_sid: &ServiceSid,
    key: &str,
    lock: Lock,
) -> Result<UserRecord>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let mut sql = if SidKind::User.is(key) {
        format!(
            "SELECT {USER_COLS} FROM users u \
             WHERE u.service_sid = $1 AND (u.sid = $2 OR u.identity = $2) \
             ORDER BY (u.sid = $2) DESC LIMIT 1"
        )
    } else {
        format!("SELECT {USER_COLS} FROM users u WHERE u.service_sid = $1 AND u.identity = $2")
    };
    if lock == Lock::ForUpdate {
        sql += " FOR UPDATE OF u";
    }
    let row = sqlx::query(&sql)
        .bind(service_sid.as_str())
        .bind(key)
        .fetch_optional(exec)
        .await
        .map_err(db)?
        .ok_or(StoreError::NotFound)?;
    Ok(user_row(&row).map_err(db)?.1)
}

async fn fetch_binding<'e, E>(
    exec: E,
    service_sid: &ServiceSid,
    binding_sid: &str,
) -> Result<Binding>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let row = sqlx::query(&format!(
        "SELECT {BINDING_COLS} FROM bindings WHERE service_sid = $1 AND sid = $2"
    ))
    .bind(service_sid.as_str())
    .bind(binding_sid)
    .fetch_optional(exec)
    .await
    .map_err(db)?
    .ok_or(StoreError::NotFound)?;
    Ok(binding_row(&row).map_err(db)?.1)
}

async fn fetch_config<'e, E>(exec: E, service_sid: &ServiceSid) -> Result<ServiceConfig>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let row = sqlx::query(&format!(
        "SELECT {CONFIG_COLS} FROM service_configs c WHERE c.service_sid = $1"
    ))
    .bind(service_sid.as_str())
    .fetch_optional(exec)
    .await
    .map_err(db)?
    .ok_or(StoreError::NotFound)?;
    config_row(&row).map_err(db)
}

/// Locks the user's row until the transaction ends; false when there is no such user.
///
/// Every write to a user's bindings takes this lock (or updates the row) before touching the
/// bindings, so writers of one user queue in one order and never deadlock.
async fn lock_user(
    tx: &mut Transaction<'_, Postgres>,
    service_sid: &ServiceSid,
    identity: &str,
) -> Result<bool> {
    let found: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM users WHERE service_sid = $1 AND identity = $2 FOR UPDATE",
    )
    .bind(service_sid.as_str())
    .bind(identity)
    .fetch_optional(&mut **tx)
    .await
    .map_err(db)?;
    Ok(found.is_some())
}

/// A binding was deleted, a change of the user's notifiable flag: bump its revision, so the
/// engine (which keeps the newest revision) never takes an older profile over it, and record
/// `onUserUpdated` (with `fire`) if the flag changed.
async fn bump_revision(
    tx: &mut Transaction<'_, Postgres>,
    binding: &Binding,
    fire: Option<Source>,
) -> Result<()> {
    sqlx::query(
        "UPDATE users SET revision = revision + 1 WHERE service_sid = $1 AND identity = $2",
    )
    .bind(binding.service_sid.as_str())
    .bind(&binding.identity)
    .execute(&mut **tx)
    .await
    .map_err(db)?;
    let after = fetch_user(
        &mut **tx,
        &binding.service_sid,
        &binding.identity,
        Lock::None,
    )
    .await?;
    // The same user with the deleted binding still counted.
    let before = UserRecord {
        binding_count: after.binding_count + 1,
        ..after.clone()
    };
    sq::notify_update(tx, fire, &before, &after).await
}

/// Deletes one binding (already locked out by [`lock_user`]) and returns it; `NotFound` when a
/// concurrent call deleted it first.
async fn delete_binding_row(
    tx: &mut Transaction<'_, Postgres>,
    binding_sid: &str,
) -> Result<Binding> {
    let row = sqlx::query(&format!(
        "DELETE FROM bindings WHERE sid = $1 RETURNING {BINDING_COLS}"
    ))
    .bind(binding_sid)
    .fetch_optional(&mut **tx)
    .await
    .map_err(db)?
    .ok_or(StoreError::NotFound)?;
    Ok(binding_row(&row).map_err(db)?.1)
}

#[async_trait]
impl Store for PgStore {
    async fn create_service(
        &self,
        account_sid: &AccountSid,
        friendly_name: &str,
    ) -> Result<Service> {
        let now = now_unix();
        let service = Service {
            sid: ServiceSid::generate(),
            account_sid: account_sid.clone(),
            friendly_name: friendly_name.to_owned(),
            date_created: now,
            date_updated: now,
        };
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO services (sid, account_sid, friendly_name, date_created, date_updated) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(service.sid.as_str())
        .bind(service.account_sid.as_str())
        .bind(&service.friendly_name)
        .bind(service.date_created)
        .bind(service.date_updated)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query(
            "INSERT INTO service_configs (service_sid, reachability_enabled, reachability_epoch) \
             VALUES ($1, FALSE, 0)",
        )
        .bind(service.sid.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(service)
    }

    async fn get_service(
        &self,
        account_sid: &AccountSid,
        service_sid: &ServiceSid,
    ) -> Result<Service> {
        let row = sqlx::query(&format!(
            "SELECT {SERVICE_COLS} FROM services WHERE sid = $1 AND account_sid = $2"
        ))
        .bind(service_sid.as_str())
        .bind(account_sid.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?
        .ok_or(StoreError::NotFound)?;
        Ok(service_row(&row).map_err(db)?.1)
    }

    async fn find_service(&self, service_sid: &ServiceSid) -> Result<Service> {
        let row = sqlx::query(&format!(
            "SELECT {SERVICE_COLS} FROM services WHERE sid = $1"
        ))
        .bind(service_sid.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?
        .ok_or(StoreError::NotFound)?;
        Ok(service_row(&row).map_err(db)?.1)
    }

    async fn list_services(
        &self,
        account_sid: &AccountSid,
        page: PageRequest,
    ) -> Result<Page<Service>> {
        let (after, offset, limit) = window(page);
        let rows = sqlx::query(&format!(
            "SELECT {SERVICE_COLS} FROM services WHERE account_sid = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3 OFFSET $4"
        ))
        .bind(account_sid.as_str())
        .bind(after)
        .bind(limit + 1)
        .bind(offset)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        page_of(&rows, service_row, limit)
    }

    async fn delete_service(
        &self,
        account_sid: &AccountSid,
        service_sid: &ServiceSid,
    ) -> Result<()> {
        // One statement, committed on its own; the foreign keys cascade to the configuration,
        // users and bindings.
        let done = sqlx::query("DELETE FROM services WHERE sid = $1 AND account_sid = $2")
            .bind(service_sid.as_str())
            .bind(account_sid.as_str())
            .execute(&self.pool)
            .await
            .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn get_config(&self, service_sid: &ServiceSid) -> Result<ServiceConfig> {
        fetch_config(&self.pool, service_sid).await
    }

    async fn update_config(
        &self,
        service_sid: &ServiceSid,
        update: &ConfigUpdate,
    ) -> Result<ServiceConfig> {
        // One statement: the right-hand sides read the row as it was before this update, under
        // the row lock the update holds, so concurrent enables bump the epoch once.
        let row = sqlx::query(
            "UPDATE service_configs c SET \
             reachability_epoch = c.reachability_epoch \
                 + CASE WHEN $1 AND NOT c.reachability_enabled THEN 1 ELSE 0 END, \
             reachability_enabled = COALESCE($1, c.reachability_enabled), \
             default_conversation_creator_role_sid = \
                 COALESCE($2, c.default_conversation_creator_role_sid), \
             default_conversation_role_sid = COALESCE($3, c.default_conversation_role_sid), \
             default_chat_service_role_sid = COALESCE($4, c.default_chat_service_role_sid) \
             WHERE c.service_sid = $5 \
             RETURNING c.service_sid, c.reachability_enabled, c.reachability_epoch, \
             c.default_conversation_creator_role_sid, c.default_conversation_role_sid, \
             c.default_chat_service_role_sid",
        )
        .bind(update.reachability_enabled)
        .bind(&update.default_conversation_creator_role_sid)
        .bind(&update.default_conversation_role_sid)
        .bind(&update.default_chat_service_role_sid)
        .bind(service_sid.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?
        .ok_or(StoreError::NotFound)?;
        config_row(&row).map_err(db)
    }

    async fn list_configs(&self) -> Result<Vec<ServiceConfig>> {
        let rows = sqlx::query(&format!(
            "SELECT {CONFIG_COLS} FROM service_configs c \
             JOIN services s ON s.sid = c.service_sid ORDER BY s.seq"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(config_row)
            .collect::<sqlx::Result<_>>()
            .map_err(db)
    }

    async fn create_user(
        &self,
        service: &Service,
        user: &NewUser,
        fire: Option<Source>,
    ) -> Result<UserRecord> {
        let now = now_unix();
        let sid = SidKind::User.generate();
        let mut tx = self.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO users (sid, service_sid, account_sid, identity, friendly_name, \
             attributes, role_sid, date_created, date_updated) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&sid)
        .bind(service.sid.as_str())
        .bind(service.account_sid.as_str())
        .bind(&user.identity)
        .bind(&user.friendly_name)
        .bind(&user.attributes)
        .bind(&user.role_sid)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(sqlx::Error::Database(e))
                if e.is_unique_violation() && e.constraint() == Some(USERS_IDENTITY_KEY) =>
            {
                return Err(StoreError::UserExists(user.identity.clone()));
            }
            Err(e) => return Err(db_fk(e)),
        }
        let record = fetch_user(&mut *tx, &service.sid, &sid, Lock::None).await?;
        sq::notify(&mut tx, UserEvent::Added, fire, &record).await?;
        tx.commit().await.map_err(db)?;
        self.grew();
        Ok(record)
    }

    async fn get_or_create_user(&self, service: &Service, identity: &str) -> Result<UserRecord> {
        // The common case, an existing user, needs no write.
        match fetch_user(&self.pool, &service.sid, identity, Lock::None).await {
            Err(StoreError::NotFound) => {}
            found => return found,
        }
        let now = now_unix();
        let mut tx = self.begin().await?;
        // A concurrent insert of the same identity makes this one wait for it to commit, and
        // then do nothing; the next statement's snapshot sees the winner's row.
        let inserted = sqlx::query(
            "INSERT INTO users (sid, service_sid, account_sid, identity, date_created, \
             date_updated) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (service_sid, identity) DO NOTHING",
        )
        .bind(SidKind::User.generate())
        .bind(service.sid.as_str())
        .bind(service.account_sid.as_str())
        .bind(identity)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_fk)?;
        let row = sqlx::query(&format!(
            "SELECT {USER_COLS} FROM users u WHERE u.service_sid = $1 AND u.identity = $2"
        ))
        .bind(service.sid.as_str())
        .bind(identity)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let record = user_row(&row).map_err(db)?.1;
        if inserted.rows_affected() == 1 {
            sq::notify(&mut tx, UserEvent::Added, Some(Source::Sdk), &record).await?;
        }
        tx.commit().await.map_err(db)?;
        if inserted.rows_affected() == 1 {
            self.grew();
        }
        Ok(record)
    }

    async fn get_user(
        &self,
        service_sid: &ServiceSid,
        sid_or_identity: &str,
    ) -> Result<UserRecord> {
        fetch_user(&self.pool, service_sid, sid_or_identity, Lock::None).await
    }

    async fn get_users_by_identity(
        &self,
        service_sid: &ServiceSid,
        identities: &[String],
    ) -> Result<Vec<UserRecord>> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        sq::users_by_identity(&mut conn, service_sid, identities).await
    }

    async fn list_users(
        &self,
        service_sid: &ServiceSid,
        page: PageRequest,
    ) -> Result<Page<UserRecord>> {
        let (after, offset, limit) = window(page);
        let rows = sqlx::query(&format!(
            "SELECT {USER_COLS} FROM users u WHERE u.service_sid = $1 AND u.seq > $2 \
             ORDER BY u.seq LIMIT $3 OFFSET $4"
        ))
        .bind(service_sid.as_str())
        .bind(after)
        .bind(limit + 1)
        .bind(offset)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        page_of(&rows, user_row, limit)
    }

    async fn update_user(
        &self,
        service_sid: &ServiceSid,
        sid_or_identity: &str,
        update: &UserUpdate,
        fire: Option<Source>,
    ) -> Result<UserRecord> {
        let mut tx = self.begin().await?;
        let user = fetch_user(&mut *tx, service_sid, sid_or_identity, Lock::ForUpdate).await?;
        sqlx::query(
            "UPDATE users SET friendly_name = COALESCE($1, friendly_name), \
             attributes = COALESCE($2, attributes), role_sid = COALESCE($3, role_sid), \
             revision = revision + 1, date_updated = $4 WHERE sid = $5",
        )
        .bind(&update.friendly_name)
        .bind(&update.attributes)
        .bind(&update.role_sid)
        .bind(now_unix())
        .bind(&user.sid)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let record = fetch_user(&mut *tx, service_sid, &user.sid, Lock::None).await?;
        sq::notify_update(&mut tx, fire, &user, &record).await?;
        tx.commit().await.map_err(db)?;
        Ok(record)
    }

    async fn delete_user(
        &self,
        service_sid: &ServiceSid,
        sid_or_identity: &str,
        fire: Option<Source>,
    ) -> Result<UserRecord> {
        let mut tx = self.begin().await?;
        // Locked, so no binding is added or removed between this read and the deletes: the
        // returned record's binding_count is what was deleted.
        let user = fetch_user(&mut *tx, service_sid, sid_or_identity, Lock::ForUpdate).await?;
        sq::notify(&mut tx, UserEvent::Removed, fire, &user).await?;
        sqlx::query("DELETE FROM bindings WHERE service_sid = $1 AND identity = $2")
            .bind(service_sid.as_str())
            .bind(&user.identity)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query("DELETE FROM users WHERE sid = $1")
            .bind(&user.sid)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(user)
    }

    async fn mark_online(
        &self,
        service_sid: &ServiceSid,
        identity: &str,
        epoch: i64,
    ) -> Result<()> {
        // Only writes when the epoch actually advances.
        let done = sqlx::query(
            "UPDATE users SET online_epoch = $1 \
             WHERE service_sid = $2 AND identity = $3 AND online_epoch < $1",
        )
        .bind(epoch)
        .bind(service_sid.as_str())
        .bind(identity)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        if done.rows_affected() > 0 {
            return Ok(());
        }
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM users WHERE service_sid = $1 AND identity = $2")
                .bind(service_sid.as_str())
                .bind(identity)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        exists.map(|_| ()).ok_or(StoreError::NotFound)
    }

    async fn upsert_binding(
        &self,
        service: &Service,
        identity: &str,
        binding_type: &str,
        address: &str,
        credential_sid: Option<&str>,
    ) -> Result<Binding> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        // The user's row lock (see `lock_user`), and what it was before.
        let before = fetch_user(&mut *tx, &service.sid, identity, Lock::ForUpdate).await?;
        let marked = sqlx::query(
            "UPDATE users SET ever_had_binding = TRUE, revision = revision + 1 \
             WHERE service_sid = $1 AND identity = $2",
        )
        .bind(service.sid.as_str())
        .bind(identity)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if marked.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        sqlx::query(
            "INSERT INTO bindings (sid, service_sid, account_sid, identity, binding_type, \
             address, credential_sid, date_created, date_updated) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (service_sid, identity, binding_type, address) DO NOTHING",
        )
        .bind(SidKind::Binding.generate())
        .bind(service.sid.as_str())
        .bind(service.account_sid.as_str())
        .bind(identity)
        .bind(binding_type)
        .bind(address)
        .bind(credential_sid)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_fk)?;
        let row = sqlx::query(&format!(
            "SELECT {BINDING_COLS} FROM bindings WHERE service_sid = $1 AND identity = $2 \
             AND binding_type = $3 AND address = $4"
        ))
        .bind(service.sid.as_str())
        .bind(identity)
        .bind(binding_type)
        .bind(address)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let binding = binding_row(&row).map_err(db)?.1;
        let after = fetch_user(&mut *tx, &service.sid, identity, Lock::None).await?;
        sq::notify_update(&mut tx, Some(Source::Sdk), &before, &after).await?;
        tx.commit().await.map_err(db)?;
        Ok(binding)
    }

    async fn delete_binding_by_address(
        &self,
        service_sid: &ServiceSid,
        identity: &str,
        binding_type: &str,
        address: &str,
    ) -> Result<Binding> {
        let mut tx = self.begin().await?;
        // No user, no bindings (they reference it).
        if !lock_user(&mut tx, service_sid, identity).await? {
            return Err(StoreError::NotFound);
        }
        let row = sqlx::query(&format!(
            "DELETE FROM bindings WHERE service_sid = $1 AND identity = $2 \
             AND binding_type = $3 AND address = $4 RETURNING {BINDING_COLS}"
        ))
        .bind(service_sid.as_str())
        .bind(identity)
        .bind(binding_type)
        .bind(address)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?
        .ok_or(StoreError::NotFound)?;
        let binding = binding_row(&row).map_err(db)?.1;
        bump_revision(&mut tx, &binding, Some(Source::Sdk)).await?;
        tx.commit().await.map_err(db)?;
        Ok(binding)
    }

    async fn get_binding(&self, service_sid: &ServiceSid, binding_sid: &str) -> Result<Binding> {
        fetch_binding(&self.pool, service_sid, binding_sid).await
    }

    async fn delete_binding(
        &self,
        service_sid: &ServiceSid,
        binding_sid: &str,
        fire: Option<Source>,
    ) -> Result<Binding> {
        let mut tx = self.begin().await?;
        // The user's row first, then the binding: the order every writer of a user follows.
        let found = fetch_binding(&mut *tx, service_sid, binding_sid).await?;
        if !lock_user(&mut tx, service_sid, &found.identity).await? {
            return Err(StoreError::NotFound);
        }
        let binding = delete_binding_row(&mut tx, &found.sid).await?;
        bump_revision(&mut tx, &binding, fire).await?;
        tx.commit().await.map_err(db)?;
        Ok(binding)
    }

    async fn list_bindings(
        &self,
        service_sid: &ServiceSid,
        filter: &BindingFilter,
        page: PageRequest,
    ) -> Result<Page<Binding>> {
        let (after, offset, limit) = window(page);
        let mut sql = format!("SELECT {BINDING_COLS} FROM bindings WHERE service_sid = $1");
        let mut n = 1;
        if !filter.binding_types.is_empty() {
            n += 1;
            sql += &format!(" AND binding_type = ANY(${n})");
        }
        if !filter.identities.is_empty() {
            n += 1;
            sql += &format!(" AND identity = ANY(${n})");
        }
        sql += &format!(
            " AND seq > ${} ORDER BY seq LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2,
            n + 3
        );
        let mut query = sqlx::query(&sql).bind(service_sid.as_str());
        if !filter.binding_types.is_empty() {
            query = query.bind(&filter.binding_types);
        }
        if !filter.identities.is_empty() {
            query = query.bind(&filter.identities);
        }
        let rows = query
            .bind(after)
            .bind(limit + 1)
            .bind(offset)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        page_of(&rows, binding_row, limit)
    }

    async fn count_bindings(&self, service_sid: &ServiceSid, identity: &str) -> Result<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM bindings WHERE service_sid = $1 AND identity = $2")
            .bind(service_sid.as_str())
            .bind(identity)
            .fetch_one(&self.pool)
            .await
            .map_err(db)
    }

    async fn get_webhook(&self, service_sid: &ServiceSid) -> Result<WebhookConfig> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        fetch_config(&mut *conn, service_sid).await?;
        sq::webhook(&mut conn, service_sid).await
    }

    async fn update_webhook(
        &self,
        service_sid: &ServiceSid,
        update: &WebhookUpdate,
    ) -> Result<WebhookConfig> {
        let mut tx = self.begin().await?;
        // The configuration row stands for the service: locked, concurrent updates of its
        // webhook apply one after the other.
        let found: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM service_configs WHERE service_sid = $1 FOR UPDATE")
                .bind(service_sid.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
        if found.is_none() {
            return Err(StoreError::NotFound);
        }
        let mut hook = sq::webhook(&mut tx, service_sid).await?;
        hook.apply(update);
        sq::put_webhook(&mut tx, &hook).await?;
        tx.commit().await.map_err(db)?;
        Ok(hook)
    }

    async fn record_presence(&self, changes: &[PresenceRecord]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        sq::record_presence_batch(&mut tx, changes).await?;
        tx.commit().await.map_err(db)
    }

    async fn online_users(&self, after: i64, limit: i64) -> Result<Vec<OnlineUser>> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        sq::online_users(&mut conn, after, limit).await
    }

    async fn max_presence_version(&self) -> Result<i64> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        sq::max_presence_version(&mut conn).await
    }

    async fn claim_events(
        &self,
        node: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: i64,
    ) -> Result<Vec<ClaimedEvent>> {
        {
            let mut conn = self.pool.acquire().await.map_err(db)?;
            if !sq::any_due(&mut conn, now_ms).await? {
                return Ok(Vec::new());
            }
        }
        let mut tx = self.begin().await?;
        let mut events = sq::claim(&mut tx, node, now_ms, lease_ms, limit).await?;
        sq::targets(&mut tx, &mut events).await?;
        tx.commit().await.map_err(db)?;
        Ok(events)
    }

    async fn complete_events(&self, node: &str, outcomes: &[(Claim, Completion)]) -> Result<()> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        sq::complete(&mut tx, node, outcomes).await?;
        tx.commit().await.map_err(db)
    }

    async fn release_events(&self, node: Option<&str>) -> Result<u64> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        sq::release(&mut conn, node).await
    }

    async fn queue_stats(&self) -> Result<QueueStats> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        sq::stats(&mut conn).await
    }

    async fn touch_node(&self, node: &str, now: i64) -> Result<Option<i64>> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        sq::touch_node(&mut conn, node, now).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_versions_follow_the_list() {
        assert_eq!(SCHEMA_VERSION, 2);
        assert_eq!(MIGRATIONS.len() as i64, SCHEMA_VERSION);
    }

    #[test]
    fn secrets_are_found_in_user_info_and_query() {
        assert_eq!(
            url_secrets("postgres://reach:s3cr%40t@db:5432/reach"),
            vec!["s3cr%40t".to_owned(), "s3cr@t".to_owned()]
        );
        assert_eq!(
            url_secrets("postgres://db/reach?sslmode=require&password=hunter2"),
            vec!["hunter2".to_owned()]
        );
        assert!(url_secrets("postgres://reach@db/reach").is_empty());
        assert!(url_secrets("postgres://db/reach?user=a:b@c").is_empty());
        assert_eq!(
            redact(
                "x s3cr@t y s3cr%40t",
                &url_secrets("postgres://u:s3cr%40t@h/d")
            ),
            "x *** y ***"
        );
    }

    #[test]
    fn connect_can_be_spawned() {
        fn assert_send<T: Send>(_: &T) {}
        assert_send(&PgStore::connect("postgres://localhost/reach"));
    }

    #[tokio::test]
    async fn a_bad_url_names_the_step_and_hides_the_password() {
        let url = "postgres://reach:pa55word@127.0.0.1:notaport/reach";
        let Err(StoreError::Backend(message)) = PgStore::connect(url).await else {
            panic!("expected a backend error");
        };
        assert!(message.contains("invalid database URL"), "{message}");
        assert!(!message.contains("pa55word"), "{message}");
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_server_but_not_the_password() {
        // Port 1 on the loopback interface: nothing listens there, the refusal is immediate.
        let url = "postgres://reach:pa55word@127.0.0.1:1/reachdb";
        let Err(StoreError::Backend(message)) = PgStore::connect(url).await else {
            panic!("expected a backend error");
        };
        assert!(
            message.contains("cannot connect to reach@127.0.0.1:1/reachdb"),
            "{message}"
        );
        assert!(!message.contains("pa55word"), "{message}");
    }
}
