//! The servers the harness can drive, and what reach's presence model maps to on each peer.
//!
//! - `reach`: reachd itself (`hello`, `subscribe` to identities, `user_updated`).
//! - `pusher`: a Pusher-protocol server (Soketi). A group of users is a presence channel
//!   `presence-room-<group>`: a user is online while it is subscribed, and the watchers of a
//!   group are its members. `pusher_internal:member_added` / `member_removed` are the online /
//!   offline notifications; `pusher_internal:subscription_succeeded`'s member list is the
//!   snapshot a `subscribed` reply gives on reach. A user leaves by unsubscribing (`bye`) or by
//!   a TCP reset (abrupt).
//! - `mqtt`: an MQTT 3.1.1 broker (Mosquitto). User `i` owns the retained topic
//!   `presence/<group>/u<i>`: `1` published on connect, `0` published before a clean
//!   `DISCONNECT`, and `0` as its last will for an abrupt close (a reset socket: at once; a silent
//!   peer: after 1.5 x keepalive). Watchers subscribe to `presence/<group>/+` (rooms) or to each
//!   watched user's topic; retained messages delivered on subscribe (RETAIN flag set) are the
//!   snapshot, live ones (flag clear) the notifications.
//!
//! Neither peer has an offline grace: an abrupt close is shown at once, so every abrupt close is
//! a visible event there. In the fanout topology the watchers are nobody's watched users: on
//! Pusher they share one member id (`watcher`), so their own joins are not broadcast to each
//! other (a presence channel shows every member to every member), and on MQTT they publish
//! nothing.

use bytes::BytesMut;
use hmac::{Hmac, Mac};
use rumqttc::mqttbytes::v4::Packet;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::scenario::{Scenario, Topology, identity};

/// Which server the harness drives.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// reachd (its own protocol).
    #[default]
    Reach,
    /// A Pusher-protocol server with presence channels (Soketi).
    Pusher,
    /// An MQTT 3.1.1 broker with retained messages and last wills (Mosquitto).
    Mqtt,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Reach => "reach",
            Target::Pusher => "pusher",
            Target::Mqtt => "mqtt",
        }
    }

    /// The server's command name in `/proc/<pid>/comm`, to find its PID when none is given.
    pub fn process_name(self) -> &'static str {
        match self {
            Target::Reach => "reachd",
            Target::Pusher => "soketi-server",
            Target::Mqtt => "mosquitto",
        }
    }

    /// Whether an abrupt close is shown to watchers at once (no offline grace).
    pub fn has_grace(self) -> bool {
        self == Target::Reach
    }

    /// Why `scenario` cannot run against this target, if it cannot.
    pub fn check(self, s: &Scenario) -> Result<(), String> {
        if self == Target::Reach {
            return Ok(());
        }
        if s.kind == crate::scenario::Kind::Storm {
            return Err(format!(
                "the storm scenario measures reconnects inside reach's offline grace; {} has none",
                self.name()
            ));
        }
        if self == Target::Pusher && s.topology() == Topology::Ring {
            return Err(
                "pusher needs the rooms or fanout topology (a presence channel shows \
                        every member to every member; set topology = \"rooms\")"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The group (presence channel, topic level) user `user` belongs to.
pub fn group(s: &Scenario, user: u32) -> u32 {
    match s.topology() {
        Topology::Rooms => user / s.room_size,
        Topology::Ring | Topology::Fanout => 0,
    }
}

/// Whether anybody watches `user` (fanout watchers are watched by nobody).
pub fn is_watched(s: &Scenario, user: u32) -> bool {
    s.topology() != Topology::Fanout || user < s.flappers
}

// ---------------------------------------------------------------------------------------------
// Pusher

/// The member id fanout watchers share on Pusher.
pub const SHARED_WATCHER: &str = "watcher";

pub fn pusher_channel(s: &Scenario, user: u32) -> String {
    format!("presence-room-{}", group(s, user))
}

pub fn pusher_user_id(s: &Scenario, user: u32) -> String {
    if is_watched(s, user) {
        identity(user)
    } else {
        SHARED_WATCHER.to_string()
    }
}

/// The WebSocket URL of app `key` on a Pusher server at `base` (`ws://HOST:PORT`).
pub fn pusher_url(base: &str, key: &str) -> String {
    format!(
        "{}/app/{key}?protocol=7&client=reach-loadtest&version=0.1&flash=false",
        base.trim_end_matches('/')
    )
}

/// `<key>:<hex hmac_sha256(secret, "<socket_id>:<channel>:<channel_data>")>`, the `auth` field
/// of a presence-channel subscription.
pub fn pusher_auth(
    key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: &str,
) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(socket_id.as_bytes());
    mac.update(b":");
    mac.update(channel.as_bytes());
    mac.update(b":");
    mac.update(channel_data.as_bytes());
    let sig = mac.finalize().into_bytes();
    let mut out = String::with_capacity(key.len() + 1 + 64);
    out.push_str(key);
    out.push(':');
    for b in sig {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    out
}

/// The `pusher:subscribe` message for a presence channel.
pub fn pusher_subscribe(channel: &str, auth: &str, channel_data: &str) -> String {
    serde_json::json!({
        "event": "pusher:subscribe",
        "data": {"channel": channel, "auth": auth, "channel_data": channel_data},
    })
    .to_string()
}

pub fn pusher_unsubscribe(channel: &str) -> String {
    serde_json::json!({"event": "pusher:unsubscribe", "data": {"channel": channel}}).to_string()
}

/// A message from a Pusher server, as far as the harness reads it.
#[derive(Debug, PartialEq)]
pub enum PusherIn {
    /// `pusher:connection_established`.
    Established {
        socket_id: String,
    },
    /// `pusher_internal:subscription_succeeded` of a presence channel: its member ids.
    Subscribed {
        channel: String,
        ids: Vec<String>,
    },
    /// `pusher_internal:member_added` (true) / `member_removed` (false).
    Member {
        user_id: String,
        online: bool,
    },
    /// `pusher:ping`: answer with `pusher:pong`.
    Ping,
    /// `pusher:error` or `pusher:subscription_error`.
    Error(String),
    Other,
}

#[derive(Deserialize)]
struct Envelope {
    event: String,
    #[serde(default)]
    channel: Option<String>,
    /// A JSON string holding JSON (most events) or an object (errors).
    #[serde(default)]
    data: serde_json::Value,
}

#[derive(Deserialize)]
struct Established {
    socket_id: String,
}

#[derive(Deserialize)]
struct Member {
    user_id: serde_json::Value,
}

#[derive(Deserialize)]
struct Presence {
    presence: PresenceIds,
}

#[derive(Deserialize)]
struct PresenceIds {
    ids: Vec<serde_json::Value>,
}

fn id_string(v: serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

fn inner<T: serde::de::DeserializeOwned>(data: &serde_json::Value) -> Result<T, String> {
    match data {
        serde_json::Value::String(s) => serde_json::from_str(s),
        other => T::deserialize(other),
    }
    .map_err(|e| format!("pusher data: {e}"))
}

pub fn parse_pusher(text: &str) -> Result<PusherIn, String> {
    let env: Envelope = serde_json::from_str(text).map_err(|e| format!("pusher frame: {e}"))?;
    Ok(match env.event.as_str() {
        "pusher:connection_established" => PusherIn::Established {
            socket_id: inner::<Established>(&env.data)?.socket_id,
        },
        "pusher_internal:subscription_succeeded" => PusherIn::Subscribed {
            channel: env.channel.unwrap_or_default(),
            ids: inner::<Presence>(&env.data)?
                .presence
                .ids
                .into_iter()
                .map(id_string)
                .collect(),
        },
        "pusher_internal:member_added" | "pusher_internal:member_removed" => PusherIn::Member {
            user_id: id_string(inner::<Member>(&env.data)?.user_id),
            online: env.event.ends_with("added"),
        },
        "pusher:ping" => PusherIn::Ping,
        "pusher:error" | "pusher:subscription_error" => {
            PusherIn::Error(format!("{}: {}", env.event, env.data))
        }
        _ => PusherIn::Other,
    })
}

// ---------------------------------------------------------------------------------------------
// MQTT

/// Largest MQTT packet the harness reads or writes.
pub const MQTT_MAX_PACKET: usize = 64 * 1024;

pub fn mqtt_topic(s: &Scenario, user: u32) -> String {
    format!("presence/{}/{}", group(s, user), identity(user))
}

/// The topic filters `user` subscribes to.
pub fn mqtt_filters(s: &Scenario, user: u32) -> Vec<String> {
    match s.topology() {
        Topology::Rooms => vec![format!("presence/{}/+", group(s, user))],
        Topology::Ring | Topology::Fanout => s
            .watches(user)
            .into_iter()
            .map(|u| mqtt_topic(s, u))
            .collect(),
    }
}

/// The keepalive the harness announces: the broker drops a silent client (and publishes its
/// will) after 1.5 x keepalive, which is set to match the scenario's heartbeat timeout.
pub fn mqtt_keepalive_s(s: &Scenario) -> u16 {
    ((s.heartbeat_timeout_ms / 1500).clamp(1, u64::from(u16::MAX))) as u16
}

/// Appends `p` to `buf`.
pub fn mqtt_write(p: &Packet, buf: &mut BytesMut) -> Result<(), String> {
    p.write(buf, MQTT_MAX_PACKET)
        .map(|_| ())
        .map_err(|e| format!("mqtt encode: {e}"))
}

/// Takes the next whole packet off `buf`, if one is there.
pub fn mqtt_read(buf: &mut BytesMut) -> Result<Option<Packet>, String> {
    match Packet::read(buf, MQTT_MAX_PACKET) {
        Ok(p) => Ok(Some(p)),
        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(format!("mqtt decode: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Kind;

    #[test]
    fn pusher_auth_is_the_documented_hmac() {
        // The example of the Pusher channels authentication docs (key 278d425bdf160c739803,
        // secret 7ad3773142a6692b25b8, socket 1234.1234, presence-foobar); the expected value
        // is also what Python's hmac module computes.
        let data = r#"{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#;
        let auth = pusher_auth(
            "278d425bdf160c739803",
            "7ad3773142a6692b25b8",
            "1234.1234",
            "presence-foobar",
            data,
        );
        assert_eq!(
            auth,
            "278d425bdf160c739803:31935e7d86dba64c2a90aed31fdc61869f9b22ba9d8863bba239c03ca481bc80"
        );
    }

    #[test]
    fn parses_presence_events_with_stringified_data() {
        let added = r#"{"event":"pusher_internal:member_added","channel":"presence-room-1","data":"{\"user_id\":\"u12\",\"user_info\":null}"}"#;
        assert_eq!(
            parse_pusher(added).unwrap(),
            PusherIn::Member {
                user_id: "u12".into(),
                online: true
            }
        );
        let ok = r#"{"event":"pusher_internal:subscription_succeeded","channel":"presence-room-1","data":"{\"presence\":{\"ids\":[\"u10\",\"u11\"],\"hash\":{},\"count\":2}}"}"#;
        assert_eq!(
            parse_pusher(ok).unwrap(),
            PusherIn::Subscribed {
                channel: "presence-room-1".into(),
                ids: vec!["u10".into(), "u11".into()]
            }
        );
        let est = r#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"123.456\",\"activity_timeout\":30}"}"#;
        assert_eq!(
            parse_pusher(est).unwrap(),
            PusherIn::Established {
                socket_id: "123.456".into()
            }
        );
    }

    #[test]
    fn topics_and_channels_follow_the_topology() {
        let rooms = Scenario {
            kind: Kind::Rooms,
            sockets: 100,
            room_size: 10,
            ..Scenario::default()
        };
        assert_eq!(mqtt_topic(&rooms, 23), "presence/2/u23");
        assert_eq!(mqtt_filters(&rooms, 23), vec!["presence/2/+".to_string()]);
        assert_eq!(pusher_channel(&rooms, 23), "presence-room-2");
        let fanout = Scenario {
            kind: Kind::Fanout,
            sockets: 100,
            flappers: 1,
            ..Scenario::default()
        };
        assert_eq!(mqtt_filters(&fanout, 50), vec!["presence/0/u0".to_string()]);
        assert_eq!(pusher_user_id(&fanout, 0), "u0");
        assert_eq!(pusher_user_id(&fanout, 50), SHARED_WATCHER);
        assert!(Target::Pusher.check(&Scenario::default()).is_err());
    }

    #[test]
    fn mqtt_packets_round_trip_and_wait_for_whole_packets() {
        use rumqttc::mqttbytes::QoS;
        use rumqttc::mqttbytes::v4::Publish;
        let mut p = Publish::new("presence/0/u1", QoS::AtMostOnce, b"1".to_vec());
        p.retain = true;
        let mut buf = BytesMut::new();
        mqtt_write(&Packet::Publish(p.clone()), &mut buf).unwrap();
        let mut half = buf.split_to(4);
        assert_eq!(mqtt_read(&mut half).unwrap(), None);
        half.unsplit(buf);
        assert_eq!(mqtt_read(&mut half).unwrap(), Some(Packet::Publish(p)));
    }
}
