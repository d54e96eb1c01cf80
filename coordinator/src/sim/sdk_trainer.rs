//! Simulated clients that are real SDK devices: every client is a `starling_sdk::Device` with its
//! own (in-memory) SQLite store holding its behaviour events, its consent, its private vector and
//! its privacy ledger, and it trains, clips, noises and charges its ledger through the SDK's own
//! `Device::train` / `Device::record_contribution` — the code an app runs. The harness supplies the
//! session machine, the network and the clock.
//!
//! A client's training data becomes app events (one `Click` per training interaction, dated within
//! the last day of the simulated clock) recorded through `Device::record_batch`, so validation,
//! retention and the event→example mapping are exercised as on a phone.

use super::trainer::DeviceModel;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use starling_models::data::events::{Context, DeviceClass, Event, EventKind};
use starling_proto::codec::Codec;
use starling_proto::encoding::EncodedUpdate;
use starling_proto::harness::{TrainJob, TrainResult, Trainer};
use starling_proto::ids::ClientId;
use starling_proto::message::{ClientMessage, ClientUpdate, LocalMetrics};
use starling_proto::session::TrainRequest;
use starling_proto::time::Duration;
use starling_sdk::config::{ParticipationPolicy, PrivacyMode};
use starling_sdk::{ClientConfig, Consent, Device, ModelSpec, Storage};
use std::sync::Arc;
use std::time::Instant as WallClock;

/// The simulated wall clock the devices' events and ledgers are dated by (2026-11-01).
pub const SIM_EPOCH_MS: i64 = 1_793_491_200_000;

/// Why the SDK fleet could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SdkFleetError {
    /// A device could not be opened.
    #[error("device {client}: {detail}")]
    Device {
        /// The client.
        client: u64,
        /// What failed.
        detail: String,
    },
}

/// Trains every simulated client's tasks on its own SDK [`Device`].
#[derive(Debug)]
pub struct SdkFleetTrainer {
    devices: Vec<Device>,
    positives: Vec<u32>,
    device_model: DeviceModel,
    threads: usize,
    codec: Codec,
    train_time: std::time::Duration,
    failures: usize,
    max_device_epsilon: f64,
}

impl SdkFleetTrainer {
    /// One device per entry of `positives` (client `i` gets `positives[i]` as click events),
    /// model `items × dim`; under `local_dp` the devices insist on local noise.
    pub fn new(
        items: u32,
        dim: u32,
        positives: &[Vec<u32>],
        device_model: DeviceModel,
        seed: u64,
        threads: usize,
        local_dp: Option<f64>,
    ) -> Result<Self, SdkFleetError> {
        let mut devices = Vec::with_capacity(positives.len());
        let mut counts = Vec::with_capacity(positives.len());
        for (i, items_of_user) in positives.iter().enumerate() {
            let client = i as u64;
            let mut config = ClientConfig::new(ClientId(client), Vec::new(), ModelSpec::mf(items, dim), Storage::InMemory);
            config.participation = ParticipationPolicy::always();
            config.default_consent = Consent { personalization: true, training: true };
            config.retention.max_events = None;
            config.personal_epochs = 0;
            config.store_global_model = false;
            config.seed = Some(seed ^ client.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            if let Some(delta) = local_dp {
                config.privacy.mode = PrivacyMode::Local { min_noise_multiplier: 1e-6 };
                config.privacy.delta = delta;
            }
            let err = |e: &dyn std::fmt::Display| SdkFleetError::Device { client, detail: e.to_string() };
            let mut device = Device::open(&config).map_err(|e| err(&e))?;
            let n = items_of_user.len() as i64;
            let events: Vec<Event> = items_of_user
                .iter()
                .enumerate()
                .map(|(k, &item)| {
                    let at_ms = SIM_EPOCH_MS - 3_600_000 + (k as i64 - n) * 1000;
                    Event { item, at_ms, kind: EventKind::Click, context: Context::at(at_ms / 1000, DeviceClass::Phone) }
                })
                .collect();
            device.record_batch(&events, SIM_EPOCH_MS).map_err(|e| err(&e))?;
            device.ensure_user_vector().map_err(|e| err(&e))?;
            counts.push(items_of_user.len() as u32);
            devices.push(device);
        }
        Ok(Self {
            devices,
            positives: counts,
            device_model,
            threads: threads.max(1),
            codec: Codec::default(),
            train_time: std::time::Duration::ZERO,
            failures: 0,
            max_device_epsilon: 0.0,
        })
    }

    /// Client `i`'s private vector (empty if unknown).
    pub fn user(&self, i: usize) -> &[f32] {
        self.devices.get(i).and_then(Device::user_vector).unwrap_or(&[])
    }

    /// The devices (for inspection: privacy reports, exports).
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Wall-clock training time accumulated since the last call.
    pub fn take_train_time(&mut self) -> std::time::Duration {
        std::mem::take(&mut self.train_time)
    }

    /// Local trainings that failed or were refused so far.
    pub fn failures(&self) -> usize {
        self.failures
    }

    /// The largest ε any device has spent under local DP.
    pub fn max_device_epsilon(&self) -> f64 {
        self.max_device_epsilon
    }
}

fn train_on_device(codec: &Codec, device: &mut Device, job: &TrainJob) -> Option<(TrainResult, f64)> {
    let req = &job.request;
    let trained = device.train(req.round, req.model_version, job.params.clone(), &req.plan).ok()?;
    // The exact frame the device sends, for its ledger's byte count.
    let stream = job.client.0 ^ req.round.0.rotate_left(32);
    let mut rng = ChaCha8Rng::seed_from_u64(stream);
    let encoded = EncodedUpdate::encode(&trained.update, req.plan.encoding, &mut rng);
    let metrics = LocalMetrics { loss: trained.loss, hit_rate_at_10: None, train_ms: 0 };
    let msg = ClientMessage::Update(ClientUpdate {
        round: req.round,
        base_version: req.model_version,
        update: encoded,
        weight: trained.weight,
        metrics,
    });
    let bytes = codec.encode_client(&msg).ok()?.len() as u64;
    let epsilon = device.record_contribution(req.round, bytes, &trained, SIM_EPOCH_MS).ok()?;
    Some((TrainResult { update: trained.update, weight: trained.weight, metrics }, epsilon))
}

impl Trainer for SdkFleetTrainer {
    fn compute_time(&mut self, client: ClientId, request: &TrainRequest, _params: &Arc<[f32]>) -> Duration {
        let i = client.0 as usize;
        let examples = self.positives.get(i).copied().unwrap_or(0);
        let slow = self.device_model.slowness.get(i).copied().unwrap_or(1.0).max(0.01);
        (self.device_model.base + self.device_model.per_example * examples * request.plan.epochs.max(1)).mul_f32(slow)
    }

    fn train(&mut self, jobs: &[TrainJob]) -> Vec<Option<TrainResult>> {
        let started = WallClock::now();
        // Pair each job with its device; devices are disjoint, so they can train in parallel.
        let mut slots: Vec<Option<&mut Device>> = self.devices.iter_mut().map(Some).collect();
        let mut work: Vec<(usize, &TrainJob, Option<&mut Device>)> = jobs
            .iter()
            .enumerate()
            .map(|(k, j)| (k, j, slots.get_mut(j.client.0 as usize).and_then(Option::take)))
            .collect();
        let chunk = work.len().div_ceil(self.threads).max(1);
        let codec = &self.codec;
        let mut results: Vec<Option<(TrainResult, f64)>> = vec![None; jobs.len()];
        std::thread::scope(|s| {
            let handles: Vec<_> = work
                .chunks_mut(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter_mut()
                            .map(|(k, job, device)| (*k, device.as_deref_mut().and_then(|d| train_on_device(codec, d, job))))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for h in handles {
                if let Ok(part) = h.join() {
                    for (k, out) in part {
                        results[k] = out;
                    }
                }
            }
        });
        self.failures += results.iter().filter(|r| r.is_none()).count();
        self.train_time += started.elapsed();
        results
            .into_iter()
            .map(|r| {
                let (result, eps) = r?;
                self.max_device_epsilon = self.max_device_epsilon.max(eps);
                Some(result)
            })
            .collect()
    }
}
