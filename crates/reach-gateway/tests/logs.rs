//! Secrets never reach the logs: with `debug` logging, a wrong and a right REST password, a
//! forged and a real access token (at `hello` and in `update_token`) leave no trace of
//! themselves in anything reachd writes.

mod common;
mod ws_client;

use base64::Engine as _;
use common::*;
use reach_proto::{ClientFrame, ServerFrame};
use ws_client::Ws;

#[tokio::test]
async fn passwords_and_tokens_are_never_logged() {
    let d = Reachd::start_with_env("", &[("REACH_LOG__FILTER", "debug")]);
    let wrong = "wrong-password-0123456789abcdef";
    let r = d.client_as(ACCOUNT_SID, wrong).get("/Services").await;
    assert_eq!(r.status, 401);
    let svc = d.client().create_service("logs").await;
    let real = d.token(&svc, "alice");
    let forged = mint(
        KEY_SID,
        "forged-secret-for-the-test",
        ACCOUNT_SID,
        &svc,
        "alice",
        3600,
    );
    let mut bad = Ws::connect(&d.ws_url(), None).await;
    bad.send(&ClientFrame::Hello {
        token: forged.clone(),
        client: None,
    })
    .await;
    assert_eq!(bad.closed().await.code, Some(4001));
    let (mut ws, _) = Ws::hello(&d.ws_url(), &real, None).await;
    let renewed = mint(KEY_SID, KEY_SECRET, ACCOUNT_SID, &svc, "alice", 7200);
    let reply = ws
        .request(ClientFrame::UpdateToken {
            id: 1,
            token: renewed.clone(),
        })
        .await;
    assert!(
        matches!(reply, ServerFrame::TokenUpdated { .. }),
        "{reply:?}"
    );
    ws.send(&ClientFrame::Bye).await;
    let _ = ws.closed().await;
    // Everything logged so far, from the start on.
    let mut logs: Vec<String> = d.startup_logs().to_vec();
    let deadline = std::time::Instant::now() + ws_client::WAIT;
    while !logs.iter().any(|l| l.contains("socket closed")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no debug log of the close"
        );
        logs.extend(d.drain_logs());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    logs.extend(d.drain_logs());
    assert!(logs.len() > 10, "debug logging is on: {logs:?}");
    let basic = |password: &str| {
        base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT_SID}:{password}"))
    };
    let signature = |token: &str| token.rsplit('.').next().unwrap().to_owned();
    let secrets = [
        wrong.to_owned(),
        AUTH_TOKEN.to_owned(),
        KEY_SECRET.to_owned(),
        basic(wrong),
        basic(AUTH_TOKEN),
        signature(&real),
        signature(&forged),
        signature(&renewed),
    ];
    for line in &logs {
        for secret in &secrets {
            assert!(
                !line.contains(secret.as_str()),
                "{secret} in the log: {line}"
            );
        }
    }
}
