//! The Rust client SDK (`reach-client`) against the real reachd: subscriptions and updates in
//! both encodings, typed connect errors, reconnects (kill -9, drain, a dead server), token
//! refresh and expiry, a slow event reader, hundreds of users, push registrations.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use reach_client::{
    BindingType, Client, ClientEvent, ConnectionState, Encoding, Error, EventStream,
    ReconnectPolicy, UpdateReason, User,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Short intervals so timing rules can be observed quickly.
const FAST: &str = r#"
[presence]
heartbeat_interval_ms = 200
heartbeat_timeout_ms = 1000
offline_grace_ms = 400
auth_timeout_ms = 1000
token_warning_s = 2
"#;

/// Generous wait for any one thing to happen.
const WAIT: Duration = Duration::from_secs(10);

fn quick_reconnect() -> ReconnectPolicy {
    ReconnectPolicy::exponential(Duration::from_millis(50), Duration::from_millis(500))
}

async fn enabled_service(d: &Reachd) -> String {
    let rest = d.client();
    let svc = rest.create_service("client tests").await;
    rest.set_reachability(&svc, true).await;
    svc
}

async fn update_user(d: &Reachd, svc: &str, identity: &str, form: &[(&str, &str)]) {
    let r = d
        .client()
        .post(&format!("/v1/Services/{svc}/Users/{identity}"), form)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
}

async fn connect_as(d: &Reachd, svc: &str, identity: &str, encoding: Encoding) -> Client {
    Client::builder(d.ws_url(), d.token(svc, identity))
        .encoding(encoding)
        .reconnect(quick_reconnect())
        .connect()
        .await
        .expect("connected")
}

/// The next event matching `pred`, skipping others; panics after the wait.
async fn next_matching(
    events: &mut EventStream,
    mut pred: impl FnMut(&ClientEvent) -> bool,
) -> ClientEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let e = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("a matching event within the wait")
            .expect("the stream is open");
        if pred(&e) {
            return e;
        }
    }
}

/// The next `UserUpdated` of `identity`.
async fn update_of(events: &mut EventStream, identity: &str) -> (User, Vec<UpdateReason>) {
    match next_matching(
        events,
        |e| matches!(e, ClientEvent::UserUpdated { user, .. } if user.identity() == identity),
    )
    .await
    {
        ClientEvent::UserUpdated { user, reasons } => (user, reasons),
        _ => unreachable!(),
    }
}

async fn state_change(events: &mut EventStream, to: ConnectionState) {
    next_matching(
        events,
        |e| matches!(e, ClientEvent::ConnectionStateChanged(s) if *s == to),
    )
    .await;
}

/// Polls `cond` (a cheap read of client state) until it holds; panics after the wait.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "not within the wait: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn subscribe_and_updates_in_both_encodings() {
    // A long grace: an offline seen quickly proves the client said `bye`.
    let d = Reachd::start(
        r#"
[presence]
heartbeat_interval_ms = 200
offline_grace_ms = 4000
"#,
    );
    for enc in [Encoding::MsgPack, Encoding::Json] {
        let svc = enabled_service(&d).await;
        create_user(&d, &svc, "alice").await;
        let bob = connect_as(&d, &svc, "bob", enc).await;
        assert_eq!(bob.encoding(), enc);
        assert_eq!(bob.connection_state(), ConnectionState::Connected);
        assert!(bob.reachability_enabled());
        assert_eq!(bob.service_sid(), svc);
        assert_eq!(bob.user().identity(), "bob");
        assert_eq!(bob.user().is_online(), Some(true), "own user is online");
        assert!(bob.user().is_subscribed());
        let mut events = bob.events();

        let alice = bob.subscribe_user("alice").await.unwrap();
        assert_eq!(alice.is_online(), None, "never online since enabling");
        assert_eq!(alice.last_seen_at(), None, "null as is_online");
        assert!(alice.is_subscribed());
        assert_eq!(alice.attributes(), serde_json::json!({}));
        match events.recv().await {
            Some(ClientEvent::UserSubscribed(u)) => assert_eq!(u, alice),
            other => panic!("{other:?}"),
        }
        let mut alice_updates = alice.updates();

        // alice comes online.
        let alice_client = connect_as(&d, &svc, "alice", enc).await;
        let (u, reasons) = update_of(&mut events, "alice").await;
        assert_eq!(reasons, vec![UpdateReason::ReachabilityOnline]);
        assert_eq!(u.is_online(), Some(true));
        assert_eq!(
            alice.is_online(),
            Some(true),
            "every handle reads the latest"
        );
        let seen = alice.last_seen_at().expect("online: seen now");
        assert!((seen - common::now()).abs() <= 2, "{seen}");
        let up = tokio::time::timeout(WAIT, alice_updates.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(up.reasons, vec![UpdateReason::ReachabilityOnline]);

        // Profile changes over REST, with their reasons.
        update_user(&d, &svc, "alice", &[("FriendlyName", "Alice A.")]).await;
        let (_, reasons) = update_of(&mut events, "alice").await;
        assert_eq!(reasons, vec![UpdateReason::FriendlyName]);
        assert_eq!(alice.friendly_name().as_deref(), Some("Alice A."));
        update_user(&d, &svc, "alice", &[("Attributes", r#"{"team":"blue"}"#)]).await;
        let (_, reasons) = update_of(&mut events, "alice").await;
        assert_eq!(reasons, vec![UpdateReason::Attributes]);
        assert_eq!(alice.attributes()["team"], "blue");

        // Closing (or dropping) the client says bye: offline at once, not after the grace.
        let started = Instant::now();
        if enc == Encoding::MsgPack {
            alice_client.close().await;
            assert_eq!(
                alice_client.connection_state(),
                ConnectionState::Disconnected
            );
        } else {
            drop(alice_client);
        }
        let (_, reasons) = update_of(&mut events, "alice").await;
        assert_eq!(reasons, vec![UpdateReason::ReachabilityOnline]);
        assert_eq!(alice.is_online(), Some(false));
        let left = alice.last_seen_at().expect("offline: when she left");
        assert!((left - common::now()).abs() <= 2, "{left}");
        assert!(
            started.elapsed() < Duration::from_millis(3000),
            "offline before the 4 s grace: {:?}",
            started.elapsed()
        );

        // Unknown identities fail alone.
        let e = bob.subscribe_user("nobody").await.unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
        let outcome = bob.subscribe_users(["nobody", "alice"]).await.unwrap();
        assert_eq!(outcome.users, vec![alice.clone()], "the same handle");
        assert_eq!(outcome.errors.len(), 1);
        assert_eq!(
            (outcome.errors[0].identity.as_str(), outcome.errors[0].code),
            ("nobody", 20404)
        );

        // Unsubscribed: alice's next change is not reported, bob's own is.
        alice.unsubscribe().await.unwrap();
        assert!(!alice.is_subscribed());
        assert_eq!(alice.friendly_name().as_deref(), Some("Alice A."), "kept");
        next_matching(
            &mut events,
            |e| matches!(e, ClientEvent::UserUnsubscribed(u) if u.identity() == "alice"),
        )
        .await;
        update_user(&d, &svc, "alice", &[("FriendlyName", "ignored")]).await;
        update_user(&d, &svc, "bob", &[("FriendlyName", "Bob")]).await;
        match next_matching(&mut events, |e| {
            matches!(e, ClientEvent::UserUpdated { .. })
        })
        .await
        {
            ClientEvent::UserUpdated { user, reasons } => {
                assert_eq!(user.identity(), "bob", "nothing about alice any more");
                assert_eq!(reasons, vec![UpdateReason::FriendlyName]);
                assert_eq!(bob.user().friendly_name().as_deref(), Some("Bob"));
            }
            _ => unreachable!(),
        }
        assert!(bob.ping().await.unwrap() < WAIT);
        bob.close().await;
        assert_eq!(bob.connection_state(), ConnectionState::Disconnected);
        state_change(&mut events, ConnectionState::Disconnected).await;
        assert!(
            events.recv().await.is_none(),
            "the stream ends with the client"
        );
    }
}

#[tokio::test]
async fn connect_errors_are_typed() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    let token = d.token(&svc, "alice");
    for bad in [
        "not a url",
        "http://127.0.0.1:1/v1/ws",
        "ftp://127.0.0.1/v1/ws",
    ] {
        let e = Client::connect(bad, &token).await.unwrap_err();
        assert!(matches!(e, Error::InvalidUrl { .. }), "{bad}: {e:?}");
    }
    // wss:// to a gateway without TLS: the handshake fails as TLS.
    let wss = format!("wss://{}/v1/ws", d.http);
    let e = Client::connect(&wss, &token).await.unwrap_err();
    assert!(matches!(e, Error::Tls(_)), "{e:?}");
    // Nobody listens on this port.
    let url = format!("ws://127.0.0.1:{}/v1/ws", free_port());
    let e = Client::connect(&url, &token).await.unwrap_err();
    assert!(matches!(e, Error::Connect(_)), "{e:?}");
    assert!(e.is_transient());
    // Refused tokens: a bad signature, an expired token, a foreign service.
    let forged = mint(KEY_SID, "not-the-secret", ACCOUNT_SID, &svc, "alice", 3600);
    let e = Client::connect(&d.ws_url(), &forged).await.unwrap_err();
    assert!(
        matches!(e, Error::Denied { code: 20107, .. }),
        "bad signature: {e:?}"
    );
    let expired = mint(KEY_SID, KEY_SECRET, ACCOUNT_SID, &svc, "alice", -10);
    let e = Client::connect(&d.ws_url(), &expired).await.unwrap_err();
    assert!(e.is_token_expired(), "{e:?}");
    let foreign = mint(
        OTHER_KEY_SID,
        OTHER_KEY_SECRET,
        OTHER_ACCOUNT_SID,
        &svc,
        "alice",
        3600,
    );
    let e = Client::connect(&d.ws_url(), &foreign).await.unwrap_err();
    assert!(matches!(e, Error::Denied { code: 20103, .. }), "{e:?}");
    // The URL may leave out the path.
    let ok = Client::connect(&format!("ws://{}", d.http), &token)
        .await
        .unwrap();
    assert_eq!(ok.user().identity(), "alice");
}

#[tokio::test]
async fn reconnects_after_kill_9_and_reports_only_real_changes() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let d = Reachd::start_with_env(FAST, &[("REACH_SERVER__LISTEN", &listen)]);
    let svc = enabled_service(&d).await;
    create_user(&d, &svc, "carol").await;
    let _alice = connect_as(&d, &svc, "alice", Encoding::MsgPack).await;
    let bob = connect_as(&d, &svc, "bob", Encoding::MsgPack).await;
    let watched = bob.subscribe_users(["alice", "carol"]).await.unwrap();
    let (alice, carol) = (watched.users[0].clone(), watched.users[1].clone());
    assert_eq!((alice.is_online(), carol.is_online()), (Some(true), None));
    let first_connection = bob.connection_id();
    let mut events = bob.events();

    let d = tokio::task::spawn_blocking(move || d.kill9_and_restart())
        .await
        .unwrap();
    assert_eq!(d.http.port(), port, "same port after the restart");
    state_change(&mut events, ConnectionState::Connecting).await;
    let mut seen = vec![];
    loop {
        let e = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("reconnected within the wait")
            .unwrap();
        let done = matches!(
            e,
            ClientEvent::ConnectionStateChanged(ConnectionState::Connected)
        );
        seen.push(e);
        if done {
            break;
        }
    }
    assert_ne!(bob.connection_id(), first_connection);
    // Resubscribed: a change of carol after the restart reaches bob.
    update_user(&d, &svc, "carol", &[("FriendlyName", "Carol")]).await;
    loop {
        let e = tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("carol's change within the wait")
            .unwrap();
        let done =
            matches!(&e, ClientEvent::UserUpdated { user, .. } if user.identity() == "carol");
        seen.push(e);
        if done {
            break;
        }
    }
    eventually("alice back online", || alice.is_online() == Some(true)).await;
    assert_eq!(carol.friendly_name().as_deref(), Some("Carol"));
    assert!(alice.is_subscribed() && carol.is_subscribed());
    // Only real changes: carol's name once; alice at most offline-then-online (if bob came
    // back before her); nothing about bob's own user, no (un)subscriptions.
    let mut alice_updates = 0;
    for e in &seen {
        match e {
            ClientEvent::UserUpdated { user, reasons } => match user.identity() {
                "carol" => assert_eq!(reasons, &vec![UpdateReason::FriendlyName], "{seen:?}"),
                "alice" => {
                    alice_updates += 1;
                    assert_eq!(reasons, &vec![UpdateReason::ReachabilityOnline], "{seen:?}");
                }
                other => panic!("unexpected update of {other}: {seen:?}"),
            },
            ClientEvent::ConnectionStateChanged(_) => {}
            other => panic!("unexpected {other:?} in {seen:?}"),
        }
    }
    assert!(alice_updates <= 2, "{seen:?}");
    assert_eq!(
        seen.iter()
            .filter(
                |e| matches!(e, ClientEvent::UserUpdated { user, .. } if user.identity() == "carol")
            )
            .count(),
        1,
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_draining_server_is_left_and_rejoined_after_retry_after() {
    let db_dir = tempfile::tempdir().unwrap();
    let db = db_dir.path().join("reach.db").display().to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let start = move || {
        Reachd::start_with_env(
            FAST,
            &[
                ("REACH_SERVER__LISTEN", listen.as_str()),
                ("REACH_STORAGE__SQLITE_PATH", db.as_str()),
            ],
        )
    };
    let d = start.clone()();
    let svc = enabled_service(&d).await;
    let bob = connect_as(&d, &svc, "bob", Encoding::Json).await;
    let mut events = bob.events();
    let status = tokio::task::spawn_blocking(move || d.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    state_change(&mut events, ConnectionState::Connecting).await;
    let gone = bob.last_disconnect().expect("a disconnect was recorded");
    assert_eq!(gone.code, Some(1001), "{gone:?}");
    let retry_after = gone.retry_after.expect("goodbye carried retry_after_ms");
    assert!(retry_after <= Duration::from_millis(2000), "{gone:?}");
    // The same data and port again: the client comes back by itself.
    let _d = tokio::task::spawn_blocking(start).await.unwrap();
    state_change(&mut events, ConnectionState::Connected).await;
    let since = bob.connected_since().expect("connected");
    assert!(
        since >= gone.at + retry_after,
        "reconnected only after retry_after ({retry_after:?})"
    );
    assert_eq!(bob.user().is_online(), Some(true));
    bob.ping().await.unwrap();
}

/// A TCP proxy whose existing connections can be frozen: they stay open but carry nothing,
/// like a server (or a network path) that died without closing.
struct Proxy {
    addr: SocketAddr,
    /// Connections numbered below this are frozen.
    frozen_below: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen_below = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let (f, a) = (Arc::clone(&frozen_below), Arc::clone(&accepted));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let n = a.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, n, Arc::clone(&f)));
                tokio::spawn(pump(sr, cw, n, Arc::clone(&f)));
            }
        });
        Proxy {
            addr,
            frozen_below,
            accepted,
        }
    }

    fn freeze_existing(&self) {
        self.frozen_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    n: u64,
    frozen_below: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(read) = from.read(&mut buf).await else {
            return;
        };
        if read == 0 {
            return;
        }
        if n < frozen_below.load(Ordering::SeqCst) {
            // Hold both ends open and carry nothing, until the test ends.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..read]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_silent_server_is_detected_and_left() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    let proxy = Proxy::start(d.http).await;
    let bob = Client::builder(format!("ws://{}/v1/ws", proxy.addr), d.token(&svc, "bob"))
        .reconnect(quick_reconnect())
        .connect()
        .await
        .unwrap();
    let mut events = bob.events();
    let frozen_at = Instant::now();
    proxy.freeze_existing();
    state_change(&mut events, ConnectionState::Connecting).await;
    let gone = bob.last_disconnect().unwrap();
    assert!(gone.reason.contains("nothing heard"), "{gone:?}");
    assert!(
        frozen_at.elapsed() < Duration::from_secs(3),
        "2.5 heartbeat intervals (500 ms), not much more: {:?}",
        frozen_at.elapsed()
    );
    state_change(&mut events, ConnectionState::Connected).await;
    bob.ping().await.unwrap();
}

#[tokio::test]
async fn update_token_keeps_the_connection_past_the_old_expiry() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    let short = mint(KEY_SID, KEY_SECRET, ACCOUNT_SID, &svc, "bob", 3);
    let bob = Client::connect(&d.ws_url(), &short).await.unwrap();
    let old_expiry = bob.token_expires_at();
    let mut events = bob.events();
    next_matching(&mut events, |e| {
        matches!(e, ClientEvent::TokenAboutToExpire)
    })
    .await;
    // Another identity's token is refused; the connection stays.
    let other = mint(KEY_SID, KEY_SECRET, ACCOUNT_SID, &svc, "mallory", 3600);
    let e = bob.update_token(other).await.unwrap_err();
    assert!(matches!(e, Error::Server { code: 20403, .. }), "{e:?}");
    let fresh = mint(KEY_SID, KEY_SECRET, ACCOUNT_SID, &svc, "bob", 3600);
    let expires = bob.update_token(fresh).await.unwrap();
    assert!(expires > now() + 3000);
    assert_eq!(bob.token_expires_at(), expires);
    // Past the old token's expiry, the connection lives on.
    while now() <= old_expiry + 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bob.ping().await.unwrap();
    assert_eq!(bob.connection_state(), ConnectionState::Connected);
    while let Some(e) = events.try_recv() {
        assert!(
            !matches!(
                e,
                ClientEvent::TokenExpired | ClientEvent::ConnectionStateChanged(_)
            ),
            "{e:?}"
        );
    }
}

#[tokio::test]
async fn an_expired_token_denies_until_a_new_token_comes() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    let short = mint(KEY_SID, KEY_SECRET, ACCOUNT_SID, &svc, "alice", 3);
    let alice = Client::builder(d.ws_url(), short)
        .reconnect(quick_reconnect())
        .connect()
        .await
        .unwrap();
    let mut events = alice.events();
    state_change(&mut events, ConnectionState::Denied).await;
    match events.recv().await {
        Some(ClientEvent::TokenExpired) => {}
        other => panic!("expected tokenExpired, got {other:?}"),
    }
    assert_eq!(alice.connection_state(), ConnectionState::Denied);
    let gone = alice.last_disconnect().unwrap();
    assert_eq!(gone.code, Some(4001));
    assert!(gone.reason.contains("20104"), "{gone:?}");
    // Requests fail while denied...
    let e = alice.subscribe_user("alice").await.unwrap_err();
    assert!(e.is_token_expired(), "{e:?}");
    // ...and a new token connects again.
    let fresh = mint(KEY_SID, KEY_SECRET, ACCOUNT_SID, &svc, "alice", 3600);
    let expires = alice.update_token(fresh).await.unwrap();
    assert!(expires > now() + 3000);
    assert_eq!(alice.connection_state(), ConnectionState::Connected);
    alice.ping().await.unwrap();
}

#[tokio::test]
async fn a_slow_reader_gets_the_latest_state_per_user_with_merged_reasons() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    let ids: Vec<String> = (0..5).map(|i| format!("u{i}")).collect();
    for id in &ids {
        create_user(&d, &svc, id).await;
    }
    let bob = connect_as(&d, &svc, "bob", Encoding::MsgPack).await;
    let mut events = bob.events();
    let users = bob.subscribe_users(&ids).await.unwrap().users;
    // 50 name changes and 5 attribute changes while nobody reads the events.
    for round in 0..10 {
        for id in &ids {
            update_user(&d, &svc, id, &[("FriendlyName", &format!("name-{round}"))]).await;
        }
    }
    for id in &ids {
        update_user(&d, &svc, id, &[("Attributes", r#"{"final":true}"#)]).await;
    }
    eventually("every user's final state applied", || {
        users.iter().all(|u| {
            u.friendly_name().as_deref() == Some("name-9") && u.attributes()["final"] == true
        })
    })
    .await;
    // The socket was never held up by the unread stream.
    bob.ping().await.unwrap();
    assert!(
        events.len() <= 2 * ids.len(),
        "bounded: {} queued",
        events.len()
    );
    let mut subscribed = 0;
    let mut updates = std::collections::HashMap::new();
    while let Some(e) = events.try_recv() {
        match e {
            ClientEvent::UserSubscribed(_) => subscribed += 1,
            ClientEvent::UserUpdated { user, reasons } => {
                assert_eq!(user.friendly_name().as_deref(), Some("name-9"));
                assert_eq!(
                    reasons,
                    vec![UpdateReason::FriendlyName, UpdateReason::Attributes]
                );
                *updates.entry(user.identity().to_owned()).or_insert(0) += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(subscribed, ids.len());
    assert_eq!(updates.len(), ids.len(), "{updates:?}");
    assert!(updates.values().all(|n| *n == 1), "{updates:?}");
    assert!(bob.event_stats().coalesced_updates > 0);
    assert_eq!(bob.event_stats().dropped_events, 0);
}

#[tokio::test]
async fn three_hundred_users_in_one_call() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    let ids: Vec<String> = (0..300).map(|i| format!("user-{i:03}")).collect();
    for batch in ids.chunks(25) {
        futures_util::future::join_all(batch.iter().map(|id| create_user(&d, &svc, id))).await;
    }
    for enc in [Encoding::MsgPack, Encoding::Json] {
        let bob = connect_as(&d, &svc, &format!("bob-{enc:?}"), enc).await;
        let mut events = bob.events();
        let outcome = bob.subscribe_users(&ids).await.unwrap();
        assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
        assert_eq!(outcome.users.len(), 300);
        assert!(outcome.users.iter().all(|u| u.is_subscribed()));
        assert_eq!(bob.subscribed_users().len(), 300);
        let _u150 = connect_as(&d, &svc, "user-150", enc).await;
        let (u, reasons) = update_of(&mut events, "user-150").await;
        assert_eq!(reasons, vec![UpdateReason::ReachabilityOnline]);
        assert_eq!(u, outcome.users[150]);
        assert_eq!(outcome.users[150].is_online(), Some(true));
    }
}

#[tokio::test]
async fn push_registration_makes_the_user_notifiable_for_a_watcher() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    let alice = connect_as(&d, &svc, "alice", Encoding::MsgPack).await;
    let bob = connect_as(&d, &svc, "bob", Encoding::Json).await;
    let watched = bob.subscribe_user("alice").await.unwrap();
    assert_eq!(watched.is_notifiable(), None, "never had a binding");
    let mut events = bob.events();
    let sid = alice
        .set_push_registration(BindingType::Fcm, "device-1")
        .await
        .unwrap();
    assert!(sid.starts_with("BS"), "{sid}");
    let (_, reasons) = update_of(&mut events, "alice").await;
    assert_eq!(reasons, vec![UpdateReason::ReachabilityNotifiable]);
    assert_eq!(watched.is_notifiable(), Some(true));
    eventually("alice sees herself notifiable", || {
        alice.user().is_notifiable() == Some(true)
    })
    .await;
    alice
        .remove_push_registration(BindingType::Fcm, "device-1")
        .await
        .unwrap();
    let (_, reasons) = update_of(&mut events, "alice").await;
    assert_eq!(reasons, vec![UpdateReason::ReachabilityNotifiable]);
    assert_eq!(watched.is_notifiable(), Some(false), "had one once: false");
    let e = alice
        .remove_push_registration(BindingType::Fcm, "device-1")
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
}
