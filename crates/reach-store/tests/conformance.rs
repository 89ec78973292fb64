//! The behaviour every [`Store`] backend shares, run against each of them: every case is a
//! function of a [`Fixture`], and `conformance!` makes one test per (case, backend), named
//! `<case>::sqlite` and `<case>::postgres`.
//!
//! The PostgreSQL tests need `REACH_TEST_POSTGRES_URL` (see `common/mod.rs`); without it they
//! say `skipped: ...` on stderr and pass.

mod common;

use common::{AC, Fixture, OTHER_AC, first, new_user};
use reach_proto::sid::looks_like_sid;
use reach_store::{
    Binding, BindingFilter, Claim, ClaimedEvent, Completion, ConfigUpdate, NewUser, Page,
    PageRequest, PresenceRecord, Service, ServiceConfig, Source, Store, StoreError, UserRecord,
    UserUpdate, WebhookMethod, WebhookUpdate,
};

/// One module per case, with a test per backend.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let fx = crate::common::Fixture::sqlite().await;
                super::$case(&fx).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let test = concat!(stringify!($case), "::postgres");
                if let Some(fx) = crate::common::Fixture::postgres(test).await {
                    super::$case(&fx).await;
                }
            }
        }
    )*};
}

conformance!(
    services_are_scoped_by_account,
    deleting_a_service_deletes_its_users_and_bindings,
    config_epoch_bumps_only_when_enabling,
    users_lifecycle,
    identity_shaped_like_a_sid_is_still_found,
    users_read_by_identity_in_one_call,
    get_or_create_returns_the_same_user,
    paging_by_cursor_and_by_offset,
    bindings_upsert_delete_and_filter,
    concurrent_enables_bump_the_epoch_once,
    concurrent_updates_of_a_user_keep_every_revision,
    concurrent_upserts_of_one_binding_agree,
    concurrent_deletes_of_a_user_and_its_bindings_never_fail,
    webhook_configuration_defaults_updates_and_cascade,
    events_are_recorded_only_when_the_webhook_listens,
    writes_record_what_subscribers_see_change,
    presence_changes_apply_in_version_order,
    a_presence_batch_larger_than_one_statement_applies_whole,
    presence_without_a_listening_webhook_is_recorded_all_the_same,
    claims_take_each_users_events_one_at_a_time_in_order,
    leases_expire_and_outcomes_of_a_lost_lease_are_ignored,
    concurrent_claims_never_take_an_event_twice,
    nodes_remember_when_they_were_alive,
);

async fn services_are_scoped_by_account(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "first").await.unwrap();
    assert!(looks_like_sid(&svc.sid) && svc.sid.starts_with("IS"));
    assert_eq!(svc.account_sid, *AC);
    assert_eq!(svc.friendly_name, "first");

    assert_eq!(store.get_service(&AC, &svc.sid).await.unwrap(), svc);
    assert_eq!(store.find_service(&svc.sid).await.unwrap(), svc);
    assert!(matches!(
        store.get_service(&OTHER_AC, &svc.sid).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .find_service(&"IS00000000000000000000000000000000".parse().unwrap())
            .await,
        Err(StoreError::NotFound)
    ));

    let second = store.create_service(&AC, "second").await.unwrap();
    let other = store.create_service(&OTHER_AC, "theirs").await.unwrap();
    let page = store.list_services(&AC, first(50)).await.unwrap();
    assert_eq!(page.items, vec![svc.clone(), second.clone()]);
    assert_eq!(page.next_cursor, None);
    let page = store.list_services(&OTHER_AC, first(50)).await.unwrap();
    assert_eq!(page.items, vec![other.clone()]);

    // Another account cannot delete it.
    assert!(matches!(
        store.delete_service(&OTHER_AC, &svc.sid).await,
        Err(StoreError::NotFound)
    ));
    store.delete_service(&AC, &svc.sid).await.unwrap();
    assert!(matches!(
        store.get_service(&AC, &svc.sid).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.get_config(&svc.sid).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.delete_service(&AC, &svc.sid).await,
        Err(StoreError::NotFound)
    ));
    let page = store.list_services(&AC, first(50)).await.unwrap();
    assert_eq!(page.items, vec![second]);
}

async fn deleting_a_service_deletes_its_users_and_bindings(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    store
        .create_user(&svc, &new_user("alice"), None)
        .await
        .unwrap();
    store
        .upsert_binding(&svc, "alice", "fcm", "token", None)
        .await
        .unwrap();
    store.delete_service(&AC, &svc.sid).await.unwrap();
    let users = fx.count("SELECT COUNT(*) FROM users").await;
    let bindings = fx.count("SELECT COUNT(*) FROM bindings").await;
    assert_eq!((users, bindings), (0, 0));
}

async fn config_epoch_bumps_only_when_enabling(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    let config = store.get_config(&svc.sid).await.unwrap();
    assert_eq!(
        config,
        ServiceConfig {
            service_sid: svc.sid.clone(),
            reachability_enabled: false,
            reachability_epoch: 0,
            default_conversation_creator_role_sid: None,
            default_conversation_role_sid: None,
            default_chat_service_role_sid: None,
        }
    );

    let enable = ConfigUpdate {
        reachability_enabled: Some(true),
        ..ConfigUpdate::default()
    };
    let disable = ConfigUpdate {
        reachability_enabled: Some(false),
        ..ConfigUpdate::default()
    };
    let c = store.update_config(&svc.sid, &enable).await.unwrap();
    assert!(c.reachability_enabled);
    assert_eq!(c.reachability_epoch, 1);
    // true -> true: no bump.
    let c = store.update_config(&svc.sid, &enable).await.unwrap();
    assert_eq!(c.reachability_epoch, 1);
    // true -> false: no bump.
    let c = store.update_config(&svc.sid, &disable).await.unwrap();
    assert!(!c.reachability_enabled);
    assert_eq!(c.reachability_epoch, 1);
    // false -> false: no bump.
    let c = store.update_config(&svc.sid, &disable).await.unwrap();
    assert_eq!(c.reachability_epoch, 1);
    // false -> true: bump.
    let c = store.update_config(&svc.sid, &enable).await.unwrap();
    assert_eq!(c.reachability_epoch, 2);

    // Role updates leave reachability alone.
    let roles = ConfigUpdate {
        default_chat_service_role_sid: Some("RL00000000000000000000000000000001".into()),
        ..ConfigUpdate::default()
    };
    let c = store.update_config(&svc.sid, &roles).await.unwrap();
    assert!(c.reachability_enabled);
    assert_eq!(c.reachability_epoch, 2);
    assert_eq!(
        c.default_chat_service_role_sid.as_deref(),
        Some("RL00000000000000000000000000000001")
    );
    assert_eq!(c.default_conversation_role_sid, None);
    assert_eq!(store.get_config(&svc.sid).await.unwrap(), c);

    let other = store.create_service(&OTHER_AC, "t").await.unwrap();
    let all = store.list_configs().await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0], c);
    assert_eq!(all[1].service_sid, other.sid);

    assert!(matches!(
        store
            .update_config(
                &"IS00000000000000000000000000000000".parse().unwrap(),
                &enable
            )
            .await,
        Err(StoreError::NotFound)
    ));
}

async fn users_lifecycle(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    let alice = store
        .create_user(&svc, &new_user("alice"), None)
        .await
        .unwrap();
    assert!(looks_like_sid(&alice.sid) && alice.sid.starts_with("US"));
    assert_eq!(alice.identity, "alice");
    assert_eq!(alice.service_sid, svc.sid);
    assert_eq!(alice.account_sid, *AC);
    assert_eq!(alice.attributes, "{}");
    assert_eq!(alice.friendly_name, None);
    assert_eq!(alice.revision, 0);
    assert_eq!(alice.online_epoch, 0);
    assert!(!alice.ever_had_binding);
    assert_eq!(alice.binding_count, 0);

    match store.create_user(&svc, &new_user("alice"), None).await {
        Err(StoreError::UserExists(identity)) => assert_eq!(identity, "alice"),
        other => panic!("expected UserExists, got {other:?}"),
    }
    // The same identity in another service is fine.
    let svc2 = store.create_service(&AC, "s2").await.unwrap();
    store
        .create_user(&svc2, &new_user("alice"), None)
        .await
        .unwrap();

    assert_eq!(store.get_user(&svc.sid, &alice.sid).await.unwrap(), alice);
    assert_eq!(store.get_user(&svc.sid, "alice").await.unwrap(), alice);
    assert!(matches!(
        store.get_user(&svc.sid, "bob").await,
        Err(StoreError::NotFound)
    ));
    // Scoped by service.
    assert!(matches!(
        store.get_user(&svc2.sid, &alice.sid).await,
        Err(StoreError::NotFound)
    ));

    let bob = store
        .create_user(
            &svc,
            &NewUser {
                identity: "bob".into(),
                friendly_name: Some("Bob".into()),
                attributes: Some(r#"{"a":1}"#.into()),
                role_sid: Some("RL00000000000000000000000000000001".into()),
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(bob.friendly_name.as_deref(), Some("Bob"));
    assert_eq!(bob.attributes, r#"{"a":1}"#);

    let updated = store
        .update_user(
            &svc.sid,
            &bob.sid,
            &UserUpdate {
                friendly_name: Some("Robert".into()),
                ..UserUpdate::default()
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(updated.revision, bob.revision + 1);
    assert_eq!(updated.friendly_name.as_deref(), Some("Robert"));
    assert_eq!(updated.attributes, bob.attributes, "unchanged");
    assert_eq!(updated.role_sid, bob.role_sid, "unchanged");
    assert!(updated.date_updated >= bob.date_updated);
    let updated = store
        .update_user(
            &svc.sid,
            "bob",
            &UserUpdate {
                attributes: Some("{}".into()),
                ..UserUpdate::default()
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(updated.revision, bob.revision + 2);
    assert_eq!(updated.friendly_name.as_deref(), Some("Robert"));
    assert!(matches!(
        store
            .update_user(&svc.sid, "nobody", &UserUpdate::default(), None)
            .await,
        Err(StoreError::NotFound)
    ));

    store.mark_online(&svc.sid, "bob", 3).await.unwrap();
    store.mark_online(&svc.sid, "bob", 2).await.unwrap();
    assert_eq!(
        store.get_user(&svc.sid, "bob").await.unwrap().online_epoch,
        3
    );
    store.mark_online(&svc.sid, "bob", 3).await.unwrap();
    store.mark_online(&svc.sid, "bob", 4).await.unwrap();
    assert_eq!(
        store.get_user(&svc.sid, "bob").await.unwrap().online_epoch,
        4
    );
    assert!(matches!(
        store.mark_online(&svc.sid, "nobody", 1).await,
        Err(StoreError::NotFound)
    ));

    // Deleting removes the bindings too.
    store
        .upsert_binding(&svc, "bob", "apn", "t1", None)
        .await
        .unwrap();
    store
        .upsert_binding(&svc, "bob", "fcm", "t2", None)
        .await
        .unwrap();
    let deleted = store.delete_user(&svc.sid, "bob", None).await.unwrap();
    assert_eq!(deleted.sid, bob.sid);
    assert_eq!(deleted.binding_count, 2);
    assert_eq!(store.count_bindings(&svc.sid, "bob").await.unwrap(), 0);
    let left = fx
        .count("SELECT COUNT(*) FROM bindings WHERE identity = 'bob'")
        .await;
    assert_eq!(left, 0);
    assert!(matches!(
        store.get_user(&svc.sid, &bob.sid).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.delete_user(&svc.sid, &bob.sid, None).await,
        Err(StoreError::NotFound)
    ));
    // Delete by SID works too.
    store.delete_user(&svc.sid, &alice.sid, None).await.unwrap();
    assert!(matches!(
        store.get_user(&svc.sid, "alice").await,
        Err(StoreError::NotFound)
    ));
}

async fn identity_shaped_like_a_sid_is_still_found(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    let odd = "US0123456789abcdef0123456789abcdef";
    let user = store.create_user(&svc, &new_user(odd), None).await.unwrap();
    assert_eq!(store.get_user(&svc.sid, odd).await.unwrap(), user);
    assert_eq!(store.get_user(&svc.sid, &user.sid).await.unwrap(), user);
}

async fn get_or_create_returns_the_same_user(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    let a = store.get_or_create_user(&svc, "carol").await.unwrap();
    let b = store.get_or_create_user(&svc, "carol").await.unwrap();
    assert_eq!(a, b);
    assert_eq!(a.attributes, "{}");
    assert_eq!(a.revision, 0);

    // Concurrent callers agree on one row.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            store.get_or_create_user(&svc, "dave").await.unwrap().sid
        }));
    }
    let mut sids = Vec::new();
    for t in tasks {
        sids.push(t.await.unwrap());
    }
    sids.sort();
    sids.dedup();
    assert_eq!(sids.len(), 1, "{sids:?}");

    // A service that no longer exists.
    store.delete_service(&AC, &svc.sid).await.unwrap();
    assert!(matches!(
        store.get_or_create_user(&svc, "erin").await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.create_user(&svc, &new_user("erin"), None).await,
        Err(StoreError::NotFound)
    ));
}

async fn paging_by_cursor_and_by_offset(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    let mut identities = Vec::new();
    for i in 0..7 {
        let identity = format!("user{i}");
        store
            .create_user(&svc, &new_user(&identity), None)
            .await
            .unwrap();
        identities.push(identity);
    }
    let names = |page: &Page<UserRecord>| {
        page.items
            .iter()
            .map(|u| u.identity.clone())
            .collect::<Vec<_>>()
    };

    // Keyset: 3 + 3 + 1.
    let p1 = store.list_users(&svc.sid, first(3)).await.unwrap();
    assert_eq!(names(&p1), identities[0..3]);
    assert!(p1.next_cursor.is_some());
    let p2 = store
        .list_users(
            &svc.sid,
            PageRequest {
                after: p1.next_cursor,
                offset: 0,
                limit: 3,
            },
        )
        .await
        .unwrap();
    assert_eq!(names(&p2), identities[3..6]);
    assert!(p2.next_cursor.is_some());
    // The offset is ignored when a cursor is given.
    let p3 = store
        .list_users(
            &svc.sid,
            PageRequest {
                after: p2.next_cursor,
                offset: 100,
                limit: 3,
            },
        )
        .await
        .unwrap();
    assert_eq!(names(&p3), identities[6..7]);
    assert_eq!(p3.next_cursor, None);

    // Offset: 3 + 3 + 1.
    let mut seen = Vec::new();
    for (i, offset) in [0, 3, 6].into_iter().enumerate() {
        let page = store
            .list_users(
                &svc.sid,
                PageRequest {
                    after: None,
                    offset,
                    limit: 3,
                },
            )
            .await
            .unwrap();
        assert_eq!(page.next_cursor.is_some(), i < 2, "page {i}");
        seen.extend(names(&page));
    }
    assert_eq!(seen, identities);

    // Deleting a row already listed does not shift a keyset page.
    store.delete_user(&svc.sid, "user0", None).await.unwrap();
    let p2_again = store
        .list_users(
            &svc.sid,
            PageRequest {
                after: p1.next_cursor,
                offset: 0,
                limit: 3,
            },
        )
        .await
        .unwrap();
    assert_eq!(names(&p2_again), identities[3..6]);

    // Exactly `limit` rows left: no next page.
    let all = store.list_users(&svc.sid, first(6)).await.unwrap();
    assert_eq!(all.items.len(), 6);
    assert_eq!(all.next_cursor, None);

    // Services page the same way.
    for i in 0..4 {
        store
            .create_service(&AC, &format!("more{i}"))
            .await
            .unwrap();
    }
    let p = store.list_services(&AC, first(2)).await.unwrap();
    assert_eq!(p.items.len(), 2);
    let p = store
        .list_services(
            &AC,
            PageRequest {
                after: p.next_cursor,
                offset: 0,
                limit: 2,
            },
        )
        .await
        .unwrap();
    assert_eq!(p.items.len(), 2);
    let p = store
        .list_services(
            &AC,
            PageRequest {
                after: p.next_cursor,
                offset: 0,
                limit: 2,
            },
        )
        .await
        .unwrap();
    assert_eq!(p.items.len(), 1);
    assert_eq!(p.next_cursor, None);
}

async fn bindings_upsert_delete_and_filter(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    store
        .create_user(&svc, &new_user("alice"), None)
        .await
        .unwrap();
    store
        .create_user(&svc, &new_user("bob"), None)
        .await
        .unwrap();

    // The user must exist.
    assert!(matches!(
        store.upsert_binding(&svc, "nobody", "fcm", "x", None).await,
        Err(StoreError::NotFound)
    ));

    let b1 = store
        .upsert_binding(
            &svc,
            "alice",
            "fcm",
            "tok-a",
            Some("CR00000000000000000000000000000001"),
        )
        .await
        .unwrap();
    assert!(looks_like_sid(&b1.sid) && b1.sid.starts_with("BS"));
    assert_eq!(b1.account_sid, *AC);
    assert_eq!(
        b1.credential_sid.as_deref(),
        Some("CR00000000000000000000000000000001")
    );
    // Idempotent.
    let again = store
        .upsert_binding(&svc, "alice", "fcm", "tok-a", None)
        .await
        .unwrap();
    assert_eq!(again, b1);
    assert_eq!(store.count_bindings(&svc.sid, "alice").await.unwrap(), 1);

    let b2 = store
        .upsert_binding(&svc, "alice", "apn", "tok-b", None)
        .await
        .unwrap();
    let b3 = store
        .upsert_binding(&svc, "bob", "apn", "tok-c", None)
        .await
        .unwrap();
    let alice = store.get_user(&svc.sid, "alice").await.unwrap();
    assert!(alice.ever_had_binding);
    assert_eq!(alice.binding_count, 2);
    assert_eq!(store.get_binding(&svc.sid, &b2.sid).await.unwrap(), b2);

    let list = |types: &[&str], identities: &[&str]| BindingFilter {
        binding_types: types.iter().map(|s| s.to_string()).collect(),
        identities: identities.iter().map(|s| s.to_string()).collect(),
    };
    let sids = |page: Page<Binding>| page.items.into_iter().map(|b| b.sid).collect::<Vec<_>>();
    let all = store
        .list_bindings(&svc.sid, &list(&[], &[]), first(50))
        .await
        .unwrap();
    assert_eq!(
        sids(all),
        vec![b1.sid.clone(), b2.sid.clone(), b3.sid.clone()]
    );
    let apn = store
        .list_bindings(&svc.sid, &list(&["apn"], &[]), first(50))
        .await
        .unwrap();
    assert_eq!(sids(apn), vec![b2.sid.clone(), b3.sid.clone()]);
    let alice_any = store
        .list_bindings(&svc.sid, &list(&["apn", "fcm"], &["alice"]), first(50))
        .await
        .unwrap();
    assert_eq!(sids(alice_any), vec![b1.sid.clone(), b2.sid.clone()]);
    let both = store
        .list_bindings(&svc.sid, &list(&["apn"], &["alice", "bob"]), first(1))
        .await
        .unwrap();
    assert_eq!(both.items, vec![b2.clone()]);
    let rest = store
        .list_bindings(
            &svc.sid,
            &list(&["apn"], &["alice", "bob"]),
            PageRequest {
                after: both.next_cursor,
                offset: 0,
                limit: 1,
            },
        )
        .await
        .unwrap();
    assert_eq!(rest.items, vec![b3.clone()]);
    assert_eq!(rest.next_cursor, None);
    let none = store
        .list_bindings(&svc.sid, &list(&["gcm"], &[]), first(50))
        .await
        .unwrap();
    assert!(none.items.is_empty());

    // Deletes.
    let gone = store
        .delete_binding_by_address(&svc.sid, "alice", "fcm", "tok-a")
        .await
        .unwrap();
    assert_eq!(gone, b1);
    assert!(matches!(
        store
            .delete_binding_by_address(&svc.sid, "alice", "fcm", "tok-a")
            .await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        store.delete_binding(&svc.sid, &b2.sid, None).await.unwrap(),
        b2
    );
    assert!(matches!(
        store.delete_binding(&svc.sid, &b2.sid, None).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.get_binding(&svc.sid, &b2.sid).await,
        Err(StoreError::NotFound)
    ));
    let alice = store.get_user(&svc.sid, "alice").await.unwrap();
    assert!(alice.ever_had_binding, "stays true");
    assert_eq!(alice.binding_count, 0);
    assert_eq!(store.count_bindings(&svc.sid, "alice").await.unwrap(), 0);

    // A new binding after the delete gets a new SID.
    let b4 = store
        .upsert_binding(&svc, "alice", "fcm", "tok-a", None)
        .await
        .unwrap();
    assert_ne!(b4.sid, b1.sid);
}

async fn concurrent_enables_bump_the_epoch_once(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    let enable = ConfigUpdate {
        reachability_enabled: Some(true),
        ..ConfigUpdate::default()
    };
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, sid, enable) = (store.clone(), svc.sid.clone(), enable.clone());
        tasks.push(tokio::spawn(async move {
            store.update_config(&sid, &enable).await.unwrap()
        }));
    }
    for t in tasks {
        let config = t.await.unwrap();
        assert!(config.reachability_enabled);
        assert_eq!(config.reachability_epoch, 1);
    }
    assert_eq!(
        store.get_config(&svc.sid).await.unwrap().reachability_epoch,
        1
    );
}

async fn concurrent_updates_of_a_user_keep_every_revision(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    let alice = store
        .create_user(&svc, &new_user("alice"), None)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (store, sid) = (store.clone(), svc.sid.clone());
        tasks.push(tokio::spawn(async move {
            let update = UserUpdate {
                friendly_name: Some(format!("Alice {i}")),
                ..UserUpdate::default()
            };
            store
                .update_user(&sid, "alice", &update, None)
                .await
                .unwrap()
        }));
    }
    let mut revisions = Vec::new();
    for t in tasks {
        revisions.push(t.await.unwrap().revision);
    }
    revisions.sort();
    assert_eq!(revisions, (1..=8).collect::<Vec<i64>>(), "one bump each");
    let alice_now = store.get_user(&svc.sid, &alice.sid).await.unwrap();
    assert_eq!(alice_now.revision, alice.revision + 8);
}

async fn concurrent_upserts_of_one_binding_agree(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    store
        .create_user(&svc, &new_user("alice"), None)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, svc) = (store.clone(), svc.clone());
        tasks.push(tokio::spawn(async move {
            store
                .upsert_binding(&svc, "alice", "fcm", "tok", None)
                .await
                .unwrap()
                .sid
        }));
    }
    let mut sids = Vec::new();
    for t in tasks {
        sids.push(t.await.unwrap());
    }
    sids.sort();
    sids.dedup();
    assert_eq!(sids.len(), 1, "{sids:?}");
    assert_eq!(store.count_bindings(&svc.sid, "alice").await.unwrap(), 1);
}

/// A user deleted while its bindings are deleted one by one: every call either does its work
/// or finds the row gone (`NotFound`), none fails (e.g. on a lock-order deadlock), and
/// nothing is left behind.
async fn concurrent_deletes_of_a_user_and_its_bindings_never_fail(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let identity = format!("user{i}");
        store
            .create_user(&svc, &new_user(&identity), None)
            .await
            .unwrap();
        let b1 = store
            .upsert_binding(&svc, &identity, "fcm", "t1", None)
            .await
            .unwrap();
        store
            .upsert_binding(&svc, &identity, "apn", "t2", None)
            .await
            .unwrap();
        let (s, sid, id) = (store.clone(), svc.sid.clone(), identity.clone());
        tasks.push(tokio::spawn(async move {
            s.delete_binding(&sid, &b1.sid, None).await.map(drop)
        }));
        let (s, sid, id2) = (store.clone(), svc.sid.clone(), identity.clone());
        tasks.push(tokio::spawn(async move {
            s.delete_binding_by_address(&sid, &id2, "apn", "t2")
                .await
                .map(drop)
        }));
        let (s, sid) = (store.clone(), svc.sid.clone());
        tasks.push(tokio::spawn(async move {
            s.delete_user(&sid, &id, None).await.map(drop)
        }));
    }
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) | Err(StoreError::NotFound) => {}
            Err(e) => panic!("{e}"),
        }
    }
    let users = fx.count("SELECT COUNT(*) FROM users").await;
    let bindings = fx.count("SELECT COUNT(*) FROM bindings").await;
    assert_eq!((users, bindings), (0, 0));
}

/// The service's webhook: POSTed to a receiver, listening to the three user events.
async fn listen(store: &dyn Store, svc: &Service) {
    store
        .update_webhook(
            &svc.sid,
            &WebhookUpdate {
                post_webhook_url: Some(Some("http://127.0.0.1:9/hook".into())),
                filters: Some(vec![
                    "onUserAdded".into(),
                    "onUserUpdated".into(),
                    "onUserRemoved".into(),
                ]),
                ..WebhookUpdate::default()
            },
        )
        .await
        .unwrap();
}

async fn enable(store: &dyn Store, svc: &Service) {
    store
        .update_config(
            &svc.sid,
            &ConfigUpdate {
                reachability_enabled: Some(true),
                ..ConfigUpdate::default()
            },
        )
        .await
        .unwrap();
}

/// Every event waiting, oldest first, claimed (with a lease that ends at once) and given back.
async fn pending(store: &dyn Store) -> Vec<ClaimedEvent> {
    let mut all = Vec::new();
    // One event per user per claim: claim, note, give back with a retry in the past, until
    // a claim finds nothing new.
    let mut seen = std::collections::HashSet::new();
    loop {
        let claimed = store
            .claim_events("lister", i64::MAX / 4, 0, 1000)
            .await
            .unwrap();
        let fresh: Vec<ClaimedEvent> = claimed.into_iter().filter(|e| seen.insert(e.seq)).collect();
        if fresh.is_empty() {
            break;
        }
        let done: Vec<(Claim, Completion)> = fresh
            .iter()
            .map(|e| (e.claim(), Completion::Dropped))
            .collect();
        all.extend(fresh);
        // Dropping deletes them, so the next claim sees each user's next event.
        store.complete_events("lister", &done).await.unwrap();
    }
    all.sort_by_key(|e| e.seq);
    all
}

fn param<'a>(event: &'a ClaimedEvent, name: &str) -> &'a str {
    event
        .params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("{name} missing from {:?}", event.params))
}

fn presence(svc: &Service, identity: &str, online: bool, at: i64, version: i64) -> PresenceRecord {
    PresenceRecord {
        service_sid: svc.sid.clone(),
        identity: identity.to_owned(),
        online,
        at,
        version,
    }
}

async fn webhook_configuration_defaults_updates_and_cascade(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    let hook = store.get_webhook(&svc.sid).await.unwrap();
    assert_eq!(
        (
            hook.pre_webhook_url,
            hook.post_webhook_url,
            hook.method,
            hook.filters.len()
        ),
        (None, None, WebhookMethod::Post, 0)
    );
    let hook = store
        .update_webhook(
            &svc.sid,
            &WebhookUpdate {
                pre_webhook_url: Some(Some("https://example.com/pre".into())),
                post_webhook_url: Some(Some("https://example.com/post".into())),
                method: Some(WebhookMethod::Get),
                filters: Some(vec!["onUserUpdated".into(), "onMessageAdded".into()]),
            },
        )
        .await
        .unwrap();
    assert_eq!(store.get_webhook(&svc.sid).await.unwrap(), hook);
    assert_eq!(hook.filters, ["onUserUpdated", "onMessageAdded"]);
    // A partial update leaves the rest; a cleared URL is null.
    let hook = store
        .update_webhook(
            &svc.sid,
            &WebhookUpdate {
                pre_webhook_url: Some(None),
                ..WebhookUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(hook.pre_webhook_url, None);
    assert_eq!(
        hook.post_webhook_url.as_deref(),
        Some("https://example.com/post")
    );
    assert_eq!(hook.method, WebhookMethod::Get);
    let unknown = "IS00000000000000000000000000000000".parse().unwrap();
    assert!(matches!(
        store.get_webhook(&unknown).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .update_webhook(&unknown, &WebhookUpdate::default())
            .await,
        Err(StoreError::NotFound)
    ));
    // Deleted with its service, with the events waiting for it.
    listen(store.as_ref(), &svc).await;
    store
        .create_user(&svc, &new_user("alice"), Some(Source::Api))
        .await
        .unwrap();
    assert_eq!(store.queue_stats().await.unwrap().depth, 1);
    store.delete_service(&AC, &svc.sid).await.unwrap();
    assert_eq!(fx.count("SELECT COUNT(*) FROM service_webhooks").await, 0);
    assert_eq!(store.queue_stats().await.unwrap().depth, 0);
}

async fn events_are_recorded_only_when_the_webhook_listens(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    // No URL: nothing, whatever the source.
    store
        .create_user(&svc, &new_user("a"), Some(Source::Api))
        .await
        .unwrap();
    store.get_or_create_user(&svc, "b").await.unwrap();
    assert_eq!(store.queue_stats().await.unwrap(), Default::default());
    // A URL, but only onUserRemoved listened to.
    store
        .update_webhook(
            &svc.sid,
            &WebhookUpdate {
                post_webhook_url: Some(Some("http://127.0.0.1:9/hook".into())),
                filters: Some(vec!["onUserRemoved".into(), "onUserUpdate".into()]),
                ..WebhookUpdate::default()
            },
        )
        .await
        .unwrap();
    store
        .create_user(&svc, &new_user("c"), Some(Source::Api))
        .await
        .unwrap();
    assert_eq!(store.queue_stats().await.unwrap().depth, 0);
    // Listening: a REST write without `fire` records nothing, with it one event.
    listen(store.as_ref(), &svc).await;
    store.create_user(&svc, &new_user("d"), None).await.unwrap();
    assert_eq!(store.queue_stats().await.unwrap().depth, 0);
    let before = hooks_now_ms();
    let e = store
        .create_user(&svc, &new_user("e"), Some(Source::Api))
        .await
        .unwrap();
    let stats = store.queue_stats().await.unwrap();
    assert_eq!(stats.depth, 1);
    assert!(stats.oldest_created_ms.unwrap() >= before);
    let events = pending(store.as_ref()).await;
    assert_eq!(events.len(), 1);
    let added = &events[0];
    assert!(
        added.token.starts_with("EV") && added.token.len() == 34,
        "{}",
        added.token
    );
    assert_eq!(added.event_type, "onUserAdded");
    assert_eq!(param(added, "EventType"), "onUserAdded");
    assert_eq!(param(added, "Source"), "API");
    assert_eq!(param(added, "UserSid"), e.sid);
    assert_eq!(param(added, "Identity"), "e");
    assert_eq!(param(added, "AccountSid"), AC.as_str());
    assert_eq!(param(added, "ChatServiceSid"), svc.sid.as_str());
    assert_eq!(param(added, "IsOnline"), "", "reachability disabled");
    assert_eq!(param(added, "Attributes"), "{}");
    let target = added.target.as_ref().unwrap();
    assert_eq!(target.url, "http://127.0.0.1:9/hook");
    assert_eq!(target.method, WebhookMethod::Post);
    assert_eq!(target.account_sid, *AC);
}

fn hooks_now_ms() -> i64 {
    reach_store::hooks::now_ms()
}

async fn writes_record_what_subscribers_see_change(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    enable(store.as_ref(), &svc).await;
    listen(store.as_ref(), &svc).await;
    let api = Some(Source::Api);
    // A first hello creates the user: onUserAdded from the SDK; a second finds it.
    store.get_or_create_user(&svc, "alice").await.unwrap();
    store.get_or_create_user(&svc, "alice").await.unwrap();
    let update =
        |friendly: Option<&str>, attributes: Option<&str>, role: Option<&str>| UserUpdate {
            friendly_name: friendly.map(str::to_owned),
            attributes: attributes.map(str::to_owned),
            role_sid: role.map(str::to_owned),
        };
    store
        .update_user(
            &svc.sid,
            "alice",
            &update(Some("Alice"), Some(r#"{"x":1}"#), None),
            api,
        )
        .await
        .unwrap();
    // Nothing subscribers see: the same values again, a role.
    store
        .update_user(&svc.sid, "alice", &update(Some("Alice"), None, None), api)
        .await
        .unwrap();
    store
        .update_user(
            &svc.sid,
            "alice",
            &update(None, None, Some("RL00000000000000000000000000000001")),
            api,
        )
        .await
        .unwrap();
    // A push registration makes her notifiable; a second one of the same address changes
    // nothing; another address neither (still notifiable).
    store
        .upsert_binding(&svc, "alice", "fcm", "t1", None)
        .await
        .unwrap();
    store
        .upsert_binding(&svc, "alice", "fcm", "t1", None)
        .await
        .unwrap();
    let b2 = store
        .upsert_binding(&svc, "alice", "apn", "t2", None)
        .await
        .unwrap();
    store
        .delete_binding_by_address(&svc.sid, "alice", "fcm", "t1")
        .await
        .unwrap();
    store.delete_binding(&svc.sid, &b2.sid, api).await.unwrap();
    store.delete_user(&svc.sid, "alice", api).await.unwrap();

    let events = pending(store.as_ref()).await;
    let summary: Vec<(&str, &str, &str, &str)> = events
        .iter()
        .map(|e| {
            let reasons = if e.event_type == "onUserUpdated" {
                param(e, "UpdateReasons")
            } else {
                ""
            };
            (
                e.event_type.as_str(),
                param(e, "Source"),
                reasons,
                param(e, "IsNotifiable"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("onUserAdded", "SDK", "", ""),
            ("onUserUpdated", "API", "friendlyName,attributes", ""),
            ("onUserUpdated", "SDK", "reachabilityNotifiable", "true"),
            ("onUserUpdated", "API", "reachabilityNotifiable", "false"),
            ("onUserRemoved", "API", "", "false"),
        ]
    );
    let renamed = &events[1];
    assert_eq!(param(renamed, "FriendlyName"), "Alice");
    assert_eq!(param(renamed, "Attributes"), r#"{"x":1}"#);
    assert_eq!(
        param(&events[4], "RoleSid"),
        "RL00000000000000000000000000000001"
    );
    // Every event has its own token.
    let mut tokens: Vec<&str> = events.iter().map(|e| e.token.as_str()).collect();
    tokens.dedup();
    assert_eq!(tokens.len(), events.len());
}

async fn presence_changes_apply_in_version_order(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    listen(store.as_ref(), &svc).await;
    store
        .create_user(&svc, &new_user("alice"), None)
        .await
        .unwrap();
    store
        .create_user(&svc, &new_user("bob"), None)
        .await
        .unwrap();
    // Reachability disabled: the state is kept, no event is recorded.
    store
        .record_presence(&[presence(&svc, "bob", true, 100, 5)])
        .await
        .unwrap();
    assert!(
        store
            .get_user(&svc.sid, "bob")
            .await
            .unwrap()
            .presence_online
    );
    assert_eq!(store.queue_stats().await.unwrap().depth, 0);

    enable(store.as_ref(), &svc).await;
    store
        .record_presence(&[
            presence(&svc, "alice", true, 1_000, 10),
            // The same state again (a restart, a resynchronised node): no second event.
            presence(&svc, "alice", true, 1_001, 11),
            // Older than what alice has: skipped.
            presence(&svc, "alice", false, 999, 9),
            // A user that does not exist: skipped, the batch goes on.
            presence(&svc, "nobody", true, 1_000, 12),
        ])
        .await
        .unwrap();
    let alice = store.get_user(&svc.sid, "alice").await.unwrap();
    assert!(alice.presence_online);
    assert_eq!(alice.online_epoch, 1, "online in the current epoch");
    store
        .record_presence(&[presence(&svc, "alice", false, 1_060, 20)])
        .await
        .unwrap();
    let alice = store.get_user(&svc.sid, "alice").await.unwrap();
    assert!(!alice.presence_online);
    assert_eq!(alice.last_seen_at, Some(1_060));
    // Offline again (a recovery after a restart): the first offline time stays.
    store
        .record_presence(&[presence(&svc, "alice", false, 2_000, 21)])
        .await
        .unwrap();
    assert_eq!(
        store
            .get_user(&svc.sid, "alice")
            .await
            .unwrap()
            .last_seen_at,
        Some(1_060)
    );

    let online: Vec<String> = store
        .online_users(0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|u| {
            assert_eq!(u.version, 5);
            u.identity
        })
        .collect();
    assert_eq!(online, ["bob"]);
    assert!(store.max_presence_version().await.unwrap() >= 21);

    let events = pending(store.as_ref()).await;
    let seen: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|e| {
            (
                param(e, "IsOnline"),
                param(e, "DateLastSeen"),
                param(e, "UpdateReasons"),
            )
        })
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].0, "true");
    assert_eq!(seen[0].2, "reachabilityOnline");
    assert_eq!(
        seen[1],
        ("false", "1970-01-01T00:17:40Z", "reachabilityOnline")
    );
    assert!(events.iter().all(|e| param(e, "Source") == "SDK"));
}

/// A batch that can record no event (reachability on, no webhook listening) reads only the
/// users' presence columns: what it writes must be what a batch with a listening webhook
/// writes, and a batch mixing both kinds of service records the events of the one.
async fn presence_without_a_listening_webhook_is_recorded_all_the_same(fx: &Fixture) {
    let store = &fx.store;
    let quiet = store.create_service(&AC, "quiet").await.unwrap();
    enable(store.as_ref(), &quiet).await;
    let loud = store.create_service(&AC, "loud").await.unwrap();
    enable(store.as_ref(), &loud).await;
    for svc in [&quiet, &loud] {
        store
            .create_user(svc, &new_user("alice"), None)
            .await
            .unwrap();
    }
    // More users than one statement reads (pieces of 8 and 1).
    let many: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
    for identity in &many {
        store.get_or_create_user(&quiet, identity).await.unwrap();
    }
    let changes: Vec<PresenceRecord> = many
        .iter()
        .enumerate()
        .map(|(i, identity)| presence(&quiet, identity, true, 900, 1 + i as i64))
        .collect();
    store.record_presence(&changes).await.unwrap();
    for identity in &many {
        let user = store.get_user(&quiet.sid, identity).await.unwrap();
        assert!(user.presence_online, "{identity}");
        assert_eq!(user.online_epoch, 1, "{identity}");
    }
    store
        .record_presence(&[
            presence(&quiet, "alice", true, 1_000, 10),
            presence(&quiet, "alice", false, 1_030, 11),
            presence(&quiet, "alice", true, 1_040, 12),
            presence(&quiet, "alice", false, 1_050, 13),
        ])
        .await
        .unwrap();
    let alice = store.get_user(&quiet.sid, "alice").await.unwrap();
    assert!(!alice.presence_online);
    assert_eq!(alice.last_seen_at, Some(1_050));
    assert_eq!(alice.online_epoch, 1, "online in the current epoch");
    assert_eq!(store.queue_stats().await.unwrap().depth, 0);
    // Older than what the store has: skipped.
    store
        .record_presence(&[presence(&quiet, "alice", true, 1_060, 12)])
        .await
        .unwrap();
    assert!(
        !store
            .get_user(&quiet.sid, "alice")
            .await
            .unwrap()
            .presence_online
    );

    listen(store.as_ref(), &loud).await;
    store
        .record_presence(&[
            presence(&quiet, "alice", true, 1_100, 20),
            presence(&loud, "alice", true, 1_100, 21),
            presence(&loud, "alice", false, 1_130, 22),
        ])
        .await
        .unwrap();
    assert!(
        store
            .get_user(&quiet.sid, "alice")
            .await
            .unwrap()
            .presence_online
    );
    let loud_alice = store.get_user(&loud.sid, "alice").await.unwrap();
    assert!(!loud_alice.presence_online);
    assert_eq!(loud_alice.last_seen_at, Some(1_130));
    let events: Vec<(String, String, String)> = pending(store.as_ref())
        .await
        .into_iter()
        .filter(|e| e.event_type == "onUserUpdated")
        .map(|e| {
            (
                e.service_sid.to_string(),
                param(&e, "IsOnline").to_owned(),
                param(&e, "DateLastSeen").to_owned(),
            )
        })
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events
            .iter()
            .all(|(sid, _, _)| sid.as_str() == loud.sid.as_str())
    );
    assert_eq!(events[0].1, "true");
    assert_eq!(events[1].1, "false");
    assert_eq!(events[1].2, "1970-01-01T00:18:50Z");
}

/// A batch is written a few hundred users per statement: one that spans several statements
/// applies every change, in order, with every event, like a small one.
async fn users_read_by_identity_in_one_call(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    let other = store.create_service(&AC, "other").await.unwrap();
    // 75 users: pieces of 64, 8, 1, 1 and 1; "ghost" and the other service's "x" are not here.
    let mut asked = Vec::new();
    let mut want = Vec::new();
    for i in 0..75 {
        let identity = format!("u{i}");
        want.push(store.get_or_create_user(&svc, &identity).await.unwrap());
        asked.push(identity);
    }
    store.get_or_create_user(&other, "x").await.unwrap();
    asked.insert(40, "ghost".into());
    asked.push("x".into());
    let mut got = store.get_users_by_identity(&svc.sid, &asked).await.unwrap();
    got.sort_by(|a, b| a.sid.cmp(&b.sid));
    want.sort_by(|a, b| a.sid.cmp(&b.sid));
    assert_eq!(got, want);
    assert!(
        store
            .get_users_by_identity(&svc.sid, &[])
            .await
            .unwrap()
            .is_empty()
    );
    let one = store
        .get_users_by_identity(&other.sid, &["x".to_string()])
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].identity, "x");
}

async fn a_presence_batch_larger_than_one_statement_applies_whole(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    enable(store.as_ref(), &svc).await;
    listen(store.as_ref(), &svc).await;
    let n = 1_203;
    for i in 0..n {
        store
            .get_or_create_user(&svc, &format!("u{i}"))
            .await
            .unwrap();
    }
    // Every user comes online; the last 3 go offline again within the batch.
    let mut changes: Vec<PresenceRecord> = (0..n)
        .map(|i| presence(&svc, &format!("u{i}"), true, 1_000, 10 + i))
        .collect();
    for i in n - 3..n {
        changes.push(presence(&svc, &format!("u{i}"), false, 1_050, 10_000 + i));
    }
    // Nobody: skipped, the rest goes on.
    changes.push(presence(&svc, "nobody", true, 1_000, 20_000));
    store.record_presence(&changes).await.unwrap();
    for i in [0, 499, 500, 501, 999, 1_000, n - 4] {
        let user = store.get_user(&svc.sid, &format!("u{i}")).await.unwrap();
        assert!(user.presence_online, "u{i}");
        assert_eq!(user.online_epoch, 1, "u{i}");
    }
    for i in n - 3..n {
        let user = store.get_user(&svc.sid, &format!("u{i}")).await.unwrap();
        assert!(!user.presence_online, "u{i}");
        assert_eq!(user.last_seen_at, Some(1_050), "u{i}");
    }
    let online = store.online_users(0, 2 * n).await.unwrap();
    assert_eq!(online.len() as i64, n - 3);
    assert!(
        online
            .iter()
            .all(|u| u.version == 10 + u.identity[1..].parse::<i64>().unwrap())
    );
    // onUserAdded for each user created, then onUserUpdated for each flip, in batch order.
    let updated: Vec<(String, String)> = pending(store.as_ref())
        .await
        .into_iter()
        .filter(|e| e.event_type == "onUserUpdated")
        .map(|e| (e.identity.clone(), param(&e, "IsOnline").to_owned()))
        .collect();
    assert_eq!(updated.len() as i64, n + 3);
    assert_eq!(updated[0], ("u0".to_owned(), "true".to_owned()));
    assert_eq!(
        updated[n as usize],
        (format!("u{}", n - 3), "false".to_owned())
    );
    assert_eq!(
        updated.last().unwrap(),
        &(format!("u{}", n - 1), "false".to_owned())
    );
}

/// Records `n` presence flips of `identity` (online, offline, ...), each an event.
async fn flips(store: &dyn Store, svc: &Service, identity: &str, n: i64, version: i64) {
    let changes: Vec<PresenceRecord> = (0..n)
        .map(|i| presence(svc, identity, i % 2 == 0, 1_000 + i, version + i))
        .collect();
    store.record_presence(&changes).await.unwrap();
}

async fn claims_take_each_users_events_one_at_a_time_in_order(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    enable(store.as_ref(), &svc).await;
    listen(store.as_ref(), &svc).await;
    for identity in ["alice", "bob"] {
        store
            .create_user(&svc, &new_user(identity), None)
            .await
            .unwrap();
    }
    flips(store.as_ref(), &svc, "alice", 3, 1).await;
    flips(store.as_ref(), &svc, "bob", 1, 1).await;
    let now = hooks_now_ms();
    let first = store.claim_events("n1", now, 30_000, 10).await.unwrap();
    let who: Vec<(&str, i64)> = first
        .iter()
        .map(|e| (e.identity.as_str(), e.attempts))
        .collect();
    assert_eq!(
        who,
        [("alice", 1), ("bob", 1)],
        "the oldest event of each user"
    );
    assert_eq!(param(&first[0], "IsOnline"), "true");
    // Leased: nothing more to take, not even alice's next event.
    assert!(
        store
            .claim_events("n2", now, 30_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // alice's first fails and waits a second; bob's is delivered.
    store
        .complete_events(
            "n1",
            &[
                (
                    first[0].claim(),
                    Completion::Retry {
                        at_ms: now + 1_000,
                        error: "HTTP 500".into(),
                    },
                ),
                (first[1].claim(), Completion::Delivered),
            ],
        )
        .await
        .unwrap();
    assert!(
        store
            .claim_events("n2", now, 30_000, 10)
            .await
            .unwrap()
            .is_empty(),
        "alice's next event waits behind her first"
    );
    let retry = store
        .claim_events("n2", now + 1_000, 30_000, 10)
        .await
        .unwrap();
    assert_eq!(retry.len(), 1);
    assert_eq!((retry[0].seq, retry[0].attempts), (first[0].seq, 2));
    assert_eq!(
        retry[0].token, first[0].token,
        "the same token on every attempt"
    );
    store
        .complete_events("n2", &[(retry[0].claim(), Completion::Delivered)])
        .await
        .unwrap();
    let second = store
        .claim_events("n1", now + 1_000, 30_000, 10)
        .await
        .unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(param(&second[0], "IsOnline"), "false");
    assert!(second[0].seq > first[0].seq);
    store
        .complete_events("n1", &[(second[0].claim(), Completion::Delivered)])
        .await
        .unwrap();
    assert_eq!(store.queue_stats().await.unwrap().depth, 1);

    // Without the filter any more (or the URL), a claimed event has no target.
    store
        .update_webhook(
            &svc.sid,
            &WebhookUpdate {
                filters: Some(vec!["onUserAdded".into()]),
                ..WebhookUpdate::default()
            },
        )
        .await
        .unwrap();
    let last = store
        .claim_events("n1", now + 1_000, 30_000, 10)
        .await
        .unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].target, None);
}

async fn leases_expire_and_outcomes_of_a_lost_lease_are_ignored(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    enable(store.as_ref(), &svc).await;
    listen(store.as_ref(), &svc).await;
    store
        .create_user(&svc, &new_user("alice"), None)
        .await
        .unwrap();
    flips(store.as_ref(), &svc, "alice", 1, 1).await;
    let now = hooks_now_ms();
    let taken = store.claim_events("dead", now, 5_000, 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert!(
        store
            .claim_events("n2", now + 4_999, 5_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // The lease ran out: another node takes it.
    let again = store
        .claim_events("n2", now + 5_000, 5_000, 10)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].token.as_str(), again[0].attempts),
        (taken[0].token.as_str(), 2)
    );
    // The first holder's late outcome changes nothing.
    store
        .complete_events("dead", &[(taken[0].claim(), Completion::Delivered)])
        .await
        .unwrap();
    assert_eq!(store.queue_stats().await.unwrap().depth, 1);
    // Nor does a late outcome of the same node's earlier claim, once it claimed it again.
    let later = store
        .claim_events("n2", now + 10_000, 5_000, 10)
        .await
        .unwrap();
    assert_eq!(later[0].attempts, 3);
    store
        .complete_events("n2", &[(again[0].claim(), Completion::Delivered)])
        .await
        .unwrap();
    assert_eq!(store.queue_stats().await.unwrap().depth, 1);
    // Leases given back are claimable at once.
    assert_eq!(store.release_events(Some("n2")).await.unwrap(), 1);
    assert_eq!(store.release_events(None).await.unwrap(), 0);
    let third = store
        .claim_events("n3", now + 10_000, 5_000, 10)
        .await
        .unwrap();
    assert_eq!(third.len(), 1);
    store
        .complete_events("n3", &[(third[0].claim(), Completion::Delivered)])
        .await
        .unwrap();
    assert_eq!(store.queue_stats().await.unwrap(), Default::default());
}

async fn concurrent_claims_never_take_an_event_twice(fx: &Fixture) {
    let store = &fx.store;
    let svc = store.create_service(&AC, "s").await.unwrap();
    enable(store.as_ref(), &svc).await;
    listen(store.as_ref(), &svc).await;
    for i in 0..20 {
        let identity = format!("user{i}");
        store
            .create_user(&svc, &new_user(&identity), None)
            .await
            .unwrap();
        flips(store.as_ref(), &svc, &identity, 3, 1).await;
    }
    let mut tasks = Vec::new();
    for node in ["n1", "n2", "n3", "n4"] {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut delivered = Vec::new();
            for _ in 0..200 {
                let claimed = store
                    .claim_events(node, hooks_now_ms(), 60_000, 5)
                    .await
                    .unwrap();
                if claimed.is_empty() && store.queue_stats().await.unwrap().depth == 0 {
                    break;
                }
                let done: Vec<(Claim, Completion)> = claimed
                    .iter()
                    .map(|e| (e.claim(), Completion::Delivered))
                    .collect();
                store.complete_events(node, &done).await.unwrap();
                delivered.extend(claimed.into_iter().map(|e| (e.identity, e.seq)));
            }
            delivered
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 60, "each event once");
    let mut seqs: Vec<i64> = all.iter().map(|(_, s)| *s).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 60);
}

async fn nodes_remember_when_they_were_alive(fx: &Fixture) {
    let store = &fx.store;
    assert_eq!(store.touch_node("n1", 100).await.unwrap(), None);
    assert_eq!(store.touch_node("n1", 105).await.unwrap(), Some(100));
    assert_eq!(store.touch_node("n2", 7).await.unwrap(), None);
    assert_eq!(store.touch_node("n1", 110).await.unwrap(), Some(105));
}
