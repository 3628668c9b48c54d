//! The black-box tests: the real `tally` binary against the real broker, Postgres and
//! ClickHouse, in one test binary so the harness (`support`) is compiled once. Each module is
//! one area; a test's full name starts with its module (`bench::`, `api::`, ...), which is
//! how `scripts/test` runs the benchmark smoke test apart from the rest.

mod support;

mod api;
mod bench;
mod broker_faults;
mod budgets;
mod decisions;
mod exactly_once;
mod explain_cli;
mod faults;
mod history;
mod permanent_errors;
mod poison;
mod protocol;
mod slice;
