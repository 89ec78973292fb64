//! What the server's frames do to the shared state, and the events that follow from it.
//!
//! The task applies each `welcome`, reply and push here, in the order the server sent them,
//! before any event is emitted; each function returns the events, which the task emits. Only
//! what really changed becomes an event: a user whose state a reply repeats is not reported,
//! and after a reconnect the resubscription reply is compared with what the client knew, so
//! the application hears only of the changes it missed. The server never lets a
//! `user_updated` overtake the `subscribed` reply that carries the same user, so the state
//! never goes backwards.

use std::sync::Arc;

use reach_proto::{Encoding, IdentityError, UpdateReason};

use crate::connect::Welcome;
use crate::events::ClientEvent;
use crate::request::Link;
use crate::user::User;

/// A `welcome` (after a reconnect: reports only what changed, the service's switch and the
/// own user).
pub(crate) fn welcome(link: &Arc<Link>, w: &Welcome, encoding: Encoding) -> Vec<ClientEvent> {
    let mut events = vec![];
    let mut st = link.shared.state();
    st.connection_id = w.connection_id.clone();
    st.service_sid = w.service_sid.clone();
    st.token_expires_at = w.token_expires_at;
    st.heartbeat_interval = w.heartbeat_interval;
    st.encoding = encoding;
    st.connected_since = Some(std::time::Instant::now());
    if st.reachability_enabled != w.reachability_enabled {
        st.reachability_enabled = w.reachability_enabled;
        events.push(ClientEvent::ServiceUpdated {
            reachability_enabled: w.reachability_enabled,
        });
    }
    let own = Arc::clone(&st.own);
    let reasons = own.replace(w.user.clone());
    if !reasons.is_empty() {
        events.push(ClientEvent::UserUpdated {
            user: link.user(own),
            reasons: reasons.to_vec(),
        });
    }
    events
}

/// A `subscribed` reply to the application: the handles, in the reply's order, and the events
/// (`UserSubscribed` for a new subscription, `UserUpdated` for one whose state changed).
pub(crate) fn subscribed(
    link: &Arc<Link>,
    users: Vec<reach_proto::User>,
) -> (Vec<User>, Vec<ClientEvent>) {
    let mut events = vec![];
    let mut handles = Vec::with_capacity(users.len());
    let mut st = link.shared.state();
    for user in users {
        let (cell, newly, reasons) = st.subscribe(user);
        let handle = link.user(cell);
        if newly {
            events.push(ClientEvent::UserSubscribed(handle.clone()));
        } else if !reasons.is_empty() {
            events.push(ClientEvent::UserUpdated {
                user: handle.clone(),
                reasons: reasons.to_vec(),
            });
        }
        handles.push(handle);
    }
    (handles, events)
}

/// The resubscription after a reconnect: only real changes become events; users the server
/// no longer has are unsubscribed.
pub(crate) fn resubscribed(
    link: &Arc<Link>,
    users: Vec<reach_proto::User>,
    errors: Vec<IdentityError>,
) -> Vec<ClientEvent> {
    let mut events = vec![];
    let mut st = link.shared.state();
    for user in users {
        let Some(cell) = st.users.get(user.identity.as_str()).cloned() else {
            continue;
        };
        let reasons = cell.replace(user);
        if !reasons.is_empty() {
            events.push(ClientEvent::UserUpdated {
                user: link.user(cell),
                reasons: reasons.to_vec(),
            });
        }
    }
    for e in errors {
        tracing::info!(identity = %e.identity, code = e.code, message = %e.message,
            "not resubscribed after the reconnect");
        if let Some(cell) = st.unsubscribe(&e.identity) {
            events.push(ClientEvent::UserUnsubscribed(link.user(cell)));
        }
    }
    events
}

/// An `unsubscribed` reply for these identities.
pub(crate) fn unsubscribed(link: &Arc<Link>, identities: &[String]) -> Vec<ClientEvent> {
    let mut st = link.shared.state();
    identities
        .iter()
        .filter_map(|identity| st.unsubscribe(identity))
        .map(|cell| ClientEvent::UserUnsubscribed(link.user(cell)))
        .collect()
}

/// A `user_updated` push. Without reasons from the server, the reasons are what changed.
pub(crate) fn user_updated(
    link: &Arc<Link>,
    user: reach_proto::User,
    reasons: Vec<UpdateReason>,
) -> Option<ClientEvent> {
    let cell = link.shared.state().cell(&user.identity).cloned();
    // An update for an identity unsubscribed a moment ago: nobody watches it any more.
    let cell = cell?;
    let changed = cell.replace(user);
    let reasons = if reasons.is_empty() {
        changed.to_vec()
    } else {
        reasons
    };
    (!reasons.is_empty()).then(|| ClientEvent::UserUpdated {
        user: link.user(cell),
        reasons,
    })
}

/// A `service_updated` push.
pub(crate) fn service_updated(link: &Link, reachability_enabled: bool) -> ClientEvent {
    link.shared.state().reachability_enabled = reachability_enabled;
    ClientEvent::ServiceUpdated {
        reachability_enabled,
    }
}

/// A `token_about_to_expire` push.
pub(crate) fn token_about_to_expire(link: &Link, expires_at: i64) -> ClientEvent {
    link.shared.state().token_expires_at = expires_at;
    ClientEvent::TokenAboutToExpire
}

/// A `token_updated` reply: `token` is the one the next `hello` presents.
pub(crate) fn token_updated(link: &Link, token: String, expires_at: i64) {
    let mut st = link.shared.state();
    st.token = token;
    st.token_expires_at = expires_at;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use reach_proto::UpdateReason::{FriendlyName, ReachabilityOnline};
    use tokio::sync::mpsc;

    use super::*;
    use crate::options::Options;
    use crate::request::Command;
    use crate::state::{ClientState, Shared};

    fn user(identity: &str, online: Option<bool>) -> reach_proto::User {
        reach_proto::User {
            identity: identity.into(),
            friendly_name: None,
            attributes: "{}".into(),
            is_online: online,
            is_notifiable: None,
            last_seen_at: None,
        }
    }

    fn welcome_of(enabled: bool, own: reach_proto::User) -> Welcome {
        Welcome {
            connection_id: "CN1".into(),
            service_sid: "IS1".into(),
            reachability_enabled: enabled,
            heartbeat_interval: Duration::from_secs(10),
            token_expires_at: 1,
            user: own,
        }
    }

    /// A link as a connected client has it, with no task behind it.
    fn link() -> (Arc<Link>, mpsc::Receiver<Command>) {
        let state = ClientState::new(
            welcome_of(true, user("me", Some(true))),
            Encoding::Json,
            "token".into(),
        );
        let (tx, rx) = mpsc::channel(1);
        let shared = Arc::new(Shared::new(Options::default(), state));
        (Arc::new(Link { shared, cmds: tx }), rx)
    }

    /// `(event kind, identity, reasons)` of each event.
    fn summary(events: &[ClientEvent]) -> Vec<(&'static str, String, Vec<UpdateReason>)> {
        events
            .iter()
            .map(|e| match e {
                ClientEvent::UserSubscribed(u) => ("subscribed", u.identity().into(), vec![]),
                ClientEvent::UserUnsubscribed(u) => ("unsubscribed", u.identity().into(), vec![]),
                ClientEvent::UserUpdated { user, reasons } => {
                    ("updated", user.identity().into(), reasons.clone())
                }
                ClientEvent::ServiceUpdated {
                    reachability_enabled,
                } => ("service", reachability_enabled.to_string(), vec![]),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_reply_that_repeats_a_users_state_reports_nothing() {
        let (link, _rx) = link();
        let (handles, events) = subscribed(&link, vec![user("alice", Some(true))]);
        assert_eq!(handles[0].is_online(), Some(true));
        assert_eq!(summary(&events), [("subscribed", "alice".into(), vec![])]);
        let (_, events) = subscribed(&link, vec![user("alice", Some(true))]);
        assert!(events.is_empty(), "{events:?}");
        let mut renamed = user("alice", Some(true));
        renamed.friendly_name = Some("Alice".into());
        let (_, events) = subscribed(&link, vec![renamed]);
        assert_eq!(
            summary(&events),
            [("updated", "alice".into(), vec![FriendlyName])]
        );
    }

    #[test]
    fn the_resubscription_reports_only_what_changed_while_away() {
        let (link, _rx) = link();
        let (handles, _) = subscribed(
            &link,
            vec![
                user("alice", Some(true)),
                user("bob", Some(true)),
                user("carol", None),
            ],
        );
        let events = resubscribed(
            &link,
            vec![user("alice", Some(true)), user("bob", Some(false))],
            vec![IdentityError {
                identity: "carol".into(),
                code: 20404,
                message: "gone".into(),
            }],
        );
        assert_eq!(
            summary(&events),
            [
                ("updated", "bob".into(), vec![ReachabilityOnline]),
                ("unsubscribed", "carol".into(), vec![]),
            ]
        );
        assert_eq!(handles[1].is_online(), Some(false), "the handle sees it");
        assert!(!handles[2].is_subscribed());
        // A later subscription revives the same handle.
        subscribed(&link, vec![user("carol", Some(true))]);
        assert!(handles[2].is_subscribed());
        assert_eq!(handles[2].is_online(), Some(true));
    }

    #[test]
    fn a_second_welcome_reports_the_switch_and_the_own_user_only_if_changed() {
        let (link, _rx) = link();
        let same = welcome(
            &link,
            &welcome_of(true, user("me", Some(true))),
            Encoding::MsgPack,
        );
        assert!(same.is_empty(), "{same:?}");
        assert_eq!(link.shared.state().encoding, Encoding::MsgPack);
        let changed = welcome(&link, &welcome_of(false, user("me", None)), Encoding::Json);
        assert_eq!(
            summary(&changed),
            [
                ("service", "false".into(), vec![]),
                ("updated", "me".into(), vec![ReachabilityOnline]),
            ]
        );
    }

    #[test]
    fn a_push_without_reasons_reports_what_changed_and_one_for_nobody_is_dropped() {
        let (link, _rx) = link();
        subscribed(&link, vec![user("alice", Some(false))]);
        let e = user_updated(&link, user("alice", Some(true)), vec![]);
        assert_eq!(
            summary(&e.into_iter().collect::<Vec<_>>()),
            [("updated", "alice".into(), vec![ReachabilityOnline])]
        );
        assert!(user_updated(&link, user("alice", Some(true)), vec![]).is_none());
        assert!(user_updated(&link, user("dave", Some(true)), vec![ReachabilityOnline]).is_none());
        unsubscribed(&link, &["alice".into()]);
        assert!(user_updated(&link, user("alice", Some(false)), vec![]).is_none());
    }
}
