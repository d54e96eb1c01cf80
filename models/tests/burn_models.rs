//! The burn model definitions: the flat bridge, a training step, and agreement with the
//! hand-written federated kernel.

use burn::optim::{GradientsParams, SgdConfig};
use burn::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use starling_models::burn_mf::{MfConfig, index_tensor};
use starling_models::flat;
use starling_models::mf::{LocalTraining, MfLayout, local_epochs};

fn device() -> Device {
    let d = Device::flex().autodiff();
    d.seed(3);
    d
}

#[test]
fn flat_view_round_trips_exactly_and_keeps_gradients() {
    let dev = device();
    let model = MfConfig::new(4, 10).with_dim(6).init(&dev);
    let shape = flat::shape_of(&model.global.item, 6).unwrap();
    assert_eq!((shape.rows, shape.row_len), (10, 6));
    let v = flat::to_flat(&model.global.item, 6).unwrap();
    assert_eq!(v.len(), 60);
    let changed: Vec<f32> = v.iter().map(|x| x * 2.0 + 1.0).collect();
    let mut model = model;
    model.global.item = flat::load_flat(model.global.item, 6, &changed).unwrap();
    assert_eq!(flat::to_flat(&model.global.item, 6).unwrap(), changed, "exact round trip");
    // The loaded table still receives gradients.
    let loss =
        model.bpr_loss_sum(index_tensor(&[0], &dev), index_tensor(&[1], &dev), index_tensor(&[2], &dev), 0.0);
    let grads = loss.backward();
    assert!(model.global.item.weight.val().grad(&grads).is_some());
    // Bad input is a typed error.
    assert!(matches!(
        flat::load_flat(model.global.item.clone(), 6, &changed[1..]),
        Err(flat::FlatError::Length { .. })
    ));
    let mut nan = changed.clone();
    nan[5] = f32::NAN;
    assert_eq!(flat::load_flat(model.global.item, 6, &nan).unwrap_err(), flat::FlatError::NonFinite(5));
}

#[test]
fn padding_fills_whole_rows() {
    let dev = device();
    let model = MfConfig::new(1, 5).with_dim(3).init(&dev);
    // The whole model (user 1x3 + items 5x3 = 18 values) on rows of 4: 5 rows, 2 values of padding.
    let shape = flat::shape_of(&model, 4).unwrap();
    assert_eq!((shape.rows, shape.row_len), (5, 4));
    let v = flat::to_flat(&model, 4).unwrap();
    assert_eq!(&v[18..], &[0.0, 0.0]);
}

#[test]
fn a_training_step_lowers_the_loss_on_a_fixed_batch() {
    let dev = device();
    let mut model = MfConfig::new(3, 20).with_dim(8).init(&dev);
    let (u, p, n) = (vec![0, 1, 2, 0], vec![1, 2, 3, 4], vec![10, 11, 12, 13]);
    let batch = || (index_tensor(&u, &dev), index_tensor(&p, &dev), index_tensor(&n, &dev));
    let mut optim = SgdConfig::new().init();
    let (a, b, c) = batch();
    let before: f32 = model.bpr_loss_sum(a, b, c, 0.01).into_scalar::<f32>();
    for _ in 0..5 {
        let (a, b, c) = batch();
        let loss = model.bpr_loss_sum(a, b, c, 0.01);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(0.5, model, grads);
    }
    let (a, b, c) = batch();
    let after: f32 = model.bpr_loss_sum(a, b, c, 0.01).into_scalar::<f32>();
    assert!(after < before, "loss {before} -> {after}");
}

fn kernel_matches_burn(bias: bool) {
    // One client, one batch: the hand-written kernel and burn's autodiff + SGD must agree.
    let dim = 8;
    let dev = device();
    let mut model = MfConfig::new(1, 30).with_dim(dim).with_item_bias(bias).init(&dev);
    if bias {
        // Non-zero biases, so their gradients and regularisation are exercised.
        let mut g = flat::to_flat(&model.global, dim as u32).unwrap();
        for i in 0..30 {
            g[30 * dim + i] = 0.01 * i as f32 - 0.1;
        }
        model.global = flat::load_flat(model.global, dim as u32, &g).unwrap();
    }
    let layout = model.layout();
    assert_eq!(layout, MfLayout { items: 30, dim: dim as u32, bias });
    let global = flat::to_flat(&model.global, dim as u32).unwrap();
    assert_eq!(global.len(), layout.shape().unwrap().len());
    let user0 = flat::to_flat(&model.user, dim as u32).unwrap();
    let positives = vec![2, 5, 7, 19];
    let lr = 0.3;
    let cfg = LocalTraining { epochs: 1, batch_size: 32, negatives: 1, item_lr: lr, user_lr: lr, reg: 0.01 };
    let mut user = user0.clone();
    let result =
        local_epochs(layout, &global, &mut user, &positives, &cfg, &mut ChaCha8Rng::seed_from_u64(11))
            .unwrap();
    // The kernel draws its pairs from this seed; draw the same ones for burn.
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut order = positives.clone();
    for k in (1..order.len()).rev() {
        let j = rand::RngExt::random_range(&mut rng, 0..=k);
        order.swap(k, j);
    }
    let negs: Vec<u32> = order
        .iter()
        .map(|_| starling_models::mf::sample_negative(30, &positives, &mut rng).unwrap())
        .collect();
    let zeros = vec![0u32; order.len()];
    let loss = model.bpr_loss_sum(
        index_tensor(&zeros, &dev),
        index_tensor(&order, &dev),
        index_tensor(&negs, &dev),
        0.01,
    );
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let model = SgdConfig::new().init().step(f64::from(lr), model, grads);
    let burn_user = flat::to_flat(&model.user, dim as u32).unwrap();
    let burn_global = flat::to_flat(&model.global, dim as u32).unwrap();
    for (a, b) in user.iter().zip(&burn_user) {
        assert!((a - b).abs() < 1e-5, "user {a} vs {b}");
    }
    let mut kernel_global = global.clone();
    for (row, vals) in result.update.iter_rows() {
        for (k, d) in vals.iter().enumerate() {
            kernel_global[row as usize * dim + k] += d;
        }
    }
    for (k, (a, b)) in kernel_global.iter().zip(&burn_global).enumerate() {
        assert!((a - b).abs() < 1e-5, "global value {k}: kernel {a} vs burn {b}");
    }
}

#[test]
fn the_federated_kernel_computes_the_burn_models_sgd_step() {
    kernel_matches_burn(false);
}

#[test]
fn the_federated_kernel_matches_burn_with_item_biases() {
    kernel_matches_burn(true);
}

#[test]
fn centralized_mf_beats_popularity_clearly_on_synthetic_data() {
    use starling_models::burn_mf::{CentralTraining, train_central};
    use starling_models::data::LeaveOneOut;
    use starling_models::data::synthetic::{Population, SyntheticConfig};
    use starling_models::eval::EvalSet;
    let pop = Population::new(SyntheticConfig {
        users: 1500,
        items: 600,
        max_interactions: 150,
        ..SyntheticConfig::default()
    })
    .unwrap();
    let split = LeaveOneOut::split(&pop.interactions(1500), 1500, 600);
    let eval = EvalSet::build(&split).unwrap();
    let counts = split.item_counts();
    let popular = eval.evaluate(|_, items, out| out.extend(items.iter().map(|&i| counts[i as usize] as f32)));
    let cfg = CentralTraining { epochs: 25, lr: 5e-3, ..CentralTraining::default() };
    let mut last = None;
    train_central(&split, &eval, 32, &cfg, |r| last = Some(r.metrics));
    let trained = last.unwrap();
    assert!(
        trained.hr_at_10 > popular.hr_at_10 + 0.08,
        "trained HR@10 {:.3} vs popularity {:.3}",
        trained.hr_at_10,
        popular.hr_at_10
    );
}
