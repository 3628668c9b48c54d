//! `tally export --period YYYY-MM --format csv|json`: the billing lines of a closed month
//! (frozen lines plus adjustments), or of an open one with `--preview`.
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
    let text = if args.format == "json" { serde_json::to_string_pretty(&export)? + "\n" } else { export.to_csv() };
    match &args.output {
        Some(path) => std::fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))?,
        None => print!("{text}"),
    }
    for m in &export.ledger_mismatches {
        eprintln!("MISMATCH subject={} metric={} ledger={} export={}", m.subject, m.metric, m.ledger, m.export);
    }
    Ok(if export.ledger_mismatches.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) })
}
