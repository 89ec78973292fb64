//! SQLite backend of [`Store`]: one database file, for a single node.
//!
//! # Schema (version 2, recorded in `PRAGMA user_version`)
//!
//! Version 1 made the records; version 2 added what webhooks and last-seen times need (the
//! migrations are [`MIGRATIONS`], applied in order from the file's version at open).
//!
//! - `services`: one row per service, scoped by `account_sid`.
//! - `service_configs`: one row per service (created with it), `ON DELETE CASCADE`.
//! - `users`: `UNIQUE(service_sid, identity)`, cascade-deleted with their service.
//! - `bindings`: `UNIQUE(service_sid, identity, binding_type, address)`, cascade-deleted with
//!   their service and with their user (and also deleted explicitly in `delete_user`).
//! - `users.presence_online`, `presence_version`, `last_seen_at` (v2): presence as subscribers
//!   saw it, with the partial index `users_online` for the users recorded online.
//! - `service_webhooks` (v2): one row per service that set its webhook, cascade-deleted.
//! - `webhook_events` (v2): the delivery queue ([`crate::hooks`]), cascade-deleted with the
//!   service, indexed by user and `seq`.
//! - `nodes` (v2): when each node last said it was alive.
//!
//! Every listed table has `seq INTEGER PRIMARY KEY AUTOINCREMENT` (the rowid, never reused)
//! next to its `sid UNIQUE`: lists are ordered by `seq`, i.e. by insertion, and a page's
//! `next_cursor` is the `seq` of its last row (keyset paging; `offset` is the fallback).
//!
//! # Durability
//!
//! The file is opened in WAL mode with `synchronous=FULL`, so every commit is fsynced before
//! the call returns: an acknowledged write survives a crash, `kill -9` or power loss.
//! `foreign_keys=ON` on every connection. Multi-statement writes run in `BEGIN IMMEDIATE`
//! transactions (the write lock is taken up front, so they never fail half-way with a busy
//! snapshot); concurrent writers wait on the 5 s busy timeout. Nothing is buffered in memory:
//! each method returns only after its transaction has committed. The presence batches have a
//! connection of their own (its page cache stays warm between them); everything else shares a
//! pool of four.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use reach_proto::SidKind;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use crate::hooks::{Claim, OnlineUser};
use crate::{
    AccountSid, Binding, BindingFilter, ClaimedEvent, Completion, ConfigUpdate, NewUser, Page,
    PageRequest, PresenceRecord, QueueStats, Result, Service, ServiceConfig, ServiceSid, Source,
    Store, StoreError, UserEvent, UserRecord, UserUpdate, WebhookConfig, WebhookUpdate, now_unix,
};

/// The schema migrations, in order: version `n` is `MIGRATIONS[n - 1]`. Never edit an entry
/// that has shipped; append a new one.
const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2];

/// The schema version this code writes and understands.
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const SCHEMA_V1: &str = r#"
CREATE TABLE IF NOT EXISTS services (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    sid           TEXT    NOT NULL UNIQUE,
    account_sid   TEXT    NOT NULL,
    friendly_name TEXT    NOT NULL,
    date_created  INTEGER NOT NULL,
    date_updated  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS services_by_account ON services (account_sid, seq);

CREATE TABLE IF NOT EXISTS service_configs (
    service_sid                           TEXT    NOT NULL PRIMARY KEY
                                                  REFERENCES services (sid) ON DELETE CASCADE,
    reachability_enabled                  INTEGER NOT NULL DEFAULT 0,
    reachability_epoch                    INTEGER NOT NULL DEFAULT 0,
    default_conversation_creator_role_sid TEXT,
    default_conversation_role_sid         TEXT,
    default_chat_service_role_sid         TEXT
);

CREATE TABLE IF NOT EXISTS users (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    sid              TEXT    NOT NULL UNIQUE,
    service_sid      TEXT    NOT NULL REFERENCES services (sid) ON DELETE CASCADE,
    account_sid      TEXT    NOT NULL,
    identity         TEXT    NOT NULL,
    friendly_name    TEXT,
    attributes       TEXT,
    role_sid         TEXT,
    date_created     INTEGER NOT NULL,
    date_updated     INTEGER NOT NULL,
    revision         INTEGER NOT NULL DEFAULT 0,
    online_epoch     INTEGER NOT NULL DEFAULT 0,
    ever_had_binding INTEGER NOT NULL DEFAULT 0,
    UNIQUE (service_sid, identity)
);
CREATE INDEX IF NOT EXISTS users_by_service ON users (service_sid, seq);

CREATE TABLE IF NOT EXISTS bindings (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    sid            TEXT    NOT NULL UNIQUE,
    service_sid    TEXT    NOT NULL REFERENCES services (sid) ON DELETE CASCADE,
    account_sid    TEXT    NOT NULL,
    identity       TEXT    NOT NULL,
    binding_type   TEXT    NOT NULL,
    address        TEXT    NOT NULL,
    credential_sid TEXT,
    date_created   INTEGER NOT NULL,
    date_updated   INTEGER NOT NULL,
    UNIQUE (service_sid, identity, binding_type, address),
    FOREIGN KEY (service_sid, identity) REFERENCES users (service_sid, identity)
        ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS bindings_by_service ON bindings (service_sid, seq);
"#;

const SCHEMA_V2: &str = r#"
ALTER TABLE users ADD COLUMN presence_online INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN presence_version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN last_seen_at INTEGER;
CREATE INDEX users_online ON users (seq) WHERE presence_online = TRUE;

CREATE TABLE service_webhooks (
    service_sid      TEXT    NOT NULL PRIMARY KEY
                             REFERENCES services (sid) ON DELETE CASCADE,
    pre_webhook_url  TEXT,
    post_webhook_url TEXT,
    method           TEXT    NOT NULL DEFAULT 'POST',
    filters          TEXT    NOT NULL DEFAULT '',
    date_updated     INTEGER NOT NULL
);

CREATE TABLE webhook_events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    token           TEXT    NOT NULL UNIQUE,
    service_sid     TEXT    NOT NULL REFERENCES services (sid) ON DELETE CASCADE,
    identity        TEXT    NOT NULL,
    event_type      TEXT    NOT NULL,
    params          TEXT    NOT NULL,
    created_ms      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    lease_owner     TEXT,
    lease_until_ms  INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT
);
CREATE INDEX webhook_events_by_user ON webhook_events (service_sid, identity, seq);

CREATE TABLE nodes (
    node_id  TEXT    NOT NULL PRIMARY KEY,
    alive_at INTEGER NOT NULL
);
"#;

const SERVICE_COLS: &str = "seq, sid, account_sid, friendly_name, date_created, date_updated";

const CONFIG_COLS: &str = "c.service_sid, c.reachability_enabled, c.reachability_epoch, \
     c.default_conversation_creator_role_sid, c.default_conversation_role_sid, \
     c.default_chat_service_role_sid";

const BINDING_COLS: &str = "seq, sid, account_sid, service_sid, credential_sid, identity, \
     binding_type, address, date_created, date_updated";

/// [`Store`] on a SQLite file. Cheap to clone (the clones share one connection pool).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// One connection of its own for the presence batches and online epochs (the engine's
    /// steady stream of writes): its page cache stays warm from one batch to the next, unless
    /// the pool's connections committed in between (REST writes, webhook outcomes). The pool
    /// hands out its connections in turn, and a connection whose last transaction came before
    /// another connection's commit starts over with an empty cache (every page of a batch read
    /// from the file again).
    recorder: SqlitePool,
    /// `<database>.lock`, locked until the store is closed or dropped: a second process (or
    /// store) on the same file is refused instead of silently sharing it.
    lock: std::sync::Arc<std::fs::File>,
}

impl SqliteStore {
    /// Opens (creating the file and its parent folder when missing) the database at `path`,
    /// and creates or checks the schema. Fails with [`StoreError::InUse`] while another store,
    /// in this process or another, has it open.
    pub async fn open(path: &Path) -> Result<SqliteStore> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            // A folder made here is the owner's alone (records, push addresses, the generated
            // credentials); an existing one keeps its mode.
            let mut folder = std::fs::DirBuilder::new();
            folder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut folder, 0o700);
            folder.create(parent).map_err(|e| {
                StoreError::Backend(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let lock = lock_file(path)?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        // A connection to a local file does not go stale as a network one does: no ping (a
        // round trip to the connection's thread) before each use.
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await
            .map_err(db)?;
        // Kept for the store's life: a new connection starts with a cold cache.
        let recorder = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with(options);
        let store = SqliteStore {
            pool,
            recorder,
            lock: std::sync::Arc::new(lock),
        };
        if let Err(e) = store.migrate().await {
            store.pool.close().await;
            return Err(e);
        }
        Ok(store)
    }

    /// Waits for the connections in use to be returned, then closes them all and releases the
    /// file's lock.
    pub async fn close(&self) {
        self.recorder.close().await;
        self.pool.close().await;
        let _ = self.lock.unlock();
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.begin().await?;
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Backend(format!(
                "database schema version {version} is newer than this build ({SCHEMA_VERSION})"
            )));
        }
        for v in version + 1..=SCHEMA_VERSION {
            let script = MIGRATIONS[(v - 1) as usize];
            sqlx::raw_sql(script)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::Backend(format!("migration {v}: {e}")))?;
        }
        if version < SCHEMA_VERSION {
            sqlx::raw_sql(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    /// A write transaction that holds the database's write lock from its start.
    async fn begin(&self) -> Result<Transaction<'static, Sqlite>> {
        begin_on(&self.pool).await
    }
}

use crate::rows::{
    USER_COLS, binding_row, config_row, db, db_fk, page_of, service_row, user_row, window,
};

/// [`SqliteStore::begin`] on `pool` (the store's pool, or the recorder's connection).
async fn begin_on(pool: &SqlitePool) -> Result<Transaction<'static, Sqlite>> {
    pool.begin_with("BEGIN IMMEDIATE").await.map_err(db)
}

/// The SQL of webhooks and presence that both backends share ([`crate::hooks`]); SQLite's
/// write transactions hold the whole database, so reads need no row lock.
mod sq {
    crate::hooks::shared_sql!(sqlx::SqliteConnection, "", "", "UPDATE OR FAIL");
}

/// Reads one user by SID or identity; `NotFound` when there is none.
///
/// A key with the shape of a user SID (`US` + 32 hex digits) matches the SID first and, failing
/// that, an identity spelled the same way; any other key is an identity.
async fn fetch_user<'e, E>(exec: E, service_sid: &ServiceSid, key: &str) -> Result<UserRecord>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let sql = if SidKind::User.is(key) {
        format!(
            "SELECT {USER_COLS} FROM users u \
             WHERE u.service_sid = ?1 AND (u.sid = ?2 OR u.identity = ?2) \
             ORDER BY u.sid = ?2 DESC LIMIT 1"
        )
    } else {
        format!("SELECT {USER_COLS} FROM users u WHERE u.service_sid = ?1 AND u.identity = ?2")
    };
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
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let row = sqlx::query(&format!(
        "SELECT {BINDING_COLS} FROM bindings WHERE service_sid = ? AND sid = ?"
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
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let row = sqlx::query(&format!(
        "SELECT {CONFIG_COLS} FROM service_configs c WHERE c.service_sid = ?"
    ))
    .bind(service_sid.as_str())
    .fetch_optional(exec)
    .await
    .map_err(db)?
    .ok_or(StoreError::NotFound)?;
    config_row(&row).map_err(db)
}

/// Takes the lock of the database at `path` (`<path>.lock`, an advisory lock the kernel drops
/// with the process, so a `kill -9` leaves nothing to clean up).
fn lock_file(path: &Path) -> Result<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = std::path::PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(StoreError::InUse(lock_path.display().to_string()))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Backend(format!(
            "cannot lock {}: {e}",
            lock_path.display()
        ))),
    }
}

#[async_trait]
impl Store for SqliteStore {
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
             VALUES (?, ?, ?, ?, ?)",
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
             VALUES (?, 0, 0)",
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
            "SELECT {SERVICE_COLS} FROM services WHERE sid = ? AND account_sid = ?"
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
            "SELECT {SERVICE_COLS} FROM services WHERE sid = ?"
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
            "SELECT {SERVICE_COLS} FROM services WHERE account_sid = ? AND seq > ? \
             ORDER BY seq LIMIT ? OFFSET ?"
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
        let done = sqlx::query("DELETE FROM services WHERE sid = ? AND account_sid = ?")
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
        let mut tx = self.begin().await?;
        let mut config = fetch_config(&mut *tx, service_sid).await?;
        if let Some(enabled) = update.reachability_enabled {
            if enabled && !config.reachability_enabled {
                config.reachability_epoch += 1;
            }
            config.reachability_enabled = enabled;
        }
        if let Some(role) = &update.default_conversation_creator_role_sid {
            config.default_conversation_creator_role_sid = Some(role.clone());
        }
        if let Some(role) = &update.default_conversation_role_sid {
            config.default_conversation_role_sid = Some(role.clone());
        }
        if let Some(role) = &update.default_chat_service_role_sid {
            config.default_chat_service_role_sid = Some(role.clone());
        }
        sqlx::query(
            "UPDATE service_configs SET reachability_enabled = ?, reachability_epoch = ?, \
             default_conversation_creator_role_sid = ?, default_conversation_role_sid = ?, \
             default_chat_service_role_sid = ? WHERE service_sid = ?",
        )
        .bind(config.reachability_enabled)
        .bind(config.reachability_epoch)
        .bind(&config.default_conversation_creator_role_sid)
        .bind(&config.default_conversation_role_sid)
        .bind(&config.default_chat_service_role_sid)
        .bind(service_sid.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(config)
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
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(StoreError::UserExists(user.identity.clone()));
            }
            Err(e) => return Err(db_fk(e)),
        }
        let record = fetch_user(&mut *tx, &service.sid, &sid).await?;
        sq::notify(&mut tx, UserEvent::Added, fire, &record).await?;
        tx.commit().await.map_err(db)?;
        Ok(record)
    }

    async fn get_or_create_user(&self, service: &Service, identity: &str) -> Result<UserRecord> {
        // The common case, an existing user, needs no write (and no fsync).
        match fetch_user(&self.pool, &service.sid, identity).await {
            Err(StoreError::NotFound) => {}
            found => return found,
        }
        let now = now_unix();
        let mut tx = self.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO users (sid, service_sid, account_sid, identity, date_created, \
             date_updated) VALUES (?, ?, ?, ?, ?, ?) \
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
            "SELECT {USER_COLS} FROM users u WHERE u.service_sid = ? AND u.identity = ?"
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
        Ok(record)
    }

    async fn get_user(
        &self,
        service_sid: &ServiceSid,
        sid_or_identity: &str,
    ) -> Result<UserRecord> {
        fetch_user(&self.pool, service_sid, sid_or_identity).await
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
            "SELECT {USER_COLS} FROM users u WHERE u.service_sid = ? AND u.seq > ? \
             ORDER BY u.seq LIMIT ? OFFSET ?"
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
        let user = fetch_user(&mut *tx, service_sid, sid_or_identity).await?;
        sqlx::query(
            "UPDATE users SET friendly_name = COALESCE(?, friendly_name), \
             attributes = COALESCE(?, attributes), role_sid = COALESCE(?, role_sid), \
             revision = revision + 1, date_updated = ? WHERE sid = ?",
        )
        .bind(&update.friendly_name)
        .bind(&update.attributes)
        .bind(&update.role_sid)
        .bind(now_unix())
        .bind(&user.sid)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let record = fetch_user(&mut *tx, service_sid, &user.sid).await?;
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
        let user = fetch_user(&mut *tx, service_sid, sid_or_identity).await?;
        sq::notify(&mut tx, UserEvent::Removed, fire, &user).await?;
        sqlx::query("DELETE FROM bindings WHERE service_sid = ? AND identity = ?")
            .bind(service_sid.as_str())
            .bind(&user.identity)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query("DELETE FROM users WHERE sid = ?")
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
            "UPDATE users SET online_epoch = ? \
             WHERE service_sid = ? AND identity = ? AND online_epoch < ?",
        )
        .bind(epoch)
        .bind(service_sid.as_str())
        .bind(identity)
        .bind(epoch)
        .execute(&self.recorder)
        .await
        .map_err(db)?;
        if done.rows_affected() > 0 {
            return Ok(());
        }
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM users WHERE service_sid = ? AND identity = ?")
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
        let before = fetch_user(&mut *tx, &service.sid, identity).await?;
        let marked = sqlx::query(
            "UPDATE users SET ever_had_binding = 1, revision = revision + 1 \
             WHERE service_sid = ? AND identity = ?",
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
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
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
            "SELECT {BINDING_COLS} FROM bindings WHERE service_sid = ? AND identity = ? \
             AND binding_type = ? AND address = ?"
        ))
        .bind(service.sid.as_str())
        .bind(identity)
        .bind(binding_type)
        .bind(address)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let binding = binding_row(&row).map_err(db)?.1;
        let after = fetch_user(&mut *tx, &service.sid, identity).await?;
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
        let row = sqlx::query(&format!(
            "SELECT {BINDING_COLS} FROM bindings WHERE service_sid = ? AND identity = ? \
             AND binding_type = ? AND address = ?"
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
        sqlx::query("DELETE FROM bindings WHERE sid = ?")
            .bind(&binding.sid)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
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
        let binding = fetch_binding(&mut *tx, service_sid, binding_sid).await?;
        sqlx::query("DELETE FROM bindings WHERE sid = ?")
            .bind(&binding.sid)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
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
        let placeholders = |n: usize| vec!["?"; n].join(", ");
        let mut sql = format!("SELECT {BINDING_COLS} FROM bindings WHERE service_sid = ?");
        if !filter.binding_types.is_empty() {
            sql += &format!(
                " AND binding_type IN ({})",
                placeholders(filter.binding_types.len())
            );
        }
        if !filter.identities.is_empty() {
            sql += &format!(
                " AND identity IN ({})",
                placeholders(filter.identities.len())
            );
        }
        sql += " AND seq > ? ORDER BY seq LIMIT ? OFFSET ?";
        let mut query = sqlx::query(&sql).bind(service_sid.as_str());
        for binding_type in &filter.binding_types {
            query = query.bind(binding_type);
        }
        for identity in &filter.identities {
            query = query.bind(identity);
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
        sqlx::query_scalar("SELECT COUNT(*) FROM bindings WHERE service_sid = ? AND identity = ?")
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
        fetch_config(&mut *tx, service_sid).await?;
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
        let mut tx = begin_on(&self.recorder).await?;
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
        let mut tx = self.begin().await?;
        let before = sq::touch_node(&mut tx, node, now).await?;
        tx.commit().await.map_err(db)?;
        Ok(before)
    }
}

/// A binding was deleted, a change of the user's notifiable flag: bump its revision, so the
/// engine (which keeps the newest revision) never takes an older profile over it, and record
/// `onUserUpdated` (with `fire`) if the flag changed.
async fn bump_revision(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    binding: &Binding,
    fire: Option<Source>,
) -> Result<()> {
    sqlx::query("UPDATE users SET revision = revision + 1 WHERE service_sid = ? AND identity = ?")
        .bind(binding.service_sid.as_str())
        .bind(&binding.identity)
        .execute(&mut **tx)
        .await
        .map_err(db)?;
    let after = fetch_user(&mut **tx, &binding.service_sid, &binding.identity).await?;
    // The same user with the deleted binding still counted.
    let before = UserRecord {
        binding_count: after.binding_count + 1,
        ..after.clone()
    };
    sq::notify_update(tx, fire, &before, &after).await
}

/// SQLite-only checks (pragmas, reopening the file, the schema version). The behaviour shared
/// with the PostgreSQL backend is tested against both in `tests/conformance.rs`.
#[cfg(test)]
mod tests {
    use super::*;

    fn ac() -> AccountSid {
        "AC00000000000000000000000000000001".parse().unwrap()
    }

    async fn open_temp() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("nested/dir/reach.db"))
            .await
            .unwrap();
        (dir, store)
    }

    fn new_user(identity: &str) -> NewUser {
        NewUser {
            identity: identity.to_owned(),
            ..NewUser::default()
        }
    }

    /// The detail lines of SQLite's plan for `sql` (its `$n` parameters left unbound).
    async fn plan(store: &SqliteStore, sql: &str) -> Vec<String> {
        let rows = sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
            .fetch_all(&store.pool)
            .await
            .unwrap_or_else(|e| panic!("{e}: {sql}"));
        rows.iter()
            .map(|r| sqlx::Row::get::<String, _>(r, "detail"))
            .collect()
    }

    #[tokio::test]
    async fn reads_by_user_look_up_keys_instead_of_scanning() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("reach.db"))
            .await
            .unwrap();
        let one =
            format!("SELECT {USER_COLS} FROM users u WHERE u.service_sid = $1 AND u.identity = $2");
        let batch = crate::hooks::presence_select_sql(8, true, "");
        let narrow = crate::hooks::presence_select_sql(8, false, "");
        let identities = crate::hooks::identities_select_sql(8);
        for sql in [one, batch, narrow, identities] {
            let lines = plan(&store, &sql).await;
            // `k` is the keys asked for; a scan of users (u) or bindings (b) grows with the
            // table, or with the service (`bindings_by_service` searched, then filtered).
            assert!(
                !lines
                    .iter()
                    .any(|l| l.starts_with("SCAN u") || l.starts_with("SCAN b")),
                "{lines:?}"
            );
            assert!(
                lines
                    .iter()
                    .filter(|l| l.starts_with("SEARCH"))
                    .all(|l| l.contains("identity=?")),
                "{lines:?}"
            );
        }
        store.close().await;
    }

    #[tokio::test]
    async fn open_sets_durability_pragmas_and_schema_version() {
        let (_dir, store) = open_temp().await;
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(sync, 2, "FULL");
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(fk, 1);
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        store.close().await;
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_data_folder_it_creates_is_the_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, store) = open_temp().await;
        for folder in ["nested", "nested/dir"] {
            let mode = std::fs::metadata(dir.path().join(folder))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700, "{folder}: {mode:o}");
        }
        store.close().await;
    }

    #[tokio::test]
    async fn a_second_store_on_the_same_file_is_refused_until_the_first_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reach.db");
        let first = SqliteStore::open(&path).await.unwrap();
        match SqliteStore::open(&path).await {
            Err(StoreError::InUse(lock)) => assert!(lock.ends_with("reach.db.lock"), "{lock}"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a second store opened the same file"),
        }
        first.close().await;
        SqliteStore::open(&path).await.unwrap().close().await;
    }

    #[tokio::test]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reach.db");
        let (svc, user, binding, config) = {
            let store = SqliteStore::open(&path).await.unwrap();
            let svc = store.create_service(&ac(), "durable").await.unwrap();
            let config = store
                .update_config(
                    &svc.sid,
                    &ConfigUpdate {
                        reachability_enabled: Some(true),
                        ..ConfigUpdate::default()
                    },
                )
                .await
                .unwrap();
            store
                .create_user(&svc, &new_user("alice"), None)
                .await
                .unwrap();
            store.mark_online(&svc.sid, "alice", 1).await.unwrap();
            let binding = store
                .upsert_binding(&svc, "alice", "fcm", "tok", None)
                .await
                .unwrap();
            let user = store.get_user(&svc.sid, "alice").await.unwrap();
            // Dropped without close(): every write was already committed.
            drop(store);
            (svc, user, binding, config)
        };

        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.get_service(&ac(), &svc.sid).await.unwrap(), svc);
        assert_eq!(store.get_config(&svc.sid).await.unwrap(), config);
        assert_eq!(store.get_user(&svc.sid, &user.sid).await.unwrap(), user);
        assert_eq!(user.online_epoch, 1);
        assert_eq!(
            store.get_binding(&svc.sid, &binding.sid).await.unwrap(),
            binding
        );
        store.close().await;

        // A third open (schema already at version 1) also works.
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.list_configs().await.unwrap(), vec![config]);
        store.close().await;
    }

    #[tokio::test]
    async fn a_version_1_file_is_migrated_with_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reach.db");
        {
            // What a build of schema version 1 left behind.
            let pool = SqlitePoolOptions::new()
                .connect_with(
                    SqliteConnectOptions::new()
                        .filename(&path)
                        .create_if_missing(true),
                )
                .await
                .unwrap();
            sqlx::raw_sql(SCHEMA_V1).execute(&pool).await.unwrap();
            sqlx::raw_sql(
                "PRAGMA user_version = 1; \
                 INSERT INTO services (sid, account_sid, friendly_name, date_created, \
                 date_updated) VALUES ('IS00000000000000000000000000000001', \
                 'AC00000000000000000000000000000001', 'old', 0, 0); \
                 INSERT INTO service_configs (service_sid) \
                 VALUES ('IS00000000000000000000000000000001'); \
                 INSERT INTO users (sid, service_sid, account_sid, identity, date_created, \
                 date_updated) VALUES ('US00000000000000000000000000000001', \
                 'IS00000000000000000000000000000001', 'AC00000000000000000000000000000001', \
                 'alice', 0, 0)",
            )
            .execute(&pool)
            .await
            .unwrap();
            pool.close().await;
        }
        let store = SqliteStore::open(&path).await.unwrap();
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let sid = "IS00000000000000000000000000000001".parse().unwrap();
        let alice = store.get_user(&sid, "alice").await.unwrap();
        assert!(!alice.presence_online);
        assert_eq!(alice.last_seen_at, None);
        assert_eq!(
            store.get_webhook(&sid).await.unwrap().post_webhook_url,
            None
        );
        store.close().await;
    }

    #[tokio::test]
    async fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reach.db");
        let store = SqliteStore::open(&path).await.unwrap();
        sqlx::query("PRAGMA user_version = 99")
            .execute(&store.pool)
            .await
            .unwrap();
        store.close().await;
        assert!(matches!(
            SqliteStore::open(&path).await,
            Err(StoreError::Backend(_))
        ));
    }
}
