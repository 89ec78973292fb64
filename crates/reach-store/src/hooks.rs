//! Webhooks in the store: each service's webhook configuration, the events recorded for it and
//! the queue they wait in until delivered.
//!
//! # Events
//!
//! An event is one row of `webhook_events`, recorded only when the service's webhook has a
//! `post_webhook_url` and listens to the event's filter ([`UserEvent::filter`]). Its parameters
//! are fixed when it is recorded ([`event_params`]): the user as it is after the change, with
//! `IsOnline`, `IsNotifiable` and `DateLastSeen` by the null rules of `reach_proto::flags`, so
//! a retry sends exactly what the first attempt sent. Its `token` (an `EV` SID) is the
//! `I-Twilio-Idempotency-Token` of every attempt.
//!
//! Writes record their events in their own transaction (REST writes with `X-Twilio-Webhook-
//! Enabled: true`, socket writes always): the write and its event commit together. Presence
//! changes come in batches ([`crate::Store::record_presence`]), each applied only if newer
//! (its version) than what the user has, and recorded as an event only when the user's
//! recorded presence flips: a change reported twice (a restart, a resynchronised cluster node)
//! is one event.
//!
//! # The queue
//!
//! Events leave in the order of `seq` per user: [`crate::Store::claim_events`] takes only the
//! oldest event of each user, and only while no live lease holds it, then leases it to the
//! claiming node for a while (`lease_until_ms`). The node delivers and reports the outcome
//! ([`Completion`]): delivered or dropped events are deleted, failed ones wait for their next
//! attempt. A node that dies holding leases holds them only until they expire; the events are
//! then claimed again, by any node (the same token, so the receiver can tell a repeat).
//!
//! Both backends share this logic and its SQL, which is written once with `$n` placeholders
//! (sqlx's SQLite driver reads them as PostgreSQL does) in [`shared_sql!`]; what differs is
//! passed in: the row lock PostgreSQL needs, SQLite's `BEGIN IMMEDIATE` serialising instead.

use reach_proto::flags::{ServiceState, is_notifiable_flag, is_online_flag, last_seen};
use reach_proto::{AccountSid, ServiceSid, UpdateReason};

use crate::rows::USER_COLS;
use crate::{ServiceConfig, UserRecord, iso8601};

/// What a webhook event says happened to a user: the hosted post-event user filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UserEvent {
    /// `onUserAdded`: the user was created (over REST, or by its first `hello`).
    Added,
    /// `onUserUpdated`: something subscribers see changed (friendly name, attributes,
    /// online, notifiable).
    Updated,
    /// `onUserRemoved`: the user was deleted.
    Removed,
}

impl UserEvent {
    /// The filter name, also the event's `EventType`.
    pub fn filter(self) -> &'static str {
        match self {
            UserEvent::Added => "onUserAdded",
            UserEvent::Updated => "onUserUpdated",
            UserEvent::Removed => "onUserRemoved",
        }
    }
}

/// Filter names a webhook may list: the hosted service's, which are stored and listed back;
/// only the three of [`UserEvent`] fire here.
pub const FILTERS: &[&str] = &[
    "onMessageAdded",
    "onMessageUpdated",
    "onMessageRemoved",
    "onMessageAdd",
    "onMessageUpdate",
    "onMessageRemove",
    "onConversationUpdated",
    "onConversationRemoved",
    "onConversationAdd",
    "onConversationAdded",
    "onConversationRemove",
    "onConversationUpdate",
    "onConversationStateUpdated",
    "onParticipantAdded",
    "onParticipantUpdated",
    "onParticipantRemoved",
    "onParticipantAdd",
    "onParticipantRemove",
    "onParticipantUpdate",
    "onDeliveryUpdated",
    "onUserAdded",
    "onUserUpdate",
    "onUserUpdated",
    "onUserRemoved",
];

/// Who made a change, as the event's `Source` parameter says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A client over its socket (`hello`, push registration, presence).
    Sdk,
    /// A REST call.
    Api,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Sdk => "SDK",
            Source::Api => "API",
        }
    }
}

/// The HTTP method of a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WebhookMethod {
    Get,
    #[default]
    Post,
}

impl WebhookMethod {
    pub fn name(self) -> &'static str {
        match self {
            WebhookMethod::Get => "GET",
            WebhookMethod::Post => "POST",
        }
    }

    /// `GET` or `POST`, in any case.
    pub fn parse(s: &str) -> Option<WebhookMethod> {
        if s.eq_ignore_ascii_case("GET") {
            Some(WebhookMethod::Get)
        } else if s.eq_ignore_ascii_case("POST") {
            Some(WebhookMethod::Post)
        } else {
            None
        }
    }
}

/// A service's webhook configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    pub service_sid: ServiceSid,
    /// Stored and listed; pre-event hooks are never called.
    pub pre_webhook_url: Option<String>,
    /// Where events are sent.
    pub post_webhook_url: Option<String>,
    pub method: WebhookMethod,
    /// Filter names, as given (each one of [`FILTERS`]).
    pub filters: Vec<String>,
}

impl WebhookConfig {
    /// The configuration of a service that never set one.
    pub fn defaults(service_sid: ServiceSid) -> Self {
        WebhookConfig {
            service_sid,
            pre_webhook_url: None,
            post_webhook_url: None,
            method: WebhookMethod::Post,
            filters: Vec::new(),
        }
    }

    /// Whether `event` is sent: a post-event URL is set and the filter is listed.
    pub fn fires(&self, event: &str) -> bool {
        self.post_webhook_url.is_some() && self.filters.iter().any(|f| f == event)
    }

    /// Applies an update.
    pub fn apply(&mut self, update: &WebhookUpdate) {
        if let Some(url) = &update.pre_webhook_url {
            self.pre_webhook_url.clone_from(url);
        }
        if let Some(url) = &update.post_webhook_url {
            self.post_webhook_url.clone_from(url);
        }
        if let Some(method) = update.method {
            self.method = method;
        }
        if let Some(filters) = &update.filters {
            self.filters.clone_from(filters);
        }
    }
}

/// Fields of a webhook update; `None` leaves a field unchanged, `Some(None)` clears a URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookUpdate {
    pub pre_webhook_url: Option<Option<String>>,
    pub post_webhook_url: Option<Option<String>>,
    pub method: Option<WebhookMethod>,
    pub filters: Option<Vec<String>>,
}

/// Filters as one column: names joined by `,` (no name holds one).
pub(crate) fn join_filters(filters: &[String]) -> String {
    filters.join(",")
}

pub(crate) fn split_filters(column: &str) -> Vec<String> {
    column
        .split(',')
        .filter(|f| !f.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A change of a user's presence to record (see [`crate::Store::record_presence`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceRecord {
    pub service_sid: ServiceSid,
    pub identity: String,
    pub online: bool,
    /// When it changed, unix seconds (the last-seen time of an offline).
    pub at: i64,
    /// Newer changes have larger versions; an older one than the user's last is skipped.
    pub version: i64,
}

/// A user recorded online ([`crate::Store::online_users`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineUser {
    /// The keyset cursor of the list.
    pub seq: i64,
    pub service_sid: ServiceSid,
    pub identity: String,
    /// The version of its recorded online (a single node's: unix microseconds).
    pub version: i64,
}

/// Where a claimed event goes: the service's webhook as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub method: WebhookMethod,
    /// The service's account, whose auth token signs the request.
    pub account_sid: AccountSid,
}

/// An event taken for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedEvent {
    pub seq: i64,
    /// `I-Twilio-Idempotency-Token`: the same on every attempt.
    pub token: String,
    pub service_sid: ServiceSid,
    pub identity: String,
    pub event_type: String,
    /// The parameters, in the order they were recorded.
    pub params: Vec<(String, String)>,
    /// When it was recorded, unix milliseconds.
    pub created_ms: i64,
    /// Attempts so far, this one included.
    pub attempts: i64,
    /// `None` when the service no longer has a post-event URL, or no longer listens to this
    /// event: the event is dropped.
    pub target: Option<Target>,
}

impl ClaimedEvent {
    /// What identifies this claim of the event (see [`Claim`]).
    pub fn claim(&self) -> Claim {
        Claim {
            seq: self.seq,
            attempts: self.attempts,
        }
    }
}

/// One claim of an event: its `seq` and the attempt it is. An outcome applies only to the
/// claim it answers: were the lease to run out and the event be claimed again (by another node,
/// or by the same one), a late outcome of the earlier claim changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub seq: i64,
    pub attempts: i64,
}

/// What became of a claimed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// The receiver took it (2xx): deleted.
    Delivered,
    /// Given up, or nowhere to send it: deleted.
    Dropped,
    /// Failed; tried again at `at_ms` (unix milliseconds).
    Retry { at_ms: i64, error: String },
}

/// The queue as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Events waiting (leased ones included).
    pub depth: i64,
    /// When the oldest waiting event was recorded, unix milliseconds.
    pub oldest_created_ms: Option<i64>,
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A service's switch from its configuration row.
pub(crate) fn switch(cfg: &ServiceConfig) -> ServiceState {
    ServiceState {
        enabled: cfg.reachability_enabled,
        epoch: cfg.reachability_epoch,
    }
}

/// `true`, `false`, or empty for null.
fn flag(value: Option<bool>) -> String {
    value.map_or_else(String::new, |v| v.to_string())
}

/// The parameters of a user event (webhooks.md lists them): the user as `user` has it, with its
/// flags by the null rules at `now` (unix seconds). `UpdateReasons` only for `onUserUpdated`.
pub fn event_params(
    event: UserEvent,
    source: Source,
    user: &UserRecord,
    cfg: &ServiceConfig,
    reasons: &[UpdateReason],
    now: i64,
) -> Vec<(String, String)> {
    let svc = switch(cfg);
    let is_online = is_online_flag(svc, user.presence_online, user.online_epoch);
    let is_notifiable = is_notifiable_flag(svc, user.ever_had_binding, user.binding_count);
    let mut params = vec![
        ("EventType", event.filter().to_owned()),
        ("AccountSid", user.account_sid.to_string()),
        ("ChatServiceSid", user.service_sid.to_string()),
        ("Source", source.name().to_owned()),
        ("UserSid", user.sid.clone()),
        ("Identity", user.identity.clone()),
        (
            "FriendlyName",
            user.friendly_name.clone().unwrap_or_default(),
        ),
        ("Attributes", user.attributes.clone()),
        ("RoleSid", user.role_sid.clone().unwrap_or_default()),
        ("IsOnline", flag(is_online)),
        ("IsNotifiable", flag(is_notifiable)),
        ("DateCreated", iso8601(user.date_created)),
        ("DateUpdated", iso8601(user.date_updated)),
        (
            "DateLastSeen",
            last_seen(is_online, user.last_seen_at, now).map_or_else(String::new, iso8601),
        ),
    ];
    if event == UserEvent::Updated {
        let names: Vec<&str> = reasons.iter().map(|r| r.name()).collect();
        params.push(("UpdateReasons", names.join(",")));
    }
    params
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
}

/// What subscribers see change between two versions of a user: the reasons of an
/// `onUserUpdated` (none: no event).
pub(crate) fn profile_reasons(
    before: &UserRecord,
    after: &UserRecord,
    cfg: &ServiceConfig,
) -> Vec<UpdateReason> {
    let svc = switch(cfg);
    let mut reasons = Vec::new();
    if before.friendly_name != after.friendly_name {
        reasons.push(UpdateReason::FriendlyName);
    }
    if before.attributes != after.attributes {
        reasons.push(UpdateReason::Attributes);
    }
    if is_notifiable_flag(svc, before.ever_had_binding, before.binding_count)
        != is_notifiable_flag(svc, after.ever_had_binding, after.binding_count)
    {
        reasons.push(UpdateReason::ReachabilityNotifiable);
    }
    reasons
}

/// Parameters as stored: a JSON array of `[name, value]` pairs.
pub(crate) fn encode_params(params: &[(String, String)]) -> String {
    serde_json::to_string(params).unwrap_or_else(|_| "[]".to_owned())
}

pub(crate) fn decode_params(text: &str) -> Vec<(String, String)> {
    serde_json::from_str(text).unwrap_or_default()
}

/// The users of a presence batch, `n` keys bound as `$1, $2` (service, identity) and so on,
/// with the backend's row lock: their whole records when `whole` (an event may be recorded
/// about them), else only what a presence change reads and writes. A join with the keys, not
/// `(service_sid, identity) IN (VALUES ...)`: SQLite scans the whole table for that one, and
/// looks each key up for this one.
pub(crate) fn presence_select_sql(n: usize, whole: bool, lock: &str) -> String {
    let pairs: Vec<String> = (0..n)
        .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
        .collect();
    let cols = if whole {
        USER_COLS
    } else {
        "u.sid, u.service_sid, u.identity, u.online_epoch, u.presence_online, u.last_seen_at"
    };
    format!(
        "WITH k (service_sid, identity) AS (VALUES {}) \
         SELECT {cols}, u.presence_version FROM k JOIN users u \
         ON u.service_sid = k.service_sid AND u.identity = k.identity {lock}",
        pairs.join(", "),
    )
}

/// A user of a presence batch as read (see `record_presence_batch`): its presence columns,
/// changed in memory as the batch's changes apply, and its whole record when the batch may
/// record an event about it.
pub(crate) struct Presence {
    pub(crate) sid: String,
    pub(crate) version: i64,
    pub(crate) online: bool,
    pub(crate) last_seen_at: Option<i64>,
    pub(crate) online_epoch: i64,
    pub(crate) record: Option<UserRecord>,
    /// Changed by the batch: written back.
    pub(crate) dirty: bool,
}

/// The users of one service with `n` identities, bound as `$1` (the service) and `$2`... (the
/// identities): a join with the keys, as [`presence_select_sql`].
pub(crate) fn identities_select_sql(n: usize) -> String {
    let keys: Vec<String> = (0..n).map(|i| format!("(${})", i + 2)).collect();
    format!(
        "WITH k (identity) AS (VALUES {}) SELECT {USER_COLS} FROM k JOIN users u \
         ON u.service_sid = $1 AND u.identity = k.identity",
        keys.join(", ")
    )
}

/// Splits a batch's keys (a presence batch's events, a subscribe's identities: where a key named
/// twice would count twice) into pieces of 64, 8 and 1, one statement each: a batch of any size
/// takes few statements, and only three texts per statement kind exist, so the prepared
/// statements the driver keeps per connection stay few and small. A presence batch's users
/// go in [`padded_pieces`].
pub(crate) fn presence_pieces<T>(mut items: &[T]) -> Vec<&[T]> {
    let mut pieces = Vec::new();
    for size in [64, 8, 1] {
        while items.len() >= size {
            let (piece, rest) = items.split_at(size);
            pieces.push(piece);
            items = rest;
        }
    }
    pieces
}

/// Splits a presence batch's users into pieces of 64, 16 and 4 for its read and its write
/// back, where a user named twice changes nothing: the last piece is filled up to 4 by naming
/// its last user again (the second number: how many more times). Fewer statements than
/// [`presence_pieces`] (each one a round trip to the driver's thread, and for a read one per
/// row: 100 users take 4 instead of 9), with as few texts.
pub(crate) fn padded_pieces<T>(mut items: &[T]) -> Vec<(&[T], usize)> {
    let mut pieces = Vec::new();
    for size in PIECE_SIZES.into_iter().rev() {
        while items.len() >= size {
            let (piece, rest) = items.split_at(size);
            pieces.push((piece, 0));
            items = rest;
        }
    }
    if !items.is_empty() {
        pieces.push((items, PIECE_SIZES[0] - items.len()));
    }
    pieces
}

/// The sizes of [`padded_pieces`], smallest first.
const PIECE_SIZES: [usize; 3] = [4, 16, 64];

/// The texts of one kind of statement over a piece of [`padded_pieces`], one per piece size,
/// each built on first use: a batch's statements are then not formatted again (for 64 users,
/// 64 small strings and their join) each time.
pub(crate) type PieceTexts = [std::sync::OnceLock<String>; PIECE_SIZES.len()];

/// An empty [`PieceTexts`], for a `static`.
pub(crate) const fn no_texts() -> PieceTexts {
    [const { std::sync::OnceLock::new() }; PIECE_SIZES.len()]
}

/// The text for a piece of `n` items from `texts`, built by `build` the first time; a size
/// [`padded_pieces`] never makes is built every time.
pub(crate) fn piece_text(
    texts: &'static PieceTexts,
    n: usize,
    build: impl FnOnce() -> String,
) -> std::borrow::Cow<'static, str> {
    match PIECE_SIZES.iter().position(|&size| size == n) {
        Some(i) => std::borrow::Cow::Borrowed(texts[i].get_or_init(build).as_str()),
        None => std::borrow::Cow::Owned(build()),
    }
}

/// A piece of [`padded_pieces`] as its items, the last one repeated as the padding asks.
pub(crate) fn padded<T>((piece, pad): (&[T], usize)) -> impl Iterator<Item = &T> {
    let last = piece.last();
    piece.iter().chain(std::iter::repeat_n(last, pad).flatten())
}

/// The SQL both backends share, for one sqlx database (see the module doc). `$lock` is what a
/// backend appends to a read that must hold the row until the transaction ends (PostgreSQL's
/// `FOR UPDATE`; empty for SQLite, whose write transactions take the whole database), and
/// `$skip` what lets concurrent claims pass each other's rows (`FOR UPDATE SKIP LOCKED`), and
/// `$update` how a presence batch's multi-row `UPDATE` starts (SQLite: `UPDATE OR FAIL`, which
/// needs no statement journal: no constraint of the columns it sets can fail, and a failed
/// batch's transaction is rolled back whole).
macro_rules! shared_sql {
    ($conn:ty, $lock:literal, $skip:literal, $update:literal) => {
        use reach_proto::{ServiceSid, SidKind, UpdateReason};
        use sqlx::Row;

        use crate::hooks::{
            ClaimedEvent, Completion, PresenceRecord, QueueStats,
            PieceTexts, Presence, Source, Target, UserEvent, identities_select_sql, padded,
            no_texts, padded_pieces, piece_text, presence_pieces, presence_select_sql,
            WebhookConfig, WebhookMethod, decode_params, encode_params, event_params,
            join_filters, now_ms, profile_reasons, split_filters,
        };
        use crate::rows::{config_row, db, user_row};
        use crate::{Result, ServiceConfig, StoreError, UserRecord, now_unix};

        /// The service's webhook, or the defaults.
        pub(crate) async fn webhook(
            conn: &mut $conn,
            service_sid: &ServiceSid,
        ) -> Result<WebhookConfig> {
            let row = sqlx::query(
                "SELECT pre_webhook_url, post_webhook_url, method, filters \
                 FROM service_webhooks WHERE service_sid = $1",
            )
            .bind(service_sid.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?;
            let mut cfg = WebhookConfig::defaults(service_sid.clone());
            if let Some(row) = row {
                cfg.pre_webhook_url = row.try_get("pre_webhook_url").map_err(db)?;
                cfg.post_webhook_url = row.try_get("post_webhook_url").map_err(db)?;
                let method: String = row.try_get("method").map_err(db)?;
                cfg.method = WebhookMethod::parse(&method).unwrap_or_default();
                let filters: String = row.try_get("filters").map_err(db)?;
                cfg.filters = split_filters(&filters);
            }
            Ok(cfg)
        }

        /// Writes the whole configuration.
        pub(crate) async fn put_webhook(conn: &mut $conn, cfg: &WebhookConfig) -> Result<()> {
            sqlx::query(
                "INSERT INTO service_webhooks (service_sid, pre_webhook_url, post_webhook_url, \
                 method, filters, date_updated) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (service_sid) DO UPDATE SET \
                 pre_webhook_url = excluded.pre_webhook_url, \
                 post_webhook_url = excluded.post_webhook_url, method = excluded.method, \
                 filters = excluded.filters, date_updated = excluded.date_updated",
            )
            .bind(cfg.service_sid.as_str())
            .bind(&cfg.pre_webhook_url)
            .bind(&cfg.post_webhook_url)
            .bind(cfg.method.name())
            .bind(join_filters(&cfg.filters))
            .bind(now_unix())
            .execute(&mut *conn)
            .await
            .map_err(db)?;
            Ok(())
        }

        /// The service's configuration row.
        async fn config(conn: &mut $conn, service_sid: &ServiceSid) -> Result<ServiceConfig> {
            let row = sqlx::query(
                "SELECT c.service_sid, c.reachability_enabled, c.reachability_epoch, \
                 c.default_conversation_creator_role_sid, c.default_conversation_role_sid, \
                 c.default_chat_service_role_sid FROM service_configs c WHERE c.service_sid = $1",
            )
            .bind(service_sid.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?
            .ok_or(StoreError::NotFound)?;
            config_row(&row).map_err(db)
        }

        /// The service's configuration, `None` when the service is gone.
        async fn config_if_any(
            conn: &mut $conn,
            service_sid: &ServiceSid,
        ) -> Result<Option<ServiceConfig>> {
            match config(conn, service_sid).await {
                Ok(cfg) => Ok(Some(cfg)),
                Err(StoreError::NotFound) => Ok(None),
                Err(e) => Err(e),
            }
        }

        /// Records `event` about `user` if the service's webhook listens to it.
        pub(crate) async fn record_event(
            conn: &mut $conn,
            event: UserEvent,
            source: Source,
            user: &UserRecord,
            cfg: &ServiceConfig,
            reasons: &[UpdateReason],
        ) -> Result<()> {
            let hook = webhook(&mut *conn, &user.service_sid).await?;
            if !hook.fires(event.filter()) {
                return Ok(());
            }
            let params = event_params(event, source, user, cfg, reasons, now_unix());
            let now = now_ms();
            sqlx::query(
                "INSERT INTO webhook_events (token, service_sid, identity, event_type, params, \
                 created_ms, next_attempt_ms) VALUES ($1, $2, $3, $4, $5, $6, $6)",
            )
            .bind(SidKind::Event.generate())
            .bind(user.service_sid.as_str())
            .bind(&user.identity)
            .bind(event.filter())
            .bind(encode_params(&params))
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
            Ok(())
        }

        /// `onUserAdded` or `onUserRemoved` of `user`, if `fire`.
        pub(crate) async fn notify(
            conn: &mut $conn,
            event: UserEvent,
            fire: Option<Source>,
            user: &UserRecord,
        ) -> Result<()> {
            let Some(source) = fire else {
                return Ok(());
            };
            let cfg = config(&mut *conn, &user.service_sid).await?;
            record_event(conn, event, source, user, &cfg, &[]).await
        }

        /// `onUserUpdated` for what subscribers see change from `before` to `after`, if
        /// `fire` and anything did.
        pub(crate) async fn notify_update(
            conn: &mut $conn,
            fire: Option<Source>,
            before: &UserRecord,
            after: &UserRecord,
        ) -> Result<()> {
            let Some(source) = fire else {
                return Ok(());
            };
            let cfg = config(&mut *conn, &after.service_sid).await?;
            let reasons = profile_reasons(before, after, &cfg);
            if reasons.is_empty() {
                return Ok(());
            }
            record_event(conn, UserEvent::Updated, source, after, &cfg, &reasons).await
        }

        /// Applies a batch of presence changes (see `Store::record_presence`) in a few
        /// statements whatever its size: the batch's users are read in one query per
        /// piece of them ([`padded_pieces`]), each user's changes are applied in order in
        /// memory (a change no newer than the user's last is skipped), and the users that
        /// changed are written back with one `UPDATE` per piece, the `onUserUpdated` events
        /// with one `INSERT` per piece. Each service's configuration and webhook are read once.
        pub(crate) async fn record_presence_batch(
            conn: &mut $conn,
            changes: &[PresenceRecord],
        ) -> Result<()> {
            // The batch's users, each once, in the batch's order of first appearance.
            let mut order: Vec<(&str, &str)> = Vec::new();
            {
                let mut seen = std::collections::HashSet::new();
                for c in changes {
                    let key = (c.service_sid.as_str(), c.identity.as_str());
                    if seen.insert(key) {
                        order.push(key);
                    }
                }
            }
            // Each service's configuration, and whether a flip records `onUserUpdated` (reachability
            // on and the webhook listening), read once per batch. A service that is gone has no
            // users left to change. They are read before the users' rows are locked
            // (PostgreSQL), as they are not locked either: a reachability or webhook change
            // committed while a batch runs may or may not apply to its changes, which were made
            // before the batch began.
            let event = UserEvent::Updated;
            let mut services: std::collections::HashMap<&str, (ServiceConfig, bool)> =
                std::collections::HashMap::new();
            for c in changes {
                let sid = c.service_sid.as_str();
                if services.contains_key(sid) {
                    continue;
                }
                let Some(cfg) = config_if_any(&mut *conn, &c.service_sid).await? else {
                    continue;
                };
                let fires = cfg.reachability_enabled
                    && webhook(&mut *conn, &c.service_sid)
                        .await?
                        .fires(event.filter());
                services.insert(sid, (cfg, fires));
            }
            // Whole records only when an event may be recorded (its parameters describe the
            // user); otherwise the presence columns are all the batch needs.
            let whole = services.values().any(|(_, fires)| *fires);
            let mut users: std::collections::HashMap<(&str, &str), Presence> =
                std::collections::HashMap::new();
            // This backend's batch statements, by piece size (whole or narrow rows for reads).
            static READS: [PieceTexts; 2] = [no_texts(), no_texts()];
            static WRITES: PieceTexts = no_texts();
            for piece in padded_pieces(&order) {
                let chunk = piece.0;
                let n = chunk.len() + piece.1;
                let sql = piece_text(&READS[usize::from(whole)], n, || {
                    presence_select_sql(n, whole, $lock)
                });
                let mut query = sqlx::query(&sql);
                for (service, identity) in padded(piece) {
                    query = query.bind(*service).bind(*identity);
                }
                let rows = query.fetch_all(&mut *conn).await.map_err(db)?;
                for row in &rows {
                    let service: &str = row.try_get("service_sid").map_err(db)?;
                    let identity: &str = row.try_get("identity").map_err(db)?;
                    // Borrow the key from the batch, not the row.
                    let Some(key) = chunk.iter().find(|(s, i)| *s == service && *i == identity)
                    else {
                        continue;
                    };
                    let presence = Presence {
                        sid: row.try_get("sid").map_err(db)?,
                        version: row.try_get("presence_version").map_err(db)?,
                        online: row.try_get("presence_online").map_err(db)?,
                        last_seen_at: row.try_get("last_seen_at").map_err(db)?,
                        online_epoch: row.try_get("online_epoch").map_err(db)?,
                        record: if whole {
                            Some(user_row(row).map_err(db)?.1)
                        } else {
                            None
                        },
                        dirty: false,
                    };
                    users.insert(*key, presence);
                }
            }
            let mut events: Vec<(String, String, &'static str, String)> = Vec::new();
            for change in changes {
                let key = (change.service_sid.as_str(), change.identity.as_str());
                // Users that do not exist (any more) are skipped.
                let Some(user) = users.get_mut(&key) else {
                    continue;
                };
                if change.version <= user.version {
                    continue;
                }
                let Some((cfg, fires)) = services.get(change.service_sid.as_str()) else {
                    // A user of a service without a configuration (each is created with its
                    // service): the batch fails, as reading the configuration would.
                    return Err(StoreError::NotFound);
                };
                let flipped = user.online != change.online;
                user.online = change.online;
                if flipped && !change.online {
                    user.last_seen_at = Some(change.at);
                }
                if change.online && cfg.reachability_enabled {
                    user.online_epoch = user.online_epoch.max(cfg.reachability_epoch);
                }
                user.version = change.version;
                user.dirty = true;
                if flipped
                    && *fires
                    && let Some(record) = user.record.as_mut()
                {
                    record.presence_online = user.online;
                    record.last_seen_at = user.last_seen_at;
                    record.online_epoch = user.online_epoch;
                    let params = event_params(
                        event,
                        Source::Sdk,
                        record,
                        cfg,
                        &[UpdateReason::ReachabilityOnline],
                        now_unix(),
                    );
                    events.push((
                        record.service_sid.to_string(),
                        record.identity.clone(),
                        event.filter(),
                        encode_params(&params),
                    ));
                }
            }
            let changed: Vec<&Presence> = order
                .iter()
                .filter_map(|key| users.get(key))
                .filter(|user| user.dirty)
                .collect();
            for piece in padded_pieces(&changed) {
                let n = piece.0.len() + piece.1;
                let sql = piece_text(&WRITES, n, || {
                    let rows: Vec<String> = (0..n)
                        .map(|i| {
                            let n = 5 * i;
                            format!("(${}, ${}, ${}, ${}, ${})", n + 1, n + 2, n + 3, n + 4, n + 5)
                        })
                        .collect();
                    format!(
                        "WITH v (sid, version, online, seen, epoch) AS (VALUES {}) \
                         {} users SET presence_version = v.version, presence_online = v.online, \
                         last_seen_at = v.seen, online_epoch = v.epoch FROM v WHERE users.sid = v.sid",
                        rows.join(", "),
                        $update
                    )
                });
                let mut query = sqlx::query(&sql);
                for user in padded(piece) {
                    query = query
                        .bind(&user.sid)
                        .bind(user.version)
                        .bind(user.online)
                        .bind(user.last_seen_at)
                        .bind(user.online_epoch);
                }
                query.execute(&mut *conn).await.map_err(db)?;
            }
            let now = now_ms();
            for chunk in presence_pieces(&events) {
                let rows: Vec<String> = (0..chunk.len())
                    .map(|i| {
                        let n = 6 * i;
                        format!(
                            "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                            n + 1,
                            n + 2,
                            n + 3,
                            n + 4,
                            n + 5,
                            n + 6,
                            n + 6
                        )
                    })
                    .collect();
                let sql = format!(
                    "INSERT INTO webhook_events (token, service_sid, identity, event_type, \
                     params, created_ms, next_attempt_ms) VALUES {}",
                    rows.join(", ")
                );
                let mut query = sqlx::query(&sql);
                for (service, identity, filter, params) in chunk {
                    query = query
                        .bind(SidKind::Event.generate())
                        .bind(service)
                        .bind(identity)
                        .bind(*filter)
                        .bind(params)
                        .bind(now);
                }
                query.execute(&mut *conn).await.map_err(db)?;
            }
            Ok(())
        }

        /// The users of `service_sid` among `identities` (distinct; missing ones are left
        /// out, the order is the database's): one query per piece of 64, 8 or 1 identities,
        /// each a join with the keys, like a presence batch's read.
        pub(crate) async fn users_by_identity(
            conn: &mut $conn,
            service_sid: &ServiceSid,
            identities: &[String],
        ) -> Result<Vec<UserRecord>> {
            let mut users = Vec::with_capacity(identities.len());
            for chunk in presence_pieces(identities) {
                let sql = identities_select_sql(chunk.len());
                let mut query = sqlx::query(&sql).bind(service_sid.as_str());
                for identity in chunk {
                    query = query.bind(identity.as_str());
                }
                for row in query.fetch_all(&mut *conn).await.map_err(db)? {
                    users.push(user_row(&row).map_err(db)?.1);
                }
            }
            Ok(users)
        }

        pub(crate) async fn online_users(
            conn: &mut $conn,
            after: i64,
            limit: i64,
        ) -> Result<Vec<crate::hooks::OnlineUser>> {
            // `= TRUE` as the partial index `users_online` says it, so the index is used.
            let rows = sqlx::query(
                "SELECT seq, service_sid, identity, presence_version FROM users \
                 WHERE presence_online = TRUE AND seq > $1 ORDER BY seq LIMIT $2",
            )
            .bind(after)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
            rows.iter()
                .map(|row| {
                    let service: String = row.try_get("service_sid")?;
                    let service = ServiceSid::parse(&service).map_err(|e| {
                        sqlx::Error::ColumnDecode {
                            index: "service_sid".into(),
                            source: Box::new(e),
                        }
                    })?;
                    Ok(crate::hooks::OnlineUser {
                        seq: row.try_get("seq")?,
                        service_sid: service,
                        identity: row.try_get("identity")?,
                        version: row.try_get("presence_version")?,
                    })
                })
                .collect::<sqlx::Result<_>>()
                .map_err(db)
        }

        pub(crate) async fn max_presence_version(conn: &mut $conn) -> Result<i64> {
            sqlx::query_scalar("SELECT COALESCE(MAX(presence_version), 0) FROM users")
                .fetch_one(&mut *conn)
                .await
                .map_err(db)
        }

        /// Whether any event may be claimable at `now_ms`: a plain read, so a node that looks
        /// often (each wake-up) takes no write lock when there is nothing to send.
        pub(crate) async fn any_due(conn: &mut $conn, now_ms: i64) -> Result<bool> {
            let due: Option<i64> = sqlx::query_scalar(
                "SELECT seq FROM webhook_events \
                 WHERE next_attempt_ms <= $1 AND lease_until_ms <= $1 LIMIT 1",
            )
            .bind(now_ms)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?;
            Ok(due.is_some())
        }

        /// Claims (see `Store::claim_events`), without the targets.
        pub(crate) async fn claim(
            conn: &mut $conn,
            node: &str,
            now_ms: i64,
            lease_ms: i64,
            limit: i64,
        ) -> Result<Vec<ClaimedEvent>> {
            let sql = format!(
                "UPDATE webhook_events SET lease_owner = $1, lease_until_ms = $2, \
                 attempts = attempts + 1 \
                 WHERE seq IN (SELECT e.seq FROM webhook_events e \
                   WHERE e.next_attempt_ms <= $3 AND e.lease_until_ms <= $3 \
                   AND NOT EXISTS (SELECT 1 FROM webhook_events p \
                     WHERE p.service_sid = e.service_sid AND p.identity = e.identity \
                     AND p.seq < e.seq) \
                   ORDER BY e.seq LIMIT $4 {}) \
                 RETURNING seq, token, service_sid, identity, event_type, params, created_ms, \
                 attempts",
                $skip
            );
            let rows = sqlx::query(&sql)
                .bind(node)
                .bind(now_ms.saturating_add(lease_ms))
                .bind(now_ms)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await
                .map_err(db)?;
            let mut events = rows
                .iter()
                .map(|row| {
                    let service: String = row.try_get("service_sid")?;
                    let service_sid = ServiceSid::parse(&service).map_err(|e| {
                        sqlx::Error::ColumnDecode {
                            index: "service_sid".into(),
                            source: Box::new(e),
                        }
                    })?;
                    let params: String = row.try_get("params")?;
                    Ok(ClaimedEvent {
                        seq: row.try_get("seq")?,
                        token: row.try_get("token")?,
                        service_sid,
                        identity: row.try_get("identity")?,
                        event_type: row.try_get("event_type")?,
                        params: decode_params(&params),
                        created_ms: row.try_get("created_ms")?,
                        attempts: row.try_get("attempts")?,
                        target: None,
                    })
                })
                .collect::<sqlx::Result<Vec<_>>>()
                .map_err(db)?;
            events.sort_by_key(|e| e.seq);
            Ok(events)
        }

        /// Fills in each event's target from its service's webhook as it is now.
        pub(crate) async fn targets(conn: &mut $conn, events: &mut [ClaimedEvent]) -> Result<()> {
            let mut seen: Vec<(ServiceSid, Option<(WebhookConfig, reach_proto::AccountSid)>)> =
                Vec::new();
            for event in events.iter_mut() {
                if !seen.iter().any(|(s, _)| *s == event.service_sid) {
                    let account: Option<String> =
                        sqlx::query_scalar("SELECT account_sid FROM services WHERE sid = $1")
                            .bind(event.service_sid.as_str())
                            .fetch_optional(&mut *conn)
                            .await
                            .map_err(db)?;
                    let account = account.and_then(|a| a.parse().ok());
                    let hook = match account {
                        Some(account) => {
                            Some((webhook(&mut *conn, &event.service_sid).await?, account))
                        }
                        None => None,
                    };
                    seen.push((event.service_sid.clone(), hook));
                }
                let hook = seen
                    .iter()
                    .find(|(s, _)| *s == event.service_sid)
                    .and_then(|(_, h)| h.as_ref());
                event.target = hook.and_then(|(hook, account)| {
                    hook.fires(&event.event_type).then(|| Target {
                        url: hook.post_webhook_url.clone().unwrap_or_default(),
                        method: hook.method,
                        account_sid: account.clone(),
                    })
                });
            }
            Ok(())
        }

        /// Applies outcomes (see `Store::complete_events`).
        pub(crate) async fn complete(
            conn: &mut $conn,
            node: &str,
            outcomes: &[(crate::hooks::Claim, Completion)],
        ) -> Result<()> {
            for (claim, outcome) in outcomes {
                match outcome {
                    Completion::Delivered | Completion::Dropped => {
                        sqlx::query(
                            "DELETE FROM webhook_events \
                             WHERE seq = $1 AND lease_owner = $2 AND attempts = $3",
                        )
                        .bind(claim.seq)
                        .bind(node)
                        .bind(claim.attempts)
                        .execute(&mut *conn)
                        .await
                        .map_err(db)?;
                    }
                    Completion::Retry { at_ms, error } => {
                        sqlx::query(
                            "UPDATE webhook_events SET next_attempt_ms = $1, last_error = $2, \
                             lease_owner = NULL, lease_until_ms = 0 \
                             WHERE seq = $3 AND lease_owner = $4 AND attempts = $5",
                        )
                        .bind(at_ms)
                        .bind(error)
                        .bind(claim.seq)
                        .bind(node)
                        .bind(claim.attempts)
                        .execute(&mut *conn)
                        .await
                        .map_err(db)?;
                    }
                }
            }
            Ok(())
        }

        pub(crate) async fn release(conn: &mut $conn, node: Option<&str>) -> Result<u64> {
            let done = match node {
                Some(node) => sqlx::query(
                    "UPDATE webhook_events SET lease_owner = NULL, lease_until_ms = 0 \
                     WHERE lease_owner = $1",
                )
                .bind(node)
                .execute(&mut *conn)
                .await,
                None => sqlx::query(
                    "UPDATE webhook_events SET lease_owner = NULL, lease_until_ms = 0 \
                     WHERE lease_owner IS NOT NULL",
                )
                .execute(&mut *conn)
                .await,
            }
            .map_err(db)?;
            Ok(done.rows_affected())
        }

        pub(crate) async fn stats(conn: &mut $conn) -> Result<QueueStats> {
            let row = sqlx::query("SELECT COUNT(*) AS depth, MIN(created_ms) AS oldest FROM webhook_events")
                .fetch_one(&mut *conn)
                .await
                .map_err(db)?;
            Ok(QueueStats {
                depth: row.try_get("depth").map_err(db)?,
                oldest_created_ms: row.try_get("oldest").map_err(db)?,
            })
        }

        pub(crate) async fn touch_node(
            conn: &mut $conn,
            node: &str,
            now: i64,
        ) -> Result<Option<i64>> {
            let before: Option<i64> =
                sqlx::query_scalar("SELECT alive_at FROM nodes WHERE node_id = $1")
                    .bind(node)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(db)?;
            sqlx::query(
                "INSERT INTO nodes (node_id, alive_at) VALUES ($1, $2) \
                 ON CONFLICT (node_id) DO UPDATE SET alive_at = excluded.alive_at",
            )
            .bind(node)
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
            Ok(before)
        }
    };
}

pub(crate) use shared_sql;

#[cfg(test)]
mod tests {
    #[test]
    fn presence_batches_split_into_pieces_of_64_8_and_1() {
        let items: Vec<u32> = (0..139).collect();
        let pieces = super::presence_pieces(&items);
        let sizes: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
        assert_eq!(sizes, [64, 64, 8, 1, 1, 1]);
        let again: Vec<u32> = pieces.concat();
        assert_eq!(again, items, "in order, each once");
        assert!(super::presence_pieces::<u32>(&[]).is_empty());
    }

    /// Pieces of 64, 16 and 4, the last filled up to 4 with its last item; every item comes
    /// once and in order before the filling.
    #[test]
    fn padded_pieces_name_each_item_in_order_and_fill_the_last() {
        for (n, sizes) in [
            (0, vec![]),
            (1, vec![(1, 3)]),
            (4, vec![(4, 0)]),
            (7, vec![(4, 0), (3, 1)]),
            (100, vec![(64, 0), (16, 0), (16, 0), (4, 0)]),
            (139, vec![(64, 0), (64, 0), (4, 0), (4, 0), (3, 1)]),
        ] {
            let items: Vec<u32> = (0..n).collect();
            let pieces = super::padded_pieces(&items);
            let got: Vec<(usize, usize)> = pieces.iter().map(|(p, pad)| (p.len(), *pad)).collect();
            assert_eq!(got, sizes, "{n} items");
            let named: Vec<u32> = pieces
                .iter()
                .flat_map(|p| super::padded(*p).copied())
                .collect();
            let mut expected = items.clone();
            if let Some((last, pad)) = pieces.last().and_then(|(p, pad)| Some((*p.last()?, *pad))) {
                expected.extend(std::iter::repeat_n(last, pad));
            }
            assert_eq!(named, expected, "{n} items");
            assert!(
                pieces
                    .iter()
                    .all(|(p, pad)| [4, 16, 64].contains(&(p.len() + pad)))
            );
        }
    }

    use super::*;

    fn user() -> UserRecord {
        UserRecord {
            sid: "US00000000000000000000000000000001".into(),
            account_sid: "AC00000000000000000000000000000001".parse().unwrap(),
            service_sid: "IS00000000000000000000000000000001".parse().unwrap(),
            identity: "alice".into(),
            friendly_name: None,
            attributes: "{}".into(),
            role_sid: None,
            date_created: 0,
            date_updated: 60,
            revision: 0,
            online_epoch: 1,
            ever_had_binding: false,
            binding_count: 0,
            presence_online: false,
            last_seen_at: Some(30),
        }
    }

    fn cfg(enabled: bool) -> ServiceConfig {
        ServiceConfig {
            service_sid: "IS00000000000000000000000000000001".parse().unwrap(),
            reachability_enabled: enabled,
            reachability_epoch: 1,
            default_conversation_creator_role_sid: None,
            default_conversation_role_sid: None,
            default_chat_service_role_sid: None,
        }
    }

    fn get<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn parameters_follow_the_null_rules() {
        let p = event_params(
            UserEvent::Updated,
            Source::Sdk,
            &user(),
            &cfg(true),
            &[UpdateReason::ReachabilityOnline],
            100,
        );
        assert_eq!(get(&p, "EventType"), Some("onUserUpdated"));
        assert_eq!(get(&p, "Source"), Some("SDK"));
        assert_eq!(get(&p, "IsOnline"), Some("false"));
        assert_eq!(get(&p, "IsNotifiable"), Some(""), "never had a binding");
        assert_eq!(get(&p, "DateLastSeen"), Some("1970-01-01T00:00:30Z"));
        assert_eq!(get(&p, "DateUpdated"), Some("1970-01-01T00:01:00Z"));
        assert_eq!(get(&p, "FriendlyName"), Some(""));
        assert_eq!(get(&p, "UpdateReasons"), Some("reachabilityOnline"));

        let online = UserRecord {
            presence_online: true,
            ever_had_binding: true,
            binding_count: 1,
            ..user()
        };
        let p = event_params(UserEvent::Added, Source::Api, &online, &cfg(true), &[], 100);
        assert_eq!(get(&p, "IsOnline"), Some("true"));
        assert_eq!(get(&p, "IsNotifiable"), Some("true"));
        assert_eq!(get(&p, "DateLastSeen"), Some("1970-01-01T00:01:40Z"), "now");
        assert_eq!(get(&p, "UpdateReasons"), None, "only on onUserUpdated");

        let p = event_params(
            UserEvent::Removed,
            Source::Api,
            &online,
            &cfg(false),
            &[],
            100,
        );
        assert_eq!(get(&p, "IsOnline"), Some(""));
        assert_eq!(get(&p, "IsNotifiable"), Some(""));
        assert_eq!(get(&p, "DateLastSeen"), Some(""));
    }

    #[test]
    fn reasons_are_what_subscribers_see_change() {
        let before = user();
        let renamed = UserRecord {
            friendly_name: Some("Alice".into()),
            role_sid: Some("RL00000000000000000000000000000001".into()),
            ..user()
        };
        assert_eq!(
            profile_reasons(&before, &renamed, &cfg(true)),
            [UpdateReason::FriendlyName]
        );
        let role_only = UserRecord {
            role_sid: Some("RL00000000000000000000000000000001".into()),
            ..user()
        };
        assert!(profile_reasons(&before, &role_only, &cfg(true)).is_empty());
        let bound = UserRecord {
            ever_had_binding: true,
            binding_count: 1,
            ..user()
        };
        assert_eq!(
            profile_reasons(&before, &bound, &cfg(true)),
            [UpdateReason::ReachabilityNotifiable]
        );
        assert!(
            profile_reasons(&before, &bound, &cfg(false)).is_empty(),
            "null before and after while disabled"
        );
    }

    #[test]
    fn filters_and_params_round_trip_through_their_columns() {
        let filters = vec!["onUserAdded".to_owned(), "onMessageAdded".to_owned()];
        assert_eq!(split_filters(&join_filters(&filters)), filters);
        assert!(split_filters("").is_empty());
        let params = vec![("A".to_owned(), "x,\"y\"".to_owned())];
        assert_eq!(decode_params(&encode_params(&params)), params);
    }

    #[test]
    fn a_webhook_fires_with_a_url_and_the_filter() {
        let mut hook =
            WebhookConfig::defaults("IS00000000000000000000000000000001".parse().unwrap());
        hook.filters = vec!["onUserAdded".into()];
        assert!(!hook.fires("onUserAdded"), "no URL");
        hook.apply(&WebhookUpdate {
            post_webhook_url: Some(Some("https://example.com/hook".into())),
            ..WebhookUpdate::default()
        });
        assert!(hook.fires("onUserAdded"));
        assert!(!hook.fires("onUserUpdated"));
        hook.apply(&WebhookUpdate {
            post_webhook_url: Some(None),
            ..WebhookUpdate::default()
        });
        assert!(!hook.fires("onUserAdded"));
    }
}
