//! Messages between the coordinator and its worker processes: one JSON object per line, the
//! coordinator writing to a worker's stdin and reading its stdout.
//!
//! Run order: `Plan` -> every worker connects its users -> `Reached(Connected)` -> `Go(Subscribe)`
//! -> `Reached(Subscribed)` -> `Go(Run)` (the scenario's active phase) -> `Reached(Ran)` ->
//! `Go(Settle)` -> each worker sends the `Truth` of the users it owns -> the coordinator sends the
//! merged truth to all -> each compares its watchers' views and sends `Done`.
//! `Event`s (a user's visible presence change) are relayed by the coordinator to the other
//! workers when the user has watchers there, so their latencies can be measured.

use serde::{Deserialize, Serialize};

use crate::peer::Target;
use crate::scenario::Scenario;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Connected,
    Subscribe,
    Subscribed,
    Run,
    Ran,
    Settle,
}

/// What a worker needs to know to play its part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub scenario: Scenario,
    pub worker: u32,
    pub target: Target,
    /// `ws://HOST:PORT/v1/ws` (reach), `ws://HOST:PORT/app/<key>?...` (pusher),
    /// `mqtt://HOST:PORT` (mqtt).
    pub url: String,
    /// Pusher: the app's key and secret (subscriptions to presence channels are signed).
    pub app_key: String,
    pub app_secret: String,
    pub service_sid: String,
    pub account_sid: String,
    pub key_sid: String,
    pub key_secret: String,
    /// A PEM CA certificate to trust (besides the system's) for `wss://` URLs.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

/// How an event happened (one latency histogram each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Connect,
    Bye,
    Abrupt,
    Silent,
}

impl EventKind {
    pub const ALL: [EventKind; 4] = [
        EventKind::Connect,
        EventKind::Bye,
        EventKind::Abrupt,
        EventKind::Silent,
    ];
    pub fn index(self) -> usize {
        self as usize
    }
    pub fn label(self) -> &'static str {
        match self {
            EventKind::Connect => "connect_to_online",
            EventKind::Bye => "bye_to_offline",
            EventKind::Abrupt => "abrupt_close_to_offline",
            EventKind::Silent => "silent_peer_to_offline",
        }
    }
}

/// A presence change of a user that its watchers must see.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Event {
    pub user: u32,
    pub online: bool,
    pub kind: EventKind,
    /// When the harness caused it (`hello` sent, `bye` sent, socket reset, peer went silent).
    pub t0_ns: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ToWorker {
    Plan(Box<Plan>),
    Go {
        phase: Phase,
    },
    Event(Event),
    /// Final presence of every user (index = user).
    Truth {
        online: Vec<bool>,
    },
}

/// One second of a worker's activity.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tick {
    pub sockets_in: u32,
    pub connects: u64,
    pub notifications: u64,
    pub errors: u64,
    /// Notification latencies (connect and bye events only) resolved in this second.
    pub prompt_hist: String,
}

/// What a worker measured, sent once at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    /// One histogram per [`EventKind`], base64.
    pub latency: Vec<String>,
    /// TCP connect + WebSocket upgrade.
    pub upgrade_hist: String,
    /// `hello` sent -> `welcome` read.
    pub hello_hist: String,
    /// `subscribe` sent -> `subscribed` read.
    pub subscribe_hist: String,
    pub connects: u64,
    pub notifications: u64,
    /// Notifications received during the active phase.
    pub run_notifications: u64,
    /// Visible events this worker caused (each should reach every watcher).
    pub events: u64,
    /// Notifications whose latency was resolved against an event.
    pub matched: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub unexpected_closes: u64,
    /// Notifications that repeated the state the watcher already had.
    pub spurious_repeat: u64,
    /// Notifications contradicting the user's latest visible event (e.g. offline inside grace).
    pub spurious_state: u64,
    /// `subscribed` replies that showed a user offline during a storm.
    pub spurious_snapshot: u64,
    /// Notifications of users with no visible event at all.
    pub unmatched: u64,
    /// Notifications that arrived after a newer, opposite event (matched to the older one).
    pub late: u64,
    /// Watched users whose final view differs from the truth.
    pub final_mismatch: u64,
    /// Storm: when the last socket of this worker was back (subscribed), wall clock ns.
    pub converged_ns: Option<u64>,
    pub cpu_s: f64,
    pub rss_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum FromWorker {
    Reached {
        phase: Phase,
    },
    Event(Event),
    Tick(Tick),
    Truth {
        start: u32,
        online: Vec<bool>,
    },
    Done(Box<WorkerResult>),
    /// A fatal problem; the worker exits after it.
    Fatal {
        message: String,
    },
}
