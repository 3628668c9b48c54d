//! `tally close-period --period YYYY-MM`: freeze a month's billing lines.
//!
//! Allowed once the month has ended in every timezone plus `--grace-hours`, and only with
//! zero reconciliation drift unless `--force`. A closed month is immutable; usage counted
//! for it later is exported as adjustments.

use std::path::PathBuf;

use tally_common::clickhouse::ClickHouseSettings;
use tally_common::postgres::PostgresSettings;
use tally_history::billing;
use tally_history::reconcile::Month;

#[derive(Debug, clap::Args)]
pub struct ClosePeriodArgs {
    /// The month to close, YYYY-MM.
    #[arg(long)]
    pub period: String,
    /// Hours to wait after the month ended everywhere, for late events.
    #[arg(long, env = "TALLY_BILLING_GRACE_HOURS", default_value_t = 72, value_parser = clap::value_parser!(i64).range(0..=24 * 60))]
    pub grace_hours: i64,
    /// Close even with reconciliation drift (the drift is recorded with the period).
    #[arg(long)]
    pub force: bool,
    /// Who closes the period (recorded).
    #[arg(long, env = "USER", default_value = "tally")]
    pub closed_by: String,
    /// Tier configuration with the price table. Without it, the built-in default.
    #[arg(long = "config", env = "TALLY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub postgres: PostgresSettings,
    #[command(flatten)]
    pub clickhouse: ClickHouseSettings,
}

pub async fn run(args: ClosePeriodArgs) -> anyhow::Result<()> {
    let month = Month::parse(&args.period).map_err(anyhow::Error::msg)?;
    let config = crate::history::load_config(args.config.as_deref())?;
    let (pool, ch) = crate::history::connect(&args.postgres, &args.clickhouse).await?;
    let options = billing::CloseOptions { grace_hours: args.grace_hours, force: args.force, closed_by: args.closed_by.clone() };
    let closed = billing::close(&pool, &ch, &config, month, &options, chrono::Utc::now()).await?;
    println!(
        "closed {}: {} lines, {} micro-dollars, {} budget lines; reconciliation {}",
        closed.period,
        closed.lines,
        closed.total_cost_micros,
        closed.budget_lines,
        if closed.reconciliation.ok { "ok" } else { "had drift (forced)" }
    );
    Ok(())
}
