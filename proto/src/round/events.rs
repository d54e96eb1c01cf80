//! What the round engine reports: phases, failures, per-round figures, events and transmits.

use crate::ids::{ClientId, ModelVersion, RoundId};
use crate::message::{CoordinatorMessage, Refusal, RejectReason};
use crate::strategy::{AdmissionError, PrivacyCharge};
use crate::time::Duration;
use std::sync::Arc;

/// The phase of the current round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No round is running.
    Idle,
    /// Gathering check-ins.
    Selecting,
    /// Waiting for selected clients' updates.
    Collecting,
    /// Combining updates (transient: happens within one input).
    Aggregating,
    /// The leader of a cluster: its own part of the round is over and it waits for the other
    /// nodes' shares ([`Orchestrator::handle_shares`](super::Orchestrator::handle_shares)).
    Combining,
    /// The last round committed a new model.
    Committed,
    /// The last round failed; the model is unchanged.
    Failed,
}

/// Why a round failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FailReason {
    /// Selection closed with fewer eligible check-ins than `min_reports`.
    #[error("too few check-ins: {got}, need {needed}")]
    TooFewCheckIns {
        /// Check-ins gathered.
        got: usize,
        /// Minimum needed.
        needed: usize,
    },
    /// The report deadline passed (or every client finished) with fewer reports than `min_reports`.
    #[error("too few reports: {got}, need {needed}")]
    TooFewReports {
        /// Reports accepted.
        got: usize,
        /// Minimum needed.
        needed: usize,
    },
    /// The strategy failed to aggregate.
    #[error("aggregation failed: {0}")]
    Aggregation(#[from] crate::strategy::AggregateError),
    /// The host shut the orchestrator down mid-round.
    #[error("shut down")]
    ShutDown,
    /// The host aborted the round (e.g. it could not record the round's start durably).
    #[error("aborted by the host: {0}")]
    Aborted(String),
    /// Secure aggregation could not produce the sum (too few survivors, missing or inconsistent
    /// shares, a cohort the modulus cannot hold): nothing was unmasked or released.
    #[error("secure aggregation failed: {0}")]
    SecureAggregation(String),
}

/// Why [`Orchestrator::install_model`](super::Orchestrator::install_model) refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    /// A round is running: install between rounds.
    #[error("{0} is running")]
    Busy(RoundId),
    /// The model has another length.
    #[error("the model has {got} values, the served one {want}")]
    Shape {
        /// Its length.
        got: usize,
        /// The served model's length.
        want: usize,
    },
    /// A value is not finite.
    #[error("the model has a value that is not finite")]
    NonFinite,
    /// The strategy state does not fit this strategy.
    #[error("strategy state: {0}")]
    State(crate::strategy::StateError),
    /// The version is older than the one served (versions only grow).
    #[error("{got} is older than the served {serving}")]
    Older {
        /// The version offered.
        got: ModelVersion,
        /// The version served.
        serving: ModelVersion,
    },
}

/// Why a round could not start.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A round is already running.
    #[error("round {0} is still running")]
    Busy(RoundId),
    /// The strategy refused (e.g. the privacy budget would be exceeded).
    #[error("round refused: {0}")]
    Refused(#[from] AdmissionError),
    /// The orchestrator was shut down.
    #[error("shut down")]
    ShutDown,
    /// The orchestrator halted earlier (e.g. the privacy budget was exhausted) and refuses every
    /// later round; a new engine (a restart with a new budget) is needed.
    #[error("halted: {0:?}")]
    Halted(Refusal),
    /// Federated evaluation is not supported in this configuration (secure aggregation, or a
    /// local-DP plan); the text says which. Training is unaffected.
    #[error("federated evaluation is not supported {0}")]
    EvaluationUnsupported(&'static str),
    /// A follower was asked to serve a round of another model version than it serves (it must
    /// adopt the leader's checkpoint first).
    #[error("the round trains from {wanted}, this node serves {serving}")]
    VersionMismatch {
        /// The version served.
        serving: ModelVersion,
        /// The round's version.
        wanted: ModelVersion,
    },
}

/// Counts and figures of one finished round.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct RoundStats {
    /// Eligible check-ins gathered.
    pub candidates: usize,
    /// Clients sent the task.
    pub selected: usize,
    /// Updates accepted.
    pub reported: usize,
    /// Updates rejected.
    pub rejected: usize,
    /// Selected clients that disconnected or withdrew.
    pub dropped: usize,
    /// Selected clients still training when the round closed.
    pub unfinished: usize,
    /// Sum of accepted weights.
    pub total_weight: f64,
    /// Weighted mean of the reported local losses.
    pub mean_loss: Option<f64>,
    /// Mean of the reported local HR@10 values.
    pub mean_local_hit_rate: Option<f64>,
    /// The clip norm the round's plan asked clients to clip to (it moves under adaptive clipping).
    pub clip_norm: Option<f32>,
    /// Accepted updates that carried an adaptive-clipping indicator, and how many of those said
    /// the norm before clipping was within the clip norm. Unnoised: for the host's diagnostics
    /// (the simulator's report), never for release.
    pub clip_indicators: usize,
    /// See `clip_indicators`.
    pub within_clip: usize,
    /// Secure aggregation's per-phase figures (survivors, bytes), for secure rounds.
    pub secagg: Option<Box<crate::secagg::SecAggStats>>,
    /// From `start_round` to the close of selection.
    pub selection_time: Duration,
    /// From `start_round` to the end.
    pub duration: Duration,
}

/// A committed round.
#[derive(Clone, Debug, PartialEq)]
pub struct CommittedRound {
    /// The round.
    pub round: RoundId,
    /// The new model version.
    pub version: ModelVersion,
    /// The new global parameters.
    pub model: Arc<[f32]>,
    /// Privacy cost to record durably before releasing the model, if a DP layer produced it.
    pub privacy: Option<PrivacyCharge>,
    /// The strategy's state after this round (server-optimizer moments, an adaptive clip norm):
    /// the host checkpoints it with the model, so that a restart continues exactly.
    pub strategy_state: Arc<crate::strategy::StrategyState>,
    /// Figures of the round.
    pub stats: RoundStats,
}

/// A finished federated-evaluation round: the model and its version are unchanged.
#[derive(Clone, Debug, PartialEq)]
pub struct EvaluatedRound {
    /// The round.
    pub round: RoundId,
    /// The model version evaluated (still the current one).
    pub version: ModelVersion,
    /// The released figures.
    pub metrics: super::FederatedEval,
    /// Privacy cost of the release under DP: the host must record it durably (the privacy ledger)
    /// before it releases the figures to anyone.
    pub privacy: Option<PrivacyCharge>,
    /// Figures of the round (`reported` counts evaluation reports).
    pub stats: RoundStats,
}

/// Something that happened, for the host to log, persist or report.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum RoundEvent {
    /// A round started.
    Started {
        /// The round.
        round: RoundId,
        /// The model version it trains from (or evaluates).
        version: ModelVersion,
        /// Training or federated evaluation.
        kind: crate::message::TaskKind,
    },
    /// Selection closed and tasks were sent.
    SelectionClosed {
        /// The round.
        round: RoundId,
        /// Eligible check-ins.
        candidates: usize,
        /// Clients selected.
        selected: usize,
    },
    /// An update (in an evaluation round: an evaluation report) was accepted into the aggregate.
    UpdateAccepted {
        /// The round.
        round: RoundId,
        /// Who sent it.
        client: ClientId,
    },
    /// An update (or an evaluation report) was rejected; the aggregate is untouched.
    UpdateRejected {
        /// The round named by the update (or the current one).
        round: RoundId,
        /// Who sent it.
        client: ClientId,
        /// Why.
        reason: RejectReason,
    },
    /// A check-in was refused.
    CheckInRefused {
        /// Who checked in.
        client: ClientId,
        /// Why.
        reason: Refusal,
    },
    /// A selected client disconnected or withdrew before reporting.
    ClientDropped {
        /// The round.
        round: RoundId,
        /// Who.
        client: ClientId,
    },
    /// The round committed a new model.
    Committed(Box<CommittedRound>),
    /// An evaluation round released its figures (the model is unchanged).
    Evaluated(Box<EvaluatedRound>),
    /// A follower started its share of the leader's round.
    ShardStarted {
        /// The round.
        round: RoundId,
        /// The model version it trains from.
        version: ModelVersion,
    },
    /// A follower's share of a round is over: the host hands it to the leader.
    ShardDone(Box<super::ShardOutcome>),
    /// The leader's own part of the round is over: the host gathers the other nodes' shares
    /// and hands them over ([`Orchestrator::handle_shares`](super::Orchestrator::handle_shares)).
    AwaitingShares {
        /// The round.
        round: RoundId,
    },
    /// The round failed; the model is unchanged.
    Failed {
        /// The round.
        round: RoundId,
        /// Why.
        reason: FailReason,
        /// Figures of the round.
        stats: RoundStats,
    },
}

/// A message to send to a client.
#[derive(Clone, Debug, PartialEq)]
pub struct Transmit {
    /// The recipient.
    pub to: ClientId,
    /// The message.
    pub message: CoordinatorMessage,
}
