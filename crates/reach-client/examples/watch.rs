//! Watching presence: subscribes to users and prints each change with its reasons, plus the
//! connection's state changes, until Ctrl-C.
//!
//! ```text
//! cargo run -p reach-client --example watch -- ws://127.0.0.1:8080/v1/ws "$TOKEN" alice bob
//! ```
//! (`reach token ...` or `reachd token ...` mints a token.)

use futures_util::StreamExt;
use reach_client::{Client, ClientEvent};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(token)) = (args.next(), args.next()) else {
        eprintln!("usage: watch URL TOKEN IDENTITY...");
        std::process::exit(2);
    };
    let identities: Vec<String> = args.collect();

    let client = Client::connect(&url, &token).await?;
    println!(
        "connected as {} (reachability enabled: {})",
        client.user().identity(),
        client.reachability_enabled()
    );
    // Take the stream before subscribing, so no event is missed.
    let mut events = client.events();
    let outcome = client.subscribe_users(&identities).await?;
    for e in &outcome.errors {
        eprintln!(
            "cannot watch {}: error {} ({})",
            e.identity, e.code, e.message
        );
    }
    for user in &outcome.users {
        println!("{:<16} online={:?}", user.identity(), user.is_online());
    }

    loop {
        let event = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            e = events.next() => match e {
                Some(e) => e,
                None => break, // the client ended (forbidden, or reconnects given up)
            },
        };
        match event {
            ClientEvent::UserUpdated { user, reasons } => println!(
                "{:<16} online={:?} notifiable={:?} reasons={reasons:?}",
                user.identity(),
                user.is_online(),
                user.is_notifiable()
            ),
            ClientEvent::ConnectionStateChanged(state) => eprintln!("connection: {state}"),
            ClientEvent::TokenAboutToExpire => {
                eprintln!("the token expires soon: a real app calls client.update_token(..) now")
            }
            other => eprintln!("{}", serde_json::to_string(&other)?),
        }
    }
    client.close().await;
    Ok(())
}
