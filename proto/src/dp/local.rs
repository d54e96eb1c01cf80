//! Local differential privacy: the device clips and noises its own update before it leaves, for
//! deployments that do not trust the coordinator, and keeps its own ledger.
//!
//! Under local DP the update is sent **dense**: noise goes on every coordinate, because a
//! row-sparse update would reveal which items the user touched. Each release is a Gaussian
//! mechanism with sensitivity `C` on the user's data, accounted with `q = 1` (a device cannot rely
//! on the coordinator's sampling for amplification).

use super::accountant::{Mechanism, RdpAccountant};
use super::noise::add_gaussian_f32;
use super::params::{ClipNorm, Delta, NoiseMultiplier, SamplingRate};
use crate::strategy::norm::clip_l2;
use crate::update::{Update, UpdateError};
use serde::{Deserialize, Serialize};

/// Clips `update` to `clip` and adds `N(0, (σ·C)²)` to every coordinate; returns the dense result.
pub fn privatize(
    update: &Update,
    clip: ClipNorm,
    sigma: NoiseMultiplier,
    rng: &mut dyn rand::Rng,
) -> Result<Update, UpdateError> {
    let mut clipped = update.clone();
    clip_l2(&mut clipped, clip.get());
    let mut dense = clipped.to_dense();
    add_gaussian_f32(&mut dense, sigma.get() * clip.get(), rng);
    Update::dense(update.shape(), dense)
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

/// A device's own privacy ledger under local DP.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceLedger {
    delta: Delta,
    releases: Vec<LocalRelease>,
    accountant: RdpAccountant,
}

impl DeviceLedger {
    /// An empty ledger measuring ε at `delta`.
    pub fn new(delta: Delta) -> Self {
        Self { delta, releases: Vec::new(), accountant: RdpAccountant::default() }
    }

    /// Records a release (and returns ε spent after it).
    pub fn record(&mut self, release: LocalRelease) -> f64 {
        if let (Ok(q), Ok(sigma)) = (SamplingRate::new(1.0), NoiseMultiplier::new(release.sigma)) {
            self.accountant.compose(&Mechanism { q, sigma, steps: 1 });
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
