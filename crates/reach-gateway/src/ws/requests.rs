//! The requests an authenticated connection answers: [`Session::handle`] dispatches a decoded
//! frame, `ping` and `bye` in place, the others to one function each (`subscribe`,
//! `unsubscribe`, `update_token`, `register_push`, `unregister_push`); a second `hello` is
//! refused. A new frame type is added here and in `reach-proto`.
//!
//! Replies go through the connection's outbox, in order with the pushes: a `subscribed` reply
//! is a reserved slot that the engine fills under each user's lock, so no update of a user can
//! overtake the state the reply carries. The slot is held by a guard that seals it on every
//! way out, so no early return can leave the writer waiting behind it.

use foldhash::HashSet;
use foldhash::HashSetExt;
use std::sync::Arc;

use reach_core::{Attach, SlotFrame};
use reach_proto::{BindingType, ClientFrame, CloseCode, ErrorCode, IdentityError, ServerFrame};
use reach_store::{Source, StoreError};

use super::connection::Session;
use super::socket::error_frame;
use crate::auth::{MAX_IDENTITY_LEN, TokenError, verify_token};
use crate::state::profile_of;
use crate::throttle::Limited;

/// Longest device address (push token) accepted.
const MAX_ADDRESS_LEN: usize = 1024;

impl Session {
    /// Answers a frame that needs nothing from the store (a ping, `bye`, an unsubscribe, a
    /// token update, a second `hello`) at once; returns the others, for [`Session::handle`].
    /// The session loop awaits the store's answers in a future of its own (on the heap while
    /// it runs), which these need not pay for.
    pub(super) fn handle_at_once(&mut self, frame: ClientFrame) -> Option<ClientFrame> {
        match frame {
            ClientFrame::Hello { .. } => {
                self.fail(
                    ErrorCode::UnexpectedFrame,
                    "hello was already received",
                    CloseCode::ProtocolError,
                );
            }
            ClientFrame::Ping { id } => self.push(&ServerFrame::Pong { id }),
            ClientFrame::Unsubscribe { id, identities } => self.unsubscribe(id, identities),
            ClientFrame::UpdateToken { id, token } => self.update_token(id, &token),
            ClientFrame::Bye => {
                self.bye = true;
                self.conn.outbox.close(CloseCode::Normal);
            }
            later @ (ClientFrame::Subscribe { .. }
            | ClientFrame::RegisterPush { .. }
            | ClientFrame::UnregisterPush { .. }) => return Some(later),
        }
        None
    }

    /// Answers one frame (those [`Session::handle_at_once`] answers without waiting too).
    pub(super) async fn handle(&mut self, frame: ClientFrame) {
        match frame {
            ClientFrame::Subscribe { id, identities } => self.subscribe(id, identities).await,
            ClientFrame::RegisterPush {
                id,
                binding_type,
                address,
            } => {
                self.register_push(id, &binding_type, &address).await;
            }
            ClientFrame::UnregisterPush {
                id,
                binding_type,
                address,
            } => {
                self.unregister_push(id, &binding_type, &address).await;
            }
            other => {
                let waits = self.handle_at_once(other);
                debug_assert!(waits.is_none());
            }
        }
    }

    /// Refuses a request naming more than `limits.max_identities_per_request` identities
    /// (`error` 20429 with its id); true when it was refused.
    fn too_many_identities(&self, id: i64, request: &str, identities: &[String]) -> bool {
        let max = self.app.config.limits.max_identities_per_request;
        if identities.len() <= max {
            return false;
        }
        self.app.throttles.count(Limited::RequestIdentities);
        self.push(&error_frame(
            Some(id),
            ErrorCode::TooMany,
            format!(
                "{request} names {} identities; at most {max} per request",
                identities.len()
            ),
        ));
        true
    }

    async fn subscribe(&mut self, id: i64, identities: Vec<String>) {
        if self.too_many_identities(id, "subscribe", &identities) {
            return;
        }
        let engine = Arc::clone(&self.app.engine);
        let conn = Arc::clone(&self.conn);
        let Some(slot) = conn.outbox.reserve_guarded(SlotFrame::Subscribed {
            id,
            users: Vec::with_capacity(identities.len()),
            errors: vec![],
        }) else {
            return;
        };
        let outbox = &conn.outbox;
        let limit = self.app.config.presence.max_subscriptions_per_connection;
        // The request's identities, each once (foldhash: a request names up to
        // `limits.max_identities_per_request` of them).
        let mut seen = HashSet::with_capacity(identities.len());
        let mut cold = Vec::new();
        let err = |identity: &str, code: ErrorCode, message: &str| IdentityError {
            identity: identity.to_owned(),
            code: code.as_u32(),
            message: message.to_owned(),
        };
        for identity in identities {
            if !seen.insert(identity.clone()) {
                continue;
            }
            if identity.is_empty() || identity.len() > MAX_IDENTITY_LEN {
                outbox.add_error(
                    slot.id(),
                    err(
                        &identity,
                        ErrorCode::InvalidParameter,
                        &format!("identity must be 1 to {MAX_IDENTITY_LEN} bytes"),
                    ),
                );
                continue;
            }
            let own = identity == conn.identity();
            if !own && !self.watched.contains(identity.as_str()) && self.watched.len() >= limit {
                outbox.add_error(
                    slot.id(),
                    err(
                        &identity,
                        ErrorCode::TooMany,
                        "max_subscriptions_per_connection reached",
                    ),
                );
                continue;
            }
            let (attach, key) = engine.subscribe(&conn, &identity, slot.id());
            if !own {
                self.watched.insert(key);
            }
            if attach == Attach::NeedsProfile {
                cold.push(identity);
            }
        }
        self.watched.shrink();
        if cold.is_empty() {
            return;
        }
        // One read for every user not in memory (a cluster's remote users, a user offline
        // and watched by nobody), not one per user, shared with the other sockets' reads
        // meanwhile.
        let found = match self
            .app
            .profiles
            .read(&self.service.sid, cold.clone())
            .await
        {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    service = %self.service.sid,
                    identity = %conn.identity(),
                    watched = cold.len(),
                    "store failure during subscribe"
                );
                for identity in &cold {
                    self.watched.remove(identity.as_str());
                    engine.unsubscribe(&conn, identity);
                    outbox.add_error(
                        slot.id(),
                        err(identity, ErrorCode::Internal, "internal error; retry later"),
                    );
                }
                return;
            }
        };
        let mut missing: HashSet<&str> = cold.iter().map(String::as_str).collect();
        for rec in &found {
            engine.load_profile(&self.service.sid, &rec.identity, profile_of(rec));
            engine.fill(&conn, &rec.identity, slot.id());
            missing.remove(rec.identity.as_str());
        }
        for identity in &cold {
            if !missing.contains(identity.as_str()) {
                continue;
            }
            self.watched.remove(identity.as_str());
            engine.unsubscribe(&conn, identity);
            let msg = format!("User {identity} not found in service {}", self.service.sid);
            outbox.add_error(slot.id(), err(identity, ErrorCode::NotFound, &msg));
        }
        // Dropping `slot` seals the reply.
    }

    fn unsubscribe(&mut self, id: i64, identities: Vec<String>) {
        if self.too_many_identities(id, "unsubscribe", &identities) {
            return;
        }
        for identity in identities {
            if self.watched.remove(identity.as_str()) {
                self.app.engine.unsubscribe(&self.conn, &identity);
            }
        }
        self.push(&ServerFrame::Unsubscribed { id });
    }

    fn update_token(&mut self, id: i64, token: &str) {
        let grant = verify_token(&self.app.creds, token, reach_proto::now_unix()).and_then(|g| {
            if g.identity == self.conn.identity()
                && g.service_sid == self.service.sid
                && g.account_sid == self.service.account_sid
            {
                Ok(g)
            } else {
                Err(TokenError::OtherPrincipal)
            }
        });
        match grant {
            Ok(grant) => {
                self.push_credential_sid = grant.push_credential_sid.map(String::into_boxed_str);
                self.token_expires_at = grant.expires_at;
                self.set_expiry();
                self.push(&ServerFrame::TokenUpdated {
                    id,
                    token_expires_at: self.token_expires_at,
                });
            }
            Err(e) => {
                self.app
                    .metrics
                    .auth_failures
                    .with_label_values(&[e.label()])
                    .inc();
                self.push(&error_frame(Some(id), e.code(), e.to_string()));
            }
        }
    }

    /// The binding type and address of a push (un)registration, or the error frame sent.
    fn check_binding(&self, id: i64, binding_type: &str, address: &str) -> Option<BindingType> {
        let Ok(binding_type) = binding_type.parse::<BindingType>() else {
            self.push(&error_frame(
                Some(id),
                ErrorCode::InvalidParameter,
                format!("binding_type must be one of {}", BindingType::NAMES),
            ));
            return None;
        };
        if address.is_empty() || address.len() > MAX_ADDRESS_LEN {
            self.push(&error_frame(
                Some(id),
                ErrorCode::InvalidParameter,
                format!("address must be 1 to {MAX_ADDRESS_LEN} bytes"),
            ));
            return None;
        }
        Some(binding_type)
    }

    /// Re-reads the own user after a binding change and lets the engine publish it.
    async fn refresh_own_profile(&self) {
        if let Ok(rec) = self
            .app
            .store
            .get_user(&self.service.sid, self.conn.identity())
            .await
            && rec.identity == self.conn.identity()
        {
            self.app.user_changed(&rec).await;
        }
    }

    /// A store failure of a push request: logged, and an error the client may retry.
    fn store_failure(&self, id: i64, what: &str, e: StoreError) {
        tracing::warn!(
            error = %e,
            service = %self.service.sid,
            identity = %self.conn.identity(),
            "store failure during {what}"
        );
        self.push(&error_frame(
            Some(id),
            ErrorCode::Internal,
            "internal error; retry later",
        ));
    }

    async fn register_push(&self, id: i64, binding_type: &str, address: &str) {
        let Some(binding_type) = self.check_binding(id, binding_type, address) else {
            return;
        };
        let credential = self.push_credential_sid.as_deref();
        match self
            .app
            .store
            .upsert_binding(
                &self.service,
                self.conn.identity(),
                binding_type.as_str(),
                address,
                credential,
            )
            .await
        {
            Ok(binding) => {
                self.app.events_recorded(Some(Source::Sdk));
                self.refresh_own_profile().await;
                self.push(&ServerFrame::PushRegistered {
                    id,
                    binding_sid: binding.sid,
                });
            }
            Err(StoreError::NotFound) => {
                self.push(&error_frame(
                    Some(id),
                    ErrorCode::NotFound,
                    "the user no longer exists",
                ));
            }
            Err(e) => self.store_failure(id, "register_push", e),
        }
    }

    async fn unregister_push(&self, id: i64, binding_type: &str, address: &str) {
        let Some(binding_type) = self.check_binding(id, binding_type, address) else {
            return;
        };
        match self
            .app
            .store
            .delete_binding_by_address(
                &self.service.sid,
                self.conn.identity(),
                binding_type.as_str(),
                address,
            )
            .await
        {
            Ok(_) => {
                self.app.events_recorded(Some(Source::Sdk));
                self.refresh_own_profile().await;
                self.push(&ServerFrame::PushUnregistered { id });
            }
            Err(StoreError::NotFound) => {
                self.push(&error_frame(
                    Some(id),
                    ErrorCode::NotFound,
                    "no such push registration",
                ));
            }
            Err(e) => self.store_failure(id, "unregister_push", e),
        }
    }
}
