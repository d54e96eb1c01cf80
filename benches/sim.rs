//! One simulated round of 100 clients: the whole fleet path (check-ins, selection, task download,
//! real BPR-MF local training on every client, update upload, FedAvg) on the reference workload's
//! model shape (1682 items, dim 32) and a synthetic population of 943 users, so it runs without the
//! MovieLens file.
//!
//! Run with `cargo bench -p starling-benches --bench sim`.

use criterion::{Criterion, criterion_group, criterion_main};
use starling_coordinator::sim::{ClientKind, Dataset, SimConfig, build_fleet};
use std::hint::black_box;

fn round_of_100_clients(c: &mut Criterion) {
    let mut g = c.benchmark_group("sim");
    g.sample_size(30);
    for (name, clients) in [("sdk_devices", ClientKind::Sdk), ("kernel", ClientKind::Kernel)] {
        let config = SimConfig {
            clients,
            dataset: Dataset::Synthetic { users: 943, items: 1682, seed: 1 },
            clients_per_round: 100,
            // The reference fleet: exactly 100 selected, identical always-available devices.
            over_selection: 1.0,
            dropout: 0.0,
            device_spread: 0.0,
            uplink: None,
            downlink: None,
            availability: None,
            round_interval: std::time::Duration::ZERO,
            ..SimConfig::default()
        };
        let mut fleet = build_fleet(&config).expect("fleet");
        g.bench_function(format!("round_100_clients_943_users_1682x32_{name}"), |b| {
            b.iter(|| {
                let r = fleet.run_round().expect("round starts");
                assert!(r.committed());
                black_box(r.bytes_up)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, round_of_100_clients);
criterion_main!(benches);
