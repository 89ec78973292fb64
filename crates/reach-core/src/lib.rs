//! The Reach presence engine: who is online, who watches whom, and the diffs that flow
//! between them. No sockets, no SQL, no Redis: plain data structures and channels.
//!
//! - [`engine`]: the sharded presence map keyed by (service SID, identity), the subscription
//!   index, presence transitions with the offline grace, and fan-out of one [`outbox::Update`]
//!   to every subscriber.
//! - [`outbox`]: each connection's queue of outgoing frames, which coalesces pending updates per
//!   user when its socket falls behind and asks for a 4009 close past its memory bound.
//! - [`metrics`]: the engine's Prometheus metrics.
//!
//! Flow of one diff: the gateway calls [`engine::Engine::attach`] for an authenticated socket
//! (or `detach`, `update_profile`, `set_service`); the engine locks that user's shard, changes
//! its state, builds one `Update` and pushes it to each subscriber's outbox; each socket's
//! writer pops from its outbox and sends, encoding the frame once per encoding for everyone.

pub mod engine;
pub mod metrics;
pub mod outbox;

pub use engine::{
    Attach, ClusterEvent, Conn, ConnId, Engine, EngineConfig, PersistEvent, Presence,
    PresenceChange, PresenceClock, Profile, ServiceState, UserKey,
};
pub use metrics::EngineMetrics;
pub use outbox::{
    Events, Head, Outbox, Outgoing, PushOutcome, Sent, Sink, SlotFrame, SlotGuard, SlotId, Taken,
    Update,
};
