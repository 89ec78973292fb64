//! The socket task ([`serve_socket`]: admission and `hello`, the session, the close) and the
//! session loop: [`Session::run`] over one future per wake-up ([`Session::next_io`], one
//! unsplit stream), its writes ([`poll_write`]), its deadlines (registered with the gateway's
//! shared [`Timers`](crate::timers)) and its end ([`Session::finish`]).
//!
//! Each wake-up first writes what the outbox holds while the socket takes it (in batches,
//! flushed once per batch), then checks the session's deadlines (server pings, heartbeat
//! timeout, token warning and expiry, write stall), then reads. Writes are pulled from the
//! outbox only when the socket is ready to take them, so a wake-up that ends in a read or a
//! deadline never loses a frame. A socket whose writes make no progress for
//! `write_stall_timeout_ms` is closed with 4009 (so is one whose outbox passes
//! `max_outbox_bytes`: the outbox asks for that close itself). What a session holds is in
//! [`super::connection`], the requests it answers in [`super::requests`].

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use reach_core::{Conn, Outgoing};
use reach_proto::{CloseCode, Encoding, ErrorCode, ServerFrame};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{self, Message};

use super::connection::{BIG_BATCH, QUIET, Session, WriteState};
use super::hello::prepare;
use super::socket::{
    End, Gone, Read, Socket, answer_close, classify, close_direct, error_frame, send_message, took,
    ws_config,
};
use crate::admission::Slot;
use crate::state::App;
use crate::throttle::{FrameVerdict, Limited};

/// The upgrade of a socket and its stream's construction; `None` when the upgrade failed.
pub(super) type Setup = Pin<Box<dyn Future<Output = Option<Box<Socket>>> + Send>>;

/// The socket task: the upgrade, admission and `hello`, the session, the close; counted in
/// the metrics. `permit` is the connection's place under `limits.max_connections` (`None`:
/// past it, refused after the upgrade), held for the socket's life.
pub(super) async fn serve_socket(
    app: Arc<App>,
    setup: Setup,
    encoding: Encoding,
    permit: Option<OwnedSemaphorePermit>,
    pending: Option<Slot>,
    peer: IpAddr,
) {
    let Some(mut ws) = setup.await else {
        return;
    };
    let admitted = permit.is_some();
    let m = &app.metrics;
    m.connections.inc();
    m.connections_opened.inc();
    // Everything but the session loop runs in boxed futures that are gone once they finish:
    // an idle socket's task then holds only the session and its loop (an async fn's layout
    // reserves room for every phase it awaits inline; see docs/benchmarks.md, memory).
    let prepared = Box::pin(prepare(&app, &mut ws, encoding, admitted, pending, peer)).await;
    let end = match prepared {
        Ok(mut session) => {
            let end = loop {
                match session.run(&mut ws).await {
                    Step::End(end) => break end,
                    Step::Quiet => {
                        ws = Box::pin(rebuild(ws, &app)).await;
                        // The new stream's read side is not registered with the socket yet.
                        session.must_read = true;
                    }
                }
            };
            Box::pin(session.finish(&mut ws, end)).await;
            end
        }
        Err(end) => end,
    };
    if end == End::Gone(Gone::Closed) {
        Box::pin(answer_close(&mut ws)).await;
    }
    m.connections.dec();
    m.connections_closed.with_label_values(&[end.label()]).inc();
    tracing::debug!(reason = end.label(), "socket closed");
}

/// How a session's loop returned.
pub(super) enum Step {
    /// The connection ended.
    End(End),
    /// The socket is quiet: its stream can be rebuilt with fresh buffers ([`rebuild`]).
    Quiet,
}

/// Rebuilds a quiet socket's tungstenite stream over the same connection, so its read and
/// write buffers start again at their initial sizes (tungstenite keeps both at their
/// high-water marks: the `hello` with its token, the largest batch written). Called only when
/// tungstenite holds no unread input ([`Session::quiet`]); anything it still has to write (an
/// automatic pong) is flushed first, and a socket that does not take it keeps its stream.
async fn rebuild(mut ws: Box<Socket>, app: &App) -> Box<Socket> {
    let flushed = std::future::poll_fn(|cx| Poll::Ready(ws.poll_flush_unpin(cx))).await;
    if !matches!(flushed, Poll::Ready(Ok(()))) {
        return ws;
    }
    let io = ws.into_inner();
    let config = ws_config(&app.config.limits);
    app.metrics.streams_rebuilt.inc();
    Box::new(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await)
}

/// What one wake-up of a socket produced.
enum Io {
    /// The connection must close with this code, or the socket failed.
    Closing(Result<CloseCode, tungstenite::Error>),
    /// A deadline registered with the shared timers has come.
    Timer,
    /// Everything is written and flushed after the stream's buffers grew, and tungstenite holds
    /// no unread input: the stream can be rebuilt now.
    Rebuild,
    /// A read from the socket.
    Read(Option<Result<Message, tungstenite::Error>>),
}

impl Session {
    fn next_deadline(&self) -> Instant {
        let w = &self.w;
        let stall = Duration::from_millis(self.app.config.limits.write_stall_timeout_ms);
        let mut d = self
            .next_ping
            .min(self.last_heard + self.app.config.heartbeat_timeout())
            .min(self.expires_at);
        if let Some(warn) = self.warn_at {
            d = d.min(warn);
        }
        if let Some(b) = w.blocked_since {
            d = d.min(b + stall);
        }
        if let Some(t) = w.grown_at {
            d = d.min(t + QUIET);
        }
        d
    }

    /// The main loop; returns how the connection ends, or that the socket is quiet and its
    /// stream can be rebuilt (then it is called again).
    pub(super) async fn run(&mut self, ws: &mut Socket) -> Step {
        let encoding = self.conn.outbox.encoding();
        loop {
            let item = match self.next_io(ws).await {
                Io::Closing(Ok(code)) => return Step::End(End::Close(code)),
                Io::Closing(Err(_)) => return Step::End(End::Gone(Gone::Transport)),
                Io::Timer => {
                    // The registration that fired is the armed one (or a later, stale one).
                    if self.armed.is_some_and(|t| self.app.timers.passed(t)) {
                        self.armed = None;
                    }
                    if let Some(end) = self.tick() {
                        return Step::End(end);
                    }
                    if self.quiet(ws) {
                        return Step::Quiet;
                    }
                    continue;
                }
                Io::Rebuild => {
                    self.w.big = false;
                    self.w.grown_at = None;
                    return Step::Quiet;
                }
                Io::Read(item) => item,
            };
            took(ws, &item);
            self.last_heard = Instant::now();
            if let Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) = &item {
                self.w.grown_at = Some(self.last_heard);
                if m.len() > self.app.config.limits.read_buffer_bytes {
                    self.w.big = true;
                }
            }
            self.app.metrics.frames_received.inc();
            let read = classify(item, encoding, self.app.config.limits.max_frame_bytes);
            if matches!(read, Read::Frame(_) | Read::Nothing) && !self.take_frame(&read) {
                continue;
            }
            match read {
                Read::Nothing => {}
                Read::Gone(label) => return Step::End(End::Gone(label)),
                Read::Fail(r) => self.fail(r.code, r.message, r.close),
                // Boxed: a frame's handling (store calls) lives on the heap only while it
                // runs, instead of widening every idle socket's task.
                Read::Frame(frame) => Box::pin(self.handle(frame)).await,
            }
        }
    }

    /// Takes a token of the socket's frame bucket for what it sent; false when it was refused
    /// (`error` 20429 for a request, and close 4029 once another burst's worth was refused).
    fn take_frame(&mut self, read: &Read) -> bool {
        let Some(bucket) = &mut self.frames else {
            return true;
        };
        let verdict = bucket.check();
        if verdict == FrameVerdict::Take {
            return true;
        }
        self.app.throttles.count(Limited::SocketFrames);
        let limits = &self.app.config.limits;
        match verdict {
            FrameVerdict::Refuse(retry) => {
                if let Read::Frame(frame) = read {
                    self.push(&error_frame(
                        frame.id(),
                        ErrorCode::TooMany,
                        format!(
                            "rate limited: at most {} frames per second (burst {}); retry in {} ms",
                            limits.socket_frames_per_second,
                            limits.socket_frame_burst,
                            retry.0.as_millis().max(1)
                        ),
                    ));
                }
            }
            _ => self.fail(
                ErrorCode::TooMany,
                "rate limited: frames kept coming past the limit",
                CloseCode::RateLimited,
            ),
        }
        false
    }

    /// The socket's next event, all in one future over one unsplit stream: first writes what
    /// the outbox holds while the socket takes it (flushed once per batch), then arms the
    /// shared timer for the next deadline and checks whether it fired, then reads. Reads are
    /// polled with the connection as waker (`Conn` is `Wake`): their readiness reaches the
    /// task through the outbox as a read event, so a wake-up for writes alone (every
    /// delivery) does not poll the read side again.
    fn next_io<'a>(&'a mut self, ws: &'a mut Socket) -> impl Future<Output = Io> + 'a {
        std::future::poll_fn(move |cx| {
            if let Poll::Ready(r) = poll_write(ws, &self.conn, &mut self.w, &self.app, cx) {
                return Poll::Ready(Io::Closing(r));
            }
            let w = &self.w;
            if w.big && !w.dirty && w.blocked_since.is_none() && ws.get_ref().at_boundary() {
                return Poll::Ready(Io::Rebuild);
            }
            self.arm();
            let events = self.conn.outbox.take_events(cx.waker());
            self.must_read |= events.read;
            if events.timer {
                return Poll::Ready(Io::Timer);
            }
            if !self.must_read {
                return Poll::Pending;
            }
            let waker = Waker::from(Arc::clone(&self.conn));
            match ws.poll_next_unpin(&mut Context::from_waker(&waker)) {
                Poll::Pending => {
                    self.must_read = false;
                    Poll::Pending
                }
                read => read.map(Io::Read),
            }
        })
    }

    /// Registers the session with the shared timers for its next deadline, unless an earlier
    /// or equal registration is still to come (a later one left behind by a deadline that
    /// moved earlier only causes a check that finds nothing due). `armed` is cleared when its
    /// tick fires (`Io::Timer`), so this reads no clock: it runs on every wake-up.
    fn arm(&mut self) {
        let timers = &self.app.timers;
        let tick = timers.tick_of(self.next_deadline());
        if self.armed.is_none_or(|t| tick < t) {
            timers.arm(tick, &self.conn);
            self.armed = Some(tick);
        }
    }

    /// Whether the socket has been quiet for [`QUIET`] since its buffers last grew, with
    /// everything written and flushed and nothing read left inside tungstenite: then its
    /// stream can be rebuilt. When only the state is wrong (a partial frame read, a blocked
    /// write), it asks again after another quiet period.
    fn quiet(&mut self, ws: &Socket) -> bool {
        let Some(grown) = self.w.grown_at else {
            return false;
        };
        let now = Instant::now();
        if now < grown + QUIET {
            return false;
        }
        let w = &self.w;
        if w.dirty || w.blocked_since.is_some() || w.ping_due || !ws.get_ref().at_boundary() {
            self.w.grown_at = Some(now);
            return false;
        }
        self.w.grown_at = None;
        true
    }

    /// Timers; returns an end when the socket must go now.
    fn tick(&mut self) -> Option<End> {
        let now = Instant::now();
        let stall = Duration::from_millis(self.app.config.limits.write_stall_timeout_ms);
        if self.w.blocked_since.is_some_and(|b| now >= b + stall) {
            // The socket takes nothing: no error frame could reach the client.
            return Some(End::Close(CloseCode::SlowConsumer));
        }
        if now >= self.last_heard + self.app.config.heartbeat_timeout() {
            self.app.metrics.heartbeat_timeouts.inc();
            self.fail(
                ErrorCode::Timeout,
                "nothing heard within heartbeat_timeout",
                CloseCode::HeartbeatTimeout,
            );
            self.last_heard = now;
            return None;
        }
        if now >= self.expires_at {
            self.app
                .metrics
                .auth_failures
                .with_label_values(&["expired"])
                .inc();
            self.fail(
                ErrorCode::TokenExpired,
                "the access token has expired",
                CloseCode::Unauthorized,
            );
            self.expires_at = now + Duration::from_secs(3600);
            self.warn_at = None;
            return None;
        }
        if self.warn_at.is_some_and(|t| now >= t) {
            self.warn_at = None;
            self.push(&ServerFrame::TokenAboutToExpire {
                expires_at: self.token_expires_at,
            });
        }
        if now >= self.next_ping {
            self.w.ping_due = true;
            self.next_ping = now + self.app.config.heartbeat_interval();
        }
        None
    }

    /// Leaves the engine (presence rules apply) and closes the socket as `end` says.
    pub(super) async fn finish(mut self, ws: &mut Socket, end: End) {
        let watched = self.watched.take();
        self.app.engine.detach(&self.conn, &watched, self.bye);
        if let End::Close(code) = end {
            let reason = match code {
                CloseCode::Normal => "bye",
                CloseCode::GoingAway => "draining",
                other => other.label(),
            };
            let encoding = self.conn.outbox.encoding();
            close_direct(ws, encoding, None, code, reason).await;
        }
    }
}

/// Writes what the outbox holds while the socket takes it; flushes once per batch.
/// Ready only when the connection must close (`Ok(code)`) or the socket failed.
fn poll_write(
    ws: &mut Socket,
    conn: &Conn,
    w: &mut WriteState,
    app: &App,
    cx: &mut Context<'_>,
) -> Poll<Result<CloseCode, tungstenite::Error>> {
    let encoding = conn.outbox.encoding();
    loop {
        match ws.poll_ready_unpin(cx) {
            Poll::Pending => {
                w.blocked_since.get_or_insert_with(Instant::now);
                return Poll::Pending;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => w.blocked_since = None,
        }
        if w.ping_due {
            w.ping_due = false;
            ws.start_send_unpin(Message::Ping(Bytes::new()))?;
            w.dirty = true;
            continue;
        }
        match conn.outbox.pop(cx.waker()) {
            Some(Outgoing::Message(bytes)) => {
                w.batch_bytes += bytes.len();
                send_message(ws, bytes, encoding, app.config.limits.write_fragment_bytes)?;
                app.metrics.frames_sent.inc();
                w.dirty = true;
                w.grown_at = Some(Instant::now());
            }
            Some(Outgoing::Close(code)) => {
                return flush_dirty(ws, w, cx).map_ok(|()| code);
            }
            None => {
                return match flush_dirty(ws, w, cx) {
                    Poll::Ready(Ok(())) => {
                        w.blocked_since = None;
                        Poll::Pending
                    }
                    other => other.map_ok(|()| CloseCode::Normal),
                };
            }
        }
    }
}

/// Flushes what was written since the last flush; notes when the socket blocks.
fn flush_dirty(
    ws: &mut Socket,
    w: &mut WriteState,
    cx: &mut Context<'_>,
) -> Poll<Result<(), tungstenite::Error>> {
    if !w.dirty {
        return Poll::Ready(Ok(()));
    }
    match ws.poll_flush_unpin(cx) {
        Poll::Pending => {
            w.blocked_since.get_or_insert_with(Instant::now);
            Poll::Pending
        }
        Poll::Ready(result) => {
            if result.is_ok() {
                w.dirty = false;
                w.big |= w.batch_bytes >= BIG_BATCH;
                w.batch_bytes = 0;
            }
            Poll::Ready(result)
        }
    }
}
