//! `tally reconcile --period YYYY-MM [--subject S | --budget group:eng]`: ledger vs history vs
//! accepted events, for every subject's and every budget's ledger rows.
//!
//! Prints a summary and every drift with its size (or the JSON report with
//! `--format json`). Exit code 0 only with zero drift, 2 with drift, 1 on error.

use std::process::ExitCode;

use tally_common::clickhouse::ClickHouseSettings;
use tally_common::postgres::PostgresSettings;
use tally_domain::budget::BudgetOwner;
use tally_history::reconcile::{reconcile_only, Month, Only};

#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    /// The month to reconcile, YYYY-MM.
    #[arg(long)]
    pub period: String,
    /// Only this subject.
    #[arg(long, conflicts_with = "budget")]
    pub subject: Option<String>,
    /// Only this budget's ledger rows: `group:<name>`, `api_key:<sha256 hex>` or `tier:<name>`.
    #[arg(long)]
    pub budget: Option<String>,
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
    let budget = match args.budget.as_deref() {
        None => None,
        Some(spec) => Some(BudgetOwner::parse_spec(spec).ok_or_else(|| {
            anyhow::anyhow!("--budget {spec:?} names no budget owner: expected group:<name>, api_key:<sha256 hex> or tier:<name>")
        })?),
    };
    let only = match (&budget, args.subject.as_deref()) {
        (Some(owner), _) => Only::Budget(owner),
        (None, Some(subject)) => Only::Subject(subject),
        (None, None) => Only::All,
    };
    let report = reconcile_only(&pool, &ch, month, only).await?;
    if args.format == "json" {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(2) })
}
