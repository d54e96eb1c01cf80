//! A deterministic, in-memory fleet: one [`Orchestrator`], N [`Session`]s, a virtual clock and a
//! seeded network, in the manner of quinn-proto's test `Pair`.
//!
//! Every message really goes through the [`Codec`] (so byte counts are real), and is delivered
//! after a seeded latency. Training is done by a [`Trainer`] the caller supplies (a fake one in
//! the engine's tests, a real model in the simulator). Time only moves when nothing can happen
//! sooner, so a run takes as long as its computation, not its simulated duration, and the same
//! seed gives byte-identical runs.

use crate::codec::{Codec, Inbound};
use crate::encoding::EncodedUpdate;
use crate::ids::{ClientId, ModelVersion, RoundId};
use crate::message::{Capabilities, DeviceConditions, LocalMetrics, ModelPayload, WithdrawReason};
use crate::round::{Orchestrator, RoundEvent, StartError};
use crate::session::{Session, SessionAction, SessionConfig, SessionOutcome, TrainRequest};
use crate::time::{Duration, Instant};
use crate::update::Update;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
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

/// Local training, as the fleet's clients do it.
///
/// The fleet first asks how long a task takes on the client's device (simulated time, which decides
/// when the update is submitted and so who misses deadlines), and later trains every task that is
/// due in one batch, so an implementation can spread a batch over all cores.
pub trait Trainer {
    /// Simulated device time `client` needs for `request` (training from `params`).
    fn compute_time(&mut self, client: ClientId, request: &TrainRequest, params: &Arc<[f32]>) -> Duration;
    /// Trains `jobs` (in any order, possibly in parallel) and returns one result per job, in order.
    /// `None` means that client's training failed (it withdraws).
    fn train(&mut self, jobs: &[TrainJob]) -> Vec<Option<TrainResult>>;
}

/// Adapts a closure that trains one job and says how long it took into a [`Trainer`]. The closure
/// runs when the task arrives (serially); handy for tests and small examples.
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
    fn compute_time(&mut self, client: ClientId, request: &TrainRequest, params: &Arc<[f32]>) -> Duration {
        let out = (self.f)(client, request, params);
        let compute = out.as_ref().map_or(Duration::ZERO, |(_, d)| *d);
        self.done.insert((client, request.round), out.map(|(r, _)| r));
        compute
    }

    fn train(&mut self, jobs: &[TrainJob]) -> Vec<Option<TrainResult>> {
        jobs.iter().map(|j| self.done.remove(&(j.client, j.request.round)).flatten()).collect()
    }
}

/// Network and device behaviour of the simulated fleet.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetConfig {
    /// One-way latency, before jitter.
    pub latency: Duration,
    /// Extra latency drawn uniformly from `0..=jitter` per message.
    pub jitter: Duration,
    /// Probability that a selected client vanishes after receiving its task (its connection drops
    /// at a random point before it would have reported).
    pub dropout: f64,
    /// Spread of check-ins after a round starts: each client checks in at a uniform time in
    /// `0..=check_in_spread`.
    pub check_in_spread: Duration,
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
            dropout: 0.0,
            check_in_spread: Duration::from_millis(100),
            conditions: DeviceConditions { charging: true, unmetered: true, idle: true, battery_percent: 90 },
            seed: 0,
            response_timeout: Duration::from_secs(120),
            model_family: "test".into(),
            cache_models: true,
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
    /// Bytes sent by clients (frames, headers included).
    pub bytes_up: u64,
    /// Bytes sent by the coordinator.
    pub bytes_down: u64,
    /// Virtual time the round took.
    pub duration: Duration,
}

impl FleetRound {
    /// Whether the round committed.
    pub fn committed(&self) -> bool {
        self.events.iter().any(|e| matches!(e, RoundEvent::Committed(_)))
    }
}

#[derive(Debug)]
enum Delivery {
    ToCoordinator(ClientId, Vec<u8>),
    ToClient(ClientId, Vec<u8>),
    Trained(ClientId, RoundId),
    Disconnect(ClientId),
    CheckIn(ClientId),
    SessionTimer(ClientId),
}

struct Client {
    session: Session,
    params: Option<(ModelVersion, Arc<[f32]>)>,
    job: Option<JobState>,
    online: bool,
}

/// The in-memory fleet. See the module docs.
pub struct Fleet<T> {
    now: Instant,
    seq: u64,
    orchestrator: Orchestrator,
    clients: Vec<Client>,
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
    queued: Vec<TrainJob>,
}

#[derive(Debug, PartialEq)]
enum JobState {
    Queued(RoundId),
    Done(RoundId, Option<Box<TrainResult>>),
}

impl<T: Trainer> Fleet<T> {
    /// A fleet of `clients` sessions (ids 0..clients) around `orchestrator`.
    pub fn new(orchestrator: Orchestrator, clients: usize, trainer: T, config: FleetConfig) -> Self {
        let clients = (0..clients as u64)
            .map(|i| Client {
                session: Session::new(SessionConfig {
                    client: ClientId(i),
                    credential: Vec::new(),
                    sdk_version: "harness".into(),
                    model_family: config.model_family.clone(),
                    capabilities: Capabilities::default(),
                    response_timeout: config.response_timeout,
                    rng_seed: config.seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                }),
                params: None,
                job: None,
                online: true,
            })
            .collect();
        Self {
            now: Instant::ZERO,
            seq: 0,
            orchestrator,
            clients,
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
            queued: Vec::new(),
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

    /// The trainer.
    pub fn trainer_mut(&mut self) -> &mut T {
        &mut self.trainer
    }

    /// Takes a client offline (it stops checking in) or back online.
    pub fn set_online(&mut self, client: ClientId, online: bool) {
        if let Some(c) = self.clients.get_mut(client.0 as usize) {
            c.online = online;
        }
    }

    /// Runs one round: starts it, lets every online client check in, and steps until the round
    /// commits or fails. Returns what happened.
    pub fn run_round(&mut self) -> Result<FleetRound, StartError> {
        let started = self.now;
        let round = self.orchestrator.start_round(self.now)?;
        let mut out = FleetRound {
            round,
            events: Vec::new(),
            outcomes: Vec::new(),
            bytes_up: 0,
            bytes_down: 0,
            duration: Duration::ZERO,
        };
        let spread = self.config.check_in_spread.as_micros() as u64;
        for i in 0..self.clients.len() {
            if self.clients[i].online {
                let at = self.now + Duration::from_micros(self.rng.random_range(0..=spread));
                self.schedule(at, Delivery::CheckIn(ClientId(i as u64)));
            }
        }
        loop {
            self.drain(&mut out);
            let done =
                out.events.iter().any(|e| matches!(e, RoundEvent::Committed(_) | RoundEvent::Failed { .. }));
            if done || !self.step(&mut out) {
                break;
            }
        }
        out.duration = self.now.saturating_duration_since(started);
        // Let in-flight messages (receipts, aborts, late uploads) settle so the next round starts clean.
        while self.step(&mut out) {}
        self.drain(&mut out);
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

    fn latency(&mut self) -> Duration {
        let j = self.config.jitter.as_micros() as u64;
        self.config.latency + Duration::from_micros(self.rng.random_range(0..=j))
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
                self.orchestrator.handle_timeout(self.now);
                true
            }
            // Unreachable: the first arm takes `(Some, None)`.
            (Some(_), None) => false,
        }
    }

    fn deliver(&mut self, d: Delivery, out: &mut FleetRound) {
        let now = self.now;
        match d {
            Delivery::CheckIn(c) => {
                let client = &mut self.clients[c.0 as usize];
                let have = client.params.as_ref().map(|(v, _)| *v);
                if client.online && client.session.check_in(now, self.config.conditions, have).is_ok() {
                    self.after_session(c);
                }
            }
            Delivery::ToCoordinator(c, bytes) => match self.codec.decode_client(&bytes) {
                Ok((Inbound::Message { message, .. }, _)) => {
                    self.orchestrator.handle_message(now, c, message)
                }
                _ => self.orchestrator.handle_disconnect(now, c),
            },
            Delivery::ToClient(c, bytes) => {
                let client = &mut self.clients[c.0 as usize];
                match self.codec.decode_coordinator(&bytes) {
                    Ok((Inbound::Message { message, .. }, _)) => client.session.handle_message(now, message),
                    Ok((Inbound::VersionNegotiation { min, max }, _)) => {
                        client.session.handle_version_negotiation(now, min, max)
                    }
                    _ => client.session.handle_disconnect(now),
                }
                self.after_session(c);
            }
            Delivery::Trained(c, round) => {
                if self.clients[c.0 as usize].job == Some(JobState::Queued(round)) {
                    self.flush_jobs();
                }
                let client = &mut self.clients[c.0 as usize];
                let Some(JobState::Done(r, result)) = client.job.take() else { return self.drain(out) };
                if r != round || client.session.training_round() != Some(round) {
                    return self.drain(out);
                }
                match result {
                    Some(result) => {
                        let kind = self.orchestrator.config().round.plan.encoding;
                        let update = EncodedUpdate::encode(&result.update, kind, &mut self.rng);
                        let session = &mut self.clients[c.0 as usize].session;
                        let _ = session.submit_update(now, round, update, result.weight, result.metrics);
                    }
                    None => self.clients[c.0 as usize].session.withdraw(now, WithdrawReason::TrainingFailed),
                }
                self.after_session(c);
            }
            Delivery::Disconnect(c) => {
                let client = &mut self.clients[c.0 as usize];
                client.session.handle_disconnect(now);
                client.job = None;
                self.orchestrator.handle_disconnect(now, c);
                self.after_session(c);
            }
            Delivery::SessionTimer(c) => {
                self.clients[c.0 as usize].session.handle_timeout(now);
                self.after_session(c);
            }
        }
        self.drain(out);
    }

    /// Drains a session's outputs: transmits go on the network, actions are carried out.
    fn after_session(&mut self, c: ClientId) {
        let idx = c.0 as usize;
        while let Some(msg) = self.clients[idx].session.poll_transmit() {
            let Ok(bytes) = self.codec.encode_client(&msg) else { continue };
            self.bytes_up_pending += bytes.len() as u64;
            self.record(b'U', c, &bytes);
            let at = self.now + self.latency();
            self.schedule(at, Delivery::ToCoordinator(c, bytes));
        }
        while let Some(action) = self.clients[idx].session.poll_action() {
            match action {
                SessionAction::Train(req) => self.start_training(c, &req),
                SessionAction::Cancel { .. } => self.clients[idx].job = None,
                SessionAction::Finished(outcome) => self.outcomes.push((c, outcome)),
            }
        }
        if let Some(t) = self.clients[idx].session.poll_timeout() {
            self.schedule(t, Delivery::SessionTimer(c));
        }
    }

    fn start_training(&mut self, c: ClientId, req: &TrainRequest) {
        let idx = c.0 as usize;
        let params: Arc<[f32]> = match &req.model {
            ModelPayload::Full { values, shape } if values.len() == shape.len() => values.clone(),
            payload => {
                let base = self.clients[idx].params.as_ref().map(|(_, p)| &p[..]);
                match payload.materialize(base) {
                    Ok(p) => p.into(),
                    Err(_) => {
                        self.clients[idx].session.withdraw(self.now, WithdrawReason::TrainingFailed);
                        return self.after_session(c);
                    }
                }
            }
        };
        if self.config.cache_models {
            self.clients[idx].params = Some((req.model_version, params.clone()));
        }
        let compute = self.trainer.compute_time(c, req, &params);
        let doomed = self.rng.random::<f64>() < self.config.dropout;
        if doomed {
            let frac = self.rng.random::<f64>();
            self.schedule(self.now + compute.mul_f64(frac), Delivery::Disconnect(c));
        } else {
            self.clients[idx].job = Some(JobState::Queued(req.round));
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
        let results = self.trainer.train(&jobs);
        for (job, result) in jobs.iter().zip(results) {
            let client = &mut self.clients[job.client.0 as usize];
            if client.job == Some(JobState::Queued(job.request.round)) {
                client.job = Some(JobState::Done(job.request.round, result.map(Box::new)));
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

    fn drain(&mut self, out: &mut FleetRound) {
        while let Some(t) = self.orchestrator.poll_transmit() {
            let Ok(bytes) = self.codec.encode_coordinator(&t.message) else { continue };
            out.bytes_down += bytes.len() as u64;
            self.record(b'D', t.to, &bytes);
            let at = self.now + self.latency();
            self.schedule(at, Delivery::ToClient(t.to, bytes));
        }
        while let Some(e) = self.orchestrator.poll_event() {
            out.events.push(e);
        }
        out.outcomes.append(&mut self.outcomes);
        out.bytes_up += std::mem::take(&mut self.bytes_up_pending);
    }
}
