//! The standard strategies: an [`AggregationRule`] followed by a [`ServerOptimizer`].

use super::aggregate::AggregationRule;
use super::server_opt::ServerOptimizer;
use super::{Aggregate, AggregateError, Aggregator, RoundContext, Strategy};

/// A strategy made of an aggregation rule and a server optimizer.
///
/// The named constructors give the usual algorithms:
/// [`fedavg`](Federated::fedavg), [`fedavgm`](Federated::fedavgm), [`fedadam`](Federated::fedadam),
/// [`fedyogi`](Federated::fedyogi), [`median`](Federated::median),
/// [`trimmed_mean`](Federated::trimmed_mean).
#[derive(Clone, Debug, PartialEq)]
pub struct Federated {
    rule: AggregationRule,
    optimizer: ServerOptimizer,
}

impl Federated {
    /// Any rule with any optimizer.
    pub fn new(rule: AggregationRule, optimizer: ServerOptimizer) -> Self {
        Self { rule, optimizer }
    }

    /// FedAvg (McMahan et al. 2017): example-weighted mean, applied as is.
    pub fn fedavg() -> Self {
        Self::new(AggregationRule::WeightedMean, ServerOptimizer::sgd())
    }

    /// FedAvg with per-row averaging for sparse embedding updates (see
    /// [`AggregationRule::RowWeightedMean`]).
    pub fn fedavg_row_aware() -> Self {
        Self::new(AggregationRule::RowWeightedMean, ServerOptimizer::sgd())
    }

    /// FedAvgM (Hsu et al. 2019): weighted mean with server momentum.
    pub fn fedavgm(lr: f32, beta: f32) -> Self {
        Self::new(AggregationRule::WeightedMean, ServerOptimizer::momentum(lr, beta))
    }

    /// FedAdam (Reddi et al. 2021).
    pub fn fedadam(lr: f32) -> Self {
        Self::new(AggregationRule::WeightedMean, ServerOptimizer::adam(lr))
    }

    /// FedYogi (Reddi et al. 2021).
    pub fn fedyogi(lr: f32) -> Self {
        Self::new(AggregationRule::WeightedMean, ServerOptimizer::yogi(lr))
    }

    /// Coordinate-wise median, applied as is.
    pub fn median() -> Self {
        Self::new(AggregationRule::Median, ServerOptimizer::sgd())
    }

    /// Coordinate-wise trimmed mean trimming `beta` from each end, applied as is.
    pub fn trimmed_mean(beta: f64) -> Self {
        Self::new(AggregationRule::TrimmedMean { beta }, ServerOptimizer::sgd())
    }

    /// The aggregation rule.
    pub fn rule(&self) -> AggregationRule {
        self.rule
    }

    /// The server optimizer and its state.
    pub fn optimizer(&self) -> &ServerOptimizer {
        &self.optimizer
    }
}

impl Strategy for Federated {
    fn name(&self) -> String {
        let rule = match self.rule {
            AggregationRule::WeightedMean => "mean".to_string(),
            AggregationRule::RowWeightedMean => "row-mean".to_string(),
            AggregationRule::Median => "median".to_string(),
            AggregationRule::TrimmedMean { beta } => format!("trimmed-mean({beta})"),
        };
        format!("{rule}+{}", self.optimizer.name())
    }

    fn aggregator(&mut self, ctx: &RoundContext) -> Box<dyn Aggregator> {
        self.rule.aggregator(ctx.shape)
    }

    fn aggregation_rule(&self) -> Option<AggregationRule> {
        Some(self.rule)
    }

    fn apply(
        &mut self,
        ctx: &RoundContext,
        global: &mut [f32],
        aggregate: &Aggregate,
    ) -> Result<(), AggregateError> {
        if global.len() != ctx.shape.len() {
            return Err(AggregateError::ModelLength { got: global.len(), want: ctx.shape.len() });
        }
        self.optimizer.step(global, &aggregate.delta)
    }

    fn save_state(&self) -> super::StrategyState {
        self.optimizer.save_state()
    }

    fn restore_state(
        &mut self,
        state: &super::StrategyState,
        model_len: usize,
    ) -> Result<(), super::StateError> {
        self.optimizer.restore_state(state, model_len)
    }
}
