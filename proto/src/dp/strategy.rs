//! [`DpFedAvg`]: user-level DP-FedAvg (McMahan et al. 2018) as a decorator over any strategy,
//! with optional adaptive clipping (Andrew et al. 2021).
//!
//! Each round: every checked-in device is **Poisson-sampled** — included independently with
//! probability `q = min(1, expected_participants / N)`, N being the enrolled population the host
//! supplies ([`RoundContext::population`]) — and the round takes every sampled device's report
//! (no cap: see [`SelectionPolicy::Poisson`]). Every update is clipped to L2 norm `C` (clients clip
//! too, but the coordinator never trusts that); the clipped updates are **summed with equal
//! weight**, Gaussian noise `N(0, (σ_sum·C)²)` is added to every coordinate, and the sum is divided
//! by a **fixed** denominator `q·N` — the expected number of participants — so adding or removing
//! one device moves the sum by at most `C` and the release by at most `C / (q·N)`, whatever the
//! others send. Each round is charged as the Poisson-subsampled Gaussian mechanism at that `q`. The inner strategy keeps its selection and
//! its server optimizer (FedAvg's `x += Δ`, FedAdam, …); its aggregation rule is replaced by this
//! mechanism (example weights are not used: unbounded weights would break the sensitivity bound).
//! A robust rule (median, trimmed mean) cannot be replaced silently — the operator chose it for its
//! robustness — so wrapping one is refused ([`DpConfigError::RobustRule`]); the mean-based rules
//! (weighted and row-weighted means) become the mechanism's fixed-denominator mean.
//!
//! Adaptive clipping: each update also contributes a bit `1[‖Δ‖ ≤ C]` measured by the client on
//! its update *before* clipping ([`LocalMetrics::norm_within_clip`]; the coordinator only sees
//! clipped updates, for which the bit would always be 1); the noised fraction `b̄`
//! moves the clip norm geometrically towards the target quantile γ: `C ← C·exp(−η (b̄ − γ))`. The
//! bits are a second Gaussian release; to keep the accounted noise multiplier at the configured σ,
//! the sum's multiplier is raised to `σ_sum = (σ⁻² − (2σ_b)⁻²)^{−1/2}` (Andrew et al., Thm. 1).
//!
//! Accounting: [`Strategy::admit`] refuses a round whose release would take ε past the budget, and
//! [`Strategy::apply`] records the release in the in-memory [`PrivacyLedger`]. The aggregate carries
//! the [`PrivacyCharge`]; the host must persist it before releasing the model, and replay its
//! persisted entries into [`DpFedAvg::with_ledger`] after a restart.
//!
//! Federated evaluation ([`Strategy::evaluation_release`]): one device's evaluation vector
//! `(cases, hits@10, ndcg@10, loss / EVAL_LOSS_CAP)` has L2 norm at most
//! [`EVAL_SENSITIVITY`] = 2, so its sum is released with Gaussian noise of standard deviation
//! `σ·2` per coordinate (the configured σ, not the raised `σ_sum` of adaptive clipping: an
//! evaluation releases no clipping bits), from the same sampler, over the same Poisson sample
//! (`q`). It is charged as one more round of the same mechanism — same `q`, same σ (less the
//! sampler's rounding slack, as for training) — admitted against the same budget and recorded
//! in the same ledger.

use super::accountant::{Mechanism, effective_sigma};
use super::ledger::{LedgerEntry, PrivacyLedger};
use super::noise::{FastGaussian, GaussianSampler};
use super::params::{Budget, ClipNorm, NoiseMultiplier, ParamError, Quantile, SamplingRate};
use crate::ids::ClientId;
use crate::message::{LocalMetrics, NoiseSettings, TrainingPlan};
use crate::strategy::norm::clip_l2;
use crate::strategy::{
    AdmissionError, Aggregate, AggregateError, AggregationRule, Aggregator, EVAL_SENSITIVITY, EvalNoise,
    PrivacyCharge, RoundContext, SelectionPolicy, Strategy,
};
use crate::update::{ModelShape, Update};
use std::sync::{Arc, Mutex};

/// Adaptive clipping settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaptiveClipping {
    /// γ: the quantile of update norms `C` should track (0.5 = median).
    pub target: Quantile,
    /// η: geometric learning rate of `C` (0.2 in Andrew et al.).
    pub learning_rate: f64,
    /// σ_b: standard deviation of the noise on the count of clipping bits (Andrew et al. use
    /// expected participants / 20).
    pub count_noise: f64,
}

/// Settings of [`DpFedAvg`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpConfig {
    /// Clip norm `C` (the initial one under adaptive clipping).
    pub clip: ClipNorm,
    /// σ: the noise multiplier that is accounted for.
    pub noise: NoiseMultiplier,
    /// Expected participants per round: the sampling rate is `q = min(1, this / N)` for the
    /// enrolled population N of the round, and the fixed denominator is `q·N`.
    pub expected_participants: usize,
    /// The budget.
    pub budget: Budget,
    /// Adaptive clipping, if wanted.
    pub adaptive: Option<AdaptiveClipping>,
}

/// Why a DP configuration was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DpConfigError {
    /// A parameter is out of range.
    #[error(transparent)]
    Param(#[from] ParamError),
    /// The fixed denominator is zero.
    #[error("expected_participants must be at least 1")]
    NoParticipants,
    /// Under adaptive clipping the count noise is too small for the configured σ
    /// (need 2σ_b > σ), or the learning rate is not positive.
    #[error("adaptive clipping needs count_noise > noise/2 and a positive learning rate")]
    Adaptive,
    /// The inner strategy aggregates with a robust rule (median, trimmed mean) that DP-FedAvg
    /// would silently replace by its equal-weight mean of clipped updates.
    #[error(
        "central DP (DP-FedAvg) cannot honour the robust aggregation rule {rule}: it sums clipped \
         updates with equal weight, so the {rule} would silently become a mean; use a mean-based \
         strategy (fedavg, fedavgm, fedadam, fedyogi) with DP — the clipping bounds every client's \
         influence — or turn DP off to keep the robust rule"
    )]
    RobustRule {
        /// The refused rule (`median`, `trimmed mean (β = …)`).
        rule: String,
    },
}

/// Under secure aggregation `admit` projects ε with σ times this, below the effective multiplier
/// of any distributed round (whose discreteness term is far smaller).
const SECURE_ADMISSION_SLACK: f64 = 0.999;

#[derive(Debug, Default)]
struct Shared {
    /// Noised fraction of unclipped updates from the last finished aggregation.
    unclipped_fraction: Option<f64>,
}

/// The DP-FedAvg decorator. See the module docs.
#[derive(Debug)]
pub struct DpFedAvg<S> {
    inner: S,
    config: DpConfig,
    clip: f64,
    sum_multiplier: f64,
    ledger: PrivacyLedger,
    sampler: Arc<dyn GaussianSampler>,
    shared: Arc<Mutex<Shared>>,
}

impl<S: Strategy> DpFedAvg<S> {
    /// Wraps `inner` with an empty ledger.
    pub fn new(inner: S, config: DpConfig) -> Result<Self, DpConfigError> {
        Self::with_ledger(inner, config, PrivacyLedger::new(config.budget))
    }

    /// Wraps `inner`, continuing from `ledger` (replayed from durable storage).
    pub fn with_ledger(inner: S, config: DpConfig, ledger: PrivacyLedger) -> Result<Self, DpConfigError> {
        if config.expected_participants == 0 {
            return Err(DpConfigError::NoParticipants);
        }
        match inner.aggregation_rule() {
            Some(AggregationRule::Median) => {
                return Err(DpConfigError::RobustRule { rule: "median".into() });
            }
            Some(AggregationRule::TrimmedMean { beta }) => {
                return Err(DpConfigError::RobustRule { rule: format!("trimmed mean (beta = {beta})") });
            }
            _ => {}
        }
        let sigma = config.noise.get();
        let sum_multiplier = match config.adaptive {
            None => sigma,
            Some(a) => {
                if !(a.learning_rate > 0.0 && a.count_noise.is_finite() && 2.0 * a.count_noise > sigma) {
                    return Err(DpConfigError::Adaptive);
                }
                if sigma == 0.0 { 0.0 } else { (sigma.powi(-2) - (2.0 * a.count_noise).powi(-2)).powf(-0.5) }
            }
        };
        Ok(Self {
            inner,
            clip: config.clip.get(),
            config,
            sum_multiplier,
            ledger,
            sampler: Arc::new(FastGaussian),
            shared: Arc::default(),
        })
    }

    /// Draws the noise with `sampler` instead of [`FastGaussian`] (e.g. the coordinator's opendp
    /// sampler). A discretising sampler is accounted at the multiplier it really achieves.
    pub fn with_sampler(mut self, sampler: Arc<dyn GaussianSampler>) -> Self {
        self.sampler = sampler;
        self
    }

    /// The wrapped strategy.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The settings.
    pub fn config(&self) -> &DpConfig {
        &self.config
    }

    /// The ledger (ε spent, entries).
    pub fn ledger(&self) -> &PrivacyLedger {
        &self.ledger
    }

    /// The current clip norm.
    pub fn clip_norm(&self) -> f64 {
        self.clip
    }

    /// The noise multiplier applied to the sum (above σ under adaptive clipping).
    pub fn sum_noise_multiplier(&self) -> f64 {
        self.sum_multiplier
    }

    /// The sampling rate `q = min(1, expected_participants / N)` of a round over `population`
    /// enrolled devices, or `None` when the population is unknown or empty.
    pub fn sampling_rate(&self, population: Option<u64>) -> Option<SamplingRate> {
        let n = population.filter(|n| *n > 0)? as f64;
        SamplingRate::new((self.config.expected_participants as f64 / n).min(1.0)).ok()
    }

    /// The noise multiplier charged for one round on a model of `len` parameters: the configured σ
    /// for a continuous sampler; slightly less for a discretising one (it pays for its rounding).
    pub fn accounted_sigma(&self, len: usize) -> f64 {
        let sigma = self.config.noise.get();
        if sigma == 0.0 {
            return 0.0;
        }
        let std = self.sum_multiplier * self.clip;
        let sum_slack = self.sampler.sensitivity_inflation(std, self.clip, len);
        match self.config.adaptive {
            None => sigma / sum_slack,
            Some(a) => {
                // The count of centred clipping bits has sensitivity 1/2.
                let count_slack = self.sampler.sensitivity_inflation(a.count_noise, 0.5, 1);
                if sum_slack == 1.0 && count_slack == 1.0 {
                    return sigma;
                }
                effective_sigma(self.sum_multiplier / sum_slack, a.count_noise / count_slack)
            }
        }
    }

    /// The mechanism one federated-evaluation round at sampling rate `q` releases: the four
    /// summed evaluation figures with noise `σ·2` (sensitivity 2), charged at σ divided by the
    /// sampler's rounding slack.
    pub fn evaluation_mechanism(&self, q: SamplingRate) -> Mechanism {
        let sigma = self.config.noise.get();
        let slack = if sigma == 0.0 {
            1.0
        } else {
            self.sampler.sensitivity_inflation(sigma * EVAL_SENSITIVITY, EVAL_SENSITIVITY, 4)
        };
        let sigma = NoiseMultiplier::new(sigma / slack).unwrap_or(self.config.noise);
        Mechanism { q, sigma, steps: 1 }
    }

    /// The population checks every release shares: N known, δ·N small enough.
    fn population_checks(&self, ctx: &RoundContext) -> Result<SamplingRate, AdmissionError> {
        let q = self.sampling_rate(ctx.population).ok_or(AdmissionError::UnknownPopulation)?;
        let delta = self.config.budget.delta.get();
        let population = ctx.population.unwrap_or(0);
        if delta * population as f64 > super::MAX_DELTA_TIMES_N {
            return Err(AdmissionError::DeltaTooLarge { delta, population });
        }
        Ok(q)
    }

    fn check_budget(&self, mechanism: &Mechanism) -> Result<(), AdmissionError> {
        self.ledger.check(mechanism).map(|_| ()).map_err(|e| match e {
            super::ledger::BudgetError::Exceeded { projected, budget, delta } => {
                AdmissionError::BudgetExhausted {
                    projected_epsilon: projected,
                    budget_epsilon: budget,
                    delta,
                }
            }
        })
    }

    /// The mechanism one round on a model of `len` parameters at sampling rate `q` releases.
    pub fn mechanism(&self, len: usize, q: SamplingRate) -> Mechanism {
        let sigma = NoiseMultiplier::new(self.accounted_sigma(len)).unwrap_or(self.config.noise);
        Mechanism { q, sigma, steps: 1 }
    }
}

struct DpAggregator {
    shape: ModelShape,
    clip: f64,
    sum: Vec<f64>,
    count: usize,
    centred_bits: f64,
    noise_std: f64,
    count_std: Option<f64>,
    denominator: f64,
    charge: PrivacyCharge,
    sampler: Arc<dyn GaussianSampler>,
    shared: Arc<Mutex<Shared>>,
    /// Under secure aggregation: individual updates are refused and the sum arrives noised.
    secure: bool,
}

impl Aggregator for DpAggregator {
    fn accept(&mut self, update: Update, weight: f64) -> Result<(), AggregateError> {
        self.accept_report(update, weight, &LocalMetrics::default())
    }

    fn accept_report(
        &mut self,
        mut update: Update,
        _weight: f64,
        metrics: &LocalMetrics,
    ) -> Result<(), AggregateError> {
        if self.secure {
            return Err(AggregateError::Other("secure aggregation: only the sum is accepted".into()));
        }
        if update.shape() != self.shape {
            return Err(AggregateError::ShapeMismatch { got: update.shape(), want: self.shape });
        }
        let norm = clip_l2(&mut update, self.clip);
        // The client's own indicator (measured before it clipped); a client that sent none is
        // judged on what arrived. Either way one client moves the count by at most 1/2.
        let within = metrics.norm_within_clip.unwrap_or(norm <= self.clip);
        self.centred_bits += if within { 0.5 } else { -0.5 };
        update.add_to(&mut self.sum, 1.0);
        self.count += 1;
        Ok(())
    }

    /// The decoded secure sum: every device clipped its update to `C` and added its share of the
    /// distributed noise, so nothing is clipped or noised here (the aggregator was built with
    /// zero central noise); the fixed denominator and the charge are as for central DP.
    fn accept_sum(&mut self, sum: Vec<f64>, contributors: usize) -> Result<(), AggregateError> {
        if !self.secure {
            return Err(AggregateError::SumUnsupported);
        }
        if sum.len() != self.sum.len() {
            return Err(AggregateError::ModelLength { got: sum.len(), want: self.sum.len() });
        }
        for (a, s) in self.sum.iter_mut().zip(&sum) {
            *a += s;
        }
        self.count += contributors;
        Ok(())
    }

    fn accepted(&self) -> usize {
        self.count
    }

    /// The clipped sum and the clipping indicators, unnoised: the noise is added once, by the
    /// node that finishes the merged aggregate.
    fn into_partial(self: Box<Self>) -> Result<crate::strategy::PartialAggregate, AggregateError> {
        Ok(crate::strategy::PartialAggregate {
            sum: self.sum,
            row_weights: None,
            total_weight: self.count as f64,
            count: self.count as u64,
            centred_bits: self.centred_bits,
        })
    }

    /// Each update in `partial` was clipped to `C` by the node that accepted it (the same clip:
    /// every node serves the leader's checkpointed strategy state), so the merged sum keeps
    /// sensitivity `C` per client.
    fn merge_partial(&mut self, partial: crate::strategy::PartialAggregate) -> Result<(), AggregateError> {
        partial.check(self.sum.len(), None)?;
        crate::strategy::partial::add_into(&mut self.sum, &partial.sum);
        self.count += partial.count as usize;
        self.centred_bits += partial.centred_bits;
        Ok(())
    }

    fn finish(mut self: Box<Self>, rng: &mut dyn rand::Rng) -> Result<Aggregate, AggregateError> {
        // A Poisson-sampled round releases even with no report (the noise alone): whether a round
        // releases must not depend on who was sampled.
        let noise_err = |e: super::noise::NoiseError| AggregateError::Noise(e.to_string());
        self.sampler.add_noise(&mut self.sum, self.noise_std, rng).map_err(noise_err)?;
        let delta: Vec<f32> = self.sum.iter().map(|s| (s / self.denominator) as f32).collect();
        if delta.iter().any(|v| !v.is_finite()) {
            return Err(AggregateError::NonFinite);
        }
        if let Some(std) = self.count_std {
            let mut noised = [self.centred_bits];
            self.sampler.add_noise(&mut noised, std, rng).map_err(noise_err)?;
            if let Ok(mut s) = self.shared.lock() {
                s.unclipped_fraction = Some(noised[0] / self.denominator + 0.5);
            }
        }
        Ok(Aggregate {
            delta,
            contributors: self.count,
            total_weight: self.count as f64,
            privacy: Some(self.charge),
        })
    }
}

impl<S: Strategy> Strategy for DpFedAvg<S> {
    fn name(&self) -> String {
        let adaptive = if self.config.adaptive.is_some() { ", adaptive" } else { "" };
        format!(
            "dp-fedavg(C={:.3}, sigma={}{adaptive})/{}",
            self.clip,
            self.config.noise.get(),
            self.inner.name()
        )
    }

    fn admit(&mut self, ctx: &RoundContext) -> Result<(), AdmissionError> {
        if ctx.secure && self.config.adaptive.is_some() {
            return Err(AdmissionError::Other(
                "adaptive clipping is not available under secure aggregation (the clipping \
                 indicators would have to be aggregated securely too); use a fixed clip norm"
                    .into(),
            ));
        }
        let q = self.population_checks(ctx)?;
        let mut mechanism = self.mechanism(ctx.shape.len(), q);
        if ctx.secure {
            // The charge is the distributed mechanism's effective multiplier, known once the
            // cohort is; it is at most σ and equal to it up to the negligible discreteness term
            // (see `dp::distributed`). Project with a slightly smaller multiplier so that a round
            // admitted here never ends above the budget.
            mechanism.sigma = NoiseMultiplier::new(mechanism.sigma.get() * SECURE_ADMISSION_SLACK)
                .unwrap_or(mechanism.sigma);
        }
        self.check_budget(&mechanism)?;
        self.inner.admit(ctx)
    }

    fn configure(&mut self, ctx: &RoundContext, plan: &mut TrainingPlan) {
        self.inner.configure(ctx, plan);
        plan.clip_norm = Some(self.clip as f32);
        plan.noise = if ctx.secure {
            NoiseSettings::Distributed { multiplier: self.sum_multiplier as f32 }
        } else {
            NoiseSettings::Central { multiplier: self.config.noise.get() as f32 }
        };
    }

    /// Poisson sampling: each candidate independently with probability `q` (the inner strategy's
    /// selection and `wanted` are not used). The coin comes from the round machine's RNG, which a
    /// service seeds from the operating system ([`Orchestrator::reseed`](crate::round::Orchestrator::reseed)).
    fn select(
        &mut self,
        ctx: &RoundContext,
        candidates: &[ClientId],
        _wanted: usize,
        rng: &mut dyn rand::Rng,
    ) -> Vec<ClientId> {
        let Some(q) = self.sampling_rate(ctx.population) else { return Vec::new() };
        let q = q.get();
        candidates.iter().copied().filter(|_| q >= 1.0 || rand::RngExt::random_bool(rng, q)).collect()
    }

    fn selection_policy(&self) -> SelectionPolicy {
        SelectionPolicy::Poisson
    }

    fn aggregator(&mut self, ctx: &RoundContext) -> Box<dyn Aggregator> {
        // `admit` refused rounds without a population, so `q` is known here; the fallback (q = 1,
        // denominator = expected participants) only over-charges.
        let q = self.sampling_rate(ctx.population).unwrap_or(SamplingRate::FULL);
        let population = ctx.population.unwrap_or(self.config.expected_participants as u64);
        let denominator = (q.get() * population as f64).max(1.0);
        let noise_multiplier = match (ctx.secure, &ctx.quant) {
            // The devices' noise, charged at what the distributed mechanism achieves.
            (true, Some(quant)) => quant.accounted_multiplier(),
            _ => self.accounted_sigma(ctx.shape.len()),
        };
        Box::new(DpAggregator {
            shape: ctx.shape,
            clip: self.clip,
            sum: vec![0.0; ctx.shape.len()],
            count: 0,
            centred_bits: 0.0,
            noise_std: if ctx.secure { 0.0 } else { self.sum_multiplier * self.clip },
            count_std: if ctx.secure { None } else { self.config.adaptive.map(|a| a.count_noise) },
            denominator,
            charge: PrivacyCharge { sampling_rate: q.get(), noise_multiplier, steps: 1 },
            sampler: self.sampler.clone(),
            shared: self.shared.clone(),
            secure: ctx.secure,
        })
    }

    fn apply(
        &mut self,
        ctx: &RoundContext,
        global: &mut [f32],
        aggregate: &Aggregate,
    ) -> Result<(), AggregateError> {
        self.inner.apply(ctx, global, aggregate)?;
        // The noised aggregate is now part of the model: it is released, at the charge it carries.
        let q = SamplingRate::new(aggregate.privacy.map_or(1.0, |c| c.sampling_rate))
            .unwrap_or(SamplingRate::FULL);
        let mut mechanism = self.mechanism(ctx.shape.len(), q);
        if ctx.secure
            && let Some(charged) =
                aggregate.privacy.and_then(|c| NoiseMultiplier::new(c.noise_multiplier).ok())
        {
            // Secure rounds: the distributed mechanism's effective multiplier (the devices' noise;
            // the coordinator's sampler played no part).
            mechanism.sigma = charged;
        }
        self.ledger.record(LedgerEntry { round: ctx.round.0, mechanism });
        if let Some(a) = self.config.adaptive {
            let fraction = self.shared.lock().ok().and_then(|mut s| s.unclipped_fraction.take());
            if let Some(b) = fraction {
                self.clip *= (-a.learning_rate * (b - a.target.get())).exp();
            }
        }
        Ok(())
    }
    /// Admits an evaluation round against the budget, exactly as a training round is admitted
    /// (population known, δ·N small, ε after the release within the budget); refused under
    /// secure aggregation. The noise: `σ·2` per coordinate from the training rounds' sampler.
    fn evaluation_release(&mut self, ctx: &RoundContext) -> Result<Option<EvalNoise>, AdmissionError> {
        if ctx.secure {
            return Err(AdmissionError::Other(
                "federated evaluation is not available under secure aggregation".into(),
            ));
        }
        let q = self.population_checks(ctx)?;
        let mechanism = self.evaluation_mechanism(q);
        self.check_budget(&mechanism)?;
        Ok(Some(EvalNoise {
            std: self.config.noise.get() * EVAL_SENSITIVITY,
            charge: PrivacyCharge {
                sampling_rate: q.get(),
                noise_multiplier: mechanism.sigma.get(),
                steps: 1,
            },
            sampler: self.sampler.clone(),
        }))
    }

    fn record_evaluation(&mut self, ctx: &RoundContext, charge: &PrivacyCharge) {
        let q = SamplingRate::new(charge.sampling_rate).unwrap_or(SamplingRate::FULL);
        let mut mechanism = self.evaluation_mechanism(q);
        if let Ok(sigma) = NoiseMultiplier::new(charge.noise_multiplier) {
            mechanism.sigma = sigma;
        }
        self.ledger.record(LedgerEntry { round: ctx.round.0, mechanism });
    }

    /// The inner strategy's state, plus the clip norm under adaptive clipping (`dp.clip`). The
    /// ledger is not part of it: the host replays it from its own durable ledger.
    fn save_state(&self) -> crate::strategy::StrategyState {
        let mut s = self.inner.save_state();
        if self.config.adaptive.is_some() {
            s.scalars.push(("dp.clip".into(), self.clip));
        }
        s
    }

    fn restore_state(
        &mut self,
        state: &crate::strategy::StrategyState,
        model_len: usize,
    ) -> Result<(), crate::strategy::StateError> {
        let clip = match (self.config.adaptive, state.scalar("dp.clip")) {
            (Some(_), Some(c)) if c.is_finite() && c > 0.0 => Some(c),
            (Some(_), Some(_)) => return Err(crate::strategy::StateError::Invalid("dp.clip".into())),
            // Saved without adaptive clipping (or it is off now): the configured clip norm.
            _ => None,
        };
        self.inner.restore_state(&state.without("dp."), model_len)?;
        if let Some(c) = clip {
            self.clip = c;
        }
        Ok(())
    }
}
