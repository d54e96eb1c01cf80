//! The simulated clients' local training: real BPR-MF training (the same kernel the SDK runs), each
//! client with its own private user vector, a batch spread over worker threads.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use starling_models::mf::{LocalTraining, MfLayout, local_epochs};
use starling_proto::dp::Delta;
use starling_proto::dp::local::{DeviceLedger, LocalRelease, protect};
use starling_proto::harness::{TrainJob, TrainResult, Trainer};
use starling_proto::ids::ClientId;
use starling_proto::message::LocalMetrics;
use starling_proto::session::TrainRequest;
use starling_proto::time::Duration;
use starling_proto::update::ModelShape;
use std::sync::Arc;
use std::time::Instant as WallClock;

/// How long a simulated device takes: `base + per_example × examples × epochs`, times the device's
/// slowness factor.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceModel {
    /// Fixed cost of a task (download handling, start-up).
    pub base: Duration,
    /// Cost per example and epoch on a reference device.
    pub per_example: Duration,
    /// Per-client slowness factors (1.0 = reference device), indexed by client id.
    pub slowness: Vec<f32>,
}

/// Trains every simulated client's tasks with real BPR-MF.
#[derive(Debug)]
pub struct MfFleetTrainer {
    shape: ModelShape,
    users: Vec<Vec<f32>>,
    positives: Arc<Vec<Vec<u32>>>,
    device: DeviceModel,
    seed: u64,
    threads: usize,
    /// Wall-clock time spent training since the last [`take_train_time`](Self::take_train_time).
    train_time: std::time::Duration,
    failures: usize,
    /// Each device's own ledger under local DP (empty otherwise), indexed by client id.
    ledgers: Vec<Option<DeviceLedger>>,
    ledger_delta: Option<Delta>,
    max_device_epsilon: f64,
}

impl MfFleetTrainer {
    /// `users` holds each client's initial private vector; `positives` each client's training items.
    pub fn new(
        shape: ModelShape,
        users: Vec<Vec<f32>>,
        positives: Arc<Vec<Vec<u32>>>,
        device: DeviceModel,
        seed: u64,
        threads: usize,
    ) -> Self {
        Self {
            shape,
            users,
            positives,
            device,
            seed,
            threads: threads.max(1),
            train_time: std::time::Duration::ZERO,
            failures: 0,
            ledgers: Vec::new(),
            ledger_delta: None,
            max_device_epsilon: 0.0,
        }
    }

    /// Keeps a ledger per device for local-DP releases, measuring ε at `delta`.
    pub fn with_local_ledgers(mut self, delta: Delta) -> Self {
        self.ledger_delta = Some(delta);
        self
    }

    /// The largest ε any device has spent under local DP (the worst-off user).
    pub fn max_device_epsilon(&self) -> f64 {
        self.max_device_epsilon
    }

    fn record_release(&mut self, client: ClientId, release: LocalRelease) {
        let Some(delta) = self.ledger_delta else { return };
        let i = client.0 as usize;
        if self.ledgers.len() <= i {
            self.ledgers.resize(i + 1, None);
        }
        let ledger = self.ledgers[i].get_or_insert_with(|| DeviceLedger::new(delta));
        let eps = ledger.record(release);
        self.max_device_epsilon = self.max_device_epsilon.max(eps);
    }

    /// The private vectors (for evaluation).
    pub fn users(&self) -> &[Vec<f32>] {
        &self.users
    }

    /// Wall-clock training time accumulated since the last call.
    pub fn take_train_time(&mut self) -> std::time::Duration {
        std::mem::take(&mut self.train_time)
    }

    /// Local trainings that failed (diverged or bad input) so far.
    pub fn failures(&self) -> usize {
        self.failures
    }
}

fn plan_to_training(req: &TrainRequest) -> LocalTraining {
    LocalTraining {
        epochs: req.plan.epochs,
        batch_size: req.plan.batch_size.max(1) as usize,
        negatives: req.plan.negatives.max(1),
        item_lr: req.plan.learning_rate,
        user_lr: req.plan.private_learning_rate,
        reg: LocalTraining::default().reg,
    }
}

fn train_one(
    shape: ModelShape,
    seed: u64,
    job: &TrainJob,
    user: &mut [f32],
    positives: &[u32],
) -> Option<(TrainResult, Option<LocalRelease>)> {
    let started = WallClock::now();
    let cfg = plan_to_training(&job.request);
    let stream =
        seed ^ job.client.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ job.request.round.0.rotate_left(32);
    let mut rng = ChaCha8Rng::seed_from_u64(stream);
    let layout = MfLayout::new(shape.rows, shape.row_len);
    let r = local_epochs(layout, &job.params, user, positives, &cfg, &mut rng).ok()?;
    if r.examples == 0 {
        return None;
    }
    // Clip (and under local DP, noise) exactly as the SDK does before anything leaves the device.
    let (update, release) = protect(r.update, &job.request.plan, job.request.round.0, &mut rng).ok()?;
    let train_ms = started.elapsed().as_millis().min(u128::from(u32::MAX)) as u32;
    let result = TrainResult {
        update,
        weight: r.examples as f32,
        metrics: LocalMetrics { loss: r.loss, hit_rate_at_10: None, train_ms },
    };
    Some((result, release))
}

impl Trainer for MfFleetTrainer {
    fn compute_time(&mut self, client: ClientId, request: &TrainRequest, _params: &Arc<[f32]>) -> Duration {
        let i = client.0 as usize;
        let examples = self.positives.get(i).map_or(0, Vec::len) as u32;
        let slow = self.device.slowness.get(i).copied().unwrap_or(1.0).max(0.01);
        (self.device.base + self.device.per_example * examples * request.plan.epochs.max(1)).mul_f32(slow)
    }

    fn train(&mut self, jobs: &[TrainJob]) -> Vec<Option<TrainResult>> {
        let started = WallClock::now();
        // Take each job's private vector out so worker threads own disjoint state.
        let mut work: Vec<(usize, &TrainJob, Vec<f32>)> = jobs
            .iter()
            .enumerate()
            .map(|(k, j)| {
                (k, j, self.users.get_mut(j.client.0 as usize).map(std::mem::take).unwrap_or_default())
            })
            .collect();
        let (shape, seed, positives) = (self.shape, self.seed, &*self.positives);
        let chunk = work.len().div_ceil(self.threads).max(1);
        let mut results: Vec<Option<(TrainResult, Option<LocalRelease>)>> = vec![None; jobs.len()];
        std::thread::scope(|s| {
            let handles: Vec<_> = work
                .chunks_mut(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter_mut()
                            .map(|(k, job, user)| {
                                let pos = positives.get(job.client.0 as usize).map_or(&[][..], Vec::as_slice);
                                let out = if user.len() == shape.row_len as usize {
                                    train_one(shape, seed, job, user, pos)
                                } else {
                                    None
                                };
                                (*k, out)
                            })
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
        for (_, job, user) in work {
            if let Some(slot) = self.users.get_mut(job.client.0 as usize) {
                *slot = user;
            }
        }
        self.failures += results.iter().filter(|r| r.is_none()).count();
        self.train_time += started.elapsed();
        results
            .into_iter()
            .zip(jobs)
            .map(|(r, job)| {
                let (result, release) = r?;
                if let Some(release) = release {
                    self.record_release(job.client, release);
                }
                Some(result)
            })
            .collect()
    }
}
