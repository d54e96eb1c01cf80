//! Rounds served by several coordinator nodes: each node folds its own clients' updates into a
//! partial aggregate, the leader merges them and finishes once. The committed model equals the
//! single-node one for the same updates; followers never noise, charge or commit; a share that
//! does not fit is left out, never half-merged.

use starling_proto::codec::{decode_shard_outcome, encode_shard_outcome};
use starling_proto::dp::Budget;
use starling_proto::dp::params::{ClipNorm, Delta, Epsilon, NoiseMultiplier};
use starling_proto::dp::strategy::{DpConfig, DpFedAvg};
use starling_proto::encoding::EncodedUpdate;
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::*;
use starling_proto::round::*;
use starling_proto::strategy::{Federated, Strategy};
use starling_proto::time::{Duration, Instant};
use starling_proto::update::ModelShape;

const ROWS: u32 = 5;
const ROW_LEN: u32 = 3;
const CLIENTS: u64 = 9;

fn shape() -> ModelShape {
    ModelShape::new(ROWS, ROW_LEN).unwrap()
}

fn engine(strategy: Box<dyn Strategy>, target: usize, min_reports: usize) -> Orchestrator {
    let config = OrchestratorConfig {
        model_family: "test".into(),
        shape: shape(),
        round: RoundConfig {
            target_participants: target,
            over_selection: 1.0,
            min_reports,
            selection_pool: None,
            selection_timeout: Duration::from_secs(5),
            report_timeout: Duration::from_secs(30),
            eligibility: Eligibility::any(),
            ..RoundConfig::default()
        },
        history: 2,
        rng_seed: 3,
    };
    let model: Vec<f32> = (0..ROWS * ROW_LEN).map(|i| i as f32 * 0.01).collect();
    Orchestrator::new(config, strategy, model, ModelVersion(0), RoundId(1)).unwrap()
}

fn check_in(client: u64) -> ClientMessage {
    ClientMessage::CheckIn(CheckIn {
        client: ClientId(client),
        credential: vec![],
        sdk_version: "t".into(),
        model_family: "test".into(),
        have_version: None,
        conditions: DeviceConditions::default(),
        capabilities: Capabilities::default(),
    })
}

/// Client `c`'s update: dense, distinct per client, some rows sparse.
fn update(round: RoundId, base: ModelVersion, c: u64) -> ClientMessage {
    let values: Vec<f32> =
        (0..ROWS * ROW_LEN).map(|i| ((c * 7 + u64::from(i) * 3) % 11) as f32 * 0.05 - 0.25).collect();
    ClientMessage::Update(ClientUpdate {
        round,
        base_version: base,
        update: EncodedUpdate::Dense { shape: shape(), values },
        weight: 1.0 + c as f32,
        metrics: LocalMetrics { loss: 0.5 + c as f32 * 0.1, ..LocalMetrics::default() },
    })
}

fn events(o: &mut Orchestrator) -> Vec<RoundEvent> {
    while o.poll_transmit().is_some() {}
    std::iter::from_fn(|| o.poll_event()).collect()
}

/// Runs `clients` through one node's part of a round that already started: check-ins, the
/// selection deadline, updates. Returns the node's events.
fn serve(o: &mut Orchestrator, round: RoundId, clients: &[u64]) -> Vec<RoundEvent> {
    let t0 = Instant::from_millis(10);
    for &c in clients {
        o.handle_message(t0, ClientId(c), check_in(c));
    }
    let t1 = t0 + Duration::from_secs(6);
    o.handle_timeout(t1);
    let base = o.model().0;
    for &c in clients {
        o.handle_message(t1, ClientId(c), update(round, base, c));
    }
    events(o)
}

fn committed(events: &[RoundEvent]) -> Option<&CommittedRound> {
    events.iter().find_map(|e| match e {
        RoundEvent::Committed(c) => Some(&**c),
        _ => None,
    })
}

fn shard_done(events: &[RoundEvent]) -> ShardOutcome {
    events
        .iter()
        .find_map(|e| match e {
            RoundEvent::ShardDone(o) => Some((**o).clone()),
            _ => None,
        })
        .expect("the follower's share ended")
}

/// Leader + two followers over `split`; returns the leader's events after combining.
fn cluster_round(
    make: impl Fn() -> Box<dyn Strategy>,
    split: [&[u64]; 3],
    min_reports: usize,
) -> (Vec<RoundEvent>, Vec<ShardOutcome>) {
    let target = split.iter().map(|s| s.len()).sum();
    let mut leader = engine(make(), target, min_reports);
    leader.set_cluster_nodes(Some(3));
    let mut followers = [engine(make(), target, min_reports), engine(make(), target, min_reports)];
    let t = Instant::from_millis(1);
    let round = leader.start_round(t).unwrap();
    let spec = leader.shard_spec().expect("a leader's round has a spec for the followers");
    assert_eq!(spec.round, round);
    let mut shares = Vec::new();
    for (f, clients) in followers.iter_mut().zip(&split[1..]) {
        f.start_shard(t, &spec).unwrap();
        let ev = serve(f, round, clients);
        assert!(committed(&ev).is_none(), "a follower never commits");
        assert!(!ev.iter().any(|e| matches!(e, RoundEvent::Started { .. })), "nor records a start");
        assert_eq!(f.model().0, ModelVersion(0), "a follower's model is unchanged by its share");
        // Through the bytes the cluster's database carries.
        let share = decode_shard_outcome(&encode_shard_outcome(&shard_done(&ev)), 1 << 20).unwrap();
        shares.push(share);
    }
    let ev = serve(&mut leader, round, split[0]);
    assert!(ev.iter().any(|e| matches!(e, RoundEvent::AwaitingShares { round: r } if *r == round)));
    assert_eq!(leader.phase(), Phase::Combining);
    assert!(committed(&ev).is_none(), "the leader waits for the shares");
    leader.handle_shares(Instant::from_millis(9_000), round, shares.clone()).unwrap();
    (events(&mut leader), shares)
}

#[test]
fn a_round_split_over_three_nodes_commits_the_single_node_model() {
    let all: Vec<u64> = (1..=CLIENTS).collect();
    for (name, make) in [
        ("fedavg", (|| Box::new(Federated::fedavg()) as Box<dyn Strategy>) as fn() -> Box<dyn Strategy>),
        ("fedadam", || Box::new(Federated::fedadam(0.05))),
    ] {
        let mut single = engine(make(), all.len(), 1);
        let round = single.start_round(Instant::from_millis(1)).unwrap();
        let alone = serve(&mut single, round, &all);
        let alone = committed(&alone).expect("the single node commits").clone();

        let (ev, _) = cluster_round(make, [&[1, 2, 3], &[4, 5, 6], &[7, 8, 9]], 1);
        let split = committed(&ev).expect("the leader commits once the shares are in");
        assert_eq!(split.version, alone.version);
        assert_eq!(split.stats.reported, alone.stats.reported, "{name}");
        assert_eq!(split.stats.selected, alone.stats.selected, "{name}");
        assert!((split.stats.total_weight - alone.stats.total_weight).abs() < 1e-9);
        let worst =
            split.model.iter().zip(alone.model.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst <= 1e-6, "{name}: the split model differs from the single-node one by {worst}");
        assert!(alone.model.iter().zip(ModelVersion(0).0..).any(|(v, _)| *v != 0.0));
        assert_eq!(
            split.stats.mean_loss.map(|l| (l * 1e9).round()),
            alone.stats.mean_loss.map(|l| (l * 1e9).round())
        );
    }
}

fn dp() -> Box<dyn Strategy> {
    let config = DpConfig {
        clip: ClipNorm::new(0.3).unwrap(),
        noise: NoiseMultiplier::new(1.0).unwrap(),
        expected_participants: 9,
        budget: Budget { epsilon: Epsilon::new(50.0).unwrap(), delta: Delta::new(1e-5).unwrap() },
        adaptive: None,
    };
    Box::new(DpFedAvg::new(Federated::fedavg(), config).unwrap())
}

#[test]
fn under_central_dp_followers_ship_the_exact_clipped_sum_and_only_the_leader_noises_and_charges() {
    // Every device is sampled (q = 1 with N = 9): the shares are deterministic.
    let make = dp;
    let target = 9;
    let mut leader = engine(make(), target, 1);
    leader.set_population(9);
    leader.set_cluster_nodes(Some(3));
    let t = Instant::from_millis(1);
    let round = leader.start_round(t).unwrap();
    let spec = leader.shard_spec().unwrap();
    assert_eq!(spec.population, Some(9), "the followers sample at the leader's rate");
    let mut f = engine(make(), target, 1);
    f.start_shard(t, &spec).unwrap();
    let share = shard_done(&serve(&mut f, round, &[4, 5, 6]));
    let partial = share.partial.clone().expect("a share with updates");
    assert_eq!(partial.count, 3);
    // The exact sum of the three clipped updates: no noise was added on the follower.
    let mut want = vec![0.0f64; (ROWS * ROW_LEN) as usize];
    for c in [4u64, 5, 6] {
        let v: Vec<f64> =
            (0..ROWS * ROW_LEN).map(|i| ((c * 7 + u64::from(i) * 3) % 11) as f64 * 0.05 - 0.25).collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let scale = (0.3 / norm).min(1.0);
        for (w, x) in want.iter_mut().zip(&v) {
            *w += x * scale;
        }
    }
    let worst = partial.sum.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-5, "the follower's partial is not the exact clipped sum (off by {worst})");
    let ev = serve(&mut leader, round, &[1, 2, 3]);
    assert!(committed(&ev).is_none());
    let empty =
        ShardOutcome { partial: None, failure: Some("secure aggregation failed".into()), ..share.clone() };
    leader.handle_shares(Instant::from_millis(9_000), round, vec![share, empty]).unwrap();
    let ev = events(&mut leader);
    let c = committed(&ev).expect("commits");
    assert!(c.privacy.is_some(), "the leader's commit carries the round's one charge");
    assert_eq!(c.stats.reported, 6, "the failed share's clients are not counted");
}

#[test]
fn shares_that_do_not_fit_are_left_out_and_min_reports_counts_every_node() {
    let make = || Box::new(Federated::fedavg()) as Box<dyn Strategy>;
    // Four reports needed over the cluster: 2 (leader) + 2 + 2 commits…
    let (ev, shares) = cluster_round(make, [&[1, 2], &[3, 4], &[5, 6]], 4);
    assert_eq!(committed(&ev).expect("enough reports over all nodes").stats.reported, 6);

    // …but with two shares unusable (another version; a NaN partial) only the leader's 2 remain.
    let mut leader = engine(make(), 6, 4);
    leader.set_cluster_nodes(Some(3));
    let round = leader.start_round(Instant::from_millis(1)).unwrap();
    serve(&mut leader, round, &[1, 2]);
    let mut stale = shares[0].clone();
    stale.round = round;
    stale.version = ModelVersion(7);
    let mut nan = shares[1].clone();
    nan.round = round;
    if let Some(p) = nan.partial.as_mut() {
        p.sum[0] = f64::NAN;
    }
    assert!(matches!(
        leader.handle_shares(Instant::from_millis(2), RoundId(99), vec![]),
        Err(SharesError::NotWaiting(_))
    ));
    assert_eq!(leader.handle_shares(Instant::from_millis(9_000), round, vec![stale, nan]).unwrap(), 0);
    let ev = events(&mut leader);
    assert!(
        ev.iter().any(|e| matches!(
            e,
            RoundEvent::Failed { reason: FailReason::TooFewReports { got: 2, needed: 4 }, .. }
        )),
        "{ev:?}"
    );
    assert_eq!(leader.model().0, ModelVersion(0));
}

#[test]
fn a_follower_serves_only_the_leaders_version_and_adopts_checkpoints_exactly() {
    let mut f = engine(Box::new(Federated::fedadam(0.05)), 3, 1);
    let spec = ShardSpec { round: RoundId(5), version: ModelVersion(2), target: 1, population: None };
    assert!(matches!(
        f.start_shard(Instant::from_millis(1), &spec),
        Err(StartError::VersionMismatch { serving: ModelVersion(0), wanted: ModelVersion(2) })
    ));
    let model = vec![0.5f32; (ROWS * ROW_LEN) as usize];
    f.adopt_model(ModelVersion(2), model.clone(), None).unwrap();
    assert_eq!(f.model().0, ModelVersion(2));
    assert_eq!(&f.model().1[..], &model[..]);
    assert!(matches!(f.adopt_model(ModelVersion(1), model.clone(), None), Err(InstallError::Older { .. })));
    let mut bad = model.clone();
    bad[3] = f32::INFINITY;
    assert!(matches!(f.adopt_model(ModelVersion(3), bad, None), Err(InstallError::NonFinite)));
    f.start_shard(Instant::from_millis(1), &spec).unwrap();
    assert!(f.next_round_id() > RoundId(5), "round ids continue above the leader's");
    assert!(matches!(f.adopt_model(ModelVersion(3), model, None), Err(InstallError::Busy(_))));
    assert!(matches!(f.start_evaluation(Instant::from_millis(2)), Err(StartError::Busy(_))));
    let mut leader = engine(Box::new(Federated::fedavg()), 3, 1);
    leader.set_cluster_nodes(Some(2));
    assert!(matches!(
        leader.start_evaluation(Instant::from_millis(1)),
        Err(StartError::EvaluationUnsupported(_))
    ));
}
