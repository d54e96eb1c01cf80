//! Wire messages of one training round, in both directions.
//!
//! Every message travels inside a versioned frame (see [`codec`](crate::codec)). The enums are
//! `#[non_exhaustive]` and new variants are only ever appended, so a later protocol phase
//! (secure aggregation's key exchange and unmasking) adds variants without changing the encoding
//! of the existing ones. See `docs/protocol.md` for the message flow.

use crate::dp::distributed::QuantPlan;
use crate::encoding::{EncodedUpdate, EncodingKind};
use crate::ids::{ClientId, ModelVersion, RoundId};
use crate::secagg::{SecAggClientMessage, SecAggParams, SecAggServerMessage};
use crate::update::ModelShape;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A message from a client (device) to the coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ClientMessage {
    /// "I am available to train": sent at the start of every session.
    CheckIn(CheckIn),
    /// The result of local training for a task.
    Update(ClientUpdate),
    /// The client gives up on a task (conditions stopped holding, user withdrew consent, …).
    Withdraw {
        /// The round the client withdraws from.
        round: RoundId,
        /// Why.
        reason: WithdrawReason,
    },
    /// A message of a secure-aggregation round (key advertisement, shares, masked input,
    /// unmasking shares); see [`secagg`](crate::secagg).
    SecAgg(SecAggClientMessage),
    /// The result of an evaluation task ([`TaskKind::Evaluate`]): the device's figures on its
    /// own held-out data. No model update.
    Evaluation(EvalReport),
}

/// A message from the coordinator to a client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CoordinatorMessage {
    /// A training task: the client was selected for a round.
    Task(Task),
    /// Not now: come back later (pace steering).
    ComeBackAt(ComeBackAt),
    /// The check-in is refused.
    Refusal(Refusal),
    /// The update was accepted into the round's aggregate.
    Receipt {
        /// The round the update belongs to.
        round: RoundId,
    },
    /// The update was rejected and did not touch the aggregate.
    Rejection {
        /// The round named by the update.
        round: RoundId,
        /// Why it was rejected.
        reason: RejectReason,
    },
    /// The round is over for this client; stop training and do not upload.
    Abort {
        /// The round being aborted.
        round: RoundId,
        /// Why.
        reason: AbortReason,
    },
    /// A message of a secure-aggregation round (neighbourhood keys, routed shares, unmask
    /// request); see [`secagg`](crate::secagg).
    SecAgg(SecAggServerMessage),
}

/// Device conditions reported by the host app at check-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeviceConditions {
    /// Plugged in and charging.
    pub charging: bool,
    /// On an unmetered network (e.g. Wi-Fi).
    pub unmetered: bool,
    /// The user is not interacting with the device.
    pub idle: bool,
    /// Battery level in percent, 0–100.
    pub battery_percent: u8,
}

/// What the client can handle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The largest update (in `f32` values, after decoding) the client is willing to produce.
    pub max_update_values: u64,
    /// Update encodings the client can produce, in order of preference.
    pub encodings: Vec<EncodingKind>,
    /// Largest frame, in bytes, the client accepts from the coordinator.
    pub max_frame_bytes: u32,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            max_update_values: 16 << 20,
            encodings: vec![EncodingKind::RowSparse, EncodingKind::Dense, EncodingKind::Quantized8],
            max_frame_bytes: crate::codec::DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

/// The client's check-in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckIn {
    /// Who the client is.
    pub client: ClientId,
    /// Enrollment credential (an opaque token the coordinator verifies).
    pub credential: Vec<u8>,
    /// SDK version string, e.g. `"0.1.0"`.
    pub sdk_version: String,
    /// Model family the client runs, e.g. `"mf-bpr"`; must match the coordinator's.
    pub model_family: String,
    /// The newest global model version the client holds, if any (enables delta downloads).
    pub have_version: Option<ModelVersion>,
    /// Current device conditions.
    pub conditions: DeviceConditions,
    /// What the client can handle.
    pub capabilities: Capabilities,
}

/// Local noise the client adds before sending (local-DP mode).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum NoiseSettings {
    /// No client-side noise (the coordinator may still add central noise).
    None,
    /// Central DP: the coordinator adds noise; the client only clips. `multiplier` is σ, the noise
    /// standard deviation in units of the clip norm, reported for transparency.
    Central {
        /// Noise multiplier σ used by the coordinator.
        multiplier: f32,
    },
    /// Local DP: the client adds Gaussian noise of standard deviation `multiplier × clip_norm` to
    /// every coordinate it sends.
    Local {
        /// Noise multiplier σ.
        multiplier: f32,
    },
    /// Distributed DP under secure aggregation: every device adds its share of discrete Gaussian
    /// noise so that the **sum** carries noise of multiplier σ even when the tolerated fraction of
    /// the cohort drops out; the exact per-device noise is in the task's
    /// [`QuantPlan`].
    Distributed {
        /// Noise multiplier σ of the sum.
        multiplier: f32,
    },
}

/// How the client should train for a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingPlan {
    /// Local epochs over the client's data.
    pub epochs: u32,
    /// Learning rate for the global (shared) parameters.
    pub learning_rate: f32,
    /// Learning rate for the private, on-device parameters (e.g. the user vector).
    pub private_learning_rate: f32,
    /// Mini-batch size.
    pub batch_size: u32,
    /// Negatives sampled per positive example.
    pub negatives: u32,
    /// L2 norm every update must be clipped to before sending, if any.
    pub clip_norm: Option<f32>,
    /// Client-side noise.
    pub noise: NoiseSettings,
    /// The encoding the coordinator wants the update in.
    pub encoding: EncodingKind,
}

impl Default for TrainingPlan {
    fn default() -> Self {
        Self {
            epochs: 1,
            learning_rate: 0.05,
            private_learning_rate: 0.05,
            batch_size: 32,
            negatives: 1,
            clip_norm: None,
            noise: NoiseSettings::None,
            encoding: EncodingKind::RowSparse,
        }
    }
}

/// The global parameters a task ships.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ModelPayload {
    /// The complete parameters.
    Full {
        /// Shape of the parameters.
        shape: ModelShape,
        /// All values, row-major (shared, so queuing a task for many clients copies nothing).
        #[serde(with = "crate::codec::packed::arc")]
        values: Arc<[f32]>,
    },
    /// Only the rows that changed since `from`, with their new values (exact, not differences).
    Patch {
        /// The version the client holds.
        from: ModelVersion,
        /// Shape of the parameters.
        shape: ModelShape,
        /// Changed rows, strictly increasing.
        #[serde(with = "crate::codec::packed::arc")]
        rows: Arc<[u32]>,
        /// New values of those rows, row after row.
        #[serde(with = "crate::codec::packed::arc")]
        values: Arc<[f32]>,
    },
}

impl ModelPayload {
    /// The shape of the parameters carried.
    pub fn shape(&self) -> ModelShape {
        match self {
            ModelPayload::Full { shape, .. } | ModelPayload::Patch { shape, .. } => *shape,
        }
    }

    /// Produces the full parameters: `Full` directly, `Patch` applied to `base` (the parameters of
    /// the version the patch starts from). Validates lengths, row order and finiteness.
    pub fn materialize(&self, base: Option<&[f32]>) -> Result<Vec<f32>, PayloadError> {
        match self {
            ModelPayload::Full { shape, values } => {
                if values.len() != shape.len() {
                    return Err(PayloadError::Invalid(crate::update::UpdateError::LengthMismatch {
                        expected: shape.len(),
                        got: values.len(),
                    }));
                }
                crate::update::check_finite(values).map_err(PayloadError::Invalid)?;
                Ok(values.to_vec())
            }
            ModelPayload::Patch { shape, rows, values, .. } => {
                let base = base.ok_or(PayloadError::MissingBase)?;
                if base.len() != shape.len() {
                    return Err(PayloadError::BaseShape { expected: shape.len(), got: base.len() });
                }
                // Validate through the update type, then overwrite rows.
                let patch = crate::update::Update::sparse(*shape, rows.to_vec(), values.to_vec())
                    .map_err(PayloadError::Invalid)?;
                let mut out = base.to_vec();
                let row_len = shape.row_len as usize;
                for (row, vals) in patch.iter_rows() {
                    let start = row as usize * row_len;
                    out[start..start + row_len].copy_from_slice(vals);
                }
                Ok(out)
            }
        }
    }
}

/// Why a model payload could not be turned into parameters.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// A patch arrived but the client holds no base parameters.
    #[error("patch received but no base model is held")]
    MissingBase,
    /// The base parameters have the wrong length.
    #[error("base model has {got} values, patch expects {expected}")]
    BaseShape {
        /// Values expected.
        expected: usize,
        /// Values held.
        got: usize,
    },
    /// The payload itself is malformed.
    #[error("malformed model payload: {0}")]
    Invalid(crate::update::UpdateError),
}

/// A training task for one round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// The round.
    pub round: RoundId,
    /// The model version to train from; the update must name it as its base.
    pub model_version: ModelVersion,
    /// The global parameters (full or patch).
    pub model: ModelPayload,
    /// How to train.
    pub plan: TrainingPlan,
    /// Milliseconds from receipt within which the update must arrive.
    pub report_within_ms: u64,
    /// Secure aggregation: when set, the client does not send its update but takes part in the
    /// SecAgg+ protocol with the update encoded as the plan says (see [`SecureTask`]).
    pub secure: Option<SecureTask>,
    /// What the task asks: train and send an update, or evaluate the model and send an
    /// [`EvalReport`]. An evaluation task is never secure.
    pub kind: TaskKind,
}

/// What a task asks of the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TaskKind {
    /// Train from the task's model as its plan says and send the update.
    #[default]
    Train,
    /// Federated evaluation: score the task's model on the device's own held-out data and send
    /// an [`EvalReport`]. The device does not train and changes nothing it holds.
    Evaluate,
}

/// The secure-aggregation part of a task: the protocol's parameters and how to encode the update
/// into integers mod 2^bits (clip, rotate, scale, round, distributed noise).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SecureTask {
    /// SecAgg+ parameters (neighbourhood size, threshold, modulus, vector length).
    pub params: SecAggParams,
    /// The encoding of the update, with the device's share of the noise.
    pub quant: QuantPlan,
}

/// "Come back later": pace steering, so that check-ins spread out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComeBackAt {
    /// Earliest delay, in milliseconds, before the next check-in.
    pub after_ms: u64,
    /// Width of the window, in milliseconds, over which the client should pick its time uniformly.
    pub window_ms: u64,
}

/// Why a check-in was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Refusal {
    /// The frame's protocol version is not supported. (Normally sent as a version-negotiation
    /// frame, which every version can read; see [`codec`](crate::codec).)
    UnsupportedVersion {
        /// Lowest version the coordinator speaks.
        min: u16,
        /// Highest version the coordinator speaks.
        max: u16,
    },
    /// The credential is missing, invalid, expired or revoked.
    Unauthenticated,
    /// The client runs a different model family.
    WrongModelFamily {
        /// The coordinator's family.
        expected: String,
    },
    /// The device conditions do not meet the eligibility rule.
    NotEligible,
    /// The client cannot produce any encoding the coordinator accepts, or too large an update.
    IncompatibleCapabilities,
    /// The privacy budget is exhausted; no more rounds will run.
    BudgetExhausted,
    /// The client already checked in for the current round.
    AlreadyCheckedIn,
    /// The coordinator is shutting down.
    ShuttingDown,
}

/// Why an update was rejected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RejectReason {
    /// The round is no longer collecting (deadline passed, or enough reports).
    Late,
    /// This client already reported for the round.
    Duplicate,
    /// The update's base version is not the round's model version.
    StaleVersion {
        /// The round's model version.
        expected: ModelVersion,
        /// The version the update names.
        got: ModelVersion,
    },
    /// The round id is not the current round.
    WrongRound,
    /// The client was not selected for this round.
    NotSelected,
    /// The update failed validation (shape, finiteness, size, encoding); the text says which.
    Malformed(String),
    /// The update's weight is not a positive finite number.
    InvalidWeight,
    /// The update was well-formed but the strategy refused it.
    Refused(String),
    /// A secure-aggregation message was refused (wrong phase, malformed, not a neighbour, …); the
    /// client is out of the round's remaining phases.
    SecAgg(String),
}

/// Why a round was aborted for a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AbortReason {
    /// The round already has enough reports.
    RoundFull,
    /// The round failed (too few reports, aggregation error, …).
    RoundFailed,
    /// The coordinator is shutting down.
    ShuttingDown,
    /// Secure aggregation could not finish (too few survivors, missing or inconsistent shares):
    /// nothing was unmasked.
    SecureAggregationFailed,
}

/// Why a client withdrew from a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum WithdrawReason {
    /// Device conditions (charging, network, idle) stopped holding.
    ConditionsChanged,
    /// The user turned federated training off.
    ConsentWithdrawn,
    /// Local training failed.
    TrainingFailed,
    /// The device refused the task's privacy settings (too little protection for its privacy
    /// mode, or its own privacy budget is spent).
    PrivacyRefused,
    /// The device has no data to train on.
    NoData,
}

/// Metrics the client computed locally (never raw data).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct LocalMetrics {
    /// Mean training loss over the local epoch(s).
    pub loss: f32,
    /// Local HR@10 on a held-out item, when the client could compute it.
    pub hit_rate_at_10: Option<f32>,
    /// Wall-clock training time in milliseconds, as measured by the host.
    pub train_ms: u32,
    /// Adaptive clipping's indicator under central DP: whether the update's L2 norm **before**
    /// clipping was within the plan's clip norm. The coordinator only ever sees clipped updates,
    /// so it cannot compute this itself (it would always be true and the clip norm would
    /// collapse). `None` when the plan has no clip norm or under local DP (where nothing
    /// data-dependent leaves the device unnoised). The coordinator noises the count of these bits.
    pub norm_within_clip: Option<bool>,
}

/// A client's update for a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientUpdate {
    /// The round.
    pub round: RoundId,
    /// The model version the update was computed from.
    pub base_version: ModelVersion,
    /// The encoded delta to the global parameters.
    pub update: EncodedUpdate,
    /// Aggregation weight (for FedAvg, the number of local examples).
    pub weight: f32,
    /// Local metrics.
    pub metrics: LocalMetrics,
}

/// The largest per-case loss an [`EvalMetrics`] may carry: each case's loss is capped at it,
/// so one device moves the loss sum by at most this much.
pub const EVAL_LOSS_CAP: f32 = 10.0;

/// One device's evaluation figures: **sums** over its evaluation cases (today at most one: its
/// latest positive interaction, held out of training), so that the coordinator can add reports
/// up (and, under DP, noise the sums).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Evaluation cases scored (0 or 1 today).
    pub cases: u32,
    /// Cases whose held-out item ranked in the top 10 against the sampled negatives.
    pub hits_at_10: f32,
    /// Sum of NDCG@10 over the cases.
    pub ndcg_at_10: f32,
    /// Sum over the cases of the mean BPR loss of the held-out item against its negatives, each
    /// case capped at [`EVAL_LOSS_CAP`].
    pub loss: f32,
}

impl EvalMetrics {
    /// Whether the figures are possible: finite, non-negative, and bounded by the case count
    /// (hits and NDCG at most one per case, loss at most [`EVAL_LOSS_CAP`] per case).
    pub fn is_valid(&self) -> bool {
        let n = self.cases as f32;
        [self.hits_at_10, self.ndcg_at_10, self.loss].iter().all(|v| v.is_finite() && *v >= 0.0)
            && self.hits_at_10 <= n
            && self.ndcg_at_10 <= n
            && self.loss <= n * EVAL_LOSS_CAP
    }
}

/// A device's answer to an evaluation task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The round.
    pub round: RoundId,
    /// The model version evaluated (the task's).
    pub base_version: ModelVersion,
    /// The figures.
    pub metrics: EvalMetrics,
}

impl ClientMessage {
    /// A short, stable name of the message's kind, for per-phase traffic and CPU figures.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMessage::CheckIn(_) => "check-in",
            ClientMessage::Update(_) => "update",
            ClientMessage::Withdraw { .. } => "withdraw",
            ClientMessage::Evaluation(_) => "evaluation",
            ClientMessage::SecAgg(m) => match m {
                SecAggClientMessage::KeyAdvert(_) => "secagg: key advertisement",
                SecAggClientMessage::Shares(_) => "secagg: encrypted shares",
                SecAggClientMessage::Masked(_) => "secagg: masked input",
                SecAggClientMessage::Unmask(_) => "secagg: unmasking shares",
            },
        }
    }
}

impl CoordinatorMessage {
    /// A short, stable name of the message's kind, for per-phase traffic and CPU figures.
    pub fn kind(&self) -> &'static str {
        match self {
            CoordinatorMessage::Task(_) => "task",
            CoordinatorMessage::ComeBackAt(_) => "come back at",
            CoordinatorMessage::Refusal(_) => "refusal",
            CoordinatorMessage::Receipt { .. } => "receipt",
            CoordinatorMessage::Rejection { .. } => "rejection",
            CoordinatorMessage::Abort { .. } => "abort",
            CoordinatorMessage::SecAgg(m) => match m {
                SecAggServerMessage::Neighbourhood(_) => "secagg: neighbourhood keys",
                SecAggServerMessage::RoutedShares(_) => "secagg: routed shares",
                SecAggServerMessage::UnmaskRequest(_) => "secagg: unmask request",
            },
        }
    }
}
