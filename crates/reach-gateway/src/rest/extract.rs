//! What a handler takes from its request, every malformed input turned into an [`ApiError`]
//! (so a client only ever sees the error JSON), and the routes' shared state ([`Rest`]):
//!
//! - [`Ctx`]: HTTP Basic credentials checked, the account, the base of absolute URLs and the
//!   resource path that error messages name;
//! - [`ApiPath`]: path parameters;
//! - [`QueryParams`], [`FormParams`]: the query string and the form body, decoded strictly
//!   (`docs/rest.md`: `+` is a space, every `%` starts an escape of two hex digits, names and
//!   values are UTF-8) into [`Params`], whose typed getters check each parameter.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use percent_encoding::percent_decode;
use reach_proto::{AccountSid, ServiceSid, SidKind};
use reach_store::{Service, ServiceConfig, StoreError};
use serde::de::DeserializeOwned;

use super::error::{ApiError, ApiResult};
use super::json::Urls;
use crate::state::App;

/// State of the REST routes.
pub(super) struct Rest {
    pub app: Arc<App>,
    /// Held across a configuration write (or a service delete) and the engine call that
    /// follows, so concurrent flips reach the engine in commit order.
    pub switch_writes: tokio::sync::Mutex<()>,
}

pub(super) type RestState = Arc<Rest>;

/// Longest `Attributes` text accepted (the hosted API's limit for user attributes).
const MAX_ATTRIBUTES_BYTES: usize = 16 * 1024;

/// An authenticated request: the account, the base of absolute URLs and the resource path
/// (the request path without `/v1`, as error messages name it).
pub(super) struct Ctx {
    pub state: RestState,
    pub account: AccountSid,
    base: String,
    pub resource: String,
}

impl Ctx {
    pub fn app(&self) -> &App {
        &self.state.app
    }

    /// Maps a store error of this request.
    pub fn store_err(&self) -> impl FnOnce(StoreError) -> ApiError + '_ {
        move |e| ApiError::from_store(&self.resource, e)
    }

    /// The account's service, or 404 (also for another account's service).
    pub async fn service(&self, sid: &str) -> ApiResult<Service> {
        let Ok(sid) = ServiceSid::parse(sid) else {
            return Err(ApiError::NotFound(self.resource.clone()));
        };
        self.app()
            .store
            .get_service(&self.account, &sid)
            .await
            .map_err(self.store_err())
    }

    /// A service's configuration.
    pub async fn config(&self, service_sid: &ServiceSid) -> ApiResult<ServiceConfig> {
        self.app()
            .store
            .get_config(service_sid)
            .await
            .map_err(self.store_err())
    }

    pub fn urls(&self) -> Urls<'_> {
        Urls { base: &self.base }
    }
}

impl FromRequestParts<RestState> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &RestState) -> ApiResult<Ctx> {
        let app = &state.app;
        let throttles = &app.throttles;
        // A blocked address is not even checked (a right guess must not answer differently).
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        if let Some(ip) = peer {
            throttles
                .auth_allowed(ip)
                .map_err(ApiError::TooManyAuthFailures)?;
        }
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let Some(principal) = app.creds.basic(header) else {
            app.metrics
                .auth_failures
                .with_label_values(&[crate::metrics::AUTH_FAILURE_REST])
                .inc();
            if let Some(ip) = peer {
                throttles
                    .auth_failed(ip)
                    .map_err(ApiError::TooManyAuthFailures)?;
            }
            return Err(ApiError::Unauthorized);
        };
        throttles
            .rest_request(&principal.account_sid)
            .map_err(ApiError::TooManyRequests)?;
        let path = parts.uri.path();
        let resource = path
            .strip_prefix("/v1")
            .filter(|r| r.starts_with('/'))
            .unwrap_or(path);
        Ok(Ctx {
            state: Arc::clone(state),
            account: principal.account_sid,
            base: base_url(app, parts),
            resource: resource.to_owned(),
        })
    }
}

/// `server.public_url`, else `http://` (`https://` with TLS) and the request's `Host`, else
/// `server.listen`.
fn base_url(app: &App, parts: &Parts) -> String {
    let public = app.config.server.public_url.trim_end_matches('/');
    if !public.is_empty() {
        return public.to_owned();
    }
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .filter(|h| is_plain_host(h));
    // The public listener serves either HTTPS or plain HTTP, never both.
    let scheme = if app.tls.is_some() { "https" } else { "http" };
    match host {
        Some(host) => format!("{scheme}://{host}"),
        None => format!("{scheme}://{}", app.config.server.listen),
    }
}

/// A `Host` value safe to paste into a URL: `name[:port]` or `[v6]:port`, nothing else.
fn is_plain_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
        })
}

/// `X-Twilio-Webhook-Enabled`: as in the hosted API, a REST write fires the service's
/// webhook only when its request says `true` (so a backend that answers webhooks with REST
/// calls does not loop); `false` or no header, no event. Another value is a 400.
pub(super) struct WebhookEnabled(pub Option<reach_store::Source>);

impl<S: Send + Sync> FromRequestParts<S> for WebhookEnabled {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> ApiResult<Self> {
        const NAME: &str = "X-Twilio-Webhook-Enabled";
        match parts.headers.get(NAME).map(|v| v.to_str()) {
            None => Ok(WebhookEnabled(None)),
            Some(Ok(v)) if v.trim().eq_ignore_ascii_case("true") => {
                Ok(WebhookEnabled(Some(reach_store::Source::Api)))
            }
            Some(Ok(v)) if v.trim().eq_ignore_ascii_case("false") => Ok(WebhookEnabled(None)),
            Some(_) => Err(ApiError::invalid(format!(
                "The {NAME} header must be true or false"
            ))),
        }
    }
}

/// Path parameters, with decoding failures (e.g. a segment that is not UTF-8) as error JSON.
pub(super) struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(ApiError::invalid(format!(
                "The request path could not be decoded: {}",
                rejection.body_text()
            ))),
        }
    }
}

/// Decoded `name=value` pairs of a query string or form body, in order, repeats kept.
/// Public for the fuzz targets (crates/reach-fuzz), which drive [`Params::parse`] directly.
#[derive(Debug, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// Strict `application/x-www-form-urlencoded` decoding: `+` is a space, every `%` must be
    /// followed by two hex digits, and the decoded names and values must be UTF-8.
    pub fn parse(input: &[u8], what: &str) -> ApiResult<Params> {
        let mut pairs = Vec::new();
        for piece in input.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
            let (name, value) = match piece.iter().position(|&b| b == b'=') {
                Some(i) => (&piece[..i], &piece[i + 1..]),
                None => (piece, &[][..]),
            };
            let name = decode_component(name).ok_or_else(|| malformed(what))?;
            let value = decode_component(value).ok_or_else(|| malformed(what))?;
            pairs.push((name, value));
        }
        Ok(Params(pairs))
    }

    /// Every pair, in the order given.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in order.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A role SID (`RL` and 32 lowercase hex digits), if given.
    pub fn role_sid(&self, name: &str) -> ApiResult<Option<String>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) if SidKind::Role.is(v) => Ok(Some(v.to_owned())),
            Some(v) => Err(ApiError::invalid(format!(
                "{name} must be a role SID ({}), got {v:?}",
                SidKind::Role.expected()
            ))),
        }
    }

    /// `true` or `false` (any case), if given.
    pub fn boolean(&self, name: &str) -> ApiResult<Option<bool>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(v) => Err(ApiError::invalid(format!(
                "{name} must be true or false, got {v:?}"
            ))),
        }
    }

    /// `Attributes`: JSON text of at most [`MAX_ATTRIBUTES_BYTES`], if given.
    pub fn attributes(&self) -> ApiResult<Option<String>> {
        let Some(v) = self.get("Attributes") else {
            return Ok(None);
        };
        if v.len() > MAX_ATTRIBUTES_BYTES {
            return Err(ApiError::invalid(format!(
                "Attributes must be at most {MAX_ATTRIBUTES_BYTES} bytes of JSON"
            )));
        }
        if serde_json::from_str::<serde::de::IgnoredAny>(v).is_err() {
            return Err(ApiError::invalid("Attributes must be valid JSON text"));
        }
        Ok(Some(v.to_owned()))
    }
}

fn malformed(what: &str) -> ApiError {
    ApiError::invalid(format!(
        "The {what} is not valid application/x-www-form-urlencoded UTF-8 text"
    ))
}

/// One name or value: `+` as a space, then percent-decoded; `None` for a `%` that does not
/// start an escape of two hex digits (which `percent_decode` would keep as it is) or for text
/// that is not UTF-8.
fn decode_component(raw: &[u8]) -> Option<String> {
    let escapes_ok = raw.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || raw
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_ok {
        return None;
    }
    let spaced: Cow<'_, [u8]> = if raw.contains(&b'+') {
        Cow::Owned(
            raw.iter()
                .map(|&b| if b == b'+' { b' ' } else { b })
                .collect(),
        )
    } else {
        Cow::Borrowed(raw)
    };
    percent_decode(&spaced)
        .decode_utf8()
        .ok()
        .map(Cow::into_owned)
}

/// The query string's parameters.
pub(super) struct QueryParams(pub Params);

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> ApiResult<Self> {
        let query = parts.uri.query().unwrap_or("");
        Params::parse(query.as_bytes(), "query string").map(QueryParams)
    }
}

/// The form body's parameters. An empty body is no parameters, whatever its content type; a
/// non-empty one must be `application/x-www-form-urlencoded`.
pub(super) struct FormParams(pub Params);

impl<S: Send + Sync> FromRequest<S> for FormParams {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> ApiResult<Self> {
        let is_form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| {
                mime.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        let body = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::BodyTooLarge
            } else {
                ApiError::invalid("The request body could not be read")
            }
        })?;
        if body.is_empty() {
            return Ok(FormParams(Params::default()));
        }
        if !is_form {
            return Err(ApiError::invalid(
                "The request body must be application/x-www-form-urlencoded",
            ));
        }
        Params::parse(&body, "request body").map(FormParams)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding_is_strict() {
        let p = Params::parse(b"A=1&B=x+y%21&A=2&&C", "body").unwrap();
        assert_eq!(p.get("A"), Some("1"));
        assert_eq!(p.all("A"), ["1", "2"]);
        assert_eq!(p.get("B"), Some("x y!"));
        assert_eq!(p.get("C"), Some(""));
        assert!(Params::parse(b"A=%ZZ", "body").is_err());
        assert!(Params::parse(b"A=%F", "body").is_err());
        assert!(Params::parse(b"A=%FF", "body").is_err());
        assert!(Params::parse(b"A=\xff", "body").is_err());
        assert_eq!(
            Params::parse("Identity=%C3%A9".as_bytes(), "body")
                .unwrap()
                .get("Identity"),
            Some("é")
        );
    }

    #[test]
    fn an_escaped_plus_is_a_plus_and_a_lone_percent_is_refused() {
        let p = Params::parse(b"A=1%2B1+=+2&B=%25", "body").unwrap();
        assert_eq!(p.get("A"), Some("1+1 = 2"));
        assert_eq!(p.get("B"), Some("%"));
        assert!(Params::parse(b"A=100%", "body").is_err());
        assert!(Params::parse(b"A=%%41", "body").is_err());
    }
}
