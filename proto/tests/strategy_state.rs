//! The strategy state a coordinator checkpoints with each model: saved, encoded, decoded and
//! restored, a strategy continues exactly as if it had never stopped; a state that does not fit
//! is refused and changes nothing.

use proptest::prelude::*;
use rand::SeedableRng;
use starling_proto::codec::{decode_strategy_state, encode_strategy_state};
use starling_proto::dp::Budget;
use starling_proto::dp::params::{ClipNorm, Delta, Epsilon, NoiseMultiplier, Quantile};
use starling_proto::dp::strategy::{AdaptiveClipping, DpConfig, DpFedAvg};
use starling_proto::ids::{ModelVersion, RoundId};
use starling_proto::strategy::{Aggregate, Federated, RoundContext, StateError, Strategy, StrategyState};
use starling_proto::update::ModelShape;

const ROWS: u32 = 6;
const ROW_LEN: u32 = 4;

fn ctx(round: u64) -> RoundContext {
    RoundContext {
        population: None,
        secure: false,
        quant: None,
        round: RoundId(round),
        model_version: ModelVersion(round - 1),
        shape: ModelShape::new(ROWS, ROW_LEN).unwrap(),
        target_participants: 3,
        selected: 3,
    }
}

fn delta(rng: &mut rand_chacha::ChaCha8Rng) -> Aggregate {
    Aggregate {
        delta: (0..ROWS * ROW_LEN).map(|_| rng.random_range(-0.5f32..0.5)).collect(),
        contributors: 3,
        total_weight: 3.0,
        privacy: None,
    }
}

type Make = fn() -> Federated;

fn strategies() -> Vec<(&'static str, Make)> {
    vec![
        ("fedavg", Federated::fedavg),
        ("fedavgm", || Federated::fedavgm(0.7, 0.9)),
        ("fedadam", || Federated::fedadam(0.05)),
        ("fedyogi", || Federated::fedyogi(0.05)),
    ]
}

#[test]
fn a_restored_strategy_continues_exactly_like_one_that_never_stopped() {
    for (name, make) in strategies() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut running = make();
        let mut model = vec![0.1f32; (ROWS * ROW_LEN) as usize];
        for round in 1..=3 {
            running.apply(&ctx(round), &mut model, &delta(&mut rng)).unwrap();
        }
        // "Restart": the state goes through its stored bytes into a freshly configured strategy.
        let bytes = encode_strategy_state(&running.save_state());
        let mut restarted = make();
        restarted.restore_state(&decode_strategy_state(&bytes, 1 << 20).unwrap(), model.len()).unwrap();
        assert_eq!(restarted.save_state(), running.save_state(), "{name}");
        let mut model_b = model.clone();
        for round in 4..=6 {
            let d = delta(&mut rng);
            running.apply(&ctx(round), &mut model, &d).unwrap();
            restarted.apply(&ctx(round), &mut model_b, &d).unwrap();
        }
        assert_eq!(model, model_b, "{name}: the restarted strategy diverged");
        if name != "fedavg" {
            // Without the moments the next step differs: the test would catch a lost state.
            let mut fresh = make();
            let mut model_c = model.clone();
            let d = delta(&mut rng);
            running.apply(&ctx(7), &mut model, &d).unwrap();
            fresh.apply(&ctx(7), &mut model_c, &d).unwrap();
            assert_ne!(model, model_c, "{name}: the moments made no difference");
        }
    }
}

#[test]
fn a_state_that_does_not_fit_is_refused_and_changes_nothing() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let len = (ROWS * ROW_LEN) as usize;
    let mut adam = Federated::fedadam(0.05);
    let mut model = vec![0.0f32; len];
    adam.apply(&ctx(1), &mut model, &delta(&mut rng)).unwrap();
    let adam_state = adam.save_state();

    let mut momentum = Federated::fedavgm(0.7, 0.9);
    momentum.apply(&ctx(1), &mut model, &delta(&mut rng)).unwrap();
    let before = momentum.save_state();
    assert!(matches!(momentum.restore_state(&adam_state, len), Err(StateError::OtherStrategy { .. })));
    assert_eq!(momentum.save_state(), before);

    let mut short = adam_state.clone();
    short.vectors[0].1.truncate(5);
    let mut nan = adam_state.clone();
    nan.vectors[1].1[2] = f32::NAN;
    let mut negative_v = adam_state.clone();
    negative_v.vectors[1].1[0] = -1.0;
    let mut missing = adam_state.clone();
    missing.vectors.pop();
    let mut other = Federated::fedadam(0.05);
    let fresh = other.save_state();
    for (what, bad) in [("short", short), ("nan", nan), ("negative v", negative_v), ("missing", missing)] {
        assert!(other.restore_state(&bad, len).is_err(), "{what} was accepted");
        assert_eq!(other.save_state(), fresh, "{what} changed the strategy");
    }
    // Plain FedAvg saves only its name; an empty state (a checkpoint from before states were
    // saved) leaves a stateful strategy refusing nothing it should not: it is another optimizer.
    assert!(Federated::fedavg().restore_state(&Federated::fedavg().save_state(), len).is_ok());
    assert!(Federated::fedadam(0.1).restore_state(&StrategyState::default(), len).is_err());
}

fn dp(adaptive: bool) -> DpFedAvg<Federated> {
    let config = DpConfig {
        clip: ClipNorm::new(1.0).unwrap(),
        noise: NoiseMultiplier::new(1.0).unwrap(),
        expected_participants: 10,
        budget: Budget { epsilon: Epsilon::new(10.0).unwrap(), delta: Delta::new(1e-5).unwrap() },
        adaptive: adaptive.then(|| AdaptiveClipping {
            target: Quantile::new(0.5).unwrap(),
            learning_rate: 0.2,
            count_noise: 0.6,
        }),
    };
    DpFedAvg::new(Federated::fedadam(0.05), config).unwrap()
}

#[test]
fn the_dp_layer_saves_its_adaptive_clip_norm_beside_the_optimizer() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let len = (ROWS * ROW_LEN) as usize;
    let mut a = dp(true);
    let mut model = vec![0.0f32; len];
    a.apply(&ctx(1), &mut model, &delta(&mut rng)).unwrap();
    let mut state = a.save_state();
    assert_eq!(state.scalar("dp.clip"), Some(a.clip_norm()));
    assert!(state.vector("optimizer.m").is_some_and(|m| m.len() == len));
    // A moved clip norm comes back.
    state.scalars.retain(|(n, _)| n != "dp.clip");
    state.scalars.push(("dp.clip".into(), 0.37));
    let mut b = dp(true);
    b.restore_state(&state, len).unwrap();
    assert_eq!(b.clip_norm(), 0.37);
    assert_eq!(b.inner().save_state(), a.inner().save_state());
    // Without adaptive clipping the configured norm stays (the saved one is ignored).
    let mut c = dp(false);
    c.restore_state(&state, len).unwrap();
    assert_eq!(c.clip_norm(), 1.0);
    // An invalid clip norm is refused, and nothing changes.
    state.scalars.retain(|(n, _)| n != "dp.clip");
    state.scalars.push(("dp.clip".into(), f64::INFINITY));
    let mut d = dp(true);
    let before = d.save_state();
    assert!(d.restore_state(&state, len).is_err());
    assert_eq!(d.save_state(), before);
}

#[test]
fn corrupt_state_bytes_are_an_error() {
    let state = Federated::fedadam(0.1).save_state();
    let bytes = encode_strategy_state(&state);
    assert_eq!(decode_strategy_state(&bytes, 1 << 20).unwrap(), state);
    assert!(decode_strategy_state(&bytes[..bytes.len() - 1], 1 << 20).is_err());
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(decode_strategy_state(&trailing, 1 << 20).is_err());
    assert!(decode_strategy_state(&bytes, 2).is_err(), "over the limit");
    // A length prefix claiming billions of values in a few bytes.
    assert!(decode_strategy_state(&[1, 0xfc, 0xff, 0xff, 0xff, 0x7f, b'a'], 1 << 20).is_err());
}

proptest! {
    #[test]
    fn any_state_survives_its_bytes(
        vectors in proptest::collection::vec(("[a-z.]{1,12}", proptest::collection::vec(-1e6f32..1e6, 0..64)), 0..4),
        scalars in proptest::collection::vec(("[a-z.]{1,12}", -1e9f64..1e9), 0..4),
    ) {
        let state = StrategyState { vectors, scalars, labels: vec![("optimizer.kind".into(), "adam".into())] };
        prop_assert_eq!(decode_strategy_state(&encode_strategy_state(&state), 1 << 24).unwrap(), state);
    }
}
