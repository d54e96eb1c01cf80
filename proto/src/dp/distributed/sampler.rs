//! Discrete Gaussian samplers `N_Z(0, σ²)` (probability of `k ∈ ℤ` proportional to
//! `exp(−k²/(2σ²))`), truncated to `|k| ≤ bound` by rejection.
//!
//! | sampler | randomness | speed (1 core, measured by `distributed_timing_samplers`) | caveat |
//! |---|---|---|---|
//! | [`FastDiscreteGaussian`] | a ChaCha8 stream seeded from the caller's RNG (reproducible) | ≈ 10–15 M samples/s | f64 arithmetic: close to, not exactly, `N_Z` |
//! | `OpenDpDiscreteGaussian` (feature `opendp`) | opendp's own entropy source | ≈ 80–120 k samples/s | none known: exact rational arithmetic |
//!
//! **Truncation.** Both samplers return `N_Z(0, σ²)` *conditioned on* `|Z| ≤ bound` (a rejected
//! value is redrawn), which is within total variation `P(|Z| > bound) ≤ 2·exp(−bound²/(2σ²))`
//! of `N_Z(0, σ²)` per value (the discrete Gaussian is σ-subgaussian: Canonne, Kamath & Steinke
//! 2020, so the Gaussian tail bound applies).
//!
//! **The floating-point caveat of [`FastDiscreteGaussian`].** It runs Algorithm 3 of Canonne,
//! Kamath & Steinke (2020) — rejection sampling from a discrete Laplace proposal — but draws the
//! discrete Laplace's magnitude as the geometric `⌊t·E⌋` (E exponential, rand_distr's ziggurat)
//! and the Bernoulli(`exp(−b)`) acceptance as `E' ≥ b`, all in f64, on a ChaCha8 stream seeded
//! from the caller's RNG. The result is
//! integer-valued (so the "porous" low-order bits behind Mironov's 2012 attack on floating-point
//! Laplace noise do not appear in the output), but the probabilities are only as exact as f64
//! and the ziggurat (relative errors around 2⁻⁵⁰ per value; not quantified formally), the running
//! time depends on the drawn values (a timing side channel on the noise), and the stream is only
//! as unpredictable as the caller's RNG. It is what the simulator uses (seeded, reproducible);
//! a production device should use the opendp sampler when its cost is acceptable, and otherwise
//! a CSPRNG seeded from the OS for this one.

use super::super::noise::{NoiseError, check_std};
use rand::SeedableRng;
use rand_distr::{Distribution, Exp1};

/// A discrete Gaussian sampler seam: the device encoder draws its noise share through it.
pub trait DiscreteGaussian: Send + Sync + std::fmt::Debug {
    /// A short name for logs and reports.
    fn name(&self) -> &'static str;

    /// Fills `out` with independent draws of `N_Z(0, std²)` conditioned on `|z| ≤ bound`. `std = 0`
    /// gives zeros. `rng` is the caller's RNG; a sampler with its own entropy source may ignore it.
    /// Refuses a negative or non-finite `std` ([`NoiseError::BadStd`]) and a negative `bound` or a
    /// `std` too large for the sampler ([`NoiseError::Sampler`]).
    fn sample_into(
        &self,
        out: &mut [i64],
        std: f64,
        bound: i64,
        rng: &mut dyn rand::Rng,
    ) -> Result<(), NoiseError>;
}

/// The largest `std` the samplers accept (far beyond anything a 32-bit modulus can carry).
pub const MAX_SAMPLER_STD: f64 = 1e12;

/// Proposals a sampler may reject for one value before it gives up (the acceptance probability
/// is above 1/2 for any `bound ≥ std`; a plan's bound is about 13·std).
const MAX_ATTEMPTS: u32 = 100_000;

fn check_args(std: f64, bound: i64) -> Result<(), NoiseError> {
    check_std(std)?;
    if std > MAX_SAMPLER_STD {
        return Err(NoiseError::Sampler(format!("std {std} exceeds {MAX_SAMPLER_STD}")));
    }
    if bound < 0 {
        return Err(NoiseError::Sampler(format!("negative truncation bound {bound}")));
    }
    Ok(())
}

/// Canonne–Kamath–Steinke (2020) Algorithm 3 in f64 on the caller's RNG: fast and reproducible
/// from a seed. See the module docs for its floating-point caveat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastDiscreteGaussian;

impl FastDiscreteGaussian {
    /// One draw of `N_Z(0, std²)` conditioned on `|z| ≤ bound`, for `std > 0`.
    fn one<R: rand::Rng + ?Sized>(
        std: f64,
        bound: i64,
        rng: &mut R,
        signs: &mut Signs,
    ) -> Result<i64, NoiseError> {
        // Proposal: discrete Laplace with scale t = ⌊σ⌋ + 1, P(y) ∝ exp(−|y|/t): a magnitude
        // G = ⌊t·E⌋ (geometric, P(G ≥ k) = exp(−k/t)) and a random sign, rejecting "−0".
        // Accept with probability exp(−(|y| − σ²/t)² / (2σ²)), i.e. when an Exp(1) draw is at
        // least that exponent.
        let t = std.floor() + 1.0;
        let sigma2 = std * std;
        let shift = sigma2 / t;
        for _ in 0..MAX_ATTEMPTS {
            let g1: f64 = Exp1.sample(rng);
            let magnitude = (t * g1).floor();
            let negative = signs.next(rng);
            if (negative && magnitude == 0.0) || magnitude > bound as f64 {
                continue;
            }
            let d = magnitude - shift;
            let e: f64 = Exp1.sample(rng);
            if e >= d * d / (2.0 * sigma2) {
                let m = magnitude as i64;
                return Ok(if negative { -m } else { m });
            }
        }
        Err(NoiseError::Sampler(format!(
            "no draw within ±{bound} after {MAX_ATTEMPTS} proposals (std {std})"
        )))
    }
}

/// Random sign bits, 64 per draw of the RNG.
#[derive(Default)]
struct Signs {
    bits: u64,
    left: u32,
}

impl Signs {
    fn next<R: rand::Rng + ?Sized>(&mut self, rng: &mut R) -> bool {
        if self.left == 0 {
            self.bits = rng.next_u64();
            self.left = 64;
        }
        let b = self.bits & 1 == 1;
        self.bits >>= 1;
        self.left -= 1;
        b
    }
}

impl DiscreteGaussian for FastDiscreteGaussian {
    fn name(&self) -> &'static str {
        "fast-discrete"
    }

    fn sample_into(
        &self,
        out: &mut [i64],
        std: f64,
        bound: i64,
        rng: &mut dyn rand::Rng,
    ) -> Result<(), NoiseError> {
        check_args(std, bound)?;
        if std == 0.0 {
            out.fill(0);
            return Ok(());
        }
        // A ChaCha8 stream seeded from the caller's RNG: reproducible from the caller's seed, and
        // statically dispatched (about twice as fast as drawing through `dyn Rng`).
        let mut local = rand_chacha::ChaCha8Rng::from_rng(rng);
        let mut signs = Signs::default();
        for v in out {
            *v = Self::one(std, bound, &mut local, &mut signs)?;
        }
        Ok(())
    }
}

/// opendp's exact discrete Gaussian (`opendp::measurements::make_gaussian` on integer vectors,
/// Canonne–Kamath–Steinke 2020 in exact rational arithmetic), drawn from opendp's own entropy
/// source (the caller's RNG is ignored, nothing is reproducible from a seed). Values beyond the
/// bound are redrawn. See the parent module's docs for its measured cost.
#[cfg(feature = "opendp")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenDpDiscreteGaussian;

#[cfg(feature = "opendp")]
impl OpenDpDiscreteGaussian {
    fn draw(std: f64, len: usize) -> Result<Vec<i64>, NoiseError> {
        use opendp::domains::{AtomDomain, VectorDomain};
        use opendp::measurements::make_gaussian;
        use opendp::measures::ZeroConcentratedDivergence;
        use opendp::metrics::L2Distance;
        let fail = |e: opendp::error::Error| NoiseError::Sampler(e.to_string());
        let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
            VectorDomain::new(AtomDomain::<i64>::default()),
            L2Distance::<i64>::default(),
            std,
            None,
        )
        .map_err(fail)?;
        let drawn = m.invoke(&vec![0i64; len]).map_err(fail)?;
        if drawn.len() != len {
            return Err(NoiseError::Sampler(format!("opendp returned {} values for {len}", drawn.len())));
        }
        Ok(drawn)
    }
}

#[cfg(feature = "opendp")]
impl DiscreteGaussian for OpenDpDiscreteGaussian {
    fn name(&self) -> &'static str {
        "opendp-discrete"
    }

    fn sample_into(
        &self,
        out: &mut [i64],
        std: f64,
        bound: i64,
        _rng: &mut dyn rand::Rng,
    ) -> Result<(), NoiseError> {
        check_args(std, bound)?;
        if std == 0.0 {
            out.fill(0);
            return Ok(());
        }
        out.copy_from_slice(&Self::draw(std, out.len())?);
        // Redraw the (astronomically rare, for a plan's bound) values beyond the bound.
        for _ in 0..MAX_ATTEMPTS {
            let beyond: Vec<usize> = (0..out.len()).filter(|&i| out[i].abs() > bound).collect();
            if beyond.is_empty() {
                return Ok(());
            }
            for (i, v) in beyond.iter().zip(Self::draw(std, beyond.len())?) {
                out[*i] = v;
            }
        }
        Err(NoiseError::Sampler(format!("no draw within ±{bound} after {MAX_ATTEMPTS} attempts (std {std})")))
    }
}
