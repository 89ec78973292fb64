//! Test fixtures: a store of either backend on a database of its own, plus a raw connection to
//! that database for the few checks the trait cannot express (rows left in a table).
//!
//! PostgreSQL fixtures need `REACH_TEST_POSTGRES_URL` (e.g.
//! `postgres://postgres@127.0.0.1:5432/postgres`): each one creates a database
//! `reach_test_<random hex>` through that URL and drops it (`WITH (FORCE)`, best effort) when
//! the fixture is dropped, also when the test panics. Without the variable a PostgreSQL test
//! writes one `skipped: ...` line to stderr and returns.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, LazyLock};

use reach_store::postgres::PgStore;
use reach_store::sqlite::SqliteStore;
use reach_store::{AccountSid, NewUser, PageRequest, Store};
use sqlx::postgres::PgPool;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
use sqlx::{Connection, Executor, PgConnection};

pub static AC: LazyLock<AccountSid> =
    LazyLock::new(|| "AC00000000000000000000000000000001".parse().unwrap());
pub static OTHER_AC: LazyLock<AccountSid> =
    LazyLock::new(|| "AC00000000000000000000000000000002".parse().unwrap());

/// The environment variable that names the PostgreSQL server to test against.
pub const PG_URL_VAR: &str = "REACH_TEST_POSTGRES_URL";

pub fn first(limit: i64) -> PageRequest {
    PageRequest {
        after: None,
        offset: 0,
        limit,
    }
}

pub fn new_user(identity: &str) -> NewUser {
    NewUser {
        identity: identity.to_owned(),
        ..NewUser::default()
    }
}

/// A store on a database of its own. Fields drop in order: the store, then the raw pool, then
/// the database itself.
pub struct Fixture {
    pub store: Arc<dyn Store>,
    raw: Raw,
    _db: Db,
}

enum Raw {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(TestDb),
}

impl Fixture {
    pub async fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/reach.db");
        let store = SqliteStore::open(&path).await.unwrap();
        let raw = SqlitePool::connect_with(SqliteConnectOptions::new().filename(&path))
            .await
            .unwrap();
        Fixture {
            store: Arc::new(store),
            raw: Raw::Sqlite(raw),
            _db: Db::Sqlite(dir),
        }
    }

    /// `None` (after saying so on stderr) when no PostgreSQL server is configured.
    pub async fn postgres(test: &str) -> Option<Fixture> {
        let db = TestDb::create(test).await?;
        let store = PgStore::connect(&db.url).await.unwrap();
        let raw = PgPool::connect(&db.url).await.unwrap();
        Some(Fixture {
            store: Arc::new(store),
            raw: Raw::Postgres(raw),
            _db: Db::Postgres(db),
        })
    }

    /// Runs `sql`, a `SELECT COUNT(*) ...` in SQL both backends accept, on the raw connection.
    pub async fn count(&self, sql: &str) -> i64 {
        match &self.raw {
            Raw::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
            Raw::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
        }
    }
}

/// The server to test against; `None`, after one line on stderr naming `test`, when
/// `REACH_TEST_POSTGRES_URL` is not set.
pub fn pg_url(test: &str) -> Option<String> {
    let url = std::env::var(PG_URL_VAR).ok().filter(|u| !u.is_empty());
    if url.is_none() {
        // Straight to the process's stderr, which libtest does not capture (unlike
        // `eprintln!`): a skip should be seen. One write, so the line stays whole.
        let line = format!("skipped: {PG_URL_VAR} is not set ({test})\n");
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
    url
}

/// A fresh PostgreSQL database, dropped when this is dropped.
pub struct TestDb {
    /// The URL the tests were given (the server's maintenance database).
    admin_url: String,
    pub name: String,
    /// The URL of the fresh database.
    pub url: String,
}

impl TestDb {
    /// Creates the database; `None` (after one line on stderr) when `REACH_TEST_POSTGRES_URL`
    /// is not set.
    pub async fn create(test: &str) -> Option<TestDb> {
        let admin_url = pg_url(test)?;
        let name = format!("reach_test_{:032x}", rand::random::<u128>());
        let mut conn = PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("{PG_URL_VAR}: cannot connect: {e}"));
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
        conn.close().await.unwrap();
        let url = with_database(&admin_url, &name);
        Some(TestDb {
            admin_url,
            name,
            url,
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot be blocked on: drop the database
        // from a thread with a runtime of its own, and wait for it.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&admin_url)
                    .await
                    .map_err(|e| e.to_string())?;
                conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                conn.close().await.map_err(|e| e.to_string())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            let line = format!("warning: could not drop test database {}: {e}\n", self.name);
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
}

/// `url` with its database (the path) replaced by `database`, query parameters kept.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{database}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}
