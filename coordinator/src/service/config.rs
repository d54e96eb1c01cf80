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
use starling_proto::round::{Eligibility, OrchestratorConfig, RoundConfig, Weighting};
use starling_proto::strategy::{Federated, NormBound, Strategy};
use starling_proto::update::ModelShape;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "STARLING_";

/// The sections of the file (and of the environment overrides).
pub const SECTIONS: [&str; 6] = ["server", "model", "round", "strategy", "privacy", "storage"];

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

/// `[server]`: network endpoints, TLS, secrets and limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// UDP address of the QUIC endpoint.
    pub listen: SocketAddr,
    /// TCP address of the admin HTTP endpoint (status and metrics).
    pub admin_listen: SocketAddr,
    /// PEM certificate chain of the server (leaf first).
    pub cert: PathBuf,
    /// PEM private key of the server (PKCS#8).
    pub key: PathBuf,
    /// File holding the admin bearer token.
    pub admin_token_file: PathBuf,
    /// File holding the secret enrollment tokens are signed with.
    pub token_secret_file: PathBuf,
    /// Most open client connections; further handshakes are refused.
    pub max_connections: u32,
    /// Most open connections from one IP address; further handshakes from it are refused.
    pub max_connections_per_ip: u32,
    /// Most handshakes in progress at once (paces a round-start burst).
    pub max_concurrent_handshakes: u32,
    /// A handshake not complete after this long is abandoned (milliseconds).
    pub handshake_timeout_ms: u64,
    /// With more handshakes than this in progress, a connection attempt from an address not yet
    /// validated is answered with a stateless QUIC Retry (0: always).
    pub retry_above_handshakes: u32,
    /// A connection must open its stream within this long after its handshake, and present a
    /// valid token in a check-in within this long after opening it (milliseconds).
    pub checkin_timeout_ms: u64,
    /// Largest frame accepted from a client that has been sent a task (its update), in bytes.
    /// The service never accepts more than the largest encoding of the model needs.
    pub max_frame_bytes: u32,
    /// Largest frame accepted from any other connection (before its token verified, or while it
    /// holds no task), in bytes.
    pub unauthenticated_max_frame_bytes: u32,
    /// A frame must finish arriving within this long after its first bytes (milliseconds).
    pub frame_timeout_ms: u64,
    /// A frame must be written to a client within this long (milliseconds).
    pub send_timeout_ms: u64,
    /// A connection without traffic for this long is closed (milliseconds).
    pub idle_timeout_ms: u64,
    /// Bidirectional streams a client may open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Messages per second one connection may send (sustained; bursts up to `rate_burst`).
    pub rate_per_second: u32,
    /// Burst allowance of the per-connection rate limit.
    pub rate_burst: u32,
    /// Size of the UDP receive buffer requested from the kernel (bytes).
    pub recv_buffer_bytes: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 4433)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            cert: "tls/server.pem".into(),
            key: "tls/server.key".into(),
            admin_token_file: "secrets/admin.token".into(),
            token_secret_file: "secrets/token.key".into(),
            max_connections: 20_000,
            max_connections_per_ip: 64,
            max_concurrent_handshakes: 256,
            handshake_timeout_ms: 10_000,
            retry_above_handshakes: 32,
            checkin_timeout_ms: 5_000,
            max_frame_bytes: starling_proto::codec::DEFAULT_MAX_FRAME_BYTES,
            unauthenticated_max_frame_bytes: 16 << 10,
            frame_timeout_ms: 30_000,
            send_timeout_ms: 10_000,
            idle_timeout_ms: 30_000,
            max_concurrent_streams: 2,
            rate_per_second: 10,
            rate_burst: 20,
            recv_buffer_bytes: 4 << 20,
        }
    }
}

/// `[model]`: the model family and the shape of its global parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Family name clients must announce (e.g. `bpr-mf`).
    pub family: String,
    /// Rows of the global parameters (for MF: items).
    pub rows: u32,
    /// Values per row (for MF: the embedding dimension).
    pub row_len: u32,
    /// Standard deviation of the initial parameters (normal, seeded).
    pub init_std: f32,
    /// Seed of the initial parameters and of the round engine's RNG.
    pub seed: u64,
    /// Earlier versions kept for delta (patch) downloads.
    pub history: usize,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self { family: "bpr-mf".into(), rows: 1682, row_len: 32, init_std: 0.01, seed: 1, history: 4 }
    }
}

/// `[round]`: how rounds run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoundSection {
    /// Reports a round aims for.
    pub target_participants: usize,
    /// Fewest reports for a round to commit.
    pub min_reports: usize,
    /// Clients selected per report wanted.
    pub over_selection: f64,
    /// Check-ins gathered before selection closes early (0 = wait for the selection timeout).
    pub selection_pool: usize,
    /// How long check-ins are gathered (milliseconds).
    pub selection_timeout_ms: u64,
    /// How long selected clients have to report (milliseconds).
    pub report_timeout_ms: u64,
    /// Pause between the end of a round and the start of the next (milliseconds).
    pub interval_ms: u64,
    /// Stop after this many committed rounds (0 = run forever).
    pub max_rounds: u64,
    /// Only charging devices take part.
    pub require_charging: bool,
    /// Only devices on an unmetered network take part.
    pub require_unmetered: bool,
    /// Only idle devices take part.
    pub require_idle: bool,
    /// Minimum battery level (percent).
    pub min_battery_percent: u8,
    /// Local epochs.
    pub epochs: u32,
    /// Learning rate of the global parameters on the device.
    pub learning_rate: f32,
    /// Learning rate of the private parameters on the device.
    pub private_learning_rate: f32,
    /// Mini-batch size.
    pub batch_size: u32,
    /// Update encoding: `row_sparse`, `dense` or `quantized8`.
    pub encoding: String,
    /// How a client's reported weight becomes its aggregation weight: `auto` (equal weights under
    /// any DP mode, the reported example count capped at `max_weight` otherwise), `equal` or
    /// `examples` (capped).
    pub weighting: String,
    /// Cap on one client's aggregation weight under example weighting (larger claims are clamped).
    pub max_weight: f32,
    /// "Come back later" delay for clients not needed now (milliseconds).
    pub retry_after_ms: u64,
    /// Window over which those clients spread their return (milliseconds).
    pub retry_window_ms: u64,
}

impl Default for RoundSection {
    fn default() -> Self {
        Self {
            target_participants: 100,
            min_reports: 50,
            over_selection: 1.3,
            selection_pool: 0,
            selection_timeout_ms: 60_000,
            report_timeout_ms: 300_000,
            interval_ms: 1_000,
            max_rounds: 0,
            require_charging: true,
            require_unmetered: true,
            require_idle: true,
            min_battery_percent: 0,
            epochs: 1,
            learning_rate: 0.05,
            private_learning_rate: 0.05,
            batch_size: 32,
            encoding: "row_sparse".into(),
            weighting: Weighting::default().name().into(),
            max_weight: RoundConfig::default().max_weight,
            retry_after_ms: 600_000,
            retry_window_ms: 300_000,
        }
    }
}

/// `[strategy]`: the aggregation strategy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StrategySection {
    /// `fedavg`, `fedavg_row`, `fedavgm`, `fedadam`, `fedyogi`, `median` or `trimmed_mean`.
    pub kind: String,
    /// Server learning rate (fedavgm, fedadam, fedyogi).
    pub server_learning_rate: f32,
    /// Server momentum (fedavgm).
    pub momentum: f32,
    /// Fraction trimmed at each end (trimmed_mean).
    pub trim: f64,
}

impl Default for StrategySection {
    fn default() -> Self {
        Self { kind: "fedavg".into(), server_learning_rate: 1.0, momentum: 0.9, trim: 0.1 }
    }
}

/// `[privacy]`: differential privacy (central DP-FedAvg or local DP) and its budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacySection {
    /// `central` (default), `local` or `off`.
    pub mode: String,
    /// Clip norm `C` of every update (clients clip, the coordinator re-clips).
    pub clip_norm: f64,
    /// Noise multiplier σ.
    pub noise_multiplier: f64,
    /// Total ε budget (central DP); rounds that would exceed it are not started.
    pub epsilon_budget: f64,
    /// δ at which ε is measured. Must be well below 1/N: a round is refused when δ·N > 0.1.
    pub delta: f64,
    /// The sampler of the coordinator's noise under central DP: `opendp-grid` (opendp's discrete
    /// Gaussian on a 2⁻²⁰ grid, drawn from opendp's own OS-seeded ChaCha20, never from a config seed)
    /// or `opendp-exact`.
    pub noise_sampler: String,
    /// Adaptive clipping (Andrew et al. 2021): the clip norm tracks a quantile of update norms.
    pub adaptive_clipping: bool,
    /// γ: the quantile of unclipped update norms the clip norm tracks.
    pub target_quantile: f64,
    /// η: the clip norm's geometric learning rate.
    pub clip_learning_rate: f64,
    /// σ_b: noise on the count of clipping indicators; 0 = target_participants / 20 (raised
    /// above σ/2 if needed).
    pub clip_count_noise: f64,
    /// Must be `true` to run with `mode = "off"` on a store whose ledger already holds DP rounds:
    /// models released from then on carry no guarantee at all.
    pub allow_release_without_dp: bool,
}

impl Default for PrivacySection {
    fn default() -> Self {
        Self {
            mode: "central".into(),
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            epsilon_budget: 8.0,
            delta: 1e-7,
            noise_sampler: "opendp-grid".into(),
            adaptive_clipping: false,
            target_quantile: 0.5,
            clip_learning_rate: 0.2,
            clip_count_noise: 0.0,
            allow_release_without_dp: false,
        }
    }
}

/// `[storage]`: the embedded database.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    /// The SQLite file (created if missing).
    pub path: PathBuf,
    /// Checkpoints kept (older model versions are pruned; the ledger is never pruned).
    pub keep_checkpoints: u32,
}

impl Default for StorageSection {
    fn default() -> Self {
        Self { path: "data/coordinator.db".into(), keep_checkpoints: 8 }
    }
}

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
    /// `[storage]`.
    pub storage: StorageSection,
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
    }

    /// Checks every range the engine would otherwise refuse later, with the key's name.
    pub fn validate(&self) -> Result<(), ConfigError> {
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
        if self.storage.keep_checkpoints == 0 {
            return Err(invalid("storage.keep_checkpoints", "must be at least 1"));
        }
        Ok(())
    }

    /// The shape of the global parameters.
    pub fn shape(&self) -> Result<ModelShape, ConfigError> {
        ModelShape::new(self.model.rows, self.model.row_len).map_err(|e| invalid("model.rows", e.to_string()))
    }

    /// The largest frame a selected client may send: `server.max_frame_bytes`, lowered to what
    /// the largest encoding of an update of the model can take (dense or row-sparse with every
    /// row, plus the frame's envelope), so a peer can never make the service buffer more.
    pub fn upload_frame_bytes(&self) -> Result<u32, ConfigError> {
        let shape = self.shape()?;
        let need = shape.len() as u64 * 4 + u64::from(shape.rows) * 4 + 4096;
        Ok(need.min(u64::from(self.server.max_frame_bytes)) as u32)
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

    /// The initial global model: normal with `model.init_std`, seeded by `model.seed`.
    pub fn initial_model(&self) -> Result<Vec<f32>, ConfigError> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
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

/// The commented configuration `starling init` writes (paths relative to the file).
pub const TEMPLATE: &str = r#"# Starling coordinator configuration.
# Every key can be overridden by an environment variable STARLING_<SECTION>_<KEY>,
# e.g. STARLING_SERVER_LISTEN=0.0.0.0:4433 or STARLING_ROUND_TARGET_PARTICIPANTS=200.
# Relative paths are resolved against the directory of this file.
# Reference: docs/operations.md.

[server]
# UDP address of the QUIC endpoint (ALPN "starling/1", TLS 1.3).
listen = "127.0.0.1:4433"
# TCP address of the admin HTTP endpoint: GET /status (JSON) and GET /metrics (Prometheus),
# both require "Authorization: Bearer <admin token>". Keep it on a private interface.
admin_listen = "127.0.0.1:9464"
# Server certificate chain (leaf first) and its PKCS#8 private key, PEM.
cert = "tls/server.pem"
key = "tls/server.key"
# Bearer token of the admin endpoint, and the secret enrollment tokens are signed with.
admin_token_file = "secrets/admin.token"
token_secret_file = "secrets/token.key"
# Limits. A round start is a burst of handshakes: they are paced by max_concurrent_handshakes
# and absorbed by a large UDP receive buffer (the kernel caps it at net.core.rmem_max).
# Hostile peers: see docs/operations.md ("Limits") for what each costs and the memory bound.
max_connections = 20000
max_connections_per_ip = 64      # carrier NAT puts many devices behind one address: raise if needed
max_concurrent_handshakes = 256
handshake_timeout_ms = 10000          # a slow mobile network may need several seconds
retry_above_handshakes = 32      # stateless QUIC Retry (address validation) beyond this; 0 = always
checkin_timeout_ms = 5000        # open a stream, then check in with a valid token, each within this
max_frame_bytes = 67108864       # selected clients' uploads (capped further at the model's size)
unauthenticated_max_frame_bytes = 16384
frame_timeout_ms = 30000         # a frame must finish arriving within this
send_timeout_ms = 10000          # a frame must be written within this (a peer that stops reading)
idle_timeout_ms = 30000
max_concurrent_streams = 2
rate_per_second = 10
rate_burst = 20
recv_buffer_bytes = 4194304

[model]
family = "bpr-mf"
rows = 1682          # items
row_len = 32         # embedding dimension
init_std = 0.01
seed = 1
history = 4          # earlier versions kept to serve patches instead of full models

[round]
target_participants = 100
min_reports = 50
over_selection = 1.3
selection_pool = 0           # 0: wait for selection_timeout_ms, then sample
selection_timeout_ms = 60000
report_timeout_ms = 300000
interval_ms = 1000
max_rounds = 0               # 0: run until stopped (or the privacy budget is spent)
require_charging = true
require_unmetered = true
require_idle = true
min_battery_percent = 0
epochs = 1
learning_rate = 0.05
private_learning_rate = 0.05
batch_size = 32
encoding = "row_sparse"      # row_sparse | dense | quantized8
# A client's aggregation weight: auto = equal weights under any DP mode, else the example count it
# reports capped at max_weight (larger claims are clamped); equal; examples (capped).
weighting = "auto"
max_weight = 100.0
retry_after_ms = 600000
retry_window_ms = 300000

[strategy]
kind = "fedavg"              # fedavg | fedavg_row | fedavgm | fedadam | fedyogi | median | trimmed_mean
server_learning_rate = 1.0
momentum = 0.9
trim = 0.1

[privacy]
# central: clients clip, the coordinator Poisson-samples devices, sums clipped updates, adds
#          Gaussian noise and keeps the ledger (it sees individual clipped updates in memory).
# local:   every device clips and noises its own update (trusts nobody; costs far more accuracy).
# off:     no noise at all: models carry no privacy guarantee.
mode = "central"
clip_norm = 1.0              # clients clip to this L2 norm and the coordinator re-clips, in every mode
noise_multiplier = 1.0       # sigma: noise standard deviation over the clip norm
# Central DP samples every checked-in device with probability q = min(1, target_participants / N),
# N = enrolled devices with a live token (`starling token issue`), and charges each round at that q.
# The budget therefore lasts only with a large enough fleet. With target_participants = 100,
# sigma = 1 and delta = 1e-7, the PLD accountant gives (`starling privacy epsilon` plans others):
#   N =     1,000 (q = 0.1):    epsilon 9.0 after 100 rounds: the budget of 8 lasts under 100 rounds
#   N =    10,000 (q = 0.01):   epsilon 2.4 after 1,000 rounds, 7.6 after 10,000
#   N =   100,000 (q = 0.001):  epsilon 0.23 after 1,000 rounds, 0.63 after 10,000
#   N = 1,000,000 (q = 0.0001): epsilon 0.02 after 1,000 rounds, 0.06 after 10,000
# With fewer enrolled devices than the target, q = 1: each round costs about 5.6.
epsilon_budget = 8.0         # rounds that would exceed it are not started
delta = 1e-7                 # must be well below 1/N: rounds are refused when delta * N > 0.1
noise_sampler = "opendp-grid" # opendp-grid | opendp-exact: discrete Gaussians, OS-seeded
adaptive_clipping = false    # true: clip_norm follows the target_quantile of update norms
target_quantile = 0.5
clip_learning_rate = 0.2
clip_count_noise = 0.0       # noise on the count of clipping bits; 0 = target_participants / 20
allow_release_without_dp = false # mode = "off" on a store with DP rounds is refused unless true

[storage]
path = "data/coordinator.db" # SQLite (WAL, synchronous=FULL); back it up with `sqlite3 .backup`
keep_checkpoints = 8
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use starling_proto::ids::{ModelVersion, RoundId};
    use starling_proto::round::Weighting;
    use starling_proto::strategy::RoundContext;
    use starling_proto::update::Update;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn template_parses_to_the_defaults_apart_from_the_listen_address() {
        let c = ServiceConfig::from_toml(TEMPLATE, env(&[]), Path::new("/etc/starling")).unwrap();
        let mut d = ServiceConfig::default();
        d.server.listen = "127.0.0.1:4433".parse().unwrap();
        d.resolve_paths(Path::new("/etc/starling"));
        assert_eq!(c, d);
        assert_eq!(c.server.cert, Path::new("/etc/starling/tls/server.pem"));
    }

    #[test]
    fn environment_overrides_win_and_are_typed() {
        let c = ServiceConfig::from_toml(
            TEMPLATE,
            env(&[
                ("STARLING_SERVER_LISTEN", "0.0.0.0:5000"),
                ("STARLING_ROUND_TARGET_PARTICIPANTS", "200"),
                ("STARLING_ROUND_MIN_REPORTS", "150"),
                ("STARLING_ROUND_REQUIRE_CHARGING", "false"),
                ("STARLING_MODEL_FAMILY", "two-tower"),
                ("STARLING_PRIVACY_MODE", "central"),
                ("STARLING_STORAGE_PATH", "/var/lib/starling/c.db"),
                ("STARLING_LOG", "ignored: not a section"),
                ("PATH", "/usr/bin"),
            ]),
            Path::new("/etc/starling"),
        )
        .unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:5000".parse().unwrap());
        assert_eq!(c.round.target_participants, 200);
        assert!(!c.round.require_charging);
        assert_eq!(c.model.family, "two-tower");
        assert!(c.central_dp());
        assert_eq!(c.storage.path, Path::new("/var/lib/starling/c.db"));
    }

    #[test]
    fn mistakes_are_reported_with_their_key() {
        let base = Path::new(".");
        let e = ServiceConfig::from_toml(TEMPLATE, env(&[("STARLING_ROUND_TARGET_PARTICPANTS", "3")]), base)
            .unwrap_err();
        assert!(e.to_string().contains("target_particpants"), "{e}");
        let e = ServiceConfig::from_toml("[round]\nmin_reports = 500\n", env(&[]), base).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { key: "round", .. }), "{e}");
        let e = ServiceConfig::from_toml("[strategy]\nkind = \"fedsgd\"\n", env(&[]), base).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { key: "strategy.kind", .. }), "{e}");
        let e = ServiceConfig::from_toml("[privacy]\nmode = \"central\"\ndelta = 2.0\n", env(&[]), base)
            .unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { key: "privacy.delta", .. }), "{e}");
        let e = ServiceConfig::from_toml("[model]\nrows = 0\n", env(&[]), base).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { key: "model.rows", .. }), "{e}");
        let e = ServiceConfig::from_toml("[server]\nlisten = 4\n", env(&[]), base).unwrap_err();
        assert!(matches!(e, ConfigError::Parse(_)), "{e}");
        let e = ServiceConfig::from_toml("[server]\nmax_frame_bytes = 2048\n", env(&[]), base).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { key: "server.max_frame_bytes", .. }), "{e}");
    }

    #[test]
    fn converts_into_engine_configs() {
        let c = ServiceConfig::from_toml(
            "[privacy]\nmode = \"central\"\nnoise_multiplier = 1.1\n[round]\nencoding = \"dense\"\n",
            env(&[]),
            Path::new("."),
        )
        .unwrap();
        let o = c.orchestrator_config().unwrap();
        assert_eq!(o.round.plan.clip_norm, Some(1.0));
        assert_eq!(o.round.plan.encoding, EncodingKind::Dense);
        assert!(
            c.build_strategy(PrivacyLedger::new(c.budget().unwrap()))
                .unwrap()
                .name()
                .starts_with("dp-fedavg")
        );
        let m = c.initial_model().unwrap();
        assert_eq!(m.len(), 1682 * 32);
        assert_eq!(m, c.initial_model().unwrap(), "seeded");
    }

    /// Runs one aggregation of `strategy` over the updates (with their weights) and returns the
    /// delta it applies to a zero model.
    fn applied_delta(
        strategy: &mut dyn Strategy,
        shape: ModelShape,
        updates: Vec<(Update, f64)>,
    ) -> Vec<f32> {
        use rand::SeedableRng;
        let ctx = RoundContext {
            round: RoundId(1),
            model_version: ModelVersion(0),
            shape,
            target_participants: updates.len(),
            selected: updates.len(),
            population: Some(1000),
        };
        let mut agg = strategy.aggregator(&ctx);
        for (u, w) in updates {
            agg.accept(u, w).unwrap();
        }
        let aggregate = agg.finish(&mut rand_chacha::ChaCha8Rng::seed_from_u64(1)).unwrap();
        let mut model = vec![0.0; shape.len()];
        strategy.apply(&ctx, &mut model, &aggregate).unwrap();
        model
    }

    fn norm(v: &[f32]) -> f64 {
        v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt()
    }

    #[test]
    fn without_dp_the_config_still_re_clips_every_update_server_side() {
        // `starling init`'s file turns central DP on; with it switched off the coordinator still
        // bounds every update.
        let c = ServiceConfig::from_toml(TEMPLATE, env(&[]), Path::new(".")).unwrap();
        assert!(c.central_dp(), "privacy is on by default");
        let c = ServiceConfig::from_toml(TEMPLATE, env(&[("STARLING_PRIVACY_MODE", "off")]), Path::new("."))
            .unwrap();
        assert!(!c.central_dp());
        let clip = c.privacy.clip_norm;
        let mut s = c.build_strategy(PrivacyLedger::new(c.budget().unwrap())).unwrap();
        let shape = c.shape().unwrap();
        // One finite but huge update (norm 1e6), alone and among honest small ones.
        let mut huge = vec![0.0f32; shape.len()];
        huge[0] = 1e6;
        let huge = Update::dense(shape, huge).unwrap();
        let delta = applied_delta(&mut *s, shape, vec![(huge.clone(), 1.0)]);
        let lr = f64::from(c.strategy.server_learning_rate);
        assert!(norm(&delta) <= clip * lr * (1.0 + 1e-6), "norm {} > C = {clip}", norm(&delta));
        let small = Update::sparse(shape, vec![5], vec![0.01; 32]).unwrap();
        let delta = applied_delta(&mut *s, shape, vec![(huge, 1.0), (small.clone(), 1.0), (small, 1.0)]);
        assert!(norm(&delta) <= clip * lr, "norm {}", norm(&delta));
        // The other rules keep the bound (one round of momentum is the plain step; the adaptive
        // optimizers normalise per coordinate, so their step is bounded by their learning rate,
        // not by C).
        for kind in ["fedavg_row", "fedavgm", "median", "trimmed_mean"] {
            let c = ServiceConfig::from_toml(
                &format!("[strategy]\nkind = \"{kind}\"\n[privacy]\nmode = \"off\"\n"),
                env(&[]),
                Path::new("."),
            )
            .unwrap();
            let mut s = c.build_strategy(PrivacyLedger::new(c.budget().unwrap())).unwrap();
            let mut v = vec![0.0f32; shape.len()];
            v[7] = -3e5;
            let u = Update::dense(shape, v).unwrap();
            let delta = applied_delta(&mut *s, shape, vec![(u.clone(), 1.0), (u.clone(), 1.0), (u, 1.0)]);
            let lr = f64::from(c.strategy.server_learning_rate).max(1.0);
            assert!(norm(&delta) <= clip * lr * (1.0 + 1e-6), "{kind}: norm {}", norm(&delta));
        }
    }

    #[test]
    fn central_dp_re_clips_too() {
        let c = ServiceConfig::from_toml(
            "[privacy]\nmode = \"central\"\nnoise_multiplier = 0.0\nclip_norm = 2.0\n",
            env(&[]),
            Path::new("."),
        )
        .unwrap();
        let mut s = c.build_strategy(PrivacyLedger::new(c.budget().unwrap())).unwrap();
        let shape = c.shape().unwrap();
        let mut huge = vec![0.0f32; shape.len()];
        huge[3] = 1e6;
        let delta = applied_delta(&mut *s, shape, vec![(Update::dense(shape, huge).unwrap(), 1.0)]);
        // Clipped to C = 2, divided by the fixed denominator (q·N = the target, 100), no noise.
        assert!((norm(&delta) - 2.0 / 100.0).abs() < 1e-6, "norm {}", norm(&delta));
    }

    #[test]
    fn a_robust_rule_with_central_dp_is_refused_at_start_up() {
        for kind in ["median", "trimmed_mean"] {
            let text = format!("[strategy]\nkind = \"{kind}\"\n[privacy]\nmode = \"central\"\n");
            let e = ServiceConfig::from_toml(&text, env(&[]), Path::new(".")).unwrap_err();
            assert!(matches!(e, ConfigError::Invalid { key: "strategy.kind", .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.contains("central") && msg.contains("mean"), "{msg}");
            // Without DP the robust rule is fine.
            let ok = format!("[strategy]\nkind = \"{kind}\"\n[privacy]\nmode = \"off\"\n");
            assert!(ServiceConfig::from_toml(&ok, env(&[]), Path::new(".")).is_ok());
        }
    }

    #[test]
    fn weighting_defaults_to_auto_with_a_small_cap_and_is_validated() {
        let c = ServiceConfig::from_toml(TEMPLATE, env(&[]), Path::new(".")).unwrap();
        assert_eq!(c.round.weighting, "auto");
        assert_eq!(c.round.max_weight, 100.0);
        let o = c.orchestrator_config().unwrap();
        assert_eq!(o.round.weighting, Weighting::Auto);
        assert_eq!(o.round.max_weight, 100.0);
        for (name, want) in [("equal", Weighting::Equal), ("examples", Weighting::Examples)] {
            let c = ServiceConfig::from_toml(
                TEMPLATE,
                env(&[("STARLING_ROUND_WEIGHTING", name)]),
                Path::new("."),
            )
            .unwrap();
            assert_eq!(c.orchestrator_config().unwrap().round.weighting, want);
        }
        let base = Path::new(".");
        let e = ServiceConfig::from_toml("[round]\nweighting = \"biggest\"\n", env(&[]), base).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { key: "round.weighting", .. }), "{e}");
        for bad in ["0.0", "-5.0", "nan", "inf"] {
            let e = ServiceConfig::from_toml(&format!("[round]\nmax_weight = {bad}\n"), env(&[]), base)
                .unwrap_err();
            assert!(matches!(e, ConfigError::Invalid { key: "round.max_weight", .. }), "{bad}: {e}");
        }
    }
}
