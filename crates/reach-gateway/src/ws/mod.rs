//! The WebSocket endpoint `/v1/ws` (protocol v1, `docs/protocol.md`): one task per socket.
//!
//! - [`upgrade`]: the route, the checks of the upgrade request (refused with the REST error
//!   body) and the spawn of the socket's task; on a plain connection, the same upgrade read
//!   off the connection without the HTTP server ([`direct`]);
//! - [`socket`]: one socket's WebSocket settings, reading and classifying messages, sending
//!   frames and closes, how a socket ended;
//! - [`hello`]: admission, `hello` (token and service) and the session's start, with one error
//!   type that knows its frame and close code;
//! - [`connection`]: what an authenticated connection holds ([`connection::Session`]);
//! - [`session`]: the socket task and the session loop: writes from the connection's outbox,
//!   deadlines on the shared timers, reads, the end;
//! - [`requests`]: the requests a session answers (`subscribe`, `unsubscribe`, `update_token`,
//!   push registration, ...), one function each;
//! - [`wire`]: the byte stream under tungstenite, which follows the client's frame
//!   boundaries so that a quiet socket can be parked without its stream.
//!
//! Modules depend one way: `upgrade` → `session` → `hello` → `connection` → `socket`, and
//! `requests` → `connection` (the session loop calls `Session::handle`, which `requests` adds).
//!
//! Data flow: `upgrade` answers `101` and spawns `session::serve_socket`, which runs `hello`'s
//! `prepare` (writing to the socket directly) and then the session, whose writes all come from
//! the connection's [`Outbox`](reach_core::Outbox): replies from `requests`, pushes from the
//! engine, `goodbye` from the drain. So an idle socket's task waits on its socket and outbox
//! only: no timer, no channel, no split lock of its own.

mod connection;
mod hello;
mod requests;
mod session;
mod socket;
mod upgrade;
mod wire;

pub use upgrade::router;
pub(crate) use upgrade::{Direct, direct};
