//! A deterministic, in-memory fleet: one [`Orchestrator`], N [`Session`]s, a virtual clock and a
//! seeded network, in the manner of quinn-proto's test `Pair`.
//!
//! Every message really goes through the [`Codec`] (so byte counts are real), and is delivered
//! after a seeded latency plus its transfer time over the client's link. Training is done by a
//! [`Trainer`] the caller supplies (a fake one in the engine's tests, a real model in the
//! simulator). Time only moves when nothing can happen sooner, so a run takes as long as its
//! computation, not its simulated duration, and the same seed gives byte-identical runs.
//!
//! # The device and network model ([`FleetConfig`])
//! - **Latency**: every message takes `latency` plus a uniform jitter in `0..=jitter`.
//! - **Bandwidth**: each client has an uplink and a downlink rate (bytes per second) drawn from a
//!   [`PerClient`] distribution; a message takes `bytes / rate` on top of its latency. Links are
//!   not shared (no contention between clients).
//! - **Compute speed**: each client has a speed factor (1.0 = the reference device the
//!   [`Trainer`] times); a task takes the trainer's reference time divided by the speed.
//! - **Daily availability**: with [`Availability`], each client is reachable only inside its own
//!   window of the simulated day (start and length drawn per client). Clients outside their window
//!   do not check in, and a client whose window closes before it finishes training drops out at
//!   that moment, as a phone taken off the charger does.
//! - **Check-in rate**: each available client checks in for a given round with probability
//!   `check_in_probability`, at a uniform time in `0..=check_in_spread` after the round starts.
//! - **Dropouts**: a selected client vanishes with probability `dropout` at a uniform point of its
//!   training time.
//! - **Round pacing**: rounds start at least `round_interval` apart, so a run can span days.
//!
//! Every per-client quantity is a pure function of the seed and the client id, so nothing is stored
//! per client; a client's session machine exists only while it has something to remember (a
//! running session, a "come back later" time, a cached model) and is created when it first checks
//! in. A million-client fleet therefore costs memory only for the clients a round touches.

use crate::codec::{Codec, Inbound};
use crate::encoding::EncodedUpdate;
use crate::ids::{ClientId, ModelVersion, RoundId};
use crate::message::{
    Capabilities, CoordinatorMessage, DeviceConditions, EvalMetrics, LocalMetrics, ModelPayload, TaskKind,
    TrainingPlan, WithdrawReason,
};
use crate::round::{FederatedEval, Orchestrator, RoundEvent, StartError};
use crate::session::{Session, SessionAction, SessionConfig, SessionOutcome, TrainRequest};
use crate::time::{Duration, Instant};
use crate::update::Update;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
/// What a trainer returns for one task.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainResult {
    /// The delta to the global parameters.
    pub update: Update,
    /// Aggregation weight (number of examples).
    pub weight: f32,
    /// Local metrics.
    pub metrics: LocalMetrics,
}

/// One task handed to a [`Trainer`].
#[derive(Clone, Debug)]
pub struct TrainJob {
    /// The client that trains.
    pub client: ClientId,
    /// The task.
    pub request: TrainRequest,
    /// The global parameters to train from (shared, not copied, when the task shipped the full model).
    pub params: Arc<[f32]>,
}

/// Local training (and evaluation), as the fleet's clients do it.
///
/// The fleet first asks how long a task takes on the client's device (simulated time, which decides
/// when the result is submitted and so who misses deadlines), and later runs every task that is
/// due in one batch, so an implementation can spread a batch over all cores.
///
/// Evaluation tasks ([`TaskKind::Evaluate`] in the job's `request.kind`, from
/// [`Fleet::run_evaluation`]) go through the same two steps: [`compute_time`](Self::compute_time)
/// (the request says which kind it is), then [`evaluate`](Self::evaluate) in a batch; the device
/// sends the figures without training and must change nothing it holds.
pub trait Trainer {
    /// Simulated time `client` needs for `request` (training from, or evaluating, `params`) on the
    /// reference device; the fleet divides it by the client's compute speed
    /// ([`FleetConfig::compute_speed`]).
    fn compute_time(&mut self, client: ClientId, request: &TrainRequest, params: &Arc<[f32]>) -> Duration;
    /// Trains `jobs` (in any order, possibly in parallel) and returns one result per job, in order.
    /// `None` means that client's training failed (it withdraws).
    fn train(&mut self, jobs: &[TrainJob]) -> Vec<Option<TrainResult>>;
    /// Evaluates `params` of every job on its client's held-out data and returns one result per
    /// job, in order: the **sums** over the client's evaluation cases (at most
    /// [`MAX_EVAL_CASES`](crate::round::MAX_EVAL_CASES)), as [`EvalMetrics`] says. `None` means
    /// the client has nothing to report (it withdraws). The default answers `None` for every job.
    fn evaluate(&mut self, jobs: &[TrainJob]) -> Vec<Option<EvalMetrics>> {
        vec![None; jobs.len()]
    }
}

/// Adapts a closure that trains one job and says how long it took into a [`Trainer`]. The closure
/// runs when the task arrives (serially); handy for tests and small examples. It answers no
/// evaluation task (the default [`Trainer::evaluate`]).
pub struct FnTrainer<F> {
    f: F,
    done: HashMap<(ClientId, RoundId), Option<TrainResult>>,
}

impl<F> FnTrainer<F>
where
    F: FnMut(ClientId, &TrainRequest, &[f32]) -> Option<(TrainResult, Duration)>,
{
    /// Wraps `f(client, request, params) -> Some((result, compute time))`.
    pub fn new(f: F) -> Self {
        Self { f, done: HashMap::new() }
    }
}

impl<F> Trainer for FnTrainer<F>
where
    F: FnMut(ClientId, &TrainRequest, &[f32]) -> Option<(TrainResult, Duration)>,
{
    /// Evaluation tasks take no time and the closure is not called: an [`FnTrainer`] does not
    /// evaluate (its clients withdraw from evaluation rounds).
    fn compute_time(&mut self, client: ClientId, request: &TrainRequest, params: &Arc<[f32]>) -> Duration {
        if request.kind == TaskKind::Evaluate {
            return Duration::ZERO;
        }
        let out = (self.f)(client, request, params);
        let compute = out.as_ref().map_or(Duration::ZERO, |(_, d)| *d);
        self.done.insert((client, request.round), out.map(|(r, _)| r));
        compute
    }

    fn train(&mut self, jobs: &[TrainJob]) -> Vec<Option<TrainResult>> {
        jobs.iter().map(|j| self.done.remove(&(j.client, j.request.round)).flatten()).collect()
    }
}

/// A per-client quantity (compute speed, bandwidth, availability window), drawn for each client
/// from its own hash of the fleet's seed and the client id: the same client always gets the same
/// value, and nothing is stored per client.
#[derive(Clone, Debug, PartialEq)]
pub enum PerClient {
    /// Every client gets this value.
    Fixed(f64),
    /// `median · exp(sigma · z)` with `z` standard normal (heavy right tail, like device speeds and
    /// bandwidths in real fleets).
    LogNormal {
        /// The median.
        median: f64,
        /// Standard deviation of the logarithm.
        sigma: f64,
    },
    /// `mean + sd · z` with `z` standard normal.
    Normal {
        /// The mean.
        mean: f64,
        /// The standard deviation.
        sd: f64,
    },
    /// Uniform in `low..high`.
    Uniform {
        /// Lower bound.
        low: f64,
        /// Upper bound.
        high: f64,
    },
}

/// Streams of per-client draws (one per quantity, so they are independent).
const STREAM_SPEED: u64 = 1;
const STREAM_UPLINK: u64 = 2;
const STREAM_DOWNLINK: u64 = 3;
const STREAM_WINDOW_START: u64 = 4;
const STREAM_WINDOW_LENGTH: u64 = 5;

/// SplitMix64's finaliser: a well-mixed 64-bit hash.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in the open interval (0, 1), a pure function of its arguments.
fn unit(seed: u64, client: ClientId, stream: u64, k: u64) -> f64 {
    let h = mix64(
        mix64(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F))
            ^ client.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ k.wrapping_mul(0xE703_7ED1_A0B4_28DB),
    );
    ((h >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

impl PerClient {
    /// `client`'s value of the quantity drawn from `stream` under `seed`.
    pub fn draw(&self, seed: u64, client: ClientId, stream: u64) -> f64 {
        let normal = || {
            // Box–Muller on two independent uniforms.
            let (u1, u2) = (unit(seed, client, stream, 0), unit(seed, client, stream, 1));
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        };
        match *self {
            PerClient::Fixed(v) => v,
            PerClient::LogNormal { median, sigma } => median * (sigma * normal()).exp(),
            PerClient::Normal { mean, sd } => mean + sd * normal(),
            PerClient::Uniform { low, high } => low + (high - low) * unit(seed, client, stream, 0),
        }
    }

    /// Whether every parameter is finite (and spreads are non-negative).
    pub fn is_valid(&self) -> bool {
        match *self {
            PerClient::Fixed(v) => v.is_finite(),
            PerClient::LogNormal { median, sigma } => median.is_finite() && sigma.is_finite() && sigma >= 0.0,
            PerClient::Normal { mean, sd } => mean.is_finite() && sd.is_finite() && sd >= 0.0,
            PerClient::Uniform { low, high } => low.is_finite() && high.is_finite() && low <= high,
        }
    }
}

/// Daily availability: each client is reachable only inside one window of the simulated day.
#[derive(Clone, Debug, PartialEq)]
pub struct Availability {
    /// Length of the simulated day.
    pub day: Duration,
    /// Where each client's window opens, as a fraction of the day (taken modulo 1, so a window
    /// may wrap past midnight). `Uniform { low: 0.0, high: 1.0 }` spreads windows evenly;
    /// `Normal { mean: 0.9, sd: 0.05 }` makes most clients available around the same hour (e.g.
    /// overnight, on the charger).
    pub start: PerClient,
    /// How long each client's window lasts, as a fraction of the day (clamped to `0..=1`; 1 means
    /// always available).
    pub length: PerClient,
}

impl Availability {
    /// The end of `client`'s current window if it is available at `at`; `None` if it is not.
    pub fn available_until(&self, seed: u64, client: ClientId, at: Instant) -> Option<Instant> {
        let day = u64::try_from(self.day.as_micros()).unwrap_or(u64::MAX).max(1);
        let length = self.length.draw(seed, client, STREAM_WINDOW_LENGTH);
        let length = if length.is_finite() { length.clamp(0.0, 1.0) } else { 0.0 };
        if length >= 1.0 {
            return Some(Instant::from_micros(u64::MAX));
        }
        let start = self.start.draw(seed, client, STREAM_WINDOW_START);
        let start = if start.is_finite() { start.rem_euclid(1.0) } else { 0.0 };
        let (start, length) = ((start * day as f64) as u64 % day, (length * day as f64) as u64);
        let into = (at.as_micros() % day + day - start) % day;
        (into < length).then(|| at + Duration::from_micros(length - into))
    }
}

/// Network and device behaviour of the simulated fleet (see the module docs for the model).
#[derive(Clone, Debug, PartialEq)]
pub struct FleetConfig {
    /// One-way latency, before jitter.
    pub latency: Duration,
    /// Extra latency drawn uniformly from `0..=jitter` per message.
    pub jitter: Duration,
    /// Each client's uplink rate in bytes per second (`None`: unlimited). Values that are not
    /// positive count as unlimited.
    pub uplink: Option<PerClient>,
    /// Each client's downlink rate in bytes per second (`None`: unlimited).
    pub downlink: Option<PerClient>,
    /// Each client's compute speed relative to the trainer's reference device (1.0 = as fast;
    /// values are clamped to at least 0.001).
    pub compute_speed: PerClient,
    /// Daily availability windows (`None`: every client is always reachable).
    pub availability: Option<Availability>,
    /// Probability that an available client checks in for a given round.
    pub check_in_probability: f64,
    /// Probability that a selected client vanishes after receiving its task (its connection drops
    /// at a random point before it would have reported).
    pub dropout: f64,
    /// Spread of check-ins after a round starts: each client checks in at a uniform time in
    /// `0..=check_in_spread`.
    pub check_in_spread: Duration,
    /// Rounds start at least this far apart in simulated time (zero: as soon as the last settles).
    pub round_interval: Duration,
    /// Device conditions every client reports.
    pub conditions: DeviceConditions,
    /// Seed of the network's and devices' randomness.
    pub seed: u64,
    /// Session answer timeout.
    pub response_timeout: Duration,
    /// Model family the clients run.
    pub model_family: String,
    /// Whether clients keep the last model they received (needed for patch downloads; costs one
    /// model per client unless tasks ship the shared full model).
    pub cache_models: bool,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            latency: Duration::from_millis(20),
            jitter: Duration::from_millis(10),
            uplink: None,
            downlink: None,
            compute_speed: PerClient::Fixed(1.0),
            availability: None,
            check_in_probability: 1.0,
            dropout: 0.0,
            check_in_spread: Duration::from_millis(100),
            round_interval: Duration::ZERO,
            conditions: DeviceConditions { charging: true, unmetered: true, idle: true, battery_percent: 90 },
            seed: 0,
            response_timeout: Duration::from_secs(120),
            model_family: "test".into(),
            cache_models: true,
        }
    }
}

/// Why a [`FleetConfig`] is invalid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FleetConfigError {
    /// A probability is outside `0..=1` (or NaN); the text names it.
    #[error("{0} must be a probability in [0, 1]")]
    Probability(&'static str),
    /// A distribution has a non-finite parameter or a negative spread; the text names it.
    #[error("{0} has an invalid distribution")]
    Distribution(&'static str),
    /// The availability day is zero.
    #[error("the availability day must be longer than zero")]
    EmptyDay,
}

impl FleetConfig {
    /// Checks every setting. [`Fleet::new`] does not require it (it treats bad values leniently:
    /// a rate that is not positive is unlimited, a speed is clamped), but a host taking settings
    /// from a user should call it.
    pub fn validate(&self) -> Result<(), FleetConfigError> {
        let p = |v: f64, name| {
            if (0.0..=1.0).contains(&v) { Ok(()) } else { Err(FleetConfigError::Probability(name)) }
        };
        p(self.dropout, "dropout")?;
        p(self.check_in_probability, "check_in_probability")?;
        let d = |v: &PerClient, name| {
            if v.is_valid() { Ok(()) } else { Err(FleetConfigError::Distribution(name)) }
        };
        d(&self.compute_speed, "compute_speed")?;
        if let Some(u) = &self.uplink {
            d(u, "uplink")?;
        }
        if let Some(u) = &self.downlink {
            d(u, "downlink")?;
        }
        if let Some(a) = &self.availability {
            d(&a.start, "availability start")?;
            d(&a.length, "availability length")?;
            if a.day.is_zero() {
                return Err(FleetConfigError::EmptyDay);
            }
        }
        Ok(())
    }

    /// `client`'s compute speed factor.
    pub fn speed_of(&self, client: ClientId) -> f64 {
        let s = self.compute_speed.draw(self.seed, client, STREAM_SPEED);
        if s.is_finite() { s.max(0.001) } else { 1.0 }
    }

    /// Time `bytes` take over `client`'s uplink (`up`) or downlink.
    pub fn transfer_time(&self, client: ClientId, bytes: usize, up: bool) -> Duration {
        let (link, stream) =
            if up { (&self.uplink, STREAM_UPLINK) } else { (&self.downlink, STREAM_DOWNLINK) };
        let Some(link) = link else { return Duration::ZERO };
        let rate = link.draw(self.seed, client, stream);
        if !(rate > 0.0 && rate.is_finite()) {
            return Duration::ZERO;
        }
        Duration::try_from_secs_f64(bytes as f64 / rate).unwrap_or(Duration::MAX)
    }

    /// The end of `client`'s availability window if it is reachable at `at`, else `None`.
    pub fn available_until(&self, client: ClientId, at: Instant) -> Option<Instant> {
        match &self.availability {
            None => Some(Instant::from_micros(u64::MAX)),
            Some(a) => a.available_until(self.seed, client, at),
        }
    }
}

/// What one round did, as seen from the whole fleet.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetRound {
    /// The round.
    pub round: RoundId,
    /// Every orchestrator event of the round, in order.
    pub events: Vec<RoundEvent>,
    /// Every session outcome of the round, in order, with the client.
    pub outcomes: Vec<(ClientId, SessionOutcome)>,
    /// Clients that tried to check in (available, online and willing this round).
    pub check_ins: usize,
    /// Selected clients whose availability window closed before they finished training.
    pub window_closed: usize,
    /// Bytes sent by clients (frames, headers included).
    pub bytes_up: u64,
    /// Bytes sent by the coordinator.
    pub bytes_down: u64,
    /// Bytes by message kind ([`ClientMessage::kind`](crate::message::ClientMessage::kind) for
    /// uploads, [`CoordinatorMessage::kind`] for downloads), frames included: `(kind, up, down)`.
    pub traffic: BTreeMap<&'static str, (u64, u64)>,
    /// Host CPU time by step, when the host gave the fleet a clock ([`Fleet::set_cpu_clock`]):
    /// `"device: <inbound kind>"` (the session handling a coordinator message),
    /// `"device: encode + mask"` (submitting a trained update, which under secure aggregation
    /// encodes, noises and masks it), `"coordinator: <inbound kind>"` (the round engine handling a
    /// client message, including any phase it closes) and `"coordinator: deadlines"`. Training
    /// itself is not included. Totals over all clients, with the number of calls.
    pub cpu: BTreeMap<&'static str, (Duration, u64)>,
    /// Virtual time the round took.
    pub duration: Duration,
    /// What an evaluation round ([`Fleet::run_evaluation`]) released, if it did; `None` for
    /// training rounds and failed evaluation rounds.
    pub evaluation: Option<FederatedEval>,
}

impl FleetRound {
    /// Whether the round committed.
    pub fn committed(&self) -> bool {
        self.events.iter().any(|e| matches!(e, RoundEvent::Committed(_)))
    }

    /// Whether the round was an evaluation round that released its figures.
    pub fn evaluated(&self) -> bool {
        self.evaluation.is_some()
    }
}

#[derive(Debug)]
enum Delivery {
    ToCoordinator(ClientId, Vec<u8>),
    ToClient(ClientId, Arc<[u8]>),
    Trained(ClientId, RoundId),
    Disconnect(ClientId),
    CheckIn(ClientId),
    SessionTimer(ClientId),
}

struct Client {
    session: Session,
    params: Option<(ModelVersion, Arc<[f32]>)>,
    job: Option<JobState>,
}

impl Client {
    /// Whether the client holds nothing worth keeping (its state can be recreated on demand).
    fn is_disposable(&self, now: Instant) -> bool {
        self.session.is_idle()
            && self.job.is_none()
            && self.params.is_none()
            && self.session.next_check_in_at().is_none_or(|t| t <= now)
    }
}

/// The last full-model task encoded, so that the same task to many clients is encoded and decoded
/// once and its bytes shared (the byte counts still count every copy).
struct TaskFrame {
    round: RoundId,
    version: ModelVersion,
    values: Arc<[f32]>,
    plan: TrainingPlan,
    report_within_ms: u64,
    secure: Option<crate::message::SecureTask>,
    kind: TaskKind,
    bytes: Arc<[u8]>,
    decoded: Option<Inbound<CoordinatorMessage>>,
}

/// The in-memory fleet. See the module docs.
pub struct Fleet<T> {
    now: Instant,
    seq: u64,
    orchestrator: Orchestrator,
    clients: Vec<Option<Box<Client>>>,
    offline: HashSet<u64>,
    trainer: T,
    codec: Codec,
    config: FleetConfig,
    rng: ChaCha8Rng,
    queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    deliveries: Vec<Option<Delivery>>,
    free: Vec<usize>,
    transcript: Vec<u8>,
    record_transcript: bool,
    outcomes: Vec<(ClientId, SessionOutcome)>,
    bytes_up_pending: u64,
    window_closed_pending: usize,
    queued: Vec<TrainJob>,
    last_round_start: Option<Instant>,
    task_frame: Option<TaskFrame>,
    traffic_pending: BTreeMap<&'static str, (u64, u64)>,
    cpu_pending: BTreeMap<&'static str, (Duration, u64)>,
    cpu_clock: Option<fn() -> Duration>,
}

#[derive(Debug, PartialEq)]
enum JobState {
    Queued(RoundId),
    Done(RoundId, JobResult),
}

#[derive(Debug, PartialEq)]
enum JobResult {
    Trained(Option<Box<TrainResult>>),
    Evaluated(Option<EvalMetrics>),
}

impl<T: Trainer> Fleet<T> {
    /// A fleet of `clients` clients (ids 0..clients) around `orchestrator`. No per-client state is
    /// allocated until a client first checks in.
    pub fn new(orchestrator: Orchestrator, clients: usize, trainer: T, config: FleetConfig) -> Self {
        let mut slots = Vec::new();
        slots.resize_with(clients, || None);
        Self {
            now: Instant::ZERO,
            seq: 0,
            orchestrator,
            clients: slots,
            offline: HashSet::new(),
            trainer,
            codec: Codec::default(),
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            config,
            queue: BinaryHeap::new(),
            deliveries: Vec::new(),
            free: Vec::new(),
            transcript: Vec::new(),
            record_transcript: false,
            outcomes: Vec::new(),
            bytes_up_pending: 0,
            window_closed_pending: 0,
            queued: Vec::new(),
            last_round_start: None,
            task_frame: None,
            traffic_pending: BTreeMap::new(),
            cpu_pending: BTreeMap::new(),
            cpu_clock: None,
        }
    }

    /// Gives the fleet a clock to measure the host CPU time of each protocol step with (e.g. the
    /// process's CPU time). The fleet never reads a clock otherwise; see [`FleetRound::cpu`].
    pub fn set_cpu_clock(&mut self, clock: fn() -> Duration) {
        self.cpu_clock = Some(clock);
    }

    fn cpu_start(&self) -> Option<Duration> {
        self.cpu_clock.map(|c| c())
    }

    fn cpu_stop(&mut self, started: Option<Duration>, step: &'static str) {
        if let (Some(t0), Some(clock)) = (started, self.cpu_clock) {
            let e = self.cpu_pending.entry(step).or_default();
            e.0 += clock().saturating_sub(t0);
            e.1 += 1;
        }
    }

    /// Keeps every byte sent in either direction (for determinism checks).
    pub fn record_transcript(&mut self, on: bool) {
        self.record_transcript = on;
    }

    /// Every byte sent so far, with direction and time, when recording is on.
    pub fn transcript(&self) -> &[u8] {
        &self.transcript
    }

    /// The orchestrator.
    pub fn orchestrator(&self) -> &Orchestrator {
        &self.orchestrator
    }

    /// The orchestrator, mutably (e.g. to inject messages).
    pub fn orchestrator_mut(&mut self) -> &mut Orchestrator {
        &mut self.orchestrator
    }

    /// The virtual time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The fleet's settings.
    pub fn config(&self) -> &FleetConfig {
        &self.config
    }

    /// The trainer.
    pub fn trainer_mut(&mut self) -> &mut T {
        &mut self.trainer
    }

    /// Clients in the fleet.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether the fleet has no clients.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Clients whose session state is currently held in memory.
    pub fn resident_clients(&self) -> usize {
        self.clients.iter().filter(|c| c.is_some()).count()
    }

    /// Takes a client offline (it stops checking in) or back online.
    pub fn set_online(&mut self, client: ClientId, online: bool) {
        if online {
            self.offline.remove(&client.0);
        } else if (client.0 as usize) < self.clients.len() {
            self.offline.insert(client.0);
        }
    }

    fn session_config(&self, i: u64) -> SessionConfig {
        SessionConfig {
            client: ClientId(i),
            credential: Vec::new(),
            sdk_version: "harness".into(),
            model_family: self.config.model_family.clone(),
            capabilities: Capabilities::default(),
            response_timeout: self.config.response_timeout,
            rng_seed: self.config.seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            secagg: crate::session::SecAggClientConfig {
                // The virtual time makes a re-created client's entropy differ from its last one.
                entropy: crate::session::Entropy(seeded_entropy(self.config.seed, i, self.now.as_micros())),
                ..Default::default()
            },
        }
    }

    /// Client `idx`'s state, created on first use. `idx` must be in range (callers check).
    fn client(&mut self, idx: usize) -> &mut Client {
        if self.clients[idx].is_none() {
            let session = Session::new(self.session_config(idx as u64));
            self.clients[idx] = Some(Box::new(Client { session, params: None, job: None }));
        }
        match &mut self.clients[idx] {
            Some(c) => c,
            None => unreachable!("created above"),
        }
    }

    /// Runs one round: starts it, lets every available client check in, and steps until the round
    /// commits or fails. Returns what happened.
    pub fn run_round(&mut self) -> Result<FleetRound, StartError> {
        self.run_with(Orchestrator::start_round)
    }

    /// Runs one federated-evaluation round ([`Orchestrator::start_evaluation`]) exactly as
    /// [`run_round`](Self::run_round) runs a training round — pacing, check-ins, the network,
    /// dropouts and availability windows alike — with the selected clients' tasks answered by
    /// [`Trainer::evaluate`]. The model is unchanged; the released figures are in
    /// [`FleetRound::evaluation`] (and in the [`RoundEvent::Evaluated`] event).
    pub fn run_evaluation(&mut self) -> Result<FleetRound, StartError> {
        self.run_with(Orchestrator::start_evaluation)
    }

    fn run_with(
        &mut self,
        start: fn(&mut Orchestrator, Instant) -> Result<RoundId, StartError>,
    ) -> Result<FleetRound, StartError> {
        if let Some(last) = self.last_round_start {
            self.now = self.now.max(last + self.config.round_interval);
        }
        let started = self.now;
        let round = start(&mut self.orchestrator, self.now)?;
        self.last_round_start = Some(started);
        let mut out = FleetRound {
            round,
            events: Vec::new(),
            outcomes: Vec::new(),
            check_ins: 0,
            window_closed: 0,
            bytes_up: 0,
            bytes_down: 0,
            traffic: BTreeMap::new(),
            cpu: BTreeMap::new(),
            duration: Duration::ZERO,
            evaluation: None,
        };
        let spread = self.config.check_in_spread.as_micros() as u64;
        let p = self.config.check_in_probability;
        for i in 0..self.clients.len() {
            let c = ClientId(i as u64);
            if !self.offline.is_empty() && self.offline.contains(&c.0) {
                continue;
            }
            if p < 1.0 && self.rng.random::<f64>() >= p {
                continue;
            }
            let at = self.now + Duration::from_micros(self.rng.random_range(0..=spread));
            if self.config.available_until(c, at).is_none() {
                continue;
            }
            if let Some(client) = &self.clients[i]
                && client.session.next_check_in_at().is_some_and(|t| t > at)
            {
                continue;
            }
            out.check_ins += 1;
            self.schedule(at, Delivery::CheckIn(c));
        }
        loop {
            self.drain(&mut out);
            let done = out.events.iter().any(|e| {
                matches!(e, RoundEvent::Committed(_) | RoundEvent::Evaluated(_) | RoundEvent::Failed { .. })
            });
            if done || !self.step(&mut out) {
                break;
            }
        }
        out.duration = self.now.saturating_duration_since(started);
        // Let in-flight messages (receipts, aborts, late uploads) settle so the next round starts clean.
        while self.step(&mut out) {}
        self.drain(&mut out);
        // Forget clients that hold nothing; they are recreated when they next check in.
        let now = self.now;
        for slot in &mut self.clients {
            if slot.as_ref().is_some_and(|c| c.is_disposable(now)) {
                *slot = None;
            }
        }
        self.task_frame = None;
        out.evaluation = out.events.iter().find_map(|e| match e {
            RoundEvent::Evaluated(ev) if ev.round == round => Some(ev.metrics.clone()),
            _ => None,
        });
        Ok(out)
    }

    fn schedule(&mut self, at: Instant, d: Delivery) {
        let slot = match self.free.pop() {
            Some(s) => {
                self.deliveries[s] = Some(d);
                s
            }
            None => {
                self.deliveries.push(Some(d));
                self.deliveries.len() - 1
            }
        };
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, slot)));
    }

    /// Latency plus the transfer time of `bytes` over `c`'s link.
    fn delay(&mut self, c: ClientId, bytes: usize, up: bool) -> Duration {
        let j = self.config.jitter.as_micros() as u64;
        let latency = self.config.latency + Duration::from_micros(self.rng.random_range(0..=j));
        latency.saturating_add(self.config.transfer_time(c, bytes, up))
    }

    /// Processes the next thing to happen. Returns false when nothing is left.
    fn step(&mut self, out: &mut FleetRound) -> bool {
        let next_queue = self.queue.peek().map(|Reverse((t, _, _))| *t);
        let next_timer = self.orchestrator.poll_timeout();
        match (next_queue, next_timer) {
            (None, None) => false,
            (Some(q), t) if t.is_none_or(|t| q <= t) => {
                let Some(Reverse((at, _, slot))) = self.queue.pop() else { return false };
                self.now = self.now.max(at);
                let d = self.deliveries[slot].take();
                self.free.push(slot);
                if let Some(d) = d {
                    self.deliver(d, out);
                }
                true
            }
            (_, Some(t)) => {
                self.now = self.now.max(t);
                let t0 = self.cpu_start();
                self.orchestrator.handle_timeout(self.now);
                self.cpu_stop(t0, "coordinator: deadlines (phase closes, unmasking, aggregation)");
                true
            }
            // Unreachable: the first arm takes `(Some, None)`.
            (Some(_), None) => false,
        }
    }

    fn decode_for_client(&mut self, bytes: &Arc<[u8]>) -> Option<Inbound<CoordinatorMessage>> {
        // A shared task frame is decoded once; every recipient gets the same (shared) parameters.
        if let Some(f) = &mut self.task_frame
            && Arc::ptr_eq(&f.bytes, bytes)
        {
            if f.decoded.is_none() {
                f.decoded = Some(self.codec.decode_coordinator(bytes).ok()?.0);
            }
            return f.decoded.clone();
        }
        Some(self.codec.decode_coordinator(bytes).ok()?.0)
    }

    fn deliver(&mut self, d: Delivery, out: &mut FleetRound) {
        let now = self.now;
        match d {
            Delivery::CheckIn(c) => {
                let (conditions, offline) = (self.config.conditions, self.offline.contains(&c.0));
                let client = self.client(c.0 as usize);
                let have = client.params.as_ref().map(|(v, _)| *v);
                if !offline && client.session.check_in(now, conditions, have).is_ok() {
                    self.after_session(c);
                }
            }
            Delivery::ToCoordinator(c, bytes) => match self.codec.decode_client(&bytes) {
                Ok((Inbound::Message { message, .. }, _)) => {
                    let (t0, step) = (self.cpu_start(), coordinator_step(message.kind()));
                    self.orchestrator.handle_message(now, c, message);
                    self.cpu_stop(t0, step);
                }
                _ => self.orchestrator.handle_disconnect(now, c),
            },
            Delivery::ToClient(c, bytes) => {
                let inbound = self.decode_for_client(&bytes);
                let t0 = self.cpu_start();
                let session = &mut self.client(c.0 as usize).session;
                match inbound {
                    Some(Inbound::Message { message, .. }) => {
                        let step = device_step(message.kind());
                        session.handle_message(now, message);
                        self.cpu_stop(t0, step);
                    }
                    Some(Inbound::VersionNegotiation { min, max }) => {
                        session.handle_version_negotiation(now, min, max)
                    }
                    _ => session.handle_disconnect(now),
                }
                self.after_session(c);
            }
            Delivery::Trained(c, round) => {
                if self.client(c.0 as usize).job == Some(JobState::Queued(round)) {
                    self.flush_jobs();
                }
                let client = self.client(c.0 as usize);
                let Some(JobState::Done(r, result)) = client.job.take() else { return self.drain(out) };
                if r != round || client.session.training_round() != Some(round) {
                    return self.drain(out);
                }
                match result {
                    JobResult::Evaluated(Some(metrics)) => {
                        let t0 = self.cpu_start();
                        let session = &mut self.client(c.0 as usize).session;
                        let _ = session.submit_evaluation(now, round, metrics);
                        self.cpu_stop(t0, "device: evaluation report");
                    }
                    JobResult::Evaluated(None) | JobResult::Trained(None) => {
                        self.client(c.0 as usize).session.withdraw(now, WithdrawReason::TrainingFailed)
                    }
                    JobResult::Trained(Some(result)) => {
                        let kind = self.orchestrator.config().round.plan.encoding;
                        let update = EncodedUpdate::encode(&result.update, kind, &mut self.rng);
                        let t0 = self.cpu_start();
                        let session = &mut self.client(c.0 as usize).session;
                        let _ = session.submit_update(now, round, update, result.weight, result.metrics);
                        self.cpu_stop(t0, "device: encode + mask");
                    }
                }
                self.after_session(c);
            }
            Delivery::Disconnect(c) => {
                let client = self.client(c.0 as usize);
                client.session.handle_disconnect(now);
                client.job = None;
                self.orchestrator.handle_disconnect(now, c);
                self.after_session(c);
            }
            Delivery::SessionTimer(c) => {
                self.client(c.0 as usize).session.handle_timeout(now);
                self.after_session(c);
            }
        }
        self.drain(out);
    }

    /// Drains a session's outputs: transmits go on the network, actions are carried out.
    fn after_session(&mut self, c: ClientId) {
        let idx = c.0 as usize;
        while let Some(msg) = self.client(idx).session.poll_transmit() {
            let Ok(bytes) = self.codec.encode_client(&msg) else { continue };
            self.bytes_up_pending += bytes.len() as u64;
            self.traffic_pending.entry(msg.kind()).or_default().0 += bytes.len() as u64;
            self.record(b'U', c, &bytes);
            let at = self.now + self.delay(c, bytes.len(), true);
            self.schedule(at, Delivery::ToCoordinator(c, bytes));
        }
        while let Some(action) = self.client(idx).session.poll_action() {
            match action {
                SessionAction::Train(req) => self.start_training(c, &req),
                SessionAction::Cancel { .. } => self.client(idx).job = None,
                SessionAction::Finished(outcome) => self.outcomes.push((c, outcome)),
            }
        }
        if let Some(t) = self.client(idx).session.poll_timeout() {
            self.schedule(t, Delivery::SessionTimer(c));
        }
    }

    fn start_training(&mut self, c: ClientId, req: &TrainRequest) {
        let idx = c.0 as usize;
        let params: Arc<[f32]> = match &req.model {
            ModelPayload::Full { values, shape } if values.len() == shape.len() => values.clone(),
            payload => {
                let base = self.client(idx).params.as_ref().map(|(_, p)| p.clone());
                match payload.materialize(base.as_deref()) {
                    Ok(p) => p.into(),
                    Err(_) => {
                        let now = self.now;
                        self.client(idx).session.withdraw(now, WithdrawReason::TrainingFailed);
                        return self.after_session(c);
                    }
                }
            }
        };
        if self.config.cache_models {
            self.client(idx).params = Some((req.model_version, params.clone()));
        }
        let reference = self.trainer.compute_time(c, req, &params);
        let speed = self.config.speed_of(c);
        let compute = Duration::try_from_secs_f64(reference.as_secs_f64() / speed).unwrap_or(Duration::MAX);
        let doomed = self.rng.random::<f64>() < self.config.dropout;
        let window_end = self.config.available_until(c, self.now).unwrap_or(self.now);
        if doomed {
            let frac = self.rng.random::<f64>();
            let at = (self.now + compute.mul_f64(frac)).min(window_end);
            self.schedule(at, Delivery::Disconnect(c));
        } else if self.now + compute > window_end {
            self.window_closed_pending += 1;
            self.schedule(window_end, Delivery::Disconnect(c));
        } else {
            self.client(idx).job = Some(JobState::Queued(req.round));
            self.queued.push(TrainJob { client: c, request: req.clone(), params });
            self.schedule(self.now + compute, Delivery::Trained(c, req.round));
        }
    }

    /// Trains every queued job in one batch and parks the results with their clients.
    fn flush_jobs(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let jobs = std::mem::take(&mut self.queued);
        let (evals, trains): (Vec<TrainJob>, Vec<TrainJob>) =
            jobs.into_iter().partition(|j| j.request.kind == TaskKind::Evaluate);
        let mut done = Vec::with_capacity(evals.len() + trains.len());
        if !trains.is_empty() {
            let results = self.trainer.train(&trains);
            let results = results.into_iter().map(|r| JobResult::Trained(r.map(Box::new)));
            done.extend(trains.iter().zip(results));
        }
        if !evals.is_empty() {
            let results = self.trainer.evaluate(&evals).into_iter().map(JobResult::Evaluated);
            done.extend(evals.iter().zip(results));
        }
        for (job, result) in done {
            let client = self.client(job.client.0 as usize);
            if client.job == Some(JobState::Queued(job.request.round)) {
                client.job = Some(JobState::Done(job.request.round, result));
            }
        }
    }

    fn record(&mut self, dir: u8, c: ClientId, bytes: &[u8]) {
        if self.record_transcript {
            self.transcript.push(dir);
            self.transcript.extend_from_slice(&self.now.as_micros().to_le_bytes());
            self.transcript.extend_from_slice(&c.0.to_le_bytes());
            self.transcript.extend_from_slice(bytes);
        }
    }

    /// Encodes a coordinator message, reusing the last full-model task's bytes when this is the
    /// same task (same round, version, shared parameters, plan and deadline).
    fn encode_for_client(&mut self, message: &CoordinatorMessage) -> Option<Arc<[u8]>> {
        let task = match message {
            CoordinatorMessage::Task(t) => match &t.model {
                ModelPayload::Full { values, .. } => Some((t, values)),
                _ => None,
            },
            _ => None,
        };
        if let (Some((t, values)), Some(f)) = (task, &self.task_frame)
            && f.round == t.round
            && f.version == t.model_version
            && Arc::ptr_eq(&f.values, values)
            && f.plan == t.plan
            && f.report_within_ms == t.report_within_ms
            && f.secure == t.secure
            && f.kind == t.kind
        {
            return Some(f.bytes.clone());
        }
        let bytes: Arc<[u8]> = self.codec.encode_coordinator(message).ok()?.into();
        if let Some((t, values)) = task {
            self.task_frame = Some(TaskFrame {
                round: t.round,
                version: t.model_version,
                values: values.clone(),
                plan: t.plan.clone(),
                report_within_ms: t.report_within_ms,
                secure: t.secure.clone(),
                kind: t.kind,
                bytes: bytes.clone(),
                decoded: None,
            });
        }
        Some(bytes)
    }

    fn drain(&mut self, out: &mut FleetRound) {
        while let Some(t) = self.orchestrator.poll_transmit() {
            let Some(bytes) = self.encode_for_client(&t.message) else { continue };
            out.bytes_down += bytes.len() as u64;
            out.traffic.entry(t.message.kind()).or_default().1 += bytes.len() as u64;
            self.record(b'D', t.to, &bytes);
            let at = self.now + self.delay(t.to, bytes.len(), false);
            self.schedule(at, Delivery::ToClient(t.to, bytes));
        }
        while let Some(e) = self.orchestrator.poll_event() {
            out.events.push(e);
        }
        out.outcomes.append(&mut self.outcomes);
        out.bytes_up += std::mem::take(&mut self.bytes_up_pending);
        for (k, (up, down)) in std::mem::take(&mut self.traffic_pending) {
            let e = out.traffic.entry(k).or_default();
            e.0 += up;
            e.1 += down;
        }
        for (k, (t, n)) in std::mem::take(&mut self.cpu_pending) {
            let e = out.cpu.entry(k).or_default();
            e.0 += t;
            e.1 += n;
        }
        out.window_closed += std::mem::take(&mut self.window_closed_pending);
    }
}

/// A client's secret entropy in a simulation: a pure function of the fleet's seed, the id and the
/// virtual time the client's session is created at.
fn seeded_entropy(seed: u64, client: u64, now_micros: u64) -> [u8; 32] {
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed ^ 0x5EC_A66
            ^ client.wrapping_mul(0xD6E8_FEB8_6659_FD93)
            ^ now_micros.wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let mut out = [0u8; 32];
    rand::Rng::fill_bytes(&mut rng, &mut out);
    out
}

fn device_step(kind: &'static str) -> &'static str {
    match kind {
        "task" => "device: task",
        "secagg: neighbourhood keys" => "device: secagg: neighbourhood keys (agree, share, encrypt)",
        "secagg: routed shares" => "device: secagg: routed shares (decrypt)",
        "secagg: unmask request" => "device: secagg: unmask request",
        _ => "device: other messages",
    }
}

fn coordinator_step(kind: &'static str) -> &'static str {
    match kind {
        "check-in" => "coordinator: check-in",
        "update" => "coordinator: update (decode, validate, accumulate)",
        "secagg: key advertisement" => "coordinator: secagg: key advertisement",
        "secagg: encrypted shares" => "coordinator: secagg: encrypted shares",
        "secagg: masked input" => "coordinator: secagg: masked input",
        "secagg: unmasking shares" => "coordinator: secagg: unmasking shares (+ unmask)",
        _ => "coordinator: other messages",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_client_draws_are_deterministic_and_follow_their_distribution() {
        let ln = PerClient::LogNormal { median: 2.0, sigma: 0.5 };
        let draws: Vec<f64> = (0..20_000).map(|i| ln.draw(9, ClientId(i), STREAM_SPEED)).collect();
        assert_eq!(draws[17], ln.draw(9, ClientId(17), STREAM_SPEED));
        assert_ne!(draws[17], ln.draw(10, ClientId(17), STREAM_SPEED));
        let mut sorted = draws.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        assert!((median - 2.0).abs() < 0.05, "median {median}");
        let logs: Vec<f64> = draws.iter().map(|d| d.ln()).collect();
        let mean = logs.iter().sum::<f64>() / logs.len() as f64;
        let sd = (logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / logs.len() as f64).sqrt();
        assert!((sd - 0.5).abs() < 0.02, "sigma {sd}");
        let u = PerClient::Uniform { low: 1.0, high: 3.0 };
        assert!((0..1000).map(|i| u.draw(1, ClientId(i), 4)).all(|v| (1.0..3.0).contains(&v)));
    }

    #[test]
    fn availability_windows_cover_their_share_of_the_day() {
        let a = Availability {
            day: Duration::from_secs(86_400),
            start: PerClient::Uniform { low: 0.0, high: 1.0 },
            length: PerClient::Fixed(0.25),
        };
        // Sample every client at one instant: about a quarter are available.
        let at = Instant::from_micros(3 * 3_600_000_000);
        let up = (0..10_000).filter(|&i| a.available_until(5, ClientId(i), at).is_some()).count();
        assert!((2300..2700).contains(&up), "{up} of 10000 available");
        // One client over its day: available for a quarter of it, in one stretch, ending when it says.
        let c = ClientId(3);
        let minutes: Vec<bool> = (0..1440u64)
            .map(|m| a.available_until(5, c, Instant::from_micros(m * 60_000_000)).is_some())
            .collect();
        let on = minutes.iter().filter(|&&b| b).count();
        assert!((359..=361).contains(&on), "{on} minutes");
        let m = minutes.iter().position(|&b| b).unwrap() as u64;
        let at = Instant::from_micros(m * 60_000_000);
        let end = a.available_until(5, c, at).unwrap();
        assert!(a.available_until(5, c, Instant::from_micros(end.as_micros() - 1)).is_some());
        assert!(a.available_until(5, c, end).is_none());
        // Full-length windows mean always available.
        let always = Availability { length: PerClient::Fixed(1.0), ..a };
        assert!(always.available_until(5, c, at).is_some());
    }

    #[test]
    fn transfer_time_is_bytes_over_bandwidth() {
        let cfg = FleetConfig { uplink: Some(PerClient::Fixed(1_000_000.0)), ..FleetConfig::default() };
        assert_eq!(cfg.transfer_time(ClientId(1), 500_000, true), Duration::from_millis(500));
        assert_eq!(cfg.transfer_time(ClientId(1), 500_000, false), Duration::ZERO);
        let bad = FleetConfig { downlink: Some(PerClient::Fixed(-1.0)), ..FleetConfig::default() };
        assert_eq!(bad.transfer_time(ClientId(1), 10, false), Duration::ZERO);
    }

    #[test]
    fn validation_names_the_bad_setting() {
        assert_eq!(FleetConfig::default().validate(), Ok(()));
        let c = FleetConfig { dropout: 1.5, ..FleetConfig::default() };
        assert_eq!(c.validate(), Err(FleetConfigError::Probability("dropout")));
        let c = FleetConfig {
            compute_speed: PerClient::LogNormal { median: 1.0, sigma: f64::NAN },
            ..FleetConfig::default()
        };
        assert_eq!(c.validate(), Err(FleetConfigError::Distribution("compute_speed")));
    }
}
