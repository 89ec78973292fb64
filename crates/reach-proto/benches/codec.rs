//! Encoding and decoding of the hot frames in both encodings: `user_updated` (server push,
//! encoded once per diff), `subscribe` and `hello` (client requests, decoded per frame).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use reach_proto::{
    ClientFrame, Encoding, ServerFrame, UpdateReason, User, decode_client, decode_server, encode,
};

fn user_updated() -> ServerFrame {
    ServerFrame::UserUpdated {
        user: User {
            identity: "u12345".into(),
            friendly_name: Some("Alice Example".into()),
            attributes: r#"{"team":"blue","level":3}"#.into(),
            is_online: Some(true),
            is_notifiable: None,
            last_seen_at: None,
        },
        reasons: vec![UpdateReason::ReachabilityOnline],
    }
}

fn subscribe() -> ClientFrame {
    ClientFrame::Subscribe {
        id: 42,
        identities: (0..10).map(|i| format!("u{i}")).collect(),
    }
}

fn hello() -> ClientFrame {
    ClientFrame::Hello {
        token: "x".repeat(420),
        client: Some("reach-loadtest/0.1".into()),
    }
}

fn bench(c: &mut Criterion) {
    for enc in Encoding::ALL {
        let name = match enc {
            Encoding::Json => "json",
            Encoding::MsgPack => "msgpack",
        };
        let mut g = c.benchmark_group(format!("codec_{name}"));
        let frame = user_updated();
        g.bench_function("encode_user_updated", |b| {
            b.iter(|| encode(black_box(&frame), enc))
        });
        let bytes = encode(&frame, enc);
        g.bench_function("decode_user_updated", |b| {
            b.iter(|| decode_server(black_box(&bytes), enc).unwrap())
        });
        let sub = encode(&subscribe(), enc);
        g.bench_function("decode_subscribe_10", |b| {
            b.iter(|| decode_client(black_box(&sub), enc).unwrap())
        });
        let h = encode(&hello(), enc);
        g.bench_function("decode_hello", |b| {
            b.iter(|| decode_client(black_box(&h), enc).unwrap())
        });
        let ping = encode(&ClientFrame::Ping { id: 7 }, enc);
        g.bench_function("decode_ping", |b| {
            b.iter(|| decode_client(black_box(&ping), enc).unwrap())
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
