//! The Pusher driver (Soketi): a user is a member of its group's presence channel; joining the
//! channel (an HMAC-signed `pusher:subscribe`) is both its connect and its subscription, and
//! `member_added` / `member_removed` are the notifications (see [`crate::peer`]).

use futures_util::SinkExt;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use super::{BYE_DRAIN, Worker, Ws};
use crate::ipc::EventKind;
use crate::peer::{self, PusherIn};
use crate::scenario::user_of;
use crate::stats::{now_ns, record_ns};

/// A user's Pusher connection.
pub(super) struct PusherConn {
    pub ws: Ws,
    /// From `pusher:connection_established`; signed into every subscription.
    socket_id: String,
}

impl Worker {
    /// Upgrade, then `pusher:connection_established` (timed as `hello`).
    pub(super) async fn establish_pusher(&self, user: u32) -> Result<PusherConn, String> {
        let mut ws = self.retrying(|| self.upgrade(user, None)).await?;
        let sent = now_ns();
        let socket_id = tokio::time::timeout(self.reply_timeout(), async {
            loop {
                match self.pusher_next(&mut ws).await? {
                    PusherIn::Established { socket_id } => return Ok(socket_id),
                    PusherIn::Error(e) => return Err(format!("connection refused: {e}")),
                    _ => {}
                }
            }
        })
        .await
        .map_err(|_| "no pusher:connection_established in time".to_string())??;
        record_ns(&mut self.h.borrow_mut().hello, now_ns() - sent);
        self.c.borrow_mut().connects += 1;
        Ok(PusherConn { ws, socket_id })
    }

    /// The next Pusher message (control frames are skipped; tungstenite answers pings).
    async fn pusher_next(&self, ws: &mut Ws) -> Result<PusherIn, String> {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return peer::parse_pusher(t.as_str()),
                Some(Ok(Message::Close(c))) => return Err(format!("server closed: {c:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("read: {e}")),
                None => return Err("server closed the socket".into()),
            }
        }
    }

    /// Handles a Pusher message read outside a request/reply exchange.
    fn on_pusher(&self, user: u32, m: PusherIn) {
        match m {
            PusherIn::Member { user_id, online } => match user_of(&user_id) {
                Some(x) => self.notify(user, x, Some(online)),
                None if user_id == peer::SHARED_WATCHER => {}
                None => self.error(format!("member event of unknown user {user_id}")),
            },
            PusherIn::Error(e) => self.error(e),
            _ => {}
        }
    }

    pub(super) async fn subscribe_pusher(
        &self,
        user: u32,
        p: &mut PusherConn,
        visible: bool,
    ) -> Result<(), String> {
        let sc = &self.sc;
        let channel = peer::pusher_channel(sc, user);
        let data = serde_json::json!({ "user_id": peer::pusher_user_id(sc, user) }).to_string();
        let auth = peer::pusher_auth(
            &self.plan.app_key,
            &self.plan.app_secret,
            &p.socket_id,
            &channel,
            &data,
        );
        let msg = peer::pusher_subscribe(&channel, &auth, &data);
        if visible {
            self.event(user, true, EventKind::Connect);
        }
        let sent = now_ns();
        p.ws.send(Message::text(msg))
            .await
            .map_err(|e| format!("send subscribe: {e}"))?;
        let ids = tokio::time::timeout(self.reply_timeout(), async {
            loop {
                match self.pusher_next(&mut p.ws).await? {
                    PusherIn::Subscribed { channel: c, ids } if c == channel => return Ok(ids),
                    PusherIn::Error(e) => return Err(format!("subscribe {channel}: {e}")),
                    other => self.on_pusher(user, other),
                }
            }
        })
        .await
        .map_err(|_| "no subscription_succeeded in time".to_string())??;
        record_ns(&mut self.h.borrow_mut().subscribe, now_ns() - sent);
        let present: Vec<u32> = ids.iter().filter_map(|i| user_of(i)).collect();
        *self.slot(user).view.borrow_mut() = sc
            .watches(user)
            .into_iter()
            .map(|x| (x, Some(present.contains(&x))))
            .collect();
        Ok(())
    }

    /// Reads the next message and handles it (answering a `pusher:ping`).
    pub(super) async fn recv_pusher(&self, user: u32, p: &mut PusherConn) -> Result<(), String> {
        match self.pusher_next(&mut p.ws).await? {
            PusherIn::Ping => {
                let pong = r#"{"event":"pusher:pong","data":{}}"#;
                p.ws.send(Message::text(pong))
                    .await
                    .map_err(|e| format!("send pong: {e}"))?;
            }
            m => self.on_pusher(user, m),
        }
        Ok(())
    }

    /// Unsubscribes and closes, then reads to the server's close.
    pub(super) async fn bye_pusher(&self, user: u32, mut p: PusherConn) {
        let channel = peer::pusher_channel(&self.sc, user);
        let _ =
            p.ws.send(Message::text(peer::pusher_unsubscribe(&channel)))
                .await;
        let _ = p.ws.close(None).await;
        let _ = tokio::time::timeout(BYE_DRAIN, async {
            while let Ok(m) = self.pusher_next(&mut p.ws).await {
                self.on_pusher(user, m);
            }
        })
        .await;
    }
}
