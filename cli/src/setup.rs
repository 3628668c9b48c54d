//! `tally setup` and `tally migrate`: create the database, apply migrations, create topics.

use tally_common::clickhouse::ClickHouseSettings;
use tally_common::kafka::KafkaSettings;
use tally_common::postgres::{self, PostgresSettings};

/// Creates the Postgres database if missing and applies the Postgres migrations.
pub async fn migrate_postgres(pg: &PostgresSettings) -> anyhow::Result<()> {
    pg.create_database_if_missing().await?;
    let pool = pg.connect().await?;
    postgres::migrate(&pool).await?;
    pool.close().await;
    Ok(())
}

/// Everything a fresh stack needs before the services start. Idempotent.
pub async fn setup(kafka: &KafkaSettings, pg: &PostgresSettings, ch: &ClickHouseSettings, skip_clickhouse: bool) -> anyhow::Result<()> {
    eprintln!("[setup] postgres: migrating database {}", pg.database()?);
    migrate_postgres(pg).await?;
    if skip_clickhouse {
        eprintln!("[setup] clickhouse: skipped");
    } else {
        eprintln!("[setup] clickhouse: creating database {} and tables", ch.clickhouse_database);
        ch.migrate().await?;
    }
    eprintln!(
        "[setup] kafka: creating topics {}, {}, {}, {}",
        kafka.usage_topic, kafka.decisions_topic, kafka.quarantine_topic, kafka.control_topic
    );
    kafka.ensure_topics().await?;
    eprintln!("[setup] done");
    Ok(())
}
