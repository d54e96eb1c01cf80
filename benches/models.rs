//! Model benchmarks: one client's local epoch, a whole device round per model family (train +
//! clip + encode, as the SDK does it) and top-10 inference.
//!
//! Run with `cargo bench -p starling-benches --bench models`.

use criterion::{Criterion, criterion_group, criterion_main};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use starling_models::mf::{LocalTraining, MfLayout, local_epochs, score_all, top_k};
use std::hint::black_box;

fn local_epoch(c: &mut Criterion) {
    // The reference workload's model: 1682 items, dim 32; a user with 100 interactions.
    let layout = MfLayout::new(1682, 32);
    let shape = layout.shape().expect("shape");
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let items: Vec<f32> = (0..shape.len()).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    let user0: Vec<f32> = (0..32).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    let mut positives: Vec<u32> = (0..100).map(|k| k * 16 + 3).collect();
    positives.sort_unstable();
    let cfg = LocalTraining::default();
    c.bench_function("mf_local_epoch_100_interactions_dim32", |b| {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        b.iter(|| {
            let mut user = user0.clone();
            black_box(local_epochs(layout, &items, &mut user, &positives, &cfg, &mut rng).expect("trains"))
        })
    });
}

fn top10(c: &mut Criterion) {
    let (n, dim) = (10_000usize, 32usize);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let items: Vec<f32> = (0..n * dim).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    let user: Vec<f32> = (0..dim).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    let seen: Vec<u32> = (0..100).map(|k| k * 97).collect();
    c.bench_function("mf_top10_of_10000_items_dim32", |b| {
        let mut scores = Vec::with_capacity(n);
        b.iter(|| {
            scores.clear();
            score_all(MfLayout::new(n as u32, dim as u32), &items, &user, &mut scores);
            black_box(top_k(&scores, 10, &seen))
        })
    });
}

/// 100 app events of one user over the reference catalogue (1,682 items): mixed kinds, contexts
/// with battery/network/region, and a few skips.
fn device_events() -> Vec<starling_models::data::events::Event> {
    use starling_models::data::events::{BatteryLevel, Context, DeviceClass, Event, EventKind, NetworkType};
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    (0..100u32)
        .map(|k| {
            let kind = match k % 10 {
                0 => EventKind::Skip,
                1 => EventKind::Purchase,
                2 | 3 => EventKind::AddToCart,
                _ => EventKind::Click,
            };
            let context = Context::at(1_767_225_600 + i64::from(k) * 3_700, DeviceClass::Phone)
                .with_battery(BatteryLevel::from_index(k as usize))
                .with_network(NetworkType::from_index(k as usize))
                .with_region(3);
            Event { item: rng.random_range(0..1682), at_ms: i64::from(k) * 3_700_000, kind, context }
        })
        .collect()
}

fn device_round(c: &mut Criterion) {
    use starling_models::data::events::Examples;
    use starling_models::family::ModelDef;
    use starling_proto::dp::local::LocalNoise;
    use starling_proto::dp::local::protect;
    use starling_proto::encoding::EncodedUpdate;
    use starling_proto::message::{NoiseSettings, TrainingPlan};
    let examples = Examples::from_events(&device_events());
    let plan = TrainingPlan {
        clip_norm: Some(1.0),
        noise: NoiseSettings::Central { multiplier: 1.0 },
        ..TrainingPlan::default()
    };
    let cfg = LocalTraining {
        epochs: plan.epochs,
        batch_size: plan.batch_size as usize,
        negatives: plan.negatives,
        item_lr: plan.learning_rate,
        user_lr: plan.private_learning_rate,
        reg: LocalTraining::default().reg,
    };
    for (name, def) in [("mf", ModelDef::mf(1682, 32)), ("two_tower", ModelDef::two_tower(1682, 32))] {
        let global = def.init_global(1, 0.1).expect("init");
        let private0 = def.init_private(2, 0.1);
        c.bench_function(&format!("device_round_{name}_100_events_train_clip_encode"), |b| {
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            b.iter(|| {
                let mut private = private0.clone();
                let r = def.train(&global, &mut private, &examples, &cfg, &mut rng).expect("trains");
                let _within = starling_proto::dp::clip_indicator(&r.update, &plan);
                let (update, _) =
                    protect(r.update, &plan, 1, LocalNoise::SimulationSeeded, &mut rng).expect("protect");
                black_box(EncodedUpdate::encode(&update, plan.encoding, &mut rng))
            })
        });
    }
}

criterion_group!(benches, local_epoch, device_round, top10);
criterion_main!(benches);
