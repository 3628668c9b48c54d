//! ClickHouse settings, the client every ClickHouse call goes through, and the DDL.
//!
//! Every call uses the `clickhouse` crate over HTTP: typed rows in `RowBinary` with the
//! client's schema validation on (`RowBinaryWithNamesAndTypes`: a row type that does not match
//! its table is refused with the column named), LZ4 compression both ways, values passed as
//! server-side query parameters (`{name: Type}` in the statement), never spliced into it.
//!
//! The DDL in `migrations/clickhouse` is applied in file order, one statement at a time, and
//! each applied statement is recorded in `tally_migrations` (file, statement index): a
//! statement runs once per database, and a run cut short resumes at the first statement not
//! recorded. The files 0001-0003 predate the record and are idempotent on their own (`IF NOT
//! EXISTS`, a backfill that inserts only what is missing), so a database made before it gets
//! them replayed once, harmlessly. Statements name tables without a database: they run on a
//! client bound to the history database.

use anyhow::Context;

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

/// The DDL files, in the order they apply.
const DDL: &[(&str, &str)] = &[
    ("0001_usage.sql", include_str!("../../migrations/clickhouse/0001_usage.sql")),
    ("0002_rollups.sql", include_str!("../../migrations/clickhouse/0002_rollups.sql")),
    ("0003_subject_daily.sql", include_str!("../../migrations/clickhouse/0003_subject_daily.sql")),
    ("0004_current_server.sql", include_str!("../../migrations/clickhouse/0004_current_server.sql")),
    ("0005_budgets.sql", include_str!("../../migrations/clickhouse/0005_budgets.sql")),
];

/// The record of applied statements.
const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS tally_migrations (
    file       String,
    statement  UInt32,
    applied_at DateTime('UTC') DEFAULT now()
) ENGINE = MergeTree ORDER BY (file, statement)";

/// The statements of a DDL file: `--` comment lines dropped, split on `;`.
fn statements(text: &str) -> Vec<String> {
    let code: String = text.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n");
    code.split(';').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

impl ClickHouseSettings {
    /// A client of the server, not bound to a database.
    pub fn server_client(&self) -> clickhouse::Client {
        clickhouse::Client::default()
            .with_url(self.clickhouse_url.trim_end_matches('/'))
            .with_compression(clickhouse::Compression::Lz4)
            .with_validation(true)
    }

    /// A client bound to the history database: statements name its tables bare.
    pub fn client(&self) -> clickhouse::Client {
        self.server_client().with_database(&self.clickhouse_database)
    }

    /// Creates the history database if it does not exist and applies the DDL statements not
    /// applied yet (see the module docs).
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let reach = || format!("failed to reach ClickHouse at {}", self.clickhouse_url);
        self.server_client()
            .query("CREATE DATABASE IF NOT EXISTS {db:Identifier}")
            .param("db", &self.clickhouse_database)
            .execute()
            .await
            .with_context(reach)?;
        let client = self.client();
        client.query_raw(MIGRATIONS_TABLE).execute().await.context("failed to create tally_migrations")?;
        let applied: std::collections::HashSet<(String, u32)> =
            client.query("SELECT file, statement FROM tally_migrations").fetch_all::<(String, u32)>().await?.into_iter().collect();
        for (file, text) in DDL {
            for (i, statement) in statements(text).iter().enumerate() {
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                if applied.contains(&(file.to_string(), index)) {
                    continue;
                }
                client.query_raw(statement).execute().await.with_context(|| format!("statement {} of {file} failed", i + 1))?;
                client
                    .query("INSERT INTO tally_migrations (file, statement) VALUES ({file:String}, {statement:UInt32})")
                    .param("file", file)
                    .param("statement", index)
                    .execute()
                    .await
                    .with_context(|| format!("failed to record statement {} of {file}", i + 1))?;
            }
        }
        Ok(())
    }

    /// Drops the history database (tests and the bench drop their own).
    pub async fn drop_database(&self) -> anyhow::Result<()> {
        self.server_client()
            .query("DROP DATABASE IF EXISTS {db:Identifier}")
            .param("db", &self.clickhouse_database)
            .execute()
            .await
            .with_context(|| format!("failed to drop ClickHouse database {}", self.clickhouse_database))
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
        assert!(statements[0].starts_with("CREATE TABLE IF NOT EXISTS usage_subject_daily"));
        assert!(statements[1].starts_with("INSERT INTO usage_subject_daily") && statements[1].contains("NOT IN"));
    }

    #[test]
    fn no_statement_names_a_database_or_binds_a_placeholder() {
        for (name, text) in super::DDL {
            for s in super::statements(text) {
                assert!(!s.contains("{database}") && !s.contains('`'), "{name}: {s}");
            }
        }
    }
}
