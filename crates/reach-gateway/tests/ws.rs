//! WebSocket protocol v1 against the real reachd: handshake, subscriptions, presence with
//! grace, heartbeats, tokens, push registrations, bad input and every close code.

mod common;
mod ws_client;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use reach_proto::{ClientFrame, Encoding, ServerFrame, UpdateReason};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use ws_client::*;

/// A short grace so offline transitions are observed quickly. Heartbeats keep their
/// defaults: test clients that sit idle between steps must not time out on a loaded machine.
const FAST: &str = r#"
[presence]
heartbeat_interval_ms = 200
offline_grace_ms = 400
"#;

/// Short heartbeats, for the heartbeat test only (its clients keep reading).
const FAST_HEARTBEAT: &str = r#"
[presence]
heartbeat_interval_ms = 200
heartbeat_timeout_ms = 1000
offline_grace_ms = 400
"#;

async fn enabled_service(d: &Reachd) -> String {
    let rest = d.client();
    let svc = rest.create_service("ws tests").await;
    rest.set_reachability(&svc, true).await;
    svc
}

fn user_of(f: &ServerFrame) -> &reach_proto::User {
    match f {
        ServerFrame::UserUpdated { user, .. } => user,
        other => panic!("expected user_updated, got {other:?}"),
    }
}

fn reasons_of(f: &ServerFrame) -> Vec<UpdateReason> {
    match f {
        ServerFrame::UserUpdated { reasons, .. } => reasons.clone(),
        other => panic!("expected user_updated, got {other:?}"),
    }
}

async fn subscribe(ws: &mut Ws, id: i64, identities: &[&str]) -> ServerFrame {
    ws.request(ClientFrame::Subscribe {
        id,
        identities: identities.iter().map(|s| s.to_string()).collect(),
    })
    .await
}

#[tokio::test]
async fn welcome_and_presence_in_both_encodings() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    for enc in [Some(Encoding::Json), Some(Encoding::MsgPack), None] {
        let (mut bob, welcome) = Ws::hello(&d.ws_url(), &d.token(&svc, "bob"), enc).await;
        match &welcome {
            ServerFrame::Welcome {
                identity,
                service_sid,
                reachability_enabled,
                heartbeat_interval_ms,
                token_expires_at,
                user,
                connection_id,
            } => {
                assert_eq!(identity, "bob");
                assert_eq!(service_sid, &svc);
                assert!(reachability_enabled);
                assert_eq!(*heartbeat_interval_ms, 200);
                assert!(*token_expires_at > now());
                assert!(connection_id.starts_with("CN"));
                assert_eq!(user.identity, "bob");
                assert_eq!(user.is_online, Some(true), "own user is online");
                assert_eq!(user.is_notifiable, None, "never had a binding");
                assert_eq!(user.attributes, "{}");
            }
            _ => unreachable!(),
        }
        // alice does not exist yet: per-identity 20404, the others succeed.
        let reply = subscribe(&mut bob, 1, &["nobody", "bob"]).await;
        match reply {
            ServerFrame::Subscribed { id, users, errors } => {
                assert_eq!(id, 1);
                assert_eq!(users.len(), 1);
                assert_eq!(errors.len(), 1);
                assert_eq!(
                    (errors[0].identity.as_str(), errors[0].code),
                    ("nobody", 20404)
                );
            }
            other => panic!("{other:?}"),
        }
        // alice connects once (her user is created by the token), then bob watches her.
        let (alice, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), enc).await;
        match subscribe(&mut bob, 2, &["alice"]).await {
            ServerFrame::Subscribed { users, errors, .. } => {
                assert!(errors.is_empty());
                assert_eq!(users[0].is_online, Some(true));
            }
            other => panic!("{other:?}"),
        }
        alice.abort();
        let started = Instant::now();
        let off = bob.update_of("alice").await;
        assert_eq!(user_of(&off).is_online, Some(false));
        assert_eq!(reasons_of(&off), vec![UpdateReason::ReachabilityOnline]);
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "offline only after the grace"
        );
        let (_alice, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), enc).await;
        let on = bob.update_of("alice").await;
        assert_eq!(user_of(&on).is_online, Some(true));
        let r = bob.request(ClientFrame::Ping { id: 9 }).await;
        assert_eq!(r, ServerFrame::Pong { id: 9 });
    }
}

#[tokio::test]
async fn reconnect_inside_the_grace_is_not_a_flap_and_bye_is_immediate() {
    let d = Reachd::start(
        r#"
[presence]
offline_grace_ms = 1500
"#,
    );
    let svc = enabled_service(&d).await;
    let url = d.ws_url();
    let (a, _) = Ws::hello(&url, &d.token(&svc, "alice"), None).await;
    let (c, _) = Ws::hello(&url, &d.token(&svc, "carol"), None).await;
    let (mut bob, _) = Ws::hello(&url, &d.token(&svc, "bob"), None).await;
    subscribe(&mut bob, 1, &["alice", "carol"]).await;
    // alice drops and comes back at once; carol drops a little later and stays away.
    a.abort();
    let (_a2, _) = Ws::hello(&url, &d.token(&svc, "alice"), None).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.abort();
    // carol's offline comes after alice's grace ended: nothing about alice may precede it.
    let f = bob
        .recv_until(|f| matches!(f, ServerFrame::UserUpdated { .. }))
        .await;
    assert_eq!(user_of(&f).identity, "carol", "alice must not flap: {f:?}");
    assert_eq!(user_of(&f).is_online, Some(false));
    // bye: offline at once, well inside the 1.5 s grace.
    let (mut dave, _) = Ws::hello(&url, &d.token(&svc, "dave"), None).await;
    subscribe(&mut bob, 2, &["dave"]).await;
    let started = Instant::now();
    dave.send(&ClientFrame::Bye).await;
    let closed = dave.closed().await;
    assert_eq!(closed.code, Some(1000));
    let off = bob.update_of("dave").await;
    assert_eq!(user_of(&off).is_online, Some(false));
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "bye skips the grace"
    );
    // REST agrees.
    let r = d
        .client()
        .get(&format!("/v1/Services/{svc}/Users/dave"))
        .await;
    assert_eq!(r.body["is_online"], false);
    let r = d
        .client()
        .get(&format!("/v1/Services/{svc}/Users/alice"))
        .await;
    assert_eq!(r.body["is_online"], true);
}

#[tokio::test]
async fn enabling_and_disabling_reachability() {
    let d = Reachd::start(FAST);
    let rest = d.client();
    let svc = rest.create_service("switch").await;
    let url = d.ws_url();
    let (mut bob, welcome) = Ws::hello(&url, &d.token(&svc, "bob"), None).await;
    match welcome {
        ServerFrame::Welcome {
            reachability_enabled,
            user,
            ..
        } => {
            assert!(!reachability_enabled);
            assert_eq!(
                (user.is_online, user.is_notifiable),
                (None, None),
                "null while disabled"
            );
        }
        _ => unreachable!(),
    }
    let (_alice, _) = Ws::hello(&url, &d.token(&svc, "alice"), None).await;
    let (carol, _) = Ws::hello(&url, &d.token(&svc, "carol"), None).await;
    carol.abort();
    match subscribe(&mut bob, 1, &["alice", "carol"]).await {
        ServerFrame::Subscribed { users, .. } => {
            assert!(users.iter().all(|u| u.is_online.is_none()))
        }
        other => panic!("{other:?}"),
    }
    let r = rest.get(&format!("/v1/Services/{svc}/Users/alice")).await;
    assert!(
        r.body["is_online"].is_null() && r.body["is_notifiable"].is_null(),
        "{}",
        r.text
    );
    // carol's grace ends while disabled: nothing is published.
    tokio::time::sleep(Duration::from_millis(600)).await;
    rest.set_reachability(&svc, true).await;
    assert_eq!(
        bob.recv().await,
        ServerFrame::ServiceUpdated {
            reachability_enabled: true
        }
    );
    let on = bob.update_of("alice").await;
    assert_eq!(
        user_of(&on).is_online,
        Some(true),
        "already connected users turn online at once"
    );
    let r = rest.get(&format!("/v1/Services/{svc}/Users/alice")).await;
    assert_eq!(r.body["is_online"], true);
    let r = rest.get(&format!("/v1/Services/{svc}/Users/carol")).await;
    assert!(
        r.body["is_online"].is_null(),
        "carol never online since enabling: {}",
        r.text
    );
    rest.set_reachability(&svc, false).await;
    assert_eq!(
        bob.recv_until(|f| matches!(f, ServerFrame::ServiceUpdated { .. }))
            .await,
        ServerFrame::ServiceUpdated {
            reachability_enabled: false
        }
    );
    let r = rest.get(&format!("/v1/Services/{svc}/Users/alice")).await;
    assert!(r.body["is_online"].is_null());
    // Subscribers are told that alice's flag reads null now; without it bob would go on
    // showing her online, and still would after she leaves and reachability is re-enabled.
    // (Found by the engine fuzz target.)
    let off = bob.update_of("alice").await;
    assert_eq!(user_of(&off).is_online, None, "{off:?}");
    assert_eq!(reasons_of(&off), [UpdateReason::ReachabilityOnline]);
}

/// Another method than GET on the WebSocket route is a 405 with the REST error body (it was
/// an empty 405; found by the rest_request fuzz target).
#[tokio::test]
async fn other_methods_on_the_socket_route_get_the_error_body() {
    let d = Reachd::start("");
    let rest = d.client();
    for method in ["POST", "PATCH", "DELETE", "PUT"] {
        let r = rest.request(method, "/v1/ws", &[]).await;
        assert_eq!(r.status, 405, "{method}: {}", r.text);
        assert_eq!(r.body["code"], 20004, "{method}: {}", r.text);
        assert_eq!(r.body["status"], 405, "{method}: {}", r.text);
    }
}

#[tokio::test]
async fn rest_profile_updates_reach_subscribers_with_reasons() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    let rest = d.client();
    let r = rest
        .post(
            &format!("/v1/Services/{svc}/Users"),
            &[("Identity", "alice")],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let (mut bob, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "bob"), Some(Encoding::MsgPack)).await;
    match subscribe(&mut bob, 1, &["alice"]).await {
        ServerFrame::Subscribed { users, .. } => {
            assert_eq!(users[0].is_online, None, "never online since enabling");
        }
        other => panic!("{other:?}"),
    }
    rest.post(
        &format!("/v1/Services/{svc}/Users/alice"),
        &[("FriendlyName", "Alice A.")],
    )
    .await;
    let f = bob.update_of("alice").await;
    assert_eq!(reasons_of(&f), vec![UpdateReason::FriendlyName]);
    assert_eq!(user_of(&f).friendly_name.as_deref(), Some("Alice A."));
    rest.post(
        &format!("/v1/Services/{svc}/Users/alice"),
        &[("Attributes", r#"{"team":"blue"}"#)],
    )
    .await;
    let f = bob.update_of("alice").await;
    assert_eq!(reasons_of(&f), vec![UpdateReason::Attributes]);
    assert_eq!(user_of(&f).attributes, r#"{"team":"blue"}"#);
    // Unsubscribed: the next change of alice is not delivered, but carol's is.
    assert_eq!(
        bob.request(ClientFrame::Unsubscribe {
            id: 2,
            identities: vec!["alice".into()]
        })
        .await,
        ServerFrame::Unsubscribed { id: 2 }
    );
    rest.post(
        &format!("/v1/Services/{svc}/Users"),
        &[("Identity", "carol")],
    )
    .await;
    subscribe(&mut bob, 3, &["carol"]).await;
    rest.post(
        &format!("/v1/Services/{svc}/Users/alice"),
        &[("FriendlyName", "ignored")],
    )
    .await;
    rest.post(
        &format!("/v1/Services/{svc}/Users/carol"),
        &[("FriendlyName", "Carol")],
    )
    .await;
    let f = bob
        .recv_until(|f| matches!(f, ServerFrame::UserUpdated { .. }))
        .await;
    assert_eq!(user_of(&f).identity, "carol");
}

#[tokio::test]
async fn push_registrations_make_users_notifiable() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    let rest = d.client();
    let (mut alice, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
    let (mut bob, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "bob"), None).await;
    subscribe(&mut bob, 1, &["alice"]).await;
    let reg = alice
        .request(ClientFrame::RegisterPush {
            id: 5,
            binding_type: "fcm".into(),
            address: "device-1".into(),
        })
        .await;
    let binding_sid = match reg {
        ServerFrame::PushRegistered { id: 5, binding_sid } => binding_sid,
        other => panic!("{other:?}"),
    };
    assert!(binding_sid.starts_with("BS"));
    let f = bob.update_of("alice").await;
    assert_eq!(reasons_of(&f), vec![UpdateReason::ReachabilityNotifiable]);
    assert_eq!(user_of(&f).is_notifiable, Some(true));
    // Bad binding type: an error for that request, the socket stays.
    let e = alice
        .request(ClientFrame::RegisterPush {
            id: 6,
            binding_type: "sms".into(),
            address: "x".into(),
        })
        .await;
    assert!(
        matches!(
            e,
            ServerFrame::Error {
                id: Some(6),
                code: 20001,
                ..
            }
        ),
        "{e:?}"
    );
    // REST sees the binding, filtered by identity and type.
    let r = rest
        .get(&format!(
            "/v1/Services/{svc}/Bindings?Identity=alice&BindingType=fcm"
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["bindings"][0]["sid"], binding_sid.as_str());
    assert_eq!(r.body["bindings"][0]["endpoint"], "device-1");
    let r = rest.get(&format!("/v1/Services/{svc}/Users/alice")).await;
    assert_eq!(r.body["is_notifiable"], true);
    assert_eq!(
        alice
            .request(ClientFrame::UnregisterPush {
                id: 7,
                binding_type: "fcm".into(),
                address: "device-1".into()
            })
            .await,
        ServerFrame::PushUnregistered { id: 7 }
    );
    let f = bob.update_of("alice").await;
    assert_eq!(
        user_of(&f).is_notifiable,
        Some(false),
        "had a binding once: false, not null"
    );
    let e = alice
        .request(ClientFrame::UnregisterPush {
            id: 8,
            binding_type: "fcm".into(),
            address: "device-1".into(),
        })
        .await;
    assert!(
        matches!(
            e,
            ServerFrame::Error {
                id: Some(8),
                code: 20404,
                ..
            }
        ),
        "{e:?}"
    );
    // A binding deleted over REST is published too.
    let reg = alice
        .request(ClientFrame::RegisterPush {
            id: 9,
            binding_type: "apn".into(),
            address: "d2".into(),
        })
        .await;
    let ServerFrame::PushRegistered { binding_sid, .. } = reg else {
        panic!("{reg:?}")
    };
    assert_eq!(
        user_of(&bob.update_of("alice").await).is_notifiable,
        Some(true)
    );
    let r = rest
        .get(&format!("/v1/Services/{svc}/Bindings/{binding_sid}"))
        .await;
    assert_eq!(r.body["binding_type"], "apn");
    let r = rest
        .delete(&format!("/v1/Services/{svc}/Bindings/{binding_sid}"))
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        user_of(&bob.update_of("alice").await).is_notifiable,
        Some(false)
    );
}

#[tokio::test]
async fn tokens_refresh_warn_and_expire() {
    let d = Reachd::start(
        r#"
[presence]
token_warning_s = 2
"#,
    );
    let svc = enabled_service(&d).await;
    let short = mint(KEY_SID, KEY_SECRET, ACCOUNT_SID, &svc, "alice", 3);
    let (mut alice, _) = Ws::hello(&d.ws_url(), &short, None).await;
    let warn = alice
        .recv_until(|f| matches!(f, ServerFrame::TokenAboutToExpire { .. }))
        .await;
    assert!(matches!(warn, ServerFrame::TokenAboutToExpire { expires_at } if expires_at > 0));
    // A token for another identity is refused; the connection stays.
    let other = mint(KEY_SID, KEY_SECRET, ACCOUNT_SID, &svc, "mallory", 3600);
    let e = alice
        .request(ClientFrame::UpdateToken {
            id: 1,
            token: other,
        })
        .await;
    assert!(
        matches!(
            e,
            ServerFrame::Error {
                id: Some(1),
                code: 20403,
                ..
            }
        ),
        "{e:?}"
    );
    let e = alice
        .request(ClientFrame::UpdateToken {
            id: 2,
            token: "garbage".into(),
        })
        .await;
    assert!(
        matches!(
            e,
            ServerFrame::Error {
                id: Some(2),
                code: 20101,
                ..
            }
        ),
        "{e:?}"
    );
    // Without a refresh the connection is closed with 4001 at expiry.
    let closed = alice.closed().await;
    assert_eq!(closed.code, Some(4001));
    assert_eq!(closed.error_code(), Some(20104));
    // With a refresh it lives on.
    let short = mint(KEY_SID, KEY_SECRET, ACCOUNT_SID, &svc, "bob", 3);
    let (mut bob, _) = Ws::hello(&d.ws_url(), &short, None).await;
    let fresh = mint(KEY_SID, KEY_SECRET, ACCOUNT_SID, &svc, "bob", 3600);
    match bob
        .request(ClientFrame::UpdateToken {
            id: 3,
            token: fresh,
        })
        .await
    {
        ServerFrame::TokenUpdated {
            id: 3,
            token_expires_at,
        } => assert!(token_expires_at > now() + 3000),
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        bob.request(ClientFrame::Ping { id: 4 }).await,
        ServerFrame::Pong { id: 4 }
    );
}

#[tokio::test]
async fn bad_tokens_are_refused_with_4001() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    let other_svc = d
        .client_as(OTHER_ACCOUNT_SID, OTHER_AUTH_TOKEN)
        .create_service("theirs")
        .await;
    let claims = |exp: i64| {
        serde_json::json!({"jti": "x", "iss": KEY_SID, "sub": ACCOUNT_SID, "exp": exp,
            "grants": {"identity": "alice", "chat": {"service_sid": svc}}})
    };
    let mut nbf = claims(now() + 600);
    nbf["nbf"] = serde_json::json!(now() + 300);
    let mut hs512 = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512);
    hs512.cty = Some("twilio-fpa;v=1".into());
    let hs512 = jsonwebtoken::encode(
        &hs512,
        &claims(now() + 600),
        &jsonwebtoken::EncodingKey::from_secret(KEY_SECRET.as_bytes()),
    )
    .unwrap();
    let cases = vec![
        (
            "bad signature",
            sign(&claims(now() + 600), "wrong-secret"),
            20107,
        ),
        ("alg HS512", hs512, 20107),
        ("expired", sign(&claims(now() - 1), KEY_SECRET), 20104),
        (
            "exp beyond 24 h",
            sign(&claims(now() + 25 * 3600), KEY_SECRET),
            20104,
        ),
        ("nbf in the future", sign(&nbf, KEY_SECRET), 20105),
        (
            "unknown key",
            mint(
                "SK99999999999999999999999999999999",
                KEY_SECRET,
                ACCOUNT_SID,
                &svc,
                "a",
                600,
            ),
            20103,
        ),
        (
            "service of another account",
            d.token(&other_svc, "alice"),
            20103,
        ),
        (
            "unknown service",
            d.token("IS99999999999999999999999999999999", "alice"),
            20103,
        ),
        ("not a JWT", "nope".to_string(), 20101),
    ];
    for (name, token, code) in cases {
        let mut ws = Ws::connect(&d.ws_url(), None).await;
        ws.send(&ClientFrame::Hello {
            token,
            client: None,
        })
        .await;
        let closed = ws.closed().await;
        assert_eq!(closed.code, Some(4001), "{name}");
        assert_eq!(
            closed.error_code(),
            Some(code),
            "{name}: {:?}",
            closed.frames
        );
    }
    let metrics = d.metrics().await;
    assert!(
        metrics.contains(r#"reach_auth_failures_total{reason="signature"} 1"#),
        "{metrics}"
    );
    // The server still serves.
    let _ = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
}

#[tokio::test]
async fn bad_input_gets_an_error_frame_and_the_documented_close() {
    let d = Reachd::start(
        r#"
[presence]
auth_timeout_ms = 500
[limits]
max_frame_bytes = 1024
"#,
    );
    let svc = enabled_service(&d).await;
    let url = d.ws_url();
    // Frame before hello.
    let mut ws = Ws::connect(&url, None).await;
    ws.send(&ClientFrame::Ping { id: 1 }).await;
    let c = ws.closed().await;
    assert_eq!((c.code, c.error_code()), (Some(4002), Some(20409)));
    // No hello at all.
    let c = Ws::connect(&url, None).await.closed().await;
    assert_eq!((c.code, c.error_code()), (Some(4001), Some(20408)));
    // Malformed JSON, unknown type, missing field, wrong message kind, each after hello.
    let text = |s: &str| Message::Text(Utf8Bytes::from(s.to_string()));
    let cases: Vec<(Option<Encoding>, Message, u32)> = vec![
        (None, text("{not json"), 20400),
        (None, text(r#"{"type":"dance","id":1}"#), 20405),
        (None, text(r#"{"type":"subscribe","id":1}"#), 20400),
        (None, text("[1,2,3]"), 20400),
        (None, Message::Binary(vec![0x81, 0xa4].into()), 20400),
        (
            Some(Encoding::MsgPack),
            Message::Binary(vec![0xc1, 0x00].into()),
            20400,
        ),
        (
            Some(Encoding::MsgPack),
            Message::Binary(
                rmp_serde::to_vec_named(&serde_json::json!({"type":"dance"}))
                    .unwrap()
                    .into(),
            ),
            20405,
        ),
        (
            Some(Encoding::MsgPack),
            text(r#"{"type":"ping","id":1}"#),
            20400,
        ),
        (
            None,
            text(&format!(
                r#"{{"type":"ping","id":1,"pad":"{}"}}"#,
                "x".repeat(2000)
            )),
            20413,
        ),
        (
            None,
            text(&format!(
                r#"{{"type":"ping","id":1,"pad":"{}"}}"#,
                "x".repeat(100_000)
            )),
            20413,
        ),
    ];
    for (enc, msg, code) in cases {
        let (mut ws, _) = Ws::hello(&url, &d.token(&svc, "alice"), enc).await;
        let label = format!("{msg:?}").chars().take(60).collect::<String>();
        ws.send_raw(msg).await;
        let c = ws.closed().await;
        let close = if code == 20413 { 1009 } else { 4002 };
        assert_eq!(
            (c.code, c.error_code()),
            (Some(close), Some(code)),
            "{label}"
        );
    }
    // hello twice.
    let (mut ws, _) = Ws::hello(&url, &d.token(&svc, "alice"), None).await;
    ws.send(&ClientFrame::Hello {
        token: d.token(&svc, "alice"),
        client: None,
    })
    .await;
    let c = ws.closed().await;
    assert_eq!((c.code, c.error_code()), (Some(4002), Some(20409)));
    // An offer naming only unknown subprotocols is refused at the upgrade.
    let resp = reqwest::Client::new()
        .get(d.base() + "/v1/ws")
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("Sec-WebSocket-Protocol", "mqtt, chat.v9")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // Still serving.
    let (mut ws, _) = Ws::hello(&url, &d.token(&svc, "alice"), Some(Encoding::MsgPack)).await;
    assert_eq!(
        ws.request(ClientFrame::Ping { id: 2 }).await,
        ServerFrame::Pong { id: 2 }
    );
}

#[tokio::test]
async fn heartbeats_ping_and_silent_peers_are_closed_with_4008() {
    let d = Reachd::start(FAST_HEARTBEAT);
    let svc = enabled_service(&d).await;
    d.client()
        .post(
            &format!("/v1/Services/{svc}/Users"),
            &[("Identity", "carol")],
        )
        .await;
    // bob is a live client: tungstenite answers the server's pings while bob reads.
    let (mut bob, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "bob"), None).await;
    subscribe(&mut bob, 1, &["carol"]).await;
    // A silent peer: says hello, then never answers pings.
    let raw = RawWs::hello(d.http, &d.token(&svc, "carol")).await;
    let started = Instant::now();
    let silent = tokio::spawn(raw.read_to_close(Duration::from_secs(10)));
    // carol comes online, and after 4008 plus the grace goes offline; bob reads all along.
    let f = bob.update_of("carol").await;
    assert_eq!(user_of(&f).is_online, Some(true));
    let f = bob.update_of("carol").await;
    assert_eq!(user_of(&f).is_online, Some(false));
    // Keep bob talking (and answering pings) until the silent peer's socket has ended.
    let mut silent = silent;
    let (texts, code, pings) = loop {
        tokio::select! {
            r = &mut silent => break r.unwrap(),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                assert_eq!(bob.request(ClientFrame::Ping { id: 3 }).await, ServerFrame::Pong { id: 3 });
            }
        }
    };
    assert_eq!(code, Some(4008), "{texts:?}");
    assert!(texts.iter().any(|t| t.contains("20408")), "{texts:?}");
    assert!(
        pings >= 2,
        "server pinged every heartbeat_interval: {pings}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1300),
        "timeout plus grace"
    );
    assert!(bob.pings >= 2, "bob saw pings too");
    assert_eq!(
        bob.request(ClientFrame::Ping { id: 2 }).await,
        ServerFrame::Pong { id: 2 }
    );
    let metrics = d.metrics().await;
    assert!(
        metrics.contains("reach_heartbeat_timeouts_total 1"),
        "{metrics}"
    );
}

/// Waits until a new socket under `max_connections` gets its `welcome`.
async fn wait_for_a_slot(d: &Reachd, svc: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut ws = Ws::connect(&d.ws_url(), None).await;
        ws.send(&ClientFrame::Hello {
            token: d.token(svc, "c"),
            client: None,
        })
        .await;
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut ws.stream)).await {
            Ok(Some(Ok(Message::Text(t)))) if t.contains("welcome") => return,
            _ => assert!(Instant::now() < deadline, "a slot frees up"),
        }
    }
}

#[tokio::test]
async fn connection_limit_closes_with_4029() {
    let d = Reachd::start(
        r#"
[limits]
max_connections = 2
"#,
    );
    let svc = enabled_service(&d).await;
    let (_a, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "a"), None).await;
    let (b, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "b"), None).await;
    let c = Ws::connect(&d.ws_url(), None).await.closed().await;
    assert_eq!((c.code, c.error_code()), (Some(4029), Some(20429)));
    b.abort();
    // The permit comes back once the socket task ends.
    wait_for_a_slot(&d, &svc).await;
}

/// A refused socket keeps its place under `max_connections` until it is closed: one that does
/// not answer the server's close still counts for the close's timeout (2 s).
#[tokio::test]
async fn a_refused_socket_counts_until_it_is_closed() {
    use tokio::io::AsyncReadExt;
    let d = Reachd::start("[limits]\nmax_connections = 1\n");
    let svc = enabled_service(&d).await;
    let mut refused = RawWs::hello(d.http, "not-a-token").await;
    // The error frame has come: the server now waits for this client's close, which never comes.
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(WAIT, refused.tcp.read(&mut buf))
        .await
        .expect("the refusal within the wait")
        .unwrap();
    assert!(n > 0, "the refusal was written");
    let c = Ws::connect(&d.ws_url(), None).await.closed().await;
    assert_eq!((c.code, c.error_code()), (Some(4029), Some(20429)));
    // Once the close has timed out, the place is free again.
    wait_for_a_slot(&d, &svc).await;
    drop(refused);
}

#[tokio::test]
async fn subscription_limit_is_per_identity() {
    let d = Reachd::start(
        r#"
[presence]
max_subscriptions_per_connection = 2
"#,
    );
    let svc = enabled_service(&d).await;
    let rest = d.client();
    for u in ["u1", "u2", "u3"] {
        rest.post(&format!("/v1/Services/{svc}/Users"), &[("Identity", u)])
            .await;
    }
    let (mut ws, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "me"), None).await;
    match subscribe(&mut ws, 1, &["u1", "u2", "u3", "me"]).await {
        ServerFrame::Subscribed { users, errors, .. } => {
            assert_eq!(users.len(), 3, "u1, u2 and the own user");
            assert_eq!(errors.len(), 1);
            assert_eq!((errors[0].identity.as_str(), errors[0].code), ("u3", 20429));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn sigterm_drains_with_goodbye_and_1001() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    let (ws, _) = Ws::hello(
        &d.ws_url(),
        &d.token(&svc, "alice"),
        Some(Encoding::MsgPack),
    )
    .await;
    let closing = tokio::spawn(ws.closed());
    // A peer that never answers the close keeps the drain going for a moment.
    let stubborn = RawWs::hello(d.http, &d.token(&svc, "bob")).await;
    let readyz = format!("http://{}/readyz", d.admin);
    assert_eq!(reqwest::get(&readyz).await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pid = d.pid();
    let terminated = tokio::task::spawn_blocking(move || d.terminate());
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    // While sockets drain, /readyz says 503.
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(r) = reqwest::get(&readyz).await
            && r.status() == 503
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz turned 503 while draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = terminated.await.unwrap();
    drop(stubborn);
    let closed = closing.await.unwrap();
    assert_eq!(closed.code, Some(1001));
    match closed.frames.last() {
        Some(ServerFrame::Goodbye {
            reason,
            retry_after_ms,
        }) => {
            assert_eq!(reason, "draining");
            assert!(*retry_after_ms <= 2000);
        }
        other => panic!("expected goodbye, got {other:?}"),
    }
    assert!(status.success(), "exit 0 after draining: {status:?}");
}

/// Waits until reachd's SQLite file holds an online epoch for `identity` (written with a
/// presence batch, after the `hello`), reading the file as the next process would.
async fn wait_epoch_stored(d: &Reachd, identity: &str) {
    let db = format!("sqlite://{}?mode=ro", d.dir.join("reach.db").display());
    let mut file = <sqlx::SqliteConnection as sqlx::Connection>::connect(&db)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let epoch: i64 = sqlx::query_scalar("SELECT online_epoch FROM users WHERE identity = ?")
            .bind(identity)
            .fetch_one(&mut file)
            .await
            .unwrap();
        if epoch > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{identity}'s online epoch never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn users_and_bindings_survive_kill_9() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    let (mut alice, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
    let reg = alice
        .request(ClientFrame::RegisterPush {
            id: 1,
            binding_type: "gcm".into(),
            address: "tok".into(),
        })
        .await;
    assert!(matches!(reg, ServerFrame::PushRegistered { .. }));
    // `hello` does not wait on the store for the user's online epoch: it is written in the
    // next presence batch. Wait for it in the file, as the next process will read it.
    wait_epoch_stored(&d, "alice").await;
    let d = d.kill9_and_restart();
    let rest = d.client();
    let r = rest.get(&format!("/v1/Services/{svc}/Users/alice")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["is_notifiable"], true);
    assert_eq!(
        r.body["is_online"], false,
        "was online since enabling, gone now"
    );
    let r = rest.get(&format!("/v1/Services/{svc}/Configuration")).await;
    assert_eq!(r.body["reachability_enabled"], true);
    let r = rest.get(&format!("/v1/Services/{svc}/Bindings")).await;
    assert_eq!(r.body["bindings"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn metrics_and_health_endpoints() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    let (_ws, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
    let get = |p: &str| reqwest::get(format!("http://{}{p}", d.admin));
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let text = get("/metrics").await.unwrap().text().await.unwrap();
    for name in [
        "reach_connections 1",
        "reach_connections_opened_total 1",
        "reach_online_users 1",
        "reach_subscriptions 1",
        "reach_frames_sent_total",
        "reach_diffs_emitted_total",
        "reach_updates_coalesced_total",
        "reach_fanout_duration_seconds_bucket",
        "reach_http_requests_total{",
        "reach_http_request_duration_seconds_bucket{",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    // The build: its version and the commit it was made from.
    let build = text
        .lines()
        .find(|l| l.starts_with("reach_build_info{"))
        .unwrap_or_else(|| panic!("no reach_build_info in\n{text}"));
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{build}"
    );
    assert!(
        build.contains("commit=\"") && build.ends_with(" 1"),
        "{build}"
    );
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let (open, max) = (value("process_open_fds"), value("process_max_fds"));
    assert!(open > 3.0 && open < max, "{open} of {max}");

    // The status page: what this node is and holds.
    let status: serde_json::Value = get("/debug/status").await.unwrap().json().await.unwrap();
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["node_id"], "single");
    assert_eq!(status["cluster"], serde_json::Value::Null);
    assert_eq!(status["ready"], true);
    assert_eq!(status["sockets"], 1);
    assert_eq!(status["users_online"], 1);
    assert_eq!(status["services"], 1);
    assert_eq!(status["webhooks"]["queue_depth"], 0);
    assert!(status["open_files"]["open"].as_u64().unwrap() > 3);
    assert!(status["open_files"]["limit"].as_u64().unwrap() >= 1024);
    assert!(status["commit"].as_str().is_some_and(|c| !c.is_empty()));
}

async fn metric(d: &Reachd, line: &str) -> bool {
    let text = d.metrics().await;
    text.lines().any(|l| l == line)
}

#[tokio::test]
async fn deleted_services_and_users_close_their_sockets_with_4003() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    let rest = d.client();
    let (alice, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
    let (mut bob, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "bob"), None).await;
    let r = rest
        .delete(&format!("/v1/Services/{svc}/Users/alice"))
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(alice.closed().await.code, Some(4003));
    assert_eq!(
        bob.request(ClientFrame::Ping { id: 1 }).await,
        ServerFrame::Pong { id: 1 }
    );
    let r = rest.delete(&format!("/v1/Services/{svc}")).await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(bob.closed().await.code, Some(4003));
    // Its tokens are refused from now on.
    let mut ws = Ws::connect(&d.ws_url(), None).await;
    ws.send(&ClientFrame::Hello {
        token: d.token(&svc, "bob"),
        client: None,
    })
    .await;
    assert_eq!(ws.closed().await.code, Some(4001));
}

/// Small messages are written straight to the connection while it takes them, through the
/// WebSocket stream behind what it has not taken: a watcher whose connection is full (large
/// replies it has not read) and that then reads while its users keep changing (their first
/// updates queue behind the replies, the later ones go straight out) gets every frame whole,
/// the replies in order and each user's updates in order, the last one carrying the last
/// change. (A frame the connection takes only part of: `wire`'s unit tests.)
#[tokio::test]
async fn updates_stay_whole_and_in_order_when_a_watcher_reads_late() {
    let d = Reachd::start("[limits]\nmax_outbox_bytes = 16777216\n");
    let svc = enabled_service(&d).await;
    let users: Vec<String> = (0..5).map(|i| format!("user{i}")).collect();
    let attributes = serde_json::json!({ "bio": "x".repeat(15_000) }).to_string();
    let big = [("Identity", "big"), ("Attributes", attributes.as_str())];
    let r = d
        .client()
        .post(&format!("/v1/Services/{svc}/Users"), &big)
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    for u in &users {
        create_user(&d, &svc, u).await;
    }
    let mut watcher = Ws::connect_with_rcvbuf(d.http, 4096).await;
    watcher
        .send(&ClientFrame::Hello {
            token: d.token(&svc, "watcher"),
            client: None,
        })
        .await;
    assert!(matches!(watcher.recv().await, ServerFrame::Welcome { .. }));
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    assert!(matches!(
        subscribe(&mut watcher, 1, &names).await,
        ServerFrame::Subscribed { .. }
    ));
    // ~4.5 MB of replies, unread: more than the connection's buffers hold.
    const REPLIES: i64 = 300;
    for id in 0..REPLIES {
        watcher
            .send(&ClientFrame::Subscribe {
                id: 10 + id,
                identities: vec!["big".into()],
            })
            .await;
    }
    // The users change while the watcher catches up, ~300 bytes a frame.
    const ROUNDS: usize = 150;
    let pad = "x".repeat(200);
    let changes = {
        let (rest, svc, users, pad) = (d.client(), svc.clone(), users.clone(), pad.clone());
        tokio::spawn(async move {
            for round in 0..ROUNDS {
                for u in &users {
                    let name = format!("{u} {round:04} {pad}");
                    let r = rest
                        .post(
                            &format!("/v1/Services/{svc}/Users/{u}"),
                            &[("FriendlyName", &name)],
                        )
                        .await;
                    assert_eq!(r.status, 200, "{}", r.text);
                }
            }
        })
    };
    let mut replies = 0;
    let mut last: std::collections::HashMap<String, usize> = Default::default();
    while replies < REPLIES || users.iter().any(|u| last.get(u) != Some(&(ROUNDS - 1))) {
        match watcher.recv().await {
            ServerFrame::Subscribed { id, users, .. } => {
                assert_eq!(id, 10 + replies, "replies in order");
                assert_eq!(users[0].attributes.len(), attributes.len());
                replies += 1;
            }
            f @ ServerFrame::UserUpdated { .. } => {
                let user = user_of(&f);
                let name = user.friendly_name.as_deref().expect("a name");
                let round: usize = name.split(' ').nth(1).unwrap().parse().unwrap();
                assert!(name.ends_with(&pad), "{name}");
                if let Some(before) = last.insert(user.identity.clone(), round) {
                    assert!(
                        round > before,
                        "{}: round {round} after {before}",
                        user.identity
                    );
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    changes.await.unwrap();
    assert_eq!(
        watcher.request(ClientFrame::Ping { id: 2 }).await,
        ServerFrame::Pong { id: 2 }
    );
}

#[tokio::test]
async fn a_client_that_does_not_read_is_closed_as_slow_consumer() {
    let d = Reachd::start(
        r#"
[limits]
max_outbox_bytes = 4096
write_stall_timeout_ms = 1000
"#,
    );
    let svc = enabled_service(&d).await;
    // A user with large attributes: each subscribe reply carries them (about 15 KB).
    let attributes = serde_json::json!({ "bio": "x".repeat(15_000) }).to_string();
    let r = d
        .client()
        .post(
            &format!("/v1/Services/{svc}/Users"),
            &[("Identity", "big"), ("Attributes", &attributes)],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let mut raw = RawWs::hello_with_rcvbuf(d.http, &d.token(&svc, "greedy"), Some(4096)).await;
    // Ask for far more than the socket buffers and the outbox can hold, never reading.
    let request = r#"{"type":"subscribe","id":1,"identities":["big"]}"#;
    let flood = tokio::spawn(async move {
        for _ in 0..2_000 {
            raw.send_text(request).await;
        }
        raw
    });
    let deadline = Instant::now() + WAIT;
    while !metric(
        &d,
        r#"reach_connections_closed_total{reason="slow_consumer"} 1"#,
    )
    .await
    {
        assert!(
            Instant::now() < deadline,
            "closed as slow consumer within the wait"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    flood.abort();
    // Others are unaffected.
    let (mut ws, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "fine"), None).await;
    assert_eq!(
        ws.request(ClientFrame::Ping { id: 1 }).await,
        ServerFrame::Pong { id: 1 }
    );
}

#[tokio::test]
async fn a_client_close_frame_is_answered() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    let (mut ws, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
    ws.stream.close(None).await.unwrap();
    // The server answers with its own close frame: the stream ends cleanly, without an error.
    let next = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut ws.stream))
        .await
        .unwrap();
    assert!(
        matches!(next, Some(Ok(Message::Close(_))) | None),
        "closing handshake completed: {next:?}"
    );
}

/// Server messages longer than `limits.write_fragment_bytes` go out as RFC 6455 fragments
/// (this keeps a busy socket's write buffer small), and reassemble into the same message; with
/// 0, the default, they go out whole. Read at the frame level, below any client library.
#[tokio::test]
async fn long_messages_are_fragmented_on_the_wire_and_reassemble() {
    use std::io::{Read, Write};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameSocket};

    for (fragment, config) in [
        (
            128usize,
            format!("{FAST}\n[limits]\nwrite_fragment_bytes = 128\n"),
        ),
        (0, FAST.to_owned()),
    ] {
        let d = Reachd::start(&config);
        let svc = enabled_service(&d).await;
        let token = d.token(&svc, "a-user-with-a-long-enough-identity");
        let addr = d.ws_url();
        let addr = addr
            .trim_start_matches("ws://")
            .trim_end_matches("/v1/ws")
            .to_owned();
        let frames = tokio::task::spawn_blocking(move || {
            let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(
                tcp,
                "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
                 Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Protocol: reach.v1.json\r\n\r\n"
            )
            .unwrap();
            // The response head, byte by byte (no frame comes before hello).
            let mut head = Vec::new();
            let mut byte = [0u8];
            while !head.ends_with(b"\r\n\r\n") {
                tcp.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            let head = String::from_utf8(head).unwrap();
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            let mut socket = FrameSocket::new(tcp);
            let hello = serde_json::json!({"type": "hello", "token": token}).to_string();
            let mut frame = Frame::message(hello.into_bytes(), OpCode::Data(Data::Text), true);
            frame.header_mut().mask = Some([7, 1, 3, 9]);
            socket.send(frame).unwrap();
            // Frames until one with FIN: the welcome.
            let mut frames = Vec::new();
            loop {
                let f = socket.read(None).unwrap().expect("a frame");
                let fin = f.header().is_final;
                frames.push(f);
                if fin {
                    return frames;
                }
            }
        })
        .await
        .unwrap();
        let payload: Vec<u8> = frames.iter().flat_map(|f| f.payload().to_vec()).collect();
        let welcome: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(welcome["type"], "welcome");
        assert_eq!(welcome["identity"], "a-user-with-a-long-enough-identity");
        assert!(
            payload.len() > 128,
            "the welcome is long: {} bytes",
            payload.len()
        );
        assert_eq!(frames[0].header().opcode, OpCode::Data(Data::Text));
        if fragment == 0 {
            assert_eq!(frames.len(), 1, "whole message");
        } else {
            assert_eq!(frames.len(), payload.len().div_ceil(fragment));
            for f in &frames[1..] {
                assert_eq!(f.header().opcode, OpCode::Data(Data::Continue));
            }
            assert!(frames.iter().all(|f| f.payload().len() <= fragment));
            assert!(
                frames[..frames.len() - 1]
                    .iter()
                    .all(|f| !f.header().is_final)
            );
        }
    }
}

/// Frames a client sends behind `hello` in the same TCP write are all read and answered, and a
/// socket that has only been written to for a while (deliveries) still reads what comes next:
/// the server polls a socket's reads when it has something to read, not on every wake-up.
#[tokio::test]
async fn pipelined_frames_and_requests_after_deliveries_are_answered() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    create_user(&d, &svc, "alice").await;
    create_user(&d, &svc, "carol").await;
    let url = d.ws_url();
    let mut bob = Ws::connect(&url, Some(Encoding::MsgPack)).await;
    let pipelined = [
        ClientFrame::Hello {
            token: d.token(&svc, "bob"),
            client: None,
        },
        ClientFrame::Subscribe {
            id: 1,
            identities: vec!["alice".into()],
        },
        ClientFrame::Ping { id: 2 },
    ];
    for f in &pipelined {
        let msg = Message::Binary(reach_proto::encode(f, Encoding::MsgPack));
        futures_util::SinkExt::feed(&mut bob.stream, msg)
            .await
            .unwrap();
    }
    futures_util::SinkExt::flush(&mut bob.stream).await.unwrap();
    assert!(matches!(bob.recv().await, ServerFrame::Welcome { .. }));
    match bob.recv().await {
        ServerFrame::Subscribed { id: 1, users, .. } => {
            assert_eq!(users.len(), 1);
            assert_eq!(users[0].identity, "alice");
        }
        other => panic!("expected subscribed, got {other:?}"),
    }
    assert!(matches!(bob.recv().await, ServerFrame::Pong { id: 2 }));
    // alice comes and goes: bob's socket is only written to meanwhile.
    for _ in 0..3 {
        let (mut alice, _) = Ws::hello(&url, &d.token(&svc, "alice"), None).await;
        assert_eq!(user_of(&bob.update_of("alice").await).is_online, Some(true));
        alice.send(&ClientFrame::Bye).await;
        assert_eq!(alice.closed().await.code, Some(1000));
        assert_eq!(
            user_of(&bob.update_of("alice").await).is_online,
            Some(false)
        );
    }
    assert!(matches!(
        bob.request(ClientFrame::Ping { id: 3 }).await,
        ServerFrame::Pong { id: 3 }
    ));
    assert!(matches!(
        subscribe(&mut bob, 4, &["carol"]).await,
        ServerFrame::Subscribed { id: 4, users, .. } if users.len() == 1
    ));
}

/// A metric's value from the admin listener.
async fn metric_value(d: &Reachd, name: &str) -> i64 {
    let text = d.metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// `reach_ws_streams_parked_total`: how many times a quiet socket was parked.
async fn streams_parked(d: &Reachd) -> i64 {
    metric_value(d, "reach_ws_streams_parked_total").await
}

/// Waits until sockets were parked at least `n` times.
async fn wait_parked(d: &Reachd, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let parked = streams_parked(d).await;
        if parked >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{parked} sockets parked, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until exactly `n` sockets are parked now (`reach_ws_sockets_parked`).
async fn wait_parked_now(d: &Reachd, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let parked = metric_value(d, "reach_ws_sockets_parked").await;
        if parked == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{parked} sockets parked now, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn quiet_sockets_are_parked_and_keep_working() {
    let d = Reachd::start(FAST);
    let svc = enabled_service(&d).await;
    let (mut alice, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
    let (mut bob, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "bob"), Some(Encoding::MsgPack)).await;
    let ServerFrame::Subscribed { users, .. } = subscribe(&mut bob, 1, &["alice"]).await else {
        panic!("expected subscribed");
    };
    assert_eq!(users[0].is_online, Some(true));
    // Both go quiet (server pings and their pongs do not count) and are parked.
    wait_parked(&d, 2).await;
    let parked = streams_parked(&d).await;
    // Requests wake them and go on over new streams, in both encodings; a push reaches a
    // parked socket without one.
    let ServerFrame::Subscribed { users, .. } = subscribe(&mut alice, 2, &["bob"]).await else {
        panic!("expected subscribed");
    };
    assert_eq!(users[0].is_online, Some(true));
    alice.send(&ClientFrame::Bye).await;
    let update = bob.update_of("alice").await;
    assert_eq!(user_of(&update).is_online, Some(false));
    // Alice's request woke her socket; it is parked again after its reply.
    wait_parked(&d, parked + 1).await;
    // carol has never connected: she is reported as not found, in the reply to request 3.
    let ServerFrame::Subscribed { id, users, errors } = subscribe(&mut bob, 3, &["carol"]).await
    else {
        panic!("expected subscribed");
    };
    assert_eq!((id, users.len(), errors.len()), (3, 0, 1), "{errors:?}");
    // Server pings kept being answered across the parks: bob is still connected.
    bob.send(&ClientFrame::Ping { id: 4 }).await;
    assert!(matches!(bob.recv().await, ServerFrame::Pong { id: 4 }));
}

/// A parked socket pings and hears the pongs without a stream: with pings every 200 ms and a
/// 1 s heartbeat timeout, a client that reads (and so answers) stays connected and parked, and
/// no stream is built for the pings.
#[tokio::test]
async fn parked_sockets_ping_and_hear_pongs_without_a_stream() {
    let d = Reachd::start(FAST_HEARTBEAT);
    let svc = enabled_service(&d).await;
    let (mut bob, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "bob"), None).await;
    wait_parked_now(&d, 1).await;
    let parks = streams_parked(&d).await;
    // Two seconds of reading: about ten pings, twice the heartbeat timeout.
    let read = tokio::time::timeout(Duration::from_secs(2), bob.recv()).await;
    assert!(read.is_err(), "no frame came: {read:?}");
    assert!(bob.pings >= 5, "{} pings", bob.pings);
    assert_eq!(
        streams_parked(&d).await,
        parks,
        "no stream built for pings and pongs"
    );
    assert_eq!(metric_value(&d, "reach_ws_sockets_parked").await, 1);
    // Heard all along: still connected, and a request is answered.
    assert_eq!(
        bob.request(ClientFrame::Ping { id: 1 }).await,
        ServerFrame::Pong { id: 1 }
    );
}

/// A pong that arrives with a request in one read, or split across reads, is not taken parked:
/// the stream built for the read reads all of it, and the request is answered.
#[tokio::test]
async fn a_parked_socket_hands_a_pong_with_more_to_its_stream() {
    use tokio::io::AsyncWriteExt;
    let d =
        Reachd::start("[presence]\nheartbeat_interval_ms = 60000\nheartbeat_timeout_ms = 120000\n");
    let svc = enabled_service(&d).await;
    let (mut bob, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "bob"), None).await;
    wait_parked_now(&d, 1).await;
    let pong = [0x8A, 0x80, 1, 2, 3, 4];
    let request = |id| {
        masked_text(&reach_proto::encode(
            &ClientFrame::Ping { id },
            Encoding::Json,
        ))
    };
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = bob.stream.get_mut() else {
        panic!("a plain connection");
    };
    tcp.write_all(&[&pong[..], &request(7)].concat())
        .await
        .unwrap();
    assert_eq!(bob.recv().await, ServerFrame::Pong { id: 7 });
    wait_parked_now(&d, 1).await;
    // Half a pong, then the rest with a request.
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = bob.stream.get_mut() else {
        panic!("a plain connection");
    };
    tcp.write_all(&pong[..3]).await.unwrap();
    tcp.flush().await.unwrap();
    tcp.write_all(&[&pong[3..], &request(8)].concat())
        .await
        .unwrap();
    assert_eq!(bob.recv().await, ServerFrame::Pong { id: 8 });
}

/// A parked socket (no WebSocket stream, no buffer) sends a small update without waking, wakes
/// for a write that needs its stream (an update longer than a frame sent parked), for what the
/// client writes (a request; two requests in one TCP write: the second waits in the new
/// stream's read buffer), for a close frame, and notices a dropped connection.
#[tokio::test]
async fn parked_sockets_wake_for_writes_reads_closes_and_drops() {
    use futures_util::{SinkExt, StreamExt};
    // No server pings: a parked socket stays parked until something happens to it.
    let d = Reachd::start(
        "[presence]\nheartbeat_interval_ms = 60000\nheartbeat_timeout_ms = 120000\n\
         offline_grace_ms = 400\n",
    );
    let svc = enabled_service(&d).await;
    let url = d.ws_url();
    let (mut alice, _) = Ws::hello(&url, &d.token(&svc, "alice"), None).await;
    let (mut bob, _) = Ws::hello(&url, &d.token(&svc, "bob"), Some(Encoding::MsgPack)).await;
    let ServerFrame::Subscribed { users, .. } = subscribe(&mut bob, 1, &["alice"]).await else {
        panic!("expected subscribed");
    };
    assert_eq!(users[0].is_online, Some(true));
    wait_parked_now(&d, 2).await;
    let parks = streams_parked(&d).await;
    // An update reaches both parked sockets without a stream: they stay parked.
    let r = d
        .client()
        .post(
            &format!("/v1/Services/{svc}/Users/alice"),
            &[("FriendlyName", "Alice A.")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let update = bob.update_of("alice").await;
    assert_eq!(user_of(&update).friendly_name.as_deref(), Some("Alice A."));
    // Alice sees her own (read, so that her drop below ends with a FIN, not a reset).
    let update = alice.update_of("alice").await;
    assert_eq!(user_of(&update).friendly_name.as_deref(), Some("Alice A."));
    assert_eq!(metric_value(&d, "reach_ws_sockets_parked").await, 2);
    assert_eq!(
        streams_parked(&d).await,
        parks,
        "no stream was built and parked again"
    );
    // Both were written by the fan-out itself, to the connections the waiting sessions lent it
    // (counted once its task has sent to both: the frames may arrive first).
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric_value(&d, "reach_fanout_writes_total").await < 2 {
        assert!(Instant::now() < deadline, "no fan-out writes counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric_value(&d, "reach_fanout_writes_total").await, 2);
    // An update longer than a frame sent parked (600 bytes of attributes) needs the stream:
    // bob's socket wakes, writes it whole, and parks again.
    let attributes = serde_json::json!({ "bio": "y".repeat(600) }).to_string();
    let r = d
        .client()
        .post(
            &format!("/v1/Services/{svc}/Users/alice"),
            &[("Attributes", &attributes)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let update = bob.update_of("alice").await;
    assert_eq!(user_of(&update).attributes, attributes);
    let update = alice.update_of("alice").await;
    assert_eq!(user_of(&update).attributes, attributes);
    assert_eq!(
        metric_value(&d, "reach_fanout_writes_total").await,
        2,
        "a long update is written by the session"
    );
    wait_parked(&d, parks + 2).await;
    wait_parked_now(&d, 2).await;
    // A request wakes bob's socket (a read): its reply goes through the stream, and it parks
    // again.
    assert!(matches!(
        subscribe(&mut bob, 4, &["carol"]).await,
        ServerFrame::Subscribed { .. }
    ));
    wait_parked(&d, parks + 3).await;
    wait_parked_now(&d, 2).await;
    // Two requests in one TCP write wake it: both are answered, in order.
    for id in [2, 3] {
        let ping = reach_proto::encode(&ClientFrame::Ping { id }, Encoding::MsgPack);
        bob.stream.feed(Message::Binary(ping)).await.unwrap();
    }
    bob.stream.flush().await.unwrap();
    assert!(matches!(bob.recv().await, ServerFrame::Pong { id: 2 }));
    assert!(matches!(bob.recv().await, ServerFrame::Pong { id: 3 }));
    wait_parked_now(&d, 2).await;
    // Alice's connection drops while parked (EOF): she goes offline for bob after the grace.
    alice.abort();
    let update = bob.update_of("alice").await;
    assert_eq!(user_of(&update).is_online, Some(false));
    wait_parked_now(&d, 1).await;
    // A close frame to a parked socket is answered with the server's close.
    bob.stream.close(None).await.unwrap();
    let next = tokio::time::timeout(WAIT, bob.stream.next()).await.unwrap();
    assert!(
        matches!(next, Some(Ok(Message::Close(_))) | None),
        "closing handshake completed: {next:?}"
    );
    wait_parked_now(&d, 0).await;
    for reason in ["client_closed", "client_gone"] {
        let line = format!("reach_connections_closed_total{{reason=\"{reason}\"}} 1");
        let deadline = Instant::now() + WAIT;
        while !metric(&d, &line).await {
            assert!(
                Instant::now() < deadline,
                "no {line} in\n{}",
                d.metrics().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The next text frame a raw client's stream receives (within 10 s).
async fn next_text(ws: &mut WebSocketStream<tokio::net::TcpStream>) -> String {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within the wait")
            .expect("socket open")
            .expect("no socket error");
        if let Message::Text(t) = msg {
            return t.to_string();
        }
    }
}

/// Waits 200 ms (4 ticks of the shared timer at least), pings bob, and waits until his socket
/// is parked again: his quiet check comes after that of a socket woken before the wait, so
/// that one was checked by then.
async fn after_an_earlier_quiet_check(d: &Reachd, bob: &mut Ws, id: i64) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    let parked = streams_parked(d).await;
    bob.send(&ClientFrame::Ping { id }).await;
    let pong = bob.recv().await;
    assert!(
        matches!(pong, ServerFrame::Pong { id: got } if got == id),
        "{pong:?}"
    );
    wait_parked(d, parked + 1).await;
}

#[tokio::test]
async fn a_partial_frame_keeps_its_stream_until_it_is_complete() {
    use futures_util::SinkExt;
    use tokio::io::AsyncWriteExt;
    // No server pings: the client answers them with pongs written on the same stream, which
    // could land between the two halves this test writes by hand.
    let d =
        Reachd::start("[presence]\nheartbeat_interval_ms = 60000\nheartbeat_timeout_ms = 120000\n");
    let svc = enabled_service(&d).await;
    let raw = RawWs::hello(d.http, &d.token(&svc, "alice")).await;
    let mut ws = WebSocketStream::from_raw_socket(raw.tcp, Role::Client, None).await;
    assert!(next_text(&mut ws).await.contains("\"welcome\""));
    let (mut bob, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "bob"), None).await;
    // Both were parked once their welcome (after the long hello) was flushed.
    wait_parked(&d, 2).await;
    // A whole `ping` request, then half of a `subscribe` (header, mask, part of the
    // payload), in one write: alice's socket is due for a quiet check a second after the
    // ping, with tungstenite holding the half frame.
    let subscribe = masked_text(br#"{"type":"subscribe","id":7,"identities":["bob","carol"]}"#);
    let half = subscribe.len() / 2;
    let mut bytes = masked_text(br#"{"type":"ping","id":6}"#);
    bytes.extend_from_slice(&subscribe[..half]);
    ws.get_mut().write_all(&bytes).await.unwrap();
    assert!(next_text(&mut ws).await.contains("\"pong\""));
    // Once bob is parked again, alice's quiet check has come, and kept her stream.
    after_an_earlier_quiet_check(&d, &mut bob, 1).await;
    ws.get_mut().write_all(&subscribe[half..]).await.unwrap();
    let reply = next_text(&mut ws).await;
    assert!(
        reply.contains("\"subscribed\"") && reply.contains("\"id\":7"),
        "{reply}"
    );
    assert!(reply.contains("\"carol\""), "{reply}");
    // Then it is parked too, and keeps answering.
    wait_parked(&d, streams_parked(&d).await + 1).await;
    ws.send(Message::text(r#"{"type":"ping","id":8}"#))
        .await
        .unwrap();
    let pong = next_text(&mut ws).await;
    assert!(
        pong.contains("\"pong\"") && pong.contains("\"id\":8"),
        "{pong}"
    );
    // Half a frame to a parked socket: it wakes with those bytes as the start of its new
    // stream's read buffer, which is then known to hold a partial frame, so its quiet check
    // keeps the stream (parked again, it would drop the half, and the rest would be garbage).
    wait_parked(&d, streams_parked(&d).await + 1).await;
    let subscribe = masked_text(br#"{"type":"subscribe","id":9,"identities":["dave"]}"#);
    ws.get_mut().write_all(&subscribe[..half]).await.unwrap();
    after_an_earlier_quiet_check(&d, &mut bob, 2).await;
    ws.get_mut().write_all(&subscribe[half..]).await.unwrap();
    let reply = next_text(&mut ws).await;
    assert!(
        reply.contains("\"subscribed\"") && reply.contains("\"id\":9"),
        "{reply}"
    );
}

/// A client that sends its `hello` (and half of its next frame) in the same write as the
/// upgrade request: the bytes after the request start the socket's stream, and the half frame
/// among them keeps the stream (the socket is not parked under it) until the rest comes. On a
/// plain connection the gateway answers the upgrade itself and leaves the frames in the
/// connection; a request head too long for that path goes through the HTTP server, which
/// reads past it: its leftover bytes start the stream's read buffer.
#[tokio::test]
async fn bytes_sent_with_the_upgrade_request_are_read() {
    sent_with_the_upgrade_request("", "direct").await;
}

#[tokio::test]
async fn bytes_sent_with_a_long_upgrade_request_are_read() {
    let long = format!("X-Padding: {}\r\n", "a".repeat(5000));
    sent_with_the_upgrade_request(&long, "http").await;
}

async fn sent_with_the_upgrade_request(fields: &str, path: &str) {
    use tokio::io::AsyncWriteExt;
    let d =
        Reachd::start("[presence]\nheartbeat_interval_ms = 60000\nheartbeat_timeout_ms = 120000\n");
    let svc = enabled_service(&d).await;
    let hello = serde_json::json!({"type": "hello", "token": d.token(&svc, "alice")});
    let mut bytes = masked_text(hello.to_string().as_bytes());
    let ping = masked_text(br#"{"type":"ping","id":3}"#);
    bytes.extend_from_slice(&ping[..10]);
    let mut tcp = tokio::net::TcpStream::connect(d.http).await.unwrap();
    upgrade_with(&mut tcp, d.http, fields, &bytes).await;
    let mut ws = WebSocketStream::from_raw_socket(tcp, Role::Client, None).await;
    let welcome = next_text(&mut ws).await;
    assert!(welcome.contains("\"welcome\""), "{welcome}");
    assert_eq!(upgrades(&d, path).await, 1, "alice's upgrade, {path}");
    // Bob's socket is parked once his welcome is flushed; alice's, welcomed before, would have
    // been parked first had her half frame not been followed.
    let (_bob, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "bob"), None).await;
    wait_parked(&d, 1).await;
    assert_eq!(streams_parked(&d).await, 1, "only bob's socket is parked");
    ws.get_mut().write_all(&ping[10..]).await.unwrap();
    let pong = next_text(&mut ws).await;
    assert!(
        pong.contains("\"pong\"") && pong.contains("\"id\":3"),
        "{pong}"
    );
}

/// `reach_ws_upgrades_total` of one path (`direct` or `http`).
async fn upgrades(d: &Reachd, path: &str) -> i64 {
    metric_value(d, &format!("reach_ws_upgrades_total{{path=\"{path}\"}}")).await
}

/// A plain connection's upgrade is answered without the HTTP server when it can be. One with
/// a body (`Content-Length`) goes through the HTTP server and still upgrades; refused ones (no
/// key, another version, no upgrade asked) get the HTTP server's 400 with the error body: the
/// direct path answers no refusal of its own.
#[tokio::test]
async fn upgrades_the_direct_path_leaves_go_through_the_http_server() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d = Reachd::start("");
    let svc = enabled_service(&d).await;
    let (_alice, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
    assert_eq!(
        (upgrades(&d, "direct").await, upgrades(&d, "http").await),
        (1, 0)
    );
    let hello = serde_json::json!({"type": "hello", "token": d.token(&svc, "bob")});
    let mut tcp = tokio::net::TcpStream::connect(d.http).await.unwrap();
    let hello = masked_text(hello.to_string().as_bytes());
    upgrade_with(&mut tcp, d.http, "Content-Length: 0\r\n", &hello).await;
    let mut bob = WebSocketStream::from_raw_socket(tcp, Role::Client, None).await;
    let welcome = next_text(&mut bob).await;
    assert!(welcome.contains("\"welcome\""), "{welcome}");
    assert_eq!(
        (upgrades(&d, "direct").await, upgrades(&d, "http").await),
        (1, 1)
    );
    let base = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        d.http
    );
    for (fields, message) in [
        (
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
            "Sec-WebSocket-Key is missing",
        ),
        (
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            "Sec-WebSocket-Version must be 13",
        ),
        ("", "expected a WebSocket upgrade request"),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(d.http).await.unwrap();
        tcp.write_all(format!("{base}{fields}\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(20), tcp.read_to_string(&mut response))
            .await
            .expect("the refusal is answered and the connection closed")
            .unwrap();
        assert!(
            response.starts_with("HTTP/1.1 400"),
            "{message}: {response}"
        );
        let body = &response[response.find("\r\n\r\n").expect("a head") + 4..];
        let body: serde_json::Value = serde_json::from_str(body).expect(body);
        assert_eq!(body["status"], 400, "{response}");
        assert!(
            body["message"].as_str().unwrap().contains(message),
            "{response}"
        );
    }
    assert_eq!(
        (upgrades(&d, "direct").await, upgrades(&d, "http").await),
        (1, 1)
    );
}

/// `hello` does not wait for the user's online epoch to be written: it goes with the next
/// presence batch (here 2 s later). Meanwhile a user who has left reads `false`, not `null`,
/// over REST: the engine keeps her entry until the store has the epoch; and after.
#[tokio::test]
async fn a_user_gone_before_her_epoch_is_written_reads_offline_not_null() {
    let d = Reachd::start(&format!("{FAST}\n[webhooks]\nrecord_batch_ms = 2000\n"));
    let svc = enabled_service(&d).await;
    let rest = d.client();
    let (mut alice, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
    alice.send(&ClientFrame::Bye).await;
    let _ = alice.closed().await;
    let r = rest.get(&format!("/v1/Services/{svc}/Users/alice")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["is_online"], false, "before the batch: {}", r.text);
    // Once the batch is written, the same from the store.
    wait_epoch_stored(&d, "alice").await;
    let r = rest.get(&format!("/v1/Services/{svc}/Users/alice")).await;
    assert_eq!(r.body["is_online"], false, "after the batch: {}", r.text);
}
