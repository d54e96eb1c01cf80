//! Local differential privacy: the device clips and noises its own update before it leaves, for
//! deployments that do not trust the coordinator, and keeps its own ledger.
//!
//! Under local DP the update is sent **dense**: noise goes on every coordinate, because a
//! row-sparse update would reveal which items the user touched. Each release is a Gaussian
//! mechanism with sensitivity `C` on the user's data, accounted with `q = 1` (a device cannot rely
//! on the coordinator's sampling for amplification).

use super::accountant::{Mechanism, RdpAccountant};
use super::ledger::BudgetError;
use super::noise::{NoiseError, add_gaussian_f32};
use super::params::{Budget, ClipNorm, Delta, NoiseMultiplier, SamplingRate};
use crate::message::{NoiseSettings, TrainingPlan};
use crate::strategy::norm::clip_l2;
use crate::update::{Update, UpdateError};
use serde::{Deserialize, Serialize};

/// Why an update could not be privatised. Nothing may be sent when this happens.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LocalDpError {
    /// The noise could not be drawn.
    #[error(transparent)]
    Noise(#[from] NoiseError),
    /// The noised update is not a valid update (e.g. an overflow to infinity).
    #[error(transparent)]
    Update(#[from] UpdateError),
    /// The training plan's privacy settings are unusable (a clip norm that is not positive, a
    /// negative noise multiplier, local noise without a clip norm). Nothing is sent.
    #[error("unusable privacy settings in the training plan: {0}")]
    BadPlan(String),
}

/// What a client does to its update before it leaves the device, as the task's plan says: clip
/// it to `plan.clip_norm` (if set) and, under [`NoiseSettings::Local`], noise every coordinate
/// ([`privatize`]). Returns the update to send and, under local DP, the release the device must
/// put on its ledger. The plan comes from the coordinator, so its settings are validated here.
pub fn protect(
    update: Update,
    plan: &TrainingPlan,
    round: u64,
    rng: &mut dyn rand::Rng,
) -> Result<(Update, Option<LocalRelease>), LocalDpError> {
    let clip = plan
        .clip_norm
        .map(|c| ClipNorm::new(f64::from(c)).map_err(|e| LocalDpError::BadPlan(e.to_string())))
        .transpose()?;
    match plan.noise {
        NoiseSettings::Local { multiplier } => {
            let clip = clip.ok_or_else(|| LocalDpError::BadPlan("local noise needs a clip norm".into()))?;
            let sigma = NoiseMultiplier::new(f64::from(multiplier))
                .map_err(|e| LocalDpError::BadPlan(e.to_string()))?;
            let sent = privatize(&update, clip, sigma, rng)?;
            Ok((sent, Some(LocalRelease { round, clip: clip.get(), sigma: sigma.get() })))
        }
        _ => {
            let mut update = update;
            if let Some(c) = clip {
                clip_l2(&mut update, c.get());
            }
            Ok((update, None))
        }
    }
}

/// Clips `update` to `clip` and adds `N(0, (σ·C)²)` to every coordinate; returns the dense result.
pub fn privatize(
    update: &Update,
    clip: ClipNorm,
    sigma: NoiseMultiplier,
    rng: &mut dyn rand::Rng,
) -> Result<Update, LocalDpError> {
    let mut clipped = update.clone();
    clip_l2(&mut clipped, clip.get());
    let mut dense = clipped.to_dense();
    add_gaussian_f32(&mut dense, sigma.get() * clip.get(), rng)?;
    Ok(Update::dense(update.shape(), dense)?)
}

/// One local release, as the device records it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalRelease {
    /// The round it was sent for.
    pub round: u64,
    /// Clip norm used.
    pub clip: f64,
    /// Noise multiplier used.
    pub sigma: f64,
}

/// A device's own privacy ledger under local DP, with an optional budget the device will not
/// exceed whatever the coordinator asks.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceLedger {
    delta: Delta,
    budget: Option<Budget>,
    releases: Vec<LocalRelease>,
    accountant: RdpAccountant,
}

fn full_participation(sigma: f64) -> Option<Mechanism> {
    let (q, sigma) = (SamplingRate::new(1.0).ok()?, NoiseMultiplier::new(sigma).ok()?);
    Some(Mechanism { q, sigma, steps: 1 })
}

impl DeviceLedger {
    /// An empty ledger measuring ε at `delta`, with no budget of its own.
    pub fn new(delta: Delta) -> Self {
        Self { delta, budget: None, releases: Vec::new(), accountant: RdpAccountant::default() }
    }

    /// An empty ledger that refuses releases beyond `budget` (ε measured at the budget's δ).
    pub fn with_budget(budget: Budget) -> Self {
        Self { budget: Some(budget), ..Self::new(budget.delta) }
    }

    /// Replays releases read back from the device's storage.
    pub fn replay(mut self, releases: impl IntoIterator<Item = LocalRelease>) -> Self {
        for r in releases {
            self.record(r);
        }
        self
    }

    /// `Ok(ε after it)` if one more release with multiplier `sigma` fits the device's budget.
    pub fn check(&self, sigma: f64) -> Result<f64, BudgetError> {
        let projected = match full_participation(sigma) {
            Some(m) if sigma > 0.0 && self.epsilon().is_finite() => {
                self.accountant.epsilon_with(&m, self.delta)
            }
            _ => f64::INFINITY,
        };
        match self.budget {
            Some(b) if projected > b.epsilon.get() => {
                Err(BudgetError::Exceeded { projected, budget: b.epsilon.get(), delta: b.delta.get() })
            }
            _ => Ok(projected),
        }
    }

    /// Records a release (and returns ε spent after it).
    pub fn record(&mut self, release: LocalRelease) -> f64 {
        if let Some(m) = full_participation(release.sigma) {
            self.accountant.compose(&m);
        }
        self.releases.push(release);
        self.epsilon()
    }

    /// ε spent at the ledger's δ (∞ if any release had no noise).
    pub fn epsilon(&self) -> f64 {
        if self.releases.iter().any(|r| r.sigma <= 0.0) {
            return f64::INFINITY;
        }
        self.accountant.epsilon(self.delta).0
    }

    /// The releases, oldest first.
    pub fn releases(&self) -> &[LocalRelease] {
        &self.releases
    }

    /// The δ at which ε is measured.
    pub fn delta(&self) -> Delta {
        self.delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dp::params::Epsilon;
    use crate::update::ModelShape;
    use rand::SeedableRng;

    #[test]
    fn privatize_clips_then_noises_every_coordinate() {
        let shape = ModelShape::new(4, 2).unwrap();
        let u = Update::sparse(shape, vec![1], vec![3.0, 4.0]).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let clip = ClipNorm::new(1.0).unwrap();
        let none = privatize(&u, clip, NoiseMultiplier::new(0.0).unwrap(), &mut rng).unwrap();
        assert!(none.is_dense());
        let want = [0.0, 0.0, 0.6, 0.8, 0.0, 0.0, 0.0, 0.0];
        assert!(none.values().iter().zip(want).all(|(v, w)| (v - w).abs() < 1e-6), "{:?}", none.values());
        assert!(none.l2_norm() <= 1.0, "clipped within the bound, never a rounding above it");
        let noised = privatize(&u, clip, NoiseMultiplier::new(1.0).unwrap(), &mut rng).unwrap();
        assert!(
            noised.values().iter().all(|v| *v != 0.0),
            "untouched rows get noise too: {:?}",
            noised.values()
        );
    }

    #[test]
    fn protect_follows_the_plan_and_refuses_bad_settings() {
        let shape = ModelShape::new(4, 2).unwrap();
        let u = Update::sparse(shape, vec![1], vec![3.0, 4.0]).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let plain = TrainingPlan::default();
        let (same, release) = protect(u.clone(), &plain, 1, &mut rng).unwrap();
        assert_eq!((same, release), (u.clone(), None));
        let central = TrainingPlan {
            clip_norm: Some(1.0),
            noise: NoiseSettings::Central { multiplier: 1.0 },
            ..TrainingPlan::default()
        };
        let (clipped, release) = protect(u.clone(), &central, 1, &mut rng).unwrap();
        assert!(release.is_none() && !clipped.is_dense(), "central DP: clip only, stay sparse");
        assert!((clipped.l2_norm() - 1.0).abs() < 1e-6);
        let local = TrainingPlan { noise: NoiseSettings::Local { multiplier: 2.0 }, ..central.clone() };
        let (noised, release) = protect(u.clone(), &local, 7, &mut rng).unwrap();
        assert!(noised.is_dense());
        assert_eq!(release, Some(LocalRelease { round: 7, clip: 1.0, sigma: 2.0 }));
        for bad in [
            TrainingPlan { clip_norm: None, ..local.clone() },
            TrainingPlan { clip_norm: Some(-1.0), ..central.clone() },
            TrainingPlan { clip_norm: Some(f32::NAN), ..central.clone() },
            TrainingPlan { noise: NoiseSettings::Local { multiplier: -1.0 }, ..local.clone() },
        ] {
            assert!(
                matches!(protect(u.clone(), &bad, 1, &mut rng), Err(LocalDpError::BadPlan(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn device_ledger_accounts_each_release_and_keeps_its_budget() {
        let budget = Budget { epsilon: Epsilon::new(5.0).unwrap(), delta: Delta::new(1e-5).unwrap() };
        let mut l = DeviceLedger::with_budget(budget);
        assert_eq!(l.epsilon(), 0.0);
        let mut n = 0;
        while l.check(4.0).is_ok() {
            l.record(LocalRelease { round: n, clip: 1.0, sigma: 4.0 });
            n += 1;
        }
        assert!(n >= 2, "{n}");
        assert!(l.epsilon() <= 5.0);
        assert!(matches!(l.check(4.0), Err(BudgetError::Exceeded { .. })));
        let replayed = DeviceLedger::with_budget(budget).replay(l.releases().to_vec());
        assert_eq!(replayed.epsilon(), l.epsilon());
        // A release without noise is unbounded.
        assert!(l.check(0.0).is_err());
        let mut open = DeviceLedger::new(Delta::new(1e-5).unwrap());
        open.record(LocalRelease { round: 0, clip: 1.0, sigma: 0.0 });
        assert_eq!(open.epsilon(), f64::INFINITY);
    }
}
