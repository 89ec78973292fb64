//! `reachd`, the Reach gateway: one process that holds client WebSockets, serves the REST API
//! and exposes operator endpoints.
//!
//! - [`config`]: layered configuration (defaults, file, `REACH_*` environment), validated.
//! - [`auth`]: accounts, API keys, HTTP Basic, access tokens (verify and mint).
//! - [`rest`]: the REST surface (Services, Configuration, Users, Bindings) over the store,
//!   telling the engine about every change that subscribers must see.
//! - [`ws`]: the WebSocket endpoint; one task per socket reads frames, runs requests against
//!   the engine and the store, and writes what the connection's outbox holds.
//! - [`app`]: shared state, listeners, draining. [`metrics`]: the Prometheus registry.
//!
//! Path of one presence diff: a socket task authenticates `hello` ([`auth::verify_token`]),
//! attaches the connection in the engine (`reach_core::Engine::attach`), which publishes the
//! 0 -> 1 transition to the subscribers' outboxes; each subscriber's socket task pops its outbox
//! and writes the shared bytes.

pub mod app;
pub mod auth;
pub mod config;
pub mod metrics;
pub mod rest;
pub mod timers;
pub mod ws;

pub use app::{App, run};
pub use config::Config;
