//! The `reachd` subcommands besides running the gateway: `credentials` (print the generated
//! account and API key), `token` (mint an access token for trying things out) and `probe`
//! (ask a running node whether it is ready: a health check without curl), and the credentials
//! that `run` uses (configured, or generated on the first start).

use std::process::ExitCode;

use reach_proto::ServiceSid;

use crate::auth::{GeneratedCredentials, mint_token};
use crate::config::Config;

/// Prints `reachd: <msg>` on stderr; exit status 1.
pub fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("reachd: {msg}");
    ExitCode::FAILURE
}

/// The config with its accounts and keys: the configured ones, else the generated ones
/// (generated now, and printed, if `generate` and there are none yet).
pub fn with_credentials(config: &Config, generate: bool) -> Result<Config, String> {
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

/// `reachd credentials`.
pub fn credentials(config: &Config) -> ExitCode {
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

/// `reachd token --identity ID --service IS… [--ttl S] [--key SK…]`.
pub fn token(
    config: &Config,
    identity: &str,
    service: &str,
    ttl: i64,
    key: Option<String>,
) -> ExitCode {
    let config = match with_credentials(config, false) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let max = reach_proto::token::MAX_LIFETIME_S;
    if !(1..=max).contains(&ttl) {
        return fail(format!("--ttl must be between 1 and {max} seconds"));
    }
    let Ok(service) = ServiceSid::parse(service) else {
        return fail(format!(
            "--service must be a service SID ({})",
            reach_proto::SidKind::Service.expected()
        ));
    };
    if identity.is_empty() {
        return fail("--identity must not be empty");
    }
    let api_key = match &key {
        Some(sid) => config.api_keys.iter().find(|k| k.sid == *sid),
        None => config.api_keys.first(),
    };
    let Some(api_key) = api_key else {
        return fail("no such API key: configure [[api_keys]]");
    };
    println!(
        "{}",
        mint_token(api_key, &service, identity, ttl, reach_proto::now_unix())
    );
    ExitCode::SUCCESS
}

/// `reachd probe`: asks this node's admin listener (`server.admin_listen`, on loopback when it
/// listens on every address) for `/readyz` (or `/healthz` with `live`), within 2 s. Exit status
/// 0 when it answers 200, 1 otherwise: a container health check or a probe that needs no curl.
pub fn probe(config: &Config, live: bool) -> ExitCode {
    let mut addr = config.server.admin_listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let path = if live { "healthz" } else { "readyz" };
    let url = format!("http://{addr}/{path}");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let answer = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(2))
            .no_proxy()
            .build()?;
        let response = client.get(&url).send().await?;
        Ok::<_, reqwest::Error>(response.status())
    });
    match answer {
        Ok(status) if status.is_success() => {
            println!("{url}: {status}");
            ExitCode::SUCCESS
        }
        Ok(status) => fail(format!("{url}: {status}")),
        Err(e) => fail(format!("{url}: {e}")),
    }
}
