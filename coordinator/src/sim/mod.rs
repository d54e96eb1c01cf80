//! The fleet simulator: the real round engine and session machines, real BPR-MF training on every
//! simulated client, and a simulated network and clock (`starling_proto::harness::Fleet`).
//!
//! A run: load or generate the data, split it leave-one-out (the held-out item of each user is
//! never trained on), give every user a client with its own private vector, then run rounds. Every
//! `eval_every` rounds each client scores its held-out item against the 99 sampled negatives of the
//! reference protocol with its own private vector and the current global model.

pub mod attack;
pub mod audit;
pub mod quality;
pub mod quic;
pub mod report;
pub mod sdk_trainer;
pub mod trainer;

use crate::privacy::{DurableLedger, OpenDpGaussian};
use crate::store::Store;
use attack::{Attack, Byzantine};
use audit::{AuditConfig, Canaries, CanarySet};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use report::{AttackReport, FederatedRecord, RoundRecord, SimReport};
use sdk_trainer::{SdkFleetTrainer, SimTrainer};
use starling_models::data::synthetic::{Population, SyntheticConfig};
use starling_models::data::{LeaveOneOut, movielens};
use starling_models::eval::{EvalSet, full_ranking_hr_at_10};
use starling_models::family::ModelDef;
use starling_models::mf;
use starling_proto::dp::local::honest_norm_bound;
use starling_proto::dp::strategy::{AdaptiveClipping, DpConfig, DpFedAvg};
use starling_proto::dp::{
    AccountantKind, Budget, ClipNorm, Delta, Epsilon, LedgerEntry, Mechanism, NoiseMultiplier, Quantile,
    SamplingRate,
};
use starling_proto::encoding::EncodingKind;
use starling_proto::harness::{Availability, Fleet, FleetConfig, PerClient};
use starling_proto::ids::{ModelVersion, RoundId};
use starling_proto::message::NoiseSettings;
use starling_proto::message::{DeviceConditions, TrainingPlan};
use starling_proto::round::{
    Eligibility, Orchestrator, OrchestratorConfig, RoundConfig, RoundEvent, SecureAggregation, StartError,
    Weighting,
};
use starling_proto::session::SessionOutcome;
use starling_proto::strategy::{Federated, NormBound, PrivacyCharge, Strategy};
use starling_proto::time::Duration;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant as WallClock;
use trainer::ClientData;
use trainer::{DeviceModel, MfFleetTrainer};

/// Where the data comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Dataset {
    /// The built-in synthetic population.
    Synthetic {
        /// Users.
        users: u64,
        /// Items.
        items: u32,
        /// Seed of the population.
        seed: u64,
    },
    /// A MovieLens `u.data`-format file.
    File(PathBuf),
}

/// The aggregation strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrategyKind {
    /// Example-weighted FedAvg (the reference baseline).
    FedAvg,
    /// FedAvg averaging each item row over the clients that touched it.
    FedAvgRowAware,
    /// FedAvg with server momentum 0.9.
    FedAvgM,
    /// FedAdam.
    FedAdam,
    /// FedYogi.
    FedYogi,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean (10%).
    TrimmedMean,
}

impl StrategyKind {
    fn build(self) -> Box<dyn Strategy> {
        Box::new(match self {
            StrategyKind::FedAvg => Federated::fedavg(),
            StrategyKind::FedAvgRowAware => Federated::fedavg_row_aware(),
            StrategyKind::FedAvgM => Federated::fedavgm(1.0, 0.9),
            StrategyKind::FedAdam => Federated::fedadam(0.01),
            StrategyKind::FedYogi => Federated::fedyogi(0.01),
            StrategyKind::Median => Federated::median(),
            StrategyKind::TrimmedMean => Federated::trimmed_mean(0.1),
        })
    }
}

/// Which Gaussian sampler adds the coordinator's noise (see `starling_proto::dp::noise`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoiseSampler {
    /// rand_distr on the run's seeded RNG: fast and reproducible.
    Fast,
    /// opendp's exact discrete Gaussian (about 25 k values/s; not reproducible from the seed).
    OpenDpExact,
    /// opendp's discrete Gaussian on a 2⁻²⁰ grid (about 240 k values/s; not reproducible).
    OpenDpGrid,
}

/// Differential privacy in a simulation.
#[derive(Clone, Debug, PartialEq)]
pub enum PrivacyMode {
    /// No DP: nothing is noised; updates are clipped to [`SimConfig::clip_norm`] by the clients and
    /// again by the coordinator (as the service does with `privacy.mode = "off"`).
    Off,
    /// User-level DP-FedAvg: clients clip, the coordinator clips again, sums, adds noise and
    /// charges every round to the ledger; rounds beyond the budget are refused and the run stops.
    Central {
        /// Clip norm C (the initial one under adaptive clipping).
        clip: f64,
        /// Noise multiplier σ.
        noise_multiplier: f64,
        /// ε budget.
        epsilon: f64,
        /// δ.
        delta: f64,
        /// Adaptive clipping towards this quantile of update norms, if set.
        adaptive_quantile: Option<f64>,
        /// The sampler of the coordinator's noise.
        sampler: NoiseSampler,
    },
    /// Local DP: every client clips and noises its own (dense) update and keeps its own ledger.
    Local {
        /// Clip norm C.
        clip: f64,
        /// Noise multiplier σ.
        noise_multiplier: f64,
        /// δ at which each device's ε is reported.
        delta: f64,
    },
}

/// Everything a simulation run needs.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// The data.
    pub dataset: Dataset,
    /// Reports per round (the round's target).
    pub clients_per_round: usize,
    /// Rounds to run.
    pub rounds: u32,
    /// Embedding dimension.
    pub dim: u32,
    /// Local epochs.
    pub epochs: u32,
    /// Learning rate of the item rows.
    pub item_lr: f32,
    /// Learning rate of the private user vector.
    pub user_lr: f32,
    /// Mini-batch size.
    pub batch_size: u32,
    /// Standard deviation of the initial parameters.
    pub init_std: f32,
    /// Aggregation strategy.
    pub strategy: StrategyKind,
    /// Update encoding on the wire.
    pub encoding: EncodingKind,
    /// Over-selection factor (1.0 selects exactly `clients_per_round`).
    pub over_selection: f64,
    /// Probability that a selected client drops out mid-round.
    pub dropout: f64,
    /// Spread (σ of the log) of the clients' compute speed (log-normal, median 1 = the reference
    /// device); 0 = identical devices.
    pub device_spread: f32,
    /// One-way network latency before jitter.
    pub latency: Duration,
    /// Extra latency per message, uniform in `0..=jitter`.
    pub jitter: Duration,
    /// Median uplink rate in bytes per second (`None`: unlimited).
    pub uplink: Option<f64>,
    /// Median downlink rate in bytes per second (`None`: unlimited).
    pub downlink: Option<f64>,
    /// Spread (σ of the log) of the clients' bandwidths around the medians.
    pub bandwidth_spread: f64,
    /// Daily availability windows (`None`: every client always reachable).
    pub availability: Option<DailyWindows>,
    /// Probability that an available client checks in for a given round.
    pub check_in_probability: f64,
    /// Rounds start at least this far apart in simulated time.
    pub round_interval: Duration,
    /// Report deadline (simulated).
    pub report_timeout: Duration,
    /// Evaluate every this many rounds (and after the last).
    pub eval_every: u32,
    /// Synthetic data: evaluate on a seeded sample of this many users when the population is larger.
    pub eval_users: usize,
    /// The model family the devices train.
    pub model: ModelKind,
    /// Synthetic data: how strongly tastes depend on the context (time of day × device class);
    /// 0 = not at all (see `SyntheticConfig::context_effect`).
    pub context_effect: f32,
    /// Seed of everything.
    pub seed: u64,
    /// Worker threads for local training.
    pub threads: usize,
    /// Differential privacy.
    pub privacy: PrivacyMode,
    /// Without DP: the plan's clip norm, which the coordinator re-clips every update to (the
    /// service's `privacy.clip_norm` with `privacy.mode = "off"`). The DP modes use their own.
    pub clip_norm: f64,
    /// Without DP: whether the coordinator re-clips (the service always does; turning it off is
    /// only for measuring what the re-clipping buys, e.g. against Byzantine clients).
    pub server_clipping: bool,
    /// How a client's reported weight becomes its aggregation weight (the service's
    /// `round.weighting`).
    pub weighting: Weighting,
    /// Cap on one client's aggregation weight under example weighting (`round.max_weight`).
    pub max_weight: f32,
    /// Byzantine clients, if any.
    pub attack: Option<Attack>,
    /// Empirical privacy audit: canary clients added to the fleet ([`audit`]), if any.
    pub audit: Option<AuditConfig>,
    /// What the simulated clients are: real SDK devices, or the bare training kernel.
    pub clients: ClientKind,
    /// In-process (simulated network and clock) or the real service over loopback QUIC.
    pub transport: TransportKind,
    /// Secure aggregation (SecAgg+ with distributed DP under central DP): the coordinator learns
    /// only each round's sum. The clip norm is taken from the privacy mode.
    pub secure: Option<SecureAggregation>,
}

/// How the clients reach the coordinator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// The round engine in-process, a simulated network and a virtual clock (deterministic).
    InProcess,
    /// The real coordinator service and the SDK's QUIC transport over loopback, in real time
    /// ([`quic`]).
    Quic,
}

/// The default clip norm of the plan, and of the coordinator's re-clipping, when DP is off
/// ([`SimConfig::clip_norm`]): about the 90th percentile of honest update norms at the
/// simulator's item learning rate of 1.0 (measured on ML-100K and the synthetic populations:
/// median 3–7, 90th percentile 8–21), so it rarely binds on an honest client and bounds a
/// Byzantine one to a few honest updates' worth (see `docs/simulation.md`).
pub const CLIP_WITHOUT_DP: f64 = 20.0;

/// The default clip norm under central DP: about the median honest update norm at the item
/// learning rate of 1.0 (3–7, see [`CLIP_WITHOUT_DP`]). Once most updates are clipped, a larger C
/// scales signal and noise alike but takes larger steps; well above the median it adds noise
/// for nothing. Measured on the main job (σ = 1, 500 per round, 200 rounds): HR@10 0.114 at
/// C = 0.5, 0.182 at 2, 0.239 at 5, 0.211 at 10, 0.147 at 20.
pub const CLIP_CENTRAL_DP: f64 = 5.0;

/// What each simulated client is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientKind {
    /// A real `starling_sdk::Device` per client: its own SQLite store (in memory) with its events,
    /// consent and ledger, trained through the SDK's own code. The default.
    Sdk,
    /// The BPR-MF kernel with one private vector per client and no per-client database: the
    /// same math, for the reference workload's timing and million-client scale runs.
    Kernel,
}

/// Daily availability: every client is reachable only inside its own window of the simulated day.
#[derive(Clone, Debug, PartialEq)]
pub struct DailyWindows {
    /// Length of the simulated day.
    pub day: Duration,
    /// Mean window length in hours of a 24-hour day; each client's length is uniform in
    /// `0.5..1.5` times it (24 or more: always available).
    pub hours: f64,
    /// Hour (0..24) around which windows are centred (normal, σ = 2 h): a fleet in one time zone
    /// that trains overnight. `None`: window starts spread uniformly over the day (a global fleet).
    pub peak_hour: Option<f64>,
}

impl DailyWindows {
    fn to_availability(&self) -> Availability {
        let h = (self.hours / 24.0).max(0.0);
        Availability {
            day: self.day,
            start: match self.peak_hour {
                Some(peak) => PerClient::Normal { mean: (peak - self.hours / 2.0) / 24.0, sd: 2.0 / 24.0 },
                None => PerClient::Uniform { low: 0.0, high: 1.0 },
            },
            length: if h >= 1.0 {
                PerClient::Fixed(1.0)
            } else {
                PerClient::Uniform { low: 0.5 * h, high: 1.5 * h }
            },
        }
    }
}

impl Default for SimConfig {
    /// The main job's defaults: a synthetic population, about a minute on 2 cores.
    fn default() -> Self {
        Self {
            dataset: Dataset::Synthetic { users: 20_000, items: 2000, seed: 1 },
            clients_per_round: 500,
            rounds: 200,
            dim: 32,
            epochs: 1,
            item_lr: 1.0,
            user_lr: 0.2,
            batch_size: 32,
            init_std: 0.1,
            strategy: StrategyKind::FedAvg,
            encoding: EncodingKind::RowSparse,
            over_selection: 1.3,
            dropout: 0.05,
            device_spread: 0.5,
            latency: Duration::from_millis(50),
            jitter: Duration::from_millis(30),
            // 5 Mbit/s up, 25 Mbit/s down (medians), spread log-normally.
            uplink: Some(625_000.0),
            downlink: Some(3_125_000.0),
            bandwidth_spread: 0.8,
            availability: Some(DailyWindows {
                day: Duration::from_secs(86_400),
                hours: 8.0,
                peak_hour: None,
            }),
            check_in_probability: 1.0,
            round_interval: Duration::from_secs(600),
            report_timeout: Duration::from_secs(120),
            eval_every: 10,
            eval_users: 10_000,
            model: ModelKind::Mf,
            context_effect: 0.0,
            seed: 42,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            // Privacy on by default, as `starling simulate` runs it: q = 500 / 20,000 per round.
            privacy: PrivacyMode::Central {
                clip: CLIP_CENTRAL_DP,
                noise_multiplier: 1.0,
                epsilon: 8.0,
                delta: 1e-6,
                adaptive_quantile: None,
                sampler: NoiseSampler::Fast,
            },
            clip_norm: CLIP_WITHOUT_DP,
            server_clipping: true,
            weighting: RoundConfig::default().weighting,
            max_weight: RoundConfig::default().max_weight,
            attack: None,
            audit: None,
            clients: ClientKind::Sdk,
            transport: TransportKind::InProcess,
            secure: None,
        }
    }
}

impl SimConfig {
    /// The reference workload of `shared/docs/reference-workload.md` on `data`, with `c` clients per
    /// round and `rounds` rounds: dim 32, lr 0.2 (user) / 1.0 (items), batch 32, E = 1, FedAvg
    /// weighted by examples, uniform selection of exactly `c` clients among all of them every
    /// round, no dropouts, identical devices, an unlimited always-available network.
    pub fn reference(data: PathBuf, c: usize, rounds: u32) -> Self {
        Self {
            dataset: Dataset::File(data),
            clients_per_round: c,
            rounds,
            over_selection: 1.0,
            dropout: 0.0,
            device_spread: 0.0,
            uplink: None,
            downlink: None,
            availability: None,
            check_in_probability: 1.0,
            round_interval: Duration::ZERO,
            clients: ClientKind::Kernel,
            privacy: PrivacyMode::Off,
            ..Self::default()
        }
    }

    /// The simulated network and devices.
    pub fn fleet_config(&self) -> FleetConfig {
        let link = |median: Option<f64>| {
            median.map(|median| PerClient::LogNormal { median, sigma: self.bandwidth_spread })
        };
        FleetConfig {
            latency: self.latency,
            jitter: self.jitter,
            uplink: link(self.uplink),
            downlink: link(self.downlink),
            compute_speed: if self.device_spread > 0.0 {
                PerClient::LogNormal { median: 1.0, sigma: f64::from(self.device_spread) }
            } else {
                PerClient::Fixed(1.0)
            },
            availability: self.availability.as_ref().map(DailyWindows::to_availability),
            check_in_probability: self.check_in_probability,
            dropout: self.dropout,
            check_in_spread: Duration::from_secs(5),
            round_interval: self.round_interval,
            conditions: DeviceConditions { charging: true, unmetered: true, idle: true, battery_percent: 80 },
            seed: self.seed,
            model_family: starling_models::family::MF_NAME.into(),
            cache_models: false,
            ..FleetConfig::default()
        }
    }
}

/// The model family the simulated devices train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// Matrix factorisation (BPR).
    Mf,
    /// The context-aware two-tower model (SDK clients only).
    TwoTower,
}

impl ModelKind {
    /// The model definition over `items` items of dimension `dim`.
    pub fn def(self, items: u32, dim: u32) -> ModelDef {
        match self {
            ModelKind::Mf => ModelDef::mf(items, dim),
            ModelKind::TwoTower => ModelDef::two_tower(items, dim),
        }
    }
}

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The data could not be loaded.
    #[error(transparent)]
    Load(#[from] movielens::LoadError),
    /// The synthetic population settings are invalid.
    #[error(transparent)]
    Synthetic(#[from] starling_models::data::synthetic::SyntheticError),
    /// The evaluation set could not be built.
    #[error(transparent)]
    Eval(#[from] starling_models::eval::EvalError),
    /// A setting is invalid.
    #[error("invalid simulation setting: {0}")]
    Config(String),
    /// The round engine refused its configuration.
    #[error(transparent)]
    Engine(#[from] starling_proto::round::ConfigError),
    /// A round could not start.
    #[error(transparent)]
    Start(#[from] starling_proto::round::StartError),
    /// The differential-privacy settings are invalid.
    #[error(transparent)]
    Privacy(#[from] starling_proto::dp::strategy::DpConfigError),
    /// The privacy ledger failed.
    #[error(transparent)]
    Ledger(#[from] crate::privacy::LedgerError),
    /// The network or device model is invalid.
    #[error(transparent)]
    Fleet(#[from] starling_proto::harness::FleetConfigError),
}

/// The data of a run, prepared: the clients' data (lazy for synthetic populations) and the
/// evaluation users' split.
struct Prepared {
    n_users: usize,
    n_items: u32,
    data: ClientData,
    /// The evaluation cases, with real user ids.
    eval: EvalSet,
    /// The evaluation users' split, indexed by position in `eval_ids`.
    eval_split: LeaveOneOut,
    eval_ids: Vec<u32>,
    full_ranking: bool,
    /// SDK clients: the evaluation users' cases as their devices see them (device protocol).
    cases: Vec<quality::DeviceCase>,
}

fn prepare(config: &SimConfig) -> Result<Prepared, SimError> {
    let mut prepared = prepare_data(config)?;
    if config.clients == ClientKind::Sdk {
        prepared.cases = quality::device_cases(&prepared.data, &prepared.eval_ids, config.threads);
    }
    Ok(prepared)
}

fn prepare_data(config: &SimConfig) -> Result<Prepared, SimError> {
    match &config.dataset {
        Dataset::File(path) => {
            let r = movielens::load(path)?;
            let split = LeaveOneOut::split(&r.interactions, r.n_users, r.n_items);
            let eval = EvalSet::build(&split)?;
            let mut all: Vec<Vec<(u32, i64)>> = vec![Vec::new(); r.n_users as usize];
            for x in &r.interactions {
                all[x.user as usize].push((x.item, x.timestamp));
            }
            Ok(Prepared {
                n_users: r.n_users as usize,
                n_items: r.n_items,
                data: ClientData::Table { train: Arc::new(split.train.clone()), all: Arc::new(all) },
                eval,
                eval_ids: (0..r.n_users).collect(),
                eval_split: split,
                full_ranking: false,
                cases: Vec::new(),
            })
        }
        Dataset::Synthetic { users, items, seed } => {
            if *users > u64::from(u32::MAX) {
                return Err(SimError::Config("an in-process simulation holds at most 2^32 users".into()));
            }
            let max = (items / 4).clamp(2, 400);
            let cfg = SyntheticConfig {
                users: *users,
                items: *items,
                seed: *seed,
                max_interactions: max,
                min_interactions: 5.min(max),
                context_effect: config.context_effect,
                ..SyntheticConfig::default()
            };
            let pop = Arc::new(Population::new(cfg)?);
            let eval_ids: Vec<u32> = if *users as usize <= config.eval_users {
                (0..*users as u32).collect()
            } else {
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xE7A1);
                let mut ids: Vec<u32> =
                    rand::seq::index::sample(&mut rng, *users as usize, config.eval_users.max(1))
                        .into_iter()
                        .map(|i| i as u32)
                        .collect();
                ids.sort_unstable();
                ids
            };
            // Generate the evaluation users in parallel (each is a pure function of its id).
            let threads = config.threads.max(1);
            let chunk = eval_ids.len().div_ceil(threads).max(1);
            let mut splits: Vec<(Vec<u32>, Option<u32>)> = Vec::with_capacity(eval_ids.len());
            std::thread::scope(|s| {
                let handles: Vec<_> = eval_ids
                    .chunks(chunk)
                    .map(|part| {
                        let pop = &pop;
                        s.spawn(move || {
                            part.iter()
                                .map(|&u| ClientData::split_user(pop, u64::from(u)))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                for h in handles {
                    splits.extend(h.join().unwrap_or_default());
                }
            });
            if splits.len() != eval_ids.len() {
                return Err(SimError::Config("generating the evaluation users failed".into()));
            }
            let (train, test) = splits.into_iter().unzip();
            let eval_split = LeaveOneOut { n_users: eval_ids.len() as u32, n_items: *items, train, test };
            let mut eval = EvalSet::build(&eval_split)?;
            for case in &mut eval.cases {
                case.user = eval_ids[case.user as usize];
            }
            Ok(Prepared {
                n_users: *users as usize,
                n_items: *items,
                data: ClientData::Synthetic(pop),
                eval,
                eval_split,
                eval_ids,
                full_ranking: true,
                cases: Vec::new(),
            })
        }
    }
}

impl Prepared {
    /// The central scorer on `model` with each user's private vector from `private`: the device
    /// protocol over the evaluation users' cases for SDK clients, the reference protocol for the
    /// bare kernel; and full-ranking HR@10 for synthetic data.
    fn central_quality(
        &self,
        def: &ModelDef,
        model: &[f32],
        private: impl Fn(u32) -> Vec<f32>,
    ) -> (starling_models::eval::Metrics, Option<f64>) {
        if !self.cases.is_empty() {
            let m = quality::central(def, model, &self.cases, None, &private).metrics();
            let full = self.full_ranking.then(|| quality::full_ranking(def, model, &self.cases, &private));
            return (m, full);
        }
        let layout = mf::MfLayout::new(def.items, def.dim);
        let m = self.eval.evaluate(|u, items, out| mf::score_items(layout, model, &private(u), items, out));
        let full = self.full_ranking.then(|| {
            full_ranking_hr_at_10(&self.eval_split, |k, out| {
                mf::score_all(layout, model, &private(self.eval_ids[k as usize]), out)
            })
        });
        (m, full)
    }

    /// The popularity ranking's quality (training counts), by the same protocol.
    fn popularity(&self) -> starling_models::eval::Metrics {
        let popularity = self.eval_split.item_counts();
        let pop = |out: &mut Vec<f32>| out.extend(popularity.iter().map(|&c| c as f32));
        if !self.cases.is_empty() {
            return quality::with_scores(self.n_items, &self.cases, |_, out| pop(out));
        }
        self.eval.evaluate(|_, items, out| out.extend(items.iter().map(|&i| popularity[i as usize] as f32)))
    }
}

/// Prints one line per round (or nothing).
pub trait Progress {
    /// Called after every round with its record.
    fn round(&mut self, record: &RoundRecord, rounds: u32);
}

impl<F: FnMut(&RoundRecord, u32)> Progress for F {
    fn round(&mut self, record: &RoundRecord, rounds: u32) {
        self(record, rounds)
    }
}

/// A simulation ready to run its first round.
struct Built {
    data: Prepared,
    fleet: SimFleet,
    ledger: Option<SimLedger>,
}

/// The simulator's fleet: its clients (honest, Byzantine if the run has an attack, and canaries
/// if it has an audit) on the simulated network.
pub type SimFleet = Fleet<Byzantine<Canaries<SimTrainer>>>;

/// The fleet of `config` (data loaded or generated, round engine, trainer, network), ready for its
/// first round: what [`run`] drives, for callers that want to step rounds themselves (benchmarks).
pub fn build_fleet(config: &SimConfig) -> Result<SimFleet, SimError> {
    Ok(build(config)?.fleet)
}

fn build(config: &SimConfig) -> Result<Built, SimError> {
    if config.clients_per_round == 0 || config.rounds == 0 || config.dim == 0 || config.eval_every == 0 {
        return Err(SimError::Config(
            "clients_per_round, rounds, dim and eval_every must be positive".into(),
        ));
    }
    let canaries = audit::validate(config)?;
    let data = prepare(config)?;
    let n_users = data.n_users;
    let n_items = data.n_items;
    let def = config.model.def(n_items, config.dim);
    if def.family != ModelDef::mf(n_items, config.dim).family && config.clients != ClientKind::Sdk {
        return Err(SimError::Config(format!(
            "--model {} runs on SDK clients only (--clients sdk)",
            def.name()
        )));
    }
    let shape = def.shape().map_err(|e| SimError::Config(e.to_string()))?;
    let mut fleet_config = config.fleet_config();
    fleet_config.model_family = def.name().into();
    fleet_config.validate()?;
    // For MF: N(0, init_std²) item rows from the seed, exactly as the reference workload draws them.
    let items = def.init_global(config.seed, config.init_std).map_err(|e| SimError::Config(e.to_string()))?;

    let target = config.clients_per_round.min(n_users);
    let mut round = RoundConfig {
        target_participants: target,
        over_selection: config.over_selection,
        min_reports: (target / 2).max(1),
        selection_pool: None,
        selection_timeout: Duration::from_secs(10),
        report_timeout: config.report_timeout,
        eligibility: Eligibility::default(),
        plan: TrainingPlan {
            epochs: config.epochs,
            learning_rate: config.item_lr,
            private_learning_rate: config.user_lr,
            batch_size: config.batch_size,
            negatives: 1,
            encoding: config.encoding,
            ..TrainingPlan::default()
        },
        max_update_values: shape.len(),
        // The service's weighting policy and cap.
        weighting: config.weighting,
        max_weight: config.max_weight,
        // Who checks in is the fleet model's business (availability, check-in rate): clients not
        // selected may come back for the next round, so every round samples from everyone available.
        retry_after: Duration::ZERO,
        retry_window: Duration::ZERO,
        secure: None,
    };
    if let Some(secure) = &config.secure {
        if matches!(config.privacy, PrivacyMode::Local { .. }) {
            return Err(SimError::Config(
                "secure aggregation and local DP do not combine (use central DP: the devices add the noise)"
                    .into(),
            ));
        }
        if matches!(config.privacy, PrivacyMode::Central { adaptive_quantile: Some(_), .. }) {
            return Err(SimError::Config(
                "adaptive clipping is not available under secure aggregation".into(),
            ));
        }
        if matches!(config.strategy, StrategyKind::Median | StrategyKind::TrimmedMean) {
            return Err(SimError::Config(
                "a robust aggregation rule needs individual updates; secure aggregation gives only their sum"
                    .into(),
            ));
        }
        let clip = match config.privacy {
            PrivacyMode::Central { clip, .. } => clip,
            _ => config.clip_norm,
        };
        round.secure = Some(SecureAggregation { clip_norm: clip as f32, ..secure.clone() });
        // The session encodes the update itself; what the trainer hands it must be lossless.
        round.plan.encoding = EncodingKind::Dense;
    }
    let (strategy, ledger) = build_privacy(config, round_strategy(config), target, shape.len(), &mut round)?;
    let orch_config = OrchestratorConfig {
        model_family: def.name().into(),
        shape,
        round,
        history: 0,
        rng_seed: config.seed,
    };
    let mut orchestrator = Orchestrator::new(orch_config, strategy, items, ModelVersion(0), RoundId(1))?;
    // Every simulated client is enrolled: N for central DP's sampling rate q = min(1, target / N).
    // Clients outside their availability window simply do not check in; they are still counted
    // (q stays each one's chance of taking part). Canaries are clients too.
    orchestrator.set_population((n_users + canaries) as u64);
    let device = DeviceModel { base: Duration::from_millis(200), per_example: Duration::from_millis(2) };
    let canary_compute = device.base;
    let local_delta = match config.privacy {
        PrivacyMode::Local { delta, .. } => {
            Some(Delta::new(delta).map_err(|e| SimError::Config(e.to_string()))?)
        }
        _ => None,
    };
    let trainer = match config.clients {
        ClientKind::Kernel => {
            let mut t = MfFleetTrainer::new(
                shape,
                n_users,
                config.init_std,
                data.data.clone(),
                device,
                config.seed,
                config.threads,
            );
            if let Some(delta) = local_delta {
                t = t.with_local_ledgers(delta);
            }
            SimTrainer::Kernel(Box::new(t))
        }
        ClientKind::Sdk => SimTrainer::Sdk(Box::new(SdkFleetTrainer::new(
            def,
            config.init_std,
            data.data.clone(),
            device,
            config.seed,
            config.threads,
            local_delta.map(Delta::get),
        ))),
    };
    let set = (canaries > 0).then(|| CanarySet::new(n_users as u64, canaries, shape, config.seed));
    let trainer = Canaries::new(trainer, set, canary_compute, config.max_weight);
    let trainer = match config.attack {
        Some(attack) => {
            attack.validate().map_err(SimError::Config)?;
            Byzantine::new(trainer, attack, n_users, config.seed)
        }
        None => Byzantine::honest(trainer),
    };
    // Without DP an evaluation round costs no privacy: it asks every evaluation user (as many as
    // are around), so the devices' figure covers what the central scorer does. Under DP it asks
    // for the training target, so each evaluation costs what a training round does.
    if config.privacy == PrivacyMode::Off {
        orchestrator.set_evaluation_target(Some(data.eval_ids.len().clamp(1, n_users)))?;
    }
    let mut fleet = Fleet::new(orchestrator, n_users + canaries, trainer, fleet_config);
    fleet.set_cpu_clock(host_clock);

    Ok(Built { data, fleet, ledger })
}

/// Runs a simulation and returns its report.
pub fn run(config: &SimConfig, progress: &mut dyn Progress) -> Result<SimReport, SimError> {
    if config.transport == TransportKind::Quic {
        audit::validate(config)?;
        return quic::run_quic(config, progress);
    }
    let started = WallClock::now();
    let Built { data, mut fleet, mut ledger } = build(config)?;
    let initial_model = config.audit.map(|_| fleet.orchestrator().model().1.clone());
    let def = config.model.def(data.n_items, config.dim);
    let evaluate = |fleet: &mut SimFleet| {
        let model = fleet.orchestrator().model().1.clone();
        let trainer = fleet.trainer_mut().inner();
        data.central_quality(&def, &model, |u| trainer.user_vector(u).into_owned())
    };
    let (initial, _) = evaluate(&mut fleet);
    let popular = data.popularity();

    // Federated evaluation: SDK devices evaluate themselves, unless their updates are only ever
    // seen summed (secure aggregation) or noised on the device (local DP); see `quality`.
    let federated = config.clients == ClientKind::Sdk
        && config.secure.is_none()
        && !matches!(config.privacy, PrivacyMode::Local { .. });
    let mut records = Vec::with_capacity(config.rounds as usize);
    let mut stopped = None;
    for r in 1..=config.rounds {
        let round_started = WallClock::now();
        let fr = match fleet.run_round() {
            Ok(fr) => fr,
            Err(StartError::Refused(reason)) => {
                stopped = Some(format!("round {r} refused: {reason}"));
                break;
            }
            Err(e) => return Err(e.into()),
        };
        let round_seconds = round_started.elapsed().as_secs_f64();
        let train_seconds = fleet.trainer_mut().inner_mut().take_train_time().as_secs_f64();
        let mut rec = RoundRecord {
            round: u64::from(r),
            committed: false,
            failure: None,
            candidates: 0,
            selected: 0,
            participants: 0,
            dropouts: 0,
            stragglers: 0,
            loss: None,
            hr_at_10: None,
            ndcg_at_10: None,
            full_hr_at_10: None,
            central_hr_at_10: None,
            central_ndcg_at_10: None,
            federated: None,
            epsilon: None,
            clip_norm: None,
            within_clip: None,
            epsilon_rdp: None,
            check_ins: fr.check_ins,
            window_closed: fr.window_closed,
            bytes_up: fr.bytes_up,
            bytes_down: fr.bytes_down,
            round_seconds,
            train_seconds,
            simulated_seconds: fr.duration.as_secs_f64(),
            traffic: fr.traffic.iter().map(|(k, v)| ((*k).to_string(), *v)).collect(),
            cpu: fr.cpu.iter().map(|(k, (t, n))| ((*k).to_string(), (t.as_secs_f64(), *n))).collect(),
        };
        for e in &fr.events {
            let stats = match e {
                RoundEvent::Committed(c) => {
                    rec.committed = true;
                    if let (Some(charge), Some(l)) = (c.privacy, ledger.as_mut()) {
                        l.record(fr.round.0, charge)?;
                    }
                    &c.stats
                }
                RoundEvent::Failed { reason, stats, .. } => {
                    rec.failure = Some(reason.to_string());
                    stats
                }
                _ => continue,
            };
            rec.candidates = stats.candidates;
            rec.selected = stats.selected;
            rec.participants = stats.reported;
            rec.dropouts = stats.dropped;
            rec.stragglers = stats.unfinished;
            rec.loss = stats.mean_loss;
            rec.clip_norm = stats.clip_norm.map(f64::from);
            rec.within_clip =
                (stats.clip_indicators > 0).then(|| stats.within_clip as f64 / stats.clip_indicators as f64);
        }
        rec.epsilon_rdp = ledger.as_ref().map(SimLedger::spent_rdp);
        rec.epsilon = match (&ledger, &config.privacy) {
            (Some(l), _) => Some(l.spent()),
            (None, PrivacyMode::Local { .. }) => Some(fleet.trainer_mut().inner().max_device_epsilon()),
            _ => None,
        };
        if r % config.eval_every == 0 || r == config.rounds {
            let (m, full) = evaluate(&mut fleet);
            rec.hr_at_10 = Some(m.hr_at_10);
            rec.central_hr_at_10 = Some(m.hr_at_10);
            rec.central_ndcg_at_10 = Some(m.ndcg_at_10);
            rec.ndcg_at_10 = Some(m.ndcg_at_10);
            rec.full_hr_at_10 = full;
            if federated {
                let fed = federated_round(&mut fleet, &data, &def, ledger.as_mut())?;
                if fed.completed {
                    rec.hr_at_10 = fed.hr_at_10;
                    rec.ndcg_at_10 = fed.ndcg_at_10;
                }
                rec.federated = Some(fed);
                // The evaluation's charge is on the ledger: show ε after it.
                if let Some(l) = &ledger {
                    rec.epsilon = Some(l.spent());
                    rec.epsilon_rdp = Some(l.spent_rdp());
                }
            }
        }
        progress.round(&rec, config.rounds);
        records.push(rec);
    }
    // A run stopped by the budget still gets its final evaluation.
    if stopped.is_some()
        && let Some(last) = records.last_mut()
        && last.hr_at_10.is_none()
    {
        let (m, full) = evaluate(&mut fleet);
        last.hr_at_10 = Some(m.hr_at_10);
        last.central_hr_at_10 = Some(m.hr_at_10);
        last.central_ndcg_at_10 = Some(m.ndcg_at_10);
        last.ndcg_at_10 = Some(m.ndcg_at_10);
        last.full_hr_at_10 = full;
    }
    let attackers = fleet.trainer_mut().attackers();
    let crafted = fleet.trainer_mut().crafted();
    let mut report = finish(config, started, (initial, popular), records, stopped);
    if let Some(a) = &mut report.attack {
        a.attackers = attackers;
        a.crafted_updates = crafted;
    }
    if let (Some(a), Some(initial_model)) = (config.audit, initial_model) {
        let last = fleet.orchestrator().model().1.clone();
        let accountant = ledger.as_ref().map(SimLedger::spent);
        report.audit = fleet.trainer_mut().inner().audit(&initial_model, &last, a.delta, accountant);
    }
    Ok(report)
}

/// Runs a federated evaluation round on `fleet` and cross-checks its figures with the central
/// scorer over the devices whose reports were accepted; its DP charge goes on the `ledger`.
fn federated_round(
    fleet: &mut SimFleet,
    data: &Prepared,
    def: &ModelDef,
    ledger: Option<&mut SimLedger>,
) -> Result<FederatedRecord, SimError> {
    let mut rec = FederatedRecord::default();
    let fr = match fleet.run_evaluation() {
        Ok(fr) => fr,
        Err(e @ (StartError::Refused(_) | StartError::EvaluationUnsupported(_))) => {
            rec.failure = Some(e.to_string());
            return Ok(rec);
        }
        Err(e) => return Err(e.into()),
    };
    (rec.bytes_up, rec.bytes_down) = (fr.bytes_up, fr.bytes_down);
    for e in &fr.events {
        match e {
            RoundEvent::Evaluated(ev) => {
                if let (Some(charge), Some(l)) = (ev.privacy, ledger) {
                    l.record(ev.round.0, charge)?;
                }
                let (up, down) = (rec.bytes_up, rec.bytes_down);
                rec = FederatedRecord {
                    bytes_up: up,
                    bytes_down: down,
                    ..FederatedRecord::released(&ev.metrics)
                };
                break;
            }
            RoundEvent::Failed { reason, .. } => {
                rec.failure = Some(reason.to_string());
                break;
            }
            _ => {}
        }
    }
    if rec.completed {
        let reported: HashSet<u32> = fr
            .outcomes
            .iter()
            .filter(|(_, o)| matches!(o, SessionOutcome::Accepted { .. }))
            .map(|(c, _)| c.0 as u32)
            .collect();
        let model = fleet.orchestrator().model().1.clone();
        let trainer = fleet.trainer_mut().inner();
        // The reporters' cases: the evaluation users' are prepared; a device outside the
        // evaluation sample has its case built from its events now.
        let known: HashSet<u32> = data.cases.iter().map(|c| c.user).collect();
        let mut missing: Vec<u32> = reported.iter().copied().filter(|u| !known.contains(u)).collect();
        missing.sort_unstable();
        let extra = quality::device_cases(&data.data, &missing, 1);
        let vector = |u: u32| trainer.user_vector(u).into_owned();
        let mut sums = quality::central(def, &model, &data.cases, Some(&reported), vector);
        let more = quality::central(def, &model, &extra, None, vector);
        sums.cases += more.cases;
        sums.hits += more.hits;
        sums.ndcg += more.ndcg;
        sums.loss += more.loss;
        let m = sums.metrics();
        rec.central_hr_at_10 = Some(m.hr_at_10);
        rec.central_ndcg_at_10 = Some(m.ndcg_at_10);
    }
    Ok(rec)
}

/// The report of a finished run: `baselines` are the untrained model's and the popularity
/// ranking's metrics; medians are over `records`.
fn finish(
    config: &SimConfig,
    started: WallClock,
    baselines: (starling_models::eval::Metrics, starling_models::eval::Metrics),
    records: Vec<RoundRecord>,
    stopped: Option<String>,
) -> SimReport {
    let median = |f: &dyn Fn(&RoundRecord) -> f64| {
        let mut v: Vec<f64> = records.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (initial, popular) = baselines;
    SimReport {
        config: config_json(config),
        initial_hr_at_10: Some(initial.hr_at_10),
        initial_ndcg_at_10: Some(initial.ndcg_at_10),
        popularity_hr_at_10: Some(popular.hr_at_10),
        quality_source: if records.iter().any(|r| r.federated.as_ref().is_some_and(|f| f.completed)) {
            "federated"
        } else {
            "central"
        }
        .into(),
        total_seconds: started.elapsed().as_secs_f64(),
        median_round_seconds: median(&|r| r.round_seconds),
        median_train_seconds: median(&|r| r.train_seconds),
        peak_rss_bytes: peak_rss_bytes(),
        stopped,
        attack: config.attack.map(|a| AttackReport {
            fraction: a.fraction,
            kind: a.kind.name().into(),
            factor: a.factor,
            attackers: 0,
            crafted_updates: 0,
            hr_at_10: records.iter().rev().find_map(|r| r.hr_at_10),
            baseline_hr_at_10: None,
            hr_at_10_drop: None,
        }),
        audit: None,
        rounds: records,
    }
}

fn round_strategy(config: &SimConfig) -> Box<dyn Strategy> {
    config.strategy.build()
}

/// The run's ledger under central DP: the coordinator's durable ledger on an in-memory store.
struct SimLedger {
    store: Store,
    ledger: DurableLedger,
}

impl SimLedger {
    fn record(&mut self, round: u64, charge: PrivacyCharge) -> Result<(), SimError> {
        let bad = |e: starling_proto::dp::params::ParamError| SimError::Config(e.to_string());
        let mechanism = Mechanism {
            q: SamplingRate::new(charge.sampling_rate).map_err(bad)?,
            sigma: NoiseMultiplier::new(charge.noise_multiplier).map_err(bad)?,
            steps: u64::from(charge.steps),
        };
        self.ledger.record(&mut self.store, LedgerEntry { round, mechanism }, 0)?;
        Ok(())
    }

    /// ε spent, by the ledger's accountant (PLD).
    fn spent(&self) -> f64 {
        self.ledger.status().epsilon_spent
    }

    /// ε spent by the RDP accountant, reported beside it.
    fn spent_rdp(&self) -> f64 {
        self.ledger.ledger().spent_by(AccountantKind::Rdp)
    }
}

/// Wraps `strategy` for the configured privacy mode and sets the clients' plan accordingly
/// (`dim`: the number of model values an update carries).
fn build_privacy(
    config: &SimConfig,
    strategy: Box<dyn Strategy>,
    target: usize,
    dim: usize,
    round: &mut RoundConfig,
) -> Result<(Box<dyn Strategy>, Option<SimLedger>), SimError> {
    let bad = |e: starling_proto::dp::params::ParamError| SimError::Config(e.to_string());
    match config.privacy {
        PrivacyMode::Off => {
            // As the service with `privacy.mode = "off"`: clients clip to the plan's norm and the
            // coordinator re-clips every update to it.
            ClipNorm::new(config.clip_norm).map_err(bad)?;
            round.plan.clip_norm = Some(config.clip_norm as f32);
            if !config.server_clipping {
                return Ok((strategy, None));
            }
            let bounded =
                NormBound::new(strategy, config.clip_norm).map_err(|e| SimError::Config(e.to_string()))?;
            Ok((Box::new(bounded), None))
        }
        PrivacyMode::Local { clip, noise_multiplier, .. } => {
            ClipNorm::new(clip).map_err(bad)?;
            NoiseMultiplier::new(noise_multiplier).map_err(bad)?;
            round.plan.clip_norm = Some(clip as f32);
            round.plan.noise = NoiseSettings::Local { multiplier: noise_multiplier as f32 };
            // Noise goes on every coordinate, so the update travels dense.
            round.plan.encoding = EncodingKind::Dense;
            // The coordinator cannot check the noise, but it can bound every update's norm: by
            // what an honest noised update stays under (re-clipping to C would shrink an honest
            // update, of norm about σ·2C·√d, to almost nothing).
            let bound = honest_norm_bound(clip, noise_multiplier, dim);
            let bounded = NormBound::new(strategy, bound).map_err(|e| SimError::Config(e.to_string()))?;
            Ok((Box::new(bounded), None))
        }
        PrivacyMode::Central { clip, noise_multiplier, epsilon, delta, adaptive_quantile, sampler } => {
            let budget = Budget {
                epsilon: Epsilon::new(epsilon).map_err(bad)?,
                delta: Delta::new(delta).map_err(bad)?,
            };
            let adaptive = adaptive_quantile
                .map(|q| {
                    Ok::<_, SimError>(AdaptiveClipping {
                        target: Quantile::new(q).map_err(bad)?,
                        learning_rate: 0.2,
                        // Andrew et al.: σ_b = expected participants / 20 (and above σ/2).
                        count_noise: (target as f64 / 20.0).max(noise_multiplier),
                    })
                })
                .transpose()?;
            let dp_config = DpConfig {
                clip: ClipNorm::new(clip).map_err(bad)?,
                noise: NoiseMultiplier::new(noise_multiplier).map_err(bad)?,
                expected_participants: target,
                budget,
                adaptive,
            };
            let store = Store::open_in_memory().map_err(crate::privacy::LedgerError::from)?;
            let ledger = DurableLedger::open(&store, budget)?;
            let dp = DpFedAvg::with_ledger(strategy, dp_config, ledger.ledger().clone())?;
            let dp = match sampler {
                NoiseSampler::Fast => dp,
                NoiseSampler::OpenDpExact => dp.with_sampler(Arc::new(OpenDpGaussian::exact())),
                NoiseSampler::OpenDpGrid => dp.with_sampler(Arc::new(OpenDpGaussian::with_granularity(-20))),
            };
            Ok((Box::new(dp), Some(SimLedger { store, ledger })))
        }
    }
}

/// The fleet's step clock: host time since the first call. The fleet handles one message at a
/// time on this thread (training runs between messages, not during them), so the time a step
/// takes on this clock is the CPU it costs.
fn host_clock() -> Duration {
    static START: std::sync::OnceLock<WallClock> = std::sync::OnceLock::new();
    START.get_or_init(WallClock::now).elapsed()
}

fn config_json(c: &SimConfig) -> serde_json::Value {
    let dataset = match &c.dataset {
        Dataset::Synthetic { users, items, seed } => {
            serde_json::json!({"kind": "synthetic", "users": users, "items": items, "seed": seed})
        }
        Dataset::File(p) => serde_json::json!({"kind": "file", "path": p.display().to_string()}),
    };
    let privacy = match &c.privacy {
        PrivacyMode::Off => serde_json::json!({"mode": "off"}),
        PrivacyMode::Central { clip, noise_multiplier, epsilon, delta, adaptive_quantile, sampler } => {
            serde_json::json!({"mode": "central", "clip": clip, "noise_multiplier": noise_multiplier,
                "epsilon_budget": epsilon, "delta": delta, "adaptive_quantile": adaptive_quantile,
                "sampler": format!("{sampler:?}")})
        }
        PrivacyMode::Local { clip, noise_multiplier, delta } => serde_json::json!({"mode": "local",
            "clip": clip, "noise_multiplier": noise_multiplier, "delta": delta}),
    };
    serde_json::json!({
        "privacy": privacy,
        "dataset": dataset,
        "clients_per_round": c.clients_per_round,
        "rounds": c.rounds,
        "dim": c.dim,
        "epochs": c.epochs,
        "item_lr": c.item_lr,
        "user_lr": c.user_lr,
        "batch_size": c.batch_size,
        "init_std": c.init_std,
        "strategy": format!("{:?}", c.strategy),
        "encoding": format!("{:?}", c.encoding),
        "over_selection": c.over_selection,
        "dropout": c.dropout,
        "device_spread": c.device_spread,
        "latency_ms": c.latency.as_secs_f64() * 1e3,
        "jitter_ms": c.jitter.as_secs_f64() * 1e3,
        "uplink_bytes_per_s": c.uplink,
        "downlink_bytes_per_s": c.downlink,
        "bandwidth_spread": c.bandwidth_spread,
        "availability": c.availability.as_ref().map(|a| serde_json::json!({
            "day_s": a.day.as_secs_f64(), "hours": a.hours, "peak_hour": a.peak_hour})),
        "check_in_probability": c.check_in_probability,
        "round_interval_s": c.round_interval.as_secs_f64(),
        "eval_users": c.eval_users,
        "model": match c.model { ModelKind::Mf => "mf", ModelKind::TwoTower => "two-tower" },
        "context_effect": c.context_effect,
        "report_timeout_s": c.report_timeout.as_secs_f64(),
        "eval_every": c.eval_every,
        "seed": c.seed,
        "threads": c.threads,
        "clients": format!("{:?}", c.clients).to_lowercase(),
        "clip_norm": c.clip_norm,
        "server_clipping": c.server_clipping,
        "weighting": c.weighting.name(),
        "max_weight": c.max_weight,
        "attack": c.attack.map(|a| serde_json::json!({
            "fraction": a.fraction, "kind": a.kind.name(), "factor": a.factor})),
        "audit": c.audit.map(|a| serde_json::json!({"canaries": a.canaries, "delta": a.delta})),
        "transport": match c.transport { TransportKind::InProcess => "in-process", TransportKind::Quic => "quic" },
    })
}

/// Peak resident set size of this process (Linux `VmHWM`), if available.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under local DP the coordinator bounds updates by what an honest noised update stays
    /// under, not by the clip norm; the devices are still told to clip to C.
    #[test]
    fn under_local_dp_the_server_bounds_updates_by_the_honest_noised_norm() {
        let config = SimConfig {
            privacy: PrivacyMode::Local { clip: 0.5, noise_multiplier: 2.0, delta: 1e-5 },
            ..SimConfig::default()
        };
        let mut round = RoundConfig::default();
        let (strategy, _) = build_privacy(&config, round_strategy(&config), 10, 6400, &mut round).unwrap();
        let bound = honest_norm_bound(0.5, 2.0, 6400);
        assert!(bound > 150.0, "{bound}");
        assert!(strategy.name().starts_with(&format!("norm-bound({bound})/")), "{}", strategy.name());
        assert_eq!(round.plan.clip_norm, Some(0.5));
        assert_eq!(round.plan.noise, NoiseSettings::Local { multiplier: 2.0 });
    }
}
