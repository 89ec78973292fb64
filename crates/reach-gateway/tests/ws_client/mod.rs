//! WebSocket test clients: a tokio-tungstenite client that speaks protocol v1 in either
//! encoding, and a raw client that never answers pings (a silent peer).
#![allow(dead_code)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reach_proto::{ClientFrame, Encoding, ServerFrame, decode_server, encode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Generous wait for any one event.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub enc: Encoding,
    /// WebSocket pings seen from the server.
    pub pings: usize,
}

/// How a socket ended, as the client saw it.
#[derive(Debug)]
pub struct Closed {
    pub frames: Vec<ServerFrame>,
    pub code: Option<u16>,
}

impl Closed {
    pub fn error_code(&self) -> Option<u32> {
        self.frames.iter().find_map(|f| match f {
            ServerFrame::Error { code, .. } => Some(*code),
            _ => None,
        })
    }
}

impl Ws {
    /// Connects offering `protocol` (None: no subprotocol, JSON).
    pub async fn connect(url: &str, protocol: Option<Encoding>) -> Ws {
        let mut req = url.into_client_request().unwrap();
        if let Some(p) = protocol {
            req.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_static(p.subprotocol()),
            );
        }
        let (stream, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("connect in time")
            .expect("upgrade accepted");
        let echoed = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            echoed.as_deref(),
            protocol.map(|p| p.subprotocol()),
            "subprotocol echoed"
        );
        Ws {
            stream,
            enc: protocol.unwrap_or(Encoding::Json),
            pings: 0,
        }
    }

    /// Connects (JSON) with a small kernel receive buffer, so the server's writes block early
    /// once the client stops reading.
    pub async fn connect_with_rcvbuf(addr: std::net::SocketAddr, rcvbuf: u32) -> Ws {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(rcvbuf).unwrap();
        let tcp = socket.connect(addr).await.unwrap();
        let url = format!("ws://{addr}/v1/ws");
        let (stream, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp)),
        )
        .await
        .expect("upgrade in time")
        .expect("upgrade accepted");
        Ws {
            stream,
            enc: Encoding::Json,
            pings: 0,
        }
    }

    /// Connects and says hello; returns the socket and the welcome.
    pub async fn hello(url: &str, token: &str, protocol: Option<Encoding>) -> (Ws, ServerFrame) {
        let mut ws = Self::connect(url, protocol).await;
        ws.send(&ClientFrame::Hello {
            token: token.into(),
            client: Some("reach-tests/1".into()),
        })
        .await;
        let welcome = ws.recv().await;
        assert!(
            matches!(welcome, ServerFrame::Welcome { .. }),
            "expected welcome, got {welcome:?}"
        );
        (ws, welcome)
    }

    pub async fn send(&mut self, frame: &ClientFrame) {
        let bytes = encode(frame, self.enc);
        let msg = match self.enc {
            Encoding::Json => Message::Text(Utf8Bytes::try_from(bytes).unwrap()),
            Encoding::MsgPack => Message::Binary(bytes),
        };
        self.stream.send(msg).await.expect("send");
    }

    pub async fn send_raw(&mut self, msg: Message) {
        self.stream.send(msg).await.expect("send");
    }

    /// Next protocol frame (control frames skipped). Panics on close or timeout.
    pub async fn recv(&mut self) -> ServerFrame {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .expect("a frame within the wait")
                .expect("socket open")
                .expect("no socket error");
            match msg {
                Message::Text(t) => return decode_server(t.as_bytes(), Encoding::Json).unwrap(),
                Message::Binary(b) => return decode_server(&b, Encoding::MsgPack).unwrap(),
                Message::Ping(_) => self.pings += 1,
                Message::Close(c) => panic!("unexpected close {c:?}"),
                _ => {}
            }
        }
    }

    /// Next frame matching `pred`, skipping others.
    pub async fn recv_until(&mut self, mut pred: impl FnMut(&ServerFrame) -> bool) -> ServerFrame {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no matching frame within the wait"
            );
            let f = self.recv().await;
            if pred(&f) {
                return f;
            }
        }
    }

    /// Next `user_updated` for `identity`.
    pub async fn update_of(&mut self, identity: &str) -> ServerFrame {
        self.recv_until(
            |f| matches!(f, ServerFrame::UserUpdated { user, .. } if user.identity == identity),
        )
        .await
    }

    /// `is_online` in the next `user_updated` for `identity`.
    pub async fn is_online_of(&mut self, identity: &str) -> Option<bool> {
        match self.update_of(identity).await {
            ServerFrame::UserUpdated { user, .. } => user.is_online,
            other => unreachable!("update_of returned {other:?}"),
        }
    }

    /// Reads until the server closes; returns the frames before the close and its code.
    pub async fn closed(mut self) -> Closed {
        let mut frames = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .expect("close within the wait");
            match next {
                Some(Ok(Message::Text(t))) => {
                    frames.push(decode_server(t.as_bytes(), Encoding::Json).unwrap())
                }
                Some(Ok(Message::Binary(b))) => {
                    frames.push(decode_server(&b, Encoding::MsgPack).unwrap())
                }
                Some(Ok(Message::Close(c))) => {
                    return Closed {
                        frames,
                        code: c.map(|c| u16::from(c.code)),
                    };
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Closed { frames, code: None },
            }
        }
    }

    pub async fn request(&mut self, frame: ClientFrame) -> ServerFrame {
        let id = frame.id();
        self.send(&frame).await;
        self.recv_until(|f| match f {
            ServerFrame::Subscribed { id: i, .. }
            | ServerFrame::Unsubscribed { id: i }
            | ServerFrame::Pong { id: i }
            | ServerFrame::TokenUpdated { id: i, .. }
            | ServerFrame::PushRegistered { id: i, .. }
            | ServerFrame::PushUnregistered { id: i } => Some(*i) == id,
            ServerFrame::Error { id: i, .. } => *i == id,
            _ => false,
        })
        .await
    }

    /// Drops the TCP connection without a close handshake.
    pub fn abort(self) {
        drop(self);
    }
}

/// Asks for the upgrade on `tcp` with `extra` (the start of the client's frames) in the same
/// write, and reads the server's 101.
pub async fn upgrade(tcp: &mut TcpStream, addr: std::net::SocketAddr, extra: &[u8]) {
    upgrade_with(tcp, addr, "", extra).await
}

/// [`upgrade`] with more header fields (`fields`: whole lines, each ending in CRLF).
pub async fn upgrade_with(
    tcp: &mut TcpStream,
    addr: std::net::SocketAddr,
    fields: &str,
    extra: &[u8],
) {
    let mut bytes = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{fields}\r\n"
    )
    .into_bytes();
    bytes.extend_from_slice(extra);
    tcp.write_all(&bytes).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
}

/// One masked text frame, as a client sends it (payloads under 64 KiB).
pub fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81];
    if payload.len() < 126 {
        frame.push(0x80 | payload.len() as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// A raw WebSocket client that sends what it is told and never answers pings.
pub struct RawWs {
    pub tcp: TcpStream,
}

impl RawWs {
    /// Upgrades (JSON) and sends `hello` with `token`.
    pub async fn hello(addr: std::net::SocketAddr, token: &str) -> RawWs {
        Self::hello_with_rcvbuf(addr, token, None).await
    }

    /// Like `hello`, with a small kernel receive buffer so the server's writes block early.
    pub async fn hello_with_rcvbuf(
        addr: std::net::SocketAddr,
        token: &str,
        rcvbuf: Option<u32>,
    ) -> RawWs {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = rcvbuf {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let mut tcp = socket.connect(addr).await.unwrap();
        upgrade(&mut tcp, addr, &[]).await;
        let mut raw = RawWs { tcp };
        let hello = serde_json::json!({"type": "hello", "token": token}).to_string();
        raw.send_text(&hello).await;
        raw
    }

    /// Sends one masked text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.tcp
            .write_all(&masked_text(text.as_bytes()))
            .await
            .unwrap();
    }

    /// Reads until EOF; returns the text frames and the close code, and how many pings came.
    pub async fn read_to_close(mut self, wait: Duration) -> (Vec<String>, Option<u16>, usize) {
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(wait, self.tcp.read_to_end(&mut buf)).await;
        let (mut texts, mut code, mut pings) = (Vec::new(), None, 0);
        let mut i = 0;
        while i + 2 <= buf.len() {
            let opcode = buf[i] & 0x0f;
            let mut len = (buf[i + 1] & 0x7f) as usize;
            let mut at = i + 2;
            if len == 126 {
                len = u16::from_be_bytes([buf[at], buf[at + 1]]) as usize;
                at += 2;
            } else if len == 127 {
                len = u64::from_be_bytes(buf[at..at + 8].try_into().unwrap()) as usize;
                at += 8;
            }
            if at + len > buf.len() {
                break;
            }
            let payload = &buf[at..at + len];
            match opcode {
                0x1 => texts.push(String::from_utf8_lossy(payload).into_owned()),
                0x8 if payload.len() >= 2 => {
                    code = Some(u16::from_be_bytes([payload[0], payload[1]]))
                }
                0x9 => pings += 1,
                _ => {}
            }
            i = at + len;
        }
        (texts, code, pings)
    }
}
