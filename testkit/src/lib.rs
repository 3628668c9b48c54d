//! One harness for running a Tally of its own on shared servers (broker, Postgres,
//! ClickHouse), used by the black-box tests (`tests/it`), the component tests that need a
//! migrated database (`api/tests`, `aggregator/tests`) and `tally bench`.
//!
//! - [`Names`]: a run's random id and the databases, topics and consumer group named after it,
//!   so runs never share state;
//! - [`with_database`]: a Postgres server URL pointed at another database, query string kept,
//!   a clear error for a URL it cannot rewrite;
//! - [`Servers`], [`Instance`]: where the servers are, and the environment that points a
//!   `tally` process at the run's names; [`Instance::drop_databases`] removes them;
//! - [`Service`]: a `tally` child process with its log, stopped by its pid when dropped, and
//!   [`Service::wait_healthy`] for its readiness; [`free_port`] for its listen address;
//! - [`TestDatabase`]: a fresh, migrated Postgres database for one component test.
//!
//! Contract: nothing here panics or asserts; every failure is returned as an error naming
//! what failed, so product code (`tally bench`) and tests use it alike.

mod database_url;
mod instance;
mod names;
mod service;
mod test_database;

pub use database_url::{with_database, BadDatabaseUrl};
pub use instance::{Instance, Servers};
pub use names::{random_id, Names};
pub use service::{free_addr, free_port, Service};
pub use test_database::TestDatabase;
