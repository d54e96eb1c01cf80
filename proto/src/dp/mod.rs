//! Differential privacy: the only home of DP math in Starling.
//!
//! - [`params`]: validated settings (clip norm, noise multiplier, δ, ε, sampling rate, quantile).
//! - [`clip`]: L2 clipping, the same function clients and the coordinator call.
//! - [`noise`]: the [`GaussianSampler`] seam and the fast sampler on the caller's seeded RNG (the
//!   module docs say which sampler runs where).
//! - `opendp` (cargo feature `opendp`): opendp's discrete Gaussian as a [`GaussianSampler`],
//!   exact or on a 2ᵏ grid, drawn from opendp's own entropy source.
//! - [`accountant`]: RDP of the Poisson-subsampled Gaussian, composition, conversion to (ε, δ),
//!   σ calibration.
//! - [`pld`]: privacy-loss-distribution accounting of the same mechanism (connect-the-dots
//!   discretisation, FFT composition over heterogeneous rounds): a tight upper bound on ε(δ),
//!   the default.
//! - [`kind`]: the choice between the two accountants ([`AccountantKind`]).
//! - [`ledger`]: the pure privacy ledger with its budget guard.
//! - [`strategy`]: [`DpFedAvg`], user-level DP-FedAvg with adaptive clipping,
//!   as a decorator over any [`Strategy`](crate::strategy::Strategy).
//! - [`distributed`]: distributed DP under secure aggregation (Kairouz, Liu & Steinke 2021): the
//!   device-side encoding (clip, rotate, scale, round, discrete Gaussian share, mod 2^bits), the
//!   coordinator's decoding of the modular sum, and the accounted noise multiplier.
//! - [`local`]: local DP on the device (sensitivity 2C, the secure sampler, data-independent
//!   metadata, the coordinator's norm bound) and the device's own ledger.

pub mod accountant;
pub mod distributed;
pub mod kind;
pub mod ledger;
pub mod local;
pub mod noise;
#[cfg(feature = "opendp")]
pub mod opendp;
pub mod params;
pub mod pld;
pub mod strategy;

/// L2 clipping (shared with [`NormBound`](crate::strategy::NormBound)).
pub mod clip {
    pub use crate::strategy::norm::clip_l2;
}

/// The largest δ·N central DP accepts: δ must be well below 1/N (N enrolled devices), or the
/// "fails with probability δ" clause may plausibly fail for someone.
pub const MAX_DELTA_TIMES_N: f64 = 0.1;

/// Adaptive clipping's indicator a client sends with its update
/// ([`LocalMetrics::norm_within_clip`](crate::message::LocalMetrics::norm_within_clip)): under
/// central DP with a clip norm, whether `update` — measured **before** clipping — is within it.
/// `None` in every other mode (under local DP nothing data-dependent leaves the device unnoised).
pub fn clip_indicator(update: &crate::update::Update, plan: &crate::message::TrainingPlan) -> Option<bool> {
    match plan.noise {
        crate::message::NoiseSettings::Central { .. } => {
            plan.clip_norm.map(|c| update.l2_norm() <= f64::from(c))
        }
        _ => None,
    }
}

pub use accountant::{Mechanism, RdpAccountant, calibrate_sigma, epsilon, zcdp_epsilon};
pub use kind::{Accountant, AccountantKind};
pub use ledger::{LedgerEntry, PrivacyLedger};
pub use noise::{FastGaussian, GaussianSampler};
pub use params::{Budget, ClipNorm, Delta, Epsilon, NoiseMultiplier, Quantile, SamplingRate};
pub use pld::{ComposedPld, PldAccountant};
pub use strategy::{AdaptiveClipping, DpConfig, DpFedAvg};
