//! # starling-models
//!
//! Starling's recommendation models, behaviour data and evaluation protocol.
//!
//! ## Layout
//! - [`family`]: the model families (MF, two-tower) behind one interface on flat `f32` slices —
//!   train (weighted BPR with hard negatives), fit the private part, score with history and
//!   context, similar items, federated evaluation.
//! - [`mf`]: federated matrix factorisation with BPR — the per-client training loops
//!   ([`mf::local_epochs`], the reference workload's; [`mf::local_epochs_examples`], with signal
//!   weights and hard negatives), scoring, top-k and the cold-start popularity ranking.
//! - [`two_tower`]: the context-aware two-tower model for devices — flat layout, burn training
//!   over a local slice of the catalogue, plain-Rust scoring.
//! - [`burn_mf`]: MF as a burn module and the centralized baseline; [`flat`]: burn modules ↔
//!   the protocol's flat rows.
//! - [`data`]: interactions, app events and their context ([`data::events`]), the MovieLens
//!   `u.data` loader ([`data::movielens`]), the lazy synthetic population with an optional
//!   context effect ([`data::synthetic`]) and the leave-one-out split.
//! - [`eval`]: the reference evaluation protocol (SplitMix64 negatives, HR@10, NDCG@10,
//!   full-ranking HR@10, export format).
//!
//! The global (shared) part of a model is seen by the protocol as one row-major `f32` matrix
//! ([`starling_proto::update::ModelShape`]); the private part (the user vector) never leaves the
//! device and is never part of an update.

pub mod burn_mf;
pub mod data;
pub mod eval;
pub mod family;
pub mod flat;
pub mod mf;
pub mod two_tower;
