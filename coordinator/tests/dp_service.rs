//! Differential privacy in `starling serve` itself, over real QUIC (issue 13): the noise is not
//! reproducible from the config, the ledger charges the sampling rate the service really uses
//! (q = target / N with N from the token registry, so a device in a small fleet is charged full
//! participation), and switching DP off on a store that holds DP rounds is refused.

mod common;

use common::*;
use starling_coordinator::service::config::ServiceConfig;
use starling_coordinator::service::server;
use starling_coordinator::store::Store;
use starling_proto::dp::{Delta, NoiseMultiplier, SamplingRate, epsilon};
use starling_proto::encoding::EncodedUpdate;
use starling_proto::ids::ModelVersion;
use starling_proto::message::{ClientMessage, ClientUpdate, CoordinatorMessage, LocalMetrics};
use starling_proto::update::ModelShape;
use starling_sdk::transport::quic::QuicTransport;
use std::path::Path;

/// Three enrolled devices, a target of three: q = min(1, 3 / 3) = 1.
const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[model]
rows = 20
row_len = 4
seed = 7
[round]
target_participants = 3
min_reports = 1
selection_pool = 3
selection_timeout_ms = 60000
report_timeout_ms = 60000
interval_ms = 50
max_rounds = 1
require_charging = false
require_unmetered = false
require_idle = false
[privacy]
mode = "central"
clip_norm = 1.0
noise_multiplier = 1.0
epsilon_budget = 1000.0
delta = 1e-7
"#;

fn shape() -> ModelShape {
    ModelShape::new(20, 4).unwrap()
}

/// Starts a service in `dir` with `config`, enrolls three devices and checks each in over QUIC.
async fn start_with_three_devices(dir: &Path, config: &str) -> (ServiceConfig, server::Running, Vec<Raw>) {
    let config = load(&service_dir(dir, config));
    let tokens: Vec<Vec<u8>> = (1..=3).map(|id| issue(&config, id, 3600).1).collect();
    let running = server::start(&config).await.unwrap();
    let transport = QuicTransport::with_endpoint(
        client_endpoint(),
        &endpoint_for(running.quic_addr, &ca_pem(dir), "localhost"),
    )
    .unwrap();
    let mut clients = Vec::new();
    for (i, token) in tokens.into_iter().enumerate() {
        let mut raw = Raw::connect(&transport).await;
        raw.send(&check_in(i as u64 + 1, token)).await;
        clients.push(raw);
    }
    (config, running, clients)
}

/// Starts a service in `dir` with `config`, enrolls three devices, runs one round in which each
/// sends the same fixed update, and returns the committed model (version 1).
async fn one_round(dir: &Path, config: &str) -> Vec<f32> {
    let (config, running, mut clients) = start_with_three_devices(dir, config).await;
    for c in &mut clients {
        let CoordinatorMessage::Task(task) = c.message().await else { panic!("expected a task") };
        c.send(&ClientMessage::Update(ClientUpdate {
            round: task.round,
            base_version: task.model_version,
            update: EncodedUpdate::RowSparse { shape: shape(), rows: vec![2], values: vec![0.25; 4] },
            weight: 1.0,
            metrics: LocalMetrics::default(),
        }))
        .await;
        assert!(matches!(c.message().await, CoordinatorMessage::Receipt { .. }));
    }
    let mut handle = running.handle.clone();
    while handle.status().rounds_committed < 1 || handle.status().model_version < ModelVersion(1) {
        handle.status_changed().await.unwrap();
    }
    running.shutdown().await;
    let store = Store::open(&config.storage.path).unwrap();
    store.latest_checkpoint().unwrap().unwrap().model
}

/// The noise must not be a function of anything in the config file (`model.seed` also generates
/// the initial model every client downloads): two services started from the same file, fed the
/// same updates, release different models. With the engine's RNG seeded from `model.seed` they
/// released bit-identical ones, so the noise could be regenerated and subtracted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_from_the_same_config_draw_different_noise() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let model_a = one_round(a.path(), CONFIG).await;
    let model_b = one_round(b.path(), CONFIG).await;
    let initial = load(&a.path().join("starling.toml")).initial_model().unwrap();
    assert_eq!(initial, load(&b.path().join("starling.toml")).initial_model().unwrap());
    let differing = model_a.iter().zip(&model_b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert!(differing > model_a.len() / 2, "only {differing} of {} values differ", model_a.len());
    // Rows nobody touched moved too: every coordinate carries noise (σC / 3 ≈ 0.33 here).
    let untouched_moved =
        model_a.iter().zip(&initial).enumerate().filter(|(i, (m, x))| i / 4 != 2 && m != x).count();
    assert!(untouched_moved > 60, "{untouched_moved}");
}

/// A device in a fleet of three with a target of three takes part in every round: the ledger
/// must charge q = 1 (and ε accordingly), not target / (some configured population).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_in_a_small_fleet_is_charged_full_participation() {
    let dir = tempfile::tempdir().unwrap();
    one_round(dir.path(), CONFIG).await;
    let config = load(&dir.path().join("starling.toml"));
    let store = Store::open(&config.storage.path).unwrap();
    let entries = store.ledger_entries().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].mechanism.q.get(), 1.0, "{entries:?}");
    // What one round at q = 1, σ = 1 really costs (≈ 5.6 at δ = 1e-7), not the ≈ 0 a q of
    // 3 / 10,000 would claim.
    let (spent, _) = epsilon(
        SamplingRate::new(1.0).unwrap(),
        NoiseMultiplier::new(entries[0].mechanism.sigma.get()).unwrap(),
        1,
        Delta::new(1e-7).unwrap(),
    );
    assert!(spent > 4.0, "{spent}");

    // Turning DP off on this store is refused: the models released from then on would carry no
    // guarantee and the ε shown would silently stop meaning anything.
    let off = CONFIG.replace("mode = \"central\"", "mode = \"off\"");
    std::fs::write(dir.path().join("starling.toml"), &off).unwrap();
    let config = load(&dir.path().join("starling.toml"));
    let Err(err) = server::start(&config).await else { panic!("mode = off on a DP store is refused") };
    let text = err.to_string();
    assert!(text.contains("allow_release_without_dp") && text.contains("1 differentially private"), "{text}");
    // Explicitly allowed: it runs, and /status still shows what was spent.
    let allowed = format!("{off}allow_release_without_dp = true\n");
    std::fs::write(dir.path().join("starling.toml"), allowed).unwrap();
    let config = load(&dir.path().join("starling.toml"));
    let running = server::start(&config).await.unwrap();
    let status = running.telemetry.status();
    assert_eq!(status.privacy_mode, "off");
    assert!(status.epsilon_spent > 4.0, "{status:?}");
    assert_eq!(status.epsilon_budget, None);
    running.shutdown().await;
}

/// δ must be well below 1/N: a service whose enrolled fleet makes δ·N > 0.1 refuses to start
/// rounds (and says why) instead of printing an ε whose δ clause is meaningless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_too_large_for_the_fleet_refuses_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let path = service_dir(dir.path(), &CONFIG.replace("delta = 1e-7", "delta = 0.05"));
    let config = load(&path);
    for id in 1..=3 {
        issue(&config, id, 3600);
    }
    let running = server::start(&config).await.unwrap();
    let err = running.handle.start_round().await.unwrap_err().to_string();
    assert!(err.contains("delta") && err.contains("3 enrolled devices"), "{err}");
    running.shutdown().await;
}

/// `privacy.mode = "local"` in the service: tasks ask devices to noise locally and send dense
/// updates, the coordinator adds nothing and keeps no ledger, and it bounds each update at what an
/// honest noised one stays within (re-clipping a noised update to C would erase its signal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_dp_mode_plans_local_noise_and_bounds_noised_updates_by_the_honest_norm() {
    use starling_proto::encoding::EncodingKind;
    use starling_proto::message::NoiseSettings;
    let dir = tempfile::tempdir().unwrap();
    let text = CONFIG
        .replace("mode = \"central\"", "mode = \"local\"")
        .replace("noise_multiplier = 1.0", "noise_multiplier = 0.5");
    let (config, running, mut clients) = start_with_three_devices(dir.path(), &text).await;
    // A dense "noised" update of norm 4 (C = 1, σ = 0.5, d = 80: honest norms are about 9).
    let values: Vec<f32> = (0..80).map(|i| if i % 2 == 0 { 0.447_213_6 } else { -0.447_213_6 }).collect();
    for c in &mut clients {
        let CoordinatorMessage::Task(task) = c.message().await else { panic!("expected a task") };
        assert_eq!(task.plan.noise, NoiseSettings::Local { multiplier: 0.5 });
        assert_eq!(task.plan.encoding, EncodingKind::Dense);
        assert_eq!(task.plan.clip_norm, Some(1.0));
        c.send(&ClientMessage::Update(ClientUpdate {
            round: task.round,
            base_version: task.model_version,
            update: EncodedUpdate::Dense { shape: shape(), values: values.clone() },
            weight: 1.0,
            metrics: LocalMetrics { loss: f32::NAN, ..LocalMetrics::default() },
        }))
        .await;
        assert!(matches!(c.message().await, CoordinatorMessage::Receipt { .. }));
    }
    let mut handle = running.handle.clone();
    while handle.status().rounds_committed < 1 || handle.status().model_version < ModelVersion(1) {
        handle.status_changed().await.unwrap();
    }
    let status = running.telemetry.status();
    assert_eq!((status.privacy_mode.as_str(), status.epsilon_spent), ("local", 0.0));
    running.shutdown().await;
    let store = Store::open(&config.storage.path).unwrap();
    assert!(store.ledger_entries().unwrap().is_empty(), "the coordinator releases nothing it must account");
    let model = store.latest_checkpoint().unwrap().unwrap().model;
    let initial = config.initial_model().unwrap();
    // The mean of three identical updates, not re-clipped to C = 1: it moved by their full norm 4.
    let moved = model.iter().zip(&initial).map(|(m, x)| f64::from(m - x).powi(2)).sum::<f64>().sqrt();
    assert!((moved - 4.0).abs() < 1e-3, "moved {moved}");
}
