//! Gaussian noise for the released aggregates.
//!
//! Which sampler runs where, and why:
//! - **Here (coordinator and device): rand_distr's `Normal` (ziggurat) on the caller's seeded RNG.**
//!   It draws about 150 million values per second, so noising a model of millions of coordinates
//!   every round costs milliseconds, and a seeded RNG keeps simulations reproducible.
//! - **opendp is the reference**: its exact Gaussian sampler (discrete, on a 2^k grid, immune to the
//!   floating-point attacks of Mironov 2012) draws about 25 000 values per second — seconds per
//!   round for a 100 000-parameter model, far too slow per client update. The tests check that this
//!   sampler's output matches opendp's distribution (mean, variance, tails), and opendp's zCDP
//!   conversion cross-checks the accountant (`proto/tests/dp_opendp.rs`).
//!
//! Caveat (documented in `docs/privacy.md`): floating-point Gaussian samples carry the textbook
//! precision caveat; deployments that need the formal guarantee against an adversary who sees the
//! exact bits of the output should switch the coordinator's final noise to opendp's exact sampler.

use rand_distr::{Distribution, Normal};

/// Adds independent `N(0, std²)` noise to every value.
pub fn add_gaussian(values: &mut [f64], std: f64, rng: &mut dyn rand::Rng) {
    if std <= 0.0 || !std.is_finite() {
        return;
    }
    let Ok(normal) = Normal::new(0.0, std) else { return };
    for v in values {
        *v += normal.sample(rng);
    }
}

/// Adds independent `N(0, std²)` noise to every `f32` value.
pub fn add_gaussian_f32(values: &mut [f32], std: f64, rng: &mut dyn rand::Rng) {
    if std <= 0.0 || !std.is_finite() {
        return;
    }
    let Ok(normal) = Normal::new(0.0, std) else { return };
    for v in values {
        *v += normal.sample(rng) as f32;
    }
}

/// One `N(0, std²)` draw.
pub fn gaussian(std: f64, rng: &mut dyn rand::Rng) -> f64 {
    match Normal::new(0.0, std.max(0.0)) {
        Ok(n) if std > 0.0 => n.sample(rng),
        _ => 0.0,
    }
}
