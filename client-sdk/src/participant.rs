//! One training session of the device, sans-IO: the protocol's [`Session`] machine, the codec,
//! and the [`Device`]'s trainer, fed bytes and time by whoever owns the transport and the clock
//! (the async [`Client`](crate::client::Client) with a real connection and `tokio` time; the fleet
//! simulator with an in-memory network and a virtual clock).
//!
//! ```text
//! start(now) ─▶ poll_transmit()* ─▶ send ···· bytes arrive ─▶ handle_bytes(now) ─▶ poll_transmit()* …
//!                                   ···· poll_timeout() passes ─▶ handle_timeout(now)
//!                                   ···· conditions change ─▶ handle_conditions(now)
//! … until poll_report() yields the session's SessionReport.
//! ```
//!
//! When the coordinator hands out a task, the participant trains on the spot (a few milliseconds
//! for the on-device model), clips and — under local DP — noises the update, **charges the
//! device's privacy ledger durably**, and only then queues the update frame. A task the device
//! will not do (no consent, too weak a privacy setting, its own budget spent, no data) is
//! withdrawn with the reason, never silently dropped.
//!
//! ## Cancellation
//! A session belongs to the device's [`SessionEpoch`](crate::device::SessionEpoch) at its start.
//! Withdrawing training consent or forgetting the user moves the epoch; from then on the session
//! is cancelled: every queued frame is dropped (an update that was not handed to the transport
//! never leaves, and the coordinator is told the device withdrew), and a session cancelled by a
//! forget stores nothing about itself. Each `handle_*` call checks the epoch first; a host that
//! sends frames concurrently with the user's controls must also check
//! [`is_current`](Participant::is_current) right before handing each frame to its transport, under
//! the same lock the controls take (the async [`Client`](crate::client::Client) does).

use crate::config::{ClientConfig, NotAllowed, ParticipationPolicy};
use crate::device::{Device, EvalError, TrainError};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use starling_proto::codec::{Codec, FrameBuffer, Inbound};
use starling_proto::dp::local::LocalRelease;
use starling_proto::encoding::EncodedUpdate;
use starling_proto::ids::{ModelVersion, RoundId};
use starling_proto::message::{
    Capabilities, ClientMessage, DeviceConditions, ModelPayload, TaskKind, WithdrawReason,
};
use starling_proto::secagg::SecAggClientMessage;
use starling_proto::session::{
    Entropy, SecAggClientConfig, Session, SessionAction, SessionConfig, SessionError, SessionOutcome,
    TrainRequest,
};
use starling_proto::time::Instant;
use std::collections::VecDeque;
use std::sync::Arc;

/// Why a session could not start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The user has not consented to training.
    #[error("the user has not consented to federated training")]
    NoConsent,
    /// The device conditions do not allow training now.
    #[error("training not allowed now: {0}")]
    NotAllowed(#[from] NotAllowed),
    /// A session is already running.
    #[error("a session is already running")]
    Busy,
    /// The coordinator asked to come back later.
    #[error("the coordinator asked to come back at {at:?}")]
    TooEarly {
        /// The earliest allowed check-in.
        at: Instant,
    },
}

/// How one session went.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionReport {
    /// How the session ended.
    pub outcome: SessionOutcome,
    /// The round the device was given a task for, if any.
    pub round: Option<RoundId>,
    /// Whether the device trained and sent an update — or, for an evaluation task, sent its
    /// evaluation report.
    pub sent_update: bool,
    /// Why the device refused or failed its task, if it did.
    pub task_error: Option<String>,
    /// Bytes sent in this session (frames, headers included).
    pub bytes_sent: u64,
    /// Bytes received in this session.
    pub bytes_received: u64,
    /// The device's local-DP ε after the session.
    pub local_epsilon: f64,
    /// Local training loss, if the device trained.
    pub loss: Option<f32>,
}

/// One session's driver. See the module docs.
#[derive(Debug)]
pub struct Participant {
    session: Session,
    codec: Codec,
    inbound: FrameBuffer,
    out: VecDeque<Vec<u8>>,
    policy: ParticipationPolicy,
    rng: ChaCha8Rng,
    wall_origin: Option<(Instant, i64)>,
    measure_train_time: bool,
    // Per-session state.
    round: Option<RoundId>,
    sent_update: bool,
    task_error: Option<String>,
    loss: Option<f32>,
    bytes_sent: u64,
    bytes_received: u64,
    report: Option<SessionReport>,
    running: bool,
    // Cancellation.
    epoch: u64,
    forgets: u64,
    pushed: u64,
    popped: u64,
    update_seq: Option<u64>,
    /// Under secure aggregation: the trained update's clip norm and local release, until the
    /// masked input that carries it leaves (after the neighbours' shares arrive).
    pending_contribution: Option<(RoundId, Option<f32>, Option<LocalRelease>)>,
}

impl Participant {
    /// A participant for the device configured by `config`; `seed` seeds its randomness
    /// (session jitter, stochastic quantisation).
    pub fn new(config: &ClientConfig, seed: u64) -> Self {
        let codec = Codec::default();
        let session = Session::new(SessionConfig {
            client: config.client_id,
            credential: config.credential.clone(),
            sdk_version: concat!("starling-sdk/", env!("CARGO_PKG_VERSION")).into(),
            model_family: config.model.family.clone(),
            capabilities: Capabilities::default(),
            response_timeout: config.response_timeout,
            rng_seed: seed,
            secagg: SecAggClientConfig {
                policy: config.secure_aggregation,
                entropy: Entropy(secret_entropy(config, seed)),
                exact_noise: config.exact_distributed_noise,
            },
        });
        Self {
            session,
            inbound: FrameBuffer::new(codec),
            codec,
            out: VecDeque::new(),
            policy: config.participation,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x005E_ED0F_5E55_1011),
            wall_origin: None,
            measure_train_time: true,
            round: None,
            sent_update: false,
            task_error: None,
            loss: None,
            bytes_sent: 0,
            bytes_received: 0,
            report: None,
            running: false,
            epoch: 0,
            forgets: 0,
            pushed: 0,
            popped: 0,
            update_seq: None,
            pending_contribution: None,
        }
    }

    /// Whether to report real training time in the update's metrics (default on; never under
    /// local DP, where the metrics carry nothing data-dependent). Simulations turn it off so that
    /// identical seeds give byte-identical runs.
    pub fn measure_train_time(&mut self, on: bool) {
        self.measure_train_time = on;
    }

    /// Whether a session is running.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The earliest time the coordinator allows the next check-in, if it asked for one.
    pub fn next_check_in_at(&self) -> Option<Instant> {
        self.session.next_check_in_at()
    }

    /// Starts a session: checks consent and conditions, then checks in. `wall_ms` is the wall
    /// clock at `now` (ms since the Unix epoch), used to date ledger entries.
    pub fn start(
        &mut self,
        now: Instant,
        wall_ms: i64,
        device: &Device,
        conditions: DeviceConditions,
    ) -> Result<(), StartError> {
        if self.running {
            return Err(StartError::Busy);
        }
        if !device.consent().training {
            return Err(StartError::NoConsent);
        }
        self.policy.check(&conditions)?;
        self.session.check_in(now, conditions, device.model_version()).map_err(|e| match e {
            SessionError::TooEarly { at } => StartError::TooEarly { at },
            _ => StartError::Busy,
        })?;
        self.wall_origin = Some((now, wall_ms));
        self.epoch = device.session_epoch().current();
        self.forgets = device.forget_count();
        self.update_seq = None;
        self.running = true;
        self.round = None;
        self.sent_update = false;
        self.task_error = None;
        self.loss = None;
        self.bytes_sent = 0;
        self.bytes_received = 0;
        self.report = None;
        self.inbound = FrameBuffer::new(self.codec);
        self.pending_contribution = None;
        self.flush_plain(now, device);
        Ok(())
    }

    /// The session epoch the queued frames belong to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the device's session epoch is still the one this session's frames were produced
    /// under: if not, the user withdrew training consent or asked to be forgotten, and nothing
    /// queued before may be sent.
    pub fn is_current(&self, device: &Device) -> bool {
        device.session_epoch().current() == self.epoch
    }

    /// Cancels the session if the device's session epoch moved (see the module docs): drops the
    /// queued frames and withdraws. Returns whether it did.
    pub fn check_epoch(&mut self, now: Instant, device: &mut Device) -> bool {
        if self.is_current(device) {
            return false;
        }
        if self.running {
            self.cancel(now, device);
            self.drive(now, device);
        } else {
            // A finished session's last frames (a withdrawal) are dropped too.
            self.drop_queued();
            self.epoch = device.session_epoch().current();
        }
        true
    }

    fn drop_queued(&mut self) {
        for frame in self.out.drain(..) {
            self.bytes_sent = self.bytes_sent.saturating_sub(frame.len() as u64);
        }
        self.pushed = self.popped;
    }

    /// The frame last taken with [`poll_transmit`](Self::poll_transmit) was not handed to the
    /// transport after all (the session was cancelled before it could be).
    pub fn discard_last(&mut self) {
        self.popped = self.popped.saturating_sub(1);
    }

    fn cancel(&mut self, now: Instant, device: &Device) {
        self.pending_contribution = None;
        let update_unsent = self.update_seq.is_some_and(|seq| seq >= self.popped);
        self.drop_queued();
        self.epoch = device.session_epoch().current();
        let reason = WithdrawReason::ConsentWithdrawn;
        if update_unsent {
            self.sent_update = false;
            self.update_seq = None;
            // The coordinator still waits for this round's update: tell it the device withdrew.
            if let Some(round) = self.round
                && let Ok(frame) = self.codec.encode_client(&ClientMessage::Withdraw { round, reason })
            {
                self.push(frame);
            }
        }
        if self.task_error.is_none() {
            self.task_error =
                Some("cancelled: training consent was withdrawn or the device forgot its data".into());
        }
        self.session.withdraw(now, reason);
    }

    fn push(&mut self, frame: Vec<u8>) {
        self.bytes_sent += frame.len() as u64;
        self.pushed += 1;
        self.out.push_back(frame);
    }

    /// Bytes from the coordinator (any chunking).
    pub fn handle_bytes(&mut self, now: Instant, bytes: &[u8], device: &mut Device) {
        self.check_epoch(now, device);
        if !self.running {
            return;
        }
        self.bytes_received += bytes.len() as u64;
        self.inbound.push(bytes);
        loop {
            match self.inbound.next_coordinator() {
                Ok(None) => break,
                Ok(Some(Inbound::Message { message, .. })) => self.session.handle_message(now, message),
                Ok(Some(Inbound::UnsupportedVersion { .. })) => {
                    // The coordinator speaks a version we do not; it will answer our check-in
                    // with a negotiation frame, which is what we act on.
                }
                Ok(Some(Inbound::VersionNegotiation { min, max })) => {
                    self.session.handle_version_negotiation(now, min, max)
                }
                Err(e) => {
                    self.task_error = Some(format!("invalid frame from the coordinator: {e}"));
                    self.session.handle_disconnect(now);
                    break;
                }
            }
            self.drive(now, device);
        }
        self.drive(now, device);
    }

    /// The host reports new device conditions: a running session is withdrawn when they no
    /// longer allow training.
    pub fn handle_conditions(&mut self, now: Instant, conditions: DeviceConditions, device: &mut Device) {
        self.check_epoch(now, device);
        if self.running && self.policy.check(&conditions).is_err() {
            self.session.withdraw(now, WithdrawReason::ConditionsChanged);
            self.drive(now, device);
        }
    }

    /// The user withdrew consent (or the app wants out): a running session is withdrawn.
    pub fn withdraw(&mut self, now: Instant, reason: WithdrawReason, device: &mut Device) {
        self.check_epoch(now, device);
        if self.running {
            self.session.withdraw(now, reason);
            self.drive(now, device);
        }
    }

    /// The connection was lost.
    pub fn handle_disconnect(&mut self, now: Instant, device: &mut Device) {
        self.check_epoch(now, device);
        if self.running {
            self.session.handle_disconnect(now);
            self.drive(now, device);
        }
    }

    /// Time passed: deadlines and answer timeouts.
    pub fn handle_timeout(&mut self, now: Instant, device: &mut Device) {
        self.check_epoch(now, device);
        if self.running {
            self.session.handle_timeout(now);
            self.drive(now, device);
        }
    }

    /// The next frame to send. A host whose user may withdraw consent or call `forget` while it
    /// sends checks [`is_current`](Self::is_current) first (see the module docs).
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        let frame = self.out.pop_front()?;
        self.popped += 1;
        Some(frame)
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.session.poll_timeout()
    }

    /// The report of the session that just ended.
    pub fn poll_report(&mut self) -> Option<SessionReport> {
        self.report.take()
    }

    fn wall_ms(&self, now: Instant) -> i64 {
        match self.wall_origin {
            Some((origin, wall)) => {
                wall.saturating_add((now.saturating_duration_since(origin).as_micros() / 1000) as i64)
            }
            None => 0,
        }
    }

    fn drive(&mut self, now: Instant, device: &mut Device) {
        while let Some(action) = self.session.poll_action() {
            match action {
                SessionAction::Train(req) => self.train(now, *req, device),
                SessionAction::Cancel { .. } => {
                    // Training is synchronous: nothing is running that would need stopping.
                }
                SessionAction::Finished(outcome) => {
                    self.flush(now, device);
                    let accepted = matches!(outcome, SessionOutcome::Accepted { .. });
                    // A session cancelled by a forget stores nothing about itself.
                    if device.forget_count() == self.forgets
                        && let Err(e) = device.count_session(self.bytes_sent, self.bytes_received, accepted)
                    {
                        tracing::warn!(error = %e, "could not store session counters");
                    }
                    self.running = false;
                    self.report = Some(SessionReport {
                        outcome,
                        round: self.round,
                        sent_update: self.sent_update,
                        task_error: self.task_error.take(),
                        bytes_sent: self.bytes_sent,
                        bytes_received: self.bytes_received,
                        local_epsilon: device.local_epsilon(),
                        loss: self.loss,
                    });
                }
                _ => {}
            }
        }
        self.flush(now, device);
    }

    /// An evaluation task: score the task's model on the device's held-out case, record the report
    /// on the device's contribution record, then queue it. Nothing on the device changes.
    fn evaluate(&mut self, now: Instant, req: TrainRequest, device: &mut Device) {
        let params = match resolve(&req.model, req.model_version, device) {
            Ok(p) => p,
            Err(e) => {
                self.task_error = Some(e);
                self.session.withdraw(now, WithdrawReason::TrainingFailed);
                return;
            }
        };
        let metrics = match device.evaluate(req.round, req.model_version, &params) {
            Ok(_) if !self.is_current(device) => {
                self.cancel(now, device);
                return;
            }
            Ok(m) => m,
            Err(e) => {
                let reason = match e {
                    EvalError::NoConsent => WithdrawReason::ConsentWithdrawn,
                    EvalError::Protection(_) => WithdrawReason::PrivacyRefused,
                    _ => WithdrawReason::TrainingFailed,
                };
                self.task_error = Some(e.to_string());
                self.session.withdraw(now, reason);
                return;
            }
        };
        if let Err(e) = self.session.submit_evaluation(now, req.round, metrics) {
            self.task_error = Some(e.to_string());
            return;
        }
        while let Some(msg) = self.session.poll_transmit() {
            let is_report = matches!(msg, ClientMessage::Evaluation(_));
            let frame = match self.codec.encode_client(&msg) {
                Ok(f) => f,
                Err(e) => {
                    self.task_error = Some(format!("could not encode the evaluation: {e}"));
                    self.session.handle_disconnect(now);
                    return;
                }
            };
            if is_report {
                // On the device's record durably before the report can leave.
                if let Err(e) = device.record_evaluation(req.round, frame.len() as u64, self.wall_ms(now)) {
                    self.task_error = Some(format!("could not record the contribution: {e}"));
                    self.session.handle_disconnect(now);
                    return;
                }
                self.sent_update = true;
                self.update_seq = Some(self.pushed);
            }
            self.push(frame);
        }
    }

    fn train(&mut self, now: Instant, req: TrainRequest, device: &mut Device) {
        self.round = Some(req.round);
        if req.kind == TaskKind::Evaluate {
            self.evaluate(now, req, device);
            return;
        }
        let started = self.measure_train_time.then(std::time::Instant::now);
        let params = match resolve(&req.model, req.model_version, device) {
            Ok(p) => p,
            Err(e) => {
                self.task_error = Some(e);
                self.session.withdraw(now, WithdrawReason::TrainingFailed);
                return;
            }
        };
        let trained = match device.train(req.round, req.model_version, params, &req.plan) {
            // Consent was withdrawn (or the data forgotten) while it trained: nothing is sent.
            Ok(_) if !self.is_current(device) => {
                self.cancel(now, device);
                return;
            }
            Ok(t) => t,
            Err(e) => {
                let reason = match e {
                    TrainError::NoConsent => WithdrawReason::ConsentWithdrawn,
                    TrainError::NoData => WithdrawReason::NoData,
                    TrainError::Protection(_) | TrainError::Budget(_) | TrainError::Privatize(_) => {
                        WithdrawReason::PrivacyRefused
                    }
                    _ => WithdrawReason::TrainingFailed,
                };
                self.task_error = Some(e.to_string());
                self.session.withdraw(now, reason);
                return;
            }
        };
        let encoded = EncodedUpdate::encode(&trained.update, req.plan.encoding, &mut self.rng);
        let train_ms = started.map_or(0, |t| t.elapsed().as_millis().min(u128::from(u32::MAX)) as u32);
        // Under local DP: weight 1 and no data-dependent metrics (see `Trained::metrics`).
        let metrics = trained.metrics(train_ms);
        self.loss = Some(trained.loss);
        if let Err(e) = self.session.submit_update(now, req.round, encoded, trained.weight, metrics) {
            self.task_error = Some(e.to_string());
            return;
        }
        // Encode the update frame now so that its exact size goes on the ledger, and charge the
        // ledger durably before the frame can leave.
        while let Some(msg) = self.session.poll_transmit() {
            // Under secure aggregation the masked vector is what carries the update.
            let is_update = matches!(
                msg,
                ClientMessage::Update(_) | ClientMessage::SecAgg(SecAggClientMessage::Masked(_))
            );
            let frame = match self.codec.encode_client(&msg) {
                Ok(f) => f,
                Err(e) => {
                    self.task_error = Some(format!("could not encode the update: {e}"));
                    self.session.handle_disconnect(now);
                    return;
                }
            };
            if is_update {
                if let Err(e) =
                    device.record_contribution(req.round, frame.len() as u64, &trained, self.wall_ms(now))
                {
                    self.task_error = Some(format!("could not record the contribution: {e}"));
                    self.session.handle_disconnect(now);
                    return;
                }
                self.sent_update = true;
                self.update_seq = Some(self.pushed);
            }
            self.push(frame);
        }
        if self.session.is_secure() && !self.sent_update {
            // Secure round, shares not in yet: the masked input leaves later (`flush`).
            self.pending_contribution = Some((req.round, trained.clip_norm, trained.release));
        }
    }

    fn flush_plain(&mut self, now: Instant, _device: &Device) {
        while let Some(msg) = self.session.poll_transmit() {
            match self.codec.encode_client(&msg) {
                Ok(frame) => self.push(frame),
                Err(e) => {
                    self.task_error = Some(format!("could not encode a message: {e}"));
                    self.session.handle_disconnect(now);
                }
            }
        }
    }

    /// Sends what the session queued; a masked input that leaves after training (the secure
    /// round's shares arrived later) goes on the device's contribution record first, as a plain
    /// update does in [`Self::train`].
    fn flush(&mut self, now: Instant, device: &mut Device) {
        while let Some(msg) = self.session.poll_transmit() {
            let masked = matches!(msg, ClientMessage::SecAgg(SecAggClientMessage::Masked(_)));
            let frame = match self.codec.encode_client(&msg) {
                Ok(f) => f,
                Err(e) => {
                    self.task_error = Some(format!("could not encode a message: {e}"));
                    self.session.handle_disconnect(now);
                    continue;
                }
            };
            if masked && let Some((round, clip, release)) = self.pending_contribution.take() {
                let wall = self.wall_ms(now);
                if let Err(e) = device.record_sent(round, frame.len() as u64, clip, release, wall) {
                    self.task_error = Some(format!("could not record the contribution: {e}"));
                    self.session.handle_disconnect(now);
                    continue;
                }
                self.sent_update = true;
                self.update_seq = Some(self.pushed);
            }
            self.push(frame);
        }
    }
}

/// The full parameters of a task: the shipped model, or a patch over the version the device holds.
/// The secret entropy of secure aggregation (keys, self-mask seeds, rounding, distributed noise):
/// from the operating system, unless a simulation asked for seeded noise (then from the seed, so
/// runs repeat).
fn secret_entropy(config: &ClientConfig, seed: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    if config.simulation_seeded_noise {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x005E_CA66_5EED);
        rand::Rng::fill_bytes(&mut rng, &mut out);
        return out;
    }
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut out).is_err() {
        // No OS entropy: the session refuses secure tasks on an all-zero seed (fails closed)
        // rather than using predictable keys.
        out = [0u8; 32];
    }
    out
}

fn resolve(payload: &ModelPayload, version: ModelVersion, device: &Device) -> Result<Arc<[f32]>, String> {
    if let Some(g) = device.global()
        && g.version == version
    {
        return Ok(g.params.clone());
    }
    let base = match payload {
        ModelPayload::Patch { from, .. } => match device.global() {
            Some(g) if g.version == *from => Some(&g.params[..]),
            held => {
                return Err(format!(
                    "the task patches version {} but the device holds {:?}",
                    from.0,
                    held.map(|g| g.version.0)
                ));
            }
        },
        _ => None,
    };
    payload.materialize(base).map(Arc::from).map_err(|e| format!("unusable model in the task: {e}"))
}
