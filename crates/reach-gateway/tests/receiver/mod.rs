//! A webhook receiver for the tests: a real HTTP server on 127.0.0.1 that records every request
//! and answers as scripted (2xx, any status, 429 with `Retry-After`, or no answer at all), and
//! the signature check of docs/webhooks.md, written out here independently of reachd's code.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use tokio::sync::mpsc;

/// Generous wait for one webhook.
pub const HOOK_WAIT: Duration = Duration::from_secs(20);

/// How the receiver answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200, empty body.
    Ok,
    /// This status.
    Status(u16),
    /// 429 with `Retry-After: <seconds>`.
    RetryAfter(u64),
    /// Never answers (the connection stays open until reachd gives up).
    Hang,
}

/// One request as the receiver got it.
#[derive(Debug, Clone)]
pub struct Hook {
    pub method: String,
    /// The URL as a receiver reconstructs it: `http://<Host><path and query>`.
    pub url: String,
    pub headers: HeaderMap,
    /// The form body's parameters (POST) or the query string's (GET), decoded, in order.
    pub params: Vec<(String, String)>,
    pub at: Instant,
}

impl Hook {
    pub fn param(&self, name: &str) -> &str {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{name} missing from {:?}", self.params))
    }

    pub fn has(&self, name: &str) -> bool {
        self.params.iter().any(|(n, _)| n == name)
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("header {name} missing: {:?}", self.headers))
    }

    pub fn token(&self) -> &str {
        self.header("I-Twilio-Idempotency-Token")
    }

    pub fn event(&self) -> &str {
        self.param("EventType")
    }

    /// Checks `X-Twilio-Signature` by the documented algorithm: base64 of HMAC-SHA1 keyed with
    /// the auth token, over the URL followed (POST) by each parameter's name and value sorted
    /// by name; a GET signs its whole URL.
    pub fn signature_valid(&self, auth_token: &str) -> bool {
        let mut data = self.url.clone();
        if self.method == "POST" {
            let mut sorted = self.params.clone();
            sorted.sort();
            for (name, value) in sorted {
                data.push_str(&name);
                data.push_str(&value);
            }
        }
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(auth_token.as_bytes()).unwrap();
        mac.update(data.as_bytes());
        let expected =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        self.headers
            .get("X-Twilio-Signature")
            .and_then(|v| v.to_str().ok())
            == Some(expected.as_str())
    }
}

struct Shared {
    script: Mutex<VecDeque<Reply>>,
    hooks: mpsc::UnboundedSender<Hook>,
}

/// A running receiver. Dropping it stops the server.
pub struct Receiver {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    hooks: mpsc::UnboundedReceiver<Hook>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Receiver {
    /// A receiver on a free port of 127.0.0.1.
    pub async fn start() -> Receiver {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// A receiver on `addr` (e.g. the address a receiver that was down will have).
    pub async fn start_on(addr: SocketAddr) -> Receiver {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            script: Mutex::new(VecDeque::new()),
            hooks: tx,
        });
        let app = axum::Router::new()
            .fallback(record)
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            addr,
            shared,
            hooks: rx,
            server,
        }
    }

    /// A free address on which nothing listens (yet).
    pub fn free_addr() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    /// The URL of `path` on this receiver.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The next requests are answered with these, in order; then 200 again.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.script.lock().unwrap().extend(replies);
    }

    /// The next request, within [`HOOK_WAIT`].
    pub async fn next(&mut self) -> Hook {
        tokio::time::timeout(HOOK_WAIT, self.hooks.recv())
            .await
            .expect("a webhook within the wait")
            .expect("receiver running")
    }

    /// The next request whose `EventType` is `event`, skipping others.
    pub async fn next_event(&mut self, event: &str) -> Hook {
        loop {
            let hook = self.next().await;
            if hook.event() == event {
                return hook;
            }
        }
    }

    /// Asserts that no request arrives within `wait`.
    pub async fn none_within(&mut self, wait: Duration) {
        if let Ok(Some(hook)) = tokio::time::timeout(wait, self.hooks.recv()).await {
            panic!("unexpected webhook: {:?}", hook.params);
        }
    }
}

async fn record(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body: Bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let host = parts
        .headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    let encoded = if parts.method == "GET" {
        parts.uri.query().unwrap_or("").as_bytes().to_vec()
    } else {
        body.to_vec()
    };
    let params = url::form_urlencoded::parse(&encoded)
        .map(|(n, v)| (n.into_owned(), v.into_owned()))
        .collect();
    let hook = Hook {
        method: parts.method.to_string(),
        url: format!("http://{host}{path_and_query}"),
        headers: parts.headers,
        params,
        at: Instant::now(),
    };
    let _ = shared.hooks.send(hook);
    let reply = shared
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Reply::Ok);
    match reply {
        Reply::Ok => StatusCode::OK.into_response(),
        Reply::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Reply::RetryAfter(seconds) => (
            StatusCode::TOO_MANY_REQUESTS,
            [("Retry-After", seconds.to_string())],
        )
            .into_response(),
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
    }
}
