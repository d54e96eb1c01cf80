//! Byzantine clients: a seeded fraction of the simulated clients sends crafted updates.
//!
//! An attacker trains like everyone else (same device or kernel, same data, same clipping on the
//! device) and then replaces what it sends: [`AttackKind::Scale`] multiplies its honest update by
//! the factor, [`AttackKind::SignFlip`] negates it (times the factor), [`AttackKind::Random`] sends
//! Gaussian noise on the same rows with the honest update's norm × the factor. It also claims the
//! factor × its example count as its weight. The crafted update is well formed (finite, the model's
//! shape, the honest update's rows) and leaves through the same path as an honest one — the plan's
//! encoding, the session machine, the codec — so the coordinator's defences (re-clipping to the
//! plan's norm, the weighting policy's cap) apply to it exactly as they would in production.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use starling_proto::harness::{TrainJob, TrainResult, Trainer};
use starling_proto::ids::ClientId;
use starling_proto::session::TrainRequest;
use starling_proto::time::Duration;
use starling_proto::update::Update;
use std::collections::HashSet;
use std::sync::Arc;

/// What an attacker sends instead of its honest update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttackKind {
    /// The honest update times the factor.
    Scale,
    /// The honest update times minus the factor.
    SignFlip,
    /// Gaussian noise on the honest update's rows, with the honest norm times the factor.
    Random,
}

impl AttackKind {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            AttackKind::Scale => "scale",
            AttackKind::SignFlip => "sign-flip",
            AttackKind::Random => "random",
        }
    }
}

/// A Byzantine share of the fleet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attack {
    /// Fraction of all clients that attack (chosen by the run's seed), in `[0, 1]`.
    pub fraction: f64,
    /// What they send.
    pub kind: AttackKind,
    /// The factor (default 100).
    pub factor: f32,
}

impl Attack {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.fraction) {
            return Err(format!("attacker fraction must be in [0, 1], got {}", self.fraction));
        }
        if !(self.factor.is_finite() && self.factor > 0.0) {
            return Err(format!("attack factor must be positive and finite, got {}", self.factor));
        }
        Ok(())
    }

    /// The attacking clients among `clients`: `round(fraction × clients)` of them, sampled
    /// uniformly without replacement from `seed`.
    pub fn attackers(&self, clients: usize, seed: u64) -> HashSet<u64> {
        let n = ((self.fraction * clients as f64).round() as usize).min(clients);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xB12A_4713_0BAD_F00D);
        rand::seq::index::sample(&mut rng, clients, n).into_iter().map(|i| i as u64).collect()
    }

    /// The crafted result an attacker sends instead of `honest`; `rng` draws the random attack's
    /// noise. `None` if the crafted update could not be made finite (it is then not sent).
    pub fn craft(&self, honest: TrainResult, rng: &mut ChaCha8Rng) -> Option<TrainResult> {
        let TrainResult { mut update, weight, metrics } = honest;
        match self.kind {
            AttackKind::Scale => update.scale(self.factor),
            AttackKind::SignFlip => update.scale(-self.factor),
            AttackKind::Random => {
                let target = update.l2_norm() * f64::from(self.factor);
                let (shape, rows, values) = update.into_parts();
                let mut noise: Vec<f32> = values.iter().map(|_| StandardNormal.sample(rng)).collect();
                let norm = noise.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
                let k = if norm > 0.0 { (target / norm) as f32 } else { 0.0 };
                noise.iter_mut().for_each(|x| *x *= k);
                update = match rows {
                    Some(rows) => Update::sparse(shape, rows, noise).ok()?,
                    None => Update::dense(shape, noise).ok()?,
                };
            }
        }
        if update.values().iter().any(|v| !v.is_finite()) {
            return None;
        }
        let claimed = weight * self.factor;
        Some(TrainResult { update, weight: if claimed.is_finite() { claimed } else { f32::MAX }, metrics })
    }
}

/// Wraps the fleet's trainer: the clients in the attacker set train honestly, then send a crafted
/// update ([`Attack::craft`]); everyone else is untouched.
#[derive(Debug)]
pub struct Byzantine<T> {
    inner: T,
    attack: Option<Attack>,
    attackers: HashSet<u64>,
    seed: u64,
    crafted: usize,
}

impl<T> Byzantine<T> {
    /// `inner` with no attacker.
    pub fn honest(inner: T) -> Self {
        Self { inner, attack: None, attackers: HashSet::new(), seed: 0, crafted: 0 }
    }

    /// `inner` with `attack` among `clients` clients, chosen by `seed`.
    pub fn new(inner: T, attack: Attack, clients: usize, seed: u64) -> Self {
        let attackers = attack.attackers(clients, seed);
        Self { inner, attack: Some(attack), attackers, seed, crafted: 0 }
    }

    /// The wrapped (honest) trainer.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// The wrapped (honest) trainer, mutably.
    pub fn inner_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// How many clients attack.
    pub fn attackers(&self) -> usize {
        self.attackers.len()
    }

    /// Whether `client` attacks.
    pub fn is_attacker(&self, client: ClientId) -> bool {
        self.attackers.contains(&client.0)
    }

    /// Crafted updates handed to the network so far.
    pub fn crafted(&self) -> usize {
        self.crafted
    }
}

impl<T: Trainer> Trainer for Byzantine<T> {
    fn compute_time(&mut self, client: ClientId, request: &TrainRequest, params: &Arc<[f32]>) -> Duration {
        self.inner.compute_time(client, request, params)
    }

    fn train(&mut self, jobs: &[TrainJob]) -> Vec<Option<TrainResult>> {
        let results = self.inner.train(jobs);
        let Some(attack) = self.attack else { return results };
        results
            .into_iter()
            .zip(jobs)
            .map(|(result, job)| {
                let result = result?;
                if !self.attackers.contains(&job.client.0) {
                    return Some(result);
                }
                let stream = self.seed
                    ^ 0xA77A_C4ED_0000_0000
                    ^ job.client.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ job.request.round.0.rotate_left(40);
                let crafted = attack.craft(result, &mut ChaCha8Rng::seed_from_u64(stream));
                self.crafted += usize::from(crafted.is_some());
                crafted
            })
            .collect()
    }

    /// Attackers craft updates, not evaluations: every evaluation task is the honest device's.
    fn evaluate(&mut self, jobs: &[TrainJob]) -> Vec<Option<starling_proto::message::EvalMetrics>> {
        self.inner.evaluate(jobs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_proto::message::LocalMetrics;
    use starling_proto::update::ModelShape;

    fn honest() -> TrainResult {
        let shape = ModelShape::new(10, 2).unwrap();
        TrainResult {
            update: Update::sparse(shape, vec![1, 4], vec![3.0, 0.0, 0.0, 4.0]).unwrap(),
            weight: 7.0,
            metrics: LocalMetrics::default(),
        }
    }

    #[test]
    fn crafted_updates_are_well_formed_and_as_described() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let a = |kind| Attack { fraction: 0.1, kind, factor: 100.0 };
        let s = a(AttackKind::Scale).craft(honest(), &mut rng).unwrap();
        assert_eq!(s.update.values(), &[300.0, 0.0, 0.0, 400.0]);
        assert_eq!(s.update.rows(), Some(&[1, 4][..]));
        assert_eq!(s.weight, 700.0);
        let f = a(AttackKind::SignFlip).craft(honest(), &mut rng).unwrap();
        assert_eq!(f.update.values(), &[-300.0, 0.0, 0.0, -400.0]);
        let r = a(AttackKind::Random).craft(honest(), &mut rng).unwrap();
        assert_eq!(r.update.rows(), Some(&[1, 4][..]));
        assert!((r.update.l2_norm() - 500.0).abs() < 1e-2, "{}", r.update.l2_norm());
        assert_ne!(r.update.values(), s.update.values());
    }

    #[test]
    fn attackers_are_the_requested_share_chosen_by_seed() {
        let a = Attack { fraction: 0.1, kind: AttackKind::Scale, factor: 100.0 };
        let x = a.attackers(1000, 1);
        assert_eq!(x.len(), 100);
        assert!(x.iter().all(|&c| c < 1000));
        assert_eq!(x, a.attackers(1000, 1));
        assert_ne!(x, a.attackers(1000, 2));
        assert!(Attack { fraction: 1.5, ..a }.validate().is_err());
        assert!(Attack { factor: f32::NAN, ..a }.validate().is_err());
    }
}
