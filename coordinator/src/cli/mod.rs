//! Subcommands of the `starling` tool, one module per group.

pub mod simulate;
pub mod workload;
