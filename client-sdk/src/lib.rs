//! # starling-sdk
//!
//! The client SDK apps embed: on-device events, training, recommendations and the user's controls.
//!
//! ## Layout
//! - [`store`]: the on-device SQLite database (events, private model state, consent, ledger).

pub mod store;
