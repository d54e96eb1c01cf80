//! Partial aggregates: one node's share of a round, to be combined on the leader.
//!
//! When several coordinator nodes serve one population, each node accepts the updates of the
//! clients connected to it and folds them into its own aggregator, exactly as a single node
//! would. At the end of the round it does **not** finish the aggregate (no noise, no division):
//! it hands over the aggregator's running state, a [`PartialAggregate`]. The leader merges every
//! node's partial into its own aggregator ([`Aggregator::merge_partial`](super::Aggregator::merge_partial))
//! and finishes once — so central DP's noise is added exactly once, to the sum of everything, and
//! the server optimizer steps once.
//!
//! Only rules whose state is a sum can be split this way (FedAvg's weighted mean, per-row mean,
//! DP-FedAvg's clipped sum, a secure-aggregation sum). A median or trimmed mean needs every
//! update in one place and refuses ([`AggregateError::PartialUnsupported`]).

use super::AggregateError;
use serde::{Deserialize, Serialize};

/// The running state of an aggregator over some of a round's updates (a sum, its weights).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartialAggregate {
    /// `Σ wᵢ·Δᵢ`, one value per global parameter (under DP: the sum of clipped updates).
    pub sum: Vec<f64>,
    /// Per-row weight sums (the per-row mean only).
    pub row_weights: Option<Vec<f64>>,
    /// `Σ wᵢ`.
    pub total_weight: f64,
    /// Updates folded in.
    pub count: u64,
    /// DP-FedAvg with adaptive clipping: the sum of the centred clipping indicators (±½ each).
    pub centred_bits: f64,
}

impl PartialAggregate {
    /// An empty partial (a node whose clients sent nothing) for a model of `len` parameters.
    pub fn empty(len: usize) -> Self {
        Self { sum: vec![0.0; len], row_weights: None, total_weight: 0.0, count: 0, centred_bits: 0.0 }
    }

    /// Checks the partial fits a model of `len` parameters (and `rows` rows, for a per-row
    /// mean) and holds only finite numbers. A partial crosses a process boundary: it is checked
    /// like any other input before it touches an aggregate.
    pub fn check(&self, len: usize, rows: Option<usize>) -> Result<(), AggregateError> {
        if self.sum.len() != len {
            return Err(AggregateError::ModelLength { got: self.sum.len(), want: len });
        }
        match (&self.row_weights, rows) {
            (Some(rw), Some(rows)) if rw.len() == rows => {}
            (None, None) => {}
            (Some(rw), _) => {
                return Err(AggregateError::Other(format!(
                    "partial aggregate has {} row weights, expected {}",
                    rw.len(),
                    rows.map_or_else(|| "none".to_string(), |r| r.to_string())
                )));
            }
            // An empty partial carries no row weights: nothing to add.
            (None, Some(_)) if self.count == 0 => {}
            (None, Some(_)) => {
                return Err(AggregateError::Other("partial aggregate lacks its row weights".into()));
            }
        }
        let finite = self.sum.iter().all(|v| v.is_finite())
            && self.row_weights.iter().flatten().all(|v| v.is_finite() && *v >= 0.0)
            && self.total_weight.is_finite()
            && self.total_weight >= 0.0
            && self.centred_bits.is_finite()
            && self.centred_bits.abs() <= self.count as f64 / 2.0;
        if !finite {
            return Err(AggregateError::NonFinite);
        }
        Ok(())
    }
}

pub(crate) fn add_into(acc: &mut [f64], add: &[f64]) {
    for (a, s) in acc.iter_mut().zip(add) {
        *a += s;
    }
}
