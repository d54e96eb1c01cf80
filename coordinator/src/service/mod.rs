//! The coordinator service: the async shell around the sans-IO round engine.
//!
//! - [`driver`]: one task owning the [`Orchestrator`](starling_proto::round::Orchestrator),
//!   per-connection tasks generic over the SDK's `Connection` trait, round scheduling and the
//!   event hook where committed rounds are made durable.

pub mod driver;
