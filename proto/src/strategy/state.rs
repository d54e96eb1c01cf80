//! What a strategy carries from one round to the next, checkpointed with each model so that a
//! restarted coordinator continues exactly where it stopped: the server optimizer's moments
//! (FedAvgM's velocity, FedAdam's and FedYogi's first and second moments) and an adaptive clip
//! norm. [`Strategy::save_state`](super::Strategy::save_state) gives it after each commit;
//! [`Strategy::restore_state`](super::Strategy::restore_state) puts it back.

use serde::{Deserialize, Serialize};

/// A strategy's state: named vectors and scalars. Names are namespaced by who owns them
/// (`"optimizer.kind"`, `"adam.m"`, `"dp.clip"`), so decorators add theirs beside the inner
/// strategy's. An empty state is what a stateless strategy (plain FedAvg) saves.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StrategyState {
    /// Named vectors, each empty or as long as the model.
    pub vectors: Vec<(String, Vec<f32>)>,
    /// Named scalars.
    pub scalars: Vec<(String, f64)>,
    /// Named labels (e.g. which optimizer saved the moments).
    pub labels: Vec<(String, String)>,
}

/// Why a saved state cannot be restored (the strategy is left as it was).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The state was saved by another strategy or optimizer (the configuration changed).
    #[error("the saved state is for {saved}, this strategy is {current}")]
    OtherStrategy {
        /// What saved it.
        saved: String,
        /// What is configured now.
        current: String,
    },
    /// A vector's length is neither 0 nor the model's.
    #[error("saved vector {name} has {got} values, the model has {model}")]
    Length {
        /// The vector.
        name: String,
        /// Its length.
        got: usize,
        /// The model's length.
        model: usize,
    },
    /// A value is missing, not finite or out of range.
    #[error("saved value {0} is missing or invalid")]
    Invalid(String),
}

impl StrategyState {
    /// Whether nothing is saved.
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty() && self.scalars.is_empty() && self.labels.is_empty()
    }

    /// The vector `name`, if saved.
    pub fn vector(&self, name: &str) -> Option<&[f32]> {
        self.vectors.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }

    /// The scalar `name`, if saved.
    pub fn scalar(&self, name: &str) -> Option<f64> {
        self.scalars.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// The label `name`, if saved.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The vector `name` checked against a model of `model_len` values: empty (never stepped) or
    /// that long, and finite.
    pub fn checked_vector(&self, name: &str, model_len: usize) -> Result<Vec<f32>, StateError> {
        let v = self.vector(name).ok_or_else(|| StateError::Invalid(name.into()))?;
        if !v.is_empty() && v.len() != model_len {
            return Err(StateError::Length { name: name.into(), got: v.len(), model: model_len });
        }
        if v.iter().any(|x| !x.is_finite()) {
            return Err(StateError::Invalid(name.into()));
        }
        Ok(v.to_vec())
    }

    /// The part of the state whose names start with `prefix`.
    pub fn only(&self, prefix: &str) -> StrategyState {
        StrategyState {
            vectors: self.vectors.iter().filter(|(n, _)| n.starts_with(prefix)).cloned().collect(),
            scalars: self.scalars.iter().filter(|(n, _)| n.starts_with(prefix)).cloned().collect(),
            labels: self.labels.iter().filter(|(n, _)| n.starts_with(prefix)).cloned().collect(),
        }
    }

    /// Everything but the names that start with `prefix`.
    pub fn without(&self, prefix: &str) -> StrategyState {
        StrategyState {
            vectors: self.vectors.iter().filter(|(n, _)| !n.starts_with(prefix)).cloned().collect(),
            scalars: self.scalars.iter().filter(|(n, _)| !n.starts_with(prefix)).cloned().collect(),
            labels: self.labels.iter().filter(|(n, _)| !n.starts_with(prefix)).cloned().collect(),
        }
    }

    /// Adds another part (a decorator's beside its inner strategy's).
    pub fn merged(mut self, other: StrategyState) -> StrategyState {
        self.vectors.extend(other.vectors);
        self.scalars.extend(other.scalars);
        self.labels.extend(other.labels);
        self
    }
}
