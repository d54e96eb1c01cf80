//! Aggregation strategies: how the coordinator turns accepted client updates into a new model.
//!
//! A [`Strategy`] has flower-style hooks but does not own the round loop (the
//! [`Orchestrator`](crate::round::Orchestrator), the round machine, does):
//! - [`Strategy::configure`] adjusts the training plan sent to clients of a round;
//! - [`Strategy::select`] picks which eligible, checked-in clients get the task;
//! - [`Strategy::aggregator`] starts a per-round [`Aggregator`] that is fed each accepted
//!   update as it arrives (so FedAvg runs in O(model size) memory however many clients report);
//! - [`Strategy::apply`] applies the round's aggregate to the global model (the server
//!   optimizer: plain FedAvg, FedAvgM, FedAdam, FedYogi).
//!
//! - [`Strategy::evaluation_release`] admits a federated-evaluation round and says how its sums
//!   are released (exactly, or noised under DP), and [`Strategy::record_evaluation`] accounts for
//!   the release.
//!
//! Decorators wrap any strategy: [`NormBound`] clips each update's L2 norm, and
//! the differential-privacy layer wraps the aggregator the same way.

use crate::ids::{ClientId, ModelVersion, RoundId};
use crate::message::{LocalMetrics, TrainingPlan};
use crate::update::{ModelShape, Update};
use serde::{Deserialize, Serialize};

/// What a strategy knows about the round it serves.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundContext {
    /// The round.
    pub round: RoundId,
    /// The model version clients train from.
    pub model_version: ModelVersion,
    /// Shape of the global parameters.
    pub shape: ModelShape,
    /// How many reports the round aims for.
    pub target_participants: usize,
    /// How many clients were sent the task (known once selection closes; 0 before).
    pub selected: usize,
    /// N: the devices enrolled (and not revoked) when the round started, as the host told the
    /// round machine ([`Orchestrator::set_population`](crate::round::Orchestrator::set_population));
    /// `None` when the host does not know. Central DP derives its sampling rate from it.
    pub population: Option<u64>,
    /// Whether the round runs secure aggregation: the aggregator then receives one decoded sum
    /// ([`Aggregator::accept_sum`]) instead of individual updates.
    pub secure: bool,
    /// Under secure aggregation, the round's encoding (known once selection closes): the clip,
    /// scale and each device's share of distributed-DP noise.
    pub quant: Option<crate::dp::distributed::QuantPlan>,
}

/// How a round chooses its participants and when it stops collecting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SelectionPolicy {
    /// Up to `⌈target · over_selection⌉` of the checked-in clients ([`Strategy::select`]); the
    /// round closes once `target` updates arrived and fails below `min_reports`.
    #[default]
    FixedSize,
    /// Poisson sampling: [`Strategy::select`] includes every checked-in client independently with
    /// the strategy's probability; the round accepts **every** report of the sampled clients (no
    /// cap at the target: a cap would let one client's presence push out another's update) and
    /// releases whatever arrived by the deadline — `min_reports` applies to check-ins only, so
    /// whether a round releases does not depend on which sampled clients reported.
    Poisson,
}

/// The result of a round's aggregation: a delta for the global model.
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregate {
    /// The aggregated delta, one value per global parameter.
    pub delta: Vec<f32>,
    /// How many updates went into it.
    pub contributors: usize,
    /// Sum of the contributors' weights.
    pub total_weight: f64,
    /// The privacy cost of releasing this aggregate, when a differential-privacy layer produced it.
    /// The host must make this durable (the privacy ledger) before it releases the new model.
    pub privacy: Option<PrivacyCharge>,
}

/// The privacy cost of one released aggregate under the (sub)sampled Gaussian mechanism.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyCharge {
    /// Probability that any one user's data takes part in the round (sampling rate q).
    pub sampling_rate: f64,
    /// Noise standard deviation in units of the L2 sensitivity (σ).
    pub noise_multiplier: f64,
    /// How many releases of this mechanism the round made (1 for DP-FedAvg; more when, e.g.,
    /// adaptive clipping releases a noised count too, which is folded into σ instead when possible).
    pub steps: u32,
}

/// The L2 sensitivity of one device's evaluation vector `(cases, hits@10, ndcg@10, loss /
/// EVAL_LOSS_CAP)`: every coordinate is in `[0, 1]` for a valid report of at most one case
/// ([`MAX_EVAL_CASES`](crate::round::MAX_EVAL_CASES)), so the vector's norm is at most 2.
pub const EVAL_SENSITIVITY: f64 = 2.0;

/// How a federated-evaluation round's sums are released under differential privacy: Gaussian
/// noise of standard deviation `std` is added to every coordinate of the summed vector `(cases,
/// hits@10, ndcg@10, loss / EVAL_LOSS_CAP)`, drawn from `sampler`, and the release costs `charge`.
#[derive(Clone, Debug)]
pub struct EvalNoise {
    /// Noise standard deviation per coordinate (σ · [`EVAL_SENSITIVITY`]).
    pub std: f64,
    /// The privacy cost of the release (same form, and same ledger, as a training round's).
    pub charge: PrivacyCharge,
    /// The noise source (the one training rounds use).
    pub sampler: std::sync::Arc<dyn crate::dp::GaussianSampler>,
}

/// Why a strategy refused to start a round.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AdmissionError {
    /// Running the round would exceed the privacy budget.
    #[error(
        "privacy budget exhausted: the round would bring epsilon to {projected_epsilon:.4}, budget is {budget_epsilon:.4} at delta {delta:e}"
    )]
    BudgetExhausted {
        /// ε after the round, if it ran.
        projected_epsilon: f64,
        /// The configured ε budget.
        budget_epsilon: f64,
        /// The δ at which ε is measured.
        delta: f64,
    },
    /// The strategy needs the enrolled population N (central DP derives its sampling rate q from
    /// it) and the host has not supplied it.
    #[error("the number of enrolled devices is unknown: central DP derives its sampling rate from it")]
    UnknownPopulation,
    /// δ is not well below 1/N: with N devices, a mechanism that fails with probability δ for
    /// each may fail for δ·N of them. Refused when δ·N exceeds [`MAX_DELTA_TIMES_N`](crate::dp::MAX_DELTA_TIMES_N).
    #[error(
        "delta {delta:e} is too large for {population} enrolled devices: delta x N = {:.3} must be at most {}; lower privacy.delta",
        delta * (*population as f64), crate::dp::MAX_DELTA_TIMES_N
    )]
    DeltaTooLarge {
        /// The budget's δ.
        delta: f64,
        /// N.
        population: u64,
    },
    /// Another strategy-specific reason.
    #[error("{0}")]
    Other(String),
}

/// Why aggregation failed or an update could not be folded in.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AggregateError {
    /// The update's shape differs from the model's.
    #[error("update shape {got:?} does not match model shape {want:?}")]
    ShapeMismatch {
        /// The update's shape.
        got: ModelShape,
        /// The model's shape.
        want: ModelShape,
    },
    /// A weight that is negative, zero or not finite.
    #[error("invalid update weight {0}")]
    InvalidWeight(f64),
    /// No update was accepted, so there is nothing to aggregate.
    #[error("no updates to aggregate")]
    Empty,
    /// The strategy needs more updates than it got (e.g. a trimmed mean that would trim everything).
    #[error("strategy needs at least {needed} updates, got {got}")]
    TooFew {
        /// Updates needed.
        needed: usize,
        /// Updates received.
        got: usize,
    },
    /// The aggregate or the new model contains a NaN or infinity.
    #[error("aggregation produced a non-finite value")]
    NonFinite,
    /// The global model passed to `apply` has the wrong length.
    #[error("global model has {got} parameters, expected {want}")]
    ModelLength {
        /// Parameters supplied.
        got: usize,
        /// Parameters expected.
        want: usize,
    },
    /// Noise could not be added (a differential-privacy layer refuses to release anything).
    #[error("noise could not be added: {0}")]
    Noise(String),
    /// The aggregation rule needs individual updates and cannot aggregate a secure sum.
    #[error("this aggregation rule needs individual updates; it cannot run on a securely aggregated sum")]
    SumUnsupported,
    /// The aggregation rule cannot be split across coordinator nodes (it needs every update in
    /// one place: median, trimmed mean).
    #[error("this aggregation rule cannot be split into partial aggregates across nodes")]
    PartialUnsupported,
    /// A strategy-specific failure.
    #[error("{0}")]
    Other(String),
}

/// Folds the accepted updates of one round into an [`Aggregate`].
pub trait Aggregator: Send {
    /// Feeds one validated update with its weight (for FedAvg, the client's example count).
    fn accept(&mut self, update: Update, weight: f64) -> Result<(), AggregateError>;
    /// Feeds one validated update with its weight and the metrics the client sent with it. The
    /// round machine calls this; the default ignores the metrics. Adaptive clipping reads the
    /// client's [`LocalMetrics::norm_within_clip`] indicator here.
    fn accept_report(
        &mut self,
        update: Update,
        weight: f64,
        metrics: &LocalMetrics,
    ) -> Result<(), AggregateError> {
        let _ = metrics;
        self.accept(update, weight)
    }
    /// Feeds the decoded sum of `contributors` updates that secure aggregation produced (each
    /// update clipped and encoded on its device, weight 1; under distributed DP the sum already
    /// carries the noise). The default refuses: a rule that needs the individual updates (median,
    /// trimmed mean) cannot run on a sum.
    fn accept_sum(&mut self, sum: Vec<f64>, contributors: usize) -> Result<(), AggregateError> {
        let _ = (sum, contributors);
        Err(AggregateError::SumUnsupported)
    }
    /// How many updates were accepted so far.
    fn accepted(&self) -> usize;
    /// Finishes the round. `rng` is the round machine's seeded RNG (used by noise-adding layers).
    fn finish(self: Box<Self>, rng: &mut dyn rand::Rng) -> Result<Aggregate, AggregateError>;
    /// Hands over the running state instead of finishing (a node's share of a round served by
    /// several nodes; see [`partial`]). Nothing is noised or divided. The default refuses.
    fn into_partial(self: Box<Self>) -> Result<PartialAggregate, AggregateError> {
        Err(AggregateError::PartialUnsupported)
    }
    /// Folds another node's [`PartialAggregate`] of the same round into this one (the leader,
    /// before [`finish`](Self::finish)). The partial is checked first; on error nothing changes.
    /// The default refuses.
    fn merge_partial(&mut self, partial: PartialAggregate) -> Result<(), AggregateError> {
        let _ = partial;
        Err(AggregateError::PartialUnsupported)
    }
}

/// A server-side federated-learning strategy. See the module docs for the hook order.
pub trait Strategy: Send {
    /// A short name for logs and reports.
    fn name(&self) -> String;

    /// Decides whether a round may start at all (the privacy-budget guard lives here). Called by
    /// the round machine before anything is sent to clients.
    fn admit(&mut self, ctx: &RoundContext) -> Result<(), AdmissionError> {
        let _ = ctx;
        Ok(())
    }

    /// Adjusts the training plan for a round (called once, before selection closes).
    fn configure(&mut self, ctx: &RoundContext, plan: &mut TrainingPlan) {
        let _ = (ctx, plan);
    }

    /// Chooses up to `wanted` clients from the eligible candidates (uniform without replacement
    /// by default, using the round's seeded RNG). Candidates are in check-in order.
    fn select(
        &mut self,
        ctx: &RoundContext,
        candidates: &[ClientId],
        wanted: usize,
        rng: &mut dyn rand::Rng,
    ) -> Vec<ClientId> {
        let _ = ctx;
        sample_uniform(candidates, wanted, rng)
    }

    /// How the round machine selects participants and closes rounds for this strategy
    /// ([`SelectionPolicy::FixedSize`] by default; central DP uses Poisson sampling). Decorators
    /// must forward it.
    fn selection_policy(&self) -> SelectionPolicy {
        SelectionPolicy::FixedSize
    }

    /// Starts the aggregation of one round.
    fn aggregator(&mut self, ctx: &RoundContext) -> Box<dyn Aggregator>;

    /// The built-in [`AggregationRule`] this strategy folds updates with, if it uses one
    /// (decorators that keep their inner strategy's rule report it; `None` by default). A
    /// decorator that replaces the rule (central DP) reads it to refuse a rule it cannot honour.
    fn aggregation_rule(&self) -> Option<AggregationRule> {
        None
    }

    /// Applies the aggregate to the global parameters in place (the server optimizer).
    fn apply(
        &mut self,
        ctx: &RoundContext,
        global: &mut [f32],
        aggregate: &Aggregate,
    ) -> Result<(), AggregateError>;

    /// Admits a federated-evaluation round (called by
    /// [`Orchestrator::start_evaluation`](crate::round::Orchestrator::start_evaluation) before
    /// anything is sent) and says how its sums are released: `Ok(None)` releases them exactly (the
    /// default, for strategies without DP); `Ok(Some(noise))` noises them and charges the release.
    /// A refusal (the budget cannot afford the evaluation) refuses only this evaluation round.
    /// Decorators must forward it.
    fn evaluation_release(&mut self, ctx: &RoundContext) -> Result<Option<EvalNoise>, AdmissionError> {
        let _ = ctx;
        Ok(None)
    }

    /// Records that an evaluation round released its noised sums at `charge` (the in-memory
    /// ledger; the host persists the charge it finds in
    /// [`EvaluatedRound::privacy`](crate::round::EvaluatedRound::privacy)). Decorators must
    /// forward it.
    fn record_evaluation(&mut self, ctx: &RoundContext, charge: &PrivacyCharge) {
        let _ = (ctx, charge);
    }

    /// What the strategy carries from round to round (server-optimizer moments, an adaptive clip
    /// norm), saved after each commit and checkpointed with the model. Stateless strategies save
    /// an empty state (the default). Decorators must add their own part to their inner
    /// strategy's.
    fn save_state(&self) -> StrategyState {
        StrategyState::default()
    }

    /// Puts back a state [`save_state`](Self::save_state) gave, for a model of `model_len`
    /// values. On error nothing changes. The default accepts only an empty state.
    fn restore_state(&mut self, state: &StrategyState, model_len: usize) -> Result<(), StateError> {
        let _ = model_len;
        if state.is_empty() {
            Ok(())
        } else {
            Err(StateError::OtherStrategy { saved: "a stateful strategy".into(), current: self.name() })
        }
    }
}

impl Strategy for Box<dyn Strategy> {
    fn name(&self) -> String {
        (**self).name()
    }

    fn admit(&mut self, ctx: &RoundContext) -> Result<(), AdmissionError> {
        (**self).admit(ctx)
    }

    fn configure(&mut self, ctx: &RoundContext, plan: &mut TrainingPlan) {
        (**self).configure(ctx, plan)
    }

    fn select(
        &mut self,
        ctx: &RoundContext,
        candidates: &[ClientId],
        wanted: usize,
        rng: &mut dyn rand::Rng,
    ) -> Vec<ClientId> {
        (**self).select(ctx, candidates, wanted, rng)
    }

    fn selection_policy(&self) -> SelectionPolicy {
        (**self).selection_policy()
    }

    fn aggregator(&mut self, ctx: &RoundContext) -> Box<dyn Aggregator> {
        (**self).aggregator(ctx)
    }

    fn aggregation_rule(&self) -> Option<AggregationRule> {
        (**self).aggregation_rule()
    }

    fn apply(
        &mut self,
        ctx: &RoundContext,
        global: &mut [f32],
        aggregate: &Aggregate,
    ) -> Result<(), AggregateError> {
        (**self).apply(ctx, global, aggregate)
    }

    fn save_state(&self) -> StrategyState {
        (**self).save_state()
    }

    fn restore_state(&mut self, state: &StrategyState, model_len: usize) -> Result<(), StateError> {
        (**self).restore_state(state, model_len)
    }

    fn evaluation_release(&mut self, ctx: &RoundContext) -> Result<Option<EvalNoise>, AdmissionError> {
        (**self).evaluation_release(ctx)
    }

    fn record_evaluation(&mut self, ctx: &RoundContext, charge: &PrivacyCharge) {
        (**self).record_evaluation(ctx, charge)
    }
}

/// Uniform sampling without replacement, keeping the candidates' relative order.
pub fn sample_uniform(candidates: &[ClientId], wanted: usize, rng: &mut dyn rand::Rng) -> Vec<ClientId> {
    if wanted >= candidates.len() {
        return candidates.to_vec();
    }
    let mut idx = rand::seq::index::sample(rng, candidates.len(), wanted).into_vec();
    idx.sort_unstable();
    idx.into_iter().map(|i| candidates[i]).collect()
}

mod aggregate;
mod fed;
pub mod norm;
pub mod partial;
mod server_opt;
pub mod state;

pub use aggregate::{AggregationRule, Coordinatewise, WeightedMean};
pub use fed::Federated;
pub use norm::NormBound;
pub use partial::PartialAggregate;
pub use server_opt::ServerOptimizer;
pub use state::{StateError, StrategyState};

#[cfg(test)]
mod tests;
