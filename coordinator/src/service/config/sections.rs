//! The sections of `starling.toml`, with their defaults.

use serde::{Deserialize, Serialize};
use starling_proto::round::{RoundConfig, Weighting};
use std::net::SocketAddr;
use std::path::PathBuf;

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
    /// Serve the admin endpoint over TLS 1.3 with `cert` and `key` (the QUIC endpoint's).
    pub admin_tls: bool,
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
            admin_tls: false,
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
    /// Family name clients must announce. The known families `bpr-mf` and `two-tower` get their
    /// own shape and initialisation (`starling_models::family::ModelDef`); any other name gets a
    /// generic `rows × row_len` matrix.
    pub family: String,
    /// For the known families: items in the catalogue (two-tower adds its dense rows after them).
    /// Otherwise: rows of the global parameters.
    pub rows: u32,
    /// For the known families: the embedding dimension. Otherwise: values per row.
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

/// `[secure_aggregation]`: SecAgg+ (Bell et al. 2020) with distributed DP. When enabled the
/// coordinator never sees a device's update, only the modular sum of a round's surviving devices;
/// under `privacy.mode = "central"` the noise is added by the devices (distributed discrete
/// Gaussian) instead of the coordinator, at the same σ and charged to the same ledger.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecureAggregationSection {
    /// On or off (default off).
    pub enabled: bool,
    /// k: neighbours each device exchanges keys and shares with (even).
    pub neighbours: u32,
    /// t: shares that reconstruct a device's secrets (of k); 0 = k/2 + 1, the smallest secure value.
    pub threshold: u32,
    /// b: sums are computed mod 2^b (1..=32).
    pub bits: u32,
    /// ρ: fraction of a round's cohort that may drop out with the sum still carrying the full
    /// noise; rounds with fewer survivors abort (nothing revealed, nothing charged).
    pub dropout_tolerance: f64,
    /// Largest cohort of one round (the modulus is sized so that this many updates never overflow).
    pub max_cohort: usize,
    /// Randomised Hadamard rotation before quantisation.
    pub rotation: bool,
    /// Deadline of each protocol phase except the masked input (which has `round.report_timeout_ms`).
    pub phase_timeout_ms: u64,
}

impl Default for SecureAggregationSection {
    fn default() -> Self {
        Self {
            enabled: false,
            neighbours: 32,
            threshold: 0,
            bits: 32,
            dropout_tolerance: 0.3,
            max_cohort: 10_000,
            rotation: false,
            phase_timeout_ms: 30_000,
        }
    }
}

/// `[evaluation]`: federated evaluation rounds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvaluationSection {
    /// Run an evaluation round after every this many committed training rounds; 0 = off. Unset:
    /// [`DEFAULT_EVALUATION_EVERY`], or off under secure aggregation and local DP (where
    /// federated evaluation is not supported; setting it there is refused).
    pub every_rounds: Option<u64>,
    /// Reports an evaluation round aims for; 0 = `round.target_participants`.
    pub target_participants: usize,
}

/// `evaluation.every_rounds` when the file does not set it.
pub const DEFAULT_EVALUATION_EVERY: u64 = 5;

/// `[storage]`: the coordinator's database — a SQLite file, or PostgreSQL when `postgres` is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    /// The SQLite file (created if missing). Not used when `postgres` is set.
    pub path: PathBuf,
    /// Checkpoints kept (older model versions are pruned; the ledger is never pruned).
    pub keep_checkpoints: u32,
    /// PostgreSQL instead of SQLite: a libpq-style connection string, e.g.
    /// `host=10.0.0.5 port=5432 user=starling dbname=starling` (no TLS: a private network or a
    /// local socket). Put the password in `postgres_password_file`, not here.
    pub postgres: Option<String>,
    /// A file holding the PostgreSQL password (read at start-up, trimmed, never logged).
    pub postgres_password_file: Option<PathBuf>,
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            path: "data/coordinator.db".into(),
            keep_checkpoints: 8,
            postgres: None,
            postgres_password_file: None,
        }
    }
}

/// `[cluster]`: several `starling serve` nodes sharing one PostgreSQL store (`[storage]
/// postgres`). Every node serves clients; one, the leader, runs the schedule and commits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// Run as a node of a cluster (needs `storage.postgres`).
    pub enabled: bool,
    /// This node's name, unique in the cluster (default: the host name and the QUIC port).
    pub node: String,
    /// The population the nodes serve together (one lease, one schedule).
    pub population: String,
    /// The QUIC address clients reach this node at, published for discovery (default: the
    /// bound address).
    pub advertise: String,
    /// Lease duration, on the database's clock.
    pub lease_ttl_ms: u64,
    /// How much earlier than the database a leader gives its lease up.
    pub lease_margin_ms: u64,
    /// Heartbeat interval (a node is live while its heartbeat is younger than three of these).
    pub heartbeat_ms: u64,
    /// How often a node looks at the database (leadership, rounds, shares).
    pub tick_ms: u64,
    /// How long the leader waits for shares beyond the selection and report timeouts.
    pub share_grace_ms: u64,
    /// Every database call of the node task is given up after this.
    pub db_timeout_ms: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            enabled: false,
            node: String::new(),
            population: "default".into(),
            advertise: String::new(),
            lease_ttl_ms: 3_000,
            lease_margin_ms: 1_000,
            heartbeat_ms: 1_000,
            tick_ms: 200,
            share_grace_ms: 2_000,
            db_timeout_ms: 2_000,
        }
    }
}
