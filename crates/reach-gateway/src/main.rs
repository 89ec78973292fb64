//! `reachd`: read config, set up logs, build the app, serve until SIGTERM/SIGINT, drain.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use reach_gateway::auth::{Credentials, GeneratedCredentials, mint_token};
use reach_gateway::config::{Config, LogFormat};
use reach_gateway::{App, app};
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
        Command::Credentials => credentials(&config),
        Command::Token {
            identity,
            service,
            ttl,
            key,
        } => token(&config, &identity, &service, ttl, key),
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("reachd: {msg}");
    ExitCode::FAILURE
}

/// Accounts and keys from the config, or the generated ones (generated now if `generate`).
fn load_credentials(config: &Config, generate: bool) -> Result<Config, String> {
    let mut config = config.clone();
    if !config.accounts.is_empty() {
        return Ok(config);
    }
    let path = GeneratedCredentials::path(&config);
    let creds = match GeneratedCredentials::read(&path) {
        Ok(Some(c)) => c,
        Ok(None) if generate => {
            let c = GeneratedCredentials::generate(&path)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            println!(
                "No [[accounts]] configured: generated credentials, kept in {}",
                path.display()
            );
            print_credentials(&c);
            println!("`reachd credentials` prints them again.\n");
            c
        }
        Ok(None) => {
            return Err(format!(
                "no credentials: configure [[accounts]] and [[api_keys]], or start reachd once to generate them in {}",
                path.display()
            ));
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    config.accounts.push(creds.account);
    config.api_keys.push(creds.api_key);
    Ok(config)
}

fn print_credentials(c: &GeneratedCredentials) {
    println!("  Account SID:    {}", c.account.sid);
    println!("  Auth token:     {}", c.account.auth_token);
    println!("  API key SID:    {}", c.api_key.sid);
    println!("  API key secret: {}", c.api_key.secret);
}

fn credentials(config: &Config) -> ExitCode {
    if !config.accounts.is_empty() {
        return fail("accounts are configured in the config file; nothing was generated");
    }
    let path = GeneratedCredentials::path(config);
    match GeneratedCredentials::read(&path) {
        Ok(Some(c)) => {
            println!("Credentials in {}:", path.display());
            print_credentials(&c);
            ExitCode::SUCCESS
        }
        Ok(None) => fail(format!(
            "no generated credentials in {}: start reachd once",
            path.display()
        )),
        Err(e) => fail(format!("cannot read {}: {e}", path.display())),
    }
}

fn token(
    config: &Config,
    identity: &str,
    service: &str,
    ttl: i64,
    key: Option<String>,
) -> ExitCode {
    let config = match load_credentials(config, false) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if !(1..=reach_gateway::auth::MAX_TOKEN_LIFETIME_S).contains(&ttl) {
        return fail("--ttl must be between 1 and 86400 seconds");
    }
    if !(service.starts_with("IS") && reach_store::looks_like_sid(service)) {
        return fail("--service must be a service SID (IS followed by 32 lowercase hex digits)");
    }
    if identity.is_empty() {
        return fail("--identity must not be empty");
    }
    let api_key = match &key {
        Some(sid) => config.api_keys.iter().find(|k| &k.sid == sid),
        None => config.api_keys.first(),
    };
    let Some(api_key) = api_key else {
        return fail("no such API key: configure [[api_keys]]");
    };
    println!(
        "{}",
        mint_token(api_key, service, identity, ttl, reach_store::now_unix())
    );
    ExitCode::SUCCESS
}

fn init_logs(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.filter));
    // A failed write to stderr (a closed pipe) must not panic the task that logs it: that
    // would take the shutdown signal's task down before it starts the drain.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Pretty => builder.init(),
    }
}

fn run(config: Config) -> ExitCode {
    let config = match load_credentials(&config, true) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    init_logs(&config);
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
    let public = app::bind(config.server.listen, config.server.backlog).map_err(|e| {
        format!(
            "cannot listen on {} (server.listen): {e}",
            config.server.listen
        )
    })?;
    let admin = app::bind(config.server.admin_listen, 128).map_err(|e| {
        format!(
            "cannot listen on {} (server.admin_listen): {e}",
            config.server.admin_listen
        )
    })?;
    let app = App::new(config, creds, store)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(
        listen = %public.local_addr().map_err(|e| e.to_string())?,
        admin = %admin.local_addr().map_err(|e| e.to_string())?,
        "reachd ready"
    );
    app::run(app, public, admin, shutdown_signal())
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
