//! Shared helpers for Starling benchmarks.
