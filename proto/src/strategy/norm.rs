//! [`NormBound`]: clips every update to an L2 norm before the inner strategy sees it
//! (Sun et al. 2019, "Can you really backdoor federated learning?").

use super::{Aggregate, AggregateError, Aggregator, RoundContext, Strategy};
use crate::ids::ClientId;
use crate::message::TrainingPlan;
use crate::update::Update;

/// Scales `update` down so its L2 norm is at most `bound`; returns the norm before clipping.
/// The identity when the norm is already within the bound.
///
/// The result is guaranteed to be within the bound as [`Update::l2_norm`] measures it (in `f64`):
/// the scale factor is rounded *down* to `f32`, and since every `f32` product rounds to nearest,
/// the norm is checked again and shaved by one part in 2²⁰ until it fits. A sensitivity bound
/// that is exceeded by a rounding error is not a bound.
pub fn clip_l2(update: &mut Update, bound: f64) -> f64 {
    let norm = update.l2_norm();
    if norm > bound && norm > 0.0 {
        let exact = bound / norm;
        let mut factor = exact as f32;
        if f64::from(factor) > exact {
            factor = factor.next_down();
        }
        update.scale(factor);
        // Each pass multiplies by 1 − 2⁻²⁰; a handful suffice (the excess is a few ulps).
        while update.l2_norm() > bound {
            update.scale(1.0 - f32::EPSILON * 8.0);
        }
    }
    norm
}

/// Wraps a strategy so that every accepted update is clipped to L2 norm `bound` first.
#[derive(Clone, Debug, PartialEq)]
pub struct NormBound<S> {
    inner: S,
    bound: f64,
}

impl<S: Strategy> NormBound<S> {
    /// Clips updates to `bound` (must be positive and finite) before `inner` aggregates them.
    pub fn new(inner: S, bound: f64) -> Result<Self, AggregateError> {
        if !(bound.is_finite() && bound > 0.0) {
            return Err(AggregateError::Other(format!(
                "norm bound must be positive and finite, got {bound}"
            )));
        }
        Ok(Self { inner, bound })
    }

    /// The wrapped strategy.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The L2 norm every update is clipped to.
    pub fn bound(&self) -> f64 {
        self.bound
    }
}

struct Clipping {
    inner: Box<dyn Aggregator>,
    bound: f64,
}

impl Aggregator for Clipping {
    fn accept(&mut self, mut update: Update, weight: f64) -> Result<(), AggregateError> {
        clip_l2(&mut update, self.bound);
        self.inner.accept(update, weight)
    }
    fn accept_report(
        &mut self,
        mut update: Update,
        weight: f64,
        metrics: &crate::message::LocalMetrics,
    ) -> Result<(), AggregateError> {
        clip_l2(&mut update, self.bound);
        self.inner.accept_report(update, weight, metrics)
    }
    /// A secure sum cannot be clipped here: the devices clipped each update to the plan's clip
    /// norm, which [`NormBound`] lowered to its bound.
    fn accept_sum(&mut self, sum: Vec<f64>, contributors: usize) -> Result<(), AggregateError> {
        self.inner.accept_sum(sum, contributors)
    }
    fn accepted(&self) -> usize {
        self.inner.accepted()
    }
    fn finish(self: Box<Self>, rng: &mut dyn rand::Rng) -> Result<Aggregate, AggregateError> {
        self.inner.finish(rng)
    }
    /// Every update in a partial was clipped on the node that accepted it.
    fn into_partial(self: Box<Self>) -> Result<super::PartialAggregate, AggregateError> {
        self.inner.into_partial()
    }
    fn merge_partial(&mut self, partial: super::PartialAggregate) -> Result<(), AggregateError> {
        self.inner.merge_partial(partial)
    }
}

impl<S: Strategy> Strategy for NormBound<S> {
    fn name(&self) -> String {
        format!("norm-bound({})/{}", self.bound, self.inner.name())
    }
    fn admit(&mut self, ctx: &RoundContext) -> Result<(), super::AdmissionError> {
        self.inner.admit(ctx)
    }
    fn configure(&mut self, ctx: &RoundContext, plan: &mut TrainingPlan) {
        self.inner.configure(ctx, plan);
        let b = self.bound as f32;
        plan.clip_norm = Some(plan.clip_norm.map_or(b, |c| c.min(b)));
    }
    fn select(
        &mut self,
        ctx: &RoundContext,
        candidates: &[ClientId],
        wanted: usize,
        rng: &mut dyn rand::Rng,
    ) -> Vec<ClientId> {
        self.inner.select(ctx, candidates, wanted, rng)
    }
    fn selection_policy(&self) -> super::SelectionPolicy {
        self.inner.selection_policy()
    }
    fn aggregator(&mut self, ctx: &RoundContext) -> Box<dyn Aggregator> {
        Box::new(Clipping { inner: self.inner.aggregator(ctx), bound: self.bound })
    }
    fn aggregation_rule(&self) -> Option<super::AggregationRule> {
        self.inner.aggregation_rule()
    }
    fn apply(
        &mut self,
        ctx: &RoundContext,
        global: &mut [f32],
        aggregate: &Aggregate,
    ) -> Result<(), AggregateError> {
        self.inner.apply(ctx, global, aggregate)
    }
    fn save_state(&self) -> super::StrategyState {
        self.inner.save_state()
    }
    fn restore_state(
        &mut self,
        state: &super::StrategyState,
        model_len: usize,
    ) -> Result<(), super::StateError> {
        self.inner.restore_state(state, model_len)
    }
    fn evaluation_release(
        &mut self,
        ctx: &RoundContext,
    ) -> Result<Option<super::EvalNoise>, super::AdmissionError> {
        self.inner.evaluation_release(ctx)
    }
    fn record_evaluation(&mut self, ctx: &RoundContext, charge: &super::PrivacyCharge) {
        self.inner.record_evaluation(ctx, charge)
    }
}
