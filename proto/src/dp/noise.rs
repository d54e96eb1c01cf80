//! Gaussian noise for released aggregates and local-DP updates.
//!
//! Noise is drawn through the [`GaussianSampler`] trait so the host picks the sampler:
//!
//! | sampler | where it runs | speed (1 core) | why |
//! |---|---|---|---|
//! | [`FastGaussian`] (here) | the coordinator by default (central DP, once per round); the simulator (its devices opt in with `simulation_seeded_noise`) | ≈150 M values/s | rand_distr's ziggurat on the caller's **seeded** RNG: milliseconds per round for millions of coordinates, and simulations stay reproducible |
//! | `OpenDpGaussian` on a grid (`dp::opendp`, feature `opendp`) | **devices, for local DP** (the SDK's default, on the grid `dp::opendp::grid_exponent` picks); the coordinator on request (2⁻²⁰) | ≈100–240 k values/s (measured in `docs/privacy.md`) | opendp's discrete Gaussian from opendp's own entropy source: immune to the floating-point attacks on textbook samplers (Mironov 2012), not reproducible from a seed; the rounding to the grid is accounted ([`GaussianSampler::sensitivity_inflation`]) |
//! | `OpenDpGaussian::exact` | the coordinator on request | ≈25 k values/s | the same without a grid; seconds per round for a 100k-parameter model |
//!
//! Tests in `dp::opendp` check that the fast and opendp samplers produce the same distribution
//! (mean, variance, tails). `docs/privacy.md` states the floating-point caveat of the fast path.

use rand_distr::{Distribution, Normal};
use std::fmt;

/// Why noise could not be added. Nothing is released when this happens.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum NoiseError {
    /// The standard deviation is negative or not finite.
    #[error("noise standard deviation must be finite and >= 0, got {0}")]
    BadStd(f64),
    /// A value to be noised is NaN or infinite (a sampler over a finite domain refuses it).
    #[error("cannot noise a non-finite value")]
    NonFinite,
    /// The sampler itself failed.
    #[error("noise sampler failed: {0}")]
    Sampler(String),
}

/// A source of Gaussian noise `N(0, std²)`.
pub trait GaussianSampler: Send + Sync + fmt::Debug {
    /// A short name for logs and reports.
    fn name(&self) -> &'static str;

    /// Adds independent `N(0, std²)` noise to every value, in place. `rng` is the caller's seeded
    /// RNG; a sampler with its own entropy source may ignore it. On error the values may be
    /// partly noised and must not be released.
    fn add_noise(&self, values: &mut [f64], std: f64, rng: &mut dyn rand::Rng) -> Result<(), NoiseError>;

    /// The factor (≥ 1) by which this sampler inflates an L2 sensitivity of `sensitivity` when it
    /// adds noise of standard deviation `std` to `len` values: 1 for a continuous sampler; a
    /// discretising sampler pays for its rounding with a slightly larger sensitivity, so the noise
    /// multiplier it achieves is `std / (sensitivity × factor)`.
    fn sensitivity_inflation(&self, std: f64, sensitivity: f64, len: usize) -> f64 {
        let _ = (std, sensitivity, len);
        1.0
    }
}

/// rand_distr's `Normal` on the caller's seeded RNG. See the module docs for when to use it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastGaussian;

impl GaussianSampler for FastGaussian {
    fn name(&self) -> &'static str {
        "fast"
    }

    fn add_noise(&self, values: &mut [f64], std: f64, rng: &mut dyn rand::Rng) -> Result<(), NoiseError> {
        check_std(std)?;
        if std == 0.0 {
            return Ok(());
        }
        let normal = Normal::new(0.0, std).map_err(|e| NoiseError::Sampler(e.to_string()))?;
        for v in values {
            *v += normal.sample(rng);
        }
        Ok(())
    }
}

/// Refuses a negative or non-finite standard deviation.
pub fn check_std(std: f64) -> Result<(), NoiseError> {
    if std.is_finite() && std >= 0.0 { Ok(()) } else { Err(NoiseError::BadStd(std)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn fast_sampler_has_the_requested_moments_and_refuses_bad_std() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut v = vec![0.0f64; 200_000];
        FastGaussian.add_noise(&mut v, 2.5, &mut rng).unwrap();
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var.sqrt() - 2.5).abs() / 2.5 < 0.01, "std {}", var.sqrt());
        assert_eq!(FastGaussian.add_noise(&mut v, -1.0, &mut rng), Err(NoiseError::BadStd(-1.0)));
        assert!(FastGaussian.add_noise(&mut v, f64::NAN, &mut rng).is_err());
        let before = v.clone();
        FastGaussian.add_noise(&mut v, 0.0, &mut rng).unwrap();
        assert_eq!(v, before, "zero noise is the identity");
    }
}
