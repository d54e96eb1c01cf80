//! `starling privacy`: the accountant on the command line, and the coordinator's ledger.

use crate::privacy::DurableLedger;
use crate::store::Store;
use anyhow::Context;
use clap::{Args, Subcommand};
use starling_proto::dp::{Budget, Delta, Epsilon, NoiseMultiplier, SamplingRate, calibrate_sigma, epsilon};
use std::path::PathBuf;

/// `starling privacy …`
#[derive(Subcommand, Debug)]
pub enum PrivacyCommand {
    /// ε of T rounds of the Poisson-subsampled Gaussian mechanism (user-level DP-FedAvg).
    Epsilon(EpsilonArgs),
    /// The smallest noise multiplier σ that keeps T rounds within ε.
    Sigma(SigmaArgs),
    /// ε spent so far by a coordinator, from its store, and the rounds left in the budget.
    Ledger(LedgerArgs),
}

/// Options of `starling privacy epsilon`.
#[derive(Args, Debug)]
pub struct EpsilonArgs {
    /// Sampling rate q: the probability that one user takes part in a round (0 < q ≤ 1).
    #[arg(long)]
    pub q: f64,
    /// Noise multiplier σ: noise standard deviation over the clip norm.
    #[arg(long)]
    pub sigma: f64,
    /// Rounds.
    #[arg(long)]
    pub rounds: u64,
    /// δ (0 < δ < 1); pick it well below 1 / (number of users).
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Options of `starling privacy sigma`.
#[derive(Args, Debug)]
pub struct SigmaArgs {
    /// Sampling rate q.
    #[arg(long)]
    pub q: f64,
    /// Rounds.
    #[arg(long)]
    pub rounds: u64,
    /// δ.
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    /// The ε to stay within.
    #[arg(long)]
    pub epsilon: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Options of `starling privacy ledger`.
#[derive(Args, Debug)]
pub struct LedgerArgs {
    /// The coordinator's store (an existing file; it is never created by this command).
    #[arg(long)]
    pub store: PathBuf,
    /// The ε budget.
    #[arg(long)]
    pub epsilon: f64,
    /// The δ of the budget.
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    /// With `--sigma`: report how many more rounds of this q fit.
    #[arg(long, requires = "sigma")]
    pub q: Option<f64>,
    /// With `--q`: report how many more rounds of this σ fit.
    #[arg(long, requires = "q")]
    pub sigma: Option<f64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `starling privacy …`.
pub fn run(cmd: &PrivacyCommand) -> anyhow::Result<()> {
    match cmd {
        PrivacyCommand::Epsilon(a) => {
            let (q, sigma, delta) =
                (SamplingRate::new(a.q)?, NoiseMultiplier::new(a.sigma)?, Delta::new(a.delta)?);
            let (eps, order) = epsilon(q, sigma, a.rounds, delta);
            if a.json {
                let out = serde_json::json!({
                    "epsilon": finite_or_null(eps), "best_order": finite_or_null(order),
                    "q": a.q, "sigma": a.sigma, "rounds": a.rounds, "delta": a.delta,
                });
                println!("{out}");
            } else {
                println!(
                    "epsilon {} at delta {:e} (best RDP order {}) for {} rounds at q = {}, sigma = {}",
                    fmt_eps(eps),
                    a.delta,
                    if order.is_finite() { format!("{order:.2}") } else { "-".into() },
                    a.rounds,
                    a.q,
                    a.sigma
                );
            }
        }
        PrivacyCommand::Sigma(a) => {
            let (q, delta, target) =
                (SamplingRate::new(a.q)?, Delta::new(a.delta)?, Epsilon::new(a.epsilon)?);
            let sigma = calibrate_sigma(q, a.rounds, delta, target)?;
            let (eps, _) = epsilon(q, NoiseMultiplier::new(sigma)?, a.rounds, delta);
            if a.json {
                let out = serde_json::json!({
                    "sigma": sigma, "epsilon": eps, "target_epsilon": a.epsilon,
                    "q": a.q, "rounds": a.rounds, "delta": a.delta,
                });
                println!("{out}");
            } else {
                println!(
                    "sigma {sigma:.4} keeps {} rounds at q = {} within epsilon {} at delta {:e} (gives {eps:.4})",
                    a.rounds, a.q, a.epsilon, a.delta
                );
            }
        }
        PrivacyCommand::Ledger(a) => {
            anyhow::ensure!(a.store.is_file(), "{} does not exist", a.store.display());
            let budget = Budget { epsilon: Epsilon::new(a.epsilon)?, delta: Delta::new(a.delta)? };
            let store = Store::open(&a.store).with_context(|| format!("opening {}", a.store.display()))?;
            let ledger = DurableLedger::open(&store, budget)?;
            let status = ledger.status();
            let left = match (a.q, a.sigma) {
                (Some(q), Some(s)) => {
                    Some(ledger.rounds_left(SamplingRate::new(q)?, NoiseMultiplier::new(s)?))
                }
                _ => None,
            };
            if a.json {
                let out = serde_json::json!({
                    "releases": status.releases,
                    "epsilon_spent": finite_or_null(status.epsilon_spent),
                    "best_order": finite_or_null(status.best_order),
                    "epsilon_budget": status.epsilon_budget,
                    "delta": status.delta,
                    "rounds_left": left,
                });
                println!("{out}");
            } else {
                println!(
                    "{} releases; epsilon spent {} of {} at delta {:e}{}",
                    status.releases,
                    fmt_eps(status.epsilon_spent),
                    status.epsilon_budget,
                    status.delta,
                    left.map(|l| format!("; {l} more rounds fit")).unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

fn fmt_eps(eps: f64) -> String {
    if eps.is_finite() { format!("{eps:.4}") } else { "infinite (no noise)".into() }
}

fn finite_or_null(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}
