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
    LocalMetrics, ModelPayload, Refusal, RejectReason, TrainingPlan, WithdrawReason,
};
use crate::time::{Duration, Instant};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;

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
}

/// What the host should do.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum SessionAction {
    /// Train on this task, then call [`Session::submit_update`].
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
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    Idle,
    CheckingIn { until: Instant },
    Training { round: RoundId, version: ModelVersion, deadline: Instant },
    Uploading { round: RoundId, until: Instant },
}

/// The client-side session machine. See the module docs.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    rng: ChaCha8Rng,
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
                self.state = State::Training { round: task.round, version: task.model_version, deadline };
                self.actions.push_back(SessionAction::Train(Box::new(TrainRequest {
                    round: task.round,
                    model_version: task.model_version,
                    model: task.model,
                    plan: task.plan,
                    deadline,
                })));
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
        let State::Training { round: current, version, deadline } = self.state else {
            return Err(SessionError::NoTask);
        };
        if current != round {
            return Err(SessionError::NoTask);
        }
        if now > deadline {
            self.finish(SessionOutcome::DeadlineMissed { round });
            return Err(SessionError::DeadlineMissed(round));
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

    /// The host gives up on the current session (conditions changed, consent withdrawn, …).
    /// Tells the coordinator when a task is in progress. No effect when idle.
    pub fn withdraw(&mut self, _now: Instant, reason: WithdrawReason) {
        match self.state {
            State::Idle => return,
            State::Training { round, .. } => {
                self.transmits.push_back(ClientMessage::Withdraw { round, reason });
                self.actions.push_back(SessionAction::Cancel { round });
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
            State::CheckingIn { until } | State::Uploading { until, .. } if now >= until => {
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
            State::CheckingIn { until } | State::Uploading { until, .. } => Some(until),
            State::Training { deadline, .. } => Some(deadline),
        }
    }

    fn finish(&mut self, outcome: SessionOutcome) {
        self.state = State::Idle;
        self.actions.push_back(SessionAction::Finished(outcome));
    }
}

fn message_name(m: &CoordinatorMessage) -> &'static str {
    match m {
        CoordinatorMessage::Task(_) => "Task",
        CoordinatorMessage::ComeBackAt(_) => "ComeBackAt",
        CoordinatorMessage::Refusal(_) => "Refusal",
        CoordinatorMessage::Receipt { .. } => "Receipt",
        CoordinatorMessage::Rejection { .. } => "Rejection",
        CoordinatorMessage::Abort { .. } => "Abort",
    }
}

fn state_name(s: &State) -> &'static str {
    match s {
        State::Idle => "idle",
        State::CheckingIn { .. } => "checking in",
        State::Training { .. } => "training",
        State::Uploading { .. } => "uploading",
    }
}
