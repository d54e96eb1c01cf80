//! The SDK's calls from Rust through `StarlingDevice` (the object the bindings wrap), to compare
//! with the same calls from Python (`client-sdk/ffi/python/examples/bench.py`): the difference is what the
//! binding layer (UniFFI lowering, ctypes) costs per call.
//!
//! `cargo bench --workspace --bench ffi_calls`

use criterion::{Criterion, criterion_group, criterion_main};
use starling_sdk_ffi::{Consent, DeviceClass, DeviceConfig, Event, EventKind, StarlingDevice, context_at};
use std::hint::black_box;
use std::time::{SystemTime, UNIX_EPOCH};

fn device() -> StarlingDevice {
    let config = DeviceConfig {
        client_id: 1,
        credential: String::new(),
        model_family: "bpr-mf".into(),
        items: 1_000,
        dim: 32,
        storage_dir: None,
        storage_key: None,
        coordinator: None,
        participation: None,
        default_consent: Some(Consent { personalization: true, training: true }),
        local_dp_min_noise_multiplier: None,
        max_epsilon: None,
        retention_days: None,
        max_events: None,
        min_personal_events: None,
        response_timeout_ms: None,
        connect_attempts: None,
    };
    StarlingDevice::open_config(&config, None).expect("open")
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as i64
}

fn bench(c: &mut Criterion) {
    let d = device();
    let ctx = context_at(now_ms() / 1000, DeviceClass::Phone);
    let mut item = 0u32;
    c.bench_function("ffi_rust/record", |b| {
        b.iter(|| {
            item = (item + 7) % 1_000;
            let e = Event { item, at_ms: now_ms(), kind: EventKind::Click, context: ctx };
            black_box(d.record(e).expect("record"))
        })
    });
    c.bench_function("ffi_rust/recommend_10", |b| {
        b.iter(|| black_box(d.recommend(10, Some(ctx)).expect("recommend")))
    });
    c.bench_function("ffi_rust/privacy_report", |b| {
        b.iter(|| black_box(d.privacy_report().expect("report")))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
