//! The one error type of the SDK: what went wrong when connecting or with a request.

use std::time::Duration;

use reach_proto::ErrorCode;

/// Why a connection or a request failed.
///
/// Connecting fails with [`InvalidUrl`](Error::InvalidUrl) for a URL that is not `ws://…`,
/// [`Connect`](Error::Connect) when the server cannot be reached,
/// [`Rejected`](Error::Rejected) when it refuses the upgrade (for example while draining),
/// [`Denied`](Error::Denied) when it refuses the token, and [`Timeout`](Error::Timeout) when
/// no `welcome` came in time. Requests fail with [`Server`](Error::Server) when the server
/// answers with an error frame (its code follows the REST API's, see [`Error::code`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL cannot be used (not a URL, not `ws://` or `wss://`, no host).
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// A TLS setting cannot be used (an unreadable CA file), or the TLS handshake with a
    /// `wss://` gateway failed (for example a certificate no trusted root vouches for).
    #[error("TLS: {0}")]
    Tls(String),
    /// The TCP connection failed (refused, unreachable, reset during the upgrade).
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    /// The server answered the WebSocket upgrade with an HTTP error.
    #[error("the server refused the WebSocket upgrade with HTTP {status}: {message}")]
    Rejected { status: u16, message: String },
    /// The server refused the access token (close 4001): bad, expired, foreign token.
    #[error("access denied (error {code}): {message}")]
    Denied { code: u32, message: String },
    /// No answer within the configured time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server sent something this client does not understand, or broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server answered the request with an error frame.
    #[error("the server refused the request (error {code}): {message}")]
    Server { code: u32, message: String },
    /// The connection closed before an answer came.
    #[error("the connection closed (code {code:?}): {reason}")]
    Closed { code: Option<u16>, reason: String },
    /// The client was closed (or its connection ended for good); no request can be sent.
    #[error("the client is closed")]
    ClientClosed,
}

impl Error {
    /// The Reach error code, for [`Denied`](Error::Denied) and [`Server`](Error::Server).
    ///
    /// ```
    /// let e = reach_client::Error::Server { code: 20404, message: "no such user".into() };
    /// assert_eq!(e.code(), Some(20404));
    /// assert!(e.is_not_found());
    /// ```
    pub fn code(&self) -> Option<u32> {
        match self {
            Error::Denied { code, .. } | Error::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True for error 20404: the identity (or registration) does not exist.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(ErrorCode::NotFound.as_u32())
    }

    /// True for a refusal because the token expired (error 20104).
    pub fn is_token_expired(&self) -> bool {
        matches!(self, Error::Denied { code, .. } if *code == ErrorCode::TokenExpired.as_u32())
    }

    /// True when trying again later may succeed (network trouble, timeouts, draining).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect(_) | Error::Timeout(_) | Error::Closed { .. } => true,
            Error::Rejected { status, .. } => *status == 503 || *status == 429,
            Error::Server { code, .. } => [
                ErrorCode::Internal,
                ErrorCode::Unavailable,
                ErrorCode::TooMany,
            ]
            .iter()
            .any(|c| c.as_u32() == *code),
            _ => false,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
