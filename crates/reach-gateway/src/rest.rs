//! The REST surface (shared/twilio-api.md): Services, their Configuration, Users and Bindings,
//! with the hosted API's paths, PascalCase form parameters, snake_case JSON, status codes,
//! error body and paging envelope.
//!
//! Data flow of a request: the metrics middleware ([`track`]) times it and counts it by route
//! template; the [`Ctx`] extractor checks HTTP Basic credentials and works out the base of the
//! absolute URLs; [`ApiPath`], [`QueryParams`] and [`FormParams`] decode the path, the query
//! string and the form body, turning every malformed input into an [`ApiError`] (so a client
//! only ever sees the error JSON); the handler reads or writes the store, scoped by the
//! service's account (a service of another account is a 404), and then tells the engine about
//! every change that subscribed sockets must see:
//!
//! - service created or configuration updated: `App::service_changed` -> `Engine::set_service`
//!   (pushes `service_updated`; enabling publishes the users already online);
//! - service deleted: `App::service_deleted` -> `Engine::remove_service`; user deleted:
//!   `App::user_deleted` -> `Engine::remove_user`;
//! - user updated, binding deleted: `App::user_changed` -> `Engine::update_profile` with the
//!   re-read record (the store bumps the user's revision on both, so `friendlyName`,
//!   `attributes` and `reachabilityNotifiable` changes are published).
//!
//! In a cluster each `App` method also announces the change on the backplane, and the other
//! nodes re-read the record and do the same for their sockets.
//!
//! Configuration writes and service deletes take one lock, so the engine sees the switch
//! flips of a service in the order the store committed them.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use reach_proto::ErrorCode;
use reach_store::{
    Binding, BindingFilter, ConfigUpdate, NewUser, Page, PageRequest, Service, ServiceConfig,
    StoreError, UserRecord, UserUpdate,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::app::App;

/// Rows per page when `PageSize` is not given.
const DEFAULT_PAGE_SIZE: i64 = 50;
/// Largest `PageSize` accepted.
const MAX_PAGE_SIZE: i64 = 1000;
/// Longest `Attributes` text accepted (the hosted API's limit for user attributes).
const MAX_ATTRIBUTES_BYTES: usize = 16 * 1024;
/// Most values accepted for one repeatable filter (`BindingType`, `Identity`); each becomes a
/// bound SQL parameter.
const MAX_FILTER_VALUES: usize = 100;
/// Push types a binding can have.
const BINDING_TYPES: [&str; 3] = ["apn", "gcm", "fcm"];
/// `message_types` of every binding. Reach records registrations only and does not send pushes,
/// so a binding is reported with the hosted API's default notification types.
const MESSAGE_TYPES: [&str; 3] = [
    "new_message",
    "added_to_conversation",
    "removed_from_conversation",
];
/// Code of a 405 answer. `reach_proto::ErrorCode` has no variant for it; the hosted API uses
/// 20004 for "Method not allowed".
const METHOD_NOT_ALLOWED_CODE: u32 = 20004;
/// Label of `reach_auth_failures_total` for refused REST credentials.
const AUTH_FAILURE_LABEL: &str = "rest_basic";

/// State of the REST routes.
struct Rest {
    app: Arc<App>,
    /// Held across a configuration write (or a service delete) and the engine call that
    /// follows, so concurrent flips reach the engine in commit order.
    switch_writes: tokio::sync::Mutex<()>,
}

type RestState = Arc<Rest>;

/// The REST routes under `/v1`, with their 404/405 answers and the request metrics.
pub fn router(app: Arc<App>) -> Router {
    let state = Arc::new(Rest {
        app,
        switch_writes: tokio::sync::Mutex::new(()),
    });
    Router::new()
        .route("/v1/Services", post(create_service).get(list_services))
        .route(
            "/v1/Services/{sid}",
            get(fetch_service).delete(delete_service),
        )
        .route(
            "/v1/Services/{sid}/Configuration",
            get(fetch_config).post(update_config),
        )
        .route(
            "/v1/Services/{sid}/Users",
            post(create_user).get(list_users),
        )
        .route(
            "/v1/Services/{sid}/Users/{user}",
            get(fetch_user).post(update_user).delete(delete_user),
        )
        .route("/v1/Services/{sid}/Bindings", get(list_bindings))
        .route(
            "/v1/Services/{sid}/Bindings/{binding}",
            get(fetch_binding).delete(delete_binding),
        )
        // Applies to the routes above only (not to routes merged in later).
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(Arc::clone(&state), track))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// Errors

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
}

impl ApiError {
    fn error_code(&self) -> Option<ErrorCode> {
        Some(match self {
            ApiError::Unauthorized => ErrorCode::AuthenticationFailed,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::MethodNotAllowed { .. } => return None,
            ApiError::InvalidParameter(_) => ErrorCode::InvalidParameter,
            ApiError::BodyTooLarge => ErrorCode::FrameTooBig,
            ApiError::UserExists(_) => ErrorCode::UserExists,
            ApiError::IdentityMissing => ErrorCode::IdentityMissing,
            ApiError::IdentityLooksLikeSid(_) => ErrorCode::IdentityLooksLikeSid,
            ApiError::Internal => ErrorCode::Internal,
        })
    }

    /// The `code` of the error body.
    pub fn code(&self) -> u32 {
        self.error_code()
            .map_or(METHOD_NOT_ALLOWED_CODE, ErrorCode::as_u32)
    }

    /// The HTTP status (and the `status` of the error body).
    pub fn status(&self) -> StatusCode {
        let status = self.error_code().map_or(405, ErrorCode::http_status);
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::InvalidParameter(message.into())
    }

    /// Maps a store error of a request for `path`.
    fn from_store(path: &str, e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound => ApiError::NotFound(path.to_owned()),
            StoreError::UserExists(identity) => ApiError::UserExists(identity),
            StoreError::Backend(reason) => {
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
        if matches!(self, ApiError::Unauthorized) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"Reach\""),
            );
        }
        response
    }
}

type ApiResult<T = Response> = Result<T, ApiError>;

// ---------------------------------------------------------------------------------------------
// Extractors

/// An authenticated request: the account, the base of absolute URLs and the resource path
/// (the request path without `/v1`, as error messages name it).
struct Ctx {
    state: RestState,
    account: String,
    base: String,
    resource: String,
}

impl Ctx {
    fn app(&self) -> &App {
        &self.state.app
    }

    fn store_err(&self) -> impl FnOnce(StoreError) -> ApiError + '_ {
        move |e| ApiError::from_store(&self.resource, e)
    }

    /// The account's service, or 404 (also for another account's service).
    async fn service(&self, sid: &str) -> ApiResult<Service> {
        if !(sid.starts_with("IS") && reach_store::looks_like_sid(sid)) {
            return Err(ApiError::NotFound(self.resource.clone()));
        }
        self.app()
            .store
            .get_service(&self.account, sid)
            .await
            .map_err(self.store_err())
    }

    async fn config(&self, service_sid: &str) -> ApiResult<ServiceConfig> {
        self.app()
            .store
            .get_config(service_sid)
            .await
            .map_err(self.store_err())
    }

    fn urls(&self) -> Urls<'_> {
        Urls { base: &self.base }
    }
}

impl FromRequestParts<RestState> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &RestState) -> ApiResult<Ctx> {
        let app = &state.app;
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let Some(principal) = app.creds.basic(header) else {
            app.metrics
                .auth_failures
                .with_label_values(&[AUTH_FAILURE_LABEL])
                .inc();
            return Err(ApiError::Unauthorized);
        };
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

/// `server.public_url`, else `http://` and the request's `Host`, else `server.listen`.
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
    match host {
        Some(host) => format!("http://{host}"),
        None => format!("http://{}", app.config.server.listen),
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

/// Path parameters, with decoding failures (e.g. a segment that is not UTF-8) as error JSON.
struct ApiPath<T>(T);

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
#[derive(Debug, Default)]
struct Params(Vec<(String, String)>);

impl Params {
    /// Strict `application/x-www-form-urlencoded` decoding: `+` is a space, every `%` must be
    /// followed by two hex digits, and the decoded names and values must be UTF-8.
    fn parse(input: &[u8], what: &str) -> ApiResult<Params> {
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

    /// The first value of `name`.
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in order.
    fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

fn malformed(what: &str) -> ApiError {
    ApiError::invalid(format!(
        "The {what} is not valid application/x-www-form-urlencoded UTF-8 text"
    ))
}

fn decode_component(raw: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = hex_value(*raw.get(i + 1)?)?;
                let lo = hex_value(*raw.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The query string's parameters.
struct QueryParams(Params);

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> ApiResult<Self> {
        let query = parts.uri.query().unwrap_or("");
        Params::parse(query.as_bytes(), "query string").map(QueryParams)
    }
}

/// The form body's parameters. An empty body is no parameters, whatever its content type; a
/// non-empty one must be `application/x-www-form-urlencoded`.
struct FormParams(Params);

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

// ---------------------------------------------------------------------------------------------
// Metrics, 404, 405

/// Counts each request by route template (or `unmatched`), method and status, and observes its
/// duration.
async fn track(State(state): State<RestState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = method_label(req.method());
    let started = Instant::now();
    let response = next.run(req).await;
    let metrics = &state.app.metrics;
    metrics
        .http_requests
        .with_label_values(&[route.as_str(), method, response.status().as_str()])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[route.as_str(), method])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// A bounded label: the standard methods, else `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

async fn not_found(ctx: Ctx) -> ApiError {
    ApiError::NotFound(ctx.resource)
}

async fn method_not_allowed(ctx: Ctx, method: Method) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: ctx.resource,
    }
}

// ---------------------------------------------------------------------------------------------
// JSON

/// `2026-11-25T20:43:04Z`.
fn iso8601(unix: i64) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

/// Builds absolute URLs.
struct Urls<'a> {
    base: &'a str,
}

impl Urls<'_> {
    fn services(&self) -> String {
        format!("{}/v1/Services", self.base)
    }
    fn service(&self, sid: &str) -> String {
        format!("{}/v1/Services/{sid}", self.base)
    }
    fn config(&self, sid: &str) -> String {
        format!("{}/Configuration", self.service(sid))
    }
    fn users(&self, sid: &str) -> String {
        format!("{}/Users", self.service(sid))
    }
    fn user(&self, sid: &str, user_sid: &str) -> String {
        format!("{}/Users/{user_sid}", self.service(sid))
    }
    fn bindings(&self, sid: &str) -> String {
        format!("{}/Bindings", self.service(sid))
    }
    fn binding(&self, sid: &str, binding_sid: &str) -> String {
        format!("{}/Bindings/{binding_sid}", self.service(sid))
    }
}

#[derive(Serialize)]
struct ServiceJson {
    sid: String,
    account_sid: String,
    friendly_name: String,
    date_created: String,
    date_updated: String,
    url: String,
    links: ServiceLinks,
}

#[derive(Serialize)]
struct ServiceLinks {
    conversations: String,
    users: String,
    roles: String,
    bindings: String,
    configuration: String,
    participant_conversations: String,
}

fn service_json(urls: &Urls<'_>, s: Service) -> ServiceJson {
    let url = urls.service(&s.sid);
    ServiceJson {
        links: ServiceLinks {
            conversations: format!("{url}/Conversations"),
            users: urls.users(&s.sid),
            roles: format!("{url}/Roles"),
            bindings: urls.bindings(&s.sid),
            configuration: urls.config(&s.sid),
            participant_conversations: format!("{url}/ParticipantConversations"),
        },
        url,
        date_created: iso8601(s.date_created),
        date_updated: iso8601(s.date_updated),
        sid: s.sid,
        account_sid: s.account_sid,
        friendly_name: s.friendly_name,
    }
}

#[derive(Serialize)]
struct ConfigJson {
    chat_service_sid: String,
    default_conversation_creator_role_sid: Option<String>,
    default_conversation_role_sid: Option<String>,
    default_chat_service_role_sid: Option<String>,
    reachability_enabled: bool,
    url: String,
    links: ConfigLinks,
}

#[derive(Serialize)]
struct ConfigLinks {
    notifications: String,
    webhooks: String,
}

fn config_json(urls: &Urls<'_>, c: ServiceConfig) -> ConfigJson {
    let url = urls.config(&c.service_sid);
    ConfigJson {
        links: ConfigLinks {
            notifications: format!("{url}/Notifications"),
            webhooks: format!("{url}/Webhooks"),
        },
        url,
        chat_service_sid: c.service_sid,
        default_conversation_creator_role_sid: c.default_conversation_creator_role_sid,
        default_conversation_role_sid: c.default_conversation_role_sid,
        default_chat_service_role_sid: c.default_chat_service_role_sid,
        reachability_enabled: c.reachability_enabled,
    }
}

#[derive(Serialize)]
struct UserJson {
    sid: String,
    account_sid: String,
    chat_service_sid: String,
    role_sid: Option<String>,
    identity: String,
    friendly_name: Option<String>,
    attributes: String,
    is_online: Option<bool>,
    is_notifiable: Option<bool>,
    date_created: String,
    date_updated: String,
    url: String,
    links: UserLinks,
}

#[derive(Serialize)]
struct UserLinks {
    user_conversations: String,
}

/// A user with its reachability flags (`(None, None)` in lists).
fn user_json(urls: &Urls<'_>, u: UserRecord, flags: (Option<bool>, Option<bool>)) -> UserJson {
    let url = urls.user(&u.service_sid, &u.sid);
    UserJson {
        links: UserLinks {
            user_conversations: format!("{url}/Conversations"),
        },
        url,
        is_online: flags.0,
        is_notifiable: flags.1,
        date_created: iso8601(u.date_created),
        date_updated: iso8601(u.date_updated),
        sid: u.sid,
        account_sid: u.account_sid,
        chat_service_sid: u.service_sid,
        role_sid: u.role_sid,
        identity: u.identity,
        friendly_name: u.friendly_name,
        attributes: u.attributes,
    }
}

#[derive(Serialize)]
struct BindingJson {
    sid: String,
    account_sid: String,
    chat_service_sid: String,
    credential_sid: Option<String>,
    date_created: String,
    date_updated: String,
    endpoint: String,
    identity: String,
    binding_type: String,
    message_types: [&'static str; 3],
    url: String,
}

fn binding_json(urls: &Urls<'_>, b: Binding) -> BindingJson {
    BindingJson {
        url: urls.binding(&b.service_sid, &b.sid),
        date_created: iso8601(b.date_created),
        date_updated: iso8601(b.date_updated),
        sid: b.sid,
        account_sid: b.account_sid,
        chat_service_sid: b.service_sid,
        credential_sid: b.credential_sid,
        endpoint: b.address,
        identity: b.identity,
        binding_type: b.binding_type,
        message_types: MESSAGE_TYPES,
    }
}

// ---------------------------------------------------------------------------------------------
// Paging

/// `PageSize`, `Page` and `PageToken` of a list request.
#[derive(Debug, Clone, Copy)]
struct Paging {
    size: i64,
    page: i64,
    /// The keyset cursor from `PageToken` (`PT<cursor>`).
    cursor: Option<i64>,
}

impl Paging {
    fn parse(params: &Params) -> ApiResult<Paging> {
        let size = match params.get("PageSize") {
            None => DEFAULT_PAGE_SIZE,
            Some(v) => v
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "PageSize must be an integer between 1 and {MAX_PAGE_SIZE}, got {v:?}"
                    ))
                })?,
        };
        let page = match params.get("Page") {
            None => 0,
            Some(v) => v.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                ApiError::invalid(format!("Page must be a non-negative integer, got {v:?}"))
            })?,
        };
        let cursor = match params.get("PageToken") {
            None => None,
            Some(v) => Some(
                v.strip_prefix("PT")
                    .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|n| n.parse::<i64>().ok())
                    .ok_or_else(|| ApiError::invalid(format!("PageToken {v:?} is not valid")))?,
            ),
        };
        if cursor.is_none() && page.checked_mul(size).is_none() {
            return Err(ApiError::invalid(format!("Page {page} is too large")));
        }
        Ok(Paging { size, page, cursor })
    }

    fn request(&self) -> PageRequest {
        match self.cursor {
            Some(after) => PageRequest {
                after: Some(after),
                offset: 0,
                limit: self.size,
            },
            None => PageRequest {
                after: None,
                offset: self.page * self.size,
                limit: self.size,
            },
        }
    }

    /// The envelope of one page: `{"<key>": [...], "meta": {...}}`. `list_url` is the list's
    /// absolute URL; `filters` are kept in every paging URL.
    fn envelope<'a, T: Serialize>(
        &self,
        key: &'a str,
        page: Page<T>,
        list_url: &str,
        filters: &[(&str, String)],
    ) -> Envelope<'a, T> {
        let url = |page: i64, cursor: Option<i64>| {
            let mut query: Vec<String> = filters
                .iter()
                .map(|(name, value)| format!("{name}={}", urlencode(value)))
                .collect();
            query.push(format!("PageSize={}", self.size));
            query.push(format!("Page={page}"));
            if let Some(cursor) = cursor {
                query.push(format!("PageToken=PT{cursor}"));
            }
            format!("{list_url}?{}", query.join("&"))
        };
        Envelope {
            key,
            meta: Meta {
                page: self.page,
                page_size: self.size,
                first_page_url: url(0, None),
                previous_page_url: (self.page > 0).then(|| url(self.page - 1, None)),
                url: url(self.page, self.cursor),
                next_page_url: page
                    .next_cursor
                    .map(|c| url(self.page.saturating_add(1), Some(c))),
                key,
            },
            items: page.items,
        }
    }
}

/// `{"<key>": [...], "meta": {...}}`.
struct Envelope<'a, T> {
    key: &'a str,
    items: Vec<T>,
    meta: Meta<'a>,
}

impl<T: Serialize> Serialize for Envelope<'_, T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry(self.key, &self.items)?;
        map.serialize_entry("meta", &self.meta)?;
        map.end()
    }
}

#[derive(Serialize)]
struct Meta<'a> {
    page: i64,
    page_size: i64,
    first_page_url: String,
    previous_page_url: Option<String>,
    url: String,
    next_page_url: Option<String>,
    key: &'a str,
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn list_response<T: Serialize>(
    paging: &Paging,
    key: &str,
    page: Page<T>,
    list_url: &str,
    filters: &[(&str, String)],
) -> Response {
    Json(paging.envelope(key, page, list_url, filters)).into_response()
}

// ---------------------------------------------------------------------------------------------
// Parameters

/// `RL` and 32 lowercase hex digits.
fn role_sid(params: &Params, name: &str) -> ApiResult<Option<String>> {
    match params.get(name) {
        None => Ok(None),
        Some(v) if v.starts_with("RL") && reach_store::looks_like_sid(v) => Ok(Some(v.to_owned())),
        Some(v) => Err(ApiError::invalid(format!(
            "{name} must be a role SID (RL followed by 32 lowercase hex digits), got {v:?}"
        ))),
    }
}

fn boolean(params: &Params, name: &str) -> ApiResult<Option<bool>> {
    match params.get(name) {
        None => Ok(None),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(v) => Err(ApiError::invalid(format!(
            "{name} must be true or false, got {v:?}"
        ))),
    }
}

/// JSON text of at most [`MAX_ATTRIBUTES_BYTES`].
fn attributes(params: &Params) -> ApiResult<Option<String>> {
    let Some(v) = params.get("Attributes") else {
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

// ---------------------------------------------------------------------------------------------
// Services

async fn create_service(ctx: Ctx, FormParams(params): FormParams) -> ApiResult {
    let name = params
        .get("FriendlyName")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::invalid("Missing required parameter FriendlyName in the post body")
        })?;
    let app = ctx.app();
    let service = app
        .store
        .create_service(&ctx.account, name)
        .await
        .map_err(ctx.store_err())?;
    let cfg = ctx.config(&service.sid).await?;
    app.service_changed(&cfg).await;
    Ok((
        StatusCode::CREATED,
        Json(service_json(&ctx.urls(), service)),
    )
        .into_response())
}

async fn list_services(ctx: Ctx, QueryParams(params): QueryParams) -> ApiResult {
    let paging = Paging::parse(&params)?;
    let page = ctx
        .app()
        .store
        .list_services(&ctx.account, paging.request())
        .await
        .map_err(ctx.store_err())?;
    let urls = ctx.urls();
    let page = Page {
        items: page
            .items
            .into_iter()
            .map(|s| service_json(&urls, s))
            .collect(),
        next_cursor: page.next_cursor,
    };
    Ok(list_response(
        &paging,
        "services",
        page,
        &urls.services(),
        &[],
    ))
}

async fn fetch_service(ctx: Ctx, ApiPath(sid): ApiPath<String>) -> ApiResult {
    let service = ctx.service(&sid).await?;
    Ok(Json(service_json(&ctx.urls(), service)).into_response())
}

async fn delete_service(ctx: Ctx, ApiPath(sid): ApiPath<String>) -> ApiResult {
    ctx.service(&sid).await?;
    let _order = ctx.state.switch_writes.lock().await;
    ctx.app()
        .store
        .delete_service(&ctx.account, &sid)
        .await
        .map_err(ctx.store_err())?;
    ctx.app().service_deleted(&sid).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---------------------------------------------------------------------------------------------
// Configuration

async fn fetch_config(ctx: Ctx, ApiPath(sid): ApiPath<String>) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let cfg = ctx.config(&service.sid).await?;
    Ok(Json(config_json(&ctx.urls(), cfg)).into_response())
}

async fn update_config(
    ctx: Ctx,
    ApiPath(sid): ApiPath<String>,
    FormParams(params): FormParams,
) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let update = ConfigUpdate {
        reachability_enabled: boolean(&params, "ReachabilityEnabled")?,
        default_conversation_creator_role_sid: role_sid(
            &params,
            "DefaultConversationCreatorRoleSid",
        )?,
        default_conversation_role_sid: role_sid(&params, "DefaultConversationRoleSid")?,
        default_chat_service_role_sid: role_sid(&params, "DefaultChatServiceRoleSid")?,
    };
    let app = ctx.app();
    let cfg = {
        let _order = ctx.state.switch_writes.lock().await;
        let cfg = app
            .store
            .update_config(&service.sid, &update)
            .await
            .map_err(ctx.store_err())?;
        app.service_changed(&cfg).await;
        cfg
    };
    Ok(Json(config_json(&ctx.urls(), cfg)).into_response())
}

// ---------------------------------------------------------------------------------------------
// Users

async fn create_user(
    ctx: Ctx,
    ApiPath(sid): ApiPath<String>,
    FormParams(params): FormParams,
) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let identity = params
        .get("Identity")
        .filter(|i| !i.is_empty())
        .ok_or(ApiError::IdentityMissing)?;
    if reach_store::looks_like_sid(identity) {
        return Err(ApiError::IdentityLooksLikeSid(identity.to_owned()));
    }
    let user = NewUser {
        identity: identity.to_owned(),
        friendly_name: params.get("FriendlyName").map(str::to_owned),
        attributes: attributes(&params)?,
        role_sid: role_sid(&params, "RoleSid")?,
    };
    let app = ctx.app();
    let rec = app
        .store
        .create_user(&service, &user)
        .await
        .map_err(ctx.store_err())?;
    let cfg = ctx.config(&service.sid).await?;
    let flags = app.user_flags(&cfg, &rec).await;
    Ok((
        StatusCode::CREATED,
        Json(user_json(&ctx.urls(), rec, flags)),
    )
        .into_response())
}

async fn list_users(
    ctx: Ctx,
    ApiPath(sid): ApiPath<String>,
    QueryParams(params): QueryParams,
) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let paging = Paging::parse(&params)?;
    let page = ctx
        .app()
        .store
        .list_users(&service.sid, paging.request())
        .await
        .map_err(ctx.store_err())?;
    let urls = ctx.urls();
    let page = Page {
        // Lists never carry reachability flags.
        items: page
            .items
            .into_iter()
            .map(|u| user_json(&urls, u, (None, None)))
            .collect(),
        next_cursor: page.next_cursor,
    };
    Ok(list_response(
        &paging,
        "users",
        page,
        &urls.users(&service.sid),
        &[],
    ))
}

async fn fetch_user(ctx: Ctx, ApiPath((sid, user)): ApiPath<(String, String)>) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let app = ctx.app();
    let rec = app
        .store
        .get_user(&service.sid, &user)
        .await
        .map_err(ctx.store_err())?;
    let cfg = ctx.config(&service.sid).await?;
    let flags = app.user_flags(&cfg, &rec).await;
    Ok(Json(user_json(&ctx.urls(), rec, flags)).into_response())
}

async fn update_user(
    ctx: Ctx,
    ApiPath((sid, user)): ApiPath<(String, String)>,
    FormParams(params): FormParams,
) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let update = UserUpdate {
        friendly_name: params.get("FriendlyName").map(str::to_owned),
        attributes: attributes(&params)?,
        role_sid: role_sid(&params, "RoleSid")?,
    };
    let app = ctx.app();
    let rec = app
        .store
        .update_user(&service.sid, &user, &update)
        .await
        .map_err(ctx.store_err())?;
    app.user_changed(&rec).await;
    let cfg = ctx.config(&service.sid).await?;
    let flags = app.user_flags(&cfg, &rec).await;
    Ok(Json(user_json(&ctx.urls(), rec, flags)).into_response())
}

async fn delete_user(ctx: Ctx, ApiPath((sid, user)): ApiPath<(String, String)>) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let app = ctx.app();
    let rec = app
        .store
        .delete_user(&service.sid, &user)
        .await
        .map_err(ctx.store_err())?;
    app.user_deleted(&service.sid, &rec.identity).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---------------------------------------------------------------------------------------------
// Bindings

async fn list_bindings(
    ctx: Ctx,
    ApiPath(sid): ApiPath<String>,
    QueryParams(params): QueryParams,
) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let paging = Paging::parse(&params)?;
    let filter = BindingFilter {
        binding_types: params.all("BindingType"),
        identities: params.all("Identity"),
    };
    if let Some(bad) = filter
        .binding_types
        .iter()
        .find(|t| !BINDING_TYPES.contains(&t.as_str()))
    {
        return Err(ApiError::invalid(format!(
            "BindingType must be one of apn, gcm, fcm, got {bad:?}"
        )));
    }
    if filter.binding_types.len() > MAX_FILTER_VALUES || filter.identities.len() > MAX_FILTER_VALUES
    {
        return Err(ApiError::invalid(format!(
            "BindingType and Identity may each be given at most {MAX_FILTER_VALUES} times"
        )));
    }
    let page = ctx
        .app()
        .store
        .list_bindings(&service.sid, &filter, paging.request())
        .await
        .map_err(ctx.store_err())?;
    let urls = ctx.urls();
    let page = Page {
        items: page
            .items
            .into_iter()
            .map(|b| binding_json(&urls, b))
            .collect(),
        next_cursor: page.next_cursor,
    };
    let filters: Vec<(&str, String)> = filter
        .binding_types
        .into_iter()
        .map(|t| ("BindingType", t))
        .chain(filter.identities.into_iter().map(|i| ("Identity", i)))
        .collect();
    Ok(list_response(
        &paging,
        "bindings",
        page,
        &urls.bindings(&service.sid),
        &filters,
    ))
}

async fn fetch_binding(ctx: Ctx, ApiPath((sid, binding)): ApiPath<(String, String)>) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let b = ctx
        .app()
        .store
        .get_binding(&service.sid, &binding)
        .await
        .map_err(ctx.store_err())?;
    Ok(Json(binding_json(&ctx.urls(), b)).into_response())
}

async fn delete_binding(ctx: Ctx, ApiPath((sid, binding)): ApiPath<(String, String)>) -> ApiResult {
    let service = ctx.service(&sid).await?;
    let app = ctx.app();
    let b = app
        .store
        .delete_binding(&service.sid, &binding)
        .await
        .map_err(ctx.store_err())?;
    // The delete bumped the user's revision; publish the new notifiable state.
    match app.store.get_user(&service.sid, &b.identity).await {
        Ok(rec) => app.user_changed(&rec).await,
        // Deleted meanwhile: its sockets were closed by that delete.
        Err(StoreError::NotFound) => {}
        Err(e) => tracing::warn!(
            service_sid = %service.sid, identity = %b.identity, error = %e,
            "binding deleted, but the user could not be re-read to publish it"
        ),
    }
    Ok(StatusCode::NO_CONTENT.into_response())
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
    fn times_are_iso8601_utc_to_the_second() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(1_795_639_384), "2026-11-25T20:43:04Z");
    }

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
        ];
        for (e, code, status) in cases {
            assert_eq!((e.code(), e.status().as_u16()), (code, status), "{e:?}");
        }
    }

    #[test]
    fn paging_rejects_bad_values() {
        let parse = |q: &str| Paging::parse(&Params::parse(q.as_bytes(), "query").unwrap());
        assert_eq!(parse("").unwrap().size, 50);
        for bad in [
            "PageSize=0",
            "PageSize=1001",
            "PageSize=x",
            "Page=-1",
            "Page=1.5",
            "PageToken=x",
            "PageToken=PT",
            "PageToken=PT-1",
            "Page=9223372036854775807&PageSize=2",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let p = parse("PageSize=2&Page=3&PageToken=PT17").unwrap();
        assert_eq!(
            p.request(),
            PageRequest {
                after: Some(17),
                offset: 0,
                limit: 2
            }
        );
        let p = parse("PageSize=2&Page=3").unwrap();
        assert_eq!(
            p.request(),
            PageRequest {
                after: None,
                offset: 6,
                limit: 2
            }
        );
    }
}
