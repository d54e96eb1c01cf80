//! # starling-coordinator
//!
//! The coordinator side of Starling and the `starling` command-line tool.
//!
//! ## Layout
//! - [`cli`]: the `starling` subcommands (the binary in `src/bin/starling.rs` only dispatches).
//! - [`sim`]: the fleet simulator behind `starling simulate` — the real round engine and session
//!   machines with real BPR-MF training on every simulated client, over a simulated network and
//!   clock — and its reports (`results.json`, `report.html`).
//! - [`service`]: the coordinator service (`starling serve`): driver, QUIC, tokens, admin HTTP, recovery.
//! - [`store`]: the embedded SQLite store (privacy ledger, checkpoints, rounds, clients, tokens).
//! - [`cluster`]: groundwork for several coordinator nodes on one PostgreSQL database: the
//!   leader lease with its fencing epoch (not yet used by `starling serve`).
//! - [`privacy`]: the durable ledger over the store (and opendp's Gaussian sampler, re-exported
//!   from `starling_proto::dp::opendp`).

pub mod cli;
pub mod cluster;
pub mod privacy;
pub mod service;
pub mod sim;
pub mod store;
