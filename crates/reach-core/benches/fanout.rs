//! One presence diff fanned out to 10,000 subscribers: the engine's publish (one `Update`
//! pushed to every subscriber's outbox) and the writers' side (each outbox popped, the frame
//! encoded once per encoding and shared).

use std::hint::black_box;
use std::sync::Arc;
use std::task::Waker;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use reach_core::{
    Conn, Engine, EngineConfig, EngineMetrics, Outgoing, Profile, ServiceState, SlotFrame,
};
use reach_proto::Encoding;

const SERVICE: &str = "IS00000000000000000000000000000001";
const WATCHERS: usize = 10_000;

fn profile() -> Profile {
    Profile {
        revision: 1,
        friendly_name: Some("Alice".into()),
        attributes: "{}".into(),
        binding_count: 0,
        ever_had_binding: false,
        online_epoch: 0,
        last_seen_at: None,
    }
}

fn drain(conns: &[Arc<Conn>]) -> usize {
    let mut n = 0;
    for c in conns {
        while let Some(Outgoing::Message(b)) = c.outbox.pop(Waker::noop()) {
            n += b.len();
        }
    }
    n
}

/// An engine where `WATCHERS` connections (half JSON, half MessagePack) watch `alice`.
fn setup() -> (Arc<Engine>, Vec<Arc<Conn>>) {
    let engine = Engine::new(EngineConfig::default(), EngineMetrics::unregistered(), None);
    engine.set_service(
        SERVICE,
        ServiceState {
            enabled: true,
            epoch: 1,
        },
    );
    let mut conns = Vec::with_capacity(WATCHERS);
    for i in 0..WATCHERS {
        let enc = if i % 2 == 0 {
            Encoding::Json
        } else {
            Encoding::MsgPack
        };
        let conn = engine.new_conn(SERVICE, &format!("w{i}"), enc);
        let slot = conn
            .outbox
            .reserve(SlotFrame::Subscribed {
                id: 1,
                users: vec![],
                errors: vec![],
            })
            .unwrap();
        engine.subscribe(&conn, "alice", slot);
        engine.load_profile(SERVICE, "alice", profile());
        engine.fill(&conn, "alice", slot);
        conn.outbox.seal(slot);
        conns.push(conn);
    }
    drain(&conns);
    (engine, conns)
}

/// alice comes online (one diff) or leaves with `bye` (one diff).
fn flap(engine: &Arc<Engine>, online: bool, alice: &mut Option<Arc<Conn>>) {
    if online {
        let conn = engine.new_conn(SERVICE, "alice", Encoding::Json);
        let slot = conn
            .outbox
            .reserve(SlotFrame::Welcome {
                connection_id: "CN1".into(),
                identity: "alice".into(),
                service_sid: SERVICE.into(),
                reachability_enabled: true,
                heartbeat_interval_ms: 10_000,
                token_expires_at: 0,
                user: None,
            })
            .unwrap();
        engine.attach(&conn, slot);
        conn.outbox.seal(slot);
        *alice = Some(conn);
    } else if let Some(conn) = alice.take() {
        engine.detach(&conn, &[], true);
    }
}

fn bench(c: &mut Criterion) {
    let (engine, conns) = setup();
    let mut alice = None;
    let mut online = false;
    let mut g = c.benchmark_group("fanout_10k");
    g.throughput(Throughput::Elements(WATCHERS as u64));
    g.sample_size(30);
    g.bench_function("publish", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                online = !online;
                let t = std::time::Instant::now();
                flap(&engine, online, &mut alice);
                total += t.elapsed();
                black_box(drain(&conns));
            }
            total
        })
    });
    g.bench_function("publish_and_drain", |b| {
        b.iter(|| {
            online = !online;
            flap(&engine, online, &mut alice);
            black_box(drain(&conns))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
