//! Differential-privacy benchmarks: clip + noise for a 1,000,000-value update on both sampler
//! paths — the fast sampler (rand_distr on the seeded RNG: simulator, coordinator default) and
//! opendp's discrete Gaussian (the coordinator's option, on a 2⁻²⁰ grid and exact) — and a
//! device's local-DP release of 100,000 values with its secure sampler (opendp on its grid).
//!
//! Run with `cargo bench -p starling-benches --bench dp`. The exact opendp sampler needs about 40 s
//! per million values, so by default it is measured on 100,000 values; set
//! `STARLING_BENCH_EXACT_1M=1` to measure it on the full million (about ten minutes).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use starling_proto::dp::local::{LocalNoise, local_sensitivity, privatize};
use starling_proto::dp::noise::{FastGaussian, GaussianSampler};
use starling_proto::dp::opendp::OpenDpGaussian;
use starling_proto::dp::{ClipNorm, NoiseMultiplier};
use starling_proto::strategy::norm::clip_l2;
use starling_proto::update::{ModelShape, Update};
use std::hint::black_box;
use std::time::Duration;

fn update(n: usize) -> Update {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let shape = ModelShape::new((n / 32) as u32, 32).expect("shape");
    Update::dense(shape, (0..shape.len()).map(|_| rng.random_range(-1.0f32..1.0)).collect()).expect("update")
}

/// What the coordinator does per update and per round: clip the update, add it to the sum, noise
/// the sum.
fn clip_and_noise(u: &Update, sampler: &dyn GaussianSampler, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let mut clipped = u.clone();
    clip_l2(&mut clipped, 1.0);
    let mut sum = vec![0.0f64; clipped.values().len()];
    clipped.add_to(&mut sum, 1.0);
    sampler.add_noise(&mut sum, 1.1, rng).expect("noise");
    sum
}

fn dp(c: &mut Criterion) {
    let n = 1_000_000;
    let u = update(n);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut g = c.benchmark_group("clip_noise_1M");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("fast", |b| {
        b.iter(|| black_box(clip_and_noise(black_box(&u), &FastGaussian, &mut rng)))
    });
    g.bench_function("device_local_dp_fast", |b| {
        let (clip, sigma) = (ClipNorm::new(1.0).expect("clip"), NoiseMultiplier::new(1.1).expect("sigma"));
        b.iter(|| {
            black_box(privatize(black_box(&u), clip, sigma, &FastGaussian, &mut rng).expect("privatize"))
        })
    });
    g.sample_size(10).warm_up_time(Duration::from_millis(1)).measurement_time(Duration::from_secs(30));
    let grid = OpenDpGaussian::with_granularity(-20);
    g.bench_function("opendp_grid_2^-20", |b| {
        b.iter(|| black_box(clip_and_noise(black_box(&u), &grid, &mut rng)))
    });
    if std::env::var_os("STARLING_BENCH_EXACT_1M").is_some() {
        g.measurement_time(Duration::from_secs(400));
        let exact = OpenDpGaussian::exact();
        g.bench_function("opendp_exact", |b| {
            b.iter(|| black_box(clip_and_noise(black_box(&u), &exact, &mut rng)))
        });
    }
    g.finish();

    let small = update(100_000);
    let mut g = c.benchmark_group("clip_noise_100k");
    g.throughput(Throughput::Elements(100_000));
    g.sample_size(10).warm_up_time(Duration::from_millis(1)).measurement_time(Duration::from_secs(40));
    g.bench_function("fast", |b| {
        b.iter(|| black_box(clip_and_noise(black_box(&small), &FastGaussian, &mut rng)))
    });
    let exact = OpenDpGaussian::exact();
    g.bench_function("opendp_exact", |b| {
        b.iter(|| black_box(clip_and_noise(black_box(&small), &exact, &mut rng)))
    });
    g.bench_function("device_local_dp_secure", |b| {
        let (clip, sigma) = (ClipNorm::new(1.0).expect("clip"), NoiseMultiplier::new(1.1).expect("sigma"));
        let sampler = LocalNoise::Secure.sampler(local_sensitivity(1.0), 100_000);
        b.iter(|| {
            black_box(
                privatize(black_box(&small), clip, sigma, sampler.as_ref(), &mut rng).expect("privatize"),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, dp);
criterion_main!(benches);
