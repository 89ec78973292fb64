//! Attacks on the rate limits, against the real reachd; each checks that the attacker is
//! stopped and that an honest client (another account, another address, another socket) is
//! served meanwhile:
//!
//! - REST requests of one account past its burst: 429, code 20429, `Retry-After`;
//! - 300 wrong passwords from one address: 429 after the burst, for that address only, and
//!   then even the right password from it;
//! - forged tokens in `hello` from one address: 20429 and close 4029 after the burst;
//! - a frame flood on one socket: `error` 20429 per frame past the burst, then close 4029;
//! - a `subscribe` naming more identities than allowed.

mod common;
mod ws_client;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use reach_proto::{ClientFrame, Encoding, ServerFrame, encode};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use ws_client::{WAIT, Ws};

async fn metric(d: &Reachd, name: &str) -> f64 {
    let text = d.metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// A REST client whose connections come from `from`.
fn client_from(from: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(from.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

async fn list_services(
    http: &reqwest::Client,
    d: &Reachd,
    user: &str,
    password: &str,
) -> reqwest::Response {
    http.get(format!("{}/v1/Services", d.base()))
        .basic_auth(user, Some(password))
        .send()
        .await
        .unwrap()
}

async fn assert_429(response: reqwest::Response) -> u64 {
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "{retry_after}");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], 20429, "{body}");
    assert_eq!(body["status"], 429, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("retry after"),
        "{body}"
    );
    retry_after
}

#[tokio::test]
async fn an_account_past_its_burst_gets_429_with_retry_after_and_others_are_served() {
    let d = Reachd::start_with_env(
        "",
        &[
            ("REACH_LIMITS__REST_REQUESTS_PER_SECOND", "2"),
            ("REACH_LIMITS__REST_REQUEST_BURST", "10"),
        ],
    );
    let http = reqwest::Client::new();
    let mut answered = 0;
    let started = Instant::now();
    loop {
        let r = list_services(&http, &d, ACCOUNT_SID, AUTH_TOKEN).await;
        if r.status() != 200 {
            let retry_after = assert_429(r).await;
            assert!(
                retry_after <= 1,
                "one token back within a second at 2/s: {retry_after}"
            );
            break;
        }
        answered += 1;
        assert!(answered <= 12, "no 429 after {answered} requests");
    }
    // The burst, and what refilled while it was spent.
    let refilled = (started.elapsed().as_secs_f64() * 2.0).ceil() as i32;
    assert!((10..=10 + refilled).contains(&answered), "{answered}");
    // Another account has its own bucket.
    let other = list_services(&http, &d, OTHER_ACCOUNT_SID, OTHER_AUTH_TOKEN).await;
    assert_eq!(other.status(), 200);
    // The bucket refills: the account is answered again.
    let deadline = Instant::now() + WAIT;
    loop {
        let r = list_services(&http, &d, ACCOUNT_SID, AUTH_TOKEN).await;
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let limited = "reach_rate_limited_total{reason=\"rest_account\"}";
    assert!(metric(&d, limited).await >= 1.0);
}

#[tokio::test]
async fn wrong_passwords_are_throttled_for_their_address_only() {
    let d = Reachd::start("");
    let attacker = client_from("127.0.0.7");
    let mut statuses = Vec::new();
    for i in 0..300 {
        let r = list_services(&attacker, &d, ACCOUNT_SID, &format!("guess-{i}")).await;
        statuses.push(r.status().as_u16());
    }
    // The burst (20) is answered 401, then everything is 429.
    let unauthorized = statuses.iter().take_while(|s| **s == 401).count();
    assert_eq!(unauthorized, 20, "{statuses:?}");
    assert!(statuses[20..].iter().all(|s| *s == 429), "{statuses:?}");
    // Blocked: even the right password from that address is refused, unchecked.
    let right = list_services(&attacker, &d, ACCOUNT_SID, AUTH_TOKEN).await;
    let retry_after = assert_429(right).await;
    assert!(retry_after > 1 && retry_after <= 60, "{retry_after}");
    // Another address is served, and its own failures are its own.
    let honest = client_from("127.0.0.8");
    let ok = list_services(&honest, &d, ACCOUNT_SID, AUTH_TOKEN).await;
    assert_eq!(ok.status(), 200);
    let typo = list_services(&honest, &d, ACCOUNT_SID, "typo").await;
    assert_eq!(typo.status(), 401);
    let limited = "reach_rate_limited_total{reason=\"auth_failures\"}";
    assert_eq!(metric(&d, limited).await, 281.0);
    let logs = d.drain_logs();
    assert!(
        logs.iter()
            .any(|l| l.contains("address blocked") && l.contains("127.0.0.7")),
        "the block is logged"
    );
}

/// Opens a socket from `from` and says hello with `token`; returns it.
async fn hello_from(from: &str, to: SocketAddr, token: &str) -> Ws {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let tcp = socket.connect(to).await.unwrap();
    let url = format!("ws://{to}/v1/ws");
    let (stream, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(tcp))
            .await
            .unwrap();
    let mut ws = Ws {
        stream,
        enc: Encoding::Json,
        pings: 0,
    };
    ws.send(&ClientFrame::Hello {
        token: token.to_owned(),
        client: None,
    })
    .await;
    ws
}

#[tokio::test]
async fn forged_tokens_at_hello_are_throttled_for_their_address_only() {
    let d = Reachd::start("");
    let svc = d.client().create_service("throttled").await;
    let forged = mint(
        KEY_SID,
        "not-the-secret",
        ACCOUNT_SID,
        &svc,
        "mallory",
        3600,
    );
    let mut codes = Vec::new();
    for _ in 0..25 {
        let closed = hello_from("127.0.0.9", d.http, &forged)
            .await
            .closed()
            .await;
        codes.push((closed.error_code(), closed.code));
    }
    assert!(
        codes[..20].iter().all(|c| *c == (Some(20107), Some(4001))),
        "{codes:?}"
    );
    assert!(
        codes[20..].iter().all(|c| *c == (Some(20429), Some(4029))),
        "{codes:?}"
    );
    // A real token from the blocked address is refused too; from another one it is welcomed.
    let real = d.token(&svc, "alice");
    let blocked = hello_from("127.0.0.9", d.http, &real).await.closed().await;
    assert_eq!(
        (blocked.error_code(), blocked.code),
        (Some(20429), Some(4029))
    );
    let mut honest = hello_from("127.0.0.10", d.http, &real).await;
    assert!(matches!(honest.recv().await, ServerFrame::Welcome { .. }));
}

#[tokio::test]
async fn a_frame_flood_is_refused_then_closed_while_another_socket_is_served() {
    let d = Reachd::start_with_env(
        "",
        &[
            ("REACH_LIMITS__SOCKET_FRAMES_PER_SECOND", "1"),
            ("REACH_LIMITS__SOCKET_FRAME_BURST", "20"),
        ],
    );
    let svc = d.client().create_service("flood").await;
    let token = d.token(&svc, "mallory");
    let (mut flood, _) = Ws::hello(&d.ws_url(), &token, None).await;
    let (mut honest, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
    // 60 pings at once: the burst is answered, the next 20 refused, then the socket closed.
    let frames: Vec<Message> = (1..=60)
        .map(|id| {
            let bytes = encode(&ClientFrame::Ping { id }, Encoding::Json);
            Message::Text(Utf8Bytes::try_from(bytes).unwrap())
        })
        .collect();
    for frame in frames {
        if flood.stream.feed(frame).await.is_err() {
            break;
        }
    }
    let _ = flood.stream.flush().await;
    let closed = flood.closed().await;
    let pongs = closed
        .frames
        .iter()
        .filter(|f| matches!(f, ServerFrame::Pong { .. }))
        .count();
    let refused: Vec<Option<i64>> = closed
        .frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Error {
                id, code: 20429, ..
            } => Some(*id),
            _ => None,
        })
        .collect();
    assert!(
        (20..=21).contains(&pongs),
        "{pongs} pongs: {:?}",
        closed.frames
    );
    // Each refused ping is answered with its id; the last error (the close) has none.
    assert_eq!(refused.len(), 21, "{refused:?}");
    assert!(refused[..20].iter().all(Option::is_some), "{refused:?}");
    assert_eq!(refused[20], None);
    assert_eq!(closed.code, Some(4029));
    // The other socket is served meanwhile.
    assert!(matches!(
        honest.request(ClientFrame::Ping { id: 7 }).await,
        ServerFrame::Pong { id: 7 }
    ));
    let limited = "reach_rate_limited_total{reason=\"socket_frames\"}";
    assert_eq!(metric(&d, limited).await, 21.0 - (pongs as f64 - 20.0));
}

#[tokio::test]
async fn a_request_naming_too_many_identities_is_refused() {
    let d = Reachd::start_with_env("", &[("REACH_LIMITS__MAX_IDENTITIES_PER_REQUEST", "3")]);
    let svc = d.client().create_service("many").await;
    let (mut ws, _) = Ws::hello(&d.ws_url(), &d.token(&svc, "alice"), None).await;
    let four: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
    let refused = ws
        .request(ClientFrame::Subscribe {
            id: 1,
            identities: four.clone(),
        })
        .await;
    let ServerFrame::Error { id, code, message } = refused else {
        panic!("{refused:?}");
    };
    assert_eq!((id, code), (Some(1), 20429));
    assert!(message.contains("at most 3"), "{message}");
    let refused = ws
        .request(ClientFrame::Unsubscribe {
            id: 2,
            identities: four,
        })
        .await;
    assert!(matches!(
        refused,
        ServerFrame::Error {
            id: Some(2),
            code: 20429,
            ..
        }
    ));
    // Three are fine (they do not exist: per-identity errors, not a refusal).
    let three = ws
        .request(ClientFrame::Subscribe {
            id: 3,
            identities: ["a", "b", "c"].map(String::from).to_vec(),
        })
        .await;
    let ServerFrame::Subscribed { errors, .. } = three else {
        panic!("{three:?}");
    };
    assert_eq!(errors.len(), 3);
    // The socket is still open.
    assert!(matches!(
        ws.request(ClientFrame::Ping { id: 4 }).await,
        ServerFrame::Pong { id: 4 }
    ));
    let limited = "reach_rate_limited_total{reason=\"request_identities\"}";
    assert_eq!(metric(&d, limited).await, 2.0);
}
