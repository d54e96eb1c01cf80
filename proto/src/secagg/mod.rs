//! Secure aggregation: SecAgg+ (Bell et al., CCS 2020) on top of the protocol of Bonawitz et al.
//! (CCS 2017), sans-IO.
//!
//! The coordinator learns the modular sum of the surviving clients' quantised inputs and nothing
//! else about any single input. [`SecAggClient`] runs on the device (one per round),
//! [`SecAggServer`] in the coordinator; the host moves their messages and supplies randomness as
//! 32-byte seeds (this module draws none itself, reads no clock and does no I/O).
//!
//! ## Protocol flow (one round)
//! 1. **Keys.** Every client creates two X25519 key pairs, `cipher` (share encryption) and `mask`
//!    (pairwise masks), and sends a [`KeyAdvert`]. `U1` = clients that advertised.
//! 2. **Graph.** The server places `U1` on a ring in a random order and joins each client to the
//!    `k / 2` nearest on each side (`k` = [`SecAggParams::neighbours`]; the complete graph if
//!    `|U1| <= k + 1`), and sends each client its [`Neighbourhood`].
//! 3. **Shares.** A client checks its neighbourhood against its [`SecAggPolicy`], draws a
//!    self-mask seed `b`, Shamir-splits `b` and its mask secret key into one share pair per
//!    neighbour (threshold [`SecAggParams::threshold_for`]), and sends each pair encrypted with
//!    ChaCha20-Poly1305 under an X25519 + HKDF-SHA256 key of the pair ([`ShareBundle`]).
//!    `U2` = clients with a valid bundle (the server also drops, iteratively, clients left with
//!    fewer than their threshold of neighbours in `U2`). Each client in `U2` receives the shares
//!    addressed to it by its neighbours in `U2` ([`RoutedShares`]).
//! 4. **Masked input.** `y_i = x_i + PRG(b_i) + Σ_{j ∈ U2 ∩ N(i)} ±PRG(s_ij) mod 2^bits`, with
//!    `+` if `i < j` and `s_ij` agreed through the mask keys ([`MaskedInput`]). `U3` = clients whose
//!    masked input arrived; fewer than `min_survivors` aborts the round.
//! 5. **Unmask.** Each client in `U3` is told which neighbours survived and which dropped
//!    ([`UnmaskRequest`]) and reveals `b`-shares of survivors and mask-key shares of dropped
//!    neighbours, never both for one peer ([`UnmaskResponse`]). The server needs at least the
//!    threshold of shares for every secret (else it aborts), checks them (reconstructed mask keys
//!    must match the advertised public key, surplus `b`-shares must lie on the same polynomial),
//!    removes the self masks of survivors and the dangling pairwise masks of dropped clients, and
//!    outputs the sum of the `U3` inputs ([`SecAggOutput`]).
//!
//! ## Threat model
//! - **Honest-but-curious coordinator:** sees only masked vectors (uniform on their own), fewer
//!   than `t` shares of any secret it does not reconstruct, and the sum of at least
//!   `min_survivors` inputs.
//! - **Actively malicious coordinator:** may drop, delay or misroute messages and lie about who
//!   dropped. It cannot obtain both the self-mask share and the mask-key share of one peer from an
//!   honest client (a client answers one unmask request per round, and never for a peer listed as
//!   both survivor and dropped), and since `t > deg / 2`, it cannot gather `t` shares of both
//!   kinds for any client from honest neighbours. It **can** run Sybil clients (it issues the
//!   enrollment credentials) and choose neighbourhoods, so a client surrounded by coordinator
//!   Sybils is not protected; signing key adverts would not help without a PKI independent of the
//!   coordinator. The device's [`SecAggPolicy`] bounds how far the coordinator can lower
//!   thresholds or shrink neighbourhoods.
//! - **Network attackers** are out of scope here: the transport is QUIC/TLS.
//!
//! ## Robustness
//! Client dropouts at any phase are tolerated while every survivor keeps at least its threshold of
//! surviving neighbours. Any failure closes the round with an abort (never a wrong sum): a round
//! either commits the exact modular sum of the `U3` inputs or reveals nothing more than an abort.

mod client;
mod crypto;
mod graph;
mod outcome;
mod params;
mod server;
mod shamir;
#[cfg(test)]
mod tests;

pub use client::{SHARE_CIPHERTEXT_LEN, SecAggClient, SecAggError};
pub use crypto::{
    CryptoError, KeyPair, agree, derive, expand_mask, mask_seed, open, seal, self_mask_commitment, share_key,
};
pub use graph::neighbourhood_graph;
pub use outcome::{SecAggAbort, SecAggOutput, SecAggPhase, SecAggPhaseStats, SecAggReject, SecAggStats};
pub use params::{
    EncryptedShare, KeyAdvert, MAX_NEIGHBOURS, MaskedInput, NeighbourKeys, Neighbourhood, RevealedShare,
    RoutedShare, RoutedShares, SecAggClientMessage, SecAggConfigError, SecAggParams, SecAggPolicy,
    SecAggServerMessage, ShareBundle, UnmaskRequest, UnmaskResponse,
};
pub use server::SecAggServer;
pub use shamir::{ShamirError, Share, combine, consistent, split};
