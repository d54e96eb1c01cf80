//! The coordinator's side of differential privacy: the durable ledger.
//!
//! - [`DurableLedger`]: the in-memory [`PrivacyLedger`] replayed from the [`Store`] at start-up;
//!   [`DurableLedger::record`] writes and fsyncs a round's entry before it updates memory, and
//!   the host releases the round's model only after `record` returned.
//! - [`OpenDpGaussian`]: opendp's discrete Gaussian, re-exported from `starling_proto::dp::opendp`
//!   (it moved there so that devices can use it for local DP). `starling serve` adds central DP's
//!   once-per-round noise with it (`privacy.noise_sampler`, on a 2⁻²⁰ grid by default); only the
//!   simulator may use the seeded fast sampler. `docs/privacy.md` explains the choice.

use crate::store::{Store, StoreError};
use starling_proto::dp::ledger::{BudgetError, LedgerStatus};
use starling_proto::dp::{
    AccountantKind, Budget, LedgerEntry, Mechanism, NoiseMultiplier, PrivacyLedger, SamplingRate,
};

pub use starling_proto::dp::opendp::OpenDpGaussian;

/// The privacy ledger, durable: every entry is on disk before the round's model is released.
#[derive(Debug)]
pub struct DurableLedger {
    ledger: PrivacyLedger,
}

/// Why a ledger operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The store failed; the entry is not durable and the model must not be released.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The release does not fit in the budget.
    #[error(transparent)]
    Budget(#[from] BudgetError),
}

impl DurableLedger {
    /// Replays the entries in `store` under `budget`, accounted by PLD. What was spent stays
    /// spent, even if it is already beyond a (since lowered) budget.
    pub fn open(store: &Store, budget: Budget) -> Result<Self, LedgerError> {
        Self::open_with(store, budget, AccountantKind::default())
    }

    /// [`open`](Self::open) with the accountant `kind`.
    pub fn open_with(store: &Store, budget: Budget, kind: AccountantKind) -> Result<Self, LedgerError> {
        Ok(Self { ledger: PrivacyLedger::replay_with(budget, kind, store.ledger_entries()?) })
    }

    /// The in-memory ledger (to seed the round engine's DP strategy, or to report).
    pub fn ledger(&self) -> &PrivacyLedger {
        &self.ledger
    }

    /// ε spent, releases and budget.
    pub fn status(&self) -> LedgerStatus {
        self.ledger.status()
    }

    /// `Ok(projected ε)` when one more release of `m` fits in the budget.
    pub fn check(&self, m: &Mechanism) -> Result<f64, BudgetError> {
        self.ledger.check(m)
    }

    /// Records a release: durable first (committed and fsynced), then in memory.
    pub fn record(&mut self, store: &mut Store, entry: LedgerEntry, now_ms: i64) -> Result<(), LedgerError> {
        store.append_ledger(&entry, now_ms)?;
        self.ledger.record(entry);
        Ok(())
    }

    /// How many more rounds of `(q, σ)` fit in the budget.
    pub fn rounds_left(&self, q: SamplingRate, sigma: NoiseMultiplier) -> u64 {
        self.ledger.rounds_left(q, sigma)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_proto::dp::{Delta, Epsilon};

    #[test]
    fn durable_ledger_replays_and_refuses_beyond_budget() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let budget = Budget { epsilon: Epsilon::new(1.0).unwrap(), delta: Delta::new(1e-5).unwrap() };
        // At q = 0.05, σ = 2 one round costs ε ≈ 0.34 and twenty ≈ 0.60: some dozens fit in ε = 1.
        let m = Mechanism {
            q: SamplingRate::new(0.05).unwrap(),
            sigma: NoiseMultiplier::new(2.0).unwrap(),
            steps: 1,
        };
        let allowed;
        {
            let mut store = Store::open(&path).unwrap();
            let mut l = DurableLedger::open(&store, budget).unwrap();
            allowed = l.rounds_left(m.q, m.sigma);
            assert!(allowed >= 2, "{allowed}");
            for r in 1..=allowed {
                l.check(&m).unwrap();
                l.record(&mut store, LedgerEntry { round: r, mechanism: m }, 0).unwrap();
            }
            assert!(l.check(&m).is_err());
        }
        let store = Store::open(&path).unwrap();
        let l = DurableLedger::open(&store, budget).unwrap();
        assert_eq!(l.status().releases as u64, allowed);
        assert!(l.status().epsilon_spent <= 1.0);
        assert!(matches!(l.check(&m), Err(BudgetError::Exceeded { .. })));
        assert_eq!(l.rounds_left(m.q, m.sigma), 0);
    }
}
