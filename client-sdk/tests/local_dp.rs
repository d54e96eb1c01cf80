//! Local differential privacy in the SDK, as the untrusted coordinator sees it: where a device's
//! noise comes from (opendp's discrete Gaussian on a grid, from a secure source).

use starling_models::data::events::{Context, DeviceClass, Event, EventKind};
use starling_proto::dp::local::{MAX_GRID_INFLATION, local_sensitivity};
use starling_proto::dp::opendp::grid_exponent;
use starling_proto::encoding::EncodingKind;
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::{NoiseSettings, TrainingPlan};
use starling_sdk::config::{ParticipationPolicy, PrivacyMode};
use starling_sdk::device::{Device, OpenError};
use starling_sdk::{ClientConfig, Clock, Consent, ModelSpec, Storage};
use std::sync::Arc;

const ITEMS: u32 = 60;
const DIM: u32 = 4;
const DAY_MS: i64 = 86_400_000;
const NOW: i64 = 1_780_000_000_000;
const ALL_IN: Consent = Consent { personalization: true, training: true };
const CLIP: f32 = 0.5;

fn config(id: u64, storage: Storage) -> ClientConfig {
    let mut c = ClientConfig::new(ClientId(id), b"token".to_vec(), ModelSpec::mf(ITEMS, DIM), storage);
    c.seed = Some(id);
    c.clock = Clock::manual(NOW);
    c.participation = ParticipationPolicy::always();
    c.privacy.mode = PrivacyMode::Local { min_noise_multiplier: 0.5 };
    c
}

/// `n` events over the catalogue, of every kind, within the last day.
fn events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|k| {
            let kind = match k % 4 {
                0 => EventKind::Purchase,
                1 => EventKind::Click,
                2 => EventKind::View { dwell_ms: 5_000 + k as u32 },
                _ => EventKind::Rating { stars: 5 },
            };
            let at_ms = NOW - DAY_MS + k as i64 * 1000;
            Event {
                item: (k as u32 * 7) % ITEMS,
                at_ms,
                kind,
                context: Context::at(at_ms / 1000, DeviceClass::Phone),
            }
        })
        .collect()
}

fn global() -> Arc<[f32]> {
    (0..ITEMS * DIM).map(|k| ((k % 11) as f32 - 5.0) / 30.0).collect()
}

fn local_plan() -> TrainingPlan {
    TrainingPlan {
        clip_norm: Some(CLIP),
        noise: NoiseSettings::Local { multiplier: 2.0 },
        encoding: EncodingKind::Dense,
        learning_rate: 0.5,
        private_learning_rate: 0.2,
        ..TrainingPlan::default()
    }
}

fn device(id: u64, n_events: usize) -> Device {
    let mut d = Device::open(&config(id, Storage::InMemory)).unwrap();
    d.set_consent(ALL_IN).unwrap();
    d.record_batch(&events(n_events), NOW).unwrap();
    d
}

/// Two devices with the same configuration (seed included) and the same data send different
/// noise: no seed reproduces it. Every value is on opendp's grid 2ᵏ, the coarsest within the
/// rounding allowance for this release (written first: on the code before, the two updates were
/// identical, noised from the device's seeded RNG in `f32`).
#[test]
fn local_noise_comes_from_a_secure_source_on_the_opendp_grid() {
    let trained = || {
        let mut d = device(7, 20);
        d.train(RoundId(1), ModelVersion(1), global(), &local_plan()).unwrap()
    };
    let (a, b) = (trained(), trained());
    assert!(a.release.is_some());
    assert_ne!(a.update.values(), b.update.values(), "the same seed and data give different noise");
    let len = (ITEMS * DIM) as usize;
    let k = grid_exponent(local_sensitivity(f64::from(CLIP)), len, MAX_GRID_INFLATION - 1.0);
    assert_eq!(k, -14, "2C = 1 over 240 values, 0.1 % allowance");
    let scale = 2f64.powi(-k);
    assert!(
        a.update.values().iter().chain(b.update.values()).all(|v| (f64::from(*v) * scale).fract() == 0.0),
        "every value is a multiple of 2^{k}"
    );
}

/// The seeded sampler is for simulations: it reproduces the noise from the seed, and a device
/// with file storage (an app) cannot be opened with it.
#[test]
fn seeded_noise_is_for_in_memory_simulations_only() {
    let seeded = || {
        let mut cfg = config(8, Storage::InMemory);
        cfg.simulation_seeded_noise = true;
        let mut d = Device::open(&cfg).unwrap();
        d.set_consent(ALL_IN).unwrap();
        d.record_batch(&events(20), NOW).unwrap();
        d.train(RoundId(1), ModelVersion(1), global(), &local_plan()).unwrap()
    };
    assert_eq!(seeded().update, seeded().update, "reproducible from the seed");
    let dir = tempfile::tempdir().unwrap();
    let mut app = config(9, Storage::Dir(dir.path().to_path_buf()));
    app.simulation_seeded_noise = true;
    assert!(matches!(Device::open(&app), Err(OpenError::Privacy(_))), "not with file storage");
    let mut unseeded = config(9, Storage::InMemory);
    unseeded.simulation_seeded_noise = true;
    unseeded.seed = None;
    assert!(matches!(Device::open(&unseeded), Err(OpenError::Privacy(_))), "not without a fixed seed");
}
