//! `reach`: the Reach command-line tool.
//!
//! - `reach watch --url URL --token TOKEN alice bob`: follows users' presence, one line per
//!   change, reconnecting by itself (see `watch.rs`).
//! - `reach token --account AC.. --key SK.. --secret .. --service IS.. --identity alice`:
//!   mints an access token for scripts (see `token.rs`).
//!
//! Exit statuses: 0 success, 1 failure, 2 usage error or bad URL, 3 token refused or
//! expired, 4 server unreachable.

mod token;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use reach_client::Encoding;

#[derive(Parser, Debug)]
#[command(
    name = "reach",
    version,
    about = "Reach command-line tool: watch presence, mint access tokens",
    after_help = "Exit status: 0 success, 1 failure, 2 usage error or bad URL, \
                  3 token refused or expired, 4 server unreachable."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Wire {
    Msgpack,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print one line per change of the users' presence (time, identity,
    /// online/offline/unknown, notifiable, reasons); reconnects by itself; Ctrl-C ends it.
    Watch {
        /// The gateway's WebSocket URL, e.g. ws://127.0.0.1:8080/v1/ws or wss://… (the path may be left out).
        #[arg(long, env = "REACH_URL")]
        url: String,
        /// A PEM file of CA certificates to trust for wss://, besides the system's (e.g. a
        /// self-signed gateway's certificate).
        #[arg(long, env = "REACH_CA_FILE")]
        ca_file: Option<std::path::PathBuf>,
        /// An access token (see `reach token`).
        #[arg(long, env = "REACH_TOKEN", hide_env_values = true)]
        token: String,
        /// Wire encoding.
        #[arg(long, value_enum, default_value = "msgpack")]
        encoding: Wire,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Identities to watch.
        #[arg(required = true)]
        identities: Vec<String>,
    },
    /// Mint an access token (JWT, HS256) for scripts; prints it on standard output.
    Token {
        /// Account SID (AC...).
        #[arg(long, env = "REACH_ACCOUNT_SID")]
        account: String,
        /// API key SID (SK...) that signs the token.
        #[arg(long, env = "REACH_API_KEY_SID")]
        key: String,
        /// The API key's secret.
        #[arg(long, env = "REACH_API_KEY_SECRET", hide_env_values = true)]
        secret: String,
        /// Service SID (IS...).
        #[arg(long)]
        service: String,
        /// The user's identity.
        #[arg(long)]
        identity: String,
        /// Lifetime in seconds (1 to 86400).
        #[arg(long, default_value_t = 3600, allow_negative_numbers = true)]
        ttl: i64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Token {
            account,
            key,
            secret,
            service,
            identity,
            ttl,
        } => {
            let spec = token::TokenSpec {
                account_sid: &account,
                key_sid: &key,
                secret: &secret,
                service_sid: &service,
                identity: &identity,
                ttl_s: ttl,
            };
            match spec.mint(reach_proto::now_unix()) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("reach: {e}");
                    ExitCode::from(watch::EXIT_USAGE)
                }
            }
        }
        Command::Watch {
            url,
            ca_file,
            token,
            encoding,
            json,
            identities,
        } => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("reach: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let encoding = match encoding {
                Wire::Msgpack => Encoding::MsgPack,
                Wire::Json => Encoding::Json,
            };
            runtime.block_on(watch::watch(watch::WatchArgs {
                url,
                ca_file,
                token,
                encoding,
                json,
                identities,
            }))
        }
    }
}
