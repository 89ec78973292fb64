//! The JSON shapes of the resources (snake_case, as the hosted API answers), their absolute
//! URLs ([`Urls`]) and timestamps ([`iso8601`]).

use reach_store::{AccountSid, Binding, Service, ServiceConfig, ServiceSid, UserRecord};
use serde::Serialize;

/// `message_types` of every binding. Reach records registrations only and does not send pushes,
/// so a binding is reported with the hosted API's default notification types.
const MESSAGE_TYPES: [&str; 3] = [
    "new_message",
    "added_to_conversation",
    "removed_from_conversation",
];

/// `2026-11-25T20:43:04Z`.
pub(super) fn iso8601(unix: i64) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

/// Builds absolute URLs.
pub(super) struct Urls<'a> {
    pub base: &'a str,
}

impl Urls<'_> {
    pub fn services(&self) -> String {
        format!("{}/v1/Services", self.base)
    }
    pub fn service(&self, sid: &str) -> String {
        format!("{}/v1/Services/{sid}", self.base)
    }
    pub fn config(&self, sid: &str) -> String {
        format!("{}/Configuration", self.service(sid))
    }
    pub fn users(&self, sid: &str) -> String {
        format!("{}/Users", self.service(sid))
    }
    pub fn user(&self, sid: &str, user_sid: &str) -> String {
        format!("{}/Users/{user_sid}", self.service(sid))
    }
    pub fn bindings(&self, sid: &str) -> String {
        format!("{}/Bindings", self.service(sid))
    }
    pub fn binding(&self, sid: &str, binding_sid: &str) -> String {
        format!("{}/Bindings/{binding_sid}", self.service(sid))
    }
}

#[derive(Serialize)]
pub(super) struct ServiceJson {
    sid: ServiceSid,
    account_sid: AccountSid,
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

pub(super) fn service_json(urls: &Urls<'_>, s: Service) -> ServiceJson {
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
pub(super) struct ConfigJson {
    chat_service_sid: ServiceSid,
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

pub(super) fn config_json(urls: &Urls<'_>, c: ServiceConfig) -> ConfigJson {
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
pub(super) struct UserJson {
    sid: String,
    account_sid: AccountSid,
    chat_service_sid: ServiceSid,
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
pub(super) fn user_json(
    urls: &Urls<'_>,
    u: UserRecord,
    flags: (Option<bool>, Option<bool>),
) -> UserJson {
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
pub(super) struct BindingJson {
    sid: String,
    account_sid: AccountSid,
    chat_service_sid: ServiceSid,
    credential_sid: Option<String>,
    date_created: String,
    date_updated: String,
    endpoint: String,
    identity: String,
    binding_type: String,
    message_types: [&'static str; 3],
    url: String,
}

pub(super) fn binding_json(urls: &Urls<'_>, b: Binding) -> BindingJson {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_iso8601_utc_to_the_second() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(1_795_639_384), "2026-11-25T20:43:04Z");
    }
}
