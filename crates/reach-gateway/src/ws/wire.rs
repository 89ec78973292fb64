//! The socket's byte stream under tungstenite ([`Wire`]), which follows the client's frame
//! boundaries in the bytes it hands over, so the session knows when tungstenite holds no
//! unread input and the socket can be parked without its stream (see
//! [`super::session`], "quiet sockets").
//!
//! tungstenite keeps its read buffer at the size of the largest frame it has read (the `hello`
//! with its token) and its write buffer at the size of the largest batch, for the life of the
//! socket. Parking the socket (taking the stream apart, building a new one when it wakes)
//! releases both, but is only safe
//! when nothing read is still inside it: every message whose bytes were handed over has been
//! taken, and no byte of a later frame was. [`Wire::at_boundary`] says exactly that.
//!
//! Small messages are written through the wire itself, past tungstenite
//! ([`Wire::write_frame`]): what the connection does not take at once is kept here and goes
//! out before any later byte, tungstenite's included.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest client frame header: 2 bytes, 8 of extended length, 4 of mask.
const MAX_HEADER: usize = 14;

/// A byte stream that counts the complete client messages read through it.
pub(super) struct Wire<S> {
    io: S,
    /// The bytes of the header being read (`head_len` of them).
    head: [u8; MAX_HEADER],
    head_len: u8,
    /// The first header byte of the frame whose payload is being read (FIN and opcode).
    first: u8,
    /// Payload bytes of that frame not handed over yet.
    payload_left: u64,
    /// A data frame without FIN was seen: a fragmented message is in progress.
    fragmented: bool,
    /// Messages whose last byte was handed over and that the session has not taken yet.
    unread: u32,
    /// The unwritten rest of a frame written past tungstenite ([`Wire::write_frame`], or by a
    /// parked socket before this wire existed: [`Wire::owe`]); it goes out before anything
    /// else written or flushed through the wire.
    owed: Bytes,
}

impl<S> Wire<S> {
    pub(super) fn new(io: S) -> Wire<S> {
        Wire {
            io,
            head: [0; MAX_HEADER],
            head_len: 0,
            first: 0,
            payload_left: 0,
            fragmented: false,
            unread: 0,
            owed: Bytes::new(),
        }
    }

    /// A wire over `io` that has already handed over `read` (bytes read from `io` before it
    /// existed, which tungstenite gets as the start of its read buffer), following their
    /// frames as if they had come through it.
    pub(super) fn after(io: S, read: &[u8]) -> Wire<S> {
        let mut wire = Wire::new(io);
        wire.scan(read);
        wire
    }

    pub(super) fn get_ref(&self) -> &S {
        &self.io
    }

    /// The stream under it, once [`Wire::at_boundary`]: a new `Wire` over it then follows the
    /// frames from where this one stopped.
    pub(super) fn into_inner(self) -> S {
        debug_assert!(self.at_boundary());
        debug_assert!(
            self.owed.is_empty(),
            "a frame's rest is still to be written"
        );
        self.io
    }

    /// The session took a message from tungstenite.
    pub(super) fn taken(&mut self) {
        self.unread = self.unread.saturating_sub(1);
    }

    /// Every byte handed over belongs to a message the session has taken: tungstenite holds
    /// no unread input.
    pub(super) fn at_boundary(&self) -> bool {
        self.head_len == 0 && self.payload_left == 0 && !self.fragmented && self.unread == 0
    }

    /// Follows the frames in `bytes`, the next bytes handed to tungstenite.
    fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = (bytes.len() as u64).min(self.payload_left);
                self.payload_left -= n;
                bytes = &bytes[n as usize..];
                if self.payload_left == 0 {
                    self.frame_done();
                }
                continue;
            }
            let need = self.header_len();
            let have = usize::from(self.head_len);
            let n = (need - have).min(bytes.len());
            self.head[have..have + n].copy_from_slice(&bytes[..n]);
            self.head_len += n as u8;
            bytes = &bytes[n..];
            // The length byte may tell that the header is longer than first thought.
            if usize::from(self.head_len) == self.header_len() {
                self.header_done();
            }
        }
    }

    /// The length of the header being read, as far as its bytes so far tell.
    fn header_len(&self) -> usize {
        if self.head_len < 2 {
            return 2;
        }
        let extended = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    fn header_done(&mut self) {
        let h = &self.head;
        self.payload_left = match h[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            n => u64::from(n),
        };
        self.first = h[0];
        self.head_len = 0;
        if self.payload_left == 0 {
            self.frame_done();
        }
    }

    fn frame_done(&mut self) {
        let fin = self.first & 0x80 != 0;
        let control = self.first & 0x08 != 0;
        if control {
            // Control frames are whole messages, also between a message's fragments.
            self.unread += 1;
        } else if fin {
            self.unread += 1;
            self.fragmented = false;
        } else {
            self.fragmented = true;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Wire<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            this.scan(&buf.filled()[before..]);
        }
        result
    }
}

/// A connection that can take bytes at once, with a plain `send` and without the runtime's
/// readiness check first (which reads the socket's readiness record: a cache line of its own
/// per socket, on a delivery's path). The runtime's readiness is only a hint: a send that
/// would block leaves the socket's readiness to the runtime's next write, which finds out
/// itself.
pub(super) trait SendNow {
    /// Whether [`SendNow::send_now`] can be used: not over TLS, whose stream may accept bytes
    /// it has not written yet (only a flush would send them).
    fn can_send_now(&self) -> bool;

    /// Sends what the connection takes of `buf` now, with one `send`.
    fn send_now(&self, buf: &[u8]) -> io::Result<usize>;
}

/// Sends `frame` with one `send` ([`SendNow`]). `Ok(None)`: all of it went. `Ok(Some(rest))`:
/// the connection took only part of it, or none (it would block); `rest` must go out before
/// anything else written to the connection.
pub(super) fn send_whole<S: SendNow>(io: &S, frame: &[u8]) -> io::Result<Option<Bytes>> {
    let written = match io.send_now(frame) {
        Ok(n) => n,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            0
        }
        Err(e) => return Err(e),
    };
    Ok((written < frame.len()).then(|| Bytes::copy_from_slice(&frame[written..])))
}

impl<S: AsyncWrite + SendNow + Unpin> Wire<S> {
    /// Takes `rest`, the unwritten rest of a frame sent on the connection before this wire
    /// existed (by a parked socket), to write before anything else.
    pub(super) fn owe(&mut self, rest: Bytes) {
        debug_assert!(self.owed.is_empty());
        self.owed = rest;
    }

    /// Whether [`Wire::write_frame`] can be used on this connection ([`SendNow`]).
    pub(super) fn can_write_frame(&self) -> bool {
        self.io.can_send_now()
    }

    /// Writes one whole server frame (`frame`: header and payload) to the connection with one
    /// `send`, past tungstenite, which must hold nothing unwritten then (the session writes
    /// this way only after a flush, with nothing sent through the stream since), on a
    /// connection that [can take it so](Wire::can_write_frame). `Ok(true)`: written.
    /// `Ok(false)`: the connection took only part of it (or none); the rest is kept and goes
    /// out first when anything is next written or flushed through the wire, so a flush sends
    /// it, and frames written after it must go through the stream.
    ///
    /// Called only with nothing owed (the session writes past the stream only after a flush,
    /// which writes what is owed first, and sets `WriteState::direct` only then or on a new
    /// wire): checking here would read a cache line of the wire that a delivery otherwise
    /// does not touch.
    pub(super) fn write_frame(&mut self, frame: &[u8]) -> io::Result<bool> {
        debug_assert!(
            self.owed.is_empty(),
            "a frame's rest is still to be written"
        );
        match send_whole(&self.io, frame)? {
            None => Ok(true),
            Some(rest) => {
                self.owed = rest;
                Ok(false)
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> Wire<S> {
    /// Writes what [`Wire::write_frame`] kept, if anything; ready once it is all written.
    fn poll_owed(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.owed.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.owed))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.owed.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Wire<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_owed(cx))?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_owed(cx))?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_owed(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_owed(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn frame(first: u8, payload_len: usize) -> Vec<u8> {
        let mut f = vec![first];
        match payload_len {
            0..=125 => f.push(0x80 | payload_len as u8),
            126..=65535 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(std::iter::repeat_n(0x55, payload_len));
        f
    }

    const TEXT: u8 = 0x81;
    const TEXT_FIRST: u8 = 0x01;
    const CONTINUATION: u8 = 0x00;
    const CONTINUATION_LAST: u8 = 0x80;
    const PING: u8 = 0x89;

    /// A wire built after bytes were read follows the frames in them: a partial frame is no
    /// boundary, a whole one is a message to take.
    #[test]
    fn a_wire_built_after_a_read_follows_its_frames() {
        let text = frame(TEXT, 10);
        assert!(Wire::after((), &[]).at_boundary());
        assert!(!Wire::after((), &text[..5]).at_boundary());
        let mut whole = Wire::after((), &text);
        assert!(!whole.at_boundary(), "a message read and not taken");
        whole.taken();
        assert!(whole.at_boundary());
        let mut wire = Wire::after((), &text[..5]);
        wire.scan(&text[5..]);
        wire.taken();
        assert!(wire.at_boundary());
    }

    /// Feeds `bytes` in pieces of `step`; returns the wire after each piece.
    fn feed(bytes: &[u8], step: usize) -> Vec<(usize, bool, u32)> {
        let mut wire = Wire::new(());
        let mut seen = Vec::new();
        for (i, piece) in bytes.chunks(step).enumerate() {
            wire.scan(piece);
            seen.push(((i + 1) * step, wire.at_boundary(), wire.unread));
        }
        seen
    }

    #[test]
    fn counts_whole_messages_whatever_the_read_sizes() {
        let mut bytes = frame(TEXT, 5);
        bytes.extend(frame(TEXT, 300));
        bytes.extend(frame(TEXT, 70_000));
        bytes.extend(frame(PING, 0));
        for step in [1, 2, 3, 7, 13, 14, 100, 4096, bytes.len()] {
            let mut wire = Wire::new(());
            for piece in bytes.chunks(step) {
                wire.scan(piece);
            }
            assert_eq!(wire.unread, 4, "step {step}");
            assert_eq!(wire.head_len, 0, "step {step}");
            assert_eq!(wire.payload_left, 0, "step {step}");
        }
    }

    #[test]
    fn at_a_boundary_only_when_every_message_handed_over_was_taken() {
        let mut wire = Wire::new(());
        assert!(wire.at_boundary(), "nothing read yet");
        let two = [frame(TEXT, 10), frame(TEXT, 3)].concat();
        // The first message and part of the second's header.
        wire.scan(&two[..17]);
        assert_eq!(wire.unread, 1);
        wire.taken();
        assert!(!wire.at_boundary(), "a header is half read");
        wire.scan(&two[17..]);
        assert!(!wire.at_boundary(), "the second message is not taken");
        wire.taken();
        assert!(wire.at_boundary());
        // A header without its payload.
        wire.scan(&frame(TEXT, 10)[..6]);
        assert!(!wire.at_boundary(), "payload still to come");
    }

    #[test]
    fn fragments_make_one_message_and_control_frames_between_them_count() {
        let bytes = [
            frame(TEXT_FIRST, 4),
            frame(CONTINUATION, 4),
            frame(PING, 2),
            frame(CONTINUATION_LAST, 4),
        ]
        .concat();
        let seen = feed(&bytes, 1);
        let after = |n: usize| seen[n - 1];
        let first_two = frame(TEXT_FIRST, 4).len() + frame(CONTINUATION, 4).len();
        // After two fragments: no whole message, not at a boundary.
        assert_eq!(after(first_two), (first_two, false, 0));
        // The ping is a whole message, but the text message is still open.
        let with_ping = first_two + frame(PING, 2).len();
        assert_eq!(after(with_ping), (with_ping, false, 1));
        // The last fragment closes the message.
        assert_eq!(seen.last().unwrap().2, 2);
        let mut wire = Wire::new(());
        wire.scan(&bytes);
        wire.taken();
        wire.taken();
        assert!(wire.at_boundary());
    }

    /// A connection that takes at most `room` more bytes, then is not ready until given more
    /// room; the same through `send_now` (which then says `WouldBlock`) and `poll_write`.
    #[derive(Default)]
    struct Tight {
        written: std::cell::RefCell<Vec<u8>>,
        room: std::cell::Cell<usize>,
        flushes: usize,
    }

    impl Tight {
        fn take(&self, buf: &[u8]) -> usize {
            let n = buf.len().min(self.room.get());
            self.room.set(self.room.get() - n);
            self.written.borrow_mut().extend_from_slice(&buf[..n]);
            n
        }

        fn written(&self) -> Vec<u8> {
            self.written.borrow().clone()
        }
    }

    impl AsyncWrite for Tight {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            match self.take(buf) {
                0 => Poll::Pending,
                n => Poll::Ready(Ok(n)),
            }
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl SendNow for Tight {
        fn can_send_now(&self) -> bool {
            true
        }

        fn send_now(&self, buf: &[u8]) -> io::Result<usize> {
            match self.take(buf) {
                0 => Err(io::ErrorKind::WouldBlock.into()),
                n => Ok(n),
            }
        }
    }

    fn cx() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    /// A frame the connection takes whole is written at once; one it takes only part of (or
    /// none of) is kept, and its rest goes out before anything written or flushed after it,
    /// even across several partial writes.
    #[test]
    fn a_frame_written_in_part_goes_out_whole_before_what_follows() {
        let mut wire = Wire::new(Tight::default());
        wire.io.room.set(100);
        assert!(wire.write_frame(b"first").unwrap(), "written");
        wire.io.room.set(3);
        assert!(!wire.write_frame(b"second").unwrap(), "in part");
        assert_eq!(wire.io.written(), b"firstsec");
        // Nothing else gets past the rest: the write waits while the rest does not fit.
        let mut w = Pin::new(&mut wire);
        assert!(w.as_mut().poll_write(&mut cx(), b"third").is_pending());
        w.io.room.set(2);
        assert!(w.as_mut().poll_flush(&mut cx()).is_pending());
        assert_eq!(w.io.written(), b"firstsecon");
        assert_eq!(w.io.flushes, 0, "no flush before the rest is out");
        w.io.room.set(100);
        assert!(matches!(
            w.as_mut().poll_write(&mut cx(), b"third"),
            Poll::Ready(Ok(5))
        ));
        assert_eq!(w.io.written(), b"firstsecondthird");
        // Not taken at all: kept whole, and a flush sends it.
        w.io.room.set(0);
        assert!(!w.as_mut().get_mut().write_frame(b"fourth").unwrap());
        w.io.room.set(100);
        assert!(matches!(
            w.as_mut().poll_flush(&mut cx()),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(w.io.written(), b"firstsecondthirdfourth");
        assert_eq!(w.io.flushes, 1);
        assert!(wire.owed.is_empty());
    }

    /// Over a real connection with small buffers: frames sent with a plain `send` until one is
    /// taken only in part, then bytes written through the wire as tungstenite writes them;
    /// the peer reads every byte once, in order.
    #[tokio::test]
    async fn frames_sent_past_the_runtime_reach_the_peer_whole_and_in_order() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let (client, accepted) = tokio::join!(
            socket.connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let (mut client, (server, _)) = (client.unwrap(), accepted.unwrap());
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .unwrap();
        let permit = std::sync::Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_owned()
            .await
            .unwrap();
        let link: super::super::socket::Link =
            tokio_util::either::Either::Left(crate::admission::Counted::new(server, permit));
        let mut wire = Wire::new(link);
        assert!(wire.can_write_frame());
        let mut expected = Vec::new();
        for i in 0.. {
            assert!(i < 10_000_000, "the connection never filled");
            let frame = format!("frame {i:07};").into_bytes();
            expected.extend_from_slice(&frame);
            if !wire.write_frame(&frame).unwrap() {
                break;
            }
        }
        assert!(!wire.owed.is_empty());
        let after = b"after the rest".repeat(1000);
        expected.extend_from_slice(&after);
        let len = expected.len();
        let reader = tokio::spawn(async move {
            let mut got = vec![0; len];
            client.read_exact(&mut got).await.unwrap();
            got
        });
        wire.write_all(&after).await.unwrap();
        wire.flush().await.unwrap();
        let got = reader.await.unwrap();
        assert!(got == expected, "the peer read the bytes out of order");
    }

    #[test]
    fn empty_frames_and_unmasked_headers_end_at_their_header() {
        let mut wire = Wire::new(());
        wire.scan(&frame(TEXT, 0));
        assert_eq!(wire.unread, 1);
        // Unmasked (refused by tungstenite, but followed all the same): 2-byte header.
        wire.scan(&[0x81, 0x02, b'h', b'i']);
        assert_eq!(wire.unread, 2);
        assert_eq!((wire.head_len, wire.payload_left), (0, 0));
    }
}
