//! What the history commands share: connections and the tier configuration (for prices).

use anyhow::Context;
use tally_common::clickhouse::ClickHouseSettings;
use tally_common::postgres::PostgresSettings;
use tally_domain::config::Config;
use tally_history::client::Ch;

/// Postgres pool and ClickHouse handle for an operator command.
pub async fn connect(postgres: &PostgresSettings, clickhouse: &ClickHouseSettings) -> anyhow::Result<(sqlx::PgPool, Ch)> {
    Ok((postgres.connect().await?, Ch::new(clickhouse)))
}

/// The tier configuration at `path`, or the built-in default.
pub fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    let (text, origin) = match path {
        None => (tally_common::config_store::BUILTIN_DOCUMENT.to_string(), "(built-in default)".to_string()),
        Some(p) => (std::fs::read_to_string(p).with_context(|| format!("failed to read {}", p.display()))?, p.display().to_string()),
    };
    Config::from_yaml_str(&text).map_err(|e| anyhow::anyhow!("invalid tier configuration {origin}:\n{e}"))
}
