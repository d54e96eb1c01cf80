//! The coordinator's side of differential privacy: the durable ledger and opendp's exact sampler.
//!
//! - [`DurableLedger`]: the in-memory [`PrivacyLedger`] replayed from the [`Store`] at start-up;
//!   [`DurableLedger::record`] writes and fsyncs a round's entry before it updates memory, and
//!   the host releases the round's model only after `record` returned.
//! - [`OpenDpGaussian`]: opendp's discrete Gaussian as a [`GaussianSampler`] — exact (no
//!   floating-point leakage) but about 25 k values/s (≈240 k/s on a 2⁻²⁰ grid), so it suits the
//!   coordinator's once-per-round noise on small models. The fast sampler in `starling-proto` is
//!   the default; `docs/privacy.md` explains the choice.

use crate::store::{Store, StoreError};
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::L2Distance;
use starling_proto::dp::ledger::{BudgetError, LedgerStatus};
use starling_proto::dp::noise::{GaussianSampler, NoiseError, check_std};
use starling_proto::dp::{
    AccountantKind, Budget, LedgerEntry, Mechanism, NoiseMultiplier, PrivacyLedger, SamplingRate,
};

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

/// opendp's discrete Gaussian mechanism as a noise sampler.
///
/// `k = None` samples exactly at the finest granularity (2⁻¹⁰⁷⁴); `Some(k)` rounds the input to
/// multiples of 2ᵏ first, which is ten times faster and adds the rounding to the sensitivity
/// (see [`GaussianSampler::sensitivity_inflation`]; at `k = -20` on a million values it is a
/// factor of about 1.0003). opendp draws from its own entropy source, not the caller's RNG, so
/// runs with this sampler cannot be replayed from a seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenDpGaussian {
    /// Noise granularity 2ᵏ (`None` = exact).
    pub k: Option<i32>,
}

impl OpenDpGaussian {
    /// The exact sampler.
    pub fn exact() -> Self {
        Self { k: None }
    }

    /// The sampler on a 2ᵏ grid.
    pub fn with_granularity(k: i32) -> Self {
        Self { k: Some(k) }
    }

    fn domain(&self, len: usize) -> VectorDomain<AtomDomain<f64>> {
        let d = VectorDomain::new(AtomDomain::<f64>::new_non_nan());
        if self.k.is_some() { d.with_size(len) } else { d }
    }
}

impl GaussianSampler for OpenDpGaussian {
    fn name(&self) -> &'static str {
        if self.k.is_some() { "opendp-grid" } else { "opendp-exact" }
    }

    fn add_noise(&self, values: &mut [f64], std: f64, _rng: &mut dyn rand::Rng) -> Result<(), NoiseError> {
        check_std(std)?;
        if std == 0.0 {
            return Ok(());
        }
        if values.iter().any(|v| !v.is_finite()) {
            return Err(NoiseError::NonFinite);
        }
        let fail = |e: opendp::error::Error| NoiseError::Sampler(e.to_string());
        let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
            self.domain(values.len()),
            L2Distance::<f64>::default(),
            std,
            self.k,
        )
        .map_err(fail)?;
        let noised = m.invoke(&values.to_vec()).map_err(fail)?;
        if noised.len() != values.len() {
            return Err(NoiseError::Sampler(format!(
                "opendp returned {} values for {}",
                noised.len(),
                values.len()
            )));
        }
        values.copy_from_slice(&noised);
        Ok(())
    }

    fn sensitivity_inflation(&self, std: f64, sensitivity: f64, len: usize) -> f64 {
        if self.k.is_none() || std <= 0.0 || sensitivity <= 0.0 {
            return 1.0;
        }
        // opendp's privacy map includes the rounding: rho = (d')² / (2 std²) with d' ≥ d.
        let rho = make_gaussian::<_, _, ZeroConcentratedDivergence>(
            self.domain(len.max(1)),
            L2Distance::<f64>::default(),
            std,
            self.k,
        )
        .and_then(|m| m.map(&sensitivity));
        match rho {
            Ok(rho) if rho > 0.0 => ((2.0 * rho).sqrt() * std / sensitivity).max(1.0),
            // If opendp cannot say, account for no privacy rather than too much.
            _ => f64::INFINITY,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opendp::combinators::{make_composition, make_zCDP_to_approxDP};
    use rand::SeedableRng;
    use starling_proto::dp::{Delta, Epsilon, FastGaussian, epsilon};

    fn moments(v: &[f64]) -> (f64, f64, f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let sd = var.sqrt();
        let beyond = |k: f64| v.iter().filter(|x| (*x - mean).abs() > k * sd).count() as f64 / n;
        (mean, sd, beyond(2.0), beyond(3.0))
    }

    /// The fast sampler and opendp's exact one draw the same distribution: mean, standard deviation
    /// and the mass beyond 2σ and 3σ agree with each other and with N(0, σ²)
    /// (P(|Z| > 2) = 0.0455, P(|Z| > 3) = 0.0027).
    #[test]
    fn fast_sampler_matches_opendp_distribution() {
        let n = 40_000;
        let std = 3.0;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut fast = vec![0.0; n];
        FastGaussian.add_noise(&mut fast, std, &mut rng).unwrap();
        let mut exact = vec![0.0; n];
        OpenDpGaussian::exact().add_noise(&mut exact, std, &mut rng).unwrap();
        let mut grid = vec![0.0; n];
        OpenDpGaussian::with_granularity(-20).add_noise(&mut grid, std, &mut rng).unwrap();
        for (name, v) in [("fast", &fast), ("opendp", &exact), ("opendp k=-20", &grid)] {
            let (mean, sd, p2, p3) = moments(v);
            // Standard errors at n = 40k: mean 0.015, sd 0.011, p2 0.001, p3 0.00026.
            assert!(mean.abs() < 0.06, "{name}: mean {mean}");
            assert!((sd - std).abs() < 0.05, "{name}: sd {sd}");
            assert!((p2 - 0.0455).abs() < 0.005, "{name}: P(>2sd) {p2}");
            assert!((p3 - 0.0027).abs() < 0.0015, "{name}: P(>3sd) {p3}");
        }
        let (_, sd_f, p2_f, _) = moments(&fast);
        let (_, sd_o, p2_o, _) = moments(&exact);
        assert!((sd_f - sd_o).abs() < 0.06 && (p2_f - p2_o).abs() < 0.006);
    }

    #[test]
    fn opendp_sampler_refuses_what_it_cannot_noise_and_accounts_its_grid() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let s = OpenDpGaussian::exact();
        assert_eq!(s.add_noise(&mut [1.0, f64::NAN], 1.0, &mut rng), Err(NoiseError::NonFinite));
        assert!(matches!(s.add_noise(&mut [1.0], -2.0, &mut rng), Err(NoiseError::BadStd(_))));
        assert_eq!(s.sensitivity_inflation(1.0, 1.0, 1000), 1.0);
        let grid = OpenDpGaussian::with_granularity(-20);
        let f = grid.sensitivity_inflation(1.0, 1.0, 1_000_000);
        assert!(f > 1.0 && f < 1.01, "{f}");
    }

    /// For full participation the accountant's ε equals opendp's: the Gaussian mechanism composed
    /// T times in zCDP (ρ adds up) and converted to (ε, δ).
    #[test]
    fn zcdp_accounting_matches_opendp() {
        let dom = VectorDomain::new(AtomDomain::<f64>::new_non_nan());
        for (sigma, rounds) in [(5.0, 100u64), (1.0, 10), (10.0, 1000)] {
            let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
                dom.clone(),
                L2Distance::default(),
                sigma,
                None,
            )
            .unwrap();
            let composed = make_composition(vec![m; rounds as usize]).unwrap();
            let profile = make_zCDP_to_approxDP(composed).unwrap().map(&1.0).unwrap();
            let reference = profile.epsilon(1e-5).unwrap();
            let (ours, _) = epsilon(
                SamplingRate::new(1.0).unwrap(),
                NoiseMultiplier::new(sigma).unwrap(),
                rounds,
                Delta::new(1e-5).unwrap(),
            );
            assert!(
                (ours - reference).abs() / reference < 1e-3,
                "sigma {sigma} x {rounds}: {ours} vs opendp {reference}"
            );
        }
    }

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
