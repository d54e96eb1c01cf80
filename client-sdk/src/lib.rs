//! # starling-sdk
//!
//! The client SDK apps embed: on-device events, training, recommendations and the user's controls.
//!
//! ## Layout
//! - [`config`]: what an app configures (identity, storage, model, participation, privacy, retention).
//! - [`device`]: the device's state and everything done locally — record, recommend, train,
//!   consent, forget, export, privacy report. No network.
//! - [`participant`]: sans-IO driver of one training session (the protocol's session machine,
//!   the codec and the device's trainer), fed bytes and time by whoever owns the transport.
//! - [`transport`]: the transport seam (in-memory; QUIC) that [`client`] connects through.
//! - [`client`]: the async [`Client`] apps use, with a background scheduler.
//! - [`blocking`]: the same API for hosts without an async runtime.
//! - [`store`]: the on-device SQLite database (SQLCipher-encrypted when the host gives a key, see
//!   [`keys`]); [`privacy`]: the device's own privacy ledger.

pub mod blocking;
pub mod client;
pub mod config;
pub mod device;
pub mod keys;
pub mod participant;
pub mod privacy;
pub mod store;
pub mod transport;

pub use client::{Client, RoundError, RoundReport};
pub use config::{
    ClientConfig, Clock, Consent, ModelSpec, ParticipationPolicy, PrivacyMode, PrivacyPolicy, Retention,
    Storage, StorageKey,
};
pub use device::{Device, Export, PrivacyReport, Reason, Recommendations, SimilarItems, Source};
