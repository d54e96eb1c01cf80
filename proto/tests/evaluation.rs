//! Federated evaluation: the round engine's evaluation rounds (exact sums, rejections, dropouts,
//! failures, refusals), DP-FedAvg's release and accounting, the session's evaluation path, and
//! the simulated fleet's `run_evaluation`.

use proptest::prelude::*;
use starling_proto::dp::strategy::{DpConfig, DpFedAvg};
use starling_proto::dp::{Budget, ClipNorm, Delta, Epsilon, NoiseMultiplier};
use starling_proto::harness::{Fleet, FleetConfig, TrainJob, TrainResult, Trainer};
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::*;
use starling_proto::round::*;
use starling_proto::session::{
    Session, SessionAction, SessionConfig, SessionError, SessionOutcome, TrainRequest,
};
use starling_proto::strategy::{AdmissionError, Federated, PrivacyCharge, RoundContext, Strategy};
use starling_proto::time::{Duration, Instant};
use starling_proto::update::{ModelShape, Update};
use std::sync::Arc;

fn shape() -> ModelShape {
    ModelShape::new(8, 2).unwrap()
}

fn model() -> Vec<f32> {
    (0..16).map(|i| i as f32 * 0.37 - 1.1).collect()
}

fn config(target: usize, min: usize) -> OrchestratorConfig {
    OrchestratorConfig {
        model_family: "test".into(),
        shape: shape(),
        round: RoundConfig {
            target_participants: target,
            over_selection: 1.0,
            min_reports: min,
            selection_pool: Some(target),
            selection_timeout: Duration::from_secs(5),
            report_timeout: Duration::from_secs(30),
            eligibility: Eligibility::any(),
            ..RoundConfig::default()
        },
        history: 2,
        rng_seed: 7,
    }
}

fn engine(cfg: OrchestratorConfig, strategy: Box<dyn Strategy>) -> Orchestrator {
    Orchestrator::new(cfg, strategy, model(), ModelVersion(3), RoundId(10)).unwrap()
}

fn conditions() -> DeviceConditions {
    DeviceConditions { charging: true, unmetered: true, idle: true, battery_percent: 80 }
}

fn check_in(o: &mut Orchestrator, now: Instant, client: u64) {
    let c = ClientMessage::CheckIn(CheckIn {
        client: ClientId(client),
        credential: vec![],
        sdk_version: "t".into(),
        model_family: "test".into(),
        have_version: None,
        conditions: conditions(),
        capabilities: Capabilities::default(),
    });
    o.handle_message(now, ClientId(client), c);
}

/// Checks in clients `1..=n` and returns the tasks they were sent (selection closes at the pool).
fn check_in_all(o: &mut Orchestrator, now: Instant, n: u64) -> Vec<(ClientId, Task)> {
    for c in 1..=n {
        check_in(o, now, c);
    }
    let mut tasks = Vec::new();
    while let Some(t) = o.poll_transmit() {
        if let CoordinatorMessage::Task(task) = t.message {
            tasks.push((t.to, task));
        }
    }
    tasks
}

fn report(round: RoundId, version: ModelVersion, m: (u32, f32, f32, f32)) -> ClientMessage {
    let metrics = EvalMetrics { cases: m.0, hits_at_10: m.1, ndcg_at_10: m.2, loss: m.3 };
    ClientMessage::Evaluation(EvalReport { round, base_version: version, metrics })
}

fn events(o: &mut Orchestrator) -> Vec<RoundEvent> {
    std::iter::from_fn(|| o.poll_event()).collect()
}

fn evaluated(events: &[RoundEvent]) -> Option<&EvaluatedRound> {
    events.iter().find_map(|e| match e {
        RoundEvent::Evaluated(ev) => Some(&**ev),
        _ => None,
    })
}

fn rejections(events: &[RoundEvent]) -> Vec<(u64, RejectReason)> {
    events
        .iter()
        .filter_map(|e| match e {
            RoundEvent::UpdateRejected { client, reason, .. } => Some((client.0, reason.clone())),
            _ => None,
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn evaluation_releases_exact_means_of_the_summed_reports_and_never_touches_the_model() {
    let mut o = engine(config(4, 2), Box::new(Federated::fedavg()));
    let before = bits(o.model().1);
    let now = Instant::from_millis(1);
    let round = o.start_evaluation(Instant::ZERO).unwrap();
    assert_eq!(round, RoundId(10));
    assert_eq!(o.current_kind(), Some(TaskKind::Evaluate));
    let tasks = check_in_all(&mut o, now, 4);
    assert_eq!(tasks.len(), 4);
    for (_, t) in &tasks {
        assert_eq!(t.kind, TaskKind::Evaluate);
        assert_eq!(t.secure, None);
        assert_eq!(t.model_version, ModelVersion(3));
        assert!(matches!(&t.model, ModelPayload::Full { values, .. } if bits(values) == before));
    }
    let figures = [(1, 1.0, 1.0, 0.5), (1, 0.0, 0.0, 2.0), (1, 1.0, 0.5, 1.0), (0, 0.0, 0.0, 0.0)];
    for (c, f) in (1..=4).zip(figures) {
        o.handle_message(now, ClientId(c), report(round, ModelVersion(3), f));
    }
    let ev = events(&mut o);
    let e = evaluated(&ev).expect("the round releases");
    assert_eq!(e.round, round);
    assert_eq!(e.version, ModelVersion(3));
    assert_eq!(e.privacy, None);
    assert_eq!(e.stats.reported, 4);
    let m = &e.metrics;
    assert_eq!(m.reports, 4);
    assert_eq!(m.cases, 3.0);
    assert!((m.hr_at_10 - 2.0 / 3.0).abs() < 1e-12);
    assert!((m.ndcg_at_10 - 0.5).abs() < 1e-12);
    assert!((m.loss - 3.5 / 3.0).abs() < 1e-12);
    assert_eq!(m.noise_std, None);
    // Receipts went to every reporter; the model and its version are exactly as before.
    let receipts = std::iter::from_fn(|| o.poll_transmit())
        .filter(|t| matches!(t.message, CoordinatorMessage::Receipt { .. }))
        .count();
    assert_eq!(receipts, 4);
    let (version, params) = o.model();
    assert_eq!(version, ModelVersion(3));
    assert_eq!(bits(params), before);
    assert_eq!(o.current_round(), None);
    // Round ids come from the same counter.
    assert_eq!(o.start_round(now).unwrap(), RoundId(11));
}

#[test]
fn bad_evaluation_reports_are_rejected_with_a_reason_and_leave_the_sums_untouched() {
    let mut o = engine(config(10, 1), Box::new(Federated::fedavg()));
    let now = Instant::from_millis(1);
    let round = o.start_evaluation(Instant::ZERO).unwrap();
    assert_eq!(check_in_all(&mut o, now, 10).len(), 10);
    let v = ModelVersion(3);
    o.handle_message(now, ClientId(1), report(round, v, (1, 1.0, 1.0, 1.0)));
    o.handle_message(now, ClientId(1), report(round, v, (1, 1.0, 1.0, 1.0))); // duplicate
    o.handle_message(now, ClientId(2), report(round, v, (1, f32::NAN, 0.0, 0.0)));
    o.handle_message(now, ClientId(3), report(round, v, (1, 2.0, 0.0, 0.0))); // hits > cases
    o.handle_message(now, ClientId(4), report(round, v, (1, 0.0, -0.1, 0.0)));
    o.handle_message(now, ClientId(5), report(round, v, (2, 2.0, 2.0, 2.0))); // two cases
    o.handle_message(now, ClientId(6), report(round, ModelVersion(2), (1, 1.0, 1.0, 1.0)));
    o.handle_message(now, ClientId(99), report(round, v, (1, 1.0, 1.0, 1.0))); // not selected
    o.handle_message(now, ClientId(7), report(RoundId(11), v, (1, 1.0, 1.0, 1.0))); // wrong round
    let update = ClientMessage::Update(ClientUpdate {
        round,
        base_version: v,
        update: starling_proto::encoding::EncodedUpdate::encode(
            &Update::sparse(shape(), vec![0], vec![1.0, 1.0]).unwrap(),
            starling_proto::encoding::EncodingKind::RowSparse,
            &mut rand::rng(),
        ),
        weight: 1.0,
        metrics: LocalMetrics::default(),
    });
    o.handle_message(now, ClientId(7), update); // an update in an evaluation round
    o.handle_message(now, ClientId(7), report(round, v, (1, 0.0, 0.0, 3.0)));
    o.handle_message(
        now,
        ClientId(8),
        ClientMessage::Withdraw { round, reason: WithdrawReason::TrainingFailed },
    );
    o.handle_message(now, ClientId(8), report(round, v, (1, 1.0, 1.0, 1.0))); // dropped out
    o.handle_disconnect(now, ClientId(9));
    o.handle_disconnect(now, ClientId(10));
    let ev = events(&mut o);
    let rejected = rejections(&ev);
    let reason =
        |c: u64| rejected.iter().filter(|(k, _)| *k == c).map(|(_, r)| r.clone()).collect::<Vec<_>>();
    assert_eq!(reason(1), vec![RejectReason::Duplicate]);
    for c in 2..=5 {
        assert!(matches!(reason(c).as_slice(), [RejectReason::Malformed(_)]), "client {c}: {:?}", reason(c));
    }
    assert_eq!(reason(6), vec![RejectReason::StaleVersion { expected: v, got: ModelVersion(2) }]);
    assert_eq!(reason(99), vec![RejectReason::NotSelected]);
    assert!(matches!(reason(7).as_slice(), [RejectReason::WrongRound, RejectReason::Refused(_)]));
    assert_eq!(reason(8), vec![RejectReason::Late]);
    let e = evaluated(&ev).expect("nobody left: the round closes");
    assert_eq!(e.stats.reported, 2);
    assert_eq!(e.stats.dropped, 3);
    let m = &e.metrics;
    assert_eq!((m.reports, m.cases), (2, 2.0));
    assert_eq!((m.hr_at_10, m.ndcg_at_10, m.loss), (0.5, 0.5, 2.0));
    // After the round, a report is late and changes nothing.
    o.handle_message(now, ClientId(2), report(round, v, (1, 1.0, 1.0, 1.0)));
    assert_eq!(rejections(&events(&mut o)), vec![(2, RejectReason::Late)]);
}

#[test]
fn an_evaluation_report_in_a_training_round_is_refused() {
    let mut o = engine(config(2, 1), Box::new(Federated::fedavg()));
    let now = Instant::from_millis(1);
    let round = o.start_round(Instant::ZERO).unwrap();
    let tasks = check_in_all(&mut o, now, 2);
    assert!(tasks.iter().all(|(_, t)| t.kind == TaskKind::Train));
    o.handle_message(now, ClientId(1), report(round, ModelVersion(3), (1, 1.0, 1.0, 1.0)));
    assert!(matches!(rejections(&events(&mut o)).as_slice(), [(1, RejectReason::Refused(_))]));
    assert_eq!(o.current_round(), Some(round), "nothing changed");
}

#[test]
fn an_evaluation_with_too_few_reports_fails_and_the_deadline_closes_it() {
    let mut o = engine(config(4, 3), Box::new(Federated::fedavg()));
    o.set_evaluation_target(Some(3)).unwrap();
    assert_eq!(o.set_evaluation_target(Some(0)), Err(ConfigError::NoTarget));
    let now = Instant::from_millis(1);
    let round = o.start_evaluation(Instant::ZERO).unwrap();
    // Four check in (the pool); the evaluation target picks three.
    let tasks = check_in_all(&mut o, now, 4);
    assert_eq!(tasks.len(), 3);
    let (a, b) = (tasks[0].0, tasks[1].0);
    o.handle_message(now, a, report(round, ModelVersion(3), (1, 1.0, 1.0, 1.0)));
    o.handle_disconnect(now, b);
    let deadline = o.poll_timeout().unwrap();
    o.handle_timeout(deadline);
    let ev = events(&mut o);
    assert!(evaluated(&ev).is_none());
    let failed = ev.iter().find_map(|e| match e {
        RoundEvent::Failed { reason, stats, .. } => Some((reason.clone(), stats.clone())),
        _ => None,
    });
    let (reason, stats) = failed.expect("fails");
    assert_eq!(reason, FailReason::TooFewReports { got: 1, needed: 3 });
    assert_eq!((stats.reported, stats.dropped, stats.unfinished), (1, 1, 1));
    assert_eq!(o.model().0, ModelVersion(3));
}

#[test]
fn evaluation_is_refused_under_secure_aggregation_and_local_dp_without_halting() {
    let mut cfg = config(4, 2);
    cfg.round.secure =
        Some(SecureAggregation { neighbours: 4, threshold: 3, ..SecureAggregation::default() });
    let mut o = engine(cfg, Box::new(Federated::fedavg()));
    assert!(matches!(o.start_evaluation(Instant::ZERO), Err(StartError::EvaluationUnsupported(_))));
    assert!(o.start_round(Instant::ZERO).is_ok(), "training is unaffected");

    let mut cfg = config(4, 2);
    cfg.round.plan.noise = NoiseSettings::Local { multiplier: 1.0 };
    let mut o = engine(cfg, Box::new(Federated::fedavg()));
    assert!(matches!(o.start_evaluation(Instant::ZERO), Err(StartError::EvaluationUnsupported(_))));
    assert!(o.start_round(Instant::ZERO).is_ok());
}

fn dp(sigma: f64, eps: f64) -> DpFedAvg<Federated> {
    DpFedAvg::new(
        Federated::fedavg(),
        DpConfig {
            clip: ClipNorm::new(1.0).unwrap(),
            noise: NoiseMultiplier::new(sigma).unwrap(),
            expected_participants: 40,
            budget: Budget { epsilon: Epsilon::new(eps).unwrap(), delta: Delta::new(1e-6).unwrap() },
            adaptive: None,
        },
    )
    .unwrap()
}

/// One DP evaluation round over 40 devices (q = 1), each reporting one case: a hit, NDCG 0.5,
/// loss 2.
fn dp_round(o: &mut Orchestrator, t0: Instant) -> EvaluatedRound {
    let round = o.start_evaluation(t0).unwrap();
    let now = t0 + Duration::from_millis(1);
    for c in 1..=40 {
        check_in(o, now, c);
    }
    let deadline = o.poll_timeout().unwrap();
    o.handle_timeout(deadline);
    while o.poll_transmit().is_some() {}
    for c in 1..=40 {
        o.handle_message(deadline, ClientId(c), report(round, ModelVersion(3), (1, 1.0, 0.5, 2.0)));
    }
    while o.poll_transmit().is_some() {}
    evaluated(&events(o)).expect("releases").clone()
}

#[test]
fn dp_evaluation_noise_has_standard_deviation_sigma_times_two_and_is_charged() {
    let sigma = 0.8;
    let mut cfg = config(40, 1);
    cfg.round.selection_pool = None;
    let mut o = engine(cfg, Box::new(dp(sigma, 1e9)));
    o.set_population(40);
    let before = bits(o.model().1);
    let n = 300;
    let mut cases = Vec::with_capacity(n);
    for i in 0..n {
        let e = dp_round(&mut o, Instant::from_micros(i as u64 * 100_000_000));
        assert_eq!(e.metrics.noise_std, Some(2.0 * sigma));
        assert_eq!(e.metrics.reports, 40);
        assert_eq!(e.privacy, Some(PrivacyCharge { sampling_rate: 1.0, noise_multiplier: sigma, steps: 1 }));
        assert!((0.0..=1.0).contains(&e.metrics.hr_at_10) && (0.0..=10.0).contains(&e.metrics.loss));
        cases.push(e.metrics.cases - 40.0);
    }
    let mean = cases.iter().sum::<f64>() / n as f64;
    let var = cases.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let std = var.sqrt();
    // 300 draws: the sample std is within ~12% of the truth with overwhelming probability.
    assert!((std - 2.0 * sigma).abs() < 0.2 * 2.0 * sigma, "std {std}, want {}", 2.0 * sigma);
    assert!(mean.abs() < 4.0 * 2.0 * sigma / (n as f64).sqrt(), "mean {mean}");
    assert_eq!(bits(o.model().1), before, "evaluation never moves the model");
    assert_eq!(o.model().0, ModelVersion(3));
}

fn ctx() -> RoundContext {
    RoundContext {
        round: RoundId(5),
        model_version: ModelVersion(4),
        shape: shape(),
        target_participants: 40,
        selected: 0,
        population: Some(1000),
        secure: false,
        quant: None,
    }
}

#[test]
fn dp_evaluation_is_admitted_against_the_budget_and_recorded_in_the_same_ledger() {
    let mut s = dp(1.0, 10.0);
    let noise = s.evaluation_release(&ctx()).unwrap().expect("noised under DP");
    assert_eq!(noise.std, 2.0);
    assert_eq!(noise.charge, PrivacyCharge { sampling_rate: 0.04, noise_multiplier: 1.0, steps: 1 });
    assert!(s.ledger().entries().is_empty(), "admission charges nothing");
    s.record_evaluation(&ctx(), &noise.charge);
    assert_eq!(s.ledger().entries().len(), 1);
    assert!(s.ledger().spent() > 0.0);
    // The same release as a training round's on the same mechanism: same ε.
    let mut t = dp(1.0, 10.0);
    let q = t.sampling_rate(Some(1000)).unwrap();
    assert_eq!(t.evaluation_mechanism(q), t.mechanism(shape().len(), q));
    // A budget that cannot afford the release refuses it.
    let mut tight = dp(0.3, 0.01);
    assert!(matches!(tight.evaluation_release(&ctx()), Err(AdmissionError::BudgetExhausted { .. })));
    let mut unknown = ctx();
    unknown.population = None;
    assert_eq!(t.evaluation_release(&unknown).unwrap_err(), AdmissionError::UnknownPopulation);
    let mut secure = ctx();
    secure.secure = true;
    assert!(t.evaluation_release(&secure).is_err());
    // Without DP the sums are released exactly.
    assert!(Federated::fedavg().evaluation_release(&ctx()).unwrap().is_none());
}

#[test]
fn an_evaluation_the_budget_cannot_afford_is_refused_without_halting_the_engine() {
    let mut o = engine(config(40, 1), Box::new(dp(0.3, 0.01)));
    o.set_population(1000);
    let refused = o.start_evaluation(Instant::ZERO);
    assert!(matches!(refused, Err(StartError::Refused(AdmissionError::BudgetExhausted { .. }))));
    assert_eq!(o.current_round(), None);
    assert_eq!(o.next_round_id(), RoundId(10), "no id was used");
    // Not halted: the next training round is judged on its own admission (here the same
    // mechanism, so it is refused too, as a budget refusal and not as a halt).
    assert!(matches!(o.start_round(Instant::ZERO), Err(StartError::Refused(_))));
    assert!(matches!(o.start_round(Instant::ZERO), Err(StartError::Halted(_))));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn arbitrary_evaluation_figures_never_panic_and_are_accepted_iff_possible(
        cases in 0u32..4,
        hits in prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(-0.0f32), -2.0f32..3.0],
        ndcg in prop_oneof![Just(f32::NAN), Just(f32::NEG_INFINITY), -2.0f32..3.0],
        loss in prop_oneof![Just(f32::NAN), Just(1e30f32), -1.0f32..25.0],
    ) {
        let mut o = engine(config(1, 1), Box::new(Federated::fedavg()));
        let round = o.start_evaluation(Instant::ZERO).unwrap();
        let now = Instant::from_millis(1);
        check_in_all(&mut o, now, 1);
        let m = EvalMetrics { cases, hits_at_10: hits, ndcg_at_10: ndcg, loss };
        o.handle_message(now, ClientId(1), ClientMessage::Evaluation(EvalReport {
            round, base_version: ModelVersion(3), metrics: m,
        }));
        let ev = events(&mut o);
        let valid = m.is_valid() && cases <= MAX_EVAL_CASES;
        match evaluated(&ev) {
            Some(e) => {
                prop_assert!(valid);
                prop_assert_eq!(e.metrics.cases, f64::from(cases));
                prop_assert!(e.metrics.hr_at_10.is_finite() && e.metrics.loss.is_finite());
            }
            None => prop_assert!(!valid),
        }
    }
}

// ---- the session ----

fn session() -> Session {
    Session::new(SessionConfig {
        client: ClientId(1),
        credential: vec![],
        sdk_version: "t".into(),
        model_family: "test".into(),
        capabilities: Capabilities::default(),
        response_timeout: Duration::from_secs(5),
        rng_seed: 1,
        secagg: Default::default(),
    })
}

fn task(kind: TaskKind) -> Task {
    Task {
        round: RoundId(4),
        model_version: ModelVersion(2),
        model: ModelPayload::Full { shape: shape(), values: model().into() },
        plan: TrainingPlan::default(),
        report_within_ms: 10_000,
        secure: None,
        kind,
    }
}

fn given(kind: TaskKind) -> (Session, Box<TrainRequest>) {
    let mut s = session();
    s.check_in(Instant::ZERO, conditions(), None).unwrap();
    while s.poll_transmit().is_some() {}
    s.handle_message(Instant::from_millis(1), CoordinatorMessage::Task(task(kind)));
    let Some(SessionAction::Train(req)) = s.poll_action() else { panic!("a task action") };
    (s, req)
}

#[test]
fn session_sends_the_evaluation_report_of_an_evaluation_task() {
    let (mut s, req) = given(TaskKind::Evaluate);
    assert_eq!(req.kind, TaskKind::Evaluate);
    let m = EvalMetrics { cases: 1, hits_at_10: 1.0, ndcg_at_10: 0.63, loss: 0.7 };
    s.submit_evaluation(Instant::from_millis(2), RoundId(4), m).unwrap();
    assert_eq!(
        s.poll_transmit(),
        Some(ClientMessage::Evaluation(EvalReport {
            round: RoundId(4),
            base_version: ModelVersion(2),
            metrics: m
        }))
    );
    s.handle_message(Instant::from_millis(3), CoordinatorMessage::Receipt { round: RoundId(4) });
    let finished = std::iter::from_fn(|| s.poll_action())
        .any(|a| matches!(a, SessionAction::Finished(SessionOutcome::Accepted { .. })));
    assert!(finished);
}

#[test]
fn session_refuses_the_wrong_kind_of_answer_invalid_figures_and_late_reports() {
    let (mut s, _) = given(TaskKind::Evaluate);
    let now = Instant::from_millis(2);
    let update = starling_proto::encoding::EncodedUpdate::encode(
        &Update::sparse(shape(), vec![0], vec![1.0, 1.0]).unwrap(),
        starling_proto::encoding::EncodingKind::RowSparse,
        &mut rand::rng(),
    );
    assert_eq!(
        s.submit_update(now, RoundId(4), update, 1.0, LocalMetrics::default()),
        Err(SessionError::WrongTaskKind { expected: TaskKind::Evaluate })
    );
    let bad = EvalMetrics { cases: 0, hits_at_10: 1.0, ndcg_at_10: 0.0, loss: 0.0 };
    assert_eq!(s.submit_evaluation(now, RoundId(4), bad), Err(SessionError::InvalidEvaluation));
    assert_eq!(s.poll_transmit(), None, "nothing was sent");
    let good = EvalMetrics { cases: 1, hits_at_10: 0.0, ndcg_at_10: 0.0, loss: 1.0 };
    assert_eq!(s.submit_evaluation(now, RoundId(5), good), Err(SessionError::NoTask));
    let late = Instant::from_millis(1) + Duration::from_millis(10_001);
    assert_eq!(s.submit_evaluation(late, RoundId(4), good), Err(SessionError::DeadlineMissed(RoundId(4))));

    let (mut s, _) = given(TaskKind::Train);
    assert_eq!(
        s.submit_evaluation(now, RoundId(4), good),
        Err(SessionError::WrongTaskKind { expected: TaskKind::Train })
    );
}

#[test]
fn a_secure_evaluation_task_is_a_protocol_violation() {
    let mut s = session();
    s.check_in(Instant::ZERO, conditions(), None).unwrap();
    let mut t = task(TaskKind::Evaluate);
    // Any secure part will do: the session refuses before looking at it.
    t.secure = Some(SecureTask {
        params: starling_proto::secagg::SecAggParams { neighbours: 2, threshold: 2, bits: 32, len: 16 },
        quant: starling_proto::dp::distributed::QuantPlan {
            clip: 1.0,
            scale: 1.0,
            bits: 32,
            dim: 16,
            padded_dim: 16,
            rotation_seed: None,
            noise_multiplier: 0.0,
            cohort: 3,
            min_survivors: 2,
            device_noise_std: 0.0,
            noise_bound: 0,
        },
    });
    s.handle_message(Instant::from_millis(1), CoordinatorMessage::Task(t));
    let violation = std::iter::from_fn(|| s.poll_action())
        .any(|a| matches!(a, SessionAction::Finished(SessionOutcome::ProtocolViolation(_))));
    assert!(violation);
}

// ---- the fleet ----

/// Trains nothing useful; evaluates with figures that depend on the client id.
struct Evaluating {
    evaluate: bool,
}

fn figures(c: ClientId) -> EvalMetrics {
    let hit = (c.0 % 2) as f32;
    EvalMetrics { cases: 1, hits_at_10: hit, ndcg_at_10: hit * 0.5, loss: (c.0 % 4) as f32 }
}

impl Trainer for Evaluating {
    fn compute_time(&mut self, client: ClientId, _request: &TrainRequest, _params: &Arc<[f32]>) -> Duration {
        Duration::from_millis(100 + client.0 * 10)
    }

    fn train(&mut self, jobs: &[TrainJob]) -> Vec<Option<TrainResult>> {
        jobs.iter()
            .map(|j| {
                let row = (j.client.0 % 8) as u32;
                Some(TrainResult {
                    update: Update::sparse(shape(), vec![row], vec![0.01, 0.01]).unwrap(),
                    weight: 1.0,
                    metrics: LocalMetrics::default(),
                })
            })
            .collect()
    }

    fn evaluate(&mut self, jobs: &[TrainJob]) -> Vec<Option<EvalMetrics>> {
        assert!(jobs.iter().all(|j| j.request.kind == TaskKind::Evaluate && j.params.len() == 16));
        jobs.iter().map(|j| self.evaluate.then(|| figures(j.client))).collect()
    }
}

#[test]
fn the_fleet_runs_an_evaluation_round_over_the_simulated_network() {
    let mut cfg = config(6, 3);
    cfg.round.selection_pool = None;
    let o =
        Orchestrator::new(cfg, Box::new(Federated::fedavg()), model(), ModelVersion(0), RoundId(1)).unwrap();
    let mut fleet = Fleet::new(o, 12, Evaluating { evaluate: true }, FleetConfig::default());
    assert!(fleet.run_round().unwrap().committed());
    let (version, params) = fleet.orchestrator().model();
    let (version, params) = (version, bits(params));
    let r = fleet.run_evaluation().unwrap();
    assert!(!r.committed());
    let m = r.evaluation.clone().expect("released");
    let reporters: Vec<ClientId> = r
        .events
        .iter()
        .filter_map(|e| match e {
            RoundEvent::UpdateAccepted { client, .. } => Some(*client),
            _ => None,
        })
        .collect();
    assert_eq!(reporters.len(), 6);
    assert_eq!(m.reports, 6);
    let hits: f64 = reporters.iter().map(|c| f64::from(figures(*c).hits_at_10)).sum();
    let loss: f64 = reporters.iter().map(|c| f64::from(figures(*c).loss)).sum();
    assert_eq!(m.cases, 6.0);
    assert!((m.hr_at_10 - hits / 6.0).abs() < 1e-12);
    assert!((m.ndcg_at_10 - hits * 0.5 / 6.0).abs() < 1e-12);
    assert!((m.loss - loss / 6.0).abs() < 1e-12);
    assert!(r.traffic.contains_key("evaluation") && r.bytes_up > 0 && r.bytes_down > 0);
    assert_eq!(fleet.orchestrator().model().0, version);
    assert_eq!(bits(fleet.orchestrator().model().1), params);
    // Training goes on afterwards, from the same model.
    assert!(fleet.run_round().unwrap().committed());
}

#[test]
fn fleet_evaluation_survives_dropouts_and_fails_when_nobody_can_evaluate() {
    let mut cfg = config(10, 3);
    cfg.round.selection_pool = None;
    cfg.round.over_selection = 1.5;
    let o =
        Orchestrator::new(cfg.clone(), Box::new(Federated::fedavg()), model(), ModelVersion(0), RoundId(1))
            .unwrap();
    let fc = FleetConfig { dropout: 0.3, seed: 5, ..FleetConfig::default() };
    let mut fleet = Fleet::new(o, 30, Evaluating { evaluate: true }, fc);
    let r = fleet.run_evaluation().unwrap();
    let e = evaluated(&r.events).expect("releases despite dropouts");
    assert!(e.stats.dropped > 0, "{:?}", e.stats);
    assert_eq!(e.metrics.reports, e.stats.reported);

    // The default `Trainer::evaluate` answers nothing: every client withdraws.
    let o =
        Orchestrator::new(cfg, Box::new(Federated::fedavg()), model(), ModelVersion(0), RoundId(1)).unwrap();
    let mut fleet = Fleet::new(o, 20, Evaluating { evaluate: false }, FleetConfig::default());
    let r = fleet.run_evaluation().unwrap();
    assert!(r.evaluation.is_none());
    assert!(
        r.events
            .iter()
            .any(|e| matches!(e, RoundEvent::Failed { reason: FailReason::TooFewReports { .. }, .. }))
    );
}
