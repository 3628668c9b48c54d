//! `tally export --period YYYY-MM --format csv|json [--lines subjects|budgets]`: the billing
//! lines of a closed month (frozen lines plus adjustments), or of an open one with
//! `--preview`; per subject, and per budget (team, API key, tier pool) beside them.
//!
//! Totals are checked against the ledger; a mismatch is printed to stderr and the command
//! exits 2 (after writing the export). Exit 1 on error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tally_common::clickhouse::ClickHouseSettings;
use tally_common::postgres::PostgresSettings;
use tally_history::billing;
use tally_history::reconcile::Month;

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The month to export, YYYY-MM.
    #[arg(long)]
    pub period: String,
    #[arg(long, default_value = "csv", value_parser = ["csv", "json"])]
    pub format: String,
    /// Which lines a CSV holds: the subjects' or the budgets' (teams, API keys, tier pools;
    /// named `group:<name>`, `api_key:<hex>`, `tier:<name>`). JSON holds both.
    #[arg(long, default_value = "subjects", value_parser = ["subjects", "budgets"])]
    pub lines: String,
    /// Export a month that is not closed yet (lines marked `preview`).
    #[arg(long)]
    pub preview: bool,
    /// Write here instead of stdout.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Tier configuration with the price table. Without it, the built-in default.
    #[arg(long = "config", env = "TALLY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub postgres: PostgresSettings,
    #[command(flatten)]
    pub clickhouse: ClickHouseSettings,
}

pub async fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let month = Month::parse(&args.period).map_err(anyhow::Error::msg)?;
    let config = crate::history::load_config(args.config.as_deref())?;
    let (pool, ch) = crate::history::connect(&args.postgres, &args.clickhouse).await?;
    let export = billing::export(&pool, &ch, &config, month, args.preview).await?;
    let text = match (args.format.as_str(), args.lines.as_str()) {
        ("json", _) => serde_json::to_string_pretty(&export)? + "\n",
        (_, "budgets") => export.to_budget_csv(),
        _ => export.to_csv(),
    };
    match &args.output {
        Some(path) => std::fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))?,
        None => print!("{text}"),
    }
    for m in &export.ledger_mismatches {
        match &m.budget {
            Some(owner) => eprintln!("MISMATCH budget={owner} metric={} ledger={} export={}", m.metric, m.ledger, m.export),
            None => eprintln!("MISMATCH subject={} metric={} ledger={} export={}", m.subject, m.metric, m.ledger, m.export),
        }
    }
    Ok(if export.ledger_mismatches.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) })
}
