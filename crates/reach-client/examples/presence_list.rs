//! A terminal presence list: one row per user with a presence dot, redrawn on every change.
//!
//! ```text
//! cargo run -p reach-client --example presence_list -- ws://127.0.0.1:8080/v1/ws "$TOKEN" alice bob carol
//! ```
//!
//! Events only say *that* something changed; the rows read each [`User`]'s latest state, so a
//! burst of changes costs one redraw per event at most and never shows stale data.

use std::fmt::Write as _;

use futures_util::StreamExt;
use reach_client::{Client, ClientEvent, User};

const GREEN: &str = "\x1b[32m";
const GREY: &str = "\x1b[90m";
const RESET: &str = "\x1b[0m";

fn dot(user: &User) -> String {
    match user.is_online() {
        Some(true) => format!("{GREEN}●{RESET}"),
        Some(false) => format!("{GREY}○{RESET}"),
        None => "?".to_owned(),
    }
}

fn render(client: &Client, users: &[User], last: &str) -> String {
    let mut out = String::from("\x1b[2J\x1b[H"); // clear the screen, cursor home
    let _ = writeln!(
        out,
        "Reach presence — {} as {} — {}{}\n",
        client.service_sid(),
        client.user().identity(),
        client.connection_state(),
        if client.reachability_enabled() {
            ""
        } else {
            " (reachability disabled)"
        },
    );
    let _ = writeln!(out, "   {:<20} {:<24} push", "identity", "name");
    for u in users {
        let push = match u.is_notifiable() {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        let name = u.friendly_name().unwrap_or_default();
        let _ = writeln!(out, " {} {:<20} {:<24} {push}", dot(u), u.identity(), name);
    }
    let _ = writeln!(out, "\n{last}\n(Ctrl-C to quit)");
    out
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(token)) = (args.next(), args.next()) else {
        eprintln!("usage: presence_list URL TOKEN IDENTITY...");
        std::process::exit(2);
    };
    let identities: Vec<String> = args.collect();
    let client = Client::connect(&url, &token).await?;
    let mut events = client.events();
    let outcome = client.subscribe_users(&identities).await?;
    let users = outcome.users;
    let mut last = match outcome.errors.first() {
        Some(e) => format!("cannot watch {}: {}", e.identity, e.message),
        None => String::new(),
    };
    print!("{}", render(&client, &users, &last));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            e = events.next() => {
                let Some(e) = e else { break };
                if let ClientEvent::UserUpdated { user, reasons } = &e {
                    last = format!("{} changed: {reasons:?}", user.identity());
                }
                print!("{}", render(&client, &users, &last));
            }
        }
    }
    client.close().await;
    Ok(())
}
