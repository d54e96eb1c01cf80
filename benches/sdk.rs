//! SDK benchmarks: recording events into the on-device SQLite store, and one local round for a
//! user with 100 events end to end (read events, train, clip, noise, encode the update frame),
//! for matrix factorisation and for the two-tower model.
//!
//! Run with `cargo bench -p starling-benches --bench sdk`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use starling_models::data::events::{Context, DeviceClass, Event, EventKind};
use starling_models::family::ModelDef;
use starling_proto::codec::Codec;
use starling_proto::encoding::EncodedUpdate;
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::{ClientMessage, ClientUpdate, LocalMetrics, NoiseSettings, TrainingPlan};
use starling_sdk::config::PrivacyMode;
use starling_sdk::{ClientConfig, Consent, Device, ModelSpec, Storage};
use std::hint::black_box;
use std::sync::Arc;

const NOW: i64 = 1_780_000_000_000;

fn event(k: u64) -> Event {
    let kind = match k % 4 {
        0 => EventKind::View { dwell_ms: 45_000 },
        1 => EventKind::Click,
        2 => EventKind::Purchase,
        _ => EventKind::Skip,
    };
    Event {
        item: (k * 17 % 1682) as u32,
        at_ms: NOW - 1000 + (k % 1000) as i64,
        kind,
        context: Context::at(NOW / 1000, DeviceClass::Phone),
    }
}

fn device(dir: &std::path::Path, spec: ModelSpec, mode: PrivacyMode) -> Device {
    let mut cfg = ClientConfig::new(ClientId(1), vec![], spec, Storage::Dir(dir.to_path_buf()));
    cfg.privacy.mode = mode;
    cfg.retention.max_events = None;
    cfg.seed = Some(1);
    cfg.clock = starling_sdk::Clock::manual(NOW);
    let mut d = Device::open(&cfg).expect("opens");
    d.set_consent(Consent { personalization: true, training: true }).expect("consent");
    d
}

fn record(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = device(dir.path(), ModelSpec::mf(1682, 32), PrivacyMode::Central);
    let mut g = c.benchmark_group("sdk_record");
    g.throughput(Throughput::Elements(1));
    let mut k = 0u64;
    g.bench_function("one_event_file_backed", |b| {
        b.iter(|| {
            k += 1;
            black_box(d.record(&event(k), NOW).expect("records"))
        })
    });
    let batch: Vec<Event> = (0..100).map(event).collect();
    g.throughput(Throughput::Elements(100));
    g.bench_function("batch_of_100_file_backed", |b| {
        b.iter(|| black_box(d.record_batch(&batch, NOW).expect("records")))
    });
    g.finish();
}

fn local_round(c: &mut Criterion) {
    let codec = Codec::default();
    for (name, spec, mode, noise) in [
        (
            "sdk_local_round_100_events_central_dp",
            ModelSpec::mf(1682, 32),
            PrivacyMode::Central,
            NoiseSettings::None,
        ),
        (
            "sdk_two_tower_local_round_100_events_central_dp",
            ModelSpec::two_tower(1682, 32),
            PrivacyMode::Central,
            NoiseSettings::None,
        ),
        (
            "sdk_local_round_100_events_local_dp",
            ModelSpec::mf(1682, 32),
            PrivacyMode::Local { min_noise_multiplier: 0.5 },
            NoiseSettings::Local { multiplier: 1.0 },
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let def = ModelDef::from_name(&spec.family, spec.items, spec.dim, spec.item_bias).expect("a model");
        let params: Arc<[f32]> = match def.mf_layout() {
            // The MF figures since issue 12 use this deterministic model.
            Some(_) => (0..1682 * 32).map(|k| ((k % 29) as f32 - 14.0) / 140.0).collect(),
            None => def.init_global(1, 0.1).expect("initial model").into(),
        };
        let mut d = device(dir.path(), spec, mode);
        let events: Vec<Event> = (0..100).map(|k| event(k * 3)).collect();
        d.record_batch(&events, NOW).expect("records");
        let plan = TrainingPlan {
            clip_norm: Some(1.0),
            noise,
            learning_rate: 1.0,
            private_learning_rate: 0.2,
            ..TrainingPlan::default()
        };
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(3);
        c.bench_function(name, |b| {
            b.iter(|| {
                let t = d.train(RoundId(1), ModelVersion(1), params.clone(), &plan).expect("trains");
                let update = EncodedUpdate::encode(&t.update, plan.encoding, &mut rng);
                let msg = ClientMessage::Update(ClientUpdate {
                    round: RoundId(1),
                    base_version: ModelVersion(1),
                    update,
                    weight: t.weight,
                    metrics: LocalMetrics {
                        loss: t.loss,
                        hit_rate_at_10: None,
                        train_ms: 0,
                        norm_within_clip: None,
                    },
                });
                black_box(codec.encode_client(&msg).expect("encodes"))
            })
        });
    }
}

criterion_group!(benches, record, local_round);
criterion_main!(benches);
