//! A socket's first moments: admission (the connection cap), `hello` (its token and service)
//! and the session's start (the connection attached in the engine, `welcome` queued).
//!
//! Every way this stage can fail is a [`HelloError`], which knows its error frame, close code,
//! close reason and metric; [`refuse`] is the one place that sends it. Before the session
//! starts the task writes to the socket directly; the session then writes through its outbox.

use std::net::IpAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use reach_core::{Attach, SlotFrame};
use reach_proto::{ClientFrame, CloseCode, Encoding, ErrorCode, ServerFrame, SidKind};
use reach_store::{Service, StoreError};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::connection::Session;
use super::socket::{
    End, Gone, Read, Refusal, Socket, answer_close, classify, close_direct, error_frame, took,
};
use crate::admission::Slot;
use crate::auth::{TokenError, TokenGrant, verify_token};
use crate::state::{App, profile_of};
use crate::throttle::RetryAfter;

/// Why a socket did not get to its session.
#[derive(Debug, thiserror::Error)]
pub(super) enum HelloError {
    /// Past `limits.max_connections` (the upgrade itself succeeded).
    #[error("too many connections")]
    TooManyConnections,
    /// No `hello` within `presence.auth_timeout_ms`.
    #[error("no hello within auth_timeout")]
    Timeout,
    /// The gateway began draining before `hello`.
    #[error("draining")]
    Draining,
    /// The first message could not be read as a frame.
    #[error("{}", .0.message)]
    BadFrame(Refusal),
    /// The first frame was another request.
    #[error("the first frame must be hello")]
    NotHello { id: Option<i64> },
    /// The token, or its service, was refused.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The address passed `limits.auth_failures_per_minute`.
    #[error("too many failed authentications from this address; retry after {} s", .0.seconds())]
    TooManyAuthFailures(RetryAfter),
    /// A storage failure; the client may retry.
    #[error("internal error; retry later")]
    Internal,
    /// The client closed or went away; nothing is sent.
    #[error("{}", .0.label())]
    Gone(Gone),
}

impl HelloError {
    /// How the socket ends: closed by us with this code, or already gone.
    fn end(&self) -> End {
        End::Close(match self {
            HelloError::TooManyConnections | HelloError::TooManyAuthFailures(_) => {
                CloseCode::RateLimited
            }
            HelloError::Timeout | HelloError::Token(_) => CloseCode::Unauthorized,
            HelloError::Draining => CloseCode::GoingAway,
            HelloError::BadFrame(r) => r.close,
            HelloError::NotHello { .. } => CloseCode::ProtocolError,
            HelloError::Internal => CloseCode::InternalError,
            HelloError::Gone(gone) => return End::Gone(*gone),
        })
    }

    /// The `error` frame sent before the close, if any.
    fn frame(&self) -> Option<ServerFrame> {
        let (id, code) = match self {
            HelloError::TooManyConnections | HelloError::TooManyAuthFailures(_) => {
                (None, ErrorCode::TooMany)
            }
            HelloError::Timeout => (None, ErrorCode::Timeout),
            HelloError::BadFrame(r) => (None, r.code),
            HelloError::NotHello { id } => (*id, ErrorCode::UnexpectedFrame),
            HelloError::Token(e) => (None, e.code()),
            HelloError::Internal => (None, ErrorCode::Internal),
            HelloError::Draining | HelloError::Gone(_) => return None,
        };
        Some(error_frame(id, code, self.to_string()))
    }

    /// The close frame's reason.
    fn reason(&self) -> &'static str {
        match self {
            HelloError::TooManyConnections => "too many connections",
            HelloError::TooManyAuthFailures(_) => "too many failed authentications",
            HelloError::Timeout => "no hello",
            HelloError::Draining => "draining",
            HelloError::BadFrame(_) => "bad frame",
            HelloError::NotHello { .. } => "hello expected",
            HelloError::Token(_) => "unauthorized",
            HelloError::Internal => "internal error",
            HelloError::Gone(gone) => gone.label(),
        }
    }

    /// The label of `reach_auth_failures_total`, for refusals that count as one.
    fn auth_failure(&self) -> Option<&'static str> {
        match self {
            HelloError::Timeout => Some("auth_timeout"),
            HelloError::Token(e) => Some(e.label()),
            _ => None,
        }
    }
}

/// Sends `err`'s frame and close on the socket; returns how the socket ended.
async fn refuse(app: &App, ws: &mut Socket, encoding: Encoding, err: HelloError) -> End {
    if let Some(label) = err.auth_failure() {
        app.metrics.auth_failures.with_label_values(&[label]).inc();
    }
    let end = err.end();
    if let End::Close(code) = end {
        close_direct(ws, encoding, err.frame(), code, err.reason()).await;
    }
    end
}

/// Admission, `hello` and the session's start; on failure the socket is closed here and the
/// end is returned. `pending` (the connection's place among the not-yet-authenticated ones) is
/// given back once the session has started, or with the socket. `permit` (the place under
/// `limits.max_connections`; `None`: refused) goes into the session, or is held until the
/// refused socket is closed.
pub(super) async fn prepare(
    app: &Arc<App>,
    ws: &mut Socket,
    encoding: Encoding,
    permit: Option<OwnedSemaphorePermit>,
    pending: Option<Slot>,
    peer: IpAddr,
) -> Result<Box<Session>, End> {
    let admitted = permit.is_some();
    let started = async {
        if !admitted {
            return Err(HelloError::TooManyConnections);
        }
        let (grant, service) = await_hello(app, ws, encoding, peer).await?;
        // Boxed, so the task does not keep both this result and the session.
        start(app, grant, service, encoding).await.map(Box::new)
    };
    let started = started.await;
    drop(pending);
    match started {
        Ok(mut session) => {
            session.permit = permit;
            session.w.lendable = super::socket::lend(ws, &session.conn, &app.config.limits);
            Ok(session)
        }
        Err(err) => {
            // The permit is held until the socket is closed.
            let end = refuse(app, ws, encoding, err).await;
            if end == End::Gone(Gone::Closed) {
                answer_close(ws).await;
            }
            drop(permit);
            Err(end)
        }
    }
}

/// Waits for `hello`, then verifies its token and service.
async fn await_hello(
    app: &Arc<App>,
    ws: &mut Socket,
    encoding: Encoding,
    peer: IpAddr,
) -> Result<(TokenGrant, Arc<Service>), HelloError> {
    let deadline = Instant::now() + app.config.auth_timeout();
    loop {
        let read = tokio::select! {
            item = ws.next() => {
                took(ws, &item);
                classify(item, encoding, app.config.limits.max_frame_bytes)
            }
            _ = tokio::time::sleep_until(deadline) => return Err(HelloError::Timeout),
            _ = app.shutdown.cancelled() => return Err(HelloError::Draining),
        };
        app.metrics.frames_received.inc();
        return match read {
            Read::Nothing => continue,
            Read::Gone(gone) => Err(HelloError::Gone(gone)),
            Read::Fail(refusal) => Err(HelloError::BadFrame(refusal)),
            Read::Frame(ClientFrame::Hello { token, .. }) => {
                // A blocked address is not even checked (a right guess must not answer
                // differently); an unproven token counts against it.
                let throttles = &app.throttles;
                throttles
                    .auth_allowed(peer)
                    .map_err(HelloError::TooManyAuthFailures)?;
                authenticate(app, &token).await.map_err(|e| match e {
                    HelloError::Token(t) if t.is_unproven() => match throttles.auth_failed(peer) {
                        Ok(()) => HelloError::Token(t),
                        Err(retry) => HelloError::TooManyAuthFailures(retry),
                    },
                    other => other,
                })
            }
            Read::Frame(other) => Err(HelloError::NotHello { id: other.id() }),
        };
    }
}

/// The token's grant and its service, which must exist and belong to the token's account.
async fn authenticate(app: &App, token: &str) -> Result<(TokenGrant, Arc<Service>), HelloError> {
    let grant = verify_token(&app.creds, token, reach_proto::now_unix())?;
    match app.find_service(&grant.service_sid).await {
        Ok(service) if grant.account_sid == service.account_sid => Ok((grant, service)),
        Ok(_) => Err(TokenError::WrongAccount.into()),
        Err(StoreError::NotFound) => Err(TokenError::UnknownService.into()),
        Err(e) => {
            tracing::warn!(
                error = %e,
                service = %grant.service_sid,
                identity = %grant.identity,
                "store failure during hello"
            );
            Err(HelloError::Internal)
        }
    }
}

/// The user's profile from the store, creating the user on its first `hello` (which records
/// `onUserAdded` for the service's webhook: the deliverer is woken).
async fn load_user(
    app: &App,
    service: &Service,
    identity: &str,
) -> Result<reach_core::Profile, HelloError> {
    match app.store.get_or_create_user(service, identity).await {
        Ok(rec) if rec.identity == identity => {
            if rec.date_created >= reach_proto::now_unix() - 1 {
                app.wake_webhooks();
            }
            Ok(profile_of(&rec))
        }
        other => {
            if let Err(e) = other {
                tracing::warn!(
                    error = %e,
                    service = %service.sid,
                    identity = %identity,
                    "cannot load the user at hello"
                );
            }
            Err(HelloError::Internal)
        }
    }
}

/// Registers the connection in the engine and queues `welcome`.
async fn start(
    app: &Arc<App>,
    grant: TokenGrant,
    service: Arc<Service>,
    encoding: Encoding,
) -> Result<Session, HelloError> {
    let started = std::time::Instant::now();
    let engine = &app.engine;
    let conn = engine.new_conn(&service.sid, &grant.identity, encoding);
    let connection_id = SidKind::Connection.generate();
    tracing::Span::current().record("conn", connection_id.as_str());
    tracing::debug!(
        identity = %grant.identity,
        service = %service.sid,
        "authenticated"
    );
    // A user not in memory is read (or created, on its first hello) before it is attached, so
    // the store has it before its presence is reported and recorded.
    let profile = if engine.has_profile(&service.sid, &grant.identity) {
        None
    } else {
        Some(load_user(app, &service, &grant.identity).await?)
    };
    {
        let slot = conn.outbox.reserve_guarded(SlotFrame::Welcome {
            connection_id,
            identity: grant.identity.clone(),
            service_sid: service.sid.to_string(),
            reachability_enabled: engine.service(&service.sid).enabled,
            heartbeat_interval_ms: app.config.presence.heartbeat_interval_ms,
            token_expires_at: grant.expires_at,
            user: None,
        });
        // The connection is not registered yet (`attach` does that), so no drain or delete
        // can have closed its outbox.
        let Some(slot) = slot else {
            return Err(HelloError::Internal);
        };
        let fill = engine.attach_with(&conn, slot.id(), profile);
        if fill == Attach::NeedsProfile {
            // The profile left memory between the check and the attach: read it again.
            match load_user(app, &service, &grant.identity).await {
                Ok(profile) => {
                    engine.load_profile(&service.sid, &grant.identity, profile);
                    engine.fill(&conn, &grant.identity, slot.id());
                }
                Err(e) => {
                    engine.detach(&conn, &[], false);
                    return Err(e);
                }
            }
        }
        // `slot` is dropped here: the welcome is sealed.
    }
    if let Some(cluster) = &app.cluster {
        // The welcome goes out once the other nodes can see this connection's hold: a `bye`
        // of the same user at another node, sent after this welcome, then never reads as the
        // user's last hold.
        cluster.written(engine.cluster_events_sent()).await;
    }
    app.metrics
        .hello_duration
        .observe(started.elapsed().as_secs_f64());
    let session = Session::new(app, conn, service, grant);
    if app.shutdown.is_cancelled() {
        // The drain's sweep over the engine's connections may have run before this one
        // attached; it is told here instead (a second goodbye is dropped by the outbox).
        crate::drain::goodbye(app, &session.conn);
    }
    Ok(session)
}
