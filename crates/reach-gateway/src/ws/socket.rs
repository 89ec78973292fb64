//! One client's socket: its WebSocket settings (read buffer, message and frame limits,
//! fragment size), reading and classifying what arrives ([`classify`]), sending
//! ([`send_message`] in the session, or [`write_direct`] past tungstenite for small messages
//! on plain TCP; [`close_direct`] before and after it), and how a socket ended ([`End`]).

use std::io;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use reach_proto::{
    ClientFrame, CloseCode, DecodeError, Encoding, ErrorCode, ServerFrame, decode_client, encode,
};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_util::either::Either;

use super::wire::{SendNow, Wire, send_whole};
use crate::admission::{Counted, Tcp};
use crate::config::LimitsConfig;

/// The upgraded connection of one client: all a parked socket keeps, in its session (see
/// `session::Session::park`). The accepted TCP connection itself when hyper gives it back
/// whole (plain TCP), so no box of hyper's stays under it; else (TLS) hyper's `Upgraded`.
pub(super) type Link = Either<Counted, TokioIo<Upgraded>>;

/// A client's connection out of hyper's upgrade, with the bytes hyper read past the request
/// (the start of the client's first frames, if it sent them before the 101 came).
pub(super) fn link(upgraded: Upgraded) -> (Link, Bytes) {
    match upgraded.downcast::<TokioIo<Counted>>() {
        Ok(parts) => (Either::Left(parts.io.into_inner()), parts.read_buf),
        Err(upgraded) => (Either::Right(TokioIo::new(upgraded)), Bytes::new()),
    }
}

impl SendNow for Link {
    fn can_send_now(&self) -> bool {
        matches!(self, Either::Left(_))
    }

    fn send_now(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Either::Left(tcp) => tcp.send_now(buf),
            Either::Right(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }
}

/// The fan-out's writes to a plain TCP connection whose session waits with nothing unwritten
/// (`reach_core::Outbox::grant`): one unfragmented frame per message, as [`write_direct`]
/// writes it.
impl reach_core::Sink for Tcp {
    fn send(&self, message: &[u8], encoding: Encoding) -> reach_core::Sent {
        use reach_core::Sent;
        let mut buf = [0u8; DIRECT_FRAME];
        let Some(len) = frame_into(&mut buf, message, encoding) else {
            return Sent::Nothing;
        };
        match self.send_now(&buf[..len]) {
            Ok(n) if n == len => Sent::Whole,
            Ok(n) if n > 0 => Sent::Part(Bytes::copy_from_slice(&buf[n..len])),
            // Would block (or failed: the session's own write finds out).
            _ => Sent::Nothing,
        }
    }
}

/// Lends a plain TCP connection to the session's outbox (`reach_core::Outbox::set_sink`):
/// while the session waits with nothing unwritten, the fan-out writes small updates to it
/// itself. A TLS connection is not lent (its stream may keep bytes until a flush): false.
pub(super) fn lend(ws: &Socket, conn: &reach_core::Conn, limits: &LimitsConfig) -> bool {
    match ws.get_ref().get_ref() {
        Either::Left(tcp) => {
            let sink: std::sync::Arc<dyn reach_core::Sink> = tcp.shared().clone();
            conn.outbox
                .set_sink(sink, direct_max(limits.write_fragment_bytes));
            true
        }
        Either::Right(_) => false,
    }
}

/// The connection with its frames followed by [`Wire`], under the WebSocket stream.
pub(super) type Raw = Wire<Link>;

/// The WebSocket stream over a client's connection.
pub(super) type Socket = WebSocketStream<Raw>;

/// The WebSocket stream over a client's connection, with `read` (bytes already read from it:
/// what hyper read past the upgrade request, or what the client wrote while its socket was
/// parked) as the start of its read buffer; the [`Wire`] under it follows their frames, so a
/// partial frame among them keeps the stream until it is complete.
///
/// `owed`: the rest of a frame the connection took only in part while the socket was parked
/// ([`send_parked`]); it goes out before anything the stream writes.
pub(super) fn stream_over(
    link: Link,
    read: Vec<u8>,
    owed: Bytes,
    limits: &LimitsConfig,
) -> impl Future<Output = Socket> + use<> {
    let mut wire = Wire::after(link, &read);
    wire.owe(owed);
    WebSocketStream::from_partially_read(wire, read, Role::Server, Some(ws_config(limits)))
}

/// Notes that the session took a message tungstenite read (see [`Wire::at_boundary`]).
pub(super) fn took(ws: &mut Socket, item: &Option<Result<Message, tungstenite::Error>>) {
    if let Some(Ok(_)) = item {
        ws.get_mut().taken();
    }
}

/// How long a closing handshake may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The socket's tungstenite settings, from `[limits]`.
pub(super) fn ws_config(limits: &LimitsConfig) -> WebSocketConfig {
    let config = WebSocketConfig::default()
        .read_buffer_size(limits.read_buffer_bytes)
        .max_message_size(Some(hard_frame_limit(limits.max_frame_bytes)))
        .max_frame_size(Some(hard_frame_limit(limits.max_frame_bytes)));
    match limits.write_fragment_bytes {
        // Whole messages, written once per batch (tungstenite's default buffer target).
        0 => config,
        // Written as soon as a fragment's worth is buffered: the buffer's high-water mark
        // stays near two fragments.
        n => config.write_buffer_size(n),
    }
}

/// Where tungstenite itself stops reading a message. Messages between `max_frame_bytes` and
/// this are read whole and refused by [`classify`] (error 20413, close 1009), which leaves the
/// socket clean so the client receives both; past this the connection is cut at the header.
fn hard_frame_limit(max_frame_bytes: usize) -> usize {
    max_frame_bytes.saturating_mul(4).max(1 << 20)
}

/// Bad input on a socket: the error frame it gets, then the close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    pub code: ErrorCode,
    pub message: String,
    pub close: CloseCode,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>, close: CloseCode) -> Refusal {
        Refusal {
            code,
            message: message.into(),
            close,
        }
    }
}

impl From<DecodeError> for Refusal {
    fn from(e: DecodeError) -> Refusal {
        Refusal::new(e.code(), e.to_string(), e.close_code())
    }
}

/// How a socket ended, for the close-reason metric and the presence rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// We close with this code.
    Close(CloseCode),
    /// The client closed or the transport failed; nothing more is sent.
    Gone(Gone),
}

impl End {
    /// The `reason` label of `reach_connections_closed_total`.
    pub fn label(self) -> &'static str {
        match self {
            End::Close(c) => c.label(),
            End::Gone(g) => g.label(),
        }
    }
}

/// How a client left without our close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gone {
    /// It sent a close frame (tungstenite has queued the reply, see [`answer_close`]).
    Closed,
    /// The connection ended without a closing handshake.
    Dropped,
    /// The transport failed.
    Transport,
}

impl Gone {
    pub fn label(self) -> &'static str {
        match self {
            Gone::Closed => "client_closed",
            Gone::Dropped => "client_gone",
            Gone::Transport => "transport_error",
        }
    }
}

/// What one read from the socket produced.
pub(super) enum Read {
    Frame(ClientFrame),
    /// A control frame or something else that needs no action.
    Nothing,
    /// Bad input: send this error, then close.
    Fail(Refusal),
    /// The client closed or went away.
    Gone(Gone),
}

fn too_big(len: usize, max: usize) -> Read {
    Read::Fail(Refusal::new(
        ErrorCode::FrameTooBig,
        format!("frame of {len} bytes exceeds max_frame_bytes ({max})"),
        CloseCode::TooBig,
    ))
}

/// Checks one read's kind and size, then decodes it.
pub(super) fn classify(
    item: Option<Result<Message, tungstenite::Error>>,
    encoding: Encoding,
    max_frame: usize,
) -> Read {
    if let Some(Ok(Message::Text(t))) = &item
        && t.len() > max_frame
    {
        return too_big(t.len(), max_frame);
    }
    if let Some(Ok(Message::Binary(b))) = &item
        && b.len() > max_frame
    {
        return too_big(b.len(), max_frame);
    }
    let payload = match item {
        None => return Read::Gone(Gone::Dropped),
        Some(Ok(Message::Text(t))) => {
            if encoding != Encoding::Json {
                let e = DecodeError::WrongMessageKind("reach.v1.msgpack", "binary");
                return Read::Fail(e.into());
            }
            Bytes::from(t)
        }
        Some(Ok(Message::Binary(b))) => {
            if encoding != Encoding::MsgPack {
                let e = DecodeError::WrongMessageKind("reach.v1.json", "text");
                return Read::Fail(e.into());
            }
            b
        }
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => return Read::Nothing,
        Some(Ok(Message::Close(_))) => return Read::Gone(Gone::Closed),
        Some(Err(tungstenite::Error::Capacity(e))) => {
            return Read::Fail(Refusal::new(
                ErrorCode::FrameTooBig,
                format!("frame too big: {e}"),
                CloseCode::TooBig,
            ));
        }
        Some(Err(tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ))) => return Read::Gone(Gone::Dropped),
        Some(Err(tungstenite::Error::Protocol(e))) => {
            return Read::Fail(Refusal::new(
                ErrorCode::MalformedFrame,
                format!("WebSocket protocol error: {e}"),
                CloseCode::ProtocolError,
            ));
        }
        Some(Err(tungstenite::Error::Utf8(e))) => {
            return Read::Fail(Refusal::new(
                ErrorCode::MalformedFrame,
                format!("text frame is not UTF-8: {e}"),
                CloseCode::ProtocolError,
            ));
        }
        Some(Err(_)) => return Read::Gone(Gone::Transport),
    };
    match decode_client(&payload, encoding) {
        Ok(frame) => Read::Frame(frame),
        Err(e) => Read::Fail(e.into()),
    }
}

/// An `error` frame.
pub(super) fn error_frame(
    id: Option<i64>,
    code: ErrorCode,
    message: impl Into<String>,
) -> ServerFrame {
    ServerFrame::Error {
        id,
        code: code.as_u32(),
        message: message.into(),
    }
}

/// Queues one message, as WebSocket fragments of at most `fragment` bytes when it is longer
/// (`limits.write_fragment_bytes`; 0: whole). Fragments of one message are queued back to
/// back; RFC 6455 lets control frames (pings, pongs) come between them, nothing else.
pub(super) fn send_message(
    ws: &mut Socket,
    mut rest: Bytes,
    encoding: Encoding,
    fragment: usize,
) -> Result<(), tungstenite::Error> {
    if fragment == 0 || rest.len() <= fragment {
        return ws.start_send_unpin(message(rest, encoding));
    }
    let mut op = OpCode::Data(match encoding {
        Encoding::MsgPack => Data::Binary,
        Encoding::Json => Data::Text,
    });
    while !rest.is_empty() {
        let chunk = rest.split_to(fragment.min(rest.len()));
        let fin = rest.is_empty();
        ws.start_send_unpin(Message::Frame(Frame::message(chunk, op, fin)))?;
        op = OpCode::Data(Data::Continue);
    }
    Ok(())
}

/// The longest frame written past tungstenite ([`write_direct`]), header included: it is
/// built in a buffer on the stack. Presence updates are far shorter.
const DIRECT_FRAME: usize = 512;

/// The longest message written as one frame past tungstenite ([`write_direct`],
/// [`send_parked`]): what fits [`DIRECT_FRAME`] with the longest header it needs (4 bytes),
/// and no longer than a fragment (`limits.write_fragment_bytes`, 0: none), which only the
/// stream cuts.
pub(super) fn direct_max(fragment: usize) -> usize {
    match fragment {
        0 => DIRECT_FRAME - 4,
        fragment => fragment.min(DIRECT_FRAME - 4),
    }
}

/// Writes one message as one unfragmented frame straight to the connection with one `send`,
/// past tungstenite (which must hold nothing unwritten: `WriteState::direct`): the bytes
/// tungstenite would write for it, without copying them into the stream's write buffer or
/// touching the stream's state. `None`: the message is too long for that or is to be
/// fragmented, or the connection is TLS; it goes through the stream. `Some(Ok(false))`: the
/// connection took only part of the frame; the wire keeps the rest and a flush of the stream
/// writes it first.
pub(super) fn write_direct(
    ws: &mut Socket,
    payload: &[u8],
    encoding: Encoding,
    fragment: usize,
) -> Option<io::Result<bool>> {
    if payload.len() > direct_max(fragment) {
        return None;
    }
    debug_assert!(encoding != Encoding::Json || std::str::from_utf8(payload).is_ok());
    let wire = ws.get_mut();
    if !wire.can_write_frame() {
        return None;
    }
    let mut buf = [0u8; DIRECT_FRAME];
    let len = frame_into(&mut buf, payload, encoding)?;
    Some(wire.write_frame(&buf[..len]))
}

/// A server ping with no payload, as tungstenite writes `Message::Ping` of nothing: what a
/// parked socket sends on its connection without building a stream.
pub(super) const PING_FRAME: [u8; 2] = [0x89, 0x00];

/// Whether `bytes` are exactly one whole client pong frame (final, no extension bits, masked,
/// at most 125 bytes of payload): the answer to a server ping, which a parked socket takes
/// without building a stream. Anything else goes to a stream, which reads it as usual.
pub(super) fn is_lone_pong(bytes: &[u8]) -> bool {
    match bytes {
        [0x8A, second, ..] if second & 0x80 != 0 => {
            let len = usize::from(second & 0x7F);
            len <= 125 && bytes.len() == 2 + 4 + len
        }
        _ => false,
    }
}

/// Sends one message as one unfragmented frame on a parked socket's connection, which has no
/// stream: as [`write_direct`], for a message of at most [`direct_max`] bytes on plain TCP
/// (`link.can_send_now()`). `Ok(None)`: sent whole. `Ok(Some(rest))`: the connection took
/// only part of it (or none); `rest` must go out before anything else (the new stream's wire
/// takes it: [`stream_over`]).
pub(super) fn send_parked(
    link: &Link,
    payload: &[u8],
    encoding: Encoding,
) -> io::Result<Option<Bytes>> {
    let mut buf = [0u8; DIRECT_FRAME];
    let len = frame_into(&mut buf, payload, encoding)
        .ok_or_else(|| io::Error::other("a message too long to send parked"))?;
    send_whole(link, &buf[..len])
}

/// Writes a server frame (final, unmasked) holding `payload` into `buf`; its length, or `None`
/// when it does not fit.
fn frame_into(buf: &mut [u8; DIRECT_FRAME], payload: &[u8], encoding: Encoding) -> Option<usize> {
    let op = OpCode::Data(match encoding {
        Encoding::MsgPack => Data::Binary,
        Encoding::Json => Data::Text,
    });
    let len = payload.len();
    buf[0] = 0x80 | u8::from(op);
    let header = match len {
        0..=125 => {
            buf[1] = len as u8;
            2
        }
        _ => {
            buf[1] = 126;
            buf[2..4].copy_from_slice(&u16::try_from(len).ok()?.to_be_bytes());
            4
        }
    };
    buf.get_mut(header..header + len)?.copy_from_slice(payload);
    Some(header + len)
}

fn message(bytes: Bytes, encoding: Encoding) -> Message {
    match encoding {
        Encoding::MsgPack => Message::Binary(bytes),
        Encoding::Json => match Utf8Bytes::try_from(bytes) {
            Ok(text) => Message::Text(text),
            // JSON from serde_json is UTF-8; this arm is unreachable in practice.
            Err(_) => Message::Text(Utf8Bytes::from_static("{}")),
        },
    }
}

/// Sends `frame` (if any) and a close frame directly, then waits briefly for the peer's close.
pub(super) async fn close_direct(
    ws: &mut Socket,
    encoding: Encoding,
    frame: Option<ServerFrame>,
    code: CloseCode,
    reason: &str,
) {
    let reason = reason.chars().take(100).collect::<String>();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if let Some(f) = frame {
            ws.feed(message(encode(&f, encoding), encoding)).await?;
        }
        ws.send(Message::Close(Some(CloseFrame {
            code: code.as_u16().into(),
            reason: reason.into(),
        })))
        .await?;
        // Wait for the peer's close so the TCP connection ends cleanly.
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
        Ok::<(), tungstenite::Error>(())
    })
    .await;
}

/// Completes the closing handshake the client started: tungstenite queued the reply to its
/// close frame; this sends it (else the client sees 1006).
pub(super) async fn answer_close(ws: &mut Socket) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.flush()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Counted;

    /// A parked socket's messages sent without a stream until the connection takes one only in
    /// part (or not at all); the stream built then writes that rest first: a WebSocket client
    /// reads every message whole and in order, then the stream's own.
    #[tokio::test]
    async fn a_parked_socket_s_partial_frame_goes_out_first_from_its_new_stream() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let (client, accepted) = tokio::join!(
            socket.connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let (client, (server, _)) = (client.unwrap(), accepted.unwrap());
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .unwrap();
        let permit = std::sync::Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_owned()
            .await
            .unwrap();
        let link: Link = Either::Left(Counted::new(server, permit));
        assert!(link.can_send_now());
        let mut sent = Vec::new();
        let rest = loop {
            assert!(sent.len() < 1_000_000, "the connection never filled");
            let text = format!("message {:07} {}", sent.len(), "x".repeat(300));
            let rest = send_parked(&link, text.as_bytes(), Encoding::Json).unwrap();
            sent.push(text);
            if let Some(rest) = rest {
                break rest;
            }
        };
        let mut ws = stream_over(link, Vec::new(), rest, &LimitsConfig::default()).await;
        let reader = tokio::spawn(async move {
            let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
            let mut got = Vec::new();
            while let Some(Ok(Message::Text(t))) = client.next().await {
                let last = t.as_str() == "after";
                got.push(t.to_string());
                if last {
                    break;
                }
            }
            got
        });
        ws.send(Message::Text("after".into())).await.unwrap();
        sent.push("after".into());
        assert!(
            reader.await.unwrap() == sent,
            "every message whole and in order"
        );
    }

    /// A parked socket takes a client's pong alone, whole and well formed; anything else goes
    /// to a stream.
    #[test]
    fn only_a_lone_whole_pong_is_taken_while_parked() {
        let masked = |frame: Frame| {
            let mut frame = frame;
            frame.header_mut().mask = Some([1, 2, 3, 4]);
            let mut bytes = Vec::new();
            frame.format(&mut bytes).expect("formats");
            bytes
        };
        let pong = masked(Frame::pong(Vec::new()));
        assert!(is_lone_pong(&pong));
        assert!(is_lone_pong(&masked(Frame::pong(vec![7; 125]))));
        let ping = masked(Frame::ping(Vec::new()));
        assert!(!is_lone_pong(&ping));
        assert!(!is_lone_pong(&pong[..pong.len() - 1]), "a partial pong");
        assert!(!is_lone_pong(&[pong.clone(), pong.clone()].concat()), "two");
        assert!(
            !is_lone_pong(&[pong.clone(), ping].concat()),
            "a pong and more"
        );
        let mut unmasked = Vec::new();
        Frame::pong(Vec::new()).format(&mut unmasked).unwrap();
        assert!(!is_lone_pong(&unmasked));
        let mut rsv = pong.clone();
        rsv[0] |= 0x40;
        assert!(!is_lone_pong(&rsv));
        assert!(!is_lone_pong(&[]));
        // An extended length (126): no control frame may have one.
        let long = [&[0x8A, 0x80 | 126, 0, 126, 1, 2, 3, 4][..], &[0; 126]].concat();
        assert!(!is_lone_pong(&long));
        assert_eq!(PING_FRAME.to_vec(), {
            let mut bytes = Vec::new();
            Frame::ping(Vec::new()).format(&mut bytes).unwrap();
            bytes
        });
    }

    /// A frame written past tungstenite is byte for byte the one tungstenite writes for the
    /// same message, at every header size that fits; longer ones are left to tungstenite.
    #[test]
    fn direct_frames_are_the_frames_tungstenite_writes() {
        for encoding in [Encoding::Json, Encoding::MsgPack] {
            for len in [0, 1, 125, 126, 127, 300, direct_max(0)] {
                let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
                let mut buf = [0u8; DIRECT_FRAME];
                let n = frame_into(&mut buf, &payload, encoding).expect("fits");
                let op = OpCode::Data(match encoding {
                    Encoding::MsgPack => Data::Binary,
                    Encoding::Json => Data::Text,
                });
                let mut expected = Vec::new();
                Frame::message(payload.clone(), op, true)
                    .format(&mut expected)
                    .expect("formats");
                assert_eq!(&buf[..n], &expected[..], "{encoding:?}, {len} bytes");
            }
            let mut buf = [0u8; DIRECT_FRAME];
            let long = vec![b'x'; DIRECT_FRAME - 3];
            assert_eq!(frame_into(&mut buf, &long, encoding), None);
        }
    }
}
