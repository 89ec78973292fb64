//! The MQTT driver (Mosquitto): a user owns a retained topic (`1` on connect, `0` before a
//! clean DISCONNECT and as its last will); watchers subscribe to the topics, the retained
//! messages delivered on subscribe are the snapshot and live ones the notifications (see
//! [`crate::peer`]).

use std::pin::Pin;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnectReturnCode, LastWill, Packet, Publish, Subscribe, SubscribeFilter, SubscribeReasonCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{BYE_DRAIN, Worker};
use crate::ipc::EventKind;
use crate::peer;
use crate::scenario::{identity, user_of};
use crate::stats::{now_ns, record_ns};

/// A user's MQTT connection.
pub(super) struct MqttConn {
    pub stream: TcpStream,
    /// Bytes read and not yet parsed into packets.
    buf: BytesMut,
    /// When the next PINGREQ is due (every keepalive / 2).
    ping: Pin<Box<tokio::time::Sleep>>,
    ping_every: Duration,
}

impl MqttConn {
    /// Reads more bytes into `buf`, sending PINGREQs while it waits. Cancel-safe.
    async fn fill(&mut self) -> Result<(), String> {
        if self.buf.capacity() - self.buf.len() < 256 {
            self.buf.reserve(1024);
        }
        loop {
            tokio::select! {
                r = self.stream.read_buf(&mut self.buf) => {
                    return match r {
                        Ok(0) => Err("server closed the socket".into()),
                        Ok(_) => Ok(()),
                        Err(e) => Err(format!("read: {e}")),
                    };
                }
                () = &mut self.ping => {
                    // Two bytes into an idle socket's send buffer: never blocks in practice,
                    // and a PINGREQ lost to a full buffer is harmless (the data keeps it alive).
                    let _ = self.stream.try_write(&[0xC0, 0x00]);
                    let next = self.ping.deadline() + self.ping_every;
                    self.ping.as_mut().reset(next);
                }
            }
        }
    }

    /// Reads until `want` accepts a packet; other packets go to `other`.
    async fn until<T>(
        &mut self,
        mut want: impl FnMut(&Packet) -> Option<Result<T, String>>,
        mut other: impl FnMut(Packet),
    ) -> Result<T, String> {
        loop {
            while let Some(p) = peer::mqtt_read(&mut self.buf)? {
                match want(&p) {
                    Some(r) => return r,
                    None => other(p),
                }
            }
            self.fill().await?;
        }
    }
}

/// A retained presence state (`1` online, `0` offline) for an MQTT topic.
fn retained(topic: &str, online: bool) -> Publish {
    let mut p = Publish::new(topic, QoS::AtMostOnce, if online { "1" } else { "0" });
    p.retain = true;
    p
}

impl Worker {
    /// TCP connect, then CONNECT (with the last will `0`) and the retained `1`, pipelined;
    /// CONNECT -> CONNACK is timed as `hello`.
    pub(super) async fn establish_mqtt(
        &self,
        user: u32,
        visible: bool,
    ) -> Result<MqttConn, String> {
        let started = now_ns();
        let stream = self.retrying(|| self.tcp(user)).await?;
        record_ns(&mut self.h.borrow_mut().upgrade, now_ns() - started);
        let sc = &self.sc;
        let watched = peer::is_watched(sc, user);
        let topic = peer::mqtt_topic(sc, user);
        let n = self.next_client.get();
        self.next_client.set(n + 1);
        let keepalive = peer::mqtt_keepalive_s(sc);
        let mut connect = rumqttc::mqttbytes::v4::Connect::new(format!(
            "{}-{}-{n}",
            identity(user),
            self.plan.worker
        ));
        connect.keep_alive = keepalive;
        connect.clean_session = true;
        if watched {
            connect.last_will = Some(LastWill::new(&topic, "0", QoS::AtMostOnce, true));
        }
        let mut out = BytesMut::with_capacity(128);
        peer::mqtt_write(&Packet::Connect(connect), &mut out)?;
        if watched {
            peer::mqtt_write(&Packet::Publish(retained(&topic, true)), &mut out)?;
        }
        let ping_every = Duration::from_millis(u64::from(keepalive) * 500);
        let mut m = MqttConn {
            stream,
            buf: BytesMut::with_capacity(1024),
            ping: Box::pin(tokio::time::sleep(ping_every)),
            ping_every,
        };
        if visible {
            self.event(user, true, EventKind::Connect);
        }
        let sent = now_ns();
        m.stream
            .write_all(&out)
            .await
            .map_err(|e| format!("send connect: {e}"))?;
        tokio::time::timeout(
            self.reply_timeout(),
            m.until(
                |p| match p {
                    Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => Some(Ok(())),
                    Packet::ConnAck(a) => Some(Err(format!("connect refused: {:?}", a.code))),
                    _ => None,
                },
                |p| self.on_mqtt(user, p),
            ),
        )
        .await
        .map_err(|_| "no CONNACK in time".to_string())??;
        record_ns(&mut self.h.borrow_mut().hello, now_ns() - sent);
        self.c.borrow_mut().connects += 1;
        Ok(m)
    }

    /// Handles an MQTT packet read outside a request/reply exchange: a retained message is
    /// part of a subscription's snapshot, a live one a notification.
    fn on_mqtt(&self, user: u32, p: Packet) {
        match p {
            Packet::Publish(p) => {
                let Some(x) = p.topic.rsplit('/').next().and_then(user_of) else {
                    self.error(format!("publish on unknown topic {}", p.topic));
                    return;
                };
                let online = Some(p.payload.as_ref() == b"1");
                if p.retain {
                    self.set_view(user, x, online);
                } else {
                    self.notify(user, x, online);
                }
            }
            Packet::PingResp | Packet::SubAck(_) | Packet::UnsubAck(_) => {}
            other => self.error(format!("unexpected MQTT packet {other:?}")),
        }
    }

    /// SUBSCRIBE -> SUBACK; the retained states that follow fill the view.
    pub(super) async fn subscribe_mqtt(&self, user: u32, m: &mut MqttConn) -> Result<(), String> {
        let watched = self.sc.watches(user);
        *self.slot(user).view.borrow_mut() = watched.iter().map(|&x| (x, None)).collect();
        if watched.is_empty() {
            return Ok(());
        }
        let filters = peer::mqtt_filters(&self.sc, user)
            .into_iter()
            .map(|f| SubscribeFilter::new(f, QoS::AtMostOnce))
            .collect();
        let mut out = BytesMut::with_capacity(64);
        peer::mqtt_write(&Packet::Subscribe(Subscribe { pkid: 1, filters }), &mut out)?;
        let sent = now_ns();
        m.stream
            .write_all(&out)
            .await
            .map_err(|e| format!("send subscribe: {e}"))?;
        tokio::time::timeout(
            self.reply_timeout(),
            m.until(
                |p| match p {
                    Packet::SubAck(a) if a.pkid == 1 => {
                        Some(if a.return_codes.contains(&SubscribeReasonCode::Failure) {
                            Err("subscription refused".into())
                        } else {
                            Ok(())
                        })
                    }
                    _ => None,
                },
                |p| self.on_mqtt(user, p),
            ),
        )
        .await
        .map_err(|_| "no SUBACK in time".to_string())??;
        record_ns(&mut self.h.borrow_mut().subscribe, now_ns() - sent);
        Ok(())
    }

    /// Reads and handles the next packets. Packets read together with an earlier reply (the
    /// retained states right after a SUBACK) are handled before waiting for more bytes.
    pub(super) async fn recv_mqtt(&self, user: u32, m: &mut MqttConn) -> Result<(), String> {
        loop {
            let mut handled = false;
            while let Some(p) = peer::mqtt_read(&mut m.buf)? {
                self.on_mqtt(user, p);
                handled = true;
            }
            if handled {
                return Ok(());
            }
            m.fill().await?;
        }
    }

    /// The retained `0` (if watched) and DISCONNECT, then reads to the server's close.
    pub(super) async fn bye_mqtt(&self, user: u32, mut m: MqttConn) {
        let mut out = BytesMut::with_capacity(64);
        if peer::is_watched(&self.sc, user) {
            let topic = peer::mqtt_topic(&self.sc, user);
            let _ = peer::mqtt_write(&Packet::Publish(retained(&topic, false)), &mut out);
        }
        let _ = peer::mqtt_write(&Packet::Disconnect, &mut out);
        if m.stream.write_all(&out).await.is_ok() {
            let _ = m.stream.shutdown().await;
            let _ = tokio::time::timeout(BYE_DRAIN, async {
                while m.fill().await.is_ok() {
                    while let Ok(Some(p)) = peer::mqtt_read(&mut m.buf) {
                        self.on_mqtt(user, p);
                    }
                }
            })
            .await;
        }
    }
}
