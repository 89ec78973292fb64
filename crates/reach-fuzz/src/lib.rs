//! Checks shared by the fuzz targets in `fuzz_targets/` (see docs/fuzzing.md). Each target is a
//! thin `fuzz_target!` around one of these, so a crash input can be replayed from a unit test.

use reach_proto::{
    ClientFrame, CloseCode, DecodeError, Encoding, ErrorCode, decode_client, encode,
};

/// One client message as the gateway decodes it, in `encoding`. A decoded frame must survive
/// a round trip through both encodings unchanged (the two carry the same objects); a refusal
/// must map to a documented error code and close code.
pub fn client_frame(data: &[u8], encoding: Encoding) {
    match decode_client(data, encoding) {
        Ok(frame) => {
            let _ = frame.id();
            for other in Encoding::ALL {
                let bytes = encode(&frame, other);
                let again = decode_client(&bytes, other)
                    .unwrap_or_else(|e| panic!("{frame:?} re-encoded as {other:?} fails: {e:?}"));
                assert_eq!(again, frame, "round trip through {other:?}");
            }
            if let ClientFrame::Subscribe { identities, .. }
            | ClientFrame::Unsubscribe { identities, .. } = &frame
            {
                for identity in identities {
                    let _ = reach_proto::sid::looks_like_sid(identity);
                }
            }
        }
        Err(e) => {
            match &e {
                DecodeError::UnknownType(kind) => {
                    assert!(
                        !ClientFrame::TYPES.contains(&kind.as_str()),
                        "{kind:?} is known"
                    );
                    assert_eq!(e.code(), ErrorCode::UnknownFrameType);
                }
                _ => assert_eq!(e.code(), ErrorCode::MalformedFrame),
            }
            assert_eq!(
                e.close_code(),
                CloseCode::ProtocolError,
                "a bad frame closes with 4002"
            );
        }
    }
}

pub mod token {
    //! Access tokens: [`raw`] feeds any text to the verifier; [`signed`] signs arbitrary claims
    //! (right or wrong key, algorithm, issuer, account, times, grants) and checks the verdict
    //! against the rules written out independently here.

    use arbitrary::Arbitrary;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use reach_gateway::auth::{Credentials, MAX_IDENTITY_LEN, verify_token};
    use reach_gateway::config::{AccountConfig, ApiKeyConfig};
    use reach_proto::ServiceSid;
    use reach_proto::sid::looks_like_sid;
    use reach_proto::token::MAX_LIFETIME_S;
    use serde_json::{Map, Value, json};

    /// Test fixtures, not secrets.
    pub const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
    pub const KEY: &str = "SK0123456789abcdef0123456789abcdef";
    pub const SECRET: &str = "fuzz-fixture-secret";
    pub const SERVICE: &str = "IS0123456789abcdef0123456789abcdef";
    /// The verifier's clock.
    pub const NOW: i64 = 1_800_000_000;

    pub fn credentials() -> Credentials {
        let account = AccountConfig {
            sid: ACCOUNT.parse().expect("fixture SID"),
            auth_token: "fuzz-fixture-auth-token".into(),
        };
        let key = ApiKeyConfig {
            sid: KEY.parse().expect("fixture SID"),
            secret: SECRET.into(),
            account_sid: account.sid.clone(),
        };
        Credentials::new(&[account], &[key])
    }

    /// Any text as a token: refused or accepted, never a panic; what is accepted obeys the
    /// grant's rules.
    pub fn raw(creds: &Credentials, data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok(grant) = verify_token(creds, text, NOW) {
            assert!(!grant.identity.is_empty() && grant.identity.len() <= MAX_IDENTITY_LEN);
            assert!(!looks_like_sid(&grant.identity));
            assert!(grant.expires_at > NOW && grant.expires_at <= NOW + MAX_LIFETIME_S);
        }
    }

    /// A string that is one of the interesting values or arbitrary text.
    #[derive(Debug, Arbitrary)]
    pub enum Text {
        Right,
        Other,
        Empty,
        Any(String),
    }

    impl Text {
        fn pick(&self, right: &str, other: &str) -> String {
            match self {
                Text::Right => right.to_owned(),
                Text::Other => other.to_owned(),
                Text::Empty => String::new(),
                Text::Any(s) => s.clone(),
            }
        }
    }

    #[derive(Debug, Arbitrary)]
    pub struct ChatGrant {
        service_sid: Option<Text>,
        push_credential_sid: Option<String>,
    }

    /// The parts of a token, as a helper library (or an attacker) could write them.
    #[derive(Debug, Arbitrary)]
    pub struct Token {
        hs384: bool,
        wrong_secret: bool,
        cty: Option<String>,
        jti: Option<String>,
        iss: Option<Text>,
        sub: Option<Text>,
        exp: Option<i64>,
        /// `exp` sent as a string instead of a number.
        exp_as_text: bool,
        nbf: Option<i64>,
        identity: Option<Text>,
        identity_repeat: u16,
        chat: Option<ChatGrant>,
        ip_messaging: Option<ChatGrant>,
        extra_claim: Option<(String, String)>,
    }

    fn grant_json(g: &ChatGrant) -> Value {
        let mut m = Map::new();
        if let Some(s) = &g.service_sid {
            m.insert(
                "service_sid".into(),
                json!(s.pick(SERVICE, "IS00000000000000000000000000000000")),
            );
        }
        if let Some(p) = &g.push_credential_sid {
            m.insert("push_credential_sid".into(), json!(p));
        }
        Value::Object(m)
    }

    /// Signs `t` and checks `verify_token`'s verdict against the rules.
    pub fn signed(creds: &Credentials, t: &Token) {
        let exp = t.exp.map(|e| NOW.saturating_add(e % (2 * MAX_LIFETIME_S)));
        let nbf = t.nbf.map(|n| NOW.saturating_add(n % 120));
        let identity = t.identity.as_ref().map(|i| {
            let base = i.pick("alice", "AC0123456789abcdef0123456789abcdef");
            base.repeat(1 + usize::from(t.identity_repeat % 300))
        });
        let iss = t
            .iss
            .as_ref()
            .map(|s| s.pick(KEY, "SK00000000000000000000000000000000"));
        let sub = t
            .sub
            .as_ref()
            .map(|s| s.pick(ACCOUNT, "AC00000000000000000000000000000000"));

        let mut claims = Map::new();
        if let Some(j) = &t.jti {
            claims.insert("jti".into(), json!(j));
        }
        if let Some(i) = &iss {
            claims.insert("iss".into(), json!(i));
        }
        if let Some(s) = &sub {
            claims.insert("sub".into(), json!(s));
        }
        if let Some(e) = exp {
            let v = if t.exp_as_text {
                json!(e.to_string())
            } else {
                json!(e)
            };
            claims.insert("exp".into(), v);
        }
        if let Some(n) = nbf {
            claims.insert("nbf".into(), json!(n));
        }
        let mut grants = Map::new();
        if let Some(i) = &identity {
            grants.insert("identity".into(), json!(i));
        }
        if let Some(g) = &t.chat {
            grants.insert("chat".into(), grant_json(g));
        }
        if let Some(g) = &t.ip_messaging {
            grants.insert("ip_messaging".into(), grant_json(g));
        }
        claims.insert("grants".into(), Value::Object(grants));
        // Any claim besides the token format's own and the registered JWT names, which
        // the verifier ignores.
        const KNOWN: [&str; 8] = ["jti", "iss", "sub", "exp", "nbf", "grants", "aud", "iat"];
        if let Some((k, v)) = &t.extra_claim
            && !KNOWN.contains(&k.as_str())
        {
            claims.insert(k.clone(), json!(v));
        }

        let mut header = Header::new(if t.hs384 {
            Algorithm::HS384
        } else {
            Algorithm::HS256
        });
        header.cty = t.cty.clone();
        let secret = if t.wrong_secret {
            "another-secret"
        } else {
            SECRET
        };
        let Ok(token) = jsonwebtoken::encode(
            &header,
            &Value::Object(claims),
            &EncodingKey::from_secret(secret.as_bytes()),
        ) else {
            return;
        };

        // The rules, written out: HS256 with the key's secret, every claim of the token
        // format present and typed (jti, iss, sub, exp; nbf optional), the issuer a known key
        // of the subject account, 0 < exp - now <= 24 h, nbf not in the future, a non-empty
        // identity that is not SID-shaped and at most MAX_IDENTITY_LEN bytes, and a chat grant
        // (or the legacy ip_messaging one when chat is absent) naming a service SID.
        let chat = t.chat.as_ref().or(t.ip_messaging.as_ref());
        let service = chat
            .and_then(|g| g.service_sid.as_ref())
            .map(|s| s.pick(SERVICE, "IS00000000000000000000000000000000"));
        let expected = !t.hs384
            && !t.wrong_secret
            && t.jti.is_some()
            && iss.as_deref() == Some(KEY)
            && sub.as_deref() == Some(ACCOUNT)
            && exp.is_some_and(|e| !t.exp_as_text && e > NOW && e <= NOW + MAX_LIFETIME_S)
            && nbf.is_none_or(|n| n <= NOW)
            && identity.as_deref().is_some_and(|i| {
                !i.is_empty() && i.len() <= MAX_IDENTITY_LEN && !looks_like_sid(i)
            })
            && service
                .as_deref()
                .is_some_and(|s| ServiceSid::parse(s).is_ok());
        let verdict = verify_token(creds, &token, NOW);
        assert_eq!(
            verdict.is_ok(),
            expected,
            "verdict {verdict:?} for {t:?} (token {token})"
        );
        if let Ok(grant) = verdict {
            assert_eq!(grant.account_sid.as_str(), ACCOUNT);
            assert_eq!(Some(grant.identity.as_str()), identity.as_deref());
            assert_eq!(Some(grant.service_sid.as_str()), service.as_deref());
            assert_eq!(Some(grant.expires_at), exp);
            assert_eq!(
                grant.push_credential_sid,
                chat.and_then(|g| g.push_credential_sid.clone())
            );
        }
    }
}

pub mod form {
    //! `application/x-www-form-urlencoded` query strings and bodies, decoded as the REST
    //! handlers decode them ([`reach_gateway::rest::Params`]).

    use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
    use reach_gateway::rest::Params;

    /// Decodes `data`; what decodes must encode back to text that decodes to the same pairs,
    /// and the typed accessors must refuse or accept without panicking. What is refused must
    /// really be malformed: a `%` not followed by two hex digits, or text that is not UTF-8
    /// once decoded.
    pub fn params(data: &[u8]) {
        match Params::parse(data, "request body") {
            Ok(params) => {
                let text = params
                    .pairs()
                    .iter()
                    .map(|(n, v)| {
                        format!(
                            "{}={}",
                            utf8_percent_encode(n, NON_ALPHANUMERIC),
                            utf8_percent_encode(v, NON_ALPHANUMERIC)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("&");
                let again = Params::parse(text.as_bytes(), "request body")
                    .unwrap_or_else(|e| panic!("{text:?} re-encoded does not decode: {e:?}"));
                assert_eq!(again.pairs(), params.pairs(), "round trip of {text:?}");
                for (name, _) in params.pairs() {
                    let _ = params.get(name);
                    let _ = params.all(name).len();
                }
                let _ = params.role_sid("RoleSid");
                let _ = params.boolean("ReachabilityEnabled");
                let _ = params.attributes();
            }
            Err(e) => {
                assert_eq!(e.status().as_u16(), 400, "a malformed form is a 400");
                let bad_escape = data.iter().enumerate().any(|(i, &b)| {
                    b == b'%'
                        && !data
                            .get(i + 1..i + 3)
                            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
                });
                let decoded: Vec<u8> = percent_encoding::percent_decode(data).collect();
                assert!(
                    bad_escape || std::str::from_utf8(&decoded).is_err(),
                    "{data:?} refused but well-formed"
                );
            }
        }
    }
}

pub mod request {
    //! Whole REST requests through the real router (the public listener's, WebSocket route
    //! included), over a real SQLite file: arbitrary methods, paths built from the API's own
    //! names, SIDs and arbitrary segments, query strings, bodies, content types and
    //! credentials. Whatever comes in, the answer is never a 5xx, and an error is the error
    //! JSON with a code and the response's own status.

    use std::net::SocketAddr;
    use std::sync::Arc;

    use arbitrary::Arbitrary;
    use axum::Router;
    use axum::body::Body;
    use axum::extract::ConnectInfo;
    use axum::http::{Method, Request, header};
    use base64::Engine as _;
    use http_body_util::BodyExt;
    use reach_gateway::config::{AccountConfig, ApiKeyConfig, Config};
    use reach_gateway::{App, auth::Credentials};
    use reach_store::sqlite::SqliteStore;
    use tower::ServiceExt;

    use crate::token::{ACCOUNT, KEY, SECRET};

    /// Test fixture, not a secret.
    const AUTH_TOKEN: &str = "fuzz-fixture-auth-token";

    /// The app and the records that the requests' paths name.
    pub struct Fixture {
        pub runtime: tokio::runtime::Runtime,
        pub router: Router,
        pub service_sid: String,
        _app: Arc<App>,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        pub fn new() -> Fixture {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let dir = tempfile::tempdir().expect("temp dir");
            let mut config = Config::default();
            config.storage.sqlite_path = dir.path().join("reach.db");
            let account = AccountConfig {
                sid: ACCOUNT.parse().expect("fixture SID"),
                auth_token: AUTH_TOKEN.into(),
            };
            let key = ApiKeyConfig {
                sid: KEY.parse().expect("fixture SID"),
                secret: SECRET.into(),
                account_sid: account.sid.clone(),
            };
            config.accounts = vec![account];
            config.api_keys = vec![key];
            // The fuzzer sends thousands of requests a second from one address with wrong
            // credentials half of the time: no rate limits, or it would only see 429s.
            config.limits.rest_requests_per_second = 0;
            config.limits.auth_failures_per_minute = 0;
            let creds = Credentials::new(&config.accounts, &config.api_keys);
            let (app, router, service_sid) = runtime.block_on(async {
                let store = SqliteStore::open(&config.storage.sqlite_path)
                    .await
                    .expect("store");
                let (app, _feeds) = App::new(config, creds, Arc::new(store)).await.expect("app");
                let router = reach_gateway::server::public_router(Arc::clone(&app));
                let created =
                    send(&router, Method::POST, "/v1/Services", "FriendlyName=fuzz").await;
                let sid = created["sid"].as_str().expect("service SID").to_owned();
                let path = format!("/v1/Services/{sid}/Configuration");
                send(&router, Method::POST, &path, "ReachabilityEnabled=true").await;
                let path = format!("/v1/Services/{sid}/Users");
                send(
                    &router,
                    Method::POST,
                    &path,
                    "Identity=alice&FriendlyName=Alice",
                )
                .await;
                (app, router, sid)
            });
            Fixture {
                runtime,
                router,
                service_sid,
                _app: app,
                _dir: dir,
            }
        }
    }

    impl Default for Fixture {
        fn default() -> Self {
            Fixture::new()
        }
    }

    fn basic(user: &str, password: &str) -> String {
        let pair = format!("{user}:{password}");
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }

    async fn send(router: &Router, method: Method, path: &str, form: &str) -> serde_json::Value {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, basic(ACCOUNT, AUTH_TOKEN))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(form.to_owned()))
            .expect("request");
        let res = router.clone().oneshot(req).await.expect("infallible");
        let status = res.status();
        let body = res.into_body().collect().await.expect("body").to_bytes();
        assert!(
            status.is_success(),
            "fixture request {path}: {status} {body:?}"
        );
        serde_json::from_slice(&body).unwrap_or_default()
    }

    #[derive(Debug, Arbitrary)]
    pub enum Verb {
        Get,
        Post,
        Delete,
        Put,
        Patch,
        Head,
        Options,
        Other(String),
    }

    #[derive(Debug, Arbitrary)]
    pub enum Segment {
        V1,
        Services,
        Configuration,
        Users,
        Bindings,
        Ws,
        OpenApi,
        /// The fixture's service.
        TheService,
        /// A user of the fixture's service.
        Alice,
        /// A SID of the given kind that names nothing.
        Sid(u8),
        Empty,
        Any(String),
    }

    #[derive(Debug, Arbitrary)]
    pub enum Auth {
        Account,
        ApiKey,
        WrongPassword,
        Missing,
        Raw(String),
    }

    #[derive(Debug, Arbitrary)]
    pub enum ContentType {
        Form,
        FormCharset,
        Json,
        Missing,
        Raw(String),
    }

    #[derive(Debug, Arbitrary)]
    pub struct Call {
        verb: Verb,
        segments: Vec<Segment>,
        trailing_slash: bool,
        query: Option<String>,
        content_type: ContentType,
        auth: Auth,
        body: Vec<u8>,
    }

    const PREFIXES: [&str; 6] = ["IS", "US", "BS", "AC", "SK", "RL"];

    impl Call {
        fn path(&self, fixture: &Fixture) -> String {
            let mut path = String::new();
            for s in &self.segments {
                path.push('/');
                match s {
                    Segment::V1 => path.push_str("v1"),
                    Segment::Services => path.push_str("Services"),
                    Segment::Configuration => path.push_str("Configuration"),
                    Segment::Users => path.push_str("Users"),
                    Segment::Bindings => path.push_str("Bindings"),
                    Segment::Ws => path.push_str("ws"),
                    Segment::OpenApi => path.push_str("openapi.json"),
                    Segment::TheService => path.push_str(&fixture.service_sid),
                    Segment::Alice => path.push_str("alice"),
                    Segment::Sid(k) => {
                        path.push_str(PREFIXES[usize::from(*k) % PREFIXES.len()]);
                        path.push_str("0123456789abcdef0123456789abcdef");
                    }
                    Segment::Empty => {}
                    Segment::Any(text) => path.push_str(text),
                }
            }
            if self.trailing_slash || path.is_empty() {
                path.push('/');
            }
            if let Some(q) = &self.query {
                path.push('?');
                path.push_str(q);
            }
            path
        }
    }

    /// Sends one call and checks the answer.
    pub fn call(fixture: &Fixture, call: &Call) {
        let method = match &call.verb {
            Verb::Get => Method::GET,
            Verb::Post => Method::POST,
            Verb::Delete => Method::DELETE,
            Verb::Put => Method::PUT,
            Verb::Patch => Method::PATCH,
            Verb::Head => Method::HEAD,
            Verb::Options => Method::OPTIONS,
            Verb::Other(m) => match Method::from_bytes(m.as_bytes()) {
                Ok(m) => m,
                Err(_) => return,
            },
        };
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(call.path(fixture));
        match &call.auth {
            Auth::Account => {
                builder = builder.header(header::AUTHORIZATION, basic(ACCOUNT, AUTH_TOKEN))
            }
            Auth::ApiKey => builder = builder.header(header::AUTHORIZATION, basic(KEY, SECRET)),
            Auth::WrongPassword => {
                builder = builder.header(header::AUTHORIZATION, basic(ACCOUNT, "wrong"))
            }
            Auth::Missing => {}
            Auth::Raw(v) => builder = builder.header(header::AUTHORIZATION, v.as_str()),
        }
        match &call.content_type {
            ContentType::Form => {
                builder = builder.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            }
            ContentType::FormCharset => {
                builder = builder.header(
                    header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded; charset=utf-8",
                )
            }
            ContentType::Json => builder = builder.header(header::CONTENT_TYPE, "application/json"),
            ContentType::Missing => {}
            ContentType::Raw(v) => builder = builder.header(header::CONTENT_TYPE, v.as_str()),
        }
        let Ok(mut req) = builder.body(Body::from(call.body.clone())) else {
            return; // Not a request an HTTP parser would let through (bad URI or header).
        };
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 7], 40000))));
        let (status, content_type, body) = fixture.runtime.block_on(async {
            let res = fixture
                .router
                .clone()
                .oneshot(req)
                .await
                .expect("infallible");
            let status = res.status();
            let content_type = res
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = res.into_body().collect().await.expect("body").to_bytes();
            (status, content_type, body)
        });
        assert!(
            !status.is_server_error(),
            "{status} for {call:?}: {}",
            String::from_utf8_lossy(&body)
        );
        if method == Method::HEAD || status.as_u16() == 204 {
            return;
        }
        if status.is_client_error() {
            assert_eq!(
                content_type.as_deref(),
                Some("application/json"),
                "error content type for {call:?}"
            );
            let error: serde_json::Value = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("error body for {call:?} is not JSON ({e}): {body:?}"));
            assert_eq!(
                error["status"].as_u64(),
                Some(u64::from(status.as_u16())),
                "{error}"
            );
            assert!(error["code"].as_u64().is_some(), "{error}");
            assert!(error["message"].as_str().is_some(), "{error}");
        } else if status.is_success() {
            let _: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
                panic!("{status} body for {call:?} is not JSON ({e}): {body:?}")
            });
        }
    }
}

pub mod outbox {
    //! The per-connection outbox against a model: a plain list with the documented rules.
    //!
    //! - items leave in the order they were queued; a frame or a reply slot is a barrier;
    //! - a user's update merges into a queued update of that user only if no frame or slot was
    //!   queued after it: latest state kept, reasons merged; so the writer sees at most one
    //!   pending update per user between two barriers and always the user's latest state;
    //! - the writer stops at a slot until it is sealed and every expected fill was released;
    //! - a close is sent after what is queued, except 4009 (overflow), which drops the queue;
    //! - an item that fits alone is never refused by an empty queue.

    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::task::Waker;

    use arbitrary::Arbitrary;
    use reach_core::outbox::{Outbox, Outgoing, PushOutcome, SlotFrame, SlotId, Update};
    use reach_proto::{
        CloseCode, Encoding, IdentityError, Reasons, ServerFrame, UpdateReason, User,
        decode_server, encode,
    };

    #[derive(Debug, Arbitrary)]
    pub enum Op {
        Frame,
        Update {
            user: u8,
            online: Option<bool>,
            reasons: u8,
            attributes: u8,
        },
        Reserve,
        Fill {
            slot: u8,
            user: u8,
        },
        AddError {
            slot: u8,
            user: u8,
        },
        Expect {
            slot: u8,
        },
        Release {
            slot: u8,
        },
        Seal {
            slot: u8,
        },
        Pop,
        Close {
            forbidden: bool,
        },
    }

    #[derive(Debug, Arbitrary)]
    pub struct Script {
        msgpack: bool,
        small: bool,
        ops: Vec<Op>,
    }

    #[derive(Debug)]
    enum Item {
        Frame(ServerFrame),
        Update {
            user: User,
            reasons: Reasons,
        },
        Slot {
            id: i64,
            users: Vec<User>,
            errors: Vec<IdentityError>,
            sealed: bool,
            awaiting: u32,
        },
    }

    #[derive(Default)]
    struct Model {
        items: VecDeque<(u64, Item)>,
        next_seq: u64,
        /// Sequence of the first item an update may merge into.
        from: u64,
        close: Option<CloseCode>,
    }

    impl Model {
        fn push(&mut self, item: Item) -> u64 {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.items.push_back((seq, item));
            seq
        }

        fn slot(&mut self, seq: u64) -> Option<&mut Item> {
            self.items
                .iter_mut()
                .find(|(s, _)| *s == seq)
                .map(|(_, item)| item)
                .filter(|item| matches!(item, Item::Slot { .. }))
        }

        /// What the writer takes next: a message, a close, or nothing.
        fn pop(&mut self) -> Option<Result<ServerFrame, CloseCode>> {
            let ready = match self.items.front() {
                Some((
                    _,
                    Item::Slot {
                        sealed, awaiting, ..
                    },
                )) => *sealed && *awaiting == 0,
                Some(_) => true,
                None => false,
            };
            if !ready {
                return self.close.filter(|_| self.items.is_empty()).map(Err);
            }
            let (_, item) = self.items.pop_front().expect("front checked");
            Some(Ok(match item {
                Item::Frame(f) => f,
                Item::Update { user, reasons } => ServerFrame::UserUpdated {
                    user,
                    reasons: reasons.to_vec(),
                },
                Item::Slot {
                    id, users, errors, ..
                } => ServerFrame::Subscribed { id, users, errors },
            }))
        }
    }

    fn user(n: u8, online: Option<bool>, attributes: u8) -> User {
        User {
            identity: format!("user{}", n % 6),
            friendly_name: None,
            attributes: format!("{{\"v\":{}}}", "1".repeat(usize::from(attributes))),
            is_online: online,
            is_notifiable: None,
            last_seen_at: None,
        }
    }

    fn reasons(bits: u8) -> Reasons {
        UpdateReason::ALL
            .iter()
            .enumerate()
            .filter(|(i, _)| bits & (1 << i) != 0)
            .map(|(_, r)| *r)
            .collect::<Reasons>()
            .with(UpdateReason::ReachabilityOnline)
    }

    /// Runs the script against an outbox and the model, checking every step.
    pub fn run(script: &Script) {
        let encoding = if script.msgpack {
            Encoding::MsgPack
        } else {
            Encoding::Json
        };
        let max_bytes = if script.small { 2_048 } else { 1 << 20 };
        let outbox = Outbox::new(encoding, max_bytes);
        let mut model = Model::default();
        // Slots reserved so far: (outbox handle, model sequence).
        let mut slots: Vec<(SlotId, u64)> = Vec::new();
        let mut next_id = 0i64;
        let waker = Waker::noop();

        for op in &script.ops {
            let was_empty = model.items.is_empty();
            let refused = |outcome: PushOutcome, size: usize, model: &mut Model| {
                if outcome == PushOutcome::Dropped && model.close.is_none() {
                    assert!(
                        !(was_empty && size <= max_bytes),
                        "an empty queue refused an item of {size} bytes (max {max_bytes})"
                    );
                    model.items.clear();
                    model.close = Some(CloseCode::SlowConsumer);
                }
                outcome == PushOutcome::Dropped
            };
            match *op {
                Op::Frame => {
                    next_id += 1;
                    let frame = ServerFrame::Pong { id: next_id };
                    let size = encode(&frame, encoding).len() + 32;
                    let outcome = outbox.push_frame(&frame);
                    if !refused(outcome, size, &mut model) {
                        assert_eq!(outcome, PushOutcome::Queued);
                        model.push(Item::Frame(frame));
                    }
                    model.from = model.next_seq;
                }
                Op::Update {
                    user: n,
                    online,
                    reasons: bits,
                    attributes,
                } => {
                    let u = user(n, online, attributes);
                    let r = reasons(bits);
                    let identity: Arc<str> = Arc::from(u.identity.as_str());
                    let size = 96 + u.identity.len() + u.attributes.len();
                    let outcome = outbox.push_update(&identity, &Update::new(u.clone(), r));
                    if model.close.is_some() {
                        assert_eq!(
                            outcome,
                            PushOutcome::Dropped,
                            "nothing is queued once closing"
                        );
                        continue;
                    }
                    let from = model.from;
                    let queued = model.items.iter_mut().find(|(seq, item)| {
                        *seq >= from && matches!(item, Item::Update { user, .. } if user.identity == u.identity)
                    });
                    if let Some((_, Item::Update { user, reasons })) = queued {
                        assert_eq!(outcome, PushOutcome::Coalesced, "{} merges", u.identity);
                        *user = u;
                        *reasons = reasons.union(r);
                    } else if !refused(outcome, size, &mut model) {
                        assert_eq!(outcome, PushOutcome::Queued, "{} is queued", u.identity);
                        model.push(Item::Update {
                            user: u,
                            reasons: r,
                        });
                    }
                }
                Op::Reserve => {
                    next_id += 1;
                    let slot = outbox.reserve(SlotFrame::Subscribed {
                        id: next_id,
                        users: Vec::new(),
                        errors: Vec::new(),
                    });
                    match slot {
                        Some(slot) => {
                            assert!(model.close.is_none(), "a slot reserved while closing");
                            let seq = model.push(Item::Slot {
                                id: next_id,
                                users: Vec::new(),
                                errors: Vec::new(),
                                sealed: false,
                                awaiting: 0,
                            });
                            slots.push((slot, seq));
                        }
                        None => {
                            refused(PushOutcome::Dropped, 256, &mut model);
                        }
                    }
                    model.from = model.next_seq;
                }
                Op::Fill { slot, user: n } | Op::AddError { slot, user: n } => {
                    let Some(&(handle, seq)) = slots.get(usize::from(slot) % slots.len().max(1))
                    else {
                        continue;
                    };
                    let u = user(n, Some(true), 0);
                    let fill = matches!(op, Op::Fill { .. });
                    if fill {
                        outbox.fill(handle, u.clone());
                    } else {
                        outbox.add_error(
                            handle,
                            IdentityError {
                                identity: u.identity.clone(),
                                code: 20404,
                                message: "no such user".into(),
                            },
                        );
                    }
                    if let Some(Item::Slot { users, errors, .. }) = model.slot(seq) {
                        if fill {
                            users.push(u);
                        } else {
                            errors.push(IdentityError {
                                identity: u.identity,
                                code: 20404,
                                message: "no such user".into(),
                            });
                        }
                    }
                }
                Op::Expect { slot } | Op::Release { slot } | Op::Seal { slot } => {
                    let Some(&(handle, seq)) = slots.get(usize::from(slot) % slots.len().max(1))
                    else {
                        continue;
                    };
                    match op {
                        Op::Expect { .. } => outbox.expect(handle),
                        Op::Release { .. } => outbox.release(handle),
                        _ => outbox.seal(handle),
                    }
                    if let Some(Item::Slot {
                        sealed, awaiting, ..
                    }) = model.slot(seq)
                    {
                        match op {
                            Op::Expect { .. } => *awaiting += 1,
                            Op::Release { .. } => *awaiting = awaiting.saturating_sub(1),
                            _ => *sealed = true,
                        }
                    }
                }
                Op::Pop => {
                    let got = match outbox.pop(waker) {
                        None => None,
                        Some(Outgoing::Close(code)) => Some(Err(code)),
                        Some(Outgoing::Message(bytes)) => Some(Ok(decode_server(&bytes, encoding)
                            .unwrap_or_else(|e| {
                                panic!("the outbox sent an undecodable frame: {e:?}")
                            }))),
                    };
                    let expected = model.pop();
                    assert_eq!(got, expected, "pop");
                }
                Op::Close { forbidden } => {
                    // 4009 comes only from an overflow, above; the others are asked for by
                    // the drain (1001) and by deletions (4003).
                    let code = if forbidden {
                        CloseCode::Forbidden
                    } else {
                        CloseCode::GoingAway
                    };
                    outbox.close(code);
                    if model.close.is_none() {
                        model.close = Some(code);
                    }
                }
            }
            assert_eq!(outbox.len(), model.items.len(), "queued items after {op:?}");
        }
    }
}

pub mod engine {
    //! The presence engine driven by arbitrary sequences of what sockets, REST and the
    //! backplane do (connect, subscribe, unsubscribe, disconnect, switch flips, profile
    //! updates, deletions, cluster reports), with every connection's outbox read by a model
    //! client that applies frames as the SDKs do. After each step, for every connection whose
    //! queue has been read to the end, what it shows for each user it watches must be the
    //! truth: `is_online` is `true` exactly while the user holds a connection (here or, in
    //! cluster mode, on another node as last reported) and the service has reachability
    //! enabled, `null` while it is disabled, and the friendly name is the latest written.

    use std::collections::{BTreeMap, BTreeSet, HashMap};
    use std::sync::Arc;
    use std::task::Waker;
    use std::time::Duration;

    use arbitrary::Arbitrary;
    use reach_core::engine::{Attach, Conn, Engine, EngineConfig, Profile, ServiceState, UserKey};
    use reach_core::metrics::EngineMetrics;
    use reach_core::outbox::{Outgoing, SlotFrame};
    use reach_proto::{CloseCode, Encoding, ServerFrame, User, decode_server};

    const SERVICES: [&str; 2] = [
        "IS00000000000000000000000000000001",
        "IS00000000000000000000000000000002",
    ];
    const USERS: usize = 4;

    #[derive(Debug, Arbitrary)]
    pub enum Op {
        Connect {
            service: u8,
            user: u8,
            msgpack: bool,
        },
        Subscribe {
            conn: u8,
            user: u8,
        },
        Unsubscribe {
            conn: u8,
            user: u8,
        },
        Disconnect {
            conn: u8,
            bye: bool,
        },
        Read {
            conn: u8,
        },
        Switch {
            service: u8,
            enabled: bool,
        },
        Rename {
            service: u8,
            user: u8,
            name: Option<u8>,
        },
        Bindings {
            service: u8,
            user: u8,
            count: u8,
        },
        RemoveUser {
            service: u8,
            user: u8,
        },
        Remote {
            service: u8,
            user: u8,
            held: bool,
        },
    }

    #[derive(Debug, Arbitrary)]
    pub struct Script {
        cluster: bool,
        enabled: [bool; 2],
        ops: Vec<Op>,
    }

    fn identity(n: u8) -> String {
        format!("user{}", usize::from(n) % USERS)
    }

    /// One connection and what its model client has read.
    struct Client {
        conn: Arc<Conn>,
        /// Identities subscribed besides its own (the session's list).
        watched: BTreeSet<String>,
        /// Each user as last read from a `welcome`, `subscribed` or `user_updated`.
        seen: HashMap<String, User>,
        closed: bool,
    }

    /// The records as the store holds them.
    #[derive(Default)]
    struct Records {
        profiles: HashMap<(usize, String), Profile>,
    }

    impl Records {
        fn profile(&mut self, s: usize, id: &str) -> Profile {
            self.profiles
                .entry((s, id.to_owned()))
                .or_insert_with(|| Profile {
                    revision: 1,
                    friendly_name: None,
                    attributes: "{}".into(),
                    binding_count: 0,
                    ever_had_binding: false,
                    online_epoch: 0,
                    last_seen_at: None,
                })
                .clone()
        }
    }

    struct World {
        engine: Arc<Engine>,
        cluster: bool,
        clients: Vec<Client>,
        services: [ServiceState; 2],
        records: Records,
        /// Cluster mode: what the backplane last reported per user, while it is watched.
        remote: BTreeMap<(usize, String), bool>,
        version: u64,
        next_id: i64,
        _events: Option<tokio::sync::mpsc::UnboundedReceiver<reach_core::engine::ClusterEvent>>,
    }

    impl World {
        fn service_of(conn: &Conn) -> usize {
            SERVICES
                .iter()
                .position(|s| *s == conn.service())
                .expect("known service")
        }

        /// Fills a slot as the gateway does: the engine's state, or the profile loaded first.
        fn fill(
            &mut self,
            client: usize,
            id: &str,
            slot: reach_core::outbox::SlotId,
            found: Attach,
        ) {
            if found == Attach::NeedsProfile {
                let conn = Arc::clone(&self.clients[client].conn);
                let s = Self::service_of(&conn);
                let profile = self.records.profile(s, id);
                self.engine.load_profile(SERVICES[s], id, profile);
                assert_eq!(
                    self.engine.fill(&conn, id, slot),
                    Attach::Filled,
                    "a loaded profile fills the slot"
                );
            }
        }

        fn is_watched(&self, s: usize, id: &str) -> bool {
            self.clients.iter().any(|c| {
                !c.closed
                    && Self::service_of(&c.conn) == s
                    && c.watched.contains(id)
                    && c.conn.identity() != id
            })
        }

        fn local(&self, s: usize, id: &str) -> bool {
            self.clients
                .iter()
                .any(|c| Self::service_of(&c.conn) == s && c.conn.identity() == id && !c.closed)
        }

        fn visible(&self, s: usize, id: &str) -> bool {
            self.local(s, id)
                || self
                    .remote
                    .get(&(s, id.to_owned()))
                    .copied()
                    .unwrap_or(false)
        }

        fn forget_unwatched(&mut self) {
            let keys: Vec<_> = self.remote.keys().cloned().collect();
            for (s, id) in keys {
                if !self.is_watched(s, &id) {
                    self.remote.remove(&(s, id));
                }
            }
        }

        fn disconnect(&mut self, c: usize, bye: bool) {
            let client = &mut self.clients[c];
            if client.closed {
                return;
            }
            client.closed = true;
            let s = Self::service_of(&client.conn);
            let watched: Vec<UserKey> = client
                .watched
                .iter()
                .map(|id| UserKey::new(SERVICES[s], id))
                .collect();
            let conn = Arc::clone(&client.conn);
            self.engine.detach(&conn, &watched, bye);
            self.forget_unwatched();
        }

        /// Reads a connection's queue to its end (or to a slot still waiting) and checks what
        /// its client shows.
        fn read(&mut self, c: usize) {
            let waker = Waker::noop();
            let encoding = self.clients[c].conn.outbox.encoding();
            loop {
                let client = &mut self.clients[c];
                if client.closed {
                    return;
                }
                match client.conn.outbox.pop(waker) {
                    None => break,
                    Some(Outgoing::Close(code)) => {
                        assert!(
                            matches!(code, CloseCode::Forbidden | CloseCode::SlowConsumer),
                            "closed with {code:?}"
                        );
                        // The session ends the connection as after any close.
                        self.disconnect(c, false);
                        return;
                    }
                    Some(Outgoing::Message(bytes)) => {
                        let frame =
                            decode_server(&bytes, encoding).expect("the engine's frames decode");
                        match frame {
                            ServerFrame::Welcome { user, .. } => {
                                client.seen.insert(user.identity.clone(), user);
                            }
                            ServerFrame::Subscribed { users, .. } => {
                                for user in users {
                                    client.seen.insert(user.identity.clone(), user);
                                }
                            }
                            ServerFrame::UserUpdated { user, .. } => {
                                assert!(
                                    user.identity == client.conn.identity()
                                        || client.watched.contains(&user.identity)
                                        || client.seen.contains_key(&user.identity),
                                    "{} was sent {} it never subscribed to",
                                    client.conn.identity(),
                                    user.identity
                                );
                                client.seen.insert(user.identity.clone(), user);
                            }
                            ServerFrame::ServiceUpdated { .. } => {}
                            other => panic!("unexpected frame {other:?}"),
                        }
                    }
                }
            }
            let client = &self.clients[c];
            if !client.conn.outbox.is_empty() {
                return; // A reply still waits for the backplane.
            }
            let s = Self::service_of(&client.conn);
            let svc = self.services[s];
            let own = client.conn.identity().to_owned();
            for id in client.watched.iter().chain(std::iter::once(&own)) {
                let user = client.seen.get(id).unwrap_or_else(|| {
                    panic!("{own} read its queue to the end without {id}'s state")
                });
                let expected = if !svc.enabled {
                    None
                } else if self.visible(s, id) {
                    Some(true)
                } else {
                    user.is_online.filter(|&o| !o) // false or null: both mean offline
                };
                assert_eq!(
                    user.is_online,
                    expected,
                    "{own} sees {id}'s is_online as {:?} (service {}, cluster {})",
                    user.is_online,
                    if svc.enabled { "enabled" } else { "disabled" },
                    self.cluster
                );
                let mut records = std::mem::take(&mut self.records);
                let profile = records.profile(s, id);
                self.records = records;
                assert_eq!(
                    user.friendly_name, profile.friendly_name,
                    "{own} sees {id}'s name"
                );
                if !svc.enabled {
                    assert_eq!(
                        user.is_notifiable, None,
                        "{own} sees {id}'s is_notifiable while disabled"
                    );
                } else if profile.ever_had_binding {
                    assert_eq!(
                        user.is_notifiable,
                        Some(profile.binding_count > 0),
                        "{own} sees {id}'s is_notifiable"
                    );
                }
            }
        }

        fn profile_write(&mut self, s: usize, id: &str, change: impl FnOnce(&mut Profile)) {
            let mut profile = self.records.profile(s, id);
            profile.revision += 1;
            change(&mut profile);
            self.records
                .profiles
                .insert((s, id.to_owned()), profile.clone());
            self.engine.update_profile(SERVICES[s], id, profile);
        }

        fn step(&mut self, op: &Op) {
            let live: Vec<usize> = (0..self.clients.len())
                .filter(|&i| !self.clients[i].closed)
                .collect();
            let pick = |n: u8| live.get(usize::from(n) % live.len().max(1)).copied();
            match *op {
                Op::Connect {
                    service,
                    user,
                    msgpack,
                } => {
                    if live.len() >= 16 {
                        return;
                    }
                    let s = usize::from(service) % 2;
                    let id = identity(user);
                    let enc = if msgpack {
                        Encoding::MsgPack
                    } else {
                        Encoding::Json
                    };
                    let conn = self.engine.new_conn(SERVICES[s], &id, enc);
                    self.clients.push(Client {
                        conn: Arc::clone(&conn),
                        watched: BTreeSet::new(),
                        seen: HashMap::new(),
                        closed: false,
                    });
                    let c = self.clients.len() - 1;
                    let svc = self.services[s];
                    let slot = conn
                        .outbox
                        .reserve_guarded(SlotFrame::Welcome {
                            connection_id: format!("CN{}", conn.id),
                            identity: id.clone(),
                            service_sid: SERVICES[s].to_owned(),
                            reachability_enabled: svc.enabled,
                            heartbeat_interval_ms: 30_000,
                            token_expires_at: 0,
                            user: None,
                        })
                        .expect("a new outbox takes a slot");
                    let found = self.engine.attach(&conn, slot.id());
                    self.fill(c, &id, slot.id(), found);
                    drop(slot);
                }
                Op::Subscribe { conn, user } => {
                    let Some(c) = pick(conn) else { return };
                    let id = identity(user);
                    self.next_id += 1;
                    let handle = Arc::clone(&self.clients[c].conn);
                    let Some(slot) = handle.outbox.reserve_guarded(SlotFrame::Subscribed {
                        id: self.next_id,
                        users: Vec::new(),
                        errors: Vec::new(),
                    }) else {
                        return; // Overflowed: the next read closes it.
                    };
                    let (found, _) = self.engine.subscribe(&handle, &id, slot.id());
                    if id != handle.identity() {
                        self.clients[c].watched.insert(id.clone());
                    }
                    self.fill(c, &id, slot.id(), found);
                    drop(slot);
                }
                Op::Unsubscribe { conn, user } => {
                    let Some(c) = pick(conn) else { return };
                    let id = identity(user);
                    let handle = Arc::clone(&self.clients[c].conn);
                    self.engine.unsubscribe(&handle, &id);
                    self.clients[c].watched.remove(&id);
                    self.forget_unwatched();
                }
                Op::Disconnect { conn, bye } => {
                    if let Some(c) = pick(conn) {
                        self.disconnect(c, bye);
                    }
                }
                Op::Read { conn } => {
                    if let Some(c) = pick(conn) {
                        self.read(c);
                    }
                }
                Op::Switch { service, enabled } => {
                    let s = usize::from(service) % 2;
                    let mut state = self.services[s];
                    if enabled && !state.enabled {
                        state.epoch += 1; // Each enabling starts an epoch (the store's rule).
                    }
                    state.enabled = enabled;
                    self.services[s] = state;
                    self.engine.set_service(SERVICES[s], state);
                }
                Op::Rename {
                    service,
                    user,
                    name,
                } => {
                    let s = usize::from(service) % 2;
                    let name = name.map(|n| format!("name {n}"));
                    self.profile_write(s, &identity(user), |p| p.friendly_name = name);
                }
                Op::Bindings {
                    service,
                    user,
                    count,
                } => {
                    let s = usize::from(service) % 2;
                    let count = i64::from(count % 3);
                    self.profile_write(s, &identity(user), |p| {
                        p.binding_count = count;
                        p.ever_had_binding |= count > 0;
                    });
                }
                Op::RemoveUser { service, user } => {
                    let s = usize::from(service) % 2;
                    self.engine.remove_user(SERVICES[s], &identity(user));
                }
                Op::Remote {
                    service,
                    user,
                    held,
                } => {
                    // The backplane reports only users watched here.
                    let s = usize::from(service) % 2;
                    let id = identity(user);
                    if !self.cluster || !self.is_watched(s, &id) {
                        return;
                    }
                    self.version += 1;
                    self.remote.insert((s, id.clone()), held);
                    self.engine
                        .apply_remote(&UserKey::new(SERVICES[s], &id), self.version, held);
                }
            }
        }
    }

    /// Runs the script, checking after every step.
    pub fn run(script: &Script) {
        let config = EngineConfig {
            // No grace: an offline grace needs a timer task; `bye` and the grace share the
            // path taken here (go_offline), and the gateway's tests cover the timer.
            offline_grace: Duration::ZERO,
            max_outbox_bytes: 64 * 1024,
        };
        let (engine, events) = if script.cluster {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            (
                Engine::new_clustered(config, EngineMetrics::unregistered(), None, tx),
                Some(rx),
            )
        } else {
            (
                Engine::new(config, EngineMetrics::unregistered(), None),
                None,
            )
        };
        let services = script.enabled.map(|enabled| ServiceState {
            enabled,
            epoch: i64::from(enabled),
        });
        for (s, state) in services.iter().enumerate() {
            engine.set_service(SERVICES[s], *state);
        }
        let mut world = World {
            engine,
            cluster: script.cluster,
            clients: Vec::new(),
            services,
            records: Records::default(),
            remote: BTreeMap::new(),
            version: 0,
            next_id: 0,
            _events: events,
        };
        for op in script.ops.iter().take(256) {
            world.step(op);
        }
        for c in 0..world.clients.len() {
            world.read(c);
        }
    }
}
