//! What the server reports: its phase, refusals, aborts, the result and counters.

use crate::ids::{ClientId, ModelVersion, RoundId};
use serde::{Deserialize, Serialize};

/// Where a server's round stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SecAggPhase {
    /// Collecting [`KeyAdvert`](super::KeyAdvert)s.
    AdvertiseKeys,
    /// Collecting [`ShareBundle`](super::ShareBundle)s.
    ShareKeys,
    /// Collecting [`MaskedInput`](super::MaskedInput)s.
    MaskedInput,
    /// Collecting [`UnmaskResponse`](super::UnmaskResponse)s.
    Unmask,
    /// The sum is computed; see [`SecAggServer::take_result`](super::SecAggServer::take_result).
    Done,
    /// The round was aborted; nothing was unmasked.
    Aborted,
}

/// Why the server refused a client message.
///
/// A refused message changes nothing, except that a client whose message is malformed for the
/// current phase (`Malformed`, `NotANeighbour`, `NotRequested`, `ValueOutOfRange`,
/// `WrongBaseVersion`, `WrongLength`) is treated as dropped from that phase on: it is left out of
/// `U1`/`U2`/`U3`, or, in the unmask phase, none of its shares are used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecAggReject {
    /// The client already sent this phase's message.
    #[error("duplicate message")]
    Duplicate,
    /// The message is malformed (reason given); the client is dropped from this phase.
    #[error("malformed: {0}")]
    Malformed(String),
    /// A share is addressed to a client that is not the sender's neighbour.
    #[error("{0} is not a neighbour of the sender")]
    NotANeighbour(ClientId),
    /// The sender is not in the round's cohort.
    #[error("sender is not in the cohort")]
    NotInCohort,
    /// The sender is in the cohort but not (any more) a participant of this phase.
    #[error("sender does not take part in this phase")]
    NotParticipating,
    /// An unmask response contains a share the server did not ask this client for.
    #[error("share of {0} was not requested")]
    NotRequested(ClientId),
    /// A masked value is not below `2^bits`.
    #[error("masked value at index {index} is not below 2^bits")]
    ValueOutOfRange {
        /// First offending index.
        index: usize,
    },
    /// The masked input names another base model version.
    #[error("base version {got}, expected {expected}")]
    WrongBaseVersion {
        /// The round's base version.
        expected: ModelVersion,
        /// The message's.
        got: ModelVersion,
    },
    /// The masked input has the wrong length.
    #[error("masked input has {got} values, expected {expected}")]
    WrongLength {
        /// `params.len`.
        expected: usize,
        /// The message's length.
        got: usize,
    },
    /// The message belongs to another phase.
    #[error("message does not belong to phase {phase:?}")]
    WrongPhase {
        /// The current phase.
        phase: SecAggPhase,
    },
    /// The message names another round.
    #[error("message for {got}, this is {expected}")]
    WrongRound {
        /// This round.
        expected: RoundId,
        /// The message's round.
        got: RoundId,
    },
}

/// Why the round was aborted (or, for `AlreadyFinished`, why closing did nothing).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecAggAbort {
    /// `close_phase` after the round was done or aborted; nothing changed.
    #[error("the round is already finished")]
    AlreadyFinished,
    /// A dropped client's advertised mask key is unusable (low-order point).
    #[error("advertised key of {client} is unusable")]
    BadKey {
        /// The client.
        client: ClientId,
    },
    /// The revealed shares of a client's secret do not agree (or do not match its public key).
    #[error("inconsistent shares for {client}")]
    InconsistentShares {
        /// Whose secret.
        client: ClientId,
    },
    /// Too few shares to reconstruct a client's secret.
    #[error("{got} shares for {client}, threshold {needed}")]
    NotEnoughShares {
        /// Whose secret.
        client: ClientId,
        /// Shares available.
        got: usize,
        /// The threshold.
        needed: usize,
    },
    /// Too few clients remain after a phase.
    #[error("{got} clients left after {phase:?}, need {needed}")]
    TooFewSurvivors {
        /// The phase that closed.
        phase: SecAggPhase,
        /// Clients remaining.
        got: usize,
        /// The minimum.
        needed: usize,
    },
}

/// The result of a round: the modular sum of the contributors' inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecAggOutput {
    /// `Σ x_i mod 2^bits` over the contributors.
    pub sum: Vec<u32>,
    /// `U3`, sorted: the clients whose inputs are in the sum.
    pub contributors: Vec<ClientId>,
}

/// Counters for one phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggPhaseStats {
    /// Clients expected to send in this phase when it opened.
    pub participants: usize,
    /// Clients whose message was accepted.
    pub responded: usize,
    /// Approximate payload bytes accepted (keys, ciphertexts, words, shares).
    pub bytes_received: u64,
}

/// Per-phase counters of a round, for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggStats {
    /// Key advertisement.
    pub advertise_keys: SecAggPhaseStats,
    /// Share exchange.
    pub share_keys: SecAggPhaseStats,
    /// Masked input.
    pub masked_input: SecAggPhaseStats,
    /// Unmasking.
    pub unmask: SecAggPhaseStats,
    /// Dropouts reported by the host.
    pub dropouts: usize,
    /// Messages refused.
    pub refused: usize,
}
