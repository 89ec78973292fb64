//! Reach wire protocol, version 1: the frames that travel over a gateway WebSocket, their two
//! encodings, and the vocabulary every Reach crate shares.
//!
//! - this file: [`ClientFrame`], [`ServerFrame`], the wire [`User`], [`Encoding`] and the codecs;
//! - [`codes`]: the close codes ([`CloseCode`]) and the error codes ([`ErrorCode`]) of error
//!   frames and REST error bodies;
//! - [`sid`]: SIDs, the ids of every resource (generated and checked only there);
//! - [`flags`]: the null rules of `is_online`, `is_notifiable` and the last-seen time, which REST,
//!   frames and webhooks all apply;
//! - [`token`] (feature `token`): the access token a client presents in `hello`.
//!
//! Data flow: the gateway reads one WebSocket message, checks its size, then calls
//! [`decode_client`] with the connection's [`Encoding`] to get a [`ClientFrame`] (or a
//! [`DecodeError`] that maps to an error frame and close 4002). Replies and pushes are built as
//! [`ServerFrame`] values and turned into bytes once with [`encode`]; the bytes are shared by
//! every subscriber that receives the same frame.
//!
//! Both encodings carry the same objects with the same field names: `reach.v1.json` as one JSON
//! object per text message, `reach.v1.msgpack` as one MessagePack map per binary message.

pub mod codes;
pub mod flags;
pub mod sid;
#[cfg(feature = "token")]
pub mod token;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use codes::{CloseCode, ErrorCode};
pub use flags::ServiceState;
pub use sid::{AccountSid, ApiKeySid, ServiceSid, SidKind};

/// Unix seconds now: the clock of token lifetimes and record dates.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Subprotocol name for MessagePack binary frames.
pub const SUBPROTOCOL_MSGPACK: &str = "reach.v1.msgpack";
/// Subprotocol name for JSON text frames.
pub const SUBPROTOCOL_JSON: &str = "reach.v1.json";

/// How a connection's frames are encoded, chosen by the WebSocket subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// `reach.v1.json`, or no subprotocol offered: text messages.
    Json,
    /// `reach.v1.msgpack`: binary messages.
    MsgPack,
}

impl Encoding {
    /// Both encodings, in a fixed order (index = [`Encoding::index`]).
    pub const ALL: [Encoding; 2] = [Encoding::Json, Encoding::MsgPack];

    /// The subprotocol name this encoding answers to.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => SUBPROTOCOL_JSON,
            Encoding::MsgPack => SUBPROTOCOL_MSGPACK,
        }
    }

    /// A dense index, for per-encoding caches.
    pub fn index(self) -> usize {
        match self {
            Encoding::Json => 0,
            Encoding::MsgPack => 1,
        }
    }

    /// Picks the encoding from a `Sec-WebSocket-Protocol` offer (comma separated).
    ///
    /// `Ok(None)` when nothing was offered (JSON, without echoing a subprotocol), an error when
    /// only unknown protocols were offered. The first known protocol in the offer wins.
    pub fn negotiate(offer: Option<&str>) -> Result<Option<Encoding>, UnsupportedSubprotocol> {
        let Some(offer) = offer else { return Ok(None) };
        let mut any = false;
        for p in offer.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            any = true;
            if p == SUBPROTOCOL_MSGPACK {
                return Ok(Some(Encoding::MsgPack));
            }
            if p == SUBPROTOCOL_JSON {
                return Ok(Some(Encoding::Json));
            }
        }
        if any {
            Err(UnsupportedSubprotocol)
        } else {
            Ok(None)
        }
    }
}

/// A WebSocket upgrade offered only subprotocols this gateway does not speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unsupported subprotocol: offer {SUBPROTOCOL_MSGPACK} or {SUBPROTOCOL_JSON}")]
pub struct UnsupportedSubprotocol;

/// The push service of a device registration (`register_push`, REST Bindings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BindingType {
    /// Apple Push Notification service.
    Apn,
    /// Google Cloud Messaging (legacy).
    Gcm,
    /// Firebase Cloud Messaging.
    Fcm,
}

impl BindingType {
    /// Every binding type, in the order error messages list them.
    pub const ALL: [BindingType; 3] = [BindingType::Apn, BindingType::Gcm, BindingType::Fcm];
    /// The wire names, as error messages list them.
    pub const NAMES: &'static str = "apn, gcm, fcm";

    /// The wire name: `apn`, `gcm` or `fcm`.
    pub fn as_str(self) -> &'static str {
        match self {
            BindingType::Apn => "apn",
            BindingType::Gcm => "gcm",
            BindingType::Fcm => "fcm",
        }
    }
}

impl std::fmt::Display for BindingType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for BindingType {
    type Err = UnknownBindingType;

    /// ```
    /// use reach_proto::BindingType;
    /// assert_eq!("fcm".parse::<BindingType>(), Ok(BindingType::Fcm));
    /// assert!("sms".parse::<BindingType>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, UnknownBindingType> {
        BindingType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownBindingType(s.to_owned()))
    }
}

/// A binding type other than [`BindingType::NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown binding type {0:?}: use apn, gcm or fcm")]
pub struct UnknownBindingType(pub String);

/// Why a user's state changed; wire names as in the hosted SDKs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum UpdateReason {
    #[serde(rename = "friendlyName")]
    FriendlyName,
    #[serde(rename = "attributes")]
    Attributes,
    #[serde(rename = "reachabilityOnline")]
    ReachabilityOnline,
    #[serde(rename = "reachabilityNotifiable")]
    ReachabilityNotifiable,
}

impl UpdateReason {
    /// All reasons, in wire order.
    pub const ALL: [UpdateReason; 4] = [
        UpdateReason::FriendlyName,
        UpdateReason::Attributes,
        UpdateReason::ReachabilityOnline,
        UpdateReason::ReachabilityNotifiable,
    ];

    /// The wire name (`friendlyName`, `attributes`, `reachabilityOnline`,
    /// `reachabilityNotifiable`).
    pub fn name(self) -> &'static str {
        match self {
            UpdateReason::FriendlyName => "friendlyName",
            UpdateReason::Attributes => "attributes",
            UpdateReason::ReachabilityOnline => "reachabilityOnline",
            UpdateReason::ReachabilityNotifiable => "reachabilityNotifiable",
        }
    }

    fn bit(self) -> u8 {
        match self {
            UpdateReason::FriendlyName => 1,
            UpdateReason::Attributes => 2,
            UpdateReason::ReachabilityOnline => 4,
            UpdateReason::ReachabilityNotifiable => 8,
        }
    }
}

/// A small set of [`UpdateReason`]s, merged when pending updates coalesce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Reasons(u8);

impl Reasons {
    pub const EMPTY: Reasons = Reasons(0);

    pub fn of(reason: UpdateReason) -> Self {
        Reasons(reason.bit())
    }
    pub fn with(self, reason: UpdateReason) -> Self {
        Reasons(self.0 | reason.bit())
    }
    pub fn union(self, other: Reasons) -> Self {
        Reasons(self.0 | other.0)
    }
    pub fn contains(self, reason: UpdateReason) -> bool {
        self.0 & reason.bit() != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn to_vec(self) -> Vec<UpdateReason> {
        UpdateReason::ALL
            .into_iter()
            .filter(|r| self.contains(*r))
            .collect()
    }
}

impl FromIterator<UpdateReason> for Reasons {
    fn from_iter<I: IntoIterator<Item = UpdateReason>>(iter: I) -> Self {
        iter.into_iter().fold(Reasons::EMPTY, Reasons::with)
    }
}

/// The user object, as REST returns it for that user at that moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub identity: String,
    pub friendly_name: Option<String>,
    /// JSON text (`"{}"` when unset).
    pub attributes: String,
    pub is_online: Option<bool>,
    pub is_notifiable: Option<bool>,
    /// When the user was last seen, in unix seconds: now while online, else when it went
    /// offline; null by the rules of `is_online` ([`flags::last_seen`]). Absent in frames of
    /// servers that predate it (read as null).
    #[serde(default)]
    pub last_seen_at: Option<i64>,
}

/// A per-identity failure inside a `subscribed` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityError {
    pub identity: String,
    pub code: u32,
    pub message: String,
}

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Hello {
        token: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
    },
    Subscribe {
        id: i64,
        identities: Vec<String>,
    },
    Unsubscribe {
        id: i64,
        identities: Vec<String>,
    },
    Ping {
        id: i64,
    },
    UpdateToken {
        id: i64,
        token: String,
    },
    RegisterPush {
        id: i64,
        binding_type: String,
        address: String,
    },
    UnregisterPush {
        id: i64,
        binding_type: String,
        address: String,
    },
    Bye,
}

impl ClientFrame {
    /// Every `type` a client may send.
    pub const TYPES: [&'static str; 8] = [
        "hello",
        "subscribe",
        "unsubscribe",
        "ping",
        "update_token",
        "register_push",
        "unregister_push",
        "bye",
    ];

    /// The request id, for frames that expect a reply.
    pub fn id(&self) -> Option<i64> {
        match self {
            ClientFrame::Hello { .. } | ClientFrame::Bye => None,
            ClientFrame::Subscribe { id, .. }
            | ClientFrame::Unsubscribe { id, .. }
            | ClientFrame::Ping { id }
            | ClientFrame::UpdateToken { id, .. }
            | ClientFrame::RegisterPush { id, .. }
            | ClientFrame::UnregisterPush { id, .. } => Some(*id),
        }
    }
}

/// Frames the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        connection_id: String,
        identity: String,
        service_sid: String,
        reachability_enabled: bool,
        heartbeat_interval_ms: u64,
        token_expires_at: i64,
        user: User,
    },
    Subscribed {
        id: i64,
        users: Vec<User>,
        errors: Vec<IdentityError>,
    },
    Unsubscribed {
        id: i64,
    },
    Pong {
        id: i64,
    },
    TokenUpdated {
        id: i64,
        token_expires_at: i64,
    },
    PushRegistered {
        id: i64,
        binding_sid: String,
    },
    PushUnregistered {
        id: i64,
    },
    UserUpdated {
        user: User,
        reasons: Vec<UpdateReason>,
    },
    ServiceUpdated {
        reachability_enabled: bool,
    },
    TokenAboutToExpire {
        expires_at: i64,
    },
    Goodbye {
        reason: String,
        retry_after_ms: u64,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<i64>,
        code: u32,
        message: String,
    },
}

/// Why a client frame could not be read. Every variant closes the connection with 4002.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    #[error("a {0} frame must be a {1} message")]
    WrongMessageKind(&'static str, &'static str),
}

impl DecodeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::UnknownType(_) => ErrorCode::UnknownFrameType,
            DecodeError::Malformed(_) | DecodeError::WrongMessageKind(..) => {
                ErrorCode::MalformedFrame
            }
        }
    }
    pub fn close_code(&self) -> CloseCode {
        CloseCode::ProtocolError
    }
}

#[derive(Deserialize)]
struct TypeOnly {
    #[serde(rename = "type")]
    kind: String,
}

/// Decodes one client frame from a message payload in the given encoding.
pub fn decode_client(payload: &[u8], encoding: Encoding) -> Result<ClientFrame, DecodeError> {
    let first = match encoding {
        Encoding::Json => serde_json::from_slice::<ClientFrame>(payload).map_err(|e| e.to_string()),
        Encoding::MsgPack => {
            rmp_serde::from_slice::<ClientFrame>(payload).map_err(|e| e.to_string())
        }
    };
    first.map_err(|detail| {
        // Tell an unknown `type` apart from a known type with bad fields.
        let kind = match encoding {
            Encoding::Json => serde_json::from_slice::<TypeOnly>(payload).ok(),
            Encoding::MsgPack => rmp_serde::from_slice::<TypeOnly>(payload).ok(),
        };
        match kind {
            Some(TypeOnly { kind }) if !ClientFrame::TYPES.contains(&kind.as_str()) => {
                DecodeError::UnknownType(kind)
            }
            _ => DecodeError::Malformed(detail),
        }
    })
}

/// Encodes a frame. Serialising these types cannot fail.
pub fn encode<T: Serialize>(frame: &T, encoding: Encoding) -> Bytes {
    // 128 bytes, as serde_json's own buffer starts: a `user_updated` frame fits, where a
    // buffer grown from empty is reallocated five times on the way.
    encode_sized(frame, encoding, 128)
}

/// [`encode`] into a buffer that starts at `capacity` bytes (a frame's expected size: each
/// time a buffer outgrows its capacity it is copied into one twice as large).
pub fn encode_sized<T: Serialize>(frame: &T, encoding: Encoding, capacity: usize) -> Bytes {
    let mut buf = Vec::with_capacity(capacity);
    match encoding {
        Encoding::Json => serde_json::to_writer(&mut buf, frame).expect("frames serialise"),
        Encoding::MsgPack => {
            rmp_serde::encode::write_named(&mut buf, frame).expect("frames serialise")
        }
    }
    Bytes::from(buf)
}

/// Decodes a server frame (for clients and tests).
pub fn decode_server(payload: &[u8], encoding: Encoding) -> Result<ServerFrame, DecodeError> {
    match encoding {
        Encoding::Json => serde_json::from_slice(payload).map_err(|e| e.to_string()),
        Encoding::MsgPack => rmp_serde::from_slice(payload).map_err(|e| e.to_string()),
    }
    .map_err(DecodeError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            identity: "bob".into(),
            friendly_name: None,
            attributes: "{}".into(),
            is_online: Some(true),
            is_notifiable: None,
            last_seen_at: Some(1_795_639_384),
        }
    }

    #[test]
    fn reason_names_are_the_wire_names() {
        for reason in UpdateReason::ALL {
            assert_eq!(
                serde_json::to_value(reason).unwrap(),
                serde_json::Value::from(reason.name())
            );
        }
    }

    #[test]
    fn client_frames_round_trip_in_both_encodings() {
        let frames = vec![
            ClientFrame::Hello {
                token: "t".into(),
                client: Some("x/1".into()),
            },
            ClientFrame::Subscribe {
                id: 1,
                identities: vec!["bob".into()],
            },
            ClientFrame::Unsubscribe {
                id: 2,
                identities: vec![],
            },
            ClientFrame::Ping { id: 3 },
            ClientFrame::UpdateToken {
                id: 4,
                token: "t".into(),
            },
            ClientFrame::RegisterPush {
                id: 5,
                binding_type: "fcm".into(),
                address: "a".into(),
            },
            ClientFrame::UnregisterPush {
                id: 6,
                binding_type: "fcm".into(),
                address: "a".into(),
            },
            ClientFrame::Bye,
        ];
        for enc in Encoding::ALL {
            for f in &frames {
                let bytes = encode(f, enc);
                assert_eq!(&decode_client(&bytes, enc).unwrap(), f);
            }
        }
    }

    #[test]
    fn json_wire_shape_matches_protocol() {
        let f = ServerFrame::UserUpdated {
            user: user(),
            reasons: vec![UpdateReason::ReachabilityOnline],
        };
        let v: serde_json::Value = serde_json::from_slice(&encode(&f, Encoding::Json)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"user_updated","user":{"identity":"bob","friendly_name":null,
                "attributes":"{}","is_online":true,"is_notifiable":null,"last_seen_at":1_795_639_384_i64},
                "reasons":["reachabilityOnline"]})
        );
        let e = ServerFrame::Error {
            id: None,
            code: 20400,
            message: "m".into(),
        };
        let v: serde_json::Value = serde_json::from_slice(&encode(&e, Encoding::Json)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"error","code":20400,"message":"m"})
        );
    }

    #[test]
    fn msgpack_frames_are_maps_with_named_fields() {
        let bytes = encode(&ServerFrame::Pong { id: 7 }, Encoding::MsgPack);
        let v: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(v, serde_json::json!({"type":"pong","id":7}));
        assert_eq!(
            decode_server(&bytes, Encoding::MsgPack).unwrap(),
            ServerFrame::Pong { id: 7 }
        );
    }

    #[test]
    fn unknown_type_is_told_apart_from_malformed() {
        assert_eq!(
            decode_client(br#"{"type":"dance","id":1}"#, Encoding::Json),
            Err(DecodeError::UnknownType("dance".into()))
        );
        assert!(matches!(
            decode_client(br#"{"type":"ping"}"#, Encoding::Json),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_client(b"{not json", Encoding::Json),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_client(b"[1,2]", Encoding::Json),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_client(&[0xc1], Encoding::MsgPack),
            Err(DecodeError::Malformed(_))
        ));
        let unknown = rmp_serde::to_vec_named(&serde_json::json!({"type":"dance"})).unwrap();
        assert_eq!(
            decode_client(&unknown, Encoding::MsgPack),
            Err(DecodeError::UnknownType("dance".into()))
        );
    }

    #[test]
    fn negotiation_prefers_first_known_and_refuses_only_unknown() {
        assert_eq!(Encoding::negotiate(None), Ok(None));
        assert_eq!(
            Encoding::negotiate(Some("reach.v1.msgpack")),
            Ok(Some(Encoding::MsgPack))
        );
        assert_eq!(
            Encoding::negotiate(Some("foo, reach.v1.json, reach.v1.msgpack")),
            Ok(Some(Encoding::Json))
        );
        assert_eq!(
            Encoding::negotiate(Some("foo, bar")),
            Err(UnsupportedSubprotocol)
        );
    }

    #[test]
    fn binding_type_names_list_every_type() {
        let names: Vec<&str> = BindingType::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(BindingType::NAMES, names.join(", "));
        for t in BindingType::ALL {
            assert_eq!(t.as_str().parse::<BindingType>(), Ok(t));
        }
    }

    #[test]
    fn reasons_merge_and_keep_wire_order() {
        let r = Reasons::of(UpdateReason::ReachabilityNotifiable)
            .union(Reasons::of(UpdateReason::FriendlyName));
        assert_eq!(
            r.to_vec(),
            vec![
                UpdateReason::FriendlyName,
                UpdateReason::ReachabilityNotifiable
            ]
        );
        assert_eq!(
            serde_json::to_string(&r.to_vec()).unwrap(),
            r#"["friendlyName","reachabilityNotifiable"]"#
        );
    }
}
