//! The gateway's Prometheus metrics, in a registry owned by the app (not a global). Labels are
//! low-cardinality: a close reason, an auth failure reason, a route template, a status.
//!
//! Besides its own, the registry holds the process collector (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds` against `process_max_fds`,
//! `process_start_time_seconds`, ...) and `reach_build_info{version,commit}`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use reach_core::EngineMetrics;

use crate::webhooks::WebhookMetrics;

#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub engine: EngineMetrics,
    /// Open WebSockets (upgraded, authenticated or not).
    pub connections: IntGauge,
    pub connections_opened: IntCounter,
    /// WebSocket upgrades answered, by path: `direct` (read off a plain connection by the
    /// gateway itself) or `http` (through the HTTP server: TLS, or a request the direct path
    /// leaves to it).
    pub upgrades: IntCounterVec,
    /// Closed connections by reason (close code label).
    pub connections_closed: IntCounterVec,
    /// Frames written to sockets (all types).
    pub frames_sent: IntCounter,
    /// Frames read from sockets.
    pub frames_received: IntCounter,
    pub heartbeat_timeouts: IntCounter,
    /// Quiet sockets parked: their WebSocket stream taken apart to give its buffers back.
    pub streams_parked: IntCounter,
    /// Sockets parked now.
    pub sockets_parked: IntGauge,
    /// Refused hellos and token updates by reason.
    pub auth_failures: IntCounterVec,
    /// REST requests by route template, method and status.
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    /// Time from a hello arriving to its welcome being queued.
    pub hello_duration: Histogram,
    /// Connections closed at accept, by reason (`pending_total`, `pending_per_address`).
    pub connections_refused: IntCounterVec,
    /// Connections that are not authenticated sockets yet.
    pub pending_connections: IntGauge,
    /// Failed accepts of the public listener (e.g. out of file descriptors).
    pub accept_errors: IntCounter,
    /// TLS handshakes that failed or timed out, by reason.
    pub tls_handshake_failures: IntCounterVec,
    /// Requests, authentications and frames refused by a rate limit, by reason.
    pub rate_limited: IntCounterVec,
    /// Webhook deliveries, the queue, the presence changes waiting for the store.
    pub webhooks: WebhookMetrics,
    /// 1 while ready for traffic (what `/readyz` says), set at each scrape.
    pub ready: IntGauge,
}

/// The `reason` of `reach_auth_failures_total` for refused REST credentials.
pub const AUTH_FAILURE_REST: &str = "rest_basic";

/// Label of `reach_ws_upgrades_total` for an upgrade the gateway read off a plain connection.
pub const UPGRADE_DIRECT: &str = "direct";
/// Label of `reach_ws_upgrades_total` for an upgrade through the HTTP server.
pub const UPGRADE_HTTP: &str = "http";

/// This build's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit this build was made from (`build.rs`), or `unknown`.
pub const COMMIT: &str = env!("REACH_COMMIT");

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let engine = EngineMetrics::register(&registry)?;
        let connections = IntGauge::new("reach_connections", "Open WebSocket connections")?;
        let connections_opened = IntCounter::new(
            "reach_connections_opened_total",
            "WebSocket connections accepted",
        )?;
        let upgrades = IntCounterVec::new(
            Opts::new(
                "reach_ws_upgrades_total",
                "WebSocket upgrades answered, by path (direct: read off a plain connection; http: through the HTTP server)",
            ),
            &["path"],
        )?;
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "reach_connections_closed_total",
                "WebSocket connections closed, by reason",
            ),
            &["reason"],
        )?;
        // Counted by the engine too (the fan-out writes to sockets lent to it): registered there.
        let frames_sent = engine.frames_sent.clone();
        let frames_received =
            IntCounter::new("reach_frames_received_total", "Frames read from sockets")?;
        let heartbeat_timeouts = IntCounter::new(
            "reach_heartbeat_timeouts_total",
            "Connections closed with 4008 after hearing nothing for heartbeat_timeout",
        )?;
        let streams_parked = IntCounter::new(
            "reach_ws_streams_parked_total",
            "Quiet sockets parked: their WebSocket stream taken apart (its buffers given back) until they have something to write or read",
        )?;
        let sockets_parked = IntGauge::new(
            "reach_ws_sockets_parked",
            "Sockets parked now: holding no WebSocket stream and no buffer",
        )?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "reach_auth_failures_total",
                "Refused access tokens and REST credentials, by reason",
            ),
            &["reason"],
        )?;
        let http_requests = IntCounterVec::new(
            Opts::new(
                "reach_http_requests_total",
                "REST requests by route, method and status",
            ),
            &["route", "method", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "reach_http_request_duration_seconds",
                "REST request latency",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["route", "method"],
        )?;
        let hello_duration = Histogram::with_opts(
            HistogramOpts::new(
                "reach_hello_duration_seconds",
                "Time from hello to welcome queued",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
        )?;
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "reach_connections_refused_total",
                "Connections closed at accept, by reason",
            ),
            &["reason"],
        )?;
        let pending_connections = IntGauge::new(
            "reach_pending_connections",
            "Connections that are not authenticated sockets yet (HTTP, sockets before welcome)",
        )?;
        let accept_errors = IntCounter::new(
            "reach_accept_errors_total",
            "Failed accepts of the public listener (e.g. out of file descriptors)",
        )?;
        let tls_handshake_failures = IntCounterVec::new(
            Opts::new(
                "reach_tls_handshake_failures_total",
                "TLS handshakes that failed or timed out, by reason",
            ),
            &["reason"],
        )?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "reach_rate_limited_total",
                "Requests, authentications and socket frames refused by a rate limit, by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(sockets_parked.clone()))?;
        registry.register(Box::new(pending_connections.clone()))?;
        registry.register(Box::new(accept_errors.clone()))?;
        registry.register(Box::new(connections_refused.clone()))?;
        registry.register(Box::new(tls_handshake_failures.clone()))?;
        for c in [
            &connections_opened,
            &frames_received,
            &heartbeat_timeouts,
            &streams_parked,
        ] {
            registry.register(Box::new(c.clone()))?;
        }
        for c in [
            &connections_closed,
            &auth_failures,
            &http_requests,
            &upgrades,
        ] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(hello_duration.clone()))?;
        let webhooks = WebhookMetrics::register(&registry)?;
        let ready = IntGauge::new(
            "reach_ready",
            "1 while ready for traffic (/readyz answers 200): not draining and, in a cluster, in sync with Redis",
        )?;
        registry.register(Box::new(ready.clone()))?;
        // Series an alert or a dashboard reads exist from the start, at 0, so that a rate of
        // them is 0 rather than no data until the first event.
        for code in reach_proto::CloseCode::ALL {
            connections_closed.with_label_values(&[code.label()]);
        }
        auth_failures.with_label_values(&[AUTH_FAILURE_REST]);
        for path in [UPGRADE_DIRECT, UPGRADE_HTTP] {
            upgrades.with_label_values(&[path]);
        }
        for refused in crate::admission::Refused::ALL {
            connections_refused.with_label_values(&[refused.label()]);
        }
        let build_info = IntGaugeVec::new(
            Opts::new(
                "reach_build_info",
                "Always 1; the labels name this build's version and commit",
            ),
            &["version", "commit"],
        )?;
        build_info.with_label_values(&[VERSION, COMMIT]).set(1);
        registry.register(Box::new(build_info))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Metrics {
            webhooks,
            ready,
            registry,
            engine,
            connections,
            connections_opened,
            upgrades,
            connections_closed,
            frames_sent,
            frames_received,
            heartbeat_timeouts,
            streams_parked,
            sockets_parked,
            auth_failures,
            http_requests,
            http_duration,
            hello_duration,
            connections_refused,
            pending_connections,
            accept_errors,
            tls_handshake_failures,
            rate_limited,
        })
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("Prometheus text is UTF-8")
    }
}
