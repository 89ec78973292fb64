//! WebSocket close codes and the error codes shared by error frames and REST error bodies.
//!
//! Error codes follow the hosted REST API where it has one (20003, 20404, the 2010x token
//! codes, 50201...); protocol-level errors use `20` followed by the closest HTTP status.

/// Close codes of protocol v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: the client said `bye`, or the connection ended normally.
    Normal,
    /// 1001: the gateway is draining.
    GoingAway,
    /// 1009: a frame exceeded `max_frame_bytes`.
    TooBig,
    /// 1011: the gateway failed (a storage error at `hello`); the client may retry.
    InternalError,
    /// 4001: bad, expired or foreign token; no `hello` in time.
    Unauthorized,
    /// 4002: malformed frame, unknown type, frame before `hello`.
    ProtocolError,
    /// 4003: the token is fine but the connection may not continue (service or user deleted).
    Forbidden,
    /// 4008: nothing heard for `heartbeat_timeout`.
    HeartbeatTimeout,
    /// 4009: the client does not read its frames fast enough.
    SlowConsumer,
    /// 4029: too many connections or requests.
    RateLimited,
}

impl CloseCode {
    /// Every close code of protocol v1.
    pub const ALL: [CloseCode; 10] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::TooBig,
        CloseCode::InternalError,
        CloseCode::Unauthorized,
        CloseCode::ProtocolError,
        CloseCode::Forbidden,
        CloseCode::HeartbeatTimeout,
        CloseCode::SlowConsumer,
        CloseCode::RateLimited,
    ];

    /// The close code with this number, if protocol v1 has one.
    pub fn from_u16(code: u16) -> Option<CloseCode> {
        CloseCode::ALL.into_iter().find(|c| c.as_u16() == code)
    }

    pub fn as_u16(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::TooBig => 1009,
            CloseCode::InternalError => 1011,
            CloseCode::Unauthorized => 4001,
            CloseCode::ProtocolError => 4002,
            CloseCode::Forbidden => 4003,
            CloseCode::HeartbeatTimeout => 4008,
            CloseCode::SlowConsumer => 4009,
            CloseCode::RateLimited => 4029,
        }
    }

    /// A short label, used as the `reason` label of the connections-closed metric.
    pub fn label(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::GoingAway => "drain",
            CloseCode::TooBig => "frame_too_big",
            CloseCode::InternalError => "internal_error",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::ProtocolError => "protocol_error",
            CloseCode::Forbidden => "forbidden",
            CloseCode::HeartbeatTimeout => "heartbeat_timeout",
            CloseCode::SlowConsumer => "slow_consumer",
            CloseCode::RateLimited => "rate_limited",
        }
    }
}

/// Error codes carried by `error` frames, per-identity errors and REST error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 20001: a request parameter is invalid (REST 400).
    InvalidParameter,
    /// 20003: authentication failed (REST 401).
    AuthenticationFailed,
    /// 20004: the HTTP method is not allowed on this resource (REST 405).
    MethodNotAllowed,
    /// 20101: the access token is invalid (not a JWT, bad header, bad claims).
    InvalidAccessToken,
    /// 20103: unknown API key, or a key/account/service that do not belong together.
    InvalidIssuer,
    /// 20104: the access token expired, or its `exp` is more than 24 h ahead.
    TokenExpired,
    /// 20105: the access token's `nbf` lies in the future.
    TokenNotYetValid,
    /// 20106: the token has no chat grant with an identity and a service.
    InvalidGrant,
    /// 20107: the signature does not verify, or the algorithm is not HS256.
    InvalidSignature,
    /// 20400: a frame that cannot be decoded.
    MalformedFrame,
    /// 20403: forbidden (e.g. update_token for another identity).
    Forbidden,
    /// 20404: the requested resource was not found.
    NotFound,
    /// 20405: a frame of an unknown type.
    UnknownFrameType,
    /// 20408: nothing heard within the heartbeat timeout, or no hello within auth_timeout.
    Timeout,
    /// 20409: a frame that is not allowed in this state (anything before hello, a second hello).
    UnexpectedFrame,
    /// 20413: a frame larger than max_frame_bytes.
    FrameTooBig,
    /// 20429: too many connections, subscriptions or requests.
    TooMany,
    /// 20500: an internal error; the request may be retried.
    Internal,
    /// 20503: the gateway is draining or not ready.
    Unavailable,
    /// 50201: a user with this identity already exists.
    UserExists,
    /// 50204: the identity was not provided.
    IdentityMissing,
    /// 50206: the identity looks like a SID.
    IdentityLooksLikeSid,
}

impl ErrorCode {
    pub fn as_u32(self) -> u32 {
        match self {
            ErrorCode::InvalidParameter => 20001,
            ErrorCode::AuthenticationFailed => 20003,
            ErrorCode::MethodNotAllowed => 20004,
            ErrorCode::InvalidAccessToken => 20101,
            ErrorCode::InvalidIssuer => 20103,
            ErrorCode::TokenExpired => 20104,
            ErrorCode::TokenNotYetValid => 20105,
            ErrorCode::InvalidGrant => 20106,
            ErrorCode::InvalidSignature => 20107,
            ErrorCode::MalformedFrame => 20400,
            ErrorCode::Forbidden => 20403,
            ErrorCode::NotFound => 20404,
            ErrorCode::UnknownFrameType => 20405,
            ErrorCode::Timeout => 20408,
            ErrorCode::UnexpectedFrame => 20409,
            ErrorCode::FrameTooBig => 20413,
            ErrorCode::TooMany => 20429,
            ErrorCode::Internal => 20500,
            ErrorCode::Unavailable => 20503,
            ErrorCode::UserExists => 50201,
            ErrorCode::IdentityMissing => 50204,
            ErrorCode::IdentityLooksLikeSid => 50206,
        }
    }

    /// The HTTP status a REST error with this code carries.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::AuthenticationFailed
            | ErrorCode::InvalidAccessToken
            | ErrorCode::InvalidIssuer
            | ErrorCode::TokenExpired
            | ErrorCode::TokenNotYetValid
            | ErrorCode::InvalidGrant
            | ErrorCode::InvalidSignature => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::UserExists => 409,
            ErrorCode::FrameTooBig => 413,
            ErrorCode::TooMany => 429,
            ErrorCode::Internal => 500,
            ErrorCode::Unavailable => 503,
            ErrorCode::Timeout => 408,
            ErrorCode::InvalidParameter
            | ErrorCode::MalformedFrame
            | ErrorCode::UnknownFrameType
            | ErrorCode::UnexpectedFrame
            | ErrorCode::IdentityMissing
            | ErrorCode::IdentityLooksLikeSid => 400,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_round_trip_and_have_distinct_labels() {
        let mut labels = std::collections::HashSet::new();
        for code in CloseCode::ALL {
            assert_eq!(CloseCode::from_u16(code.as_u16()), Some(code));
            assert!(labels.insert(code.label()), "{code:?}");
        }
        assert_eq!(CloseCode::from_u16(1011), Some(CloseCode::InternalError));
        assert_eq!(CloseCode::from_u16(1006), None);
    }

    #[test]
    fn method_not_allowed_is_20004_with_405() {
        assert_eq!(ErrorCode::MethodNotAllowed.as_u32(), 20004);
        assert_eq!(ErrorCode::MethodNotAllowed.http_status(), 405);
    }
}
