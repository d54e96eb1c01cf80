//! `starling simulate --transport quic`: the real coordinator service (`starling serve`'s code:
//! QUIC endpoint, TLS, enrollment tokens, driver, SQLite store and ledger) and one real SDK
//! [`Client`] per user over its QUIC transport, on loopback, in real time.
//!
//! Differences from the in-process mode, all because the network and clock are real here: rounds
//! are started by the service's own schedule; every client loops `run_round` (check in, and train
//! if selected) with a small pause after "come back later"; there is no simulated latency,
//! bandwidth, availability or dropout; byte counts are the SDK's own session counters (frames,
//! not QUIC/UDP overhead); round time is wall-clock from the round's start to its commit. Runs
//! are not bit-for-bit reproducible (scheduling decides who checks in first). Every client is an
//! SDK device with an in-memory store, its training interactions recorded as events.

use super::sdk_trainer::{SIM_EPOCH_MS, device_config};
use super::trainer::initial_user_vector;
use super::{
    ClientKind, Progress, SimConfig, SimError, StrategyKind, finish, prepare,
    report::{FederatedRecord, RoundRecord, SimReport},
};
use crate::service::config::ServiceConfig;
use crate::service::server;
use crate::service::tokens::{TokenAuthority, TokenClaims, unix_now_s};
use crate::store::Store;
use starling_proto::ids::ClientId;
use starling_proto::message::DeviceConditions;
use starling_proto::round::RoundEvent;
use starling_sdk::config::{CoordinatorEndpoint, RetryPolicy};
use starling_sdk::transport::quic::QuicTransport;
use starling_sdk::{Client, RoundError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant as WallClock};

/// The report deadline of a round over loopback QUIC (at most; `--report-timeout` may lower it).
pub const QUIC_REPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// The most users `--transport quic` runs (one QUIC client and one SDK device each).
pub const MAX_QUIC_USERS: usize = 5_000;

const PLUGGED_IN: DeviceConditions =
    DeviceConditions { charging: true, unmetered: true, idle: true, battery_percent: 90 };

fn err(what: &str) -> impl Fn(&dyn std::fmt::Display) -> SimError + '_ {
    move |e| SimError::Config(format!("{what}: {e}"))
}

#[derive(Default)]
struct Traffic {
    /// Bytes (up, down) per round, from the clients' session reports.
    by_round: HashMap<u64, (u64, u64)>,
}

/// Runs the simulation over loopback QUIC. See the module docs.
pub fn run_quic(config: &SimConfig, progress: &mut dyn Progress) -> Result<SimReport, SimError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| err("tokio runtime")(&e))?;
    runtime.block_on(run(config, progress))
}

async fn run(config: &SimConfig, progress: &mut dyn Progress) -> Result<SimReport, SimError> {
    let started = WallClock::now();
    if config.clients != ClientKind::Sdk {
        return Err(SimError::Config("--transport quic runs SDK clients only (--clients sdk)".into()));
    }
    if config.attack.is_some() {
        return Err(SimError::Config(
            "--transport quic runs unmodified SDK clients; Byzantine clients (--attackers) need --transport in-process"
                .into(),
        ));
    }
    if !config.server_clipping {
        return Err(SimError::Config("the service always re-clips updates (--transport quic)".into()));
    }
    let data = prepare(config)?;
    if data.n_users > MAX_QUIC_USERS {
        return Err(SimError::Config(format!(
            "--transport quic runs one QUIC client per user; {} users is more than {MAX_QUIC_USERS}",
            data.n_users
        )));
    }
    let (n_users, n_items, dim) = (data.n_users, data.n_items, config.dim);

    // The service: `starling init` into a temporary directory, then this run's settings.
    let dir = tempfile::tempdir().map_err(|e| err("temporary directory")(&e))?;
    server::init(dir.path(), &["localhost", "127.0.0.1"], false).map_err(|e| err("init")(&e))?;
    let mut svc = ServiceConfig::load(&dir.path().join("starling.toml")).map_err(|e| err("config")(&e))?;
    svc.server.listen = "127.0.0.1:0".parse().map_err(|e| err("address")(&e))?;
    svc.server.admin_listen = "127.0.0.1:0".parse().map_err(|e| err("address")(&e))?;
    svc.server.max_connections = svc.server.max_connections.max(n_users as u32 + 64);
    // Every simulated device connects from 127.0.0.1: the per-address cap must admit them all.
    svc.server.max_connections_per_ip = svc.server.max_connections;
    let def = config.model.def(n_items, dim);
    svc.model.family = def.name().into();
    svc.model.rows = n_items;
    svc.model.row_len = dim;
    svc.model.init_std = config.init_std;
    svc.model.seed = config.seed;
    let target = config.clients_per_round.min(n_users).max(1);
    let r = &mut svc.round;
    r.target_participants = target;
    r.min_reports = (target / 2).max(1);
    r.over_selection = config.over_selection;
    r.selection_pool = match config.privacy {
        // Central DP samples every check-in with q = target / population: the pool must be able
        // to hold the whole population, or q·pool (not the target) is what a round gets.
        super::PrivacyMode::Central { .. } => n_users,
        _ => ((target as f64) * config.over_selection).ceil() as usize,
    };
    // Loopback training takes milliseconds. Clients that check in while a round is collecting
    // are told to come back when its report deadline passes, so a short deadline paces rounds.
    r.selection_timeout_ms = 3_000;
    r.report_timeout_ms = config.report_timeout.min(QUIC_REPORT_TIMEOUT).as_millis() as u64;
    r.interval_ms = 0;
    r.max_rounds = u64::from(config.rounds);
    (r.require_charging, r.require_unmetered, r.require_idle, r.min_battery_percent) =
        (false, false, false, 0);
    r.epochs = config.epochs;
    r.learning_rate = config.item_lr;
    r.private_learning_rate = config.user_lr;
    r.batch_size = config.batch_size;
    r.retry_after_ms = 0;
    r.retry_window_ms = 200;
    r.weighting = config.weighting.name().into();
    r.max_weight = config.max_weight;
    svc.strategy.kind = match config.strategy {
        StrategyKind::FedAvg => "fedavg",
        StrategyKind::FedAvgRowAware => "fedavg_row",
        StrategyKind::FedAvgM => "fedavgm",
        StrategyKind::FedAdam => "fedadam",
        StrategyKind::FedYogi => "fedyogi",
        StrategyKind::Median => "median",
        StrategyKind::TrimmedMean => "trimmed_mean",
    }
    .into();
    match config.privacy {
        super::PrivacyMode::Off => {
            svc.privacy.mode = "off".into();
            svc.privacy.clip_norm = config.clip_norm;
        }
        super::PrivacyMode::Central { clip, noise_multiplier, epsilon, delta, .. } => {
            svc.privacy.mode = "central".into();
            svc.privacy.clip_norm = clip;
            svc.privacy.noise_multiplier = noise_multiplier;
            svc.privacy.epsilon_budget = epsilon;
            svc.privacy.delta = delta;
        }
        super::PrivacyMode::Local { .. } => {
            return Err(SimError::Config("--transport quic supports --dp off and --dp central".into()));
        }
    }
    if let Some(secure) = &config.secure {
        let s = &mut svc.secure_aggregation;
        s.enabled = true;
        s.neighbours = secure.neighbours;
        s.threshold = secure.threshold;
        s.bits = secure.bits;
        s.dropout_tolerance = secure.dropout_tolerance;
        s.max_cohort = secure.max_cohort;
        s.rotation = secure.rotation;
        s.phase_timeout_ms = secure.phase_timeout.as_millis() as u64;
    }
    // Federated evaluation by the service's own schedule (not under secure aggregation).
    let federated = config.secure.is_none();
    svc.evaluation.every_rounds = Some(if federated { u64::from(config.eval_every) } else { 0 });
    svc.validate().map_err(|e| err("service config")(&e))?;

    // Enrollment: one signed token per client, recorded in the service's store.
    let authority = TokenAuthority::from_secret_file_text(
        &std::fs::read_to_string(&svc.server.token_secret_file).map_err(|e| err("token secret")(&e))?,
    )
    .map_err(|e| err("token secret")(&e))?;
    let tokens: Vec<Vec<u8>> = {
        let mut store = Store::open_config(&svc.storage).map_err(|e| err("store")(&e))?;
        let expires = unix_now_s() + 86_400;
        (0..n_users as u64)
            .map(|c| {
                let token_id = store.record_token(ClientId(c), expires, 0).map_err(|e| err("token")(&e))?;
                Ok(authority
                    .issue(TokenClaims { token_id, client: ClientId(c), expires_unix_s: expires })
                    .into_bytes())
            })
            .collect::<Result<_, SimError>>()?
    };

    let running = server::start(&svc).await.map_err(|e| err("starting the service")(&e))?;
    let mut events = running.handle.subscribe();
    let ca_pem = std::fs::read(dir.path().join("tls/ca.pem")).map_err(|e| err("CA certificate")(&e))?;
    let endpoint = CoordinatorEndpoint {
        address: running.quic_addr.to_string(),
        server_name: "localhost".into(),
        ca_pem,
    };
    let transport = QuicTransport::new(&endpoint).map_err(|e| err("QUIC transport")(&e))?;

    // The fleet: one SDK client per user, its training interactions recorded as events.
    let mut clients = Vec::with_capacity(n_users);
    for (c, token) in tokens.into_iter().enumerate() {
        let c = c as u64;
        let mut cc = device_config(c, &def, config.seed, None);
        cc.credential = token;
        cc.coordinator = Some(endpoint.clone());
        cc.retry = RetryPolicy {
            attempts: 8,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        };
        let client = Client::open(cc, transport.clone()).map_err(|e| err("SDK client")(&e))?;
        let evs = data.data.events(c);
        let initial = initial_user_vector(config.seed, c, dim as usize, config.init_std);
        client
            .with_device(|d| {
                d.record_batch(&evs, SIM_EPOCH_MS)?;
                d.seed_user_vector(initial)?;
                Ok::<_, starling_sdk::device::RecordError>(())
            })
            .map_err(|e| err("recording events")(&e))?;
        client.set_conditions(PLUGGED_IN);
        clients.push(client);
    }

    let evaluate = |model: &[f32]| {
        let vector = |u: u32| -> Vec<f32> {
            clients
                .get(u as usize)
                .and_then(|c| c.with_device(|d| d.user_vector().map(<[f32]>::to_vec)))
                .unwrap_or_else(|| {
                    initial_user_vector(config.seed, u64::from(u), dim as usize, config.init_std)
                })
        };
        data.central_quality(&def, model, vector)
    };
    let initial_model = svc.initial_model().map_err(|e| err("initial model")(&e))?;
    let (initial, _) = evaluate(&initial_model);
    let popular = data.popularity();

    // Every client loops: check in, train if selected, come back when asked.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = Arc::new(Mutex::new(Traffic::default()));
    let mut fleet = tokio::task::JoinSet::new();
    for client in &clients {
        let (client, stop, traffic) = (client.clone(), stop.clone(), traffic.clone());
        fleet.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.run_round().await {
                    Ok(report) => {
                        let s = &report.session;
                        if let Some(round) = s.round {
                            let mut t = traffic.lock().unwrap_or_else(|p| p.into_inner());
                            let e = t.by_round.entry(round.0).or_default();
                            e.0 += s.bytes_sent;
                            e.1 += s.bytes_received;
                        }
                        if s.round.is_none() {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    Err(RoundError::ComeBackLater { after }) => {
                        tokio::time::sleep(after.min(Duration::from_millis(250))).await
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
    }

    let mut records: Vec<RoundRecord> = Vec::new();
    let mut round_started: HashMap<u64, WallClock> = HashMap::new();
    let mut stopped = None;
    let deadline = config.report_timeout + Duration::from_secs(60);
    // Evaluation rounds: the driver starts one right after every `eval_every`-th commit.
    let (mut next_is_eval, mut pending_eval, mut committed_rounds) = (false, false, 0u32);
    let mut eval_rounds: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let (mut last_progress, mut last_check) = (WallClock::now(), WallClock::now());
    while records.len() < config.rounds as usize || pending_eval {
        let wait = if records.len() < config.rounds as usize { deadline } else { Duration::from_secs(20) };
        // Wait for the next event, but look at the service every second: once it halts (the
        // privacy budget refused a round) no round will come, however many check-ins it refuses.
        let event = loop {
            if last_check.elapsed() >= Duration::from_secs(1) {
                last_check = WallClock::now();
                if running.handle.status().halted.is_some() || last_progress.elapsed() >= wait {
                    break None;
                }
            }
            if let Ok(e) = tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
                break Some(e);
            }
        };
        let event = match event {
            Some(Ok(e)) => e,
            Some(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
            Some(Err(_)) => {
                stopped = Some("the service stopped".into());
                break;
            }
            None if records.len() >= config.rounds as usize && !pending_eval => break,
            None => {
                if let Some(h) = running.handle.status().halted {
                    stopped = Some(format!("the service halted: {h}"));
                } else if records.len() < config.rounds as usize {
                    stopped = Some(format!("no round finished within {} s", wait.as_secs()));
                }
                break;
            }
        };
        let (round, committed, model, stats, failure) = match event {
            RoundEvent::Started { round, .. } => {
                if std::mem::take(&mut next_is_eval) {
                    eval_rounds.insert(round.0);
                } else {
                    round_started.insert(round.0, WallClock::now());
                }
                continue;
            }
            RoundEvent::Evaluated(ev) => {
                pending_eval = false;
                last_progress = WallClock::now();
                let m = &ev.metrics;
                if let Some(last) = records.last_mut() {
                    last.hr_at_10 = Some(m.hr_at_10);
                    last.ndcg_at_10 = Some(m.ndcg_at_10);
                    last.epsilon = svc.central_dp().then(|| running.telemetry.status().epsilon_spent);
                    last.federated = Some(FederatedRecord::released(m));
                }
                continue;
            }
            RoundEvent::Failed { round, reason, .. } if eval_rounds.contains(&round.0) => {
                pending_eval = false;
                if let Some(last) = records.last_mut() {
                    last.federated = Some(FederatedRecord::failed(reason.to_string()));
                }
                continue;
            }
            RoundEvent::Committed(c) => (c.round, true, Some(c.model.clone()), c.stats.clone(), None),
            RoundEvent::Failed { round, reason, stats } => {
                (round, false, None, stats, Some(reason.to_string()))
            }
            _ => continue,
        };
        let r = records.len() as u32 + 1;
        let round_seconds = round_started.remove(&round.0).map_or(0.0, |t| t.elapsed().as_secs_f64());
        let (bytes_up, bytes_down) = traffic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_round
            .get(&round.0)
            .copied()
            .unwrap_or_default();
        let mut rec = RoundRecord {
            round: u64::from(r),
            committed,
            failure,
            candidates: stats.candidates,
            selected: stats.selected,
            participants: stats.reported,
            dropouts: stats.dropped,
            stragglers: stats.unfinished,
            loss: stats.mean_loss,
            hr_at_10: None,
            ndcg_at_10: None,
            full_hr_at_10: None,
            central_hr_at_10: None,
            central_ndcg_at_10: None,
            federated: None,
            epsilon: svc.central_dp().then(|| running.telemetry.status().epsilon_spent),
            clip_norm: None,
            within_clip: None,
            epsilon_rdp: None,
            check_ins: stats.candidates,
            window_closed: 0,
            bytes_up,
            bytes_down,
            round_seconds,
            train_seconds: 0.0,
            simulated_seconds: round_seconds,
            traffic: Default::default(),
            cpu: Default::default(),
        };
        if let Some(model) = model
            && (r.is_multiple_of(config.eval_every) || r == config.rounds)
        {
            let (m, full) = evaluate(&model);
            rec.hr_at_10 = Some(m.hr_at_10);
            rec.central_hr_at_10 = Some(m.hr_at_10);
            rec.central_ndcg_at_10 = Some(m.ndcg_at_10);
            rec.ndcg_at_10 = Some(m.ndcg_at_10);
            rec.full_hr_at_10 = full;
        }
        if committed {
            committed_rounds += 1;
            if federated && committed_rounds.is_multiple_of(config.eval_every) {
                (next_is_eval, pending_eval) = (true, true);
            }
        }
        progress.round(&rec, config.rounds);
        records.push(rec);
        last_progress = WallClock::now();
    }
    stop.store(true, Ordering::Relaxed);
    running.shutdown().await;
    fleet.abort_all();
    Ok(finish(config, started, (initial, popular), records, stopped))
}
