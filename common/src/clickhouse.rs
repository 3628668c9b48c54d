//! ClickHouse settings and DDL.
//!
//! The DDL in `migrations/clickhouse` is written for both ClickHouse 18.16 (the local stack)
//! and current releases; each file is applied in name order over the HTTP interface and
//! every statement is idempotent (`IF NOT EXISTS`; a backfill inserts only what is missing).

use anyhow::{bail, Context};

/// Where ClickHouse is.
#[derive(Debug, Clone, clap::Args)]
pub struct ClickHouseSettings {
    /// ClickHouse HTTP URL.
    #[arg(long = "clickhouse-url", env = "TALLY_CLICKHOUSE_URL", default_value = "http://127.0.0.1:8123")]
    pub clickhouse_url: String,
    /// ClickHouse database for usage history.
    #[arg(long = "clickhouse-database", env = "TALLY_CLICKHOUSE_DATABASE", default_value = "tally")]
    pub clickhouse_database: String,
}

const DDL: &[(&str, &str)] = &[
    ("0001_usage.sql", include_str!("../../migrations/clickhouse/0001_usage.sql")),
    ("0002_rollups.sql", include_str!("../../migrations/clickhouse/0002_rollups.sql")),
    ("0003_subject_daily.sql", include_str!("../../migrations/clickhouse/0003_subject_daily.sql")),
];

/// The statements of a DDL file: `--` comment lines dropped, split on `;`.
fn statements(text: &str) -> Vec<String> {
    let code: String = text.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n");
    code.split(';').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

impl ClickHouseSettings {
    async fn execute(&self, client: &reqwest::Client, sql: &str) -> anyhow::Result<()> {
        let response = client
            .post(&self.clickhouse_url)
            .body(sql.to_string())
            .send()
            .await
            .with_context(|| format!("failed to reach ClickHouse at {}", self.clickhouse_url))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("ClickHouse refused a statement ({status}): {}", body.trim());
        }
        Ok(())
    }

    /// Creates the history database and tables if they do not exist.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        self.execute(&client, &format!("CREATE DATABASE IF NOT EXISTS `{}`", self.clickhouse_database)).await?;
        for (name, text) in DDL {
            for statement in statements(text) {
                let sql = statement.replace("{database}", &self.clickhouse_database);
                self.execute(&client, &sql).await.with_context(|| format!("in {name}"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn comment_only_parts_are_not_statements() {
        let text = "-- heading; with a semicolon\nCREATE TABLE a (x UInt8) ENGINE = Memory;\n-- trailing note\n";
        assert_eq!(super::statements(text), vec!["CREATE TABLE a (x UInt8) ENGINE = Memory".to_string()]);
    }

    #[test]
    fn the_subject_totals_file_is_a_table_and_its_backfill() {
        let (_, text) = super::DDL.iter().find(|(name, _)| *name == "0003_subject_daily.sql").unwrap();
        let statements = super::statements(text);
        assert_eq!(statements.len(), 2);
        assert!(statements[0].starts_with("CREATE TABLE IF NOT EXISTS `{database}`.usage_subject_daily"));
        assert!(statements[1].starts_with("INSERT INTO `{database}`.usage_subject_daily") && statements[1].contains("NOT IN"));
    }
}
