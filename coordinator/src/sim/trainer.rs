//! The simulated clients' local training: real BPR-MF training (the same kernel the SDK runs), each
//! client with its own private user vector, a batch spread over worker threads.
//!
//! Per-client state is created lazily: a client's private vector is derived from the seed and its
//! id until it first trains, and a synthetic client's data is generated when it is first needed,
//! so a million-client population costs memory only for the clients that have taken part. This is
//! the seam where SDK clients (a `Device` per client) will replace [`MfFleetTrainer`]: anything
//! implementing [`Trainer`] can drive the fleet.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use starling_models::data::events::{Context, DeviceClass, Event, EventKind};
use starling_models::data::synthetic::Population;
use starling_models::data::{Interaction, LeaveOneOut};
use starling_models::mf::{LocalTraining, MfLayout, local_epochs};
use starling_proto::dp::Delta;
use starling_proto::dp::local::{DeviceLedger, LocalNoise, LocalRelease, protect, reported_metadata};
use starling_proto::harness::{TrainJob, TrainResult, Trainer};
use starling_proto::ids::ClientId;
use starling_proto::message::LocalMetrics;
use starling_proto::session::TrainRequest;
use starling_proto::time::Duration;
use starling_proto::update::ModelShape;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant as WallClock;

/// How long a task takes on the reference device: `base + per_example × examples × epochs`. The
/// fleet divides it by each client's compute speed (`FleetConfig::compute_speed`).
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceModel {
    /// Fixed cost of a task (download handling, start-up).
    pub base: Duration,
    /// Cost per example and epoch on the reference device.
    pub per_example: Duration,
}

/// Where each client's training items come from.
#[derive(Clone, Debug)]
pub enum ClientData {
    /// Every user's training items, in memory (a loaded file), indexed by client id, and every
    /// user's interactions (the held-out latest one included) as `(item, timestamp s)`.
    Table {
        /// Training items per user (sorted, deduplicated).
        train: Arc<Vec<Vec<u32>>>,
        /// All interactions per user.
        all: Arc<Vec<Vec<(u32, i64)>>>,
    },
    /// Generated on demand from a synthetic population; each user's latest interaction is held
    /// out (the leave-one-out rule of the evaluation).
    Synthetic(Arc<Population>),
}

impl ClientData {
    /// The training items of `user` (sorted, deduplicated) and its held-out test item.
    pub fn split_user(population: &Population, user: u64) -> (Vec<u32>, Option<u32>) {
        let interactions: Vec<Interaction> =
            population.user(user).interactions.into_iter().map(|x| Interaction { user: 0, ..x }).collect();
        let mut split = LeaveOneOut::split(&interactions, 1, population.items());
        (split.train.pop().unwrap_or_default(), split.test.pop().flatten())
    }

    pub(crate) fn count(&self, user: u64) -> usize {
        match self {
            ClientData::Table { train, .. } => train.get(user as usize).map_or(0, Vec::len),
            ClientData::Synthetic(p) if user < p.users() => {
                let n = p.interaction_count(user);
                if n >= 2 { n - 1 } else { n }
            }
            ClientData::Synthetic(_) => 0,
        }
    }

    pub(crate) fn positives(&self, user: u64) -> Cow<'_, [u32]> {
        match self {
            ClientData::Table { train, .. } => {
                Cow::Borrowed(train.get(user as usize).map_or(&[][..], Vec::as_slice))
            }
            ClientData::Synthetic(p) if user < p.users() => Cow::Owned(Self::split_user(p, user).0),
            ClientData::Synthetic(_) => Cow::Borrowed(&[]),
        }
    }
}

impl ClientData {
    /// Everything user `user`'s device records, its latest positive (the held-out one) included:
    /// a synthetic user's app events (views, clicks, carts, purchases and skips, in context), or
    /// one `Click` per interaction of a file, at its timestamp (context from the time, on a phone).
    /// A device holding out its latest positive trains on exactly its training positives (`positives`).
    pub fn events(&self, user: u64) -> Vec<Event> {
        match self {
            ClientData::Table { all, .. } => all
                .get(user as usize)
                .map(|rows| {
                    rows.iter()
                        .map(|&(item, t)| Event {
                            item,
                            at_ms: t.saturating_mul(1000),
                            kind: EventKind::Click,
                            context: Context::at(t, DeviceClass::Phone),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            ClientData::Synthetic(p) if user < p.users() => p.user_events(user),
            ClientData::Synthetic(_) => Vec::new(),
        }
    }
}

/// A client's initial private vector: `N(0, std²)` per value, a pure function of the seed and the id.
pub fn initial_user_vector(seed: u64, user: u64, dim: usize, std: f32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed ^ 0x5EED_0F01_2345_6789 ^ user.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    (0..dim).map(|_| rng.sample::<f32, _>(StandardNormal) * std).collect()
}

/// Trains every simulated client's tasks with real BPR-MF.
#[derive(Debug)]
pub struct MfFleetTrainer {
    shape: ModelShape,
    /// Each client's private vector once it has trained (empty until then: derived from the seed).
    users: Vec<Vec<f32>>,
    init_std: f32,
    data: ClientData,
    /// Synthetic clients' generated training items, kept once generated.
    generated: HashMap<u64, Arc<[u32]>>,
    device: DeviceModel,
    seed: u64,
    threads: usize,
    /// Wall-clock time spent training since the last [`take_train_time`](Self::take_train_time).
    train_time: std::time::Duration,
    failures: usize,
    /// Each device's own ledger under local DP, created on its first release.
    ledgers: HashMap<u64, DeviceLedger>,
    ledger_delta: Option<Delta>,
    max_device_epsilon: f64,
}

impl MfFleetTrainer {
    /// A trainer for `clients` clients whose initial private vectors are `N(0, init_std²)` and whose
    /// training items come from `data`.
    pub fn new(
        shape: ModelShape,
        clients: usize,
        init_std: f32,
        data: ClientData,
        device: DeviceModel,
        seed: u64,
        threads: usize,
    ) -> Self {
        let mut users = Vec::new();
        users.resize_with(clients, Vec::new);
        Self {
            shape,
            users,
            init_std,
            data,
            generated: HashMap::new(),
            device,
            seed,
            threads: threads.max(1),
            train_time: std::time::Duration::ZERO,
            failures: 0,
            ledgers: HashMap::new(),
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
        let ledger = self.ledgers.entry(client.0).or_insert_with(|| DeviceLedger::new(delta));
        let eps = ledger.record(release);
        self.max_device_epsilon = self.max_device_epsilon.max(eps);
    }

    /// Client `user`'s private vector (its initial one if it has never trained).
    pub fn user_vector(&self, user: u32) -> Cow<'_, [f32]> {
        match self.users.get(user as usize) {
            Some(v) if !v.is_empty() => Cow::Borrowed(v),
            _ => Cow::Owned(initial_user_vector(
                self.seed,
                u64::from(user),
                self.shape.row_len as usize,
                self.init_std,
            )),
        }
    }

    /// Clients whose private vector has been materialised (they have trained at least once).
    pub fn trained_clients(&self) -> usize {
        self.users.iter().filter(|v| !v.is_empty()).count()
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
    // Clip (and under local DP, noise) as the SDK does before anything leaves the device, with
    // the seeded fast sampler (simulations stay reproducible; devices use opendp's).
    let plan = &job.request.plan;
    let norm_within_clip = starling_proto::dp::clip_indicator(&r.update, plan);
    let noise = LocalNoise::SimulationSeeded;
    let (update, release) = protect(r.update, plan, job.request.round.0, noise, &mut rng).ok()?;
    let train_ms = started.elapsed().as_millis().min(u128::from(u32::MAX)) as u32;
    // Under local DP, as the SDK: weight 1 and no data-dependent metrics.
    let measured = LocalMetrics { loss: r.loss, hit_rate_at_10: None, train_ms, norm_within_clip };
    let (weight, metrics) = reported_metadata(plan, r.examples as f32, measured);
    let result = TrainResult { update, weight, metrics };
    Some((result, release))
}

/// One job's private state while a worker thread trains it.
struct Work<'a> {
    index: usize,
    job: &'a TrainJob,
    user: Vec<f32>,
    /// Already-known training items (tables, or generated earlier); `None`: generate them.
    positives: Option<Arc<[u32]>>,
    generated: Option<Arc<[u32]>>,
    out: Option<(TrainResult, Option<LocalRelease>)>,
}

impl Trainer for MfFleetTrainer {
    fn compute_time(&mut self, client: ClientId, request: &TrainRequest, _params: &Arc<[f32]>) -> Duration {
        let examples = match self.generated.get(&client.0) {
            Some(p) => p.len(),
            None => self.data.count(client.0),
        } as u32;
        self.device.base + self.device.per_example * examples * request.plan.epochs.max(1)
    }

    fn train(&mut self, jobs: &[TrainJob]) -> Vec<Option<TrainResult>> {
        let started = WallClock::now();
        let dim = self.shape.row_len as usize;
        // Take each job's private vector out so worker threads own disjoint state.
        let mut work: Vec<Work<'_>> = jobs
            .iter()
            .enumerate()
            .map(|(index, job)| {
                let i = job.client.0;
                let user = match self.users.get_mut(i as usize) {
                    Some(v) if !v.is_empty() => std::mem::take(v),
                    Some(_) => initial_user_vector(self.seed, i, dim, self.init_std),
                    None => Vec::new(),
                };
                let positives = match &self.data {
                    ClientData::Table { .. } => None,
                    ClientData::Synthetic(_) => self.generated.get(&i).cloned(),
                };
                Work { index, job, user, positives, generated: None, out: None }
            })
            .collect();
        let (shape, seed, data) = (self.shape, self.seed, &self.data);
        let chunk = work.len().div_ceil(self.threads).max(1);
        std::thread::scope(|s| {
            for part in work.chunks_mut(chunk) {
                s.spawn(move || {
                    for w in part {
                        let positives: Cow<'_, [u32]> = match &w.positives {
                            Some(p) => Cow::Borrowed(p),
                            None => data.positives(w.job.client.0),
                        };
                        if w.user.len() == shape.row_len as usize {
                            w.out = train_one(shape, seed, w.job, &mut w.user, &positives);
                        }
                        if w.positives.is_none() && matches!(data, ClientData::Synthetic(_)) {
                            w.generated = Some(positives.into_owned().into());
                        }
                    }
                });
            }
        });
        let mut results: Vec<Option<(TrainResult, Option<LocalRelease>)>> = vec![None; jobs.len()];
        for w in work {
            let i = w.job.client.0;
            if let Some(slot) = self.users.get_mut(i as usize) {
                *slot = w.user;
            }
            if let Some(g) = w.generated {
                self.generated.insert(i, g);
            }
            results[w.index] = w.out;
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

#[cfg(test)]
mod tests {
    use super::*;
    use starling_models::data::synthetic::SyntheticConfig;

    #[test]
    fn synthetic_clients_are_split_like_the_evaluation_and_counted_without_generating() {
        let pop = Population::new(SyntheticConfig {
            users: 50,
            items: 300,
            max_interactions: 100,
            ..SyntheticConfig::default()
        })
        .expect("population");
        let all = LeaveOneOut::split(&pop.interactions(50), 50, 300);
        let data = ClientData::Synthetic(Arc::new(pop.clone()));
        for u in 0..50u64 {
            let (train, test) = ClientData::split_user(&pop, u);
            assert_eq!(train, all.train[u as usize]);
            assert_eq!(test, all.test[u as usize]);
            assert_eq!(data.count(u), train.len());
        }
        assert_eq!(data.count(50), 0, "outside the population");
    }

    #[test]
    fn initial_vectors_are_per_client_and_reproducible() {
        let a = initial_user_vector(3, 10, 32, 0.1);
        assert_eq!(a, initial_user_vector(3, 10, 32, 0.1));
        assert_ne!(a, initial_user_vector(3, 11, 32, 0.1));
        assert_ne!(a, initial_user_vector(4, 10, 32, 0.1));
        let sd = (a.iter().map(|x| x * x).sum::<f32>() / 32.0).sqrt();
        assert!(sd > 0.03 && sd < 0.3, "{sd}");
    }
}
