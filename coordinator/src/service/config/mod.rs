//! The coordinator's configuration file (`starling.toml`) and its environment overrides.
//!
//! [`ServiceConfig::load`] reads the TOML file, applies every `STARLING_<SECTION>_<KEY>`
//! environment variable on top (e.g. `STARLING_SERVER_LISTEN=0.0.0.0:4433`,
//! `STARLING_ROUND_TARGET_PARTICIPANTS=200`; values are parsed as TOML values, and fall back to
//! plain strings), then validates the result once. Relative paths in the file are resolved
//! against the directory holding the file. The reference of every key is
//! `docs/operations.md`; [`TEMPLATE`] is the commented file `starling init` writes.
//!
//! The file config is converted once into the engine's configs
//! ([`ServiceConfig::orchestrator_config`], [`ServiceConfig::build_strategy`]); nothing else reads
//! TOML.

use crate::privacy::OpenDpGaussian;
use serde::{Deserialize, Serialize};
use starling_proto::dp::strategy::{AdaptiveClipping, DpConfig, DpConfigError, DpFedAvg};
use starling_proto::dp::{
    Budget, ClipNorm, Delta, Epsilon, GaussianSampler, NoiseMultiplier, PrivacyLedger, Quantile,
};
use starling_proto::encoding::EncodingKind;
use starling_proto::message::{NoiseSettings, TrainingPlan};
use starling_proto::round::{Eligibility, OrchestratorConfig, RoundConfig, SecureAggregation, Weighting};
use starling_proto::strategy::{Federated, NormBound, Strategy};
use starling_proto::update::ModelShape;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "STARLING_";

/// The sections of the file (and of the environment overrides).
pub const SECTIONS: [&str; 9] = [
    "server",
    "model",
    "round",
    "strategy",
    "privacy",
    "secure_aggregation",
    "evaluation",
    "storage",
    "cluster",
];

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file (with overrides applied) is not valid TOML for this schema.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// An environment override names a key that does not exist, or has an unusable value.
    #[error("environment variable {var}: {detail}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        detail: String,
    },
    /// A setting is out of range.
    #[error("invalid setting {key}: {detail}")]
    Invalid {
        /// `section.key`.
        key: &'static str,
        /// What is wrong.
        detail: String,
    },
}

fn invalid(key: &'static str, detail: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, detail: detail.into() }
}

mod sections;
mod template;
#[cfg(test)]
mod tests;

pub use sections::*;
pub use template::TEMPLATE;

/// The whole configuration. See the module docs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// `[server]`.
    pub server: ServerSection,
    /// `[model]`.
    pub model: ModelSection,
    /// `[round]`.
    pub round: RoundSection,
    /// `[strategy]`.
    pub strategy: StrategySection,
    /// `[privacy]`.
    pub privacy: PrivacySection,
    /// `[secure_aggregation]`.
    pub secure_aggregation: SecureAggregationSection,
    /// `[evaluation]`.
    pub evaluation: EvaluationSection,
    /// `[storage]`.
    pub storage: StorageSection,
    /// `[cluster]`.
    pub cluster: ClusterSection,
}

impl ServiceConfig {
    /// Reads `path`, applies the process environment's overrides, resolves relative paths
    /// against the file's directory and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::from_toml(&text, std::env::vars(), &base)
    }

    /// Parses `text`, applies the overrides in `env` (only `STARLING_<SECTION>_<KEY>` variables
    /// of a known section are read), resolves relative paths against `base`, and validates.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        base: &Path,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table =
            text.parse().map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        apply_env(&mut table, env)?;
        let mut config: ServiceConfig =
            table.try_into().map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.server.cert,
            &mut self.server.key,
            &mut self.server.admin_token_file,
            &mut self.server.token_secret_file,
            &mut self.storage.path,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(p) = self.storage.postgres_password_file.as_mut().filter(|p| p.is_relative()) {
            *p = base.join(&*p);
        }
    }

    /// Checks every range the engine would otherwise refuse later, with the key's name.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_cluster()?;
        let s = &self.server;
        if s.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if s.max_concurrent_handshakes == 0 {
            return Err(invalid("server.max_concurrent_handshakes", "must be at least 1"));
        }
        if s.max_connections_per_ip == 0 {
            return Err(invalid("server.max_connections_per_ip", "must be at least 1"));
        }
        for (key, ms) in [
            ("server.handshake_timeout_ms", s.handshake_timeout_ms),
            ("server.checkin_timeout_ms", s.checkin_timeout_ms),
            ("server.frame_timeout_ms", s.frame_timeout_ms),
            ("server.send_timeout_ms", s.send_timeout_ms),
        ] {
            if ms == 0 {
                return Err(invalid(key, "must be positive"));
            }
        }
        if s.max_frame_bytes < 1024 || s.max_frame_bytes > starling_proto::codec::HARD_MAX_FRAME_BYTES {
            return Err(invalid("server.max_frame_bytes", "must be between 1 KiB and 1 GiB"));
        }
        if s.idle_timeout_ms == 0 {
            return Err(invalid("server.idle_timeout_ms", "must be positive"));
        }
        if s.max_concurrent_streams == 0 {
            return Err(invalid("server.max_concurrent_streams", "must be at least 1"));
        }
        if s.rate_per_second == 0 || s.rate_burst == 0 {
            return Err(invalid("server.rate_per_second", "rate and burst must be at least 1"));
        }
        self.shape()?;
        let model_bytes = self.shape()?.len() as u64 * 4 + 1024;
        if model_bytes > u64::from(s.max_frame_bytes) {
            return Err(invalid(
                "server.max_frame_bytes",
                format!("{} bytes cannot carry the model ({model_bytes} bytes)", s.max_frame_bytes),
            ));
        }
        if s.unauthenticated_max_frame_bytes < 1024 || s.unauthenticated_max_frame_bytes > s.max_frame_bytes {
            return Err(invalid(
                "server.unauthenticated_max_frame_bytes",
                "must be at least 1 KiB and at most server.max_frame_bytes",
            ));
        }
        if !(self.model.init_std.is_finite() && self.model.init_std >= 0.0) {
            return Err(invalid("model.init_std", "must be a finite number >= 0"));
        }
        if self.model.family.is_empty() {
            return Err(invalid("model.family", "must not be empty"));
        }
        encoding(&self.round.encoding)?;
        weighting(&self.round.weighting)?;
        if !(self.round.max_weight.is_finite() && self.round.max_weight > 0.0) {
            return Err(invalid("round.max_weight", "must be a positive finite number"));
        }
        self.build_strategy(PrivacyLedger::new(self.budget()?))?;
        if self.secure_aggregation.enabled {
            let what = if self.local_dp() {
                Some((
                    "privacy.mode",
                    "local DP and secure aggregation do not combine (choose central: the devices then add the noise)",
                ))
            } else if self.privacy.adaptive_clipping {
                Some((
                    "privacy.adaptive_clipping",
                    "not available under secure aggregation: the clipping indicators would have to be summed securely too",
                ))
            } else if matches!(self.strategy.kind.as_str(), "median" | "trimmed_mean") {
                Some((
                    "strategy.kind",
                    "a robust rule needs individual updates; secure aggregation gives only their sum",
                ))
            } else {
                None
            };
            if let Some((key, detail)) = what {
                return Err(invalid(key, detail));
            }
        }
        if self.privacy.adaptive_clipping && !self.central_dp() {
            return Err(invalid(
                "privacy.adaptive_clipping",
                "needs mode = \"central\" (the clipping indicators are counted with central noise)",
            ));
        }
        // The engine's own checks (targets, over-selection, weights).
        let shape = self.shape()?;
        starling_proto::round::Orchestrator::new(
            self.orchestrator_config()?,
            Box::new(Federated::fedavg()),
            vec![0.0; shape.len()],
            starling_proto::ids::ModelVersion(0),
            starling_proto::ids::RoundId(1),
        )
        .map_err(|e| invalid("round", e.to_string()))?;
        if self.evaluation.every_rounds.is_some_and(|n| n > 0) {
            let unsupported = if self.secure_aggregation.enabled {
                Some("secure aggregation")
            } else if self.local_dp() {
                Some("local DP (privacy.mode = \"local\")")
            } else {
                None
            };
            if let Some(what) = unsupported {
                return Err(invalid(
                    "evaluation.every_rounds",
                    format!(
                        "federated evaluation is not supported under {what} (the devices' figures would \
                         be released without its protection); set every_rounds = 0 or leave it unset"
                    ),
                ));
            }
        }
        if self.storage.keep_checkpoints == 0 {
            return Err(invalid("storage.keep_checkpoints", "must be at least 1"));
        }
        if let Some(conn) = &self.storage.postgres {
            if conn.trim().is_empty() {
                return Err(invalid(
                    "storage.postgres",
                    "is empty: give a connection string (host=… port=… user=… dbname=…) or remove the key",
                ));
            }
            if let Err(e) = conn.parse::<postgres::Config>() {
                return Err(invalid("storage.postgres", format!("not a connection string: {e}")));
            }
        }
        if self.storage.postgres_password_file.is_some() && self.storage.postgres.is_none() {
            return Err(invalid("storage.postgres_password_file", "is set but storage.postgres is not"));
        }
        Ok(())
    }

    /// `[cluster]`: what several nodes can and cannot do together.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        if !c.enabled {
            return Ok(());
        }
        if self.storage.postgres.is_none() {
            return Err(invalid(
                "cluster.enabled",
                "several nodes share one PostgreSQL database: set storage.postgres",
            ));
        }
        if matches!(self.strategy.kind.as_str(), "median" | "trimmed_mean") {
            return Err(invalid(
                "strategy.kind",
                "a median or trimmed mean needs every update in one place, which several nodes do \
                 not have; use fedavg, fedavg_row, fedavgm, fedadam or fedyogi",
            ));
        }
        if self.evaluation.every_rounds.is_some_and(|n| n > 0) {
            return Err(invalid(
                "evaluation.every_rounds",
                "federated evaluation does not run across several nodes yet",
            ));
        }
        if c.lease_margin_ms >= c.lease_ttl_ms || c.lease_ttl_ms == 0 {
            return Err(invalid("cluster.lease_margin_ms", "must be below cluster.lease_ttl_ms"));
        }
        for (key, v) in [
            ("cluster.heartbeat_ms", c.heartbeat_ms),
            ("cluster.tick_ms", c.tick_ms),
            ("cluster.db_timeout_ms", c.db_timeout_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be positive"));
            }
        }
        if c.population.is_empty() || c.population.len() > 200 {
            return Err(invalid("cluster.population", "must be 1 to 200 characters"));
        }
        if c.node.len() > 200 {
            return Err(invalid("cluster.node", "must be at most 200 characters"));
        }
        Ok(())
    }

    /// The shape of the global parameters: the known family's (`bpr-mf`: `rows × row_len`;
    /// `two-tower`: `rows` item rows of `row_len`, then its dense rows), else `rows × row_len`.
    pub fn shape(&self) -> Result<ModelShape, ConfigError> {
        if let Some(def) = self.model_def()? {
            return def.shape().map_err(|e| invalid("model.rows", e.to_string()));
        }
        ModelShape::new(self.model.rows, self.model.row_len).map_err(|e| invalid("model.rows", e.to_string()))
    }

    /// The model definition of a known family (`bpr-mf`, `two-tower`), `None` for other names.
    pub fn model_def(&self) -> Result<Option<starling_models::family::ModelDef>, ConfigError> {
        use starling_models::family::{MF_NAME, ModelDef, TWO_TOWER_NAME};
        let m = &self.model;
        if m.family != MF_NAME && m.family != TWO_TOWER_NAME {
            return Ok(None);
        }
        ModelDef::from_name(&m.family, m.rows, m.row_len, false)
            .map(Some)
            .map_err(|e| invalid("model.rows", e.to_string()))
    }

    /// How many committed training rounds between evaluation rounds (0 = off): see
    /// [`EvaluationSection::every_rounds`].
    pub fn evaluation_every(&self) -> u64 {
        match self.evaluation.every_rounds {
            Some(n) => n,
            None if self.secure_aggregation.enabled || self.local_dp() || self.cluster.enabled => 0,
            None => DEFAULT_EVALUATION_EVERY,
        }
    }

    /// Reports an evaluation round aims for (`None`: the training target).
    pub fn evaluation_target(&self) -> Option<usize> {
        (self.evaluation.target_participants > 0).then_some(self.evaluation.target_participants)
    }

    /// The largest frame a selected client may send: `server.max_frame_bytes`, lowered to what
    /// the largest encoding of an update of the model can take (dense or row-sparse with every
    /// row, plus the frame's envelope), so a peer can never make the service buffer more.
    pub fn upload_frame_bytes(&self) -> Result<u32, ConfigError> {
        let shape = self.shape()?;
        // Under secure aggregation the masked vector may be padded to a power of two (rotation).
        let values =
            if self.secure_aggregation.enabled { shape.len().next_power_of_two() } else { shape.len() };
        let need = values as u64 * 4 + u64::from(shape.rows) * 4 + 4096;
        Ok(need.min(u64::from(self.server.max_frame_bytes)) as u32)
    }

    /// The engine's secure-aggregation settings, when `[secure_aggregation]` is enabled.
    pub fn secure_aggregation_settings(&self) -> Option<SecureAggregation> {
        let s = &self.secure_aggregation;
        s.enabled.then(|| SecureAggregation {
            neighbours: s.neighbours,
            threshold: if s.threshold == 0 { s.neighbours / 2 + 1 } else { s.threshold },
            bits: s.bits,
            dropout_tolerance: s.dropout_tolerance,
            max_cohort: s.max_cohort,
            rotation: s.rotation,
            phase_timeout: Duration::from_millis(s.phase_timeout_ms),
            clip_norm: self.privacy.clip_norm as f32,
        })
    }

    /// The (ε, δ) budget.
    pub fn budget(&self) -> Result<Budget, ConfigError> {
        Ok(Budget {
            epsilon: Epsilon::new(self.privacy.epsilon_budget)
                .map_err(|e| invalid("privacy.epsilon_budget", e.to_string()))?,
            delta: Delta::new(self.privacy.delta).map_err(|e| invalid("privacy.delta", e.to_string()))?,
        })
    }

    /// Whether central DP is on.
    pub fn central_dp(&self) -> bool {
        self.privacy.mode == "central"
    }

    /// Whether local DP is on.
    pub fn local_dp(&self) -> bool {
        self.privacy.mode == "local"
    }

    /// The coordinator's noise sampler under central DP.
    pub fn noise_sampler(&self) -> Result<std::sync::Arc<dyn GaussianSampler>, ConfigError> {
        match self.privacy.noise_sampler.as_str() {
            "opendp-grid" => Ok(std::sync::Arc::new(OpenDpGaussian::with_granularity(-20))),
            "opendp-exact" => Ok(std::sync::Arc::new(OpenDpGaussian::exact())),
            other => Err(invalid(
                "privacy.noise_sampler",
                format!("unknown sampler {other:?} (opendp-grid, opendp-exact)"),
            )),
        }
    }

    /// The round engine's configuration.
    pub fn orchestrator_config(&self) -> Result<OrchestratorConfig, ConfigError> {
        let r = &self.round;
        let ms = Duration::from_millis;
        let mut plan = TrainingPlan {
            epochs: r.epochs,
            learning_rate: r.learning_rate,
            private_learning_rate: r.private_learning_rate,
            batch_size: r.batch_size,
            encoding: encoding(&r.encoding)?,
            ..TrainingPlan::default()
        };
        // Clients always clip (the SDK refuses a plan without a clip norm), DP or not.
        plan.clip_norm = Some(self.privacy.clip_norm as f32);
        if self.central_dp() {
            plan.noise = NoiseSettings::Central { multiplier: self.privacy.noise_multiplier as f32 };
        }
        if self.local_dp() {
            plan.noise = NoiseSettings::Local { multiplier: self.privacy.noise_multiplier as f32 };
            // Noise goes on every coordinate: a sparse update would name the rows the user touched.
            plan.encoding = EncodingKind::Dense;
        }
        let shape = self.shape()?;
        let secure = self.secure_aggregation_settings();
        if secure.is_some() {
            // The session encodes the update itself; what the host hands it must be lossless.
            plan.encoding = EncodingKind::Dense;
        }
        Ok(OrchestratorConfig {
            model_family: self.model.family.clone(),
            shape,
            round: RoundConfig {
                target_participants: r.target_participants,
                over_selection: r.over_selection,
                min_reports: r.min_reports,
                selection_pool: (r.selection_pool > 0).then_some(r.selection_pool),
                selection_timeout: ms(r.selection_timeout_ms),
                report_timeout: ms(r.report_timeout_ms),
                eligibility: Eligibility {
                    require_charging: r.require_charging,
                    require_unmetered: r.require_unmetered,
                    require_idle: r.require_idle,
                    min_battery_percent: r.min_battery_percent,
                },
                plan,
                max_update_values: shape.len(),
                weighting: weighting(&r.weighting)?,
                max_weight: r.max_weight,
                retry_after: ms(r.retry_after_ms),
                retry_window: ms(r.retry_window_ms),
                secure,
            },
            history: self.model.history,
            rng_seed: self.model.seed,
        })
    }

    /// The strategy, wrapped so that the coordinator re-clips every update to `privacy.clip_norm`
    /// whatever clients did: in [`NormBound`] with `privacy.mode = "off"`, in DP-FedAvg (which
    /// clips, sums and noises) continuing from `ledger` with `"central"`. A robust rule (median,
    /// trimmed mean) with central DP is refused (`strategy.kind`): DP-FedAvg would replace it by
    /// its mean.
    pub fn build_strategy(&self, ledger: PrivacyLedger) -> Result<Box<dyn Strategy>, ConfigError> {
        let st = &self.strategy;
        let inner = match st.kind.as_str() {
            "fedavg" => Federated::fedavg(),
            "fedavg_row" => Federated::fedavg_row_aware(),
            "fedavgm" => Federated::fedavgm(st.server_learning_rate, st.momentum),
            "fedadam" => Federated::fedadam(st.server_learning_rate),
            "fedyogi" => Federated::fedyogi(st.server_learning_rate),
            "median" => Federated::median(),
            "trimmed_mean" => {
                if !(0.0..0.5).contains(&st.trim) {
                    return Err(invalid("strategy.trim", "must be in [0, 0.5)"));
                }
                Federated::trimmed_mean(st.trim)
            }
            other => {
                return Err(invalid(
                    "strategy.kind",
                    format!(
                        "unknown strategy {other:?} (fedavg, fedavg_row, fedavgm, fedadam, fedyogi, median, trimmed_mean)"
                    ),
                ));
            }
        };
        match self.privacy.mode.as_str() {
            "off" => {
                let bounded = NormBound::new(inner, self.privacy.clip_norm)
                    .map_err(|e| invalid("privacy.clip_norm", e.to_string()))?;
                Ok(Box::new(bounded))
            }
            "central" => {
                let p = &self.privacy;
                let target = self.round.target_participants.max(1);
                let adaptive = if p.adaptive_clipping {
                    let count_noise = if p.clip_count_noise > 0.0 {
                        p.clip_count_noise
                    } else {
                        // Andrew et al.: σ_b = expected participants / 20, and it must exceed σ/2.
                        (target as f64 / 20.0).max(p.noise_multiplier * 0.75)
                    };
                    Some(AdaptiveClipping {
                        target: Quantile::new(p.target_quantile)
                            .map_err(|e| invalid("privacy.target_quantile", e.to_string()))?,
                        learning_rate: p.clip_learning_rate,
                        count_noise,
                    })
                } else {
                    None
                };
                let dp_config = DpConfig {
                    clip: ClipNorm::new(p.clip_norm)
                        .map_err(|e| invalid("privacy.clip_norm", e.to_string()))?,
                    noise: NoiseMultiplier::new(p.noise_multiplier)
                        .map_err(|e| invalid("privacy.noise_multiplier", e.to_string()))?,
                    expected_participants: target,
                    budget: self.budget()?,
                    adaptive,
                };
                let dp = DpFedAvg::with_ledger(inner, dp_config, ledger).map_err(|e| match e {
                    DpConfigError::RobustRule { .. } => invalid("strategy.kind", e.to_string()),
                    DpConfigError::Adaptive => invalid("privacy.clip_learning_rate", e.to_string()),
                    e => invalid("privacy", e.to_string()),
                })?;
                Ok(Box::new(dp.with_sampler(self.noise_sampler()?)))
            }
            "local" => {
                let p = &self.privacy;
                let clip =
                    ClipNorm::new(p.clip_norm).map_err(|e| invalid("privacy.clip_norm", e.to_string()))?;
                let sigma = NoiseMultiplier::new(p.noise_multiplier)
                    .map_err(|e| invalid("privacy.noise_multiplier", e.to_string()))?;
                // The coordinator cannot check a device's noise, but it bounds every update at what
                // an honest noised update stays within (re-clipping to C would erase the signal).
                let bound = starling_proto::dp::local::honest_norm_bound(
                    clip.get(),
                    sigma.get(),
                    self.shape()?.len(),
                );
                let bounded =
                    NormBound::new(inner, bound).map_err(|e| invalid("privacy.clip_norm", e.to_string()))?;
                Ok(Box::new(bounded))
            }
            other => Err(invalid("privacy.mode", format!("unknown mode {other:?} (central, local, off)"))),
        }
    }

    /// The initial global model, seeded by `model.seed`: the known family's own initialisation
    /// (`ModelDef::init_global` with `model.init_std`), else normal with `model.init_std`.
    pub fn initial_model(&self) -> Result<Vec<f32>, ConfigError> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        if let Some(def) = self.model_def()? {
            return def
                .init_global(self.model.seed, self.model.init_std)
                .map_err(|e| invalid("model.rows", e.to_string()));
        }
        let shape = self.shape()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.model.seed);
        let normal = rand_distr::Normal::new(0.0f32, self.model.init_std)
            .map_err(|e| invalid("model.init_std", e.to_string()))?;
        Ok((0..shape.len()).map(|_| normal.sample(&mut rng)).collect())
    }
}

fn encoding(name: &str) -> Result<EncodingKind, ConfigError> {
    match name {
        "row_sparse" => Ok(EncodingKind::RowSparse),
        "dense" => Ok(EncodingKind::Dense),
        "quantized8" => Ok(EncodingKind::Quantized8),
        other => Err(invalid(
            "round.encoding",
            format!("unknown encoding {other:?} (row_sparse, dense, quantized8)"),
        )),
    }
}

fn weighting(name: &str) -> Result<Weighting, ConfigError> {
    Weighting::from_name(name).ok_or_else(|| {
        invalid("round.weighting", format!("unknown weighting {name:?} (auto, equal, examples)"))
    })
}

/// Applies `STARLING_<SECTION>_<KEY>=value` overrides to the parsed file.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (var, value) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else { continue };
        let rest = rest.to_ascii_lowercase();
        let Some((section, key)) = SECTIONS.iter().find_map(|s| {
            rest.strip_prefix(s).and_then(|k| k.strip_prefix('_')).map(|k| (*s, k.to_string()))
        }) else {
            continue;
        };
        if key.is_empty() {
            return Err(ConfigError::Env { var, detail: "no key after the section".into() });
        }
        // A TOML value if it parses as one (numbers, booleans, arrays), else a plain string.
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let entry = table.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(section_table) = entry else {
            return Err(ConfigError::Env { var, detail: format!("[{section}] in the file is not a table") });
        };
        // Strings are kept as strings where the file (or the default) has a string.
        let value = match (section_table.get(&key), parsed) {
            (Some(toml::Value::String(_)), v) if !v.is_str() => toml::Value::String(value),
            (_, v) => v,
        };
        section_table.insert(key, value);
    }
    Ok(())
}
