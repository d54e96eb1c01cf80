//! Subcommands of the `starling` tool, one module per group.

pub mod admin;
pub mod privacy;
pub mod serve;
pub mod simulate;
pub mod workload;
