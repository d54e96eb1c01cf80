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
