//! # starling-sdk-ffi
//!
//! The Starling SDK for apps written in other languages: Kotlin (Android), Swift (iOS), Python
//! (desktop, tests) through [UniFFI](https://mozilla.github.io/uniffi-rs/), and C/C++ through a
//! small C ABI ([`c_api`], header `include/starling.h` made by cbindgen).
//!
//! ## Layout
//! - [`device`]: [`StarlingDevice`], the one object hosts hold: open, consent, record,
//!   recommend, similar items, forget, export, privacy report, conditions, rounds, scheduler.
//! - [`config`]: [`DeviceConfig`], the configuration as a record (UniFFI) or JSON object (C).
//! - [`types`]: the plain data crossing the boundary (events, context, recommendations with
//!   reasons, reports).
//! - [`host`]: callbacks the host implements: [`HostConditions`], [`HostClock`], [`HostLogger`].
//! - [`error`]: [`StarlingError`], the typed error of every call; a Rust panic inside a call is
//!   caught there and returned as [`StarlingError::Internal`] (the process never aborts).
//! - [`c_api`]: `extern "C"` functions over the same object, for C and C++ hosts.
//!
//! Bindings are generated from the compiled library (`uniffi-bindgen generate --library`, see
//! `client-sdk/ffi/README.md`); nothing here is written per language.

uniffi::setup_scaffolding!("starling");

pub mod c_api;
pub mod config;
pub mod device;
pub mod error;
pub mod host;
pub mod types;

pub use config::{CoordinatorConfig, DeviceConfig, ParticipationConfig};
pub use device::{RoundListener, StarlingDevice};
pub use error::StarlingError;
pub use host::{HostClock, HostConditions, HostLogger, LogLevel, clear_logger, set_logger};
pub use types::*;

/// The context of a moment: `local_seconds` since the Unix epoch in the device's local time
/// (UTC seconds plus the zone's offset), on a `device`. Add battery, network and region to the
/// result when the app knows them.
#[uniffi::export]
pub fn context_at(local_seconds: i64, device: DeviceClass) -> EventContext {
    starling_models::data::events::Context::at(local_seconds, device.into()).into()
}

/// This library's version and the wire protocol version it speaks, e.g. `0.1.0 (protocol 4)`.
#[uniffi::export]
pub fn sdk_version() -> String {
    format!("{} (protocol {})", env!("CARGO_PKG_VERSION"), starling_proto::codec::PROTOCOL_VERSION)
}

/// Panics inside Rust on purpose, to let a host check its error path (as Firefox's
/// `crashtest` component does): the call returns [`StarlingError::Internal`] carrying `message`
/// and the process goes on.
#[uniffi::export]
pub fn debug_panic(message: String) -> Result<(), StarlingError> {
    error::guard(|| panic!("{message}"))
}
