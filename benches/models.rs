//! Model benchmarks: one client's local epoch and top-10 inference.
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

criterion_group!(benches, local_epoch, top10);
criterion_main!(benches);
