//! Webhooks and last-seen times against a real reachd and real receivers (HTTP servers in the
//! test): the configuration resource, every event with every parameter, signatures checked by
//! the documented algorithm, retries (receiver down, 500, 429, hanging), what is given up, order
//! per user, a `kill -9` with events pending, the recovery of users online at the crash.

mod common;
mod receiver;
mod ws_client;

use std::time::{Duration, Instant};

use common::*;
use reach_proto::{ClientFrame, ServerFrame};
use receiver::*;
use ws_client::*;

/// Fast retries and a short grace, so each case takes seconds.
const FAST: &str = r#"
[presence]
offline_grace_ms = 1000

[webhooks]
timeout_ms = 1000
retry_initial_ms = 200
retry_max_ms = 1000
lease_ms = 5000
poll_interval_ms = 100
max_attempts = 30
"#;

/// Every parameter of a user event (`UpdateReasons` only on `onUserUpdated`).
const PARAMS: &[&str] = &[
    "AccountSid",
    "Attributes",
    "ChatServiceSid",
    "DateCreated",
    "DateLastSeen",
    "DateUpdated",
    "EventType",
    "FriendlyName",
    "Identity",
    "IsNotifiable",
    "IsOnline",
    "RoleSid",
    "Source",
    "UserSid",
];

const USER_FILTERS: [(&str, &str); 3] = [
    ("Filters", "onUserAdded"),
    ("Filters", "onUserUpdated"),
    ("Filters", "onUserRemoved"),
];

const WEBHOOK_ON: (&str, &str) = ("X-Twilio-Webhook-Enabled", "true");

/// A service with reachability on whose webhook posts every user event to `url`.
async fn service_with_webhook(d: &Reachd, url: &str) -> String {
    let rest = d.client();
    let svc = rest.create_service("webhooks").await;
    rest.set_reachability(&svc, true).await;
    let mut form = vec![("PostWebhookUrl", url)];
    form.extend(USER_FILTERS);
    let r = rest
        .post(&format!("/v1/Services/{svc}/Configuration/Webhooks"), &form)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    svc
}

/// A REST request with extra headers.
async fn send(
    d: &Reachd,
    method: &str,
    path: &str,
    form: &[(&str, &str)],
    headers: &[(&str, &str)],
) -> Response {
    let rest = d.client();
    let mut req = reqwest::Client::new()
        .request(method.parse().unwrap(), format!("{}{path}", rest.base))
        .basic_auth(&rest.user, Some(&rest.password));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if !form.is_empty() {
        let body: Vec<String> = form
            .iter()
            .map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v)))
            .collect();
        req = req
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body.join("&"));
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    Response { status, body, text }
}

/// Checks what every event carries: the parameters, a valid signature, a token. (The query
/// of a GET also holds the configured URL's own parameters, in lower case in these tests.)
#[track_caller]
fn check_hook(hook: &Hook, svc: &str) {
    let mut names: Vec<&str> = hook
        .params
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| n.starts_with(|c: char| c.is_ascii_uppercase()))
        .collect();
    names.sort_unstable();
    let mut expected = PARAMS.to_vec();
    if hook.event() == "onUserUpdated" {
        expected.push("UpdateReasons");
        expected.sort_unstable();
    }
    assert_eq!(names, expected, "{:?}", hook.params);
    assert!(
        hook.signature_valid(AUTH_TOKEN),
        "bad signature on {:?}",
        hook
    );
    assert!(
        !hook.signature_valid(OTHER_AUTH_TOKEN),
        "signed with another account's token"
    );
    let token = hook.token();
    assert!(token.starts_with("EV") && token.len() == 34, "{token}");
    assert_eq!(hook.param("AccountSid"), ACCOUNT_SID);
    assert_eq!(hook.param("ChatServiceSid"), svc);
    for date in ["DateCreated", "DateUpdated"] {
        assert!(is_iso8601(hook.param(date)), "{date}: {}", hook.param(date));
    }
    let seen = hook.param("DateLastSeen");
    assert!(seen.is_empty() || is_iso8601(seen), "{seen}");
}

fn is_iso8601(s: &str) -> bool {
    s.len() == 20 && s.ends_with('Z') && s.as_bytes()[10] == b'T'
}

/// Unix seconds of an ISO-8601 time as the webhooks write it.
fn unix_of(iso: &str) -> i64 {
    let t = time::PrimitiveDateTime::parse(
        iso.trim_end_matches('Z'),
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]"),
    )
    .unwrap();
    t.assume_utc().unix_timestamp()
}

async fn metric(d: &Reachd, line: &str) -> f64 {
    let text = d.metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix(line).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Polls until `f` holds, for up to `wait`.
async fn eventually<F, Fut>(wait: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + wait;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {wait:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_webhook_resource_is_the_hosted_one() {
    let d = Reachd::start(FAST);
    let rest = d.client();
    let svc = rest.create_service("hooks").await;
    let path = format!("/v1/Services/{svc}/Configuration/Webhooks");
    let url = format!("{}{path}", d.base());

    let r = rest.get(&path).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body,
        serde_json::json!({
            "account_sid": ACCOUNT_SID, "chat_service_sid": svc, "pre_webhook_url": null,
            "post_webhook_url": null, "filters": [], "method": "POST", "url": url,
        })
    );
    let cfg = rest.get(&format!("/v1/Services/{svc}/Configuration")).await;
    assert_eq!(cfg.body["links"]["webhooks"], url.as_str());

    let r = rest
        .post(
            &path,
            &[
                ("PreWebhookUrl", "https://backend.example.com/pre"),
                ("PostWebhookUrl", "http://127.0.0.1:9"),
                ("Method", "get"),
                ("Filters", "onUserUpdated"),
                ("Filters", "onMessageAdded"),
                ("Filters", "onUserUpdated"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["pre_webhook_url"], "https://backend.example.com/pre");
    assert_eq!(
        r.body["post_webhook_url"], "http://127.0.0.1:9/",
        "normalised"
    );
    assert_eq!(r.body["method"], "GET");
    assert_eq!(
        r.body["filters"],
        serde_json::json!(["onUserUpdated", "onMessageAdded"])
    );
    assert_eq!(rest.get(&path).await.body, r.body, "stored");

    // A partial update keeps the rest; empty values clear.
    let r = rest
        .post(&path, &[("PreWebhookUrl", ""), ("Filters", "")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["pre_webhook_url"], serde_json::Value::Null);
    assert_eq!(r.body["filters"], serde_json::json!([]));
    assert_eq!(r.body["post_webhook_url"], "http://127.0.0.1:9/");
    assert_eq!(r.body["method"], "GET");

    // Bad values: the error JSON, nothing changed.
    for form in [
        vec![("PostWebhookUrl", "/relative/path")],
        vec![("PostWebhookUrl", "ftp://example.com/hook")],
        vec![("PostWebhookUrl", "http://169.254.169.254/latest/meta-data/")],
        vec![(
            "PostWebhookUrl",
            "http://metadata.google.internal/computeMetadata/v1/",
        )],
        vec![("PostWebhookUrl", "http://[fe80::1]:8080/")],
        vec![("PreWebhookUrl", "http://169.254.169.254/")],
        vec![("PostWebhookUrl", "https://user:secret@example.com/hook")],
        vec![("Method", "PUT")],
        vec![("Filters", "onUserUpdated"), ("Filters", "onEverything")],
    ] {
        let r = rest.post(&path, &form).await;
        assert_eq!(r.status, 400, "{form:?}: {}", r.text);
        assert_eq!(r.body["code"], 20001, "{}", r.text);
        assert!(r.body["message"].as_str().unwrap().len() > 10, "{}", r.text);
    }
    let after = rest.get(&path).await;
    assert_eq!(after.body["post_webhook_url"], "http://127.0.0.1:9/");
    assert_eq!(after.body["method"], "GET");

    // Another account's service, or none: 404.
    let other = d.client_as(OTHER_ACCOUNT_SID, OTHER_AUTH_TOKEN);
    assert_eq!(other.get(&path).await.status, 404);
    assert_eq!(
        other
            .post(&path, &[("PostWebhookUrl", "http://127.0.0.1:9/")])
            .await
            .status,
        404
    );
    let unknown = "/v1/Services/IS00000000000000000000000000000000/Configuration/Webhooks";
    assert_eq!(rest.get(unknown).await.status, 404);
}

#[tokio::test]
async fn link_local_targets_are_allowed_only_when_configured() {
    let d = Reachd::start(&format!("{FAST}allow_link_local = true\n"));
    let rest = d.client();
    let svc = rest.create_service("hooks").await;
    let r = rest
        .post(
            &format!("/v1/Services/{svc}/Configuration/Webhooks"),
            &[("PostWebhookUrl", "http://169.254.169.254/hook")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test]
async fn every_event_reaches_the_receiver_signed_with_its_parameters() {
    let mut rx = Receiver::start().await;
    let d = Reachd::start(FAST);
    let svc = service_with_webhook(&d, &rx.url("/hooks/reach?tenant=1")).await;
    let users = format!("/v1/Services/{svc}/Users");

    // A REST create fires only with X-Twilio-Webhook-Enabled: true, as in the hosted API.
    let r = send(&d, "POST", &users, &[("Identity", "quiet")], &[]).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = send(
        &d,
        "POST",
        &users,
        &[("Identity", "alice"), ("FriendlyName", "Alice")],
        &[WEBHOOK_ON],
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let alice_sid = r.body["sid"].as_str().unwrap().to_owned();
    let added = rx.next().await;
    check_hook(&added, &svc);
    assert_eq!(added.method, "POST");
    assert_eq!(
        added.header("Content-Type"),
        "application/x-www-form-urlencoded"
    );
    assert_eq!(added.event(), "onUserAdded");
    assert_eq!(added.param("Source"), "API");
    assert_eq!(added.param("Identity"), "alice", "not the quiet one");
    assert_eq!(added.param("UserSid"), alice_sid);
    assert_eq!(added.param("FriendlyName"), "Alice");
    assert_eq!(added.param("Attributes"), "{}");
    assert_eq!(added.param("RoleSid"), "");
    assert_eq!(added.param("IsOnline"), "", "never online: null");
    assert_eq!(added.param("IsNotifiable"), "");
    assert_eq!(added.param("DateLastSeen"), "");
    assert!(
        added.url.ends_with("/hooks/reach?tenant=1"),
        "{}",
        added.url
    );

    // An update without the header fires nothing; with it, what subscribers see change.
    let alice = format!("{users}/alice");
    let r = send(&d, "POST", &alice, &[("FriendlyName", "Quiet")], &[]).await;
    assert_eq!(r.status, 200);
    let r = send(
        &d,
        "POST",
        &alice,
        &[
            ("FriendlyName", "Alice A."),
            ("Attributes", r#"{"team":"blue"}"#),
        ],
        &[WEBHOOK_ON],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let updated = rx.next().await;
    check_hook(&updated, &svc);
    assert_eq!(updated.event(), "onUserUpdated");
    assert_eq!(updated.param("Source"), "API");
    assert_eq!(updated.param("UpdateReasons"), "friendlyName,attributes");
    assert_eq!(updated.param("FriendlyName"), "Alice A.");
    assert_eq!(updated.param("Attributes"), r#"{"team":"blue"}"#);
    // Nothing subscribers see: no event.
    let r = send(
        &d,
        "POST",
        &alice,
        &[
            ("FriendlyName", "Alice A."),
            ("RoleSid", "RL0123456789abcdef0123456789abcdef"),
        ],
        &[WEBHOOK_ON],
    )
    .await;
    assert_eq!(r.status, 200);

    // A first hello creates bob (SDK) and brings him online.
    let (mut bob, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "bob"), None).await;
    let bob_added = rx.next().await;
    check_hook(&bob_added, &svc);
    assert_eq!(
        (
            bob_added.event(),
            bob_added.param("Source"),
            bob_added.param("Identity")
        ),
        ("onUserAdded", "SDK", "bob")
    );
    let online = rx.next().await;
    check_hook(&online, &svc);
    assert_eq!(
        (
            online.event(),
            online.param("Source"),
            online.param("UpdateReasons"),
            online.param("IsOnline"),
        ),
        ("onUserUpdated", "SDK", "reachabilityOnline", "true")
    );
    let now = now();
    assert!(
        (unix_of(online.param("DateLastSeen")) - now).abs() <= 5,
        "online: last seen is now"
    );

    // A push registration makes bob notifiable (SDK).
    let reply = bob
        .request(ClientFrame::RegisterPush {
            id: 1,
            binding_type: "fcm".into(),
            address: "device-token-1".into(),
        })
        .await;
    let ServerFrame::PushRegistered { binding_sid, .. } = reply else {
        panic!("{reply:?}")
    };
    let notifiable = rx.next().await;
    check_hook(&notifiable, &svc);
    assert_eq!(
        (
            notifiable.param("UpdateReasons"),
            notifiable.param("IsNotifiable"),
            notifiable.param("Source")
        ),
        ("reachabilityNotifiable", "true", "SDK")
    );

    // bye: offline at once, last seen then.
    bob.send(&ClientFrame::Bye).await;
    let offline = rx.next().await;
    check_hook(&offline, &svc);
    assert_eq!(
        (offline.param("UpdateReasons"), offline.param("IsOnline")),
        ("reachabilityOnline", "false")
    );
    assert!((unix_of(offline.param("DateLastSeen")) - now).abs() <= 5);

    // A REST binding delete (with the header): not notifiable any more.
    let r = send(
        &d,
        "DELETE",
        &format!("/v1/Services/{svc}/Bindings/{binding_sid}"),
        &[],
        &[WEBHOOK_ON],
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text);
    let unbound = rx.next().await;
    check_hook(&unbound, &svc);
    assert_eq!(
        (
            unbound.param("UpdateReasons"),
            unbound.param("IsNotifiable"),
            unbound.param("Source")
        ),
        ("reachabilityNotifiable", "false", "API")
    );

    // Delete: onUserRemoved with the user as it was.
    let r = send(&d, "DELETE", &alice, &[], &[WEBHOOK_ON]).await;
    assert_eq!(r.status, 204);
    let removed = rx.next().await;
    check_hook(&removed, &svc);
    assert_eq!(
        (
            removed.event(),
            removed.param("Identity"),
            removed.param("FriendlyName")
        ),
        ("onUserRemoved", "alice", "Alice A.")
    );

    // Each event had a token of its own.
    let mut tokens: Vec<String> = [
        &added,
        &updated,
        &bob_added,
        &online,
        &notifiable,
        &offline,
        &unbound,
        &removed,
    ]
    .iter()
    .map(|h| h.token().to_owned())
    .collect();
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 8);
    rx.none_within(Duration::from_millis(500)).await;
    assert_eq!(
        metric(&d, "reach_webhook_deliveries_total{outcome=\"delivered\"}").await,
        8.0
    );

    // GET: the parameters in the query string, the whole URL signed.
    let r = d
        .client()
        .post(
            &format!("/v1/Services/{svc}/Configuration/Webhooks"),
            &[("Method", "GET")],
        )
        .await;
    assert_eq!(r.status, 200);
    let r = send(
        &d,
        "POST",
        &format!("{users}/bob"),
        &[("FriendlyName", "Bob")],
        &[WEBHOOK_ON],
    )
    .await;
    assert_eq!(r.status, 200);
    let got = rx.next().await;
    assert_eq!(got.method, "GET");
    check_hook(&got, &svc);
    assert!(got.url.contains("/hooks/reach?tenant=1&"), "{}", got.url);
    assert!(got.url.contains("EventType=onUserUpdated"), "{}", got.url);
    assert_eq!(got.param("FriendlyName"), "Bob");
}

#[tokio::test]
async fn a_flap_inside_the_grace_sends_nothing() {
    let mut rx = Receiver::start().await;
    let d = Reachd::start(FAST);
    let svc = service_with_webhook(&d, &rx.url("/")).await;
    create_user(&d, &svc, "alice").await;
    let (alice, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
    assert_eq!(
        rx.next_event("onUserUpdated").await.param("IsOnline"),
        "true"
    );

    // The connection drops and comes back within the grace (1 s): no event.
    alice.abort();
    let (alice, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
    rx.none_within(Duration::from_millis(2500)).await;

    // Gone for good: offline after the grace, with the time it left.
    let left = now();
    alice.abort();
    let offline = rx.next().await;
    assert_eq!(offline.param("IsOnline"), "false");
    let seen = unix_of(offline.param("DateLastSeen"));
    assert!(
        (left..=left + 3).contains(&seen),
        "offline at the end of the grace: {seen} vs {left}"
    );
}

#[tokio::test]
async fn a_receiver_that_is_down_gets_the_events_when_it_is_back() {
    let addr = Receiver::free_addr();
    let d = Reachd::start(FAST);
    let svc = service_with_webhook(&d, &format!("http://{addr}/hook")).await;
    for identity in ["alice", "bob"] {
        let r = send(
            &d,
            "POST",
            &format!("/v1/Services/{svc}/Users"),
            &[("Identity", identity)],
            &[WEBHOOK_ON],
        )
        .await;
        assert_eq!(r.status, 201);
    }
    eventually(
        Duration::from_secs(10),
        "failed attempts counted",
        || async { metric(&d, "reach_webhook_deliveries_total{outcome=\"failed\"}").await >= 2.0 },
    )
    .await;
    let mut rx = Receiver::start_on(addr).await;
    let mut got: Vec<String> = Vec::new();
    for _ in 0..2 {
        let hook = rx.next().await;
        check_hook(&hook, &svc);
        got.push(hook.param("Identity").to_owned());
    }
    got.sort();
    assert_eq!(got, ["alice", "bob"]);
    rx.none_within(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn server_errors_and_429_are_retried_with_the_same_token() {
    let mut rx = Receiver::start().await;
    rx.script([Reply::Status(500), Reply::Status(503), Reply::RetryAfter(2)]);
    let d = Reachd::start(FAST);
    let svc = service_with_webhook(&d, &rx.url("/hook")).await;
    let r = send(
        &d,
        "POST",
        &format!("/v1/Services/{svc}/Users"),
        &[("Identity", "alice")],
        &[WEBHOOK_ON],
    )
    .await;
    assert_eq!(r.status, 201);
    let attempts: Vec<Hook> = vec![
        rx.next().await,
        rx.next().await,
        rx.next().await,
        rx.next().await,
    ];
    for hook in &attempts {
        check_hook(hook, &svc);
        assert_eq!(hook.token(), attempts[0].token(), "one event, one token");
    }
    // Backoff from 200 ms: the second attempt comes at least 100 ms after the first.
    assert!(attempts[1].at.duration_since(attempts[0].at) >= Duration::from_millis(100));
    // After the 429 with Retry-After: 2, not before two seconds.
    let after_429 = attempts[3].at.duration_since(attempts[2].at);
    assert!(after_429 >= Duration::from_millis(1900), "{after_429:?}");
    rx.none_within(Duration::from_millis(500)).await;
    assert_eq!(
        metric(&d, "reach_webhook_deliveries_total{outcome=\"failed\"}").await,
        3.0
    );
    assert_eq!(
        metric(&d, "reach_webhook_deliveries_total{outcome=\"delivered\"}").await,
        1.0
    );
}

#[tokio::test]
async fn a_receiver_that_never_answers_never_slows_presence() {
    let mut rx = Receiver::start().await;
    // Attempts wait up to 30 s: were presence to wait on a delivery, the update below would
    // miss its 10 s wait.
    let d = Reachd::start(
        &FAST
            .replace("timeout_ms = 1000", "timeout_ms = 30000")
            .replace("lease_ms = 5000", "lease_ms = 60000"),
    );
    let svc = service_with_webhook(&d, &rx.url("/hook")).await;
    create_user(&d, &svc, "alice").await;
    rx.script(std::iter::repeat_n(Reply::Hang, 100));
    let (mut bob, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "bob"), None).await;
    assert_eq!(rx.next().await.param("Identity"), "bob", "a delivery hangs");
    bob.request(ClientFrame::Subscribe {
        id: 1,
        identities: vec!["alice".into()],
    })
    .await;
    for _ in 0..3 {
        let (mut alice, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
        assert_eq!(bob.is_online_of("alice").await, Some(true));
        alice.send(&ClientFrame::Bye).await;
        assert_eq!(bob.is_online_of("alice").await, Some(false));
    }
    // REST too.
    let r = d
        .client()
        .get(&format!("/v1/Services/{svc}/Users/alice"))
        .await;
    assert_eq!(r.body["is_online"], false);
}

#[tokio::test]
async fn a_receiver_that_hangs_times_out_and_gets_the_event_again() {
    let mut rx = Receiver::start().await;
    rx.script([Reply::Hang, Reply::Hang]);
    let d = Reachd::start(FAST);
    let svc = service_with_webhook(&d, &rx.url("/hook")).await;
    let r = send(
        &d,
        "POST",
        &format!("/v1/Services/{svc}/Users"),
        &[("Identity", "alice")],
        &[WEBHOOK_ON],
    )
    .await;
    assert_eq!(r.status, 201);
    let attempts = [rx.next().await, rx.next().await, rx.next().await];
    for hook in &attempts {
        check_hook(hook, &svc);
        assert_eq!(hook.token(), attempts[0].token());
    }
    // Each hung attempt was given up after the timeout (1 s) before the next.
    assert!(attempts[1].at.duration_since(attempts[0].at) >= Duration::from_millis(900));
    rx.none_within(Duration::from_millis(500)).await;
    assert_eq!(
        metric(&d, "reach_webhook_deliveries_total{outcome=\"failed\"}").await,
        2.0
    );
    assert!(
        d.drain_logs().iter().all(|l| !l.contains("given up")),
        "delivered in the end"
    );
}

#[tokio::test]
async fn final_answers_and_exhausted_retries_are_given_up_logged_and_counted() {
    let mut rx = Receiver::start().await;
    let d = Reachd::start(&FAST.replace("max_attempts = 30", "max_attempts = 3"));
    let svc = service_with_webhook(&d, &rx.url("/hook")).await;
    let users = format!("/v1/Services/{svc}/Users");
    // A 404 is final: one attempt.
    rx.script([Reply::Status(404)]);
    send(&d, "POST", &users, &[("Identity", "alice")], &[WEBHOOK_ON]).await;
    let gone = rx.next().await;
    rx.none_within(Duration::from_millis(1000)).await;
    // A 500 every time: three attempts, then given up.
    rx.script([Reply::Status(500), Reply::Status(500), Reply::Status(500)]);
    send(&d, "POST", &users, &[("Identity", "bob")], &[WEBHOOK_ON]).await;
    let tries = [rx.next().await, rx.next().await, rx.next().await];
    assert!(tries.iter().all(|h| h.token() == tries[0].token()));
    assert_ne!(tries[0].token(), gone.token());
    rx.none_within(Duration::from_millis(1500)).await;
    assert_eq!(
        metric(&d, "reach_webhook_deliveries_total{outcome=\"given_up\"}").await,
        2.0
    );
    let logs = d.drain_logs();
    let given_up: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("webhook event given up"))
        .collect();
    assert_eq!(given_up.len(), 2, "{given_up:?}");
    assert!(given_up[0].contains("HTTP 404"), "{}", given_up[0]);
    assert!(given_up[1].contains("HTTP 500"), "{}", given_up[1]);
    // The queue is empty again.
    eventually(Duration::from_secs(5), "queue gauge at 0", || async {
        d.metrics().await.contains("reach_webhook_queue_depth 0")
    })
    .await;
}

#[tokio::test]
async fn one_users_events_arrive_in_order_while_others_go_on() {
    let mut rx = Receiver::start().await;
    let d = Reachd::start(FAST);
    let svc = service_with_webhook(&d, &rx.url("/hook")).await;
    let users = format!("/v1/Services/{svc}/Users");
    // alice's first event is told to come back in 2 s; her next two wait behind it, bob's
    // does not.
    rx.script([Reply::RetryAfter(2)]);
    send(&d, "POST", &users, &[("Identity", "alice")], &[WEBHOOK_ON]).await;
    let first = rx.next().await;
    for name in ["A1", "A2"] {
        send(
            &d,
            "POST",
            &format!("{users}/alice"),
            &[("FriendlyName", name)],
            &[WEBHOOK_ON],
        )
        .await;
    }
    send(&d, "POST", &users, &[("Identity", "bob")], &[WEBHOOK_ON]).await;
    let next = rx.next().await;
    assert_eq!(
        next.param("Identity"),
        "bob",
        "bob's event went while alice's waited"
    );
    let alice: Vec<Hook> = vec![rx.next().await, rx.next().await, rx.next().await];
    assert_eq!(alice[0].token(), first.token(), "her first, again, first");
    let order: Vec<(&str, &str, &str)> = alice
        .iter()
        .map(|h| (h.param("Identity"), h.event(), h.param("FriendlyName")))
        .collect();
    assert_eq!(
        order,
        [
            ("alice", "onUserAdded", ""),
            ("alice", "onUserUpdated", "A1"),
            ("alice", "onUserUpdated", "A2")
        ]
    );
}

#[tokio::test]
async fn events_pending_at_a_kill_9_are_delivered_after_the_restart() {
    let addr = Receiver::free_addr();
    let d = Reachd::start(FAST);
    let svc = service_with_webhook(&d, &format!("http://{addr}/hook")).await;
    let users = format!("/v1/Services/{svc}/Users");
    // The receiver is down: events wait. Answered REST writes have recorded theirs.
    for identity in ["u1", "u2", "u3"] {
        let r = send(&d, "POST", &users, &[("Identity", identity)], &[WEBHOOK_ON]).await;
        assert_eq!(r.status, 201);
    }
    // alice is online when reachd dies.
    let (alice, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
    eventually(
        Duration::from_secs(10),
        "alice's events recorded",
        || async { metric(&d, "reach_webhook_queue_depth").await >= 5.0 },
    )
    .await;
    let killed_at = now();
    let stopped = d.kill9();
    drop(alice);
    let mut rx = Receiver::start_on(addr).await;
    let d = stopped.restart();

    // Every event comes, and one that was sent twice (its lease held when reachd died) has
    // one token.
    let mut got: Vec<Hook> = Vec::new();
    let expected = [
        ("u1", "onUserAdded"),
        ("u2", "onUserAdded"),
        ("u3", "onUserAdded"),
        ("alice", "onUserAdded"),
        ("alice", "onUserUpdated"),
    ];
    let mut distinct = std::collections::HashMap::new();
    while distinct.len() < expected.len() + 1 {
        let hook = rx.next().await;
        check_hook(&hook, &svc);
        distinct.entry(hook.token().to_owned()).or_insert_with(|| {
            (
                hook.param("Identity").to_owned(),
                hook.event().to_owned(),
                hook.param("IsOnline").to_owned(),
            )
        });
        got.push(hook);
    }
    for (identity, event) in expected {
        assert!(
            distinct
                .values()
                .any(|(i, e, _)| i == identity && e == event),
            "{identity} {event} missing: {distinct:?}"
        );
    }
    // After the grace, alice (online when reachd died, not back) is reported offline, as of
    // the last time the old process said it was alive.
    let offline = distinct
        .iter()
        .find(|(_, (i, e, on))| i == "alice" && e == "onUserUpdated" && on == "false")
        .map(|(token, _)| token.clone())
        .expect("alice reported offline after the restart");
    let hook = got.iter().find(|h| h.token() == offline).unwrap();
    let seen = unix_of(hook.param("DateLastSeen"));
    assert!(
        (killed_at - 7..=killed_at).contains(&seen),
        "last seen {seen}, killed at {killed_at}"
    );
    rx.none_within(Duration::from_millis(1500)).await;
    // REST says the same.
    let r = d
        .client()
        .get(&format!("/v1/Services/{svc}/Users/alice"))
        .await;
    assert_eq!(r.body["is_online"], false);
    assert_eq!(unix_of(r.body["date_last_seen"].as_str().unwrap()), seen);
}

#[tokio::test]
async fn a_user_back_within_the_grace_after_a_restart_is_never_reported_offline() {
    let mut rx = Receiver::start().await;
    let d = Reachd::start(FAST);
    let svc = service_with_webhook(&d, &rx.url("/hook")).await;
    create_user(&d, &svc, "alice").await;
    let (alice, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
    let online = rx.next().await;
    assert_eq!(online.param("IsOnline"), "true");
    let d = d.kill9_and_restart();
    drop(alice);
    // She reconnects at once (before the grace of the new process ends): no new event. (The
    // online event may come again: its outcome may not have been written before the kill;
    // then it has its token.)
    let (_alice, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
    let quiet_until = Instant::now() + Duration::from_secs(3);
    while let Ok(hook) = tokio::time::timeout_at(quiet_until.into(), rx.next()).await {
        assert_eq!(hook.token(), online.token(), "{:?}", hook.params);
    }
    let r = d
        .client()
        .get(&format!("/v1/Services/{svc}/Users/alice"))
        .await;
    assert_eq!(r.body["is_online"], true);
}

#[tokio::test]
async fn last_seen_in_rest_frames_and_across_a_restart() {
    let d = Reachd::start(FAST);
    let rest = d.client();
    let svc = rest.create_service("seen").await;
    rest.set_reachability(&svc, true).await;
    create_user(&d, &svc, "alice").await;
    let user_url = format!("/v1/Services/{svc}/Users/alice");
    let r = rest.get(&user_url).await;
    assert_eq!(
        r.body["date_last_seen"],
        serde_json::Value::Null,
        "never online"
    );

    let (mut bob, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "bob"), None).await;
    let sub = bob
        .request(ClientFrame::Subscribe {
            id: 1,
            identities: vec!["alice".into()],
        })
        .await;
    let ServerFrame::Subscribed { users, .. } = &sub else {
        panic!("{sub:?}")
    };
    assert_eq!(users[0].last_seen_at, None);

    let (mut alice, welcome) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
    let ServerFrame::Welcome { user, .. } = &welcome else {
        panic!()
    };
    let t = now();
    assert!(
        user.last_seen_at.is_some_and(|s| (s - t).abs() <= 2),
        "{user:?}"
    );
    let on = bob.update_of("alice").await;
    let ServerFrame::UserUpdated { user, .. } = &on else {
        panic!()
    };
    assert!(user.last_seen_at.is_some_and(|s| (s - t).abs() <= 2));
    let r = rest.get(&user_url).await;
    assert!((unix_of(r.body["date_last_seen"].as_str().unwrap()) - now()).abs() <= 2);

    alice.send(&ClientFrame::Bye).await;
    let left = now();
    let off = bob.update_of("alice").await;
    let ServerFrame::UserUpdated { user, .. } = &off else {
        panic!()
    };
    assert_eq!(user.is_online, Some(false));
    let seen = user.last_seen_at.expect("offline: when it left");
    assert!((seen - left).abs() <= 1);
    // Later reads keep that time, not now.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = rest.get(&user_url).await;
    assert_eq!(unix_of(r.body["date_last_seen"].as_str().unwrap()), seen);
    // A list carries no flags.
    let list = rest.get(&format!("/v1/Services/{svc}/Users")).await;
    assert_eq!(
        list.body["users"][0]["date_last_seen"],
        serde_json::Value::Null
    );

    // Kept across a restart (in the store; written within the batch window, long past), and
    // in a new subscription.
    let d = d.kill9_and_restart();
    let r = d.client().get(&user_url).await;
    assert_eq!(r.body["is_online"], false);
    assert_eq!(unix_of(r.body["date_last_seen"].as_str().unwrap()), seen);
    let (mut carol, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "carol"), None).await;
    let sub = carol
        .request(ClientFrame::Subscribe {
            id: 1,
            identities: vec!["alice".into()],
        })
        .await;
    let ServerFrame::Subscribed { users, .. } = &sub else {
        panic!("{sub:?}")
    };
    assert_eq!(users[0].last_seen_at, Some(seen));

    // Disabled: null, as is_online.
    d.client().set_reachability(&svc, false).await;
    let r = d.client().get(&user_url).await;
    assert_eq!(r.body["date_last_seen"], serde_json::Value::Null);
}

#[tokio::test]
async fn a_first_hello_records_its_user_before_its_online() {
    // Presence changes written 1 ms after they happen: had the user been created after its
    // online was reported, the online would find no user and be lost.
    let mut rx = Receiver::start().await;
    let d = Reachd::start(&FAST.replace(
        "poll_interval_ms = 100",
        "poll_interval_ms = 100\nrecord_batch_ms = 1",
    ));
    let svc = service_with_webhook(&d, &rx.url("/hook")).await;
    let mut sockets = Vec::new();
    for i in 0..10 {
        let (ws, _) = Ws::hello(&d.ws_url(), &d.token(&svc, &format!("new{i}")), None).await;
        sockets.push(ws);
    }
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 20 {
        let hook = rx.next().await;
        seen.insert(format!(
            "{} {} {}",
            hook.param("Identity"),
            hook.event(),
            hook.param("IsOnline")
        ));
    }
    for i in 0..10 {
        assert!(seen.contains(&format!("new{i} onUserAdded ")), "{seen:?}");
        assert!(
            seen.contains(&format!("new{i} onUserUpdated true")),
            "{seen:?}"
        );
    }
}
