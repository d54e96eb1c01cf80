//! How a client's self-reported weight becomes its aggregation weight (`RoundConfig::weighting`,
//! `RoundConfig::max_weight`): one client with a huge claimed weight must not dominate the round.

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

/// A round collecting from clients 1..=n (all selected), with `f` applied to the round settings.
fn collecting(n: u64, f: impl FnOnce(&mut RoundConfig)) -> Orchestrator {
    let mut round = RoundConfig {
        target_participants: n as usize,
        over_selection: 1.0,
        min_reports: 1,
        selection_pool: Some(n as usize),
        selection_timeout: Duration::from_secs(5),
        report_timeout: Duration::from_secs(30),
        eligibility: Eligibility::any(),
        ..RoundConfig::default()
    };
    f(&mut round);
    let config =
        OrchestratorConfig { model_family: "test".into(), shape: shape(), round, history: 0, rng_seed: 1 };
    let mut o = Orchestrator::new(
        config,
        Box::new(Federated::fedavg()),
        vec![0.0; shape().len()],
        ModelVersion(0),
        RoundId(1),
    )
    .unwrap();
    o.start_round(Instant::ZERO).unwrap();
    for c in 1..=n {
        o.handle_message(
            Instant::from_millis(1),
            ClientId(c),
            ClientMessage::CheckIn(CheckIn {
                client: ClientId(c),
                credential: vec![],
                sdk_version: "t".into(),
                model_family: "test".into(),
                have_version: None,
                conditions: DeviceConditions::default(),
                capabilities: Capabilities::default(),
            }),
        );
    }
    assert_eq!(o.phase(), Phase::Collecting);
    while o.poll_transmit().is_some() {}
    while o.poll_event().is_some() {}
    o
}

/// Client `c` reports `value` on both coordinates of row 0, with `weight` and local loss `loss`.
fn report(o: &mut Orchestrator, c: u64, value: f32, weight: f32, loss: f32) -> CoordinatorMessage {
    o.handle_message(
        Instant::from_millis(10),
        ClientId(c),
        ClientMessage::Update(ClientUpdate {
            round: RoundId(1),
            base_version: ModelVersion(0),
            update: EncodedUpdate::RowSparse { shape: shape(), rows: vec![0], values: vec![value, value] },
            weight,
            metrics: LocalMetrics { loss, hit_rate_at_10: None, train_ms: 1, norm_within_clip: None },
        }),
    );
    std::iter::from_fn(|| o.poll_transmit())
        .find(|t| t.to == ClientId(c) && !matches!(t.message, CoordinatorMessage::Abort { .. }))
        .expect("a reply")
        .message
}

fn committed(o: &mut Orchestrator) -> CommittedRound {
    std::iter::from_fn(|| o.poll_event())
        .find_map(|e| match e {
            RoundEvent::Committed(c) => Some(*c),
            _ => None,
        })
        .expect("the round commits")
}

#[test]
fn by_default_a_huge_claimed_weight_is_capped_at_a_small_max_weight() {
    let defaults = RoundConfig::default();
    assert_eq!(defaults.weighting, Weighting::Auto);
    assert_eq!(defaults.max_weight, 100.0);
    let mut o = collecting(2, |_| {});
    // The attacker claims 100,000 examples (accepted as such before this cap existed) and an
    // honest client reports 100: both count 100.
    assert_eq!(report(&mut o, 1, 1.0, 100_000.0, 1.0), CoordinatorMessage::Receipt { round: RoundId(1) });
    assert_eq!(report(&mut o, 2, -1.0, 100.0, 3.0), CoordinatorMessage::Receipt { round: RoundId(1) });
    let c = committed(&mut o);
    assert_eq!(&c.model[..2], &[0.0, 0.0], "equal influence after the cap");
    assert_eq!(c.stats.total_weight, 200.0, "stats count the admitted weights");
    assert_eq!(c.stats.mean_loss, Some(2.0), "the loss is weighted by the admitted weights");
}

#[test]
fn a_weight_above_the_cap_is_clamped_not_rejected_and_below_it_is_kept() {
    let mut o = collecting(3, |r| r.max_weight = 10.0);
    assert_eq!(report(&mut o, 1, 1.0, 1e9, 0.0), CoordinatorMessage::Receipt { round: RoundId(1) });
    assert_eq!(report(&mut o, 2, 2.0, 5.0, 0.0), CoordinatorMessage::Receipt { round: RoundId(1) });
    assert_eq!(report(&mut o, 3, 0.0, 5.0, 0.0), CoordinatorMessage::Receipt { round: RoundId(1) });
    let c = committed(&mut o);
    assert_eq!(c.stats.total_weight, 20.0);
    // (10 × 1 + 5 × 2 + 5 × 0) / 20
    assert_eq!(&c.model[..2], &[1.0, 1.0]);
}

#[test]
fn equal_weighting_gives_every_update_weight_one() {
    let mut o = collecting(2, |r| r.weighting = Weighting::Equal);
    report(&mut o, 1, 1.0, 99.0, 1.0);
    report(&mut o, 2, -1.0, 1.0, 3.0);
    let c = committed(&mut o);
    assert_eq!(&c.model[..2], &[0.0, 0.0]);
    assert_eq!(c.stats.total_weight, 2.0);
    assert_eq!(c.stats.mean_loss, Some(2.0));
}

#[test]
fn examples_weighting_uses_the_reported_weight_up_to_the_cap() {
    let mut o = collecting(2, |r| {
        r.weighting = Weighting::Examples;
        r.plan.noise = NoiseSettings::Central { multiplier: 1.0 };
    });
    report(&mut o, 1, 4.0, 3.0, 0.0);
    report(&mut o, 2, 0.0, 1.0, 0.0);
    let c = committed(&mut o);
    assert_eq!(&c.model[..2], &[3.0, 3.0], "examples even with noise in the plan, when asked for");
    assert_eq!(c.stats.total_weight, 4.0);
}

#[test]
fn auto_weighting_is_equal_when_the_plan_carries_noise() {
    for noise in [NoiseSettings::Central { multiplier: 1.0 }, NoiseSettings::Local { multiplier: 1.0 }] {
        let mut o = collecting(2, |r| r.plan.noise = noise);
        report(&mut o, 1, 1.0, 7.0, 0.0);
        report(&mut o, 2, -1.0, 50.0, 0.0);
        let c = committed(&mut o);
        assert_eq!(c.stats.total_weight, 2.0, "{noise:?}");
        assert_eq!(&c.model[..2], &[0.0, 0.0], "{noise:?}");
    }
}

#[test]
fn non_finite_zero_and_negative_weights_are_still_rejected_under_every_policy() {
    for weighting in [Weighting::Auto, Weighting::Equal, Weighting::Examples] {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -1.0, -0.0] {
            let mut o = collecting(1, |r| r.weighting = weighting);
            assert_eq!(
                report(&mut o, 1, 1.0, bad, 0.0),
                CoordinatorMessage::Rejection { round: RoundId(1), reason: RejectReason::InvalidWeight },
                "{weighting:?} {bad}"
            );
        }
    }
}
