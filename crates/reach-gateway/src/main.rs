//! `reachd`: read config, set up logs, build the app, serve until SIGTERM/SIGINT, drain. The
//! other subcommands are in `reach_gateway::commands`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use reach_gateway::auth::Credentials;
use reach_gateway::commands::{self, fail};
use reach_gateway::config::{Config, LogFormat};
use reach_gateway::server;
use reach_store::Store;
use reach_store::postgres::PgStore;
use reach_store::sqlite::SqliteStore;

#[derive(Parser, Debug)]
#[command(name = "reachd", version, about = "Reach presence gateway")]
struct Cli {
    /// Configuration file (TOML). Without it: built-in defaults, then REACH_* variables.
    #[arg(long, short, global = true, env = "REACH_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Print the account and API key generated on first start.
    Credentials,
    /// Ask the running node (its admin listener) whether it is ready; exit 0 if so.
    Probe {
        /// Ask whether it is alive (`/healthz`) instead of ready (`/readyz`).
        #[arg(long)]
        live: bool,
    },
    /// Mint an access token for trying things out.
    Token {
        /// The user's identity.
        #[arg(long)]
        identity: String,
        /// The service SID (IS...).
        #[arg(long)]
        service: String,
        /// Lifetime in seconds (at most 86400).
        #[arg(long, default_value_t = 3600)]
        ttl: i64,
        /// API key SID to sign with (default: the first configured or generated key).
        #[arg(long)]
        key: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("reachd: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(config),
        Command::Credentials => commands::credentials(&config),
        Command::Probe { live } => commands::probe(&config, live),
        Command::Token {
            identity,
            service,
            ttl,
            key,
        } => commands::token(&config, &identity, &service, ttl, key),
    }
}

fn init_logs(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.filter));
    // A failed write to stderr (a closed pipe) must not panic the task that logs it: that
    // would take the shutdown signal's task down before it starts the drain.
    // Colour only on a terminal (files and pipes get plain text), and not with NO_COLOR set.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Pretty => builder.init(),
    }
}

fn run(config: Config) -> ExitCode {
    let config = match commands::with_credentials(&config, true) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    init_logs(&config);
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.server.worker_threads > 0 {
        builder.worker_threads(config.server.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

async fn serve(config: Config) -> Result<(), String> {
    let store: Arc<dyn Store> = if config.storage.postgres_url.is_empty() {
        Arc::new(
            SqliteStore::open(&config.storage.sqlite_path)
                .await
                .map_err(|e| {
                    format!("cannot open {}: {e}", config.storage.sqlite_path.display())
                })?,
        )
    } else {
        Arc::new(
            PgStore::connect(&config.storage.postgres_url)
                .await
                .map_err(|e| format!("storage.postgres_url: {e}"))?,
        )
    };
    let creds = Credentials::new(&config.accounts, &config.api_keys);
    let public = server::bind(config.server.listen, config.server.backlog).map_err(|e| {
        format!(
            "cannot listen on {} (server.listen): {e}",
            config.server.listen
        )
    })?;
    let admin = server::bind(config.server.admin_listen, 128).map_err(|e| {
        format!(
            "cannot listen on {} (server.admin_listen): {e}",
            config.server.admin_listen
        )
    })?;
    let app = server::start(config, creds, store)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(
        listen = %public.local_addr().map_err(|e| e.to_string())?,
        admin = %admin.local_addr().map_err(|e| e.to_string())?,
        "reachd ready"
    );
    server::run(app, public, admin, shutdown_signal())
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("drained; bye");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT: draining"),
        _ = term => tracing::info!("SIGTERM: draining"),
    }
}
