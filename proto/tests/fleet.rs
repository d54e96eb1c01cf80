//! Deterministic fleet tests of the round engine and the session machine on a virtual clock.

use starling_proto::codec::{Codec, Inbound};
use starling_proto::encoding::{EncodedUpdate, EncodingKind};
use starling_proto::harness::{Availability, Fleet, FleetConfig, FnTrainer, PerClient, TrainResult};
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::*;
use starling_proto::round::*;
use starling_proto::session::{
    Session, SessionAction, SessionConfig, SessionError, SessionOutcome, TrainRequest,
};
use starling_proto::strategy::{
    AdmissionError, Aggregate, AggregateError, Aggregator, Federated, RoundContext, Strategy,
};
use starling_proto::time::{Duration, Instant};
use starling_proto::update::{ModelShape, Update};
use std::collections::BTreeMap;

const ROWS: u32 = 8;
const ROW_LEN: u32 = 2;

fn shape() -> ModelShape {
    ModelShape::new(ROWS, ROW_LEN).unwrap()
}

fn config(target: usize, min: usize) -> OrchestratorConfig {
    OrchestratorConfig {
        model_family: "test".into(),
        shape: shape(),
        round: RoundConfig {
            target_participants: target,
            over_selection: 1.3,
            min_reports: min,
            selection_pool: None,
            selection_timeout: Duration::from_secs(5),
            report_timeout: Duration::from_secs(30),
            eligibility: Eligibility::default(),
            plan: TrainingPlan::default(),
            ..RoundConfig::default()
        },
        history: 2,
        rng_seed: 7,
    }
}

fn orch_with(cfg: OrchestratorConfig, strategy: Box<dyn Strategy>) -> Orchestrator {
    Orchestrator::new(cfg, strategy, vec![0.0; shape().len()], ModelVersion(0), RoundId(1)).unwrap()
}

fn orchestrator(target: usize, min: usize) -> Orchestrator {
    orch_with(config(target, min), Box::new(Federated::fedavg()))
}

/// Client i touches row i % ROWS with values [i, 1], weight 1 + i % 3, training takes (1 + i % 5) s.
fn fake(client: ClientId, _req: &TrainRequest, _params: &[f32]) -> Option<(TrainResult, Duration)> {
    let i = client.0;
    let result = TrainResult {
        update: Update::sparse(shape(), vec![(i % u64::from(ROWS)) as u32], vec![i as f32, 1.0]).unwrap(),
        weight: (1 + i % 3) as f32,
        metrics: LocalMetrics { loss: 0.5, hit_rate_at_10: None, train_ms: 1, norm_within_clip: None },
    };
    Some((result, Duration::from_secs(1 + i % 5)))
}

type FakeTrainer = FnTrainer<fn(ClientId, &TrainRequest, &[f32]) -> Option<(TrainResult, Duration)>>;

fn fake_trainer() -> FakeTrainer {
    FnTrainer::new(fake)
}

fn expected_fedavg(accepted: &[ClientId]) -> Vec<f32> {
    let mut acc = vec![0.0f64; shape().len()];
    let mut total = 0.0;
    for c in accepted {
        let i = c.0;
        let w = (1 + i % 3) as f64;
        let row = (i % u64::from(ROWS)) as usize;
        acc[row * 2] += w * i as f64;
        acc[row * 2 + 1] += w;
        total += w;
    }
    acc.iter().map(|a| (a / total) as f32).collect()
}

fn accepted(events: &[RoundEvent]) -> Vec<ClientId> {
    events
        .iter()
        .filter_map(|e| match e {
            RoundEvent::UpdateAccepted { client, .. } => Some(*client),
            _ => None,
        })
        .collect()
}

fn committed(events: &[RoundEvent]) -> Option<&CommittedRound> {
    events.iter().find_map(|e| match e {
        RoundEvent::Committed(c) => Some(&**c),
        _ => None,
    })
}

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

fn check_in_msg(client: u64, family: &str, conditions: DeviceConditions, cred: &[u8]) -> ClientMessage {
    ClientMessage::CheckIn(CheckIn {
        client: ClientId(client),
        credential: cred.to_vec(),
        sdk_version: "t".into(),
        model_family: family.into(),
        have_version: None,
        conditions,
        capabilities: Capabilities::default(),
    })
}

fn good_conditions() -> DeviceConditions {
    DeviceConditions { charging: true, unmetered: true, idle: true, battery_percent: 50 }
}

#[test]
fn round_commits_fedavg_of_accepted_updates_and_aborts_extras() {
    let mut fleet = Fleet::new(orchestrator(10, 5), 30, fake_trainer(), FleetConfig::default());
    let r = fleet.run_round().unwrap();
    let c = committed(&r.events).expect("round commits");
    assert_eq!(c.version, ModelVersion(1));
    assert_eq!(c.stats.candidates, 30);
    assert_eq!(c.stats.selected, 13, "ceil(10 * 1.3) selected");
    assert_eq!(c.stats.reported, 10, "closes at the target");
    assert_eq!(c.stats.unfinished, 3);
    let acc = accepted(&r.events);
    assert_eq!(acc.len(), 10);
    assert_eq!(&*c.model, expected_fedavg(&acc).as_slice());
    // Everyone's session ended: 10 accepted, 3 aborted (round full), 17 told to come back.
    let mut kinds = BTreeMap::new();
    for (_, o) in &r.outcomes {
        let k = match o {
            SessionOutcome::Accepted { .. } => "accepted",
            SessionOutcome::Aborted { reason: AbortReason::RoundFull, .. } => "aborted",
            SessionOutcome::ComeBackAt { .. } => "come back",
            other => panic!("unexpected outcome {other:?}"),
        };
        *kinds.entry(k).or_insert(0) += 1;
    }
    assert_eq!(kinds, BTreeMap::from([("aborted", 3), ("accepted", 10), ("come back", 17)]));
    assert!(r.bytes_up > 0 && r.bytes_down > 0);
}

#[test]
fn second_round_ships_a_patch_to_clients_holding_the_previous_version() {
    let mut cfg = config(3, 2);
    cfg.round.over_selection = 1.0;
    let orch =
        Orchestrator::new(cfg, Box::new(Federated::fedavg()), vec![0.5; 16], ModelVersion(0), RoundId(1))
            .unwrap();
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let s2 = seen.clone();
    let trainer = move |c: ClientId, req: &TrainRequest, params: &[f32]| {
        s2.borrow_mut().push((req.round, matches!(req.model, ModelPayload::Patch { .. }), params.to_vec()));
        fake(c, req, params)
    };
    // Three clients touch three of eight rows: the patch is smaller than the model.
    let mut fleet = Fleet::new(orch, 3, FnTrainer::new(trainer), FleetConfig::default());
    let r1 = fleet.run_round().unwrap();
    let model1 = committed(&r1.events).unwrap().model.to_vec();
    assert!(fleet.run_round().unwrap().committed());
    let seen = seen.borrow();
    let round2: Vec<_> = seen.iter().filter(|(r, _, _)| *r == RoundId(2)).collect();
    assert_eq!(round2.len(), 3);
    for (_, patched, params) in round2 {
        assert!(*patched, "clients that trained in round 1 get a patch");
        assert_eq!(params, &model1, "the patch reproduces the model exactly");
    }
}

#[test]
fn dropouts_still_commit_when_enough_report() {
    let fc = FleetConfig { dropout: 0.3, seed: 3, ..FleetConfig::default() };
    let mut fleet = Fleet::new(orchestrator(20, 5), 40, fake_trainer(), fc);
    let r = fleet.run_round().unwrap();
    let c = committed(&r.events).expect("commits despite dropouts");
    assert!(c.stats.dropped > 0, "some clients dropped: {:?}", c.stats);
    assert_eq!(&*c.model, expected_fedavg(&accepted(&r.events)).as_slice());
}

#[test]
fn too_few_reports_fails_and_leaves_the_model_unchanged() {
    let fc = FleetConfig { dropout: 1.0, ..FleetConfig::default() };
    let mut fleet = Fleet::new(orchestrator(10, 5), 20, fake_trainer(), fc);
    let r = fleet.run_round().unwrap();
    let failed = r.events.iter().find_map(|e| match e {
        RoundEvent::Failed { reason, .. } => Some(reason.clone()),
        _ => None,
    });
    assert_eq!(failed, Some(FailReason::TooFewReports { got: 0, needed: 5 }));
    let (v, m) = fleet.orchestrator().model();
    assert_eq!(v, ModelVersion(0));
    assert!(m.iter().all(|&x| x == 0.0));
    assert_eq!(fleet.orchestrator().phase(), Phase::Failed);
}

#[test]
fn too_few_check_ins_fails_selection() {
    let mut fleet = Fleet::new(orchestrator(10, 5), 3, fake_trainer(), FleetConfig::default());
    let r = fleet.run_round().unwrap();
    let failed = r.events.iter().find_map(|e| match e {
        RoundEvent::Failed { reason, .. } => Some(reason.clone()),
        _ => None,
    });
    assert_eq!(failed, Some(FailReason::TooFewCheckIns { got: 3, needed: 5 }));
    assert!(r.outcomes.iter().all(|(_, o)| matches!(o, SessionOutcome::ComeBackAt { .. })));
}

#[test]
fn stragglers_past_the_deadline_miss_it_and_the_round_commits_with_the_rest() {
    let mut cfg = config(10, 3);
    cfg.round.report_timeout = Duration::from_millis(2500);
    let mut fleet =
        Fleet::new(orch_with(cfg, Box::new(Federated::fedavg())), 10, fake_trainer(), FleetConfig::default());
    let r = fleet.run_round().unwrap();
    let c = committed(&r.events).expect("commits with the fast clients");
    // compute = 1 + i%5 seconds: only i%5 in {0,1} finish within 2.5 s.
    assert_eq!(c.stats.reported, 4);
    assert_eq!(c.stats.unfinished, 6);
    assert_eq!(&*c.model, expected_fedavg(&accepted(&r.events)).as_slice());
    let missed = r
        .outcomes
        .iter()
        .filter(|(_, o)| matches!(o, SessionOutcome::Aborted { .. } | SessionOutcome::DeadlineMissed { .. }))
        .count();
    assert_eq!(missed, 6);
}

#[test]
fn ineligible_wrong_family_and_unauthenticated_check_ins_are_refused() {
    let mut o = orchestrator(2, 1);
    o.set_authenticator(|c, cred| c.0 != 99 && cred == b"ok");
    o.start_round(Instant::ZERO).unwrap();
    let t = Instant::from_millis(1);
    let not_charging = DeviceConditions { charging: false, ..good_conditions() };
    o.handle_message(t, ClientId(1), check_in_msg(1, "test", not_charging, b"ok"));
    o.handle_message(t, ClientId(2), check_in_msg(2, "other", good_conditions(), b"ok"));
    o.handle_message(t, ClientId(99), check_in_msg(99, "test", good_conditions(), b"ok"));
    o.handle_message(t, ClientId(3), check_in_msg(3, "test", good_conditions(), b"bad"));
    o.handle_message(t, ClientId(4), check_in_msg(5, "test", good_conditions(), b"ok"));
    o.handle_message(t, ClientId(6), check_in_msg(6, "test", good_conditions(), b"ok"));
    o.handle_message(t, ClientId(6), check_in_msg(6, "test", good_conditions(), b"ok"));
    let refusals: Vec<(ClientId, CoordinatorMessage)> =
        std::iter::from_fn(|| o.poll_transmit()).map(|t| (t.to, t.message)).collect();
    assert_eq!(
        refusals,
        vec![
            (ClientId(1), CoordinatorMessage::Refusal(Refusal::NotEligible)),
            (ClientId(2), CoordinatorMessage::Refusal(Refusal::WrongModelFamily { expected: "test".into() })),
            (ClientId(99), CoordinatorMessage::Refusal(Refusal::Unauthenticated)),
            (ClientId(3), CoordinatorMessage::Refusal(Refusal::Unauthenticated)),
            (ClientId(4), CoordinatorMessage::Refusal(Refusal::Unauthenticated)),
            (ClientId(6), CoordinatorMessage::Refusal(Refusal::AlreadyCheckedIn)),
        ]
    );
}

/// Drives a round by hand to the collecting phase with clients 1..=n selected.
fn collecting(n: u64, target: usize) -> Orchestrator {
    let mut cfg = config(target, 1);
    cfg.round.over_selection = 1.0;
    cfg.round.eligibility = Eligibility::any();
    cfg.round.selection_pool = Some(n as usize);
    let mut o = orch_with(cfg, Box::new(Federated::fedavg()));
    o.start_round(Instant::ZERO).unwrap();
    for c in 1..=n {
        o.handle_message(
            Instant::from_millis(1),
            ClientId(c),
            check_in_msg(c, "test", DeviceConditions::default(), b""),
        );
    }
    assert_eq!(o.phase(), Phase::Collecting);
    while o.poll_transmit().is_some() {}
    while o.poll_event().is_some() {}
    o
}

fn update_msg(round: u64, base: u64, update: EncodedUpdate, weight: f32) -> ClientMessage {
    ClientMessage::Update(ClientUpdate {
        round: RoundId(round),
        base_version: ModelVersion(base),
        update,
        weight,
        metrics: LocalMetrics::default(),
    })
}

fn sparse(rows: Vec<u32>, values: Vec<f32>) -> EncodedUpdate {
    EncodedUpdate::RowSparse { shape: shape(), rows, values }
}

fn last_reply(o: &mut Orchestrator) -> CoordinatorMessage {
    std::iter::from_fn(|| o.poll_transmit()).last().expect("a reply").message
}

#[test]
fn bad_updates_are_rejected_with_reasons_and_never_touch_the_aggregate() {
    let mut o = collecting(4, 4);
    let t = Instant::from_millis(10);
    let good = || sparse(vec![1], vec![2.0, 2.0]);
    let wrong_shape = EncodedUpdate::Dense { shape: ModelShape::new(2, 2).unwrap(), values: vec![0.0; 4] };
    let cases: Vec<(u64, ClientMessage, Option<RejectReason>)> = vec![
        (9, update_msg(1, 0, good(), 1.0), Some(RejectReason::NotSelected)),
        (1, update_msg(2, 0, good(), 1.0), Some(RejectReason::WrongRound)),
        (1, update_msg(0, 0, good(), 1.0), Some(RejectReason::Late)),
        (1, update_msg(1, 0, sparse(vec![1], vec![f32::NAN, 0.0]), 1.0), None),
        (2, update_msg(1, 0, wrong_shape, 1.0), None),
        (
            3,
            update_msg(1, 5, good(), 1.0),
            Some(RejectReason::StaleVersion { expected: ModelVersion(0), got: ModelVersion(5) }),
        ),
        (4, update_msg(1, 0, good(), f32::INFINITY), Some(RejectReason::InvalidWeight)),
    ];
    for (client, msg, want) in cases {
        o.handle_message(t, ClientId(client), msg);
        match (last_reply(&mut o), want) {
            (CoordinatorMessage::Rejection { reason: RejectReason::Malformed(text), .. }, None) => {
                assert!(!text.is_empty())
            }
            (CoordinatorMessage::Rejection { reason, .. }, Some(want)) => assert_eq!(reason, want),
            (other, want) => panic!("expected a rejection {want:?}, got {other:?}"),
        }
    }
    // Every selected client was rejected once, so the round ended with no reports: failed, model unchanged.
    assert_eq!(o.phase(), Phase::Failed);
    assert_eq!(o.model().0, ModelVersion(0));
    assert!(o.model().1.iter().all(|&x| x == 0.0));
}

#[test]
fn duplicate_update_is_rejected_and_counted_once() {
    let mut o = collecting(3, 3);
    let t = Instant::from_millis(10);
    o.handle_message(t, ClientId(1), update_msg(1, 0, sparse(vec![0], vec![3.0, 3.0]), 1.0));
    assert_eq!(last_reply(&mut o), CoordinatorMessage::Receipt { round: RoundId(1) });
    o.handle_message(t, ClientId(1), update_msg(1, 0, sparse(vec![0], vec![100.0, 100.0]), 1.0));
    assert_eq!(
        last_reply(&mut o),
        CoordinatorMessage::Rejection { round: RoundId(1), reason: RejectReason::Duplicate }
    );
    o.handle_message(t, ClientId(2), update_msg(1, 0, sparse(vec![0], vec![1.0, 1.0]), 1.0));
    o.handle_disconnect(t, ClientId(3));
    let c = std::iter::from_fn(|| o.poll_event())
        .find_map(|e| match e {
            RoundEvent::Committed(c) => Some(c),
            _ => None,
        })
        .expect("commits once everyone reported or dropped");
    assert_eq!(c.stats.reported, 2);
    assert_eq!(c.stats.dropped, 1);
    assert_eq!(&c.model[..2], &[2.0, 2.0], "mean of 3 and 1; the duplicate's 100 never counted");
    o.handle_message(t, ClientId(3), update_msg(1, 0, sparse(vec![0], vec![1.0, 1.0]), 1.0));
    assert_eq!(
        last_reply(&mut o),
        CoordinatorMessage::Rejection { round: RoundId(1), reason: RejectReason::Late }
    );
}

#[test]
fn same_seed_gives_byte_identical_runs_and_another_seed_differs() {
    let run = |seed: u64| {
        let mut cfg = config(10, 5);
        cfg.rng_seed = seed;
        cfg.round.plan.encoding = EncodingKind::Quantized8;
        let fc = FleetConfig { seed, dropout: 0.2, ..FleetConfig::default() };
        let mut fleet = Fleet::new(orch_with(cfg, Box::new(Federated::fedavg())), 25, fake_trainer(), fc);
        fleet.record_transcript(true);
        for _ in 0..3 {
            fleet.run_round().unwrap();
        }
        (fleet.transcript().to_vec(), fleet.orchestrator().model().1.to_vec())
    };
    let (a, ma) = run(11);
    let (b, mb) = run(11);
    assert!(!a.is_empty());
    assert_eq!(a, b);
    assert_eq!(ma, mb);
    let (c, _) = run(12);
    assert_ne!(a, c);
}

#[test]
fn come_back_at_is_spread_and_enforced_by_the_session() {
    let mut fleet = Fleet::new(orchestrator(2, 1), 10, fake_trainer(), FleetConfig::default());
    let r = fleet.run_round().unwrap();
    let mut times: Vec<Instant> = r
        .outcomes
        .iter()
        .filter_map(|(_, o)| match o {
            SessionOutcome::ComeBackAt { at } => Some(*at),
            _ => None,
        })
        .collect();
    assert_eq!(times.len(), 7);
    times.sort();
    times.dedup();
    assert!(times.len() > 1, "return times are spread over the window");
    let mut s = session();
    s.check_in(Instant::ZERO, DeviceConditions::default(), None).unwrap();
    s.handle_message(
        Instant::ZERO,
        CoordinatorMessage::ComeBackAt(ComeBackAt { after_ms: 1000, window_ms: 0 }),
    );
    assert_eq!(
        s.check_in(Instant::from_millis(999), DeviceConditions::default(), None),
        Err(SessionError::TooEarly { at: Instant::from_millis(1000) })
    );
    assert!(s.check_in(Instant::from_millis(1000), DeviceConditions::default(), None).is_ok());
}

/// A strategy whose budget allows `left` more rounds.
struct Budgeted {
    inner: Federated,
    left: u32,
}

impl Strategy for Budgeted {
    fn name(&self) -> String {
        "budgeted".into()
    }
    fn admit(&mut self, _ctx: &RoundContext) -> Result<(), AdmissionError> {
        if self.left == 0 {
            return Err(AdmissionError::BudgetExhausted {
                projected_epsilon: 9.0,
                budget_epsilon: 8.0,
                delta: 1e-5,
            });
        }
        self.left -= 1;
        Ok(())
    }
    fn aggregator(&mut self, ctx: &RoundContext) -> Box<dyn Aggregator> {
        self.inner.aggregator(ctx)
    }
    fn apply(&mut self, ctx: &RoundContext, global: &mut [f32], a: &Aggregate) -> Result<(), AggregateError> {
        self.inner.apply(ctx, global, a)
    }
}

#[test]
fn exhausted_budget_refuses_the_round_and_later_check_ins() {
    let s = Budgeted { inner: Federated::fedavg(), left: 1 };
    let mut fleet =
        Fleet::new(orch_with(config(3, 2), Box::new(s)), 5, fake_trainer(), FleetConfig::default());
    assert!(fleet.run_round().unwrap().committed());
    let model = fleet.orchestrator().model().1.to_vec();
    let err = fleet.run_round().unwrap_err();
    assert!(matches!(err, StartError::Refused(AdmissionError::BudgetExhausted { .. })), "{err}");
    assert_eq!(fleet.orchestrator().model().1.to_vec(), model, "nothing released");
    let o = fleet.orchestrator_mut();
    o.handle_message(Instant::from_millis(1), ClientId(1), check_in_msg(1, "test", good_conditions(), b""));
    assert_eq!(last_reply(o), CoordinatorMessage::Refusal(Refusal::BudgetExhausted));
}

#[test]
fn version_mismatch_is_answered_with_negotiation_the_session_understands() {
    let codec = Codec::default();
    let withdraw = ClientMessage::Withdraw { round: RoundId(1), reason: WithdrawReason::TrainingFailed };
    let mut frame = codec.encode_client(&withdraw).unwrap();
    frame[4..6].copy_from_slice(&7u16.to_le_bytes());
    let (inbound, _) = codec.decode_client(&frame).unwrap();
    assert_eq!(inbound, Inbound::UnsupportedVersion { version: 7 });
    let reply = codec.encode_version_negotiation();
    let (neg, _) = codec.decode_coordinator(&reply).unwrap();
    let Inbound::VersionNegotiation { min, max } = neg else { panic!("expected negotiation, got {neg:?}") };
    let mut s = session();
    s.check_in(Instant::ZERO, DeviceConditions::default(), None).unwrap();
    s.handle_version_negotiation(Instant::ZERO, min, max);
    assert_eq!(s.poll_action(), Some(SessionAction::Finished(SessionOutcome::VersionMismatch { min, max })));
}

#[test]
fn session_cancels_training_on_abort_and_refuses_late_submission() {
    let mut s = session();
    s.check_in(Instant::ZERO, DeviceConditions::default(), None).unwrap();
    let _ = s.poll_transmit();
    let task = Task {
        round: RoundId(4),
        model_version: ModelVersion(2),
        model: ModelPayload::Full { shape: shape(), values: vec![0.0; 16].into() },
        plan: TrainingPlan::default(),
        report_within_ms: 1000,
        secure: None,
        kind: starling_proto::message::TaskKind::Train,
    };
    s.handle_message(Instant::from_millis(5), CoordinatorMessage::Task(task));
    assert!(matches!(s.poll_action(), Some(SessionAction::Train(_))));
    assert_eq!(s.poll_timeout(), Some(Instant::from_millis(1005)));
    let upd = EncodedUpdate::RowSparse { shape: shape(), rows: vec![], values: vec![] };
    assert_eq!(
        s.submit_update(Instant::from_millis(2000), RoundId(4), upd, 1.0, LocalMetrics::default()),
        Err(SessionError::DeadlineMissed(RoundId(4)))
    );
    assert_eq!(
        s.poll_action(),
        Some(SessionAction::Finished(SessionOutcome::DeadlineMissed { round: RoundId(4) }))
    );
    assert!(s.is_idle());
    // An unexpected message while checking in is a protocol violation, not a panic.
    s.check_in(Instant::from_millis(3000), DeviceConditions::default(), None).unwrap();
    s.handle_message(Instant::from_millis(3001), CoordinatorMessage::Receipt { round: RoundId(1) });
    assert!(matches!(s.poll_action(), Some(SessionAction::Finished(SessionOutcome::ProtocolViolation(_)))));
}

/// A trainer that records the batches it is given.
struct BatchRecorder {
    batches: Vec<usize>,
}

impl starling_proto::harness::Trainer for BatchRecorder {
    fn compute_time(
        &mut self,
        client: ClientId,
        _req: &TrainRequest,
        _params: &std::sync::Arc<[f32]>,
    ) -> Duration {
        Duration::from_secs(1 + client.0 % 3)
    }
    fn train(&mut self, jobs: &[starling_proto::harness::TrainJob]) -> Vec<Option<TrainResult>> {
        self.batches.push(jobs.len());
        jobs.iter().map(|j| fake(j.client, &j.request, &j.params).map(|(r, _)| r)).collect()
    }
}

#[test]
fn a_round_trains_its_tasks_in_one_batch() {
    let mut fleet =
        Fleet::new(orchestrator(10, 5), 30, BatchRecorder { batches: vec![] }, FleetConfig::default());
    let r = fleet.run_round().unwrap();
    assert!(r.committed());
    assert_eq!(fleet.trainer_mut().batches, vec![13], "all 13 selected clients' tasks in one batch");
}

#[test]
fn invalid_configs_are_typed_errors() {
    let mk = |f: &dyn Fn(&mut OrchestratorConfig)| {
        let mut c = config(10, 5);
        f(&mut c);
        Orchestrator::new(c, Box::new(Federated::fedavg()), vec![0.0; 16], ModelVersion(0), RoundId(1))
            .unwrap_err()
    };
    assert_eq!(mk(&|c| c.round.target_participants = 0), ConfigError::NoTarget);
    assert_eq!(mk(&|c| c.round.min_reports = 11), ConfigError::MinReports { min: 11, target: 10 });
    assert_eq!(mk(&|c| c.round.over_selection = 0.5), ConfigError::OverSelection(0.5));
    assert_eq!(mk(&|c| c.round.max_weight = f32::NAN), ConfigError::MaxWeight);
    assert_eq!(mk(&|c| c.round.selection_pool = Some(0)), ConfigError::EmptyPool);
    let bad_model = Orchestrator::new(
        config(10, 5),
        Box::new(Federated::fedavg()),
        vec![0.0; 3],
        ModelVersion(0),
        RoundId(1),
    );
    assert_eq!(bad_model.unwrap_err(), ConfigError::ModelLength { got: 3, want: 16 });
    let mut nan = vec![0.0; 16];
    nan[3] = f32::NAN;
    let bad_model =
        Orchestrator::new(config(10, 5), Box::new(Federated::fedavg()), nan, ModelVersion(0), RoundId(1));
    assert_eq!(bad_model.unwrap_err(), ConfigError::NonFiniteModel);
}

fn stats(r: &starling_proto::harness::FleetRound) -> RoundStats {
    r.events
        .iter()
        .find_map(|e| match e {
            RoundEvent::Committed(c) => Some(c.stats.clone()),
            RoundEvent::Failed { stats, .. } => Some(stats.clone()),
            _ => None,
        })
        .expect("the round ends")
}

#[test]
fn a_slow_uplink_turns_clients_into_stragglers() {
    let mut cfg = config(10, 3);
    cfg.round.report_timeout = Duration::from_secs(3);
    let fast = FleetConfig::default();
    // Frames here are about 35 bytes: at 10 B/s an upload takes 3.5 s, past the deadline.
    let slow = FleetConfig { uplink: Some(PerClient::Fixed(10.0)), ..FleetConfig::default() };
    let mut f = Fleet::new(orch_with(cfg.clone(), Box::new(Federated::fedavg())), 13, fake_trainer(), fast);
    let quick = f.run_round().unwrap();
    assert!(quick.committed());
    let mut f = Fleet::new(orch_with(cfg, Box::new(Federated::fedavg())), 13, fake_trainer(), slow);
    let r = f.run_round().unwrap();
    assert!(!r.committed(), "no update arrives in time over a 10 B/s uplink");
    assert_eq!(stats(&r).candidates, 13, "check-ins (small) still make it");
    assert!(stats(&r).unfinished > stats(&quick).unfinished);
}

#[test]
fn slow_devices_miss_the_deadline_and_fast_ones_make_it() {
    let mut cfg = config(30, 3);
    cfg.round.report_timeout = Duration::from_secs(3);
    // Reference compute time is 1..=5 s; speeds spread log-normally around 1.
    let fc = FleetConfig {
        compute_speed: PerClient::LogNormal { median: 1.0, sigma: 1.0 },
        seed: 4,
        ..FleetConfig::default()
    };
    let speeds: Vec<f64> = (0..40).map(|i| fc.speed_of(ClientId(i))).collect();
    let mut fleet = Fleet::new(orch_with(cfg, Box::new(Federated::fedavg())), 40, fake_trainer(), fc);
    let r = fleet.run_round().unwrap();
    let done = accepted(&r.events);
    assert!(!done.is_empty() && stats(&r).unfinished > 0, "{:?}", stats(&r));
    for c in &done {
        let reference = (1 + c.0 % 5) as f64;
        assert!(reference / speeds[c.0 as usize] < 3.0, "client {} could not have made it", c.0);
    }
}

#[test]
fn only_clients_inside_their_window_check_in_and_closing_windows_drop_trainers() {
    let availability = Availability {
        day: Duration::from_secs(600),
        start: PerClient::Uniform { low: 0.0, high: 1.0 },
        length: PerClient::Fixed(0.3),
    };
    let fc = FleetConfig { availability: Some(availability), seed: 8, ..FleetConfig::default() };
    let probe = fc.clone();
    let mut fleet = Fleet::new(orchestrator(20, 2), 200, fake_trainer(), fc);
    let r = fleet.run_round().unwrap();
    assert!((40..=80).contains(&r.check_ins), "about 30% of 200 check in: {}", r.check_ins);
    let checked: Vec<ClientId> = r
        .events
        .iter()
        .filter_map(|e| match e {
            RoundEvent::UpdateAccepted { client, .. } => Some(*client),
            _ => None,
        })
        .collect();
    for c in &checked {
        assert!(probe.available_until(*c, Instant::ZERO + Duration::from_millis(150)).is_some());
    }
    // Over many rounds some trainers see their window close mid-task (compute is 1..=5 s and a
    // window is 180 s long), and they count as dropouts (unless the round already has its reports).
    let mut closed = r.window_closed;
    let mut dropped = stats(&r).dropped;
    for _ in 0..30 {
        let r = fleet.run_round().unwrap();
        closed += r.window_closed;
        dropped += stats(&r).dropped;
    }
    assert!(closed > 0 && dropped > 0, "some windows closed during training");
    assert!(dropped <= closed, "with no random dropouts, every dropout is a closed window");
}

#[test]
fn round_interval_spaces_rounds_and_the_day_moves_on() {
    let fc = FleetConfig { round_interval: Duration::from_secs(3600), ..FleetConfig::default() };
    let mut fleet = Fleet::new(orchestrator(5, 2), 10, fake_trainer(), fc);
    fleet.run_round().unwrap();
    fleet.run_round().unwrap();
    assert!(fleet.now() >= Instant::ZERO + Duration::from_secs(3600));
}

#[test]
fn check_in_probability_thins_check_ins() {
    let fc = FleetConfig { check_in_probability: 0.1, seed: 2, ..FleetConfig::default() };
    let mut fleet = Fleet::new(orchestrator(10, 2), 1000, fake_trainer(), fc);
    let r = fleet.run_round().unwrap();
    assert!((60..=140).contains(&r.check_ins), "{}", r.check_ins);
    assert!(r.committed());
}

#[test]
fn client_state_is_created_lazily_and_released_when_empty() {
    let fc = FleetConfig { check_in_probability: 0.01, cache_models: false, ..FleetConfig::default() };
    let mut fleet = Fleet::new(orchestrator(20, 5), 100_000, fake_trainer(), fc);
    assert_eq!(fleet.resident_clients(), 0);
    let r = fleet.run_round().unwrap();
    assert!(r.committed());
    // Only clients told to come back later (they must remember when) stay resident.
    let waiting = r.outcomes.iter().filter(|(_, o)| matches!(o, SessionOutcome::ComeBackAt { .. })).count();
    assert_eq!(fleet.resident_clients(), waiting);
    assert!(fleet.resident_clients() < 2_000);
}

#[test]
fn the_whole_device_model_is_deterministic_per_seed() {
    let run = |seed: u64| {
        let mut cfg = config(10, 3);
        cfg.rng_seed = seed;
        let fc = FleetConfig {
            seed,
            dropout: 0.1,
            uplink: Some(PerClient::LogNormal { median: 20_000.0, sigma: 1.0 }),
            downlink: Some(PerClient::LogNormal { median: 100_000.0, sigma: 1.0 }),
            compute_speed: PerClient::LogNormal { median: 1.0, sigma: 0.7 },
            availability: Some(Availability {
                day: Duration::from_secs(1200),
                start: PerClient::Normal { mean: 0.5, sd: 0.2 },
                length: PerClient::Uniform { low: 0.2, high: 0.6 },
            }),
            check_in_probability: 0.8,
            round_interval: Duration::from_secs(60),
            ..FleetConfig::default()
        };
        let mut fleet = Fleet::new(orch_with(cfg, Box::new(Federated::fedavg())), 60, fake_trainer(), fc);
        fleet.record_transcript(true);
        for _ in 0..6 {
            fleet.run_round().unwrap();
        }
        (fleet.transcript().to_vec(), fleet.orchestrator().model().1.to_vec())
    };
    let (a, ma) = run(21);
    assert_eq!((a.clone(), ma), run(21));
    assert_ne!(a, run(22).0);
}
