//! The reach driver: reachd's own protocol (`hello` with an access token, `subscribe` to the
//! watched identities, `user_updated` as the notification, `bye` to leave).

use futures_util::{SinkExt, StreamExt};
use reach_proto::token::AccessToken;
use reach_proto::{ClientFrame, Encoding, ServerFrame, decode_server, encode};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::{BYE_DRAIN, Worker, Ws};
use crate::ipc::EventKind;
use crate::scenario::{identity, user_of};
use crate::stats::{now_ns, record_ns};

impl Worker {
    /// An access token for `user`, valid for six hours.
    fn token(&self, user: u32) -> Result<String, String> {
        let p = &self.plan;
        let sid = |what: &str, e: reach_proto::sid::SidError| format!("plan {what}: {e}");
        let token = AccessToken {
            account_sid: p.account_sid.parse().map_err(|e| sid("account_sid", e))?,
            api_key_sid: p.key_sid.parse().map_err(|e| sid("key_sid", e))?,
            service_sid: p.service_sid.parse().map_err(|e| sid("service_sid", e))?,
            identity: identity(user),
            ttl_s: 6 * 3600,
        };
        Ok(token.mint(&p.key_secret, reach_proto::now_unix()))
    }

    fn message(&self, frame: &ClientFrame) -> Message {
        let bytes = encode(frame, self.enc);
        match self.enc {
            Encoding::MsgPack => Message::Binary(bytes),
            Encoding::Json => Message::Text(
                Utf8Bytes::try_from(bytes).unwrap_or_else(|_| Utf8Bytes::from_static("{}")),
            ),
        }
    }

    pub(super) async fn establish_reach(&self, user: u32, visible: bool) -> Result<Ws, String> {
        let mut ws = self
            .retrying(|| self.upgrade(user, Some(self.enc.subprotocol())))
            .await?;
        let token = self.token(user)?;
        if visible {
            self.event(user, true, EventKind::Connect);
        }
        let sent = now_ns();
        ws.send(self.message(&ClientFrame::Hello {
            token,
            client: Some("reach-loadtest/0.1".into()),
        }))
        .await
        .map_err(|e| format!("send hello: {e}"))?;
        let welcome = tokio::time::timeout(self.reply_timeout(), async {
            loop {
                match ws.next().await {
                    Some(Ok(m)) => match self.frame(&m)? {
                        Some(ServerFrame::Welcome { .. }) => return Ok(()),
                        Some(ServerFrame::Error { code, message, .. }) => {
                            return Err(format!("hello refused: {code} {message}"));
                        }
                        _ => {}
                    },
                    Some(Err(e)) => return Err(format!("read welcome: {e}")),
                    None => return Err("closed before welcome".into()),
                }
            }
        })
        .await
        .map_err(|_| "no welcome in time".to_string())?;
        welcome?;
        record_ns(&mut self.h.borrow_mut().hello, now_ns() - sent);
        self.c.borrow_mut().connects += 1;
        Ok(ws)
    }

    /// Decodes a data message; `None` for control frames.
    fn frame(&self, m: &Message) -> Result<Option<ServerFrame>, String> {
        let payload: &[u8] = match m {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
            Message::Close(c) => return Err(format!("server closed: {c:?}")),
            _ => return Ok(None),
        };
        decode_server(payload, self.enc)
            .map(Some)
            .map_err(|e| format!("undecodable frame: {e}"))
    }

    /// Handles a frame read outside a request/reply exchange.
    fn on_frame(&self, user: u32, frame: ServerFrame) {
        match frame {
            ServerFrame::UserUpdated { user: u, .. } => match user_of(&u.identity) {
                Some(x) => self.notify(user, x, u.is_online),
                None => self.error(format!("update of unknown identity {}", u.identity)),
            },
            ServerFrame::Error { code, message, .. } => {
                self.error(format!("error frame: {code} {message}"));
            }
            _ => {}
        }
    }

    /// Subscribes `user` to the users it watches and waits for `subscribed`.
    pub(super) async fn subscribe_reach(&self, user: u32, ws: &mut Ws) -> Result<(), String> {
        let watched = self.sc.watches(user);
        if watched.is_empty() {
            *self.slot(user).view.borrow_mut() = Vec::new();
            return Ok(());
        }
        let id = self.next_req.get();
        self.next_req.set(id + 1);
        let sent = now_ns();
        ws.send(self.message(&ClientFrame::Subscribe {
            id,
            identities: watched.iter().map(|u| identity(*u)).collect(),
        }))
        .await
        .map_err(|e| format!("send subscribe: {e}"))?;
        let reply = tokio::time::timeout(self.reply_timeout(), async {
            loop {
                match ws.next().await {
                    Some(Ok(m)) => match self.frame(&m)? {
                        Some(ServerFrame::Subscribed {
                            id: rid,
                            users,
                            errors,
                        }) if rid == id => {
                            return Ok((users, errors));
                        }
                        Some(other) => self.on_frame(user, other),
                        None => {}
                    },
                    Some(Err(e)) => return Err(format!("read subscribed: {e}")),
                    None => return Err("closed before subscribed".into()),
                }
            }
        })
        .await
        .map_err(|_| "no subscribed in time".to_string())??;
        record_ns(&mut self.h.borrow_mut().subscribe, now_ns() - sent);
        let (users, errors) = reply;
        for e in errors {
            self.error(format!(
                "subscribe {}: {} {}",
                e.identity, e.code, e.message
            ));
        }
        let mut view = Vec::with_capacity(users.len());
        for u in users {
            if let Some(x) = user_of(&u.identity) {
                if self.storm.get() && u.is_online != Some(true) {
                    self.c.borrow_mut().spurious_snapshot += 1;
                }
                view.push((x, u.is_online));
            }
        }
        *self.slot(user).view.borrow_mut() = view;
        Ok(())
    }

    /// Reads the next message and handles it.
    pub(super) async fn recv_reach(&self, user: u32, ws: &mut Ws) -> Result<(), String> {
        let frame = match ws.next().await {
            Some(Ok(m)) => self.frame(&m)?,
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("server closed the socket".into()),
        };
        if let Some(f) = frame {
            self.on_frame(user, f);
        }
        Ok(())
    }

    /// `bye`, then reads to the server's close.
    pub(super) async fn bye_reach(&self, user: u32, mut ws: Ws) {
        let _ = ws.send(self.message(&ClientFrame::Bye)).await;
        let _ = tokio::time::timeout(BYE_DRAIN, async {
            while let Some(Ok(m)) = ws.next().await {
                if let Ok(Some(f)) = self.frame(&m) {
                    self.on_frame(user, f);
                }
            }
        })
        .await;
    }
}
