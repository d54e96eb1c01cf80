//! The two-tower model through `ModelDef`: what an update holds, the untrained model, bad inputs.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use starling_models::data::events::{
    BatteryLevel, Context, DeviceClass, Event, EventKind, Examples, NetworkType,
};
use starling_models::family::{ModelDef, Query};
use starling_models::mf::{LocalTraining, TrainError};
use starling_models::two_tower::{TwoTowerLayout, flat_shape};

fn ctx(hour: i64, device: DeviceClass) -> Context {
    Context::at(hour * 3600, device)
}

fn examples() -> Examples {
    let mut events: Vec<Event> = [3u32, 6, 9, 12, 15, 40, 41]
        .iter()
        .enumerate()
        .map(|(k, &item)| Event {
            item,
            at_ms: k as i64,
            kind: if k % 2 == 0 { EventKind::Purchase } else { EventKind::Click },
            context: ctx(20, DeviceClass::Tablet).with_battery(BatteryLevel::Charging),
        })
        .collect();
    events.push(Event { item: 7, at_ms: 9, kind: EventKind::Skip, context: ctx(9, DeviceClass::Phone) });
    Examples::from_events(&events)
}

#[test]
fn training_changes_exactly_the_touched_item_rows_and_the_dense_rows() {
    let def = ModelDef::two_tower(100, 8);
    let shape = def.shape().unwrap();
    let global = def.init_global(1, 0.1).unwrap();
    let mut private = def.init_private(2, 0.1);
    let before = private.clone();
    let x = examples();
    let cfg = LocalTraining { epochs: 3, batch_size: 4, negatives: 2, ..LocalTraining::default() };
    let r = def.train(&global, &mut private, &x, &cfg, &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
    assert_eq!(r.examples, 7);
    assert!(r.loss.is_finite() && r.loss > 0.0);
    assert_ne!(private, before, "the private vector trains");
    assert_eq!(r.update.shape(), shape);
    let rows = r.update.rows().expect("row-sparse").to_vec();
    assert_eq!(r.update.values().len(), rows.len() * 8);
    let item_rows: Vec<u32> = rows.iter().copied().filter(|&r| r < 100).collect();
    let dense_rows: Vec<u32> = rows.iter().copied().filter(|&r| r >= 100).collect();
    assert_eq!(dense_rows, (100..shape.rows).collect::<Vec<_>>(), "every dense row");
    for p in x.positive_items() {
        assert!(item_rows.contains(&p), "positive {p}");
    }
    // Positives plus at most 2 negatives per positive per epoch.
    assert!(item_rows.len() <= 7 + 3 * 7 * 2 && item_rows.len() < 100);
    let mut after = global.clone();
    for (row, vals) in r.update.iter_rows() {
        for (g, v) in after[row as usize * 8..(row as usize + 1) * 8].iter_mut().zip(vals) {
            *g += v;
        }
    }
    for item in 0..100u32 {
        let (a, b) = (&after[item as usize * 8..][..8], &global[item as usize * 8..][..8]);
        if item_rows.contains(&item) {
            assert_ne!(a, b, "touched row {item} changed");
        } else {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "untouched row {item} bit-identical"
            );
        }
    }
    assert_ne!(&after[800..], &global[800..], "dense rows changed");
    // The update never holds the private vector (before or after training).
    for p in [&before, &private] {
        assert!(!r.update.values().chunks_exact(8).any(|row| row == p.as_slice()));
    }
    // Fitting only the private part leaves the global part alone.
    let mut p2 = before.clone();
    def.fit_private(&global, &mut p2, &x, &cfg, &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
    assert_ne!(p2, before);
}

#[test]
fn an_untrained_model_ranks_like_mf_and_context_moves_a_trained_one() {
    let tt = ModelDef::two_tower(60, 8);
    let mf = ModelDef::mf(60, 8);
    let global = tt.init_global(4, 0.1).unwrap();
    let private = tt.init_private(5, 0.1);
    let mut a = Vec::new();
    let mut b = Vec::new();
    let history = [1u32, 2, 3];
    let q = Query {
        history: &history,
        context: Some(ctx(8, DeviceClass::Phone).with_network(NetworkType::Wifi)),
    };
    tt.score_all(&global, &private, &q, &mut a);
    mf.score_all(&global[..60 * 8], &private, &Query::default(), &mut b);
    assert_eq!(a, b, "identity on p, zero elsewhere: exactly MF");
    // After training, the context and the history matter.
    let mut global = global;
    let mut private = private;
    let x = examples();
    let cfg =
        LocalTraining { epochs: 20, batch_size: 8, item_lr: 0.3, user_lr: 0.1, ..LocalTraining::default() };
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for _ in 0..5 {
        let r = tt.train(&global, &mut private, &x, &cfg, &mut rng).unwrap();
        for (row, vals) in r.update.iter_rows() {
            for (g, v) in global[row as usize * 8..(row as usize + 1) * 8].iter_mut().zip(vals) {
                *g += v;
            }
        }
    }
    let score = |q: &Query<'_>| {
        let mut s = Vec::new();
        tt.score_all(&global, &private, q, &mut s);
        s
    };
    let evening = score(&Query { history: &history, context: Some(ctx(20, DeviceClass::Tablet)) });
    let morning = score(&Query { history: &history, context: Some(ctx(8, DeviceClass::Phone)) });
    let average = score(&Query { history: &history, context: None });
    let other_history = score(&Query { history: &[50, 51], context: Some(ctx(20, DeviceClass::Tablet)) });
    assert_ne!(evening, morning);
    assert_ne!(evening, average);
    assert_ne!(evening, other_history);
    assert!(evening.iter().chain(&average).all(|s| s.is_finite()));
}

#[test]
fn the_shape_matches_the_initial_model_and_bad_inputs_are_typed() {
    for (items, dim, c) in [(1u32, 1u32, 1u32), (100, 8, 4), (1682, 32, 4), (7, 3, 0)] {
        let def =
            ModelDef { family: starling_models::family::Family::TwoTower { context_dim: c }, items, dim };
        let shape = flat_shape(items, dim, c).unwrap();
        assert_eq!(def.init_global(1, 0.1).unwrap().len(), shape.len());
        assert!(TwoTowerLayout::new(items, dim, c).param_len() <= shape.len());
    }
    assert!(flat_shape(10, 0, 4).is_err());
    let def = ModelDef::two_tower(50, 8);
    let global = def.init_global(1, 0.1).unwrap();
    let mut private = def.init_private(2, 0.1);
    let cfg = LocalTraining::default();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    assert!(matches!(
        def.train(&global[1..], &mut private, &examples(), &cfg, &mut rng),
        Err(TrainError::Shape { .. })
    ));
    assert!(matches!(
        def.train(&global, &mut private[1..].to_vec(), &examples(), &cfg, &mut rng),
        Err(TrainError::Shape { .. })
    ));
    let big = ModelDef::two_tower(30, 8);
    let g30 = big.init_global(1, 0.1).unwrap();
    assert_eq!(big.train(&g30, &mut private, &examples(), &cfg, &mut rng), Err(TrainError::UnknownItem(40)));
    let mut bad = examples();
    bad.positives[0].context.time_of_day = 9;
    assert_eq!(def.train(&global, &mut private, &bad, &cfg, &mut rng), Err(TrainError::BadContext));
    let r = def.train(&global, &mut private, &Examples::default(), &cfg, &mut rng).unwrap();
    assert_eq!(r.examples, 0);
    // NaN parameters: training reports divergence, scoring gives NaN, nothing panics.
    let mut nan = global.clone();
    nan[3 * 8] = f32::NAN;
    let p0 = private.clone();
    assert_eq!(def.train(&nan, &mut private, &examples(), &cfg, &mut rng), Err(TrainError::Diverged));
    private = p0;
    let mut s = Vec::new();
    def.score_all(&nan, &private, &Query::default(), &mut s);
    assert!(s[3].is_nan() && s[4].is_finite());
    s.clear();
    def.score_all(&global[..10], &private, &Query::default(), &mut s);
    assert_eq!(s.len(), 50);
    assert!(s.iter().all(|v| v.is_nan()));
    // Out-of-range query fields are ignored, never a panic.
    s.clear();
    let odd = Context { time_of_day: 200, weekday: 90, ..ctx(1, DeviceClass::Desktop) }.with_region(250);
    def.score_all(&global, &private, &Query { history: &[1, 999], context: Some(odd) }, &mut s);
    assert!(s.iter().all(|v| v.is_finite()));
}
