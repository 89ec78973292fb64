//! Access-token verification (HS256 JWT), done once per `hello` and per `update_token`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use reach_gateway::auth::{Credentials, mint_token, verify_token};
use reach_gateway::config::{AccountConfig, ApiKeyConfig};

fn bench(c: &mut Criterion) {
    // Test fixtures, not secrets.
    let account = AccountConfig {
        sid: "AC0123456789abcdef0123456789abcdef".parse().unwrap(),
        auth_token: "bench-fixture-auth-token".into(),
    };
    let key = ApiKeyConfig {
        sid: "SK0123456789abcdef0123456789abcdef".parse().unwrap(),
        secret: "bench-fixture-key-secret".into(),
        account_sid: account.sid.clone(),
    };
    let creds = Credentials::new(&[account], std::slice::from_ref(&key));
    let now = 1_800_000_000;
    let token = mint_token(
        &key,
        &"IS0123456789abcdef0123456789abcdef".parse().unwrap(),
        "alice",
        3600,
        now,
    );
    assert!(verify_token(&creds, &token, now).is_ok());
    c.bench_function("verify_token_hs256", |b| {
        b.iter(|| verify_token(&creds, black_box(&token), now).unwrap())
    });
    let bad = format!("{}x", &token[..token.len() - 1]);
    c.bench_function("verify_token_bad_signature", |b| {
        b.iter(|| verify_token(&creds, black_box(&bad), now).is_err())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
