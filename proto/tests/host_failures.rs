//! The host's escape hatches when it cannot record what the engine did: a round whose start was
//! not made durable is aborted before any task is sent, and a commit that was not made durable is
//! reverted so the unrecorded model is never served.

use starling_proto::encoding::EncodedUpdate;
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::*;
use starling_proto::round::*;
use starling_proto::strategy::Federated;
use starling_proto::time::{Duration, Instant};
use starling_proto::update::ModelShape;

fn shape() -> ModelShape {
    ModelShape::new(4, 2).unwrap()
}

fn engine() -> Orchestrator {
    let config = OrchestratorConfig {
        model_family: "test".into(),
        shape: shape(),
        round: RoundConfig {
            target_participants: 2,
            over_selection: 1.0,
            min_reports: 1,
            selection_pool: Some(2),
            selection_timeout: Duration::from_secs(5),
            report_timeout: Duration::from_secs(30),
            eligibility: Eligibility::any(),
            ..RoundConfig::default()
        },
        history: 2,
        rng_seed: 3,
    };
    Orchestrator::new(config, Box::new(Federated::fedavg()), vec![0.0; 8], ModelVersion(0), RoundId(1))
        .unwrap()
}

fn check_in(client: u64, have: Option<ModelVersion>) -> ClientMessage {
    ClientMessage::CheckIn(CheckIn {
        client: ClientId(client),
        credential: vec![],
        sdk_version: "t".into(),
        model_family: "test".into(),
        have_version: have,
        conditions: DeviceConditions::default(),
        capabilities: Capabilities::default(),
    })
}

fn update(round: RoundId, base: ModelVersion) -> ClientMessage {
    ClientMessage::Update(ClientUpdate {
        round,
        base_version: base,
        update: EncodedUpdate::RowSparse { shape: shape(), rows: vec![1], values: vec![1.0, 2.0] },
        weight: 1.0,
        metrics: LocalMetrics::default(),
    })
}

fn drain(o: &mut Orchestrator) -> (Vec<Transmit>, Vec<RoundEvent>) {
    (std::iter::from_fn(|| o.poll_transmit()).collect(), std::iter::from_fn(|| o.poll_event()).collect())
}

/// Runs one round with clients 1 and 2 reporting; returns the events.
fn commit_round(o: &mut Orchestrator, t: Instant) -> Vec<RoundEvent> {
    let round = o.start_round(t).unwrap();
    let base = o.model().0;
    o.handle_message(t, ClientId(1), check_in(1, Some(base)));
    o.handle_message(t, ClientId(2), check_in(2, Some(base)));
    o.handle_message(t, ClientId(1), update(round, base));
    o.handle_message(t, ClientId(2), update(round, base));
    drain(o).1
}

#[test]
fn a_round_aborted_by_the_host_fails_without_sending_a_task_and_the_next_round_runs() {
    let mut o = engine();
    let t = Instant::from_millis(1);
    let round = o.start_round(t).unwrap();
    // The host could not record `Started`: it aborts before the selection closes.
    o.handle_message(t, ClientId(1), check_in(1, None));
    o.abort_round(t, "disk full");
    let (sent, events) = drain(&mut o);
    assert!(
        sent.iter().all(|s| !matches!(s.message, CoordinatorMessage::Task(_))),
        "no task may leave an unrecorded round: {sent:?}"
    );
    assert!(events.iter().any(|e| matches!(
        e,
        RoundEvent::Failed { round: r, reason: FailReason::Aborted(why), .. } if *r == round && why == "disk full"
    )));
    assert_eq!(o.current_round(), None);
    assert_eq!(o.model().0, ModelVersion(0));
    // Late check-ins and updates for the aborted round go nowhere; the next round works.
    let events = commit_round(&mut o, Instant::from_millis(2));
    assert!(events.iter().any(|e| matches!(e, RoundEvent::Committed(_))));
}

#[test]
fn aborting_while_collecting_tells_the_training_clients() {
    let mut o = engine();
    let t = Instant::from_millis(1);
    let round = o.start_round(t).unwrap();
    o.handle_message(t, ClientId(1), check_in(1, None));
    o.handle_message(t, ClientId(2), check_in(2, None));
    assert_eq!(o.phase(), Phase::Collecting);
    drain(&mut o);
    o.abort_round(t, "storage");
    let (sent, _) = drain(&mut o);
    let aborted: Vec<u64> = sent
        .iter()
        .filter(|s| matches!(s.message, CoordinatorMessage::Abort { round: r, .. } if r == round))
        .map(|s| s.to.0)
        .collect();
    assert_eq!(aborted, vec![1, 2]);
    assert_eq!(o.phase(), Phase::Failed);
}

#[test]
fn a_reverted_commit_is_never_served_and_the_old_model_trains_on() {
    let mut o = engine();
    let events = commit_round(&mut o, Instant::from_millis(1));
    assert!(events.iter().any(|e| matches!(e, RoundEvent::Committed(_))));
    assert_eq!(o.model().0, ModelVersion(1));
    // The host failed to record the commit.
    assert!(o.revert_commit());
    assert!(!o.revert_commit(), "only once");
    assert_eq!(o.model().0, ModelVersion(0));
    assert!(o.model().1.iter().all(|&v| v == 0.0));
    // The next round ships version 0 in full, also to a client that claims to hold version 1.
    let t = Instant::from_millis(2);
    let round = o.start_round(t).unwrap();
    o.handle_message(t, ClientId(1), check_in(1, Some(ModelVersion(1))));
    o.handle_message(t, ClientId(2), check_in(2, Some(ModelVersion(0))));
    let (sent, _) = drain(&mut o);
    for s in &sent {
        if let CoordinatorMessage::Task(task) = &s.message {
            assert_eq!(task.model_version, ModelVersion(0));
            match &task.model {
                ModelPayload::Full { values, .. } => assert!(values.iter().all(|&v| v == 0.0)),
                other => panic!("expected the full old model, got {other:?}"),
            }
        }
    }
    assert_eq!(sent.iter().filter(|s| matches!(s.message, CoordinatorMessage::Task(_))).count(), 2);
    // Updates against the reverted version are stale; against version 0 they commit version 1 again.
    o.handle_message(t, ClientId(1), update(round, ModelVersion(1)));
    o.handle_message(t, ClientId(2), update(round, ModelVersion(0)));
    let (_, events) = drain(&mut o);
    assert!(
        events.iter().any(|e| matches!(
            e,
            RoundEvent::UpdateRejected { reason: RejectReason::StaleVersion { .. }, .. }
        ))
    );
    assert!(events.iter().any(|e| matches!(e, RoundEvent::Committed(c) if c.version == ModelVersion(1))));
}

#[test]
fn a_commit_cannot_be_reverted_once_the_next_round_started() {
    let mut o = engine();
    commit_round(&mut o, Instant::from_millis(1));
    o.start_round(Instant::from_millis(2)).unwrap();
    assert!(!o.revert_commit());
    assert_eq!(o.model().0, ModelVersion(1));
}
