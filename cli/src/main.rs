//! `tally`: Tally's one binary. Run `tally --help` for the commands.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tally_aggregator::AggregatorSettings;
use tally_api::ApiSettings;
use tally_cli::explain::{ExplainCommand, ValidateConfigArgs};
use tally_cli::{bench, close_period, config_cmd, demo, explain, export, reconcile, setup};
use tally_common::clickhouse::ClickHouseSettings;
use tally_common::kafka::KafkaSettings;
use tally_common::postgres::PostgresSettings;
use tally_common::{shutdown, telemetry};
use tally_history::WriterSettings;
use tally_ingest::IngestSettings;

mod memory;

/// Tally: exactly-once quota metering for LLM and API platforms.
///
/// Every setting can also be given as an environment variable (shown in each command's help).
#[derive(Parser)]
#[command(name = "tally", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP ingest service (POST /v1/events).
    Ingest {
        #[command(flatten)]
        ingest: IngestSettings,
        #[command(flatten)]
        kafka: KafkaSettings,
    },
    /// Run the aggregator: exactly-once ledgers and decision snapshots.
    Aggregator {
        #[command(flatten)]
        aggregator: AggregatorSettings,
        #[command(flatten)]
        kafka: KafkaSettings,
        #[command(flatten)]
        postgres: PostgresSettings,
    },
    /// Run the API service: decisions, usage, history and reconciliation.
    Api {
        #[command(flatten)]
        api: ApiSettings,
        #[command(flatten)]
        kafka: KafkaSettings,
        #[command(flatten)]
        postgres: PostgresSettings,
        #[command(flatten)]
        clickhouse: ClickHouseSettings,
    },
    /// Run the history writer: usage rows and rollups in ClickHouse, in its own group.
    HistoryWriter {
        #[command(flatten)]
        writer: WriterSettings,
        #[command(flatten)]
        kafka: KafkaSettings,
        #[command(flatten)]
        postgres: PostgresSettings,
        #[command(flatten)]
        clickhouse: ClickHouseSettings,
    },
    /// Compare ledgers, history and accepted events for a month; exit 0 only with zero drift.
    Reconcile(reconcile::ReconcileArgs),
    /// Export a month's billing lines as CSV or JSON.
    Export(export::ExportArgs),
    /// Close a month for billing (after its grace time); later usage becomes adjustments.
    ClosePeriod(close_period::ClosePeriodArgs),
    /// Create the Postgres database if missing and apply the Postgres migrations.
    Migrate {
        #[command(flatten)]
        postgres: PostgresSettings,
    },
    /// Prepare a stack: Postgres database and migrations, ClickHouse tables, Kafka topics.
    Setup {
        #[command(flatten)]
        kafka: KafkaSettings,
        #[command(flatten)]
        postgres: PostgresSettings,
        #[command(flatten)]
        clickhouse: ClickHouseSettings,
        /// Do not touch ClickHouse.
        #[arg(long)]
        skip_clickhouse: bool,
    },
    /// Manage the tier configuration in Postgres (apply a YAML file, show the one in force).
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// Measure throughput, latencies, memory and history queries on the local stack, each
    /// beside a baseline from the same run (see `tally bench --help`).
    #[command(long_about = bench::LONG_ABOUT)]
    Bench(bench::BenchArgs),
    /// Send a short demo load and watch one user cross a limit and get blocked.
    Demo(demo::DemoArgs),
    /// Explain a period, a rate or a subject's effective tier; prints one JSON object.
    #[command(subcommand)]
    Explain(ExplainCommand),
    /// Check a tier configuration file: a summary, or every error with its location.
    ValidateConfig(ValidateConfigArgs),
}

/// What a command's process is, which decides how it is set up before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcessKind {
    /// A long-running service: its allocators are tuned for bursts and rest ([`memory`]).
    Service,
    /// A command that does its job and exits (it may start services as processes of their
    /// own, which tune themselves): the allocators keep their defaults and no tuning thread
    /// starts.
    Tool,
}

impl Command {
    /// The kind of process this command runs as. The match names every command, so a new
    /// one does not compile until it is given a kind.
    fn process_kind(&self) -> ProcessKind {
        match self {
            Command::Ingest { .. } | Command::Aggregator { .. } | Command::Api { .. } | Command::HistoryWriter { .. } => {
                ProcessKind::Service
            }
            Command::Reconcile(_)
            | Command::Export(_)
            | Command::ClosePeriod(_)
            | Command::Migrate { .. }
            | Command::Setup { .. }
            | Command::Config(_)
            | Command::Bench(_)
            | Command::Demo(_)
            | Command::Explain(_)
            | Command::ValidateConfig(_) => ProcessKind::Tool,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let kind = cli.command.process_kind();
    if kind == ProcessKind::Service {
        memory::tune();
    }
    telemetry::init();
    let runtime = match runtime_for(kind) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Ingest { ingest, kafka } => tally_ingest::run(ingest, kafka, shutdown::signal()).await?,
        Command::Aggregator { aggregator, kafka, postgres } => {
            tally_aggregator::run(aggregator, kafka, postgres, shutdown::signal()).await?
        }
        Command::Api { api, kafka, postgres, clickhouse } => tally_api::run(api, kafka, postgres, clickhouse, shutdown::signal()).await?,
        Command::HistoryWriter { writer, kafka, postgres, clickhouse } => {
            tally_history::run(writer, kafka, postgres, clickhouse, shutdown::signal()).await?
        }
        Command::Reconcile(args) => return reconcile::run(args).await,
        Command::Export(args) => return export::run(args).await,
        Command::ClosePeriod(args) => close_period::run(args).await?,
        Command::Migrate { postgres } => setup::migrate_postgres(&postgres).await?,
        Command::Setup { kafka, postgres, clickhouse, skip_clickhouse } => {
            setup::setup(&kafka, &postgres, &clickhouse, skip_clickhouse).await?
        }
        Command::Demo(args) => return demo::run(args).await,
        Command::Bench(args) => return bench::run(args).await,
        Command::Config(cmd) => return config_cmd::run(cmd).await,
        Command::Explain(cmd) => return Ok(exit_code(explain::run_explain_cli(cmd))),
        Command::ValidateConfig(args) => return Ok(exit_code(explain::run_validate_config(args))),
    }
    Ok(ExitCode::SUCCESS)
}

/// The multi-threaded runtime; a service's workers give memory back as they park.
fn runtime_for(kind: ProcessKind) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if kind == ProcessKind::Service {
        builder.on_thread_park(memory::on_worker_park);
    }
    builder.build()
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// A command line and the kind of process it must run as.
    struct KindCase {
        args: &'static [&'static str],
        kind: ProcessKind,
    }

    const fn case(args: &'static [&'static str], kind: ProcessKind) -> KindCase {
        KindCase { args, kind }
    }

    /// One command line for each command.
    const KINDS: [KindCase; 14] = [
        case(&["ingest"], ProcessKind::Service),
        case(&["aggregator"], ProcessKind::Service),
        case(&["api"], ProcessKind::Service),
        case(&["history-writer"], ProcessKind::Service),
        case(&["reconcile", "--period", "2026-01"], ProcessKind::Tool),
        case(&["export", "--period", "2026-01"], ProcessKind::Tool),
        case(&["close-period", "--period", "2026-01"], ProcessKind::Tool),
        case(&["migrate"], ProcessKind::Tool),
        case(&["setup"], ProcessKind::Tool),
        case(&["config", "show"], ProcessKind::Tool),
        case(&["bench"], ProcessKind::Tool),
        case(&["demo"], ProcessKind::Tool),
        case(&["explain", "period", "month", "--at", "2026-01-15T00:00:00Z"], ProcessKind::Tool),
        case(&["validate-config", "tiers.yaml"], ProcessKind::Tool),
    ];

    #[test]
    fn only_the_four_services_run_as_services() {
        for KindCase { args, kind } in KINDS {
            let cli = Cli::try_parse_from(std::iter::once("tally").chain(args.iter().copied()))
                .unwrap_or_else(|e| panic!("tally {}: {e}", args.join(" ")));
            assert_eq!(cli.command.process_kind(), kind, "tally {}", args.join(" "));
        }
    }

    #[test]
    fn every_command_has_its_kind_checked() {
        let checked: Vec<&str> = KINDS.iter().map(|case| case.args[0]).collect();
        for command in Cli::command().get_subcommands() {
            assert!(checked.contains(&command.get_name()), "tally {} has no row in KINDS", command.get_name());
        }
    }
}
