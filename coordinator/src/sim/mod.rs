//! The fleet simulator: the real round engine and session machines, real BPR-MF training on every
//! simulated client, and a simulated network and clock (`starling_proto::harness::Fleet`).
//!
//! A run: load or generate the data, split it leave-one-out (the held-out item of each user is
//! never trained on), give every user a client with its own private vector, then run rounds. Every
//! `eval_every` rounds each client scores its held-out item against the 99 sampled negatives of the
//! reference protocol with its own private vector and the current global model.

pub mod report;
pub mod trainer;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, StandardNormal};
use report::{RoundRecord, SimReport};
use starling_models::data::synthetic::{Population, SyntheticConfig};
use starling_models::data::{LeaveOneOut, movielens};
use starling_models::eval::{EvalSet, full_ranking_hr_at_10};
use starling_models::mf;
use starling_proto::encoding::EncodingKind;
use starling_proto::harness::{Fleet, FleetConfig};
use starling_proto::ids::{ModelVersion, RoundId};
use starling_proto::message::{DeviceConditions, TrainingPlan};
use starling_proto::round::{Eligibility, Orchestrator, OrchestratorConfig, RoundConfig, RoundEvent};
use starling_proto::strategy::{Federated, Strategy};
use starling_proto::time::Duration;
use starling_proto::update::ModelShape;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant as WallClock;
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
    /// Spread (σ of the log) of device slowness; 0 = identical devices.
    pub device_spread: f32,
    /// Report deadline (simulated).
    pub report_timeout: Duration,
    /// Evaluate every this many rounds (and after the last).
    pub eval_every: u32,
    /// Seed of everything.
    pub seed: u64,
    /// Worker threads for local training.
    pub threads: usize,
}

impl Default for SimConfig {
    /// The main job's defaults: a synthetic population, about a minute on 2 cores.
    fn default() -> Self {
        Self {
            dataset: Dataset::Synthetic { users: 5000, items: 2000, seed: 1 },
            clients_per_round: 250,
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
            report_timeout: Duration::from_secs(120),
            eval_every: 10,
            seed: 42,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

impl SimConfig {
    /// The reference workload of `shared/docs/reference-workload.md` on `data`, with `c` clients per
    /// round and `rounds` rounds: dim 32, lr 0.2 (user) / 1.0 (items), batch 32, E = 1, FedAvg
    /// weighted by examples, uniform selection of exactly `c` clients, no dropouts, identical devices.
    pub fn reference(data: PathBuf, c: usize, rounds: u32) -> Self {
        Self {
            dataset: Dataset::File(data),
            clients_per_round: c,
            rounds,
            over_selection: 1.0,
            dropout: 0.0,
            device_spread: 0.0,
            ..Self::default()
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
}

/// The data of a run, prepared.
struct Prepared {
    split: LeaveOneOut,
    eval: EvalSet,
    full_ranking: bool,
}

fn prepare(dataset: &Dataset) -> Result<Prepared, SimError> {
    let (interactions, n_users, n_items, full_ranking) = match dataset {
        Dataset::File(path) => {
            let r = movielens::load(path)?;
            (r.interactions, r.n_users, r.n_items, false)
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
                ..SyntheticConfig::default()
            };
            let pop = Population::new(cfg)?;
            (pop.interactions(*users), *users as u32, *items, true)
        }
    };
    let split = LeaveOneOut::split(&interactions, n_users, n_items);
    let eval = EvalSet::build(&split)?;
    Ok(Prepared { split, eval, full_ranking })
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

/// Runs a simulation and returns its report.
pub fn run(config: &SimConfig, progress: &mut dyn Progress) -> Result<SimReport, SimError> {
    let started = WallClock::now();
    if config.clients_per_round == 0 || config.rounds == 0 || config.dim == 0 || config.eval_every == 0 {
        return Err(SimError::Config(
            "clients_per_round, rounds, dim and eval_every must be positive".into(),
        ));
    }
    let data = prepare(&config.dataset)?;
    let n_users = data.split.n_users as usize;
    let n_items = data.split.n_items;
    let dim = config.dim as usize;
    let shape = ModelShape::new(n_items, config.dim).map_err(|e| SimError::Config(e.to_string()))?;

    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut normal = |n: usize| -> Vec<f32> {
        (0..n).map(|_| rng.sample::<f32, _>(StandardNormal) * config.init_std).collect()
    };
    let items = normal(shape.len());
    let users: Vec<Vec<f32>> = (0..n_users).map(|_| normal(dim)).collect();
    let slowness: Vec<f32> = if config.device_spread > 0.0 {
        let ln = LogNormal::new(0.0, f64::from(config.device_spread))
            .map_err(|e| SimError::Config(e.to_string()))?;
        (0..n_users).map(|_| ln.sample(&mut rng) as f32).collect()
    } else {
        vec![1.0; n_users]
    };
    let positives = Arc::new(data.split.train.clone());
    let popularity = data.split.item_counts();

    let target = config.clients_per_round.min(n_users);
    let round = RoundConfig {
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
        ..RoundConfig::default()
    };
    let orch_config =
        OrchestratorConfig { model_family: "mf-bpr".into(), shape, round, history: 0, rng_seed: config.seed };
    let orchestrator =
        Orchestrator::new(orch_config, config.strategy.build(), items, ModelVersion(0), RoundId(1))?;
    let device =
        DeviceModel { base: Duration::from_millis(200), per_example: Duration::from_millis(2), slowness };
    let trainer = MfFleetTrainer::new(shape, users, positives, device, config.seed, config.threads);
    let fleet_config = FleetConfig {
        dropout: config.dropout,
        seed: config.seed,
        model_family: "mf-bpr".into(),
        cache_models: false,
        check_in_spread: Duration::from_secs(5),
        conditions: DeviceConditions { charging: true, unmetered: true, idle: true, battery_percent: 80 },
        ..FleetConfig::default()
    };
    let mut fleet = Fleet::new(orchestrator, n_users, trainer, fleet_config);

    let layout = mf::MfLayout::new(n_items, config.dim);
    let evaluate = |fleet: &mut Fleet<MfFleetTrainer>| {
        let model = fleet.orchestrator().model().1.clone();
        let users = fleet.trainer_mut().users();
        let m = data
            .eval
            .evaluate(|u, items, out| mf::score_items(layout, &model, &users[u as usize], items, out));
        let full = data.full_ranking.then(|| {
            full_ranking_hr_at_10(&data.split, |u, out| {
                mf::score_all(layout, &model, &users[u as usize], out)
            })
        });
        (m, full)
    };
    let (initial, _) = evaluate(&mut fleet);
    let popular =
        data.eval.evaluate(|_, items, out| out.extend(items.iter().map(|&i| popularity[i as usize] as f32)));

    let mut records = Vec::with_capacity(config.rounds as usize);
    for r in 1..=config.rounds {
        let round_started = WallClock::now();
        let fr = fleet.run_round()?;
        let round_seconds = round_started.elapsed().as_secs_f64();
        let train_seconds = fleet.trainer_mut().take_train_time().as_secs_f64();
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
            epsilon: None,
            bytes_up: fr.bytes_up,
            bytes_down: fr.bytes_down,
            round_seconds,
            train_seconds,
            simulated_seconds: fr.duration.as_secs_f64(),
        };
        for e in &fr.events {
            let stats = match e {
                RoundEvent::Committed(c) => {
                    rec.committed = true;
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
        }
        if r % config.eval_every == 0 || r == config.rounds {
            let (m, full) = evaluate(&mut fleet);
            rec.hr_at_10 = Some(m.hr_at_10);
            rec.ndcg_at_10 = Some(m.ndcg_at_10);
            rec.full_hr_at_10 = full;
        }
        progress.round(&rec, config.rounds);
        records.push(rec);
    }
    let median = |f: &dyn Fn(&RoundRecord) -> f64| {
        let mut v: Vec<f64> = records.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    Ok(SimReport {
        config: config_json(config),
        initial_hr_at_10: Some(initial.hr_at_10),
        initial_ndcg_at_10: Some(initial.ndcg_at_10),
        popularity_hr_at_10: Some(popular.hr_at_10),
        total_seconds: started.elapsed().as_secs_f64(),
        median_round_seconds: median(&|r| r.round_seconds),
        median_train_seconds: median(&|r| r.train_seconds),
        peak_rss_bytes: peak_rss_bytes(),
        rounds: records,
    })
}

fn config_json(c: &SimConfig) -> serde_json::Value {
    let dataset = match &c.dataset {
        Dataset::Synthetic { users, items, seed } => {
            serde_json::json!({"kind": "synthetic", "users": users, "items": items, "seed": seed})
        }
        Dataset::File(p) => serde_json::json!({"kind": "file", "path": p.display().to_string()}),
    };
    serde_json::json!({
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
        "report_timeout_s": c.report_timeout.as_secs_f64(),
        "eval_every": c.eval_every,
        "seed": c.seed,
        "threads": c.threads,
    })
}

/// Peak resident set size of this process (Linux `VmHWM`), if available.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
