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
//! - [`ledger`]: the pure privacy ledger with its budget guard.
//! - [`strategy`]: [`DpFedAvg`], user-level DP-FedAvg with adaptive clipping,
//!   as a decorator over any [`Strategy`](crate::strategy::Strategy).
//! - [`local`]: local DP on the device (sensitivity 2C, the secure sampler, data-independent
//!   metadata, the coordinator's norm bound) and the device's own ledger.

pub mod accountant;
pub mod ledger;
pub mod local;
pub mod noise;
#[cfg(feature = "opendp")]
pub mod opendp;
pub mod params;
pub mod strategy;

/// L2 clipping (shared with [`NormBound`](crate::strategy::NormBound)).
pub mod clip {
    pub use crate::strategy::norm::clip_l2;
}

pub use accountant::{Mechanism, RdpAccountant, calibrate_sigma, epsilon, zcdp_epsilon};
pub use ledger::{LedgerEntry, PrivacyLedger};
pub use noise::{FastGaussian, GaussianSampler};
pub use params::{Budget, ClipNorm, Delta, Epsilon, NoiseMultiplier, Quantile, SamplingRate};
pub use strategy::{AdaptiveClipping, DpConfig, DpFedAvg};
