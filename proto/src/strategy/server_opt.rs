//! Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization"): how the aggregated
//! delta Δ (the mean client change, a negative pseudo-gradient) moves the global model x.
//!
//! - SGD (plain FedAvg): `x ← x + η Δ`
//! - Momentum (FedAvgM): `m ← β m + Δ;  x ← x + η m`
//! - Adam (FedAdam): `m ← β₁ m + (1−β₁) Δ;  v ← β₂ v + (1−β₂) Δ²;  x ← x + η m / (√v + τ)`
//! - Yogi (FedYogi): as Adam but `v ← v − (1−β₂) Δ² sign(v − Δ²)`
//!
//! As in the paper, there is no bias correction and the moments start at zero.

use super::AggregateError;
use super::state::{StateError, StrategyState};

/// A server optimizer with its state.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ServerOptimizer {
    /// Plain FedAvg step.
    Sgd {
        /// Server learning rate η (1.0 reproduces FedAvg exactly).
        lr: f32,
    },
    /// FedAvgM.
    Momentum {
        /// Server learning rate η.
        lr: f32,
        /// Momentum β.
        beta: f32,
        /// Velocity (empty until the first step).
        velocity: Vec<f32>,
    },
    /// FedAdam.
    Adam {
        /// Server learning rate η.
        lr: f32,
        /// First-moment decay β₁.
        beta1: f32,
        /// Second-moment decay β₂.
        beta2: f32,
        /// Adaptivity τ.
        tau: f32,
        /// First moment.
        m: Vec<f32>,
        /// Second moment.
        v: Vec<f32>,
    },
    /// FedYogi.
    Yogi {
        /// Server learning rate η.
        lr: f32,
        /// First-moment decay β₁.
        beta1: f32,
        /// Second-moment decay β₂.
        beta2: f32,
        /// Adaptivity τ.
        tau: f32,
        /// First moment.
        m: Vec<f32>,
        /// Second moment.
        v: Vec<f32>,
    },
}

impl ServerOptimizer {
    /// FedAvg with server learning rate 1.
    pub fn sgd() -> Self {
        ServerOptimizer::Sgd { lr: 1.0 }
    }

    /// FedAvgM with the given server learning rate and momentum.
    pub fn momentum(lr: f32, beta: f32) -> Self {
        ServerOptimizer::Momentum { lr, beta, velocity: Vec::new() }
    }

    /// FedAdam (Reddi et al. defaults: β₁ 0.9, β₂ 0.99, τ 1e-3).
    pub fn adam(lr: f32) -> Self {
        ServerOptimizer::Adam { lr, beta1: 0.9, beta2: 0.99, tau: 1e-3, m: Vec::new(), v: Vec::new() }
    }

    /// FedYogi (Reddi et al. defaults: β₁ 0.9, β₂ 0.99, τ 1e-3).
    pub fn yogi(lr: f32) -> Self {
        ServerOptimizer::Yogi { lr, beta1: 0.9, beta2: 0.99, tau: 1e-3, m: Vec::new(), v: Vec::new() }
    }

    /// A short name.
    pub fn name(&self) -> &'static str {
        match self {
            ServerOptimizer::Sgd { .. } => "sgd",
            ServerOptimizer::Momentum { .. } => "momentum",
            ServerOptimizer::Adam { .. } => "adam",
            ServerOptimizer::Yogi { .. } => "yogi",
        }
    }

    /// The optimizer's moments as a [`StrategyState`] (`optimizer.kind` names the optimizer;
    /// plain SGD has no moments).
    pub fn save_state(&self) -> StrategyState {
        let mut s = StrategyState {
            labels: vec![("optimizer.kind".into(), self.name().into())],
            ..Default::default()
        };
        match self {
            ServerOptimizer::Sgd { .. } => {}
            ServerOptimizer::Momentum { velocity, .. } => {
                s.vectors.push(("optimizer.velocity".into(), velocity.clone()))
            }
            ServerOptimizer::Adam { m, v, .. } | ServerOptimizer::Yogi { m, v, .. } => {
                s.vectors.push(("optimizer.m".into(), m.clone()));
                s.vectors.push(("optimizer.v".into(), v.clone()));
            }
        }
        s
    }

    /// Puts back moments [`save_state`](Self::save_state) gave, for a model of `model_len`
    /// values; the hyper-parameters (learning rate, β) stay as configured. On error nothing
    /// changes.
    pub fn restore_state(&mut self, state: &StrategyState, model_len: usize) -> Result<(), StateError> {
        let saved = state.label("optimizer.kind").unwrap_or("none");
        if saved != self.name() {
            return Err(StateError::OtherStrategy { saved: saved.into(), current: self.name().into() });
        }
        match self {
            ServerOptimizer::Sgd { .. } => {}
            ServerOptimizer::Momentum { velocity, .. } => {
                *velocity = state.checked_vector("optimizer.velocity", model_len)?;
            }
            ServerOptimizer::Adam { m, v, .. } | ServerOptimizer::Yogi { m, v, .. } => {
                let (new_m, new_v) = (
                    state.checked_vector("optimizer.m", model_len)?,
                    state.checked_vector("optimizer.v", model_len)?,
                );
                if new_m.len() != new_v.len() || new_v.iter().any(|x| *x < 0.0) {
                    return Err(StateError::Invalid("optimizer.v".into()));
                }
                (*m, *v) = (new_m, new_v);
            }
        }
        Ok(())
    }

    /// Applies `delta` to `x` in place. Leaves `x` and the optimizer state untouched if the result
    /// would not be finite.
    pub fn step(&mut self, x: &mut [f32], delta: &[f32]) -> Result<(), AggregateError> {
        if x.len() != delta.len() {
            return Err(AggregateError::ModelLength { got: x.len(), want: delta.len() });
        }
        let n = x.len();
        let mut next_x = x.to_vec();
        let mut next_state = self.clone();
        match &mut next_state {
            ServerOptimizer::Sgd { lr } => {
                for (xi, &d) in next_x.iter_mut().zip(delta) {
                    *xi += *lr * d;
                }
            }
            ServerOptimizer::Momentum { lr, beta, velocity } => {
                velocity.resize(n, 0.0);
                for ((xi, vi), &d) in next_x.iter_mut().zip(velocity.iter_mut()).zip(delta) {
                    *vi = *beta * *vi + d;
                    *xi += *lr * *vi;
                }
            }
            ServerOptimizer::Adam { lr, beta1, beta2, tau, m, v } => {
                adaptive_step(&mut next_x, delta, m, v, (*lr, *beta1, *beta2, *tau), false);
            }
            ServerOptimizer::Yogi { lr, beta1, beta2, tau, m, v } => {
                adaptive_step(&mut next_x, delta, m, v, (*lr, *beta1, *beta2, *tau), true);
            }
        }
        if next_x.iter().any(|v| !v.is_finite()) {
            return Err(AggregateError::NonFinite);
        }
        x.copy_from_slice(&next_x);
        *self = next_state;
        Ok(())
    }
}

fn adaptive_step(
    x: &mut [f32],
    delta: &[f32],
    m: &mut Vec<f32>,
    v: &mut Vec<f32>,
    (lr, beta1, beta2, tau): (f32, f32, f32, f32),
    yogi: bool,
) {
    let n = x.len();
    m.resize(n, 0.0);
    v.resize(n, 0.0);
    for i in 0..n {
        let d = delta[i];
        let d2 = d * d;
        m[i] = beta1 * m[i] + (1.0 - beta1) * d;
        v[i] = if yogi {
            v[i] - (1.0 - beta2) * d2 * (v[i] - d2).signum() * f32::from(v[i] != d2)
        } else {
            beta2 * v[i] + (1.0 - beta2) * d2
        };
        x[i] += lr * m[i] / (v[i].sqrt() + tau);
    }
}
