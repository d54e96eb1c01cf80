//! # starling-proto
//!
//! The sans-IO protocol core of Starling, in the manner of `quinn-proto`.
//!
//! ## Layout
//! - [`ids`]: identifier newtypes.
//! - [`update`]: [`ModelShape`](update::ModelShape) and the validated [`Update`](update::Update).
//! - [`encoding`]: update encodings on the wire (dense, row-sparse, 8-bit quantised).
//! - [`message`]: every wire message of a round, both directions.
//! - [`codec`]: versioned, length-prefixed frames (the only module that knows the byte format).
//! - [`strategy`]: aggregation strategies and server optimizers behind one trait.
//! - [`dp`]: differential privacy — clipping, noise, the RDP accountant, the ledger, DP-FedAvg.
//! - [`secagg`]: secure aggregation (SecAgg+): the client and server state machines of the
//!   masking protocol, Shamir sharing, and its cryptography.
//!
//! ## Contract
//! Nothing in this crate performs I/O, reads a clock, spawns a thread or depends on an async
//! runtime. Time is passed in as [`time::Instant`]; randomness comes from RNGs seeded by the caller.

pub mod codec;
pub mod dp;
pub mod encoding;
pub mod harness;
pub mod ids;
pub mod message;
pub mod round;
pub mod secagg;
pub mod session;
pub mod strategy;
pub mod time;
pub mod update;
pub mod weighting;
