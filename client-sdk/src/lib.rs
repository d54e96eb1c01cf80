//! # starling-sdk
//!
//! The client SDK apps embed: on-device events, training, recommendations and the user's controls.
//!
//! ## Layout
//! - [`store`]: the on-device SQLite database (events, private model state, consent, ledger).
//! - [`privacy`]: the device's own privacy ledger (local-DP ε), persisted in the store.

pub mod privacy;
pub mod store;
