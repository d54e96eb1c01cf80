//! The coordinator service behind `starling serve`: the async shell around the sans-IO round
//! engine, QUIC, authentication, admin HTTP, persistence and crash recovery.
//!
//! - [`driver`]: one task owning the [`Orchestrator`](starling_proto::round::Orchestrator),
//!   per-connection tasks generic over the SDK's `Connection` trait, round scheduling and the
//!   event hook where committed rounds are made durable.
//! - [`config`]: `starling.toml`, environment overrides, conversion into the engine's configs.
//! - [`tls`]: the local CA and server certificate of `starling init`; PEM loading.
//! - [`tokens`]: signed, revocable enrollment tokens (the check-in credential).
//! - [`quic`]: the QUIC endpoint (ALPN `starling/1`, limits, handshake pacing) and its
//!   connections as [`Connection`](starling_sdk::transport::Connection)s.
//! - [`admin`]: the token-protected admin HTTP endpoint (`/status`, `/metrics`) and telemetry.
//! - [`server`]: `starling serve` and `starling init`: recovery from the store, the persistence
//!   hook, and the wiring of the pieces above.

pub mod admin;
pub mod admin_tls;
mod cluster;
pub mod config;
pub mod control;
pub mod driver;
pub mod quic;
pub mod server;
pub mod tls;
pub mod tokens;

/// Unix time in milliseconds, now.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(i64::MAX as u128) as i64)
}
