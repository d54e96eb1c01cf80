//! Protocol-core benchmarks: codec throughput and aggregation, each next to a plain copy of the
//! same bytes measured in the same run.
//!
//! Run with `cargo bench -p starling-benches --bench proto`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use starling_proto::codec::Codec;
use starling_proto::encoding::{EncodedUpdate, EncodingKind};
use starling_proto::ids::{ModelVersion, RoundId};
use starling_proto::message::{ClientMessage, ClientUpdate, LocalMetrics};
use starling_proto::strategy::AggregationRule;
use starling_proto::update::{ModelShape, Update};
use std::hint::black_box;

fn random_values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn codec(c: &mut Criterion) {
    let n = 1_000_000usize;
    let shape = ModelShape::new(31_250, 32).expect("shape");
    let values = random_values(n, 1);
    let msg = ClientMessage::Update(ClientUpdate {
        round: RoundId(1),
        base_version: ModelVersion(1),
        update: EncodedUpdate::Dense { shape, values: values.clone() },
        weight: 1.0,
        metrics: LocalMetrics::default(),
    });
    let codec = Codec::default();
    let frame = codec.encode_client(&msg).expect("encode");
    let mut g = c.benchmark_group("codec_1M_f32");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("encode", |b| {
        b.iter(|| black_box(codec.encode_client(black_box(&msg)).expect("encode")))
    });
    g.bench_function("decode", |b| {
        b.iter(|| black_box(codec.decode_client(black_box(&frame)).expect("decode")))
    });
    g.bench_function("decode+validate", |b| {
        b.iter(|| {
            let (inbound, _) = codec.decode_client(black_box(&frame)).expect("decode");
            let starling_proto::codec::Inbound::Message { message: ClientMessage::Update(u), .. } = inbound
            else {
                unreachable!()
            };
            black_box(u.update.decode(shape, n).expect("valid"))
        })
    });
    g.bench_function("encode+decode", |b| {
        b.iter(|| {
            let f = codec.encode_client(black_box(&msg)).expect("encode");
            black_box(codec.decode_client(&f).expect("decode"))
        })
    });
    g.bench_function("plain_copy_same_bytes", |b| b.iter(|| black_box(black_box(&frame).clone())));
    g.finish();

    // Quantised and sparse encodings of the same 1M update.
    let update = Update::dense(shape, values).expect("update");
    let mut g = c.benchmark_group("encode_update_1M");
    g.throughput(Throughput::Elements(n as u64));
    for kind in [EncodingKind::Dense, EncodingKind::RowSparse, EncodingKind::Quantized8] {
        g.bench_with_input(BenchmarkId::from_parameter(format!("{kind:?}")), &kind, |b, &k| {
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            b.iter(|| black_box(EncodedUpdate::encode(&update, k, &mut rng)))
        });
    }
    g.finish();
}

fn aggregation(c: &mut Criterion) {
    let (clients, len) = (100usize, 100_000usize);
    let shape = ModelShape::new(3_125, 32).expect("shape");
    let updates: Vec<Update> =
        (0..clients).map(|i| Update::dense(shape, random_values(len, i as u64)).expect("update")).collect();
    let bytes = (clients * len * 4) as u64;
    let mut g = c.benchmark_group("fedavg_100x100k");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(20);
    // The round engine owns each decoded update, so the clone stands for handing it over.
    g.bench_function("weighted_mean", |b| {
        b.iter(|| {
            let mut agg = AggregationRule::WeightedMean.aggregator(shape);
            for (i, u) in updates.iter().enumerate() {
                agg.accept(u.clone(), 1.0 + i as f64).expect("accept");
            }
            black_box(agg.finish(&mut ChaCha8Rng::seed_from_u64(0)).expect("finish"))
        })
    });
    g.bench_function("plain_copy_same_bytes", |b| {
        let mut dst = vec![0.0f32; len];
        b.iter(|| {
            for u in &updates {
                dst.copy_from_slice(black_box(u.values()));
            }
            black_box(&dst);
        })
    });
    g.finish();
}

criterion_group!(benches, codec, aggregation);
criterion_main!(benches);
