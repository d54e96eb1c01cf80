//! The privacy ledger as pure state: the recorded releases, the budget, and the guard that
//! refuses a release beyond it. Persistence (append + fsync before the model is released, replay
//! on restart) is the host's job; the coordinator's file ledger replays into this type.

use super::accountant::{Mechanism, RdpAccountant};
use super::params::{Budget, NoiseMultiplier, SamplingRate};
use serde::{Deserialize, Serialize};

/// One recorded release.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The round that released it.
    pub round: u64,
    /// The mechanism.
    pub mechanism: Mechanism,
}

/// Why a release was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BudgetError {
    /// The release would take ε beyond the budget.
    #[error(
        "privacy budget exceeded: epsilon would reach {projected:.4} > budget {budget:.4} (delta {delta:e})"
    )]
    Exceeded {
        /// ε after the release.
        projected: f64,
        /// The budget.
        budget: f64,
        /// δ.
        delta: f64,
    },
}

/// Spent and remaining budget.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LedgerStatus {
    /// Releases recorded.
    pub releases: usize,
    /// ε spent at the budget's δ.
    pub epsilon_spent: f64,
    /// The RDP order giving that ε.
    pub best_order: f64,
    /// The budget's ε.
    pub epsilon_budget: f64,
    /// The budget's δ.
    pub delta: f64,
}

/// The ledger: entries, their composed RDP, and the budget.
#[derive(Clone, Debug, PartialEq)]
pub struct PrivacyLedger {
    budget: Budget,
    entries: Vec<LedgerEntry>,
    accountant: RdpAccountant,
}

impl PrivacyLedger {
    /// An empty ledger with `budget`.
    pub fn new(budget: Budget) -> Self {
        Self { budget, entries: Vec::new(), accountant: RdpAccountant::default() }
    }

    /// A ledger replaying `entries` (e.g. read back from disk after a restart). Entries beyond
    /// the budget are kept: what was spent was spent.
    pub fn replay(budget: Budget, entries: impl IntoIterator<Item = LedgerEntry>) -> Self {
        let mut l = Self::new(budget);
        for e in entries {
            l.accountant.compose(&e.mechanism);
            l.entries.push(e);
        }
        l
    }

    /// The budget.
    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> &[LedgerEntry] {
        &self.entries
    }

    /// ε spent so far at the budget's δ.
    pub fn spent(&self) -> f64 {
        self.accountant.epsilon(self.budget.delta).0
    }

    /// ε after `m`, were it recorded.
    pub fn projected(&self, m: &Mechanism) -> f64 {
        self.accountant.epsilon_with(m, self.budget.delta)
    }

    /// `Ok(projected ε)` if `m` fits in the budget, else the refusal.
    pub fn check(&self, m: &Mechanism) -> Result<f64, BudgetError> {
        let projected = self.projected(m);
        if projected > self.budget.epsilon.get() {
            return Err(BudgetError::Exceeded {
                projected,
                budget: self.budget.epsilon.get(),
                delta: self.budget.delta.get(),
            });
        }
        Ok(projected)
    }

    /// Records a release that [`check`](Self::check) admitted (or that happened anyway).
    pub fn record(&mut self, entry: LedgerEntry) {
        self.accountant.compose(&entry.mechanism);
        self.entries.push(entry);
    }

    /// How many more releases of `(q, σ)` fit in the budget.
    pub fn rounds_left(&self, q: SamplingRate, sigma: NoiseMultiplier) -> u64 {
        let fits =
            |n: u64| n == 0 || self.projected(&Mechanism { q, sigma, steps: n }) <= self.budget.epsilon.get();
        if !fits(1) {
            return 0;
        }
        let mut hi = 1u64;
        while fits(hi * 2) && hi < (1 << 40) {
            hi *= 2;
        }
        let mut lo = hi;
        hi *= 2;
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// A summary for reports and status pages.
    pub fn status(&self) -> LedgerStatus {
        let (eps, order) = self.accountant.epsilon(self.budget.delta);
        LedgerStatus {
            releases: self.entries.len(),
            epsilon_spent: eps,
            best_order: order,
            epsilon_budget: self.budget.epsilon.get(),
            delta: self.budget.delta.get(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dp::params::{Delta, Epsilon};

    fn budget(e: f64) -> Budget {
        Budget { epsilon: Epsilon::new(e).unwrap(), delta: Delta::new(1e-5).unwrap() }
    }

    fn mech() -> Mechanism {
        Mechanism { q: SamplingRate::new(0.1).unwrap(), sigma: NoiseMultiplier::new(1.5).unwrap(), steps: 1 }
    }

    #[test]
    fn refuses_beyond_budget_and_counts_rounds_left() {
        let mut l = PrivacyLedger::new(budget(3.0));
        let left = l.rounds_left(mech().q, mech().sigma);
        assert!(left > 5, "{left}");
        for r in 0..left {
            l.check(&mech()).unwrap();
            l.record(LedgerEntry { round: r, mechanism: mech() });
        }
        assert!(l.spent() <= 3.0);
        assert!(matches!(l.check(&mech()), Err(BudgetError::Exceeded { .. })));
        assert_eq!(l.rounds_left(mech().q, mech().sigma), 0);
        let replayed = PrivacyLedger::replay(budget(3.0), l.entries().to_vec());
        assert_eq!(replayed.spent(), l.spent());
        assert_eq!(replayed.status().releases as u64, left);
    }
}
