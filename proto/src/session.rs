//! The client's session machine: one check-in and, if selected, one task.
//!
//! ```text
//! Idle ──check_in──▶ CheckingIn ──Task──▶ Training ──submit_update──▶ Uploading ──Receipt──▶ Done
//!                        │ ComeBackAt / Refusal / timeout    │ Abort / deadline / withdraw    │ Rejection / Abort / timeout
//!                        ▼                                    ▼                                ▼
//!                      Done                                  Done                             Done
//! ```
//!
//! Training is the host's job, not the machine's: a task surfaces as [`SessionAction::Train`], the
//! host trains (on another thread if it likes) and calls [`Session::submit_update`]. If the round
//! is aborted or the deadline passes first, [`SessionAction::Cancel`] tells the host to stop.
//! Every session ends with exactly one [`SessionAction::Finished`] carrying its
//! [`SessionOutcome`]; after it, [`Session::check_in`] may start the next session — not before
//! the time a "come back at" asked for ([`Session::next_check_in_at`]).
//!
//! # Calling contract
//! Inputs take the current time. After each, drain [`Session::poll_transmit`] (messages to send)
//! and [`Session::poll_action`]; call [`Session::handle_timeout`] once [`Session::poll_timeout`]
//! has passed.

use crate::encoding::EncodedUpdate;
use crate::ids::{ClientId, ModelVersion, RoundId};
use crate::message::{
    AbortReason, Capabilities, CheckIn, ClientMessage, ClientUpdate, CoordinatorMessage, DeviceConditions,
    EvalMetrics, EvalReport, LocalMetrics, ModelPayload, Refusal, RejectReason, SecureTask, TaskKind,
    TrainingPlan, WithdrawReason,
};
use crate::secagg::{SecAggClient, SecAggClientMessage, SecAggPolicy, SecAggServerMessage};
use crate::time::{Duration, Instant};
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::{ChaCha8Rng, ChaCha20Rng};
use std::collections::VecDeque;

/// 32 bytes of secret entropy (redacted from `Debug`).
#[derive(Clone, PartialEq, Eq)]
pub struct Entropy(pub [u8; 32]);

impl std::fmt::Debug for Entropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Entropy(..)")
    }
}

/// How the device takes part in secure aggregation.
#[derive(Clone, Debug, PartialEq)]
pub struct SecAggClientConfig {
    /// The device's own floor under the coordinator's protocol parameters (the threshold it
    /// accepts, the neighbourhoods it accepts).
    pub policy: SecAggPolicy,
    /// Secret entropy for the protocol's keys and self-mask seeds, the stochastic rounding and the
    /// distributed-DP noise: a ChaCha20 generator keyed with it feeds them all. The SDK draws it
    /// from the operating system; tests and simulations seed it. All zeros (the default) means
    /// "none": the session then refuses secure tasks.
    pub entropy: Entropy,
    /// Draw the distributed-DP noise with opendp's exact discrete Gaussian (needs the `opendp`
    /// feature; without it the fast sampler is used) instead of the fast floating-point sampler.
    pub exact_noise: bool,
}

impl Default for SecAggClientConfig {
    fn default() -> Self {
        Self { policy: SecAggPolicy::default(), entropy: Entropy([0; 32]), exact_noise: false }
    }
}

/// A secure-aggregation round in progress on the device.
struct SecureRun {
    client: SecAggClient,
    task: SecureTask,
    shape: crate::update::ModelShape,
    /// The encoded input, submitted before the neighbours' shares arrived.
    pending: Option<Vec<u32>>,
    /// The task's deadline for the (masked) input.
    deadline: Instant,
    /// This round's secret stream (keys, rounding, noise): keyed from the session's secret stream
    /// *and* the round, so that a session re-created from the same entropy (a restarted app with
    /// seeded entropy, a simulated client) never repeats keys or noise across rounds.
    rng: ChaCha20Rng,
}

impl std::fmt::Debug for SecureRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureRun").field("task", &self.task).finish_non_exhaustive()
    }
}

/// Settings of a client's sessions.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionConfig {
    /// The client's id.
    pub client: ClientId,
    /// The enrollment credential presented at check-in.
    pub credential: Vec<u8>,
    /// SDK version string.
    pub sdk_version: String,
    /// Model family the client runs.
    pub model_family: String,
    /// What the client can handle.
    pub capabilities: Capabilities,
    /// How long to wait for the coordinator's answer to a check-in, or to an upload.
    pub response_timeout: Duration,
    /// Seed for the machine's RNG (spreading "come back" times).
    pub rng_seed: u64,
    /// Secure aggregation: the device's policy and secret entropy.
    pub secagg: SecAggClientConfig,
}

/// A task the host should train on.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainRequest {
    /// The round.
    pub round: RoundId,
    /// The model version to train from (the update's base).
    pub model_version: ModelVersion,
    /// The global parameters (full, or a patch over the version the client said it holds).
    pub model: ModelPayload,
    /// How to train.
    pub plan: TrainingPlan,
    /// When the update must be submitted by.
    pub deadline: Instant,
    /// Set when the round runs secure aggregation: the session encodes the submitted update as
    /// this says (dense, clipped, noised, mod 2^bits) and only the masked vector leaves the device.
    pub secure: Option<SecureTask>,
    /// Train (answer with [`Session::submit_update`]) or evaluate (answer with
    /// [`Session::submit_evaluation`]; do not train).
    pub kind: TaskKind,
}

/// What the host should do.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum SessionAction {
    /// Train on this task, then call [`Session::submit_update`]; or, when the request's `kind` is
    /// [`TaskKind::Evaluate`], evaluate and call [`Session::submit_evaluation`].
    Train(Box<TrainRequest>),
    /// Stop training for this round; the result is no longer wanted.
    Cancel {
        /// The round.
        round: RoundId,
    },
    /// The session is over.
    Finished(SessionOutcome),
}

/// How a session ended.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum SessionOutcome {
    /// The update was accepted.
    Accepted {
        /// The round.
        round: RoundId,
    },
    /// The update was rejected.
    Rejected {
        /// The round.
        round: RoundId,
        /// Why.
        reason: RejectReason,
    },
    /// Not needed now; check in again at `at` or later.
    ComeBackAt {
        /// The earliest time for the next check-in (already spread over the coordinator's window).
        at: Instant,
    },
    /// The check-in was refused.
    Refused(Refusal),
    /// The coordinator aborted the round.
    Aborted {
        /// The round.
        round: RoundId,
        /// Why.
        reason: AbortReason,
    },
    /// The host withdrew (conditions changed, consent withdrawn, training failed).
    Withdrawn {
        /// Why.
        reason: WithdrawReason,
    },
    /// The training deadline passed before an update was submitted.
    DeadlineMissed {
        /// The round.
        round: RoundId,
    },
    /// The coordinator did not answer in time.
    TimedOut,
    /// The coordinator speaks other protocol versions.
    VersionMismatch {
        /// Lowest version the coordinator speaks.
        min: u16,
        /// Highest version the coordinator speaks.
        max: u16,
    },
    /// The coordinator sent something that makes no sense in this state.
    ProtocolViolation(String),
}

/// Why an input was refused by the session machine (a host mistake, not a peer's).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// `check_in` while a session is running.
    #[error("a session is already running")]
    Busy,
    /// `check_in` before the time the coordinator asked for.
    #[error("the coordinator asked to come back at {at:?}")]
    TooEarly {
        /// Earliest allowed check-in.
        at: Instant,
    },
    /// `submit_update` with no task in progress (or for another round).
    #[error("no task in progress for this round")]
    NoTask,
    /// `submit_update` after the deadline.
    #[error("the deadline for round {0} has passed")]
    DeadlineMissed(RoundId),
    /// Under secure aggregation the update could not be encoded (wrong shape, non-finite values).
    #[error("the update cannot be encoded for secure aggregation: {0}")]
    Encoding(String),
    /// An update for an evaluation task, or an evaluation for a training task.
    #[error("the task asks for {expected:?}, not this")]
    WrongTaskKind {
        /// What the task asks.
        expected: TaskKind,
    },
    /// Evaluation figures that cannot be (non-finite, negative, or beyond the case count).
    #[error("invalid evaluation figures")]
    InvalidEvaluation,
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    Idle,
    CheckingIn {
        until: Instant,
    },
    Training {
        round: RoundId,
        version: ModelVersion,
        deadline: Instant,
        kind: TaskKind,
    },
    /// Secure round: the input is encoded, the neighbours' shares have not arrived yet.
    AwaitingShares {
        round: RoundId,
        version: ModelVersion,
        until: Instant,
    },
    /// Secure round: the masked input is sent, the unmask request has not arrived yet.
    Unmasking {
        round: RoundId,
        until: Instant,
    },
    Uploading {
        round: RoundId,
        until: Instant,
    },
}

/// The client-side session machine. See the module docs.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    rng: ChaCha8Rng,
    /// Keys, self-mask seeds, rounding and distributed noise (secret; see [`SecAggClientConfig`]).
    secret_rng: ChaCha20Rng,
    secure: Option<SecureRun>,
    state: State,
    not_before: Option<Instant>,
    transmits: VecDeque<ClientMessage>,
    actions: VecDeque<SessionAction>,
}

impl Session {
    /// A new, idle session machine.
    pub fn new(config: SessionConfig) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(config.rng_seed),
            secret_rng: ChaCha20Rng::from_seed(config.secagg.entropy.0),
            secure: None,
            config,
            state: State::Idle,
            not_before: None,
            transmits: VecDeque::new(),
            actions: VecDeque::new(),
        }
    }

    /// The client id.
    pub fn client(&self) -> ClientId {
        self.config.client
    }

    /// Whether no session is running.
    pub fn is_idle(&self) -> bool {
        self.state == State::Idle
    }

    /// The round being trained for, if any.
    pub fn training_round(&self) -> Option<RoundId> {
        match self.state {
            State::Training { round, .. } => Some(round),
            _ => None,
        }
    }

    /// Whether the current task runs secure aggregation.
    pub fn is_secure(&self) -> bool {
        self.secure.is_some()
    }

    /// The earliest time the coordinator allows the next check-in, if it asked for one.
    pub fn next_check_in_at(&self) -> Option<Instant> {
        self.not_before
    }

    /// Starts a session by checking in.
    pub fn check_in(
        &mut self,
        now: Instant,
        conditions: DeviceConditions,
        have_version: Option<ModelVersion>,
    ) -> Result<(), SessionError> {
        if self.state != State::Idle {
            return Err(SessionError::Busy);
        }
        if let Some(at) = self.not_before
            && now < at
        {
            return Err(SessionError::TooEarly { at });
        }
        self.not_before = None;
        self.transmits.push_back(ClientMessage::CheckIn(CheckIn {
            client: self.config.client,
            credential: self.config.credential.clone(),
            sdk_version: self.config.sdk_version.clone(),
            model_family: self.config.model_family.clone(),
            have_version,
            conditions,
            capabilities: self.config.capabilities.clone(),
        }));
        self.state = State::CheckingIn { until: now + self.config.response_timeout };
        Ok(())
    }

    /// Handles a message from the coordinator.
    pub fn handle_message(&mut self, now: Instant, message: CoordinatorMessage) {
        match (self.state.clone(), message) {
            (State::CheckingIn { .. }, CoordinatorMessage::Task(task)) => {
                let deadline = now + Duration::from_millis(task.report_within_ms);
                if task.kind == TaskKind::Evaluate && task.secure.is_some() {
                    self.transmits.push_back(ClientMessage::Withdraw {
                        round: task.round,
                        reason: WithdrawReason::PrivacyRefused,
                    });
                    let text = "an evaluation task cannot be secure".to_string();
                    return self.finish(SessionOutcome::ProtocolViolation(text));
                }
                if let Some(secure) = &task.secure
                    && let Err(e) = self.start_secure(task.round, secure, task.model.shape(), deadline)
                {
                    self.transmits.push_back(ClientMessage::Withdraw {
                        round: task.round,
                        reason: WithdrawReason::PrivacyRefused,
                    });
                    return self.finish(SessionOutcome::ProtocolViolation(e));
                }
                self.state = State::Training {
                    round: task.round,
                    version: task.model_version,
                    deadline,
                    kind: task.kind,
                };
                self.actions.push_back(SessionAction::Train(Box::new(TrainRequest {
                    round: task.round,
                    model_version: task.model_version,
                    model: task.model,
                    plan: task.plan,
                    deadline,
                    secure: task.secure,
                    kind: task.kind,
                })));
            }
            (
                State::Training { round, .. }
                | State::AwaitingShares { round, .. }
                | State::Unmasking { round, .. },
                CoordinatorMessage::SecAgg(m),
            ) if m.round() == round => self.handle_secagg(now, round, m),
            (State::Unmasking { round, .. }, CoordinatorMessage::Receipt { round: r }) if r == round => {
                // The sum was computed without this device's unmasking shares (its request or its
                // answer was lost; its neighbours' shares sufficed): its input is in the sum.
                self.finish(SessionOutcome::Accepted { round });
            }
            (
                State::AwaitingShares { round, .. } | State::Unmasking { round, .. },
                CoordinatorMessage::Abort { round: r, reason },
            ) if r == round => {
                self.finish(SessionOutcome::Aborted { round, reason });
            }
            (
                State::AwaitingShares { round, .. } | State::Unmasking { round, .. },
                CoordinatorMessage::Rejection { round: r, reason },
            ) if r == round => {
                self.finish(SessionOutcome::Rejected { round, reason });
            }
            (State::CheckingIn { .. }, CoordinatorMessage::ComeBackAt(c)) => {
                let spread = if c.window_ms == 0 { 0 } else { self.rng.random_range(0..=c.window_ms) };
                let at = now + Duration::from_millis(c.after_ms.saturating_add(spread));
                self.not_before = Some(at);
                self.finish(SessionOutcome::ComeBackAt { at });
            }
            (State::CheckingIn { .. }, CoordinatorMessage::Refusal(r)) => {
                self.finish(SessionOutcome::Refused(r));
            }
            (State::Training { round, .. }, CoordinatorMessage::Abort { round: r, reason }) if r == round => {
                self.actions.push_back(SessionAction::Cancel { round });
                self.finish(SessionOutcome::Aborted { round, reason });
            }
            (State::Uploading { round, .. }, CoordinatorMessage::Receipt { round: r }) if r == round => {
                self.finish(SessionOutcome::Accepted { round });
            }
            (State::Uploading { round, .. }, CoordinatorMessage::Rejection { round: r, reason })
                if r == round =>
            {
                self.finish(SessionOutcome::Rejected { round, reason });
            }
            (State::Uploading { round, .. }, CoordinatorMessage::Abort { round: r, reason })
                if r == round =>
            {
                // The round closed while the upload was in flight; a Rejection (Late) may follow
                // but the session is over either way.
                self.finish(SessionOutcome::Aborted { round, reason });
            }
            (State::Idle, _) => {
                // Stray message after the session ended (e.g. an abort that crossed a receipt): ignore.
            }
            (state, msg) => {
                let text = format!("unexpected {} while {}", message_name(&msg), state_name(&state));
                if let State::Training { round, .. } = state {
                    self.actions.push_back(SessionAction::Cancel { round });
                }
                self.finish(SessionOutcome::ProtocolViolation(text));
            }
        }
    }

    /// The coordinator answered with a version-negotiation frame.
    pub fn handle_version_negotiation(&mut self, _now: Instant, min: u16, max: u16) {
        if self.state == State::Idle {
            return;
        }
        if let State::Training { round, .. } = self.state {
            self.actions.push_back(SessionAction::Cancel { round });
        }
        self.finish(SessionOutcome::VersionMismatch { min, max });
    }

    /// Submits the trained update for the current task.
    pub fn submit_update(
        &mut self,
        now: Instant,
        round: RoundId,
        update: EncodedUpdate,
        weight: f32,
        metrics: LocalMetrics,
    ) -> Result<(), SessionError> {
        let State::Training { round: current, version, deadline, kind } = self.state else {
            return Err(SessionError::NoTask);
        };
        if current != round {
            return Err(SessionError::NoTask);
        }
        if kind != TaskKind::Train {
            return Err(SessionError::WrongTaskKind { expected: kind });
        }
        if now > deadline {
            self.finish(SessionOutcome::DeadlineMissed { round });
            return Err(SessionError::DeadlineMissed(round));
        }
        if self.secure.is_some() {
            return self.submit_secure(now, round, version, deadline, update);
        }
        self.transmits.push_back(ClientMessage::Update(ClientUpdate {
            round,
            base_version: version,
            update,
            weight,
            metrics,
        }));
        self.state = State::Uploading { round, until: now + self.config.response_timeout };
        Ok(())
    }

    /// Submits the figures of the current evaluation task ([`TaskKind::Evaluate`]).
    pub fn submit_evaluation(
        &mut self,
        now: Instant,
        round: RoundId,
        metrics: EvalMetrics,
    ) -> Result<(), SessionError> {
        let State::Training { round: current, version, deadline, kind } = self.state else {
            return Err(SessionError::NoTask);
        };
        if current != round {
            return Err(SessionError::NoTask);
        }
        if kind != TaskKind::Evaluate {
            return Err(SessionError::WrongTaskKind { expected: kind });
        }
        if !metrics.is_valid() {
            return Err(SessionError::InvalidEvaluation);
        }
        if now > deadline {
            self.finish(SessionOutcome::DeadlineMissed { round });
            return Err(SessionError::DeadlineMissed(round));
        }
        self.transmits.push_back(ClientMessage::Evaluation(EvalReport {
            round,
            base_version: version,
            metrics,
        }));
        self.state = State::Uploading { round, until: now + self.config.response_timeout };
        Ok(())
    }

    /// The host gives up on the current session (conditions changed, consent withdrawn, …).
    /// Tells the coordinator when a task is in progress. No effect when idle.
    pub fn withdraw(&mut self, _now: Instant, reason: WithdrawReason) {
        match self.state {
            State::Idle => return,
            State::Training { round, .. } => {
                self.transmits.push_back(ClientMessage::Withdraw { round, reason });
                self.actions.push_back(SessionAction::Cancel { round });
            }
            State::AwaitingShares { round, .. } | State::Unmasking { round, .. } => {
                self.transmits.push_back(ClientMessage::Withdraw { round, reason });
            }
            State::CheckingIn { .. } | State::Uploading { .. } => {}
        }
        self.finish(SessionOutcome::Withdrawn { reason });
    }

    /// The connection was lost: the session ends as timed out (the host may check in again later).
    pub fn handle_disconnect(&mut self, _now: Instant) {
        if let State::Training { round, .. } = self.state {
            self.actions.push_back(SessionAction::Cancel { round });
        }
        if self.state != State::Idle {
            self.finish(SessionOutcome::TimedOut);
        }
    }

    /// Advances deadlines.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::CheckingIn { until }
            | State::Uploading { until, .. }
            | State::AwaitingShares { until, .. }
            | State::Unmasking { until, .. }
                if now >= until =>
            {
                self.finish(SessionOutcome::TimedOut);
            }
            State::Training { round, deadline, .. } if now >= deadline => {
                self.actions.push_back(SessionAction::Cancel { round });
                self.finish(SessionOutcome::DeadlineMissed { round });
            }
            _ => {}
        }
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<ClientMessage> {
        self.transmits.pop_front()
    }

    /// The next action for the host.
    pub fn poll_action(&mut self) -> Option<SessionAction> {
        self.actions.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Idle => None,
            State::CheckingIn { until }
            | State::Uploading { until, .. }
            | State::AwaitingShares { until, .. }
            | State::Unmasking { until, .. } => Some(until),
            State::Training { deadline, .. } => Some(deadline),
        }
    }

    fn finish(&mut self, outcome: SessionOutcome) {
        self.state = State::Idle;
        self.secure = None;
        self.actions.push_back(SessionAction::Finished(outcome));
    }

    /// A secure task arrived: start the protocol (key advertisement).
    fn start_secure(
        &mut self,
        round: RoundId,
        task: &SecureTask,
        shape: crate::update::ModelShape,
        deadline: Instant,
    ) -> Result<(), String> {
        if self.config.secagg.entropy.0 == [0; 32] {
            return Err("no secret entropy for secure aggregation (all-zero seed): refused".into());
        }
        task.quant.validate().map_err(|e| format!("secure aggregation encoding refused: {e}"))?;
        if task.quant.dim as usize != shape.len() || task.params.len != task.quant.padded_dim {
            return Err("secure aggregation task does not match the model's shape".into());
        }
        let mut draw = [0u8; 32];
        self.secret_rng.fill_bytes(&mut draw);
        let mut rng = ChaCha20Rng::from_seed(round_seed(&draw, round, self.config.client));
        draw.fill(0);
        let mut entropy = [0u8; 32];
        rng.fill_bytes(&mut entropy);
        let policy = self.config.secagg.policy;
        let (client, advert) = SecAggClient::new(round, self.config.client, task.params, policy, entropy)
            .map_err(|e| e.to_string())?;
        self.transmits.push_back(ClientMessage::SecAgg(SecAggClientMessage::KeyAdvert(advert)));
        self.secure = Some(SecureRun { client, task: task.clone(), shape, pending: None, deadline, rng });
        Ok(())
    }

    /// A secure-aggregation message of the current round.
    fn handle_secagg(&mut self, now: Instant, round: RoundId, m: SecAggServerMessage) {
        let Some(run) = &mut self.secure else {
            return self.violation(round, "secure-aggregation message in a plain round".into());
        };
        let result = match m {
            SecAggServerMessage::Neighbourhood(n) => run
                .client
                .handle_neighbourhood(n)
                .map(|b| self.transmits.push_back(ClientMessage::SecAgg(SecAggClientMessage::Shares(b)))),
            SecAggServerMessage::RoutedShares(r) => run.client.handle_routed_shares(r),
            SecAggServerMessage::UnmaskRequest(u) => match self.state {
                State::Unmasking { .. } => run.client.handle_unmask(u).map(|resp| {
                    self.transmits.push_back(ClientMessage::SecAgg(SecAggClientMessage::Unmask(resp)));
                    let until = now + self.config.response_timeout;
                    self.state = State::Uploading { round, until };
                }),
                _ => return self.violation(round, "unmask request before the masked input was sent".into()),
            },
        };
        if let Err(e) = result {
            return self.violation(round, e.to_string());
        }
        // The shares may have been the last thing a submitted input waited for.
        if let State::AwaitingShares { version, .. } = self.state
            && let Some(run) = &mut self.secure
            && run.client.ready_to_mask()
            && let Some(input) = run.pending.take()
        {
            self.send_masked(now, round, version, input);
        }
    }

    /// The coordinator broke the protocol (or asked for something the device's policy refuses):
    /// withdraw and end the session.
    fn violation(&mut self, round: RoundId, text: String) {
        if let State::Training { .. } = self.state {
            self.actions.push_back(SessionAction::Cancel { round });
        }
        self.transmits.push_back(ClientMessage::Withdraw { round, reason: WithdrawReason::PrivacyRefused });
        self.finish(SessionOutcome::ProtocolViolation(format!("secure aggregation: {text}")));
    }

    /// Encodes the trained update for secure aggregation and masks it (now, or once the shares
    /// arrive).
    fn submit_secure(
        &mut self,
        now: Instant,
        round: RoundId,
        version: ModelVersion,
        deadline: Instant,
        update: EncodedUpdate,
    ) -> Result<(), SessionError> {
        let Some(run) = &mut self.secure else { return Err(SessionError::NoTask) };
        let encoded = update.decode(run.shape, run.shape.len()).map_err(|e| e.to_string()).and_then(|u| {
            let dense = u.to_dense();
            let sampler = secure_sampler(self.config.secagg.exact_noise);
            crate::dp::distributed::encode(&dense, &run.task.quant, sampler.as_ref(), &mut run.rng)
                .map_err(|e| e.to_string())
        });
        let input = match encoded {
            Ok(e) => e.values,
            Err(e) => {
                self.transmits
                    .push_back(ClientMessage::Withdraw { round, reason: WithdrawReason::TrainingFailed });
                self.finish(SessionOutcome::ProtocolViolation(format!("cannot encode the update: {e}")));
                return Err(SessionError::Encoding(e));
            }
        };
        if run.client.ready_to_mask() {
            self.send_masked(now, round, version, input);
        } else {
            run.pending = Some(input);
            let until = deadline.max(now) + self.config.response_timeout * 2;
            self.state = State::AwaitingShares { round, version, until };
        }
        Ok(())
    }

    fn send_masked(&mut self, now: Instant, round: RoundId, version: ModelVersion, input: Vec<u32>) {
        let Some(run) = &mut self.secure else { return };
        match run.client.mask(version, input) {
            Ok(masked) => {
                self.transmits.push_back(ClientMessage::SecAgg(SecAggClientMessage::Masked(masked)));
                // The unmask request comes once the coordinator closes the masked-input phase,
                // at the latest around the task's deadline.
                let until = run.deadline.max(now) + self.config.response_timeout * 2;
                self.state = State::Unmasking { round, until };
            }
            Err(e) => self.violation(round, e.to_string()),
        }
    }
}

/// The seed of one round's secret stream: SHA-256 of a label, a draw from the session's secret
/// stream, the round and the client.
fn round_seed(draw: &[u8; 32], round: RoundId, client: ClientId) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"starling session secagg round v1");
    h.update(draw);
    h.update(round.0.to_le_bytes());
    h.update(client.0.to_le_bytes());
    h.finalize().into()
}

/// The discrete Gaussian sampler for distributed-DP noise on the device.
fn secure_sampler(exact: bool) -> Box<dyn crate::dp::distributed::DiscreteGaussian> {
    #[cfg(feature = "opendp")]
    if exact {
        return Box::new(crate::dp::distributed::OpenDpDiscreteGaussian);
    }
    let _ = exact;
    Box::new(crate::dp::distributed::FastDiscreteGaussian)
}

fn message_name(m: &CoordinatorMessage) -> &'static str {
    match m {
        CoordinatorMessage::Task(_) => "Task",
        CoordinatorMessage::ComeBackAt(_) => "ComeBackAt",
        CoordinatorMessage::Refusal(_) => "Refusal",
        CoordinatorMessage::Receipt { .. } => "Receipt",
        CoordinatorMessage::Rejection { .. } => "Rejection",
        CoordinatorMessage::Abort { .. } => "Abort",
        CoordinatorMessage::SecAgg(_) => "SecAgg",
    }
}

fn state_name(s: &State) -> &'static str {
    match s {
        State::Idle => "idle",
        State::CheckingIn { .. } => "checking in",
        State::Training { .. } => "training",
        State::Uploading { .. } => "uploading",
        State::AwaitingShares { .. } => "waiting for secure-aggregation shares",
        State::Unmasking { .. } => "waiting for the unmask request",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dp::distributed::DistributedDpConfig;
    use crate::secagg::SecAggParams;
    use crate::update::ModelShape;

    fn session(entropy: [u8; 32]) -> Session {
        Session::new(SessionConfig {
            client: ClientId(3),
            credential: vec![],
            sdk_version: "t".into(),
            model_family: "t".into(),
            capabilities: Capabilities::default(),
            response_timeout: Duration::from_secs(5),
            rng_seed: 1,
            secagg: SecAggClientConfig { entropy: Entropy(entropy), ..Default::default() },
        })
    }

    fn task() -> (SecureTask, ModelShape) {
        let shape = ModelShape::new(8, 4).unwrap();
        let cfg = DistributedDpConfig {
            clip: 1.0,
            noise_multiplier: 1.0,
            dim: shape.len(),
            bits: 32,
            max_cohort: 16,
            dropout_tolerance: 0.2,
            rotation: false,
            scale: None,
        };
        let quant = cfg.plan(8, 5).unwrap();
        let params = SecAggParams { neighbours: 8, threshold: 5, bits: 32, len: quant.padded_dim };
        (SecureTask { params, quant }, shape)
    }

    /// A session re-created from the same entropy (a simulated client, an app restarted with
    /// seeded entropy) must not repeat its secret stream in a later round: the same noise in two
    /// releases adds up instead of averaging out, and repeated keys would reuse masks.
    #[test]
    fn a_recreated_session_never_repeats_its_round_secrets() {
        let (t, shape) = task();
        let first_draw = |round: u64| {
            let mut s = session([7; 32]);
            s.start_secure(RoundId(round), &t, shape, Instant::ZERO).unwrap();
            let run = s.secure.as_mut().unwrap();
            (run.rng.next_u64(), s.poll_transmit())
        };
        let (a1, advert1) = first_draw(1);
        let (a1_again, advert1_again) = first_draw(1);
        let (a2, advert2) = first_draw(2);
        assert_eq!((a1, &advert1), (a1_again, &advert1_again), "deterministic for one round");
        assert_ne!(a1, a2, "the round's secret stream depends on the round");
        assert_ne!(advert1, advert2);
    }

    #[test]
    fn a_session_without_entropy_refuses_secure_tasks() {
        let (t, shape) = task();
        let mut s = session([0; 32]);
        assert!(s.start_secure(RoundId(1), &t, shape, Instant::ZERO).is_err());
    }
}
