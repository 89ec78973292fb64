//! The REST API against the real `reachd`: success shapes, error codes and bodies, paging,
//! account isolation, reachability null rules, malformed input and durability.
//!
//! Positive binding tests (a binding listed, fetched, deleted, `is_notifiable` turning true
//! and false) need a binding, which only a socket's `register_push` creates: they live with
//! the WebSocket tests. Here: the bindings routes' error paths and empty envelopes.

mod common;

use common::{
    ACCOUNT_SID, AUTH_TOKEN, KEY_SECRET, KEY_SID, OTHER_ACCOUNT_SID, OTHER_AUTH_TOKEN,
    OTHER_KEY_SECRET, OTHER_KEY_SID, Reachd, Response,
};
use serde_json::Value;

const SERVICE_FIELDS: &[&str] = &[
    "account_sid",
    "date_created",
    "date_updated",
    "friendly_name",
    "links",
    "sid",
    "url",
];
const SERVICE_LINKS: &[&str] = &[
    "bindings",
    "configuration",
    "conversations",
    "participant_conversations",
    "roles",
    "users",
];
const CONFIG_FIELDS: &[&str] = &[
    "chat_service_sid",
    "default_chat_service_role_sid",
    "default_conversation_creator_role_sid",
    "default_conversation_role_sid",
    "links",
    "reachability_enabled",
    "url",
];
const USER_FIELDS: &[&str] = &[
    "account_sid",
    "attributes",
    "chat_service_sid",
    "date_created",
    "date_last_seen",
    "date_updated",
    "friendly_name",
    "identity",
    "is_notifiable",
    "is_online",
    "links",
    "role_sid",
    "sid",
    "url",
];
const META_FIELDS: &[&str] = &[
    "first_page_url",
    "key",
    "next_page_url",
    "page",
    "page_size",
    "previous_page_url",
    "url",
];
const ROLE: &str = "RL0123456789abcdef0123456789abcdef";
const UNKNOWN_SERVICE: &str = "IS00000000000000000000000000000000";

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

fn assert_keys(v: &Value, expected: &[&str]) {
    assert_eq!(keys(v), expected, "{v}");
}

/// The hosted API's error body, exactly.
#[track_caller]
fn assert_error(r: &Response, status: u16, code: u64) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_keys(&r.body, &["code", "message", "more_info", "status"]);
    assert_eq!(r.body["code"], code, "{}", r.text);
    assert_eq!(r.body["status"], status, "{}", r.text);
    assert_eq!(
        r.body["more_info"],
        format!("https://www.twilio.com/docs/errors/{code}")
    );
    assert!(!r.body["message"].as_str().unwrap().is_empty());
}

fn is_iso8601_second(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b[19] == b'Z'
        && b[10] == b'T'
        && [4, 7].iter().all(|&i| b[i] == b'-')
        && [13, 16].iter().all(|&i| b[i] == b':')
        && b.iter()
            .enumerate()
            .all(|(i, c)| [4, 7, 10, 13, 16, 19].contains(&i) || c.is_ascii_digit())
}

/// A request with arbitrary credentials, headers and body (for what `Rest` cannot send).
async fn raw(
    reachd: &Reachd,
    method: &str,
    path: &str,
    auth: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    let mut req =
        reqwest::Client::new().request(method.parse().unwrap(), format!("{}{path}", reachd.base()));
    if let Some(auth) = auth {
        req = req.header("Authorization", auth);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(body) = body {
        req = req.body(body.to_vec());
    }
    let resp = req.send().await.expect("request sent");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Response { status, body, text }
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A header, or a form field: name and value.
type Pair<'a> = (&'a str, &'a str);

const FORM: Pair<'static> = ("Content-Type", "application/x-www-form-urlencoded");
const WEBHOOK: Pair<'static> = ("X-Twilio-Webhook-Enabled", "true");

async fn metrics(reachd: &Reachd) -> String {
    reachd.metrics().await
}

/// The value of the sample whose line starts with `name{` and holds every label.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|lab| l.contains(lab)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn services_configuration_and_users_have_the_documented_shapes() {
    let reachd = Reachd::start("");
    let api = reachd.client();
    let base = reachd.base();

    // Services.
    let r = raw(
        &reachd,
        "POST",
        "/v1/Services",
        Some(&basic(ACCOUNT_SID, AUTH_TOKEN)),
        &[FORM, WEBHOOK],
        Some(b"FriendlyName=Front+desk&Unknown=1"),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_keys(&r.body, SERVICE_FIELDS);
    assert_keys(&r.body["links"], SERVICE_LINKS);
    let sid = r.body["sid"].as_str().unwrap().to_owned();
    assert!(sid.starts_with("IS") && sid.len() == 34, "{sid}");
    assert_eq!(r.body["account_sid"], ACCOUNT_SID);
    assert_eq!(r.body["friendly_name"], "Front desk");
    assert!(
        is_iso8601_second(r.body["date_created"].as_str().unwrap()),
        "{}",
        r.text
    );
    assert!(
        is_iso8601_second(r.body["date_updated"].as_str().unwrap()),
        "{}",
        r.text
    );
    let svc_url = format!("{base}/v1/Services/{sid}");
    assert_eq!(r.body["url"], svc_url);
    let links = &r.body["links"];
    assert_eq!(links["users"], format!("{svc_url}/Users"));
    assert_eq!(links["bindings"], format!("{svc_url}/Bindings"));
    assert_eq!(links["configuration"], format!("{svc_url}/Configuration"));
    assert_eq!(links["roles"], format!("{svc_url}/Roles"));
    assert_eq!(links["conversations"], format!("{svc_url}/Conversations"));
    assert_eq!(
        links["participant_conversations"],
        format!("{svc_url}/ParticipantConversations")
    );

    let fetched = api.get(&format!("/v1/Services/{sid}")).await;
    assert_eq!(fetched.status, 200, "{}", fetched.text);
    assert_eq!(fetched.body, r.body);

    let list = api.get("/v1/Services").await;
    assert_eq!(list.status, 200, "{}", list.text);
    assert_keys(&list.body, &["meta", "services"]);
    assert_keys(&list.body["meta"], META_FIELDS);
    assert_eq!(list.body["services"], serde_json::json!([r.body]));
    assert_eq!(list.body["meta"]["key"], "services");
    assert_eq!(list.body["meta"]["page_size"], 50);

    // Configuration.
    let cfg = api.get(&format!("/v1/Services/{sid}/Configuration")).await;
    assert_eq!(cfg.status, 200, "{}", cfg.text);
    assert_keys(&cfg.body, CONFIG_FIELDS);
    assert_keys(&cfg.body["links"], &["notifications", "webhooks"]);
    assert_eq!(cfg.body["chat_service_sid"], sid.as_str());
    assert_eq!(cfg.body["reachability_enabled"], false);
    assert_eq!(cfg.body["default_chat_service_role_sid"], Value::Null);
    assert_eq!(cfg.body["url"], format!("{svc_url}/Configuration"));
    assert_eq!(
        cfg.body["links"]["notifications"],
        format!("{svc_url}/Configuration/Notifications")
    );
    assert_eq!(
        cfg.body["links"]["webhooks"],
        format!("{svc_url}/Configuration/Webhooks")
    );
    let cfg = api
        .post(
            &format!("/v1/Services/{sid}/Configuration"),
            &[
                ("DefaultChatServiceRoleSid", ROLE),
                ("DefaultConversationRoleSid", ROLE),
            ],
        )
        .await;
    assert_eq!(cfg.status, 200, "{}", cfg.text);
    assert_eq!(cfg.body["default_chat_service_role_sid"], ROLE);
    assert_eq!(cfg.body["default_conversation_role_sid"], ROLE);
    assert_eq!(
        cfg.body["default_conversation_creator_role_sid"],
        Value::Null
    );
    assert_eq!(
        cfg.body["reachability_enabled"], false,
        "unchanged when not given"
    );

    // Users, reachability disabled: flags null everywhere.
    let users = format!("/v1/Services/{sid}/Users");
    let r = raw(
        &reachd,
        "POST",
        &users,
        Some(&basic(ACCOUNT_SID, AUTH_TOKEN)),
        &[FORM, WEBHOOK],
        Some(b"Identity=alice+smith%2F%C3%BC&FriendlyName=Alice&Attributes=%7B%22a%22%3A1%7D&RoleSid=RL0123456789abcdef0123456789abcdef"),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_keys(&r.body, USER_FIELDS);
    assert_keys(&r.body["links"], &["user_conversations"]);
    let alice = r.body.clone();
    let alice_sid = alice["sid"].as_str().unwrap().to_owned();
    assert!(alice_sid.starts_with("US"), "{alice_sid}");
    assert_eq!(alice["identity"], "alice smith/ü");
    assert_eq!(alice["friendly_name"], "Alice");
    assert_eq!(alice["attributes"], r#"{"a":1}"#);
    assert_eq!(alice["role_sid"], ROLE);
    assert_eq!(alice["account_sid"], ACCOUNT_SID);
    assert_eq!(alice["chat_service_sid"], sid.as_str());
    assert_eq!(
        (&alice["is_online"], &alice["is_notifiable"]),
        (&Value::Null, &Value::Null)
    );
    assert_eq!(alice["url"], format!("{svc_url}/Users/{alice_sid}"));
    assert_eq!(
        alice["links"]["user_conversations"],
        format!("{svc_url}/Users/{alice_sid}/Conversations")
    );
    assert!(is_iso8601_second(alice["date_created"].as_str().unwrap()));

    let bob = api.post(&users, &[("Identity", "bob")]).await;
    assert_eq!(bob.status, 201, "{}", bob.text);
    assert_eq!(bob.body["attributes"], "{}", "unset attributes read {{}}");
    assert_eq!(bob.body["friendly_name"], Value::Null);
    assert_eq!(bob.body["role_sid"], Value::Null);

    // Fetch by SID and by (percent-encoded) identity.
    let by_sid = api.get(&format!("{users}/{alice_sid}")).await;
    assert_eq!(by_sid.status, 200, "{}", by_sid.text);
    assert_eq!(by_sid.body, alice);
    let by_identity = api.get(&format!("{users}/alice%20smith%2F%C3%BC")).await;
    assert_eq!(by_identity.status, 200, "{}", by_identity.text);
    assert_eq!(by_identity.body["sid"], alice_sid.as_str());

    // Enabled, never online, never a binding: still null.
    api.set_reachability(&sid, true).await;
    let cfg = api.get(&format!("/v1/Services/{sid}/Configuration")).await;
    assert_eq!(cfg.body["reachability_enabled"], true);
    let fetched = api.get(&format!("{users}/bob")).await;
    assert_eq!(fetched.status, 200, "{}", fetched.text);
    assert_eq!(
        (&fetched.body["is_online"], &fetched.body["is_notifiable"]),
        (&Value::Null, &Value::Null)
    );

    // Update.
    let updated = raw(
        &reachd,
        "POST",
        &format!("{users}/bob"),
        Some(&basic(ACCOUNT_SID, AUTH_TOKEN)),
        &[FORM, WEBHOOK],
        Some(b"FriendlyName=Bobby&Attributes=%5B1%2C2%5D"),
    )
    .await;
    assert_eq!(updated.status, 200, "{}", updated.text);
    assert_keys(&updated.body, USER_FIELDS);
    assert_eq!(updated.body["friendly_name"], "Bobby");
    assert_eq!(updated.body["attributes"], "[1,2]");
    assert_eq!(updated.body["sid"], bob.body["sid"]);
    assert_eq!(updated.body["date_created"], bob.body["date_created"]);
    let updated = api
        .post(&format!("{users}/bob"), &[("RoleSid", ROLE)])
        .await;
    assert_eq!(updated.status, 200, "{}", updated.text);
    assert_eq!(updated.body["role_sid"], ROLE);
    assert_eq!(
        updated.body["friendly_name"], "Bobby",
        "fields not given are kept"
    );

    // List: flags always null, both users in creation order.
    let list = api.get(&users).await;
    assert_eq!(list.status, 200, "{}", list.text);
    assert_keys(&list.body, &["meta", "users"]);
    assert_eq!(list.body["meta"]["key"], "users");
    let listed = list.body["users"].as_array().unwrap();
    let identities: Vec<&str> = listed
        .iter()
        .map(|u| u["identity"].as_str().unwrap())
        .collect();
    assert_eq!(identities, ["alice smith/ü", "bob"]);
    for u in listed {
        assert_keys(u, USER_FIELDS);
        assert_eq!(
            (&u["is_online"], &u["is_notifiable"]),
            (&Value::Null, &Value::Null)
        );
    }

    // Delete user: 204 with an empty body, then 404.
    let del = raw(
        &reachd,
        "DELETE",
        &format!("{users}/bob"),
        Some(&basic(ACCOUNT_SID, AUTH_TOKEN)),
        &[WEBHOOK],
        None,
    )
    .await;
    assert_eq!((del.status, del.text.as_str()), (204, ""));
    assert_error(&api.get(&format!("{users}/bob")).await, 404, 20404);
    assert_error(&api.delete(&format!("{users}/bob")).await, 404, 20404);

    // Delete service: 204, then everything under it is 404.
    let del = raw(
        &reachd,
        "DELETE",
        &format!("/v1/Services/{sid}"),
        Some(&basic(ACCOUNT_SID, AUTH_TOKEN)),
        &[WEBHOOK],
        None,
    )
    .await;
    assert_eq!((del.status, del.text.as_str()), (204, ""));
    assert_error(&api.get(&format!("/v1/Services/{sid}")).await, 404, 20404);
    assert_error(
        &api.get(&format!("/v1/Services/{sid}/Configuration")).await,
        404,
        20404,
    );
    assert_error(&api.get(&format!("{users}/{alice_sid}")).await, 404, 20404);
    assert_error(
        &api.delete(&format!("/v1/Services/{sid}")).await,
        404,
        20404,
    );
    assert_eq!(
        api.get("/v1/Services").await.body["services"],
        serde_json::json!([])
    );

    // Every request was counted by route template, method and status.
    let text = metrics(&reachd).await;
    let count = |labels: &[&str]| sample(&text, "reach_http_requests_total", labels).unwrap_or(0.0);
    assert_eq!(
        count(&[
            r#"route="/v1/Services""#,
            r#"method="POST""#,
            r#"status="201""#
        ]),
        1.0,
        "{text}"
    );
    assert_eq!(
        count(&[
            r#"route="/v1/Services/{sid}/Users/{user}""#,
            r#"method="GET""#,
            r#"status="404""#
        ]),
        2.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "reach_http_request_duration_seconds_count",
            &[r#"route="/v1/Services/{sid}/Users""#, r#"method="POST""#]
        )
        .is_some_and(|n| n >= 2.0),
        "{text}"
    );
}

#[tokio::test]
async fn errors_have_the_documented_codes_and_body() {
    let reachd = Reachd::start("");
    let api = reachd.client();
    let sid = api.create_service("errors").await;
    let users = format!("/v1/Services/{sid}/Users");

    // 401: missing, wrong password, unknown user, not base64, another scheme.
    let before = sample(
        &metrics(&reachd).await,
        "reach_auth_failures_total",
        &[r#"reason="rest_basic""#],
    )
    .unwrap_or(0.0);
    let refused = [
        None,
        Some(basic(ACCOUNT_SID, "wrong-token-wrong-token")),
        Some(basic("AC99999999999999999999999999999999", AUTH_TOKEN)),
        Some(basic(KEY_SID, "not-the-secret")),
        Some("Basic !!!not-base64".to_owned()),
        Some("Bearer abc".to_owned()),
    ];
    for auth in &refused {
        let r = raw(&reachd, "GET", "/v1/Services", auth.as_deref(), &[], None).await;
        assert_error(&r, 401, 20003);
    }
    // Also on writes and unknown routes: nothing is revealed before authentication.
    assert_error(
        &raw(
            &reachd,
            "POST",
            "/v1/Services",
            None,
            &[FORM],
            Some(b"FriendlyName=x"),
        )
        .await,
        401,
        20003,
    );
    assert_error(
        &raw(&reachd, "GET", "/v1/Nothing", None, &[], None).await,
        401,
        20003,
    );
    let after = sample(
        &metrics(&reachd).await,
        "reach_auth_failures_total",
        &[r#"reason="rest_basic""#],
    )
    .unwrap();
    assert_eq!(after - before, (refused.len() + 2) as f64);
    assert_eq!(
        api.get("/v1/Services").await.body["services"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "nothing created"
    );

    // 404 with the resource named.
    let r = api.get(&format!("{users}/alice")).await;
    assert_error(&r, 404, 20404);
    assert_eq!(
        r.body["message"],
        format!("The requested resource /Services/{sid}/Users/alice was not found")
    );
    let r = api.get(&format!("/v1/Services/{UNKNOWN_SERVICE}")).await;
    assert_error(&r, 404, 20404);
    assert_eq!(
        r.body["message"],
        format!("The requested resource /Services/{UNKNOWN_SERVICE} was not found")
    );
    for path in [
        "/v1/Nothing",
        "/",
        "/v1/Services/x/Users/y/z",
        "/v2/Services",
    ] {
        assert_error(&api.get(path).await, 404, 20404);
    }
    assert_error(&api.get("/v1/Services/not-a-sid").await, 404, 20404);
    assert_error(
        &api.post(
            &format!("/v1/Services/{UNKNOWN_SERVICE}/Users"),
            &[("Identity", "a")],
        )
        .await,
        404,
        20404,
    );
    assert_error(
        &api.post(
            &format!("/v1/Services/{UNKNOWN_SERVICE}/Configuration"),
            &[("ReachabilityEnabled", "true")],
        )
        .await,
        404,
        20404,
    );
    assert_error(
        &api.post(&format!("{users}/ghost"), &[("FriendlyName", "x")])
            .await,
        404,
        20404,
    );

    // 405.
    for (method, path) in [
        ("PUT", "/v1/Services".to_owned()),
        ("DELETE", "/v1/Services".to_owned()),
        ("PATCH", format!("/v1/Services/{sid}")),
        ("DELETE", format!("/v1/Services/{sid}/Configuration")),
        ("POST", format!("/v1/Services/{sid}/Bindings")),
    ] {
        let r = api.request(method, &path, &[]).await;
        assert_error(&r, 405, 20004);
    }

    // 20001: FriendlyName missing or empty on service create.
    assert_error(
        &api.post("/v1/Services", &[("Other", "x")]).await,
        400,
        20001,
    );
    let r = api.post("/v1/Services", &[("FriendlyName", "")]).await;
    assert_error(&r, 400, 20001);
    assert!(
        r.body["message"].as_str().unwrap().contains("FriendlyName"),
        "{}",
        r.text
    );

    // Users: 50204, 50206, 50201.
    assert_error(
        &api.post(&users, &[("FriendlyName", "no identity")]).await,
        400,
        50204,
    );
    assert_error(&api.post(&users, &[("Identity", "")]).await, 400, 50204);
    assert_error(
        &api.post(
            &users,
            &[("Identity", "US0123456789abcdef0123456789abcdef")],
        )
        .await,
        400,
        50206,
    );
    assert_error(
        &api.post(
            &users,
            &[("Identity", "IS0123456789abcdef0123456789abcdef")],
        )
        .await,
        400,
        50206,
    );
    assert_eq!(api.post(&users, &[("Identity", "alice")]).await.status, 201);
    let r = api
        .post(&users, &[("Identity", "alice"), ("FriendlyName", "again")])
        .await;
    assert_error(&r, 409, 50201);
    assert!(
        r.body["message"].as_str().unwrap().contains("alice"),
        "{}",
        r.text
    );

    // 20001 for each bad parameter, naming it.
    let cfg = format!("/v1/Services/{sid}/Configuration");
    let cases: Vec<(String, Vec<Pair<'_>>, &str)> = vec![
        (
            cfg.clone(),
            vec![("ReachabilityEnabled", "yes")],
            "ReachabilityEnabled",
        ),
        (
            cfg.clone(),
            vec![("ReachabilityEnabled", "")],
            "ReachabilityEnabled",
        ),
        (
            cfg.clone(),
            vec![("DefaultConversationCreatorRoleSid", "RLxyz")],
            "DefaultConversationCreatorRoleSid",
        ),
        (
            cfg.clone(),
            vec![(
                "DefaultConversationRoleSid",
                "US0123456789abcdef0123456789abcdef",
            )],
            "DefaultConversationRoleSid",
        ),
        (
            cfg.clone(),
            vec![(
                "DefaultChatServiceRoleSid",
                "RL0123456789ABCDEF0123456789ABCDEF",
            )],
            "DefaultChatServiceRoleSid",
        ),
        (
            users.clone(),
            vec![("Identity", "carol"), ("Attributes", "{not json")],
            "Attributes",
        ),
        (
            users.clone(),
            vec![("Identity", "carol"), ("RoleSid", "admin")],
            "RoleSid",
        ),
        (
            format!("{users}/alice"),
            vec![("Attributes", "")],
            "Attributes",
        ),
        (
            format!("{users}/alice"),
            vec![("RoleSid", "RL123")],
            "RoleSid",
        ),
    ];
    for (path, form, param) in cases {
        let r = api.post(&path, &form).await;
        assert_error(&r, 400, 20001);
        assert!(
            r.body["message"].as_str().unwrap().contains(param),
            "{param}: {}",
            r.text
        );
    }
    let big = format!("\"{}\"", "x".repeat(16 * 1024));
    assert_error(
        &api.post(&format!("{users}/alice"), &[("Attributes", &big)])
            .await,
        400,
        20001,
    );
    // Nothing of the refused writes was applied.
    assert_eq!(api.get(&cfg).await.body["reachability_enabled"], false);
    assert_error(&api.get(&format!("{users}/carol")).await, 404, 20404);
    assert_eq!(
        api.get(&format!("{users}/alice")).await.body["attributes"],
        "{}"
    );

    // Paging parameters.
    for query in [
        "PageSize=0",
        "PageSize=1001",
        "PageSize=ten",
        "PageSize=",
        "Page=-1",
        "Page=1.5",
        "PageToken=garbage",
        "PageToken=PT",
        "PageToken=PT-4",
        "Page=4611686018427387904&PageSize=1000",
        // Past the documented maximum whatever the page size (it was accepted with a small
        // one; found by schemathesis).
        "Page=9223372036854776",
        "Page=9223372036854776&PageSize=1",
    ] {
        let r = api.get(&format!("{users}?{query}")).await;
        assert_error(&r, 400, 20001);
        let name = query.split('=').next().unwrap();
        assert!(
            r.body["message"].as_str().unwrap().contains(name),
            "{query}: {}",
            r.text
        );
        assert_error(&api.get(&format!("/v1/Services?{query}")).await, 400, 20001);
    }
    // The largest page is an empty page, at the largest page size too.
    let r = api
        .get(&format!("{users}?Page=9223372036854775&PageSize=1000"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["users"], serde_json::json!([]), "{}", r.text);
}

#[tokio::test]
async fn lists_page_through_absolute_next_and_previous_links() {
    let reachd = Reachd::start("");
    let api = reachd.client();
    let sid = api.create_service("paging").await;
    let users = format!("/v1/Services/{sid}/Users");
    let list_url = format!("{}{users}", reachd.base());
    let names: Vec<String> = (0..7).map(|i| format!("user{i}")).collect();
    for name in &names {
        assert_eq!(api.post(&users, &[("Identity", name)]).await.status, 201);
    }
    let identities = |r: &Response| -> Vec<String> {
        r.body["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["identity"].as_str().unwrap().to_owned())
            .collect()
    };

    let p0 = api.get(&format!("{users}?PageSize=3")).await;
    assert_eq!(p0.status, 200, "{}", p0.text);
    assert_keys(&p0.body["meta"], META_FIELDS);
    let meta = &p0.body["meta"];
    assert_eq!(identities(&p0), names[0..3]);
    assert_eq!(
        (meta["page"].as_i64(), meta["page_size"].as_i64()),
        (Some(0), Some(3))
    );
    assert_eq!(meta["key"], "users");
    assert_eq!(
        meta["first_page_url"],
        format!("{list_url}?PageSize=3&Page=0")
    );
    assert_eq!(meta["url"], format!("{list_url}?PageSize=3&Page=0"));
    assert_eq!(meta["previous_page_url"], Value::Null);
    let next = meta["next_page_url"].as_str().unwrap().to_owned();
    assert!(
        next.starts_with(&format!("{list_url}?PageSize=3&Page=1&PageToken=PT")),
        "{next}"
    );

    let p1 = api.get(&next).await;
    assert_eq!(p1.status, 200, "{}", p1.text);
    assert_eq!(identities(&p1), names[3..6]);
    let meta = &p1.body["meta"];
    assert_eq!(meta["page"], 1);
    assert_eq!(meta["url"], next.as_str());
    assert_eq!(
        meta["first_page_url"],
        format!("{list_url}?PageSize=3&Page=0")
    );
    assert_eq!(
        meta["previous_page_url"],
        format!("{list_url}?PageSize=3&Page=0")
    );
    let next = meta["next_page_url"].as_str().unwrap().to_owned();
    assert!(next.contains("Page=2&PageToken=PT"), "{next}");

    let p2 = api.get(&next).await;
    assert_eq!(p2.status, 200, "{}", p2.text);
    assert_eq!(identities(&p2), names[6..7]);
    let meta = &p2.body["meta"];
    assert_eq!(meta["page"], 2);
    assert_eq!(meta["next_page_url"], Value::Null);
    let previous = meta["previous_page_url"].as_str().unwrap().to_owned();
    assert_eq!(previous, format!("{list_url}?PageSize=3&Page=1"));

    // Following previous (offset based) gives page 1 again, and links on from there.
    let back = api.get(&previous).await;
    assert_eq!(back.status, 200, "{}", back.text);
    assert_eq!(identities(&back), names[3..6]);
    assert_eq!(back.body["meta"]["page"], 1);
    let next = back.body["meta"]["next_page_url"].as_str().unwrap();
    assert_eq!(identities(&api.get(next).await), names[6..7]);

    // Page=N without a token is an offset; past the end is an empty page.
    assert_eq!(
        identities(&api.get(&format!("{users}?PageSize=3&Page=2")).await),
        names[6..7]
    );
    let empty = api.get(&format!("{users}?PageSize=3&Page=5")).await;
    assert_eq!(empty.status, 200, "{}", empty.text);
    assert_eq!(empty.body["users"], serde_json::json!([]));
    assert_eq!(empty.body["meta"]["next_page_url"], Value::Null);
    assert_eq!(
        empty.body["meta"]["previous_page_url"],
        format!("{list_url}?PageSize=3&Page=4")
    );

    // The default page holds everything.
    let all = api.get(&users).await;
    assert_eq!(identities(&all), names);
    assert_eq!(all.body["meta"]["page_size"], 50);
    assert_eq!(all.body["meta"]["next_page_url"], Value::Null);

    // Services page the same way.
    for i in 0..2 {
        api.create_service(&format!("more {i}")).await;
    }
    let s0 = api.get("/v1/Services?PageSize=2").await;
    assert_eq!(s0.body["services"].as_array().unwrap().len(), 2);
    let s1 = api
        .get(s0.body["meta"]["next_page_url"].as_str().unwrap())
        .await;
    assert_eq!(s1.status, 200, "{}", s1.text);
    assert_eq!(s1.body["services"].as_array().unwrap().len(), 1);
    assert_eq!(s1.body["services"][0]["friendly_name"], "more 1");
    assert_eq!(s1.body["meta"]["next_page_url"], Value::Null);
    assert_eq!(s1.body["meta"]["key"], "services");
}

#[tokio::test]
async fn bindings_routes_answer_envelopes_and_errors() {
    let reachd = Reachd::start("");
    let api = reachd.client();
    let sid = api.create_service("bindings").await;
    let bindings = format!("/v1/Services/{sid}/Bindings");
    let list_url = format!("{}{bindings}", reachd.base());

    let r = api.get(&bindings).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_keys(&r.body, &["bindings", "meta"]);
    assert_eq!(r.body["bindings"], serde_json::json!([]));
    assert_keys(&r.body["meta"], META_FIELDS);
    assert_eq!(r.body["meta"]["key"], "bindings");
    assert_eq!(r.body["meta"]["next_page_url"], Value::Null);

    // Repeatable filters are kept, encoded, in the paging URLs.
    let r = api
        .get(&format!(
            "{bindings}?BindingType=apn&Identity=al%20ice&BindingType=fcm&Identity=bob&PageSize=10"
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["bindings"], serde_json::json!([]));
    assert_eq!(
        r.body["meta"]["first_page_url"],
        format!(
            "{list_url}?BindingType=apn&BindingType=fcm&Identity=al%20ice&Identity=bob&PageSize=10&Page=0"
        )
    );
    assert_eq!(r.body["meta"]["url"], r.body["meta"]["first_page_url"]);
    let r = api
        .get(&format!("{bindings}?BindingType=gcm&Page=1&PageSize=5"))
        .await;
    assert_eq!(
        r.body["meta"]["previous_page_url"],
        format!("{list_url}?BindingType=gcm&PageSize=5&Page=0")
    );

    for query in [
        "BindingType=sms",
        "BindingType=APN",
        "BindingType=",
        "BindingType=apn&BindingType=voip",
        "PageSize=0",
    ] {
        let r = api.get(&format!("{bindings}?{query}")).await;
        assert_error(&r, 400, 20001);
        assert!(
            r.body["message"]
                .as_str()
                .unwrap()
                .contains(query.split('=').next().unwrap()),
            "{}",
            r.text
        );
    }
    let too_many = (0..101)
        .map(|i| format!("Identity=u{i}"))
        .collect::<Vec<_>>()
        .join("&");
    assert_error(
        &api.get(&format!("{bindings}?{too_many}")).await,
        400,
        20001,
    );

    let unknown = "BS0123456789abcdef0123456789abcdef";
    let r = api.get(&format!("{bindings}/{unknown}")).await;
    assert_error(&r, 404, 20404);
    assert_eq!(
        r.body["message"],
        format!("The requested resource /Services/{sid}/Bindings/{unknown} was not found")
    );
    assert_error(
        &api.delete(&format!("{bindings}/{unknown}")).await,
        404,
        20404,
    );
    assert_error(
        &api.get(&format!("/v1/Services/{UNKNOWN_SERVICE}/Bindings"))
            .await,
        404,
        20404,
    );
    assert_error(
        &api.get(&format!(
            "/v1/Services/{UNKNOWN_SERVICE}/Bindings/{unknown}"
        ))
        .await,
        404,
        20404,
    );
}

#[tokio::test]
async fn accounts_are_isolated_and_api_keys_authenticate() {
    let reachd = Reachd::start("");
    let mine = reachd.client();
    let key = reachd.client_as(KEY_SID, KEY_SECRET);
    let other = reachd.client_as(OTHER_ACCOUNT_SID, OTHER_AUTH_TOKEN);
    let other_key = reachd.client_as(OTHER_KEY_SID, OTHER_KEY_SECRET);

    let sid = mine.create_service("mine").await;
    assert_eq!(
        mine.post(
            &format!("/v1/Services/{sid}/Users"),
            &[("Identity", "alice")]
        )
        .await
        .status,
        201
    );
    // The API key acts for its account: it sees and writes the account's service.
    let r = key.get(&format!("/v1/Services/{sid}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["account_sid"], ACCOUNT_SID);
    assert_eq!(
        key.post(&format!("/v1/Services/{sid}/Users"), &[("Identity", "bob")])
            .await
            .status,
        201
    );
    let theirs = other_key.create_service("theirs").await;
    let r = other.get(&format!("/v1/Services/{theirs}")).await;
    assert_eq!(r.body["account_sid"], OTHER_ACCOUNT_SID);

    // The other account cannot see or touch the first account's service, users or bindings.
    let svc = format!("/v1/Services/{sid}");
    for client in [&other, &other_key] {
        for r in [
            client.get(&svc).await,
            client.get(&format!("{svc}/Configuration")).await,
            client
                .post(
                    &format!("{svc}/Configuration"),
                    &[("ReachabilityEnabled", "true")],
                )
                .await,
            client.get(&format!("{svc}/Users")).await,
            client
                .post(&format!("{svc}/Users"), &[("Identity", "mallory")])
                .await,
            client.get(&format!("{svc}/Users/alice")).await,
            client
                .post(&format!("{svc}/Users/alice"), &[("FriendlyName", "pwned")])
                .await,
            client.delete(&format!("{svc}/Users/alice")).await,
            client.get(&format!("{svc}/Bindings")).await,
            client
                .get(&format!(
                    "{svc}/Bindings/BS0123456789abcdef0123456789abcdef"
                ))
                .await,
            client.delete(&svc).await,
        ] {
            assert_error(&r, 404, 20404);
        }
        let list = client.get("/v1/Services").await;
        let sids: Vec<&str> = list.body["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["sid"].as_str().unwrap())
            .collect();
        assert_eq!(sids, [theirs.as_str()]);
    }
    // Untouched by all that.
    let alice = mine.get(&format!("{svc}/Users/alice")).await;
    assert_eq!(
        (alice.status, &alice.body["friendly_name"]),
        (200, &Value::Null)
    );
    assert_eq!(
        mine.get(&format!("{svc}/Configuration")).await.body["reachability_enabled"],
        false
    );
    let sids: Vec<String> = key.get("/v1/Services").await.body["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sid"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sids, [sid]);
    assert_error(
        &mine.get(&format!("/v1/Services/{theirs}")).await,
        404,
        20404,
    );
}

#[tokio::test]
async fn malformed_input_gets_error_json_and_the_server_keeps_serving() {
    let reachd = Reachd::start("");
    let api = reachd.client();
    let auth = basic(ACCOUNT_SID, AUTH_TOKEN);
    let sid = api.create_service("robust").await;
    let users = format!("/v1/Services/{sid}/Users");

    let bodies: [(&[Pair<'_>], &[u8]); 7] = [
        (&[FORM], b"FriendlyName=%ZZ"),
        (&[FORM], b"FriendlyName=%F"),
        (&[FORM], b"FriendlyName=%FF%FE"),
        (&[FORM], b"FriendlyName=\xff\xfe"),
        (
            &[("Content-Type", "application/json")],
            br#"{"FriendlyName":"x"}"#,
        ),
        (&[("Content-Type", "text/plain")], b"FriendlyName=x"),
        (&[], b"FriendlyName=x"),
    ];
    for (headers, body) in bodies {
        let r = raw(
            &reachd,
            "POST",
            "/v1/Services",
            Some(&auth),
            headers,
            Some(body),
        )
        .await;
        assert_error(&r, 400, 20001);
        let r = raw(&reachd, "POST", &users, Some(&auth), headers, Some(body)).await;
        assert_error(&r, 400, 20001);
    }
    // A body of the right type but over the limit.
    let huge = vec![b'a'; 3 << 20];
    let r = raw(&reachd, "POST", &users, Some(&auth), &[FORM], Some(&huge)).await;
    assert!(r.status == 400 || r.status == 413, "{}", r.status);
    assert_eq!(r.body["status"], r.status, "{}", r.text);

    // Paths that do not decode.
    assert_error(&api.get("/v1/Services/%ZZ").await, 404, 20404);
    assert_error(&api.get("/v1/Services/%FF").await, 400, 20001);
    assert_error(&api.get(&format!("{users}/%FF%FE")).await, 400, 20001);
    assert_error(&api.delete(&format!("{users}/%C3")).await, 400, 20001);
    assert_error(&api.get(&format!("{users}/%ZZ")).await, 404, 20404);
    assert_error(
        &api.get(&format!("/v1/Services/{sid}/Bindings/%FF")).await,
        400,
        20001,
    );

    // Query strings that do not decode.
    for query in ["PageSize=%FF", "PageSize=%Z1", "Page%=1"] {
        assert_error(&api.get(&format!("{users}?{query}")).await, 400, 20001);
    }

    // Still serving, and nothing was created.
    let r = api.get("/v1/Services").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["services"].as_array().unwrap().len(), 1);
    assert_eq!(api.get(&users).await.body["users"], serde_json::json!([]));
    assert_eq!(api.post(&users, &[("Identity", "after")]).await.status, 201);
}

#[tokio::test]
async fn writes_survive_kill9_and_urls_use_public_url() {
    let reachd = Reachd::start_with_env(
        "",
        &[("REACH_SERVER__PUBLIC_URL", "https://reach.example.test/")],
    );
    let api = reachd.client();
    let sid = api.create_service("durable").await;
    api.set_reachability(&sid, true).await;
    let created = api
        .post(
            &format!("/v1/Services/{sid}/Users"),
            &[
                ("Identity", "alice"),
                ("FriendlyName", "Alice"),
                ("Attributes", "{\"k\":true}"),
            ],
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(
        created.body["url"],
        format!(
            "https://reach.example.test/v1/Services/{sid}/Users/{}",
            created.body["sid"].as_str().unwrap()
        )
    );
    let service = api.get(&format!("/v1/Services/{sid}")).await.body;

    let reachd = reachd.kill9_and_restart();
    let api = reachd.client();
    let r = api.get(&format!("/v1/Services/{sid}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, service);
    assert_eq!(
        api.get(&format!("/v1/Services/{sid}/Configuration"))
            .await
            .body["reachability_enabled"],
        true
    );
    let r = api.get(&format!("/v1/Services/{sid}/Users/alice")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["sid"], created.body["sid"]);
    assert_eq!(r.body["friendly_name"], "Alice");
    assert_eq!(r.body["attributes"], "{\"k\":true}");
    assert_eq!(r.body["url"], created.body["url"]);
    assert_error(
        &api.post(
            &format!("/v1/Services/{sid}/Users"),
            &[("Identity", "alice")],
        )
        .await,
        409,
        50201,
    );
}
