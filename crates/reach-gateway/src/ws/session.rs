//! The socket task ([`serve_socket`]: admission and `hello`, the session, the close) and the
//! session loop: [`Session::run`] over one future per wake-up ([`Session::next_io`], one
//! unsplit stream), its writes ([`poll_write`]), its deadlines (registered with the gateway's
//! shared [`Timers`](crate::timers)) and its end ([`Session::finish`]).
//!
//! Each wake-up first writes what the outbox holds while the socket takes it (in batches,
//! flushed once per batch), then checks the session's deadlines (server pings, heartbeat
//! timeout, token warning and expiry, write stall), then reads. Writes are pulled from the
//! outbox only when the socket is ready to take them (a small message written past
//! tungstenite that the connection takes only in part is kept whole by the wire), so a
//! wake-up that ends in a read or a deadline never loses a frame. A socket whose writes make no progress for
//! `write_stall_timeout_ms` is closed with 4009 (so is one whose outbox passes
//! `max_outbox_bytes`: the outbox asks for that close itself). What a session holds is in
//! [`super::connection`], the requests it answers in [`super::requests`].
//!
//! A quiet socket is parked ([`Session::park`]): its WebSocket stream is taken apart and only
//! the connection under it is kept until it has something to write that needs a stream (a
//! reply, a long message, the close, anything over TLS; small updates and server pings are
//! sent on the connection itself, [`Session::write_parked`], [`Session::ping_parked`]) or the
//! client writes anything but a lone pong; then a new stream is built over the same
//! connection.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use reach_core::{Conn, Events, Head, Outgoing, Taken};
use reach_proto::{ClientFrame, CloseCode, Encoding, ErrorCode, ServerFrame};
use sync_wrapper::SyncWrapper;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::tungstenite::{self, Message};

use super::connection::{At, BIG_BATCH, MAX_BUSY_CHECKS, QUIET, Session, WriteState};
use super::hello::prepare;
use super::socket::{
    End, Gone, Link, PING_FRAME, Read, Socket, answer_close, classify, close_direct, direct_max,
    error_frame, is_lone_pong, send_message, send_parked, stream_over, took, write_direct,
};
use super::wire::{SendNow, send_whole};
use crate::admission::Slot;
use crate::state::App;
use crate::throttle::{FrameVerdict, Limited};

/// The upgrade of a socket and its stream's construction; `None` when the upgrade failed.
pub(super) type Setup = Pin<Box<dyn Future<Output = Option<Box<Socket>>> + Send>>;

/// What a socket's task starts with (boxed: an async fn keeps its arguments for its whole
/// life, and these are mostly used up by `hello`).
pub(super) struct Start {
    pub app: Arc<App>,
    /// The upgrade and the stream's construction.
    pub setup: Setup,
    pub encoding: Encoding,
    /// The connection's place under `limits.max_connections` (`None`: past it, refused after
    /// the upgrade), held by the session for its life.
    pub permit: Option<OwnedSemaphorePermit>,
    /// The connection's place among the pending ones, until `welcome`.
    pub pending: Option<Slot>,
    pub peer: IpAddr,
}

/// The socket task: the upgrade, admission and `hello`, the session, the close; counted in
/// the metrics.
pub(super) async fn serve_socket(start: Box<Start>) {
    // Everything but the session loop runs in boxed futures that are gone once they finish:
    // an idle socket's task then holds only the session's box, the stream's and its loop (an
    // async fn's layout reserves room for every phase it awaits inline, and keeps its
    // arguments for its whole life; see docs/benchmarks.md, memory).
    let Some((mut ws, mut session)) = Box::pin(open(start)).await else {
        return;
    };
    // The closing handshakes run while the session (with the connection's permit) is held:
    // in `finish`, or in `prepare` when `hello` failed.
    loop {
        match session.run(&mut ws).await {
            Step::End(end) => {
                let app = Arc::clone(&session.app);
                Box::pin(session.finish(&mut ws, end)).await;
                closed(&app, end);
                return;
            }
            Step::Quiet => match session.park(ws).await {
                Ok(back) => ws = back,
                // Gone while parked: nothing more to send.
                Err(end) => {
                    session.leave();
                    closed(&session.app, end);
                    return;
                }
            },
        }
    }
}

/// Counts a socket's end.
fn closed(app: &App, end: End) {
    let m = &app.metrics;
    m.connections.dec();
    m.connections_closed.with_label_values(&[end.label()]).inc();
    tracing::debug!(reason = end.label(), "socket closed");
}

/// The upgrade, the stream's construction, admission and `hello`; `None` when the upgrade
/// failed or `hello` did not lead to a session (the socket is closed then, and counted). The
/// session keeps the connection's permit.
async fn open(start: Box<Start>) -> Option<(Box<Socket>, Box<Session>)> {
    let Start {
        app,
        setup,
        encoding,
        permit,
        pending,
        peer,
    } = *start;
    let mut ws = setup.await?;
    app.metrics.connections.inc();
    app.metrics.connections_opened.inc();
    match prepare(&app, &mut ws, encoding, permit, pending, peer).await {
        Ok(session) => Some((ws, session)),
        Err(end) => {
            closed(&app, end);
            None
        }
    }
}

/// How a session's loop returned.
pub(super) enum Step {
    /// The connection ended.
    End(End),
    /// The socket is quiet: it can be parked ([`Session::park`]).
    Quiet,
}

/// What woke a parked socket.
enum Parked {
    /// Something to write that needs the stream (a reply, a long message, the close, anything
    /// over TLS), or the rest of a small message or ping the connection did not take whole (to
    /// go out first; boxed: it is rare, and an 8-byte box keeps this no larger than before,
    /// which a parked socket's task is measured against).
    Write(Option<Box<Bytes>>),
    /// A deadline registered with the shared timers has come.
    Timer,
    /// The client sent these bytes (the start of its next frame, or more).
    Read(Vec<u8>),
    /// The connection ended (or failed) while parked.
    Gone(Gone),
}

/// How many bytes a parked socket reads at once when the client writes, into a buffer on the
/// worker thread's stack; what it read goes into the new stream's read buffer.
const PARKED_READ: usize = 4096;

/// Counts a socket in `reach_ws_sockets_parked` while it lives (also if the task is dropped
/// while parked).
struct ParkedGauge(prometheus::IntGauge);

impl ParkedGauge {
    fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        ParkedGauge(gauge.clone())
    }
}

impl Drop for ParkedGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the session loop does after a wake-up ([`Session::on_io`]).
enum Next {
    /// Waits for the next wake-up.
    Wait,
    /// Returns from the loop.
    Return(Step),
    /// Handles a request that waits on the store.
    Handle(ClientFrame),
}

/// The connection under a stream, which tungstenite holds no unread input of (the `Wire` is at
/// a boundary, so a new one starts where it stopped). A function of its own, so that the
/// stream's box is freed here: a box moved out of (`ws.into_inner()` on a `Box`) is only freed
/// when the box's own variable goes, and an async fn keeps its arguments for its whole life.
fn take_apart(ws: Box<Socket>) -> Link {
    let ws: Socket = *ws;
    ws.into_inner().into_inner()
}

/// A parked socket's new stream over its connection, with what the client wrote while it was
/// parked as the start of its read buffer. Boxed: its construction (the connection and the
/// settings, moved in) would otherwise widen every parked socket's task.
fn unpark(
    link: Link,
    part: Vec<u8>,
    owed: Option<Box<Bytes>>,
    app: &App,
) -> Pin<Box<impl Future<Output = Socket> + use<>>> {
    let owed = owed.map_or_else(Bytes::new, |rest| *rest);
    Box::pin(stream_over(link, part, owed, &app.config.limits))
}

/// What a parked socket's write of the outbox's next message did ([`Session::write_parked`]).
enum Wrote {
    /// Nothing can be sent now.
    Nothing,
    /// A small message went out whole.
    Whole,
    /// The rest needs the stream: what the connection did not take of a message (`None`: it
    /// took nothing from the outbox).
    Stream(Option<Box<Bytes>>),
    /// The connection failed.
    Failed,
}

/// What one wake-up of a socket produced.
enum Io {
    /// The connection must close with this code, or the socket failed.
    Closing(Result<CloseCode, tungstenite::Error>),
    /// A deadline registered with the shared timers has come.
    Timer,
    /// Everything is written and flushed after the stream's buffers grew, and tungstenite holds
    /// no unread input: the socket can be parked now.
    Park,
    /// A read from the socket.
    Read(Option<Result<Message, tungstenite::Error>>),
}

impl Session {
    fn next_deadline(&self) -> At {
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
        if let Some(t) = w.quiet_check() {
            d = d.min(t);
        }
        d
    }

    /// The main loop; returns how the connection ends, or that the socket is quiet and can be
    /// parked (then it is called again). Only the boxed handling of a request is awaited
    /// besides the socket: what a wake-up brought is dealt with in [`Session::on_io`], so no
    /// read message is kept in the task across an await (every idle socket's task would
    /// reserve room for one).
    pub(super) async fn run(&mut self, ws: &mut Socket) -> Step {
        loop {
            let io = self.next_io(ws).await;
            let frame = match self.on_io(ws, io) {
                Next::Wait => continue,
                Next::Return(step) => return step,
                Next::Handle(frame) => frame,
            };
            // Boxed: a frame's handling (store calls) lives on the heap only while it runs,
            // instead of widening every idle socket's task. Frames that need no store were
            // answered in `on_io`.
            Box::pin(self.handle(frame)).await;
        }
    }

    /// Deals with one wake-up's event: a deadline, a park, a read (classified, counted
    /// against the frame limit, refused when bad).
    fn on_io(&mut self, ws: &mut Socket, io: Io) -> Next {
        let item = match io {
            Io::Closing(Ok(code)) => return Next::Return(Step::End(End::Close(code))),
            Io::Closing(Err(_)) => return Next::Return(Step::End(End::Gone(Gone::Transport))),
            Io::Timer => {
                if let Some(end) = self.on_timer() {
                    return Next::Return(Step::End(end));
                }
                if self.quiet(ws) {
                    return Next::Return(Step::Quiet);
                }
                return Next::Wait;
            }
            Io::Park => {
                self.w.big = false;
                self.w.grown_at = None;
                self.w.busy_checks = 0;
                return Next::Return(Step::Quiet);
            }
            Io::Read(item) => item,
        };
        took(ws, &item);
        self.last_heard = At::now();
        if let Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) = &item {
            self.w.grown_at = Some(self.last_heard);
            if m.len() > self.app.config.limits.read_buffer_bytes {
                self.w.big = true;
            }
        }
        self.app.metrics.frames_received.inc();
        let encoding = self.conn.outbox.encoding();
        let read = classify(item, encoding, self.app.config.limits.max_frame_bytes);
        if matches!(read, Read::Frame(_) | Read::Nothing) && !self.take_frame(&read) {
            return Next::Wait;
        }
        match read {
            Read::Nothing => Next::Wait,
            Read::Gone(label) => Next::Return(Step::End(End::Gone(label))),
            Read::Fail(r) => {
                self.fail(r.code, r.message, r.close);
                Next::Wait
            }
            // Most frames are answered here; only those that wait on the store go on.
            Read::Frame(frame) => match self.handle_at_once(frame) {
                None => Next::Wait,
                Some(frame) => Next::Handle(frame),
            },
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
            if let Some(rest) = self.take_back() {
                // The rest of a frame the fan-out sent in part: out first, with the next flush.
                ws.get_mut().owe(rest);
                self.w.direct = false;
                self.w.dirty = true;
            }
            let mut taken = None;
            if let Poll::Ready(r) =
                poll_write(ws, &self.conn, &mut self.w, &self.app, cx, &mut taken)
            {
                return Poll::Ready(Io::Closing(r));
            }
            // The events the writer took with its last message, if it got that far (else they
            // are taken below, after arming).
            if let Some(events) = taken {
                self.must_read |= events.read;
                if events.timer {
                    return Poll::Ready(Io::Timer);
                }
            }
            let w = &self.w;
            if w.big && !w.dirty && w.blocked_since.is_none() && ws.get_ref().at_boundary() {
                return Poll::Ready(Io::Park);
            }
            self.arm();
            if taken.is_none() {
                let events = self.conn.outbox.take_events(cx.waker());
                self.must_read |= events.read;
                if events.timer {
                    return Poll::Ready(Io::Timer);
                }
            }
            if !self.must_read {
                let w = &self.w;
                if w.direct && !w.dirty && w.blocked_since.is_none() {
                    self.lend();
                }
                return Poll::Pending;
            }
            let waker = Waker::from(Arc::clone(&self.conn));
            // A read may queue (and partly write) an automatic pong: frames go through the
            // stream until its next flush.
            self.w.direct = false;
            match ws.poll_next_unpin(&mut Context::from_waker(&waker)) {
                Poll::Pending => {
                    self.must_read = false;
                    Poll::Pending
                }
                read => read.map(Io::Read),
            }
        })
    }

    /// Registers the session with the shared timers for its next deadline, unless a
    /// registration for an earlier or equal deadline, or one at an earlier or equal tick, is
    /// still to come (a later one left behind by a deadline that moved earlier only causes a
    /// check that finds nothing due). `armed` is cleared when its tick fires
    /// ([`Session::on_timer`]), so this reads no clock, and while the deadlines only move later
    /// (every delivery moves `grown_at`) it is a few comparisons: it runs on every wake-up.
    /// Hence whoever takes the outbox's events must act on a timer event before returning
    /// anything else: a registration left noted after its tick passed is never renewed.
    fn arm(&mut self) {
        let deadline = self.next_deadline();
        match self.armed {
            Some(armed) if armed <= deadline => {}
            armed => {
                let timers = &self.app.timers;
                let tick = timers.tick_of(deadline.instant());
                if armed.is_none_or(|a| tick < timers.tick_of(a.instant())) {
                    timers.arm(tick, &self.conn);
                }
                // Same tick as the registration (or a new one): it covers this deadline.
                self.armed = Some(deadline);
            }
        }
    }

    /// Whether the socket has been quiet for [`QUIET`] since its buffers last grew, with
    /// everything written and flushed and nothing read left inside tungstenite: then its
    /// socket can be parked. When only the state is wrong (a partial frame read, a blocked
    /// write), it asks again after another quiet period. A check that finds the socket busy
    /// (it wrote or read within the last [`QUIET`]) makes the next one wait longer
    /// ([`WriteState::quiet_check`](super::connection::WriteState::quiet_check)).
    fn quiet(&mut self, ws: &Socket) -> bool {
        let Some(grown) = self.w.grown_at else {
            return false;
        };
        let now = At::now();
        if now < grown + QUIET {
            self.w.busy_checks = (self.w.busy_checks + 1).min(MAX_BUSY_CHECKS);
            return false;
        }
        let w = &self.w;
        if w.ping_due {
            // A server ping goes out in this wake-up (a ping does not grow the buffers): the
            // next wake-up, at the check's deadline or one tick later if it has passed, parks.
            return false;
        }
        if w.dirty || w.blocked_since.is_some() || !ws.get_ref().at_boundary() {
            self.w.grown_at = Some(now);
            return false;
        }
        self.w.grown_at = None;
        self.w.busy_checks = 0;
        true
    }

    /// Parks a quiet socket: takes its WebSocket stream apart (after flushing what tungstenite
    /// still has to write, such as an automatic pong; a socket that does not take it keeps its
    /// stream) and keeps only the connection under it, with no buffer of its own, until the
    /// socket has something to write that needs a stream (see [`Session::write_parked`] and
    /// [`Session::ping_parked`]) or the client writes anything but a lone pong. Then
    /// builds a new stream over the same connection, with what the client wrote as the start
    /// of its read buffer. Called only when tungstenite holds no unread input
    /// ([`Session::quiet`]). `Err`: the connection ended while parked.
    async fn park(&mut self, mut ws: Box<Socket>) -> Result<Box<Socket>, End> {
        // A flag, not the flush's result: only that is kept in the task across the wait.
        let flushed = matches!(
            std::future::poll_fn(|cx| Poll::Ready(ws.poll_flush_unpin(cx))).await,
            Poll::Ready(Ok(()))
        );
        if !flushed {
            // Asked again after another quiet second.
            self.w.grown_at = Some(At::now());
            return Ok(ws);
        }
        self.parked = Some(SyncWrapper::new(take_apart(ws)));
        self.conn.outbox.shrink();
        self.app.metrics.streams_parked.inc();
        // Reads are polled with the connection as waker from here on (see `next_parked`).
        self.must_read = true;
        let (part, owed) = {
            let _gauge = ParkedGauge::new(&self.app.metrics.sockets_parked);
            let woke = loop {
                match self.next_parked().await {
                    Parked::Timer => {
                        // A parked socket has nothing blocked, so no deadline ends it here; a
                        // close that `tick` asks for (none today) would still go out in order.
                        if let Some(End::Close(code)) = self.on_timer() {
                            self.conn.outbox.close(code);
                        }
                    }
                    woke => break woke,
                }
            };
            match woke {
                Parked::Read(read) => (read, None),
                Parked::Gone(gone) => return Err(End::Gone(gone)),
                Parked::Write(owed) => (Vec::new(), owed),
                Parked::Timer => (Vec::new(), None),
            }
        };
        self.must_read = true;
        self.w.grown_at = Some(At::now());
        let link = self
            .parked
            .take()
            .expect("a parked socket keeps its connection")
            .into_inner();
        // The new stream has written nothing; the rest of a frame the connection took only in
        // part goes out first, with the next flush.
        self.w.direct = owed.is_none();
        self.w.dirty = owed.is_some();
        Ok(Box::new(unpark(link, part, owed, &self.app).await))
    }

    /// A parked socket's next event: arms the shared timer, then checks for something to
    /// write, a deadline, and bytes from the client (read into a buffer on the stack).
    fn next_parked(&mut self) -> impl Future<Output = Parked> + '_ {
        std::future::poll_fn(move |cx| {
            if let Some(rest) = self.take_back() {
                // The rest of a frame the fan-out sent in part: the new stream sends it first.
                return Poll::Ready(Parked::Write(Some(Box::new(rest))));
            }
            self.arm();
            // Registers the waker first, so an item queued after the check below wakes it.
            let events = self.conn.outbox.take_events(cx.waker());
            self.must_read |= events.read;
            // A deadline first: its event is taken now, and `armed` is cleared only on it (a
            // tick left armed after it passed would never be armed again). The park loop
            // comes straight back for what is to be written.
            if events.timer {
                return Poll::Ready(Parked::Timer);
            }
            if self.w.ping_due
                && let Some(woke) = self.ping_parked()
            {
                return Poll::Ready(woke);
            }
            // Small messages go out without the stream, the socket stays parked. After each
            // one the waker is registered again before the next look at the queue.
            loop {
                match self.write_parked() {
                    Wrote::Nothing => break,
                    Wrote::Whole => {
                        let events = self.conn.outbox.take_events(cx.waker());
                        self.must_read |= events.read;
                        if events.timer {
                            return Poll::Ready(Parked::Timer);
                        }
                    }
                    Wrote::Stream(owed) => return Poll::Ready(Parked::Write(owed)),
                    Wrote::Failed => return Poll::Ready(Parked::Gone(Gone::Transport)),
                }
            }
            if !self.must_read {
                self.lend();
                return Poll::Pending;
            }
            let waker = Waker::from(Arc::clone(&self.conn));
            // Not zeroed first (the read fills what it returns): a parked socket is polled
            // like this at each park and each wake-up of its reads.
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); PARKED_READ];
            loop {
                let mut read = ReadBuf::uninit(&mut buf);
                let link = self
                    .parked
                    .as_mut()
                    .expect("a parked socket keeps its connection");
                match Pin::new(link.get_mut())
                    .poll_read(&mut Context::from_waker(&waker), &mut read)
                {
                    Poll::Pending => {
                        self.must_read = false;
                        self.lend();
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(())) if read.filled().is_empty() => {
                        return Poll::Ready(Parked::Gone(Gone::Dropped));
                    }
                    // The answer to a server ping: heard, and the socket stays parked (unless
                    // the frame limit closes it: then the close goes out through a stream).
                    Poll::Ready(Ok(())) if is_lone_pong(read.filled()) => {
                        if !self.take_pong() {
                            return Poll::Ready(Parked::Write(None));
                        }
                    }
                    Poll::Ready(Ok(())) => {
                        return Poll::Ready(Parked::Read(read.filled().to_vec()));
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(Parked::Gone(Gone::Transport)),
                }
            }
        })
    }

    /// Sends a due server ping on a parked socket's plain TCP connection, without building a
    /// stream (the client's pong is taken parked too: [`Session::take_pong`]). `None`: sent,
    /// the socket stays parked. Else what wakes the stream: a TLS connection (the stream sends
    /// the ping), the rest of a ping the connection did not take whole, a failure.
    fn ping_parked(&mut self) -> Option<Parked> {
        let link = self
            .parked
            .as_mut()
            .expect("a parked socket keeps its connection")
            .get_mut();
        if !link.can_send_now() {
            return Some(Parked::Write(None));
        }
        match send_whole(link, &PING_FRAME) {
            Ok(rest) => {
                self.w.ping_due = false;
                rest.map(|rest| Parked::Write(Some(Box::new(rest))))
            }
            Err(_) => Some(Parked::Gone(Gone::Transport)),
        }
    }

    /// A parked socket read a lone pong: heard, counted, and taken against the frame limit, as
    /// the stream takes one (`on_io`). False when the limit queued its close (a client that
    /// kept sending past it): the socket then needs its stream to send it.
    fn take_pong(&mut self) -> bool {
        self.last_heard = At::now();
        self.app.metrics.frames_received.inc();
        self.take_frame(&Read::Nothing) || !self.conn.outbox.has_outgoing()
    }

    /// Writes the outbox's next message on a parked socket's connection when it is small and
    /// the connection plain TCP ([`send_parked`]), without building a stream: a quiet socket
    /// that gets an update now and then stays parked (no stream built and taken apart again,
    /// no quiet check a second later).
    fn write_parked(&mut self) -> Wrote {
        let link = self
            .parked
            .as_mut()
            .expect("a parked socket keeps its connection")
            .get_mut();
        let outbox = &self.conn.outbox;
        if !link.can_send_now() {
            return match outbox.has_outgoing() {
                true => Wrote::Stream(None),
                false => Wrote::Nothing,
            };
        }
        let max = direct_max(self.app.config.limits.write_fragment_bytes);
        let bytes = match outbox.pop_small(max) {
            Head::Nothing => return Wrote::Nothing,
            Head::Other => return Wrote::Stream(None),
            Head::Small(bytes) => bytes,
        };
        match send_parked(link, &bytes, outbox.encoding()) {
            Ok(rest) => {
                self.app.metrics.frames_sent.inc();
                match rest {
                    None => Wrote::Whole,
                    Some(rest) => Wrote::Stream(Some(Box::new(rest))),
                }
            }
            Err(_) => Wrote::Failed,
        }
    }

    /// Lends the connection to the outbox while the session waits (it holds nothing unwritten:
    /// the caller checked): the fan-out sends small updates itself instead of waking it.
    fn lend(&mut self) {
        if self.w.lendable && !self.w.ping_due {
            self.conn.outbox.grant();
            self.w.lent = true;
        }
    }

    /// Takes the connection back from the outbox, if it was lent, before anything is written
    /// or read: returns the rest of a frame the fan-out sent in part, to go out first.
    fn take_back(&mut self) -> Option<Bytes> {
        if !std::mem::take(&mut self.w.lent) {
            return None;
        }
        let rest = self.conn.outbox.revoke()?;
        // Counted here: the fan-out counts only frames it sent whole.
        self.app.metrics.frames_sent.inc();
        Some(rest)
    }

    /// A timer event: forgets the armed tick once it has come (the registration that fired is
    /// the armed one, or a later, stale one), then checks the deadlines ([`Session::tick`]).
    fn on_timer(&mut self) -> Option<End> {
        let timers = &self.app.timers;
        if self
            .armed
            .is_some_and(|a| timers.passed(timers.tick_of(a.instant())))
        {
            self.armed = None;
        }
        self.tick()
    }

    /// Timers; returns an end when the socket must go now.
    fn tick(&mut self) -> Option<End> {
        let now = At::now();
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

    /// Leaves the engine: the presence rules apply.
    fn leave(&mut self) {
        let watched = self.watched.take();
        self.app.engine.detach(&self.conn, &watched, self.bye);
    }

    /// Leaves the engine and closes the socket as `end` says, or completes the closing
    /// handshake the client started; the session (with the connection's permit) goes after.
    async fn finish(mut self, ws: &mut Socket, end: End) {
        self.leave();
        if end == End::Gone(Gone::Closed) {
            answer_close(ws).await;
        }
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
/// Ready only when the connection must close (`Ok(code)`) or the socket failed. Once the
/// outbox has nothing more to send now, `taken` holds its events ([`reach_core::Taken`]).
fn poll_write(
    ws: &mut Socket,
    conn: &Conn,
    w: &mut WriteState,
    app: &App,
    cx: &mut Context<'_>,
    taken: &mut Option<Events>,
) -> Poll<Result<CloseCode, tungstenite::Error>> {
    let encoding = conn.outbox.encoding();
    let fragment = app.config.limits.write_fragment_bytes;
    loop {
        // With nothing left in tungstenite (`direct`), the stream is ready.
        if !w.direct {
            match ws.poll_ready_unpin(cx) {
                Poll::Pending => {
                    w.blocked_since.get_or_insert_with(At::now);
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => w.blocked_since = None,
            }
        }
        if w.ping_due {
            w.ping_due = false;
            ws.start_send_unpin(Message::Ping(Bytes::new()))?;
            w.dirty = true;
            w.direct = false;
            continue;
        }
        let Taken { next, idle } = conn.outbox.take(cx.waker());
        match next {
            Some(Outgoing::Message(bytes)) => {
                // Moved by every message (also those written past the stream, which do not
                // grow its buffers), so a busy socket is not parked only to be woken for its
                // next message.
                w.grown_at = Some(At::now());
                let direct = match w.direct {
                    true => write_direct(ws, &bytes, encoding, fragment),
                    false => None,
                };
                match direct {
                    Some(Ok(true)) => {}
                    Some(Ok(false)) => {
                        // The rest of the frame waits in the wire: flushed with the batch,
                        // and what follows goes through the stream behind it.
                        w.dirty = true;
                        w.direct = false;
                    }
                    Some(Err(e)) => return Poll::Ready(Err(e.into())),
                    None => {
                        w.batch_bytes += bytes.len();
                        send_message(ws, bytes, encoding, fragment)?;
                        w.dirty = true;
                        w.direct = false;
                    }
                }
                app.metrics.frames_sent.inc();
            }
            Some(Outgoing::Close(code)) => {
                return flush_dirty(ws, w, cx).map_ok(|()| code);
            }
            None => {}
        }
        if idle.is_some() {
            *taken = idle;
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
            w.blocked_since.get_or_insert_with(At::now);
            Poll::Pending
        }
        Poll::Ready(result) => {
            if result.is_ok() {
                w.dirty = false;
                // Everything is written, the wire's owed bytes first: `write_frame` may be
                // used (it relies on this, and does not check them itself).
                w.direct = true;
                w.big |= w.batch_bytes >= BIG_BATCH;
                w.batch_bytes = 0;
            }
            Poll::Ready(result)
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::task::task_tracker::TrackedFuture;
    use tracing::instrument::Instrumented;

    use super::*;

    /// An idle socket's task fits a 256-byte tokio task cell (tokio aligns cells to 128 bytes
    /// on x86_64): the cell's header (32 B), scheduler and task id (16 B) and trailer (48 B)
    /// leave 160 B for the stage, the spawned future (with the socket's span and the tracker's
    /// token) and its tag. One byte more in what the session loop keeps across an await can
    /// cost 128 per socket; docs/benchmarks.md, "Under 1.9 KB per idle socket". (136 B both in
    /// the test profile and in release, read with `-Zprint-type-sizes`.)
    #[test]
    fn the_socket_task_fits_a_256_byte_cell() {
        fn spawned<F: Future>(_: fn(Box<Start>) -> F) -> usize {
            std::mem::size_of::<TrackedFuture<Instrumented<F>>>()
        }
        let size = spawned(serve_socket);
        assert!(size <= 152, "the spawned socket task is {size} B");
    }
}
