//! Webhook delivery: takes recorded events from the store's queue and sends them to each
//! service's `post_webhook_url`, signed as the hosted service signs its webhooks, at least once
//! and in order per user (`docs/webhooks.md`).
//!
//! Data flow: writes record events in the store (`reach_store::hooks`) and wake this node's
//! deliverer ([`App::wake_webhooks`]); it also looks every `webhooks.poll_interval_ms` (events
//! recorded by other nodes, retries that came due). [`run`] claims due events with a lease
//! (`Store::claim_events`: of each user only the oldest, so a user's events go one at a time),
//! sends each from a task of its own, at most `webhooks.max_in_flight` at once, and hands the
//! outcome to [`write_outcomes`], which writes them to the store in batches: delivered and
//! given-up events are deleted, failed ones get their next attempt time.
//!
//! - An attempt is delivered on any 2xx; retried after a timeout (`webhooks.timeout_ms`), a
//!   connection error, a 429 (not before its `Retry-After`) or a 5xx, with exponential backoff
//!   from `webhooks.retry_initial_ms` and jitter; given up on any other status, or after
//!   `webhooks.max_attempts` attempts or `webhooks.max_age_ms`. Given-up events are logged and
//!   counted. Redirects are not followed.
//! - The request: `POST` with the parameters as a form body, or `GET` with them in the query
//!   string; `X-Twilio-Signature` ([`signature`]) from the service's account's auth token, and
//!   `I-Twilio-Idempotency-Token`, the event's token, the same on every attempt.
//! - Nothing here runs on a socket's path: a slow or dead receiver holds a delivery task, a
//!   slot of `max_in_flight` and a store lease, never a socket or the engine.
//! - URLs on link-local addresses and the cloud metadata endpoints are refused
//!   ([`check_url`] when configured; the resolver drops such addresses at delivery, so a name
//!   that resolves to one later is refused too) unless `webhooks.allow_link_local` is set.
//! - Draining: no new claims; the tasks in flight finish (each within the timeout), their
//!   outcomes are written and this node's remaining leases are given back.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use rand::Rng;
use reach_store::hooks::now_ms;
use reach_store::{Claim, ClaimedEvent, Completion, Target, WebhookMethod};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::task::TaskTracker;

use crate::config::WebhooksConfig;
use crate::state::App;

/// The webhook metrics.
#[derive(Debug, Clone)]
pub struct WebhookMetrics {
    /// Attempts and their ends, by outcome: `delivered`, `failed` (to be retried),
    /// `given_up` (a final status, or out of attempts or age), `dropped` (the service no longer
    /// has the URL or the filter, or its account is not configured).
    pub deliveries: IntCounterVec,
    /// From an event's recording to the 2xx of its receiver.
    pub latency: Histogram,
    /// One attempt: connect, send, the receiver's answer.
    pub attempt_duration: Histogram,
    /// Events waiting in the store (the cluster's queue, as this node last read it).
    pub queue_depth: IntGauge,
    /// Age of the oldest waiting event, in seconds (0 when none).
    pub oldest_age: IntGauge,
    /// Presence changes waiting in memory to be written to the store.
    pub presence_pending: IntGauge,
    /// Presence changes merged into a later one of the same user while the store could not
    /// be written (only the latest state of each user is kept past a bound).
    pub presence_coalesced: prometheus::IntCounter,
}

impl WebhookMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<WebhookMetrics> {
        let m = WebhookMetrics {
            deliveries: IntCounterVec::new(
                Opts::new(
                    "reach_webhook_deliveries_total",
                    "Webhook attempts and events by outcome (delivered, failed, given_up, dropped)",
                ),
                &["outcome"],
            )?,
            latency: Histogram::with_opts(
                HistogramOpts::new(
                    "reach_webhook_delivery_latency_seconds",
                    "From recording an event to its receiver's 2xx",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 1800.0, 3600.0,
                ]),
            )?,
            attempt_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "reach_webhook_attempt_duration_seconds",
                    "One webhook request, from connecting to the receiver's answer",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )?,
            queue_depth: IntGauge::new(
                "reach_webhook_queue_depth",
                "Webhook events waiting for delivery in the store",
            )?,
            oldest_age: IntGauge::new(
                "reach_webhook_oldest_pending_age_seconds",
                "Age of the oldest webhook event waiting for delivery",
            )?,
            presence_pending: IntGauge::new(
                "reach_presence_changes_pending",
                "Presence changes waiting in memory to be written to the store",
            )?,
            presence_coalesced: prometheus::IntCounter::new(
                "reach_presence_changes_coalesced_total",
                "Presence changes merged into a later one of the same user while the store was unavailable",
            )?,
        };
        registry.register(Box::new(m.deliveries.clone()))?;
        registry.register(Box::new(m.latency.clone()))?;
        registry.register(Box::new(m.attempt_duration.clone()))?;
        registry.register(Box::new(m.queue_depth.clone()))?;
        registry.register(Box::new(m.oldest_age.clone()))?;
        registry.register(Box::new(m.presence_pending.clone()))?;
        registry.register(Box::new(m.presence_coalesced.clone()))?;
        for outcome in ["delivered", "failed", "given_up", "dropped"] {
            m.deliveries.with_label_values(&[outcome]);
        }
        Ok(m)
    }
}

/// Host names of cloud metadata services (their addresses are link-local or refused below).
const METADATA_HOSTS: &[&str] = &[
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
];

/// Link-local addresses and the cloud metadata endpoints outside that range, also when an
/// IPv6 address carries one of those IPv4 addresses (mapped, compatible, NAT64, 6to4).
pub fn refused_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_link_local()
                // Alibaba Cloud's metadata service.
                || v4.octets() == [100, 100, 100, 200]
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                return refused_ip(IpAddr::V4(v4));
            }
            // fe80::/10, and AWS's IPv6 metadata endpoint fd00:ec2::254.
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.segments() == [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254]
        }
    }
}

/// The IPv4 address an IPv6 address stands for: `::ffff:a.b.c.d` (mapped), `::a.b.c.d`
/// (compatible), `64:ff9b::a.b.c.d` (NAT64) and `2002:aabb:ccdd::/48` (6to4).
fn embedded_v4(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let s = v6.segments();
    let v4 = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        std::net::Ipv4Addr::new(a, b, c, d)
    };
    if let Some(mapped) = v6.to_ipv4_mapped() {
        Some(mapped)
    } else if (s[..6] == [0; 6] && (s[6] != 0 || s[7] > 1)) || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
    {
        Some(v4(s[6], s[7]))
    } else if s[0] == 0x2002 {
        Some(v4(s[1], s[2]))
    } else {
        None
    }
}

/// Longest webhook URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// Checks a webhook URL as configured and returns it normalised (the form that is signed and
/// requested): absolute `http` or `https` with a host, no credentials, not on a refused
/// address unless `allow_link_local`. The error says what is wrong.
pub fn check_url(raw: &str, allow_link_local: bool) -> Result<String, String> {
    if raw.len() > MAX_URL_LEN {
        return Err(format!("must be at most {MAX_URL_LEN} characters"));
    }
    let url = url::Url::parse(raw).map_err(|e| format!("must be an absolute URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "must be an http:// or https:// URL, not {}://",
            url.scheme()
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials (the signature authenticates reachd)".into());
    }
    let refused = match url.host() {
        None => return Err("must name a host".into()),
        Some(url::Host::Ipv4(ip)) => refused_ip(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => refused_ip(IpAddr::V6(ip)),
        Some(url::Host::Domain(name)) => {
            METADATA_HOSTS.contains(&name.trim_end_matches('.').to_ascii_lowercase().as_str())
        }
    };
    if refused && !allow_link_local {
        return Err(
            "must not point at a link-local address or a cloud metadata endpoint (set webhooks.allow_link_local to allow it)"
                .into(),
        );
    }
    Ok(url.to_string())
}

/// `X-Twilio-Signature`: base64 of the HMAC-SHA1, keyed with the account's auth token, of the
/// URL followed by each parameter's name and value, sorted by name (POST). A GET request
/// signs its whole URL, query string included, with no parameters after it.
pub fn signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(auth_token.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// When to try again, by the retry settings.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub initial: Duration,
    pub max: Duration,
    pub max_attempts: i64,
    pub max_age: Duration,
}

impl Policy {
    pub fn new(config: &WebhooksConfig) -> Policy {
        Policy {
            initial: Duration::from_millis(config.retry_initial_ms),
            max: Duration::from_millis(config.retry_max_ms),
            max_attempts: i64::from(config.max_attempts),
            max_age: Duration::from_millis(config.max_age_ms),
        }
    }

    /// The backoff after the `attempts`-th failed attempt: `initial * 2^(attempts - 1)`,
    /// capped at `max`, then drawn uniformly from its upper half (so that events that failed
    /// together, e.g. while a receiver was down, do not all come back at once).
    pub fn backoff(&self, attempts: i64, rng: &mut impl Rng) -> Duration {
        let doublings = u32::try_from(attempts.saturating_sub(1).clamp(0, 32)).unwrap_or(32);
        let full = self
            .initial
            .saturating_mul(2u32.saturating_pow(doublings))
            .min(self.max);
        let half = full / 2;
        half + full.mul_f64(rng.random_range(0.0..=0.5))
    }

    /// The time of the next attempt (unix ms) after a failed `attempts`-th one at `now_ms`, or
    /// `None` to give up. `retry_after` (a 429's) is a floor.
    pub fn next_attempt(
        &self,
        attempts: i64,
        created_ms: i64,
        now_ms: i64,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Option<i64> {
        if attempts >= self.max_attempts {
            return None;
        }
        let mut delay = self.backoff(attempts, rng);
        if let Some(floor) = retry_after {
            delay = delay.max(floor);
        }
        let at = now_ms.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
        let age_limit =
            created_ms.saturating_add(i64::try_from(self.max_age.as_millis()).unwrap_or(i64::MAX));
        (at <= age_limit).then_some(at)
    }
}

/// `Retry-After`: seconds, or an HTTP date.
fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// What one attempt found.
#[derive(Debug)]
enum Attempt {
    Delivered,
    /// Worth another attempt.
    Failed {
        error: String,
        retry_after: Option<Duration>,
    },
    /// A final answer (another status than 2xx, 429 or 5xx), or a refused address.
    Refused {
        error: String,
    },
}

/// The resolver of the webhook client: the system's, without refused addresses.
struct Resolver {
    allow_link_local: bool,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow_link_local;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            if !allow && METADATA_HOSTS.contains(&host.trim_end_matches('.')) {
                return Err(format!("{host} is a cloud metadata endpoint").into());
            }
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| allow || !refused_ip(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(
                    format!("{host} resolves to no address outside link-local ranges").into(),
                );
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// The HTTP client of the deliveries.
fn client(config: &WebhooksConfig) -> reqwest::Result<reqwest::Client> {
    let timeout = Duration::from_millis(config.timeout_ms);
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("reachd/", env!("CARGO_PKG_VERSION"), " (webhooks)"))
        .pool_idle_timeout(Duration::from_secs(30))
        // Straight to the receiver: a proxy from the environment would resolve the name
        // itself, past the resolver below.
        .no_proxy()
        .dns_resolver(Arc::new(Resolver {
            allow_link_local: config.allow_link_local,
        }))
        .build()
}

/// Sends one event to its target.
async fn attempt(
    client: &reqwest::Client,
    event: &ClaimedEvent,
    target: &Target,
    auth_token: &str,
    allow_link_local: bool,
) -> Attempt {
    let Ok(mut url) = url::Url::parse(&target.url) else {
        return Attempt::Refused {
            error: format!("unusable URL {}", target.url),
        };
    };
    let literal = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        _ => None,
    };
    if !allow_link_local && literal.is_some_and(refused_ip) {
        return Attempt::Refused {
            error: format!("{} is a link-local or metadata address", target.url),
        };
    }
    let request = match target.method {
        WebhookMethod::Post => client
            .post(url.as_str())
            .header(
                "X-Twilio-Signature",
                signature(auth_token, &target.url, &event.params),
            )
            .form(&event.params),
        WebhookMethod::Get => {
            url.query_pairs_mut().extend_pairs(&event.params);
            client.get(url.as_str()).header(
                "X-Twilio-Signature",
                signature(auth_token, url.as_str(), &[]),
            )
        }
    };
    match request
        .header("I-Twilio-Idempotency-Token", &event.token)
        .send()
        .await
    {
        Ok(response) => {
            let status = response.status();
            if status.is_success() {
                Attempt::Delivered
            } else if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                Attempt::Failed {
                    error: "HTTP 429".into(),
                    retry_after: response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(retry_after),
                }
            } else if status.is_server_error() {
                Attempt::Failed {
                    error: format!("HTTP {}", status.as_u16()),
                    retry_after: None,
                }
            } else {
                Attempt::Refused {
                    error: format!("HTTP {} (final)", status.as_u16()),
                }
            }
        }
        Err(e) => Attempt::Failed {
            // Without the URL: its query string may hold a receiver's secret.
            error: if e.is_timeout() {
                "timed out".into()
            } else if e.is_connect() {
                format!("cannot connect: {}", source_chain(&e.without_url()))
            } else {
                source_chain(&e.without_url())
            },
            retry_after: None,
        },
    }
}

/// An error with its causes, `a: b: c`.
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// What the deliveries share.
struct Deliverer {
    app: Arc<App>,
    client: reqwest::Client,
    policy: Policy,
    outcomes: mpsc::UnboundedSender<(Claim, Completion)>,
}

impl Deliverer {
    /// Delivers one claimed event and reports its outcome.
    async fn deliver(&self, event: ClaimedEvent) {
        let metrics = &self.app.metrics.webhooks;
        let config = &self.app.config.webhooks;
        let Some(target) = &event.target else {
            metrics.deliveries.with_label_values(&["dropped"]).inc();
            tracing::debug!(event = %event.token, service = %event.service_sid, "webhook event dropped: the service no longer sends it");
            let _ = self.outcomes.send((event.claim(), Completion::Dropped));
            return;
        };
        let Some(auth_token) = self.app.creds.auth_token(target.account_sid.as_str()) else {
            metrics.deliveries.with_label_values(&["dropped"]).inc();
            tracing::warn!(event = %event.token, account = %target.account_sid, "webhook event dropped: its account is not configured, so it cannot be signed");
            let _ = self.outcomes.send((event.claim(), Completion::Dropped));
            return;
        };
        if now_ms().saturating_sub(event.created_ms)
            > i64::try_from(config.max_age_ms).unwrap_or(i64::MAX)
        {
            // Too old to be worth sending (e.g. it waited behind its user's earlier events).
            let completion = self.give_up(&event, "older than webhooks.max_age_ms");
            let _ = self.outcomes.send((event.claim(), completion));
            return;
        }
        let started = Instant::now();
        let result = attempt(
            &self.client,
            &event,
            target,
            auth_token,
            config.allow_link_local,
        )
        .await;
        metrics
            .attempt_duration
            .observe(started.elapsed().as_secs_f64());
        let now = now_ms();
        let completion = match result {
            Attempt::Delivered => {
                metrics.deliveries.with_label_values(&["delivered"]).inc();
                metrics
                    .latency
                    .observe((now - event.created_ms).max(0) as f64 / 1000.0);
                Completion::Delivered
            }
            Attempt::Failed { error, retry_after } => {
                let next = self.policy.next_attempt(
                    event.attempts,
                    event.created_ms,
                    now,
                    retry_after,
                    &mut rand::rng(),
                );
                match next {
                    Some(at_ms) => {
                        metrics.deliveries.with_label_values(&["failed"]).inc();
                        tracing::debug!(event = %event.token, attempts = event.attempts, error = %error, retry_in_ms = at_ms - now, "webhook attempt failed");
                        Completion::Retry { at_ms, error }
                    }
                    None => self.give_up(&event, &error),
                }
            }
            Attempt::Refused { error } => self.give_up(&event, &error),
        };
        let _ = self.outcomes.send((event.claim(), completion));
    }

    fn give_up(&self, event: &ClaimedEvent, error: &str) -> Completion {
        self.app
            .metrics
            .webhooks
            .deliveries
            .with_label_values(&["given_up"])
            .inc();
        tracing::warn!(
            event = %event.token,
            event_type = %event.event_type,
            service = %event.service_sid,
            identity = %event.identity,
            attempts = event.attempts,
            error = %error,
            "webhook event given up"
        );
        Completion::Dropped
    }
}

/// Delivers this node's share of the queue until the app drains (see the module doc).
pub async fn run(app: Arc<App>, node: String) {
    let config = app.config.webhooks.clone();
    let client = match client(&config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client: no webhooks will be sent");
            return;
        }
    };
    let (outcomes_tx, outcomes_rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_outcomes(Arc::clone(&app), node.clone(), outcomes_rx));
    let deliverer = Arc::new(Deliverer {
        app: Arc::clone(&app),
        client,
        policy: Policy::new(&config),
        outcomes: outcomes_tx,
    });
    let slots = Arc::new(Semaphore::new(config.max_in_flight));
    let tasks = TaskTracker::new();
    let poll = Duration::from_millis(config.poll_interval_ms);
    let lease_ms = i64::try_from(config.lease_ms).unwrap_or(i64::MAX);
    let mut claim_failures = 0u32;
    loop {
        loop {
            let free = slots.available_permits();
            if free == 0 || app.shutdown.is_cancelled() {
                break;
            }
            let claimed = match app
                .store
                .claim_events(&node, now_ms(), lease_ms, free as i64)
                .await
            {
                Ok(events) => {
                    claim_failures = 0;
                    events
                }
                Err(e) => {
                    // Once, then about once a minute while it lasts.
                    if claim_failures.is_multiple_of(60) {
                        tracing::warn!(error = %e, "cannot take webhook events from the store; retrying");
                    }
                    claim_failures = claim_failures.saturating_add(1);
                    break;
                }
            };
            if claimed.is_empty() {
                break;
            }
            for event in claimed {
                let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let deliverer = Arc::clone(&deliverer);
                tasks.spawn(async move {
                    deliverer.deliver(event).await;
                    drop(permit);
                });
            }
        }
        tokio::select! {
            _ = app.webhook_wake.notified() => {}
            _ = tokio::time::sleep(poll) => {}
            _ = app.shutdown.cancelled() => break,
        }
    }
    // Draining: the attempts in flight end within the timeout; then their outcomes are
    // written and the leases this node still holds given back.
    tasks.close();
    tasks.wait().await;
    drop(deliverer);
    let _ = writer.await;
    match app.store.release_events(Some(&node)).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(events = n, "webhook leases given back"),
        Err(e) => tracing::warn!(error = %e, "cannot give back webhook leases; they expire"),
    }
}

/// Writes outcomes to the store in batches; after each, wakes the deliverer (a delivered
/// event may have been its user's oldest). Ends when every sender is gone.
async fn write_outcomes(
    app: Arc<App>,
    node: String,
    mut rx: mpsc::UnboundedReceiver<(Claim, Completion)>,
) {
    const BATCH: usize = 256;
    let mut batch = Vec::new();
    loop {
        if batch.is_empty() {
            match rx.recv().await {
                Some(outcome) => batch.push(outcome),
                None => return,
            }
        }
        // A short wait gathers the outcomes of deliveries that end together.
        let gather = tokio::time::sleep(Duration::from_millis(10));
        tokio::pin!(gather);
        let mut closed = false;
        while batch.len() < BATCH {
            tokio::select! {
                outcome = rx.recv() => match outcome {
                    Some(o) => batch.push(o),
                    None => { closed = true; break; }
                },
                _ = &mut gather => break,
            }
        }
        match app.store.complete_events(&node, &batch).await {
            Ok(()) => {
                batch.clear();
                app.wake_webhooks();
            }
            Err(e) => {
                // Kept and written again; meanwhile the leases keep the events from being
                // sent twice, and if this lasts past them, they go out again (at least once).
                tracing::warn!(error = %e, outcomes = batch.len(), "cannot record webhook outcomes; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        if closed && batch.is_empty() {
            return;
        }
    }
}

/// Keeps the queue gauges current, every few seconds until the app is gone.
pub async fn watch_queue(app: std::sync::Weak<App>) {
    let mut every = tokio::time::interval(Duration::from_secs(2));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(app) = app.upgrade() else { return };
        match app.store.queue_stats().await {
            Ok(stats) => {
                let m = &app.metrics.webhooks;
                m.queue_depth.set(stats.depth);
                let age = stats
                    .oldest_created_ms
                    .map_or(0, |created| (now_ms() - created).max(0) / 1000);
                m.oldest_age.set(age);
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the webhook queue's size"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_normalised() {
        assert_eq!(
            check_url("http://127.0.0.1:8000", false).unwrap(),
            "http://127.0.0.1:8000/"
        );
        assert_eq!(
            check_url("https://Example.COM/hook?x=1", false).unwrap(),
            "https://example.com/hook?x=1"
        );
        for bad in [
            "",
            "/relative",
            "ftp://example.com/",
            "https://user:pw@example.com/",
            "http://169.254.169.254/latest/meta-data",
            "http://[fe80::1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[::a9fe:a9fe]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[2002:a9fe:a9fe::1]/",
            "http://[fd00:ec2::254]/",
            "http://100.100.100.200/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://METADATA.google.internal./",
        ] {
            assert!(check_url(bad, false).is_err(), "{bad}");
        }
        assert!(check_url("http://169.254.169.254/", true).is_ok());
        for fine in [
            "http://[::1]:8000/",
            "http://[2001:db8::1]/",
            "http://10.0.0.1/",
        ] {
            assert!(check_url(fine, false).is_ok(), "{fine}");
        }
        assert!(check_url(&format!("https://e.com/{}", "a".repeat(MAX_URL_LEN)), false).is_err());
    }

    #[test]
    fn the_signature_is_hmac_sha1_of_the_url_and_the_sorted_parameters() {
        // The example of the hosted service's webhook security guide.
        let params: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675310"),
            ("Digits", "1234"),
            ("From", "+14158675310"),
            ("To", "+18005551212"),
        ]
        .iter()
        .rev()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            signature(
                "12345",
                "https://mycompany.com/myapp.php?foo=1&bar=2",
                &params
            ),
            "GvWf1cFY/Q7PnoempGyD5oXAezc="
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let policy = Policy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
            max_attempts: 5,
            max_age: Duration::from_secs(60),
        };
        let mut rng = rand::rng();
        for _ in 0..100 {
            let d = policy.backoff(1, &mut rng);
            assert!(
                d >= Duration::from_millis(500) && d <= Duration::from_secs(1),
                "{d:?}"
            );
            let d = policy.backoff(3, &mut rng);
            assert!(
                d >= Duration::from_secs(2) && d <= Duration::from_secs(4),
                "{d:?}"
            );
            let d = policy.backoff(30, &mut rng);
            assert!(
                d >= Duration::from_secs(5) && d <= Duration::from_secs(10),
                "{d:?}"
            );
        }
        // Out of attempts, or past the age, or a Retry-After beyond the age: give up.
        assert_eq!(policy.next_attempt(5, 0, 1_000, None, &mut rng), None);
        assert!(policy.next_attempt(4, 0, 1_000, None, &mut rng).is_some());
        assert_eq!(policy.next_attempt(1, 0, 59_900, None, &mut rng), None);
        let at = policy
            .next_attempt(1, 0, 0, Some(Duration::from_secs(30)), &mut rng)
            .unwrap();
        assert_eq!(at, 30_000, "Retry-After is a floor");
        assert_eq!(
            policy.next_attempt(1, 0, 0, Some(Duration::from_secs(61)), &mut rng),
            None
        );
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        assert_eq!(retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let d = retry_after(&later).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(retry_after("soon"), None);
    }
}
