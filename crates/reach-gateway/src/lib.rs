//! `reachd`, the Reach gateway: one process that holds client WebSockets, serves the REST API
//! and exposes operator endpoints.
//!
//! # Layout
//!
//! - [`state`]: the state every handler shares ([`App`]): engine, store, backplane, metrics,
//!   the service cache, the record-change fan-out and the REST/engine flag adapters.
//! - Handlers, which depend on `state` (and `drain`, `sync`) and on nothing above them:
//!   - [`ws`]: the WebSocket endpoint, one folder: upgrade, socket, hello, connection,
//!     session, requests (its upgrade answers refusals with `rest`'s error body);
//!   - [`rest`]: the REST API, one file per resource, with its error, extractors, JSON and
//!     paging;
//!   - [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`sync`]: background tasks that keep the store and the other nodes in step (presence
//!   changes written in batches, the recovery after a restart, record changes announced by
//!   other nodes).
//! - [`webhooks`]: delivery of the webhook events the store queues, signed, at least once and
//!   in order per user.
//! - [`drain`]: what happens on SIGTERM/SIGINT: no new sockets, `goodbye` to every
//!   connection, a bounded wait for the socket tasks.
//! - [`server`]: assembles the app and its tasks, binds and routes the listeners, serves them
//!   and drains. Only the server depends on the handlers; nothing depends back on it.
//! - Parts below all of these: [`config`] (layered configuration, validated), [`auth`]
//!   (accounts, API keys, HTTP Basic, access tokens), [`metrics`] (the Prometheus registry),
//!   [`timers`] (the sockets' shared coarse timer), [`admission`] (the cap on connections
//!   not yet authenticated), [`tls`] (the public listener's certificate, reloadable).
//! - [`commands`]: the `reachd credentials` and `reachd token` subcommands; `main.rs` reads the
//!   configuration, sets up logs and runs the server until a signal.
//!
//! Path of one presence diff: a socket task authenticates `hello` ([`auth::verify_token`]),
//! attaches the connection in the engine (`reach_core::Engine::attach`), which publishes the
//! 0 -> 1 transition to the subscribers' outboxes; each subscriber's socket task pops its outbox
//! and writes the shared bytes.

pub mod admin;
pub mod admission;
pub mod auth;
pub mod commands;
pub mod config;
pub mod drain;
pub mod listener;
pub mod metrics;
pub mod profiles;
pub mod rest;
pub mod server;
pub mod state;
pub mod sync;
pub mod throttle;
pub mod timers;
pub mod tls;
pub mod webhooks;
pub mod ws;

pub use config::Config;
pub use state::App;
