//! The privacy ledger as pure state: the recorded releases, the budget, and the guard that
//! refuses a release beyond it. Persistence (append + fsync before the model is released, replay
//! on restart) is the host's job; the coordinator's file ledger replays into this type.
//!
//! Every figure the ledger gives (`spent`, `projected`, `check`, `rounds_left`, `status`) is the
//! composition of all its entries by one accountant, PLD unless chosen otherwise
//! ([`PrivacyLedger::with_accountant`]).

use super::accountant::Mechanism;
use super::kind::{Accountant, AccountantKind};
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
    /// The RDP order giving that ε (`None` under the PLD accountant, which has no orders).
    #[serde(default)]
    pub best_order: Option<f64>,
    /// The budget's ε.
    pub epsilon_budget: f64,
    /// The budget's δ.
    pub delta: f64,
    /// The accountant that computed `epsilon_spent` (statuses written before the choice existed
    /// were RDP's).
    #[serde(default = "legacy_accountant")]
    pub accountant: AccountantKind,
}

fn legacy_accountant() -> AccountantKind {
    AccountantKind::Rdp
}

/// The ledger: entries, the accountant composing them, and the budget.
#[derive(Clone, Debug, PartialEq)]
pub struct PrivacyLedger {
    budget: Budget,
    entries: Vec<LedgerEntry>,
    accountant: Accountant,
}

impl PrivacyLedger {
    /// An empty ledger with `budget`, accounted by PLD.
    pub fn new(budget: Budget) -> Self {
        Self::with_accountant(budget, AccountantKind::default())
    }

    /// An empty ledger with `budget`, accounted by `kind`.
    pub fn with_accountant(budget: Budget, kind: AccountantKind) -> Self {
        Self { budget, entries: Vec::new(), accountant: Accountant::new(kind) }
    }

    /// A ledger replaying `entries` (e.g. read back from disk after a restart), accounted by PLD.
    /// Entries beyond the budget are kept: what was spent was spent.
    pub fn replay(budget: Budget, entries: impl IntoIterator<Item = LedgerEntry>) -> Self {
        Self::replay_with(budget, AccountantKind::default(), entries)
    }

    /// [`replay`](Self::replay) with the accountant `kind`.
    pub fn replay_with(
        budget: Budget,
        kind: AccountantKind,
        entries: impl IntoIterator<Item = LedgerEntry>,
    ) -> Self {
        let mut l = Self::with_accountant(budget, kind);
        for e in entries {
            l.record(e);
        }
        l
    }

    /// The accountant's kind.
    pub fn accountant(&self) -> AccountantKind {
        self.accountant.kind()
    }

    /// ε of the entries at the budget's δ under another accountant (e.g. RDP beside PLD in a
    /// report); entries of the same `(q, σ)` are composed as one mechanism.
    pub fn spent_by(&self, kind: AccountantKind) -> f64 {
        if kind == self.accountant() {
            return self.spent();
        }
        let mut groups: Vec<Mechanism> = Vec::new();
        for e in &self.entries {
            let m = e.mechanism;
            match groups.iter_mut().find(|g| g.q == m.q && g.sigma == m.sigma) {
                Some(g) => g.steps = g.steps.saturating_add(m.steps),
                None => groups.push(m),
            }
        }
        let mut acc = Accountant::new(kind);
        for g in &groups {
            acc.compose(g);
        }
        acc.epsilon(self.budget.delta).0
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
            accountant: self.accountant(),
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

    fn m(q: f64, s: f64, steps: u64) -> Mechanism {
        Mechanism { q: SamplingRate::new(q).unwrap(), sigma: NoiseMultiplier::new(s).unwrap(), steps }
    }

    fn entries(ms: &[Mechanism]) -> Vec<LedgerEntry> {
        ms.iter().enumerate().map(|(i, &mechanism)| LedgerEntry { round: i as u64 + 1, mechanism }).collect()
    }

    #[test]
    fn pld_is_the_default_and_the_status_names_it() {
        let l = PrivacyLedger::replay(budget(8.0), entries(&[m(0.01, 1.1, 1000)]));
        assert_eq!(l.accountant(), AccountantKind::Pld);
        let s = l.status();
        assert_eq!((s.accountant, s.best_order), (AccountantKind::Pld, None));
        let r = PrivacyLedger::replay_with(budget(8.0), AccountantKind::Rdp, l.entries().to_vec());
        let rs = r.status();
        assert_eq!(rs.accountant, AccountantKind::Rdp);
        assert!(rs.best_order.is_some_and(|o| o > 1.0));
        assert!(s.epsilon_spent < rs.epsilon_spent, "{s:?} {rs:?}");
        assert_eq!(l.spent_by(AccountantKind::Rdp), r.spent());
        assert_eq!(r.spent_by(AccountantKind::Pld), l.spent());
        // More rounds fit under the tighter accountant.
        let q = SamplingRate::new(0.01).unwrap();
        let s11 = NoiseMultiplier::new(1.1).unwrap();
        assert!(l.rounds_left(q, s11) > r.rounds_left(q, s11));
        let json = serde_json::to_value(s).unwrap();
        assert_eq!((json["accountant"].as_str(), json["best_order"].is_null()), (Some("pld"), true));
        // A status written before the accountant was recorded reads back as RDP's.
        let old = r#"{"releases":3,"epsilon_spent":1.5,"best_order":7.8,"epsilon_budget":8.0,"delta":1e-5}"#;
        let old: LedgerStatus = serde_json::from_str(old).unwrap();
        assert_eq!((old.accountant, old.best_order), (AccountantKind::Rdp, Some(7.8)));
    }

    /// The ledger never under-counts: over a grid of settings its PLD figure is at most RDP's and
    /// at least the exact ε of the Gaussian mechanism (q = 1, where it is known in closed form).
    #[test]
    fn pld_ledger_lies_between_the_exact_gaussian_and_rdp() {
        for delta in [1e-5, 1e-8] {
            let b = Budget { epsilon: Epsilon::new(100.0).unwrap(), delta: Delta::new(delta).unwrap() };
            for q in [1e-3, 0.05, 1.0] {
                for sigma in [0.9, 2.0, 6.0] {
                    for t in [1u64, 50, 2000] {
                        let es = entries(&[m(q, sigma, t)]);
                        let pld = PrivacyLedger::replay(b, es.clone()).spent();
                        let rdp = PrivacyLedger::replay_with(b, AccountantKind::Rdp, es).spent();
                        let at = format!("q {q} σ {sigma} T {t} δ {delta}: pld {pld} rdp {rdp}");
                        assert!(pld <= rdp, "{at}");
                        if q == 1.0 {
                            let mu = (t as f64).sqrt() / sigma;
                            let exact = crate::dp::pld::gaussian_epsilon(mu, b.delta);
                            assert!(pld >= exact && pld <= exact * 1.01 + 1e-4, "{at}, exact {exact}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn mixed_ledgers_compose_in_any_order_below_rdp() {
        let (a, b) = (m(0.02, 1.0, 1), m(0.005, 0.8, 1));
        let ab: Vec<Mechanism> = (0..300).map(|i| if i % 3 == 0 { b } else { a }).collect();
        let ba: Vec<Mechanism> = ab.iter().rev().copied().collect();
        let x = PrivacyLedger::replay(budget(100.0), entries(&ab));
        let y = PrivacyLedger::replay(budget(100.0), entries(&ba));
        assert!((x.spent() - y.spent()).abs() <= 1e-9 * x.spent());
        // Grouped by (q, σ): 200 rounds of one and 100 of the other, however they interleave.
        let grouped = PrivacyLedger::replay(budget(100.0), entries(&[m(0.02, 1.0, 200), m(0.005, 0.8, 100)]));
        assert!((x.spent() - grouped.spent()).abs() <= 1e-9 * x.spent());
        assert!(x.spent() < x.spent_by(AccountantKind::Rdp));
        // The projection of one more round is what recording it gives.
        let projected = x.projected(&a);
        let mut z = x.clone();
        z.record(LedgerEntry { round: 301, mechanism: a });
        assert_eq!(projected, z.spent());
    }
}
