//! The context-aware two-tower model: the federated split, the flat layout, local training.

use burn::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use starling_models::data::events::{Context, DeviceClass, Event, EventKind, Examples};
use starling_models::flat;
use starling_models::mf::LocalTraining;
use starling_models::two_tower::{Batch, ItemFeatures, TwoTowerConfig, local_train};

fn device() -> Device {
    let d = Device::flex().autodiff();
    d.seed(5);
    d
}

fn features(items: usize) -> ItemFeatures {
    // Three "genres"; item i has genre i % 3.
    let mut values = vec![0.0; items * 3];
    for i in 0..items {
        values[i * 3 + i % 3] = 1.0;
    }
    ItemFeatures { features: 3, values }
}

fn ctx(hour: i64, device: DeviceClass) -> Context {
    Context::at(hour * 3600, device)
}

#[test]
fn global_part_excludes_the_user_and_starts_with_item_rows() {
    let dev = device();
    let model = TwoTowerConfig::new(1, 40).with_dim(8).with_item_features(3).init(&dev);
    let shape = flat::shape_of(&model.global, 8).unwrap();
    // items 40x8 + features 3x8 + contexts (6+7+3)x4 + projection (8+12)x8 + bias 8.
    let n: usize = 40 * 8 + 3 * 8 + 16 * 4 + 20 * 8 + 8;
    assert_eq!(shape.len(), n.div_ceil(8) * 8);
    let flat_global = flat::to_flat(&model.global, 8).unwrap();
    let items: Vec<f32> = model.global.item.weight.val().into_data().try_into_vec::<f32>().unwrap();
    assert_eq!(&flat_global[..320], items.as_slice(), "rows 0..items are the item embeddings");
    let user: Vec<f32> = model.user.weight.val().into_data().try_into_vec::<f32>().unwrap();
    assert!(
        !flat_global.windows(8).any(|w| w == user.as_slice()),
        "the private vector is not in the global view"
    );
    let back = flat::load_flat(model.global, 8, &flat_global).unwrap();
    assert_eq!(flat::to_flat(&back, 8).unwrap(), flat_global);
}

#[test]
fn training_lowers_the_loss_and_the_update_holds_only_global_rows() {
    let dev = device();
    let model = TwoTowerConfig::new(1, 40).with_dim(8).with_item_features(3).init(&dev);
    let f = features(40);
    let events: Vec<Event> = [3u32, 6, 9, 12, 15]
        .iter()
        .enumerate()
        .map(|(k, &item)| Event {
            item,
            at_ms: k as i64,
            kind: EventKind::Purchase,
            context: ctx(20, DeviceClass::Tablet),
        })
        .chain(std::iter::once(Event {
            item: 7,
            at_ms: 9,
            kind: EventKind::Skip,
            context: ctx(9, DeviceClass::Phone),
        }))
        .collect();
    let examples = Examples::from_events(&events);
    let batch = Batch {
        users: vec![0; 5],
        contexts: vec![ctx(20, DeviceClass::Tablet); 5],
        pos: vec![3, 6, 9, 12, 15],
        neg: vec![1, 2, 4, 5, 7],
    };
    let before: f32 = model.bpr_loss(&batch, Some(&f), 0.0).into_scalar::<f32>();
    let cfg = LocalTraining { epochs: 10, batch_size: 8, item_lr: 0.5, ..LocalTraining::default() };
    let (model, result) =
        local_train(model, &examples, Some(&f), &cfg, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
    let after: f32 = model.bpr_loss(&batch, Some(&f), 0.0).into_scalar::<f32>();
    assert!(after < before, "loss {before} -> {after}");
    assert_eq!(result.examples, 5);
    let rows = result.update.rows().unwrap();
    for p in [3, 6, 9, 12, 15] {
        assert!(rows.contains(&p), "positive item row {p} updated");
    }
    assert!(rows.iter().any(|&r| r >= 40), "dense (context/projection) rows updated");
    assert!(rows.iter().filter(|&&r| r < 40).count() < 40, "only touched item rows");
    // Context changes the ranking.
    let evening = model.score_all(0, ctx(20, DeviceClass::Tablet), Some(&f));
    let morning = model.score_all(0, ctx(8, DeviceClass::Phone), Some(&f));
    assert_eq!(evening.len(), 40);
    assert_ne!(evening, morning);
}
