//! Simulated clients that are real SDK devices: every client is a `starling_sdk::Device` with its
//! own (in-memory) SQLite store holding its behaviour events, its consent, its private vector and
//! its privacy ledger, and it trains, clips, noises and charges its ledger through the SDK's own
//! `Device::train` / `Device::record_contribution` — the code an app runs. The harness supplies the
//! session machine, the network and the clock.
//!
//! A client's data becomes app events recorded through `Device::record_batch` (a synthetic user's
//! views, clicks, carts, purchases and skips in their context; a file's interactions as clicks at
//! their timestamps), so validation and the event→example mapping are exercised as on a phone;
//! the device holds out its own latest positive for federated evaluation, as an app's does.

use super::trainer::{ClientData, DeviceModel, MfFleetTrainer, initial_user_vector};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use starling_models::family::ModelDef;
use starling_proto::codec::Codec;
use starling_proto::encoding::EncodedUpdate;
use starling_proto::harness::{TrainJob, TrainResult, Trainer};
use starling_proto::ids::ClientId;
use starling_proto::message::{ClientMessage, ClientUpdate, EvalMetrics, EvalReport};
use starling_proto::session::TrainRequest;
use starling_proto::time::Duration;
use starling_sdk::config::{ParticipationPolicy, PrivacyMode};
use starling_sdk::{ClientConfig, Consent, Device, ModelSpec, Storage};
use std::borrow::Cow;
use std::collections::HashMap;
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

/// The SDK's model settings for `def`.
pub fn model_spec(def: &ModelDef) -> ModelSpec {
    ModelSpec { family: def.name().into(), items: def.items, dim: def.dim, item_bias: false }
}

/// A simulated device's SDK configuration: in memory, on the simulated clock, consent given, any
/// conditions allowed, no retention limits (the data's timestamps are old), no personal fitting,
/// the global model kept in memory only, a seed per client, local-DP noise from the seeded fast
/// sampler; under `local_dp` (δ) the device insists on local noise.
pub fn device_config(client: u64, def: &ModelDef, seed: u64, local_dp: Option<f64>) -> ClientConfig {
    let mut config = ClientConfig::new(ClientId(client), Vec::new(), model_spec(def), Storage::InMemory);
    config.participation = ParticipationPolicy::always();
    config.default_consent = Consent { personalization: true, training: true };
    config.retention.max_events = None;
    config.retention.max_age = None;
    config.personal_epochs = 0;
    config.store_global_model = false;
    // The devices live on the simulated clock (their events are dated by it; retention uses it).
    config.clock = starling_sdk::Clock::manual(SIM_EPOCH_MS);
    config.seed = Some(seed ^ client.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    if let Some(delta) = local_dp {
        config.privacy.mode = PrivacyMode::Local { min_noise_multiplier: 1e-6 };
        config.privacy.delta = delta;
    }
    // Local-DP noise from the seeded fast sampler: runs stay reproducible from the seed and fast
    // (a device in an app uses opendp's sampler; see `ClientConfig::simulation_seeded_noise`).
    config.simulation_seeded_noise = true;
    config
}

/// Trains every simulated client's tasks on its own SDK [`Device`], created (with its events)
/// the first time the client is given a task.
#[derive(Debug)]
pub struct SdkFleetTrainer {
    def: ModelDef,
    init_std: f32,
    data: ClientData,
    devices: HashMap<u64, Device>,
    device_model: DeviceModel,
    seed: u64,
    threads: usize,
    local_dp: Option<f64>,
    codec: Codec,
    train_time: std::time::Duration,
    failures: usize,
    max_device_epsilon: f64,
}

impl SdkFleetTrainer {
    /// Devices training `def`; client `i`'s events come from `data` ([`ClientData::events`]), its
    /// initial private vector is the simulator's `N(0, init_std²)` draw for `i`; under `local_dp`
    /// (δ) the devices insist on local noise.
    pub fn new(
        def: ModelDef,
        init_std: f32,
        data: ClientData,
        device_model: DeviceModel,
        seed: u64,
        threads: usize,
        local_dp: Option<f64>,
    ) -> Self {
        Self {
            def,
            init_std,
            data,
            devices: HashMap::new(),
            device_model,
            seed,
            threads: threads.max(1),
            local_dp,
            codec: Codec::default(),
            train_time: std::time::Duration::ZERO,
            failures: 0,
            max_device_epsilon: 0.0,
        }
    }

    fn open_device(&self, client: u64) -> Result<Device, SdkFleetError> {
        let config = device_config(client, &self.def, self.seed, self.local_dp);
        let err = |e: &dyn std::fmt::Display| SdkFleetError::Device { client, detail: e.to_string() };
        let mut device = Device::open(&config).map_err(|e| err(&e))?;
        device.record_batch(&self.data.events(client), SIM_EPOCH_MS).map_err(|e| err(&e))?;
        let initial = initial_user_vector(self.seed, client, self.def.private_len(), self.init_std);
        device.seed_user_vector(initial).map_err(|e| err(&e))?;
        Ok(device)
    }

    /// Client `user`'s private vector (its initial one if it has no device yet).
    pub fn user_vector(&self, user: u32) -> Cow<'_, [f32]> {
        match self.devices.get(&u64::from(user)).and_then(Device::user_vector) {
            Some(v) => Cow::Borrowed(v),
            None => Cow::Owned(initial_user_vector(
                self.seed,
                u64::from(user),
                self.def.private_len(),
                self.init_std,
            )),
        }
    }

    /// The devices created so far, by client id.
    pub fn devices(&self) -> &HashMap<u64, Device> {
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
    // What the SDK's participant sends (training time 0: simulations are reproducible).
    let metrics = trained.metrics(0);
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

fn evaluate_on_device(codec: &Codec, device: &mut Device, job: &TrainJob) -> Option<EvalMetrics> {
    let req = &job.request;
    let metrics = device.evaluate(req.round, req.model_version, &job.params).ok()?;
    // The exact frame the device sends, for its contribution record.
    let msg =
        ClientMessage::Evaluation(EvalReport { round: req.round, base_version: req.model_version, metrics });
    let bytes = codec.encode_client(&msg).ok()?.len() as u64;
    device.record_evaluation(req.round, bytes, SIM_EPOCH_MS).ok()?;
    Some(metrics)
}

impl SdkFleetTrainer {
    /// Runs `f` on each job's device (created on first use), spread over the worker threads.
    fn on_devices<R: Send>(
        &mut self,
        jobs: &[TrainJob],
        f: impl Fn(&Codec, &mut Device, &TrainJob) -> Option<R> + Sync,
    ) -> Vec<Option<R>> {
        // Take each job's device out (creating it on first use) so worker threads own disjoint state.
        let mut work: Vec<(usize, &TrainJob, Option<Device>)> = Vec::with_capacity(jobs.len());
        for (k, job) in jobs.iter().enumerate() {
            let device = match self.devices.remove(&job.client.0) {
                Some(d) => Some(d),
                None => self.open_device(job.client.0).ok(),
            };
            work.push((k, job, device));
        }
        let chunk = work.len().div_ceil(self.threads).max(1);
        let codec = &self.codec;
        let f = &f;
        let mut results: Vec<Option<R>> = (0..jobs.len()).map(|_| None).collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = work
                .chunks_mut(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter_mut()
                            .map(|(k, job, device)| (*k, device.as_mut().and_then(|d| f(codec, d, job))))
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
        for (_, job, device) in work {
            if let Some(d) = device {
                self.devices.insert(job.client.0, d);
            }
        }
        results
    }
}

impl Trainer for SdkFleetTrainer {
    fn compute_time(&mut self, client: ClientId, request: &TrainRequest, _params: &Arc<[f32]>) -> Duration {
        let examples = self.data.count(client.0) as u32;
        self.device_model.base + self.device_model.per_example * examples * request.plan.epochs.max(1)
    }

    fn train(&mut self, jobs: &[TrainJob]) -> Vec<Option<TrainResult>> {
        let started = WallClock::now();
        let results = self.on_devices(jobs, train_on_device);
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

    fn evaluate(&mut self, jobs: &[TrainJob]) -> Vec<Option<EvalMetrics>> {
        self.on_devices(jobs, evaluate_on_device)
    }
}

/// The simulator's clients: real SDK devices, or the bare training kernel (what the reference
/// workload and the million-client scale run use: the same math without a database per client).
#[derive(Debug)]
pub enum SimTrainer {
    /// Real SDK devices.
    Sdk(Box<SdkFleetTrainer>),
    /// The BPR-MF kernel with one private vector per client.
    Kernel(Box<MfFleetTrainer>),
}

impl SimTrainer {
    /// Client `user`'s private vector.
    pub fn user_vector(&self, user: u32) -> Cow<'_, [f32]> {
        match self {
            SimTrainer::Sdk(t) => t.user_vector(user),
            SimTrainer::Kernel(t) => t.user_vector(user),
        }
    }

    /// Wall-clock training time accumulated since the last call.
    pub fn take_train_time(&mut self) -> std::time::Duration {
        match self {
            SimTrainer::Sdk(t) => t.take_train_time(),
            SimTrainer::Kernel(t) => t.take_train_time(),
        }
    }

    /// The largest ε any device has spent under local DP.
    pub fn max_device_epsilon(&self) -> f64 {
        match self {
            SimTrainer::Sdk(t) => t.max_device_epsilon(),
            SimTrainer::Kernel(t) => t.max_device_epsilon(),
        }
    }

    /// Local trainings that failed so far.
    pub fn failures(&self) -> usize {
        match self {
            SimTrainer::Sdk(t) => t.failures(),
            SimTrainer::Kernel(t) => t.failures(),
        }
    }
}

impl Trainer for SimTrainer {
    fn compute_time(&mut self, client: ClientId, request: &TrainRequest, params: &Arc<[f32]>) -> Duration {
        match self {
            SimTrainer::Sdk(t) => t.compute_time(client, request, params),
            SimTrainer::Kernel(t) => t.compute_time(client, request, params),
        }
    }

    fn train(&mut self, jobs: &[TrainJob]) -> Vec<Option<TrainResult>> {
        match self {
            SimTrainer::Sdk(t) => t.train(jobs),
            SimTrainer::Kernel(t) => t.train(jobs),
        }
    }

    /// SDK devices evaluate on their own held-out data; the bare kernel takes no evaluation tasks.
    fn evaluate(&mut self, jobs: &[TrainJob]) -> Vec<Option<EvalMetrics>> {
        match self {
            SimTrainer::Sdk(t) => t.evaluate(jobs),
            SimTrainer::Kernel(_) => vec![None; jobs.len()],
        }
    }
}
