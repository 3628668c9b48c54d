//! What Tally's services share: Kafka and Postgres settings and clients, the topic set,
//! the Prometheus metrics registry, tracing set-up, the shutdown signal, and the
//! configuration store ([`config_store`]), the one reader and writer of the stored tier
//! configuration.
//!
//! Nothing here knows about metering rules (that is `tally-domain`) or about one service's
//! data path.

pub mod auth;
pub mod clickhouse;
pub mod config_store;
pub mod consuming;
pub mod health;
pub mod http;
pub mod kafka;
pub mod membership;
pub mod metrics;
pub mod postgres;
pub mod producing;
pub mod shutdown;
pub mod telemetry;
