//! [`User`]: a cheap handle on one user's latest known state.
//!
//! Each identity the client knows has one [`UserCell`]; the background task writes it when a
//! `subscribed` reply or a `user_updated` push arrives, and every [`User`] handle for that
//! identity reads it. Getters therefore always return the latest state, and never wait.

use std::sync::{Arc, RwLock};

use reach_proto::{Reasons, UpdateReason};
use serde::ser::SerializeStruct;

use crate::error::{Error, Result};
use crate::events::{Filter, Queue, UserUpdates};
use crate::request::{Link, Reply, Request};

/// The shared state of one identity.
#[derive(Debug)]
pub(crate) struct UserCell {
    pub identity: Arc<str>,
    data: RwLock<UserData>,
}

#[derive(Debug, Clone)]
struct UserData {
    user: reach_proto::User,
    /// True while the client holds a subscription for this identity (always for its own).
    subscribed: bool,
}

impl UserCell {
    pub fn new(user: reach_proto::User, subscribed: bool) -> Arc<UserCell> {
        Arc::new(UserCell {
            identity: Arc::from(user.identity.as_str()),
            data: RwLock::new(UserData { user, subscribed }),
        })
    }

    pub fn snapshot(&self) -> reach_proto::User {
        self.read(|d| d.user.clone())
    }

    pub fn is_subscribed(&self) -> bool {
        self.read(|d| d.subscribed)
    }

    pub fn set_subscribed(&self, subscribed: bool) {
        self.write(|d| d.subscribed = subscribed);
    }

    /// Stores `user` and returns the reasons that describe what changed.
    pub fn replace(&self, user: reach_proto::User) -> Reasons {
        self.write(|d| {
            let reasons = reasons_between(&d.user, &user);
            d.user = user;
            reasons
        })
    }

    fn read<T>(&self, f: impl FnOnce(&UserData) -> T) -> T {
        let guard = self.data.read().unwrap_or_else(|e| e.into_inner());
        f(&guard)
    }

    fn write<T>(&self, f: impl FnOnce(&mut UserData) -> T) -> T {
        let mut guard = self.data.write().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }
}

/// Which fields differ between two states of one user, as update reasons.
///
/// ```
/// use reach_client::{UpdateReason, reasons_between};
/// let before = reach_client::proto::User {
///     identity: "alice".into(),
///     friendly_name: None,
///     attributes: "{}".into(),
///     is_online: Some(false),
///     is_notifiable: None,
///     last_seen_at: None,
/// };
/// let after = reach_client::proto::User { is_online: Some(true), ..before.clone() };
/// assert_eq!(reasons_between(&before, &after).to_vec(), vec![UpdateReason::ReachabilityOnline]);
/// assert!(reasons_between(&after, &after).is_empty());
/// ```
pub fn reasons_between(old: &reach_proto::User, new: &reach_proto::User) -> Reasons {
    let mut r = Reasons::EMPTY;
    if old.friendly_name != new.friendly_name {
        r = r.with(UpdateReason::FriendlyName);
    }
    if old.attributes != new.attributes {
        r = r.with(UpdateReason::Attributes);
    }
    if old.is_online != new.is_online {
        r = r.with(UpdateReason::ReachabilityOnline);
    }
    if old.is_notifiable != new.is_notifiable {
        r = r.with(UpdateReason::ReachabilityNotifiable);
    }
    r
}

/// A user as this client sees it: a cheap, cloneable handle whose getters always read the
/// latest state the client knows (they take a short lock, never wait for the network).
///
/// Handles come from [`Client::user`](crate::Client::user),
/// [`Client::subscribe_user`](crate::Client::subscribe_user) and events. A handle stays valid
/// after [`unsubscribe`](User::unsubscribe): it keeps the last known state and
/// [`is_subscribed`](User::is_subscribed) turns false; subscribing again brings it back to life.
///
/// Serialised (e.g. for logs or `reach watch --json`) with the hosted SDK's field names:
///
/// ```
/// let user = reach_client::User::from_snapshot(reach_client::proto::User {
///     identity: "alice".into(),
///     friendly_name: Some("Alice".into()),
///     attributes: r#"{"team":"blue"}"#.into(),
///     is_online: Some(true),
///     is_notifiable: None,
///     last_seen_at: Some(1_795_639_384),
/// });
/// assert_eq!(user.identity(), "alice");
/// assert_eq!(user.attributes()["team"], "blue");
/// assert_eq!(user.last_seen_at(), Some(1_795_639_384));
/// assert_eq!(
///     serde_json::to_value(&user).unwrap(),
///     serde_json::json!({"identity": "alice", "friendlyName": "Alice",
///         "attributes": {"team": "blue"}, "isOnline": true, "isNotifiable": null,
///         "lastSeenAt": 1_795_639_384, "isSubscribed": false}),
/// );
/// ```
#[derive(Clone)]
pub struct User {
    pub(crate) cell: Arc<UserCell>,
    pub(crate) link: Option<Arc<Link>>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let u = self.snapshot();
        f.debug_struct("User")
            .field("identity", &u.identity)
            .field("friendly_name", &u.friendly_name)
            .field("is_online", &u.is_online)
            .field("is_notifiable", &u.is_notifiable)
            .field("last_seen_at", &u.last_seen_at)
            .field("is_subscribed", &self.is_subscribed())
            .finish()
    }
}

impl PartialEq for User {
    /// Two handles are equal when they are handles on the same user of the same client.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.cell, &other.cell)
    }
}

impl Eq for User {}

impl User {
    /// A handle not attached to any client, holding `user` (for tests, examples and tools).
    /// It is not subscribed, and [`unsubscribe`](User::unsubscribe) fails.
    pub fn from_snapshot(user: reach_proto::User) -> User {
        User {
            cell: UserCell::new(user, false),
            link: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.cell.identity
    }

    /// The display name, if one is set.
    pub fn friendly_name(&self) -> Option<String> {
        self.cell.read(|d| d.user.friendly_name.clone())
    }

    /// The user's attributes, parsed from their JSON text (`{}` when unset; a text that is
    /// not JSON comes back as a JSON string).
    pub fn attributes(&self) -> serde_json::Value {
        self.cell.read(|d| {
            serde_json::from_str(&d.user.attributes)
                .unwrap_or_else(|_| serde_json::Value::String(d.user.attributes.clone()))
        })
    }

    /// The attributes exactly as the server sent them (JSON text).
    pub fn attributes_text(&self) -> String {
        self.cell.read(|d| d.user.attributes.clone())
    }

    /// `Some(true)` while the user holds a connection; `None` while the service has
    /// reachability disabled or the user was never online since it was enabled.
    pub fn is_online(&self) -> Option<bool> {
        self.cell.read(|d| d.user.is_online)
    }

    /// `Some(true)` while the user has a push registration; `None` while reachability is
    /// disabled or the user never had one.
    pub fn is_notifiable(&self) -> Option<bool> {
        self.cell.read(|d| d.user.is_notifiable)
    }

    /// When the user was last seen, in unix seconds: the time of the state the client holds
    /// while the user is online, else when it went offline. `None` when
    /// [`is_online`](User::is_online) is, or from a server that does not send it. A change of
    /// this time alone is not an update (it has no reason).
    pub fn last_seen_at(&self) -> Option<i64> {
        self.cell.read(|d| d.user.last_seen_at)
    }

    /// Whether this client currently holds a subscription for the user (always true for the
    /// client's own user).
    pub fn is_subscribed(&self) -> bool {
        self.cell.is_subscribed()
    }

    /// The whole state at this moment, as the wire protocol carries it.
    pub fn snapshot(&self) -> reach_proto::User {
        self.cell.snapshot()
    }

    /// Stops receiving updates for this user. The handle keeps its last state. Unsubscribing
    /// the client's own user does nothing (a connection always watches its own user).
    pub async fn unsubscribe(&self) -> Result<()> {
        let link = self.link.as_ref().ok_or(Error::ClientClosed)?;
        match link
            .request(Request::Unsubscribe(vec![self.identity().to_owned()]))
            .await?
        {
            Reply::Done => Ok(()),
            other => Err(Error::Protocol(format!(
                "unexpected reply to unsubscribe: {other:?}"
            ))),
        }
    }

    /// The updates of this user only, from now on: a [`Stream`](futures_util::Stream) of [`UserUpdate`]s that
    /// coalesces like [`Client::events`](crate::Client::events) (a slow reader gets the latest
    /// state with the reasons merged). It ends when the client ends.
    pub fn updates(&self) -> UserUpdates {
        let queue = match &self.link {
            Some(link) => link
                .shared
                .hub
                .subscribe(Filter::Identity(Arc::clone(&self.cell.identity))),
            None => Queue::closed(),
        };
        UserUpdates::new(queue)
    }
}

impl serde::Serialize for User {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let u = self.snapshot();
        let mut st = s.serialize_struct("User", 7)?;
        st.serialize_field("identity", &u.identity)?;
        st.serialize_field("friendlyName", &u.friendly_name)?;
        st.serialize_field("attributes", &self.attributes())?;
        st.serialize_field("isOnline", &u.is_online)?;
        st.serialize_field("isNotifiable", &u.is_notifiable)?;
        st.serialize_field("lastSeenAt", &u.last_seen_at)?;
        st.serialize_field("isSubscribed", &self.is_subscribed())?;
        st.end()
    }
}

/// One update of one user, as [`User::updates`] yields it.
#[derive(Debug, Clone)]
pub struct UserUpdate {
    pub user: User,
    /// What changed, in wire order, merged if several updates coalesced.
    pub reasons: Vec<UpdateReason>,
}
