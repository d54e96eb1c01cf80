//! Hand-computed checks of every strategy's arithmetic.

use super::*;
use crate::ids::{ModelVersion, RoundId};
use rand::SeedableRng;

fn shape(rows: u32, row_len: u32) -> ModelShape {
    ModelShape::new(rows, row_len).unwrap()
}

fn ctx(s: ModelShape) -> RoundContext {
    RoundContext {
        population: None,
        secure: false,
        quant: None,
        round: RoundId(1),
        model_version: ModelVersion(0),
        shape: s,
        target_participants: 3,
        selected: 3,
    }
}

fn rng() -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(1)
}

fn run(
    strategy: &mut dyn Strategy,
    s: ModelShape,
    updates: Vec<(Update, f64)>,
) -> Result<Aggregate, AggregateError> {
    let c = ctx(s);
    let mut agg = strategy.aggregator(&c);
    for (u, w) in updates {
        agg.accept(u, w)?;
    }
    agg.finish(&mut rng())
}

fn dense(s: ModelShape, v: &[f32]) -> Update {
    Update::dense(s, v.to_vec()).unwrap()
}

#[test]
fn fedavg_weighted_mean() {
    let s = shape(1, 2);
    let mut st = Federated::fedavg();
    let a = run(&mut st, s, vec![(dense(s, &[1.0, 2.0]), 1.0), (dense(s, &[4.0, -1.0]), 2.0)]).unwrap();
    // (1*1 + 2*4)/3 = 3, (1*2 + 2*-1)/3 = 0
    assert_eq!(a.delta, vec![3.0, 0.0]);
    assert_eq!(a.contributors, 2);
    assert_eq!(a.total_weight, 3.0);
    let mut x = vec![10.0, 10.0];
    st.apply(&ctx(s), &mut x, &a).unwrap();
    assert_eq!(x, vec![13.0, 10.0]);
}

#[test]
fn sparse_mean_vs_row_mean() {
    let s = shape(3, 1);
    let ups = || {
        vec![
            (Update::sparse(s, vec![0], vec![2.0]).unwrap(), 1.0),
            (Update::sparse(s, vec![0, 2], vec![4.0, 6.0]).unwrap(), 1.0),
            (Update::sparse(s, vec![1], vec![9.0]).unwrap(), 2.0),
        ]
    };
    // Plain mean divides by the total weight 4: row0 = 6/4, row1 = 18/4, row2 = 6/4.
    let a = run(&mut Federated::fedavg(), s, ups()).unwrap();
    assert_eq!(a.delta, vec![1.5, 4.5, 1.5]);
    // Row mean divides each row by the weight of its contributors: row0 = 6/2, row1 = 18/2, row2 = 6/1.
    let a = run(&mut Federated::fedavg_row_aware(), s, ups()).unwrap();
    assert_eq!(a.delta, vec![3.0, 9.0, 6.0]);
}

#[test]
fn median_and_trimmed_mean() {
    let s = shape(1, 2);
    let ups = || {
        vec![
            (dense(s, &[1.0, 10.0]), 1.0),
            (dense(s, &[2.0, 20.0]), 5.0),
            (dense(s, &[100.0, 30.0]), 1.0),
            (dense(s, &[3.0, -1000.0]), 1.0),
        ]
    };
    // Median of 4: mean of the middle two. col0 sorted 1,2,3,100 -> 2.5; col1 -1000,10,20,30 -> 15.
    let a = run(&mut Federated::median(), s, ups()).unwrap();
    assert_eq!(a.delta, vec![2.5, 15.0]);
    // Trimmed mean beta 0.25 of 4 drops one each end: col0 (2+3)/2, col1 (10+20)/2.
    let a = run(&mut Federated::trimmed_mean(0.25), s, ups()).unwrap();
    assert_eq!(a.delta, vec![2.5, 15.0]);
    // beta 0.49 of 2 updates trims nothing (floor(0.98) = 0): a plain mean.
    let err = run(&mut Federated::trimmed_mean(0.49), s, ups()[..2].to_vec()).unwrap();
    assert_eq!(err.delta, vec![1.5, 15.0]);
    assert!(matches!(run(&mut Federated::trimmed_mean(0.5), s, ups()), Err(AggregateError::Other(_))));
}

#[test]
fn momentum_adam_yogi_steps() {
    let s = shape(1, 1);
    let agg = |d: f32| Aggregate { delta: vec![d], contributors: 1, total_weight: 1.0, privacy: None };
    // FedAvgM lr 1, beta 0.5: v1 = 2, x = 2; v2 = 0.5*2 + 2 = 3, x = 5.
    let mut m = Federated::fedavgm(1.0, 0.5);
    let mut x = vec![0.0];
    m.apply(&ctx(s), &mut x, &agg(2.0)).unwrap();
    m.apply(&ctx(s), &mut x, &agg(2.0)).unwrap();
    assert_eq!(x, vec![5.0]);
    // FedAdam lr 0.1: m = 0.1*2 = 0.2, v = 0.01*4 = 0.04, step = 0.1*0.2/(0.2+0.001).
    let mut a = Federated::fedadam(0.1);
    let mut x = vec![0.0];
    a.apply(&ctx(s), &mut x, &agg(2.0)).unwrap();
    assert!((x[0] - 0.1 * 0.2 / (0.2 + 0.001)).abs() < 1e-6, "{}", x[0]);
    // FedYogi first step from v = 0: v = 0 - 0.01*4*sign(0-4) = 0.04: same as Adam.
    let mut y = Federated::fedyogi(0.1);
    let mut xy = vec![0.0];
    y.apply(&ctx(s), &mut xy, &agg(2.0)).unwrap();
    assert!((xy[0] - x[0]).abs() < 1e-7);
    // Second step with delta 0: Adam v = 0.99*0.04; Yogi v = 0.04 - 0 = 0.04 (sign term times 0).
    a.apply(&ctx(s), &mut x, &agg(0.0)).unwrap();
    y.apply(&ctx(s), &mut xy, &agg(0.0)).unwrap();
    let m2 = 0.9f32 * 0.2;
    let adam2 = 0.1 * 0.2 / (0.2 + 0.001) + 0.1 * m2 / ((0.99f32 * 0.04).sqrt() + 0.001);
    let yogi2 = 0.1 * 0.2 / (0.2 + 0.001) + 0.1 * m2 / (0.04f32.sqrt() + 0.001);
    assert!((x[0] - adam2).abs() < 1e-6, "{} vs {adam2}", x[0]);
    assert!((xy[0] - yogi2).abs() < 1e-6, "{} vs {yogi2}", xy[0]);
}

#[test]
fn norm_bound_clips_before_averaging() {
    let s = shape(1, 2);
    let mut st = NormBound::new(Federated::fedavg(), 1.0).unwrap();
    // [3,4] has norm 5 -> [0.6, 0.8]; [0.1, 0] stays.
    let a = run(&mut st, s, vec![(dense(s, &[3.0, 4.0]), 1.0), (dense(s, &[0.1, 0.0]), 1.0)]).unwrap();
    assert!((a.delta[0] - 0.35).abs() < 1e-6 && (a.delta[1] - 0.4).abs() < 1e-6, "{:?}", a.delta);
    let mut plan = crate::message::TrainingPlan::default();
    st.configure(&ctx(s), &mut plan);
    assert_eq!(plan.clip_norm, Some(1.0));
    assert!(NormBound::new(Federated::fedavg(), f64::NAN).is_err());
}

#[test]
fn bad_inputs_are_typed_errors() {
    let s = shape(1, 2);
    let other = shape(2, 1);
    let mut agg = Federated::fedavg().aggregator(&ctx(s));
    assert!(matches!(agg.accept(dense(other, &[1.0, 1.0]), 1.0), Err(AggregateError::ShapeMismatch { .. })));
    assert!(matches!(agg.accept(dense(s, &[1.0, 1.0]), f64::NAN), Err(AggregateError::InvalidWeight(_))));
    assert!(matches!(agg.accept(dense(s, &[1.0, 1.0]), 0.0), Err(AggregateError::InvalidWeight(_))));
    assert_eq!(agg.accepted(), 0);
    assert_eq!(agg.finish(&mut rng()), Err(AggregateError::Empty));
    let mut x = vec![f32::MAX, 0.0];
    let a = Aggregate { delta: vec![f32::MAX, 0.0], contributors: 1, total_weight: 1.0, privacy: None };
    assert_eq!(Federated::fedavg().apply(&ctx(s), &mut x, &a), Err(AggregateError::NonFinite));
    assert_eq!(x, vec![f32::MAX, 0.0], "a failed step leaves the model untouched");
}

#[test]
fn uniform_selection_is_seeded_and_without_replacement() {
    let cands: Vec<ClientId> = (0..50).map(ClientId).collect();
    let a = sample_uniform(&cands, 10, &mut rng());
    let b = sample_uniform(&cands, 10, &mut rng());
    assert_eq!(a, b);
    let mut d = a.clone();
    d.dedup();
    assert_eq!(d.len(), 10);
    assert_eq!(sample_uniform(&cands[..3], 10, &mut rng()).len(), 3);
}
