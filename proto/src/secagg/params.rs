//! Round parameters, the device's policy, and the wire messages of the protocol.

use super::shamir::Share;
use crate::ids::{ClientId, ModelVersion, RoundId};
use serde::{Deserialize, Serialize};

/// Largest neighbourhood a round may use: Shamir x-coordinates are the bytes `1..=255`.
pub const MAX_NEIGHBOURS: u32 = 254;

/// Parameters of one secure-aggregation round, chosen by the coordinator and sent with the task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggParams {
    /// `k`: the degree of the neighbourhood graph (even, `2..=254`). Each client shares its secrets
    /// with, and exchanges pairwise masks with, `k` others (fewer when the cohort has at most
    /// `k + 1` clients: then the graph is complete).
    pub neighbours: u32,
    /// `t`: the absolute Shamir threshold for a full neighbourhood of `neighbours` clients;
    /// `neighbours / 2 < t <= neighbours`. See [`SecAggParams::threshold_for`] for smaller ones.
    pub threshold: u32,
    /// Width of the modular arithmetic: inputs and sums live in `Z_{2^bits}`, `1..=32`.
    pub bits: u32,
    /// Length of every input vector (number of `u32` words), at least 1.
    pub len: u32,
}

impl SecAggParams {
    /// Checks the invariants documented on the fields.
    pub fn validate(&self) -> Result<(), SecAggConfigError> {
        if !(1..=32).contains(&self.bits) {
            return Err(SecAggConfigError::Bits(self.bits));
        }
        if self.neighbours < 2 || self.neighbours > MAX_NEIGHBOURS || !self.neighbours.is_multiple_of(2) {
            return Err(SecAggConfigError::Neighbours(self.neighbours));
        }
        if self.threshold <= self.neighbours / 2 || self.threshold > self.neighbours {
            return Err(SecAggConfigError::Threshold {
                threshold: self.threshold,
                neighbours: self.neighbours,
            });
        }
        if self.len == 0 {
            return Err(SecAggConfigError::Len);
        }
        Ok(())
    }

    /// The threshold for a neighbourhood of `deg` clients:
    /// `min(deg, max(floor(deg / 2) + 1, ceil(threshold * deg / neighbours)))`.
    ///
    /// Equals `threshold` for a full neighbourhood (`deg == neighbours`) and always exceeds
    /// `deg / 2`, so a client never hands out a majority of both kinds of share. Client and server
    /// both use this function, so they agree on every client's threshold.
    pub fn threshold_for(&self, deg: usize) -> usize {
        let k = self.neighbours.max(1) as u128;
        let scaled = (self.threshold as u128 * deg as u128).div_ceil(k);
        let scaled = usize::try_from(scaled).unwrap_or(usize::MAX);
        (deg / 2 + 1).max(scaled).min(deg.max(1))
    }

    /// `2^bits - 1`: the mask that reduces a wrapping `u32` modulo `2^bits`.
    pub fn mask(&self) -> u32 {
        bits_mask(self.bits)
    }
}

/// `2^bits - 1` for `bits` in `1..=32` (`u32::MAX` for anything above 31).
pub(crate) fn bits_mask(bits: u32) -> u32 {
    if bits >= 32 { u32::MAX } else { (1u32 << bits) - 1 }
}

/// Invalid secure-aggregation configuration (parameters or server setup).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecAggConfigError {
    /// `bits` outside `1..=32`.
    #[error("bits must be in 1..=32, got {0}")]
    Bits(u32),
    /// The cohort contains the same client twice.
    #[error("cohort lists {0} twice")]
    DuplicateClient(ClientId),
    /// `len` is zero.
    #[error("len must be at least 1")]
    Len,
    /// `len` exceeds the device policy's `max_len`.
    #[error("len {len} exceeds the policy's max_len {max}")]
    LenAbovePolicy {
        /// Requested length.
        len: u32,
        /// The policy's limit.
        max: u32,
    },
    /// `min_survivors` is zero or larger than the cohort.
    #[error("min_survivors must be in 1..=cohort size ({cohort}), got {min}")]
    MinSurvivors {
        /// Requested minimum.
        min: usize,
        /// Cohort size.
        cohort: usize,
    },
    /// `neighbours` is odd or outside `2..=254`.
    #[error("neighbours must be even and in 2..=254, got {0}")]
    Neighbours(u32),
    /// The policy is unusable (fraction not in `[0, 1)`).
    #[error("invalid policy: {0}")]
    Policy(String),
    /// The cohort has fewer than two clients.
    #[error("a cohort needs at least two clients, got {0}")]
    SmallCohort(usize),
    /// `threshold` is not in `neighbours / 2 < threshold <= neighbours`.
    #[error(
        "threshold must satisfy neighbours/2 < threshold <= neighbours, got {threshold} for {neighbours}"
    )]
    Threshold {
        /// Requested threshold.
        threshold: u32,
        /// Requested degree.
        neighbours: u32,
    },
}

/// The device's own limits. The coordinator chooses [`SecAggParams`], but a device refuses a round
/// (or a neighbourhood) that falls below its policy, so the coordinator cannot lower the threshold
/// or shrink neighbourhoods below what the device accepts.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SecAggPolicy {
    /// The threshold must be at least `ceil(deg * min_threshold_fraction)` (and always more than
    /// `deg / 2`). Default 0.5; must be in `[0, 1)`.
    pub min_threshold_fraction: f64,
    /// Refuse neighbourhoods with fewer neighbours than this, unless the neighbourhood is the
    /// whole cohort (`deg == cohort - 1`, as stated in [`Neighbourhood::cohort`]). Default 4.
    pub min_neighbours: usize,
    /// Refuse rounds whose vectors are longer than this. Default `16 << 20` words.
    pub max_len: u32,
}

impl Default for SecAggPolicy {
    fn default() -> Self {
        Self { min_threshold_fraction: 0.5, min_neighbours: 4, max_len: 16 << 20 }
    }
}

/// Phase 1, client → server: the client's two X25519 public keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyAdvert {
    /// The round.
    pub round: RoundId,
    /// Public key for share encryption.
    pub cipher_pk: [u8; 32],
    /// Public key for pairwise masks.
    pub mask_pk: [u8; 32],
    /// Commitment to the self-mask seed `b` (`crypto::self_mask_commitment`):
    /// the coordinator checks the `b` it reconstructs against it, so corrupted shares abort the
    /// round instead of producing a wrong sum.
    pub self_mask_commitment: [u8; 32],
}

/// One neighbour's advertised keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NeighbourKeys {
    /// The neighbour.
    pub client: ClientId,
    /// Its share-encryption public key.
    pub cipher_pk: [u8; 32],
    /// Its pairwise-mask public key.
    pub mask_pk: [u8; 32],
}

/// Phase 2, server → client: the client's neighbours in the round's graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Neighbourhood {
    /// The round.
    pub round: RoundId,
    /// `|U1|`: how many clients advertised keys.
    pub cohort: u32,
    /// The neighbours, sorted by [`ClientId`].
    pub neighbours: Vec<NeighbourKeys>,
}

/// One encrypted share pair, addressed to a neighbour.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncryptedShare {
    /// The recipient.
    pub to: ClientId,
    /// ChaCha20-Poly1305 ciphertext of the share pair (see the module docs).
    pub ciphertext: Vec<u8>,
}

/// Phase 2, client → server: one encrypted share pair per neighbour.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShareBundle {
    /// The round.
    pub round: RoundId,
    /// One entry per neighbour, in neighbour order.
    pub shares: Vec<EncryptedShare>,
}

/// An encrypted share pair, as forwarded to its recipient.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoutedShare {
    /// The sender.
    pub from: ClientId,
    /// The ciphertext, unchanged.
    pub ciphertext: Vec<u8>,
}

/// Phase 3, server → client: the shares addressed to the client by neighbours in `U2`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoutedShares {
    /// The round.
    pub round: RoundId,
    /// One entry per neighbour in `U2`.
    pub shares: Vec<RoutedShare>,
}

/// Phase 3, client → server: the masked input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaskedInput {
    /// The round.
    pub round: RoundId,
    /// The model version the input was computed against.
    pub base_version: ModelVersion,
    /// `x + PRG(b) + Σ ±PRG(s_ij) mod 2^bits`, `len` words each below `2^bits`. Packed as
    /// little-endian words on the wire (4 bytes each; a masked word is uniform, so a varint would
    /// take 5).
    #[serde(with = "crate::codec::packed::vec")]
    pub masked: Vec<u32>,
}

/// Phase 4, server → client: which neighbours survived (reveal their self-mask shares) and
/// which dropped (reveal their mask-key shares).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    /// The round.
    pub round: RoundId,
    /// Neighbours whose masked input arrived (`U3 ∩ N(i)`).
    pub survivors: Vec<ClientId>,
    /// Neighbours that sent shares but no masked input (`(U2 \ U3) ∩ N(i)`).
    pub dropped: Vec<ClientId>,
}

/// A decrypted share of a neighbour's secret.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RevealedShare {
    /// Whose secret the share belongs to.
    pub of: ClientId,
    /// The share.
    pub share: Share,
}

/// Phase 4, client → server: the requested shares.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnmaskResponse {
    /// The round.
    pub round: RoundId,
    /// Shares of survivors' self-mask seeds `b`.
    pub self_mask_shares: Vec<RevealedShare>,
    /// Shares of dropped neighbours' mask secret keys.
    pub mask_key_shares: Vec<RevealedShare>,
}

/// Every secure-aggregation message a client sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SecAggClientMessage {
    /// Phase 1.
    KeyAdvert(KeyAdvert),
    /// Phase 2.
    Shares(ShareBundle),
    /// Phase 3.
    Masked(MaskedInput),
    /// Phase 4.
    Unmask(UnmaskResponse),
}

impl SecAggClientMessage {
    /// The round the message belongs to.
    pub fn round(&self) -> RoundId {
        match self {
            Self::KeyAdvert(m) => m.round,
            Self::Shares(m) => m.round,
            Self::Masked(m) => m.round,
            Self::Unmask(m) => m.round,
        }
    }
}

/// Every secure-aggregation message the server sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SecAggServerMessage {
    /// Phase 2.
    Neighbourhood(Neighbourhood),
    /// Phase 3.
    RoutedShares(RoutedShares),
    /// Phase 4.
    UnmaskRequest(UnmaskRequest),
}

impl SecAggServerMessage {
    /// The round the message belongs to.
    pub fn round(&self) -> RoundId {
        match self {
            Self::Neighbourhood(m) => m.round,
            Self::RoutedShares(m) => m.round,
            Self::UnmaskRequest(m) => m.round,
        }
    }
}
