//! Distributed DP for secure aggregation: each device clips, rotates, scales, rounds and adds its
//! **share of discrete Gaussian noise** to its update, then reduces it mod 2^bits; the coordinator
//! only sees the modular sum and decodes it (Kairouz, Liu & Steinke 2021, "The Distributed Discrete
//! Gaussian Mechanism for Federated Learning with Secure Aggregation", KLS21 below).
//!
//! # The mechanism
//!
//! The operator's [`DistributedDpConfig`] is validated once; for each round the coordinator turns
//! it into a [`QuantPlan`] for the round's cohort of `n` selected devices
//! ([`DistributedDpConfig::plan`]), which travels in the task; the device checks it
//! ([`QuantPlan::validate`]) and runs [`encode`] on its dense update `u` (length `d`):
//!
//! 1. refuse NaN/±∞; clip to L2 norm `C` (`norm_before_clip` is returned for adaptive clipping);
//! 2. with `rotation_seed`: pad to `p = d.next_power_of_two()` and rotate `x ↦ H·D·x/√p`
//!    (randomised Hadamard, [`rotation`]; L2 is preserved);
//! 3. scale by `γ` and round each coordinate **stochastically** (up with probability equal to its
//!    fractional part: unbiased), clamped to `±(⌊γC⌋ + 1)` (a no-op except for float error);
//! 4. add `N_Z(0, σ_dev²)` per coordinate, truncated at `±noise_bound`, through the
//!    [`DiscreteGaussian`] seam;
//! 5. reduce mod 2^bits (two's complement wrap, masked to `bits`).
//!
//! The coordinator sums the vectors mod 2^bits (secure aggregation) and [`decode_sum`] lifts the sum
//! to `(−2^(bits−1), 2^(bits−1)]`, divides by `γ`, undoes the rotation and drops the padding.
//!
//! **No overflow, deterministically.** After clipping (and the norm-preserving rotation) every
//! coordinate satisfies `|x_i| ≤ ‖x‖₂ ≤ C`, so every encoded integer is at most
//! `⌊γC⌋ + 1 + noise_bound` in absolute value and the sum of `n` of them at most
//! `n·(⌊γC⌋ + 1 + noise_bound)`. [`QuantPlan::validate`] requires that to be `< 2^(bits−1)` in
//! exact integer arithmetic, so the centred lift recovers the true integer sum. The configuration
//! checks the bound for every cohort `n ≤ max_cohort` at once:
//! `max_cohort·(γC + 2) + tail·z·Δ₂·√(max_cohort/(1−ρ)) < 2^(bits−1)` (since
//! `n·σ_dev(n) ≤ z·Δ₂·√(n/(1−ρ))`); with `scale: None` it picks the largest such `γ` (the
//! condition is linear in `γ`: closed form, then shrunk by 10⁻⁹).
//!
//! **Sensitivity.** Adding or removing one device moves the integer sum by its rounded vector,
//! `‖r‖₂ ≤ ‖γx‖₂ + ‖r − γx‖₂ ≤ γC + √p` (each coordinate moves by less than 1):
//! `Δ₂ = γC + √p` ([`DistributedDpConfig::sensitivity`]). Conditional rounding (KLS21), which would
//! tighten this to about `√(γ²C² + p/4)`, is not implemented; the price is the
//! [`rounding_inflation`](DistributedDpConfig::rounding_inflation) `√p/(γC)`, refused above 10%
//! ([`DistributedDpError::TooCoarse`]).
//!
//! **Noise split and dropouts.** Each device adds `σ_dev² = (z·Δ₂)²/m` with
//! `m = min_survivors = ⌈(1−ρ)·n⌉`: if at least `m` devices' vectors reach the sum, its noise is a
//! sum of at least `m` independent `N_Z(0, σ_dev²)` (variance ≥ `(z·Δ₂)²`, up to the discrete
//! Gaussian's variance deficit, which is below `10⁻⁸·σ²` for `σ ≥ 1`). If fewer than `m` survive
//! the round must not be released ([`decode_sum_checked`] refuses it). `σ_dev ≥ 1` is required
//! whenever `z > 0`.
//!
//! **Truncation.** `noise_bound = ⌈tail·σ_dev⌉` with `tail = √(2·ln(2·max_cohort·p/η₀))`,
//! `η₀ = 10⁻³⁰` ([`MAX_TRUNCATION_TV`]): the discrete Gaussian is σ-subgaussian (Canonne, Kamath &
//! Steinke 2020), so `P(|Z| > b) ≤ 2·exp(−b²/(2σ²))` and the total tail mass over all coordinates
//! and devices of a round is `η ≤ n·p·2·exp(−b²/(2σ_dev²)) ≤ 10⁻³⁰`
//! ([`DistributedDpConfig::truncation_tv`]). Truncated noise is within total variation `η` of the
//! untruncated mechanism, so an `(ε, δ)` guarantee of the untruncated mechanism becomes
//! `(ε, δ + η·(1 + e^ε))` for the truncated one.
//!
//! # Accounting
//!
//! The sum of `m` i.i.d. `N_Z(0, σ²)` is close to, not exactly, a discrete Gaussian. KLS21
//! (their bound on the sum of discrete Gaussians, stated for `σ ≥ 1/2`) shows that adding it to an
//! integer vector of L2 sensitivity `Δ₂` in `p` dimensions is `½ε²`-concentrated DP with
//!
//! ```text
//! ε = min{ √(Δ₂²/(mσ²) + 2τp),  Δ₂/(√m·σ) + τ√p },   τ = 10·Σ_{k=1}^{m−1} exp(−2π²σ²·k/(k+1)).
//! ```
//!
//! [`DistributedDpConfig::accounted_multiplier`] returns `z_eff = min(z, 1/ε)` with `m =
//! min_survivors`, `σ = σ_dev`, `Δ₂` the inflated sensitivity: the multiplier of the continuous
//! Gaussian mechanism with the same zCDP. For realistic plans `σ_dev` is in the hundreds or more,
//! `τ` underflows to 0 and `z_eff = z` up to rounding; `z_eff` falls visibly below `z` only for
//! `σ_dev` near 1. The round engine charges the round with the existing Poisson-subsampled Gaussian
//! accountants at `z_eff`.
//!
//! *Justification and caveat.* Without subsampling (`q = 1`) the charge is exact in the zCDP sense:
//! the RDP accountant's curve for `q = 1` is `α/(2z_eff²)`, which is precisely the ½ε²-zCDP bound
//! above. With Poisson subsampling the accountants (RDP: Mironov, Talwar & Zhang 2019; PLD)
//! analyse the subsampled **continuous** Gaussian; the subsampled discrete mechanism has a Rényi
//! curve dominated by the same zCDP bound before subsampling, and Canonne, Kamath & Steinke 2020
//! show that the discrete Gaussian's privacy curve matches the continuous one's to within
//! negligible terms for `σ ≳ 1`, but neither is a formal proof that the subsampled-continuous
//! analysis upper-bounds the subsampled distributed-discrete mechanism. A fully rigorous
//! alternative (generic RDP amplification by subsampling for any mechanism with a given RDP
//! curve, e.g. Zhu & Wang 2019) gives looser bounds and is not implemented. Add the truncation
//! term `η(1 + e^ε)` to δ.
//!
//! Trust: the guarantee needs honest devices (each adds its share; a device colluding with the
//! coordinator and revealing its own noise removes it from the sum — KLS21 discuss this) and at
//! least `min_survivors` contributions.
//!
//! # Samplers and their cost
//!
//! See [`sampler`]. Measured on the 2-core development VM (release build, one thread) with
//! `cargo test --release -p starling-proto --features opendp distributed_timing -- --ignored
//! --nocapture` (the machine was shared with other builds, load ≈ 3–5: ±30% noise):
//!
//! | what | fast sampler | opendp sampler |
//! |---|---|---|
//! | raw `sample_into`, σ = 3 / 300 / 60,000 | ≈ 10 / 13 / 15 M samples/s | ≈ 80–120 k samples/s (any σ) |
//! | `encode`, 64,000 values (dim 2,000 × 32), z = 1, n = 1,000, 32 bits (σ_dev ≈ 51,700) | ≈ 5.5–8 ms | ≈ 630–720 ms |
//! | the same with rotation (p = 65,536) | ≈ 6.6–7 ms | ≈ 660–720 ms |
//! | `encode` without noise | 1.1 ms (2.1 ms with rotation) | — |
//! | `decode_sum`, 64,000 values | 0.1 ms (0.9–1.6 ms with rotation) | — |
//!
//! So opendp's exact sampler costs about 100× the fast one: roughly 0.7 s of one core per
//! 64k-parameter update and 10 s per million parameters on the development VM (more on a phone).
//! The plan's numbers at that configuration: γ ≈ 1.46·10⁶, noise bound ≈ 685,000 (13.2 σ_dev),
//! rounding inflation 1.7·10⁻⁴, z_eff = z to 9 digits.

// `!(a < b)` is deliberate throughout: a NaN must fail every check.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod rotation;
pub mod sampler;
#[cfg(test)]
mod tests;

use super::noise::NoiseError;
use rand::RngExt;
#[cfg(feature = "opendp")]
pub use sampler::OpenDpDiscreteGaussian;
pub use sampler::{DiscreteGaussian, FastDiscreteGaussian};
use serde::{Deserialize, Serialize};

/// The largest total variation the truncation of the noise may cost in one round (η₀ = 10⁻³⁰).
pub const MAX_TRUNCATION_TV: f64 = 1e-30;
/// The largest rounding inflation `√p/(γC)` a configuration may have (10%).
pub const MAX_ROUNDING_INFLATION: f64 = 0.10;
/// The largest model length (2²⁸; padded to a power of two it still fits a `u32`).
pub const MAX_DIM: usize = 1 << 28;
/// The smallest device noise standard deviation (in integer units) when there is noise: the
/// accounting of the sum of discrete Gaussians is only used for `σ_dev ≥ 1`.
pub const MIN_DEVICE_STD: f64 = 1.0;

/// Operator-facing settings (validated once at configuration time).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistributedDpConfig {
    /// L2 clip norm `C` of each update (> 0).
    pub clip: f64,
    /// z: target noise standard deviation of the **sum** in units of the (inflated) sensitivity;
    /// 0 = no noise (secure aggregation without DP).
    pub noise_multiplier: f64,
    /// Model length `d`.
    pub dim: usize,
    /// The modulus is 2^bits, `1..=32` (32 by default).
    pub bits: u32,
    /// The largest number of devices whose vectors can be summed in one round.
    pub max_cohort: usize,
    /// ρ in `[0, 1)`: the noise still reaches the target if up to this fraction of the cohort drops.
    pub dropout_tolerance: f64,
    /// Randomised Hadamard rotation before quantisation (pads `d` to the next power of two).
    pub rotation: bool,
    /// γ override; `None` = the largest γ for which overflow is impossible.
    pub scale: Option<f64>,
}

impl Default for DistributedDpConfig {
    /// `clip` 1, no noise, `dim` 1, 32 bits, `max_cohort` 1, no dropout tolerance, no rotation,
    /// automatic scale: set at least `dim`, `max_cohort` and `noise_multiplier`.
    fn default() -> Self {
        Self {
            clip: 1.0,
            noise_multiplier: 0.0,
            dim: 1,
            bits: 32,
            max_cohort: 1,
            dropout_tolerance: 0.0,
            rotation: false,
            scale: None,
        }
    }
}

/// What a device needs to encode for one round (travels inside the task). Computed by the
/// coordinator from the configuration and the round's cohort size ([`DistributedDpConfig::plan`]);
/// the device checks it with [`QuantPlan::validate`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantPlan {
    /// L2 clip norm `C`.
    pub clip: f64,
    /// γ: a clipped coordinate `x` becomes the integer `round(γx)`.
    pub scale: f64,
    /// The modulus is 2^bits.
    pub bits: u32,
    /// Model length `d`.
    pub dim: u32,
    /// Encoded length `p`: `d` without rotation, `d.next_power_of_two()` with it.
    pub padded_dim: u32,
    /// Seed of the random signs of the rotation; `None` = no rotation.
    pub rotation_seed: Option<u64>,
    /// z, as configured.
    pub noise_multiplier: f64,
    /// n: devices selected for the round.
    pub cohort: u32,
    /// m = ⌈(1−ρ)·n⌉: the sum is only released if at least this many devices contributed.
    pub min_survivors: u32,
    /// σ_dev in scaled integer units: each device's noise share.
    pub device_noise_std: f64,
    /// Truncation of each device's noise sample: `|z| ≤ noise_bound`.
    pub noise_bound: i64,
}

/// Why a configuration or a plan was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DistributedDpError {
    /// The clip norm is not finite and positive.
    #[error("clip norm must be finite and > 0, got {0}")]
    BadClip(f64),
    /// The noise multiplier is not finite and non-negative.
    #[error("noise multiplier must be finite and >= 0, got {0}")]
    BadNoiseMultiplier(f64),
    /// The model length is 0 or above [`MAX_DIM`].
    #[error("model length must be in 1..={MAX_DIM}, got {0}")]
    BadDim(usize),
    /// The modulus exponent is outside `1..=32`.
    #[error("bits must be in 1..=32, got {0}")]
    BadBits(u32),
    /// `max_cohort` (or the plan's cohort) is 0 or does not fit a `u32`.
    #[error("cohort size must be in 1..=u32::MAX, got {0}")]
    BadCohort(usize),
    /// The dropout tolerance is outside `[0, 1)`.
    #[error("dropout tolerance must be in [0, 1), got {0}")]
    BadDropoutTolerance(f64),
    /// The scale override is not finite and positive.
    #[error("scale must be finite and > 0, got {0}")]
    BadScale(f64),
    /// The round's cohort exceeds the configured `max_cohort`.
    #[error("cohort of {cohort} exceeds max_cohort {max}")]
    CohortTooLarge {
        /// The requested cohort.
        cohort: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The sum of the cohort's vectors could exceed the modulus (or no scale avoids it).
    #[error("the sum could overflow the modulus: worst case {worst} >= 2^(bits-1) = {limit}")]
    Overflow {
        /// The worst-case absolute value of a coordinate of the sum (a bound).
        worst: f64,
        /// 2^(bits−1).
        limit: f64,
    },
    /// The modulus is too small for this cohort and model: rounding would inflate the sensitivity
    /// by more than [`MAX_ROUNDING_INFLATION`].
    #[error(
        "modulus too coarse: rounding inflates the sensitivity by {inflation:.3} (> {MAX_ROUNDING_INFLATION})"
    )]
    TooCoarse {
        /// `√p/(γC)`.
        inflation: f64,
    },
    /// The device noise is below what the noise multiplier and the survivors require, or below
    /// [`MIN_DEVICE_STD`].
    #[error("device noise std {have} is below the required {need}")]
    NoiseTooSmall {
        /// The plan's (or configuration's) device noise std.
        have: f64,
        /// The required minimum.
        need: f64,
    },
    /// The noise truncation bound costs more than [`MAX_TRUNCATION_TV`] in total variation.
    #[error("noise truncation at ±{bound} costs total variation {tv:e} > {MAX_TRUNCATION_TV:e}")]
    TruncationTooTight {
        /// The plan's bound.
        bound: i64,
        /// Its total-variation cost for the round.
        tv: f64,
    },
    /// The plan's fields contradict each other (padding, survivors, negative values).
    #[error("inconsistent plan: {0}")]
    Inconsistent(String),
}

/// Why [`encode`] refused an update. Nothing is sent when this happens.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The plan is invalid.
    #[error(transparent)]
    Plan(#[from] DistributedDpError),
    /// The update's length is not the plan's `dim`.
    #[error("update has {got} values, the plan expects {expected}")]
    Length {
        /// `plan.dim`.
        expected: usize,
        /// The update's length.
        got: usize,
    },
    /// The update holds NaN or ±∞.
    #[error("update value {index} is not finite")]
    NonFinite {
        /// The first offending index.
        index: usize,
    },
    /// The noise sampler failed or returned a value beyond the bound.
    #[error(transparent)]
    Noise(#[from] NoiseError),
}

/// Why [`decode_sum`] refused a sum.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The plan is invalid.
    #[error(transparent)]
    Plan(#[from] DistributedDpError),
    /// The sum's length is not the plan's `padded_dim`.
    #[error("sum has {got} values, the plan expects {expected}")]
    Length {
        /// `plan.padded_dim`.
        expected: usize,
        /// The sum's length.
        got: usize,
    },
    /// A value of the sum is not reduced mod 2^bits.
    #[error("sum value {index} = {value} is not below 2^bits")]
    NotReduced {
        /// The first offending index.
        index: usize,
        /// Its value.
        value: u32,
    },
    /// Fewer devices than `min_survivors` (or more than the cohort) contributed: the sum lacks
    /// the planned noise (or is not this round's).
    #[error("{contributors} contributors, the plan needs {min}..={max}")]
    Contributors {
        /// The number of contributors.
        contributors: usize,
        /// `plan.min_survivors`.
        min: usize,
        /// `plan.cohort`.
        max: usize,
    },
}

/// A device's encoded update.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    /// `padded_dim` values mod 2^bits, to be summed by secure aggregation.
    pub values: Vec<u32>,
    /// L2 norm of the update before clipping (for adaptive clipping's indicator).
    pub norm_before_clip: f64,
}

fn padded(dim: usize, rotation: bool) -> usize {
    if rotation { dim.next_power_of_two() } else { dim }
}

/// `2^(bits−1)` as f64.
fn half_modulus(bits: u32) -> f64 {
    2f64.powi(bits.saturating_sub(1) as i32)
}

fn mask(bits: u32) -> u32 {
    if bits >= 32 { u32::MAX } else { (1u32 << bits) - 1 }
}

/// The tail factor `t` with `count·2·exp(−t²/2) = η₀`: values beyond `t·σ` have total mass ≤ η₀
/// over `count` draws.
fn tail_factor(count: f64) -> f64 {
    (2.0 * (2.0 * count.max(1.0) / MAX_TRUNCATION_TV).ln()).sqrt()
}

/// Upper bound on `P(|Z| > bound)` for `Z ~ N_Z(0, std²)`.
fn tail_mass(std: f64, bound: i64) -> f64 {
    if std == 0.0 {
        return 0.0;
    }
    let b = bound.max(0) as f64;
    (2.0 * (-(b * b) / (2.0 * std * std)).exp()).min(1.0)
}

/// `⌈(1−ρ)·n⌉`, in `1..=n`.
fn survivors(cohort: usize, rho: f64) -> usize {
    (((1.0 - rho) * cohort as f64).ceil() as usize).clamp(1, cohort.max(1))
}

/// KLS21's τ = 10·Σ_{k=1}^{n−1} exp(−2π²σ²·k/(k+1)) (an upper bound for very large `n`).
fn kls_tau(n: u64, sigma: f64) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let c = 2.0 * std::f64::consts::PI * std::f64::consts::PI * sigma * sigma;
    let term = |k: u64| (-c * k as f64 / (k as f64 + 1.0)).exp();
    if term(1) == 0.0 {
        return 0.0;
    }
    const EXACT: u64 = 100_000;
    let last = (n - 1).min(EXACT);
    let mut sum: f64 = (1..=last).map(term).sum();
    if n - 1 > last {
        // The terms decrease in k, so each remaining one is at most the last exact term.
        sum += (n - 1 - last) as f64 * term(last);
    }
    10.0 * sum
}

/// The KLS21 ε (zCDP ½ε²) of the sum of `n` i.i.d. `N_Z(0, σ²)` added to a `d`-dimensional integer
/// vector of L2 sensitivity `delta`.
pub fn kls_epsilon(delta: f64, n: u64, sigma: f64, d: u64) -> f64 {
    if sigma <= 0.0 || n == 0 {
        return f64::INFINITY;
    }
    let tau = kls_tau(n, sigma);
    let (nf, df) = (n as f64, d as f64);
    let a = (delta * delta / (nf * sigma * sigma) + 2.0 * tau * df).sqrt();
    let b = delta / (nf.sqrt() * sigma) + tau * df.sqrt();
    a.min(b)
}

impl DistributedDpConfig {
    /// Checks every field's range; returns the padded length.
    fn check_fields(&self) -> Result<usize, DistributedDpError> {
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err(DistributedDpError::BadClip(self.clip));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier >= 0.0) {
            return Err(DistributedDpError::BadNoiseMultiplier(self.noise_multiplier));
        }
        if self.dim == 0 || self.dim > MAX_DIM {
            return Err(DistributedDpError::BadDim(self.dim));
        }
        if !(1..=32).contains(&self.bits) {
            return Err(DistributedDpError::BadBits(self.bits));
        }
        if self.max_cohort == 0 || u32::try_from(self.max_cohort).is_err() {
            return Err(DistributedDpError::BadCohort(self.max_cohort));
        }
        if !(self.dropout_tolerance.is_finite() && (0.0..1.0).contains(&self.dropout_tolerance)) {
            return Err(DistributedDpError::BadDropoutTolerance(self.dropout_tolerance));
        }
        if let Some(s) = self.scale
            && !(s.is_finite() && s > 0.0)
        {
            return Err(DistributedDpError::BadScale(s));
        }
        Ok(padded(self.dim, self.rotation))
    }

    /// The tail factor of the truncation for this configuration (over `max_cohort · p` draws).
    fn tail(&self, p: usize) -> f64 {
        tail_factor(self.max_cohort as f64 * p as f64)
    }

    /// `n·σ_dev(n) ≤ K·Δ₂` for every `n ≤ max_cohort`, with `K = z·√(max_cohort/(1−ρ))`.
    fn noise_growth(&self) -> f64 {
        self.noise_multiplier * (self.max_cohort as f64 / (1.0 - self.dropout_tolerance)).sqrt()
    }

    /// The worst-case |coordinate| of a sum of up to `max_cohort` vectors at scale `gamma` (a bound
    /// valid for every cohort size).
    fn worst_sum(&self, gamma: f64, p: usize) -> f64 {
        let n = self.max_cohort as f64;
        let delta = gamma * self.clip + (p as f64).sqrt();
        let noise =
            if self.noise_multiplier > 0.0 { self.tail(p) * self.noise_growth() * delta } else { 0.0 };
        n * (gamma * self.clip + 2.0) + noise
    }

    /// γ: the override, or the largest scale for which no sum of up to `max_cohort` vectors can
    /// overflow. Fails like [`validate`](Self::validate) on the fields and the overflow.
    pub fn resolved_scale(&self) -> Result<f64, DistributedDpError> {
        let p = self.check_fields()?;
        let limit = half_modulus(self.bits);
        let gamma = match self.scale {
            Some(s) => s,
            None => {
                // worst_sum is linear in γ: N(γC + 2) + T·K·(γC + √p) < 2^(bits−1).
                let n = self.max_cohort as f64;
                let tk = if self.noise_multiplier > 0.0 { self.tail(p) * self.noise_growth() } else { 0.0 };
                let room = limit - 2.0 * n - tk * (p as f64).sqrt();
                let gc = room / (n + tk) * (1.0 - 1e-9);
                if !(gc > 0.0) {
                    return Err(DistributedDpError::Overflow { worst: self.worst_sum(0.0, p), limit });
                }
                gc / self.clip
            }
        };
        let worst = self.worst_sum(gamma, p);
        if !(worst < limit) {
            return Err(DistributedDpError::Overflow { worst, limit });
        }
        Ok(gamma)
    }

    /// Validates the configuration: field ranges, no overflow for any cohort up to `max_cohort`
    /// (`max_cohort·(γC + 2) + tail·z·Δ₂·√(max_cohort/(1−ρ)) < 2^(bits−1)`, see the module docs),
    /// rounding inflation at most [`MAX_ROUNDING_INFLATION`], and `σ_dev ≥ 1` at `max_cohort`
    /// when there is noise.
    pub fn validate(&self) -> Result<(), DistributedDpError> {
        let gamma = self.resolved_scale()?;
        let p = padded(self.dim, self.rotation);
        let inflation = (p as f64).sqrt() / (gamma * self.clip);
        if !(inflation <= MAX_ROUNDING_INFLATION) {
            return Err(DistributedDpError::TooCoarse { inflation });
        }
        if self.noise_multiplier > 0.0 {
            let m = survivors(self.max_cohort, self.dropout_tolerance) as f64;
            let std = self.noise_multiplier * (gamma * self.clip + (p as f64).sqrt()) / m.sqrt();
            if !(std >= MIN_DEVICE_STD) {
                return Err(DistributedDpError::NoiseTooSmall { have: std, need: MIN_DEVICE_STD });
            }
        }
        Ok(())
    }

    /// The plan of a round with `cohort` selected devices. Refuses an invalid configuration and a
    /// cohort of 0 or above `max_cohort`.
    pub fn plan(&self, cohort: usize, rotation_seed: u64) -> Result<QuantPlan, DistributedDpError> {
        self.validate()?;
        if cohort == 0 {
            return Err(DistributedDpError::BadCohort(cohort));
        }
        if cohort > self.max_cohort {
            return Err(DistributedDpError::CohortTooLarge { cohort, max: self.max_cohort });
        }
        let gamma = self.resolved_scale()?;
        let p = padded(self.dim, self.rotation);
        let m = survivors(cohort, self.dropout_tolerance);
        let delta = gamma * self.clip + (p as f64).sqrt();
        let std = self.noise_multiplier * delta / (m as f64).sqrt();
        let bound = if std > 0.0 { (self.tail(p) * std).ceil() as i64 } else { 0 };
        // Field ranges were checked: dim ≤ 2^28, cohort ≤ max_cohort ≤ u32::MAX.
        let to_u32 = |v: usize| u32::try_from(v).map_err(|_| DistributedDpError::BadCohort(v));
        let plan = QuantPlan {
            clip: self.clip,
            scale: gamma,
            bits: self.bits,
            dim: to_u32(self.dim)?,
            padded_dim: to_u32(p)?,
            rotation_seed: self.rotation.then_some(rotation_seed),
            noise_multiplier: self.noise_multiplier,
            cohort: to_u32(cohort)?,
            min_survivors: to_u32(m)?,
            device_noise_std: std,
            noise_bound: bound,
        };
        plan.validate()?;
        Ok(plan)
    }

    /// Δ₂ in scaled integer units after rounding: `γC + √p` (each coordinate moves by less than 1
    /// in stochastic rounding). NaN for an invalid configuration.
    pub fn sensitivity(&self) -> f64 {
        match self.resolved_scale() {
            Ok(gamma) => gamma * self.clip + (padded(self.dim, self.rotation) as f64).sqrt(),
            Err(_) => f64::NAN,
        }
    }

    /// The rounding inflation `√p/(γC)`: the relative increase of the sensitivity caused by
    /// rounding. Infinite for an invalid configuration.
    pub fn rounding_inflation(&self) -> f64 {
        match self.resolved_scale() {
            Ok(gamma) => (padded(self.dim, self.rotation) as f64).sqrt() / (gamma * self.clip),
            Err(_) => f64::INFINITY,
        }
    }

    /// z_eff, the noise multiplier the accountant charges for a round run with `plan`:
    /// `min(z, 1/ε)` with KLS21's ε for `min_survivors` devices' noise (see the module docs);
    /// 0 without noise. Same as [`QuantPlan::accounted_multiplier`].
    pub fn accounted_multiplier(&self, plan: &QuantPlan) -> f64 {
        plan.accounted_multiplier()
    }

    /// The total variation by which the truncation of the noise changes the round's mechanism:
    /// `η ≤ cohort·p·2·exp(−bound²/(2σ_dev²))`. Same as [`QuantPlan::truncation_tv`].
    pub fn truncation_tv(&self, plan: &QuantPlan) -> f64 {
        plan.truncation_tv()
    }
}

impl QuantPlan {
    /// Δ₂ of the plan: `γC + √p`.
    pub fn sensitivity(&self) -> f64 {
        self.scale * self.clip + f64::from(self.padded_dim).sqrt()
    }

    /// See [`DistributedDpConfig::accounted_multiplier`].
    pub fn accounted_multiplier(&self) -> f64 {
        if self.noise_multiplier <= 0.0 || self.device_noise_std <= 0.0 || self.min_survivors == 0 {
            return 0.0;
        }
        let eps = kls_epsilon(
            self.sensitivity(),
            u64::from(self.min_survivors),
            self.device_noise_std,
            u64::from(self.padded_dim),
        );
        if !(eps > 0.0 && eps.is_finite()) {
            return 0.0;
        }
        (1.0 / eps).min(self.noise_multiplier)
    }

    /// See [`DistributedDpConfig::truncation_tv`].
    pub fn truncation_tv(&self) -> f64 {
        let draws = f64::from(self.cohort) * f64::from(self.padded_dim);
        (draws * tail_mass(self.device_noise_std, self.noise_bound)).min(1.0)
    }

    /// The device-side check: refuses bits outside `1..=32`, absurd or inconsistent sizes, a
    /// possible overflow of the sum of `cohort` vectors (exact integer check), device noise below
    /// `z·Δ₂/√min_survivors` (or below [`MIN_DEVICE_STD`]) when `z > 0`, and a truncation costing
    /// more than [`MAX_TRUNCATION_TV`].
    pub fn validate(&self) -> Result<(), DistributedDpError> {
        let bad = |s: &str| Err(DistributedDpError::Inconsistent(s.to_owned()));
        if !(1..=32).contains(&self.bits) {
            return Err(DistributedDpError::BadBits(self.bits));
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err(DistributedDpError::BadClip(self.clip));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(DistributedDpError::BadScale(self.scale));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier >= 0.0) {
            return Err(DistributedDpError::BadNoiseMultiplier(self.noise_multiplier));
        }
        let dim = self.dim as usize;
        if dim == 0 || dim > MAX_DIM {
            return Err(DistributedDpError::BadDim(dim));
        }
        if self.padded_dim as usize != padded(dim, self.rotation_seed.is_some()) {
            return bad("padded_dim must be dim without rotation and dim.next_power_of_two() with it");
        }
        if self.cohort == 0 {
            return Err(DistributedDpError::BadCohort(0));
        }
        if self.min_survivors == 0 || self.min_survivors > self.cohort {
            return bad("min_survivors must be in 1..=cohort");
        }
        if !(self.device_noise_std.is_finite() && self.device_noise_std >= 0.0) || self.noise_bound < 0 {
            return bad("device_noise_std and noise_bound must be finite and >= 0");
        }
        // Overflow, exactly: cohort·(⌊γC⌋ + 1 + bound) < 2^(bits−1).
        let limit = half_modulus(self.bits);
        let gc = self.scale * self.clip;
        if !(gc < limit) {
            return Err(DistributedDpError::Overflow { worst: gc, limit });
        }
        let per_device = gc.floor() as u128 + 1 + self.noise_bound as u128;
        let worst = u128::from(self.cohort) * per_device;
        if worst >= 1u128 << (self.bits - 1) {
            return Err(DistributedDpError::Overflow { worst: worst as f64, limit });
        }
        if self.noise_multiplier > 0.0 {
            let need = self.noise_multiplier * self.sensitivity() / f64::from(self.min_survivors).sqrt();
            let need = need.max(MIN_DEVICE_STD);
            if !(self.device_noise_std >= need * (1.0 - 1e-12)) {
                return Err(DistributedDpError::NoiseTooSmall { have: self.device_noise_std, need });
            }
        }
        let tv = self.truncation_tv();
        if !(tv <= MAX_TRUNCATION_TV) {
            return Err(DistributedDpError::TruncationTooTight { bound: self.noise_bound, tv });
        }
        Ok(())
    }
}

/// Device: encodes one update (dense, length `plan.dim`) into `plan.padded_dim` values mod
/// 2^bits — clip to `C` (L2), rotate (if the plan has a seed), scale by γ, unbiased stochastic
/// rounding, add `N_Z(0, σ_dev²)` truncated at `±noise_bound` drawn by `sampler`, reduce mod
/// 2^bits. `rng` drives the rounding (and the fast sampler). Refuses an invalid plan, a wrong
/// length and NaN/±∞ values; huge values are clipped.
pub fn encode(
    update: &[f32],
    plan: &QuantPlan,
    sampler: &dyn DiscreteGaussian,
    rng: &mut dyn rand::Rng,
) -> Result<Encoded, EncodeError> {
    plan.validate()?;
    let (dim, p) = (plan.dim as usize, plan.padded_dim as usize);
    if update.len() != dim {
        return Err(EncodeError::Length { expected: dim, got: update.len() });
    }
    if let Some(index) = update.iter().position(|v| !v.is_finite()) {
        return Err(EncodeError::NonFinite { index });
    }
    let norm = l2(update.iter().map(|&v| f64::from(v)));
    let factor = if norm > plan.clip { plan.clip / norm } else { 1.0 };
    let mut x = vec![0.0f64; p];
    for (xi, &u) in x.iter_mut().zip(update) {
        *xi = f64::from(u) * factor;
    }
    if let Some(seed) = plan.rotation_seed {
        rotation::rotate(&mut x, seed);
        // The rotation preserves L2 up to float error; keep ‖x‖ ≤ C exactly as the bound assumes.
        let n = l2(x.iter().copied());
        if n > plan.clip {
            let f = plan.clip / n;
            x.iter_mut().for_each(|v| *v *= f);
        }
    }
    let max_abs = (plan.scale * plan.clip).floor() as i64 + 1;
    let mut noise = vec![0i64; p];
    if plan.device_noise_std > 0.0 {
        sampler.sample_into(&mut noise, plan.device_noise_std, plan.noise_bound, rng)?;
        if let Some(z) = noise.iter().find(|z| z.abs() > plan.noise_bound) {
            return Err(EncodeError::Noise(NoiseError::Sampler(format!(
                "{} returned {z}, beyond the bound {}",
                sampler.name(),
                plan.noise_bound
            ))));
        }
    }
    let m = mask(plan.bits);
    let values = x
        .iter()
        .zip(&noise)
        .map(|(&xi, &z)| {
            let v = xi * plan.scale;
            let floor = v.floor();
            let up = rng.random::<f64>() < v - floor;
            let r = (floor as i64 + i64::from(up)).clamp(-max_abs, max_abs);
            // Two's complement: the low 32 bits, then masked to `bits`.
            ((r + z) as u32) & m
        })
        .collect();
    Ok(Encoded { values, norm_before_clip: norm })
}

fn l2(values: impl Iterator<Item = f64>) -> f64 {
    values.map(|v| v * v).sum::<f64>().sqrt()
}

/// Adds `values` into `acc` mod 2^bits (what secure aggregation computes; for the simulator and
/// tests). Refuses mismatched lengths.
pub fn add_mod(acc: &mut [u32], values: &[u32], plan: &QuantPlan) -> Result<(), DecodeError> {
    if acc.len() != values.len() || acc.len() != plan.padded_dim as usize {
        return Err(DecodeError::Length { expected: plan.padded_dim as usize, got: values.len() });
    }
    let m = mask(plan.bits);
    for (a, v) in acc.iter_mut().zip(values) {
        *a = a.wrapping_add(*v) & m;
    }
    Ok(())
}

/// Coordinator: decodes the modular sum of the devices' vectors — centred lift to
/// `(−2^(bits−1), 2^(bits−1)]`, divide by γ, inverse rotation, truncate to `dim`. Refuses an
/// invalid plan, a wrong length and unreduced values. Use [`decode_sum_checked`] to also refuse a
/// sum with fewer than `min_survivors` contributions.
pub fn decode_sum(sum: &[u32], plan: &QuantPlan) -> Result<Vec<f64>, DecodeError> {
    plan.validate()?;
    let p = plan.padded_dim as usize;
    if sum.len() != p {
        return Err(DecodeError::Length { expected: p, got: sum.len() });
    }
    let m = mask(plan.bits);
    if let Some(index) = sum.iter().position(|&v| v > m) {
        return Err(DecodeError::NotReduced { index, value: sum[index] });
    }
    let modulus = 1i64 << plan.bits;
    let half = modulus / 2;
    let mut x: Vec<f64> = sum
        .iter()
        .map(|&v| {
            let v = i64::from(v);
            let lifted = if v > half { v - modulus } else { v };
            lifted as f64 / plan.scale
        })
        .collect();
    if let Some(seed) = plan.rotation_seed {
        rotation::unrotate(&mut x, seed);
    }
    x.truncate(plan.dim as usize);
    Ok(x)
}

/// [`decode_sum`] for a sum of `contributors` devices' vectors: refuses fewer than
/// `min_survivors` (the sum would lack the planned noise) or more than the cohort.
pub fn decode_sum_checked(
    sum: &[u32],
    plan: &QuantPlan,
    contributors: usize,
) -> Result<Vec<f64>, DecodeError> {
    let (min, max) = (plan.min_survivors as usize, plan.cohort as usize);
    if contributors < min || contributors > max {
        return Err(DecodeError::Contributors { contributors, min, max });
    }
    decode_sum(sum, plan)
}
