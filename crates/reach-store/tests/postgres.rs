//! What only the PostgreSQL backend has: migrations shared by nodes that start together, the
//! schema version table, several pools (nodes) on one database.
//!
//! These need `REACH_TEST_POSTGRES_URL` (see `common/mod.rs`); without it they say
//! `skipped: ...` on stderr and pass.

mod common;

use common::{AC, TestDb, new_user, with_database};
use reach_store::postgres::{MIGRATIONS, PgStore, SCHEMA_VERSION};
use reach_store::{ConfigUpdate, Store, StoreError};
use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, Executor, PgPool};

async fn versions(url: &str) -> Vec<i64> {
    let raw = PgPool::connect(url).await.unwrap();
    let versions = sqlx::query_scalar("SELECT version FROM reach_schema_version ORDER BY version")
        .fetch_all(&raw)
        .await
        .unwrap();
    raw.close().await;
    versions
}

/// Every version, as a database made by this build lists them.
fn all_versions() -> Vec<i64> {
    (1..=SCHEMA_VERSION).collect()
}

#[tokio::test]
async fn a_version_1_database_is_migrated_with_its_records() {
    let Some(db) = TestDb::create("a_version_1_database_is_migrated_with_its_records").await else {
        return;
    };
    {
        // What a build of schema version 1 left behind.
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        conn.execute(
            "CREATE TABLE reach_schema_version (\
             version BIGINT NOT NULL PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await
        .unwrap();
        conn.execute(MIGRATIONS[0]).await.unwrap();
        conn.execute(
            "INSERT INTO reach_schema_version VALUES (1, 0); \
             INSERT INTO services (sid, account_sid, friendly_name, date_created, date_updated) \
             VALUES ('IS00000000000000000000000000000001', 'AC00000000000000000000000000000001', \
             'old', 0, 0); \
             INSERT INTO service_configs (service_sid) VALUES ('IS00000000000000000000000000000001'); \
             INSERT INTO users (sid, service_sid, account_sid, identity, date_created, date_updated) \
             VALUES ('US00000000000000000000000000000001', 'IS00000000000000000000000000000001', \
             'AC00000000000000000000000000000001', 'alice', 0, 0)",
        )
        .await
        .unwrap();
        conn.close().await.unwrap();
    }
    let store = PgStore::connect(&db.url).await.unwrap();
    assert_eq!(versions(&db.url).await, all_versions());
    let sid = "IS00000000000000000000000000000001".parse().unwrap();
    let alice = store.get_user(&sid, "alice").await.unwrap();
    assert!(!alice.presence_online);
    assert_eq!(alice.last_seen_at, None);
    let hook = store.get_webhook(&sid).await.unwrap();
    assert_eq!(hook.post_webhook_url, None);
    store.close().await;
}

#[tokio::test]
async fn migrations_are_idempotent() {
    let Some(db) = TestDb::create("migrations_are_idempotent").await else {
        return;
    };
    let store = PgStore::connect(&db.url).await.unwrap();
    let svc = store.create_service(&AC, "s").await.unwrap();
    store.close().await;
    assert_eq!(versions(&db.url).await, all_versions());

    // A second start finds the schema current: nothing is re-applied, nothing is lost.
    let store = PgStore::connect(&db.url).await.unwrap();
    assert_eq!(store.get_service(&AC, &svc.sid).await.unwrap(), svc);
    store.close().await;
    assert_eq!(versions(&db.url).await, all_versions());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_on_a_fresh_database_all_connect() {
    let Some(db) = TestDb::create("nodes_starting_together_on_a_fresh_database_all_connect").await
    else {
        return;
    };
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move { PgStore::connect(&url).await }));
    }
    let mut stores = Vec::new();
    for t in tasks {
        stores.push(t.await.unwrap().unwrap());
    }
    assert_eq!(versions(&db.url).await, all_versions());
    // They all see one schema and each other's writes.
    let svc = stores[0].create_service(&AC, "s").await.unwrap();
    for store in &stores {
        assert_eq!(store.get_service(&AC, &svc.sid).await.unwrap(), svc);
        store.close().await;
    }
}

#[tokio::test]
async fn refuses_a_newer_schema() {
    let Some(db) = TestDb::create("refuses_a_newer_schema").await else {
        return;
    };
    PgStore::connect(&db.url).await.unwrap().close().await;
    let raw = PgPool::connect(&db.url).await.unwrap();
    sqlx::query("INSERT INTO reach_schema_version (version, applied_at) VALUES (99, 0)")
        .execute(&raw)
        .await
        .unwrap();
    match PgStore::connect(&db.url).await {
        Err(StoreError::Backend(message)) => {
            assert!(message.contains("migrate"), "{message}");
            assert!(
                message.contains(&format!(
                    "version 99 is newer than this build ({SCHEMA_VERSION})"
                )),
                "{message}"
            );
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
    // Refused without touching anything.
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM reach_schema_version")
        .fetch_one(&raw)
        .await
        .unwrap();
    assert_eq!(count, SCHEMA_VERSION + 1, "this build's versions and 99");
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_create_from_many_nodes_returns_one_sid() {
    let Some(db) = TestDb::create("get_or_create_from_many_nodes_returns_one_sid").await else {
        return;
    };
    // Four nodes (pools), eight callers each, all after the same new identity.
    let mut nodes = Vec::new();
    for _ in 0..4 {
        nodes.push(PgStore::connect(&db.url).await.unwrap());
    }
    let svc = nodes[0].create_service(&AC, "s").await.unwrap();
    for round in 0..3 {
        let identity = format!("racer{round}");
        let mut tasks = Vec::new();
        for node in &nodes {
            for _ in 0..8 {
                let (node, svc, identity) = (node.clone(), svc.clone(), identity.clone());
                tasks.push(tokio::spawn(async move {
                    node.get_or_create_user(&svc, &identity).await.unwrap().sid
                }));
            }
        }
        let mut sids = Vec::new();
        for t in tasks {
            sids.push(t.await.unwrap());
        }
        sids.sort();
        sids.dedup();
        assert_eq!(sids.len(), 1, "{identity}: {sids:?}");
    }
    let users = nodes[0]
        .list_users(&svc.sid, common::first(50))
        .await
        .unwrap();
    assert_eq!(users.items.len(), 3);
    for node in &nodes {
        node.close().await;
    }
}

#[tokio::test]
async fn data_persists_across_a_new_pool() {
    let Some(db) = TestDb::create("data_persists_across_a_new_pool").await else {
        return;
    };
    let (svc, user, binding, config) = {
        let store = PgStore::connect(&db.url).await.unwrap();
        let svc = store.create_service(&AC, "durable").await.unwrap();
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

    let store = PgStore::connect(&db.url).await.unwrap();
    assert_eq!(store.get_service(&AC, &svc.sid).await.unwrap(), svc);
    assert_eq!(store.get_config(&svc.sid).await.unwrap(), config);
    assert_eq!(store.get_user(&svc.sid, &user.sid).await.unwrap(), user);
    assert_eq!(user.online_epoch, 1);
    assert!(user.ever_had_binding);
    assert_eq!(
        store.get_binding(&svc.sid, &binding.sid).await.unwrap(),
        binding
    );
    assert_eq!(store.list_configs().await.unwrap(), vec![config]);
    store.close().await;
}

#[tokio::test]
async fn a_missing_database_is_a_connect_error_without_the_password() {
    let Some(url) = common::pg_url("a_missing_database_is_a_connect_error_without_the_password")
    else {
        return;
    };
    // The same server and user, a password (trust auth ignores it), a database that does not
    // exist: the server refuses the connection.
    let given = PgConnectOptions::from_str(&url).unwrap();
    let url = format!(
        "postgres://{}:pa55word@{}:{}/reach_no_such_database",
        given.get_username(),
        given.get_host(),
        given.get_port()
    );
    match PgStore::connect(&url).await {
        Err(StoreError::Backend(message)) => {
            assert!(message.contains("cannot connect to"), "{message}");
            assert!(message.contains("reach_no_such_database"), "{message}");
            assert!(!message.contains("pa55word"), "{message}");
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
}

#[test]
fn the_database_is_swapped_in_the_url() {
    assert_eq!(
        with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
        "postgres://postgres@127.0.0.1:5432/x"
    );
    assert_eq!(
        with_database("postgres://u:p@h/db?sslmode=disable", "x"),
        "postgres://u:p@h/x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_growing_users_table_gets_fresh_statistics() {
    let Some(db) = TestDb::create("a_growing_users_table_gets_fresh_statistics").await else {
        return;
    };
    let store = PgStore::connect(&db.url).await.unwrap();
    let raw = PgPool::connect(&db.url).await.unwrap();
    // A table never analyzed has reltuples -1; the planner then guesses from its size when a
    // statement is first planned, and keeps that plan.
    let reltuples = || {
        sqlx::query_scalar::<_, f32>("SELECT reltuples FROM pg_class WHERE relname = 'users'")
            .fetch_one(&raw)
    };
    assert_eq!(reltuples().await.unwrap(), -1.0);
    let svc = store.create_service(&AC, "growing").await.unwrap();
    let mut tasks = Vec::new();
    for part in 0..8 {
        let (store, svc) = (store.clone(), svc.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..125 {
                let identity = format!("u{part}-{i}");
                store.get_or_create_user(&svc, &identity).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // The 1,000th insert starts an ANALYZE in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let n = reltuples().await.unwrap();
        if n >= 900.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "reltuples still {n}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    raw.close().await;
    store.close().await;
}
