//! `tally reconcile --period YYYY-MM`: ledger vs history vs accepted events.
//!
//! Prints a summary and every drift with its size (or the JSON report with
//! `--format json`). Exit code 0 only with zero drift, 2 with drift, 1 on error.

use std::process::ExitCode;

use tally_common::clickhouse::ClickHouseSettings;
use tally_common::postgres::PostgresSettings;
use tally_history::reconcile::{reconcile, Month};

#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    /// The month to reconcile, YYYY-MM.
    #[arg(long)]
    pub period: String,
    /// Only this subject.
    #[arg(long)]
    pub subject: Option<String>,
    /// `text` (summary and drifts) or `json` (the full report).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub format: String,
    #[command(flatten)]
    pub postgres: PostgresSettings,
    #[command(flatten)]
    pub clickhouse: ClickHouseSettings,
}

pub async fn run(args: ReconcileArgs) -> anyhow::Result<ExitCode> {
    let month = Month::parse(&args.period).map_err(anyhow::Error::msg)?;
    let (pool, ch) = crate::history::connect(&args.postgres, &args.clickhouse).await?;
    let report = reconcile(&pool, &ch, month, args.subject.as_deref()).await?;
    if args.format == "json" {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(2) })
}
