//! Local differential privacy: the device clips and noises its own update before it leaves, for
//! deployments that do not trust the coordinator, and keeps its own ledger.
//!
//! - **Neighbouring relation and sensitivity.** Under local DP the adversary sees each device's
//!   release on its own, so the guarantee must hold between *any* two inputs of that device (its
//!   data replaced by any other data), not between "with" and "without" it. Two updates clipped to
//!   L2 norm `C` differ by up to `2C` (e.g. `u` and `−u`), so [`local_sensitivity`] is `2C` (with
//!   an allowance of 2⁻²⁰ for clipping in `f32`) and the noise has standard deviation
//!   [`local_noise_std`] `= σ·2C` for the accounted multiplier σ.
//! - **Dense.** Noise goes on every coordinate, because a row-sparse update would reveal which
//!   items the user touched; the update is sent dense.
//! - **In f64, on a grid, from a secure source.** The clipped update is widened to `f64`, noised
//!   by the [`LocalNoise`] sampler, and narrowed to `f32` for the wire (post-processing). The
//!   default, [`LocalNoise::Secure`] (feature `opendp`), is opendp's discrete Gaussian
//!   ([`crate::dp::opendp`]) on the grid 2ᵏ that [`grid_exponent`](crate::dp::opendp::grid_exponent)
//!   picks so that the rounding inflates the sensitivity by at most [`MAX_GRID_INFLATION`]; the
//!   standard deviation is raised by that factor, so the release is worth exactly σ. Its
//!   randomness comes from opendp's entropy source, never from a seed.
//!   [`LocalNoise::SimulationSeeded`] is the fast floating-point sampler on the caller's seeded RNG,
//!   for simulations only (reproducible, and open to the floating-point attack of Mironov 2012).
//! - **Nothing else data-dependent.** Besides the noised update a client reports a weight and
//!   metrics; under local DP they are [`LOCAL_DP_WEIGHT`] and [`local_dp_metrics`], whatever the
//!   data ([`reported_metadata`]).
//! - **Accounting.** Each release is a Gaussian mechanism with multiplier σ on the device's data,
//!   accounted with `q = 1` (a device cannot rely on the coordinator's sampling for
//!   amplification) in the [`DeviceLedger`].
//! - **The server's bound.** The coordinator cannot check the noise, but it can bound each
//!   update's norm: [`honest_norm_bound`] is a bound an honest noised update stays under except
//!   with probability `e^−`[`NORM_BOUND_TAIL`], to clip to instead of `C` (clipping a noised
//!   update, of norm about `σ·2C·√d`, to `C` would destroy its signal).

use super::accountant::{Mechanism, RdpAccountant};
use super::ledger::BudgetError;
use super::noise::{FastGaussian, GaussianSampler, NoiseError, check_std};
use super::params::{Budget, ClipNorm, Delta, NoiseMultiplier, SamplingRate};
use crate::message::{LocalMetrics, NoiseSettings, TrainingPlan};
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

/// The relative allowance [`local_sensitivity`] adds for clipping in `f32`: the scale factor
/// and each scaled value are rounded (at most 2⁻²⁴ each), so a clipped update's norm may exceed
/// `clip` by about 1.2·10⁻⁷ relative; 2⁻²⁰ covers it.
pub const CLIP_ROUNDING: f64 = 1.0 / 1_048_576.0;

/// The L2 sensitivity of one local release with clip norm `clip`: `2·clip` (times
/// `1 + `[`CLIP_ROUNDING`]). Under local DP two neighbouring inputs are any two datasets of the
/// device, whose updates, each clipped to `clip`, differ by up to `2·clip` (see the module docs).
pub fn local_sensitivity(clip: f64) -> f64 {
    2.0 * clip * (1.0 + CLIP_ROUNDING)
}

/// The noise standard deviation of a local release accounted at multiplier `sigma`, before any
/// sampler's rounding allowance: `sigma × `[`local_sensitivity`]`(clip)`.
pub fn local_noise_std(clip: f64, sigma: f64) -> f64 {
    sigma * local_sensitivity(clip)
}

/// The most [`LocalNoise::Secure`]'s grid may inflate the local sensitivity by (0.1 %): it picks
/// the coarsest grid within it, and [`honest_norm_bound`] allows for it.
pub const MAX_GRID_INFLATION: f64 = 1.001;

/// Which sampler noises a local release. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalNoise {
    /// opendp's discrete Gaussian on the coarsest grid within [`MAX_GRID_INFLATION`], drawn
    /// from opendp's entropy source. What devices use.
    #[cfg(feature = "opendp")]
    Secure,
    /// [`FastGaussian`] on the caller's seeded RNG: reproducible and fast, but a floating-point
    /// sampler on a predictable stream. For simulations only.
    SimulationSeeded,
}

impl LocalNoise {
    /// The sampler for one release of `len` values with L2 `sensitivity`.
    pub fn sampler(self, sensitivity: f64, len: usize) -> Box<dyn GaussianSampler> {
        match self {
            #[cfg(feature = "opendp")]
            LocalNoise::Secure => {
                let k = super::opendp::grid_exponent(sensitivity, len, MAX_GRID_INFLATION - 1.0);
                Box::new(super::opendp::OpenDpGaussian::with_granularity(k))
            }
            LocalNoise::SimulationSeeded => {
                let _ = (sensitivity, len);
                Box::new(FastGaussian)
            }
        }
    }
}

/// What a client does to its update before it leaves the device, as the task's plan says: clip
/// it to `plan.clip_norm` (if set) and, under [`NoiseSettings::Local`], noise every coordinate
/// with `noise` ([`privatize`]). Returns the update to send and, under local DP, the release the
/// device must put on its ledger. The plan comes from the coordinator, so its settings are
/// validated here.
pub fn protect(
    update: Update,
    plan: &TrainingPlan,
    round: u64,
    noise: LocalNoise,
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
            let sampler = noise.sampler(local_sensitivity(clip.get()), update.shape().len());
            let sent = privatize(&update, clip, sigma, sampler.as_ref(), rng)?;
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

/// Clips `update` to `clip`, widens it to `f64` and adds `sampler`'s noise to every coordinate
/// with standard deviation [`local_noise_std`]`(C, σ)` times the sampler's
/// [`sensitivity_inflation`](GaussianSampler::sensitivity_inflation) for a sensitivity of
/// [`local_sensitivity`]`(C)` (so the release is worth exactly σ); returns the dense result in
/// `f32`. `rng` is passed to the sampler (a secure sampler ignores it).
pub fn privatize(
    update: &Update,
    clip: ClipNorm,
    sigma: NoiseMultiplier,
    sampler: &dyn GaussianSampler,
    rng: &mut dyn rand::Rng,
) -> Result<Update, LocalDpError> {
    let mut clipped = update.clone();
    clip_l2(&mut clipped, clip.get());
    let mut values: Vec<f64> = clipped.to_dense().into_iter().map(f64::from).collect();
    let base = local_noise_std(clip.get(), sigma.get());
    let std = base * sampler.sensitivity_inflation(base, local_sensitivity(clip.get()), values.len());
    check_std(std)?;
    sampler.add_noise(&mut values, std, rng)?;
    Ok(Update::dense(update.shape(), values.into_iter().map(|v| v as f32).collect())?)
}

/// `ln(1/p)` for the failure probability `p` of [`honest_norm_bound`]: `p = e^−30 ≈ 9.4·10⁻¹⁴`
/// per update.
pub const NORM_BOUND_TAIL: f64 = 30.0;

/// An L2 norm that an honest locally private update of `dim` values (clip norm `clip`, noise
/// multiplier `sigma`) exceeds with probability at most `e^−`[`NORM_BOUND_TAIL`]; the
/// coordinator clips updates to it under local DP instead of to `clip`.
///
/// The update is `x + z` with `‖x‖ ≤ f·C` (the clipped update, moved by at most `(f − 1)·C` by the
/// grid's rounding) and `z` of independent coordinates, each sub-Gaussian with parameter
/// `s = f·σ·2C` (the continuous Gaussian; the discrete Gaussian is sub-Gaussian with its scale
/// parameter, Canonne, Kamath & Steinke 2020), where `f ≤ `[`MAX_GRID_INFLATION`] is the
/// sampler's rounding allowance. For such a vector `P(‖z‖² > s²(d + 2√(dt) + 2t)) ≤ e^−t`
/// (Hsu, Kakade & Zhang 2012, Theorem 1; Laurent & Massart 2000 for the Gaussian), so
/// `‖x + z‖ ≤ f·(C + σ·2C·√(d + 2√(dt) + 2t))` except with probability `e^−t`. For large `d` the
/// bound is about `σ·2C·(√d + √t)`: 2 % above the typical norm at `d = 100,000`.
pub fn honest_norm_bound(clip: f64, sigma: f64, dim: usize) -> f64 {
    let (d, t) = (dim as f64, NORM_BOUND_TAIL);
    let chi = (d + 2.0 * (d * t).sqrt() + 2.0 * t).sqrt();
    MAX_GRID_INFLATION * (clip + local_noise_std(clip, sigma) * chi)
}

/// The aggregation weight a client reports with a locally private update: 1, whatever its data
/// (its example count would be an unnoised statistic of its data). The round engine gives every
/// update of a DP round weight 1 anyway (`Weighting::Auto`).
pub const LOCAL_DP_WEIGHT: f32 = 1.0;

/// The metrics a client reports with a locally private update: none that depend on its data. The
/// loss is NaN (the round engine leaves non-finite losses out of the round's mean), there is no
/// hit rate and the training time is 0.
pub fn local_dp_metrics() -> LocalMetrics {
    LocalMetrics { loss: f32::NAN, hit_rate_at_10: None, train_ms: 0, norm_within_clip: None }
}

/// What a client reports with its update besides the update: the measured `weight` and
/// `metrics`, or, when `plan` asks for local noise, [`LOCAL_DP_WEIGHT`] and [`local_dp_metrics`].
pub fn reported_metadata(plan: &TrainingPlan, weight: f32, metrics: LocalMetrics) -> (f32, LocalMetrics) {
    match plan.noise {
        NoiseSettings::Local { .. } => (LOCAL_DP_WEIGHT, local_dp_metrics()),
        _ => (weight, metrics),
    }
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

    const SEEDED: LocalNoise = LocalNoise::SimulationSeeded;

    #[test]
    fn privatize_clips_then_noises_every_coordinate() {
        let shape = ModelShape::new(4, 2).unwrap();
        let u = Update::sparse(shape, vec![1], vec![3.0, 4.0]).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let clip = ClipNorm::new(1.0).unwrap();
        let fast = FastGaussian;
        let none = privatize(&u, clip, NoiseMultiplier::new(0.0).unwrap(), &fast, &mut rng).unwrap();
        assert!(none.is_dense());
        let want = [0.0, 0.0, 0.6, 0.8, 0.0, 0.0, 0.0, 0.0];
        assert!(none.values().iter().zip(want).all(|(v, w)| (v - w).abs() < 1e-6), "{:?}", none.values());
        assert!(none.l2_norm() <= 1.0, "clipped within the bound, never a rounding above it");
        let noised = privatize(&u, clip, NoiseMultiplier::new(1.0).unwrap(), &fast, &mut rng).unwrap();
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
        let (same, release) = protect(u.clone(), &plain, 1, SEEDED, &mut rng).unwrap();
        assert_eq!((same, release), (u.clone(), None));
        let central = TrainingPlan {
            clip_norm: Some(1.0),
            noise: NoiseSettings::Central { multiplier: 1.0 },
            ..TrainingPlan::default()
        };
        let (clipped, release) = protect(u.clone(), &central, 1, SEEDED, &mut rng).unwrap();
        assert!(release.is_none() && !clipped.is_dense(), "central DP: clip only, stay sparse");
        assert!((clipped.l2_norm() - 1.0).abs() < 1e-6);
        let local = TrainingPlan { noise: NoiseSettings::Local { multiplier: 2.0 }, ..central.clone() };
        let (noised, release) = protect(u.clone(), &local, 7, SEEDED, &mut rng).unwrap();
        assert!(noised.is_dense());
        assert_eq!(release, Some(LocalRelease { round: 7, clip: 1.0, sigma: 2.0 }));
        for bad in [
            TrainingPlan { clip_norm: None, ..local.clone() },
            TrainingPlan { clip_norm: Some(-1.0), ..central.clone() },
            TrainingPlan { clip_norm: Some(f32::NAN), ..central.clone() },
            TrainingPlan { noise: NoiseSettings::Local { multiplier: -1.0 }, ..local.clone() },
        ] {
            assert!(
                matches!(protect(u.clone(), &bad, 1, SEEDED, &mut rng), Err(LocalDpError::BadPlan(_))),
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

    #[test]
    fn the_noise_is_sigma_times_twice_the_clip_norm() {
        for (clip, sigma) in [(1.0, 1.0), (0.5, 2.0), (3.0, 0.7)] {
            assert_eq!(local_sensitivity(clip), 2.0 * clip * (1.0 + CLIP_ROUNDING));
            assert!((local_noise_std(clip, sigma) / (sigma * 2.0 * clip) - 1.0).abs() < 1e-6);
            assert_eq!(local_noise_std(clip, sigma), sigma * local_sensitivity(clip));
        }
    }

    /// The coordinator's bound under local DP: an honest noised update (its clipped part at the
    /// full norm C, the worst case) stays under it in every trial, with room to spare, while it
    /// is far above C (re-clipping to C would shrink it by about σ·2·√d); and the bound is within
    /// a few percent of the typical norm, so a hostile update cannot gain much from it.
    #[test]
    fn an_honest_noised_update_stays_under_the_server_bound() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for (rows, row_len, trials) in [(1, 1, 2000), (10, 1, 2000), (250, 4, 500), (25_000, 4, 20)] {
            let shape = ModelShape::new(rows, row_len).unwrap();
            let d = shape.len();
            for (clip, sigma) in [(0.5, 1.0), (2.0, 0.3), (0.1, 8.0)] {
                let bound = honest_norm_bound(clip, sigma, d);
                let (c, s) = (ClipNorm::new(clip).unwrap(), NoiseMultiplier::new(sigma).unwrap());
                let mut worst: f64 = 0.0;
                for _ in 0..trials {
                    let big = Update::dense(shape, vec![10.0; d]).unwrap();
                    let noised = privatize(&big, c, s, &FastGaussian, &mut rng).unwrap();
                    worst = worst.max(noised.l2_norm());
                }
                assert!(worst < 0.995 * bound, "d {d}, C {clip}, σ {sigma}: {worst} vs bound {bound}");
                if d >= 1000 {
                    assert!(worst > 10.0 * clip, "the noised norm is far above C: {worst}");
                }
                if d >= 100_000 {
                    let typical = local_noise_std(clip, sigma) * (d as f64).sqrt();
                    assert!(bound < 1.03 * typical + clip, "d {d}: bound {bound} vs typical {typical}");
                }
            }
        }
    }

    #[test]
    fn under_local_dp_the_reported_metadata_does_not_depend_on_the_data() {
        let measured = LocalMetrics {
            loss: 0.7,
            hit_rate_at_10: Some(0.4),
            train_ms: 321,
            norm_within_clip: Some(true),
        };
        let central = TrainingPlan {
            clip_norm: Some(1.0),
            noise: NoiseSettings::Central { multiplier: 1.0 },
            ..TrainingPlan::default()
        };
        assert_eq!(reported_metadata(&central, 37.0, measured), (37.0, measured));
        let local = TrainingPlan { noise: NoiseSettings::Local { multiplier: 1.0 }, ..central };
        let (weight, metrics) = reported_metadata(&local, 37.0, measured);
        assert_eq!(weight, LOCAL_DP_WEIGHT);
        assert!(metrics.loss.is_nan());
        assert_eq!((metrics.hit_rate_at_10, metrics.train_ms), (None, 0));
        assert_eq!(metrics.norm_within_clip, None, "not even the clipping indicator");
    }

    /// The secure sampler: every value on the grid the release's sensitivity and size call for,
    /// the noise of the accounted scale, and nothing reproducible from the caller's RNG.
    #[cfg(feature = "opendp")]
    #[test]
    fn secure_local_noise_is_on_its_grid_of_the_right_scale_and_not_seeded() {
        let shape = ModelShape::new(500, 4).unwrap();
        let u = Update::sparse(shape, vec![3], vec![3.0, 4.0, 0.0, 0.0]).unwrap();
        let plan = TrainingPlan {
            clip_norm: Some(0.5),
            noise: NoiseSettings::Local { multiplier: 2.0 },
            ..TrainingPlan::default()
        };
        let send = || {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
            protect(u.clone(), &plan, 1, LocalNoise::Secure, &mut rng).unwrap()
        };
        let ((a, release), (b, _)) = (send(), send());
        assert_eq!(release, Some(LocalRelease { round: 1, clip: 0.5, sigma: 2.0 }));
        assert_ne!(a, b, "the same seed does not give the same noise");
        let k =
            crate::dp::opendp::grid_exponent(local_sensitivity(0.5), shape.len(), MAX_GRID_INFLATION - 1.0);
        assert_eq!(k, -16);
        let scale = 2f64.powi(-k);
        assert!(a.values().iter().all(|v| (f64::from(*v) * scale).fract() == 0.0), "on the 2^{k} grid");
        let n = a.values().len() as f64;
        let std = (a.values().iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / n).sqrt();
        // σ·2C = 2; the sample's own error at n = 2000 is about 1.6 %.
        assert!((std - 2.0).abs() < 0.1, "std {std}");
    }
}
