//! `starling init`, `starling serve` and `starling token …`.

use crate::service::config::ServiceConfig;
use crate::service::server;
use crate::service::tokens::{TokenAuthority, TokenClaims, unix_now_s};
use crate::service::unix_ms;
use crate::store::Store;
use anyhow::Context;
use clap::{Args, Subcommand};
use starling_proto::ids::ClientId;
use std::path::PathBuf;

/// Options of `starling init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// Directory to write into (created if missing).
    #[arg(long)]
    pub dir: PathBuf,
    /// Names the server certificate is valid for (DNS names or IP addresses).
    #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    pub names: Vec<String>,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

/// Options of `starling serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The configuration file.
    #[arg(long, default_value = "starling.toml")]
    pub config: PathBuf,
    /// Log lines on standard error: `text` (for people) or `json` (one JSON object a line, with
    /// `timestamp`, `level`, `target` and the event's `fields`, for log collectors).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// How `starling serve` writes its log.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `starling token …`
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Issues an enrollment token for a client and prints it.
    Issue {
        /// The configuration file (for the store and the token secret).
        #[arg(long, default_value = "starling.toml")]
        config: PathBuf,
        /// The client id.
        #[arg(long)]
        client: u64,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
    /// Revokes one token, or every token of a client.
    Revoke {
        /// The configuration file.
        #[arg(long, default_value = "starling.toml")]
        config: PathBuf,
        /// The token id (printed by `issue` and `list`).
        #[arg(long, conflicts_with = "client", required_unless_present = "client")]
        token: Option<u64>,
        /// The client id.
        #[arg(long)]
        client: Option<u64>,
    },
    /// Lists issued tokens.
    List {
        /// The configuration file.
        #[arg(long, default_value = "starling.toml")]
        config: PathBuf,
    },
}

/// Runs `starling init`.
pub fn run_init(args: &InitArgs) -> anyhow::Result<()> {
    let names: Vec<&str> = args.names.iter().map(String::as_str).collect();
    let report = server::init(&args.dir, &names, args.force)?;
    println!("wrote {}", report.config.display());
    println!("CA certificate for clients: {}", report.ca_cert.display());
    println!("admin token: {}", report.admin_token.display());
    println!(
        "next: starling token issue --config {} --client <id>; starling serve --config {}",
        report.config.display(),
        report.config.display()
    );
    Ok(())
}

/// Runs `starling serve` until SIGINT or SIGTERM.
pub fn run_serve(args: &ServeArgs) -> anyhow::Result<()> {
    let config = ServiceConfig::load(&args.config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let running = server::start(&config).await?;
        // Tests and tooling read these lines (ports may be 0 in the file).
        println!("quic listening on {}", running.quic_addr);
        println!("admin listening on {}", running.admin_addr);
        tracing::info!(recv_buffer = running.recv_buffer_bytes, "UDP receive buffer granted");
        shutdown_signal().await;
        tracing::info!("shutting down");
        running.shutdown().await;
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// The service's store (SQLite or PostgreSQL, as `[storage]` says). Blocking: `starling token`
/// runs no async runtime.
fn open_store(config: &ServiceConfig) -> anyhow::Result<Store> {
    Ok(Store::open_config(&config.storage)?)
}

/// Runs `starling token …`.
pub fn run_token(cmd: &TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Issue { config, client, days } => {
            let config = ServiceConfig::load(config)?;
            let secret = std::fs::read_to_string(&config.server.token_secret_file)
                .with_context(|| format!("reading {}", config.server.token_secret_file.display()))?;
            let authority = TokenAuthority::from_secret_file_text(&secret)?;
            let mut store = open_store(&config)?;
            let expires = unix_now_s().saturating_add(days.saturating_mul(86_400));
            let token_id = store.record_token(ClientId(*client), expires, unix_ms())?;
            let token =
                authority.issue(TokenClaims { token_id, client: ClientId(*client), expires_unix_s: expires });
            eprintln!("token {token_id} for client {client}, expires at unix {expires}");
            println!("{token}");
        }
        TokenCommand::Revoke { config, token, client } => {
            let config = ServiceConfig::load(config)?;
            let mut store = open_store(&config)?;
            match (token, client) {
                (Some(t), _) => {
                    store.revoke_token(*t, unix_ms())?;
                    println!("revoked token {t}");
                }
                (None, Some(c)) => {
                    store.revoke_client(ClientId(*c), unix_ms())?;
                    println!("revoked client {c} (all its tokens)");
                }
                (None, None) => anyhow::bail!("give --token or --client"),
            }
        }
        TokenCommand::List { config } => {
            let config = ServiceConfig::load(config)?;
            let store = open_store(&config)?;
            println!("{:>8} {:>12} {:>12} revoked", "token", "client", "expires");
            for t in store.tokens()? {
                println!(
                    "{:>8} {:>12} {:>12} {}",
                    t.token_id,
                    t.client.0,
                    t.expires_unix_s,
                    t.revoked_ms.is_some()
                );
            }
        }
    }
    Ok(())
}
