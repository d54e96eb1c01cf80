//! An empirical privacy audit of a simulated run: canary clients, after Andrew, Kairouz, Oh,
//! Oprea, McMahan and Suriyakumar, "One-shot Empirical Privacy Estimation for Federated Learning"
//! (ICLR 2024).
//!
//! `K` canary clients join the fleet as **additional** clients (ids `users..users + K`): they check
//! in, are selected and drop out like everybody else, but hold no data and are never evaluated.
//! Canary `i` owns a random unit direction `u_i` in the space of the global parameters (isotropic
//! Gaussian, normalised, from a stream seeded by the run's seed and `i`); whenever it is given a
//! task it sends `u_i` scaled to just under the round's clip norm (the plan's `clip_norm`), dense,
//! through the same encoding, session machine and codec as any update, with the largest weight the
//! round engine admits (`max_weight`; weights are ignored under DP) and a non-finite loss (so it
//! is left out of the round's mean loss). That is the loudest update a client can send that
//! clipping leaves untouched. `K` held-out directions `v_j`, drawn the same way from another
//! stream, are never sent.
//!
//! After the run, with `Δ` the final global parameters minus the initial ones, the audit computes
//! `cos(Δ, u_i)` and `cos(Δ, v_j)` and fits a Gaussian to each set (sample mean, sample standard
//! deviation). The **empirical ε** is the ε at δ of the Gaussian mechanism with
//! `μ = (mean_inserted − mean_held_out) / std_held_out` ([`gaussian_mechanism_epsilon`], the
//! analytic formula of Balle and Wang 2018): the two fits are taken to share the held-out spread.
//! The exact ε of the two fitted Gaussians with their own spreads ([`epsilon_two_gaussians`], the
//! paper's estimator with the held-out fit in place of its analytic null `N(0, 1/d)`) is reported
//! beside it; it is far more sensitive to the fitted spreads than to the means (a 14% difference in
//! standard deviation alone gives ε ≈ 2.4 at δ = 10⁻⁵), so with tens of canaries its sampling noise
//! dominates — which is why it is not the headline figure.
//!
//! The figure is an **estimate** of a lower bound on the ε the final model leaks about one client
//! (an adversary who sees the final model only and knows the canary directions); it is not a proof
//! of anything. It can come out above the accountant's ε when its Gaussian fits are off (few
//! canaries), and far below it because the accountant covers every intermediate model and the
//! worst case, the audit one final model. See `docs/privacy.md` ("Empirical audit").

use super::{PrivacyMode, SimConfig, SimError, TransportKind};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use starling_proto::harness::{TrainJob, TrainResult, Trainer};
use starling_proto::ids::ClientId;
use starling_proto::message::EvalMetrics;
use starling_proto::message::LocalMetrics;
use starling_proto::session::TrainRequest;
use starling_proto::time::Duration;
use starling_proto::update::{ModelShape, Update};
use std::f64::consts::SQRT_2;
use std::sync::Arc;

/// The audit's settings ([`SimConfig::audit`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AuditConfig {
    /// Canary clients inserted (and as many held-out directions); at least 2.
    pub canaries: usize,
    /// δ at which the empirical ε is reported; under central DP it must be the ledger's δ.
    pub delta: f64,
}

/// Canaries are inserted at most this close to the clip norm, so that rounding to `f32` never
/// takes one over it (clipping would then touch it, and adaptive clipping would count it clipped).
const UNDER_CLIP: f64 = 1.0 - 1e-6;

const INSERTED_STREAM: u64 = 0xCA4A_7100_0000_0001;
const HELD_OUT_STREAM: u64 = 0xCA4A_7100_0000_0002;

/// Checks the audit settings against the rest of the run; `Ok(0)` without an audit, else the
/// number of canaries.
pub fn validate(config: &SimConfig) -> Result<usize, SimError> {
    let Some(audit) = config.audit else { return Ok(0) };
    let bad = |s: String| Err(SimError::Config(s));
    if audit.canaries < 2 {
        return bad(format!("the audit needs at least 2 canaries to fit a Gaussian, got {}", audit.canaries));
    }
    if !(audit.delta > 0.0 && audit.delta < 1.0) {
        return bad(format!("the audit's delta must be in (0, 1), got {}", audit.delta));
    }
    if config.transport == TransportKind::Quic {
        return bad(
            "--audit-canaries forges canary clients' updates in the simulator; --transport quic runs \
             unmodified SDK clients (like --attackers, the audit needs --transport in-process)"
                .into(),
        );
    }
    match config.privacy {
        PrivacyMode::Local { .. } => {
            bad("--audit-canaries audits the coordinator's release (--dp off or --dp central); under --dp \
             local every device noises its own update and keeps its own ledger"
                .into())
        }
        PrivacyMode::Central { delta, .. } if delta != audit.delta => {
            bad(format!("the audit's delta ({}) must be the ledger's delta ({delta})", audit.delta))
        }
        _ => Ok(audit.canaries),
    }
}

/// The canaries of a run: which clients they are and their directions.
#[derive(Clone, Debug)]
pub struct CanarySet {
    first: u64,
    count: usize,
    shape: ModelShape,
    seed: u64,
}

impl CanarySet {
    /// `count` canaries with ids `first..first + count` in the global parameter space of `shape`.
    pub fn new(first: u64, count: usize, shape: ModelShape, seed: u64) -> Self {
        Self { first, count, shape, seed }
    }

    /// Canary `client`'s index, if `client` is a canary.
    pub fn index(&self, client: ClientId) -> Option<usize> {
        let k = client.0.checked_sub(self.first)?;
        (k < self.count as u64).then_some(k as usize)
    }

    /// How many canaries.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The dimension `d` of the directions: every global parameter.
    pub fn dimension(&self) -> usize {
        self.shape.len()
    }

    fn direction(&self, stream: u64, i: usize) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.seed ^ stream ^ (i as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let mut v: Vec<f64> = (0..self.shape.len()).map(|_| rng.sample::<f64, _>(StandardNormal)).collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }

    /// The unit direction canary `i` inserts.
    pub fn inserted(&self, i: usize) -> Vec<f64> {
        self.direction(INSERTED_STREAM, i)
    }

    /// Held-out unit direction `j` (never sent).
    pub fn held_out(&self, j: usize) -> Vec<f64> {
        self.direction(HELD_OUT_STREAM, j)
    }

    /// What canary `i` sends for a task whose plan clips to `clip`: its direction at just under
    /// that norm, claiming `weight`. `None` without a clip norm (no mode of the simulator plans one).
    pub fn result(&self, i: usize, clip: Option<f32>, weight: f32) -> Option<TrainResult> {
        let clip = f64::from(clip.filter(|c| c.is_finite() && *c > 0.0)?) * UNDER_CLIP;
        let values = self.inserted(i).into_iter().map(|x| (x * clip) as f32).collect();
        let update = Update::dense(self.shape, values).ok()?;
        // A non-finite loss keeps canaries out of the round's mean loss.
        // Its norm is within the clip norm: the honest adaptive-clipping indicator says so.
        let metrics =
            LocalMetrics { loss: f32::NAN, hit_rate_at_10: None, train_ms: 0, norm_within_clip: Some(true) };
        Some(TrainResult { update, weight, metrics })
    }

    /// The audit of a run whose global parameters went from `initial` to `last`; `accountant` is
    /// the ledger's ε (at `delta`), if the run had one.
    pub fn measure(
        &self,
        initial: &[f32],
        last: &[f32],
        delta: f64,
        accountant: Option<f64>,
        sent: usize,
    ) -> AuditReport {
        let change: Vec<f64> = last.iter().zip(initial).map(|(a, b)| f64::from(*a) - f64::from(*b)).collect();
        let norm = change.iter().map(|x| x * x).sum::<f64>().sqrt();
        let cosine = |u: Vec<f64>| {
            if norm > 0.0 { u.iter().zip(&change).map(|(a, b)| a * b).sum::<f64>() / norm } else { 0.0 }
        };
        let inserted: Vec<f64> = (0..self.count).map(|i| cosine(self.inserted(i))).collect();
        let held_out: Vec<f64> = (0..self.count).map(|j| cosine(self.held_out(j))).collect();
        let (ins, null) = (Gaussian::fit(&inserted), Gaussian::fit(&held_out));
        let (mu, unequal) = if norm > 0.0 {
            ((ins.mean - null.mean) / null.std, epsilon_two_gaussians(null, ins, delta))
        } else {
            // The model did not move: it says nothing about anyone.
            (0.0, 0.0)
        };
        AuditReport {
            canaries: self.count,
            delta,
            empirical_epsilon: gaussian_mechanism_epsilon(mu, delta),
            accountant_epsilon: accountant,
            inserted_cosine_mean: ins.mean,
            inserted_cosine_std: ins.std,
            held_out_cosine_mean: null.mean,
            held_out_cosine_std: null.std,
            dimension: self.dimension(),
            canary_updates: sent,
            mu,
            empirical_epsilon_unequal_variances: unequal,
        }
    }
}

/// `results.json`'s `audit` object. See the module docs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditReport {
    /// Canary clients inserted (= held-out directions).
    pub canaries: usize,
    /// δ of both ε figures.
    pub delta: f64,
    /// The estimate: ε at δ of the Gaussian mechanism with [`mu`](Self::mu).
    pub empirical_epsilon: f64,
    /// The ledger's ε at δ (`None` without central DP).
    pub accountant_epsilon: Option<f64>,
    /// Mean cosine between the model's change and the inserted directions.
    pub inserted_cosine_mean: f64,
    /// Sample standard deviation of those cosines.
    pub inserted_cosine_std: f64,
    /// Mean cosine between the model's change and the held-out directions (about 0).
    pub held_out_cosine_mean: f64,
    /// Sample standard deviation of those cosines (about `1/√dimension`).
    pub held_out_cosine_std: f64,
    /// Number of global parameters `d`.
    pub dimension: usize,
    /// Canary updates handed to the network over the run (dropped ones included).
    pub canary_updates: usize,
    /// `(inserted mean − held-out mean) / held-out std`.
    pub mu: f64,
    /// ε at δ between the two fitted Gaussians with their own spreads (noisier; see the module docs).
    pub empirical_epsilon_unequal_variances: f64,
}

impl AuditReport {
    /// One sentence for the terminal and the HTML report.
    pub fn summary(&self) -> String {
        format!(
            "privacy audit: {} canaries in d = {}, {} canary updates; empirical epsilon {:.3} (estimate) \
             against the accountant's {} at delta {:e} (mu {:.3}; with unequal variances {:.3}); cosines \
             inserted {:.4} ± {:.4}, held out {:.4} ± {:.4}",
            self.canaries,
            self.dimension,
            self.canary_updates,
            self.empirical_epsilon,
            self.accountant_epsilon.map_or_else(|| "none (DP off)".into(), |e| format!("{e:.3}")),
            self.delta,
            self.mu,
            self.empirical_epsilon_unequal_variances,
            self.inserted_cosine_mean,
            self.inserted_cosine_std,
            self.held_out_cosine_mean,
            self.held_out_cosine_std,
        )
    }

    /// The report's "Privacy audit" section: the empirical ε beside the accountant's.
    pub fn to_html(&self) -> String {
        let f = |v: f64| format!("{v:.4}");
        let accountant = self.accountant_epsilon.map_or_else(|| "– (DP off: no guarantee)".into(), f);
        format!(
            "<h2>Privacy audit</h2>\n<table id=\"audit\"><tr><th></th><th>ε at δ = {delta:e}</th></tr>\n\
             <tr><td style=\"text-align:left\">accountant (the ledger’s guarantee: an upper bound)</td><td>{accountant}</td></tr>\n\
             <tr><td style=\"text-align:left\">empirical (an estimate of a lower bound, from {k} canaries)</td><td>{emp}</td></tr>\n\
             <tr><td style=\"text-align:left\">empirical, fitted spreads unequal (noisier)</td><td>{unequal}</td></tr>\n\
             </table>\n<p>{k} canary clients joined the fleet and sent {sent} updates, each a random unit direction in the \
             {d} global parameters at the round's clip norm. Cosine of the model's total change with the inserted \
             directions {im} ± {is}, with {k} held-out directions {hm} ± {hs} (1/√d = {null}); μ = {mu}. The empirical \
             ε is an estimate for an adversary who sees the final model only, not a guarantee.</p>\n",
            delta = self.delta,
            k = self.canaries,
            emp = f(self.empirical_epsilon),
            unequal = f(self.empirical_epsilon_unequal_variances),
            sent = self.canary_updates,
            d = self.dimension,
            im = f(self.inserted_cosine_mean),
            is = f(self.inserted_cosine_std),
            hm = f(self.held_out_cosine_mean),
            hs = f(self.held_out_cosine_std),
            null = f(1.0 / (self.dimension.max(1) as f64).sqrt()),
            mu = f(self.mu),
        )
    }
}

/// Wraps the fleet's trainer: canary clients' tasks are answered with their canary update, every
/// other task goes to the wrapped trainer. Without canaries it is transparent; it derefs to the
/// wrapped trainer.
#[derive(Debug)]
pub struct Canaries<T> {
    inner: T,
    set: Option<CanarySet>,
    compute: Duration,
    weight: f32,
    sent: usize,
}

impl<T> Canaries<T> {
    /// `inner` with the canaries of `set` (none: `None`); a canary's task takes `compute` on the
    /// reference device and its update claims `weight`.
    pub fn new(inner: T, set: Option<CanarySet>, compute: Duration, weight: f32) -> Self {
        Self { inner, set, compute, weight, sent: 0 }
    }

    /// The canaries, if any.
    pub fn set(&self) -> Option<&CanarySet> {
        self.set.as_ref()
    }

    /// Canary updates handed to the network so far.
    pub fn sent(&self) -> usize {
        self.sent
    }

    /// The audit of a run from `initial` to `last` (see [`CanarySet::measure`]); `None` without
    /// canaries.
    pub fn audit(
        &self,
        initial: &[f32],
        last: &[f32],
        delta: f64,
        accountant: Option<f64>,
    ) -> Option<AuditReport> {
        Some(self.set.as_ref()?.measure(initial, last, delta, accountant, self.sent))
    }
}

impl<T> std::ops::Deref for Canaries<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> std::ops::DerefMut for Canaries<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: Trainer> Trainer for Canaries<T> {
    fn compute_time(&mut self, client: ClientId, request: &TrainRequest, params: &Arc<[f32]>) -> Duration {
        match self.set.as_ref().and_then(|s| s.index(client)) {
            Some(_) => self.compute,
            None => self.inner.compute_time(client, request, params),
        }
    }

    fn train(&mut self, jobs: &[TrainJob]) -> Vec<Option<TrainResult>> {
        let Self { inner, set, weight, sent, .. } = self;
        let Some(set) = set.as_ref() else { return inner.train(jobs) };
        if !jobs.iter().any(|j| set.index(j.client).is_some()) {
            return inner.train(jobs);
        }
        let honest: Vec<TrainJob> = jobs.iter().filter(|j| set.index(j.client).is_none()).cloned().collect();
        let mut trained = if honest.is_empty() { Vec::new() } else { inner.train(&honest) }.into_iter();
        jobs.iter()
            .map(|job| match set.index(job.client) {
                Some(i) => {
                    let r = set.result(i, job.request.plan.clip_norm, *weight);
                    *sent += usize::from(r.is_some());
                    r
                }
                None => trained.next().flatten(),
            })
            .collect()
    }

    /// Canaries are not users: they answer no evaluation task; everyone else's go to the inner
    /// trainer.
    fn evaluate(&mut self, jobs: &[TrainJob]) -> Vec<Option<EvalMetrics>> {
        let Some(set) = self.set.as_ref() else { return self.inner.evaluate(jobs) };
        let honest: Vec<TrainJob> = jobs.iter().filter(|j| set.index(j.client).is_none()).cloned().collect();
        let mut done = if honest.is_empty() { Vec::new() } else { self.inner.evaluate(&honest) }.into_iter();
        jobs.iter()
            .map(|job| if set.index(job.client).is_some() { None } else { done.next().flatten() })
            .collect()
    }
}

/// A Gaussian fitted to a sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gaussian {
    /// Mean.
    pub mean: f64,
    /// Standard deviation (positive).
    pub std: f64,
}

impl Gaussian {
    /// The sample mean and sample standard deviation (`n − 1`) of `xs`; the deviation is floored
    /// at a tiny positive number so that ε stays defined.
    pub fn fit(xs: &[f64]) -> Self {
        let n = xs.len() as f64;
        let mean = if xs.is_empty() { 0.0 } else { xs.iter().sum::<f64>() / n };
        let var =
            if xs.len() < 2 { 0.0 } else { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) };
        Self { mean, std: var.sqrt().max(1e-300) }
    }

    /// `ln P(X < t)`.
    fn log_cdf(&self, t: f64) -> f64 {
        log_phi((t - self.mean) / self.std)
    }

    /// `ln P(X > t)`.
    fn log_sf(&self, t: f64) -> f64 {
        log_phi((self.mean - t) / self.std)
    }

    /// `ln P(lo < X < hi)`, computed in the tail it lies in.
    fn log_between(&self, lo: f64, hi: f64) -> f64 {
        if lo >= hi {
            f64::NEG_INFINITY
        } else if lo > self.mean {
            log_sub(self.log_sf(lo), self.log_sf(hi))
        } else {
            log_sub(self.log_cdf(hi), self.log_cdf(lo))
        }
    }
}

/// `ln Φ(x)` (standard normal CDF), accurate deep into the lower tail.
fn log_phi(x: f64) -> f64 {
    // Φ(x) = erfc(−x/√2) / 2.
    let z = -x / SQRT_2;
    if z < 26.0 {
        return (0.5 * libm::erfc(z)).ln();
    }
    // erfc(z) ≈ e^{−z²}/(z√π) · (1 − 1/(2z²) + 3/(4z⁴) − 15/(8z⁶)); libm's erfc underflows past 26.
    let z2 = z * z;
    0.5f64.ln() - z2 - z.ln() - 0.5 * std::f64::consts::PI.ln()
        + (1.0 - 0.5 / z2 + 0.75 / (z2 * z2) - 1.875 / (z2 * z2 * z2)).ln()
}

/// `ln(e^a + e^b)`.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY { hi } else { hi + (lo - hi).exp().ln_1p() }
}

/// `ln(e^a − e^b)`, `−∞` when `a ≤ b`.
fn log_sub(a: f64, b: f64) -> f64 {
    if a <= b {
        f64::NEG_INFINITY
    } else if b == f64::NEG_INFINITY {
        a
    } else {
        a + (-(b - a).exp()).ln_1p()
    }
}

/// `ln δ_{P‖Q}(ε) = ln sup_S (P(S) − e^ε Q(S))` for Gaussians `p` and `q` (`−∞` when it is 0).
///
/// The supremum is reached on `S = {x : L(x) > ε}` with the privacy loss
/// `L(x) = ln p(x)/q(x) = a x² + b x + c`: the outside of the roots of `L − ε` when `a > 0`, the
/// inside when `a < 0`, a half-line when `a = 0`.
fn log_delta_one_way(p: Gaussian, q: Gaussian, eps: f64) -> f64 {
    let (vp, vq) = (p.std * p.std, q.std * q.std);
    let a = 0.5 / vq - 0.5 / vp;
    let b = p.mean / vp - q.mean / vq;
    let k = (q.std / p.std).ln() - p.mean * p.mean / (2.0 * vp) + q.mean * q.mean / (2.0 * vq) - eps;
    // ln P(S) and ln Q(S), S = {a x² + b x + k > 0}.
    let (log_p, log_q) = if a == 0.0 {
        if b == 0.0 {
            return f64::NEG_INFINITY; // S is everything (δ ≤ 1 − e^ε ≤ 0) or nothing.
        }
        let t = -k / b;
        if b > 0.0 { (p.log_sf(t), q.log_sf(t)) } else { (p.log_cdf(t), q.log_cdf(t)) }
    } else {
        let disc = b * b - 4.0 * a * k;
        if disc <= 0.0 {
            return f64::NEG_INFINITY; // S is everything or nothing again.
        }
        // The roots, stably (no cancellation when a is tiny).
        let h = -0.5 * (b + b.signum() * disc.sqrt());
        let (r1, r2) = (h / a, k / h);
        let (lo, hi) = (r1.min(r2), r1.max(r2));
        if a > 0.0 {
            (log_add(p.log_cdf(lo), p.log_sf(hi)), log_add(q.log_cdf(lo), q.log_sf(hi)))
        } else {
            (p.log_between(lo, hi), q.log_between(lo, hi))
        }
    };
    let factor = eps + log_q - log_p;
    if log_p == f64::NEG_INFINITY || factor >= 0.0 {
        return f64::NEG_INFINITY;
    }
    log_p + (-factor.exp()).ln_1p()
}

/// The smallest `ε ≥ 0` with `log_delta(ε) ≤ ln δ`, by bisection (`log_delta` non-increasing);
/// infinite if none below 2⁴⁰.
fn invert(log_delta: impl Fn(f64) -> f64, delta: f64) -> f64 {
    let target = delta.ln();
    if log_delta(0.0) <= target {
        return 0.0;
    }
    let mut hi = 1.0;
    while log_delta(hi) > target {
        hi *= 2.0;
        if hi > 1e12 {
            return f64::INFINITY;
        }
    }
    let mut lo = if hi > 1.0 { hi / 2.0 } else { 0.0 };
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if log_delta(mid) > target {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= 1e-12 * hi {
            break;
        }
    }
    hi
}

/// The ε at `delta` of distinguishing `a` from `b` (both directions, the larger): the smallest ε
/// with `sup_S P(S) − e^ε Q(S) ≤ δ` for `(P, Q) = (a, b)` and `(b, a)`. Exact for Gaussians of
/// any variances (the privacy-loss region is bounded by the roots of a quadratic).
pub fn epsilon_two_gaussians(a: Gaussian, b: Gaussian, delta: f64) -> f64 {
    invert(|e| log_delta_one_way(a, b, e).max(log_delta_one_way(b, a, e)), delta)
}

/// The ε at `delta` of the Gaussian mechanism whose sensitivity is `mu` noise standard deviations
/// (Balle and Wang 2018, Theorem 8: `δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)`, inverted by
/// bisection); 0 for `mu ≤ 0`.
pub fn gaussian_mechanism_epsilon(mu: f64, delta: f64) -> f64 {
    if mu.is_nan() || mu <= 0.0 {
        return 0.0;
    }
    invert(|e| log_sub(log_phi(-e / mu + mu / 2.0), e + log_phi(-e / mu - mu / 2.0)), delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canaries_are_unit_directions_sent_just_under_the_clip_norm() {
        let shape = ModelShape::new(50, 8).unwrap();
        let set = CanarySet::new(1000, 5, shape, 7);
        assert_eq!(set.index(ClientId(999)), None);
        assert_eq!(set.index(ClientId(1000)), Some(0));
        assert_eq!(set.index(ClientId(1004)), Some(4));
        assert_eq!(set.index(ClientId(1005)), None);
        let u = set.inserted(3);
        assert_eq!(u.len(), 400);
        assert!((u.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(u, set.inserted(3), "seeded");
        assert_ne!(u, set.inserted(2));
        assert_ne!(u, set.held_out(3));
        let r = set.result(3, Some(0.5), 100.0).unwrap();
        let norm = r.update.l2_norm();
        assert!(norm <= 0.5 && norm > 0.5 * (1.0 - 1e-5), "{norm}");
        assert_eq!(r.weight, 100.0);
        assert!(r.metrics.loss.is_nan());
        assert!(set.result(3, None, 1.0).is_none());
    }

    #[test]
    fn the_measure_sees_inserted_directions_and_not_held_out_ones() {
        let shape = ModelShape::new(500, 8).unwrap();
        let set = CanarySet::new(0, 20, shape, 3);
        let initial = vec![0.0f32; 4000];
        // A model that moved along every inserted direction plus isotropic noise.
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut last: Vec<f64> = (0..4000).map(|_| rng.sample::<f64, _>(StandardNormal) * 0.1).collect();
        for i in 0..20 {
            for (x, u) in last.iter_mut().zip(set.inserted(i)) {
                *x += u;
            }
        }
        let last: Vec<f32> = last.into_iter().map(|x| x as f32).collect();
        let r = set.measure(&initial, &last, 1e-5, None, 20);
        assert!((r.held_out_cosine_mean).abs() < 3.0 * r.held_out_cosine_std, "{r:?}");
        assert!((r.held_out_cosine_std * 4000f64.sqrt() - 1.0).abs() < 0.5, "{r:?}");
        assert!(r.inserted_cosine_mean > 0.1, "{r:?}");
        assert!(r.empirical_epsilon > 20.0 && r.empirical_epsilon_unequal_variances > 20.0, "{r:?}");
        // A model that did not move leaks nothing.
        let still = set.measure(&initial, &initial, 1e-5, Some(1.0), 0);
        assert_eq!((still.empirical_epsilon, still.empirical_epsilon_unequal_variances), (0.0, 0.0));
    }
}
