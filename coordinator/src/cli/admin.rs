//! `starling admin`: the control plane from the command line. It reads the admin address and
//! token from the service's configuration (or `--url` and `--token-file`) and calls the
//! endpoints of `service::control`; every action is written to the service's audit table with
//! the operator name sent in `X-Starling-Operator` (`--operator`, default `$USER`).

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use std::io::Read;
use std::path::PathBuf;

use crate::service::config::ServiceConfig;

/// Options of `starling admin`.
#[derive(Args, Debug)]
pub struct AdminArgs {
    /// The service's configuration file (for the admin address and token).
    #[arg(long, default_value = "starling.toml")]
    pub config: PathBuf,
    /// The admin endpoint, e.g. `http://127.0.0.1:9464` (default: from the configuration).
    #[arg(long)]
    pub url: Option<String>,
    /// A file holding the admin token (default: from the configuration).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The CA certificate (PEM) to trust for an admin endpoint over TLS (default, when the
    /// configuration has `admin_tls = true`: `tls/ca.pem` beside it).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// The name recorded in the audit trail (claimed, not authenticated; default `$USER`).
    #[arg(long)]
    pub operator: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// `starling admin` actions.
#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Print `/status`.
    Status,
    /// Stop starting rounds by schedule (a running round finishes); survives restarts.
    Pause,
    /// Resume the schedule.
    Resume,
    /// Start a round now (also while paused).
    StartRound,
    /// Serve an earlier checkpoint again, as the next model version (between rounds).
    Rollback {
        /// The checkpoint's version.
        #[arg(long)]
        version: u64,
    },
    /// Reload token revocations now and close connections whose credential is no longer valid.
    Reload,
    /// Refuse new connections and start no round; stop the process once the round ended.
    Drain,
    /// Export a checkpoint (the newest by default) to a file.
    Export {
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
        /// The checkpoint's version (default: the newest).
        #[arg(long)]
        version: Option<u64>,
        /// `bin` (default; see docs/operations.md) or `json`.
        #[arg(long, default_value = "bin")]
        format: String,
    },
    /// Print the newest audit rows.
    Audit {
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Print the newest rounds with their figures, and the evaluations.
    History {
        /// How many rounds.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

/// Runs `starling admin`.
pub fn run(args: &AdminArgs) -> anyhow::Result<()> {
    let (base, token, ca) = endpoint(args)?;
    let operator = args.operator.clone().or_else(|| std::env::var("USER").ok()).unwrap_or_default();
    let mut config = ureq::Agent::config_builder().http_status_as_error(false);
    if let Some(ca) = ca {
        let pem = std::fs::read(&ca).with_context(|| format!("reading {}", ca.display()))?;
        let certs = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing {}", ca.display()))?;
        if certs.is_empty() {
            bail!("{} holds no certificate", ca.display());
        }
        // Only this CA: not the public web's roots.
        config = config.tls_config(
            ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::Specific(certs.into())).build(),
        );
    }
    let agent: ureq::Agent = config.build().into();
    let call = |method: &str, path: &str| -> anyhow::Result<(u16, Vec<u8>)> {
        let url = format!("{base}{path}");
        let auth = format!("Bearer {token}");
        let response = match method {
            "POST" => agent
                .post(&url)
                .header("Authorization", &auth)
                .header("X-Starling-Operator", &operator)
                .send_empty(),
            _ => {
                agent.get(&url).header("Authorization", &auth).header("X-Starling-Operator", &operator).call()
            }
        }
        .with_context(|| format!("calling {url}"))?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        response.into_body().into_reader().read_to_end(&mut body).context("reading the answer")?;
        Ok((status, body))
    };
    let (method, path) = match &args.command {
        AdminCommand::Status => ("GET", "/status".to_owned()),
        AdminCommand::Pause => ("POST", "/admin/pause".to_owned()),
        AdminCommand::Resume => ("POST", "/admin/resume".to_owned()),
        AdminCommand::StartRound => ("POST", "/admin/round".to_owned()),
        AdminCommand::Rollback { version } => ("POST", format!("/admin/rollback?version={version}")),
        AdminCommand::Reload => ("POST", "/admin/reload".to_owned()),
        AdminCommand::Drain => ("POST", "/admin/drain".to_owned()),
        AdminCommand::Export { version, format, .. } => {
            let v = version.map(|v| format!("&version={v}")).unwrap_or_default();
            ("GET", format!("/admin/model?format={format}{v}"))
        }
        AdminCommand::Audit { limit } => ("GET", format!("/admin/audit?limit={limit}")),
        AdminCommand::History { limit } => ("GET", format!("/history?limit={limit}")),
    };
    let (status, body) = call(method, &path)?;
    if !(200..300).contains(&status) {
        bail!("{status}: {}", String::from_utf8_lossy(&body).trim());
    }
    if let AdminCommand::Export { out, .. } = &args.command {
        std::fs::write(out, &body).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {} ({} bytes)", out.display(), body.len());
        return Ok(());
    }
    println!("{}", String::from_utf8_lossy(&body).trim());
    Ok(())
}

fn endpoint(args: &AdminArgs) -> anyhow::Result<(String, String, Option<PathBuf>)> {
    let config = if args.url.is_none() || args.token_file.is_none() {
        Some(
            ServiceConfig::load(&args.config)
                .with_context(|| format!("reading {}", args.config.display()))?,
        )
    } else {
        None
    };
    let tls = config.as_ref().is_some_and(|c| c.server.admin_tls);
    let base = match (&args.url, &config) {
        (Some(u), _) => u.trim_end_matches('/').to_owned(),
        (None, Some(c)) => format!("{}://{}", if tls { "https" } else { "http" }, c.server.admin_listen),
        (None, None) => unreachable!("the configuration is read when --url is missing"),
    };
    let token_file = match (&args.token_file, &config) {
        (Some(f), _) => f.clone(),
        (None, Some(c)) => c.server.admin_token_file.clone(),
        (None, None) => unreachable!("the configuration is read when --token-file is missing"),
    };
    let token =
        std::fs::read_to_string(&token_file).with_context(|| format!("reading {}", token_file.display()))?;
    let ca = args.ca.clone().or_else(|| {
        tls.then(|| args.config.parent().unwrap_or(std::path::Path::new(".")).join("tls/ca.pem"))
    });
    Ok((base, token.trim().to_owned(), ca))
}
