//! Settings of the round engine: eligibility, per-round settings, the orchestrator's settings.

use crate::message::{DeviceConditions, TrainingPlan};
use crate::time::Duration;
use crate::update::ModelShape;

pub use crate::weighting::Weighting;

/// Which device conditions make a client eligible to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Eligibility {
    /// Require the device to be charging.
    pub require_charging: bool,
    /// Require an unmetered network.
    pub require_unmetered: bool,
    /// Require the device to be idle.
    pub require_idle: bool,
    /// Minimum battery level in percent.
    pub min_battery_percent: u8,
}

impl Default for Eligibility {
    /// Charging, unmetered and idle, as production federated learning requires.
    fn default() -> Self {
        Self { require_charging: true, require_unmetered: true, require_idle: true, min_battery_percent: 0 }
    }
}

impl Eligibility {
    /// Any device is eligible.
    pub fn any() -> Self {
        Self {
            require_charging: false,
            require_unmetered: false,
            require_idle: false,
            min_battery_percent: 0,
        }
    }

    /// Whether `c` satisfies the rule.
    pub fn admits(&self, c: &DeviceConditions) -> bool {
        (!self.require_charging || c.charging)
            && (!self.require_unmetered || c.unmetered)
            && (!self.require_idle || c.idle)
            && c.battery_percent >= self.min_battery_percent
    }
}

/// Settings of every round.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundConfig {
    /// Reports the round aims for; reaching it closes the round early.
    pub target_participants: usize,
    /// Clients selected per report wanted (default 1.3: production FL over-selects to absorb
    /// dropouts and stragglers).
    pub over_selection: f64,
    /// Fewest reports for the round to commit; fewer fails it with the model unchanged.
    pub min_reports: usize,
    /// Eligible check-ins gathered before selection closes early. `None` waits for the selection
    /// deadline and then samples uniformly from everyone who checked in.
    pub selection_pool: Option<usize>,
    /// How long check-ins are gathered.
    pub selection_timeout: Duration,
    /// How long selected clients have to report, from the close of selection.
    pub report_timeout: Duration,
    /// Device conditions required to take part.
    pub eligibility: Eligibility,
    /// The training plan sent to clients (strategies may adjust it per round).
    pub plan: TrainingPlan,
    /// Largest update accepted, in values.
    pub max_update_values: usize,
    /// How a client's reported weight becomes its aggregation weight (see [`Weighting`]).
    pub weighting: Weighting,
    /// Cap on one client's aggregation weight under example weighting: larger reported weights
    /// are clamped to it (bounds one client's influence on FedAvg).
    pub max_weight: f32,
    /// "Come back later" delay given to clients that are not needed now.
    pub retry_after: Duration,
    /// Width of the window over which those clients spread their return.
    pub retry_window: Duration,
    /// Secure aggregation (SecAgg+ with distributed DP): the coordinator learns only the sum of
    /// the devices' updates. `None`: every update is sent in the clear (over TLS).
    pub secure: Option<super::SecureAggregation>,
}

impl Default for RoundConfig {
    fn default() -> Self {
        Self {
            target_participants: 100,
            over_selection: 1.3,
            min_reports: 50,
            selection_pool: None,
            selection_timeout: Duration::from_secs(60),
            report_timeout: Duration::from_secs(300),
            eligibility: Eligibility::default(),
            plan: TrainingPlan::default(),
            max_update_values: 16 << 20,
            weighting: Weighting::Auto,
            max_weight: 100.0,
            retry_after: Duration::from_secs(600),
            retry_window: Duration::from_secs(300),
            secure: None,
        }
    }
}

/// Why a configuration was rejected.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `target_participants` is zero.
    #[error("target_participants must be at least 1")]
    NoTarget,
    /// `min_reports` is zero or above the target.
    #[error("min_reports must be in 1..=target_participants ({target}), got {min}")]
    MinReports {
        /// Configured minimum.
        min: usize,
        /// Configured target.
        target: usize,
    },
    /// `over_selection` below 1 or not finite.
    #[error("over_selection must be a finite number >= 1, got {0}")]
    OverSelection(f64),
    /// The initial model does not have the configured shape.
    #[error("initial model has {got} values, shape needs {want}")]
    ModelLength {
        /// Values supplied.
        got: usize,
        /// Values the shape needs.
        want: usize,
    },
    /// The initial model contains NaN or infinity.
    #[error("initial model contains a non-finite value")]
    NonFiniteModel,
    /// `max_weight` is not a positive finite number.
    #[error("max_weight must be positive and finite")]
    MaxWeight,
    /// `selection_pool` is zero.
    #[error("selection_pool must be at least 1 when set")]
    EmptyPool,
    /// The secure-aggregation settings are unusable (e.g. the modulus cannot hold the cohort).
    #[error("secure aggregation: {0}")]
    SecureAggregation(String),
}

/// Settings of the orchestrator.
#[derive(Clone, Debug, PartialEq)]
pub struct OrchestratorConfig {
    /// Model family clients must run.
    pub model_family: String,
    /// Shape of the global parameters.
    pub shape: ModelShape,
    /// Settings of every round.
    pub round: RoundConfig,
    /// How many earlier model versions to keep for patch downloads (0 = always send full models).
    pub history: usize,
    /// Seed of the orchestrator's RNG (selection, noise): the same seed and inputs give the same run.
    pub rng_seed: u64,
}
