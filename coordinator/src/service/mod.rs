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
//! - [`admin`]: the token-protected admin HTTP endpoint (`/status`, `/metrics`).

pub mod admin;
pub mod config;
pub mod driver;
pub mod quic;
pub mod tls;
pub mod tokens;
