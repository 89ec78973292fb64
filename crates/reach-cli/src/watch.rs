//! `reach watch`: subscribes to users and prints one line per change until interrupted.
//!
//! Lines go to standard output, one per change (and one per user when watching begins):
//! `2026-11-25T20:43:04Z alice online notifiable=yes reasons=reachabilityOnline`, or with
//! `--json` one JSON object per line (the SDK's event serialisation plus `time`). Connection
//! changes and warnings go to standard error. The client reconnects by itself; the command
//! ends on Ctrl-C (exit 0), when the token is refused or expires (exit 3), or when the
//! connection ends for good (exit 1).

use std::collections::HashSet;
use std::process::ExitCode;

use futures_util::StreamExt;
use reach_client::{Client, ClientEvent, ConnectionState, Encoding, Error, TlsConfig, User};
use time::OffsetDateTime;
use time::macros::format_description;

/// Exit statuses of `reach watch` (clap's usage errors are 2 as well).
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_DENIED: u8 = 3;
pub const EXIT_UNREACHABLE: u8 = 4;

pub struct WatchArgs {
    pub url: String,
    /// PEM CA certificates to trust for `wss://`, besides the system's roots.
    pub ca_file: Option<std::path::PathBuf>,
    pub token: String,
    pub encoding: Encoding,
    pub json: bool,
    pub identities: Vec<String>,
}

fn now_text() -> String {
    OffsetDateTime::now_utc()
        .format(format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
        ))
        .unwrap_or_default()
}

fn tri(v: Option<bool>, yes: &'static str, no: &'static str) -> &'static str {
    match v {
        Some(true) => yes,
        Some(false) => no,
        None => "unknown",
    }
}

/// One human-readable line: time, identity, online/offline/unknown, notifiable, reasons.
pub fn line(time: &str, user: &User, reasons: &str) -> String {
    format!(
        "{time} {} {} notifiable={} reasons={reasons}",
        user.identity(),
        tri(user.is_online(), "online", "offline"),
        tri(user.is_notifiable(), "yes", "no"),
    )
}

fn print_event(json: bool, event: &ClientEvent) {
    let time = now_text();
    if json {
        let mut v = serde_json::to_value(event).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("time".into(), time.into());
        }
        println!("{v}");
        return;
    }
    match event {
        ClientEvent::UserUpdated { user, reasons } => {
            let reasons: Vec<&str> = reasons.iter().map(|r| reason_name(*r)).collect();
            println!("{}", line(&time, user, &reasons.join(",")));
        }
        ClientEvent::UserSubscribed(user) => println!("{}", line(&time, user, "subscribed")),
        _ => {}
    }
}

fn reason_name(r: reach_client::UpdateReason) -> &'static str {
    match r {
        reach_client::UpdateReason::FriendlyName => "friendlyName",
        reach_client::UpdateReason::Attributes => "attributes",
        reach_client::UpdateReason::ReachabilityOnline => "reachabilityOnline",
        reach_client::UpdateReason::ReachabilityNotifiable => "reachabilityNotifiable",
    }
}

/// A clear message and exit status for a failed first connection.
fn connect_failure(url: &str, e: &Error) -> ExitCode {
    let (status, message) = match e {
        Error::InvalidUrl { .. } => (EXIT_USAGE, e.to_string()),
        Error::Denied { code, message } => (
            EXIT_DENIED,
            format!("the server refused the access token (error {code}): {message}"),
        ),
        Error::Connect(io) => (
            EXIT_UNREACHABLE,
            format!("cannot reach the server at {url}: {io}"),
        ),
        Error::Timeout(d) => (
            EXIT_UNREACHABLE,
            format!("no answer from the server at {url} within {d:?}"),
        ),
        Error::Rejected { status, message } => (
            EXIT_UNREACHABLE,
            format!("the server at {url} refused the WebSocket upgrade (HTTP {status}): {message}"),
        ),
        other => (EXIT_FAILURE, format!("cannot connect to {url}: {other}")),
    };
    eprintln!("reach: {message}");
    ExitCode::from(status)
}

pub async fn watch(args: WatchArgs) -> ExitCode {
    let mut builder = Client::builder(&args.url, &args.token).encoding(args.encoding);
    if let Some(path) = &args.ca_file {
        match TlsConfig::system().with_ca_file(path) {
            Ok(tls) => builder = builder.tls(tls),
            Err(e) => {
                eprintln!("reach: --ca-file: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    let client = match builder
        .client_name(concat!("reach-cli/", env!("CARGO_PKG_VERSION")))
        .connect()
        .await
    {
        Ok(c) => c,
        Err(e) => return connect_failure(&args.url, &e),
    };
    let mut events = client.events();
    let outcome = match client.subscribe_users(&args.identities).await {
        Ok(o) => o,
        Err(e) => {
            eprintln!("reach: cannot subscribe: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    for e in &outcome.errors {
        eprintln!(
            "reach: cannot watch {} (error {}): {}",
            e.identity, e.code, e.message
        );
    }
    if outcome.users.is_empty() {
        eprintln!("reach: none of the users can be watched");
        return ExitCode::from(EXIT_FAILURE);
    }
    eprintln!(
        "reach: watching {} user(s) in {} as {}",
        outcome.users.len(),
        client.service_sid(),
        client.user().identity()
    );
    let watched: HashSet<String> = outcome
        .users
        .iter()
        .map(|u| u.identity().to_owned())
        .collect();
    for user in &outcome.users {
        print_event(args.json, &ClientEvent::UserSubscribed(user.clone()));
    }
    loop {
        let event = tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                client.close().await;
                return ExitCode::SUCCESS;
            }
            e = events.next() => e,
        };
        let Some(event) = event else {
            let why = client
                .last_disconnect()
                .map(|d| d.reason)
                .unwrap_or_else(|| "closed".into());
            eprintln!("reach: the connection ended: {why}");
            return ExitCode::from(EXIT_FAILURE);
        };
        match &event {
            ClientEvent::UserUpdated { user, .. } if watched.contains(user.identity()) => {
                print_event(args.json, &event);
            }
            ClientEvent::UserUnsubscribed(user) => {
                eprintln!("reach: {} is no longer watched", user.identity());
            }
            ClientEvent::ConnectionStateChanged(state) => {
                eprintln!("reach: connection {state}");
                if *state == ConnectionState::Denied {
                    let why = client
                        .last_disconnect()
                        .map(|d| d.reason)
                        .unwrap_or_else(|| "the access token was refused".into());
                    eprintln!("reach: access denied ({why}); start again with a fresh token");
                    return ExitCode::from(EXIT_DENIED);
                }
            }
            ClientEvent::ServiceUpdated {
                reachability_enabled,
            } => eprintln!("reach: reachability enabled: {reachability_enabled}"),
            ClientEvent::TokenAboutToExpire => {
                eprintln!("reach: the access token expires soon; watching stops when it does");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_show_identity_presence_notifiable_and_reasons() {
        let u = User::from_snapshot(reach_proto_user("alice", Some(true), None));
        assert_eq!(
            line("2026-01-01T00:00:00Z", &u, "reachabilityOnline"),
            "2026-01-01T00:00:00Z alice online notifiable=unknown reasons=reachabilityOnline"
        );
        let u = User::from_snapshot(reach_proto_user("bob", None, Some(false)));
        assert_eq!(
            line("t", &u, "subscribed"),
            "t bob unknown notifiable=no reasons=subscribed"
        );
        assert_eq!(now_text().len(), "2026-01-01T00:00:00Z".len());
    }

    fn reach_proto_user(
        identity: &str,
        online: Option<bool>,
        notifiable: Option<bool>,
    ) -> reach_client::proto::User {
        reach_client::proto::User {
            identity: identity.into(),
            friendly_name: None,
            attributes: "{}".into(),
            is_online: online,
            is_notifiable: notifiable,
            last_seen_at: None,
        }
    }
}
