//! Secure aggregation through the round engine and the session machine, on the deterministic
//! fleet: the coordinator receives masked vectors only, and commits the (decoded) mean of the
//! surviving devices' clipped updates, or fails the round without releasing anything.

use starling_proto::codec::{Codec, Inbound};
use starling_proto::dp::strategy::{DpConfig, DpFedAvg};
use starling_proto::dp::{Budget, ClipNorm, Delta, Epsilon, NoiseMultiplier};
use starling_proto::harness::{Fleet, FleetConfig, FnTrainer, TrainResult};
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::{ClientMessage, LocalMetrics, TrainingPlan};
use starling_proto::round::{
    CommittedRound, Eligibility, FailReason, Orchestrator, OrchestratorConfig, RoundConfig, RoundEvent,
    SecureAggregation,
};
use starling_proto::secagg::SecAggClientMessage;
use starling_proto::session::TrainRequest;
use starling_proto::strategy::{Federated, Strategy};
use starling_proto::time::Duration;
use starling_proto::update::{ModelShape, Update};

const ROWS: u32 = 40;
const ROW_LEN: u32 = 4;

fn shape() -> ModelShape {
    ModelShape::new(ROWS, ROW_LEN).unwrap()
}

/// Client i's update: a dense vector with small, client-specific values (norm well below the clip).
fn update_of(i: u64) -> Vec<f32> {
    (0..shape().len()).map(|k| (((i * 31 + k as u64 * 7) % 13) as f32 - 6.0) / 200.0).collect()
}

fn fake(client: ClientId, _req: &TrainRequest, _params: &[f32]) -> Option<(TrainResult, Duration)> {
    let result = TrainResult {
        update: Update::dense(shape(), update_of(client.0)).unwrap(),
        weight: 1.0 + (client.0 % 4) as f32,
        metrics: LocalMetrics::default(),
    };
    Some((result, Duration::from_secs(1 + client.0 % 3)))
}

type FakeTrainer = FnTrainer<fn(ClientId, &TrainRequest, &[f32]) -> Option<(TrainResult, Duration)>>;

fn secure(neighbours: u32) -> SecureAggregation {
    SecureAggregation {
        neighbours,
        threshold: neighbours / 2 + 1,
        bits: 32,
        dropout_tolerance: 0.3,
        max_cohort: 64,
        rotation: false,
        phase_timeout: Duration::from_secs(10),
        clip_norm: 10.0,
    }
}

fn config(target: usize, min: usize, secure: SecureAggregation) -> OrchestratorConfig {
    OrchestratorConfig {
        model_family: "test".into(),
        shape: shape(),
        round: RoundConfig {
            target_participants: target,
            over_selection: 1.0,
            min_reports: min,
            selection_timeout: Duration::from_secs(5),
            report_timeout: Duration::from_secs(30),
            eligibility: Eligibility::default(),
            plan: TrainingPlan { clip_norm: Some(10.0), ..TrainingPlan::default() },
            secure: Some(secure),
            ..RoundConfig::default()
        },
        history: 0,
        rng_seed: 11,
    }
}

fn fleet(
    cfg: OrchestratorConfig,
    strategy: Box<dyn Strategy>,
    clients: usize,
    fc: FleetConfig,
) -> Fleet<FakeTrainer> {
    let orch =
        Orchestrator::new(cfg, strategy, vec![0.0; shape().len()], ModelVersion(0), RoundId(1)).unwrap();
    let mut f = Fleet::new(orch, clients, FnTrainer::new(fake as _), fc);
    f.record_transcript(true);
    f
}

fn committed(events: &[RoundEvent]) -> Option<&CommittedRound> {
    events.iter().find_map(|e| match e {
        RoundEvent::Committed(c) => Some(&**c),
        _ => None,
    })
}

fn accepted(events: &[RoundEvent]) -> Vec<ClientId> {
    let mut v: Vec<ClientId> = events
        .iter()
        .filter_map(|e| match e {
            RoundEvent::UpdateAccepted { client, .. } => Some(*client),
            _ => None,
        })
        .collect();
    v.sort_unstable();
    v
}

/// Every upload in the fleet's transcript, decoded.
fn uploads(transcript: &[u8]) -> Vec<ClientMessage> {
    let codec = Codec::default();
    let mut out = Vec::new();
    let mut at = 0;
    while at < transcript.len() {
        let dir = transcript[at];
        let body = &transcript[at + 17..];
        let len = u32::from_le_bytes(body[..4].try_into().unwrap()) as usize + 4;
        if dir == b'U'
            && let Ok((Inbound::Message { message, .. }, _)) = codec.decode_client(&body[..len])
        {
            out.push(message);
        }
        at += 17 + len;
    }
    out
}

#[test]
fn a_secure_round_commits_the_mean_and_the_coordinator_sees_only_masked_vectors() {
    let mut f = fleet(config(20, 10, secure(8)), Box::new(Federated::fedavg()), 20, FleetConfig::default());
    let r = f.run_round().unwrap();
    let c = committed(&r.events).unwrap_or_else(|| panic!("round commits: {:?}", r.events.last()));
    let contributors = accepted(&r.events);
    assert_eq!(contributors.len(), 20, "everyone contributed");
    assert_eq!(c.stats.reported, 20);
    // Equal weights under secure aggregation: the plain mean of the updates, up to rounding
    // (each device rounds each coordinate by less than one step of 1/γ).
    let mut mean = vec![0.0f64; shape().len()];
    for cl in &contributors {
        for (m, v) in mean.iter_mut().zip(update_of(cl.0)) {
            *m += f64::from(v) / contributors.len() as f64;
        }
    }
    let err = c.model.iter().zip(&mean).map(|(a, b)| (f64::from(*a) - b).abs()).fold(0.0, f64::max);
    assert!(err < 1e-4, "committed model is the mean (max error {err})");
    // No update left any device in the clear; every device sent one masked vector.
    let ups = uploads(f.transcript());
    assert!(!ups.iter().any(|m| matches!(m, ClientMessage::Update(_))), "no plain update was sent");
    let masked =
        ups.iter().filter(|m| matches!(m, ClientMessage::SecAgg(SecAggClientMessage::Masked(_)))).count();
    assert_eq!(masked, 20);
    // Per-phase traffic is reported.
    for kind in [
        "secagg: key advertisement",
        "secagg: encrypted shares",
        "secagg: masked input",
        "secagg: unmasking shares",
    ] {
        assert!(r.traffic.get(kind).is_some_and(|(up, _)| *up > 0), "{kind} bytes: {:?}", r.traffic);
    }
    let stats = c.stats.secagg.as_ref().expect("secure stats");
    assert!(format!("{stats:?}").contains("bytes"), "{stats:?}");
}

#[test]
fn dropouts_during_training_leave_the_mean_of_the_survivors() {
    let fc = FleetConfig { dropout: 0.15, seed: 5, ..FleetConfig::default() };
    let mut f = fleet(config(30, 10, secure(30)), Box::new(Federated::fedavg()), 30, fc);
    let r = f.run_round().unwrap();
    let c = committed(&r.events).unwrap_or_else(|| panic!("round commits: {:?}", r.events.last()));
    let contributors = accepted(&r.events);
    assert!(contributors.len() < 30 && contributors.len() >= 21, "{} contributed", contributors.len());
    let mut mean = vec![0.0f64; shape().len()];
    for cl in &contributors {
        for (m, v) in mean.iter_mut().zip(update_of(cl.0)) {
            *m += f64::from(v) / contributors.len() as f64;
        }
    }
    let err = c.model.iter().zip(&mean).map(|(a, b)| (f64::from(*a) - b).abs()).fold(0.0, f64::max);
    assert!(err < 1e-4, "the mean over exactly the survivors (max error {err})");
}

#[test]
fn too_many_dropouts_abort_without_release_or_charge() {
    let fc = FleetConfig { dropout: 0.7, seed: 3, ..FleetConfig::default() };
    let dp = DpFedAvg::new(
        Federated::fedavg(),
        DpConfig {
            clip: ClipNorm::new(10.0).unwrap(),
            noise: NoiseMultiplier::new(1.0).unwrap(),
            expected_participants: 20,
            budget: Budget { epsilon: Epsilon::new(50.0).unwrap(), delta: Delta::new(1e-6).unwrap() },
            adaptive: None,
        },
    )
    .unwrap();
    let mut f = fleet(config(20, 10, secure(20)), Box::new(dp), 20, fc);
    f.orchestrator_mut().set_population(20);
    let r = f.run_round().unwrap();
    assert!(committed(&r.events).is_none(), "nothing released");
    let failed = r.events.iter().find_map(|e| match e {
        RoundEvent::Failed { reason, .. } => Some(reason.clone()),
        _ => None,
    });
    assert!(matches!(failed, Some(FailReason::SecureAggregation(_))), "{failed:?}");
    assert_eq!(f.orchestrator().model().0, ModelVersion(0), "model unchanged");
}

#[test]
fn distributed_dp_round_is_noised_by_the_devices_and_charged_at_sigma() {
    let sigma = 1.0;
    let dp = DpFedAvg::new(
        Federated::fedavg(),
        DpConfig {
            clip: ClipNorm::new(1.0).unwrap(),
            noise: NoiseMultiplier::new(sigma).unwrap(),
            expected_participants: 20,
            budget: Budget { epsilon: Epsilon::new(50.0).unwrap(), delta: Delta::new(1e-6).unwrap() },
            adaptive: None,
        },
    )
    .unwrap();
    let mut f = fleet(config(20, 10, secure(20)), Box::new(dp), 20, FleetConfig::default());
    f.orchestrator_mut().set_population(20);
    let r = f.run_round().unwrap();
    let c = committed(&r.events).unwrap_or_else(|| panic!("round commits: {:?}", r.events.last()));
    let charge = c.privacy.expect("the round is charged");
    assert_eq!(charge.sampling_rate, 1.0);
    assert!(
        charge.noise_multiplier <= sigma && charge.noise_multiplier > 0.99 * sigma,
        "charged at the distributed mechanism's multiplier: {}",
        charge.noise_multiplier
    );
    // The release carries noise of std ≥ σ·C / (q·N) = 1/20 per coordinate (the devices' share
    // for ⌈0.7·20⌉ = 14 survivors, so about 1.2× that with all 20): far above rounding error.
    let n = contributors_len(&r.events) as f64;
    let clipped_mean: Vec<f64> = {
        let mut m = vec![0.0f64; shape().len()];
        for cl in accepted(&r.events) {
            let u = update_of(cl.0);
            let norm = u.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            let k = (1.0 / norm).min(1.0);
            for (a, v) in m.iter_mut().zip(u) {
                *a += f64::from(v) * k / 20.0;
            }
        }
        m
    };
    let resid: Vec<f64> = c.model.iter().zip(&clipped_mean).map(|(a, b)| f64::from(*a) - b).collect();
    let sd = (resid.iter().map(|r| r * r).sum::<f64>() / resid.len() as f64).sqrt();
    let want = sigma * 1.0 / 20.0;
    assert!(n == 20.0, "all contributed");
    assert!(sd > 0.9 * want && sd < 1.6 * want, "noise std {sd} vs sigma*C/(qN) = {want}");
}

fn contributors_len(events: &[RoundEvent]) -> usize {
    accepted(events).len()
}

#[test]
fn a_plain_update_in_a_secure_round_is_refused() {
    use starling_proto::encoding::EncodedUpdate;
    use starling_proto::message::{
        CheckIn, ClientUpdate, CoordinatorMessage, DeviceConditions, RejectReason,
    };
    use starling_proto::time::Instant;
    let cfg = config(3, 2, secure(8));
    let mut o = Orchestrator::new(
        cfg,
        Box::new(Federated::fedavg()),
        vec![0.0; shape().len()],
        ModelVersion(0),
        RoundId(1),
    )
    .unwrap();
    let t0 = Instant::ZERO;
    o.start_round(t0).unwrap();
    for c in 0..3u64 {
        o.handle_message(
            t0,
            ClientId(c),
            ClientMessage::CheckIn(CheckIn {
                client: ClientId(c),
                credential: vec![],
                sdk_version: "t".into(),
                model_family: "test".into(),
                have_version: None,
                conditions: DeviceConditions {
                    charging: true,
                    unmetered: true,
                    idle: true,
                    battery_percent: 90,
                },
                capabilities: Default::default(),
            }),
        );
    }
    o.handle_timeout(t0 + Duration::from_secs(5));
    let tasks = std::iter::from_fn(|| o.poll_transmit())
        .filter(|t| matches!(&t.message, CoordinatorMessage::Task(task) if task.secure.is_some()))
        .count();
    assert_eq!(tasks, 3, "secure tasks went out");
    o.handle_message(
        t0,
        ClientId(1),
        ClientMessage::Update(ClientUpdate {
            round: RoundId(1),
            base_version: ModelVersion(0),
            update: EncodedUpdate::Dense { shape: shape(), values: update_of(1) },
            weight: 1.0,
            metrics: LocalMetrics::default(),
        }),
    );
    let reply = std::iter::from_fn(|| o.poll_transmit()).find(|t| t.to == ClientId(1)).expect("a reply");
    assert!(
        matches!(reply.message, CoordinatorMessage::Rejection { reason: RejectReason::SecAgg(_), .. }),
        "{reply:?}"
    );
}
