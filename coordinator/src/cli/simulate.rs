//! `starling simulate`: the main job — a simulated fleet end to end.

use crate::sim::attack::{Attack, AttackKind};
use crate::sim::report::RoundRecord;
use crate::sim::{self, DailyWindows, Dataset, NoiseSampler, PrivacyMode, SimConfig, StrategyKind};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use starling_proto::encoding::EncodingKind;
use starling_proto::round::Weighting;
use starling_proto::time::Duration;
use std::path::PathBuf;

/// Named workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// The built-in synthetic population (default).
    Default,
    /// The reference workload of `shared/docs/reference-workload.md` (needs `--data`).
    Reference,
}

/// What the simulated clients are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ClientsArg {
    /// Real SDK devices.
    Sdk,
    /// The bare BPR-MF kernel.
    Kernel,
}

/// How the simulated clients reach the coordinator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// Simulated network, virtual clock.
    InProcess,
    /// The real service over loopback QUIC.
    Quic,
}

/// Strategy names on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StrategyArg {
    /// Example-weighted FedAvg.
    Fedavg,
    /// FedAvg averaging each item row over the clients that touched it.
    FedavgRow,
    /// FedAvg with server momentum.
    Fedavgm,
    /// FedAdam.
    Fedadam,
    /// FedYogi.
    Fedyogi,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise 10% trimmed mean.
    TrimmedMean,
}

/// Update encodings on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EncodingArg {
    /// Every value.
    Dense,
    /// Touched rows only.
    RowSparse,
    /// Touched rows, 8-bit stochastic quantisation.
    Q8,
}

/// Differential-privacy modes on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DpArg {
    /// No differential privacy.
    Off,
    /// User-level DP-FedAvg: clients clip, the coordinator adds calibrated noise and keeps the ledger.
    Central,
    /// Local DP: every client noises its own update and keeps its own ledger.
    Local,
}

/// Weighting policies on the command line (the service's `round.weighting`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WeightingArg {
    /// Equal weights under DP, the reported example count capped at --max-weight otherwise.
    Auto,
    /// Every update weighs 1.
    Equal,
    /// The reported example count, capped at --max-weight.
    Examples,
}

/// Byzantine attacks on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttackArg {
    /// The honest update times --attack-scale.
    Scale,
    /// The honest update times minus --attack-scale.
    SignFlip,
    /// Gaussian noise with the honest update's norm times --attack-scale.
    Random,
}

/// Model families on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModelArg {
    /// Matrix factorisation (BPR).
    Mf,
    /// The context-aware two-tower model.
    TwoTower,
}

/// Synthetic users by default in-process.
pub const DEFAULT_USERS: u64 = 20_000;
/// Synthetic users by default over QUIC (one QUIC client and SDK device per user, in real time).
pub const DEFAULT_QUIC_USERS: u64 = 2_000;

/// Reports per round by default over QUIC.
pub const DEFAULT_QUIC_CLIENTS_PER_ROUND: usize = 100;
/// Rounds by default over QUIC.
pub const DEFAULT_QUIC_ROUNDS: u32 = 50;

/// Noise samplers on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SamplerArg {
    /// rand_distr on the seeded RNG (reproducible).
    Fast,
    /// opendp's exact discrete Gaussian (slow; not reproducible from the seed).
    Opendp,
    /// opendp's discrete Gaussian on a 2^-20 grid.
    OpendpGrid,
}

/// Options of `starling simulate`.
#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Named workload: `default` (synthetic) or `reference` (MovieLens reference workload).
    #[arg(long, value_enum, default_value_t = Workload::Default)]
    pub workload: Workload,
    /// A MovieLens `u.data`-format file; without it, the built-in synthetic population is used.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Synthetic population: users (default 20,000; 2,000 with `--transport quic`, which runs one
    /// QUIC client per user in real time, and there 100 reports per round and 50 rounds unless
    /// given).
    #[arg(long)]
    pub users: Option<u64>,
    /// The model the devices train: `mf` (matrix factorisation) or `two-tower` (context-aware,
    /// trained with burn on each device; SDK clients only).
    #[arg(long, value_enum, default_value_t = ModelArg::Mf)]
    pub model: ModelArg,
    /// Synthetic population: how strongly tastes depend on the context (time of day × device
    /// class); 0 = not at all. Try 2 with `--model two-tower`.
    #[arg(long, default_value_t = 0.0)]
    pub context_effect: f32,
    /// Synthetic population: items.
    #[arg(long, default_value_t = 2000)]
    pub items: u32,
    /// Reports per round (default 500; 100 for the reference workload and over QUIC).
    #[arg(long)]
    pub clients_per_round: Option<usize>,
    /// Rounds.
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Local epochs.
    #[arg(long, default_value_t = 1)]
    pub epochs: u32,
    /// Learning rate of the shared item rows.
    #[arg(long, default_value_t = 1.0)]
    pub item_lr: f32,
    /// Learning rate of the private user vector.
    #[arg(long, default_value_t = 0.2)]
    pub user_lr: f32,
    /// Embedding dimension.
    #[arg(long, default_value_t = 32)]
    pub dim: u32,
    /// Aggregation strategy.
    #[arg(long, value_enum, default_value_t = StrategyArg::Fedavg)]
    pub strategy: StrategyArg,
    /// Update encoding.
    #[arg(long, value_enum, default_value_t = EncodingArg::RowSparse)]
    pub encoding: EncodingArg,
    /// Probability that a selected client drops out mid-round.
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Over-selection factor.
    #[arg(long)]
    pub over_selection: Option<f64>,
    /// Devices: sigma of the log-normal compute speed around the reference device (0 = identical
    /// devices; default 0.5, reference workload 0).
    #[arg(long)]
    pub device_speed_sigma: Option<f32>,
    /// Network: one-way latency in milliseconds (default 50).
    #[arg(long)]
    pub latency_ms: Option<u64>,
    /// Network: extra latency per message, uniform in 0..=jitter, in milliseconds (default 30).
    #[arg(long)]
    pub jitter_ms: Option<u64>,
    /// Network: median uplink in Mbit/s, log-normally spread over clients (0 = unlimited; default 5).
    #[arg(long)]
    pub uplink_mbps: Option<f64>,
    /// Network: median downlink in Mbit/s (0 = unlimited; default 25).
    #[arg(long)]
    pub downlink_mbps: Option<f64>,
    /// Network: sigma of the log-normal bandwidth spread (default 0.8).
    #[arg(long)]
    pub bandwidth_sigma: Option<f64>,
    /// Availability: mean length in hours of each client's daily window (each client's is uniform
    /// in 0.5..1.5 times it; 24 = always available; default 8, reference workload 24).
    #[arg(long)]
    pub window_hours: Option<f64>,
    /// Availability: centre windows around this hour (0..24, sigma 2 h) instead of spreading them
    /// uniformly over the day.
    #[arg(long)]
    pub peak_hour: Option<f64>,
    /// Availability: length of the simulated day in seconds (default 86400).
    #[arg(long)]
    pub day_seconds: Option<u64>,
    /// Probability that an available client checks in for a given round (default 1).
    #[arg(long)]
    pub check_in_probability: Option<f64>,
    /// Simulated seconds between round starts (default 600, reference workload 0).
    #[arg(long)]
    pub round_interval_s: Option<f64>,
    /// Simulated seconds selected clients have to report (default 120).
    #[arg(long)]
    pub report_timeout_s: Option<f64>,
    /// Synthetic data: evaluate on a seeded sample of this many users when there are more.
    #[arg(long, default_value_t = 10_000)]
    pub eval_users: usize,
    /// Run twice — the configured strategy (baseline), then row-aware FedAvg with the same
    /// settings — and print the two side by side (reports under OUT/baseline and OUT/row-aware).
    #[arg(long)]
    pub compare_row_aware: bool,
    /// With --compare-row-aware: the item learning rate of the row-aware run (default: --item-lr).
    #[arg(long)]
    pub row_aware_item_lr: Option<f32>,
    /// Evaluate every this many rounds.
    #[arg(long, default_value_t = 10)]
    pub eval_every: u32,
    /// Seed of everything (the same seed gives the same results).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Worker threads for local training (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// What each simulated client is: `sdk` (a real SDK device with its own store; default for
    /// the synthetic workload) or `kernel` (the bare training math; default for the reference
    /// workload and what the million-client scale run uses).
    #[arg(long, value_enum)]
    pub clients: Option<ClientsArg>,
    /// `in-process` (simulated network and virtual clock; deterministic) or `quic` (the real
    /// coordinator service and one SDK client per user over loopback QUIC, in real time).
    #[arg(long, value_enum, default_value_t = TransportArg::InProcess)]
    pub transport: TransportArg,
    /// Differential privacy: central (DP-FedAvg), local or off. Default: central, except for
    /// `--workload reference`, whose definition has no DP (off).
    #[arg(long, value_enum)]
    pub dp: Option<DpArg>,
    /// The L2 norm every update is clipped to, by the clients and again by the coordinator
    /// (default 5 with central DP — the initial one with --adaptive-clip —, 0.5 with local DP and
    /// 20 without). Under --dp local the coordinator bounds the noised updates by what an honest
    /// one stays under instead (about sigma·2·clip·√d).
    #[arg(long)]
    pub clip: Option<f64>,
    /// Without DP: do not re-clip updates on the coordinator (the service always does; this
    /// measures what the re-clipping buys).
    #[arg(long)]
    pub no_server_clip: bool,
    /// How a client's reported weight becomes its aggregation weight (the service's
    /// `round.weighting`).
    #[arg(long, value_enum, default_value_t = WeightingArg::Auto)]
    pub weighting: WeightingArg,
    /// Cap on one client's aggregation weight under example weighting (`round.max_weight`).
    #[arg(long, default_value_t = starling_proto::round::RoundConfig::default().max_weight)]
    pub max_weight: f32,
    /// Byzantine clients: this fraction of all clients (chosen by the seed) sends crafted updates.
    #[arg(long)]
    pub attackers: Option<f64>,
    /// What the Byzantine clients send.
    #[arg(long, value_enum, default_value_t = AttackArg::Scale)]
    pub attack: AttackArg,
    /// The attack's factor.
    #[arg(long, default_value_t = 100.0)]
    pub attack_scale: f32,
    /// With --attackers: first run the same simulation without attackers (reports under
    /// OUT/baseline), then the attacked one (OUT), and report both HR@10 figures and the drop.
    #[arg(long)]
    pub attack_baseline: bool,
    /// DP: noise multiplier sigma (noise standard deviation over the sensitivity: the clip norm
    /// under central DP, twice the clip norm under local DP).
    #[arg(long, default_value_t = 1.0)]
    pub noise_multiplier: f64,
    /// DP (central): the epsilon budget; the run stops when the next round would exceed it.
    #[arg(long, default_value_t = 8.0)]
    pub epsilon: f64,
    /// DP: delta (well below 1 / clients: rounds are refused when delta x clients > 0.1).
    #[arg(long, default_value_t = 1e-6)]
    pub delta: f64,
    /// Empirical privacy audit: add this many canary clients to the fleet (0 = off; at least 2) and
    /// report an empirical epsilon, at --delta, beside the accountant's (see docs/simulation.md).
    #[arg(long, default_value_t = 0)]
    pub audit_canaries: usize,
    /// DP (central): adapt the clip norm towards this quantile of update norms (e.g. 0.5).
    #[arg(long)]
    pub adaptive_clip: Option<f64>,
    /// Secure aggregation (SecAgg+): the coordinator learns only each round's sum; with --dp
    /// central the devices add the noise (distributed discrete Gaussian) at the same sigma.
    #[arg(long)]
    pub secagg: bool,
    /// Secure aggregation: neighbours per device (k, even).
    #[arg(long, default_value_t = 32)]
    pub secagg_neighbours: u32,
    /// Secure aggregation: shares needed to reconstruct (t of k); 0 = k/2 + 1.
    #[arg(long, default_value_t = 0)]
    pub secagg_threshold: u32,
    /// Secure aggregation: sums mod 2^bits.
    #[arg(long, default_value_t = 32)]
    pub secagg_bits: u32,
    /// Secure aggregation: fraction of a round's cohort that may drop out with the full noise kept.
    #[arg(long, default_value_t = 0.3)]
    pub secagg_dropout_tolerance: f64,
    /// Secure aggregation: largest cohort (sizes the modulus); 0 = twice the expected cohort.
    #[arg(long, default_value_t = 0)]
    pub secagg_max_cohort: usize,
    /// Secure aggregation: randomised Hadamard rotation before quantisation.
    #[arg(long)]
    pub secagg_rotation: bool,
    /// DP (central): the sampler of the coordinator's noise.
    #[arg(long, value_enum, default_value_t = SamplerArg::Fast)]
    pub noise_sampler: SamplerArg,
    /// Directory for `results.json` and `report.html`.
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// Print only the summary.
    #[arg(long)]
    pub quiet: bool,
}

impl SimulateArgs {
    /// The simulation configuration these options describe.
    pub fn to_config(&self) -> anyhow::Result<SimConfig> {
        let dp = self.dp.unwrap_or(match self.workload {
            Workload::Reference => DpArg::Off,
            Workload::Default => DpArg::Central,
        });
        let mut c = match self.workload {
            Workload::Reference => {
                let data = self.data.clone().ok_or_else(|| {
                    anyhow::anyhow!("--workload reference needs --data PATH (MovieLens u.data)")
                })?;
                SimConfig::reference(data, self.clients_per_round.unwrap_or(100), self.rounds.unwrap_or(200))
            }
            Workload::Default => {
                let dataset = match &self.data {
                    Some(p) => Dataset::File(p.clone()),
                    None => {
                        let users = self.users.unwrap_or(match self.transport {
                            TransportArg::InProcess => DEFAULT_USERS,
                            TransportArg::Quic => DEFAULT_QUIC_USERS,
                        });
                        Dataset::Synthetic { users, items: self.items, seed: self.seed }
                    }
                };
                let d = SimConfig::default();
                // Over QUIC every device is a real client in real time: a smaller default job
                // (2,000 users, 100 per round — the same sampling rate under DP as in process —,
                // 50 rounds, about 3 minutes).
                let (per_round, rounds) = match self.transport {
                    TransportArg::InProcess => (d.clients_per_round, d.rounds),
                    TransportArg::Quic => (DEFAULT_QUIC_CLIENTS_PER_ROUND, DEFAULT_QUIC_ROUNDS),
                };
                SimConfig {
                    dataset,
                    clients_per_round: self.clients_per_round.unwrap_or(per_round),
                    rounds: self.rounds.unwrap_or(rounds),
                    ..d
                }
            }
        };
        c.epochs = self.epochs;
        c.item_lr = self.item_lr;
        c.user_lr = self.user_lr;
        c.dim = self.dim;
        c.eval_every = self.eval_every;
        c.seed = self.seed;
        c.strategy = match self.strategy {
            StrategyArg::Fedavg => StrategyKind::FedAvg,
            StrategyArg::FedavgRow => StrategyKind::FedAvgRowAware,
            StrategyArg::Fedavgm => StrategyKind::FedAvgM,
            StrategyArg::Fedadam => StrategyKind::FedAdam,
            StrategyArg::Fedyogi => StrategyKind::FedYogi,
            StrategyArg::Median => StrategyKind::Median,
            StrategyArg::TrimmedMean => StrategyKind::TrimmedMean,
        };
        c.encoding = match self.encoding {
            EncodingArg::Dense => EncodingKind::Dense,
            EncodingArg::RowSparse => EncodingKind::RowSparse,
            EncodingArg::Q8 => EncodingKind::Quantized8,
        };
        if let Some(d) = self.dropout {
            anyhow::ensure!((0.0..=1.0).contains(&d), "--dropout must be in [0, 1]");
            c.dropout = d;
        }
        if let Some(o) = self.over_selection {
            c.over_selection = o;
        }
        if let Some(t) = self.threads {
            c.threads = t.max(1);
        }
        c.transport = match self.transport {
            TransportArg::InProcess => sim::TransportKind::InProcess,
            TransportArg::Quic => sim::TransportKind::Quic,
        };
        if let Some(k) = self.clients {
            c.clients = match k {
                ClientsArg::Sdk => sim::ClientKind::Sdk,
                ClientsArg::Kernel => sim::ClientKind::Kernel,
            };
        }
        let secs = |v: f64, name: &str| {
            Duration::try_from_secs_f64(v)
                .map_err(|_| anyhow::anyhow!("--{name} must be a non-negative number of seconds"))
        };
        if let Some(v) = self.device_speed_sigma {
            anyhow::ensure!(v.is_finite() && v >= 0.0, "--device-speed-sigma must be >= 0");
            c.device_spread = v;
        }
        if let Some(v) = self.latency_ms {
            c.latency = Duration::from_millis(v);
        }
        if let Some(v) = self.jitter_ms {
            c.jitter = Duration::from_millis(v);
        }
        let rate = |mbps: f64, name: &str| {
            anyhow::ensure!(mbps.is_finite() && mbps >= 0.0, "--{name} must be >= 0");
            Ok((mbps > 0.0).then_some(mbps * 1e6 / 8.0))
        };
        if let Some(v) = self.uplink_mbps {
            c.uplink = rate(v, "uplink-mbps")?;
        }
        if let Some(v) = self.downlink_mbps {
            c.downlink = rate(v, "downlink-mbps")?;
        }
        if let Some(v) = self.bandwidth_sigma {
            anyhow::ensure!(v.is_finite() && v >= 0.0, "--bandwidth-sigma must be >= 0");
            c.bandwidth_spread = v;
        }
        if self.window_hours.is_some() || self.peak_hour.is_some() || self.day_seconds.is_some() {
            let base = c.availability.clone().unwrap_or(DailyWindows {
                day: Duration::from_secs(86_400),
                hours: 24.0,
                peak_hour: None,
            });
            let hours = self.window_hours.unwrap_or(base.hours);
            anyhow::ensure!(hours.is_finite() && hours > 0.0, "--window-hours must be positive");
            if let Some(p) = self.peak_hour {
                anyhow::ensure!((0.0..24.0).contains(&p), "--peak-hour must be in [0, 24)");
            }
            let day = self.day_seconds.map_or(base.day, Duration::from_secs);
            anyhow::ensure!(!day.is_zero(), "--day-seconds must be positive");
            c.availability = (hours < 24.0).then_some(DailyWindows {
                day,
                hours,
                peak_hour: self.peak_hour.or(base.peak_hour),
            });
        }
        if let Some(p) = self.check_in_probability {
            anyhow::ensure!((0.0..=1.0).contains(&p), "--check-in-probability must be in [0, 1]");
            c.check_in_probability = p;
        }
        if let Some(v) = self.round_interval_s {
            c.round_interval = secs(v, "round-interval-s")?;
        }
        if let Some(v) = self.report_timeout_s {
            c.report_timeout = secs(v, "report-timeout-s")?;
        }
        c.eval_users = self.eval_users.max(1);
        c.model = match self.model {
            ModelArg::Mf => sim::ModelKind::Mf,
            ModelArg::TwoTower => sim::ModelKind::TwoTower,
        };
        anyhow::ensure!(
            self.context_effect.is_finite() && self.context_effect >= 0.0,
            "--context-effect must be >= 0"
        );
        c.context_effect = self.context_effect;
        let clip = self.clip.unwrap_or(match dp {
            DpArg::Off => sim::CLIP_WITHOUT_DP,
            DpArg::Central => sim::CLIP_CENTRAL_DP,
            DpArg::Local => 0.5,
        });
        anyhow::ensure!(clip.is_finite() && clip > 0.0, "--clip must be positive");
        c.clip_norm = if dp == DpArg::Off { clip } else { sim::CLIP_WITHOUT_DP };
        c.server_clipping = !self.no_server_clip;
        anyhow::ensure!(
            dp == DpArg::Off || !self.no_server_clip,
            "--no-server-clip applies without DP only (DP always clips)"
        );
        c.weighting = match self.weighting {
            WeightingArg::Auto => Weighting::Auto,
            WeightingArg::Equal => Weighting::Equal,
            WeightingArg::Examples => Weighting::Examples,
        };
        anyhow::ensure!(
            self.max_weight.is_finite() && self.max_weight > 0.0,
            "--max-weight must be positive"
        );
        c.max_weight = self.max_weight;
        c.attack = self
            .attackers
            .map(|fraction| {
                let attack = Attack {
                    fraction,
                    kind: match self.attack {
                        AttackArg::Scale => AttackKind::Scale,
                        AttackArg::SignFlip => AttackKind::SignFlip,
                        AttackArg::Random => AttackKind::Random,
                    },
                    factor: self.attack_scale,
                };
                attack.validate().map_err(|e| anyhow::anyhow!("--attackers/--attack-scale: {e}"))?;
                Ok::<_, anyhow::Error>(attack)
            })
            .transpose()?;
        anyhow::ensure!(!self.attack_baseline || c.attack.is_some(), "--attack-baseline needs --attackers");
        anyhow::ensure!(
            !(self.attack_baseline && self.compare_row_aware),
            "--attack-baseline and --compare-row-aware cannot be combined"
        );
        if self.secagg {
            let k = self.secagg_neighbours;
            let expected = (c.clients_per_round as f64 * c.over_selection).ceil() as usize;
            c.secure = Some(starling_proto::round::SecureAggregation {
                neighbours: k,
                threshold: if self.secagg_threshold == 0 { k / 2 + 1 } else { self.secagg_threshold },
                bits: self.secagg_bits,
                dropout_tolerance: self.secagg_dropout_tolerance,
                max_cohort: if self.secagg_max_cohort == 0 {
                    (2 * expected).max(16)
                } else {
                    self.secagg_max_cohort
                },
                rotation: self.secagg_rotation,
                phase_timeout: Duration::from_secs(30),
                clip_norm: clip as f32,
            });
        }
        c.audit = (self.audit_canaries > 0)
            .then_some(sim::audit::AuditConfig { canaries: self.audit_canaries, delta: self.delta });
        c.privacy = match dp {
            DpArg::Off => PrivacyMode::Off,
            DpArg::Central => PrivacyMode::Central {
                clip,
                noise_multiplier: self.noise_multiplier,
                epsilon: self.epsilon,
                delta: self.delta,
                adaptive_quantile: self.adaptive_clip,
                sampler: match self.noise_sampler {
                    SamplerArg::Fast => NoiseSampler::Fast,
                    SamplerArg::Opendp => NoiseSampler::OpenDpExact,
                    SamplerArg::OpendpGrid => NoiseSampler::OpenDpGrid,
                },
            },
            DpArg::Local => {
                PrivacyMode::Local { clip, noise_multiplier: self.noise_multiplier, delta: self.delta }
            }
        };
        Ok(c)
    }
}

fn fmt_opt(v: Option<f64>, width: usize) -> String {
    v.map(|v| format!("{v:>width$.4}")).unwrap_or_else(|| format!("{:>width$}", "-"))
}

fn line(r: &RoundRecord) -> String {
    format!(
        "round {:>4}  participants {:>5}  dropouts {:>4}  late {:>4}  HR@10 {}  NDCG@10 {}  eps {}  up {:>9} B  down {:>11} B  {:>8.4} s{}",
        r.round,
        r.participants,
        r.dropouts,
        r.stragglers,
        fmt_opt(r.hr_at_10, 6),
        fmt_opt(r.ndcg_at_10, 6),
        fmt_opt(r.epsilon, 6),
        r.bytes_up,
        r.bytes_down,
        r.round_seconds,
        r.failure.as_ref().map(|f| format!("  FAILED: {f}")).unwrap_or_default()
    )
}

/// Runs one configuration with a progress bar and per-round lines, writes its reports into `out`
/// and prints its summary.
fn run_one(config: &SimConfig, out: &std::path::Path, quiet: bool) -> anyhow::Result<sim::report::SimReport> {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(u64::from(config.rounds)).with_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} rounds  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        )
    };
    let mut progress = |r: &RoundRecord, _rounds: u32| {
        if !quiet {
            bar.suspend(|| println!("{}", line(r)));
        }
        if let Some(h) = r.hr_at_10 {
            bar.set_message(format!("HR@10 {h:.4}"));
        }
        bar.inc(1);
    };
    let report = sim::run(config, &mut progress)?;
    bar.finish_and_clear();
    report.write(out)?;
    if let Some(why) = &report.stopped {
        println!("stopped early: {why}");
    }
    let last = report.rounds.iter().rev().find(|r| r.hr_at_10.is_some());
    println!(
        "initial HR@10 {:.4} NDCG@10 {:.4}; popularity HR@10 {:.4}",
        report.initial_hr_at_10.unwrap_or(0.0),
        report.initial_ndcg_at_10.unwrap_or(0.0),
        report.popularity_hr_at_10.unwrap_or(0.0)
    );
    if let Some(l) = last {
        println!(
            "final (round {}) HR@10 {:.4} NDCG@10 {:.4}{}",
            l.round,
            l.hr_at_10.unwrap_or(0.0),
            l.ndcg_at_10.unwrap_or(0.0),
            l.full_hr_at_10.map(|f| format!(" full-ranking HR@10 {f:.4}")).unwrap_or_default()
        );
    }
    println!(
        "median seconds per round {:.4} (training rounds only, evaluation excluded; local training alone {:.4}); total {:.1} s; peak RSS {}",
        report.median_round_seconds,
        report.median_train_seconds,
        report.total_seconds,
        report
            .peak_rss_bytes
            .map(|b| format!("{:.1} MiB", b as f64 / 1048576.0))
            .unwrap_or_else(|| "n/a".into())
    );
    if let Some(a) = &report.attack {
        println!("{}", a.summary());
    }
    if let Some(a) = &report.audit {
        println!("{}", a.summary());
    }
    println!("wrote {} and {}", out.join("results.json").display(), out.join("report.html").display());
    Ok(report)
}

/// The final HR@10 of a run (the last evaluated round).
fn final_hr(report: &sim::report::SimReport) -> Option<f64> {
    report.rounds.iter().rev().find_map(|r| r.hr_at_10)
}

/// `--attack-baseline`: the run without attackers into OUT/baseline, then the attacked run into
/// OUT, whose reports carry both HR@10 figures and the drop.
fn run_attack_with_baseline(config: &SimConfig, args: &SimulateArgs) -> anyhow::Result<()> {
    let baseline = SimConfig { attack: None, ..config.clone() };
    println!("== baseline: the same simulation without attackers ==");
    let base = run_one(&baseline, &args.out.join("baseline"), args.quiet)?;
    println!("== with attackers ==");
    let mut attacked = run_one(config, &args.out, args.quiet)?;
    if let Some(a) = &mut attacked.attack {
        a.set_baseline(final_hr(&base));
    }
    attacked.write(&args.out)?;
    if let Some(a) = &attacked.attack {
        println!(
            "HR@10 without attackers {}, with attackers {}: drop {}",
            fmt_opt(a.baseline_hr_at_10, 0),
            fmt_opt(a.hr_at_10, 0),
            fmt_opt(a.hr_at_10_drop, 0)
        );
    }
    Ok(())
}

/// Runs `starling simulate`.
pub fn run(args: &SimulateArgs) -> anyhow::Result<()> {
    let config = args.to_config()?;
    if args.attack_baseline {
        return run_attack_with_baseline(&config, args);
    }
    if !args.compare_row_aware {
        run_one(&config, &args.out, args.quiet)?;
        return Ok(());
    }
    println!("== baseline: {:?}, item lr {} ==", config.strategy, config.item_lr);
    let base = run_one(&config, &args.out.join("baseline"), args.quiet)?;
    let row = SimConfig {
        strategy: StrategyKind::FedAvgRowAware,
        item_lr: args.row_aware_item_lr.unwrap_or(config.item_lr),
        ..config.clone()
    };
    println!(
        "== row-aware FedAvg (each item row averaged over the clients that touched it), item lr {} ==",
        row.item_lr
    );
    let row_report = run_one(&row, &args.out.join("row-aware"), args.quiet)?;
    println!("\nround   baseline HR@10 NDCG@10   row-aware HR@10 NDCG@10");
    for (a, b) in base.rounds.iter().zip(&row_report.rounds) {
        if let (Some(ha), Some(hb)) = (a.hr_at_10, b.hr_at_10) {
            println!(
                "{:>5}   {:>14.4} {:>7.4}   {:>15.4} {:>7.4}",
                a.round,
                ha,
                a.ndcg_at_10.unwrap_or(0.0),
                hb,
                b.ndcg_at_10.unwrap_or(0.0)
            );
        }
    }
    println!(
        "median seconds per round: baseline {:.4}, row-aware {:.4}",
        base.median_round_seconds, row_report.median_round_seconds
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimulateArgs,
    }

    fn users(argv: &[&str]) -> u64 {
        let config = Cli::parse_from(argv).args.to_config().unwrap();
        match config.dataset {
            Dataset::Synthetic { users, .. } => users,
            Dataset::File(_) => panic!("synthetic by default"),
        }
    }

    #[test]
    fn the_default_quic_job_fits_the_quic_client_limit() {
        assert_eq!(users(&["simulate"]), DEFAULT_USERS);
        let quic = users(&["simulate", "--transport", "quic"]);
        assert!(quic as usize <= sim::quic::MAX_QUIC_USERS, "{quic} users over QUIC");
        assert_eq!(users(&["simulate", "--transport", "quic", "--users", "300"]), 300);
        let c = Cli::parse_from(["simulate", "--model", "two-tower", "--context-effect", "2"])
            .args
            .to_config()
            .unwrap();
        assert_eq!((c.model, c.context_effect), (sim::ModelKind::TwoTower, 2.0));
        assert!(Cli::parse_from(["simulate", "--context-effect=-1"]).args.to_config().is_err());
    }
}
