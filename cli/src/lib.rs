//! The `tally` command line: one binary for every service and operator command.
//!
//! `main.rs` only parses arguments and dispatches; each command lives in its own module.

pub mod bench;
pub mod close_period;
pub mod config_cmd;
pub mod demo;
pub mod explain;
pub mod export;
pub mod history;
pub mod reconcile;
pub mod setup;
