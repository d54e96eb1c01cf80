//! `starling privacy`: the accountant on the command line, and the coordinator's ledger.

use crate::privacy::DurableLedger;
use crate::store::Store;
use anyhow::Context;
use clap::{Args, Subcommand};
use starling_proto::dp::{AccountantKind, Budget, Delta, Epsilon, NoiseMultiplier, SamplingRate};
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
    /// The accountant: `pld` (privacy-loss distributions, tight) or `rdp` (Rényi DP, looser).
    #[arg(long, default_value_t = AccountantKind::Pld)]
    pub accountant: AccountantKind,
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
    /// The accountant: `pld` or `rdp`.
    #[arg(long, default_value_t = AccountantKind::Pld)]
    pub accountant: AccountantKind,
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
    /// The accountant composing the ledger's rounds: `pld` or `rdp`.
    #[arg(long, default_value_t = AccountantKind::Pld)]
    pub accountant: AccountantKind,
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
            let (eps, order) = a.accountant.epsilon(q, sigma, a.rounds, delta);
            if a.json {
                let out = serde_json::json!({
                    "epsilon": finite_or_null(eps), "best_order": order,
                    "accountant": a.accountant,
                    "q": a.q, "sigma": a.sigma, "rounds": a.rounds, "delta": a.delta,
                });
                println!("{out}");
            } else {
                println!(
                    "epsilon {} at delta {:e} ({}) for {} rounds at q = {}, sigma = {}",
                    fmt_eps(eps),
                    a.delta,
                    describe(a.accountant, order),
                    a.rounds,
                    a.q,
                    a.sigma
                );
            }
        }
        PrivacyCommand::Sigma(a) => {
            let (q, delta, target) =
                (SamplingRate::new(a.q)?, Delta::new(a.delta)?, Epsilon::new(a.epsilon)?);
            let sigma = a.accountant.calibrate_sigma(q, a.rounds, delta, target)?;
            let (eps, _) = a.accountant.epsilon(q, NoiseMultiplier::new(sigma)?, a.rounds, delta);
            if a.json {
                let out = serde_json::json!({
                    "sigma": sigma, "epsilon": eps, "target_epsilon": a.epsilon,
                    "accountant": a.accountant,
                    "q": a.q, "rounds": a.rounds, "delta": a.delta,
                });
                println!("{out}");
            } else {
                println!(
                    "sigma {sigma:.4} keeps {} rounds at q = {} within epsilon {} at delta {:e} (gives {eps:.4}; {})",
                    a.rounds,
                    a.q,
                    a.epsilon,
                    a.delta,
                    describe(a.accountant, None)
                );
            }
        }
        PrivacyCommand::Ledger(a) => {
            anyhow::ensure!(a.store.is_file(), "{} does not exist", a.store.display());
            let budget = Budget { epsilon: Epsilon::new(a.epsilon)?, delta: Delta::new(a.delta)? };
            let store = Store::open(&a.store).with_context(|| format!("opening {}", a.store.display()))?;
            let ledger = DurableLedger::open_with(&store, budget, a.accountant)?;
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
                    "best_order": status.best_order,
                    "accountant": status.accountant,
                    "epsilon_budget": status.epsilon_budget,
                    "delta": status.delta,
                    "rounds_left": left,
                });
                println!("{out}");
            } else {
                println!(
                    "{} releases; epsilon spent {} of {} at delta {:e} ({}){}",
                    status.releases,
                    fmt_eps(status.epsilon_spent),
                    status.epsilon_budget,
                    status.delta,
                    describe(status.accountant, status.best_order),
                    left.map(|l| format!("; {l} more rounds fit")).unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

/// "PLD accountant", or "RDP accountant, best order 7.80".
fn describe(kind: AccountantKind, order: Option<f64>) -> String {
    match (kind, order) {
        (AccountantKind::Rdp, Some(o)) => format!("RDP accountant, best order {o:.2}"),
        (k, _) => format!("{} accountant", k.name().to_uppercase()),
    }
}

fn fmt_eps(eps: f64) -> String {
    if eps.is_finite() { format!("{eps:.4}") } else { "infinite (no noise)".into() }
}

fn finite_or_null(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}
