//! The API error and its body: `{"code", "message", "more_info", "status"}`, as the hosted API
//! answers. Every REST refusal is an [`ApiError`]; so are the WebSocket upgrade's refusals.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use reach_proto::ErrorCode;
use reach_store::StoreError;
use serde::Serialize;

use crate::throttle::RetryAfter;

/// Why a REST request failed; each maps to a code and an HTTP status ([`ApiError::code`],
/// [`ApiError::status`]) and renders as the hosted API's error body.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Authentication Error - invalid username or password")]
    Unauthorized,
    #[error("The requested resource {0} was not found")]
    NotFound(String),
    #[error("Method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// A bad parameter, body or path; the message names it.
    #[error("{0}")]
    InvalidParameter(String),
    #[error("The request body is larger than allowed")]
    BodyTooLarge,
    #[error("A User with identity {0:?} already exists")]
    UserExists(String),
    #[error("Missing required parameter Identity in the post body")]
    IdentityMissing,
    #[error("Identity {0:?} is not valid: an identity must not look like a SID")]
    IdentityLooksLikeSid(String),
    /// A storage failure (logged where it happens); the request may be retried.
    #[error("Internal error, please retry")]
    Internal,
    /// The gateway is draining (a WebSocket upgrade after the drain began).
    #[error("the gateway is draining")]
    Draining,
    /// The account's requests passed `limits.rest_requests_per_second`.
    #[error("Too many requests: this account's request rate limit is reached; retry after {} s", .0.seconds())]
    TooManyRequests(RetryAfter),
    /// The source address passed `limits.auth_failures_per_minute`.
    #[error("Too many failed authentications from this address; retry after {} s", .0.seconds())]
    TooManyAuthFailures(RetryAfter),
}

/// A handler's result.
pub type ApiResult<T = Response> = Result<T, ApiError>;

impl ApiError {
    fn error_code(&self) -> ErrorCode {
        match self {
            ApiError::Unauthorized => ErrorCode::AuthenticationFailed,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::MethodNotAllowed { .. } => ErrorCode::MethodNotAllowed,
            ApiError::InvalidParameter(_) => ErrorCode::InvalidParameter,
            ApiError::BodyTooLarge => ErrorCode::FrameTooBig,
            ApiError::UserExists(_) => ErrorCode::UserExists,
            ApiError::IdentityMissing => ErrorCode::IdentityMissing,
            ApiError::IdentityLooksLikeSid(_) => ErrorCode::IdentityLooksLikeSid,
            ApiError::Internal => ErrorCode::Internal,
            ApiError::Draining => ErrorCode::Unavailable,
            ApiError::TooManyRequests(_) | ApiError::TooManyAuthFailures(_) => ErrorCode::TooMany,
        }
    }

    /// The `code` of the error body.
    pub fn code(&self) -> u32 {
        self.error_code().as_u32()
    }

    /// The HTTP status (and the `status` of the error body).
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.error_code().http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// A bad parameter, body or path.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::InvalidParameter(message.into())
    }

    /// Maps a store error of a request for `path`.
    pub(super) fn from_store(path: &str, e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound => ApiError::NotFound(path.to_owned()),
            StoreError::UserExists(identity) => ApiError::UserExists(identity),
            StoreError::Backend(reason) | StoreError::InUse(reason) => {
                tracing::error!(%path, %reason, "REST request failed in the store");
                ApiError::Internal
            }
        }
    }
}

#[derive(Serialize)]
struct ErrorBody {
    code: u32,
    message: String,
    more_info: String,
    status: u16,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let code = self.code();
        let body = ErrorBody {
            code,
            message: self.to_string(),
            more_info: format!("https://www.twilio.com/docs/errors/{code}"),
            status: status.as_u16(),
        };
        let mut response = (status, Json(body)).into_response();
        match self {
            ApiError::Unauthorized => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"Reach\""),
                );
            }
            ApiError::TooManyRequests(retry) | ApiError::TooManyAuthFailures(retry) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry.seconds()));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn errors_carry_their_code_and_status() {
        let cases = [
            (ApiError::Unauthorized, 20003, 401),
            (ApiError::NotFound("/Services/x".into()), 20404, 404),
            (
                ApiError::MethodNotAllowed {
                    method: "PUT".into(),
                    path: "/x".into(),
                },
                20004,
                405,
            ),
            (ApiError::invalid("x"), 20001, 400),
            (ApiError::UserExists("a".into()), 50201, 409),
            (ApiError::IdentityMissing, 50204, 400),
            (ApiError::IdentityLooksLikeSid("a".into()), 50206, 400),
            (ApiError::Internal, 20500, 500),
            (ApiError::Draining, 20503, 503),
            (
                ApiError::TooManyRequests(RetryAfter(Duration::ZERO)),
                20429,
                429,
            ),
            (
                ApiError::TooManyAuthFailures(RetryAfter(Duration::ZERO)),
                20429,
                429,
            ),
        ];
        for (e, code, status) in cases {
            assert_eq!((e.code(), e.status().as_u16()), (code, status), "{e:?}");
        }
    }
}
