//! The `starling` command-line tool. Each subcommand group lives in its own module under
//! `starling_coordinator::cli`.

use clap::{Parser, Subcommand};
use starling_coordinator::cli;

/// Starling: federated-learning personalization.
#[derive(Parser, Debug)]
#[command(name = "starling", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a simulated fleet end to end (the main job).
    Simulate(Box<cli::simulate::SimulateArgs>),
    /// Reference-workload tools (`export-eval`).
    #[command(subcommand)]
    Workload(cli::workload::WorkloadCommand),
    /// Train the centralized MF baseline and print HR@10/NDCG@10 per epoch and a JSON line.
    Baseline(Box<cli::workload::BaselineArgs>),
    /// Differential privacy: epsilon of a schedule, the sigma a budget needs, a coordinator's ledger.
    #[command(subcommand)]
    Privacy(cli::privacy::PrivacyCommand),
    /// Write a commented config, a local CA and server certificate, and secrets into a directory.
    Init(cli::serve::InitArgs),
    /// Run the coordinator service (QUIC + admin HTTP) from a config file.
    Serve(cli::serve::ServeArgs),
    /// Enrollment tokens: issue, revoke, list.
    #[command(subcommand)]
    Token(cli::serve::TokenCommand),
    /// Operate a running coordinator: pause, resume, start a round, roll back, export the model,
    /// reload revocations, drain, read the audit trail.
    Admin(cli::admin::AdminArgs),
    /// Print the protocol and build versions.
    Version,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate(args) => cli::simulate::run(&args)?,
        Command::Workload(cmd) => cli::workload::run_workload(&cmd)?,
        Command::Baseline(args) => cli::workload::run_baseline(&args)?,
        Command::Privacy(cmd) => cli::privacy::run(&cmd)?,
        Command::Init(args) => cli::serve::run_init(&args)?,
        Command::Serve(args) => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let logs = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(false);
            match args.log_format {
                cli::serve::LogFormat::Text => logs.init(),
                cli::serve::LogFormat::Json => logs.json().with_current_span(false).init(),
            }
            cli::serve::run_serve(&args)?
        }
        Command::Token(cmd) => cli::serve::run_token(&cmd)?,
        Command::Admin(args) => cli::admin::run(&args)?,
        Command::Version => {
            println!(
                "starling {} (protocol versions {}..={})",
                env!("CARGO_PKG_VERSION"),
                starling_proto::codec::MIN_PROTOCOL_VERSION,
                starling_proto::codec::PROTOCOL_VERSION
            );
        }
    }
    Ok(())
}
