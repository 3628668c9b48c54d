//! Tally's domain: the rules of metering, with no I/O.
//!
//! Everything here is a pure function of its inputs: parsing and validating usage events,
//! the metrics derived from them, calendar and rolling periods, rate strings, tiers and the
//! precedence that picks a subject's effective tier, and the decision a ledger implies.
//! The services (`ingest`, `aggregator`, `api`) do the I/O and call into this crate.
//!
//! **Invariant:** nothing in this crate reads a clock, a file, the network or the
//! environment. Callers pass the instant (`at`) and the bytes.

pub mod budget;
pub mod config;
pub mod decision;
pub mod event;
pub mod heartbeat;
pub mod metric;
pub mod period;
pub mod precedence;
pub mod rate;
pub mod tier;
